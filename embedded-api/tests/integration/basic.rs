use std::collections::BTreeMap;

use http::Request;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, NodeSpec, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::ObjectMeta;
use serde_json::json;

use crate::*;

#[tokio::test]
async fn create_get_list() {
    let (api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    let created = nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let md = &created.metadata;
    assert_eq!(md.name.as_deref(), Some("n1"));
    let uid = md.uid.clone().unwrap();
    assert_eq!(uid.len(), 36);
    assert_eq!(md.generation, Some(1));
    assert!(md.creation_timestamp.is_some());
    let rv: u64 = md.resource_version.as_deref().unwrap().parse().unwrap();
    assert_eq!(rv, api.resource_version());

    let got = nodes.get("n1").await.unwrap();
    assert_eq!(got.metadata.uid.as_deref(), Some(uid.as_str()));

    nodes
        .create(&PostParams::default(), &node("n2"))
        .await
        .unwrap();
    let list = nodes.list(&ListParams::default()).await.unwrap();
    let names: Vec<_> = list
        .items
        .iter()
        .map(|n| n.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, vec!["n1", "n2"]);
    assert_eq!(
        list.metadata.resource_version,
        Some(api.resource_version().to_string())
    );

    let s = assert_api_err(
        nodes.create(&PostParams::default(), &node("n1")).await,
        409,
        "AlreadyExists",
    );
    assert_eq!(s.message, "nodes \"n1\" already exists");
    let s = assert_api_err(nodes.get("nope").await, 404, "NotFound");
    assert_eq!(s.message, "nodes \"nope\" not found");
    assert_eq!(nodes.get_opt("nope").await.unwrap(), None);

    // Namespaced: the namespace comes from the path.
    let pods: Api<Pod> = Api::namespaced(api.client(), "ns1");
    let p = pods
        .create(&PostParams::default(), &pod("p", &[], None, None))
        .await
        .unwrap();
    assert_eq!(p.metadata.namespace.as_deref(), Some("ns1"));
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    let s = assert_api_err(leases.get("x").await, 404, "NotFound");
    assert_eq!(s.message, "leases.coordination.k8s.io \"x\" not found");
}

#[tokio::test]
async fn generate_name_and_invalid_names() {
    let (_api, client) = setup();
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            generate_name: Some("cfg-".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let a = cms.create(&PostParams::default(), &cm).await.unwrap();
    let b = cms.create(&PostParams::default(), &cm).await.unwrap();
    let (an, bn) = (a.metadata.name.unwrap(), b.metadata.name.unwrap());
    assert!(an.starts_with("cfg-") && an.len() == 9, "{an}");
    assert_ne!(an, bn);

    cm.metadata.generate_name = None;
    assert_api_err(
        cms.create(&PostParams::default(), &cm).await,
        422,
        "Invalid",
    );
    cm.metadata.name = Some("Bad_Name".into());
    assert_api_err(
        cms.create(&PostParams::default(), &cm).await,
        422,
        "Invalid",
    );
}

#[tokio::test]
async fn replace_conflict_and_immutable_metadata() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    let n = nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let mut upd = n.clone();
    upd.metadata.labels = Some(BTreeMap::from([("a".to_string(), "b".to_string())]));
    let replaced = nodes
        .replace("n1", &PostParams::default(), &upd)
        .await
        .unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        n.metadata.resource_version
    );
    // metadata-only change: generation unchanged
    assert_eq!(replaced.metadata.generation, Some(1));

    // stale resourceVersion -> Conflict
    let s = assert_api_err(
        nodes.replace("n1", &PostParams::default(), &upd).await,
        409,
        "Conflict",
    );
    assert!(
        s.message.contains("the object has been modified"),
        "{}",
        s.message
    );

    // spec change bumps generation; uid/creationTimestamp cannot change
    let mut upd = replaced.clone();
    upd.spec = Some(NodeSpec {
        unschedulable: Some(true),
        ..Default::default()
    });
    upd.metadata.creation_timestamp = None;
    let r2 = nodes
        .replace("n1", &PostParams::default(), &upd)
        .await
        .unwrap();
    assert_eq!(r2.metadata.generation, Some(2));
    assert_eq!(
        r2.metadata.creation_timestamp,
        n.metadata.creation_timestamp
    );
    assert_eq!(r2.metadata.uid, n.metadata.uid);

    // missing object -> NotFound
    let mut ghost = node("ghost");
    ghost.metadata.resource_version = None;
    assert_api_err(
        nodes.replace("ghost", &PostParams::default(), &ghost).await,
        404,
        "NotFound",
    );

    // no-op update does not bump the resourceVersion
    let r3 = nodes
        .replace("n1", &PostParams::default(), &r2)
        .await
        .unwrap();
    assert_eq!(r3.metadata.resource_version, r2.metadata.resource_version);
}

