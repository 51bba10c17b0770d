use std::collections::BTreeMap;
use std::fmt;

use kube_node_crds::NodeClassSpec;

/// A NodeClass resolved for a provider: its name, generation, spec, and the data of its
/// credentials Secret (if it references one). Never logged: `Debug` hides the credentials.
#[derive(Clone)]
pub struct ResolvedClass {
    /// The NodeClass's name.
    pub name: String,
    /// The NodeClass's `metadata.generation`.
    pub generation: i64,
    /// The NodeClass's spec.
    pub spec: NodeClassSpec,
    /// The credentials Secret's data, key → bytes.
    pub credentials: Option<Credentials>,
    /// The cluster name kube-node runs with (tags every machine).
    pub cluster_name: String,
    /// The data of the ConfigMap the provider block references (a bare-metal host inventory),
    /// resolved by the controller like the credentials Secret.
    pub inventory: Option<BTreeMap<String, String>>,
    /// Where a backend without a tag store keeps its claims (`providers/CONTRACT.md`
    /// section 10). The node-controller always provides one; backends with tags ignore it.
    pub claims: Option<std::sync::Arc<dyn crate::ClaimStore>>,
}

impl fmt::Debug for ResolvedClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedClass")
            .field("name", &self.name)
            .field("generation", &self.generation)
            .field("provider", &self.spec.provider.type_)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("inventory", &self.inventory.as_ref().map(BTreeMap::len))
            .field("claims", &self.claims.is_some())
            .finish()
    }
}

/// Credentials read from a Secret. `Debug` and `Display` print only the key names.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials(pub BTreeMap<String, Vec<u8>>);

impl Credentials {
    /// The data of a Secret (the API server folds `stringData` into `data`).
    pub fn from_secret(secret: k8s_openapi::api::core::v1::Secret) -> Self {
        Self(
            secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect(),
        )
    }

    /// One value as UTF-8 text.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// One value as bytes.
    pub fn get_bytes(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }

    /// Every value, for redacting them out of text that might echo them (program output).
    pub fn values(&self) -> impl Iterator<Item = &[u8]> {
        self.0.values().map(Vec::as_slice)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials({:?} = <redacted>)",
            self.0.keys().collect::<Vec<_>>()
        )
    }
}

/// Text that must never be logged (the join payload carries a bootstrap token).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Sensitive(pub String);

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A request to create the machine of one Node.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    /// The Node's UID. Creating twice with the same key yields the same machine.
    pub idempotency_key: String,
    /// The Node's name; the kubelet registers under it.
    pub node_name: String,
    /// Tags to put on the machine at launch (see `kube_node_crds::names::tags`).
    pub tags: BTreeMap<String, String>,
    /// The bootstrap payload (cloud-init user-data running `kubeadm join`).
    pub user_data: Option<Sensitive>,
}

/// Which machines to list.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    /// Only machines tagged with this cluster name.
    pub cluster: String,
    /// Only machines of this NodeClass, when set.
    pub node_class: Option<String>,
}

/// The lifecycle state of a machine as its provider reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Accepted, booting.
    Pending,
    /// Running (its kubelet may or may not have joined yet).
    Running,
    /// Being deleted.
    Terminating,
}

impl InstanceState {
    /// The state's name, for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Running => "Running",
            Self::Terminating => "Terminating",
        }
    }
}

/// An address of a machine, as in a Node's `status.addresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...
    pub kind: String,
    /// The address.
    pub address: String,
}

/// A machine as its provider reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// The provider's own id (`i-0abc...`).
    pub id: String,
    /// The Node's `spec.providerID` for this machine (`aws:///us-east-1a/i-0abc...`).
    pub provider_id: String,
    /// Its state.
    pub state: InstanceState,
    /// Its tags, as set at launch.
    pub tags: BTreeMap<String, String>,
    /// The zone it runs in.
    pub zone: Option<String>,
    /// Its machine type.
    pub instance_type: Option<String>,
    /// Its addresses.
    pub addresses: Vec<InstanceAddress>,
    /// When it was created (Unix seconds), if the provider says.
    pub created_unix: Option<i64>,
    /// Labels its owner gave the machine, which become labels of its Node (a bare-metal
    /// host's inventory labels: rack, zone). Empty for a backend that has none; see
    /// `providers/CONTRACT.md` section 8.
    pub labels: BTreeMap<String, String>,
    /// Why the cloud failed to create it, when the cloud accepted the machine (it is listed,
    /// `state` stays `Pending`) but its creation failed and the cloud keeps retrying: a group
    /// whose instance creations fail for quota (`QuotaExceeded`), for a zone out of capacity
    /// (`InsufficientCapacity`) or for another reason (another kind, with the cloud's
    /// message). `None` for every machine that is not in that state, and always for backends
    /// that create their machines themselves (their create returns the error instead).
    /// `providers/CONTRACT.md` section 7.
    pub failure: Option<crate::ProviderError>,
}

impl Instance {
    /// The idempotency key (Node UID) it was created for, from its tags.
    pub fn node_uid(&self) -> Option<&str> {
        self.tags
            .get(kube_node_crds::names::tags::NODE_UID)
            .map(String::as_str)
    }

    /// The Node name it was created for, from its tags.
    pub fn node_name(&self) -> Option<&str> {
        self.tags
            .get(kube_node_crds::names::tags::NODE_NAME)
            .map(String::as_str)
    }
}

/// What a delete found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The machine is going away; poll [`crate::Provider::get`] until NotFound.
    Deleting,
    /// The machine was already gone.
    Gone,
}

/// What a backend can do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// The cloud owns a group's instances; use [`crate::Provider::as_group`] for sizing.
    pub group_sized: bool,
    /// `list` may briefly miss a machine just created (eventual consistency).
    pub eventually_consistent_list: bool,
}

#[cfg(test)]
mod tests {
    use super::Credentials;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;

    #[test]
    fn credentials_of_a_secret_keep_its_data_and_never_print_it() {
        let secret = Secret {
            data: Some(
                [("key".to_string(), ByteString(b"s3cr3t".to_vec()))]
                    .into_iter()
                    .collect(),
            ),
            ..Secret::default()
        };
        let c = Credentials::from_secret(secret);
        assert_eq!(c.get_str("key"), Some("s3cr3t"));
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert_eq!(
            Credentials::from_secret(Secret::default()),
            Credentials::default()
        );
    }
}
