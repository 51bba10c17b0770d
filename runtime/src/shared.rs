//! One watch of a kind for the whole process, fanned out to every controller that needs it.
//!
//! Both controllers watch Nodes. Run side by side, two watches would hold two caches of every
//! Node and decode every Node event twice; with thousands of Nodes that is most of the
//! process's memory. A [`Fanout`] drives one watch stream (which the caller has already
//! reflected into one [`Store`](kube::runtime::reflector::Store)) and hands each subscriber
//! every event, in order, after the store has it — as an informer's event handlers see them.
//!
//! kube-runtime's shared reflector (`store_shared`, behind its unstable features) hands
//! subscribers objects only; the nodeset-controller's expectations need the events themselves
//! (deletes and relists), so the fan-out is this small one.

use std::future::Future;

use futures::{Stream, StreamExt};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use tokio::sync::mpsc;

/// What a controller is handed instead of starting its own watch: the shared cache and its
/// own subscription to the events that fed it.
pub struct WatchSource<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    /// The shared cache, updated before each event is delivered.
    pub store: Store<K>,
    /// Every watch event, after the store has it. Never yields an error: the shared watch
    /// retries with its own backoff and logs what failed.
    pub events: futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>,
}

/// What the process hands a controller so that it shares instead of owning: the Node watch,
/// and a client of its own for events. A controller run alone (its crate's tests) starts its
/// own watch and writes events on its own client.
#[derive(Default)]
pub struct Shared {
    /// The process's one Node watch, its cache compact ([`CachedNode`](crate::CachedNode)).
    pub nodes: Option<WatchSource<crate::CachedNode>>,
    /// A client (with its own token bucket) for the best-effort event path, so events never
    /// take a token a controller's writes need.
    pub events_client: Option<kube::Client>,
}

/// Hands every event of one watch stream to each subscriber.
pub struct Fanout<K> {
    senders: Vec<mpsc::UnboundedSender<watcher::Event<K>>>,
}

impl<K> Default for Fanout<K> {
    fn default() -> Self {
        Self {
            senders: Vec::new(),
        }
    }
}

impl<K: Clone + Send + 'static> Fanout<K> {
    /// A fan-out with no subscribers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new subscriber: every event from the start of [`run`](Self::run).
    pub fn subscribe(
        &mut self,
    ) -> futures::stream::BoxStream<'static, Result<watcher::Event<K>, watcher::Error>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.senders.push(tx);
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
            .map(Ok)
            .boxed()
    }

    /// Drives `source` until it ends or every subscriber is gone. Errors are logged, not
    /// forwarded (the source backs off and retries on its own).
    pub fn run<S>(self, source: S) -> impl Future<Output = ()> + Send + 'static
    where
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    {
        let mut senders = self.senders;
        async move {
            let mut source = std::pin::pin!(source);
            loop {
                let all_gone = futures::future::join_all(senders.iter().map(|s| s.closed()));
                let item = tokio::select! {
                    item = source.next() => item,
                    _ = all_gone => return,
                };
                match item {
                    None => return,
                    Some(Err(e)) => tracing::warn!(error = %e, "shared watch failed; retrying"),
                    Some(Ok(event)) => {
                        senders.retain(|s| !s.is_closed());
                        // The last subscriber gets the event itself, the others a copy.
                        if let Some((last, rest)) = senders.split_last() {
                            for s in rest {
                                let _ = s.send(event.clone());
                            }
                            let _ = last.send(event);
                        }
                        if senders.is_empty() {
                            return;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str) -> ConfigMap {
        ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn every_subscriber_sees_every_event_in_order() {
        let mut fanout = Fanout::<ConfigMap>::new();
        let a = fanout.subscribe();
        let b = fanout.subscribe();
        let source = futures::stream::iter(vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(cm("x"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(cm("x"))),
        ]);
        fanout.run(source).await;
        let names = |s: futures::stream::BoxStream<'static, _>| async move {
            s.map(
                |e: Result<watcher::Event<ConfigMap>, watcher::Error>| match e {
                    Ok(watcher::Event::Init) => "init".to_string(),
                    Ok(watcher::Event::InitApply(o)) => {
                        format!("initapply {}", o.metadata.name.unwrap_or_default())
                    }
                    Ok(watcher::Event::InitDone) => "initdone".to_string(),
                    Ok(watcher::Event::Apply(o)) => {
                        format!("apply {}", o.metadata.name.unwrap_or_default())
                    }
                    Ok(watcher::Event::Delete(o)) => {
                        format!("delete {}", o.metadata.name.unwrap_or_default())
                    }
                    Err(e) => format!("error {e}"),
                },
            )
            .collect::<Vec<_>>()
            .await
        };
        let want = vec!["init", "initapply x", "initdone", "delete x"];
        assert_eq!(names(a).await, want);
        assert_eq!(names(b).await, want);
    }

    #[tokio::test]
    async fn the_fanout_stops_when_every_subscriber_is_gone() {
        let mut fanout = Fanout::<ConfigMap>::new();
        let a = fanout.subscribe();
        drop(a);
        // A source that never ends: only the subscribers' absence can stop the run.
        let source = futures::stream::pending();
        tokio::time::timeout(std::time::Duration::from_secs(5), fanout.run(source))
            .await
            .expect("run returns once nobody listens");
    }
}
