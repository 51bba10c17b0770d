//! Every name kube-node writes onto Kubernetes objects or cloud machines, in one place.
//!
//! Users see these in `kubectl describe node` and in their cloud console, so they are part of
//! the API: changing one is a breaking change.

/// The API group of NodeClass and NodeSet.
pub const GROUP: &str = "kube-node.io";
/// The API version of this crate's types.
pub const VERSION: &str = "v1alpha1";

/// Annotation on a core v1 Node naming the NodeClass its machine is made from. Its presence is
/// what makes a Node a request for a machine.
pub const NODE_CLASS_ANNOTATION: &str = "kube-node.io/node-class";
/// Annotation recording the provider's instance id of the Node's machine (informational; the
/// authoritative link is `spec.providerID`).
pub const INSTANCE_ID_ANNOTATION: &str = "kube-node.io/instance-id";
/// Annotation recording which `metadata.generation` of the NodeClass a Node's machine was built
/// from, so a NodeSet can report Nodes built from an older NodeClass.
pub const NODE_CLASS_GENERATION_ANNOTATION: &str = "kube-node.io/node-class-generation";
/// Annotation recording what a NodeSet's Node was built from: a short hash of each input that
/// shapes its machine (`provider=…,capacity=…,bootstrap=…`), computed from the NodeClass spec
/// when the Node is created (the NodeSet template's labels, annotations and taints are patched
/// in place instead; earlier versions also wrote a `template=…` part, now ignored). A Node whose hashes
/// differ from what its NodeSet would build now has drifted.
pub const BUILD_HASH_ANNOTATION: &str = "kube-node.io/build-hash";
/// Annotation marking a Node to be removed first when its NodeSet scales down (any value but
/// `"false"`).
pub const DELETE_NODE_ANNOTATION: &str = "kube-node.io/delete-node";
/// Annotation holding the name of the bootstrap-token Secret (in kube-system) created for the
/// Node's machine. Only the token id is in the name; the secret part never leaves the Secret.
pub const BOOTSTRAP_TOKEN_ANNOTATION: &str = "kube-node.io/bootstrap-token";
/// Annotation with the RFC 3339 time the machine was created, used for the registration timeout.
pub const LAUNCHED_AT_ANNOTATION: &str = "kube-node.io/launched-at";
/// Annotation listing the label keys kube-node applied to the Node from its NodeClass
/// (comma-separated), so that a label removed from the NodeClass is removed from the Node while
/// labels others set (kubelet, users, other controllers) are left alone.
pub const APPLIED_LABELS_ANNOTATION: &str = "kube-node.io/applied-labels";
/// Annotation listing the taints kube-node applied to the Node from its NodeClass, as
/// comma-separated `key:Effect`, for the same reason as [`APPLIED_LABELS_ANNOTATION`].
pub const APPLIED_TAINTS_ANNOTATION: &str = "kube-node.io/applied-taints";
/// Annotation listing the label keys kube-node applied to the Node from its machine (the
/// provider's `Instance::labels`, e.g. a bare-metal host's inventory labels), comma-separated,
/// so that a label removed from the inventory comes off the Node too.
pub const APPLIED_MACHINE_LABELS_ANNOTATION: &str = "kube-node.io/applied-machine-labels";

/// Annotation listing the label keys a NodeSet applied to the Node from its template
/// (comma-separated), so that a label removed from the template comes off its Nodes in place
/// while labels others set stay.
pub const TEMPLATE_LABELS_ANNOTATION: &str = "kube-node.io/template-labels";
/// Annotation listing the annotation keys a NodeSet applied to the Node from its template, for
/// the same reason as [`TEMPLATE_LABELS_ANNOTATION`].
pub const TEMPLATE_ANNOTATIONS_ANNOTATION: &str = "kube-node.io/template-annotations";
/// Annotation listing the taints a NodeSet applied to the Node from its template, as
/// comma-separated `key:Effect`, for the same reason as [`TEMPLATE_LABELS_ANNOTATION`].
pub const TEMPLATE_TAINTS_ANNOTATION: &str = "kube-node.io/template-taints";
/// Annotation with a hash of the template labels, annotations and taints last applied to the
/// Node, so a NodeSet finds the Nodes a template change has not reached without reading every
/// Node whole.
pub const TEMPLATE_HASH_ANNOTATION: &str = "kube-node.io/template-hash";

