//! Unit tests of the Node patches a pass builds (`node.rs`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use kube::api::ObjectMeta;
use kube_node_crds::NodeClass;
use kube_node_crds::names::{APPLIED_MACHINE_LABELS_ANNOTATION, NODE_CLASS_LABEL};
use kube_node_provider::{Instance, InstanceState};
use serde_json::json;

use super::{Pass, condition_patch, meta_ops, removed_indices, wanted_meta};

fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pass(labels: &[(&str, &str)], annotations: &[(&str, &str)]) -> Pass {
    Pass {
        node: Node {
            metadata: ObjectMeta {
                name: Some("rack-node".into()),
                uid: Some("uid-1".into()),
                resource_version: Some("7".into()),
                labels: Some(map(labels)),
                annotations: Some(map(annotations)),
                ..Default::default()
            },
            ..Default::default()
        },
        name: "rack-node".into(),
        uid: "uid-1".into(),
        phase: None,
        want_key: None,
        superseded: Vec::new(),
    }
}

fn host(labels: &[(&str, &str)]) -> Instance {
    Instance {
        id: "rack-a-01".into(),
        provider_id: "baremetal:///z1/rack-a-01".into(),
        state: InstanceState::Running,
        tags: BTreeMap::new(),
        zone: Some("z1".into()),
        instance_type: None,
        addresses: vec![],
        created_unix: Some(0),
        labels: map(labels),
        failure: None,
    }
}

fn class(labels: serde_json::Value) -> NodeClass {
    serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": "rack"},
        "spec": {"provider": {"type": "simulated", "simulated": {}}, "labels": labels},
    }))
    .expect("NodeClass")
}

fn op<'a>(ops: &'a [serde_json::Value], kind: &str, path: &str) -> Option<&'a serde_json::Value> {
    ops.iter()
        .find(|o| o["op"] == kind && o["path"] == path)
        .map(|o| &o["value"])
}

#[test]
fn a_machines_labels_go_on_its_node_and_are_recorded() {
    let p = pass(&[], &[]);
    let i = host(&[("rack", "a"), ("topology.kubernetes.io/zone", "z1")]);
    // The class's own `rack` loses to the host's; the node-class label is never the host's.
    let mut i2 = i.clone();
    i2.labels.insert(NODE_CLASS_LABEL.into(), "forged".into());
    let c = class(json!({"rack": "from-class", "team": "ml"}));
    let want = wanted_meta(&p, Some(&c), Some(&i2), false);
    assert_eq!(want.labels.get("rack").map(String::as_str), Some("a"));
    assert_eq!(want.labels.get("team").map(String::as_str), Some("ml"));
    assert_eq!(
        want.labels.get(NODE_CLASS_LABEL).map(String::as_str),
        Some("rack")
    );
    let ops = meta_ops(&p.node, &wanted_meta(&p, Some(&c), Some(&i), false));
    assert_eq!(
        op(&ops, "add", "/metadata/labels/rack"),
        Some(&json!("a")),
        "{ops:#?}"
    );
    let record = format!(
        "/metadata/annotations/{}",
        APPLIED_MACHINE_LABELS_ANNOTATION.replace('/', "~1")
    );
    assert_eq!(
        op(&ops, "add", &record),
        Some(&json!("rack,topology.kubernetes.io/zone")),
        "{ops:#?}"
    );
}

#[test]
fn a_label_gone_from_the_machine_comes_off_and_others_stay() {
    // Applied before: rack and row. The inventory now says rack=b, no row. `owner` was set by
    // someone else and stays.
    let p = pass(
        &[("rack", "a"), ("row", "3"), ("owner", "ops")],
        &[(APPLIED_MACHINE_LABELS_ANNOTATION, "rack,row")],
    );
    let ops = meta_ops(
        &p.node,
        &wanted_meta(&p, None, Some(&host(&[("rack", "b")])), false),
    );
    assert_eq!(op(&ops, "add", "/metadata/labels/rack"), Some(&json!("b")));
    assert!(
        ops.iter()
            .any(|o| o["op"] == "remove" && o["path"] == "/metadata/labels/row"),
        "{ops:#?}"
    );
    assert!(
        !ops.iter()
            .any(|o| o["op"] == "remove" && o["path"] == "/metadata/labels/owner"),
        "{ops:#?}"
    );
    // Without the machine at hand (a pass that did not look it up) nothing is removed.
    let ops = meta_ops(&p.node, &wanted_meta(&p, None, None, false));
    assert!(!ops.iter().any(|o| o["op"] == "remove"), "{ops:#?}");
}

