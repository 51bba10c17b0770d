//! Owner-reference garbage collection (synchronous, simplified).
//!
//! When an object is removed its uid is queued; dependents (objects whose
//! `metadata.ownerReferences` name that uid, found through an index) are
//! deleted — honouring their finalizers — unless another owner is still
//! alive, in which case only the dangling references are removed. `Orphan`
//! propagation strips the owner's references from its dependents at delete
//! time.

use serde_json::Value;

use crate::store::{ChangeType, DeleteOpts, ObjRef, State};
use crate::util::{is_deleting, meta, meta_mut, owner_uids};

impl State {
    pub(crate) fn run_gc(&mut self) {
        if self.gc_running {
            return;
        }
        self.gc_running = true;
        while let Some((uid, owner_ns)) = self.gc_queue.pop_front() {
            self.collect_dependents(&uid, owner_ns.as_deref());
        }
        self.gc_running = false;
    }

    fn dependents_of(&self, uid: &str, owner_ns: Option<&str>) -> Vec<ObjRef> {
        let mut deps: Vec<ObjRef> = self
            .dependents
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        // A namespaced owner can only own objects in its own namespace.
        if let Some(ns) = owner_ns {
            deps.retain(|d| d.ns == ns);
        }
        deps.sort();
        deps
    }

    fn collect_dependents(&mut self, uid: &str, owner_ns: Option<&str>) {
        for d in self.dependents_of(uid, owner_ns) {
            let Some(def) = self.def_for_key(&d.key) else {
                continue;
            };
            let Some(obj) = self.object(&def, &d.ns, &d.name) else {
                continue;
            };
            let refs: Vec<Value> = meta(&obj)
                .and_then(|m| m.get("ownerReferences"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let alive = |r: &Value| {
                r.get("uid")
                    .and_then(Value::as_str)
                    .is_some_and(|u| u != uid && self.uids.contains_key(u))
            };
            if refs.iter().any(alive) {
                let kept: Vec<Value> = refs.iter().filter(|r| alive(r)).cloned().collect();
                let mut new = (*obj).clone();
                if let Some(m) = meta_mut(&mut new) {
                    m.insert("ownerReferences".into(), Value::Array(kept));
                }
                self.commit_put(&def, new, ChangeType::Modified);
            } else {
                let _ = self.delete(&def, &d.ns, &d.name, &DeleteOpts::default());
            }
        }
    }

    pub(crate) fn orphan_dependents(&mut self, uid: &str, owner_ns: Option<&str>) {
        for d in self.dependents_of(uid, owner_ns) {
            let Some(def) = self.def_for_key(&d.key) else {
                continue;
            };
            let Some(obj) = self.object(&def, &d.ns, &d.name) else {
                continue;
            };
            let mut new = (*obj).clone();
            if let Some(refs) = meta_mut(&mut new)
                .and_then(|m| m.get_mut("ownerReferences"))
                .and_then(Value::as_array_mut)
            {
                refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid));
                if refs.is_empty()
                    && let Some(m) = meta_mut(&mut new)
                {
                    m.remove("ownerReferences");
                }
            }
            self.commit_put(&def, new, ChangeType::Modified);
        }
    }

    /// Delete every object whose owners (all of them, among kinds this server
    /// knows) no longer exist. Returns the number of objects deleted.
    pub fn collect_dangling(&mut self) -> usize {
        let mut victims = Vec::new();
        for (owner_uid, deps) in &self.dependents {
            if self.uids.contains_key(owner_uid) {
                continue;
            }
            for d in deps {
                victims.push(d.clone());
            }
        }
        victims.sort();
        victims.dedup();
        let mut n = 0;
        for d in victims {
            let Some(def) = self.def_for_key(&d.key) else {
                continue;
            };
            let Some(obj) = self.object(&def, &d.ns, &d.name) else {
                continue;
            };
            if is_deleting(&obj) {
                continue;
            }
            let refs = owner_uids(&obj);
            if refs.iter().all(|u| !self.uids.contains_key(u)) {
                if self
                    .delete(&def, &d.ns, &d.name, &DeleteOpts::default())
                    .is_ok()
                {
                    n += 1;
                }
            } else {
                let uid = refs
                    .into_iter()
                    .find(|u| !self.uids.contains_key(u))
                    .unwrap_or_default();
                self.gc_queue.push_back((uid, None));
                self.run_gc();
            }
        }
        n
    }
}
