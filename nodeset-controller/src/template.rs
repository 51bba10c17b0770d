//! The NodeSet template's labels, annotations and taints, kept on existing Nodes in place.
//!
//! They shape nothing about a Node's machine, so a change of them is patched onto the Nodes
//! rather than replacing them (and is not part of the build hash, see `drift.rs`). What the
//! template applied is remembered on each Node in three annotations (label keys, annotation
//! keys, `key:Effect` taints), as the node-controller remembers what the NodeClass applied: a
//! key removed from the template comes off the Nodes, while what others set (the kubelet,
//! users, the NodeClass, other controllers) stays. A Node without the record (created before
//! kube-node kept it) loses nothing; it gets the record on the next pass.
//!
//! Never touched in place: the NodeSet's selector keys (changing them would release the Node),
//! kube-node's own `kube-node.io/` labels and annotations, and the unregistered taints.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::ResourceExt;
use kube_node_crds::names::{
    AUTOSCALER_UNREGISTERED_TAINT, TEMPLATE_ANNOTATIONS_ANNOTATION, TEMPLATE_HASH_ANNOTATION,
    TEMPLATE_LABELS_ANNOTATION, TEMPLATE_TAINTS_ANNOTATION, UNREGISTERED_TAINT,
};
use kube_node_crds::v1alpha1::NodeSet;
use serde_json::{Map, Value, json};

/// kube-node's own keys: set at creation, never patched from the template.
const OWN_PREFIX: &str = "kube-node.io/";

/// What the template asks of a Node now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Wanted {
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    taints: Vec<Taint>,
    /// Label keys never patched: the selector's.
    frozen_labels: BTreeSet<String>,
}

fn split(v: Option<&String>) -> BTreeSet<String> {
    v.map(|v| {
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    })
    .unwrap_or_default()
}

fn taint_id(t: &Taint) -> String {
    format!("{}:{}", t.key, t.effect)
}

