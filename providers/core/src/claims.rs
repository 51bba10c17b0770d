//! The claim store: durable, atomic ownership records for backends without a tag store.
//!
//! A cloud tags its machines at launch, and the contract's "find my machine by Node UID" and
//! "list every machine of this cluster" are tag queries. A backend that hands out machines it
//! does not create (bare-metal hosts behind BMCs, many of which reject writes to `AssetTag`)
//! has nowhere to put those tags. It gets a [`ClaimStore`] from the controller instead
//! (`ResolvedClass::claims`), so the backend itself still never talks to Kubernetes.
//!
//! A claim is keyed by the *hardware* (a key the backend derives from the machine's identity,
//! not from a NodeClass's name for it), so two NodeClasses listing one host contend for one
//! record. Every write is conditional: create fails when the record exists, replace and
//! delete fail when the record changed since it was read ([`Written::Conflict`]). That is
//! all a backend needs for "at most one holder per host" across replicas, restarts and classes.
//!
//! `providers/CONTRACT.md` section 10 is the normative text; [`check_store`] its executable
//! form for any implementation.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{ProviderError, Result};

/// One host's ownership record. Contains no secret: the controller stores it where every
/// reader of kube-node's namespace can see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClaimRecord {
    /// The store key, chosen by the backend from the hardware's identity: lowercase
    /// `[a-z0-9-]`, at most 63 characters, starting with a letter.
    pub key: String,
    /// The store's version of the record (a resourceVersion); `None` before it was written.
    pub version: Option<String>,
    /// The cluster whose kube-node holds the record.
    pub cluster: String,
    /// The NodeClass that claimed the host.
    pub node_class: String,
    /// The Node the host is claimed for; empty while the host is held without a Node (a host
    /// set aside as failed).
    pub node_name: String,
    /// That Node's UID (the create's idempotency key); empty like `node_name`.
    pub node_uid: String,
    /// When the claim was taken, Unix seconds.
    pub claimed_at_unix: i64,
    /// The backend's own fields (host name, phase, failure reason). Keys are
    /// `[a-z0-9-]`; values are short plain text and never secrets.
    pub data: BTreeMap<String, String>,
}

/// The outcome of a conditional write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// The write happened; the record as stored (with its new version).
    Done(ClaimRecord),
    /// Someone else wrote or deleted the record first (or, for a create, it exists).
    Conflict,
}

/// Durable, atomic claim records, provided by the controller to backends that need them.
///
/// Implementations MUST make [`ClaimStore::create`], [`ClaimStore::replace`] and
/// [`ClaimStore::delete`] atomic compare-and-swap operations on one record, and MUST NOT
/// return a partial [`ClaimStore::list`].
#[async_trait]
pub trait ClaimStore: Send + Sync + 'static {
    /// The record of `key`, if there is one.
    async fn get(&self, key: &str) -> Result<Option<ClaimRecord>>;
    /// Every record in the store (of every cluster and class; filter on the fields).
    async fn list(&self) -> Result<Vec<ClaimRecord>>;
    /// Creates the record; [`Written::Conflict`] when one exists under its key.
    async fn create(&self, record: &ClaimRecord) -> Result<Written>;
    /// Replaces the record if its stored version is still `record.version`.
    async fn replace(&self, record: &ClaimRecord) -> Result<Written>;
    /// Deletes the record if its stored version is still `version`. Deleting a record that is
    /// gone is `Ok(true)`; a changed one is `Ok(false)`.
    async fn delete(&self, key: &str, version: &str) -> Result<bool>;
}

/// Checks that a claim key is one every store accepts (a DNS-1123 label).
pub fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 63
        && key.starts_with(|c: char| c.is_ascii_lowercase())
        && !key.ends_with('-')
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ProviderError::InvalidConfig(format!(
            "claim key {key:?} is not a DNS-1123 label"
        )))
    }
}

/// A claim store in memory: for tests of backends, and for a single process without a cluster.
/// Versions are a per-store counter, like resourceVersions.
#[derive(Debug, Default)]
pub struct MemoryClaimStore {
    inner: Mutex<(u64, HashMap<String, ClaimRecord>)>,
}

impl MemoryClaimStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, (u64, HashMap<String, ClaimRecord>)>> {
        self.inner
            .lock()
            .map_err(|_| ProviderError::Transient("claim store lock poisoned".into()))
    }
}

#[async_trait]
impl ClaimStore for MemoryClaimStore {
    async fn get(&self, key: &str) -> Result<Option<ClaimRecord>> {
        Ok(self.lock()?.1.get(key).cloned())
    }

    async fn list(&self) -> Result<Vec<ClaimRecord>> {
        let mut all: Vec<_> = self.lock()?.1.values().cloned().collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(all)
    }

