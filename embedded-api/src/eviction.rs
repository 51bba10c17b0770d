//! The pod `eviction` subresource and PodDisruptionBudget arithmetic.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceDef;
use crate::selector::LabelSelector;
use crate::store::{DeleteOpts, State, Sub};
use crate::util::{get_path, is_deleting, labels_of, name_of};

/// Result of evaluating one PodDisruptionBudget.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PdbEval {
    pub name: String,
    pub expected: i64,
    pub healthy: i64,
    pub desired: i64,
    pub allowed: i64,
}

/// A pod counts as healthy when it is not being deleted and its phase is
/// `Running` or it has no phase at all (no kubelet has reported yet).
pub(crate) fn pod_healthy(pod: &Value) -> bool {
    if is_deleting(pod) {
        return false;
    }
    matches!(
        get_path(pod, &["status", "phase"]).and_then(Value::as_str),
        None | Some("Running")
    )
}

/// Resolve an int-or-percent against `total`, rounding percentages up.
fn int_or_percent(v: &Value, total: i64) -> Result<i64, String> {
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| format!("invalid value {n}")),
        Value::String(s) => {
            if let Some(p) = s.strip_suffix('%') {
                let p: i64 = p
                    .trim()
                    .parse()
                    .map_err(|_| format!("invalid value for IntOrString: invalid value {s:?}"))?;
                let prod = total.saturating_mul(p);
                Ok(prod.saturating_add(99).div_euclid(100))
            } else {
                s.trim()
                    .parse()
                    .map_err(|_| format!("invalid value for IntOrString: invalid value {s:?}"))
            }
        }
        other => Err(format!("invalid value for IntOrString: {other}")),
    }
}

/// The uid of a pod's controller (ownerReference with `controller: true`).
fn controller_uid(pod: &Value) -> Option<&str> {
    pod.pointer("/metadata/ownerReferences")?
        .as_array()?
        .iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))?
        .get("uid")?
        .as_str()
}

/// Evaluate a PDB against the pods of its namespace.
///
/// `controller_scale` resolves a controller uid to its desired replica
/// count. Like the disruption controller, the expected pod count for an
/// integer `minAvailable` is the number of matching pods; for
/// `maxUnavailable` or a percentage it is the sum of the desired scale of
/// the pods' controllers (pods without a resolvable controller count as one
/// each).
pub(crate) fn eval_pdb(
    pdb: &Value,
    pods: &[Arc<Value>],
    controller_scale: &dyn Fn(&str) -> Option<i64>,
) -> Result<PdbEval, String> {
    let selector = LabelSelector::from_json(get_path(pdb, &["spec", "selector"]))?;
    let matching: Vec<&Arc<Value>> = pods
        .iter()
        .filter(|p| selector.matches(labels_of(p)))
        .collect();
    let pod_count = i64::try_from(matching.len()).unwrap_or(i64::MAX);
    let healthy =
        i64::try_from(matching.iter().filter(|p| pod_healthy(p)).count()).unwrap_or(i64::MAX);
    let min = get_path(pdb, &["spec", "minAvailable"]).filter(|v| !v.is_null());
    let max = get_path(pdb, &["spec", "maxUnavailable"]).filter(|v| !v.is_null());
    let needs_scale = max.is_some() || min.is_some_and(Value::is_string);
    let expected = if needs_scale {
        let mut seen = std::collections::HashSet::new();
        let mut total: i64 = 0;
        for p in &matching {
            match controller_uid(p).and_then(|u| Some((u, controller_scale(u)?))) {
                Some((uid, n)) => {
                    if seen.insert(uid) {
                        total = total.saturating_add(n.max(0));
                    }
                }
                None => total = total.saturating_add(1),
            }
        }
        total
    } else {
        pod_count
    };
    let desired = if let Some(min) = min {
        int_or_percent(min, expected)?
    } else if let Some(max) = max {
        expected
            .saturating_sub(int_or_percent(max, expected)?)
            .max(0)
    } else {
        0
    };
    Ok(PdbEval {
        name: name_of(pdb).to_string(),
        expected,
        healthy,
        desired,
        allowed: healthy.saturating_sub(desired),
    })
}

impl State {
    fn pdb_def(&self) -> Option<Arc<ResourceDef>> {
        self.registry.lookup("policy", "v1", "poddisruptionbudgets")
    }

    fn pods_def(&self) -> Option<Arc<ResourceDef>> {
        self.registry.lookup("", "v1", "pods")
    }

    /// Desired replicas of a pod controller known to this server (custom
    /// resources with a scale subresource, DaemonSets).
    fn controller_scale(&self, uid: &str) -> Option<i64> {
        let (def, obj) = self.object_by_uid(uid)?;
        if let Some(scale) = &def.scale {
            return Some(
                get_path(&obj, &scale.spec_replicas)
                    .and_then(Value::as_i64)
                    .unwrap_or(0),
            );
        }
        if def.is("apps", "daemonsets") {
            return get_path(&obj, &["status", "desiredNumberScheduled"]).and_then(Value::as_i64);
        }
        if let Some(r) = get_path(&obj, &["spec", "replicas"]).and_then(Value::as_i64) {
            return Some(r);
        }
        None
    }

