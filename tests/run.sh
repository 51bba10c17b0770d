#!/usr/bin/env bash
# Runs every test of kube-node: unit, property, integration (embedded API, simulated provider)
# and the end-to-end suite (which skips, saying so, unless KUBE_NODE_E2E_KUBECONFIG is set).
# Anything a test needs is installed and started here, bounded in time, and stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo-nextest >/dev/null 2>&1; then
  echo "cargo-nextest not found; installing it" >&2
  cargo install --locked cargo-nextest
fi

# The moto EC2 emulator for the AWS provider's tests: loopback only, bounded start, stopped on
# exit (also on failure). It is this run's own (keyed by this script's pid), so two runs in one
# checkout do not share or stop each other's emulators.
RUN_ID="run-$$"
tests/emulators/moto.sh install
# The bare-metal provider's rack: sushy-tools (Redfish, in moto's venv) and Debian's
# openssh-server (the hosts' OS, with a recording kubeadm), the same way.
tests/emulators/sushy.sh install
tests/emulators/sshd.sh install
trap 'tests/emulators/moto.sh stop "$RUN_ID"; tests/emulators/sushy.sh stop "$RUN_ID"; tests/emulators/sshd.sh stop "$RUN_ID"' EXIT
eval "$(tests/emulators/moto.sh start "$RUN_ID")"
eval "$(tests/emulators/sushy.sh start "$RUN_ID")"
eval "$(tests/emulators/sshd.sh start "$RUN_ID")"

if [ -z "${KUBE_NODE_E2E_KUBECONFIG:-}" ]; then
  echo "e2e suite: SKIPPED (KUBE_NODE_E2E_KUBECONFIG is not set; its tests return at once)"
else
  echo "e2e suite: against the cluster in $KUBE_NODE_E2E_KUBECONFIG"
fi

# Integration tests use the debug build; no release builds in the test loop.
cargo nextest run --config-file tests/nextest.toml --profile ci --workspace --lib --bins --tests --no-fail-fast "$@"