/// Label on Nodes created by a NodeSet naming it (the NodeSet's selector usually matches on it).
pub const NODESET_LABEL: &str = "kube-node.io/nodeset";
/// Label on Nodes naming their NodeClass, so `kubectl get nodes -l` can select by class.
pub const NODE_CLASS_LABEL: &str = "kube-node.io/node-class";
/// Label the machines of a simulated group put on the Nodes they register (value: the group's
/// name), as GKE's put `cloud.google.com/gke-nodepool`. Half of the adoption rule of
/// group-backed NodeSets; the other half is a providerID among the group's machines.
pub const GROUP_LABEL: &str = "kube-node.io/group";
/// The label GKE's kubelets register their Nodes with (value: the node pool's name): the
/// adoption label of a NodeSet over a GKE node pool.
pub const GKE_NODE_POOL_LABEL: &str = "cloud.google.com/gke-nodepool";
/// Condition on a NodeSet of a group-backed NodeClass: whether its group's machines match the
/// group's size (False when they have disagreed for longer than the registration timeout, or
/// when another NodeSet owns the group).
pub const GROUP_CONDITION: &str = "GroupSynced";
/// Event and condition reason on a Node that names a group-backed NodeClass directly.
pub const GROUP_BACKED_REASON: &str = "GroupBacked";

/// Finalizer that keeps a Node until its machine is confirmed gone.
pub const MACHINE_FINALIZER: &str = "kube-node.io/machine";
/// Finalizer that keeps a NodeClass while Nodes still use it (as `kubernetes.io/pvc-protection`
/// keeps a PersistentVolumeClaim in use): deleting their machines needs the class.
pub const NODECLASS_IN_USE_FINALIZER: &str = "kube-node.io/nodeclass-in-use";

/// Taint kept on a Node from its creation until its kubelet reports Ready, so nothing is
/// scheduled onto a machine that does not exist yet.
pub const UNREGISTERED_TAINT: &str = "kube-node.io/unregistered";

/// Taint that rides along with [`UNREGISTERED_TAINT`] (added in the same write, removed in the
/// same write) so that a stock cluster-autoscaler counts a Node that is not in service yet as
/// upcoming capacity, not as a full Node: every release from 1.28 on treats a Node with a taint
/// under the `ignore-taint.cluster-autoscaler.kubernetes.io/` prefix as not ready
/// (`FilterOutNodesWithIgnoredTaints` / `FilterOutNodesWithStartupTaints` in
/// `utils/taints/taints.go`), hence as `NotStarted` and replaced by the node group's template in
/// its scale-up simulation, and drops it from templates (`SanitizeTaints`). Its effect is
/// `PreferNoSchedule`: it is only a marker; keeping pods off the Node is the unregistered
/// taint's job, and a pod that tolerates the unregistered taint (a CNI agent, say) must still
/// be able to land.
pub const AUTOSCALER_UNREGISTERED_TAINT: &str =
    "ignore-taint.cluster-autoscaler.kubernetes.io/kube-node-unregistered";
/// The effect of [`AUTOSCALER_UNREGISTERED_TAINT`].
pub const AUTOSCALER_UNREGISTERED_TAINT_EFFECT: &str = "PreferNoSchedule";

/// Node condition type that carries the machine's lifecycle phase as its reason.
pub const MACHINE_READY_CONDITION: &str = "MachineReady";
/// The [`MACHINE_READY_CONDITION`] message of a machine about to be (or being) created: the
/// node-controller writes it before its create call, and a NodeSet creates its Nodes with it
/// already in `status` (the API server keeps a Node's status on create), which saves that
/// write.
pub const LAUNCHING_MESSAGE: &str = "creating the machine";

/// Reason of the `Ready=Unknown` condition a Node requesting a machine carries from its creation
/// until its kubelet posts status (the reason kube-controller-manager itself writes for a Node
/// whose kubelet never posted); built by `kube_node_runtime::node_status`.
pub const KUBELET_NOT_STARTED_REASON: &str = "NodeStatusNeverUpdated";
/// Message of that condition.
pub const KUBELET_NOT_STARTED_MESSAGE: &str =
    "Kubelet never posted node status: kube-node created this Node before its machine booted.";

