//! A whole kube-node cluster in one process: the embedded API server with the CRDs and a
//! cluster CA, a provider registry with the simulated cloud (and any other backend), the
//! simulated kubelet, and both controllers, wired as `kube-node run` wires them.
//!
//! `kube-node simulate`, the scale benchmark and every integration test start their cluster
//! here, so there is one place that says how the parts fit together. A new backend's
//! end-to-end test is a few lines:
//!
//! ```no_run
//! # async fn f(factory: std::sync::Arc<dyn kube_node_provider::ProviderFactory>) -> anyhow::Result<()> {
//! let cluster = kube_node::harness::Harness::builder()
//!     .with_provider(factory)
//!     .start()
//!     .await?;
//! cluster.create_node_class("lab", serde_json::json!({"provider": {"type": "mine"}})).await?;
//! cluster.create_node_set("workers", "lab", 3).await?;
//! // … wait for the Nodes through cluster.client, check the backend's machines …
//! cluster.shutdown().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, CustomResourceExt};
use kube_node_crds::names::NODESET_LABEL;
use kube_node_crds::{NodeClass, NodeSet};
use kube_node_embedded_api::EmbeddedApi;
use kube_node_provider::{ProviderFactory, ProviderMetrics, ProviderRegistry};
use kube_node_provider_simulated::{KubeletConfig, KubeletHandle, SimulatedCloud};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

/// The simulated cluster's CA certificate (a certificate only; no key exists). Machines' join
/// payloads carry its hash, as they would a real cluster's `kube-root-ca.crt`.
pub const SIMULATED_CA: &str = include_str!("simulate/simulated-ca.crt");

/// The join endpoint machines are given unless the node-controller's config names another.
pub const API_SERVER_ENDPOINT: &str = "simulated-apiserver:6443";

/// How long [`Harness::stop_controllers`] waits for in-flight work before giving up.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Whose client a [`HarnessBuilder::client`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The node-controller's.
    NodeController,
    /// The nodeset-controller's.
    NodesetController,
    /// The simulated kubelet's (it plays every machine's kubelet).
    Kubelet,
    /// The node-controller's event path (default: the node-controller's own client).
    Events,
}

/// How a [`Harness`] is set up; see [`Harness::builder`].
#[must_use]
pub struct HarnessBuilder {
    api: Option<EmbeddedApi>,
    crds: bool,
    ca: String,
    node: Option<node_controller::Config>,
    nodeset: Option<nodeset_controller::Config>,
    kubelet: Option<KubeletConfig>,
    compiled_backends: bool,
    providers: Vec<Arc<dyn ProviderFactory>>,
    node_client: Option<Client>,
    nodeset_client: Option<Client>,
    kubelet_client: Option<Client>,
    events_client: Option<Client>,
    start_controllers: bool,
}

impl Default for HarnessBuilder {
    fn default() -> Self {
        Self {
            api: None,
            crds: true,
            ca: SIMULATED_CA.to_string(),
            node: Some(node_controller::Config {
                cluster_name: "simulation".to_string(),
                api_server_endpoint: Some(API_SERVER_ENDPOINT.to_string()),
                ..node_controller::Config::default()
            }),
            nodeset: Some(nodeset_controller::Config::default()),
            kubelet: Some(KubeletConfig::default()),
            compiled_backends: false,
            providers: Vec::new(),
            node_client: None,
            nodeset_client: None,
            kubelet_client: None,
            events_client: None,
            start_controllers: true,
        }
    }
}

impl HarnessBuilder {
    /// Uses this API server (e.g. one with a watch lag, or whose service a test wraps) instead
    /// of a fresh [`EmbeddedApi`].
    pub fn with_api(mut self, api: EmbeddedApi) -> Self {
        self.api = Some(api);
        self
    }

    /// Leaves the CRDs out (a test installs them later with [`Harness::install_crds`]).
    pub fn without_crds(mut self) -> Self {
        self.crds = false;
        self
    }

    /// Adds a backend to the provider registry (the simulated cloud is always there).
    pub fn with_provider(mut self, factory: Arc<dyn ProviderFactory>) -> Self {
        self.providers.push(factory);
        self
    }

    /// Registers every backend compiled into this binary, as `kube-node run` does.
    pub fn with_compiled_backends(mut self) -> Self {
        self.compiled_backends = true;
        self
    }

    /// The node-controller's config (default: cluster `simulation`, joining
    /// [`API_SERVER_ENDPOINT`], otherwise the `kube-node run` defaults).
    pub fn node_config(mut self, config: node_controller::Config) -> Self {
        self.node = Some(config);
        self
    }

    /// The nodeset-controller's config (default: the `kube-node run` defaults).
    pub fn nodeset_config(mut self, config: nodeset_controller::Config) -> Self {
        self.nodeset = Some(config);
        self
    }

    /// Runs no nodeset-controller (a test of the node-controller alone).
    pub fn without_nodeset_controller(mut self) -> Self {
        self.nodeset = None;
        self
    }

