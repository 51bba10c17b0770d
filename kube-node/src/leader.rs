//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can run safely: only the
//! holder reconciles or calls a provider; a standby takes over when the holder stops renewing.
//!
//! The Lease is updated with `replace` and its `resourceVersion`, so two candidates can never
//! both believe they acquired it: the loser gets a 409 and stays standby.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
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
    let (tx, rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
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
            match tokio::time::timeout(budget, try_acquire_or_renew(&api, &cfg)).await {
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
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed"),
                Err(_) => tracing::warn!(?budget, "lease renewal timed out"),
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
    (rx, handle)
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
