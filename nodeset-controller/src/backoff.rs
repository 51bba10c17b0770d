//! The replacement backoff of a NodeSet: pure bookkeeping of consecutive machine failures.
//!
//! A NodeSet whose machines never work (a wrong image, an unreachable API server endpoint, a
//! firewall) would otherwise replace each Failed Node at once, launching (and paying for) a
//! new machine every registration timeout per replica, forever. cluster-autoscaler guards
//! against this with a per-node-group exponential backoff; this is the NodeSet's.
//!
//! # What counts
//!
//! A *failure* is a Node of the NodeSet whose machine failed (`MachineReady` reason `Failed`:
//! registration timeout, vanished machine) or whose create failed with an error retrying
//! cannot fix (`InvalidConfig`, `Unauthorized`, `Unimplemented`). Each is counted once: the
//! state keeps the time of the last counted failure as a watermark, and only failures after it
//! count. Nodes built from an older NodeClass generation do not count: they say nothing about
//! the configuration the next machine gets.
//!
//! A *success* is a Node of the NodeSet that became Ready after the last counted failure. It
//! starts the count over, as does a new NodeClass generation (the user fixed the image) and a
//! change of the NodeSet's template.
//!
//! # What it holds
//!
//! After the k-th consecutive failure, the next launch waits until
//! `last failure + min(base × 2^(k−1), max)`. While failures are counted, at most one machine
//! of the NodeSet is launching at a time (a probe); its failure counts the next step, its
//! Ready ends the backoff. The planner ([`crate::plan`]) applies this to creates (replacements
//! and scale-ups alike) and to the deletes that replace Failed Nodes; scale-downs and named
//! removals are never held. Launches in any window of length T are therefore at most
//! `replicas + log2(T / base + 1) + 1` while nothing registers.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube_node_crds::v1alpha1::BackoffStatus;

use crate::plan::{ChildNode, Failure, Health};

/// Create failures that retrying cannot fix: they count as failed machines.
pub const NON_RETRYABLE_REASONS: &[&str] = &["InvalidConfig", "Unauthorized", "Unimplemented"];

/// `spec.replacementBackoff`, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The wait after the first failure.
    pub base: SignedDuration,
    /// The longest wait.
    pub max: SignedDuration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: SignedDuration::from_secs(30),
            max: SignedDuration::from_secs(30 * 60),
        }
    }
}

impl BackoffPolicy {
    /// From `spec.replacementBackoff` (defaulted by the CRD types).
    pub fn from_spec(spec: &kube_node_crds::v1alpha1::NodeSetSpec) -> Self {
        let (base, max) = spec.replacement_backoff();
        let conv = |d: std::time::Duration| {
            SignedDuration::try_from(d).unwrap_or(SignedDuration::from_secs(i64::MAX / 4))
        };
        Self {
            base: conv(base),
            max: conv(max),
        }
    }

    /// The wait after `k` consecutive failures: `min(base × 2^(k−1), max)`, 0 for none.
    pub fn delay(&self, k: u32) -> SignedDuration {
        if k == 0 {
            return SignedDuration::ZERO;
        }
        let max = self.max.max(self.base);
        let mut d = self.base;
        for _ in 1..k {
            if d >= max {
                break;
            }
            d = d.checked_mul(2).unwrap_or(max);
        }
        d.min(max)
    }
}

/// The backoff state of a NodeSet, as persisted in `status.backoff`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackoffState {
    /// Consecutive failures (0: no backoff).
    pub failures: u32,
    /// When the last counted failure happened: the watermark of counting.
    pub last_failure_at: Option<Timestamp>,
    /// The last counted failure.
    pub last_failure: Option<Failure>,
    /// When the next launch may happen.
    pub next_attempt: Option<Timestamp>,
    /// The NodeClass generation the failures were counted against.
    pub class_generation: Option<i64>,
    /// The template hash the failures were counted against.
    pub template_hash: Option<String>,
}

impl BackoffState {
    /// Whether launches are being held back or probed one at a time.
    pub fn active(&self) -> bool {
        self.failures > 0
    }

