#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this one machine, on loopback only, for the fault-injection suite
# (tests/cluster_faults.rs) and for trying mqlock with quorum queues by hand.
#
#   scripts/cluster.sh up              start the three nodes (fresh state) and join them; idempotent
#   scripts/cluster.sh down            heal, resume and stop every node
#   scripts/cluster.sh status          what each node is doing (exit 1 unless all 3 run clustered)
#   scripts/cluster.sh urls            the comma-separated AMQP URLs of the three nodes
#   scripts/cluster.sh kill NODE       kill -9 the node's Erlang VM (a crash)
#   scripts/cluster.sh stop NODE       graceful stop of the node's VM (`rabbitmqctl stop`)
#   scripts/cluster.sh start NODE      start a stopped or killed node again, keeping its data
#   scripts/cluster.sh restart-all     stop all three (one after another), then start all three
#   scripts/cluster.sh partition NODE  cut the node off from the other nodes AND from clients
#   scripts/cluster.sh partition NODE --peers-only   cut it off from the other nodes only
#   scripts/cluster.sh heal [NODE]     undo `partition` (every node when none is named)
#   scripts/cluster.sh pause NODE      SIGSTOP the node's VM (a frozen broker); `resume NODE` undoes it
#   scripts/cluster.sh leader QUEUE    print the node that leads a quorum queue
#   scripts/cluster.sh wait-healthy [SECONDS]  wait until all three run, clustered, no partition
#   scripts/cluster.sh partition-handling [MODE]  set cluster_partition_handling (ignore, autoheal,
#                                      pause_minority) on every node at run time, or print it;
#                                      a node restarted later reads pause_minority from its config
#
# NODE is 1, 2, 3 (or c1, mqlock-c1, mqlock-c1@localhost). Nodes:
#   mqlock-c1@localhost  amqp://guest:guest@127.0.0.1:5681/%2f  (Erlang distribution on 25681)
#   mqlock-c2@localhost  amqp://guest:guest@127.0.0.1:5682/%2f  (25682)
#   mqlock-c3@localhost  amqp://guest:guest@127.0.0.1:5683/%2f  (25683)
# Data lives in /var/lib/rabbitmq/mqlock-cluster (wiped by `up` when it has to start nodes).
#
# Choices (docs/reliability.md explains them):
# - cluster_partition_handling = pause_minority: a node that can see fewer than half of the
#   cluster stops serving (closes its client connections) until the partition heals. For a lock
#   this is what we want: the minority side cannot keep a lock queue's consumers alive while
#   the majority hands the lock on; quorum queues need a majority to make progress anyway, and
#   autoheal would let both sides serve during the split.
# - net_ticktime = 10 s (Erlang default 60 s): a silent peer is declared down after 10 to 12.5 s,
#   so a partitioned node is noticed, its consumers dropped and its locks handed on within
#   seconds instead of a minute. Lower values risk false partitions on a loaded 2-core machine.
#
# How `partition` works on loopback: every node shares 127.0.0.1, so addresses cannot tell nodes
# apart. The node's Erlang VM is moved into its own cgroup (v2) and iptables drops (a) every
# packet the VM sends (`-m cgroup`, OUTPUT), marking the connection so that packets sent to it
# on that connection are dropped too (CONNMARK), and (b) every packet sent to the VM's ports:
# its AMQP and distribution listeners and the local ports of its open sockets (INPUT). The
# node is then silent and deaf to its peers, epmd and clients alike, while its process runs on:
# a network partition of one node, not a crash. Needs iptables with the cgroup and connmark
# matches (checked; installed with apt if missing).
set -euo pipefail

RUN_DIR=${MQLOCK_RUN_DIR:-/var/tmp/mqlock-services}
LOG_TAG=cluster
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
BASE=/var/lib/rabbitmq/mqlock-cluster
PORTS=(5681 5682 5683)
NAMES=(mqlock-c1@localhost mqlock-c2@localhost mqlock-c3@localhost)
NET_TICKTIME=${MQLOCK_CLUSTER_NET_TICKTIME:-10}
CHAIN_IN=MQLOCK-CLUSTER-IN
CHAIN_OUT=MQLOCK-CLUSTER-OUT
mkdir -p "$RUN_DIR"

