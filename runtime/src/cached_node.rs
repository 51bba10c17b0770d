//! The Node cache's element: [`CachedNode`], the compact form of a trimmed Node.
//!
//! The process's one Node cache holds every Node of the cluster. As a
//! `k8s_openapi::api::core::v1::Node` each costs about 4 KB even after [`trim_node`]: the type
//! is about 1.5 KB inline before any string (metadata, spec and a status whose node info is
//! inline), every label or annotation is a map entry and two allocations, and every Node
//! repeats the same label keys, zone names, owner references and condition messages. A
//! `CachedNode` keeps exactly what [`trim_node`] keeps, in sorted boxed slices of shared
//! strings ([`intern`](crate::intern)): the strings thousands of Nodes have in common are
//! stored once.
//!
//! It is a [`kube::Resource`] of kind Node, so a reflector store, a `Controller` and
//! `ObjectRef`s work on it as on Nodes; its watch maps each `Event<Node>` with
//! [`cached_event`]. Its [`ObjectMeta`] ([`Resource::meta`]) is **partial**: it has the
//! scalar fields (name, uid, resourceVersion — what an `ObjectRef` and the controller runtime
//! read — generation, the creation and deletion timestamps, …) but **no labels, annotations,
//! owner references or finalizers**. Those are read through the Node's own accessors
//! ([`labels`](CachedNode::labels), [`annotations`](CachedNode::annotations),
//! [`owner_references`](CachedNode::owner_references),
//! [`finalizers`](CachedNode::finalizers), which shadow `ResourceExt`'s methods of the same
//! names), or from the whole Node that [`to_node`](CachedNode::to_node) rebuilds.
//!
//! Labels, annotations, condition texts and owner references are interned whole, so a Node
//! holds one pointer for each that other Nodes share (its zone label, its NodeSet's owner
//! reference, the kubelet's "posting ready status" condition).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{
    Node, NodeCondition, NodeConfigSource, NodeSpec, NodeStatus, Taint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use kube::runtime::watcher;
use kube_node_crds::names::{DRIFTED_CONDITION, MACHINE_READY_CONDITION, READY_CONDITION};

use crate::intern::{Compound, SharedTable, addr, intern, intern_in, opt_addr};

#[cfg(test)]
#[path = "cached_node/fixture.rs"]
pub(crate) mod fixture;

/// The prefix of the only annotations a cached Node keeps (kube-node's own).
const OWN_ANNOTATIONS: &str = "kube-node.io/";

/// Whether a cached Node keeps a status condition of this type.
fn kept_condition(type_: &str) -> bool {
    type_ == READY_CONDITION || type_ == MACHINE_READY_CONDITION || type_ == DRIFTED_CONDITION
}

/// Drops what no controller reads from a cached Node: managed fields, annotations not of
/// kube-node, and the kubelet's status (images, addresses, capacity, node info, volumes) but
/// the `Ready`, `MachineReady` and `Drifted` conditions. Metadata and spec stay whole: patches
/// test the taints and resourceVersion they were computed from. Empty collections stay empty
/// rather than absent: patches add annotation keys one by one where the map exists.
///
/// [`CachedNode::from`] applies exactly this trim: `CachedNode::from(n).to_node()` is `n`
/// trimmed.
pub fn trim_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    if let Some(a) = node.metadata.annotations.as_mut() {
        a.retain(|k, _| k.starts_with(OWN_ANNOTATIONS));
    }
    if let Some(status) = node.status.as_mut() {
        let conditions = status.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| kept_condition(&c.type_))
                .collect()
        });
        *status = NodeStatus {
            conditions,
            ..Default::default()
        };
    }
}

/// One label or annotation, interned whole.
#[derive(Debug, PartialEq, Eq)]
struct Pair {
    key: Arc<str>,
    value: Arc<str>,
}

static PAIRS: SharedTable<(usize, usize), Pair> = SharedTable::new(|| Mutex::new(Compound::new()));

