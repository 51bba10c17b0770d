//! The event path for transitions.
//!
//! kube-runtime's `Recorder` keeps every event it wrote for six minutes, so that repeats fold
//! into one series. Failures repeat with the backoff and belong there; a transition (Launching,
//! Registered, Deleting, …) happens once per object, and caching each would hold one entry per
//! object and transition — most of a controller's memory in a scale-up of thousands. So a
//! transition is written here, as the recorder would write it, and not kept.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Api;
use kube::api::PostParams;

/// Writes one Normal events.k8s.io/v1 Event (action `Reconcile`) about `regarding`, reported by
/// `reporter`, without keeping it. Events about cluster-scoped objects live in `default`.
pub async fn publish_transition(
    client: &kube::Client,
    reporter: &str,
    regarding: ObjectReference,
    reason: &str,
    note: &str,
) -> Result<(), kube::Error> {
    let now = jiff::Timestamp::now();
    let name = regarding.name.clone().unwrap_or_default();
    let namespace = regarding
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_string());
    let event = Event {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            ..Default::default()
        },
        action: Some("Reconcile".to_string()),
        reason: Some(reason.to_string()),
        note: Some(note.to_string()),
        type_: Some("Normal".to_string()),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding),
        reporting_controller: Some(reporter.to_string()),
        reporting_instance: Some(reporter.to_string()),
        ..Default::default()
    };
    Api::<Event>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &event)
        .await
        .map(|_| ())
}

/// How many events wait for the writer before new ones are dropped (client-go's broadcaster
/// queues 1000).
pub const EVENT_QUEUE: usize = 1000;
/// The event writer's own rate limit: events are for people reading `kubectl describe`, and
/// must not compete with the writes that make machines.
pub const EVENT_QPS: f64 = 20.0;
/// The event writer's burst.
pub const EVENT_BURST: u32 = 100;
/// Events one object may burst (client-go's spam filter: 25, then one per five minutes).
pub const EVENTS_PER_OBJECT_BURST: f64 = 25.0;
/// How long an object's spam-filter bucket takes to earn one more event.
pub const EVENTS_PER_OBJECT_REFILL: std::time::Duration = std::time::Duration::from_secs(300);

/// One event waiting to be written.
struct Pending {
    regarding: ObjectReference,
    type_: kube::runtime::events::EventType,
    reason: String,
    note: String,
}

/// The best-effort event path, as client-go's event broadcaster is: [`publish`](Self::publish)
/// never waits for the API server and never fails. Events go through a bounded queue (full:
/// the event is dropped and counted, the reconcile goes on), a per-object spam filter (a
/// token bucket per object, so one object in a failure loop cannot flood the queue) and the
/// writer's own token bucket, on a client of its own when it is given one, so an event never
/// takes a token a Node write needs. Normal events are written once and forgotten; Warnings go
/// through kube-runtime's `Recorder`, which folds repeats into one series.
#[derive(Clone)]
pub struct EventSink {
    tx: tokio::sync::mpsc::Sender<Pending>,
    filter: std::sync::Arc<std::sync::Mutex<SpamFilter>>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl EventSink {
    /// Starts the writer task (it ends once every clone of the sink is gone). `qps <= 0`
    /// disables the writer's own rate limit.
    pub fn start(client: kube::Client, reporter: &str, qps: f64, burst: u32) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Pending>(EVENT_QUEUE);
        let recorder = kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: reporter.to_string(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        let reporter = reporter.to_string();
        let bucket = crate::client::TokenBucket::new(qps, burst);
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                bucket.acquire().await;
                let result = match p.type_ {
                    kube::runtime::events::EventType::Normal => {
                        publish_transition(&client, &reporter, p.regarding, &p.reason, &p.note)
                            .await
                    }
                    kube::runtime::events::EventType::Warning => {
                        let ev = kube::runtime::events::Event {
                            type_: p.type_,
                            reason: p.reason,
                            note: Some(p.note),
                            action: "Reconcile".to_string(),
                            secondary: None,
                        };
                        recorder.publish(&ev, &p.regarding).await
                    }
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "cannot publish event");
                }
            }
        });
        Self {
            tx,
            filter: Default::default(),
            dropped: Default::default(),
        }
    }

    /// Queues an event about `regarding`; drops it when the object is over its budget or the
    /// queue is full.
    pub fn publish(
        &self,
        regarding: ObjectReference,
        type_: kube::runtime::events::EventType,
        reason: &str,
        note: &str,
    ) {
        let key = format!(
            "{}/{}/{}/{}",
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default(),
            regarding.uid.as_deref().unwrap_or_default(),
        );
        let allowed = self
            .filter
            .lock()
            .map(|mut f| f.allow(&key, std::time::Instant::now()))
            .unwrap_or(true);
        let pending = Pending {
            regarding,
            type_,
            reason: reason.to_string(),
            note: note.chars().take(1000).collect(),
        };
        if !allowed || self.tx.try_send(pending).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(reason, object = %key, "event dropped");
        }
    }

    /// Events dropped so far (over an object's budget, or the queue full).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A token bucket per object (client-go's `EventSourceObjectSpamFilter`).
#[derive(Default)]
struct SpamFilter {
    buckets: std::collections::HashMap<String, (f64, std::time::Instant)>,
    /// The size at which full buckets are next forgotten (doubles while many objects speak,
    /// so pruning stays linear overall).
    prune_at: usize,
}

impl SpamFilter {
    fn allow(&mut self, key: &str, now: std::time::Instant) -> bool {
        let rate = 1.0 / EVENTS_PER_OBJECT_REFILL.as_secs_f64();
        // A full bucket says nothing a missing one does not: forget them, so the map holds
        // only objects that spoke recently (not one entry per Node ever seen).
        if self.buckets.len() >= self.prune_at.max(4096) {
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < EVENTS_PER_OBJECT_BURST
            });
            self.prune_at = (self.buckets.len() * 2).max(4096);
        }
        let (tokens, at) = self
            .buckets
            .entry(key.to_string())
            .or_insert((EVENTS_PER_OBJECT_BURST, now));
        *tokens =
            (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(EVENTS_PER_OBJECT_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_object_gets_its_burst_then_one_event_per_refill() {
        let mut f = SpamFilter::default();
        let t0 = std::time::Instant::now();
        let allowed = (0..40).filter(|_| f.allow("Node//a/1", t0)).count();
        assert_eq!(allowed, 25);
        assert!(
            f.allow("Node//b/2", t0),
            "another object has its own budget"
        );
        assert!(!f.allow("Node//a/1", t0 + EVENTS_PER_OBJECT_REFILL / 2));
        assert!(f.allow("Node//a/1", t0 + EVENTS_PER_OBJECT_REFILL * 2));
    }

    #[test]
    fn quiet_objects_are_forgotten() {
        let mut f = SpamFilter::default();
        let t0 = std::time::Instant::now();
        for i in 0..4096 {
            f.allow(&format!("Node//n{i}/u"), t0);
        }
        // One refill later every bucket is full again: the next new key prunes them all.
        f.allow("Node//new/u", t0 + EVENTS_PER_OBJECT_REFILL * 2);
        assert_eq!(f.buckets.len(), 1);
    }
}