#[tokio::test]
async fn leases_create_on_update() {
    let (_api, client) = setup();
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let l = Lease {
        metadata: ObjectMeta {
            name: Some("n1".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("n1".into()),
            ..Default::default()
        }),
    };
    leases
        .replace("n1", &PostParams::default(), &l)
        .await
        .unwrap();
    let got = leases.get("n1").await.unwrap();
    assert_eq!(got.spec.unwrap().holder_identity.as_deref(), Some("n1"));
}

#[tokio::test]
async fn patch_variants() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let pp = PatchParams::default();

    // merge
    let n = nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "1", "b": "2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(n.metadata.labels.as_ref().unwrap().len(), 2);
    let n = nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": null}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        n.metadata
            .labels
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        vec!["b"]
    );

    // json patch with a passing and a failing test op
    let ok: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/metadata/labels/b", "value": "2"},
        {"op": "add", "path": "/metadata/labels/c", "value": "3"}
    ]))
    .unwrap();
    let n = nodes
        .patch("n1", &pp, &Patch::Json::<()>(ok))
        .await
        .unwrap();
    assert_eq!(
        n.metadata
            .labels
            .as_ref()
            .unwrap()
            .get("c")
            .map(String::as_str),
        Some("3")
    );
    let bad: json_patch::Patch = serde_json::from_value(
        json!([{"op": "test", "path": "/metadata/labels/b", "value": "nope"}]),
    )
    .unwrap();
    assert_api_err(
        nodes.patch("n1", &pp, &Patch::Json::<()>(bad)).await,
        422,
        "Invalid",
    );

    // strategic merge on status conditions (merged by type)
    nodes
        .patch_status(
            "n1",
            &pp,
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False"}, {"type": "MemoryPressure", "status": "False"}
            ]}})),
        )
        .await
        .unwrap();
    let n = nodes
        .patch_status(
            "n1",
            &pp,
            &Patch::Strategic(
                json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
            ),
        )
        .await
        .unwrap();
    let conds = n.status.unwrap().conditions.unwrap();
    assert_eq!(conds.len(), 2);
    assert_eq!(conds[0].type_, "Ready");
    assert_eq!(conds[0].status, "True");

    // server-side apply: create when missing, then deep-merge
    let ssa = PatchParams::apply("test").force();
    let n = nodes
        .patch(
            "n2",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2", "labels": {"x": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(n.metadata.generation, Some(1));
    let n = nodes
        .patch(
            "n2",
            &ssa,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n2", "labels": {"y": "2"}},
                "spec": {"podCIDR": "10.0.0.0/24"}})),
        )
        .await
        .unwrap();
    assert_eq!(n.metadata.labels.as_ref().unwrap().len(), 2);
    assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.0.0.0/24"));
    // apply without field manager is rejected
    assert_api_err(
        nodes
            .patch(
                "n2",
                &PatchParams::default(),
                &Patch::Apply(json!({"metadata": {"name": "n2"}})),
            )
            .await,
        422,
        "Invalid",
    );

    // resourceVersion precondition in a patch body
    let s = nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"metadata": {"resourceVersion": "1", "labels": {"z": "1"}}})),
        )
        .await;
    assert_api_err(s, 409, "Conflict");

    // a no-op patch does not bump the resourceVersion
    let before = nodes.get("n1").await.unwrap();
    let after = nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"b": "2"}}})),
        )
        .await
        .unwrap();
    assert_eq!(
        before.metadata.resource_version,
        after.metadata.resource_version
    );

    // missing object
    assert_api_err(
        nodes.patch("ghost", &pp, &Patch::Merge(json!({}))).await,
        404,
        "NotFound",
    );
}

