use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::Duration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NodeTaint, SecretReference};

/// How to make a machine for a Node: the provider and its configuration, the credentials, what
/// every Node of the class carries, and how the machine joins the cluster.
///
/// A core v1 Node with the annotation `kube-node.io/node-class: <name>` asks kube-node for a
/// machine of this class.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "kube-node.io",
    version = "v1alpha1",
    kind = "NodeClass",
    plural = "nodeclasses",
    shortname = "nc",
    category = "kube-node",
    status = "NodeClassStatus",
    doc = "NodeClass describes how to make a machine for a Node: provider, machine type, image, zone and credentials.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider.type"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct NodeClassSpec {
    /// Which backend makes the machines, and its configuration.
    pub provider: ProviderSpec,

    /// The Secret holding the provider's credentials. Credentials are read only from here;
    /// they never appear in logs, events, annotations or errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,

    /// Labels put on every Node of this class (a kubelet joining an existing Node ignores its
    /// own `--node-labels`, so kube-node applies them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: BTreeMap<String, String>,

    /// Taints put on every Node of this class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub taints: Vec<NodeTaint>,

    /// The resources of one machine, as the kubelet will report them in `status.capacity`
    /// (cpu, memory, pods, ephemeral-storage and extended resources such as `nvidia.com/gpu`).
    /// Used to build the autoscaler's template node and by the simulated kubelet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub capacity: BTreeMap<String, Quantity>,

    /// The allocatable resources of one machine; defaults to `capacity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub allocatable: Option<BTreeMap<String, Quantity>>,

    /// How a new machine joins the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<BootstrapSpec>,

    /// How long kube-node waits for a machine to register and to drain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsSpec>,
}

/// The backend that makes machines: `type` names it and the field of the same name configures
/// it. Only that one field may be set.
#[derive(KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.simulated) || self.type == 'simulated'").message("spec.provider.simulated may be set only when spec.provider.type is simulated").field_path(".simulated"))]
pub struct ProviderSpec {
    /// The backend: `simulated` (in-process machines, no cloud).
    #[serde(rename = "type")]
    pub type_: ProviderType,

    /// Configuration of the `simulated` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimulatedProviderSpec>,
}

/// The backends kube-node knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// In-process machines that boot after a delay and play the kubelet: for tests, demos and
    /// the `kube-node simulate` command.
    Simulated,
}

impl ProviderType {
    /// The name as written in `spec.provider.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simulated => "simulated",
        }
    }
}

/// Configuration of the simulated backend. Every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SimulatedProviderSpec {
    /// The machine type reported for every machine (label `node.kubernetes.io/instance-type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub instance_type: Option<String>,
    /// Zones machines are spread across (label `topology.kubernetes.io/zone`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub zones: Vec<String>,
    /// How long a machine takes from create to a Ready kubelet, e.g. `5s`. Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_delay: Option<Duration>,
    /// How long a machine takes to disappear after delete. Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete_delay: Option<Duration>,
    /// How long a new machine stays invisible to list calls (eventual consistency). Default `0s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_lag: Option<Duration>,
    /// The most machines that can exist at once; creates beyond it fail with
    /// InsufficientCapacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub capacity: Option<u32>,
    /// The account quota on machines; creates beyond it fail with QuotaExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub quota: Option<u32>,
    /// Faults to inject into provider calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<SimulatedFaults>,
    /// Whether the simulated kubelet registers machines at all. `false` lets a registration
    /// timeout be observed. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<bool>,
    /// Seed of the random choices (faults, zones), so a run replays exactly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// Faults the simulated backend injects. Percentages apply to each create call.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SimulatedFaults {
    /// Percentage of creates failing with InsufficientCapacity.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub insufficient_capacity_percent: u32,
    /// Percentage of calls failing with Throttled.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub throttle_percent: u32,
    /// Percentage of calls failing with a Transient error.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub transient_percent: u32,
    /// Fail exactly the Nth create call (1-based) with a Transient error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub fail_create_call: Option<u32>,
}

/// How a new machine joins the cluster (kubeadm join with a per-machine bootstrap token).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// The API server endpoint machines join, `host:port` or `https://host:port`. Defaults to
    /// the server kube-node itself talks to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub api_server_endpoint: Option<String>,
    /// How long a machine's bootstrap token is valid. Default `1h`.
    #[serde(default, rename = "tokenTTL", skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<Duration>,
}

/// Timeouts of a machine's lifecycle.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// How long a machine may take from create to a Ready kubelet before it is marked Failed.
    /// Default `15m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration: Option<Duration>,
    /// How long draining may take before the machine is deleted anyway. Default `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<Duration>,
}

/// The observed state of a NodeClass.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeClassStatus {
    /// The generation of the spec the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` is True when the provider accepted the configuration and credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Default registration timeout.
pub const DEFAULT_REGISTRATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// Default drain timeout.
pub const DEFAULT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// Default bootstrap token lifetime.
pub const DEFAULT_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(60 * 60);

impl NodeClassSpec {
    /// The registration timeout, defaulted.
    pub fn registration_timeout(&self) -> std::time::Duration {
        self.timeouts
            .as_ref()
            .and_then(|t| t.registration)
            .map_or(DEFAULT_REGISTRATION_TIMEOUT, Into::into)
    }

    /// The drain timeout, defaulted.
    pub fn drain_timeout(&self) -> std::time::Duration {
        self.timeouts
            .as_ref()
            .and_then(|t| t.drain)
            .map_or(DEFAULT_DRAIN_TIMEOUT, Into::into)
    }

    /// The bootstrap token lifetime, defaulted.
    pub fn token_ttl(&self) -> std::time::Duration {
        self.bootstrap
            .as_ref()
            .and_then(|b| b.token_ttl)
            .map_or(DEFAULT_TOKEN_TTL, Into::into)
    }

    /// The allocatable resources: `allocatable` when given, else `capacity`.
    pub fn allocatable_or_capacity(&self) -> &BTreeMap<String, Quantity> {
        self.allocatable.as_ref().unwrap_or(&self.capacity)
    }
}
