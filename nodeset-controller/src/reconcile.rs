//! One pass of a NodeSet: look up → plan → act → write status.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::future::join_all;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{
    DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use kube_node_crds::names::{
    AUTOSCALER_UNREGISTERED_TAINT, AUTOSCALER_UNREGISTERED_TAINT_EFFECT, AVAILABLE_CONDITION,
    BACKOFF_CONDITION, BACKOFF_EVENT_REASON, BOOTSTRAP_TOKEN_ANNOTATION, BUILD_HASH_ANNOTATION,
    CIRCUIT_BREAKER_CONDITION, CLASS_FALLBACK_CONDITION, DRIFTED_CONDITION, FIELD_MANAGER,
    LAUNCHING_MESSAGE, MACHINE_FINALIZER, MACHINE_READY_CONDITION, MachinePhase,
    NODE_CLASS_ANNOTATION, NODE_CLASS_GENERATION_ANNOTATION, NODE_CLASS_LABEL, NODESET_LABEL,
    OUTDATED_CONDITION, PROGRESSING_CONDITION, READY_CONDITION, REPLACED_EVENT_REASON,
    REPLICA_FAILURE_CONDITION, UNREGISTERED_TAINT,
};
use kube_node_crds::v1alpha1::{NodeClass, NodeSet, NodeSetStatus, RolloutStatus, StrategyType};
use kube_node_runtime::CachedNode;
use rand::Rng;
use serde_json::json;

use crate::backoff::{BackoffPolicy, BackoffState};
use crate::drift::BuildHash;
use crate::expectations::Expectations;
use crate::fallback;
use crate::observe::{cached_related, child, phase_counts, related};
use crate::plan::{
    ChildNode, Desired, Failure, Ownership, Plan, Progress, RolloutState, Stall, UpdateStrategy,
    drift_of, plan, resolve_int_or_percent, resolve_max_unhealthy,
};
use crate::template::Wanted;
use crate::{Config, Error, Metrics};

/// The periodic resync of a healthy NodeSet.
const RESYNC: Duration = Duration::from_secs(300);
/// The requeue while expectations are pending (watch events normally come much sooner).
const PENDING_RECHECK: Duration = Duration::from_secs(30);
/// How long a pass waits for the Node cache's first list.
const CACHE_WAIT: Duration = Duration::from_secs(30);
/// Attempts at a fresh random name when a create hits an existing Node.
const NAME_ATTEMPTS: usize = 3;

