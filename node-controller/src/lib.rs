//! The node-controller: a core v1 Node annotated `kube-node.io/node-class: <name>` becomes a
//! real machine whose kubelet joins that very Node, and deleting the Node drains it and
//! deletes the machine.
//!
//! [`run`] starts three loops on one client:
//! - the Node controller (one pass = read → pure [`plan::plan`] → one action → record),
//! - the NodeClass controller (builds each class's provider once per generation and
//!   credentials version, validates it, writes the NodeClass `Ready` condition),
//! - the orphan collector (machines tagged for this cluster without a Node), which also
//!   refreshes the per-class inventory that lets Ready Nodes be checked without a provider
//!   call each.

mod applied;
pub mod bootstrap;
pub mod capacity;
pub mod claims;
mod error;
mod gc;
mod metrics;
mod node;
mod nodeclass;
pub mod orphan;
pub mod plan;
mod protection;
mod turns;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{MACHINE_READY_CONDITION, MachinePhase, NODE_CLASS_ANNOTATION};
use kube_node_provider::{Credentials, Provider, ProviderError, ProviderRegistry, ResolvedClass};
use kube_node_runtime::{Backoff, CachedNode, EventSink, Shared, cached_event};

pub use error::{Error, WAIT_FOR_CHANGE, error_delay};
pub use kube_node_runtime::tolerant::{self, Decoder, InvalidObjects, nodeclass_decoder};
pub use metrics::Metrics;
pub use orphan::{OrphanDecision, select_orphans};

/// The reporter name on every event this controller writes.
pub const REPORTER: &str = "kube-node-node-controller";

/// How the node-controller runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The cluster name: tags every machine and scopes the orphan collector.
    pub cluster_name: String,
    /// The join endpoint (`host:port`) when a NodeClass has no `bootstrap.apiServerEndpoint`.
    pub api_server_endpoint: Option<String>,
    /// A machine without a Node must be at least this old to be collected.
    pub orphan_min_age: Duration,
    /// The orphan collector pauses when more than this share of a listing would go.
    pub orphan_max_fraction: f64,
    /// How often the orphan collector (and the inventory refresh) runs.
    pub orphan_gc_interval: Duration,
    /// How many Nodes are reconciled at once.
    pub concurrency: u16,
    /// Set to `true` once the Node and NodeClass caches have synced (for a readiness probe).
    pub synced: Option<tokio::sync::watch::Sender<bool>>,
    /// kube-node's namespace: where backends without tags keep their claims (one Lease per
    /// machine, `providers/CONTRACT.md` section 10).
    pub claim_namespace: String,
    /// The group locks shared with the nodeset-controller: a machine of a group is deleted
    /// under its group's lock (see [`kube_node_runtime::GroupAccess`]).
    pub groups: Option<Arc<kube_node_runtime::GroupAccess>>,
}

/// How long a record of the versions a pass's writes replaced is trusted (see
/// `OwnWrites::stale`).
const STALE_LIMIT: Duration = Duration::from_secs(60);

/// How many passes may wait in order for each turn (see `Context::passes`).
const QUEUED_PER_TURN: u16 = 8;

/// How often the Nodes waiting for a launch are counted (see `Context::launches_pending`).
const PENDING_RECOUNT: Duration = turns::WAKE_INTERVAL;

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_name: "kubernetes".to_string(),
            api_server_endpoint: None,
            orphan_min_age: Duration::from_secs(600),
            orphan_max_fraction: 0.2,
            orphan_gc_interval: Duration::from_secs(60),
            concurrency: 32,
            synced: None,
            claim_namespace: "kube-node-system".to_string(),
            groups: None,
        }
    }
}

/// A provider built for one NodeClass generation and credentials version.
struct CachedProvider {
    generation: i64,
    secret_version: Option<String>,
    provider: Arc<dyn Provider>,
    /// The result of `validate()`, once it gave a lasting answer.
    validated: Option<Result<(), ProviderError>>,
}

/// What the last provider listing of a NodeClass showed.
pub(crate) struct Inventory {
    pub(crate) listed_at: jiff::Timestamp,
    pub(crate) provider_ids: HashSet<String>,
    /// Each listed machine's own labels (`Instance::labels`), by provider ID: a Ready Node,
    /// whose machine a pass does not look up, gets them from here.
    pub(crate) labels: HashMap<String, std::collections::BTreeMap<String, String>>,
}

