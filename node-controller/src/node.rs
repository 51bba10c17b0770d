//! The Node controller: one pass reads the Node, its NodeClass and its machine, asks the pure
//! [`plan`](crate::plan::plan) for the next step, takes it, and records the result.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Secret, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{
    AUTOSCALER_UNREGISTERED_TAINT, AUTOSCALER_UNREGISTERED_TAINT_EFFECT,
    BOOTSTRAP_TOKEN_ANNOTATION, GROUP_BACKED_REASON, INSTANCE_ID_ANNOTATION,
    LAUNCHED_AT_ANNOTATION, LAUNCHING_MESSAGE, MACHINE_FINALIZER, MACHINE_READY_CONDITION,
    MachinePhase, NODE_CLASS_ANNOTATION, NODE_CLASS_GENERATION_ANNOTATION, NODE_CLASS_LABEL,
    READY_CONDITION, UNREGISTERED_TAINT, tags,
};
use kube_node_crds::v1alpha1::find_condition;
use kube_node_provider::{CreateRequest, Instance, ListFilter, Provider, ProviderError};
use kube_node_runtime::CachedNode;
use tracing::Instrument;

use crate::applied::{ClassMeta, MachineLabels};
use crate::bootstrap::{self, BootstrapToken, JoinParams};
use crate::plan::{self, Action, MachineObs, Observed};
use crate::turns::{QUEUED_RECHECK, Turn, WAKE_INTERVAL};
use crate::{Context, Error, error_delay};

/// How long a Ready Node waits between looks when nothing happens.
const RESYNC: Duration = Duration::from_secs(300);
/// How often a deletion step polls.
const DELETE_POLL: Duration = Duration::from_secs(1);
/// The Deleting condition's message until the machine is gone.
const DELETING_MESSAGE: &str = "cordoned; draining and deleting the machine";
/// How often a drain blocked by a PodDisruptionBudget retries.
const DRAIN_POLL: Duration = Duration::from_secs(2);

fn is_managed(node: &CachedNode) -> bool {
    node.annotations().contains_key(NODE_CLASS_ANNOTATION) || node.has_finalizer(MACHINE_FINALIZER)
}

fn has_finalizer(node: &Node) -> bool {
    node.finalizers().iter().any(|f| f == MACHINE_FINALIZER)
}

fn machine_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == MACHINE_READY_CONDITION)
}

fn current_phase(node: &Node) -> Option<MachinePhase> {
    machine_condition(node).and_then(|c| c.reason.as_deref().and_then(MachinePhase::parse))
}

pub(crate) fn kubelet_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == READY_CONDITION && c.status == "True")
        })
}

fn provider_id(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()?
        .provider_id
        .as_deref()
        .filter(|p| !p.is_empty())
}

fn nodeset_owner(node: &Node) -> Option<String> {
    node.owner_references()
        .iter()
        .find(|o| o.kind == "NodeSet" && o.api_version.starts_with("kube-node.io/"))
        .map(|o| o.name.clone())
}

/// One reconcile pass over a Node: the freshest copy of it and what was recorded so far.
struct Pass {
    node: Node,
    name: String,
    uid: String,
    phase: Option<MachinePhase>,
    /// A digest of the labels and taints this pass wants on the Node, once known: a write the
    /// API server refuses (422) is not tried again until it changes.
    want_key: Option<u64>,
    /// The resourceVersions this pass's own writes replaced (see [`crate::OwnWrites`]).
    superseded: Vec<String>,
}

impl Pass {
    /// Takes the Node a write of this pass returned.
    fn wrote(&mut self, node: Node) {
        // A write that changed nothing returns the version it was made on: nothing was
        // replaced, and no watch event will come for it.
        if let Some(rv) = self.node.metadata.resource_version.take()
            && node.metadata.resource_version.as_ref() != Some(&rv)
        {
            self.superseded.push(rv);
        }
        self.node = node;
    }
}

pub(crate) async fn reconcile(
    cached: Arc<CachedNode>,
    ctx: Arc<Context>,
) -> Result<Requeue, Error> {
    if !is_managed(&cached) {
        // Not ours: cheap exit, no turn, no API calls, no metrics.
        ctx.metrics.work_queue().done(&cached.name_any());
        return Ok(Requeue::await_change());
    }
    // At most `concurrency` passes run, and as many launches besides (see `turns`), first
    // come, first served. kube-runtime's own limit keeps the requests it cannot start yet in
    // a hash set and starts whichever it finds first there, so under a steady stream of
    // requests (a scale-up's Nodes, their kubelets, kube-controller-manager) some Nodes
    // waited 15-30 s for their first pass while others went round many times. Its limit is
    // set well above these (see `run`), and a pass with no turn free is queued outside it.
    // The pass is boxed once it may start, so a waiting launch holds only its Node.
    match ctx.turn(&cached) {
        Turn::Launch => {
            let Ok(_turn) = ctx.launch_turns.acquire().await else {
                return Ok(Requeue::await_change());
            };
            Box::pin(reconcile_node(cached, ctx.clone())).await
        }
        Turn::Other => {
            let uid = cached.uid().unwrap_or_default();
            let Some(_turn) = ctx.passes.enter(&uid, &cached.name_any()) else {
                // Queued for a turn, holding no kube-runtime slot: the dispatcher sends it
                // back (the requeue is the safety net).
                ctx.metrics.work_queue().done(&cached.name_any());
                return Ok(Requeue::requeue(QUEUED_RECHECK));
            };
            Box::pin(reconcile_node(cached, ctx.clone())).await
        }
        Turn::Wait(left) => {
            // Set aside for the launches: the waker sends it back (the requeue is the
            // safety net).
            ctx.metrics.work_queue().done(&cached.name_any());
            Ok(Requeue::requeue(left + WAKE_INTERVAL))
        }
    }
}

async fn reconcile_node(cached: Arc<CachedNode>, ctx: Arc<Context>) -> Result<Requeue, Error> {
    ctx.metrics.work_queue().done(&cached.name_any());
    // The pass works on a whole Node (the trimmed one), rebuilt once from the cache.
    let node = cached.to_node();
    let started = std::time::Instant::now();
    let name = node.name_any();
    let span = tracing::info_span!(
        "reconcile",
        node = %name,
        nodeclass = node.annotations().get(NODE_CLASS_ANNOTATION).map(String::as_str).unwrap_or(""),
        nodeset = nodeset_owner(&node).unwrap_or_default(),
        provider_id = provider_id(&node).unwrap_or(""),
    );
    let uid = node.uid().unwrap_or_default();
    if ctx
        .own_writes
        .stale(&uid, node.resource_version().as_deref())
    {
        // The cache is behind this controller's own write to the Node, and the watch event
        // that brings it triggers the next pass: acting on the old copy would only repeat
        // that write (a 404 on a token deleted already, a 422 on a taint removed already).
        tracing::debug!(node = %name, "cache behind our own write; waiting for the watch");
        return Ok(Requeue::requeue(STALE_RECHECK));
    }
    let phase = current_phase(&node);
    let mut pass = Pass {
        node,
        name,
        uid,
        phase,
        want_key: None,
        superseded: Vec::new(),
    };
    let result = reconcile_pass(&mut pass, &ctx)
        .instrument(span.clone())
        .await;
    ctx.own_writes
        .record(&pass.uid, std::mem::take(&mut pass.superseded));
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(r) => {
            ctx.reset_attempts(&pass.uid);
            ctx.metrics.reconciled("node", secs, None);
            Ok(r)
        }
        Err(e) => {
            ctx.metrics.reconciled("node", secs, Some(e.reason()));
            record_error(&mut pass, &ctx, &e).instrument(span).await;
            Err(e)
        }
    }
}

