//! Rolling replacement of drifted Nodes (issue #15), against the embedded API with the real
//! node-controller, nodeset-controller, simulated provider and simulated kubelet:
//!
//! - a NodeSet of 20 rolls to a new image with maxSurge 2 / maxUnavailable 0 while a workload
//!   protected by a PodDisruptionBudget that allows one eviction at a time keeps its pods;
//!   it prints the time to roll and the peak number of Nodes;
//! - a rollout whose new machines never register stops, and stays stopped across a restart
//!   of the controllers;
//! - a change of the template's labels and taints reaches every Node in place, replacing none.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_node::harness::Harness;
use kube_node_crds::names::{
    BUILD_HASH_ANNOTATION, DRIFTED_CONDITION, PROGRESSING_CONDITION, REPLACED_EVENT_REASON,
};
use kube_node_crds::v1alpha1::find_condition;
use kube_node_crds::{NodeClass, NodeSet};
use serde_json::json;

async fn harness() -> Harness {
    kube_node::harness::init_test_logging();
    Harness::builder()
        .node_config(node_controller::Config {
            cluster_name: "rollout".into(),
            api_server_endpoint: Some("rollout-apiserver:6443".into()),
            ..Default::default()
        })
        .start()
        .await
        .expect("harness")
}

fn class_spec(image: &str, register: bool) -> serde_json::Value {
    json!({
        "provider": {"type": "simulated", "simulated": {"image": image, "register": register}},
        "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
        "timeouts": {"registration": "3s", "drain": "60s"},
    })
}

fn nodeset(name: &str, replicas: i32, strategy: serde_json::Value) -> NodeSet {
    serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"pool": name}},
            "template": {"metadata": {"labels": {"pool": name}}, "spec": {"nodeClassName": "sim"}},
            "strategy": strategy,
            "replacementBackoff": {"base": "1s", "max": "2s"},
        },
    }))
    .expect("NodeSet fixture")
}

async fn set_image(client: &Client, image: &str, register: bool) {
    Api::<NodeClass>::all(client.clone())
        .patch(
            "sim",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provider": {"simulated": {"image": image, "register": register}}}})),
        )
        .await
        .expect("patch NodeClass");
}

async fn nodes(client: &Client, set: &str) -> Vec<Node> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&format!("pool={set}")))
        .await
        .expect("list Nodes")
        .items
}

fn ready(n: &Node) -> bool {
    n.metadata.deletion_timestamp.is_none()
        && n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn schedulable(n: &Node) -> bool {
    ready(n)
        && n.spec.as_ref().and_then(|s| s.unschedulable) != Some(true)
        && !n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.effect == "NoExecute"))
}

async fn eventually<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status_of(client: &Client, name: &str) -> NodeSet {
    Api::<NodeSet>::all(client.clone())
        .get(name)
        .await
        .expect("NodeSet")
}

fn progressing(ns: &NodeSet) -> Option<(String, String)> {
    let c = find_condition(&ns.status.as_ref()?.conditions, PROGRESSING_CONDITION)?;
    Some((c.status.clone(), c.reason.clone()))
}

/// A stand-in for a Deployment with its scheduler: keeps `replicas` pods labelled `app=web`,
/// each bound to the schedulable Node of the pool with the fewest of them.
async fn workload(client: Client, set: String, replicas: usize, stop: Arc<AtomicBool>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut serial = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let live: Vec<Pod> = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let targets: Vec<String> = nodes(&client, &set)
            .await
            .iter()
            .filter(|n| schedulable(n))
            .map(|n| n.name_any())
            .collect();
        let mut load: Vec<(usize, String)> = targets
            .into_iter()
            .map(|t| {
                let n = live
                    .iter()
                    .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()) == Some(&t))
                    .count();
                (n, t)
            })
            .collect();
        for _ in live.len()..replicas {
            let Some(least) = load.iter_mut().min() else {
                break;
            };
            least.0 += 1;
            let node = least.1.clone();
            serial += 1;
            let p: Pod = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("web-{serial}"), "namespace": "default", "labels": {"app": "web"}},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "web"}]},
            }))
            .expect("pod");
            let _ = pods.create(&PostParams::default(), &p).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a watcher of the rollout saw.