impl Wanted {
    /// What `ns`'s template asks for.
    pub fn of(ns: &NodeSet) -> Self {
        let mut frozen_labels: BTreeSet<String> = ns
            .spec
            .selector
            .match_labels
            .iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect();
        frozen_labels.extend(
            ns.spec
                .selector
                .match_expressions
                .iter()
                .flatten()
                .map(|e| e.key.clone()),
        );
        let meta = &ns.spec.template.metadata;
        let own = |k: &String| !k.starts_with(OWN_PREFIX);
        Self {
            labels: meta
                .labels
                .iter()
                .flatten()
                .filter(|(k, _)| own(k) && !frozen_labels.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            annotations: meta
                .annotations
                .iter()
                .flatten()
                .filter(|(k, _)| own(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            taints: ns
                .spec
                .template
                .spec
                .taints
                .iter()
                .map(|t| t.to_core())
                .filter(|t| t.key != UNREGISTERED_TAINT && t.key != AUTOSCALER_UNREGISTERED_TAINT)
                .collect(),
            frozen_labels,
        }
    }

    /// A hash of everything asked for: a Node whose record carries another has not been
    /// brought to the template yet. The Node cache keeps no taints and only kube-node's own
    /// annotations, so this is how a pass finds the Nodes worth reading whole.
    pub fn hash(&self) -> String {
        let mut taints: Vec<(&str, &str, Option<&str>)> = self
            .taints
            .iter()
            .map(|t| (t.key.as_str(), t.effect.as_str(), t.value.as_deref()))
            .collect();
        taints.sort_unstable();
        let text = json!({"l": self.labels, "a": self.annotations, "t": taints}).to_string();
        crate::drift::fnv(&text)
    }

    /// Whether a Node (as the cache keeps it) may differ from the template.
    pub fn outdated(&self, node: &Node) -> bool {
        node.annotations().get(TEMPLATE_HASH_ANNOTATION) != Some(&self.hash())
    }

    /// The record of what is applied, as the annotations a created Node starts with.
    pub fn record(&self) -> BTreeMap<String, String> {
        let join = |it: Vec<String>| it.join(",");
        BTreeMap::from([
            (TEMPLATE_HASH_ANNOTATION.to_string(), self.hash()),
            (
                TEMPLATE_LABELS_ANNOTATION.to_string(),
                join(self.labels.keys().cloned().collect()),
            ),
            (
                TEMPLATE_ANNOTATIONS_ANNOTATION.to_string(),
                join(self.annotations.keys().cloned().collect()),
            ),
            (
                TEMPLATE_TAINTS_ANNOTATION.to_string(),
                join(
                    self.taints
                        .iter()
                        .map(taint_id)
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                ),
            ),
        ])
    }

    /// The JSON merge patch that brings `node` to the template, or `None` when it is there.
    /// A patch that rewrites the taints carries the Node's `resourceVersion`, so a taint
    /// someone else changed meanwhile is not overwritten (the write conflicts; the next pass
    /// retries).
    pub fn patch(&self, node: &Node) -> Option<Value> {
        let labels = node.labels();
        let annotations = node.annotations();
        let mut label_patch = Map::new();
        for (k, v) in &self.labels {
            if labels.get(k) != Some(v) {
                label_patch.insert(k.clone(), Value::String(v.clone()));
            }
        }
        for k in split(annotations.get(TEMPLATE_LABELS_ANNOTATION)) {
            if !self.labels.contains_key(&k)
                && !self.frozen_labels.contains(&k)
                && !k.starts_with(OWN_PREFIX)
                && labels.contains_key(&k)
            {
                label_patch.insert(k, Value::Null);
            }
        }
        let mut annotation_patch = Map::new();
        for (k, v) in &self.annotations {
            if annotations.get(k) != Some(v) {
                annotation_patch.insert(k.clone(), Value::String(v.clone()));
            }
        }
        for k in split(annotations.get(TEMPLATE_ANNOTATIONS_ANNOTATION)) {
            if !self.annotations.contains_key(&k)
                && !k.starts_with(OWN_PREFIX)
                && annotations.contains_key(&k)
            {
                annotation_patch.insert(k, Value::Null);
            }
        }
        let current: Vec<Taint> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let applied = split(annotations.get(TEMPLATE_TAINTS_ANNOTATION));
        let wanted_ids: BTreeSet<String> = self.taints.iter().map(taint_id).collect();
        // Keep every taint the template does not own, replace the ones it does.
        let mut taints: Vec<Taint> = current
            .iter()
            .filter(|t| {
                let id = taint_id(t);
                !wanted_ids.contains(&id) && !applied.contains(&id)
            })
            .cloned()
            .collect();
        for t in &self.taints {
            // An equal taint already on the Node keeps its timeAdded.
            let same = current
                .iter()
                .find(|c| c.key == t.key && c.effect == t.effect && c.value == t.value);
            taints.push(same.cloned().unwrap_or_else(|| t.clone()));
        }
        let key = |t: &Taint| (t.key.clone(), t.effect.clone(), t.value.clone());
        let mut a: Vec<_> = current.iter().map(key).collect();
        let mut b: Vec<_> = taints.iter().map(key).collect();
        a.sort();
        b.sort();
        let taints_changed = a != b;
        for (k, v) in self.record() {
            if annotations.get(&k) != Some(&v) {
                annotation_patch.insert(k, Value::String(v));
            }
        }
        if label_patch.is_empty() && annotation_patch.is_empty() && !taints_changed {
            return None;
        }
        let mut metadata = Map::new();
        if !label_patch.is_empty() {
            metadata.insert("labels".into(), Value::Object(label_patch));
        }
        if !annotation_patch.is_empty() {
            metadata.insert("annotations".into(), Value::Object(annotation_patch));
        }
        let mut patch = Map::new();
        if taints_changed {
            if let Some(rv) = node.metadata.resource_version.clone() {
                metadata.insert("resourceVersion".into(), Value::String(rv));
            }
            patch.insert("spec".into(), json!({ "taints": taints }));
        }
        patch.insert("metadata".into(), Value::Object(metadata));
        Some(Value::Object(patch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodeset(template: Value) -> NodeSet {
        serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
            "metadata": {"name": "w"},
            "spec": {"selector": {"matchLabels": {"pool": "w"}}, "template": template},
        }))
        .expect("NodeSet")
    }

    /// RFC 7386, as the API server applies a merge patch.
    fn merge(target: &mut Value, patch: &Value) {
        let Value::Object(p) = patch else {
            *target = patch.clone();
            return;
        };
        if !target.is_object() {
            *target = json!({});
        }
        if let Value::Object(t) = target {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
    }

    fn apply(node: &mut Node, patch: &Value) {
        let mut v = serde_json::to_value(&*node).expect("node");
        merge(&mut v, patch);
        *node = serde_json::from_value(v).expect("node");
    }

    #[test]
    fn changes_and_removals_reach_the_node_and_others_stay() {
        let v1 = nodeset(json!({
            "metadata": {"labels": {"pool": "w", "tier": "gold", "old": "x"},
                         "annotations": {"note": "a"}},
            "spec": {"nodeClassName": "sim", "taints": [
                {"key": "dedicated", "value": "ml", "effect": "NoSchedule"},
                {"key": "gone", "effect": "NoExecute"}]},
        }));
        let w1 = Wanted::of(&v1);
        // A Node as created from v1, plus what others set.
        let mut node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "resourceVersion": "7",
                "labels": {"pool": "w", "tier": "gold", "old": "x", "kubernetes.io/hostname": "n", "user": "u"},
                "annotations": w1.record().into_iter().chain([("note".to_string(), "a".to_string()), ("theirs".to_string(), "t".to_string())]).collect::<BTreeMap<_, _>>()},
            "spec": {"taints": [
                {"key": "dedicated", "value": "ml", "effect": "NoSchedule"},
                {"key": "gone", "effect": "NoExecute"},
                {"key": "kube-node.io/unregistered", "effect": "NoExecute"},
                {"key": "user", "effect": "NoSchedule"}]},
        }))
        .expect("node");
        assert_eq!(w1.patch(&node), None, "a Node as created needs nothing");
        assert!(!w1.outdated(&node));

        let v2 = nodeset(json!({
            "metadata": {"labels": {"pool": "w", "tier": "silver", "new": "y"},
                         "annotations": {"note": "b"}},
            "spec": {"nodeClassName": "sim", "taints": [
                {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]},
        }));
        let w2 = Wanted::of(&v2);
        assert!(w2.outdated(&node));
        let patch = w2.patch(&node).expect("a patch");
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        apply(&mut node, &patch);
        let labels = node.labels();
        assert_eq!(labels.get("tier").map(String::as_str), Some("silver"));
        assert_eq!(labels.get("new").map(String::as_str), Some("y"));
        assert!(!labels.contains_key("old"), "removed from the template");
        assert_eq!(labels.get("user").map(String::as_str), Some("u"));
        assert_eq!(labels.get("pool").map(String::as_str), Some("w"));
        assert_eq!(
            node.annotations().get("note").map(String::as_str),
            Some("b")
        );
        assert_eq!(
            node.annotations().get("theirs").map(String::as_str),
            Some("t")
        );
        let taints: BTreeSet<(String, Option<String>)> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|t| (t.key, t.value))
            .collect();
        assert_eq!(
            taints,
            BTreeSet::from([
                ("dedicated".to_string(), Some("gpu".to_string())),
                ("kube-node.io/unregistered".to_string(), None),
                ("user".to_string(), None),
            ])
        );
        assert_eq!(w2.patch(&node), None, "applied once, then nothing");
        assert!(!w2.outdated(&node));
    }

    #[test]
    fn selector_labels_and_unrecorded_keys_are_never_removed() {
        let ns = nodeset(json!({
            "metadata": {"labels": {"pool": "w"}},
            "spec": {"nodeClassName": "sim"},
        }));
        let w = Wanted::of(&ns);
        // A record that (wrongly) lists the selector key, and a Node without any record.
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n", "labels": {"pool": "other", "extra": "e"},
                         "annotations": {"kube-node.io/template-labels": "pool"}},
        }))
        .expect("node");
        let patch = w.patch(&node).expect("the record is rewritten");
        assert!(patch["metadata"].get("labels").is_none(), "{patch}");
        assert!(patch.get("spec").is_none(), "taints untouched: {patch}");
    }
}
