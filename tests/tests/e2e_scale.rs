//! Scale figures against the real cluster of `KUBE_NODE_E2E_KUBECONFIG` (skipped, saying so,
//! when unset): the nodeset-controller creating N Nodes (and their machines becoming Ready)
//! against kube-controller-manager's ReplicaSet controller creating N Pods, each side measured
//! alone on a quiet API server, with the same client rate limit. It prints four figures:
//! Nodes created, Nodes Ready, the Nth provider `create` call, each against the ReplicaSet's
//! Pods or the Nodes' creation; it asserts only what must hold whatever the speed: exactly N
//! Nodes, never more on the way.
//!
//! Knobs: `KUBE_NODE_E2E_SCALE_N` (1000); `KUBE_NODE_E2E_KCM_QPS` / `KUBE_NODE_E2E_KCM_BURST`
//! — the `--kube-api-qps` / `--kube-api-burst` the cluster's kube-controller-manager runs with
//! (its defaults, 20 / 30, unless told): kube-node runs with the same;
//! `KUBE_NODE_E2E_RESTART` — a shell command that restarts the cluster's control plane and
//! returns once it serves again (e.g. `cluster.sh restart <name>`). With it the control plane
//! is restarted between the two sides; without it the ReplicaSet side waits until the API
//! server has seen no write for 5 s after kube-node stopped. The output says which was done.
#[allow(dead_code)]
#[path = "e2e/support.rs"]
mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use kube_node_crds::NodeSet;
use serde_json::json;
use support::*;
use tokio::time::Instant;

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Counts the objects a label selector matches, from a watch: the most ever seen at once, and
/// when the count first reached the target.
#[derive(Default)]
struct Count {
    names: HashSet<String>,
    max_seen: usize,
    reached: Option<Instant>,
}

struct Counter {
    state: Arc<Mutex<Count>>,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    /// Starts a metadata-only watch (a counter needs names, not 1000 Node statuses) and
    /// returns once it has listed, so nothing created later is missed.
    async fn start<K>(api: Api<PartialObjectMeta<K>>, selector: &str, target: usize) -> Self
    where
        K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
        K::DynamicType: Default,
    {
        let state = Arc::new(Mutex::new(Count::default()));
        let (listed_tx, listed_rx) = tokio::sync::oneshot::channel();
        let s = state.clone();
        let cfg = watcher::Config::default().labels(selector);
        let task = tokio::spawn(async move {
            let mut listed = Some(listed_tx);
            let mut stream = watcher::watcher(api, cfg).boxed();
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let Ok(mut c) = s.lock() else { return };
                match ev {
                    Event::Apply(o) | Event::InitApply(o) => {
                        c.names.insert(o.name_any());
                    }
                    Event::Delete(o) => {
                        c.names.remove(&o.name_any());
                    }
                    Event::Init => c.names.clear(),
                    Event::InitDone => {
                        if let Some(tx) = listed.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                c.max_seen = c.max_seen.max(c.names.len());
                if c.names.len() >= target && c.reached.is_none() {
                    c.reached = Some(Instant::now());
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(30), listed_rx).await;
        Self { state, task }
    }

    fn count(&self) -> usize {
        self.state.lock().map(|c| c.names.len()).unwrap_or_default()
    }

    fn max_seen(&self) -> usize {
        self.state.lock().map(|c| c.max_seen).unwrap_or_default()
    }

    fn reached(&self) -> Option<Instant> {
        self.state.lock().ok().and_then(|c| c.reached)
    }

    /// Waits (bounded) until the count reached the target; returns when it did.
    async fn wait_reached(&self, what: &str, limit: Duration) -> Instant {
        let start = Instant::now();
        loop {
            if let Some(at) = self.reached() {
                return at;
            }
            assert!(
                start.elapsed() < limit,
                "{what}: only {} after {limit:?}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn replica_set(name: &str, replicas: i32) -> ReplicaSet {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {SUITE_LABEL: "true"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"e2e.kube-node.io/rs": name}},
            "template": {
                "metadata": {"labels": {"e2e.kube-node.io/rs": name}},
                "spec": {
                    "automountServiceAccountToken": false,
                    // Never scheduled (the suite's clusters need no kubelet): creation only.
                    "nodeSelector": {"e2e.kube-node.io/never": "true"},
                    "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}],
                },
            },
        },
    }))
    .expect("ReplicaSet")
}

fn nodeset(name: &str, class: &str) -> NodeSet {
    serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": name, "labels": {SUITE_LABEL: "true"}},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"e2e.kube-node.io/set": name}},
            "template": {
                "metadata": {"labels": {"e2e.kube-node.io/set": name, SUITE_LABEL: "true"}},
                "spec": {"nodeClassName": class}
            }
        }
    }))
    .expect("NodeSet")
}

