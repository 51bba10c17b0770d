//! The end-to-end suite: runs against the real cluster named by `KUBE_NODE_E2E_KUBECONFIG`
//! and says clearly that it skipped when that is unset.
//!
//! Every scenario installs the CRDs, starts its own `kube-node run` child process(es) (built by
//! the suite with `cargo build -p kube-node --bin kube-node`; killed on drop), uses object
//! names unique to the run, labels what it creates `e2e.kube-node.io/suite`, and removes it
//! again. Scenarios hold a file lock, so they run one at a time even under nextest (each test a
//! process): two controller processes on one cluster would both act on the same Nodes.
//!
//! Version-agnostic: only GA APIs (core/v1, coordination/v1, policy/v1, rbac/v1,
//! authorization/v1, apiextensions/v1) and the server's own Table rendering for `kubectl get`.

#[path = "e2e/support.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::runtime::watcher::{self, Event};
use kube::{ResourceExt, runtime::WatchStreamExt};
use kube_node_crds::{NodeClass, NodeSet, names};
use serde_json::json;
use support::*;

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const GONE_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn crds_install_and_the_api_server_rejects_invalid_objects_naming_the_field() {
    let Some(env) = setup("invalid").await else {
        return;
    };
    let client = env.client.clone();
    let template = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"nodeClassName": "x"}});
    let bad_sets = [
        (
            json!({"replicas": 1, "minSize": 5, "maxSize": 2,
            "selector": {"matchLabels": {"a": "b"}}, "template": template}),
            "spec.minSize",
        ),
        (
            json!({"replicas": -1,
            "selector": {"matchLabels": {"a": "b"}}, "template": template}),
            "spec.replicas",
        ),
        (
            json!({"replicas": 1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "c"}}, "spec": {"nodeClassName": "x"}}}),
            "spec.template.metadata.labels",
        ),
        (
            json!({"replicas": 1,
            "selector": {"matchLabels": {"a": "b"}},
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {}}}),
            "nodeClassName",
        ),
        (
            json!({"replicas": 1, "selector": {"matchLabels": {}}, "template": template}),
            "spec.selector",
        ),
        (
            json!({"replicas": 1, "selector": {"matchLabels": {"a": "b"}}, "template": template,
            "deletePolicy": "Sideways"}),
            "spec.deletePolicy",
        ),
    ];
    let sets: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<NodeSet>(&()),
    );
    for (i, (spec, field)) in bad_sets.into_iter().enumerate() {
        let obj: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
            "metadata": {"name": format!("e2e-invalid-{i}-{}", env.id), "labels": {SUITE_LABEL: "true"}},
            "spec": spec}))
        .expect("object");
        let err = sets
            .create(&PostParams::default(), &obj)
            .await
            .expect_err("rejected");
        assert!(
            matches!(&err, kube::Error::Api(e) if e.code == 422),
            "422 Invalid: {err}"
        );
        assert!(
            err.to_string().contains(field),
            "error names {field}: {err}"
        );
    }
    let bad_classes = [
        (
            json!({"provider": {"type": "nosuchcloud"}}),
            "spec.provider.type",
        ),
        (json!({"provider": {"type": "exec"}}), "spec.provider.exec"),
        (
            json!({"provider": {"type": "simulated", "aws": {"region": "x", "instanceType": "y"}}}),
            "spec.provider.aws",
        ),
        (
            json!({"provider": {"type": "exec", "exec": {"command": ["true"],
                "env": [{"name": "A", "value": "v", "secretKey": "k"}]}}}),
            "spec.provider.exec.env",
        ),
    ];
    let classes: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<NodeClass>(&()),
    );
    for (i, (spec, field)) in bad_classes.into_iter().enumerate() {
        let obj: kube::api::DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
            "metadata": {"name": format!("e2e-invalid-{i}-{}", env.id), "labels": {SUITE_LABEL: "true"}},
            "spec": spec}))
        .expect("object");
        let err = classes
            .create(&PostParams::default(), &obj)
            .await
            .expect_err("rejected");
        assert!(
            err.to_string().contains(field),
            "error names {field}: {err}"
        );
    }
    // A valid NodeSet is accepted, and the /scale subresource is wired to spec.replicas.
    let name = env.name("e2e-valid");
    let ok: NodeSet = serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": name, "labels": {SUITE_LABEL: "true"}},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"a": "b"}}, "template": template}}))
    .expect("NodeSet");
    let api: Api<NodeSet> = Api::all(client.clone());
    api.create(&PostParams::default(), &ok)
        .await
        .expect("valid NodeSet accepted");
    let scale = api.get_scale(&name).await.expect("scale subresource");
    // `replicas: 0` is omitted on the wire.
    assert_eq!(scale.spec.and_then(|s| s.replicas).unwrap_or(0), 0);
    api.delete(&name, &DeleteParams::default())
        .await
        .expect("deleted");
    env.finish().await;
}