pub(crate) fn error_policy(node: Arc<CachedNode>, err: &Error, ctx: Arc<Context>) -> Requeue {
    let attempt = ctx.next_attempt(&node.uid().unwrap_or_default());
    Requeue::requeue(error_delay(err, attempt, &ctx.backoff))
}

/// Puts a failure on the Node: the condition (phase kept; Pending when no machine can exist
/// yet) and a Warning event. Conflicts are only retried: they are not failures anyone must see.
async fn record_error(pass: &mut Pass, ctx: &Context, err: &Error) {
    if matches!(err.reason(), "Conflict")
        || matches!(err, Error::Kube(kube::Error::Api(s)) if s.code == 404)
    {
        tracing::debug!(error = %err, "retrying after a conflicting write");
        return;
    }
    let refused = match err {
        Error::Kube(kube::Error::Api(s)) if crate::error::is_refused(s) => Some(s.message.as_str()),
        _ => None,
    };
    tracing::warn!(reason = err.reason(), error = %err, "reconcile failed");
    let deleting = pass.node.metadata.deletion_timestamp.is_some();
    let phase = if deleting {
        MachinePhase::Deleting
    } else if provider_id(&pass.node).is_none()
        && (err.needs_change() || pass.phase.is_none_or(|p| p == MachinePhase::Pending))
    {
        // Nothing was created: a configuration error stops before the provider's create.
        MachinePhase::Pending
    } else {
        pass.phase.unwrap_or(MachinePhase::Pending)
    };
    let message = match refused {
        // The API server's own words: they name the field and the value it refused.
        Some(m) => format!("Invalid: the API server refused a write of this Node: {m}"),
        None => format!("{}: {err}", err.reason()),
    };
    if let Some(m) = refused
        && let Some(class) = pass
            .node
            .annotations()
            .get(NODE_CLASS_ANNOTATION)
            .and_then(|n| ctx.node_class(n))
    {
        // The write carried the NodeClass's labels and taints: the class must say so too.
        ctx.reject_write(&class, m);
        if let Some(key) = pass.want_key {
            ctx.refuse_write(&pass.uid, key, m);
        }
        if let Err(e) = crate::nodeclass::report_rejected_write(ctx, &class).await {
            tracing::debug!(error = %e, "cannot record the refused write on the nodeclass");
        }
    }
    if let Err(e) = set_condition(pass, ctx, phase, &message).await {
        tracing::debug!(error = %e, "cannot record the failure on the node");
    }
    event(ctx, &pass.node, EventType::Warning, err.reason(), &message).await;
    if let Some(p) = pass.phase {
        ctx.metrics.set_phase(&pass.uid, Some(p));
    }
}

async fn reconcile_pass(pass: &mut Pass, ctx: &Context) -> Result<Requeue, Error> {
    if pass.uid.is_empty() || pass.name.is_empty() {
        return Err(Error::InvalidNode(
            "the Node has no name or UID".to_string(),
        ));
    }
    if !ctx.synced.load(std::sync::atomic::Ordering::Acquire) {
        // A NodeClass missing from a cache that has not synced yet is not a missing NodeClass;
        // every managed Node is looked at again once it has.
        return Ok(Requeue::await_change());
    }
    let deleting = pass.node.metadata.deletion_timestamp.clone();
    if deleting.is_some() && !has_finalizer(&pass.node) {
        ctx.metrics.set_phase(&pass.uid, None);
        return Ok(Requeue::await_change());
    }
    if deleting.is_none() && !has_finalizer(&pass.node) {
        add_finalizer(pass, ctx).await?;
        tracing::info!("added finalizer");
    }
    // No Pending condition is written up front: a Node without the condition is Pending, a
    // failure records Pending with its reason, and a create writes Launching first — one
    // status write saved per Node.

    // Read the NodeClass and its provider.
    let class_name = pass.node.annotations().get(NODE_CLASS_ANNOTATION).cloned();
    let class = class_name
        .as_deref()
        .and_then(|n| ctx.node_class(n))
        .map(|c| c.as_ref().clone());
    let pid = provider_id(&pass.node).map(str::to_string);
    // Nothing can have been created while the phase never got past Pending: the Launching
    // condition is written before every create call.
    let never_launched = pid.is_none() && pass.phase.is_none_or(|p| p == MachinePhase::Pending);

    let class = match class {
        Some(c) => c,
        None => {
            if deleting.is_some() && never_launched {
                return finalize(pass, ctx, false).await;
            }
            // Taints still go on, so nothing schedules onto a Node without a machine.
            sync_labels_and_taints(pass, ctx, None, None, false).await?;
            let name = class_name.unwrap_or_default();
            if let Some(invalid) = ctx.invalid_classes.get(&name) {
                return Err(Error::NodeClassInvalid {
                    name,
                    message: invalid.to_string(),
                });
            }
            return Err(Error::NodeClassNotFound(name));
        }
    };
    let provider = match ctx.provider_for(&class, false).await {
        Ok(p) => p,
        Err(e) => {
            if deleting.is_some() && never_launched {
                return finalize(pass, ctx, false).await;
            }
            if deleting.is_none() {
                sync_labels_and_taints(pass, ctx, Some(&class), None, false).await?;
            }
            return Err(e);
        }
    };

    // A machine this process created whose providerID is not on the Node yet: recorded now
    // (this pass waited while other launches were in flight, see `turns`; a restart meanwhile
    // finds the machine by the idempotent create, or by its tag when the Node goes).
    if pid.is_some() {
        ctx.forget_launch(&pass.uid);
    } else if deleting.is_none()
        && let Some(instance) = ctx.launched_instance(&pass.uid)
    {
        // The token's Secret before the providerID: once a pass sees the providerID, the
        // machine's token exists.
        ensure_token_secret(pass, ctx, &class).await?;
        let want = wanted_meta(
            pass,
            Some(&class),
            Some(&instance),
            kubelet_ready(&pass.node),
        );
        record_machine(pass, ctx, &class, &instance, &want).await?;
        return Ok(Requeue::requeue(AFTER_RECORD));
    }

    // Observe the machine.
    let now = Timestamp::now();
    let launched_at: Option<Timestamp> = pass
        .node
        .annotations()
        .get(LAUNCHED_AT_ANNOTATION)
        .and_then(|s| s.parse().ok());
    let mut instance: Option<Instance> = None;
    let mut adopted_pid = None;
    let machine = match (&pid, deleting.is_some()) {
        (Some(p), _) => {
            if needs_get(
                pass,
                ctx,
                &class.name_any(),
                p,
                launched_at,
                deleting.is_some(),
            ) {
                match provider.get(p).await {
                    Ok(i) => {
                        let s = i.state;
                        instance = Some(i);
                        MachineObs::Present(s)
                    }
                    Err(ProviderError::NotFound(_)) => MachineObs::Gone,
                    Err(e) => return Err(e.into()),
                }
            } else {
                MachineObs::NotChecked
            }
        }
        (None, true) if never_launched => MachineObs::Gone,
        (None, true) if let Some(known) = ctx.launched_instance(&pass.uid) => {
            // This process made the machine and knows it: no list, whose lag could hide it.
            match provider.get(&known.provider_id).await {
                Ok(i) => {
                    let s = i.state;
                    adopted_pid = Some(i.provider_id.clone());
                    instance = Some(i);
                    MachineObs::Present(s)
                }
                Err(ProviderError::NotFound(_)) => MachineObs::Gone,
                Err(e) => return Err(e.into()),
            }
        }
        (None, true) => {
            // A create may have happened before the providerID write: find it by its tag.
            let filter = ListFilter {
                cluster: ctx.config.cluster_name.clone(),
                node_class: Some(class.name_any()),
            };
            let found = provider
                .list(&filter)
                .await?
                .into_iter()
                .find(|i| i.node_uid() == Some(pass.uid.as_str()));
            match found {
                Some(i) => {
                    let s = i.state;
                    adopted_pid = Some(i.provider_id.clone());
                    instance = Some(i);
                    MachineObs::Present(s)
                }
                None => MachineObs::Gone,
            }
        }
        (None, false) => MachineObs::NotChecked,
    };
    let machine_pid = pid.clone().or(adopted_pid);

    let cordoned = pass
        .node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let evictable = if deleting.is_some()
        && cordoned
        && matches!(machine, MachineObs::Present(s) if s != kube_node_provider::InstanceState::Terminating)
    {
        Some(pods_to_evict(ctx, &pass.name).await?)
    } else {
        None
    };
    let observed = Observed {
        has_finalizer: has_finalizer(&pass.node),
        deleting_since: deleting.as_ref().map(|t| t.0),
        has_provider_id: pid.is_some(),
        phase: pass.phase,
        kubelet_ready: kubelet_ready(&pass.node),
        machine,
        launched_at,
        registration_timeout: class.spec.registration_timeout(),
        drain_timeout: class.spec.drain_timeout(),
        cordoned,
        pods_to_evict: evictable.as_ref().map(Vec::len),
    };
    let action = plan::plan(&observed, now);
    tracing::debug!(?action, "planned");

    let mut want = None;
    if deleting.is_none() {
        // A NodeSet's template taints are the nodeset-controller's to set, at creation (as a
        // ReplicaSet's pod template is applied only at creation).
        let mut w = wanted_meta(
            pass,
            Some(&class),
            instance.as_ref(),
            observed.kubelet_ready,
        );
        if instance.is_none()
            && let Some(labels) = pid
                .as_deref()
                .and_then(|p| ctx.listed_labels(&class.name_any(), p))
        {
            // A Ready Node's machine is not looked up: its labels come from the last listing.
            w.machine_labels(&pass.node, &labels);
        }
        // The API server refused these very labels and taints: writing them again (and
        // creating again) would only be refused again. Wait for the input to change.
        let key = w.key();
        if let Some(message) = ctx.refused_write(&pass.uid, key) {
            return Err(Error::WriteRefused(message));
        }
        pass.want_key = Some(key);
        // A create and a MarkReady carry the labels and taints in their own Node write.
        if !matches!(action, Action::Create | Action::MarkReady) {
            apply_ops(pass, ctx, meta_ops(&pass.node, &w)).await?;
        }
        want = Some(w);
    }
    let creating = action == Action::Create;
    let result = act(
        pass,
        ctx,
        &class,
        provider.as_ref(),
        action,
        machine_pid,
        evictable.unwrap_or_default(),
        Step {
            want: want.clone().unwrap_or_default(),
            launched_at,
            now,
        },
    )
    .await;
    if creating
        && result.is_err()
        && let Some(w) = &want
    {
        // The create failed: the Node still gets its labels and taints (above all the
        // unregistered taint), so nothing schedules onto a Node without a machine.
        if let Err(e) = apply_ops(pass, ctx, meta_ops(&pass.node, w)).await {
            tracing::debug!(error = %e, "cannot apply labels and taints");
        }
    }
    result
}

