//! The replacement backoff of a NodeSet whose machines never register, against the embedded
//! API with the real node-controller, nodeset-controller and simulated provider (issue #18).
//!
//! Durations are the scaled down twentyfold so the test is short: registration
//! timeout 20 s → 1 s, backoff base 30 s → 1.5 s, max 30 min → 90 s, and "10 minutes" →
//! 30 s. Before the backoff, every Failed Node was replaced at once: about one launch per
//! registration timeout (plus the replacement's latency) per replica; this scenario measured
//! 46 launches in the window on the code before the change. The bounds asserted are upper
//! bounds, so a slow machine only makes the test pass more easily.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_node::harness::Harness;
use kube_node_crds::names::{BACKOFF_CONDITION, BACKOFF_EVENT_REASON, CIRCUIT_BREAKER_CONDITION};
use kube_node_crds::v1alpha1::find_condition;
use kube_node_crds::{NodeClass, NodeSet};
use kube_node_provider_simulated::SimulatedCloud;
use serde_json::json;

/// Ten minutes of the scenario, scaled down twentyfold.
const WINDOW: Duration = Duration::from_secs(30);
/// The backoff base of the scenario, in seconds.
const BASE_SECS: f64 = 1.5;

/// The shared harness (embedded API, both controllers, the simulated cloud and its kubelet),
/// with the fixtures this scenario needs.
struct Cluster {
    harness: Harness,
    client: Client,
    cloud: SimulatedCloud,
}

impl Cluster {
    async fn start() -> Self {
        kube_node::harness::init_test_logging();
        let harness = Harness::builder()
            .node_config(node_controller::Config {
                cluster_name: "backoff".into(),
                api_server_endpoint: Some("backoff-apiserver:6443".into()),
                ..Default::default()
            })
            .start()
            .await
            .expect("harness");
        Self {
            client: harness.client.clone(),
            cloud: harness.cloud.clone(),
            harness,
        }
    }

    async fn stop(self) {
        self.harness
            .shutdown()
            .await
            .expect("controllers stop cleanly");
    }

    async fn create<K>(&self, obj: serde_json::Value) -> K
    where
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let obj: K = serde_json::from_value(obj).expect("fixture parses");
        Api::<K>::all(self.client.clone())
            .create(&PostParams::default(), &obj)
            .await
            .expect("create fixture")
    }

    async fn nodeset(&self, name: &str) -> NodeSet {
        Api::<NodeSet>::all(self.client.clone())
            .get(name)
            .await
            .expect("NodeSet")
    }

    /// Nodes of the NodeSet (by its label).
    async fn nodes(&self, nodeset: &str) -> Vec<Node> {
        Api::<Node>::all(self.client.clone())
            .list(&ListParams::default().labels(&format!("kube-node.io/nodeset={nodeset}")))
            .await
            .expect("list Nodes")
            .items
    }
}

/// A simulated NodeClass whose kubelets never register, with a 1 s registration timeout.
fn never_registering_class(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": name},
        "spec": {
            "provider": {"type": "simulated", "simulated": {"register": false}},
            "timeouts": {"registration": "1s"},
        },
    })
}

fn nodeset(name: &str, class: &str, replicas: i32, max_unhealthy: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"pool": name}},
            "template": {"metadata": {"labels": {"pool": name}}, "spec": {"nodeClassName": class}},
            "maxUnhealthy": max_unhealthy,
            "replacementBackoff": {"base": "1500ms", "max": "90s"},
        },
    })
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
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
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition<'a>(
    ns: &'a NodeSet,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    ns.status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, type_))
}

/// Whether the node-controller marked the Node's machine Failed.
fn failed(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "MachineReady" && c.reason.as_deref() == Some("Failed"))
        })
}

fn failures(ns: &NodeSet) -> i32 {
    ns.status
        .as_ref()
        .and_then(|s| s.backoff.as_ref())
        .map_or(0, |b| b.consecutive_failures)
}

