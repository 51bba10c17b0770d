//! A NodeSet naming a NodeClass that does not exist creates no Node (each would sit in
//! `kubectl get nodes` as `Unknown` for every user of the cluster); it says why in its
//! conditions, and starts creating once the NodeClass appears. The same holds while its
//! NodeClass is being deleted.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use kube_node_crds::names::{OUTDATED_CONDITION, REPLICA_FAILURE_CONDITION};
use kube_node_crds::v1alpha1::{NodeClass, NodeSet};
use kube_node_embedded_api::EmbeddedApi;
use nodeset_controller::{Config, Metrics, run};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

fn class(name: &str) -> NodeClass {
    serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1",
        "kind": "NodeClass",
        "metadata": {"name": name},
        "spec": {"provider": {"type": "simulated", "simulated": {}}},
    }))
    .expect("NodeClass")
}

fn nodeset(name: &str, class: &str, replicas: i32) -> NodeSet {
    serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1",
        "kind": "NodeSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"pool": name}},
            "template": {"metadata": {"labels": {"pool": name}}, "spec": {"nodeClassName": class}},
        },
    }))
    .expect("NodeSet")
}

async fn eventually<F, Fut, T>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn node_count(client: &Client) -> usize {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list Nodes")
        .items
        .len()
}

/// The (status, reason, message) of a NodeSet condition, once the status describes the
/// NodeSet's current generation.
async fn condition(client: &Client, set: &str, ty: &str) -> Option<(String, String, String)> {
    let ns = Api::<NodeSet>::all(client.clone()).get(set).await.ok()?;
    let status = ns.status?;
    if status.observed_generation != ns.metadata.generation {
        return None;
    }
    status
        .conditions
        .into_iter()
        .find(|c| c.type_ == ty)
        .map(|c| (c.status, c.reason, c.message))
}

fn start() -> (EmbeddedApi, Client, tokio::task::JoinHandle<()>) {
    let api = EmbeddedApi::new();
    api.register_crd(&NodeClass::crd()).expect("NodeClass CRD");
    api.register_crd(&NodeSet::crd()).expect("NodeSet CRD");
    let client = api.client();
    let c = client.clone();
    let task = tokio::spawn(async move {
        run(
            c,
            Config::default(),
            Metrics::default(),
            std::future::pending(),
        )
        .await
        .expect("controller");
    });
    (api, client, task)
}

#[tokio::test]
async fn no_node_while_the_class_is_missing_and_nodes_once_it_appears() {
    let (_api, client, task) = start();
    Api::<NodeSet>::all(client.clone())
        .create(
            &PostParams::default(),
            &nodeset("workers", "does-not-exist", 3),
        )
        .await
        .expect("create NodeSet");
    // The controller has reconciled the NodeSet (its status is written) and said why nothing
    // is created.
    let (status, reason, message) = eventually("ReplicaFailure NodeClassNotFound", || async {
        condition(&client, "workers", REPLICA_FAILURE_CONDITION)
            .await
            .filter(|(_, r, _)| r == "NodeClassNotFound")
    })
    .await;
    assert_eq!(status, "True");
    assert!(message.contains("does-not-exist"), "{message}");
    let (_, reason_outdated, _) = condition(&client, "workers", OUTDATED_CONDITION)
        .await
        .expect("Outdated condition");
    assert_eq!(reason_outdated, "NodeClassNotFound");
    assert_eq!(reason, "NodeClassNotFound");
    assert_eq!(node_count(&client).await, 0, "no Node without a NodeClass");
    // A scale while the class is missing still creates nothing.
    Api::<NodeSet>::all(client.clone())
        .patch(
            "workers",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .expect("scale");
    eventually("the scaled NodeSet reconciled", || async {
        condition(&client, "workers", REPLICA_FAILURE_CONDITION)
            .await
            .filter(|(_, r, _)| r == "NodeClassNotFound")
    })
    .await;
    assert_eq!(node_count(&client).await, 0);

    // The NodeClass appears: the NodeSet starts.
    Api::<NodeClass>::all(client.clone())
        .create(&PostParams::default(), &class("does-not-exist"))
        .await
        .expect("create NodeClass");
    eventually("5 Nodes", || async {
        (node_count(&client).await == 5).then_some(())
    })
    .await;
    eventually("ReplicaFailure cleared", || async {
        condition(&client, "workers", REPLICA_FAILURE_CONDITION)
            .await
            .filter(|(s, _, _)| s == "False")
    })
    .await;
    task.abort();
}

#[tokio::test]
async fn no_node_from_a_class_being_deleted() {
    let (_api, client, task) = start();
    let classes: Api<NodeClass> = Api::all(client.clone());
    let mut c = class("leaving");
    // Something (kube-node's in-use protection, here a stand-in) holds its deletion.
    c.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    classes
        .create(&PostParams::default(), &c)
        .await
        .expect("create NodeClass");
    classes
        .delete("leaving", &DeleteParams::default())
        .await
        .expect("delete NodeClass");
    Api::<NodeSet>::all(client.clone())
        .create(&PostParams::default(), &nodeset("late", "leaving", 2))
        .await
        .expect("create NodeSet");
    let (_, _, message) = eventually("ReplicaFailure NodeClassDeleting", || async {
        condition(&client, "late", REPLICA_FAILURE_CONDITION)
            .await
            .filter(|(_, r, _)| r == "NodeClassDeleting")
    })
    .await;
    assert!(message.contains("leaving"), "{message}");
    assert_eq!(node_count(&client).await, 0);
    task.abort();
}
