//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can run safely: only the
//! holder reconciles or calls a provider; a standby takes over when the holder stops renewing.
//!
//! The Lease is updated with `replace` and its `resourceVersion`, so two candidates can never
//! both believe they acquired it: the loser gets a 409 and stays standby.
//!
//! A candidate that can never lead says so loudly instead of retrying in silence: when the
//! Lease's namespace does not exist it is created (the README's quick start runs `kube-node
//! run` on a fresh cluster, where nothing made `kube-node-system`); when that or the Lease
//! itself is forbidden, or the Lease stays unreachable, the campaign reports
//! [`CampaignHealth::CannotLead`] with the fix in words, logged once as an ERROR, and
//! `kube-node run` answers `/ready` with 503.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// How a candidate behaves.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
    /// This candidate's identity (the pod name).
    pub identity: String,
    /// How long a Lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// How often the holder renews; must be well below `lease_duration`.
    pub renew_interval: Duration,
}

impl LeaseConfig {
    /// Defaults like kube-controller-manager's (15 s lease, renew every 5 s... here 2 s retry).
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
        }
    }
}

/// What one attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    Leader,
    Standby,
}

fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().map(|t| t.0) else {
        return true;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    now.as_second() > renewed.as_second() + duration
}

async fn try_acquire_or_renew(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<Attempt, kube::Error> {
    let secs = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(15);
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now_micro()),
                    renew_time: Some(now_micro()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Standby),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            let mine = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            if !mine && !expired(spec, Timestamp::now()) && spec.holder_identity.is_some() {
                return Ok(Attempt::Standby);
            }
            if !mine {
                spec.holder_identity = Some(cfg.identity.clone());
                spec.acquire_time = Some(now_micro());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(secs);
            spec.renew_time = Some(now_micro());
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leader),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::Standby),
                Err(e) => Err(e),
            }
        }
    }
}

/// How the campaign is going, for the readiness probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CampaignHealth {
    /// No answer about the Lease yet.
    Connecting,
    /// The Lease was read or written: this candidate leads or stands by.
    Reached,
    /// This candidate cannot lead until someone acts; the message says what to do.
    CannotLead(String),
}

/// A running campaign.
pub struct Campaign {
    /// `true` while this candidate leads.
    pub leading: watch::Receiver<bool>,
    /// How the campaign is going.
    pub health: watch::Receiver<CampaignHealth>,
    /// The campaign task; abort it before [`release`].
    pub task: tokio::task::JoinHandle<()>,
}

/// What a failed Lease call means.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Failure {
    /// The Lease's namespace does not exist.
    NamespaceMissing,
    /// Lasting until someone acts (RBAC, credentials): the fix, in words.
    Blocked(String),
    /// Worth retrying as is.
    Transient(String),
}

/// How long transient failures may last before the campaign counts as unable to lead.
const LASTING: Duration = Duration::from_secs(30);

fn classify(e: &kube::Error, cfg: &LeaseConfig) -> Failure {
    let ns = &cfg.namespace;
    match e {
        kube::Error::Api(s) if s.code == 404 && namespace_missing(s, ns) => {
            Failure::NamespaceMissing
        }
        kube::Error::Api(s) if s.code == 403 => Failure::Blocked(format!(
            "kube-node may not read or write the leader Lease {ns}/{name} ({msg}): grant it get, \
             create and update on leases in {ns} (deploy/rbac.yaml has the Role), or run a \
             single replica with --leader-elect=false",
            name = cfg.name,
            msg = s.message
        )),
        kube::Error::Api(s) if s.code == 401 => Failure::Blocked(format!(
            "the API server does not accept kube-node's credentials ({}): check KUBECONFIG or \
             the ServiceAccount token",
            s.message
        )),
        other => Failure::Transient(other.to_string()),
    }
}

/// A 404 about the namespace (creating an object in a missing namespace), not about the Lease.
fn namespace_missing(s: &kube::core::Status, namespace: &str) -> bool {
    let kind_is_namespace = s
        .details
        .as_ref()
        .is_some_and(|d| d.kind == "namespaces" && d.name == namespace);
    kind_is_namespace || s.message == format!("namespaces \"{namespace}\" not found")
}

