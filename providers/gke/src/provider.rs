//! [`GkeProvider`]: the seam's `Provider` and `GroupProvider` over one GKE node pool.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;
use futures::future::join_all;
use google_cloud_compute_v1::client::{InstanceGroupManagers, ZoneOperations};
use google_cloud_compute_v1::model::{
    InstanceGroupManagersDeleteInstancesRequest, ManagedInstance, Operation,
};
use google_cloud_container_v1::client::ClusterManager;
use google_cloud_container_v1::model::NodePool;
use kube_node_crds::names::tags;
use kube_node_provider::{
    Capabilities, CreateRequest, DeleteOutcome, GroupProvider, Instance, ListFilter, Provider,
    ProviderError, ResolvedClass, Result,
};

use crate::GkeOptions;
use crate::calls::{self, Api};
use crate::config::{CredentialSource, GkeConfig};
use crate::errors;
use crate::plan::{self, MachineRef, MigRef};

/// The backend's name in `spec.provider.type`.
pub const PROVIDER_TYPE: &str = "gke";

/// Managed instances asked for per `listManagedInstances` page (the API's maximum is 500).
const PAGE_SIZE: u32 = 500;

/// How many earlier failed operations one mutating call steps over (see `mutate`).
const MAX_REPLAYED_FAILURES: usize = 4;

/// The Google Cloud clients of one provider, built on first use.
struct Clients {
    container: ClusterManager,
    igm: InstanceGroupManagers,
    operations: ZoneOperations,
}

/// One of the pool's zonal instance groups, as last read.
#[derive(Clone, Debug)]
struct Group {
    mig: MigRef,
    /// The prefix of its machines' names.
    base_instance_name: String,
}

/// What the pool's groups look like now: each group's target size and fingerprint.
#[derive(Clone, Debug)]
struct GroupState {
    group: Group,
    target: u32,
    fingerprint: String,
}

/// The pool's groups and machine type, cached: they change only when the pool's zones do.
#[derive(Clone, Debug)]
struct PoolShape {
    read_at: Instant,
    migs: Vec<MigRef>,
    machine_type: Option<String>,
}

/// The machines of one GKE node pool (see the crate docs).
pub struct GkeProvider {
    config: GkeConfig,
    options: GkeOptions,
    clients: tokio::sync::OnceCell<Clients>,
    shape: Mutex<Option<PoolShape>>,
}

impl std::fmt::Debug for GkeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GkeProvider")
            .field("pool", &self.config.pool_name())
            .field("credentials", &self.config.credentials)
            .finish()
    }
}

impl GkeProvider {
    /// Builds the provider for a NodeClass without calling Google Cloud.
    pub fn new(class: &ResolvedClass, options: &GkeOptions) -> Result<Self> {
        Ok(Self {
            config: GkeConfig::resolve(class)?,
            options: options.clone(),
            clients: tokio::sync::OnceCell::new(),
            shape: Mutex::new(None),
        })
    }

    /// The resolved configuration.
    pub fn config(&self) -> &GkeConfig {
        &self.config
    }

    async fn clients(&self) -> Result<&Clients> {
        self.clients
            .get_or_try_init(|| build_clients(&self.config))
            .await
    }

