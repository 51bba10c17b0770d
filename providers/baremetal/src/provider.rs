//! The bare-metal [`Provider`]: claims (through the controller's [`ClaimStore`]) decide who
//! owns a host; Redfish powers it; SSH joins it.
//!
//! A host's life, as the `phase` field of its claim:
//! `claimed` (record won, nothing touched yet) → `booting` (boot override set, power on sent,
//! or already on: the warm tier) → `joining` (SSH answered; the join script is about to run)
//! → `joined` (`kubeadm join` exited 0) → `releasing` (delete: `kubeadm reset -f`, wipe,
//! graceful shutdown sent) → claim deleted once the BMC says Off.
//!
//! After a restart (a `kill -9` at any point) the retried create picks the launch up where the
//! claim says: `claimed` powers the host on, `booting` waits for SSH and joins. `joining` is
//! never joined again: `kubeadm join` on a host that joined fails its preflight checks (the
//! kubelet's config and port are taken), and the join payload with its bootstrap token lived
//! only in the dead process. The host's join runs on without its SSH session (see
//! [`join_script`]); the kubelet's registration decides, within the Node's registration
//! timeout, and the claim stays `joining`.
//! `failed` (did not come up in the registration timeout, host key changed, join failed) keeps
//! the host out of the pool: on delete it is powered off and its claim stays, without a Node,
//! until an operator deletes it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kube_node_crds::names::tags;
use kube_node_provider::{
    ClaimRecord, ClaimStore, CreateRequest, DeleteOutcome, Instance, InstanceAddress,
    InstanceState, ListFilter, Provider, ProviderError, Result, Sensitive, Written,
};

use crate::config::{Config, Host};
use crate::redfish::{self, PowerState, RedfishError};
use crate::ssh::{self, SshError};

/// The backend's name and provider-ID scheme.
pub const NAME: &str = "baremetal";

/// Claim `data` keys.
mod data {
    pub const HOST: &str = "host";
    pub const PHASE: &str = "phase";
    pub const REASON: &str = "reason";
    pub const NODESET: &str = "nodeset";
    pub const SHUTDOWN_AT: &str = "shutdown-at";
    pub const FORCED: &str = "force-off";
    pub const FAILED: &str = "failed";
}

/// Claim phases.
mod phase {
    pub const CLAIMED: &str = "claimed";
    pub const BOOTING: &str = "booting";
    pub const JOINING: &str = "joining";
    pub const JOINED: &str = "joined";
    pub const RELEASING: &str = "releasing";
    pub const FAILED: &str = "failed";
}

/// Counts for the figures: Redfish requests and SSH sessions.
#[derive(Debug, Default)]
pub struct Stats {
    /// Redfish HTTP requests.
    pub redfish: Arc<redfish::Counters>,
    /// SSH sessions opened (authenticated or not).
    pub ssh_sessions: AtomicU64,
    /// `kubeadm join` runs started.
    pub joins: AtomicU64,
}

impl Stats {
    /// Redfish requests so far.
    pub fn redfish_requests(&self) -> u64 {
        self.redfish.requests.load(Ordering::Relaxed)
    }
    /// SSH sessions so far.
    pub fn ssh_sessions(&self) -> u64 {
        self.ssh_sessions.load(Ordering::Relaxed)
    }
}

struct Inner {
    cfg: Config,
    claims: Arc<dyn ClaimStore>,
    clients: Vec<redfish::Client>,
    systems: Mutex<HashMap<String, redfish::System>>,
    power: Mutex<HashMap<String, PowerState>>,
    joins: Mutex<HashMap<String, tokio::task::JoinHandle<()>>>,
    create_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    inject: Mutex<Option<ProviderError>>,
    stats: Arc<Stats>,
    poll: Duration,
}

/// The bare-metal backend for one NodeClass.
#[derive(Clone)]
pub struct BaremetalProvider {
    inner: Arc<Inner>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl BaremetalProvider {
    /// A provider over `cfg`, keeping its claims in `claims`.
    pub fn new(cfg: Config, claims: Arc<dyn ClaimStore>) -> Result<Self> {
        let tls = tls_config(cfg.redfish_ca.as_deref())?;
        let stats = Arc::new(Stats::default());
        let clients = cfg
            .hosts
            .iter()
            .map(|h| {
                redfish::Client::new(
                    tls.clone(),
                    &h.bmc_username,
                    &h.bmc_password,
                    stats.redfish.clone(),
                )
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                claims,
                clients,
                systems: Mutex::default(),
                power: Mutex::default(),
                joins: Mutex::default(),
                create_locks: Mutex::default(),
                inject: Mutex::default(),
                stats,
                poll: Duration::from_secs(2),
            }),
        })
    }

    /// The request counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    /// Makes the next create fail with `error` before it claims anything (the conformance
    /// suite's error-injection hook).
    pub fn inject_create_error(&self, error: ProviderError) {
        if let Ok(mut i) = self.inner.inject.lock() {
            *i = Some(error);
        }
    }
}

