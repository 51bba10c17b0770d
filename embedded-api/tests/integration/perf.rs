use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::time::Instant;

use crate::*;

/// Thousands of nodes, concurrent writers and two watchers: the embedded
/// server must not be the bottleneck.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_nodes_many_writes() {
    const N: usize = 2000;
    let (api, client) = setup();
    let nodes: Api<Node> = Api::all(client.clone());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let nodes = nodes.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..N).step_by(8) {
                nodes
                    .create(&PostParams::default(), &node(&format!("node-{i:05}")))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let created = start.elapsed();

    let mut stores = Vec::new();
    for _ in 0..2 {
        let (reader, writer) = reflector::store::<Node>();
        tokio::spawn(
            reflector::reflector(writer, watcher(nodes.clone(), watcher::Config::default()))
                .applied_objects()
                .for_each(|_| async {}),
        );
        stores.push(reader);
    }
    for s in &stores {
        tokio::time::timeout(Duration::from_secs(30), s.wait_until_ready())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.state().len(), N);
    }

    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let nodes = nodes.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..N).step_by(8) {
                nodes
                    .patch_status(
                        &format!("node-{i:05}"),
                        &PatchParams::default(),
                        &Patch::Strategic(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
                    )
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let patched = start.elapsed();
    for s in &stores {
        eventually("watchers caught up", || {
            s.state()
                .iter()
                .all(|n| n.status.as_ref().is_some_and(|st| st.conditions.is_some()))
        })
        .await;
    }
    let caught_up = start.elapsed();
    let t = Instant::now();
    let l = nodes.list(&ListParams::default()).await.unwrap();
    assert_eq!(l.items.len(), N);
    let listed = t.elapsed();
    eprintln!(
        "{N} nodes: create {created:?}, patch {patched:?}, watchers caught up {caught_up:?}, full list {listed:?}"
    );
    assert_eq!(api.stats().count("nodes/status", "patch"), N as u64);
    // generous bounds for debug builds on small CI machines
    assert!(created < Duration::from_secs(20), "{created:?}");
    assert!(caught_up < Duration::from_secs(20), "{caught_up:?}");
}
