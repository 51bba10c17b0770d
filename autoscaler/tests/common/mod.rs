//! Fixtures: an embedded API server with the CRDs, NodeClasses, NodeSets and the Nodes the
//! nodeset-controller would create; a server on 127.0.0.1:0 and a client.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt, ResourceExt};
use kube_node_autoscaler::proto::cloud_provider_client::CloudProviderClient;
use kube_node_autoscaler::{Config, serve_on};
use kube_node_crds::names::{MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION};
use kube_node_crds::v1alpha1::{
    NodeClass, NodeClassSpec, NodeSelector, NodeSet, NodeSetSpec, NodeTaint, NodeTemplate,
    NodeTemplateMetadata, NodeTemplateSpec, ProviderSpec, ProviderType, SimulatedProviderSpec,
    TaintEffect,
};
use kube_node_embedded_api::EmbeddedApi;
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub struct Env {
    pub api: EmbeddedApi,
    pub client: Client,
    pub grpc: CloudProviderClient<Channel>,
    pub addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub fn nodeclass(name: &str) -> NodeClass {
    NodeClass::new(
        name,
        NodeClassSpec {
            provider: ProviderSpec {
                type_: ProviderType::Simulated,
                simulated: Some(SimulatedProviderSpec {
                    instance_type: Some("sim.large".into()),
                    zones: vec!["zone-a".into()],
                    ..Default::default()
                }),
                aws: None,
                exec: None,
                baremetal: None,
                gke: None,
            },
            credentials_secret_ref: None,
            labels: [("team".to_string(), "ml".to_string())].into(),
            taints: vec![NodeTaint {
                key: "dedicated".into(),
                value: Some("ml".into()),
                effect: TaintEffect::NoSchedule,
            }],
            capacity: [
                ("cpu".to_string(), Quantity("4".into())),
                ("memory".to_string(), Quantity("16Gi".into())),
                ("pods".to_string(), Quantity("58".into())),
                ("nvidia.com/gpu".to_string(), Quantity("1".into())),
            ]
            .into(),
            allocatable: Some(
                [
                    ("cpu".to_string(), Quantity("3900m".into())),
                    ("memory".to_string(), Quantity("15Gi".into())),
                    ("pods".to_string(), Quantity("58".into())),
                    ("nvidia.com/gpu".to_string(), Quantity("1".into())),
                ]
                .into(),
            ),
            bootstrap: None,
            timeouts: None,
        },
    )
}

pub fn nodeset(
    name: &str,
    class: &str,
    replicas: i32,
    min: Option<i32>,
    max: Option<i32>,
) -> NodeSet {
    let labels: BTreeMap<String, String> = [("pool".to_string(), name.to_string())].into();
    NodeSet::new(
        name,
        NodeSetSpec {
            replicas,
            selector: NodeSelector {
                match_labels: Some(labels.clone()),
                match_expressions: None,
            },
            template: NodeTemplate {
                metadata: NodeTemplateMetadata {
                    labels: Some(labels),
                    annotations: None,
                },
                spec: NodeTemplateSpec {
                    node_class_name: class.into(),
                    node_class_names: vec![],
                    taints: vec![],
                },
            },
            delete_policy: None,
            min_size: min,
            max_size: max,
            remove_nodes: vec![],
            max_unhealthy: None,
            min_ready_seconds: None,
            replacement_backoff: None,
            strategy: None,
            progress_deadline_seconds: None,
            class_fallback_cooldown_seconds: None,
        },
    )
}

impl Env {
    pub async fn new() -> Self {
        let api = EmbeddedApi::new();
        api.register_crd(&NodeClass::crd()).expect("nodeclass crd");
        api.register_crd(&NodeSet::crd()).expect("nodeset crd");
        let client = api.client();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = Config {
            addr,
            tls: None,
            allow_plaintext: true,
        };
        tokio::spawn(serve_on(client.clone(), listener, config, async {
            let _ = stopped.await;
        }));
        let grpc = CloudProviderClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        Env {
            api,
            client,
            grpc,
            addr,
            _stop: stop,
        }
    }

    pub async fn create_class(&self, c: &NodeClass) {
        Api::<NodeClass>::all(self.client.clone())
            .create(&PostParams::default(), c)
            .await
            .expect("create nodeclass");
    }

    pub async fn create_set(&self, ns: &NodeSet) -> NodeSet {
        Api::<NodeSet>::all(self.client.clone())
            .create(&PostParams::default(), ns)
            .await
            .expect("create nodeset")
    }

    pub async fn get_set(&self, name: &str) -> NodeSet {
        Api::<NodeSet>::all(self.client.clone())
            .get(name)
            .await
            .expect("get nodeset")
    }

    /// Creates a Node the way the nodeset-controller does: selector labels, NodeClass
    /// annotation, controller owner reference.
    pub async fn create_child(&self, set: &NodeSet, name: &str) -> Node {
        let labels = set
            .spec
            .template
            .metadata
            .labels
            .clone()
            .unwrap_or_default();
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": { NODE_CLASS_ANNOTATION: set.spec.template.spec.node_class_name },
                "ownerReferences": [{
                    "apiVersion": "kube-node.io/v1alpha1",
                    "kind": "NodeSet",
                    "name": set.name_any(),
                    "uid": set.metadata.uid.clone().expect("uid"),
                    "controller": true,
                }],
            },
            "spec": {}
        }))
        .expect("node");
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("create node")
    }

    pub async fn create_foreign(&self, name: &str) {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { "pool": "manual" } },
            "spec": { "providerID": format!("other://{name}") }
        }))
        .expect("node");
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("create node");
    }

    /// Plays the node-controller and the kubelet: providerID set, kubelet Ready.
    pub async fn make_ready(&self, name: &str) {
        let nodes = Api::<Node>::all(self.client.clone());
        nodes
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({ "spec": { "providerID": format!("simulated://{name}") } }),
                ),
            )
            .await
            .expect("set providerID");
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": { "conditions": [
                    { "type": "Ready", "status": "True", "reason": "KubeletReady",
                      "lastTransitionTime": "2025-01-01T00:00:00Z" },
                    { "type": MACHINE_READY_CONDITION, "status": "True", "reason": "Ready",
                      "lastTransitionTime": "2025-01-01T00:00:00Z" },
                ] } })),
            )
            .await
            .expect("set ready");
    }

    /// Sets the MachineReady condition as the node-controller would.
    pub async fn set_machine(&self, name: &str, reason: &str, message: &str) {
        Api::<Node>::all(self.client.clone())
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": { "conditions": [
                    { "type": MACHINE_READY_CONDITION, "status": "False", "reason": reason,
                      "message": message, "lastTransitionTime": "2025-01-01T00:00:00Z" },
                ] } })),
            )
            .await
            .expect("set machine condition");
    }
}

/// Polls `f` until it returns Some, for at most 10 s.
pub async fn eventually<T, F, Fut>(mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
