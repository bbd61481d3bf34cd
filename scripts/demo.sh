#!/usr/bin/env bash
# The main job, end to end on a fresh machine: bring up the broker, build `mqlock`, and show two
# `mqlock exec` contenders taking turns on one lock, each with its fencing token; then, if FUSE
# is available, two mounts of one directory where a write on one waits for the other's.
set -euo pipefail
cd "$(dirname "$0")/.."
MQLOCK_SERVICES="rabbitmq fuse" scripts/services.sh up
cargo build -q -p mqlock-cli
M=target/debug/mqlock
export MQLOCK_AMQP_URL=${MQLOCK_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}

echo
echo "== two contenders for the lock 'demo/report' (each holds it for 1 s)"
for who in alice bob; do
  $M exec -v demo/report -- sh -c "echo \"  $who: holding the lock with fencing token \$MQLOCK_FENCING_TOKEN\"; sleep 1; echo \"  $who: done\"" &
done
sleep 0.5
echo "  status while held: $($M status demo/report || true)"
wait
echo "  status afterwards: $($M status demo/report || true)"

if [ -x scripts/demo-mount.sh ] && [ -e /dev/fuse ]; then
  echo
  scripts/demo-mount.sh
fi