fn pair(key: &str, value: &str) -> Arc<Pair> {
    let (key, value) = (intern(key), intern(value));
    intern_in(&PAIRS, (addr(&key), addr(&value)), || Pair { key, value })
}

/// A sorted list of shared pairs: a Node's labels or kept annotations.
type Pairs = Box<[Arc<Pair>]>;

/// A read-only view of a cached Node's labels or annotations, sorted by key.
#[derive(Clone, Copy, Debug)]
pub struct StrMap<'a>(&'a [Arc<Pair>]);

impl<'a> StrMap<'a> {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0
            .binary_search_by(|p| (*p.key).cmp(key))
            .ok()
            .map(|i| &*self.0[i].value)
    }

    /// Whether `key` is there.
    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.0.iter().map(|p| (&*p.key, &*p.value))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries as the map a `Node` holds.
    pub fn to_btree(&self) -> BTreeMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// An owner reference of a cached Node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedOwnerRef {
    api_version: Arc<str>,
    kind: Arc<str>,
    name: Arc<str>,
    uid: Arc<str>,
    controller: Option<bool>,
    block_owner_deletion: Option<bool>,
}

impl CachedOwnerRef {
    /// `apiVersion`.
    pub fn api_version(&self) -> &str {
        &self.api_version
    }
    /// `kind`.
    pub fn kind(&self) -> &str {
        &self.kind
    }
    /// `name`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// `uid`.
    pub fn uid(&self) -> &str {
        &self.uid
    }
    /// `controller`.
    pub fn controller(&self) -> Option<bool> {
        self.controller
    }
    /// `blockOwnerDeletion`.
    pub fn block_owner_deletion(&self) -> Option<bool> {
        self.block_owner_deletion
    }

    fn new(o: OwnerReference) -> Arc<Self> {
        type Key = (usize, usize, usize, usize, Option<bool>, Option<bool>);
        static OWNERS: SharedTable<Key, CachedOwnerRef> =
            SharedTable::new(|| Mutex::new(Compound::new()));
        let (api_version, kind) = (intern(&o.api_version), intern(&o.kind));
        let (name, uid) = (intern(&o.name), intern(&o.uid));
        let key = (
            addr(&api_version),
            addr(&kind),
            addr(&name),
            addr(&uid),
            o.controller,
            o.block_owner_deletion,
        );
        intern_in(&OWNERS, key, || Self {
            api_version,
            kind,
            name,
            uid,
            controller: o.controller,
            block_owner_deletion: o.block_owner_deletion,
        })
    }

    fn to_owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: self.api_version.to_string(),
            kind: self.kind.to_string(),
            name: self.name.to_string(),
            uid: self.uid.to_string(),
            controller: self.controller,
            block_owner_deletion: self.block_owner_deletion,
        }
    }
}

/// A taint of a cached Node.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedTaint {
    key: Arc<str>,
    value: Option<Arc<str>>,
    effect: Arc<str>,
    time_added: Option<Time>,
}

impl CachedTaint {
    /// `key`.
    pub fn key(&self) -> &str {
        &self.key
    }
    /// `value`.
    pub fn value(&self) -> Option<&str> {
        self.value.as_deref()
    }
    /// `effect`.
    pub fn effect(&self) -> &str {
        &self.effect
    }
    /// `timeAdded`.
    pub fn time_added(&self) -> Option<&Time> {
        self.time_added.as_ref()
    }

    fn new(t: Taint) -> Self {
        Self {
            key: intern(&t.key),
            value: t.value.as_deref().map(intern),
            effect: intern(&t.effect),
            time_added: t.time_added,
        }
    }

    fn to_taint(&self) -> Taint {
        Taint {
            key: self.key.to_string(),
            value: self.value.as_deref().map(str::to_string),
            effect: self.effect.to_string(),
            time_added: self.time_added.clone(),
        }
    }
}

/// What Nodes' conditions repeat: type, status, reason, message.
#[derive(Debug, PartialEq, Eq)]
struct ConditionText {
    type_: Arc<str>,
    status: Arc<str>,
    reason: Option<Arc<str>>,
    message: Option<Arc<str>>,
}

