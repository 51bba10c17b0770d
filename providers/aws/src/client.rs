//! Building the EC2 client: credentials (Secret or the SDK's default chain), the rustls/ring
//! HTTP client, the call counter and the fault injector.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_credential_types::Credentials as AwsCredentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use aws_sdk_ec2::config::{BehaviorVersion, Region};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient,
    SharedHttpConnector,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse, Metadata};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use kube_node_provider::{Credentials, ProviderError};

/// The Secret keys read for credentials, in the order tried (snake_case, then the environment
/// variable spelling).
pub const ACCESS_KEY_ID_KEYS: &[&str] = &["aws_access_key_id", "AWS_ACCESS_KEY_ID"];
/// See [`ACCESS_KEY_ID_KEYS`].
pub const SECRET_ACCESS_KEY_KEYS: &[&str] = &["aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"];
/// See [`ACCESS_KEY_ID_KEYS`].
pub const SESSION_TOKEN_KEYS: &[&str] = &["aws_session_token", "AWS_SESSION_TOKEN"];

fn first<'a>(creds: &'a Credentials, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .filter_map(|k| creds.get_str(k))
        .map(str::trim)
        .find(|v| !v.is_empty())
}

/// Static credentials from the Secret's data. The error names the missing key, never a value.
pub fn static_credentials(creds: &Credentials) -> Result<AwsCredentials, ProviderError> {
    let access = first(creds, ACCESS_KEY_ID_KEYS).ok_or_else(|| {
        ProviderError::Unauthorized(
            "spec.credentialsSecretRef: the Secret has no aws_access_key_id".into(),
        )
    })?;
    let secret = first(creds, SECRET_ACCESS_KEY_KEYS).ok_or_else(|| {
        ProviderError::Unauthorized(
            "spec.credentialsSecretRef: the Secret has no aws_secret_access_key".into(),
        )
    })?;
    let token = first(creds, SESSION_TOKEN_KEYS).map(str::to_string);
    Ok(AwsCredentials::new(
        access,
        secret,
        token,
        None,
        "kube-node-secret",
    ))
}

/// The SDK's default credential chain (environment, profile, IRSA web identity, ECS, instance
/// metadata), created on first use so that building a provider stays synchronous.
#[derive(Debug)]
struct LazyDefaultChain {
    region: Region,
    http: SharedHttpClient,
    inner: tokio::sync::OnceCell<Option<SharedCredentialsProvider>>,
}

impl LazyDefaultChain {
    #[cfg(feature = "default-chain")]
    async fn load(&self) -> Option<SharedCredentialsProvider> {
        aws_config::defaults(BehaviorVersion::latest())
            .region(self.region.clone())
            .http_client(self.http.clone())
            .load()
            .await
            .credentials_provider()
    }

    #[cfg(not(feature = "default-chain"))]
    async fn load(&self) -> Option<SharedCredentialsProvider> {
        let _ = (&self.region, &self.http);
        None
    }
}

impl ProvideCredentials for LazyDefaultChain {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            let provider = self.inner.get_or_init(|| self.load()).await;
            match provider {
                Some(p) => p.provide_credentials().await,
                None => Err(
                    aws_credential_types::provider::error::CredentialsError::not_loaded(
                        "no credentials Secret is referenced and the SDK's default credential chain \
                     is not available (built without the default-chain feature or found nothing)",
                    ),
                ),
            }
        })
    }
}

/// Counts EC2 operations by name (`RunInstances`, `DescribeInstances`, ...), once per
/// operation whatever the SDK's retries.
pub use kube_node_provider::CallCounter;

#[derive(Debug)]
struct CountingInterceptor(CallCounter);

impl Intercept for CountingInterceptor {
    fn name(&self) -> &'static str {
        "KubeNodeCallCounter"
    }

    // Not read_before_execution: client interceptors see that hook before the operation's
    // configuration (and so its name) is in the bag. This one runs once per operation, after.
    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = cfg
            .load::<Metadata>()
            .map(|m| m.name())
            .unwrap_or("Unknown");
        self.0.add(op);
        Ok(())
    }
}

/// One injected failure: the next `times` requests of `action` are answered with this EC2
/// error without reaching the server.
#[derive(Clone, Debug)]
struct Fault {
    action: String,
    code: String,
    message: String,
    status: u16,
    times: u32,
}

/// Makes EC2 calls fail with chosen error codes, for tests: the failure is answered by the
/// HTTP layer in EC2's own XML error format, so it goes through the SDK's real error parsing
/// and the provider's real error mapping, and nothing is launched. Clones share the queue.
#[derive(Clone, Debug, Default)]
pub struct FaultInjector {
    faults: Arc<Mutex<VecDeque<Fault>>>,
}

