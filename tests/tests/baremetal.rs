//! The bare-metal backend end to end, against real protocol peers: sushy-tools' Redfish
//! emulator (the BMCs) and Debian's openssh-server (the hosts' OS, whose `kubeadm` is a test
//! script recording its calls), both started by `tests/emulators/` (see
//! `kube_node_provider_baremetal::testenv`), with the real controllers in process against the
//! embedded API server and claims kept as Leases in it.
//!
//! The kubelet is played by the test: a Node becomes Ready once `kubeadm join` was invoked on
//! its host with its own JoinConfiguration, as a kubelet that joined would make it.
//!
//! Every test takes its own slice of the emulator's 48 systems.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_node_crds::NodeClassSpec;
use kube_node_crds::NodeSet;
use kube_node_crds::names::{REPLICA_FAILURE_CONDITION, tags};
use kube_node_crds::v1alpha1::{BaremetalHost, BaremetalProviderSpec, ProviderSpec, ProviderType};
use kube_node_provider::{
    ClaimRecord, ClaimStore, CreateRequest, Provider, ProviderError, ResolvedClass, Result,
    Sensitive, Written,
};
use kube_node_provider_baremetal::BaremetalFactory;
use kube_node_provider_baremetal::testenv::Lab;
use node_controller::claims::{CLAIM_LABEL, LeaseClaimStore};
use serde_json::json;

const NAMESPACE: &str = "kube-node-system";
const SECRET: &str = "rack-credentials";
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) => assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: not reached within {}s: {why}",
                timeout.as_secs()
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn credentials_secret(lab: &Lab) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        },
        data: Some(
            lab.credentials()
                .0
                .into_iter()
                .map(|(k, v)| (k, ByteString(v)))
                .collect(),
        ),
        ..Default::default()
    }
}

fn class_spec(lab: &Lab, hosts: &[BaremetalHost]) -> serde_json::Value {
    json!({
        "provider": {"type": "baremetal", "baremetal": {
            "hosts": hosts,
            "sshUser": lab.ssh_user,
            "shutdownTimeout": "30s",
        }},
        "credentialsSecretRef": {"namespace": NAMESPACE, "name": SECRET},
        "timeouts": {"registration": "3m"},
        "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
    })
}

fn provider_id(node: &Node) -> Option<String> {
    node.spec
        .as_ref()?
        .provider_id
        .clone()
        .filter(|p| !p.is_empty())
}