/// What every reconcile shares.
pub(crate) struct Context {
    pub client: Client,
    pub nodes: Store<CachedNode>,
    pub classes: Store<NodeClass>,
    /// Every NodeSet (to find the one NodeSet that owns a group).
    pub sets: Store<NodeSet>,
    /// Since when each group-backed NodeSet's group has disagreed with its size, by UID.
    pub group_unsettled: Mutex<HashMap<String, Instant>>,
    pub expectations: Arc<Expectations>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: Config,
    /// Consecutive failures per NodeSet, for the error policy's backoff.
    pub failures: Mutex<HashMap<String, u32>>,
    /// The last create failure per NodeSet, shown in ReplicaFailure until a create succeeds.
    pub create_failures: Mutex<HashMap<String, Failure>>,
    /// Per NodeSet: consecutive failed create passes and when creating may be tried again.
    /// Enforced in the pass itself, since our own status writes trigger passes sooner than the
    /// error policy's requeue.
    pub create_backoff: Mutex<HashMap<String, (u32, Instant)>>,
    /// The status last written per NodeSet UID (our cache may not show it yet).
    pub written: Mutex<HashMap<String, NodeSetStatus>>,
    /// When the status was last written per NodeSet UID.
    pub status_written_at: Mutex<HashMap<String, Instant>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The reconcile entry point: times and counts the pass.
pub(crate) async fn reconcile(ns: Arc<NodeSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = ns.name_any();
    ctx.metrics.work_queue().done(&name);
    let span = tracing::info_span!("reconcile", nodeset = %name);
    let result = tracing::Instrument::instrument(reconcile_inner(&ns, &ctx), span).await;
    let label = match &result {
        Ok(_) => {
            lock(&ctx.failures).remove(&name);
            "success"
        }
        Err(e) => {
            if e.needs_change() {
                record_invalid_spec(&ns, &ctx, e).await;
            }
            e.reason()
        }
    };
    ctx.metrics
        .reconciled(label, started.elapsed().as_secs_f64());
    result
}

/// Per-NodeSet exponential backoff: 1 s, 2 s, 4 s, … up to 5 minutes.
pub(crate) fn error_policy(ns: Arc<NodeSet>, err: &Error, ctx: Arc<Context>) -> Action {
    let name = ns.name_any();
    let n = {
        let mut f = lock(&ctx.failures);
        let n = f.entry(name.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(n);
    tracing::warn!(nodeset = %name, reason = err.reason(), error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The delay after `n` consecutive failures.
pub(crate) fn backoff(n: u32) -> Duration {
    kube_node_runtime::Backoff::default().delay(n.saturating_sub(1), None)
}

/// The labels of a created Node: the template's, plus the NodeSet and NodeClass labels when
/// they do not stop the selector from matching.
pub(crate) fn node_labels(ns: &NodeSet, class: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut labels = ns.spec.template.metadata.labels.clone().unwrap_or_default();
    let extras = [
        (NODESET_LABEL, ns.name_any()),
        (NODE_CLASS_LABEL, class.to_string()),
    ];
    for (k, v) in extras {
        // A label value has at most 63 characters; object names may be longer.
        if labels.contains_key(k) || v.len() > 63 {
            continue;
        }
        labels.insert(k.to_string(), v);
        if !ns.spec.selector.matches(&labels) {
            labels.remove(k);
        }
    }
    // Without this, created Nodes would never count as ours and creates would never stop.
    if !ns.spec.selector.matches(&labels) {
        return Err(Error::InvalidSpec(
            "spec.selector does not match spec.template.metadata.labels (or is empty)".into(),
        ));
    }
    Ok(labels)
}

/// A random Node name `<nodeset>-<5 of [a-z0-9]>`.
fn node_name(nodeset: &str) -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..5)
        .map(|_| char::from(CHARS[rng.random_range(0..CHARS.len())]))
        .collect();
    format!("{nodeset}-{suffix}")
}

/// The Node a NodeSet creates.
pub(crate) fn build_node(
    ns: &NodeSet,
    class: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    class_generation: Option<i64>,
    build: Option<&BuildHash>,
) -> Result<Node, Error> {
    let uid = ns
        .metadata
        .uid
        .clone()
        .ok_or(Error::MissingField("metadata.uid"))?;
    let mut annotations = ns
        .spec
        .template
        .metadata
        .annotations
        .clone()
        .unwrap_or_default();
    annotations.insert(NODE_CLASS_ANNOTATION.to_string(), class.to_string());
    // What the template applied, so a later template change is patched in place.
    annotations.extend(Wanted::of(ns).record());
    if let Some(g) = class_generation {
        annotations.insert(NODE_CLASS_GENERATION_ANNOTATION.to_string(), g.to_string());
    }
    // What the Node is built from, so drift is a comparison with what would be built now.
    if let Some(b) = build {
        annotations.insert(BUILD_HASH_ANNOTATION.to_string(), b.annotation());
    }
    let mut taints: Vec<Taint> = ns
        .spec
        .template
        .spec
        .taints
        .iter()
        .map(|t| t.to_core())
        .collect();
    if !taints.iter().any(|t| t.key == UNREGISTERED_TAINT) {
        taints.push(Taint {
            key: UNREGISTERED_TAINT.to_string(),
            value: None,
            effect: "NoExecute".to_string(),
            time_added: None,
        });
    }
    // cluster-autoscaler counts a Node carrying this one as upcoming (see the constant); the
    // node-controller removes both in one write when the kubelet is Ready.
    if !taints
        .iter()
        .any(|t| t.key == AUTOSCALER_UNREGISTERED_TAINT)
    {
        taints.push(Taint {
            key: AUTOSCALER_UNREGISTERED_TAINT.to_string(),
            value: None,
            effect: AUTOSCALER_UNREGISTERED_TAINT_EFFECT.to_string(),
            time_added: None,
        });
    }
    // The machine's first phase goes in the create (the API server keeps a Node's status on
    // create, as kubelets register): the node-controller then writes nothing to the Node before
    // its create call. So does `Ready=Unknown` until the kubelet posts (see
    // `kube_node_runtime::node_status`: a Node without a Ready condition can crash
    // kube-controller-manager).
    let now = Time(Timestamp::now());
    let ready = kube_node_runtime::node_status::kubelet_not_started(&now);
    let launching = NodeCondition {
        type_: MACHINE_READY_CONDITION.to_string(),
        status: "False".to_string(),
        reason: Some(MachinePhase::Launching.as_str().to_string()),
        message: Some(LAUNCHING_MESSAGE.to_string()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(now),
    };
    Ok(Node {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            finalizers: Some(vec![MACHINE_FINALIZER.to_string()]),
            owner_references: Some(vec![owner_reference(ns.name_any(), uid)]),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(taints),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            conditions: Some(vec![launching, ready]),
            ..Default::default()
        }),
    })
}

/// A bootstrap token Secret name for a new Node (`bootstrap-token-` and six of `[a-z0-9]`, the
/// token's public half), recorded in the create so that the node-controller's only write
/// before the machine's launch is the Secret; the secret half is the node-controller's alone.
/// Never a name recorded on a Node the cache knows: the node-controller takes a taken name
/// for its predecessor's token and deletes it.
fn bootstrap_token_name(nodes: &Store<CachedNode>) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    loop {
        let id: String = (0..6)
            .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
            .collect();
        let name = format!("bootstrap-token-{id}");
        let taken = nodes
            .find(|n| n.annotations().get(BOOTSTRAP_TOKEN_ANNOTATION) == Some(name.as_str()))
            .is_some();
        if !taken {
            return name;
        }
    }
}

pub(crate) fn owner_reference(name: String, uid: String) -> OwnerReference {
    OwnerReference {
        api_version: NodeSet::api_version(&()).to_string(),
        kind: NodeSet::kind(&()).to_string(),
        name,
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The children the planner sees, from the cache: the related Nodes are picked on the
/// cache's own accessors, and only they are rebuilt as Nodes.
fn cached_children(ns: &NodeSet, nodes: &Store<CachedNode>) -> (Vec<ChildNode>, Vec<Arc<Node>>) {
    let related: Vec<Arc<Node>> = nodes
        .state()
        .iter()
        .filter(|n| cached_related(ns, n))
        .map(|n| Arc::new(n.to_node()))
        .collect();
    let children = related.iter().map(|n| child(ns, n)).collect();
    (children, related)
}

/// The children the planner sees, from a consistent read: the Nodes matching the selector as
/// the API server has them now, plus the cached non-matching Nodes that concern the NodeSet
/// (ours to release, or named in `spec.removeNodes`).
async fn fresh_children(
    ns: &NodeSet,
    ctx: &Context,
    cached: &[Arc<Node>],
) -> Result<(Vec<ChildNode>, Vec<Node>), Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let selector = ns.spec.selector.to_selector_string();
    let listed = api.list(&ListParams::default().labels(&selector)).await?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut nodes: Vec<Node> = Vec::with_capacity(listed.items.len());
    for n in listed.items {
        // The server applied the selector; check again in case it reads it differently.
        if ns.spec.selector.matches(n.labels()) {
            seen.insert(n.name_any());
            nodes.push(n);
        }
    }
    for n in cached {
        if !seen.contains(&n.name_any()) && !ns.spec.selector.matches(n.labels()) {
            nodes.push(n.as_ref().clone());
        }
    }
    let children = nodes
        .iter()
        .filter(|n| related(ns, n))
        .map(|n| child(ns, n))
        .collect();
    Ok((children, nodes))
}

async fn reconcile_inner(ns: &NodeSet, ctx: &Context) -> Result<Action, Error> {
    let name = ns
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    let uid = ns
        .metadata
        .uid
        .clone()
        .ok_or(Error::MissingField("metadata.uid"))?;
    if ns.metadata.deletion_timestamp.is_some() {
        // Garbage collection deletes (or orphans) the Nodes; nothing to fight over.
        ctx.expectations.clear(&name);
        ctx.metrics.forget(&name);
        return Ok(Action::await_change());
    }
    // Until the Node cache has listed once, it would show no children at all.
    match tokio::time::timeout(CACHE_WAIT, ctx.nodes.wait_until_ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => return Err(Error::Watch("the Node cache is not ready".into())),
    }
    let now = Timestamp::now();

    // "No such NodeClass" must come from a listed cache, not an empty one.
    match tokio::time::timeout(CACHE_WAIT, ctx.classes.wait_until_ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => {
            return Err(Error::Watch("the NodeClass cache is not ready".into()));
        }
    }
    // The backoff as last written: ours (the cache may lag) or the object's.
    let previous = lock(&ctx.written)
        .get(&uid)
        .cloned()
        .or_else(|| ns.status.clone())
        .unwrap_or_default();

    // Which class new Nodes get: the first not cooling down after running out of capacity.
    let (children, cached) = cached_children(ns, &ctx.nodes);
    let classes = ns.spec.template.spec.node_classes();
    let mut cooldowns = fallback::live(&previous.class_cooldowns, &classes, now);
    let node_classes: Vec<Option<&str>> = cached
        .iter()
        .map(|n| {
            n.annotations()
                .get(NODE_CLASS_ANNOTATION)
                .map(String::as_str)
        })
        .collect();
    let pairs: Vec<(&ChildNode, Option<&str>)> = children.iter().zip(node_classes).collect();
    let moves = fallback::plan(
        &classes,
        &mut cooldowns,
        &pairs,
        SignedDuration::from_secs(i64::from(ns.spec.class_fallback_cooldown())),
        now,
    );
    let class_name = fallback::target_class(&classes, &cooldowns).to_string();
    let class_name = &class_name;
    let class = ctx.classes.get(&ObjectRef::new(class_name));
    let listed: BTreeMap<String, Arc<NodeClass>> = classes
        .iter()
        .filter_map(|c| Some((c.to_string(), ctx.classes.get(&ObjectRef::new(c))?)))
        .collect();
    if let Some(c) = class.as_deref()
        && crate::group::is_group_backed(c)
    {
        return crate::group::reconcile(ns, ctx, c, &previous, now).await;
    }
    let class_generation = class.as_ref().and_then(|c| c.metadata.generation);
    let class_state = ClassState::of(class.as_deref());
    let replicas = usize::try_from(ns.spec.replicas).map_err(|_| {
        Error::InvalidSpec(format!("spec.replicas {} is negative", ns.spec.replicas))
    })?;
    let max_unhealthy = resolve_max_unhealthy(ns.spec.max_unhealthy.as_ref(), replicas)
        .map_err(Error::InvalidSpec)?;
    let labels = node_labels(ns, class_name)?;
    let min_ready =
        SignedDuration::from_secs(i64::from(ns.spec.min_ready_seconds.unwrap_or(0).max(0)));
    let desired = Desired {
        replicas,
        remove_nodes: ns.spec.remove_nodes.clone(),
        delete_policy: ns.spec.delete_policy(),
        max_unhealthy,
        min_ready,
        class_generation,
        class_usable: class_state == ClassState::Usable,
        seed: rand::random(),
        registration_timeout: class
            .as_ref()
            .and_then(|c| SignedDuration::try_from(c.spec.registration_timeout()).ok()),
        backoff: BackoffPolicy::from_spec(&ns.spec),
        history: BackoffState::from_status(previous.backoff.as_ref()),
        template_hash: template_hash(ns),
        target: class.as_ref().map(|c| BuildHash::of(class_name, &c.spec)),
        targets: listed
            .iter()
            .map(|(n, c)| (n.clone(), BuildHash::of(n, &c.spec)))
            .collect(),
        classes: classes.iter().map(|c| c.to_string()).collect(),
        target_class: class_name.clone(),
        class_cooldowns: cooldowns,
        strategy: strategy(ns, replicas)?,
        progress_deadline: SignedDuration::try_from(ns.spec.progress_deadline())
            .unwrap_or(SignedDuration::MAX),
        rollout: rollout_state(previous.rollout.as_ref()),
    };

    // A Node its class had no capacity for moves to the next class.
    move_nodes(ns, ctx, &moves, &cached, &listed).await;

    // Observe and plan, from the cache first.
    let mut the_plan = plan(&desired, &children, now);
    let satisfied = ctx.expectations.satisfied(&name);
    if satisfied {
        // Expired leftovers must not hold the next pass back.
        ctx.expectations.clear(&name);
    }
    let mut fresh_nodes: Option<Vec<Node>> = None;
    if satisfied && the_plan.scales() {
        // Never scale from the cache alone: re-plan from what the API server has now.
        let (fresh, nodes) = fresh_children(ns, ctx, &cached).await?;
        the_plan = plan(&desired, &fresh, now);
        fresh_nodes = Some(nodes);
    }
    tracing::debug!(
        creates = the_plan.creates,
        deletes = the_plan.deletes.len(),
        adopt = the_plan.adopt.len(),
        release = the_plan.release.len(),
        satisfied,
        "planned"
    );

    // Act.
    let node_api: Api<Node> = Api::all(ctx.client.clone());
    let lookup = |n: &str| -> Option<Node> {
        fresh_nodes
            .as_ref()
            .and_then(|f| {
                f.iter()
                    .find(|x| x.metadata.name.as_deref() == Some(n))
                    .cloned()
            })
            .or_else(|| {
                cached
                    .iter()
                    .find(|x| x.metadata.name.as_deref() == Some(n))
                    .map(|x| x.as_ref().clone())
            })
    };
    if !the_plan.adopt.is_empty() && may_adopt(ctx, &name, &uid).await? {
        for n in &the_plan.adopt {
            if let Some(node) = lookup(n) {
                adopt(&node_api, &node, &name, &uid).await?;
            }
        }
    }
    for n in &the_plan.release {
        if let Some(node) = lookup(n) {
            release(&node_api, &node, &uid).await?;
        }
    }
    let mut create_error: Option<Error> = None;
    let mut create_hold: Option<Instant> = None;
    if satisfied && the_plan.creates == 0 {
        // Nothing left to create: an old create failure no longer describes the NodeSet.
        lock(&ctx.create_failures).remove(&name);
    }
    if satisfied {
        if !the_plan.deletes.is_empty() {
            // Why each drifted Node is replaced, for its event.
            let notes: HashMap<String, String> = the_plan
                .replaced
                .iter()
                .filter_map(|n| {
                    let node = lookup(n)?;
                    let d = drift_of(&desired, &child(ns, &node))?;
                    Some((
                        n.clone(),
                        format!("{}: {}", d.reason, d.message(class_name)),
                    ))
                })
                .collect();
            delete_nodes(ns, ctx, &node_api, &the_plan, &lookup, &notes).await;
        }
        let hold = lock(&ctx.create_backoff)
            .get(&name)
            .map(|(_, until)| *until)
            .filter(|until| *until > Instant::now());
        if the_plan.creates > 0
            && let Some(until) = hold
        {
            tracing::debug!(retry_in = ?until.saturating_duration_since(Instant::now()), "creates held back after a failure");
            create_hold = Some(until);
        } else if the_plan.creates > 0
            && let Err(e) = create_nodes(
                ns,
                ctx,
                &node_api,
                the_plan.creates,
                &labels,
                class_generation,
                desired.target.as_ref(),
            )
            .await
        {
            create_error = Some(e);
        }
    }
    if !the_plan.prune_removals.is_empty() {
        prune_removals(ns, ctx, &the_plan.prune_removals).await?;
    }
    mark_drift(&node_api, &desired, &children, &cached).await;
    sync_template(ns, &node_api, &children, &cached).await;

    // Status, once.
    let create_failure = lock(&ctx.create_failures).get(&name).cloned();
    let mut status = build_status(
        ns,
        &desired,
        &the_plan,
        create_failure.as_ref(),
        class_state,
        &previous,
        now,
    );
    // A fixed pool's free machines, as the node-controller last counted them on the class.
    status.free_machines = class
        .as_deref()
        .and_then(|c| c.status.as_ref())
        .and_then(|s| s.free_machines);
    let mut status_deferred = None;
    if status != previous
        && let Some(wait) = status_write_wait(ctx, &uid, &previous, &status)
    {
        // Only counts moved, and the last write was just now: a ramp of 1000 Nodes becoming
        // Ready would otherwise cost a status write per Node. The next pass writes it.
        status_deferred = Some(wait);
    } else if status != previous {
        write_status(ns, ctx, &status).await?;
        if condition_true(&status, CIRCUIT_BREAKER_CONDITION)
            && !condition_true(&previous, CIRCUIT_BREAKER_CONDITION)
        {
            let message = format!(
                "{} Nodes are unhealthy (maxUnhealthy {}): replacing Failed Nodes is paused",
                the_plan.breaker_unhealthy, the_plan.max_unhealthy
            );
            publish(
                ctx,
                ns,
                EventType::Warning,
                CIRCUIT_BREAKER_CONDITION,
                "Replace",
                message,
            )
            .await;
        }
        if let Progress::Stalled(stall) = &the_plan.progress
            && previous
                .rollout
                .as_ref()
                .and_then(|r| r.stalled_hash.as_ref())
                != Some(&stall.target)
        {
            tracing::warn!(reason = %stall.reason, message = %stall.message, "rollout stopped");
            publish(
                ctx,
                ns,
                EventType::Warning,
                &stall.reason,
                "Replace",
                format!("rollout stopped: {}", stall.message),
            )
            .await;
        }
        // One Warning per backoff step, not per retry.
        let before = BackoffState::from_status(previous.backoff.as_ref()).failures;
        if the_plan.backoff.failures > before {
            let message = backoff_message(&desired, &the_plan.backoff);
            tracing::warn!(
                failures = the_plan.backoff.failures,
                next_attempt = ?the_plan.backoff.next_attempt,
                "replacement backoff"
            );
            publish(
                ctx,
                ns,
                EventType::Warning,
                BACKOFF_EVENT_REASON,
                "Replace",
                message,
            )
            .await;
        }
    }
    ctx.metrics.set_backoff(
        &name,
        desired
            .backoff
            .delay(the_plan.backoff.failures)
            .as_secs_f64(),
    );

    // Metrics: Nodes of this NodeSet by phase.
    let ours: Vec<&Node> = cached
        .iter()
        .map(|n| n.as_ref())
        .filter(|n| child(ns, n).ownership == Ownership::Ours)
        .collect();
    let rollout_phases = [
        ("updated", the_plan.counts.updated),
        ("drifted", the_plan.counts.drifted),
    ];
    for (phase, count) in phase_counts(ours).into_iter().chain(
        rollout_phases
            .into_iter()
            .map(|(p, n)| (p, i64::try_from(n).unwrap_or(i64::MAX))),
    ) {
        ctx.metrics
            .nodes
            .get_or_create(&crate::metrics::NodesLabels {
                nodeset: name.clone(),
                phase,
            })
            .set(count);
    }

    if let Some(e) = create_error {
        return Err(e);
    }
    let (pending_creates, pending_deletes) = ctx.expectations.pending(&name);
    let mut requeue = RESYNC;
    if pending_creates + pending_deletes > 0 {
        requeue = requeue.min(PENDING_RECHECK);
    }
    if let Some(until) = create_hold {
        requeue = requeue.min(until.saturating_duration_since(Instant::now()));
    }
    if let Some(wait) = the_plan.backoff_wait {
        // Just past the due time, so the pass finds it due.
        let wait = Duration::try_from(wait).unwrap_or_default() + Duration::from_millis(100);
        requeue = requeue.min(wait);
    }
    if let Some(wait) = status_deferred {
        requeue = requeue.min(wait);
    }
    if let Some(left) = the_plan.progress_check_in {
        let left = Duration::try_from(left).unwrap_or_default() + Duration::from_millis(100);
        requeue = requeue.min(left);
    }
    if let Some(until) = desired.class_cooldowns.iter().map(|c| c.until.0).min() {
        // The preferred class is tried again when its cool-down ends, not at the next resync.
        let left = Duration::try_from(until.duration_since(Timestamp::now())).unwrap_or_default()
            + Duration::from_millis(100);
        requeue = requeue.min(left);
    }
    if let Some(left) = the_plan.next_available_in {
        let left = Duration::try_from(left).unwrap_or_default() + Duration::from_millis(100);
        requeue = requeue.min(left);
    }
    Ok(Action::requeue(requeue))
}

fn condition_true(status: &NodeSetStatus, type_: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// Whether the NodeSet may adopt, read from the API server rather than the cache (the
/// ReplicaSet controller's `RecheckDeletionTimestamp`): a NodeSet deleted with
/// `propagationPolicy: Orphan` has its Nodes' owner references removed by the garbage
/// collector, and a pass on a cached copy from before the deletion would see them as orphans
/// and adopt them back, leaving them owned by a NodeSet about to be gone. Only read when there
/// is something to adopt.
pub(crate) async fn may_adopt(ctx: &Context, name: &str, uid: &str) -> Result<bool, Error> {
    let live = Api::<NodeSet>::all(ctx.client.clone())
        .get_opt(name)
        .await?;
    Ok(live.is_some_and(|ns| {
        ns.metadata.uid.as_deref() == Some(uid) && ns.metadata.deletion_timestamp.is_none()
    }))
}

/// Adopts an orphan: adds our controller owner reference. The merge patch carries the Node's
/// resourceVersion, so it fails (409) if the Node changed since we judged it adoptable, e.g.
/// if another controller adopted it first.
async fn adopt(api: &Api<Node>, node: &Node, nodeset: &str, uid: &str) -> Result<(), Error> {
    let mut refs = node.metadata.owner_references.clone().unwrap_or_default();
    refs.push(owner_reference(nodeset.to_string(), uid.to_string()));
    let patch = json!({"metadata": {
        "resourceVersion": node.metadata.resource_version,
        "ownerReferences": refs,
    }});
    match api
        .patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(node = %node.name_any(), "adopted node");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Releases a Node whose labels no longer match: removes our owner reference (with the same
/// resourceVersion precondition as [`adopt`]).
async fn release(api: &Api<Node>, node: &Node, uid: &str) -> Result<(), Error> {
    let refs: Vec<OwnerReference> = node
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.uid != uid)
        .cloned()
        .collect();
    let patch = json!({"metadata": {
        "resourceVersion": node.metadata.resource_version,
        "ownerReferences": refs,
    }});
    match api
        .patch(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(node = %node.name_any(), "released node");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_not_found() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the plan's victims in parallel, each with a UID precondition so a Node re-created
/// under the same name is never hit.
async fn delete_nodes(
    ns: &NodeSet,
    ctx: &Context,
    api: &Api<Node>,
    the_plan: &Plan,
    lookup: &impl Fn(&str) -> Option<Node>,
    notes: &HashMap<String, String>,
) {
    let name = ns.name_any();
    ctx.expectations.expect_deletes(&name, &the_plan.deletes);
    let calls = the_plan.deletes.iter().map(|victim| {
        let uid = lookup(victim).and_then(|n| n.metadata.uid);
        async move {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid,
                    resource_version: None,
                }),
                ..Default::default()
            };
            (victim, api.delete(victim, &dp).await)
        }
    });
    let mut deleted = Vec::new();
    let mut failed = Vec::new();
    for (victim, result) in join_all(calls).await {
        match result {
            Ok(_) => deleted.push(victim.clone()),
            Err(kube::Error::Api(s)) if s.is_not_found() || s.is_conflict() => {
                // Already gone (or replaced by a Node we did not mean): nothing will be seen.
                ctx.expectations.deletion_observed(victim);
            }
            Err(e) => {
                ctx.expectations.deletion_observed(victim);
                tracing::warn!(node = %victim, error = %e, "deleting node failed");
                failed.push((victim.clone(), e));
            }
        }
    }
    ctx.metrics.deletes.inc_by(deleted.len() as u64);
    if !deleted.is_empty() {
        tracing::info!(
            count = deleted.len(),
            replacements = the_plan.replacements,
            "deleted nodes"
        );
        let note = summary("Deleted", &deleted);
        publish(
            ctx,
            ns,
            EventType::Normal,
            "SuccessfulDelete",
            "Delete",
            note,
        )
        .await;
    }
    // One event per replaced Node (the Node as its related object, so the recorder does not
    // fold them into one series): a rollout is followed Node by Node.
    for victim in deleted.iter().filter(|v| the_plan.replaced.contains(v)) {
        let why = notes.get(victim).map_or("drifted", String::as_str);
        tracing::info!(node = %victim, why, "replacing drifted node");
        let ev = Event {
            type_: EventType::Normal,
            reason: REPLACED_EVENT_REASON.to_string(),
            note: Some(format!(
                "Replacing drifted Node {victim} ({why}): draining and deleting it"
            )),
            action: "Replace".to_string(),
            secondary: lookup(victim).map(|n| n.object_ref(&())),
        };
        if let Err(e) = ctx.recorder.publish(&ev, &ns.object_ref(&())).await {
            tracing::debug!(error = %e, "publishing event failed");
        }
    }
    if let Some((victim, e)) = failed.first() {
        let note = format!("deleting Node {victim} failed: {e}");
        publish(ctx, ns, EventType::Warning, "FailedDelete", "Delete", note).await;
    }
}

/// "Created 3 Nodes: a, b, c" with the list bounded, for one event per batch (not per Node:
/// events are API writes too).
fn summary(verb: &str, names: &[String]) -> String {
    const SHOWN: usize = 10;
    let mut s = format!(
        "{verb} {} Node{}: {}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

/// Creates `count` Nodes in slow-start batches (1, 2, 4, … capped by `max_create_batch`),
/// each batch in parallel; the first failure ends the series.
///
/// The ReplicaSet controller creates at most `burstReplicas` per sync and then waits until its
/// watch has seen every one before the next sync. Under load that wait was 7.7 s of a 17.5 s
/// scale-up to 1000 Nodes (the watch lags the creates it reports by seconds), for nothing:
/// `count` came from a fresh list at the start of this pass, and each answered create is known
/// here. So the series goes on past the cap, a batch of at most `max_create_batch` at a time,
/// and stops as soon as the NodeSet's spec changes (a scale-down meanwhile is planned by the
/// pass that change triggers, not overrun by this one).
async fn create_nodes(
    ns: &NodeSet,
    ctx: &Context,
    api: &Api<Node>,
    count: usize,
    labels: &BTreeMap<String, String>,
    class_generation: Option<i64>,
    build: Option<&BuildHash>,
) -> Result<(), Error> {
    let name = ns.name_any();
    // The class new Nodes get now (the build is of it; without one nothing is created).
    let class = build.map_or_else(
        || ns.spec.template.spec.preferred_class(),
        |b| b.class.as_str(),
    );
    let template = build_node(ns, class, &name, labels, class_generation, build)?;
    let cap = ctx.config.max_create_batch.max(1);
    let mut remaining = count;
    let mut batch = 1usize;
    let mut created: Vec<String> = Vec::new();
    let mut failure: Option<kube::Error> = None;
    while remaining > 0 {
        if !created.is_empty() && spec_changed(ns, ctx) {
            tracing::debug!(
                left = remaining,
                "the NodeSet changed; its next pass plans the rest"
            );
            break;
        }
        let size = batch.min(remaining).min(cap);
        let names: Vec<String> = (0..size).map(|_| node_name(&name)).collect();
        // Recorded before the creates go out, so the watch cannot see a Node we do not expect.
        ctx.expectations.expect_creates(&name, &names);
        let calls = names
            .into_iter()
            .map(|n| create_one(ctx, api, &name, n, &template));
        for result in join_all(calls).await {
            match result {
                Ok(n) => created.push(n),
                Err(e) => {
                    if failure.is_none() {
                        failure = Some(e);
                    }
                }
            }
        }
        remaining -= size;
        if failure.is_some() {
            // Slow start: a failing API or admission is not flooded with the rest.
            break;
        }
        batch = batch.saturating_mul(2);
    }
    ctx.metrics.creates.inc_by(created.len() as u64);
    if !created.is_empty() {
        tracing::info!(count = created.len(), "created nodes");
        let note = summary("Created", &created);
        publish(
            ctx,
            ns,
            EventType::Normal,
            "SuccessfulCreate",
            "Create",
            note,
        )
        .await;
    }
    match failure {
        None => {
            lock(&ctx.create_failures).remove(&name);
            lock(&ctx.create_backoff).remove(&name);
            Ok(())
        }
        Some(e) => {
            let reason = match &e {
                kube::Error::Api(s) if !s.reason.is_empty() => s.reason.clone(),
                _ => "FailedCreate".to_string(),
            };
            let message = format!("creating a Node failed: {e}");
            lock(&ctx.create_failures).insert(
                name.clone(),
                Failure {
                    reason,
                    message: message.clone(),
                },
            );
            {
                let mut b = lock(&ctx.create_backoff);
                let entry = b.entry(name.clone()).or_insert((0, Instant::now()));
                entry.0 = entry.0.saturating_add(1);
                entry.1 = Instant::now() + backoff(entry.0);
            }
            publish(
                ctx,
                ns,
                EventType::Warning,
                "FailedCreate",
                "Create",
                message,
            )
            .await;
            Err(Error::CreateFailed(e))
        }
    }
}

/// Whether the cached NodeSet is no longer the one this pass planned for: its spec changed
/// (`generation`), it is being deleted, or it is gone.
fn spec_changed(ns: &NodeSet, ctx: &Context) -> bool {
    let now = ctx.sets.get(&ObjectRef::from_obj(ns));
    now.is_none_or(|n| {
        n.metadata.generation != ns.metadata.generation
            || n.metadata.deletion_timestamp.is_some()
            || n.metadata.uid != ns.metadata.uid
    })
}

/// Creates one Node; a name collision (409) retries with a new random name.
async fn create_one(
    ctx: &Context,
    api: &Api<Node>,
    key: &str,
    mut name: String,
    template: &Node,
) -> Result<String, kube::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut node = template.clone();
        node.metadata.name = Some(name.clone());
        node.annotations_mut().insert(
            BOOTSTRAP_TOKEN_ANNOTATION.to_string(),
            bootstrap_token_name(&ctx.nodes),
        );
        match api.create(&PostParams::default(), &node).await {
            Ok(_) => return Ok(name),
            Err(kube::Error::Api(s)) if s.is_already_exists() && attempt < NAME_ATTEMPTS => {
                ctx.expectations.creation_observed(&name);
                name = node_name(key);
                ctx.expectations
                    .expect_creates(key, std::slice::from_ref(&name));
            }
            Err(e) => {
                // It will never be seen: do not wait for it.
                ctx.expectations.creation_observed(&name);
                tracing::warn!(node = %name, error = %e, "creating node failed");
                return Err(e);
            }
        }
    }
}

/// Drops the names of gone Nodes from `spec.removeNodes`. The merge patch carries the
/// NodeSet's resourceVersion: if someone changed the spec meanwhile it fails with 409 and the
/// next pass (triggered by that change) recomputes the list.
pub(crate) async fn prune_removals(
    ns: &NodeSet,
    ctx: &Context,
    gone: &[String],
) -> Result<(), Error> {
    let keep: Vec<&String> = ns
        .spec
        .remove_nodes
        .iter()
        .filter(|n| !gone.contains(n))
        .collect();
    let api: Api<NodeSet> = Api::all(ctx.client.clone());
    let patch = json!({
        "metadata": {"resourceVersion": ns.metadata.resource_version},
        "spec": {"removeNodes": if keep.is_empty() { serde_json::Value::Null } else { json!(keep) }},
    });
    match api
        .patch(
            &ns.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(
                pruned = gone.len(),
                "pruned removed nodes from spec.removeNodes"
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sets a condition, keeping its lastTransitionTime unless the status flips.
pub(crate) fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: last,
    }
}

pub(crate) fn to_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// `spec.strategy`, resolved against `replicas`.
fn strategy(ns: &NodeSet, replicas: usize) -> Result<UpdateStrategy, Error> {
    if ns.spec.strategy_type() == StrategyType::OnDelete {
        return Ok(UpdateStrategy::OnDelete);
    }
    let ru = ns
        .spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let max_surge = resolve_int_or_percent(
        "spec.strategy.rollingUpdate.maxSurge",
        ru.and_then(|r| r.max_surge.as_ref()),
        1,
        replicas,
        true,
    )
    .map_err(Error::InvalidSpec)?;
    let max_unavailable = resolve_int_or_percent(
        "spec.strategy.rollingUpdate.maxUnavailable",
        ru.and_then(|r| r.max_unavailable.as_ref()),
        0,
        replicas,
        false,
    )
    .map_err(Error::InvalidSpec)?;
    // As a Deployment: with both at 0 (e.g. percentages of a small NodeSet), surge by one.
    let max_surge = if max_surge == 0 && max_unavailable == 0 {
        1
    } else {
        max_surge
    };
    Ok(UpdateStrategy::RollingUpdate {
        max_surge,
        max_unavailable,
    })
}

/// The rollout state as last written.
fn rollout_state(status: Option<&RolloutStatus>) -> RolloutState {
    let Some(s) = status else {
        return RolloutState::default();
    };
    RolloutState {
        target: s.target_hash.clone(),
        stalled: s.stalled_hash.clone().map(|target| Stall {
            target,
            reason: s.stalled_reason.clone().unwrap_or_default(),
            message: s.stalled_message.clone().unwrap_or_default(),
        }),
    }
}

/// How many `Drifted` condition writes one pass makes at most (the rest come next pass).
const DRIFT_WRITES_PER_PASS: usize = 64;

/// Sets the `Drifted` condition on the NodeSet's Nodes whose drift changed: True (reason
/// naming what changed) on a Node that drifted, False on one that no longer has (a NodeClass
/// edit reverted). A Node that never drifted gets no condition, and costs no write.
async fn mark_drift(
    api: &Api<Node>,
    desired: &Desired,
    children: &[ChildNode],
    nodes: &[Arc<Node>],
) {
    let Some(target) = &desired.target else {
        return;
    };
    let now = Time(Timestamp::now());
    let mut writes = Vec::new();
    for (c, node) in children.iter().zip(nodes) {
        if c.ownership != Ownership::Ours || c.deleting {
            continue;
        }
        let existing = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|x| x.type_ == DRIFTED_CONDITION));
        let (status, reason, message) = match drift_of(desired, c) {
            Some(d) => ("True", d.reason.clone(), d.message(&target.class)),
            None if existing.is_some_and(|x| x.status == "True") => (
                "False",
                "UpToDate".to_string(),
                "built from what the NodeSet and its NodeClass say now".to_string(),
            ),
            None => continue,
        };
        if existing
            .is_some_and(|x| x.status == status && x.reason.as_deref() == Some(reason.as_str()))
        {
            continue;
        }
        let transition = existing
            .filter(|x| x.status == status)
            .and_then(|x| x.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        let cond = k8s_openapi::api::core::v1::NodeCondition {
            type_: DRIFTED_CONDITION.to_string(),
            status: status.to_string(),
            reason: Some(reason),
            message: Some(message),
            last_heartbeat_time: Some(now.clone()),
            last_transition_time: Some(transition),
        };
        writes.push((c.name.clone(), cond));
        if writes.len() >= DRIFT_WRITES_PER_PASS {
            break;
        }
    }
    let calls = writes.into_iter().map(|(name, cond)| async move {
        // Strategic merge keyed on `type`: the kubelet's and the node-controller's conditions
        // are untouched.
        let patch = json!({"status": {"conditions": [cond]}});
        let result = api
            .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await;
        if let Err(e) = result {
            tracing::debug!(node = %name, error = %e, "cannot set the Drifted condition");
        }
    });
    join_all(calls).await;
}

/// Moves each Node of `moves` to its next NodeClass: its `MachineReady` message first (so a
/// later pass does not move it again from the same failure), then its class annotation, label
/// and build hash, each write conditional on the Node not having changed since it was seen
/// failed (a Node whose create is being retried meanwhile is left alone). The node-controller
/// then creates its machine on the new class.
async fn move_nodes(
    ns: &NodeSet,
    ctx: &Context,
    moves: &[fallback::Move],
    cached: &[Arc<Node>],
    listed: &BTreeMap<String, Arc<NodeClass>>,
) {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let cooldown = ns.spec.class_fallback_cooldown();
    for m in moves.iter().take(DRIFT_WRITES_PER_PASS) {
        let Some(to) = listed.get(&m.to) else {
            continue;
        };
        if !cached.iter().any(|n| n.name_any() == m.node) {
            continue;
        }
        let why = format!(
            "NodeClass {} answered {}; its machine is retried on NodeClass {}",
            m.from, m.reason, m.to
        );
        // The node-controller retries the create meanwhile and writes the Node each time:
        // read it fresh, and move it only while it still shows that failure (a few tries).
        let mut moved = None;
        for _ in 0..3 {
            let node = match api.get_opt(&m.node).await {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(node = %m.node, error = %e, "cannot read the Node");
                    break;
                }
            };
            let Some(mut cond) = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == MACHINE_READY_CONDITION))
                .cloned()
            else {
                break;
            };
            let still_failed = node.annotations().get(NODE_CLASS_ANNOTATION) == Some(&m.from)
                && node
                    .spec
                    .as_ref()
                    .and_then(|s| s.provider_id.as_ref())
                    .is_none()
                && node.metadata.deletion_timestamp.is_none()
                && cond.message.as_deref().is_some_and(|msg| {
                    fallback::FALLBACK_REASONS
                        .iter()
                        .any(|r| msg.starts_with(&format!("{r}:")))
                });
            if !still_failed {
                break;
            }
            cond.message = Some(format!("{}: {why}", fallback::MOVED_REASON));
            cond.last_heartbeat_time = Some(Time(Timestamp::now()));
            let patch = json!({
                "metadata": {"resourceVersion": node.resource_version()},
                "status": {"conditions": [cond]},
            });
            match api
                .patch_status(&m.node, &PatchParams::default(), &Patch::Strategic(&patch))
                .await
            {
                Ok(n) => {
                    moved = Some(n);
                    break;
                }
                Err(kube::Error::Api(s)) if s.is_conflict() => {}
                Err(e) => {
                    tracing::debug!(node = %m.node, error = %e, "cannot move the Node to its next class");
                    break;
                }
            }
        }
        let Some(moved) = moved else {
            continue;
        };
        // A JSON patch whose tests hold only while the Node names the old class and has no
        // machine: the condition writes of a retrying create do not make it conflict, a
        // machine recorded meanwhile does.
        let esc = |k: &str| k.replace('~', "~0").replace('/', "~1");
        let annotation = |k: &str| format!("/metadata/annotations/{}", esc(k));
        let mut ops = vec![
            json!({"op": "test", "path": annotation(NODE_CLASS_ANNOTATION), "value": m.from}),
            json!({"op": "test", "path": "/spec/providerID", "value": null}),
            json!({"op": "replace", "path": annotation(NODE_CLASS_ANNOTATION), "value": m.to}),
            json!({"op": "add", "path": annotation(BUILD_HASH_ANNOTATION),
                   "value": BuildHash::of(&m.to, &to.spec).annotation()}),
        ];
        if let Some(g) = to.metadata.generation {
            ops.push(
                json!({"op": "add", "path": annotation(NODE_CLASS_GENERATION_ANNOTATION),
                            "value": g.to_string()}),
            );
        }
        if moved.labels().get(NODE_CLASS_LABEL) == Some(&m.from) {
            ops.push(json!({"op": "replace",
                            "path": format!("/metadata/labels/{}", esc(NODE_CLASS_LABEL)),
                            "value": m.to}));
        }
        let patch = match serde_json::from_value::<json_patch::Patch>(serde_json::Value::Array(ops))
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(node = %m.node, error = %e, "cannot build the move patch");
                continue;
            }
        };
        match api
            .patch(&m.node, &PatchParams::default(), &Patch::Json::<()>(patch))
            .await
        {
            Ok(_) => {
                tracing::info!(node = %m.node, from = %m.from, to = %m.to, reason = %m.reason, "moved the Node to its next class");
                publish(
                    ctx,
                    ns,
                    EventType::Warning,
                    CLASS_FALLBACK_CONDITION,
                    "Fallback",
                    format!(
                        "Node {}: {why} ({}); {} is skipped for new Nodes for {cooldown}s",
                        m.node, m.message, m.from
                    ),
                )
                .await;
            }
            Err(e) => {
                tracing::debug!(node = %m.node, error = %e, "cannot move the Node to its next class");
            }
        }
    }
}

