#!/usr/bin/env bash
# Every test of the project, as CI runs it: services up (installing what is missing), format and
# lint checks, then all unit, integration and doc tests against the real services.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh up
echo "== cargo fmt --check"
cargo fmt --all --check
# Every tier: the integration tests that need the services started above are behind features
# (tests/README.md); a plain `cargo test` leaves them out.
FEATURES=mqlock-suite/services,mqlock-fuse/mount-tests
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --features "$FEATURES" -- -D warnings
echo "== cargo test"
# Test binaries run one after another (each runs its tests in parallel); the FUSE and fault
# tests start daemons and restart the faults broker, which is safer than interleaving binaries.
cargo test --workspace --no-fail-fast --features "$FEATURES"
echo "== all tests passed"
