//! Scale benchmark (prints figures, asserts nothing about time):
//!
//! ```text
//! cargo bench -p kube-node --bench scale
//! ```
//!
//! Phase 1 runs the embedded API server, both controllers and the simulated cloud + kubelet in
//! this process (wired as `kube-node simulate` does), scales one NodeSet 0 → N (default 1000)
//! → 0 through `/scale` with the simulated NodeClass at zero boot latency, and prints the time
//! to all Nodes created, to `status.readyReplicas == N`, to no Node left, the controllers' API
//! writes per Node lifecycle by resource and verb, and the process's peak RSS.
//!
//! Phase 2 measures the controllers' memory while many Nodes are watched: this process serves
//! the embedded API over HTTP on 127.0.0.1 and runs the real `kube-node run` binary as a child
//! process against it (this process plays the kubelets, with a realistic Node status), creates
//! S NodeSets × R replicas (default 100 × 50 = 5000 Nodes), waits for them all to be Ready and
//! reads the child's VmHWM/VmRSS.
//!
//! Knobs (environment): `KUBE_NODE_BENCH_NODES` (1000), `KUBE_NODE_BENCH_SETS` (100),
//! `KUBE_NODE_BENCH_PER_SET` (50), `KUBE_NODE_BENCH_PHASES` (`scale,memory`),
//! `KUBE_NODE_BENCH_WRAP` (a command the memory phase's child runs under, e.g. a heap profiler),
//! `KUBE_NODE_KUBE_QPS` / `KUBE_NODE_KUBE_BURST` (the `kube-node run` defaults, 200 / 400).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser as _;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::client::ClientBuilder;
use kube_node::cli::{Cli, Command};
use kube_node::harness::{self, API_SERVER_ENDPOINT, Harness, Role};
use kube_node_crds::NodeSet;
use kube_node_embedded_api::EmbeddedApi;
use kube_node_runtime::RateLimitLayer;
use tokio::time::Instant;

const CLASS: &str = "bench";

/// API writes by (resource, verb), counted on one client, and when each successful Node create
/// was answered (so "created" is measured on the same client, the same way, as the baseline).
#[derive(Clone, Default)]
struct WriteCounts {
    counts: Arc<Mutex<BTreeMap<(String, String), u64>>>,
    node_creates_done: Arc<Mutex<Vec<Instant>>>,
}

impl WriteCounts {
    fn snapshot(&self) -> BTreeMap<(String, String), u64> {
        self.counts.lock().map(|m| m.clone()).unwrap_or_default()
    }
    fn reset(&self) {
        if let Ok(mut m) = self.counts.lock() {
            m.clear();
        }
        if let Ok(mut t) = self.node_creates_done.lock() {
            t.clear();
        }
    }
    fn total(&self) -> u64 {
        self.snapshot().values().sum()
    }
    /// When the `n`th successful Node create since the last reset was answered.
    fn nth_node_created(&self, n: usize) -> Option<Instant> {
        let times = self.node_creates_done.lock().ok()?;
        times.get(n.checked_sub(1)?).copied()
    }
}

impl<S> tower::Layer<S> for WriteCounts {
    type Service = Counting<S>;
    fn layer(&self, inner: S) -> Counting<S> {
        Counting {
            inner,
            counts: self.clone(),
        }
    }
}

struct Counting<S> {
    inner: S,
    counts: WriteCounts,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Counting<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let key = classify(req.method(), req.uri().path());
        let node_create = key
            .as_ref()
            .is_some_and(|(resource, verb)| resource == "nodes" && verb == "create");
        if let Some(key) = key
            && let Ok(mut m) = self.counts.counts.lock()
        {
            *m.entry(key).or_default() += 1;
        }
        let fut = self.inner.call(req);
        let done = node_create.then(|| self.counts.node_creates_done.clone());
        Box::pin(async move {
            let response = fut.await?;
            if let Some(done) = done
                && response.status().is_success()
                && let Ok(mut times) = done.lock()
            {
                times.push(Instant::now());
            }
            Ok(response)
        })
    }
}

