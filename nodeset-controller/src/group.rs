//! NodeSets over group-backed NodeClasses (a simulated group, a GKE node pool): the cloud
//! owns the machines and names their Nodes; the NodeSet owns the group's size and names every
//! machine that goes.
//!
//! # Adoption rule
//!
//! A Node belongs to the NodeSet of a group-backed class when it carries the group's label
//! (`kube-node.io/group=<name>` for a simulated group, `cloud.google.com/gke-nodepool=<pool>`
//! for GKE: [`kube_node_crds::NodeClassSpec::group`]) **and** its `spec.providerID` is one of
//! the machines the group lists (`GroupProvider::instances`). Such a Node, not being deleted
//! and controlled by nothing else, is adopted in one write: the NodeSet's controller owner
//! reference, the labels a created Node would get (so the selector matches), the NodeClass
//! annotation and the machine finalizer. From then on the node-controller looks after it as
//! after any Node: `kubectl delete node` drains it and deletes exactly its machine.
//!
//! # Size
//!
//! The group's size is only ever *raised* by `set_target_size` (idempotent: an absolute
//! size, so a retry or a re-plan adds nothing), or trimmed down to no less than the machines
//! that exist, which deletes none. Every machine that goes is named: a surplus machine with an
//! adopted Node goes by deleting the Node (the node-controller cordons, drains with PDBs and
//! the drain timeout, then calls `delete_instances` for it); a surplus machine with no Node yet
//! goes by `delete_instances` at once. Both controllers hold the group's lock
//! ([`kube_node_runtime::GroupAccess::lock`]) from reading the group to writing its size, so a
//! size is never computed from a listing older than a deletion.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use kube_node_crds::names::{
    GROUP_CONDITION, MACHINE_FINALIZER, NODE_CLASS_ANNOTATION, REPLICA_FAILURE_CONDITION,
};
use kube_node_crds::v1alpha1::{DeletePolicy, NodeClass, NodeSet, NodeSetStatus};
use kube_node_provider::{Instance, InstanceState};
use serde_json::json;

use crate::Error;
use crate::observe::child;
use crate::plan::{ChildNode, Health, Ownership, victim_order};
use crate::reconcile::{
    Context, condition, lock, node_labels, owner_reference, publish, to_i32, write_status,
};

/// How soon a NodeSet whose group is still moving is looked at again.
const GROUP_POLL: Duration = Duration::from_secs(2);
/// The periodic resync of a settled group.
const RESYNC: Duration = Duration::from_secs(300);

/// One machine of the group, with its Node when one registered.
#[derive(Clone, Debug)]
pub struct GroupMachine {
    /// Its provider ID.
    pub provider_id: String,
    /// Its state.
    pub state: InstanceState,
    /// The Node it registered, as the NodeSet sees it.
    pub node: Option<ChildNode>,
}

/// What a group-backed NodeSet wants, and the group's size now.
#[derive(Clone, Debug)]
pub struct GroupDesired {
    /// `spec.replicas`.
    pub replicas: usize,
    /// `spec.removeNodes`.
    pub remove_nodes: Vec<String>,
    /// `spec.deletePolicy`.
    pub delete_policy: DeletePolicy,
    /// Seed of the `Random` policy.
    pub seed: u64,
    /// The group's target size as read this pass.
    pub target: u32,
}

/// What a pass does to a group.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupPlan {
    /// The size to set, when it must change.
    pub set_target: Option<u32>,
    /// Nodes to delete (the node-controller drains them and deletes their machines).
    pub delete_nodes: Vec<String>,
    /// Machines without an adopted Node to delete at once, by provider ID.
    pub delete_machines: Vec<String>,
}

fn being_removed(m: &GroupMachine) -> bool {
    m.node.as_ref().is_some_and(|n| n.deleting)
}

fn ours(m: &GroupMachine) -> bool {
    m.node
        .as_ref()
        .is_some_and(|n| n.ownership == Ownership::Ours && !n.deleting)
}

