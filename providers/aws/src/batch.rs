//! Coalescing of per-key lookups into batched fetches.
//!
//! The node-controller asks for one machine at a time (`Provider::get` per Node per pass),
//! but EC2 answers many instance ids in one DescribeInstances. A [`Batcher`] collects the
//! keys asked for within a short window into one fetch: the first caller of a quiet batcher
//! spawns a leader task that waits for the window, takes every pending key, fetches them in
//! chunks of at most `max_keys`, answers each waiter, and repeats while keys arrived during
//! the fetch (they wait for the in-flight call, then share the next one). When nothing is
//! pending the leader exits; the next caller starts a new one.
//!
//! Each caller receives its own value, or `None` when the fetch did not return its key. An
//! error of a fetch goes to every waiter of that chunk. The leader runs as its own task, so a
//! caller that is dropped (a cancelled reconcile) never breaks the batch: its key is skipped
//! if nobody else waits for it, and its answer is discarded otherwise. If the leader itself
//! goes away (a panic in a fetch, the runtime shutting down), every waiter gets a Transient
//! error and the next caller starts a fresh leader.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use kube_node_provider::{ProviderError, Result};
use tokio::sync::oneshot;

/// What a fetch returns: the value of each key it found. Keys it did not find are absent.
pub(crate) type FetchFuture<T> = Pin<Box<dyn Future<Output = Result<HashMap<String, T>>> + Send>>;

/// Fetches the values of up to `max_keys` keys in one call.
pub(crate) type FetchFn<T> = Arc<dyn Fn(Vec<String>) -> FetchFuture<T> + Send + Sync>;

type Reply<T> = oneshot::Sender<Result<Option<T>>>;

/// Coalesces concurrent lookups by key into batched fetches (see the module docs).
pub(crate) struct Batcher<T> {
    inner: Arc<Inner<T>>,
}

impl<T> std::fmt::Debug for Batcher<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("what", &self.inner.what)
            .field("window", &self.inner.window)
            .field("max_keys", &self.inner.max_keys)
            .finish_non_exhaustive()
    }
}

struct Inner<T> {
    /// What is fetched, for error messages (e.g. "DescribeInstances by instance id").
    what: &'static str,
    window: Duration,
    max_keys: usize,
    fetch: FetchFn<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    /// The callers waiting for each key, not yet taken by the leader.
    pending: HashMap<String, Vec<Reply<T>>>,
    /// Whether a leader task is running (it will take `pending`).
    leading: bool,
}

impl<T> Inner<T> {
    fn state(&self) -> MutexGuard<'_, State<T>> {
        // No code panics while holding the lock; if one did, the map is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: Clone + Send + 'static> Batcher<T> {
    /// A batcher that waits `window` after the first lookup of a batch and fetches at most
    /// `max_keys` keys per call (at least 1).
    pub(crate) fn new(
        what: &'static str,
        window: Duration,
        max_keys: usize,
        fetch: FetchFn<T>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                what,
                window,
                max_keys: max_keys.max(1),
                fetch,
                state: Mutex::new(State {
                    pending: HashMap::new(),
                    leading: false,
                }),
            }),
        }
    }

    /// The value of `key`, fetched together with the other keys asked for meanwhile; `None`
    /// when the fetch did not return it.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<T>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            ProviderError::Transient(format!("{}: needs a tokio runtime", self.inner.what))
        })?;
        let (tx, rx) = oneshot::channel();
        let start_leader = {
            let mut state = self.inner.state();
            state.pending.entry(key.to_string()).or_default().push(tx);
            !std::mem::replace(&mut state.leading, true)
        };
        if start_leader {
            runtime.spawn(lead(self.inner.clone()));
        }
        rx.await.unwrap_or_else(|_| {
            Err(ProviderError::Transient(format!(
                "{}: the batched call was abandoned",
                self.inner.what
            )))
        })
    }
}

/// Resets the batcher if the leader task ends without handing over (a panic in a fetch, or
/// the runtime dropping the task): waiting callers get an error instead of waiting forever,
/// and the next caller starts a new leader.
struct LeaderGuard<T> {
    inner: Arc<Inner<T>>,
    armed: bool,
}

impl<T> Drop for LeaderGuard<T> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = self.inner.state();
            state.leading = false;
            // Dropping the senders wakes their callers with an error.
            state.pending.clear();
        }
    }
}

