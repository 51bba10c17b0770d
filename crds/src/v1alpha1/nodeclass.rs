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
use crate::validation::{
    Errors, InvalidSpec, check_dns1123_label, check_dns1123_subdomain, check_endpoint,
    check_env_name, check_gcp_location, check_gcp_project, check_gke_name, check_group_name,
    check_label_value, check_qualified_name, check_quantity, check_url,
};

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
    #[schemars(schema_with = "crate::validation::labels_32")]
    pub labels: BTreeMap<String, String>,

    /// Taints put on every Node of this class.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub taints: Vec<NodeTaint>,

    /// The resources of one machine, as the kubelet will report them in `status.capacity`
    /// (cpu, memory, pods, ephemeral-storage and extended resources such as `nvidia.com/gpu`).
    /// Used to build the autoscaler's template node and by the simulated kubelet.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::validation::quantities")]
    pub capacity: BTreeMap<String, Quantity>,

    /// The allocatable resources of one machine; defaults to `capacity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::quantities_nullable")]
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
#[x_kube(validation = Rule::new("!has(self.baremetal) || self.type == 'baremetal'").message("spec.provider.baremetal may be set only when spec.provider.type is baremetal").field_path(".baremetal"))]
#[x_kube(validation = Rule::new("self.type != 'baremetal' || has(self.baremetal)").message("spec.provider.baremetal is required when spec.provider.type is baremetal").field_path(".baremetal"))]
#[x_kube(validation = Rule::new("!has(self.gke) || self.type == 'gke'").message("spec.provider.gke may be set only when spec.provider.type is gke").field_path(".gke"))]
#[x_kube(validation = Rule::new("self.type != 'gke' || has(self.gke)").message("spec.provider.gke is required when spec.provider.type is gke").field_path(".gke"))]
pub struct ProviderSpec {
    /// The backend: `simulated` (in-process machines, no cloud), `aws` (EC2 instances), `exec`
    /// (a program of yours that speaks the exec provider protocol), `baremetal` (servers with
    /// Redfish BMCs) or `gke` (the machines of a GKE node pool, sized by kube-node).
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

    /// Configuration of the `baremetal` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baremetal: Option<BaremetalProviderSpec>,

    /// Configuration of the `gke` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gke: Option<GkeProviderSpec>,
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
    /// Servers you own: powered on and off through their BMCs (Redfish), joined over SSH.
    Baremetal,
    /// The machines of a Google Kubernetes Engine node pool: GKE makes them and names their
    /// Nodes, kube-node sets the pool's size and names the machines to remove. Group-backed:
    /// scale a NodeSet, never create a Node of this class by hand.
    Gke,
}

impl ProviderType {
    /// The name as written in `spec.provider.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Simulated => "simulated",
            Self::Aws => "aws",
            Self::Exec => "exec",
            Self::Baremetal => "baremetal",
            Self::Gke => "gke",
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
    #[schemars(schema_with = "alternative_instance_types")]
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
    #[schemars(schema_with = "subnet_ids")]
    pub subnet_ids: Vec<String>,
    /// Security groups of the machines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "security_group_ids")]
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
    #[schemars(schema_with = "crate::validation::aws_tags")]
    pub tags: BTreeMap<String, String>,
    /// An EC2 endpoint URL override (for emulators and private endpoints): an absolute
    /// `http://` or `https://` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::url")]
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

/// Configuration of the GKE backend: one existing node pool, whose size kube-node owns.
///
/// The pool's machines are made by GKE (its managed instance groups, one per zone) and
/// register Nodes under names GKE chooses; a NodeSet over this class sets the pool's size and
/// names the machines to remove. The credentials Secret, when named, holds a service-account
/// JSON key under `service-account.json`; without a Secret kube-node uses Application Default
/// Credentials (workload identity on GKE).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GkeProviderSpec {
    /// The Google Cloud project ID of the cluster, e.g. `my-project`.
    #[schemars(schema_with = "crate::validation::gcp_project")]
    pub project: String,
    /// The cluster's location: a region (`europe-west1`) for a regional cluster, a zone
    /// (`europe-west1-b`) for a zonal one.
    #[schemars(schema_with = "crate::validation::gcp_location")]
    pub location: String,
    /// The GKE cluster's name.
    #[schemars(schema_with = "crate::validation::gke_name")]
    pub cluster: String,
    /// The node pool's name. Its GKE autoscaling must be off: kube-node owns its size.
    #[schemars(schema_with = "crate::validation::gke_name")]
    pub node_pool: String,
    /// A Kubernetes Engine API endpoint override (a private endpoint, or a test server): an
    /// absolute `http://` or `https://` URL. Default `https://container.googleapis.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::url")]
    pub container_endpoint: Option<String>,
    /// A Compute Engine API endpoint override (as `containerEndpoint`). Default
    /// `https://compute.googleapis.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::url")]
    pub compute_endpoint: Option<String>,
}

