//! Every manifest in examples/ parses into the Rust types, so the examples cannot rot.

use std::path::Path;

use k8s_openapi::api::core::v1::Node;
use kube_node_crds::{NodeClass, NodeSet, names};
use serde::Deserialize;

fn examples() -> Vec<(String, serde_yaml::Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("readable");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).expect("valid YAML");
            if !v.is_null() {
                docs.push((path.display().to_string(), v));
            }
        }
    }
    docs
}

#[test]
fn every_example_manifest_parses_into_its_type() {
    let mut kinds = Vec::new();
    for (file, doc) in examples() {
        let Some(kind) = doc.get("kind").and_then(|k| k.as_str()).map(str::to_string) else {
            // Scenario files and autoscaler configs are not Kubernetes objects.
            continue;
        };
        match kind.as_str() {
            "NodeClass" => {
                let nc: NodeClass =
                    serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
                assert!(
                    !nc.spec.capacity.is_empty(),
                    "{file}: capacity feeds autoscaler templates"
                );
            }
            "NodeSet" => {
                let ns: NodeSet =
                    serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
                let labels = ns.spec.template.metadata.labels.clone().unwrap_or_default();
                assert!(
                    ns.spec.selector.matches(&labels),
                    "{file}: template labels match the selector"
                );
            }
            "Node" => {
                let node: Node =
                    serde_yaml::from_value(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
                let annotations = node.metadata.annotations.unwrap_or_default();
                assert!(
                    annotations.contains_key(names::NODE_CLASS_ANNOTATION),
                    "{file}: names a NodeClass"
                );
            }
            other => {
                // Other Kubernetes kinds are allowed but must at least be well-formed objects.
                assert!(
                    doc.get("metadata").is_some(),
                    "{file}: {other} has metadata"
                );
            }
        }
        kinds.push(kind);
    }
    for needed in ["NodeClass", "NodeSet", "Node"] {
        assert!(
            kinds.iter().any(|k| k == needed),
            "examples/ has a {needed}"
        );
    }
}
