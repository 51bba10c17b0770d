//! Bootstrap tokens survive a restart of kube-node: the token's public half (its Secret's
//! name) is on the Node before the Secret exists, and its secret half is derived from a key
//! kube-node keeps, the Node's UID and that name, so a restarted controller makes (or finds)
//! the very token a machine launched before the restart holds, and deletes it by name,
//! without reading or listing Secrets in kube-system.

use crate::common::{Harness, eventually, sim_spec};
use kube::ResourceExt;
use kube_node_crds::names::BOOTSTRAP_TOKEN_ANNOTATION;
use kube_node_crds::v1alpha1::SimulatedFaults;

async fn recorded(h: &Harness, node: &str) -> Option<String> {
    h.nodes()
        .get(node)
        .await
        .ok()?
        .annotations()
        .get(BOOTSTRAP_TOKEN_ANNOTATION)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_fails_makes_no_token_and_a_restart_keeps_the_recorded_one() {
    let mut h = Harness::new().await;
    h.node_class("sim", sim_spec()).await;
    // Every create fails (retryably): the state a restart mid scale-up can leave behind.
    h.cloud.set_faults(
        "sim",
        Some(SimulatedFaults {
            insufficient_capacity_percent: 100,
            ..Default::default()
        }),
    );
    h.node("n1", "sim").await;
    let first = eventually(30, "a recorded token name and failed creates", || async {
        let name = recorded(&h, "n1").await?;
        (h.cloud.create_calls() >= 2).then_some(name)
    })
    .await;
    // Only the public half is on the Node, and no Secret is made for a machine that was
    // never launched: the token's Secret follows the launch.
    assert_eq!(first.len(), "bootstrap-token-".len() + 6, "{first}");
    assert!(
        h.token_secrets().await.is_empty(),
        "no Secret without a machine"
    );

    // A successor derives the same token from the same recorded name: nothing is rewritten.
    h.stop().await;
    let calls = h.cloud.create_calls();
    h.start();
    eventually(30, "the successor tries again", || async {
        (h.cloud.create_calls() > calls).then_some(())
    })
    .await;
    assert_eq!(
        recorded(&h, "n1").await,
        Some(first.clone()),
        "the same name"
    );
    assert!(h.token_secrets().await.is_empty());

    // Capacity comes back: the machine launches, its token's Secret is made under the recorded
    // name, the machine joins and its token goes.
    h.cloud.set_faults("sim", Some(SimulatedFaults::default()));
    h.wait_ready("n1").await;
    eventually(30, "no token left", || async {
        h.token_secrets().await.is_empty().then_some(())
    })
    .await;
    assert!(recorded(&h, "n1").await.is_none(), "{first} forgotten");
}
