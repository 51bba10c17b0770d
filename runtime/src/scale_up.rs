//! NodeSet scale-ups in flight, shared by the two controllers of one process.
//!
//! On a small API server every write competes with every other: while the nodeset-controller
//! is creating the Nodes of a scale-up, the node-controller's launches (a bootstrap-token
//! Secret each, then the machine's kubelet registering) would slow those creates down. So a
//! launch waits, for a bounded time, until the Node creates in flight are done: the creates go
//! out at the server's full speed, and the launches follow at once, all of them. On a real
//! cloud a machine boots for tens of seconds, so a launch held for the length of the creates
//! costs nothing that a user would see.
//!
//! Separate processes (the controllers run apart) share nothing, and nothing waits.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// The count of Node-create series in flight (one per NodeSet pass that creates).
#[derive(Clone, Debug)]
pub struct ScaleUps(Arc<watch::Sender<usize>>);

impl Default for ScaleUps {
    fn default() -> Self {
        Self(Arc::new(watch::channel(0).0))
    }
}

/// A series of Node creates in flight, until dropped.
#[derive(Debug)]
pub struct ScaleUp(Arc<watch::Sender<usize>>);

impl Drop for ScaleUp {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl ScaleUps {
    /// Marks a series of Node creates in flight until the returned guard drops.
    pub fn begin(&self) -> ScaleUp {
        self.0.send_modify(|n| *n += 1);
        ScaleUp(self.0.clone())
    }

    /// Whether Node creates are in flight.
    pub fn in_flight(&self) -> bool {
        *self.0.borrow() > 0
    }

    /// Waits until no Node creates are in flight, or `max` has passed; returns how long it
    /// waited.
    pub async fn settle(&self, max: Duration) -> Duration {
        let started = tokio::time::Instant::now();
        if !self.in_flight() {
            return Duration::ZERO;
        }
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|n| *n == 0)).await;
        started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_launch_waits_for_the_creates_and_no_longer() {
        let s = ScaleUps::default();
        assert_eq!(s.settle(Duration::from_secs(5)).await, Duration::ZERO);

        let a = s.begin();
        let b = s.begin();
        assert!(s.in_flight());
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.settle(Duration::from_secs(30)).await })
        };
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one series is still in flight");
        drop(b);
        let waited = waiter.await.expect("waiter");
        assert!(
            waited < Duration::from_secs(30),
            "released by the last drop"
        );
        assert!(!s.in_flight());
    }

    #[tokio::test(start_paused = true)]
    async fn a_series_that_never_ends_holds_a_launch_only_up_to_the_bound() {
        let s = ScaleUps::default();
        let _stuck = s.begin();
        let waited = s.settle(Duration::from_secs(10)).await;
        assert!(waited >= Duration::from_secs(10), "{waited:?}");
        assert!(s.in_flight());
    }
}
