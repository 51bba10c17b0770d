//! Errors: the public [`Error`] type and the internal [`ApiError`] that is
//! rendered as a Kubernetes `Status` body.

use serde_json::{Value, json};

use crate::resources::ResourceDef;

/// Errors returned by the public (non-HTTP) API of [`crate::EmbeddedApi`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server rejected the request, with the same code/reason/message an
    /// HTTP client would have seen in the `Status` body.
    #[error("{reason} ({code}): {message}")]
    Rejected {
        /// HTTP status code, e.g. 422.
        code: u16,
        /// Machine readable reason, e.g. `Invalid`.
        reason: String,
        /// Human readable message.
        message: String,
    },
    /// The object could not be serialized to JSON.
    #[error("serialization failed: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Binding or serving the HTTP listener failed.
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Self {
        Error::Rejected {
            code: e.code,
            reason: e.reason,
            message: e.message,
        }
    }
}

/// An API error, rendered as a `meta/v1 Status` with `status: Failure`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: String,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let (Some(d), Some(obj)) = (&self.details, v.as_object_mut()) {
            obj.insert("details".into(), d.clone());
        }
        v
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", msg)
    }

    pub fn not_found_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    pub fn not_found(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", def.qualified_plural(), name),
        )
        .with_details(json!({"name": name, "group": def.group, "kind": def.plural}))
    }

    pub fn already_exists(def: &ResourceDef, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", def.qualified_plural(), name),
        )
        .with_details(json!({"name": name, "group": def.group, "kind": def.plural}))
    }

    pub fn conflict(def: &ResourceDef, name: &str) -> Self {
        Self::conflict_msg(
            def,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub fn conflict_msg(def: &ResourceDef, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": {}",
                def.qualified_plural(),
                name,
                why
            ),
        )
        .with_details(json!({"name": name, "group": def.group, "kind": def.plural}))
    }

    /// 422 Invalid with a single field cause. `cause_reason` is e.g. `FieldValueForbidden`
    /// and `detail` the text after the field path, e.g. `Forbidden: ...`.
    pub fn invalid(
        def: &ResourceDef,
        name: &str,
        field: &str,
        cause_reason: &str,
        detail: &str,
    ) -> Self {
        Self::new(
            422,
            "Invalid",
            format!(
                "{} \"{}\" is invalid: {}: {}",
                def.kind, name, field, detail
            ),
        )
        .with_details(json!({
            "name": name,
            "group": def.group,
            "kind": def.kind,
            "causes": [{"reason": cause_reason, "message": detail, "field": field}],
        }))
    }

    pub fn unprocessable(msg: impl Into<String>) -> Self {
        Self::new(422, "Invalid", msg)
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
        .with_details(json!({}))
    }

    pub fn unsupported_media_type(ct: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml \
                 (got {ct:?})"
            ),
        )
    }

    pub fn expired(msg: impl Into<String>) -> Self {
        Self::new(410, "Expired", msg)
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(500, "InternalError", msg)
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
