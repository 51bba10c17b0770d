//! The simulated kubelet: registers Running simulated machines onto their (existing) Nodes,
//! keeps their Leases and Ready heartbeats fresh, and finishes pods on them like a real kubelet,
//! so simulated Nodes behave like real ones on a real cluster and in the embedded API.
//!
//! One task drives every machine from an interval scan; API writes run in short-lived tasks
//! bounded by a semaphore, so thousands of machines cost no more than a few dozen concurrent
//! requests and no task per machine.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

use crate::cloud::{KubeletTarget, SimulatedCloud};

/// The namespace real kubelets keep their heartbeat Leases in.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// The version the simulated kubelet reports.
pub const KUBELET_VERSION: &str = "v1.33.0-sim";

/// How the simulated kubelet behaves. The defaults are a real kubelet's.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    /// How often each node's Lease is renewed (a kubelet's `nodeLeaseRenewInterval`, 10s).
    pub lease_interval: Duration,
    /// The Lease's `leaseDurationSeconds` (40).
    pub lease_duration_seconds: i32,
    /// How often the node status (and the Ready condition's heartbeat) is posted again: a
    /// kubelet's `nodeStatusReportFrequency` when nothing changes, 60s.
    pub status_interval: Duration,
    /// How often the machine list is scanned for work (1s). Also the first retry delay of a
    /// failed write, doubling up to 30s.
    pub scan_interval: Duration,
    /// The most API writes in flight at once (32).
    pub max_concurrent_writes: usize,
    /// Whether to watch pods and play their lifecycle (mark Running, finish deleted ones).
    pub manage_pods: bool,
}

impl Default for KubeletConfig {
    fn default() -> Self {
        Self {
            lease_interval: Duration::from_secs(10),
            lease_duration_seconds: 40,
            status_interval: Duration::from_secs(60),
            scan_interval: Duration::from_secs(1),
            max_concurrent_writes: 32,
            manage_pods: true,
        }
    }
}

/// The running simulated kubelet. Dropping it (or [`KubeletHandle::stop`]) ends it.
pub struct KubeletHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    writes: Arc<AtomicU64>,
}

impl KubeletHandle {
    /// How many writes this kubelet has made to the Kubernetes API (successful or not).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Stops the kubelet and waits for its task to end (writes in flight are abandoned).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for KubeletHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl SimulatedCloud {
    /// Starts the simulated kubelet with the default (a real kubelet's) intervals. Must be
    /// called inside a Tokio runtime.
    pub fn start_kubelet(&self, client: Client) -> KubeletHandle {
        self.start_kubelet_with(client, KubeletConfig::default())
    }

    /// Starts the simulated kubelet with the given intervals.
    pub fn start_kubelet_with(&self, client: Client, config: KubeletConfig) -> KubeletHandle {
        let (stop_tx, stop_rx) = oneshot::channel();
        let writes = Arc::new(AtomicU64::new(0));
        let kubelet = Kubelet {
            cloud: self.clone(),
            ctx: Arc::new(Ctx {
                client,
                semaphore: Arc::new(Semaphore::new(config.max_concurrent_writes.max(1))),
                config,
                writes: writes.clone(),
                cloud: self.clone(),
            }),
            nodes: HashMap::new(),
            pods: PodIndex::default(),
            jobs: JoinSet::new(),
        };
        KubeletHandle {
            stop: Some(stop_tx),
            task: Some(tokio::spawn(kubelet.run(stop_rx))),
            writes,
        }
    }
}

/// What the write tasks share.
struct Ctx {
    client: Client,
    semaphore: Arc<Semaphore>,
    config: KubeletConfig,
    writes: Arc<AtomicU64>,
    cloud: SimulatedCloud,
}

