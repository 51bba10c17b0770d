//! The simulated kubelet against the embedded Kubernetes API: registration onto an existing
//! Node, Lease renewals, heartbeats, pods, and stopping when the machine goes.

mod common;

use std::time::Duration;

use common::{class, request};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use kube_node_embedded_api::EmbeddedApi;
use kube_node_provider_simulated::{KubeletConfig, NODE_LEASE_NAMESPACE, SimulatedCloud};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(20);

fn fast() -> KubeletConfig {
    KubeletConfig {
        lease_interval: Duration::from_millis(200),
        status_interval: Duration::from_millis(500),
        scan_interval: Duration::from_millis(50),
        ..KubeletConfig::default()
    }
}

/// Polls `probe` until it returns `Some`, or panics after [`TIMEOUT`] describing `what`.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn create_node(client: &Client, name: &str) -> Node {
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"team": "a"},
            "annotations": {"kube-node.io/node-class": "c"},
        },
        "spec": {"taints": [{"key": "kube-node.io/unregistered", "effect": "NoSchedule"}]},
    }))
    .expect("a Node");
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    // A condition another writer (kube-node) owns; the kubelet must leave it alone.
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{
                "type": "MachineReady", "status": "False", "reason": "Registering",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }]}})),
        )
        .await
        .expect("patch status");
    node
}

fn condition<'a>(
    node: &'a Node,
    type_: &str,
) -> Option<&'a k8s_openapi::api::core::v1::NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

fn ready(node: &Node) -> bool {
    condition(node, "Ready").is_some_and(|c| c.status == "True")
}