/// NodeClass/NodeSet condition: the summary condition.
pub const READY_CONDITION: &str = "Ready";
/// NodeSet condition: creating or deleting a Node (or its machine) failed.
pub const REPLICA_FAILURE_CONDITION: &str = "ReplicaFailure";
/// NodeSet condition: replacements are paused because too many Nodes are unhealthy.
pub const CIRCUIT_BREAKER_CONDITION: &str = "CircuitBreakerOpen";
/// NodeClass condition: the registered Nodes of the class report the allocatable the class
/// declares (False, reason [`CAPACITY_MISMATCH_REASON`], names the resource and both values).
pub const CAPACITY_CONDITION: &str = "CapacityMatches";
/// Reason of a True [`CAPACITY_CONDITION`] (and of the Normal event when it clears).
pub const CAPACITY_MATCHES_REASON: &str = "CapacityMatches";
/// Reason of a False [`CAPACITY_CONDITION`] and of its Warning event.
pub const CAPACITY_MISMATCH_REASON: &str = "CapacityMismatch";
/// NodeSet condition: launching machines is slowed down because machines keep failing.
pub const BACKOFF_CONDITION: &str = "Backoff";
/// NodeSet event reason: one more step of the replacement backoff.
pub const BACKOFF_EVENT_REASON: &str = "ReplacementBackoff";
/// NodeSet condition: some Nodes were built from an older generation of the NodeClass.
pub const OUTDATED_CONDITION: &str = "NodeClassOutdated";
/// NodeSet condition (with several `nodeClassNames`): True while new Nodes get a fallback
/// class because a preferred one ran out of capacity or quota. Also the reason of the events
/// of a Node moved to the next class.
pub const CLASS_FALLBACK_CONDITION: &str = "NodeClassFallback";
/// Node condition (written by the nodeset-controller): the Node was built from a NodeClass spec
/// or NodeSet template that has changed since; its reason names what changed.
pub const DRIFTED_CONDITION: &str = "Drifted";
/// NodeSet condition, as a Deployment's: a rollout is replacing drifted Nodes (True), is
/// complete (True, `NodeSetUpToDate`), or stopped (False, `ProgressDeadlineExceeded`).
pub const PROGRESSING_CONDITION: &str = "Progressing";
/// NodeSet condition, as a Deployment's: at least `replicas − maxUnavailable` Nodes are
/// available.
pub const AVAILABLE_CONDITION: &str = "Available";
/// NodeSet event reason: a drifted Node is being replaced (one event per Node).
pub const REPLACED_EVENT_REASON: &str = "ReplacingDriftedNode";
/// NodeClass condition: Nodes still use the NodeClass (True with their count); while it is
/// being deleted, the deletion waits for them.
pub const IN_USE_CONDITION: &str = "InUse";

/// Field manager name used for server-side apply by kube-node's controllers.
pub const FIELD_MANAGER: &str = "kube-node";

/// Tags every provider puts on a machine at launch (cloud tags, labels, or the equivalent).
pub mod tags {
    /// The cluster the machine belongs to (the `--cluster-name` of kube-node).
    pub const CLUSTER: &str = "kube-node.io/cluster";
    /// The name of the Node the machine serves.
    pub const NODE_NAME: &str = "kube-node.io/node-name";
    /// The UID of the Node the machine serves: the idempotency key of create.
    pub const NODE_UID: &str = "kube-node.io/node-uid";
    /// The NodeSet owning the Node, when there is one.
    pub const NODESET: &str = "kube-node.io/nodeset";
    /// The NodeClass the machine was made from.
    pub const NODE_CLASS: &str = "kube-node.io/node-class";
    /// Marks machines created by kube-node.
    pub const MANAGED_BY: &str = "managed-by";
    /// The value of [`MANAGED_BY`].
    pub const MANAGED_BY_VALUE: &str = "kube-node";
}

/// The lifecycle phase of a Node's machine, carried as the reason of the `MachineReady` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MachinePhase {
    /// The Node exists; no machine has been requested yet (or the NodeClass is not usable).
    Pending,
    /// The provider accepted the create; the machine is booting.
    Launching,
    /// The machine runs; its kubelet has not reported Ready yet.
    Registering,
    /// The kubelet reported Ready.
    Ready,
    /// The machine failed (registration timeout, vanished machine, terminal provider error).
    Failed,
    /// The Node is being deleted: draining and deleting the machine.
    Deleting,
}

impl MachinePhase {
    /// The phase as it appears in the condition reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Launching => "Launching",
            Self::Registering => "Registering",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
            Self::Deleting => "Deleting",
        }
    }

    /// Parses a condition reason back into a phase.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Pending" => Self::Pending,
            "Launching" => Self::Launching,
            "Registering" => Self::Registering,
            "Ready" => Self::Ready,
            "Failed" => Self::Failed,
            "Deleting" => Self::Deleting,
            _ => return None,
        })
    }
}

impl std::fmt::Display for MachinePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
