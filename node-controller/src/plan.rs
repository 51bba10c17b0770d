//! The next-state function of a Node's machine: pure, so every transition is unit-tested.

use std::time::Duration;

use jiff::Timestamp;
use kube_node_crds::names::MachinePhase;
use kube_node_provider::InstanceState;

/// What the provider says about the machine behind the Node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineObs {
    /// Not looked up this pass (a Ready Node found in the shared inventory).
    NotChecked,
    /// The provider reports it gone.
    Gone,
    /// It exists in this state.
    Present(InstanceState),
}

/// Everything `plan` looks at, read from the Node, its NodeClass and the provider.
#[derive(Clone, Debug)]
pub struct Observed {
    /// Our finalizer is on the Node.
    pub has_finalizer: bool,
    /// `metadata.deletionTimestamp`.
    pub deleting_since: Option<Timestamp>,
    /// `spec.providerID` is set.
    pub has_provider_id: bool,
    /// The phase in the Node's `MachineReady` condition.
    pub phase: Option<MachinePhase>,
    /// The kubelet's `Ready` condition is True.
    pub kubelet_ready: bool,
    /// The machine.
    pub machine: MachineObs,
    /// When the machine was created (the launched-at annotation).
    pub launched_at: Option<Timestamp>,
    /// The NodeClass's registration timeout.
    pub registration_timeout: Duration,
    /// The NodeClass's drain timeout.
    pub drain_timeout: Duration,
    /// `spec.unschedulable`.
    pub cordoned: bool,
    /// Pods still to evict (None when not listed: not deleting).
    pub pods_to_evict: Option<usize>,
}

/// The one step a pass takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Put the finalizer on before anything else.
    AddFinalizer,
    /// Create the machine (idempotent on the Node UID) and write the providerID.
    Create,
    /// The machine exists; wait for it to boot or its kubelet to register.
    WaitForRegistration {
        /// Launching or Registering.
        phase: MachinePhase,
        /// When to look again.
        requeue: Duration,
    },
    /// The kubelet reported Ready: drop the unregistered taint and the token.
    MarkReady,
    /// Nothing to do (Ready, or Failed kept for inspection).
    Steady,
    /// Mark the machine Failed.
    Fail {
        /// The event reason.
        reason: &'static str,
        /// The condition message.
        message: String,
    },
    /// Mark the Node unschedulable.
    Cordon,
    /// Evict the remaining pods.
    Drain,
    /// Delete the machine; `drain_timed_out` says the drain was cut short.
    DeleteMachine {
        /// The drain timeout passed with pods left.
        drain_timed_out: bool,
    },
    /// The machine is terminating; poll until gone.
    WaitForGone,
    /// The machine is gone: delete the token, remove the finalizer.
    Finalize,
    /// Not ours (no finalizer and being deleted): nothing to do.
    Ignore,
}

/// How often to look at a booting machine.
pub const BOOT_POLL: Duration = Duration::from_secs(5);

