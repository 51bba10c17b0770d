//! Prometheus metrics of the NodeSet controller (bounded labels only).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the reconcile families shared with the other controllers of the binary
/// (`controller`, `result`, `reason`: all bounded).
pub type SharedLabels = Vec<(String, String)>;

/// The shared reconcile families: total, duration and errors.
pub type ReconcileFamilies = (
    Family<SharedLabels, Counter>,
    Family<SharedLabels, Histogram, fn() -> Histogram>,
    Family<SharedLabels, Counter>,
);

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// Labels of `kube_node_nodeset_nodes`.
///
/// `nodeset` is a NodeSet name: NodeSets are few and created by operators (not by the
/// controller), so the label stays bounded the way a Deployment name label does.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodesLabels {
    /// The NodeSet.
    pub nodeset: String,
    /// The machine phase (`Pending` … `Deleting`).
    pub phase: &'static str,
}

/// The controller's metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub(crate) reconciles: Family<SharedLabels, Counter>,
    pub(crate) duration: Family<SharedLabels, Histogram, fn() -> Histogram>,
    pub(crate) errors: Family<SharedLabels, Counter>,
    pub(crate) nodes: Family<NodesLabels, Gauge>,
    pub(crate) creates: Counter,
    pub(crate) deletes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            duration: Family::new_with_constructor(reconcile_histogram),
            errors: Family::default(),
            nodes: Family::default(),
            creates: Counter::default(),
            deletes: Counter::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "kube_node_reconcile",
            "Reconciles by controller and result",
            m.reconciles.clone(),
        );
        registry.register(
            "kube_node_reconcile_duration_seconds",
            "Duration of reconciles by controller",
            m.duration.clone(),
        );
        registry.register(
            "kube_node_reconcile_errors",
            "Failed reconciles by controller and reason",
            m.errors.clone(),
        );
        m.register_own(registry);
        m
    }

    /// Creates the metrics, recording reconciles into families another controller of the same
    /// binary already registered (a metric name may be registered only once).
    pub fn register_sharing(
        registry: &mut Registry,
        (reconciles, duration, errors): ReconcileFamilies,
    ) -> Self {
        let m = Self {
            reconciles,
            duration,
            errors,
            ..Self::default()
        };
        m.register_own(registry);
        m
    }

    fn register_own(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "kube_node_nodeset_nodes",
            "Nodes of each NodeSet by machine phase",
            m.nodes.clone(),
        );
        registry.register(
            "kube_node_nodeset_node_creates",
            "Nodes created by the NodeSet controller",
            m.creates.clone(),
        );
        registry.register(
            "kube_node_nodeset_node_deletes",
            "Nodes deleted by the NodeSet controller",
            m.deletes.clone(),
        );
    }

    pub(crate) fn reconciled(&self, result: &'static str, seconds: f64) {
        let ok = result == "success";
        self.reconciles
            .get_or_create(&vec![
                ("controller".to_string(), "nodeset".to_string()),
                (
                    "result".to_string(),
                    if ok { "ok" } else { "error" }.to_string(),
                ),
            ])
            .inc();
        self.duration
            .get_or_create(&vec![("controller".to_string(), "nodeset".to_string())])
            .observe(seconds);
        if !ok {
            self.errors
                .get_or_create(&vec![
                    ("controller".to_string(), "nodeset".to_string()),
                    ("reason".to_string(), result.to_string()),
                ])
                .inc();
        }
    }
}