#[tokio::test]
async fn selectors() {
    let (_api, client) = setup();
    for (ns, name, app, node) in [
        ("a", "p1", "web", "n1"),
        ("a", "p2", "db", "n1"),
        ("b", "p3", "web", "n2"),
        ("b", "p4", "cache", "n2"),
    ] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(
            &PostParams::default(),
            &pod(name, &[("app", app), ("ns", ns)], Some(node), None),
        )
        .await
        .unwrap();
    }
    let all: Api<Pod> = Api::all(client.clone());
    let names = |l: kube::core::ObjectList<Pod>| -> Vec<String> {
        l.items
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect()
    };
    let q = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(all.list(&q("app=web")).await.unwrap()), ["p1", "p3"]);
    assert_eq!(names(all.list(&q("app==web")).await.unwrap()), ["p1", "p3"]);
    assert_eq!(names(all.list(&q("app!=web")).await.unwrap()), ["p2", "p4"]);
    assert_eq!(
        names(all.list(&q("app in (db,cache)")).await.unwrap()),
        ["p2", "p4"]
    );
    assert_eq!(
        names(all.list(&q("app notin (db,cache),ns=a")).await.unwrap()),
        ["p1"]
    );
    assert_eq!(names(all.list(&q("app,!missing")).await.unwrap()).len(), 4);
    assert!(names(all.list(&q("!app")).await.unwrap()).is_empty());
    assert_api_err(all.list(&q("app in db")).await, 400, "BadRequest");

    let f = |s: &str| ListParams::default().fields(s);
    assert_eq!(
        names(all.list(&f("spec.nodeName=n2")).await.unwrap()),
        ["p3", "p4"]
    );
    assert_eq!(
        names(
            all.list(&f("spec.nodeName!=n2,metadata.namespace=a"))
                .await
                .unwrap()
        ),
        ["p1", "p2"]
    );
    assert_eq!(
        names(all.list(&f("metadata.name==p4")).await.unwrap()),
        ["p4"]
    );
    let in_b: Api<Pod> = Api::namespaced(client, "b");
    assert_eq!(
        names(in_b.list(&ListParams::default()).await.unwrap()),
        ["p3", "p4"]
    );
    assert_eq!(
        names(in_b.list(&f("metadata.name=p1")).await.unwrap()),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn pagination() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    for i in 0..25 {
        nodes
            .create(&PostParams::default(), &node(&format!("n{i:02}")))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(10);
    let mut pages = 0;
    let mut first_rv = None;
    loop {
        let page = nodes.list(&lp).await.unwrap();
        pages += 1;
        first_rv.get_or_insert(page.metadata.resource_version.clone());
        // the snapshot resourceVersion is kept across pages
        assert_eq!(Some(page.metadata.resource_version.clone()), first_rv);
        seen.extend(page.items.into_iter().map(|n| n.metadata.name.unwrap()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => {
                // a write between pages does not break pagination
                if pages == 1 {
                    nodes.delete("n05", &DeleteParams::default()).await.unwrap();
                }
                lp = lp.continue_token(&c);
            }
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    // limit with a selector that matches fewer objects than the limit: no continue token
    let page = nodes.list(&ListParams::default().limit(100)).await.unwrap();
    assert_eq!(page.items.len(), 24);
    assert!(page.metadata.continue_.is_none());
    let bad = nodes
        .list(&ListParams::default().limit(1).continue_token("garbage"))
        .await;
    assert_api_err(bad, 400, "BadRequest");
}

#[tokio::test]
async fn finalizers_and_deletion() {
    let (_api, client) = setup();
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("c".into()),
            finalizers: Some(vec!["example.com/keep".into()]),
            ..Default::default()
        },
        ..Default::default()
    };
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let deleted = cms.delete("c", &DeleteParams::default()).await.unwrap();
    let obj = deleted.left().expect("object returned");
    assert!(obj.metadata.deletion_timestamp.is_some());
    assert_eq!(obj.metadata.deletion_grace_period_seconds, Some(0));
    // still there
    let got = cms.get("c").await.unwrap();
    assert!(got.metadata.deletion_timestamp.is_some());
    // deleting again is fine and changes nothing
    let again = cms
        .delete("c", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        got.metadata.resource_version
    );
    // no new finalizers while deleting
    let s = cms
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["example.com/keep", "example.com/new"]}}),
            ),
        )
        .await;
    let s = assert_api_err(s, 422, "Invalid");
    assert!(s.message.contains("no new finalizers"), "{}", s.message);
    // deletionTimestamp cannot be cleared by clients
    let p = cms
        .patch(
            "c",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"deletionTimestamp": null, "labels": {"x": "y"}}})),
        )
        .await
        .unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    // removing the last finalizer deletes it
    cms.patch(
        "c",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert_api_err(cms.get("c").await, 404, "NotFound");

    // plain delete, preconditions
    let created = cms
        .create(
            &PostParams::default(),
            &ConfigMap {
                metadata: ObjectMeta {
                    name: Some("d".into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("wrong".into()),
            resource_version: None,
        }),
        ..Default::default()
    };
    assert_api_err(cms.delete("d", &dp).await, 409, "Conflict");
    let dp = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: created.metadata.uid.clone(),
            resource_version: created.metadata.resource_version.clone(),
        }),
        ..Default::default()
    };
    cms.delete("d", &dp).await.unwrap();
    assert_api_err(
        cms.delete("d", &DeleteParams::default()).await,
        404,
        "NotFound",
    );
}

