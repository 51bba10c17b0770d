//! The AWS provider against the moto EC2 emulator: idempotency across restarts, tags and
//! user-data at launch, delete semantics, InvalidConfig for bad AMIs/subnets/security groups,
//! capacity fallback, and EC2 calls counted per node lifecycle.

mod common;

use std::collections::BTreeMap;

use common::{Env, Moto, class, env, env_at, request, unique};
use kube_node_crds::names::tags;
use kube_node_provider::{DeleteOutcome, InstanceState, ListFilter, ProviderFactory};
use kube_node_provider_aws::{
    AwsFactory, CallCounter, FaultInjector, emulator_ssm_client, inspect,
};

fn uid(n: u32) -> String {
    format!("{:08x}-1111-4000-8000-{:012x}", n, rand_tail())
}

fn rand_tail() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 & 0xffff_ffff_ffff)
        .unwrap_or_default()
}

async fn live(
    env: &Env,
    cluster: &str,
) -> Vec<kube_node_provider_aws::aws_sdk_ec2::types::Instance> {
    inspect::running_instances(&env.client, cluster)
        .await
        .expect("describe")
}

#[tokio::test]
async fn create_twice_launches_one_instance_with_tags_and_user_data() {
    let env = env().await;
    let cluster = unique("twice");
    let provider = AwsFactory::new()
        .build(&class("general", &cluster, env.spec()))
        .expect("build");
    let req = request(&cluster, "general", &uid(1), "node-a");
    let first = provider.create(&req).await.expect("create");
    let second = provider.create(&req).await.expect("create again");
    assert_eq!(first.id, second.id);
    assert_eq!(first.provider_id, second.provider_id);
    assert!(
        first.provider_id.starts_with("aws:///us-east-1") && first.provider_id.ends_with(&first.id),
        "{}",
        first.provider_id
    );
    assert_ne!(first.state, InstanceState::Terminating);

    let instances = live(&env, &cluster).await;
    assert_eq!(
        instances.len(),
        1,
        "one instance for one node: {instances:?}"
    );
    let got = inspect::tags_of(&instances[0]);
    let want = [
        (tags::CLUSTER, cluster.as_str()),
        (tags::NODE_NAME, "node-a"),
        (tags::NODE_UID, req.idempotency_key.as_str()),
        (tags::NODESET, "workers"),
        (tags::NODE_CLASS, "general"),
        (tags::MANAGED_BY, tags::MANAGED_BY_VALUE),
        ("team", "infra"),
        ("Name", "node-a"),
    ];
    for (k, v) in want {
        assert_eq!(
            got.get(k).map(String::as_str),
            Some(v),
            "instance tag {k}: {got:?}"
        );
    }
    assert_eq!(
        instances[0].instance_type().map(|t| t.as_str()),
        Some("t3.small")
    );

    let user_data = inspect::user_data(&env.client, &first.id)
        .await
        .expect("user data")
        .expect("has user data");
    assert_eq!(user_data, req.user_data.as_ref().expect("payload").0);

    let volumes = inspect::volume_tags(&env.client, &first.id)
        .await
        .expect("volumes");
    assert!(!volumes.is_empty(), "the instance has a root volume");
    for (vol, t) in &volumes {
        for k in [
            tags::CLUSTER,
            tags::NODE_UID,
            tags::NODE_NAME,
            tags::MANAGED_BY,
        ] {
            assert_eq!(t.get(k), got.get(k), "volume {vol} tag {k}: {t:?}");
        }
    }

    assert_eq!(
        provider.delete(&first.provider_id).await.expect("delete"),
        DeleteOutcome::Deleting
    );
    assert!(live(&env, &cluster).await.is_empty());
}

/// The node-controller launched a machine, then crashed before writing the Node's providerID:
/// the next controller builds a new provider and creates again with the same request.
#[tokio::test]
async fn restart_between_run_instances_and_provider_id_write_launches_no_second_instance() {
    let env = env().await;
    let cluster = unique("restart");
    let req = request(&cluster, "general", &uid(2), "node-b");
    let before = {
        let provider = AwsFactory::new()
            .build(&class("general", &cluster, env.spec()))
            .expect("build");
        provider.create(&req).await.expect("create")
        // The provider (and its client) is dropped here: the "crash".
    };
    let counter = CallCounter::new();
    let provider = AwsFactory::new()
        .with_call_counter(counter.clone())
        .build(&class("general", &cluster, env.spec()))
        .expect("build after restart");
    let after = provider.create(&req).await.expect("create after restart");
    assert_eq!(before.provider_id, after.provider_id);
    assert_eq!(counter.get("RunInstances"), 0, "{:?}", counter.snapshot());
    assert_eq!(live(&env, &cluster).await.len(), 1);
    provider.delete(&after.provider_id).await.expect("delete");
}

