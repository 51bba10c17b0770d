use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::ObjectMeta;

use crate::*;

fn owned_cm(name: &str, owners: Vec<OwnerReference>, finalizers: Option<Vec<String>>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            owner_references: Some(owners),
            finalizers,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[tokio::test]
async fn background_gc() {
    let (api, client) = setup_with_crd();
    let widgets: Api<Widget> = Api::all(client.clone());
    let owner = widgets
        .create(&PostParams::default(), &widget("owner", 1))
        .await
        .unwrap();
    let other = widgets
        .create(&PostParams::default(), &widget("other", 1))
        .await
        .unwrap();
    let oref = owner.controller_owner_ref(&()).unwrap();
    let other_ref = other.owner_ref(&()).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "a");
    let cms_b: Api<ConfigMap> = Api::namespaced(client.clone(), "b");
    cms.create(
        &PostParams::default(),
        &owned_cm("dep1", vec![oref.clone()], None),
    )
    .await
    .unwrap();
    cms_b
        .create(
            &PostParams::default(),
            &owned_cm("dep2", vec![oref.clone()], None),
        )
        .await
        .unwrap();
    cms.create(
        &PostParams::default(),
        &owned_cm("fin", vec![oref.clone()], Some(vec!["x/y".into()])),
    )
    .await
    .unwrap();
    cms.create(
        &PostParams::default(),
        &owned_cm("shared", vec![oref.clone(), other_ref.clone()], None),
    )
    .await
    .unwrap();
    // a pod owned by a configmap that is itself owned: cascades
    let dep1 = cms.get("dep1").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "a");
    let mut p = pod("grandchild", &[], None, None);
    p.metadata.owner_references = Some(vec![dep1.controller_owner_ref(&()).unwrap()]);
    pods.create(&PostParams::default(), &p).await.unwrap();

    widgets
        .delete("owner", &DeleteParams::background())
        .await
        .unwrap();

    assert_api_err(cms.get("dep1").await, 404, "NotFound");
    assert_api_err(cms_b.get("dep2").await, 404, "NotFound");
    assert_api_err(pods.get("grandchild").await, 404, "NotFound");
    // a dependent with finalizers is only marked for deletion
    let fin = cms.get("fin").await.unwrap();
    assert!(fin.metadata.deletion_timestamp.is_some());
    // a dependent with another live owner survives, minus the dangling reference
    let shared = cms.get("shared").await.unwrap();
    let refs = shared.metadata.owner_references.unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].uid, other_ref.uid);

    // dangling owner references are collected on request
    let mut ghost = oref.clone();
    ghost.uid = "00000000-0000-4000-8000-000000000000".into();
    cms.create(
        &PostParams::default(),
        &owned_cm("orphaned", vec![ghost], None),
    )
    .await
    .unwrap();
    assert_eq!(api.collect_dangling(), 1);
    assert_api_err(cms.get("orphaned").await, 404, "NotFound");
}

#[tokio::test]
async fn orphan_gc() {
    let (_api, client) = setup_with_crd();
    let widgets: Api<Widget> = Api::all(client.clone());
    let owner = widgets
        .create(&PostParams::default(), &widget("owner", 1))
        .await
        .unwrap();
    let oref = owner.controller_owner_ref(&()).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "a");
    cms.create(
        &PostParams::default(),
        &owned_cm("dep", vec![oref.clone()], None),
    )
    .await
    .unwrap();
    widgets
        .delete("owner", &DeleteParams::orphan())
        .await
        .unwrap();
    assert_api_err(widgets.get("owner").await, 404, "NotFound");
    let dep = cms.get("dep").await.unwrap();
    assert!(dep.metadata.owner_references.unwrap_or_default().is_empty());
    assert!(dep.metadata.deletion_timestamp.is_none());
}

#[tokio::test]
async fn gc_waits_for_owner_finalizers() {
    let (_api, client) = setup_with_crd();
    let widgets: Api<Widget> = Api::all(client.clone());
    let mut w = widget("owner", 1);
    w.metadata.finalizers = Some(vec!["test/hold".into()]);
    let owner = widgets.create(&PostParams::default(), &w).await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "a");
    cms.create(
        &PostParams::default(),
        &owned_cm("dep", vec![owner.controller_owner_ref(&()).unwrap()], None),
    )
    .await
    .unwrap();
    widgets
        .delete("owner", &DeleteParams::foreground())
        .await
        .unwrap();
    // owner only marked, dependents still there
    assert!(cms.get("dep").await.is_ok());
    widgets
        .patch(
            "owner",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"finalizers": []}})),
        )
        .await
        .unwrap();
    assert_api_err(widgets.get("owner").await, 404, "NotFound");
    assert_api_err(cms.get("dep").await, 404, "NotFound");
}