impl Ctx {
    fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.cloud
            .shared
            .kubelet_writes
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The kubelet's view of one node it plays.
#[derive(Debug)]
struct NodeState {
    /// The machine this state belongs to; a new machine for the same node name starts over.
    provider_id: String,
    /// The machine's address (the pods' hostIP).
    internal_ip: String,
    /// The Node's UID once its status has been written (registered).
    uid: Option<String>,
    /// When Ready became True (kept as the condition's lastTransitionTime).
    ready_since: Option<String>,
    lease_exists: bool,
    next_status: Instant,
    next_lease: Instant,
    retry_at: Instant,
    failures: u32,
    in_flight: bool,
}

impl NodeState {
    fn new(t: &KubeletTarget, now: Instant) -> Self {
        Self {
            provider_id: t.provider_id.clone(),
            internal_ip: t.internal_ip.clone(),
            uid: None,
            ready_since: None,
            lease_exists: false,
            next_status: now,
            next_lease: now,
            retry_at: now,
            failures: 0,
            in_flight: false,
        }
    }
}

type PodKey = (String, String);

#[derive(Clone, Debug)]
struct PodView {
    uid: String,
    node: String,
    needs_start: bool,
    deleting: bool,
    containers: Vec<(String, String)>,
}

#[derive(Default)]
struct PodIndex {
    by_node: HashMap<String, HashMap<PodKey, PodView>>,
    node_of: HashMap<PodKey, String>,
    in_flight: HashSet<PodKey>,
    /// Pods seen since the watch (re)started, to forget the ones deleted meanwhile.
    relisting: Option<HashSet<PodKey>>,
}

impl PodIndex {
    fn upsert(&mut self, key: PodKey, view: PodView) {
        if let Some(old) = self.node_of.get(&key)
            && *old != view.node
            && let Some(m) = self.by_node.get_mut(old)
        {
            m.remove(&key);
        }
        self.node_of.insert(key.clone(), view.node.clone());
        self.by_node
            .entry(view.node.clone())
            .or_default()
            .insert(key, view);
    }

    fn remove(&mut self, key: &PodKey) {
        if let Some(node) = self.node_of.remove(key)
            && let Some(m) = self.by_node.get_mut(&node)
        {
            m.remove(key);
            if m.is_empty() {
                self.by_node.remove(&node);
            }
        }
    }

    fn get(&self, key: &PodKey) -> Option<&PodView> {
        self.by_node.get(self.node_of.get(key)?)?.get(key)
    }
}

enum JobResult {
    Node(NodeJobResult),
    Pod(PodKey),
}

struct NodeJob {
    target: KubeletTarget,
    patch_status: bool,
    ready_since: String,
    uid: Option<String>,
    lease_exists: bool,
    touch_lease: bool,
}

struct NodeJobResult {
    node: String,
    provider_id: String,
    ready_since: String,
    status: Option<std::result::Result<String, WriteError>>,
    lease: Option<std::result::Result<(), WriteError>>,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Other(String),
}

impl From<kube::Error> for WriteError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.is_not_found() => Self::NotFound,
            _ => Self::Other(e.to_string()),
        }
    }
}

struct Kubelet {
    cloud: SimulatedCloud,
    ctx: Arc<Ctx>,
    nodes: HashMap<String, NodeState>,
    pods: PodIndex,
    jobs: JoinSet<JobResult>,
}

