//! The node-controller against the embedded API server and the simulated cloud (moved here from
//! `node-controller/tests/` to use the one harness, which `cargo test -p node-controller` must
//! not compile: it wires every backend).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{
    AUTOSCALER_UNREGISTERED_TAINT, INSTANCE_ID_ANNOTATION, MACHINE_FINALIZER,
    MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION, UNREGISTERED_TAINT, tags,
};
use kube_node_embedded_api::EmbeddedApi;
use kube_node_provider::{CreateRequest, Provider, ResolvedClass};
use kube_node_provider_simulated::{KubeletConfig, SimulatedCloud};
use node_controller::{Config, Metrics};
use serde_json::json;

const CLUSTER: &str = "test-cluster";

/// The node-controller alone (no nodeset-controller) with the simulated cloud and kubelet.
struct Harness {
    cluster: kube_node::harness::Harness,
    api: EmbeddedApi,
    client: Client,
    cloud: SimulatedCloud,
    metrics: Metrics,
}

fn config() -> Config {
    Config {
        cluster_name: CLUSTER.to_string(),
        api_server_endpoint: Some("10.0.0.1:6443".to_string()),
        orphan_min_age: Duration::from_secs(600),
        orphan_max_fraction: 0.2,
        orphan_gc_interval: Duration::from_millis(500),
        concurrency: 8,
        synced: None,
        ..Config::default()
    }
}

impl Harness {
    async fn new(config: Config) -> Self {
        Self::new_with(config, true).await
    }

    async fn new_with(config: Config, start: bool) -> Self {
        kube_node::harness::init_test_logging();
        let builder = kube_node::harness::Harness::builder()
            .node_config(config)
            .without_nodeset_controller()
            .kubelet(KubeletConfig {
                scan_interval: Duration::from_millis(100),
                ..KubeletConfig::default()
            });
        let builder = if start {
            builder
        } else {
            builder.controllers_stopped()
        };
        let cluster = builder.start().await.expect("cluster");
        Self {
            api: cluster.api.clone(),
            client: cluster.client.clone(),
            cloud: cluster.cloud.clone(),
            metrics: cluster.node_metrics.clone(),
            cluster,
        }
    }

    fn start(&mut self) {
        self.cluster.start_controllers();
    }

    async fn stop(&mut self) {
        self.cluster
            .stop_controllers()
            .await
            .expect("controller stops");
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    async fn node_class(&self, name: &str, spec: serde_json::Value) {
        self.cluster
            .create_node_class(name, spec)
            .await
            .expect("create nodeclass");
    }

    async fn node(&self, name: &str, class: &str) -> Node {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "annotations": {NODE_CLASS_ANNOTATION: class}},
        }))
        .expect("node");
        self.nodes()
            .create(&PostParams::default(), &node)
            .await
            .expect("create node")
    }

    async fn events(&self, reason: &str) -> Vec<K8sEvent> {
        Api::<K8sEvent>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    async fn token_secrets(&self) -> Vec<Secret> {
        Api::<Secret>::namespaced(self.client.clone(), "kube-system")
            .list(&ListParams::default())
            .await
            .expect("secrets")
            .items
            .into_iter()
            .filter(|s| s.type_.as_deref() == Some("bootstrap.kubernetes.io/token"))
            .collect()
    }

    fn resolved(&self, class: &str, spec: serde_json::Value) -> ResolvedClass {
        ResolvedClass {
            name: class.to_string(),
            generation: 1,
            spec: serde_json::from_value(spec).expect("spec"),
            credentials: None,
            cluster_name: CLUSTER.to_string(),
            inventory: None,
            claims: None,
        }
    }

    /// Creates a machine behind the controller's back, as a previous incarnation would have.
    async fn create_machine(
        &self,
        class: &str,
        spec: serde_json::Value,
        uid: &str,
        node: &str,
    ) -> String {
        let provider = self
            .cloud
            .provider(&self.resolved(class, spec))
            .expect("provider");
        let req = CreateRequest {
            idempotency_key: uid.to_string(),
            node_name: node.to_string(),
            tags: BTreeMap::from([
                (tags::CLUSTER.to_string(), CLUSTER.to_string()),
                (tags::NODE_NAME.to_string(), node.to_string()),
                (tags::NODE_UID.to_string(), uid.to_string()),
                (tags::NODE_CLASS.to_string(), class.to_string()),
                (
                    tags::MANAGED_BY.to_string(),
                    tags::MANAGED_BY_VALUE.to_string(),
                ),
            ]),
            user_data: None,
        };
        provider.create(&req).await.expect("create").provider_id
    }
}