/// A kept status condition of a cached Node (`Ready`, `MachineReady` or `Drifted`), whole.
#[derive(Clone, Debug, PartialEq)]
pub struct CachedCondition {
    text: Arc<ConditionText>,
    last_heartbeat_time: Option<Time>,
    last_transition_time: Option<Time>,
}

impl CachedCondition {
    /// `type`.
    pub fn type_(&self) -> &str {
        &self.text.type_
    }
    /// `status`.
    pub fn status(&self) -> &str {
        &self.text.status
    }
    /// `reason`.
    pub fn reason(&self) -> Option<&str> {
        self.text.reason.as_deref()
    }
    /// `message`.
    pub fn message(&self) -> Option<&str> {
        self.text.message.as_deref()
    }
    /// `lastHeartbeatTime`.
    pub fn last_heartbeat_time(&self) -> Option<&Time> {
        self.last_heartbeat_time.as_ref()
    }
    /// `lastTransitionTime`.
    pub fn last_transition_time(&self) -> Option<&Time> {
        self.last_transition_time.as_ref()
    }

    fn new(c: NodeCondition) -> Self {
        static TEXTS: SharedTable<(usize, usize, usize, usize), ConditionText> =
            SharedTable::new(|| Mutex::new(Compound::new()));
        let (type_, status) = (intern(&c.type_), intern(&c.status));
        let reason = c.reason.as_deref().map(intern);
        let message = c.message.as_deref().map(intern);
        let key = (
            addr(&type_),
            addr(&status),
            opt_addr(&reason),
            opt_addr(&message),
        );
        let text = intern_in(&TEXTS, key, || ConditionText {
            type_,
            status,
            reason,
            message,
        });
        Self {
            text,
            last_heartbeat_time: c.last_heartbeat_time,
            last_transition_time: c.last_transition_time,
        }
    }

    fn to_condition(&self) -> NodeCondition {
        NodeCondition {
            type_: self.type_().to_string(),
            status: self.status().to_string(),
            reason: self.reason().map(str::to_string),
            message: self.message().map(str::to_string),
            last_heartbeat_time: self.last_heartbeat_time.clone(),
            last_transition_time: self.last_transition_time.clone(),
        }
    }
}

/// What a Node seldom has, out of line so that Nodes without it pay one pointer.
#[derive(Clone, Debug, Default, PartialEq)]
struct Rare {
    config_source: Option<NodeConfigSource>,
    external_id: Option<String>,
}

