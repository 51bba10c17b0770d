//! The NodeClass controller: builds each class's provider, validates it once per generation
//! and credentials version, and reports the result in the NodeClass `Ready` condition. It also
//! protects a NodeClass in use from deletion (see [`crate::protection`]).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{
    FIELD_MANAGER, IN_USE_CONDITION, NODECLASS_IN_USE_FINALIZER, READY_CONDITION,
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
        let changed = write_conditions(&ctx, &nc, ready, in_use_cond.clone()).await?;
        if changed && in_use > 0 {
            tracing::info!(nodes = in_use, "nodeclass deletion waits for its nodes");
            event(&ctx, &nc, "DeletionWaiting", &in_use_cond.2).await;
        }
        return Ok(Action::requeue(DELETION_POLL));
    }
    let result = match ctx.provider_for(&nc, true).await {
        Ok(provider) => match ctx.validation(&name) {
            Some(r) => r.map_err(Error::from),
            None => {
                let r = provider.validate().await;
                // A passing failure says nothing about the configuration: ask again next time.
                if r.as_ref().err().is_none_or(|e| !e.is_retryable()) {
                    ctx.set_validation(&name, r.clone());
                }
                r.map_err(Error::from)
            }
        },
        Err(e) => Err(e),
    };
    let (status, reason, message) = match &result {
        Ok(()) => (
            "True",
            "Validated",
            "the provider accepted the configuration".to_string(),
        ),
        Err(e) => ("False", e.reason(), e.to_string()),
    };
    let ready = Some((status.to_string(), reason.to_string(), message.clone()));
    if let Err(e) = write_conditions(&ctx, &nc, ready, in_use_cond).await {
        ctx.metrics.reconciled(
            "nodeclass",
            started.elapsed().as_secs_f64(),
            Some(e.reason()),
        );
        return Err(e);
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
    Ok(Action::requeue(RESYNC))
}

pub(crate) fn error_policy(nc: Arc<NodeClass>, err: &Error, ctx: Arc<Context>) -> Action {
    let attempt = ctx.next_attempt(&format!("nodeclass/{}", nc.name_any()));
    Action::requeue(ctx.backoff.delay(attempt, err.retry_after()))
}

/// A condition's (status, reason, message).
type CondParts = (String, String, String);

fn condition(
    existing: Option<&Condition>,
    type_: &str,
    (status, reason, message): (&str, &str, &str),
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

/// Writes `status.observedGeneration`, the Ready condition (when known) and the InUse
/// condition in one server-side apply — the conditions list is applied whole — unless
/// nothing but time would change. Returns whether it wrote.
async fn write_conditions(
    ctx: &Context,
    nc: &NodeClass,
    ready: Option<CondParts>,
    in_use: (&str, &str, String),
) -> Result<bool, Error> {
    let generation = nc.metadata.generation;
    let current = nc.status.as_ref();
    let existing = |t: &str| current.and_then(|s| find_condition(&s.conditions, t));
    let mut conditions = Vec::new();
    if let Some((status, reason, message)) = &ready {
        conditions.push(condition(
            existing(READY_CONDITION),
            READY_CONDITION,
            (status, reason, message),
            generation,
        ));
    }
    conditions.push(condition(
        existing(IN_USE_CONDITION),
        IN_USE_CONDITION,
        (in_use.0, in_use.1, &in_use.2),
        generation,
    ));
    if conditions.iter().all(|c| same(existing(&c.type_), c))
        && current.and_then(|s| s.observed_generation) == generation
    {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1",
        "kind": "NodeClass",
        "status": { "observedGeneration": generation, "conditions": conditions },
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
