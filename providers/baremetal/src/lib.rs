//! kube-node's bare-metal backend (`spec.provider.type: baremetal`): servers you own, each
//! with a Redfish BMC and an OS with kubeadm and a kubelet on its disk.
//!
//! This crate owns the inventory and credentials ([`config`]), a typed Redfish client
//! ([`redfish`]), a host-key-pinning SSH client ([`ssh`]) and the [`Provider`] that claims,
//! powers, joins and releases hosts ([`provider`]). Who holds which host lives in the
//! controller's claim store (`providers/CONTRACT.md` section 10), not here.

pub mod config;
pub mod provider;
pub mod redfish;
pub mod ssh;
pub mod testenv;

use std::sync::Arc;

use kube_node_provider::{Provider, ProviderError, ProviderFactory, ResolvedClass, Result};

pub use provider::{BaremetalProvider, Stats};

/// Builds [`BaremetalProvider`]s.
#[derive(Debug, Default)]
pub struct BaremetalFactory;

impl BaremetalFactory {
    /// A factory.
    pub fn new() -> Self {
        Self
    }

    /// Builds the concrete provider (tests use its counters and error-injection hook).
    pub fn build_baremetal(&self, class: &ResolvedClass) -> Result<BaremetalProvider> {
        let cfg = config::resolve(class)?;
        let claims = class.claims.clone().ok_or_else(|| {
            ProviderError::InvalidConfig(
                "spec.provider.type: the baremetal backend needs the controller's claim store"
                    .into(),
            )
        })?;
        BaremetalProvider::new(cfg, claims)
    }
}

impl ProviderFactory for BaremetalFactory {
    fn provider_type(&self) -> &'static str {
        provider::NAME
    }

    fn build(&self, class: &ResolvedClass) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(self.build_baremetal(class)?))
    }
}
