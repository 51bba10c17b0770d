//! The GKE backend of kube-node (`spec.provider.type: gke`): NodeSets over GKE node pools.
//!
//! A GKE node pool is a set of zonal managed instance groups (MIGs); GKE makes their machines
//! and its kubelets register Nodes under names GKE chooses. This crate owns everything that
//! talks to Google Cloud for such a pool, and is the only one that depends on Google's
//! clients (`google-cloud-container-v1`, `google-cloud-compute-v1` with only the
//! `instance-group-managers` and `zone-operations` services compiled). [`GkeFactory`] builds a
//! [`GkeProvider`] per NodeClass, bound to one pool; it is group-sized
//! (`providers/CONTRACT.md` section 7):
//!
//! - target size = `nodePools.get` (its `instanceGroupUrls`, cached) then
//!   `instanceGroupManagers.get` per group: the sum of the groups' `targetSize`.
//! - set target size = the new size spread over the groups by [`plan::distribute`] (exact
//!   for any total, balanced, moving as few machines as possible), then
//!   `instanceGroupManagers.resize` on each group whose size changes, each operation waited
//!   for with `zoneOperations.get` and exponential backoff.
//! - delete instances = each provider ID (`gce://<project>/<zone>/<name>`) is matched to its
//!   group by zone and the group's `baseInstanceName`; a machine of no group of the pool is
//!   `InvalidConfig` and nothing is deleted. Then `listManagedInstances` of each group
//!   concerned (machines already gone or already being deleted count as deleted) and one
//!   `instanceGroupManagers.deleteInstances` per group, which also lowers its target size.
//! - instances / list / get = `listManagedInstances` per group; `currentAction`
//!   (`CREATING`, `DELETING`, ...) and `instanceStatus` give the state. A machine still being
//!   created whose `lastAttempt.errors` is set (quota, zone out of resources) carries that
//!   error, typed by [`errors::classify_creation`], in `Instance::failure`.
//! - create is `Unimplemented`: GKE makes the machines.
//!
//! Every mutating call carries a `requestId` derived from its intent ([`plan::request_id`]),
//! so a retried call is answered with the first call's operation. Errors map to
//! [`kube_node_provider::ProviderError`] by [`errors::classify`]. Credentials are a
//! service-account key from the NodeClass's Secret or Application Default Credentials;
//! they appear in no log, event or error.

pub mod calls;
pub mod config;
pub mod errors;
pub mod plan;
mod provider;

use std::sync::Arc;
use std::time::Duration;

use kube_node_provider::{Provider, ProviderFactory, ResolvedClass, Result};

pub use config::{GkeConfig, SERVICE_ACCOUNT_KEY};
pub use provider::{GkeProvider, PROVIDER_TYPE};

/// Counts Google Cloud API calls by method (`compute.instanceGroupManagers.resize`, ...).
pub use kube_node_provider::CallCounter;

/// How long-running operations are polled.
#[derive(Clone, Debug)]
pub struct PollSettings {
    /// The first wait before polling.
    pub initial: Duration,
    /// The longest wait between two polls (the wait doubles up to it).
    pub max: Duration,
    /// How long one call waits for its operation before it returns `Transient` (the retry
    /// carries the same request id, so it waits for the same operation).
    pub timeout: Duration,
}

impl Default for PollSettings {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(5),
            timeout: Duration::from_secs(120),
        }
    }
}

/// Options shared by every provider a factory builds.
#[derive(Clone, Debug)]
pub struct GkeOptions {
    /// Counts API calls, when set.
    pub counter: Option<CallCounter>,
    /// How operations are polled.
    pub poll: PollSettings,
    /// How long one API call may take.
    pub call_timeout: Duration,
    /// How long the pool's list of instance groups is reused before it is read again.
    pub pool_cache_ttl: Duration,
}

impl Default for GkeOptions {
    fn default() -> Self {
        Self {
            counter: None,
            poll: PollSettings::default(),
            call_timeout: Duration::from_secs(30),
            pool_cache_ttl: Duration::from_secs(300),
        }
    }
}

/// Builds [`GkeProvider`]s for NodeClasses of type `gke`.
#[derive(Clone, Debug, Default)]
pub struct GkeFactory {
    options: GkeOptions,
}

impl GkeFactory {
    /// A factory with default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts every API call of every provider this factory builds.
    pub fn with_call_counter(mut self, counter: CallCounter) -> Self {
        self.options.counter = Some(counter);
        self
    }

    /// Sets how operations are polled.
    pub fn with_poll(mut self, poll: PollSettings) -> Self {
        self.options.poll = poll;
        self
    }

    /// Sets how long the pool's instance groups are cached.
    pub fn with_pool_cache_ttl(mut self, ttl: Duration) -> Self {
        self.options.pool_cache_ttl = ttl;
        self
    }

    /// The options providers are built with.
    pub fn options(&self) -> &GkeOptions {
        &self.options
    }

    /// Builds the concrete provider.
    pub fn build_gke(&self, class: &ResolvedClass) -> Result<GkeProvider> {
        GkeProvider::new(class, &self.options)
    }
}

impl ProviderFactory for GkeFactory {
    fn provider_type(&self) -> &'static str {
        PROVIDER_TYPE
    }

    fn build(&self, class: &ResolvedClass) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(self.build_gke(class)?))
    }
}
