//! Behaviour of the simulated backend as a provider: idempotency, delays, eventual
//! consistency, capacity and quota, faults, configuration checks and the test hooks.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CLUSTER, class, request};
use kube_node_crds::v1alpha1::SimulatedProviderSpec;
use kube_node_provider::{
    DeleteOutcome, InstanceState, ListFilter, Provider, ProviderError, ProviderRegistry,
};
use kube_node_provider_simulated::{Method, SimulatedCloud, THROTTLE_RETRY_AFTER, validate_spec};
use serde_json::json;

fn filter() -> ListFilter {
    ListFilter {
        cluster: CLUSTER.into(),
        node_class: None,
    }
}

fn provider(cloud: &SimulatedCloud, name: &str, sim: serde_json::Value) -> Arc<dyn Provider> {
    cloud
        .factory()
        .build(&class(name, sim))
        .expect("a valid class")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_with_one_key_launch_one_machine() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({}));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            p.create(&request("c", "uid-1", "node-1")).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.expect("task").expect("create").provider_id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "all creates return the same machine: {ids:?}");
    assert_eq!(cloud.machine_count(), 1);
    assert_eq!(cloud.create_calls(), 10);
    assert_eq!(cloud.launches(), 1, "nine of the ten calls were repeats");
    assert_eq!(p.list(&filter()).await.expect("list").len(), 1);
}

#[tokio::test]
async fn ids_zones_and_tags() {
    let cloud = SimulatedCloud::new();
    let p = provider(
        &cloud,
        "c",
        json!({"zones": ["z1", "z2"], "instanceType": "sim.large"}),
    );
    let req = request("c", "uid-1", "node-1");
    let a = p.create(&req).await.expect("create");
    let b = p
        .create(&request("c", "uid-2", "node-2"))
        .await
        .expect("create");
    let c = p
        .create(&request("c", "uid-3", "node-3"))
        .await
        .expect("create");
    assert_eq!(
        [a.zone.as_deref(), b.zone.as_deref(), c.zone.as_deref()],
        [Some("z1"), Some("z2"), Some("z1")],
        "zones round-robin"
    );
    assert!(a.id.starts_with("sim-") && a.id.len() == 16, "id {}", a.id);
    assert!(a.id[4..].chars().all(|ch| ch.is_ascii_hexdigit()));
    assert_eq!(a.provider_id, format!("simulated:///z1/{}", a.id));
    assert_eq!(a.tags, req.tags, "tags stored exactly as given");
    assert_eq!(a.instance_type.as_deref(), Some("sim.large"));
    assert_eq!(a.node_uid(), Some("uid-1"));
    assert!(
        a.addresses
            .iter()
            .any(|x| x.kind == "InternalIP" && x.address.starts_with("10."))
    );
    assert!(
        a.addresses
            .iter()
            .any(|x| x.kind == "Hostname" && x.address == "node-1")
    );
    assert_ne!(a.id, b.id);

    // Defaults: one zone, sim-a.
    let d = provider(&cloud, "d", json!({}));
    let i = d
        .create(&request("d", "uid-9", "node-9"))
        .await
        .expect("create");
    assert_eq!(i.zone.as_deref(), Some("sim-a"));
}

