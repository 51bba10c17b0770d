//! The wire types of the exec provider protocol, `kube-node.io/exec-provider/v1`
//! (`providers/exec/PROTOCOL.md`): the request kube-node writes to the program's stdin and the
//! response the program writes to its stdout.
//!
//! Responses are parsed leniently about what they may add (unknown fields are ignored, so a
//! program written for a later minor revision still works) and strictly about what they must
//! hold (a missing `id` or an unknown `state` is a malformed response).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use kube_node_provider::{DeleteOutcome, Instance, InstanceAddress, InstanceState, ProviderError};
use serde::{Deserialize, Serialize};

/// The protocol version sent in every request and in `KUBE_NODE_PROTOCOL_VERSION`.
pub const PROTOCOL_VERSION: &str = "v1";

/// The protocol's full name.
pub const PROTOCOL_NAME: &str = "kube-node.io/exec-provider/v1";

/// The longest `retryAfterSeconds` honoured; larger values are clamped to it.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The operation a program is invoked for; its last argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Check the configuration and credentials.
    Validate,
    /// Create the machine of a Node (idempotent on `idempotencyKey`).
    Create,
    /// Describe one machine.
    Get,
    /// List the machines of a cluster.
    List,
    /// Delete one machine.
    Delete,
}

impl Operation {
    /// The operation's name: the program's last argument and a bounded metrics/log label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validate => "validate",
            Self::Create => "create",
            Self::Get => "get",
            Self::List => "list",
            Self::Delete => "delete",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `filter` of a list request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    /// Only machines tagged `kube-node.io/cluster: <cluster>`.
    pub cluster: String,
    /// Only machines tagged `kube-node.io/node-class: <nodeClass>`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_class: Option<String>,
}

/// The JSON request written to the program's stdin. `Debug` hides `userData` (it carries a
/// bootstrap token).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    /// Always [`PROTOCOL_VERSION`].
    pub protocol_version: String,
    /// The operation, as also passed in argv.
    pub operation: Operation,
    /// The cluster name kube-node runs with.
    pub cluster_name: String,
    /// The NodeClass's name.
    pub node_class: String,
    /// `spec.provider.exec.config` (an empty object when unset).
    pub config: serde_json::Value,
    /// create: the Node's UID. Creating twice with the same key MUST yield the same machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// create: the Node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// create: the tags to put on the machine at launch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// create: the join payload (cloud-init user-data running `kubeadm join`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// get, delete: the machine's provider ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_id: Option<String>,
    /// list: which machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("operation", &self.operation)
            .field("cluster_name", &self.cluster_name)
            .field("node_class", &self.node_class)
            .field("idempotency_key", &self.idempotency_key)
            .field("node_name", &self.node_name)
            .field("provider_id", &self.provider_id)
            .field("filter", &self.filter)
            .field("user_data", &self.user_data.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// One address of a machine in a response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireAddress {
    /// `InternalIP`, `ExternalIP`, `Hostname`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The address.
    pub address: String,
}

/// A machine in a create, get or list response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireInstance {
    /// The program's own id of the machine.
    pub id: String,
    /// The Node's `spec.providerID`; SHOULD be `exec:///<zone>/<id>`.
    pub provider_id: String,
    /// `Pending`, `Running` or `Terminating`.
    pub state: String,
    /// The zone (label `topology.kubernetes.io/zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The machine type (label `node.kubernetes.io/instance-type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<WireAddress>,
    /// The tags set at launch.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Creation time, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_unix: Option<i64>,
}

impl WireInstance {
    /// The provider-neutral instance, or why this one is malformed.
    pub fn into_instance(self) -> Result<Instance, String> {
        if self.id.is_empty() {
            return Err("instance.id is empty".into());
        }
        if self.provider_id.is_empty() {
            return Err(format!("instance {:?}: providerId is empty", self.id));
        }
        let state = match self.state.as_str() {
            "Pending" => InstanceState::Pending,
            "Running" => InstanceState::Running,
            "Terminating" => InstanceState::Terminating,
            other => {
                return Err(format!(
                    "instance {:?}: state {other:?} is not Pending, Running or Terminating",
                    self.id
                ));
            }
        };
        Ok(Instance {
            id: self.id,
            provider_id: self.provider_id,
            state,
            tags: self.tags,
            zone: self.zone.filter(|z| !z.is_empty()),
            instance_type: self.instance_type.filter(|t| !t.is_empty()),
            addresses: self
                .addresses
                .into_iter()
                .map(|a| InstanceAddress {
                    kind: a.kind,
                    address: a.address,
                })
                .collect(),
            created_unix: self.created_unix,
            labels: BTreeMap::new(),
            failure: None,
        })
    }
}

