#!/usr/bin/env bash
# The sushy-tools Redfish emulator for the bare-metal provider's tests, on loopback only and
# bounded in time.
#
#   tests/emulators/sushy.sh install          # sushy-tools into the project-local venv .venv/ (idempotent; moto's venv)
#   tests/emulators/sushy.sh start [RUN_ID]   # this run's sushy-emulator on 127.0.0.1:<free port>
#   tests/emulators/sushy.sh stop [RUN_ID]    # stops this run's server, by its pid
#
# The emulator runs its fake driver (`SUSHY_EMULATOR_FAKE_DRIVER = True`) with
# $KUBE_NODE_SUSHY_SYSTEMS (default 48) systems named host-00, host-01, ..., all powered off,
# their state in this run's directory (so a run starts from a clean rack), and HTTP basic auth
# with a per-run password (so a 401 is tested for real). Tests take disjoint slices of the
# systems, so tests running at once never power each other's hosts. `start` prints
# `export KUBE_NODE_SUSHY_ENDPOINT=http://127.0.0.1:PORT`, `KUBE_NODE_SUSHY_USERNAME`,
# `KUBE_NODE_SUSHY_PASSWORD`, `KUBE_NODE_SUSHY_SYSTEMS` (the system ids, comma-separated, in
# name order) and `KUBE_NODE_EMULATOR_RUN`.
set -euo pipefail
# shellcheck source=tests/emulators/lib.sh
. "$(dirname "$0")/lib.sh"
VENV="$EMULATORS_ROOT/.venv"
SUSHY_SPEC="${KUBE_NODE_SUSHY_SPEC:-sushy-tools>=1,<3}"
NAME=sushy-emulator

install() {
  if [ -x "$VENV/bin/sushy-emulator" ] && "$VENV/bin/python" -c 'import sushy_tools, bcrypt' 2>/dev/null; then
    return 0
  fi
  command -v python3 >/dev/null || emulator_die "python3 is required"
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  echo "sushy.sh: installing $SUSHY_SPEC into $VENV" >&2
  timeout 600 "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$SUSHY_SPEC" bcrypt >&2
}

# wait_redfish URL PIDFILE LOG SECONDS: waits until the service root answers at all (a 401
# from the auth middleware is an answer).
wait_redfish() {
  local url="$1" pidfile="$2" log="$3" secs="$4" i
  for i in $(seq 1 $((secs * 2))); do
    if python3 - "$url" <<'PY' 2>/dev/null
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1], timeout=1)
except urllib.error.HTTPError:
    pass
PY
    then
      return 0
    fi
    if ! emulator_alive "$pidfile" "$NAME"; then
      echo "sushy.sh: $NAME exited; its log:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "sushy.sh: $NAME did not answer on $url within $secs s; its log:" >&2
  cat "$log" >&2
  return 1
}

start() {
  [ -x "$VENV/bin/sushy-emulator" ] || emulator_die "sushy-tools is not installed; run tests/emulators/sushy.sh install"
  local run dir pidfile log port attempt count password ids
  run="$(emulator_run_id "${1:-}")"
  dir="$(emulator_run_dir "$run")"
  pidfile="$dir/sushy.pid" log="$dir/sushy.log"
  count="${KUBE_NODE_SUSHY_SYSTEMS_COUNT:-48}"
  emulator_stop "$pidfile" "$NAME"
  rm -rf "$dir/sushy-state" && mkdir -p "$dir/sushy-state"
  password="$(python3 -c 'import secrets; print(secrets.token_hex(12))')"
  "$VENV/bin/python" - "$dir" "$count" "$password" <<'PY'
import sys, uuid, bcrypt
d, n, pw = sys.argv[1], int(sys.argv[2]), sys.argv[3]
systems = [{
    "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"kube-node-test-host-{i:02d}")),
    "name": f"host-{i:02d}",
    "power_state": "Off",
    "external_notifier": False,
    "nics": [{"mac": f"02:00:00:00:00:{i:02x}", "ip": "127.0.0.1"}],
} for i in range(n)]
with open(f"{d}/sushy.conf", "w") as f:
    f.write("SUSHY_EMULATOR_FAKE_DRIVER = True\n")
    f.write(f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}\n")
    f.write(f"SUSHY_EMULATOR_STATE_DIR = {d + '/sushy-state'!r}\n")
    f.write(f"SUSHY_EMULATOR_AUTH_FILE = {d + '/sushy.htpasswd'!r}\n")
with open(f"{d}/sushy.htpasswd", "w") as f:
    f.write("admin:" + bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode() + "\n")
with open(f"{d}/sushy.systems", "w") as f:
    f.write(",".join(s["uuid"] for s in systems))
PY
  ids="$(cat "$dir/sushy.systems")"
  for attempt in 1 2 3; do
    port="$(emulator_free_port)"
    emulator_spawn "$pidfile" "$log" "$VENV/bin/sushy-emulator" --config "$dir/sushy.conf" -i 127.0.0.1 -p "$port"
    if wait_redfish "http://127.0.0.1:$port/redfish/v1/" "$pidfile" "$log" 30; then
      echo "$port" >"$dir/sushy.port"
      echo "export KUBE_NODE_SUSHY_ENDPOINT=http://127.0.0.1:$port"
      echo "export KUBE_NODE_SUSHY_USERNAME=admin"
      echo "export KUBE_NODE_SUSHY_PASSWORD=$password"
      echo "export KUBE_NODE_SUSHY_SYSTEMS=$ids"
      echo "export KUBE_NODE_EMULATOR_RUN=$run"
      return 0
    fi
    emulator_stop "$pidfile" "$NAME"
    grep -qi "address already in use" "$log" || break
    echo "sushy.sh: port $port was taken (attempt $attempt); trying another" >&2
  done
  emulator_cleanup_run "$run"
  exit 1
}

stop() {
  [ -n "${1:-${KUBE_NODE_EMULATOR_RUN:-}}" ] || emulator_die "stop needs a run id (argument or KUBE_NODE_EMULATOR_RUN)"
  local run dir
  run="$(emulator_run_id "${1:-}")"
  dir="$EMULATORS_TMP/$run"
  emulator_stop "$dir/sushy.pid" "$NAME"
  rm -rf "$dir/sushy.port" "$dir/sushy.log" "$dir/sushy.conf" "$dir/sushy.htpasswd" "$dir/sushy.systems" "$dir/sushy-state"
  emulator_cleanup_run "$run"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 install | start [RUN_ID] | stop [RUN_ID]" >&2; exit 2 ;;
esac
