//! Operational guarantees, against the embedded API with the real controllers:
//! - no credential or bootstrap token ever reaches the logs, events, conditions or annotations;
//! - leader election: one leader at a time, failover, release, stepping down when renewals fail;
//! - the RBAC in `deploy/` allows every call the code makes and grants nothing it never uses.
//!
//! Every client here goes through [`Tap`], which records each request as RBAC sees it (verb,
//! group, resource/subresource, namespace, name) and can make the API unreachable.

use std::collections::BTreeSet;
use std::future::Future;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube_node::harness::{Harness, Role as ClientRole};
use kube_node::leader::{self, LeaseConfig};
use kube_node_autoscaler::NodeSetCloudProvider;
use kube_node_autoscaler::proto::cloud_provider_server::CloudProvider;
use kube_node_autoscaler::proto::{
    ExternalGrpcNode, NodeGroupDeleteNodesRequest, NodeGroupIncreaseSizeRequest,
};
use kube_node_crds::names::{
    BOOTSTRAP_TOKEN_ANNOTATION, MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION,
};
use kube_node_crds::{NodeClass, NodeSet};
use kube_node_embedded_api::{EmbeddedApi, EmbeddedService};
use kube_node_provider_simulated::KubeletConfig;
use serde_json::json;

const NAMESPACE: &str = "kube-node-system";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ---------------------------------------------------------------------------------------------
// A recording, breakable client.

/// One API request, as the RBAC authorizer sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    who: &'static str,
    verb: String,
    group: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
}

/// The request attributes of a resource request (`None` for discovery and other non-resource
/// URLs), like the API server's RequestInfo.
fn request_info(who: &'static str, method: &http::Method, uri: &http::Uri) -> Option<Call> {
    let parts: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => (String::new(), rest),
        ["apis", g, _, rest @ ..] => ((*g).to_string(), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name) = match rest {
        [r] => ((*r).to_string(), None),
        [r, n] => ((*r).to_string(), Some((*n).to_string())),
        [r, n, s] => (format!("{r}/{s}"), Some((*n).to_string())),
        _ => return None,
    };
    let watch = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method.as_str(), &name) {
        ("GET", None) if watch => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        (other, _) => other,
    };
    Some(Call {
        who,
        verb: verb.to_string(),
        group,
        resource,
        namespace,
        name,
    })
}

const UP: u8 = 0;
/// Every request fails at once (connection refused).
const REFUSE: u8 = 1;
/// Every request hangs (packets dropped).
const HANG: u8 = 2;

/// A tower service in front of the embedded API that records calls and can fail.
#[derive(Clone)]
struct Tap {
    inner: EmbeddedService,
    who: &'static str,
    calls: Arc<Mutex<Vec<Call>>>,
    mode: Arc<AtomicU8>,
}

type TapResponse = <EmbeddedService as tower::Service<http::Request<kube::client::Body>>>::Response;

impl tower::Service<http::Request<kube::client::Body>> for Tap {
    type Response = TapResponse;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<TapResponse, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        match self.mode.load(Ordering::SeqCst) {
            REFUSE => return Box::pin(async { Err("connection refused (test)".into()) }),
            HANG => return Box::pin(futures::future::pending()),
            _ => {}
        }
        if let Some(c) = request_info(self.who, req.method(), req.uri()) {
            self.calls.lock().expect("calls").push(c);
        }
        let fut = tower::Service::call(&mut self.inner, req);
        Box::pin(async move { fut.await.map_err(|e| match e {}) })
    }
}

struct Tapped {
    client: kube::Client,
    mode: Arc<AtomicU8>,
}

fn tapped(api: &EmbeddedApi, who: &'static str, calls: &Arc<Mutex<Vec<Call>>>) -> Tapped {
    let mode = Arc::new(AtomicU8::new(UP));
    let tap = Tap {
        inner: api.service(),
        who,
        calls: calls.clone(),
        mode: mode.clone(),
    };
    Tapped {
        client: kube::Client::new(tap, "default"),
        mode,
    }
}

// ---------------------------------------------------------------------------------------------
// The controllers, wired like `kube-node run` / `kube-node simulate`.