# node_index NODE -> 0..2
node_index() {
  case $1 in
    1|c1|mqlock-c1|mqlock-c1@localhost) echo 0 ;;
    2|c2|mqlock-c2|mqlock-c2@localhost) echo 1 ;;
    3|c3|mqlock-c3|mqlock-c3@localhost) echo 2 ;;
    *) fail "unknown node '$1' (1, 2 or 3)" ;;
  esac
}

node_env() { # INDEX
  local i=$1 port=${PORTS[$1]}
  export RABBITMQ_NODENAME=${NAMES[$i]}
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$port
  export RABBITMQ_DIST_PORT=$((port + 20000))
  export RABBITMQ_CONFIG_FILE=/etc/rabbitmq/mqlock-cluster-$port
  export RABBITMQ_ADVANCED_CONFIG_FILE=/etc/rabbitmq/mqlock-cluster-$port-advanced.config
  export ERL_EPMD_ADDRESS=127.0.0.1
  export HOME=/var/lib/rabbitmq
  export RABBITMQ_MNESIA_BASE=$BASE
  export RABBITMQ_PID_FILE=$BASE/${NAMES[$i]}.pid
}

ctl() { # INDEX ARGS... : rabbitmqctl against one node, bounded in time
  local i=$1; shift
  (node_env "$i"; timeout 60 rabbitmqctl -q -n "${NAMES[$i]}" "$@")
}