/// What the action of a pass needs besides the plan.
struct Step {
    /// The labels and taints the Node should have.
    want: MetaWant,
    /// When the machine was created.
    launched_at: Option<Timestamp>,
    /// This pass's clock.
    now: Timestamp,
}

/// How long a running machine stays Launching before the condition says Registering: a
/// kubelet usually reports Ready within seconds of boot, and the extra status write is only
/// worth it when it does not.
const REGISTERING_AFTER: Duration = Duration::from_secs(10);

/// Whether this pass must ask the provider about the machine. Ready Nodes are checked against
/// the inventory the orphan collector refreshes with one list per class, so a resync of many
/// Ready Nodes costs no provider calls.
fn needs_get(
    pass: &Pass,
    ctx: &Context,
    class: &str,
    pid: &str,
    launched_at: Option<Timestamp>,
    deleting: bool,
) -> bool {
    if deleting {
        return true;
    }
    match pass.phase {
        Some(MachinePhase::Failed) => false,
        Some(MachinePhase::Ready) => {
            let Ok(inv) = ctx.inventory.lock() else {
                return false;
            };
            inv.get(class).is_some_and(|i| {
                // A listing older than the launch says nothing. A listing that lags behind a
                // create only costs one `get`, which decides.
                let fresh_enough = launched_at.is_none_or(|l| i.listed_at > l);
                fresh_enough && !i.provider_ids.contains(pid)
            })
        }
        _ => true,
    }
}