#[tokio::test]
async fn delete_collection_and_namespace_deletion() {
    let (_api, client) = setup();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "team");
    for (n, l) in [("a", "x"), ("b", "x"), ("c", "y")] {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(n.into());
        cm.metadata.labels = Some(BTreeMap::from([("l".to_string(), l.to_string())]));
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let res = cms
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("l=x"),
        )
        .await
        .unwrap();
    assert_eq!(res.left().unwrap().items.len(), 2);
    assert_eq!(
        cms.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    let nss: Api<Namespace> = Api::all(client);
    let mut ns = Namespace::default();
    ns.metadata.name = Some("team".into());
    let created = nss.create(&PostParams::default(), &ns).await.unwrap();
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Active"));
    nss.delete("team", &DeleteParams::default()).await.unwrap();
    assert!(
        cms.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn provider_id_set_once() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let pp = PatchParams::default();
    nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"spec": {"providerID": "sim://n1"}})),
        )
        .await
        .unwrap();
    // same value: fine
    nodes
        .patch(
            "n1",
            &pp,
            &Patch::Merge(json!({"spec": {"providerID": "sim://n1"}})),
        )
        .await
        .unwrap();
    let s = assert_api_err(
        nodes
            .patch(
                "n1",
                &pp,
                &Patch::Merge(json!({"spec": {"providerID": "sim://other"}})),
            )
            .await,
        422,
        "Invalid",
    );
    assert_eq!(
        s.message,
        "Node \"n1\" is invalid: spec.providerID: Forbidden: node updates may not change providerID except from \"\" to valid"
    );
    // clearing is also a change
    assert_api_err(
        nodes
            .patch(
                "n1",
                &pp,
                &Patch::Merge(json!({"spec": {"providerID": null}})),
            )
            .await,
        422,
        "Invalid",
    );
    let mut n = nodes.get("n1").await.unwrap();
    n.spec.as_mut().unwrap().provider_id = Some("sim://third".into());
    assert_api_err(
        nodes.replace("n1", &PostParams::default(), &n).await,
        422,
        "Invalid",
    );
    assert_eq!(
        nodes
            .get("n1")
            .await
            .unwrap()
            .spec
            .unwrap()
            .provider_id
            .as_deref(),
        Some("sim://n1")
    );
}

async fn raw(client: &kube::Client, req: Request<Vec<u8>>) -> Result<String, kube::Error> {
    client.request_text(req).await
}

