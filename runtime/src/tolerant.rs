//! Watching NodeClasses and NodeSets one object at a time.
//!
//! A typed watch decodes the whole list at once, so one object the types cannot hold (a
//! `bootDelay: forever` accepted under an older or looser schema) fails the list, the watch
//! never syncs, and every object of the kind goes unseen. Here the watch reads untyped objects
//! and decodes (and validates) each one by itself: a good object flows on as its type; a bad
//! one is set aside in [`InvalidObjects`] (counted in `kube_node_invalid_objects{kind}`),
//! removed from the typed cache (so nothing acts on a stale version of it), and handed to a
//! reporter that writes `Ready=False`, reason `InvalidSpec`, naming the field, on the object
//! itself. The object's content never goes to a log: only its name and the field error.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::{Stream, TryStreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_node_crds::InvalidSpec;
use kube_node_crds::names::{FIELD_MANAGER, READY_CONDITION};
use prometheus_client::metrics::gauge::Gauge;
use serde_json::{Value, json};

/// The condition and event reason of an object that cannot be used.
pub const INVALID_SPEC_REASON: &str = "InvalidSpec";

/// The objects of one kind set aside because they do not decode or validate, by name.
#[derive(Debug)]
pub struct InvalidObjects {
    kind: &'static str,
    gauge: Gauge,
    objects: Mutex<HashMap<String, InvalidSpec>>,
    /// Names seen since the watch began a re-list; `None` when not re-listing.
    relist: Mutex<Option<HashSet<String>>>,
}

impl InvalidObjects {
    /// An empty set for `kind`, counted in `gauge`.
    pub fn new(kind: &'static str, gauge: Gauge) -> Arc<Self> {
        Arc::new(Self {
            kind,
            gauge,
            objects: Mutex::default(),
            relist: Mutex::default(),
        })
    }

    /// Why the object `name` was set aside, if it was.
    pub fn get(&self, name: &str) -> Option<InvalidSpec> {
        self.objects.lock().ok()?.get(name).cloned()
    }

    /// How many objects are set aside.
    pub fn len(&self) -> usize {
        self.objects.lock().map_or(0, |o| o.len())
    }

    /// Whether no object is set aside.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn update(&self, name: &str, error: Option<InvalidSpec>) {
        if let Ok(mut seen) = self.relist.lock()
            && let Some(seen) = seen.as_mut()
        {
            seen.insert(name.to_string());
        }
        let Ok(mut objects) = self.objects.lock() else {
            return;
        };
        match error {
            Some(e) => {
                objects.insert(name.to_string(), e);
            }
            None => {
                objects.remove(name);
            }
        }
        self.gauge
            .set(i64::try_from(objects.len()).unwrap_or(i64::MAX));
    }

    fn begin_relist(&self) {
        if let Ok(mut r) = self.relist.lock() {
            *r = Some(HashSet::new());
        }
    }

    /// Forgets objects the re-list no longer showed (deleted while the watch was down).
    fn end_relist(&self) {
        let Some(seen) = self.relist.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        if let Ok(mut objects) = self.objects.lock() {
            objects.retain(|name, _| seen.contains(name));
            self.gauge
                .set(i64::try_from(objects.len()).unwrap_or(i64::MAX));
        }
    }
}

/// An object that did not decode or validate, for the reporter.
#[derive(Clone, Debug)]
pub struct Rejected {
    /// The object as the API server holds it.
    pub object: DynamicObject,
    /// What is wrong with it.
    pub error: InvalidSpec,
}

/// How the watch turns JSON into the typed object, and stands in for an object it cannot
/// decode when that object must leave the typed cache.
pub struct Decoder<K> {
    /// Decodes and validates one object.
    pub decode: fn(Value) -> Result<K, InvalidSpec>,
    /// An object of the kind with only this metadata (used in `Delete` events only).
    pub placeholder: fn(ObjectMeta) -> K,
}

// Two function pointers: copied whatever `K` is (a derive would ask `K: Copy`).
impl<K> Clone for Decoder<K> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<K> Copy for Decoder<K> {}