struct Cluster {
    harness: Harness,
    /// An admin client whose calls are not recorded (the test's own).
    admin: kube::Client,
    /// The controllers' client (the autoscaler facade and leader election use it too: one
    /// ServiceAccount).
    controller: kube::Client,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Cluster {
    async fn start() -> Self {
        let api = EmbeddedApi::new();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let controller = tapped(&api, "controller", &calls).client;
        let kubelet = tapped(&api, "kubelet", &calls).client;
        let harness = Harness::builder()
            .with_api(api)
            .with_compiled_backends()
            .node_config(node_controller::Config {
                cluster_name: "ops".into(),
                api_server_endpoint: Some("ops-apiserver:6443".into()),
                orphan_gc_interval: Duration::from_secs(2),
                ..Default::default()
            })
            .client(ClientRole::NodeController, controller.clone())
            .client(ClientRole::NodesetController, controller.clone())
            .client(ClientRole::Kubelet, kubelet)
            // Renew node Leases often, so a short test sees renewals too.
            .kubelet(KubeletConfig {
                lease_interval: Duration::from_millis(300),
                ..KubeletConfig::default()
            })
            .start()
            .await
            .expect("cluster");
        Self {
            admin: harness.client.clone(),
            harness,
            controller,
            calls,
        }
    }

    async fn stop(self) -> (EmbeddedApi, Vec<Call>) {
        let api = self.harness.shutdown().await.expect("controllers stop");
        let calls = self.calls.lock().expect("calls").clone();
        (api, calls)
    }

    fn all<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>,
    {
        Api::all(self.admin.clone())
    }
}

/// Creates a fixture through `api`.
async fn create<K>(api: Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let obj: K = serde_json::from_value(obj).expect("fixture parses");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create fixture")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn machine_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == MACHINE_READY_CONDITION && c.status == "True")
        })
}

fn random_suffix() -> String {
    let a = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    let b = std::collections::hash_map::RandomState::new().hash_one(a);
    format!("{a:016x}{b:016x}")
}

fn simulated_class(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": name},
        "spec": {
            "provider": {"type": "simulated", "simulated": {"bootDelay": "0s", "deleteDelay": "0s"}},
            "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
        },
    })
}

fn nodeset(name: &str, class: &str, replicas: i32) -> serde_json::Value {
    json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"kube-node.io/nodeset": name}},
            "template": {
                "metadata": {"labels": {"kube-node.io/nodeset": name}},
                "spec": {"nodeClassName": class},
            },
            "minSize": 1,
            "maxSize": 10,
        },
    })
}

fn node(name: &str, class: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {NODE_CLASS_ANNOTATION: class}},
    })
}

/// An exec program that prints its environment's secrets and its whole request (with the
/// join payload and its bootstrap token) to stderr; `validate` and `list` succeed, every other
/// operation fails without an error response.
const LEAKY_PROGRAM: &str = r#"req=$(cat)
echo "leaky program: op=$1 password=$LEAKY_PASSWORD token=$LEAKY_TOKEN" >&2
echo "request: $req" >&2
case "$1" in
  validate) echo '{}' ;;
  list) echo '{"instances": []}' ;;
  *) echo "failing on purpose; the password is $LEAKY_PASSWORD" >&2; exit 3 ;;
esac
"#;

/// A credentials Secret and an exec NodeClass running [`LEAKY_PROGRAM`] with its values.
async fn leaky_exec_class(
    cluster: &Cluster,
    dir: &std::path::Path,
    name: &str,
) -> (String, String) {
    let script = dir.join("leaky.sh");
    std::fs::write(&script, LEAKY_PROGRAM).expect("write the program");
    let password = format!("s3cr3t-VALUE-{}", random_suffix());
    let token = format!("s3cr3t-TOKEN-{}", random_suffix());
    create(
        Api::<Secret>::namespaced(cluster.admin.clone(), NAMESPACE),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{name}-credentials"), "namespace": NAMESPACE},
            "data": {
                "password": base64(password.as_bytes()),
                "apiToken": base64(token.as_bytes()),
            },
        }),
    )
    .await;
    create(cluster.all::<NodeClass>(), json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
            "metadata": {"name": name},
            "spec": {
                "provider": {"type": "exec", "exec": {
                    "command": ["/bin/sh", script.to_string_lossy()],
                    "env": [
                        {"name": "LEAKY_PASSWORD", "secretKey": "password"},
                        {"name": "LEAKY_TOKEN", "secretKey": "apiToken"},
                    ],
                    "timeout": "30s",
                }},
                "credentialsSecretRef": {"namespace": NAMESPACE, "name": format!("{name}-credentials")},
            },
        }))
        .await;
    (password, token)
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 1. No secret leaks.

/// Every log line of this process, as text and as JSON, at TRACE.
struct Captured {
    text: Arc<Mutex<Vec<u8>>>,
    json: Arc<Mutex<Vec<u8>>>,
}

struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for BufWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> &'static Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt as _;
        let text = Arc::new(Mutex::new(Vec::new()));
        let json = Arc::new(Mutex::new(Vec::new()));
        let (t, j) = (text.clone(), json.clone());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::filter::LevelFilter::TRACE)
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || BufWriter(t.clone())),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(move || BufWriter(j.clone())),
            );
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        Captured { text, json }
    })
}