/// Every manifest of the table in `crds/tests/data/manifests.yaml` (the same table the unit
/// tests run through the schema and the controllers' decoder): each invalid one is refused by
/// the real API server with 422 naming its field; each valid one is accepted.
#[tokio::test]
async fn the_api_server_rejects_every_invalid_manifest_of_the_table_naming_its_field() {
    let Some(env) = setup("table").await else {
        return;
    };
    let table: serde_json::Value =
        serde_yaml::from_str(include_str!("../../crds/tests/data/manifests.yaml"))
            .expect("manifests.yaml");
    let api_for = |kind: &str| -> Api<kube::api::DynamicObject> {
        let ar = if kind == "NodeClass" {
            kube::api::ApiResource::erase::<NodeClass>(&())
        } else {
            kube::api::ApiResource::erase::<NodeSet>(&())
        };
        Api::all_with(env.client.clone(), &ar)
    };
    let named = |object: &serde_json::Value| -> kube::api::DynamicObject {
        let mut object = object.clone();
        let name = format!(
            "{}-{}",
            object["metadata"]["name"].as_str().unwrap_or("x"),
            env.id
        );
        object["metadata"] = json!({"name": name, "labels": {SUITE_LABEL: "true"}});
        serde_json::from_value(object).expect("object")
    };
    let mut failures = Vec::new();
    let cases = table["invalid"].as_array().expect("invalid cases");
    for case in cases {
        let field = case["field"].as_str().expect("field");
        let object = &case["object"];
        let api = api_for(object["kind"].as_str().expect("kind"));
        match api.create(&PostParams::default(), &named(object)).await {
            Ok(created) => {
                failures.push(format!("{}: accepted", case["case"]));
                let _ = api
                    .delete(&created.name_any(), &DeleteParams::default())
                    .await;
            }
            Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains(field) => {
                eprintln!("{}: {}", case["case"], e.message);
            }
            Err(e) => failures.push(format!(
                "{}: expected 422 naming {field}: {e}",
                case["case"]
            )),
        }
    }
    for object in table["valid"].as_array().expect("valid") {
        let api = api_for(object["kind"].as_str().expect("kind"));
        let obj = named(object);
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => {
                let _ = api.delete(&obj.name_any(), &DeleteParams::default()).await;
            }
            Err(e) => failures.push(format!("{}: refused: {e}", obj.name_any())),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    eprintln!(
        "{} invalid manifests rejected naming their field",
        cases.len()
    );
    env.finish().await;
}

#[tokio::test]
async fn a_node_that_names_a_node_class_is_accepted_by_a_real_api_server() {
    let Some(env) = setup("shape").await else {
        return;
    };
    // The request shape a user writes (examples/node.yaml) is a valid core Node on a real
    // server. No kube-node runs here (the suite lock), so nothing acts on it.
    let nodes: Api<Node> = Api::all(env.client.clone());
    let mut node: Node =
        serde_yaml::from_str(include_str!("../../examples/node.yaml")).expect("example");
    let name = env.name("e2e-shape");
    node.metadata.name = Some(name.clone());
    node.labels_mut().insert(SUITE_LABEL.into(), "true".into());
    let created = nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("created");
    assert!(
        created
            .annotations()
            .contains_key(names::NODE_CLASS_ANNOTATION)
    );
    delete_node_and_wait(&env.client, &name, GONE_TIMEOUT).await;
    env.finish().await;
}

/// Bootstrap-token Secrets created in kube-system while it runs (an independent watch).
struct TokenWatch {
    seen: Arc<Mutex<Vec<Secret>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenWatch {
    async fn start(client: &kube::Client) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let api: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
        let cfg = watcher::Config::default().fields("type=bootstrap.kubernetes.io/token");
        let s = seen.clone();
        let task = tokio::spawn(async move {
            let mut synced = Some(synced_tx);
            let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(Event::InitDone) => {
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Apply(secret)) => {
                        if let Ok(mut v) = s.lock() {
                            v.push(secret);
                        }
                    }
                    _ => {}
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), synced_rx)
            .await
            .expect("token watch synced in time")
            .expect("token watch running");
        Self { seen, task }
    }

    fn for_uid(&self, uid: &str) -> Vec<Secret> {
        self.seen
            .lock()
            .map(|v| {
                v.iter()
                    .filter(|s| {
                        s.labels().get(names::tags::NODE_UID).map(String::as_str) == Some(uid)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TokenWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The create-node scenario, with `kube_node` already leading: a Node naming a simulated
/// NodeClass becomes Ready with the class's labels and taints and without the unregistered
/// taint; deleting it removes machine, bootstrap token and finalizer.
async fn create_node_scenario(env: &Env, kube_node: &mut KubeNode, prefix: &str) {
    let client = &env.client;
    let class_name = env.name(&format!("{prefix}-class"));
    let node_name = env.name(prefix);
    apply_class(
        client,
        &simulated_class(
            &class_name,
            json!({"taints": [{"key": "e2e.kube-node.io/dedicated", "value": "e2e", "effect": "NoSchedule"}]}),
        ),
    )
    .await;
    let tokens = TokenWatch::start(client).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let created = nodes
        .create(
            &PostParams::default(),
            &node_request(&node_name, &class_name),
        )
        .await
        .expect("Node created");
    let uid = created.uid().expect("uid");

    let start = tokio::time::Instant::now();
    let node = loop {
        kube_node.assert_running();
        let n = nodes.get(&node_name).await.expect("Node");
        if is_ready(&n)
            && node_condition(&n, names::MACHINE_READY_CONDITION).is_some_and(|(s, _)| s == "True")
        {
            break n;
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "Node {node_name} not Ready within {READY_TIMEOUT:?}: status {:?}\n{}",
            n.status.as_ref().and_then(|s| s.conditions.clone()),
            forbidden_lines(kube_node)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        node.labels().get("e2e.kube-node.io/class"),
        Some(&class_name),
        "NodeClass labels applied"
    );
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    assert!(
        !taints.iter().any(|t| t.key == names::UNREGISTERED_TAINT),
        "unregistered taint removed: {taints:?}"
    );
    assert!(
        taints
            .iter()
            .any(|t| t.key == "e2e.kube-node.io/dedicated" && t.effect == "NoSchedule"),
        "NodeClass taint applied: {taints:?}"
    );
    let provider_id = node
        .spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .unwrap_or_default();
    assert!(
        provider_id.starts_with("simulated:///"),
        "providerID {provider_id}"
    );
    assert_eq!(
        node_condition(&node, names::MACHINE_READY_CONDITION).map(|(_, r)| r),
        Some(Some("Ready".to_string())),
        "MachineReady reason"
    );
    assert!(
        node.finalizers()
            .contains(&names::MACHINE_FINALIZER.to_string()),
        "finalizer while the machine exists"
    );
    // What `kubectl get node` shows: the server's Table says Ready.
    let row = table_row(client, "/api/v1/nodes", &node_name).await;
    assert!(
        row.get("Status")
            .and_then(|s| s.as_str())
            .is_some_and(|s| s.split(',').any(|p| p == "Ready")),
        "kubectl get node shows Ready: {row:?}"
    );
    // A real bootstrap token was made for this Node while it was provisioned.
    let made = tokens.for_uid(&uid);
    assert!(
        !made.is_empty(),
        "a bootstrap-token Secret labelled for the Node was created"
    );
    for s in &made {
        assert_eq!(s.type_.as_deref(), Some("bootstrap.kubernetes.io/token"));
        assert!(
            s.name_any().starts_with("bootstrap-token-"),
            "{}",
            s.name_any()
        );
    }
    assert!(
        kube_node
            .metric_with(
                "kube_node_provider_requests_total",
                &["provider=\"simulated\"", "method=\"create\""]
            )
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "the provider's create was called (metrics)"
    );

    // Delete: the Node goes once the machine is gone, and the token with it.
    delete_node_and_wait(client, &node_name, GONE_TIMEOUT).await;
    assert!(
        kube_node
            .metric_with(
                "kube_node_provider_requests_total",
                &["provider=\"simulated\"", "method=\"delete\""]
            )
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "the machine was deleted before the Node went"
    );
    let left = token_secrets(client, &uid).await;
    assert!(
        left.is_empty(),
        "bootstrap tokens gone: {:?}",
        left.iter().map(|s| s.name_any()).collect::<Vec<_>>()
    );
    let events: Vec<String> = events_about(client, &node_name)
        .await
        .into_iter()
        .map(|(_, r, _)| r)
        .collect();
    assert!(
        events.iter().any(|r| r == "MachineDeleted"),
        "MachineDeleted event: {events:?}"
    );
    delete_class_and_wait(client, &class_name).await;
}

/// Lines of a process's output that mention a forbidden (403) call.
fn forbidden_lines(kube_node: &KubeNode) -> String {
    let out = kube_node.output();
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("forbidden") || l.contains("403"))
        .collect();
    if lines.is_empty() {
        String::new()
    } else {
        format!(
            "forbidden calls of kube-node:\n{}",
            lines[lines.len().saturating_sub(10)..].join("\n")
        )
    }
}

#[tokio::test]
async fn a_node_naming_a_class_becomes_ready_and_deleting_it_removes_machine_token_and_finalizer() {
    let Some(env) = setup("create").await else {
        return;
    };
    let mut kn = spawn_leader(&env, RunOptions::new(&env, "e2e-create")).await;
    create_node_scenario(&env, &mut kn, "e2e-create").await;
    drop(kn);
    env.finish().await;
}

fn pod(name: &str, node: &str, app: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app, SUITE_LABEL: "true"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 5,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]
        }
    }))
    .expect("Pod")
}

#[tokio::test]
async fn deleting_a_node_evicts_its_pods_and_a_pdb_blocks_only_until_the_drain_timeout() {
    let Some(env) = setup("drain").await else {
        return;
    };
    let client = env.client.clone();
    let kn = spawn_leader(&env, RunOptions::new(&env, "e2e-drain")).await;

    let class_name = env.name("e2e-drain-class");
    let node_name = env.name("e2e-drain");
    apply_class(
        &client,
        &simulated_class(&class_name, json!({"timeouts": {"drain": "5s"}})),
    )
    .await;
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &node_request(&node_name, &class_name),
        )
        .await
        .expect("Node created");
    eventually("Node Ready", READY_TIMEOUT, || {
        let nodes = nodes.clone();
        let name = node_name.clone();
        async move { nodes.get(&name).await.is_ok_and(|n| is_ready(&n)) }
    })
    .await;

    // Two pods bound to the Node: one guarded by a PDB that allows no disruption.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.namespace);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &env.namespace);
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "guarded"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}}
    }))
    .expect("PDB");
    pdbs.create(&PostParams::default(), &pdb)
        .await
        .expect("PDB created");
    // A fresh namespace admits pods once its default ServiceAccount exists.
    for (name, app) in [("guarded", "guarded"), ("free", "free")] {
        let p = pod(name, &node_name, app);
        eventually(
            &format!("pod {name} admitted"),
            Duration::from_secs(60),
            || {
                let (pods, p) = (pods.clone(), p.clone());
                async move { pods.create(&PostParams::default(), &p).await.is_ok() }
            },
        )
        .await;
    }
    // The simulated kubelet runs pods bound to its Nodes.
    eventually("both pods Running", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move {
            let Ok(list) = pods.list(&ListParams::default()).await else {
                return false;
            };
            list.items.len() == 2
                && list
                    .items
                    .iter()
                    .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        }
    })
    .await;
    // The disruption controller (kube-controller-manager) has seen the guarded pod.
    eventually(
        "the PDB allows no disruption",
        Duration::from_secs(60),
        || {
            let pdbs = pdbs.clone();
            async move {
                pdbs.get("guarded").await.is_ok_and(|p| {
                    p.status
                        .as_ref()
                        .is_some_and(|s| s.current_healthy == 1 && s.disruptions_allowed == 0)
                })
            }
        },
    )
    .await;

    nodes
        .delete(&node_name, &DeleteParams::default())
        .await
        .expect("Node deleted");
    // The free pod is evicted, and the simulated kubelet finishes its deletion.
    eventually(
        "the free pod evicted and gone",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move { matches!(pods.get_opt("free").await, Ok(None)) }
        },
    )
    .await;
    eventually("Node gone after the drain timeout", GONE_TIMEOUT, || {
        let nodes = nodes.clone();
        let name = node_name.clone();
        async move { matches!(nodes.get_opt(&name).await, Ok(None)) }
    })
    .await;
    let events = events_about(&client, &node_name).await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "DrainTimeout"),
        "DrainTimeout warning: {events:?}"
    );
    // The PDB held: the guarded pod was never evicted (it outlives its Node until pod GC).
    let guarded = pods.get_opt("guarded").await.expect("get pod");
    assert!(
        guarded.is_some_and(|p| p.metadata.deletion_timestamp.is_none()),
        "the PDB-guarded pod was not evicted"
    );
    let _ = pods
        .delete("guarded", &DeleteParams::default().grace_period(0))
        .await;
    delete_class_and_wait(&client, &class_name).await;
    drop(kn);
    env.finish().await;
}

/// An independent watch of a NodeSet's Nodes that records any instant at which more Nodes
/// exist than the current bound.
struct CountWatch {
    state: Arc<Mutex<CountState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct CountState {
    nodes: HashSet<String>,
    init: HashSet<String>,
    bound: usize,
    violations: Vec<String>,
    max_seen: usize,
}

impl CountWatch {
    async fn start(client: &kube::Client, selector: &str) -> Self {
        let state = Arc::new(Mutex::new(CountState::default()));
        let api: Api<Node> = Api::all(client.clone());
        let cfg = watcher::Config::default().labels(selector);
        let s = state.clone();
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut synced = Some(synced_tx);
            let mut stream = watcher::watcher(api, cfg).default_backoff().boxed();
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let Ok(mut st) = s.lock() else { return };
                match ev {
                    Event::Init => st.init.clear(),
                    Event::InitApply(n) => {
                        st.init.insert(n.name_any());
                    }
                    Event::InitDone => {
                        st.nodes = std::mem::take(&mut st.init);
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                    }
                    Event::Apply(n) => {
                        st.nodes.insert(n.name_any());
                    }
                    Event::Delete(n) => {
                        st.nodes.remove(&n.name_any());
                    }
                }
                let count = st.nodes.len();
                st.max_seen = st.max_seen.max(count);
                if count > st.bound {
                    let msg = format!("{count} Nodes while the bound was {}", st.bound);
                    st.violations.push(msg);
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(30), synced_rx)
            .await
            .expect("Node watch synced in time")
            .expect("Node watch running");
        Self { state, task }
    }

