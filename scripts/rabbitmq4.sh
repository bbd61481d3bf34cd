#!/usr/bin/env bash
# RabbitMQ 4.x beside the host's 3.x, for compatibility tests, without touching the host's packages.
#
#   scripts/rabbitmq4.sh up      build (once) a Debian trixie chroot with rabbitmq-server 4.0.x,
#                                start it on 127.0.0.1:5674 and wait until it answers
#   scripts/rabbitmq4.sh down    stop it and unmount what `up` mounted
#   scripts/rabbitmq4.sh status  say whether it answers (exit 1 if not)
#   scripts/rabbitmq4.sh ctl ARGS...         rabbitmqctl ARGS against the node
#   scripts/rabbitmq4.sh diagnostics ARGS... rabbitmq-diagnostics ARGS against the node
#
#   scripts/rabbitmq4.sh clean   stop it and delete the cached chroot (the next `up` rebuilds it)
#
# Idempotent. The chroot is cached in $MQLOCK_RMQ4_ROOT (default /var/lib/mqlock-rmq4/chroot);
# remove it with `clean`, never with a bare rm -rf: while the node runs, the host's /dev is
# bind-mounted inside it. Node rabbit4@localhost, AMQP port 5674, distribution port 25674; it
# shares the host's epmd (started by the host broker, or by this node if none runs).
# URL: amqp://guest:guest@127.0.0.1:5674/%2f
#
# The Debian mirror is the one apt already uses on this machine (read from /etc/apt/sources.list*
# at run time), or $MQLOCK_DEBIAN_MIRROR.
set -euo pipefail

BASE=${MQLOCK_RMQ4_BASE:-/var/lib/mqlock-rmq4}
ROOT=${MQLOCK_RMQ4_ROOT:-$BASE/chroot}
SUITE=${MQLOCK_RMQ4_SUITE:-trixie}
NODE=rabbit4@localhost
PORT=${MQLOCK_RMQ4_PORT:-5674}
DIST_PORT=$((PORT + 20000))
LOG=$BASE/rabbitmq4.log
RUN_DIR=${MQLOCK_RUN_DIR:-/var/tmp/mqlock-services}
LOG_TAG=rabbitmq4
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

# The first Debian archive URL in apt's sources (one-line .list or deb822 .sources format).
debian_mirror() {
  if [ -n "${MQLOCK_DEBIAN_MIRROR:-}" ]; then echo "$MQLOCK_DEBIAN_MIRROR"; return; fi
  local files=() f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || return 1
  grep -h -v '^[[:space:]]*#' "${files[@]}" \
    | grep -o -E '(https?|file)://[^ ]+' \
    | sed 's:/*$::' \
    | grep -E '/debian$' \
    | head -n 1
}

in_root() { # run a command inside the chroot with the node's environment
  chroot "$ROOT" /usr/bin/env -i \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/var/lib/rabbitmq LANG=C.UTF-8 \
    RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="$PORT" RABBITMQ_DIST_PORT="$DIST_PORT" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    "$@"
}

ping_node() { port_open "$PORT" && in_root rabbitmqctl -q -n "$NODE" await_startup --timeout 5 >/dev/null 2>&1; }

build() {
  if [ -x "$ROOT/usr/sbin/rabbitmq-server" ]; then return 0; fi
  command -v debootstrap >/dev/null || apt_install debootstrap
  local mirror; mirror=$(debian_mirror) || true
  [ -n "$mirror" ] || fail "no Debian archive found in /etc/apt/sources.list*; set MQLOCK_DEBIAN_MIRROR"
  mkdir -p "$BASE"
  rm -rf "$ROOT.partial"
  say "building a $SUITE chroot with rabbitmq-server in $ROOT (once; log: $BASE/debootstrap.log)"
  local start=$SECONDS
  if ! debootstrap --variant=minbase --include=rabbitmq-server "$SUITE" "$ROOT.partial" "$mirror" \
      >"$BASE/debootstrap.log" 2>&1; then
    tail -n 30 "$BASE/debootstrap.log" >&2
    fail "debootstrap $SUITE"
  fi
  mv "$ROOT.partial" "$ROOT"
  echo "$((SECONDS - start))" >"$BASE/debootstrap.seconds"
  say "chroot built in $((SECONDS - start))s ($(in_root dpkg-query -W -f='${Version}' rabbitmq-server))"
}

