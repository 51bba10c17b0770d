//! Bootstrap tokens survive a restart of kube-node: the token's public half (its Secret's
//! name) is on the Node before the Secret exists, so a restarted controller deletes its
//! predecessor's token by name, without reading or listing Secrets in kube-system.

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
async fn a_restarted_controller_deletes_its_predecessors_token() {
    let mut h = Harness::new().await;
    h.node_class("sim", sim_spec()).await;
    // Every create fails (retryably) after the token was made: the state a restart mid
    // scale-up leaves behind.
    h.cloud.set_faults(
        "sim",
        Some(SimulatedFaults {
            insufficient_capacity_percent: 100,
            ..Default::default()
        }),
    );
    h.node("n1", "sim").await;
    let first = eventually(30, "a token and a failed create", || async {
        let tokens = h.token_secrets().await;
        let name = recorded(&h, "n1").await?;
        (tokens == vec![name.clone()] && h.cloud.create_calls() >= 1).then_some(name)
    })
    .await;
    // Only the public half is on the Node.
    assert_eq!(first.len(), "bootstrap-token-".len() + 6, "{first}");

    h.stop().await;
    h.start();
    let second = eventually(30, "the successor's own token, and only it", || async {
        let tokens = h.token_secrets().await;
        let name = recorded(&h, "n1").await?;
        (name != first && tokens == vec![name.clone()]).then_some(name)
    })
    .await;
    assert!(
        !h.token_secrets().await.contains(&first),
        "the predecessor's token is deleted"
    );

    // Capacity comes back: the machine joins and its token goes too.
    h.cloud.set_faults("sim", Some(SimulatedFaults::default()));
    h.wait_ready("n1").await;
    eventually(30, "no token left", || async {
        h.token_secrets().await.is_empty().then_some(())
    })
    .await;
    assert!(recorded(&h, "n1").await.is_none(), "{second} forgotten");
}
