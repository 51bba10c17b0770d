//! The instances of a node group, as cluster-autoscaler's `NodeGroupNodes` wants them.
//!
//! Pure: built from the NodeSet and the Nodes (the nodeset-controller decides which Nodes are
//! the NodeSet's and in which state they are, so both agree).

use k8s_openapi::api::core::v1::Node;
use kube_node_crds::names::REPLICA_FAILURE_CONDITION;
use kube_node_crds::v1alpha1::{NodeSet, find_condition};
use nodeset_controller::{
    InstanceError as NodeInstanceError, InstanceState, NodeInstance, nodeset_instances,
};

use crate::proto::{Instance, InstanceErrorInfo, InstanceStatus, instance_status};

/// cluster-autoscaler's `cloudprovider.OutOfResourcesErrorClass`: the group cannot grow now,
/// so CA backs off from it and tries another group.
pub const OUT_OF_RESOURCES_ERROR_CLASS: i32 = 1;
/// cluster-autoscaler's `cloudprovider.OtherErrorClass`.
pub const OTHER_ERROR_CLASS: i32 = 99;

/// The prefix of the instance id of a Node whose machine has no provider ID yet.
/// cluster-autoscaler matches instances to Nodes by `spec.providerID`, so such an instance
/// counts as not registered yet, which is what it is.
pub const PENDING_ID_PREFIX: &str = "kube-node://";

const OUT_OF_RESOURCES_REASONS: &[&str] = &["InsufficientCapacity", "QuotaExceeded"];

fn mentions_out_of_resources(s: &str) -> bool {
    OUT_OF_RESOURCES_REASONS.iter().any(|r| s.contains(r))
}

/// The reason of the NodeSet's `ReplicaFailure` condition, when it is True.
fn replica_failure(nodeset: &NodeSet) -> Option<&str> {
    let conditions = nodeset.status.as_ref().map(|s| s.conditions.as_slice())?;
    find_condition(conditions, REPLICA_FAILURE_CONDITION)
        .filter(|c| c.status == "True")
        .map(|c| c.reason.as_str())
}

/// Why the NodeSet is backing off launching machines, when it is: (reason, message) for
/// cluster-autoscaler.
pub fn backoff(nodeset: &NodeSet) -> Option<(String, String)> {
    let b = nodeset.status.as_ref()?.backoff.as_ref()?;
    if b.consecutive_failures <= 0 {
        return None;
    }
    let reason = b
        .last_failure_reason
        .clone()
        .unwrap_or_else(|| "MachineFailed".to_string());
    let next = b
        .next_attempt_time
        .as_ref()
        .map_or_else(|| "soon".to_string(), |t| t.0.to_string());
    let message = format!(
        "NodeSet {} is backing off after {} consecutive machine failures (last: {}: {}); \
         next launch at {next}",
        nodeset.metadata.name.as_deref().unwrap_or_default(),
        b.consecutive_failures,
        reason,
        b.last_failure_message.as_deref().unwrap_or_default(),
    );
    Some((reason, message))
}

/// The instance id of a Node of the group.
pub fn instance_id(name: &str, provider_id: Option<&str>) -> String {
    match provider_id {
        Some(p) if !p.is_empty() => p.to_string(),
        _ => format!("{PENDING_ID_PREFIX}{name}"),
    }
}

