//! The NodeClass controller: builds each class's provider, validates it once per generation
//! and credentials version, and reports the result in the NodeClass `Ready` condition; compares
//! the declared allocatable with what the class's registered Nodes report ([`crate::capacity`])
//! and reports that in the `CapacityMatches` condition. It also protects a NodeClass in use
//! from deletion (see [`crate::protection`]).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{
    CAPACITY_CONDITION, CAPACITY_MATCHES_REASON, CAPACITY_MISMATCH_REASON, FIELD_MANAGER,
    IN_USE_CONDITION, NODE_CLASS_LABEL, NODECLASS_IN_USE_FINALIZER, READY_CONDITION,
};
use kube_node_crds::v1alpha1::find_condition;

use tracing::Instrument;

use crate::protection::{self, Step};
use crate::{Context, Error};

/// How often a NodeClass is looked at again (re-reads its credentials Secret, which is not
/// watched).
const RESYNC: Duration = Duration::from_secs(120);

/// How often a NodeClass being deleted counts its Nodes again (from the cache: no API call
/// unless the count changed).
const DELETION_POLL: Duration = Duration::from_secs(2);

/// How many Nodes of a class one pass compares: machines of a class are alike, so a sample
/// finds a wrong declaration, and a class of thousands of Nodes costs one small list per
/// resync, not a full one.
const CAPACITY_SAMPLE: u32 = 100;

/// A condition to write: status, reason, message.
type Verdict = (&'static str, &'static str, String);

pub(crate) async fn reconcile(nc: Arc<NodeClass>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", nodeclass = %nc.name_any());
    reconcile_inner(nc, ctx).instrument(span).await
}

async fn reconcile_inner(nc: Arc<NodeClass>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let name = nc.name_any();
    if !ctx.synced.load(std::sync::atomic::Ordering::Acquire) {
        // Counting Nodes from a cache that has not listed yet would find none.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let in_use = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| protection::uses(n, &name))
        .count();
    let deleting = nc.metadata.deletion_timestamp.is_some();
    match protection::step(deleting, protection::has_finalizer(&nc), in_use) {
        Step::AddFinalizer => add_finalizer(&ctx, &nc).await?,
        Step::Release => {
            remove_finalizer(&ctx, &nc).await?;
            ctx.forget_provider(&name);
            tracing::info!("released nodeclass: no Node uses it");
            return Ok(Action::await_change());
        }
        Step::Keep => {}
    }
    let in_use_cond = protection::in_use_condition(deleting, in_use);
    if deleting {
        // Its Nodes' machines are deleted through it: keep the provider and the Ready
        // condition as they are, say what the deletion waits for.
        let ready = nc
            .status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, READY_CONDITION))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        let ready = ready
            .as_ref()
            .map(|(s, r, m)| (s.as_str(), r.as_str(), m.as_str()));
        let free = nc.status.as_ref().and_then(|s| s.free_machines);
        let changed = write_status(&ctx, &nc, ready, None, borrow(&in_use_cond), free).await?;
        if changed && in_use > 0 {
            tracing::info!(nodes = in_use, "nodeclass deletion waits for its nodes");
            event(&ctx, &nc, "DeletionWaiting", &in_use_cond.2).await;
        }
        return Ok(Action::requeue(DELETION_POLL));
    }
    // A fixed pool's free machines (bare-metal hosts), counted on every pass; a failed count
    // keeps the last one.
    let mut free = nc.status.as_ref().and_then(|s| s.free_machines);
    let result = match ctx.provider_for(&nc, true).await {
        Ok(provider) => {
            match provider.free_capacity().await {
                Ok(f) => free = f.map(|f| i32::try_from(f).unwrap_or(i32::MAX)),
                Err(e) => tracing::debug!(error = %e, "cannot count free machines"),
            }
            match ctx.validation(&name) {
                Some(r) => r.map_err(Error::from),
                None => {
                    let r = provider.validate().await;
                    // A passing failure says nothing about the configuration: ask again next time.
                    if r.as_ref().err().is_none_or(|e| !e.is_retryable()) {
                        ctx.set_validation(&name, r.clone());
                    }
                    r.map_err(Error::from)
                }
            }
        }
        Err(e) => Err(e),
    };
    let (status, reason, message) = match (&result, ctx.rejected_write(&nc)) {
        (Ok(()), None) => (
            "True",
            "Validated",
            "the provider accepted the configuration".to_string(),
        ),
        (Ok(()), Some(refused)) => ("False", NODE_WRITE_REFUSED, refused_message(&refused)),
        (Err(e), _) => ("False", e.reason(), e.to_string()),
    };
    // A failed look at the Nodes keeps the last verdict: it must not fail the Ready condition.
    let capacity = match observe_capacity(&ctx, &nc).await {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list the nodeclass's nodes");
            None
        }
    };
    let ready = Some((status, reason, message.as_str()));
    let written = write_status(
        &ctx,
        &nc,
        ready,
        capacity.as_ref().map(borrow),
        borrow(&in_use_cond),
        free,
    )
    .await;
    if let Err(e) = written {
        ctx.metrics.reconciled(
            "nodeclass",
            started.elapsed().as_secs_f64(),
            Some(e.reason()),
        );
        return Err(e);
    }
    if let Some(v) = &capacity {
        capacity_event(&ctx, &nc, v).await;
    }
    match &result {
        Ok(()) => tracing::debug!("validated nodeclass"),
        Err(e) => tracing::info!(reason = e.reason(), error = %e, "nodeclass not ready"),
    }
    ctx.metrics.reconciled(
        "nodeclass",
        started.elapsed().as_secs_f64(),
        result.as_ref().err().map(Error::reason),
    );
    // A fixed pool is counted again soon: its count is the autoscaler's max size.
    Ok(Action::requeue(if free.is_some() {
        POOL_RESYNC
    } else {
        RESYNC
    }))
}