/// Configuration of the bare-metal backend: a pool of servers with Redfish BMCs and an OS
/// with kubeadm and a kubelet on their disks.
///
/// Name the hosts inline (`hosts`, at most 64) or in a ConfigMap (`inventoryRef`, for racks
/// of hundreds or thousands): exactly one of the two. The credentials Secret holds the BMC
/// login (`bmc-username`, `bmc-password`) and the SSH key (`ssh-private-key`), each
/// overridable per host (`<host>.bmc-username`, ...).
#[derive(KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.hosts) && size(self.hosts) > 0) != has(self.inventoryRef)").message("spec.provider.baremetal: set exactly one of hosts and inventoryRef").field_path(".hosts"))]
pub struct BaremetalProviderSpec {
    /// The hosts, inline (at most 64; use `inventoryRef` for more).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub hosts: Vec<BaremetalHost>,
    /// A ConfigMap whose key (default `hosts.yaml`) holds the hosts as a YAML list of the same
    /// shape as `hosts`. Read like the credentials Secret; editing it does not change the
    /// NodeClass's generation, so no Node becomes outdated when a host is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_ref: Option<ConfigMapKeyReference>,
    /// The SSH user kubeadm runs as (it needs root or passwordless sudo). Default `root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub ssh_user: Option<String>,
    /// A shell command run over SSH before a host is powered off on delete (e.g. wiping the
    /// kubelet's data disk). Its failure is logged, never fatal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub wipe_command: Option<String>,
    /// How long a graceful shutdown may take before `ForceOff`. Default `2m`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::positive_duration")]
    pub shutdown_timeout: Option<Duration>,
    /// Where on the host the JoinConfiguration is written before `kubeadm join --config`
    /// reads it: an absolute path. Default: the path kube-node renders,
    /// `/etc/kubernetes/kubeadm-join.yaml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2, max = 255), regex(pattern = r"^/[A-Za-z0-9._/-]+$"))]
    pub join_config_path: Option<String>,
}

/// Checks a `joinConfigPath`: absolute, of plain characters only.
pub fn check_join_config_path(p: &str) -> Result<(), String> {
    let plain = p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
    if p.len() < 2 || p.len() > 255 || !p.starts_with('/') || !plain || p.ends_with('/') {
        return Err(format!(
            "{p:?} is not an absolute file path of letters, digits, '.', '_', '-' and '/'"
        ));
    }
    Ok(())
}

/// One host of a bare-metal inventory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaremetalHost {
    /// A stable name of the host (a DNS-1123 label), used in provider IDs and messages.
    #[schemars(schema_with = "crate::validation::dns1123_label")]
    pub name: String,
    /// The host's Redfish ComputerSystem: its full URL
    /// (`https://bmc-01.example/redfish/v1/Systems/1`), or the BMC's root (`https://bmc-01`)
    /// when the BMC has exactly one system.
    #[schemars(schema_with = "crate::validation::url")]
    pub redfish_url: String,
    /// The OS's SSH address, `host:port` (usually port 22).
    #[schemars(schema_with = "crate::validation::endpoint")]
    pub ssh_address: String,
    /// The OS's SSH host public key (`ssh-ed25519 AAAA...`): the only key accepted. Without
    /// it, the credentials Secret's `<host>.ssh-host-key` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8192))]
    pub ssh_host_key: Option<String>,
    /// Labels the host's Node gets (rack, zone).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::validation::labels_16")]
    pub labels: BTreeMap<String, String>,
}

impl BaremetalHost {
    /// Checks one host (of an inline list or a referenced inventory), naming each invalid
    /// field under `field`.
    pub fn validate(&self, field: &str) -> Result<(), InvalidSpec> {
        let mut errors = Errors::default();
        self.check(field, &mut errors);
        errors.finish()
    }

