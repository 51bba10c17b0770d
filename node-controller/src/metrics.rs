use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube_node_crds::names::MachinePhase;
use kube_node_runtime::{ReconcileFamilies, WorkQueue};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A machine phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase.
    pub phase: String,
}

/// An orphan-collector action (`deleted` / `paused`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// The action.
    pub action: String,
}

/// The node-controller's metrics. All labels are bounded (no node or machine names).
#[derive(Clone)]
pub struct Metrics {
    pub(crate) families: ReconcileFamilies,
    pub(crate) queue: WorkQueue,
    pub(crate) nodes: Family<PhaseLabels, Gauge>,
    pub(crate) orphan_actions: Family<ActionLabels, Counter>,
    pub(crate) circuit_open: Gauge,
    phases: Arc<Mutex<HashMap<String, MachinePhase>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let families = ReconcileFamilies::default();
        Self {
            queue: families.work_queue("node"),
            families,
            nodes: Family::default(),
            orphan_actions: Family::default(),
            circuit_open: Gauge::default(),
            phases: Arc::default(),
        }
    }
}

const PHASES: [MachinePhase; 6] = [
    MachinePhase::Pending,
    MachinePhase::Launching,
    MachinePhase::Registering,
    MachinePhase::Ready,
    MachinePhase::Failed,
    MachinePhase::Deleting,
];

impl Metrics {
    /// New metrics registered into `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        m.families.register(registry);
        registry.register(
            "kube_node_nodes",
            "Nodes managed by kube-node by machine phase",
            m.nodes.clone(),
        );
        registry.register(
            "kube_node_orphan_gc_actions",
            "Orphan collector actions (deleted machines, paused waves)",
            m.orphan_actions.clone(),
        );
        registry.register(
            "kube_node_orphan_gc_circuit_open",
            "1 while the orphan collector's circuit breaker holds",
            m.circuit_open.clone(),
        );
        m
    }

    pub(crate) fn reconciled(&self, controller: &str, secs: f64, err: Option<&'static str>) {
        self.families.reconciled(controller, secs, err);
    }

    /// The count of set-aside objects of `kind` (`kube_node_invalid_objects{kind}`).
    pub fn invalid_objects(&self, kind: &str) -> Gauge {
        self.families.invalid_objects(kind)
    }

    /// The reconcile families (`kube_node_reconcile_total`, `..._duration_seconds`,
    /// `..._errors_total`, `kube_node_workqueue_depth`), for the other controllers of the
    /// binary to record into.
    pub fn reconcile_families(&self) -> ReconcileFamilies {
        self.families.clone()
    }

    /// The Node controller's work queue.
    pub fn work_queue(&self) -> &WorkQueue {
        &self.queue
    }

    /// Records a Node's phase (None: no longer managed) and refreshes the gauge.
    pub(crate) fn set_phase(&self, uid: &str, phase: Option<MachinePhase>) {
        let Ok(mut phases) = self.phases.lock() else {
            return;
        };
        match phase {
            Some(p) => phases.insert(uid.to_string(), p),
            None => phases.remove(uid),
        };
        for p in PHASES {
            let n = phases.values().filter(|v| **v == p).count();
            self.nodes
                .get_or_create(&PhaseLabels {
                    phase: p.as_str().to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn orphan_action(&self, action: &str, n: u64) {
        self.orphan_actions
            .get_or_create(&ActionLabels {
                action: action.to_string(),
            })
            .inc_by(n);
    }

    /// How many Nodes are in `phase` (for tests and the simulator).
    pub fn nodes_in_phase(&self, phase: MachinePhase) -> i64 {
        self.nodes
            .get_or_create(&PhaseLabels {
                phase: phase.as_str().to_string(),
            })
            .get()
    }

    /// How many orphan-collector actions of this kind happened (`deleted`, `paused`).
    pub fn orphan_actions(&self, action: &str) -> u64 {
        self.orphan_actions
            .get_or_create(&ActionLabels {
                action: action.to_string(),
            })
            .get()
    }
}
