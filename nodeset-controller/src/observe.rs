//! Reading Nodes: from core v1 objects to the planner's [`ChildNode`], and the instance view
//! cluster-autoscaler needs.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::{Resource, ResourceExt};
use kube_node_crds::names::{
    BUILD_HASH_ANNOTATION, DELETE_NODE_ANNOTATION, LAUNCHED_AT_ANNOTATION, LAUNCHING_MESSAGE,
    MACHINE_READY_CONDITION, MachinePhase, NODE_CLASS_ANNOTATION, NODE_CLASS_GENERATION_ANNOTATION,
};
use kube_node_crds::v1alpha1::NodeSet;
use kube_node_runtime::CachedNode;

use crate::backoff::NON_RETRYABLE_REASONS;
use crate::drift::BuildHash;
use crate::plan::{ChildNode, Failure, Health, Ownership};

/// The controller owner reference of a Node, if it is a NodeSet's: (name, uid).
pub fn nodeset_owner(node: &Node) -> Option<(&str, &str)> {
    node.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .filter(|o| o.kind == "NodeSet" && o.api_version.starts_with("kube-node.io/"))
        .map(|o| (o.name.as_str(), o.uid.as_str()))
}

fn has_controller(node: &Node) -> bool {
    node.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true))
}

fn kubelet_ready(node: &Node) -> Option<Timestamp> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map_or(Timestamp::UNIX_EPOCH, |t| t.0)
        })
}

/// When the `MachineReady` condition was last written: for a Failed machine (a phase the
/// node-controller writes once and keeps), when it failed.
fn machine_written_at(node: &Node) -> Option<Timestamp> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == MACHINE_READY_CONDITION)?;
    c.last_heartbeat_time
        .as_ref()
        .or(c.last_transition_time.as_ref())
        .map(|t| t.0)
}

/// The `MachineReady` condition: (phase, message).
fn machine(node: &Node) -> Option<(Option<MachinePhase>, Option<&str>)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == MACHINE_READY_CONDITION)?;
    Some((
        c.reason.as_deref().and_then(MachinePhase::parse),
        c.message.as_deref(),
    ))
}

/// The phase of a Node's machine as the `kube_node_nodeset_nodes` metric labels it.
pub fn phase_label(node: &Node) -> &'static str {
    if node.metadata.deletion_timestamp.is_some() {
        return MachinePhase::Deleting.as_str();
    }
    match machine(node).and_then(|(p, _)| p) {
        Some(p) => p.as_str(),
        None if kubelet_ready(node).is_some() => MachinePhase::Ready.as_str(),
        None => MachinePhase::Pending.as_str(),
    }
}

/// The reason of a node-controller message `"Reason: text"`, when it starts with one.
fn message_reason(message: &str) -> Option<&str> {
    let (head, _) = message.split_once(':')?;
    let ok = !head.is_empty()
        && head.len() <= 64
        && head.starts_with(|c: char| c.is_ascii_uppercase())
        && head.chars().all(|c| c.is_ascii_alphanumeric());
    ok.then_some(head)
}

