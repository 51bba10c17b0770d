//! Google Cloud errors → [`ProviderError`]: one pure table ([`classify`], and
//! [`classify_operation`] for errors inside a finished operation), plus the glue from the
//! client library's error type.

use std::time::Duration;

use google_cloud_gax::error::Error as GaxError;
use google_cloud_gax::error::rpc::StatusDetails;
use kube_node_provider::ProviderError;

use crate::calls::Api;

/// What a failed call said, in plain strings: the HTTP status, the canonical status name
/// (`PERMISSION_DENIED`), the machine-readable reasons (`ErrorInfo.reason`, Compute's
/// `errors[].reason`), the message, and the wait a 429 asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Failure {
    /// The HTTP status code.
    pub http: Option<u16>,
    /// The canonical status name, e.g. `FAILED_PRECONDITION`.
    pub status: Option<String>,
    /// The reasons the error names, e.g. `IAM_PERMISSION_DENIED`, `rateLimitExceeded`.
    pub reasons: Vec<String>,
    /// The permission an `IAM_PERMISSION_DENIED` names, when it does.
    pub permission: Option<String>,
    /// The human-readable message (cut to a bounded length).
    pub message: String,
    /// The `Retry-After` of the response.
    pub retry_after: Option<Duration>,
}

/// The longest cloud message kept in an error (they end up in events and conditions).
const MAX_MESSAGE: usize = 300;

fn cut(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn has_reason(f: &Failure, wanted: &[&str]) -> bool {
    f.reasons
        .iter()
        .any(|r| wanted.iter().any(|w| r.eq_ignore_ascii_case(w)))
}

/// Maps a failed call of `api` to the contract's error kinds.
///
/// Pure, so the whole table is unit-tested. Order matters: a resource quota error is a 403
/// (reason `QUOTA_EXCEEDED`), so quota is looked at before permission; a request rate limit
/// is a 429 whose message speaks of a "quota metric", so its reason is looked at first.
pub fn classify(api: Api, f: &Failure) -> ProviderError {
    let status = f.status.as_deref().unwrap_or("");
    let lower = f.message.to_ascii_lowercase();
    let text = format!("{}: {}", api.method, cut(&f.message));
    // API request rate limits are worded as "Quota exceeded for quota metric 'Read
    // requests'" but are rate limits: look at the reason before the words.
    let rate_limited = has_reason(
        f,
        &[
            "RATE_LIMIT_EXCEEDED",
            "rateLimitExceeded",
            "userRateLimitExceeded",
        ],
    );
    if !rate_limited
        && (has_reason(f, &["QUOTA_EXCEEDED", "quotaExceeded"])
            || (lower.contains("quota") && f.http != Some(429)))
    {
        return ProviderError::QuotaExceeded(text);
    }
    if rate_limited || f.http == Some(429) || status == "RESOURCE_EXHAUSTED" {
        return ProviderError::Throttled {
            message: text,
            retry_after: f.retry_after,
        };
    }
    // Another operation holds the pool or the group (a GKE upgrade, an earlier resize):
    // retried later, unchanged.
    if f.http == Some(409)
        || status == "ABORTED"
        || has_reason(f, &["resourceNotReady", "RESOURCE_NOT_READY"])
        || ((f.http == Some(400) || status == "FAILED_PRECONDITION")
            && (lower.contains("in progress")
                || lower.contains("incompatible operation")
                || lower.contains("is not ready")
                || lower.contains("currently")))
    {
        return ProviderError::Throttled {
            message: format!("{text} (another operation is in progress; retried)"),
            retry_after: f.retry_after,
        };
    }
    if f.http == Some(401) || status == "UNAUTHENTICATED" {
        return ProviderError::Unauthorized(format!(
            "{}: the credentials were rejected: {}",
            api.method,
            cut(&f.message)
        ));
    }
    if f.http == Some(403) || status == "PERMISSION_DENIED" {
        let permission = f.permission.as_deref().unwrap_or(api.permission);
        return ProviderError::Unauthorized(format!(
            "{}: permission {permission} is missing: {}",
            api.method,
            cut(&f.message)
        ));
    }
    if f.http == Some(404) || status == "NOT_FOUND" {
        return ProviderError::NotFound(text);
    }
    if f.http == Some(400) || matches!(status, "INVALID_ARGUMENT" | "FAILED_PRECONDITION") {
        return ProviderError::InvalidConfig(format!("spec.provider.gke: {text}"));
    }
    ProviderError::Transient(text)
}

/// Maps the error of a finished operation (`Operation.error.errors[].code`, and its
/// `httpErrorStatusCode`) to the contract's error kinds.
pub fn classify_operation(api: Api, code: &str, message: &str, http: Option<u16>) -> ProviderError {
    let text = format!("{} operation failed: {code}: {}", api.method, cut(message));
    match code {
        "QUOTA_EXCEEDED" => ProviderError::QuotaExceeded(text),
        c if c.starts_with("ZONE_RESOURCE_POOL_EXHAUSTED") || c == "RESOURCE_POOL_EXHAUSTED" => {
            ProviderError::InsufficientCapacity(text)
        }
        "RESOURCE_NOT_READY" | "RESOURCE_OPERATION_RATE_EXCEEDED" | "RATE_LIMIT_EXCEEDED" => {
            ProviderError::Throttled {
                message: text,
                retry_after: None,
            }
        }
        _ => classify(
            api,
            &Failure {
                http,
                reasons: vec![code.to_string()],
                message: format!("{code}: {message}"),
                ..Failure::default()
            },
        ),
    }
}

/// Maps one error of a managed instance's last creation attempt
/// (`listManagedInstances` → `lastAttempt.errors.errors[]`, its `code` and `message`) to the
/// contract's error kinds: the machine was accepted (the group's target size counts it) but
/// Compute Engine could not make it, and the group keeps retrying. Quota codes are
/// `QuotaExceeded`; a zone out of resources (`ZONE_RESOURCE_POOL_EXHAUSTED*`,
/// `RESOURCE_POOL_EXHAUSTED`, a stockout) is `InsufficientCapacity`; a missing permission of
/// the group's service account is `Unauthorized`; anything else is `Transient` (the group
/// retries it) with the code and message. The message names the machine and zone, and
/// Compute Engine's message cut to a bounded length; nothing of the credentials.
pub fn classify_creation(machine: &str, zone: &str, code: &str, message: &str) -> ProviderError {
    let upper = code.to_ascii_uppercase();
    let text = format!(
        "creating machine {machine} in zone {zone} failed: {code}: {} (its instance group keeps retrying)",
        cut(message)
    );
    if upper.contains("QUOTA") {
        ProviderError::QuotaExceeded(text)
    } else if upper.starts_with("ZONE_RESOURCE_POOL_EXHAUSTED")
        || upper == "RESOURCE_POOL_EXHAUSTED"
        || upper.contains("STOCKOUT")
    {
        ProviderError::InsufficientCapacity(text)
    } else if upper == "PERMISSIONS_ERROR" || upper == "PERMISSION_DENIED" {
        ProviderError::Unauthorized(text)
    } else {
        ProviderError::Transient(text)
    }
}

/// Reads the client library's error into a [`Failure`].
pub fn failure(e: &GaxError) -> Failure {
    let mut f = Failure {
        http: e.http_status_code(),
        retry_after: e
            .http_headers()
            .and_then(|h| h.get("retry-after"))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs),
        ..Failure::default()
    };
    if let Some(s) = e.status() {
        f.status = Some(s.code.name().to_string());
        f.message = s.message.clone();
        for d in &s.details {
            if let StatusDetails::ErrorInfo(info) = d {
                f.reasons.push(info.reason.clone());
                if let Some(p) = info.metadata.get("permission") {
                    f.permission = Some(p.clone());
                }
            }
        }
    }
    // A body the library could not read as a Status: Compute's legacy
    // `{"error": {"code", "message", "errors": [{"reason", "message"}]}}`.
    if let Some(body) = e.http_payload()
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
    {
        let err = &v["error"];
        if f.message.is_empty()
            && let Some(m) = err["message"].as_str()
        {
            f.message = m.to_string();
        }
        if let Some(list) = err["errors"].as_array() {
            f.reasons.extend(
                list.iter()
                    .filter_map(|x| x["reason"].as_str())
                    .map(str::to_string),
            );
        }
    }
    if f.message.is_empty() {
        f.message = if e.is_timeout() {
            "the call timed out".into()
        } else if e.is_connect() || e.is_io() || e.is_transport() {
            "the API could not be reached".into()
        } else if f.http.is_some() {
            "the API answered with an error".into()
        } else {
            "the call failed".into()
        };
    }
    f
}

