//! NodeClass in-use protection, as Kubernetes protects a PersistentVolumeClaim in use
//! (`kubernetes.io/pvc-protection`): every NodeClass carries a finalizer, and a NodeClass being
//! deleted keeps it until no Node uses the class any more. Deleting a Node's machine needs its
//! NodeClass (the provider, its credentials), so a NodeClass deleted first would strand its
//! Nodes in `Deleting: NodeClassNotFound` with their machines still running.
//!
//! While it waits, the NodeClass's `InUse` condition and a Normal event say how many Nodes
//! still use it. The decision is pure ([`step`], [`in_use_condition`]); `nodeclass.rs` acts.

use kube::ResourceExt;
use kube_node_crds::NodeClass;
use kube_node_crds::names::{MACHINE_FINALIZER, NODE_CLASS_ANNOTATION, NODECLASS_IN_USE_FINALIZER};
use kube_node_runtime::CachedNode;

/// What the protection does with a NodeClass in this pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A live NodeClass without the finalizer: add it.
    AddFinalizer,
    /// Nothing to change about the finalizer.
    Keep,
    /// Being deleted and no Node uses it any more: remove the finalizer, deletion completes.
    Release,
}

/// The next step for a NodeClass used by `in_use` Nodes.
pub(crate) fn step(deleting: bool, has_finalizer: bool, in_use: usize) -> Step {
    match (deleting, has_finalizer) {
        (false, false) => Step::AddFinalizer,
        (true, true) if in_use == 0 => Step::Release,
        _ => Step::Keep,
    }
}

/// Whether the NodeClass has the in-use finalizer.
pub(crate) fn has_finalizer(class: &NodeClass) -> bool {
    class
        .finalizers()
        .iter()
        .any(|f| f == NODECLASS_IN_USE_FINALIZER)
}

/// Whether a Node uses NodeClass `class`: it names the class and either is not being deleted
/// or still has its machine finalizer (its machine may still exist).
pub(crate) fn uses(node: &CachedNode, class: &str) -> bool {
    node.annotations().get(NODE_CLASS_ANNOTATION) == Some(class)
        && (node.deletion_timestamp().is_none() || node.has_finalizer(MACHINE_FINALIZER))
}

/// The `InUse` condition: (status, reason, message).
pub(crate) fn in_use_condition(
    deleting: bool,
    in_use: usize,
) -> (&'static str, &'static str, String) {
    let nodes = |n: usize| {
        if n == 1 {
            "1 Node".to_string()
        } else {
            format!("{n} Nodes")
        }
    };
    match (deleting, in_use) {
        (false, 0) => (
            "False",
            "NotInUse",
            "no Node uses this NodeClass".to_string(),
        ),
        (false, n) => ("True", "InUse", format!("{} use this NodeClass", nodes(n))),
        (true, 0) => (
            "False",
            "NotInUse",
            "no Node uses this NodeClass: its deletion completes".to_string(),
        ),
        (true, n) => (
            "True",
            "DeletionWaiting",
            format!(
                "deletion waits for {} that still use this NodeClass; their machines are deleted \
                 through it (delete them, or scale their NodeSets to 0)",
                nodes(n)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    fn node(class: &str, deleting: bool, finalizer: bool) -> CachedNode {
        CachedNode::from(Node {
            metadata: ObjectMeta {
                annotations: Some([(NODE_CLASS_ANNOTATION.to_string(), class.to_string())].into()),
                deletion_timestamp: deleting.then(|| Time(jiff::Timestamp::now())),
                finalizers: finalizer.then(|| vec![MACHINE_FINALIZER.to_string()]),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[test]
    fn the_finalizer_is_added_kept_while_used_and_released_when_unused() {
        assert_eq!(step(false, false, 0), Step::AddFinalizer);
        assert_eq!(step(false, false, 3), Step::AddFinalizer);
        assert_eq!(step(false, true, 0), Step::Keep, "a live class keeps it");
        assert_eq!(
            step(true, true, 2),
            Step::Keep,
            "deletion waits for its Nodes"
        );
        assert_eq!(step(true, true, 0), Step::Release);
        assert_eq!(
            step(true, false, 0),
            Step::Keep,
            "never re-added once deleting"
        );
    }

    #[test]
    fn a_node_uses_its_class_until_its_machine_finalizer_is_gone() {
        assert!(uses(&node("c", false, false), "c"), "a new Node");
        assert!(uses(&node("c", false, true), "c"));
        assert!(
            uses(&node("c", true, true), "c"),
            "being deleted, machine not gone"
        );
        assert!(!uses(&node("c", true, false), "c"), "machine gone");
        assert!(!uses(&node("other", false, true), "c"));
        assert!(!uses(&CachedNode::from(Node::default()), "c"));
    }

    #[test]
    fn the_condition_names_the_count() {
        let (s, r, m) = in_use_condition(true, 3);
        assert_eq!((s, r), ("True", "DeletionWaiting"));
        assert!(m.contains("3 Nodes"), "{m}");
        assert!(in_use_condition(true, 1).2.contains("1 Node "));
        assert_eq!(in_use_condition(false, 0).0, "False");
        assert!(in_use_condition(false, 2).2.contains("2 Nodes"));
    }
}