/// State shared by the controllers and the orphan collector.
pub(crate) struct Context {
    pub(crate) client: Client,
    pub(crate) providers: ProviderRegistry,
    pub(crate) config: Config,
    pub(crate) metrics: Metrics,
    pub(crate) recorder: Recorder,
    /// Node events: best effort, never waited for.
    pub(crate) events: EventSink,
    pub(crate) nodes: Store<CachedNode>,
    /// NodeClasses as the watch last saw them: a Node pass reads its class here, not from the
    /// API server (a scale-up of 1000 Nodes would otherwise cost 1000+ GETs).
    pub(crate) classes: Store<NodeClass>,
    /// NodeClasses the watch set aside because they do not decode or validate.
    pub(crate) invalid_classes: Arc<InvalidObjects>,
    /// Node writes the API server refused as invalid (422), by NodeClass: the class's
    /// generation then and the API server's message. Reported on the NodeClass until its
    /// generation changes.
    pub(crate) rejected_writes: Mutex<HashMap<String, (i64, String)>>,
    /// Node writes the API server refused, by Node UID: the digest of the labels and taints
    /// they carried, the API server's message, and when.
    refused_nodes: Mutex<HashMap<String, (u64, String, std::time::Instant)>>,
    /// Whether both caches have synced; until then a Node pass waits instead of taking a
    /// missing NodeClass for a deleted one.
    pub(crate) synced: std::sync::atomic::AtomicBool,
    /// The cluster CA's hash for join payloads, with when it was read.
    ca_hash: Mutex<Option<(String, std::time::Instant)>>,
    pub(crate) backoff: Backoff,
    /// The claim store handed to every provider (Leases in kube-node's namespace).
    claims: Arc<dyn kube_node_provider::ClaimStore>,
    cache: Mutex<HashMap<String, CachedProvider>>,
    pub(crate) inventory: Mutex<HashMap<String, Inventory>>,
    attempts: Mutex<HashMap<String, u32>>,
    /// Asks the NodeClass controller for a pass (a Node of the class just registered).
    capacity_checks: futures::channel::mpsc::UnboundedSender<ObjectRef<NodeClass>>,
    /// Bootstrap tokens this process created, by Node UID, with their expiry: the only place a
    /// token's secret half is kept outside its Secret and the machine's user-data.
    tokens: Mutex<HashMap<String, (bootstrap::BootstrapToken, jiff::Timestamp)>>,
    /// The key bootstrap tokens are derived from, once read (or made).
    token_key: tokio::sync::OnceCell<bootstrap::TokenKey>,
    /// Machines created whose providerID is not in the Node cache yet, by Node UID: recorded
    /// by a later pass once no launch is in flight, and kept until the cache shows the write.
    launched: Mutex<HashMap<String, kube_node_provider::Instance>>,
    /// The turns of Node passes: `Config::concurrency` of them, handed out in order.
    pub(crate) passes: turns::Turns,
    /// The turns of passes that may launch a machine, as many again and apart: a launch never
    /// waits behind bookkeeping (see `turns`).
    pub(crate) launch_turns: tokio::sync::Semaphore,
    /// Bookkeeping passes set aside while launches are in flight.
    pub(crate) deferred: turns::Deferred,
    /// Passes creating a machine right now.
    launches: std::sync::atomic::AtomicUsize,
    /// Whether Nodes wait for their launch, as last counted, and when.
    pending_launches: Mutex<Option<(std::time::Instant, bool)>>,
    /// What the controller's own writes replaced: a pass on an older copy waits for the watch.
    pub(crate) own_writes: OwnWrites,
}

/// By Node UID, the resourceVersions that the last pass's own writes replaced, and when.
#[derive(Default)]
pub(crate) struct OwnWrites(Mutex<HashMap<String, (std::time::Instant, Vec<String>)>>);

impl OwnWrites {
    /// Remembers the resourceVersions a pass's writes replaced (none: forgets the Node's).
    pub(crate) fn record(&self, uid: &str, versions: Vec<String>) {
        if let Ok(mut s) = self.0.lock() {
            if versions.is_empty() {
                s.remove(uid);
            } else {
                s.insert(uid.to_string(), (std::time::Instant::now(), versions));
            }
        }
    }

    /// Whether a cached Node is a version this controller's own write replaced: the cache is
    /// behind that write. resourceVersions are opaque, so only equality is used, and a cache
    /// only moves forward: once it shows another version the record is dropped.
    pub(crate) fn stale(&self, uid: &str, resource_version: Option<&str>) -> bool {
        let Ok(mut s) = self.0.lock() else {
            return false;
        };
        let Some((at, versions)) = s.get(uid) else {
            return false;
        };
        // A watch delivers within seconds; past this, trust the cache over the record.
        if at.elapsed() < STALE_LIMIT
            && resource_version.is_some_and(|rv| versions.iter().any(|v| v == rv))
        {
            return true;
        }
        s.remove(uid);
        false
    }
}

/// What of a NodeClass its Nodes' passes read: its spec (generation), its deletion, its Ready
/// condition and a pool's free machines. The NodeClass watch triggers every Node of a class
/// when this changes, and only then: a status write that changes nothing of it (the InUse
/// condition's count, as Nodes come and go) used to send every Node of the class through a
/// pass, 1000 passes per write in the middle of a scale-up.
fn node_trigger_key(nc: &NodeClass) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nc.metadata.generation.hash(&mut h);
    nc.metadata.deletion_timestamp.is_some().hash(&mut h);
    if let Some(status) = &nc.status {
        status.free_machines.hash(&mut h);
        if let Some(c) = kube_node_crds::v1alpha1::find_condition(&status.conditions, "Ready") {
            (&c.status, &c.reason, &c.message, c.observed_generation).hash(&mut h);
        }
    }
    Some(h.finish())
}

