//! The node-controller and bad input, against the embedded API server (which, unlike a real one, accepts any object):
//! one NodeClass that does not decode must not keep any other from working, is reported on
//! itself, and a Node write the API server refuses (422) is reported on the Node.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{ApiResource, DynamicObject, ObjectMeta, PostParams};
use kube::{Api, Client};
use kube_node::harness::{Harness, HarnessBuilder, Role};
use kube_node_crds::NodeClass;
use kube_node_crds::names::{MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION, READY_CONDITION};
use kube_node_embedded_api::EmbeddedApi;
use kube_node_provider_simulated::KubeletConfig;
use node_controller::Config;
use serde_json::{Value, json};

async fn eventually<F, Fut, T>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The shared harness with the node-controller alone (no NodeSet plays a part here), its
/// controllers not started yet so that a test lays out its objects first.
async fn harness(builder: HarnessBuilder, synced: tokio::sync::watch::Sender<bool>) -> Harness {
    builder
        .without_nodeset_controller()
        .controllers_stopped()
        .node_config(Config {
            cluster_name: "test".into(),
            api_server_endpoint: Some("10.0.0.1:6443".into()),
            orphan_gc_interval: Duration::from_millis(500),
            synced: Some(synced),
            ..Config::default()
        })
        .start()
        .await
        .expect("harness")
}

fn classes(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::erase::<NodeClass>(&()))
}

/// Creates a NodeClass as raw JSON: the embedded API stores whatever it is given.
async fn raw_class(client: &Client, name: &str, spec: Value) {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": name}, "spec": spec}))
    .expect("object");
    classes(client)
        .create(&PostParams::default(), &obj)
        .await
        .expect("created");
}

async fn node(client: &Client, name: &str, class: &str) {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(BTreeMap::from([(
                NODE_CLASS_ANNOTATION.to_string(),
                class.to_string(),
            )])),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .expect("node");
}

fn ready_condition(obj: &DynamicObject) -> Option<(String, String, String)> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == READY_CONDITION)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or("").to_string(),
                c["reason"].as_str().unwrap_or("").to_string(),
                c["message"].as_str().unwrap_or("").to_string(),
            )
        })
}

fn machine_ready(node: &Node) -> Option<(String, String, String)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == MACHINE_READY_CONDITION)
        .map(|c| {
            (
                c.status.clone(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

#[tokio::test]
async fn a_poison_nodeclass_leaves_every_other_nodeclass_working() {
    let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(false);
    let mut harness = harness(
        Harness::builder().kubelet(KubeletConfig {
            scan_interval: Duration::from_millis(100),
            ..KubeletConfig::default()
        }),
        synced_tx,
    )
    .await;
    let client = harness.client.clone();
    let cloud = harness.cloud.clone();
    raw_class(
        &client,
        "poison",
        json!({"provider": {"type": "simulated", "simulated": {"bootDelay": "forever"}}}),
    )
    .await;
    raw_class(
        &client,
        "bad-labels",
        json!({"provider": {"type": "simulated"}, "labels": {"bad key!": "x"}}),
    )
    .await;
    raw_class(&client, "good", json!({"provider": {"type": "simulated"}})).await;
    node(&client, "n-good", "good").await;
    node(&client, "n-poison", "poison").await;

    let metrics = harness.node_metrics.clone();
    harness.start_controllers();

    // The watch syncs despite the poison (readiness depends on it).
    tokio::time::timeout(Duration::from_secs(30), synced_rx.wait_for(|s| *s))
        .await
        .expect("caches synced despite an undecodable NodeClass")
        .expect("sync signal");

    // The good class works: its Node gets a machine, and the class is Ready.
    let nodes: Api<Node> = Api::all(client.clone());
    eventually("the good Node's machine is Ready", || {
        let nodes = nodes.clone();
        async move {
            let n = nodes.get("n-good").await.ok()?;
            let (status, reason, _) = machine_ready(&n)?;
            (status == "True" && reason == "Ready").then_some(())
        }
    })
    .await;
    let api = classes(&client);
    eventually("the good class is Ready", || {
        let api = api.clone();
        async move {
            let (status, _, _) = ready_condition(&api.get("good").await.ok()?)?;
            (status == "True").then_some(())
        }
    })
    .await;

    // The bad classes say what is wrong with them, on themselves, naming the field.
    for (name, field) in [
        ("poison", "spec.provider.simulated.bootDelay"),
        ("bad-labels", "spec.labels"),
    ] {
        let (_, _, message) = eventually("the bad class reports InvalidSpec", || {
            let api = api.clone();
            async move {
                let c = ready_condition(&api.get(name).await.ok()?)?;
                (c.0 == "False" && c.1 == "InvalidSpec").then_some(c)
            }
        })
        .await;
        assert!(message.contains(field), "{name}: {message}");
    }
    assert_eq!(metrics.invalid_objects("NodeClass").get(), 2);

    // The poison class's Node waits, saying why, and no machine is made for it.
    let (_, reason, message) = eventually("the poison Node says its class is invalid", || {
        let nodes = nodes.clone();
        async move {
            let c = machine_ready(&nodes.get("n-poison").await.ok()?)?;
            c.2.contains("NodeClassInvalid").then_some(c)
        }
    })
    .await;
    assert_eq!(reason, "Pending");
    assert!(message.contains("bootDelay"), "{message}");
    assert_eq!(cloud.machine_count(), 1, "only the good Node has a machine");

    // Fixing the class lets its Node be provisioned.
    let fixed: DynamicObject = {
        let mut o = api.get("poison").await.expect("poison");
        o.data["spec"]["provider"]["simulated"]["bootDelay"] = json!("1s");
        o
    };
    api.replace("poison", &PostParams::default(), &fixed)
        .await
        .expect("fixed");
    eventually("the fixed class's Node gets a machine", || {
        let nodes = nodes.clone();
        async move {
            let n = nodes.get("n-poison").await.ok()?;
            let (_, reason, _) = machine_ready(&n)?;
            (reason != "Pending").then_some(())
        }
    })
    .await;
    assert_eq!(metrics.invalid_objects("NodeClass").get(), 1);
    harness.shutdown().await.expect("controllers stop cleanly");
}

/// An API server that refuses, with 422 Invalid as a real one (or an admission policy) would,
/// every Node write carrying the label key `refused.example.com/pool`: the embedded API server
/// underneath, which accepts any label.
#[derive(Clone)]
struct Refusing {
    inner: kube_node_embedded_api::EmbeddedService,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

const REFUSED_KEY: &str = "refused.example.com/pool";

impl tower::Service<http::Request<kube::client::Body>> for Refusing {
    type Response = http::Response<
        http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, std::convert::Infallible>,
    >;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        use http_body_util::BodyExt;
        let mut inner = self.inner.clone();
        let refused = self.refused.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let node_write = parts.method == http::Method::PATCH
                && parts.uri.path().starts_with("/api/v1/nodes/")
                && !parts.uri.path().ends_with("/status");
            let escaped = REFUSED_KEY.replace('/', "~1");
            let text = String::from_utf8_lossy(&bytes);
            if node_write && (text.contains(REFUSED_KEY) || text.contains(&escaped)) {
                refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "code": 422, "reason": "Invalid",
                    "message": format!("Node \"x\" is invalid: metadata.labels: Invalid value: \"{REFUSED_KEY}\": refused by policy")});
                let body = http_body_util::Full::new(bytes::Bytes::from(status.to_string()))
                    .boxed_unsync();
                return Ok(http::Response::builder()
                    .status(422)
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap_or_default());
            }
            let req = http::Request::from_parts(parts, kube::client::Body::from(bytes.to_vec()));
            tower::Service::call(&mut inner, req).await
        })
    }
}

