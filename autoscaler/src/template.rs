//! The template Node of a NodeSet: what a new Node of it will look like once Ready, so
//! cluster-autoscaler can simulate a scale-up (also from zero) without any annotation.
//!
//! Pure: built from the NodeSet and its NodeClass only.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::api::core::v1 as pb;
use k8s_pb::apimachinery::pkg::api::resource::Quantity as PbQuantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube_node_crds::names::{
    AUTOSCALER_UNREGISTERED_TAINT, NODE_CLASS_LABEL, NODESET_LABEL, UNREGISTERED_TAINT,
};
use kube_node_crds::v1alpha1::{NodeClass, NodeSet, NodeTaint, ProviderType};

/// The label cluster-autoscaler is told (by the `GPULabel` RPC) marks GPU nodes. Its value
/// is the GPU type. kube-node never invents it: put it in the NodeClass's `labels` (then the
/// real Nodes carry it too and look like the template), e.g. `kube-node.io/gpu-type: a100`.
pub const GPU_LABEL: &str = "kube-node.io/gpu-type";

/// Extended resources counted as GPUs by [`gpu_types`].
pub const GPU_RESOURCES: &[&str] = &["nvidia.com/gpu", "amd.com/gpu", "gpu.intel.com/i915"];

/// The kubelet's default `--max-pods`, used when the NodeClass capacity has no `pods`: a
/// template without it would fit no pod at all.
pub const DEFAULT_MAX_PODS: &str = "110";

/// The template Node's labels: well-known node labels first, then the NodeClass's, then the
/// NodeSet template's (later ones win, as they do on real Nodes).
pub fn template_labels(nodeset: &NodeSet, class: &NodeClass) -> BTreeMap<String, String> {
    let name = nodeset.name_any();
    let mut labels = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        labels.insert(k.to_string(), v.to_string());
    };
    put("kubernetes.io/os", "linux");
    put("kubernetes.io/arch", "amd64");
    put("kubernetes.io/hostname", &format!("template-{name}"));
    put(NODESET_LABEL, &name);
    put(NODE_CLASS_LABEL, &class.name_any());
    let provider = &class.spec.provider;
    match provider.type_ {
        ProviderType::Aws => {
            if let Some(aws) = &provider.aws {
                put("node.kubernetes.io/instance-type", &aws.instance_type);
                put("topology.kubernetes.io/region", &aws.region);
            }
        }
        ProviderType::Simulated => {
            if let Some(sim) = &provider.simulated {
                if let Some(t) = &sim.instance_type {
                    put("node.kubernetes.io/instance-type", t);
                }
                // Only a single zone is known in advance; with several, the real Node's zone
                // is chosen at launch.
                if let [zone] = sim.zones.as_slice() {
                    put("topology.kubernetes.io/zone", zone);
                }
            }
        }
        ProviderType::Gke => {
            // GKE's kubelets register with this label; the machine type is the pool's.
            if let Some(gke) = &provider.gke {
                put("cloud.google.com/gke-nodepool", &gke.node_pool);
            }
        }
        ProviderType::Exec | ProviderType::Baremetal => {}
    }
    labels.extend(class.spec.labels.clone());
    labels.extend(
        nodeset
            .spec
            .template
            .metadata
            .labels
            .clone()
            .unwrap_or_default(),
    );
    labels
}

/// Taint-key prefixes cluster-autoscaler reads as "transient, gone once the Node is in
/// service": `ignore-taint.` (all releases), `startup-taint.` and `status-taint.` (1.29+;
/// `utils/taints/taints.go`). CA 1.28 does not know the last two, so the template drops them
/// itself rather than let an old autoscaler hold them against every pod.
pub const TRANSIENT_TAINT_PREFIXES: &[&str] = &[
    "ignore-taint.cluster-autoscaler.kubernetes.io/",
    "startup-taint.cluster-autoscaler.kubernetes.io/",
    "status-taint.cluster-autoscaler.kubernetes.io/",
];

