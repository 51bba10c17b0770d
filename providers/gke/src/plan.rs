//! The pure part of the backend: provider IDs and instance-group URLs, how a pool's size is
//! spread over its instance groups, request ids, and machine states. No I/O, unit-tested.

use kube_node_provider::InstanceState;
use sha2::{Digest, Sha256};

/// The prefix of a GCE provider ID, as GKE's kubelets write `spec.providerID`.
pub const PROVIDER_ID_PREFIX: &str = "gce://";

/// A GCE machine named by its provider ID, `gce://<project>/<zone>/<instance name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MachineRef {
    /// The project.
    pub project: String,
    /// The zone.
    pub zone: String,
    /// The instance's name (GKE's Node name).
    pub name: String,
}

impl MachineRef {
    /// Parses `gce://<project>/<zone>/<name>`; `None` for anything else (another backend's ID).
    pub fn parse(provider_id: &str) -> Option<Self> {
        let rest = provider_id.strip_prefix(PROVIDER_ID_PREFIX)?;
        let mut parts = rest.split('/');
        let (project, zone, name) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || [project, zone, name].iter().any(|p| p.is_empty()) {
            return None;
        }
        Some(Self {
            project: project.into(),
            zone: zone.into(),
            name: name.into(),
        })
    }

    /// The provider ID.
    pub fn provider_id(&self) -> String {
        format!(
            "{PROVIDER_ID_PREFIX}{}/{}/{}",
            self.project, self.zone, self.name
        )
    }

    /// The instance's URL relative to the project, as `deleteInstances` takes it.
    pub fn zonal_url(&self) -> String {
        format!("zones/{}/instances/{}", self.zone, self.name)
    }
}

/// A zonal managed instance group of a node pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigRef {
    /// The project.
    pub project: String,
    /// The zone.
    pub zone: String,
    /// The group manager's name.
    pub name: String,
}

impl MigRef {
    /// Parses a node pool's `instanceGroupUrls` entry
    /// (`https://www.googleapis.com/compute/v1/projects/p/zones/z/instanceGroupManagers/n`; the
    /// `instanceGroups/n` spelling names the same manager).
    pub fn parse(url: &str) -> Option<Self> {
        let path = url.split(['?', '#']).next()?;
        let segments: Vec<&str> = path.split('/').collect();
        let at = segments.iter().rposition(|s| *s == "projects")?;
        match &segments[at..] {
            [
                _,
                project,
                "zones",
                zone,
                "instanceGroupManagers" | "instanceGroups",
                name,
            ] if ![project, zone, name].iter().any(|p| p.is_empty()) => Some(Self {
                project: (*project).into(),
                zone: (*zone).into(),
                name: (*name).into(),
            }),
            _ => None,
        }
    }

    /// `projects/p/zones/z/instanceGroupManagers/n`, for messages and request ids.
    pub fn path(&self) -> String {
        format!(
            "projects/{}/zones/{}/instanceGroupManagers/{}",
            self.project, self.zone, self.name
        )
    }
}

/// The instance name at the end of a managed instance's `instance` URL.
pub fn instance_name(url: &str) -> Option<&str> {
    let (_, name) = url.rsplit_once("/instances/")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// Whether an instance name belongs to a group whose `baseInstanceName` is `base`: a managed
/// instance group names its machines `<base>-<suffix>`.
pub fn named_by_group(name: &str, base: &str) -> bool {
    !base.is_empty()
        && name
            .strip_prefix(base)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|s| !s.is_empty() && !s.contains('-'))
}

/// Spreads a pool's target size over its instance groups, changing as few as possible:
/// growing adds each machine to the group with the fewest (the first such), shrinking takes
/// each from the group with the most (the last such). So the sizes differ by at most one
/// once they have been set by this function, a grow never shrinks a group and a shrink never
/// grows one, and the sum is exactly `target`. The node pool's own `setSize` sets a size per
/// zone (the pool's total is a multiple of its zones), so it cannot say 5 machines over 3
/// zones; per-group resizes can.
pub fn distribute(current: &[u32], target: u32) -> Vec<u32> {
    let mut sizes = current.to_vec();
    if sizes.is_empty() {
        return sizes;
    }
    let mut total: u64 = sizes.iter().map(|&s| u64::from(s)).sum();
    let target = u64::from(target);
    while total < target {
        let (i, _) = sizes
            .iter()
            .enumerate()
            .min_by_key(|(i, s)| (**s, *i))
            .unwrap_or((0, &0));
        sizes[i] += 1;
        total += 1;
    }
    while total > target {
        let (i, _) = sizes
            .iter()
            .enumerate()
            .max_by_key(|(i, s)| (**s, *i))
            .unwrap_or((0, &0));
        sizes[i] -= 1;
        total -= 1;
    }
    sizes
}

