//! The object store: tables of JSON objects per resource, the global
//! resourceVersion, watch history/fan-out, and the create/update/patch/delete
//! pipelines with their apiserver semantics.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::error::{ApiError, ApiResult};
use crate::patch::{PatchType, apply_patch, parse_apply_body};
use crate::resources::{CRD_GROUP, CRD_PLURAL, Registry, ResKey, ResourceDef, parse_crd};
use crate::selector::{FieldSelector, LabelSelector};
use crate::util::{
    finalizers_of, get_path, hex_decode, hex_encode, is_deleting, is_dns_subdomain, meta, meta_mut,
    meta_str, name_of, new_uid, now_rfc3339, owner_uids, random_suffix, rv_of, set_path, uid_of,
};

/// Default number of watch events retained per resource.
pub(crate) const DEFAULT_HISTORY: usize = 10_000;

/// `(namespace, name)`; namespace is `""` for cluster-scoped objects.
pub(crate) type ObjKey = (String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One committed write, as kept in the watch history and sent to watchers.
#[derive(Debug)]
pub(crate) struct Change {
    pub rv: u64,
    pub kind: ChangeType,
    pub namespace: String,
    pub object: Arc<Value>,
    /// The previous state (for MODIFIED/DELETED), used for selector transitions.
    pub old: Option<Arc<Value>>,
    pub at: tokio::time::Instant,
}

#[derive(Debug)]
pub(crate) enum WatchMsg {
    Change(Arc<Change>),
}

#[derive(Default)]
pub(crate) struct Table {
    pub objects: BTreeMap<ObjKey, Arc<Value>>,
    history: VecDeque<Arc<Change>>,
    /// Highest resourceVersion dropped from `history` (watches from older RVs get 410).
    evicted_upto: u64,
    watchers: Vec<UnboundedSender<WatchMsg>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ObjRef {
    pub key: ResKey,
    pub ns: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    Main,
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum Propagation {
    Orphan,
    #[default]
    Background,
    Foreground,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct DeleteOpts {
    pub propagation: Propagation,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub dry_run: bool,
}

pub(crate) struct ListQuery {
    pub label: LabelSelector,
    pub field: FieldSelector,
    pub limit: Option<usize>,
    pub cont: Option<String>,
}

pub(crate) struct ListPage {
    pub items: Vec<Arc<Value>>,
    pub rv: u64,
    pub cont: Option<String>,
}

pub(crate) enum WatchFrom {
    /// Send the current state as ADDED, then changes after the current RV.
    Now,
    /// Changes after this resourceVersion.
    After(u64),
}

pub(crate) struct WatchStart {
    pub initial: Vec<Arc<Value>>,
    pub replay: Vec<Arc<Change>>,
    pub rx: Option<UnboundedReceiver<WatchMsg>>,
    pub start_rv: u64,
    pub expired: Option<ApiError>,
}

pub(crate) struct State {
    pub registry: Registry,
    pub rv: u64,
    tables: HashMap<ResKey, Table>,
    /// uid -> object
    pub(crate) uids: HashMap<String, ObjRef>,
    /// owner uid -> dependents
    pub(crate) dependents: HashMap<String, HashSet<ObjRef>>,
    history_limit: usize,
    pub(crate) gc_queue: VecDeque<(String, Option<String>)>,
    pub(crate) gc_running: bool,
}

impl State {
    pub fn new() -> Self {
        State {
            registry: Registry::with_builtins(),
            rv: 0,
            tables: HashMap::new(),
            uids: HashMap::new(),
            dependents: HashMap::new(),
            history_limit: DEFAULT_HISTORY,
            gc_queue: VecDeque::new(),
            gc_running: false,
        }
    }

    pub fn set_history_limit(&mut self, n: usize) {
        self.history_limit = n.max(1);
    }

    pub fn object(&self, def: &ResourceDef, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.tables
            .get(&def.key)
            .and_then(|t| t.objects.get(&(ns.to_string(), name.to_string())))
            .cloned()
    }

    /// Look an object up by uid.
    pub fn object_by_uid(&self, uid: &str) -> Option<(Arc<ResourceDef>, Arc<Value>)> {
        let r = self.uids.get(uid)?;
        let def = self.def_for_key(&r.key)?;
        let obj = self.object(&def, &r.ns, &r.name)?;
        Some((def, obj))
    }

    pub fn get(&self, def: &ResourceDef, ns: &str, name: &str) -> ApiResult<Arc<Value>> {
        self.object(def, ns, name)
            .ok_or_else(|| ApiError::not_found(def, name))
    }

    /// Objects of a table in scope (all namespaces when `ns` is `None`), in key order.
    pub fn objects_in<'a>(
        &'a self,
        key: &ResKey,
        ns: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Arc<Value>)> + 'a {
        let table = self.tables.get(key);
        let start = match ns {
            Some(ns) => Bound::Included((ns.to_string(), String::new())),
            None => Bound::Unbounded,
        };
        table
            .into_iter()
            .flat_map(move |t| t.objects.range((start.clone(), Bound::Unbounded)))
            .take_while(move |(k, _)| ns.is_none_or(|ns| k.0 == ns))
    }

    // ---------------------------------------------------------------- list

    pub fn list(&self, def: &ResourceDef, ns: Option<&str>, q: &ListQuery) -> ApiResult<ListPage> {
        let mut snapshot_rv = self.rv;
        let mut after: Option<ObjKey> = None;
        if let Some(c) = q.cont.as_deref().filter(|c| !c.is_empty()) {
            let (rv, key) = decode_continue(c).ok_or_else(|| {
                ApiError::bad_request("continue key is not valid: illegal base64 data")
            })?;
            snapshot_rv = rv;
            after = Some(key);
        }
        let matches = |o: &Value| q.label.matches(crate::util::labels_of(o)) && q.field.matches(o);
        let mut items = Vec::new();
        let mut cont = None;
        let limit = q.limit.filter(|l| *l > 0);

        // Fast path: a single object pinned by metadata.name.
        if let Some(name) = q.field.pinned_name()
            && (ns.is_some() || !def.namespaced)
            && after.is_none()
        {
            if let Some(o) = self.object(def, ns.unwrap_or_default(), name)
                && matches(&o)
            {
                items.push(o);
            }
            return Ok(ListPage {
                items,
                rv: snapshot_rv,
                cont: None,
            });
        }

        let iter: Box<dyn Iterator<Item = (&ObjKey, &Arc<Value>)>> = match &after {
            Some(k) => Box::new(
                self.tables
                    .get(&def.key)
                    .into_iter()
                    .flat_map(move |t| {
                        t.objects
                            .range((Bound::Excluded(k.clone()), Bound::Unbounded))
                    })
                    .take_while(move |(k, _)| ns.is_none_or(|ns| k.0 == ns)),
            ),
            None => Box::new(self.objects_in(&def.key, ns)),
        };
        let mut last_key: Option<&ObjKey> = None;
        for (k, o) in iter {
            if !matches(o) {
                continue;
            }
            if let Some(l) = limit
                && items.len() >= l
            {
                if let Some(lk) = last_key {
                    cont = Some(encode_continue(snapshot_rv, lk));
                }
                break;
            }
            items.push(o.clone());
            last_key = Some(k);
        }
        Ok(ListPage {
            items,
            rv: snapshot_rv,
            cont,
        })
    }

    // ---------------------------------------------------------------- watch

    pub fn watch_start(
        &mut self,
        def: &ResourceDef,
        ns: Option<&str>,
        from: WatchFrom,
        label: &LabelSelector,
        field: &FieldSelector,
    ) -> WatchStart {
        let current = self.rv;
        let mut initial = Vec::new();
        let mut replay = Vec::new();
        let start_rv;
        match from {
            WatchFrom::Now => {
                initial = self
                    .objects_in(&def.key, ns)
                    .filter(|(_, o)| label.matches(crate::util::labels_of(o)) && field.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect();
                start_rv = current;
            }
            WatchFrom::After(rv) => {
                let table = self.tables.entry(def.key.clone()).or_default();
                if rv < table.evicted_upto {
                    return WatchStart {
                        initial,
                        replay,
                        rx: None,
                        start_rv: rv,
                        expired: Some(ApiError::expired(format!(
                            "too old resource version: {rv} ({})",
                            table.evicted_upto
                        ))),
                    };
                }
                let idx = table.history.partition_point(|c| c.rv <= rv);
                replay = table.history.iter().skip(idx).cloned().collect();
                start_rv = rv;
            }
        }
        let (tx, rx) = unbounded_channel();
        let table = self.tables.entry(def.key.clone()).or_default();
        table.watchers.retain(|w| !w.is_closed());
        table.watchers.push(tx);
        WatchStart {
            initial,
            replay,
            rx: Some(rx),
            start_rv,
            expired: None,
        }
    }

    // ---------------------------------------------------------------- commit

    fn index_replace(&mut self, oref: &ObjRef, old: Option<&Value>, new: Option<&Value>) {
        if let Some(o) = old {
            for u in owner_uids(o) {
                if let Some(set) = self.dependents.get_mut(&u) {
                    set.remove(oref);
                    if set.is_empty() {
                        self.dependents.remove(&u);
                    }
                }
            }
            if new.is_none() {
                self.uids.remove(uid_of(o));
            }
        }
        if let Some(n) = new {
            let uid = uid_of(n);
            if !uid.is_empty() {
                self.uids.insert(uid.to_string(), oref.clone());
            }
            for u in owner_uids(n) {
                self.dependents.entry(u).or_default().insert(oref.clone());
            }
        }
    }

    fn emit(&mut self, key: &ResKey, change: Change) {
        let limit = self.history_limit;
        let table = self.tables.entry(key.clone()).or_default();
        let change = Arc::new(change);
        table.history.push_back(change.clone());
        while table.history.len() > limit {
            if let Some(c) = table.history.pop_front() {
                table.evicted_upto = c.rv;
            }
        }
        table
            .watchers
            .retain(|w| w.send(WatchMsg::Change(change.clone())).is_ok());
    }

    /// Store `obj` (bumping the resourceVersion) and notify watchers.
    pub(crate) fn commit_put(
        &mut self,
        def: &ResourceDef,
        mut obj: Value,
        kind: ChangeType,
    ) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        if let Some(m) = meta_mut(&mut obj) {
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        let name = name_of(&obj).to_string();
        let new = Arc::new(obj);
        let old = self
            .tables
            .entry(def.key.clone())
            .or_default()
            .objects
            .insert((ns.clone(), name.clone()), new.clone());
        let oref = ObjRef {
            key: def.key.clone(),
            ns: ns.clone(),
            name,
        };
        self.index_replace(&oref, old.as_deref(), Some(&new));
        self.emit(
            &def.key,
            Change {
                rv,
                kind,
                namespace: ns,
                object: new.clone(),
                old,
                at: tokio::time::Instant::now(),
            },
        );
        if def.is(CRD_GROUP, CRD_PLURAL)
            && let Ok((crd_name, defs)) = parse_crd(&new)
        {
            self.registry.install_crd(&crd_name, defs);
        }
        new
    }

    /// Remove an object (bumping the resourceVersion), notify watchers and
    /// queue garbage collection of its dependents.
    fn commit_remove(&mut self, def: &ResourceDef, ns: &str, name: &str) -> Option<Arc<Value>> {
        let key = (ns.to_string(), name.to_string());
        let old = self.tables.get_mut(&def.key)?.objects.remove(&key)?;
        self.rv += 1;
        let rv = self.rv;
        let mut obj = (*old).clone();
        if let Some(m) = meta_mut(&mut obj) {
            m.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let obj = Arc::new(obj);
        let oref = ObjRef {
            key: def.key.clone(),
            ns: ns.to_string(),
            name: name.to_string(),
        };
        self.index_replace(&oref, Some(&old), None);
        self.emit(
            &def.key,
            Change {
                rv,
                kind: ChangeType::Deleted,
                namespace: ns.to_string(),
                object: obj.clone(),
                old: Some(old),
                at: tokio::time::Instant::now(),
            },
        );
        let uid = uid_of(&obj).to_string();
        if !uid.is_empty() {
            self.gc_queue
                .push_back((uid, def.namespaced.then(|| ns.to_string())));
        }
        if def.is(CRD_GROUP, CRD_PLURAL) {
            self.remove_crd_instances(name);
        }
        if def.is("", "namespaces") {
            self.delete_namespace_contents(name);
        }
        self.run_gc();
        Some(obj)
    }

    fn remove_crd_instances(&mut self, crd_name: &str) {
        let mut defs = self.registry.crd_defs(crd_name);
        defs.sort_by(|a, b| a.key.cmp(&b.key));
        defs.dedup_by(|a, b| a.key == b.key);
        for d in &defs {
            let keys: Vec<ObjKey> = self
                .tables
                .get(&d.key)
                .map(|t| t.objects.keys().cloned().collect())
                .unwrap_or_default();
            for (ns, name) in keys {
                self.commit_remove(d, &ns, &name);
            }
        }
        for k in self.registry.uninstall_crd(crd_name) {
            if !self.registry.key_registered(&k) {
                // Dropping the table closes the watch streams.
                self.tables.remove(&k);
            }
        }
    }

    fn delete_namespace_contents(&mut self, ns: &str) {
        let mut victims = Vec::new();
        for (key, table) in &self.tables {
            for (k, _) in table
                .objects
                .range((
                    Bound::Included((ns.to_string(), String::new())),
                    Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.0 == ns)
            {
                victims.push((key.clone(), k.1.clone()));
            }
        }
        for (key, name) in victims {
            if let Some(def) = self.def_for_key(&key) {
                let _ = self.delete(&def, ns, &name, &DeleteOpts::default());
            }
        }
    }

    pub(crate) fn def_for_key(&self, key: &ResKey) -> Option<Arc<ResourceDef>> {
        self.registry.by_key(key)
    }

    // ---------------------------------------------------------------- create

    pub fn create(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        body: Value,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        let mut obj = body;
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        check_type_meta(def, &obj)?;
        if !rv_of(&obj).is_empty() {
            return Err(ApiError::internal(
                "Internal error occurred: resourceVersion should not be set on objects to be created",
            ));
        }
        let (mut name, generate) = {
            let m = meta(&obj);
            let s = |f: &str| {
                m.and_then(|m| m.get(f))
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            (s("name"), s("generateName"))
        };
        if name.is_empty() {
            if generate.is_empty() {
                return Err(ApiError::invalid(
                    def,
                    "",
                    "metadata.name",
                    "FieldValueRequired",
                    "Required value: name or generateName is required",
                ));
            }
            name = format!("{generate}{}", random_suffix(5));
            let mut tries = 0;
            while self.object(def, ns, &name).is_some() && tries < 8 {
                name = format!("{generate}{}", random_suffix(5));
                tries += 1;
            }
        }
        if !is_dns_subdomain(&name) {
            return Err(invalid_name(def, &name));
        }
        let body_ns = meta_str(&obj, "namespace").unwrap_or_default().to_string();
        if def.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        if self.object(def, ns, &name).is_some() {
            return Err(ApiError::already_exists(def, &name));
        }
        if let Some(o) = obj.as_object_mut() {
            o.insert("kind".into(), Value::String(def.kind.clone()));
            o.insert("apiVersion".into(), Value::String(def.api_version.clone()));
        }
        if let Some(m) = meta_mut(&mut obj) {
            m.insert("name".into(), Value::String(name.clone()));
            if def.namespaced {
                m.insert("namespace".into(), Value::String(ns.to_string()));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), Value::String(new_uid()));
            m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
            m.insert("generation".into(), json!(1));
            for f in [
                "resourceVersion",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "selfLink",
            ] {
                m.remove(f);
            }
        }
        if def.custom
            && def.status
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        self.prepare_create(def, &name, &mut obj)?;
        if dry_run {
            return Ok(Arc::new(obj));
        }
        let out = self.commit_put(def, obj, ChangeType::Added);
        if def.is("policy", "poddisruptionbudgets") {
            self.refresh_pdb_status(ns, &name);
        }
        Ok(out)
    }

    /// Resource-specific defaulting and validation on create.
    fn prepare_create(&mut self, def: &ResourceDef, name: &str, obj: &mut Value) -> ApiResult<()> {
        if def.is(CRD_GROUP, CRD_PLURAL) {
            let (_, defs) = parse_crd(obj)?;
            self.check_crd_conflicts(name, &defs)?;
            let names = get_path(obj, &["spec", "names"])
                .cloned()
                .unwrap_or(json!({}));
            let stored: Vec<Value> = get_path(obj, &["spec", "versions"])
                .and_then(Value::as_array)
                .map(|vs| {
                    vs.iter()
                        .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                        .filter_map(|v| v.get("name").cloned())
                        .collect()
                })
                .unwrap_or_default();
            let now = now_rfc3339();
            let status = json!({
                "acceptedNames": names,
                "storedVersions": stored,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
            });
            if let Some(o) = obj.as_object_mut() {
                o.insert("status".into(), status);
            }
        }
        if def.is("", "namespaces") && get_path(obj, &["status", "phase"]).is_none() {
            set_path(obj, &["status", "phase"], json!("Active"));
        }
        Ok(())
    }

    fn check_crd_conflicts(&self, crd_name: &str, defs: &[ResourceDef]) -> ApiResult<()> {
        for d in defs {
            if let Some(existing) = self.registry.lookup(&d.group, &d.version, &d.plural)
                && (!existing.custom
                    || self
                        .registry
                        .crd_owner(&d.group, &d.version, &d.plural)
                        .as_deref()
                        != Some(crd_name))
            {
                return Err(ApiError::unprocessable(format!(
                    "CustomResourceDefinition.apiextensions.k8s.io \"{crd_name}\" is invalid: spec.names.plural: \
                     Invalid value: \"{}\": resource {}/{} is already served",
                    d.plural, d.api_version, d.plural
                )));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- update

    /// PUT. Returns the stored object and whether it was created.
    pub fn replace(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        mut body: Value,
        sub: Sub,
        dry_run: bool,
    ) -> ApiResult<(Arc<Value>, bool)> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let body_name = name_of(&body);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        match self.object(def, ns, name) {
            Some(old) => {
                // Custom resources (and CRDs) do not allow unconditional updates.
                let conditional_only = def.custom || def.is(CRD_GROUP, CRD_PLURAL);
                if conditional_only && rv_of(&body).is_empty() {
                    return Err(ApiError::invalid(
                        def,
                        name,
                        "metadata.resourceVersion",
                        "FieldValueInvalid",
                        "Invalid value: 0x0: must be specified for an update",
                    ));
                }
                self.finish_update(def, &old, body, sub, dry_run)
                    .map(|o| (o, false))
            }
            None if def.create_on_update && sub == Sub::Main => {
                if let Some(m) = meta_mut(&mut body) {
                    m.insert("name".into(), Value::String(name.to_string()));
                    m.remove("resourceVersion");
                }
                self.create(def, ns, body, dry_run).map(|o| (o, true))
            }
            None => Err(ApiError::not_found(def, name)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        pt: PatchType,
        body: &[u8],
        sub: Sub,
        field_manager: Option<&str>,
        dry_run: bool,
    ) -> ApiResult<(Arc<Value>, bool)> {
        check_patch_allowed(def, pt, field_manager)?;
        match self.object(def, ns, name) {
            Some(old) => {
                let patched = apply_patch(&old, pt, body)?;
                self.finish_update(def, &old, patched, sub, dry_run)
                    .map(|o| (o, false))
            }
            None if pt == PatchType::Apply && sub == Sub::Main => {
                let mut obj = parse_apply_body(body)?;
                let body_name = name_of(&obj);
                if !body_name.is_empty() && body_name != name {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({body_name}) does not match the name on the URL ({name})"
                    )));
                }
                if let Some(m) = meta_mut(&mut obj) {
                    m.insert("name".into(), Value::String(name.to_string()));
                    m.remove("managedFields");
                    m.remove("resourceVersion");
                }
                self.create(def, ns, obj, dry_run).map(|o| (o, true))
            }
            None => Err(ApiError::not_found(def, name)),
        }
    }

    /// The shared tail of update, patch, status and scale writes.
    pub(crate) fn finish_update(
        &mut self,
        def: &ResourceDef,
        old: &Arc<Value>,
        candidate: Value,
        sub: Sub,
        dry_run: bool,
    ) -> ApiResult<Arc<Value>> {
        let name = name_of(old).to_string();
        if !candidate.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        check_type_meta(def, &candidate)?;
        let cand_rv = rv_of(&candidate);
        if !cand_rv.is_empty() && cand_rv != rv_of(old) {
            return Err(ApiError::conflict(def, &name));
        }
        let cand_uid = uid_of(&candidate);
        if !cand_uid.is_empty() && cand_uid != uid_of(old) {
            return Err(ApiError::conflict_msg(
                def,
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {cand_uid}, UID in object meta: {}",
                    uid_of(old)
                ),
            ));
        }
        let cand_name = name_of(&candidate);
        if !cand_name.is_empty() && cand_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({cand_name}) does not match the name on the URL ({name})"
            )));
        }
        let old_ns = meta_str(old, "namespace").unwrap_or_default();
        let cand_ns = meta_str(&candidate, "namespace").unwrap_or_default();
        if def.namespaced && !cand_ns.is_empty() && cand_ns != old_ns {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }

        let mut new = match sub {
            Sub::Main => {
                let mut n = candidate;
                if def.status {
                    copy_field(old, &mut n, "status");
                }
                n
            }
            Sub::Status => {
                let mut n = (**old).clone();
                copy_field(&candidate, &mut n, "status");
                n
            }
        };
        // System-managed fields cannot be changed by clients.
        if let Some(o) = new.as_object_mut() {
            o.insert("kind".into(), Value::String(def.kind.clone()));
            o.insert(
                "apiVersion".into(),
                old.get("apiVersion")
                    .cloned()
                    .unwrap_or_else(|| Value::String(def.api_version.clone())),
            );
        }
        let old_meta = meta(old).cloned().unwrap_or_default();
        if let Some(m) = meta_mut(&mut new) {
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
                "resourceVersion",
                "selfLink",
            ] {
                match old_meta.get(f) {
                    Some(v) => {
                        m.insert(f.into(), v.clone());
                    }
                    None => {
                        m.remove(f);
                    }
                }
            }
        }
        if is_deleting(old) {
            let old_f = finalizers_of(old);
            let added: Vec<String> = finalizers_of(&new)
                .into_iter()
                .filter(|f| !old_f.contains(f))
                .collect();
            if !added.is_empty() {
                let list = added
                    .iter()
                    .map(|f| format!("{f:?}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ApiError::invalid(
                    def,
                    &name,
                    "metadata.finalizers",
                    "FieldValueForbidden",
                    &format!(
                        "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{list}}}"
                    ),
                ));
            }
        }
        validate_update(def, &name, old, &new)?;
        if def.is(CRD_GROUP, CRD_PLURAL) {
            let (crd_name, defs) = parse_crd(&new)?;
            self.check_crd_conflicts(&crd_name, &defs)?;
        }
        if spec_changed(def, old, &new) {
            let gen_ = old_meta
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if let Some(m) = meta_mut(&mut new) {
                m.insert("generation".into(), json!(gen_.saturating_add(1)));
            }
        }
        if new == **old {
            return Ok(old.clone());
        }
        if dry_run {
            return Ok(Arc::new(new));
        }
        let ns = old_ns.to_string();
        if is_deleting(&new) && finalizers_of(&new).is_empty() {
            // The last finalizer is gone: the object is deleted now.
            let oref = ObjRef {
                key: def.key.clone(),
                ns: ns.clone(),
                name: name.clone(),
            };
            let new = Arc::new(new);
            if let Some(t) = self.tables.get_mut(&def.key) {
                t.objects.insert((ns.clone(), name.clone()), new.clone());
            }
            self.index_replace(&oref, Some(old), Some(&new));
            return self
                .commit_remove(def, &ns, &name)
                .ok_or_else(|| ApiError::internal("object vanished during delete"));
        }
        let out = self.commit_put(def, new, ChangeType::Modified);
        if def.is("policy", "poddisruptionbudgets") && sub == Sub::Main {
            self.refresh_pdb_status(&ns, &name);
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- delete

    pub fn delete(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> ApiResult<Arc<Value>> {
        let obj = self.get(def, ns, name)?;
        if let Some(uid) = opts.uid.as_deref()
            && uid != uid_of(&obj)
        {
            return Err(ApiError::conflict_msg(
                def,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    uid_of(&obj)
                ),
            ));
        }
        if let Some(rv) = opts.resource_version.as_deref()
            && rv != rv_of(&obj)
        {
            return Err(ApiError::conflict_msg(
                def,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    rv_of(&obj)
                ),
            ));
        }
        if opts.dry_run {
            return Ok(obj);
        }
        if opts.propagation == Propagation::Orphan {
            let uid = uid_of(&obj).to_string();
            self.orphan_dependents(&uid, def.namespaced.then_some(ns));
        }
        if !finalizers_of(&obj).is_empty() {
            if is_deleting(&obj) {
                return Ok(obj);
            }
            let mut new = (*obj).clone();
            if let Some(m) = meta_mut(&mut new) {
                m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
                m.insert("deletionGracePeriodSeconds".into(), json!(0));
            }
            return Ok(self.commit_put(def, new, ChangeType::Modified));
        }
        self.commit_remove(def, ns, name)
            .ok_or_else(|| ApiError::not_found(def, name))
    }

    pub fn delete_collection(
        &mut self,
        def: &ResourceDef,
        ns: Option<&str>,
        q: &ListQuery,
        opts: &DeleteOpts,
    ) -> ApiResult<Vec<Arc<Value>>> {
        let page = self.list(
            def,
            ns,
            &ListQuery {
                label: q.label.clone(),
                field: q.field.clone(),
                limit: None,
                cont: None,
            },
        )?;
        let mut out = Vec::new();
        for o in page.items {
            let ns = meta_str(&o, "namespace").unwrap_or_default().to_string();
            match self.delete(def, &ns, name_of(&o), opts) {
                Ok(d) => out.push(d),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

fn invalid_name(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::invalid(
        def,
        name,
        "metadata.name",
        "FieldValueInvalid",
        &format!(
            "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
             characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', \
             regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
        ),
    )
}

/// Reject bodies whose `kind`/`apiVersion` name another type.
fn check_type_meta(def: &ResourceDef, obj: &Value) -> ApiResult<()> {
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && !k.is_empty()
        && k != def.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            def.kind
        )));
    }
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && !av.is_empty()
    {
        let group = av.split_once('/').map(|(g, _)| g).unwrap_or_default();
        if group != def.group {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                def.api_version
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_patch_allowed(
    def: &ResourceDef,
    pt: PatchType,
    field_manager: Option<&str>,
) -> ApiResult<()> {
    if pt == PatchType::Strategic && def.custom {
        return Err(ApiError::unsupported_media_type(
            "application/strategic-merge-patch+json (not supported for custom resources)",
        ));
    }
    if pt == PatchType::Apply && field_manager.is_none_or(str::is_empty) {
        return Err(ApiError::unprocessable(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    Ok(())
}

fn copy_field(from: &Value, to: &mut Value, field: &str) {
    let v = from.get(field).cloned();
    if let Some(o) = to.as_object_mut() {
        match v {
            Some(v) => {
                o.insert(field.to_string(), v);
            }
            None => {
                o.remove(field);
            }
        }
    }
}

/// Did anything besides metadata (and status, for resources with a status
/// subresource) change? Drives `metadata.generation`.
fn spec_changed(def: &ResourceDef, old: &Value, new: &Value) -> bool {
    let ignored =
        |k: &str| matches!(k, "metadata" | "kind" | "apiVersion") || (def.status && k == "status");
    let (Some(o), Some(n)) = (old.as_object(), new.as_object()) else {
        return old != new;
    };
    o.iter()
        .filter(|(k, _)| !ignored(k))
        .any(|(k, v)| n.get(k) != Some(v))
        || n.keys().any(|k| !ignored(k) && !o.contains_key(k))
}

/// Validation rules of the real apiserver that controllers depend on.
fn validate_update(def: &ResourceDef, name: &str, old: &Value, new: &Value) -> ApiResult<()> {
    if def.is("", "nodes") {
        let s = |v: &Value, p: &[&str]| {
            get_path(v, p)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let old_pid = s(old, &["spec", "providerID"]);
        if !old_pid.is_empty() && old_pid != s(new, &["spec", "providerID"]) {
            return Err(ApiError::invalid(
                def,
                name,
                "spec.providerID",
                "FieldValueForbidden",
                "Forbidden: node updates may not change providerID except from \"\" to valid",
            ));
        }
        let cidrs = |v: &Value| {
            get_path(v, &["spec", "podCIDRs"])
                .cloned()
                .filter(|c| c.as_array().is_some_and(|a| !a.is_empty()))
        };
        if let Some(old_c) = cidrs(old)
            && Some(&old_c) != cidrs(new).as_ref()
        {
            return Err(ApiError::invalid(
                def,
                name,
                "spec.podCIDRs",
                "FieldValueForbidden",
                "Forbidden: node updates may not change podCIDR except from \"\" to valid",
            ));
        }
    }
    Ok(())
}

fn encode_continue(rv: u64, key: &ObjKey) -> String {
    hex_encode(&format!("{rv}\n{}\n{}", key.0, key.1))
}

fn decode_continue(token: &str) -> Option<(u64, ObjKey)> {
    let s = hex_decode(token)?;
    let mut it = s.splitn(3, '\n');
    let rv = it.next()?.parse().ok()?;
    let ns = it.next()?.to_string();
    let name = it.next()?.to_string();
    Some((rv, (ns, name)))
}