/// The bound of the issue: launches in a window T are at most
/// `replicas + log2(T / base + 1) + 1`.
fn launch_bound(replicas: usize, window: Duration) -> usize {
    let steps = (window.as_secs_f64() / BASE_SECS + 1.0).log2();
    replicas + steps.floor() as usize + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_registering_machines_back_off_then_a_success_and_a_class_edit_reset() {
    let cluster = Cluster::start().await;
    cluster
        .create::<NodeClass>(never_registering_class("broken"))
        .await;
    cluster
        .create::<NodeSet>(nodeset("workers", "broken", 3, "100%"))
        .await;

    // Ten (scaled) minutes of machines that never register.
    tokio::time::sleep(WINDOW).await;
    let launches = cluster.cloud.launches() as usize;
    let bound = launch_bound(3, WINDOW);
    println!(
        "launches in {WINDOW:?} (10 minutes scaled 1:20): {launches}; bound {bound}; \
         46 measured before the backoff existed"
    );
    assert!(
        launches <= bound,
        "{launches} launches in {WINDOW:?}, more than {bound}"
    );
    assert!(launches >= 4, "a probe is launched once the backoff is due");

    // The backoff is said: status, condition, events.
    let ns = cluster.nodeset("workers").await;
    let b = ns
        .status
        .as_ref()
        .and_then(|s| s.backoff.clone())
        .expect("status.backoff");
    assert!(b.consecutive_failures >= 3, "{b:?}");
    assert_eq!(
        b.last_failure_reason.as_deref(),
        Some("RegistrationTimeout"),
        "{b:?}"
    );
    assert!(b.next_attempt_time.is_some(), "{b:?}");
    let c = condition(&ns, BACKOFF_CONDITION).expect("Backoff condition");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "RegistrationTimeout")
    );
    assert!(
        c.message.contains(&format!(
            "{} consecutive machines failed",
            b.consecutive_failures
        )) && c.message.contains("next attempt at"),
        "{}",
        c.message
    );
    let breaker = condition(&ns, CIRCUIT_BREAKER_CONDITION).expect("breaker condition");
    assert_eq!(breaker.status, "False", "maxUnhealthy 100% never opens");
    let events: Vec<Event> = Api::<Event>::all(cluster.client.clone())
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(BACKOFF_EVENT_REASON))
        .collect();
    assert!(!events.is_empty(), "a Warning per backoff step");
    assert!(
        events.len() <= b.consecutive_failures as usize,
        "one event per step, not per retry: {} events for {} failures",
        events.len(),
        b.consecutive_failures
    );
    assert!(events.iter().all(|e| e.type_.as_deref() == Some("Warning")));

    // A success resets it: the kubelet of the next launched machine reports Ready (say the
    // firewall was fixed). The test plays that kubelet; should the node-controller's 1 s
    // registration timeout win the race, it tries the next probe.
    let nodes: Api<Node> = Api::all(cluster.client.clone());
    let mut reset = false;
    for _ in 0..3 {
        let probe = eventually(Duration::from_secs(150), "a probe machine", || async {
            cluster
                .nodes("workers")
                .await
                .into_iter()
                .find(|n| {
                    n.metadata.deletion_timestamp.is_none()
                        && n.spec
                            .as_ref()
                            .and_then(|s| s.provider_id.as_ref())
                            .is_some()
                        && !failed(n)
                })
                .map(|n| n.name_any())
        })
        .await;
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
        let patched = nodes
            .patch_status(
                &probe,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "played by the test",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }]}})),
            )
            .await
            .expect("mark the probe Ready");
        if failed(&patched) {
            continue;
        }
        eventually(
            Duration::from_secs(30),
            "the backoff reset by a success",
            || async {
                let ns = cluster.nodeset("workers").await;
                let c = condition(&ns, BACKOFF_CONDITION)?;
                (failures(&ns) == 0 && c.status == "False").then_some(())
            },
        )
        .await;
        reset = true;
        break;
    }
    assert!(reset, "a machine reaching Ready resets the backoff");

    // The other replicas are replaced at once, fail again, and the backoff builds up again
    // until the next launch waits at least 1.5 s × 2^3 = 12 s.
    eventually(Duration::from_secs(60), "the backoff again", || async {
        (failures(&cluster.nodeset("workers").await) >= 4).then_some(())
    })
    .await;

    // An edit of the NodeClass (a new generation) starts over, although nothing succeeded:
    // the Failed Nodes are replaced at once, more than one launch within 10 s where the
    // backoff would allow at most one.
    let launches_before = cluster.cloud.launches();
    let class_api: Api<NodeClass> = Api::all(cluster.client.clone());
    let edited = class_api
        .patch(
            "broken",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"labels": {"edited": "yes"}}})),
        )
        .await
        .expect("edit the NodeClass");
    let generation = edited.metadata.generation;
    eventually(
        Duration::from_secs(10),
        "replacements after the edit",
        || async { (cluster.cloud.launches() >= launches_before + 2).then_some(()) },
    )
    .await;
    let ns = cluster.nodeset("workers").await;
    let b = ns.status.as_ref().and_then(|s| s.backoff.clone());
    assert_eq!(
        b.and_then(|b| b.node_class_generation),
        generation,
        "the backoff counts against the new generation"
    );
    cluster.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_counts_late_nodes_and_stops_a_class_where_everything_fails() {
    // The NodeSet: 3 replicas, maxUnhealthy 40% (2). Before, the failures arrived
    // one at a time and the breaker never opened.
    let cluster = Cluster::start().await;
    cluster
        .create::<NodeClass>(never_registering_class("broken"))
        .await;
    cluster
        .create::<NodeSet>(nodeset("workers", "broken", 3, "40%"))
        .await;
    eventually(Duration::from_secs(30), "the breaker open", || async {
        let ns = cluster.nodeset("workers").await;
        let c = condition(&ns, CIRCUIT_BREAKER_CONDITION)?;
        (c.status == "True").then(|| c.message.clone())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Machines launched, not create calls: a pass whose providerID write lost a race repeats
    // its (idempotent) create for the same machine.
    assert_eq!(
        cluster.cloud.launches(),
        3,
        "nothing is replaced while the breaker is open ({} create calls)",
        cluster.cloud.create_calls()
    );
    cluster.stop().await;
}
