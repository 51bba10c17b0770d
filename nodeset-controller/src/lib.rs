//! The NodeSet controller: keeps exactly `spec.replicas` Nodes of a NodeClass, the way the
//! ReplicaSet controller keeps pods.
//!
//! It owns the Node *objects* of a NodeSet: it creates them (the node-controller then makes
//! their machines), deletes them in a defined order when scaling down or replacing Failed
//! ones, adopts matching orphans, releases Nodes whose labels stop matching, and writes the
//! NodeSet's status. It never talks to a cloud.
//!
//! Never overshooting is the point (see [`plan`] for the arithmetic):
//!
//! * every create or delete is decided from a consistent read of the children (a fresh
//!   `list` from the API server), never from the watch cache alone;
//! * the controller records the names it is about to create or delete ([`expectations`]) and
//!   does not scale a NodeSet again until its watch has seen them, as kube-controller-manager's
//!   ReplicaSet controller does;
//! * creates go in slow-start batches (1, 2, 4, …, at most [`Config::max_create_batch`] at
//!   once) and stop at the first failure; a pass creates all it planned (its own answered
//!   creates are known without the watch) unless the NodeSet's spec changes meanwhile.
//!
//! A healthy Node costs this controller exactly two writes over its life: its create (with the
//! finalizer, taints, labels, annotations and owner reference all in it) and its delete.
//! Events are aggregated per batch and the NodeSet status is written at most once per pass,
//! only when it changed.

pub mod backoff;
pub mod conflict;
pub mod drift;
pub mod error;
pub mod expectations;
pub mod fallback;
pub mod group;
pub mod metrics;
pub mod observe;
pub mod plan;
mod reconcile;
pub mod template;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::PostParams;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kube_node_crds::v1alpha1::{NodeClass, NodeSet};
use kube_node_runtime::tolerant::{self, InvalidObjects, nodeclass_decoder, nodeset_decoder};
use kube_node_runtime::{CachedNode, cached_event};

pub use error::Error;
pub use metrics::Metrics;
pub use observe::{InstanceError, InstanceState, NodeInstance, nodeset_instances};

use crate::expectations::Expectations;
use crate::observe::{cached_has_controller, cached_nodeset_owner, nodeset_owner};
use crate::reconcile::Context;

/// The name events are reported under.
pub const REPORTER: &str = "kube-node-nodeset-controller";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// How many NodeSets are reconciled at once.
    pub concurrency: u16,
    /// The largest batch of parallel Node creates: the slow-start series 1, 2, 4, … grows to
    /// this and stays there. Unlike the ReplicaSet controller's `burstReplicas`, a pass does
    /// not stop at it to wait for its watch (see `create_nodes`).
    pub max_create_batch: usize,
    /// Set to `true` once the NodeSet, Node and NodeClass caches have synced (for a readiness
    /// probe).
    pub synced: Option<tokio::sync::watch::Sender<bool>>,
    /// The providers and locks of group-backed NodeClasses, shared with the node-controller.
    /// Without it, a NodeSet of a group-backed class reports that it cannot size the group.
    pub groups: Option<Arc<kube_node_runtime::GroupAccess>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_create_batch: 500,
            synced: None,
            groups: None,
        }
    }
}

/// Runs the NodeSet controller until `shutdown` completes (then finishes the passes in
/// flight and returns).
pub async fn run(
    client: Client,
    config: Config,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_shared(client, config, metrics, None, shutdown).await
}