    pub(crate) fn check(&self, field: &str, errors: &mut Errors) {
        errors.check(
            format_args!("{field}.name"),
            check_dns1123_label(&self.name),
        );
        errors.check(
            format_args!("{field}.redfishUrl"),
            check_url(&self.redfish_url),
        );
        errors.check(
            format_args!("{field}.sshAddress"),
            check_endpoint(&self.ssh_address),
        );
        super::common::check_labels(&format!("{field}.labels"), &self.labels, errors);
    }
}

/// A key of a ConfigMap in a given namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyReference {
    /// The ConfigMap's namespace (kube-node reads ConfigMaps only in its own).
    #[schemars(schema_with = "crate::validation::dns1123_label")]
    pub namespace: String,
    /// The ConfigMap's name.
    #[schemars(schema_with = "crate::validation::dns1123_subdomain")]
    pub name: String,
    /// The key holding the inventory. Default `hosts.yaml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

/// Configuration of the exec backend: a program run once per provider operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecProviderSpec {
    /// The program and its arguments (no shell: user data is never interpolated).
    #[schemars(schema_with = "exec_command")]
    pub command: Vec<String>,
    /// The working directory of the program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub working_dir: Option<String>,
    /// Environment of the program: plain values or keys of the credentials Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<ExecEnvVar>,
    /// How long one operation may run before the program is killed, greater than zero.
    /// Default `5m`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::positive_duration")]
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
    #[schemars(schema_with = "crate::validation::env_name")]
    pub name: String,
    /// A plain value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32768))]
    pub value: Option<String>,
    /// A key of the NodeClass's credentials Secret whose value becomes the variable's value
    /// (redacted from everything the program prints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub secret_key: Option<String>,
}

fn alternative_instance_types(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::validation::strings(16, 64, 0, 1)
}

fn subnet_ids(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::validation::strings(32, 255, 1, 1)
}

fn security_group_ids(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::validation::strings(16, 255, 0, 1)
}

fn exec_command(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    crate::validation::strings(64, 4096, 1, 0)
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
    /// The machine type reported for every machine (label `node.kubernetes.io/instance-type`,
    /// so a label value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::label_value")]
    pub instance_type: Option<String>,
    /// The image machines boot, a label value such as `ubuntu-2404-v2`. Only recorded, but a
    /// change of it is a new image: the Nodes of NodeSets using the class drift and are replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::label_value")]
    pub image: Option<String>,
    /// Zones machines are spread across (label `topology.kubernetes.io/zone`, so label values).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::validation::label_values_16")]
    pub zones: Vec<String>,
    /// How long a machine takes from create to a Ready kubelet, e.g. `5s`. Default `0s`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::duration")]
    pub boot_delay: Option<Duration>,
    /// How long a machine takes to disappear after delete. Default `0s`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::duration")]
    pub delete_delay: Option<Duration>,
    /// How long a new machine stays invisible to list calls (eventual consistency). Default `0s`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::duration")]
    pub list_lag: Option<Duration>,
    /// The most machines that can exist at once; creates beyond it fail with
    /// InsufficientCapacity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4294967295u32))]
    pub capacity: Option<u32>,
    /// The account quota on machines; creates beyond it fail with QuotaExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 4294967295u32))]
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
    /// Makes the class a simulated **group** (like a GKE node pool): the cloud owns the
    /// machines, names their Nodes `sim-<group>-<suffix>` and labels them
    /// `kube-node.io/group: <name>`. Nodes of the class cannot be created one by one; a
    /// NodeSet sets the group's size and names the machines to delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<SimulatedGroupSpec>,
}

/// A simulated group of machines whose size kube-node sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SimulatedGroupSpec {
    /// The group's name: a DNS-1123 label of at most 40 characters (it is part of every Node
    /// name and the value of the `kube-node.io/group` label).
    #[schemars(schema_with = "crate::validation::group_name")]
    pub name: String,
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
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub fail_create_call: Option<u32>,
}

/// How a new machine joins the cluster (kubeadm join with a per-machine bootstrap token).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// The API server endpoint machines join, `host:port` or `https://host:port`. Defaults to
    /// the server kube-node itself talks to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::endpoint")]
    pub api_server_endpoint: Option<String>,
    /// How long a machine's bootstrap token is valid, greater than zero. Default `1h`.
    #[serde(
        default,
        rename = "tokenTTL",
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::positive_duration")]
    pub token_ttl: Option<Duration>,
}

