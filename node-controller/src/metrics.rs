use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use kube_node_crds::names::MachinePhase;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
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

/// Labels of the reconcile families that every controller of one binary shares, so each
/// metric name is registered once (`controller`, `result`, `reason`: all bounded).
pub type SharedLabels = Vec<(String, String)>;

/// The reconcile families every controller of one binary records into (each metric name can
/// be registered only once): total, duration, errors, and the work queues.
#[derive(Clone, Debug)]
pub struct ReconcileFamilies {
    reconciles: Family<SharedLabels, Counter>,
    duration: Family<SharedLabels, Histogram, fn() -> Histogram>,
    errors: Family<SharedLabels, Counter>,
    queue_depth: Family<SharedLabels, Gauge>,
    queues: Arc<Mutex<HashMap<String, WorkQueue>>>,
}

impl Default for ReconcileFamilies {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            duration: Family::new_with_constructor(reconcile_histogram),
            errors: Family::default(),
            queue_depth: Family::default(),
            queues: Arc::default(),
        }
    }
}

impl ReconcileFamilies {
    /// Registers the families.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kube_node_reconcile",
            "Reconciles by controller and result",
            self.reconciles.clone(),
        );
        registry.register(
            "kube_node_reconcile_duration_seconds",
            "Duration of reconciles by controller",
            self.duration.clone(),
        );
        registry.register(
            "kube_node_reconcile_errors",
            "Failed reconciles by controller and reason",
            self.errors.clone(),
        );
        registry.register(
            "kube_node_workqueue_depth",
            "Objects waiting for a reconcile (triggered, not yet started) by controller",
            self.queue_depth.clone(),
        );
    }

    /// Records one reconcile of `controller`; `err` is the failure's bounded reason.
    pub fn reconciled(&self, controller: &str, secs: f64, err: Option<&str>) {
        let result = if err.is_some() { "error" } else { "ok" };
        self.reconciles
            .get_or_create(&vec![
                ("controller".to_string(), controller.to_string()),
                ("result".to_string(), result.to_string()),
            ])
            .inc();
        self.duration
            .get_or_create(&vec![("controller".to_string(), controller.to_string())])
            .observe(secs);
        if let Some(reason) = err {
            self.errors
                .get_or_create(&vec![
                    ("controller".to_string(), controller.to_string()),
                    ("reason".to_string(), reason.to_string()),
                ])
                .inc();
        }
    }

    /// The work queue of `controller` (every call for one controller shares one queue).
    pub fn work_queue(&self, controller: &str) -> WorkQueue {
        let depth = self
            .queue_depth
            .get_or_create(&vec![("controller".to_string(), controller.to_string())])
            .clone();
        let Ok(mut queues) = self.queues.lock() else {
            return WorkQueue {
                pending: Arc::default(),
                depth,
            };
        };
        queues
            .entry(controller.to_string())
            .or_insert_with(|| WorkQueue {
                pending: Arc::default(),
                depth,
            })
            .clone()
    }
}

/// What a controller's work queue holds: the objects a trigger (a watch event, a mapped
/// object, a manual trigger) asked to reconcile and whose reconcile has not started. The
/// runtime's scheduler cannot be inspected, so the controller tells it both ends. A requeue
/// after a delay is not counted, as client-go's delaying queue holds such items apart until
/// they are due.
#[derive(Clone, Debug, Default)]
pub struct WorkQueue {
    pending: Arc<Mutex<HashSet<String>>>,
    depth: Gauge,
}

impl WorkQueue {
    /// An object was triggered.
    pub fn add(&self, key: &str) {
        self.update(|p| {
            p.insert(key.to_string());
        });
    }

    /// Its reconcile started, or it is gone and none will.
    pub fn done(&self, key: &str) {
        self.update(|p| {
            p.remove(key);
        });
    }

    /// The objects waiting now.
    pub fn depth(&self) -> i64 {
        self.depth.get()
    }

    fn update(&self, f: impl FnOnce(&mut HashSet<String>)) {
        if let Ok(mut p) = self.pending.lock() {
            f(&mut p);
            self.depth.set(i64::try_from(p.len()).unwrap_or(i64::MAX));
        }
    }
}

/// The histogram of reconcile durations.
pub fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_queue_counts_each_waiting_object_once_and_is_per_controller() {
        let families = ReconcileFamilies::default();
        let nodes = families.work_queue("node");
        let sets = families.work_queue("nodeset");
        nodes.add("a");
        nodes.add("a");
        nodes.add("b");
        sets.add("a");
        assert_eq!(
            nodes.depth(),
            2,
            "a trigger of a waiting object adds nothing"
        );
        assert_eq!(sets.depth(), 1);
        nodes.done("a");
        nodes.done("never-queued");
        assert_eq!(nodes.depth(), 1);
        // A second handle on the same controller's queue shares it.
        let again = families.work_queue("node");
        again.add("c");
        assert_eq!(nodes.depth(), 2);
        again.done("b");
        again.done("c");
        assert_eq!(nodes.depth(), 0);
        nodes.add("b");

        let mut registry = Registry::default();
        families.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("kube_node_workqueue_depth{controller=\"node\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kube_node_workqueue_depth{controller=\"nodeset\"} 1"),
            "{text}"
        );
    }
}
