//! Drift: whether a Node was built from what its NodeSet would build now.
//!
//! When the nodeset-controller creates a Node it records, in the `kube-node.io/build-hash`
//! annotation, a short hash of each input that shapes the Node's machine:
//!
//! | part | from |
//! |---|---|
//! | `provider` | the NodeClass's `spec.provider` (image, machine type, subnets, …) |
//! | `capacity` | the NodeClass's `spec.capacity` and `spec.allocatable` |
//! | `bootstrap` | the NodeClass's `spec.bootstrap` |
//!
//! Drift is then a pure comparison of that annotation with the hashes of the current specs:
//! it survives restarts, and a NodeClass deleted and re-created with the same spec is not
//! drift (generations start over, hashes do not). A Node on another class than new Nodes get
//! has drifted too, unless the NodeSet prefers its class (see `fallback.rs`). What kube-node patches onto existing Nodes in place — the NodeClass's
//! `labels` and `taints`, and the NodeSet template's labels, annotations and taints (see
//! `template.rs`) — and what only tunes kube-node itself (timeouts, credentials) is not
//! hashed: a change of them is applied to the Nodes, it does not replace them. Annotations
//! written by earlier versions also carry a `template=` part; it is read and ignored. The simulated provider's knobs that describe its cloud rather than its machines
//! (faults, capacity, quota, delays, registration) are not hashed either.
//!
//! A Node without the annotation (created before kube-node recorded it, or created by a user
//! and adopted) is never judged drifted: there is nothing to compare.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kube_node_crds::v1alpha1::NodeClassSpec;
use serde_json::{Value, json};

/// The inputs hashed, in the order drift reasons are named.
pub const PARTS: [&str; 3] = ["provider", "capacity", "bootstrap"];

/// A part earlier versions hashed and this one patches in place instead.
const RETIRED_PARTS: [&str; 1] = ["template"];

/// The simulated provider's fields that describe its cloud, not its machines.
const SIMULATED_CLOUD_FIELDS: [&str; 8] = [
    "bootDelay",
    "deleteDelay",
    "listLag",
    "capacity",
    "quota",
    "faults",
    "register",
    "seed",
];

/// What a Node was (or would now be) built from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildHash {
    /// The NodeClass.
    pub class: String,
    /// A hash per entry of [`PARTS`].
    pub parts: BTreeMap<String, String>,
}

/// Why a Node drifted: what changed since it was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    /// PascalCase, for the `Drifted` condition's reason: `NodeClassChanged` (another class),
    /// else `ProviderChanged`, `CapacityChanged` or `BootstrapChanged` for the first part (in
    /// [`PARTS`] order) that changed.
    pub reason: String,
    /// Every input that changed, for the message.
    pub changed: Vec<String>,
}

impl Drift {
    /// A sentence for the `Drifted` condition and the replacement event.
    pub fn message(&self, class: &str) -> String {
        if self.reason == "NodeClassChanged" {
            return format!("the NodeSet now uses NodeClass {class}");
        }
        let what: Vec<String> = self
            .changed
            .iter()
            .map(|p| format!("spec.{p} of NodeClass {class}"))
            .collect();
        format!("{} changed since this Node was built", what.join(", "))
    }
}

/// FNV-1a, 64 bits: stable across releases and platforms (unlike `std`'s hasher).
pub(crate) fn fnv(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn hash_value(v: &Value) -> String {
    // serde_json's maps are sorted (no `preserve_order`), so equal specs print equally.
    fn canonical(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
            other => other.clone(),
        }
    }
    fnv(&canonical(v).to_string())
}

