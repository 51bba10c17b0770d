//! Resource definitions (builtin kinds and CRD-defined kinds) and the registry
//! that maps `group/version/plural` to them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::util::parse_json_path;

/// Storage identity of a resource: `group/plural` (versions share storage).
pub(crate) type ResKey = Arc<str>;

/// Paths of the scale subresource (already split into segments).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ScaleSpec {
    pub spec_replicas: Vec<String>,
    pub status_replicas: Vec<String>,
    pub label_selector: Option<Vec<String>>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ResourceDef {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub list_kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `/status` subresource.
    pub status: bool,
    pub scale: Option<ScaleSpec>,
    /// `PUT` of a missing object creates it (leases, events).
    pub create_on_update: bool,
    /// Defined by a CustomResourceDefinition.
    pub custom: bool,
    pub key: ResKey,
    pub api_version: String,
}

impl ResourceDef {
    #[allow(clippy::too_many_arguments)]
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
        short: &[&str],
        create_on_update: bool,
    ) -> Self {
        Self::build(
            group,
            version,
            plural,
            &kind.to_lowercase(),
            kind,
            &format!("{kind}List"),
            namespaced,
            short.iter().map(|s| s.to_string()).collect(),
            Vec::new(),
            status,
            None,
            create_on_update,
            false,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        group: &str,
        version: &str,
        plural: &str,
        singular: &str,
        kind: &str,
        list_kind: &str,
        namespaced: bool,
        short_names: Vec<String>,
        categories: Vec<String>,
        status: bool,
        scale: Option<ScaleSpec>,
        create_on_update: bool,
        custom: bool,
    ) -> Self {
        let api_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        ResourceDef {
            group: group.to_string(),
            version: version.to_string(),
            plural: plural.to_string(),
            singular: singular.to_string(),
            kind: kind.to_string(),
            list_kind: list_kind.to_string(),
            namespaced,
            short_names,
            categories,
            status,
            scale,
            create_on_update,
            custom,
            key: Arc::from(format!("{group}/{plural}")),
            api_version,
        }
    }

    /// `nodes` for the core group, `leases.coordination.k8s.io` otherwise (as in messages).
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn is(&self, group: &str, plural: &str) -> bool {
        self.group == group && self.plural == plural
    }
}

pub(crate) const CRD_GROUP: &str = "apiextensions.k8s.io";
pub(crate) const CRD_PLURAL: &str = "customresourcedefinitions";

/// Registered resources.
#[derive(Default)]
pub(crate) struct Registry {
    by_gvr: HashMap<(String, String, String), Arc<ResourceDef>>,
    /// CRD name -> the (group, version, plural) entries it installed.
    crds: HashMap<String, Vec<(String, String, String)>>,
}

impl Registry {
    pub fn with_builtins() -> Self {
        let mut r = Registry::default();
        let b = ResourceDef::builtin;
        let defs = [
            b("", "v1", "nodes", "Node", false, true, &["no"], false),
            b("", "v1", "pods", "Pod", true, true, &["po"], false),
            b("", "v1", "secrets", "Secret", true, false, &[], false),
            b(
                "",
                "v1",
                "configmaps",
                "ConfigMap",
                true,
                false,
                &["cm"],
                false,
            ),
            b(
                "",
                "v1",
                "namespaces",
                "Namespace",
                false,
                true,
                &["ns"],
                false,
            ),
            b("", "v1", "events", "Event", true, false, &["ev"], true),
            b(
                "",
                "v1",
                "serviceaccounts",
                "ServiceAccount",
                true,
                false,
                &["sa"],
                false,
            ),
            b(
                "events.k8s.io",
                "v1",
                "events",
                "Event",
                true,
                false,
                &["ev"],
                true,
            ),
            b(
                "coordination.k8s.io",
                "v1",
                "leases",
                "Lease",
                true,
                false,
                &[],
                true,
            ),
            b(
                "policy",
                "v1",
                "poddisruptionbudgets",
                "PodDisruptionBudget",
                true,
                true,
                &["pdb"],
                false,
            ),
            b(
                "apps",
                "v1",
                "daemonsets",
                "DaemonSet",
                true,
                true,
                &["ds"],
                false,
            ),
            b(
                CRD_GROUP,
                "v1",
                CRD_PLURAL,
                "CustomResourceDefinition",
                false,
                true,
                &["crd", "crds"],
                false,
            ),
        ];
        for d in defs {
            r.insert(d);
        }
        r
    }

