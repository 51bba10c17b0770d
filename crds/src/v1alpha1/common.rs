use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A taint kube-node puts on a Node. A kubelet that joins a Node object which already exists
/// ignores its own `--register-with-taints`, so kube-node applies these itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTaint {
    /// The taint key, a qualified name such as `dedicated` or `example.com/gpu`.
    #[schemars(schema_with = "crate::validation::qualified_name")]
    pub key: String,
    /// The taint value (optional): at most 63 letters, digits, `-`, `_` and `.`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::validation::label_value")]
    pub value: Option<String>,
    /// The effect on pods that do not tolerate the taint.
    pub effect: TaintEffect,
}

/// The effect of a taint, as in core v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TaintEffect {
    /// Do not schedule new pods that do not tolerate the taint.
    NoSchedule,
    /// Try not to schedule pods that do not tolerate the taint.
    PreferNoSchedule,
    /// Evict running pods that do not tolerate the taint.
    NoExecute,
}

impl TaintEffect {
    /// The effect as core v1 spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSchedule => "NoSchedule",
            Self::PreferNoSchedule => "PreferNoSchedule",
            Self::NoExecute => "NoExecute",
        }
    }
}

impl NodeTaint {
    /// The core v1 form of this taint.
    pub fn to_core(&self) -> k8s_openapi::api::core::v1::Taint {
        k8s_openapi::api::core::v1::Taint {
            key: self.key.clone(),
            value: self.value.clone(),
            effect: self.effect.as_str().to_string(),
            time_added: None,
        }
    }
}

/// A reference to a Secret in a given namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// The Secret's namespace.
    #[schemars(schema_with = "crate::validation::dns1123_label")]
    pub namespace: String,
    /// The Secret's name.
    #[schemars(schema_with = "crate::validation::dns1123_subdomain")]
    pub name: String,
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

impl NodeTaint {
    /// Checks the taint as the API server would check it on a Node.
    pub(crate) fn check(&self, field: &str, errors: &mut crate::validation::Errors) {
        use crate::validation::{check_label_value, check_qualified_name};
        errors.check(format_args!("{field}.key"), check_qualified_name(&self.key));
        if let Some(v) = &self.value {
            errors.check(format_args!("{field}.value"), check_label_value(v));
        }
    }
}

/// Checks every key and value of a label map.
pub(crate) fn check_labels<'a>(
    field: &str,
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    errors: &mut crate::validation::Errors,
) {
    use crate::validation::{check_label_value, check_qualified_name};
    for (k, v) in labels {
        let f = format!("{field}[{:?}]", super::nodeclass::short(k));
        errors.check(&f, check_qualified_name(k));
        errors.check(&f, check_label_value(v));
    }
}
