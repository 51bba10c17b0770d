//! The reconcile metric families and work-queue depth every controller of one binary records
//! into. A metric name can be registered only once per registry, so one [`ReconcileFamilies`]
//! is created per process and each controller records under its own `controller` label.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    invalid_objects: Family<SharedLabels, Gauge>,
    queues: Arc<Mutex<HashMap<String, WorkQueue>>>,
}

impl Default for ReconcileFamilies {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            duration: Family::new_with_constructor(reconcile_histogram),
            errors: Family::default(),
            queue_depth: Family::default(),
            invalid_objects: Family::default(),
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
        registry.register(
            "kube_node_invalid_objects",
            "NodeClasses and NodeSets set aside because they do not decode or validate, by kind",
            self.invalid_objects.clone(),
        );
    }

    /// The count of set-aside objects of `kind` (`NodeClass`, `NodeSet`).
    pub fn invalid_objects(&self, kind: &str) -> Gauge {
        self.invalid_objects
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .clone()
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