/// Whether a cached Node waits for its launch (see `Context::launches_pending`).
fn awaits_launch(n: &CachedNode, launched: &HashSet<String>, failing: &HashSet<String>) -> bool {
    let uid = kube::Resource::meta(n).uid.as_deref().unwrap_or_default();
    n.annotations().contains_key(NODE_CLASS_ANNOTATION)
        && n.deletion_timestamp().is_none()
        && n.provider_id().is_none_or(str::is_empty)
        && !launched.contains(uid)
        && !failing.contains(uid)
        // Launching (a NodeSet creates its Nodes so), or nothing yet (made by hand): a Node
        // held Pending (its class is group-backed, a failure was recorded) or Failed waits
        // for a change, not for a worker.
        && n.condition(MACHINE_READY_CONDITION).is_none_or(|c| {
            c.reason().and_then(MachinePhase::parse) == Some(MachinePhase::Launching)
        })
}

/// Counts a launch in flight while it lives.
pub(crate) struct Launching<'a>(&'a Context);

impl Drop for Launching<'_> {
    fn drop(&mut self) {
        self.0
            .launches
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How long the cluster CA's hash is reused before kube-root-ca.crt is read again.
const CA_TTL: Duration = Duration::from_secs(60);

impl Context {
    /// A Node of `class` registered: has the NodeClass controller compare the class's declared
    /// capacity with its Nodes now, unless the class already has a verdict for its current
    /// generation (the NodeClass resync re-checks those every few minutes). So the first
    /// registered Nodes of a class are checked at once, and a burst costs one check, not one
    /// per Node.
    pub(crate) fn check_capacity_soon(&self, class: &str) {
        let known = self.node_class(class).is_some_and(|nc| {
            nc.status
                .as_ref()
                .and_then(|s| {
                    kube_node_crds::v1alpha1::find_condition(
                        &s.conditions,
                        kube_node_crds::names::CAPACITY_CONDITION,
                    )
                })
                .is_some_and(|c| c.observed_generation == nc.metadata.generation)
        });
        if !known {
            let _ = self.capacity_checks.unbounded_send(ObjectRef::new(class));
        }
    }

    /// A machine of `class` was created or deleted: when the class draws from a fixed pool
    /// (its status counts free machines), has the NodeClass controller count again now, so
    /// the NodeSet and cluster-autoscaler see the new count within a pass.
    pub(crate) fn recount_pool(&self, class: &str) {
        let pooled = self.node_class(class).is_some_and(|nc| {
            nc.status
                .as_ref()
                .is_some_and(|s| s.free_machines.is_some())
        });
        if pooled {
            let _ = self.capacity_checks.unbounded_send(ObjectRef::new(class));
        }
    }

    /// The `sha256:` hash of the cluster CA from kube-system/kube-root-ca.crt, read at most once
    /// a minute (one GET per create would double the reads of a scale-up).
    pub(crate) async fn ca_cert_hash(&self) -> Result<String, Error> {
        if let Ok(c) = self.ca_hash.lock()
            && let Some((hash, at)) = c.as_ref()
            && at.elapsed() < CA_TTL
        {
            return Ok(hash.clone());
        }
        let ca = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
            self.client.clone(),
            bootstrap::TOKEN_NAMESPACE,
        )
        .get_opt(bootstrap::CA_CONFIGMAP)
        .await?
        .and_then(|cm| cm.data.and_then(|mut d| d.remove(bootstrap::CA_KEY)))
        .ok_or_else(|| {
            Error::CaCertificate(format!(
                "ConfigMap {}/{} with key {} not found",
                bootstrap::TOKEN_NAMESPACE,
                bootstrap::CA_CONFIGMAP,
                bootstrap::CA_KEY
            ))
        })?;
        let hash = bootstrap::ca_cert_hash(&ca).map_err(|e| Error::CaCertificate(e.to_string()))?;
        if let Ok(mut c) = self.ca_hash.lock() {
            *c = Some((hash.clone(), std::time::Instant::now()));
        }
        Ok(hash)
    }

    /// The key bootstrap tokens are derived from: read from its Secret in kube-node's own
    /// namespace, or made there on first use (two processes racing to make it settle on the
    /// create that won: the loser's create is a 409 and it reads the winner's).
    pub(crate) async fn token_key(&self) -> Result<bootstrap::TokenKey, Error> {
        let namespace = self.config.claim_namespace.as_str();
        let name = bootstrap::TOKEN_KEY_SECRET;
        let key = self
            .token_key
            .get_or_try_init(|| async {
                let api = Api::<Secret>::namespaced(self.client.clone(), namespace);
                let unusable = |e: &dyn std::fmt::Display| {
                    Error::TokenKey(format!("Secret {namespace}/{name}: {e}"))
                };
                for _ in 0..3 {
                    if let Some(s) = api.get_opt(name).await.map_err(|e| unusable(&e))? {
                        return bootstrap::TokenKey::from_secret(&s).ok_or_else(|| {
                            unusable(&format_args!(
                                "data.{} is not a 32-byte key",
                                bootstrap::TOKEN_KEY_DATA
                            ))
                        });
                    }
                    let key = bootstrap::TokenKey::generate();
                    match api
                        .create(&kube::api::PostParams::default(), &key.secret(namespace))
                        .await
                    {
                        Ok(_) => {
                            tracing::info!(secret = %format!("{namespace}/{name}"), "created the bootstrap token key");
                            return Ok(key);
                        }
                        Err(kube::Error::Api(e)) if crate::error::is_conflict(&e) => continue,
                        Err(e) => return Err(unusable(&e)),
                    }
                }
                Err(unusable(&"created and deleted again while being read"))
            })
            .await?;
        Ok(key.clone())
    }

    /// The NodeClass `name` from the cache.
    pub(crate) fn node_class(&self, name: &str) -> Option<Arc<NodeClass>> {
        self.classes.get(&ObjectRef::new(name))
    }

    /// Records that the API server refused a Node write made from NodeClass `class`.
    pub(crate) fn reject_write(&self, class: &NodeClass, message: &str) {
        if let Ok(mut r) = self.rejected_writes.lock() {
            r.insert(
                class.name_any(),
                (
                    class.metadata.generation.unwrap_or_default(),
                    message.to_string(),
                ),
            );
        }
    }

    /// Records that the API server refused a write of Node `uid` carrying `key`.
    pub(crate) fn refuse_write(&self, uid: &str, key: u64, message: &str) {
        if let Ok(mut r) = self.refused_nodes.lock() {
            r.insert(
                uid.to_string(),
                (key, message.to_string(), std::time::Instant::now()),
            );
        }
    }

    /// The API server's message if it refused this very input for Node `uid` less than
    /// [`WAIT_FOR_CHANGE`] ago. A different input forgets the refusal.
    pub(crate) fn refused_write(&self, uid: &str, key: u64) -> Option<String> {
        let mut r = self.refused_nodes.lock().ok()?;
        match r.get(uid) {
            Some((k, message, at)) if *k == key && at.elapsed() < WAIT_FOR_CHANGE => {
                Some(message.clone())
            }
            Some(_) => {
                r.remove(uid);
                None
            }
            None => None,
        }
    }

    /// The refused Node write of the current generation of `class`, if any.
    pub(crate) fn rejected_write(&self, class: &NodeClass) -> Option<String> {
        let mut r = self.rejected_writes.lock().ok()?;
        let name = class.name_any();
        let (generation, message) = r.get(&name)?.clone();
        if generation == class.metadata.generation.unwrap_or_default() {
            Some(message)
        } else {
            // The class changed: its Nodes are written again, and tell anew.
            r.remove(&name);
            None
        }
    }

    pub(crate) fn cached_token(
        &self,
        uid: &str,
    ) -> Option<(bootstrap::BootstrapToken, jiff::Timestamp)> {
        self.tokens.lock().ok().and_then(|t| t.get(uid).cloned())
    }

    pub(crate) fn cache_token(
        &self,
        uid: &str,
        token: bootstrap::BootstrapToken,
        expires: jiff::Timestamp,
    ) {
        if let Ok(mut t) = self.tokens.lock() {
            t.insert(uid.to_string(), (token, expires));
        }
    }

    /// Which turn a pass on `node` takes: a launch's, or (a Node being deleted, or bookkeeping
    /// with no launch in flight) any other's, or none yet (see `turns`).
    pub(crate) fn turn(&self, node: &CachedNode) -> turns::Turn {
        let uid = kube::Resource::meta(node)
            .uid
            .as_deref()
            .unwrap_or_default();
        if node.deletion_timestamp().is_some() {
            self.deferred.forget(uid);
            return turns::Turn::Other;
        }
        let launched = self.launched.lock().is_ok_and(|l| l.contains_key(uid));
        if node.provider_id().is_none_or(str::is_empty) && !launched {
            return turns::Turn::Launch;
        }
        match self.defer_bookkeeping(uid, &node.name_any()) {
            Some(left) => turns::Turn::Wait(left),
            None => turns::Turn::Other,
        }
    }

    /// Sets the bookkeeping of a Node just launched aside while other launches are in flight:
    /// how long at most, or `None` when it runs now.
    pub(crate) fn defer_bookkeeping(&self, uid: &str, name: &str) -> Option<Duration> {
        self.deferred.hold(
            uid,
            name,
            self.launches_in_flight(),
            std::time::Instant::now(),
        )
    }

    /// Marks a launch in flight until the guard drops.
    pub(crate) fn launching(&self) -> Launching<'_> {
        self.launches
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Launching(self)
    }

    /// Whether a machine is being created, or a Node waits for its launch: bookkeeping passes
    /// then wait, so that the reconcile workers and the client's tokens go to launches first.
    /// On a busy API server a bookkeeping pass takes a worker for as long as its writes take;
    /// with the workers in bookkeeping, the last Nodes of a scale-up waited 20 s in the queue
    /// for their first pass.
    pub(crate) fn launches_in_flight(&self) -> bool {
        self.launches.load(std::sync::atomic::Ordering::Acquire) > 0 || self.launches_pending()
    }

    /// Whether a Node in the cache waits for its launch: it names a NodeClass, is not being
    /// deleted, has no providerID, was not launched by this process, is new or Launching,
    /// and its last pass did not fail (a Node that cannot be launched, for a missing class or
    /// an exhausted cloud, must not hold everyone's bookkeeping). Counted at most every
    /// [`PENDING_RECOUNT`].
    fn launches_pending(&self) -> bool {
        let now = std::time::Instant::now();
        if let Ok(c) = self.pending_launches.lock()
            && let Some((at, pending)) = *c
            && now.duration_since(at) < PENDING_RECOUNT
        {
            return pending;
        }
        let launched: HashSet<String> = self
            .launched
            .lock()
            .map(|l| l.keys().cloned().collect())
            .unwrap_or_default();
        let failing: HashSet<String> = self
            .attempts
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        let pending = self
            .nodes
            .state()
            .iter()
            .any(|n| awaits_launch(n, &launched, &failing));
        if let Ok(mut c) = self.pending_launches.lock() {
            *c = Some((now, pending));
        }
        pending
    }

    pub(crate) fn remember_launch(&self, uid: &str, mut instance: kube_node_provider::Instance) {
        // Of its tags the providerID write reads only the class it was made on. In a large
        // scale-up thousands of machines wait here for their bookkeeping (see `turns`), and
        // the whole tag map of each was 1.5 MiB of the peak heap with 5000.
        instance
            .tags
            .retain(|k, _| k == kube_node_crds::names::tags::NODE_CLASS);
        // Nor are its addresses read (the kubelet reports the Node's).
        instance.addresses = Vec::new();
        if let Ok(mut l) = self.launched.lock() {
            l.insert(uid.to_string(), instance);
        }
        // It may have been the last Node waiting: counted again on the next question.
        if let Ok(mut c) = self.pending_launches.lock() {
            *c = None;
        }
    }

    pub(crate) fn launched_instance(&self, uid: &str) -> Option<kube_node_provider::Instance> {
        self.launched.lock().ok()?.get(uid).cloned()
    }

    pub(crate) fn forget_launch(&self, uid: &str) {
        if let Ok(mut l) = self.launched.lock() {
            l.remove(uid);
        }
    }

    pub(crate) fn forget_token(&self, uid: &str) {
        if let Ok(mut t) = self.tokens.lock() {
            t.remove(uid);
        }
    }

    /// The provider of a NodeClass. `refresh` re-reads the credentials Secret (the NodeClass
    /// controller does, on every resync); Node reconciles reuse the cached provider while the
    /// generation is unchanged, so a Ready Node costs no Secret read.
    pub(crate) async fn provider_for(
        &self,
        nc: &NodeClass,
        refresh: bool,
    ) -> Result<Arc<dyn Provider>, Error> {
        let name = nc.name_any();
        let generation = nc.metadata.generation.unwrap_or_default();
        if !refresh && let Some(p) = self.cached(&name, generation, None) {
            return Ok(p);
        }
        let (credentials, mut secret_version) = match &nc.spec.credentials_secret_ref {
            None => (None, None),
            Some(r) => {
                let secret = Api::<Secret>::namespaced(self.client.clone(), &r.namespace)
                    .get_opt(&r.name)
                    .await?
                    .ok_or_else(|| Error::CredentialsNotFound {
                        namespace: r.namespace.clone(),
                        name: r.name.clone(),
                    })?;
                let version = secret.metadata.resource_version.clone();
                (Some(Credentials::from_secret(secret)), version)
            }
        };
        // A referenced inventory is read like the credentials, and its version is part of the
        // cache key: an edited inventory rebuilds the provider without a new generation.
        let mut inventory = None;
        if let Some(r) = nc
            .spec
            .provider
            .baremetal
            .as_ref()
            .and_then(|b| b.inventory_ref.as_ref())
        {
            let cm = Api::<ConfigMap>::namespaced(self.client.clone(), &r.namespace)
                .get_opt(&r.name)
                .await?
                .ok_or_else(|| Error::InventoryNotFound {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                })?;
            secret_version = Some(format!(
                "{}/{}",
                secret_version.unwrap_or_default(),
                cm.metadata.resource_version.unwrap_or_default()
            ));
            inventory = Some(cm.data.unwrap_or_default());
        }
        if let Some(p) = self.cached(&name, generation, Some(&secret_version)) {
            return Ok(p);
        }
        let provider = self.providers.build(&ResolvedClass {
            name: name.clone(),
            generation,
            spec: nc.spec.clone(),
            credentials,
            cluster_name: self.config.cluster_name.clone(),
            inventory,
            claims: Some(self.claims.clone()),
        })?;
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(
                name,
                CachedProvider {
                    generation,
                    secret_version,
                    provider: provider.clone(),
                    validated: None,
                },
            );
        }
        Ok(provider)
    }

    fn cached(
        &self,
        name: &str,
        generation: i64,
        secret_version: Option<&Option<String>>,
    ) -> Option<Arc<dyn Provider>> {
        let cache = self.cache.lock().ok()?;
        let c = cache.get(name)?;
        (c.generation == generation && secret_version.is_none_or(|v| *v == c.secret_version))
            .then(|| c.provider.clone())
    }

    /// The labels of machine `provider_id` of class `class` in its last listing.
    pub(crate) fn listed_labels(
        &self,
        class: &str,
        provider_id: &str,
    ) -> Option<std::collections::BTreeMap<String, String>> {
        self.inventory
            .lock()
            .ok()?
            .get(class)?
            .labels
            .get(provider_id)
            .cloned()
    }

    /// The cached validation result of the current provider of `name`.
    pub(crate) fn validation(&self, name: &str) -> Option<Result<(), ProviderError>> {
        self.cache.lock().ok()?.get(name)?.validated.clone()
    }

    pub(crate) fn set_validation(&self, name: &str, result: Result<(), ProviderError>) {
        if let Ok(mut cache) = self.cache.lock()
            && let Some(c) = cache.get_mut(name)
        {
            c.validated = Some(result);
        }
    }

    pub(crate) fn forget_provider(&self, name: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.remove(name);
        }
        if let Ok(mut inv) = self.inventory.lock() {
            inv.remove(name);
        }
    }

    /// The next retry number of an object (and counts this failure).
    pub(crate) fn next_attempt(&self, key: &str) -> u32 {
        let Ok(mut a) = self.attempts.lock() else {
            return 0;
        };
        let n = a.entry(key.to_string()).or_insert(0);
        let cur = *n;
        *n = n.saturating_add(1);
        cur
    }

    pub(crate) fn reset_attempts(&self, key: &str) {
        if let Ok(mut a) = self.attempts.lock() {
            a.remove(key);
        }
    }
}