/// [`run`], on the process's shared Node watch when `nodes` is given.
pub async fn run_shared(
    client: Client,
    config: Config,
    metrics: Metrics,
    nodes: Option<kube_node_runtime::WatchSource<CachedNode>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let expectations = Arc::new(Expectations::default());

    // Nodes: one watch feeds the cache, the expectations (as events arrive, after the cache
    // has them, like an informer's event handler) and the reconcile triggers.
    let (node_store, node_events) = match nodes {
        Some(source) => (source.store, source.events),
        None => {
            let (store, writer) = reflector::store::<CachedNode>();
            let events = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
                .default_backoff()
                .map_ok(cached_event)
                .reflect(writer)
                .boxed();
            (store, events)
        }
    };
    let observer = expectations.clone();
    let node_events = node_events
        .inspect_ok(move |event| observer.observe_event(event))
        .touched_objects();

    // NodeClasses and NodeSets are read one object at a time, so one that does not decode
    // or validate never hides the others (see `kube_node_runtime::tolerant`). A bad NodeClass
    // is the node-controller's to report; a bad NodeSet is reported here, on itself.
    let (class_store, class_writer) = reflector::store::<NodeClass>();
    let class_events = tolerant::watch(
        client.clone(),
        watcher::Config::default(),
        nodeclass_decoder(),
        InvalidObjects::new("NodeClass", Default::default()),
        None,
    )
    .default_backoff()
    .reflect(class_writer)
    .touched_objects();

    // NodeSets: every object the watch delivers is a trigger the work queue counts.
    let queue = metrics.work_queue().clone();
    let (set_store, set_writer) = reflector::store::<NodeSet>();
    let watched = queue.clone();
    let invalid_sets = InvalidObjects::new("NodeSet", metrics.invalid_objects("NodeSet"));
    let (report_tx, report_rx) = futures::channel::mpsc::unbounded();
    let set_events = tolerant::watch(
        client.clone(),
        watcher::Config::default(),
        nodeset_decoder(),
        invalid_sets,
        Some(report_tx),
    )
    .default_backoff()
    .reflect(set_writer)
    .applied_objects()
    .inspect_ok(move |ns| watched.add(&ns.name_any()));
    let controller = Controller::for_stream(set_events, set_store)
        .with_config(controller::Config::default().concurrency(config.concurrency));
    let by_node = controller.store();
    let by_class = controller.store();
    let all_sets = controller.store();
    let (node_queue, class_queue, finished) = (queue.clone(), queue.clone(), queue);
    let sync_stores = (controller.store(), node_store.clone(), class_store.clone());
    let synced_tx = config.synced.clone();

    // A shutdown future the runtime can hold (it wants `Sync`).
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        },
    );
    let reporter = tolerant::run_reporter(
        client.clone(),
        recorder.clone(),
        kube::api::ApiResource::erase::<NodeSet>(&()),
        report_rx,
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        nodes: node_store,
        classes: class_store,
        sets: all_sets,
        group_unsettled: Mutex::new(HashMap::new()),
        expectations,
        recorder,
        metrics,
        config,
        failures: Mutex::new(HashMap::new()),
        create_failures: Mutex::new(HashMap::new()),
        create_backoff: Mutex::new(HashMap::new()),
        written: Mutex::new(HashMap::new()),
        status_written_at: Mutex::new(HashMap::new()),
    });

    let synced = async move {
        let (sets, nodes, classes) = sync_stores;
        if tokio::try_join!(
            sets.wait_until_ready(),
            nodes.wait_until_ready(),
            classes.wait_until_ready()
        )
        .is_ok()
        {
            tracing::info!("nodeset-controller caches synced");
            if let Some(tx) = synced_tx {
                let _ = tx.send(true);
            }
        }
    };
    let controller = controller
        .watches_stream(node_events, move |node: CachedNode| {
            let sets = nodesets_of_node(&by_node, &node);
            sets.iter().for_each(|s| node_queue.add(&s.name));
            sets
        })
        .watches_stream(class_events, move |class: NodeClass| {
            let sets = nodesets_of_class(&by_class, &class);
            sets.iter().for_each(|s| class_queue.add(&s.name));
            sets
        })
        .graceful_shutdown_on(async move {
            let _ = stop_rx.await;
        })
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(move |result| {
            // A NodeSet deleted before its turn is never reconciled: it leaves the queue here.
            if let Err(controller::Error::ObjectNotFound(obj)) = &result {
                finished.done(&obj.name);
            }
            async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller event");
                }
            }
        });
    // The sync signal must not keep the controller from stopping (a cache that never syncs).
    tokio::select! {
        () = controller => {}
        () = async { synced.await; std::future::pending::<()>().await } => {}
        () = async { reporter.await; std::future::pending::<()>().await } => {}
    }
    Ok(())
}

/// The NodeSets a Node event concerns: its controller (a NodeSet), every NodeSet that could
/// adopt it (it has no controller and matches the selector), and any NodeSet naming it in
/// `spec.removeNodes`.
fn nodesets_of_node(nodesets: &Store<NodeSet>, node: &CachedNode) -> Vec<ObjectRef<NodeSet>> {
    let mut out = Vec::new();
    let owner = cached_nodeset_owner(node).map(|(name, _)| name.to_string());
    if let Some(name) = &owner {
        out.push(ObjectRef::new(name));
    }
    let has_controller = cached_has_controller(node);
    let name = node.name_any();
    let labels = node.labels();
    for ns in nodesets.state() {
        if owner.as_deref() == ns.metadata.name.as_deref() {
            continue;
        }
        if (!has_controller && ns.spec.selector.matches_by(|k| labels.get(k)))
            || ns.spec.remove_nodes.contains(&name)
        {
            out.push(ObjectRef::from_obj(ns.as_ref()));
        }
    }
    out
}

