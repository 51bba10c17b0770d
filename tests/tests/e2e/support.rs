//! Plumbing of the end-to-end suite: the cluster client, a cross-process lock (every scenario
//! runs its own `kube-node run`, and two controller processes on one cluster would both act on
//! the same Nodes), the `kube-node` binary as a child process that is killed on drop, bounded
//! polling, and small API helpers.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::{CustomResourceExt, ResourceExt};
use kube_node_crds::{NodeClass, NodeSet};

/// Every object the suite creates carries this label, so leftovers of an aborted run can be
/// found and removed by the next one.
pub const SUITE_LABEL: &str = "e2e.kube-node.io/suite";
/// The field manager of the suite's server-side applies.
pub const MANAGER: &str = "kube-node-e2e";

/// One scenario's hold on the cluster: the client, the kubeconfig path, a scratch directory and
/// a namespace of its own. Holds the suite's lock until dropped.
pub struct Env {
    pub client: kube::Client,
    pub kubeconfig: PathBuf,
    pub dir: tempfile::TempDir,
    /// A namespace of this scenario (leader-election Leases, pods); deleted by `finish`.
    pub namespace: String,
    /// A short unique suffix for this scenario's object names.
    pub id: String,
    _lock: std::fs::File,
}

/// The cluster of `KUBE_NODE_E2E_KUBECONFIG`, the suite's lock, the CRDs installed, the binary
/// built, leftovers removed, and a fresh namespace; `None` (after saying SKIPPED) when the
/// variable is unset.
pub async fn setup(scenario: &str) -> Option<Env> {
    let Some(path) = std::env::var_os("KUBE_NODE_E2E_KUBECONFIG") else {
        eprintln!(
            "SKIPPED: e2e {scenario}: KUBE_NODE_E2E_KUBECONFIG is not set, no real cluster to test against"
        );
        return None;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = PathBuf::from(path);
    let lock = lock_suite();
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).expect("readable kubeconfig"),
        &Default::default(),
    )
    .await
    .expect("usable kubeconfig");
    let client = kube::Client::try_from(config).expect("client");
    install_crds(&client).await;
    remove_leftovers(&client).await;
    let id = unique_suffix();
    let namespace = format!("e2e-{scenario}-{id}");
    create_namespace(&client, &namespace).await;
    Some(Env {
        client,
        kubeconfig,
        dir: tempfile::tempdir().expect("temp dir"),
        namespace,
        id,
        _lock: lock,
    })
}

impl Env {
    /// A name unique to this scenario: `<prefix>-<id>`.
    pub fn name(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.id)
    }

    /// Deletes the scenario's namespace (not waiting: namespaces finish asynchronously).
    pub async fn finish(self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.namespace, &DeleteParams::default())
            .await;
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}",
        (nanos ^ u128::from(std::process::id())) % 0xff_ffff_ffff
    )
}

/// `<target>/debug`: the directory of the test binary's `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .expect("test binary under <target>/<profile>/deps")
        .to_path_buf()
}

/// One scenario at a time across processes (nextest runs each test in its own process).
fn lock_suite() -> std::fs::File {
    let path = profile_dir().join("kube-node-e2e.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .expect("lock file");
    f.lock().expect("suite lock");
    f
}

/// The `kube-node` binary: `KUBE_NODE_E2E_BIN` if set, else built (once per test process) by
/// cargo, which builds no binaries of dependencies for an integration test.
pub fn kube_node_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // A prebuilt binary (e.g. a release build for the scale figures) instead of the debug
        // build.
        if let Some(bin) = std::env::var_os("KUBE_NODE_E2E_BIN") {
            // Absolute: the quick-start test links it into a PATH directory of its own, and
            // a relative link would point nowhere.
            let bin = PathBuf::from(bin);
            return std::fs::canonicalize(&bin).unwrap_or(bin);
        }
        let profile = profile_dir();
        let target = profile.parent().expect("target dir").to_path_buf();
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "kube-node", "--bin", "kube-node"])
            .arg("--target-dir")
            .arg(&target)
            .current_dir(workspace)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo build -p kube-node failed");
        let bin = profile.join("kube-node");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