#[tokio::test]
async fn delete_of_terminated_or_unknown_instances_is_gone() {
    let env = env().await;
    let cluster = unique("gone");
    let provider = AwsFactory::new()
        .build(&class("general", &cluster, env.spec()))
        .expect("build");
    let created = provider
        .create(&request(&cluster, "general", &uid(3), "node-c"))
        .await
        .expect("create");
    assert_eq!(
        provider.delete(&created.provider_id).await.expect("delete"),
        DeleteOutcome::Deleting
    );
    assert_eq!(
        provider
            .delete(&created.provider_id)
            .await
            .expect("delete again"),
        DeleteOutcome::Gone
    );
    let e = provider.get(&created.provider_id).await.expect_err("gone");
    assert_eq!(e.reason(), "NotFound", "{e}");
    for unknown in [
        "aws:///us-east-1a/i-0123456789abcdef0",
        "aws:///i-0123456789abcdef0",
        "gce:///project/zone/instance",
        "",
    ] {
        assert_eq!(
            provider.delete(unknown).await.expect("delete unknown"),
            DeleteOutcome::Gone,
            "{unknown}"
        );
        let e = provider.get(unknown).await.expect_err("unknown");
        assert_eq!(e.reason(), "NotFound", "{unknown}: {e}");
    }
    // A new create for the same Node after its machine was terminated gets a new machine.
    let again = provider
        .create(&request(&cluster, "general", &uid(4), "node-c2"))
        .await
        .expect("create");
    assert_ne!(again.id, created.id);
    provider.delete(&again.provider_id).await.expect("delete");
}

#[tokio::test]
async fn list_filters_by_cluster_and_node_class_and_drops_terminated() {
    let env = env().await;
    let cluster = unique("list");
    let factory = AwsFactory::new();
    let a = factory
        .build(&class("a", &cluster, env.spec()))
        .expect("build");
    let b = factory
        .build(&class("b", &cluster, env.spec()))
        .expect("build");
    let ia = a
        .create(&request(&cluster, "a", &uid(5), "n-a"))
        .await
        .expect("create");
    let ib = b
        .create(&request(&cluster, "b", &uid(6), "n-b"))
        .await
        .expect("create");
    let all = a
        .list(&ListFilter {
            cluster: cluster.clone(),
            node_class: None,
        })
        .await
        .expect("list");
    assert_eq!(all.len(), 2, "{all:?}");
    let only_a = a
        .list(&ListFilter {
            cluster: cluster.clone(),
            node_class: Some("a".into()),
        })
        .await
        .expect("list");
    assert_eq!(
        only_a.iter().map(|i| &i.id).collect::<Vec<_>>(),
        vec![&ia.id]
    );
    assert!(
        only_a[0].zone.is_some() && !only_a[0].addresses.is_empty(),
        "{only_a:?}"
    );
    b.delete(&ib.provider_id).await.expect("delete");
    let after = a
        .list(&ListFilter {
            cluster: cluster.clone(),
            node_class: None,
        })
        .await
        .expect("list");
    assert_eq!(
        after.iter().map(|i| &i.id).collect::<Vec<_>>(),
        vec![&ia.id]
    );
    a.delete(&ia.provider_id).await.expect("delete");
}

#[tokio::test]
async fn bad_subnet_and_security_group_are_invalid_config_naming_the_field() {
    let env = env().await;
    let cluster = unique("badsubnet");
    let mut spec = env.spec();
    spec.subnet_ids = vec!["subnet-0000000000000dead".into()];
    let counter = CallCounter::new();
    let provider = AwsFactory::new()
        .with_call_counter(counter.clone())
        .build(&class("general", &cluster, spec))
        .expect("build");
    let e = provider.validate().await.expect_err("bad subnet");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(e.message().contains("spec.provider.aws.subnetIds"), "{e}");
    let e = provider
        .create(&request(&cluster, "general", &uid(7), "n"))
        .await
        .expect_err("bad subnet");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(e.message().contains("spec.provider.aws.subnetIds"), "{e}");
    assert!(!e.is_retryable());
    // Not a retry storm: one lookup and one launch attempt, no SDK retries.
    assert_eq!(counter.get("RunInstances"), 1, "{:?}", counter.snapshot());
    assert!(live(&env, &cluster).await.is_empty());

    let mut spec = env.spec();
    spec.security_group_ids = vec!["sg-0000000000000dead".into()];
    let provider = AwsFactory::new()
        .build(&class("general", &cluster, spec))
        .expect("build");
    let e = provider.validate().await.expect_err("bad security group");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(
        e.message().contains("spec.provider.aws.securityGroupIds"),
        "{e}"
    );

    let good = AwsFactory::new()
        .build(&class("general", &cluster, env.spec()))
        .expect("build");
    good.validate().await.expect("a good NodeClass validates");
}

