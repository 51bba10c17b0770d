//! The install manifests in deploy/: every object parses, the CRDs are the generated ones, the
//! Deployment is hardened, and the RBAC is least privilege.

use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role};
use serde::Deserialize;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of every file the kustomization lists.
fn documents() -> Vec<(String, serde_yaml::Value)> {
    #[derive(Deserialize)]
    struct Kustomization {
        resources: Vec<String>,
    }
    let k: Kustomization = serde_yaml::from_str(
        &std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).expect("kustomization"),
    )
    .expect("kustomization parses");
    let mut docs = Vec::new();
    for file in k.resources {
        let text = std::fs::read_to_string(deploy_dir().join(&file)).expect("listed file exists");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = serde_yaml::Value::deserialize(doc).expect("valid YAML");
            if !v.is_null() {
                docs.push((file.clone(), v));
            }
        }
    }
    docs
}

fn of_kind<T: serde::de::DeserializeOwned>(kind: &str) -> Vec<T> {
    documents()
        .into_iter()
        .filter(|(_, d)| d.get("kind").and_then(|k| k.as_str()) == Some(kind))
        .map(|(f, d)| serde_yaml::from_value(d).unwrap_or_else(|e| panic!("{f}: {kind}: {e}")))
        .collect()
}

#[test]
fn every_object_parses_and_has_a_kind_and_name() {
    let docs = documents();
    assert!(docs.len() >= 10, "{} objects", docs.len());
    for (file, d) in &docs {
        assert!(d.get("apiVersion").is_some(), "{file}: apiVersion");
        assert!(d.get("kind").is_some(), "{file}: kind");
        assert!(
            d["metadata"]["name"].as_str().is_some(),
            "{file}: metadata.name"
        );
    }
}

#[test]
fn the_install_crds_are_the_generated_ones() {
    let committed =
        std::fs::read_to_string(deploy_dir().join("crds.yaml")).expect("deploy/crds.yaml");
    assert!(
        committed == kube_node_crds::crd_yaml().expect("generate"),
        "deploy/crds.yaml is stale: cp crds/crds.yaml deploy/crds.yaml"
    );
}

#[test]
fn the_deployment_runs_two_hardened_replicas_with_probes() {
    let deployments: Vec<Deployment> = of_kind("Deployment");
    assert_eq!(deployments.len(), 1);
    let d = &deployments[0];
    let spec = d.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("kube-node"));
    assert_eq!(
        pod.security_context
            .as_ref()
            .and_then(|s| s.run_as_non_root),
        Some(true)
    );
    let c = &pod.containers[0];
    let sc = c
        .security_context
        .as_ref()
        .expect("container securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
    let res = c.resources.as_ref().expect("resources");
    assert!(res.requests.is_some() && res.limits.is_some());
}

fn allows(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    rules.iter().any(|r| {
        r.api_groups
            .iter()
            .flatten()
            .any(|g| g == group || g == "*")
            && r.resources
                .iter()
                .flatten()
                .any(|x| x == resource || x == "*")
            && r.verbs.iter().any(|v| v == verb || v == "*")
    })
}

#[test]
fn rbac_is_least_privilege() {
    let cluster_roles: Vec<ClusterRole> = of_kind("ClusterRole");
    let roles: Vec<Role> = of_kind("Role");
    for cr in &cluster_roles {
        for r in cr.rules.iter().flatten() {
            assert!(!r.verbs.iter().any(|v| v == "*"), "no wildcard verbs");
            assert!(
                !r.resources.iter().flatten().any(|x| x == "*"),
                "no wildcard resources"
            );
            assert!(
                !r.api_groups.iter().flatten().any(|x| x == "*"),
                "no wildcard groups"
            );
            assert!(
                !r.resources.iter().flatten().any(|x| x == "secrets"),
                "{}: no cluster-wide access to Secrets",
                cr.metadata.name.as_deref().unwrap_or_default()
            );
        }
    }
    let role = |ns: &str, name: &str| -> Vec<PolicyRule> {
        roles
            .iter()
            .find(|r| {
                r.metadata.namespace.as_deref() == Some(ns)
                    && r.metadata.name.as_deref() == Some(name)
            })
            .and_then(|r| r.rules.clone())
            .unwrap_or_else(|| panic!("Role {ns}/{name}"))
    };
    let bootstrap = role("kube-system", "kube-node-bootstrap");
    assert!(
        allows(&bootstrap, "", "secrets", "create") && allows(&bootstrap, "", "secrets", "delete")
    );
    for verb in ["get", "list", "watch", "update", "patch"] {
        assert!(
            !allows(&bootstrap, "", "secrets", verb),
            "kube-system secrets: no {verb}"
        );
    }
    let own = role("kube-node-system", "kube-node");
    assert!(allows(&own, "", "secrets", "get"));
    // Create (of the bootstrap token key) changes no existing Secret.
    assert!(allows(&own, "", "secrets", "create"));
    for verb in ["list", "watch", "update", "patch", "delete"] {
        assert!(
            !allows(&own, "", "secrets", verb),
            "credentials are read only: no {verb}"
        );
    }
    assert!(allows(&own, "coordination.k8s.io", "leases", "update"));
    let main = cluster_roles
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("kube-node"))
        .and_then(|c| c.rules.clone())
        .expect("ClusterRole kube-node");
    for (group, resource, verb) in [
        ("", "nodes", "create"),
        ("", "nodes", "patch"),
        ("", "nodes", "delete"),
        ("", "nodes/status", "patch"),
        ("", "pods", "list"),
        ("", "pods/eviction", "create"),
        ("kube-node.io", "nodesets/scale", "patch"),
        ("kube-node.io", "nodesets/status", "patch"),
        ("kube-node.io", "nodeclasses/status", "patch"),
        ("events.k8s.io", "events", "create"),
    ] {
        assert!(
            allows(&main, group, resource, verb),
            "{verb} {group}/{resource}"
        );
    }
    assert!(
        !allows(&main, "", "pods", "delete"),
        "drain evicts, it never deletes pods"
    );
}
