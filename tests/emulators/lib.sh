# Shared by the emulator scripts in this folder (moto, sushy-tools, openssh-server).
# Source it; it defines functions only.
#
# Every emulator a test run starts is that run's own: its pid file, log and port live in
# `.tmp/emulators/<run id>/<name>.*`, so two `tests/run.sh` in one checkout never see, reuse or
# stop each other's servers. A run id is any [A-Za-z0-9._-] string; `tests/run.sh` uses its own
# pid. An emulator script's `start [RUN_ID]` prints `export` lines, including
# `KUBE_NODE_EMULATOR_RUN=<id>`, and its `stop [RUN_ID]` defaults to that variable, so
#
#   eval "$(tests/emulators/moto.sh start)"; …; tests/emulators/moto.sh stop
#
# works from one shell, and `stop` without any run id refuses rather than guess.

EMULATORS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
EMULATORS_TMP="$EMULATORS_ROOT/.tmp/emulators"

# emulator_die MESSAGE: prints "<script>: MESSAGE" on stderr and exits 1.
emulator_die() {
  echo "$(basename "$0"): $*" >&2
  exit 1
}

# emulator_run_id [ID]: the run id to use: ID, else $KUBE_NODE_EMULATOR_RUN, else a new one
# (this script's pid and the time), checked for characters safe in a path.
emulator_run_id() {
  local id="${1:-${KUBE_NODE_EMULATOR_RUN:-}}"
  [ -n "$id" ] || id="$$-$(date +%s%N)"
  [[ "$id" =~ ^[A-Za-z0-9._-]+$ ]] || emulator_die "run id '$id' may contain only A-Z a-z 0-9 . _ -"
  echo "$id"
}

# emulator_run_dir ID: the run's directory (created).
emulator_run_dir() {
  local dir="$EMULATORS_TMP/$1"
  mkdir -p "$dir"
  echo "$dir"
}

# emulator_free_port: a TCP port on 127.0.0.1 that was free a moment ago.
emulator_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# emulator_alive PIDFILE NAME: whether the pid in PIDFILE runs and its command line names NAME
# (so a pid the system reused for another process is never taken for the emulator).
emulator_alive() {
  local pid
  [ -f "$1" ] || return 1
  pid="$(cat "$1")"
  kill -0 "$pid" 2>/dev/null || return 1
  [ ! -r "/proc/$pid/cmdline" ] || tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

# emulator_spawn PIDFILE LOG CMD...: starts CMD in the background (its own process group's
# member, stdin closed), writing its pid to PIDFILE and its output to LOG.
emulator_spawn() {
  local pidfile="$1" log="$2"
  shift 2
  nohup "$@" </dev/null >"$log" 2>&1 &
  echo $! >"$pidfile"
}

# emulator_wait_http URL PIDFILE NAME LOG SECONDS: waits (bounded) until URL answers. Fails,
# printing the log, when the process exits first or SECONDS pass.
emulator_wait_http() {
  local url="$1" pidfile="$2" name="$3" log="$4" secs="$5" i
  for i in $(seq 1 $((secs * 2))); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$url', timeout=1)" 2>/dev/null; then
      return 0
    fi
    if ! emulator_alive "$pidfile" "$name"; then
      echo "$(basename "$0"): $name exited; its log:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "$(basename "$0"): $name did not answer on $url within $secs s; its log:" >&2
  cat "$log" >&2
  return 1
}

# emulator_stop PIDFILE NAME: stops the process in PIDFILE if it is still NAME (TERM, then KILL
# after 5 s), and removes PIDFILE.
emulator_stop() {
  local pidfile="$1" name="$2" pid i
  if emulator_alive "$pidfile" "$name"; then
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# emulator_cleanup_run ID: removes the run's directory once no emulator of it is left.
emulator_cleanup_run() {
  local dir="$EMULATORS_TMP/$1"
  [ -d "$dir" ] || return 0
  if ! compgen -G "$dir/*.pid" >/dev/null; then
    rm -rf "$dir"
  fi
}
