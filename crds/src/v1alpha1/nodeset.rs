// `printcolumn(type_ = ...)` repeats per column by design; clippy reads the repeats as
// duplicated attributes of one item.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::NodeTaint;
use crate::validation::{
    Errors, InvalidSpec, check_dns1123_subdomain, check_int_or_percent, check_label_value,
    check_qualified_name,
};

/// Keeps `spec.replicas` Nodes of one NodeClass alive, as a ReplicaSet keeps pods. Each Node it
/// creates asks the node-controller for a machine; scaling down drains and deletes machines.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kube-node.io",
    version = "v1alpha1",
    kind = "NodeSet",
    plural = "nodesets",
    shortname = "nset",
    category = "kube-node",
    status = "NodeSetStatus",
    doc = "NodeSet keeps spec.replicas Nodes of a NodeClass alive, the way a ReplicaSet keeps pods.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Class",
        type_ = "string",
        json_path = ".status.nodeClassName",
        description = "The NodeClass new Nodes get now"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Current", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Up-To-Date",
        type_ = "integer",
        json_path = ".status.updatedReplicas",
        description = "Nodes built from what the NodeSet and its NodeClass say now (not drifted)"
    ),
    printcolumn(
        name = "Free",
        type_ = "integer",
        json_path = ".status.freeMachines",
        description = "Machines of a fixed pool (bare-metal hosts) still free for this NodeSet's class"
    ),
    printcolumn(
        name = "Failures",
        type_ = "integer",
        json_path = ".status.backoff.consecutiveFailures",
        description = "Consecutive machines that failed without a success in between"
    ),
    printcolumn(
        name = "Next-Attempt",
        type_ = "string",
        json_path = ".status.backoff.nextAttemptTime",
        description = "When replacing failed machines is tried again"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.minSize) || !has(self.maxSize) || self.minSize <= self.maxSize").message("spec.minSize must be less than or equal to spec.maxSize").field_path(".minSize"))]
#[x_kube(validation = Rule::new("!has(self.selector.matchLabels) || self.selector.matchLabels.all(k, has(self.template.metadata.labels) && k in self.template.metadata.labels && self.template.metadata.labels[k] == self.selector.matchLabels[k])").message("spec.template.metadata.labels must match spec.selector.matchLabels").field_path(".template.metadata.labels"))]
#[x_kube(validation = Rule::new("!has(self.selector.matchExpressions) || self.selector.matchExpressions.all(e, e.operator == 'In' ? (has(self.template.metadata.labels) && e.key in self.template.metadata.labels && self.template.metadata.labels[e.key] in e.values) : e.operator == 'NotIn' ? (!has(self.template.metadata.labels) || !(e.key in self.template.metadata.labels) || !(self.template.metadata.labels[e.key] in e.values)) : e.operator == 'Exists' ? (has(self.template.metadata.labels) && e.key in self.template.metadata.labels) : (!has(self.template.metadata.labels) || !(e.key in self.template.metadata.labels)))").message("spec.template.metadata.labels must match spec.selector.matchExpressions").field_path(".template.metadata.labels"))]
#[x_kube(validation = Rule::new("(has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0) || (has(self.selector.matchExpressions) && size(self.selector.matchExpressions) > 0)").message("spec.selector must not be empty").field_path(".selector"))]
#[x_kube(validation = Rule::new("has(self.template.spec.nodeClassName) != has(self.template.spec.nodeClassNames)").message("exactly one of spec.template.spec.nodeClassName and spec.template.spec.nodeClassNames must be set").field_path(".template.spec.nodeClassNames"))]
#[x_kube(validation = Rule::new("!has(self.template.spec.nodeClassNames) || self.template.spec.nodeClassNames.all(c, self.template.spec.nodeClassNames.exists_one(d, d == c))").message("spec.template.spec.nodeClassNames must not name a NodeClass twice").field_path(".template.spec.nodeClassNames"))]
#[x_kube(validation = Rule::new("!has(self.strategy) || !has(self.strategy.rollingUpdate) || !has(self.strategy.type) || self.strategy.type == 'RollingUpdate'").message("spec.strategy.rollingUpdate may only be set when spec.strategy.type is RollingUpdate").field_path(".strategy.rollingUpdate"))]
#[serde(rename_all = "camelCase")]
pub struct NodeSetSpec {
    /// How many Nodes (and so machines) to keep. Default 1.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100000))]
    pub replicas: i32,

