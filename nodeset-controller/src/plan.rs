//! The pure planner: what a NodeSet must do, given what it wants and the Nodes that exist.
//!
//! Nothing here touches the cluster, so every rule of scaling, replacement, removal and
//! adoption is tested here, most of it with property tests.
//!
//! # Nodes being deleted
//!
//! A Node with a `deletionTimestamp` still has a machine until the node-controller removes its
//! finalizer, so it still costs money. The planner therefore treats it in two ways:
//!
//! * it does **not** count toward the replicas kept: scaling down only looks at the Nodes that
//!   are not being deleted, so a slow machine teardown never stalls a scale-down (and a Node
//!   already on its way out is, in effect, the first victim);
//! * it **does** count toward the cap on creates: creates are `replicas − (alive + deleting)`,
//!   so the number of Nodes (with a machine) never exceeds `max(replicas, Nodes that already
//!   exist)`. A replacement (of a Failed or named Node) is made only once the old Node is gone.
//!
//! # Unhealthy Nodes and the circuit breaker
//!
//! Failed Nodes, registered Nodes whose kubelet is not Ready, and *late* Nodes (launched longer
//! ago than half the NodeClass's registration timeout and still not Ready) count against
//! `maxUnhealthy`. Counting late Nodes matters when every machine fails: the failures arrive
//! one at a time, and fresh replacements would otherwise look healthy until their own
//! timeout, so the breaker would never open. Nodes built from an older NodeClass generation do
//! not count: the breaker stops replacing Nodes with a configuration that fails, and a new
//! generation is a new configuration.
//!
//! # Replacement backoff
//!
//! Consecutive machine failures slow launches down exponentially (see [`crate::backoff`]):
//! while the backoff is active, nothing is launched before the next attempt is due, and then
//! one machine at a time. Scale-downs and named removals are never held.
//!
//! # Rolling replacement of drifted Nodes
//!
//! A Node whose build hash differs from what the NodeSet would build now has drifted (see
//! [`crate::drift`]). With the `RollingUpdate` strategy the planner replaces drifted Nodes with
//! the semantics of a Deployment, new Node first:
//!
//! * it creates up-to-date Nodes while the Nodes that exist (those being deleted included:
//!   they still have machines) stay within `replicas + maxSurge`, and never more up-to-date
//!   Nodes than `replicas`;
//! * it deletes drifted Nodes (the node-controller drains them, honouring PDBs, then deletes
//!   their machines) while the available Nodes left stay at least `replicas −
//!   maxUnavailable`: a drifted Node that is not available goes freely, an available one only
//!   within that budget, oldest first;
//! * scale-downs take drifted Nodes before up-to-date ones of the same health, so a victim is
//!   never replaced first and deleted after;
//! * a Node built from the new spec that fails, or is not Ready `progressDeadlineSeconds`
//!   after its creation, stops the rollout (persisted in `status.rollout`, so a restart does
//!   not resume it): nothing more is replaced until the target changes.
//!
//! Everything is derived from the Nodes and the NodeSet's status, so a rollout survives a
//! restart at any point. `OnDelete` only reports drift.
//!
//! # A NodeClass that is missing or being deleted
//!
//! Nothing is created while the template's NodeClass does not exist (or is being deleted): a
//! Node created then could never get a machine, yet every user and controller of the cluster
//! would see it in `kubectl get nodes` as `Unknown`, and a Node of a NodeClass being deleted
//! would hold that deletion back. Deletes and adoption go on; creates start when the class
//! (re)appears, since a NodeClass event requeues the NodeSets naming it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use jiff::{SignedDuration, Timestamp};
use kube_node_crds::v1alpha1::{ClassCooldown, DeletePolicy};

use crate::backoff::{self, BackoffPolicy, BackoffState};
use crate::drift::{self, BuildHash, Drift};

/// Who controls a Node, seen from one NodeSet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ownership {
    /// Its controller owner reference is this NodeSet (by UID).
    Ours,
    /// It has no controller owner reference.
    Orphan,
    /// Another object controls it.
    Other,
}

/// The health of a Node, as the NodeSet ranks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Health {
    /// Its `MachineReady` condition says `Failed` (registration timeout, vanished machine, …).
    Failed,
    /// Its kubelet has never reported Ready (the machine is pending, launching or registering).
    Unregistered,
    /// It registered once but its kubelet is not Ready now.
    NotReady,
    /// Its kubelet reports Ready.
    Ready,
}

/// A failure reported on a Node (the `MachineReady` condition of a Node that is not Ready).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// PascalCase reason (the provider's error reason when the node-controller gave one).
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

/// What the planner needs to know about one Node.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildNode {
    /// The Node's name.
    pub name: String,
    /// Who controls it.
    pub ownership: Ownership,
    /// Whether its labels match the NodeSet's selector.
    pub matches_selector: bool,
    /// Whether its `kube-node.io/node-class` annotation names the template's class.
    pub class_matches: bool,
    /// Whether it has a `deletionTimestamp`.
    pub deleting: bool,
    /// Whether it carries the `kube-node.io/delete-node` annotation (any value but `false`).
    pub delete_marked: bool,
    /// How healthy it is.
    pub health: Health,
    /// Since when its kubelet is Ready (when it is).
    pub ready_since: Option<Timestamp>,
    /// Its creation time (`None` sorts as the newest).
    pub created: Option<Timestamp>,
    /// When its machine was launched (the launched-at annotation).
    pub launched: Option<Timestamp>,
    /// The NodeClass generation it was built from.
    pub class_generation: Option<i64>,
    /// The failure its `MachineReady` condition reports, if any.
    pub failure: Option<Failure>,
    /// When its machine failed in a way that counts for the replacement backoff (Failed, or a
    /// create error retrying cannot fix).
    pub failed_at: Option<Timestamp>,
    /// What it was built from (its build-hash and class annotations), when recorded.
    pub built: Option<BuildHash>,
}

/// How drifted Nodes are replaced (`spec.strategy`, resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateStrategy {
    /// New Nodes first, within `replicas + max_surge` Nodes and `replicas − max_unavailable`
    /// available ones.
    RollingUpdate {
        /// `maxSurge` as a count.
        max_surge: usize,
        /// `maxUnavailable` as a count.
        max_unavailable: usize,
    },
    /// Only report drift.
    OnDelete,
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        Self::RollingUpdate {
            max_surge: 1,
            max_unavailable: 0,
        }
    }
}

/// A rollout that stopped, persisted in `status.rollout`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    /// The target ([`BuildHash::id`]) it stopped at.
    pub target: String,
    /// `ProgressDeadlineExceeded` or `ReplacementFailed`.
    pub reason: String,
    /// Which Node and why.
    pub message: String,
}

/// The rollout state as last written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutState {
    /// The current target ([`BuildHash::id`]).
    pub target: Option<String>,
    /// The stop, while it holds.
    pub stalled: Option<Stall>,
}

/// Where the rollout stands, for the `Progressing` condition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Progress {
    /// No Node has drifted.
    #[default]
    Complete,
    /// Drifted Nodes are being replaced.
    Replacing,
    /// Drifted Nodes wait for a user to delete them (`OnDelete`).
    OnDelete,
    /// The rollout stopped.
    Stalled(Stall),
}

/// What the NodeSet wants, resolved from its spec and its NodeClass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Desired {
    /// `spec.replicas`.
    pub replicas: usize,
    /// `spec.removeNodes`.
    pub remove_nodes: Vec<String>,
    /// `spec.deletePolicy`, defaulted.
    pub delete_policy: DeletePolicy,
    /// `spec.maxUnhealthy` resolved to a count.
    pub max_unhealthy: usize,
    /// `spec.minReadySeconds`.
    pub min_ready: SignedDuration,
    /// The current NodeClass generation, when the class exists.
    pub class_generation: Option<i64>,
    /// Whether the NodeClass exists and is not being deleted: only then are Nodes created.
    pub class_usable: bool,
    /// Seed of the `Random` delete policy.
    pub seed: u64,
    /// The NodeClass's registration timeout, when the class exists (for late Nodes).
    pub registration_timeout: Option<SignedDuration>,
    /// `spec.replacementBackoff`, resolved.
    pub backoff: BackoffPolicy,
    /// The backoff state as last written (`status.backoff`).
    pub history: BackoffState,
    /// A hash of `spec.template` (a change starts the backoff over).
    pub template_hash: String,
    /// What an up-to-date Node is built from now (`None` while the class is missing: no
    /// Node is judged drifted then).
    pub target: Option<BuildHash>,
    /// `spec.strategy`, resolved.
    pub strategy: UpdateStrategy,
    /// `spec.progressDeadlineSeconds`.
    pub progress_deadline: SignedDuration,
    /// The rollout state as last written (`status.rollout`).
    pub rollout: RolloutState,
    /// The template's NodeClasses in order of preference (empty: only `target`'s).
    pub classes: Vec<String>,
    /// What a Node of each listed NodeClass that exists is built from now: a Node on a class
    /// preferred to `target`'s (which is cooling down) is judged against its own class.
    pub targets: BTreeMap<String, BuildHash>,
    /// The class new Nodes get now (`target`'s, also when the class does not exist).
    pub target_class: String,
    /// The classes cooling down after running out of capacity or quota.
    pub class_cooldowns: Vec<ClassCooldown>,
}