    /// Reads `status.backoff`.
    pub fn from_status(s: Option<&BackoffStatus>) -> Self {
        let Some(s) = s else {
            return Self::default();
        };
        let last_failure = match (&s.last_failure_reason, &s.last_failure_message) {
            (None, None) => None,
            (r, m) => Some(Failure {
                reason: r.clone().unwrap_or_default(),
                message: m.clone().unwrap_or_default(),
            }),
        };
        Self {
            failures: u32::try_from(s.consecutive_failures).unwrap_or(0),
            last_failure_at: s.last_failure_time.as_ref().map(|t| t.0),
            last_failure,
            next_attempt: s.next_attempt_time.as_ref().map(|t| t.0),
            class_generation: s.node_class_generation,
            template_hash: s.template_hash.clone(),
        }
    }

    /// Writes `status.backoff` (`None` when there is nothing to remember).
    pub fn to_status(&self) -> Option<BackoffStatus> {
        if self.failures == 0 && self.last_failure_at.is_none() {
            return None;
        }
        Some(BackoffStatus {
            consecutive_failures: i32::try_from(self.failures).unwrap_or(i32::MAX),
            last_failure_time: self.last_failure_at.map(Time),
            last_failure_reason: self.last_failure.as_ref().map(|f| f.reason.clone()),
            last_failure_message: self.last_failure.as_ref().map(|f| f.message.clone()),
            next_attempt_time: self.next_attempt.filter(|_| self.active()).map(Time),
            node_class_generation: self.class_generation,
            template_hash: self.template_hash.clone(),
        })
    }
}

/// Whether a Node was built from an older NodeClass generation than the current one.
pub fn outdated(c: &ChildNode, class_generation: Option<i64>) -> bool {
    matches!((class_generation, c.class_generation), (Some(now), Some(built)) if built < now)
}