impl Rare {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The compact form of a trimmed Node: what [`trim_node`] keeps, with the strings Nodes
/// repeat shared. See the [module documentation](self).
///
/// Its [`Resource::meta`] has no labels, annotations, owner references or finalizers (nor
/// managed fields): read those through its accessors or [`to_node`](Self::to_node).
#[derive(Clone, Debug, PartialEq)]
pub struct CachedNode {
    /// Partial: the scalar fields (name, uid, resourceVersion, generation, timestamps, …).
    meta: ObjectMeta,
    labels: Option<Pairs>,
    annotations: Option<Pairs>,
    owner_references: Option<Box<[Arc<CachedOwnerRef>]>>,
    finalizers: Option<Box<[Arc<str>]>>,
    /// Whether the Node has a spec at all.
    has_spec: bool,
    provider_id: Option<Box<str>>,
    pod_cidr: Option<Box<str>>,
    pod_cidrs: Option<Box<[Box<str>]>>,
    taints: Option<Box<[CachedTaint]>>,
    unschedulable: Option<bool>,
    /// Whether the Node has a status at all.
    has_status: bool,
    conditions: Option<Box<[CachedCondition]>>,
    rare: Option<Box<Rare>>,
}

fn pairs(map: Option<BTreeMap<String, String>>, keep: impl Fn(&str) -> bool) -> Option<Pairs> {
    // A BTreeMap iterates in key order: the slice is sorted for binary search.
    map.map(|m| {
        m.iter()
            .filter(|(k, _)| keep(k))
            .map(|(k, v)| pair(k, v))
            .collect()
    })
}

fn btree(pairs: &Option<Pairs>) -> Option<BTreeMap<String, String>> {
    pairs.as_deref().map(|p| StrMap(p).to_btree())
}

impl From<Node> for CachedNode {
    /// Trims (as [`trim_node`]) and compacts.
    fn from(node: Node) -> Self {
        let m = node.metadata;
        let rare = Rare {
            config_source: node.spec.as_ref().and_then(|s| s.config_source.clone()),
            external_id: node.spec.as_ref().and_then(|s| s.external_id.clone()),
        };
        let has_spec = node.spec.is_some();
        let spec = node.spec.unwrap_or_default();
        let has_status = node.status.is_some();
        let conditions = node.status.and_then(|s| s.conditions).map(|cs| {
            cs.into_iter()
                .filter(|c| kept_condition(&c.type_))
                .map(CachedCondition::new)
                .collect()
        });
        Self {
            meta: ObjectMeta {
                name: m.name,
                uid: m.uid,
                resource_version: m.resource_version,
                generation: m.generation,
                creation_timestamp: m.creation_timestamp,
                deletion_timestamp: m.deletion_timestamp,
                deletion_grace_period_seconds: m.deletion_grace_period_seconds,
                generate_name: m.generate_name,
                namespace: m.namespace,
                self_link: m.self_link,
                labels: None,
                annotations: None,
                owner_references: None,
                finalizers: None,
                managed_fields: None,
            },
            labels: pairs(m.labels, |_| true),
            annotations: pairs(m.annotations, |k| k.starts_with(OWN_ANNOTATIONS)),
            owner_references: m
                .owner_references
                .map(|os| os.into_iter().map(CachedOwnerRef::new).collect()),
            finalizers: m
                .finalizers
                .map(|fs| fs.iter().map(|f| intern(f)).collect()),
            has_spec,
            provider_id: spec.provider_id.map(String::into_boxed_str),
            pod_cidr: spec.pod_cidr.map(String::into_boxed_str),
            pod_cidrs: spec
                .pod_cidrs
                .map(|cs| cs.into_iter().map(String::into_boxed_str).collect()),
            taints: spec
                .taints
                .map(|ts| ts.into_iter().map(CachedTaint::new).collect()),
            unschedulable: spec.unschedulable,
            has_status,
            conditions,
            rare: (!rare.is_empty()).then(|| Box::new(rare)),
        }
    }
}

impl CachedNode {
    /// The Node as [`trim_node`] leaves it.
    pub fn to_node(&self) -> Node {
        let rare = self.rare.as_deref();
        Node {
            metadata: ObjectMeta {
                labels: btree(&self.labels),
                annotations: btree(&self.annotations),
                owner_references: self
                    .owner_references
                    .as_deref()
                    .map(|os| os.iter().map(|o| o.to_owner_reference()).collect()),
                finalizers: self
                    .finalizers
                    .as_deref()
                    .map(|fs| fs.iter().map(|f| f.to_string()).collect()),
                ..self.meta.clone()
            },
            spec: self.has_spec.then(|| NodeSpec {
                provider_id: self.provider_id.as_deref().map(str::to_string),
                pod_cidr: self.pod_cidr.as_deref().map(str::to_string),
                pod_cidrs: self
                    .pod_cidrs
                    .as_deref()
                    .map(|cs| cs.iter().map(|c| c.to_string()).collect()),
                taints: self
                    .taints
                    .as_deref()
                    .map(|ts| ts.iter().map(CachedTaint::to_taint).collect()),
                unschedulable: self.unschedulable,
                config_source: rare.and_then(|r| r.config_source.clone()),
                external_id: rare.and_then(|r| r.external_id.clone()),
            }),
            status: self.has_status.then(|| NodeStatus {
                conditions: self
                    .conditions
                    .as_deref()
                    .map(|cs| cs.iter().map(CachedCondition::to_condition).collect()),
                ..Default::default()
            }),
        }
    }

