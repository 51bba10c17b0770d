//! The claim store the node-controller gives backends without a tag store
//! (`providers/CONTRACT.md` section 10): one `coordination.k8s.io/v1` Lease per machine in
//! kube-node's namespace, named `kube-node-host-<key>`.
//!
//! A Lease because it is the API server's small record of "who holds what" that operators
//! already read (`kubectl get lease -n kube-node-system -l kube-node.io/claim`), it needs no
//! CRD, and its `holderIdentity` column shows the Node at a glance. Every write carries a
//! precondition: create fails with 409 when the Lease exists, replace sends the
//! `resourceVersion` it read, delete sends it as a precondition. The Lease never expires
//! (no `leaseDurationSeconds`): ownership ends only by an explicit release.

use std::collections::BTreeMap;

use async_trait::async_trait;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{DeleteParams, ListParams, PostParams, Preconditions};
use kube::{Api, Client};
use kube_node_provider::{ClaimRecord, ClaimStore, ProviderError, Result, Written};

/// The label on every claim Lease (value: the kind of claim).
pub const CLAIM_LABEL: &str = "kube-node.io/claim";
/// The label value of machine claims.
pub const CLAIM_LABEL_VALUE: &str = "host";
/// The Lease name prefix.
pub const LEASE_PREFIX: &str = "kube-node-host-";
const CLUSTER: &str = "kube-node.io/cluster";
const NODE_CLASS: &str = "kube-node.io/node-class";
const NODE_NAME: &str = "kube-node.io/node-name";
const NODE_UID: &str = "kube-node.io/node-uid";
const CLAIMED_AT: &str = "kube-node.io/claimed-at";
/// Annotation prefix of the backend's own fields.
const DATA_PREFIX: &str = "claim.kube-node.io/";

/// Claims as Leases in one namespace.
#[derive(Clone)]
pub struct LeaseClaimStore {
    api: Api<Lease>,
}

impl LeaseClaimStore {
    /// A store in `namespace`.
    pub fn new(client: Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
        }
    }
}

/// The Lease of a record (its name, labels, annotations, holder).
pub fn to_lease(r: &ClaimRecord) -> Lease {
    let mut annotations = BTreeMap::from([
        (CLUSTER.to_string(), r.cluster.clone()),
        (NODE_CLASS.to_string(), r.node_class.clone()),
        (NODE_NAME.to_string(), r.node_name.clone()),
        (NODE_UID.to_string(), r.node_uid.clone()),
    ]);
    let claimed_at = jiff::Timestamp::from_second(r.claimed_at_unix).ok();
    if let Some(t) = claimed_at {
        annotations.insert(CLAIMED_AT.to_string(), t.to_string());
    }
    for (k, v) in &r.data {
        annotations.insert(format!("{DATA_PREFIX}{k}"), v.clone());
    }
    Lease {
        metadata: ObjectMeta {
            name: Some(format!("{LEASE_PREFIX}{}", r.key)),
            resource_version: r.version.clone(),
            labels: Some(BTreeMap::from([(
                CLAIM_LABEL.to_string(),
                CLAIM_LABEL_VALUE.to_string(),
            )])),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: (!r.node_name.is_empty()).then(|| r.node_name.clone()),
            acquire_time: claimed_at.map(MicroTime),
            ..Default::default()
        }),
    }
}

/// The record of a claim Lease; `None` for a Lease that is not one.
pub fn from_lease(l: &Lease) -> Option<ClaimRecord> {
    let key = l.metadata.name.as_deref()?.strip_prefix(LEASE_PREFIX)?;
    let a = l.metadata.annotations.clone().unwrap_or_default();
    let get = |k: &str| a.get(k).cloned().unwrap_or_default();
    let claimed_at_unix = a
        .get(CLAIMED_AT)
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .map_or(0, jiff::Timestamp::as_second);
    let data = a
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(DATA_PREFIX)?.to_string(), v.clone())))
        .collect();
    Some(ClaimRecord {
        key: key.to_string(),
        version: l.metadata.resource_version.clone(),
        cluster: get(CLUSTER),
        node_class: get(NODE_CLASS),
        node_name: get(NODE_NAME),
        node_uid: get(NODE_UID),
        claimed_at_unix,
        data,
    })
}