/// The kubelet stand-in: a Node whose host ran `kubeadm join` with its JoinConfiguration
/// gets `Ready=True`.
async fn kubelet(client: Client, lab: &'static Lab) {
    let nodes: Api<Node> = Api::all(client);
    loop {
        if let Ok(list) = nodes.list(&ListParams::default()).await {
            for n in list.items {
                let ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                if ready || provider_id(&n).is_none() || n.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                if lab.joins_of(&n.name_any()).is_empty() {
                    continue;
                }
                let now = jiff::Timestamp::now().to_string();
                let patch = json!({"status": {"conditions": [{
                    "type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": now, "lastTransitionTime": now,
                }]}});
                let _ = nodes
                    .patch_status(
                        &n.name_any(),
                        &PatchParams::default(),
                        &Patch::Strategic(patch),
                    )
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn claim_leases(client: &Client) -> Vec<Lease> {
    Api::<Lease>::namespaced(client.clone(), NAMESPACE)
        .list(&ListParams::default().labels(CLAIM_LABEL))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn powered_on(lab: &Lab, range: std::ops::Range<usize>) -> usize {
    range
        .filter(|i| lab.power_state(*i).as_deref() == Some("On"))
        .count()
}

/// Turns this test's slice of the rack off (an earlier run may have left hosts on).
async fn rack_off(lab: &Lab, range: std::ops::Range<usize>) {
    for i in range.clone() {
        if lab.power_state(i).as_deref() != Some("Off") {
            lab.reset(i, "ForceOff");
        }
    }
    eventually(
        "the test's hosts are off",
        Duration::from_secs(30),
        || async {
            let on = range
                .clone()
                .filter(|i| lab.power_state(*i).as_deref() != Some("Off"))
                .count();
            if on == 0 {
                Ok(())
            } else {
                Err(format!("{on} hosts not off yet"))
            }
        },
    )
    .await;
}

async fn live_nodes(client: &Client, nodeset: &str) -> Vec<Node> {
    Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| {
            n.metadata.deletion_timestamp.is_none()
                && n.owner_references()
                    .iter()
                    .any(|o| o.kind == "NodeSet" && o.name == nodeset)
        })
        .collect()
}

async fn scale(client: &Client, name: &str, replicas: i32) {
    Api::<NodeSet>::all(client.clone())
        .patch_scale(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": replicas}})),
        )
        .await
        .unwrap_or_else(|e| panic!("scaling {name} to {replicas}: {e}"));
}

#[tokio::test]
async fn nodeset_scales_0_5_2_0_on_five_hosts_and_a_sixth_replica_finds_no_host() {
    let lab = Lab::shared();
    const FIRST: usize = 10;
    const N: usize = 5;
    rack_off(lab, FIRST..FIRST + N).await;
    let mut cluster = kube_node::harness::Harness::builder()
        .with_provider(Arc::new(BaremetalFactory::new()))
        .without_kubelet()
        .controllers_stopped()
        .start()
        .await
        .expect("cluster");
    let client = cluster.client.clone();
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &credentials_secret(lab))
        .await
        .expect("credentials Secret");
    let hosts = lab.hosts("rack", FIRST, N);
    cluster
        .create_node_class("rack-a", class_spec(lab, &hosts))
        .await
        .expect("NodeClass");
    cluster
        .create_node_set("rack-a", "rack-a", 0)
        .await
        .expect("NodeSet");
    // A cluster-autoscaler node group of up to 10 (more than the rack has).
    Api::<NodeSet>::all(client.clone())
        .patch(
            "rack-a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minSize": 0, "maxSize": 10}})),
        )
        .await
        .expect("sizes");
    cluster.start_controllers();
    cluster.spawn(kubelet(client.clone(), lab));

    // 0 → 5: every host joins with its own Node's JoinConfiguration.
    let started = Instant::now();
    scale(&client, "rack-a", 5).await;
    let nodes = eventually("5 hosts joined", STEP_TIMEOUT, || async {
        let nodes = live_nodes(&client, "rack-a").await;
        let joined = nodes
            .iter()
            .filter(|n| !lab.joins_of(&n.name_any()).is_empty())
            .count();
        if nodes.len() == 5 && joined == 5 {
            Ok(nodes)
        } else {
            Err(format!("{} Nodes, {joined} joined", nodes.len()))
        }
    })
    .await;
    println!(
        "baremetal: scale-up to 5 hosts -> the 5th kubeadm join invoked in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    for n in &nodes {
        let calls = lab.joins_of(&n.name_any());
        assert_eq!(calls.len(), 1, "Node {} joined once", n.name_any());
        let config = calls[0]
            .config
            .as_deref()
            .expect("JoinConfiguration recorded");
        assert!(config.contains("kind: JoinConfiguration"), "{config}");
        assert!(
            config.contains("token: "),
            "the bootstrap token is in the join file"
        );
        assert!(
            calls[0].args.starts_with("join --config "),
            "{}",
            calls[0].args
        );
        assert!(provider_id(n).is_some_and(|p| p.starts_with("baremetal:///rack-a/rack-")));
    }
    let leases = claim_leases(&client).await;
    let pids: Vec<_> = nodes.iter().filter_map(provider_id).collect();
    assert_eq!(
        leases.len(),
        5,
        "one claim Lease per host: {:?} for {pids:?}",
        leases
            .iter()
            .map(|l| (
                l.name_any(),
                l.spec.as_ref().and_then(|s| s.holder_identity.clone())
            ))
            .collect::<Vec<_>>()
    );
    for l in claim_leases(&client).await {
        let text = serde_json::to_string(&l).expect("json");
        assert!(
            !text.contains(&lab.redfish_password),
            "no BMC password in a claim"
        );
        assert!(!text.contains("PRIVATE KEY"), "no SSH key in a claim");
        assert!(!text.contains("token"), "no bootstrap token in a claim");
    }
    eventually("5 Nodes Ready", STEP_TIMEOUT, || async {
        let ns = Api::<NodeSet>::all(client.clone())
            .get("rack-a")
            .await
            .map_err(|e| e.to_string())?;
        let ready = ns.status.map(|s| s.ready_replicas).unwrap_or_default();
        if ready == 5 {
            Ok(())
        } else {
            Err(format!("{ready} ready"))
        }
    })
    .await;
    // The emulator applies a power change 1 to 11 s after the request (the test machine's
    // sshd answered long before).
    eventually("5 hosts on", Duration::from_secs(30), || async {
        let on = powered_on(lab, FIRST..FIRST + N);
        if on == 5 {
            Ok(())
        } else {
            Err(format!("{on} on"))
        }
    })
    .await;

    // The pool is spent: the class, the NodeSet (`kubectl get nodeset` column Free) and the
    // autoscaler's max size say so.
    eventually(
        "free machines 0, autoscaler max size 5",
        STEP_TIMEOUT,
        || async {
            let nc = Api::<kube_node_crds::NodeClass>::all(client.clone())
                .get("rack-a")
                .await
                .map_err(|e| e.to_string())?;
            let ns = Api::<NodeSet>::all(client.clone())
                .get("rack-a")
                .await
                .map_err(|e| e.to_string())?;
            let class_free = nc.status.and_then(|s| s.free_machines);
            let set_free = ns.status.as_ref().and_then(|s| s.free_machines);
            let max = kube_node_autoscaler::effective_max_size(&ns);
            if class_free == Some(0) && set_free == Some(0) && max == 5 {
                Ok(())
            } else {
                Err(format!(
                    "class free {class_free:?}, nodeset free {set_free:?}, max size {max}"
                ))
            }
        },
    )
    .await;

    // A 6th replica: no free host. The Node reports it (condition, event) and the NodeSet's
    // ReplicaFailure says InsufficientCapacity, while nothing is powered and nothing joins.
    scale(&client, "rack-a", 6).await;
    eventually(
        "the 6th replica reports no free host",
        STEP_TIMEOUT,
        || async {
            let ns = Api::<NodeSet>::all(client.clone())
                .get("rack-a")
                .await
                .map_err(|e| e.to_string())?;
            let c = ns.status.as_ref().and_then(|s| {
                s.conditions
                    .iter()
                    .find(|c| c.type_ == REPLICA_FAILURE_CONDITION)
                    .cloned()
            });
            match c {
                Some(c)
                    if c.status == "True"
                        && c.reason == "InsufficientCapacity"
                        && c.message.contains("no free host") =>
                {
                    Ok(())
                }
                other => Err(format!("ReplicaFailure {other:?}")),
            }
        },
    )
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    eventually(
        "a Warning event says no free host",
        STEP_TIMEOUT,
        || async {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .find(|e| {
                    e.reason.as_deref() == Some("InsufficientCapacity")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("no free host"))
                })
                .map(|_| ())
                .ok_or_else(|| "no InsufficientCapacity event yet".to_string())
        },
    )
    .await;
    assert_eq!(claim_leases(&client).await.len(), 5, "no 6th claim");

    // 6 → 2 → 0: hosts are reset, powered off and released.
    scale(&client, "rack-a", 2).await;
    eventually("2 Nodes, 2 claims, 2 hosts on", STEP_TIMEOUT, || async {
        let n = live_nodes(&client, "rack-a").await.len();
        let all = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .len();
        let claims = claim_leases(&client).await.len();
        let on = powered_on(lab, FIRST..FIRST + N);
        if n == 2 && all == 2 && claims == 2 && on == 2 {
            Ok(())
        } else {
            Err(format!("{n} live / {all} Nodes, {claims} claims, {on} on"))
        }
    })
    .await;
    eventually("3 hosts free again, max size 5", STEP_TIMEOUT, || async {
        let ns = Api::<NodeSet>::all(client.clone())
            .get("rack-a")
            .await
            .map_err(|e| e.to_string())?;
        let free = ns.status.as_ref().and_then(|s| s.free_machines);
        let max = kube_node_autoscaler::effective_max_size(&ns);
        if free == Some(3) && max == 5 {
            Ok(())
        } else {
            Err(format!("free {free:?}, max {max}"))
        }
    })
    .await;
    scale(&client, "rack-a", 0).await;
    eventually(
        "no Node, no claim, every host off",
        STEP_TIMEOUT,
        || async {
            let all = Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            let claims = claim_leases(&client).await.len();
            let on = powered_on(lab, FIRST..FIRST + N);
            if all == 0 && claims == 0 && on == 0 {
                Ok(())
            } else {
                Err(format!("{all} Nodes, {claims} claims, {on} on"))
            }
        },
    )
    .await;
    let resets = lab
        .kubeadm_calls()
        .iter()
        .filter(|c| c.args == "reset -f")
        .count();
    assert!(
        resets >= 5,
        "kubeadm reset -f ran on every released host ({resets})"
    );
    cluster.shutdown().await.expect("shutdown");
}