    /// Which Nodes belong to this NodeSet. Must match the template's labels; immutable in
    /// spirit (changing it releases and adopts Nodes).
    pub selector: NodeSelector,

    /// The Node every replica is made from.
    pub template: NodeTemplate,

    /// Which Nodes go first when scaling down, after Nodes already being deleted, Nodes marked
    /// with `kube-node.io/delete-node` or named in `removeNodes`, failed or unregistered Nodes,
    /// and not-Ready Nodes. Default `Newest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_policy: Option<DeletePolicy>,

    /// The smallest size cluster-autoscaler may shrink this NodeSet to. Setting `minSize` and
    /// `maxSize` opts the NodeSet into autoscaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_size: Option<i32>,

    /// The largest size cluster-autoscaler may grow this NodeSet to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_size: Option<i32>,

    /// Names of Nodes to remove. Lower `replicas` by the same count in the same update: the
    /// NodeSet then removes exactly these Nodes, never others. Entries are pruned once the Node
    /// is gone; names that are not Nodes of this NodeSet are refused in a condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::validation::node_names")]
    pub remove_nodes: Vec<String>,

    /// How many Nodes may be unhealthy (failed, or not Ready past registration) before
    /// replacing them pauses: a count or a percentage of `replicas`, rounded up. Default `50%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::int_or_percent")]
    pub max_unhealthy: Option<IntOrString>,

    /// How long a Node must be Ready to count as available. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_ready_seconds: Option<i32>,

    /// How replacing machines slows down while they keep failing: after the k-th consecutive
    /// machine that failed to register (or failed at create with an error that retrying
    /// cannot fix), the next launch waits `min(base × 2^(k−1), max)`. A Node of the NodeSet
    /// becoming Ready, a new NodeClass generation or a change of `template` starts over.
    /// Scale-ups wait too; scale-downs and `removeNodes` never do. Default `base: 30s`,
    /// `max: 30m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replacement_backoff: Option<ReplacementBackoff>,

    /// How Nodes that drifted (built from a NodeClass spec or a template that changed since)
    /// are replaced. Default `RollingUpdate` with `maxSurge: 1`, `maxUnavailable: 0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<NodeSetStrategy>,

    /// How long a replacement Node may take to become Ready during a rollout before the
    /// rollout stops (`Progressing=False`, reason `ProgressDeadlineExceeded`) instead of
    /// replacing more Nodes. A replacement whose machine fails stops it at once. Default 600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub progress_deadline_seconds: Option<i32>,

    /// With several `template.spec.nodeClassNames`: how long a NodeClass whose provider
    /// answered `InsufficientCapacity` or `QuotaExceeded` is skipped for new Nodes before it
    /// is tried again. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub class_fallback_cooldown_seconds: Option<i32>,
}

/// Default `spec.classFallbackCooldownSeconds`.
pub const DEFAULT_CLASS_FALLBACK_COOLDOWN_SECONDS: i32 = 300;

/// A NodeClass a NodeSet skips for new Nodes for a while.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassCooldown {
    /// The NodeClass.
    pub node_class_name: String,
    /// Until when it is skipped.
    pub until: Time,
    /// What its provider answered: `InsufficientCapacity` or `QuotaExceeded`.
    pub reason: String,
    /// The provider's message, with the Node it was for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// How a NodeSet replaces drifted Nodes.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.rollingUpdate) || !has(self.rollingUpdate.maxSurge) || !(string(self.rollingUpdate.maxSurge) in ['0', '0%']) || (has(self.rollingUpdate.maxUnavailable) && !(string(self.rollingUpdate.maxUnavailable) in ['0', '0%']))").message("spec.strategy.rollingUpdate.maxUnavailable must not be 0 when maxSurge is 0").field_path(".rollingUpdate.maxUnavailable"))]
pub struct NodeSetStrategy {
    /// `RollingUpdate` (default): replace drifted Nodes a few at a time, new Node first.
    /// `OnDelete`: only mark them `Drifted`; a Node deleted by a user is replaced by an
    /// up-to-date one.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<StrategyType>,
    /// The limits of `RollingUpdate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_update: Option<RollingUpdate>,
}

/// The strategy type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StrategyType {
    /// Replace drifted Nodes within `maxSurge` and `maxUnavailable`.
    #[default]
    RollingUpdate,
    /// Replace a drifted Node only when it is deleted.
    OnDelete,
}