    /// One API call: counted, bounded in time, its error mapped.
    async fn call<T>(
        &self,
        api: Api,
        fut: impl Future<Output = google_cloud_gax::Result<T>>,
    ) -> Result<T> {
        if let Some(c) = &self.options.counter {
            c.add(api.method);
        }
        let started = Instant::now();
        let out = match tokio::time::timeout(self.options.call_timeout, fut).await {
            Err(_) => Err(ProviderError::Transient(format!(
                "{}: no answer within {:?}",
                api.method, self.options.call_timeout
            ))),
            Ok(Err(e)) => Err(errors::from_gax(api, &e)),
            Ok(Ok(v)) => Ok(v),
        };
        tracing::debug!(
            provider = PROVIDER_TYPE,
            method = api.method,
            ok = out.is_ok(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "called google cloud"
        );
        out
    }

    /// The node pool. A missing pool (or cluster) is `InvalidConfig` naming the field.
    async fn node_pool(&self) -> Result<NodePool> {
        let c = self.clients().await?;
        let pool = self
            .call(
                calls::GET_NODE_POOL,
                c.container
                    .get_node_pool()
                    .set_name(self.config.pool_name())
                    .send(),
            )
            .await
            .map_err(|e| match e {
                ProviderError::NotFound(_) => ProviderError::InvalidConfig(format!(
                    "spec.provider.gke.nodePool: node pool {:?} was not found in cluster {:?} \
                     (project {}, location {})",
                    self.config.node_pool,
                    self.config.cluster,
                    self.config.project,
                    self.config.location
                )),
                other => other,
            })?;
        if !pool.name.is_empty() && pool.name != self.config.node_pool {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.gke.nodePool: the API answered node pool {:?} for {:?}",
                pool.name, self.config.node_pool
            )));
        }
        let cluster_segment = format!("/clusters/{}/nodePools/", self.config.cluster);
        if !pool.self_link.is_empty() && !pool.self_link.contains(&cluster_segment) {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.gke.cluster: node pool {:?} does not belong to cluster {:?}",
                self.config.node_pool, self.config.cluster
            )));
        }
        Ok(pool)
    }

    /// Reads the pool's groups from the pool itself and caches them.
    fn shape_of(&self, pool: &NodePool) -> Result<PoolShape> {
        let mut migs = Vec::new();
        for url in &pool.instance_group_urls {
            let mig = MigRef::parse(url).ok_or_else(|| {
                ProviderError::InvalidConfig(format!(
                    "spec.provider.gke.nodePool: node pool {:?} has an instance group kube-node \
                     cannot read: {url}",
                    self.config.node_pool
                ))
            })?;
            migs.push(mig);
        }
        if migs.is_empty() {
            return Err(ProviderError::Transient(format!(
                "node pool {:?} has no instance groups yet (status {:?})",
                self.config.node_pool,
                pool.status.name().unwrap_or("unknown")
            )));
        }
        migs.sort();
        migs.dedup();
        Ok(PoolShape {
            read_at: Instant::now(),
            migs,
            machine_type: pool
                .config
                .as_ref()
                .map(|c| c.machine_type.clone())
                .filter(|t| !t.is_empty()),
        })
    }

    fn cached_shape(&self) -> Option<PoolShape> {
        self.shape.lock().ok().and_then(|s| s.clone())
    }

    fn store_shape(&self, shape: PoolShape) {
        if let Ok(mut s) = self.shape.lock() {
            *s = Some(shape);
        }
    }

    fn forget_shape(&self) {
        if let Ok(mut s) = self.shape.lock() {
            *s = None;
        }
    }

    /// The pool's groups: cached for `pool_cache_ttl`, else read from the pool.
    async fn shape(&self) -> Result<PoolShape> {
        if let Some(s) = self.cached_shape()
            && s.read_at.elapsed() < self.options.pool_cache_ttl
        {
            return Ok(s);
        }
        let pool = self.node_pool().await?;
        let shape = self.shape_of(&pool)?;
        self.store_shape(shape.clone());
        Ok(shape)
    }

    /// Reads every group of the pool (one `instanceGroupManagers.get` each, concurrently).
    async fn group_states(&self) -> Result<Vec<GroupState>> {
        let shape = self.shape().await?;
        let c = self.clients().await?;
        let reads = shape.migs.iter().map(|mig| async move {
            let m = self
                .call(
                    calls::GET_MIG,
                    c.igm
                        .get()
                        .set_project(&mig.project)
                        .set_zone(&mig.zone)
                        .set_instance_group_manager(&mig.name)
                        .send(),
                )
                .await;
            (mig, m)
        });
        let mut out = Vec::new();
        let mut first_error = None;
        for (mig, m) in join_all(reads).await {
            match m {
                Ok(m) => out.push(GroupState {
                    group: Group {
                        mig: mig.clone(),
                        base_instance_name: m.base_instance_name.clone().unwrap_or_default(),
                    },
                    target: u32::try_from(m.target_size.unwrap_or(0)).unwrap_or(0),
                    fingerprint: m
                        .fingerprint
                        .as_ref()
                        .map(|f| f.iter().map(|b| format!("{b:02x}")).collect())
                        .unwrap_or_default(),
                }),
                Err(ProviderError::NotFound(_)) => {
                    // The pool's groups changed under us (zones edited, pool recreated).
                    self.forget_shape();
                    first_error.get_or_insert(ProviderError::Transient(format!(
                        "instance group {} of node pool {:?} is gone; the pool's groups are read again",
                        mig.path(),
                        self.config.node_pool
                    )));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Every machine of one group, following pagination to the end.
    async fn managed_instances(&self, mig: &MigRef) -> Result<Vec<ManagedInstance>> {
        let c = self.clients().await?;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = c
                .igm
                .list_managed_instances()
                .set_project(&mig.project)
                .set_zone(&mig.zone)
                .set_instance_group_manager(&mig.name)
                .set_max_results(PAGE_SIZE);
            if let Some(t) = token.take() {
                req = req.set_page_token(t);
            }
            let page = self
                .call(calls::LIST_MANAGED_INSTANCES, req.send())
                .await
                .map_err(|e| match e {
                    ProviderError::NotFound(m) => {
                        self.forget_shape();
                        ProviderError::Transient(format!(
                            "{m} (the node pool's groups are read again)"
                        ))
                    }
                    other => other,
                })?;
            out.extend(page.managed_instances);
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }

    fn instance(
        &self,
        mig: &MigRef,
        m: &ManagedInstance,
        machine_type: Option<&str>,
    ) -> Option<Instance> {
        let name = m.name.clone().filter(|n| !n.is_empty()).or_else(|| {
            m.instance
                .as_deref()
                .and_then(plan::instance_name)
                .map(str::to_string)
        })?;
        let machine = MachineRef {
            project: mig.project.clone(),
            zone: mig.zone.clone(),
            name: name.clone(),
        };
        let tags = BTreeMap::from([
            (tags::CLUSTER.to_string(), self.config.cluster_name.clone()),
            (tags::NODE_CLASS.to_string(), self.config.node_class.clone()),
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
        ]);
        Some(Instance {
            id: name,
            provider_id: machine.provider_id(),
            state: plan::state(
                m.current_action.as_ref().and_then(|a| a.name()),
                m.instance_status.as_ref().and_then(|s| s.name()),
            ),
            tags,
            zone: Some(mig.zone.clone()),
            instance_type: machine_type.map(str::to_string),
            addresses: Vec::new(),
            created_unix: None,
            // GKE puts the pool's labels on the Node itself; there are none of the machine's own.
            labels: BTreeMap::new(),
            failure: creation_failure(&mig.zone, &machine.name, m),
        })
    }

    /// Every machine of the pool.
    async fn pool_instances(&self) -> Result<Vec<Instance>> {
        let shape = self.shape().await?;
        let lists = join_all(
            shape
                .migs
                .iter()
                .map(|mig| async move { (mig, self.managed_instances(mig).await) }),
        )
        .await;
        let mut out = Vec::new();
        for (mig, list) in lists {
            for m in list? {
                out.extend(self.instance(mig, &m, shape.machine_type.as_deref()));
            }
        }
        out.sort_by(|a, b| a.provider_id.cmp(&b.provider_id));
        Ok(out)
    }

    /// Waits for a zonal operation to finish, polling with exponential backoff, and returns
    /// its error, if it failed, as the contract's error. An operation still running at the
    /// deadline is `Transient`: the retry sends the same request id and so waits for the same
    /// operation.
    async fn wait(&self, api: Api, zone: &str, mut op: Operation) -> Result<()> {
        use google_cloud_compute_v1::model::operation::Status;
        let poll = &self.options.poll;
        let deadline = Instant::now() + poll.timeout;
        let mut delay = poll.initial;
        loop {
            if matches!(op.status, Some(Status::Done)) {
                let Some(err) = op.error.as_ref().filter(|e| !e.errors.is_empty()) else {
                    return Ok(());
                };
                let first = &err.errors[0];
                return Err(errors::classify_operation(
                    api,
                    first.code.as_deref().unwrap_or("UNKNOWN"),
                    first.message.as_deref().unwrap_or(""),
                    op.http_error_status_code
                        .and_then(|c| u16::try_from(c).ok()),
                ));
            }
            let name = op.name.clone().unwrap_or_default();
            let now = Instant::now();
            if name.is_empty() || now >= deadline {
                return Err(ProviderError::Transient(format!(
                    "{}: operation {name} still running after {:?}",
                    api.method, poll.timeout
                )));
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(poll.max);
            let c = self.clients().await?;
            op = self
                .call(
                    calls::GET_ZONE_OPERATION,
                    c.operations
                        .get()
                        .set_project(&self.config.project)
                        .set_zone(zone)
                        .set_operation(&name)
                        .send(),
                )
                .await?;
        }
    }

    /// Sends one mutating call with a request id derived from `intent`, then waits for its
    /// operation. Compute Engine answers a repeated id with the first call's operation: a
    /// retried call is never applied twice. When that operation had failed, the answer is
    /// the old failure (already DONE, with an error); the call is then sent again with the
    /// failed operation's name added to the intent, so a retry after a failure is a new
    /// request, and still the same one each time it is retried.
    async fn mutate<F, Fut>(&self, api: Api, zone: &str, intent: &[String], send: F) -> Result<()>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = google_cloud_gax::Result<Operation>>,
    {
        use google_cloud_compute_v1::model::operation::Status;
        let mut parts: Vec<String> = intent.to_vec();
        for _ in 0..MAX_REPLAYED_FAILURES {
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let op = self.call(api, send(plan::request_id(&refs))).await?;
            let failed_before = matches!(op.status, Some(Status::Done))
                && op.error.as_ref().is_some_and(|e| !e.errors.is_empty());
            match op.name.clone() {
                Some(name) if failed_before => parts.push(name),
                _ => return self.wait(api, zone, op).await,
            }
        }
        Err(ProviderError::Transient(format!(
            "{}: the last {MAX_REPLAYED_FAILURES} attempts failed; see the earlier errors",
            api.method
        )))
    }

    async fn resize(&self, state: &GroupState, size: u32) -> Result<()> {
        let mig = &state.group.mig;
        let intent = [
            "resize".to_string(),
            mig.path(),
            state.fingerprint.clone(),
            state.target.to_string(),
            size.to_string(),
        ];
        let c = self.clients().await?;
        self.mutate(calls::RESIZE_MIG, &mig.zone, &intent, |id| {
            c.igm
                .resize()
                .set_project(&mig.project)
                .set_zone(&mig.zone)
                .set_instance_group_manager(&mig.name)
                .set_size(i32::try_from(size).unwrap_or(i32::MAX))
                .set_request_id(id)
                .send()
        })
        .await?;
        tracing::info!(
            provider = PROVIDER_TYPE,
            group = %mig.path(),
            zone = %mig.zone,
            from = state.target,
            to = size,
            "resized instance group"
        );
        Ok(())
    }

    /// Which group of the pool a machine belongs to, by zone and name prefix.
    fn group_of<'a>(&self, states: &'a [GroupState], m: &MachineRef) -> Option<&'a GroupState> {
        if m.project != self.config.project {
            return None;
        }
        states.iter().find(|s| {
            s.group.mig.zone == m.zone && plan::named_by_group(&m.name, &s.group.base_instance_name)
        })
    }

    /// Deletes the named machines of one group that are still there and not already being
    /// deleted. Returns, per name, whether it was (or is being) deleted by this call or
    /// earlier (`Deleting`) or was already gone (`Gone`).
    async fn delete_in_group(
        &self,
        state: &GroupState,
        names: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, DeleteOutcome>> {
        let mig = &state.group.mig;
        let present: BTreeMap<String, bool> = self
            .managed_instances(mig)
            .await?
            .iter()
            .filter_map(|m| {
                let name = m.name.clone().or_else(|| {
                    m.instance
                        .as_deref()
                        .and_then(plan::instance_name)
                        .map(str::to_string)
                })?;
                let leaving = plan::leaving(m.current_action.as_ref().and_then(|a| a.name()));
                Some((name, leaving))
            })
            .collect();
        let mut outcome = BTreeMap::new();
        let mut victims = Vec::new();
        for name in names {
            match present.get(name) {
                None => {
                    outcome.insert(name.clone(), DeleteOutcome::Gone);
                }
                Some(true) => {
                    outcome.insert(name.clone(), DeleteOutcome::Deleting);
                }
                Some(false) => {
                    outcome.insert(name.clone(), DeleteOutcome::Deleting);
                    victims.push(name.clone());
                }
            }
        }
        if victims.is_empty() {
            return Ok(outcome);
        }
        // Victims are sorted (a BTreeSet's order): the same machines give the same id.
        let mut intent = vec!["deleteInstances".to_string(), mig.path()];
        intent.extend(victims.iter().cloned());
        let urls: Vec<String> = victims
            .iter()
            .map(|n| {
                MachineRef {
                    project: mig.project.clone(),
                    zone: mig.zone.clone(),
                    name: n.clone(),
                }
                .zonal_url()
            })
            .collect();
        let c = self.clients().await?;
        self.mutate(calls::DELETE_INSTANCES, &mig.zone, &intent, |id| {
            c.igm
                .delete_instances()
                .set_project(&mig.project)
                .set_zone(&mig.zone)
                .set_instance_group_manager(&mig.name)
                .set_request_id(id)
                .set_body(
                    InstanceGroupManagersDeleteInstancesRequest::new()
                        .set_instances(urls.clone())
                        // A machine that left the group or started deleting since the list
                        // above is skipped, never deleted (and counted) a second time.
                        .set_skip_instances_on_validation_error(true),
                )
                .send()
        })
        .await?;
        tracing::info!(
            provider = PROVIDER_TYPE,
            group = %mig.path(),
            zone = %mig.zone,
            machines = victims.len(),
            "deleted machines of instance group"
        );
        Ok(outcome)
    }
}

/// Why a managed instance's creation failed, when it is still being created and its last
/// attempt reports errors: the first out-of-resources error (quota, capacity) when there is
/// one, else the first error.
fn creation_failure(zone: &str, name: &str, m: &ManagedInstance) -> Option<ProviderError> {
    if !plan::creating(
        m.current_action.as_ref().and_then(|a| a.name()),
        m.instance_status.as_ref().and_then(|s| s.name()),
    ) {
        return None;
    }
    let failures: Vec<ProviderError> = m
        .last_attempt
        .as_ref()?
        .errors
        .as_ref()?
        .errors
        .iter()
        .map(|e| {
            errors::classify_creation(
                name,
                zone,
                e.code
                    .as_deref()
                    .filter(|c| !c.is_empty())
                    .unwrap_or("UNKNOWN"),
                e.message.as_deref().unwrap_or(""),
            )
        })
        .collect();
    let first_out = failures.iter().position(ProviderError::is_out_of_resources);
    failures.into_iter().nth(first_out.unwrap_or(0))
}

async fn build_clients(config: &GkeConfig) -> Result<Clients> {
    // The clients' TLS and the service-account signer use rustls's process-wide provider;
    // kube-node uses ring everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let credentials = match &config.credentials {
        CredentialSource::ServiceAccount(key) => {
            google_cloud_auth::credentials::service_account::Builder::new(key.clone())
                .build()
                .map_err(|_| {
                    ProviderError::Unauthorized(format!(
                        "spec.credentialsSecretRef: {} is not a usable service-account key",
                        crate::config::SERVICE_ACCOUNT_KEY
                    ))
                })?
        }
        CredentialSource::ApplicationDefault => google_cloud_auth::credentials::Builder::default()
            .build()
            .map_err(|_| {
                ProviderError::Unauthorized(
                    "spec.credentialsSecretRef: no credentials Secret is named and Application \
                     Default Credentials are not usable (set up workload identity, or name a \
                     Secret holding service-account.json)"
                        .into(),
                )
            })?,
    };
    let built = |what: &str, e: google_cloud_gax::client_builder::Error| {
        ProviderError::Transient(format!("building the {what} client: {e}"))
    };
    let mut container = ClusterManager::builder()
        .with_credentials(credentials.clone())
        .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
    if let Some(e) = &config.container_endpoint {
        container = container.with_endpoint(e);
    }
    let mut igm = InstanceGroupManagers::builder()
        .with_credentials(credentials.clone())
        .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
    let mut operations = ZoneOperations::builder()
        .with_credentials(credentials)
        .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry);
    if let Some(e) = &config.compute_endpoint {
        igm = igm.with_endpoint(e);
        operations = operations.with_endpoint(e);
    }
    Ok(Clients {
        container: container
            .build()
            .await
            .map_err(|e| built("Kubernetes Engine", e))?,
        igm: igm.build().await.map_err(|e| built("Compute Engine", e))?,
        operations: operations
            .build()
            .await
            .map_err(|e| built("Compute Engine operations", e))?,
    })
}

#[async_trait]
impl Provider for GkeProvider {
    fn name(&self) -> &'static str {
        PROVIDER_TYPE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            group_sized: true,
            eventually_consistent_list: false,
        }
    }

    /// One `nodePools.get` (the pool exists, belongs to the cluster, has instance groups and
    /// no GKE autoscaling) and one `instanceGroupManagers.get` per zone (the Compute
    /// permissions work).
    async fn validate(&self) -> Result<()> {
        let pool = self.node_pool().await?;
        if pool.autoscaling.as_ref().is_some_and(|a| a.enabled) {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.gke.nodePool: node pool {:?} has GKE autoscaling enabled; turn \
                 it off (gcloud container node-pools update {} --no-enable-autoscaling), \
                 kube-node sets its size",
                self.config.node_pool, self.config.node_pool
            )));
        }
        let shape = self.shape_of(&pool)?;
        self.store_shape(shape);
        self.group_states().await?;
        Ok(())
    }

    async fn create(&self, _request: &CreateRequest) -> Result<Instance> {
        Err(ProviderError::Unimplemented(format!(
            "NodeClass {:?} is group-backed (GKE node pool {:?}): GKE makes its machines; scale \
             a NodeSet instead",
            self.config.node_class, self.config.node_pool
        )))
    }

    async fn get(&self, provider_id: &str) -> Result<Instance> {
        let not_found = || ProviderError::NotFound(provider_id.to_string());
        let Some(m) = MachineRef::parse(provider_id) else {
            return Err(not_found());
        };
        if m.project != self.config.project {
            return Err(not_found());
        }
        let shape = self.shape().await?;
        for mig in shape.migs.iter().filter(|g| g.zone == m.zone) {
            let found = self
                .managed_instances(mig)
                .await?
                .iter()
                .filter_map(|x| self.instance(mig, x, shape.machine_type.as_deref()))
                .find(|i| i.id == m.name);
            if let Some(i) = found {
                return Ok(i);
            }
        }
        Err(not_found())
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        // The pool is bound to this NodeClass: its machines carry this cluster's and class's
        // tags, and no other cluster's or class's. They carry no node-UID tag (GKE made them
        // for no Node), so the orphan collector never takes one for an orphan.
        if filter.cluster != self.config.cluster_name
            || filter
                .node_class
                .as_ref()
                .is_some_and(|c| *c != self.config.node_class)
        {
            return Ok(Vec::new());
        }
        self.pool_instances().await
    }

    async fn delete(&self, provider_id: &str) -> Result<DeleteOutcome> {
        let Some(m) = MachineRef::parse(provider_id) else {
            return Ok(DeleteOutcome::Gone);
        };
        if m.project != self.config.project {
            return Ok(DeleteOutcome::Gone);
        }
        let states = self.group_states().await?;
        let Some(state) = self.group_of(&states, &m) else {
            return Ok(DeleteOutcome::Gone);
        };
        let names = BTreeSet::from([m.name.clone()]);
        let outcome = self.delete_in_group(state, &names).await?;
        Ok(outcome.get(&m.name).copied().unwrap_or(DeleteOutcome::Gone))
    }

    fn as_group(&self) -> Option<&dyn GroupProvider> {
        Some(self)
    }
}

