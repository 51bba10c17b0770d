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
    let mut kn = KubeNode::spawn(env.dir.path(), RunOptions::new(&env, "e2e-create"));
    kn.wait_ready().await;
    kn.wait_leading(Duration::from_secs(60)).await;
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
    let mut kn = KubeNode::spawn(env.dir.path(), RunOptions::new(&env, "e2e-drain"));
    kn.wait_ready().await;
    kn.wait_leading(Duration::from_secs(60)).await;

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
    let mut kn = KubeNode::spawn(env.dir.path(), RunOptions::new(&env, "e2e-scale"));
    kn.wait_ready().await;
    kn.wait_leading(Duration::from_secs(60)).await;
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
    let mut kn = KubeNode::spawn(env.dir.path(), RunOptions::new(&env, "e2e-cascade"));
    kn.wait_ready().await;
    kn.wait_leading(Duration::from_secs(60)).await;
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
    let class: NodeClass = serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": class_name, "labels": {SUITE_LABEL: "true"}},
        "spec": {
            "provider": {"type": "exec", "exec": {
                "command": ["python3", repo_root().join("examples/exec-provider/machines.py")],
                "timeout": "30s",
                "config": {"stateDir": state, "zone": "lab-a"}
            }},
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"}
        }
    }))
    .expect("NodeClass");
    apply_class(&client, &class).await;
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
    let mut kn = KubeNode::spawn(env.dir.path(), opts);
    kn.wait_ready().await;
    kn.wait_leading(Duration::from_secs(60)).await;
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