/// Whether a taint is one a Node carries only on its way into service (kube-node's
/// unregistered taint and its autoscaler marker, CA's transient prefixes): never part of a
/// template, which describes a Node that is Ready.
pub fn is_transient_taint(key: &str) -> bool {
    key == UNREGISTERED_TAINT
        || key == AUTOSCALER_UNREGISTERED_TAINT
        || TRANSIENT_TAINT_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The template Node's taints: the NodeClass's then the NodeSet template's, without
/// duplicates (same key and effect). Never a transient taint ([`is_transient_taint`]): those
/// are gone once the Node is Ready, which is the state the template describes; a pod that
/// does not tolerate them must still fit the template, or the autoscaler could not scale up
/// for it at all.
pub fn template_taints(nodeset: &NodeSet, class: &NodeClass) -> Vec<NodeTaint> {
    let mut out: Vec<NodeTaint> = Vec::new();
    for t in class
        .spec
        .taints
        .iter()
        .chain(&nodeset.spec.template.spec.taints)
    {
        if is_transient_taint(&t.key) {
            continue;
        }
        if let Some(existing) = out
            .iter_mut()
            .find(|o| o.key == t.key && o.effect == t.effect)
        {
            *existing = t.clone();
        } else {
            out.push(t.clone());
        }
    }
    out
}

fn pb_resources(map: &BTreeMap<String, Quantity>) -> BTreeMap<String, PbQuantity> {
    let mut out: BTreeMap<String, PbQuantity> = map
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                PbQuantity {
                    string: Some(v.0.clone()),
                },
            )
        })
        .collect();
    out.entry("pods".to_string()).or_insert_with(|| PbQuantity {
        string: Some(DEFAULT_MAX_PODS.to_string()),
    });
    out
}

/// A registered Node of the group whose resources the template may take: its kubelet is
/// Ready, it is not being deleted, it no longer carries the unregistered taint, and it reports
/// allocatable. The first such Node by name, so the answer is stable.
///
/// cluster-autoscaler itself prefers a real Node of the group to the provider's template
/// (`MixedTemplateNodeInfoProvider`), but only one Ready and stable for a minute, and it
/// forgets them when it restarts; serving what a registered machine really reports keeps a
/// wrong declaration (see the NodeClass `CapacityMatches` condition) from making it buy
/// machines the pods do not fit on.
pub fn registered_example<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> Option<&'a Node> {
    nodes
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter(|n| {
            !n.spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.key == UNREGISTERED_TAINT))
        })
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref())
                .is_some_and(|a| !a.is_empty())
        })
        .min_by(|a, b| a.metadata.name.cmp(&b.metadata.name))
}

