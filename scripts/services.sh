#!/usr/bin/env bash
# Brings up (or down) every service mqlock's tools and tests use, on loopback only.
#
#   scripts/services.sh up      install what is missing (apt), start, wait until each answers
#   scripts/services.sh down    stop what this script started
#   scripts/services.sh status  say what answers
#
# Idempotent: running `up` twice is harmless. Choose services with MQLOCK_SERVICES
# (default "rabbitmq rabbitmq-faults redis postgres fuse"). Endpoints the tests use by default:
#   MQLOCK_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
#   amqps://guest:guest@127.0.0.1:5671/%2f  (same broker over TLS; CA: /var/tmp/mqlock-services/tls/ca.pem)
#   MQLOCK_FAULTS_AMQP_URL=amqp://guest:guest@127.0.0.1:5673/%2f   (a broker tests may restart)
#   http://guest:guest@127.0.0.1:15672/  (the main broker's management API: `mqlock list`)
#   REDIS_URL=redis://127.0.0.1:6379/
#   DATABASE_URL=postgres://mqlock:mqlock@127.0.0.1:5432/mqlock
# Not started by default (the test suite does not use them; scripts/bench.sh asks for them):
#   etcd          ETCD_ENDPOINTS=http://127.0.0.1:2379   (one etcd 3.4 member, peer port 2380)
#   etcd-cluster  ETCD_CLUSTER_ENDPOINTS=http://127.0.0.1:2381,http://127.0.0.1:2382,http://127.0.0.1:2383
#                 (three etcd 3.4 members on one machine, peer ports 2391-2393)
# e.g. `MQLOCK_SERVICES="etcd etcd-cluster" scripts/services.sh up`.
set -euo pipefail

SERVICES=${MQLOCK_SERVICES:-"rabbitmq rabbitmq-faults redis postgres fuse"}
RUN_DIR=${MQLOCK_RUN_DIR:-/var/tmp/mqlock-services}
LOG_TAG=services
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"
mkdir -p "$RUN_DIR"

# wait_for DESCRIPTION SECONDS COMMAND...: retry COMMAND until it succeeds or time runs out.
wait_for() {
  local what=$1 secs=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && fail "$what did not answer within ${secs}s"
    sleep 0.5
  done
}