#[allow(clippy::too_many_arguments)]
async fn act(
    pass: &mut Pass,
    ctx: &Context,
    class: &NodeClass,
    provider: &dyn Provider,
    action: Action,
    machine_pid: Option<String>,
    evictable: Vec<Pod>,
    step: Step,
) -> Result<Requeue, Error> {
    let phase_before = pass.phase;
    let long = Requeue::requeue(RESYNC);
    match action {
        Action::Ignore => Ok(Requeue::await_change()),
        Action::AddFinalizer => Ok(Requeue::requeue(Duration::ZERO)),
        Action::Steady => {
            if pass.phase == Some(MachinePhase::Ready) {
                cleanup_tokens(pass, ctx).await?;
            }
            ctx.metrics.set_phase(&pass.uid, pass.phase);
            Ok(long)
        }
        Action::Create if provider.capabilities().group_sized => {
            refuse_group_backed(pass, ctx, class, &step.want).await
        }
        Action::Create => create(pass, ctx, class, provider, &step.want).await,
        Action::WaitForRegistration { phase, requeue } => {
            let since_launch = step
                .launched_at
                .map(|t| Duration::try_from(step.now.duration_since(t)).unwrap_or_default());
            if phase == MachinePhase::Registering
                && phase_before == Some(MachinePhase::Launching)
                && since_launch.is_some_and(|d| d < REGISTERING_AFTER)
            {
                // Still Launching as far as anyone can tell; look again soon.
                return Ok(Requeue::requeue(requeue));
            }
            let msg = match phase {
                MachinePhase::Launching => "the machine is booting",
                _ => "the machine runs; waiting for its kubelet to report Ready",
            };
            // The condition is the record: a routine transition writes no event.
            set_condition(pass, ctx, phase, msg).await?;
            Ok(Requeue::requeue(requeue))
        }
        Action::MarkReady => {
            // One Node write: the unregistered taint and the token annotation go together.
            let had_token = pass
                .node
                .annotations()
                .contains_key(BOOTSTRAP_TOKEN_ANNOTATION);
            if had_token {
                delete_tokens(ctx, &pass.node).await?;
            }
            let mut ops = meta_ops(&pass.node, &step.want);
            if had_token {
                ops.push(serde_json::json!({
                    "op": "remove",
                    "path": format!("/metadata/annotations/{}", escape(BOOTSTRAP_TOKEN_ANNOTATION)),
                }));
            }
            apply_ops(pass, ctx, ops).await?;
            set_condition(pass, ctx, MachinePhase::Ready, "the kubelet reported Ready").await?;
            // The condition says Registered ("the kubelet reported Ready"): no event.
            tracing::info!("node registered");
            if let Some(class) = pass.node.annotations().get(NODE_CLASS_ANNOTATION) {
                ctx.check_capacity_soon(class);
            }
            Ok(long)
        }
        Action::Fail { reason, message } => {
            // "Reason: text", as failures are written elsewhere, so a NodeSet (and
            // cluster-autoscaler) reports RegistrationTimeout rather than a generic failure.
            let message = format!("{reason}: {message}");
            set_condition(pass, ctx, MachinePhase::Failed, &message).await?;
            tracing::warn!(reason, "machine failed");
            event(ctx, &pass.node, EventType::Warning, reason, &message).await;
            Ok(long)
        }
        Action::Cordon => {
            // The condition says Deleting: no event.
            set_condition(pass, ctx, MachinePhase::Deleting, DELETING_MESSAGE).await?;
            let patch = serde_json::json!({"spec": {"unschedulable": true}});
            let written = node_api(ctx)
                .patch(&pass.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            pass.wrote(written);
            tracing::info!("node cordoned");
            Ok(Requeue::requeue(Duration::ZERO))
        }
        Action::Drain => {
            let (evicted, blocked) = drain(ctx, &evictable).await?;
            let msg = format!(
                "draining: {} pods left, {blocked} blocked by a PodDisruptionBudget",
                evictable.len().saturating_sub(evicted)
            );
            set_condition(pass, ctx, MachinePhase::Deleting, &msg).await?;
            tracing::info!(evicted, blocked, "evicted pods");
            Ok(Requeue::requeue(DRAIN_POLL))
        }
        Action::DeleteMachine { drain_timed_out } => {
            // The Deleting condition was written when the Node was cordoned; it is written here
            // only if that never happened (a Node cordoned by someone else), with the event.
            if pass.phase != Some(MachinePhase::Deleting) {
                set_condition(pass, ctx, MachinePhase::Deleting, DELETING_MESSAGE).await?;
            }
            if drain_timed_out {
                let msg = format!(
                    "drain did not finish within {}s; deleting the machine anyway",
                    class.spec.drain_timeout().as_secs()
                );
                event(ctx, &pass.node, EventType::Warning, "DrainTimeout", &msg).await;
                tracing::warn!("drain timed out");
            }
            let Some(pid) = machine_pid else {
                return finalize(pass, ctx, false).await;
            };
            match provider.as_group() {
                // A group's machine goes by name, lowering the group's size by one; never by a
                // plain delete, which the group would replace.
                Some(group) => {
                    let lock = ctx
                        .config
                        .groups
                        .as_ref()
                        .map(|g| g.lock(&class.name_any()));
                    let _held = match &lock {
                        Some(l) => Some(l.lock().await),
                        None => None,
                    };
                    group.delete_instances(std::slice::from_ref(&pid)).await?;
                }
                None => {
                    provider.delete(&pid).await?;
                }
            }
            tracing::info!(provider_id = %pid, "deleted machine");
            ctx.recount_pool(&class.name_any());
            Ok(Requeue::requeue(DELETE_POLL))
        }
        Action::WaitForGone => {
            if pass.phase != Some(MachinePhase::Deleting) {
                set_condition(pass, ctx, MachinePhase::Deleting, DELETING_MESSAGE).await?;
            }
            Ok(Requeue::requeue(DELETE_POLL))
        }
        Action::Finalize => finalize(pass, ctx, machine_pid.is_some()).await,
    }
}

/// A Node that names a group-backed NodeClass directly: its group makes the machines, so none
/// is made for it. Says so once (condition and Warning event) and waits for a change; the
/// Node still gets its labels and taints, so nothing schedules onto it.
async fn refuse_group_backed(
    pass: &mut Pass,
    ctx: &Context,
    class: &NodeClass,
    want: &MetaWant,
) -> Result<Requeue, Error> {
    let note = format!(
        "NodeClass {} is group-backed: scale a NodeSet instead",
        class.name_any()
    );
    let message = format!("{GROUP_BACKED_REASON}: {note}");
    apply_ops(pass, ctx, meta_ops(&pass.node, want)).await?;
    let told =
        machine_condition(&pass.node).is_some_and(|c| c.message.as_deref() == Some(&message));
    if !told {
        set_condition(pass, ctx, MachinePhase::Pending, &message).await?;
        event(
            ctx,
            &pass.node,
            EventType::Warning,
            GROUP_BACKED_REASON,
            &note,
        )
        .await;
        tracing::warn!(nodeclass = %class.name_any(), "refused a Node of a group-backed class");
    }
    Ok(Requeue::await_change())
}

/// Creates the machine (idempotent on the Node UID) and writes its providerID right away.
async fn create(
    pass: &mut Pass,
    ctx: &Context,
    class: &NodeClass,
    provider: &dyn Provider,
    want: &MetaWant,
) -> Result<Requeue, Error> {
    let launching = ctx.launching();
    let class_name = class.name_any();
    if class.metadata.deletion_timestamp.is_some() {
        // Its deletion waits for its Nodes; a new machine would make it wait longer.
        return Err(Error::NodeClassDeleting(class_name));
    }
    if let Some(c) = class
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, READY_CONDITION))
        && c.status == "False"
        && c.observed_generation == class.metadata.generation
    {
        return Err(Error::NodeClassNotReady {
            name: class_name,
            message: c.message.clone(),
        });
    }
    // Everything the join payload needs, before anything is created.
    let endpoint = class
        .spec
        .bootstrap
        .as_ref()
        .and_then(|b| b.api_server_endpoint.clone())
        .or_else(|| ctx.config.api_server_endpoint.clone())
        .ok_or(Error::NoApiServerEndpoint)?;
    // What this machine's launch waits for goes ahead of every bookkeeping write of the
    // controller (see `kube_node_runtime::urgent`): the CA (read once) and, for a Node made by
    // hand, its token's name. A NodeSet's Node needs no API call here.
    let (hash, token) = kube_node_runtime::urgent(async {
        let hash = ctx.ca_cert_hash().await?;
        let token = node_token(pass, ctx).await?;
        Ok::<_, Error>((hash, token))
    })
    .await?;
    let user_data = bootstrap::render_user_data(&JoinParams {
        node_name: &pass.name,
        api_server_endpoint: &endpoint,
        token: &token,
        ca_cert_hashes: &[hash],
    })
    .map_err(|e| Error::Render(e.to_string()))?;

    // From here on a machine may exist: the Launching phase tells a later deletion to look
    // for it by its tag even if the providerID write below never happens.
    // A NodeSet creates its Nodes with this very condition: then nothing is written here.
    kube_node_runtime::urgent(set_condition(
        pass,
        ctx,
        MachinePhase::Launching,
        LAUNCHING_MESSAGE,
    ))
    .await?;
    let mut tags_map = BTreeMap::from([
        (tags::CLUSTER.to_string(), ctx.config.cluster_name.clone()),
        (tags::NODE_NAME.to_string(), pass.name.clone()),
        (tags::NODE_UID.to_string(), pass.uid.clone()),
        (tags::NODE_CLASS.to_string(), class_name.clone()),
        (
            tags::MANAGED_BY.to_string(),
            tags::MANAGED_BY_VALUE.to_string(),
        ),
    ]);
    if let Some(ns) = nodeset_owner(&pass.node) {
        tags_map.insert(tags::NODESET.to_string(), ns);
    }
    let request = CreateRequest {
        idempotency_key: pass.uid.clone(),
        node_name: pass.name.clone(),
        tags: tags_map,
        user_data: Some(user_data),
    };
    let instance = provider.create(&request).await.map_err(|e| match e {
        // Which class ran out, in the message the Node records: a NodeSet moves the Node to
        // its next class on these, and must not count a failure of the old class against the
        // new one.
        ProviderError::InsufficientCapacity(m) => {
            ProviderError::InsufficientCapacity(format!("NodeClass {class_name}: {m}"))
        }
        ProviderError::QuotaExceeded(m) => {
            ProviderError::QuotaExceeded(format!("NodeClass {class_name}: {m}"))
        }
        e => e,
    })?;
    tracing::info!(provider_id = %instance.provider_id, "created machine");
    ctx.recount_pool(&class.name_any());
    ctx.metrics.set_phase(&pass.uid, pass.phase);
    drop(launching);
    ctx.remember_launch(&pass.uid, instance.clone());
    if let Some(left) = ctx.defer_bookkeeping(&pass.uid, &pass.name) {
        // Other machines wait for their create: the token's Secret and the providerID are
        // written by a later pass (see `turns`), and this turn goes to the next launch.
        return Ok(Requeue::requeue(left + WAKE_INTERVAL));
    }
    ensure_token_secret(pass, ctx, class).await?;
    let mut want = want.clone();
    want.labels.extend(instance_labels(&instance));
    want.machine_labels(&pass.node, &instance.labels);
    record_machine(pass, ctx, class, &instance, &want).await?;
    Ok(Requeue::requeue(Duration::from_millis(500)))
}

