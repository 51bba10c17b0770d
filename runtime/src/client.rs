//! Client construction: each controller gets its own client behind its own client-side rate
//! limit (QPS and burst, like client-go's), as kube-controller-manager gives every controller
//! its own client, so a large scale-up cannot flood the API server and one busy controller
//! cannot starve another. The layer also bounds the requests in flight at once: a slow-start
//! batch of hundreds of creates would otherwise open one HTTP/1.1 connection (and one TLS
//! handshake, and its buffers) per request.

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

/// Requests one client sends at once unless told otherwise: client-go's HTTP/2 multiplexes on
/// one connection; kube's HTTP/1.1 needs a connection per request in flight, so this is also
/// the most connections a client holds (watches aside).
pub const DEFAULT_MAX_IN_FLIGHT: usize = 32;

/// The layer; see [`TokenBucket`]. Watches take a token but never an in-flight slot: they stay
/// open for minutes and would otherwise starve every other request.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    bucket: Arc<TokenBucket>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

impl RateLimitLayer {
    /// `qps <= 0` disables the rate limit; at most [`DEFAULT_MAX_IN_FLIGHT`] requests at once.
    pub fn new(qps: f64, burst: u32) -> Self {
        Self {
            bucket: Arc::new(TokenBucket::new(qps, burst)),
            in_flight: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
        }
    }

    /// At most `max` requests (other than watches) in flight at once (at least one).
    pub fn with_max_in_flight(mut self, max: usize) -> Self {
        self.in_flight = Arc::new(tokio::sync::Semaphore::new(max.max(1)));
        self
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            bucket: self.bucket.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

/// The service; see [`TokenBucket`].
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// A watch (`?watch=true` or `?watch=1`), which holds its connection open.
fn is_watch<B>(request: &http::Request<B>) -> bool {
    request.uri().query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    })
}

impl<S, B> tower::Service<http::Request<B>> for RateLimit<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The inner future is lazy (it sends nothing until polled), so gating its first poll on
        // a token and a slot limits the request rate and concurrency without needing a
        // clonable inner service.
        let in_flight = (!is_watch(&request)).then(|| self.in_flight.clone());
        let fut = self.inner.call(request);
        let bucket = self.bucket.clone();
        let urgent = is_urgent();
        Box::pin(async move {
            // The token first, so urgent requests keep their place; slots are handed out in
            // the order the tokens were.
            bucket.acquire_as(urgent).await;
            // The semaphore is never closed, so this always holds a slot.
            let _slot = match in_flight {
                Some(slots) => slots.acquire_owned().await.ok(),
                None => None,
            };
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

    /// Answers after `delay`, counting how many calls are open at once.
    #[derive(Clone)]
    struct Slow {
        open: Arc<std::sync::atomic::AtomicUsize>,
        most: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tower::Service<http::Request<()>> for Slow {
        type Response = ();
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<(), Self::Error>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let (open, most) = (self.open.clone(), self.most.clone());
            Box::pin(async move {
                use std::sync::atomic::Ordering::SeqCst;
                let now = open.fetch_add(1, SeqCst) + 1;
                most.fetch_max(now, SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                open.fetch_sub(1, SeqCst);
                Ok(())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_the_in_flight_limit_is_sent_at_once_and_watches_do_not_count() {
        use std::sync::atomic::Ordering::SeqCst;
        use tower::{Layer, Service};
        let slow = Slow {
            open: Default::default(),
            most: Default::default(),
        };
        let layer = RateLimitLayer::new(0.0, 1).with_max_in_flight(4);
        let mut service = layer.layer(slow.clone());
        let request = |uri: &str| http::Request::get(uri).body(()).expect("request");
        // Four watches hold their slots' worth of connections open first...
        let watches: Vec<_> = (0..4)
            .map(|_| service.call(request("/api/v1/nodes?watch=true&resourceVersion=1")))
            .collect();
        let watches = tokio::spawn(futures::future::join_all(watches));
        tokio::task::yield_now().await;
        // ...and 20 creates still go, four at a time.
        let creates: Vec<_> = (0..20)
            .map(|_| service.call(request("/api/v1/nodes")))
            .collect();
        let started = Instant::now();
        futures::future::join_all(creates).await;
        watches.await.expect("watches");
        assert_eq!(slow.most.load(SeqCst), 8, "4 watches + 4 creates at once");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(600),
            "20 requests of 100 ms, 4 at a time, take 5 rounds of virtual time: {took:?}"
        );
    }

    #[test]
    fn watches_are_told_by_their_query() {
        let request = |uri: &str| http::Request::get(uri).body(()).expect("request");
        assert!(is_watch(&request("/api/v1/nodes?watch=true")));
        assert!(is_watch(&request("/api/v1/nodes?labelSelector=a&watch=1")));
        assert!(!is_watch(&request("/api/v1/nodes?watch=false")));
        assert!(!is_watch(&request("/api/v1/nodes?x=watch=true")));
        assert!(!is_watch(&request("/api/v1/nodes")));
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
