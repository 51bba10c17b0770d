//! Pure pieces of the backend: provider IDs, launch candidates, client tokens, tags, states.
//! Nothing here calls EC2, so all of it is unit-tested.

use std::collections::BTreeMap;

use kube_node_crds::names::tags;
use kube_node_provider::InstanceState;
use sha2::{Digest, Sha256};

/// EC2 accepts at most 16 KiB of user-data before base64.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// EC2 allows 50 tags per resource.
pub const MAX_TAGS: usize = 50;

/// How many RunInstances a single create tries across instance types × subnets.
pub const MAX_LAUNCH_ATTEMPTS: usize = 24;

/// A ClientToken stays the same for this long, so a retry of a lost RunInstances response
/// within it returns the same instance; after it, a new token lets a Node whose machine was
/// terminated get a new one (EC2 would otherwise hand back the terminated instance).
pub const CLIENT_TOKEN_WINDOW_SECS: i64 = 600;

/// `aws:///<zone>/<instance-id>` (or `aws:///<instance-id>` when the zone is unknown), as the
/// Kubernetes AWS cloud provider writes it.
pub fn provider_id(zone: Option<&str>, instance_id: &str) -> String {
    match zone {
        Some(z) if !z.is_empty() => format!("aws:///{z}/{instance_id}"),
        _ => format!("aws:///{instance_id}"),
    }
}

/// The instance id in a provider ID (`aws:///<zone>/<id>`, `aws:///<id>`, `aws://<zone>/<id>`),
/// or `None` when it is not an AWS provider ID naming an `i-` instance.
pub fn instance_id_of(provider_id: &str) -> Option<&str> {
    let rest = provider_id.strip_prefix("aws://")?;
    let id = rest.rsplit('/').next()?;
    let valid =
        id.len() > 2 && id.starts_with("i-") && id[2..].chars().all(|c| c.is_ascii_alphanumeric());
    valid.then_some(id)
}

/// One RunInstances attempt: an instance type in a subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The instance type.
    pub instance_type: String,
    /// The subnet.
    pub subnet_id: String,
}

