//! The `scale` subresource of custom resources (`autoscaling/v1` Scale).

use serde_json::{Map, Value, json};

use crate::error::{ApiError, ApiResult};
use crate::patch::{PatchType, apply_patch};
use crate::resources::{ResourceDef, ScaleSpec};
use crate::store::{State, Sub, check_patch_allowed};
use crate::util::{get_path, meta, name_of, rv_of, set_path};

fn spec_of(def: &ResourceDef) -> ApiResult<&ScaleSpec> {
    def.scale.as_ref().ok_or_else(ApiError::not_found_path)
}

/// Build the Scale object for `obj`.
pub(crate) fn scale_of(def: &ResourceDef, spec: &ScaleSpec, obj: &Value) -> Value {
    let m = meta(obj);
    let mut md = Map::new();
    for f in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = m.and_then(|m| m.get(f)) {
            md.insert(f.into(), v.clone());
        }
    }
    let int = |p: &[String]| get_path(obj, p).and_then(Value::as_i64).unwrap_or(0);
    let mut status = json!({"replicas": int(&spec.status_replicas)});
    if let Some(sel) = spec
        .label_selector
        .as_ref()
        .and_then(|p| get_path(obj, p))
        .and_then(Value::as_str)
        && let Some(s) = status.as_object_mut()
    {
        s.insert("selector".into(), Value::String(sel.to_string()));
    }
    let _ = def;
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": md,
        "spec": {"replicas": int(&spec.spec_replicas)},
        "status": status,
    })
}

impl State {
    pub(crate) fn get_scale(&self, def: &ResourceDef, ns: &str, name: &str) -> ApiResult<Value> {
        let spec = spec_of(def)?;
        let obj = self.get(def, ns, name)?;
        Ok(scale_of(def, spec, &obj))
    }

    pub(crate) fn update_scale(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        scale: &Value,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let spec = spec_of(def)?.clone();
        let old = self.get(def, ns, name)?;
        if !scale.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let body_name = name_of(scale);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let rv = rv_of(scale);
        if !rv.is_empty() && rv != rv_of(&old) {
            return Err(ApiError::conflict(def, name));
        }
        let replicas = match get_path(scale, &["spec", "replicas"]) {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_i64().ok_or_else(|| {
                ApiError::bad_request(format!("spec.replicas must be an integer, got {v}"))
            })?,
        };
        if !(0..=i64::from(i32::MAX)).contains(&replicas) {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "Scale.autoscaling \"{name}\" is invalid: spec.replicas: Invalid value: {replicas}: must be greater than or equal to 0"
                ),
            ));
        }
        let mut cand = (*old).clone();
        if !set_path(&mut cand, &spec.spec_replicas, json!(replicas)) {
            return Err(ApiError::unprocessable(format!(
                "cannot set spec replicas path .{}",
                spec.spec_replicas.join(".")
            )));
        }
        let updated = self.finish_update(def, &old, cand, Sub::Main, dry_run)?;
        Ok(scale_of(def, &spec, &updated))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn patch_scale(
        &mut self,
        def: &ResourceDef,
        ns: &str,
        name: &str,
        pt: PatchType,
        body: &[u8],
        field_manager: Option<&str>,
        dry_run: bool,
    ) -> ApiResult<Value> {
        if pt == PatchType::Apply && field_manager.is_none_or(str::is_empty) {
            check_patch_allowed(def, pt, field_manager)?;
        }
        let current = self.get_scale(def, ns, name)?;
        let patched = apply_patch(&current, pt, body)?;
        self.update_scale(def, ns, name, &patched, dry_run)
    }
}
