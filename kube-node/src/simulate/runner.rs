//! Runs a scenario against the embedded API and prints a progress view and a summary.

use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube_node_crds::names;
use kube_node_crds::{NodeClass, NodeSet};
use kube_node_embedded_api::EmbeddedApi;
use nodeset_controller::drift::{BuildHash, drift};
use tokio::time::Instant;

use super::scenario::{Expect, ObjectRef, Scenario, Step};
use crate::cli::SimulateArgs;
use crate::harness::{API_SERVER_ENDPOINT, Harness};

const MANAGER: &str = "kube-node-simulate";

/// What one step did.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// The step's name.
    pub name: String,
    /// Time from the step's action to its expectation holding.
    pub converged_after: Option<Duration>,
    /// Nodes created during the step.
    pub nodes_created: u64,
    /// Nodes deleted during the step.
    pub nodes_deleted: u64,
    /// API writes by the controllers during the step (the simulated kubelet's are excluded).
    pub api_writes: u64,
    /// Provider calls during the step.
    pub provider_calls: u64,
    /// The most Nodes (asking for a machine, those being deleted included) seen at once
    /// during the step.
    pub peak_nodes: usize,
}

/// What a whole scenario did.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Per step.
    pub steps: Vec<StepReport>,
}

impl Summary {
    /// Whether every step converged.
    pub fn converged(&self) -> bool {
        self.steps.iter().all(|s| s.converged_after.is_some())
    }

    /// A printable table.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "\nstep                                              converged  nodes+  nodes-  peak  ctrl-writes provider-calls\n",
        );
        for s in &self.steps {
            let t = s.converged_after.map_or_else(
                || "TIMEOUT".to_string(),
                |d| format!("{:.1}s", d.as_secs_f64()),
            );
            out.push_str(&format!(
                "{:<50}{:>9}{:>8}{:>8}{:>6}{:>13}{:>16}\n",
                truncate(&s.name, 49),
                t,
                s.nodes_created,
                s.nodes_deleted,
                s.peak_nodes,
                s.api_writes,
                s.provider_calls
            ));
        }
        let total = |f: fn(&StepReport) -> u64| self.steps.iter().map(f).sum::<u64>();
        out.push_str(&format!(
            "{:<50}{:>9}{:>8}{:>8}{:>6}{:>13}{:>16}\n",
            "total",
            "",
            total(|s| s.nodes_created),
            total(|s| s.nodes_deleted),
            "",
            total(|s| s.api_writes),
            total(|s| s.provider_calls)
        ));
        out
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n.saturating_sub(1)).chain(['…']).collect()
    }
}

/// `kube-node simulate [SCENARIO]`.
pub async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let scenario = match &args.scenario {
        Some(path) => Scenario::load(path)?,
        None => Scenario::builtin()?,
    };
    if !scenario.description.is_empty() {
        println!("scenario: {}", scenario.description);
    }
    let summary = simulate_scenario(&scenario, &args).await?;
    println!("{}", summary.render());
    if !summary.converged() {
        bail!("some steps did not converge before their timeout");
    }
    Ok(())
}

/// A running simulation: the embedded API, the simulated cloud and both controllers.
struct Simulation {
    cluster: Harness,
}

impl Simulation {
    async fn start(args: &SimulateArgs) -> anyhow::Result<Self> {
        let (mut node_config, nodeset_config) = crate::run::controller_configs(
            "simulation",
            &args.controllers,
            Some(API_SERVER_ENDPOINT.to_string()),
        );
        // Simulated time is short: look for vanished machines and orphans every few seconds
        // rather than every minute (still overridable with --orphan-gc-interval).
        if node_config.orphan_gc_interval == std::time::Duration::from_secs(60) {
            node_config.orphan_gc_interval = std::time::Duration::from_secs(3);
        }
        let cluster = Harness::builder()
            .with_api(EmbeddedApi::new().with_watch_lag(args.watch_lag.into()))
            .with_compiled_backends()
            .node_config(node_config)
            .nodeset_config(nodeset_config)
            .start()
            .await?;
        Ok(Self { cluster })
    }

    async fn stop(self) {
        if let Err(e) = self.cluster.shutdown().await {
            tracing::warn!(error = %e, "simulation did not stop cleanly");
        }
    }

    fn provider_calls(&self) -> u64 {
        [
            "create",
            "get",
            "list",
            "delete",
            "validate",
            "target_size",
            "set_target_size",
            "delete_instances",
            "instances",
        ]
        .iter()
        .map(|m| self.cluster.provider_metrics.calls("simulated", m))
        .sum()
    }

