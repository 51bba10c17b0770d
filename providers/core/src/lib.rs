//! The provider seam: the one trait every machine backend implements, the typed errors they
//! return, and the plain request and instance types that cross it.
//!
//! Nothing here knows about Kubernetes objects: the controllers resolve a NodeClass into a
//! provider (through a [`ProviderFactory`]) and pass plain requests. `providers/CONTRACT.md`
//! states what every backend MUST and SHOULD guarantee; [`conformance`] checks it.

mod calls;
pub mod claims;
pub mod conformance;
mod error;
mod metered;
mod types;

pub use calls::CallCounter;
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
///
/// A provider is bound to one NodeClass, and a group-backed NodeClass names exactly one group
/// (for GKE: project, location, cluster and node pool), so the methods take no group argument.
/// Only one NodeSet may own a group; the nodeset-controller refuses a second one.
#[async_trait]
pub trait GroupProvider: Send + Sync {
    /// The group's name for messages and events (`projects/p/locations/l/clusters/c/nodePools/np`).
    fn group_name(&self) -> String;

    /// The group's current target size: the size last set, not the count of running machines.
    async fn target_size(&self) -> Result<u32>;

    /// Sets the group's target size. Idempotent: setting the current size changes nothing, and
    /// a retried call (same size) never adds machines twice, even while an earlier resize is
    /// still in progress.
    async fn set_target_size(&self, size: u32) -> Result<()>;

    /// Deletes exactly these machines (by provider ID) and lowers the target size by as many.
    /// Machines that are already gone count as deleted; a provider ID that is not in the group
    /// is [`ProviderError::InvalidConfig`] naming it, and nothing is deleted.
    async fn delete_instances(&self, provider_ids: &[String]) -> Result<()>;

    /// The group's machines as the cloud reports them, including ones still being created or
    /// deleted. The nodeset-controller adopts a Node when its `spec.providerID` is one of
    /// these, and compares their count with the target size.
    async fn instances(&self) -> Result<Vec<Instance>>;
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
