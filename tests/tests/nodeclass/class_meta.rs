//! Labels and taints removed from a NodeClass come off its Nodes; labels and taints others set
//! (the kubelet, users) stay, because kube-node remembers what it applied.

use crate::common::{Harness, eventually, sim_spec};
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_propagate_and_others_labels_and_taints_stay() {
    let h = Harness::new().await;
    let mut spec = sim_spec();
    spec["labels"] = json!({"team": "ml", "tier": "gold"});
    spec["taints"] = json!([
        {"key": "gpu", "value": "yes", "effect": "NoSchedule"},
        {"key": "spot", "effect": "PreferNoSchedule"},
    ]);
    h.node_class("sim", spec).await;
    h.node("n1", "sim").await;
    h.wait_ready("n1").await;
    // A user's label and taint, as `kubectl label` / `kubectl taint` would add them.
    let node = h.nodes().get("n1").await.expect("n1");
    let mut taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert!(taints.iter().any(|t| t.key == "gpu"), "{taints:?}");
    taints.push(
        serde_json::from_value(json!({"key": "maintenance", "effect": "NoSchedule"}))
            .expect("taint"),
    );
    h.nodes()
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"owner": "alice"}}, "spec": {"taints": taints}}),
            ),
        )
        .await
        .expect("user edits");

    // The class drops `tier` and the `gpu` taint and changes `team`.
    h.classes()
        .patch(
            "sim",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "labels": {"team": "infra", "tier": null},
                "taints": [{"key": "spot", "effect": "PreferNoSchedule"}],
            }})),
        )
        .await
        .expect("edit class");
    let node = eventually(30, "the removals on n1", || async {
        let n = h.nodes().get("n1").await.ok()?;
        let gone = !n.labels().contains_key("tier")
            && !n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == "gpu"));
        (gone && n.labels().get("team").map(String::as_str) == Some("infra")).then_some(n)
    })
    .await;
    let labels = node.labels();
    assert_eq!(
        labels.get("owner").map(String::as_str),
        Some("alice"),
        "the user's label stays"
    );
    assert!(labels.contains_key("kube-node.io/node-class"), "{labels:?}");
    let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
    assert!(
        taints.iter().any(|t| t.key == "maintenance"),
        "the user's taint stays: {taints:?}"
    );
    assert!(taints.iter().any(|t| t.key == "spot"), "{taints:?}");
}
