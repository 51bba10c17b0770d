//! Group-backed NodeSets end to end: the real node- and nodeset-controllers against the
//! embedded API server, with a simulated group whose kubelets register their own Nodes.
//! Prints the provider calls of each scale step.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_node::harness::Harness;
use kube_node_crds::NodeSet;
use kube_node_crds::names::{
    GROUP_CONDITION, GROUP_LABEL, MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION,
};
use kube_node_provider::InstanceState;
use kube_node_provider_simulated::KubeletConfig;
use serde_json::json;

const METHODS: [&str; 8] = [
    "create",
    "get",
    "list",
    "delete",
    "target_size",
    "set_target_size",
    "delete_instances",
    "instances",
];

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

async fn cluster() -> Harness {
    Harness::builder()
        .kubelet(KubeletConfig {
            scan_interval: Duration::from_millis(100),
            ..KubeletConfig::default()
        })
        .start()
        .await
        .expect("cluster")
}

async fn pool(h: &Harness, name: &str) {
    h.create_node_class(
        name,
        json!({
            "provider": {"type": "simulated", "simulated": {"group": {"name": name}, "bootDelay": "1s", "zones": ["zone-a", "zone-b"]}},
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "timeouts": {"registration": "30s", "drain": "3s"},
        }),
    )
    .await
    .expect("group-backed NodeClass");
}

fn calls(h: &Harness) -> Vec<u64> {
    METHODS
        .iter()
        .map(|m| h.provider_metrics.calls("simulated", m))
        .collect()
}

fn delta(before: &[u64], after: &[u64]) -> String {
    METHODS
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| a > b)
        .map(|(m, (b, a))| format!("{m}={}", a - b))
        .collect::<Vec<_>>()
        .join(" ")
}

async fn scale(client: &Client, set: &str, replicas: i32) {
    Api::<NodeSet>::all(client.clone())
        .patch(
            set,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .expect("scale");
}

/// The Nodes of the group (by its label), and how many of them are Ready and owned by `set`.
async fn group_nodes(client: &Client, group: &str) -> Vec<Node> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{GROUP_LABEL}={group}")))
        .await
        .expect("nodes")
        .items
}

fn owned_ready(nodes: &[Node], set: &str) -> usize {
    nodes
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| n.owner_references().iter().any(|o| o.name == set))
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == MACHINE_READY_CONDITION && c.reason.as_deref() == Some("Ready")
                    })
                })
        })
        .count()
}

