//! Which machines tagged for this cluster have no Node: pure selection with a circuit breaker.

use std::collections::HashSet;
use std::time::Duration;

use kube_node_provider::Instance;

/// What the orphan collector may do with one provider listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrphanDecision {
    /// No orphans.
    Nothing,
    /// Delete these machines (provider IDs).
    Delete(Vec<String>),
    /// Too many machines look orphaned at once (a stale cache, a wrong cluster name): do
    /// nothing and say so.
    Paused {
        /// How many looked orphaned.
        orphans: usize,
        /// Out of how many listed.
        total: usize,
    },
}

/// Machines of `machines` whose Node UID tag matches no Node in `node_uids` and that are
/// older than `min_age` at `now_unix`; paused when more than one and more than `max_fraction`
/// of the listing would go. A machine without a UID tag or a creation time is never an orphan
/// (we cannot prove it is ours and old).
pub fn select_orphans(
    machines: &[Instance],
    node_uids: &HashSet<String>,
    now_unix: i64,
    min_age: Duration,
    max_fraction: f64,
) -> OrphanDecision {
    let min_age = i64::try_from(min_age.as_secs()).unwrap_or(i64::MAX);
    let orphans: Vec<String> = machines
        .iter()
        .filter(|m| m.node_uid().is_some_and(|uid| !node_uids.contains(uid)))
        .filter(|m| {
            m.created_unix
                .is_some_and(|c| now_unix.saturating_sub(c) >= min_age)
        })
        .map(|m| m.provider_id.clone())
        .collect();
    if orphans.is_empty() {
        return OrphanDecision::Nothing;
    }
    let limit = max_fraction.max(0.0) * machines.len() as f64;
    if orphans.len() > 1 && orphans.len() as f64 > limit {
        return OrphanDecision::Paused {
            orphans: orphans.len(),
            total: machines.len(),
        };
    }
    OrphanDecision::Delete(orphans)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube_node_crds::names::tags;
    use kube_node_provider::InstanceState;

    use super::*;

    fn m(uid: Option<&str>, created: Option<i64>) -> Instance {
        let mut t = BTreeMap::new();
        if let Some(u) = uid {
            t.insert(tags::NODE_UID.to_string(), u.to_string());
        }
        Instance {
            id: format!("i-{}", uid.unwrap_or("none")),
            provider_id: format!("sim:///i-{}", uid.unwrap_or("none")),
            state: InstanceState::Running,
            tags: t,
            zone: None,
            instance_type: None,
            addresses: vec![],
            created_unix: created,
            labels: BTreeMap::new(),
            failure: None,
        }
    }

    fn uids(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const MIN: Duration = Duration::from_secs(600);

    #[test]
    fn old_orphan_deleted_young_and_owned_kept() {
        let now = 10_000;
        let ms: Vec<Instance> = (0..8)
            .map(|i| m(Some(&format!("u{i}")), Some(0)))
            .chain([m(Some("old"), Some(0)), m(Some("young"), Some(now - 60))])
            .collect();
        let nodes: HashSet<String> = (0..8).map(|i| format!("u{i}")).collect();
        assert_eq!(
            select_orphans(&ms, &nodes, now, MIN, 0.2),
            OrphanDecision::Delete(vec!["sim:///i-old".to_string()])
        );
    }

    #[test]
    fn nothing_without_orphans_and_untagged_or_ageless_kept() {
        let ms = vec![m(Some("a"), Some(0)), m(None, Some(0)), m(Some("b"), None)];
        assert_eq!(
            select_orphans(&ms, &uids(&["a"]), 10_000, MIN, 0.2),
            OrphanDecision::Nothing
        );
    }

    #[test]
    fn breaker_opens_when_most_nodes_vanish() {
        let ms: Vec<Instance> = (0..10)
            .map(|i| m(Some(&format!("u{i}")), Some(0)))
            .collect();
        assert_eq!(
            select_orphans(&ms, &uids(&["u0", "u1"]), 10_000, MIN, 0.2),
            OrphanDecision::Paused {
                orphans: 8,
                total: 10
            }
        );
        // Exactly at the bound is still allowed.
        assert!(matches!(
            select_orphans(&ms, &uids(&["u0", "u1", "u2", "u3", "u4", "u5", "u6", "u7"]), 10_000, MIN, 0.2),
            OrphanDecision::Delete(v) if v.len() == 2
        ));
    }

    #[test]
    fn a_single_orphan_is_always_collectable() {
        let ms = vec![m(Some("gone"), Some(0))];
        assert_eq!(
            select_orphans(&ms, &uids(&[]), 10_000, MIN, 0.2),
            OrphanDecision::Delete(vec!["sim:///i-gone".to_string()])
        );
    }

    #[test]
    fn never_deletes_a_machine_whose_node_exists() {
        let ms: Vec<Instance> = (0..5).map(|i| m(Some(&format!("u{i}")), Some(0))).collect();
        let all = uids(&["u0", "u1", "u2", "u3", "u4"]);
        assert_eq!(
            select_orphans(&ms, &all, i64::MAX, Duration::ZERO, 1.0),
            OrphanDecision::Nothing
        );
    }
}