#[tokio::test(start_paused = true)]
async fn boot_and_delete_delays() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({"bootDelay": "5s", "deleteDelay": "3s"}));
    let i = p
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");
    assert_eq!(i.state, InstanceState::Pending);
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(
        p.get(&i.provider_id).await.expect("get").state,
        InstanceState::Pending
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        p.get(&i.provider_id).await.expect("get").state,
        InstanceState::Running
    );
    // Creating again returns the running machine.
    let again = p
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");
    assert_eq!(
        (again.id.as_str(), again.state),
        (i.id.as_str(), InstanceState::Running)
    );

    assert_eq!(p.delete(&i.provider_id).await, Ok(DeleteOutcome::Deleting));
    assert_eq!(
        p.get(&i.provider_id).await.expect("get").state,
        InstanceState::Terminating
    );
    assert_eq!(p.delete(&i.provider_id).await, Ok(DeleteOutcome::Deleting));
    let listed = p.list(&filter()).await.expect("list");
    assert_eq!(listed.len(), 1, "a terminating machine still exists");
    assert_eq!(listed[0].state, InstanceState::Terminating);

    tokio::time::advance(Duration::from_secs(3)).await;
    assert!(matches!(
        p.get(&i.provider_id).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(p.list(&filter()).await.expect("list").is_empty());
    assert_eq!(p.delete(&i.provider_id).await, Ok(DeleteOutcome::Gone));
    assert_eq!(cloud.machine_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_terminating_machine_does_not_answer_creates() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({"deleteDelay": "30s"}));
    let i = p
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");
    p.delete(&i.provider_id).await.expect("delete");
    let j = p
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");
    assert_ne!(i.id, j.id);
    assert_eq!(j.state, InstanceState::Running);
}

#[tokio::test(start_paused = true)]
async fn list_lag_hides_new_machines_and_filters_by_tags() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({"listLag": "2s"}));
    assert!(p.capabilities().eventually_consistent_list);
    assert!(
        !provider(&cloud, "x", json!({}))
            .capabilities()
            .eventually_consistent_list
    );

    let i = p
        .create(&request("c", "uid-1", "node-1"))
        .await
        .expect("create");
    assert!(
        p.list(&filter()).await.expect("list").is_empty(),
        "invisible during the lag"
    );
    assert!(p.get(&i.provider_id).await.is_ok(), "get is consistent");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(p.list(&filter()).await.expect("list").len(), 1);

    let mut other = request("c", "uid-2", "node-2");
    other
        .tags
        .insert(kube_node_crds::names::tags::CLUSTER.into(), "other".into());
    let mut other_class = request("d", "uid-3", "node-3");
    other_class
        .tags
        .insert(kube_node_crds::names::tags::NODE_CLASS.into(), "d".into());
    p.create(&other).await.expect("create");
    p.create(&other_class).await.expect("create");
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(p.list(&filter()).await.expect("list").len(), 2);
    let only_c = p
        .list(&ListFilter {
            cluster: CLUSTER.into(),
            node_class: Some("c".into()),
        })
        .await
        .expect("list");
    assert_eq!(only_c.len(), 1);
    assert_eq!(only_c[0].node_uid(), Some("uid-1"));
    let theirs = p
        .list(&ListFilter {
            cluster: "other".into(),
            node_class: None,
        })
        .await
        .expect("list");
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0].node_uid(), Some("uid-2"));
}

#[tokio::test(start_paused = true)]
async fn capacity_and_quota() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({"capacity": 2, "deleteDelay": "1s"}));
    p.create(&request("c", "u1", "n1")).await.expect("create");
    let second = p.create(&request("c", "u2", "n2")).await.expect("create");
    let err = p.create(&request("c", "u3", "n3")).await.expect_err("full");
    assert_eq!(err.reason(), "InsufficientCapacity");
    assert!(err.is_retryable() && err.is_out_of_resources());
    // The same key as an existing machine still answers.
    assert!(p.create(&request("c", "u2", "n2")).await.is_ok());
    // Another class has its own capacity.
    let q = provider(&cloud, "q", json!({"quota": 1}));
    q.create(&request("q", "u4", "n4")).await.expect("create");
    let err = q
        .create(&request("q", "u5", "n5"))
        .await
        .expect_err("quota");
    assert_eq!(err.reason(), "QuotaExceeded");
    assert!(err.is_out_of_resources());
    // A terminating machine still holds its slot until it is gone.
    p.delete(&second.provider_id).await.expect("delete");
    assert_eq!(
        p.create(&request("c", "u3", "n3"))
            .await
            .expect_err("full")
            .reason(),
        "InsufficientCapacity"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(p.create(&request("c", "u3", "n3")).await.is_ok());
    // Capacity 0: a sold-out machine type.
    let z = provider(&cloud, "z", json!({"capacity": 0}));
    assert_eq!(
        z.create(&request("z", "u6", "n6"))
            .await
            .expect_err("none")
            .reason(),
        "InsufficientCapacity"
    );
}

