#!/usr/bin/env python3
"""machines.py: the reference program of the kube-node exec provider protocol.

Protocol: kube-node.io/exec-provider/v1 (providers/exec/PROTOCOL.md is the specification;
this program is a complete, conforming implementation and doubles as its worked example).

kube-node runs this program once per provider operation:

    <spec.provider.exec.command...> <operation>        operation: validate|create|get|list|delete

with a JSON request on stdin, and reads exactly ONE JSON object from stdout. Anything written
to stderr is captured (bounded, with Secret values redacted) into kube-node's logs and error
messages, so stderr is the place for diagnostics. Only the Python 3 standard library is used.

The "machines" here are JSON files in a state directory; a real program would call a cloud
API, run `terraform apply`, power on a lab machine over IPMI, and so on. Layout:

    <stateDir>/.lock                      flock(2) lock serialising every invocation
    <stateDir>/machines/<id>.json         one file per machine (see new_machine below)
    <stateDir>/inject/create-error.json   optional test hook: the next create fails with this
                                          error object ({"kind": ..., "message": ...}) and the
                                          file is removed
    <stateDir>/inject/create-hold         optional test hook: while it exists, a create that
                                          made a new machine saves it and then waits before
                                          answering (to crash kube-node between a create and
                                          its providerID write)

The state directory is `config.stateDir` of the NodeClass (spec.provider.exec.config), else
the STATE_DIR environment variable. Other `config` keys: `zone` (default "lab-a"),
`instanceType` (default "lab.small"), `bootSeconds` (a machine reports Pending for that long
after create, default 0), `deleteSeconds` (a deleted machine reports Terminating for that
long before it is gone, default 0).
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import sys
import time

PROTOCOL_VERSION = "v1"

# The tags kube-node puts on every machine (kube_node_crds::names::tags).
TAG_CLUSTER = "kube-node.io/cluster"
TAG_NODE_CLASS = "kube-node.io/node-class"

# Machine ids are generated here, so anything else in a provider ID names no machine. Checking
# the shape also keeps a crafted provider ID from escaping the state directory.
ID_RE = re.compile(r"^m-[0-9a-f]{12}$")


class ProtocolError(Exception):
    """A typed error of the protocol: becomes {"error": {...}} on stdout.

    kind is one of NotFound, InsufficientCapacity, QuotaExceeded, Throttled, InvalidConfig,
    Unauthorized, Transient, Unimplemented. kube-node retries InsufficientCapacity,
    QuotaExceeded, Throttled and Transient with backoff; InvalidConfig and Unauthorized wait
    for a change of the NodeClass or its Secret.
    """

    def __init__(self, kind, message, retry_after_seconds=None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_seconds = retry_after_seconds

    def to_json(self):
        err = {"kind": self.kind, "message": self.message}
        if self.retry_after_seconds is not None:
            err["retryAfterSeconds"] = self.retry_after_seconds
        return {"error": err}


def log(msg):
    """Diagnostics go to stderr; stdout is reserved for the one response."""
    print(f"machines.py: {msg}", file=sys.stderr)


# --- state -------------------------------------------------------------------------------


def state_dir(config):
    d = config.get("stateDir") or os.environ.get("STATE_DIR")
    if not d:
        # A configuration error: kube-node shows it on the NodeClass and does not retry
        # until the NodeClass changes.
        raise ProtocolError("InvalidConfig", "spec.provider.exec.config.stateDir: set it (or STATE_DIR)")
    return d


@contextlib.contextmanager
def locked(root):
    """Serialises invocations: kube-node runs up to maxConcurrency of them at once, and two
    creates with the same idempotency key must not both make a machine."""
    os.makedirs(os.path.join(root, "machines"), exist_ok=True)
    with open(os.path.join(root, ".lock"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def machine_path(root, mid):
    return os.path.join(root, "machines", mid + ".json")


def load_all(root):
    out = []
    d = os.path.join(root, "machines")
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(d, name)) as f:
            out.append(json.load(f))
    return out


def save(root, m):
    """Atomic write: a crash never leaves half a machine file."""
    path = machine_path(root, m["id"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(m, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_provider_id(pid):
    """exec:///<zone>/<id> -> id, or None when it cannot name one of our machines."""
    prefix = "exec:///"
    if not isinstance(pid, str) or not pid.startswith(prefix):
        return None
    rest = pid[len(prefix):]
    if "/" not in rest:
        return None
    mid = rest.rsplit("/", 1)[1]
    return mid if ID_RE.match(mid) else None