// --- provider-level scenarios over the Lease claim store ------------------------------------

fn resolved(
    lab: &Lab,
    name: &str,
    hosts: Vec<BaremetalHost>,
    claims: Arc<dyn ClaimStore>,
) -> ResolvedClass {
    let spec: NodeClassSpec = serde_json::from_value(
        json!({"provider": {"type": "baremetal"}, "timeouts": {"registration": "2m"}}),
    )
    .expect("spec");
    ResolvedClass {
        name: name.into(),
        generation: 1,
        spec: NodeClassSpec {
            provider: ProviderSpec {
                type_: ProviderType::Baremetal,
                baremetal: Some(BaremetalProviderSpec {
                    hosts,
                    ssh_user: Some(lab.ssh_user.clone()),
                    shutdown_timeout: Some(Duration::from_secs(20).into()),
                    ..Default::default()
                }),
                ..spec.provider
            },
            ..spec
        },
        credentials: Some(lab.credentials()),
        cluster_name: "bm-it".into(),
        inventory: None,
        claims: Some(claims),
    }
}

fn request(class: &str, uid: &str, name: &str) -> CreateRequest {
    let mut r = kube_node_provider::conformance::Conformance::default_request("bm-it", uid, name);
    r.tags.insert(tags::NODE_CLASS.into(), class.into());
    let join = format!(
        "apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\nnodeRegistration:\n  name: {name}\n"
    );
    let ud = json!({
        "write_files": [{"path": "/tmp/kube-node-test/join.yaml", "permissions": "0600", "content": join}],
        "runcmd": [["kubeadm", "join", "--config", "/tmp/kube-node-test/join.yaml"]],
    });
    r.user_data = Some(Sensitive(format!(
        "#cloud-config\n{}",
        serde_yaml::to_string(&ud).expect("yaml")
    )));
    r
}