node_pid() { local f=$BASE/${NAMES[$1]}.pid; [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && cat "$f"; }
node_ping() { (node_env "$1"; timeout 15 rabbitmqctl -q -n "${NAMES[$1]}" await_startup --timeout 5 >/dev/null 2>&1) && port_open "${PORTS[$1]}"; }
running_count() { ctl "$1" eval 'length(rabbit_nodes:all_running()).' 2>/dev/null | tr -dc 0-9; }

write_config() {
  mkdir -p /etc/rabbitmq
  local port
  for port in "${PORTS[@]}"; do
    cat >"/etc/rabbitmq/mqlock-cluster-$port.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:${port}
loopback_users.guest = true
log.console = false
log.file.level = warning
cluster_partition_handling = pause_minority
CONF
    echo "[{kernel, [{net_ticktime, ${NET_TICKTIME}}]}, {rabbit, []}]." >"/etc/rabbitmq/mqlock-cluster-$port-advanced.config"
  done
}

print_log() {
  local node=${NAMES[$1]}
  say "last lines of /var/log/rabbitmq/$node.log:"
  grep -v -e 'Mnesia is overloaded' -e '^[0-9:. +-]*\[warning\] <[0-9.]*> *$' "/var/log/rabbitmq/$node.log" 2>/dev/null | tail -n 30 >&2 || true
}

# Starts the node's VM (keeping its data) without waiting.
launch() {
  local i=$1
  (
    node_env "$i"
    mkdir -p "$BASE"
    chown -R rabbitmq:rabbitmq "$BASE" /var/log/rabbitmq 2>/dev/null || true
    # Every lock is a queue, and RabbitMQ wants a file handle per queue.
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    # The Debian wrapper drops to the rabbitmq user by itself.
    rabbitmq-server -detached >"$RUN_DIR/cluster-${PORTS[$i]}.start.log" 2>&1
  ) || { cat "$RUN_DIR/cluster-${PORTS[$i]}.start.log" >&2; fail "rabbitmq-server ${NAMES[$i]} did not start"; }
}

wait_node() { # INDEX [SECONDS]
  local i=$1 secs=${2:-300} start=$SECONDS
  until node_ping "$i"; do
    if [ $((SECONDS - start)) -ge "$secs" ]; then
      print_log "$i"
      fail "${NAMES[$i]} did not answer on 127.0.0.1:${PORTS[$i]} within ${secs}s"
    fi
    [ $(( (SECONDS - start) % 30 )) -eq 29 ] && say "still waiting for ${NAMES[$i]} ($((SECONDS - start))s)"
    sleep 1
  done
  say "${NAMES[$i]} up after $((SECONDS - start))s: amqp://guest:guest@127.0.0.1:${PORTS[$i]}/%2f"
}

start_node() {
  local i=$1
  heal_node "$i"
  if node_ping "$i"; then say "${NAMES[$i]} already up"; return 0; fi
  kill_node "$i" quiet
  launch "$i"
  wait_node "$i"
}

stop_node() {
  local i=$1 pid
  pid=$(node_pid "$i" || true)
  [ -n "$pid" ] || { say "${NAMES[$i]} is not running"; return 0; }
  kill -CONT "$pid" 2>/dev/null || true
  say "stopping ${NAMES[$i]} (pid $pid)"
  ctl "$i" stop >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then say "${NAMES[$i]} ignored stop; killing it"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$BASE/${NAMES[$i]}.pid"
}

kill_node() { # INDEX [quiet]
  local i=$1 pid
  pid=$(node_pid "$i" || true)
  if [ -z "$pid" ]; then [ "${2:-}" = quiet ] || say "${NAMES[$i]} is not running"; return 0; fi
  [ "${2:-}" = quiet ] || say "kill -9 ${NAMES[$i]} (pid $pid)"
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  rm -f "$BASE/${NAMES[$i]}.pid"
}

# ---------------------------------------------------------------- partitions (iptables)
cgroup2_root() {
  local m
  m=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
  [ -n "$m" ] || fail "no cgroup v2 hierarchy mounted: cannot tell one node's packets from another's"
  echo "$m"
}
cgroup_name() { echo "mqlock-cluster-c$(($1 + 1))"; }
mark_of() { printf '0x6d71%02x' "$(($1 + 1))"; }

ensure_chains() {
  command -v iptables >/dev/null || apt_install iptables
  local c
  for c in "$CHAIN_IN" "$CHAIN_OUT"; do iptables -N "$c" 2>/dev/null || true; done
  iptables -C INPUT -j "$CHAIN_IN" 2>/dev/null || iptables -I INPUT 1 -j "$CHAIN_IN"
  iptables -C OUTPUT -j "$CHAIN_OUT" 2>/dev/null || iptables -I OUTPUT 1 -j "$CHAIN_OUT"
}

# Removes every rule of ours that mentions the node (by its comment).
heal_node() {
  local i=$1 chain tag rule
  tag="mqlock-cluster-c$((i + 1))"
  command -v iptables >/dev/null || return 0
  for chain in "$CHAIN_IN" "$CHAIN_OUT"; do
    iptables -S "$chain" 2>/dev/null | grep -- "--comment $tag" | sed 's/^-A /-D /' | while read -r rule; do
      eval "iptables $rule" 2>/dev/null || true
    done || true
  done
}

partition_node() { # INDEX [peers]
  local i=$1 mode=${2:-all} pid root cg tag mark port ports keep=()
  # `peers`: only the node's links to the other nodes (and epmd) are cut; its clients still
  # reach it (packets from and to its AMQP port pass).
  [ "$mode" = peers ] && keep=(-p tcp ! --sport "${PORTS[$i]}")
  pid=$(node_pid "$i") || fail "${NAMES[$i]} is not running"
  ensure_chains
  root=$(cgroup2_root); cg=$(cgroup_name "$i")
  mkdir -p "$root/$cg"
  echo "$pid" >"$root/$cg/cgroup.procs" || fail "cannot move ${NAMES[$i]} into cgroup $root/$cg"
  tag="mqlock-cluster-c$((i + 1))"; mark=$(mark_of "$i")
  heal_node "$i"
  # New connections, either way, are refused at once (RST). Dropping SYNs instead left the
  # node's recovery hanging for about 2.5 min after the heal (the kernel retries a SYN for
  # 127 s), which no one could tell apart from a broker bug.
  iptables -A "$CHAIN_OUT" -m cgroup --path "$cg" -p tcp --syn -j REJECT --reject-with tcp-reset -m comment --comment "$tag" \
    || fail "iptables has no cgroup match here: cannot partition one node on loopback"
  # Everything else the node sends: mark its connection, then drop.
  iptables -A "$CHAIN_OUT" -m cgroup --path "$cg" "${keep[@]}" -j CONNMARK --set-mark "$mark" -m comment --comment "$tag" \
    || fail "iptables has no cgroup/connmark match here: cannot partition one node on loopback"
  iptables -A "$CHAIN_OUT" -m connmark --mark "$mark" -j DROP -m comment --comment "$tag"
  iptables -A "$CHAIN_IN" -m connmark --mark "$mark" -j DROP -m comment --comment "$tag"
  # Everything sent to the node: its listeners and the local ports of its open sockets (a
  # connection on which the node has not sent since the cut is not marked yet).
  ports=$( { echo "${PORTS[$i]}"; echo $((PORTS[i] + 20000));
             ss -tanpH 2>/dev/null | awk -v p="pid=$pid," 'index($0, p) { n = split($4, a, ":"); print a[n] }'; } | sort -un)
  [ "$mode" = peers ] && ports=$(echo "$ports" | grep -vx "${PORTS[$i]}")
  for port in $ports; do
    iptables -A "$CHAIN_IN" -p tcp --syn --dport "$port" -j REJECT --reject-with tcp-reset -m comment --comment "$tag"
    iptables -A "$CHAIN_IN" -p tcp --dport "$port" -j DROP -m comment --comment "$tag"
  done
  say "${NAMES[$i]} partitioned from $([ "$mode" = peers ] && echo "its peers (clients still reach it)" || echo "peers and clients") (pid $pid; ports $(echo $ports | tr ' ' ,))"
}

# ---------------------------------------------------------------- cluster
healthy() { # no output; true when all three nodes run, are clustered and see no partition
  # One CLI call (each boots an Erlang VM: seconds on a loaded machine): ask a node for the
  # cluster's members, and each member whether its rabbit application runs and whether it
  # saw a partition.
  local i out p
  for p in "${PORTS[@]}"; do port_open "$p" || return 1; done
  for i in 0 1 2; do
    out=$(ctl "$i" eval 'Ns = rabbit_nodes:all(), R = [rpc:call(N, rabbit, is_running, [], 5000) || N <- Ns], Ps = [rpc:call(N, rabbit_node_monitor, partitions, [], 5000) || N <- Ns], io:format("~b ~w ~w~n", [length(Ns), lists:usort(R), lists:usort(Ps)]).' 2>/dev/null) || continue
    [ "$(echo "$out" | head -n 1)" = "3 [true] [[]]" ]
    return
  done
  return 1
}

# After a partition heals, a node restarted by pause_minority can hang for good in its boot
# step `global:sync()` (RabbitMQ 3.10.8 on Erlang/OTP 25: global's state about the peers is
# stale; seen here after about one heal in three under load). Disconnecting the stuck node
# from its peers makes global resynchronise and the boot completes within seconds. This is an
# operator's workaround, applied only to a node that has been stuck for 15 s, and reported on
# stdout so the caller can record it.
GLOBAL_STUCK_SINCE=(0 0 0)
unstick_global() {
  local i out
  for i in 0 1 2; do
    port_open "$((PORTS[i] + 20000))" || continue
    out=$(ctl "$i" eval 'B = rabbit_boot_state:get(), S = [P || P <- processes(), erlang:process_info(P, current_function) =:= {current_function, {global, sync_loop, 2}}], io:format("~w ~b~n", [B, length(S)]).' 2>/dev/null | head -n 1) || continue
    if [ "$out" != "booting 1" ]; then GLOBAL_STUCK_SINCE[i]=0; continue; fi
    if [ "${GLOBAL_STUCK_SINCE[i]}" -eq 0 ]; then GLOBAL_STUCK_SINCE[i]=$SECONDS; continue; fi
    if [ $((SECONDS - GLOBAL_STUCK_SINCE[i])) -ge 15 ]; then
      say "${NAMES[$i]} has been stuck in global:sync() for $((SECONDS - GLOBAL_STUCK_SINCE[i]))s; disconnecting it from its peers"
      ctl "$i" eval '[erlang:disconnect_node(N) || N <- nodes()].' >/dev/null 2>&1 || true
      echo "unstuck ${NAMES[$i]} (global:sync hang after $((SECONDS - GLOBAL_STUCK_SINCE[i])) s)"
      GLOBAL_STUCK_SINCE[i]=0
    fi
  done
}

wait_healthy() {
  local secs=${1:-120} start=$SECONDS
  until healthy; do
    if [ $((SECONDS - start)) -ge "$secs" ]; then status_report || true; fail "the cluster is not healthy after ${secs}s"; fi
    [ $(( (SECONDS - start) % 15 )) -eq 14 ] && say "still waiting for the cluster to be healthy ($((SECONDS - start))s)"
    unstick_global
    sleep 1
  done
  say "cluster healthy ($((SECONDS - start))s)"
}

cluster_up() {
  apt_install rabbitmq-server iptables
  write_config
  local i
  for i in 0 1 2; do heal_node "$i"; p=$(node_pid "$i" || true); [ -n "$p" ] && kill -CONT "$p" 2>/dev/null; done
  if healthy; then say "cluster already up: $(urls)"; return 0; fi
  say "starting a fresh 3-node cluster (data in $BASE)"
  for i in 0 1 2; do
    if node_ping "$i"; then ctl "$i" stop >/dev/null 2>&1 || true; fi
    kill_node "$i" quiet
  done
  rm -rf "${BASE:?}"
  mkdir -p "$BASE"
  for i in 0 1 2; do launch "$i"; done
  for i in 0 1 2; do wait_node "$i"; done
  for i in 1 2; do
    local log=$RUN_DIR/cluster-join-${PORTS[$i]}.log
    { ctl "$i" stop_app && ctl "$i" reset && ctl "$i" join_cluster "${NAMES[0]}" && ctl "$i" start_app; } >"$log" 2>&1 \
      || { cat "$log" >&2; print_log "$i"; fail "${NAMES[$i]} could not join ${NAMES[0]}"; }
    say "${NAMES[$i]} joined ${NAMES[0]}"
  done
  wait_healthy 120
  say "cluster up: $(urls)"
}

cluster_down() {
  local i root
  for i in 0 1 2; do heal_node "$i"; done
  for i in 0 1 2; do stop_node "$i"; done
  if command -v iptables >/dev/null; then
    iptables -D INPUT -j "$CHAIN_IN" 2>/dev/null || true
    iptables -D OUTPUT -j "$CHAIN_OUT" 2>/dev/null || true
    iptables -X "$CHAIN_IN" 2>/dev/null || true
    iptables -X "$CHAIN_OUT" 2>/dev/null || true
  fi
  root=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
  if [ -n "$root" ]; then for i in 0 1 2; do rmdir "$root/$(cgroup_name "$i")" 2>/dev/null || true; done; fi
  say "cluster down"
}

restart_all() {
  local i
  for i in 0 1 2; do heal_node "$i"; done
  # One after another, as an operator would: the last node stopped knows the newest state,
  # and RabbitMQ's nodes wait for each other on start (so they are started together).
  for i in 0 1 2; do stop_node "$i"; done
  for i in 0 1 2; do launch "$i"; done
  for i in 0 1 2; do wait_node "$i"; done
  wait_healthy 120
}

urls() {
  local out=() p
  for p in "${PORTS[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$p/%2f"); done
  (IFS=,; echo "${out[*]}")
}