async fn install_crds(client: &kube::Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [NodeClass::crd(), NodeSet::crd()] {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("CRD applies");
    }
    let classes: Api<NodeClass> = Api::all(client.clone());
    let sets: Api<NodeSet> = Api::all(client.clone());
    eventually("the CRDs established", Duration::from_secs(30), || {
        let (classes, sets) = (classes.clone(), sets.clone());
        async move {
            classes.list(&ListParams::default()).await.is_ok()
                && sets.list(&ListParams::default()).await.is_ok()
        }
    })
    .await;
}

/// Removes what an aborted earlier run left (no kube-node of ours runs now, we hold the lock):
/// finalizers first, since nothing would ever remove them.
async fn remove_leftovers(client: &kube::Client) {
    let lp = ListParams::default().labels(SUITE_LABEL);
    let unfinalize = PatchParams::default();
    let strip = Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}}));
    let sets: Api<NodeSet> = Api::all(client.clone());
    for s in sets.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        let _ = sets.patch(&s.name_any(), &unfinalize, &strip).await;
        let _ = sets.delete(&s.name_any(), &DeleteParams::default()).await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    for n in nodes.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        let _ = nodes.patch(&n.name_any(), &unfinalize, &strip).await;
        let _ = nodes.delete(&n.name_any(), &DeleteParams::default()).await;
    }
    let classes: Api<NodeClass> = Api::all(client.clone());
    for c in classes.list(&lp).await.map(|l| l.items).unwrap_or_default() {
        let _ = classes.patch(&c.name_any(), &unfinalize, &strip).await;
        let _ = classes
            .delete(&c.name_any(), &DeleteParams::default())
            .await;
    }
}

pub async fn create_namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {SUITE_LABEL: "true"}}
    }))
    .expect("namespace");
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

/// Polls `f` every 250 ms until it holds; panics after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if f().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// How to start one `kube-node run`.
pub struct RunOptions {
    /// The kubeconfig it uses (`KUBECONFIG`).
    pub kubeconfig: PathBuf,
    pub cluster_name: String,
    pub lease_namespace: String,
    pub lease_name: String,
    pub identity: String,
    /// Further flags.
    pub extra: Vec<String>,
}

impl RunOptions {
    /// Leader election on a Lease of the scenario's namespace, orphan GC every 2 s.
    pub fn new(env: &Env, identity: &str) -> Self {
        Self {
            kubeconfig: env.kubeconfig.clone(),
            cluster_name: env.name("e2e"),
            lease_namespace: env.namespace.clone(),
            lease_name: "kube-node-e2e".into(),
            identity: identity.into(),
            extra: Vec::new(),
        }
    }
}

/// Starts a `kube-node run` and waits until it is ready and holds the Lease.
pub async fn spawn_leader(env: &Env, opts: RunOptions) -> KubeNode {
    let mut kn = KubeNode::spawn(env.dir.path(), opts);
    kn.wait_ready().await;
    kn.wait_leading(Duration::from_secs(60)).await;
    kn
}