/// A claim store that "crashes" the process right after its first successful create: that
/// call never returns, so nothing after the claim runs (the test then drops the provider,
/// as a `kill -9` would).
struct DieAfterClaim {
    inner: LeaseClaimStore,
}

#[async_trait::async_trait]
impl ClaimStore for DieAfterClaim {
    async fn get(&self, key: &str) -> Result<Option<ClaimRecord>> {
        self.inner.get(key).await
    }
    async fn list(&self) -> Result<Vec<ClaimRecord>> {
        self.inner.list().await
    }
    async fn create(&self, record: &ClaimRecord) -> Result<Written> {
        let w = self.inner.create(record).await?;
        if matches!(w, Written::Done(_)) {
            std::future::pending::<()>().await;
        }
        Ok(w)
    }
    async fn replace(&self, record: &ClaimRecord) -> Result<Written> {
        self.inner.replace(record).await
    }
    async fn delete(&self, key: &str, version: &str) -> Result<bool> {
        self.inner.delete(key, version).await
    }
}

#[tokio::test]
async fn lease_claim_store_conforms() {
    let api = kube_node_embedded_api::EmbeddedApi::new();
    let store = LeaseClaimStore::new(api.client(), NAMESPACE);
    kube_node_provider::claims::check_store(&store, "check")
        .await
        .expect("Leases conform");
}

