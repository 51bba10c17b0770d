use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use tokio::time::{Instant, timeout};

use crate::*;

/// Collect `watcher` events into a shared log ("Apply n1", "Delete n1", ...).
fn spawn_watcher<K>(api: Api<K>, cfg: watcher::Config) -> Arc<Mutex<Vec<String>>>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    tokio::spawn(async move {
        let mut s = watcher(api, cfg).boxed();
        while let Some(ev) = s.next().await {
            let line = match ev {
                Ok(watcher::Event::Apply(o)) => {
                    format!("Apply {}", o.meta().name.clone().unwrap_or_default())
                }
                Ok(watcher::Event::Delete(o)) => {
                    format!("Delete {}", o.meta().name.clone().unwrap_or_default())
                }
                Ok(watcher::Event::InitApply(o)) => {
                    format!("InitApply {}", o.meta().name.clone().unwrap_or_default())
                }
                Ok(watcher::Event::Init) => "Init".to_string(),
                Ok(watcher::Event::InitDone) => "InitDone".to_string(),
                Err(e) => format!("Error {e}"),
            };
            l.lock().unwrap().push(line);
        }
    });
    log
}

fn has(log: &Arc<Mutex<Vec<String>>>, line: &str) -> bool {
    log.lock().unwrap().iter().any(|l| l == line)
}

#[tokio::test]
async fn watcher_and_reflector_see_changes() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("pre"))
        .await
        .unwrap();
    let log = spawn_watcher(nodes.clone(), watcher::Config::default());

    let (reader, writer) = reflector::store::<Node>();
    let refl = reflector::reflector(writer, watcher(nodes.clone(), watcher::Config::default()))
        .applied_objects()
        .for_each(|_| async {});
    tokio::spawn(refl);
    timeout(Duration::from_secs(5), reader.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert!(reader.get(&ObjectRef::new("pre")).is_some());

    eventually("initial list", || {
        has(&log, "InitApply pre") && has(&log, "InitDone")
    })
    .await;
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    eventually("added", || has(&log, "Apply n1")).await;
    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
        )
        .await
        .unwrap();
    eventually("modified in store", || {
        reader.get(&ObjectRef::new("n1")).is_some_and(|n| {
            n.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.contains_key("x"))
        })
    })
    .await;
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();
    eventually("deleted", || has(&log, "Delete n1")).await;
    eventually("deleted from store", || {
        reader.get(&ObjectRef::new("n1")).is_none()
    })
    .await;
    assert!(
        !log.lock().unwrap().iter().any(|l| l.starts_with("Error")),
        "{:?}",
        log.lock().unwrap()
    );
}

#[tokio::test]
async fn streaming_list_watcher() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("a"))
        .await
        .unwrap();
    nodes
        .create(&PostParams::default(), &node("b"))
        .await
        .unwrap();
    let log = spawn_watcher(nodes.clone(), watcher::Config::default().streaming_lists());
    eventually("initial events", || {
        has(&log, "InitApply a") && has(&log, "InitApply b") && has(&log, "InitDone")
    })
    .await;
    nodes
        .create(&PostParams::default(), &node("c"))
        .await
        .unwrap();
    eventually("added", || has(&log, "Apply c")).await;
    assert!(
        !log.lock().unwrap().iter().any(|l| l.starts_with("Error")),
        "{:?}",
        log.lock().unwrap()
    );
}

#[tokio::test]
async fn watch_lag_delays_events_but_not_reads() {
    let (api, client) = setup();
    let lag = Duration::from_millis(400);
    api.set_watch_lag(lag);
    assert_eq!(api.watch_lag(), lag);
    let nodes: Api<Node> = Api::all(client);
    let log = spawn_watcher(nodes.clone(), watcher::Config::default());
    eventually("init", || has(&log, "InitDone")).await;

    let start = Instant::now();
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    // reads are current
    assert!(nodes.get("n1").await.is_ok());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!has(&log, "Apply n1"), "event delivered before the lag");
    eventually("lagged event", || has(&log, "Apply n1")).await;
    assert!(start.elapsed() >= lag);

    // order is preserved
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();
    nodes
        .create(&PostParams::default(), &node("n2"))
        .await
        .unwrap();
    eventually("both", || has(&log, "Delete n1") && has(&log, "Apply n2")).await;
    let l = log.lock().unwrap().clone();
    let di = l.iter().position(|x| x == "Delete n1").unwrap();
    let ai = l.iter().position(|x| x == "Apply n2").unwrap();
    assert!(di < ai);

    // lag can be turned off at runtime
    api.set_watch_lag(Duration::ZERO);
    let t = Instant::now();
    nodes
        .create(&PostParams::default(), &node("n3"))
        .await
        .unwrap();
    eventually("fast event", || has(&log, "Apply n3")).await;
    assert!(t.elapsed() < lag);
}

