//! The simulated cloud: every simulated machine of every NodeClass, and the provider bound to
//! one NodeClass.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube_node_crds::names::{GROUP_LABEL, tags};
use kube_node_crds::v1alpha1::SimulatedFaults;
use kube_node_provider::{
    Capabilities, CreateRequest, DeleteOutcome, GroupProvider, Instance, InstanceAddress,
    InstanceState, ListFilter, Provider, ProviderError, ProviderFactory, ResolvedClass, Result,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::config::{SimConfig, fnv1a};

/// The backend name, as in `spec.provider.type` and the provider ID scheme.
pub const PROVIDER_NAME: &str = "simulated";
const PROVIDER_ID_PREFIX: &str = "simulated:///";

/// How long the simulated cloud asks a throttled caller to wait.
pub const THROTTLE_RETRY_AFTER: Duration = Duration::from_secs(1);

/// A provider method, for call counters and injected errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    /// [`Provider::validate`].
    Validate,
    /// [`Provider::create`].
    Create,
    /// [`Provider::get`].
    Get,
    /// [`Provider::list`].
    List,
    /// [`Provider::delete`].
    Delete,
    /// [`GroupProvider::target_size`].
    TargetSize,
    /// [`GroupProvider::set_target_size`].
    SetTargetSize,
    /// [`GroupProvider::delete_instances`].
    DeleteInstances,
    /// [`GroupProvider::instances`].
    Instances,
}

impl Method {
    /// The method's name, as in the provider metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validate => "validate",
            Self::Create => "create",
            Self::Get => "get",
            Self::List => "list",
            Self::Delete => "delete",
            Self::TargetSize => "target_size",
            Self::SetTargetSize => "set_target_size",
            Self::DeleteInstances => "delete_instances",
            Self::Instances => "instances",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "validate" => Self::Validate,
            "create" => Self::Create,
            "get" => Self::Get,
            "list" => Self::List,
            "delete" => Self::Delete,
            "target_size" => Self::TargetSize,
            "set_target_size" => Self::SetTargetSize,
            "delete_instances" => Self::DeleteInstances,
            "instances" => Self::Instances,
            _ => return None,
        })
    }
}

/// One simulated machine.
#[derive(Clone, Debug)]
pub(crate) struct Machine {
    pub id: String,
    pub provider_id: String,
    pub zone: String,
    pub instance_type: String,
    pub tags: BTreeMap<String, String>,
    pub idempotency_key: String,
    pub node_name: String,
    pub class_name: String,
    pub created_at: Instant,
    pub created_unix: i64,
    pub boot_delay: Duration,
    pub delete_delay: Duration,
    pub list_lag: Duration,
    pub deleted_at: Option<Instant>,
    pub register: bool,
    pub internal_ip: String,
    /// The class's maps, shared by its machines: with thousands of machines, a copy each was
    /// a large part of the simulated cloud's memory.
    pub node_capacity: Arc<BTreeMap<String, Quantity>>,
    pub node_allocatable: Arc<BTreeMap<String, Quantity>>,
    /// The simulated group it belongs to (its kubelet then creates its Node, labelled).
    pub group: Option<String>,
}

impl Machine {
    /// Its state at `now`, or `None` once it is gone.
    pub fn state(&self, now: Instant) -> Option<InstanceState> {
        match self.deleted_at {
            Some(at) if now >= at + self.delete_delay => None,
            Some(_) => Some(InstanceState::Terminating),
            None if now >= self.created_at + self.boot_delay => Some(InstanceState::Running),
            None => Some(InstanceState::Pending),
        }
    }

    fn instance(&self, state: InstanceState) -> Instance {
        Instance {
            id: self.id.clone(),
            provider_id: self.provider_id.clone(),
            state,
            tags: self.tags.clone(),
            zone: Some(self.zone.clone()),
            instance_type: Some(self.instance_type.clone()),
            addresses: vec![
                InstanceAddress {
                    kind: "InternalIP".into(),
                    address: self.internal_ip.clone(),
                },
                InstanceAddress {
                    kind: "Hostname".into(),
                    address: self.node_name.clone(),
                },
            ],
            created_unix: Some(self.created_unix),
            labels: Default::default(),
            failure: None,
        }
    }
}