/// A Kubernetes API error as a provider error: the backend retries or reports it like any
/// other failure of its store. Messages name the Lease, never its contents.
fn map_err(what: &str, e: kube::Error) -> ProviderError {
    match &e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => {
            ProviderError::Unauthorized(format!(
                "{what}: kube-node may not use Leases in its namespace ({})",
                s.reason
            ))
        }
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
            ProviderError::InvalidConfig(format!("{what}: {}", s.message))
        }
        _ => ProviderError::Transient(format!("{what}: {e}")),
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

#[async_trait]
impl ClaimStore for LeaseClaimStore {
    async fn get(&self, key: &str) -> Result<Option<ClaimRecord>> {
        let name = format!("{LEASE_PREFIX}{key}");
        let l = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| map_err(&format!("reading claim Lease {name}"), e))?;
        Ok(l.as_ref().and_then(from_lease))
    }

    async fn list(&self) -> Result<Vec<ClaimRecord>> {
        // One unpaginated list: a claim per machine, a few thousand small objects at most, and
        // a paginated list could mix versions.
        let lp = ListParams::default().labels(&format!("{CLAIM_LABEL}={CLAIM_LABEL_VALUE}"));
        let list = self
            .api
            .list(&lp)
            .await
            .map_err(|e| map_err("listing claim Leases", e))?;
        Ok(list.items.iter().filter_map(from_lease).collect())
    }

    async fn create(&self, record: &ClaimRecord) -> Result<Written> {
        kube_node_provider::claims::check_key(&record.key)?;
        let mut lease = to_lease(record);
        lease.metadata.resource_version = None;
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(l) => Ok(from_lease(&l).map_or(Written::Conflict, Written::Done)),
            Err(e) if is_code(&e, 409) => Ok(Written::Conflict),
            Err(e) => Err(map_err(
                &format!("creating claim Lease {LEASE_PREFIX}{}", record.key),
                e,
            )),
        }
    }

    async fn replace(&self, record: &ClaimRecord) -> Result<Written> {
        if record.version.is_none() {
            return Ok(Written::Conflict);
        }
        let lease = to_lease(record);
        let name = format!("{LEASE_PREFIX}{}", record.key);
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => Ok(from_lease(&l).map_or(Written::Conflict, Written::Done)),
            // 404: released meanwhile; a replace must never re-create it.
            Err(e) if is_code(&e, 409) || is_code(&e, 404) => Ok(Written::Conflict),
            Err(e) => Err(map_err(&format!("updating claim Lease {name}"), e)),
        }
    }

    async fn delete(&self, key: &str, version: &str) -> Result<bool> {
        let name = format!("{LEASE_PREFIX}{key}");
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version.to_string()),
                uid: None,
            }),
            ..Default::default()
        };
        match self.api.delete(&name, &dp).await {
            Ok(_) => Ok(true),
            Err(e) if is_code(&e, 404) => Ok(true),
            Err(e) if is_code(&e, 409) => Ok(false),
            Err(e) => Err(map_err(&format!("deleting claim Lease {name}"), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_round_trip() {
        let r = ClaimRecord {
            key: "bm-0123456789abcdef".into(),
            version: Some("7".into()),
            cluster: "c".into(),
            node_class: "rack-a".into(),
            node_name: "n1".into(),
            node_uid: "u1".into(),
            claimed_at_unix: 1_700_000_000,
            data: BTreeMap::from([("host".into(), "rack-a-01".into())]),
        };
        let l = to_lease(&r);
        assert_eq!(
            l.metadata.name.as_deref(),
            Some("kube-node-host-bm-0123456789abcdef")
        );
        assert_eq!(
            l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()),
            Some("n1")
        );
        assert_eq!(from_lease(&l), Some(r));
    }
}