/// A running `kube-node run`, killed (SIGKILL) and reaped on drop. Its output goes to a file; on
/// a failing test (a panic) its tail is printed.
pub struct KubeNode {
    pub identity: String,
    pub metrics: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

impl KubeNode {
    pub fn spawn(dir: &Path, opts: RunOptions) -> Self {
        let port = free_port();
        let metrics: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = dir.join(format!("kube-node-{}.log", opts.identity));
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(kube_node_bin());
        cmd.arg("run")
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(["--cluster-name", &opts.cluster_name])
            .arg("--leader-elect=true")
            .args(["--leader-election-namespace", &opts.lease_namespace])
            .args(["--leader-election-id", &opts.lease_name])
            .args(["--leader-identity", &opts.identity])
            .args(["--orphan-gc-interval", "2s"])
            .args(["--shutdown-timeout", "5s"])
            .args(&opts.extra)
            // Flags only: nothing from the test runner's environment leaks in.
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .env("KUBECONFIG", &opts.kubeconfig)
            // Reconcile failures are debug lines; the log is a file, printed only on failure.
            .env(
                "KUBE_NODE_LOG",
                std::env::var("KUBE_NODE_E2E_LOG").unwrap_or_else(|_| {
                    "info,node_controller=debug,nodeset_controller=debug,kube_runtime=warn,kube_client=warn".into()
                }),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().expect("kube-node starts");
        Self {
            identity: opts.identity,
            metrics,
            log,
            child: Some(child),
        }
    }

    /// Adopts a `kube-node` started by the caller (its output already going to `log`).
    pub fn adopt(identity: &str, metrics: SocketAddr, log: PathBuf, child: Child) -> Self {
        Self {
            identity: identity.into(),
            metrics,
            log,
            child: Some(child),
        }
    }

    /// Panics (with the log's tail) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "kube-node {} exited with {status}:\n{}",
                self.identity,
                self.tail(60)
            );
        }
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&mut self) {
        let start = tokio::time::Instant::now();
        loop {
            self.assert_running();
            if let Some((200, _)) = http_get(self.metrics, "/ready").await {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "kube-node {} not ready within 60s:\n{}",
                self.identity,
                self.tail(60)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until this process leads (its `kube_node_leader` gauge is 1).
    pub async fn wait_leading(&mut self, timeout: Duration) {
        let start = tokio::time::Instant::now();
        loop {
            self.assert_running();
            if self.metric("kube_node_leader").await == Some(1.0) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "kube-node {} did not lead within {timeout:?}:\n{}",
                self.identity,
                self.tail(60)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The sum of every sample of a metric family whose labels contain all of `labels`.
    pub async fn metric_with(&self, name: &str, labels: &[&str]) -> Option<f64> {
        metric_at(self.metrics, name, labels).await
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        self.metric_with(name, &[]).await
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The whole captured output.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the captured output.
    pub fn tail(&self, n: usize) -> String {
        let out = self.output();
        let lines: Vec<&str> = out.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for KubeNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- kube-node {} output (last 80 lines of {}) ----\n{}\n----",
                self.identity,
                self.log.display(),
                self.tail(80)
            );
        }
    }
}

/// A plain HTTP/1.0 GET on loopback: `(status, body)`, `None` when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    })
    .await
    .ok()
    .flatten()
}

/// A NodeClass of the simulated backend, labelled for the suite.
pub fn simulated_class(name: &str, extra_spec: serde_json::Value) -> NodeClass {
    let mut spec = serde_json::json!({
        "provider": {"type": "simulated", "simulated": {
            "instanceType": "sim.small", "zones": ["sim-a"], "bootDelay": "1s", "deleteDelay": "0s"}},
        "labels": {"e2e.kube-node.io/class": name},
        "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
    });
    merge(&mut spec, extra_spec);
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": name, "labels": {SUITE_LABEL: "true"}},
        "spec": spec,
    }))
    .expect("NodeClass")
}

/// A NodeClass of the exec backend running the reference program
/// (`examples/exec-provider/machines.py`), whose machines are files in `state`: they outlive
/// any `kube-node` process, and a scenario can read and change them.
pub fn exec_class(name: &str, state: &Path) -> NodeClass {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": name, "labels": {SUITE_LABEL: "true"}},
        "spec": {
            "provider": {"type": "exec", "exec": {
                "command": ["python3", repo_root().join(MACHINES_PY)],
                "timeout": "30s",
                "config": {"stateDir": state, "zone": "lab-a"}
            }},
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"}
        }
    }))
    .expect("NodeClass")
}

/// The reference exec program, relative to the repository root.
pub const MACHINES_PY: &str = "examples/exec-provider/machines.py";

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// A Node that asks for a machine of `class`.
pub fn node_request(name: &str, class: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name,
            "labels": {SUITE_LABEL: "true"},
            "annotations": {kube_node_crds::names::NODE_CLASS_ANNOTATION: class}},
    }))
    .expect("Node")
}

pub async fn apply_class(client: &kube::Client, class: &NodeClass) {
    Api::<NodeClass>::all(client.clone())
        .patch(
            &class.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(class),
        )
        .await
        .expect("NodeClass applies");
}

/// The status of a condition of a Node, and its reason.
pub fn node_condition(node: &Node, type_: &str) -> Option<(String, Option<String>)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

pub fn is_ready(node: &Node) -> bool {
    node_condition(node, "Ready").is_some_and(|(s, _)| s == "True")
}