/// How often a class with a fixed pool recounts its free machines (besides the recount each
/// create and delete of its machines asks for).
const POOL_RESYNC: Duration = Duration::from_secs(15);

/// The Ready reason of a NodeClass whose labels or taints the API server refused on a Node.
const NODE_WRITE_REFUSED: &str = "NodeWriteRefused";

fn refused_message(api_message: &str) -> String {
    format!(
        "the API server refused a Node write carrying this class's labels or taints: {api_message}"
    )
}

/// Puts a refused Node write (422) on the NodeClass's Ready condition at once; the next
/// reconcile of the class keeps it there until the class's generation changes.
pub(crate) async fn report_rejected_write(ctx: &Context, nc: &NodeClass) -> Result<(), Error> {
    let Some(refused) = ctx.rejected_write(nc) else {
        return Ok(());
    };
    let message = refused_message(&refused);
    let ready = ("False", NODE_WRITE_REFUSED, message.as_str());
    // The conditions list is applied whole: the InUse condition goes along, as it stands.
    let name = nc.name_any();
    let in_use = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| protection::uses(n, &name))
        .count();
    let in_use = protection::in_use_condition(nc.metadata.deletion_timestamp.is_some(), in_use);
    let free = nc.status.as_ref().and_then(|s| s.free_machines);
    write_status(ctx, nc, Some(ready), None, borrow(&in_use), free).await?;
    Ok(())
}

pub(crate) fn error_policy(nc: Arc<NodeClass>, err: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.next_attempt(&format!("nodeclass/{}", nc.name_any()));
    Action::requeue(ctx.backoff.delay(attempt, err.retry_after()))
}

/// The `CapacityMatches` verdict from the class's registered Nodes (a sample of them); `None`
/// when none is registered and Ready yet, which leaves the last verdict standing.
async fn observe_capacity(ctx: &Context, nc: &NodeClass) -> Result<Option<Verdict>, kube::Error> {
    if nc.spec.allocatable_or_capacity().is_empty() {
        return Ok(None);
    }
    let selector = format!("{NODE_CLASS_LABEL}={}", nc.name_any());
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(
            &ListParams::default()
                .labels(&selector)
                .limit(CAPACITY_SAMPLE),
        )
        .await?;
    Ok(capacity_verdict(nc, &nodes.items))
}

