#!/usr/bin/env bash
# Debian's openssh-server for the bare-metal provider's tests: the "host OS" the provider joins
# over SSH, on loopback only and bounded in time.
#
#   tests/emulators/sshd.sh install          # apt-get install openssh-server when sshd is missing (CI runs as root)
#   tests/emulators/sshd.sh start [RUN_ID]   # this run's sshd on 127.0.0.1:<free port>
#   tests/emulators/sshd.sh stop [RUN_ID]    # stops this run's sshd, by its pid
#
# Per run: a fresh ed25519 host key (and a second one that the server never presents, for the
# "host key changed" test), a client key in authorized_keys for the current user, and a bin/
# directory first on the sessions' PATH holding a `kubeadm` that is a test script: it records
# its arguments and, for `join --config F`, the JoinConfiguration F, under kubeadm/ of the run
# directory. A test holds one Node's join with a file `delay/<node name>` of the sshd directory
# (beside kubeadm/) holding seconds: that Node's `kubeadm join` sleeps so long after recording
# its JoinConfiguration (`<record>.config`) and before it is logged as done (`<record>.log`;
# `<record>.args` while it runs). Every session runs under one lock (ForceCommand), so the hosts of a test, which
# are all this one machine, never interleave their join files. `start` prints
# `export KUBE_NODE_SSHD_ADDR=127.0.0.1:PORT`, `KUBE_NODE_SSHD_USER`, `KUBE_NODE_SSHD_HOST_KEY`
# (the public key line), `KUBE_NODE_SSHD_OTHER_HOST_KEY`, `KUBE_NODE_SSHD_CLIENT_KEY` (path
# of the private key), `KUBE_NODE_SSHD_KUBEADM_LOG` (the record directory) and
# `KUBE_NODE_EMULATOR_RUN`.
set -euo pipefail
# shellcheck source=tests/emulators/lib.sh
. "$(dirname "$0")/lib.sh"
NAME=sshd

sshd_bin() {
  command -v sshd 2>/dev/null || { [ -x /usr/sbin/sshd ] && echo /usr/sbin/sshd; } || true
}

install() {
  [ -n "$(sshd_bin)" ] && return 0
  command -v apt-get >/dev/null || emulator_die "sshd is missing and there is no apt-get to install openssh-server"
  [ "$(id -u)" = 0 ] || emulator_die "sshd is missing; install openssh-server (apt-get needs root)"
  echo "sshd.sh: installing openssh-server" >&2
  timeout 600 apt-get install -y --no-install-recommends openssh-server >&2 ||
    { timeout 300 apt-get update >&2 && timeout 600 apt-get install -y --no-install-recommends openssh-server >&2; }
}

