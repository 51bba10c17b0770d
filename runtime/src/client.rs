//! Client construction: each controller gets its own client behind its own client-side rate
//! limit (QPS and burst, like client-go's), as kube-controller-manager gives every controller
//! its own client, so a large scale-up cannot flood the API server and one busy controller
//! cannot starve another.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kube::client::ClientBuilder;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A client for `config` with its own token bucket (`qps <= 0` disables the limit).
pub fn limited_client(
    config: kube::Config,
    qps: f64,
    burst: u32,
) -> Result<kube::Client, kube::Error> {
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&RateLimitLayer::new(qps, burst))
        .build())
}

tokio::task_local! {
    static URGENT: ();
}

/// Runs `f` with its API requests ahead of every other request waiting for the same token
/// bucket: the writes a machine's launch waits for (its bootstrap token) go before bookkeeping
/// (conditions, labels, tokens of Nodes already Ready), so a scale-up's provider creates are
/// not paced by the writes of the machines launched before them.
pub async fn urgent<F: Future>(f: F) -> F::Output {
    URGENT.scope((), f).await
}

fn is_urgent() -> bool {
    URGENT.try_with(|_| ()).is_ok()
}

/// A token bucket shared by every clone of the layer's services. Requests made inside
/// [`urgent`] take the next tokens; the others wait while any of those waits.
#[derive(Debug)]
pub struct TokenBucket {
    state: Mutex<(f64, Instant)>,
    qps: f64,
    burst: f64,
    urgent_waiting: std::sync::atomic::AtomicUsize,
    urgent_done: tokio::sync::Notify,
}

/// Counts an urgent waiter while it waits.
struct UrgentWaiter<'a>(&'a TokenBucket);

impl Drop for UrgentWaiter<'_> {
    fn drop(&mut self) {
        let left = self
            .0
            .urgent_waiting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        if left == 1 {
            self.0.urgent_done.notify_waiters();
        }
    }
}

impl TokenBucket {
    /// A bucket refilling at `qps` tokens per second, holding at most `burst`.
    pub fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            state: Mutex::new((burst, Instant::now())),
            qps: if qps > 0.0 { qps } else { f64::INFINITY },
            burst,
            urgent_waiting: Default::default(),
            urgent_done: Default::default(),
        }
    }

    /// Waits for one token.
    pub async fn acquire(&self) {
        self.acquire_as(false).await;
    }

    /// Waits for one token; `urgent` goes ahead of the others.
    pub async fn acquire_as(&self, urgent: bool) {
        let _waiter = urgent.then(|| {
            self.urgent_waiting
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            UrgentWaiter(self)
        });
        loop {
            if !urgent {
                // Registered before the check, so a wake-up between the two is not lost.
                let done = self.urgent_done.notified();
                if self
                    .urgent_waiting
                    .load(std::sync::atomic::Ordering::Acquire)
                    > 0
                {
                    done.await;
                    continue;
                }
            }
            let wait = {
                let mut state = self.state.lock().await;
                let now = Instant::now();
                let refill = now.duration_since(state.1).as_secs_f64() * self.qps;
                state.0 = (state.0 + refill).min(self.burst);
                state.1 = now;
                if state.0 >= 1.0 {
                    state.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - state.0) / self.qps)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// The layer; see [`TokenBucket`].
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    bucket: Arc<TokenBucket>,
}

impl RateLimitLayer {
    /// `qps <= 0` disables the limit.
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            bucket: Arc::new(TokenBucket::new(qps, burst)),
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            bucket: self.bucket.clone(),
        }
    }
}

/// The service; see [`TokenBucket`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
}

impl<S, R> tower::Service<R> for RateLimit<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        // The inner future is lazy (it sends nothing until polled), so gating its first poll on
        // a token limits the request rate without needing a clonable inner service.
        let fut = self.inner.call(request);
        let bucket = self.bucket.clone();
        let urgent = is_urgent();
        Box::pin(async move {
            bucket.acquire_as(urgent).await;
            fut.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn urgent_requests_take_the_next_tokens() {
        let bucket = Arc::new(TokenBucket::new(10.0, 1));
        bucket.acquire().await;
        // Both wait for the next token; the urgent one came second and gets it first.
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (b, o) = (bucket.clone(), order.clone());
        let slow = tokio::spawn(async move {
            b.acquire_as(false).await;
            o.lock().expect("order").push("bookkeeping");
        });
        tokio::task::yield_now().await;
        let (b, o) = (bucket.clone(), order.clone());
        let fast = tokio::spawn(async move {
            b.acquire_as(true).await;
            o.lock().expect("order").push("launch");
        });
        let _ = tokio::join!(slow, fast);
        assert_eq!(*order.lock().expect("order"), ["launch", "bookkeeping"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_a_burst_then_the_steady_rate() {
        let bucket = TokenBucket::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "burst is immediate"
        );
        for _ in 0..10 {
            bucket.acquire().await;
        }
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_millis(1100),
            "10 more tokens at 10 qps take about a second of virtual time, took {elapsed:?}"
        );
    }
}
