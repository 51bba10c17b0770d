//! cluster-autoscaler against kube-node during a burst, with the real controllers (node-controller,
//! nodeset-controller, the simulated provider's kubelet) on the embedded API and the real
//! externalgrpc server on 127.0.0.1:
//!
//! - `burst_of_ten_buys_ten_and_never_aborts`: a client replays cluster-autoscaler's loop
//!   (Refresh, NodeGroups, NodeGroupForNode for every Node, TargetSize, Nodes, TemplateNodeInfo,
//!   IncreaseSize) and decides scale-ups with cluster-autoscaler's own arithmetic ([`ca`]) while
//!   a fake scheduler binds ten pods that each need most of a machine. It must buy exactly ten
//!   machines, no call may fail, and then concurrent DeleteNodes and IncreaseSize calls (the
//!   writes that used to fail with Aborted) must all succeed with exact final sizes, while the
//!   nodeset-controller writes status and another writer bumps the NodeSet's resourceVersion
//!   every 50 ms.
//! - `a_ready_node_still_tainted_is_upcoming`: the instant cluster-autoscaler would overshoot
//!   on (kubelet Ready, unregistered taint not yet removed), pure.
//! - `capacity_mismatch_condition`: a NodeClass whose declaration stops matching its
//!   registered Nodes gets `CapacityMatches=False` and a Warning event, cleared when fixed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{CustomResourceExt, ResourceExt};
use kube_node_autoscaler::proto::cloud_provider_client::CloudProviderClient;
use kube_node_autoscaler::proto::{
    ExternalGrpcNode, NodeGroupDeleteNodesRequest, NodeGroupForNodeRequest,
    NodeGroupIncreaseSizeRequest, NodeGroupNodesRequest, NodeGroupTargetSizeRequest,
    NodeGroupTemplateNodeInfoRequest, NodeGroupsRequest, RefreshRequest,
};
use kube_node_crds::names::{
    AUTOSCALER_UNREGISTERED_TAINT, AUTOSCALER_UNREGISTERED_TAINT_EFFECT, CAPACITY_CONDITION,
    UNREGISTERED_TAINT,
};
use kube_node_crds::v1alpha1::find_condition;
use kube_node_crds::{NodeClass, NodeSet};
use kube_node_embedded_api::EmbeddedApi;
use kube_node_provider::ProviderMetrics;
use kube_node_provider_simulated::{KubeletConfig, SimulatedCloud};
use serde_json::json;
use tonic::transport::Channel;

const CA_CRT: &str = include_str!("../../kube-node/src/simulate/simulated-ca.crt");

/// cluster-autoscaler's scale-up arithmetic, as in its source on release branches 1.28 and
/// 1.31 (paths under `cluster-autoscaler/`), reduced to what decides how many machines a burst
/// of pending pods buys from one node group.
mod ca {
    use super::*;

    /// `utils/taints/taints.go` `IgnoreTaintPrefix` (1.28: l.45; 1.31: l.45, a startup-taint
    /// prefix there, l.127).
    pub const IGNORE_TAINT_PREFIX: &str = "ignore-taint.cluster-autoscaler.kubernetes.io/";
    /// `clusterstate/clusterstate.go` `MaxNodeStartupTime` (1.28: l.47; 1.31: l.48).
    pub const MAX_NODE_STARTUP: Duration = Duration::from_secs(15 * 60);

