//! The `kube-node` binary as an operator runs it: `crds`, `--help`, `simulate`, and `run`
//! against an embedded API server served over HTTP (health, metrics, JSON logs, SIGTERM, the
//! leader Lease).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, PostParams};
use kube_node::harness::Harness;
use kube_node_crds::NodeClass;
use kube_node_embedded_api::{EmbeddedApi, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_kube-node");
const NAMESPACE: &str = "kube-node-system";

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kube-node-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A command with a clean kube-node environment (no inherited `KUBE_NODE_*`/`POD_*`).
fn kube_node() -> Command {
    let mut c = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().to_string();
        if k.starts_with("KUBE_NODE_") || k.starts_with("POD_") || k == "KUBECONFIG" {
            c.env_remove(k);
        }
    }
    c
}

fn output(args: &[&str]) -> std::process::Output {
    kube_node().args(args).output().expect("run kube-node")
}

#[test]
fn crds_prints_exactly_the_committed_crd_yaml() {
    let out = output(&["crds"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/crds.yaml"))
            .expect("crds/crds.yaml");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

/// The option blocks of a clap `--help` page: the flag line and its description lines.
fn option_blocks(help: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    let mut in_block = false;
    for line in help.lines() {
        let indent = line.len() - line.trim_start().len();
        let t = line.trim_start();
        if (1..=6).contains(&indent) && t.starts_with('-') {
            blocks.push(line.to_string());
            in_block = true;
        } else if indent == 0 && !t.is_empty() {
            in_block = false; // a section header
        } else if in_block && let Some(b) = blocks.last_mut() {
            b.push('\n');
            b.push_str(line);
        }
    }
    blocks
}

#[test]
fn help_shows_every_flag_with_its_environment_variable() {
    let mut seen = BTreeMap::new();
    for args in [
        &["--help"][..],
        &["run", "--help"][..],
        &["simulate", "--help"][..],
    ] {
        let out = output(args);
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        let blocks = option_blocks(&help);
        assert!(!blocks.is_empty(), "{args:?}: no options found in\n{help}");
        for b in blocks {
            let flag = b
                .split_whitespace()
                .find(|w| w.starts_with("--"))
                .unwrap_or_default()
                .trim_end_matches(',')
                // A boolean flag shows as `--flag[=<FLAG>]`.
                .split('[')
                .next()
                .unwrap_or_default()
                .to_string();
            if flag == "--help" || flag == "--version" {
                continue;
            }
            let env = b
                .split("[env: ")
                .nth(1)
                .and_then(|r| r.split(['=', ']']).next())
                .unwrap_or_else(|| panic!("{args:?}: {flag} names no environment variable:\n{b}"))
                .to_string();
            seen.insert(flag, env);
        }
    }
    for (flag, env) in [
        ("--cluster-name", "KUBE_NODE_CLUSTER_NAME"),
        ("--metrics-addr", "KUBE_NODE_METRICS_ADDR"),
        ("--leader-elect", "KUBE_NODE_LEADER_ELECT"),
        ("--log-format", "KUBE_NODE_LOG_FORMAT"),
        ("--kube-qps", "KUBE_NODE_KUBE_QPS"),
        ("--shutdown-timeout", "KUBE_NODE_SHUTDOWN_TIMEOUT"),
        ("--autoscaler-grpc-addr", "KUBE_NODE_AUTOSCALER_GRPC_ADDR"),
        ("--watch-lag", "KUBE_NODE_WATCH_LAG"),
    ] {
        assert_eq!(seen.get(flag).map(String::as_str), Some(env), "{flag}");
    }
    assert!(seen.len() >= 25, "every flag of run and simulate: {seen:?}");
}

const TINY_SCENARIO: &str = r#"description: a tiny scenario
steps:
  - name: create a NodeClass and a NodeSet of 2
    apply:
      - apiVersion: kube-node.io/v1alpha1
        kind: NodeClass
        metadata: {name: tiny}
        spec:
          provider: {type: simulated, simulated: {bootDelay: 0s, deleteDelay: 0s}}
      - apiVersion: kube-node.io/v1alpha1
        kind: NodeSet
        metadata: {name: tiny}
        spec:
          replicas: 2
          selector: {matchLabels: {kube-node.io/nodeset: tiny}}
          template:
            metadata: {labels: {kube-node.io/nodeset: tiny}}
            spec: {nodeClassName: tiny}
    expect: {nodeSet: tiny, readyReplicas: 2, nodes: 2, machines: 2}
    timeout: 60s
  - name: scale tiny to 4
    scale: {nodeSet: tiny, replicas: 4}
    expect: {nodeSet: tiny, readyReplicas: 4, nodes: 4, machines: 4}
    timeout: 60s
  - name: delete the NodeSet
    delete: [{kind: NodeSet, name: tiny}]
    expect: {nodes: 0, machines: 0}
    timeout: 60s
"#;

#[test]
fn simulate_runs_a_scenario_file_and_prints_a_summary() {
    let dir = TempDir::new();
    let path = dir.write("tiny.yaml", TINY_SCENARIO);
    let out = output(&["simulate", path.to_str().expect("utf-8"), "--quiet"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "create a NodeClass and a NodeSet of 2",
        "scale tiny to 4",
        "delete the NodeSet",
        "total",
        "converged",
    ] {
        assert!(stdout.contains(want), "summary lacks {want:?}:\n{stdout}");
    }
    assert!(!stdout.contains("TIMEOUT"), "{stdout}");
    // The totals: 4 Nodes created. (Deleted ones are counted from API delete requests; the
    // NodeSet's Nodes here go by garbage collection, which the summary does not see.)
    let total = stdout
        .lines()
        .find(|l| l.starts_with("total"))
        .expect("total line");
    let numbers: Vec<&str> = total.split_whitespace().skip(1).collect();
    assert_eq!(numbers.first().copied(), Some("4"), "{total}");
}

#[test]
fn a_malformed_scenario_fails_naming_the_field() {
    let dir = TempDir::new();
    let path = dir.write(
        "bad.yaml",
        &TINY_SCENARIO.replace(
            "{nodeSet: tiny, replicas: 4}",
            "{nodeSet: tiny, replicaz: 4}",
        ),
    );
    let out = output(&["simulate", path.to_str().expect("utf-8"), "--quiet"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("replicaz"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// `kube-node run` against an embedded API server.

struct Apiserver {
    api: EmbeddedApi,
    cluster: Harness,
    server: Option<Server>,
    _dir: TempDir,
    kubeconfig: PathBuf,
}

impl Apiserver {
    async fn start() -> Self {
        let apiserver = Self::start_without_crds().await;
        apiserver.install_crds();
        apiserver
    }

    fn install_crds(&self) {
        self.cluster.install_crds().expect("CRDs");
    }

    async fn start_without_crds() -> Self {
        let cluster = Harness::builder()
            .api_only()
            .without_crds()
            .start()
            .await
            .expect("API server");
        let api = cluster.api.clone();
        let server = api
            .serve("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("serve");
        let dir = TempDir::new();
        let kubeconfig = dir.write("kubeconfig", &server.kubeconfig());
        Self {
            api,
            cluster,
            server: Some(server),
            _dir: dir,
            kubeconfig,
        }
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// A running `kube-node run` with its stderr collected line by line.
struct Running {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    metrics: String,
}

impl Running {
    fn start(apiserver: &Apiserver, extra: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let metrics = format!("127.0.0.1:{port}");
        let mut child = kube_node()
            .env("KUBECONFIG", &apiserver.kubeconfig)
            .args([
                "run",
                "--metrics-addr",
                &metrics,
                "--shutdown-timeout",
                "10s",
            ])
            .args(["--cluster-name", "cli-test"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kube-node run");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let pipe = child.stderr.take().expect("stderr");
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().expect("lines").push(line);
            }
        });
        Self {
            child,
            stderr,
            metrics,
        }
    }

    fn logs(&self) -> String {
        self.stderr.lock().expect("lines").join("\n")
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// Sends SIGTERM (with the system's `kill`, keeping this crate free of unsafe code).
    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits (bounded) for the process to exit.
    async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("kube-node did not exit within {limit:?}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::net::TcpStream::connect(&self.metrics).await.ok()?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: kube-node\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await.ok()?;
        let status = buf.split_whitespace().nth(1)?.parse().ok()?;
        let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a JSON value holds, at any depth, an object with all these string fields.
fn has_fields(v: &serde_json::Value, want: &[(&str, &str)]) -> bool {
    match v {
        serde_json::Value::Object(m) => {
            want.iter()
                .all(|(k, val)| m.get(*k).and_then(|x| x.as_str()) == Some(val))
                || m.values().any(|x| has_fields(x, want))
        }
        serde_json::Value::Array(a) => a.iter().any(|x| has_fields(x, want)),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_health_and_metrics_logs_json_and_exits_cleanly_on_sigterm() {
    let apiserver = Apiserver::start().await;
    let mut run = Running::start(
        &apiserver,
        &["--leader-elect=false", "--log-format", "json"],
    );
    let (status, _) = eventually(Duration::from_secs(60), "/ready", || async {
        run.get("/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(run.get("/live").await.map(|(s, _)| s), Some(200));

    // A Node of a simulated NodeClass: its reconcile logs carry node and nodeclass.
    let client = apiserver.api.client();
    let class: NodeClass = serde_json::from_value(serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": "sim"},
        "spec": {"provider": {"type": "simulated", "simulated": {"bootDelay": "0s", "deleteDelay": "0s"}}},
    }))
    .expect("NodeClass");
    Api::<NodeClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .expect("create NodeClass");
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "cli-node", "annotations": {"kube-node.io/node-class": "sim"}},
    }))
    .expect("Node");
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("create Node");
    eventually(
        Duration::from_secs(60),
        "a JSON log line about the Node with node and nodeclass",
        || {
            let logs = run.logs();
            async move {
                logs.lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .find(|v| has_fields(v, &[("node", "cli-node"), ("nodeclass", "sim")]))
            }
        },
    )
    .await;
    // Every line is JSON.
    for line in run.logs().lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }

    let metrics = eventually(
        Duration::from_secs(30),
        "node reconcile metrics",
        || async {
            run.get("/metrics")
                .await
                .filter(|(s, b)| *s == 200 && b.contains("kube_node_reconcile"))
                .map(|(_, b)| b)
        },
    )
    .await;
    assert!(metrics.contains("kube_node_provider_requests"), "{metrics}");
    for controller in ["node", "nodeset"] {
        let series = format!("kube_node_workqueue_depth{{controller=\"{controller}\"}}");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
    let mut types = BTreeSet::new();
    for line in metrics.lines().filter(|l| l.starts_with("# TYPE ")) {
        assert!(types.insert(line), "duplicated metric family: {line}");
    }

    run.terminate();
    let status = run.exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", run.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_only_once_the_controllers_caches_have_synced() {
    // Without the CRDs the NodeClass and NodeSet watches cannot list, so no cache syncs.
    let apiserver = Apiserver::start_without_crds().await;
    let mut run = Running::start(
        &apiserver,
        &["--leader-elect=false", "--log-format", "json"],
    );
    eventually(Duration::from_secs(60), "/live", || async {
        run.get("/live").await.filter(|(s, _)| *s == 200)
    })
    .await;
    // The controllers' shared Node watch has listed, and both have tried the NodeClass and
    // NodeSet lists, which the API server answers 404 (counted as requests for an unknown
    // resource) until the CRDs exist: the caches had their chance to sync, and did not.
    eventually(
        Duration::from_secs(60),
        "NodeClass lists that fail",
        || async {
            let stats = apiserver.api.stats();
            (stats.count("nodes", "list") >= 1 && stats.count("unknown", "get") >= 3).then_some(())
        },
    )
    .await;
    assert_eq!(run.get("/ready").await.map(|(s, _)| s), Some(503));
    assert!(!run.logs().contains("caches synced"), "{}", run.logs());

    apiserver.install_crds();
    eventually(Duration::from_secs(60), "/ready", || async {
        run.get("/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let logs = run.logs();
    assert!(logs.contains("node-controller caches synced"), "{logs}");
    assert!(logs.contains("nodeset-controller caches synced"), "{logs}");
    run.terminate();
    let status = run.exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", run.logs());
}

async fn lease_holder(api: &EmbeddedApi) -> Option<String> {
    Api::<Lease>::namespaced(api.client(), NAMESPACE)
        .get_opt("kube-node")
        .await
        .expect("read Lease")?
        .spec?
        .holder_identity
}

const LEADER_ARGS: [&str; 10] = [
    "--leader-elect=true",
    "--leader-election-namespace",
    NAMESPACE,
    "--leader-identity",
    "cli-replica",
    "--lease-duration",
    "5s",
    "--lease-renew-interval",
    "500ms",
    "--log-format=text",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_leader_election_releases_the_lease_on_sigterm() {
    let apiserver = Apiserver::start().await;
    let mut run = Running::start(&apiserver, &LEADER_ARGS);
    eventually(Duration::from_secs(60), "the replica to lead", || async {
        (lease_holder(&apiserver.api).await.as_deref() == Some("cli-replica")).then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "kube_node_leader 1", || async {
        run.get("/metrics")
            .await
            .filter(|(_, b)| b.lines().any(|l| l == "kube_node_leader 1"))
    })
    .await;
    run.terminate();
    let status = run.exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", run.logs());
    assert_eq!(
        lease_holder(&apiserver.api).await,
        None,
        "the Lease is released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_with_an_error_when_another_replica_takes_the_lease() {
    let apiserver = Apiserver::start().await;
    let mut run = Running::start(&apiserver, &LEADER_ARGS);
    eventually(Duration::from_secs(60), "the replica to lead", || async {
        (lease_holder(&apiserver.api).await.as_deref() == Some("cli-replica")).then_some(())
    })
    .await;
    // Another replica holds it now (as after a partition that outlasted the lease).
    let leases = Api::<Lease>::namespaced(apiserver.api.client(), NAMESPACE);
    // The replica renews concurrently: retry on a conflict.
    eventually(Duration::from_secs(30), "taking the Lease over", || {
        let leases = leases.clone();
        async move {
            let mut lease = leases.get("kube-node").await.ok()?;
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.holder_identity = Some("other-replica".into());
            spec.lease_duration_seconds = Some(3600);
            spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                jiff::Timestamp::now(),
            ));
            leases
                .replace("kube-node", &PostParams::default(), &lease)
                .await
                .ok()
        }
    })
    .await;
    let status = run.exit(Duration::from_secs(60)).await;
    assert!(
        !status.success(),
        "a replica that lost the Lease exits non-zero\n{}",
        run.logs()
    );
    assert!(run.logs().contains("lost"), "{}", run.logs());
    assert_eq!(
        lease_holder(&apiserver.api).await.as_deref(),
        Some("other-replica"),
        "the loser leaves the other's Lease alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_is_ready_only_once_synced_and_a_poison_nodeclass_does_not_stop_the_sync() {
    // No CRDs: the leader's NodeClass and NodeSet watches cannot sync.
    let apiserver = Apiserver::start_without_crds().await;
    let mut run = Running::start(&apiserver, &LEADER_ARGS);
    eventually(Duration::from_secs(60), "the replica to lead", || async {
        (lease_holder(&apiserver.api).await.as_deref() == Some("cli-replica")).then_some(())
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "NodeClass lists that fail",
        || async { (apiserver.api.stats().count("unknown", "get") >= 3).then_some(()) },
    )
    .await;
    assert_eq!(
        run.get("/ready").await.map(|(s, _)| s),
        Some(503),
        "a leader whose watches never synced is not ready"
    );

    // The CRDs come, with a NodeClass the types cannot hold (the embedded API server, unlike
    // a real one, stores it): the watches sync anyway and the poison is counted.
    apiserver.install_crds();
    let poison: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "poison"},
        "spec": {"provider": {"type": "simulated", "simulated": {"bootDelay": "forever"}}}}))
    .expect("object");
    Api::<kube::api::DynamicObject>::all_with(
        apiserver.api.client(),
        &kube::api::ApiResource::erase::<NodeClass>(&()),
    )
    .create(&PostParams::default(), &poison)
    .await
    .expect("poison stored");
    eventually(Duration::from_secs(60), "/ready", || async {
        run.get("/ready").await.filter(|(s, _)| *s == 200)
    })
    .await;
    eventually(Duration::from_secs(30), "the poison counted", || async {
        run.get("/metrics").await.filter(|(_, b)| {
            b.lines()
                .any(|l| l == "kube_node_invalid_objects{kind=\"NodeClass\"} 1")
        })
    })
    .await;
    let logs = run.logs();
    assert!(
        logs.contains("spec.provider.simulated.bootDelay"),
        "the log names the field: {logs}"
    );
    let dumped: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"forever\"}"))
        .collect();
    assert!(dumped.is_empty(), "the object is dumped: {dumped:#?}");
    run.terminate();
    let status = run.exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}\n{}", run.logs());
}