/// The next step for a Node's machine.
pub fn plan(o: &Observed, now: Timestamp) -> Action {
    if let Some(since) = o.deleting_since {
        if !o.has_finalizer {
            return Action::Ignore;
        }
        return plan_deletion(o, since, now);
    }
    if !o.has_finalizer {
        return Action::AddFinalizer;
    }
    if !o.has_provider_id {
        return Action::Create;
    }
    if o.phase == Some(MachinePhase::Failed) {
        // Kept for inspection; a NodeSet replaces it, a person deletes it.
        return Action::Steady;
    }
    match o.machine {
        MachineObs::Gone => {
            return Action::Fail {
                reason: "MachineVanished",
                message: "machine vanished".to_string(),
            };
        }
        MachineObs::Present(InstanceState::Terminating) => {
            return Action::Fail {
                reason: "MachineVanished",
                message: "machine vanished: it is terminating outside kube-node".to_string(),
            };
        }
        _ => {}
    }
    if o.kubelet_ready {
        return if o.phase == Some(MachinePhase::Ready) {
            Action::Steady
        } else {
            Action::MarkReady
        };
    }
    if o.phase == Some(MachinePhase::Ready) {
        // A kubelet that was Ready and is not now is the kubelet's business (its own Ready
        // condition says so); the machine still exists.
        return Action::Steady;
    }
    let elapsed = o
        .launched_at
        .map(|t| Duration::try_from(now.duration_since(t)).unwrap_or_default());
    if let Some(elapsed) = elapsed
        && elapsed >= o.registration_timeout
    {
        return Action::Fail {
            reason: "RegistrationTimeout",
            message: format!(
                "the kubelet did not report Ready within {}s of launch",
                o.registration_timeout.as_secs()
            ),
        };
    }
    let phase = match o.machine {
        MachineObs::Present(InstanceState::Pending) => MachinePhase::Launching,
        _ => MachinePhase::Registering,
    };
    let left = elapsed.map_or(BOOT_POLL, |e| o.registration_timeout.saturating_sub(e));
    Action::WaitForRegistration {
        phase,
        requeue: left.clamp(Duration::from_millis(200), BOOT_POLL),
    }
}

fn plan_deletion(o: &Observed, since: Timestamp, now: Timestamp) -> Action {
    match o.machine {
        MachineObs::Gone => return Action::Finalize,
        MachineObs::Present(InstanceState::Terminating) => return Action::WaitForGone,
        _ => {}
    }
    if !o.cordoned {
        return Action::Cordon;
    }
    let draining_for = Duration::try_from(now.duration_since(since)).unwrap_or_default();
    match o.pods_to_evict {
        Some(n) if n > 0 => {
            if draining_for >= o.drain_timeout {
                Action::DeleteMachine {
                    drain_timed_out: true,
                }
            } else {
                Action::Drain
            }
        }
        _ => Action::DeleteMachine {
            drain_timed_out: false,
        },
    }
}