/// The pure planner of a group-backed NodeSet.
///
/// Machines whose Node is being deleted are on their way out (their deletion lowers the size
/// when the node-controller deletes them): they are counted in the size but never kept.
/// Named removals go next, then, when more machines are kept than `replicas`, the surplus:
/// machines with no adopted Node first (newest first), then adopted Nodes in the NodeSet's
/// victim order. The size is `replicas` plus the machines on their way out; it is raised to
/// that, or trimmed to it when machines the group has not made yet would otherwise come.
pub fn plan_group(d: &GroupDesired, machines: &[GroupMachine]) -> GroupPlan {
    let mut out = GroupPlan::default();
    let live: Vec<&GroupMachine> = machines
        .iter()
        .filter(|m| m.state != InstanceState::Terminating)
        .collect();
    let in_flight = live.iter().filter(|m| being_removed(m)).count();
    let mut keep: Vec<&GroupMachine> = Vec::new();
    for m in live.iter().filter(|m| !being_removed(m)) {
        match &m.node {
            Some(n) if ours(m) && d.remove_nodes.contains(&n.name) => {
                out.delete_nodes.push(n.name.clone())
            }
            _ => keep.push(m),
        }
    }
    if keep.len() > d.replicas {
        keep.sort_by(|a, b| match (ours(a), ours(b)) {
            (false, false) => (a.state == InstanceState::Running)
                .cmp(&(b.state == InstanceState::Running))
                .then_with(|| b.provider_id.cmp(&a.provider_id)),
            (false, true) => std::cmp::Ordering::Less,
            (true, false) => std::cmp::Ordering::Greater,
            (true, true) => match (&a.node, &b.node) {
                (Some(x), Some(y)) => victim_order(d.delete_policy, d.seed, x, y),
                _ => std::cmp::Ordering::Equal,
            },
        });
        for m in keep.drain(..keep.len() - d.replicas) {
            match (&m.node, ours(m)) {
                (Some(n), true) => out.delete_nodes.push(n.name.clone()),
                _ => out.delete_machines.push(m.provider_id.clone()),
            }
        }
    }
    let want = d.replicas + in_flight + out.delete_nodes.len();
    let after = (d.target as usize).saturating_sub(out.delete_machines.len());
    if want != after {
        // Down only to what exists (kept, leaving, being drained): deletes nothing.
        out.set_target = Some(u32::try_from(want).unwrap_or(u32::MAX));
    }
    out
}

/// Whether a NodeClass is group-backed.
/// What the group's failed creations say, for the NodeSet's `ReplicaFailure` condition: the
/// reason of the first failure (quota and capacity first: those are what a user acts on) and
/// a message counting them. `None` when no machine of the group failed to be created.
pub fn creation_failures(instances: &[Instance]) -> Option<(&'static str, String)> {
    let failed: Vec<(&Instance, &kube_node_provider::ProviderError)> = instances
        .iter()
        .filter(|i| i.state != InstanceState::Terminating)
        .filter_map(|i| Some((i, i.failure.as_ref()?)))
        .collect();
    let (first, error) = failed
        .iter()
        .find(|(_, e)| e.is_out_of_resources())
        .or_else(|| failed.first())?;
    Some((
        error.reason(),
        format!(
            "{} of the group's machines could not be created; {}: {}",
            failed.len(),
            first.provider_id,
            error.message()
        ),
    ))
}

pub(crate) fn is_group_backed(class: &NodeClass) -> bool {
    class.spec.group().is_some()
}

/// The NodeSet that owns a group-backed class: the oldest (then first by name) of the live
/// NodeSets naming it. Only it sizes the group; the others are refused.
fn owner_of(ctx: &Context, class: &str) -> Option<String> {
    ctx.sets
        .state()
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter(|s| s.spec.template.spec.node_classes().contains(&class))
        .min_by(|a, b| {
            let t = |s: &NodeSet| s.metadata.creation_timestamp.as_ref().map(|t| t.0);
            t(a).cmp(&t(b))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        })
        .map(|s| s.name_any())
}