#[tokio::test]
async fn bad_ami_is_invalid_config_from_validate_and_create() {
    // A private server with AMI validation on, whatever the shared one runs with.
    let moto = Moto::spawn(true);
    let env = env_at(moto.endpoint()).await;
    let cluster = unique("badami");
    let mut spec = env.spec();
    spec.ami = Some("ami-0000000000000dead".into());
    let provider = AwsFactory::new()
        .build(&class("general", &cluster, spec))
        .expect("build");
    let e = provider.validate().await.expect_err("bad AMI");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(e.message().contains("spec.provider.aws.ami"), "{e}");
    let e = provider
        .create(&request(&cluster, "general", &uid(8), "n"))
        .await
        .expect_err("bad AMI");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(e.message().contains("spec.provider.aws.ami"), "{e}");
    assert!(live(&env, &cluster).await.is_empty());
}

#[tokio::test]
async fn ami_from_ssm_parameter_is_resolved_once_and_missing_parameter_is_invalid_config() {
    let env = env().await;
    let cluster = unique("ssm");
    let parameter = format!("/kube-node/test/{cluster}/ami");
    emulator_ssm_client(&env.endpoint, common::REGION)
        .put_parameter()
        .name(&parameter)
        .value(&env.ami)
        .r#type(kube_node_provider_aws::aws_sdk_ssm::types::ParameterType::String)
        .send()
        .await
        .expect("PutParameter");
    let mut spec = env.spec();
    spec.ami = None;
    spec.ami_ssm_parameter = Some(parameter.clone());
    let counter = CallCounter::new();
    let provider = AwsFactory::new()
        .with_call_counter(counter.clone())
        .build(&class("general", &cluster, spec.clone()))
        .expect("build");
    provider.validate().await.expect("validates");
    let a = provider
        .create(&request(&cluster, "general", &uid(20), "ssm-a"))
        .await
        .expect("create");
    let b = provider
        .create(&request(&cluster, "general", &uid(21), "ssm-b"))
        .await
        .expect("create");
    assert_eq!(counter.get("GetParameter"), 1, "{:?}", counter.snapshot());
    for i in live(&env, &cluster).await {
        assert_eq!(i.image_id(), Some(env.ami.as_str()));
    }
    for i in [a, b] {
        provider.delete(&i.provider_id).await.expect("delete");
    }

    spec.ami_ssm_parameter = Some(format!("{parameter}-missing"));
    let provider = AwsFactory::new()
        .build(&class("general", &cluster, spec))
        .expect("build");
    let e = provider.validate().await.expect_err("missing parameter");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(
        e.message().contains("spec.provider.aws.amiSsmParameter"),
        "{e}"
    );
    let e = provider
        .create(&request(&cluster, "general", &uid(22), "ssm-c"))
        .await
        .expect_err("missing parameter");
    assert_eq!(e.reason(), "InvalidConfig", "{e}");
    assert!(live(&env, &cluster).await.is_empty());
}

#[tokio::test]
async fn insufficient_capacity_falls_back_to_other_subnets_then_alternative_types() {
    let env = env().await;
    let cluster = unique("capacity");
    let faults = FaultInjector::new();
    let counter = CallCounter::new();
    let mut spec = env.spec();
    spec.alternative_instance_types = vec!["m5.large".into()];
    let provider = AwsFactory::new()
        .with_fault_injector(faults.clone())
        .with_call_counter(counter.clone())
        .build(&class("general", &cluster, spec))
        .expect("build");

    // No t3.small in either subnet: the alternative type launches.
    faults.fail_next("RunInstances", "InsufficientInstanceCapacity", 2);
    let i = provider
        .create(&request(&cluster, "general", &uid(9), "n1"))
        .await
        .expect("falls back");
    assert_eq!(i.instance_type.as_deref(), Some("m5.large"));
    assert_eq!(counter.get("RunInstances"), 3, "{:?}", counter.snapshot());

    // No t3.small in the first subnet only: the other subnet (zone) launches t3.small.
    faults.fail_next("RunInstances", "InsufficientInstanceCapacity", 1);
    let j = provider
        .create(&request(&cluster, "general", &uid(10), "n2"))
        .await
        .expect("falls back");
    assert_eq!(j.instance_type.as_deref(), Some("t3.small"));

    // Nothing anywhere: InsufficientCapacity, retryable, out of resources, nothing launched.
    faults.fail_next("RunInstances", "InsufficientInstanceCapacity", 4);
    let e = provider
        .create(&request(&cluster, "general", &uid(11), "n3"))
        .await
        .expect_err("no capacity");
    assert_eq!(e.reason(), "InsufficientCapacity");
    assert!(e.is_retryable() && e.is_out_of_resources());

    // Quota is not a capacity problem: no fallback.
    counter.reset();
    faults.fail_next("RunInstances", "VcpuLimitExceeded", 1);
    let e = provider
        .create(&request(&cluster, "general", &uid(12), "n4"))
        .await
        .expect_err("quota");
    assert_eq!(e.reason(), "QuotaExceeded");
    assert_eq!(counter.get("RunInstances"), 1);
    assert_eq!(faults.pending(), 0);

    assert_eq!(live(&env, &cluster).await.len(), 2);
    for p in [i, j] {
        provider.delete(&p.provider_id).await.expect("delete");
    }
}

