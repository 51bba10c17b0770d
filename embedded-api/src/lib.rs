//! An in-process Kubernetes API server for tests and simulations.
//!
//! [`EmbeddedApi`] keeps Kubernetes objects as JSON in memory and serves the
//! Kubernetes REST API to a real [`kube::Client`] (through an in-process tower
//! service, see [`EmbeddedApi::client`]) or over HTTP/1
//! ([`EmbeddedApi::serve`]). Real kube-rs controllers (`kube::runtime`
//! watchers, reflectors, `Controller`, finalizer helpers) run against it
//! unchanged.
//!
//! # What it models
//!
//! * Builtin resources: core/v1 `nodes`, `pods`, `secrets`, `configmaps`,
//!   `namespaces`, `events`, `serviceaccounts`; `events.k8s.io/v1` events;
//!   `coordination.k8s.io/v1` leases; `policy/v1` poddisruptionbudgets;
//!   `apps/v1` daemonsets; `apiextensions.k8s.io/v1`
//!   customresourcedefinitions. CRDs (registered with
//!   [`EmbeddedApi::register_crd`] or created/applied through the API) add
//!   their served versions, scope, and `status`/`scale` subresources.
//! * One global, monotonically increasing `resourceVersion`; no-op updates
//!   do not bump it (like the real apiserver).
//! * GET, LIST (label selectors with `=`, `==`, `!=`, `in`, `notin`, `key`,
//!   `!key`, `>`/`<`; field selectors on any dotted path with `=`, `==`,
//!   `!=`; `limit`/`continue` pagination), WATCH (`ADDED`/`MODIFIED`/
//!   `DELETED`/`BOOKMARK`/`ERROR`, resume from a resourceVersion within a
//!   bounded history — older ones get a 410 `Expired` ERROR event —,
//!   selector transitions reported as ADDED/DELETED, `allowWatchBookmarks`,
//!   `timeoutSeconds`, `sendInitialEvents`), `PartialObjectMetadata`
//!   responses for metadata-only clients.
//! * CREATE (`generateName`, uid, creationTimestamp, generation, 409
//!   AlreadyExists, name validation, a set `resourceVersion` is rejected,
//!   status dropped on create for custom resources with a status
//!   subresource), UPDATE (optimistic concurrency with 409 Conflict; custom
//!   resources and CRDs require `metadata.resourceVersion` on PUT, like the
//!   real server; leases and events are created by PUT when missing;
//!   `status` subresource separation; generation bumps on
//!   non-metadata/non-status changes; immutable system metadata), PATCH (JSON
//!   patch incl. `test` — a `test` for `null` on a missing path succeeds as
//!   in the real server —, merge patch, simplified strategic merge patch,
//!   simplified server-side apply), DELETE and deletecollection (finalizers
//!   and `deletionTimestamp`, no new finalizers while deleting,
//!   preconditions, `propagationPolicy`), `dryRun=All`.
//! * Owner-reference garbage collection (Background and Orphan), namespace
//!   deletion removing the namespace's objects, CRD deletion removing its
//!   objects.
//! * The `scale` subresource of CRDs (`autoscaling/v1` Scale), pod
//!   `eviction` with PodDisruptionBudget checks (429 when blocked), the
//!   Node `spec.providerID` / `spec.podCIDRs` set-once validation.
//! * Discovery: `/version`, `/api`, `/apis`, `/api/v1`, `/apis/G/V` (legacy
//!   and aggregated `apidiscovery.k8s.io/v2`).
//! * Optional watch lag ([`EmbeddedApi::set_watch_lag`]): watch events are
//!   delivered `lag` after the write (in order), while GET/LIST stay
//!   current — a stale-cache simulator.
//! * Request statistics ([`EmbeddedApi::stats`]).
//!
//! # What it does NOT model
//!
//! * No OpenAPI schema validation, defaulting, pruning or CEL validation
//!   rules of CRDs; no validation of builtin kinds beyond object names, the
//!   Node providerID/podCIDRs rule and finalizer rules; no CRD version
//!   conversion (all versions share one storage and are returned as-is with
//!   the requested `apiVersion`).
//! * Server-side apply is simplified: the applied object is deep-merged into
//!   the stored one (maps merge recursively, lists and scalars in the applied
//!   object replace, `null` removes). There is no field ownership, no
//!   `managedFields`, no conflicts (`force` is accepted and ignored) and
//!   fields that a manager stops applying are not removed.
//! * Strategic merge patch is simplified: a fixed table of merge keys by
//!   field name (`conditions`/`addresses` by `type`, `ownerReferences` by
//!   `uid`, `containers`/`volumes`/`env`/... by `name`, ...); `finalizers`
//!   and `podCIDRs` are unioned; all other lists (e.g. `taints`,
//!   `tolerations`) are replaced, as the real server does for lists without a
//!   patch strategy. Like the real server, strategic merge patch on custom
//!   resources is rejected with 415.
//! * No admission (webhooks or builtin plugins), authentication,
//!   authorization, RBAC, quotas, limit ranges or API priority and fairness.
//! * No controllers besides the garbage collector: no kubelet, scheduler,
//!   DaemonSet/Deployment controllers, node lifecycle controller, service
//!   account token controller, or disruption controller (PDB status is only
//!   recomputed when the PDB is written and on evictions).
//! * Pods are deleted immediately (no graceful termination, no kubelet);
//!   pod status is kept as given on create (not reset to `Pending`).
//! * Garbage collection is synchronous and simplified: `Foreground`
//!   propagation behaves like `Background` (no `foregroundDeletion`
//!   finalizer, no `blockOwnerDeletion`), and `Orphan` removes the
//!   ownerReferences immediately at delete time instead of via the `orphan`
//!   finalizer. Objects created with ownerReferences to non-existent owners
//!   are only collected by an explicit [`EmbeddedApi::collect_dangling`].
//! * Namespaces are not required to exist for namespaced objects; deleting a
//!   namespace deletes its objects at once (no `Terminating` phase, no
//!   `spec.finalizers`).
//! * Eviction: a pod counts as healthy when it is not being deleted and its
//!   phase is `Running` or unset (no Ready condition check). The expected
//!   pod count is the number of matching pods for an integer `minAvailable`;
//!   for `maxUnavailable` or percentages it is the desired scale of the pods'
//!   controllers when the controller is known here (custom resources with a
//!   scale subresource, DaemonSets, objects with `spec.replicas`), each
//!   unmanaged pod counting as one (the real server refuses to evict
//!   unmanaged pods in that case). Pods that are `Pending`/`Succeeded`/
//!   `Failed` or being deleted are evicted without PDB checks; several PDBs
//!   matching one pod are all checked (the real server refuses with 500); no
//!   `unhealthyPodEvictionPolicy`, no `disruptedPods` bookkeeping.
//! * LIST/GET with `resourceVersion`/`resourceVersionMatch` always serve the
//!   current state; continue tokens never expire; watches from a
//!   resourceVersion newer than the current one start from that version
//!   instead of waiting.
//! * Only JSON (and YAML request bodies); no protobuf, no `Table` output, no
//!   websockets/exec/attach/logs/port-forward, no `openapi` endpoints.
//! * Only the kinds listed above exist (no services, deployments,
//!   replicasets, ...); other paths get 404. Core/v1 and `events.k8s.io/v1`
//!   events are separate stores (the real server serves one store in two
//!   shapes).
//! * Field selectors accept any dotted path (the real server only supports a
//!   per-kind set and rejects others with 400).
//! * Watch delivery uses one unbounded channel per watch: a slow watcher is
//!   never cut off with a 410, it just buffers. The resume history is
//!   bounded per resource ([`EmbeddedApi::with_watch_history`]).
//! * No persistence: everything lives in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

