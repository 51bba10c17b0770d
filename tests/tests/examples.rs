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

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_aws_example_is_complete_and_its_secret_has_the_keys_the_backend_reads() {
    let docs: Vec<serde_yaml::Value> = examples()
        .into_iter()
        .filter(|(f, _)| f.ends_with("nodeclass-aws.yaml"))
        .map(|(_, d)| d)
        .collect();
    assert!(!docs.is_empty(), "examples/nodeclass-aws.yaml exists");
    let class: NodeClass = docs
        .iter()
        .find(|d| d.get("kind").and_then(|k| k.as_str()) == Some("NodeClass"))
        .map(|d| serde_yaml::from_value(d.clone()).expect("NodeClass"))
        .expect("a NodeClass");
    // Every field is spelled as the type reads it: a typo would silently be dropped.
    let round_trip = serde_yaml::to_value(&class).expect("serialize");
    let written = docs
        .iter()
        .find(|d| d.get("kind").and_then(|k| k.as_str()) == Some("NodeClass"))
        .and_then(|d| d.get("spec"))
        .expect("spec");
    assert_eq!(
        round_trip.get("spec").and_then(|s| s.get("provider")),
        written.get("provider"),
        "every provider field is known to the type"
    );
    let aws = class.spec.provider.aws.as_ref().expect("spec.provider.aws");
    assert!(!aws.region.is_empty() && !aws.subnet_ids.is_empty());
    assert!(aws.ami.is_some() || aws.ami_ssm_parameter.is_some());
    let secret_ref = class
        .spec
        .credentials_secret_ref
        .as_ref()
        .expect("credentialsSecretRef");
    // kube-node may read Secrets only in its own namespace (deploy/rbac.yaml).
    assert_eq!(secret_ref.namespace, "kube-node-system");
    let secret = docs
        .iter()
        .find(|d| d.get("kind").and_then(|k| k.as_str()) == Some("Secret"))
        .expect("the credentials Secret");
    assert_eq!(
        secret["metadata"]["name"].as_str(),
        Some(secret_ref.name.as_str())
    );
    assert_eq!(
        secret["metadata"]["namespace"].as_str(),
        Some(secret_ref.namespace.as_str())
    );
    for key in [
        kube_node_provider_aws::ACCESS_KEY_ID_KEYS[0],
        kube_node_provider_aws::SECRET_ACCESS_KEY_KEYS[0],
    ] {
        assert!(
            secret["stringData"].get(key).is_some(),
            "the Secret has {key}"
        );
    }
}

/// The README's "AWS" section: its text and its one JSON block.
fn readme_aws_section() -> (String, serde_json::Value) {
    let readme = repo_file("README.md");
    let start = readme
        .find("\n## AWS\n")
        .expect("README has a section \"## AWS\"");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    let section = rest[..end].to_string();
    let json = section
        .split("```json\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```json block");
    let policy = serde_json::from_str(json).expect("the IAM policy is valid JSON");
    (section, policy)
}

#[test]
fn the_readme_aws_section_has_an_iam_policy_covering_every_call_of_the_backend() {
    let (section, policy) = readme_aws_section();
    assert_eq!(policy["Version"], "2012-10-17");
    let mut actions = Vec::new();
    for statement in policy["Statement"].as_array().expect("Statement list") {
        assert_eq!(statement["Effect"], "Allow", "{statement}");
        match &statement["Action"] {
            serde_json::Value::String(a) => actions.push(a.clone()),
            serde_json::Value::Array(a) => {
                actions.extend(a.iter().filter_map(|x| x.as_str()).map(str::to_string))
            }
            other => panic!("Action {other}"),
        }
    }
    assert!(
        !actions.iter().any(|a| a.contains('*')),
        "minimal: no wildcard actions: {actions:?}"
    );
    // Every AWS API the backend calls names itself in `from_sdk("Operation", ...)`; the
    // read-back helpers for tests (inspect.rs, emulator.rs) are not part of the backend.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../providers/aws/src");
    let mut called = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&src).expect("providers/aws/src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if ["inspect.rs", "emulator.rs"].contains(&name) {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("source");
        for part in text.split("from_sdk(\"").skip(1) {
            if let Some(op) = part.split('"').next() {
                called.insert(op.to_string());
            }
        }
    }
    assert!(called.contains("RunInstances"), "{called:?}");
    for op in &called {
        let service = if op == "GetParameter" { "ssm" } else { "ec2" };
        let action = format!("{service}:{op}");
        assert!(
            actions.contains(&action),
            "the policy lacks {action}: {actions:?}"
        );
    }
    // Tags are written by RunInstances itself (TagSpecifications), which needs CreateTags;
    // an instance profile needs PassRole.
    for needed in ["ec2:CreateTags", "iam:PassRole"] {
        assert!(actions.iter().any(|a| a == needed), "{needed}");
    }
    let expected = called.len() + 2;
    assert_eq!(
        actions.len(),
        expected,
        "nothing beyond what is called: {actions:?}"
    );
    for word in [
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "examples/nodeclass-aws.yaml",
        "credentialsSecretRef",
        "subnetIds",
        "instanceType",
    ] {
        assert!(section.contains(word), "the AWS section mentions {word}");
    }
}

