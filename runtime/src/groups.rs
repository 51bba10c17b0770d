//! Access to the group operations of group-backed NodeClasses (`providers/CONTRACT.md`
//! section 7), shared by both controllers of a process.
//!
//! The nodeset-controller sets a group's size from what the group lists; the node-controller
//! deletes one machine of it after draining its Node. Both read-then-write the group's size,
//! so both hold the group's lock ([`GroupAccess::lock`]) around it: the size a NodeSet pass
//! computes from a listing is never applied after a deletion it did not see (which would add
//! a machine back). Both controllers run in one process (under one leader), so a process-wide
//! lock is enough.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use kube_node_crds::NodeClass;
use kube_node_provider::{Credentials, Provider, ProviderError, ProviderRegistry, ResolvedClass};

/// A provider built for one NodeClass generation and credentials version.
struct Built {
    generation: i64,
    secret_version: Option<String>,
    provider: Arc<dyn Provider>,
}

/// Builds (and keeps) the providers of group-backed NodeClasses, and the per-group locks.
pub struct GroupAccess {
    client: Client,
    registry: ProviderRegistry,
    cluster_name: String,
    built: Mutex<HashMap<String, Built>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for GroupAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupAccess")
            .field("cluster_name", &self.cluster_name)
            .finish_non_exhaustive()
    }
}

impl GroupAccess {
    /// Group access through `registry`, for machines tagged with `cluster_name`.
    pub fn new(
        client: Client,
        registry: ProviderRegistry,
        cluster_name: impl Into<String>,
    ) -> Self {
        Self {
            client,
            registry,
            cluster_name: cluster_name.into(),
            built: Mutex::default(),
            locks: Mutex::default(),
        }
    }

    /// The lock of the group of NodeClass `class`: held around every read-then-write of the
    /// group's size.
    pub fn lock(&self, class: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(class.to_string())
            .or_default()
            .clone()
    }

    /// The provider of a NodeClass, rebuilt when its generation or credentials Secret changes
    /// (one Secret read per call when the class names one).
    pub async fn provider(&self, class: &NodeClass) -> Result<Arc<dyn Provider>, ProviderError> {
        let name = class.name_any();
        let generation = class.metadata.generation.unwrap_or_default();
        let (credentials, secret_version) = match &class.spec.credentials_secret_ref {
            None => (None, None),
            Some(r) => {
                let secret = Api::<Secret>::namespaced(self.client.clone(), &r.namespace)
                    .get_opt(&r.name)
                    .await
                    .map_err(|e| {
                        ProviderError::Transient(format!(
                            "reading Secret {}/{}: {e}",
                            r.namespace, r.name
                        ))
                    })?
                    .ok_or_else(|| {
                        ProviderError::Unauthorized(format!(
                            "spec.credentialsSecretRef: Secret {}/{} not found",
                            r.namespace, r.name
                        ))
                    })?;
                let version = secret.metadata.resource_version.clone();
                (Some(Credentials::from_secret(secret)), version)
            }
        };
        if let Some(b) = self
            .built
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&name)
            && b.generation == generation
            && b.secret_version == secret_version
        {
            return Ok(b.provider.clone());
        }
        let provider = self.registry.build(&ResolvedClass {
            name: name.clone(),
            generation,
            spec: class.spec.clone(),
            credentials,
            cluster_name: self.cluster_name.clone(),
            inventory: None,
            claims: None,
        })?;
        self.built
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                name,
                Built {
                    generation,
                    secret_version,
                    provider: provider.clone(),
                },
            );
        Ok(provider)
    }
}