/// The one trim of a cached Node, shared with the nodeset-controller (see
/// [`kube_node_runtime::cached_node`]): the Node cache holds [`CachedNode`]s, which keep
/// exactly what it keeps.
pub use kube_node_runtime::trim_node;

/// Runs the Node controller, the NodeClass controller and the orphan collector until
/// `shutdown` completes.
pub async fn run(
    client: Client,
    providers: ProviderRegistry,
    config: Config,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    run_shared(
        client,
        providers,
        config,
        metrics,
        Shared::default(),
        shutdown,
    )
    .await
}

/// [`run`], on the process's shared Node watch and event client where `shared` has them.
pub async fn run_shared(
    client: Client,
    providers: ProviderRegistry,
    config: Config,
    metrics: Metrics,
    shared: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut sync_stop = stop_rx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let concurrency = config.concurrency.max(1);
    let synced_tx = config.synced.clone();
    // The Node watch feeds the cache and the controller; every object it delivers is a
    // trigger the work queue counts.
    let queue = metrics.work_queue().clone();
    let (store, node_events) = match shared.nodes {
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
    let watched = queue.clone();
    let node_events = node_events
        .applied_objects()
        .inspect_ok(move |n| watched.add(&n.name_any()));
    // `node::reconcile` takes its turn on `Context::passes`, first come, first served.
    // kube-runtime's own limit is far above it: over that limit kube-runtime parks requests in
    // a hash set and starts them in hash order (which starved some Nodes for 15-30 s), and
    // without a limit every Node of a 5000-Node cache is an in-flight future at start (14 MiB
    // more peak memory, measured). Up to this many passes wait for their turn in order.
    let node_ctrl = Controller::for_stream(node_events, store.clone()).with_config(
        controller::Config::default().concurrency(concurrency.saturating_mul(QUEUED_PER_TURN)),
    );
    // NodeClasses are read one object at a time: a bad one is set aside and reported on
    // itself, and never keeps the others from being seen (see `tolerant`).
    let invalid_classes = InvalidObjects::new("NodeClass", metrics.invalid_objects("NodeClass"));
    let (report_tx, report_rx) = futures::channel::mpsc::unbounded();
    let (class_store, class_writer) = reflector::store::<NodeClass>();
    let class_events = tolerant::watch(
        client.clone(),
        watcher::Config::default(),
        nodeclass_decoder(),
        invalid_classes.clone(),
        Some(report_tx),
    )
    .default_backoff()
    .reflect(class_writer)
    .applied_objects();
    let class_ctrl = Controller::for_stream(class_events, class_store.clone());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTER.to_string(),
            instance: None,
        },
    );
    let events = EventSink::start(
        shared.events_client.unwrap_or_else(|| client.clone()),
        REPORTER,
        kube_node_runtime::events::EVENT_QPS,
        kube_node_runtime::events::EVENT_BURST,
    );
    let (capacity_tx, capacity_rx) = futures::channel::mpsc::unbounded::<ObjectRef<NodeClass>>();
    let claim_store: Arc<dyn kube_node_provider::ClaimStore> = Arc::new(
        claims::LeaseClaimStore::new(client.clone(), &config.claim_namespace),
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        providers,
        config,
        metrics,
        recorder,
        events,
        nodes: store.clone(),
        classes: class_store.clone(),
        invalid_classes: invalid_classes.clone(),
        rejected_writes: Mutex::default(),
        refused_nodes: Mutex::default(),
        synced: std::sync::atomic::AtomicBool::new(false),
        ca_hash: Mutex::default(),
        backoff: Backoff::default(),
        claims: claim_store,
        cache: Mutex::default(),
        inventory: Mutex::default(),
        attempts: Mutex::default(),
        tokens: Mutex::default(),
        token_key: tokio::sync::OnceCell::new(),
        launched: Mutex::default(),
        own_writes: OwnWrites::default(),
        launches: std::sync::atomic::AtomicUsize::new(0),
        passes: turns::Turns::new(usize::from(concurrency)),
        launch_turns: tokio::sync::Semaphore::new(usize::from(concurrency)),
        deferred: turns::Deferred::default(),
        pending_launches: Mutex::default(),
        capacity_checks: capacity_tx,
    });

    // At shutdown the passes still waiting for their turn end at once (the running ones
    // finish): a leader that lost its Lease must stop acting, and a queue of thousands must not
    // hold the shutdown up.
    {
        let ctx = ctx.clone();
        let stop = stopped();
        tokio::spawn(async move {
            stop.await;
            ctx.passes.close();
            ctx.launch_turns.close();
        });
    }
    let (trigger_tx, trigger_rx) = futures::channel::mpsc::unbounded::<ObjectRef<CachedNode>>();
    let sync_ctx = ctx.clone();
    let (sync_nodes, sync_classes) = (store.clone(), class_store.clone());
    let mut sync_trigger = trigger_tx.clone();
    let sync_queue = queue.clone();
    let synced = async move {
        tokio::select! {
            r = async { tokio::try_join!(sync_nodes.wait_until_ready(), sync_classes.wait_until_ready()) } => {
                if r.is_err() {
                    return;
                }
            }
            _ = sync_stop.wait_for(|s| *s) => return,
        }
        sync_ctx
            .synced
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::info!("node-controller caches synced");
        if let Some(tx) = synced_tx {
            let _ = tx.send(true);
        }
        // Passes that ran before the sync only waited: look at every managed Node again.
        for n in sync_nodes.state() {
            if n.annotations().contains_key(NODE_CLASS_ANNOTATION) {
                sync_queue.add(&n.name_any());
                let _ = futures::SinkExt::send(&mut sync_trigger, ObjectRef::from_obj(n.as_ref()))
                    .await;
            }
        }
    };
    let class_nodes = store.clone();
    let mapped = queue.clone();
    let finished = queue.clone();
    // A second NodeClass watch triggers the Nodes of a class that changed (or turned invalid:
    // its Nodes then say so). Its set-aside objects are the first watch's to count and report.
    let class_triggers = tolerant::watch(
        client.clone(),
        watcher::Config::default(),
        nodeclass_decoder(),
        InvalidObjects::new("NodeClass", Default::default()),
        None,
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(node_trigger_key, kube::runtime::PredicateConfig::default());
    let nodes = node_ctrl
        .watches_stream(class_triggers, move |nc: NodeClass| {
            let name = nc.name_any();
            class_nodes
                .state()
                .into_iter()
                .filter(|n| n.annotations().get(NODE_CLASS_ANNOTATION) == Some(name.as_str()))
                .map(|n| {
                    mapped.add(&n.name_any());
                    ObjectRef::from_obj(n.as_ref())
                })
                .collect::<Vec<_>>()
        })
        .reconcile_on(trigger_rx)
        .graceful_shutdown_on(stopped())
        .run(node::reconcile, node::error_policy, ctx.clone())
        .for_each(move |r| {
            // A Node deleted before its turn is never reconciled: it leaves the queue here.
            if let Err(controller::Error::ObjectNotFound(obj)) = &r {
                finished.done(&obj.name);
            }
            async move {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "node reconcile failed");
                }
            }
        });

    let classes = class_ctrl
        .reconcile_on(capacity_rx)
        .graceful_shutdown_on(stopped())
        .run(nodeclass::reconcile, nodeclass::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "nodeclass reconcile failed");
            }
        });

    // Bookkeeping set aside for launches goes back to the queue once they are done (or it
    // waited its longest).
    // How the waker and the dispatcher send a pass back: counted in the queue, then triggered.
    let send_back = {
        let tx = trigger_tx.clone();
        let queue = queue.clone();
        move |node: ObjectRef<CachedNode>| {
            queue.add(&node.name);
            let _ = tx.unbounded_send(node);
        }
    };
    let waker = {
        let ctx = ctx.clone();
        let send_back = send_back.clone();
        let stop = stopped();
        async move {
            let mut tick = tokio::time::interval(turns::WAKE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    _ = tick.tick() => {}
                }
                if ctx.deferred.is_empty() {
                    continue;
                }
                let due = ctx
                    .deferred
                    .due(ctx.launches_in_flight(), std::time::Instant::now());
                due.into_iter().for_each(&send_back);
            }
        }
    };
    // Passes queued for a turn go back to the queue, in order, as turns free up.
    let dispatcher = {
        let ctx = ctx.clone();
        async move { ctx.passes.dispatch(send_back).await }
    };
    let collector = gc::run(ctx.clone(), trigger_tx, stopped());
    let stop_reporter = stopped();
    let reporter = tolerant::run_reporter(
        client.clone(),
        ctx.recorder.clone(),
        kube::api::ApiResource::erase::<NodeClass>(&()),
        report_rx,
    );
    // The reporter ends with the watch that feeds it; it must not hold the shutdown up.
    let reporter = async move {
        tokio::select! {
            () = reporter => {}
            () = stop_reporter => {}
        }
    };
    tracing::info!("node-controller started");
    tokio::join!(
        nodes, classes, collector, synced, reporter, waker, dispatcher
    );
    tracing::info!("node-controller stopped");
    Ok(())
}