    fn counters(&self) -> (u64, u64, u64) {
        let stats = self.cluster.api.stats();
        // The simulated kubelet's writes (status, Leases, pods) are the machines', not the
        // controllers'.
        let controller_writes = stats
            .total_writes()
            .saturating_sub(self.cluster.cloud.kubelet_writes());
        (
            stats.count("nodes", "create"),
            stats.count("nodes", "delete"),
            controller_writes,
        )
    }

    async fn act(&self, step: &Step) -> anyhow::Result<()> {
        for obj in &step.apply {
            self.apply(obj).await?;
        }
        if let Some(scale) = &step.scale {
            let api: Api<NodeSet> = Api::all(self.cluster.client.clone());
            api.patch_scale(
                &scale.node_set,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": scale.replicas}})),
            )
            .await
            .with_context(|| format!("scaling NodeSet {}", scale.node_set))?;
        }
        if let Some(remove) = &step.remove_nodes {
            let mut nodes = self.nodes_of(&remove.node_set).await?;
            nodes.sort_by_key(|n| n.creation_timestamp().map(|t| t.0));
            let names: Vec<String> = nodes
                .iter()
                .take(remove.count)
                .map(|n| n.name_any())
                .collect();
            nodeset_controller::remove_nodes(&self.cluster.client, &remove.node_set, &names)
                .await
                .with_context(|| format!("removing {names:?} from NodeSet {}", remove.node_set))?;
        }
        if let Some(n) = step.terminate_machines {
            for m in self.cluster.cloud.machines().into_iter().take(n) {
                self.cluster.cloud.terminate_out_of_band(&m.provider_id);
            }
        }
        for p in &step.patch {
            let ar = api_resource(&p.kind)?;
            let api: Api<DynamicObject> = Api::all_with(self.cluster.client.clone(), &ar);
            api.patch(&p.name, &PatchParams::default(), &Patch::Merge(&p.patch))
                .await
                .with_context(|| format!("patching {} {}", p.kind, p.name))?;
        }
        for ObjectRef { kind, name } in &step.delete {
            let ar = api_resource(kind)?;
            let api: Api<DynamicObject> = Api::all_with(self.cluster.client.clone(), &ar);
            api.delete(name, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting {kind} {name}"))?;
        }
        Ok(())
    }

    async fn apply(&self, obj: &serde_yaml::Value) -> anyhow::Result<()> {
        let value: serde_json::Value = serde_json::to_value(obj)?;
        let kind = value["kind"]
            .as_str()
            .context("apply: a manifest has no kind")?;
        let name = value["metadata"]["name"]
            .as_str()
            .context("apply: a manifest has no metadata.name")?;
        let ar = api_resource(kind)?;
        let api: Api<DynamicObject> = Api::all_with(self.cluster.client.clone(), &ar);
        api.patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await
        .with_context(|| format!("applying {kind} {name}"))?;
        Ok(())
    }

    async fn nodes_of(&self, nodeset: &str) -> anyhow::Result<Vec<Node>> {
        let nodes = Api::<Node>::all(self.cluster.client.clone())
            .list(&ListParams::default())
            .await?;
        Ok(nodes
            .items
            .into_iter()
            .filter(|n| {
                n.owner_references()
                    .iter()
                    .any(|o| o.kind == "NodeSet" && o.name == nodeset)
                    && n.metadata.deletion_timestamp.is_none()
            })
            .collect())
    }

    async fn observe(&self, expect: &Expect) -> anyhow::Result<Observed> {
        let nodes = Api::<Node>::all(self.cluster.client.clone())
            .list(&ListParams::default())
            .await?;
        let annotated: Vec<&Node> = nodes
            .items
            .iter()
            .filter(|n| n.annotations().contains_key(names::NODE_CLASS_ANNOTATION))
            .collect();
        let ready = annotated.iter().filter(|n| kubelet_ready(n)).count();
        let nodeset = match &expect.node_set {
            Some(ns) => {
                Api::<NodeSet>::all(self.cluster.client.clone())
                    .get_opt(ns)
                    .await?
            }
            None => None,
        };
        let ready_replicas = nodeset
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .map(|s| s.ready_replicas);
        let up_to_date = match (&nodeset, expect.up_to_date) {
            (Some(ns), Some(_)) => Some(self.up_to_date(ns, &annotated).await?),
            _ => None,
        };
        Ok(Observed {
            nodes: annotated.len(),
            ready_nodes: ready,
            machines: self.cluster.cloud.machine_count(),
            ready_replicas,
            up_to_date,
        })
    }

    /// Whether every live Node of the NodeSet carries the build hash of its current template
    /// and NodeClass.
    async fn up_to_date(&self, ns: &NodeSet, nodes: &[&Node]) -> anyhow::Result<bool> {
        let class = ns.class_for_new_nodes();
        let Some(spec) = Api::<NodeClass>::all(self.cluster.client.clone())
            .get_opt(class)
            .await?
            .map(|c| c.spec)
        else {
            return Ok(false);
        };
        let target = BuildHash::of(class, &spec);
        let uid = ns.metadata.uid.as_deref();
        Ok(nodes
            .iter()
            .filter(|n| {
                n.metadata.deletion_timestamp.is_none()
                    && n.owner_references()
                        .iter()
                        .any(|o| Some(o.uid.as_str()) == uid)
            })
            .all(|n| {
                let a = n.annotations();
                BuildHash::parse(
                    a.get(names::NODE_CLASS_ANNOTATION).map(String::as_str),
                    a.get(names::BUILD_HASH_ANNOTATION).map(String::as_str),
                )
                .is_some_and(|b| drift(&target, &b).is_none())
            }))
    }
}

/// What the progress view shows.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    nodes: usize,
    ready_nodes: usize,
    machines: usize,
    ready_replicas: Option<i32>,
    up_to_date: Option<bool>,
}