async fn outcomes(seed: u64) -> Vec<&'static str> {
    let cloud = SimulatedCloud::new();
    let p = provider(
        &cloud,
        "c",
        json!({"seed": seed, "faults": {
            "insufficientCapacityPercent": 10, "throttlePercent": 10, "transientPercent": 10
        }}),
    );
    let mut out = Vec::new();
    for n in 0..100 {
        out.push(
            match p
                .create(&request("c", &format!("u{n}"), &format!("n{n}")))
                .await
            {
                Ok(_) => "Ok",
                Err(e) => e.reason(),
            },
        );
    }
    out
}

#[tokio::test]
async fn faults_replay_with_the_same_seed() {
    let a = outcomes(42).await;
    assert_eq!(a, outcomes(42).await, "the same seed replays exactly");
    assert_ne!(a, outcomes(7).await, "another seed draws differently");
    for reason in ["Ok", "InsufficientCapacity", "Throttled", "Transient"] {
        assert!(
            a.contains(&reason),
            "{reason} occurs in 100 calls at these rates: {a:?}"
        );
    }
    let ok = a.iter().filter(|r| **r == "Ok").count();
    assert!((40..=95).contains(&ok), "about 70% succeed, got {ok}");
}

#[tokio::test]
async fn throttle_carries_retry_after() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({"faults": {"throttlePercent": 100}}));
    let err = p
        .create(&request("c", "u1", "n1"))
        .await
        .expect_err("throttled");
    assert_eq!(err.retry_after(), Some(THROTTLE_RETRY_AFTER));
    assert!(err.is_retryable());
    assert_eq!(cloud.machine_count(), 0);
}

#[tokio::test]
async fn fail_create_call_fails_exactly_the_nth() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({"faults": {"failCreateCall": 2}}));
    assert!(p.create(&request("c", "u1", "n1")).await.is_ok());
    let err = p
        .create(&request("c", "u2", "n2"))
        .await
        .expect_err("2nd call fails");
    assert_eq!(err.reason(), "Transient");
    assert!(p.create(&request("c", "u2", "n2")).await.is_ok());
    assert!(p.create(&request("c", "u3", "n3")).await.is_ok());
    assert_eq!(cloud.machine_count(), 3);
}

#[tokio::test]
async fn unknown_and_foreign_provider_ids() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({}));
    let i = p.create(&request("c", "u1", "n1")).await.expect("create");
    for id in [
        "simulated:///sim-a/sim-ffffffffffff",
        "aws:///us-east-1a/i-0123456789abcdef0",
        "garbage",
        "",
        "simulated:///",
        // The right id in the wrong zone names no machine either.
        &i.provider_id.replace("sim-a", "sim-b"),
    ] {
        assert!(
            matches!(p.get(id).await, Err(ProviderError::NotFound(_))),
            "get {id:?} is NotFound"
        );
        assert_eq!(
            p.delete(id).await,
            Ok(DeleteOutcome::Gone),
            "delete {id:?} is Gone"
        );
    }
    assert_eq!(cloud.machine_count(), 1);
}