/// Polls `f` until it yields Some, for at most `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn machine_phase(n: &Node) -> Option<(String, String, String)> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == MACHINE_READY_CONDITION)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

async fn wait_phase(h: &Harness, name: &str, phase: &str, secs: u64) -> Node {
    eventually(secs, &format!("{name} in phase {phase}"), || async {
        let n = h.nodes().get_opt(name).await.ok()??;
        (machine_phase(&n)?.1 == phase).then_some(n)
    })
    .await
}

/// Waits until the Node `name` is gone from the API server.
async fn wait_gone(h: &Harness, name: &str, secs: u64) {
    eventually(secs, &format!("{name} gone"), || async {
        h.nodes().get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

fn sim_spec(extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "provider": {"type": "simulated", "simulated": {"zones": ["zone-a"], "instanceType": "sim.small"}},
        "labels": {"example.com/pool": "general"},
        "taints": [{"key": "example.com/dedicated", "value": "batch", "effect": "NoSchedule"}],
        "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        "timeouts": {"registration": "30s", "drain": "3s"},
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    spec
}

fn taint_keys(n: &Node) -> Vec<String> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| t.key)
        .collect()
}

async fn pod(client: &Client, name: &str, node: &str, app: &str) {
    let p: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}],
                 "tolerations": [{"operator": "Exists"}]},
    }))
    .expect("pod");
    Api::<Pod>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &p)
        .await
        .expect("create pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_becomes_ready_then_drains_and_goes() {
    let h = Harness::new(config()).await;
    h.node_class("general", sim_spec(json!({}))).await;
    h.node("worker-1", "general").await;

    let n = wait_phase(&h, "worker-1", "Ready", 20).await;
    let pid = n
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .expect("providerID");
    assert!(n.annotations().contains_key(INSTANCE_ID_ANNOTATION));
    assert_eq!(machine_phase(&n).expect("cond").0, "True");
    assert!(n.finalizers().iter().any(|f| f == MACHINE_FINALIZER));
    // Labels and taints of the class; the unregistered taint is gone once Ready.
    let n = eventually(10, "labels and taints", || async {
        let n = h.nodes().get("worker-1").await.ok()?;
        let ok = n.labels().get("example.com/pool").map(String::as_str) == Some("general")
            && n.labels()
                .get("node.kubernetes.io/instance-type")
                .map(String::as_str)
                == Some("sim.small")
            && n.labels()
                .get("topology.kubernetes.io/zone")
                .map(String::as_str)
                == Some("zone-a")
            && taint_keys(&n).contains(&"example.com/dedicated".to_string())
            && !taint_keys(&n).contains(&UNREGISTERED_TAINT.to_string())
            // The autoscaler's marker goes in the same write.
            && !taint_keys(&n).contains(&AUTOSCALER_UNREGISTERED_TAINT.to_string());
        ok.then_some(n)
    })
    .await;
    let _ = n;
    eventually(10, "token secret deleted", || async {
        h.token_secrets().await.is_empty().then_some(())
    })
    .await;
    assert_eq!(h.cloud.machine_count(), 1);
    // A routine transition writes no event: the condition says it.
    assert_eq!(
        machine_phase(&h.nodes().get("worker-1").await.expect("node"))
            .expect("cond")
            .1,
        "Ready"
    );

    // Two pods; a PodDisruptionBudget blocks one of them.
    pod(&h.client, "free", "worker-1", "free").await;
    pod(&h.client, "guarded", "worker-1", "guarded").await;
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "guard", "namespace": "default"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
    }))
    .expect("pdb");
    Api::<PodDisruptionBudget>::namespaced(h.client.clone(), "default")
        .create(&PostParams::default(), &pdb)
        .await
        .expect("pdb");

    h.nodes()
        .delete("worker-1", &DeleteParams::default())
        .await
        .expect("delete");
    let pods = Api::<Pod>::namespaced(h.client.clone(), "default");
    eventually(10, "cordon and first eviction", || async {
        let n = h.nodes().get("worker-1").await.ok()?;
        let cordoned = n.spec.as_ref()?.unschedulable == Some(true);
        let free_gone = pods
            .get_opt("free")
            .await
            .ok()?
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
        (cordoned && free_gone).then_some(())
    })
    .await;
    // The guarded pod is still there while the drain waits, and so is the machine.
    let guarded = pods.get_opt("guarded").await.expect("get");
    assert!(guarded.is_some_and(|p| p.metadata.deletion_timestamp.is_none()));
    assert_eq!(
        h.cloud.machine_count(),
        1,
        "machine kept while the drain waits"
    );

    // Then the drain timeout (3s) passes: the machine goes, and so does the Node.
    wait_gone(&h, "worker-1", 20).await;
    assert!(!h.events("DrainTimeout").await.is_empty());
    assert!(!h.events("MachineDeleted").await.is_empty());
    assert!(h.cloud.machines().iter().all(|m| m.provider_id != pid));
    assert_eq!(h.cloud.machine_count(), 0);
    assert!(h.token_secrets().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_between_create_and_provider_id_makes_one_machine() {
    let mut h = Harness::new_with(config(), false).await;
    h.node_class("general", sim_spec(json!({}))).await;
    let node = h.node("worker-1", "general").await;
    let uid = node.uid().expect("uid");
    // A previous controller created the machine and died before writing the providerID.
    let first = h
        .create_machine("general", sim_spec(json!({})), &uid, "worker-1")
        .await;
    assert_eq!(h.cloud.machine_count(), 1);

    h.start();
    let n = wait_phase(&h, "worker-1", "Ready", 20).await;
    assert_eq!(
        n.spec.as_ref().and_then(|s| s.provider_id.clone()),
        Some(first)
    );
    assert_eq!(h.cloud.machine_count(), 1);

    // And a restart of this controller does not create another.
    h.stop().await;
    h.start();
    wait_phase(&h, "worker-1", "Ready", 5).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.cloud.machine_count(), 1);
}