/// How NodeClasses are read: decoded and validated one by one.
pub fn nodeclass_decoder() -> Decoder<kube_node_crds::NodeClass> {
    use kube_node_crds::v1alpha1::{ProviderSpec, ProviderType};
    Decoder {
        decode: kube_node_crds::NodeClass::decode_and_validate,
        placeholder: |metadata| kube_node_crds::NodeClass {
            metadata,
            spec: kube_node_crds::NodeClassSpec {
                provider: ProviderSpec {
                    type_: ProviderType::Simulated,
                    simulated: None,
                    aws: None,
                    exec: None,
                    baremetal: None,
                    gke: None,
                },
                credentials_secret_ref: None,
                labels: Default::default(),
                taints: Vec::new(),
                capacity: Default::default(),
                allocatable: None,
                bootstrap: None,
                timeouts: None,
            },
            status: None,
        },
    }
}

/// How NodeSets are read: decoded and validated one by one.
pub fn nodeset_decoder() -> Decoder<kube_node_crds::NodeSet> {
    use kube_node_crds::v1alpha1::{NodeTemplate, NodeTemplateSpec};
    Decoder {
        decode: kube_node_crds::NodeSet::decode_and_validate,
        placeholder: |metadata| kube_node_crds::NodeSet {
            metadata,
            spec: kube_node_crds::NodeSetSpec {
                replicas: 0,
                selector: Default::default(),
                template: NodeTemplate {
                    metadata: Default::default(),
                    spec: NodeTemplateSpec {
                        node_class_name: String::new(),
                        node_class_names: Vec::new(),
                        taints: Vec::new(),
                    },
                },
                delete_policy: None,
                min_size: None,
                max_size: None,
                remove_nodes: Vec::new(),
                max_unhealthy: None,
                min_ready_seconds: None,
                replacement_backoff: None,
                strategy: None,
                class_fallback_cooldown_seconds: None,
                progress_deadline_seconds: None,
            },
            status: None,
        },
    }
}

/// Turns one untyped watch event into a typed one, setting bad objects aside. Pure but for
/// `invalid` and `report`: the unit of the tolerant watch, tested without an API server.
pub fn decode_event<K>(
    event: Event<DynamicObject>,
    decoder: Decoder<K>,
    invalid: &InvalidObjects,
    report: Option<&futures::channel::mpsc::UnboundedSender<Rejected>>,
) -> Option<Event<K>>
where
    K: Resource,
{
    let decode = |obj: DynamicObject| -> Option<K> {
        let name = obj.name_any();
        let value = serde_json::to_value(&obj).unwrap_or(Value::Null);
        match (decoder.decode)(value) {
            Ok(k) => {
                invalid.update(&name, None);
                Some(k)
            }
            Err(error) => {
                // The name and the field error only: never the object.
                tracing::warn!(kind = invalid.kind, name = %name, reason = error.reason(), error = %error, "set aside an invalid object");
                invalid.update(&name, Some(error.clone()));
                if let Some(r) = report {
                    let _ = r.unbounded_send(Rejected { object: obj, error });
                }
                None
            }
        }
    };
    match event {
        Event::Init => {
            invalid.begin_relist();
            Some(Event::Init)
        }
        Event::InitApply(obj) => decode(obj).map(Event::InitApply),
        Event::InitDone => {
            invalid.end_relist();
            Some(Event::InitDone)
        }
        // A bad version leaves the typed cache, so nothing acts on the last good one.
        Event::Apply(obj) => {
            let metadata = obj.metadata.clone();
            Some(match decode(obj) {
                Some(k) => Event::Apply(k),
                None => Event::Delete((decoder.placeholder)(metadata)),
            })
        }
        Event::Delete(obj) => {
            let name = obj.name_any();
            invalid.update(&name, None);
            Some(Event::Delete((decoder.placeholder)(obj.metadata)))
        }
    }
}

/// A watch of every `K` that never fails on one object (see the module doc). Bad objects are
/// sent to `report` when given.
pub fn watch<K>(
    client: Client,
    config: watcher::Config,
    decoder: Decoder<K>,
    invalid: Arc<InvalidObjects>,
    report: Option<futures::channel::mpsc::UnboundedSender<Rejected>>,
) -> impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Debug + Send + Sync + 'static,
{
    let ar = ApiResource::erase::<K>(&());
    let api = Api::<DynamicObject>::all_with(client, &ar);
    watcher(api, config)
        .map_ok(move |event| {
            // Items of a list may come without their type; the decoder wants it.
            let event = event.modify(|o| {
                o.types.get_or_insert_with(|| kube::api::TypeMeta {
                    api_version: ar.api_version.clone(),
                    kind: ar.kind.clone(),
                });
            });
            decode_event(event, decoder, &invalid, report.as_ref())
        })
        .try_filter_map(|e| futures::future::ready(Ok(e)))
}

