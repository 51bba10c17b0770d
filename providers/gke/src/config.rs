//! The NodeClass's `spec.provider.gke` and credentials, resolved without I/O.

use std::fmt;

use kube_node_crds::v1alpha1::{GkeProviderSpec, ProviderType};
use kube_node_provider::{ProviderError, ResolvedClass, Result};

/// The key of the credentials Secret that holds the service-account JSON key.
pub const SERVICE_ACCOUNT_KEY: &str = "service-account.json";

/// Where the backend's credentials come from.
#[derive(Clone)]
pub enum CredentialSource {
    /// A service-account JSON key from the credentials Secret. `Debug` hides it.
    ServiceAccount(serde_json::Value),
    /// Application Default Credentials (workload identity, the metadata server,
    /// `GOOGLE_APPLICATION_CREDENTIALS`), when the NodeClass names no Secret.
    ApplicationDefault,
}

impl fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ServiceAccount(_) => f.write_str("ServiceAccount(<redacted>)"),
            Self::ApplicationDefault => f.write_str("ApplicationDefault"),
        }
    }
}

/// One NodeClass's GKE configuration.
#[derive(Clone, Debug)]
pub struct GkeConfig {
    /// The project of the cluster (and of its node pools' instance groups).
    pub project: String,
    /// The cluster's region or zone.
    pub location: String,
    /// The cluster's name.
    pub cluster: String,
    /// The node pool's name.
    pub node_pool: String,
    /// The Kubernetes Engine API endpoint override.
    pub container_endpoint: Option<String>,
    /// The Compute Engine API endpoint override.
    pub compute_endpoint: Option<String>,
    /// The credentials.
    pub credentials: CredentialSource,
    /// The NodeClass's name (the machines' `kube-node.io/node-class` tag).
    pub node_class: String,
    /// kube-node's cluster name (the machines' `kube-node.io/cluster` tag).
    pub cluster_name: String,
}

impl GkeConfig {
    /// Resolves a NodeClass of type `gke`. Fails with `InvalidConfig` naming the field, or
    /// `Unauthorized` naming the Secret key, never quoting a credential.
    pub fn resolve(class: &ResolvedClass) -> Result<Self> {
        if class.spec.provider.type_ != ProviderType::Gke {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.type: the gke backend cannot build a {} NodeClass",
                class.spec.provider.type_.as_str()
            )));
        }
        let spec: &GkeProviderSpec = class.spec.provider.gke.as_ref().ok_or_else(|| {
            ProviderError::InvalidConfig(
                "spec.provider.gke: is required when spec.provider.type is gke".into(),
            )
        })?;
        // The same checks the CRD schema makes, for objects stored under an older schema.
        class
            .spec
            .validate()
            .map_err(|e| ProviderError::InvalidConfig(e.to_string()))?;
        let credentials = match (&class.spec.credentials_secret_ref, &class.credentials) {
            (None, _) => CredentialSource::ApplicationDefault,
            (Some(r), None) => {
                return Err(ProviderError::Unauthorized(format!(
                    "spec.credentialsSecretRef: Secret {}/{} was not found or is empty",
                    r.namespace, r.name
                )));
            }
            (Some(r), Some(creds)) => {
                let raw = creds.get_bytes(SERVICE_ACCOUNT_KEY).ok_or_else(|| {
                    ProviderError::Unauthorized(format!(
                        "spec.credentialsSecretRef: Secret {}/{} has no key {SERVICE_ACCOUNT_KEY}",
                        r.namespace, r.name
                    ))
                })?;
                CredentialSource::ServiceAccount(service_account_key(raw).map_err(|what| {
                    ProviderError::Unauthorized(format!(
                        "spec.credentialsSecretRef: {SERVICE_ACCOUNT_KEY} of Secret {}/{} {what}",
                        r.namespace, r.name
                    ))
                })?)
            }
        };
        Ok(Self {
            project: spec.project.clone(),
            location: spec.location.clone(),
            cluster: spec.cluster.clone(),
            node_pool: spec.node_pool.clone(),
            container_endpoint: spec.container_endpoint.clone().filter(|s| !s.is_empty()),
            compute_endpoint: spec.compute_endpoint.clone().filter(|s| !s.is_empty()),
            credentials,
            node_class: class.name.clone(),
            cluster_name: class.cluster_name.clone(),
        })
    }

    /// The node pool's resource name,
    /// `projects/<project>/locations/<location>/clusters/<cluster>/nodePools/<pool>`.
    pub fn pool_name(&self) -> String {
        format!(
            "projects/{}/locations/{}/clusters/{}/nodePools/{}",
            self.project, self.location, self.cluster, self.node_pool
        )
    }
}