/// The look after a providerID was recorded (its watch event normally comes first).
const AFTER_RECORD: Duration = Duration::from_millis(500);
/// The safety net when a pass finds the cache behind the controller's own write: normally the
/// write's watch event comes first.
const STALE_RECHECK: Duration = Duration::from_secs(1);

/// Writes a created machine onto its Node in one write: providerID, the annotations, and the
/// class's, template's and instance's labels and taints. The providerID and the instance-id
/// annotation say where the machine is (`kubectl describe node`); the Launching condition
/// says what it does: no event.
async fn record_machine(
    pass: &mut Pass,
    ctx: &Context,
    class: &NodeClass,
    instance: &Instance,
    want: &MetaWant,
) -> Result<(), Error> {
    let launched = instance
        .created_unix
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or_else(Timestamp::now);
    let mut annotations = BTreeMap::from([
        (INSTANCE_ID_ANNOTATION.to_string(), instance.id.clone()),
        (LAUNCHED_AT_ANNOTATION.to_string(), launched.to_string()),
        (
            NODE_CLASS_GENERATION_ANNOTATION.to_string(),
            class.metadata.generation.unwrap_or_default().to_string(),
        ),
    ]);
    if let Some((token, _)) = ctx.cached_token(&pass.uid) {
        annotations.insert(BOOTSTRAP_TOKEN_ANNOTATION.to_string(), token.secret_name());
    }
    // The class the machine was made on (its tag), which the Node may no longer name: a
    // NodeSet moves a Node whose class ran out of capacity to its next class.
    let made_on = instance
        .tags
        .get(tags::NODE_CLASS)
        .cloned()
        .unwrap_or_else(|| class.name_any());
    let mut b = NodePatch::new(&pass.node);
    // Only while the Node still names that class.
    b.test_annotation(NODE_CLASS_ANNOTATION, &made_on);
    b.provider_id(&instance.provider_id);
    b.annotations(&annotations);
    b.meta(want);
    if let Err(e) = apply_ops(pass, ctx, b.into_ops()).await {
        let moved = node_api(ctx)
            .get_opt(&pass.name)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| n.annotations().get(NODE_CLASS_ANNOTATION) != Some(&made_on));
        if moved && let Some(old) = ctx.node_class(&made_on) {
            // The machine would be nobody's: the Node is made on its new class instead.
            tracing::info!(provider_id = %instance.provider_id, class = %made_on, "the Node moved to another NodeClass during the create; deleting the machine");
            ctx.forget_launch(&pass.uid);
            let provider = ctx.provider_for(&old, false).await?;
            provider.delete(&instance.provider_id).await?;
        }
        return Err(e);
    }
    ctx.metrics.set_phase(&pass.uid, pass.phase);
    Ok(())
}

/// The public id of the bootstrap token recorded on the Node, when it is one.
fn recorded_token_id(node: &Node) -> Option<&str> {
    node.annotations()
        .get(BOOTSTRAP_TOKEN_ANNOTATION)?
        .strip_prefix("bootstrap-token-")
}