/// Per-NodeClass random state: re-seeded when the class's seed changes, kept across provider
/// rebuilds otherwise, so a run replays exactly.
struct ClassState {
    seed: u64,
    rng: StdRng,
    create_calls: u64,
    next_zone: usize,
}

/// A simulated group (a managed instance group): its target size, and every machine that was
/// ever its member (so a deletion of a gone member is told from a foreign provider ID).
struct GroupState {
    config: SimConfig,
    target: u32,
    members: HashSet<String>,
}

#[derive(Default)]
pub(crate) struct State {
    /// Machines by id, including Terminating ones until their delete delay has passed.
    machines: BTreeMap<String, Machine>,
    /// Idempotency key → id of the machine created for it (while it is not terminating).
    by_key: HashMap<String, String>,
    classes: HashMap<String, ClassState>,
    calls: BTreeMap<Method, u64>,
    injected: HashMap<Method, VecDeque<ProviderError>>,
    /// Fault overrides by NodeClass name (take precedence over the NodeClass's own faults).
    faults: HashMap<String, SimulatedFaults>,
    id_counter: u64,
    /// Machines launched by `create` (an idempotent repeat of a create launches none).
    launches: u64,
    /// Simulated groups by name.
    groups: BTreeMap<String, GroupState>,
}

impl State {
    /// Drops machines whose delete delay has passed, and has every group launch the machines
    /// it lacks (as a managed instance group replaces the ones that vanished).
    fn sweep(&mut self, now: Instant) {
        let gone: Vec<String> = self
            .machines
            .values()
            .filter(|m| m.state(now).is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in gone {
            self.remove(&id);
        }
        let groups: Vec<String> = self.groups.keys().cloned().collect();
        for g in groups {
            self.fill_group(&g, now);
        }
    }

    /// The live (not terminating) machines of a group, oldest first.
    fn group_live(&self, group: &str, now: Instant) -> Vec<String> {
        let mut live: Vec<&Machine> = self
            .machines
            .values()
            .filter(|m| m.group.as_deref() == Some(group))
            .filter(|m| matches!(m.state(now), Some(s) if s != InstanceState::Terminating))
            .collect();
        live.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        live.into_iter().map(|m| m.id.clone()).collect()
    }

    /// Brings a group's live machines to its target: launches the missing ones (within the
    /// class's capacity and quota, as a cloud would keep trying) or, when the target was
    /// lowered without naming machines, deletes the newest ones of its own choice.
    fn fill_group(&mut self, group: &str, now: Instant) {
        let Some(g) = self.groups.get(group) else {
            return;
        };
        let (target, cfg) = (g.target as usize, g.config.clone());
        let live = self.group_live(group, now);
        if live.len() > target {
            for id in live.iter().rev().take(live.len() - target) {
                if let Some(m) = self.machines.get_mut(id) {
                    m.deleted_at = Some(now);
                }
            }
            return;
        }
        let limit = [cfg.capacity, cfg.quota]
            .into_iter()
            .flatten()
            .min()
            .map_or(usize::MAX, |l| l as usize);
        for _ in live.len()..target {
            if self.class_count(&cfg.class_name, now) >= limit {
                break;
            }
            self.launch_group_machine(group, &cfg, now);
        }
    }

    fn launch_group_machine(&mut self, group: &str, cfg: &SimConfig, now: Instant) {
        let class = self.class(cfg);
        let zone = cfg.zones[class.next_zone % cfg.zones.len()].clone();
        class.next_zone = class.next_zone.wrapping_add(1);
        let id = self.next_id();
        // Named by the group, as GKE names a pool's VMs: `sim-<group>-<12 hex digits>`.
        let node_name = format!("sim-{group}-{}", id.trim_start_matches("sim-"));
        let tags = BTreeMap::from([
            (tags::CLUSTER.to_string(), cfg.cluster_name.clone()),
            (tags::NODE_CLASS.to_string(), cfg.class_name.clone()),
            (tags::NODE_NAME.to_string(), node_name.clone()),
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
        ]);
        let provider_id = format!("{PROVIDER_ID_PREFIX}{zone}/{id}");
        tracing::debug!(
            provider = PROVIDER_NAME,
            group,
            node = %node_name,
            provider_id = %provider_id,
            "simulated group launched a machine"
        );
        if let Some(g) = self.groups.get_mut(group) {
            g.members.insert(provider_id.clone());
        }
        let machine = Machine {
            provider_id,
            zone,
            instance_type: cfg.instance_type.clone(),
            tags,
            idempotency_key: String::new(),
            node_name,
            class_name: cfg.class_name.clone(),
            created_at: now,
            created_unix: jiff::Timestamp::now().as_second(),
            boot_delay: cfg.boot_delay,
            delete_delay: cfg.delete_delay,
            list_lag: cfg.list_lag,
            deleted_at: None,
            register: cfg.register,
            internal_ip: internal_ip(&id),
            node_capacity: cfg.node_capacity.clone(),
            node_allocatable: cfg.node_allocatable.clone(),
            group: Some(group.to_string()),
            id: id.clone(),
        };
        self.machines.insert(id, machine);
    }

    fn remove(&mut self, id: &str) -> Option<Machine> {
        let m = self.machines.remove(id)?;
        if self.by_key.get(&m.idempotency_key) == Some(&m.id) {
            self.by_key.remove(&m.idempotency_key);
        }
        Some(m)
    }

    fn next_id(&mut self) -> String {
        loop {
            self.id_counter += 1;
            // A bijective mix of a counter: ids look random, never repeat within 2^48, and the
            // n-th machine of a run always gets the same id.
            let id = format!(
                "sim-{:012x}",
                splitmix64(self.id_counter) & 0xffff_ffff_ffff
            );
            if !self.machines.contains_key(&id) {
                return id;
            }
        }
    }

    fn count_call(&mut self, method: Method) {
        *self.calls.entry(method).or_default() += 1;
    }

    fn take_injected(&mut self, method: Method) -> Option<ProviderError> {
        self.injected.get_mut(&method)?.pop_front()
    }

    fn class(&mut self, config: &SimConfig) -> &mut ClassState {
        let entry = self
            .classes
            .entry(config.class_name.clone())
            .or_insert_with(|| ClassState {
                seed: config.seed,
                rng: StdRng::seed_from_u64(config.seed),
                create_calls: 0,
                next_zone: 0,
            });
        if entry.seed != config.seed {
            *entry = ClassState {
                seed: config.seed,
                rng: StdRng::seed_from_u64(config.seed),
                create_calls: 0,
                next_zone: 0,
            };
        }
        entry
    }

    /// Machines of a class that still exist (capacity and quota count Terminating ones: a
    /// machine shutting down still holds its slot).
    fn class_count(&self, class: &str, now: Instant) -> usize {
        self.machines
            .values()
            .filter(|m| m.class_name == class && m.state(now).is_some())
            .count()
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// An address in 10.0.0.0/8 derived from the machine id, stable for the machine's life.
fn internal_ip(id: &str) -> String {
    let h = fnv1a(id.as_bytes());
    format!(
        "10.{}.{}.{}",
        (h >> 16) & 0xff,
        (h >> 8) & 0xff,
        // .0 and .255 look odd in a node's addresses.
        (h & 0xff) % 254 + 1
    )
}

/// The machine id in a simulated provider ID, when it is one.
pub fn parse_provider_id(provider_id: &str) -> Option<(&str, &str)> {
    let rest = provider_id.strip_prefix(PROVIDER_ID_PREFIX)?;
    let (zone, id) = rest.split_once('/')?;
    (!zone.is_empty() && !id.is_empty() && !id.contains('/')).then_some((zone, id))
}

pub(crate) struct Shared {
    state: Mutex<State>,
    pub(crate) kubelet_writes: AtomicU64,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters to a simulation, so a poisoned lock is still used.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A machine the simulated kubelet should play, as seen at one instant.
#[derive(Clone, Debug)]
pub(crate) struct KubeletTarget {
    pub node_name: String,
    pub provider_id: String,
    pub id: String,
    pub internal_ip: String,
    pub capacity: Arc<BTreeMap<String, Quantity>>,
    pub allocatable: Arc<BTreeMap<String, Quantity>>,
    /// For a machine of a group: the labels its kubelet registers its Node with (it creates
    /// the Node, as a cloud's kubelet does). `None`: the Node exists already (kube-node made it).
    pub register_labels: Option<BTreeMap<String, String>>,
}

/// The shared state of every simulated machine of every NodeClass: the simulated "cloud
/// account". Cheap to clone; clones share the machines.
///
/// Register it with `registry.register(cloud.factory())`; tests and the `simulate` command use
/// the hooks (`machines`, `terminate_out_of_band`, `inject_error`, ...) to look behind the
/// controllers' back.
#[derive(Clone)]
pub struct SimulatedCloud {
    pub(crate) shared: Arc<Shared>,
}

impl Default for SimulatedCloud {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for SimulatedCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedCloud")
            .field("machines", &self.machine_count())
            .finish()
    }
}

impl SimulatedCloud {
    /// An empty cloud.
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                kubelet_writes: AtomicU64::new(0),
            }),
        }
    }

    /// The factory to register in a `ProviderRegistry` (`spec.provider.type: simulated`).
    pub fn factory(&self) -> Arc<dyn ProviderFactory> {
        Arc::new(SimulatedFactory {
            cloud: self.clone(),
        })
    }

    /// The provider of one NodeClass (what the factory builds, with its concrete type).
    pub fn provider(&self, class: &ResolvedClass) -> Result<SimulatedProvider> {
        Ok(SimulatedProvider {
            cloud: self.clone(),
            config: SimConfig::from_class(class)?,
        })
    }

    /// Every machine that still exists (Terminating ones included), whatever its class or
    /// list lag, ordered by id.
    pub fn machines(&self) -> Vec<Instance> {
        let now = Instant::now();
        let mut st = self.shared.lock();
        st.sweep(now);
        st.machines
            .values()
            .filter_map(|m| m.state(now).map(|s| m.instance(s)))
            .collect()
    }

    /// How many machines still exist.
    pub fn machine_count(&self) -> usize {
        let now = Instant::now();
        let mut st = self.shared.lock();
        st.sweep(now);
        st.machines.len()
    }

    /// Makes a machine vanish at once, behind the controllers' back (a spot reclaim, a human
    /// in the console). Returns whether it existed.
    pub fn terminate_out_of_band(&self, provider_id: &str) -> bool {
        let Some((_, id)) = parse_provider_id(provider_id) else {
            return false;
        };
        let mut st = self.shared.lock();
        match st.machines.get(id) {
            Some(m) if m.provider_id == provider_id => st.remove(id).is_some(),
            _ => false,
        }
    }

    /// Makes the next call of `method` (of any NodeClass) fail with `error`. Several injected
    /// errors are returned in order.
    pub fn inject_error(&self, method: Method, error: ProviderError) {
        self.shared
            .lock()
            .injected
            .entry(method)
            .or_default()
            .push_back(error);
    }

    /// Makes the next create call fail with `error`.
    pub fn inject_next_create_error(&self, error: ProviderError) {
        self.inject_error(Method::Create, error);
    }

    /// Overrides the faults of a NodeClass (`None` goes back to the NodeClass's own).
    pub fn set_faults(&self, node_class: &str, faults: Option<SimulatedFaults>) {
        let mut st = self.shared.lock();
        match faults {
            Some(f) => st.faults.insert(node_class.to_string(), f),
            None => st.faults.remove(node_class),
        };
    }

    /// How many calls of a method (`create`, `get`, `list`, `delete`, `validate`) reached the
    /// cloud, whatever their result.
    pub fn calls(&self, method: &str) -> u64 {
        Method::parse(method).map_or(0, |m| {
            self.shared.lock().calls.get(&m).copied().unwrap_or(0)
        })
    }

    /// How many create calls reached the cloud, idempotent repeats and failures included.
    pub fn create_calls(&self) -> u64 {
        self.calls("create")
    }

    /// How many machines `create` launched: a repeat of a create for a machine that exists
    /// (a pass retried after its providerID write failed) launches none, so this is what a
    /// replacement budget counts.
    pub fn launches(&self) -> u64 {
        self.shared.lock().launches
    }

    /// How many writes the simulated kubelet has made to the Kubernetes API (so a benchmark
    /// can tell them from the controllers' writes).
    pub fn kubelet_writes(&self) -> u64 {
        self.shared.kubelet_writes.load(Ordering::Relaxed)
    }

    /// The machines the kubelet plays: Running, registering, keyed by node name.
    pub(crate) fn kubelet_targets(&self, now: Instant) -> HashMap<String, KubeletTarget> {
        let mut st = self.shared.lock();
        st.sweep(now);
        let mut out = HashMap::new();
        for m in st.machines.values() {
            if !m.register || m.state(now) != Some(InstanceState::Running) {
                continue;
            }
            let node_name = m
                .tags
                .get(tags::NODE_NAME)
                .cloned()
                .unwrap_or_else(|| m.node_name.clone());
            if node_name.is_empty() {
                continue;
            }
            out.insert(
                node_name.clone(),
                KubeletTarget {
                    node_name,
                    provider_id: m.provider_id.clone(),
                    id: m.id.clone(),
                    internal_ip: m.internal_ip.clone(),
                    capacity: m.node_capacity.clone(),
                    allocatable: m.node_allocatable.clone(),
                    register_labels: m.group.as_ref().map(|g| {
                        BTreeMap::from([
                            (GROUP_LABEL.to_string(), g.clone()),
                            (
                                "node.kubernetes.io/instance-type".to_string(),
                                m.instance_type.clone(),
                            ),
                            ("topology.kubernetes.io/zone".to_string(), m.zone.clone()),
                        ])
                    }),
                },
            );
        }
        out
    }
}