async fn next_event<S>(s: &mut S) -> WatchEvent<Pod>
where
    S: futures::Stream<Item = Result<WatchEvent<Pod>, kube::Error>> + Unpin,
{
    timeout(Duration::from_secs(5), s.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

fn name_of(e: &WatchEvent<Pod>) -> (String, String) {
    match e {
        WatchEvent::Added(p) => ("ADDED".into(), p.metadata.name.clone().unwrap()),
        WatchEvent::Modified(p) => ("MODIFIED".into(), p.metadata.name.clone().unwrap()),
        WatchEvent::Deleted(p) => ("DELETED".into(), p.metadata.name.clone().unwrap()),
        WatchEvent::Bookmark(b) => ("BOOKMARK".into(), b.metadata.resource_version.clone()),
        WatchEvent::Error(e) => ("ERROR".into(), e.code.to_string()),
    }
}

#[tokio::test]
async fn raw_watch_selectors_and_resume() {
    let (api, client) = setup();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "ns");
    let other_ns: Api<Pod> = Api::namespaced(client.clone(), "other");
    pods.create(
        &PostParams::default(),
        &pod("a", &[("app", "web")], None, None),
    )
    .await
    .unwrap();
    let rv = api.resource_version().to_string();

    let wp = WatchParams::default()
        .labels("app=web")
        .timeout(10)
        .disable_bookmarks();
    let mut w = pods.watch(&wp, &rv).await.unwrap().boxed();
    // an object in another namespace and one not matching: filtered out
    other_ns
        .create(
            &PostParams::default(),
            &pod("x", &[("app", "web")], None, None),
        )
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("b", &[("app", "db")], None, None),
    )
    .await
    .unwrap();
    // b starts matching -> ADDED; a stops matching -> DELETED
    pods.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        name_of(&next_event(&mut w).await),
        ("ADDED".into(), "b".into())
    );
    pods.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        name_of(&next_event(&mut w).await),
        ("DELETED".into(), "a".into())
    );
    pods.patch(
        "b",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"k": "v"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        name_of(&next_event(&mut w).await),
        ("MODIFIED".into(), "b".into())
    );
    pods.delete("b", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        name_of(&next_event(&mut w).await),
        ("DELETED".into(), "b".into())
    );

    // resuming from an old resourceVersion replays history
    let mut w = pods
        .watch(&WatchParams::default().timeout(10).disable_bookmarks(), &rv)
        .await
        .unwrap()
        .boxed();
    let replay: Vec<_> = vec![
        name_of(&next_event(&mut w).await),
        name_of(&next_event(&mut w).await),
        name_of(&next_event(&mut w).await),
    ];
    assert_eq!(
        replay,
        vec![
            ("ADDED".to_string(), "b".to_string()),
            ("MODIFIED".to_string(), "b".to_string()),
            ("MODIFIED".to_string(), "a".to_string())
        ]
    );

    // resourceVersion "0": current state as ADDED first
    let mut w = pods
        .watch(&WatchParams::default().timeout(10).disable_bookmarks(), "0")
        .await
        .unwrap()
        .boxed();
    assert_eq!(
        name_of(&next_event(&mut w).await),
        ("ADDED".into(), "a".into())
    );
}

#[tokio::test]
async fn too_old_resource_version_is_gone() {
    let api = EmbeddedApi::new().with_watch_history(5);
    let client = api.client();
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..10 {
        nodes
            .create(&PostParams::default(), &node(&format!("n{i}")))
            .await
            .unwrap();
    }
    let mut w = nodes
        .watch(&WatchParams::default(), "1")
        .await
        .unwrap()
        .boxed();
    let ev = timeout(Duration::from_secs(5), w.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Error(e) => {
            assert_eq!(e.code, 410);
            assert_eq!(e.reason, "Expired");
        }
        other => panic!("expected 410, got {other:?}"),
    }
    // the runtime watcher recovers by relisting
    let log = spawn_watcher(nodes.clone(), watcher::Config::default());
    eventually("init", || has(&log, "InitDone")).await;
    assert_eq!(
        log.lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("InitApply"))
            .count(),
        10
    );
}

#[tokio::test]
async fn bookmarks_and_timeout() {
    let (api, client) = setup();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client, "ns");
    let rv = api.resource_version().to_string();
    let mut w = nodes
        .watch(&WatchParams::default().timeout(3), &rv)
        .await
        .unwrap()
        .boxed();
    // writes to other resources advance the global resourceVersion
    pods.create(&PostParams::default(), &pod("p", &[], None, None))
        .await
        .unwrap();
    let ev = timeout(Duration::from_secs(3), w.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Bookmark(b) => {
            let brv: u64 = b.metadata.resource_version.parse().unwrap();
            assert_eq!(brv, api.resource_version());
        }
        other => panic!("expected bookmark, got {other:?}"),
    }
    // the stream ends after timeoutSeconds
    let start = Instant::now();
    let rest: Vec<_> = timeout(Duration::from_secs(6), w.collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        rest.iter()
            .all(|e| matches!(e, Ok(WatchEvent::Bookmark(_))))
    );
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn watch_object_by_name() {
    use kube::runtime::watcher::watch_object;
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("other"))
        .await
        .unwrap();
    let mut w = watch_object(nodes.clone(), "target").boxed();
    // not there yet
    let first = timeout(Duration::from_secs(5), w.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.is_none());
    nodes
        .create(&PostParams::default(), &node("target"))
        .await
        .unwrap();
    let second = timeout(Duration::from_secs(5), w.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.unwrap().metadata.name.as_deref(), Some("target"));
    nodes
        .delete("target", &DeleteParams::default())
        .await
        .unwrap();
    let third = timeout(Duration::from_secs(5), w.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(third.is_none());
}