#[async_trait]
impl GroupProvider for GkeProvider {
    fn group_name(&self) -> String {
        self.config.pool_name()
    }

    /// The sum of the target sizes of the pool's instance groups.
    async fn target_size(&self) -> Result<u32> {
        Ok(self.group_states().await?.iter().map(|s| s.target).sum())
    }

    /// Spreads `size` over the pool's groups with [`plan::distribute`] and resizes the groups
    /// whose size changes (concurrently), each with a request id derived from the group, its
    /// fingerprint and the sizes, then waits for the operations.
    async fn set_target_size(&self, size: u32) -> Result<()> {
        let states = self.group_states().await?;
        let current: Vec<u32> = states.iter().map(|s| s.target).collect();
        if current.iter().sum::<u32>() == size {
            return Ok(());
        }
        let planned = plan::distribute(&current, size);
        let resizes = states
            .iter()
            .zip(planned)
            .filter(|(s, p)| s.target != *p)
            .map(|(s, p)| self.resize(s, p));
        join_all(resizes).await.into_iter().collect()
    }

    async fn delete_instances(&self, provider_ids: &[String]) -> Result<()> {
        if provider_ids.is_empty() {
            return Ok(());
        }
        let states = self.group_states().await?;
        let mut by_group: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
        for id in provider_ids {
            let group = MachineRef::parse(id).and_then(|m| {
                let s = self.group_of(&states, &m)?;
                let i = states.iter().position(|x| std::ptr::eq(x, s))?;
                Some((i, m.name))
            });
            let Some((i, name)) = group else {
                return Err(ProviderError::InvalidConfig(format!(
                    "{id} is not a machine of node pool {} (its instance groups: {})",
                    self.config.pool_name(),
                    states
                        .iter()
                        .map(|s| s.group.mig.path())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            by_group.entry(i).or_default().insert(name);
        }
        let deletions = by_group
            .iter()
            .map(|(i, names)| self.delete_in_group(&states[*i], names));
        for r in join_all(deletions).await {
            r?;
        }
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<Instance>> {
        self.pool_instances().await
    }
}
