//! Retrying optimistic-concurrency conflicts with a fresh read, like client-go's
//! `retry.RetryOnConflict`, but bounded by a deadline instead of a step count.
//!
//! Writes to a NodeSet's spec (scaling, named removals) carry the resourceVersion they were
//! computed from, so a concurrent change is never overwritten. But every status write of the
//! nodeset-controller bumps that resourceVersion too (about once a second while Nodes join),
//! so under normal churn a guarded write conflicts now and then without any real contention.
//! The caller's attempt must read the object again (from the API server, never a cache) and
//! recompute its write from what it read: then a retried write is exactly as safe as the first
//! one, a delta is applied once (only one guarded write can succeed per resourceVersion), and
//! a conflict only surfaces when the object really keeps changing for the whole deadline.
//!
//! client-go's `DefaultRetry` gives up after 5 steps of about 10 ms; that is shorter than one
//! status-write interval, so here the waits grow (10 ms doubling, jittered, at most
//! [`MAX_WAIT`]) until the caller's deadline, which for a gRPC call is the client's own.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// The wait after the first conflict.
pub const FIRST_WAIT: Duration = Duration::from_millis(10);
/// The longest wait between two attempts.
pub const MAX_WAIT: Duration = Duration::from_millis(400);

/// Why [`retry_on_conflict`] returned without a result.
#[derive(Debug)]
pub enum RetryError<E> {
    /// An attempt failed with something other than a conflict: returned at once.
    Failed(E),
    /// Every attempt until the deadline conflicted; `last` is the last conflict.
    GaveUp {
        /// The last conflict.
        last: E,
        /// How many attempts were made.
        attempts: u32,
    },
}

/// The wait after the `conflicts`-th conflict (1-based), before jitter: 10 ms, 20 ms, 40 ms, …
/// up to [`MAX_WAIT`].
pub fn base_wait(conflicts: u32) -> Duration {
    let factor = 1u32 << conflicts.saturating_sub(1).min(16);
    FIRST_WAIT.saturating_mul(factor).min(MAX_WAIT)
}

/// Runs `attempt` until it succeeds, fails with a non-conflict error, or the next attempt
/// could not start before `deadline`. At least one attempt is always made.
pub async fn retry_on_conflict<T, E, F, Fut>(
    deadline: Instant,
    is_conflict: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if !is_conflict(&e) => return Err(RetryError::Failed(e)),
            Err(e) => {
                // Jitter (±25 %) so that writers that conflicted together do not retry
                // together.
                let base = base_wait(attempts);
                let wait = base.mul_f64(rand::rng().random_range(0.75..1.25));
                if Instant::now() + wait >= deadline {
                    return Err(RetryError::GaveUp { last: e, attempts });
                }
                tracing::debug!(
                    attempts,
                    wait_ms = wait.as_millis() as u64,
                    "conflict, retrying"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn waits_double_up_to_the_cap() {
        assert_eq!(base_wait(1), Duration::from_millis(10));
        assert_eq!(base_wait(2), Duration::from_millis(20));
        assert_eq!(base_wait(3), Duration::from_millis(40));
        assert_eq!(base_wait(7), MAX_WAIT);
        assert_eq!(base_wait(u32::MAX), MAX_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_conflicts_until_success() {
        let calls = Cell::new(0);
        let r: Result<u32, RetryError<&str>> = retry_on_conflict(
            Instant::now() + Duration::from_secs(4),
            |e| *e == "conflict",
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 6 { Err("conflict") } else { Ok(n) } }
            },
        )
        .await;
        assert_eq!(r.expect("succeeds"), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_return_at_once() {
        let calls = Cell::new(0);
        let r: Result<(), RetryError<&str>> = retry_on_conflict(
            Instant::now() + Duration::from_secs(4),
            |e| *e == "conflict",
            || {
                calls.set(calls.get() + 1);
                async { Err("forbidden") }
            },
        )
        .await;
        assert!(matches!(r, Err(RetryError::Failed("forbidden"))));
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_before_the_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(2);
        let calls = Cell::new(0u32);
        let r: Result<(), RetryError<&str>> = retry_on_conflict(
            deadline,
            |_| true,
            || {
                calls.set(calls.get() + 1);
                async { Err("conflict") }
            },
        )
        .await;
        match r {
            Err(RetryError::GaveUp { attempts, .. }) => {
                assert_eq!(attempts, calls.get());
                // 10+20+40+80+160+320 ms, then 400 ms steps: several attempts fit in 2 s.
                assert!(attempts >= 6, "{attempts} attempts");
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
        assert!(Instant::now() < deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn one_attempt_even_when_the_deadline_passed() {
        let calls = Cell::new(0);
        let r: Result<(), RetryError<&str>> = retry_on_conflict(
            Instant::now(),
            |_| true,
            || {
                calls.set(calls.get() + 1);
                async { Err("conflict") }
            },
        )
        .await;
        assert!(matches!(r, Err(RetryError::GaveUp { attempts: 1, .. })));
    }
}