/// The Node's bootstrap token, for the machine about to be launched: derived from the token
/// key, the Node's UID and the public id recorded on the Node (see [`BootstrapToken::derive`]).
/// Nothing is written for a NodeSet's Node, which carries an id from its create; a Node made
/// by hand gets one recorded first. Its Secret is made after the launch
/// ([`ensure_token_secret`]): kubeadm's discovery retries until the token works, and a
/// successor after a restart derives the very token the machine's user-data holds.
///
/// Tokens are never read back from the API: reading or listing Secrets in kube-system would
/// let kube-node read every Secret there, so its RBAC allows only create and delete. The token's
/// public half is recorded on the Node *before* its Secret can exist, so a successor deletes
/// it by name when the Node joins or goes. The secret half never leaves the Secret and the
/// machine's user-data.
async fn node_token(pass: &mut Pass, ctx: &Context) -> Result<BootstrapToken, Error> {
    let key = ctx.token_key().await?;
    let recorded = recorded_token_id(&pass.node).map(str::to_string);
    if let Some(token) = recorded
        .as_deref()
        .and_then(|id| BootstrapToken::derive(&key, id, &pass.uid))
    {
        // A Secret this process made for this token that is about to expire: the machine it
        // was made for is gone without joining, and the next one gets a fresh token.
        let expiring = ctx.cached_token(&pass.uid).is_some_and(|(t, expires)| {
            t.id == token.id
                && expires.duration_since(Timestamp::now()) <= jiff::SignedDuration::from_secs(300)
        });
        if !expiring {
            return Ok(token);
        }
        let api = Api::<Secret>::namespaced(ctx.client.clone(), bootstrap::TOKEN_NAMESPACE);
        delete_secret(&api, &token.secret_name()).await?;
        tracing::info!(secret = %token.secret_name(), "deleted an expiring bootstrap token");
        ctx.forget_token(&pass.uid);
    }
    // Recorded first: a restart after this write leaves a name to delete (a 404 then), never
    // a token nobody knows of.
    let id = BootstrapToken::generate_id();
    let patch = serde_json::json!({"metadata": {"annotations": {BOOTSTRAP_TOKEN_ANNOTATION: bootstrap::secret_name(&id)}}});
    let written = node_api(ctx)
        .patch(&pass.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    pass.wrote(written);
    BootstrapToken::derive(&key, &id, &pass.uid)
        .ok_or_else(|| Error::Render(format!("bootstrap token id {id:?} is malformed")))
}

/// The Secret of the token a launched machine joins with. Nothing is made when the Node
/// records no token, or when this process made it already. A Secret of that name that exists
/// already (409) is this very token, made before a restart: derived tokens are the same in
/// every process. (A kubelet Ready before this runs joined with a token made before a
/// restart, which this create finds; the Ready step deletes it.)
async fn ensure_token_secret(
    pass: &mut Pass,
    ctx: &Context,
    class: &NodeClass,
) -> Result<(), Error> {
    let Some(id) = recorded_token_id(&pass.node).map(str::to_string) else {
        return Ok(());
    };
    if ctx.cached_token(&pass.uid).is_some_and(|(t, _)| t.id == id) {
        return Ok(());
    }
    let key = ctx.token_key().await?;
    let Some(token) = BootstrapToken::derive(&key, &id, &pass.uid) else {
        return Ok(());
    };
    let now = Timestamp::now();
    let ttl = jiff::SignedDuration::try_from(class.spec.token_ttl())
        .unwrap_or(jiff::SignedDuration::from_secs(3600));
    let expiration = now.checked_add(ttl).unwrap_or(now);
    let api = Api::<Secret>::namespaced(ctx.client.clone(), bootstrap::TOKEN_NAMESPACE);
    let secret = bootstrap::token_secret(&token, &pass.name, &pass.uid, expiration);
    match kube_node_runtime::urgent(api.create(&PostParams::default(), &secret)).await {
        Ok(_) => tracing::info!(secret = %token.secret_name(), "created bootstrap token"),
        Err(kube::Error::Api(e)) if crate::error::is_conflict(&e) => {
            tracing::info!(secret = %token.secret_name(), "bootstrap token made before a restart");
        }
        Err(e) => return Err(e.into()),
    }
    ctx.cache_token(&pass.uid, token, expiration);
    Ok(())
}

/// Deletes a Secret in kube-system by name; a missing one is fine.
async fn delete_secret(api: &Api<Secret>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the Node's bootstrap token Secrets and the annotation naming them.
async fn cleanup_tokens(pass: &mut Pass, ctx: &Context) -> Result<(), Error> {
    if !pass
        .node
        .annotations()
        .contains_key(BOOTSTRAP_TOKEN_ANNOTATION)
    {
        return Ok(());
    }
    delete_tokens(ctx, &pass.node).await?;
    let patch =
        serde_json::json!({"metadata": {"annotations": {BOOTSTRAP_TOKEN_ANNOTATION: null}}});
    let written = node_api(ctx)
        .patch(&pass.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    pass.wrote(written);
    tracing::info!("deleted bootstrap token");
    Ok(())
}

/// Deletes the Node's bootstrap token Secrets by name: the one its annotation names and the
/// one this process created for it, if different.
async fn delete_tokens(ctx: &Context, node: &Node) -> Result<(), Error> {
    let api = Api::<Secret>::namespaced(ctx.client.clone(), bootstrap::TOKEN_NAMESPACE);
    let uid = node.uid().unwrap_or_default();
    let mut names: Vec<String> = node
        .annotations()
        .get(BOOTSTRAP_TOKEN_ANNOTATION)
        .filter(|n| n.starts_with("bootstrap-token-"))
        .cloned()
        .into_iter()
        .collect();
    if let Some((token, _)) = ctx.cached_token(&uid) {
        let name = token.secret_name();
        if !names.contains(&name) {
            names.push(name);
        }
    }
    for name in names {
        delete_secret(&api, &name).await?;
    }
    ctx.forget_token(&uid);
    Ok(())
}

/// The machine is gone (or never existed): delete the token, then let the Node go.
async fn finalize(pass: &mut Pass, ctx: &Context, had_machine: bool) -> Result<Requeue, Error> {
    delete_tokens(ctx, &pass.node).await?;
    ctx.forget_launch(&pass.uid);
    if had_machine {
        event(
            ctx,
            &pass.node,
            EventType::Normal,
            "MachineDeleted",
            "the machine is gone",
        )
        .await;
    }
    let finalizers = pass.node.finalizers();
    if let Some(i) = finalizers.iter().position(|f| f == MACHINE_FINALIZER) {
        let patch = json_patch(serde_json::json!([
            {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": MACHINE_FINALIZER},
            {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
        ]))?;
        node_api(ctx)
            .patch(
                &pass.name,
                &PatchParams::default(),
                &Patch::Json::<()>(patch),
            )
            .await?;
        // The Node is gone: no later pass needs to know what this one replaced.
        pass.superseded.clear();
        tracing::info!("removed finalizer");
    }
    ctx.metrics.set_phase(&pass.uid, None);
    Ok(Requeue::await_change())
}

async fn add_finalizer(pass: &mut Pass, ctx: &Context) -> Result<(), Error> {
    let rv = pass.node.resource_version().unwrap_or_default();
    let ops = if pass.node.metadata.finalizers.is_none() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers", "value": [MACHINE_FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers/-", "value": MACHINE_FINALIZER},
        ])
    };
    let written = node_api(ctx)
        .patch(
            &pass.name,
            &PatchParams::default(),
            &Patch::Json::<()>(json_patch(ops)?),
        )
        .await?;
    pass.wrote(written);
    Ok(())
}

fn json_patch(v: serde_json::Value) -> Result<json_patch::Patch, Error> {
    serde_json::from_value(v).map_err(|e| Error::Render(format!("json patch: {e}")))
}

fn node_api(ctx: &Context) -> Api<Node> {
    Api::all(ctx.client.clone())
}

impl MetaWant {
    /// A digest of what is wanted, to recognise the same input again.
    fn key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.labels.hash(&mut h);
        serde_json::to_string(&self.add_taints)
            .unwrap_or_default()
            .hash(&mut h);
        self.remove_unregistered.hash(&mut h);
        h.finish()
    }

    /// Adds the machine's own labels (`Instance::labels`, e.g. a bare-metal host's inventory
    /// labels): they win over the NodeClass's (they are the more specific), never over the
    /// node-class label. Those applied before and gone from the machine come off; the record
    /// goes in the same write.
    fn machine_labels(&mut self, node: &Node, labels: &BTreeMap<String, String>) {
        for (k, v) in labels {
            if k != NODE_CLASS_LABEL {
                self.labels.insert(k.clone(), v.clone());
            }
        }
        let m = MachineLabels::of(node, labels);
        self.dropped.labels.extend(m.dropped);
        if let Some((k, v)) = m.record {
            self.record.get_or_insert_with(BTreeMap::new).insert(k, v);
        }
    }
}