def reap(root, m, config, now):
    """Finishes deletes whose deleteSeconds have passed. Returns the machine, or None when gone."""
    if m.get("deleteRequestedUnix") is None:
        return m
    if now - m["deleteRequestedUnix"] >= float(config.get("deleteSeconds", 0)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(machine_path(root, m["id"]))
        log(f"machine {m['id']} is gone")
        return None
    return m


def view(m, config, now):
    """The machine as the protocol's instance object."""
    if m.get("deleteRequestedUnix") is not None:
        state = "Terminating"
    elif now - m["createdUnix"] < float(config.get("bootSeconds", 0)):
        state = "Pending"
    else:
        state = "Running"
    return {
        "id": m["id"],
        "providerId": m["providerId"],
        "state": state,
        "zone": m["zone"],
        "instanceType": m["instanceType"],
        "addresses": m["addresses"],
        "tags": m["tags"],
        "createdUnix": m["createdUnix"],
    }


def live(root, config, now):
    return [m for m in (reap(root, m, config, now) for m in load_all(root)) if m is not None]


# --- operations --------------------------------------------------------------------------


def op_validate(req, config):
    """Checks the configuration: here, that the state directory is usable."""
    root = state_dir(config)
    with locked(root):
        pass
    return {}


def op_create(req, config):
    """Creates the machine of a Node, idempotently on idempotencyKey (the Node's UID): kube-node
    retries a create whose response it never saw, and must get the same machine back."""
    root = state_dir(config)
    key = req.get("idempotencyKey")
    if not key:
        raise ProtocolError("InvalidConfig", "create without idempotencyKey")
    now = time.time()
    with locked(root):
        for m in live(root, config, now):
            if m["idempotencyKey"] == key and m.get("deleteRequestedUnix") is None:
                log(f"create for node {req.get('nodeName')}: machine {m['id']} exists already")
                return {"instance": view(m, config, now)}

        # Test hook: fail this create with an injected error (consumed once).
        inject = os.path.join(root, "inject", "create-error.json")
        if os.path.exists(inject):
            with open(inject) as f:
                err = json.load(f)
            os.remove(inject)
            raise ProtocolError(err["kind"], err.get("message", "injected"), err.get("retryAfterSeconds"))

        mid = "m-" + secrets.token_hex(6)
        zone = config.get("zone", "lab-a")
        digest = hashlib.sha256(mid.encode()).digest()
        user_data = req.get("userData")
        m = {
            "id": mid,
            "providerId": f"exec:///{zone}/{mid}",
            "zone": zone,
            "instanceType": config.get("instanceType", "lab.small"),
            "addresses": [
                {"type": "InternalIP", "address": f"10.{digest[0]}.{digest[1]}.{digest[2] or 1}"},
                {"type": "Hostname", "address": req.get("nodeName", mid)},
            ],
            # Tags are stored exactly as given: kube-node finds its machines by them.
            "tags": req.get("tags") or {},
            "createdUnix": int(now),
            "idempotencyKey": key,
            "nodeName": req.get("nodeName"),
            # A real machine would boot with the user data; it carries a bootstrap token, so
            # only its digest is kept on disk.
            "userDataSha256": hashlib.sha256(user_data.encode()).hexdigest() if user_data else None,
            "deleteRequestedUnix": None,
        }
        save(root, m)
        log(f"created machine {mid} for node {req.get('nodeName')}")

    # Test hook: outside the lock, so a retried create (which returns the saved machine) and
    # every other operation go on while this one waits.
    hold = os.path.join(root, "inject", "create-hold")
    while os.path.exists(hold):
        time.sleep(0.1)
    return {"instance": view(m, config, now)}


def op_get(req, config):
    """One machine; NotFound once it is gone (deleted machines count as gone)."""
    root = state_dir(config)
    pid = req.get("providerId")
    mid = parse_provider_id(pid)
    now = time.time()
    with locked(root):
        if mid is not None:
            for m in live(root, config, now):
                if m["id"] == mid:
                    return {"instance": view(m, config, now)}
    raise ProtocolError("NotFound", f"no machine {pid}")


def op_list(req, config):
    """Every machine tagged with filter.cluster (and filter.nodeClass when set). It must be
    complete: kube-node deletes listed machines that no Node claims."""
    root = state_dir(config)
    flt = req.get("filter") or {}
    cluster, node_class = flt.get("cluster"), flt.get("nodeClass")
    now = time.time()
    with locked(root):
        out = []
        for m in live(root, config, now):
            tags = m.get("tags") or {}
            if tags.get(TAG_CLUSTER) != cluster:
                continue
            if node_class is not None and tags.get(TAG_NODE_CLASS) != node_class:
                continue
            out.append(view(m, config, now))
        return {"instances": out}


def op_delete(req, config):
    """Starts deleting a machine: Deleting when it existed, Gone when it was already gone (a
    delete of a gone machine must succeed)."""
    root = state_dir(config)
    pid = req.get("providerId")
    mid = parse_provider_id(pid)
    now = time.time()
    with locked(root):
        if mid is not None:
            for m in live(root, config, now):
                if m["id"] != mid:
                    continue
                if m.get("deleteRequestedUnix") is None:
                    m["deleteRequestedUnix"] = now
                    save(root, m)
                    log(f"deleting machine {mid}")
                    reap(root, m, config, now)
                return {"deleted": "Deleting"}
    return {"deleted": "Gone"}


OPERATIONS = {
    "validate": op_validate,
    "create": op_create,
    "get": op_get,
    "list": op_list,
    "delete": op_delete,
}


def main(argv):
    op = argv[-1] if len(argv) > 1 else ""
    try:
        req = json.load(sys.stdin)
        if req.get("protocolVersion") != PROTOCOL_VERSION:
            # A later kube-node speaking v2 learns that this program cannot serve it.
            raise ProtocolError("Unimplemented", f"protocol version {req.get('protocolVersion')!r} is not supported (want {PROTOCOL_VERSION})")
        if op not in OPERATIONS or req.get("operation") != op:
            raise ProtocolError("Unimplemented", f"operation {op!r} is not supported")
        config = req.get("config") or {}
        resp = OPERATIONS[op](req, config)
    except ProtocolError as e:
        resp = e.to_json()
    # Any other exception is a bug: Python prints the traceback on stderr and exits 1, which
    # kube-node reports as a Transient error quoting the end of stderr, and retries.
    json.dump(resp, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
