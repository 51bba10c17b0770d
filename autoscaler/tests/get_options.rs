//! `NodeGroupGetOptions` as both generations of cluster-autoscaler's externalgrpc client call
//! it, for a NodeSet without autoscaling-option annotations.
//!
//! cluster-autoscaler 1.28 sends its defaults in the legacy `meta/v1.Duration` fields 3-5 only
//! and treats any error, Unimplemented included, as "this node group's options are unknown":
//! scale-down then marks every node unremovable. It also reads back only four fields, so an
//! answer echoing its defaults set its MaxNodeProvisionTime to 0 (a real 1.28 then timed out
//! every scale-up). An answer without options is read by every release as "use your own
//! defaults" (1.28 `externalgrpc_node_group.go`: `if pbOpts == nil { return nil, nil }`).

mod common;

use common::{Env, nodeclass, nodeset};
use kube_node_autoscaler::proto::{
    NodeGroupAutoscalingOptions, NodeGroupAutoscalingOptionsRequest,
};
use prost::Message;

/// `NodeGroupAutoscalingOptionsRequest` for node group `pool` as cluster-autoscaler 1.28's
/// externalgrpc client marshals it with the default flags (`--scale-down-utilization-threshold
/// 0.5`, `--scale-down-gpu-utilization-threshold 0.5`, `--scale-down-unneeded-time 10m`,
/// `--scale-down-unready-time 20m`, `--max-node-provision-time 15m`): fields 1-2 as doubles,
/// 3-5 as `k8s.io.apimachinery.pkg.apis.meta.v1.Duration` (nanoseconds), nothing else — 1.28's
/// protos have no fields 8-11. The bytes are the protobuf wire encoding of that message, written
/// out from 1.28's `externalgrpc.proto` (not captured from a running binary).
const CA_1_28_REQUEST: &str = "0a04706f6f6c122d09000000000000e03f11000000000000e03f\
     1a070880e0a596bb1122070880c0cbacf6222a070880d0b8e1981a";

/// The answer as cluster-autoscaler 1.28 decodes it: only the fields its protos know.
#[derive(Clone, PartialEq, Message)]
struct Ca128Options {
    #[prost(double, tag = "1")]
    scale_down_utilization_threshold: f64,
    #[prost(double, tag = "2")]
    scale_down_gpu_utilization_threshold: f64,
    #[prost(message, optional, tag = "3")]
    scale_down_unneeded_time: Option<Ca128Duration>,
    #[prost(message, optional, tag = "4")]
    scale_down_unready_time: Option<Ca128Duration>,
    #[prost(message, optional, tag = "5")]
    max_node_provision_time: Option<Ca128Duration>,
}

#[derive(Clone, PartialEq, Message)]
struct Ca128Duration {
    #[prost(int64, tag = "1")]
    duration: i64,
}

#[derive(Clone, PartialEq, Message)]
struct Ca128Response {
    #[prost(message, optional, tag = "1")]
    node_group_autoscaling_options: Option<Ca128Options>,
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

async fn env_with_plain_pool() -> Env {
    let env = Env::new().await;
    env.create_class(&nodeclass("ml")).await;
    env.create_set(&nodeset("pool", "ml", 2, Some(1), Some(5)))
        .await;
    env
}

#[tokio::test]
async fn a_1_28_client_gets_no_options_not_unimplemented_so_it_keeps_its_defaults() {
    let mut env = env_with_plain_pool().await;
    let request = NodeGroupAutoscalingOptionsRequest::decode(hex(CA_1_28_REQUEST).as_slice())
        .expect("decode");
    assert_eq!(request.id, "pool");
    let response = env
        .grpc
        .node_group_get_options(request)
        .await
        .expect("1.28 reads any error, Unimplemented included, as failure")
        .into_inner();
    // Decode the answer exactly as 1.28 would: no options, so it keeps its own defaults
    // (MaxNodeProvisionTime included, which it cannot read back from an answer).
    let seen = Ca128Response::decode(response.encode_to_vec().as_slice()).expect("1.28 decodes");
    assert!(
        seen.node_group_autoscaling_options.is_none(),
        "no options: 1.28 uses its defaults"
    );
}

#[tokio::test]
async fn a_current_client_gets_no_options_so_it_keeps_its_defaults() {
    let mut env = env_with_plain_pool().await;
    let secs = |s: i64| prost_types::Duration {
        seconds: s,
        nanos: 0,
    };
    let legacy = |s: i64| k8s_pb::apimachinery::pkg::apis::meta::v1::Duration {
        duration: Some(s * 1_000_000_000),
    };
    // As 1.29-1.34 send them: both generations, the booleans and the startup duration.
    let defaults = NodeGroupAutoscalingOptions {
        scale_down_utilization_threshold: 0.5,
        scale_down_gpu_utilization_threshold: 0.5,
        scale_down_unneeded_time: Some(legacy(600)),
        scale_down_unready_time: Some(legacy(1200)),
        max_node_provision_time: Some(legacy(900)),
        zero_or_max_node_scaling: false,
        ignore_daemon_sets_utilization: true,
        scale_down_unneeded_duration: Some(secs(600)),
        scale_down_unready_duration: Some(secs(1200)),
        max_node_provision_duration: Some(secs(900)),
        max_node_startup_duration: Some(secs(900)),
        allow_non_atomic_scale_up_to_max: false,
    };
    let o = env
        .grpc
        .node_group_get_options(NodeGroupAutoscalingOptionsRequest {
            id: "pool".into(),
            defaults: Some(defaults),
        })
        .await
        .expect("options")
        .into_inner()
        .node_group_autoscaling_options;
    assert_eq!(
        o, None,
        "no options: the autoscaler keeps its defaults, every field"
    );
}

#[tokio::test]
async fn an_unknown_node_group_is_still_an_error() {
    let mut env = env_with_plain_pool().await;
    let request = NodeGroupAutoscalingOptionsRequest::decode(hex(CA_1_28_REQUEST).as_slice())
        .expect("decode");
    let err = env
        .grpc
        .node_group_get_options(NodeGroupAutoscalingOptionsRequest {
            id: "no-such-set".into(),
            ..request
        })
        .await
        .expect_err("unknown group");
    assert_ne!(err.code(), tonic::Code::Ok);
}