/// A typed error in a response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireError {
    /// One of the provider error kinds (`NotFound`, `InsufficientCapacity`, ...).
    pub kind: String,
    /// What went wrong, for humans.
    #[serde(default)]
    pub message: String,
    /// For `Throttled`: how long to wait before retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<f64>,
}

impl WireError {
    /// The provider error this stands for. `message` is the already redacted and bounded
    /// message. An unknown kind becomes `Transient` naming the kind, so a program written for a
    /// later protocol revision is retried rather than trusted.
    pub fn into_error(&self, message: String) -> ProviderError {
        match self.kind.as_str() {
            "NotFound" => ProviderError::NotFound(message),
            "InsufficientCapacity" => ProviderError::InsufficientCapacity(message),
            "QuotaExceeded" => ProviderError::QuotaExceeded(message),
            "Throttled" => ProviderError::Throttled {
                message,
                retry_after: self.retry_after(),
            },
            "InvalidConfig" => ProviderError::InvalidConfig(message),
            "Unauthorized" => ProviderError::Unauthorized(message),
            "Transient" => ProviderError::Transient(message),
            "Unimplemented" => ProviderError::Unimplemented(message),
            other => ProviderError::Transient(format!(
                "the program reported the unknown error kind {:?} (protocol {PROTOCOL_VERSION} \
                 knows NotFound, InsufficientCapacity, QuotaExceeded, Throttled, InvalidConfig, \
                 Unauthorized, Transient, Unimplemented): {message}",
                crate::redact::head_chars(other, 64)
            )),
        }
    }

    /// `retryAfterSeconds` as a duration: finite, non-negative, at most [`MAX_RETRY_AFTER`].
    pub fn retry_after(&self) -> Option<Duration> {
        let s = self.retry_after_seconds?;
        if !s.is_finite() || s < 0.0 {
            return None;
        }
        Some(Duration::from_secs_f64(
            s.min(MAX_RETRY_AFTER.as_secs_f64()),
        ))
    }
}

/// Any response: exactly one of the fields is expected, depending on the operation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    /// create, get: the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<WireInstance>,
    /// list: the machines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<Vec<WireInstance>>,
    /// delete: `Deleting` or `Gone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<String>,
    /// Any operation: the typed error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// Parses stdout into a response object. `Err` says why it is malformed (without echoing it).
pub fn parse_response(stdout: &[u8]) -> Result<Response, String> {
    let text = std::str::from_utf8(stdout).map_err(|e| format!("stdout is not UTF-8 ({e})"))?;
    if text.trim().is_empty() {
        return Err("stdout is empty".into());
    }
    let value: serde_json::Value = serde_json::from_str(text.trim())
        .map_err(|e| format!("stdout is not one JSON document ({e})"))?;
    if !value.is_object() {
        return Err("stdout is JSON but not an object".into());
    }
    serde_json::from_value(value).map_err(|e| format!("the response object is malformed ({e})"))
}