impl BuildHash {
    /// The hashes of what a Node of `template` on NodeClass `class` is built from.
    pub fn of(class: &str, spec: &NodeClassSpec) -> Self {
        let mut provider = serde_json::to_value(&spec.provider).unwrap_or(Value::Null);
        if let Some(sim) = provider.get_mut("simulated").and_then(Value::as_object_mut) {
            for f in SIMULATED_CLOUD_FIELDS {
                sim.remove(f);
            }
        }
        let capacity = json!({"capacity": spec.capacity, "allocatable": spec.allocatable});
        let bootstrap = serde_json::to_value(&spec.bootstrap).unwrap_or(Value::Null);
        let parts = [
            ("provider", hash_value(&provider)),
            ("capacity", hash_value(&capacity)),
            ("bootstrap", hash_value(&bootstrap)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Self {
            class: class.to_string(),
            parts,
        }
    }

    /// The annotation value: `provider=…,capacity=…,bootstrap=…`.
    pub fn annotation(&self) -> String {
        let mut s = String::new();
        for (i, p) in PARTS.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{p}={}", self.parts.get(*p).map_or("", String::as_str));
        }
        s
    }

    /// Reads a Node's annotation (and its class annotation). `None` when either is missing or
    /// the annotation is not one this version wrote.
    pub fn parse(class: Option<&str>, annotation: Option<&str>) -> Option<Self> {
        let class = class?;
        let mut parts = BTreeMap::new();
        for item in annotation?.split(',') {
            let (k, v) = item.split_once('=')?;
            if RETIRED_PARTS.contains(&k) {
                continue;
            }
            if !PARTS.contains(&k) || v.is_empty() {
                return None;
            }
            parts.insert(k.to_string(), v.to_string());
        }
        (parts.len() == PARTS.len()).then(|| Self {
            class: class.to_string(),
            parts,
        })
    }

    /// One short identifier of the whole target (recorded in `status.rollout`).
    pub fn id(&self) -> String {
        fnv(&format!("{}/{}", self.class, self.annotation()))
    }
}

/// How `built` differs from `target`, if it does.
pub fn drift(target: &BuildHash, built: &BuildHash) -> Option<Drift> {
    if built.class != target.class {
        return Some(Drift {
            reason: "NodeClassChanged".into(),
            changed: vec!["nodeClassName".into()],
        });
    }
    let changed: Vec<String> = PARTS
        .iter()
        .filter(|p| built.parts.get(**p) != target.parts.get(**p))
        .map(|p| (*p).to_string())
        .collect();
    let first = changed.first()?;
    let mut reason = String::new();
    let mut chars = first.chars();
    if let Some(c) = chars.next() {
        reason.push(c.to_ascii_uppercase());
        reason.extend(chars);
    }
    reason.push_str("Changed");
    Some(Drift { reason, changed })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_node_crds::v1alpha1::NodeClass;

    fn class(spec: Value) -> NodeClassSpec {
        serde_json::from_value::<NodeClass>(json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
            "metadata": {"name": "c"}, "spec": spec,
        }))
        .expect("class")
        .spec
    }

    #[test]
    fn equal_specs_hash_equally_and_round_trip() {
        let spec = json!({"provider": {"type": "simulated", "simulated": {"image": "v1"}}});
        let a = BuildHash::of("c", &class(spec.clone()));
        // A NodeClass deleted and re-created with the same spec: same hashes.
        let b = BuildHash::of("c", &class(spec));
        assert_eq!(a, b);
        assert_eq!(drift(&a, &b), None);
        let parsed = BuildHash::parse(Some("c"), Some(&a.annotation())).expect("parses");
        assert_eq!(parsed, a);
        assert_eq!(BuildHash::parse(Some("c"), Some("provider=1")), None);
        assert_eq!(BuildHash::parse(None, Some(&a.annotation())), None);
        assert_eq!(BuildHash::parse(Some("c"), Some("x=1,y=2,z=3")), None);
        // What an earlier version wrote, with a template part: read, the template ignored.
        let legacy = format!("{},template=0123456789abcdef", a.annotation());
        assert_eq!(BuildHash::parse(Some("c"), Some(&legacy)), Some(a));
    }

    #[test]
    fn what_drifts_and_what_does_not() {
        let base = json!({"provider": {"type": "simulated", "simulated": {"image": "v1"}},
                          "labels": {"x": "y"}, "capacity": {"cpu": "2"}});
        let target = |spec: Value| BuildHash::of("c", &class(spec));
        let built = target(base.clone());
        // Patched in place, or knobs of the simulated cloud: no drift.
        let same = json!({"provider": {"type": "simulated", "simulated": {"image": "v1", "faults": {"insufficientCapacityPercent": 50}, "register": false}},
                   "labels": {"x": "z"}, "taints": [{"key": "k", "effect": "NoSchedule"}], "capacity": {"cpu": "2"},
                   "timeouts": {"registration": "1m"}});
        assert_eq!(drift(&target(same), &built), None);
        let image = json!({"provider": {"type": "simulated", "simulated": {"image": "v2"}}, "capacity": {"cpu": "2"}});
        let d = drift(&target(image), &built).expect("drift");
        assert_eq!(d.reason, "ProviderChanged");
        assert_eq!(
            d.message("c"),
            "spec.provider of NodeClass c changed since this Node was built"
        );
        let both = json!({"provider": {"type": "simulated", "simulated": {"image": "v2"}}, "capacity": {"cpu": "4"}});
        let d = drift(&target(both), &built).expect("drift");
        assert_eq!(d.changed, vec!["provider", "capacity"]);
        let other = BuildHash::of("d", &class(base));
        assert_eq!(
            drift(&other, &built).map(|d| d.reason),
            Some("NodeClassChanged".into())
        );
    }
}
