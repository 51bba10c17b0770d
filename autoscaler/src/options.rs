//! Per-NodeSet autoscaling options, from NodeSet annotations.
//!
//! The keys are the ones cluster-autoscaler's clusterapi provider reads from a MachineSet or
//! MachineDeployment, so users moving from Cluster API keep their annotations.

use std::collections::BTreeMap;

use k8s_pb::apimachinery::pkg::apis::meta::v1::Duration as MetaDuration;

use crate::proto::NodeGroupAutoscalingOptions;

/// Overrides `scaleDownUtilizationThreshold` (a number in [0, 1]).
pub const SCALE_DOWN_UTILIZATION_THRESHOLD: &str =
    "cluster.x-k8s.io/autoscaling-options-scaledownutilizationthreshold";
/// Overrides `scaleDownGpuUtilizationThreshold` (a number in [0, 1]).
pub const SCALE_DOWN_GPU_UTILIZATION_THRESHOLD: &str =
    "cluster.x-k8s.io/autoscaling-options-scaledowngpuutilizationthreshold";
/// Overrides `scaleDownUnneededTime` (a Go duration such as `10m`).
pub const SCALE_DOWN_UNNEEDED_TIME: &str =
    "cluster.x-k8s.io/autoscaling-options-scaledownunneededtime";
/// Overrides `scaleDownUnreadyTime` (a Go duration).
pub const SCALE_DOWN_UNREADY_TIME: &str =
    "cluster.x-k8s.io/autoscaling-options-scaledownunreadytime";
/// Overrides `maxNodeProvisionTime` (a Go duration).
pub const MAX_NODE_PROVISION_TIME: &str =
    "cluster.x-k8s.io/autoscaling-options-maxnodeprovisiontime";
/// Overrides `maxNodeStartupTime` (a Go duration; only CA 1.34+ reads it).
pub const MAX_NODE_STARTUP_TIME: &str = "cluster.x-k8s.io/autoscaling-options-maxnodestartuptime";

/// Every option annotation.
pub const ALL: &[&str] = &[
    SCALE_DOWN_UTILIZATION_THRESHOLD,
    SCALE_DOWN_GPU_UTILIZATION_THRESHOLD,
    SCALE_DOWN_UNNEEDED_TIME,
    SCALE_DOWN_UNREADY_TIME,
    MAX_NODE_PROVISION_TIME,
    MAX_NODE_STARTUP_TIME,
];

/// An annotation whose value could not be used (it is ignored, the default stays).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadOption {
    /// The annotation key.
    pub key: &'static str,
    /// Its value.
    pub value: String,
}

fn legacy(d: &prost_types::Duration) -> MetaDuration {
    MetaDuration {
        duration: Some(
            d.seconds
                .saturating_mul(1_000_000_000)
                .saturating_add(i64::from(d.nanos)),
        ),
    }
}

fn modern(d: &MetaDuration) -> prost_types::Duration {
    let ns = d.duration.unwrap_or(0);
    prost_types::Duration {
        seconds: ns / 1_000_000_000,
        // |ns % 1e9| < 1e9 always fits in i32.
        nanos: i32::try_from(ns % 1_000_000_000).unwrap_or(0),
    }
}

fn go_duration(s: &str) -> Option<prost_types::Duration> {
    let d: kube::core::Duration = s.trim().parse().ok()?;
    let d: std::time::Duration = d.into();
    Some(prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).ok()?,
        nanos: i32::try_from(d.subsec_nanos()).ok()?,
    })
}

fn threshold(s: &str) -> Option<f64> {
    let v: f64 = s.trim().parse().ok()?;
    (0.0..=1.0).contains(&v).then_some(v)
}

/// Makes both generations of duration fields agree: where only one of a pair is set (an old
/// CA sends only fields 3-5, a new one both), the other is filled from it.
fn fill_both(o: &mut NodeGroupAutoscalingOptions) {
    fn pair(old: &mut Option<MetaDuration>, new: &mut Option<prost_types::Duration>) {
        match (&*old, &*new) {
            (_, Some(n)) => *old = Some(legacy(n)),
            (Some(l), None) => *new = Some(modern(l)),
            (None, None) => {}
        }
    }
    pair(
        &mut o.scale_down_unneeded_time,
        &mut o.scale_down_unneeded_duration,
    );
    pair(
        &mut o.scale_down_unready_time,
        &mut o.scale_down_unready_duration,
    );
    pair(
        &mut o.max_node_provision_time,
        &mut o.max_node_provision_duration,
    );
}