/// Builds [`SimulatedProvider`]s bound to one [`SimulatedCloud`].
pub struct SimulatedFactory {
    cloud: SimulatedCloud,
}

impl ProviderFactory for SimulatedFactory {
    fn provider_type(&self) -> &'static str {
        PROVIDER_NAME
    }

    fn build(&self, class: &ResolvedClass) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(self.cloud.provider(class)?))
    }
}

/// The simulated backend bound to one NodeClass.
#[derive(Clone, Debug)]
pub struct SimulatedProvider {
    cloud: SimulatedCloud,
    config: SimConfig,
}

impl SimulatedProvider {
    /// The resolved configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The injected or random fault of this call, if any. Draws from the class's RNG on every
    /// create call so a run with the same seed replays exactly.
    fn create_fault(&self, st: &mut State) -> Option<ProviderError> {
        let faults = st
            .faults
            .get(&self.config.class_name)
            .cloned()
            .unwrap_or_else(|| self.config.faults.clone());
        let class = st.class(&self.config);
        class.create_calls += 1;
        let n = class.create_calls;
        let draw: u32 = class.rng.random_range(0..100);
        if faults.fail_create_call.is_some_and(|k| u64::from(k) == n) {
            return Some(ProviderError::Transient(format!(
                "simulated failure of create call {n} (faults.failCreateCall)"
            )));
        }
        let ic = faults.insufficient_capacity_percent;
        let th = ic.saturating_add(faults.throttle_percent);
        let tr = th.saturating_add(faults.transient_percent);
        if draw < ic {
            Some(ProviderError::InsufficientCapacity(format!(
                "simulated: no capacity for {} in this zone now",
                self.config.instance_type
            )))
        } else if draw < th {
            Some(ProviderError::Throttled {
                message: "simulated: request rate exceeded".into(),
                retry_after: Some(THROTTLE_RETRY_AFTER),
            })
        } else if draw < tr {
            Some(ProviderError::Transient(
                "simulated: the cloud API returned 503".into(),
            ))
        } else {
            None
        }
    }
}