/// The phase a step leaves the Node in (None: unchanged).
pub fn phase_after(action: &Action) -> Option<MachinePhase> {
    Some(match action {
        Action::WaitForRegistration { phase, .. } => *phase,
        Action::MarkReady => MachinePhase::Ready,
        Action::Fail { .. } => MachinePhase::Failed,
        Action::Cordon
        | Action::Drain
        | Action::DeleteMachine { .. }
        | Action::WaitForGone
        | Action::Finalize => MachinePhase::Deleting,
        Action::Create => MachinePhase::Launching,
        Action::AddFinalizer => MachinePhase::Pending,
        Action::Steady | Action::Ignore => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).expect("ts")
    }

    fn base() -> Observed {
        Observed {
            has_finalizer: true,
            deleting_since: None,
            has_provider_id: true,
            phase: Some(MachinePhase::Launching),
            kubelet_ready: false,
            machine: MachineObs::Present(InstanceState::Pending),
            launched_at: Some(t(0)),
            registration_timeout: Duration::from_secs(900),
            drain_timeout: Duration::from_secs(600),
            cordoned: false,
            pods_to_evict: None,
        }
    }

    #[test]
    fn finalizer_comes_first() {
        let o = Observed {
            has_finalizer: false,
            has_provider_id: false,
            phase: None,
            ..base()
        };
        assert_eq!(plan(&o, t(1)), Action::AddFinalizer);
    }

    #[test]
    fn no_provider_id_creates() {
        let o = Observed {
            has_provider_id: false,
            machine: MachineObs::NotChecked,
            launched_at: None,
            phase: Some(MachinePhase::Pending),
            ..base()
        };
        assert_eq!(plan(&o, t(1)), Action::Create);
    }

    #[test]
    fn booting_machine_waits_then_registers() {
        let a = plan(&base(), t(10));
        assert_eq!(
            a,
            Action::WaitForRegistration {
                phase: MachinePhase::Launching,
                requeue: BOOT_POLL
            }
        );
        let running = Observed {
            machine: MachineObs::Present(InstanceState::Running),
            ..base()
        };
        assert!(matches!(
            plan(&running, t(10)),
            Action::WaitForRegistration {
                phase: MachinePhase::Registering,
                ..
            }
        ));
        let ready = Observed {
            kubelet_ready: true,
            ..running.clone()
        };
        assert_eq!(plan(&ready, t(10)), Action::MarkReady);
        let steady = Observed {
            phase: Some(MachinePhase::Ready),
            machine: MachineObs::NotChecked,
            ..ready
        };
        assert_eq!(plan(&steady, t(10_000)), Action::Steady);
    }

    #[test]
    fn requeue_never_overshoots_the_timeout() {
        let o = Observed {
            registration_timeout: Duration::from_secs(12),
            ..base()
        };
        assert!(matches!(
            plan(&o, t(10)),
            Action::WaitForRegistration { requeue, .. } if requeue == Duration::from_secs(2)
        ));
    }

    #[test]
    fn registration_timeout_fails_and_sticks() {
        let o = base();
        let a = plan(&o, t(900));
        assert!(matches!(
            a,
            Action::Fail {
                reason: "RegistrationTimeout",
                ..
            }
        ));
        assert_eq!(phase_after(&a), Some(MachinePhase::Failed));
        let failed = Observed {
            phase: Some(MachinePhase::Failed),
            kubelet_ready: true,
            ..o
        };
        assert_eq!(plan(&failed, t(2000)), Action::Steady);
    }

    #[test]
    fn vanished_machine_fails() {
        for m in [
            MachineObs::Gone,
            MachineObs::Present(InstanceState::Terminating),
        ] {
            let o = Observed {
                phase: Some(MachinePhase::Ready),
                kubelet_ready: true,
                machine: m,
                ..base()
            };
            assert!(matches!(
                plan(&o, t(5)),
                Action::Fail {
                    reason: "MachineVanished",
                    ..
                }
            ));
        }
    }

    #[test]
    fn deletion_cordons_drains_deletes_waits_finalizes() {
        let del = Observed {
            deleting_since: Some(t(100)),
            phase: Some(MachinePhase::Ready),
            kubelet_ready: true,
            machine: MachineObs::Present(InstanceState::Running),
            pods_to_evict: Some(2),
            ..base()
        };
        assert_eq!(plan(&del, t(101)), Action::Cordon);
        let cordoned = Observed {
            cordoned: true,
            ..del
        };
        assert_eq!(plan(&cordoned, t(101)), Action::Drain);
        assert_eq!(
            plan(&cordoned, t(100 + 600)),
            Action::DeleteMachine {
                drain_timed_out: true
            }
        );
        let drained = Observed {
            pods_to_evict: Some(0),
            ..cordoned
        };
        assert_eq!(
            plan(&drained, t(102)),
            Action::DeleteMachine {
                drain_timed_out: false
            }
        );
        let terminating = Observed {
            machine: MachineObs::Present(InstanceState::Terminating),
            ..drained.clone()
        };
        assert_eq!(plan(&terminating, t(103)), Action::WaitForGone);
        let gone = Observed {
            machine: MachineObs::Gone,
            ..drained
        };
        assert_eq!(plan(&gone, t(104)), Action::Finalize);
        assert_eq!(phase_after(&Action::Finalize), Some(MachinePhase::Deleting));
    }

    #[test]
    fn deletion_without_machine_finalizes() {
        let o = Observed {
            deleting_since: Some(t(0)),
            has_provider_id: false,
            machine: MachineObs::Gone,
            ..base()
        };
        assert_eq!(plan(&o, t(1)), Action::Finalize);
    }

    #[test]
    fn deletion_without_finalizer_is_ignored() {
        let o = Observed {
            deleting_since: Some(t(0)),
            has_finalizer: false,
            ..base()
        };
        assert_eq!(plan(&o, t(1)), Action::Ignore);
    }
}