/// Waits until the NodeSet has exactly `n` adopted Ready Nodes, the group `n` live machines,
/// no Node left over, and a status that says so.
async fn settled(h: &Harness, set: &str, group: &str, n: usize) {
    eventually(60, &format!("{set} at {n} Nodes"), || async {
        let nodes = group_nodes(&h.client, group).await;
        let live = h
            .cloud
            .machines()
            .iter()
            .filter(|m| m.state != InstanceState::Terminating)
            .count();
        let ns = Api::<NodeSet>::all(h.client.clone())
            .get(set)
            .await
            .expect("nodeset");
        let status_ready = ns.status.as_ref().map_or(0, |s| s.ready_replicas);
        // status.replicas counts Nodes being deleted, so it reaches n a pass after the last
        // of them is gone.
        let status_replicas = ns.status.as_ref().map_or(0, |s| s.replicas);
        (nodes.len() == n
            && owned_ready(&nodes, set) == n
            && live == n
            && status_ready == n as i32
            && status_replicas == n as i32)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_backed_nodeset_scales_0_5_2_0_and_counts_its_calls() {
    let h = cluster().await;
    pool(&h, "pool").await;
    h.create_node_set("web", "pool", 0).await.expect("nodeset");
    settled(&h, "web", "pool", 0).await;
    let mut before = calls(&h);
    for n in [5, 2, 0] {
        scale(&h.client, "web", n).await;
        settled(&h, "web", "pool", n as usize).await;
        let after = calls(&h);
        println!("group scale step to {n}: {}", delta(&before, &after));
        // Nothing is created one by one and nothing deleted without a name.
        assert_eq!(after[0], 0, "no create on a group-backed class");
        assert_eq!(after[3], 0, "no plain delete of a group's machine");
        before = after;
    }
    // Five machines made, five named deletions, each one machine.
    assert_eq!(h.cloud.calls("delete_instances"), 5);
    let ns = Api::<NodeSet>::all(h.client.clone())
        .get("web")
        .await
        .expect("nodeset");
    let status = ns.status.expect("status");
    assert_eq!(status.replicas, 0);
    let synced = status
        .conditions
        .iter()
        .find(|c| c.type_ == GROUP_CONDITION)
        .expect("GroupSynced");
    assert_eq!(synced.status, "True", "{synced:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_removal_drains_and_removes_exactly_that_machine() {
    let h = cluster().await;
    pool(&h, "pool").await;
    h.create_node_set("web", "pool", 3).await.expect("nodeset");
    settled(&h, "web", "pool", 3).await;
    let nodes = group_nodes(&h.client, "pool").await;
    let victim = nodes[1].name_any();
    let victim_pid = nodes[1]
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .expect("providerID");
    let survivors: Vec<String> = nodes
        .iter()
        .filter(|n| n.name_any() != victim)
        .filter_map(|n| n.spec.as_ref()?.provider_id.clone())
        .collect();
    nodeset_controller::remove_nodes(&h.client, "web", std::slice::from_ref(&victim))
        .await
        .expect("remove");
    // The victim is cordoned (drained) before its machine goes.
    eventually(30, "the victim cordoned or gone", || async {
        let n = Api::<Node>::all(h.client.clone())
            .get_opt(&victim)
            .await
            .expect("get");
        match n {
            None => Some(()),
            Some(n) => n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .filter(|u| *u)
                .map(|_| ()),
        }
    })
    .await;
    settled(&h, "web", "pool", 2).await;
    let left: Vec<String> = h
        .cloud
        .machines()
        .into_iter()
        .map(|m| m.provider_id)
        .collect();
    assert!(!left.contains(&victim_pid));
    for s in &survivors {
        assert!(left.contains(s), "{s} survived");
    }
    assert_eq!(h.cloud.calls("delete_instances"), 1);
    // The removal is done: dropped from the spec.
    eventually(30, "removeNodes pruned", || async {
        let ns = Api::<NodeSet>::all(h.client.clone())
            .get("web")
            .await
            .expect("nodeset");
        ns.spec.remove_nodes.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_node_on_a_group_class_is_refused_once() {
    let h = cluster().await;
    pool(&h, "pool").await;
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "by-hand", "annotations": {NODE_CLASS_ANNOTATION: "pool"}},
    }))
    .expect("node");
    Api::<Node>::all(h.client.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    let message = eventually(30, "the refusal", || async {
        let n = Api::<Node>::all(h.client.clone())
            .get("by-hand")
            .await
            .expect("node");
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == MACHINE_READY_CONDITION && c.status == "False")?
            .message
            .filter(|m| m.contains("group-backed"))
    })
    .await;
    assert!(
        message.contains("NodeClass pool is group-backed: scale a NodeSet instead"),
        "{message}"
    );
    let refusals = || async {
        Api::<K8sEvent>::all(h.client.clone())
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("GroupBacked"))
            .count()
    };
    eventually(10, "the Warning event", || async {
        (refusals().await > 0).then_some(())
    })
    .await;
    let creates = h.cloud.calls("create");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // No machine, no hot loop.
    assert_eq!(h.cloud.machine_count(), 0);
    assert_eq!(h.cloud.calls("create"), creates);
    assert_eq!(refusals().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_nodeset_on_the_same_group_is_refused() {
    let h = cluster().await;
    pool(&h, "pool").await;
    h.create_node_set("first", "pool", 1)
        .await
        .expect("nodeset");
    settled(&h, "first", "pool", 1).await;
    h.create_node_set("second", "pool", 3)
        .await
        .expect("nodeset");
    let reason = eventually(30, "the refusal condition", || async {
        let ns = Api::<NodeSet>::all(h.client.clone())
            .get("second")
            .await
            .expect("nodeset");
        ns.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == GROUP_CONDITION && c.status == "False")
            .map(|c| c.reason)
    })
    .await;
    assert_eq!(reason, "GroupOwnedByAnotherNodeSet");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        h.cloud.machine_count(),
        1,
        "the second NodeSet sized nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_autoscaler_grows_and_shrinks_a_group_backed_nodeset() {
    use kube_node_autoscaler::NodeSetCloudProvider;
    use kube_node_autoscaler::proto::cloud_provider_server::CloudProvider;
    use kube_node_autoscaler::proto::{
        ExternalGrpcNode, NodeGroupDeleteNodesRequest, NodeGroupForNodeRequest,
        NodeGroupIncreaseSizeRequest, NodeGroupTargetSizeRequest,
    };
    use tonic::Request;

    let h = cluster().await;
    pool(&h, "pool").await;
    h.create_node_set("web", "pool", 0).await.expect("nodeset");
    Api::<NodeSet>::all(h.client.clone())
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minSize": 0, "maxSize": 5}})),
        )
        .await
        .expect("node group bounds");
    let ca = NodeSetCloudProvider::new(h.client.clone());
    let before = calls(&h);
    ca.node_group_increase_size(Request::new(NodeGroupIncreaseSizeRequest {
        id: "web".into(),
        delta: 3,
    }))
    .await
    .expect("increase");
    settled(&h, "web", "pool", 3).await;
    let grown = calls(&h);
    println!(
        "autoscaler IncreaseSize(3) on a group: {}",
        delta(&before, &grown)
    );
    let size = ca
        .node_group_target_size(Request::new(NodeGroupTargetSizeRequest {
            id: "web".into(),
        }))
        .await
        .expect("target size")
        .into_inner()
        .target_size;
    assert_eq!(size, 3);
    let nodes = group_nodes(&h.client, "pool").await;
    let victim = &nodes[0];
    let pid = victim
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .expect("providerID");
    let node = ExternalGrpcNode {
        provider_id: pid.clone(),
        name: victim.name_any(),
        ..Default::default()
    };
    let group = ca
        .node_group_for_node(Request::new(NodeGroupForNodeRequest {
            node: Some(node.clone()),
        }))
        .await
        .expect("group for node")
        .into_inner()
        .node_group
        .expect("group");
    assert_eq!(group.id, "web");
    ca.node_group_delete_nodes(Request::new(NodeGroupDeleteNodesRequest {
        id: "web".into(),
        nodes: vec![node],
    }))
    .await
    .expect("delete nodes");
    settled(&h, "web", "pool", 2).await;
    println!(
        "autoscaler DeleteNodes(1) on a group: {}",
        delta(&grown, &calls(&h))
    );
    assert!(!h.cloud.machines().iter().any(|m| m.provider_id == pid));
}
