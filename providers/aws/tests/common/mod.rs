//! The moto fixture and EC2 test setup shared by the AWS provider's integration tests.
//!
//! Tests use `KUBE_NODE_MOTO_ENDPOINT` when set (tests/run.sh starts one moto for the run);
//! otherwise the first test of the process starts `.venv/bin/moto_server` on a free loopback
//! port, and it stops when the test process exits (its stdin pipe closes). Every test tags its
//! machines with its own cluster name, so tests sharing a server never see each other's.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use kube_node_crds::NodeClassSpec;
use kube_node_crds::names::tags;
use kube_node_crds::v1alpha1::{AwsProviderSpec, AwsRootVolume, ProviderSpec, ProviderType};
use kube_node_provider::{CreateRequest, Credentials, ResolvedClass, Sensitive};
use kube_node_provider_aws::aws_sdk_ec2::Client;
use kube_node_provider_aws::emulator::{MotoServer, setup_network};
use kube_node_provider_aws::emulator_client;

pub const REGION: &str = "us-east-1";

/// The moto server of this test process (see `kube_node_provider_aws::emulator`).
pub struct Moto;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

impl Moto {
    /// `KUBE_NODE_MOTO_ENDPOINT`, or a server started once for this process.
    pub fn shared() -> &'static str {
        static SHARED: OnceLock<MotoServer> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                MotoServer::from_env_or_spawn(&repo_root()).unwrap_or_else(|e| panic!("{e}"))
            })
            .endpoint()
    }

    /// A private server, stopped on drop.
    pub fn spawn(ami_validation: bool) -> MotoServer {
        MotoServer::spawn(&repo_root(), ami_validation).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Networks and an AMI made in moto for one test.
#[derive(Clone, Debug)]
pub struct Env {
    pub endpoint: String,
    pub client: Client,
    pub ami: String,
    pub subnets: Vec<String>,
    pub security_group: String,
}

/// A unique name for this test's cluster.
pub fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{:x}", n & 0xffff_ffff_ffff)
}

/// A VPC with two subnets in two zones and a security group, and one of moto's AMIs.
pub async fn env_at(endpoint: &str) -> Env {
    let net = setup_network(endpoint)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    Env {
        endpoint: endpoint.to_string(),
        client: emulator_client(endpoint, REGION),
        ami: net.ami,
        subnets: net.subnets,
        security_group: net.security_group,
    }
}

pub async fn env() -> Env {
    env_at(Moto::shared()).await
}

impl Env {
    /// The `aws` provider spec of a NodeClass pointing at moto.
    pub fn spec(&self) -> AwsProviderSpec {
        AwsProviderSpec {
            region: REGION.into(),
            instance_type: "t3.small".into(),
            alternative_instance_types: vec![],
            ami: Some(self.ami.clone()),
            ami_ssm_parameter: None,
            subnet_ids: self.subnets.clone(),
            security_group_ids: vec![self.security_group.clone()],
            iam_instance_profile: None,
            key_name: None,
            root_volume: Some(AwsRootVolume {
                size_gib: Some(20),
                volume_type: Some("gp3".into()),
                device_name: None,
            }),
            capacity_type: None,
            tags: BTreeMap::from([("team".to_string(), "infra".to_string())]),
            endpoint_url: Some(self.endpoint.clone()),
        }
    }
}

/// A resolved NodeClass of type aws with Secret credentials.
pub fn class(name: &str, cluster: &str, aws: AwsProviderSpec) -> ResolvedClass {
    let spec: NodeClassSpec = serde_json::from_value(serde_json::json!({
        "provider": {"type": "aws"},
    }))
    .expect("minimal NodeClassSpec");
    let spec = NodeClassSpec {
        provider: ProviderSpec {
            type_: ProviderType::Aws,
            aws: Some(aws),
            ..spec.provider
        },
        ..spec
    };
    ResolvedClass {
        name: name.into(),
        generation: 1,
        spec,
        credentials: Some(Credentials(BTreeMap::from([
            ("aws_access_key_id".to_string(), b"AKIATESTKEY".to_vec()),
            (
                "aws_secret_access_key".to_string(),
                b"do-not-leak-this-secret".to_vec(),
            ),
        ]))),
        cluster_name: cluster.into(),
        inventory: None,
        claims: None,
    }
}

/// The request the node-controller makes for a Node.
pub fn request(cluster: &str, class: &str, uid: &str, name: &str) -> CreateRequest {
    CreateRequest {
        idempotency_key: uid.into(),
        node_name: name.into(),
        tags: BTreeMap::from([
            (tags::CLUSTER.to_string(), cluster.to_string()),
            (tags::NODE_NAME.to_string(), name.to_string()),
            (tags::NODE_UID.to_string(), uid.to_string()),
            (tags::NODESET.to_string(), "workers".to_string()),
            (tags::NODE_CLASS.to_string(), class.to_string()),
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
        ]),
        user_data: Some(Sensitive(format!(
            "#cloud-config\nruncmd:\n  - kubeadm join --node-name {name} --token abc.def\n"
        ))),
    }
}