/// Whether the object's `Ready` condition already says this.
fn already_reported(object: &DynamicObject, message: &str) -> bool {
    let generation = object.metadata.generation;
    object.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            c["type"] == READY_CONDITION
                && c["status"] == "False"
                && c["reason"] == INVALID_SPEC_REASON
                && c["message"] == message
                && c["observedGeneration"].as_i64() == generation
        })
}

/// The condition message: the field errors, cut to what a condition holds.
pub fn condition_message(error: &InvalidSpec) -> String {
    let m = error.to_string();
    if m.len() <= 1000 {
        return m;
    }
    let mut end = 1000;
    while !m.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &m[..end])
}

/// Writes `Ready=False`, reason `InvalidSpec`, on a set-aside object (keeping the rest of its
/// status) and a Warning event, unless the condition already says so.
pub async fn report_invalid(
    client: &Client,
    recorder: &Recorder,
    ar: &ApiResource,
    rejected: &Rejected,
) -> Result<bool, kube::Error> {
    let object = &rejected.object;
    let message = condition_message(&rejected.error);
    if already_reported(object, &message) {
        return Ok(false);
    }
    let generation = object.metadata.generation;
    let mut status = match object.data.get("status") {
        Some(Value::Object(s)) => Value::Object(s.clone()),
        _ => json!({}),
    };
    let existing = status["conditions"].as_array().cloned().unwrap_or_default();
    let previous = existing.iter().find(|c| c["type"] == READY_CONDITION);
    let transition = match previous {
        Some(c) if c["status"] == "False" => c["lastTransitionTime"].clone(),
        _ => json!(jiff::Timestamp::now().to_string()),
    };
    let mut conditions: Vec<Value> = existing
        .iter()
        .filter(|c| c["type"] != READY_CONDITION)
        .cloned()
        .collect();
    conditions.push(json!({
        "type": READY_CONDITION,
        "status": "False",
        "reason": INVALID_SPEC_REASON,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": transition,
    }));
    status["conditions"] = Value::Array(conditions);
    if let Some(g) = generation {
        status["observedGeneration"] = json!(g);
    }
    let body = json!({"apiVersion": ar.api_version, "kind": ar.kind, "status": status});
    Api::<DynamicObject>::all_with(client.clone(), ar)
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    let reference = ObjectReference {
        api_version: Some(ar.api_version.clone()),
        kind: Some(ar.kind.clone()),
        name: object.metadata.name.clone(),
        uid: object.metadata.uid.clone(),
        resource_version: object.metadata.resource_version.clone(),
        ..Default::default()
    };
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: INVALID_SPEC_REASON.to_string(),
        note: Some(message),
        action: "Validate".to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &reference).await {
        tracing::debug!(error = %e, "cannot publish event");
    }
    Ok(true)
}