/// Stable 64-bit hash of text (first 8 bytes of SHA-256), the same in every process.
fn stable_hash(text: &str) -> u64 {
    let digest = Sha256::digest(text.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(b)
}

/// The launch attempts of a create, in order: the primary type first in every subnet, then
/// each alternative type in every subnet. Subnets start at one picked by a hash of the node UID
/// (so Nodes spread over subnets and zones, and a retry for the same Node starts in the same
/// place) and go round from there. Duplicates are dropped; at most [`MAX_LAUNCH_ATTEMPTS`].
pub fn candidates(
    node_uid: &str,
    instance_type: &str,
    alternatives: &[String],
    subnets: &[String],
) -> Vec<Candidate> {
    let mut types: Vec<&str> = Vec::new();
    for t in std::iter::once(instance_type).chain(alternatives.iter().map(String::as_str)) {
        if !t.is_empty() && !types.contains(&t) {
            types.push(t);
        }
    }
    let mut unique_subnets: Vec<&str> = Vec::new();
    for s in subnets {
        if !s.is_empty() && !unique_subnets.contains(&s.as_str()) {
            unique_subnets.push(s);
        }
    }
    if unique_subnets.is_empty() {
        return Vec::new();
    }
    let start = (stable_hash(node_uid) % unique_subnets.len() as u64) as usize;
    let mut out = Vec::new();
    for t in types {
        for i in 0..unique_subnets.len() {
            let s = unique_subnets[(start + i) % unique_subnets.len()];
            out.push(Candidate {
                instance_type: t.to_string(),
                subnet_id: s.to_string(),
            });
        }
    }
    out.truncate(MAX_LAUNCH_ATTEMPTS);
    out
}

/// The RunInstances ClientToken of one attempt: the same for a retry of the same attempt for
/// the same Node (and NodeClass generation) within [`CLIENT_TOKEN_WINDOW_SECS`], different
/// otherwise, so EC2 never answers IdempotentParameterMismatch for a changed configuration.
/// 64 hex characters, EC2's maximum.
pub fn client_token(
    node_uid: &str,
    generation: i64,
    candidate: &Candidate,
    now_unix: i64,
) -> String {
    let window = now_unix.div_euclid(CLIENT_TOKEN_WINDOW_SECS);
    let digest = Sha256::digest(
        format!(
            "{node_uid}\n{generation}\n{}\n{}\n{window}",
            candidate.instance_type, candidate.subnet_id
        )
        .as_bytes(),
    );
    let mut s = String::with_capacity(64);
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The tags put on the instance and its volumes at launch: the NodeClass's extra tags, then
/// the request's tags (cluster, node name and UID, NodeSet, managed-by), which win, then the
/// NodeClass name and `Name` (the Node name, for the console) unless already set.
pub fn launch_tags(
    spec_tags: &BTreeMap<String, String>,
    request_tags: &BTreeMap<String, String>,
    node_class: &str,
    node_name: &str,
) -> BTreeMap<String, String> {
    let mut out = spec_tags.clone();
    out.extend(request_tags.iter().map(|(k, v)| (k.clone(), v.clone())));
    out.entry(tags::NODE_CLASS.to_string())
        .or_insert_with(|| node_class.to_string());
    out.entry(tags::MANAGED_BY.to_string())
        .or_insert_with(|| tags::MANAGED_BY_VALUE.to_string());
    out.entry("Name".to_string())
        .or_insert_with(|| node_name.to_string());
    out
}

/// What an EC2 instance state means for kube-node. `None` is gone (terminated).
///
/// stopping/stopped count as Running: the machine exists and kube-node never stops machines,
/// so someone else did; the kubelet's NotReady then shows it, and deleting the Node
/// terminates it. shutting-down is Terminating.
pub fn state_of(ec2_state: &str) -> Option<InstanceState> {
    match ec2_state {
        "pending" => Some(InstanceState::Pending),
        "running" | "stopping" | "stopped" => Some(InstanceState::Running),
        "shutting-down" => Some(InstanceState::Terminating),
        _ => None,
    }
}

/// The EC2 states `list` and the idempotency lookup ask for: every state of a live machine.
pub const LIVE_STATES: &[&str] = &["pending", "running", "stopping", "stopped"];

/// The IAM instance profile: an ARN or a name.
pub fn instance_profile_is_arn(profile: &str) -> bool {
    profile.starts_with("arn:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_id_round_trips() {
        let p = provider_id(Some("us-east-1a"), "i-0123456789abcdef0");
        assert_eq!(p, "aws:///us-east-1a/i-0123456789abcdef0");
        assert_eq!(instance_id_of(&p), Some("i-0123456789abcdef0"));
        assert_eq!(provider_id(None, "i-1"), "aws:///i-1");
        assert_eq!(instance_id_of("aws:///i-1"), Some("i-1"));
        assert_eq!(instance_id_of("aws://us-east-1a/i-abc"), Some("i-abc"));
    }

    #[test]
    fn foreign_or_malformed_provider_ids_have_no_instance() {
        for p in [
            "",
            "gce:///p/z/i-1",
            "aws:///us-east-1a/",
            "aws:///us-east-1a/vol-1",
            "aws:///i-",
            "aws:///i-../../x",
        ] {
            assert_eq!(instance_id_of(p), None, "{p}");
        }
    }

    #[test]
    fn candidates_try_every_subnet_before_the_next_type() {
        let subnets = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let alts = vec!["m5.large".to_string(), "m6i.large".to_string()];
        let c = candidates("uid-1", "m7i.large", &alts, &subnets);
        assert_eq!(c.len(), 9);
        assert!(c[..3].iter().all(|c| c.instance_type == "m7i.large"));
        assert!(c[3..6].iter().all(|c| c.instance_type == "m5.large"));
        let mut first: Vec<_> = c[..3].iter().map(|c| c.subnet_id.as_str()).collect();
        first.sort();
        assert_eq!(first, ["a", "b", "c"]);
        // The same Node starts in the same subnet every time.
        assert_eq!(c, candidates("uid-1", "m7i.large", &alts, &subnets));
    }

    #[test]
    fn candidates_spread_nodes_over_subnets() {
        let subnets: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..30 {
            let c = candidates(&format!("uid-{i}"), "t3.small", &[], &subnets);
            seen.insert(c[0].subnet_id.clone());
        }
        assert_eq!(seen.len(), 3, "30 nodes all started in {seen:?}");
    }

    #[test]
    fn candidates_drop_duplicates_and_are_bounded() {
        let subnets = vec!["a".to_string(), "a".to_string()];
        let alts = vec!["t3.small".to_string(), String::new()];
        let c = candidates("u", "t3.small", &alts, &subnets);
        assert_eq!(c.len(), 1);
        assert!(candidates("u", "t3.small", &[], &[]).is_empty());
        let many: Vec<String> = (0..32).map(|i| format!("s{i}")).collect();
        let alts: Vec<String> = (0..16).map(|i| format!("t{i}")).collect();
        assert_eq!(
            candidates("u", "t", &alts, &many).len(),
            MAX_LAUNCH_ATTEMPTS
        );
    }

    #[test]
    fn client_token_is_stable_per_attempt_and_window() {
        let a = Candidate {
            instance_type: "t3.small".into(),
            subnet_id: "subnet-1".into(),
        };
        let b = Candidate {
            instance_type: "t3.small".into(),
            subnet_id: "subnet-2".into(),
        };
        let t = client_token("uid", 1, &a, 1_000_000);
        assert_eq!(t.len(), 64);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(t, client_token("uid", 1, &a, 1_000_000 + 1));
        assert_ne!(t, client_token("uid", 1, &b, 1_000_000));
        assert_ne!(t, client_token("uid", 2, &a, 1_000_000));
        assert_ne!(t, client_token("other", 1, &a, 1_000_000));
        assert_ne!(
            t,
            client_token("uid", 1, &a, 1_000_000 + CLIENT_TOKEN_WINDOW_SECS)
        );
    }

    #[test]
    fn request_tags_win_over_spec_tags() {
        let spec = BTreeMap::from([
            ("team".to_string(), "infra".to_string()),
            (tags::CLUSTER.to_string(), "spoofed".to_string()),
        ]);
        let req = BTreeMap::from([
            (tags::CLUSTER.to_string(), "prod".to_string()),
            (tags::NODE_UID.to_string(), "uid".to_string()),
        ]);
        let t = launch_tags(&spec, &req, "general", "node-a");
        assert_eq!(t[tags::CLUSTER], "prod");
        assert_eq!(t["team"], "infra");
        assert_eq!(t[tags::NODE_CLASS], "general");
        assert_eq!(t[tags::MANAGED_BY], tags::MANAGED_BY_VALUE);
        assert_eq!(t["Name"], "node-a");
        let named = BTreeMap::from([("Name".to_string(), "custom".to_string())]);
        assert_eq!(launch_tags(&named, &req, "c", "n")["Name"], "custom");
    }

    #[test]
    fn states_map_to_the_contract() {
        assert_eq!(state_of("pending"), Some(InstanceState::Pending));
        assert_eq!(state_of("running"), Some(InstanceState::Running));
        assert_eq!(state_of("stopped"), Some(InstanceState::Running));
        assert_eq!(state_of("shutting-down"), Some(InstanceState::Terminating));
        assert_eq!(state_of("terminated"), None);
        assert_eq!(state_of("weird"), None);
    }
}