    fn set_bound(&self, bound: usize) {
        if let Ok(mut st) = self.state.lock() {
            st.bound = bound;
        }
    }

    fn count(&self) -> usize {
        self.state
            .lock()
            .map(|s| s.nodes.len())
            .unwrap_or(usize::MAX)
    }

    fn violations(&self) -> Vec<String> {
        self.state
            .lock()
            .map(|s| s.violations.clone())
            .unwrap_or_default()
    }
}

impl Drop for CountWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn nodeset(name: &str, class: &str, replicas: i32) -> NodeSet {
    serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": name, "labels": {SUITE_LABEL: "true"}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"e2e.kube-node.io/set": name}},
            "template": {
                "metadata": {"labels": {"e2e.kube-node.io/set": name, SUITE_LABEL: "true"}},
                "spec": {"nodeClassName": class}
            }
        }
    }))
    .expect("NodeSet")
}

/// `kubectl scale nodeset NAME --replicas=N`: a merge patch of the /scale subresource.
async fn scale(client: &kube::Client, name: &str, replicas: i32) {
    Api::<NodeSet>::all(client.clone())
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .expect("scale patched");
}

async fn set_nodes(client: &kube::Client, set: &str) -> Vec<Node> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("e2e.kube-node.io/set={set}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

/// Waits until the NodeSet has exactly `n` Nodes, all Ready, and says so in its status.
async fn wait_converged(client: &kube::Client, kn: &mut KubeNode, set: &str, n: usize) {
    let api: Api<NodeSet> = Api::all(client.clone());
    let start = tokio::time::Instant::now();
    loop {
        kn.assert_running();
        let nodes = set_nodes(client, set).await;
        let ns = api.get(set).await.expect("NodeSet");
        let status = ns.status.clone().unwrap_or_default();
        let want = i32::try_from(n).unwrap_or(i32::MAX);
        if nodes.len() == n
            && nodes.iter().all(is_ready)
            && status.ready_replicas == want
            && status.replicas == want
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "NodeSet {set} did not converge to {n} within 180s: {} Nodes ({} Ready), status {:?}",
            nodes.len(),
            nodes.iter().filter(|n| is_ready(n)).count(),
            serde_json::to_string(&ns.status)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn a_node_set_scales_0_10_3_0_through_the_scale_subresource_and_never_overshoots() {
    let Some(env) = setup("scale").await else {
        return;
    };
    let client = env.client.clone();
    let mut kn = spawn_leader(&env, RunOptions::new(&env, "e2e-scale")).await;
    let class_name = env.name("e2e-scale-class");
    apply_class(&client, &simulated_class(&class_name, json!({}))).await;
    let set = env.name("e2e-scale");
    let watch = CountWatch::start(&client, &format!("e2e.kube-node.io/set={set}")).await;
    let api: Api<NodeSet> = Api::all(client.clone());
    api.create(&PostParams::default(), &nodeset(&set, &class_name, 0))
        .await
        .expect("NodeSet created");

    let mut current = 0usize;
    for target in [10usize, 3, 0] {
        watch.set_bound(current.max(target));
        scale(&client, &set, i32::try_from(target).expect("small")).await;
        wait_converged(&client, &mut kn, &set, target).await;
        eventually("the watch sees the target", Duration::from_secs(30), || {
            let c = watch.count();
            async move { c == target }
        })
        .await;
        // `kubectl get nodeset`: the server evaluates the printer columns.
        let row = table_row(&client, "/apis/kube-node.io/v1alpha1/nodesets", &set).await;
        let want = i64::try_from(target).expect("small");
        assert_eq!(
            row.get("Desired").and_then(|v| v.as_i64()),
            Some(want),
            "{row:?}"
        );
        if target > 0 {
            assert_eq!(
                row.get("Current").and_then(|v| v.as_i64()),
                Some(want),
                "{row:?}"
            );
            assert_eq!(
                row.get("Ready").and_then(|v| v.as_i64()),
                Some(want),
                "{row:?}"
            );
        }
        let scale = api.get_scale(&set).await.expect("scale");
        assert_eq!(
            scale.spec.and_then(|s| s.replicas).unwrap_or(0),
            i32::try_from(target).expect("small")
        );
        current = target;
    }
    assert!(
        watch.violations().is_empty(),
        "never more Nodes than max(old, new) replicas: {:?}",
        watch.violations()
    );
    let max_seen = watch.state.lock().map(|s| s.max_seen).unwrap_or_default();
    assert_eq!(max_seen, 10, "the watch saw the scale-up");
    api.delete(&set, &DeleteParams::default())
        .await
        .expect("NodeSet deleted");
    eventually("NodeSet gone", GONE_TIMEOUT, || {
        let api = api.clone();
        let set = set.clone();
        async move { matches!(api.get_opt(&set).await, Ok(None)) }
    })
    .await;
    delete_class_and_wait(&client, &class_name).await;
    drop(kn);
    env.finish().await;
}

#[tokio::test]
async fn deleting_a_node_set_cascades_through_the_garbage_collector_and_orphan_keeps_the_nodes() {
    let Some(env) = setup("cascade").await else {
        return;
    };
    let client = env.client.clone();
    let mut kn = spawn_leader(&env, RunOptions::new(&env, "e2e-cascade")).await;
    let class_name = env.name("e2e-cascade-class");
    apply_class(&client, &simulated_class(&class_name, json!({}))).await;
    let api: Api<NodeSet> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client.clone());

    // Background deletion: kube-controller-manager's garbage collector deletes the Nodes, and
    // kube-node deletes their machines.
    let cascade = env.name("e2e-cascade");
    api.create(&PostParams::default(), &nodeset(&cascade, &class_name, 2))
        .await
        .expect("NodeSet created");
    wait_converged(&client, &mut kn, &cascade, 2).await;
    let owned = set_nodes(&client, &cascade).await;
    let set_uid = api
        .get(&cascade)
        .await
        .expect("NodeSet")
        .uid()
        .expect("uid");
    for n in &owned {
        assert!(
            n.owner_references()
                .iter()
                .any(|o| o.uid == set_uid && o.controller == Some(true)),
            "Node {} is owned by its NodeSet",
            n.name_any()
        );
    }
    api.delete(&cascade, &DeleteParams::background())
        .await
        .expect("NodeSet deleted");
    eventually(
        "the garbage collector deleted the Nodes",
        GONE_TIMEOUT,
        || {
            let client = client.clone();
            let cascade = cascade.clone();
            async move { set_nodes(&client, &cascade).await.is_empty() }
        },
    )
    .await;

    // Orphan: the NodeSet goes, its Nodes stay (and lose the owner reference).
    let orphan = env.name("e2e-orphan");
    api.create(&PostParams::default(), &nodeset(&orphan, &class_name, 2))
        .await
        .expect("NodeSet created");
    wait_converged(&client, &mut kn, &orphan, 2).await;
    let kept: BTreeSet<String> = set_nodes(&client, &orphan)
        .await
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let dp = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Orphan),
        ..DeleteParams::default()
    };
    api.delete(&orphan, &dp).await.expect("NodeSet deleted");
    eventually("the orphaned NodeSet gone", GONE_TIMEOUT, || {
        let api = api.clone();
        let orphan = orphan.clone();
        async move { matches!(api.get_opt(&orphan).await, Ok(None)) }
    })
    .await;
    eventually(
        "the orphaned Nodes released by the garbage collector",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let orphan = orphan.clone();
            async move {
                let left = set_nodes(&client, &orphan).await;
                left.len() == 2 && left.iter().all(|n| n.owner_references().is_empty())
            }
        },
    )
    .await;
    for n in set_nodes(&client, &orphan).await {
        assert!(kept.contains(&n.name_any()));
        assert!(n.metadata.deletion_timestamp.is_none(), "orphans are kept");
        assert!(is_ready(&n), "orphans stay Ready");
    }
    for name in &kept {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    for name in &kept {
        delete_node_and_wait(&client, name, GONE_TIMEOUT).await;
    }
    delete_class_and_wait(&client, &class_name).await;
    drop(kn);
    env.finish().await;
}

/// The machines the reference exec program keeps (`<stateDir>/machines/*.json`), not being
/// deleted.
fn exec_machines(state_dir: &std::path::Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("machines")) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| std::fs::read(p).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|m| m["deleteRequestedUnix"].is_null())
        .collect()
}

async fn lease_holder(client: &kube::Client, ns: &str, name: &str) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}