/// A request id for a mutating Compute call: a UUID (version 5 layout) derived from the
/// intent, so a retried call carries the same id and Compute Engine answers it with the
/// first call's operation instead of applying it again (it remembers ids for at least an
/// hour). The intent includes the group's fingerprint, which changes with every change to
/// the group: a later, new resize to a size the group had before gets a new id.
pub fn request_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(b"kube-node.io/gke-request-id/v1");
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A managed instance's state for the seam, from its `currentAction` and `instanceStatus`
/// (the names the API spells: `CREATING`, `DELETING`, `RUNNING`, ...).
pub fn state(current_action: Option<&str>, instance_status: Option<&str>) -> InstanceState {
    match current_action.unwrap_or("NONE") {
        "DELETING" | "ABANDONING" => InstanceState::Terminating,
        "CREATING" | "CREATING_WITHOUT_RETRIES" | "RECREATING" | "VERIFYING" => {
            InstanceState::Pending
        }
        _ => match instance_status.unwrap_or("") {
            "RUNNING" => InstanceState::Running,
            "STOPPING" | "TERMINATED" | "STOPPED" | "SUSPENDING" | "SUSPENDED"
            | "DEPROVISIONING" => InstanceState::Terminating,
            // PROVISIONING, STAGING, REPAIRING, PENDING, or not reported yet.
            _ => InstanceState::Pending,
        },
    }
}

/// Whether a managed instance is still being created (`CREATING`, `RECREATING`, or no
/// instance status yet and not leaving): its `lastAttempt.errors`, when set, then say why its
/// creation failed.
pub fn creating(current_action: Option<&str>, instance_status: Option<&str>) -> bool {
    match current_action.unwrap_or("NONE") {
        "CREATING" | "CREATING_WITHOUT_RETRIES" | "RECREATING" => true,
        "DELETING" | "ABANDONING" => false,
        _ => instance_status.is_none_or(str::is_empty),
    }
}

