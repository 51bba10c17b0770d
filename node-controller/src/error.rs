use std::time::Duration;

use kube_node_provider::ProviderError;
use kube_node_runtime::Backoff;

/// Why a reconcile failed. Messages never carry credentials or bootstrap tokens.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A provider call failed.
    #[error("{0}")]
    Provider(#[from] ProviderError),
    /// The Node names a NodeClass that does not exist.
    #[error("NodeClass {0:?} not found")]
    NodeClassNotFound(String),
    /// The NodeClass is being deleted: no new machine is made from it (existing ones are
    /// still deleted through it).
    #[error("NodeClass {0:?} is being deleted: no new machine is made from it")]
    NodeClassDeleting(String),
    /// The API server refused (422) a write of this Node with the labels and taints it still
    /// wants; not tried again until they change (or a long while passed).
    #[error("the API server refused a write of this Node: {0}")]
    WriteRefused(String),
    /// The Node's NodeClass exists but cannot be used: it does not decode or validate.
    #[error("NodeClass {name:?} is invalid: {message}")]
    NodeClassInvalid {
        /// The NodeClass.
        name: String,
        /// The invalid fields.
        message: String,
    },
    /// The NodeClass exists but its provider rejected its configuration or credentials.
    #[error("NodeClass {name:?} is not ready: {message}")]
    NodeClassNotReady {
        /// The NodeClass.
        name: String,
        /// Its Ready condition's message.
        message: String,
    },
    /// The credentials Secret of a NodeClass does not exist.
    #[error("credentials Secret {namespace}/{name} not found")]
    CredentialsNotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The inventory ConfigMap of a bare-metal NodeClass does not exist.
    #[error("inventory ConfigMap {namespace}/{name} not found")]
    InventoryNotFound {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The cluster CA ConfigMap is missing or unusable.
    #[error("cluster CA: {0}")]
    CaCertificate(String),
    /// No API server endpoint to join (neither the NodeClass nor the controller has one).
    #[error("no API server endpoint: set spec.bootstrap.apiServerEndpoint on the NodeClass")]
    NoApiServerEndpoint,
    /// The key bootstrap tokens are derived from cannot be read or made (its Secret in
    /// kube-node's namespace is malformed, or kube-node may not read or create it).
    #[error("bootstrap token key: {0}")]
    TokenKey(String),
    /// The Node object is unusable (no name or UID).
    #[error("invalid Node: {0}")]
    InvalidNode(String),
    /// Rendering the join payload failed.
    #[error("rendering the join payload: {0}")]
    Render(String),
}

/// What the API server says, with 422, when it could not apply a JSON patch: a `test`
/// operation failed because the object changed since it was read, or a path the patch names is
/// gone (the details go into the status's causes, which kube does not surface). A value the
/// API server refuses gets `<Kind> "<name>" is invalid: <field>: ...` instead. The first is a
/// conflict, to be retried with a fresh read; only the second is permanent for its input.
const PATCH_NOT_APPLICABLE: &str = "the server rejected our request due to an error in our request";

/// Whether the API server answered that the object changed under a guarded write: 409, or a
/// JSON patch whose `test` no longer holds (422 with [`PATCH_NOT_APPLICABLE`]).
pub(crate) fn is_conflict(s: &kube::core::Status) -> bool {
    s.code == 409 || (s.code == 422 && s.message.starts_with(PATCH_NOT_APPLICABLE))
}

/// Whether the API server refused a value of the write as invalid (422, not a failed
/// JSON-patch test): the same input is refused again.
pub(crate) fn is_refused(s: &kube::core::Status) -> bool {
    s.code == 422 && !is_conflict(s)
}

impl Error {
    /// PascalCase reason for conditions, events and metrics labels (bounded set).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) if is_conflict(s) => "Conflict",
            Self::Kube(kube::Error::Api(s)) if is_refused(s) => "Invalid",
            Self::Kube(_) => "KubeApiError",
            Self::Provider(e) => e.reason(),
            Self::NodeClassNotFound(_) => "NodeClassNotFound",
            Self::NodeClassInvalid { .. } => "NodeClassInvalid",
            Self::WriteRefused(_) => "Invalid",
            Self::NodeClassNotReady { .. } => "NodeClassNotReady",
            Self::NodeClassDeleting(_) => "NodeClassDeleting",
            Self::CredentialsNotFound { .. } => "CredentialsNotFound",
            Self::InventoryNotFound { .. } => "InventoryNotFound",
            Self::CaCertificate(_) => "CaCertificateNotFound",
            Self::NoApiServerEndpoint => "NoApiServerEndpoint",
            Self::InvalidNode(_) => "InvalidNode",
            Self::Render(_) => "RenderFailed",
            Self::TokenKey(_) => "TokenKeyUnavailable",
        }
    }

    /// Whether only a change (of the NodeClass, its Secret, the Node) can fix this, so the
    /// controller waits for that change rather than retrying soon.
    pub fn needs_change(&self) -> bool {
        match self {
            Self::Provider(e) => matches!(
                e,
                ProviderError::InvalidConfig(_) | ProviderError::Unauthorized(_)
            ),
            // The API server refused the write as invalid: the same input is refused again.
            Self::Kube(kube::Error::Api(s)) => is_refused(s),
            Self::NodeClassNotFound(_)
            | Self::NodeClassDeleting(_)
            | Self::NodeClassInvalid { .. }
            | Self::WriteRefused(_)
            | Self::NodeClassNotReady { .. }
            | Self::CredentialsNotFound { .. }
            | Self::InventoryNotFound { .. }
            | Self::NoApiServerEndpoint
            | Self::InvalidNode(_) => true,
            _ => false,
        }
    }

    /// The wait the cloud asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Provider(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// How long a reconcile waits after an error that only a change can fix. The NodeClass watch
