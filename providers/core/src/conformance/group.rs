//! Group conformance: the executable form of `providers/CONTRACT.md` section 7, for any
//! [`GroupProvider`] (the simulated group, a GKE node pool behind a fake or a real project).
//!
//! ```ignore
//! let c = GroupConformance::new("simulated:///elsewhere/not-in-group");
//! let report = conformance::group::run_all(provider.as_group().unwrap(), &c).await;
//! report.into_result().expect("the group backend conforms");
//! ```
//!
//! Each check starts from the group as it finds it (waiting until its machines match its
//! target size), grows it by a few machines, and gives back exactly what it added through
//! `delete_instances`, also when it fails. Machines "boot" as time passes: the checks either
//! poll every [`GroupConformance::poll_interval`], or call the backend's
//! [`GroupConformance::advance`] hook, which moves the group on by one step (booting machines
//! being created, finishing deletions). With the hook, a backend MUST NOT change a machine's
//! state between two calls of it, so [`instances_list_transitions`] can see machines while
//! they are created and deleted; without it that check is skipped.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::{ConformanceFailure, ConformanceReport, fail};
use crate::{GroupProvider, Instance, InstanceState, ProviderError};

/// Moves the group on by one step: machines being created boot, deletions finish.
pub type AdvanceFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What the group checks need to know about the backend under test.
#[derive(Clone)]
pub struct GroupConformance {
    /// A provider ID of this backend's form that names no machine of the group (a machine of
    /// another group, or none at all). `delete_instances` of it must be `InvalidConfig`.
    pub foreign_provider_id: String,
    /// How long the group may take to match a new target size (boots, deletions). With the
    /// advance hook, `settle_timeout / poll_interval` steps.
    pub settle_timeout: Duration,
    /// How often to poll while waiting, when there is no [`GroupConformance::advance`] hook.
    pub poll_interval: Duration,
    /// The backend's hook to move the group on by one step, if it has one.
    pub advance: Option<AdvanceFn>,
    /// How many polls a settled group is watched for machines it should not add (overshoot)
    /// or bring back.
    pub watch_polls: u32,
}

impl fmt::Debug for GroupConformance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupConformance")
            .field("foreign_provider_id", &self.foreign_provider_id)
            .field("settle_timeout", &self.settle_timeout)
            .field("poll_interval", &self.poll_interval)
            .field("advance", &self.advance.is_some())
            .field("watch_polls", &self.watch_polls)
            .finish()
    }
}

impl GroupConformance {
    /// A context with a 5-minute settle timeout, 1s polls, no advance hook and 3 watch polls.
    pub fn new(foreign_provider_id: impl Into<String>) -> Self {
        Self {
            foreign_provider_id: foreign_provider_id.into(),
            settle_timeout: Duration::from_secs(300),
            poll_interval: Duration::from_secs(1),
            advance: None,
            watch_polls: 3,
        }
    }

    async fn step(&self) {
        match &self.advance {
            Some(advance) => advance().await,
            None => tokio::time::sleep(self.poll_interval).await,
        }
    }
}

/// One look at the group: its target size and its machines.
#[derive(Clone, Debug)]
struct Observed {
    target: u32,
    instances: Vec<Instance>,
}

impl Observed {
    /// Machines that are not being deleted: what the target size counts.
    fn live(&self) -> Vec<&Instance> {
        self.instances
            .iter()
            .filter(|i| i.state != InstanceState::Terminating)
            .collect()
    }

    fn live_ids(&self) -> BTreeSet<String> {
        self.live().iter().map(|i| i.provider_id.clone()).collect()
    }

    fn settled(&self) -> bool {
        let live = self.live();
        live.len() == self.target as usize
            && live.iter().all(|i| i.state == InstanceState::Running)
            && live.len() == self.instances.len()
    }

    fn describe(&self) -> String {
        let machines: Vec<String> = self
            .instances
            .iter()
            .map(|i| format!("{} {}", i.provider_id, i.state.as_str()))
            .collect();
        format!("target {} and machines {machines:?}", self.target)
    }
}

async fn observe(
    group: &dyn GroupProvider,
    check: &'static str,
) -> Result<Observed, ConformanceFailure> {
    let target = group
        .target_size()
        .await
        .or_else(|e| fail(check, format!("target_size failed: {e}")))?;
    let instances = group
        .instances()
        .await
        .or_else(|e| fail(check, format!("instances failed: {e}")))?;
    let mut seen = BTreeSet::new();
    for i in &instances {
        if i.provider_id.is_empty() {
            return fail(
                check,
                format!("instances listed machine {:?} without a provider ID", i.id),
            );
        }
        if !seen.insert(i.provider_id.as_str()) {
            return fail(check, format!("instances listed {} twice", i.provider_id));
        }
    }
    Ok(Observed { target, instances })
}

