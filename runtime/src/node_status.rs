//! The `Ready` condition of a Node whose kubelet has not started yet.
//!
//! kube-node creates Nodes before their machines boot; until the kubelet posts status such a
//! Node would have no `Ready` condition at all. kube-controller-manager's node lifecycle
//! controller does not expect that: after `--node-startup-grace-period` it writes
//! `Ready=Unknown` itself and queues the Node for a NoExecute taint, and when its own Node
//! cache has not caught up with that write by the time the taint pass reads it, the pass
//! dereferences the missing condition and the whole kube-controller-manager panics
//! (kubernetes/kubernetes#117555, fixed upstream in #122874, not in every release we support;
//! seen here with a real v1.28.3 controller manager while 1000 Nodes booted). A Node that
//! carries `Ready=Unknown` from its creation never has a missing condition. It is the same
//! condition kube-controller-manager would write, and every kubelet replaces it (its status
//! patch merges conditions by type).

use k8s_openapi::api::core::v1::{Node, NodeCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube_node_crds::names::{
    KUBELET_NOT_STARTED_MESSAGE, KUBELET_NOT_STARTED_REASON, READY_CONDITION,
};

/// `Ready=Unknown`, reason [`KUBELET_NOT_STARTED_REASON`], as of `now`.
pub fn kubelet_not_started(now: &Time) -> NodeCondition {
    NodeCondition {
        type_: READY_CONDITION.to_string(),
        status: "Unknown".to_string(),
        reason: Some(KUBELET_NOT_STARTED_REASON.to_string()),
        message: Some(KUBELET_NOT_STARTED_MESSAGE.to_string()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    }
}

/// Whether the Node has a `Ready` condition (of any status).
pub fn has_ready_condition(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == READY_CONDITION))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeStatus;

    #[test]
    fn the_condition_is_the_one_the_controller_manager_would_write() {
        let now = Time(jiff::Timestamp::now());
        let c = kubelet_not_started(&now);
        assert_eq!((c.type_.as_str(), c.status.as_str()), ("Ready", "Unknown"));
        assert_eq!(c.reason.as_deref(), Some("NodeStatusNeverUpdated"));
        assert_eq!(c.last_transition_time, Some(now));
    }

    #[test]
    fn a_node_without_status_or_ready_has_no_ready_condition() {
        let mut node = Node::default();
        assert!(!has_ready_condition(&node));
        node.status = Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "MachineReady".into(),
                status: "False".into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert!(!has_ready_condition(&node));
        let now = Time(jiff::Timestamp::now());
        node.status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
            .expect("conditions")
            .push(kubelet_not_started(&now));
        assert!(has_ready_condition(&node));
    }
}
