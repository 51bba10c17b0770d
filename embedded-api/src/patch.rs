//! Patch application: JSON patch (RFC 6902), JSON merge patch (RFC 7386), a
//! simplified strategic merge patch, and simplified server-side apply.

use serde_json::{Map, Value};

use crate::error::{ApiError, ApiResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> ApiResult<Self> {
        let base = ct
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match base.as_str() {
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+json" => Ok(PatchType::Apply),
            _ => Err(ApiError::unsupported_media_type(ct)),
        }
    }
}

/// Parse the body of an apply patch (YAML or JSON) into a JSON value.
pub(crate) fn parse_apply_body(body: &[u8]) -> ApiResult<Value> {
    let v: Value = serde_yaml::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("apply patch must be an object"));
    }
    Ok(v)
}

/// Apply a patch of type `pt` to `target`, returning the patched document.
pub(crate) fn apply_patch(target: &Value, pt: PatchType, body: &[u8]) -> ApiResult<Value> {
    let mut doc = target.clone();
    match pt {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
            for op in ops.0.iter() {
                // Like the apiserver's JSON patch library, a `test` for `null`
                // succeeds when the path does not exist (kube-runtime's
                // finalizer helper relies on this).
                if let json_patch::PatchOperation::Test(t) = op
                    && t.value.is_null()
                    && doc.pointer(t.path.as_str()).is_none()
                {
                    continue;
                }
                json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| {
                    ApiError::unprocessable(format!(
                        "the server rejected our request due to an error in our request: {e}"
                    ))
                })?;
            }
        }
        PatchType::Merge => {
            let p: Value = parse_json(body)?;
            json_patch::merge(&mut doc, &p);
        }
        PatchType::Strategic => {
            let p: Value = parse_json(body)?;
            if !p.is_object() {
                return Err(ApiError::bad_request(
                    "strategic merge patch must be a JSON object",
                ));
            }
            strategic_merge(&mut doc, &p);
        }
        PatchType::Apply => {
            let p = parse_apply_body(body)?;
            apply_merge(&mut doc, &p);
        }
    }
    Ok(doc)
}

fn parse_json(body: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))
}

/// Simplified server-side apply merge: maps merge recursively, anything else
/// (lists, scalars) in the applied configuration replaces; `null` removes.
pub(crate) fn apply_merge(target: &mut Value, applied: &Value) {
    match (target.as_object_mut(), applied.as_object()) {
        (Some(t), Some(a)) => {
            for (k, v) in a {
                if k == "managedFields" {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else if v.is_object() {
                    let entry = t
                        .entry(k.clone())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if !entry.is_object() {
                        *entry = Value::Object(Map::new());
                    }
                    apply_merge(entry, v);
                } else {
                    t.insert(k.clone(), v.clone());
                }
            }
        }
        _ => *target = strip_nulls(applied),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Merge key for lists of objects, by field name (as declared by the
/// Kubernetes types' `patchMergeKey`). Lists not listed here are replaced.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "conditions" => "type",
        "addresses" => "type",
        "ownerReferences" => "uid",
        "containers" | "initContainers" | "ephemeralContainers" => "name",
        "volumes"
        | "env"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses"
        | "ephemeralContainerStatuses"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "hostAliases" => "ip",
        "topologySpreadConstraints" => "topologyKey",
        _ => return None,
    })
}

/// Primitive lists with `patchStrategy: merge` (union on patch).
fn is_primitive_merge_list(field: &str) -> bool {
    matches!(field, "finalizers" | "podCIDRs")
}

fn without_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), without_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_directives).collect()),
        other => other.clone(),
    }
}

/// Simplified strategic merge patch.
///
/// * maps merge recursively, `null` deletes a key;
/// * lists of objects with a known merge key (`conditions`/`addresses` by
///   `type`, `ownerReferences` by `uid`, `containers`/`volumes`/`env` by
///   `name`, ...) are merged element-wise by that key; `{"$patch": "delete"}`
///   elements delete, a `{"$patch": "replace"}` element replaces the list;
/// * `finalizers` and `podCIDRs` are unioned, `$deleteFromPrimitiveList/<f>`
///   removes entries;
/// * `$patch: replace|delete` on maps and `$retainKeys` are honoured;
///   `$setElementOrder` is ignored;
/// * every other list (e.g. `taints`, `tolerations`) is replaced as a whole,
///   as the real apiserver does for fields without a patch strategy.
pub(crate) fn strategic_merge(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if p.get("$patch").and_then(Value::as_str) == Some("replace") {
        *target = without_directives(patch);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(t) = target.as_object_mut() else {
        return;
    };
    for (k, pv) in p {
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), pv.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if pv.is_null() {
            t.remove(k);
            continue;
        }
        match pv {
            Value::Object(po) => {
                if po.get("$patch").and_then(Value::as_str) == Some("delete") {
                    t.remove(k);
                    continue;
                }
                let entry = t.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(entry, pv);
            }
            Value::Array(pa) => {
                if let Some(mk) = merge_key(k)
                    && pa.iter().all(Value::is_object)
                {
                    let existing = match t.get(k) {
                        Some(Value::Array(a)) => a.clone(),
                        _ => Vec::new(),
                    };
                    t.insert(k.clone(), Value::Array(merge_list_by_key(existing, pa, mk)));
                } else if is_primitive_merge_list(k) {
                    let mut existing = match t.get(k) {
                        Some(Value::Array(a)) => a.clone(),
                        _ => Vec::new(),
                    };
                    for x in pa {
                        if !existing.contains(x) {
                            existing.push(x.clone());
                        }
                    }
                    t.insert(k.clone(), Value::Array(existing));
                } else {
                    t.insert(k.clone(), without_directives(pv));
                }
            }
            other => {
                t.insert(k.clone(), other.clone());
            }
        }
    }
    if let Some(retain) = p.get("$retainKeys").and_then(Value::as_array) {
        t.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k.as_str())));
    }
}