/// The counts a NodeSet's status reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Nodes of the NodeSet, including the ones being deleted.
    pub replicas: usize,
    /// Nodes (not being deleted) whose kubelet is Ready.
    pub ready: usize,
    /// Ready Nodes that have been Ready for `minReadySeconds`.
    pub available: usize,
    /// Failed Nodes, registered Nodes whose kubelet is not Ready, and late unregistered Nodes.
    pub unhealthy: usize,
    /// Nodes built from an older NodeClass generation.
    pub outdated: usize,
    /// Nodes (not being deleted) that have not drifted.
    pub updated: usize,
    /// Nodes (not being deleted) that have drifted.
    pub drifted: usize,
}

/// What to do. Applying all of it and planning again yields [`Plan::is_idle`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Orphans to adopt (owner reference added).
    pub adopt: Vec<String>,
    /// Nodes to release (owner reference removed): ours, but their labels no longer match.
    pub release: Vec<String>,
    /// How many Nodes to create.
    pub creates: usize,
    /// Nodes to delete: named removals, then scale-down victims in victim order, then drifted
    /// Nodes being replaced (`replaced`), then Failed Nodes being replaced (the last
    /// `replacements` entries).
    pub deletes: Vec<String>,
    /// The drifted Nodes the rollout deletes this pass (also in `deletes`).
    pub replaced: Vec<String>,
    /// The rollout state after this pass (to write to `status.rollout`).
    pub rollout: RolloutState,
    /// Where the rollout stands.
    pub progress: Progress,
    /// `replicas − maxUnavailable`: the available Nodes the `Available` condition wants.
    pub min_available: usize,
    /// When a replacement reaches its progress deadline (for the requeue).
    pub progress_check_in: Option<SignedDuration>,
    /// How many of `deletes` are Failed Nodes being replaced.
    pub replacements: usize,
    /// Names in `spec.removeNodes` that are Nodes, but not of this NodeSet.
    pub refused_removals: Vec<String>,
    /// Names in `spec.removeNodes` whose Node is gone: to drop from the spec.
    pub prune_removals: Vec<String>,
    /// Whether more Nodes are unhealthy than `maxUnhealthy` (replacements paused).
    pub circuit_breaker_open: bool,
    /// `maxUnhealthy` as a count.
    pub max_unhealthy: usize,
    /// How many of the Nodes that stay count against `maxUnhealthy`.
    pub breaker_unhealthy: usize,
    /// The backoff state after this pass (to write to `status.backoff`).
    pub backoff: BackoffState,
    /// How long launches are held back by the backoff (for the requeue).
    pub backoff_wait: Option<SignedDuration>,
    /// Launches the backoff held back this pass (creates and Failed-Node replacements).
    pub held: usize,
    /// Status counts (before the plan is applied).
    pub counts: Counts,
    /// The most relevant Node failure, with how many Nodes report one.
    pub failure: Option<(Failure, usize)>,
    /// When the next Ready Node becomes available (for the requeue).
    pub next_available_in: Option<SignedDuration>,
}

impl Plan {
    /// Whether the plan writes nothing to Nodes and nothing to the spec.
    pub fn is_idle(&self) -> bool {
        self.adopt.is_empty()
            && self.release.is_empty()
            && self.creates == 0
            && self.deletes.is_empty()
            && self.prune_removals.is_empty()
    }

    /// Whether the plan creates or deletes Nodes (the actions that need a consistent read).
    pub fn scales(&self) -> bool {
        self.creates > 0 || !self.deletes.is_empty()
    }
}

/// Whether a child is a member of the NodeSet once the plan's adoptions are done.
fn member(c: &ChildNode) -> bool {
    match c.ownership {
        Ownership::Ours => c.matches_selector,
        Ownership::Orphan => adoptable(c),
        Ownership::Other => false,
    }
}

fn adoptable(c: &ChildNode) -> bool {
    c.ownership == Ownership::Orphan && c.matches_selector && c.class_matches && !c.deleting
}

/// Whether a Node has been launching for longer than half the registration timeout without
/// becoming Ready: no evidence of health.
fn late(c: &ChildNode, timeout: Option<SignedDuration>, now: Timestamp) -> bool {
    c.health == Health::Unregistered
        && match (timeout, c.launched) {
            (Some(t), Some(l)) => now.duration_since(l) >= t / 2,
            _ => false,
        }
}

/// Whether a Node counts as unhealthy.
fn unhealthy(c: &ChildNode, timeout: Option<SignedDuration>, now: Timestamp) -> bool {
    matches!(c.health, Health::Failed | Health::NotReady) || late(c, timeout, now)
}

/// The scale-down rank of a Node (lower goes first) after named removals.
fn rank(c: &ChildNode) -> u8 {
    if c.delete_marked {
        0
    } else {
        match c.health {
            Health::Failed | Health::Unregistered => 1,
            Health::NotReady => 2,
            Health::Ready => 3,
        }
    }
}

/// A stable 64-bit hash (FNV-1a, then a splitmix finaliser) so `Random` is reproducible from
/// the seed.
fn mix(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Orders two Nodes of the same rank by the delete policy (the one to delete first is Less).
fn policy_order(
    policy: DeletePolicy,
    seed: u64,
    a: &ChildNode,
    b: &ChildNode,
) -> std::cmp::Ordering {
    // `None` is a Node just created: the newest.
    let newest_first = || match (a.created, b.created) {
        (None, None) => std::cmp::Ordering::Equal,
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => y.cmp(&x),
    };
    match policy {
        DeletePolicy::Newest => newest_first().then_with(|| b.name.cmp(&a.name)),
        DeletePolicy::Oldest => newest_first().reverse().then_with(|| a.name.cmp(&b.name)),
        DeletePolicy::Random => mix(seed, &a.name)
            .cmp(&mix(seed, &b.name))
            .then_with(|| a.name.cmp(&b.name)),
    }
}

/// The full victim order for scale-down among the given Nodes.
pub fn victim_order(
    policy: DeletePolicy,
    seed: u64,
    a: &ChildNode,
    b: &ChildNode,
) -> std::cmp::Ordering {
    rank(a)
        .cmp(&rank(b))
        .then_with(|| policy_order(policy, seed, a, b))
}

/// Resolves `maxUnhealthy` (a count, or a percentage of replicas rounded up; default 50%).
pub fn resolve_max_unhealthy(
    value: Option<&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    replicas: usize,
) -> Result<usize, String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let percent = |p: u64| -> usize {
        let r = replicas as u64;
        usize::try_from((r * p).div_ceil(100)).unwrap_or(usize::MAX)
    };
    match value {
        None => Ok(percent(50)),
        Some(IntOrString::Int(n)) => {
            usize::try_from(*n).map_err(|_| format!("maxUnhealthy {n} is negative"))
        }
        Some(IntOrString::String(s)) => {
            let digits = s
                .trim()
                .strip_suffix('%')
                .ok_or_else(|| format!("maxUnhealthy {s:?} is neither a count nor a percentage"))?;
            let p: u64 = digits
                .trim()
                .parse()
                .map_err(|_| format!("maxUnhealthy {s:?} is not a valid percentage"))?;
            Ok(percent(p.min(100_000)))
        }
    }
}

/// How a Node drifted from what the NodeSet builds now, if it did.
pub fn drift_of(desired: &Desired, c: &ChildNode) -> Option<Drift> {
    let target = desired.target.as_ref()?;
    let built = c.built.as_ref()?;
    let rank = |class: &str| desired.classes.iter().position(|x| x == class);
    if built.class != target.class
        && let (Some(b), Some(t)) = (rank(&built.class), rank(&target.class))
        && b < t
    {
        // On a class preferred to the one new Nodes get now (that one ran out of capacity):
        // no reason to replace it, unless its own class changed.
        return drift::drift(desired.targets.get(&built.class)?, built);
    }
    drift::drift(target, built)
}

fn is_drifted(desired: &Desired, c: &ChildNode) -> bool {
    drift_of(desired, c).is_some()
}

/// Whether a Node has been Ready for `min_ready`.
fn available(c: &ChildNode, min_ready: SignedDuration, now: Timestamp) -> bool {
    c.health == Health::Ready && now.duration_since(c.ready_since.unwrap_or(now)) >= min_ready
}