#[async_trait]
impl Provider for SimulatedProvider {
    fn name(&self) -> &'static str {
        PROVIDER_NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            group_sized: self.config.group.is_some(),
            eventually_consistent_list: !self.config.list_lag.is_zero(),
        }
    }

    async fn validate(&self) -> Result<()> {
        let mut st = self.cloud.shared.lock();
        st.count_call(Method::Validate);
        if let Some(e) = st.take_injected(Method::Validate) {
            return Err(e);
        }
        // The configuration was checked when this provider was built.
        Ok(())
    }

    async fn create(&self, request: &CreateRequest) -> Result<Instance> {
        if self.config.group.is_some() {
            return Err(ProviderError::Unimplemented(format!(
                "NodeClass {} is group-backed: its group creates the machines",
                self.config.class_name
            )));
        }
        if request.idempotency_key.is_empty() {
            return Err(ProviderError::InvalidConfig(
                "create request: the idempotency key (Node UID) is empty".into(),
            ));
        }
        let now = Instant::now();
        let cfg = &self.config;
        // One lock for the whole call: the look-up by key and the launch are atomic, so
        // concurrent creates with one key launch one machine.
        let mut st = self.cloud.shared.lock();
        st.count_call(Method::Create);
        if let Some(e) = st.take_injected(Method::Create) {
            return Err(e);
        }
        if let Some(e) = self.create_fault(&mut st) {
            return Err(e);
        }
        st.sweep(now);
        if let Some(id) = st.by_key.get(&request.idempotency_key)
            && let Some(m) = st.machines.get(id)
            && let Some(state) = m.state(now)
            && state != InstanceState::Terminating
        {
            return Ok(m.instance(state));
        }
        let existing = st.class_count(&cfg.class_name, now);
        if let Some(cap) = cfg.capacity
            && existing >= cap as usize
        {
            return Err(ProviderError::InsufficientCapacity(format!(
                "simulated: capacity of {cap} {} machines reached",
                cfg.instance_type
            )));
        }
        if let Some(quota) = cfg.quota
            && existing >= quota as usize
        {
            return Err(ProviderError::QuotaExceeded(format!(
                "simulated: quota of {quota} machines reached"
            )));
        }
        let class = st.class(cfg);
        let zone = cfg.zones[class.next_zone % cfg.zones.len()].clone();
        class.next_zone = class.next_zone.wrapping_add(1);
        let id = st.next_id();
        let machine = Machine {
            provider_id: format!("{PROVIDER_ID_PREFIX}{zone}/{id}"),
            zone,
            instance_type: cfg.instance_type.clone(),
            tags: request.tags.clone(),
            idempotency_key: request.idempotency_key.clone(),
            node_name: request.node_name.clone(),
            class_name: cfg.class_name.clone(),
            created_at: now,
            created_unix: jiff::Timestamp::now().as_second(),
            boot_delay: cfg.boot_delay,
            delete_delay: cfg.delete_delay,
            list_lag: cfg.list_lag,
            deleted_at: None,
            register: cfg.register,
            internal_ip: internal_ip(&id),
            node_capacity: cfg.node_capacity.clone(),
            node_allocatable: cfg.node_allocatable.clone(),
            group: None,
            id: id.clone(),
        };
        let state = machine.state(now).unwrap_or(InstanceState::Pending);
        let instance = machine.instance(state);
        tracing::debug!(
            provider = PROVIDER_NAME,
            nodeclass = %cfg.class_name,
            node = %request.node_name,
            provider_id = %machine.provider_id,
            zone = %machine.zone,
            "simulated machine launched"
        );
        st.by_key
            .insert(request.idempotency_key.clone(), id.clone());
        st.machines.insert(id, machine);
        st.launches += 1;
        Ok(instance)
    }

    async fn get(&self, provider_id: &str) -> Result<Instance> {
        let now = Instant::now();
        let mut st = self.cloud.shared.lock();
        st.count_call(Method::Get);
        if let Some(e) = st.take_injected(Method::Get) {
            return Err(e);
        }
        // A provider ID of another backend or a malformed one names no simulated machine.
        let not_found = || ProviderError::NotFound(provider_id.to_string());
        let (_, id) = parse_provider_id(provider_id).ok_or_else(not_found)?;
        let m = st.machines.get(id).ok_or_else(not_found)?;
        if m.provider_id != provider_id {
            return Err(not_found());
        }
        let state = m.state(now).ok_or_else(not_found)?;
        Ok(m.instance(state))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        let now = Instant::now();
        let mut st = self.cloud.shared.lock();
        st.count_call(Method::List);
        if let Some(e) = st.take_injected(Method::List) {
            return Err(e);
        }
        st.sweep(now);
        Ok(st
            .machines
            .values()
            .filter(|m| m.tags.get(tags::CLUSTER) == Some(&filter.cluster))
            .filter(|m| {
                filter
                    .node_class
                    .as_ref()
                    .is_none_or(|c| m.tags.get(tags::NODE_CLASS) == Some(c))
            })
            // Eventual consistency: a machine is invisible to list for its list lag.
            .filter(|m| now >= m.created_at + m.list_lag)
            .filter_map(|m| m.state(now).map(|s| m.instance(s)))
            .collect())
    }

    async fn delete(&self, provider_id: &str) -> Result<DeleteOutcome> {
        let now = Instant::now();
        let mut st = self.cloud.shared.lock();
        st.count_call(Method::Delete);
        if let Some(e) = st.take_injected(Method::Delete) {
            return Err(e);
        }
        let Some((_, id)) = parse_provider_id(provider_id) else {
            return Ok(DeleteOutcome::Gone);
        };
        let id = id.to_string();
        let Some(m) = st.machines.get_mut(&id) else {
            return Ok(DeleteOutcome::Gone);
        };
        if m.provider_id != provider_id {
            return Ok(DeleteOutcome::Gone);
        }
        match m.state(now) {
            None => {
                st.remove(&id);
                Ok(DeleteOutcome::Gone)
            }
            Some(InstanceState::Terminating) => Ok(DeleteOutcome::Deleting),
            Some(_) => {
                m.deleted_at = Some(now);
                let key = m.idempotency_key.clone();
                let gone_now = m.delete_delay.is_zero();
                // A terminating machine no longer answers creates for its key.
                if st.by_key.get(&key) == Some(&id) {
                    st.by_key.remove(&key);
                }
                if gone_now {
                    st.remove(&id);
                }
                tracing::debug!(
                    provider = PROVIDER_NAME,
                    provider_id,
                    "simulated machine deleting"
                );
                Ok(DeleteOutcome::Deleting)
            }
        }
    }

    fn as_group(&self) -> Option<&dyn GroupProvider> {
        self.config
            .group
            .is_some()
            .then_some(self as &dyn GroupProvider)
    }
}