    /// Resources in the units the scheduler compares.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct Res {
        pub milli_cpu: i64,
        pub memory: i64,
        pub pods: i64,
    }

    impl Res {
        fn fits(&self, used: &Res, req: &Res) -> bool {
            used.milli_cpu + req.milli_cpu <= self.milli_cpu
                && used.memory + req.memory <= self.memory
                && used.pods + req.pods <= self.pods
        }
        fn add(&mut self, r: &Res) {
            self.milli_cpu += r.milli_cpu;
            self.memory += r.memory;
            self.pods += r.pods;
        }
    }

    pub fn res(map: &BTreeMap<String, String>) -> Res {
        let q = |k: &str| {
            map.get(k)
                .and_then(|v| node_controller::capacity::parse_quantity(v))
                .unwrap_or(0.0)
        };
        Res {
            milli_cpu: (q("cpu") * 1000.0).round() as i64,
            memory: q("memory") as i64,
            pods: q("pods") as i64,
        }
    }

    /// What the scheduler simulation needs of a Node: taints (key, effect) and allocatable.
    #[derive(Clone, Debug, Default)]
    pub struct Shape {
        pub taints: Vec<(String, String)>,
        pub allocatable: Res,
    }

    pub fn shape(node: &Node) -> Shape {
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|t| (t.key, t.effect))
            .collect();
        let alloc: BTreeMap<String, String> = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        Shape {
            taints,
            allocatable: res(&alloc),
        }
    }

    /// A pending pod: its requests and the taint keys it tolerates.
    #[derive(Clone, Debug)]
    pub struct Pod {
        pub requests: Res,
        pub tolerates: Vec<String>,
    }

    /// The scheduler's TaintToleration filter: NoSchedule and NoExecute taints must be
    /// tolerated, PreferNoSchedule never filters.
    pub fn tolerated(pod: &Pod, shape: &Shape) -> bool {
        shape
            .taints
            .iter()
            .all(|(k, effect)| effect == "PreferNoSchedule" || pod.tolerates.iter().any(|t| t == k))
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Readiness {
        Ready,
        NotStarted,
        Unready,
    }

    /// How cluster-autoscaler classifies a Node of a group:
    /// `utils/kubernetes/ready.go` `GetNodeReadiness` (no Ready condition: not ready, with an
    /// error that `updateReadinessStats` only logs; Ready False/Unknown or a not-ready taint: not
    /// ready), then `FilterOutNodesWithIgnoredTaints` (1.28 `utils/taints/taints.go` l.367-396)
    /// / `FilterOutNodesWithStartupTaints` (1.31 l.428-456): a Ready Node with a taint under
    /// the ignore prefix is made an unready copy; then `updateReadinessStats`
    /// (`clusterstate/clusterstate.go` 1.28 l.572-586, 1.31 l.609-623): not ready and created
    /// less than `MaxNodeStartupTime` ago is NotStarted.
    pub fn readiness(node: &Node, now: jiff::Timestamp) -> Readiness {
        let conditions = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        let ready_condition = conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .is_some_and(|c| c.status == "True");
        let not_ready_taint = taints.iter().any(|t| {
            matches!(
                t.key.as_str(),
                "node.kubernetes.io/not-ready"
                    | "node.kubernetes.io/disk-pressure"
                    | "node.kubernetes.io/network-unavailable"
            )
        });
        let ignored_taint = taints
            .iter()
            .any(|t| t.key.starts_with(IGNORE_TAINT_PREFIX));
        if ready_condition && !not_ready_taint && !ignored_taint {
            return Readiness::Ready;
        }
        let created = node
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(now, |t| t.0);
        let startup = jiff::SignedDuration::try_from(MAX_NODE_STARTUP).expect("duration");
        if created + startup > now {
            Readiness::NotStarted
        } else {
            Readiness::Unready
        }
    }

    /// One node group as cluster-autoscaler sees it in one loop.
    pub struct Group<'a> {
        /// The Nodes `NodeGroupForNode` put in this group.
        pub nodes: Vec<&'a Node>,
        /// `NodeGroupTargetSize`.
        pub target: i32,
        /// `NodeGroupTemplateNodeInfo`.
        pub template: Shape,
        /// Pods already bound, per Node name.
        pub bound: &'a BTreeMap<String, Vec<Pod>>,
    }

    /// How many Nodes a scale-up adds for `pending`:
    /// upcoming = target − ready − unready (`GetUpcomingNodes`, 1.28 l.964, 1.31 l.1002);
    /// the simulation snapshot holds the group's Nodes without the NotStarted ones, plus one
    /// template copy per upcoming Node (`static_autoscaler.go` 1.28 l.469-503, 1.31
    /// l.482-510); pending pods that fit there need nothing (filterOutSchedulable); the rest
    /// are bin-packed onto fresh template Nodes (the estimator). Pods no template can take are
    /// not counted: no scale-up helps them.
    pub fn scale_up(group: &Group<'_>, pending: &[Pod], now: jiff::Timestamp) -> (i32, usize) {
        let mut ready = 0;
        let mut unready = 0;
        let mut snapshot: Vec<(Shape, Res)> = Vec::new();
        for node in &group.nodes {
            let r = readiness(node, now);
            match r {
                Readiness::Ready => ready += 1,
                Readiness::Unready => unready += 1,
                Readiness::NotStarted => continue,
            }
            let mut used = Res::default();
            for p in group.bound.get(&node.name_any()).into_iter().flatten() {
                used.add(&p.requests);
            }
            snapshot.push((shape(node), used));
        }
        let upcoming = (group.target - ready - unready).max(0);
        for _ in 0..upcoming {
            snapshot.push((group.template.clone(), Res::default()));
        }
        let mut fresh: Vec<Res> = Vec::new();
        for pod in pending {
            let placed = snapshot
                .iter_mut()
                .find(|(s, used)| tolerated(pod, s) && s.allocatable.fits(used, &pod.requests));
            if let Some((_, used)) = placed {
                used.add(&pod.requests);
                continue;
            }
            if !tolerated(pod, &group.template)
                || !group
                    .template
                    .allocatable
                    .fits(&Res::default(), &pod.requests)
            {
                continue;
            }
            match fresh
                .iter_mut()
                .find(|used| group.template.allocatable.fits(used, &pod.requests))
            {
                Some(used) => used.add(&pod.requests),
                None => {
                    let mut used = Res::default();
                    used.add(&pod.requests);
                    fresh.push(used);
                }
            }
        }
        (upcoming, fresh.len())
    }
}