/// The limits of a rolling replacement, with the semantics of a Deployment's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RollingUpdate {
    /// How many Nodes may exist above `replicas` while replacing (a count, or a percentage of
    /// `replicas` rounded up). Nodes being drained count. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::int_or_percent")]
    pub max_surge: Option<IntOrString>,
    /// How many Nodes below `replicas` may be unavailable while replacing (a count, or a
    /// percentage of `replicas` rounded down). Default 0. Not 0 when `maxSurge` is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::int_or_percent")]
    pub max_unavailable: Option<IntOrString>,
}

/// Default `spec.progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;

/// Where a rollout stands, persisted so a restart of the controller resumes it as it was.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The build hash (`kube-node.io/build-hash`) up-to-date Nodes carry now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_hash: Option<String>,
    /// The target the rollout stopped at, when it stopped: nothing more is replaced until the
    /// target changes (edit the NodeClass or the template, e.g. a template annotation, to
    /// try again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_hash: Option<String>,
    /// Why it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_reason: Option<String>,
    /// What stopped it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalled_message: Option<String>,
}

/// The exponential backoff of replacing failing machines.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.base) || duration(self.base) > duration('0s')").message("spec.replacementBackoff.base must be a positive duration").field_path(".base"))]
#[x_kube(validation = Rule::new("!has(self.max) || duration(self.max) > duration('0s')").message("spec.replacementBackoff.max must be a positive duration").field_path(".max"))]
#[x_kube(validation = Rule::new("!has(self.base) || !has(self.max) || duration(self.base) <= duration(self.max)").message("spec.replacementBackoff.max must not be less than spec.replacementBackoff.base").field_path(".max"))]
pub struct ReplacementBackoff {
    /// The wait after the first failure, a duration greater than zero such as `30s`.
    /// Default `30s`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::positive_duration")]
    pub base: Option<Duration>,
    /// The longest wait, a duration greater than zero such as `30m`. Default `30m`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::positive_duration")]
    pub max: Option<Duration>,
}

/// Default `spec.replacementBackoff.base`.
pub const DEFAULT_BACKOFF_BASE: std::time::Duration = std::time::Duration::from_secs(30);
/// Default `spec.replacementBackoff.max`.
pub const DEFAULT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// The replacement backoff of a NodeSet, persisted in its status so a restart of the
/// controller does not start it over.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackoffStatus {
    /// Machines that failed in a row without a Node of the NodeSet becoming Ready in between
    /// (0: no backoff).
    #[serde(default)]
    pub consecutive_failures: i32,
    /// When the most recent counted failure happened (failures up to then are counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// The reason of the most recent failure, e.g. `RegistrationTimeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_reason: Option<String>,
    /// The message of the most recent failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_message: Option<String>,
    /// When the next machine may be launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// The NodeClass generation the failures were counted against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_class_generation: Option<i64>,
    /// A hash of `spec.template` the failures were counted against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
}

fn default_replicas() -> i32 {
    1
}

/// A label selector, as `metav1.LabelSelector`, with bounded sizes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    /// Labels a Node must carry with exactly these values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::labels_16")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Set-based requirements, all of which must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

/// One set-based selector requirement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SelectorRequirement {
    /// The label key.
    #[schemars(schema_with = "crate::validation::qualified_name")]
    pub key: String,
    /// The operator.
    pub operator: SelectorOperator,
    /// The values for `In` and `NotIn`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::validation::label_values_32")]
    pub values: Vec<String>,
}

/// A set-based selector operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// The Node a NodeSet creates for each replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTemplate {
    /// Labels and annotations of each Node.
    #[serde(default)]
    pub metadata: NodeTemplateMetadata,
    /// What each Node asks for.
    pub spec: NodeTemplateSpec,
}

/// Labels and annotations put on each Node of a NodeSet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTemplateMetadata {
    /// Labels; they must match the NodeSet's selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::labels_32")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::annotations_64")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The machine each Node of a NodeSet asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTemplateSpec {
    /// The NodeClass that makes each Node's machine (a DNS-1123 subdomain, as every
    /// NodeClass name is). Exactly one of this and `nodeClassNames`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(schema_with = "crate::validation::dns1123_subdomain")]
    pub node_class_name: String,
    /// NodeClasses in order of preference (at most 8, each once): new Nodes get the first
    /// one not cooling down; a Node whose machine the provider cannot create for lack of
    /// capacity or quota is retried on the next one, and the class is skipped for
    /// `spec.classFallbackCooldownSeconds`. Exactly one of this and `nodeClassName`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::validation::node_class_names")]
    pub node_class_names: Vec<String>,
    /// Taints put on each Node, in addition to the NodeClass's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub taints: Vec<NodeTaint>,
}