/// Creates the Lease's namespace. `Ok(())` also when it appeared meanwhile.
async fn create_namespace(client: &kube::Client, cfg: &LeaseConfig) -> Result<(), Failure> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(cfg.namespace.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
    {
        Ok(_) => {
            tracing::info!(namespace = %cfg.namespace, "created the namespace of the leader Lease");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 403 => Err(Failure::Blocked(format!(
            "the namespace {ns} of the leader Lease does not exist and kube-node may not create \
             it: create it (kubectl create namespace {ns}), pick an existing one with \
             --leader-election-namespace, or run a single replica with --leader-elect=false",
            ns = cfg.namespace
        ))),
        Err(e) => Err(Failure::Transient(e.to_string())),
    }
}

/// Campaigns for the Lease forever. The returned receiver is `true` while this candidate leads.
///
/// Leadership is dropped (set `false`) as soon as a renewal cannot be confirmed within
/// `lease_duration - renew_interval` of the last confirmed one — also when the API server does
/// not answer at all (every call is bounded by that deadline) — so the holder stops acting a
/// full renew interval before any other candidate may take the Lease over.
///
/// Abort the returned task before [`release`], or it may take the released Lease again.
pub fn campaign(
    client: kube::Client,
    cfg: LeaseConfig,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let c = campaign_with_health(client, cfg);
    (c.leading, c.task)
}

/// [`campaign`], also reporting whether this candidate can lead at all.
pub fn campaign_with_health(client: kube::Client, cfg: LeaseConfig) -> Campaign {
    let (tx, rx) = watch::channel(false);
    let (health_tx, health_rx) = watch::channel(CampaignHealth::Connecting);
    let handle = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
        // Since when Lease calls fail without a break (for "lasting" transient failures).
        let mut failing_since: Option<Instant> = None;
        let mut created_namespace = false;
        let set_health = |h: CampaignHealth| {
            health_tx.send_if_modified(|cur| {
                if *cur == h {
                    return false;
                }
                match (&*cur, &h) {
                    (_, CampaignHealth::CannotLead(why)) => {
                        tracing::error!(identity = %cfg.identity, lease = %cfg.name, namespace = %cfg.namespace, "cannot lead: {why}");
                    }
                    (CampaignHealth::CannotLead(_), CampaignHealth::Reached) => {
                        tracing::info!(lease = %cfg.name, namespace = %cfg.namespace, "leader Lease reachable again");
                    }
                    _ => {}
                }
                *cur = h;
                true
            });
        };
        // How long after a confirmed renewal this candidate may keep acting. Others may take
        // over only `lease_duration` after the renewTime it wrote, which is no earlier than
        // the instant the renewal was sent.
        let hold = match cfg.lease_duration.saturating_sub(cfg.renew_interval) {
            d if d.is_zero() => cfg.lease_duration / 2,
            d => d,
        };
        // When the last confirmed renewal was *sent*.
        let mut renewed_at: Option<Instant> = None;
        loop {
            if *tx.borrow() && renewed_at.is_none_or(|t| t.elapsed() >= hold) {
                tracing::warn!(identity = %cfg.identity, "lost leadership: renewal not confirmed in time");
                renewed_at = None;
                let _ = tx.send(false);
            }
            let leading = *tx.borrow();
            let sent = Instant::now();
            // A call that hangs (an unreachable API server) must not keep this candidate
            // leading past its deadline.
            let budget = match renewed_at {
                Some(t) if leading => (t + hold).saturating_duration_since(sent),
                _ => cfg.lease_duration,
            };
            let result = tokio::time::timeout(budget, try_acquire_or_renew(&api, &cfg)).await;
            if let Ok(Ok(_)) = &result {
                failing_since = None;
                set_health(CampaignHealth::Reached);
            }
            match result {
                Ok(Ok(Attempt::Leader)) => {
                    if !leading {
                        tracing::info!(identity = %cfg.identity, lease = %cfg.name, "acquired leadership");
                    }
                    renewed_at = Some(sent);
                    let _ = tx.send(true);
                }
                Ok(Ok(Attempt::Standby)) => {
                    if *tx.borrow() {
                        tracing::warn!(identity = %cfg.identity, "lost leadership");
                    }
                    renewed_at = None;
                    let _ = tx.send(false);
                }
                Ok(Err(e)) => {
                    let since = *failing_since.get_or_insert(sent);
                    match classify(&e, &cfg) {
                        Failure::NamespaceMissing => match create_namespace(&client, &cfg).await {
                            // Campaign again at once, now that the namespace exists (once:
                            // a namespace that is being deleted answers the same way).
                            Ok(()) if !created_namespace => {
                                created_namespace = true;
                                continue;
                            }
                            Ok(()) => {
                                tracing::warn!(namespace = %cfg.namespace, "the namespace of the leader Lease is not usable yet")
                            }
                            Err(Failure::Blocked(why)) => {
                                set_health(CampaignHealth::CannotLead(why))
                            }
                            Err(f) => {
                                tracing::warn!(failure = ?f, "cannot create the namespace of the leader Lease")
                            }
                        },
                        Failure::Blocked(why) => set_health(CampaignHealth::CannotLead(why)),
                        Failure::Transient(why) => {
                            if since.elapsed() >= LASTING.max(cfg.lease_duration * 2) {
                                set_health(CampaignHealth::CannotLead(format!(
                                    "the leader Lease {}/{} has been unreachable for {}s ({why}): \
                                     check that the API server is reachable and healthy",
                                    cfg.namespace,
                                    cfg.name,
                                    since.elapsed().as_secs()
                                )));
                            } else if !matches!(*health_tx.borrow(), CampaignHealth::CannotLead(_))
                            {
                                tracing::warn!(error = %why, "lease renewal failed");
                            }
                        }
                    }
                }
                Err(_) => {
                    failing_since.get_or_insert(sent);
                    tracing::warn!(?budget, "lease renewal timed out");
                }
            }
            let wait = match renewed_at {
                // Wake up in time to step down if renewals keep failing.
                Some(t) if *tx.borrow() => cfg
                    .renew_interval
                    .min((t + hold).saturating_duration_since(Instant::now())),
                _ => cfg.renew_interval.min(Duration::from_secs(2)),
            };
            tokio::time::sleep(wait).await;
        }
    });
    Campaign {
        leading: rx,
        health: health_rx,
        task: handle,
    }
}