/// Timeouts of a machine's lifecycle.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// How long a machine may take from create to a Ready kubelet before it is marked Failed.
    /// Greater than zero. Default `15m`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::positive_duration")]
    pub registration: Option<Duration>,
    /// How long draining may take before the machine is deleted anyway, greater than zero.
    /// Default `10m`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::validation::duration_serde::deserialize"
    )]
    #[schemars(schema_with = "crate::validation::positive_duration")]
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
    /// For a backend with a fixed pool (bare metal): how many more machines it can make now
    /// (hosts neither claimed nor set aside as failed). Absent for clouds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_machines: Option<i32>,
}

/// Default registration timeout.
pub const DEFAULT_REGISTRATION_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(15 * 60);
/// Default drain timeout.
pub const DEFAULT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// Default bootstrap token lifetime.
pub const DEFAULT_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// The group a group-backed NodeClass names (see [`NodeClassSpec::group`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRef {
    /// The group's name, for messages.
    pub name: String,
    /// The label every Node the group's machines register carries: the first half of the
    /// adoption rule (the second: its `spec.providerID` is one of the group's machines).
    pub label: (String, String),
}

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

    /// The group this class is backed by, when the cloud owns its machines (a simulated
    /// group, a GKE node pool): its name and the label (key, value) its Nodes carry. Nodes of
    /// such a class are never created one by one; a NodeSet sets the group's size and adopts
    /// the Nodes the group's machines register.
    pub fn group(&self) -> Option<GroupRef> {
        match self.provider.type_ {
            ProviderType::Gke => {
                let pool = &self.provider.gke.as_ref()?.node_pool;
                Some(GroupRef {
                    name: pool.clone(),
                    label: (crate::names::GKE_NODE_POOL_LABEL.to_string(), pool.clone()),
                })
            }
            ProviderType::Simulated => {
                let g = self.provider.simulated.as_ref()?.group.as_ref()?;
                Some(GroupRef {
                    name: g.name.clone(),
                    label: (crate::names::GROUP_LABEL.to_string(), g.name.clone()),
                })
            }
            _ => None,
        }
    }

    /// The allocatable resources: `allocatable` when given, else `capacity`.
    pub fn allocatable_or_capacity(&self) -> &BTreeMap<String, Quantity> {
        self.allocatable.as_ref().unwrap_or(&self.capacity)
    }
}

impl NodeClass {
    /// Decodes a NodeClass from its JSON and checks its spec: the one way the controllers read
    /// NodeClasses, so an object the API server accepted under an older or looser schema
    /// fails alone, naming its field.
    pub fn decode_and_validate(value: serde_json::Value) -> Result<Self, InvalidSpec> {
        let nc: Self = crate::validation::decode(value)?;
        nc.spec.validate()?;
        Ok(nc)
    }
}

impl NodeClassSpec {
    /// Checks everything the schema checks (and what a schema cannot: which provider block
    /// goes with which type), naming each invalid field.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let mut errors = Errors::default();
        self.provider.check(&mut errors);
        if let Some(r) = &self.credentials_secret_ref {
            errors.check(
                "spec.credentialsSecretRef.namespace",
                check_dns1123_label(&r.namespace),
            );
            errors.check(
                "spec.credentialsSecretRef.name",
                check_dns1123_subdomain(&r.name),
            );
        }
        super::common::check_labels("spec.labels", &self.labels, &mut errors);
        for (i, t) in self.taints.iter().enumerate() {
            t.check(&format!("spec.taints[{i}]"), &mut errors);
        }
        check_quantities("spec.capacity", &self.capacity, &mut errors);
        if let Some(a) = &self.allocatable {
            check_quantities("spec.allocatable", a, &mut errors);
        }
        if let Some(b) = &self.bootstrap {
            if let Some(e) = &b.api_server_endpoint {
                errors.check("spec.bootstrap.apiServerEndpoint", check_endpoint(e));
            }
            check_positive("spec.bootstrap.tokenTTL", b.token_ttl, &mut errors);
        }
        if let Some(t) = &self.timeouts {
            check_positive("spec.timeouts.registration", t.registration, &mut errors);
            check_positive("spec.timeouts.drain", t.drain, &mut errors);
        }
        errors.finish()
    }
}

