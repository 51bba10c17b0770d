//! The committed CRD YAML matches the types, and the schema rejects bad objects with messages
//! that name the field.

use kube::CustomResourceExt;
use kube_node_crds::{NodeClass, NodeSet, crd_yaml};
use serde_json::{Value, json};

const COMMITTED: &str = include_str!("../crds.yaml");

#[test]
fn committed_crd_yaml_matches_the_types() {
    let generated = crd_yaml().expect("CRDs serialize");
    if std::env::var_os("UPDATE_CRDS").is_some() {
        std::fs::write(
            concat!(env!("CARGO_MANIFEST_DIR"), "/crds.yaml"),
            &generated,
        )
        .expect("write crds.yaml");
        return;
    }
    assert!(
        generated == COMMITTED,
        "crds/crds.yaml is stale: run `UPDATE_CRDS=1 cargo test -p kube-node-crds --test crd`"
    );
}

fn schema_of(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Value {
    let v = &crd.spec.versions[0];
    serde_json::to_value(
        v.schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("schema"),
    )
    .expect("schema json")
}

/// Runs the CRD's CEL rules the way the API server does and returns the error messages.
fn cel_errors(schema: &Value, object: &Value) -> Vec<String> {
    match kube_cel::Validator::new().validate(schema, object, None) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn nodeset(spec: Value) -> Value {
    json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet", "metadata": {"name": "w"}, "spec": spec})
}

fn good_nodeset_spec() -> Value {
    json!({
        "replicas": 3,
        "selector": {"matchLabels": {"pool": "workers"}},
        "template": {"metadata": {"labels": {"pool": "workers"}}, "spec": {"nodeClassName": "sim"}},
        "minSize": 1,
        "maxSize": 5
    })
}

#[test]
fn crds_are_cluster_scoped_with_subresources_and_columns() {
    for crd in [NodeClass::crd(), NodeSet::crd()] {
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, "kube-node.io");
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["kube-node".to_string()][..])
        );
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
    }
    let ns = NodeSet::crd();
    let scale = ns.spec.versions[0]
        .subresources
        .as_ref()
        .and_then(|s| s.scale.clone())
        .expect("scale subresource");
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let cols: Vec<String> = ns.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(
        cols,
        [
            "CLASS",
            "DESIRED",
            "CURRENT",
            "READY",
            "UP-TO-DATE",
            "FREE",
            "FAILURES",
            "NEXT-ATTEMPT",
            "AGE"
        ]
    );
    let nc = NodeClass::crd();
    let cols: Vec<String> = nc.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.to_uppercase())
        .collect();
    assert_eq!(cols, ["PROVIDER", "READY", "AGE"]);
    // Short names must not clash with built-in kinds (ns = namespaces, no = nodes).
    assert_eq!(
        nc.spec.names.short_names.as_deref(),
        Some(&["nc".to_string()][..])
    );
    assert_eq!(
        ns.spec.names.short_names.as_deref(),
        Some(&["nset".to_string()][..])
    );
}

#[test]
fn a_good_nodeset_passes_the_cel_rules() {
    let schema = schema_of(&NodeSet::crd());
    assert_eq!(
        cel_errors(&schema, &nodeset(good_nodeset_spec())),
        Vec::<String>::new()
    );
}

#[test]
fn min_size_above_max_size_is_rejected_naming_the_field() {
    let schema = schema_of(&NodeSet::crd());
    let mut spec = good_nodeset_spec();
    spec["minSize"] = json!(6);
    let errors = cel_errors(&schema, &nodeset(spec));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("spec.minSize"), "{errors:?}");
}

#[test]
fn a_bad_replacement_backoff_is_rejected_naming_the_field() {
    let schema = schema_of(&NodeSet::crd());
    let mut spec = good_nodeset_spec();
    spec["replacementBackoff"] = json!({"base": "30s", "max": "30m"});
    assert_eq!(
        cel_errors(&schema, &nodeset(spec.clone())),
        Vec::<String>::new()
    );
    for (backoff, field) in [
        (
            json!({"base": "10m", "max": "1m"}),
            "spec.replacementBackoff.max",
        ),
        (json!({"base": "0s"}), "spec.replacementBackoff.base"),
        (json!({"max": "0s"}), "spec.replacementBackoff.max"),
    ] {
        spec["replacementBackoff"] = backoff.clone();
        let errors = cel_errors(&schema, &nodeset(spec.clone()));
        assert!(
            !errors.is_empty() && errors.iter().all(|e| e.contains(field)),
            "{backoff}: {errors:?}"
        );
    }
}

