//! `kube-node run`: both controllers against a real cluster.

use std::sync::Arc;

use anyhow::Context as _;
use futures::TryStreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::runtime::{WatchStreamExt as _, reflector, watcher};
use kube_node_provider::{ProviderMetrics, ProviderRegistry};
use kube_node_provider_simulated::SimulatedCloud;
use kube_node_runtime::{CachedNode, Fanout, Shared, WatchSource, cached_event};
use prometheus_client::registry::Registry;

use crate::cli::{ControllerArgs, RunArgs};
use crate::http::{self, Health};
use crate::leader::{self, LeaseConfig};

/// Builds a client for the cluster in KUBECONFIG (or in-cluster), behind the client-side rate
/// limit. Returns the client and the API server URL it talks to.
pub async fn cluster_client(qps: f64, burst: u32) -> anyhow::Result<(kube::Client, String)> {
    let config = cluster_config().await?;
    let url = config.cluster_url.to_string();
    Ok((limited_client(config, qps, burst)?, url))
}

/// The configuration for the cluster in KUBECONFIG (or in-cluster).
pub async fn cluster_config() -> anyhow::Result<kube::Config> {
    let mut config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration: set KUBECONFIG or run in a cluster")?;
    // The client's built-in retry repeats a 429 up to 15 times. An eviction blocked by a
    // PodDisruptionBudget is exactly a 429, and the drain must see it at once to honour its
    // timeout; the controllers have their own per-object backoff.
    config.default_retry = false;
    Ok(config)
}

/// A client with its own token bucket.
pub fn limited_client(config: kube::Config, qps: f64, burst: u32) -> anyhow::Result<kube::Client> {
    kube_node_runtime::limited_client(config, qps, burst).context("building the Kubernetes client")
}

/// The endpoint machines should join: `host:port` of the URL kube-node talks to.
pub fn join_endpoint(cluster_url: &str) -> Option<String> {
    let uri: ::http::Uri = cluster_url.parse().ok()?;
    let host = uri.host()?;
    let port = uri.port_u16().unwrap_or(443);
    Some(format!("{host}:{port}"))
}

/// Every backend compiled into this binary, recording provider metrics.
pub fn provider_registry(cloud: &SimulatedCloud, metrics: ProviderMetrics) -> ProviderRegistry {
    let mut registry = ProviderRegistry::new().with_metrics(metrics);
    registry.register(cloud.factory());
    #[cfg(feature = "exec")]
    registry.register(Arc::new(kube_node_provider_exec::ExecFactory::new()));
    #[cfg(feature = "aws")]
    registry.register(Arc::new(kube_node_provider_aws::AwsFactory::new()));
    #[cfg(feature = "baremetal")]
    registry.register(Arc::new(
        kube_node_provider_baremetal::BaremetalFactory::new(),
    ));
    #[cfg(feature = "gke")]
    registry.register(Arc::new(kube_node_provider_gke::GkeFactory::new()));
    registry
}

/// One Node watch for both controllers: one cache of compact [`CachedNode`]s (trimmed to what
/// either reads, see [`kube_node_runtime::cached_node`]) and one decode of every Node event,
/// handed to each controller in order. Two watches held two caches of every Node. The watch
/// runs until both controllers have dropped their half.
pub fn shared_node_watch(
    client: kube::Client,
) -> (WatchSource<CachedNode>, WatchSource<CachedNode>) {
    let (store, writer) = reflector::store::<CachedNode>();
    let mut fanout = Fanout::new();
    let nodes = WatchSource {
        store: store.clone(),
        events: fanout.subscribe(),
    };
    let nodesets = WatchSource {
        store,
        events: fanout.subscribe(),
    };
    let source = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .map_ok(cached_event)
        .reflect(writer);
    tokio::spawn(fanout.run(source));
    (nodes, nodesets)
}

/// The controllers' configs from the flags.
pub fn controller_configs(
    cluster_name: &str,
    args: &ControllerArgs,
    default_endpoint: Option<String>,
) -> (node_controller::Config, nodeset_controller::Config) {
    let node = node_controller::Config {
        cluster_name: cluster_name.to_string(),
        api_server_endpoint: args.api_server_endpoint.clone().or(default_endpoint),
        orphan_min_age: args.orphan_min_age.into(),
        orphan_max_fraction: args.orphan_max_fraction,
        orphan_gc_interval: args.orphan_gc_interval.into(),
        concurrency: args.node_concurrency,
        synced: None,
        claim_namespace: "kube-node-system".to_string(),
        groups: None,
    };
    let nodeset = nodeset_controller::Config {
        concurrency: args.nodeset_concurrency,
        ..nodeset_controller::Config::default()
    };
    (node, nodeset)
}