/// Releases the Lease if this candidate holds it, so a standby takes over at once on a
/// graceful shutdown. Stop this candidate's [`campaign`] task first.
pub async fn release(client: kube::Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if api
        .replace(&cfg.name, &PostParams::default(), &lease)
        .await
        .is_ok()
    {
        tracing::info!(identity = %cfg.identity, "released leadership");
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    use super::*;

    /// A fresh cluster's answers about Leases: no Lease, and no namespace for it until someone
    /// creates it (if `may_create_namespace`). Records the requests.
    #[derive(Clone)]
    struct FreshCluster {
        may_create_namespace: bool,
        namespace_exists: Arc<Mutex<bool>>,
        requests: Arc<Mutex<Vec<String>>>,
    }

    fn status(code: u16, reason: &str, message: &str, kind: &str, name: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
            "details": {"name": name, "kind": kind},
        }))
        .expect("json")
    }

    impl FreshCluster {
        async fn answer(
            self,
            req: http::Request<kube::client::Body>,
        ) -> Result<http::Response<Full<Bytes>>, Infallible> {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            self.requests
                .lock()
                .expect("requests")
                .push(format!("{method} {path}"));
            let body = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes().to_vec())
                .unwrap_or_default();
            let exists = *self.namespace_exists.lock().expect("ns");
            let (code, out) = match (method.as_str(), path.as_str()) {
                ("GET", p) if p.ends_with("/leases/kube-node") => (
                    404,
                    status(
                        404,
                        "NotFound",
                        "leases.coordination.k8s.io \"kube-node\" not found",
                        "leases",
                        "kube-node",
                    ),
                ),
                ("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-system/leases") => {
                    if exists {
                        (201, body)
                    } else {
                        (
                            404,
                            status(
                                404,
                                "NotFound",
                                "namespaces \"kube-node-system\" not found",
                                "namespaces",
                                "kube-node-system",
                            ),
                        )
                    }
                }
                ("POST", "/api/v1/namespaces") => {
                    if self.may_create_namespace {
                        *self.namespace_exists.lock().expect("ns") = true;
                        (201, body)
                    } else {
                        (
                            403,
                            status(
                                403,
                                "Forbidden",
                                "namespaces is forbidden: User \"dev\" cannot create resource \"namespaces\"",
                                "namespaces",
                                "",
                            ),
                        )
                    }
                }
                _ => (404, status(404, "NotFound", "not found", "", "")),
            };
            let mut r = http::Response::new(Full::new(Bytes::from(out)));
            *r.status_mut() = http::StatusCode::from_u16(code).expect("code");
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            Ok(r)
        }
    }

    fn fresh_cluster(may_create_namespace: bool) -> (kube::Client, FreshCluster) {
        let cluster = FreshCluster {
            may_create_namespace,
            namespace_exists: Arc::default(),
            requests: Arc::default(),
        };
        let c = cluster.clone();
        let svc = tower::service_fn(move |req| c.clone().answer(req));
        (kube::Client::new(svc, "default"), cluster)
    }

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            renew_interval: Duration::from_millis(100),
            ..LeaseConfig::new("kube-node-system", "kube-node", "me")
        }
    }

    #[tokio::test]
    async fn on_a_fresh_cluster_the_lease_namespace_is_created_and_the_candidate_leads() {
        let (client, cluster) = fresh_cluster(true);
        let mut c = campaign_with_health(client, cfg());
        tokio::time::timeout(Duration::from_secs(10), c.leading.wait_for(|l| *l))
            .await
            .expect("leads in time")
            .expect("campaign runs");
        assert_eq!(*c.health.borrow(), CampaignHealth::Reached);
        c.task.abort();
        let requests = cluster.requests.lock().expect("requests").clone();
        assert!(
            requests.contains(&"POST /api/v1/namespaces".to_string()),
            "{requests:?}"
        );
    }

    #[tokio::test]
    async fn a_namespace_it_may_not_create_is_a_lasting_cannot_lead_with_the_fix() {
        let (client, _cluster) = fresh_cluster(false);
        let mut c = campaign_with_health(client, cfg());
        let health = tokio::time::timeout(
            Duration::from_secs(10),
            c.health
                .wait_for(|h| matches!(h, CampaignHealth::CannotLead(_))),
        )
        .await
        .expect("in time")
        .expect("campaign runs")
        .clone();
        let CampaignHealth::CannotLead(why) = health else {
            unreachable!()
        };
        for words in [
            "kubectl create namespace kube-node-system",
            "--leader-election-namespace",
            "--leader-elect=false",
        ] {
            assert!(why.contains(words), "{why}");
        }
        assert!(!*c.leading.borrow());
        c.task.abort();
    }

    #[test]
    fn only_a_404_about_the_namespace_means_a_missing_namespace() {
        let s = |message: &str, kind: &str, name: &str| kube::core::Status {
            code: 404,
            message: message.into(),
            details: Some(kube::core::response::StatusDetails {
                kind: kind.into(),
                name: name.into(),
                group: String::new(),
                uid: String::new(),
                causes: Vec::new(),
                retry_after_seconds: 0,
            }),
            ..Default::default()
        };
        assert!(namespace_missing(
            &s("namespaces \"x\" not found", "namespaces", "x"),
            "x"
        ));
        assert!(!namespace_missing(
            &s("leases \"kube-node\" not found", "leases", "kube-node"),
            "x"
        ));
    }
}
