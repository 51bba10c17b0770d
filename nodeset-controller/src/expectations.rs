//! Creates and deletes a NodeSet has issued but not yet seen in its watch, as the ReplicaSet
//! controller's `ControllerExpectations` (kube-controller-manager `controller_utils.go`).
//!
//! Before issuing creates or deletes for a NodeSet, the controller records the Node names it
//! expects to appear (or to go). The Node watch lowers them as events arrive. While a NodeSet
//! has unmet expectations the reconcile neither creates nor deletes: its cache may not show its
//! own writes yet. Expectations expire after [`TTL`] so a lost event cannot wedge a NodeSet.
//!
//! Names (not counters) are tracked, so seeing the same event twice (a relist) is harmless.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use kube::Resource;
use kube::runtime::watcher;
use kube_node_runtime::CachedNode;

/// How long unmet expectations hold a NodeSet back.
pub const TTL: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, Default)]
struct Entry {
    creates: HashSet<String>,
    deletes: HashSet<String>,
    since: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    by_key: HashMap<String, Entry>,
    /// Node name → NodeSet key, for both kinds.
    index: HashMap<String, String>,
    /// Names seen since the watcher's last `Init` (to observe deletes missed during a relist).
    relist: Option<HashSet<String>>,
}

/// Expectations of all NodeSets. Cheap to share behind an `Arc`.
#[derive(Debug, Default)]
pub struct Expectations {
    state: Mutex<State>,
}

impl Expectations {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records Node names about to be created for a NodeSet.
    pub fn expect_creates(&self, key: &str, names: &[String]) {
        let mut s = self.lock();
        for n in names {
            s.index.insert(n.clone(), key.to_string());
        }
        let e = s.by_key.entry(key.to_string()).or_default();
        e.creates.extend(names.iter().cloned());
        e.since = Some(Instant::now());
    }

    /// Records Node names about to be deleted for a NodeSet.
    pub fn expect_deletes(&self, key: &str, names: &[String]) {
        let mut s = self.lock();
        for n in names {
            s.index.insert(n.clone(), key.to_string());
        }
        let e = s.by_key.entry(key.to_string()).or_default();
        e.deletes.extend(names.iter().cloned());
        e.since = Some(Instant::now());
    }

    /// A create was seen (or failed, so it will never be seen).
    pub fn creation_observed(&self, name: &str) {
        self.observe(name, true, false);
    }

    /// A delete was seen (or failed, so it will never be seen).
    pub fn deletion_observed(&self, name: &str) {
        self.observe(name, false, true);
    }

    fn observe(&self, name: &str, created: bool, deleted: bool) {
        let mut s = self.lock();
        Self::observe_locked(&mut s, name, created, deleted);
    }

    fn observe_locked(s: &mut State, name: &str, created: bool, deleted: bool) {
        let Some(key) = s.index.get(name).cloned() else {
            return;
        };
        let mut drop_key = false;
        if let Some(e) = s.by_key.get_mut(&key) {
            if created {
                e.creates.remove(name);
            }
            if deleted {
                e.deletes.remove(name);
            }
            drop_key = e.creates.is_empty() && e.deletes.is_empty();
            if !e.creates.contains(name) && !e.deletes.contains(name) {
                s.index.remove(name);
            }
        } else {
            s.index.remove(name);
        }
        if drop_key {
            s.by_key.remove(&key);
        }
    }

    /// Whether the NodeSet may act: nothing pending, or what is pending is older than [`TTL`].
    pub fn satisfied(&self, key: &str) -> bool {
        let s = self.lock();
        match s.by_key.get(key) {
            None => true,
            Some(e) => {
                (e.creates.is_empty() && e.deletes.is_empty())
                    || e.since.is_none_or(|t| t.elapsed() >= TTL)
            }
        }
    }

    /// Pending (creates, deletes) of a NodeSet.
    pub fn pending(&self, key: &str) -> (usize, usize) {
        let s = self.lock();
        s.by_key
            .get(key)
            .map_or((0, 0), |e| (e.creates.len(), e.deletes.len()))
    }

    /// Forgets a NodeSet's expectations (after they expired, or when the NodeSet is gone).
    pub fn clear(&self, key: &str) {
        let mut s = self.lock();
        if let Some(e) = s.by_key.remove(key) {
            for n in e.creates.iter().chain(e.deletes.iter()) {
                s.index.remove(n);
            }
        }
    }

    /// Feeds one Node watch event (called before the event triggers a reconcile).
    pub fn observe_event(&self, event: &watcher::Event<CachedNode>) {
        let mut s = self.lock();
        match event {
            watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                let Some(name) = n.meta().name.as_deref() else {
                    return;
                };
                if let Some(seen) = s.relist.as_mut() {
                    seen.insert(name.to_string());
                }
                let deleting = n.deletion_timestamp().is_some();
                Self::observe_locked(&mut s, name, true, deleting);
            }
            watcher::Event::Delete(n) => {
                if let Some(name) = n.meta().name.as_deref() {
                    Self::observe_locked(&mut s, name, true, true);
                }
            }
            watcher::Event::Init => s.relist = Some(HashSet::new()),
            watcher::Event::InitDone => {
                // Nodes we expected to go and that the relist no longer shows are gone.
                let seen = s.relist.take().unwrap_or_default();
                let gone: Vec<String> = s
                    .by_key
                    .values()
                    .flat_map(|e| e.deletes.iter())
                    .filter(|n| !seen.contains(*n))
                    .cloned()
                    .collect();
                for n in gone {
                    Self::observe_locked(&mut s, &n, false, true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use kube::api::ObjectMeta;

    /// As the cache holds it: the deletion timestamp is read through the accessor, not the
    /// (partial) metadata.
    fn node(name: &str, deleting: bool) -> CachedNode {
        CachedNode::from(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                deletion_timestamp: deleting.then(|| {
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())
                }),
                ..Default::default()
            },
            ..Default::default()
        })
    }

    #[test]
    fn creates_and_deletes_are_observed_by_name() {
        let e = Expectations::default();
        e.expect_creates("ns", &["a".into(), "b".into()]);
        assert!(!e.satisfied("ns"));
        e.observe_event(&watcher::Event::Apply(node("a", false)));
        e.observe_event(&watcher::Event::Apply(node("a", false)));
        assert_eq!(e.pending("ns"), (1, 0));
        e.creation_observed("b");
        assert!(e.satisfied("ns"));

        e.expect_deletes("ns", &["a".into()]);
        e.observe_event(&watcher::Event::Apply(node("a", false)));
        assert!(!e.satisfied("ns"));
        e.observe_event(&watcher::Event::Apply(node("a", true)));
        assert!(e.satisfied("ns"));
        assert!(e.satisfied("other"));
    }

    #[test]
    fn a_relist_observes_deletes_it_no_longer_shows() {
        let e = Expectations::default();
        e.expect_deletes("ns", &["a".into(), "b".into()]);
        e.observe_event(&watcher::Event::Init);
        e.observe_event(&watcher::Event::InitApply(node("b", false)));
        e.observe_event(&watcher::Event::InitDone);
        assert_eq!(e.pending("ns"), (0, 1));
        e.clear("ns");
        assert!(e.satisfied("ns"));
    }
}
