//! Deleting a NodeClass that Nodes still use: the deletion waits (an in-use finalizer, as
//! Kubernetes protects a PersistentVolumeClaim in use) and says how many Nodes it waits for;
//! the Nodes' machines are deleted through the class, then the class goes. Before, the class
//! went at once and every Node of it sat in `Deleting: NodeClassNotFound` with its machine
//! running.

use crate::common::{Harness, eventually, machine_phase, sim_spec};
use kube::ResourceExt;
use kube::api::DeleteParams;
use kube_node_crds::names::{IN_USE_CONDITION, NODECLASS_IN_USE_FINALIZER};
use kube_node_crds::v1alpha1::find_condition;

/// The InUse condition's (status, reason, message).
async fn in_use(h: &Harness, class: &str) -> Option<(String, String, String)> {
    let nc = h.classes().get_opt(class).await.ok()??;
    let c = find_condition(&nc.status?.conditions, IN_USE_CONDITION)?.clone();
    Some((c.status, c.reason, c.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodeclass_in_use_is_deleted_only_after_its_nodes_and_machines() {
    let h = Harness::new().await;
    h.node_class("sim", sim_spec()).await;
    for n in ["n1", "n2"] {
        h.node(n, "sim").await;
    }
    for n in ["n1", "n2"] {
        h.wait_ready(n).await;
    }
    eventually(30, "the in-use finalizer", || async {
        let nc = h.classes().get("sim").await.ok()?;
        nc.finalizers()
            .iter()
            .any(|f| f == NODECLASS_IN_USE_FINALIZER)
            .then_some(())
    })
    .await;

    h.classes()
        .delete("sim", &DeleteParams::default())
        .await
        .expect("delete NodeClass");
    let (status, _, message) = eventually(30, "InUse DeletionWaiting for 2 Nodes", || async {
        in_use(&h, "sim")
            .await
            .filter(|(_, r, m)| r == "DeletionWaiting" && m.contains("2 Nodes"))
    })
    .await;
    assert_eq!(status, "True", "{message}");
    let event = eventually(30, "a DeletionWaiting event", || async {
        h.events("DeletionWaiting").await.into_iter().next()
    })
    .await;
    assert!(
        event
            .note
            .as_deref()
            .unwrap_or_default()
            .contains("2 Nodes"),
        "{event:?}"
    );
    assert_eq!(
        event.regarding.and_then(|r| r.kind).as_deref(),
        Some("NodeClass")
    );

    // A new Node naming the class being deleted gets no machine.
    h.node("late", "sim").await;
    let (_, reason, _) = eventually(30, "late refused", || async {
        let n = h.nodes().get("late").await.ok()?;
        machine_phase(&n).filter(|(_, _, m)| m.starts_with("NodeClassDeleting"))
    })
    .await;
    assert_eq!(reason, "Pending");
    assert_eq!(h.cloud.machine_count(), 2);

    // The Nodes go one by one, each with its machine; the class waits for the last.
    for n in ["late", "n1"] {
        h.nodes()
            .delete(n, &DeleteParams::default())
            .await
            .expect("delete Node");
        h.wait_gone(n).await;
    }
    eventually(30, "InUse for 1 Node", || async {
        in_use(&h, "sim")
            .await
            .filter(|(_, _, m)| m.contains("1 Node "))
    })
    .await;
    assert_eq!(h.cloud.machine_count(), 1, "n1's machine is gone");
    assert!(
        h.classes().get_opt("sim").await.expect("get").is_some(),
        "the class waits for n2"
    );

    h.nodes()
        .delete("n2", &DeleteParams::default())
        .await
        .expect("delete Node");
    h.wait_gone("n2").await;
    assert_eq!(h.cloud.machine_count(), 0, "every machine deleted");
    eventually(30, "the NodeClass gone", || async {
        h.classes()
            .get_opt("sim")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_nodeclass_is_deleted_at_once() {
    let h = Harness::new().await;
    h.node_class("idle", sim_spec()).await;
    let (status, reason, _) =
        eventually(30, "InUse False", || async { in_use(&h, "idle").await }).await;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NotInUse"));
    h.classes()
        .delete("idle", &DeleteParams::default())
        .await
        .expect("delete NodeClass");
    eventually(30, "the NodeClass gone", || async {
        h.classes()
            .get_opt("idle")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}