    /// `metadata.labels`.
    pub fn labels(&self) -> StrMap<'_> {
        StrMap(self.labels.as_deref().unwrap_or_default())
    }

    /// `metadata.annotations`: kube-node's own (`kube-node.io/…`) only.
    pub fn annotations(&self) -> StrMap<'_> {
        StrMap(self.annotations.as_deref().unwrap_or_default())
    }

    /// `metadata.ownerReferences`.
    pub fn owner_references(&self) -> &[Arc<CachedOwnerRef>] {
        self.owner_references.as_deref().unwrap_or_default()
    }

    /// `metadata.finalizers`.
    pub fn finalizers(&self) -> impl Iterator<Item = &str> {
        self.finalizers.iter().flatten().map(|f| &**f)
    }

    /// Whether `metadata.finalizers` has `finalizer`.
    pub fn has_finalizer(&self, finalizer: &str) -> bool {
        self.finalizers().any(|f| f == finalizer)
    }

    /// `metadata.generation`.
    pub fn generation(&self) -> Option<i64> {
        self.meta.generation
    }

    /// `metadata.creationTimestamp`.
    pub fn creation_timestamp(&self) -> Option<&Time> {
        self.meta.creation_timestamp.as_ref()
    }

    /// `metadata.deletionTimestamp`.
    pub fn deletion_timestamp(&self) -> Option<&Time> {
        self.meta.deletion_timestamp.as_ref()
    }

    /// `metadata.deletionGracePeriodSeconds`.
    pub fn deletion_grace_period_seconds(&self) -> Option<i64> {
        self.meta.deletion_grace_period_seconds
    }

    /// `spec.providerID`.
    pub fn provider_id(&self) -> Option<&str> {
        self.provider_id.as_deref()
    }

    /// `spec.taints`.
    pub fn taints(&self) -> &[CachedTaint] {
        self.taints.as_deref().unwrap_or_default()
    }

    /// `spec.unschedulable`.
    pub fn unschedulable(&self) -> Option<bool> {
        self.unschedulable
    }

    /// The kept `status.conditions` (`Ready`, `MachineReady`, `Drifted`).
    pub fn conditions(&self) -> &[CachedCondition] {
        self.conditions.as_deref().unwrap_or_default()
    }

    /// The condition of type `type_`, if kept and present.
    pub fn condition(&self, type_: &str) -> Option<&CachedCondition> {
        self.conditions().iter().find(|c| c.type_() == type_)
    }
}

impl Resource for CachedNode {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Node")
    }

    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }

    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }

    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("nodes")
    }

    /// Partial: no labels, annotations, owner references or finalizers.
    fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    /// Partial: no labels, annotations, owner references or finalizers.
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.meta
    }
}

/// Decodes as a [`Node`] and compacts (the controller runtime asks its objects to be
/// deserializable).
impl<'de> serde::Deserialize<'de> for CachedNode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Node::deserialize(d).map(Self::from)
    }
}