/// Polls (or advances) until `done` holds, failing when more live machines than `ceiling`
/// ever show up or when `settle_timeout` passes.
async fn wait_for(
    group: &dyn GroupProvider,
    c: &GroupConformance,
    check: &'static str,
    what: &str,
    ceiling: usize,
    done: impl Fn(&Observed) -> bool,
) -> Result<Observed, ConformanceFailure> {
    let deadline = tokio::time::Instant::now() + c.settle_timeout;
    // With the advance hook no clock need move: the timeout is counted in steps instead.
    let max_steps = c.settle_timeout.as_millis() / c.poll_interval.as_millis().max(1);
    let mut steps = 0u128;
    loop {
        let o = observe(group, check).await?;
        if o.live().len() > ceiling {
            return fail(
                check,
                format!(
                    "while waiting for {what}, the group overshot to {} live machines (at most {ceiling} expected): {}",
                    o.live().len(),
                    o.describe()
                ),
            );
        }
        if done(&o) {
            return Ok(o);
        }
        let out_of_steps = c.advance.is_some() && steps >= max_steps;
        if tokio::time::Instant::now() >= deadline || out_of_steps {
            return fail(
                check,
                format!(
                    "after {:?}, still waiting for {what}: {}",
                    c.settle_timeout,
                    o.describe()
                ),
            );
        }
        steps += 1;
        c.step().await;
    }
}

/// Watches a settled group for `watch_polls` more steps: the same live machines, the same
/// target, nothing added.
async fn stays(
    group: &dyn GroupProvider,
    c: &GroupConformance,
    check: &'static str,
    settled: &Observed,
) -> Result<(), ConformanceFailure> {
    let want = settled.live_ids();
    for _ in 0..c.watch_polls {
        c.step().await;
        let o = observe(group, check).await?;
        if o.live_ids() != want || o.target != settled.target {
            return fail(
                check,
                format!(
                    "a settled group changed on its own: was {}, now {}",
                    settled.describe(),
                    o.describe()
                ),
            );
        }
    }
    Ok(())
}

/// What a check found at its start, so it can give back what it added.
struct Baseline {
    target: u32,
    ids: BTreeSet<String>,
}

async fn baseline(
    group: &dyn GroupProvider,
    c: &GroupConformance,
    check: &'static str,
) -> Result<Baseline, ConformanceFailure> {
    // A group still resizing from earlier work is waited for, never counted as overshoot.
    let o = wait_for(
        group,
        c,
        check,
        "the group to settle before the check",
        usize::MAX,
        Observed::settled,
    )
    .await?;
    Ok(Baseline {
        target: o.target,
        ids: o.live_ids(),
    })
}

/// Gives back what a check added: deletes the machines that were not there at the start and
/// sets the size back when a resize was left half done. Best effort; the check's own result
/// matters more.
async fn restore(group: &dyn GroupProvider, c: &GroupConformance, base: &Baseline) {
    for _ in 0..3 {
        let Ok(o) = observe(group, "restore").await else {
            c.step().await;
            continue;
        };
        let added: Vec<String> = o
            .live_ids()
            .into_iter()
            .filter(|id| !base.ids.contains(id))
            .collect();
        if !added.is_empty() {
            let _ = group.delete_instances(&added).await;
        }
        if let Ok(target) = group.target_size().await
            && target > base.target
        {
            let _ = group.set_target_size(base.target).await;
        }
        let _ = wait_for(
            group,
            c,
            "restore",
            "the group to shrink back",
            usize::MAX,
            |o| o.settled() && o.target == base.target,
        )
        .await;
        return;
    }
}

async fn set_size(
    group: &dyn GroupProvider,
    check: &'static str,
    size: u32,
) -> Result<(), ConformanceFailure> {
    group
        .set_target_size(size)
        .await
        .or_else(|e| fail(check, format!("set_target_size({size}) failed: {e}")))
}

async fn grow(
    group: &dyn GroupProvider,
    c: &GroupConformance,
    check: &'static str,
    base: &Baseline,
    by: u32,
) -> Result<Observed, ConformanceFailure> {
    let size = base.target + by;
    set_size(group, check, size).await?;
    wait_for(
        group,
        c,
        check,
        &format!("{size} running machines"),
        size as usize,
        |o| o.settled() && o.target == size,
    )
    .await
}