impl FaultInjector {
    /// No faults queued.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the next `times` calls of `action` (e.g. `RunInstances`) with `code` (e.g.
    /// `InsufficientInstanceCapacity`). Faults queue up in order.
    pub fn fail_next(&self, action: &str, code: &str, times: u32) {
        let status = match code {
            "RequestLimitExceeded" | "Throttling" => 503,
            "InternalError" | "Unavailable" => 500,
            "AuthFailure" | "UnauthorizedOperation" => 403,
            _ => 400,
        };
        if let Ok(mut q) = self.faults.lock() {
            q.push_back(Fault {
                action: action.to_string(),
                code: code.to_string(),
                message: format!("injected by kube-node's FaultInjector ({code})"),
                status,
                times,
            });
        }
    }

    /// How many injected failures are still queued.
    pub fn pending(&self) -> u32 {
        self.faults
            .lock()
            .map(|q| q.iter().map(|f| f.times).sum())
            .unwrap_or(0)
    }

    /// The fault for this request, if the first queued one matches its action.
    fn take(&self, request: &HttpRequest) -> Option<Fault> {
        let body = request.body().bytes()?;
        let body = std::str::from_utf8(body).ok()?;
        let mut q = self.faults.lock().ok()?;
        let front = q.front_mut()?;
        let wanted = format!("Action={}", front.action);
        let matches = body.split('&').any(|pair| pair == wanted);
        if !matches {
            return None;
        }
        let fault = front.clone();
        front.times = front.times.saturating_sub(1);
        if front.times == 0 {
            q.pop_front();
        }
        Some(fault)
    }
}

#[derive(Debug)]
struct FaultyClient {
    inner: SharedHttpClient,
    faults: FaultInjector,
}

impl HttpClient for FaultyClient {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        SharedHttpConnector::new(FaultyConnector {
            inner: self.inner.http_connector(settings, components),
            faults: self.faults.clone(),
        })
    }
}

#[derive(Debug)]
struct FaultyConnector {
    inner: SharedHttpConnector,
    faults: FaultInjector,
}

impl HttpConnector for FaultyConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        match self.faults.take(&request) {
            None => self.inner.call(request),
            Some(f) => {
                let xml = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error>\
                     <Code>{}</Code><Message>{}</Message></Error></Errors>\
                     <RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>",
                    f.code, f.message
                );
                // The status codes fail_next picks are all valid; never reached otherwise.
                let Ok(status) = StatusCode::try_from(f.status) else {
                    return self.inner.call(request);
                };
                let mut response = HttpResponse::new(status, SdkBody::from(xml));
                response
                    .headers_mut()
                    .insert("content-type", "text/xml;charset=UTF-8");
                HttpConnectorFuture::ready(Ok(response))
            }
        }
    }
}

/// The HTTPS client of every EC2 client: hyper + rustls with the `ring` crypto provider (the
/// rest of kube-node uses ring; mixing in aws-lc makes rustls panic at client creation).
pub fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// How to build an EC2 client.
#[derive(Clone, Debug)]
pub(crate) struct ClientParams<'a> {
    pub region: &'a str,
    pub endpoint_url: Option<&'a str>,
    pub credentials: Option<AwsCredentials>,
    pub http: SharedHttpClient,
    pub counter: Option<CallCounter>,
    pub faults: Option<FaultInjector>,
    pub max_attempts: u32,
}

/// The clients of one provider: EC2, and SSM for `amiSsmParameter`.
#[derive(Clone, Debug)]
pub(crate) struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
}

/// The endpoint SSM uses: the override when it is an emulator (one URL serves every service),
/// the regional default when the override is an EC2-specific (VPC) endpoint.
pub fn ssm_endpoint(ec2_endpoint: Option<&str>) -> Option<&str> {
    ec2_endpoint.filter(|u| !u.is_empty() && !u.contains("ec2"))
}