/// Resolves `maxSurge`/`maxUnavailable` as a Deployment does: a count, or a percentage of
/// `replicas`, surge rounded up and unavailable rounded down.
pub fn resolve_int_or_percent(
    field: &str,
    value: Option<&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    default: usize,
    replicas: usize,
    round_up: bool,
) -> Result<usize, String> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match value {
        None => Ok(default),
        Some(IntOrString::Int(n)) => {
            usize::try_from(*n).map_err(|_| format!("{field} {n} is negative"))
        }
        Some(IntOrString::String(s)) => {
            let p: u64 = s
                .trim()
                .strip_suffix('%')
                .and_then(|d| d.trim().parse().ok())
                .ok_or_else(|| format!("{field} {s:?} is neither a count nor a percentage"))?;
            let whole = replicas as u64 * p.min(100_000);
            let n = if round_up {
                whole.div_ceil(100)
            } else {
                whole / 100
            };
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        }
    }
}

/// Plans one pass of a NodeSet. Pure: the same input always gives the same plan.
pub fn plan(desired: &Desired, children: &[ChildNode], now: Timestamp) -> Plan {
    let mut out = Plan::default();
    let r = desired.replicas;

    let by_name: HashMap<&str, &ChildNode> =
        children.iter().map(|c| (c.name.as_str(), c)).collect();

    for c in children {
        if adoptable(c) {
            out.adopt.push(c.name.clone());
        } else if c.ownership == Ownership::Ours && !c.matches_selector && !c.deleting {
            out.release.push(c.name.clone());
        }
    }
    out.adopt.sort();
    out.release.sort();

    let members: Vec<&ChildNode> = children.iter().filter(|c| member(c)).collect();
    let alive: Vec<&ChildNode> = members.iter().copied().filter(|c| !c.deleting).collect();
    let total = members.len();

    // Status counts.
    out.counts.replicas = total;
    let mut next_available: Option<SignedDuration> = None;
    for c in &alive {
        if c.health == Health::Ready {
            out.counts.ready += 1;
            let since = c.ready_since.unwrap_or(now);
            let ready_for = now.duration_since(since);
            if ready_for >= desired.min_ready {
                out.counts.available += 1;
            } else {
                let left = desired.min_ready - ready_for;
                next_available = Some(next_available.map_or(left, |n| n.min(left)));
            }
        }
        if unhealthy(c, desired.registration_timeout, now) {
            out.counts.unhealthy += 1;
        }
        if let (Some(current), Some(built)) = (desired.class_generation, c.class_generation)
            && built < current
        {
            out.counts.outdated += 1;
        }
        if is_drifted(desired, c) {
            out.counts.drifted += 1;
        } else {
            out.counts.updated += 1;
        }
    }
    out.next_available_in = next_available;

    // The most relevant failure: Failed Nodes first, then by name, for a stable message.
    let mut failing: Vec<&&ChildNode> = alive.iter().filter(|c| c.failure.is_some()).collect();
    failing.sort_by(|a, b| a.health.cmp(&b.health).then_with(|| a.name.cmp(&b.name)));
    if let Some(first) = failing.first()
        && let Some(f) = &first.failure
    {
        out.failure = Some((f.clone(), failing.len()));
    }

    // Named removals.
    let mut doomed: BTreeSet<&str> = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for name in &desired.remove_nodes {
        if !seen.insert(name.as_str()) {
            continue;
        }
        match by_name.get(name.as_str()) {
            None => out.prune_removals.push(name.clone()),
            Some(c) if member(c) => {
                if !c.deleting && doomed.insert(c.name.as_str()) {
                    out.deletes.push(c.name.clone());
                }
            }
            // Ours but leaving anyway (being deleted, or being released): wait until gone.
            Some(c) if c.ownership == Ownership::Ours => {}
            Some(_) => out.refused_removals.push(name.clone()),
        }
    }

    // Scale down among the Nodes that stay; unhealthy ones go first.
    let mut rest: Vec<&ChildNode> = alive
        .iter()
        .copied()
        .filter(|c| !doomed.contains(c.name.as_str()))
        .collect();
    // Drifted Nodes go before up-to-date ones of the same rank: a scale-down during a rollout
    // removes what the rollout would have replaced.
    rest.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| is_drifted(desired, b).cmp(&is_drifted(desired, a)))
            .then_with(|| policy_order(desired.delete_policy, desired.seed, a, b))
    });
    // During a rolling update the Nodes above `replicas` that maxSurge allows are the
    // rollout's, not a scale-down's.
    stall(desired, &alive, now, &mut out);
    let allowance = surge_allowance(desired, &rest, r, out.rollout.stalled.is_some());
    let extra = rest.len().saturating_sub(r + allowance);
    for c in rest.iter().take(extra) {
        out.deletes.push(c.name.clone());
    }
    let survivors = &rest[extra..];

    // Failed survivors are replaced unless too many of the survivors are unhealthy. Judging the
    // breaker on the survivors (not on the Nodes a scale-down removes anyway) keeps the plan
    // stable: planning again after this one is applied gives the same verdict.
    out.max_unhealthy = desired.max_unhealthy;
    out.breaker_unhealthy = survivors
        .iter()
        .filter(|c| {
            unhealthy(c, desired.registration_timeout, now)
                && !backoff::outdated(c, desired.class_generation)
        })
        .count();
    out.circuit_breaker_open = out.breaker_unhealthy > desired.max_unhealthy;
    if !out.circuit_breaker_open {
        let mut failed: Vec<&&ChildNode> = survivors
            .iter()
            .filter(|c| c.health == Health::Failed)
            .collect();
        failed.sort_by(|a, b| a.name.cmp(&b.name));
        for c in failed {
            out.deletes.push(c.name.clone());
            out.replacements += 1;
        }
    }

    // Scale up, never above `replicas` counting the Nodes still being deleted, and only with a
    // NodeClass to make machines from.
    out.creates = if desired.class_usable {
        r.saturating_sub(total)
    } else {
        0
    };

    roll(desired, &alive, survivors, total, now, &mut out);

    // The replacement backoff holds launches: none before the next attempt is due, then one
    // at a time (a probe whose outcome is the next step).
    out.backoff = backoff::advance(
        &desired.backoff,
        &desired.history,
        &members,
        desired.class_generation,
        &desired.template_hash,
    );
    if out.backoff.active() {
        let due = out.backoff.next_attempt.is_none_or(|t| now >= t);
        if !due {
            out.backoff_wait = out.backoff.next_attempt.map(|t| t.duration_since(now));
        }
        // A machine launching whose outcome is not known yet (and that this plan keeps: one
        // it deletes decides nothing, and the next pass would not see it).
        let in_flight = alive.iter().any(|c| {
            c.health == Health::Unregistered
                && c.failed_at.is_none()
                && !out.deletes.contains(&c.name)
        });
        let replacing = members.iter().any(|c| c.deleting);
        let wanted = out.creates + out.replacements;
        let (creates, replacements) = if !due || in_flight {
            (0, 0)
        } else if out.creates > 0 {
            (1, 0)
        } else if replacing {
            (0, 0)
        } else {
            (0, out.replacements.min(1))
        };
        // Replacements are the last entries of `deletes`.
        let keep = out.deletes.len() - out.replacements + replacements;
        out.deletes.truncate(keep);
        out.replacements = replacements;
        out.creates = creates;
        out.held = wanted - creates - replacements;
    }
    out
}

/// Sets the rollout state: the target, and whether the rollout stopped (a stop holds while
/// its target is still the target). A Node built from the new spec that cannot become Ready
/// stops a rolling update, rather than letting it churn through the fleet.
fn stall(desired: &Desired, alive: &[&ChildNode], now: Timestamp, out: &mut Plan) {
    // The template is in the id although it no longer shapes machines: editing it (say an
    // annotation, as `kubectl rollout restart` does) is how a stopped rollout is retried.
    let Some(target) = desired
        .target
        .as_ref()
        .map(|t| format!("{}-{}", t.id(), desired.template_hash))
    else {
        return;
    };
    out.rollout.target = Some(target.clone());
    out.rollout.stalled = desired
        .rollout
        .stalled
        .clone()
        .filter(|s| s.target == target);
    let rolling = matches!(desired.strategy, UpdateStrategy::RollingUpdate { .. });
    if !rolling || out.rollout.stalled.is_some() || !alive.iter().any(|c| is_drifted(desired, c)) {
        return;
    }
    let mut fresh: Vec<&&ChildNode> = alive
        .iter()
        .filter(|c| c.built.is_some() && !is_drifted(desired, c))
        .collect();
    fresh.sort_by(|a, b| a.name.cmp(&b.name));
    for c in fresh {
        if c.health == Health::Failed {
            let why = c
                .failure
                .as_ref()
                .map_or_else(|| "its machine failed".to_string(), |f| f.message.clone());
            out.rollout.stalled = Some(Stall {
                target,
                reason: "ReplacementFailed".into(),
                message: format!("Node {} built from the new spec failed: {why}", c.name),
            });
            out.progress_check_in = None;
            return;
        }
        if c.health == Health::Unregistered
            && let Some(age) = c.created.map(|t| now.duration_since(t))
        {
            if age >= desired.progress_deadline {
                out.rollout.stalled = Some(Stall {
                    target,
                    reason: "ProgressDeadlineExceeded".into(),
                    message: format!(
                        "Node {} built from the new spec is not Ready after {}s",
                        c.name,
                        desired.progress_deadline.as_secs()
                    ),
                });
                out.progress_check_in = None;
                return;
            }
            let left = desired.progress_deadline - age;
            out.progress_check_in = Some(out.progress_check_in.map_or(left, |l| l.min(left)));
        }
    }
}