mod discovery;
mod error;
mod eviction;
mod gc;
mod patch;
mod resources;
mod scale;
mod selector;
mod server;
mod service;
mod store;
mod util;
mod watch;

pub use error::Error;
pub use server::Server;
pub use service::EmbeddedService;

use resources::{CRD_GROUP, CRD_PLURAL};
use store::{State, Sub};

/// Shared state behind [`EmbeddedApi`].
pub(crate) struct Inner {
    state: Mutex<State>,
    stats: Mutex<StatsInner>,
    lag_micros: AtomicU64,
}

#[derive(Default)]
struct StatsInner {
    total: u64,
    counts: HashMap<(String, String), u64>,
}

impl Inner {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn watch_lag(&self) -> Duration {
        Duration::from_micros(self.lag_micros.load(Ordering::Relaxed))
    }

    pub(crate) fn record(&self, resource: &str, verb: &str) {
        let mut s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        s.total += 1;
        *s.counts
            .entry((resource.to_string(), verb.to_string()))
            .or_default() += 1;
    }
}

/// Snapshot of request counts, see [`EmbeddedApi::stats`].
///
/// Resources are keyed by plural, with the subresource appended for
/// subresource requests (`nodes`, `nodes/status`, `nodesets/scale`,
/// `pods/eviction`). Verbs are `get`, `list`, `watch`, `create`, `update`,
/// `patch`, `delete`, `deletecollection` (discovery requests are counted
/// under the resource `discovery`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// All requests.
    pub total: u64,
    /// resource -> verb -> count.
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
}

