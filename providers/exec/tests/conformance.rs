//! The provider conformance suite against the reference program
//! (examples/exec-provider/machines.py) in a temporary state directory.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kube_node_provider::conformance::{self, Conformance};
use kube_node_provider::{CreateRequest, Provider, Sensitive};
use kube_node_provider_exec::ExecProvider;

fn context(state: &TempDir) -> Conformance {
    let mut c = Conformance::new(CLUSTER);
    c.node_class = Some(CLASS.to_string());
    c.unknown_provider_id = "exec:///lab-a/m-000000000000".into();
    c.eventual_consistency_timeout = Duration::from_secs(20);
    c.wait_gone_timeout = Duration::from_secs(20);
    c.poll_interval = Duration::from_millis(100);
    // The reference program's test hook: its next create fails with this error.
    let inject_dir = state.join("inject");
    c.inject_create_error = Some(Arc::new(move |e| {
        std::fs::create_dir_all(&inject_dir).expect("inject dir");
        let body = serde_json::json!({
            "kind": e.reason(),
            "message": e.message(),
            "retryAfterSeconds": e.retry_after().map(|d| d.as_secs_f64()),
        });
        std::fs::write(inject_dir.join("create-error.json"), body.to_string())
            .expect("write inject file");
        true
    }));
    c
}

async fn run_suite(config: serde_json::Value) {
    let state = TempDir::new("conformance");
    let provider =
        ExecProvider::new(&class(reference_spec(state.path(), config), None)).expect("valid");
    provider
        .validate()
        .await
        .expect("the reference program validates");
    let report = conformance::run_all(&provider, &context(&state)).await;
    let report = report
        .into_result()
        .unwrap_or_else(|failed| panic!("the reference program does not conform: {failed:#?}"));
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    assert_eq!(report.passed.len(), 7, "passed: {:?}", report.passed);
    // Every machine a check made was deleted again (with deleteSeconds, the files of
    // Terminating machines stay until a later invocation finds their time is up).
    let live: Vec<_> = reference_machines(state.path())
        .into_iter()
        .filter(|m| m["deleteRequestedUnix"].is_null())
        .collect();
    assert_eq!(live, Vec::<serde_json::Value>::new());
}

#[tokio::test]
async fn reference_program_conforms() {
    run_suite(serde_json::json!({})).await;
}

/// Machines that boot and die slowly: get and list see Pending and Terminating states.
#[tokio::test]
async fn reference_program_conforms_with_slow_delete() {
    run_suite(serde_json::json!({ "deleteSeconds": 1, "bootSeconds": 1 })).await;
}

/// Concurrent creates for one Node (kube-node retrying while a first call still runs) make
/// one machine: the program's lock and kube-node's parallelism together keep create
/// idempotent.
#[tokio::test]
async fn concurrent_creates_with_one_key_make_one_machine() {
    let state = TempDir::new("concurrent-create");
    let provider = Arc::new(
        ExecProvider::new(&class(
            reference_spec(state.path(), serde_json::json!({})),
            None,
        ))
        .expect("valid"),
    );
    let req = Conformance::default_request(CLUSTER, "0b0e6c9a-uid", "node-a");
    let calls = (0..6).map(|_| {
        let p = provider.clone();
        let r = req.clone();
        tokio::spawn(async move { p.create(&r).await })
    });
    let mut ids = Vec::new();
    for c in calls {
        ids.push(c.await.expect("task").expect("create").provider_id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let machines = reference_machines(state.path());
    assert_eq!(machines.len(), 1);
    assert_eq!(machines[0]["idempotencyKey"], "0b0e6c9a-uid");
    assert_eq!(machines[0]["nodeName"], "node-a");
}

/// The join payload reaches the program but is not kept on disk by the reference program.
#[tokio::test]
async fn create_passes_user_data() {
    let state = TempDir::new("user-data");
    let provider = ExecProvider::new(&class(
        reference_spec(state.path(), serde_json::json!({})),
        None,
    ))
    .expect("valid");
    let payload = "#cloud-config\ntoken: abcdef.0123456789abcdef\n";
    let req = CreateRequest {
        user_data: Some(Sensitive(payload.into())),
        ..Conformance::default_request(CLUSTER, "uid-ud", "node-ud")
    };
    let i = provider.create(&req).await.expect("create");
    assert!(i.provider_id.starts_with("exec:///lab-a/"));
    let machines = reference_machines(state.path());
    assert_eq!(machines.len(), 1);
    let text = machines[0].to_string();
    assert!(!text.contains("0123456789abcdef"), "{text}");
    assert_eq!(
        machines[0]["userDataSha256"].as_str().map(str::len),
        Some(64)
    );
}