#[test]
fn template_labels_that_do_not_match_the_selector_are_rejected() {
    let schema = schema_of(&NodeSet::crd());
    let mut spec = good_nodeset_spec();
    spec["template"]["metadata"]["labels"] = json!({"pool": "other"});
    let errors = cel_errors(&schema, &nodeset(spec));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("spec.template.metadata.labels")),
        "{errors:?}"
    );

    let mut spec = good_nodeset_spec();
    spec["selector"] =
        json!({"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a", "b"]}]});
    let errors = cel_errors(&schema, &nodeset(spec.clone()));
    assert!(
        errors.iter().any(|e| e.contains("matchExpressions")),
        "{errors:?}"
    );
    spec["template"]["metadata"]["labels"] = json!({"pool": "b"});
    assert_eq!(cel_errors(&schema, &nodeset(spec)), Vec::<String>::new());
}

#[test]
fn an_empty_selector_is_rejected() {
    let schema = schema_of(&NodeSet::crd());
    let mut spec = good_nodeset_spec();
    spec["selector"] = json!({});
    let errors = cel_errors(&schema, &nodeset(spec));
    assert!(
        errors.iter().any(|e| e.contains("spec.selector")),
        "{errors:?}"
    );
}

#[test]
fn a_provider_block_that_does_not_match_the_type_is_rejected() {
    let schema = schema_of(&NodeClass::crd());
    let nc = json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "c"},
        "spec": {"provider": {"type": "simulated", "simulated": {"bootDelay": "1s"}}}});
    assert_eq!(cel_errors(&schema, &nc), Vec::<String>::new());

    let mismatched = json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "c"},
        "spec": {"provider": {"type": "simulated", "exec": {"command": ["/bin/true"]}}}});
    let errors = cel_errors(&schema, &mismatched);
    assert!(
        errors.iter().any(|e| e.contains("spec.provider.exec")),
        "{errors:?}"
    );

    let missing_gke = json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "c"},
        "spec": {"provider": {"type": "gke"}}});
    let errors = cel_errors(&schema, &missing_gke);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("spec.provider.gke is required")),
        "{errors:?}"
    );

    let missing = json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "c"},
        "spec": {"provider": {"type": "aws"}}});
    let errors = cel_errors(&schema, &missing);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("spec.provider.aws is required")),
        "{errors:?}"
    );

    let both_images = json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "c"},
        "spec": {"provider": {"type": "aws", "aws": {"region": "eu-west-1", "instanceType": "m7i.large",
            "ami": "ami-1", "amiSsmParameter": "/x", "subnetIds": ["subnet-1"]}}}});
    let errors = cel_errors(&schema, &both_images);
    assert!(
        errors.iter().any(|e| e.contains("ami and amiSsmParameter")),
        "{errors:?}"
    );
}

#[test]
fn structural_constraints_name_their_fields() {
    // Checked by the API server's OpenAPI validation (not CEL): the schema carries them.
    let schema = schema_of(&NodeSet::crd());
    let spec = &schema["properties"]["spec"];
    assert_eq!(
        spec["properties"]["replicas"]["minimum"].as_f64(),
        Some(0.0)
    );
    assert!(
        spec["required"]
            .as_array()
            .expect("required")
            .contains(&json!("template"))
    );
    let tspec = &spec["properties"]["template"]["properties"]["spec"];
    // One of nodeClassName and nodeClassNames: a CEL rule on spec, not `required`.
    assert!(tspec.get("required").is_none_or(|r| {
        !r.as_array()
            .is_some_and(|r| r.contains(&json!("nodeClassName")))
    }));
    assert_eq!(tspec["properties"]["nodeClassName"]["minLength"], json!(1));
    assert_eq!(tspec["properties"]["nodeClassNames"]["maxItems"], json!(8));
    let nc = schema_of(&NodeClass::crd());
    let ty = &nc["properties"]["spec"]["properties"]["provider"]["properties"]["type"];
    assert_eq!(
        ty["enum"],
        json!(["simulated", "aws", "exec", "baremetal", "gke"])
    );
    // Inline hosts are bounded so the per-host CEL rules stay within the API server's cost
    // budget; larger inventories go into a ConfigMap (inventoryRef).
    let bm = &nc["properties"]["spec"]["properties"]["provider"]["properties"]["baremetal"];
    assert_eq!(bm["properties"]["hosts"]["maxItems"], json!(64));
    assert_eq!(
        bm["properties"]["hosts"]["items"]["properties"]["name"]["maxLength"],
        json!(63)
    );
}