#[test]
fn the_baremetal_example_builds_a_provider_with_its_secret_and_inventory() {
    let docs: Vec<serde_yaml::Value> = examples()
        .into_iter()
        .filter(|(f, _)| f.ends_with("nodeclass-baremetal.yaml"))
        .map(|(_, d)| d)
        .collect();
    assert!(!docs.is_empty(), "examples/nodeclass-baremetal.yaml exists");
    let of_kind = |k: &str| -> Vec<serde_yaml::Value> {
        docs.iter()
            .filter(|d| d.get("kind").and_then(|x| x.as_str()) == Some(k))
            .cloned()
            .collect()
    };
    let secret = of_kind("Secret").pop().expect("the credentials Secret");
    let inventory = of_kind("ConfigMap").pop().expect("the inventory ConfigMap");
    let mut creds = std::collections::BTreeMap::new();
    for (k, v) in secret["stringData"].as_mapping().expect("stringData") {
        let (k, v) = (k.as_str().expect("key"), v.as_str().expect("value"));
        creds.insert(k.to_string(), v.as_bytes().to_vec());
    }
    // The example's key is a placeholder; a real (throwaway) key stands in for it so the
    // rest of the configuration is checked by the backend's own build.
    creds.insert(
        "ssh-private-key".into(),
        b"-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACBlDvQAmP5o90ZBT9i6FHAsI02aXBsa79zl6HzkLMnbDgAAAIhoH/l8aB/5\nfAAAAAtzc2gtZWQyNTUxOQAAACBlDvQAmP5o90ZBT9i6FHAsI02aXBsa79zl6HzkLMnbDg\nAAAEAU/A5HmV1LeFTLdcCWkA7PTMhBrjrhSHSMmdbo4rj0A2UO9ACY/mj3RkFP2LoUcCwj\nTZpcGxrv3OXofOQsydsOAAAABHRlc3QB\n-----END OPENSSH PRIVATE KEY-----\n".to_vec(),
    );
    let inventory_data: std::collections::BTreeMap<String, String> =
        serde_yaml::from_value(inventory["data"].clone()).expect("ConfigMap data");
    for class in of_kind("NodeClass") {
        let nc: NodeClass = serde_yaml::from_value(class.clone()).expect("NodeClass");
        nc.spec.validate().expect("the example validates");
        let round_trip = serde_yaml::to_value(&nc).expect("serialize");
        assert_eq!(
            round_trip.get("spec").and_then(|s| s.get("provider")),
            class.get("spec").and_then(|s| s.get("provider")),
            "every provider field is known to the type"
        );
        let secret_ref = nc
            .spec
            .credentials_secret_ref
            .as_ref()
            .expect("credentialsSecretRef");
        assert_eq!(secret_ref.namespace, "kube-node-system");
        assert_eq!(
            secret["metadata"]["name"].as_str(),
            Some(secret_ref.name.as_str())
        );
        let resolved = kube_node_provider::ResolvedClass {
            name: nc.metadata.name.clone().unwrap_or_default(),
            generation: 1,
            spec: nc.spec.clone(),
            credentials: Some(kube_node_provider::Credentials(creds.clone())),
            cluster_name: "example".into(),
            inventory: Some(inventory_data.clone()),
            claims: Some(std::sync::Arc::new(
                kube_node_provider::MemoryClaimStore::new(),
            )),
        };
        kube_node_provider_baremetal::config::resolve(&resolved)
            .unwrap_or_else(|e| panic!("the baremetal backend reads the example: {e}"));
    }
}