/// Whether a machine in this state is already on its way out: deleting it again would
/// lower the group's size a second time.
pub fn leaving(current_action: Option<&str>) -> bool {
    matches!(current_action, Some("DELETING" | "ABANDONING"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_round_trip_and_foreign_ones_are_none() {
        let m = MachineRef::parse("gce://my-project/europe-west1-b/gke-prod-pool-1-abc-x1y2")
            .expect("parse");
        assert_eq!(m.zone, "europe-west1-b");
        assert_eq!(m.name, "gke-prod-pool-1-abc-x1y2");
        assert_eq!(
            m.provider_id(),
            "gce://my-project/europe-west1-b/gke-prod-pool-1-abc-x1y2"
        );
        assert_eq!(
            m.zonal_url(),
            "zones/europe-west1-b/instances/gke-prod-pool-1-abc-x1y2"
        );
        for bad in [
            "aws:///us-east-1a/i-0abc",
            "gce://p/z",
            "gce://p/z/n/extra",
            "gce:///z/n",
            "",
        ] {
            assert_eq!(MachineRef::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn instance_group_urls() {
        let m = MigRef::parse(
            "https://www.googleapis.com/compute/v1/projects/my-project/zones/europe-west1-b/instanceGroupManagers/gke-prod-pool-1-abc-grp",
        )
        .expect("parse");
        assert_eq!(
            m,
            MigRef {
                project: "my-project".into(),
                zone: "europe-west1-b".into(),
                name: "gke-prod-pool-1-abc-grp".into()
            }
        );
        assert_eq!(
            MigRef::parse("http://127.0.0.1:1/compute/v1/projects/p/zones/z/instanceGroups/g"),
            Some(MigRef {
                project: "p".into(),
                zone: "z".into(),
                name: "g".into()
            })
        );
        assert_eq!(
            MigRef::parse("https://x/compute/v1/projects/p/regions/r/instanceGroupManagers/g"),
            None
        );
        assert_eq!(
            instance_name("https://www.googleapis.com/compute/v1/projects/p/zones/z/instances/n-1"),
            Some("n-1")
        );
        assert!(named_by_group(
            "gke-prod-pool-1-abc-x1y2",
            "gke-prod-pool-1-abc"
        ));
        assert!(!named_by_group(
            "gke-prod-pool-2-def-x1y2",
            "gke-prod-pool-1-abc"
        ));
        assert!(!named_by_group(
            "gke-prod-pool-1-abc",
            "gke-prod-pool-1-abc"
        ));
        assert!(!named_by_group(
            "gke-prod-pool-1-abc-x-y",
            "gke-prod-pool-1-abc"
        ));
    }

    #[test]
    fn distribute_is_exact_balanced_monotone_and_idempotent() {
        let cases: &[(&[u32], u32)] = &[
            (&[0, 0, 0], 5),
            (&[2, 2, 1], 2),
            (&[3, 0, 0], 5),
            (&[3, 0, 0], 1),
            (&[1], 7),
            (&[4, 4], 0),
            (&[0, 0, 0], 0),
        ];
        for &(current, target) in cases {
            let planned = distribute(current, target);
            assert_eq!(
                planned.iter().sum::<u32>(),
                target,
                "{current:?} → {target}"
            );
            let grew = target >= current.iter().sum::<u32>();
            for (c, p) in current.iter().zip(&planned) {
                assert!(
                    if grew { p >= c } else { p <= c },
                    "{current:?} → {planned:?}"
                );
            }
            assert_eq!(distribute(&planned, target), planned, "idempotent");
        }
        assert_eq!(distribute(&[0, 0, 0], 5), vec![2, 2, 1]);
        assert_eq!(distribute(&[2, 2, 1], 2), vec![1, 1, 0]);
        assert_eq!(distribute(&[], 3), Vec::<u32>::new());
        // From balanced, every size stays within one of the others.
        for t in 0..20 {
            let p = distribute(&[0, 0, 0], t);
            let (lo, hi) = (p.iter().min(), p.iter().max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{p:?}");
        }
    }

    #[test]
    fn request_ids_are_uuids_stable_per_intent() {
        let a = request_id(&[
            "resize",
            "projects/p/zones/z/instanceGroupManagers/g",
            "fp1",
            "5",
        ]);
        let b = request_id(&[
            "resize",
            "projects/p/zones/z/instanceGroupManagers/g",
            "fp1",
            "5",
        ]);
        let c = request_id(&[
            "resize",
            "projects/p/zones/z/instanceGroupManagers/g",
            "fp2",
            "5",
        ]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        // The parts are length-prefixed: moving a boundary changes the id.
        assert_ne!(request_id(&["ab", "c"]), request_id(&["a", "bc"]));
        assert_eq!(a.len(), 36);
        assert_eq!(a.as_bytes()[14], b'5', "version 5 layout: {a}");
        assert!(matches!(a.as_bytes()[19], b'8' | b'9' | b'a' | b'b'), "{a}");
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn states() {
        use InstanceState::*;
        assert_eq!(state(Some("CREATING"), None), Pending);
        assert_eq!(state(Some("DELETING"), Some("RUNNING")), Terminating);
        assert_eq!(state(Some("NONE"), Some("RUNNING")), Running);
        assert_eq!(state(Some("NONE"), Some("STAGING")), Pending);
        assert_eq!(state(Some("NONE"), Some("STOPPING")), Terminating);
        assert_eq!(state(None, None), Pending);
        assert!(leaving(Some("DELETING")));
        assert!(!leaving(Some("CREATING")));
        assert!(creating(Some("CREATING"), Some("STAGING")));
        assert!(creating(Some("RECREATING"), Some("RUNNING")));
        assert!(creating(Some("NONE"), None));
        assert!(creating(None, None));
        assert!(!creating(Some("NONE"), Some("RUNNING")));
        assert!(!creating(Some("DELETING"), None));
        assert!(!creating(Some("REFRESHING"), Some("RUNNING")));
    }
}
