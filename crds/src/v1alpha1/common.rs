use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A taint kube-node puts on a Node. A kubelet that joins a Node object which already exists
/// ignores its own `--register-with-taints`, so kube-node applies these itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTaint {
    /// The taint key, a qualified name such as `dedicated` or `example.com/gpu`.
    #[schemars(length(min = 1, max = 316))]
    pub key: String,
    /// The taint value (optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
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
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Schema of a label map as the API server knows it: values are at most 63 characters. The
/// bounds also keep the CEL rules that compare labels within the API server's cost budget.
pub(crate) fn label_map_schema(
    max: u32,
) -> impl Fn(&mut schemars::SchemaGenerator) -> schemars::Schema {
    move |_| {
        schemars::json_schema!({
            "type": "object",
            "maxProperties": max,
            "additionalProperties": {"type": "string", "maxLength": 63}
        })
    }
}

pub(crate) fn labels_16(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    label_map_schema(16)(g)
}

pub(crate) fn labels_32(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    label_map_schema(32)(g)
}