impl Observed {
    fn satisfies(&self, e: &Expect) -> bool {
        e.nodes.is_none_or(|n| n == self.nodes)
            && e.machines.is_none_or(|n| n == self.machines)
            && e.ready_replicas
                .is_none_or(|n| Some(n) == self.ready_replicas)
            && e.up_to_date.is_none_or(|u| Some(u) == self.up_to_date)
    }
}

fn kubelet_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn api_resource(kind: &str) -> anyhow::Result<ApiResource> {
    Ok(match kind {
        "NodeClass" => ApiResource::erase::<NodeClass>(&()),
        "NodeSet" => ApiResource::erase::<NodeSet>(&()),
        "Node" => ApiResource::erase::<Node>(&()),
        other => bail!("kind {other:?} is not supported in scenarios (NodeClass, NodeSet, Node)"),
    })
}

/// Runs every step; returns the per-step report.
pub async fn simulate_scenario(
    scenario: &Scenario,
    args: &SimulateArgs,
) -> anyhow::Result<Summary> {
    let sim = Simulation::start(args).await?;
    let progress_every: Duration = args.progress_interval.into();
    let started = Instant::now();
    let mut summary = Summary::default();
    let total = scenario.steps.len();
    for (i, step) in scenario.steps.iter().enumerate() {
        let (c0, d0, w0) = sim.counters();
        let p0 = sim.provider_calls();
        let step_start = Instant::now();
        if !args.quiet {
            println!(
                "[{:>6.1}s] step {}/{}: {}",
                started.elapsed().as_secs_f64(),
                i + 1,
                total,
                step.name
            );
        }
        if let Err(e) = sim.act(step).await {
            sim.stop().await;
            return Err(e.context(format!("step {}: {}", i + 1, step.name)));
        }
        let timeout: Duration = step.timeout.map_or(Duration::from_secs(120), Into::into);
        let expect = step.expect.clone().unwrap_or_default();
        let mut last_print = Instant::now();
        let mut peak_nodes = 0;
        let converged_after = loop {
            let observed = sim.observe(&expect).await?;
            peak_nodes = peak_nodes.max(observed.nodes);
            if observed.satisfies(&expect) {
                break Some(step_start.elapsed());
            }
            if step_start.elapsed() > timeout {
                println!(
                    "           step {} timed out: {observed:?}, expected {expect:?}",
                    i + 1
                );
                break None;
            }
            if !args.quiet && last_print.elapsed() >= progress_every {
                last_print = Instant::now();
                println!(
                    "[{:>6.1}s]   nodes {:>4} (ready {:>4})  machines {:>4}{}",
                    started.elapsed().as_secs_f64(),
                    observed.nodes,
                    observed.ready_nodes,
                    observed.machines,
                    observed
                        .ready_replicas
                        .map(|r| format!("  nodeset ready {r}"))
                        .unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (c1, d1, w1) = sim.counters();
        if let (false, Some(t)) = (args.quiet, converged_after) {
            println!(
                "[{:>6.1}s]   converged in {:.1}s",
                started.elapsed().as_secs_f64(),
                t.as_secs_f64()
            );
        }
        summary.steps.push(StepReport {
            name: step.name.clone(),
            converged_after,
            nodes_created: c1 - c0,
            nodes_deleted: d1 - d0,
            api_writes: w1 - w0,
            provider_calls: sim.provider_calls() - p0,
            peak_nodes,
        });
        if converged_after.is_none() {
            break;
        }
    }
    sim.stop().await;
    Ok(summary)
}
