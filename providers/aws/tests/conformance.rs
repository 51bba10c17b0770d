//! The provider conformance suite (providers/core/src/conformance.rs) against moto.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{class, env, unique};
use kube_node_provider::conformance::{self, Conformance};
use kube_node_provider::{ProviderError, ProviderFactory};
use kube_node_provider_aws::{AwsFactory, FaultInjector, inspect};

#[tokio::test]
async fn conformance_against_moto() {
    let env = env().await;
    let cluster = unique("conformance");
    let faults = FaultInjector::new();
    let factory = AwsFactory::new()
        .with_fault_injector(faults.clone())
        .with_max_attempts(2);
    let mut spec = env.spec();
    // One type, one subnet: an injected capacity error must surface (no fallback to hide it).
    spec.subnet_ids.truncate(1);
    let provider = factory
        .build(&class("conf", &cluster, spec))
        .expect("build");
    let mut c = Conformance::new(cluster.clone());
    c.node_class = Some("conf".into());
    c.unknown_provider_id = "aws:///us-east-1a/i-0000000000000000f".into();
    c.eventual_consistency_timeout = Duration::from_secs(20);
    c.wait_gone_timeout = Duration::from_secs(20);
    c.poll_interval = Duration::from_millis(100);
    let hook = faults.clone();
    c.inject_create_error = Some(Arc::new(move |e: ProviderError| {
        match e {
            ProviderError::InsufficientCapacity(_) => {
                hook.fail_next("RunInstances", "InsufficientInstanceCapacity", 1)
            }
            // The SDK retries throttling itself: fail every attempt of the one call.
            ProviderError::Throttled { .. } => {
                hook.fail_next("RunInstances", "RequestLimitExceeded", 2)
            }
            _ => return false,
        }
        true
    }));
    let report = conformance::run_all(provider.as_ref(), &c).await;
    match report.into_result() {
        Ok(r) => {
            assert!(r.skipped.is_empty(), "skipped {:?}", r.skipped);
            assert_eq!(r.passed.len(), 7, "{:?}", r.passed);
        }
        Err(failures) => panic!("the aws backend fails conformance against moto: {failures:#?}"),
    }
    assert_eq!(faults.pending(), 0, "every injected fault was consumed");
    // Every check cleaned up after itself.
    for cl in [cluster.clone(), format!("{cluster}-other")] {
        let live = inspect::running_instances(&env.client, &cl)
            .await
            .expect("describe");
        assert!(live.is_empty(), "{cl}: leaked {live:?}");
    }
}