#[tokio::test]
async fn injected_auth_and_throttling_errors_are_typed() {
    let env = env().await;
    let cluster = unique("auth");
    let faults = FaultInjector::new();
    let provider = AwsFactory::new()
        .with_fault_injector(faults.clone())
        .with_max_attempts(1)
        .build(&class("general", &cluster, env.spec()))
        .expect("build");
    faults.fail_next("DescribeImages", "AuthFailure", 1);
    let e = provider.validate().await.expect_err("auth");
    assert_eq!(e.reason(), "Unauthorized", "{e}");
    faults.fail_next("DescribeInstances", "RequestLimitExceeded", 1);
    let e = provider
        .list(&ListFilter {
            cluster: cluster.clone(),
            node_class: None,
        })
        .await
        .expect_err("throttled");
    assert_eq!(e.reason(), "Throttled", "{e}");
}

#[tokio::test]
async fn errors_never_carry_credentials() {
    let env = env().await;
    let mut spec = env.spec();
    // Nothing listens on port 1: a transport error whose text we check.
    spec.endpoint_url = Some("http://127.0.0.1:1".into());
    let provider = AwsFactory::new()
        .with_max_attempts(1)
        .build(&class("general", "c", spec))
        .expect("build");
    let e = provider.validate().await.expect_err("no server");
    assert_eq!(e.reason(), "Transient", "{e}");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("do-not-leak-this-secret"), "{text}");
    assert!(!text.contains("AKIATESTKEY"), "{text}");

    let mut class = class("general", "c", env.spec());
    class.credentials = Some(kube_node_provider::Credentials(BTreeMap::from([(
        "aws_access_key_id".to_string(),
        b"AKIAONLYKEY".to_vec(),
    )])));
    let e = AwsFactory::new()
        .build(&class)
        .err()
        .expect("no secret key");
    assert_eq!(e.reason(), "Unauthorized");
    assert!(!e.to_string().contains("AKIAONLYKEY"), "{e}");
}

/// Upper bound on EC2 calls for one node: create (lookup + launch) → get → list → delete.
#[tokio::test]
async fn ec2_calls_per_node_lifecycle_are_bounded() {
    let env = env().await;
    let cluster = unique("calls");
    let counter = CallCounter::new();
    let provider = AwsFactory::new()
        .with_call_counter(counter.clone())
        .build(&class("general", &cluster, env.spec()))
        .expect("build");
    let created = provider
        .create(&request(&cluster, "general", &uid(13), "n"))
        .await
        .expect("create");
    provider.get(&created.provider_id).await.expect("get");
    let listed = provider
        .list(&ListFilter {
            cluster: cluster.clone(),
            node_class: Some("general".into()),
        })
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    provider.delete(&created.provider_id).await.expect("delete");
    let calls = counter.snapshot();
    println!("EC2 calls for create → get → list → delete of one node: {calls:?}");
    assert_eq!(calls.get("RunInstances"), Some(&1));
    assert_eq!(calls.get("TerminateInstances"), Some(&1));
    assert!(counter.get("DescribeInstances") <= 3, "{calls:?}");
    assert!(counter.total() <= 5, "{calls:?}");
}