const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

impl Stats {
    /// Requests for `resource` (e.g. `nodes/status`) with `verb`.
    pub fn count(&self, resource: &str, verb: &str) -> u64 {
        self.requests
            .get(resource)
            .and_then(|m| m.get(verb))
            .copied()
            .unwrap_or(0)
    }

    /// Requests with `verb` across all resources.
    pub fn verb(&self, verb: &str) -> u64 {
        self.requests.values().filter_map(|m| m.get(verb)).sum()
    }

    /// Write requests (create/update/patch/delete/deletecollection) for `resource`.
    pub fn writes(&self, resource: &str) -> u64 {
        WRITE_VERBS.iter().map(|v| self.count(resource, v)).sum()
    }

    /// Write requests across all resources.
    pub fn total_writes(&self) -> u64 {
        WRITE_VERBS.iter().map(|v| self.verb(v)).sum()
    }
}

/// An in-process Kubernetes API server. Cheap to clone (shared state).
#[derive(Clone)]
pub struct EmbeddedApi {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedApi")
            .field("resource_version", &self.resource_version())
            .field("watch_lag", &self.watch_lag())
            .finish_non_exhaustive()
    }
}

impl Default for EmbeddedApi {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedApi {
    /// A new, empty server with the builtin kinds registered.
    pub fn new() -> Self {
        EmbeddedApi {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new()),
                stats: Mutex::new(StatsInner::default()),
                lag_micros: AtomicU64::new(0),
            }),
        }
    }

    /// Builder form of [`EmbeddedApi::set_watch_lag`].
    pub fn with_watch_lag(self, lag: Duration) -> Self {
        self.set_watch_lag(lag);
        self
    }

    /// Deliver every watch event only `lag` after its write (order is
    /// preserved; GET and LIST stay current). Takes effect immediately, also
    /// for open watches. `Duration::ZERO` disables the lag.
    pub fn set_watch_lag(&self, lag: Duration) {
        let micros = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX);
        self.inner.lag_micros.store(micros, Ordering::Relaxed);
    }

    /// The current watch lag.
    pub fn watch_lag(&self) -> Duration {
        self.inner.watch_lag()
    }

    /// Number of watch events retained per resource for resuming watches
    /// (default 10 000). Watches from older resourceVersions get a 410.
    pub fn with_watch_history(self, events_per_resource: usize) -> Self {
        self.inner.lock().set_history_limit(events_per_resource);
        self
    }

    /// A `kube::Client` talking to this server in-process (default namespace
    /// `default`). Must be called within a Tokio runtime (kube spawns its
    /// request buffer task).
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.service(), "default")
    }

    /// The tower service behind [`EmbeddedApi::client`], for custom client stacks.
    pub fn service(&self) -> EmbeddedService {
        EmbeddedService {
            inner: self.inner.clone(),
        }
    }

    /// Register (create, or update if it exists) a CustomResourceDefinition,
    /// exactly as `POST`/`PUT .../customresourcedefinitions` would.
    pub fn register_crd(&self, crd: &CustomResourceDefinition) -> Result<(), Error> {
        let mut body = serde_json::to_value(crd)?;
        if let Some(m) = util::meta_mut(&mut body) {
            m.remove("resourceVersion");
        }
        let mut state = self.inner.lock();
        let def = state
            .registry
            .lookup(CRD_GROUP, "v1", CRD_PLURAL)
            .ok_or_else(error::ApiError::not_found_path)?;
        let name = util::name_of(&body).to_string();
        match state.object(&def, "", &name) {
            Some(old) => {
                state.finish_update(&def, &old, body, Sub::Main, false)?;
            }
            None => {
                state.create(&def, "", body, false)?;
            }
        }
        Ok(())
    }

    /// Snapshot of the request counters.
    pub fn stats(&self) -> Stats {
        let s = self
            .inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut requests: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for ((res, verb), n) in &s.counts {
            requests
                .entry(res.clone())
                .or_default()
                .insert(verb.clone(), *n);
        }
        Stats {
            total: s.total,
            requests,
        }
    }

    /// Reset the request counters to zero.
    pub fn reset_stats(&self) {
        let mut s = self
            .inner
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *s = StatsInner::default();
    }

    /// The current (global) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.inner.lock().rv
    }

    /// Garbage-collect objects whose owners (per `ownerReferences`) no longer
    /// exist, like the real garbage collector eventually does for objects
    /// created with dangling owner references. Returns how many objects were
    /// deleted (objects with finalizers only get a deletionTimestamp).
    pub fn collect_dangling(&self) -> usize {
        self.inner.lock().collect_dangling()
    }
}