/// Pure: the `CapacityMatches` verdict for a class from its Nodes. Only Nodes whose kubelet
/// is Ready (and that are not being deleted) count: before that a Node reports nothing.
pub(crate) fn capacity_verdict(nc: &NodeClass, nodes: &[Node]) -> Option<Verdict> {
    let declared = nc.spec.allocatable_or_capacity();
    if declared.is_empty() {
        return None;
    }
    let field = if nc.spec.allocatable.is_some() {
        "allocatable"
    } else {
        "capacity"
    };
    let mut compared = 0usize;
    let mut differing = 0usize;
    let mut first: Option<(String, Vec<crate::capacity::Mismatch>)> = None;
    for node in nodes {
        if node.metadata.deletion_timestamp.is_some() || !crate::node::kubelet_ready(node) {
            continue;
        }
        let Some(allocatable) = node.status.as_ref().and_then(|s| s.allocatable.as_ref()) else {
            continue;
        };
        compared += 1;
        let mismatches = crate::capacity::compare(declared, allocatable);
        if !mismatches.is_empty() {
            differing += 1;
            if first.is_none() {
                first = Some((node.name_any(), mismatches));
            }
        }
    }
    if compared == 0 {
        return None;
    }
    Some(match first {
        None => (
            "True",
            CAPACITY_MATCHES_REASON,
            format!("the allocatable of {compared} registered Node(s) matches spec.{field}"),
        ),
        Some((node, mismatches)) => {
            let what: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
            (
                "False",
                CAPACITY_MISMATCH_REASON,
                format!(
                    "Node {node} reports {}; {differing} of {compared} registered Node(s) \
                     differ from spec.{field}, which cluster-autoscaler's scale-from-zero \
                     template advertises: correct spec.{field}",
                    what.join(", ")
                ),
            )
        }
    })
}

/// A Warning event when the verdict turns (or first is) a mismatch, a Normal one when a
/// mismatch clears; nothing while it stays the same.
async fn capacity_event(ctx: &Context, nc: &NodeClass, verdict: &Verdict) {
    let before = nc
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, CAPACITY_CONDITION))
        .map(|c| c.status.as_str());
    let (type_, reason) = match (before, verdict.0) {
        (Some("False"), "False") | (None | Some("True" | "Unknown"), "True") => return,
        (_, "False") => (EventType::Warning, CAPACITY_MISMATCH_REASON),
        _ => (EventType::Normal, CAPACITY_MATCHES_REASON),
    };
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(verdict.2.clone()),
        action: "CompareCapacity".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &nc.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish event");
    }
}

/// A condition's status, reason and message, borrowed.
type Parts<'a> = (&'a str, &'a str, &'a str);

fn borrow(v: &Verdict) -> Parts<'_> {
    (v.0, v.1, v.2.as_str())
}

/// The condition to write, keeping `lastTransitionTime` unless the status flips.
fn condition(
    existing: Option<&Condition>,
    type_: &str,
    (status, reason, message): Parts<'_>,
    generation: Option<i64>,
) -> Condition {
    let transition = existing.filter(|c| c.status == status).map_or_else(
        || Time(jiff::Timestamp::now()),
        |c| c.last_transition_time.clone(),
    );
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: transition,
    }
}

fn same(existing: Option<&Condition>, want: &Condition) -> bool {
    existing.is_some_and(|c| {
        c.status == want.status
            && c.reason == want.reason
            && c.message == want.message
            && c.observed_generation == want.observed_generation
    })
}

/// Writes `status.observedGeneration`, the Ready condition (kept as it is when `ready` is
/// `None`), the `CapacityMatches` condition (kept as it is when `capacity` is `None`) and the
/// `InUse` condition by server-side apply, in one write, unless nothing but time would change.
/// They go together: `conditions` is an atomic list, so applying one alone would drop the
/// others. Returns whether it wrote.
async fn write_status(
    ctx: &Context,
    nc: &NodeClass,
    ready: Option<Parts<'_>>,
    capacity: Option<Parts<'_>>,
    in_use: Parts<'_>,
    free_machines: Option<i32>,
) -> Result<bool, Error> {
    let generation = nc.metadata.generation;
    let current = nc.status.as_ref();
    let existing = |t: &str| current.and_then(|s| find_condition(&s.conditions, t));
    let mut wanted = Vec::new();
    let mut kept = Vec::new();
    for (type_, parts) in [
        (READY_CONDITION, ready),
        (CAPACITY_CONDITION, capacity),
        (IN_USE_CONDITION, Some(in_use)),
    ] {
        match parts {
            Some(p) => wanted.push(condition(existing(type_), type_, p, generation)),
            None => kept.extend(existing(type_).cloned()),
        }
    }
    if wanted.iter().all(|c| same(existing(&c.type_), c))
        && current.and_then(|s| s.observed_generation) == generation
        && current.and_then(|s| s.free_machines) == free_machines
    {
        return Ok(false);
    }
    let mut conditions = wanted;
    conditions.extend(kept);
    let patch = serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1",
        "kind": "NodeClass",
        "status": {
            "observedGeneration": generation,
            "conditions": conditions,
            "freeMachines": free_machines,
        },
    });
    Api::<NodeClass>::all(ctx.client.clone())
        .patch_status(
            &nc.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(true)
}

