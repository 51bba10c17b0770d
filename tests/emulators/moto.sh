#!/usr/bin/env bash
# The moto EC2 emulator for the AWS provider's tests, on loopback only and bounded in time.
#
#   tests/emulators/moto.sh install          # project-local venv .venv/ with moto[server] (idempotent)
#   tests/emulators/moto.sh start [RUN_ID]   # this run's moto_server on 127.0.0.1:<free port>
#   tests/emulators/moto.sh stop [RUN_ID]    # stops this run's server, by its pid
#
# Each run's server is its own (pid file, log and port under .tmp/emulators/<RUN_ID>/, see
# lib.sh), so concurrent test runs in one checkout do not interfere. `start` prints
# `export KUBE_NODE_MOTO_ENDPOINT=http://127.0.0.1:PORT` and `export KUBE_NODE_EMULATOR_RUN=<id>`,
# so `eval "$(tests/emulators/moto.sh start)"` points the tests at it and a later `stop` in the
# same shell finds it. The server runs with MOTO_ENABLE_AMI_VALIDATION=true so RunInstances
# rejects unknown AMIs as EC2 does (tests use one of moto's built-in AMIs found through
# DescribeImages).
set -euo pipefail
# shellcheck source=tests/emulators/lib.sh
. "$(dirname "$0")/lib.sh"
VENV="$EMULATORS_ROOT/.venv"
MOTO_SPEC="${KUBE_NODE_MOTO_SPEC:-moto[server]>=5,<6}"
NAME=moto_server

install() {
  if [ -x "$VENV/bin/moto_server" ] && "$VENV/bin/python" -c 'import moto.server' 2>/dev/null; then
    return 0
  fi
  command -v python3 >/dev/null || emulator_die "python3 is required"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  echo "moto.sh: installing $MOTO_SPEC into $VENV" >&2
  timeout 600 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$MOTO_SPEC" >&2
}

start() {
  [ -x "$VENV/bin/moto_server" ] || emulator_die "moto is not installed; run tests/emulators/moto.sh install"
  local run dir pidfile log port attempt
  run="$(emulator_run_id "${1:-}")"
  dir="$(emulator_run_dir "$run")"
  pidfile="$dir/moto.pid" log="$dir/moto.log"
  # Only this run's own earlier server, if any, is replaced.
  emulator_stop "$pidfile" "$NAME"
  # The free port may be taken by another run between the probe and the bind: try again.
  for attempt in 1 2 3; do
    port="$(emulator_free_port)"
    MOTO_ENABLE_AMI_VALIDATION=true emulator_spawn "$pidfile" "$log" "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port"
    if emulator_wait_http "http://127.0.0.1:$port/moto-api/" "$pidfile" "$NAME" "$log" 30; then
      echo "$port" >"$dir/moto.port"
      echo "export KUBE_NODE_MOTO_ENDPOINT=http://127.0.0.1:$port"
      echo "export KUBE_NODE_EMULATOR_RUN=$run"
      return 0
    fi
    emulator_stop "$pidfile" "$NAME"
    grep -qi "address already in use" "$log" || break
    echo "moto.sh: port $port was taken (attempt $attempt); trying another" >&2
  done
  emulator_cleanup_run "$run"
  exit 1
}

stop() {
  [ -n "${1:-${KUBE_NODE_EMULATOR_RUN:-}}" ] || emulator_die "stop needs a run id (argument or KUBE_NODE_EMULATOR_RUN)"
  local run dir
  run="$(emulator_run_id "${1:-}")"
  dir="$EMULATORS_TMP/$run"
  emulator_stop "$dir/moto.pid" "$NAME"
  rm -f "$dir/moto.port" "$dir/moto.log"
  emulator_cleanup_run "$run"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 install | start [RUN_ID] | stop [RUN_ID]" >&2; exit 2 ;;
esac