/// A pass that runs before the Node cache shows the controller's own providerID write (the
/// watch lags longer than the pass's requeue) neither creates the machine again nor rewrites
/// the providerID; and a Node deleted in that window still has its machine deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_behind_the_provider_id_write_repeats_no_create() {
    let h = Harness::new(config()).await;
    h.node_class("general", sim_spec(json!({}))).await;
    h.api.set_watch_lag(Duration::from_millis(1500));
    for i in 0..4 {
        h.node(&format!("worker-{i}"), "general").await;
    }
    for i in 0..4 {
        wait_phase(&h, &format!("worker-{i}"), "Ready", 30).await;
    }
    assert_eq!(h.cloud.launches(), 4);
    assert_eq!(
        h.cloud.create_calls(),
        4,
        "no create was repeated for a machine the controller had made"
    );

    // Deleted before the cache shows its providerID: found without a list.
    h.node("worker-late", "general").await;
    eventually(10, "worker-late's machine", || async {
        (h.cloud.launches() == 5).then_some(())
    })
    .await;
    h.nodes()
        .delete("worker-late", &DeleteParams::default())
        .await
        .expect("delete");
    wait_gone(&h, "worker-late", 30).await;
    h.api.set_watch_lag(Duration::ZERO);
    assert_eq!(
        h.cloud.machine_count(),
        4,
        "worker-late's machine is deleted"
    );
    assert_eq!(h.cloud.create_calls(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_after_a_crash_finds_the_machine_by_its_tag() {
    let mut h = Harness::new_with(config(), false).await;
    h.node_class("general", sim_spec(json!({}))).await;
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "worker-1", "annotations": {NODE_CLASS_ANNOTATION: "general"},
                     "finalizers": [MACHINE_FINALIZER]},
    }))
    .expect("node");
    let node = h
        .nodes()
        .create(&PostParams::default(), &node)
        .await
        .expect("node");
    // The crashed controller had said Launching, created the machine, and died.
    let status = json!({"status": {"conditions": [{"type": MACHINE_READY_CONDITION, "status": "False",
        "reason": "Launching", "message": "creating the machine"}]}});
    h.nodes()
        .patch_status(
            "worker-1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(&status),
        )
        .await
        .expect("status");
    h.create_machine(
        "general",
        sim_spec(json!({})),
        &node.uid().expect("uid"),
        "worker-1",
    )
    .await;
    h.nodes()
        .delete("worker-1", &DeleteParams::default())
        .await
        .expect("delete");

    h.start();
    wait_gone(&h, "worker-1", 15).await;
    assert_eq!(h.cloud.machine_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_orphans_go_young_ones_and_owned_ones_stay() {
    let mut cfg = config();
    cfg.orphan_min_age = Duration::from_secs(2);
    cfg.orphan_gc_interval = Duration::from_secs(30);
    cfg.orphan_max_fraction = 0.5;
    let mut h = Harness::new_with(cfg, false).await;
    h.node_class("general", sim_spec(json!({}))).await;
    let node = h.node("worker-1", "general").await;
    let owned = h
        .create_machine(
            "general",
            sim_spec(json!({})),
            &node.uid().expect("uid"),
            "worker-1",
        )
        .await;
    let old = h
        .create_machine("general", sim_spec(json!({})), "uid-of-a-gone-node", "gone")
        .await;
    tokio::time::sleep(Duration::from_millis(2100)).await; // age the machines past min age
    let young = h
        .create_machine(
            "general",
            sim_spec(json!({})),
            "uid-of-another-gone-node",
            "gone-2",
        )
        .await;

    h.start(); // the first wave runs as soon as the Node cache has synced
    eventually(5, "old orphan deleted", || async {
        h.cloud
            .machines()
            .iter()
            .all(|m| m.provider_id != old)
            .then_some(())
    })
    .await;
    let ids: Vec<String> = h
        .cloud
        .machines()
        .into_iter()
        .map(|m| m.provider_id)
        .collect();
    assert!(ids.contains(&owned), "machine of an existing Node kept");
    assert!(ids.contains(&young), "young machine kept");
    assert_eq!(h.metrics.orphan_actions("deleted"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_holds_when_most_nodes_vanish() {
    let mut cfg = config();
    cfg.orphan_min_age = Duration::from_secs(1);
    let mut h = Harness::new_with(cfg, false).await;
    h.node_class("general", sim_spec(json!({}))).await;
    let node = h.node("worker-1", "general").await;
    h.create_machine(
        "general",
        sim_spec(json!({})),
        &node.uid().expect("uid"),
        "worker-1",
    )
    .await;
    for i in 0..4 {
        h.create_machine(
            "general",
            sim_spec(json!({})),
            &format!("vanished-{i}"),
            &format!("v{i}"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await; // age the machines past min age
    h.start();
    eventually(10, "paused event", || async {
        (!h.events("OrphanCollectionPaused").await.is_empty()).then_some(())
    })
    .await;
    assert!(h.metrics.orphan_actions("paused") >= 1);
    assert_eq!(h.metrics.orphan_actions("deleted"), 0);
    assert_eq!(h.cloud.machine_count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_timeout_marks_failed_and_keeps_the_machine() {
    let h = Harness::new(config()).await;
    h.node_class(
        "silent",
        sim_spec(json!({
            "provider": {"type": "simulated", "simulated": {"register": false}},
            "timeouts": {"registration": "2s"},
        })),
    )
    .await;
    h.node("worker-1", "silent").await;
    let n = wait_phase(&h, "worker-1", "Failed", 15).await;
    assert!(
        machine_phase(&n)
            .expect("cond")
            .2
            .contains("did not report Ready")
    );
    assert!(taint_keys(&n).contains(&UNREGISTERED_TAINT.to_string()));
    // A hand-made Node waiting for its kubelet has Ready=Unknown (written with Launching), never
    // no Ready at all: kube-controller-manager 1.28 can panic on such a Node.
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .expect("a Ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("Unknown", Some("NodeStatusNeverUpdated"))
    );
    assert!(!h.events("RegistrationTimeout").await.is_empty());
    assert_eq!(
        h.cloud.machine_count(),
        1,
        "a standalone Node keeps its machine"
    );

    // The token was never Ready-cleaned here, so it is still around: it must appear nowhere
    // but in its Secret.
    let secrets = h.token_secrets().await;
    assert_eq!(secrets.len(), 1);
    let data = secrets[0].data.clone().expect("data");
    let token = String::from_utf8(data["token-secret"].0.clone()).expect("utf8");
    let node_json =
        serde_json::to_string(&h.nodes().get("worker-1").await.expect("node")).expect("json");
    assert!(!node_json.contains(&token), "token leaked into the Node");
    let events = Api::<K8sEvent>::all(h.client.clone())
        .list(&ListParams::default())
        .await
        .expect("events");
    assert!(
        !serde_json::to_string(&events.items)
            .expect("json")
            .contains(&token),
        "token leaked into events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanished_machine_is_reported() {
    let h = Harness::new(config()).await;
    h.node_class("general", sim_spec(json!({}))).await;
    h.node("worker-1", "general").await;
    let n = wait_phase(&h, "worker-1", "Ready", 20).await;
    let pid = n.spec.and_then(|s| s.provider_id).expect("pid");
    assert!(h.cloud.terminate_out_of_band(&pid));
    let n = wait_phase(&h, "worker-1", "Failed", 10).await;
    assert!(machine_phase(&n).expect("cond").2.contains("vanished"));
    assert!(!h.events("MachineVanished").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_node_classes_leave_nodes_pending_without_a_hot_loop() {
    let h = Harness::new(config()).await;
    h.node("no-class", "missing").await;
    h.node_class(
        "broken",
        json!({"provider": {"type": "simulated", "simulated": {"instanceType": "a/b"}}}),
    )
    .await;
    h.node("bad-config", "broken").await;

    let n = eventually(10, "pending with NodeClassNotFound", || async {
        let n = h.nodes().get("no-class").await.ok()?;
        let (_, reason, msg) = machine_phase(&n)?;
        (reason == "Pending" && msg.contains("NodeClassNotFound")).then_some(n)
    })
    .await;
    assert!(taint_keys(&n).contains(&UNREGISTERED_TAINT.to_string()));
    // A hand-made Node gets the autoscaler's marker along with the unregistered taint.
    assert!(taint_keys(&n).contains(&AUTOSCALER_UNREGISTERED_TAINT.to_string()));
    // `a/b` is not a label value: the NodeClass is set aside as invalid before any provider
    // sees it.
    eventually(10, "pending with NodeClassInvalid", || async {
        let n = h.nodes().get("bad-config").await.ok()?;
        let (_, reason, msg) = machine_phase(&n)?;
        (reason == "Pending"
            && msg.contains("NodeClassInvalid")
            && msg.contains("spec.provider.simulated.instanceType"))
        .then_some(())
    })
    .await;
    assert_eq!(h.cloud.machine_count(), 0);

    // No hot loop: the Nodes are not rewritten while nothing changes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = h.api.stats().writes("nodes");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = h.api.stats().writes("nodes");
    assert!(
        after - before <= 2,
        "nodes rewritten {} times while nothing changed",
        after - before
    );

    // Fixing the class lets the Node proceed.
    let patch = json!({"spec": {"provider": {"simulated": {"instanceType": "sim.small"}}}});
    Api::<NodeClass>::all(h.client.clone())
        .patch(
            "broken",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("fix");
    wait_phase(&h, "bad-config", "Ready", 20).await;
}
