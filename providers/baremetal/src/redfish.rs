//! A small typed Redfish client: the few resources and actions the backend needs, over the
//! hyper client the workspace already uses, with basic auth. Systems are found by following
//! `@odata.id` links from the service root, never by guessing paths; the reset action's URL is
//! the one the system advertises.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// A Redfish call that failed, before it is read in the context of a host.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RedfishError {
    /// No answer (connection refused, TLS failure, timeout).
    #[error("no answer: {0}")]
    Unreachable(String),
    /// An HTTP error status.
    #[error("HTTP {status}")]
    Status {
        /// The status code.
        status: u16,
        /// `Retry-After` in seconds, when sent.
        retry_after: Option<u64>,
    },
    /// The answer was not the JSON expected.
    #[error("unexpected answer: {0}")]
    Decode(String),
}

/// `PowerState` of a ComputerSystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerState {
    /// On.
    On,
    /// Off.
    Off,
    /// Powering on.
    PoweringOn,
    /// Powering off.
    PoweringOff,
    /// Not reported or another value.
    Unknown,
}

impl PowerState {
    fn parse(s: Option<&str>) -> Self {
        match s {
            Some("On") => Self::On,
            Some("Off") => Self::Off,
            Some("PoweringOn") => Self::PoweringOn,
            Some("PoweringOff") => Self::PoweringOff,
            _ => Self::Unknown,
        }
    }
}

/// The parts of a ComputerSystem the backend reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct System {
    /// Its absolute URL.
    pub url: String,
    /// Its power state.
    pub power: PowerState,
    /// The target of `#ComputerSystem.Reset` (absolute URL).
    pub reset_target: String,
    /// The reset types the BMC allows, when it says.
    pub reset_types: Vec<String>,
}

#[derive(Deserialize)]
struct Link {
    #[serde(rename = "@odata.id")]
    id: String,
}

#[derive(Deserialize)]
struct Root {
    #[serde(rename = "Systems")]
    systems: Option<Link>,
}

#[derive(Deserialize)]
struct Collection {
    #[serde(rename = "Members", default)]
    members: Vec<Link>,
}

#[derive(Deserialize)]
struct RawSystem {
    #[serde(rename = "@odata.id")]
    id: Option<String>,
    #[serde(rename = "PowerState")]
    power_state: Option<String>,
    #[serde(rename = "Actions")]
    actions: Option<serde_json::Value>,
}

/// Counts of requests, for the figures (Redfish requests per host lifecycle).
#[derive(Debug, Default)]
pub struct Counters {
    /// Every HTTP request sent.
    pub requests: AtomicU64,
}

/// A Redfish client for one BMC login. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    auth: Arc<String>,
    timeout: Duration,
    counters: Arc<Counters>,
}

