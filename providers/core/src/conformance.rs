//! The provider conformance suite: the executable form of `providers/CONTRACT.md`.
//!
//! Every backend runs the same checks against a live provider (the simulated backend in unit
//! tests, a cloud emulator or a real account in integration tests):
//!
//! ```ignore
//! let c = Conformance::new("conformance-test");
//! let report = conformance::run_all(provider.as_ref(), &c).await;
//! report.into_result().expect("the backend conforms");
//! ```
//!
//! The checks never panic; each returns a [`ConformanceFailure`] naming the check and what was
//! expected. Every machine a check creates is deleted again, also when the check fails, so the
//! suite can run against a real account.
//!
//! Group-sized backends (`providers/CONTRACT.md` section 7) also run [`group::run_all`] against
//! their [`crate::GroupProvider`].

pub mod group;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kube_node_crds::names::tags;

use crate::{
    CreateRequest, DeleteOutcome, Instance, InstanceState, ListFilter, Provider, ProviderError,
};

/// Makes a [`CreateRequest`] for a fresh Node: `(cluster, node uid, node name)`.
pub type RequestFn = Arc<dyn Fn(&str, &str, &str) -> CreateRequest + Send + Sync>;

/// Makes the backend fail its next create with the given error. Returns `false` when the
/// backend cannot inject that kind of error (the check is then skipped).
pub type InjectFn = Arc<dyn Fn(ProviderError) -> bool + Send + Sync>;

/// What the suite needs to know about the backend under test.
#[derive(Clone)]
pub struct Conformance {
    /// The cluster name machines are tagged with. Machines of `<cluster>-other` are created
    /// too, to check that list filters by cluster.
    pub cluster: String,
    /// The NodeClass name tagged on machines (and used as a list filter), when set.
    pub node_class: Option<String>,
    /// How long a new machine may stay invisible to list (eventual consistency).
    pub eventual_consistency_timeout: Duration,
    /// How long a deleted machine may stay Terminating before get says NotFound.
    pub wait_gone_timeout: Duration,
    /// How often to poll while waiting.
    pub poll_interval: Duration,
    /// Makes the request for a fresh Node (defaults to [`Conformance::default_request`]).
    pub request_for: RequestFn,
    /// A provider ID of this backend that names no machine.
    pub unknown_provider_id: String,
    /// The error-injection hook of the backend, if it has one.
    pub inject_create_error: Option<InjectFn>,
}

impl fmt::Debug for Conformance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conformance")
            .field("cluster", &self.cluster)
            .field("node_class", &self.node_class)
            .field(
                "eventual_consistency_timeout",
                &self.eventual_consistency_timeout,
            )
            .field("wait_gone_timeout", &self.wait_gone_timeout)
            .field("unknown_provider_id", &self.unknown_provider_id)
            .field("inject_create_error", &self.inject_create_error.is_some())
            .finish()
    }
}

impl Conformance {
    /// A context for `cluster` with 60s timeouts, 100ms polls, the default request, and an
    /// unknown provider ID of the form `<backend>:///conformance/does-not-exist`; set
    /// [`Conformance::unknown_provider_id`] to one the backend can parse.
    pub fn new(cluster: impl Into<String>) -> Self {
        Self {
            cluster: cluster.into(),
            node_class: None,
            eventual_consistency_timeout: Duration::from_secs(60),
            wait_gone_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(100),
            request_for: Arc::new(Self::default_request),
            unknown_provider_id: "conformance:///conformance/does-not-exist".into(),
            inject_create_error: None,
        }
    }

    /// The request kube-node's node-controller makes: the Node UID as idempotency key and the
    /// contract's tags.
    pub fn default_request(cluster: &str, uid: &str, name: &str) -> CreateRequest {
        CreateRequest {
            idempotency_key: uid.to_string(),
            node_name: name.to_string(),
            tags: BTreeMap::from([
                (tags::CLUSTER.to_string(), cluster.to_string()),
                (tags::NODE_NAME.to_string(), name.to_string()),
                (tags::NODE_UID.to_string(), uid.to_string()),
                (
                    tags::MANAGED_BY.to_string(),
                    tags::MANAGED_BY_VALUE.to_string(),
                ),
            ]),
            user_data: None,
        }
    }