#[derive(Default)]
struct Watched {
    peak_nodes: AtomicUsize,
    min_ready: AtomicUsize,
    min_web_pods: AtomicUsize,
}

async fn watch(client: Client, set: String, seen: Arc<Watched>, stop: Arc<AtomicBool>) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    while !stop.load(Ordering::Relaxed) {
        let ns = nodes(&client, &set).await;
        seen.peak_nodes.fetch_max(ns.len(), Ordering::Relaxed);
        seen.min_ready
            .fetch_min(ns.iter().filter(|n| ready(n)).count(), Ordering::Relaxed);
        if let Ok(l) = pods.list(&ListParams::default().labels("app=web")).await {
            let healthy = l
                .items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .count();
            seen.min_web_pods.fetch_min(healthy, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_roll_to_a_new_image_within_surge_and_the_pdb() {
    const N: usize = 20;
    let mut h = harness().await;
    let client = h.client.clone();
    h.create_node_class("sim", class_spec("v1", true))
        .await
        .expect("class");
    let set = nodeset(
        "web",
        N as i32,
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2, "maxUnavailable": 0}}),
    );
    Api::<NodeSet>::all(client.clone())
        .create(&PostParams::default(), &set)
        .await
        .expect("NodeSet");
    let before: BTreeSet<String> = eventually(60, "20 schedulable Nodes", || async {
        let ns = nodes(&client, "web").await;
        (ns.len() == N && ns.iter().all(schedulable))
            .then(|| ns.iter().map(|n| n.name_any()).collect())
    })
    .await;

    // The workload: one pod per Node, a PDB allowing one eviction at a time.
    let stop = Arc::new(AtomicBool::new(false));
    h.spawn(workload(client.clone(), "web".into(), N, stop.clone()));
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"minAvailable": N - 1, "selector": {"matchLabels": {"app": "web"}}},
    }))
    .expect("pdb");
    Api::<PodDisruptionBudget>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pdb)
        .await
        .expect("pdb");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually(30, "20 web pods running, one per Node", || async {
        let l = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let on: BTreeSet<String> = l
            .items
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        (l.items.len() == N && on.len() == N).then_some(())
    })
    .await;
    let status = status_of(&client, "web").await;
    assert_eq!(
        status.status.as_ref().and_then(|s| s.updated_replicas),
        Some(N as i32)
    );

    let seen = Arc::new(Watched {
        peak_nodes: AtomicUsize::new(0),
        min_ready: AtomicUsize::new(usize::MAX),
        min_web_pods: AtomicUsize::new(usize::MAX),
    });
    h.spawn(watch(
        client.clone(),
        "web".into(),
        seen.clone(),
        stop.clone(),
    ));

    // A new image: every Node drifts and is replaced.
    let started = Instant::now();
    set_image(&client, "v2", true).await;
    eventually(20, "Drifted=True on the old Nodes", || async {
        let ns = nodes(&client, "web").await;
        ns.iter()
            .any(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| {
                        cs.iter().any(|c| {
                            c.type_ == DRIFTED_CONDITION
                                && c.status == "True"
                                && c.reason.as_deref() == Some("ProviderChanged")
                        })
                    })
            })
            .then_some(())
    })
    .await;
    let after: BTreeSet<String> = eventually(240, "all 20 Nodes replaced", || async {
        let ns = nodes(&client, "web").await;
        let names: BTreeSet<String> = ns.iter().map(|n| n.name_any()).collect();
        let done = ns.len() == N && ns.iter().all(ready) && names.is_disjoint(&before);
        done.then_some(names)
    })
    .await;
    let took = started.elapsed();
    let s = eventually(20, "status: 20 up to date, complete", || async {
        let ns = status_of(&client, "web").await;
        let st = ns.status.clone()?;
        let ok = st.updated_replicas == Some(N as i32)
            && st.ready_replicas == N as i32
            && progressing(&ns) == Some(("True".into(), "NodeSetUpToDate".into()));
        ok.then_some(st)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    assert_eq!(after.len(), N);
    assert_eq!(s.replicas, N as i32);

    let peak = seen.peak_nodes.load(Ordering::Relaxed);
    let min_ready = seen.min_ready.load(Ordering::Relaxed);
    let min_pods = seen.min_web_pods.load(Ordering::Relaxed);
    println!(
        "rollout of {N} Nodes (maxSurge 2, maxUnavailable 0, PDB minAvailable 19): {:.1}s, \
         peak {peak} Nodes, at least {min_ready} Ready, at least {min_pods} web pods",
        took.as_secs_f64()
    );
    assert!(
        peak <= N + 2,
        "peak {peak} Nodes, more than replicas + maxSurge"
    );
    assert!(
        min_ready >= N,
        "{min_ready} Ready Nodes, fewer than replicas − maxUnavailable"
    );
    assert!(
        min_pods >= N - 1,
        "{min_pods} web pods, fewer than the PDB allows"
    );
    // Every new Node carries the new build hash; one event per replaced Node.
    for n in nodes(&client, "web").await {
        assert!(n.annotations().contains_key(BUILD_HASH_ANNOTATION));
    }
    let events: Vec<Event> = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(REPLACED_EVENT_REASON))
        .collect();
    let replaced: BTreeSet<String> = events
        .iter()
        .filter_map(|e| {
            e.note
                .as_deref()?
                .split_whitespace()
                .nth(3)
                .map(str::to_string)
        })
        .collect();
    assert_eq!(replaced, before, "one event per replaced Node: {events:?}");
    h.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_machines_never_register_stops() {
    let mut h = harness().await;
    let client = h.client.clone();
    h.create_node_class("sim", class_spec("v1", true))
        .await
        .expect("class");
    Api::<NodeSet>::all(client.clone())
        .create(&PostParams::default(), &nodeset("stuck", 4, json!({})))
        .await
        .expect("NodeSet");
    let before: BTreeSet<String> = eventually(60, "4 Ready Nodes", || async {
        let ns = nodes(&client, "stuck").await;
        (ns.len() == 4 && ns.iter().all(ready)).then(|| ns.iter().map(|n| n.name_any()).collect())
    })
    .await;

    // A new image whose machines never register.
    set_image(&client, "broken", false).await;
    let ns = eventually(30, "Progressing=False", || async {
        let ns = status_of(&client, "stuck").await;
        matches!(progressing(&ns), Some((s, _)) if s == "False").then_some(ns)
    })
    .await;
    let (_, reason) = progressing(&ns).expect("Progressing");
    assert!(
        reason == "ReplacementFailed" || reason == "ProgressDeadlineExceeded",
        "{reason}"
    );
    assert!(
        ns.status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .and_then(|r| r.stalled_hash.as_ref())
            .is_some()
    );

    // It stays stopped, across a restart too: the old Nodes stay, the failed one goes, no
    // more Nodes are created.
    let creates = h.api.stats().count("nodes", "create");
    assert_eq!(
        creates, 5,
        "4 Nodes and one surge Node (maxSurge defaults to 1)"
    );
    h.stop_controllers().await.expect("stop");
    h.start_controllers();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let now: BTreeSet<String> = eventually(20, "back to the 4 old Nodes", || async {
        let ns = nodes(&client, "stuck").await;
        let names: BTreeSet<String> = ns.iter().map(|n| n.name_any()).collect();
        (names == before).then_some(names)
    })
    .await;
    assert_eq!(now, before);
    let ns = status_of(&client, "stuck").await;
    assert_eq!(
        progressing(&ns).map(|p| p.0),
        Some("False".to_string()),
        "still stopped after a restart"
    );
    let st = ns.status.expect("status");
    assert_eq!(st.updated_replicas, Some(0));
    assert_eq!(
        h.api.stats().count("nodes", "create"),
        creates,
        "no Node created since"
    );
    assert_eq!(h.cloud.machine_count(), 4);
    h.shutdown().await.expect("shutdown");
}

fn taint_keys(n: &Node) -> BTreeSet<(String, Option<String>)> {
    n.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.value))
        .collect()
}