/// Exactly one machine per Node of the set, keyed by the Node's UID, and every Node has one.
async fn machines_match_nodes(
    client: &kube::Client,
    set: &str,
    state: &std::path::Path,
    n: usize,
) -> bool {
    let nodes = set_nodes(client, set).await;
    let machines = exec_machines(state);
    let uids: BTreeSet<String> = nodes.iter().filter_map(|n| n.uid()).collect();
    let keys: Vec<String> = machines
        .iter()
        .map(|m| m["idempotencyKey"].as_str().unwrap_or_default().to_string())
        .collect();
    let distinct: BTreeSet<String> = keys.iter().cloned().collect();
    nodes.len() == n
        && machines.len() == n
        && distinct.len() == n
        && distinct == uids
        && nodes.iter().all(|n| {
            n.spec
                .as_ref()
                .and_then(|s| s.provider_id.as_deref())
                .is_some_and(|p| p.starts_with("exec:///"))
        })
}

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_is_killed_and_no_machine_is_duplicated() {
    let Some(env) = setup("leader").await else {
        return;
    };
    let client = env.client.clone();
    let state = env.dir.path().join("exec-state");
    std::fs::create_dir_all(&state).expect("state dir");
    let lease = "kube-node-e2e";
    let mut procs: BTreeMap<String, KubeNode> = BTreeMap::new();
    for identity in ["e2e-replica-a", "e2e-replica-b"] {
        let mut opts = RunOptions::new(&env, identity);
        opts.extra = ["--lease-duration", "6s", "--lease-renew-interval", "2s"]
            .map(String::from)
            .to_vec();
        let mut kn = KubeNode::spawn(env.dir.path(), opts);
        kn.wait_ready().await;
        procs.insert(identity.to_string(), kn);
    }
    // Exactly one leads: the Lease names it, and only its gauge is 1.
    let holder = Arc::new(Mutex::new(String::new()));
    eventually(
        "a Lease holder that says it leads",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let ns = env.namespace.clone();
            let procs = &procs;
            let holder = holder.clone();
            async move {
                let Some(h) = lease_holder(&client, &ns, lease).await else {
                    return false;
                };
                let Some(p) = procs.get(&h) else {
                    return false;
                };
                let leads = p.metric("kube_node_leader").await == Some(1.0);
                if let Ok(mut l) = holder.lock() {
                    *l = h;
                }
                leads
            }
        },
    )
    .await;
    let leader = holder.lock().map(|l| l.clone()).expect("leader");
    let standby = procs
        .keys()
        .find(|k| **k != leader)
        .cloned()
        .expect("standby");
    assert_eq!(
        procs[&standby].metric("kube_node_leader").await,
        Some(0.0),
        "the standby does not lead"
    );

    let class_name = env.name("e2e-leader-class");
    apply_class(&client, &exec_class(&class_name, &state)).await;
    let set = env.name("e2e-leader");
    let api: Api<NodeSet> = Api::all(client.clone());
    api.create(&PostParams::default(), &nodeset(&set, &class_name, 3))
        .await
        .expect("NodeSet created");
    eventually(
        "3 Nodes with one exec machine each",
        Duration::from_secs(120),
        || machines_match_nodes(&client, &set, &state, 3),
    )
    .await;
    let standby_calls = procs[&standby]
        .metric("kube_node_provider_requests_total")
        .await
        .unwrap_or(0.0);
    assert_eq!(standby_calls, 0.0, "the standby made no provider calls");

    // kill -9 the leader: the standby takes the Lease once it expires.
    procs.get_mut(&leader).expect("leader").kill();
    eventually("the standby holds the Lease", Duration::from_secs(60), || {
        let client = client.clone();
        let ns = env.namespace.clone();
        let standby = standby.clone();
        async move { lease_holder(&client, &ns, lease).await.as_deref() == Some(standby.as_str()) }
    })
    .await;
    procs
        .get_mut(&standby)
        .expect("standby")
        .wait_leading(Duration::from_secs(30))
        .await;

    scale(&client, &set, 5).await;
    eventually(
        "5 Nodes with one exec machine each",
        Duration::from_secs(120),
        || machines_match_nodes(&client, &set, &state, 5),
    )
    .await;
    // Stays so: a second look after the new leader's next passes finds no extra machine.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            machines_match_nodes(&client, &set, &state, 5).await,
            "exactly 5 machines, one per Node UID: {:?}",
            exec_machines(&state)
                .iter()
                .map(|m| m["idempotencyKey"].clone())
                .collect::<Vec<_>>()
        );
    }

    api.delete(&set, &DeleteParams::default())
        .await
        .expect("NodeSet deleted");
    eventually("the set's Nodes gone", GONE_TIMEOUT, || {
        let client = client.clone();
        let set = set.clone();
        async move { set_nodes(&client, &set).await.is_empty() }
    })
    .await;
    assert!(exec_machines(&state).is_empty(), "every machine deleted");
    delete_class_and_wait(&client, &class_name).await;
    drop(procs);
    env.finish().await;
}

/// Runs the reference exec program once, as kube-node does (`python3 machines.py <operation>`,
/// the request on stdin), and returns its successful response.
fn machines_py(request: serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let op = request["operation"]
        .as_str()
        .expect("request names its operation")
        .to_string();
    let mut child = Command::new("python3")
        .arg(repo_root().join(MACHINES_PY))
        .arg(&op)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.to_string().as_bytes())
        .expect("request written");
    let out = child.wait_with_output().expect("machines.py finished");
    let response: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "machines.py {op}: no JSON response ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && response.get("error").is_none(),
        "machines.py {op}: {response}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    response
}

/// A machine made straight in the exec program's state, tagged like kube-node's machines for
/// `cluster` and `class`, for a Node UID that no Node has. Returns its provider ID and creation
/// time (Unix seconds).
fn create_orphan(state: &std::path::Path, cluster: &str, class: &str, name: &str) -> (String, i64) {
    let uid = format!("{name}-uid");
    let response = machines_py(json!({
        "protocolVersion": "v1", "operation": "create",
        "clusterName": cluster, "nodeClass": class,
        "config": {"stateDir": state, "zone": "lab-a"},
        "idempotencyKey": uid, "nodeName": name,
        "tags": {
            names::tags::CLUSTER: cluster,
            names::tags::NODE_CLASS: class,
            names::tags::NODE_UID: uid,
            names::tags::NODE_NAME: name,
            names::tags::MANAGED_BY: names::tags::MANAGED_BY_VALUE,
        },
    }));
    let instance = &response["instance"];
    (
        instance["providerId"]
            .as_str()
            .expect("providerId")
            .to_string(),
        instance["createdUnix"].as_i64().expect("createdUnix"),
    )
}

/// Deletes a machine straight in the exec program's state.
fn delete_machine(state: &std::path::Path, cluster: &str, class: &str, provider_id: &str) {
    machines_py(json!({
        "protocolVersion": "v1", "operation": "delete",
        "clusterName": cluster, "nodeClass": class,
        "config": {"stateDir": state, "zone": "lab-a"},
        "providerId": provider_id,
    }));
}

/// The provider IDs of the live exec machines.
fn exec_provider_ids(state: &std::path::Path) -> BTreeSet<String> {
    exec_machines(state)
        .iter()
        .filter_map(|m| m["providerId"].as_str().map(String::from))
        .collect()
}

/// The live exec machines made for a Node UID (its idempotency key).
fn exec_machines_of(state: &std::path::Path, uid: &str) -> Vec<serde_json::Value> {
    exec_machines(state)
        .into_iter()
        .filter(|m| m["idempotencyKey"].as_str() == Some(uid))
        .collect()
}

fn node_provider_id(node: &Node) -> Option<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.provider_id.clone())
        .filter(|p| !p.is_empty())
}