impl NodeTemplateSpec {
    /// The NodeClasses in order of preference: `nodeClassNames`, else `nodeClassName`.
    pub fn node_classes(&self) -> Vec<&str> {
        if self.node_class_names.is_empty() {
            vec![self.node_class_name.as_str()]
        } else {
            self.node_class_names.iter().map(String::as_str).collect()
        }
    }

    /// The most preferred NodeClass.
    pub fn preferred_class(&self) -> &str {
        self.node_class_names
            .first()
            .map_or(self.node_class_name.as_str(), String::as_str)
    }
}

/// Which Nodes go first when a NodeSet scales down (after the unhealthy ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletePolicy {
    /// Any Node.
    Random,
    /// The most recently created Nodes.
    #[default]
    Newest,
    /// The oldest Nodes.
    Oldest,
}

/// The observed state of a NodeSet.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSetStatus {
    /// How many Nodes the NodeSet has (including ones being created or deleted).
    #[serde(default)]
    pub replicas: i32,
    /// How many of them have a Ready kubelet.
    #[serde(default)]
    pub ready_replicas: i32,
    /// How many have been Ready for at least `minReadySeconds`.
    #[serde(default)]
    pub available_replicas: i32,
    /// How many are Failed or otherwise unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_replicas: Option<i32>,
    /// How many were built from an older generation of the NodeClass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outdated_replicas: Option<i32>,
    /// How many (not being deleted) were built from what the NodeSet and its NodeClass say
    /// now: not drifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_replicas: Option<i32>,
    /// The rolling replacement of drifted Nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
    /// The NodeClass new Nodes get now: the first of the template's that is not cooling down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_class_name: Option<String>,
    /// NodeClasses skipped for new Nodes after their provider ran out of capacity or quota,
    /// and until when (kept here so a restart keeps them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_cooldowns: Vec<ClassCooldown>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The selector in string form, for the scale subresource (`kubectl scale`, HPA,
    /// cluster-autoscaler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// The replacement backoff: consecutive machine failures and when the next launch is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffStatus>,
    /// For a NodeClass with a fixed pool (bare metal): its machines still free, so the most
    /// this NodeSet can reach now is `min(maxSize, replicas + freeMachines)` (what
    /// cluster-autoscaler is told as the group's max size). Absent for clouds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_machines: Option<i32>,
    /// `Ready`, `ReplicaFailure`, `CircuitBreakerOpen`, `Backoff`, `NodeClassOutdated`,
    /// `Progressing`, `Available`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl NodeSelector {
    /// The selector in the string form of `kubectl get -l` and the scale subresource.
    pub fn to_selector_string(&self) -> String {
        let mut parts = Vec::new();
        for (k, v) in self.match_labels.iter().flatten() {
            parts.push(format!("{k}={v}"));
        }
        for e in self.match_expressions.iter().flatten() {
            parts.push(match e.operator {
                SelectorOperator::In => format!("{} in ({})", e.key, e.values.join(",")),
                SelectorOperator::NotIn => format!("{} notin ({})", e.key, e.values.join(",")),
                SelectorOperator::Exists => e.key.clone(),
                SelectorOperator::DoesNotExist => format!("!{}", e.key),
            });
        }
        parts.join(",")
    }

    /// Whether a Node with these labels matches. An empty selector matches nothing, as for
    /// ReplicaSets.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_by(|k| labels.get(k).map(String::as_str))
    }

    /// [`matches`](Self::matches), for labels held in another form: `label` looks one up.
    pub fn matches_by<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        let ml = self.match_labels.as_ref().filter(|m| !m.is_empty());
        let me = self.match_expressions.as_ref().filter(|m| !m.is_empty());
        if ml.is_none() && me.is_none() {
            return false;
        }
        let listed = |values: &[String], v: &str| values.iter().any(|x| x == v);
        ml.into_iter()
            .flatten()
            .all(|(k, v)| label(k) == Some(v.as_str()))
            && me.into_iter().flatten().all(|e| match e.operator {
                SelectorOperator::In => label(&e.key).is_some_and(|v| listed(&e.values, v)),
                SelectorOperator::NotIn => label(&e.key).is_none_or(|v| !listed(&e.values, v)),
                SelectorOperator::Exists => label(&e.key).is_some(),
                SelectorOperator::DoesNotExist => label(&e.key).is_none(),
            })
    }
}