async fn renew_time(leases: &Api<Lease>, name: &str) -> Option<String> {
    let lease = leases.get_opt(name).await.ok()??;
    lease
        .spec?
        .renew_time
        .map(|t| serde_json::to_string(&t).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_registers_renews_and_stops() {
    let api = EmbeddedApi::new();
    let client = api.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    let created = create_node(&client, "node-1").await;

    let cloud = SimulatedCloud::new();
    let provider = cloud
        .factory()
        .build(&class("c", json!({})))
        .expect("build");
    let silent = cloud
        .factory()
        .build(&class("silent", json!({"register": false})))
        .expect("build");
    let machine = provider
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");
    create_node(&client, "node-silent").await;
    silent
        .create(&request("silent", "uid-2", "node-silent"))
        .await
        .expect("create");
    // A machine whose Node does not exist yet: registered once the Node appears.
    provider
        .create(&request("c", "uid-3", "node-late"))
        .await
        .expect("create");

    let kubelet = cloud.start_kubelet_with(client.clone(), fast());

    let node = eventually("node-1 Ready", || async {
        nodes.get("node-1").await.ok().filter(ready)
    })
    .await;
    let status = node.status.clone().expect("status");
    let ready_cond = condition(&node, "Ready").expect("Ready");
    assert_eq!(ready_cond.reason.as_deref(), Some("KubeletReady"));
    assert!(ready_cond.last_heartbeat_time.is_some());
    let capacity = status.capacity.clone().expect("capacity");
    assert_eq!(capacity.get("cpu").map(|q| q.0.as_str()), Some("4"));
    assert_eq!(capacity.get("memory").map(|q| q.0.as_str()), Some("16Gi"));
    let allocatable = status.allocatable.clone().expect("allocatable");
    assert_eq!(allocatable.get("cpu").map(|q| q.0.as_str()), Some("3800m"));
    let addresses = status.addresses.clone().expect("addresses");
    let ip = &machine
        .addresses
        .iter()
        .find(|a| a.kind == "InternalIP")
        .expect("machine ip")
        .address;
    assert!(
        addresses
            .iter()
            .any(|a| a.type_ == "InternalIP" && &a.address == ip)
    );
    assert!(
        addresses
            .iter()
            .any(|a| a.type_ == "Hostname" && a.address == "node-1")
    );
    let info = status.node_info.clone().expect("nodeInfo");
    assert_eq!(info.kubelet_version, "v1.33.0-sim");
    assert_eq!(info.operating_system, "linux");
    // Conditions others own, labels and taints are untouched (bar the kubelet's own labels).
    assert_eq!(
        condition(&node, "MachineReady").map(|c| c.reason.as_deref()),
        Some(Some("Registering"))
    );
    let node = eventually("default labels", || async {
        nodes
            .get("node-1")
            .await
            .ok()
            .filter(|n| n.labels().contains_key("kubernetes.io/os"))
    })
    .await;
    assert_eq!(node.labels().get("team").map(String::as_str), Some("a"));
    assert_eq!(
        node.labels()
            .get("kubernetes.io/hostname")
            .map(String::as_str),
        Some("node-1")
    );
    assert_eq!(
        node.labels().get("kubernetes.io/arch").map(String::as_str),
        Some("amd64")
    );
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert_eq!(taints.len(), 1);
    assert_eq!(taints[0].key, "kube-node.io/unregistered");

    // The Lease: held by the node, owned by the Node, renewed.
    let lease = eventually("lease", || async {
        leases.get_opt("node-1").await.ok().flatten()
    })
    .await;
    let spec = lease.spec.clone().expect("lease spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("node-1"));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    let owner = lease.owner_references().first().cloned().expect("owner");
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", "node-1")
    );
    assert_eq!(Some(owner.uid), created.uid());
    let first = renew_time(&leases, "node-1").await;
    eventually("a lease renewal", || async {
        let now = renew_time(&leases, "node-1").await;
        (now != first).then_some(())
    })
    .await;
    // Heartbeats move.
    let hb = ready_cond.last_heartbeat_time.clone();
    eventually("a heartbeat", || async {
        let n = nodes.get("node-1").await.ok()?;
        let c = condition(&n, "Ready")?;
        (c.last_heartbeat_time != hb && c.last_transition_time == ready_cond.last_transition_time)
            .then_some(())
    })
    .await;

    // A late Node is registered when it appears.
    create_node(&client, "node-late").await;
    eventually("node-late Ready", || async {
        nodes.get("node-late").await.ok().filter(ready)
    })
    .await;
    // register: false leaves its Node alone (checked after two others registered).
    let silent_node = nodes.get("node-silent").await.expect("get");
    assert!(condition(&silent_node, "Ready").is_none());
    assert!(leases.get_opt("node-silent").await.expect("get").is_none());

    // Delete the machine: renewals stop.
    provider.delete(&machine.provider_id).await.expect("delete");
    // Let any write in flight land, then watch a window of several lease intervals.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = renew_time(&leases, "node-1").await;
    let writes = kubelet.writes();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        renew_time(&leases, "node-1").await,
        frozen,
        "no renewals after delete"
    );
    assert!(renew_time(&leases, "node-late").await.is_some());
    assert!(kubelet.writes() > writes, "node-late is still renewed");
    assert_eq!(cloud.kubelet_writes(), kubelet.writes());

    // The Lease goes with its Node.
    nodes
        .delete("node-1", &DeleteParams::default())
        .await
        .expect("delete node");
    eventually("lease collected", || async {
        leases.get_opt("node-1").await.ok()?.is_none().then_some(())
    })
    .await;
    kubelet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_runs_and_finishes_pods() {
    let api = EmbeddedApi::new();
    let client = api.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    create_node(&client, "node-1").await;
    let cloud = SimulatedCloud::new();
    let provider = cloud
        .factory()
        .build(&class("c", json!({})))
        .expect("build");
    provider
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");

    let pod = |name: &str, node: &str, finalizer: bool| -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "namespace": "default",
                "finalizers": if finalizer { json!(["example.com/hold"]) } else { json!([]) },
            },
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}]},
        }))
        .expect("a Pod")
    };
    // Bound before the kubelet starts, and one on a node that is not simulated.
    pods.create(&PostParams::default(), &pod("early", "node-1", false))
        .await
        .expect("create");
    pods.create(
        &PostParams::default(),
        &pod("elsewhere", "real-node", false),
    )
    .await
    .expect("create");

    let kubelet = cloud.start_kubelet_with(client.clone(), fast());
    eventually("node Ready", || async {
        nodes.get("node-1").await.ok().filter(ready)
    })
    .await;
    let phase = |p: &Pod| p.status.as_ref().and_then(|s| s.phase.clone());
    let early = eventually("early Running", || async {
        pods.get("early")
            .await
            .ok()
            .filter(|p| phase(p).as_deref() == Some("Running"))
    })
    .await;
    let status = early.status.expect("status");
    assert!(
        status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    assert!(status.pod_ip.is_some());

    pods.create(&PostParams::default(), &pod("late", "node-1", true))
        .await
        .expect("create");
    eventually("late Running", || async {
        pods.get("late")
            .await
            .ok()
            .filter(|p| phase(p).as_deref() == Some("Running"))
    })
    .await;
    assert_eq!(
        phase(&pods.get("elsewhere").await.expect("get")),
        None,
        "not our node"
    );

    // A pod being deleted (held here by a finalizer, as a real one is by its grace period) is
    // finished by the kubelet: it deletes it with grace period 0.
    let deletes_before = api.stats().count("pods", "delete");
    pods.delete("late", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("the kubelet's final delete", || async {
        (api.stats().count("pods", "delete") >= deletes_before + 2).then_some(())
    })
    .await;
    // Release the finalizer: the pod is gone.
    pods.patch(
        "late",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("patch");
    eventually("late gone", || async {
        pods.get_opt("late").await.ok()?.is_none().then_some(())
    })
    .await;
    drop(kubelet);
}

/// Many machines: every Node registers, with API writes bounded by the semaphore and one task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_registers_many_machines() {
    let n: usize = std::env::var("SIM_KUBELET_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let api = EmbeddedApi::new();
    let client = api.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let cloud = SimulatedCloud::new();
    let provider = cloud
        .factory()
        .build(&class("c", json!({})))
        .expect("build");
    let started = std::time::Instant::now();
    for i in 0..n {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": format!("node-{i}")}}))
            .expect("a Node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
        provider
            .create(&request("c", &format!("uid-{i}"), &format!("node-{i}")))
            .await
            .expect("create");
    }
    let created = started.elapsed();
    let kubelet = cloud.start_kubelet_with(
        client.clone(),
        KubeletConfig {
            scan_interval: Duration::from_millis(50),
            ..KubeletConfig::default()
        },
    );
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let list = nodes.list(&Default::default()).await.expect("list");
        let ready_count = list.items.iter().filter(|n| ready(n)).count();
        if ready_count == n {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ready_count}/{n} Ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    eventually("every lease", || async {
        (leases.list(&Default::default()).await.ok()?.items.len() == n).then_some(())
    })
    .await;
    eprintln!(
        "{n} machines: objects created in {created:?}, all Ready {:?} after the kubelet started, {} kubelet writes",
        started.elapsed(),
        kubelet.writes()
    );
    kubelet.stop().await;
}

/// A Node deleted and recreated under the same name (its machine still running) is registered
/// again from scratch: capacity, addresses, and a Lease owned by the new Node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_reregisters_a_recreated_node() {
    let api = EmbeddedApi::new();
    let client = api.client();
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), NODE_LEASE_NAMESPACE);
    create_node(&client, "node-1").await;
    let cloud = SimulatedCloud::new();
    let provider = cloud
        .factory()
        .build(&class("c", json!({})))
        .expect("build");
    provider
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");
    let kubelet = cloud.start_kubelet_with(client.clone(), fast());
    eventually("node Ready", || async {
        nodes.get("node-1").await.ok().filter(ready)
    })
    .await;
    eventually("lease", || async {
        leases.get_opt("node-1").await.ok().flatten()
    })
    .await;

    nodes
        .delete("node-1", &DeleteParams::default())
        .await
        .expect("delete");
    let again = create_node(&client, "node-1").await;
    let node = eventually("recreated node Ready", || async {
        nodes.get("node-1").await.ok().filter(ready)
    })
    .await;
    let capacity = node.status.and_then(|s| s.capacity).unwrap_or_default();
    assert_eq!(capacity.get("cpu").map(|q| q.0.as_str()), Some("4"));
    eventually("a lease owned by the new Node", || async {
        let lease = leases.get_opt("node-1").await.ok()??;
        (lease
            .owner_references()
            .first()
            .map(|o| Some(o.uid.clone()))
            == Some(again.uid()))
        .then_some(())
    })
    .await;
    kubelet.stop().await;
}
