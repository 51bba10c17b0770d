//! The provider conformance suite (providers/core/src/conformance.rs) against the simulated
//! backend, with and without delays and list lag.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CLUSTER, class};
use kube_node_provider::conformance::{self, Conformance};
use kube_node_provider::{Provider, ProviderError};
use kube_node_provider_simulated::SimulatedCloud;
use serde_json::json;

async fn conform(sim: serde_json::Value) {
    let cloud = SimulatedCloud::new();
    let provider: Arc<dyn Provider> = cloud
        .factory()
        .build(&class("conf", sim.clone()))
        .expect("build");
    let mut c = Conformance::new(CLUSTER);
    c.node_class = Some("conf".into());
    c.unknown_provider_id = "simulated:///sim-a/sim-000000000000".into();
    c.eventual_consistency_timeout = Duration::from_secs(30);
    c.wait_gone_timeout = Duration::from_secs(30);
    c.poll_interval = Duration::from_millis(250);
    let hook = cloud.clone();
    c.inject_create_error = Some(Arc::new(move |e: ProviderError| {
        hook.inject_next_create_error(e);
        true
    }));
    let report = conformance::run_all(provider.as_ref(), &c).await;
    match report.into_result() {
        Ok(r) => {
            assert!(r.skipped.is_empty(), "{sim}: skipped {:?}", r.skipped);
            assert_eq!(r.passed.len(), 7, "{sim}: {:?}", r.passed);
        }
        Err(failures) => panic!("{sim}: the simulated backend fails conformance: {failures:#?}"),
    }
    // Every check cleaned up after itself.
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(
        cloud.machine_count(),
        0,
        "{sim}: leaked {:?}",
        cloud.machines()
    );
}

#[tokio::test(start_paused = true)]
async fn conformance_without_delays() {
    conform(json!({})).await;
}

#[tokio::test(start_paused = true)]
async fn conformance_with_list_lag() {
    conform(json!({"listLag": "5s"})).await;
}

#[tokio::test(start_paused = true)]
async fn conformance_with_boot_and_delete_delays() {
    conform(json!({"bootDelay": "10s", "deleteDelay": "4s", "listLag": "2s", "zones": ["sim-a", "sim-b"]})).await;
}

#[tokio::test(start_paused = true)]
async fn conformance_detects_a_list_that_misses_machines() {
    // A list lag longer than the suite waits is exactly an incomplete list.
    let cloud = SimulatedCloud::new();
    let provider = cloud
        .factory()
        .build(&class("conf", json!({"listLag": "10m"})))
        .expect("build");
    let mut c = Conformance::new(CLUSTER);
    c.eventual_consistency_timeout = Duration::from_secs(5);
    let err = conformance::list_is_complete(provider.as_ref(), &c)
        .await
        .expect_err("an incomplete list fails");
    assert_eq!(err.check, "list_is_complete");
    assert!(err.message.contains("still misses"), "{err}");
    // Without the hook, the typed-error check is skipped, not failed.
    assert_eq!(
        conformance::errors_are_typed(provider.as_ref(), &c).await,
        Ok(false)
    );
}