/// Runs `body` from a settled baseline and restores the group afterwards.
async fn with_baseline<'a, T, F>(
    group: &'a dyn GroupProvider,
    c: &'a GroupConformance,
    check: &'static str,
    body: impl FnOnce(Baseline) -> F,
) -> Result<T, ConformanceFailure>
where
    F: Future<Output = Result<T, ConformanceFailure>> + 'a,
{
    let base = baseline(group, c, check).await?;
    let keep = Baseline {
        target: base.target,
        ids: base.ids.clone(),
    };
    let r = body(base).await;
    restore(group, c, &keep).await;
    r
}

/// `set_target_size` grows the group's machines to the size, each listed with its provider ID,
/// and `target_size` reports the size set.
pub async fn grows_to_target(
    group: &dyn GroupProvider,
    c: &GroupConformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "group_grows_to_target";
    with_baseline(group, c, CHECK, |base| async move {
        let o = grow(group, c, CHECK, &base, 2).await?;
        let added = o.live_ids().difference(&base.ids).count();
        if added != 2 || !base.ids.is_subset(&o.live_ids()) {
            return fail(
                CHECK,
                format!(
                    "growing by 2 should add 2 machines and keep the others; started with {:?}, now {}",
                    base.ids,
                    o.describe()
                ),
            );
        }
        stays(group, c, CHECK, &o).await
    })
    .await
}

/// Setting the same size again, also while the first resize is still in progress, adds
/// nothing: the group never has more live machines than the size.
pub async fn resize_is_idempotent(
    group: &dyn GroupProvider,
    c: &GroupConformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "group_resize_is_idempotent";
    with_baseline(group, c, CHECK, |base| async move {
        let size = base.target + 1;
        // Set, retried at once, after one step, and once more: a controller re-planning while
        // the machine boots does exactly this. The group never shows more than `size`.
        for step in [false, false, true, false] {
            if step {
                c.step().await;
            }
            set_size(group, CHECK, size).await?;
            let o = observe(group, CHECK).await?;
            if o.live().len() > size as usize {
                return fail(
                    CHECK,
                    format!(
                        "setting size {size} again while the resize is in progress overshot: {}",
                        o.describe()
                    ),
                );
            }
        }
        let o = wait_for(
            group,
            c,
            CHECK,
            &format!("{size} running machines"),
            size as usize,
            |o| o.settled(),
        )
        .await?;
        if o.target != size {
            return fail(
                CHECK,
                format!(
                    "target_size is {} after setting {size} three times",
                    o.target
                ),
            );
        }
        set_size(group, CHECK, size).await?;
        stays(group, c, CHECK, &o).await
    })
    .await
}

/// `instances` lists machines while they are created and while they are deleted, with their
/// provider IDs. Needs the advance hook (so nothing changes between two looks); `Ok(false)`
/// when skipped.
pub async fn instances_list_transitions(
    group: &dyn GroupProvider,
    c: &GroupConformance,
) -> Result<bool, ConformanceFailure> {
    const CHECK: &str = "group_instances_list_transitions";
    if c.advance.is_none() {
        return Ok(false);
    }
    with_baseline(group, c, CHECK, |base| async move {
        let size = base.target + 1;
        set_size(group, CHECK, size).await?;
        let o = observe(group, CHECK).await?;
        let new: Vec<&Instance> = o
            .live()
            .into_iter()
            .filter(|i| !base.ids.contains(&i.provider_id))
            .collect();
        let [creating] = new.as_slice() else {
            return fail(
                CHECK,
                format!(
                    "right after set_target_size({size}), instances should list exactly one new machine being created: {}",
                    o.describe()
                ),
            );
        };
        if creating.state != InstanceState::Pending {
            return fail(
                CHECK,
                format!(
                    "a machine listed right after set_target_size, before any step, is {} (want Pending)",
                    creating.state.as_str()
                ),
            );
        }
        let id = creating.provider_id.clone();
        wait_for(group, c, CHECK, &format!("{id} to run"), size as usize, |o| {
            o.settled()
        })
        .await?;
        group
            .delete_instances(std::slice::from_ref(&id))
            .await
            .or_else(|e| fail(CHECK, format!("delete_instances([{id}]) failed: {e}")))?;
        let o = observe(group, CHECK).await?;
        match o.instances.iter().find(|i| i.provider_id == id) {
            Some(i) if i.state == InstanceState::Terminating => {}
            Some(i) => {
                return fail(
                    CHECK,
                    format!(
                        "right after delete_instances, before any step, {id} is listed {} (want Terminating)",
                        i.state.as_str()
                    ),
                );
            }
            None => {
                return fail(
                    CHECK,
                    format!(
                        "right after delete_instances, before any step, {id} is no longer listed (want it listed Terminating until it is gone)"
                    ),
                );
            }
        }
        wait_for(group, c, CHECK, &format!("{id} to go"), size as usize, |o| {
            o.settled() && !o.instances.iter().any(|i| i.provider_id == id)
        })
        .await?;
        Ok(true)
    })
    .await
}

