//! The end-to-end suite: runs against the real cluster named by `KUBE_NODE_E2E_KUBECONFIG`
//! and says clearly that it skipped when that is unset.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use kube_node_crds::{NodeClass, NodeSet, names};

async fn cluster() -> Option<kube::Client> {
    let Some(path) = std::env::var_os("KUBE_NODE_E2E_KUBECONFIG") else {
        eprintln!(
            "SKIPPED: e2e suite: KUBE_NODE_E2E_KUBECONFIG is not set, no real cluster to test against"
        );
        return None;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("usable kubeconfig");
    Some(kube::Client::try_from(config).expect("client"))
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

#[tokio::test]
async fn crds_install_and_the_api_server_rejects_invalid_objects_naming_the_field() {
    let Some(client) = cluster().await else {
        return;
    };
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in [NodeClass::crd(), NodeSet::crd()] {
        crds.patch(
            &crd.name_any(),
            &PatchParams::apply("kube-node-e2e").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("CRD applies");
    }
    let api: Api<NodeSet> = Api::all(client.clone());
    eventually("NodeSet CRD established", Duration::from_secs(30), || {
        let api = api.clone();
        async move { api.list(&Default::default()).await.is_ok() }
    })
    .await;
    let bad = [
        (
            serde_json::json!({"replicas": 1, "minSize": 5, "maxSize": 2,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"nodeClassName": "x"}}}),
            "spec.minSize",
        ),
        (
            serde_json::json!({"replicas": -1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"nodeClassName": "x"}}}),
            "spec.replicas",
        ),
        (
            serde_json::json!({"replicas": 1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "c"}}, "spec": {"nodeClassName": "x"}}}),
            "spec.template.metadata.labels",
        ),
        (
            serde_json::json!({"replicas": 1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {}}}),
            "nodeClassName",
        ),
    ];
    let dyn_api: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<NodeSet>(&()),
    );
    for (i, (spec, field)) in bad.into_iter().enumerate() {
        let obj: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
            "metadata": {"name": format!("e2e-invalid-{i}")}, "spec": spec}))
        .expect("object");
        let err = dyn_api
            .create(&PostParams::default(), &obj)
            .await
            .expect_err("rejected");
        assert!(
            err.to_string().contains(field),
            "error names {field}: {err}"
        );
    }
    let nc_api: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<NodeClass>(&()),
    );
    let obj: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": "e2e-invalid-provider"}, "spec": {"provider": {"type": "nosuchcloud"}}}))
    .expect("object");
    let err = nc_api
        .create(&PostParams::default(), &obj)
        .await
        .expect_err("rejected");
    assert!(err.to_string().contains("spec.provider.type"), "{err}");
}

#[tokio::test]
async fn a_node_that_names_a_node_class_is_accepted_by_a_real_api_server() {
    let Some(client) = cluster().await else {
        return;
    };
    // The controllers themselves run in the e2e scenarios of the later suites; this checks the
    // request shape a user writes (examples/node.yaml) is a valid core Node on a real server.
    let nodes: Api<Node> = Api::all(client);
    let mut node: Node =
        serde_yaml::from_str(include_str!("../../examples/node.yaml")).expect("example");
    node.metadata.name = Some("kube-node-e2e-shape".into());
    let _ = nodes
        .delete("kube-node-e2e-shape", &DeleteParams::default())
        .await;
    let created = nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("created");
    assert!(
        created
            .annotations()
            .contains_key(names::NODE_CLASS_ANNOTATION)
    );
    nodes
        .delete("kube-node-e2e-shape", &DeleteParams::default())
        .await
        .expect("deleted");
}