/// How many Nodes above `replicas` a rolling update may keep: at most `maxSurge`, and at most
/// one per drifted Node among the Nodes kept (`rest` is in victim order), none once the
/// rollout stopped. The largest such count, so planning again after the scale-down keeps it.
fn surge_allowance(
    desired: &Desired,
    rest: &[&ChildNode],
    replicas: usize,
    stalled: bool,
) -> usize {
    let UpdateStrategy::RollingUpdate { max_surge, .. } = desired.strategy else {
        return 0;
    };
    if stalled {
        return 0;
    }
    (0..=max_surge)
        .rev()
        .find(|a| {
            let extra = rest.len().saturating_sub(replicas + a);
            rest[extra..]
                .iter()
                .filter(|c| is_drifted(desired, c))
                .count()
                >= *a
        })
        .unwrap_or(0)
}

/// The rolling replacement of drifted Nodes (see the module docs), after scaling: adds
/// surge creates to `out.creates` and inserts the drifted Nodes to delete before the Failed
/// Nodes being replaced in `out.deletes`.
fn roll(
    desired: &Desired,
    alive: &[&ChildNode],
    survivors: &[&ChildNode],
    total: usize,
    now: Timestamp,
    out: &mut Plan,
) {
    let r = desired.replicas;
    let (max_surge, max_unavailable) = match desired.strategy {
        UpdateStrategy::RollingUpdate {
            max_surge,
            max_unavailable,
        } => (max_surge, max_unavailable),
        UpdateStrategy::OnDelete => (0, 0),
    };
    out.min_available = r.saturating_sub(max_unavailable);
    // The Nodes this pass keeps (survivors of the scale-down, less Failed ones replaced).
    let kept: Vec<&ChildNode> = survivors
        .iter()
        .copied()
        .filter(|c| !out.deletes.contains(&c.name))
        .collect();
    let mut old: Vec<&ChildNode> = kept
        .iter()
        .copied()
        .filter(|c| is_drifted(desired, c))
        .collect();
    if !alive.iter().any(|c| is_drifted(desired, c)) {
        out.progress = Progress::Complete;
        return;
    }
    if desired.strategy == UpdateStrategy::OnDelete {
        out.progress = Progress::OnDelete;
        return;
    }
    if let Some(stall) = &out.rollout.stalled {
        out.progress = Progress::Stalled(stall.clone());
        out.progress_check_in = None;
        return;
    }
    out.progress = Progress::Replacing;
    if !desired.class_usable {
        return;
    }
    // New Nodes first, within maxSurge, never more up-to-date Nodes than replicas. (Bounded
    // by these two alone, so planning again after the creates asks for no more.)
    let updated = kept.len() - old.len();
    let total_after = total + out.creates;
    let room = (r + max_surge).saturating_sub(total_after);
    let surge = if old.is_empty() {
        0
    } else {
        room.min(r.saturating_sub(updated + out.creates))
    };
    out.creates += surge;
    // Then drifted Nodes go while enough stay available: unavailable ones freely, oldest first.
    let mut budget = kept
        .iter()
        .filter(|c| available(c, desired.min_ready, now))
        .count()
        .saturating_sub(out.min_available);
    old.sort_by(|a, b| {
        available(a, desired.min_ready, now)
            .cmp(&available(b, desired.min_ready, now))
            .then_with(|| policy_order(DeletePolicy::Oldest, 0, a, b))
    });
    let mut replaced = Vec::new();
    for c in old {
        if available(c, desired.min_ready, now) {
            if budget == 0 {
                break;
            }
            budget -= 1;
        }
        replaced.push(c.name.clone());
    }
    let at = out.deletes.len() - out.replacements;
    out.deletes.splice(at..at, replaced.iter().cloned());
    out.replaced = replaced;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid timestamp")
    }

    fn node(name: &str, created: i64) -> ChildNode {
        ChildNode {
            name: name.to_string(),
            ownership: Ownership::Ours,
            matches_selector: true,
            class_matches: true,
            deleting: false,
            delete_marked: false,
            health: Health::Ready,
            ready_since: Some(ts(created)),
            created: Some(ts(created)),
            launched: Some(ts(created)),
            class_generation: Some(1),
            failure: None,
            failed_at: None,
            built: None,
        }
    }

    fn desired(replicas: usize) -> Desired {
        Desired {
            replicas,
            remove_nodes: vec![],
            delete_policy: DeletePolicy::Newest,
            max_unhealthy: replicas.div_ceil(2),
            min_ready: SignedDuration::ZERO,
            class_generation: Some(1),
            class_usable: true,
            seed: 7,
            ..Desired::default()
        }
    }

    fn now() -> Timestamp {
        ts(10_000)
    }

    #[test]
    fn creates_missing_replicas() {
        let p = plan(&desired(3), &[node("a", 1)], now());
        assert_eq!(p.creates, 2);
        assert!(p.deletes.is_empty());
    }

    #[test]
    fn nothing_is_created_without_a_usable_node_class() {
        let d = Desired {
            class_usable: false,
            class_generation: None,
            ..desired(3)
        };
        let p = plan(&d, &[node("a", 1)], now());
        assert_eq!(p.creates, 0);
        // Scaling down still works.
        let p = plan(&Desired { replicas: 0, ..d }, &[node("a", 1)], now());
        assert_eq!(p.deletes, vec!["a".to_string()]);
    }

    #[test]
    fn scale_down_deletes_newest_by_default() {
        let kids = [node("a", 1), node("b", 3), node("c", 2)];
        let p = plan(&desired(1), &kids, now());
        assert_eq!(p.deletes, vec!["b", "c"]);
        let mut d = desired(1);
        d.delete_policy = DeletePolicy::Oldest;
        assert_eq!(plan(&d, &kids, now()).deletes, vec!["a", "c"]);
    }

    #[test]
    fn victim_order_follows_the_issue() {
        let mut marked = node("marked", 1);
        marked.delete_marked = true;
        let mut failed = node("failed", 2);
        failed.health = Health::Failed;
        let mut unregistered = node("unregistered", 3);
        unregistered.health = Health::Unregistered;
        let mut not_ready = node("notready", 4);
        not_ready.health = Health::NotReady;
        let old = node("old", 0);
        let new = node("new", 9);
        let named = node("named", -5);
        let kids = [
            old.clone(),
            new.clone(),
            not_ready,
            unregistered,
            failed,
            marked,
            named,
        ];
        let mut d = desired(0);
        d.remove_nodes = vec!["named".into()];
        d.max_unhealthy = 0;
        let p = plan(&d, &kids, now());
        assert_eq!(
            p.deletes,
            vec![
                "named",
                "marked",
                "unregistered",
                "failed",
                "notready",
                "new",
                "old"
            ]
        );
    }

    #[test]
    fn deleting_nodes_do_not_count_as_kept_but_cap_creates() {
        let mut gone = node("x", 1);
        gone.deleting = true;
        // 50 → 5: the deleting Node does not stop the scale-down.
        let mut kids: Vec<_> = (0..6).map(|i| node(&format!("n{i}"), i)).collect();
        kids.push(gone.clone());
        let p = plan(&desired(5), &kids, now());
        assert_eq!(p.deletes.len(), 1);
        assert_eq!(p.creates, 0);
        // 2 alive + 1 deleting with replicas 3: no create until the deleting one is gone.
        let p = plan(&desired(3), &[node("a", 1), node("b", 2), gone], now());
        assert_eq!(p.creates, 0);
        assert!(p.deletes.is_empty());
        let p = plan(&desired(3), &[node("a", 1), node("b", 2)], now());
        assert_eq!(p.creates, 1);
    }

    #[test]
    fn failed_nodes_are_replaced_until_the_breaker_opens() {
        let mut f1 = node("f1", 1);
        f1.health = Health::Failed;
        let mut f2 = node("f2", 2);
        f2.health = Health::Failed;
        let kids = [f1.clone(), f2.clone(), node("a", 3), node("b", 4)];
        let mut d = desired(4);
        d.max_unhealthy = 2;
        let p = plan(&d, &kids, now());
        assert!(!p.circuit_breaker_open);
        assert_eq!(p.deletes, vec!["f1", "f2"]);
        assert_eq!(p.replacements, 2);
        assert_eq!(p.creates, 0, "replacements wait for the failed Nodes to go");
        d.max_unhealthy = 1;
        let p = plan(&d, &kids, now());
        assert!(p.circuit_breaker_open);
        assert!(p.deletes.is_empty());
    }

    #[test]
    fn removals_refuse_foreign_nodes_and_prune_gone_ones() {
        let mut foreign = node("foreign", 1);
        foreign.ownership = Ownership::Other;
        let kids = [node("a", 1), node("b", 2), foreign];
        let mut d = desired(1);
        d.remove_nodes = vec!["a".into(), "foreign".into(), "gone".into()];
        let p = plan(&d, &kids, now());
        assert_eq!(p.deletes, vec!["a"]);
        assert_eq!(p.refused_removals, vec!["foreign"]);
        assert_eq!(p.prune_removals, vec!["gone"]);
    }

    #[test]
    fn adoption_and_release() {
        let mut orphan = node("orphan", 1);
        orphan.ownership = Ownership::Orphan;
        let mut wrong_class = node("wrongclass", 1);
        wrong_class.ownership = Ownership::Orphan;
        wrong_class.class_matches = false;
        let mut other = node("other", 1);
        other.ownership = Ownership::Other;
        let mut relabelled = node("relabelled", 1);
        relabelled.matches_selector = false;
        let p = plan(
            &desired(2),
            &[orphan, wrong_class, other, relabelled, node("a", 1)],
            now(),
        );
        assert_eq!(p.adopt, vec!["orphan"]);
        assert_eq!(p.release, vec!["relabelled"]);
        assert_eq!(p.creates, 0);
        assert_eq!(p.counts.replicas, 2);
    }

    #[test]
    fn counts_availability_and_outdated() {
        let mut a = node("a", 9_990);
        a.class_generation = Some(0);
        let b = node("b", 1);
        let mut d = desired(2);
        d.min_ready = SignedDuration::from_secs(30);
        let p = plan(&d, &[a, b], now());
        assert_eq!(p.counts.ready, 2);
        assert_eq!(p.counts.available, 1);
        assert_eq!(p.counts.outdated, 1);
        assert_eq!(p.next_available_in, Some(SignedDuration::from_secs(20)));
    }

    #[test]
    fn max_unhealthy_resolution() {
        use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
        assert_eq!(resolve_max_unhealthy(None, 5), Ok(3));
        assert_eq!(resolve_max_unhealthy(Some(&IntOrString::Int(2)), 5), Ok(2));
        assert_eq!(
            resolve_max_unhealthy(Some(&IntOrString::String("10%".into())), 5),
            Ok(1)
        );
        assert!(resolve_max_unhealthy(Some(&IntOrString::String("x".into())), 5).is_err());
        assert!(resolve_max_unhealthy(Some(&IntOrString::Int(-1)), 5).is_err());
    }

    fn failed_at(name: &str, at: i64) -> ChildNode {
        let mut n = node(name, 0);
        n.health = Health::Failed;
        n.ready_since = None;
        n.failed_at = Some(ts(at));
        n.failure = Some(Failure {
            reason: "RegistrationTimeout".into(),
            message: format!("{name}: RegistrationTimeout"),
        });
        n
    }

    #[test]
    fn late_unregistered_nodes_open_the_breaker() {
        // One Failed Node, two launched long ago and still not Ready: all three count.
        let mut a = node("a", 9_900);
        a.health = Health::Unregistered;
        a.ready_since = None;
        let mut b = a.clone();
        b.name = "b".into();
        let f = failed_at("f", 9_990);
        let mut d = desired(3);
        d.max_unhealthy = 2;
        d.registration_timeout = Some(SignedDuration::from_secs(120));
        let p = plan(&d, &[a.clone(), b.clone(), f.clone()], now());
        assert_eq!(p.breaker_unhealthy, 3);
        assert_eq!(p.counts.unhealthy, 3);
        assert!(p.circuit_breaker_open);
        assert!(p.deletes.is_empty());
        // Launched under half the timeout ago: still presumed healthy.
        d.registration_timeout = Some(SignedDuration::from_secs(400));
        let p = plan(&d, &[a, b, f.clone()], now());
        assert_eq!(p.breaker_unhealthy, 1);
        assert!(!p.circuit_breaker_open);
        // A Failed Node built from an older NodeClass generation does not hold the breaker.
        let mut old = f;
        old.class_generation = Some(0);
        let mut d = desired(1);
        d.max_unhealthy = 0;
        let p = plan(&d, &[old], now());
        assert!(!p.circuit_breaker_open);
        assert_eq!(p.replacements, 1);
    }

    #[test]
    fn backoff_holds_replacements_and_scale_ups_but_not_scale_downs() {
        let mut d = desired(3);
        d.max_unhealthy = 3;
        let kids = [failed_at("f1", 9_990), node("a", 1), node("b", 2)];
        // The first failure: replaced at once? No: the next launch waits base (30 s).
        let p = plan(&d, &kids, now());
        assert_eq!(p.backoff.failures, 1);
        assert_eq!(p.backoff.next_attempt, Some(ts(9_990 + 30)));
        assert!(p.deletes.is_empty(), "the replacement waits");
        assert_eq!(p.held, 1);
        assert_eq!(p.backoff_wait, Some(SignedDuration::from_secs(20)));
        d.history = p.backoff.clone();
        // Scale-up is held too.
        d.replicas = 5;
        let p = plan(&d, &kids, now());
        assert_eq!((p.creates, p.held), (0, 3));
        // Scale-down and named removals are not.
        d.replicas = 1;
        d.remove_nodes = vec!["a".into()];
        let p = plan(&d, &kids, now());
        assert_eq!(p.deletes, vec!["a", "f1"]);
        assert_eq!(p.replacements, 0);
        // Once due: one launch at a time.
        d.replicas = 5;
        d.remove_nodes.clear();
        let p = plan(&d, &kids, ts(10_021));
        assert_eq!((p.creates, p.deletes.len()), (1, 0));
        d.replicas = 3;
        let p = plan(&d, &kids, ts(10_021));
        assert_eq!(
            (p.deletes.clone(), p.replacements),
            (vec!["f1".to_string()], 1)
        );
        // A Node Ready after the failure ends the backoff.
        let mut fresh = node("c", 9_995);
        fresh.ready_since = Some(ts(9_995));
        let p = plan(&d, &[kids[0].clone(), kids[1].clone(), fresh], now());
        assert_eq!(p.backoff.failures, 0);
        assert_eq!(p.replacements, 1);
    }

    /// Applies a plan the way the controller and the cluster would (deletes only set the
    /// deletionTimestamp: the machine teardown may take a while).
    fn apply(desired: &mut Desired, children: &mut Vec<ChildNode>, p: &Plan) {
        for c in children.iter_mut() {
            if p.adopt.contains(&c.name) {
                c.ownership = Ownership::Ours;
            }
            if p.release.contains(&c.name) {
                c.ownership = Ownership::Orphan;
            }
            if p.deletes.contains(&c.name) {
                c.deleting = true;
            }
        }
        for i in 0..p.creates {
            let mut n = node(&format!("new-{i}-{}", children.len()), 0);
            n.created = None;
            n.launched = None;
            n.health = Health::Unregistered;
            n.ready_since = None;
            children.push(n);
        }
        desired
            .remove_nodes
            .retain(|n| !p.prune_removals.contains(n));
        desired.history = p.backoff.clone();
    }

    fn arb_child() -> impl Strategy<Value = ChildNode> {
        (
            0u8..3,
            any::<bool>(),
            any::<bool>(),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.2),
            0u8..4,
            0i64..50,
            0i64..3,
        )
            .prop_map(
                |(own, matches, class, deleting, marked, health, created, generation)| ChildNode {
                    name: String::new(),
                    ownership: match own {
                        0 => Ownership::Ours,
                        1 => Ownership::Orphan,
                        _ => Ownership::Other,
                    },
                    matches_selector: matches || own == 0,
                    class_matches: class,
                    deleting,
                    delete_marked: marked,
                    health: match health {
                        0 => Health::Failed,
                        1 => Health::Unregistered,
                        2 => Health::NotReady,
                        _ => Health::Ready,
                    },
                    ready_since: Some(ts(created)),
                    created: Some(ts(created)),
                    launched: Some(ts(created)),
                    class_generation: Some(generation),
                    failure: None,
                    failed_at: None,
                    built: None,
                },
            )
    }

    fn arb_case() -> impl Strategy<Value = (Desired, Vec<ChildNode>)> {
        (
            prop::collection::vec(arb_child(), 0..30),
            0usize..30,
            0usize..10,
            0u8..3,
            prop::collection::vec(0usize..40, 0..5),
            any::<u64>(),
        )
            .prop_map(
                |(mut kids, replicas, max_unhealthy, policy, removes, seed)| {
                    for (i, k) in kids.iter_mut().enumerate() {
                        k.name = format!("n{i:02}");
                    }
                    let d = Desired {
                        replicas,
                        remove_nodes: removes.iter().map(|i| format!("n{i:02}")).collect(),
                        delete_policy: match policy {
                            0 => DeletePolicy::Newest,
                            1 => DeletePolicy::Oldest,
                            _ => DeletePolicy::Random,
                        },
                        max_unhealthy,
                        min_ready: SignedDuration::ZERO,
                        class_generation: Some(2),
                        class_usable: true,
                        seed,
                        ..Desired::default()
                    };
                    (d, kids)
                },
            )
    }

    /// Cases where the backoff may be active: Failed Nodes with failure times, late Nodes,
    /// and a history of failures.
    fn arb_backoff_case() -> impl Strategy<Value = (Desired, Vec<ChildNode>, Timestamp)> {
        (
            arb_case(),
            prop::collection::vec(0i64..200, 30),
            0u32..6,
            0i64..200,
            0i64..300,
        )
            .prop_map(|((mut d, mut kids), times, failures, next, now_at)| {
                for (k, t) in kids.iter_mut().zip(times) {
                    k.launched = Some(ts(t));
                    if k.health == Health::Failed {
                        k.failed_at = Some(ts(t));
                    }
                    if k.health != Health::Ready {
                        k.ready_since = None;
                    }
                }
                d.registration_timeout = Some(SignedDuration::from_secs(100));
                d.backoff = BackoffPolicy {
                    base: SignedDuration::from_secs(10),
                    max: SignedDuration::from_secs(600),
                };
                d.template_hash = "h".into();
                if failures > 0 {
                    d.history = BackoffState {
                        failures,
                        last_failure_at: Some(ts(50)),
                        next_attempt: Some(ts(next)),
                        class_generation: Some(2),
                        template_hash: Some("h".into()),
                        ..BackoffState::default()
                    };
                }
                (d, kids, ts(now_at))
            })
    }

    /// Plays a provider whose machines never register: every launch fails after the
    /// registration timeout, deletes finish at once. Returns the launch times.
    fn never_registering(d: &mut Desired, step: i64, horizon: i64) -> Vec<i64> {
        let timeout = d.registration_timeout.map_or(60, |t| t.as_secs());
        let mut kids: Vec<ChildNode> = Vec::new();
        let mut launches = Vec::new();
        let mut serial = 0;
        let mut t = 0;
        while t <= horizon {
            kids.retain(|c| !c.deleting);
            for c in kids.iter_mut() {
                let launched = c.launched.map_or(0, |l| l.duration_since(ts(0)).as_secs());
                if c.health == Health::Unregistered && t - launched >= timeout {
                    c.health = Health::Failed;
                    c.failed_at = Some(ts(t));
                    c.failure = Some(Failure {
                        reason: "RegistrationTimeout".into(),
                        message: "no kubelet".into(),
                    });
                }
            }
            let p = plan(d, &kids, ts(t));
            d.history = p.backoff.clone();
            for c in kids.iter_mut() {
                if p.deletes.contains(&c.name) {
                    c.deleting = true;
                }
            }
            for _ in 0..p.creates {
                serial += 1;
                let mut n = node(&format!("m{serial}"), t);
                n.health = Health::Unregistered;
                n.ready_since = None;
                kids.push(n);
                launches.push(t);
            }
            t += step;
        }
        launches
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// With machines that never register, launches in any window of length T are
        /// O(log T): at most `replicas + log2(T / base + 1) + 1`.
        #[test]
        fn never_registering_launches_are_logarithmic_in_time(
            replicas in 1usize..6,
            max_unhealthy in 0usize..8,
            timeout in 5i64..120,
            base in 1i64..60,
            step in 1i64..15,
        ) {
            let horizon = 4 * 3600;
            let mut d = desired(replicas);
            d.max_unhealthy = max_unhealthy;
            d.registration_timeout = Some(SignedDuration::from_secs(timeout));
            d.backoff = BackoffPolicy {
                base: SignedDuration::from_secs(base),
                max: SignedDuration::from_secs(horizon),
            };
            d.template_hash = "h".into();
            let launches = never_registering(&mut d, step, horizon);
            for window in [600i64, 3600, horizon] {
                let bound = replicas as f64 + ((window as f64 / base as f64) + 1.0).log2() + 1.0;
                for (i, start) in launches.iter().enumerate() {
                    let n = launches[i..].iter().take_while(|t| **t <= start + window).count();
                    prop_assert!(
                        n as f64 <= bound,
                        "{} launches in {}s from {}s, bound {:.1}: {:?}", n, window, start, bound, launches
                    );
                }
            }
        }

        #[test]
        fn backoff_launches_at_most_one_at_a_time((d, kids, now) in arb_backoff_case()) {
            let p = plan(&d, &kids, now);
            if p.backoff.active() {
                prop_assert!(p.creates + p.replacements <= 1);
                if p.backoff.next_attempt.is_some_and(|t| now < t) {
                    prop_assert_eq!(p.creates + p.replacements, 0);
                }
            }
            // The safety properties hold with the backoff too.
            let members = kids.iter().filter(|c| member(c)).count();
            prop_assert!(members + p.creates <= d.replicas.max(members));
            let alive = kids.iter().filter(|c| member(c) && !c.deleting).count();
            let named = p.deletes.iter().filter(|n| d.remove_nodes.contains(n)).count();
            prop_assert!(alive - p.deletes.len() + p.replacements >= d.replicas.min(alive - named));
        }

        #[test]
        fn backoff_replanning_after_applying_is_idle((d, kids, now) in arb_backoff_case()) {
            let mut d = d;
            let mut kids = kids;
            let p = plan(&d, &kids, now);
            apply(&mut d, &mut kids, &p);
            let again = plan(&d, &kids, now);
            prop_assert!(again.is_idle(), "first {:?}, then {:?}", p, again);
            prop_assert_eq!(&again.backoff, &p.backoff, "the backoff state is a fixed point");
        }
    }

    proptest! {
        #[test]
        fn creates_never_exceed_missing_replicas((d, kids) in arb_case()) {
            let p = plan(&d, &kids, now());
            let members = kids.iter().filter(|c| member(c)).count();
            let alive = kids.iter().filter(|c| member(c) && !c.deleting).count();
            prop_assert!(p.creates <= d.replicas.saturating_sub(alive));
            // Never more Nodes than max(replicas, Nodes that exist).
            prop_assert!(members + p.creates <= d.replicas.max(members));
            if p.creates > 0 {
                prop_assert!(members + p.creates == d.replicas);
            }
        }

        #[test]
        fn deletes_never_go_below_replicas((d, kids) in arb_case()) {
            let p = plan(&d, &kids, now());
            let alive = kids.iter().filter(|c| member(c) && !c.deleting).count();
            let named = p.deletes.iter().filter(|n| d.remove_nodes.contains(n)).count();
            let left = alive - p.deletes.len();
            // Scale-down keeps `replicas` (or all that are not named); only Failed Nodes being
            // replaced (re-created once gone) take it lower.
            prop_assert!(left + p.replacements >= d.replicas.min(alive - named));
            // Every delete is a live member, each at most once.
            let set: BTreeSet<_> = p.deletes.iter().collect();
            prop_assert_eq!(set.len(), p.deletes.len());
            for n in &p.deletes {
                let c = kids.iter().find(|c| &c.name == n).expect("deleted Node exists");
                prop_assert!(member(c) && !c.deleting);
            }
        }

        #[test]
        fn victims_are_ordered((d, kids) in arb_case()) {
            let p = plan(&d, &kids, now());
            let named: Vec<_> = p.deletes.iter().filter(|n| d.remove_nodes.contains(n)).cloned().collect();
            // Named removals come first.
            prop_assert_eq!(&p.deletes[..named.len()], &named[..]);
            let scale_down = &p.deletes[named.len()..p.deletes.len() - p.replacements - p.replaced.len()];
            let victims: Vec<&ChildNode> = scale_down
                .iter()
                .filter_map(|n| kids.iter().find(|c| &c.name == n))
                .collect();
            for w in victims.windows(2) {
                prop_assert!(victim_order(d.delete_policy, d.seed, w[0], w[1]) != std::cmp::Ordering::Greater);
            }
            // No Node that stays should have gone before a victim.
            let stays: Vec<&ChildNode> = kids
                .iter()
                .filter(|c| member(c) && !c.deleting && !p.deletes.contains(&c.name))
                .collect();
            for v in &victims {
                for s in &stays {
                    prop_assert!(victim_order(d.delete_policy, d.seed, v, s) != std::cmp::Ordering::Greater);
                }
            }
        }

        #[test]
        fn no_creates_without_a_usable_class_else_the_same_plan((d, kids) in arb_case()) {
            let with = plan(&d, &kids, now());
            let without = plan(&Desired { class_usable: false, ..d.clone() }, &kids, now());
            prop_assert_eq!(without.creates, 0);
            // Everything but the creates is planned as with the class.
            prop_assert_eq!(&without.deletes, &with.deletes);
            prop_assert_eq!(&without.adopt, &with.adopt);
            prop_assert_eq!(&without.release, &with.release);
        }

        #[test]
        fn replanning_after_applying_is_idle((d, kids) in arb_case()) {
            let mut d = d;
            let mut kids = kids;
            let p = plan(&d, &kids, now());
            apply(&mut d, &mut kids, &p);
            let again = plan(&d, &kids, now());
            prop_assert!(again.is_idle(), "first {:?}, then {:?}", p, again);
        }

        #[test]
        fn deletes_finishing_converges_to_replicas((d, kids) in arb_case()) {
            // Once deleting Nodes are gone, creates fill exactly up to replicas.
            let mut d = d;
            let mut kids = kids;
            for _ in 0..4 {
                let p = plan(&d, &kids, now());
                apply(&mut d, &mut kids, &p);
                kids.retain(|c| !c.deleting);
            }
            let alive = kids.iter().filter(|c| member(c) && !c.deleting).count();
            prop_assert_eq!(alive, d.replicas);
        }
    }

    // Rolling replacement.

    fn hash(image: &str) -> BuildHash {
        BuildHash {
            class: "sim".into(),
            parts: drift::PARTS
                .iter()
                .map(|p| {
                    let v = if *p == "provider" { image } else { "same" };
                    (p.to_string(), v.to_string())
                })
                .collect(),
        }
    }

    fn rolling(replicas: usize, max_surge: usize, max_unavailable: usize) -> Desired {
        Desired {
            target: Some(hash("v2")),
            strategy: UpdateStrategy::RollingUpdate {
                max_surge,
                max_unavailable,
            },
            progress_deadline: SignedDuration::from_secs(600),
            ..desired(replicas)
        }
    }

    fn built(name: &str, created: i64, image: &str) -> ChildNode {
        ChildNode {
            built: Some(hash(image)),
            ..node(name, created)
        }
    }

    #[test]
    fn fallback_classes_drift_back_but_preferred_ones_never_drift_forward() {
        let on = |class: &str, image: &str| BuildHash {
            class: class.into(),
            ..hash(image)
        };
        let mut d = Desired {
            classes: vec!["spot".into(), "ondemand".into()],
            targets: [("spot", "v1"), ("ondemand", "v1")]
                .into_iter()
                .map(|(c, i)| (c.to_string(), on(c, i)))
                .collect(),
            ..rolling(2, 1, 0)
        };
        let spot = ChildNode {
            built: Some(on("spot", "v1")),
            ..node("a", 1)
        };
        let ondemand = ChildNode {
            built: Some(on("ondemand", "v1")),
            ..node("b", 2)
        };
        // Spot cooling down: new Nodes get ondemand; a running spot Node stays.
        d.target = Some(on("ondemand", "v1"));
        assert_eq!(drift_of(&d, &spot), None);
        assert_eq!(drift_of(&d, &ondemand), None);
        // ... unless its own class changed.
        d.targets.insert("spot".into(), on("spot", "v2"));
        assert_eq!(
            drift_of(&d, &spot).map(|x| x.reason),
            Some("ProviderChanged".into())
        );
        // Spot back: the ondemand Node drifts back to it.
        d.target = Some(on("spot", "v2"));
        assert_eq!(
            drift_of(&d, &ondemand).map(|x| x.reason),
            Some("NodeClassChanged".into())
        );
    }

    #[test]
    fn rolling_update_creates_first_then_deletes_once_the_new_node_is_available() {
        let d = rolling(3, 1, 0);
        let mut kids = vec![
            built("a", 1, "v1"),
            built("b", 2, "v1"),
            built("c", 3, "v1"),
        ];
        let p = plan(&d, &kids, now());
        assert_eq!((p.creates, p.deletes.clone()), (1, vec![]));
        assert_eq!(p.counts.drifted, 3);
        assert_eq!(p.progress, Progress::Replacing);
        // The new Node is not Ready yet: nothing more.
        let mut fresh = built("n1", 9_990, "v2");
        fresh.health = Health::Unregistered;
        fresh.ready_since = None;
        kids.push(fresh.clone());
        let p = plan(&d, &kids, now());
        assert!(p.is_idle(), "{p:?}");
        assert_eq!(p.progress_check_in, Some(SignedDuration::from_secs(590)));
        // Ready: the oldest drifted Node goes, and it is the only one.
        kids[3] = built("n1", 9_990, "v2");
        let p = plan(&d, &kids, now());
        assert_eq!(p.creates, 0);
        assert_eq!(p.deletes, vec!["a"]);
        assert_eq!(p.replaced, vec!["a"]);
        // While it drains, the Node count is at replicas + maxSurge: no more creates.
        kids[0].deleting = true;
        assert!(plan(&d, &kids, now()).is_idle());
        // Gone: the next new Node.
        kids.remove(0);
        let p = plan(&d, &kids, now());
        assert_eq!((p.creates, p.deletes.len()), (1, 0));
    }

    #[test]
    fn max_unavailable_without_surge_deletes_first() {
        let d = rolling(4, 0, 2);
        let kids: Vec<_> = (0..4).map(|i| built(&format!("n{i}"), i, "v1")).collect();
        let p = plan(&d, &kids, now());
        assert_eq!(p.creates, 0);
        assert_eq!(p.replaced, vec!["n0", "n1"]);
        // Percentages as a Deployment rounds them.
        assert_eq!(
            resolve_int_or_percent("s", Some(&IntOrString::String("25%".into())), 1, 10, true),
            Ok(3)
        );
        assert_eq!(
            resolve_int_or_percent("u", Some(&IntOrString::String("25%".into())), 0, 10, false),
            Ok(2)
        );
        assert!(resolve_int_or_percent("u", Some(&IntOrString::Int(-1)), 0, 10, false).is_err());
    }

    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    #[test]
    fn scale_down_takes_drifted_nodes_first() {
        let d = rolling(2, 1, 0);
        let kids = vec![
            built("old", 1, "v1"),
            built("new1", 2, "v2"),
            built("new2", 3, "v2"),
        ];
        let p = plan(&d, &kids, now());
        assert_eq!(p.deletes, vec!["old"]);
        assert_eq!(p.creates, 0);
        // Scaled further down: the drifted Node is the first victim.
        let p = plan(&rolling(1, 1, 0), &kids, now());
        assert_eq!(p.deletes[0], "old");
        assert_eq!(p.creates, 0);
    }

    #[test]
    fn a_failed_replacement_stops_the_rollout_until_the_target_changes() {
        let mut d = rolling(3, 1, 0);
        let mut bad = built("n1", 9_000, "v2");
        bad.health = Health::Failed;
        bad.ready_since = None;
        bad.failure = Some(Failure {
            reason: "RegistrationTimeout".into(),
            message: "n1: RegistrationTimeout: no kubelet".into(),
        });
        let kids = vec![
            built("a", 1, "v1"),
            built("b", 2, "v1"),
            built("c", 3, "v1"),
            bad,
        ];
        let p = plan(&d, &kids, now());
        let Progress::Stalled(stall) = &p.progress else {
            panic!("not stalled: {:?}", p.progress)
        };
        assert_eq!(stall.reason, "ReplacementFailed");
        // The failed Node goes; nothing is created for it, no drifted Node is touched.
        assert_eq!(p.deletes, vec!["n1"]);
        assert_eq!(p.creates, 0);
        // After a restart (the stall read back from the status), still stopped.
        d.rollout = p.rollout.clone();
        let gone: Vec<_> = kids[..3].to_vec();
        let p = plan(&d, &gone, now());
        assert!(p.is_idle());
        assert!(matches!(p.progress, Progress::Stalled(_)));
        // A new target: the rollout starts again.
        d.target = Some(hash("v3"));
        let p = plan(&d, &gone, now());
        assert_eq!(p.creates, 1);
        assert_eq!(p.progress, Progress::Replacing);
        assert_eq!(p.rollout.stalled, None);
    }

    #[test]
    fn a_replacement_past_the_progress_deadline_stops_the_rollout() {
        let d = rolling(2, 1, 0);
        let mut slow = built("n1", 9_000, "v2");
        slow.health = Health::Unregistered;
        slow.ready_since = None;
        let kids = vec![built("a", 1, "v1"), built("b", 2, "v1"), slow];
        let p = plan(&d, &kids, now());
        let Progress::Stalled(stall) = &p.progress else {
            panic!("not stalled: {:?}", p.progress)
        };
        assert_eq!(stall.reason, "ProgressDeadlineExceeded");
        // The Node above replicas goes; nothing else is replaced or created.
        assert_eq!(p.deletes, vec!["n1"]);
        assert_eq!((p.creates, p.replaced.len()), (0, 0));
    }

    #[test]
    fn on_delete_only_reports_drift() {
        let d = Desired {
            strategy: UpdateStrategy::OnDelete,
            ..rolling(2, 1, 0)
        };
        let kids = vec![built("a", 1, "v1"), built("b", 2, "v2")];
        let p = plan(&d, &kids, now());
        assert!(p.is_idle());
        assert_eq!((p.counts.drifted, p.counts.updated), (1, 1));
        assert_eq!(p.progress, Progress::OnDelete);
        // Deleted by a user: replaced (by an up-to-date Node, as every create is).
        let mut kids = kids;
        kids[0].deleting = true;
        kids.remove(0);
        assert_eq!(plan(&d, &kids, now()).creates, 1);
    }

    /// One random event of the world a rollout runs in.
    #[derive(Clone, Debug)]
    enum Event {
        /// A controller pass (plan, then apply).
        Pass,
        /// A pass after a restart: the status write of the previous pass is re-read.
        Restart,
        /// Time passes: machines boot, drains finish.
        Tick,
        /// `spec.replicas` changes (kubectl scale, cluster-autoscaler).
        Scale(usize),
        /// A named removal of the i-th alive Node (with replicas lowered by one).
        Remove(usize),
        /// The i-th alive Node's machine fails.
        Fail(usize),
    }

    fn arb_event() -> impl Strategy<Value = Event> {
        prop_oneof![
            6 => Just(Event::Pass),
            1 => Just(Event::Restart),
            5 => Just(Event::Tick),
            1 => (0usize..12).prop_map(Event::Scale),
            1 => (0usize..20).prop_map(Event::Remove),
            1 => (0usize..20).prop_map(Event::Fail),
        ]
    }

    struct World {
        d: Desired,
        kids: Vec<ChildNode>,
        t: i64,
        serial: usize,
        creates: usize,
        replaced: BTreeSet<String>,
        /// Creates a correct rollout may make: a replacement per drifted Node, plus scale-ups,
        /// failed Nodes and up-to-date Nodes removed.
        allowed: usize,
        stalled: bool,
    }

    impl World {
        fn new(replicas: usize, drifted: usize, d: Desired) -> Self {
            let kids: Vec<ChildNode> = (0..replicas)
                .map(|i| {
                    built(
                        &format!("n{i}"),
                        i as i64,
                        if i < drifted { "v1" } else { "v2" },
                    )
                })
                .collect();
            Self {
                allowed: drifted,
                d,
                kids,
                t: 100,
                serial: 0,
                creates: 0,
                replaced: BTreeSet::new(),
                stalled: false,
            }
        }

        fn alive(&self) -> Vec<usize> {
            (0..self.kids.len())
                .filter(|i| !self.kids[*i].deleting)
                .collect()
        }

        fn pass(&mut self) -> Result<(), TestCaseError> {
            let now = ts(self.t);
            let (ms, mu) = match self.d.strategy {
                UpdateStrategy::RollingUpdate {
                    max_surge,
                    max_unavailable,
                } => (max_surge, max_unavailable),
                UpdateStrategy::OnDelete => (0, 0),
            };
            let r = self.d.replicas;
            let p = plan(&self.d, &self.kids, now);
            let total = self.kids.len();
            // Never above replicas + maxSurge Nodes (or what already exists).
            prop_assert!(
                total + p.creates <= (r + ms).max(total),
                "{} + {} > {} + {}",
                total,
                p.creates,
                r,
                ms
            );
            // Rollout deletes never take the available Nodes below replicas − maxUnavailable.
            let avail = |c: &ChildNode| available(c, self.d.min_ready, now);
            let replaced_available = self
                .kids
                .iter()
                .filter(|c| p.replaced.contains(&c.name) && avail(c))
                .count();
            if replaced_available > 0 {
                let left = self
                    .kids
                    .iter()
                    .filter(|c| !c.deleting && !p.deletes.contains(&c.name) && avail(c))
                    .count();
                prop_assert!(
                    left >= r.saturating_sub(mu),
                    "{} available left, {} − {}",
                    left,
                    r,
                    mu
                );
            }
            for n in &p.replaced {
                let c = self.kids.iter().find(|c| &c.name == n).expect("exists");
                prop_assert!(is_drifted(&self.d, c), "{} replaced but not drifted", n);
                // Every drifted Node is replaced at most once.
                prop_assert!(self.replaced.insert(n.clone()), "{} replaced twice", n);
            }
            if self.stalled {
                // A stopped rollout replaces nothing more (creates only refill lost Nodes,
                // which the bound on all creates checks).
                prop_assert!(
                    p.replaced.is_empty(),
                    "a stopped rollout replaced {:?}",
                    p.replaced
                );
            }
            // Apply.
            for c in self.kids.iter_mut() {
                if p.deletes.contains(&c.name) {
                    if !is_drifted(&self.d, c)
                        && !p.replaced.contains(&c.name)
                        && c.health != Health::Failed
                    {
                        // An up-to-date Node scaled down or removed: a later create may refill.
                        self.allowed += 1;
                    }
                    c.deleting = true;
                }
            }
            for _ in 0..p.creates {
                self.serial += 1;
                let mut n = built(&format!("new{}", self.serial), self.t, "v2");
                n.health = Health::Unregistered;
                n.ready_since = None;
                self.kids.push(n);
            }
            self.creates += p.creates;
            self.d
                .remove_nodes
                .retain(|n| !p.prune_removals.contains(n));
            self.d.history = p.backoff.clone();
            self.d.rollout = p.rollout.clone();
            // Planning again at once changes nothing (no create undone by a scale-down).
            let again = plan(&self.d, &self.kids, now);
            prop_assert!(again.is_idle(), "first {:?}, then {:?}", p, again);
            if matches!(p.progress, Progress::Stalled(_)) {
                self.stalled = true;
            }
            Ok(())
        }

        fn tick(&mut self, boot: bool) {
            self.t += 10;
            let t = self.t;
            self.kids.retain(|c| !c.deleting);
            for c in self.kids.iter_mut() {
                if boot && c.health == Health::Unregistered {
                    c.health = Health::Ready;
                    c.ready_since = Some(ts(t));
                    c.launched = Some(ts(t));
                }
            }
        }

        fn event(&mut self, e: &Event) -> Result<(), TestCaseError> {
            match e {
                Event::Pass | Event::Restart => self.pass()?,
                Event::Tick => self.tick(true),
                Event::Scale(n) => {
                    if *n > self.d.replicas {
                        self.allowed += n - self.d.replicas;
                    }
                    self.d.replicas = *n;
                }
                Event::Remove(i) => {
                    let alive = self.alive();
                    if !alive.is_empty() && self.d.replicas > 0 {
                        let c = &self.kids[alive[i % alive.len()]];
                        if !self.d.remove_nodes.contains(&c.name) {
                            self.d.remove_nodes.push(c.name.clone());
                            self.d.replicas -= 1;
                        }
                    }
                }
                Event::Fail(i) => {
                    let alive = self.alive();
                    if !alive.is_empty() {
                        let k = alive[i % alive.len()];
                        let c = &mut self.kids[k];
                        if c.health != Health::Failed {
                            c.health = Health::Failed;
                            c.ready_since = None;
                            c.failed_at = Some(ts(self.t));
                            // Its replacement is allowed (a drifted Node's counted already).
                            if !is_drifted(&self.d, c) {
                                self.allowed += 1;
                            }
                        }
                    }
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Under random interleavings of passes, restarts, scale changes, named removals,
        /// failures and time: never above replicas + maxSurge Nodes, never below replicas −
        /// maxUnavailable available through a replacement, every drifted Node replaced at
        /// most once and no more creates than replacements need; and once the world is quiet,
        /// every Node is up to date (unless the rollout stopped, and then it replaced nothing
        /// more).
        #[test]
        fn rolling_update_invariants(
            replicas in 0usize..10,
            drifted in 0usize..10,
            max_surge in 0usize..4,
            max_unavailable in 0usize..3,
            min_ready in prop::sample::select(vec![0i64, 20]),
            events in prop::collection::vec(arb_event(), 0..120),
        ) {
            let max_surge = if max_surge == 0 && max_unavailable == 0 { 1 } else { max_surge };
            let mut d = rolling(replicas, max_surge, max_unavailable);
            d.min_ready = SignedDuration::from_secs(min_ready);
            // Failures are the rollout's to stop on, not the breaker's or the backoff's.
            d.max_unhealthy = 100;
            d.backoff = BackoffPolicy {
                base: SignedDuration::from_secs(1),
                max: SignedDuration::from_secs(10),
            };
            let mut w = World::new(replicas, drifted.min(replicas), d);
            for e in &events {
                w.event(e)?;
            }
            // Quiet: no more failures, machines boot, drains finish.
            for _ in 0..(4 * (replicas + drifted + 12)) {
                w.pass()?;
                w.tick(true);
            }
            prop_assert!(w.creates <= w.allowed, "{} creates, {} allowed", w.creates, w.allowed);
            let alive: Vec<&ChildNode> = w.kids.iter().filter(|c| !c.deleting).collect();
            if !w.stalled {
                prop_assert_eq!(alive.len(), w.d.replicas);
                prop_assert!(alive.iter().all(|c| !is_drifted(&w.d, c)), "drifted left: {:?}", alive);
            }
        }
    }
}