    fn request(&self, cluster: &str) -> CreateRequest {
        let (uid, name) = fresh_node();
        let mut r = (self.request_for)(cluster, &uid, &name);
        if let Some(class) = &self.node_class {
            r.tags
                .entry(tags::NODE_CLASS.to_string())
                .or_insert_with(|| class.clone());
        }
        r
    }

    fn filter(&self, cluster: &str) -> ListFilter {
        ListFilter {
            cluster: cluster.to_string(),
            node_class: self.node_class.clone(),
        }
    }

    fn other_cluster(&self) -> String {
        format!("{}-other", self.cluster)
    }
}

/// A fresh Node UID and name, unique within the process and (by the clock) across runs.
fn fresh_node() -> (String, String) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    let x = t ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (
        format!(
            "{:08x}-0000-4000-8000-{:012x}",
            (x >> 32) as u32,
            n & 0xffff_ffff_ffff
        ),
        format!("conformance-{:x}-{n}", x & 0xff_ffff),
    )
}

/// A failed check: which one, and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{check}: {message}")]
pub struct ConformanceFailure {
    /// The check's name.
    pub check: &'static str,
    /// What went wrong.
    pub message: String,
}

fn fail<T>(check: &'static str, message: impl Into<String>) -> Result<T, ConformanceFailure> {
    Err(ConformanceFailure {
        check,
        message: message.into(),
    })
}

/// The outcome of [`run_all`].
#[derive(Clone, Debug, Default)]
pub struct ConformanceReport {
    /// Checks that passed.
    pub passed: Vec<&'static str>,
    /// Checks skipped because the backend lacks an optional hook.
    pub skipped: Vec<&'static str>,
    /// Checks that failed.
    pub failed: Vec<ConformanceFailure>,
}

impl ConformanceReport {
    /// `Ok` when no check failed; else the failures.
    pub fn into_result(self) -> Result<Self, Vec<ConformanceFailure>> {
        if self.failed.is_empty() {
            Ok(self)
        } else {
            Err(self.failed)
        }
    }
}

/// Deletes what a check created, whatever the check's outcome.
struct Cleanup<'a> {
    provider: &'a dyn Provider,
    ids: Vec<String>,
}

impl<'a> Cleanup<'a> {
    fn new(provider: &'a dyn Provider) -> Self {
        Self {
            provider,
            ids: Vec::new(),
        }
    }

    async fn create(
        &mut self,
        check: &'static str,
        request: &CreateRequest,
    ) -> Result<Instance, ConformanceFailure> {
        match self.provider.create(request).await {
            Ok(i) => {
                if !self.ids.contains(&i.provider_id) {
                    self.ids.push(i.provider_id.clone());
                }
                Ok(i)
            }
            Err(e) => fail(
                check,
                format!("create of node {} failed: {e}", request.node_name),
            ),
        }
    }

    async fn finish<T>(self, r: Result<T, ConformanceFailure>) -> Result<T, ConformanceFailure> {
        for id in &self.ids {
            // Best effort: the check's own result matters more than a cleanup error.
            let _ = self.provider.delete(id).await;
        }
        r
    }
}

/// Waits until list shows (or, with `present == false`, stops showing) `provider_id`.
async fn wait_listed(
    provider: &dyn Provider,
    c: &Conformance,
    filter: &ListFilter,
    provider_id: &str,
    present: bool,
) -> Result<Vec<Instance>, String> {
    let deadline = tokio::time::Instant::now() + c.eventual_consistency_timeout;
    loop {
        let last = match provider.list(filter).await {
            Ok(list) => {
                if list.iter().any(|i| i.provider_id == provider_id) == present {
                    return Ok(list);
                }
                format!(
                    "it listed {:?}",
                    list.iter().map(|i| &i.provider_id).collect::<Vec<_>>()
                )
            }
            Err(e) if e.is_retryable() => format!("list failed: {e}"),
            Err(e) => return Err(format!("list failed with {}: {e}", e.reason())),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "after {:?}, list for cluster {:?} {} {provider_id} ({last})",
                c.eventual_consistency_timeout,
                filter.cluster,
                if present {
                    "still misses"
                } else {
                    "still shows"
                },
            ));
        }
        tokio::time::sleep(c.poll_interval).await;
    }
}