/// The template's labels and taints are patched onto every Node in place: changed, added and
/// removed, without replacing a Node, and what others set on the Nodes stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_labels_and_taints_are_patched_in_place() {
    let h = harness().await;
    let client = h.client.clone();
    h.create_node_class("sim", class_spec("v1", true))
        .await
        .expect("class");
    let mut ns = nodeset("inplace", 3, json!({}));
    ns.spec.template.metadata.labels = Some(
        [("pool", "inplace"), ("tier", "gold"), ("old", "x")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    ns.spec.template.spec.taints = serde_json::from_value(
        json!([{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]),
    )
    .expect("taints");
    Api::<NodeSet>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("NodeSet");
    let before: BTreeSet<String> = eventually(60, "3 Ready Nodes", || async {
        let ns = nodes(&client, "inplace").await;
        (ns.len() == 3 && ns.iter().all(ready)).then(|| ns.iter().map(|n| n.name_any()).collect())
    })
    .await;
    // Someone else's label and taint on one Node.
    let first = before.iter().next().expect("a Node").clone();
    Api::<Node>::all(client.clone())
        .patch(
            &first,
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"labels": {"user": "u"}},
                "spec": {"taints": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"},
                                    {"key": "theirs", "effect": "NoSchedule"}]}})),
        )
        .await
        .expect("patch Node");
    for _ in 0..10 {
        let n = Api::<Node>::all(client.clone())
            .get(&first)
            .await
            .expect("get");
        eprintln!("DEBUG {:?}", n.spec.and_then(|s| s.taints));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let creates = h.api.stats().count("nodes", "create");

    // Change a label and a taint, add a label, remove a label.
    Api::<NodeSet>::all(client.clone())
        .patch(
            "inplace",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {
                "metadata": {"labels": {"tier": "silver", "old": null, "new": "y"}},
                "spec": {"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]}}}})),
        )
        .await
        .expect("patch NodeSet");
    let now = eventually(30, "the template on every Node", || async {
        let ns = nodes(&client, "inplace").await;
        let done = ns.len() == 3
            && ns.iter().all(|n| {
                let l = n.labels();
                l.get("tier").map(String::as_str) == Some("silver")
                    && l.get("new").map(String::as_str) == Some("y")
                    && !l.contains_key("old")
                    && taint_keys(n).contains(&("dedicated".into(), Some("gpu".into())))
                    && !taint_keys(n).contains(&("dedicated".into(), Some("ml".into())))
            });
        done.then_some(ns)
    })
    .await;
    let names: BTreeSet<String> = now.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, before, "no Node replaced");
    let theirs = now.iter().find(|n| n.name_any() == first).expect("first");
    assert_eq!(theirs.labels().get("user").map(String::as_str), Some("u"));
    assert!(
        taint_keys(theirs).contains(&("theirs".into(), None)),
        "{:?}",
        theirs.spec
    );

    // Removing every template taint removes it from the Nodes too.
    Api::<NodeSet>::all(client.clone())
        .patch(
            "inplace",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {"spec": {"taints": null}}}})),
        )
        .await
        .expect("patch NodeSet");
    eventually(30, "the template taint gone", || async {
        let ns = nodes(&client, "inplace").await;
        ns.iter()
            .all(|n| !taint_keys(n).iter().any(|(k, _)| k == "dedicated"))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns = nodes(&client, "inplace").await;
    assert!(ns.iter().all(ready));
    assert!(ns.iter().all(|n| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_none_or(|cs| {
                !cs.iter()
                    .any(|c| c.type_ == DRIFTED_CONDITION && c.status == "True")
            })
    }));
    assert_eq!(
        h.api.stats().count("nodes", "create"),
        creates,
        "no Node created"
    );
    let theirs = ns.iter().find(|n| n.name_any() == first).expect("first");
    assert!(taint_keys(theirs).contains(&("theirs".into(), None)));
    let st = status_of(&client, "inplace").await.status.expect("status");
    assert_eq!(st.updated_replicas, Some(3));
    h.shutdown().await.expect("shutdown");
}