/// Makes the API server quiet for the next side: restarts the control plane with
/// `KUBE_NODE_E2E_RESTART`, or else waits until it has seen no write for 5 s. Says which.
async fn quiet_server(client: &kube::Client) -> String {
    if let Ok(cmd) = std::env::var("KUBE_NODE_E2E_RESTART")
        && !cmd.trim().is_empty()
    {
        let status = tokio::process::Command::new("sh")
            .args(["-c", &cmd])
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .expect("KUBE_NODE_E2E_RESTART runs");
        assert!(
            status.success(),
            "KUBE_NODE_E2E_RESTART ({cmd}) failed: {status}"
        );
        eventually(
            "the API server serves again",
            Duration::from_secs(120),
            || {
                let c = client.clone();
                async move { c.apiserver_version().await.is_ok() }
            },
        )
        .await;
        return format!("control plane restarted (`{cmd}`)");
    }
    let started = Instant::now();
    let mut last = writes_seen(client).await;
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(5) {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the API server kept taking writes for 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = writes_seen(client).await;
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    format!(
        "no control-plane restart (KUBE_NODE_E2E_RESTART unset): waited {:.0} s until the API server had seen no write for 5 s",
        started.elapsed().as_secs_f64()
    )
}

/// Every write the API server has served (its `apiserver_request_total`), but leader
/// election's Lease renewals, which never stop.
async fn writes_seen(client: &kube::Client) -> u64 {
    let req = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let body = client.request_text(req).await.unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            ["\"POST\"", "\"PUT\"", "\"PATCH\"", "\"DELETE\""]
                .iter()
                .any(|v| l.contains(v))
        })
        .filter(|l| !l.contains("resource=\"leases\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Makes sure the ReplicaSet controller is up (after a restart its caches sync first): a
/// one-Pod ReplicaSet gets its Pod, then goes.
async fn warm_up_replica_sets(client: &kube::Client, namespace: &str, name: &str) {
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    rs_api
        .create(&PostParams::default(), &replica_set(name, 1))
        .await
        .expect("warm-up ReplicaSet");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("e2e.kube-node.io/rs={name}");
    eventually(
        "the warm-up ReplicaSet's Pod",
        Duration::from_secs(120),
        || {
            let (pods, selector) = (pods.clone(), selector.clone());
            async move {
                pods.list(&ListParams::default().labels(&selector))
                    .await
                    .is_ok_and(|l| !l.items.is_empty())
            }
        },
    )
    .await;
    let _ = rs_api.delete(name, &DeleteParams::foreground()).await;
    eventually("the warm-up Pod gone", Duration::from_secs(120), || {
        let (pods, selector) = (pods.clone(), selector.clone());
        async move {
            pods.list(&ListParams::default().labels(&selector))
                .await
                .is_ok_and(|l| l.items.is_empty())
        }
    })
    .await;
}

/// When the NodeSet's `status.readyReplicas` first reached `n`, polled every 50 ms: one small
/// GET each time, where a watch of every Node's full status would itself load the server the
/// figure is taken on.
async fn ready_replicas_reached(
    sets: &Api<NodeSet>,
    name: &str,
    n: i32,
    limit: Duration,
) -> Instant {
    let start = Instant::now();
    loop {
        let ready = sets
            .get_status(name)
            .await
            .ok()
            .and_then(|s| s.status)
            .map_or(0, |s| s.ready_replicas);
        if ready >= n {
            return Instant::now();
        }
        assert!(
            start.elapsed() < limit,
            "Nodes Ready: readyReplicas {ready} of {n} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn creating_1000_nodes_takes_as_long_as_the_replica_set_controller_creating_1000_pods() {
    let Some(env) = setup("perf").await else {
        return;
    };
    let n: usize = env_num("KUBE_NODE_E2E_SCALE_N", 1000);
    let qps: f64 = env_num("KUBE_NODE_E2E_KCM_QPS", 20.0);
    let burst: u32 = env_num("KUBE_NODE_E2E_KCM_BURST", 30);
    let replicas = i32::try_from(n).expect("KUBE_NODE_E2E_SCALE_N fits an i32");
    let client = env.client.clone();
    // Bounds for the waits: generous at low rates, never unbounded.
    let create_limit = Duration::from_secs_f64(60.0 + 3.0 * n as f64 / qps.max(1.0));
    let ready_limit = Duration::from_secs_f64(120.0 + 12.0 * n as f64 / qps.max(1.0));

    // 1. kube-node: N Nodes created, their machines launched and their kubelets (simulated, in
    // the kube-node process, on a client of their own) Ready, at the controller-manager's rate
    // limit, on a server that has done nothing else yet.
    let quiet_before_nodes = quiet_server(&client).await;
    let class = env.name("e2e-perf-class");
    apply_class(
        &client,
        &simulated_class(
            &class,
            json!({"provider": {"simulated": {"bootDelay": "0s"}}}),
        ),
    )
    .await;
    let mut opts = RunOptions::new(&env, "e2e-perf");
    opts.extra = vec![
        "--kube-qps".into(),
        qps.to_string(),
        "--kube-burst".into(),
        burst.to_string(),
    ];
    let mut kn = spawn_leader(&env, opts).await;
    let set = env.name("e2e-perf");
    let sets: Api<NodeSet> = Api::all(client.clone());
    sets.create(&PostParams::default(), &nodeset(&set, &class))
        .await
        .expect("NodeSet created");
    let selector = format!("e2e.kube-node.io/set={set}");
    let nodes = Counter::start(
        Api::<PartialObjectMeta<Node>>::all(client.clone()),
        &selector,
        n,
    )
    .await;
    let creates_before = kn
        .metric_with("kube_node_provider_requests_total", &["method=\"create\""])
        .await
        .unwrap_or_default();
    let started = Instant::now();
    sets.patch_scale(
        &set,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .expect("scaled");
    // From kube-node's own metrics, one scrape every 50 ms (a poller is load on the machine
    // under test, and the ReplicaSet side has none): the Nth Node create answered (the
    // nodeset-controller's count; the watch below sees each Node only once the API server
    // has sent it, and under load that is seconds later, so both sides' headline figures use
    // the watch, for the same method on each side; this one is printed beside it), and the Nth
    // provider create.
    let polled = {
        let metrics = kn.metrics;
        tokio::spawn(async move {
            let (mut answered, mut launched) = (None, None);
            loop {
                if let Some((status, body)) = support::http_get(metrics, "/metrics").await
                    && status == 200
                {
                    let now = Instant::now();
                    let value = |name: &str, labels: &[&str]| {
                        support::metric_in(&body, name, labels).unwrap_or_default()
                    };
                    if answered.is_none()
                        && value("kube_node_nodeset_node_creates_total", &[]) >= n as f64
                    {
                        answered = Some(now);
                    }
                    if launched.is_none()
                        && value("kube_node_provider_requests_total", &["method=\"create\""])
                            - creates_before
                            >= n as f64
                    {
                        launched = Some(now);
                    }
                    if let (Some(a), Some(l)) = (answered, launched) {
                        return (a, l);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let nodes_at = nodes
        .wait_reached("Nodes created by the nodeset-controller", create_limit)
        .await;
    let node_secs = nodes_at.duration_since(started).as_secs_f64();
    let (answered_at, launched_at) = tokio::time::timeout(create_limit, polled)
        .await
        .expect("the Nth Node create and the Nth provider create within the limit")
        .expect("metrics poller");
    let launch_secs = launched_at.duration_since(started).as_secs_f64();
    let answered_secs = answered_at.duration_since(started).as_secs_f64();
    let ready_at = ready_replicas_reached(&sets, &set, replicas, ready_limit).await;
    let ready_secs = ready_at.duration_since(started).as_secs_f64();
    kn.assert_running();
    // Settle: no late create may follow (the expectations hold the count at N).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(nodes.count(), n, "exactly {n} Nodes");
    assert_eq!(nodes.max_seen(), n, "never more than {n} Nodes on the way");

    // Teardown of this side before the other is measured: kube-node deletes the machines and
    // lets the Nodes go, then stops.
    sets.delete(&set, &DeleteParams::background())
        .await
        .expect("NodeSet deleted");
    eventually("every Node gone", Duration::from_secs(600), || {
        let c = nodes.count();
        async move { c == 0 }
    })
    .await;
    let left = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list Nodes");
    assert!(left.items.is_empty(), "{} Nodes left", left.items.len());
    delete_class_and_wait(&client, &class).await;
    kn.kill();
    drop(nodes);

    // 2. kube-controller-manager's ReplicaSet controller creates N Pods, alone on a quiet
    // server.
    let quiet_before_pods = quiet_server(&client).await;
    warm_up_replica_sets(&client, &env.namespace, &env.name("e2e-perf-warm")).await;
    let rs_name = env.name("e2e-perf-rs");
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &env.namespace);
    let pods = Counter::start(
        Api::<PartialObjectMeta<Pod>>::namespaced(client.clone(), &env.namespace),
        &format!("e2e.kube-node.io/rs={rs_name}"),
        n,
    )
    .await;
    let started = Instant::now();
    rs_api
        .create(&PostParams::default(), &replica_set(&rs_name, replicas))
        .await
        .expect("ReplicaSet created");
    let pods_at = pods
        .wait_reached("Pods created by the ReplicaSet controller", create_limit)
        .await;
    let pod_secs = pods_at.duration_since(started).as_secs_f64();

    println!(
        "e2e scale, {n} replicas, kube-node and kube-controller-manager both at {qps} QPS, burst {burst} \
         (KUBE_NODE_E2E_KCM_QPS/BURST must match the cluster's kube-controller-manager flags):"
    );
    println!("  before the kube-node side: {quiet_before_nodes}");
    println!("  before the ReplicaSet side: {quiet_before_pods}");
    println!("  ReplicaSet controller: {n} Pods created           {pod_secs:>7.2} s");
    println!(
        "  nodeset-controller: {n} Nodes created              {node_secs:>7.2} s  ({:.2} x the Pods; target <= 1.0)",
        node_secs / pod_secs
    );
    println!(
        "    (the {n}th Node create answered, the nodeset-controller's own count: {answered_secs:.2} s)"
    );
    println!(
        "  {n} Nodes Ready (simulated kubelet, boot 0 s)       {ready_secs:>7.2} s  ({:.2} x the Pods; target <= 4.0)",
        ready_secs / pod_secs
    );
    println!(
        "  {n}th provider create issued                       {launch_secs:>7.2} s  ({:.2} x the Nodes' creation; target <= 1.5)",
        launch_secs / node_secs
    );

    // Cleanup: Pods through the garbage collector (and the namespace's deletion).
    let _ = rs_api.delete(&rs_name, &DeleteParams::background()).await;
    drop(pods);
    env.finish().await;
}