impl NodeSetSpec {
    /// The delete policy, defaulted.
    pub fn delete_policy(&self) -> DeletePolicy {
        self.delete_policy.unwrap_or_default()
    }

    /// `spec.replacementBackoff`, defaulted: (base, max), max never below base.
    pub fn replacement_backoff(&self) -> (std::time::Duration, std::time::Duration) {
        let b = self.replacement_backoff.as_ref();
        let base = b
            .and_then(|b| b.base)
            .map_or(DEFAULT_BACKOFF_BASE, Into::into);
        let max = b
            .and_then(|b| b.max)
            .map_or(DEFAULT_BACKOFF_MAX, Into::into);
        (base, max.max(base))
    }

    /// `spec.strategy.type`, defaulted.
    pub fn strategy_type(&self) -> StrategyType {
        self.strategy
            .as_ref()
            .and_then(|s| s.type_)
            .unwrap_or_default()
    }

    /// `spec.progressDeadlineSeconds`, defaulted.
    pub fn progress_deadline(&self) -> std::time::Duration {
        let s = self
            .progress_deadline_seconds
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS)
            .max(1);
        std::time::Duration::from_secs(u64::from(s.unsigned_abs()))
    }

    /// `spec.classFallbackCooldownSeconds`, defaulted, in seconds.
    pub fn class_fallback_cooldown(&self) -> i32 {
        self.class_fallback_cooldown_seconds
            .unwrap_or(DEFAULT_CLASS_FALLBACK_COOLDOWN_SECONDS)
            .max(1)
    }

    /// Whether cluster-autoscaler may drive this NodeSet.
    pub fn autoscaling_enabled(&self) -> bool {
        self.min_size.is_some() && self.max_size.is_some()
    }
}

impl NodeSet {
    /// The NodeClass new Nodes get now: the one the status names (the first of
    /// `nodeClassNames` not cooling down after running out of capacity), else the first.
    pub fn class_for_new_nodes(&self) -> &str {
        let classes = self.spec.template.spec.node_classes();
        self.status
            .as_ref()
            .and_then(|s| s.node_class_name.as_deref())
            .filter(|c| classes.contains(c))
            .unwrap_or_else(|| self.spec.template.spec.preferred_class())
    }

    /// Decodes a NodeSet from its JSON and checks its spec (see
    /// [`NodeClass::decode_and_validate`](super::NodeClass::decode_and_validate)).
    pub fn decode_and_validate(value: serde_json::Value) -> Result<Self, InvalidSpec> {
        let ns: Self = crate::validation::decode(value)?;
        ns.spec.validate()?;
        Ok(ns)
    }
}

