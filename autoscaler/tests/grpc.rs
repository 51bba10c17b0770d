//! cluster-autoscaler's loop, replayed over gRPC against NodeSets in an embedded API server.
//! The tests play the nodeset-controller, node-controller and kubelet by writing Nodes.

mod common;

use common::{Env, nodeclass, nodeset};
use k8s_pb::api::core::v1 as pb;
use kube_node_autoscaler::instances::{OTHER_ERROR_CLASS, OUT_OF_RESOURCES_ERROR_CLASS};
use kube_node_autoscaler::proto::instance_status::InstanceState;
use kube_node_autoscaler::proto::*;
use kube_node_autoscaler::template::GPU_LABEL;
use prost::Message;
use tonic::Code;

fn ext(name: &str) -> ExternalGrpcNode {
    ExternalGrpcNode {
        provider_id: format!("simulated://{name}"),
        name: name.to_string(),
        ..Default::default()
    }
}

async fn group_of(env: &mut Env, name: &str) -> String {
    env.grpc
        .node_group_for_node(NodeGroupForNodeRequest {
            node: Some(ext(name)),
        })
        .await
        .expect("node group for node")
        .into_inner()
        .node_group
        .expect("node group")
        .id
}

async fn states(env: &mut Env, id: &str) -> Vec<(String, InstanceState)> {
    env.grpc
        .node_group_nodes(NodeGroupNodesRequest { id: id.into() })
        .await
        .expect("nodes")
        .into_inner()
        .instances
        .into_iter()
        .map(|i| {
            let s = i.status.expect("status").instance_state();
            (i.id, s)
        })
        .collect()
}

#[tokio::test]
async fn cluster_autoscaler_loop() {
    let mut env = Env::new().await;
    env.create_class(&nodeclass("ml")).await;
    let set = env
        .create_set(&nodeset("pool", "ml", 2, Some(1), Some(5)))
        .await;
    env.create_set(&nodeset("manual", "ml", 1, None, None))
        .await;
    for n in ["pool-a", "pool-b"] {
        env.create_child(&set, n).await;
        env.make_ready(n).await;
    }
    env.create_foreign("other").await;

    env.grpc.refresh(RefreshRequest {}).await.expect("refresh");
    let groups = env
        .grpc
        .node_groups(NodeGroupsRequest {})
        .await
        .expect("node groups")
        .into_inner()
        .node_groups;
    assert_eq!(
        groups.len(),
        1,
        "only NodeSets with minSize and maxSize: {groups:?}"
    );
    assert_eq!(
        (
            groups[0].id.as_str(),
            groups[0].min_size,
            groups[0].max_size
        ),
        ("pool", 1, 5)
    );

    assert_eq!(group_of(&mut env, "pool-a").await, "pool");
    assert_eq!(group_of(&mut env, "pool-b").await, "pool");
    assert_eq!(
        group_of(&mut env, "other").await,
        "",
        "foreign Node: empty id"
    );
    assert_eq!(group_of(&mut env, "no-such-node").await, "");

    let size = |env: &mut Env| {
        let mut g = env.grpc.clone();
        async move {
            g.node_group_target_size(NodeGroupTargetSizeRequest { id: "pool".into() })
                .await
                .expect("target size")
                .into_inner()
                .target_size
        }
    };
    assert_eq!(size(&mut env).await, 2);

    env.grpc
        .node_group_increase_size(NodeGroupIncreaseSizeRequest {
            id: "pool".into(),
            delta: 2,
        })
        .await
        .expect("increase");
    assert_eq!(size(&mut env).await, 4);
    assert_eq!(env.get_set("pool").await.spec.replicas, 4);

    // The nodeset-controller creates the two Nodes; they are Creating until Ready.
    for n in ["pool-c", "pool-d"] {
        env.create_child(&set, n).await;
    }
    let s = states(&mut env, "pool").await;
    assert_eq!(
        s,
        vec![
            (
                "simulated://pool-a".to_string(),
                InstanceState::InstanceRunning
            ),
            (
                "simulated://pool-b".to_string(),
                InstanceState::InstanceRunning
            ),
            (
                "kube-node://pool-c".to_string(),
                InstanceState::InstanceCreating
            ),
            (
                "kube-node://pool-d".to_string(),
                InstanceState::InstanceCreating
            ),
        ]
    );
    for n in ["pool-c", "pool-d"] {
        env.make_ready(n).await;
    }
    let s = states(&mut env, "pool").await;
    assert!(
        s.iter()
            .all(|(_, st)| *st == InstanceState::InstanceRunning),
        "{s:?}"
    );

    // Scale-down of two named Nodes: one NodeSet write naming both, replicas lowered by 2.
    env.api.reset_stats();
    env.grpc
        .node_group_delete_nodes(NodeGroupDeleteNodesRequest {
            id: "pool".into(),
            nodes: vec![ext("pool-a"), ext("pool-c")],
        })
        .await
        .expect("delete nodes");
    let stats = env.api.stats();
    assert_eq!(stats.writes("nodesets"), 1, "{stats:?}");
    assert_eq!(stats.writes("nodesets/scale"), 0, "{stats:?}");
    assert_eq!(
        stats.writes("nodes"),
        0,
        "the controller deletes the Nodes, not us"
    );
    let after = env.get_set("pool").await;
    assert_eq!(after.spec.replicas, 2);
    assert_eq!(
        after.spec.remove_nodes,
        vec!["pool-a".to_string(), "pool-c".to_string()]
    );

    env.grpc.cleanup(CleanupRequest {}).await.expect("cleanup");
}