    fn insert(&mut self, d: ResourceDef) {
        self.by_gvr.insert(
            (d.group.clone(), d.version.clone(), d.plural.clone()),
            Arc::new(d),
        );
    }

    pub fn lookup(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        self.by_gvr
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .cloned()
    }

    /// Any registered definition with storage key `key`.
    pub fn by_key(&self, key: &str) -> Option<Arc<ResourceDef>> {
        let mut best: Option<&Arc<ResourceDef>> = None;
        for d in self.by_gvr.values().filter(|d| &*d.key == key) {
            if best.is_none_or(|b| version_priority(&d.version) > version_priority(&b.version)) {
                best = Some(d);
            }
        }
        best.cloned()
    }

    /// Name of the CRD that installed `group/version/plural`, if any.
    pub fn crd_owner(&self, group: &str, version: &str, plural: &str) -> Option<String> {
        let k = (group.to_string(), version.to_string(), plural.to_string());
        self.crds
            .iter()
            .find(|(_, keys)| keys.contains(&k))
            .map(|(name, _)| name.clone())
    }

    /// Definitions installed by a CRD.
    pub fn crd_defs(&self, crd_name: &str) -> Vec<Arc<ResourceDef>> {
        self.crds
            .get(crd_name)
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| self.by_gvr.get(k).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn has_group_version(&self, group: &str, version: &str) -> bool {
        self.by_gvr
            .keys()
            .any(|(g, v, _)| g == group && v == version)
    }

    /// group -> versions, versions sorted by Kubernetes version priority (preferred first).
    pub fn groups(&self) -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (g, v, _) in self.by_gvr.keys() {
            let e = m.entry(g.clone()).or_default();
            if !e.contains(v) {
                e.push(v.clone());
            }
        }
        for vs in m.values_mut() {
            vs.sort_by(|a, b| version_priority(b).cmp(&version_priority(a)).then(a.cmp(b)));
        }
        m
    }

    pub fn resources(&self, group: &str, version: &str) -> Vec<Arc<ResourceDef>> {
        let mut v: Vec<_> = self
            .by_gvr
            .iter()
            .filter(|((g, ver, _), _)| g == group && ver == version)
            .map(|(_, d)| d.clone())
            .collect();
        v.sort_by(|a, b| a.plural.cmp(&b.plural));
        v
    }

    /// Is some (served) version of storage `key` still registered?
    pub fn key_registered(&self, key: &str) -> bool {
        self.by_gvr.values().any(|d| &*d.key == key)
    }

    /// Install the definitions from a parsed CRD (replacing an earlier
    /// installation of the same CRD).
    pub fn install_crd(&mut self, crd_name: &str, defs: Vec<ResourceDef>) {
        self.uninstall_crd(crd_name);
        let mut keys = Vec::new();
        for d in defs {
            keys.push((d.group.clone(), d.version.clone(), d.plural.clone()));
            self.insert(d);
        }
        self.crds.insert(crd_name.to_string(), keys);
    }

    /// Remove a CRD's definitions; returns the storage keys that were removed.
    pub fn uninstall_crd(&mut self, crd_name: &str) -> Vec<ResKey> {
        let mut removed = Vec::new();
        if let Some(keys) = self.crds.remove(crd_name) {
            for k in keys {
                if let Some(d) = self.by_gvr.remove(&k)
                    && !removed.contains(&d.key)
                {
                    removed.push(d.key.clone());
                }
            }
        }
        removed
    }
}

/// Kubernetes version ordering: GA > beta > alpha, higher numbers first.
fn version_priority(v: &str) -> (u8, u64, u64) {
    let Some(rest) = v.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let Ok(major) = digits.parse::<u64>() else {
        return (0, 0, 0);
    };
    let tail = rest.get(digits.len()..).unwrap_or_default();
    if tail.is_empty() {
        return (3, major, 0);
    }
    let (rank, num) = if let Some(n) = tail.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = tail.strip_prefix("alpha") {
        (1, n)
    } else {
        return (0, 0, 0);
    };
    match num.parse::<u64>() {
        Ok(n) => (rank, major, n),
        Err(_) => (0, 0, 0),
    }
}

