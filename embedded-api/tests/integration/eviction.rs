use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, EvictParams, ListParams, PostParams};
use kube::core::ObjectMeta;
use std::collections::BTreeMap;

use crate::*;

fn pdb(name: &str, min: Option<IntOrString>, max: Option<IntOrString>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PodDisruptionBudgetSpec {
            min_available: min,
            max_unavailable: max,
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app".to_string(), "web".to_string())])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

#[tokio::test]
async fn eviction_respects_pdb() {
    let (api, client) = setup();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    for i in 0..3 {
        pods.create(
            &PostParams::default(),
            &pod(
                &format!("web-{i}"),
                &[("app", "web")],
                Some("n1"),
                Some("Running"),
            ),
        )
        .await
        .unwrap();
    }
    pods.create(
        &PostParams::default(),
        &pod("other", &[("app", "db")], Some("n1"), Some("Running")),
    )
    .await
    .unwrap();
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "ns");
    pdbs.create(
        &PostParams::default(),
        &pdb("web", Some(IntOrString::Int(2)), None),
    )
    .await
    .unwrap();
    let st = pdbs.get("web").await.unwrap().status.unwrap();
    assert_eq!(
        (
            st.current_healthy,
            st.desired_healthy,
            st.disruptions_allowed,
            st.expected_pods
        ),
        (3, 2, 1, 3)
    );

    // one eviction allowed
    let s = pods.evict("web-0", &EvictParams::default()).await.unwrap();
    assert_eq!(s.code, 201);
    assert_api_err(pods.get("web-0").await, 404, "NotFound");
    let st = pdbs.get("web").await.unwrap().status.unwrap();
    assert_eq!(st.disruptions_allowed, 0);

    // the next one would violate the budget
    let err = assert_api_err(
        pods.evict("web-1", &EvictParams::default()).await,
        429,
        "TooManyRequests",
    );
    assert_eq!(
        err.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    let causes = err.details.unwrap().causes;
    assert_eq!(causes[0].reason, "DisruptionBudget");
    assert_eq!(
        causes[0].message,
        "The disruption budget web needs 2 healthy pods and has 2 currently"
    );
    assert!(pods.get("web-1").await.is_ok());

    // pods not covered by the PDB can be evicted
    pods.evict("other", &EvictParams::default()).await.unwrap();
    // pending pods can always be evicted
    pods.create(
        &PostParams::default(),
        &pod("web-p", &[("app", "web")], None, Some("Pending")),
    )
    .await
    .unwrap();
    pods.evict("web-p", &EvictParams::default()).await.unwrap();
    // missing pod
    assert_api_err(
        pods.evict("nope", &EvictParams::default()).await,
        404,
        "NotFound",
    );

    assert_eq!(api.stats().count("pods/eviction", "create"), 5);
}

#[tokio::test]
async fn eviction_with_max_unavailable_uses_controller_scale() {
    use kube::Resource;
    let (_api, client) = setup_with_crd();
    let widgets: Api<Widget> = Api::all(client.clone());
    let owner = widgets
        .create(&PostParams::default(), &widget("web", 2))
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    for n in ["web-a", "web-b"] {
        let mut p = pod(n, &[("app", "web")], Some("n1"), Some("Running"));
        p.metadata.owner_references = Some(vec![owner.controller_owner_ref(&()).unwrap()]);
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "ns");
    // 2 desired replicas, 50% may be unavailable -> 1 disruption
    pdbs.create(
        &PostParams::default(),
        &pdb("web", None, Some(IntOrString::String("50%".into()))),
    )
    .await
    .unwrap();
    pods.evict("web-a", &EvictParams::default()).await.unwrap();
    // the expected count stays 2 (from the controller's scale) although only one pod is left
    let err = assert_api_err(
        pods.evict("web-b", &EvictParams::default()).await,
        429,
        "TooManyRequests",
    );
    assert_eq!(
        err.details.unwrap().causes[0].message,
        "The disruption budget web needs 1 healthy pods and has 1 currently"
    );
    let st = pdbs.get("web").await.unwrap().status.unwrap();
    assert_eq!(
        (st.expected_pods, st.current_healthy, st.disruptions_allowed),
        (2, 1, 0)
    );
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );
}

#[tokio::test]
async fn eviction_of_pod_with_finalizer() {
    let (_api, client) = setup();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let mut p = pod("p", &[("app", "web")], None, Some("Running"));
    p.metadata.finalizers = Some(vec!["x/y".into()]);
    pods.create(&PostParams::default(), &p).await.unwrap();
    pods.evict("p", &EvictParams::default()).await.unwrap();
    assert!(
        pods.get("p")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_some()
    );
}