/// Patches the template's labels, annotations and taints onto existing Nodes in place (see
/// `template.rs`): they shape nothing about the machine, so a change of them replaces no Node.
async fn sync_template(ns: &NodeSet, api: &Api<Node>, children: &[ChildNode], nodes: &[Arc<Node>]) {
    let wanted = Wanted::of(ns);
    // The cache keeps neither taints nor others' annotations: read the Nodes the template
    // has not reached yet whole, once per template change.
    let outdated: Vec<String> = children
        .iter()
        .zip(nodes)
        .filter(|(c, n)| c.ownership == Ownership::Ours && !c.deleting && wanted.outdated(n))
        .map(|(c, _)| c.name.clone())
        .take(DRIFT_WRITES_PER_PASS)
        .collect();
    let wanted = &wanted;
    let calls = outdated.into_iter().map(|name| async move {
        let node = match api.get(&name).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(node = %name, error = %e, "cannot read the Node");
                return;
            }
        };
        let Some(patch) = wanted.patch(&node) else {
            return;
        };
        let result = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        match result {
            Ok(_) => tracing::debug!(node = %name, "template applied in place"),
            // A conflict (the taints moved meanwhile) is retried by the next pass.
            Err(e) => tracing::debug!(node = %name, error = %e, "cannot apply the template"),
        }
    });
    join_all(calls).await;
}

