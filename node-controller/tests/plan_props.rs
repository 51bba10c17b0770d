//! Properties of the Node planner, `node_controller::plan::plan`, over every combination of
//! what a pass can observe: the promises the controller's safety rests on (no machine is
//! leaked by dropping the finalizer early, nothing is created for or deleted from the wrong
//! Node, no Node waits or drains forever, a terminal state stays put).

use std::time::Duration;

use jiff::Timestamp;
use kube_node_crds::names::MachinePhase;
use kube_node_provider::InstanceState;
use node_controller::plan::{Action, BOOT_POLL, MachineObs, Observed, phase_after, plan};
use proptest::prelude::*;

const EPOCH: i64 = 1_700_000_000_000;

fn at(millis: i64) -> Timestamp {
    Timestamp::from_millisecond(EPOCH + millis).expect("valid timestamp")
}

fn since(now: Timestamp, then: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(then)).unwrap_or_default()
}

fn arb_phase() -> impl Strategy<Value = Option<MachinePhase>> {
    prop_oneof![
        Just(None),
        Just(Some(MachinePhase::Pending)),
        Just(Some(MachinePhase::Launching)),
        Just(Some(MachinePhase::Registering)),
        Just(Some(MachinePhase::Ready)),
        Just(Some(MachinePhase::Failed)),
        Just(Some(MachinePhase::Deleting)),
    ]
}

fn arb_machine() -> impl Strategy<Value = MachineObs> {
    prop_oneof![
        Just(MachineObs::NotChecked),
        Just(MachineObs::Gone),
        Just(MachineObs::Present(InstanceState::Pending)),
        Just(MachineObs::Present(InstanceState::Running)),
        Just(MachineObs::Present(InstanceState::Terminating)),
    ]
}

/// A moment within an hour either side of the epoch, to the millisecond: timestamps before
/// and after one another, and equal ones, all occur.
fn arb_time() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        (-3_600_000i64..3_600_000).prop_map(at),
        (-3_600i64..3_600).prop_map(|s| at(s * 1000)),
    ]
}

fn arb_timeout() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        (1u64..3_600).prop_map(Duration::from_secs),
        (1u64..3_600_000).prop_map(Duration::from_millis),
    ]
}

prop_compose! {
    fn arb_observed()(
        has_finalizer in any::<bool>(),
        deleting_since in proptest::option::of(arb_time()),
        has_provider_id in any::<bool>(),
        phase in arb_phase(),
        kubelet_ready in any::<bool>(),
        machine in arb_machine(),
        launched_at in proptest::option::of(arb_time()),
        registration_timeout in arb_timeout(),
        drain_timeout in arb_timeout(),
        cordoned in any::<bool>(),
        pods_to_evict in proptest::option::of(0usize..4),
    ) -> Observed {
        Observed {
            has_finalizer,
            deleting_since,
            has_provider_id,
            phase,
            kubelet_ready,
            machine,
            launched_at,
            registration_timeout,
            drain_timeout,
            cordoned,
            pods_to_evict,
        }
    }
}

fn arb_live_machine() -> impl Strategy<Value = MachineObs> {
    prop_oneof![
        Just(MachineObs::NotChecked),
        Just(MachineObs::Present(InstanceState::Pending)),
        Just(MachineObs::Present(InstanceState::Running)),
    ]
}

/// `d` scaled by `permille / 1000`, rounded down: strictly less than `d` when `permille` is
/// below 1000 and `d` is not zero.
fn part_of(d: Duration, permille: u32) -> Duration {
    let nanos = d.as_nanos() * u128::from(permille) / 1000;
    Duration::from_nanos(u64::try_from(nanos).expect("under an hour"))
}

prop_compose! {
    /// A deleting Node, cordoned, its machine still there, pods left, and a moment before its
    /// drain timeout.
    fn arb_draining()(
        o in arb_observed(),
        machine in arb_live_machine(),
        pods in 1usize..4,
        since in arb_time(),
        drain_ms in 1u64..3_600_000,
        permille in 0u32..1000,
    ) -> (Observed, Timestamp) {
        let drain_timeout = Duration::from_millis(drain_ms);
        let now = since
            .checked_add(part_of(drain_timeout, permille))
            .expect("in range");
        let o = Observed {
            has_finalizer: true,
            deleting_since: Some(since),
            machine,
            cordoned: true,
            pods_to_evict: Some(pods),
            drain_timeout,
            ..o
        };
        (o, now)
    }
}