/// Runs until SIGTERM or Ctrl-C (`Ok`, after releasing the Lease), or, with leader election,
/// until leadership is lost (an error, so the process exits non-zero and restarts as a standby).
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = cluster_config().await?;
    let url = config.cluster_url.to_string();
    let (qps, burst) = (args.client.kube_qps, args.client.kube_burst);
    // One client per controller, each with its own token bucket (as kube-controller-manager
    // gives every controller its own client): a node-controller busy provisioning must not
    // starve the nodeset-controller's creates, nor leader election's renewals.
    let client = limited_client(config.clone(), qps, burst)?;
    let clients = Clients {
        nodes: limited_client(config.clone(), qps, burst)?,
        nodesets: limited_client(config.clone(), qps, burst)?,
        // The shared Node watch's list and watch calls, like an informer factory's client.
        watch: limited_client(config.clone(), qps, burst)?,
        // The event path has its own token bucket (see `EventSink`): none here.
        events: limited_client(config.clone(), 0.0, 1)?,
        kubelet: limited_client(config, qps, burst)?,
    };
    let version = client
        .apiserver_version()
        .await
        .with_context(|| format!("cannot reach the API server at {url}"))?;
    tracing::info!(server = %url, version = %version.git_version, cluster = %args.cluster_name, "connected");

    let mut registry = Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let leader_gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
    registry.register(
        "kube_node_leader",
        "1 while this replica holds the leader Lease",
        leader_gauge.clone(),
    );
    let registry = Arc::new(registry);

    let health = Health::default();
    let _server = http::serve(args.metrics_addr, health.clone(), registry.clone())
        .await
        .with_context(|| format!("binding {}", args.metrics_addr))?;
    // The autoscaler facade only reads and writes NodeSets through the API server, so every
    // replica serves it, leader or not.
    let (grpc_stop, grpc_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let _grpc = match args.autoscaler.config() {
        Some(cfg) => {
            cfg.check(cfg.addr).context("--autoscaler-grpc-addr")?;
            let c = client.clone();
            Some(tokio::spawn(async move {
                if let Err(e) = kube_node_autoscaler::serve(c, cfg, async {
                    let _ = grpc_stop_rx.await;
                })
                .await
                {
                    tracing::error!(error = %e, reason = e.reason(), "autoscaler gRPC server stopped");
                }
            }))
        }
        None => None,
    };
    let _grpc_stop = grpc_stop;
    // Ready means "able to serve". A standby runs no controllers (their caches start with
    // leadership), so it is ready once it has reached the leader Lease, and not while it
    // cannot lead at all (a missing namespace it may not create, RBAC); without leader
    // election readiness waits for the controllers' caches.
    let lease = args.leader.leader_elect.then(|| lease_config(&args));
    let mut term = std::pin::pin!(shutdown_signal());
    if let Some(cfg) = &lease {
        let leader::Campaign {
            mut leading,
            health: mut campaign_health,
            task: campaign,
        } = leader::campaign_with_health(client.clone(), cfg.clone());
        let ready = health.clone();
        let standby_readiness = AbortOnDrop(tokio::spawn(async move {
            loop {
                let state = campaign_health.borrow_and_update().clone();
                match state {
                    leader::CampaignHealth::Reached => ready.set_ready(true),
                    leader::CampaignHealth::CannotLead(_) => ready.set_ready(false),
                    leader::CampaignHealth::Connecting => {}
                }
                if campaign_health.changed().await.is_err() {
                    return;
                }
            }
        }));
        tracing::info!(identity = %cfg.identity, lease = %cfg.name, namespace = %cfg.namespace, "waiting for leadership");
        let acquired = tokio::select! {
            r = leading.wait_for(|l| *l) => r.map(|_| ()).context("leader election stopped"),
            _ = &mut term => {
                tracing::info!("stopping: signal received");
                campaign.abort();
                let _ = campaign.await;
                // The campaign may have won just before the signal.
                leader::release(client, cfg).await;
                return Ok(());
            }
        };
        let result = match acquired {
            Ok(()) => {
                // From here readiness is the leader's (its caches synced): the standby's
                // rule, still seeing the Lease reached on every renewal, must not set it back.
                drop(standby_readiness);
                leader_gauge.set(1);
                let result = run_controllers(&args, clients, &health, &url, metrics, async move {
                    tokio::select! {
                        _ = leading.wait_for(|l| !*l) => Stop::LeadershipLost,
                        _ = term => Stop::Signal,
                    }
                })
                .await;
                leader_gauge.set(0);
                result
            }
            Err(e) => Err(e),
        };
        // Stop campaigning before releasing, or the campaign could take the Lease again.
        campaign.abort();
        let _ = campaign.await;
        leader::release(client, cfg).await;
        result
    } else {
        run_controllers(&args, clients, &health, &url, metrics, async move {
            term.await;
            Stop::Signal
        })
        .await
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The controllers' clients: one token bucket each.
struct Clients {
    nodes: kube::Client,
    nodesets: kube::Client,
    watch: kube::Client,
    events: kube::Client,
    /// The simulated kubelet's: it plays many kubelets, which would each have their own.
    kubelet: kube::Client,
}

/// The controllers' and providers' metrics, registered once per process.
#[derive(Clone)]
pub struct ControllerMetrics {
    /// Provider calls by provider, method and result.
    pub providers: ProviderMetrics,
    /// The node-controller's (it registers the reconcile families both controllers share).
    pub nodes: node_controller::Metrics,
    /// The nodeset-controller's.
    pub nodesets: nodeset_controller::Metrics,
}

impl ControllerMetrics {
    /// Registers every metric of both controllers and the providers into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let providers = ProviderMetrics::register(registry);
        let nodes = node_controller::Metrics::register(registry);
        let nodesets =
            nodeset_controller::Metrics::register_sharing(registry, nodes.reconcile_families());
        Self {
            providers,
            nodes,
            nodesets,
        }
    }
}

/// Why the controllers stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM or Ctrl-C: finish in-flight work, then exit successfully.
    Signal,
    /// Another replica holds the Lease now: stop acting at once and exit with an error, so
    /// Kubernetes restarts this replica as a standby.
    LeadershipLost,
}