/// Parse a CustomResourceDefinition (as JSON) into one [`ResourceDef`] per
/// served version.
pub(crate) fn parse_crd(crd: &Value) -> ApiResult<(String, Vec<ResourceDef>)> {
    let name = crate::util::name_of(crd).to_string();
    let invalid = |field: &str, msg: &str| {
        ApiError::new(
            422,
            "Invalid",
            format!("CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: {field}: {msg}"),
        )
        .with_details(serde_json::json!({
            "name": name, "group": CRD_GROUP, "kind": "CustomResourceDefinition",
            "causes": [{"reason": "FieldValueInvalid", "message": msg, "field": field}],
        }))
    };
    let spec = crd
        .get("spec")
        .ok_or_else(|| invalid("spec", "Required value"))?;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    let group = s(spec.get("group"));
    if group.is_empty() {
        return Err(invalid("spec.group", "Required value"));
    }
    let names = spec
        .get("names")
        .ok_or_else(|| invalid("spec.names", "Required value"))?;
    let plural = s(names.get("plural"));
    let kind = s(names.get("kind"));
    if plural.is_empty() {
        return Err(invalid("spec.names.plural", "Required value"));
    }
    if kind.is_empty() {
        return Err(invalid("spec.names.kind", "Required value"));
    }
    if name != format!("{plural}.{group}") {
        return Err(invalid(
            "metadata.name",
            &format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    let mut singular = s(names.get("singular"));
    if singular.is_empty() {
        singular = kind.to_lowercase();
    }
    let mut list_kind = s(names.get("listKind"));
    if list_kind.is_empty() {
        list_kind = format!("{kind}List");
    }
    let strs = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let short_names = strs(names.get("shortNames"));
    let categories = strs(names.get("categories"));
    let namespaced = match spec.get("scope").and_then(Value::as_str) {
        Some("Namespaced") => true,
        Some("Cluster") => false,
        _ => {
            return Err(invalid(
                "spec.scope",
                "Unsupported value: must be \"Cluster\" or \"Namespaced\"",
            ));
        }
    };
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| {
            invalid(
                "spec.versions",
                "Required value: must have exactly one version marked as storage version",
            )
        })?;
    let mut defs = Vec::new();
    for v in versions {
        let vname = s(v.get("name"));
        if vname.is_empty() {
            return Err(invalid("spec.versions[].name", "Required value"));
        }
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let sub = v.get("subresources");
        let status = sub
            .and_then(|x| x.get("status"))
            .is_some_and(|x| !x.is_null());
        let scale = match sub.and_then(|x| x.get("scale")).filter(|x| !x.is_null()) {
            None => None,
            Some(sc) => {
                let spec_p = s(sc.get("specReplicasPath"));
                let status_p = s(sc.get("statusReplicasPath"));
                if spec_p.is_empty() || status_p.is_empty() {
                    return Err(invalid(
                        "spec.versions[].subresources.scale",
                        "Required value: specReplicasPath and statusReplicasPath are required",
                    ));
                }
                let sel = s(sc.get("labelSelectorPath"));
                Some(ScaleSpec {
                    spec_replicas: parse_json_path(&spec_p),
                    status_replicas: parse_json_path(&status_p),
                    label_selector: (!sel.is_empty()).then(|| parse_json_path(&sel)),
                })
            }
        };
        defs.push(ResourceDef::build(
            &group,
            &vname,
            &plural,
            &singular,
            &kind,
            &list_kind,
            namespaced,
            short_names.clone(),
            categories.clone(),
            status,
            scale,
            false,
            true,
        ));
    }
    Ok((name, defs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_sorting() {
        let mut v = vec!["v1alpha1", "v2beta1", "v1", "v1beta1", "foo", "v2"];
        v.sort_by_key(|a| std::cmp::Reverse(version_priority(a)));
        assert_eq!(v, vec!["v2", "v1", "v2beta1", "v1beta1", "v1alpha1", "foo"]);
    }

    #[test]
    fn crd_parse() {
        let crd = serde_json::json!({
            "metadata": {"name": "things.example.com"},
            "spec": {"group": "example.com", "scope": "Cluster",
              "names": {"plural": "things", "kind": "Thing"},
              "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}}}]}
        });
        let (name, defs) = parse_crd(&crd).expect("valid");
        assert_eq!(name, "things.example.com");
        assert_eq!(defs.len(), 1);
        assert!(defs[0].status);
        assert_eq!(
            defs[0].scale.as_ref().map(|s| s.spec_replicas.clone()),
            Some(vec!["spec".to_string(), "replicas".to_string()])
        );
        let bad = serde_json::json!({"metadata": {"name": "x"}, "spec": {"group": "example.com", "scope": "Cluster", "names": {"plural": "things", "kind": "Thing"}, "versions": [{"name": "v1"}]}});
        assert_eq!(parse_crd(&bad).map(|_| ()).map_err(|e| e.code), Err(422));
    }
}