    /// Only the API server, with the CRDs and the cluster CA: no controller, no kubelet (for a
    /// test that runs the `kube-node` binary against it).
    pub fn api_only(mut self) -> Self {
        self.node = None;
        self.nodeset = None;
        self.kubelet = None;
        self
    }

    /// The simulated kubelet's settings.
    pub fn kubelet(mut self, config: KubeletConfig) -> Self {
        self.kubelet = Some(config);
        self
    }

    /// Runs no simulated kubelet (machines of other backends never boot; a test plays their
    /// kubelet itself, see [`Harness::spawn`]).
    pub fn without_kubelet(mut self) -> Self {
        self.kubelet = None;
        self
    }

    /// The client `role` uses (default: a plain client of the API, without a rate limit). A
    /// benchmark gives each controller its own token bucket; a test records calls.
    pub fn client(mut self, role: Role, client: Client) -> Self {
        match role {
            Role::NodeController => self.node_client = Some(client),
            Role::NodesetController => self.nodeset_client = Some(client),
            Role::Kubelet => self.kubelet_client = Some(client),
            Role::Events => self.events_client = Some(client),
        }
        self
    }

    /// Starts the API server (and the kubelet) but not the controllers, so a test can set up
    /// state first and then call [`Harness::start_controllers`].
    pub fn controllers_stopped(mut self) -> Self {
        self.start_controllers = false;
        self
    }

    /// Starts the cluster.
    pub async fn start(self) -> anyhow::Result<Harness> {
        // kube and every other TLS user must agree on one crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let api = self.api.unwrap_or_default();
        let client = api.client();
        let ca = ConfigMap {
            metadata: ObjectMeta {
                name: Some("kube-root-ca.crt".into()),
                namespace: Some("kube-system".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("ca.crt".to_string(), self.ca)])),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
            .create(&PostParams::default(), &ca)
            .await
            .context("creating kube-system/kube-root-ca.crt")?;

        let mut registry = Registry::default();
        let crate::run::ControllerMetrics {
            providers: provider_metrics,
            nodes: node_metrics,
            nodesets: nodeset_metrics,
        } = crate::run::ControllerMetrics::register(&mut registry);
        let cloud = SimulatedCloud::new();
        let mut providers = if self.compiled_backends {
            crate::run::provider_registry(&cloud, provider_metrics.clone())
        } else {
            let mut r = ProviderRegistry::new().with_metrics(provider_metrics.clone());
            r.register(cloud.factory());
            r
        };
        for factory in self.providers {
            providers.register(factory);
        }
        let kubelet = self.kubelet.map(|config| {
            cloud.start_kubelet_with(self.kubelet_client.unwrap_or_else(|| api.client()), config)
        });
        let mut harness = Harness {
            node_client: self.node_client.unwrap_or_else(|| api.client()),
            nodeset_client: self.nodeset_client.unwrap_or_else(|| api.client()),
            events_client: self.events_client,
            api,
            client,
            cloud,
            registry,
            provider_metrics,
            node_metrics,
            nodeset_metrics,
            providers,
            node_config: self.node,
            nodeset_config: self.nodeset,
            kubelet,
            stop: None,
            controllers: Vec::new(),
            tasks: Vec::new(),
        };
        if self.crds {
            harness.install_crds()?;
        }
        if self.start_controllers {
            harness.start_controllers();
        }
        Ok(harness)
    }
}