/// Waits until get says NotFound, allowing Terminating (and retryable errors) meanwhile.
async fn wait_gone(
    provider: &dyn Provider,
    c: &Conformance,
    provider_id: &str,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + c.wait_gone_timeout;
    loop {
        let last = match provider.get(provider_id).await {
            Err(ProviderError::NotFound(_)) => return Ok(()),
            Ok(i) if i.state == InstanceState::Terminating => "Terminating".to_string(),
            Ok(i) => {
                return Err(format!(
                    "get of a deleted machine returned state {} (want Terminating or NotFound)",
                    i.state.as_str()
                ));
            }
            Err(e) if e.is_retryable() => e.to_string(),
            Err(e) => {
                return Err(format!(
                    "get of a deleted machine failed with {} (want NotFound): {e}",
                    e.reason()
                ));
            }
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "get of {provider_id} still did not say NotFound after {:?} (last: {last})",
                c.wait_gone_timeout
            ));
        }
        tokio::time::sleep(c.poll_interval).await;
    }
}

/// Two creates with the same idempotency key return the same machine, and list shows one.
pub async fn create_is_idempotent(
    provider: &dyn Provider,
    c: &Conformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "create_is_idempotent";
    let mut cleanup = Cleanup::new(provider);
    let r = async {
        let req = c.request(&c.cluster);
        let first = cleanup.create(CHECK, &req).await?;
        let second = cleanup.create(CHECK, &req).await?;
        if first.provider_id != second.provider_id || first.id != second.id {
            return fail(
                CHECK,
                format!(
                    "two creates with key {} returned {} and {}",
                    req.idempotency_key, first.provider_id, second.provider_id
                ),
            );
        }
        let list = wait_listed(provider, c, &c.filter(&c.cluster), &first.provider_id, true)
            .await
            .or_else(|m| fail(CHECK, m))?;
        let same_key = list
            .iter()
            .filter(|i| i.node_uid() == Some(req.idempotency_key.as_str()))
            .count();
        if same_key != 1 {
            return fail(
                CHECK,
                format!(
                    "list shows {same_key} machines tagged with node uid {} (want exactly 1)",
                    req.idempotency_key
                ),
            );
        }
        Ok(())
    }
    .await;
    cleanup.finish(r).await
}

/// The machine carries the contract's tags from launch, the provider ID has the form
/// `<backend>:///<zone>/<id>`, and the machine is Pending or Running.
pub async fn tags_at_launch(
    provider: &dyn Provider,
    c: &Conformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "tags_at_launch";
    let mut cleanup = Cleanup::new(provider);
    let r = async {
        let req = c.request(&c.cluster);
        let created = cleanup.create(CHECK, &req).await?;
        let mut want = vec![
            (tags::CLUSTER, c.cluster.as_str()),
            (tags::NODE_NAME, req.node_name.as_str()),
            (tags::NODE_UID, req.idempotency_key.as_str()),
            (tags::MANAGED_BY, tags::MANAGED_BY_VALUE),
        ];
        if let Some(class) = &c.node_class {
            want.push((tags::NODE_CLASS, class.as_str()));
        }
        for (key, value) in &want {
            if created.tags.get(*key).map(String::as_str) != Some(*value) {
                return fail(
                    CHECK,
                    format!(
                        "the created machine's tag {key} is {:?} (want {value:?})",
                        created.tags.get(*key)
                    ),
                );
            }
        }
        if created.state == InstanceState::Terminating {
            return fail(CHECK, "a just-created machine is Terminating");
        }
        let prefix = format!("{}:///", provider.name());
        let well_formed = created
            .provider_id
            .strip_prefix(&prefix)
            .and_then(|rest| rest.rsplit_once('/'))
            .is_some_and(|(_, id)| id == created.id);
        if !well_formed {
            return fail(
                CHECK,
                format!(
                    "provider ID {:?} is not of the form {prefix}<zone>/{}",
                    created.provider_id, created.id
                ),
            );
        }
        Ok(())
    }
    .await;
    cleanup.finish(r).await
}