/// The next backoff state, from the previous one and the NodeSet's Nodes (members only).
/// Pure, and idempotent: advancing again over the same Nodes changes nothing.
pub fn advance(
    policy: &BackoffPolicy,
    prev: &BackoffState,
    members: &[&ChildNode],
    class_generation: Option<i64>,
    template_hash: &str,
) -> BackoffState {
    let mut s = prev.clone();
    let class_changed = matches!(
        (prev.class_generation, class_generation),
        (Some(a), Some(b)) if a != b
    );
    let template_changed = prev
        .template_hash
        .as_deref()
        .is_some_and(|h| h != template_hash);
    if class_changed || template_changed {
        s.failures = 0;
        s.next_attempt = None;
    }
    if class_generation.is_some() {
        s.class_generation = class_generation;
    }
    s.template_hash = Some(template_hash.to_string());

    // New failures, oldest first, each counted once.
    let watermark = prev.last_failure_at;
    let mut new: Vec<(Timestamp, &ChildNode)> = members
        .iter()
        .filter(|c| !outdated(c, class_generation))
        .filter_map(|c| c.failed_at.map(|t| (t, *c)))
        .filter(|(t, _)| watermark.is_none_or(|w| *t > w))
        .collect();
    new.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
    for (t, c) in &new {
        s.failures = s.failures.saturating_add(1);
        s.last_failure_at = Some(*t);
        s.last_failure = Some(c.failure.clone().unwrap_or_else(|| Failure {
            reason: "MachineFailed".to_string(),
            message: format!("{}: the machine failed", c.name),
        }));
    }
    if let Some(last) = s.last_failure_at
        && !new.is_empty()
    {
        s.next_attempt = last.checked_add(policy.delay(s.failures)).ok();
    }

    // A Node that became Ready after the last failure: the class works.
    let succeeded = members.iter().any(|c| {
        !c.deleting
            && c.health == Health::Ready
            && c.ready_since
                .is_some_and(|r| s.last_failure_at.is_none_or(|w| r > w))
    });
    if s.failures > 0 && succeeded {
        s.failures = 0;
        s.next_attempt = None;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Ownership;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid timestamp")
    }

    fn failed(name: &str, at: i64) -> ChildNode {
        ChildNode {
            name: name.to_string(),
            ownership: Ownership::Ours,
            matches_selector: true,
            class_matches: true,
            deleting: false,
            delete_marked: false,
            health: Health::Failed,
            ready_since: None,
            created: Some(ts(0)),
            launched: Some(ts(0)),
            class_generation: Some(1),
            failure: Some(Failure {
                reason: "RegistrationTimeout".into(),
                message: format!("{name}: RegistrationTimeout: no kubelet"),
            }),
            failed_at: Some(ts(at)),
            built: None,
        }
    }

    #[test]
    fn delays_double_up_to_the_max() {
        let p = BackoffPolicy::default();
        assert_eq!(p.delay(0), SignedDuration::ZERO);
        assert_eq!(p.delay(1), SignedDuration::from_secs(30));
        assert_eq!(p.delay(2), SignedDuration::from_secs(60));
        assert_eq!(p.delay(6), SignedDuration::from_secs(960));
        assert_eq!(p.delay(7), SignedDuration::from_secs(1800));
        assert_eq!(p.delay(u32::MAX), SignedDuration::from_secs(1800));
    }

    #[test]
    fn failures_count_once_and_success_resets() {
        let p = BackoffPolicy::default();
        let a = failed("a", 20);
        let b = failed("b", 25);
        let s1 = advance(&p, &BackoffState::default(), &[&a, &b], Some(1), "h");
        assert_eq!(s1.failures, 2);
        assert_eq!(s1.last_failure_at, Some(ts(25)));
        assert_eq!(s1.next_attempt, Some(ts(25 + 60)));
        assert_eq!(
            s1.last_failure.as_ref().map(|f| f.reason.as_str()),
            Some("RegistrationTimeout")
        );
        // Seeing the same Nodes again counts nothing.
        assert_eq!(advance(&p, &s1, &[&a, &b], Some(1), "h"), s1);
        // A Node Ready since before the last failure is no success.
        let mut old = failed("old", 0);
        old.health = Health::Ready;
        old.failed_at = None;
        old.ready_since = Some(ts(5));
        assert_eq!(advance(&p, &s1, &[&a, &old], Some(1), "h").failures, 2);
        // One that became Ready after it is.
        old.ready_since = Some(ts(30));
        let s2 = advance(&p, &s1, &[&a, &old], Some(1), "h");
        assert_eq!(s2.failures, 0);
        assert_eq!(s2.next_attempt, None);
        assert_eq!(s2.last_failure_at, Some(ts(25)), "the watermark stays");
        // Old failures are not counted again after the reset.
        assert_eq!(advance(&p, &s2, &[&a, &b], Some(1), "h").failures, 0);
    }

    #[test]
    fn a_new_class_generation_or_template_starts_over() {
        let p = BackoffPolicy::default();
        let a = failed("a", 20);
        let s1 = advance(&p, &BackoffState::default(), &[&a], Some(1), "h");
        assert_eq!(s1.failures, 1);
        let s2 = advance(&p, &s1, &[&a], Some(2), "h");
        assert_eq!((s2.failures, s2.class_generation), (0, Some(2)));
        // A late failure of a Node built from the old generation does not count.
        let late = failed("late", 40);
        assert_eq!(advance(&p, &s2, &[&late], Some(2), "h").failures, 0);
        let s3 = advance(&p, &s1, &[&a], Some(1), "other");
        assert_eq!(s3.failures, 0);
        assert_eq!(s3.template_hash.as_deref(), Some("other"));
    }

    #[test]
    fn status_round_trip() {
        let p = BackoffPolicy::default();
        let s = advance(
            &p,
            &BackoffState::default(),
            &[&failed("a", 20)],
            Some(1),
            "h",
        );
        let back = BackoffState::from_status(s.to_status().as_ref());
        assert_eq!(back, s);
        assert_eq!(BackoffState::default().to_status(), None);
    }
}