#[test]
fn the_gke_example_builds_a_group_provider_with_its_secret() {
    let docs: Vec<serde_yaml::Value> = examples()
        .into_iter()
        .filter(|(f, _)| f.ends_with("nodeclass-gke.yaml"))
        .map(|(_, d)| d)
        .collect();
    assert!(!docs.is_empty(), "examples/nodeclass-gke.yaml exists");
    let of_kind = |k: &str| {
        docs.iter()
            .find(|d| d.get("kind").and_then(|x| x.as_str()) == Some(k))
            .cloned()
            .unwrap_or_else(|| panic!("a {k}"))
    };
    let (secret, class_doc, set_doc) =
        (of_kind("Secret"), of_kind("NodeClass"), of_kind("NodeSet"));
    let nc: NodeClass = serde_yaml::from_value(class_doc.clone()).expect("NodeClass");
    nc.spec.validate().expect("the example validates");
    let round_trip = serde_yaml::to_value(&nc).expect("serialize");
    assert_eq!(
        round_trip.get("spec").and_then(|s| s.get("provider")),
        class_doc.get("spec").and_then(|s| s.get("provider")),
        "every provider field is known to the type"
    );
    let set: NodeSet = serde_yaml::from_value(set_doc).expect("NodeSet");
    assert_eq!(
        Some(set.spec.template.spec.node_class_name.as_str()),
        nc.metadata.name.as_deref(),
        "the NodeSet uses the class"
    );
    let secret_ref = nc
        .spec
        .credentials_secret_ref
        .as_ref()
        .expect("credentialsSecretRef");
    assert_eq!(secret_ref.namespace, "kube-node-system");
    assert_eq!(
        secret["metadata"]["name"].as_str(),
        Some(secret_ref.name.as_str())
    );
    let key = secret["stringData"][kube_node_provider_gke::SERVICE_ACCOUNT_KEY]
        .as_str()
        .expect("the Secret has the key the backend reads");
    let resolved = kube_node_provider::ResolvedClass {
        name: nc.metadata.name.clone().unwrap_or_default(),
        generation: 1,
        spec: nc.spec.clone(),
        credentials: Some(kube_node_provider::Credentials(
            [(
                kube_node_provider_gke::SERVICE_ACCOUNT_KEY.to_string(),
                key.as_bytes().to_vec(),
            )]
            .into(),
        )),
        cluster_name: "example".into(),
        inventory: None,
        claims: None,
    };
    use kube_node_provider::ProviderFactory;
    let provider = kube_node_provider_gke::GkeFactory::new()
        .build(&resolved)
        .unwrap_or_else(|e| panic!("the gke backend reads the example: {e}"));
    assert!(provider.capabilities().group_sized);
    assert!(provider.as_group().is_some());
}

/// The README's "GKE node pools" section.
fn readme_gke_section() -> String {
    let readme = repo_file("README.md");
    let start = readme
        .find("\n## GKE node pools\n")
        .expect("README has a section \"## GKE node pools\"");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    rest[..end].to_string()
}

#[test]
fn the_readme_gke_section_lists_exactly_the_calls_of_the_backend_and_their_permissions() {
    let section = readme_gke_section();
    // The table: one row per API method, `| `method` | `permission` |`.
    let mut rows = std::collections::BTreeSet::new();
    for line in section.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().trim_matches('`'))
            .collect();
        if let [method, permission] = cells.as_slice()
            && (method.starts_with("compute.") || method.starts_with("container."))
        {
            rows.insert((method.to_string(), permission.to_string()));
        }
    }
    let called: std::collections::BTreeSet<(String, String)> = kube_node_provider_gke::calls::ALL
        .iter()
        .map(|a| (a.method.to_string(), a.permission.to_string()))
        .collect();
    assert_eq!(
        rows, called,
        "the README's table is the backend's call table"
    );
    // The custom role grants exactly the permissions of those calls.
    let granted: Vec<&str> = section
        .split("--permissions=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("a gcloud --permissions= list")
        .split(',')
        .collect();
    assert_eq!(granted, kube_node_provider_gke::calls::permissions());
    // Every API method the backend's source calls is in its call table: each call site
    // names its entry (`calls::NAME`), and the table has no entry that is never used.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../providers/gke/src/provider.rs");
    let text = std::fs::read_to_string(&src).expect("provider.rs");
    for (name, api) in [
        (
            "GET_NODE_POOL",
            kube_node_provider_gke::calls::GET_NODE_POOL,
        ),
        ("GET_MIG", kube_node_provider_gke::calls::GET_MIG),
        (
            "LIST_MANAGED_INSTANCES",
            kube_node_provider_gke::calls::LIST_MANAGED_INSTANCES,
        ),
        ("RESIZE_MIG", kube_node_provider_gke::calls::RESIZE_MIG),
        (
            "DELETE_INSTANCES",
            kube_node_provider_gke::calls::DELETE_INSTANCES,
        ),
        (
            "GET_ZONE_OPERATION",
            kube_node_provider_gke::calls::GET_ZONE_OPERATION,
        ),
    ] {
        assert!(text.contains(&format!("calls::{name}")), "{name} is called");
        assert!(kube_node_provider_gke::calls::ALL.contains(&api));
    }
    let client_calls = [
        "get_node_pool()",
        ".get()",
        "list_managed_instances()",
        "resize()",
        "delete_instances()",
    ];
    for c in client_calls {
        assert!(text.contains(c), "{c}");
    }
    for word in [
        "examples/nodeclass-gke.yaml",
        "service-account.json",
        "credentialsSecretRef",
        "nodePool",
        "Application Default Credentials",
        "setSize",
    ] {
        assert!(section.contains(word), "the GKE section mentions {word}");
    }
}
