//! What kube-node applied to a Node from its NodeClass, remembered on the Node itself, so that
//! a label or taint removed from the NodeClass comes off its Nodes while labels and taints that
//! others own (the kubelet, users, other controllers, the NodeSet template) stay.
//!
//! The record is two annotations: the label keys and the `key:Effect` taints applied from
//! `spec.labels` and `spec.taints`. A Node without them (made before kube-node kept the record)
//! loses nothing; it gets the record on its next pass. Labels of the machine itself (a
//! bare-metal host's inventory labels, `Instance::labels`) have a record of their own
//! ([`MachineLabels`]), kept only while the machine is known. Pure: the Node patch is built
//! in `node.rs`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube_node_crds::NodeClass;
use kube_node_crds::names::{
    APPLIED_LABELS_ANNOTATION, APPLIED_MACHINE_LABELS_ANNOTATION, APPLIED_TAINTS_ANNOTATION,
};

/// Label keys and taints (key, effect) from a NodeClass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClassMeta {
    pub(crate) labels: BTreeSet<String>,
    pub(crate) taints: BTreeSet<(String, String)>,
}

impl ClassMeta {
    /// What the NodeClass asks for now.
    pub(crate) fn of_class(class: &NodeClass) -> Self {
        Self {
            labels: class.spec.labels.keys().cloned().collect(),
            taints: class
                .spec
                .taints
                .iter()
                .map(|t| {
                    let t = t.to_core();
                    (t.key, t.effect)
                })
                .collect(),
        }
    }

    /// What the Node's record says was applied (`None`: no record).
    pub(crate) fn recorded(node: &Node) -> Option<Self> {
        let a = node.annotations();
        let labels = a.get(APPLIED_LABELS_ANNOTATION);
        let taints = a.get(APPLIED_TAINTS_ANNOTATION);
        if labels.is_none() && taints.is_none() {
            return None;
        }
        let split = |v: Option<&String>| -> Vec<String> {
            v.map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
        };
        Some(Self {
            labels: split(labels).into_iter().collect(),
            taints: split(taints)
                .into_iter()
                .filter_map(|t| {
                    // The key may hold no ':' (a qualified name); the effect follows the last.
                    let (k, e) = t.rsplit_once(':')?;
                    Some((k.to_string(), e.to_string()))
                })
                .collect(),
        })
    }

    /// The record as annotations.
    pub(crate) fn annotations(&self) -> BTreeMap<String, String> {
        let labels: Vec<&str> = self.labels.iter().map(String::as_str).collect();
        let taints: Vec<String> = self
            .taints
            .iter()
            .map(|(k, e)| format!("{k}:{e}"))
            .collect();
        BTreeMap::from([
            (APPLIED_LABELS_ANNOTATION.to_string(), labels.join(",")),
            (APPLIED_TAINTS_ANNOTATION.to_string(), taints.join(",")),
        ])
    }

    /// What was applied before and the class no longer asks for.
    pub(crate) fn dropped_since(&self, before: &Self) -> Self {
        Self {
            labels: before.labels.difference(&self.labels).cloned().collect(),
            taints: before.taints.difference(&self.taints).cloned().collect(),
        }
    }
}

/// The labels a machine gives its Node (`Instance::labels`), against the Node's record of the
/// ones applied before.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct MachineLabels {
    /// Keys applied before and no longer on the machine.
    pub(crate) dropped: BTreeSet<String>,
    /// The record to write (`None`: the Node has none and needs none).
    pub(crate) record: Option<(String, String)>,
}

