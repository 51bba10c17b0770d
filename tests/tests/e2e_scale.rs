//! Scale figures against the real cluster of `KUBE_NODE_E2E_KUBECONFIG` (skipped, saying so,
//! when unset): the nodeset-controller creating N Nodes against kube-controller-manager's
//! ReplicaSet controller creating N Pods on the same API server, with the same client rate
//! limit. It prints the figures; it asserts only what must hold whatever the speed: exactly N
//! Nodes, never more on the way.
//!
//! Knobs: `KUBE_NODE_E2E_SCALE_N` (1000) and `KUBE_NODE_E2E_KCM_QPS` / `KUBE_NODE_E2E_KCM_BURST`
//! — the `--kube-api-qps` / `--kube-api-burst` the cluster's kube-controller-manager runs with
//! (its defaults, 20 / 30, unless told): kube-node runs with the same while it creates.

#[allow(dead_code)]
#[path = "e2e/support.rs"]
mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
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
    /// Starts watching and returns once the watch has listed (so nothing created later is
    /// missed).
    async fn start<K>(api: Api<K>, selector: &str, target: usize) -> Self
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

    // 1. kube-node creates N Nodes at the controller-manager's rate limit. The machines never
    // register (no simulated kubelet writes), so the API server's work is the controllers'.
    let class = env.name("e2e-perf-class");
    apply_class(
        &client,
        &simulated_class(
            &class,
            json!({"provider": {"simulated": {"bootDelay": "0s", "register": false}}}),
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
    let nodes = Counter::start(
        Api::<Node>::all(client.clone()),
        &format!("e2e.kube-node.io/set={set}"),
        n,
    )
    .await;
    let started = Instant::now();
    sets.patch_scale(
        &set,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .expect("scaled");
    let nodes_at = nodes
        .wait_reached("Nodes created by the nodeset-controller", create_limit)
        .await;
    let node_secs = nodes_at.duration_since(started).as_secs_f64();
    kn.assert_running();
    // Settle: no late create may follow (the expectations hold the count at N).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(nodes.count(), n, "exactly {n} Nodes");
    assert_eq!(nodes.max_seen(), n, "never more than {n} Nodes on the way");

    // 2. kube-controller-manager's ReplicaSet controller creates N Pods on the same server.
    let rs_name = env.name("e2e-perf-rs");
    let rs_api: Api<ReplicaSet> = Api::namespaced(client.clone(), &env.namespace);
    let pods = Counter::start(
        Api::<Pod>::namespaced(client.clone(), &env.namespace),
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
        "e2e scale: {n} Nodes by the nodeset-controller in {node_secs:.2} s; {n} Pods by \
         kube-controller-manager's ReplicaSet controller in {pod_secs:.2} s (ratio {:.2}); both \
         at {qps} QPS, burst {burst} (KUBE_NODE_E2E_KCM_QPS/BURST must match the cluster's \
         kube-controller-manager flags for a fair comparison)",
        node_secs / pod_secs
    );

    // Cleanup. Pods: background deletion through the garbage collector. Nodes: a kube-node
    // without the creation-time rate limit tears the machines down.
    let _ = rs_api.delete(&rs_name, &DeleteParams::background()).await;
    drop(pods);
    kn.kill();
    let mut opts = RunOptions::new(&env, "e2e-perf-cleanup");
    opts.extra = vec![
        "--kube-qps".into(),
        "1000".into(),
        "--kube-burst".into(),
        "2000".into(),
    ];
    let kn = spawn_leader(&env, opts).await;
    sets.delete(&set, &DeleteParams::background())
        .await
        .expect("NodeSet deleted");
    eventually("every Node gone", Duration::from_secs(300), || {
        let c = nodes.count();
        async move { c == 0 }
    })
    .await;
    let left = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("e2e.kube-node.io/set={set}")))
        .await
        .expect("list Nodes");
    assert!(left.items.is_empty(), "{} Nodes left", left.items.len());
    delete_class_and_wait(&client, &class).await;
    drop(kn);
    env.finish().await;
}