/// Waits until the Node satisfies `pred`; the timeout message shows its status.
async fn wait_node(
    nodes: &Api<Node>,
    kn: &mut KubeNode,
    name: &str,
    what: &str,
    pred: impl Fn(&Node) -> bool,
) -> Node {
    let start = tokio::time::Instant::now();
    loop {
        kn.assert_running();
        let n = nodes.get(name).await.expect("Node");
        if pred(&n) {
            return n;
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "Node {name}: not {what} within {READY_TIMEOUT:?}: providerID {:?}, status {:?}",
            node_provider_id(&n),
            n.status.as_ref().and_then(|s| s.conditions.clone())
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Removes the bootstrap tokens left for a Node UID. A token made by a process that was then
/// killed is known to no later process; it would expire and kube-controller-manager's token
/// cleaner remove it, but the suite leaves nothing behind.
async fn remove_tokens(client: &kube::Client, uid: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), "kube-system");
    for s in token_secrets(client, uid).await {
        let _ = api.delete(&s.name_any(), &DeleteParams::default()).await;
    }
}

#[tokio::test]
async fn a_restart_between_the_create_and_the_provider_id_write_leaves_exactly_one_machine() {
    let Some(env) = setup("restart").await else {
        return;
    };
    let client = env.client.clone();
    let state = env.dir.path().join("exec-state");
    let hold = state.join("inject").join("create-hold");
    std::fs::create_dir_all(hold.parent().expect("inject dir")).expect("state dir");
    // A short Lease, so the second process (a new pod, a new identity) takes over soon.
    let opts = |identity: &str| {
        let mut o = RunOptions::new(&env, identity);
        o.extra = ["--lease-duration", "6s", "--lease-renew-interval", "2s"]
            .map(String::from)
            .to_vec();
        o
    };
    let mut first = spawn_leader(&env, opts("e2e-restart-1")).await;
    let class_name = env.name("e2e-restart-class");
    apply_class(&client, &exec_class(&class_name, &state)).await;

    // machines.py saves the new machine, then answers only once this file is gone: the
    // create is in flight, the machine exists, the providerID is not written yet.
    std::fs::write(&hold, b"").expect("hold file");
    let node_name = env.name("e2e-restart");
    let nodes: Api<Node> = Api::all(client.clone());
    let uid = nodes
        .create(
            &PostParams::default(),
            &node_request(&node_name, &class_name),
        )
        .await
        .expect("Node created")
        .uid()
        .expect("uid");
    eventually(
        "the machine saved while its create is held",
        Duration::from_secs(60),
        || {
            let saved = exec_machines_of(&state, &uid).len();
            async move { saved == 1 }
        },
    )
    .await;
    first.assert_running();
    first.kill();
    let node = nodes.get(&node_name).await.expect("Node");
    assert_eq!(
        node_provider_id(&node),
        None,
        "kube-node died before its create was answered, so before the providerID write"
    );
    // The killed process's create call still waits; let it finish (its answer goes nowhere).
    std::fs::remove_file(&hold).expect("hold released");

    let mut second = spawn_leader(&env, opts("e2e-restart-2")).await;
    let node = wait_node(&nodes, &mut second, &node_name, "given a providerID", |n| {
        node_provider_id(n).is_some()
    })
    .await;
    let machines = exec_machines_of(&state, &uid);
    assert_eq!(
        machines.len(),
        1,
        "exactly one machine for the Node's UID: {machines:?}"
    );
    assert_eq!(
        node_provider_id(&node).as_deref(),
        machines[0]["providerId"].as_str(),
        "the Node names the machine made before the restart"
    );
    assert_eq!(
        exec_provider_ids(&state).len(),
        1,
        "no other machine was made"
    );

    delete_node_and_wait(&client, &node_name, GONE_TIMEOUT).await;
    assert!(
        exec_machines_of(&state, &uid).is_empty(),
        "the machine is deleted with its Node"
    );
    assert!(exec_provider_ids(&state).is_empty(), "no machine left");
    remove_tokens(&client, &uid).await;
    delete_class_and_wait(&client, &class_name).await;
    drop(second);
    drop(first);
    env.finish().await;
}

/// Provider calls of a backend and method, whatever their result.
async fn provider_calls(kn: &KubeNode, provider: &str, method: &str) -> f64 {
    kn.metric_with(
        "kube_node_provider_requests_total",
        &[
            &format!("provider=\"{provider}\""),
            &format!("method=\"{method}\""),
        ],
    )
    .await
    .unwrap_or(0.0)
}

/// Successful provider list calls of a backend: one per orphan-collector wave and NodeClass.
async fn list_calls(kn: &KubeNode, provider: &str) -> f64 {
    kn.metric_with(
        "kube_node_provider_requests_total",
        &[
            &format!("provider=\"{provider}\""),
            "method=\"list\"",
            "result=\"Ok\"",
        ],
    )
    .await
    .unwrap_or(0.0)
}

/// Waits until the orphan collector has finished a whole wave that started after this call:
/// the list counted next may have begun earlier, the one after it did not, and a third list
/// starts only once that wave's decisions are carried out.
async fn wait_collector_waves(kn: &mut KubeNode, provider: &str) {
    let before = list_calls(kn, provider).await;
    let start = tokio::time::Instant::now();
    while list_calls(kn, provider).await < before + 3.0 {
        kn.assert_running();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the orphan collector made no 3 list calls within 60s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

#[tokio::test]
async fn the_orphan_collector_spares_young_and_owned_machines_deletes_old_orphans_and_pauses_when_too_many()
 {
    let Some(env) = setup("orphans").await else {
        return;
    };
    let client = env.client.clone();
    let state = env.dir.path().join("exec-state");
    std::fs::create_dir_all(&state).expect("state dir");
    let cluster = env.name("e2e");
    let class_name = env.name("e2e-orphans-class");
    let nodes: Api<Node> = Api::all(client.clone());

    // First run: a minimum age of ten minutes, so every machine made during it is young.
    let mut opts = RunOptions::new(&env, "e2e-orphans-young");
    opts.extra = ["--orphan-min-age", "10m"].map(String::from).to_vec();
    let mut young_run = spawn_leader(&env, opts).await;
    apply_class(&client, &exec_class(&class_name, &state)).await;
    let node_name = env.name("e2e-orphans");
    let uid = nodes
        .create(
            &PostParams::default(),
            &node_request(&node_name, &class_name),
        )
        .await
        .expect("Node created")
        .uid()
        .expect("uid");
    let node = wait_node(&nodes, &mut young_run, &node_name, "given a machine", |n| {
        node_provider_id(n).is_some()
    })
    .await;
    let owned = node_provider_id(&node).expect("providerID");
    assert_eq!(exec_machines_of(&state, &uid).len(), 1);

    let (young, _) = create_orphan(&state, &cluster, &class_name, &env.name("e2e-orphan-a"));
    wait_collector_waves(&mut young_run, "exec").await;
    assert_eq!(
        exec_provider_ids(&state),
        BTreeSet::from([owned.clone(), young.clone()]),
        "a young orphan (and the Node's machine) survive a whole collector wave"
    );
    assert_eq!(
        young_run
            .metric_with("kube_node_orphan_gc_actions_total", &["action=\"deleted\""])
            .await
            .unwrap_or(0.0),
        0.0,
        "nothing collected"
    );
    young_run.kill();

    // Two more orphans while no kube-node runs: with the first one, 3 of the class's 4
    // machines have no Node — more than the default 20% at once.
    let (second, _) = create_orphan(&state, &cluster, &class_name, &env.name("e2e-orphan-b"));
    let (third, created) = create_orphan(&state, &cluster, &class_name, &env.name("e2e-orphan-c"));
    // The next run's minimum age is 1s: once every orphan is older than that, its first wave
    // already sees all three.
    while now_unix() < created + 2 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut opts = RunOptions::new(&env, "e2e-orphans-old");
    opts.lease_name = "kube-node-e2e-old".into();
    opts.extra = ["--orphan-min-age", "1s"].map(String::from).to_vec();
    let old_run = spawn_leader(&env, opts).await;

    // The circuit breaker: nothing is deleted, a Warning on the NodeClass says why.
    let paused = Arc::new(Mutex::new(Vec::new()));
    eventually(
        "the orphan collection paused, with a Warning on the NodeClass",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            let class_name = class_name.clone();
            let paused = paused.clone();
            let run = &old_run;
            async move {
                let warnings: Vec<String> = events_about(&client, &class_name)
                    .await
                    .into_iter()
                    .filter(|(t, r, _)| t == "Warning" && r == "OrphanCollectionPaused")
                    .map(|(_, _, m)| m)
                    .collect();
                let open = run.metric("kube_node_orphan_gc_circuit_open").await == Some(1.0);
                let found = !warnings.is_empty() && open;
                if let Ok(mut p) = paused.lock() {
                    *p = warnings;
                }
                found
            }
        },
    )
    .await;
    let warnings = paused.lock().map(|p| p.clone()).unwrap_or_default();
    assert!(
        warnings
            .iter()
            .any(|m| m.contains("3 of 4 machines have no Node")),
        "the Warning counts the orphans: {warnings:?}"
    );
    assert_eq!(
        exec_provider_ids(&state),
        BTreeSet::from([owned.clone(), young.clone(), second.clone(), third.clone()]),
        "the breaker deleted nothing"
    );
    assert!(
        old_run
            .metric_with("kube_node_orphan_gc_actions_total", &["action=\"paused\""])
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "a paused wave is counted"
    );
    assert_eq!(
        old_run
            .metric_with("kube_node_orphan_gc_actions_total", &["action=\"deleted\""])
            .await
            .unwrap_or(0.0),
        0.0,
        "nothing collected while paused"
    );

    // Someone removes two of them by hand: the one orphan left, now old, is collected; the
    // Node's machine is not.
    delete_machine(&state, &cluster, &class_name, &second);
    delete_machine(&state, &cluster, &class_name, &third);
    eventually("the old orphan collected", Duration::from_secs(60), || {
        let gone = !exec_provider_ids(&state).contains(&young);
        async move { gone }
    })
    .await;
    assert_eq!(
        exec_provider_ids(&state),
        BTreeSet::from([owned.clone()]),
        "only the Node's machine is left"
    );
    let node = nodes.get(&node_name).await.expect("Node");
    assert_eq!(node_provider_id(&node), Some(owned.clone()));
    assert!(node.metadata.deletion_timestamp.is_none(), "the Node stays");
    // The event is written after the provider's delete returned: wait for it too.
    eventually(
        "an OrphanDeleted event naming the machine",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let (class_name, young) = (class_name.clone(), young.clone());
            async move {
                events_about(&client, &class_name)
                    .await
                    .iter()
                    .any(|(t, r, m)| t == "Normal" && r == "OrphanDeleted" && m.contains(&young))
            }
        },
    )
    .await;
    assert!(
        old_run
            .metric_with("kube_node_orphan_gc_actions_total", &["action=\"deleted\""])
            .await
            .unwrap_or(0.0)
            >= 1.0,
        "the deletion is counted"
    );
    eventually(
        "the circuit breaker closed",
        Duration::from_secs(30),
        || {
            let run = &old_run;
            async move { run.metric("kube_node_orphan_gc_circuit_open").await == Some(0.0) }
        },
    )
    .await;

    delete_node_and_wait(&client, &node_name, GONE_TIMEOUT).await;
    assert!(exec_provider_ids(&state).is_empty(), "no machine left");
    delete_class_and_wait(&client, &class_name).await;
    drop(old_run);
    drop(young_run);
    env.finish().await;
}

#[tokio::test]
async fn a_machine_that_never_registers_fails_at_the_registration_timeout_and_is_kept() {
    let Some(env) = setup("registration").await else {
        return;
    };
    let client = env.client.clone();
    let mut kn = spawn_leader(&env, RunOptions::new(&env, "e2e-registration")).await;
    let class_name = env.name("e2e-registration-class");
    apply_class(
        &client,
        &simulated_class(
            &class_name,
            json!({"provider": {"simulated": {"register": false}},
                   "timeouts": {"registration": "5s"}}),
        ),
    )
    .await;
    let node_name = env.name("e2e-registration");
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(
            &PostParams::default(),
            &node_request(&node_name, &class_name),
        )
        .await
        .expect("Node created");
    let node = wait_node(&nodes, &mut kn, &node_name, "Failed", |n| {
        node_condition(n, names::MACHINE_READY_CONDITION)
            == Some(("False".to_string(), Some("Failed".to_string())))
    })
    .await;
    assert!(!is_ready(&node), "no kubelet reported Ready");
    // Ready=Unknown from kube-node, not no Ready at all: kube-controller-manager 1.28 panics
    // on a Node it queues for a NoExecute taint without one (kubernetes/kubernetes#117555).
    assert_eq!(
        node_condition(&node, "Ready"),
        Some((
            "Unknown".to_string(),
            Some(names::KUBELET_NOT_STARTED_REASON.to_string())
        )),
        "a Node waiting for its kubelet has Ready=Unknown"
    );
    let message = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == names::MACHINE_READY_CONDITION)
        })
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("did not report Ready within 5s"),
        "the condition says why: {message}"
    );
    eventually(
        "a RegistrationTimeout Warning on the Node",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let node_name = node_name.clone();
            async move {
                events_about(&client, &node_name)
                    .await
                    .iter()
                    .any(|(t, r, _)| t == "Warning" && r == "RegistrationTimeout")
            }
        },
    )
    .await;

    // Kept for inspection: neither the Node controller nor the orphan collector deletes the
    // machine of a Failed Node, however many passes go by.
    wait_collector_waves(&mut kn, "simulated").await;
    let node = nodes.get(&node_name).await.expect("Node");
    let provider_id = node_provider_id(&node).unwrap_or_default();
    assert!(
        provider_id.starts_with("simulated:///"),
        "the Node keeps its machine: providerID {provider_id:?}"
    );
    assert!(node.metadata.deletion_timestamp.is_none(), "the Node stays");
    assert_eq!(
        node_condition(&node, names::MACHINE_READY_CONDITION),
        Some(("False".to_string(), Some("Failed".to_string()))),
        "Failed sticks"
    );
    assert_eq!(
        provider_calls(&kn, "simulated", "delete").await,
        0.0,
        "no machine was deleted"
    );

    delete_node_and_wait(&client, &node_name, GONE_TIMEOUT).await;
    assert!(
        provider_calls(&kn, "simulated", "delete").await >= 1.0,
        "deleting the Node deleted the machine"
    );
    let events: Vec<String> = events_about(&client, &node_name)
        .await
        .into_iter()
        .map(|(_, r, _)| r)
        .collect();
    assert!(
        events.iter().any(|r| r == "MachineDeleted"),
        "MachineDeleted event: {events:?}"
    );
    delete_class_and_wait(&client, &class_name).await;
    drop(kn);
    env.finish().await;
}