#[cfg(test)]
mod own_writes_tests {
    use super::OwnWrites;

    #[test]
    fn only_what_nodes_read_of_a_node_class_triggers_them() {
        use super::node_trigger_key;
        let class = |status: serde_json::Value| -> kube_node_crds::NodeClass {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kube-node.io/v1alpha1",
                "kind": "NodeClass",
                "metadata": {"name": "c", "generation": 3},
                "spec": {"provider": {"type": "simulated", "simulated": {}}},
                "status": status,
            }))
            .expect("NodeClass")
        };
        let ready = |status: &str, message: &str| {
            serde_json::json!({"type": "Ready", "status": status, "reason": "Validated",
                "message": message, "observedGeneration": 3,
                "lastTransitionTime": "2026-01-01T00:00:00Z"})
        };
        let in_use = |n: u32| {
            serde_json::json!({"type": "InUse", "status": "True", "reason": "InUse",
                "message": format!("{n} Nodes"), "lastTransitionTime": "2026-01-01T00:00:00Z"})
        };
        let base = class(serde_json::json!({"conditions": [ready("True", "ok"), in_use(1)]}));
        // A count in another condition changes nothing the Nodes read.
        assert_eq!(
            node_trigger_key(&base),
            node_trigger_key(&class(
                serde_json::json!({"conditions": [ready("True", "ok"), in_use(900)]})
            ))
        );
        for other in [
            class(
                serde_json::json!({"conditions": [ready("False", "bad credentials"), in_use(1)]}),
            ),
            class(
                serde_json::json!({"conditions": [ready("True", "ok"), in_use(1)], "freeMachines": 2}),
            ),
            {
                let mut c = base.clone();
                c.metadata.generation = Some(4);
                c
            },
        ] {
            assert_ne!(node_trigger_key(&base), node_trigger_key(&other));
        }
    }

    #[test]
    fn only_a_node_that_can_still_be_launched_holds_bookkeeping() {
        use super::awaits_launch;
        use k8s_openapi::api::core::v1::Node;
        use kube_node_runtime::CachedNode;
        use std::collections::HashSet;
        let node = |extra: serde_json::Value| -> CachedNode {
            let mut v = serde_json::json!({
                "metadata": {"name": "n", "uid": "u1",
                    "annotations": {"kube-node.io/node-class": "sim"}},
            });
            json_patch::merge(&mut v, &extra);
            CachedNode::from(serde_json::from_value::<Node>(v).expect("Node"))
        };
        let none = HashSet::new();
        let of = |u: &str| HashSet::from([u.to_string()]);
        assert!(awaits_launch(&node(serde_json::json!({})), &none, &none));
        let launching = node(serde_json::json!({"status": {"conditions": [
            {"type": "MachineReady", "status": "False", "reason": "Launching"}]}}));
        assert!(awaits_launch(&launching, &none, &none), "not launched yet");
        assert!(
            !awaits_launch(&launching, &of("u1"), &none),
            "launched here"
        );
        assert!(
            !awaits_launch(&launching, &none, &of("u1")),
            "its last pass failed"
        );
        for done in [
            serde_json::json!({"spec": {"providerID": "sim:///z/m-1"}}),
            serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            serde_json::json!({"metadata": {"annotations": {"kube-node.io/node-class": null}}}),
            serde_json::json!({"status": {"conditions": [
                {"type": "MachineReady", "status": "False", "reason": "Failed"}]}}),
            // Refused (a group-backed class), or a failure recorded before any launch.
            serde_json::json!({"status": {"conditions": [
                {"type": "MachineReady", "status": "False", "reason": "Pending",
                 "message": "GroupBacked: NodeClass sim is group-backed"}]}}),
        ] {
            assert!(!awaits_launch(&node(done.clone()), &none, &none), "{done}");
        }
    }

    #[test]
    fn a_replaced_version_is_stale_until_the_cache_shows_another() {
        let w = OwnWrites::default();
        assert!(!w.stale("u", Some("7")), "nothing written yet");
        w.record("u", vec!["7".into(), "8".into()]);
        assert!(w.stale("u", Some("7")));
        assert!(w.stale("u", Some("8")));
        assert!(!w.stale("other", Some("7")), "per Node");
        // The cache shows the write's own version: the record goes.
        assert!(!w.stale("u", Some("9")));
        assert!(
            !w.stale("u", Some("7")),
            "forgotten once the cache moved on"
        );
        // A pass that wrote nothing forgets the Node.
        w.record("u", vec!["9".into()]);
        w.record("u", Vec::new());
        assert!(!w.stale("u", Some("9")));
        assert!(!w.stale("u", None));
    }
}