/// The (resource[/subresource], verb) of a write request, as the embedded API counts them.
fn classify(method: &http::Method, path: &str) -> Option<(String, String)> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let rest = match *segs.first()? {
        "api" => segs.get(2..)?,
        "apis" => segs.get(3..)?,
        _ => return None,
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    let resource = match rest {
        [r] | [r, _] => (*r).to_string(),
        [r, _, sub, ..] => format!("{r}/{sub}"),
        [] => return None,
    };
    let verb = match *method {
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE if rest.len() == 1 => "deletecollection",
        http::Method::DELETE => "delete",
        _ => return None,
    };
    Some((resource, verb.to_string()))
}

/// A field of `/proc/<pid>/status` in MiB (kB fields) or as a count.
fn status_field(pid: &str, name: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(
            f64::NAN,
            |v| if name == "Threads:" { v } else { v / 1024.0 },
        )
}

/// `VmHWM` and `VmRSS` of a process, in MiB.
fn memory(pid: &str) -> (f64, f64) {
    (status_field(pid, "VmHWM:"), status_field(pid, "VmRSS:"))
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `kube-node run` defaults of every flag (and their `KUBE_NODE_*` environment overrides).
fn run_defaults() -> anyhow::Result<kube_node::cli::RunArgs> {
    match Cli::try_parse_from(["kube-node", "run"])?.command {
        Command::Run(args) => Ok(*args),
        _ => bail!("`kube-node run` did not parse as the run command"),
    }
}

/// The bench's NodeClass (zero boot and delete latency).
async fn setup_objects(cluster: &Harness) -> anyhow::Result<()> {
    let spec = serde_json::json!({
        "provider": {"type": "simulated", "simulated": {
            "instanceType": "sim.large", "zones": ["sim-a", "sim-b", "sim-c"],
            "bootDelay": "0s", "deleteDelay": "0s",
        }},
        "labels": {"node-role.kubernetes.io/worker": ""},
    });
    cluster.create_node_class(CLASS, spec).await?;
    Ok(())
}

fn node_set(name: &str, replicas: i32) -> anyhow::Result<NodeSet> {
    harness::node_set(name, CLASS, replicas)
}

fn kubelet_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The node-controller has finished the Node's registration: MachineReady=Ready and the
/// unregistered taint off.
fn usable(n: &Node) -> bool {
    let machine_ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "MachineReady" && c.status == "True")
        });
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter()
                .any(|t| t.key == kube_node_crds::names::UNREGISTERED_TAINT)
        });
    machine_ready && !tainted
}

/// Polls `f` every `every` until it returns Some, or gives up after `limit`.
async fn until<T, F, Fut>(limit: Duration, every: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("not reached within {limit:?}");
        }
        tokio::time::sleep(every).await;
    }
}

fn print_writes(title: &str, counts: &BTreeMap<(String, String), u64>, nodes: u64) {
    let total: u64 = counts.values().sum();
    println!(
        "  {title}: {total} writes, {:.2} per Node",
        total as f64 / nodes as f64
    );
    for ((resource, verb), n) in counts {
        println!(
            "    {:<24} {:<10} {:>7}  {:>6.2}/Node",
            resource,
            verb,
            n,
            *n as f64 / nodes as f64
        );
    }
}

/// The baseline kube-controller-manager's ReplicaSet controller stands for on a real cluster:
/// N Node creates by 16 parallel workers behind one token bucket at the controllers' QPS and
/// burst, on a fresh embedded API (nothing else running).
async fn raw_create_baseline(nodes: i32, qps: f64, burst: u32) -> anyhow::Result<Duration> {
    let api = EmbeddedApi::new();
    let client = ClientBuilder::new(api.service(), "default")
        .with_layer(&RateLimitLayer::new(qps, burst))
        .build();
    let node_api: Api<Node> = Api::all(client);
    let next = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (node_api, next) = (node_api.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= nodes {
                        return anyhow::Ok(());
                    }
                    let node: Node = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("raw-{i}"), "labels": {"bench": "raw"}},
                    }))?;
                    node_api.create(&PostParams::default(), &node).await?;
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    Ok(start.elapsed())
}

