//! One NodeSet the controller cannot use (the embedded API server, unlike a real one, accepts
//! it) never keeps the others from being reconciled, and says what is wrong on itself.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use kube_node_crds::names::{NODESET_LABEL, READY_CONDITION};
use kube_node_crds::v1alpha1::{NodeClass, NodeSet};
use kube_node_embedded_api::EmbeddedApi;
use nodeset_controller::{Config, Metrics, run};
use serde_json::{Value, json};

async fn create(client: &Client, ar: &ApiResource, object: Value) {
    let obj: DynamicObject = serde_json::from_value(object).expect("object");
    Api::<DynamicObject>::all_with(client.clone(), ar)
        .create(&PostParams::default(), &obj)
        .await
        .expect("created");
}

fn nodeset(name: &str, extra: Value) -> Value {
    let mut spec = json!({
        "replicas": 2,
        "selector": {"matchLabels": {"pool": name}},
        "template": {"metadata": {"labels": {"pool": name}}, "spec": {"nodeClassName": "sim"}},
    });
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn a_bad_nodeset_is_reported_on_itself_and_the_others_reconcile() {
    let api = EmbeddedApi::new();
    api.register_crd(&NodeClass::crd()).expect("NodeClass CRD");
    api.register_crd(&NodeSet::crd()).expect("NodeSet CRD");
    let client = api.client();
    let classes = ApiResource::erase::<NodeClass>(&());
    let sets = ApiResource::erase::<NodeSet>(&());
    create(
        &client,
        &classes,
        json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "sim"},
            "spec": {"provider": {"type": "simulated"}}}),
    )
    .await;
    // A NodeClass that does not decode must not hide "sim" from this controller either.
    create(
        &client,
        &classes,
        json!({"apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass", "metadata": {"name": "poison"},
            "spec": {"provider": {"type": "simulated", "simulated": {"bootDelay": "forever"}}}}),
    )
    .await;
    create(&client, &sets, nodeset("good-a", json!({}))).await;
    // Decodes, but does not validate.
    create(
        &client,
        &sets,
        nodeset("bad-unhealthy", json!({"maxUnhealthy": "abc"})),
    )
    .await;
    // Does not decode at all.
    create(
        &client,
        &sets,
        nodeset("bad-replicas", json!({"replicas": "many"})),
    )
    .await;
    create(&client, &sets, nodeset("good-b", json!({}))).await;

    let metrics = Metrics::default();
    let m = metrics.clone();
    let c = client.clone();
    let task = tokio::spawn(async move {
        run(c, Config::default(), m, std::future::pending())
            .await
            .expect("controller");
    });

    let nodes: Api<Node> = Api::all(client.clone());
    let set_api: Api<DynamicObject> = Api::all_with(client.clone(), &sets);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut reported, mut counts) = (Vec::new(), (0, 0, 0));
    while tokio::time::Instant::now() < deadline {
        let list = nodes.list(&ListParams::default()).await.expect("nodes");
        let of = |name: &str| {
            list.items
                .iter()
                .filter(|n| {
                    n.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("pool"))
                        .is_some_and(|p| p == name)
                })
                .count()
        };
        counts = (
            of("good-a"),
            of("good-b"),
            of("bad-unhealthy") + of("bad-replicas"),
        );
        reported.clear();
        for (name, field) in [
            ("bad-unhealthy", "spec.maxUnhealthy"),
            ("bad-replicas", "spec.replicas"),
        ] {
            let o = set_api.get(name).await.expect("nodeset");
            let ready = o.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == READY_CONDITION)
                .cloned();
            if let Some(c) = ready
                && c["status"] == "False"
                && c["reason"] == "InvalidSpec"
            {
                let message = c["message"].as_str().unwrap_or_default();
                assert!(message.contains(field), "{name}: {message}");
                reported.push(name);
            }
        }
        if counts == (2, 2, 0) && reported.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        counts,
        (2, 2, 0),
        "good NodeSets scaled, bad ones made nothing"
    );
    assert_eq!(reported, ["bad-unhealthy", "bad-replicas"]);
    assert_eq!(metrics.invalid_objects("NodeSet").get(), 2);
    let owned = nodes
        .list(&ListParams::default().labels(NODESET_LABEL))
        .await
        .expect("nodes");
    assert_eq!(owned.items.len(), 4);
    task.abort();
}