start() {
  local sshd run dir pidfile log port attempt user
  sshd="$(sshd_bin)"
  [ -n "$sshd" ] || emulator_die "sshd is not installed; run tests/emulators/sshd.sh install"
  command -v ssh-keygen >/dev/null || emulator_die "ssh-keygen is missing (openssh-client)"
  run="$(emulator_run_id "${1:-}")"
  dir="$(emulator_run_dir "$run")"
  pidfile="$dir/sshd.pid" log="$dir/sshd.log"
  emulator_stop "$pidfile" "$NAME"
  rm -rf "$dir/sshd" && mkdir -p "$dir/sshd/bin" "$dir/sshd/kubeadm" "$dir/sshd/delay"
  chmod 700 "$dir/sshd"
  # sshd's privilege-separation directory; it refuses to start without it.
  mkdir -p /run/sshd 2>/dev/null || true
  user="$(id -un)"
  ssh-keygen -q -t ed25519 -N '' -C kube-node-test-host -f "$dir/sshd/host_key"
  ssh-keygen -q -t ed25519 -N '' -C kube-node-test-other-host -f "$dir/sshd/other_host_key"
  ssh-keygen -q -t ed25519 -N '' -C kube-node-test-client -f "$dir/sshd/client_key"
  cp "$dir/sshd/client_key.pub" "$dir/sshd/authorized_keys"
  chmod 600 "$dir/sshd/authorized_keys"
  cat >"$dir/sshd/bin/kubeadm" <<KUBEADM
#!/bin/sh
# A test kubeadm: records its arguments and the JoinConfiguration it was given; changes nothing.
rec="$dir/sshd/kubeadm/\$(date +%s%N)-\$\$"
printf '%s\n' "\$*" >"\$rec.args"
prev=""
for a in "\$@"; do
  if [ "\$prev" = "--config" ] && [ -f "\$a" ]; then cp "\$a" "\$rec.config"; fi
  prev="\$a"
done
# A join a test holds: delay/<node name> says how many seconds.
if [ -f "\$rec.config" ]; then
  for d in "$dir/sshd/delay"/*; do
    [ -f "\$d" ] || continue
    if grep -q "name: \$(basename "\$d")\$" "\$rec.config"; then sleep "\$(cat "\$d")"; fi
  done
fi
mv "\$rec.args" "\$rec.log"
exit 0
KUBEADM
  chmod 755 "$dir/sshd/bin/kubeadm"
  cat >"$dir/sshd/serialize" <<SERIAL
#!/bin/sh
# Every session of this test sshd runs under one lock: the hosts of a test share this machine.
exec flock "$dir/sshd/session.lock" sh -c "\$SSH_ORIGINAL_COMMAND"
SERIAL
  chmod 755 "$dir/sshd/serialize"
  for attempt in 1 2 3; do
    port="$(emulator_free_port)"
    cat >"$dir/sshd/sshd_config" <<CONF
ListenAddress 127.0.0.1
Port $port
HostKey $dir/sshd/host_key
PidFile $dir/sshd/sshd.pidfile
AuthorizedKeysFile $dir/sshd/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers $user
StrictModes no
UsePAM no
PrintMotd no
SetEnv PATH=$dir/sshd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ForceCommand $dir/sshd/serialize
MaxStartups 64:30:128
MaxSessions 64
LogLevel INFO
CONF
    emulator_spawn "$pidfile" "$log" "$sshd" -D -e -f "$dir/sshd/sshd_config"
    if emulator_wait_tcp "$port" "$pidfile" "$log" 20; then
      echo "$port" >"$dir/sshd.port"
      echo "export KUBE_NODE_SSHD_ADDR=127.0.0.1:$port"
      echo "export KUBE_NODE_SSHD_USER=$user"
      echo "export KUBE_NODE_SSHD_HOST_KEY='$(cat "$dir/sshd/host_key.pub")'"
      echo "export KUBE_NODE_SSHD_OTHER_HOST_KEY='$(cat "$dir/sshd/other_host_key.pub")'"
      echo "export KUBE_NODE_SSHD_CLIENT_KEY=$dir/sshd/client_key"
      echo "export KUBE_NODE_SSHD_KUBEADM_LOG=$dir/sshd/kubeadm"
      echo "export KUBE_NODE_EMULATOR_RUN=$run"
      return 0
    fi
    emulator_stop "$pidfile" "$NAME"
    grep -qi "address already in use" "$log" || break
    echo "sshd.sh: port $port was taken (attempt $attempt); trying another" >&2
  done
  emulator_cleanup_run "$run"
  exit 1
}

# emulator_wait_tcp PORT PIDFILE LOG SECONDS: waits (bounded) until 127.0.0.1:PORT sends an
# SSH banner.
emulator_wait_tcp() {
  local port="$1" pidfile="$2" log="$3" secs="$4" i
  for i in $(seq 1 $((secs * 2))); do
    if python3 -c "import socket; s=socket.create_connection(('127.0.0.1',$port),1); s.settimeout(1); assert s.recv(4)==b'SSH-'" 2>/dev/null; then
      return 0
    fi
    if ! emulator_alive "$pidfile" "$NAME"; then
      echo "sshd.sh: sshd exited; its log:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "sshd.sh: sshd did not answer on port $port within $secs s; its log:" >&2
  cat "$log" >&2
  return 1
}

stop() {
  [ -n "${1:-${KUBE_NODE_EMULATOR_RUN:-}}" ] || emulator_die "stop needs a run id (argument or KUBE_NODE_EMULATOR_RUN)"
  local run dir
  run="$(emulator_run_id "${1:-}")"
  dir="$EMULATORS_TMP/$run"
  emulator_stop "$dir/sshd.pid" "$NAME"
  rm -rf "$dir/sshd" "$dir/sshd.port" "$dir/sshd.log"
  emulator_cleanup_run "$run"
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 install | start [RUN_ID] | stop [RUN_ID]" >&2; exit 2 ;;
esac