impl ProviderSpec {
    fn check(&self, errors: &mut Errors) {
        let blocks = [
            (ProviderType::Simulated, self.simulated.is_some()),
            (ProviderType::Aws, self.aws.is_some()),
            (ProviderType::Exec, self.exec.is_some()),
            (ProviderType::Baremetal, self.baremetal.is_some()),
            (ProviderType::Gke, self.gke.is_some()),
        ];
        for (ty, set) in blocks {
            let field = format!("spec.provider.{}", ty.as_str());
            if set && ty != self.type_ {
                errors.check(
                    &field,
                    Err(format!(
                        "may be set only when spec.provider.type is {}",
                        ty.as_str()
                    )),
                );
            }
        }
        if self.type_ == ProviderType::Aws && self.aws.is_none() {
            errors.check(
                "spec.provider.aws",
                Err("is required when spec.provider.type is aws".into()),
            );
        }
        if self.type_ == ProviderType::Exec && self.exec.is_none() {
            errors.check(
                "spec.provider.exec",
                Err("is required when spec.provider.type is exec".into()),
            );
        }
        if self.type_ == ProviderType::Baremetal && self.baremetal.is_none() {
            errors.check(
                "spec.provider.baremetal",
                Err("is required when spec.provider.type is baremetal".into()),
            );
        }
        if self.type_ == ProviderType::Gke && self.gke.is_none() {
            errors.check(
                "spec.provider.gke",
                Err("is required when spec.provider.type is gke".into()),
            );
        }
        if let Some(g) = &self.gke {
            errors.check("spec.provider.gke.project", check_gcp_project(&g.project));
            errors.check(
                "spec.provider.gke.location",
                check_gcp_location(&g.location),
            );
            errors.check("spec.provider.gke.cluster", check_gke_name(&g.cluster));
            errors.check("spec.provider.gke.nodePool", check_gke_name(&g.node_pool));
            if let Some(u) = &g.container_endpoint {
                errors.check("spec.provider.gke.containerEndpoint", check_url(u));
            }
            if let Some(u) = &g.compute_endpoint {
                errors.check("spec.provider.gke.computeEndpoint", check_url(u));
            }
        }
        if let Some(b) = &self.baremetal {
            if b.hosts.is_empty() == b.inventory_ref.is_none() {
                errors.check(
                    "spec.provider.baremetal.hosts",
                    Err("set exactly one of hosts and inventoryRef".into()),
                );
            }
            if b.hosts.len() > 64 {
                errors.check(
                    "spec.provider.baremetal.hosts",
                    Err("at most 64 hosts inline; use inventoryRef for more".into()),
                );
            }
            for (i, h) in b.hosts.iter().enumerate() {
                h.check(&format!("spec.provider.baremetal.hosts[{i}]"), errors);
            }
            if let Some(r) = &b.inventory_ref {
                errors.check(
                    "spec.provider.baremetal.inventoryRef.namespace",
                    check_dns1123_label(&r.namespace),
                );
                errors.check(
                    "spec.provider.baremetal.inventoryRef.name",
                    check_dns1123_subdomain(&r.name),
                );
            }
            check_positive(
                "spec.provider.baremetal.shutdownTimeout",
                b.shutdown_timeout,
                errors,
            );
            if let Some(p) = &b.join_config_path {
                errors.check(
                    "spec.provider.baremetal.joinConfigPath",
                    check_join_config_path(p),
                );
            }
        }
        if let Some(s) = &self.simulated {
            if let Some(t) = &s.instance_type {
                errors.check("spec.provider.simulated.instanceType", check_label_value(t));
            }
            if let Some(t) = &s.image {
                errors.check("spec.provider.simulated.image", check_label_value(t));
            }
            for (i, z) in s.zones.iter().enumerate() {
                errors.check(
                    format_args!("spec.provider.simulated.zones[{i}]"),
                    check_label_value(z),
                );
            }
            if let Some(g) = &s.group {
                errors.check(
                    "spec.provider.simulated.group.name",
                    check_group_name(&g.name),
                );
            }
            if let Some(f) = &s.faults {
                for (field, v) in [
                    (
                        "insufficientCapacityPercent",
                        f.insufficient_capacity_percent,
                    ),
                    ("throttlePercent", f.throttle_percent),
                    ("transientPercent", f.transient_percent),
                ] {
                    if v > 100 {
                        errors.check(
                            format_args!("spec.provider.simulated.faults.{field}"),
                            Err("must be a percentage between 0 and 100".into()),
                        );
                    }
                }
                if f.fail_create_call == Some(0) {
                    errors.check(
                        "spec.provider.simulated.faults.failCreateCall",
                        Err("must be at least 1".into()),
                    );
                }
            }
        }
        if let Some(a) = &self.aws {
            if a.ami.is_some() == a.ami_ssm_parameter.is_some() {
                errors.check(
                    "spec.provider.aws.ami",
                    Err("set exactly one of ami and amiSsmParameter".into()),
                );
            }
            if a.subnet_ids.is_empty() {
                errors.check(
                    "spec.provider.aws.subnetIds",
                    Err("at least one subnet is required".into()),
                );
            }
            if let Some(u) = &a.endpoint_url {
                errors.check("spec.provider.aws.endpointUrl", check_url(u));
            }
            for k in a.tags.keys() {
                if k.is_empty() || k.len() > 128 || k.starts_with("aws:") {
                    errors.check(
                        format_args!("spec.provider.aws.tags[{:?}]", short(k)),
                        Err(
                            "tag keys must be 1 to 128 characters and must not start with aws:"
                                .into(),
                        ),
                    );
                }
            }
        }
        if let Some(e) = &self.exec {
            if e.command.is_empty() || e.command[0].is_empty() {
                errors.check(
                    "spec.provider.exec.command",
                    Err("must name a program".into()),
                );
            }
            for (i, v) in e.env.iter().enumerate() {
                errors.check(
                    format_args!("spec.provider.exec.env[{i}].name"),
                    check_env_name(&v.name),
                );
                if v.value.is_some() == v.secret_key.is_some() {
                    errors.check(
                        format_args!("spec.provider.exec.env[{i}]"),
                        Err("set exactly one of value and secretKey".into()),
                    );
                }
            }
            check_positive("spec.provider.exec.timeout", e.timeout, errors);
            if let Some(c) = e.max_concurrency
                && !(1..=256).contains(&c)
            {
                errors.check(
                    "spec.provider.exec.maxConcurrency",
                    Err("must be between 1 and 256".into()),
                );
            }
        }
    }
}

