use k8s_openapi::api::autoscaling::v1::{Scale, ScaleSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::json;

use crate::*;

#[tokio::test]
async fn status_subresource_and_generation() {
    let (_api, client) = setup_with_crd();
    let widgets: Api<Widget> = Api::all(client);
    let mut w = widget("w1", 1);
    w.status = Some(WidgetStatus {
        replicas: 7,
        selector: None,
    });
    let created = widgets.create(&PostParams::default(), &w).await.unwrap();
    // status is dropped on create for resources with a status subresource
    assert_eq!(created.status, None);
    assert_eq!(created.metadata.generation, Some(1));

    // status writes only change status and do not bump generation
    let s = widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 99}, "status": {"replicas": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(s.status.as_ref().unwrap().replicas, 1);
    assert_eq!(s.spec.replicas, 1);
    assert_eq!(s.metadata.generation, Some(1));

    // main-resource writes keep the stored status
    let mut upd = s.clone();
    upd.spec.replicas = 3;
    upd.status = Some(WidgetStatus {
        replicas: 42,
        selector: None,
    });
    let r = widgets
        .replace("w1", &PostParams::default(), &upd)
        .await
        .unwrap();
    assert_eq!(r.spec.replicas, 3);
    assert_eq!(r.status.as_ref().unwrap().replicas, 1);
    assert_eq!(r.metadata.generation, Some(2));

    // replace_status keeps spec
    let mut st = r.clone();
    st.spec.replicas = 100;
    st.status = Some(WidgetStatus {
        replicas: 3,
        selector: Some("app=w1".into()),
    });
    let r2 = widgets
        .replace_status("w1", &PostParams::default(), &st)
        .await
        .unwrap();
    assert_eq!(r2.spec.replicas, 3);
    assert_eq!(r2.status.as_ref().unwrap().replicas, 3);
    assert_eq!(r2.metadata.generation, Some(2));

    // metadata-only change: no generation bump
    let r3 = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap();
    assert_eq!(r3.metadata.generation, Some(2));

    // custom resources require a resourceVersion on PUT; create must not carry one
    let mut no_rv = r3.clone();
    no_rv.metadata.resource_version = None;
    assert_api_err(
        widgets.replace("w1", &PostParams::default(), &no_rv).await,
        422,
        "Invalid",
    );
    let mut with_rv = widget("w2", 1);
    with_rv.metadata.resource_version = Some("5".into());
    assert_api_err(
        widgets.create(&PostParams::default(), &with_rv).await,
        500,
        "InternalError",
    );

    // strategic merge patch is not supported for custom resources (like the real server)
    assert_api_err(
        widgets
            .patch(
                "w1",
                &PatchParams::default(),
                &Patch::Strategic(json!({"spec": {"note": "x"}})),
            )
            .await,
        415,
        "UnsupportedMediaType",
    );
    // apply on the status subresource
    let r4 = widgets
        .patch_status(
            "w1",
            &PatchParams::apply("ctl").force(),
            &Patch::Apply(json!({"apiVersion": "test.example.com/v1", "kind": "Widget", "status": {"replicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(r4.status.as_ref().unwrap().replicas, 5);
    assert_eq!(
        r4.status.as_ref().unwrap().selector.as_deref(),
        Some("app=w1")
    );
}

#[tokio::test]
async fn scale_subresource() {
    let (api, client) = setup_with_crd();
    let widgets: Api<Widget> = Api::all(client);
    widgets
        .create(&PostParams::default(), &widget("w1", 2))
        .await
        .unwrap();
    widgets
        .patch_status(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"replicas": 1, "selector": "app=w1"}})),
        )
        .await
        .unwrap();
    let s = widgets.get_scale("w1").await.unwrap();
    assert_eq!(s.spec.as_ref().unwrap().replicas, Some(2));
    let st = s.status.as_ref().unwrap();
    assert_eq!(st.replicas, 1);
    assert_eq!(st.selector.as_deref(), Some("app=w1"));
    assert_eq!(s.metadata.name.as_deref(), Some("w1"));

    api.reset_stats();
    let s = widgets
        .patch_scale(
            "w1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 5}})),
        )
        .await
        .unwrap();
    assert_eq!(s.spec.unwrap().replicas, Some(5));
    let w = widgets.get("w1").await.unwrap();
    assert_eq!(w.spec.replicas, 5);
    assert_eq!(w.metadata.generation, Some(2));
    assert_eq!(w.status.unwrap().replicas, 1);
    assert_eq!(api.stats().count("widgets/scale", "patch"), 1);

    let s = widgets
        .patch_scale(
            "w1",
            &PatchParams::apply("hpa").force(),
            &Patch::Apply(
                json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "spec": {"replicas": 6}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(s.spec.unwrap().replicas, Some(6));

    let cur = widgets.get_scale("w1").await.unwrap();
    let new = Scale {
        metadata: cur.metadata.clone(),
        spec: Some(ScaleSpec { replicas: Some(0) }),
        status: None,
    };
    let s = widgets
        .replace_scale("w1", &PostParams::default(), &new)
        .await
        .unwrap();
    assert_eq!(s.spec.unwrap().replicas, Some(0));
    assert_eq!(widgets.get("w1").await.unwrap().spec.replicas, 0);
    // stale resourceVersion on the Scale -> Conflict
    assert_api_err(
        widgets
            .replace_scale("w1", &PostParams::default(), &new)
            .await,
        409,
        "Conflict",
    );
    // negative replicas -> Invalid
    assert_api_err(
        widgets
            .patch_scale(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": -1}})),
            )
            .await,
        422,
        "Invalid",
    );
    assert_api_err(widgets.get_scale("missing").await, 404, "NotFound");
}

#[tokio::test]
async fn crd_created_through_the_api() {
    let (api, client) = setup();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = Widget::crd();
    crds.patch(
        "widgets.test.example.com",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    let established = await_condition(
        crds.clone(),
        "widgets.test.example.com",
        conditions::is_crd_established(),
    );
    tokio::time::timeout(std::time::Duration::from_secs(5), established)
        .await
        .unwrap()
        .unwrap();
    let widgets: Api<Widget> = Api::all(client.clone());
    widgets
        .create(&PostParams::default(), &widget("w", 1))
        .await
        .unwrap();
    assert_eq!(
        widgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    // registering the same CRD again through the Rust API is idempotent
    api.register_crd(&crd).unwrap();
    assert_eq!(
        widgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // an invalid CRD is rejected
    let mut bad = crd.clone();
    bad.metadata.name = Some("wrong.name".into());
    bad.metadata.resource_version = None;
    assert_api_err(
        crds.create(&PostParams::default(), &bad).await,
        422,
        "Invalid",
    );
    assert!(api.register_crd(&bad).is_err());

    // deleting the CRD removes its objects and the resource
    crds.delete("widgets.test.example.com", &DeleteParams::default())
        .await
        .unwrap();
    assert_api_err(widgets.list(&ListParams::default()).await, 404, "NotFound");
}

mod controller {
    use std::sync::Arc;
    use std::time::Duration;

    use futures::StreamExt;
    use kube::ResourceExt;
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use kube::runtime::controller::{Action, Controller};
    use kube::runtime::finalizer::{Error as FinalizerError, Event, finalizer};
    use kube::runtime::watcher;
    use serde_json::json;

    use crate::*;

    const FINALIZER: &str = "test.example.com/cleanup";

    async fn reconcile(
        w: Arc<Widget>,
        api: Arc<Api<Widget>>,
    ) -> Result<Action, FinalizerError<kube::Error>> {
        let a = (*api).clone();
        finalizer(&api, FINALIZER, w, |ev| async move {
            match ev {
                Event::Apply(w) => {
                    let want = w.spec.replicas;
                    if w.status.as_ref().map(|s| s.replicas) != Some(want) {
                        a.patch_status(
                            &w.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": {"replicas": want}})),
                        )
                        .await?;
                    }
                    Ok(Action::await_change())
                }
                Event::Cleanup(_) => Ok(Action::await_change()),
            }
        })
        .await
    }

    fn error_policy(
        _w: Arc<Widget>,
        _e: &FinalizerError<kube::Error>,
        _api: Arc<Api<Widget>>,
    ) -> Action {
        Action::requeue(Duration::from_millis(50))
    }

    /// A real kube-runtime `Controller` using the finalizer helper (JSON
    /// patches with `test` ops) runs unchanged.
    #[tokio::test]
    async fn runtime_controller_with_finalizer() {
        let (_api, client) = setup_with_crd();
        let widgets: Api<Widget> = Api::all(client);
        tokio::spawn(
            Controller::new(widgets.clone(), watcher::Config::default())
                .run(reconcile, error_policy, Arc::new(widgets.clone()))
                .for_each(|_| async {}),
        );
        widgets
            .create(&PostParams::default(), &widget("w1", 3))
            .await
            .unwrap();
        eventually_async("reconciled", || async {
            let w = widgets.get("w1").await.unwrap();
            w.finalizers().iter().any(|f| f == FINALIZER)
                && w.status.is_some_and(|s| s.replicas == 3)
        })
        .await;
        widgets
            .patch(
                "w1",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 4}})),
            )
            .await
            .unwrap();
        eventually_async("re-reconciled", || async {
            widgets
                .get("w1")
                .await
                .unwrap()
                .status
                .is_some_and(|s| s.replicas == 4)
        })
        .await;
        widgets
            .delete("w1", &DeleteParams::default())
            .await
            .unwrap();
        eventually_async("finalized and gone", || async {
            widgets.get_opt("w1").await.unwrap().is_none()
        })
        .await;
    }
}