/// Deletes a Node and waits (bounded) until it is gone.
pub async fn delete_node_and_wait(client: &kube::Client, name: &str, timeout: Duration) {
    let nodes: Api<Node> = Api::all(client.clone());
    let _ = nodes.delete(name, &DeleteParams::default()).await;
    eventually(&format!("Node {name} gone"), timeout, || {
        let nodes = nodes.clone();
        async move { matches!(nodes.get_opt(name).await, Ok(None)) }
    })
    .await;
}

/// Deletes a NodeClass and waits until it is gone. The in-use finalizer is kube-node's to
/// remove once no Node uses the class; a scenario that stopped its kube-node already gets it
/// removed here after a grace period, as an operator uninstalling kube-node would.
pub async fn delete_class_and_wait(client: &kube::Client, name: &str) {
    let api: Api<NodeClass> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    for _ in 0..40 {
        if matches!(api.get_opt(name).await, Ok(None)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await;
    eventually(
        &format!("NodeClass {name} gone"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            async move { matches!(api.get_opt(name).await, Ok(None)) }
        },
    )
    .await;
}

/// Bootstrap-token Secrets in kube-system labelled for a Node UID. Read with the admin client.
pub async fn token_secrets(client: &kube::Client, node_uid: &str) -> Vec<Secret> {
    Api::<Secret>::namespaced(client.clone(), "kube-system")
        .list(&ListParams::default().labels(&format!(
            "{}={node_uid}",
            kube_node_crds::names::tags::NODE_UID
        )))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Events about an object (any namespace; core/v1 view, which also shows events.k8s.io ones).
pub async fn events_about(client: &kube::Client, name: &str) -> Vec<(String, String, String)> {
    Api::<k8s_openapi::api::core::v1::Event>::all(client.clone())
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect()
}

/// An object `apply_yaml` applied.
pub struct Applied {
    pub resource: ApiResource,
    pub name: String,
    pub namespace: Option<String>,
}

/// Server-side applies every document of a multi-document YAML file, whatever its kind.
pub async fn apply_yaml(client: &kube::Client, yaml: &str) -> Vec<Applied> {
    let mut applied = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = <serde_json::Value as serde::Deserialize>::deserialize(doc).expect("YAML");
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_json::from_value(value).expect("object");
        let types = obj.types.clone().expect("apiVersion and kind");
        let (group, version) = types
            .api_version
            .split_once('/')
            .unwrap_or(("", types.api_version.as_str()));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, &types.kind));
        let a = Applied {
            resource,
            name: obj.name_any(),
            namespace: obj.namespace(),
        };
        a.api(client)
            .patch(
                &a.name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("applying {} {}: {e}", types.kind, a.name));
        applied.push(a);
    }
    applied
}

impl Applied {
    fn api(&self, client: &kube::Client) -> Api<DynamicObject> {
        match &self.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &self.resource),
            None => Api::all_with(client.clone(), &self.resource),
        }
    }

    /// Deletes it (best effort).
    pub async fn delete(&self, client: &kube::Client) {
        let _ = self
            .api(client)
            .delete(&self.name, &DeleteParams::default())
            .await;
    }
}

/// What `kubectl get` shows for one object: the server's Table rendering (the CRD's
/// additionalPrinterColumns evaluated by the API server), column name → cell.
pub async fn table_row(
    client: &kube::Client,
    collection_path: &str,
    name: &str,
) -> BTreeMap<String, serde_json::Value> {
    let mut req = kube::core::Request::new(collection_path)
        .get(name, &Default::default())
        .expect("request");
    req.headers_mut().insert(
        "accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io"
            .parse()
            .expect("header"),
    );
    let table: serde_json::Value = client.request(req).await.expect("Table");
    let columns: Vec<String> = table["columnDefinitions"]
        .as_array()
        .expect("columnDefinitions")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let cells = table["rows"][0]["cells"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    columns.into_iter().zip(cells).collect()
}

/// The sum of every sample of a metric family, served at `addr`'s `/metrics`, whose labels
/// contain all of `labels`.
pub async fn metric_at(addr: SocketAddr, name: &str, labels: &[&str]) -> Option<f64> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        return None;
    }
    metric_in(&body, name, labels)
}

/// The sum of the series of `name` carrying all `labels` in a Prometheus text exposition.
pub fn metric_in(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let metric = series.split('{').next().unwrap_or(series);
        if metric != name || !labels.iter().all(|l| series.contains(l)) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}