const SA_USER: &str = "system:serviceaccount:kube-node-system:kube-node";

/// `kubectl auth can-i VERB RESOURCE[/SUB] [-n NS] [NAME] --as=<the ServiceAccount>`.
async fn can_i(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(SA_USER.into()),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                "system:serviceaccounts:kube-node-system".into(),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: namespace.map(String::from),
                name: name.map(String::from),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

type Check = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

async fn check_all(client: &kube::Client, checks: &[Check], want: bool) -> Vec<String> {
    let mut wrong = Vec::new();
    for (verb, group, resource, ns, name) in checks {
        if can_i(client, verb, group, resource, *ns, *name).await != want {
            wrong.push(format!(
                "{} {verb} {group}/{resource} ns={ns:?} name={name:?}",
                if want { "CANNOT" } else { "CAN" }
            ));
        }
    }
    wrong
}

/// What the controllers call (see rbac.yaml's comments and the code). Events: kube-runtime's
/// recorder writes events.k8s.io/v1 only.
const NEEDED: &[Check] = &[
    ("get", "", "nodes", None, None),
    ("list", "", "nodes", None, None),
    ("watch", "", "nodes", None, None),
    ("create", "", "nodes", None, None),
    ("patch", "", "nodes", None, None),
    ("delete", "", "nodes", None, None),
    ("patch", "", "nodes/status", None, None),
    ("list", "kube-node.io", "nodeclasses", None, None),
    ("watch", "kube-node.io", "nodeclasses", None, None),
    // The in-use finalizer.
    ("patch", "kube-node.io", "nodeclasses", None, None),
    ("patch", "kube-node.io", "nodeclasses/status", None, None),
    ("get", "kube-node.io", "nodesets", None, None),
    ("list", "kube-node.io", "nodesets", None, None),
    ("watch", "kube-node.io", "nodesets", None, None),
    ("patch", "kube-node.io", "nodesets", None, None),
    ("update", "kube-node.io", "nodesets", None, None),
    ("patch", "kube-node.io", "nodesets/status", None, None),
    ("patch", "kube-node.io", "nodesets/scale", None, None),
    // For OwnerReferencesPermissionEnforcement: Nodes are created with blockOwnerDeletion.
    ("update", "kube-node.io", "nodesets/finalizers", None, None),
    ("list", "", "pods", None, None),
    ("create", "", "pods/eviction", Some("default"), None),
    ("create", "events.k8s.io", "events", Some("default"), None),
    ("create", "", "secrets", Some("kube-system"), None),
    (
        "delete",
        "",
        "secrets",
        Some("kube-system"),
        Some("bootstrap-token-abcdef"),
    ),
    (
        "get",
        "",
        "configmaps",
        Some("kube-system"),
        Some("kube-root-ca.crt"),
    ),
    (
        "get",
        "",
        "secrets",
        Some("kube-node-system"),
        Some("credentials"),
    ),
    // The bootstrap token key, made on first use.
    ("create", "", "secrets", Some("kube-node-system"), None),
    (
        "get",
        "coordination.k8s.io",
        "leases",
        Some("kube-node-system"),
        None,
    ),
    (
        "create",
        "coordination.k8s.io",
        "leases",
        Some("kube-node-system"),
        None,
    ),
    (
        "update",
        "coordination.k8s.io",
        "leases",
        Some("kube-node-system"),
        None,
    ),
];

/// What it must never be able to do (with rbac.yaml alone).
const FORBIDDEN: &[Check] = &[
    (
        "get",
        "",
        "secrets",
        Some("kube-system"),
        Some("bootstrap-token-abcdef"),
    ),
    ("list", "", "secrets", Some("kube-system"), None),
    ("watch", "", "secrets", Some("kube-system"), None),
    ("get", "", "secrets", Some("default"), None),
    ("list", "", "secrets", Some("default"), None),
    ("create", "", "secrets", Some("default"), None),
    ("list", "", "secrets", None, None),
    (
        "get",
        "",
        "configmaps",
        Some("kube-system"),
        Some("extension-apiserver-authentication"),
    ),
    ("delete", "", "pods", Some("default"), None),
    ("update", "", "nodes", None, None),
    ("deletecollection", "", "nodes", None, None),
    ("update", "", "nodes/status", None, None),
    ("create", "", "pods", Some("default"), None),
    ("create", "", "namespaces", None, None),
    (
        "update",
        "coordination.k8s.io",
        "leases",
        Some("kube-node-lease"),
        None,
    ),
    (
        "update",
        "coordination.k8s.io",
        "leases",
        Some("kube-system"),
        None,
    ),
    (
        "create",
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        None,
        None,
    ),
    (
        "escalate",
        "rbac.authorization.k8s.io",
        "clusterroles",
        None,
        None,
    ),
    ("impersonate", "", "serviceaccounts", None, None),
    (
        "create",
        "",
        "serviceaccounts/token",
        Some("kube-node-system"),
        None,
    ),
    ("delete", "kube-node.io", "nodeclasses", None, None),
    (
        "create",
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        None,
        None,
    ),
    ("*", "*", "*", None, None),
    ("*", "*", "*", Some("kube-node-system"), None),
];

/// What the simulated kubelet adds (rbac-simulated-kubelet.yaml).
const KUBELET_NEEDED: &[Check] = &[
    (
        "create",
        "coordination.k8s.io",
        "leases",
        Some("kube-node-lease"),
        None,
    ),
    (
        "patch",
        "coordination.k8s.io",
        "leases",
        Some("kube-node-lease"),
        None,
    ),
    ("watch", "", "pods", None, None),
    ("delete", "", "pods", Some("default"), None),
    ("patch", "", "pods/status", Some("default"), None),
];

/// The install's namespaces, ServiceAccount and RBAC, applied as `kubectl apply -f` would.
async fn install_rbac(client: &kube::Client, with_kubelet: bool) -> Vec<Applied> {
    let root = repo_root().join("deploy");
    let mut applied = Vec::new();
    for file in ["namespace.yaml", "serviceaccount.yaml", "rbac.yaml"]
        .into_iter()
        .chain(with_kubelet.then_some("rbac-simulated-kubelet.yaml"))
    {
        let yaml = std::fs::read_to_string(root.join(file)).expect("deploy file");
        applied.extend(apply_yaml(client, &yaml).await);
    }
    applied
}

#[tokio::test]
async fn the_service_account_can_do_exactly_what_the_controllers_need() {
    let Some(env) = setup("rbac").await else {
        return;
    };
    let client = env.client.clone();
    create_namespace(&client, "kube-node-lease").await;
    // The simulated kubelet's grants may be installed already (an earlier run): remove them.
    let kubelet_yaml =
        std::fs::read_to_string(repo_root().join("deploy/rbac-simulated-kubelet.yaml"))
            .expect("deploy file");
    for a in apply_yaml(&client, &kubelet_yaml).await {
        a.delete(&client).await;
    }
    let applied = install_rbac(&client, false).await;
    // RBAC is evaluated from the authorizer's cache: wait until the bindings are in effect.
    eventually("the RBAC in effect", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            can_i(&client, "patch", "", "nodes", None, None).await
                && !can_i(&client, "watch", "", "pods", None, None).await
        }
    })
    .await;
    let mut wrong = check_all(&client, NEEDED, true).await;
    wrong.extend(check_all(&client, FORBIDDEN, false).await);
    // Without the simulated kubelet's file, no pod deletion, no Node Leases.
    wrong.extend(check_all(&client, KUBELET_NEEDED, false).await);

    let more = install_rbac(&client, true).await;
    eventually(
        "the simulated kubelet's RBAC in effect",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            async move { can_i(&client, "watch", "", "pods", None, None).await }
        },
    )
    .await;
    wrong.extend(check_all(&client, KUBELET_NEEDED, true).await);
    let still_forbidden: Vec<Check> = FORBIDDEN
        .iter()
        .filter(|(v, _, r, _, _)| !(*v == "delete" && *r == "pods"))
        .copied()
        .collect();
    wrong.extend(check_all(&client, &still_forbidden, false).await);
    for a in applied
        .iter()
        .chain(&more)
        .filter(|a| a.resource.kind != "Namespace")
    {
        a.delete(&client).await;
    }
    assert!(
        wrong.is_empty(),
        "RBAC differs from what the code needs:\n{}",
        wrong.join("\n")
    );
    env.finish().await;
}

