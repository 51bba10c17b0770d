//! The provider seam: the one trait every machine backend implements, the typed errors they
//! return, and the plain request and instance types that cross it.
//!
//! Nothing here knows about Kubernetes objects: the controllers resolve a NodeClass into a
//! provider (through a [`ProviderFactory`]) and pass plain requests. `providers/CONTRACT.md`
//! states what every backend MUST and SHOULD guarantee; [`conformance`] checks it.

pub mod claims;
pub mod conformance;
mod error;
mod metered;
mod types;

pub use claims::{ClaimRecord, ClaimStore, MemoryClaimStore, Written};
pub use error::{ProviderError, Result};
pub use metered::{Metered, ProviderMetrics};
pub use types::*;

use std::sync::Arc;

use async_trait::async_trait;

/// A machine backend bound to one NodeClass's configuration and credentials.
///
/// Object-safe so the backend is chosen at run time (`Arc<dyn Provider>`). Every method is
/// idempotent; see `providers/CONTRACT.md`.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The backend's name as in `spec.provider.type` (`simulated`, `aws`, ...). Used as a
    /// bounded metrics label.
    fn name(&self) -> &'static str;

    /// What this backend can do.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Checks the configuration and credentials (images, networks exist; credentials work).
    /// Called once per NodeClass generation; its result is the NodeClass `Ready` condition.
    async fn validate(&self) -> Result<()>;

    /// Creates the machine for a Node, or returns the live one already created for the same
    /// [`CreateRequest::idempotency_key`]. Tags are applied at launch.
    async fn create(&self, request: &CreateRequest) -> Result<Instance>;

    /// The machine behind a provider ID. [`ProviderError::NotFound`] when it is gone (terminated
    /// machines count as gone).
    async fn get(&self, provider_id: &str) -> Result<Instance>;

    /// Every live machine tagged with the given cluster (and, when set, NodeClass). Must be
    /// complete: the orphan collector deletes what it finds here without a Node.
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>>;

    /// Starts deleting a machine. A machine that is already gone is success
    /// ([`DeleteOutcome::Gone`]).
    async fn delete(&self, provider_id: &str) -> Result<DeleteOutcome>;

    /// How many more machines this backend can make for its NodeClass now, when it draws from
    /// a fixed pool (bare-metal hosts that are neither claimed nor set aside); `None` for
    /// backends without a fixed pool (clouds). Feeds the NodeSet's and the autoscaler's max
    /// size.
    async fn free_capacity(&self) -> Result<Option<u32>> {
        Ok(None)
    }

    /// The group-level operations, for backends where the cloud owns the instances of a group
    /// (GKE node pools) and kube-node only sets a size and names victims.
    fn as_group(&self) -> Option<&dyn GroupProvider> {
        None
    }
}

/// Group-level operations of backends whose cloud owns the instances (a node pool, a managed
/// instance group): the NodeSet's replicas become the group's size.
#[async_trait]
pub trait GroupProvider: Send + Sync {
    /// The group's current target size.
    async fn target_size(&self, group: &str) -> Result<u32>;
    /// Sets the group's target size.
    async fn set_target_size(&self, group: &str, size: u32) -> Result<()>;
    /// Deletes exactly these instances and lowers the target size by as many.
    async fn delete_instances(&self, group: &str, provider_ids: &[String]) -> Result<()>;
}

/// Builds a provider for a NodeClass. One factory per backend; the controllers keep the built
/// provider while the NodeClass's generation and credentials stay the same.
pub trait ProviderFactory: Send + Sync + 'static {
    /// The backend this factory builds (`spec.provider.type`).
    fn provider_type(&self) -> &'static str;

    /// Builds the provider. Fails with [`ProviderError::InvalidConfig`] naming the field when
    /// the NodeClass's configuration is not usable, or [`ProviderError::Unauthorized`] when the
    /// credentials are missing.
    fn build(&self, class: &ResolvedClass) -> Result<Arc<dyn Provider>>;
}

/// Every backend compiled into this binary, by `spec.provider.type`.
#[derive(Clone, Default)]
pub struct ProviderRegistry {
    factories: std::collections::BTreeMap<&'static str, Arc<dyn ProviderFactory>>,
    metrics: Option<ProviderMetrics>,
}

impl ProviderRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Wraps every provider this registry builds in [`Metered`], recording into `metrics`.
    pub fn with_metrics(mut self, metrics: ProviderMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Adds a backend.
    pub fn register(&mut self, factory: Arc<dyn ProviderFactory>) {
        self.factories.insert(factory.provider_type(), factory);
    }

    /// The backends known, by name.
    pub fn types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.factories.keys().copied()
    }

    /// Builds the provider for a NodeClass, wrapped in [`Metered`].
    pub fn build(&self, class: &ResolvedClass) -> Result<Arc<dyn Provider>> {
        let ty = class.spec.provider.type_.as_str();
        let factory = self.factories.get(ty).ok_or_else(|| {
            ProviderError::InvalidConfig(format!(
                "spec.provider.type: backend {ty:?} is not compiled into this kube-node binary"
            ))
        })?;
        let inner = factory.build(class)?;
        Ok(Arc::new(Metered::new(inner, self.metrics.clone())))
    }
}