/// Get right after create finds the machine with its tags.
pub async fn get_after_create(
    provider: &dyn Provider,
    c: &Conformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "get_after_create";
    let mut cleanup = Cleanup::new(provider);
    let r = async {
        let req = c.request(&c.cluster);
        let created = cleanup.create(CHECK, &req).await?;
        let got = provider.get(&created.provider_id).await.or_else(|e| {
            fail(
                CHECK,
                format!(
                    "get of {} right after create failed: {e}",
                    created.provider_id
                ),
            )
        })?;
        if got.id != created.id || got.provider_id != created.provider_id {
            return fail(
                CHECK,
                format!(
                    "get of {} returned machine {}",
                    created.provider_id, got.provider_id
                ),
            );
        }
        if got.node_uid() != Some(req.idempotency_key.as_str()) {
            return fail(
                CHECK,
                format!("get returned node uid tag {:?}", got.node_uid()),
            );
        }
        if got.state == InstanceState::Terminating {
            return fail(CHECK, "get of a just-created machine says Terminating");
        }
        Ok(())
    }
    .await;
    cleanup.finish(r).await
}

/// List finds every machine of the cluster (within the eventual-consistency timeout) and none
/// of another cluster.
pub async fn list_is_complete(
    provider: &dyn Provider,
    c: &Conformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "list_is_complete";
    let mut cleanup = Cleanup::new(provider);
    let r = async {
        let other = c.other_cluster();
        let a = cleanup.create(CHECK, &c.request(&c.cluster)).await?;
        let b = cleanup.create(CHECK, &c.request(&c.cluster)).await?;
        let foreign = cleanup.create(CHECK, &c.request(&other)).await?;
        let ours = c.filter(&c.cluster);
        wait_listed(provider, c, &ours, &a.provider_id, true)
            .await
            .or_else(|m| fail(CHECK, m))?;
        let list = wait_listed(provider, c, &ours, &b.provider_id, true)
            .await
            .or_else(|m| fail(CHECK, m))?;
        if !list.iter().any(|i| i.provider_id == a.provider_id) {
            return fail(
                CHECK,
                format!("list lost {} after showing it", a.provider_id),
            );
        }
        if let Some(i) = list
            .iter()
            .find(|i| i.tags.get(tags::CLUSTER) != Some(&c.cluster))
        {
            return fail(
                CHECK,
                format!(
                    "list for cluster {:?} returned {} tagged with cluster {:?}",
                    c.cluster,
                    i.provider_id,
                    i.tags.get(tags::CLUSTER)
                ),
            );
        }
        // The other cluster's machine shows in its own list, so its absence above is real.
        let theirs = wait_listed(provider, c, &c.filter(&other), &foreign.provider_id, true)
            .await
            .or_else(|m| fail(CHECK, m))?;
        if theirs
            .iter()
            .any(|i| i.provider_id == a.provider_id || i.provider_id == b.provider_id)
        {
            return fail(
                CHECK,
                format!(
                    "list for cluster {other:?} returned machines of {:?}",
                    c.cluster
                ),
            );
        }
        Ok(())
    }
    .await;
    cleanup.finish(r).await
}

/// Delete, then get says NotFound (after Terminating), list drops it, and deleting again
/// succeeds with Gone.
pub async fn delete_then_gone(
    provider: &dyn Provider,
    c: &Conformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "delete_then_gone";
    let mut cleanup = Cleanup::new(provider);
    let r = async {
        let created = cleanup.create(CHECK, &c.request(&c.cluster)).await?;
        match provider.delete(&created.provider_id).await {
            Ok(_) => {}
            Err(e) => {
                return fail(
                    CHECK,
                    format!("delete of {} failed: {e}", created.provider_id),
                );
            }
        }
        wait_gone(provider, c, &created.provider_id)
            .await
            .or_else(|m| fail(CHECK, m))?;
        wait_listed(
            provider,
            c,
            &c.filter(&c.cluster),
            &created.provider_id,
            false,
        )
        .await
        .or_else(|m| fail(CHECK, m))?;
        match provider.delete(&created.provider_id).await {
            Ok(DeleteOutcome::Gone) => Ok(()),
            Ok(DeleteOutcome::Deleting) => fail(
                CHECK,
                "delete of a machine that is gone returned Deleting (want Gone)",
            ),
            Err(e) => fail(
                CHECK,
                format!("delete of a machine that is gone failed (want Ok(Gone)): {e}"),
            ),
        }
    }
    .await;
    cleanup.finish(r).await
}