mount_root() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
  cp /etc/hosts "$ROOT/etc/hosts"
}

umount_root() {
  mountpoint -q "$ROOT/dev" && umount -l "$ROOT/dev" || true
  mountpoint -q "$ROOT/proc" && umount -l "$ROOT/proc" || true
}

up() {
  mkdir -p "$BASE"
  exec 9>"$BASE/up.lock"
  flock 9
  build
  mount_root
  if ping_node; then say "rabbitmq $NODE already up on 127.0.0.1:$PORT"; return 0; fi
  mkdir -p "$ROOT/etc/rabbitmq"
  cat >"$ROOT/etc/rabbitmq/rabbitmq.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:${PORT}
loopback_users.guest = true
log.console = false
log.file.level = warning
CONF
  # Erlang distribution on loopback only.
  echo 'SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"' >"$ROOT/etc/rabbitmq/rabbitmq-env.conf"
  # A node left over from an earlier run that does not answer: stop it first.
  local pidfile=$ROOT/var/lib/rabbitmq/mnesia/$NODE.pid pid
  if [ -s "$pidfile" ] && pid=$(cat "$pidfile") && kill -0 "$pid" 2>/dev/null; then
    say "stopping unresponsive $NODE (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  # Fresh state: a scratch broker for tests.
  rm -rf "$ROOT/var/lib/rabbitmq/mnesia/$NODE" "$ROOT/var/lib/rabbitmq/mnesia/$NODE"-* "$pidfile"
  mkdir -p "$ROOT/var/lib/rabbitmq/mnesia" "$ROOT/var/log/rabbitmq"
  in_root chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
  ulimit -n 65536 2>/dev/null || true
  say "starting rabbitmq $NODE on 127.0.0.1:$PORT"
  local start=$SECONDS
  # 9>&-: the node must not inherit (and so hold forever) the lock of `up`.
  in_root rabbitmq-server -detached >"$LOG" 2>&1 9>&- || { cat "$LOG" >&2; fail "rabbitmq-server $NODE did not start"; }
  until ping_node; do
    if [ $((SECONDS - start)) -ge 180 ]; then
      tail -n 30 "$ROOT/var/log/rabbitmq/$NODE.log" >&2 2>/dev/null || true
      fail "rabbitmq $NODE did not answer on 127.0.0.1:$PORT within 180s"
    fi
    sleep 1
  done
  say "rabbitmq $NODE up after $((SECONDS - start))s: amqp://guest:guest@127.0.0.1:$PORT/%2f ($(in_root rabbitmqctl -q -n "$NODE" version 2>/dev/null))"
}

down() {
  [ -d "$ROOT" ] || { say "no chroot at $ROOT"; return 0; }
  if [ -x "$ROOT/usr/sbin/rabbitmqctl" ] && mountpoint -q "$ROOT/proc"; then
    in_root rabbitmqctl -q -n "$NODE" stop >/dev/null 2>&1 || true
  fi
  umount_root
  say "rabbitmq $NODE stopped"
}

clean() {
  down
  if mountpoint -q "$ROOT/dev" || mountpoint -q "$ROOT/proc"; then
    fail "$ROOT/dev or $ROOT/proc is still mounted; not deleting"
  fi
  rm -rf --one-file-system "$ROOT" "$ROOT.partial"
  say "deleted $ROOT"
}

status() {
  if [ -d "$ROOT/proc" ] && mountpoint -q "$ROOT/proc" && ping_node; then
    say "rabbitmq $NODE: up on 127.0.0.1:$PORT"
  else
    say "rabbitmq $NODE: DOWN"; return 1
  fi
}

case ${1:-up} in
  up) need_root "$@"; up ;;
  down) need_root "$@"; down ;;
  clean) need_root "$@"; clean ;;
  status) need_root "$@"; status ;;
  ctl) need_root "$@"; shift; in_root rabbitmqctl -q -n "$NODE" "$@" ;;
  diagnostics) need_root "$@"; shift; in_root rabbitmq-diagnostics -q -n "$NODE" "$@" ;;
  *) echo "usage: $0 up|down|status|clean|ctl ARGS|diagnostics ARGS" >&2; exit 2 ;;
esac