/// A running cluster in this process; see the [module docs](self). Dropping it stops the
/// controllers without waiting; [`Harness::shutdown`] waits for them.
pub struct Harness {
    /// The API server.
    pub api: EmbeddedApi,
    /// An admin client (its calls are the test's own, not a controller's).
    pub client: Client,
    /// The simulated cloud (its machines, out-of-band failures, the kubelet's write count).
    pub cloud: SimulatedCloud,
    /// Every metric the controllers and providers record, as `/metrics` would serve it.
    pub registry: Registry,
    /// Provider calls by provider, method and result.
    pub provider_metrics: ProviderMetrics,
    /// The node-controller's metrics.
    pub node_metrics: node_controller::Metrics,
    /// The nodeset-controller's metrics.
    pub nodeset_metrics: nodeset_controller::Metrics,
    providers: ProviderRegistry,
    node_client: Client,
    nodeset_client: Client,
    events_client: Option<Client>,
    node_config: Option<node_controller::Config>,
    nodeset_config: Option<nodeset_controller::Config>,
    kubelet: Option<KubeletHandle>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    controllers: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Harness {
    /// A cluster with the simulated cloud, its kubelet and both controllers.
    pub fn builder() -> HarnessBuilder {
        HarnessBuilder::default()
    }

    /// Registers the NodeClass and NodeSet CRDs.
    pub fn install_crds(&self) -> anyhow::Result<()> {
        self.api
            .register_crd(&NodeClass::crd())
            .context("NodeClass CRD")?;
        self.api
            .register_crd(&NodeSet::crd())
            .context("NodeSet CRD")?;
        Ok(())
    }

    /// Creates the NodeClass `name` with `spec` (as in a manifest).
    pub async fn create_node_class(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> anyhow::Result<NodeClass> {
        let class: NodeClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "kube-node.io/v1alpha1",
            "kind": "NodeClass",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .with_context(|| format!("NodeClass {name}"))?;
        Api::<NodeClass>::all(self.client.clone())
            .create(&PostParams::default(), &class)
            .await
            .with_context(|| format!("creating NodeClass {name}"))
    }

    /// Creates the NodeSet `name`: `replicas` Nodes of `class`, selected by the
    /// `kube-node.io/nodeset` label.
    pub async fn create_node_set(
        &self,
        name: &str,
        class: &str,
        replicas: i32,
    ) -> anyhow::Result<NodeSet> {
        Api::<NodeSet>::all(self.client.clone())
            .create(&PostParams::default(), &node_set(name, class, replicas)?)
            .await
            .with_context(|| format!("creating NodeSet {name}"))
    }

    /// Starts the configured controllers (again, after [`Harness::stop_controllers`]: a
    /// restart, with the same cloud, API and metrics).
    pub fn start_controllers(&mut self) {
        if self.stop.is_some() {
            return;
        }
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // Both controllers on one Node watch, as `kube-node run` runs them.
        let (node_watch, nodeset_watch) =
            match (self.node_config.is_some(), self.nodeset_config.is_some()) {
                (true, true) => {
                    let (a, b) = crate::run::shared_node_watch(self.node_client.clone());
                    (Some(a), Some(b))
                }
                _ => (None, None),
            };
        // One group access for both controllers: they share each group's lock.
        let cluster = self
            .node_config
            .as_ref()
            .map_or_else(|| "kubernetes".to_string(), |c| c.cluster_name.clone());
        let groups = Arc::new(kube_node_runtime::GroupAccess::new(
            self.nodeset_client.clone(),
            self.providers.clone(),
            cluster,
        ));
        if let Some(c) = self.node_config.as_mut() {
            c.groups.get_or_insert_with(|| groups.clone());
        }
        if let Some(c) = self.nodeset_config.as_mut() {
            c.groups.get_or_insert_with(|| groups.clone());
        }
        if let Some(config) = self.node_config.clone() {
            let run = node_controller::run_shared(
                self.node_client.clone(),
                self.providers.clone(),
                config,
                self.node_metrics.clone(),
                kube_node_runtime::Shared {
                    nodes: node_watch,
                    events_client: self.events_client.clone(),
                },
                stopped(stop_rx.clone()),
            );
            self.controllers.push((
                "node-controller",
                tokio::spawn(logged("node-controller", run)),
            ));
        }
        if let Some(config) = self.nodeset_config.clone() {
            let run = nodeset_controller::run_shared(
                self.nodeset_client.clone(),
                config,
                self.nodeset_metrics.clone(),
                nodeset_watch,
                stopped(stop_rx),
            );
            self.controllers.push((
                "nodeset-controller",
                tokio::spawn(logged("nodeset-controller", run)),
            ));
        }
        self.stop = Some(stop);
    }

    /// Stops the controllers, letting in-flight work finish (at most 30 s); an error names a
    /// controller that failed or did not stop in time.
    pub async fn stop_controllers(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        let mut result = Ok(());
        for (name, task) in self.controllers.drain(..) {
            let outcome = match tokio::time::timeout(STOP_TIMEOUT, task).await {
                Err(_) => Err(anyhow::anyhow!(
                    "{name} did not stop within {STOP_TIMEOUT:?}"
                )),
                Ok(Err(e)) => Err(anyhow::anyhow!("{name} task: {e}")),
                Ok(Ok(Err(e))) => Err(anyhow::anyhow!("{name}: {e}")),
                Ok(Ok(Ok(()))) => Ok(()),
            };
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }

    /// Runs `task` (a kubelet stand-in, a load generator) until the harness shuts down.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push(tokio::spawn(task));
    }

    /// Stops everything and hands back the API server, whose objects and request counts
    /// remain readable.
    pub async fn shutdown(mut self) -> anyhow::Result<EmbeddedApi> {
        let result = self.stop_controllers().await;
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.kubelet = None;
        result.map(|()| self.api.clone())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Logs to the test's captured output, filtered by `RUST_LOG` (default `warn`); once per test
/// process, later calls do nothing.
pub fn init_test_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A NodeSet `name` of `replicas` Nodes of `class`, selected by the `kube-node.io/nodeset` label.
pub fn node_set(name: &str, class: &str, replicas: i32) -> anyhow::Result<NodeSet> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1",
        "kind": "NodeSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {NODESET_LABEL: name}},
            "template": {
                "metadata": {"labels": {NODESET_LABEL: name}},
                "spec": {"nodeClassName": class},
            },
        },
    }))
    .with_context(|| format!("NodeSet {name}"))
}

/// Runs a controller, logging (and returning) its error.
async fn logged<E: std::fmt::Display>(
    name: &'static str,
    run: impl Future<Output = Result<(), E>>,
) -> Result<(), String> {
    run.await.map_err(|e| {
        tracing::error!(error = %e, controller = name, "controller stopped");
        e.to_string()
    })
}