/// A kubeconfig like `admin`'s, but authenticating as the ServiceAccount with a token from the
/// TokenRequest API.
async fn service_account_kubeconfig(env: &Env) -> std::path::PathBuf {
    let sa: Api<ServiceAccount> = Api::namespaced(env.client.clone(), "kube-node-system");
    let request =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .expect("TokenRequest");
    let token = sa
        .create_token_request("kube-node", &PostParams::default(), &request)
        .await
        .expect("TokenRequest")
        .status
        .expect("token")
        .token;
    let admin = std::fs::read_to_string(&env.kubeconfig).expect("kubeconfig");
    let mut cfg: serde_yaml::Value = serde_yaml::from_str(&admin).expect("kubeconfig YAML");
    if let Some(users) = cfg.get_mut("users").and_then(|u| u.as_sequence_mut()) {
        for u in users {
            u["user"] = serde_yaml::to_value(json!({"token": token})).expect("user");
        }
    }
    let path = env.dir.path().join("kube-node-sa.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&cfg).expect("YAML")).expect("write kubeconfig");
    path
}

#[tokio::test]
async fn kube_node_running_as_its_service_account_provisions_and_deletes_a_node() {
    let Some(env) = setup("as-sa").await else {
        return;
    };
    let client = env.client.clone();
    create_namespace(&client, "kube-node-lease").await;
    let applied = install_rbac(&client, true).await;
    eventually("the RBAC in effect", Duration::from_secs(30), || {
        let client = client.clone();
        async move { can_i(&client, "watch", "", "pods", None, None).await }
    })
    .await;
    let kubeconfig = service_account_kubeconfig(&env).await;
    let mut opts = RunOptions::new(&env, "e2e-as-sa");
    opts.kubeconfig = kubeconfig;
    // Its Role allows Leases only in its own namespace.
    opts.lease_namespace = "kube-node-system".into();
    opts.lease_name = env.name("kube-node-e2e");
    let mut kn = spawn_leader(&env, opts).await;
    create_node_scenario(&env, &mut kn, "e2e-as-sa").await;
    let forbidden = forbidden_lines(&kn);
    drop(kn);
    let _ = Api::<Lease>::namespaced(client.clone(), "kube-node-system")
        .delete(&env.name("kube-node-e2e"), &DeleteParams::default())
        .await;
    for a in applied.iter().filter(|a| a.resource.kind != "Namespace") {
        a.delete(&client).await;
    }
    assert!(forbidden.is_empty(), "{forbidden}");
    env.finish().await;
}

/// Issue #18 on a real API server: a NodeSet whose machines never register backs off instead
/// of launching a machine per registration timeout per replica. The durations scaled
/// down tenfold: registration 20 s → 2 s, backoff base 30 s → 3 s, 10 minutes → 60 s.
#[tokio::test]
async fn a_node_set_whose_machines_never_register_backs_off_exponentially() {
    let Some(env) = setup("backoff").await else {
        return;
    };
    let client = env.client.clone();
    let mut kn = spawn_leader(&env, RunOptions::new(&env, "e2e-backoff")).await;
    let class_name = env.name("e2e-backoff-class");
    apply_class(
        &client,
        &simulated_class(
            &class_name,
            json!({"provider": {"simulated": {"register": false}},
                   "timeouts": {"registration": "2s"}}),
        ),
    )
    .await;
    let set = env.name("e2e-backoff");
    let mut ns = nodeset(&set, &class_name, 3);
    ns.spec.max_unhealthy =
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("100%".into()));
    ns.spec.replacement_backoff = Some(kube_node_crds::v1alpha1::ReplacementBackoff {
        base: Some("3s".parse().expect("duration")),
        max: Some("180s".parse().expect("duration")),
    });
    let api: Api<NodeSet> = Api::all(client.clone());
    api.create(&PostParams::default(), &ns)
        .await
        .expect("NodeSet created");

    let window = Duration::from_secs(60);
    let start = tokio::time::Instant::now();
    while start.elapsed() < window {
        kn.assert_running();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Launches are the Nodes the NodeSet created (one machine each), not provider create
    // calls: a pass that repeats the idempotent create of a machine launches nothing.
    let launches = kn
        .metric_with("kube_node_nodeset_node_creates_total", &[])
        .await
        .unwrap_or(0.0);
    let create_calls = provider_calls(&kn, "simulated", "create").await;
    // replicas + log2(T / base + 1) + 1
    let bound = 3.0 + (60.0f64 / 3.0 + 1.0).log2().floor() + 1.0;
    println!(
        "launches in 60s (10 minutes scaled 1:10): {launches} ({create_calls} provider create calls); bound {bound}; without backoff about 90"
    );
    assert!(
        launches <= bound,
        "{launches} launches in 60s, more than {bound}"
    );

    let got = api.get(&set).await.expect("NodeSet");
    let status = got.status.clone().unwrap_or_default();
    let b = status.backoff.clone().expect("status.backoff");
    assert!(b.consecutive_failures >= 3, "{b:?}");
    assert_eq!(
        b.last_failure_reason.as_deref(),
        Some("RegistrationTimeout")
    );
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == names::BACKOFF_CONDITION)
        .expect("Backoff condition");
    assert_eq!(c.status, "True", "{c:?}");
    assert!(c.message.contains("next attempt at"), "{}", c.message);
    let backoff_seconds = kn
        .metric_with(
            "kube_node_nodeset_backoff_seconds",
            &[&format!("nodeset=\"{set}\"")],
        )
        .await
        .unwrap_or(0.0);
    assert!(backoff_seconds >= 12.0, "the gauge: {backoff_seconds}");
    let events = events_about(&client, &set).await;
    assert!(
        events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == names::BACKOFF_EVENT_REASON),
        "a ReplacementBackoff Warning: {events:?}"
    );
    // `kubectl get nodeset` shows it.
    let row = table_row(&client, "/apis/kube-node.io/v1alpha1/nodesets", &set).await;
    assert_eq!(
        row.get("Failures").and_then(|v| v.as_i64()),
        Some(i64::from(b.consecutive_failures)),
        "{row:?}"
    );

    api.delete(&set, &DeleteParams::default())
        .await
        .expect("NodeSet deleted");
    eventually("NodeSet gone", GONE_TIMEOUT, || {
        let api = api.clone();
        let set = set.clone();
        async move { matches!(api.get_opt(&set).await, Ok(None)) }
    })
    .await;
    eventually("its Nodes gone", GONE_TIMEOUT, || {
        let client = client.clone();
        let set = set.clone();
        async move { set_nodes(&client, &set).await.is_empty() }
    })
    .await;
    delete_class_and_wait(&client, &class_name).await;
    drop(kn);
    env.finish().await;
}