/// Reports every rejected object until the channel closes. A failed write is retried the next
/// time the watch shows the object (at the latest on its next re-list).
pub async fn run_reporter(
    client: Client,
    recorder: Recorder,
    ar: ApiResource,
    mut rejected: futures::channel::mpsc::UnboundedReceiver<Rejected>,
) {
    use futures::StreamExt;
    while let Some(r) = rejected.next().await {
        match report_invalid(&client, &recorder, &ar, &r).await {
            Ok(true) => {
                tracing::info!(kind = %ar.kind, name = %r.object.name_any(), reason = INVALID_SPEC_REASON, "reported an invalid object")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(name = %r.object.name_any(), error = %e, "cannot report an invalid object")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_node_crds::NodeClass;

    fn obj(v: Value) -> DynamicObject {
        serde_json::from_value(v).expect("dynamic object")
    }

    fn class(name: &str, boot_delay: &str) -> DynamicObject {
        obj(
            json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
            "metadata": {"name": name, "generation": 1},
            "spec": {"provider": {"type": "simulated", "simulated": {"bootDelay": boot_delay}}}}),
        )
    }

    #[test]
    fn a_bad_object_is_set_aside_and_the_good_ones_flow() {
        let invalid = InvalidObjects::new("NodeClass", Gauge::default());
        let (tx, mut rx) = futures::channel::mpsc::unbounded();
        let d = nodeclass_decoder();
        let mut out = Vec::new();
        for e in [
            Event::Init,
            Event::InitApply(class("a", "1s")),
            Event::InitApply(class("bad", "forever")),
            Event::InitApply(class("b", "2s")),
            Event::InitDone,
        ] {
            out.extend(decode_event(e, d, &invalid, Some(&tx)));
        }
        let names: Vec<String> = out
            .iter()
            .map(|e| match e {
                Event::InitApply(k) => k.name_any(),
                Event::Init => "<init>".into(),
                Event::InitDone => "<done>".into(),
                _ => "?".into(),
            })
            .collect();
        assert_eq!(names, ["<init>", "a", "b", "<done>"]);
        let err = invalid.get("bad").expect("set aside");
        assert_eq!(err.field(), "spec.provider.simulated.bootDelay");
        let r = rx.try_recv().expect("reported");
        assert_eq!(r.object.name_any(), "bad");

        // Turning bad removes the last good version from the cache.
        let e = decode_event::<NodeClass>(Event::Apply(class("a", "never")), d, &invalid, None);
        assert!(matches!(e, Some(Event::Delete(k)) if k.name_any() == "a"));
        assert_eq!(invalid.len(), 2);
        // Fixed: back, and no longer set aside.
        let e = decode_event::<NodeClass>(Event::Apply(class("a", "3s")), d, &invalid, None);
        assert!(matches!(e, Some(Event::Apply(k)) if k.name_any() == "a"));
        assert_eq!(invalid.len(), 1);
        // A re-list that no longer shows the bad one forgets it.
        for e in [
            Event::Init,
            Event::InitApply(class("a", "1s")),
            Event::InitDone,
        ] {
            let _ = decode_event::<NodeClass>(e, d, &invalid, None);
        }
        assert!(invalid.is_empty());
    }

    /// Every invalid manifest of the table, in a list of the valid ones: the valid ones all
    /// flow to the cache, the invalid one alone is set aside, naming its field.
    #[test]
    fn each_invalid_manifest_of_the_table_is_set_aside_alone() {
        let table: Value =
            serde_yaml::from_str(include_str!("../../crds/tests/data/manifests.yaml"))
                .expect("manifests");
        let nodeset_decoder = nodeset_decoder();
        let valid: Vec<DynamicObject> = table["valid"]
            .as_array()
            .expect("valid")
            .iter()
            .map(|v| obj(v.clone()))
            .collect();
        let cases = table["invalid"].as_array().expect("invalid");
        assert!(cases.len() >= 30);
        for case in cases {
            let bad = obj(case["object"].clone());
            let kind = bad
                .types
                .as_ref()
                .map(|t| t.kind.clone())
                .unwrap_or_default();
            let field = case["field"].as_str().expect("field");
            let mut list: Vec<DynamicObject> = valid
                .iter()
                .filter(|v| v.types.as_ref().is_some_and(|t| t.kind == kind))
                .cloned()
                .collect();
            let good: Vec<String> = list.iter().map(ResourceExt::name_any).collect();
            list.insert(list.len() / 2, bad.clone());
            let invalid = InvalidObjects::new("test", Gauge::default());
            let events = std::iter::once(Event::Init)
                .chain(list.into_iter().map(Event::InitApply))
                .chain(std::iter::once(Event::InitDone));
            let mut seen = Vec::new();
            for e in events {
                let out = if kind == "NodeClass" {
                    decode_event(e, nodeclass_decoder(), &invalid, None).map(|e| match e {
                        Event::InitApply(k) => Some(k.name_any()),
                        _ => None,
                    })
                } else {
                    decode_event(e, nodeset_decoder, &invalid, None).map(|e| match e {
                        Event::InitApply(k) => Some(k.name_any()),
                        _ => None,
                    })
                };
                seen.extend(out.flatten());
            }
            assert_eq!(seen, good, "{}", case["case"]);
            let error = invalid.get(&bad.name_any()).expect("set aside");
            assert!(
                error.errors.iter().any(|e| e.field.starts_with(field)),
                "{}: {error} should name {field}",
                case["case"]
            );
            assert_eq!(invalid.len(), 1);
        }
    }

    #[test]
    fn the_condition_is_not_written_twice() {
        let err = InvalidSpec::one("spec.labels", "bad");
        let mut o = class("x", "forever");
        assert!(!already_reported(&o, &condition_message(&err)));
        o.data["status"] = json!({"conditions": [{"type": "Ready", "status": "False",
            "reason": "InvalidSpec", "message": "spec.labels: bad", "observedGeneration": 1}]});
        assert!(already_reported(&o, &condition_message(&err)));
    }
}
