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