    fn pods_in(&self, ns: &str) -> Vec<Arc<Value>> {
        match self.pods_def() {
            Some(d) => self
                .objects_in(&d.key, Some(ns))
                .map(|(_, o)| o.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Recompute and store the status of one PodDisruptionBudget.
    pub(crate) fn refresh_pdb_status(&mut self, ns: &str, name: &str) {
        let Some(def) = self.pdb_def() else { return };
        let Some(pdb) = self.object(&def, ns, name) else {
            return;
        };
        let pods = self.pods_in(ns);
        let Ok(e) = eval_pdb(&pdb, &pods, &|u| self.controller_scale(u)) else {
            return;
        };
        let mut cand = (*pdb).clone();
        let observed = get_path(&pdb, &["metadata", "generation"])
            .cloned()
            .unwrap_or(json!(1));
        let mut status = pdb.get("status").cloned().unwrap_or_else(|| json!({}));
        if let Some(s) = status.as_object_mut() {
            s.insert("currentHealthy".into(), json!(e.healthy));
            s.insert("desiredHealthy".into(), json!(e.desired));
            s.insert("disruptionsAllowed".into(), json!(e.allowed.max(0)));
            s.insert("expectedPods".into(), json!(e.expected));
            s.insert("observedGeneration".into(), observed);
        }
        if let Some(o) = cand.as_object_mut() {
            o.insert("status".into(), status);
        }
        let _ = self.finish_update(&def, &pdb, cand, Sub::Status, false);
    }

    /// `POST pods/NAME/eviction`.
    pub(crate) fn evict(
        &mut self,
        ns: &str,
        name: &str,
        eviction: &Value,
        dry_run: bool,
    ) -> ApiResult<()> {
        let pods_def = self.pods_def().ok_or_else(ApiError::not_found_path)?;
        let pod = self.get(&pods_def, ns, name)?;
        let phase = get_path(&pod, &["status", "phase"]).and_then(Value::as_str);
        let can_ignore_pdb =
            is_deleting(&pod) || matches!(phase, Some("Succeeded" | "Failed" | "Pending"));
        let mut matching_pdbs = Vec::new();
        if let Some(pdb_def) = self.pdb_def() {
            let pods = self.pods_in(ns);
            let mut blocked = Vec::new();
            for (_, pdb) in self.objects_in(&pdb_def.key, Some(ns)) {
                let Ok(sel) = LabelSelector::from_json(get_path(pdb, &["spec", "selector"])) else {
                    continue;
                };
                if !sel.matches(labels_of(&pod)) {
                    continue;
                }
                matching_pdbs.push(name_of(pdb).to_string());
                let e = eval_pdb(pdb, &pods, &|u| self.controller_scale(u))
                    .map_err(ApiError::internal)?;
                if e.allowed <= 0 {
                    blocked.push(e);
                }
            }
            if !can_ignore_pdb && !blocked.is_empty() {
                let causes: Vec<Value> = blocked
                    .iter()
                    .map(|e| {
                        json!({
                            "reason": "DisruptionBudget",
                            "message": format!(
                                "The disruption budget {} needs {} healthy pods and has {} currently",
                                e.name, e.desired, e.healthy
                            ),
                        })
                    })
                    .collect();
                for p in &matching_pdbs {
                    self.refresh_pdb_status(ns, p);
                }
                return Err(ApiError::new(
                    429,
                    "TooManyRequests",
                    "Cannot evict pod as it would violate the pod's disruption budget.",
                )
                .with_details(json!({"causes": causes})));
            }
        }
        // kube-rs sends `delete_options`; the Kubernetes field is `deleteOptions`.
        let raw = eviction
            .get("deleteOptions")
            .or_else(|| eviction.get("delete_options"));
        let mut opts: DeleteOpts = crate::service::delete_opts_from_json(raw)?;
        opts.dry_run |= dry_run;
        self.delete(&pods_def, ns, name, &opts)?;
        for p in &matching_pdbs {
            self.refresh_pdb_status(ns, p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: Option<&str>) -> Arc<Value> {
        let mut p = json!({"metadata": {"name": "p", "labels": {"app": "a"}}});
        if let Some(ph) = phase {
            p["status"] = json!({"phase": ph});
        }
        Arc::new(p)
    }

    #[test]
    fn pdb_math() {
        let pods = vec![pod(Some("Running")), pod(None), pod(Some("Pending"))];
        let pdb = json!({"metadata": {"name": "b"}, "spec": {"selector": {"matchLabels": {"app": "a"}}, "minAvailable": 2}});
        let e = eval_pdb(&pdb, &pods, &|_| None).expect("eval");
        assert_eq!((e.expected, e.healthy, e.desired, e.allowed), (3, 2, 2, 0));
        let pdb = json!({"metadata": {"name": "b"}, "spec": {"selector": {"matchLabels": {"app": "a"}}, "maxUnavailable": "50%"}});
        let e = eval_pdb(&pdb, &pods, &|_| None).expect("eval");
        // 50% of 3 rounds up to 2 -> desired 1, allowed 1
        assert_eq!((e.desired, e.allowed), (1, 1));
        let pdb = json!({"metadata": {"name": "b"}, "spec": {"selector": {"matchLabels": {"app": "a"}}, "minAvailable": "34%"}});
        assert_eq!(eval_pdb(&pdb, &pods, &|_| None).expect("eval").desired, 2);
        let bad =
            json!({"metadata": {"name": "b"}, "spec": {"selector": {}, "minAvailable": "x%"}});
        assert!(eval_pdb(&bad, &pods, &|_| None).is_err());
    }
}