fn merge_list_by_key(mut existing: Vec<Value>, patch: &[Value], key: &str) -> Vec<Value> {
    if patch
        .iter()
        .any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return patch
            .iter()
            .filter(|e| e.get("$patch").is_none())
            .map(without_directives)
            .collect();
    }
    for pe in patch {
        let kv = pe.get(key);
        let directive = pe.get("$patch").and_then(Value::as_str);
        let pos = kv.and_then(|kv| existing.iter().position(|e| e.get(key) == Some(kv)));
        match (directive, pos) {
            (Some("delete"), Some(i)) => {
                existing.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => {
                if let Some(e) = existing.get_mut(i) {
                    strategic_merge(e, pe);
                }
            }
            (_, None) => existing.push(without_directives(pe)),
        }
    }
    existing
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8").ok(),
            Some(PatchType::Merge)
        );
        assert_eq!(
            PatchType::from_content_type("text/plain").map_err(|e| e.code),
            Err(415)
        );
    }

    #[test]
    fn smp_conditions_merge_by_type() {
        let mut t = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Disk", "status": "False"}]}});
        strategic_merge(
            &mut t,
            &json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "New", "status": "True"}]}}),
        );
        assert_eq!(
            t,
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Disk", "status": "False"}, {"type": "New", "status": "True"}]}})
        );
        strategic_merge(
            &mut t,
            &json!({"status": {"conditions": [{"type": "Disk", "$patch": "delete"}]}}),
        );
        assert_eq!(t["status"]["conditions"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn smp_lists() {
        let mut t = json!({"metadata": {"finalizers": ["a"]}, "spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}});
        strategic_merge(
            &mut t,
            &json!({"metadata": {"finalizers": ["b"]}, "spec": {"taints": [{"key": "y", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(t["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            t["spec"]["taints"],
            json!([{"key": "y", "effect": "NoSchedule"}])
        );
        strategic_merge(
            &mut t,
            &json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}, "spec": {"x": null}}),
        );
        assert_eq!(t["metadata"]["finalizers"], json!(["b"]));
        strategic_merge(&mut t, &json!({"spec": {"$patch": "replace", "z": 1}}));
        assert_eq!(t["spec"], json!({"z": 1}));
    }

    #[test]
    fn apply_semantics() {
        let mut t = json!({"spec": {"a": 1, "l": [1, 2], "m": {"x": 1}}});
        apply_merge(&mut t, &json!({"spec": {"b": 2, "l": [3], "m": {"y": 2}}}));
        assert_eq!(
            t,
            json!({"spec": {"a": 1, "b": 2, "l": [3], "m": {"x": 1, "y": 2}}})
        );
    }

    #[test]
    fn json_patch_test_failure_is_422() {
        let t = json!({"a": 1});
        let r = apply_patch(
            &t,
            PatchType::Json,
            br#"[{"op":"test","path":"/a","value":2}]"#,
        );
        assert_eq!(r.map_err(|e| e.code), Err(422));
        let r = apply_patch(
            &t,
            PatchType::Json,
            br#"[{"op":"test","path":"/b","value":null},{"op":"add","path":"/b","value":[1]}]"#,
        );
        assert_eq!(r.ok(), Some(json!({"a": 1, "b": [1]})));
        let r = apply_patch(
            &t,
            PatchType::Json,
            br#"[{"op":"add","path":"/c","value":1},{"op":"test","path":"/a","value":null}]"#,
        );
        assert_eq!(r.map_err(|e| e.code), Err(422));
        let r = apply_patch(&t, PatchType::Json, b"not json");
        assert_eq!(r.map_err(|e| e.code), Err(400));
        let r = apply_patch(&t, PatchType::Apply, b"a: 2\nb: x\n");
        assert_eq!(r.ok(), Some(json!({"a": 2, "b": "x"})));
    }
}