impl NodeSetSpec {
    /// Checks everything the schema checks, naming each invalid field.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let mut errors = Errors::default();
        if !(0..=100_000).contains(&self.replicas) {
            errors.check("spec.replicas", Err("must be between 0 and 100000".into()));
        }
        for (field, v) in [
            ("spec.minSize", self.min_size),
            ("spec.maxSize", self.max_size),
        ] {
            if v.is_some_and(|v| v < 0) {
                errors.check(field, Err("must not be negative".into()));
            }
        }
        if let (Some(min), Some(max)) = (self.min_size, self.max_size)
            && min > max
        {
            errors.check(
                "spec.minSize",
                Err("must be less than or equal to spec.maxSize".into()),
            );
        }
        if self.min_ready_seconds.is_some_and(|s| s < 0) {
            errors.check("spec.minReadySeconds", Err("must not be negative".into()));
        }
        if let Some(m) = &self.max_unhealthy {
            errors.check("spec.maxUnhealthy", check_int_or_percent(m));
        }
        if let Some(b) = &self.replacement_backoff {
            let base = b.base.map(std::time::Duration::from);
            let max = b.max.map(std::time::Duration::from);
            for (field, d) in [
                ("spec.replacementBackoff.base", base),
                ("spec.replacementBackoff.max", max),
            ] {
                if d.is_some_and(|d| d.is_zero()) {
                    errors.check(field, Err("must be a duration greater than zero".into()));
                }
            }
            if let (Some(base), Some(max)) = (base, max)
                && max < base
            {
                errors.check(
                    "spec.replacementBackoff.max",
                    Err("must not be less than spec.replacementBackoff.base".into()),
                );
            }
        }
        if self
            .class_fallback_cooldown_seconds
            .is_some_and(|s| !(1..=86400).contains(&s))
        {
            errors.check(
                "spec.classFallbackCooldownSeconds",
                Err("must be between 1 and 86400".into()),
            );
        }
        if self.progress_deadline_seconds.is_some_and(|s| s < 1) {
            errors.check(
                "spec.progressDeadlineSeconds",
                Err("must be at least 1".into()),
            );
        }
        if let Some(st) = &self.strategy {
            if st.rolling_update.is_some() && st.type_ == Some(StrategyType::OnDelete) {
                errors.check(
                    "spec.strategy.rollingUpdate",
                    Err("may only be set when spec.strategy.type is RollingUpdate".into()),
                );
            }
            if let Some(ru) = &st.rolling_update {
                for (field, v) in [
                    ("spec.strategy.rollingUpdate.maxSurge", &ru.max_surge),
                    (
                        "spec.strategy.rollingUpdate.maxUnavailable",
                        &ru.max_unavailable,
                    ),
                ] {
                    if let Some(v) = v {
                        errors.check(field, check_int_or_percent(v));
                    }
                }
                let zero = |v: &Option<IntOrString>| {
                    matches!(v, Some(IntOrString::Int(0)))
                        || matches!(v, Some(IntOrString::String(s)) if s.trim_end_matches('%').chars().all(|c| c == '0'))
                };
                // maxUnavailable defaults to 0.
                if zero(&ru.max_surge)
                    && (ru.max_unavailable.is_none() || zero(&ru.max_unavailable))
                {
                    errors.check(
                        "spec.strategy.rollingUpdate.maxUnavailable",
                        Err("must not be 0 when maxSurge is 0".into()),
                    );
                }
            }
        }
        for (i, n) in self.remove_nodes.iter().enumerate() {
            errors.check(
                format_args!("spec.removeNodes[{i}]"),
                check_dns1123_subdomain(n),
            );
        }
        let sel = &self.selector;
        if let Some(ml) = &sel.match_labels {
            super::common::check_labels("spec.selector.matchLabels", ml, &mut errors);
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            errors.check(
                format_args!("spec.selector.matchExpressions[{i}].key"),
                check_qualified_name(&e.key),
            );
            for (j, v) in e.values.iter().enumerate() {
                errors.check(
                    format_args!("spec.selector.matchExpressions[{i}].values[{j}]"),
                    check_label_value(v),
                );
            }
        }
        let empty = sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
            && sel.match_expressions.as_ref().is_none_or(Vec::is_empty);
        if empty {
            errors.check("spec.selector", Err("must not be empty".into()));
        }
        let meta = &self.template.metadata;
        let labels = meta.labels.clone().unwrap_or_default();
        super::common::check_labels("spec.template.metadata.labels", &labels, &mut errors);
        if !empty && !sel.matches(&labels) {
            errors.check(
                "spec.template.metadata.labels",
                Err("must match spec.selector".into()),
            );
        }
        for k in meta.annotations.iter().flat_map(BTreeMap::keys) {
            errors.check(
                format_args!(
                    "spec.template.metadata.annotations[{:?}]",
                    super::nodeclass::short(k)
                ),
                check_qualified_name(k),
            );
        }
        let tspec = &self.template.spec;
        match (tspec.node_class_name.is_empty(), tspec.node_class_names.is_empty()) {
            (false, true) => errors.check(
                "spec.template.spec.nodeClassName",
                check_dns1123_subdomain(&tspec.node_class_name),
            ),
            (true, false) => {
                if tspec.node_class_names.len() > 8 {
                    errors.check(
                        "spec.template.spec.nodeClassNames",
                        Err("must name at most 8 NodeClasses".into()),
                    );
                }
                for (i, c) in tspec.node_class_names.iter().enumerate() {
                    errors.check(
                        format_args!("spec.template.spec.nodeClassNames[{i}]"),
                        check_dns1123_subdomain(c),
                    );
                    if tspec.node_class_names[..i].contains(c) {
                        errors.check(
                            format_args!("spec.template.spec.nodeClassNames[{i}]"),
                            Err(format!("names NodeClass {c:?} twice")),
                        );
                    }
                }
            }
            _ => errors.check(
                "spec.template.spec.nodeClassNames",
                Err("exactly one of spec.template.spec.nodeClassName and spec.template.spec.nodeClassNames must be set".into()),
            ),
        }
        for (i, t) in self.template.spec.taints.iter().enumerate() {
            t.check(&format!("spec.template.spec.taints[{i}]"), &mut errors);
        }
        errors.finish()
    }
}
