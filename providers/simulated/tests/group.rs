//! The simulated group (`spec.provider.simulated.group`): the group conformance checks with
//! and without the advance hook, and what a group-backed class refuses.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CLUSTER, class, request};
use kube_node_provider::conformance::group::{self, GroupConformance};
use kube_node_provider::{InstanceState, ListFilter, Provider, ProviderError};
use kube_node_provider_simulated::{Method, SimulatedCloud};
use serde_json::json;

fn pool(cloud: &SimulatedCloud, sim: serde_json::Value) -> Arc<dyn Provider> {
    cloud.factory().build(&class("pool", sim)).expect("build")
}

#[tokio::test(start_paused = true)]
async fn group_conformance_with_the_advance_hook() {
    let cloud = SimulatedCloud::new();
    let provider = pool(
        &cloud,
        json!({"group": {"name": "pool-a"}, "bootDelay": "5s", "deleteDelay": "5s", "zones": ["sim-a", "sim-b"]}),
    );
    let g = provider
        .as_group()
        .expect("a group-backed class has group operations");
    assert!(provider.capabilities().group_sized);
    let mut c = GroupConformance::new("simulated:///sim-a/sim-ffffffffffff");
    c.settle_timeout = Duration::from_secs(60);
    c.poll_interval = Duration::from_secs(5);
    // One step is one boot (and one delete) delay of simulated time; nothing moves between.
    c.advance = Some(Arc::new(|| {
        Box::pin(async { tokio::time::advance(Duration::from_secs(5)).await })
    }));
    let report = group::run_all(g, &c).await;
    match report.into_result() {
        Ok(r) => assert_eq!(r.passed.len(), 6, "{:?}", r.passed),
        Err(f) => panic!("the simulated group fails group conformance: {f:#?}"),
    }
    assert_eq!(g.target_size().await.expect("size"), 0);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(cloud.machine_count(), 0, "leaked {:?}", cloud.machines());
}

#[tokio::test(start_paused = true)]
async fn group_conformance_polling_without_delays() {
    let cloud = SimulatedCloud::new();
    let provider = pool(&cloud, json!({"group": {"name": "pool-b"}}));
    let g = provider.as_group().expect("group");
    let mut c = GroupConformance::new("simulated:///sim-a/sim-ffffffffffff");
    c.settle_timeout = Duration::from_secs(30);
    let report = group::run_all(g, &c).await.into_result().expect("conforms");
    assert_eq!(report.skipped, vec!["group_instances_list_transitions"]);
}

#[tokio::test(start_paused = true)]
async fn machines_are_named_tagged_and_listed_by_the_group() {
    let cloud = SimulatedCloud::new();
    let provider = pool(&cloud, json!({"group": {"name": "web"}, "bootDelay": "3s"}));
    let g = provider.as_group().expect("group");
    g.set_target_size(2).await.expect("resize");
    let machines = g.instances().await.expect("instances");
    assert_eq!(machines.len(), 2);
    for m in &machines {
        assert_eq!(m.state, InstanceState::Pending);
        let name = m.node_name().expect("the group names the Node");
        assert!(name.starts_with("sim-web-"), "{name}");
        assert!(m.node_uid().is_none(), "no Node UID: no Node asked for it");
    }
    // list (the orphan collector's view) sees them under the cluster and class tags.
    let listed = provider
        .list(&ListFilter {
            cluster: CLUSTER.into(),
            node_class: Some("pool".into()),
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 2);
    // Booted after the delay.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(
        g.instances()
            .await
            .expect("instances")
            .iter()
            .all(|m| m.state == InstanceState::Running)
    );
    assert_eq!(cloud.calls("set_target_size"), 1);
    assert_eq!(cloud.calls("instances"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_group_class_creates_no_single_machine() {
    let cloud = SimulatedCloud::new();
    let provider = pool(&cloud, json!({"group": {"name": "web"}}));
    let err = provider
        .create(&request("pool", "uid-1", "n1"))
        .await
        .expect_err("create is refused");
    assert_eq!(err.reason(), "Unimplemented", "{err}");
    assert!(err.to_string().contains("group-backed"), "{err}");
    assert_eq!(cloud.machine_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_vanished_machine_is_replaced_and_a_lowered_size_picks_victims() {
    let cloud = SimulatedCloud::new();
    let provider = pool(&cloud, json!({"group": {"name": "web"}}));
    let g = provider.as_group().expect("group");
    g.set_target_size(3).await.expect("resize");
    let first = g.instances().await.expect("instances")[0]
        .provider_id
        .clone();
    assert!(cloud.terminate_out_of_band(&first));
    let after = g.instances().await.expect("instances");
    assert_eq!(after.len(), 3, "the group replaced the vanished machine");
    assert!(!after.iter().any(|m| m.provider_id == first));
    // A bare decrease lets the group choose (kube-node never does this; the cloud would).
    g.set_target_size(1).await.expect("resize");
    assert_eq!(g.instances().await.expect("instances").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn group_calls_take_injected_errors() {
    let cloud = SimulatedCloud::new();
    let provider = pool(&cloud, json!({"group": {"name": "web"}}));
    let g = provider.as_group().expect("group");
    cloud.inject_error(
        Method::SetTargetSize,
        ProviderError::Throttled {
            message: "an operation is in progress on this group".into(),
            retry_after: None,
        },
    );
    assert_eq!(
        g.set_target_size(2).await.expect_err("injected").reason(),
        "Throttled"
    );
    assert_eq!(g.target_size().await.expect("size"), 0);
    g.set_target_size(2).await.expect("resize");
    assert_eq!(g.target_size().await.expect("size"), 2);
}

#[test]
fn a_bad_group_name_is_refused_naming_the_field() {
    let cloud = SimulatedCloud::new();
    let err = cloud
        .factory()
        .build(&class("pool", json!({"group": {"name": "Not_A_Label"}})))
        .err()
        .expect("refused");
    assert_eq!(err.reason(), "InvalidConfig");
    assert!(
        err.to_string()
            .contains("spec.provider.simulated.group.name"),
        "{err}"
    );
}
