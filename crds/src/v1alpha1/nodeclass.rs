// `printcolumn(type_ = ...)` repeats per column by design; clippy reads the repeats as
// duplicated attributes of one item.
#![allow(clippy::duplicated_attributes)]

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
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
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
    #[schemars(schema_with = "super::common::labels_32")]
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
#[x_kube(validation = Rule::new("!has(self.aws) || self.type == 'aws'").message("spec.provider.aws may be set only when spec.provider.type is aws").field_path(".aws"))]
#[x_kube(validation = Rule::new("self.type != 'aws' || has(self.aws)").message("spec.provider.aws is required when spec.provider.type is aws").field_path(".aws"))]
#[x_kube(validation = Rule::new("!has(self.exec) || self.type == 'exec'").message("spec.provider.exec may be set only when spec.provider.type is exec").field_path(".exec"))]
#[x_kube(validation = Rule::new("self.type != 'exec' || has(self.exec)").message("spec.provider.exec is required when spec.provider.type is exec").field_path(".exec"))]
pub struct ProviderSpec {
    /// The backend: `simulated` (in-process machines, no cloud), `aws` (EC2 instances) or
    /// `exec` (a program of yours that speaks the exec provider protocol).
    #[serde(rename = "type")]
    pub type_: ProviderType,

    /// Configuration of the `simulated` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulated: Option<SimulatedProviderSpec>,

    /// Configuration of the `aws` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsProviderSpec>,

    /// Configuration of the `exec` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProviderSpec>,
}

/// The backends kube-node knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    /// In-process machines that boot after a delay and play the kubelet: for tests, demos and
    /// the `kube-node simulate` command.
    Simulated,
    /// Amazon EC2 instances.
    Aws,
    /// A user-supplied program speaking the exec provider protocol (providers/exec/PROTOCOL.md).
    Exec,
}

impl ProviderType {
    /// The name as written in `spec.provider.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simulated => "simulated",
            Self::Aws => "aws",
            Self::Exec => "exec",
        }
    }
}

/// Configuration of the AWS EC2 backend.
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.ami) != has(self.amiSsmParameter)").message("spec.provider.aws: set exactly one of ami and amiSsmParameter").field_path(".ami"))]
pub struct AwsProviderSpec {
    /// The region, e.g. `eu-west-1`.
    #[schemars(length(min = 1, max = 32))]
    pub region: String,
    /// The instance type, e.g. `m7i.large`.
    #[schemars(length(min = 1, max = 64))]
    pub instance_type: String,
    /// Instance types to try, in order, when EC2 has no capacity for `instanceType`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub alternative_instance_types: Vec<String>,
    /// The AMI id (`ami-...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub ami: Option<String>,
    /// An SSM parameter holding the AMI id, resolved at launch (e.g. the EKS-optimized AMI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    pub ami_ssm_parameter: Option<String>,
    /// Subnets to launch into; machines are spread across them (and so their zones).
    #[schemars(length(min = 1, max = 32))]
    pub subnet_ids: Vec<String>,
    /// Security groups of the machines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub security_group_ids: Vec<String>,
    /// The IAM instance profile name or ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub iam_instance_profile: Option<String>,
    /// An EC2 key pair name for SSH (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub key_name: Option<String>,
    /// The root volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<AwsRootVolume>,
    /// `on-demand` (default) or `spot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_type: Option<AwsCapacityType>,
    /// Extra tags on every instance and volume.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 40))]
    pub tags: BTreeMap<String, String>,
    /// An EC2 endpoint URL override (for emulators and private endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub endpoint_url: Option<String>,
}

/// The root EBS volume of an EC2 machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsRootVolume {
    /// Size in GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65536))]
    pub size_gib: Option<i32>,
    /// The volume type (`gp3`, `gp2`, `io2`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    pub volume_type: Option<String>,
    /// The device name. Default `/dev/xvda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub device_name: Option<String>,
}

/// How an EC2 machine is bought.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AwsCapacityType {
    /// On-demand instances.
    #[default]
    #[serde(rename = "on-demand")]
    OnDemand,
    /// Spot instances.
    #[serde(rename = "spot")]
    Spot,
}

/// Configuration of the exec backend: a program run once per provider operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecProviderSpec {
    /// The program and its arguments (no shell: user data is never interpolated).
    #[schemars(length(min = 1, max = 64))]
    pub command: Vec<String>,
    /// The working directory of the program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub working_dir: Option<String>,
    /// Environment of the program: plain values or keys of the credentials Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<ExecEnvVar>,
    /// How long one operation may run before the program is killed. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// How many operations of this NodeClass may run at once. Default 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub max_concurrency: Option<u32>,
    /// Free-form configuration handed to the program in every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub config: Option<serde_json::Value>,
}

/// One environment variable of an exec program.
#[derive(KubeSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.value) != has(self.secretKey)").message("spec.provider.exec.env: set exactly one of value and secretKey").field_path(".value"))]
pub struct ExecEnvVar {
    /// The variable's name.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// A plain value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// A key of the NodeClass's credentials Secret whose value becomes the variable's value
    /// (redacted from everything the program prints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_key: Option<String>,
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true
    })
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
    /// `CapacityMatches` is False (reason `CapacityMismatch`) when registered Nodes of the
    /// class report an allocatable other than the declared `allocatable` (or `capacity`):
    /// cpu, pods and other resources exactly, memory, ephemeral-storage and hugepages within
    /// 5 %. cluster-autoscaler's scale-from-zero template is built from the declaration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Default registration timeout.
pub const DEFAULT_REGISTRATION_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(15 * 60);
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