impl SimulatedProvider {
    /// The group's name and its state (created empty on first use), with the call counted and
    /// an injected error taken. Sweeps first, so the group is up to date.
    fn group_call<T>(
        &self,
        method: Method,
        f: impl FnOnce(&mut State, &str, Instant) -> Result<T>,
    ) -> Result<T> {
        let Some(group) = self.config.group.clone() else {
            return Err(ProviderError::Unimplemented(format!(
                "NodeClass {} is not group-backed",
                self.config.class_name
            )));
        };
        let now = Instant::now();
        let mut st = self.cloud.shared.lock();
        st.count_call(method);
        if let Some(e) = st.take_injected(method) {
            return Err(e);
        }
        let g = st
            .groups
            .entry(group.clone())
            .or_insert_with(|| GroupState {
                config: self.config.clone(),
                target: 0,
                members: HashSet::new(),
            });
        // The class's configuration as it is now (a new generation may change the delays).
        g.config = self.config.clone();
        st.sweep(now);
        f(&mut st, &group, now)
    }
}

#[async_trait]
impl GroupProvider for SimulatedProvider {
    fn group_name(&self) -> String {
        format!(
            "simulated/{}",
            self.config.group.as_deref().unwrap_or_default()
        )
    }

    async fn target_size(&self) -> Result<u32> {
        self.group_call(Method::TargetSize, |st, group, _| {
            Ok(st.groups.get(group).map_or(0, |g| g.target))
        })
    }