    async fn create(&self, record: &ClaimRecord) -> Result<Written> {
        check_key(&record.key)?;
        let mut g = self.lock()?;
        if g.1.contains_key(&record.key) {
            return Ok(Written::Conflict);
        }
        g.0 += 1;
        let mut r = record.clone();
        r.version = Some(g.0.to_string());
        g.1.insert(r.key.clone(), r.clone());
        Ok(Written::Done(r))
    }

    async fn replace(&self, record: &ClaimRecord) -> Result<Written> {
        let mut g = self.lock()?;
        match g.1.get(&record.key) {
            Some(cur) if cur.version == record.version && record.version.is_some() => {}
            _ => return Ok(Written::Conflict),
        }
        g.0 += 1;
        let mut r = record.clone();
        r.version = Some(g.0.to_string());
        g.1.insert(r.key.clone(), r.clone());
        Ok(Written::Done(r))
    }

    async fn delete(&self, key: &str, version: &str) -> Result<bool> {
        let mut g = self.lock()?;
        match g.1.get(key) {
            None => Ok(true),
            Some(cur) if cur.version.as_deref() == Some(version) => {
                g.1.remove(key);
                Ok(true)
            }
            Some(_) => Ok(false),
        }
    }
}

/// Checks a [`ClaimStore`] implementation against section 10 of the contract: create is
/// exclusive (also when raced), replace and delete are conditional on the version, a deleted
/// record is gone from get and list, and deleting it again succeeds. Uses (and removes) keys
/// starting with `prefix`.
pub async fn check_store(store: &dyn ClaimStore, prefix: &str) -> std::result::Result<(), String> {
    let key = format!("{prefix}-a");
    let _ = cleanup(store, &key).await;
    let rec = ClaimRecord {
        key: key.clone(),
        cluster: "c".into(),
        node_class: "nc".into(),
        node_name: "n1".into(),
        node_uid: "u1".into(),
        claimed_at_unix: 1,
        data: BTreeMap::from([("phase".into(), "claimed".into())]),
        ..Default::default()
    };
    let mut other = rec.clone();
    other.node_name = "n2".into();
    other.node_uid = "u2".into();
    // Two racing creates: exactly one wins.
    let (a, b) = tokio::join!(store.create(&rec), store.create(&other));
    let (a, b) = (a.map_err(|e| e.to_string())?, b.map_err(|e| e.to_string())?);
    let stored = match (a, b) {
        (Written::Done(r), Written::Conflict) | (Written::Conflict, Written::Done(r)) => r,
        (a, b) => return Err(format!("two racing creates returned {a:?} and {b:?}")),
    };
    let got = store
        .get(&key)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("get after create found nothing")?;
    if got.node_uid != stored.node_uid || got.version != stored.version || got.data != rec.data {
        return Err(format!("get returned {got:?}, stored {stored:?}"));
    }
    // A replace with a stale version conflicts; with the current one it succeeds.
    let mut updated = got.clone();
    updated.data.insert("phase".into(), "powering-on".into());
    let Written::Done(newer) = store.replace(&updated).await.map_err(|e| e.to_string())? else {
        return Err("replace with the current version conflicted".into());
    };
    if store.replace(&updated).await.map_err(|e| e.to_string())? != Written::Conflict {
        return Err("replace with a stale version did not conflict".into());
    }
    let version = got.version.clone().unwrap_or_default();
    if store
        .delete(&key, &version)
        .await
        .map_err(|e| e.to_string())?
    {
        return Err("delete with a stale version succeeded".into());
    }
    if !store
        .list()
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .any(|r| r.key == key)
    {
        return Err("list misses the record".into());
    }
    let v = newer.version.clone().unwrap_or_default();
    if !store.delete(&key, &v).await.map_err(|e| e.to_string())? {
        return Err("delete with the current version failed".into());
    }
    if store.get(&key).await.map_err(|e| e.to_string())?.is_some() {
        return Err("get after delete still finds the record".into());
    }
    if store
        .list()
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .any(|r| r.key == key)
    {
        return Err("list after delete still shows the record".into());
    }
    if !store.delete(&key, &v).await.map_err(|e| e.to_string())? {
        return Err("delete of a gone record did not succeed".into());
    }
    Ok(())
}

async fn cleanup(store: &dyn ClaimStore, key: &str) -> Result<()> {
    if let Some(r) = store.get(key).await? {
        store
            .delete(key, r.version.as_deref().unwrap_or_default())
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_passes_the_check() {
        let s = MemoryClaimStore::new();
        check_store(&s, "test")
            .await
            .expect("memory store conforms");
    }

    #[test]
    fn keys_are_labels() {
        assert!(check_key("bm-0a1b").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("Bm").is_err());
        assert!(check_key("1bm").is_err());
        assert!(check_key("bm-").is_err());
        assert!(check_key(&"a".repeat(64)).is_err());
    }
}