leader() { # QUEUE: the leader as seen by the first node that answers
  local q=$1 i line
  for i in 0 1 2; do
    port_open "${PORTS[$i]}" || continue
    line=$(ctl "$i" list_queues --no-table-headers name leader 2>/dev/null | awk -F'\t' -v q="$q" '$1 == q { print $2 }') || continue
    [ -n "$line" ] && { echo "$line"; return 0; }
  done
  fail "no running node knows the leader of queue '$q'"
}

# cluster_partition_handling is read by rabbit_node_monitor when a node goes down or comes
# back, so changing it at run time changes how the next partition is handled. Every node is
# tried; the command fails if one of them could not be reached.
partition_handling() { # [MODE]
  local mode=${1:-} i out rc=0
  case $mode in ""|ignore|autoheal|pause_minority) ;; *) fail "partition-handling [ignore|autoheal|pause_minority]" ;; esac
  for i in 0 1 2; do
    if [ -n "$mode" ]; then
      out=$(ctl "$i" eval "ok = application:set_env(rabbit, cluster_partition_handling, $mode), {ok, M} = application:get_env(rabbit, cluster_partition_handling), io:format(\"~s~n\", [M])." 2>&1) \
        || { say "${NAMES[$i]}: cannot set cluster_partition_handling: $out"; rc=1; continue; }
    else
      out=$(ctl "$i" eval '{ok, M} = application:get_env(rabbit, cluster_partition_handling), io:format("~s~n", [M]).' 2>&1) \
        || { say "${NAMES[$i]}: cannot read cluster_partition_handling: $out"; rc=1; continue; }
    fi
    echo "${NAMES[$i]} $(echo "$out" | head -n 1)"
  done
  return $rc
}

