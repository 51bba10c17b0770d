//! The template Node of a NodeSet: what a new Node of it will look like once Ready, so
//! cluster-autoscaler can simulate a scale-up (also from zero) without any annotation.
//!
//! Pure: built from the NodeSet and its NodeClass only.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_pb::api::core::v1 as pb;
use k8s_pb::apimachinery::pkg::api::resource::Quantity as PbQuantity;
use k8s_pb::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube_node_crds::names::{NODE_CLASS_LABEL, NODESET_LABEL};
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
        ProviderType::Exec => {}
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

/// The template Node's taints: the NodeClass's then the NodeSet template's, without
/// duplicates (same key and effect). Never `kube-node.io/unregistered`: that one is gone
/// once the Node is Ready, which is the state the template describes.
pub fn template_taints(nodeset: &NodeSet, class: &NodeClass) -> Vec<NodeTaint> {
    let mut out: Vec<NodeTaint> = Vec::new();
    for t in class
        .spec
        .taints
        .iter()
        .chain(&nodeset.spec.template.spec.taints)
    {
        if t.key == kube_node_crds::names::UNREGISTERED_TAINT {
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

/// The template Node, as the Kubernetes protobuf message cluster-autoscaler decodes.
pub fn template_node(nodeset: &NodeSet, class: &NodeClass) -> pb::Node {
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
    let capacity = pb_resources(&class.spec.capacity);
    let allocatable = pb_resources(class.spec.allocatable_or_capacity());
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
        // unregistered taint is dropped.
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