/// The options of a NodeSet with these annotations: cluster-autoscaler's `defaults` with the
/// annotated overrides applied, every duration in both the legacy (3-5) and the current
/// (8-10) fields. Unusable values are ignored and reported.
///
/// Without option annotations there are no options (`None`): the server answers with an empty
/// `nodeGroupAutoscalingOptions`, which every cluster-autoscaler release reads as "use your own
/// defaults" (1.28: `externalgrpc_node_group.go` returns `nil, nil` and the node group config
/// processor falls back to its defaults; 1.31 the same). Echoing the request's defaults is not
/// the same answer: 1.28 sends and reads back only four fields, so its MaxNodeProvisionTime
/// became 0 and a real 1.28 marked every scale-up "timed out" after one loop and backed the
/// group off for five minutes. Unimplemented is no better: 1.28 treats it as an error for every
/// node and never scales down.
pub fn options(
    annotations: &BTreeMap<String, String>,
    defaults: Option<&NodeGroupAutoscalingOptions>,
) -> (Option<NodeGroupAutoscalingOptions>, Vec<BadOption>) {
    if !ALL.iter().any(|k| annotations.contains_key(*k)) {
        return (None, Vec::new());
    }
    // CA replaces all of its options with the answer, so start from what it sent.
    let mut o = defaults.cloned().unwrap_or_default();
    fill_both(&mut o);
    let mut bad = Vec::new();
    for key in ALL {
        let Some(value) = annotations.get(*key) else {
            continue;
        };
        let ok = match *key {
            SCALE_DOWN_UTILIZATION_THRESHOLD => {
                threshold(value).map(|v| o.scale_down_utilization_threshold = v)
            }
            SCALE_DOWN_GPU_UTILIZATION_THRESHOLD => {
                threshold(value).map(|v| o.scale_down_gpu_utilization_threshold = v)
            }
            SCALE_DOWN_UNNEEDED_TIME => go_duration(value).map(|d| {
                o.scale_down_unneeded_time = Some(legacy(&d));
                o.scale_down_unneeded_duration = Some(d);
            }),
            SCALE_DOWN_UNREADY_TIME => go_duration(value).map(|d| {
                o.scale_down_unready_time = Some(legacy(&d));
                o.scale_down_unready_duration = Some(d);
            }),
            MAX_NODE_PROVISION_TIME => go_duration(value).map(|d| {
                o.max_node_provision_time = Some(legacy(&d));
                o.max_node_provision_duration = Some(d);
            }),
            MAX_NODE_STARTUP_TIME => go_duration(value).map(|d| {
                o.max_node_startup_duration = Some(d);
            }),
            _ => None,
        };
        if ok.is_none() {
            bad.push(BadOption {
                key,
                value: value.clone(),
            });
        }
    }
    (Some(o), bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: i64) -> prost_types::Duration {
        prost_types::Duration {
            seconds: s,
            nanos: 0,
        }
    }

    #[test]
    fn no_annotations_and_no_defaults_means_no_options() {
        let (o, bad) = options(&BTreeMap::new(), None);
        assert!(o.is_none());
        assert!(bad.is_empty());
    }

    #[test]
    fn no_annotations_means_no_options_whatever_the_defaults() {
        // As cluster-autoscaler 1.28 sends them: legacy durations only, and the booleans.
        let defaults = NodeGroupAutoscalingOptions {
            scale_down_utilization_threshold: 0.5,
            scale_down_gpu_utilization_threshold: 0.5,
            scale_down_unneeded_time: Some(MetaDuration {
                duration: Some(600_000_000_000),
            }),
            ignore_daemon_sets_utilization: true,
            ..Default::default()
        };
        let (o, bad) = options(&BTreeMap::new(), Some(&defaults));
        assert!(bad.is_empty());
        assert_eq!(o, None, "the autoscaler keeps its own defaults");
    }

    #[test]
    fn overrides_fill_both_generations_and_keep_defaults() {
        let defaults = NodeGroupAutoscalingOptions {
            scale_down_utilization_threshold: 0.5,
            scale_down_gpu_utilization_threshold: 0.5,
            // An old CA: legacy fields only.
            scale_down_unready_time: Some(MetaDuration {
                duration: Some(1_200_000_000_000),
            }),
            max_node_provision_time: Some(MetaDuration {
                duration: Some(900_000_000_000),
            }),
            ..Default::default()
        };
        let ann: BTreeMap<String, String> = [
            (SCALE_DOWN_UNNEEDED_TIME.to_string(), "5m".to_string()),
            (
                SCALE_DOWN_UTILIZATION_THRESHOLD.to_string(),
                "0.3".to_string(),
            ),
            (
                SCALE_DOWN_GPU_UTILIZATION_THRESHOLD.to_string(),
                "7".to_string(),
            ),
        ]
        .into();
        let (o, bad) = options(&ann, Some(&defaults));
        let o = o.expect("options");
        assert_eq!(o.scale_down_utilization_threshold, 0.3);
        assert_eq!(
            o.scale_down_gpu_utilization_threshold, 0.5,
            "bad value ignored"
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(o.scale_down_unneeded_duration, Some(secs(300)));
        assert_eq!(
            o.scale_down_unneeded_time.and_then(|d| d.duration),
            Some(300_000_000_000)
        );
        // Defaults that were not overridden appear in both generations.
        assert_eq!(o.scale_down_unready_duration, Some(secs(1200)));
        assert_eq!(o.max_node_provision_duration, Some(secs(900)));
        assert_eq!(
            o.max_node_provision_time.and_then(|d| d.duration),
            Some(900_000_000_000)
        );
    }
}