/// The labels and taints a Node should carry (it may carry more).
#[derive(Clone, Debug, Default)]
struct MetaWant {
    /// The NodeClass's labels, the node-class label, the instance's type and zone.
    labels: BTreeMap<String, String>,
    /// The NodeClass's taints, and the unregistered taint while the
    /// machine is being made.
    add_taints: Vec<Taint>,
    /// The kubelet reported Ready: the unregistered taint comes off.
    remove_unregistered: bool,
    /// Labels and taints kube-node applied from the NodeClass that it no longer lists.
    dropped: ClassMeta,
    /// The record of what is applied from the NodeClass now (annotations); `None` when the
    /// NodeClass is unknown, so nothing is recorded or removed.
    record: Option<BTreeMap<String, String>>,
}

fn instance_labels(i: &Instance) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    if let Some(t) = &i.instance_type {
        labels.insert("node.kubernetes.io/instance-type".to_string(), t.clone());
    }
    if let Some(z) = &i.zone {
        labels.insert("topology.kubernetes.io/zone".to_string(), z.clone());
    }
    labels
}

/// The NodeClass's labels and taints, the instance's type, zone and labels, and the unregistered taint
/// (present until the kubelet reports Ready; a Node that was Ready never gets it back).
fn wanted_meta(
    pass: &Pass,
    class: Option<&NodeClass>,
    instance: Option<&Instance>,
    kubelet_ready: bool,
) -> MetaWant {
    let mut labels = BTreeMap::new();
    if let Some(c) = class {
        labels.extend(c.spec.labels.clone());
        labels.insert(NODE_CLASS_LABEL.to_string(), c.name_any());
    }
    if let Some(i) = instance {
        labels.extend(instance_labels(i));
    }
    let mut add_taints: Vec<Taint> = class
        .map(|c| c.spec.taints.iter().map(|t| t.to_core()).collect())
        .unwrap_or_default();
    let provisioning = pass.phase.is_none_or(|p| {
        matches!(
            p,
            MachinePhase::Pending | MachinePhase::Launching | MachinePhase::Registering
        )
    });
    if !kubelet_ready && provisioning {
        add_taints.push(Taint {
            key: UNREGISTERED_TAINT.to_string(),
            value: None,
            effect: "NoExecute".to_string(),
            time_added: None,
        });
        add_taints.push(Taint {
            key: AUTOSCALER_UNREGISTERED_TAINT.to_string(),
            value: None,
            effect: AUTOSCALER_UNREGISTERED_TAINT_EFFECT.to_string(),
            time_added: None,
        });
    }
    // Only with the NodeClass at hand is it known what it no longer lists.
    let (dropped, record) = match class {
        Some(c) => {
            let now = ClassMeta::of_class(c);
            let dropped = ClassMeta::recorded(&pass.node)
                .map(|before| now.dropped_since(&before))
                .unwrap_or_default();
            (dropped, Some(now.annotations()))
        }
        None => (ClassMeta::default(), None),
    };
    let mut want = MetaWant {
        labels,
        add_taints,
        remove_unregistered: kubelet_ready,
        dropped,
        record,
    };
    if let Some(i) = instance {
        want.machine_labels(&pass.node, &i.labels);
    }
    want
}

/// The JSON patch operations that give `node` what `want` asks (none when it has it).
fn meta_ops(node: &Node, want: &MetaWant) -> Vec<serde_json::Value> {
    let mut b = NodePatch::new(node);
    b.meta(want);
    b.into_ops()
}

/// Sets the labels and taints when the pass stops early (no NodeClass, no provider).
async fn sync_labels_and_taints(
    pass: &mut Pass,
    ctx: &Context,
    class: Option<&NodeClass>,
    instance: Option<&Instance>,
    kubelet_ready: bool,
) -> Result<(), Error> {
    let want = wanted_meta(pass, class, instance, kubelet_ready);
    apply_ops(pass, ctx, meta_ops(&pass.node, &want)).await
}

/// A JSON pointer token.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Builds one JSON patch for a Node: several changes, one write. Map entries are added key by
/// key (a concurrent writer's other keys survive); the taint list is replaced under a `test`
/// of its current value (or of the resourceVersion when the Node has none), so a concurrent
/// taint change is retried, not overwritten.
struct NodePatch<'a> {
    node: &'a Node,
    ops: Vec<serde_json::Value>,
    spec: bool,
    labels: bool,
    annotations: bool,
}

/// The indices of `current` whose removal leaves exactly `want` (in order), when `want` is
/// `current` with some taints removed and none added or changed; `None` otherwise.
fn removed_indices(current: &[Taint], want: &[Taint]) -> Option<Vec<usize>> {
    if want.len() >= current.len() {
        return None;
    }
    let mut removed = Vec::with_capacity(current.len() - want.len());
    let mut w = want.iter().peekable();
    for (i, t) in current.iter().enumerate() {
        if w.peek() == Some(&t) {
            w.next();
        } else {
            removed.push(i);
        }
    }
    w.peek().is_none().then_some(removed)
}

impl<'a> NodePatch<'a> {
    fn new(node: &'a Node) -> Self {
        Self {
            node,
            ops: Vec::new(),
            spec: node.spec.is_some(),
            labels: node.metadata.labels.is_some(),
            annotations: node.metadata.annotations.is_some(),
        }
    }

    fn into_ops(self) -> Vec<serde_json::Value> {
        self.ops
    }

    fn ensure_spec(&mut self) {
        if !self.spec {
            self.ops
                .push(serde_json::json!({"op": "add", "path": "/spec", "value": {}}));
            self.spec = true;
        }
    }

    fn test_annotation(&mut self, key: &str, value: &str) {
        self.ops.push(serde_json::json!({
            "op": "test",
            "path": format!("/metadata/annotations/{}", escape(key)),
            "value": value,
        }));
    }

    fn provider_id(&mut self, pid: &str) {
        self.ensure_spec();
        self.ops
            .push(serde_json::json!({"op": "add", "path": "/spec/providerID", "value": pid}));
    }

    fn map_entries(
        ops: &mut Vec<serde_json::Value>,
        exists: &mut bool,
        path: &str,
        current: &BTreeMap<String, String>,
        want: &BTreeMap<String, String>,
    ) {
        let missing: BTreeMap<&String, &String> = want
            .iter()
            .filter(|(k, v)| current.get(*k) != Some(*v))
            .collect();
        if missing.is_empty() {
            return;
        }
        if *exists {
            for (k, v) in missing {
                ops.push(serde_json::json!({"op": "add", "path": format!("{path}/{}", escape(k)), "value": v}));
            }
        } else {
            ops.push(serde_json::json!({"op": "add", "path": path, "value": missing}));
            *exists = true;
        }
    }

    fn labels(&mut self, want: &BTreeMap<String, String>) {
        Self::map_entries(
            &mut self.ops,
            &mut self.labels,
            "/metadata/labels",
            self.node.labels(),
            want,
        );
    }

    fn annotations(&mut self, want: &BTreeMap<String, String>) {
        Self::map_entries(
            &mut self.ops,
            &mut self.annotations,
            "/metadata/annotations",
            self.node.annotations(),
            want,
        );
    }