/// Get of a provider ID that names no machine says NotFound; delete of it says Gone.
pub async fn unknown_provider_id(
    provider: &dyn Provider,
    c: &Conformance,
) -> Result<(), ConformanceFailure> {
    const CHECK: &str = "unknown_provider_id";
    let id = c.unknown_provider_id.as_str();
    match provider.get(id).await {
        Err(ProviderError::NotFound(_)) => {}
        Ok(i) => {
            return fail(
                CHECK,
                format!("get of unknown {id} returned {}", i.provider_id),
            );
        }
        Err(e) => {
            return fail(
                CHECK,
                format!(
                    "get of unknown {id} failed with {} (want NotFound): {e}",
                    e.reason()
                ),
            );
        }
    }
    match provider.delete(id).await {
        Ok(DeleteOutcome::Gone) => Ok(()),
        Ok(DeleteOutcome::Deleting) => fail(
            CHECK,
            format!("delete of unknown {id} returned Deleting (want Gone)"),
        ),
        Err(e) => fail(
            CHECK,
            format!("delete of unknown {id} failed (want Ok(Gone)): {e}"),
        ),
    }
}

/// Create errors are typed: with the backend's injection hook, InsufficientCapacity and
/// Throttled come back as such, with the contract's reason and retryability, launch nothing,
/// and the next create succeeds. Returns `Ok(false)` when skipped (no hook).
pub async fn errors_are_typed(
    provider: &dyn Provider,
    c: &Conformance,
) -> Result<bool, ConformanceFailure> {
    const CHECK: &str = "errors_are_typed";
    let Some(inject) = &c.inject_create_error else {
        return Ok(false);
    };
    let mut cleanup = Cleanup::new(provider);
    let r = async {
        let cases = [
            (
                ProviderError::InsufficientCapacity("conformance: injected".into()),
                "InsufficientCapacity",
                true,
            ),
            (
                ProviderError::Throttled {
                    message: "conformance: injected".into(),
                    retry_after: Some(Duration::from_secs(1)),
                },
                "Throttled",
                false,
            ),
        ];
        let mut ran = false;
        for (error, reason, out_of_resources) in cases {
            if !inject(error) {
                continue;
            }
            ran = true;
            let req = c.request(&c.cluster);
            match provider.create(&req).await {
                Ok(i) => {
                    cleanup.ids.push(i.provider_id.clone());
                    return fail(
                        CHECK,
                        format!("create succeeded with {} (want {reason})", i.provider_id),
                    );
                }
                Err(e) => {
                    if e.reason() != reason {
                        return fail(
                            CHECK,
                            format!("create failed with {} (want {reason}): {e}", e.reason()),
                        );
                    }
                    if !e.is_retryable() {
                        return fail(CHECK, format!("{reason} must be retryable"));
                    }
                    if e.is_out_of_resources() != out_of_resources {
                        return fail(
                            CHECK,
                            format!(
                                "{reason}: is_out_of_resources() is {}",
                                e.is_out_of_resources()
                            ),
                        );
                    }
                }
            }
            // The failed create launched nothing: the same key now creates a fresh machine.
            let created = cleanup.create(CHECK, &req).await?;
            if created.state == InstanceState::Terminating {
                return fail(
                    CHECK,
                    "the create after a failed one returned a Terminating machine",
                );
            }
        }
        Ok(ran)
    }
    .await;
    cleanup.finish(r).await
}

/// Runs every check and reports each.
pub async fn run_all(provider: &dyn Provider, c: &Conformance) -> ConformanceReport {
    let mut report = ConformanceReport::default();
    let mut record = |name: &'static str, r: Result<bool, ConformanceFailure>| match r {
        Ok(true) => report.passed.push(name),
        Ok(false) => report.skipped.push(name),
        Err(f) => report.failed.push(f),
    };
    record(
        "create_is_idempotent",
        create_is_idempotent(provider, c).await.map(|()| true),
    );
    record(
        "tags_at_launch",
        tags_at_launch(provider, c).await.map(|()| true),
    );
    record(
        "get_after_create",
        get_after_create(provider, c).await.map(|()| true),
    );
    record(
        "list_is_complete",
        list_is_complete(provider, c).await.map(|()| true),
    );
    record(
        "delete_then_gone",
        delete_then_gone(provider, c).await.map(|()| true),
    );
    record(
        "unknown_provider_id",
        unknown_provider_id(provider, c).await.map(|()| true),
    );
    record("errors_are_typed", errors_are_typed(provider, c).await);
    report
}