/// Runs a shell command line in the repository root with the scenario's kubeconfig, as a user
/// would type it; panics with its output when it fails.
fn sh(env: &Env, line: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(repo_root())
        .env("KUBECONFIG", &env.kubeconfig)
        .env("PATH", {
            // `kube-node` on the PATH, as after `cargo install` (the README uses `cargo run`),
            // under that name even when KUBE_NODE_E2E_BIN names a file called otherwise.
            let dir = env.dir.path().join("bin");
            let link = dir.join("kube-node");
            if !link.exists() {
                std::fs::create_dir_all(&dir).expect("bin dir");
                std::os::unix::fs::symlink(kube_node_bin(), &link).expect("kube-node link");
            }
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::join_paths(std::iter::once(dir).chain(std::env::split_paths(&path)))
                .expect("PATH")
        })
        .output()
        .expect("sh runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "`{line}` failed:\n{text}");
    text
}

/// The README's quick start on a cluster, exactly as spelled there: `kube-node crds | kubectl
/// apply -f -` then `kube-node run` with nothing but KUBECONFIG, on a cluster where nothing
/// created kube-node-system (the Lease's default namespace) — then the README's "Using it on a
/// cluster" steps: the simulated NodeClass and one Node, which becomes Ready and goes again.
#[tokio::test]
async fn the_readme_quick_start_works_on_a_fresh_cluster() {
    let Some(env) = setup("quickstart").await else {
        return;
    };
    let client = env.client.clone();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    // Fresh as far as kube-node is concerned: no kube-node-system.
    if namespaces
        .get_opt("kube-node-system")
        .await
        .expect("get namespace")
        .is_some()
    {
        let _ = namespaces
            .delete("kube-node-system", &DeleteParams::default())
            .await;
        eventually("kube-node-system gone", Duration::from_secs(120), || {
            let namespaces = namespaces.clone();
            async move { matches!(namespaces.get_opt("kube-node-system").await, Ok(None)) }
        })
        .await;
    }

    sh(&env, "kube-node crds | kubectl apply -f -");
    // `kube-node run`, no flags: the metrics port comes from the environment only so that it
    // does not collide with other processes on this machine.
    let port = free_port();
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let log = env.dir.path().join("kube-node-quickstart.log");
    let out = std::fs::File::create(&log).expect("log");
    let child = std::process::Command::new(kube_node_bin())
        .arg("run")
        .env("KUBECONFIG", &env.kubeconfig)
        .env("KUBE_NODE_METRICS_ADDR", metrics.to_string())
        .env_remove("POD_NAMESPACE")
        .env_remove("POD_NAME")
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .expect("kube-node run starts");
    let mut kn = KubeNode::adopt("quickstart", metrics, log, child);
    kn.wait_ready().await;
    kn.wait_leading(Duration::from_secs(60)).await;
    assert!(
        kn.output()
            .contains("created the namespace of the leader Lease"),
        "{}",
        kn.tail(40)
    );
    assert!(
        lease_holder(&client, "kube-node-system", "kube-node")
            .await
            .is_some(),
        "the Lease is held"
    );

    sh(&env, "kubectl apply -f examples/nodeclass-simulated.yaml");
    sh(&env, "kubectl create -f examples/node.yaml");
    let nodes: Api<Node> = Api::all(client.clone());
    eventually("worker-1 Ready", READY_TIMEOUT, || {
        let nodes = nodes.clone();
        async move {
            nodes
                .get_opt("worker-1")
                .await
                .ok()
                .flatten()
                .is_some_and(|n| is_ready(&n))
        }
    })
    .await;
    sh(&env, "kubectl delete node worker-1 --wait=false");
    eventually("worker-1 gone", GONE_TIMEOUT, || {
        let nodes = nodes.clone();
        async move { matches!(nodes.get_opt("worker-1").await, Ok(None)) }
    })
    .await;
    // The in-use protection lets the class go once its Node is gone.
    sh(&env, "kubectl delete nodeclass simulated --wait=false");
    let classes: Api<NodeClass> = Api::all(client.clone());
    eventually("NodeClass simulated gone", GONE_TIMEOUT, || {
        let classes = classes.clone();
        async move { matches!(classes.get_opt("simulated").await, Ok(None)) }
    })
    .await;
    let output = kn.output();
    assert!(!output.contains("cannot lead"), "{}", kn.tail(40));
    assert!(!output.contains('\u{1b}'), "no colour codes in a log file");
    kn.kill();
    env.finish().await;
}

/// A 10-Node NodeSet rolls to a new image (maxSurge 2, maxUnavailable 0) under a Deployment
/// the real scheduler spread over it, protected by a PodDisruptionBudget (minAvailable 9):
/// the Deployment's available pods never fall below the PDB's minimum, and the NodeSet never
/// has more than 12 Nodes. Needs a cluster started with `--scheduler`.
#[tokio::test]
async fn a_ten_node_rollout_keeps_a_pdb_protected_workload_available() {
    use k8s_openapi::api::apps::v1::Deployment;
    let Some(env) = setup("rollout").await else {
        return;
    };
    let client = env.client.clone();
    let kn = spawn_leader(&env, RunOptions::new(&env, "e2e-rollout")).await;
    let class_name = env.name("e2e-rollout-class");
    let set_name = env.name("e2e-rollout");
    apply_class(
        &client,
        &simulated_class(
            &class_name,
            json!({"provider": {"simulated": {"image": "os-v1"}}, "timeouts": {"drain": "300s"}}),
        ),
    )
    .await;
    let set: NodeSet = serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": set_name, "labels": {SUITE_LABEL: "true"}},
        "spec": {
            "replicas": 10,
            "selector": {"matchLabels": {"e2e.kube-node.io/pool": set_name}},
            "template": {
                "metadata": {"labels": {"e2e.kube-node.io/pool": set_name, SUITE_LABEL: "true"}},
                "spec": {"nodeClassName": class_name},
            },
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2, "maxUnavailable": 0}},
        },
    }))
    .expect("NodeSet");
    let sets: Api<NodeSet> = Api::all(client.clone());
    sets.create(&PostParams::default(), &set)
        .await
        .expect("NodeSet created");
    let nodes: Api<Node> = Api::all(client.clone());
    let pool = ListParams::default().labels(&format!("e2e.kube-node.io/pool={set_name}"));
    let list_pool = || {
        let (nodes, pool) = (nodes.clone(), pool.clone());
        async move { nodes.list(&pool).await.map(|l| l.items).unwrap_or_default() }
    };
    eventually("10 Ready Nodes", Duration::from_secs(180), || async {
        let ns = list_pool().await;
        ns.len() == 10 && ns.iter().all(is_ready)
    })
    .await;
    let before: HashSet<String> = list_pool().await.iter().map(|n| n.name_any()).collect();

    // The workload: 10 pods spread over the pool by the scheduler, at most one disruption.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &env.namespace);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {SUITE_LABEL: "true"}},
        "spec": {
            "replicas": 10,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web", SUITE_LABEL: "true"}},
                "spec": {
                    "nodeSelector": {"e2e.kube-node.io/pool": set_name},
                    "terminationGracePeriodSeconds": 1,
                    "topologySpreadConstraints": [{
                        "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                        "whenUnsatisfiable": "ScheduleAnyway",
                        "labelSelector": {"matchLabels": {"app": "web"}},
                    }],
                    "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}],
                },
            },
        },
    }))
    .expect("Deployment");
    eventually("Deployment admitted", Duration::from_secs(60), || {
        let (deployments, d) = (deployments.clone(), deployment.clone());
        async move { deployments.create(&PostParams::default(), &d).await.is_ok() }
    })
    .await;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &env.namespace);
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"minAvailable": 9, "selector": {"matchLabels": {"app": "web"}}}
    }))
    .expect("PDB");
    pdbs.create(&PostParams::default(), &pdb)
        .await
        .expect("PDB created");
    let available = || {
        let deployments = deployments.clone();
        async move {
            deployments
                .get("web")
                .await
                .ok()
                .and_then(|d| d.status)
                .and_then(|s| s.available_replicas)
                .unwrap_or(0)
        }
    };
    eventually(
        "10 web pods available",
        Duration::from_secs(120),
        || async { available().await == 10 },
    )
    .await;
    eventually(
        "the PDB allows one disruption",
        Duration::from_secs(60),
        || {
            let pdbs = pdbs.clone();
            async move {
                pdbs.get("web").await.is_ok_and(|p| {
                    p.status
                        .as_ref()
                        .is_some_and(|s| s.current_healthy == 10 && s.disruptions_allowed == 1)
                })
            }
        },
    )
    .await;

    // Watch the rollout: the fewest available pods, the most Nodes.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(Mutex::new((i32::MAX, 0usize)));
    let watcher = {
        let (stop, seen, deployments, nodes, pool) = (
            stop.clone(),
            seen.clone(),
            deployments.clone(),
            nodes.clone(),
            pool.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let avail = deployments
                    .get("web")
                    .await
                    .ok()
                    .and_then(|d| d.status)
                    .and_then(|s| s.available_replicas);
                let count = nodes.list(&pool).await.map(|l| l.items.len()).ok();
                if let Ok(mut s) = seen.lock() {
                    if let Some(a) = avail {
                        s.0 = s.0.min(a);
                    }
                    if let Some(c) = count {
                        s.1 = s.1.max(c);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let started = std::time::Instant::now();
    let classes: Api<NodeClass> = Api::all(client.clone());
    classes
        .patch(
            &class_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provider": {"simulated": {"image": "os-v2"}}}})),
        )
        .await
        .expect("new image");
    eventually(
        "every Node replaced and the NodeSet up to date",
        Duration::from_secs(600),
        || async {
            let ns = list_pool().await;
            let updated = sets
                .get(&set_name)
                .await
                .ok()
                .and_then(|s| s.status)
                .and_then(|s| s.updated_replicas);
            ns.len() == 10
                && ns.iter().all(is_ready)
                && ns.iter().all(|n| !before.contains(&n.name_any()))
                && updated == Some(10)
        },
    )
    .await;
    let took = started.elapsed();
    eventually(
        "10 web pods available again",
        Duration::from_secs(120),
        || async { available().await == 10 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = watcher.await;
    let (min_available, peak) = *seen.lock().expect("watch state");
    println!(
        "e2e rollout of 10 Nodes: {:.1}s, peak {peak} Nodes, at least {min_available} of 10 web pods available (PDB minAvailable 9)",
        took.as_secs_f64()
    );
    assert!(
        min_available >= 9,
        "{min_available} available pods, below the PDB minimum"
    );
    assert!(peak <= 12, "{peak} Nodes, above replicas + maxSurge");

    let _ = deployments.delete("web", &DeleteParams::default()).await;
    let _ = pdbs.delete("web", &DeleteParams::default()).await;
    let _ = sets.delete(&set_name, &DeleteParams::default()).await;
    eventually("the NodeSet's Nodes gone", GONE_TIMEOUT, || async {
        list_pool().await.is_empty()
    })
    .await;
    delete_class_and_wait(&client, &class_name).await;
    drop(kn);
    env.finish().await;
}
