//! Ordered NodeClass fallback: which of a NodeSet's `nodeClassNames` new Nodes get, and which
//! Nodes move to the next class because their provider ran out of capacity or quota.
//!
//! A class whose provider answers `InsufficientCapacity` or `QuotaExceeded` for a Node's
//! machine cools down: it is skipped for new Nodes until the cool-down ends (kept in
//! `status.classCooldowns`, so a restart keeps it). The Node itself keeps its name and moves to
//! the next class not cooling down; the node-controller then creates its machine there. Pure:
//! the writes are in `reconcile.rs`.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube_node_crds::v1alpha1::ClassCooldown;

use crate::plan::{ChildNode, Health, Ownership};

/// The provider reasons that send a Node to the next class.
pub const FALLBACK_REASONS: [&str; 2] = ["InsufficientCapacity", "QuotaExceeded"];

/// The reason of the `MachineReady` message a moved Node carries until the node-controller
/// tries its new class (not a [`FALLBACK_REASONS`] one, so the Node is not moved twice).
pub const MOVED_REASON: &str = "NodeClassFallback";

/// A Node to move to another class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The Node.
    pub node: String,
    /// The class that failed it.
    pub from: String,
    /// The class it moves to.
    pub to: String,
    /// `InsufficientCapacity` or `QuotaExceeded`.
    pub reason: String,
    /// The provider's message.
    pub message: String,
}

/// The cool-downs still running at `now`, of classes still listed.
pub fn live(previous: &[ClassCooldown], classes: &[&str], now: Timestamp) -> Vec<ClassCooldown> {
    previous
        .iter()
        .filter(|c| c.until.0 > now && classes.contains(&c.node_class_name.as_str()))
        .cloned()
        .collect()
}

fn cooling(cooldowns: &[ClassCooldown], class: &str) -> bool {
    cooldowns.iter().any(|c| c.node_class_name == class)
}

/// The class new Nodes get: the first not cooling down; when all are, the one whose cool-down
/// ends first (it is the likeliest to have capacity again).
pub fn target_class<'a>(classes: &[&'a str], cooldowns: &[ClassCooldown]) -> &'a str {
    if let Some(c) = classes.iter().find(|c| !cooling(cooldowns, c)) {
        return c;
    }
    classes
        .iter()
        .min_by_key(|c| {
            cooldowns
                .iter()
                .filter(|x| x.node_class_name == **c)
                .map(|x| x.until.0)
                .max()
        })
        .copied()
        .unwrap_or_default()
}

/// Cools down each class that failed a Node for capacity or quota, and moves each such Node
/// (not launched, not being deleted) to the next class after its own that is not cooling
/// down. A Node on the last class (or with every later class cooling down) stays, and its
/// create is retried where it is. `nodes` pairs each child with the class its Node names.
pub fn plan(
    classes: &[&str],
    cooldowns: &mut Vec<ClassCooldown>,
    nodes: &[(&ChildNode, Option<&str>)],
    cooldown: SignedDuration,
    now: Timestamp,
) -> Vec<Move> {
    let mut moves = Vec::new();
    if classes.len() < 2 {
        return moves;
    }
    let until = Time(now.checked_add(cooldown).unwrap_or(now));
    for (c, class) in nodes {
        let Some(class) = *class else { continue };
        let Some(failure) = c.failure.as_ref() else {
            continue;
        };
        if c.ownership != Ownership::Ours
            || c.deleting
            || c.launched.is_some()
            || c.health != Health::Unregistered
            || !FALLBACK_REASONS.contains(&failure.reason.as_str())
        {
            continue;
        }
        // The node-controller names the class in the message: a failure of the class the
        // Node was just moved from is not one of its new class.
        if !failure.message.contains(&format!("NodeClass {class}:")) {
            continue;
        }
        let Some(i) = classes.iter().position(|x| *x == class) else {
            continue;
        };
        match cooldowns.iter_mut().find(|x| x.node_class_name == class) {
            Some(x) => {
                x.until = until.clone();
                x.reason.clone_from(&failure.reason);
                x.message = Some(failure.message.clone());
            }
            None => cooldowns.push(ClassCooldown {
                node_class_name: class.to_string(),
                until: until.clone(),
                reason: failure.reason.clone(),
                message: Some(failure.message.clone()),
            }),
        }
        if let Some(to) = classes[i + 1..].iter().find(|x| !cooling(cooldowns, x)) {
            moves.push(Move {
                node: c.name.clone(),
                from: class.to_string(),
                to: (*to).to_string(),
                reason: failure.reason.clone(),
                message: failure.message.clone(),
            });
        }
    }
    cooldowns.sort_by(|a, b| {
        let pos = |n: &str| classes.iter().position(|x| *x == n);
        pos(&a.node_class_name).cmp(&pos(&b.node_class_name))
    });
    moves
}