/// `delete_instances` removes exactly the named machines and lowers the target by as many;
/// the others stay and nothing replaces the deleted ones.
pub async fn delete_instances_is_exact(
    group: &dyn GroupProvider,
    c: &GroupConformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "group_delete_instances_is_exact";
    with_baseline(group, c, CHECK, |base| async move {
        let grown = grow(group, c, CHECK, &base, 3).await?;
        let added: Vec<String> = grown.live_ids().difference(&base.ids).cloned().collect();
        let (victims, survivors) = added.split_at(2);
        let want_target = base.target + 1;
        group
            .delete_instances(victims)
            .await
            .or_else(|e| fail(CHECK, format!("delete_instances({victims:?}) failed: {e}")))?;
        let target = group
            .target_size()
            .await
            .or_else(|e| fail(CHECK, format!("target_size failed: {e}")))?;
        if target != want_target {
            return fail(
                CHECK,
                format!(
                    "target_size is {target} after deleting 2 of {} machines (want {want_target})",
                    grown.target
                ),
            );
        }
        let want: BTreeSet<String> = base.ids.iter().chain(survivors).cloned().collect();
        let o = wait_for(
            group,
            c,
            CHECK,
            "the named machines to go",
            grown.target as usize,
            |o| o.settled() && o.live_ids() == want,
        )
        .await?;
        if o.target != want_target {
            return fail(
                CHECK,
                format!("after the deletion settled: {}", o.describe()),
            );
        }
        stays(group, c, CHECK, &o).await
    })
    .await
}

/// Deleting a machine that is already gone succeeds and changes nothing: neither the target
/// size (a retried deletion must not shrink the group twice) nor the other machines.
pub async fn delete_gone_instance(
    group: &dyn GroupProvider,
    c: &GroupConformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "group_delete_gone_instance";
    with_baseline(group, c, CHECK, |base| async move {
        let grown = grow(group, c, CHECK, &base, 2).await?;
        let added: Vec<String> = grown.live_ids().difference(&base.ids).cloned().collect();
        let victim = vec![added[0].clone()];
        group
            .delete_instances(&victim)
            .await
            .or_else(|e| fail(CHECK, format!("delete_instances({victim:?}) failed: {e}")))?;
        let o = wait_for(
            group,
            c,
            CHECK,
            &format!("{} to go", victim[0]),
            grown.target as usize,
            |o| o.settled() && !o.instances.iter().any(|i| i.provider_id == victim[0]),
        )
        .await?;
        if let Err(e) = group.delete_instances(&victim).await {
            return fail(
                CHECK,
                format!(
                    "delete_instances of {}, which is already gone, failed (want success): {e}",
                    victim[0]
                ),
            );
        }
        let after = observe(group, CHECK).await?;
        if after.target != o.target || after.live_ids() != o.live_ids() {
            return fail(
                CHECK,
                format!(
                    "deleting a gone machine changed the group: was {}, now {}",
                    o.describe(),
                    after.describe()
                ),
            );
        }
        stays(group, c, CHECK, &o).await
    })
    .await
}