impl MachineLabels {
    /// What applying `labels` (the machine's, as the provider reports them now) to `node`
    /// removes and records. A Node that never had machine labels and gets none gets no record.
    pub(crate) fn of(node: &Node, labels: &BTreeMap<String, String>) -> Self {
        let before: Option<BTreeSet<String>> = node
            .annotations()
            .get(APPLIED_MACHINE_LABELS_ANNOTATION)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            });
        let dropped = before
            .iter()
            .flatten()
            .filter(|k| !labels.contains_key(*k))
            .cloned()
            .collect();
        let record = (before.is_some() || !labels.is_empty()).then(|| {
            let keys: Vec<&str> = labels.keys().map(String::as_str).collect();
            (
                APPLIED_MACHINE_LABELS_ANNOTATION.to_string(),
                keys.join(","),
            )
        });
        Self { dropped, record }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;
    use serde_json::json;

    fn class(labels: serde_json::Value, taints: serde_json::Value) -> NodeClass {
        serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1",
            "kind": "NodeClass",
            "metadata": {"name": "c"},
            "spec": {"provider": {"type": "simulated", "simulated": {}}, "labels": labels, "taints": taints},
        }))
        .expect("NodeClass")
    }

    fn node_with(annotations: BTreeMap<String, String>) -> Node {
        Node {
            metadata: ObjectMeta {
                annotations: Some(annotations),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_record_round_trips_through_annotations() {
        let c = class(
            json!({"team": "ml", "example.com/tier": "gold"}),
            json!([{"key": "example.com/gpu", "value": "yes", "effect": "NoSchedule"}, {"key": "spot", "effect": "PreferNoSchedule"}]),
        );
        let meta = ClassMeta::of_class(&c);
        assert_eq!(
            meta.annotations()
                .get(APPLIED_TAINTS_ANNOTATION)
                .map(String::as_str),
            Some("example.com/gpu:NoSchedule,spot:PreferNoSchedule")
        );
        let back = ClassMeta::recorded(&node_with(meta.annotations())).expect("record");
        assert_eq!(back, meta);
    }

    #[test]
    fn no_record_means_nothing_to_remove() {
        assert_eq!(ClassMeta::recorded(&Node::default()), None);
        // An empty record is a record: nothing was applied.
        let empty = ClassMeta::default().annotations();
        assert_eq!(
            ClassMeta::recorded(&node_with(empty)),
            Some(ClassMeta::default())
        );
    }

    #[test]
    fn machine_labels_are_recorded_and_the_ones_gone_dropped() {
        let labels = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // A cloud machine (no labels) on a Node without a record: nothing to write.
        assert_eq!(
            MachineLabels::of(&Node::default(), &BTreeMap::new()),
            MachineLabels::default()
        );
        let first = MachineLabels::of(
            &Node::default(),
            &labels(&[("rack", "a"), ("topology.kubernetes.io/zone", "z1")]),
        );
        assert!(first.dropped.is_empty());
        let (k, v) = first.record.clone().expect("a record");
        assert_eq!(k, APPLIED_MACHINE_LABELS_ANNOTATION);
        assert_eq!(v, "rack,topology.kubernetes.io/zone");
        // The inventory lost `rack` and gained `row`: `rack` goes, the record follows.
        let node = node_with(BTreeMap::from([(k, v)]));
        let next = MachineLabels::of(
            &node,
            &labels(&[("row", "3"), ("topology.kubernetes.io/zone", "z1")]),
        );
        assert_eq!(next.dropped, BTreeSet::from(["rack".to_string()]));
        assert_eq!(
            next.record.map(|r| r.1).as_deref(),
            Some("row,topology.kubernetes.io/zone")
        );
        // Every label gone: all dropped, and an empty record stays (nothing is applied).
        let none = MachineLabels::of(&node, &BTreeMap::new());
        assert_eq!(none.dropped.len(), 2);
        assert_eq!(none.record.map(|r| r.1).as_deref(), Some(""));
    }

    #[test]
    fn only_what_was_applied_and_is_no_longer_wanted_is_dropped() {
        let before = ClassMeta::of_class(&class(
            json!({"team": "ml", "tier": "gold"}),
            json!([{"key": "gpu", "effect": "NoSchedule"}, {"key": "gpu", "effect": "NoExecute"}]),
        ));
        let now = ClassMeta::of_class(&class(
            json!({"team": "infra"}),
            json!([{"key": "gpu", "effect": "NoExecute"}]),
        ));
        let dropped = now.dropped_since(&before);
        assert_eq!(dropped.labels, BTreeSet::from(["tier".to_string()]));
        assert_eq!(
            dropped.taints,
            BTreeSet::from([("gpu".to_string(), "NoSchedule".to_string())])
        );
    }
}