/// What the planner needs to know about a Node, seen from one NodeSet.
pub fn child(nodeset: &NodeSet, node: &Node) -> ChildNode {
    let uid = nodeset.metadata.uid.as_deref().unwrap_or_default();
    let ownership = match nodeset_owner(node) {
        Some((_, owner_uid)) if !uid.is_empty() && owner_uid == uid => Ownership::Ours,
        _ if has_controller(node) => Ownership::Other,
        _ => Ownership::Orphan,
    };
    let annotations = node.annotations();
    let ready_since = kubelet_ready(node);
    let (phase, message) = machine(node).unwrap_or((None, None));
    let health = if phase == Some(MachinePhase::Failed) {
        Health::Failed
    } else if ready_since.is_some() {
        Health::Ready
    } else if phase == Some(MachinePhase::Ready) {
        Health::NotReady
    } else {
        Health::Unregistered
    };
    let failure = match (health, message) {
        (Health::Ready, _) | (_, None) => None,
        (_, Some("")) => None,
        // The condition a NodeSet creates its Nodes with: nothing has happened yet.
        (_, Some(LAUNCHING_MESSAGE)) if phase == Some(MachinePhase::Launching) => None,
        (_, Some(m)) => Some(Failure {
            reason: message_reason(m)
                .map(str::to_string)
                .unwrap_or_else(|| match phase {
                    Some(MachinePhase::Failed) => "MachineFailed".to_string(),
                    _ => "MachinePending".to_string(),
                }),
            message: format!("{}: {m}", node.name_any()),
        }),
    };
    // What the replacement backoff counts: a failed machine, or a create that retrying
    // cannot fix.
    let failed_at = match (&health, &failure) {
        (Health::Failed, _) => machine_written_at(node).or(Some(Timestamp::UNIX_EPOCH)),
        (Health::Unregistered, Some(f)) if NON_RETRYABLE_REASONS.contains(&f.reason.as_str()) => {
            machine_written_at(node)
        }
        _ => None,
    };
    ChildNode {
        name: node.name_any(),
        ownership,
        matches_selector: nodeset.spec.selector.matches(node.labels()),
        class_matches: annotations.get(NODE_CLASS_ANNOTATION).is_some_and(|c| {
            nodeset
                .spec
                .template
                .spec
                .node_classes()
                .contains(&c.as_str())
        }),
        deleting: node.metadata.deletion_timestamp.is_some(),
        delete_marked: annotations
            .get(DELETE_NODE_ANNOTATION)
            .is_some_and(|v| v != "false"),
        health,
        ready_since,
        created: node.metadata.creation_timestamp.as_ref().map(|t| t.0),
        launched: annotations
            .get(LAUNCHED_AT_ANNOTATION)
            .and_then(|t| t.parse().ok()),
        class_generation: annotations
            .get(NODE_CLASS_GENERATION_ANNOTATION)
            .and_then(|g| g.parse().ok()),
        failure,
        failed_at,
        built: BuildHash::parse(
            annotations.get(NODE_CLASS_ANNOTATION).map(String::as_str),
            annotations.get(BUILD_HASH_ANNOTATION).map(String::as_str),
        ),
    }
}

/// [`nodeset_owner`] of a cached Node.
pub fn cached_nodeset_owner(node: &CachedNode) -> Option<(&str, &str)> {
    node.owner_references()
        .iter()
        .find(|o| o.controller() == Some(true))
        .filter(|o| o.kind() == "NodeSet" && o.api_version().starts_with("kube-node.io/"))
        .map(|o| (o.name(), o.uid()))
}

/// Whether a cached Node has a controller owner reference.
pub fn cached_has_controller(node: &CachedNode) -> bool {
    node.owner_references()
        .iter()
        .any(|o| o.controller() == Some(true))
}

/// [`related`] of a cached Node: the filter over the cache, before any Node is rebuilt.
pub fn cached_related(nodeset: &NodeSet, node: &CachedNode) -> bool {
    let uid = nodeset.metadata.uid.as_deref();
    match cached_nodeset_owner(node) {
        Some((_, owner)) if Some(owner) == uid => return true,
        _ => {}
    }
    let labels = node.labels();
    (!cached_has_controller(node) && nodeset.spec.selector.matches_by(|k| labels.get(k)))
        || nodeset
            .spec
            .remove_nodes
            .iter()
            .any(|n| Some(n.as_str()) == node.meta().name.as_deref())
}

/// Whether a Node is related to a NodeSet at all: owned by it, adoptable by it, or named in
/// its `spec.removeNodes`.
pub fn related(nodeset: &NodeSet, node: &Node) -> bool {
    let uid = nodeset.metadata.uid.as_deref();
    match nodeset_owner(node) {
        Some((_, owner)) if Some(owner) == uid => return true,
        _ => {}
    }
    (!has_controller(node) && nodeset.spec.selector.matches(node.labels()))
        || nodeset
            .spec
            .remove_nodes
            .iter()
            .any(|n| Some(n.as_str()) == node.metadata.name.as_deref())
}