/// Every version of every object of kind `K` the watch sees, as JSON text.
fn record_all<K>(api: Api<K>, into: Arc<Mutex<Vec<(String, String)>>>, label: &'static str)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = stream.next().await {
            let objs: Vec<K> = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o))
                | Ok(watcher::Event::Delete(o)) => vec![o],
                _ => vec![],
            };
            for o in objs {
                let text = serde_json::to_string(&o).expect("serialize");
                into.lock()
                    .expect("objects")
                    .push((format!("{label} {}", o.name_any()), text));
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_or_bootstrap_token_reaches_logs_events_or_conditions() {
    let logs = capture_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start().await;
    let admin = cluster.admin.clone();

    // Everything the controllers write, every version of it.
    let objects = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    record_all(Api::<Node>::all(admin.clone()), objects.clone(), "Node");
    record_all(
        Api::<NodeClass>::all(admin.clone()),
        objects.clone(),
        "NodeClass",
    );
    record_all(
        Api::<NodeSet>::all(admin.clone()),
        objects.clone(),
        "NodeSet",
    );
    record_all(
        Api::<k8s_openapi::api::core::v1::Event>::all(admin.clone()),
        objects.clone(),
        "core/v1 Event",
    );
    record_all(
        Api::<k8s_openapi::api::events::v1::Event>::all(admin.clone()),
        objects.clone(),
        "events.k8s.io/v1 Event",
    );
    // Every bootstrap token, read from its Secret while it exists.
    let tokens = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    {
        let tokens = tokens.clone();
        let api = Api::<Secret>::namespaced(admin.clone(), "kube-system");
        tokio::spawn(async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Some(ev) = stream.next().await {
                if let Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) = ev {
                    let data = s.data.unwrap_or_default();
                    if let Some(v) = data.get("token-secret") {
                        let secret = String::from_utf8(v.0.clone()).expect("utf-8");
                        tokens.lock().expect("tokens").insert(secret);
                    }
                }
            }
        });
    }

    let (password, api_token) = leaky_exec_class(&cluster, dir.path(), "leaky").await;
    create(cluster.all::<NodeClass>(), simulated_class("sim")).await;
    create(cluster.all::<NodeSet>(), nodeset("sims", "sim", 2)).await;
    for n in ["leaky-1", "leaky-2"] {
        create(cluster.all::<Node>(), node(n, "leaky")).await;
    }
    create(cluster.all::<Node>(), node("sim-solo", "sim")).await;

    let nodes = Api::<Node>::all(admin.clone());
    eventually(Duration::from_secs(60), "3 simulated Nodes Ready", || {
        let nodes = nodes.clone();
        async move {
            let l = nodes.list(&ListParams::default()).await.ok()?;
            let ready = l
                .items
                .iter()
                .filter(|n| !n.name_any().starts_with("leaky") && machine_ready(n))
                .count();
            (ready == 3).then_some(())
        }
    })
    .await;
    let new_events = Api::<k8s_openapi::api::events::v1::Event>::all(admin.clone());
    let warning = eventually(
        Duration::from_secs(60),
        "a Warning event from the failing exec create",
        || {
            let api = new_events.clone();
            async move {
                let l = api.list(&ListParams::default()).await.ok()?;
                l.items.into_iter().find(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.regarding
                            .as_ref()
                            .and_then(|r| r.name.as_deref())
                            .is_some_and(|n| n.starts_with("leaky-"))
                        && e.note.as_deref().is_some_and(|n| n.contains("exited"))
                })
            }
        },
    )
    .await;
    // The program's stderr (with the password and the token in it) reached the message, redacted.
    let note = warning.note.clone().unwrap_or_default();
    assert!(note.contains("<redacted>"), "{note}");
    // A machine whose create fails gets no token Secret (it follows the launch), but its
    // user-data carried a token all the same: derived from kube-node's key, the id recorded on
    // the Node and the Node's UID, and searched for like the others.
    let key = Api::<Secret>::namespaced(admin.clone(), "kube-node-system")
        .get(node_controller::bootstrap::TOKEN_KEY_SECRET)
        .await
        .expect("the token key");
    let key = node_controller::bootstrap::TokenKey::from_secret(&key).expect("a 32-byte key");
    for n in ["leaky-1", "leaky-2"] {
        let node = nodes.get(n).await.expect("leaky Node");
        let id = node
            .annotations()
            .get(BOOTSTRAP_TOKEN_ANNOTATION)
            .and_then(|a| a.strip_prefix("bootstrap-token-"))
            .expect("a token name recorded before the launch")
            .to_string();
        let token = node_controller::bootstrap::BootstrapToken::derive(
            &key,
            &id,
            &node.uid().unwrap_or_default(),
        )
        .expect("a valid id");
        tokens.lock().expect("tokens").insert(token.secret.0);
    }

    // Delete everything: Nodes go through drain and machine deletion.
    Api::<NodeSet>::all(admin.clone())
        .delete("sims", &DeleteParams::default())
        .await
        .expect("delete NodeSet");
    for n in ["leaky-1", "leaky-2", "sim-solo"] {
        nodes
            .delete(n, &DeleteParams::default())
            .await
            .expect("delete Node");
    }
    eventually(Duration::from_secs(60), "every Node gone", || {
        let nodes = nodes.clone();
        async move {
            let l = nodes.list(&ListParams::default()).await.ok()?;
            l.items.is_empty().then_some(())
        }
    })
    .await;
    let (api, _) = cluster.stop().await;

    // What may never appear anywhere.
    let tokens = tokens.lock().expect("tokens").clone();
    assert!(
        tokens.len() >= 5,
        "a bootstrap token per Node (2 in the NodeSet, 1 standalone, 2 exec derived): {} tokens",
        tokens.len()
    );
    let mut needles = vec![password.clone(), api_token.clone()];
    needles.extend(tokens.iter().cloned());

    let mut haystacks: Vec<(String, String)> = objects.lock().expect("objects").clone();
    let client = api.client();
    for e in Api::<k8s_openapi::api::core::v1::Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("core events")
    {
        haystacks.push((
            format!("core/v1 Event {}", e.name_any()),
            serde_json::to_string(&e).expect("json"),
        ));
    }
    let new_events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("events");
    assert!(!new_events.items.is_empty());
    for e in new_events {
        haystacks.push((
            format!("events.k8s.io/v1 Event {}", e.name_any()),
            serde_json::to_string(&e).expect("json"),
        ));
    }
    let text = String::from_utf8_lossy(&logs.text.lock().expect("logs")).to_string();
    let json_logs = String::from_utf8_lossy(&logs.json.lock().expect("logs")).to_string();
    // The scan is not vacuous: the logs saw the failing program, the Nodes and the tokens'
    // Secrets by name; the objects include Nodes with conditions and the NodeClasses.
    assert!(
        text.contains("leaky-1") && text.contains("<redacted>"),
        "logs mention the exec Nodes and the program's redacted output"
    );
    assert!(
        text.contains("created bootstrap token"),
        "the token creation was logged"
    );
    assert!(
        haystacks
            .iter()
            .any(|(k, v)| k.starts_with("Node ") && v.contains(MACHINE_READY_CONDITION)),
        "Node conditions were recorded"
    );
    haystacks.push(("text logs".into(), text));
    haystacks.push(("JSON logs".into(), json_logs));

    eprintln!(
        "scanned {} objects and logs ({} bytes) for {} secrets",
        haystacks.len(),
        haystacks.iter().map(|(_, h)| h.len()).sum::<usize>(),
        needles.len()
    );
    let mut leaks = Vec::new();
    for (what, hay) in &haystacks {
        for needle in &needles {
            if let Some(at) = hay.find(needle.as_str()) {
                let from = hay[..at]
                    .char_indices()
                    .rev()
                    .nth(200)
                    .map_or(0, |(i, _)| i);
                leaks.push(format!(
                    "{what}: …{}…",
                    &hay[from..(at + needle.len()).min(hay.len())]
                ));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 2. Leader election.

fn lease_cfg(identity: &str, duration: Duration, renew: Duration) -> LeaseConfig {
    LeaseConfig {
        namespace: NAMESPACE.into(),
        name: "kube-node".into(),
        identity: identity.into(),
        lease_duration: duration,
        renew_interval: renew,
    }
}

async fn lease(api: &EmbeddedApi) -> Option<Lease> {
    Api::<Lease>::namespaced(api.client(), NAMESPACE)
        .get_opt("kube-node")
        .await
        .expect("read the Lease")
}

fn holder(l: &Option<Lease>) -> Option<String> {
    l.as_ref()?.spec.as_ref()?.holder_identity.clone()
}

fn transitions(l: &Option<Lease>) -> i32 {
    l.as_ref()
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
}

/// Samples both receivers until `until` holds (bounded), asserting they never both lead.
async fn never_both_until(
    a: &tokio::sync::watch::Receiver<bool>,
    b: &tokio::sync::watch::Receiver<bool>,
    limit: Duration,
    what: &str,
    until: impl Fn(bool, bool) -> bool,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (x, y) = (*a.borrow(), *b.borrow());
        assert!(!(x && y), "two leaders at once");
        if until(x, y) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_the_standby_takes_over_when_the_leader_dies() {
    let api = EmbeddedApi::new();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (short, renew) = (Duration::from_secs(2), Duration::from_millis(500));
    let (a, a_task) = leader::campaign(
        tapped(&api, "a", &calls).client,
        lease_cfg("a", short, renew),
    );
    let (b, b_task) = leader::campaign(
        tapped(&api, "b", &calls).client,
        lease_cfg("b", short, renew),
    );
    never_both_until(&a, &b, Duration::from_secs(10), "a leader", |x, y| x || y).await;
    // Exactly one leads at every observed instant while both run (several lease durations).
    for _ in 0..300 {
        let (x, y) = (*a.borrow(), *b.borrow());
        assert!(x ^ y, "exactly one leader (a={x}, b={y})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (dead, survivor, survivor_name) = if *a.borrow() {
        (a_task, b.clone(), "b")
    } else {
        (b_task, a.clone(), "a")
    };
    let before = lease(&api).await;
    assert_ne!(holder(&before).as_deref(), Some(survivor_name));
    dead.abort();
    // The dead leader's receiver keeps its last value; only the survivor's matters now.
    eventually(Duration::from_secs(15), "the standby to take over", || {
        let s = *survivor.borrow();
        async move { s.then_some(()) }
    })
    .await;
    let after = lease(&api).await;
    assert_eq!(holder(&after).as_deref(), Some(survivor_name));
    assert!(
        transitions(&after) > transitions(&before),
        "leaseTransitions counts the takeover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_hands_the_lease_to_the_standby_at_once() {
    let api = EmbeddedApi::new();
    let calls = Arc::new(Mutex::new(Vec::new()));
    // A lease far longer than the test's bound: only the release can explain a takeover.
    let (long, renew) = (Duration::from_secs(300), Duration::from_millis(200));
    let a_client = tapped(&api, "a", &calls).client;
    let a_cfg = lease_cfg("a", long, renew);
    let (a, a_task) = leader::campaign(a_client.clone(), a_cfg.clone());
    eventually(Duration::from_secs(10), "a to lead", || {
        let x = *a.borrow();
        async move { x.then_some(()) }
    })
    .await;
    let (b, _b_task) = leader::campaign(
        tapped(&api, "b", &calls).client,
        lease_cfg("b", long, renew),
    );
    // b stands by while a renews.
    for _ in 0..50 {
        assert!(*a.borrow() && !*b.borrow());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a_task.abort();
    let _ = a_task.await;
    leader::release(a_client, &a_cfg).await;
    eventually(
        Duration::from_secs(10),
        "b to lead after the release",
        || {
            let y = *b.borrow();
            async move { y.then_some(()) }
        },
    )
    .await;
    assert_eq!(holder(&lease(&api).await).as_deref(), Some("b"));
}

/// A leader whose renewals fail steps down before its Lease expires for the others, whether
/// the API server refuses connections or does not answer at all.
async fn leader_steps_down_when_renewals_fail(mode: u8) {
    let api = EmbeddedApi::new();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (duration, renew) = (Duration::from_secs(3), Duration::from_millis(500));
    let a_tap = tapped(&api, "a", &calls);
    let (a, _a_task) = leader::campaign(a_tap.client.clone(), lease_cfg("a", duration, renew));
    eventually(Duration::from_secs(10), "a to lead", || {
        let x = *a.borrow();
        async move { x.then_some(()) }
    })
    .await;
    let (b, _b_task) = leader::campaign(
        tapped(&api, "b", &calls).client,
        lease_cfg("b", duration, renew),
    );
    a_tap.mode.store(mode, Ordering::SeqCst);
    // a must give up on its own, while the Lease still names it and is not expired.
    let mut a_watch = a.clone();
    tokio::time::timeout(Duration::from_secs(10), a_watch.wait_for(|l| !*l))
        .await
        .expect("a steps down in time")
        .expect("a's campaign runs");
    let now = jiff::Timestamp::now();
    let l = lease(&api).await;
    assert_eq!(holder(&l).as_deref(), Some("a"), "nobody took over yet");
    let spec = l.and_then(|l| l.spec).expect("spec");
    let renewed = spec.renew_time.expect("renewTime").0;
    let expires = renewed
        + jiff::SignedDuration::from_secs(i64::from(
            spec.lease_duration_seconds.expect("leaseDurationSeconds"),
        ));
    assert!(
        now < expires,
        "a stepped down at {now}, after its Lease expired at {expires}"
    );
    assert!(!*b.borrow(), "b waited for the Lease to expire");
    never_both_until(&a, &b, Duration::from_secs(15), "b to take over", |_, y| y).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_reach_the_api_steps_down_before_its_lease_expires() {
    leader_steps_down_when_renewals_fail(REFUSE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_renewals_hang_steps_down_before_its_lease_expires() {
    leader_steps_down_when_renewals_fail(HANG).await;
}

// ---------------------------------------------------------------------------------------------
// 4. RBAC covers exactly the calls the code makes.

fn deploy_file(name: &str) -> Vec<serde_yaml::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("read deploy file");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
        .filter(|v: &serde_yaml::Value| !v.is_null())
        .collect()
}

/// A role bound to kube-node's ServiceAccount: its rules and, for a Role, its namespace.
#[derive(Clone, Debug)]
struct Grant {
    role: String,
    namespace: Option<String>,
    rules: Vec<PolicyRule>,
}

/// The roles in `files` bound to `kube-node-system/kube-node`.
fn grants(files: &[&str]) -> Vec<Grant> {
    let docs: Vec<serde_yaml::Value> = files.iter().flat_map(|f| deploy_file(f)).collect();
    let kind = |d: &serde_yaml::Value| d["kind"].as_str().unwrap_or_default().to_string();
    let bound = |binding_kind: &str, role_kind: &str, name: &str, ns: Option<&str>| {
        docs.iter().any(|d| {
            kind(d) == binding_kind
                && d["roleRef"]["kind"].as_str() == Some(role_kind)
                && d["roleRef"]["name"].as_str() == Some(name)
                && d["metadata"]["namespace"].as_str() == ns
                && d["subjects"].as_sequence().is_some_and(|s| {
                    s.iter().any(|s| {
                        s["kind"].as_str() == Some("ServiceAccount")
                            && s["name"].as_str() == Some("kube-node")
                            && s["namespace"].as_str() == Some(NAMESPACE)
                    })
                })
        })
    };
    let mut out = Vec::new();
    for d in &docs {
        match kind(d).as_str() {
            "ClusterRole" => {
                let cr: ClusterRole = serde_yaml::from_value(d.clone()).expect("ClusterRole");
                let name = cr.metadata.name.clone().unwrap_or_default();
                assert!(
                    bound("ClusterRoleBinding", "ClusterRole", &name, None),
                    "ClusterRole {name} is bound to kube-node"
                );
                out.push(Grant {
                    role: format!("ClusterRole {name}"),
                    namespace: None,
                    rules: cr.rules.unwrap_or_default(),
                });
            }
            "Role" => {
                let r: Role = serde_yaml::from_value(d.clone()).expect("Role");
                let name = r.metadata.name.clone().unwrap_or_default();
                let ns = r.metadata.namespace.clone();
                assert!(
                    bound("RoleBinding", "Role", &name, ns.as_deref()),
                    "Role {ns:?}/{name} is bound to kube-node"
                );
                out.push(Grant {
                    role: format!("Role {}/{name}", ns.clone().unwrap_or_default()),
                    namespace: ns,
                    rules: r.rules.unwrap_or_default(),
                });
            }
            _ => {}
        }
    }
    out
}

fn rule_allows(rule: &PolicyRule, c: &Call) -> bool {
    let any =
        |list: &Option<Vec<String>>, v: &str| list.iter().flatten().any(|x| x == v || x == "*");
    let names_ok = match (&rule.resource_names, &c.name) {
        (None, _) => true,
        (Some(n), _) if n.is_empty() => true,
        (Some(n), Some(name)) => n.contains(name),
        (Some(_), None) => false,
    };
    any(&rule.api_groups, &c.group)
        && any(&rule.resources, &c.resource)
        && rule.verbs.iter().any(|v| v == &c.verb || v == "*")
        && names_ok
}

fn allowed(grants: &[Grant], c: &Call) -> bool {
    grants.iter().any(|g| {
        g.namespace.is_none() || g.namespace == c.namespace && c.namespace.is_some()
    } && g.rules.iter().any(|r| rule_allows(r, c)))
}

/// Grants no call uses, which an admission plugin checks instead: creating a Node whose
/// ownerReference to a NodeSet has blockOwnerDeletion needs `update` on `nodesets/finalizers`
/// under OwnerReferencesPermissionEnforcement.
const ADMISSION_ONLY: [(&str, &str, &str); 1] = [("kube-node.io", "nodesets/finalizers", "update")];

/// A throwaway SSH key pair made with `ssh-keygen -t ed25519` for the bare-metal class
/// below; it opens nothing.
const THROWAWAY_SSH_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACBlDvQAmP5o90ZBT9i6FHAsI02aXBsa79zl6HzkLMnbDgAAAIhoH/l8aB/5\nfAAAAAtzc2gtZWQyNTUxOQAAACBlDvQAmP5o90ZBT9i6FHAsI02aXBsa79zl6HzkLMnbDg\nAAAEAU/A5HmV1LeFTLdcCWkA7PTMhBrjrhSHSMmdbo4rj0A2UO9ACY/mj3RkFP2LoUcCwj\nTZpcGxrv3OXofOQsydsOAAAABHRlc3QB\n-----END OPENSSH PRIVATE KEY-----\n";
const THROWAWAY_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

/// A bare-metal NodeClass whose inventory is a ConfigMap (which the node-controller reads) and
/// whose one host's BMC is a loopback port nobody answers on: the class builds, its
/// validation reads the claim Leases (and finds the BMC down), and the orphan collector lists
/// them, as with a real rack.
async fn baremetal_class(cluster: &Cluster) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let hosts = format!(
        "- name: rack-01\n  redfishUrl: http://127.0.0.1:{closed}/redfish/v1/Systems/1\n  sshAddress: 127.0.0.1:{closed}\n  sshHostKey: {THROWAWAY_HOST_KEY}\n"
    );
    create(
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(cluster.admin.clone(), NAMESPACE),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "rack-inventory", "namespace": NAMESPACE},
            "data": {"hosts.yaml": hosts},
        }),
    )
    .await;
    create(
        Api::<Secret>::namespaced(cluster.admin.clone(), NAMESPACE),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "rack-credentials", "namespace": NAMESPACE},
            "data": {
                "bmc-username": base64(b"admin"),
                "bmc-password": base64(format!("s3cr3t-BMC-{}", random_suffix()).as_bytes()),
                "ssh-private-key": base64(THROWAWAY_SSH_KEY.as_bytes()),
            },
        }),
    )
    .await;
    create(
        cluster.all::<NodeClass>(),
        json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
            "metadata": {"name": "rack"},
            "spec": {
                "provider": {"type": "baremetal", "baremetal": {
                    "inventoryRef": {"namespace": NAMESPACE, "name": "rack-inventory"},
                }},
                "credentialsSecretRef": {"namespace": NAMESPACE, "name": "rack-credentials"},
            },
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_every_call_the_code_makes_and_grants_nothing_unused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster::start().await;
    let admin = cluster.admin.clone();
    let nodes = Api::<Node>::all(admin.clone());
    let nodesets = Api::<NodeSet>::all(admin.clone());

    // Leader election, as `kube-node run` does it.
    let calls_for_lease = cluster.calls.clone();
    let lease_client = {
        let tap = Tap {
            inner: cluster.harness.api.service(),
            who: "controller",
            calls: calls_for_lease,
            mode: Arc::new(AtomicU8::new(UP)),
        };
        kube::Client::new(tap, "default")
    };
    let cfg = lease_cfg("ops", Duration::from_secs(15), Duration::from_millis(200));
    let (leading, campaign) = leader::campaign(lease_client.clone(), cfg.clone());
    let mut l = leading.clone();
    tokio::time::timeout(Duration::from_secs(10), l.wait_for(|x| *x))
        .await
        .expect("leads")
        .expect("campaign");

    // Credentials (an exec class whose creates fail, so Warning events repeat), a NodeSet, the
    // autoscaler facade, a standalone Node with a pod to drain.
    leaky_exec_class(&cluster, dir.path(), "leaky").await;
    baremetal_class(&cluster).await;
    create(cluster.all::<NodeClass>(), simulated_class("sim")).await;
    create(cluster.all::<NodeSet>(), nodeset("workers", "sim", 2)).await;
    create(cluster.all::<Node>(), node("leaky-1", "leaky")).await;
    create(cluster.all::<Node>(), node("drained", "sim")).await;
    let ready = |want: usize| {
        let nodes = nodes.clone();
        move || {
            let nodes = nodes.clone();
            async move {
                let l = nodes
                    .list(&ListParams::default().labels("kube-node.io/nodeset=workers"))
                    .await
                    .ok()?;
                let alive: Vec<&Node> = l
                    .items
                    .iter()
                    .filter(|n| n.metadata.deletion_timestamp.is_none())
                    .collect();
                (alive.len() == want && alive.iter().all(|n| machine_ready(n)))
                    .then(|| alive.iter().map(|n| n.name_any()).collect::<Vec<_>>())
            }
        }
    };
    eventually(Duration::from_secs(60), "2 workers Ready", ready(2)).await;

    let autoscaler = NodeSetCloudProvider::new(cluster.controller.clone());
    autoscaler
        .node_group_increase_size(tonic::Request::new(NodeGroupIncreaseSizeRequest {
            id: "workers".into(),
            delta: 1,
        }))
        .await
        .expect("increase size");
    let names = eventually(Duration::from_secs(60), "3 workers Ready", ready(3)).await;
    autoscaler
        .node_group_delete_nodes(tonic::Request::new(NodeGroupDeleteNodesRequest {
            id: "workers".into(),
            nodes: vec![ExternalGrpcNode {
                name: names[0].clone(),
                ..Default::default()
            }],
        }))
        .await
        .expect("delete nodes");
    eventually(Duration::from_secs(60), "2 workers again", ready(2)).await;
    eventually(
        Duration::from_secs(60),
        "spec.removeNodes pruned once the Node is gone",
        || {
            let nodesets = nodesets.clone();
            async move {
                let ns = nodesets.get("workers").await.ok()?;
                ns.spec.remove_nodes.is_empty().then_some(())
            }
        },
    )
    .await;

    // Drain: a running pod on the standalone Node is evicted before its machine goes.
    eventually(Duration::from_secs(60), "the standalone Node Ready", || {
        let nodes = nodes.clone();
        async move { nodes.get("drained").await.ok().filter(machine_ready) }
    })
    .await;
    // A pod the simulated kubelet starts; a finalizer holds it once evicted, so the kubelet's
    // final delete happens too (the embedded API deletes an evicted pod at once otherwise).
    let pods = Api::<Pod>::namespaced(admin.clone(), "default");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "default", "finalizers": ["ops.test/hold"]},
            "spec": {"nodeName": "drained", "containers": [{"name": "app", "image": "app"}]},
        }))
        .expect("pod"),
    )
    .await
    .expect("create pod");
    eventually(
        Duration::from_secs(30),
        "the kubelet to start the pod",
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("app").await.ok()?;
                (p.status?.phase.as_deref() == Some("Running")).then_some(())
            }
        },
    )
    .await;
    nodes
        .delete("drained", &DeleteParams::default())
        .await
        .expect("delete Node");
    let calls = cluster.calls.clone();
    eventually(
        Duration::from_secs(60),
        "the drain's eviction and the kubelet's final delete",
        || {
            let calls = calls.clone();
            async move {
                let calls = calls.lock().expect("calls");
                let seen = |who: &str, verb: &str, res: &str| {
                    calls
                        .iter()
                        .any(|c| c.who == who && c.verb == verb && c.resource == res)
                };
                (seen("controller", "create", "pods/eviction") && seen("kubelet", "delete", "pods"))
                    .then_some(())
            }
        },
    )
    .await;
    pods.patch(
        "app",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("drop the finalizer");
    nodes
        .delete("leaky-1", &DeleteParams::default())
        .await
        .expect("delete Node");
    nodesets
        .delete("workers", &DeleteParams::default())
        .await
        .expect("delete NodeSet");
    eventually(Duration::from_secs(60), "every Node gone", || {
        let nodes = nodes.clone();
        async move {
            let l = nodes.list(&ListParams::default()).await.ok()?;
            l.items.is_empty().then_some(())
        }
    })
    .await;
    assert!(
        pods.get_opt("app").await.expect("get pod").is_none(),
        "the pod was evicted"
    );
    // The bare-metal backend's claims, through the controllers' client: the store the
    // node-controller hands the backend claims, re-reads, releases and lists hosts with these
    // very calls.
    let claims =
        node_controller::claims::LeaseClaimStore::new(cluster.controller.clone(), NAMESPACE);
    kube_node_provider::claims::check_store(&claims, "rbac")
        .await
        .expect("the claim store works with kube-node's grants");
    eventually(
        Duration::from_secs(60),
        "the bare-metal class's inventory read and claims listed",
        || {
            let calls = calls.clone();
            async move {
                let calls = calls.lock().expect("calls");
                let seen = |verb: &str, res: &str| {
                    calls.iter().any(|c| {
                        c.who == "controller"
                            && c.verb == verb
                            && c.resource == res
                            && c.namespace.as_deref() == Some(NAMESPACE)
                    })
                };
                (seen("get", "configmaps") && seen("list", "leases")).then_some(())
            }
        },
    )
    .await;
    campaign.abort();
    let _ = campaign.await;
    leader::release(lease_client, &cfg).await;
    let (_api, calls) = cluster.stop().await;

    let main = grants(&["rbac.yaml"]);
    let all = grants(&["rbac.yaml", "rbac-simulated-kubelet.yaml"]);
    let kubelet_only = grants(&["rbac-simulated-kubelet.yaml"]);
    let distinct: BTreeSet<(&str, &str, &str, &str, Option<&str>)> = calls
        .iter()
        .map(|c| {
            (
                c.who,
                c.verb.as_str(),
                c.group.as_str(),
                c.resource.as_str(),
                c.namespace.as_deref(),
            )
        })
        .collect();
    let mut report = String::new();
    for (who, verb, group, resource, ns) in &distinct {
        report.push_str(&format!(
            "  {who:<10} {verb:<7} {group}/{resource} ns={}\n",
            ns.unwrap_or("-")
        ));
    }
    eprintln!("calls made:\n{report}");

    let mut problems = Vec::new();
    // Every call is allowed: the controllers' by rbac.yaml alone, the simulated kubelet's by
    // both files (they share one ServiceAccount).
    let mut seen = BTreeSet::new();
    for c in &calls {
        let grants = if c.who == "kubelet" { &all } else { &main };
        let key = (c.who, &c.verb, &c.group, &c.resource, &c.namespace, &c.name);
        if !allowed(grants, c) && seen.insert(key) {
            problems.push(format!(
                "DENIED: {} {} {}/{} ns={} name={}",
                c.who,
                c.verb,
                c.group,
                c.resource,
                c.namespace.as_deref().unwrap_or("-"),
                c.name.as_deref().unwrap_or("-")
            ));
        }
    }
    // Every grant is used: each (group, resource, verb) of every rule of rbac.yaml by a
    // controller call it allows, and of the kubelet's file by a kubelet call.
    for (set, who) in [(&main, "controller"), (&kubelet_only, "kubelet")] {
        for g in set {
            for rule in &g.rules {
                for group in rule.api_groups.iter().flatten() {
                    for resource in rule.resources.iter().flatten() {
                        for verb in &rule.verbs {
                            let grant = (group.as_str(), resource.as_str(), verb.as_str());
                            if ADMISSION_ONLY.contains(&grant) {
                                continue;
                            }
                            let used = calls.iter().any(|c| {
                                c.who == who
                                    && &c.group == group
                                    && &c.resource == resource
                                    && &c.verb == verb
                                    && (g.namespace.is_none() || g.namespace == c.namespace)
                                    && rule_allows(rule, c)
                            });
                            if !used {
                                problems
                                    .push(format!("UNUSED: {}: {verb} {group}/{resource}", g.role));
                            }
                        }
                    }
                }
            }
        }
    }
    // The stats of the embedded API agree that these calls happened at all.
    assert!(_api.stats().count("pods/eviction", "create") >= 1);
    assert!(
        problems.is_empty(),
        "RBAC does not match the code:\n{}\ncalls made:\n{report}",
        problems.join("\n")
    );
}