/// A provider ID that is not in the group is `InvalidConfig` naming it, and nothing is
/// deleted, not even the group's own machines named with it.
pub async fn foreign_instance_is_invalid(
    group: &dyn GroupProvider,
    c: &GroupConformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "group_foreign_instance_is_invalid";
    with_baseline(group, c, CHECK, |base| async move {
        let grown = grow(group, c, CHECK, &base, 1).await?;
        let member = grown
            .live_ids()
            .difference(&base.ids)
            .next()
            .cloned()
            .unwrap_or_default();
        let foreign = c.foreign_provider_id.clone();
        for ids in [vec![foreign.clone()], vec![member.clone(), foreign.clone()]] {
            match group.delete_instances(&ids).await {
                Err(ProviderError::InvalidConfig(m)) if m.contains(&foreign) => {}
                Err(ProviderError::InvalidConfig(m)) => {
                    return fail(
                        CHECK,
                        format!("delete_instances({ids:?}) is InvalidConfig but does not name {foreign}: {m}"),
                    );
                }
                Err(e) => {
                    return fail(
                        CHECK,
                        format!(
                            "delete_instances({ids:?}) failed with {} (want InvalidConfig naming {foreign}): {e}",
                            e.reason()
                        ),
                    );
                }
                Ok(()) => {
                    return fail(
                        CHECK,
                        format!("delete_instances({ids:?}) succeeded although {foreign} is not in the group"),
                    );
                }
            }
        }
        let after = observe(group, CHECK).await?;
        if after.target != grown.target || after.live_ids() != grown.live_ids() {
            return fail(
                CHECK,
                format!(
                    "a refused delete_instances changed the group: was {}, now {}",
                    grown.describe(),
                    after.describe()
                ),
            );
        }
        stays(group, c, CHECK, &grown).await
    })
    .await
}