/// A stable hash of `spec.template`: a change of it starts the backoff over.
pub(crate) fn template_hash(ns: &NodeSet) -> String {
    let text = serde_json::to_string(&ns.spec.template).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// "3 consecutive machines failed (last: RegistrationTimeout: …); launching waits 2m until …".
fn backoff_message(desired: &Desired, b: &BackoffState) -> String {
    let last = b
        .last_failure
        .as_ref()
        .map(|f| format!("{}: {}", f.reason, f.message))
        .unwrap_or_default();
    let delay = desired.backoff.delay(b.failures);
    let next = b
        .next_attempt
        .map(|t| t.to_string())
        .unwrap_or_else(|| "now".to_string());
    format!(
        "{} consecutive machine{} failed without a Node becoming Ready (last: {last}); \
         launching waits {}s after the last failure: next attempt at {next}, then one machine at a time",
        b.failures,
        if b.failures == 1 { "" } else { "s" },
        delay.as_secs_f64(),
    )
}

/// The status a pass writes. Pure.
/// Whether the template's NodeClass can make machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClassState {
    /// It exists and is not being deleted.
    Usable,
    /// There is no such NodeClass.
    Missing,
    /// It is being deleted (it waits for its last Node to go).
    Deleting,
}

impl ClassState {
    fn of(class: Option<&NodeClass>) -> Self {
        match class {
            None => Self::Missing,
            Some(c) if c.metadata.deletion_timestamp.is_some() => Self::Deleting,
            Some(_) => Self::Usable,
        }
    }

