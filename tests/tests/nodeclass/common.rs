//! A node-controller against the embedded API server and the simulated cloud (with its
//! kubelet), which can be stopped and started again as a restarted process would be: a fresh
//! controller, the same cluster and cloud.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION};
use kube_node_provider_simulated::{KubeletConfig, SimulatedCloud};
use node_controller::Config;
use serde_json::json;

pub const CLUSTER: &str = "test-cluster";

/// The shared harness with the node-controller alone, whose controller can be stopped and
/// started again as a restarted process would be: a fresh controller, the same cluster and
/// cloud.
pub struct Harness {
    inner: kube_node::harness::Harness,
    pub client: Client,
    pub cloud: SimulatedCloud,
}

impl Harness {
    pub async fn new() -> Self {
        let inner = kube_node::harness::Harness::builder()
            .without_nodeset_controller()
            .kubelet(KubeletConfig {
                scan_interval: Duration::from_millis(100),
                ..KubeletConfig::default()
            })
            .node_config(Config {
                cluster_name: CLUSTER.to_string(),
                api_server_endpoint: Some("10.0.0.1:6443".to_string()),
                orphan_gc_interval: Duration::from_millis(500),
                concurrency: 8,
                ..Config::default()
            })
            .start()
            .await
            .expect("harness");
        Self {
            client: inner.client.clone(),
            cloud: inner.cloud.clone(),
            inner,
        }
    }

    /// Starts a controller with nothing in memory.
    pub fn start(&mut self) {
        self.inner.start_controllers();
    }

    /// Stops the controller (as a process exit: its memory is gone).
    pub async fn stop(&mut self) {
        self.inner
            .stop_controllers()
            .await
            .expect("controller stops cleanly");
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub fn classes(&self) -> Api<NodeClass> {
        Api::all(self.client.clone())
    }

    pub async fn node_class(&self, name: &str, spec: serde_json::Value) {
        let nc: NodeClass = serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1",
            "kind": "NodeClass",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("nodeclass");
        self.classes()
            .create(&PostParams::default(), &nc)
            .await
            .expect("create nodeclass");
    }

    pub async fn node(&self, name: &str, class: &str) -> Node {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "annotations": {NODE_CLASS_ANNOTATION: class}},
        }))
        .expect("node");
        self.nodes()
            .create(&PostParams::default(), &node)
            .await
            .expect("create node")
    }

    pub async fn events(&self, reason: &str) -> Vec<K8sEvent> {
        Api::<K8sEvent>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    /// The names of the bootstrap-token Secrets in kube-system.
    pub async fn token_secrets(&self) -> Vec<String> {
        Api::<Secret>::namespaced(self.client.clone(), "kube-system")
            .list(&ListParams::default())
            .await
            .expect("secrets")
            .items
            .into_iter()
            .filter(|s| s.type_.as_deref() == Some("bootstrap.kubernetes.io/token"))
            .filter_map(|s| s.metadata.name)
            .collect()
    }

    /// Waits until the Node's MachineReady condition is True.
    pub async fn wait_ready(&self, name: &str) {
        let nodes = self.nodes();
        eventually(30, &format!("{name} Ready"), || {
            let nodes = nodes.clone();
            async move {
                let n = nodes.get(name).await.ok()?;
                (machine_phase(&n)?.0 == "True").then_some(())
            }
        })
        .await;
    }

    /// Waits until the Node is gone from the API.
    pub async fn wait_gone(&self, name: &str) {
        let nodes = self.nodes();
        eventually(30, &format!("{name} gone"), || {
            let nodes = nodes.clone();
            async move { nodes.get_opt(name).await.ok()?.is_none().then_some(()) }
        })
        .await;
    }
}

/// Polls `f` until it yields Some, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The (status, reason, message) of a Node's MachineReady condition.
pub fn machine_phase(n: &Node) -> Option<(String, String, String)> {
    n.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == MACHINE_READY_CONDITION)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

/// A simulated NodeClass spec whose machines boot at once.
pub fn sim_spec() -> serde_json::Value {
    json!({"provider": {"type": "simulated", "simulated": {"bootDelay": "0s", "deleteDelay": "0s"}}})
}