/// Checks that the Secret's bytes are a service-account key, saying what is wrong without
/// quoting any of it (serde's messages can echo values).
fn service_account_key(raw: &[u8]) -> std::result::Result<serde_json::Value, &'static str> {
    let v: serde_json::Value =
        serde_json::from_slice(raw).map_err(|_| "is not valid JSON (a service-account key)")?;
    if v.get("type").and_then(|t| t.as_str()) != Some("service_account") {
        return Err("is not a service-account key (its \"type\" is not \"service_account\")");
    }
    for field in ["client_email", "private_key"] {
        if v.get(field)
            .and_then(|t| t.as_str())
            .is_none_or(str::is_empty)
        {
            return Err("is a service-account key without client_email or private_key");
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_node_crds::NodeClassSpec;
    use kube_node_crds::v1alpha1::{ProviderSpec, SecretReference};
    use kube_node_provider::Credentials;

    fn class(secret: Option<&[u8]>, named: bool) -> ResolvedClass {
        let spec = NodeClassSpec {
            provider: ProviderSpec {
                type_: ProviderType::Gke,
                simulated: None,
                aws: None,
                exec: None,
                baremetal: None,
                gke: Some(GkeProviderSpec {
                    project: "my-project".into(),
                    location: "europe-west1".into(),
                    cluster: "prod".into(),
                    node_pool: "pool-1".into(),
                    ..Default::default()
                }),
            },
            credentials_secret_ref: named.then(|| SecretReference {
                namespace: "kube-node-system".into(),
                name: "gke-creds".into(),
            }),
            labels: Default::default(),
            taints: vec![],
            capacity: Default::default(),
            allocatable: None,
            bootstrap: None,
            timeouts: None,
        };
        ResolvedClass {
            name: "gke-pool".into(),
            generation: 1,
            spec,
            credentials: secret
                .map(|s| Credentials([(SERVICE_ACCOUNT_KEY.to_string(), s.to_vec())].into())),
            cluster_name: "test".into(),
            inventory: None,
            claims: None,
        }
    }

    #[test]
    fn no_secret_means_application_default_credentials() {
        let c = GkeConfig::resolve(&class(None, false)).expect("resolve");
        assert!(matches!(
            c.credentials,
            CredentialSource::ApplicationDefault
        ));
        assert_eq!(
            c.pool_name(),
            "projects/my-project/locations/europe-west1/clusters/prod/nodePools/pool-1"
        );
    }

    #[test]
    fn a_service_account_key_is_read_and_never_printed() {
        let key = br#"{"type":"service_account","client_email":"kn@p.iam.gserviceaccount.com","private_key":"-----BEGIN PRIVATE KEY-----\nSECRETMATERIAL\n-----END PRIVATE KEY-----\n"}"#;
        let c = GkeConfig::resolve(&class(Some(key), true)).expect("resolve");
        assert!(matches!(c.credentials, CredentialSource::ServiceAccount(_)));
        assert!(!format!("{c:?}").contains("SECRETMATERIAL"));
    }

    #[test]
    fn bad_secrets_are_unauthorized_naming_the_key_not_the_value() {
        let e = GkeConfig::resolve(&class(None, true)).expect_err("missing Secret");
        assert_eq!(e.reason(), "Unauthorized");
        for bad in [
            &b"SECRETMATERIAL not json"[..],
            br#"{"type":"authorized_user","refresh_token":"SECRETMATERIAL"}"#,
            br#"{"type":"service_account","client_email":"SECRETMATERIAL"}"#,
        ] {
            let e = GkeConfig::resolve(&class(Some(bad), true)).expect_err("bad key");
            assert_eq!(e.reason(), "Unauthorized", "{e}");
            assert!(e.message().contains(SERVICE_ACCOUNT_KEY), "{e}");
            assert!(!e.to_string().contains("SECRETMATERIAL"), "{e}");
        }
    }

    #[test]
    fn an_invalid_pool_name_is_invalid_config_naming_the_field() {
        let mut c = class(None, false);
        if let Some(g) = c.spec.provider.gke.as_mut() {
            g.node_pool = "Pool_1".into();
        }
        let e = GkeConfig::resolve(&c).expect_err("bad name");
        assert_eq!(e.reason(), "InvalidConfig");
        assert!(e.message().contains("spec.provider.gke.nodePool"), "{e}");
    }
}