impl Client {
    /// A client with this login; `tls` verifies the BMCs' certificates.
    pub fn new(
        tls: rustls::ClientConfig,
        username: &str,
        password: &str,
        counters: Arc<Counters>,
    ) -> Self {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        Self {
            http,
            auth: Arc::new(format!("Basic {token}")),
            timeout: Duration::from_secs(20),
            counters,
        }
    }

    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, RedfishError> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header(header::AUTHORIZATION, self.auth.as_str())
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| RedfishError::Decode(format!("bad URL: {e}")))?;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let fut = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| RedfishError::Unreachable(error_chain(&e)))?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| RedfishError::Unreachable(e.to_string()))?
                .to_bytes();
            if status.is_success() {
                Ok(body)
            } else {
                Err(RedfishError::Status {
                    status: status.as_u16(),
                    retry_after,
                })
            }
        };
        tokio::time::timeout(self.timeout, fut).await.map_err(|_| {
            RedfishError::Unreachable(format!("no answer within {:?}", self.timeout))
        })?
    }

    async fn get_json<T: for<'de> Deserialize<'de>>(&self, url: &str) -> Result<T, RedfishError> {
        let body = self.call(Method::GET, url, None).await?;
        serde_json::from_slice(&body).map_err(|e| RedfishError::Decode(e.to_string()))
    }

    /// The ComputerSystem behind `url`: the URL itself when it names a system, else (a BMC's
    /// root) the one member of its Systems collection.
    pub async fn resolve_system(&self, url: &str) -> Result<System, RedfishError> {
        let url = url.trim_end_matches('/');
        let (origin, path) = split_origin(url);
        if path.contains("/Systems/") {
            return self.system(url).await;
        }
        let root: Root = self.get_json(&format!("{origin}/redfish/v1/")).await?;
        let systems = root
            .systems
            .ok_or_else(|| RedfishError::Decode("the service root has no Systems".into()))?;
        let coll: Collection = self.get_json(&absolute(origin, &systems.id)).await?;
        match coll.members.as_slice() {
            [one] => self.system(&absolute(origin, &one.id)).await,
            [] => Err(RedfishError::Status {
                status: 404,
                retry_after: None,
            }),
            many => Err(RedfishError::Decode(format!(
                "the BMC has {} systems; name one in redfishUrl",
                many.len()
            ))),
        }
    }

    /// Reads a ComputerSystem.
    pub async fn system(&self, url: &str) -> Result<System, RedfishError> {
        let raw: RawSystem = self.get_json(url).await?;
        let (origin, _) = split_origin(url);
        let reset = raw
            .actions
            .as_ref()
            .and_then(|a| a.get("#ComputerSystem.Reset"));
        let reset_target = reset
            .and_then(|r| r.get("target"))
            .and_then(|t| t.as_str())
            .map(|t| absolute(origin, t))
            .unwrap_or_else(|| format!("{url}/Actions/ComputerSystem.Reset"));
        let reset_types = reset
            .and_then(|r| r.get("ResetType@Redfish.AllowableValues"))
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(System {
            url: raw
                .id
                .map(|id| absolute(origin, &id))
                .unwrap_or_else(|| url.to_string()),
            power: PowerState::parse(raw.power_state.as_deref()),
            reset_target,
            reset_types,
        })
    }

    /// Sets a one-time boot override (`BootSourceOverrideEnabled: Once`) to `target` (`Hdd`).
    pub async fn boot_once(&self, system: &System, target: &str) -> Result<(), RedfishError> {
        let body = serde_json::json!({
            "Boot": {
                "BootSourceOverrideEnabled": "Once",
                "BootSourceOverrideTarget": target,
            }
        });
        self.call(Method::PATCH, &system.url, Some(body)).await?;
        Ok(())
    }

    /// `#ComputerSystem.Reset` with this `ResetType` (`On`, `GracefulShutdown`, `ForceOff`).
    pub async fn reset(&self, system: &System, reset_type: &str) -> Result<(), RedfishError> {
        let body = serde_json::json!({ "ResetType": reset_type });
        self.call(Method::POST, &system.reset_target, Some(body))
            .await?;
        Ok(())
    }
}

/// `scheme://host[:port]` and the path of an absolute URL.
pub fn split_origin(url: &str) -> (&str, &str) {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => url.split_at(after_scheme + i),
        None => (url, ""),
    }
}

/// An `@odata.id` (a path) made absolute against the BMC's origin.
pub fn absolute(origin: &str, id: &str) -> String {
    if id.contains("://") {
        id.trim_end_matches('/').to_string()
    } else {
        format!("{origin}{}", id.trim_end_matches('/'))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Whether a status is the BMC refusing the login.
pub fn is_auth_status(status: u16) -> bool {
    status == StatusCode::UNAUTHORIZED.as_u16() || status == StatusCode::FORBIDDEN.as_u16()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_links() {
        assert_eq!(
            split_origin("https://bmc:8443/redfish/v1/Systems/1"),
            ("https://bmc:8443", "/redfish/v1/Systems/1")
        );
        assert_eq!(split_origin("http://bmc"), ("http://bmc", ""));
        assert_eq!(
            absolute("http://bmc", "/redfish/v1/Systems/a/"),
            "http://bmc/redfish/v1/Systems/a"
        );
        assert_eq!(absolute("http://bmc", "http://x/y"), "http://x/y");
    }

    #[test]
    fn power_states() {
        assert_eq!(PowerState::parse(Some("On")), PowerState::On);
        assert_eq!(PowerState::parse(Some("Off")), PowerState::Off);
        assert_eq!(PowerState::parse(Some("Paused")), PowerState::Unknown);
        assert_eq!(PowerState::parse(None), PowerState::Unknown);
    }
}