/// The clients, built without I/O (the default credential chain, if used, loads on first
/// call).
pub(crate) fn clients(p: ClientParams<'_>) -> Clients {
    let region = Region::new(p.region.to_string());
    let credentials = match p.credentials {
        Some(c) => SharedCredentialsProvider::new(c),
        None => SharedCredentialsProvider::new(LazyDefaultChain {
            region: region.clone(),
            http: p.http.clone(),
            inner: tokio::sync::OnceCell::new(),
        }),
    };
    let retry = RetryConfig::standard().with_max_attempts(p.max_attempts.max(1));
    // A hung call must not hold a reconcile forever; the controllers retry.
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(30))
        .operation_timeout(Duration::from_secs(90))
        .build();
    let ec2_http: SharedHttpClient = match p.faults {
        Some(faults) => SharedHttpClient::new(FaultyClient {
            inner: p.http.clone(),
            faults,
        }),
        None => p.http.clone(),
    };
    let mut b = aws_sdk_ec2::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(region.clone())
        .http_client(ec2_http)
        .retry_config(retry.clone())
        .timeout_config(timeouts.clone())
        .credentials_provider(credentials.clone());
    if let Some(url) = p.endpoint_url.filter(|u| !u.is_empty()) {
        b = b.endpoint_url(url);
    }
    if let Some(counter) = p.counter.clone() {
        b = b.interceptor(CountingInterceptor(counter));
    }
    let mut s = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(region)
        .http_client(p.http)
        .retry_config(retry)
        .timeout_config(timeouts)
        .credentials_provider(credentials);
    if let Some(url) = ssm_endpoint(p.endpoint_url) {
        s = s.endpoint_url(url);
    }
    if let Some(counter) = p.counter {
        s = s.interceptor(CountingInterceptor(counter));
    }
    Clients {
        ec2: aws_sdk_ec2::Client::from_conf(b.build()),
        ssm: aws_sdk_ssm::Client::from_conf(s.build()),
    }
}

/// An EC2 client for an emulator (moto) at `endpoint_url`, with dummy static credentials: for
/// tests that set up networks or inspect instances directly.
pub fn emulator_client(endpoint_url: &str, region: &str) -> aws_sdk_ec2::Client {
    emulator_clients(endpoint_url, region).ec2
}

/// An SSM client for an emulator (see [`emulator_client`]), e.g. to put the AMI parameter.
pub fn emulator_ssm_client(endpoint_url: &str, region: &str) -> aws_sdk_ssm::Client {
    emulator_clients(endpoint_url, region).ssm
}

/// EC2 and SSM clients for an emulator (see [`emulator_client`]).
pub(crate) fn emulator_clients(endpoint_url: &str, region: &str) -> Clients {
    clients(ClientParams {
        region,
        endpoint_url: Some(endpoint_url),
        credentials: Some(AwsCredentials::new(
            "testing", "testing", None, None, "emulator",
        )),
        http: https_client(),
        counter: None,
        faults: None,
        max_attempts: 3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(pairs: &[(&str, &str)]) -> Credentials {
        Credentials(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn secret_keys_in_either_spelling() {
        let c = static_credentials(&creds(&[
            ("aws_access_key_id", "AKIAEXAMPLE"),
            ("aws_secret_access_key", "s3cr3t"),
        ]))
        .expect("creds");
        assert_eq!(c.access_key_id(), "AKIAEXAMPLE");
        assert_eq!(c.session_token(), None);
        let c = static_credentials(&creds(&[
            ("AWS_ACCESS_KEY_ID", "AKIA2"),
            ("AWS_SECRET_ACCESS_KEY", "s2"),
            ("AWS_SESSION_TOKEN", "tok"),
        ]))
        .expect("creds");
        assert_eq!(c.access_key_id(), "AKIA2");
        assert_eq!(c.session_token(), Some("tok"));
    }

    #[test]
    fn missing_secret_key_is_unauthorized_without_values() {
        let e = static_credentials(&creds(&[("aws_access_key_id", "AKIASECRETVALUE")]))
            .expect_err("missing secret key");
        assert_eq!(e.reason(), "Unauthorized");
        assert!(e.message().contains("aws_secret_access_key"));
        assert!(!e.to_string().contains("AKIASECRETVALUE"));
    }

    #[test]
    fn ssm_follows_emulator_endpoints_only() {
        assert_eq!(
            ssm_endpoint(Some("http://127.0.0.1:5000")),
            Some("http://127.0.0.1:5000")
        );
        assert_eq!(
            ssm_endpoint(Some("https://vpce-1.ec2.us-east-1.vpce.amazonaws.com")),
            None
        );
        assert_eq!(ssm_endpoint(None), None);
    }

    #[test]
    fn call_counter_counts_by_operation() {
        let c = CallCounter::new();
        c.add("RunInstances");
        c.add("DescribeInstances");
        c.add("DescribeInstances");
        assert_eq!(c.get("DescribeInstances"), 2);
        assert_eq!(c.total(), 3);
        c.reset();
        assert_eq!(c.total(), 0);
    }
}