#[test]
fn a_cloud_machine_without_labels_adds_no_record() {
    let p = pass(&[], &[]);
    let ops = meta_ops(&p.node, &wanted_meta(&p, None, Some(&host(&[])), true));
    assert!(
        !ops.iter().any(|o| o["path"]
            .as_str()
            .is_some_and(|s| s.contains("applied-machine-labels"))),
        "{ops:#?}"
    );
}

fn machine_ready(reason: &str) -> k8s_openapi::api::core::v1::NodeCondition {
    k8s_openapi::api::core::v1::NodeCondition {
        type_: "MachineReady".into(),
        status: "False".into(),
        reason: Some(reason.into()),
        ..Default::default()
    }
}

#[test]
fn the_launching_write_adds_ready_unknown_to_a_node_without_ready() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube_node_crds::names::MachinePhase;
    let now = Time(jiff::Timestamp::now());
    let p = pass(&[], &[]);
    let patch = condition_patch(
        &p.node,
        MachinePhase::Launching,
        machine_ready("Launching"),
        &now,
    );
    let conditions = patch["status"]["conditions"]
        .as_array()
        .expect("conditions");
    assert_eq!(conditions.len(), 2);
    assert_eq!(conditions[1]["type"], "Ready");
    assert_eq!(conditions[1]["status"], "Unknown");
    assert_eq!(conditions[1]["reason"], "NodeStatusNeverUpdated");

    // A Node that already has Ready (a NodeSet's, or one whose kubelet posted) keeps its own;
    // so does every Node in a later phase: Ready is the kubelet's.
    let mut ready = p.node.clone();
    ready.status = Some(k8s_openapi::api::core::v1::NodeStatus {
        conditions: Some(vec![kube_node_runtime::node_status::kubelet_not_started(
            &now,
        )]),
        ..Default::default()
    });
    let patch = condition_patch(
        &ready,
        MachinePhase::Launching,
        machine_ready("Launching"),
        &now,
    );
    assert_eq!(
        patch["status"]["conditions"].as_array().map(Vec::len),
        Some(1)
    );
    let patch = condition_patch(
        &p.node,
        MachinePhase::Registering,
        machine_ready("Registering"),
        &now,
    );
    assert_eq!(
        patch["status"]["conditions"].as_array().map(Vec::len),
        Some(1)
    );
}

fn taint(key: &str, effect: &str) -> k8s_openapi::api::core::v1::Taint {
    k8s_openapi::api::core::v1::Taint {
        key: key.into(),
        effect: effect.into(),
        ..Default::default()
    }
}

#[test]
fn pure_taint_removals_are_found_by_index() {
    let a = taint("kube-node.io/unregistered", "NoExecute");
    let b = taint(
        "ignore-taint.cluster-autoscaler.kubernetes.io/x",
        "PreferNoSchedule",
    );
    let c = taint("node.kubernetes.io/not-ready", "NoSchedule");
    let cur = vec![a.clone(), b.clone(), c.clone()];
    assert_eq!(
        removed_indices(&cur, std::slice::from_ref(&c)),
        Some(vec![0, 1])
    );
    assert_eq!(
        removed_indices(&cur, &[a.clone(), c.clone()]),
        Some(vec![1])
    );
    assert_eq!(removed_indices(&cur, &[]), Some(vec![0, 1, 2]));
    // Nothing removed, something added, or the order changed: not a pure removal.
    assert_eq!(removed_indices(&cur, &cur), None);
    assert_eq!(removed_indices(&cur, &[c.clone(), a.clone()]), None);
    assert_eq!(removed_indices(&cur, &[taint("other", "NoSchedule")]), None);
}

fn at_version(p: &Pass, rv: &str) -> Node {
    let mut n = p.node.clone();
    n.metadata.resource_version = Some(rv.into());
    n
}

#[test]
fn a_pass_records_the_versions_its_writes_replaced_but_not_a_write_that_changed_nothing() {
    let mut p = pass(&[], &[]);
    // Made on version 7, the server answers 8 then 9.
    let n = at_version(&p, "8");
    p.wrote(n);
    let n = at_version(&p, "9");
    p.wrote(n);
    // A patch that changed nothing: the same version back, and no watch event to wait for.
    let n = at_version(&p, "9");
    p.wrote(n);
    assert_eq!(p.superseded, vec!["7".to_string(), "8".to_string()]);
    assert_eq!(p.node.metadata.resource_version.as_deref(), Some("9"));
}
