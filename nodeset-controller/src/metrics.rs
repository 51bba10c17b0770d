//! Prometheus metrics of the NodeSet controller (bounded labels only).

use kube_node_runtime::{ReconcileFamilies, WorkQueue};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// Labels of `kube_node_nodeset_backoff_seconds` (bounded like [`NodesLabels`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeSetLabels {
    /// The NodeSet.
    pub nodeset: String,
}

/// The controller's metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub(crate) families: ReconcileFamilies,
    pub(crate) queue: WorkQueue,
    pub(crate) nodes: Family<NodesLabels, Gauge>,
    pub(crate) backoff: Family<NodeSetLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) creates: Counter,
    pub(crate) deletes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::with_families(ReconcileFamilies::default())
    }
}

impl Metrics {
    fn with_families(families: ReconcileFamilies) -> Self {
        Self {
            queue: families.work_queue("nodeset"),
            families,
            nodes: Family::default(),
            backoff: Family::default(),
            creates: Counter::default(),
            deletes: Counter::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        m.families.register(registry);
        m.register_own(registry);
        m
    }

    /// Creates the metrics, recording reconciles into families another controller of the same
    /// binary already registered (a metric name may be registered only once).
    pub fn register_sharing(registry: &mut Registry, families: ReconcileFamilies) -> Self {
        let m = Self::with_families(families);
        m.register_own(registry);
        m
    }

    /// The NodeSet controller's work queue.
    /// The count of set-aside objects of `kind` (`kube_node_invalid_objects{kind}`).
    pub fn invalid_objects(&self, kind: &str) -> prometheus_client::metrics::gauge::Gauge {
        self.families.invalid_objects(kind)
    }

    pub fn work_queue(&self) -> &WorkQueue {
        &self.queue
    }

    fn register_own(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "kube_node_nodeset_nodes",
            "Nodes of each NodeSet by machine phase",
            m.nodes.clone(),
        );
        registry.register(
            "kube_node_nodeset_backoff_seconds",
            "The current replacement backoff of each NodeSet: how long launching waits after \
             its latest machine failure (0 when not backing off)",
            m.backoff.clone(),
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

    /// Sets `kube_node_nodeset_backoff_seconds` of one NodeSet.
    pub(crate) fn set_backoff(&self, nodeset: &str, seconds: f64) {
        self.backoff
            .get_or_create(&NodeSetLabels {
                nodeset: nodeset.to_string(),
            })
            .set(seconds);
    }

    /// Forgets the series of a deleted NodeSet.
    pub(crate) fn forget(&self, nodeset: &str) {
        self.backoff.remove(&NodeSetLabels {
            nodeset: nodeset.to_string(),
        });
    }

    pub(crate) fn reconciled(&self, result: &'static str, seconds: f64) {
        let err = (result != "success").then_some(result);
        self.families.reconciled("nodeset", seconds, err);
    }
}