#[tokio::test]
async fn kill_between_claim_and_power_on_leaves_one_claim_and_one_powered_host() {
    let lab = Lab::shared();
    const FIRST: usize = 20;
    const N: usize = 3;
    rack_off(lab, FIRST..FIRST + N).await;
    let api = kube_node_embedded_api::EmbeddedApi::new();
    let hosts = lab.hosts("kill", FIRST, N);
    let req = request(
        "kill",
        "00000000-0000-4000-8000-00000000kill",
        "kill-node-1",
    );

    // First process: claims a host, then dies before any Redfish call.
    let dying: Arc<dyn ClaimStore> = Arc::new(DieAfterClaim {
        inner: LeaseClaimStore::new(api.client(), NAMESPACE),
    });
    let first = BaremetalFactory::new()
        .build_baremetal(&resolved(lab, "kill", hosts.clone(), dying))
        .expect("build");
    let r = tokio::time::timeout(Duration::from_secs(10), first.create(&req)).await;
    assert!(
        r.is_err(),
        "the first create never returns (it was killed after the claim)"
    );
    let stats = first.stats();
    drop(first);
    assert_eq!(
        powered_on(lab, FIRST..FIRST + N),
        0,
        "nothing was powered before the kill"
    );
    let leases = Api::<Lease>::namespaced(api.client(), NAMESPACE);
    assert_eq!(
        leases
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );

    // The restarted process retries the same create: it finds the claim and finishes it.
    let store: Arc<dyn ClaimStore> = Arc::new(LeaseClaimStore::new(api.client(), NAMESPACE));
    let second = BaremetalFactory::new()
        .build_baremetal(&resolved(lab, "kill", hosts.clone(), store.clone()))
        .expect("build");
    let i = second.create(&req).await.expect("create after restart");
    let again = second.create(&req).await.expect("idempotent");
    assert_eq!(i.provider_id, again.provider_id);
    eventually("the claimed host joined", STEP_TIMEOUT, || async {
        if lab.joins_of("kill-node-1").len() == 1 {
            Ok(())
        } else {
            Err("no join yet".into())
        }
    })
    .await;
    eventually("exactly one host on", Duration::from_secs(30), || async {
        let on = powered_on(lab, FIRST..FIRST + N);
        if on == 1 {
            Ok(())
        } else {
            Err(format!("{on} on"))
        }
    })
    .await;
    let claims = store.list().await.expect("claims");
    assert_eq!(claims.len(), 1, "exactly one claim: {claims:?}");
    assert_eq!(claims[0].node_uid, req.idempotency_key);
    println!(
        "baremetal: the killed create made {} Redfish requests before dying",
        stats.redfish_requests()
    );
    // Delete releases it.
    second.delete(&i.provider_id).await.expect("delete");
    eventually("released", Duration::from_secs(60), || async {
        match second.get(&i.provider_id).await {
            Err(ProviderError::NotFound(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(store.list().await.expect("claims").is_empty());
}

#[tokio::test]
async fn two_node_classes_listing_one_host_never_share_it() {
    let lab = Lab::shared();
    const FIRST: usize = 24;
    rack_off(lab, FIRST..FIRST + 1).await;
    let api = kube_node_embedded_api::EmbeddedApi::new();
    let store: Arc<dyn ClaimStore> = Arc::new(LeaseClaimStore::new(api.client(), NAMESPACE));
    // The same BMC system, under two names and spellings in two classes.
    let a_hosts = lab.hosts("a", FIRST, 1);
    let mut b_hosts = lab.hosts("b", FIRST, 1);
    b_hosts[0].redfish_url = format!("{}/", b_hosts[0].redfish_url);
    let a = BaremetalFactory::new()
        .build_baremetal(&resolved(lab, "a", a_hosts, store.clone()))
        .expect("a");
    let b = BaremetalFactory::new()
        .build_baremetal(&resolved(lab, "b", b_hosts, store.clone()))
        .expect("b");
    let req_a = request("a", "00000000-0000-4000-8000-0000000000aa", "share-a");
    let req_b = request("b", "00000000-0000-4000-8000-0000000000bb", "share-b");
    let (ra, rb) = tokio::join!(a.create(&req_a), b.create(&req_b));
    let won = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "exactly one class gets the host: {ra:?} / {rb:?}");
    let lost = if ra.is_err() { &ra } else { &rb };
    assert!(
        matches!(lost, Err(ProviderError::InsufficientCapacity(_))),
        "{lost:?}"
    );
    assert_eq!(store.list().await.expect("claims").len(), 1);
    let (p, inst) = if let Ok(i) = &ra {
        (&a, i)
    } else {
        (&b, rb.as_ref().expect("b won"))
    };
    p.delete(&inst.provider_id).await.expect("delete");
    eventually("released", Duration::from_secs(60), || async {
        match p.get(&inst.provider_id).await {
            Err(ProviderError::NotFound(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

#[tokio::test]
async fn a_host_whose_ssh_host_key_changed_is_never_joined() {
    let lab = Lab::shared();
    const FIRST: usize = 26;
    rack_off(lab, FIRST..FIRST + 1).await;
    let api = kube_node_embedded_api::EmbeddedApi::new();
    let store: Arc<dyn ClaimStore> = Arc::new(LeaseClaimStore::new(api.client(), NAMESPACE));
    let mut hosts = lab.hosts("rekeyed", FIRST, 1);
    // The inventory pins the key the host had; the host now presents another.
    hosts[0].ssh_host_key = Some(lab.other_host_key.clone());
    let p = BaremetalFactory::new()
        .build_baremetal(&resolved(lab, "rekeyed", hosts, store.clone()))
        .expect("build");
    let req = request(
        "rekeyed",
        "00000000-0000-4000-8000-0000000000cc",
        "rekeyed-node",
    );
    let i = p.create(&req).await.expect("create claims and powers on");
    let failed = eventually("the host is marked failed", STEP_TIMEOUT, || async {
        let c = store.list().await.map_err(|e| e.to_string())?;
        match c.first() {
            Some(r) if r.data.get("phase").map(String::as_str) == Some("failed") => Ok(r.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        failed
            .data
            .get("reason")
            .is_some_and(|r| r.starts_with("HostKeyChanged")),
        "{failed:?}"
    );
    assert!(
        lab.joins_of("rekeyed-node").is_empty(),
        "kubeadm join never ran on it"
    );
    assert_ne!(
        p.get(&i.provider_id).await.expect("get").state,
        kube_node_provider::InstanceState::Running
    );
    // Deleting its Node powers it off and sets it aside: never silently re-used.
    p.delete(&i.provider_id).await.expect("delete");
    eventually("gone for the Node", Duration::from_secs(60), || async {
        match p.get(&i.provider_id).await {
            Err(ProviderError::NotFound(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let held = store.list().await.expect("claims");
    assert_eq!(held.len(), 1, "the claim stays, without a Node");
    assert!(held[0].node_uid.is_empty());
    assert_eq!(p.free_capacity().await.expect("free"), Some(0));
    let next = p
        .create(&request(
            "rekeyed",
            "00000000-0000-4000-8000-0000000000dd",
            "rekeyed-2",
        ))
        .await;
    assert!(
        matches!(next, Err(ProviderError::InsufficientCapacity(_))),
        "{next:?}"
    );
    assert_eq!(lab.power_state(FIRST).as_deref(), Some("Off"));
}