fn tls_config(extra_ca: Option<&[u8]>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = extra_ca {
        use rustls_pki_types::pem::PemObject;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|_| {
                ProviderError::InvalidConfig(
                    "credentials Secret key redfish-ca.crt: not PEM certificates".into(),
                )
            })?;
            roots.add(cert).map_err(|e| {
                ProviderError::InvalidConfig(format!("credentials Secret key redfish-ca.crt: {e}"))
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProviderError::InvalidConfig(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Reads a Redfish failure of a host as the contract's error kinds (unit-tested table).
pub fn map_redfish(host: &Host, what: &str, e: &RedfishError) -> ProviderError {
    match e {
        RedfishError::Unreachable(m) => ProviderError::Transient(format!(
            "host {}: the BMC does not answer ({what}): {m}",
            host.name
        )),
        RedfishError::Status { status, .. } if redfish::is_auth_status(*status) => {
            ProviderError::Unauthorized(format!(
                "host {}: the BMC refused the login (HTTP {status}) on {what}; check bmc-username/bmc-password",
                host.name
            ))
        }
        RedfishError::Status { status: 404, .. } => ProviderError::InvalidConfig(format!(
            "{}.redfishUrl: no such Redfish system ({what} answered 404)",
            host.field
        )),
        RedfishError::Status {
            status: 429 | 503,
            retry_after,
        } => ProviderError::Throttled {
            message: format!("host {}: the BMC asked to slow down ({what})", host.name),
            retry_after: retry_after.map(Duration::from_secs),
        },
        RedfishError::Status { status, .. } if *status >= 500 || *status == 409 => {
            ProviderError::Transient(format!(
                "host {}: {what} failed with HTTP {status}",
                host.name
            ))
        }
        RedfishError::Status { status, .. } => ProviderError::InvalidConfig(format!(
            "{}: the BMC rejected {what} with HTTP {status}",
            host.field
        )),
        RedfishError::Decode(m) => {
            ProviderError::InvalidConfig(format!("{}.redfishUrl: {what}: {m}", host.field))
        }
    }
}

/// The cloud-config subset the node-controller renders: files to write and commands to run.
struct JoinPlan {
    files: Vec<(String, String, String)>,
    commands: Vec<String>,
}

/// Parses the rendered user-data (`#cloud-config` with `write_files` and `runcmd`). With
/// `join_config_path`, the written file that a command reads with `--config` (the
/// JoinConfiguration) goes there instead, and the command's argument follows.
fn join_plan(
    user_data: &Sensitive,
    join_config_path: Option<&str>,
) -> std::result::Result<JoinPlan, String> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&user_data.0).map_err(|_| "the user-data is not YAML".to_string())?;
    let mut files = Vec::new();
    for f in doc["write_files"]
        .as_sequence()
        .map_or(&[][..], |s| s.as_slice())
    {
        let path = f["path"]
            .as_str()
            .ok_or("a write_files entry has no path")?;
        let content = f["content"].as_str().unwrap_or_default();
        let perms = f["permissions"].as_str().unwrap_or("0600");
        if !perms.chars().all(|c| c.is_ascii_digit()) {
            return Err("write_files permissions must be octal".into());
        }
        files.push((path.to_string(), content.to_string(), perms.to_string()));
    }
    enum Cmd {
        Shell(String),
        Argv(Vec<String>),
    }
    let mut cmds = Vec::new();
    for c in doc["runcmd"]
        .as_sequence()
        .map_or(&[][..], |s| s.as_slice())
    {
        cmds.push(match c {
            serde_yaml::Value::String(s) => Cmd::Shell(s.clone()),
            serde_yaml::Value::Sequence(argv) => Cmd::Argv(
                argv.iter()
                    .map(|a| a.as_str().unwrap_or_default().to_string())
                    .collect(),
            ),
            _ => return Err("a runcmd entry is neither a string nor a list".into()),
        });
    }
    if let Some(to) = join_config_path {
        for c in &mut cmds {
            let Cmd::Argv(argv) = c else { continue };
            let Some(i) = argv.iter().position(|a| a == "--config") else {
                continue;
            };
            let Some(from) = argv.get(i + 1).cloned() else {
                continue;
            };
            if let Some(f) = files.iter_mut().find(|f| f.0 == from) {
                f.0 = to.to_string();
                argv[i + 1] = to.to_string();
            }
        }
    }
    let commands = cmds
        .into_iter()
        .map(|c| match c {
            Cmd::Shell(s) => s,
            Cmd::Argv(argv) => argv
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect();
    Ok(JoinPlan { files, commands })
}

/// The shell script that writes the plan's files and runs its commands (`set -e`). The file
/// contents go in quoted here-documents, so nothing in them is expanded. Its output goes to
/// `/dev/null` on the host (kube-node drops it anyway: it may echo the payload): a join whose
/// SSH session dies with a killed kube-node then runs on to its end instead of dying of
/// SIGPIPE half-way (no terminal, so no SIGHUP either), and is never run twice.
fn join_script(plan: &JoinPlan) -> std::result::Result<String, String> {
    const EOF: &str = "KUBE_NODE_EOF_5f1c3a";
    let mut s = String::from("set -e\numask 077\nexec >/dev/null 2>&1\n");
    for (path, content, perms) in &plan.files {
        if content.lines().any(|l| l == EOF) {
            return Err("a write_files content holds the here-document delimiter".into());
        }
        let dir = path
            .rsplit_once('/')
            .map_or(".", |(d, _)| if d.is_empty() { "/" } else { d });
        let p = shell_quote(path);
        s.push_str(&format!(
            "mkdir -p {}\ncat > {p} <<'{EOF}'\n{content}",
            shell_quote(dir)
        ));
        if !content.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&format!("{EOF}\nchmod {perms} {p}\n"));
    }
    for c in &plan.commands {
        s.push_str(c);
        s.push('\n');
    }
    Ok(s)
}

/// Quotes one word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Inner {
    fn host_by_name(&self, name: &str) -> Option<(usize, &Host)> {
        self.cfg
            .hosts
            .iter()
            .enumerate()
            .find(|(_, h)| h.name == name)
    }

    fn host_by_key(&self, key: &str) -> Option<(usize, &Host)> {
        self.cfg
            .hosts
            .iter()
            .enumerate()
            .find(|(_, h)| h.claim_key == key)
    }

    fn provider_id(h: &Host) -> String {
        format!("{NAME}:///{}/{}", h.zone(), h.name)
    }

    /// The host named by a provider ID of this backend and class.
    fn parse_pid(&self, pid: &str) -> Option<(usize, &Host)> {
        let rest = pid.strip_prefix(&format!("{NAME}:///"))?;
        let (zone, name) = rest.rsplit_once('/')?;
        let (i, h) = self.host_by_name(name)?;
        (h.zone() == zone).then_some((i, h))
    }

    /// Whether a record holds its host for a Node (not set aside as failed).
    fn ours(&self, r: &ClaimRecord) -> bool {
        !r.node_uid.is_empty()
    }

    fn instance(&self, h: &Host, r: &ClaimRecord, state: InstanceState) -> Instance {
        let mut t = std::collections::BTreeMap::from([
            (tags::CLUSTER.to_string(), r.cluster.clone()),
            (tags::NODE_NAME.to_string(), r.node_name.clone()),
            (tags::NODE_UID.to_string(), r.node_uid.clone()),
            (tags::NODE_CLASS.to_string(), r.node_class.clone()),
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
        ]);
        if let Some(ns) = r.data.get(data::NODESET) {
            t.insert(tags::NODESET.to_string(), ns.clone());
        }
        Instance {
            id: h.name.clone(),
            provider_id: Self::provider_id(h),
            state,
            tags: t,
            zone: Some(h.zone().to_string()),
            instance_type: h.labels.get("node.kubernetes.io/instance-type").cloned(),
            addresses: vec![InstanceAddress {
                kind: "InternalIP".into(),
                address: h.address.clone(),
            }],
            created_unix: Some(r.claimed_at_unix),
            labels: h.labels.clone(),
            failure: None,
        }
    }

    fn state_of(r: &ClaimRecord) -> InstanceState {
        match r.data.get(data::PHASE).map(String::as_str) {
            Some(phase::JOINED) => InstanceState::Running,
            Some(phase::RELEASING) => InstanceState::Terminating,
            _ => InstanceState::Pending,
        }
    }

    async fn system(&self, i: usize, h: &Host, refresh: bool) -> Result<redfish::System> {
        let cached = self
            .systems
            .lock()
            .ok()
            .and_then(|s| s.get(&h.name).cloned());
        let sys = match cached {
            Some(s) if !refresh => return Ok(s),
            Some(s) => self.clients[i].system(&s.url).await,
            None => self.clients[i].resolve_system(&h.redfish_url).await,
        }
        .map_err(|e| map_redfish(h, "reading the system", &e))?;
        if let Ok(mut s) = self.systems.lock() {
            s.insert(h.name.clone(), sys.clone());
        }
        if let Ok(mut p) = self.power.lock() {
            p.insert(h.name.clone(), sys.power);
        }
        Ok(sys)
    }

    /// Replaces a record, re-reading once on conflict while it is still this Node's.
    async fn update(
        &self,
        key: &str,
        uid: &str,
        f: impl Fn(&mut ClaimRecord),
    ) -> Result<Option<ClaimRecord>> {
        for _ in 0..5 {
            let Some(mut r) = self.claims.get(key).await? else {
                return Ok(None);
            };
            if r.node_uid != uid {
                return Ok(None);
            }
            f(&mut r);
            match self.claims.replace(&r).await? {
                Written::Done(r) => return Ok(Some(r)),
                Written::Conflict => continue,
            }
        }
        Err(ProviderError::Transient(format!(
            "claim {key}: kept changing while being updated"
        )))
    }

    /// Moves this Node's claim from `booting` to `joining`; false when it is not `booting`
    /// (someone else joins it, or joined it) or no longer this Node's.
    async fn mark_joining(&self, key: &str, uid: &str) -> Result<bool> {
        for _ in 0..5 {
            let Some(mut r) = self.claims.get(key).await? else {
                return Ok(false);
            };
            if r.node_uid != uid
                || r.data.get(data::PHASE).map(String::as_str) != Some(phase::BOOTING)
            {
                return Ok(false);
            }
            r.data.insert(data::PHASE.into(), phase::JOINING.into());
            match self.claims.replace(&r).await? {
                Written::Done(_) => return Ok(true),
                Written::Conflict => continue,
            }
        }
        Err(ProviderError::Transient(format!(
            "claim {key}: kept changing while being marked joining"
        )))
    }

    /// Gives a host back: deletes its claim, or keeps it without a Node when it failed.
    async fn release(&self, r: &ClaimRecord) -> Result<()> {
        if let Some(j) = self.joins.lock().ok().and_then(|mut j| j.remove(&r.key)) {
            j.abort();
        }
        if let Some(reason) = r.data.get(data::FAILED).cloned() {
            let mut held = r.clone();
            held.node_name.clear();
            held.node_uid.clear();
            held.data.retain(|k, _| k == data::HOST);
            held.data.insert(data::PHASE.into(), phase::FAILED.into());
            held.data.insert(data::REASON.into(), reason.clone());
            self.claims.replace(&held).await?;
            tracing::warn!(
                host = r.data.get(data::HOST).map(String::as_str).unwrap_or_default(),
                reason = %reason,
                "set a failed host aside; delete its claim Lease to return it to the pool"
            );
        } else {
            let v = r.version.clone().unwrap_or_default();
            self.claims.delete(&r.key, &v).await?;
        }
        Ok(())
    }

    /// Brings a claimed host up: boot override and power on (unless it is on: the warm
    /// tier), then the join in the background.
    async fn launch(
        self: &Arc<Self>,
        i: usize,
        h: &Host,
        mut r: ClaimRecord,
        user_data: Option<&Sensitive>,
    ) -> Result<Instance> {
        if r.data.get(data::PHASE).map(String::as_str) == Some(phase::CLAIMED) {
            let sys = match self.system(i, h, true).await {
                Ok(s) => s,
                Err(e) => {
                    // Nothing was touched: give the claim back unless the BMC is just slow.
                    if !e.is_retryable() {
                        let _ = self
                            .claims
                            .delete(&r.key, r.version.as_deref().unwrap_or_default())
                            .await;
                    }
                    return Err(e);
                }
            };
            if sys.power != PowerState::On {
                if let Err(e) = self.clients[i].boot_once(&sys, "Hdd").await {
                    // Some BMCs refuse a boot override (or only take it with the system off);
                    // the host then boots by its own order, which for a pre-installed OS is
                    // the disk.
                    tracing::warn!(host = %h.name, error = %e, "boot override refused; booting by the host's own order");
                }
                if sys.power != PowerState::PoweringOn {
                    self.clients[i]
                        .reset(&sys, "On")
                        .await
                        .map_err(|e| map_redfish(h, "ComputerSystem.Reset On", &e))?;
                }
            }
            let warm = sys.power == PowerState::On;
            r = self
                .update(&r.key, &r.node_uid, |r| {
                    r.data.insert(data::PHASE.into(), phase::BOOTING.into());
                })
                .await?
                .ok_or_else(|| {
                    ProviderError::Transient(format!(
                        "host {}: claim lost while powering on",
                        h.name
                    ))
                })?;
            tracing::info!(host = %h.name, warm, "powered on host");
        }
        if r.data.get(data::PHASE).map(String::as_str) == Some(phase::BOOTING) {
            match user_data {
                Some(ud) => self.spawn_join(i, &r, ud.clone()),
                None => {
                    // Nothing to run on it (no join payload): up once it is powered.
                    if let Some(n) = self
                        .update(&r.key, &r.node_uid, |r| {
                            r.data.insert(data::PHASE.into(), phase::JOINED.into());
                        })
                        .await?
                    {
                        r = n;
                    }
                }
            }
        }
        Ok(self.instance(h, &r, Self::state_of(&r)))
    }

    fn spawn_join(self: &Arc<Self>, i: usize, r: &ClaimRecord, user_data: Sensitive) {
        let Ok(mut joins) = self.joins.lock() else {
            return;
        };
        if joins.get(&r.key).is_some_and(|j| !j.is_finished()) {
            return;
        }
        let this = self.clone();
        let (key, uid) = (r.key.clone(), r.node_uid.clone());
        let deadline_unix = r.claimed_at_unix + this.cfg.registration_timeout.as_secs() as i64;
        let task = tokio::spawn(async move {
            let outcome = this.join(i, &key, &uid, &user_data, deadline_unix).await;
            let h = &this.cfg.hosts[i];
            let (phase, reason) = match &outcome {
                Ok(true) => (phase::JOINED, None),
                Ok(false) => {
                    // Another task (another provider instance, another replica) joins it.
                    tracing::debug!(host = %h.name, "the join is someone else's");
                    return;
                }
                Err(e) => (phase::FAILED, Some(e.clone())),
            };
            match &reason {
                None => tracing::info!(host = %h.name, "kubeadm join succeeded"),
                Some(r) => tracing::warn!(host = %h.name, reason = %r, "host failed to join"),
            }
            let _ = this
                .update(&key, &uid, |rec| {
                    if rec.data.get(data::PHASE).map(String::as_str) == Some(phase::JOINED) {
                        // Joined by another task meanwhile: its outcome stands.
                        return;
                    }
                    rec.data.insert(data::PHASE.into(), phase.into());
                    if let Some(r) = &reason {
                        rec.data.insert(data::REASON.into(), r.clone());
                        rec.data.insert(data::FAILED.into(), r.clone());
                    }
                })
                .await;
        });
        joins.insert(r.key.clone(), task);
    }

    async fn connect(
        &self,
        h: &Host,
        timeout: Duration,
    ) -> std::result::Result<ssh::Session, SshError> {
        self.stats.ssh_sessions.fetch_add(1, Ordering::Relaxed);
        ssh::connect(
            &ssh::Target {
                addr: h.ssh_addr.clone(),
                host_key: h.host_key.clone(),
                user: self.cfg.ssh_user.clone(),
                key: h.ssh_key.clone(),
            },
            timeout,
        )
        .await
    }

    /// Waits for SSH, writes the join payload's files and runs its commands. The error is a
    /// short reason for the claim (no output, no payload).
    async fn join(
        &self,
        i: usize,
        key: &str,
        uid: &str,
        user_data: &Sensitive,
        deadline_unix: i64,
    ) -> std::result::Result<bool, String> {
        let h = &self.cfg.hosts[i];
        let plan = join_plan(user_data, self.cfg.join_config_path.as_deref())?;
        let session = loop {
            let left = deadline_unix - now_unix();
            if left <= 0 {
                return Err("NotUp: SSH did not answer within the registration timeout".into());
            }
            match self
                .connect(h, Duration::from_secs(left.clamp(1, 10) as u64))
                .await
            {
                Ok(s) => break s,
                Err(SshError::Unreachable(..)) => tokio::time::sleep(self.poll).await,
                Err(e @ SshError::HostKeyMismatch(..)) => {
                    return Err(format!("HostKeyChanged: {e}"));
                }
                Err(e) => return Err(format!("SshFailed: {e}")),
            }
        };
        // Recorded before it starts, compare-and-swap from `booting`: exactly one task of one
        // process runs a join, and a successor never runs it a second time.
        loop {
            match self.mark_joining(key, uid).await {
                Ok(true) => break,
                Ok(false) => {
                    session.close().await;
                    return Ok(false);
                }
                Err(_) if deadline_unix > now_unix() => tokio::time::sleep(self.poll).await,
                Err(_) => {
                    session.close().await;
                    return Err("ClaimLost: the claim could not be marked joining".into());
                }
            }
        }
        // One script, one channel: the files and the commands run as one unit on the host.
        let script = join_script(&plan)?;
        self.stats.joins.fetch_add(1, Ordering::Relaxed);
        let result = session
            .run(
                "kubeadm join",
                "sh -s",
                Some(script.as_bytes()),
                Duration::from_secs(600),
            )
            .await;
        session.close().await;
        result
            .map(|()| true)
            .map_err(|e| format!("JoinFailed: {e}"))
    }

    /// Tears a host down before power-off: `kubeadm reset -f` and the wipe command, best
    /// effort (a host that does not answer is powered off anyway).
    async fn teardown(&self, h: &Host, failed_reason: Option<&str>) {
        if failed_reason.is_some_and(|r| r.starts_with("HostKeyChanged")) {
            return;
        }
        let session = match self.connect(h, Duration::from_secs(10)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(host = %h.name, error = %e, "no SSH for kubeadm reset; powering off anyway");
                return;
            }
        };
        if let Err(e) = session
            .run(
                "kubeadm reset",
                "kubeadm reset -f",
                None,
                Duration::from_secs(120),
            )
            .await
        {
            tracing::info!(host = %h.name, error = %e, "kubeadm reset failed; powering off anyway");
        }
        if let Some(w) = &self.cfg.wipe_command
            && let Err(e) = session
                .run("wipe command", w, None, Duration::from_secs(1800))
                .await
        {
            tracing::warn!(host = %h.name, error = %e, "wipe command failed; powering off anyway");
        }
        session.close().await;
    }
}

impl BaremetalProvider {
    /// Claims the first free host (warm tier first) for `request` and launches it; `None`
    /// when every host is taken.
    async fn claim_free(
        &self,
        request: &CreateRequest,
        records: &[ClaimRecord],
    ) -> Result<Option<Instance>> {
        let inner = &self.inner;
        let taken: std::collections::HashSet<&str> =
            records.iter().map(|r| r.key.as_str()).collect();
        let power = inner.power.lock().map(|p| p.clone()).unwrap_or_default();
        // The warm tier first: hosts seen powered on (idle), then unknown, then off.
        let rank = |h: &Host| match power.get(&h.name) {
            Some(PowerState::On) => 0,
            None | Some(PowerState::Unknown) => 1,
            _ => 2,
        };
        let mut free: Vec<(usize, &Host)> = inner
            .cfg
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| !taken.contains(h.claim_key.as_str()))
            .collect();
        free.sort_by_key(|(i, h)| (rank(h), *i));
        for (i, h) in free {
            let mut d = std::collections::BTreeMap::from([
                (data::HOST.to_string(), h.name.clone()),
                (data::PHASE.to_string(), phase::CLAIMED.to_string()),
            ]);
            if let Some(ns) = request.tags.get(tags::NODESET) {
                d.insert(data::NODESET.into(), ns.clone());
            }
            let rec = ClaimRecord {
                key: h.claim_key.clone(),
                version: None,
                cluster: request
                    .tags
                    .get(tags::CLUSTER)
                    .cloned()
                    .unwrap_or_else(|| inner.cfg.cluster.clone()),
                node_class: request
                    .tags
                    .get(tags::NODE_CLASS)
                    .cloned()
                    .unwrap_or_else(|| inner.cfg.class.clone()),
                node_name: request.node_name.clone(),
                node_uid: request.idempotency_key.clone(),
                claimed_at_unix: now_unix(),
                data: d,
            };
            match inner.claims.create(&rec).await? {
                Written::Done(r) => {
                    tracing::info!(host = %h.name, node = %request.node_name, "claimed host");
                    return inner
                        .launch(i, h, r, request.user_data.as_ref())
                        .await
                        .map(Some);
                }
                Written::Conflict => continue,
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl Provider for BaremetalProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn validate(&self) -> Result<()> {
        // One system read per host (bounded concurrency): finds missing systems and refused
        // logins, and fills the power-state cache the warm tier is chosen from.
        let mut set = tokio::task::JoinSet::new();
        let mut first: Option<ProviderError> = None;
        for i in 0..self.inner.cfg.hosts.len() {
            if set.len() >= 8
                && let Some(Ok(Err(e))) = set.join_next().await
            {
                first.get_or_insert(e);
            }
            let inner = self.inner.clone();
            set.spawn(async move {
                let h = &inner.cfg.hosts[i];
                inner.system(i, h, true).await.map(|_| ())
            });
        }
        while let Some(r) = set.join_next().await {
            if let Ok(Err(e)) = r {
                // The least retryable error is the one to report.
                if first
                    .as_ref()
                    .is_none_or(|f| f.is_retryable() && !e.is_retryable())
                {
                    first = Some(e);
                }
            }
        }
        self.inner.claims.list().await?;
        first.map_or(Ok(()), Err)
    }

    async fn create(&self, request: &CreateRequest) -> Result<Instance> {
        let inner = &self.inner;
        if let Some(e) = inner.inject.lock().ok().and_then(|mut i| i.take()) {
            return Err(e);
        }
        let lock = inner
            .create_locks
            .lock()
            .map_err(|_| ProviderError::Transient("lock poisoned".into()))?
            .entry(request.idempotency_key.clone())
            .or_default()
            .clone();
        let _serial = lock.lock().await;
        let records = inner.claims.list().await?;
        if let Some(r) = records
            .iter()
            .find(|r| inner.ours(r) && r.node_uid == request.idempotency_key)
        {
            let Some((i, h)) = inner.host_by_key(&r.key) else {
                return Err(ProviderError::InvalidConfig(format!(
                    "Node {} holds host {} that is no longer in the inventory",
                    request.node_name,
                    r.data.get(data::HOST).map(String::as_str).unwrap_or(&r.key)
                )));
            };
            if r.data.get(data::PHASE).map(String::as_str) == Some(phase::RELEASING) {
                return Ok(inner.instance(h, r, InstanceState::Terminating));
            }
            return inner
                .launch(i, h, r.clone(), request.user_data.as_ref())
                .await;
        }
        if let Some(i) = self.claim_free(request, &records).await? {
            return Ok(i);
        }
        // The pool looks full: hosts still shutting down for a deleted Node go back to it once
        // the BMC says Off (the node-controller usually finds that first, by polling get).
        let mut finished = false;
        for r in records.iter().filter(|r| {
            inner.ours(r) && r.data.get(data::PHASE).map(String::as_str) == Some(phase::RELEASING)
        }) {
            if let Some((_, h)) = inner.host_by_key(&r.key)
                && let Err(ProviderError::NotFound(_)) = self.get(&Inner::provider_id(h)).await
            {
                finished = true;
            }
        }
        if finished {
            let records = inner.claims.list().await?;
            if let Some(i) = self.claim_free(request, &records).await? {
                return Ok(i);
            }
        }
        Err(ProviderError::InsufficientCapacity(format!(
            "no free host in the inventory of NodeClass {} ({} hosts, all claimed or set aside)",
            inner.cfg.class,
            inner.cfg.hosts.len()
        )))
    }

    async fn get(&self, provider_id: &str) -> Result<Instance> {
        let inner = &self.inner;
        let not_found = || ProviderError::NotFound(provider_id.to_string());
        let (i, h) = inner.parse_pid(provider_id).ok_or_else(not_found)?;
        let r = inner
            .claims
            .get(&h.claim_key)
            .await?
            .filter(|r| inner.ours(r))
            .ok_or_else(not_found)?;
        if r.data.get(data::PHASE).map(String::as_str) != Some(phase::RELEASING) {
            return Ok(inner.instance(h, &r, Inner::state_of(&r)));
        }
        // Releasing: gone once the BMC says Off; ForceOff after the shutdown timeout.
        let sys = inner.system(i, h, true).await?;
        if sys.power == PowerState::Off {
            inner.release(&r).await?;
            tracing::info!(host = %h.name, "released host");
            return Err(not_found());
        }
        let since = r
            .data
            .get(data::SHUTDOWN_AT)
            .and_then(|s| s.parse::<i64>().ok())
            .unwrap_or(r.claimed_at_unix);
        if now_unix() - since >= inner.cfg.shutdown_timeout.as_secs() as i64
            && !r.data.contains_key(data::FORCED)
        {
            inner.clients[i]
                .reset(&sys, "ForceOff")
                .await
                .map_err(|e| map_redfish(h, "ComputerSystem.Reset ForceOff", &e))?;
            inner
                .update(&r.key, &r.node_uid, |r| {
                    r.data.insert(data::FORCED.into(), "true".into());
                })
                .await?;
            tracing::warn!(host = %h.name, "graceful shutdown timed out; forced off");
        }
        Ok(inner.instance(h, &r, InstanceState::Terminating))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        // From the claims alone: no Redfish call, so the orphan collector's list costs one
        // API read however large the inventory.
        let inner = &self.inner;
        let records = inner.claims.list().await?;
        Ok(records
            .iter()
            .filter(|r| r.cluster == filter.cluster && !r.node_uid.is_empty())
            .filter(|r| {
                filter
                    .node_class
                    .as_ref()
                    .is_none_or(|c| *c == r.node_class)
            })
            .filter_map(|r| {
                let (_, h) = inner.host_by_key(&r.key)?;
                Some(inner.instance(h, r, Inner::state_of(r)))
            })
            .collect())
    }

    async fn delete(&self, provider_id: &str) -> Result<DeleteOutcome> {
        let inner = &self.inner;
        let Some((i, h)) = inner.parse_pid(provider_id) else {
            return Ok(DeleteOutcome::Gone);
        };
        let Some(r) = inner
            .claims
            .get(&h.claim_key)
            .await?
            .filter(|r| inner.ours(r))
        else {
            return Ok(DeleteOutcome::Gone);
        };
        if r.data.get(data::PHASE).map(String::as_str) == Some(phase::RELEASING) {
            // Callers that do not poll get (the orphan collector) finish the release here.
            return match self.get(provider_id).await {
                Err(ProviderError::NotFound(_)) => Ok(DeleteOutcome::Gone),
                Ok(_) => Ok(DeleteOutcome::Deleting),
                Err(e) => Err(e),
            };
        }
        if let Some(j) = inner.joins.lock().ok().and_then(|mut j| j.remove(&r.key)) {
            j.abort();
        }
        let failed = r.data.get(data::FAILED).cloned();
        if r.data.get(data::PHASE).map(String::as_str) != Some(phase::CLAIMED) {
            inner.teardown(h, failed.as_deref()).await;
        }
        let sys = inner.system(i, h, true).await?;
        if sys.power == PowerState::Off {
            // BMCs apply power changes asynchronously: a host that still reads Off may have
            // our power-on queued. ForceOff replaces it; a BMC that refuses it for a host
            // that is off anyway changes nothing.
            if let Err(e) = inner.clients[i].reset(&sys, "ForceOff").await {
                tracing::debug!(host = %h.name, error = %e, "ForceOff of an off host refused");
            }
        } else {
            let graceful = sys.reset_types.is_empty()
                || sys.reset_types.iter().any(|t| t == "GracefulShutdown");
            let kind = if graceful {
                "GracefulShutdown"
            } else {
                "ForceOff"
            };
            inner.clients[i]
                .reset(&sys, kind)
                .await
                .map_err(|e| map_redfish(h, &format!("ComputerSystem.Reset {kind}"), &e))?;
        }
        inner
            .update(&r.key, &r.node_uid, |r| {
                r.data.insert(data::PHASE.into(), phase::RELEASING.into());
                r.data
                    .insert(data::SHUTDOWN_AT.into(), now_unix().to_string());
            })
            .await?;
        tracing::info!(host = %h.name, "shutting host down");
        Ok(DeleteOutcome::Deleting)
    }

    async fn free_capacity(&self) -> Result<Option<u32>> {
        let records = self.inner.claims.list().await?;
        let taken: std::collections::HashSet<&str> =
            records.iter().map(|r| r.key.as_str()).collect();
        let free = self
            .inner
            .cfg
            .hosts
            .iter()
            .filter(|h| !taken.contains(h.claim_key.as_str()))
            .count();
        Ok(Some(u32::try_from(free).unwrap_or(u32::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("kubeadm"), "kubeadm");
        assert_eq!(
            shell_quote("/etc/kubeadm/join.yaml"),
            "/etc/kubeadm/join.yaml"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn join_plan_reads_the_rendered_user_data() {
        let ud = Sensitive(
            "#cloud-config\nwrite_files:\n- path: /etc/kubernetes/kube-node-join.yaml\n  owner: root:root\n  permissions: '0600'\n  content: |\n    kind: JoinConfiguration\nruncmd:\n- - kubeadm\n  - join\n  - --config\n  - /etc/kubernetes/kube-node-join.yaml\n".into(),
        );
        let p = join_plan(&ud, None).expect("plan");
        assert_eq!(p.files.len(), 1);
        assert_eq!(p.files[0].0, "/etc/kubernetes/kube-node-join.yaml");
        assert_eq!(p.files[0].1, "kind: JoinConfiguration\n");
        assert_eq!(
            p.commands,
            ["kubeadm join --config /etc/kubernetes/kube-node-join.yaml"]
        );
        // joinConfigPath: the file kubeadm reads moves, and so does its argument.
        let p = join_plan(&ud, Some("/var/lib/kube-node/join.yaml")).expect("plan");
        assert_eq!(p.files[0].0, "/var/lib/kube-node/join.yaml");
        assert_eq!(
            p.commands,
            ["kubeadm join --config /var/lib/kube-node/join.yaml"]
        );
    }

    fn host() -> Host {
        Host {
            name: "rack-a-01".into(),
            field: "spec.provider.baremetal.hosts[0] (rack-a-01)".into(),
            redfish_url: "http://bmc/redfish/v1/Systems/1".into(),
            claim_key: "bm-00".into(),
            ssh_addr: "10.0.0.1:22".into(),
            address: "10.0.0.1".into(),
            host_key: ssh::parse_public_key(
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            )
            .expect("key"),
            bmc_username: "u".into(),
            bmc_password: "p".into(),
            ssh_key: Arc::new(ssh::parse_private_key(TEST_KEY).expect("key")),
            labels: Default::default(),
        }
    }

    /// A throwaway key made for this test with `ssh-keygen -t ed25519`; it opens nothing.
    const TEST_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACBlDvQAmP5o90ZBT9i6FHAsI02aXBsa79zl6HzkLMnbDgAAAIhoH/l8aB/5\nfAAAAAtzc2gtZWQyNTUxOQAAACBlDvQAmP5o90ZBT9i6FHAsI02aXBsa79zl6HzkLMnbDg\nAAAEAU/A5HmV1LeFTLdcCWkA7PTMhBrjrhSHSMmdbo4rj0A2UO9ACY/mj3RkFP2LoUcCwj\nTZpcGxrv3OXofOQsydsOAAAABHRlc3QB\n-----END OPENSSH PRIVATE KEY-----\n";

    #[test]
    fn redfish_errors_are_typed() {
        let h = host();
        let st = |status| RedfishError::Status {
            status,
            retry_after: None,
        };
        let cases: Vec<(RedfishError, &str, bool)> = vec![
            (
                RedfishError::Unreachable("refused".into()),
                "Transient",
                true,
            ),
            (st(401), "Unauthorized", true),
            (st(403), "Unauthorized", true),
            (st(404), "InvalidConfig", true),
            (st(429), "Throttled", false),
            (st(503), "Throttled", false),
            (st(500), "Transient", false),
            (st(409), "Transient", false),
            (st(400), "InvalidConfig", false),
            (RedfishError::Decode("x".into()), "InvalidConfig", false),
        ];
        for (e, reason, names_host) in cases {
            let m = map_redfish(&h, "reading the system", &e);
            assert_eq!(m.reason(), reason, "{e:?}");
            assert!(m.message().contains("rack-a-01"), "{m}");
            assert!(!m.message().contains(&h.bmc_password) || h.bmc_password.len() < 2);
            if names_host && reason == "InvalidConfig" {
                assert!(
                    m.message().contains("spec.provider.baremetal.hosts[0]"),
                    "{m}"
                );
            }
        }
    }
}