/// One pass of a group-backed NodeSet.
pub(crate) async fn reconcile(
    ns: &NodeSet,
    ctx: &Context,
    class: &NodeClass,
    previous: &NodeSetStatus,
    now: Timestamp,
) -> Result<Action, Error> {
    let name = ns.name_any();
    let uid = ns
        .metadata
        .uid
        .clone()
        .ok_or(Error::MissingField("metadata.uid"))?;
    let class_name = class.name_any();
    let Some(group_ref) = class.spec.group() else {
        return Err(Error::InvalidSpec(format!(
            "NodeClass {class_name} is not group-backed"
        )));
    };
    if ns.spec.template.spec.node_classes().len() > 1 {
        return Err(Error::InvalidSpec(format!(
            "spec.template.spec: NodeClass {class_name} is group-backed and cannot be one of several classes"
        )));
    }
    let mut status = NodeSetStatus {
        observed_generation: ns.metadata.generation,
        selector: Some(ns.spec.selector.to_selector_string()),
        node_class_name: Some(class_name.clone()),
        ..Default::default()
    };
    let generation = ns.metadata.generation;

    // One NodeSet per group.
    if let Some(owner) = owner_of(ctx, &class_name)
        && owner != name
    {
        let message = format!(
            "NodeClass {class_name} is group-backed and its group is sized by NodeSet {owner}: one NodeSet per group"
        );
        status.conditions = vec![condition(
            &previous.conditions,
            GROUP_CONDITION,
            false,
            "GroupOwnedByAnotherNodeSet",
            message.clone(),
            generation,
            now,
        )];
        if &status != previous {
            write_status(ns, ctx, &status).await?;
            publish(
                ctx,
                ns,
                EventType::Warning,
                "GroupOwnedByAnotherNodeSet",
                "Scale",
                message,
            )
            .await;
        }
        return Ok(Action::await_change());
    }

    let access = ctx.config.groups.clone().ok_or_else(|| {
        Error::InvalidSpec(format!(
            "NodeClass {class_name} is group-backed, but this nodeset-controller runs without group access"
        ))
    })?;
    let provider = access.provider(class).await?;
    let group = provider.as_group().ok_or_else(|| {
        Error::Group(kube_node_provider::ProviderError::InvalidConfig(format!(
            "NodeClass {class_name} names a group, but backend {} has no group operations",
            provider.name()
        )))
    })?;

    let node_api: Api<Node> = Api::all(ctx.client.clone());
    let group_lock = access.lock(&class_name);
    let held = group_lock.lock().await;
    // Size first, then machines, then Nodes: a deletion between two reads only makes this
    // pass see fewer machines than the size, which it never answers by deleting.
    let target = group.target_size().await?;
    let instances: Vec<Instance> = group.instances().await?;
    let (key, value) = &group_ref.label;
    let listed = node_api
        .list(&ListParams::default().labels(&format!("{key}={value}")))
        .await?;
    let by_pid: HashMap<&str, &Node> = listed
        .items
        .iter()
        .filter_map(|n| Some((n.spec.as_ref()?.provider_id.as_deref()?, n)))
        .collect();

    // Adopt what the rule says is ours.
    let labels = node_labels(ns, &class_name)?;
    let mut adopted: BTreeMap<String, Node> = BTreeMap::new();
    // Read live once, before the first adoption (see `reconcile::may_adopt`).
    let mut may_adopt: Option<bool> = None;
    for i in instances
        .iter()
        .filter(|i| i.state != InstanceState::Terminating)
    {
        let Some(node) = by_pid.get(i.provider_id.as_str()) else {
            continue;
        };
        let controlled = node
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true));
        if controlled || node.metadata.deletion_timestamp.is_some() {
            continue;
        }
        if may_adopt.is_none() {
            may_adopt = Some(crate::reconcile::may_adopt(ctx, &name, &uid).await?);
        }
        if may_adopt != Some(true) {
            break;
        }
        let mut refs = node.metadata.owner_references.clone().unwrap_or_default();
        refs.push(owner_reference(name.clone(), uid.clone()));
        let mut finalizers = node.metadata.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == MACHINE_FINALIZER) {
            finalizers.push(MACHINE_FINALIZER.to_string());
        }
        let patch = json!({"metadata": {
            "resourceVersion": node.metadata.resource_version,
            "ownerReferences": refs,
            "finalizers": finalizers,
            "labels": labels,
            "annotations": {NODE_CLASS_ANNOTATION: class_name},
        }});
        let n = node_api
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        tracing::info!(node = %n.name_any(), provider_id = %i.provider_id, "adopted node of the group");
        adopted.insert(i.provider_id.clone(), n);
    }

    let machines: Vec<GroupMachine> = instances
        .iter()
        .map(|i| {
            let node = adopted
                .get(&i.provider_id)
                .or_else(|| by_pid.get(i.provider_id.as_str()).copied())
                .map(|n| child(ns, n));
            GroupMachine {
                provider_id: i.provider_id.clone(),
                state: i.state,
                node,
            }
        })
        .collect();
    let replicas = usize::try_from(ns.spec.replicas).map_err(|_| {
        Error::InvalidSpec(format!("spec.replicas {} is negative", ns.spec.replicas))
    })?;
    let the_plan = plan_group(
        &GroupDesired {
            replicas,
            remove_nodes: ns.spec.remove_nodes.clone(),
            delete_policy: ns.spec.delete_policy(),
            seed: rand::random(),
            target,
        },
        &machines,
    );
    if !the_plan.delete_machines.is_empty() {
        group.delete_instances(&the_plan.delete_machines).await?;
        tracing::info!(machines = ?the_plan.delete_machines, "deleted unregistered machines of the group");
    }
    if let Some(size) = the_plan.set_target {
        group.set_target_size(size).await?;
        tracing::info!(from = target, to = size, group = %group.group_name(), "set group size");
    }
    drop(held);
    for n in &the_plan.delete_nodes {
        match node_api.delete(n, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(node = %n, "deleting node of the group"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !the_plan.delete_nodes.is_empty() || the_plan.set_target.is_some() {
        let note = format!(
            "group {}: size {} -> {}, removing {:?}",
            group.group_name(),
            target,
            the_plan.set_target.unwrap_or(target),
            the_plan.delete_nodes
        );
        publish(ctx, ns, EventType::Normal, "GroupScaled", "Scale", note).await;
    }
    // Names in removeNodes whose Node is gone are done.
    let gone: Vec<String> = ns
        .spec
        .remove_nodes
        .iter()
        .filter(|r| !listed.items.iter().any(|n| n.name_any() == **r))
        .cloned()
        .collect();
    if !gone.is_empty() {
        crate::reconcile::prune_removals(ns, ctx, &gone).await?;
    }

    // Status: the adopted Nodes, and whether the group agrees with its size.
    let ours: Vec<&ChildNode> = machines
        .iter()
        .filter_map(|m| m.node.as_ref())
        .filter(|c| c.ownership == Ownership::Ours)
        .collect();
    let ready = ours
        .iter()
        .filter(|c| !c.deleting && c.health == Health::Ready)
        .count();
    status.replicas = to_i32(ours.len());
    status.ready_replicas = to_i32(ready);
    status.available_replicas = to_i32(ready);
    let live = instances
        .iter()
        .filter(|i| i.state != InstanceState::Terminating)
        .count();
    let unregistered = machines
        .iter()
        .filter(|m| m.state != InstanceState::Terminating && m.node.is_none())
        .count();
    let settled = the_plan.set_target.is_none()
        && the_plan.delete_machines.is_empty()
        && live == target as usize
        && unregistered == 0;
    let since = {
        let mut m = lock(&ctx.group_unsettled);
        if settled {
            m.remove(&uid);
            None
        } else {
            Some(*m.entry(uid.clone()).or_insert_with(Instant::now))
        }
    };
    let timeout = class.spec.registration_timeout();
    let stuck = since.is_some_and(|s| s.elapsed() > timeout);
    let message = format!(
        "group {}: size {target}, {live} machines, {unregistered} without a registered Node",
        group.group_name()
    );
    let failures = creation_failures(&instances);
    let mut conditions = vec![if stuck {
        condition(
            &previous.conditions,
            GROUP_CONDITION,
            false,
            "GroupOutOfSync",
            format!(
                "{message}, for longer than the registration timeout ({}s)",
                timeout.as_secs()
            ),
            generation,
            now,
        )
    } else {
        condition(
            &previous.conditions,
            GROUP_CONDITION,
            true,
            if settled { "InSync" } else { "Resizing" },
            message,
            generation,
            now,
        )
    }];
    // The cloud accepted the size but could not make some machines (quota, a zone out of
    // capacity): say so where `kubectl describe nodeset` shows it, once as a Warning.
    if let Some((reason, message)) = &failures {
        let new = !previous.conditions.iter().any(|c| {
            c.type_ == REPLICA_FAILURE_CONDITION && c.status == "True" && c.reason == *reason
        });
        if new {
            publish(
                ctx,
                ns,
                EventType::Warning,
                reason,
                "CreateMachine",
                message.clone(),
            )
            .await;
        }
        conditions.push(condition(
            &previous.conditions,
            REPLICA_FAILURE_CONDITION,
            true,
            reason,
            message.clone(),
            generation,
            now,
        ));
    }
    status.conditions = conditions;
    if &status != previous {
        write_status(ns, ctx, &status).await?;
    }
    Ok(if settled && the_plan.delete_nodes.is_empty() {
        Action::requeue(RESYNC)
    } else {
        Action::requeue(GROUP_POLL)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ours: bool, deleting: bool, health: Health) -> ChildNode {
        ChildNode {
            name: name.into(),
            ownership: if ours {
                Ownership::Ours
            } else {
                Ownership::Orphan
            },
            matches_selector: ours,
            class_matches: true,
            deleting,
            delete_marked: false,
            health,
            ready_since: None,
            created: None,
            launched: None,
            class_generation: None,
            failure: None,
            failed_at: None,
            built: None,
        }
    }

    fn machine(i: usize, node: Option<ChildNode>) -> GroupMachine {
        GroupMachine {
            provider_id: format!("simulated:///z/m-{i:02}"),
            state: InstanceState::Running,
            node,
        }
    }

    fn desired(replicas: usize, target: u32) -> GroupDesired {
        GroupDesired {
            replicas,
            remove_nodes: Vec::new(),
            delete_policy: DeletePolicy::Newest,
            seed: 1,
            target,
        }
    }

    fn ready(n: usize) -> Vec<GroupMachine> {
        (0..n)
            .map(|i| machine(i, Some(node(&format!("n{i}"), true, false, Health::Ready))))
            .collect()
    }

    fn instance(i: usize, failure: Option<kube_node_provider::ProviderError>) -> Instance {
        Instance {
            id: format!("m-{i}"),
            provider_id: format!("sim:///z/m-{i}"),
            state: InstanceState::Pending,
            tags: BTreeMap::new(),
            zone: None,
            instance_type: None,
            addresses: Vec::new(),
            created_unix: None,
            labels: BTreeMap::new(),
            failure,
        }
    }

    #[test]
    fn failed_creations_name_the_quota_or_capacity_failure_first() {
        use kube_node_provider::ProviderError;
        assert_eq!(creation_failures(&[instance(0, None)]), None);
        let instances = [
            instance(0, None),
            instance(
                1,
                Some(ProviderError::Transient("CONDITION_NOT_MET".into())),
            ),
            instance(2, Some(ProviderError::QuotaExceeded("CPUS quota".into()))),
        ];
        let (reason, message) = creation_failures(&instances).expect("failures");
        assert_eq!(reason, ProviderError::QuotaExceeded(String::new()).reason());
        assert!(
            message.starts_with("2 of the group's machines"),
            "{message}"
        );
        assert!(
            message.contains("sim:///z/m-2") && message.contains("CPUS quota"),
            "{message}"
        );
        let mut deleting = instance(3, Some(ProviderError::QuotaExceeded("x".into())));
        deleting.state = InstanceState::Terminating;
        assert_eq!(
            creation_failures(&[deleting]),
            None,
            "a machine being deleted is done"
        );
    }

    #[test]
    fn scale_up_sets_the_size_once() {
        assert_eq!(
            plan_group(&desired(5, 0), &[]),
            GroupPlan {
                set_target: Some(5),
                ..Default::default()
            }
        );
        // Re-planned while the machines boot (no Nodes yet): nothing more.
        let booting: Vec<GroupMachine> = (0..5).map(|i| machine(i, None)).collect();
        assert_eq!(plan_group(&desired(5, 5), &booting), GroupPlan::default());
        // Before the group even lists them.
        assert_eq!(plan_group(&desired(5, 5), &[]), GroupPlan::default());
    }

    #[test]
    fn scale_down_names_victims_and_never_lowers_the_size_bare() {
        let p = plan_group(&desired(2, 5), &ready(5));
        assert_eq!(p.delete_nodes.len(), 3);
        assert!(p.delete_machines.is_empty());
        // Size stays 5 while they drain: the node-controller's deletions lower it.
        assert_eq!(p.set_target, None);
        // While draining (Nodes deleting), nothing more is deleted or sized.
        let mut draining = ready(5);
        for m in draining.iter_mut().take(3) {
            if let Some(n) = m.node.as_mut() {
                n.deleting = true;
            }
        }
        let victims_first = plan_group(&desired(2, 5), &draining);
        assert_eq!(victims_first, GroupPlan::default());
    }

    #[test]
    fn unregistered_machines_go_first_by_name() {
        let mut ms = ready(2);
        ms.push(machine(7, None));
        let p = plan_group(&desired(2, 3), &ms);
        assert_eq!(p.delete_machines, vec!["simulated:///z/m-07".to_string()]);
        assert!(p.delete_nodes.is_empty());
        assert_eq!(
            p.set_target, None,
            "delete_instances lowers the size itself"
        );
    }

    #[test]
    fn named_removal_deletes_exactly_that_node() {
        let mut d = desired(4, 5);
        d.remove_nodes = vec!["n3".into()];
        let p = plan_group(&d, &ready(5));
        assert_eq!(p.delete_nodes, vec!["n3".to_string()]);
        assert_eq!(p.set_target, None);
    }

    #[test]
    fn a_size_with_missing_machines_is_trimmed_not_grown() {
        // Size 5, 3 machines exist, replicas now 2: one named victim, and the two machines
        // the group has not made yet are dropped from the size (which deletes none).
        let p = plan_group(&desired(2, 5), &ready(3));
        assert_eq!(p.delete_nodes.len(), 1);
        assert_eq!(p.set_target, Some(3));
    }

    #[test]
    fn replanning_after_applying_changes_nothing() {
        for replicas in 0..6 {
            for existing in 0..6 {
                let p = plan_group(&desired(replicas, existing as u32), &ready(existing));
                // Apply: victims' Nodes deleting, machines gone, size set.
                let mut ms: Vec<GroupMachine> = ready(existing)
                    .into_iter()
                    .filter(|m| !p.delete_machines.contains(&m.provider_id))
                    .collect();
                for m in &mut ms {
                    if let Some(n) = m.node.as_mut()
                        && p.delete_nodes.contains(&n.name)
                    {
                        n.deleting = true;
                    }
                }
                let target = p.set_target.unwrap_or(existing as u32) as usize;
                let again = plan_group(&desired(replicas, target as u32), &ms);
                assert!(
                    again.delete_nodes.is_empty(),
                    "{replicas} of {existing}: {again:?}"
                );
                assert!(again.delete_machines.is_empty());
                assert_eq!(again.set_target, None, "{replicas} of {existing}");
                // Never more than replicas plus what is leaving.
                assert!(target <= replicas.max(existing));
            }
        }
    }
}