/// When the simulated cloud had seen `n` create calls since `base`, polled every 5 ms.
fn watch_creates(
    cloud: kube_node_provider_simulated::SimulatedCloud,
    base: u64,
    n: u64,
    start: Instant,
) -> tokio::task::JoinHandle<Duration> {
    tokio::spawn(async move {
        loop {
            if cloud.create_calls().saturating_sub(base) >= n {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

async fn scale_phase(nodes: i32, qps: f64, burst: u32) -> anyhow::Result<()> {
    // The baseline first, on its own quiet API server.
    let baseline = raw_create_baseline(nodes, qps, burst).await?;
    // One token bucket per controller, as `kube-node run` gives each its own client; a write
    // counter on each so the breakdown is per controller. The simulated kubelet stands for N
    // separate kubelets: its own unlimited client.
    let api = EmbeddedApi::new();
    let node_writes = WriteCounts::default();
    let nodeset_writes = WriteCounts::default();
    let event_writes = WriteCounts::default();
    // The node-controller's event path: its own client, as `kube-node run` gives it (the
    // writer's own token bucket limits it).
    let event_client = ClientBuilder::new(api.service(), "default")
        .with_layer(&event_writes)
        .build();
    let node_client = ClientBuilder::new(api.service(), "default")
        .with_layer(&node_writes)
        .with_layer(&RateLimitLayer::new(qps, burst))
        .build();
    let nodeset_client = ClientBuilder::new(api.service(), "default")
        .with_layer(&nodeset_writes)
        .with_layer(&RateLimitLayer::new(qps, burst))
        .build();
    let defaults = run_defaults()?;
    let (node_config, nodeset_config) = kube_node::run::controller_configs(
        "bench",
        &defaults.controllers,
        Some(API_SERVER_ENDPOINT.to_string()),
    );
    let mut cluster = Harness::builder()
        .with_api(api)
        .with_compiled_backends()
        .node_config(node_config)
        .nodeset_config(nodeset_config)
        .client(Role::NodeController, node_client)
        .client(Role::NodesetController, nodeset_client)
        .client(Role::Events, event_client)
        .controllers_stopped()
        .start()
        .await?;
    let (api, observer, cloud) = (
        cluster.api.clone(),
        cluster.client.clone(),
        cluster.cloud.clone(),
    );
    setup_objects(&cluster).await?;
    cluster.start_controllers();

    let sets: Api<NodeSet> = Api::all(observer.clone());
    let node_api: Api<Node> = Api::all(observer.clone());
    sets.create(&PostParams::default(), &node_set("bench", 0)?)
        .await?;
    until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let s = sets.get("bench").await?;
            Ok(s.status
                .is_some_and(|st| st.observed_generation == s.metadata.generation)
                .then_some(()))
        },
    )
    .await
    .context("NodeSet status at replicas 0")?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    api.reset_stats();
    node_writes.reset();
    nodeset_writes.reset();
    event_writes.reset();
    let kubelet0 = cloud.kubelet_writes();
    let scale = |n: i32| {
        let sets = sets.clone();
        async move {
            sets.patch_scale(
                "bench",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": n}})),
            )
            .await
        }
    };
    let limit = Duration::from_secs(1800);
    let poll = Duration::from_millis(100);

    let start = Instant::now();
    let n_u64 = u64::try_from(nodes)?;
    let launched = watch_creates(cloud.clone(), cloud.create_calls(), n_u64, start);
    scale(nodes).await?;
    let mut created = None;
    let ready = loop {
        let list = node_api.list_metadata(&ListParams::default()).await?;
        if created.is_none() && list.items.len() >= nodes as usize {
            created = Some(start.elapsed());
        }
        let s = sets.get("bench").await?;
        if s.status.is_some_and(|st| st.ready_replicas == nodes) {
            break start.elapsed();
        }
        if start.elapsed() > limit {
            bail!("scale-up not done within {limit:?}");
        }
        tokio::time::sleep(poll).await;
    };
    let polled_created = created.unwrap_or(ready);
    let created = nodeset_writes
        .nth_node_created(usize::try_from(nodes)?)
        .map_or(polled_created, |at| at.duration_since(start));
    // Ready is the kubelet's word; a Node takes pods once the node-controller has taken the
    // unregistered taint off and written MachineReady=Ready.
    let usable = until(limit, Duration::from_millis(50), || async {
        let list = node_api.list(&ListParams::default()).await?;
        let done = list.items.iter().filter(|n| usable(n)).count();
        Ok((done >= nodes as usize).then(|| start.elapsed()))
    })
    .await
    .context("waiting for every Node usable")?;
    let launched = launched.await?;
    let up_writes = node_writes.total() + nodeset_writes.total() + event_writes.total();
    let all = node_api.list(&ListParams::default()).await?;
    let ready_nodes = all.items.iter().filter(|n| kubelet_ready(n)).count();
    let (hwm_up, rss_up) = memory("self");

    let start = Instant::now();
    scale(0).await?;
    let gone = until(limit, poll, || async {
        let list = node_api.list_metadata(&ListParams::default()).await?;
        Ok(list.items.is_empty().then(|| start.elapsed()))
    })
    .await
    .context("scale-down")?;
    // Let the last status write and events land before counting.
    until(Duration::from_secs(60), poll, || async {
        let s = sets.get("bench").await?;
        Ok(s.status
            .is_some_and(|st| st.replicas == 0 && st.ready_replicas == 0)
            .then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let stats = api.stats();
    let kubelet_writes = cloud.kubelet_writes() - kubelet0;
    let bench_writes = 2; // the two /scale patches
    let from_stats = stats
        .total_writes()
        .saturating_sub(kubelet_writes)
        .saturating_sub(bench_writes);
    let node_counts = node_writes.snapshot();
    let nodeset_counts = nodeset_writes.snapshot();
    let event_counts = event_writes.snapshot();
    let ctrl_total = node_writes.total() + nodeset_writes.total() + event_writes.total();
    let n = u64::try_from(nodes)?;
    let (hwm, rss) = memory("self");

    println!("== phase 1: one NodeSet 0 -> {nodes} -> 0 (embedded API, in-process controllers)");
    println!(
        "client rate limit of the controllers: {qps} QPS, burst {burst} (one bucket per controller, as `kube-node run`)"
    );
    println!("NodeClass: simulated, bootDelay 0s, deleteDelay 0s");
    println!(
        "baseline: {nodes} raw Node creates (16 workers, one bucket at {qps} QPS, burst {burst}, quiet API) {:>7.2} s",
        baseline.as_secs_f64()
    );
    println!(
        "all {nodes} Nodes created after         {:>7.2} s  ({:.2} x baseline; target <= 1.0)",
        created.as_secs_f64(),
        created.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "  (the {nodes}th Node create answered on the nodeset-controller's client, as the baseline's last create; a 100 ms list poll saw them all after {:.2} s)",
        polled_created.as_secs_f64()
    );
    println!(
        "status.readyReplicas == {nodes} after    {:>7.2} s  ({:.2} x baseline; target <= 4.0; {ready_nodes} Nodes kubelet-Ready)",
        ready.as_secs_f64(),
        ready.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "all {nodes} Nodes usable after          {:>7.2} s  ({:.2} x baseline; MachineReady=Ready, unregistered taint off)",
        usable.as_secs_f64(),
        usable.as_secs_f64() / baseline.as_secs_f64()
    );
    println!(
        "{nodes}th provider create issued after {:>7.2} s  ({:.2} x the Nodes' creation; target <= 1.5)",
        launched.as_secs_f64(),
        launched.as_secs_f64() / created.as_secs_f64()
    );
    println!(
        "scale to 0: no Node left after       {:>7.2} s",
        gone.as_secs_f64()
    );
    println!(
        "API writes per Node lifecycle (create -> Ready -> delete), both controllers: {:.2}",
        ctrl_total as f64 / n as f64
    );
    println!(
        "  of which during the scale-up (to every Node usable): {:.2} per Node; the scale-down: {:.2} per Node",
        up_writes as f64 / n as f64,
        (ctrl_total - up_writes) as f64 / n as f64
    );
    print_writes("node-controller", &node_counts, n);
    print_writes(
        "node-controller events (best-effort path, own client)",
        &event_counts,
        n,
    );
    print_writes("nodeset-controller", &nodeset_counts, n);
    println!(
        "  cross-check from EmbeddedApi::stats(): {} writes in all - {kubelet_writes} by the simulated kubelet - {bench_writes} /scale patches by the bench = {from_stats} (counted on the controllers' clients: {ctrl_total})",
        stats.total_writes()
    );
    println!(
        "  every write the API server saw (including the simulated kubelet's), from EmbeddedApi::stats().requests:"
    );
    for (resource, verbs) in &stats.requests {
        for (verb, c) in verbs {
            if ["create", "update", "patch", "delete", "deletecollection"].contains(&verb.as_str())
            {
                println!("    {resource:<24} {verb:<10} {c:>7}");
            }
        }
    }
    println!(
        "peak RSS (VmHWM) of this process: {hwm:.1} MiB (at {nodes} Ready: VmRSS {rss_up:.1} MiB, VmHWM {hwm_up:.1} MiB; now VmRSS {rss:.1} MiB) — includes the embedded API server, the simulated cloud and kubelet, not only the controllers"
    );

    if let Err(e) = cluster.shutdown().await {
        println!("  the controllers did not stop cleanly: {e:#}");
    }
    Ok(())
}

async fn memory_phase(sets_n: usize, per_set: i32, qps: f64, burst: u32) -> anyhow::Result<()> {
    let total = sets_n * usize::try_from(per_set)?;
    let cluster = Harness::builder().api_only().start().await?;
    let (api, client) = (&cluster.api, cluster.client.clone());
    setup_objects(&cluster).await?;
    let server = api
        .serve("127.0.0.1:0".parse()?)
        .await
        .context("serving the embedded API")?;
    let dir = std::env::temp_dir().join(format!("kube-node-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig())?;

    let sets: Api<NodeSet> = Api::all(client.clone());
    for i in 0..sets_n {
        sets.create(
            &PostParams::default(),
            &node_set(&format!("pool-{i:03}"), per_set)?,
        )
        .await?;
    }
    // The kubelets are played by this process, so the child's memory is the controllers'.
    let kubelets = tokio::spawn(play_kubelets(client.clone()));
    // KUBE_NODE_BENCH_WRAP runs the child under a profiler, e.g. `heaptrack -o /tmp/kube-node`.
    let wrap: Vec<String> = std::env::var("KUBE_NODE_BENCH_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let mut command = match wrap.split_first() {
        Some((program, args)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(args).arg(env!("CARGO_BIN_EXE_kube-node"));
            c
        }
        None => tokio::process::Command::new(env!("CARGO_BIN_EXE_kube-node")),
    };
    let mut child = command
        .args([
            "run",
            "--cluster-name=bench",
            "--leader-elect=false",
            "--metrics-addr=127.0.0.1:0",
            "--simulated-kubelet=false",
            &format!("--kube-qps={qps}"),
            &format!("--kube-burst={burst}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBE_NODE_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting kube-node run")?;
    let pid = child.id().context("child pid")?.to_string();
    let start = Instant::now();
    let node_api: Api<Node> = Api::all(client.clone());
    let converged = until(
        Duration::from_secs(3600),
        Duration::from_secs(1),
        || async {
            let ready: i64 = sets
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .filter_map(|s| s.status.as_ref())
                .map(|s| i64::from(s.ready_replicas))
                .sum();
            Ok((ready == i64::try_from(total)?).then(|| start.elapsed()))
        },
    )
    .await
    .context("memory phase: waiting for all Nodes Ready")?;
    // Watched, steady: give the resync and the kubelet heartbeats a moment.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let nodes = node_api
        .list_metadata(&ListParams::default())
        .await?
        .items
        .len();
    let (child_hwm, child_rss) = memory(&pid);
    let (own_hwm, own_rss) = memory("self");
    println!(
        "== phase 2: {sets_n} NodeSets x {per_set} = {total} Nodes, `kube-node run` as a child process against the embedded API over HTTP (127.0.0.1)"
    );
    println!(
        "converged (all readyReplicas) after {:.1} s at {qps} QPS, burst {burst}; {nodes} Nodes in the API",
        converged.as_secs_f64()
    );
    println!(
        "kube-node run (both controllers and the simulated provider's {total} machines): VmHWM {child_hwm:.1} MiB, VmRSS {child_rss:.1} MiB"
    );
    println!(
        "  of VmRSS: RssAnon {:.1} MiB (heap, stacks), RssFile {:.1} MiB (the binary's pages); {} threads",
        status_field(&pid, "RssAnon:"),
        status_field(&pid, "RssFile:"),
        status_field(&pid, "Threads:")
    );
    println!(
        "  (a child process, so neither the API server nor the kubelets this process plays are counted)"
    );
    println!(
        "this process (embedded API server holding {nodes} Nodes, {sets_n} NodeSets, their Leases and events): VmHWM {own_hwm:.1} MiB, VmRSS {own_rss:.1} MiB"
    );
    if let Some(id) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &id.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(35), child.wait()).await;
    let _ = child.kill().await;
    kubelets.abort();
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Plays the kubelet of every Node that got a providerID: registers onto it with the status a
/// real kubelet writes (addresses, capacity, node info, a list of images, Ready), so the
/// controllers watch Nodes of a realistic size.
async fn play_kubelets(client: kube::Client) {
    use futures::StreamExt as _;
    use kube::runtime::{WatchStreamExt as _, watcher};
    let api: Api<Node> = Api::all(client);
    let images: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            serde_json::json!({
                "names": [format!("registry.example.com/team/app-{i}@sha256:{:064x}", i), format!("registry.example.com/team/app-{i}:v1.{i}.0")],
                "sizeBytes": 50_000_000 + i * 1_000_000,
            })
        })
        .collect();
    watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .for_each_concurrent(32, |node| {
            let api = api.clone();
            let images = images.clone();
            async move {
                let Ok(node) = node else { return };
                let has_pid = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.provider_id.as_deref())
                    .is_some_and(|p| !p.is_empty());
                if !has_pid || kubelet_ready(&node) || node.metadata.deletion_timestamp.is_some() {
                    return;
                }
                let now = jiff::Timestamp::now().to_string();
                let status = serde_json::json!({"status": {
                    "conditions": [
                        {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now},
                        {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": now, "lastTransitionTime": now},
                        {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure", "lastHeartbeatTime": now, "lastTransitionTime": now},
                        {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID", "lastHeartbeatTime": now, "lastTransitionTime": now},
                    ],
                    "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": node.metadata.name}],
                    "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110", "ephemeral-storage": "100Gi"},
                    "allocatable": {"cpu": "3800m", "memory": "15Gi", "pods": "110", "ephemeral-storage": "95Gi"},
                    "nodeInfo": {"machineID": "m", "systemUUID": "s", "bootID": "b", "kernelVersion": "6.1.0", "osImage": "Debian GNU/Linux 12", "containerRuntimeVersion": "containerd://1.7.0", "kubeletVersion": "v1.33.0", "kubeProxyVersion": "v1.33.0", "operatingSystem": "linux", "architecture": "amd64"},
                    "images": images,
                }});
                let _ = api
                    .patch_status(&node.name_any(), &PatchParams::default(), &Patch::Strategic(&status))
                    .await;
            }
        })
        .await;
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // `cargo bench` passes `--bench`; nothing to parse.
    let defaults = run_defaults()?;
    let qps = defaults.client.kube_qps;
    let burst = defaults.client.kube_burst;
    let nodes: i32 = env_num("KUBE_NODE_BENCH_NODES", 1000);
    let sets: usize = env_num("KUBE_NODE_BENCH_SETS", 100);
    let per_set: i32 = env_num("KUBE_NODE_BENCH_PER_SET", 50);
    let phases = std::env::var("KUBE_NODE_BENCH_PHASES").unwrap_or_else(|_| "scale,memory".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if phases.contains("scale") {
            scale_phase(nodes, qps, burst).await?;
        }
        if phases.contains("memory") {
            memory_phase(sets, per_set, qps, burst).await?;
        }
        anyhow::Ok(())
    })?;
    Ok(())
}