fn to_proto(
    i: &NodeInstance,
    set_failure: Option<&str>,
    backoff: Option<&(String, String)>,
) -> Instance {
    let state = match i.state {
        InstanceState::Creating => instance_status::InstanceState::InstanceCreating,
        InstanceState::Running => instance_status::InstanceState::InstanceRunning,
        InstanceState::Deleting => instance_status::InstanceState::InstanceDeleting,
    };
    // A machine still being created in a NodeSet that backs off is reported with the
    // NodeSet's failure, so cluster-autoscaler backs off the group and tries another one.
    // A specific error of the Node itself (InsufficientCapacity, …) stays; a Node that only
    // says it is pending gets the NodeSet's.
    let generic = i
        .error
        .as_ref()
        .is_none_or(|e| matches!(e.reason.as_str(), "" | "MachinePending" | "MachineFailed"));
    let from_backoff = match (generic, i.state, backoff) {
        (true, InstanceState::Creating, Some((reason, message))) => Some(NodeInstanceError {
            reason: reason.clone(),
            message: message.clone(),
            out_of_resources: false,
        }),
        _ => None,
    };
    // A machine that is only booting says so in its condition ("MachinePending"): that is
    // progress, not an error. cluster-autoscaler counts every creating instance that carries
    // error info as a failed scale-up, backs the whole group off for minutes and deletes the
    // machines, so only real failures are reported.
    let own = i.error.as_ref().filter(|e| {
        !(matches!(i.state, InstanceState::Creating) && e.reason.as_str() == "MachinePending")
    });
    let error_info = from_backoff.as_ref().or(own).map(|e| {
        // Tolerant on purpose: the node-controller writes "Reason: message" into the
        // MachineReady condition; older or other writers may only mention the reason, or
        // the NodeSet's ReplicaFailure condition may be the only place naming it.
        let out_of_resources = e.out_of_resources
            || mentions_out_of_resources(&e.reason)
            || mentions_out_of_resources(&e.message)
            || (matches!(e.reason.as_str(), "" | "MachinePending" | "MachineFailed")
                && set_failure.is_some_and(|r| OUT_OF_RESOURCES_REASONS.contains(&r)));
        InstanceErrorInfo {
            error_code: if e.reason.is_empty() {
                "MachineFailed".to_string()
            } else {
                e.reason.clone()
            },
            error_message: e.message.clone(),
            instance_error_class: if out_of_resources {
                OUT_OF_RESOURCES_ERROR_CLASS
            } else {
                OTHER_ERROR_CLASS
            },
        }
    });
    Instance {
        id: instance_id(&i.name, i.provider_id.as_deref()),
        status: Some(InstanceStatus {
            instance_state: state as i32,
            error_info,
        }),
    }
}

/// The instances of a NodeSet, one per Node it owns, sorted by Node name.
pub fn instances<'a>(
    nodeset: &NodeSet,
    nodes: impl IntoIterator<Item = &'a Node>,
) -> Vec<Instance> {
    let failure = replica_failure(nodeset);
    let backoff = backoff(nodeset);
    nodeset_instances(nodeset, nodes)
        .iter()
        .map(|i| to_proto(i, failure, backoff.as_ref()))
        .collect()
}

/// How many Nodes of the NodeSet are registered (Running, not being deleted): the floor of
/// `NodeGroupDecreaseTargetSize`.
pub fn registered<'a>(nodeset: &NodeSet, nodes: impl IntoIterator<Item = &'a Node>) -> usize {
    nodeset_instances(nodeset, nodes)
        .iter()
        .filter(|i| i.state == InstanceState::Running)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creating(reason: &str) -> NodeInstance {
        NodeInstance {
            name: "n".into(),
            provider_id: Some("simulated:///a/1".into()),
            state: InstanceState::Creating,
            error: Some(NodeInstanceError {
                reason: reason.into(),
                message: "n: the machine is booting".into(),
                out_of_resources: false,
            }),
        }
    }

    /// A real cluster-autoscaler (1.28 and 1.31) counted booting machines reported with error
    /// info as a failed scale-up, backed the group off for five minutes and tried to delete
    /// them: a machine that is only booting carries no error.
    #[test]
    fn a_booting_machine_carries_no_error_but_a_failed_one_does() {
        let booting = to_proto(&creating("MachinePending"), None, None);
        let status = booting.status.expect("status");
        assert_eq!(
            status.instance_state,
            instance_status::InstanceState::InstanceCreating as i32
        );
        assert!(status.error_info.is_none(), "{:?}", status.error_info);

        let failed = to_proto(&creating("InsufficientCapacity"), None, None);
        let info = failed.status.and_then(|s| s.error_info).expect("error");
        assert_eq!(info.error_code, "InsufficientCapacity");
        assert_eq!(info.instance_error_class, OUT_OF_RESOURCES_ERROR_CLASS);

        // A NodeSet in replacement backoff still reports its failure on a booting machine.
        let backoff = ("RegistrationTimeout".to_string(), "backing off".to_string());
        let held = to_proto(&creating("MachinePending"), None, Some(&backoff));
        let info = held.status.and_then(|s| s.error_info).expect("error");
        assert_eq!(info.error_code, "RegistrationTimeout");
    }
}