/// Runs every group check and reports each.
pub async fn run_all(group: &dyn GroupProvider, c: &GroupConformance) -> ConformanceReport {
    let mut report = ConformanceReport::default();
    let mut record = |name: &'static str, r: Result<bool, ConformanceFailure>| match r {
        Ok(true) => report.passed.push(name),
        Ok(false) => report.skipped.push(name),
        Err(f) => report.failed.push(f),
    };
    record(
        "group_grows_to_target",
        grows_to_target(group, c).await.map(|()| true),
    );
    record(
        "group_resize_is_idempotent",
        resize_is_idempotent(group, c).await.map(|()| true),
    );
    record(
        "group_instances_list_transitions",
        instances_list_transitions(group, c).await,
    );
    record(
        "group_delete_instances_is_exact",
        delete_instances_is_exact(group, c).await.map(|()| true),
    );
    record(
        "group_delete_gone_instance",
        delete_gone_instance(group, c).await.map(|()| true),
    );
    record(
        "group_foreign_instance_is_invalid",
        foreign_instance_is_invalid(group, c).await.map(|()| true),
    );
    report
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::Result;

    /// How the fake group misbehaves, to show each check catches its fault.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Fault {
        None,
        /// Every set_target_size adds the difference to the machines it has *running*, so
        /// a retry while machines boot adds them twice.
        CountsOnlyRunning,
        /// delete_instances lowers the size and lets the group pick the victims.
        PicksItsOwnVictims,
        /// Deleting a gone machine lowers the size again.
        ShrinksTwice,
        /// Unknown provider IDs are ignored.
        IgnoresForeign,
        /// Machines being deleted disappear from instances() at once.
        HidesDeleting,
    }

    struct Machine {
        id: String,
        state: InstanceState,
    }

    /// A group whose machines move one state per `advance`.
    struct FakeGroup {
        fault: Fault,
        inner: Mutex<(u32, u64, Vec<Machine>)>,
    }

    impl FakeGroup {
        fn new(fault: Fault) -> Arc<Self> {
            Arc::new(Self {
                fault,
                inner: Mutex::new((0, 0, Vec::new())),
            })
        }

        fn advance(&self) {
            let mut g = self.inner.lock().expect("lock");
            g.2.retain(|m| m.state != InstanceState::Terminating);
            for m in &mut g.2 {
                m.state = InstanceState::Running;
            }
        }

        fn add(g: &mut (u32, u64, Vec<Machine>), n: usize) {
            for _ in 0..n {
                g.1 += 1;
                let id = format!("fake:///z/m-{}", g.1);
                g.2.push(Machine {
                    id,
                    state: InstanceState::Pending,
                });
            }
        }
    }

    #[async_trait]
    impl GroupProvider for FakeGroup {
        fn group_name(&self) -> String {
            "fake".into()
        }

        async fn target_size(&self) -> Result<u32> {
            Ok(self.inner.lock().expect("lock").0)
        }

        async fn set_target_size(&self, size: u32) -> Result<()> {
            let mut g = self.inner.lock().expect("lock");
            g.0 = size;
            let counted =
                g.2.iter()
                    .filter(|m| match self.fault {
                        Fault::CountsOnlyRunning => m.state == InstanceState::Running,
                        _ => m.state != InstanceState::Terminating,
                    })
                    .count();
            if (size as usize) > counted {
                Self::add(&mut g, size as usize - counted);
            } else {
                let mut extra = counted - size as usize;
                for m in g.2.iter_mut().rev() {
                    if extra > 0 && m.state != InstanceState::Terminating {
                        m.state = InstanceState::Terminating;
                        extra -= 1;
                    }
                }
            }
            Ok(())
        }

        async fn delete_instances(&self, ids: &[String]) -> Result<()> {
            let mut g = self.inner.lock().expect("lock");
            if self.fault != Fault::IgnoresForeign
                && let Some(foreign) = ids.iter().find(|id| {
                    !id.starts_with("fake:///z/m-")
                        || id["fake:///z/m-".len()..]
                            .parse::<u64>()
                            .map_or(true, |n| n > g.1)
                })
            {
                return Err(ProviderError::InvalidConfig(format!(
                    "{foreign} is not in group fake"
                )));
            }
            for id in ids {
                let found =
                    g.2.iter()
                        .position(|m| &m.id == id && m.state != InstanceState::Terminating);
                match (found, self.fault) {
                    (Some(_), Fault::PicksItsOwnVictims) => {
                        if let Some(m) =
                            g.2.iter_mut()
                                .rev()
                                .find(|m| m.state != InstanceState::Terminating)
                        {
                            m.state = InstanceState::Terminating;
                        }
                        g.0 = g.0.saturating_sub(1);
                    }
                    (Some(p), Fault::HidesDeleting) => {
                        g.2.remove(p);
                        g.0 = g.0.saturating_sub(1);
                    }
                    (Some(p), _) => {
                        g.2[p].state = InstanceState::Terminating;
                        g.0 = g.0.saturating_sub(1);
                    }
                    (None, Fault::ShrinksTwice) => g.0 = g.0.saturating_sub(1),
                    (None, _) => {}
                }
            }
            Ok(())
        }

        async fn instances(&self) -> Result<Vec<Instance>> {
            let g = self.inner.lock().expect("lock");
            Ok(g.2
                .iter()
                .map(|m| Instance {
                    id: m.id.clone(),
                    provider_id: m.id.clone(),
                    state: m.state,
                    tags: BTreeMap::new(),
                    zone: Some("z".into()),
                    instance_type: None,
                    addresses: Vec::new(),
                    created_unix: None,
                    labels: BTreeMap::new(),
                    failure: None,
                })
                .collect())
        }
    }

    fn context(group: &Arc<FakeGroup>) -> GroupConformance {
        let mut c = GroupConformance::new("fake:///elsewhere/m-0");
        c.settle_timeout = Duration::from_secs(5);
        let g = group.clone();
        c.advance = Some(Arc::new(move || {
            g.advance();
            Box::pin(async {})
        }));
        c
    }

    #[tokio::test(start_paused = true)]
    async fn a_correct_group_passes_every_check() {
        let group = FakeGroup::new(Fault::None);
        // A group that already has machines keeps them.
        group.set_target_size(1).await.expect("set");
        group.advance();
        let report = run_all(group.as_ref(), &context(&group)).await;
        let report = report.into_result().expect("the fake group conforms");
        assert_eq!(report.passed.len(), 6, "{:?}", report.passed);
        assert_eq!(group.target_size().await.expect("size"), 1);
        assert_eq!(group.instances().await.expect("list").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_hook_the_transition_check_is_skipped() {
        let group = FakeGroup::new(Fault::None);
        let mut c = context(&group);
        c.advance = None;
        // Machines boot on their own here.
        let g = group.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                g.advance();
            }
        });
        let report = run_all(group.as_ref(), &c).await;
        ticker.abort();
        let report = report.into_result().expect("the fake group conforms");
        assert_eq!(report.skipped, vec!["group_instances_list_transitions"]);
    }

    async fn failures(fault: Fault) -> Vec<&'static str> {
        let group = FakeGroup::new(fault);
        let report = run_all(group.as_ref(), &context(&group)).await;
        report.failed.iter().map(|f| f.check).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_fault_is_caught() {
        assert!(
            failures(Fault::CountsOnlyRunning)
                .await
                .contains(&"group_resize_is_idempotent")
        );
        assert!(
            failures(Fault::PicksItsOwnVictims)
                .await
                .contains(&"group_delete_instances_is_exact")
        );
        assert!(
            failures(Fault::ShrinksTwice)
                .await
                .contains(&"group_delete_gone_instance")
        );
        assert_eq!(
            failures(Fault::IgnoresForeign).await,
            vec!["group_foreign_instance_is_invalid"]
        );
        assert_eq!(
            failures(Fault::HidesDeleting).await,
            vec!["group_instances_list_transitions"]
        );
    }
}
