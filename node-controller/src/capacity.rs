//! Declared vs. real capacity: does what a NodeClass says one machine has (its `allocatable`,
//! or its `capacity` when no allocatable is given — exactly what cluster-autoscaler's
//! scale-from-zero template advertises) match what the registered Nodes of the class report?
//!
//! A mistyped NodeClass, or a new image whose kubelet reserves more, makes the autoscaler buy
//! machines the pending pods do not fit on, again and again. This module decides, purely, which
//! declared resources a registered Node contradicts; the NodeClass controller turns that into
//! the `CapacityMatches` condition and events.
//!
//! Tolerances, per resource, on the Node's `status.allocatable`:
//! * `cpu`, `pods` and any other resource: exact. They are configured numbers (machine type,
//!   `--max-pods`, a kubelet's `--kube-reserved`/`--system-reserved` cpu), identical on every
//!   machine of a class, and an off-by-one on either decides whether a pod fits.
//! * `memory`, `ephemeral-storage` and `hugepages-*`: within [`SIZE_TOLERANCE`] either way. What a
//!   kubelet reports moves with the kernel, firmware reservations and the eviction threshold
//!   (a "16Gi" machine reports a little less), so exact equality would flag every class; a
//!   larger gap is a wrong declaration (16Gi declared on an 8Gi machine) or a reservation the
//!   declaration does not account for.
//! * Extended resources (`vendor/name`, e.g. `nvidia.com/gpu`) a Node does not advertise yet
//!   (absent or zero) are skipped: device plugins advertise them some time after the kubelet is
//!   Ready, and cluster-autoscaler itself treats such Nodes as not ready yet.
//!
//! Only resources the NodeClass declares are compared: an undeclared one says nothing.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The relative difference tolerated for memory-like resources.
pub const SIZE_TOLERANCE: f64 = 0.05;

/// One declared resource a Node contradicts.
#[derive(Clone, Debug, PartialEq)]
pub struct Mismatch {
    /// The resource name.
    pub resource: String,
    /// What the NodeClass declares.
    pub declared: String,
    /// What the Node reports (`none` when it reports nothing).
    pub observed: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} allocatable {} (declared {})",
            self.resource, self.observed, self.declared
        )
    }
}

/// Parses a Kubernetes quantity (`1.5`, `250m`, `16Gi`, `1e3`, `2k`) into a number.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    // The suffix starts at the first letter that is not an exponent's `e`/`E` (one followed by
    // a digit or sign): `1e3` is 1000, `1E` and `1Ei` are exa and exbi.
    let bytes = q.as_bytes();
    let split = q
        .char_indices()
        .find(|&(i, c)| {
            let exponent = matches!(c, 'e' | 'E')
                && bytes
                    .get(i + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == b'+' || *n == b'-');
            c.is_ascii_alphabetic() && !exponent
        })
        .map_or(q.len(), |(i, _)| i);
    let (num, suffix) = q.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        _ => return None,
    };
    value.is_finite().then_some(value * mult)
}

fn is_size(resource: &str) -> bool {
    matches!(resource, "memory" | "ephemeral-storage") || resource.starts_with("hugepages-")
}

fn is_extended(resource: &str) -> bool {
    resource.contains('/')
}