// ---------------------------------------------------------------------------------------------
// The controllers and the externalgrpc server.

struct Cluster {
    admin: kube::Client,
    grpc: CloudProviderClient<Channel>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _api: EmbeddedApi,
}

impl Cluster {
    async fn start() -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let api = EmbeddedApi::new();
        api.register_crd(&NodeClass::crd()).expect("NodeClass CRD");
        api.register_crd(&NodeSet::crd()).expect("NodeSet CRD");
        let admin = api.client();
        let ca = ConfigMap {
            metadata: ObjectMeta {
                name: Some("kube-root-ca.crt".into()),
                namespace: Some("kube-system".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("ca.crt".to_string(), CA_CRT.to_string())])),
            ..Default::default()
        };
        Api::<ConfigMap>::namespaced(admin.clone(), "kube-system")
            .create(&PostParams::default(), &ca)
            .await
            .expect("CA ConfigMap");

        let mut registry = prometheus_client::registry::Registry::default();
        let provider_metrics = ProviderMetrics::register(&mut registry);
        let node_metrics = node_controller::Metrics::register(&mut registry);
        let nodeset_metrics = nodeset_controller::Metrics::register_sharing(
            &mut registry,
            node_metrics.reconcile_families(),
        );
        let cloud = SimulatedCloud::new();
        let mut providers =
            kube_node_provider::ProviderRegistry::new().with_metrics(provider_metrics);
        providers.register(cloud.factory());
        let node_config = node_controller::Config {
            cluster_name: "burst".into(),
            api_server_endpoint: Some("burst-apiserver:6443".into()),
            ..Default::default()
        };
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = Vec::new();
        let handle = cloud.start_kubelet_with(
            api.client(),
            KubeletConfig {
                manage_pods: false,
                ..KubeletConfig::default()
            },
        );
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            stopped(rx).await;
            drop(handle);
        }));
        let controller = api.client();
        let (c, rx) = (controller.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            node_controller::run(c, providers, node_config, node_metrics, stopped(rx))
                .await
                .expect("node-controller");
        }));
        let (c, rx) = (controller.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            nodeset_controller::run(
                c,
                nodeset_controller::Config::default(),
                nodeset_metrics,
                stopped(rx),
            )
            .await
            .expect("nodeset-controller");
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let config = kube_node_autoscaler::Config {
            addr,
            tls: None,
            allow_plaintext: true,
        };
        let rx = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            kube_node_autoscaler::serve_on(controller, listener, config, stopped(rx))
                .await
                .expect("externalgrpc server");
        }));
        let grpc = CloudProviderClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        Self {
            admin,
            grpc,
            stop,
            tasks,
            _api: api,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("tasks stop in time")
                .expect("task");
        }
    }

    fn all<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>,
    {
        Api::all(self.admin.clone())
    }
}