async fn lead<T: Clone + Send + 'static>(inner: Arc<Inner<T>>) {
    let mut guard = LeaderGuard {
        inner: inner.clone(),
        armed: true,
    };
    tokio::time::sleep(inner.window).await;
    loop {
        let taken = {
            let mut state = inner.state();
            if state.pending.is_empty() {
                state.leading = false;
                guard.armed = false;
                return;
            }
            std::mem::take(&mut state.pending)
        };
        // Keys nobody waits for any more (their callers were dropped) are not fetched.
        let mut batch: BTreeMap<String, Vec<Reply<T>>> = taken
            .into_iter()
            .filter_map(|(key, mut waiters)| {
                waiters.retain(|w| !w.is_closed());
                (!waiters.is_empty()).then_some((key, waiters))
            })
            .collect();
        while !batch.is_empty() {
            let keys: Vec<String> = batch.keys().take(inner.max_keys).cloned().collect();
            tracing::debug!(what = inner.what, keys = keys.len(), "fetching a batch");
            let result = (inner.fetch)(keys.clone()).await;
            for key in keys {
                let Some(waiters) = batch.remove(&key) else {
                    continue;
                };
                let answer = match &result {
                    Ok(found) => Ok(found.get(&key).cloned()),
                    Err(e) => Err(e.clone()),
                };
                for w in waiters {
                    // A caller that went away meanwhile does not want its answer.
                    let _ = w.send(answer.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! No test depends on timing: the runtime is single-threaded (callers spawned together
    //! all register before the leader first runs), and fetches that must be "in flight" wait
    //! on a gate the test opens.
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    /// A fetch that knows keys starting with "i-", counts its calls, records the keys of
    /// each call, and (when gated) answers only once the test adds a permit.
    #[derive(Clone)]
    struct Fake {
        calls: Arc<AtomicUsize>,
        keys: Arc<Mutex<Vec<Vec<String>>>>,
        fail: Arc<Mutex<Option<ProviderError>>>,
        gate: Option<Arc<Semaphore>>,
    }

    impl Fake {
        fn new() -> Self {
            Self {
                calls: Arc::default(),
                keys: Arc::default(),
                fail: Arc::default(),
                gate: None,
            }
        }

        fn gated() -> Self {
            Self {
                gate: Some(Arc::new(Semaphore::new(0))),
                ..Self::new()
            }
        }

        fn open(&self, fetches: usize) {
            if let Some(g) = &self.gate {
                g.add_permits(fetches);
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn keys(&self) -> Vec<Vec<String>> {
            self.keys.lock().expect("keys").clone()
        }

        fn batcher(&self, max_keys: usize) -> Arc<Batcher<String>> {
            let fake = self.clone();
            Arc::new(Batcher::new(
                "test fetch",
                Duration::from_millis(5),
                max_keys,
                Arc::new(move |keys: Vec<String>| {
                    let fake = fake.clone();
                    Box::pin(async move {
                        fake.calls.fetch_add(1, Ordering::SeqCst);
                        fake.keys.lock().expect("keys").push(keys.clone());
                        if let Some(g) = &fake.gate {
                            g.acquire().await.expect("gate").forget();
                        }
                        if let Some(e) = fake.fail.lock().expect("fail").clone() {
                            return Err(e);
                        }
                        Ok(keys
                            .into_iter()
                            .filter(|k| k.starts_with("i-"))
                            .map(|k| (k.clone(), format!("instance {k}")))
                            .collect())
                    }) as FetchFuture<String>
                }),
            ))
        }
    }

    type Answer = tokio::task::JoinHandle<Result<Option<String>>>;

    fn spawn_get(batcher: &Arc<Batcher<String>>, key: &str) -> Answer {
        let (b, key) = (batcher.clone(), key.to_string());
        tokio::spawn(async move { b.get(&key).await })
    }

    async fn answer(task: Answer) -> Result<Option<String>> {
        task.await.expect("join")
    }

    /// Polls `cond` every millisecond for at most 10 s.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..10_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("timed out waiting for {what}");
    }

    fn waiting(batcher: &Batcher<String>) -> usize {
        batcher.inner.state().pending.values().map(Vec::len).sum()
    }

    #[tokio::test]
    async fn fifty_concurrent_gets_make_one_fetch() {
        let fake = Fake::new();
        let batcher = fake.batcher(1000);
        let tasks: Vec<Answer> = (0..50)
            .map(|n| spawn_get(&batcher, &format!("i-{n}")))
            .collect();
        for (n, t) in tasks.into_iter().enumerate() {
            assert_eq!(
                answer(t).await.expect("get"),
                Some(format!("instance i-{n}"))
            );
        }
        assert_eq!(fake.calls(), 1);
        assert_eq!(fake.keys()[0].len(), 50);
    }

    #[tokio::test]
    async fn the_same_key_asked_twice_is_fetched_once_and_answers_both() {
        let fake = Fake::new();
        let batcher = fake.batcher(1000);
        let (a, b) = tokio::join!(batcher.get("i-1"), batcher.get("i-1"));
        assert_eq!(a.expect("a"), Some("instance i-1".to_string()));
        assert_eq!(b.expect("b"), Some("instance i-1".to_string()));
        assert_eq!(fake.keys(), vec![vec!["i-1".to_string()]]);
    }

    #[tokio::test]
    async fn keys_are_fetched_in_chunks_of_max_keys() {
        let fake = Fake::new();
        let batcher = fake.batcher(200);
        let tasks: Vec<Answer> = (0..450)
            .map(|n| spawn_get(&batcher, &format!("i-{n:03}")))
            .collect();
        for t in tasks {
            assert!(answer(t).await.expect("get").is_some());
        }
        let sizes: Vec<usize> = fake.keys().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![200, 200, 50]);
    }

    #[tokio::test]
    async fn gets_arriving_during_a_fetch_share_the_next_one() {
        let fake = Fake::gated();
        let batcher = fake.batcher(1000);
        let first = spawn_get(&batcher, "i-first");
        until("the first fetch", || fake.calls() == 1).await;
        // Ten gets spread over the time the first call is in flight.
        let mut later = Vec::new();
        for n in 0..10 {
            later.push(spawn_get(&batcher, &format!("i-{n}")));
            until("the get to wait", || waiting(&batcher) == n + 1).await;
        }
        fake.open(2);
        assert!(answer(first).await.expect("first").is_some());
        for t in later {
            assert!(answer(t).await.expect("later").is_some());
        }
        assert_eq!(fake.calls(), 2);
        assert_eq!(fake.keys()[1].len(), 10);

        // Once quiet, the leader has gone; a later get starts a new batch.
        until("the leader to exit", || !batcher.inner.state().leading).await;
        fake.open(1);
        assert_eq!(
            batcher.get("i-late").await.expect("late"),
            Some("instance i-late".to_string())
        );
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test]
    async fn an_error_reaches_every_waiter_and_the_next_batch_recovers() {
        let fake = Fake::new();
        let throttled = ProviderError::Throttled {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(2)),
        };
        *fake.fail.lock().expect("fail") = Some(throttled.clone());
        let batcher = fake.batcher(1000);
        let tasks: Vec<Answer> = (0..10)
            .map(|n| spawn_get(&batcher, &format!("i-{n}")))
            .collect();
        for t in tasks {
            let e = answer(t).await.expect_err("error");
            assert_eq!(e, throttled);
        }
        assert_eq!(fake.calls(), 1);
        *fake.fail.lock().expect("fail") = None;
        assert!(batcher.get("i-1").await.expect("get").is_some());
    }

    #[tokio::test]
    async fn unknown_keys_are_none_without_failing_the_others() {
        let fake = Fake::new();
        let batcher = fake.batcher(1000);
        let (known, unknown) = tokio::join!(batcher.get("i-1"), batcher.get("gone-2"));
        assert_eq!(known.expect("known"), Some("instance i-1".to_string()));
        assert_eq!(unknown.expect("unknown"), None);
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test]
    async fn a_dropped_caller_does_not_break_the_batch() {
        let fake = Fake::gated();
        let batcher = fake.batcher(1000);
        let first = spawn_get(&batcher, "i-first");
        until("the first fetch", || fake.calls() == 1).await;

        // Dropped before its batch goes out: its key is not fetched.
        let dropped = spawn_get(&batcher, "i-dropped-early");
        let kept = spawn_get(&batcher, "i-kept");
        until("two waiting", || waiting(&batcher) == 2).await;
        dropped.abort();
        assert!(dropped.await.expect_err("aborted").is_cancelled());
        fake.open(2);
        assert!(answer(first).await.expect("first").is_some());
        assert_eq!(
            answer(kept).await.expect("kept"),
            Some("instance i-kept".to_string())
        );
        assert_eq!(fake.keys()[1], vec!["i-kept".to_string()]);

        // Dropped while its fetch is in flight: the others still get their answers.
        until("the leader to exit", || !batcher.inner.state().leading).await;
        let gone = spawn_get(&batcher, "i-gone-midway");
        let other = spawn_get(&batcher, "i-other");
        until("the third fetch", || fake.calls() == 3).await;
        gone.abort();
        assert!(gone.await.expect_err("aborted").is_cancelled());
        fake.open(2);
        assert_eq!(
            answer(other).await.expect("other"),
            Some("instance i-other".to_string())
        );
        assert!(batcher.get("i-after").await.expect("after").is_some());
    }

    #[tokio::test]
    async fn a_panicking_fetch_fails_its_waiters_and_the_next_get_recovers() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let batcher: Batcher<String> = Batcher::new(
            "test fetch",
            Duration::from_millis(5),
            1000,
            Arc::new(move |keys: Vec<String>| {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                Box::pin(async move {
                    assert!(n > 0, "the first fetch panics");
                    Ok(keys.into_iter().map(|k| (k.clone(), k)).collect())
                }) as FetchFuture<String>
            }),
        );
        let e = batcher.get("i-1").await.expect_err("abandoned");
        assert_eq!(e.reason(), "Transient");
        assert_eq!(batcher.get("i-2").await.expect("get"), Some("i-2".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