/// The declared resources overridden by what a registered Node reports, except extended
/// resources (`vendor/name`) it does not advertise yet (absent or zero: a device plugin comes
/// up after the kubelet, and a template without the GPU would never be chosen for GPU pods).
fn merged(
    declared: &BTreeMap<String, Quantity>,
    observed: Option<&BTreeMap<String, Quantity>>,
) -> BTreeMap<String, Quantity> {
    let mut out = declared.clone();
    for (k, v) in observed.into_iter().flatten() {
        let unadvertised = k.contains('/') && matches!(v.0.trim(), "" | "0");
        if !unadvertised {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// The template Node, as the Kubernetes protobuf message cluster-autoscaler decodes.
pub fn template_node(nodeset: &NodeSet, class: &NodeClass) -> pb::Node {
    template_node_from(nodeset, class, None)
}

/// The template Node, its capacity and allocatable taken from `example` (a
/// [`registered_example`]) where it reports them. Nothing else of the example goes in: names,
/// labels such as the hostname or zone, taints and conditions are a particular Node's; the
/// template's come from the NodeSet and NodeClass.
pub fn template_node_from(
    nodeset: &NodeSet,
    class: &NodeClass,
    example: Option<&Node>,
) -> pb::Node {
    let name = format!("template-{}", nodeset.name_any());
    let labels: HashMap<String, String> = template_labels(nodeset, class).into_iter().collect();
    let taints = template_taints(nodeset, class)
        .iter()
        .map(|t| pb::Taint {
            key: Some(t.key.clone()),
            value: t.value.clone(),
            effect: Some(t.effect.as_str().to_string()),
            time_added: None,
        })
        .collect();
    let status = example.and_then(|n| n.status.as_ref());
    let capacity = pb_resources(&merged(
        &class.spec.capacity,
        status.and_then(|s| s.capacity.as_ref()),
    ));
    let allocatable = pb_resources(&merged(
        class.spec.allocatable_or_capacity(),
        status.and_then(|s| s.allocatable.as_ref()),
    ));
    pb::Node {
        metadata: Some(ObjectMeta {
            name: Some(name),
            labels: labels.into_iter().collect(),
            ..Default::default()
        }),
        spec: Some(pb::NodeSpec {
            taints,
            ..Default::default()
        }),
        status: Some(pb::NodeStatus {
            capacity: capacity.into_iter().collect(),
            allocatable: allocatable.into_iter().collect(),
            conditions: vec![pb::NodeCondition {
                r#type: Some("Ready".to_string()),
                status: Some("True".to_string()),
                reason: Some("KubeletReady".to_string()),
                message: Some("template node of a kube-node NodeSet".to_string()),
                ..Default::default()
            }],
            phase: Some("Running".to_string()),
            ..Default::default()
        }),
    }
}

/// Whether a NodeClass's machines have a GPU (a positive GPU extended resource).
pub fn has_gpu(class: &NodeClass) -> bool {
    GPU_RESOURCES.iter().any(|r| {
        class
            .spec
            .capacity
            .get(*r)
            .is_some_and(|q| !matches!(q.0.trim(), "" | "0"))
    })
}

/// The GPU types of these NodeClasses: for each class with a GPU, its [`GPU_LABEL`] value,
/// or the GPU resource name when the class has no such label.
pub fn gpu_types<'a>(classes: impl IntoIterator<Item = &'a NodeClass>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for class in classes.into_iter().filter(|c| has_gpu(c)) {
        let t = class.spec.labels.get(GPU_LABEL).cloned().or_else(|| {
            GPU_RESOURCES
                .iter()
                .find(|r| class.spec.capacity.contains_key(**r))
                .map(|r| (*r).to_string())
        });
        if let Some(t) = t
            && !out.contains(&t)
        {
            out.push(t);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_node_crds::v1alpha1::{
        NodeClassSpec, NodeSelector, NodeSetSpec, NodeTemplate, NodeTemplateMetadata,
        NodeTemplateSpec, ProviderSpec, SimulatedProviderSpec, TaintEffect,
    };
    use prost::Message;

    fn class() -> NodeClass {
        let mut c = NodeClass::new(
            "gpu",
            NodeClassSpec {
                provider: ProviderSpec {
                    type_: ProviderType::Simulated,
                    simulated: Some(SimulatedProviderSpec {
                        instance_type: Some("sim.large".into()),
                        zones: vec!["zone-a".into()],
                        ..Default::default()
                    }),
                    aws: None,
                    exec: None,
                    baremetal: None,
                    gke: None,
                },
                credentials_secret_ref: None,
                labels: [("team".to_string(), "ml".to_string())].into(),
                taints: vec![
                    NodeTaint {
                        key: "gpu".into(),
                        value: Some("true".into()),
                        effect: TaintEffect::NoSchedule,
                    },
                    NodeTaint {
                        key: kube_node_crds::names::UNREGISTERED_TAINT.into(),
                        value: None,
                        effect: TaintEffect::NoSchedule,
                    },
                    NodeTaint {
                        key: AUTOSCALER_UNREGISTERED_TAINT.into(),
                        value: None,
                        effect: TaintEffect::NoSchedule,
                    },
                    NodeTaint {
                        key: "startup-taint.cluster-autoscaler.kubernetes.io/cni".into(),
                        value: None,
                        effect: TaintEffect::NoSchedule,
                    },
                ],
                capacity: [
                    ("cpu".to_string(), Quantity("8".into())),
                    ("memory".to_string(), Quantity("32Gi".into())),
                    ("nvidia.com/gpu".to_string(), Quantity("1".into())),
                ]
                .into(),
                allocatable: None,
                bootstrap: None,
                timeouts: None,
            },
        );
        c.metadata.uid = Some("c1".into());
        c
    }

    fn nodeset() -> NodeSet {
        NodeSet::new(
            "pool",
            NodeSetSpec {
                replicas: 0,
                selector: NodeSelector {
                    match_labels: Some([("pool".to_string(), "a".to_string())].into()),
                    match_expressions: None,
                },
                template: NodeTemplate {
                    metadata: NodeTemplateMetadata {
                        labels: Some([("pool".to_string(), "a".to_string())].into()),
                        annotations: None,
                    },
                    spec: NodeTemplateSpec {
                        node_class_name: "gpu".into(),
                        node_class_names: vec![],
                        taints: vec![NodeTaint {
                            key: "gpu".into(),
                            value: Some("yes".into()),
                            effect: TaintEffect::NoSchedule,
                        }],
                    },
                },
                delete_policy: None,
                min_size: Some(0),
                max_size: Some(3),
                remove_nodes: vec![],
                max_unhealthy: None,
                min_ready_seconds: None,
                replacement_backoff: None,
                strategy: None,
                progress_deadline_seconds: None,
                class_fallback_cooldown_seconds: None,
            },
        )
    }

    #[test]
    fn template_has_capacity_labels_and_taints() {
        let node = template_node(&nodeset(), &class());
        let bytes = node.encode_to_vec();
        let back = pb::Node::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, node);
        let meta = back.metadata.expect("metadata");
        assert_eq!(meta.name.as_deref(), Some("template-pool"));
        assert_eq!(meta.labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(meta.labels.get("pool").map(String::as_str), Some("a"));
        assert_eq!(
            meta.labels
                .get("node.kubernetes.io/instance-type")
                .map(String::as_str),
            Some("sim.large")
        );
        assert_eq!(
            meta.labels
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("zone-a")
        );
        let taints = back.spec.expect("spec").taints;
        // The template's taint overrides the class's with the same key and effect; the
        // unregistered taint, its autoscaler marker and CA's startup taints are dropped.
        assert_eq!(taints.len(), 1);
        assert_eq!(taints[0].value.as_deref(), Some("yes"));
        let status = back.status.expect("status");
        assert_eq!(status.capacity["cpu"].string.as_deref(), Some("8"));
        assert_eq!(status.allocatable["memory"].string.as_deref(), Some("32Gi"));
        assert_eq!(
            status.capacity["pods"].string.as_deref(),
            Some(DEFAULT_MAX_PODS)
        );
        assert_eq!(status.conditions[0].status.as_deref(), Some("True"));
    }

    fn registered(name: &str, ready: bool, taints: &[&str], alloc: &[(&str, &str)]) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {"taints": taints.iter().map(|k| serde_json::json!({"key": k, "effect": "NoSchedule"})).collect::<Vec<_>>()},
            "status": {
                "capacity": {"cpu": "8", "memory": "31Gi"},
                "allocatable": alloc.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect::<BTreeMap<_, _>>(),
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
            }
        }))
        .expect("node")
    }

    #[test]
    fn template_takes_resources_of_a_registered_node_only() {
        let joining = registered(
            "a",
            true,
            &[kube_node_crds::names::UNREGISTERED_TAINT],
            &[("cpu", "1")],
        );
        let not_ready = registered("b", false, &[], &[("cpu", "1")]);
        let good = registered(
            "c",
            true,
            &["gpu"],
            &[
                ("cpu", "7800m"),
                ("memory", "29Gi"),
                ("nvidia.com/gpu", "0"),
            ],
        );
        let nodes = [joining, not_ready, good];
        let example = registered_example(&nodes).expect("a registered Node");
        assert_eq!(example.metadata.name.as_deref(), Some("c"));
        assert!(registered_example(&nodes[..2]).is_none());

        let node = template_node_from(&nodeset(), &class(), Some(example));
        let meta = node.metadata.expect("metadata");
        // Names and labels stay the template's, never the example's.
        assert_eq!(meta.name.as_deref(), Some("template-pool"));
        assert_eq!(
            meta.labels
                .get("kubernetes.io/hostname")
                .map(String::as_str),
            Some("template-pool")
        );
        let status = node.status.expect("status");
        let q = |m: &BTreeMap<String, PbQuantity>, k: &str| m.get(k).and_then(|q| q.string.clone());
        assert_eq!(q(&status.allocatable, "cpu").as_deref(), Some("7800m"));
        assert_eq!(q(&status.allocatable, "memory").as_deref(), Some("29Gi"));
        assert_eq!(q(&status.capacity, "memory").as_deref(), Some("31Gi"));
        // The GPU the device plugin has not advertised yet stays as declared.
        assert_eq!(
            q(&status.allocatable, "nvidia.com/gpu").as_deref(),
            Some("1")
        );
        assert_eq!(status.conditions.len(), 1);
        assert_eq!(
            node.spec.expect("spec").taints.len(),
            1,
            "the template's taints"
        );
    }

    #[test]
    fn gpu_types_from_label_or_resource() {
        let mut c = class();
        assert_eq!(gpu_types([&c]), vec!["nvidia.com/gpu".to_string()]);
        c.spec.labels.insert(GPU_LABEL.into(), "a100".into());
        assert_eq!(gpu_types([&c]), vec!["a100".to_string()]);
        c.spec
            .capacity
            .insert("nvidia.com/gpu".into(), Quantity("0".into()));
        assert!(gpu_types([&c]).is_empty());
    }
}