status_report() {
  local i pid state rc=0 n
  for i in 0 1 2; do
    pid=$(node_pid "$i" || true)
    if [ -z "$pid" ]; then state="stopped"; rc=1
    elif grep -q '^State:.*T' "/proc/$pid/status" 2>/dev/null; then state="PAUSED (SIGSTOP, pid $pid)"; rc=1
    elif command -v iptables >/dev/null && iptables -S "$CHAIN_IN" 2>/dev/null | grep -q -- "--comment mqlock-cluster-c$((i + 1))"; then state="PARTITIONED (pid $pid)"; rc=1
    elif node_ping "$i"; then
      n=$(running_count "$i"); state="running (pid $pid), sees $n running node(s)"; [ "$n" = 3 ] || rc=1
    else state="not answering (pid $pid; paused by pause_minority, starting or stopping)"; rc=1
    fi
    say "${NAMES[$i]} 127.0.0.1:${PORTS[$i]}: $state"
  done
  return $rc
}

cmd=${1:-up}
case $cmd in
  up) need_root "$@"; cluster_up ;;
  down) need_root "$@"; cluster_down ;;
  status) need_root "$@"; status_report ;;
  urls) urls ;;
  kill) need_root "$@"; kill_node "$(node_index "${2:?node}")" ;;
  stop) need_root "$@"; stop_node "$(node_index "${2:?node}")" ;;
  start) need_root "$@"; start_node "$(node_index "${2:?node}")" ;;
  restart-all) need_root "$@"; restart_all ;;
  partition)
    need_root "$@"
    case ${3:-} in ""|--all) m=all ;; --peers-only) m=peers ;; *) fail "partition NODE [--peers-only]" ;; esac
    partition_node "$(node_index "${2:?node}")" "$m" ;;
  heal)
    need_root "$@"
    if [ -n "${2:-}" ]; then heal_node "$(node_index "$2")"; else for i in 0 1 2; do heal_node "$i"; done; fi
    say "healed ${2:-all}" ;;
  pause) need_root "$@"; i=$(node_index "${2:?node}"); pid=$(node_pid "$i") || fail "${NAMES[$i]} is not running"; kill -STOP "$pid"; say "${NAMES[$i]} paused (SIGSTOP pid $pid)" ;;
  resume) need_root "$@"; i=$(node_index "${2:?node}"); pid=$(node_pid "$i") || fail "${NAMES[$i]} is not running"; kill -CONT "$pid"; say "${NAMES[$i]} resumed" ;;
  leader) need_root "$@"; leader "${2:?queue name}" ;;
  wait-healthy) need_root "$@"; wait_healthy "${2:-120}" ;;
  partition-handling) need_root "$@"; partition_handling "${2:-}" ;;
  *) echo "usage: $0 up|down|status|urls|kill N|stop N|start N|restart-all|partition N [--peers-only]|heal [N]|pause N|resume N|leader QUEUE|wait-healthy [SECS]|partition-handling [MODE]" >&2; exit 2 ;;
esac
