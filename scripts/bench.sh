#!/usr/bin/env bash
# The anchor measurements of issue 11: mqlock's lock+unlock cycle against a raw AMQP hop,
# Redis, PostgreSQL and etcd 3.4, in one run on this machine (crates/mqlock-bench).
#
#   scripts/bench.sh               single nodes: the main broker, Redis, PostgreSQL, etcd
#   scripts/bench.sh --cluster     also mqlock on quorum queues on the 3-node RabbitMQ cluster
#                                  (scripts/cluster.sh) against a 3-member etcd cluster
#   scripts/bench.sh --iterations 5000 ...   any other argument goes to mqlock-bench (--help)
#
# Starts what it needs through scripts/services.sh (and scripts/cluster.sh with --cluster),
# installs the build's and the plot's needs when missing (protobuf-compiler and libprotobuf-dev:
# etcd-client's build script compiles etcd's .proto files with protoc, and they import
# google/protobuf/descriptor.proto; fonts-dejavu-core: the plot's text),
# builds in release mode and prints the markdown table. The CDF plot goes to
# $MQLOCK_BENCH_PLOT (default docs/bench-cdf.png), the table also to
# ${CARGO_TARGET_DIR:-target}/mqlock-bench.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${MQLOCK_RUN_DIR:-/var/tmp/mqlock-services}
LOG_TAG=bench
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

cluster=false
for a in "$@"; do [ "$a" = --cluster ] && cluster=true; done

FONT=/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
if ! command -v protoc >/dev/null || [ ! -s /usr/include/google/protobuf/descriptor.proto ] || [ ! -s "$FONT" ]; then
  [ "$(id -u)" -eq 0 ] || fail "protobuf-compiler, libprotobuf-dev and fonts-dejavu-core are needed: install them as root (apt-get install protobuf-compiler libprotobuf-dev fonts-dejavu-core) or run this as root"
  apt_install protobuf-compiler libprotobuf-dev fonts-dejavu-core
fi

services="rabbitmq redis postgres etcd"
$cluster && services+=" etcd-cluster"
MQLOCK_SERVICES=$services scripts/services.sh up
if $cluster; then
  scripts/cluster.sh up
  MQLOCK_CLUSTER_URLS=$(scripts/cluster.sh urls)
  export MQLOCK_CLUSTER_URLS
fi

PLOT=${MQLOCK_BENCH_PLOT:-docs/bench-cdf.png}
OUT=${CARGO_TARGET_DIR:-target}/mqlock-bench.md
mkdir -p "$(dirname "$PLOT")" "$(dirname "$OUT")"
say "building mqlock-bench (release) and measuring; the table is also written to $OUT"
cargo build --release -p mqlock-bench
cargo run --release -q -p mqlock-bench -- --font "$FONT" --plot "$PLOT" "$@" | tee "$OUT"
