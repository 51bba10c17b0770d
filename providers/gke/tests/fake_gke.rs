//! The GKE backend with Google's real client crates against the in-test fake of the
//! endpoints it uses (tests/common): sizing, named removals, request ids, long-running
//! operations, typed errors, credentials.

mod common;

use std::time::Duration;

use common::{CLIENT_EMAIL, Fake, Fault, POOL, PROJECT, ZONES, method};
use kube_node_provider::{
    DeleteOutcome, GroupProvider, InstanceState, ListFilter, Provider, ProviderError,
};
use kube_node_provider_gke::{CallCounter, GkeFactory, GkeProvider, PollSettings};

fn factory(counter: &CallCounter) -> GkeFactory {
    GkeFactory::new()
        .with_call_counter(counter.clone())
        .with_poll(PollSettings {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
        })
}

async fn setup() -> (Fake, GkeProvider, CallCounter) {
    let fake = Fake::start().await;
    let counter = CallCounter::new();
    let p = factory(&counter)
        .build_gke(&fake.class("gke-pool"))
        .expect("build");
    (fake, p, counter)
}

/// Polls the pool's machines until `done` holds, or fails after 10 s.
async fn until(
    p: &GkeProvider,
    what: &str,
    done: impl Fn(&[kube_node_provider::Instance]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let i = p.instances().await.expect("instances");
        if done(&i) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {i:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn running(i: &[kube_node_provider::Instance]) -> usize {
    i.iter()
        .filter(|x| x.state == InstanceState::Running)
        .count()
}

#[tokio::test]
async fn validate_accepts_the_pool_and_names_what_is_wrong() {
    let (fake, p, _) = setup().await;
    p.validate().await.expect("the pool is valid");
    assert_eq!(
        fake.with(|s| s.unauthenticated),
        0,
        "every call carried the key's token"
    );

    fake.with(|s| s.autoscaling = true);
    let e = p.validate().await.expect_err("autoscaling on");
    assert_eq!(e.reason(), "InvalidConfig");
    assert!(
        e.message().contains("spec.provider.gke.nodePool") && e.message().contains("autoscaling"),
        "{e}"
    );

    fake.with(|s| {
        s.autoscaling = false;
        s.pool_exists = false;
    });
    let e = p.validate().await.expect_err("no pool");
    assert_eq!(e.reason(), "InvalidConfig");
    assert!(e.message().contains("spec.provider.gke.nodePool"), "{e}");
    assert!(e.message().contains(POOL), "{e}");

    // A pool of another cluster is not found under this one.
    fake.with(|s| s.pool_exists = true);
    let mut other = fake.class("other");
    if let Some(g) = other.spec.provider.gke.as_mut() {
        g.cluster = "staging".into();
    }
    let counter = CallCounter::new();
    let e = factory(&counter)
        .build_gke(&other)
        .expect("build")
        .validate()
        .await
        .expect_err("wrong cluster");
    assert_eq!(e.reason(), "InvalidConfig");
    assert!(e.message().contains("staging"), "{e}");
}

#[tokio::test]
async fn scale_0_5_2_0_counting_the_calls_of_each_step() {
    let (fake, p, counter) = setup().await;
    let g: &dyn GroupProvider = p.as_group().expect("group-sized");
    assert!(p.capabilities().group_sized);
    assert_eq!(
        g.group_name(),
        format!("projects/{PROJECT}/locations/europe-west1/clusters/prod/nodePools/{POOL}")
    );
    assert_eq!(g.target_size().await.expect("size"), 0);
    let mut steps = Vec::new();

    fake.reset_counts();
    g.set_target_size(5).await.expect("0 → 5");
    steps.push(("0 → 5", fake.counts()));
    assert_eq!(
        fake.with(|s| s.groups.iter().map(|g| g.target).collect::<Vec<_>>()),
        vec![2, 2, 1]
    );
    assert_eq!(g.target_size().await.expect("size"), 5);
    until(&p, "5 running", |i| i.len() == 5 && running(i) == 5).await;

    // Setting the size it has changes nothing and resizes nothing.
    fake.reset_counts();
    g.set_target_size(5).await.expect("5 → 5");
    let idle = fake.counts();
    assert_eq!(idle.get(method::RESIZE), None, "{idle:?}");
    steps.push(("5 → 5", idle));

    // 5 → 2 names its victims: three machines, one per zone and one more.
    let before = p.instances().await.expect("instances");
    let victims: Vec<String> = before
        .iter()
        .take(3)
        .map(|i| i.provider_id.clone())
        .collect();
    fake.reset_counts();
    g.delete_instances(&victims).await.expect("5 → 2");
    steps.push(("5 → 2 (3 named)", fake.counts()));
    assert_eq!(g.target_size().await.expect("size"), 2);
    let now = p.instances().await.expect("instances");
    for i in &now {
        let named = victims.contains(&i.provider_id);
        assert_eq!(i.state == InstanceState::Terminating, named, "{i:?}");
    }
    until(&p, "2 left", |i| i.len() == 2).await;
    let left: Vec<String> = p
        .instances()
        .await
        .expect("instances")
        .into_iter()
        .map(|i| i.provider_id)
        .collect();
    assert!(
        left.iter().all(|l| !victims.contains(l)),
        "exactly the named machines went: {left:?}"
    );

    fake.reset_counts();
    g.set_target_size(0).await.expect("2 → 0");
    steps.push(("2 → 0", fake.counts()));
    until(&p, "none left", |i| i.is_empty()).await;
    assert_eq!(fake.pending_faults(), 0);
    assert_eq!(fake.with(|s| s.unauthenticated), 0);

    for (step, counts) in &steps {
        let total: u64 = counts.values().sum();
        eprintln!("calls for {step}: {total} {counts:?}");
    }
    // The backend's own counter sees the same calls as the fake.
    let fake_total: u64 = fake.with(|s| s.counts.values().sum());
    assert!(counter.total() >= fake_total, "{:?}", counter.snapshot());
    // 0 → 5: three group reads, three resizes (one per zone) and their operation polls;
    // the pool itself is read once and cached.
    let (_, first) = &steps[0];
    assert_eq!(first.get(method::GET_MIG), Some(&3), "{first:?}");
    assert_eq!(first.get(method::RESIZE), Some(&3), "{first:?}");
    assert!(
        first.get(method::GET_OPERATION).copied().unwrap_or(0) >= 3,
        "{first:?}"
    );
    let (_, named) = &steps[2];
    let zones: std::collections::BTreeSet<&str> =
        victims.iter().filter_map(|v| v.split('/').nth(3)).collect();
    assert_eq!(
        named.get(method::DELETE).copied(),
        Some(zones.len() as u64),
        "one deleteInstances per zone concerned: {named:?}"
    );
    assert_eq!(named.get(method::RESIZE), None, "{named:?}");
}

#[tokio::test]
async fn a_named_deletion_retried_lowers_the_size_once() {
    let (fake, p, _) = setup().await;
    let g = p.as_group().expect("group");
    g.set_target_size(3).await.expect("3");
    until(&p, "3", |i| i.len() == 3).await;
    let victim = p.instances().await.expect("instances")[0]
        .provider_id
        .clone();
    // The deletion is applied but its answer is lost.
    fake.push_fault(Fault {
        method: method::DELETE.into(),
        http: 503,
        status: "UNAVAILABLE".into(),
        reason: String::new(),
        message: "The service is currently unavailable.".into(),
        times: 1,
        after_effect: true,
        retry_after: None,
        permission: None,
    });
    let e = g
        .delete_instances(std::slice::from_ref(&victim))
        .await
        .expect_err("lost answer");
    assert_eq!(e.reason(), "Transient", "{e}");
    g.delete_instances(std::slice::from_ref(&victim))
        .await
        .expect("retry");
    g.delete_instances(std::slice::from_ref(&victim))
        .await
        .expect("and again");
    assert_eq!(g.target_size().await.expect("size"), 2, "lowered once");
    assert_eq!(
        fake.with(|s| s.applied.get(method::DELETE).copied()),
        Some(1)
    );
    // Once gone, it still counts as deleted; delete says Gone.
    until(&p, "victim gone", |i| {
        i.iter().all(|x| x.provider_id != victim)
    })
    .await;
    g.delete_instances(std::slice::from_ref(&victim))
        .await
        .expect("gone is deleted");
    assert_eq!(
        p.delete(&victim).await.expect("delete"),
        DeleteOutcome::Gone
    );
    assert_eq!(g.target_size().await.expect("size"), 2);
}

#[tokio::test]
async fn a_machine_outside_the_pool_is_invalid_config_and_nothing_is_deleted() {
    let (fake, p, _) = setup().await;
    let g = p.as_group().expect("group");
    g.set_target_size(3).await.expect("3");
    let mine = p.instances().await.expect("instances")[0]
        .provider_id
        .clone();
    for stranger in [
        format!(
            "gce://other-project/{}/gke-prod-pool-1-0000abc0-zzzz",
            ZONES[0]
        ),
        format!("gce://{PROJECT}/us-east1-b/gke-prod-pool-1-0000abc0-zzzz"),
        format!("gce://{PROJECT}/{}/gke-prod-pool-2-0000abc0-zzzz", ZONES[0]),
        "aws:///us-east-1a/i-0abc".to_string(),
    ] {
        let e = g
            .delete_instances(&[mine.clone(), stranger.clone()])
            .await
            .expect_err("not in the pool");
        assert_eq!(e.reason(), "InvalidConfig", "{e}");
        assert!(e.message().contains(&stranger), "{e}");
    }
    assert_eq!(g.target_size().await.expect("size"), 3, "nothing deleted");
    assert_eq!(fake.with(|s| s.count(method::DELETE)), 0);
    assert!(fake.machines().iter().all(|(_, _, deleting)| !deleting));
}

#[tokio::test]
async fn concurrent_resizes_to_one_size_are_applied_once() {
    let (fake, p, _) = setup().await;
    let g = p.as_group().expect("group");
    let (a, b) = tokio::join!(g.set_target_size(4), g.set_target_size(4));
    a.expect("first");
    b.expect("second");
    assert_eq!(g.target_size().await.expect("size"), 4);
    let applied = fake.with(|s| s.applied.get(method::RESIZE).copied().unwrap_or(0));
    assert_eq!(
        applied, 3,
        "one resize per zone, the duplicates answered by request id"
    );
    let ids = fake.with(|s| s.seen_request_ids.clone());
    assert!(
        ids.iter()
            .all(|id| id.len() == 36 && id != "00000000-0000-0000-0000-000000000000"),
        "{ids:?}"
    );
    // Back and forth: a new resize to a size the group had before gets a new id (the
    // fingerprint changed), so it is applied.
    g.set_target_size(1).await.expect("4 → 1");
    g.set_target_size(4).await.expect("1 → 4");
    assert_eq!(fake.with(|s| s.total_target()), 4);
    assert_eq!(g.target_size().await.expect("size"), 4);
}

#[tokio::test]
async fn a_slow_operation_is_waited_for_and_a_timed_out_one_is_picked_up_again() {
    let (fake, _, _) = setup().await;
    fake.with(|s| s.op_delay = Duration::from_millis(800));
    let counter = CallCounter::new();
    let impatient = GkeFactory::new()
        .with_call_counter(counter.clone())
        .with_poll(PollSettings {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(100),
            timeout: Duration::from_millis(300),
        })
        .build_gke(&fake.class("gke-pool"))
        .expect("build");
    let g = impatient.as_group().expect("group");
    let e = g.set_target_size(1).await.expect_err("still running");
    assert_eq!(e.reason(), "Transient", "{e}");
    assert!(e.message().contains("still running"), "{e}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    // The size is already set: the retry finds nothing to do.
    g.set_target_size(1).await.expect("retry");
    assert_eq!(
        fake.with(|s| s.applied.get(method::RESIZE).copied()),
        Some(1)
    );
    assert!(
        counter.get(method::GET_OPERATION) >= 2,
        "{:?}",
        counter.snapshot()
    );

    // The patient provider polls with backoff until DONE.
    let counter = CallCounter::new();
    let patient = factory(&counter)
        .build_gke(&fake.class("gke-pool"))
        .expect("build");
    patient
        .as_group()
        .expect("group")
        .set_target_size(2)
        .await
        .expect("waited");
    let polls = counter.get(method::GET_OPERATION);
    assert!(
        (2..=12).contains(&polls),
        "backoff, not a busy loop: {polls}"
    );
}

#[tokio::test]
async fn errors_come_back_typed_and_the_next_call_succeeds() {
    let (fake, p, _) = setup().await;
    let g = p.as_group().expect("group");
    p.validate().await.expect("valid");

    fake.fail_next(
        method::RESIZE,
        400,
        "FAILED_PRECONDITION",
        "",
        "Operation operation-1 is currently upgrading node pool \"pool-1\". Please wait and try again once it is done.",
        1,
    );
    let e = g.set_target_size(1).await.expect_err("in progress");
    assert_eq!(e.reason(), "Throttled", "{e}");
    assert!(e.is_retryable());

    fake.fail_next(
        method::RESIZE,
        409,
        "ABORTED",
        "",
        "Operation already in progress",
        1,
    );
    assert_eq!(
        g.set_target_size(1).await.expect_err("409").reason(),
        "Throttled"
    );

    fake.push_fault(Fault {
        method: method::GET_MIG.into(),
        http: 429,
        status: "RESOURCE_EXHAUSTED".into(),
        reason: "RATE_LIMIT_EXCEEDED".into(),
        message:
            "Quota exceeded for quota metric 'Read requests' and limit 'Read requests per minute'"
                .into(),
        times: 1,
        after_effect: false,
        retry_after: Some(3),
        permission: None,
    });
    let e = g.target_size().await.expect_err("429");
    // A rate limit worded as a "quota" on requests is still a rate limit.
    assert_eq!(e.reason(), "Throttled", "{e}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));

    fake.push_fault(Fault {
        method: method::RESIZE.into(),
        http: 403,
        status: "PERMISSION_DENIED".into(),
        reason: "IAM_PERMISSION_DENIED".into(),
        message: "Required 'compute.instanceGroupManagers.update' permission for 'projects/kube-node-test/zones/europe-west1-b/instanceGroupManagers/x'".into(),
        times: 1,
        after_effect: false,
        retry_after: None,
        permission: Some("compute.instanceGroupManagers.update".into()),
    });
    let e = g.set_target_size(1).await.expect_err("403");
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    assert!(
        e.message().contains("compute.instanceGroupManagers.update"),
        "{e}"
    );
    assert!(!e.is_retryable());

    fake.fail_next(
        method::GET_NODE_POOL,
        403,
        "PERMISSION_DENIED",
        "IAM_PERMISSION_DENIED",
        "Permission denied on resource project kube-node-test.",
        1,
    );
    let e = p.validate().await.expect_err("403 on the pool");
    assert!(e.message().contains("container.clusters.get"), "{e}");

    fake.fail_next_operation(
        "resize",
        "QUOTA_EXCEEDED",
        "Quota 'CPUS' exceeded.  Limit: 24.0 in region europe-west1.",
    );
    let e = g.set_target_size(1).await.expect_err("quota");
    assert_eq!(e.reason(), "QuotaExceeded", "{e}");
    assert!(e.is_out_of_resources());

    fake.fail_next_operation("resize", "ZONE_RESOURCE_POOL_EXHAUSTED", "The zone 'projects/kube-node-test/zones/europe-west1-b' does not have enough resources available to fulfill the request.");
    let e = g.set_target_size(1).await.expect_err("capacity");
    assert_eq!(e.reason(), "InsufficientCapacity", "{e}");

    fake.fail_next(
        method::LIST,
        503,
        "UNAVAILABLE",
        "",
        "The service is currently unavailable.",
        1,
    );
    assert_eq!(g.instances().await.expect_err("503").reason(), "Transient");

    assert_eq!(fake.pending_faults(), 0);
    g.set_target_size(1).await.expect("the next call succeeds");
    assert_eq!(g.target_size().await.expect("size"), 1);
}

#[tokio::test]
async fn the_instance_level_seam_follows_the_contract() {
    let (fake, p, _) = setup().await;
    let g = p.as_group().expect("group");
    g.set_target_size(5).await.expect("5");
    // Short pages (two machines a page): every page is followed.
    fake.with(|s| s.page_cap = 1);
    until(&p, "5", |i| i.len() == 5).await;

    let filter = ListFilter {
        cluster: "test-cluster".into(),
        node_class: Some("gke-pool".into()),
    };
    let listed = p.list(&filter).await.expect("list");
    assert_eq!(listed.len(), 5);
    for i in &listed {
        assert!(
            i.provider_id.starts_with(&format!("gce://{PROJECT}/")),
            "{i:?}"
        );
        assert_eq!(
            i.tags.get("kube-node.io/cluster").map(String::as_str),
            Some("test-cluster")
        );
        assert_eq!(
            i.tags.get("kube-node.io/node-class").map(String::as_str),
            Some("gke-pool")
        );
        assert_eq!(i.instance_type.as_deref(), Some("e2-standard-4"));
        assert_eq!(p.get(&i.provider_id).await.expect("get").id, i.id);
    }
    for other in [
        ListFilter {
            cluster: "another".into(),
            node_class: None,
        },
        ListFilter {
            cluster: "test-cluster".into(),
            node_class: Some("another".into()),
        },
    ] {
        assert!(p.list(&other).await.expect("list").is_empty(), "{other:?}");
    }

    let e = p
        .create(&kube_node_provider::CreateRequest {
            idempotency_key: "uid".into(),
            node_name: "n".into(),
            tags: Default::default(),
            user_data: None,
        })
        .await
        .expect_err("create");
    assert_eq!(e.reason(), "Unimplemented");
    assert!(e.message().contains("scale a NodeSet"), "{e}");

    let unknown = format!("gce://{PROJECT}/{}/gke-prod-pool-1-0000abc0-none", ZONES[0]);
    assert!(matches!(
        p.get(&unknown).await,
        Err(ProviderError::NotFound(_))
    ));
    assert!(matches!(
        p.get("aws:///us-east-1a/i-0abc").await,
        Err(ProviderError::NotFound(_))
    ));
    assert_eq!(
        p.delete(&unknown).await.expect("delete"),
        DeleteOutcome::Gone
    );
    assert_eq!(
        p.delete("not-a-provider-id").await.expect("delete"),
        DeleteOutcome::Gone
    );

    // The first delete waits for its operation (150 ms, polled at 20, 40, 80, then every
    // 100 ms): the machine must still be deleting when the second delete looks, whatever the
    // timing of the polls.
    fake.with(|s| s.delete_delay = Duration::from_secs(2));
    let victim = listed[0].provider_id.clone();
    assert_eq!(
        p.delete(&victim).await.expect("delete"),
        DeleteOutcome::Deleting
    );
    assert_eq!(
        p.delete(&victim).await.expect("again"),
        DeleteOutcome::Deleting
    );
    assert_eq!(g.target_size().await.expect("size"), 4);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match p.get(&victim).await {
            Err(ProviderError::NotFound(_)) => break,
            Ok(i) => assert_eq!(i.state, InstanceState::Terminating),
            Err(e) => panic!("{e}"),
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(p.delete(&victim).await.expect("gone"), DeleteOutcome::Gone);
}

/// A resize Compute Engine accepts but whose VMs it cannot make (a zone out of resources, a
/// quota): the group keeps its target size and lists those machines `CREATING` with
/// `lastAttempt.errors`; `instances` and `get` report exactly those machines with the typed
/// failure, in the same one `listManagedInstances` per group.
#[tokio::test]
async fn failed_creations_come_back_typed_on_exactly_those_machines() {
    let (fake, p, counter) = setup().await;
    fake.manual_clock();
    let g = p.as_group().expect("group");
    fake.fail_next_creations(
        ZONES[0],
        1,
        "ZONE_RESOURCE_POOL_EXHAUSTED",
        "The zone 'projects/kube-node-test/zones/europe-west1-b' does not have enough resources available to fulfill the request.",
    );
    fake.fail_next_creations(
        ZONES[1],
        1,
        "QUOTA_EXCEEDED",
        "Quota 'CPUS' exceeded. Limit: 24.0 in region europe-west1.",
    );
    g.set_target_size(6).await.expect("the resize is accepted");
    fake.advance();
    fake.advance();

    let failed = fake.failed_machines();
    assert_eq!(failed.len(), 2, "{failed:?}");
    counter.reset();
    let listed = g.instances().await.expect("instances");
    assert_eq!(
        counter.total(),
        3,
        "one listManagedInstances per group, nothing more: {:?}",
        counter.snapshot()
    );
    assert_eq!(listed.len(), 6, "{listed:#?}");
    assert_eq!(g.target_size().await.expect("size"), 6, "the size stays");
    let key: serde_json::Value = serde_json::from_str(common::SERVICE_ACCOUNT).expect("json");
    let secrets = [
        key["private_key"]
            .as_str()
            .and_then(|k| k.lines().nth(1))
            .expect("a key line"),
        key["private_key_id"].as_str().expect("key id"),
    ];
    for i in &listed {
        let want = failed.iter().find(|(z, n, _)| {
            i.provider_id == Fake::provider_id(z, n) && i.zone.as_deref() == Some(z.as_str())
        });
        match (want, &i.failure) {
            (None, None) => assert_eq!(i.state, InstanceState::Running, "{i:?}"),
            (Some((zone, name, code)), Some(e)) => {
                assert_eq!(i.state, InstanceState::Pending, "{i:?}");
                let kind = match code.as_str() {
                    "ZONE_RESOURCE_POOL_EXHAUSTED" => "InsufficientCapacity",
                    _ => "QuotaExceeded",
                };
                assert_eq!(e.reason(), kind, "{e}");
                assert!(e.is_out_of_resources() && e.is_retryable(), "{e}");
                for part in [zone.as_str(), name.as_str(), code.as_str()] {
                    assert!(e.message().contains(part), "{part}: {e}");
                }
                for secret in secrets {
                    assert!(!e.to_string().contains(secret), "{e}");
                }
                assert_eq!(
                    p.get(&i.provider_id).await.expect("get").failure.as_ref(),
                    Some(e),
                    "get says the same"
                );
            }
            other => panic!("{i:?}: {other:?}"),
        }
    }

    // Another code: a typed error all the same, with Compute Engine's code and message.
    fake.fail_next_creations(
        ZONES[0],
        1,
        "CONDITION_NOT_MET",
        "Instance template is being updated",
    );
    g.set_target_size(7).await.expect("7");
    fake.advance();
    let listed = g.instances().await.expect("instances");
    let failures: Vec<_> = listed.iter().filter_map(|i| i.failure.as_ref()).collect();
    assert_eq!(failures.len(), 3, "{listed:#?}");
    let other = failures
        .iter()
        .find(|e| e.message().contains("CONDITION_NOT_MET"))
        .expect("the third failure");
    assert_eq!(other.reason(), "Transient");
    assert!(
        other
            .message()
            .contains("Instance template is being updated"),
        "{other}"
    );

    // A failed machine is removed by name like any other: Terminating without a failure,
    // then gone, and the size is one lower.
    let victim = listed
        .iter()
        .find(|i| {
            i.failure
                .as_ref()
                .is_some_and(|e| e.reason() == "QuotaExceeded")
        })
        .expect("the quota failure")
        .provider_id
        .clone();
    g.delete_instances(std::slice::from_ref(&victim))
        .await
        .expect("delete");
    let leaving = p.get(&victim).await.expect("still listed");
    assert_eq!(leaving.state, InstanceState::Terminating);
    assert_eq!(leaving.failure, None);
    fake.advance();
    assert!(matches!(
        p.get(&victim).await,
        Err(ProviderError::NotFound(_))
    ));
    assert_eq!(g.target_size().await.expect("size"), 6);
    assert_eq!(fake.failed_machines().len(), 2);
}

#[tokio::test]
async fn credentials_come_from_the_secret_and_never_show() {
    let (fake, p, _) = setup().await;
    p.validate().await.expect("valid");
    assert_eq!(
        fake.with(|s| s.unauthenticated),
        0,
        "the fake saw JWTs issued by {CLIENT_EMAIL}"
    );
    let key: serde_json::Value = serde_json::from_str(common::SERVICE_ACCOUNT).expect("json");
    let pem = key["private_key"].as_str().expect("pem");
    let body = pem.lines().nth(1).expect("a key line");
    assert!(!format!("{p:?}").contains(body));

    // A Secret without the key: Unauthorized, naming the key.
    let mut class = fake.class("gke-pool");
    class.credentials = Some(kube_node_provider::Credentials(
        [("other".to_string(), b"x".to_vec())].into(),
    ));
    let e = GkeFactory::new().build_gke(&class).expect_err("no key");
    assert_eq!(e.reason(), "Unauthorized");
    assert!(e.message().contains("service-account.json"), "{e}");

    // A key the API rejects: every error says Unauthorized and quotes no key material.
    fake.fail_next(
        method::GET_NODE_POOL,
        401,
        "UNAUTHENTICATED",
        "",
        "Request had invalid authentication credentials.",
        1,
    );
    let e = p.validate().await.expect_err("401");
    assert_eq!(e.reason(), "Unauthorized");
    assert!(!e.to_string().contains(body));
}