/// Where a Node's class stands among the NodeSet's: `None` when it is not one of them.
pub fn rank(classes: &[&str], class: &str) -> Option<usize> {
    classes.iter().position(|c| *c == class)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Failure;

    fn failed(name: &str, reason: &str, class: &str) -> ChildNode {
        ChildNode {
            name: name.into(),
            ownership: Ownership::Ours,
            matches_selector: true,
            class_matches: true,
            deleting: false,
            delete_marked: false,
            health: Health::Unregistered,
            ready_since: None,
            created: None,
            launched: None,
            class_generation: None,
            failure: Some(Failure {
                reason: reason.into(),
                message: format!("{name}: {reason}: NodeClass {class}: none left"),
            }),
            failed_at: None,
            built: None,
        }
    }

    #[test]
    fn capacity_failures_move_nodes_and_cool_the_class_down() {
        let classes = ["spot", "ondemand", "reserved"];
        let now = Timestamp::UNIX_EPOCH + SignedDuration::from_hours(1000);
        let cool = SignedDuration::from_mins(5);
        let mut cooldowns = Vec::new();
        assert_eq!(target_class(&classes, &cooldowns), "spot");
        let a = failed("a", "InsufficientCapacity", "spot");
        let b = failed("b", "Unauthorized", "spot");
        let mut launched = failed("c", "QuotaExceeded", "spot");
        launched.launched = Some(now);
        let on_last = failed("d", "QuotaExceeded", "reserved");
        // A failure the Node carried over from the class it was moved from.
        let stale = failed("s", "InsufficientCapacity", "spot");
        let moves = plan(
            &classes,
            &mut cooldowns,
            &[
                (&a, Some("spot")),
                (&b, Some("spot")),
                (&launched, Some("spot")),
                (&on_last, Some("reserved")),
                (&stale, Some("ondemand")),
            ],
            cool,
            now,
        );
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(
            (moves[0].from.as_str(), moves[0].to.as_str()),
            ("spot", "ondemand")
        );
        let names: Vec<&str> = cooldowns
            .iter()
            .map(|c| c.node_class_name.as_str())
            .collect();
        assert_eq!(names, ["spot", "reserved"], "the last class cools down too");
        assert_eq!(target_class(&classes, &cooldowns), "ondemand");
        // The next class cooling down as well: the Node skips it.
        let moves = plan(
            &classes,
            &mut cooldowns,
            &[
                (
                    &failed("a", "InsufficientCapacity", "ondemand"),
                    Some("ondemand"),
                ),
                (&failed("e", "InsufficientCapacity", "spot"), Some("spot")),
            ],
            cool,
            now,
        );
        assert_eq!(
            moves.len(),
            0,
            "every later class is cooling down: {moves:?}"
        );
        // All cooling: the one ending first.
        let later = now + SignedDuration::from_mins(1);
        let a2 = failed("a", "InsufficientCapacity", "ondemand");
        plan(
            &classes,
            &mut cooldowns,
            &[(&a2, Some("ondemand"))],
            cool,
            later,
        );
        assert_eq!(target_class(&classes, &cooldowns), "spot");
        // After the cool-down, back to the first.
        let after = now + SignedDuration::from_secs(330);
        let left = live(&cooldowns, &classes, after);
        assert_eq!(left.len(), 1);
        assert_eq!(target_class(&classes, &left), "spot");
        assert!(live(&cooldowns, &["ondemand"], now).len() == 1);
    }

    #[test]
    fn one_class_never_falls_back() {
        let mut cooldowns = Vec::new();
        let a = failed("a", "InsufficientCapacity", "only");
        let moves = plan(
            &["only"],
            &mut cooldowns,
            &[(&a, Some("only"))],
            SignedDuration::from_mins(5),
            Timestamp::UNIX_EPOCH,
        );
        assert!(moves.is_empty() && cooldowns.is_empty());
    }
}
