//! The group conformance suite (providers/core/src/conformance/group.rs) against the GKE
//! backend with Google's real clients and the in-test fake of the API: once on a manual clock
//! (every check, including the one that needs to see machines while they are created and
//! deleted), once on the wall clock (operations finishing late, machines booting on their
//! own; that check is skipped there).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Fake, PROJECT, ZONES};
use kube_node_provider::Provider;
use kube_node_provider::conformance::group::{self, GroupConformance};
use kube_node_provider_gke::{CallCounter, GkeFactory, PollSettings};

fn foreign() -> String {
    // The pool's zone, but a name no group of the pool gives its machines.
    format!("gce://{PROJECT}/{}/gke-prod-pool-2-00000000-abcd", ZONES[0])
}

fn factory() -> GkeFactory {
    GkeFactory::new()
        .with_call_counter(CallCounter::new())
        .with_poll(PollSettings {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
        })
}

#[tokio::test]
async fn group_conformance_on_a_manual_clock() {
    let fake = Arc::new(Fake::start().await);
    fake.manual_clock();
    let provider = factory().build_gke(&fake.class("gke-pool")).expect("build");
    provider.validate().await.expect("valid");
    let mut c = GroupConformance::new(foreign());
    c.poll_interval = Duration::from_millis(10);
    c.settle_timeout = Duration::from_millis(300);
    let hook = fake.clone();
    c.advance = Some(Arc::new(move || {
        hook.advance();
        Box::pin(async {})
    }));
    let report = group::run_all(provider.as_group().expect("group"), &c).await;
    match report.into_result() {
        Ok(r) => {
            assert!(r.skipped.is_empty(), "skipped {:?}", r.skipped);
            assert_eq!(r.passed.len(), 6, "{:?}", r.passed);
        }
        Err(failures) => panic!("the gke backend fails group conformance: {failures:#?}"),
    }
    // Every check gave back what it added.
    let g = provider.as_group().expect("group");
    assert_eq!(g.target_size().await.expect("size"), 0);
    assert_eq!(fake.with(|s| s.unauthenticated), 0);
}

#[tokio::test]
async fn group_conformance_on_the_wall_clock() {
    let fake = Fake::start().await;
    let provider = factory().build_gke(&fake.class("gke-pool")).expect("build");
    let mut c = GroupConformance::new(foreign());
    c.poll_interval = Duration::from_millis(50);
    c.settle_timeout = Duration::from_secs(10);
    let report = group::run_all(provider.as_group().expect("group"), &c).await;
    match report.into_result() {
        Ok(r) => {
            assert_eq!(r.skipped, vec!["group_instances_list_transitions"]);
            assert_eq!(r.passed.len(), 5, "{:?}", r.passed);
        }
        Err(failures) => panic!("the gke backend fails group conformance: {failures:#?}"),
    }
}