/// The contract's error for a failed call of `api`.
pub fn from_gax(api: Api, e: &GaxError) -> ProviderError {
    if e.is_authentication() {
        // The credentials could not produce a token. The library's message can quote the
        // credentials file's path but never its contents; it is still left out.
        let transient = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<google_cloud_gax::error::CredentialsError>())
            .is_some_and(|c| c.is_transient());
        let msg = format!(
            "{}: the Google credentials (the service-account key of the credentials Secret, or Application Default Credentials when none is named) could not produce an access token",
            api.method
        );
        return if transient {
            ProviderError::Transient(msg)
        } else {
            ProviderError::Unauthorized(msg)
        };
    }
    classify(api, &failure(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calls;

    fn f(http: u16, status: &str, reasons: &[&str], message: &str) -> Failure {
        Failure {
            http: Some(http),
            status: (!status.is_empty()).then(|| status.to_string()),
            reasons: reasons.iter().map(|r| r.to_string()).collect(),
            message: message.into(),
            ..Failure::default()
        }
    }

    #[test]
    fn the_table() {
        let api = calls::RESIZE_MIG;
        let cases: &[(Failure, &str)] = &[
            (
                f(
                    403,
                    "PERMISSION_DENIED",
                    &["QUOTA_EXCEEDED"],
                    "Quota 'CPUS' exceeded. Limit: 24.0 in region europe-west1.",
                ),
                "QuotaExceeded",
            ),
            (
                f(
                    429,
                    "RESOURCE_EXHAUSTED",
                    &["RATE_LIMIT_EXCEEDED"],
                    "Rate Limit Exceeded",
                ),
                "Throttled",
            ),
            (
                f(403, "", &["rateLimitExceeded"], "Rate Limit Exceeded"),
                "Throttled",
            ),
            (
                f(
                    400,
                    "FAILED_PRECONDITION",
                    &[],
                    "Operation operation-123 is currently upgrading node pool \"pool-1\". Please wait and try again once it is done.",
                ),
                "Throttled",
            ),
            (
                f(
                    400,
                    "FAILED_PRECONDITION",
                    &[],
                    "Cluster is running incompatible operation operation-1.",
                ),
                "Throttled",
            ),
            (
                f(409, "ABORTED", &[], "Operation already in progress"),
                "Throttled",
            ),
            (
                f(
                    400,
                    "",
                    &["resourceNotReady"],
                    "The resource 'projects/p/zones/z/instanceGroupManagers/g' is not ready",
                ),
                "Throttled",
            ),
            (
                f(
                    401,
                    "UNAUTHENTICATED",
                    &[],
                    "Request had invalid authentication credentials.",
                ),
                "Unauthorized",
            ),
            (
                f(
                    403,
                    "PERMISSION_DENIED",
                    &["IAM_PERMISSION_DENIED"],
                    "Permission denied",
                ),
                "Unauthorized",
            ),
            (
                f(
                    404,
                    "NOT_FOUND",
                    &[],
                    "Not found: projects/p/locations/l/clusters/c/nodePools/x.",
                ),
                "NotFound",
            ),
            (
                f(
                    400,
                    "INVALID_ARGUMENT",
                    &[],
                    "Invalid value for field 'size': '-1'.",
                ),
                "InvalidConfig",
            ),
            (f(500, "INTERNAL", &[], "Internal error"), "Transient"),
            (
                f(
                    503,
                    "UNAVAILABLE",
                    &[],
                    "The service is currently unavailable.",
                ),
                "Transient",
            ),
        ];
        for (failure, want) in cases {
            let e = classify(api, failure);
            assert_eq!(e.reason(), *want, "{failure:?} → {e}");
            assert!(e.message().contains(api.method), "{e}");
        }
    }

    #[test]
    fn a_denied_permission_is_named() {
        let mut denied = f(
            403,
            "PERMISSION_DENIED",
            &["IAM_PERMISSION_DENIED"],
            "denied",
        );
        let e = classify(calls::GET_NODE_POOL, &denied);
        assert!(e.message().contains("container.clusters.get"), "{e}");
        denied.permission = Some("container.clusters.get".into());
        let e = classify(calls::DELETE_INSTANCES, &denied);
        assert!(
            e.message().contains("permission container.clusters.get"),
            "{e}"
        );
    }

    #[test]
    fn a_429_keeps_its_retry_after_and_long_messages_are_cut() {
        let mut t = f(429, "", &[], &"x".repeat(5000));
        t.retry_after = Some(Duration::from_secs(7));
        let e = classify(calls::GET_MIG, &t);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(e.message().len() < 400, "{}", e.message().len());
    }

    #[test]
    fn operation_errors() {
        let api = calls::RESIZE_MIG;
        for (code, want) in [
            ("QUOTA_EXCEEDED", "QuotaExceeded"),
            ("ZONE_RESOURCE_POOL_EXHAUSTED", "InsufficientCapacity"),
            (
                "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                "InsufficientCapacity",
            ),
            ("RESOURCE_NOT_READY", "Throttled"),
            ("RESOURCE_NOT_FOUND", "Transient"),
            ("INTERNAL_ERROR", "Transient"),
        ] {
            assert_eq!(
                classify_operation(api, code, "m", None).reason(),
                want,
                "{code}"
            );
        }
        assert_eq!(
            classify_operation(api, "PERMISSIONS_ERROR", "m", Some(403)).reason(),
            "Unauthorized"
        );
    }

    #[test]
    fn creation_errors() {
        for (code, want) in [
            ("QUOTA_EXCEEDED", "QuotaExceeded"),
            ("REGIONAL_QUOTA_EXCEEDED", "QuotaExceeded"),
            ("ZONE_RESOURCE_POOL_EXHAUSTED", "InsufficientCapacity"),
            (
                "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
                "InsufficientCapacity",
            ),
            ("RESOURCE_POOL_EXHAUSTED", "InsufficientCapacity"),
            ("GCE_STOCKOUT", "InsufficientCapacity"),
            ("PERMISSIONS_ERROR", "Unauthorized"),
            ("CONDITION_NOT_MET", "Transient"),
            ("INTERNAL_ERROR", "Transient"),
        ] {
            let e = classify_creation("gke-m-1", "europe-west1-b", code, "why");
            assert_eq!(e.reason(), want, "{code}");
            for part in ["gke-m-1", "europe-west1-b", code, "why"] {
                assert!(e.message().contains(part), "{part}: {e}");
            }
        }
        let long = classify_creation("m", "z", "INTERNAL_ERROR", &"x".repeat(5000));
        assert!(long.message().len() < 450, "{}", long.message().len());
    }
}
