//! Integration tests: a real `kube::Client` against the embedded API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod basic;
mod crd;
mod eviction;
mod gc;
mod perf;
mod watch;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Client, CustomResource};
use kube_node_embedded_api::EmbeddedApi;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A small cluster-scoped test CRD with status and scale subresources.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "test.example.com",
    version = "v1",
    kind = "Widget",
    plural = "widgets",
    status = "WidgetStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
pub struct WidgetSpec {
    pub replicas: i32,
    #[serde(default)]
    pub note: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct WidgetStatus {
    #[serde(default)]
    pub replicas: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

pub fn setup() -> (EmbeddedApi, Client) {
    let api = EmbeddedApi::new();
    let client = api.client();
    (api, client)
}

pub fn setup_with_crd() -> (EmbeddedApi, Client) {
    let (api, client) = setup();
    api.register_crd(&<Widget as kube::CustomResourceExt>::crd())
        .expect("register crd");
    (api, client)
}

pub fn node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

pub fn pod(name: &str, labels: &[(&str, &str)], node: Option<&str>, phase: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: node.map(str::to_string),
            ..Default::default()
        }),
        status: phase.map(|p| PodStatus {
            phase: Some(p.into()),
            ..Default::default()
        }),
    }
}

pub fn widget(name: &str, replicas: i32) -> Widget {
    Widget::new(
        name,
        WidgetSpec {
            replicas,
            note: String::new(),
        },
    )
}

/// Assert that `r` is a `kube::Error::Api` with `code` and `reason`.
#[track_caller]
pub fn assert_api_err<T: std::fmt::Debug>(
    r: Result<T, kube::Error>,
    code: u16,
    reason: &str,
) -> Box<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, code, "unexpected status {s:?}");
            assert_eq!(s.reason, reason, "unexpected status {s:?}");
            s
        }
        other => panic!("expected Api error {code} {reason}, got {other:?}"),
    }
}

pub async fn eventually<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn eventually_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