/// A delete response's `deleted` value.
pub fn parse_deleted(deleted: &str) -> Result<DeleteOutcome, String> {
    match deleted {
        "Deleting" => Ok(DeleteOutcome::Deleting),
        "Gone" => Ok(DeleteOutcome::Gone),
        other => Err(format!(
            "deleted is {:?}, not Deleting or Gone",
            crate::redact::head_chars(other, 64)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_serializes_camel_case_and_skips_unset() {
        let r = Request {
            protocol_version: PROTOCOL_VERSION.into(),
            operation: Operation::Get,
            cluster_name: "c".into(),
            node_class: "nc".into(),
            config: serde_json::json!({}),
            idempotency_key: None,
            node_name: None,
            tags: None,
            user_data: None,
            provider_id: Some("exec:///z/m-1".into()),
            filter: None,
        };
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(
            v,
            serde_json::json!({"protocolVersion":"v1","operation":"get","clusterName":"c",
                "nodeClass":"nc","config":{},"providerId":"exec:///z/m-1"})
        );
    }

    #[test]
    fn request_debug_hides_user_data() {
        let r = Request {
            protocol_version: PROTOCOL_VERSION.into(),
            operation: Operation::Create,
            cluster_name: "c".into(),
            node_class: "nc".into(),
            config: serde_json::Value::Null,
            idempotency_key: Some("uid".into()),
            node_name: Some("n".into()),
            tags: None,
            user_data: Some("token abcdef.0123456789abcdef".into()),
            provider_id: None,
            filter: None,
        };
        assert!(!format!("{r:?}").contains("abcdef"));
    }

    #[test]
    fn parses_instances_and_rejects_bad_state() {
        let r = parse_response(
            br#"{"instance":{"id":"m-1","providerId":"exec:///z/m-1","state":"Running",
                "addresses":[{"type":"InternalIP","address":"10.0.0.1"}],"extra":1}}"#,
        )
        .expect("parses");
        let i = r
            .instance
            .expect("instance")
            .into_instance()
            .expect("valid");
        assert_eq!(i.state, InstanceState::Running);
        assert_eq!(i.addresses[0].kind, "InternalIP");
        let bad = WireInstance {
            id: "m".into(),
            provider_id: "p".into(),
            state: "Exploded".into(),
            zone: None,
            instance_type: None,
            addresses: vec![],
            tags: BTreeMap::new(),
            created_unix: None,
        };
        assert!(
            bad.into_instance()
                .expect_err("malformed")
                .contains("Exploded")
        );
    }

    #[test]
    fn malformed_stdout_is_described() {
        assert!(
            parse_response(b"")
                .expect_err("malformed")
                .contains("empty")
        );
        assert!(
            parse_response(b"hello")
                .expect_err("malformed")
                .contains("JSON")
        );
        assert!(
            parse_response(b"{} {}")
                .expect_err("malformed")
                .contains("one JSON")
        );
        assert!(
            parse_response(b"[1]")
                .expect_err("malformed")
                .contains("not an object")
        );
        assert!(
            parse_response(&[0xff, 0xfe])
                .expect_err("malformed")
                .contains("UTF-8")
        );
        assert!(
            parse_response(br#"{"instance":{"id":1}}"#)
                .expect_err("malformed")
                .contains("malformed")
        );
        assert_eq!(parse_response(b" {}\n").expect("ok"), Response::default());
    }

    #[test]
    fn error_kinds_map_to_provider_errors() {
        let e = |kind: &str, retry: Option<f64>| WireError {
            kind: kind.into(),
            message: "m".into(),
            retry_after_seconds: retry,
        };
        for kind in [
            "NotFound",
            "InsufficientCapacity",
            "QuotaExceeded",
            "Throttled",
            "InvalidConfig",
            "Unauthorized",
            "Transient",
            "Unimplemented",
        ] {
            assert_eq!(e(kind, None).into_error("m".into()).reason(), kind);
        }
        let unknown = e("Exploded", None).into_error("m".into());
        assert_eq!(unknown.reason(), "Transient");
        assert!(unknown.message().contains("\"Exploded\""));
        assert_eq!(
            e("Throttled", Some(2.5))
                .into_error("m".into())
                .retry_after(),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(e("Throttled", Some(-1.0)).retry_after(), None);
        assert_eq!(
            e("Throttled", Some(1e12)).retry_after(),
            Some(MAX_RETRY_AFTER)
        );
    }

    #[test]
    fn deleted_values() {
        assert_eq!(parse_deleted("Gone"), Ok(DeleteOutcome::Gone));
        assert_eq!(parse_deleted("Deleting"), Ok(DeleteOutcome::Deleting));
        assert!(parse_deleted("gone").is_err());
    }
}