#[tokio::test]
async fn a_node_write_the_api_server_refuses_is_reported_and_not_retried_hot() {
    let api = EmbeddedApi::new();
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let client = Client::new(
        Refusing {
            inner: api.service(),
            refused: refused.clone(),
        },
        "default",
    );
    let (synced_tx, _synced_rx) = tokio::sync::watch::channel(false);
    let mut harness = harness(
        Harness::builder()
            .with_api(api)
            .without_kubelet()
            .client(Role::NodeController, client),
        synced_tx,
    )
    .await;
    let plain = harness.client.clone();
    let cloud = harness.cloud.clone();
    raw_class(
        &plain,
        "refused",
        json!({"provider": {"type": "simulated"}, "labels": {REFUSED_KEY: "a"}}),
    )
    .await;
    node(&plain, "n-refused", "refused").await;
    harness.start_controllers();

    let nodes: Api<Node> = Api::all(plain.clone());
    let (_, reason, message) = eventually("the Node says the API server refused it", || {
        let nodes = nodes.clone();
        async move {
            let c = machine_ready(&nodes.get("n-refused").await.ok()?)?;
            c.2.contains("refused by policy").then_some(c)
        }
    })
    .await;
    assert!(message.starts_with("Invalid:"), "{message}");
    assert!(message.contains("metadata.labels"), "{message}");
    assert_eq!(reason, "Pending");
    let api_classes = classes(&plain);
    eventually("the NodeClass says its labels were refused", || {
        let api = api_classes.clone();
        async move {
            let c = ready_condition(&api.get("refused").await.ok()?)?;
            (c.0 == "False" && c.1 == "NodeWriteRefused" && c.2.contains("refused by policy"))
                .then_some(())
        }
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(plain.clone());
    eventually("a Warning event about the Node", || {
        let events = events.clone();
        async move {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.type_.as_deref() == Some("Warning")
                        && e.reason.as_deref() == Some("Invalid")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("n-refused")
                })
                .then_some(())
        }
    })
    .await;

    // Not retried hot: over the next two seconds the refused write is not tried again, and
    // the machine is created once (idempotently, by the Node's UID).
    let before = refused.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = refused.load(std::sync::atomic::Ordering::SeqCst);
    assert!(before <= 3, "{before} refused writes before settling");
    assert_eq!(after, before, "the refused write was retried");
    assert_eq!(cloud.machine_count(), 1);

    // A changed input is tried again: fixed labels let the Node get its machine.
    let mut fixed = api_classes.get("refused").await.expect("class");
    fixed.data["spec"]["labels"] = json!({"example.com/pool": "a"});
    api_classes
        .replace("refused", &PostParams::default(), &fixed)
        .await
        .expect("fixed");
    eventually("the Node gets its machine once the input changed", || {
        let nodes = nodes.clone();
        async move {
            let n = nodes.get("n-refused").await.ok()?;
            n.spec.as_ref()?.provider_id.as_ref()?;
            Some(())
        }
    })
    .await;
    assert_eq!(cloud.machine_count(), 1, "no duplicate machine");
    harness.shutdown().await.expect("controllers stop cleanly");
}