fn class_of(n: &Node) -> Option<String> {
    n.annotations()
        .get(kube_node_crds::names::NODE_CLASS_ANNOTATION)
        .cloned()
}

/// Ordered NodeClass fallback: the first class has no capacity, so each Node's machine is
/// made on the second (the Node keeps its name, its class follows) and the first is skipped
/// for a cool-down; once it is over and capacity is back, the Nodes drift back to the first
/// class within the rollout limits. No machine is left behind on either class.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_fall_back_to_the_next_class_and_drift_back() {
    let h = harness().await;
    let client = h.client.clone();
    let mut spot = class_spec("v1", true);
    spot["provider"]["simulated"]["faults"] = json!({"insufficientCapacityPercent": 100});
    h.create_node_class("spot", spot).await.expect("spot");
    h.create_node_class("ondemand", class_spec("v1", true))
        .await
        .expect("ondemand");
    let ns: NodeSet = serde_json::from_value(json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": "fb"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"pool": "fb"}},
            "template": {"metadata": {"labels": {"pool": "fb"}},
                         "spec": {"nodeClassNames": ["spot", "ondemand"]}},
            "classFallbackCooldownSeconds": 6,
            "replacementBackoff": {"base": "1s", "max": "2s"},
        },
    }))
    .expect("NodeSet fixture");
    Api::<NodeSet>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("NodeSet");

    // Every Node lands on the second class, keeping its name.
    let fell_back: BTreeSet<String> = eventually(60, "3 Ready Nodes on ondemand", || async {
        let ns = nodes(&client, "fb").await;
        let done = ns.len() == 3
            && ns.iter().all(|n| {
                ready(n)
                    && class_of(n).as_deref() == Some("ondemand")
                    && n.labels()
                        .get("kube-node.io/node-class")
                        .map(String::as_str)
                        == Some("ondemand")
            });
        done.then(|| ns.iter().map(|n| n.name_any()).collect())
    })
    .await;
    assert_eq!(
        h.api.stats().count("nodes", "create"),
        3,
        "the Nodes moved to the next class; none was replaced"
    );
    let st = status_of(&client, "fb").await.status.expect("status");
    assert_eq!(st.node_class_name.as_deref(), Some("ondemand"));
    assert!(
        st.class_cooldowns
            .iter()
            .any(|c| c.node_class_name == "spot" && c.reason == "InsufficientCapacity"),
        "{:?}",
        st.class_cooldowns
    );
    let cond = find_condition(
        &st.conditions,
        kube_node_crds::names::CLASS_FALLBACK_CONDITION,
    )
    .expect("NodeClassFallback condition");
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("True", "InsufficientCapacity")
    );
    let events = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("events")
        .items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("NodeClassFallback")),
        "a NodeClassFallback event per moved Node"
    );
    assert_eq!(h.cloud.machine_count(), 3, "no machine left on spot");

    // Capacity is back: after the cool-down the Nodes drift back to the first class, one
    // surge Node at a time.
    Api::<NodeClass>::all(client.clone())
        .patch(
            "spot",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provider": {"simulated": {"faults": null}}}})),
        )
        .await
        .expect("patch spot");
    let back: BTreeSet<String> = eventually(90, "3 Ready Nodes back on spot", || async {
        let ns = nodes(&client, "fb").await;
        let done = ns.len() == 3
            && ns
                .iter()
                .all(|n| ready(n) && class_of(n).as_deref() == Some("spot"));
        done.then(|| ns.iter().map(|n| n.name_any()).collect())
    })
    .await;
    assert!(back.is_disjoint(&fell_back), "each Node was replaced");
    let st = status_of(&client, "fb").await.status.expect("status");
    assert_eq!(st.node_class_name.as_deref(), Some("spot"));
    assert_eq!(st.updated_replicas, Some(3));
    let cond = find_condition(
        &st.conditions,
        kube_node_crds::names::CLASS_FALLBACK_CONDITION,
    )
    .expect("NodeClassFallback condition");
    assert_eq!(cond.status, "False");
    eventually(30, "the ondemand machines gone", || async {
        (h.cloud.machine_count() == 3).then_some(())
    })
    .await;
    h.shutdown().await.expect("shutdown");
}
