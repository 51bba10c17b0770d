//! The orphan collector: every interval, one provider listing per NodeClass. It deletes
//! machines tagged for this cluster whose Node is gone (see [`crate::orphan`]), and the same
//! listing becomes the inventory that Ready Nodes are checked against.

use std::collections::HashSet;
use std::sync::Arc;

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION};
use kube_node_provider::ListFilter;
use kube_node_runtime::CachedNode;

use crate::orphan::{OrphanDecision, select_orphans};
use crate::{Context, Inventory};

pub(crate) async fn run(
    ctx: Arc<Context>,
    trigger: UnboundedSender<ObjectRef<CachedNode>>,
    stopped: impl std::future::Future<Output = ()> + Send,
) {
    let work = async {
        // No decision before the Node cache has synced: an empty cache would make every
        // machine look orphaned.
        if ctx.nodes.wait_until_ready().await.is_err() {
            return;
        }
        loop {
            wave(&ctx, &trigger).await;
            tokio::time::sleep(ctx.config.orphan_gc_interval).await;
        }
    };
    tokio::select! {
        () = work => {},
        () = stopped => {},
    }
}

async fn wave(ctx: &Context, trigger: &UnboundedSender<ObjectRef<CachedNode>>) {
    // The classes of the NodeClass watch: decoded one by one, so a class that does not decode
    // (set aside and reported by the watch) never stops the collection of the others, as a
    // typed list of all of them would.
    if ctx.classes.wait_until_ready().await.is_err() {
        return;
    }
    let classes = ctx.classes.state();
    let mut paused = false;
    for class in classes {
        paused |= collect_class(ctx, &class, trigger).await;
    }
    ctx.metrics.circuit_open.set(i64::from(paused));
}

/// One NodeClass's share of a wave; true when its circuit breaker held.
async fn collect_class(
    ctx: &Context,
    class: &NodeClass,
    trigger: &UnboundedSender<ObjectRef<CachedNode>>,
) -> bool {
    let name = class.name_any();
    let Ok(provider) = ctx.provider_for(class, false).await else {
        return false;
    };
    let filter = ListFilter {
        cluster: ctx.config.cluster_name.clone(),
        node_class: Some(name.clone()),
    };
    let listed_at = jiff::Timestamp::now();
    let machines = match provider.list(&filter).await {
        Ok(m) => m,
        Err(e) => {
            tracing::info!(nodeclass = %name, reason = e.reason(), error = %e, "cannot list machines");
            return false;
        }
    };
    let ids: HashSet<String> = machines.iter().map(|m| m.provider_id.clone()).collect();
    // Ready Nodes whose machine is missing from the listing get a reconcile, which confirms
    // with one `get` before calling the machine vanished.
    for n in ctx.nodes.state() {
        if n.annotations().get(NODE_CLASS_ANNOTATION) != Some(name.as_str()) {
            continue;
        }
        let ready = n
            .condition(MACHINE_READY_CONDITION)
            .is_some_and(|c| c.reason() == Some("Ready"));
        let pid = n.provider_id();
        if ready && pid.is_some_and(|p| !ids.contains(p)) {
            ctx.metrics.work_queue().add(&n.name_any());
            let _ = trigger.unbounded_send(ObjectRef::from_obj(n.as_ref()));
        }
    }
    if let Ok(mut inv) = ctx.inventory.lock() {
        inv.insert(
            name.clone(),
            Inventory {
                listed_at,
                provider_ids: ids,
                labels: machines
                    .iter()
                    .map(|m| (m.provider_id.clone(), m.labels.clone()))
                    .collect(),
            },
        );
    }

    if provider.capabilities().group_sized {
        // A group's machines are the group's: they register their own Nodes, and one that
        // never does is the NodeSet's to report, not an orphan to delete (the group would
        // only replace it).
        return false;
    }
    let cached_uids: HashSet<String> = ctx.nodes.state().iter().filter_map(|n| n.uid()).collect();
    let now = listed_at.as_second();
    let min_age = ctx.config.orphan_min_age;
    let max = ctx.config.orphan_max_fraction;
    match select_orphans(&machines, &cached_uids, now, min_age, max) {
        OrphanDecision::Nothing => false,
        OrphanDecision::Paused { orphans, total } => {
            let msg = format!(
                "{orphans} of {total} machines have no Node, more than {:.0}% at once: not deleting any; check the cluster name and the Node cache",
                max * 100.0
            );
            tracing::warn!(nodeclass = %name, orphans, total, "paused orphan collection");
            ctx.metrics.orphan_action("paused", 1);
            event(
                ctx,
                class,
                EventType::Warning,
                "OrphanCollectionPaused",
                &msg,
            )
            .await;
            true
        }
        OrphanDecision::Delete(_) => {
            // The cache may lag: decide again against the API server before deleting.
            let fresh: HashSet<String> = match Api::<Node>::all(ctx.client.clone())
                .list(&ListParams::default())
                .await
            {
                Ok(l) => l.items.iter().filter_map(|n| n.uid()).collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list nodes");
                    return false;
                }
            };
            let OrphanDecision::Delete(victims) =
                select_orphans(&machines, &fresh, now, min_age, max)
            else {
                return false;
            };
            for pid in victims {
                match provider.delete(&pid).await {
                    Ok(_) => {
                        tracing::info!(nodeclass = %name, provider_id = %pid, "deleted orphan machine");
                        ctx.metrics.orphan_action("deleted", 1);
                        let msg = format!("deleted machine {pid}: no Node has its UID");
                        event(ctx, class, EventType::Normal, "OrphanDeleted", &msg).await;
                    }
                    Err(e) => {
                        tracing::info!(nodeclass = %name, provider_id = %pid, reason = e.reason(), "cannot delete orphan machine");
                    }
                }
            }
            false
        }
    }
}

async fn event(ctx: &Context, class: &NodeClass, type_: EventType, reason: &str, note: &str) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.to_string()),
        action: "CollectOrphans".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &class.object_ref(&())).await {
        tracing::debug!(error = %e, "cannot publish event");
    }
}