    /// Removes labels kube-node applied and no longer wants (never one it still sets).
    fn remove_labels(&mut self, keys: &BTreeSet<String>, keep: &BTreeMap<String, String>) {
        for k in keys {
            if self.node.labels().contains_key(k) && !keep.contains_key(k) {
                self.ops.push(serde_json::json!({"op": "remove", "path": format!("/metadata/labels/{}", escape(k))}));
            }
        }
    }

    fn taints(
        &mut self,
        add: &[Taint],
        remove_unregistered: bool,
        dropped: &BTreeSet<(String, String)>,
    ) {
        let current = self.node.spec.as_ref().and_then(|s| s.taints.clone());
        let mut want = current.clone().unwrap_or_default();
        if remove_unregistered {
            want.retain(|t| t.key != UNREGISTERED_TAINT);
        }
        want.retain(|t| {
            !dropped.contains(&(t.key.clone(), t.effect.clone()))
                || add.iter().any(|a| a.key == t.key && a.effect == t.effect)
        });
        for t in add {
            if !want.iter().any(|w| w.key == t.key && w.effect == t.effect) {
                want.push(t.clone());
            }
        }
        // The autoscaler's marker never outlives the unregistered taint: left alone, it
        // would make cluster-autoscaler count a serving Node as not started, then unready.
        if !want.iter().any(|t| t.key == UNREGISTERED_TAINT) {
            want.retain(|t| t.key != AUTOSCALER_UNREGISTERED_TAINT);
        }
        if want == current.clone().unwrap_or_default() {
            return;
        }
        match current {
            Some(cur) if removed_indices(&cur, &want).is_some() => {
                // Only removals (the unregistered taints at Ready): each by its index, guarded
                // by a test of that very taint. kube-controller-manager adds and removes its
                // own taints (not-ready, unreachable) at the same moments, after ours in the
                // list, so a test of the whole list failed on its change and cost a re-read
                // and a second patch; this one fails only if our taint itself moved.
                for i in removed_indices(&cur, &want)
                    .unwrap_or_default()
                    .into_iter()
                    .rev()
                {
                    self.ops.push(serde_json::json!({"op": "test", "path": format!("/spec/taints/{i}"), "value": cur[i]}));
                    self.ops.push(
                        serde_json::json!({"op": "remove", "path": format!("/spec/taints/{i}")}),
                    );
                }
            }
            Some(cur) => {
                self.ops
                    .push(serde_json::json!({"op": "test", "path": "/spec/taints", "value": cur}));
                self.ops.push(
                    serde_json::json!({"op": "replace", "path": "/spec/taints", "value": want}),
                );
            }
            None => {
                let rv = self.node.resource_version().unwrap_or_default();
                self.ops.insert(
                    0,
                    serde_json::json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}),
                );
                self.ensure_spec();
                self.ops
                    .push(serde_json::json!({"op": "add", "path": "/spec/taints", "value": want}));
            }
        }
    }

    fn meta(&mut self, want: &MetaWant) {
        self.labels(&want.labels);
        self.remove_labels(&want.dropped.labels, &want.labels);
        self.taints(
            &want.add_taints,
            want.remove_unregistered,
            &want.dropped.taints,
        );
        if let Some(record) = &want.record {
            // In the same write as the labels and taints it describes.
            self.annotations(record);
        }
    }
}

/// Sends the operations as one JSON patch (nothing when there are none).
async fn apply_ops(
    pass: &mut Pass,
    ctx: &Context,
    ops: Vec<serde_json::Value>,
) -> Result<(), Error> {
    if ops.is_empty() {
        return Ok(());
    }
    let patch = json_patch(serde_json::Value::Array(ops))?;
    let written = node_api(ctx)
        .patch(
            &pass.name,
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await?;
    pass.wrote(written);
    Ok(())
}

/// Writes the MachineReady condition (strategic merge keyed on `type`, so the kubelet's own
/// conditions are untouched), unless nothing but time would change.
async fn set_condition(
    pass: &mut Pass,
    ctx: &Context,
    phase: MachinePhase,
    message: &str,
) -> Result<(), Error> {
    let status = if phase == MachinePhase::Ready {
        "True"
    } else {
        "False"
    };
    let existing = machine_condition(&pass.node);
    if let Some(c) = existing
        && c.status == status
        && c.reason.as_deref() == Some(phase.as_str())
        && c.message.as_deref() == Some(message)
    {
        pass.phase = Some(phase);
        return Ok(());
    }
    let now = Time(Timestamp::now());
    let transition = existing
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    let cond = NodeCondition {
        type_: MACHINE_READY_CONDITION.to_string(),
        status: status.to_string(),
        reason: Some(phase.as_str().to_string()),
        message: Some(message.to_string()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(transition),
    };
    let patch = condition_patch(&pass.node, phase, cond, &now);
    let written = node_api(ctx)
        .patch_status(
            &pass.name,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await?;
    pass.wrote(written);
    pass.phase = Some(phase);
    ctx.metrics.set_phase(&pass.uid, Some(phase));
    Ok(())
}

/// The `nodes/status` strategic-merge patch writing `cond` (merged by `type`, so the kubelet's
/// conditions are untouched). Before the first machine call no kubelet can have posted yet: a
/// Node without a Ready condition gets `Ready=Unknown` in the same write (see
/// `kube_node_runtime::node_status`). Later phases never touch Ready: it is the kubelet's.
pub(crate) fn condition_patch(
    node: &Node,
    phase: MachinePhase,
    cond: NodeCondition,
    now: &Time,
) -> serde_json::Value {
    if phase == MachinePhase::Launching
        && !kube_node_runtime::node_status::has_ready_condition(node)
    {
        let ready = kube_node_runtime::node_status::kubelet_not_started(now);
        serde_json::json!({"status": {"conditions": [cond, ready]}})
    } else {
        serde_json::json!({"status": {"conditions": [cond]}})
    }
}

/// Queues an event on the best-effort path: the pass never waits for it (see
/// [`kube_node_runtime::EventSink`]).
async fn event(ctx: &Context, node: &Node, type_: EventType, reason: &str, note: &str) {
    ctx.events
        .publish(node.object_ref(&()), type_, reason, note);
}

/// Pods the drain must evict: not DaemonSet-owned, not mirror pods, not already terminating
/// or finished.
async fn pods_to_evict(ctx: &Context, node: &str) -> Result<Vec<Pod>, Error> {
    let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
    let pods = Api::<Pod>::all(ctx.client.clone()).list(&lp).await?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .filter(|p| !p.owner_references().iter().any(|o| o.kind == "DaemonSet"))
        .filter(|p| !p.annotations().contains_key("kubernetes.io/config.mirror"))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect())
}

/// Evicts each pod; a 429 means a PodDisruptionBudget blocks it for now.
async fn drain(ctx: &Context, pods: &[Pod]) -> Result<(usize, usize), Error> {
    let mut evicted = 0;
    let mut blocked = 0;
    for p in pods {
        let ns = p.namespace().unwrap_or_else(|| "default".to_string());
        match Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .evict(&p.name_any(), &EvictParams::default())
            .await
        {
            Ok(_) => evicted += 1,
            Err(kube::Error::Api(e)) if e.code == 429 => blocked += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => evicted += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok((evicted, blocked))
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