    /// Why creates are held back (the ReplicaFailure reason and message), while Nodes are
    /// missing.
    fn hold_reason(self, class: &str, missing_nodes: bool) -> Option<(String, String)> {
        if !missing_nodes {
            return None;
        }
        match self {
            Self::Usable => None,
            Self::Missing => Some((
                "NodeClassNotFound".into(),
                format!("NodeClass {class} does not exist: no Nodes are created until it does"),
            )),
            Self::Deleting => Some((
                "NodeClassDeleting".into(),
                format!("NodeClass {class} is being deleted: no Nodes are created from it"),
            )),
        }
    }
}

pub(crate) fn build_status(
    ns: &NodeSet,
    desired: &Desired,
    p: &Plan,
    create_failure: Option<&Failure>,
    class_state: ClassState,
    previous: &NodeSetStatus,
    now: Timestamp,
) -> NodeSetStatus {
    let generation = ns.metadata.generation;
    let prev = &previous.conditions;
    let c = &p.counts;
    let all_ready = c.ready == desired.replicas && c.replicas == desired.replicas;
    let ready = condition(
        prev,
        READY_CONDITION,
        all_ready,
        if all_ready {
            "AllReplicasReady"
        } else if c.replicas < desired.replicas {
            "ScalingUp"
        } else if c.replicas > desired.replicas {
            "ScalingDown"
        } else {
            "ReplicasNotReady"
        },
        format!(
            "{}/{} Nodes ready ({} exist)",
            c.ready, desired.replicas, c.replicas
        ),
        generation,
        now,
    );
    let class = &desired.target_class;
    let failure = if let Some(why) = class_state.hold_reason(class, desired.replicas > c.replicas) {
        Some(why)
    } else if let Some(f) = create_failure {
        Some((f.reason.clone(), f.message.clone()))
    } else if !p.refused_removals.is_empty() {
        Some((
            "InvalidRemoval".to_string(),
            format!(
                "spec.removeNodes names Nodes that are not Nodes of this NodeSet: {}",
                p.refused_removals.join(", ")
            ),
        ))
    } else {
        p.failure.as_ref().map(|(f, n)| {
            let message = if *n > 1 {
                format!("{n} Nodes report failures; {}", f.message)
            } else {
                f.message.clone()
            };
            (f.reason.clone(), message)
        })
    };
    let replica_failure = match failure {
        Some((reason, message)) => condition(
            prev,
            REPLICA_FAILURE_CONDITION,
            true,
            &reason,
            message,
            generation,
            now,
        ),
        None => condition(
            prev,
            REPLICA_FAILURE_CONDITION,
            false,
            "NoFailure",
            String::new(),
            generation,
            now,
        ),
    };
    let breaker = if p.circuit_breaker_open {
        condition(
            prev,
            CIRCUIT_BREAKER_CONDITION,
            true,
            "TooManyUnhealthy",
            format!(
                "{} Nodes are unhealthy (failed, not Ready, or not registered after half the \
                 registration timeout), more than maxUnhealthy {}: replacing Failed Nodes is paused",
                p.breaker_unhealthy, p.max_unhealthy
            ),
            generation,
            now,
        )
    } else {
        condition(
            prev,
            CIRCUIT_BREAKER_CONDITION,
            false,
            "WithinLimit",
            String::new(),
            generation,
            now,
        )
    };
    let backoff = if p.backoff.active() {
        condition(
            prev,
            BACKOFF_CONDITION,
            true,
            p.backoff
                .last_failure
                .as_ref()
                .map_or("MachineFailed", |f| f.reason.as_str()),
            backoff_message(desired, &p.backoff),
            generation,
            now,
        )
    } else {
        condition(
            prev,
            BACKOFF_CONDITION,
            false,
            "NoBackoff",
            String::new(),
            generation,
            now,
        )
    };
    let outdated = if class_state == ClassState::Missing {
        condition(
            prev,
            OUTDATED_CONDITION,
            false,
            "NodeClassNotFound",
            format!("NodeClass {class} does not exist"),
            generation,
            now,
        )
    } else if c.outdated > 0 {
        condition(
            prev,
            OUTDATED_CONDITION,
            true,
            "OutdatedNodes",
            format!(
                "{} Nodes were built from an older generation of NodeClass {class} (current {})",
                c.outdated,
                desired.class_generation.unwrap_or_default()
            ),
            generation,
            now,
        )
    } else {
        condition(
            prev,
            OUTDATED_CONDITION,
            false,
            "UpToDate",
            String::new(),
            generation,
            now,
        )
    };
    let progressing = match &p.progress {
        Progress::Complete => condition(
            prev,
            PROGRESSING_CONDITION,
            true,
            "NodeSetUpToDate",
            format!("all {} Nodes are up to date", c.updated),
            generation,
            now,
        ),
        Progress::Replacing => condition(
            prev,
            PROGRESSING_CONDITION,
            true,
            "ReplacingDriftedNodes",
            format!(
                "{} of {} Nodes are up to date; replacing {} drifted Nodes",
                c.updated,
                c.updated + c.drifted,
                c.drifted
            ),
            generation,
            now,
        ),
        Progress::OnDelete => condition(
            prev,
            PROGRESSING_CONDITION,
            true,
            "WaitingForDeletion",
            format!(
                "{} Nodes drifted; strategy OnDelete replaces each when it is deleted",
                c.drifted
            ),
            generation,
            now,
        ),
        Progress::Stalled(stall) => condition(
            prev,
            PROGRESSING_CONDITION,
            false,
            &stall.reason,
            format!(
                "{}; {} Nodes stay drifted until the NodeClass or the template changes",
                stall.message, c.drifted
            ),
            generation,
            now,
        ),
    };
    let min_available = p.min_available.min(desired.replicas);
    let available = if c.available >= min_available {
        condition(
            prev,
            AVAILABLE_CONDITION,
            true,
            "MinimumReplicasAvailable",
            format!(
                "{} Nodes available, at least {min_available} wanted",
                c.available
            ),
            generation,
            now,
        )
    } else {
        condition(
            prev,
            AVAILABLE_CONDITION,
            false,
            "MinimumReplicasUnavailable",
            format!(
                "{} Nodes available, at least {min_available} wanted",
                c.available
            ),
            generation,
            now,
        )
    };
    let rollout = (p.rollout != RolloutState::default()).then(|| RolloutStatus {
        target_hash: p.rollout.target.clone(),
        stalled_hash: p.rollout.stalled.as_ref().map(|s| s.target.clone()),
        stalled_reason: p.rollout.stalled.as_ref().map(|s| s.reason.clone()),
        stalled_message: p.rollout.stalled.as_ref().map(|s| s.message.clone()),
    });
    NodeSetStatus {
        replicas: to_i32(c.replicas),
        ready_replicas: to_i32(c.ready),
        available_replicas: to_i32(c.available),
        unhealthy_replicas: Some(to_i32(c.unhealthy)),
        outdated_replicas: Some(to_i32(c.outdated)),
        updated_replicas: Some(to_i32(c.updated)),
        rollout,
        observed_generation: generation,
        selector: Some(ns.spec.selector.to_selector_string()),
        backoff: p.backoff.to_status(),
        free_machines: None,
        node_class_name: Some(desired.target_class.clone()),
        class_cooldowns: desired.class_cooldowns.clone(),
        conditions: [
            Some(ready),
            Some(replica_failure),
            Some(breaker),
            Some(backoff),
            Some(outdated),
            Some(progressing),
            Some(available),
            class_fallback(prev, desired, generation, now),
        ]
        .into_iter()
        .flatten()
        .collect(),
    }
}