fn lease_config(args: &RunArgs) -> LeaseConfig {
    let identity = args.leader.leader_identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "kube-node".into());
        format!("{host}-{:08x}", rand::random::<u32>())
    });
    LeaseConfig {
        namespace: args.leader.leader_election_namespace.clone(),
        name: args.leader.leader_election_id.clone(),
        identity,
        lease_duration: args.leader.lease_duration.into(),
        renew_interval: args.leader.lease_renew_interval.into(),
    }
}

/// Runs both controllers (and the simulated kubelet) until `stop` resolves. On a signal,
/// in-flight work gets `shutdown_timeout` to finish; on lost leadership nothing more is waited
/// for (another replica acts now) and the result is an error.
async fn run_controllers(
    args: &RunArgs,
    clients: Clients,
    health: &Health,
    url: &str,
    metrics: ControllerMetrics,
    stop: impl std::future::Future<Output = Stop>,
) -> anyhow::Result<()> {
    let ControllerMetrics {
        providers: provider_metrics,
        nodes: node_metrics,
        nodesets: nodeset_metrics,
    } = metrics;
    let cloud = SimulatedCloud::new();
    let kubelet = args
        .simulated_kubelet
        .then(|| cloud.start_kubelet(clients.kubelet.clone()));
    let providers = provider_registry(&cloud, provider_metrics);
    let (mut node_config, mut nodeset_config) =
        controller_configs(&args.cluster_name, &args.controllers, join_endpoint(url));
    // Claims live beside the leader Lease, in kube-node's own namespace.
    node_config.claim_namespace = args.leader.leader_election_namespace.clone();
    // Both controllers share each group's provider and lock.
    let groups = Arc::new(kube_node_runtime::GroupAccess::new(
        clients.nodesets.clone(),
        providers.clone(),
        args.cluster_name.clone(),
    ));
    node_config.groups = Some(groups.clone());
    nodeset_config.groups = Some(groups);
    // A leader is ready only once its watches have synced: a standby was ready when it had
    // no controllers to run, but a leader whose NodeClass or NodeSet watch never synced serves
    // nothing.
    health.set_ready(false);
    let (node_synced, mut node_synced_rx) = tokio::sync::watch::channel(false);
    let (nodeset_synced, mut nodeset_synced_rx) = tokio::sync::watch::channel(false);
    node_config.synced = Some(node_synced);
    nodeset_config.synced = Some(nodeset_synced);
    let ready = health.clone();
    let readiness = tokio::spawn(async move {
        if node_synced_rx.wait_for(|s| *s).await.is_ok()
            && nodeset_synced_rx.wait_for(|s| *s).await.is_ok()
        {
            ready.set_ready(true);
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (node_watch, nodeset_watch) = shared_node_watch(clients.watch);
    let mut nodes = tokio::spawn(node_controller::run_shared(
        clients.nodes,
        providers,
        node_config,
        node_metrics,
        Shared {
            nodes: Some(node_watch),
            events_client: Some(clients.events),
        },
        stopped(stop_rx.clone()),
    ));
    let mut nodesets = tokio::spawn(nodeset_controller::run_shared(
        clients.nodesets,
        nodeset_config,
        nodeset_metrics,
        Some(nodeset_watch),
        stopped(stop_rx.clone()),
    ));
    let why = tokio::select! {
        why = stop => why,
        r = &mut nodes => { return Err(anyhow::anyhow!("node-controller exited: {r:?}")); }
        r = &mut nodesets => { return Err(anyhow::anyhow!("nodeset-controller exited: {r:?}")); }
    };
    let _ = stop_tx.send(true);
    readiness.abort();
    if why == Stop::LeadershipLost {
        tracing::warn!("stopping: leadership lost");
        nodes.abort();
        nodesets.abort();
        drop(kubelet);
        anyhow::bail!("lost the leader Lease to another replica; exiting to restart as a standby");
    }
    tracing::info!("stopping: signal received");
    let grace: std::time::Duration = args.shutdown_timeout.into();
    let finished = tokio::time::timeout(grace, async { tokio::join!(nodes, nodesets) }).await;
    drop(kubelet);
    match finished {
        Ok((a, b)) => {
            a.context("node-controller task")?
                .context("node-controller")?;
            b.context("nodeset-controller task")?
                .context("nodeset-controller")?;
        }
        Err(_) => tracing::warn!(?grace, "in-flight work did not finish in time"),
    }
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod shared_watch_tests {
    use super::*;

    /// Both controllers' trims are the one trim of the cache (`CachedNode` keeps exactly what
    /// it keeps), and it keeps all the nodeset-controller reads: the Drifted condition too,
    /// which the node-controller's former trim dropped from the shared cache.
    #[test]
    fn the_shared_trim_keeps_all_the_nodeset_controller_reads() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "w-1", "uid": "u", "resourceVersion": "7",
                "labels": {"pool": "w", "kubernetes.io/hostname": "w-1"},
                "annotations": {"kube-node.io/node-class": "c", "kube-node.io/launched-at": "2026-01-01T00:00:00Z", "other.io/x": "y"},
                "finalizers": ["kube-node.io/machine"],
                "ownerReferences": [{"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet", "name": "w", "uid": "s", "controller": true}],
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubelet", "operation": "Update"}],
            },
            "spec": {"providerID": "sim://a/b", "unschedulable": true, "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "MachineReady", "status": "False", "reason": "Launching", "message": "m", "lastHeartbeatTime": "2026-01-01T00:00:00Z"},
                    {"type": "Drifted", "status": "True", "reason": "NodeClassChanged", "message": "d"},
                    {"type": "MemoryPressure", "status": "False"},
                ],
                "images": [{"names": ["a"], "sizeBytes": 1}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            },
        }))
        .expect("node");
        let mut alone = node.clone();
        nodeset_controller::observe::trim_node(&mut alone);
        let mut shared = node.clone();
        node_controller::trim_node(&mut shared);
        assert_eq!(shared, alone);
        assert_eq!(CachedNode::from(node).to_node(), shared);
        let conditions = shared.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(conditions.iter().any(|c| c.type_ == "Drifted"));
        assert!(!conditions.iter().any(|c| c.type_ == "MemoryPressure"));
    }
}