/// A Node watch event as the Node cache stores it.
pub fn cached_event(event: watcher::Event<Node>) -> watcher::Event<CachedNode> {
    match event {
        watcher::Event::Apply(n) => watcher::Event::Apply(n.into()),
        watcher::Event::Delete(n) => watcher::Event::Delete(n.into()),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(n) => watcher::Event::InitApply(n.into()),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    fn trimmed(mut n: Node) -> Node {
        trim_node(&mut n);
        n
    }

    #[test]
    fn a_cached_node_is_the_trimmed_node() {
        for i in 0..12 {
            let n = fixture::kubelet_node(i, 4);
            let cached = CachedNode::from(n.clone());
            assert_eq!(cached.to_node(), trimmed(n), "node {i}");
        }
    }

    #[test]
    fn absent_and_empty_stay_apart() {
        let bare: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": "bare"}}))
            .expect("node");
        assert_eq!(CachedNode::from(bare.clone()).to_node(), bare);
        let empty: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "empty", "labels": {}, "annotations": {"other.io/x": "y"},
                         "finalizers": [], "ownerReferences": [], "generateName": "e-",
                         "managedFields": []},
            "spec": {"taints": [], "externalID": "x"},
            "status": {"images": [{"names": ["a"]}]},
        }))
        .expect("node");
        let cached = CachedNode::from(empty.clone());
        assert_eq!(cached.to_node(), trimmed(empty.clone()));
        let with_conditions: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c"},
            "status": {"conditions": [{"type": "MemoryPressure", "status": "False"}]},
        }))
        .expect("node");
        assert_eq!(
            CachedNode::from(with_conditions.clone()).to_node(),
            trimmed(with_conditions)
        );
    }

    #[test]
    fn accessors_read_what_the_node_has() {
        let n = fixture::kubelet_node(15, 4);
        let c = CachedNode::from(n.clone());
        assert_eq!(c.name_any(), n.name_any());
        assert_eq!(c.uid(), n.uid());
        assert_eq!(c.resource_version(), n.resource_version());
        assert_eq!(c.labels().to_btree(), n.labels().clone());
        assert_eq!(
            c.labels().get("kubernetes.io/hostname"),
            Some(n.name_any().as_str())
        );
        assert_eq!(c.labels().get("nope"), None);
        assert_eq!(
            c.annotations().get("kube-node.io/node-class"),
            Some("class-3")
        );
        assert!(!c.annotations().contains_key("node.alpha.kubernetes.io/ttl"));
        assert!(c.has_finalizer("kube-node.io/machine"));
        let o = &c.owner_references()[0];
        assert_eq!(
            (o.kind(), o.name(), o.controller()),
            ("NodeSet", "ns-3", Some(true))
        );
        assert!(c.deletion_timestamp().is_some());
        assert_eq!(
            c.provider_id(),
            n.spec.as_ref().and_then(|s| s.provider_id.as_deref())
        );
        assert_eq!(c.unschedulable(), Some(true));
        assert_eq!(c.taints().len(), 2);
        assert_eq!(
            c.condition(READY_CONDITION).map(CachedCondition::status),
            Some("True")
        );
        assert!(c.condition("MemoryPressure").is_none());
        // The partial metadata: its scalars, none of its collections.
        assert!(c.meta().labels.is_none() && c.meta().finalizers.is_none());
        assert_eq!(c.meta().deletion_timestamp, n.metadata.deletion_timestamp);
        let r = kube::runtime::reflector::ObjectRef::from_obj(&c);
        assert_eq!(
            (r.name.as_str(), r.namespace),
            (n.name_any().as_str(), None)
        );
    }

    #[test]
    fn repeated_strings_are_shared_between_nodes() {
        let a = CachedNode::from(fixture::kubelet_node(1, 1));
        let b = CachedNode::from(fixture::kubelet_node(2, 1));
        let key = |c: &CachedNode| c.labels.as_deref().map(|l| l[0].key.clone());
        assert!(Arc::ptr_eq(
            &key(&a).expect("labels"),
            &key(&b).expect("labels")
        ));
        // Whole labels, condition texts and owner references too.
        let label = |c: &CachedNode| c.labels.as_deref().map(|l| l[0].clone());
        assert!(Arc::ptr_eq(
            &label(&a).expect("labels"),
            &label(&b).expect("labels")
        ));
        let ready = |c: &CachedNode| c.condition(READY_CONDITION).map(|c| c.text.clone());
        assert!(Arc::ptr_eq(
            &ready(&a).expect("Ready"),
            &ready(&b).expect("Ready")
        ));
        assert!(Arc::ptr_eq(
            &a.owner_references()[0],
            &b.owner_references()[0]
        ));
    }

    #[test]
    fn it_decodes_as_a_node() {
        let n = fixture::kubelet_node(7, 4);
        let json = serde_json::to_value(&n).expect("json");
        let c: CachedNode = serde_json::from_value(json).expect("decodes");
        assert_eq!(c, CachedNode::from(n));
    }
}