# ---------------------------------------------------------------- RabbitMQ
# Two nodes: the main broker (rabbit@localhost, 5672) for everyday use and most tests, and a
# "faults" broker (mqlock-faults@localhost, 5673) that tests may restart and that checks
# consumer timeouts every second with a 3 s timeout, so disruptive tests never disturb others.
rabbit_env() { # NODE PORT
  export RABBITMQ_NODENAME=$1
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT=$2
  export RABBITMQ_DIST_PORT=$(( $2 + 20000 ))
  export RABBITMQ_CONFIG_FILE=/etc/rabbitmq/mqlock-$2
  export RABBITMQ_ADVANCED_CONFIG_FILE=/etc/rabbitmq/mqlock-$2-advanced.config
  export ERL_EPMD_ADDRESS=127.0.0.1
  export HOME=/var/lib/rabbitmq
  # Our own data directory: these are scratch brokers for development and tests, and a node
  # started by this script starts empty. A broker that had to recover thousands of leftover
  # durable queues from earlier runs took minutes to boot.
  export RABBITMQ_MNESIA_BASE=/var/lib/rabbitmq/mqlock-mnesia
  export RABBITMQ_PID_FILE=$RABBITMQ_MNESIA_BASE/$1.pid
  # Plugins per node: the main broker runs the management API, the faults broker does not (two
  # nodes on one host cannot both listen on its port), and the cluster's nodes keep theirs.
  export RABBITMQ_ENABLED_PLUGINS_FILE=/etc/rabbitmq/mqlock-$2-enabled_plugins
}
# A self-signed CA and a server certificate for localhost / 127.0.0.1 (and a client certificate
# signed by the same CA), made once in $TLS_DIR. The broker reads the key as user rabbitmq.
TLS_DIR=$RUN_DIR/tls
tls_files() {
  [ -s "$TLS_DIR/ca.pem" ] && [ -s "$TLS_DIR/server.pem" ] && [ -s "$TLS_DIR/server.key" ] \
    && [ -s "$TLS_DIR/client.pem" ] && [ -s "$TLS_DIR/client.key" ] && return 0
  command -v openssl >/dev/null || apt_install openssl
  say "creating a test CA and certificates in $TLS_DIR"
  local tmp; tmp=$(mktemp -d "$RUN_DIR/tls.XXXXXX")
  (
    cd "$tmp"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=mqlock test CA" \
      -keyout ca.key -out ca.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile server.ext -out server.pem
    openssl req -newkey rsa:2048 -nodes -subj "/CN=mqlock-client" -keyout client.key -out client.csr
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile client.ext -out client.pem
    rm -f ./*.csr ./*.ext ./*.srl
  ) >"$RUN_DIR/tls.log" 2>&1 || { cat "$RUN_DIR/tls.log" >&2; rm -rf "$tmp"; fail "openssl"; }
  rm -rf "$TLS_DIR"; mv "$tmp" "$TLS_DIR"
  chmod 755 "$TLS_DIR"; chmod 644 "$TLS_DIR"/*.pem; chmod 640 "$TLS_DIR"/*.key
  # The CA key stays root-only; the broker (user rabbitmq) reads the server key, tests the client key.
  chmod 600 "$TLS_DIR/ca.key"
  chgrp rabbitmq "$TLS_DIR/server.key" 2>/dev/null || chmod 644 "$TLS_DIR/server.key"
  chmod 644 "$TLS_DIR/client.key"
}
rabbit_ping() { rabbit_env "$1" "$2"; rabbitmqctl -q -n "$1" await_startup --timeout 5 >/dev/null 2>&1 && port_open "$2"; }
rabbit_up() { # NODE PORT [ADVANCED-ERLANG-TERMS] [TLS-PORT] [MANAGEMENT-PORT]
  local node=$1 port=$2 advanced=${3:-} tls_port=${4:-} mgmt_port=${5:-}
  apt_install rabbitmq-server
  rabbit_env "$node" "$port"
  mkdir -p /etc/rabbitmq
  if [ -n "$mgmt_port" ]; then
    echo "[rabbitmq_management]." >"$RABBITMQ_ENABLED_PLUGINS_FILE"
  else
    echo "[]." >"$RABBITMQ_ENABLED_PLUGINS_FILE"
  fi
  cat >"/etc/rabbitmq/mqlock-$port.conf" <<CONF
listeners.tcp.1 = 127.0.0.1:${port}
loopback_users.guest = true
log.console = false
log.file.level = warning
CONF
  if [ -n "$mgmt_port" ]; then
    cat >>"/etc/rabbitmq/mqlock-$port.conf" <<CONF
management.tcp.ip = 127.0.0.1
management.tcp.port = ${mgmt_port}
CONF
  fi
  if [ -n "$tls_port" ]; then
    tls_files
    # verify_peer without fail_if_no_peer_cert: a client certificate is checked when one is
    # presented (it must be signed by the CA), and clients without one are let in.
    cat >>"/etc/rabbitmq/mqlock-$port.conf" <<CONF
listeners.ssl.default = 127.0.0.1:${tls_port}
ssl_options.cacertfile = $TLS_DIR/ca.pem
ssl_options.certfile = $TLS_DIR/server.pem
ssl_options.keyfile = $TLS_DIR/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
CONF
  fi
  echo "[{rabbit, [${advanced}]}]." >"/etc/rabbitmq/mqlock-$port-advanced.config"
  if rabbit_ping "$node" "$port"; then
    say "rabbitmq $node already up on 127.0.0.1:$port"
    if [ -n "$mgmt_port" ] && ! port_open "$mgmt_port"; then
      # Started by an earlier version of this script, without the management API (which a node
      # cannot load from another plugins file than the one it started with).
      say "note: $node runs without its management API on 127.0.0.1:$mgmt_port ('mqlock list' needs it); 'MQLOCK_SERVICES=rabbitmq $0 down' then 'up' restarts it with it"
    fi
    if [ -n "$tls_port" ] && ! port_open "$tls_port"; then
      say "note: $node was started before its TLS listener was configured; 'MQLOCK_SERVICES=rabbitmq $0 down' then 'up' adds amqps on 127.0.0.1:$tls_port"
    fi
    return 0
  fi
  # A node that exists but does not answer (still recovering old state, or wedged) would
  # make the new one fail with "node name already in use": stop it first.
  rabbit_kill "$node"
  say "starting rabbitmq $node on 127.0.0.1:$port (fresh state in $RABBITMQ_MNESIA_BASE/$node)"
  rm -rf "${RABBITMQ_MNESIA_BASE:?}/$node" "$RABBITMQ_MNESIA_BASE/$node"-*
  mkdir -p "$RABBITMQ_MNESIA_BASE"
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq 2>/dev/null || true
  # Every lock is a queue, and RabbitMQ wants a file handle per queue; the default of 1024
  # leaves it warning and throttling.
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  # The Debian wrapper drops to the rabbitmq user by itself.
  rabbitmq-server -detached >"$RUN_DIR/rabbitmq-$port.start.log" 2>&1 || { cat "$RUN_DIR/rabbitmq-$port.start.log" >&2; fail "rabbitmq-server $node did not start"; }
  local start=$SECONDS
  until rabbit_ping "$node" "$port"; do
    if [ $((SECONDS - start)) -ge 300 ]; then
      say "last lines of /var/log/rabbitmq/$node.log:"
      grep -v -e 'Mnesia is overloaded' -e '^[0-9:. +-]*\[warning\] <[0-9.]*> *$' "/var/log/rabbitmq/$node.log" 2>/dev/null | tail -n 30 >&2
      fail "rabbitmq $node did not answer on 127.0.0.1:$port within 300s"
    fi
    [ $(( (SECONDS - start) % 30 )) -eq 29 ] && say "still waiting for rabbitmq $node ($((SECONDS - start))s)"
    sleep 1
  done
  [ -z "$mgmt_port" ] || wait_for "the management API of $node on 127.0.0.1:$mgmt_port" 60 port_open "$mgmt_port"
  say "rabbitmq $node up after $((SECONDS - start))s: amqp://guest:guest@127.0.0.1:$port/%2f"
}
# rabbit_kill NODE: stop a node that does not answer, wherever it keeps its pid file (the
# Debian default location is checked too, for nodes started by an older version of this script).
rabbit_kill() {
  local node=$1 f pid
  for f in "$RABBITMQ_MNESIA_BASE/$node.pid" "/var/lib/rabbitmq/mnesia/$node.pid"; do
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      say "stopping unresponsive rabbitmq $node (pid $pid)"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}
rabbit_down() { rabbit_env "$1" "$2"; rabbitmqctl -q -n "$1" stop 2>/dev/null || true; }
MAIN_NODE=(rabbit@localhost "${MQLOCK_AMQP_PORT:-5672}")
MAIN_TLS_PORT=${MQLOCK_AMQPS_PORT:-5671}
MAIN_MGMT_PORT=${MQLOCK_MANAGEMENT_PORT:-15672}
FAULTS_NODE=(mqlock-faults@localhost "${MQLOCK_FAULTS_AMQP_PORT:-5673}")
FAULTS_ADVANCED='{consumer_timeout, 3000}, {channel_tick_interval, 1000}'

# ---------------------------------------------------------------- Redis
redis_ping() { redis-cli -h 127.0.0.1 -p "${MQLOCK_REDIS_PORT:-6379}" ping | grep -q PONG; }
redis_up() {
  apt_install redis-server
  if redis_ping 2>/dev/null; then say "redis already up"; return 0; fi
  say "starting redis on 127.0.0.1:${MQLOCK_REDIS_PORT:-6379}"
  redis-server --daemonize yes --bind 127.0.0.1 --port "${MQLOCK_REDIS_PORT:-6379}" \
    --save '' --appendonly no --dir "$RUN_DIR" --logfile "$RUN_DIR/redis.log" \
    --pidfile "$RUN_DIR/redis.pid" || fail "redis-server did not start"
  wait_for "redis" 30 redis_ping
  say "redis up: redis://127.0.0.1:${MQLOCK_REDIS_PORT:-6379}/"
}
redis_down() { redis-cli -h 127.0.0.1 -p "${MQLOCK_REDIS_PORT:-6379}" shutdown nosave 2>/dev/null || true; }

# ---------------------------------------------------------------- PostgreSQL
pg_version() { ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -n 1; }
pg_ping() { pg_isready -q -h 127.0.0.1 -p 5432; }
pg_up() {
  apt_install postgresql postgresql-client
  local v; v=$(pg_version); [ -n "$v" ] || fail "postgresql installed but no server version found"
  pg_lsclusters -h | grep -q "^$v main" || pg_createcluster "$v" main >/dev/null
  if ! pg_ping; then
    say "starting postgresql $v on 127.0.0.1:5432"
    pg_ctlcluster "$v" main start -o "-c listen_addresses=127.0.0.1" || fail "postgresql did not start (see /var/log/postgresql)"
    wait_for "postgresql" 60 pg_ping
  else
    say "postgresql already up"
  fi
  # Credentials the tests know; idempotent.
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='mqlock'\"" | grep -q 1 \
    || su postgres -c "psql -qc \"CREATE ROLE mqlock LOGIN SUPERUSER PASSWORD 'mqlock'\""
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname='mqlock'\"" | grep -q 1 \
    || su postgres -c "createdb -O mqlock mqlock"
  say "postgresql up: postgres://mqlock:mqlock@127.0.0.1:5432/mqlock"
}
pg_down() { local v; v=$(pg_version); [ -n "$v" ] && pg_ctlcluster "$v" main stop 2>/dev/null || true; }

# ---------------------------------------------------------------- etcd
# Debian's etcd 3.4 (`etcd-server`, and `etcd-client` for etcdctl), for the anchor measurements
# of crates/mqlock-bench. Each member starts with a fresh data directory under $RUN_DIR (like
# the brokers above: scratch state) and the default durability (a WAL fsync per write). A
# member is our process when its pid file in $RUN_DIR names a live etcd.
ETCD_DIR=$RUN_DIR/etcd
ETCD_PORT=${MQLOCK_ETCD_PORT:-2379}
ETCD_CLUSTER_PORTS=(2381 2382 2383)
ETCD_CLUSTER_PEER_PORTS=(2391 2392 2393)
etcd_health() { # CLIENT-URL...: every endpoint answers a health check (a quorum read)
  local eps; eps=$(IFS=,; echo "$*")
  ETCDCTL_API=3 etcdctl --endpoints="$eps" --dial-timeout=2s --command-timeout=3s endpoint health >/dev/null 2>&1
}
etcd_install() {
  apt_install etcd-server etcd-client
  # The Debian package may have started its own etcd (localhost:2379, data in /var/lib/etcd)
  # where an init system runs; ours must own the port, so that one is stopped.
  if [ -x /etc/init.d/etcd ] && pgrep -u etcd -x etcd >/dev/null 2>&1; then
    say "stopping the etcd the Debian package started"
    /etc/init.d/etcd stop >/dev/null 2>&1 || true
  fi
}
etcd_kill() { # NAME: stop the member whose pid file is $RUN_DIR/NAME.pid
  local f=$RUN_DIR/$1.pid pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null && grep -q etcd "/proc/$pid/comm" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}
# etcd_start NAME CLIENT-PORT PEER-PORT INITIAL-CLUSTER TOKEN: one member, in the background
# (the members of one cluster share its INITIAL-CLUSTER and TOKEN).
etcd_start() {
  local name=$1 cport=$2 pport=$3 initial=$4 token=$5 dir=$ETCD_DIR/$1
  rm -rf "$dir"; mkdir -p "$dir"
  setsid etcd --name "$name" --data-dir "$dir" \
    --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "$initial" --initial-cluster-state new --initial-cluster-token "$token" \
    --logger zap --log-outputs stderr \
    </dev/null >"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
}
etcd_up() {
  etcd_install
  local url=http://127.0.0.1:$ETCD_PORT
  if etcd_health "$url"; then say "etcd already up on $url"; return 0; fi
  port_open "$ETCD_PORT" && fail "127.0.0.1:$ETCD_PORT is taken by something that is not a healthy etcd"
  etcd_kill mqlock-etcd
  say "starting etcd $(etcd --version 2>/dev/null | head -n1 | awk '{print $3}') on $url (fresh data in $ETCD_DIR/mqlock-etcd)"
  etcd_start mqlock-etcd "$ETCD_PORT" 2380 "mqlock-etcd=http://127.0.0.1:2380" mqlock-etcd
  wait_for "etcd on $url (log: $RUN_DIR/mqlock-etcd.log)" 60 etcd_health "$url"
  say "etcd up: $url"
}
etcd_down() { etcd_kill mqlock-etcd; }
etcd_cluster_urls() { local p; for p in "${ETCD_CLUSTER_PORTS[@]}"; do printf 'http://127.0.0.1:%s\n' "$p"; done; }
etcd_cluster_up() {
  etcd_install
  local urls; mapfile -t urls < <(etcd_cluster_urls)
  if etcd_health "${urls[@]}"; then say "etcd-cluster already up"; return 0; fi
  local i initial=""
  for i in 0 1 2; do
    etcd_kill "mqlock-etcd$((i + 1))"
    initial+="${initial:+,}mqlock-etcd$((i + 1))=http://127.0.0.1:${ETCD_CLUSTER_PEER_PORTS[$i]}"
  done
  for i in 0 1 2; do
    port_open "${ETCD_CLUSTER_PORTS[$i]}" && fail "127.0.0.1:${ETCD_CLUSTER_PORTS[$i]} is taken by something else"
  done
  say "starting a 3-member etcd cluster on 127.0.0.1:${ETCD_CLUSTER_PORTS[*]} (fresh data in $ETCD_DIR)"
  for i in 0 1 2; do
    etcd_start "mqlock-etcd$((i + 1))" "${ETCD_CLUSTER_PORTS[$i]}" "${ETCD_CLUSTER_PEER_PORTS[$i]}" "$initial" mqlock-etcd-cluster
  done
  wait_for "etcd-cluster (logs: $RUN_DIR/mqlock-etcd[123].log)" 90 etcd_health "${urls[@]}"
  say "etcd-cluster up: $(IFS=,; echo "${urls[*]}")"
}
etcd_cluster_down() { local i; for i in 1 2 3; do etcd_kill "mqlock-etcd$i"; done; }

# ---------------------------------------------------------------- FUSE
fuse_up() {
  apt_install fuse3
  [ -e /dev/fuse ] || fail "/dev/fuse is missing: this machine cannot mount FUSE filesystems"
  grep -q '^user_allow_other' /etc/fuse.conf 2>/dev/null || echo user_allow_other >>/etc/fuse.conf
  say "fuse ready ($(fusermount3 -V 2>&1 | head -n1))"
}

status() {
  local rc=0
  for s in $SERVICES; do
    case $s in
      rabbitmq) if rabbit_ping "${MAIN_NODE[@]}"; then say "rabbitmq: up"; else say "rabbitmq: DOWN"; rc=1; fi ;;
      rabbitmq-faults) if rabbit_ping "${FAULTS_NODE[@]}"; then say "rabbitmq-faults: up"; else say "rabbitmq-faults: DOWN"; rc=1; fi ;;
      redis)    if redis_ping 2>/dev/null; then say "redis: up"; else say "redis: DOWN"; rc=1; fi ;;
      postgres) if pg_ping 2>/dev/null; then say "postgres: up"; else say "postgres: DOWN"; rc=1; fi ;;
      etcd)     if etcd_health "http://127.0.0.1:$ETCD_PORT"; then say "etcd: up"; else say "etcd: DOWN"; rc=1; fi ;;
      etcd-cluster) if etcd_health $(etcd_cluster_urls); then say "etcd-cluster: up"; else say "etcd-cluster: DOWN"; rc=1; fi ;;
      fuse)     if command -v fusermount3 >/dev/null && [ -e /dev/fuse ]; then say "fuse: ready"; else say "fuse: MISSING"; rc=1; fi ;;
    esac
  done
  return $rc
}

cmd=${1:-up}
case $cmd in
  up)
    need_root "$@"
    for s in $SERVICES; do
      case $s in
        rabbitmq) rabbit_up "${MAIN_NODE[@]}" "" "$MAIN_TLS_PORT" "$MAIN_MGMT_PORT" ;;
        rabbitmq-faults) rabbit_up "${FAULTS_NODE[@]}" "$FAULTS_ADVANCED" ;;
        redis) redis_up ;; postgres) pg_up ;; fuse) fuse_up ;;
        etcd) etcd_up ;; etcd-cluster) etcd_cluster_up ;;
        *) fail "unknown service '$s' (known: rabbitmq rabbitmq-faults redis postgres fuse etcd etcd-cluster)" ;;
      esac
    done ;;
  down)
    need_root "$@"
    for s in $SERVICES; do
      case $s in rabbitmq) rabbit_down "${MAIN_NODE[@]}" ;; rabbitmq-faults) rabbit_down "${FAULTS_NODE[@]}" ;; redis) redis_down ;; postgres) pg_down ;; etcd) etcd_down ;; etcd-cluster) etcd_cluster_down ;; fuse) ;; esac
    done ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