/// The NodeSets using a NodeClass (its generation drives the outdated count).
fn nodesets_of_class(nodesets: &Store<NodeSet>, class: &NodeClass) -> Vec<ObjectRef<NodeSet>> {
    let name = class.name_any();
    nodesets
        .state()
        .iter()
        .filter(|ns| {
            ns.spec
                .template
                .spec
                .node_classes()
                .contains(&name.as_str())
        })
        .map(|ns| ObjectRef::from_obj(ns.as_ref()))
        .collect()
}

/// How long [`remove_nodes`] keeps retrying conflicts: cluster-autoscaler's own deadline for
/// a cloud-provider call (its externalgrpc `grpcTimeout`) less a margin.
pub const REMOVE_NODES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(4);

/// Removes exactly the named Nodes from a NodeSet in one write: a single update of the
/// NodeSet (with its resourceVersion as precondition) that appends the names to
/// `spec.removeNodes` and lowers `spec.replicas` by the number of them that are live Nodes of
/// the NodeSet not already being removed. The controller then deletes exactly these Nodes.
///
/// Refuses names that are not Nodes of this NodeSet (another NodeSet's, unowned, or
/// nonexistent) and removals that would take `replicas` below `spec.minSize`. Names already in
/// `spec.removeNodes` are accepted and ignored, so a retry is harmless. On a conflict the
/// NodeSet is read again and the update recomputed and retried ([`conflict`]) for up to
/// [`REMOVE_NODES_TIMEOUT`].
pub async fn remove_nodes(client: &Client, nodeset: &str, names: &[String]) -> Result<(), Error> {
    remove_nodes_until(
        client,
        nodeset,
        names,
        tokio::time::Instant::now() + REMOVE_NODES_TIMEOUT,
    )
    .await
}

/// [`remove_nodes`], retrying conflicts until `deadline`.
pub async fn remove_nodes_until(
    client: &Client,
    nodeset: &str,
    names: &[String],
    deadline: tokio::time::Instant,
) -> Result<(), Error> {
    let api: Api<NodeSet> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());
    // The Nodes first (their owner does not change under us): the read-to-write window of the
    // NodeSet, where a status write makes the update conflict, is then one GET and one PUT.
    let mut owners: Vec<(String, Option<(String, bool)>)> = Vec::with_capacity(names.len());
    for name in names {
        if owners.iter().any(|(n, _)| n == name) {
            continue;
        }
        let owner = nodes.get_opt(name).await?.and_then(|node| {
            let live = node.metadata.deletion_timestamp.is_none();
            nodeset_owner(&node).map(|(_, uid)| (uid.to_string(), live))
        });
        owners.push((name.clone(), owner));
    }
    let attempt = || async {
        let mut ns = api.get(nodeset).await?;
        let uid = ns
            .metadata
            .uid
            .clone()
            .ok_or(Error::MissingField("metadata.uid"))?;
        let mut add: Vec<String> = Vec::new();
        let mut refused: Vec<String> = Vec::new();
        for (name, owner) in &owners {
            if ns.spec.remove_nodes.contains(name) {
                continue;
            }
            match owner {
                Some((u, live)) if *u == uid => {
                    if *live {
                        add.push(name.clone());
                    }
                }
                _ => refused.push(name.clone()),
            }
        }
        if !refused.is_empty() {
            return Err(Error::NotChildren {
                nodeset: nodeset.to_string(),
                names: refused,
            });
        }
        if add.is_empty() {
            return Ok(());
        }
        let count = i32::try_from(add.len()).unwrap_or(i32::MAX);
        let replicas = ns.spec.replicas.saturating_sub(count).max(0);
        if let Some(min_size) = ns.spec.min_size
            && replicas < min_size
        {
            return Err(Error::BelowMinSize {
                nodeset: nodeset.to_string(),
                count: add.len(),
                min_size,
            });
        }
        ns.spec.remove_nodes.extend(add);
        ns.spec.replicas = replicas;
        // `replace` sends metadata.resourceVersion: a concurrent change gets a 409.
        api.replace(nodeset, &PostParams::default(), &ns).await?;
        Ok(())
    };
    let is_conflict = |e: &Error| matches!(e, Error::Kube(kube::Error::Api(s)) if s.is_conflict());
    conflict::retry_on_conflict(deadline, is_conflict, attempt)
        .await
        .map_err(|e| match e {
            conflict::RetryError::Failed(e) => e,
            conflict::RetryError::GaveUp { attempts, .. } => Error::Conflict {
                nodeset: nodeset.to_string(),
                attempts,
            },
        })
}
