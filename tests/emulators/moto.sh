#!/usr/bin/env bash
# The moto EC2 emulator for the AWS provider's tests, on loopback only and bounded in time.
#
#   tests/emulators/moto.sh install   # project-local venv .venv/ with moto[server] (idempotent)
#   tests/emulators/moto.sh start     # moto_server on 127.0.0.1:<free port>; prints an export line
#   tests/emulators/moto.sh stop      # stops the server started by `start`, by its pid
#
# `start` prints `export KUBE_NODE_MOTO_ENDPOINT=http://127.0.0.1:PORT`, so
# `eval "$(tests/emulators/moto.sh start)"` points the tests at it. The server runs with
# MOTO_ENABLE_AMI_VALIDATION=true so RunInstances rejects unknown AMIs as EC2 does (tests use one
# of moto's built-in AMIs found through DescribeImages).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$ROOT/.venv"
TMP="$ROOT/.tmp"
PIDFILE="$TMP/moto.pid"
LOG="$TMP/moto.log"
MOTO_SPEC="${KUBE_NODE_MOTO_SPEC:-moto[server]>=5,<6}"

python_bin() {
  command -v python3 || command -v python || { echo "moto.sh: python3 is required" >&2; exit 1; }
}

install() {
  if [ -x "$VENV/bin/moto_server" ] && "$VENV/bin/python" -c 'import moto.server' 2>/dev/null; then
    return 0
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$(python_bin)" -m venv "$VENV"
  fi
  echo "moto.sh: installing $MOTO_SPEC into $VENV" >&2
  timeout 600 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$MOTO_SPEC" >&2
}

free_port() {
  "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  [ -x "$VENV/bin/moto_server" ] || { echo "moto.sh: moto is not installed; run tests/emulators/moto.sh install" >&2; exit 1; }
  mkdir -p "$TMP"
  stop_quiet
  local port
  port="$(free_port)"
  MOTO_ENABLE_AMI_VALIDATION=true nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  local url="http://127.0.0.1:$port"
  # Bounded wait: at most 30 s for the server to answer.
  for _ in $(seq 1 60); do
    if "$VENV/bin/python" -c "import urllib.request,sys; urllib.request.urlopen('$url/moto-api/', timeout=1)" 2>/dev/null; then
      echo "export KUBE_NODE_MOTO_ENDPOINT=$url"
      return 0
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "moto.sh: moto_server exited; its log:" >&2; cat "$LOG" >&2; exit 1
    fi
    sleep 0.5
  done
  echo "moto.sh: moto_server did not answer on $url within 30 s; its log:" >&2
  cat "$LOG" >&2
  stop_quiet
  exit 1
}

stop_quiet() {
  if [ -f "$PIDFILE" ]; then
    local pid
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDFILE"
  fi
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_quiet ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
