#!/usr/bin/env bash
# Two "nodes" mount one backing directory through mqlock; a write-open on node B waits while node
# A holds the file open for writing, then B reads everything A wrote. Called by scripts/demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
M=target/debug/mqlock
work=$(mktemp -d /tmp/mqlock-demo.XXXXXX)
mkdir -p "$work/backing" "$work/a" "$work/b"
cleanup() {
  # SIGTERM makes each daemon unmount cleanly; the lazy unmount is for one that could not.
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  for m in "$work/a" "$work/b"; do mountpoint -q "$m" && fusermount3 -uz "$m"; done
  rm -rf "$work"
}
pids=()
trap cleanup EXIT
echo "== two mounts of $work/backing: node A on $work/a, node B on $work/b"
$M mount "$work/backing" "$work/a" & pids+=($!)
$M mount "$work/backing" "$work/b" & pids+=($!)
for m in a b; do
  for _ in $(seq 100); do mountpoint -q "$work/$m" && break; sleep 0.1; done
  mountpoint -q "$work/$m" || { echo "mount $m did not come up" >&2; exit 1; }
done
(
  exec 3>"$work/a/report.txt"              # node A opens for writing: takes the file's lock
  echo "  A: opened report.txt for writing (lock held); writing for 2 s"
  for i in 1 2; do echo "line $i from A" >&3; sleep 1; done
  echo "  A: closing (lock released)"
) &
writer=$!
sleep 0.5
start=$(date +%s.%N)
echo "  B: opening report.txt for appending..."
echo "line from B" >>"$work/b/report.txt"      # waits for A's close
printf '  B: got the lock after %.1f s and appended; B now reads:\n' "$(echo "$(date +%s.%N) - $start" | bc)"
sed 's/^/      /' "$work/b/report.txt"
# Only the writer: a bare `wait` would also wait for the mount daemons, which run until cleanup.
wait "$writer"