#[tokio::test]
async fn error_bodies() {
    let (api, client) = setup();
    // malformed JSON -> 400
    let req = Request::post("/api/v1/nodes")
        .header("content-type", "application/json")
        .body(b"{not json".to_vec())
        .unwrap();
    assert_api_err(raw(&client, req).await, 400, "BadRequest");
    // unknown paths -> 404 Status
    let req = Request::get("/apis/nope.example.com/v1/things")
        .body(vec![])
        .unwrap();
    assert_api_err(raw(&client, req).await, 404, "NotFound");
    let req = Request::get("/what/ever").body(vec![]).unwrap();
    assert_api_err(raw(&client, req).await, 404, "NotFound");
    // unknown subresource
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let req = Request::get("/api/v1/nodes/n1/bogus").body(vec![]).unwrap();
    assert_api_err(raw(&client, req).await, 404, "NotFound");
    // method not allowed
    let req = Request::post("/api/v1/nodes/n1")
        .body(b"{}".to_vec())
        .unwrap();
    assert_api_err(raw(&client, req).await, 405, "MethodNotAllowed");
    // unsupported patch type
    let req = Request::patch("/api/v1/nodes/n1")
        .header("content-type", "text/plain")
        .body(b"{}".to_vec())
        .unwrap();
    assert_api_err(raw(&client, req).await, 415, "UnsupportedMediaType");
    // garbage json patch -> 400
    let req = Request::patch("/api/v1/nodes/n1")
        .header("content-type", "application/json-patch+json")
        .body(b"[{\"op\":\"explode\"}]".to_vec())
        .unwrap();
    assert_api_err(raw(&client, req).await, 400, "BadRequest");
    // wrong kind in body
    let req = Request::post("/api/v1/nodes")
        .header("content-type", "application/json")
        .body(br#"{"kind":"Pod","apiVersion":"v1","metadata":{"name":"x"}}"#.to_vec())
        .unwrap();
    assert_api_err(raw(&client, req).await, 400, "BadRequest");
    // namespaced resource without namespace by name -> 404
    let req = Request::get("/api/v1/pods/x").body(vec![]).unwrap();
    assert_api_err(raw(&client, req).await, 404, "NotFound");
    // bad watch resourceVersion
    let req = Request::get("/api/v1/nodes?watch=true&resourceVersion=abc")
        .body(vec![])
        .unwrap();
    assert_api_err(raw(&client, req).await, 400, "BadRequest");
    // bad propagation policy
    let req = Request::delete("/api/v1/nodes/n1?propagationPolicy=Sideways")
        .body(vec![])
        .unwrap();
    assert_api_err(raw(&client, req).await, 422, "Invalid");
    // body that is not an object
    let req = Request::put("/api/v1/nodes/n1")
        .header("content-type", "application/json")
        .body(b"[1,2]".to_vec())
        .unwrap();
    assert_api_err(raw(&client, req).await, 400, "BadRequest");
    // dryRun create does not persist
    let req = Request::post("/api/v1/nodes?dryRun=All")
        .header("content-type", "application/json")
        .body(br#"{"metadata":{"name":"dry"}}"#.to_vec())
        .unwrap();
    raw(&client, req).await.unwrap();
    assert!(
        Api::<Node>::all(client.clone())
            .get_opt("dry")
            .await
            .unwrap()
            .is_none()
    );

    let stats = api.stats();
    assert!(stats.total >= 13);
    // POST to an item path is counted as a create too
    assert_eq!(stats.count("nodes", "create"), 5);
}

#[tokio::test]
async fn discovery_and_version() {
    let (_api, client) = setup_with_crd();
    let v = client.apiserver_version().await.unwrap();
    assert_eq!(v.git_version, "v1.33.0-embedded");
    let d = kube::Discovery::new(client.clone()).run().await.unwrap();
    assert!(d.has_group("test.example.com"));
    assert!(d.has_group("coordination.k8s.io"));
    let (ar, caps) = d
        .resolve_gvk(&kube::core::GroupVersionKind::gvk(
            "test.example.com",
            "v1",
            "Widget",
        ))
        .unwrap();
    assert_eq!(ar.plural, "widgets");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
    assert!(
        caps.subresources
            .iter()
            .any(|(r, _)| r.plural == "widgets/scale" || r.plural == "scale")
    );
    let (ar, caps) = d
        .resolve_gvk(&kube::core::GroupVersionKind::gvk("", "v1", "Pod"))
        .unwrap();
    assert_eq!(ar.plural, "pods");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);

    let d = kube::Discovery::new(client.clone())
        .run_aggregated()
        .await
        .unwrap();
    assert!(d.has_group("test.example.com"));
    assert!(
        d.resolve_gvk(&kube::core::GroupVersionKind::gvk("", "v1", "Node"))
            .is_some()
    );
    assert!(
        d.resolve_gvk(&kube::core::GroupVersionKind::gvk(
            "policy",
            "v1",
            "PodDisruptionBudget"
        ))
        .is_some()
    );

    let groups = client.list_api_groups().await.unwrap();
    assert!(
        groups
            .groups
            .iter()
            .any(|g| g.name == "apiextensions.k8s.io")
    );
    let core = client.list_core_api_resources("v1").await.unwrap();
    assert!(core.resources.iter().any(|r| r.name == "nodes/status"));
    assert!(core.resources.iter().any(|r| r.name == "pods/eviction"));
}

#[tokio::test]
async fn metadata_only_requests() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let m = nodes.get_metadata("n1").await.unwrap();
    assert_eq!(m.metadata.name.as_deref(), Some("n1"));
    let l = nodes.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(l.items.len(), 1);
}