/// re-triggers the Node as soon as its class changes; this is only a safety net.
pub const WAIT_FOR_CHANGE: Duration = Duration::from_secs(10 * 60);

/// What to do after a failed reconcile.
pub fn error_delay(err: &Error, attempt: u32, backoff: &Backoff) -> Duration {
    if err.needs_change() {
        WAIT_FOR_CHANGE
    } else {
        backoff.delay(attempt, err.retry_after())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_respects_retry_after() {
        let b = Backoff::default();
        assert_eq!(
            b.delay(0, Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            b.delay(9, Some(Duration::from_secs(30))),
            Duration::from_secs(300)
        );
        let throttled = Error::Provider(ProviderError::Throttled {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(20)),
        });
        assert_eq!(error_delay(&throttled, 0, &b), Duration::from_secs(20));
    }

    #[test]
    fn config_errors_wait_for_change() {
        let b = Backoff::default();
        for e in [
            Error::Provider(ProviderError::InvalidConfig("x".into())),
            Error::Provider(ProviderError::Unauthorized("x".into())),
            Error::NodeClassNotFound("c".into()),
            Error::NodeClassInvalid {
                name: "c".into(),
                message: "spec.labels: bad".into(),
            },
            Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
                code: 422,
                message: "Node \"n\" is invalid: metadata.labels: Invalid value".into(),
                ..Default::default()
            }))),
        ] {
            assert_eq!(error_delay(&e, 0, &b), WAIT_FOR_CHANGE, "{e}");
        }
        let transient = Error::Provider(ProviderError::Transient("x".into()));
        let unavailable = Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code: 503,
            ..Default::default()
        })));
        assert_eq!(error_delay(&unavailable, 0, &b), Duration::from_secs(1));
        assert_eq!(error_delay(&transient, 0, &b), Duration::from_secs(1));
        assert_eq!(transient.reason(), "Transient");
    }

    #[test]
    fn a_failed_patch_test_is_a_conflict_not_a_refusal() {
        let status = |message: &str| {
            Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
                code: 422,
                message: message.into(),
                ..Default::default()
            })))
        };
        // A real API server's answer to a JSON patch whose `test` failed.
        let changed = status("the server rejected our request due to an error in our request");
        assert_eq!(changed.reason(), "Conflict");
        assert!(!changed.needs_change());
        let b = Backoff::default();
        assert_ne!(error_delay(&changed, 0, &b), WAIT_FOR_CHANGE);
        // A refused value stays permanent for its input.
        let refused = status("Node \"n\" is invalid: metadata.labels: Invalid value: \"bad key!\"");
        assert_eq!(refused.reason(), "Invalid");
        assert!(refused.needs_change());
    }
}