prop_compose! {
    /// A live Node whose machine was launched and has not registered, at a moment before its
    /// registration timeout.
    fn arb_waiting()(
        o in arb_observed(),
        machine in arb_live_machine(),
        phase in prop_oneof![
            Just(None),
            Just(Some(MachinePhase::Pending)),
            Just(Some(MachinePhase::Launching)),
            Just(Some(MachinePhase::Registering)),
        ],
        launched in arb_time(),
        timeout_ms in 1u64..3_600_000,
        permille in 0u32..1000,
    ) -> (Observed, Timestamp) {
        let registration_timeout = Duration::from_millis(timeout_ms);
        let now = launched
            .checked_add(part_of(registration_timeout, permille))
            .expect("in range");
        let o = Observed {
            has_finalizer: true,
            deleting_since: None,
            has_provider_id: true,
            phase,
            kubelet_ready: false,
            machine,
            launched_at: Some(launched),
            registration_timeout,
            ..o
        };
        (o, now)
    }
}

/// The steps that only a deletion takes.
fn is_deletion_step(a: &Action) -> bool {
    matches!(
        a,
        Action::Cordon
            | Action::Drain
            | Action::DeleteMachine { .. }
            | Action::WaitForGone
            | Action::Finalize
    )
}

/// Whether the machine may still exist as far as this pass knows: the provider reports it, or
/// it was not asked while a providerID names one or the phase says a create was attempted.
fn machine_may_exist(o: &Observed) -> bool {
    match o.machine {
        MachineObs::Gone => false,
        MachineObs::Present(_) => true,
        MachineObs::NotChecked => {
            o.has_provider_id || o.phase.is_some_and(|p| p != MachinePhase::Pending)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// The finalizer is what keeps a Node (and with it the knowledge of its machine) around:
    /// it is removed only once the provider said the machine is gone.
    #[test]
    fn the_finalizer_goes_only_once_the_machine_is_gone(o in arb_observed(), now in arb_time()) {
        let a = plan(&o, now);
        if machine_may_exist(&o) {
            prop_assert_ne!(&a, &Action::Finalize);
        }
        if a == Action::Finalize {
            prop_assert_eq!(o.machine, MachineObs::Gone);
            prop_assert!(o.has_finalizer && o.deleting_since.is_some());
        }
    }

    /// A Node nobody deletes is never cordoned, drained, stripped of its machine or
    /// finalized; a deleting Node is never given a machine, nor a finalizer it lost.
    #[test]
    fn deletion_steps_happen_exactly_while_the_node_is_deleted(
        o in arb_observed(),
        now in arb_time(),
    ) {
        let a = plan(&o, now);
        match o.deleting_since {
            None => {
                prop_assert!(!is_deletion_step(&a), "{:?} for a Node not being deleted", a);
                prop_assert_ne!(&a, &Action::Ignore);
            }
            Some(_) => {
                prop_assert!(
                    is_deletion_step(&a) || a == Action::Ignore,
                    "{:?} for a deleting Node",
                    a
                );
                prop_assert_eq!(phase_after(&a), (a != Action::Ignore).then_some(MachinePhase::Deleting));
            }
        }
    }

    /// Without our finalizer a deleting Node is not ours to act on, and a live one gets the
    /// finalizer before anything touches the provider.
    #[test]
    fn nothing_happens_without_the_finalizer(o in arb_observed(), now in arb_time()) {
        let o = Observed { has_finalizer: false, ..o };
        let want = if o.deleting_since.is_some() { Action::Ignore } else { Action::AddFinalizer };
        prop_assert_eq!(plan(&o, now), want);
    }

    /// A machine is created only for a live, finalized Node that names none yet, and every
    /// such Node gets one.
    #[test]
    fn create_exactly_when_a_live_node_has_no_provider_id(
        o in arb_observed(),
        now in arb_time(),
    ) {
        let a = plan(&o, now);
        let wants_machine = o.has_finalizer && o.deleting_since.is_none() && !o.has_provider_id;
        prop_assert_eq!(a == Action::Create, wants_machine, "{:?}", a);
        if a == Action::Create {
            prop_assert_eq!(phase_after(&a), Some(MachinePhase::Launching));
        }
    }

    /// The machine is deleted only from a cordoned Node, and before the drain timeout only once
    /// no pod is left to evict; a Terminating or gone machine is not deleted again.
    #[test]
    fn the_machine_is_deleted_only_after_cordon_and_drain(o in arb_observed(), now in arb_time()) {
        let a = plan(&o, now);
        if let Action::DeleteMachine { drain_timed_out } = a {
            let since = o.deleting_since.expect("deleting");
            prop_assert!(o.cordoned);
            prop_assert!(!matches!(
                o.machine,
                MachineObs::Gone | MachineObs::Present(InstanceState::Terminating)
            ));
            let pods_left = o.pods_to_evict.unwrap_or(0);
            if drain_timed_out {
                prop_assert!(pods_left > 0);
                prop_assert!(since_ge(now, since, o.drain_timeout));
            } else {
                prop_assert_eq!(pods_left, 0);
            }
        }
        if a == Action::Drain {
            let since = o.deleting_since.expect("deleting");
            prop_assert!(o.cordoned && o.pods_to_evict.unwrap_or(0) > 0);
            prop_assert!(!since_ge(now, since, o.drain_timeout));
        }
    }

    /// A PodDisruptionBudget delays a deletion, never blocks it: the same observation drains
    /// until the drain timeout and deletes the machine from then on.
    #[test]
    fn a_drain_ends_at_the_drain_timeout((o, now) in arb_draining()) {
        prop_assert_eq!(plan(&o, now), Action::Drain);
        let since = o.deleting_since.expect("deleting");
        let deadline = since.checked_add(o.drain_timeout).expect("in range");
        prop_assert_eq!(plan(&o, deadline), Action::DeleteMachine { drain_timed_out: true });
    }

    /// A machine whose kubelet never reports Ready is marked Failed at the registration
    /// timeout, not before, and never while the kubelet is Ready.
    #[test]
    fn registration_fails_only_after_the_timeout(o in arb_observed(), now in arb_time()) {
        let a = plan(&o, now);
        if let Action::Fail { reason: "RegistrationTimeout", .. } = a {
            let launched = o.launched_at.expect("launch time known");
            prop_assert!(since_ge(now, launched, o.registration_timeout));
            prop_assert!(!o.kubelet_ready);
            prop_assert!(o.phase != Some(MachinePhase::Ready));
        }
        if let Action::WaitForRegistration { phase, requeue } = a {
            prop_assert!(!o.kubelet_ready);
            prop_assert!(matches!(phase, MachinePhase::Launching | MachinePhase::Registering));
            prop_assert!(requeue >= Duration::from_millis(200) && requeue <= BOOT_POLL);
        }
    }

    /// No machine waits forever: before the timeout the Node waits and looks again no later
    /// than the timeout (or the shortest requeue), and at the timeout it fails.
    #[test]
    fn registration_waits_until_the_timeout_then_fails((o, now) in arb_waiting()) {
        let launched = o.launched_at.expect("launched");
        match plan(&o, now) {
            Action::WaitForRegistration { requeue, .. } => {
                let left = o.registration_timeout.saturating_sub(since(now, launched));
                prop_assert!(requeue <= left.max(Duration::from_millis(200)));
            }
            other => prop_assert!(false, "{:?} before the registration timeout", other),
        }
        let deadline = launched.checked_add(o.registration_timeout).expect("in range");
        let later = plan(&o, deadline);
        prop_assert!(
            matches!(later, Action::Fail { reason: "RegistrationTimeout", .. }),
            "still {:?} at the timeout",
            later
        );
    }

    /// A vanished machine fails its Node; the Node is not deleted for it (a NodeSet or a
    /// person decides), and Failed is kept: re-planning after a Fail or a MarkReady has been
    /// recorded does nothing.
    #[test]
    fn terminal_and_ready_states_are_fixed_points(o in arb_observed(), now in arb_time()) {
        let a = plan(&o, now);
        if let Action::Fail { reason: "MachineVanished", .. } = a {
            prop_assert!(matches!(
                o.machine,
                MachineObs::Gone | MachineObs::Present(InstanceState::Terminating)
            ));
        }
        if matches!(a, Action::Fail { .. }) {
            prop_assert!(o.phase != Some(MachinePhase::Failed));
        }
        if a == Action::MarkReady {
            prop_assert!(o.kubelet_ready && o.phase != Some(MachinePhase::Ready));
        }
        if matches!(a, Action::Fail { .. } | Action::MarkReady) {
            let applied = Observed { phase: phase_after(&a), ..o.clone() };
            prop_assert_eq!(plan(&applied, now), Action::Steady);
        }
        if o.phase == Some(MachinePhase::Failed)
            && o.has_finalizer
            && o.has_provider_id
            && o.deleting_since.is_none()
        {
            prop_assert_eq!(a, Action::Steady);
        }
    }
}

/// `now - then >= d`, with `now` before `then` counting as no time passed.
fn since_ge(now: Timestamp, then: Timestamp, d: Duration) -> bool {
    since(now, then) >= d
}