#[tokio::test]
async fn stats_count_requests() {
    let (api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    nodes.get("n1").await.unwrap();
    nodes.list(&ListParams::default()).await.unwrap();
    nodes
        .patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running"}})),
        )
        .await
        .unwrap();
    nodes.delete("n1", &DeleteParams::default()).await.unwrap();
    let s = api.stats();
    assert_eq!(s.count("nodes", "create"), 1);
    assert_eq!(s.count("nodes", "get"), 1);
    assert_eq!(s.count("nodes", "list"), 1);
    assert_eq!(s.count("nodes/status", "patch"), 1);
    assert_eq!(s.count("nodes", "delete"), 1);
    assert_eq!(s.writes("nodes"), 2);
    assert_eq!(s.writes("nodes/status"), 1);
    assert_eq!(s.total_writes(), 3);
    assert_eq!(s.total, 5);
    api.reset_stats();
    assert_eq!(api.stats(), kube_node_embedded_api::Stats::default());
}

#[tokio::test]
async fn serve_over_http() {
    let api = EmbeddedApi::new();
    let server = api.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let config = kube::Config::new(server.url().parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let nodes: Api<Node> = Api::all(client);
    nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    assert_eq!(
        nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_api_err(nodes.get("missing").await, 404, "NotFound");
    // a watch over the network
    use futures::{StreamExt, TryStreamExt};
    let mut w = nodes
        .watch(&kube::api::WatchParams::default().timeout(5), "0")
        .await
        .unwrap()
        .boxed();
    let first = w.try_next().await.unwrap().unwrap();
    assert!(
        matches!(first, kube::api::WatchEvent::Added(n) if n.metadata.name.as_deref() == Some("n1"))
    );
    assert!(server.kubeconfig().contains(&server.url()));
    server.shutdown();
}

#[tokio::test]
async fn event_recorder() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "test-ctl".into(),
            instance: None,
        },
    );
    let ev = Event {
        type_: EventType::Normal,
        reason: "Tested".into(),
        note: Some("hello".into()),
        action: "Test".into(),
        secondary: None,
    };
    recorder.publish(&ev, &n.object_ref(&())).await.unwrap();
    recorder.publish(&ev, &n.object_ref(&())).await.unwrap();
    let events: Api<K8sEvent> = Api::all(client);
    let list = events.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].reason.as_deref(), Some("Tested"));
}