async fn create<K>(api: Api<K>, obj: serde_json::Value) -> K
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let obj: K = serde_json::from_value(obj).expect("fixture parses");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create fixture")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `limit`.
async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A request with the deadline cluster-autoscaler's externalgrpc client sets on every call
/// (`grpcTimeout`, 5 s), sent as `grpc-timeout`.
fn req<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(Duration::from_secs(5));
    r
}

fn class_fixture(name: &str, boot: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeClass",
        "metadata": {"name": name},
        "spec": {
            "provider": {"type": "simulated", "simulated": {
                "instanceType": "sim.large", "zones": ["zone-a"], "bootDelay": boot}},
            "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
            "allocatable": {"cpu": "3900m", "memory": "15Gi", "pods": "110"},
        }
    })
}

fn nodeset_fixture(name: &str, class: &str, replicas: i32, max: i32) -> serde_json::Value {
    json!({
        "apiVersion": "kube-node.io/v1alpha1", "kind": "NodeSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "minSize": 0, "maxSize": max,
            "selector": {"matchLabels": {"pool": name}},
            "template": {"metadata": {"labels": {"pool": name}},
                         "spec": {"nodeClassName": class}},
        }
    })
}

/// A pod that needs most of a `sim.large` machine (3 of 3.9 cpu, 12 of 15 GiB) and tolerates
/// nothing.
fn big_pod() -> ca::Pod {
    ca::Pod {
        requests: ca::Res {
            milli_cpu: 3000,
            memory: 12 * 1024 * 1024 * 1024,
            pods: 1,
        },
        tolerates: vec![],
    }
}

fn ext_node(n: &Node) -> ExternalGrpcNode {
    ExternalGrpcNode {
        provider_id: n
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.clone())
            .unwrap_or_default(),
        name: n.name_any(),
        labels: n.labels().clone().into_iter().collect(),
        annotations: Default::default(),
    }
}

/// What one replayed cluster-autoscaler loop learned from the server.
struct Observed {
    nodes: Vec<Node>,
    target: i32,
    template: ca::Shape,
}

/// One cluster-autoscaler loop's reads, in its order: Refresh, NodeGroups, NodeGroupForNode
/// for every Node, then per group TargetSize, Nodes and TemplateNodeInfo. Every call must
/// succeed.
async fn ca_reads(
    admin: &kube::Client,
    grpc: &mut CloudProviderClient<Channel>,
    group: &str,
) -> Observed {
    grpc.refresh(req(RefreshRequest {})).await.expect("Refresh");
    let groups = grpc
        .node_groups(req(NodeGroupsRequest {}))
        .await
        .expect("NodeGroups")
        .into_inner()
        .node_groups;
    assert!(groups.iter().any(|g| g.id == group), "{groups:?}");
    let all = Api::<Node>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .expect("list nodes")
        .items;
    let mut nodes = Vec::new();
    for n in all {
        let ng = grpc
            .node_group_for_node(req(NodeGroupForNodeRequest {
                node: Some(ext_node(&n)),
            }))
            .await
            .expect("NodeGroupForNode")
            .into_inner()
            .node_group
            .map(|g| g.id)
            .unwrap_or_default();
        if ng == group {
            nodes.push(n);
        }
    }
    let target = grpc
        .node_group_target_size(req(NodeGroupTargetSizeRequest { id: group.into() }))
        .await
        .expect("TargetSize")
        .into_inner()
        .target_size;
    grpc.node_group_nodes(req(NodeGroupNodesRequest { id: group.into() }))
        .await
        .expect("NodeGroupNodes");
    let info = grpc
        .node_group_template_node_info(req(NodeGroupTemplateNodeInfoRequest { id: group.into() }))
        .await
        .expect("TemplateNodeInfo")
        .into_inner()
        .node_info
        .expect("template");
    let taints = info
        .spec
        .map(|s| s.taints)
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key.unwrap_or_default(), t.effect.unwrap_or_default()))
        .collect();
    let alloc: BTreeMap<String, String> = info
        .status
        .map(|s| s.allocatable)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.string.unwrap_or_default()))
        .collect();
    Observed {
        nodes,
        target,
        template: ca::Shape {
            taints,
            allocatable: ca::res(&alloc),
        },
    }
}