#[tokio::test]
async fn refusals() {
    let mut env = Env::new().await;
    env.create_class(&nodeclass("ml")).await;
    let set = env
        .create_set(&nodeset("pool", "ml", 2, Some(2), Some(3)))
        .await;
    let other = env
        .create_set(&nodeset("other", "ml", 2, Some(0), Some(3)))
        .await;
    for n in ["pool-a", "pool-b"] {
        env.create_child(&set, n).await;
        env.make_ready(n).await;
    }
    env.create_child(&other, "other-a").await;

    let err = env
        .grpc
        .node_group_increase_size(NodeGroupIncreaseSizeRequest {
            id: "pool".into(),
            delta: 2,
        })
        .await
        .expect_err("past maxSize");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let err = env
        .grpc
        .node_group_increase_size(NodeGroupIncreaseSizeRequest {
            id: "pool".into(),
            delta: 0,
        })
        .await
        .expect_err("zero delta");
    assert_eq!(err.code(), Code::InvalidArgument);

    let err = env
        .grpc
        .node_group_delete_nodes(NodeGroupDeleteNodesRequest {
            id: "pool".into(),
            nodes: vec![ext("pool-a")],
        })
        .await
        .expect_err("below minSize");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let err = env
        .grpc
        .node_group_delete_nodes(NodeGroupDeleteNodesRequest {
            id: "other".into(),
            nodes: vec![ext("pool-a")],
        })
        .await
        .expect_err("node of another group");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    for id in ["nope", "", "pool-a"] {
        let err = env
            .grpc
            .node_group_target_size(NodeGroupTargetSizeRequest { id: id.into() })
            .await
            .expect_err("unknown group");
        assert!(
            matches!(err.code(), Code::NotFound | Code::InvalidArgument),
            "{id}: {err:?}"
        );
    }
    let err = env
        .grpc
        .node_group_increase_size(NodeGroupIncreaseSizeRequest {
            id: "nope".into(),
            delta: 1,
        })
        .await
        .expect_err("unknown group");
    assert_eq!(err.code(), Code::NotFound);

    // Nothing was written by any refusal.
    assert_eq!(env.get_set("pool").await.spec.replicas, 2);
    assert!(env.get_set("pool").await.spec.remove_nodes.is_empty());
    assert_eq!(env.get_set("other").await.spec.replicas, 2);

    // Pricing is optional; CA accepts Unimplemented.
    let err = env
        .grpc
        .pricing_node_price(PricingNodePriceRequest::default())
        .await
        .expect_err("pricing");
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test]
async fn decrease_target_size_only_drops_unregistered() {
    let mut env = Env::new().await;
    env.create_class(&nodeclass("ml")).await;
    let set = env
        .create_set(&nodeset("pool", "ml", 4, Some(0), Some(5)))
        .await;
    env.create_child(&set, "pool-a").await;
    env.make_ready("pool-a").await;
    env.create_child(&set, "pool-b").await;
    env.make_ready("pool-b").await;
    // pool-c exists but never registered; the fourth replica has no Node yet.
    env.create_child(&set, "pool-c").await;
    env.set_machine("pool-c", "Launching", "").await;

    let err = env
        .grpc
        .node_group_decrease_target_size(NodeGroupDecreaseTargetSizeRequest {
            id: "pool".into(),
            delta: 1,
        })
        .await
        .expect_err("positive delta");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = env
        .grpc
        .node_group_decrease_target_size(NodeGroupDecreaseTargetSizeRequest {
            id: "pool".into(),
            delta: -3,
        })
        .await
        .expect_err("would remove a running Node");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(env.get_set("pool").await.spec.replicas, 4);

    env.grpc
        .node_group_decrease_target_size(NodeGroupDecreaseTargetSizeRequest {
            id: "pool".into(),
            delta: -2,
        })
        .await
        .expect("the two unfulfilled requests go");
    assert_eq!(env.get_set("pool").await.spec.replicas, 2);
}