#[cfg(all(test, feature = "gke"))]
mod registry_tests {
    use super::*;

    /// A NodeClass of type gke builds the GKE backend, and the metrics wrapper keeps its
    /// group operations visible (the nodeset-controller finds them through `as_group`).
    #[test]
    fn a_gke_node_class_builds_a_group_sized_provider() {
        let registry = provider_registry(&SimulatedCloud::new(), ProviderMetrics::default());
        assert!(registry.types().any(|t| t == "gke"));
        let spec: kube_node_crds::NodeClassSpec = serde_json::from_value(serde_json::json!({
            "provider": {"type": "gke", "gke": {
                "project": "my-project", "location": "europe-west1",
                "cluster": "prod", "nodePool": "pool-1"}},
        }))
        .expect("spec");
        let class = kube_node_provider::ResolvedClass {
            name: "gke-pool".into(),
            generation: 1,
            spec,
            credentials: None,
            cluster_name: "test".into(),
            inventory: None,
            claims: None,
        };
        let provider = registry
            .build(&class)
            .expect("built without calling Google Cloud");
        assert_eq!(provider.name(), "gke");
        assert!(provider.capabilities().group_sized);
        let group = provider.as_group().expect("group operations");
        assert_eq!(
            group.group_name(),
            "projects/my-project/locations/europe-west1/clusters/prod/nodePools/pool-1"
        );
    }
}