/// The benchmark: 10 nodes created, observed the way the node-controller does (one list per
/// NodeClass per wave, never a get per node), then deleted; prints calls per node lifecycle.
#[tokio::test]
async fn ec2_calls_per_node_for_ten_nodes_with_list_batching() {
    let env = env().await;
    let cluster = unique("bench");
    let counter = CallCounter::new();
    let provider = AwsFactory::new()
        .with_call_counter(counter.clone())
        .build(&class("general", &cluster, env.spec()))
        .expect("build");
    const NODES: u64 = 10;
    let mut created = Vec::new();
    for n in 0..NODES {
        let r = request(
            &cluster,
            "general",
            &uid(100 + n as u32),
            &format!("bench-{n}"),
        );
        created.push(provider.create(&r).await.expect("create"));
    }
    let filter = ListFilter {
        cluster: cluster.clone(),
        node_class: Some("general".into()),
    };
    // Two observation waves (launching, then running).
    for _ in 0..2 {
        let seen = provider.list(&filter).await.expect("list");
        assert_eq!(seen.len() as u64, NODES);
    }
    for i in &created {
        provider.delete(&i.provider_id).await.expect("delete");
    }
    // One wave to see them gone.
    assert!(provider.list(&filter).await.expect("list").is_empty());
    let calls = counter.snapshot();
    let per_node = counter.total() as f64 / NODES as f64;
    println!(
        "EC2 calls for {NODES} node lifecycles: {calls:?}; {per_node:.2} calls per node lifecycle"
    );
    // 2 per create + 1 per delete + 3 lists for the lot.
    assert!(counter.total() <= 3 * NODES + 3, "{calls:?}");
    let mut ids: BTreeMap<_, _> = BTreeMap::new();
    for i in &created {
        ids.insert(i.id.clone(), ());
    }
    assert_eq!(ids.len() as u64, NODES);
}

/// Issue 4: the gets of a reconcile wave share one DescribeInstances. Concurrent gets of
/// running, terminated and unknown instances are answered by one call (filtered by
/// `instance-id`, so an unknown id does not fail the others), and concurrent creates share
/// one idempotency lookup.
#[tokio::test]
async fn concurrent_gets_and_creates_share_one_describe_instances() {
    let env = env().await;
    let cluster = unique("batch");
    let counter = CallCounter::new();
    let provider = AwsFactory::new()
        .with_call_counter(counter.clone())
        .build(&class("general", &cluster, env.spec()))
        .expect("build");
    const NODES: usize = 6;
    let creates: Vec<_> = (0..NODES)
        .map(|n| {
            let provider = provider.clone();
            let r = request(
                &cluster,
                "general",
                &uid(300 + n as u32),
                &format!("batch-{n}"),
            );
            tokio::spawn(async move { provider.create(&r).await })
        })
        .collect();
    let mut created = Vec::new();
    for c in creates {
        created.push(c.await.expect("join").expect("create"));
    }
    assert_eq!(counter.get("RunInstances"), NODES as u64);
    assert_eq!(
        counter.get("DescribeInstances"),
        1,
        "one idempotency lookup for the wave: {:?}",
        counter.snapshot()
    );

    let terminated = created.pop().expect("one to terminate");
    provider
        .delete(&terminated.provider_id)
        .await
        .expect("delete");
    counter.reset();
    let unknown = format!(
        "aws:///{}/i-0123456789abcdef0",
        terminated.zone.clone().unwrap_or_default()
    );
    let mut wanted: Vec<String> = created.iter().map(|i| i.provider_id.clone()).collect();
    wanted.push(terminated.provider_id.clone());
    wanted.push(unknown.clone());
    let gets: Vec<_> = wanted
        .iter()
        .map(|pid| {
            let provider = provider.clone();
            let pid = pid.clone();
            tokio::spawn(async move { provider.get(&pid).await })
        })
        .collect();
    let mut answers = Vec::new();
    for g in gets {
        answers.push(g.await.expect("join"));
    }
    assert_eq!(
        counter.get("DescribeInstances"),
        1,
        "{} concurrent gets: {:?}",
        wanted.len(),
        counter.snapshot()
    );
    for (i, answer) in created.iter().zip(&answers) {
        let got = answer.as_ref().expect("live instance");
        assert_eq!(got.provider_id, i.provider_id);
        assert_eq!(got.node_uid(), i.node_uid());
    }
    for (pid, answer) in wanted.iter().zip(&answers).skip(created.len()) {
        let e = answer.as_ref().expect_err("gone");
        assert_eq!(e.reason(), "NotFound", "{pid}: {e}");
    }

    // A get on its own still works, and an error of the batched call reaches the caller.
    counter.reset();
    provider.get(&created[0].provider_id).await.expect("get");
    assert_eq!(counter.get("DescribeInstances"), 1);
    for i in &created {
        provider.delete(&i.provider_id).await.expect("delete");
    }
}