/// Adds the in-use finalizer, under a test of the resourceVersion it was decided on.
async fn add_finalizer(ctx: &Context, nc: &NodeClass) -> Result<(), Error> {
    let rv = nc.resource_version().unwrap_or_default();
    let ops = if nc.metadata.finalizers.is_none() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers", "value": [NODECLASS_IN_USE_FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers/-", "value": NODECLASS_IN_USE_FINALIZER},
        ])
    };
    patch_json(ctx, nc, ops).await
}

/// Removes the in-use finalizer, testing it is still at the index it was found at.
async fn remove_finalizer(ctx: &Context, nc: &NodeClass) -> Result<(), Error> {
    let Some(i) = nc
        .finalizers()
        .iter()
        .position(|f| f == NODECLASS_IN_USE_FINALIZER)
    else {
        return Ok(());
    };
    let ops = serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": NODECLASS_IN_USE_FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]);
    patch_json(ctx, nc, ops).await
}

async fn patch_json(ctx: &Context, nc: &NodeClass, ops: serde_json::Value) -> Result<(), Error> {
    let patch: json_patch::Patch =
        serde_json::from_value(ops).map_err(|e| Error::Render(format!("json patch: {e}")))?;
    Api::<NodeClass>::all(ctx.client.clone())
        .patch(
            &nc.name_any(),
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await?;
    Ok(())
}

async fn event(ctx: &Context, nc: &NodeClass, reason: &str, note: &str) {
    let ev = Event {
        type_: EventType::Normal,
        reason: reason.to_string(),
        note: Some(note.to_string()),
        action: "ProtectInUse".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &nc.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::collections::BTreeMap;

    fn class(allocatable: &[(&str, &str)]) -> NodeClass {
        let spec = serde_json::json!({
            "provider": {"type": "simulated", "simulated": {}},
            "capacity": {"cpu": "4", "memory": "16Gi"},
            "allocatable": allocatable.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect::<BTreeMap<_, _>>(),
        });
        NodeClass::new("c", serde_json::from_value(spec).expect("spec"))
    }

    fn node(name: &str, ready: bool, allocatable: &[(&str, &str)]) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.status = Some(NodeStatus {
            allocatable: Some(
                allocatable
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), Quantity((*v).to_string())))
                    .collect(),
            ),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        n
    }

    #[test]
    fn no_registered_node_no_verdict() {
        let c = class(&[("cpu", "3900m")]);
        assert_eq!(capacity_verdict(&c, &[]), None);
        assert_eq!(
            capacity_verdict(&c, &[node("a", false, &[("cpu", "1")])]),
            None
        );
    }

    #[test]
    fn matching_and_mismatching_nodes() {
        let c = class(&[("cpu", "3900m"), ("memory", "15Gi")]);
        let ok = node("a", true, &[("cpu", "3900m"), ("memory", "15200Mi")]);
        let v = capacity_verdict(&c, std::slice::from_ref(&ok)).expect("verdict");
        assert_eq!((v.0, v.1), ("True", CAPACITY_MATCHES_REASON));
        assert!(v.2.contains("1 registered Node(s)"), "{}", v.2);
        let bad = node("b", true, &[("cpu", "3900m"), ("memory", "7Gi")]);
        let v = capacity_verdict(&c, &[ok, bad]).expect("verdict");
        assert_eq!((v.0, v.1), ("False", CAPACITY_MISMATCH_REASON));
        assert!(
            v.2.contains("Node b reports memory allocatable 7Gi (declared 15Gi)"),
            "{}",
            v.2
        );
        assert!(v.2.contains("1 of 2"), "{}", v.2);
        assert!(v.2.contains("spec.allocatable"), "{}", v.2);
    }

    #[test]
    fn capacity_is_the_declaration_without_allocatable() {
        let mut c = class(&[]);
        c.spec.allocatable = None;
        let v = capacity_verdict(&c, &[node("a", true, &[("cpu", "2"), ("memory", "16Gi")])])
            .expect("verdict");
        assert_eq!(v.0, "False");
        assert!(v.2.contains("cpu allocatable 2 (declared 4)"), "{}", v.2);
        assert!(v.2.contains("spec.capacity"), "{}", v.2);
    }
}