#[tokio::test]
async fn template_node_in_both_fields() {
    let mut env = Env::new().await;
    let mut class = nodeclass("ml");
    class.spec.labels.insert(GPU_LABEL.into(), "t4".into());
    env.create_class(&class).await;
    let mut set = nodeset("pool", "ml", 0, Some(0), Some(3));
    set.spec
        .template
        .spec
        .taints
        .push(kube_node_crds::v1alpha1::NodeTaint {
            key: "zone-pinned".into(),
            value: None,
            effect: kube_node_crds::v1alpha1::TaintEffect::NoExecute,
        });
    env.create_set(&set).await;

    let resp = env
        .grpc
        .node_group_template_node_info(NodeGroupTemplateNodeInfoRequest { id: "pool".into() })
        .await
        .expect("template")
        .into_inner();
    let from_field_1 = resp.node_info.expect("field 1");
    let from_field_2 =
        pb::Node::decode(resp.node_bytes.as_slice()).expect("field 2 decodes as a Node");
    assert_eq!(from_field_1, from_field_2);

    let meta = from_field_2.metadata.expect("metadata");
    let label = |k: &str| meta.labels.get(k).map(String::as_str);
    assert_eq!(label("team"), Some("ml"));
    assert_eq!(label("pool"), Some("pool"));
    assert_eq!(label("kubernetes.io/os"), Some("linux"));
    assert_eq!(label("kubernetes.io/hostname"), Some("template-pool"));
    assert_eq!(label("node.kubernetes.io/instance-type"), Some("sim.large"));
    assert_eq!(label("topology.kubernetes.io/zone"), Some("zone-a"));
    assert_eq!(label(GPU_LABEL), Some("t4"));
    let taints: Vec<(String, String)> = from_field_2
        .spec
        .expect("spec")
        .taints
        .into_iter()
        .map(|t| (t.key.unwrap_or_default(), t.effect.unwrap_or_default()))
        .collect();
    assert_eq!(
        taints,
        vec![
            ("dedicated".to_string(), "NoSchedule".to_string()),
            ("zone-pinned".to_string(), "NoExecute".to_string()),
        ]
    );
    let status = from_field_2.status.expect("status");
    let q = |m: &std::collections::BTreeMap<
        String,
        k8s_pb::apimachinery::pkg::api::resource::Quantity,
    >,
             k: &str| { m.get(k).and_then(|q| q.string.clone()) };
    assert_eq!(q(&status.capacity, "cpu").as_deref(), Some("4"));
    assert_eq!(q(&status.capacity, "nvidia.com/gpu").as_deref(), Some("1"));
    assert_eq!(q(&status.allocatable, "cpu").as_deref(), Some("3900m"));
    assert_eq!(q(&status.allocatable, "memory").as_deref(), Some("15Gi"));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.r#type.as_deref() == Some("Ready") && c.status.as_deref() == Some("True"))
    );

    // Once a Node of the group has registered (kubelet Ready, unregistered taint gone), the
    // template carries what it reports instead of the declaration; names stay the template's.
    let set = env.get_set("pool").await;
    env.create_child(&set, "pool-1").await;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(env.client.clone());
    let status = serde_json::json!({"status": {
        "capacity": {"cpu": "4", "memory": "16Gi", "pods": "58", "nvidia.com/gpu": "1"},
        "allocatable": {"cpu": "3800m", "memory": "14Gi", "pods": "58", "nvidia.com/gpu": "1"},
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    nodes
        .patch_status(
            "pool-1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await
        .expect("kubelet status");
    let node = env
        .grpc
        .node_group_template_node_info(NodeGroupTemplateNodeInfoRequest { id: "pool".into() })
        .await
        .expect("template")
        .into_inner()
        .node_info
        .expect("node");
    let status = node.status.expect("status");
    assert_eq!(q(&status.allocatable, "cpu").as_deref(), Some("3800m"));
    assert_eq!(q(&status.allocatable, "memory").as_deref(), Some("14Gi"));
    let meta = node.metadata.expect("metadata");
    assert_eq!(meta.name.as_deref(), Some("template-pool"));
    assert_eq!(
        meta.labels
            .get("kubernetes.io/hostname")
            .map(String::as_str),
        Some("template-pool")
    );

    // GPU discovery from the same NodeClass.
    let label = env
        .grpc
        .gpu_label(GpuLabelRequest {})
        .await
        .expect("gpu label")
        .into_inner()
        .label;
    assert_eq!(label, GPU_LABEL);
    let types = env
        .grpc
        .get_available_gpu_types(GetAvailableGpuTypesRequest {})
        .await
        .expect("gpu types")
        .into_inner()
        .gpu_types;
    assert_eq!(types.keys().collect::<Vec<_>>(), vec!["t4"]);
}

#[tokio::test]
async fn options_from_annotations_else_the_request_defaults() {
    let mut env = Env::new().await;
    env.create_class(&nodeclass("ml")).await;
    env.create_set(&nodeset("plain", "ml", 0, Some(0), Some(3)))
        .await;
    let mut set = nodeset("tuned", "ml", 0, Some(0), Some(3));
    set.metadata.annotations = Some(
        [(
            kube_node_autoscaler::options::SCALE_DOWN_UNNEEDED_TIME.to_string(),
            "2m".to_string(),
        )]
        .into(),
    );
    env.create_set(&set).await;
    let defaults = NodeGroupAutoscalingOptions {
        scale_down_utilization_threshold: 0.5,
        scale_down_unneeded_duration: Some(prost_types::Duration {
            seconds: 600,
            nanos: 0,
        }),
        ..Default::default()
    };
    // No overrides: no options, so the autoscaler keeps its own defaults (see
    // tests/get_options.rs for why echoing them would break cluster-autoscaler 1.28).
    let plain = env
        .grpc
        .node_group_get_options(NodeGroupAutoscalingOptionsRequest {
            id: "plain".into(),
            defaults: Some(defaults),
        })
        .await
        .expect("an answer, not Unimplemented")
        .into_inner()
        .node_group_autoscaling_options;
    assert_eq!(plain, None);
    let o = env
        .grpc
        .node_group_get_options(NodeGroupAutoscalingOptionsRequest {
            id: "tuned".into(),
            defaults: Some(defaults),
        })
        .await
        .expect("options")
        .into_inner()
        .node_group_autoscaling_options
        .expect("options");
    assert_eq!(o.scale_down_utilization_threshold, 0.5);
    assert_eq!(
        o.scale_down_unneeded_duration,
        Some(prost_types::Duration {
            seconds: 120,
            nanos: 0
        })
    );
    assert_eq!(
        o.scale_down_unneeded_time.and_then(|d| d.duration),
        Some(120_000_000_000)
    );
}

#[tokio::test]
async fn out_of_resources_reported_for_capacity_failures() {
    let mut env = Env::new().await;
    env.create_class(&nodeclass("ml")).await;
    let set = env
        .create_set(&nodeset("pool", "ml", 3, Some(0), Some(5)))
        .await;
    for n in ["pool-a", "pool-b", "pool-c"] {
        env.create_child(&set, n).await;
    }
    // As the node-controller writes a provider error into MachineReady: "Reason: message".
    env.set_machine(
        "pool-a",
        "Pending",
        "InsufficientCapacity: insufficient capacity: no sim.large left in zone-a",
    )
    .await;
    env.set_machine(
        "pool-b",
        "Failed",
        "QuotaExceeded: quota exceeded: 10 machines",
    )
    .await;
    env.set_machine(
        "pool-c",
        "Failed",
        "RegistrationTimeout: the kubelet did not register",
    )
    .await;

    let instances = env
        .grpc
        .node_group_nodes(NodeGroupNodesRequest { id: "pool".into() })
        .await
        .expect("nodes")
        .into_inner()
        .instances;
    let got: Vec<(String, i32, i32, String)> = instances
        .into_iter()
        .map(|i| {
            let st = i.status.expect("status");
            let e = st.error_info.clone().expect("error info");
            (
                i.id,
                st.instance_state,
                e.instance_error_class,
                e.error_code,
            )
        })
        .collect();
    let creating = InstanceState::InstanceCreating as i32;
    assert_eq!(
        got,
        vec![
            (
                "kube-node://pool-a".into(),
                creating,
                OUT_OF_RESOURCES_ERROR_CLASS,
                "InsufficientCapacity".into()
            ),
            (
                "kube-node://pool-b".into(),
                creating,
                OUT_OF_RESOURCES_ERROR_CLASS,
                "QuotaExceeded".into()
            ),
            (
                "kube-node://pool-c".into(),
                creating,
                OTHER_ERROR_CLASS,
                "RegistrationTimeout".into()
            ),
        ]
    );
}

#[tokio::test]
async fn a_node_set_in_backoff_reports_its_error_and_refuses_to_grow() {
    let mut env = Env::new().await;
    env.create_class(&nodeclass("ml")).await;
    let set = env
        .create_set(&nodeset("pool", "ml", 2, Some(0), Some(5)))
        .await;
    for n in ["pool-a", "pool-b"] {
        env.create_child(&set, n).await;
    }
    env.make_ready("pool-a").await;
    env.set_machine(
        "pool-b",
        "Registering",
        "the machine runs; waiting for its kubelet to report Ready",
    )
    .await;
    // Growing works while the NodeSet is healthy.
    env.grpc
        .node_group_increase_size(NodeGroupIncreaseSizeRequest {
            id: "pool".into(),
            delta: 1,
        })
        .await
        .expect("increase while healthy");

    // The nodeset-controller records a backoff in the NodeSet's status.
    let api: kube::Api<kube_node_crds::NodeSet> = kube::Api::all(env.client.clone());
    api.patch_status(
        "pool",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"status": {"backoff": {
            "consecutiveFailures": 3,
            "lastFailureReason": "RegistrationTimeout",
            "lastFailureMessage": "pool-x: RegistrationTimeout: the kubelet did not report Ready within 20s of launch",
            "nextAttemptTime": "2030-01-01T00:00:00Z",
        }}})),
    )
    .await
    .expect("status patched");

    let instances = env
        .grpc
        .node_group_nodes(NodeGroupNodesRequest { id: "pool".into() })
        .await
        .expect("nodes")
        .into_inner()
        .instances;
    let errors: Vec<(String, Option<String>)> = instances
        .into_iter()
        .map(|i| {
            let st = i.status.expect("status");
            (i.id, st.error_info.map(|e| e.error_code))
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            ("simulated://pool-a".into(), None),
            (
                "kube-node://pool-b".into(),
                Some("RegistrationTimeout".into())
            ),
        ],
        "the Node still being created carries the NodeSet's failure; the running one none"
    );

    let err = env
        .grpc
        .node_group_increase_size(NodeGroupIncreaseSizeRequest {
            id: "pool".into(),
            delta: 1,
        })
        .await
        .expect_err("no growth in backoff");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message()
            .contains("backing off after 3 consecutive machine failures")
            && err.message().contains("RegistrationTimeout"),
        "{}",
        err.message()
    );
    assert_eq!(
        env.get_set("pool").await.spec.replicas,
        3,
        "nothing written"
    );
}