    async fn set_target_size(&self, size: u32) -> Result<()> {
        self.group_call(Method::SetTargetSize, |st, group, now| {
            if let Some(g) = st.groups.get_mut(group) {
                g.target = size;
            }
            st.fill_group(group, now);
            Ok(())
        })
    }

    async fn delete_instances(&self, provider_ids: &[String]) -> Result<()> {
        self.group_call(Method::DeleteInstances, |st, group, now| {
            let Some(g) = st.groups.get(group) else {
                return Ok(());
            };
            if let Some(foreign) = provider_ids.iter().find(|p| !g.members.contains(*p)) {
                return Err(ProviderError::InvalidConfig(format!(
                    "{foreign} is not a machine of simulated group {group}"
                )));
            }
            let mut deleted = 0u32;
            for pid in provider_ids {
                let Some((_, id)) = parse_provider_id(pid) else {
                    continue;
                };
                if let Some(m) = st.machines.get_mut(id)
                    && matches!(m.state(now), Some(s) if s != InstanceState::Terminating)
                {
                    m.deleted_at = Some(now);
                    deleted += 1;
                }
            }
            if let Some(g) = st.groups.get_mut(group) {
                g.target = g.target.saturating_sub(deleted);
            }
            // Machines with no delete delay are gone at once.
            st.sweep(now);
            Ok(())
        })
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        self.group_call(Method::Instances, |st, group, now| {
            Ok(st
                .machines
                .values()
                .filter(|m| m.group.as_deref() == Some(group))
                .filter_map(|m| m.state(now).map(|s| m.instance(s)))
                .collect())
        })
    }
}