impl Kubelet {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        tracing::info!("simulated kubelet started");
        let mut ticker = tokio::time::interval(self.ctx.config.scan_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pod_events: BoxStream<'static, Result<Event<Pod>, watcher::Error>> =
            if self.ctx.config.manage_pods {
                watcher::watcher(
                    Api::<Pod>::all(self.ctx.client.clone()),
                    watcher::Config::default(),
                )
                .default_backoff()
                .boxed()
            } else {
                futures::stream::pending().boxed()
            };
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = ticker.tick() => self.scan(),
                Some(done) = self.jobs.join_next(), if !self.jobs.is_empty() => match done {
                    Ok(JobResult::Node(r)) => self.node_done(r),
                    Ok(JobResult::Pod(key)) => { self.pods.in_flight.remove(&key); }
                    Err(e) => tracing::warn!(error = %e, "simulated kubelet write task failed"),
                },
                ev = pod_events.next() => match ev {
                    Some(Ok(ev)) => self.pod_event(ev),
                    Some(Err(e)) => tracing::debug!(error = %e, "simulated kubelet pod watch failed; retrying"),
                    None => pod_events = futures::stream::pending().boxed(),
                },
            }
        }
        self.jobs.abort_all();
        tracing::info!("simulated kubelet stopped");
    }

    /// Plans the writes due now: registration, heartbeats and lease renewals.
    fn scan(&mut self) {
        let now = Instant::now();
        let targets = self.cloud.kubelet_targets(now);
        // A machine that is gone or terminating stops its kubelet: no more renewals.
        self.nodes.retain(|name, st| {
            targets
                .get(name)
                .is_some_and(|t| t.provider_id == st.provider_id)
        });
        let cfg = self.ctx.config.clone();
        for (name, target) in targets {
            let st = self
                .nodes
                .entry(name)
                .or_insert_with(|| NodeState::new(&target, now));
            if st.in_flight || now < st.retry_at {
                continue;
            }
            let registered = st.uid.is_some();
            let patch_status = !registered || now >= st.next_status;
            let touch_lease = !st.lease_exists || now >= st.next_lease;
            if !patch_status && !touch_lease {
                continue;
            }
            if patch_status {
                st.next_status = now + cfg.status_interval;
            }
            if touch_lease {
                st.next_lease = now + cfg.lease_interval;
            }
            let ready_since = st.ready_since.clone().unwrap_or_else(now_rfc3339);
            st.in_flight = true;
            let job = NodeJob {
                target,
                patch_status,
                ready_since,
                uid: st.uid.clone(),
                lease_exists: st.lease_exists,
                touch_lease,
            };
            let ctx = self.ctx.clone();
            self.jobs
                .spawn(async move { JobResult::Node(run_node_job(ctx, job).await) });
        }
    }

    fn node_done(&mut self, r: NodeJobResult) {
        let now = Instant::now();
        let Some(st) = self.nodes.get_mut(&r.node) else {
            return;
        };
        if st.provider_id != r.provider_id {
            return;
        }
        st.in_flight = false;
        let mut failed = false;
        let mut newly_registered = false;
        match r.status {
            Some(Ok(uid)) => {
                newly_registered = st.uid.is_none();
                if st.uid.as_ref().is_some_and(|u| *u != uid) {
                    // The Node was recreated under the same name: the job re-registered onto
                    // it (every status write is complete) and re-created the Lease for it.
                    newly_registered = true;
                }
                st.uid = Some(uid);
                st.ready_since.get_or_insert(r.ready_since);
            }
            Some(Err(e)) => {
                failed = true;
                st.next_status = now;
                if matches!(e, WriteError::NotFound) {
                    // No Node (yet, or any more): nothing to register onto.
                    st.uid = None;
                    st.ready_since = None;
                } else {
                    tracing::debug!(node = %r.node, error = %e, "simulated kubelet status write failed");
                }
            }
            None => {}
        }
        match r.lease {
            Some(Ok(())) => st.lease_exists = true,
            Some(Err(e)) => {
                failed = true;
                st.next_lease = now;
                st.lease_exists = false;
                if !matches!(e, WriteError::NotFound) {
                    tracing::debug!(node = %r.node, error = %e, "simulated kubelet lease write failed");
                }
            }
            None => {}
        }
        if failed {
            st.failures = st.failures.saturating_add(1);
            st.retry_at = now + backoff(self.ctx.config.scan_interval, st.failures);
        } else {
            st.failures = 0;
        }
        if newly_registered {
            tracing::debug!(node = %r.node, provider_id = %r.provider_id, "simulated kubelet registered node");
            let keys: Vec<PodKey> = self
                .pods
                .by_node
                .get(&r.node)
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            for key in keys {
                self.evaluate_pod(&key);
            }
        }
    }

    fn pod_event(&mut self, ev: Event<Pod>) {
        match ev {
            Event::Init => self.pods.relisting = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let Some(key) = self.pod_apply(&pod)
                    && let Some(seen) = &mut self.pods.relisting
                {
                    seen.insert(key);
                }
            }
            Event::InitDone => {
                if let Some(seen) = self.pods.relisting.take() {
                    let stale: Vec<PodKey> = self
                        .pods
                        .node_of
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for k in stale {
                        self.pods.remove(&k);
                    }
                }
            }
            Event::Apply(pod) => {
                self.pod_apply(&pod);
            }
            Event::Delete(pod) => {
                let key = (pod.namespace().unwrap_or_default(), pod.name_any());
                self.pods.remove(&key);
            }
        }
    }

    /// Records a pod and acts on it when it is bound to a registered simulated node.
    fn pod_apply(&mut self, pod: &Pod) -> Option<PodKey> {
        let key = (pod.namespace().unwrap_or_default(), pod.name_any());
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let Some(node) = node.filter(|n| !n.is_empty()) else {
            self.pods.remove(&key);
            return Some(key);
        };
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let view = PodView {
            uid: pod.uid().unwrap_or_default(),
            node,
            needs_start: matches!(phase, None | Some("Pending")),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            containers: pod
                .spec
                .as_ref()
                .map(|s| {
                    s.containers
                        .iter()
                        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default(),
        };
        self.pods.upsert(key.clone(), view);
        self.evaluate_pod(&key);
        Some(key)
    }

    fn evaluate_pod(&mut self, key: &PodKey) {
        if self.pods.in_flight.contains(key) {
            return;
        }
        let Some(view) = self.pods.get(key).cloned() else {
            return;
        };
        let Some(node_ip) = self
            .nodes
            .get(&view.node)
            .filter(|st| st.uid.is_some())
            .map(|st| st.internal_ip.clone())
        else {
            // Not a simulated node, or its kubelet has not registered: a real kubelet that is
            // not running does nothing either.
            return;
        };
        let action = if view.deleting {
            PodAction::Finish
        } else if view.needs_start {
            PodAction::Start(node_ip)
        } else {
            return;
        };
        self.pods.in_flight.insert(key.clone());
        let ctx = self.ctx.clone();
        let key = key.clone();
        self.jobs.spawn(async move {
            run_pod_job(ctx, &key, &view, action).await;
            JobResult::Pod(key)
        });
    }
}

enum PodAction {
    Start(String),
    Finish,
}

async fn run_node_job(ctx: Arc<Ctx>, job: NodeJob) -> NodeJobResult {
    let node = job.target.node_name.clone();
    let mut result = NodeJobResult {
        node: node.clone(),
        provider_id: job.target.provider_id.clone(),
        ready_since: job.ready_since.clone(),
        status: None,
        lease: None,
    };
    let Ok(_permit) = ctx.semaphore.clone().acquire_owned().await else {
        return result;
    };
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let mut uid = job.uid.clone();
    if job.patch_status {
        let now = now_rfc3339();
        let body = node_status_patch(&job.target, &now, &job.ready_since);
        ctx.count_write();
        let mut r = nodes
            .patch_status(
                &node,
                &PatchParams::default(),
                &Patch::Strategic(body.clone()),
            )
            .await;
        // A machine of a group registers its own Node, as a cloud's kubelet does
        // (`--register-node` with the pool's labels and the providerID).
        if let (Err(kube::Error::Api(e)), Some(labels)) = (&r, &job.target.register_labels)
            && e.code == 404
        {
            ctx.count_write();
            match nodes
                .create(
                    &PostParams::default(),
                    &registered_node(&job.target, labels),
                )
                .await
            {
                Ok(_) => {
                    ctx.count_write();
                    r = nodes
                        .patch_status(&node, &PatchParams::default(), &Patch::Strategic(body))
                        .await;
                }
                Err(e) => r = Err(e),
            }
        }
        match r {
            Ok(n) => {
                let new_uid = n.uid().unwrap_or_default();
                if job.uid.as_ref() != Some(&new_uid) {
                    // First registration onto this Node (or onto a Node recreated under the
                    // same name).
                    add_default_labels(&ctx, &nodes, &n, &job.target).await;
                }
                uid = Some(new_uid.clone());
                result.status = Some(Ok(new_uid));
            }
            Err(e) => {
                result.status = Some(Err(e.into()));
                return result;
            }
        }
    }
    // A Node (re-)registered under a new UID needs a Lease owned by it, due or not.
    let new_node = uid.is_some() && uid != job.uid;
    if (job.touch_lease || new_node)
        && let Some(uid) = uid
    {
        result.lease =
            Some(touch_lease(&ctx, &nodes, &node, &uid, job.lease_exists && !new_node).await);
    }
    result
}

/// The Node a group machine's kubelet registers: its name, the group's labels, the
/// providerID, and the labels every kubelet sets.
fn registered_node(t: &KubeletTarget, labels: &BTreeMap<String, String>) -> Node {
    let mut labels = labels.clone();
    labels.insert("kubernetes.io/hostname".into(), t.node_name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), "amd64".into());
    Node {
        metadata: kube::api::ObjectMeta {
            name: Some(t.node_name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        spec: Some(k8s_openapi::api::core::v1::NodeSpec {
            provider_id: Some(t.provider_id.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

/// Sets the labels a kubelet always reconciles onto its Node, when missing. (Labels and taints
/// of the NodeClass are kube-node's job: a kubelet joining an existing Node ignores its own
/// `--node-labels`.)
async fn add_default_labels(ctx: &Ctx, nodes: &Api<Node>, node: &Node, t: &KubeletTarget) {
    let labels = node.labels();
    let wanted = [
        ("kubernetes.io/hostname", t.node_name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
    ];
    let missing: BTreeMap<&str, &str> = wanted
        .into_iter()
        .filter(|(k, _)| !labels.contains_key(*k))
        .collect();
    if missing.is_empty() {
        return;
    }
    ctx.count_write();
    let patch = json!({"metadata": {"labels": missing}});
    if let Err(e) = nodes
        .patch(&t.node_name, &PatchParams::default(), &Patch::Merge(patch))
        .await
    {
        tracing::debug!(node = %t.node_name, error = %e, "simulated kubelet could not label node");
    }
}

async fn touch_lease(
    ctx: &Ctx,
    nodes: &Api<Node>,
    node: &str,
    known_uid: &str,
    exists: bool,
) -> std::result::Result<(), WriteError> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE);
    let now = now_micro();
    if exists {
        ctx.count_write();
        let patch = json!({"spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": ctx.config.lease_duration_seconds,
            "renewTime": now,
        }});
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
    }
    // Creating: the Lease must be owned by the Node as it is now (it may have been recreated
    // since the kubelet last wrote its status; the old Lease went with the old Node).
    let current = if exists {
        nodes.get(node).await?.uid().unwrap_or_default()
    } else {
        known_uid.to_string()
    };
    let node_uid = current.as_str();
    let lease: Lease = serde_json::from_value(lease_body(
        node,
        node_uid,
        &now,
        ctx.config.lease_duration_seconds,
    ))
    .map_err(|e| WriteError::Other(e.to_string()))?;
    ctx.count_write();
    match api.create(&PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => {
            // Left by an earlier kubelet of this node (or an earlier Node of this name).
            ctx.count_write();
            let body = lease_body(node, node_uid, &now, ctx.config.lease_duration_seconds);
            api.patch(node, &PatchParams::default(), &Patch::Merge(body))
                .await
                .map(|_| ())
                .map_err(Into::into)
        }
        Err(e) => Err(e.into()),
    }
}

async fn run_pod_job(ctx: Arc<Ctx>, key: &PodKey, view: &PodView, action: PodAction) {
    let Ok(_permit) = ctx.semaphore.clone().acquire_owned().await else {
        return;
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &key.0);
    ctx.count_write();
    let r = match action {
        PodAction::Finish => {
            // What a kubelet does once the containers have stopped: the final delete.
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: (!view.uid.is_empty()).then(|| Preconditions {
                    uid: Some(view.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            api.delete(&key.1, &dp).await.map(|_| ())
        }
        PodAction::Start(node_ip) => {
            let body = pod_running_patch(view, &node_ip, &now_rfc3339());
            api.patch_status(&key.1, &PatchParams::default(), &Patch::Strategic(body))
                .await
                .map(|_| ())
        }
    };
    if let Err(e) = r
        && !matches!(&e, kube::Error::Api(s) if s.is_not_found() || s.is_conflict())
    {
        tracing::debug!(namespace = %key.0, pod = %key.1, error = %e, "simulated kubelet pod write failed");
    }
}

/// The wait before retrying a node whose write failed `failures` times in a row: the scan
/// interval, doubling, at most 30s.
fn backoff(scan_interval: Duration, failures: u32) -> Duration {
    let base = scan_interval.max(Duration::from_millis(10));
    base.saturating_mul(1 << failures.clamp(1, 10).saturating_sub(1))
        .min(Duration::from_secs(30))
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn now_micro() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The `nodes/status` strategic-merge patch a kubelet posts, on registration and as every
/// heartbeat. It is complete each time (as a real kubelet's desired status is), so a Node
/// recreated under the same name between two heartbeats gets everything. Conditions and
/// addresses merge by `type`, so conditions other writers own (kube-node's `MachineReady`) are
/// left alone; labels, taints and spec are never touched.
pub(crate) fn node_status_patch(t: &KubeletTarget, now: &str, ready_since: &str) -> Value {
    let cond = |type_: &str, status: &str, reason: &str, message: &str, since: &str| {
        json!({
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        })
    };
    let conditions = json!([
        cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
            ready_since
        ),
        cond(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
            ready_since
        ),
        cond(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
            ready_since
        ),
        cond(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status",
            ready_since
        ),
    ]);
    json!({"status": {
        "addresses": [
            {"type": "InternalIP", "address": t.internal_ip},
            {"type": "Hostname", "address": t.node_name},
        ],
        "capacity": *t.capacity,
        "allocatable": *t.allocatable,
        "conditions": conditions,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": t.id,
            "systemUUID": t.id,
            "bootID": t.id,
            "kernelVersion": "6.1.0-sim",
            "osImage": "kube-node simulated machine",
            "containerRuntimeVersion": "containerd://1.7.0-sim",
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION,
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
    }})
}

/// A node's Lease, owned by its Node so it is collected with it (as a real kubelet does).
pub(crate) fn lease_body(node: &str, node_uid: &str, now: &str, duration: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": node,
            "namespace": NODE_LEASE_NAMESPACE,
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Node",
                "name": node,
                "uid": node_uid,
            }],
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": duration,
            "renewTime": now,
        },
    })
}

/// The status of a pod whose containers all started.
fn pod_running_patch(view: &PodView, node_ip: &str, now: &str) -> Value {
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    let h = crate::config::fnv1a(view.uid.as_bytes());
    let pod_ip = format!("10.244.{}.{}", (h >> 8) & 0xff, (h & 0xff) % 254 + 1);
    let containers: Vec<Value> = view
        .containers
        .iter()
        .map(|(name, image)| {
            json!({
                "name": name,
                "image": image,
                "imageID": image,
                "ready": true,
                "started": true,
                "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    json!({"status": {
        "phase": "Running",
        "hostIP": node_ip,
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": now,
        "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
        "containerStatuses": containers,
    }})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> KubeletTarget {
        KubeletTarget {
            node_name: "n1".into(),
            provider_id: "simulated:///sim-a/sim-000000000001".into(),
            id: "sim-000000000001".into(),
            internal_ip: "10.1.2.3".into(),
            capacity: std::sync::Arc::new(
                [(
                    "cpu".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("4".into()),
                )]
                .into(),
            ),
            allocatable: std::sync::Arc::new(
                [(
                    "cpu".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("3800m".into()),
                )]
                .into(),
            ),
            register_labels: None,
        }
    }

    #[test]
    fn a_group_machine_registers_its_node_with_the_group_label_and_provider_id() {
        let mut t = target();
        let labels = BTreeMap::from([(
            kube_node_crds::names::GROUP_LABEL.to_string(),
            "pool".to_string(),
        )]);
        t.register_labels = Some(labels.clone());
        let n = registered_node(&t, &labels);
        assert_eq!(n.metadata.name.as_deref(), Some("n1"));
        let l = n.metadata.labels.expect("labels");
        assert_eq!(l["kube-node.io/group"], "pool");
        assert_eq!(l["kubernetes.io/hostname"], "n1");
        assert_eq!(
            n.spec.and_then(|s| s.provider_id).as_deref(),
            Some("simulated:///sim-a/sim-000000000001")
        );
    }

    #[test]
    fn registration_patch_carries_addresses_capacity_and_ready() {
        let p = node_status_patch(&target(), "2026-01-01T00:00:10Z", "2026-01-01T00:00:00Z");
        let s = &p["status"];
        assert_eq!(
            s["addresses"][0],
            json!({"type": "InternalIP", "address": "10.1.2.3"})
        );
        assert_eq!(
            s["addresses"][1],
            json!({"type": "Hostname", "address": "n1"})
        );
        assert_eq!(s["capacity"]["cpu"], "4");
        assert_eq!(s["allocatable"]["cpu"], "3800m");
        assert_eq!(s["nodeInfo"]["kubeletVersion"], KUBELET_VERSION);
        let ready = s["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .cloned()
            .expect("Ready condition");
        assert_eq!(ready["status"], "True");
        assert_eq!(ready["reason"], "KubeletReady");
        assert_eq!(ready["lastHeartbeatTime"], "2026-01-01T00:00:10Z");
        assert_eq!(ready["lastTransitionTime"], "2026-01-01T00:00:00Z");
        // Never labels, taints or spec.
        assert!(p.get("metadata").is_none() && p.get("spec").is_none());
    }

    #[test]
    fn heartbeats_keep_the_transition_time_and_move_the_heartbeat() {
        let p = node_status_patch(&target(), "t2", "t0");
        let conds = p["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(conds.len(), 4);
        assert!(
            conds
                .iter()
                .all(|c| c["lastHeartbeatTime"] == "t2" && c["lastTransitionTime"] == "t0")
        );
        assert_eq!(p["status"]["capacity"]["cpu"], "4", "complete every time");
    }

    #[test]
    fn retries_back_off_from_the_scan_interval_to_30s() {
        let scan = Duration::from_secs(1);
        assert_eq!(backoff(scan, 1), Duration::from_secs(1));
        assert_eq!(backoff(scan, 2), Duration::from_secs(2));
        assert_eq!(backoff(scan, 5), Duration::from_secs(16));
        assert_eq!(backoff(scan, 6), Duration::from_secs(30));
        assert_eq!(backoff(scan, u32::MAX), Duration::from_secs(30));
    }

    #[test]
    fn lease_is_owned_by_its_node() {
        let l = lease_body("n1", "uid-1", "2026-01-01T00:00:00.000000Z", 40);
        assert_eq!(l["metadata"]["namespace"], NODE_LEASE_NAMESPACE);
        assert_eq!(l["metadata"]["ownerReferences"][0]["uid"], "uid-1");
        assert_eq!(l["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(l["spec"]["holderIdentity"], "n1");
        assert_eq!(l["spec"]["leaseDurationSeconds"], 40);
        let lease: Lease = serde_json::from_value(l).expect("a valid Lease");
        assert_eq!(lease.spec.and_then(|s| s.lease_duration_seconds), Some(40));
    }
}