/// How cluster-autoscaler sees one Node of a NodeSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInstance {
    /// The Node's name.
    pub name: String,
    /// `spec.providerID`, when the machine has one yet.
    pub provider_id: Option<String>,
    /// Creating, running or deleting.
    pub state: InstanceState,
    /// Why creating it failed, when it did.
    pub error: Option<InstanceError>,
}

/// The state of a NodeSet's Node as cluster-autoscaler's `InstanceState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// The machine is pending, launching, registering, or failed.
    Creating,
    /// The kubelet has registered (Ready now or before).
    Running,
    /// The Node is being deleted.
    Deleting,
}

/// A failure on a Node, as cluster-autoscaler's `InstanceErrorInfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceError {
    /// The provider's reason (InsufficientCapacity, QuotaExceeded, …) or MachineFailed.
    pub reason: String,
    /// The node-controller's message.
    pub message: String,
    /// Whether the cloud is out of resources (cluster-autoscaler's `OutOfResourcesErrorClass`).
    pub out_of_resources: bool,
}

/// The Nodes of a NodeSet (owned by it, by UID) and their instance status, from any cache of
/// Nodes (a reflector `Store`'s `state()`, or a list).
pub fn nodeset_instances<'a>(
    nodeset: &NodeSet,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Vec<NodeInstance> {
    let mut out: Vec<NodeInstance> = nodes
        .into_iter()
        .map(|n| (n, child(nodeset, n)))
        .filter(|(_, c)| c.ownership == Ownership::Ours && c.matches_selector)
        .map(|(n, c)| NodeInstance {
            provider_id: n.spec.as_ref().and_then(|s| s.provider_id.clone()),
            state: if c.deleting {
                InstanceState::Deleting
            } else if matches!(c.health, Health::Ready | Health::NotReady) {
                InstanceState::Running
            } else {
                InstanceState::Creating
            },
            error: c.failure.map(|f| InstanceError {
                out_of_resources: matches!(
                    f.reason.as_str(),
                    "InsufficientCapacity" | "QuotaExceeded"
                ),
                reason: f.reason,
                message: f.message,
            }),
            name: c.name,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Counts Nodes by phase label (for the `kube_node_nodeset_nodes` gauge).
pub fn phase_counts<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeMap<&'static str, i64> {
    let mut m: BTreeMap<&'static str, i64> = [
        MachinePhase::Pending,
        MachinePhase::Launching,
        MachinePhase::Registering,
        MachinePhase::Ready,
        MachinePhase::Failed,
        MachinePhase::Deleting,
    ]
    .into_iter()
    .map(|p| (p.as_str(), 0))
    .collect();
    for n in nodes {
        *m.entry(phase_label(n)).or_default() += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_reasons() {
        assert_eq!(
            message_reason("InsufficientCapacity: insufficient capacity: none left"),
            Some("InsufficientCapacity")
        );
        assert_eq!(message_reason("the kubelet did not: x"), None);
        assert_eq!(message_reason("no colon"), None);
    }
}

/// The one trim of a cached Node, shared with the node-controller (see
/// [`kube_node_runtime::cached_node`]): it keeps everything [`child`] and the reconcile read
/// (the `Ready`, `MachineReady` and `Drifted` conditions among them). The Node cache holds
/// [`CachedNode`]s, which keep exactly what it keeps.
pub use kube_node_runtime::trim_node;

#[cfg(test)]
mod instance_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn instances_of_a_nodeset() {
        let ns: NodeSet = serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
            "metadata": {"name": "w", "uid": "u-1"},
            "spec": {"selector": {"matchLabels": {"pool": "w"}},
                     "template": {"metadata": {"labels": {"pool": "w"}}, "spec": {"nodeClassName": "sim"}}},
        }))
        .expect("NodeSet");
        let owner = json!([{"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet", "name": "w", "uid": "u-1", "controller": true}]);
        let node = |name: &str, extra: serde_json::Value| -> Node {
            let mut v = json!({"metadata": {"name": name, "labels": {"pool": "w"}, "ownerReferences": owner}});
            if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
                for (k, x) in e {
                    o.insert(k.clone(), x.clone());
                }
            }
            serde_json::from_value(v).expect("Node")
        };
        let nodes = vec![
            node(
                "w-run",
                json!({"spec": {"providerID": "sim://1"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
            node(
                "w-cap",
                json!({"status": {"conditions": [{"type": "MachineReady", "status": "False",
                "reason": "Pending", "message": "InsufficientCapacity: insufficient capacity: none"}]}}),
            ),
            serde_json::from_value(
                json!({"metadata": {"name": "stranger", "labels": {"pool": "w"}}}),
            )
            .expect("Node"),
        ];
        let got = nodeset_instances(&ns, &nodes);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "w-cap");
        assert_eq!(got[0].state, InstanceState::Creating);
        let err = got[0].error.as_ref().expect("error");
        assert_eq!(err.reason, "InsufficientCapacity");
        assert!(err.out_of_resources);
        assert_eq!(got[1].state, InstanceState::Running);
        assert_eq!(got[1].provider_id.as_deref(), Some("sim://1"));
        // Trimming keeps what the controller reads.
        let mut n = nodes[1].clone();
        trim_node(&mut n);
        assert_eq!(child(&ns, &n), child(&ns, &nodes[1]));
    }

    /// The cache's filter agrees with the one on whole Nodes, for every kind of relation.
    #[test]
    fn the_cached_filter_is_the_node_filter() {
        let ns: NodeSet = serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
            "metadata": {"name": "w", "uid": "u-1"},
            "spec": {"selector": {"matchLabels": {"pool": "w"},
                                  "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
                     "removeNodes": ["doomed"],
                     "template": {"metadata": {"labels": {"pool": "w"}}, "spec": {"nodeClassName": "sim"}}},
        }))
        .expect("NodeSet");
        let ours = json!([{"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet", "name": "w", "uid": "u-1", "controller": true}]);
        let theirs = json!([{"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet", "name": "x", "uid": "u-2", "controller": true}]);
        let other = json!([{"apiVersion": "v1", "kind": "Thing", "name": "t", "uid": "u-3", "controller": true}]);
        let cases = [
            json!({"metadata": {"name": "owned", "ownerReferences": ours}}),
            json!({"metadata": {"name": "owned-elsewhere", "labels": {"pool": "w", "zone": "a"}, "ownerReferences": theirs}}),
            json!({"metadata": {"name": "foreign", "labels": {"pool": "w", "zone": "a"}, "ownerReferences": other}}),
            json!({"metadata": {"name": "adoptable", "labels": {"pool": "w", "zone": "b"}}}),
            json!({"metadata": {"name": "wrong-zone", "labels": {"pool": "w", "zone": "c"}}}),
            json!({"metadata": {"name": "no-zone", "labels": {"pool": "w"}}}),
            json!({"metadata": {"name": "doomed", "ownerReferences": theirs}}),
            json!({"metadata": {"name": "bare"}}),
        ];
        for case in cases {
            let node: Node = serde_json::from_value(case).expect("Node");
            let cached = CachedNode::from(node.clone());
            assert_eq!(
                cached_related(&ns, &cached),
                related(&ns, &node),
                "{}",
                node.name_any()
            );
            assert_eq!(cached_nodeset_owner(&cached), nodeset_owner(&node));
            assert_eq!(child(&ns, &cached.to_node()), child(&ns, &node));
        }
    }
}