/// The declared resources `observed` (a Node's `status.allocatable`) contradicts, in resource
/// order. A declared value that does not parse is compared as a string.
pub fn compare(
    declared: &BTreeMap<String, Quantity>,
    observed: &BTreeMap<String, Quantity>,
) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for (resource, want) in declared {
        let got = observed.get(resource);
        let got_value = got.and_then(|g| parse_quantity(&g.0));
        if is_extended(resource) && got_value.is_none_or(|v| v == 0.0) {
            continue;
        }
        let matches = match (parse_quantity(&want.0), got_value) {
            (Some(w), Some(g)) if is_size(resource) => {
                (g - w).abs() <= SIZE_TOLERANCE * w.abs().max(g.abs())
            }
            // Millis are the finest unit Kubernetes keeps for cpu.
            (Some(w), Some(g)) => (w * 1000.0).round() == (g * 1000.0).round(),
            (None, _) => got.is_some_and(|g| g.0.trim() == want.0.trim()),
            (Some(_), None) => false,
        };
        if !matches {
            out.push(Mismatch {
                resource: resource.clone(),
                declared: want.0.clone(),
                observed: got.map_or_else(|| "none".to_string(), |g| g.0.clone()),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
        kv.iter()
            .map(|(k, v)| ((*k).to_string(), Quantity((*v).to_string())))
            .collect()
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("4"), Some(4.0));
        assert_eq!(parse_quantity("3900m"), Some(3.9));
        assert_eq!(
            parse_quantity("16Gi"),
            Some(16.0 * 1024.0 * 1024.0 * 1024.0)
        );
        assert_eq!(parse_quantity("2k"), Some(2000.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("1E"), Some(1e18));
        assert_eq!(parse_quantity("1Ei"), Some(1024.0f64.powi(6)));
        assert_eq!(parse_quantity("0.5"), Some(0.5));
        assert_eq!(parse_quantity("12Xi"), None);
        assert_eq!(parse_quantity(""), None);
    }

    #[test]
    fn exact_for_cpu_and_pods() {
        let declared = map(&[("cpu", "4"), ("pods", "110")]);
        assert!(compare(&declared, &map(&[("cpu", "4000m"), ("pods", "110")])).is_empty());
        let m = compare(&declared, &map(&[("cpu", "3900m"), ("pods", "58")]));
        assert_eq!(
            m,
            vec![
                Mismatch {
                    resource: "cpu".into(),
                    declared: "4".into(),
                    observed: "3900m".into()
                },
                Mismatch {
                    resource: "pods".into(),
                    declared: "110".into(),
                    observed: "58".into()
                },
            ]
        );
        assert_eq!(m[0].to_string(), "cpu allocatable 3900m (declared 4)");
    }

    #[test]
    fn memory_within_five_percent() {
        let declared = map(&[("memory", "16Gi")]);
        // What a kubelet with the default 100Mi eviction threshold reports.
        assert!(compare(&declared, &map(&[("memory", "16284Mi")])).is_empty());
        assert!(compare(&declared, &map(&[("memory", "15.3Gi")])).is_empty());
        let m = compare(&declared, &map(&[("memory", "8Gi")]));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].observed, "8Gi");
        assert_eq!(compare(&declared, &map(&[("memory", "32Gi")])).len(), 1);
    }

    #[test]
    fn missing_and_late_resources() {
        let declared = map(&[("cpu", "2"), ("nvidia.com/gpu", "1")]);
        // The device plugin has not advertised the GPU yet: not a mismatch.
        assert!(compare(&declared, &map(&[("cpu", "2"), ("nvidia.com/gpu", "0")])).is_empty());
        assert!(compare(&declared, &map(&[("cpu", "2")])).is_empty());
        assert_eq!(
            compare(&declared, &map(&[("cpu", "2"), ("nvidia.com/gpu", "2")])).len(),
            1
        );
        // A core resource the Node does not report at all is one.
        let m = compare(&declared, &map(&[]));
        assert_eq!(m[0].observed, "none");
        // Undeclared resources are not compared.
        assert!(compare(&map(&[]), &map(&[("cpu", "2")])).is_empty());
    }

    proptest! {
        /// A Node reporting exactly the declaration always matches; any resource reported
        /// differently beyond its tolerance is named.
        #[test]
        fn identical_matches_and_far_off_is_named(cpu in 1u32..512, mem_mi in 256u64..1_048_576, factor in 2u32..8) {
            let declared = map(&[("cpu", &cpu.to_string()), ("memory", &format!("{mem_mi}Mi"))]);
            prop_assert!(compare(&declared, &declared).is_empty());
            let off = map(&[("cpu", &(cpu * factor).to_string()), ("memory", &format!("{}Mi", mem_mi * u64::from(factor)))]);
            let names: Vec<String> = compare(&declared, &off).into_iter().map(|m| m.resource).collect();
            prop_assert_eq!(names, vec!["cpu".to_string(), "memory".to_string()]);
        }
    }
}