#[tokio::test]
async fn test_hooks() {
    let cloud = SimulatedCloud::new();
    let p = provider(&cloud, "c", json!({}));
    let i = p.create(&request("c", "u1", "n1")).await.expect("create");
    assert_eq!(cloud.machines().len(), 1);
    assert!(cloud.terminate_out_of_band(&i.provider_id));
    assert!(!cloud.terminate_out_of_band(&i.provider_id));
    assert!(matches!(
        p.get(&i.provider_id).await,
        Err(ProviderError::NotFound(_))
    ));
    assert_eq!(cloud.machine_count(), 0);

    cloud.inject_next_create_error(ProviderError::QuotaExceeded("injected".into()));
    cloud.inject_error(Method::List, ProviderError::Unauthorized("injected".into()));
    assert_eq!(
        p.create(&request("c", "u2", "n2"))
            .await
            .expect_err("injected")
            .reason(),
        "QuotaExceeded"
    );
    assert_eq!(
        p.list(&filter()).await.expect_err("injected").reason(),
        "Unauthorized"
    );
    assert!(
        p.create(&request("c", "u2", "n2")).await.is_ok(),
        "injected errors are used once"
    );
    assert!(p.list(&filter()).await.is_ok());

    cloud.set_faults(
        "c",
        Some(kube_node_crds::v1alpha1::SimulatedFaults {
            insufficient_capacity_percent: 100,
            ..Default::default()
        }),
    );
    assert_eq!(
        p.create(&request("c", "u3", "n3"))
            .await
            .expect_err("fault")
            .reason(),
        "InsufficientCapacity"
    );
    cloud.set_faults("c", None);
    assert!(p.create(&request("c", "u3", "n3")).await.is_ok());
    assert_eq!(cloud.calls("create"), 5);
    assert_eq!(cloud.calls("list"), 2);
    assert_eq!(cloud.calls("get"), 1);
    assert_eq!(cloud.calls("nonsense"), 0);
}

#[test]
fn validate_names_the_field_of_nonsense() {
    let bad = [
        (json!({"zones": ["a", "b", "a"]}), "zones[2]"),
        (json!({"zones": [""]}), "zones[0]"),
        (json!({"zones": ["a/b"]}), "zones[0]"),
        (json!({"capacity": 0, "quota": 3}), "quota"),
        (
            json!({"faults": {"throttlePercent": 101}}),
            "faults.throttlePercent",
        ),
        (
            json!({"faults": {"insufficientCapacityPercent": 60, "transientPercent": 60}}),
            "faults",
        ),
        (
            json!({"faults": {"failCreateCall": 0}}),
            "faults.failCreateCall",
        ),
        (json!({"instanceType": ""}), "instanceType"),
    ];
    for (sim, field) in bad {
        let spec: SimulatedProviderSpec = serde_json::from_value(sim.clone()).expect("parses");
        match validate_spec(&spec) {
            Err(ProviderError::InvalidConfig(m)) => assert!(
                m.starts_with(&format!("spec.provider.simulated.{field}:")),
                "{sim}: {m}"
            ),
            other => panic!("{sim}: want InvalidConfig naming {field}, got {other:?}"),
        }
        // The factory refuses to build it, with the same error.
        let err = SimulatedCloud::new()
            .factory()
            .build(&class("c", sim))
            .err();
        assert_eq!(err.map(|e| e.reason()), Some("InvalidConfig"));
    }
    for sim in [
        json!({}),
        json!({"capacity": 0}),
        json!({"zones": ["sim-a", "sim-b"], "bootDelay": "2s", "faults": {"throttlePercent": 100}}),
    ] {
        let spec: SimulatedProviderSpec = serde_json::from_value(sim.clone()).expect("parses");
        assert_eq!(validate_spec(&spec), Ok(()), "{sim}");
    }
}

#[tokio::test]
async fn registry_builds_simulated_classes_and_validate_passes() {
    let cloud = SimulatedCloud::new();
    let mut registry = ProviderRegistry::new();
    registry.register(cloud.factory());
    assert_eq!(registry.types().collect::<Vec<_>>(), ["simulated"]);
    let p = registry.build(&class("c", json!({}))).expect("build");
    assert_eq!(p.name(), "simulated");
    assert_eq!(p.validate().await, Ok(()));

    // A simulated class without a `simulated` section uses the defaults.
    let mut bare = class("bare", json!({}));
    bare.spec.provider.simulated = None;
    assert!(registry.build(&bare).is_ok());

    // The factory refuses other backends' classes.
    let mut aws = class("aws", json!({}));
    aws.spec.provider.type_ = kube_node_crds::v1alpha1::ProviderType::Aws;
    let err = cloud.factory().build(&aws).err().expect("refused");
    assert_eq!(err.reason(), "InvalidConfig");
}