/// The `NodeClassFallback` condition, for a NodeSet with several classes.
fn class_fallback(
    prev: &[Condition],
    desired: &Desired,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<Condition> {
    let first = desired
        .classes
        .first()
        .filter(|_| desired.classes.len() > 1)?;
    let cooling: Vec<String> = desired
        .class_cooldowns
        .iter()
        .map(|c| {
            format!(
                "{} answered {} (skipped until {})",
                c.node_class_name, c.reason, c.until.0
            )
        })
        .collect();
    let target = &desired.target_class;
    Some(if target == first {
        condition(
            prev,
            CLASS_FALLBACK_CONDITION,
            false,
            "PreferredNodeClass",
            if cooling.is_empty() {
                format!("new Nodes get NodeClass {target}, the first listed")
            } else {
                format!(
                    "new Nodes get NodeClass {target}, the first listed; {}",
                    cooling.join("; ")
                )
            },
            generation,
            now,
        )
    } else {
        let reason = desired
            .class_cooldowns
            .iter()
            .find(|c| &c.node_class_name == first)
            .map_or_else(|| "NodeClassCoolingDown".to_string(), |c| c.reason.clone());
        condition(
            prev,
            CLASS_FALLBACK_CONDITION,
            true,
            &reason,
            format!("new Nodes get NodeClass {target}: {}", cooling.join("; ")),
            generation,
            now,
        )
    })
}

/// A spec the controller cannot act on: says so in ReplicaFailure (the other conditions and
/// counts stay as last written) and in a Warning event, once per change.
async fn record_invalid_spec(ns: &NodeSet, ctx: &Context, err: &Error) {
    let uid = ns.metadata.uid.clone().unwrap_or_default();
    let previous = lock(&ctx.written)
        .get(&uid)
        .cloned()
        .or_else(|| ns.status.clone())
        .unwrap_or_default();
    let mut status = previous.clone();
    let c = condition(
        &previous.conditions,
        REPLICA_FAILURE_CONDITION,
        true,
        err.reason(),
        err.to_string(),
        ns.metadata.generation,
        Timestamp::now(),
    );
    status
        .conditions
        .retain(|x| x.type_ != REPLICA_FAILURE_CONDITION);
    status.conditions.push(c);
    status.observed_generation = ns.metadata.generation;
    if status == previous {
        return;
    }
    if let Err(e) = write_status(ns, ctx, &status).await {
        tracing::debug!(error = %e, "cannot record the invalid spec");
    }
    publish(
        ctx,
        ns,
        EventType::Warning,
        err.reason(),
        "Reconcile",
        err.to_string(),
    )
    .await;
}

/// The least time between two status writes of one NodeSet that change only counts.
const STATUS_COUNTS_INTERVAL: Duration = Duration::from_secs(1);

/// How long to hold a status write back, if at all: only when nothing but the counts (and
/// condition messages) changed and the last write of this NodeSet is under a second old.
/// Generations, selectors and condition states are written at once.
fn status_write_wait(
    ctx: &Context,
    uid: &str,
    previous: &NodeSetStatus,
    status: &NodeSetStatus,
) -> Option<Duration> {
    if !only_counts_changed(previous, status) {
        return None;
    }
    let since = lock(&ctx.status_written_at).get(uid)?.elapsed();
    STATUS_COUNTS_INTERVAL
        .checked_sub(since)
        .filter(|d| !d.is_zero())
}

/// Whether two statuses differ at most in their counts and condition messages.
fn only_counts_changed(previous: &NodeSetStatus, status: &NodeSetStatus) -> bool {
    let states = |s: &NodeSetStatus| -> Vec<(String, String, String)> {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    };
    previous.observed_generation == status.observed_generation
        && previous.selector == status.selector
        && previous.backoff == status.backoff
        && previous.rollout == status.rollout
        && previous.node_class_name == status.node_class_name
        && previous.class_cooldowns == status.class_cooldowns
        && states(previous) == states(status)
}

pub(crate) async fn write_status(
    ns: &NodeSet,
    ctx: &Context,
    status: &NodeSetStatus,
) -> Result<(), Error> {
    let api: Api<NodeSet> = Api::all(ctx.client.clone());
    let body = json!({
        "apiVersion": NodeSet::api_version(&()),
        "kind": NodeSet::kind(&()),
        "status": status,
    });
    api.patch_status(
        &ns.name_any(),
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Apply(&body),
    )
    .await?;
    if let Some(uid) = &ns.metadata.uid {
        lock(&ctx.written).insert(uid.clone(), status.clone());
        lock(&ctx.status_written_at).insert(uid.clone(), Instant::now());
    }
    Ok(())
}

pub(crate) async fn publish(
    ctx: &Context,
    ns: &NodeSet,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &ns.object_ref(&())).await {
        tracing::debug!(error = %e, reason, "publishing event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Counts;

    fn nodeset(selector: serde_json::Value) -> NodeSet {
        serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1",
            "kind": "NodeSet",
            "metadata": {"name": "workers", "uid": "u-1", "generation": 3},
            "spec": {
                "replicas": 2,
                "selector": selector,
                "template": {
                    "metadata": {"labels": {"pool": "w"}, "annotations": {"a": "b"}},
                    "spec": {"nodeClassName": "sim", "taints": [{"key": "k", "effect": "NoSchedule"}]},
                },
            },
        }))
        .expect("NodeSet fixture")
    }

    #[test]
    fn created_node_shape() {
        let ns = nodeset(json!({"matchLabels": {"pool": "w"}}));
        let labels = node_labels(&ns, "sim").expect("labels");
        assert_eq!(
            labels.get(NODESET_LABEL).map(String::as_str),
            Some("workers")
        );
        assert_eq!(
            labels.get(NODE_CLASS_LABEL).map(String::as_str),
            Some("sim")
        );
        let node = build_node(&ns, "sim", "workers-abcde", &labels, Some(7), None).expect("node");
        let a = node.annotations();
        assert_eq!(
            a.get(NODE_CLASS_ANNOTATION).map(String::as_str),
            Some("sim")
        );
        assert_eq!(
            a.get(NODE_CLASS_GENERATION_ANNOTATION).map(String::as_str),
            Some("7")
        );
        assert_eq!(a.get("a").map(String::as_str), Some("b"));
        assert_eq!(node.finalizers(), [MACHINE_FINALIZER.to_string()]);
        // Created Launching, and Ready=Unknown until the kubelet posts: kube-controller-manager
        // 1.28 can panic on a Node without a Ready condition.
        let conditions = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        assert!(conditions.iter().any(
            |c| c.type_ == MACHINE_READY_CONDITION && c.reason.as_deref() == Some("Launching")
        ));
        assert!(conditions.iter().any(|c| c.type_ == "Ready"
            && c.status == "Unknown"
            && c.reason.as_deref() == Some("NodeStatusNeverUpdated")));
        let taints = node.spec.and_then(|s| s.taints).unwrap_or_default();
        assert_eq!(taints.len(), 3);
        assert!(
            taints
                .iter()
                .any(|t| t.key == UNREGISTERED_TAINT && t.effect == "NoExecute")
        );
        // The autoscaler's marker comes with it, as a preference only.
        assert!(taints.iter().any(|t| t.key == AUTOSCALER_UNREGISTERED_TAINT
            && t.effect == AUTOSCALER_UNREGISTERED_TAINT_EFFECT));
        let o = &node.metadata.owner_references.unwrap_or_default()[0];
        assert_eq!(o.uid, "u-1");
        assert_eq!(o.kind, "NodeSet");
        assert_eq!(o.controller, Some(true));
        assert_eq!(o.block_owner_deletion, Some(true));
    }

    #[test]
    fn extra_labels_never_break_the_selector() {
        // A selector saying the nodeset label must be absent: the label is not added.
        let ns = nodeset(json!({
            "matchLabels": {"pool": "w"},
            "matchExpressions": [{"key": NODESET_LABEL, "operator": "DoesNotExist"}],
        }));
        let labels = node_labels(&ns, "sim").expect("labels");
        assert!(!labels.contains_key(NODESET_LABEL));
        assert!(labels.contains_key(NODE_CLASS_LABEL));
        // A selector the template cannot match is refused.
        let bad = nodeset(json!({"matchLabels": {"pool": "other"}}));
        assert!(matches!(
            node_labels(&bad, "sim"),
            Err(Error::InvalidSpec(_))
        ));
        let empty = nodeset(json!({}));
        assert!(matches!(
            node_labels(&empty, "sim"),
            Err(Error::InvalidSpec(_))
        ));
    }

    #[test]
    fn only_a_change_of_counts_may_wait_for_the_next_status_write() {
        let ns = nodeset(json!({"matchLabels": {"pool": "w"}}));
        let desired = Desired {
            replicas: 3,
            remove_nodes: vec![],
            delete_policy: Default::default(),
            max_unhealthy: 1,
            min_ready: SignedDuration::ZERO,
            class_generation: Some(1),
            class_usable: true,
            seed: 0,
            ..Desired::default()
        };
        let counts = |ready| Plan {
            counts: Counts {
                replicas: 3,
                ready,
                available: ready,
                ..Counts::default()
            },
            ..Plan::default()
        };
        let t = Timestamp::from_second(1_700_000_000).expect("time");
        let none = NodeSetStatus::default();
        let one = build_status(
            &ns,
            &desired,
            &counts(1),
            None,
            ClassState::Usable,
            &none,
            t,
        );
        let two = build_status(&ns, &desired, &counts(2), None, ClassState::Usable, &one, t);
        let three = build_status(&ns, &desired, &counts(3), None, ClassState::Usable, &two, t);
        assert!(
            !only_counts_changed(&none, &one),
            "the first status is written at once"
        );
        assert!(only_counts_changed(&one, &two), "1 → 2 Ready: counts only");
        assert!(
            !only_counts_changed(&two, &three),
            "all Ready flips the Ready condition: written at once"
        );
        let mut newer = two.clone();
        newer.observed_generation = newer.observed_generation.map(|g| g + 1);
        assert!(
            !only_counts_changed(&two, &newer),
            "a new generation is written at once"
        );
    }

    #[test]
    fn status_keeps_transition_times_and_reports_failures() {
        let ns = nodeset(json!({"matchLabels": {"pool": "w"}}));
        let desired = Desired {
            replicas: 2,
            remove_nodes: vec![],
            delete_policy: Default::default(),
            max_unhealthy: 1,
            min_ready: SignedDuration::ZERO,
            class_generation: Some(1),
            class_usable: true,
            seed: 0,
            ..Desired::default()
        };
        let mut p = Plan {
            counts: Counts {
                replicas: 2,
                ready: 2,
                available: 2,
                ..Counts::default()
            },
            ..Plan::default()
        };
        let t0 = Timestamp::from_second(1_700_000_000).expect("time");
        let t1 = Timestamp::from_second(1_700_000_100).expect("time");
        let s0 = build_status(
            &ns,
            &desired,
            &p,
            None,
            ClassState::Usable,
            &NodeSetStatus::default(),
            t0,
        );
        assert!(condition_true(&s0, READY_CONDITION));
        assert_eq!(s0.selector.as_deref(), Some("pool=w"));
        assert_eq!(s0.observed_generation, Some(3));
        assert!(
            s0.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        // Nothing changed but time: the same status, so no write.
        let s1 = build_status(&ns, &desired, &p, None, ClassState::Usable, &s0, t1);
        assert_eq!(s0, s1);
        // A failing Node: ReplicaFailure carries the provider's reason.
        p.failure = Some((
            Failure {
                reason: "InsufficientCapacity".into(),
                message: "workers-x: InsufficientCapacity: none".into(),
            },
            1,
        ));
        p.counts.ready = 1;
        let s2 = build_status(&ns, &desired, &p, None, ClassState::Usable, &s1, t1);
        let rf = s2
            .conditions
            .iter()
            .find(|c| c.type_ == REPLICA_FAILURE_CONDITION)
            .expect("ReplicaFailure");
        assert_eq!(
            (rf.status.as_str(), rf.reason.as_str()),
            ("True", "InsufficientCapacity")
        );
        assert_eq!(rf.last_transition_time, Time(t1));
        let ready = s2
            .conditions
            .iter()
            .find(|c| c.type_ == READY_CONDITION)
            .expect("Ready");
        assert_eq!(ready.status, "False");
    }

    #[test]
    fn backoff_grows_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }

    #[test]
    fn summaries_are_bounded() {
        let names: Vec<String> = (0..25).map(|i| format!("n{i}")).collect();
        let s = summary("Created", &names);
        assert!(s.starts_with("Created 25 Nodes: n0, n1"));
        assert!(s.ends_with("and 15 more"));
    }
}