/// A map key as it appears in a field path: long keys are cut, so an error message stays
/// short whatever the object holds.
pub(crate) fn short(k: &str) -> String {
    if k.len() <= 64 {
        return k.to_string();
    }
    let mut end = 64;
    while !k.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &k[..end])
}

fn check_quantities(field: &str, map: &BTreeMap<String, Quantity>, errors: &mut Errors) {
    for (k, v) in map {
        errors.check(
            format_args!("{field}[{:?}]", short(k)),
            check_qualified_name(k).and_then(|()| check_quantity(&v.0)),
        );
    }
}

fn check_positive(field: &str, d: Option<Duration>, errors: &mut Errors) {
    if let Some(d) = d
        && std::time::Duration::from(d).is_zero()
    {
        errors.check(field, Err("must be a duration greater than zero".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(provider: serde_json::Value) -> NodeClassSpec {
        serde_json::from_value(serde_json::json!({ "provider": provider })).expect("spec")
    }

    #[test]
    fn a_gke_class_is_backed_by_its_node_pool_and_adopts_by_the_gke_label() {
        let gke = spec(serde_json::json!({"type": "gke", "gke": {
            "project": "p", "location": "europe-west1", "cluster": "c", "nodePool": "pool-a"}}));
        let group = gke.group().expect("a GKE class is group-backed");
        assert_eq!(group.name, "pool-a");
        assert_eq!(
            group.label,
            (
                "cloud.google.com/gke-nodepool".to_string(),
                "pool-a".to_string()
            )
        );
    }

    #[test]
    fn a_simulated_group_adopts_by_its_own_label_and_a_plain_class_is_not_a_group() {
        let sim =
            spec(serde_json::json!({"type": "simulated", "simulated": {"group": {"name": "g1"}}}));
        assert_eq!(
            sim.group().expect("group").label,
            (crate::names::GROUP_LABEL.to_string(), "g1".to_string())
        );
        assert!(
            spec(serde_json::json!({"type": "simulated"}))
                .group()
                .is_none()
        );
    }
}