/// Bumps the NodeSet's resourceVersion every 50 ms (an annotation), on top of the
/// nodeset-controller's own status writes, until `stop`.
fn churn(admin: kube::Client, name: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    let name = name.to_string();
    tokio::spawn(async move {
        let api: Api<NodeSet> = Api::all(admin);
        let mut writes = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let patch = json!({"metadata": {"annotations": {"test.kube-node.io/churn": writes.to_string()}}});
            if api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                writes += 1;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        writes
    })
}

fn kubelet_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_of_ten_buys_ten_and_never_aborts() {
    let mut c = Cluster::start().await;
    create::<NodeClass>(c.all(), class_fixture("large", "2s")).await;
    create::<NodeSet>(c.all(), nodeset_fixture("ca-set", "large", 0, 12)).await;
    let stop_churn = Arc::new(AtomicBool::new(false));
    let churner = churn(c.admin.clone(), "ca-set", stop_churn.clone());

    // Phase 1: ten pending pods, each needing a machine of its own.
    let started = tokio::time::Instant::now();
    let mut pending: Vec<ca::Pod> = (0..10).map(|_| big_pod()).collect();
    let mut bound: BTreeMap<String, Vec<ca::Pod>> = BTreeMap::new();
    let (mut peak_target, mut peak_nodes, mut loops, mut increases) = (0, 0usize, 0u32, 0u32);
    let mut pending_tainted_ready_seen = 0u32;
    let all_running = loop {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "burst did not finish: {} pods pending, {bound:?}",
            pending.len()
        );
        loops += 1;
        let seen = ca_reads(&c.admin, &mut c.grpc, "ca-set").await;
        // The template never carries a taint the pods would be refused for.
        assert!(
            seen.template.taints.is_empty(),
            "template taints: {:?}",
            seen.template.taints
        );
        let now = jiff::Timestamp::now();
        let group = ca::Group {
            nodes: seen.nodes.iter().collect(),
            target: seen.target,
            template: seen.template.clone(),
            bound: &bound,
        };
        let (_upcoming, add) = ca::scale_up(&group, &pending, now);
        let add = i32::try_from(add).expect("small").min(12 - seen.target);
        if add > 0 {
            c.grpc
                .node_group_increase_size(req(NodeGroupIncreaseSizeRequest {
                    delta: add,
                    id: "ca-set".into(),
                }))
                .await
                .expect("IncreaseSize");
            increases += 1;
            peak_target = peak_target.max(seen.target + add);
        }
        peak_target = peak_target.max(seen.target);
        peak_nodes = peak_nodes.max(seen.nodes.len());
        // The scheduler: a pod lands on a Node whose kubelet is Ready and whose taints it
        // tolerates.
        for n in &seen.nodes {
            let s = ca::shape(n);
            if kubelet_ready(n) && s.taints.iter().any(|(k, _)| k == UNREGISTERED_TAINT) {
                pending_tainted_ready_seen += 1;
            }
            if pending.is_empty() || !kubelet_ready(n) {
                continue;
            }
            let pod = &pending[0];
            let on = bound.entry(n.name_any()).or_default();
            let mut used = ca::Res::default();
            for p in on.iter() {
                used.milli_cpu += p.requests.milli_cpu;
                used.memory += p.requests.memory;
                used.pods += p.requests.pods;
            }
            let room = used.milli_cpu + pod.requests.milli_cpu <= s.allocatable.milli_cpu
                && used.memory + pod.requests.memory <= s.allocatable.memory;
            if ca::tolerated(pod, &s) && room {
                on.push(pending.remove(0));
            }
        }
        if pending.is_empty() && seen.nodes.len() == 10 {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "burst: 10 pods bound after {all_running:?}, {loops} autoscaler loops, {increases} \
         scale-up(s), peak target {peak_target}, peak Nodes {peak_nodes}, {pending_tainted_ready_seen} \
         observations of a Ready Node still tainted"
    );
    assert_eq!(
        peak_target, 10,
        "the autoscaler would have bought {peak_target} machines"
    );
    assert_eq!(peak_nodes, 10);
    assert_eq!(increases, 1, "one scale-up, 0 -> 10");

    // Phase 2: scale-down, four DeleteNodes at once (as cluster-autoscaler's deletion batches
    // do), while status and the churner keep moving the resourceVersion.
    let nodes = ca_reads(&c.admin, &mut c.grpc, "ca-set").await.nodes;
    let victims: Vec<Node> = nodes.iter().take(4).cloned().collect();
    let calls = victims.iter().map(|v| {
        let mut grpc = c.grpc.clone();
        let node = ext_node(v);
        async move {
            grpc.node_group_delete_nodes(req(NodeGroupDeleteNodesRequest {
                nodes: vec![node],
                id: "ca-set".into(),
            }))
            .await
        }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("DeleteNodes under churn");
    }
    let ns = c.all::<NodeSet>().get("ca-set").await.expect("nodeset");
    assert_eq!(ns.spec.replicas, 6, "each removal applied exactly once");
    let victim_names: Vec<String> = victims.iter().map(ResourceExt::name_any).collect();
    eventually(
        Duration::from_secs(60),
        "victims gone, six left",
        || async {
            let mut grpc = c.grpc.clone();
            let left = ca_reads(&c.admin, &mut grpc, "ca-set").await.nodes;
            (left.len() == 6 && left.iter().all(|n| !victim_names.contains(&n.name_any())))
                .then_some(())
        },
    )
    .await;

    // Phase 3: six IncreaseSize(1) at once: every one applied once, to exactly maxSize; one
    // more is refused by the maxSize check.
    let calls = (0..6).map(|_| {
        let mut grpc = c.grpc.clone();
        async move {
            grpc.node_group_increase_size(req(NodeGroupIncreaseSizeRequest {
                delta: 1,
                id: "ca-set".into(),
            }))
            .await
        }
    });
    for r in futures::future::join_all(calls).await {
        r.expect("IncreaseSize under churn");
    }
    let ns = c.all::<NodeSet>().get("ca-set").await.expect("nodeset");
    assert_eq!(ns.spec.replicas, 12);
    let err = c
        .grpc
        .node_group_increase_size(req(NodeGroupIncreaseSizeRequest {
            delta: 1,
            id: "ca-set".into(),
        }))
        .await
        .expect_err("beyond maxSize");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let mut grpc = c.grpc.clone();
    let target = grpc
        .node_group_target_size(req(NodeGroupTargetSizeRequest {
            id: "ca-set".into(),
        }))
        .await
        .expect("TargetSize")
        .into_inner()
        .target_size;
    assert_eq!(target, 12);
    eventually(Duration::from_secs(60), "twelve Nodes", || async {
        let n = c
            .all::<Node>()
            .list(&ListParams::default().labels("pool=ca-set"))
            .await
            .ok()?;
        (n.items.len() == 12).then_some(())
    })
    .await;
    stop_churn.store(true, Ordering::Relaxed);
    let churn_writes = churner.await.expect("churner");
    println!("churn: {churn_writes} extra NodeSet writes during the test");
    assert!(churn_writes > 20, "the churner ran ({churn_writes} writes)");
    c.stop().await;
}

/// The instant the overshoot came from: the kubelet is Ready, the node-controller has
/// not yet removed the unregistered taint, the pods are still pending. Without the autoscaler
/// marker, cluster-autoscaler counts the Node as Ready and full and buys another; with it, the
/// Node is NotStarted and its place is taken by a template copy.
#[test]
fn a_ready_node_still_tainted_is_upcoming() {
    let now = jiff::Timestamp::now();
    let created = jiff::Timestamp::from_second(now.as_second()).expect("time");
    let node = |marker: bool| -> Node {
        let mut taints = vec![json!({"key": UNREGISTERED_TAINT, "effect": "NoExecute"})];
        if marker {
            taints.push(json!({"key": AUTOSCALER_UNREGISTERED_TAINT,
                               "effect": AUTOSCALER_UNREGISTERED_TAINT_EFFECT}));
        }
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "creationTimestamp": created.to_string()},
            "spec": {"taints": taints},
            "status": {
                "allocatable": {"cpu": "3900m", "memory": "15Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        }))
        .expect("node")
    };
    let template = ca::Shape {
        taints: vec![],
        allocatable: ca::res(&BTreeMap::from([
            ("cpu".to_string(), "3900m".to_string()),
            ("memory".to_string(), "15Gi".to_string()),
            ("pods".to_string(), "110".to_string()),
        ])),
    };
    let bound = BTreeMap::new();
    let pending = vec![big_pod()];
    let without = node(false);
    assert_eq!(ca::readiness(&without, now), ca::Readiness::Ready);
    let group = ca::Group {
        nodes: vec![&without],
        target: 1,
        template: template.clone(),
        bound: &bound,
    };
    assert_eq!(
        ca::scale_up(&group, &pending, now),
        (0, 1),
        "overshoot without the marker"
    );
    let with = node(true);
    assert_eq!(ca::readiness(&with, now), ca::Readiness::NotStarted);
    let group = ca::Group {
        nodes: vec![&with],
        target: 1,
        template,
        bound: &bound,
    };
    assert_eq!(
        ca::scale_up(&group, &pending, now),
        (1, 0),
        "upcoming with the marker"
    );
    // A Node with no Ready condition at all (pre-created, no kubelet yet) is NotStarted too.
    let mut fresh = node(false);
    fresh.status = None;
    assert_eq!(ca::readiness(&fresh, now), ca::Readiness::NotStarted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_mismatch_condition() {
    let c = Cluster::start().await;
    create::<NodeClass>(c.all(), class_fixture("cap", "0s")).await;
    create::<NodeSet>(c.all(), nodeset_fixture("cap-set", "cap", 2, 2)).await;
    let classes = c.all::<NodeClass>();
    let capacity = |nc: &NodeClass| {
        nc.status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, CAPACITY_CONDITION))
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    // The machines report what the class declares.
    let (status, reason, _) = eventually(Duration::from_secs(30), "CapacityMatches", || async {
        let nc = classes.get("cap").await.ok()?;
        capacity(&nc).filter(|c| c.0 == "True")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "CapacityMatches")
    );
    // A mistyped declaration: the machines have 15Gi, the class now says 30Gi.
    let patch = json!({"spec": {"allocatable": {"cpu": "3900m", "memory": "30Gi", "pods": "110"}}});
    classes
        .patch("cap", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch class");
    let (_, reason, message) = eventually(Duration::from_secs(30), "CapacityMismatch", || async {
        let nc = classes.get("cap").await.ok()?;
        capacity(&nc).filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "CapacityMismatch");
    assert!(
        message.contains("memory allocatable 15Gi (declared 30Gi)") && message.contains("2 of 2"),
        "{message}"
    );
    let events: Api<K8sEvent> = Api::all(c.admin.clone());
    let warned = eventually(Duration::from_secs(10), "Warning event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("CapacityMismatch")
                && e.type_.as_deref() == Some("Warning")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("cap")
        })
    })
    .await;
    assert!(
        warned.note.unwrap_or_default().contains("declared 30Gi"),
        "the event names both values"
    );
    // Fixed: the condition clears, with a Normal event.
    let patch = json!({"spec": {"allocatable": {"cpu": "3900m", "memory": "15Gi", "pods": "110"}}});
    classes
        .patch("cap", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch class");
    eventually(Duration::from_secs(30), "CapacityMatches again", || async {
        let nc = classes.get("cap").await.ok()?;
        capacity(&nc).filter(|c| c.0 == "True").map(|_| ())
    })
    .await;
    eventually(Duration::from_secs(10), "Normal event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .any(|e| {
                e.reason.as_deref() == Some("CapacityMatches")
                    && e.type_.as_deref() == Some("Normal")
            })
            .then_some(())
    })
    .await;
    c.stop().await;
}