/// Malformed requests of all kinds produce `Status` errors, never panics.
#[tokio::test]
async fn garbage_requests_never_panic() {
    use tower::ServiceExt;
    let (api, client) = setup_with_crd();
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node("n1"))
        .await
        .unwrap();
    Api::<Widget>::all(client.clone())
        .create(&PostParams::default(), &widget("w1", 1))
        .await
        .unwrap();
    let paths = [
        "/",
        "//",
        "/api",
        "/api/v2",
        "/api/v1/nodes/n1/status/extra/more",
        "/apis/test.example.com/v1/widgets/w1/scale",
        "/apis/test.example.com/v1/namespaces/x/widgets",
        "/api/v1/namespaces/ns/pods/p/eviction",
        "/api/v1/namespaces",
        "/api/v1/namespaces/ns",
        "/api/v1/namespaces/ns/status",
        "/api/v1/nodes?limit=-1",
        "/api/v1/nodes?continue=zz&limit=1",
        "/api/v1/nodes?watch=1&timeoutSeconds=18446744073709551615",
        "/api/v1/nodes?labelSelector=%ZZ",
        "/api/v1/nodes?fieldSelector=a%3D%3D%3Db",
        "/api/v1/watch/nodes/n1?timeoutSeconds=0",
        "/apis/test.example.com/v1/widgets/w1/status",
        "/api/v1/nodes/n1?dryRun=All&propagationPolicy=Orphan",
        "/apis/policy/v1/namespaces/ns/poddisruptionbudgets",
    ];
    let bodies: [&[u8]; 8] = [
        b"",
        b"null",
        b"{}",
        b"[]",
        b"{\"metadata\": 5}",
        b"{\"metadata\": {\"name\": 7, \"finalizers\": \"x\", \"ownerReferences\": {}}, \"spec\": {\"replicas\": \"x\"}}",
        b"[{\"op\":\"remove\",\"path\":\"/metadata\"}]",
        b"\xff\xfe",
    ];
    let cts = [
        "application/json",
        "application/merge-patch+json",
        "application/json-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
        "application/yaml",
    ];
    let methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    for p in paths {
        for m in methods {
            for b in bodies {
                for ct in cts {
                    let uri = if p.contains('?') {
                        format!("{p}&fieldManager=x")
                    } else {
                        format!("{p}?fieldManager=x")
                    };
                    let req = http::Request::builder()
                        .method(m)
                        .uri(uri)
                        .header("content-type", ct)
                        .body(kube::client::Body::from(b.to_vec()))
                        .unwrap();
                    let resp = api.service().oneshot(req).await.unwrap();
                    let status = resp.status();
                    let is_watch = p.contains("watch");
                    if !is_watch || !status.is_success() {
                        let body = http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .unwrap()
                            .to_bytes();
                        if !status.is_success() {
                            let v: serde_json::Value = serde_json::from_slice(&body)
                                .unwrap_or_else(|e| {
                                    panic!("{m} {p} {ct}: non-JSON error body ({e})")
                                });
                            assert_eq!(v["kind"], "Status", "{m} {p}: {v}");
                            assert_eq!(
                                v["code"].as_u64(),
                                Some(u64::from(status.as_u16())),
                                "{m} {p}: {v}"
                            );
                        }
                    }
                }
            }
        }
    }
    // the server still works
    assert!(
        Api::<Node>::all(client)
            .list(&ListParams::default())
            .await
            .is_ok()
    );
}

/// As kube-apiserver's Node strategy does ("Nodes allow *all* fields, including status, to be
/// set on create", pkg/registry/core/node/strategy.go, v1.28.7): a Node's status in the create
/// request is kept — kubelets register so, and a NodeSet creates its Nodes with their first
/// MachineReady condition. An update of the main resource keeps the stored status.
#[tokio::test]
async fn a_node_keeps_the_status_it_is_created_with() {
    let (_api, client) = setup();
    let nodes: Api<Node> = Api::all(client);
    let mut n = node("with-status");
    n.status = Some(
        serde_json::from_value(json!({"conditions": [
            {"type": "MachineReady", "status": "False", "reason": "Launching", "message": "creating the machine"}
        ]}))
        .unwrap(),
    );
    let created = nodes.create(&PostParams::default(), &n).await.unwrap();
    let reason = |n: &Node| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                cs.iter()
                    .find(|c| c.type_ == "MachineReady")
                    .and_then(|c| c.reason.clone())
            })
    };
    assert_eq!(reason(&created).as_deref(), Some("Launching"));
    assert_eq!(
        reason(&nodes.get("with-status").await.unwrap()).as_deref(),
        Some("Launching")
    );
    let patched = nodes
        .patch(
            "with-status",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"a": "b"}}, "status": {"conditions": []}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(reason(&patched).as_deref(), Some("Launching"));
}
