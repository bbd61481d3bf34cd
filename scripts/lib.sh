# Helpers shared by scripts/services.sh, scripts/cluster.sh and scripts/rabbitmq4.sh.
# Source it after setting LOG_TAG (the prefix of every message) and RUN_DIR (apt's log).

say()  { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
fail() { printf '[%s] FAILED: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

# need_root ARGS...: re-runs the calling script under sudo unless it already runs as root.
need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || fail "must run as root (or have sudo) to install and start services"
    exec sudo -E "$0" "$@"
  fi
}

# apt_install PACKAGE...: installs the packages that are missing, quietly; shows apt's log on failure.
apt_install() {
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]} with apt"
  export DEBIAN_FRONTEND=noninteractive
  mkdir -p "$RUN_DIR"
  # A stale package index on a fresh machine makes apt fail to find packages.
  apt-get update -qq >"$RUN_DIR/apt.log" 2>&1 || { cat "$RUN_DIR/apt.log" >&2; fail "apt-get update"; }
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$RUN_DIR/apt.log" 2>&1 \
    || { tail -n 40 "$RUN_DIR/apt.log" >&2; fail "apt-get install ${missing[*]}"; }
}

# port_open PORT: whether something accepts TCP connections on 127.0.0.1:PORT.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
