//! The NodeClass controller: builds each class's provider, validates it once per generation
//! and credentials version, and reports the result in the NodeClass `Ready` condition.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{FIELD_MANAGER, READY_CONDITION};
use kube_node_crds::v1alpha1::find_condition;

use tracing::Instrument;

use crate::{Context, Error};

/// How often a NodeClass is looked at again (re-reads its credentials Secret, which is not
/// watched).
const RESYNC: Duration = Duration::from_secs(120);

pub(crate) async fn reconcile(nc: Arc<NodeClass>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", nodeclass = %nc.name_any());
    reconcile_inner(nc, ctx).instrument(span).await
}

async fn reconcile_inner(nc: Arc<NodeClass>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let name = nc.name_any();
    if nc.metadata.deletion_timestamp.is_some() {
        ctx.forget_provider(&name);
        return Ok(Action::await_change());
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
    if let Err(e) = write_ready(&ctx, &nc, status, reason, &message).await {
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

/// Writes `status.observedGeneration` and the Ready condition by server-side apply, unless
/// nothing but time would change.
async fn write_ready(
    ctx: &Context,
    nc: &NodeClass,
    status: &str,
    reason: &str,
    message: &str,
) -> Result<(), Error> {
    let generation = nc.metadata.generation;
    let current = nc.status.as_ref();
    let existing = current.and_then(|s| find_condition(&s.conditions, READY_CONDITION));
    if let Some(c) = existing
        && c.status == status
        && c.reason == reason
        && c.message == message
        && c.observed_generation == generation
        && current.and_then(|s| s.observed_generation) == generation
    {
        return Ok(());
    }
    let transition = existing.filter(|c| c.status == status).map_or_else(
        || Time(jiff::Timestamp::now()),
        |c| c.last_transition_time.clone(),
    );
    let cond = Condition {
        type_: READY_CONDITION.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: transition,
    };
    let patch = serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1",
        "kind": "NodeClass",
        "status": { "observedGeneration": generation, "conditions": [cond] },
    });
    Api::<NodeClass>::all(ctx.client.clone())
        .patch_status(
            &nc.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}
