use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::{
    Capabilities, CreateRequest, DeleteOutcome, GroupProvider, Instance, ListFilter, Provider,
    Result,
};

/// Labels of provider metrics: all bounded (backend, method, result reason).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `spec.provider.type`.
    pub provider: String,
    /// `create`, `get`, `list`, `delete`, `validate`, and the group methods `target_size`,
    /// `set_target_size`, `delete_instances`, `instances`.
    pub method: String,
    /// `Ok` or the error's reason.
    pub result: String,
}

/// Labels of the latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `spec.provider.type`.
    pub provider: String,
    /// The method.
    pub method: String,
}

/// Counters and latency histograms of every provider call.
#[derive(Clone)]
pub struct ProviderMetrics {
    requests: Family<CallLabels, Counter>,
    duration: Family<MethodLabels, Histogram>,
}

impl Default for ProviderMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
        }
    }
}

impl ProviderMetrics {
    /// New metrics, registered into `registry` (which may be prefixed).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "kube_node_provider_requests",
            "Provider calls by backend, method and result",
            m.requests.clone(),
        );
        registry.register(
            "kube_node_provider_request_duration_seconds",
            "Latency of provider calls",
            m.duration.clone(),
        );
        m
    }

    /// How many calls of `method` have been made, whatever their result (for tests and
    /// benchmarks that count calls per Node lifecycle).
    pub fn calls(&self, provider: &str, method: &str) -> u64 {
        [
            "Ok",
            "NotFound",
            "InsufficientCapacity",
            "QuotaExceeded",
            "Throttled",
            "InvalidConfig",
            "Unauthorized",
            "Transient",
            "Unimplemented",
        ]
        .iter()
        .map(|result| {
            self.requests
                .get_or_create(&CallLabels {
                    provider: provider.to_string(),
                    method: method.to_string(),
                    result: (*result).to_string(),
                })
                .get()
        })
        .sum()
    }

    fn record<T>(&self, provider: &str, method: &str, started: Instant, result: &Result<T>) {
        let reason = match result {
            Ok(_) => "Ok",
            Err(e) => e.reason(),
        };
        self.requests
            .get_or_create(&CallLabels {
                provider: provider.to_string(),
                method: method.to_string(),
                result: reason.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&MethodLabels {
                provider: provider.to_string(),
                method: method.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Wraps any provider so that every call is traced and counted, without each backend repeating
/// it. Built by [`crate::ProviderRegistry::build`].
pub struct Metered {
    inner: Arc<dyn Provider>,
    metrics: Option<ProviderMetrics>,
}

impl Metered {
    /// Wraps `inner`; with `None`, calls are only traced.
    pub fn new(inner: Arc<dyn Provider>, metrics: Option<ProviderMetrics>) -> Self {
        Self { inner, metrics }
    }

    fn finish<T>(&self, method: &'static str, started: Instant, result: &Result<T>) {
        let provider = self.inner.name();
        if let Some(m) = &self.metrics {
            m.record(provider, method, started, result);
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(_) => tracing::debug!(provider, method, elapsed_ms, "provider call succeeded"),
            Err(e) => tracing::info!(
                provider,
                method,
                elapsed_ms,
                reason = e.reason(),
                error = %e,
                "provider call failed"
            ),
        }
    }
}

#[async_trait]
impl Provider for Metered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn validate(&self) -> Result<()> {
        let started = Instant::now();
        let r = self.inner.validate().await;
        self.finish("validate", started, &r);
        r
    }

    async fn create(&self, request: &CreateRequest) -> Result<Instance> {
        let started = Instant::now();
        let r = self.inner.create(request).await;
        self.finish("create", started, &r);
        r
    }

    async fn get(&self, provider_id: &str) -> Result<Instance> {
        let started = Instant::now();
        let r = self.inner.get(provider_id).await;
        self.finish("get", started, &r);
        r
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        let started = Instant::now();
        let r = self.inner.list(filter).await;
        self.finish("list", started, &r);
        r
    }

    async fn delete(&self, provider_id: &str) -> Result<DeleteOutcome> {
        let started = Instant::now();
        let r = self.inner.delete(provider_id).await;
        self.finish("delete", started, &r);
        r
    }

    async fn free_capacity(&self) -> Result<Option<u32>> {
        self.inner.free_capacity().await
    }

    fn as_group(&self) -> Option<&dyn GroupProvider> {
        // Group calls are counted and traced like the others.
        self.inner.as_group().map(|_| self as &dyn GroupProvider)
    }
}

impl Metered {
    fn group(&self) -> Result<&dyn GroupProvider> {
        self.inner.as_group().ok_or_else(|| {
            crate::ProviderError::Unimplemented(format!(
                "backend {} has no group operations",
                self.inner.name()
            ))
        })
    }
}

#[async_trait]
impl GroupProvider for Metered {
    fn group_name(&self) -> String {
        self.inner
            .as_group()
            .map(GroupProvider::group_name)
            .unwrap_or_default()
    }

    async fn target_size(&self) -> Result<u32> {
        let started = Instant::now();
        let r = match self.group() {
            Ok(g) => g.target_size().await,
            Err(e) => Err(e),
        };
        self.finish("target_size", started, &r);
        r
    }

    async fn set_target_size(&self, size: u32) -> Result<()> {
        let started = Instant::now();
        let r = match self.group() {
            Ok(g) => g.set_target_size(size).await,
            Err(e) => Err(e),
        };
        self.finish("set_target_size", started, &r);
        r
    }

    async fn delete_instances(&self, provider_ids: &[String]) -> Result<()> {
        let started = Instant::now();
        let r = match self.group() {
            Ok(g) => g.delete_instances(provider_ids).await,
            Err(e) => Err(e),
        };
        self.finish("delete_instances", started, &r);
        r
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        let started = Instant::now();
        let r = match self.group() {
            Ok(g) => g.instances().await,
            Err(e) => Err(e),
        };
        self.finish("instances", started, &r);
        r
    }
}
