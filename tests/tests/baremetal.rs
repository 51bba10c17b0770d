//! The bare-metal backend end to end, against real protocol peers: sushy-tools' Redfish
//! emulator (the BMCs) and Debian's openssh-server (the hosts' OS, whose `kubeadm` is a test
//! script recording its calls), both started by `tests/emulators/` (see
//! `kube_node_provider_baremetal::testenv`), with the real controllers in process against the
//! embedded API server and claims kept as Leases in it.
//!
//! The kubelet is played by the test: a Node becomes Ready once `kubeadm join` was invoked on
//! its host with its own JoinConfiguration, as a kubelet that joined would make it.
//!
//! Every test takes its own slice of the emulator's 48 systems. The kill tests run the real
//! `kube-node` binary against the embedded API served on loopback and `kill -9` it.
#[allow(dead_code)]
#[path = "e2e/support.rs"]
mod support;

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
use kube_node_crds::names::{
    MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION, REPLICA_FAILURE_CONDITION, tags,
};
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

fn class_spec(lab: &Lab, name: &str, hosts: &[BaremetalHost]) -> serde_json::Value {
    json!({
        "provider": {"type": "baremetal", "baremetal": {
            "hosts": hosts,
            "sshUser": lab.ssh_user,
            "shutdownTimeout": "30s",
            // The "hosts" are this machine: their JoinConfiguration goes into the run's
            // directory, never /etc/kubernetes.
            "joinConfigPath": lab.join_config_path(name),
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
    let mut hosts = lab.hosts("rack", FIRST, N);
    for h in &mut hosts {
        h.labels.insert("example.com/rack".into(), "a".into());
    }
    cluster
        .create_node_class("rack-a", class_spec(lab, "rack-a", &hosts))
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
        assert!(
            calls[0].args.contains(&lab.join_config_path("rack-a")),
            "the JoinConfiguration went to joinConfigPath: {}",
            calls[0].args
        );
    }
    // The inventory's labels are the Nodes' labels.
    eventually("the hosts' labels on their Nodes", STEP_TIMEOUT, || async {
        let nodes = live_nodes(&client, "rack-a").await;
        let labelled = nodes
            .iter()
            .filter(|n| {
                n.labels().get("example.com/rack").map(String::as_str) == Some("a")
                    && n.labels()
                        .get("topology.kubernetes.io/zone")
                        .map(String::as_str)
                        == Some("rack-a")
            })
            .count();
        if labelled == 5 {
            Ok(())
        } else {
            Err(format!("{labelled} of {} Nodes labelled", nodes.len()))
        }
    })
    .await;
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
                    // As kube-node renders it, then moved off the test machine's /etc.
                    join_config_path: Some(lab.join_config_path(name)),
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
        "write_files": [{"path": "/etc/kubernetes/kubeadm-join.yaml", "permissions": "0600", "content": join}],
        "runcmd": [["kubeadm", "join", "--config", "/etc/kubernetes/kubeadm-join.yaml"]],
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

// --- the real binary, killed at the worst moments --------------------------------------------

/// A TCP proxy in front of the Redfish emulator: a slow BMC. It holds every chunk the client
/// sends for `delay` before passing it on, and counts the `ComputerSystem.Reset` requests
/// sent to it (power changes asked for) and all requests.
struct SlowBmc {
    endpoint: String,
    resets: Arc<std::sync::atomic::AtomicUsize>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowBmc {
    async fn start(upstream: &str, delay: Duration) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let resets = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (r, q) = (resets.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (r, q) = (r.clone(), q.clone());
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let head = String::from_utf8_lossy(&buf[..n.min(256)]);
                            let line = head.lines().next().unwrap_or_default();
                            if line.ends_with("HTTP/1.1") {
                                q.fetch_add(1, Ordering::SeqCst);
                                if line.starts_with("POST ")
                                    && line.contains("ComputerSystem.Reset")
                                {
                                    r.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                            tokio::time::sleep(delay).await;
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    };
                    let down = async {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                        let _ = cw.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Self {
            endpoint,
            resets,
            requests,
            task,
        }
    }

    fn resets(&self) -> usize {
        self.resets.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for SlowBmc {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The embedded API server (CRDs, cluster CA) served on a loopback port, and `kube-node run`
/// processes against it.
struct Apiserver {
    cluster: kube_node::harness::Harness,
    server: Option<kube_node_embedded_api::Server>,
    dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

impl Apiserver {
    async fn start() -> Self {
        let cluster = kube_node::harness::Harness::builder()
            .api_only()
            .start()
            .await
            .expect("API server");
        let server = cluster
            .api
            .serve("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("serve");
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).expect("kubeconfig");
        Self {
            cluster,
            server: Some(server),
            dir,
            kubeconfig,
        }
    }

    /// `kube-node run` (one replica, no leader election) as cluster `cluster`; its output goes
    /// to `kube-node-<n>.log` in the scratch directory.
    fn run(&self, cluster: &str, n: usize) -> std::process::Child {
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let log =
            std::fs::File::create(self.dir.path().join(format!("kube-node-{n}.log"))).expect("log");
        let mut cmd = std::process::Command::new(kube_node_bin());
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().to_string();
            if k.starts_with("KUBE_NODE_") || k.starts_with("POD_") || k == "KUBECONFIG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .args(["run", "--leader-elect=false", "--cluster-name", cluster])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--api-server-endpoint", "127.0.0.1:6443"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("kube-node run starts")
    }

    /// The log of run `n`, for failure messages.
    fn log(&self, n: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("kube-node-{n}.log")))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn create_node(&self, name: &str, class: &str) {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {NODE_CLASS_ANNOTATION: class}},
        }))
        .expect("Node");
        Api::<Node>::all(self.cluster.client.clone())
            .create(&PostParams::default(), &node)
            .await
            .expect("create Node");
    }
}

impl Drop for Apiserver {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// The `kube-node` binary that the build of this test built beside it (`tests/run.sh` builds
/// `--bins` with the tests): a `cargo build -p kube-node` from here would resolve other
/// features and rebuild half the workspace. Built by cargo (`e2e/support.rs`) when it is
/// missing or older than this test by more than the length of a build.
fn kube_node_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let beside = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "deps"))
        .and_then(std::path::Path::parent)
        .map(|p| p.join("kube-node"));
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let Some(bin) = beside
        && let (Some(b), Some(t)) = (modified(&bin), modified(&exe))
        && b + Duration::from_secs(1800) >= t
    {
        return bin;
    }
    support::kube_node_bin()
}

/// SIGKILL, as `kill -9` (std's `Child::kill` sends it on Unix), and reaps the process.
fn kill_9(child: &mut std::process::Child) {
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
}

fn machine_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == MACHINE_READY_CONDITION && c.status == "True")
        })
}

async fn wait_node_ready(api: &Apiserver, name: &str, run: usize) {
    let nodes = Api::<Node>::all(api.cluster.client.clone());
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        if nodes
            .get_opt(name)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| machine_ready(&n))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Node {name} not Ready in 150 s; kube-node's log:\n{}",
            api.log(run)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Deletes the Node and waits until its host is released: no claim, host off.
async fn delete_and_release(api: &Apiserver, name: &str, lab: &Lab, hosts: std::ops::Range<usize>) {
    let client = api.cluster.client.clone();
    Api::<Node>::all(client.clone())
        .delete(name, &Default::default())
        .await
        .expect("delete Node");
    eventually("the host released", STEP_TIMEOUT, || async {
        let gone = Api::<Node>::all(client.clone())
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?
            .is_none();
        let claims = claim_leases(&client).await.len();
        let on = powered_on(lab, hosts.clone());
        if gone && claims == 0 && on == 0 {
            Ok(())
        } else {
            Err(format!("Node gone {gone}, {claims} claims, {on} on"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_kube_node_between_claim_and_power_on_then_a_restart_joins_one_host() {
    let lab = Lab::shared();
    const FIRST: usize = 31;
    const N: usize = 3;
    rack_off(lab, FIRST..FIRST + N).await;
    // A slow BMC (every request held 2.5 s): the window between the claim and the power-on
    // is then wide enough to kill the process in, every time, without a knob in kube-node.
    let bmc = SlowBmc::start(&lab.redfish_endpoint, Duration::from_millis(2500)).await;
    let api = Apiserver::start().await;
    let client = api.cluster.client.clone();
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &credentials_secret(lab))
        .await
        .expect("credentials Secret");
    let mut hosts = lab.hosts("kill9", FIRST, N);
    for (h, i) in hosts.iter_mut().zip(FIRST..) {
        h.redfish_url = format!("{}/redfish/v1/Systems/{}", bmc.endpoint, lab.systems[i]);
    }
    api.cluster
        .create_node_class("kill9", class_spec(lab, "kill9", &hosts))
        .await
        .expect("NodeClass");
    let kubelet = tokio::spawn(kubelet(client.clone(), lab));

    let mut first = api.run("bm-kill", 1);
    api.create_node("kill9-node", "kill9").await;
    // The moment the claim exists: kill -9.
    let deadline = Instant::now() + Duration::from_secs(120);
    while claim_leases(&client).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no claim within 120 s; kube-node's log:\n{}",
            api.log(1)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    kill_9(&mut first);
    assert_eq!(bmc.resets(), 0, "killed before a power-on was even sent");
    assert_eq!(claim_leases(&client).await.len(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(powered_on(lab, FIRST..FIRST + N), 0, "nothing was powered");

    // The restarted process finishes the claimed host's launch: no second claim.
    let mut second = api.run("bm-kill", 2);
    wait_node_ready(&api, "kill9-node", 2).await;
    let leases = claim_leases(&client).await;
    assert_eq!(leases.len(), 1, "exactly one claim");
    assert_eq!(
        leases[0]
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref()),
        Some("kill9-node")
    );
    assert_eq!(
        lab.joins_of("kill9-node").len(),
        1,
        "exactly one kubeadm join; the killed process:\n{}\nthe restarted one:\n{}",
        api.log(1),
        api.log(2)
    );
    eventually("exactly one host on", Duration::from_secs(30), || async {
        match powered_on(lab, FIRST..FIRST + N) {
            1 => Ok(()),
            on => Err(format!("{on} on")),
        }
    })
    .await;
    assert_eq!(bmc.resets(), 1, "one power-on in all");
    println!(
        "baremetal: kill -9 between claim and power-on, restart, joined: {} Redfish requests to the class's BMCs in all (validation of 3 hosts by both processes included)",
        bmc.requests()
    );
    delete_and_release(&api, "kill9-node", lab, FIRST..FIRST + N).await;
    kill_9(&mut second);
    kubelet.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_kubeadm_join_then_a_restart_never_joins_twice() {
    let lab = Lab::shared();
    const FIRST: usize = 34;
    const N: usize = 2;
    rack_off(lab, FIRST..FIRST + N).await;
    let api = Apiserver::start().await;
    let client = api.cluster.client.clone();
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &credentials_secret(lab))
        .await
        .expect("credentials Secret");
    let hosts = lab.hosts("resume", FIRST, N);
    api.cluster
        .create_node_class("resume", class_spec(lab, "resume", &hosts))
        .await
        .expect("NodeClass");
    // The host's kubeadm join takes 12 s.
    lab.hold_join("resume-node", 12).expect("hold the join");
    let kubelet = tokio::spawn(kubelet(client.clone(), lab));

    let mut first = api.run("bm-resume", 1);
    api.create_node("resume-node", "resume").await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !lab.join_running("resume-node") {
        assert!(
            Instant::now() < deadline,
            "no kubeadm join within 120 s; kube-node's log:\n{}",
            api.log(1)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kill_9(&mut first);
    assert!(lab.joins_of("resume-node").is_empty(), "killed mid-join");

    // The join on the host runs on without its SSH session; the restarted process does not
    // run it again (on a real host a second `kubeadm join` fails its preflight checks).
    let mut second = api.run("bm-resume", 2);
    wait_node_ready(&api, "resume-node", 2).await;
    assert!(!lab.join_running("resume-node"), "no second join runs");
    assert_eq!(lab.joins_of("resume-node").len(), 1, "joined once");
    let leases = claim_leases(&client).await;
    assert_eq!(leases.len(), 1, "one claim");
    assert_eq!(
        leases[0]
            .annotations()
            .get("claim.kube-node.io/phase")
            .map(String::as_str),
        Some("joining"),
        "the claim says a join was started, so no process starts another"
    );
    eventually("exactly one host on", Duration::from_secs(30), || async {
        match powered_on(lab, FIRST..FIRST + N) {
            1 => Ok(()),
            on => Err(format!("{on} on")),
        }
    })
    .await;
    // The claim released as usual, though this process never saw the join end.
    delete_and_release(&api, "resume-node", lab, FIRST..FIRST + N).await;
    assert_eq!(lab.joins_of("resume-node").len(), 1, "still joined once");
    kill_9(&mut second);
    kubelet.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_collector_releases_a_claim_without_node_after_its_min_age_and_the_breaker_holds()
 {
    let lab = Lab::shared();
    const HERD: usize = 38;
    const LONE: usize = 41;
    rack_off(lab, HERD..LONE + 1).await;
    for i in HERD..=LONE {
        assert!(lab.reset(i, "On"), "power on host {i}");
    }
    eventually("the hosts on", Duration::from_secs(30), || async {
        match powered_on(lab, HERD..LONE + 1) {
            4 => Ok(()),
            on => Err(format!("{on} on")),
        }
    })
    .await;
    let min_age = Duration::from_secs(20);
    let mut cluster = kube_node::harness::Harness::builder()
        .with_provider(Arc::new(BaremetalFactory::new()))
        .without_kubelet()
        .node_config(node_controller::Config {
            cluster_name: "bm-orphans".into(),
            api_server_endpoint: Some("127.0.0.1:6443".into()),
            orphan_min_age: min_age,
            orphan_gc_interval: Duration::from_secs(1),
            orphan_max_fraction: 0.2,
            ..Default::default()
        })
        .controllers_stopped()
        .start()
        .await
        .expect("cluster");
    let client = cluster.client.clone();
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &credentials_secret(lab))
        .await
        .expect("credentials Secret");
    let herd = lab.hosts("herd", HERD, 3);
    let lone = lab.hosts("lone", LONE, 1);
    for (name, hosts) in [("herd", &herd), ("lone", &lone)] {
        cluster
            .create_node_class(name, class_spec(lab, name, hosts))
            .await
            .expect("NodeClass");
    }
    // Claims whose Nodes are gone (a kube-node that died between claim and Node, a Node
    // deleted while kube-node was down): three old ones of `herd`, a young one of `lone`.
    let store = LeaseClaimStore::new(client.clone(), NAMESPACE);
    let now = jiff::Timestamp::now().as_second();
    for (class, hosts, claimed_at) in [("herd", &herd, now - 3600), ("lone", &lone, now)] {
        for (n, h) in hosts.iter().enumerate() {
            let rec = ClaimRecord {
                key: kube_node_provider_baremetal::config::claim_key(&h.redfish_url),
                version: None,
                cluster: "bm-orphans".into(),
                node_class: class.into(),
                node_name: format!("{}-node", h.name),
                node_uid: format!("00000000-0000-4000-8000-{class}{n:08}"),
                claimed_at_unix: claimed_at,
                data: std::collections::BTreeMap::from([
                    ("host".to_string(), h.name.clone()),
                    ("phase".to_string(), "joined".to_string()),
                ]),
            };
            assert!(matches!(store.create(&rec).await, Ok(Written::Done(_))));
        }
    }
    let started = Instant::now();
    cluster.start_controllers();
    let lone_key = format!(
        "kube-node-host-{}",
        kube_node_provider_baremetal::config::claim_key(&lone[0].redfish_url)
    );
    let leases = Api::<Lease>::namespaced(client.clone(), NAMESPACE);

    // Young: kept through the waves before its min age.
    while started.elapsed() < min_age - Duration::from_secs(8) {
        assert!(
            leases.get_opt(&lone_key).await.expect("get").is_some(),
            "the young claim was kept"
        );
        assert_eq!(lab.power_state(LONE).as_deref(), Some("On"));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Three of three of `herd` would go at once: the breaker holds, and says so.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    eventually("the breaker's event", STEP_TIMEOUT, || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("OrphanCollectionPaused")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("herd")
            })
            .map(|_| ())
            .ok_or_else(|| "no OrphanCollectionPaused event yet".to_string())
    })
    .await;
    // Old enough: the lone claim's host is powered off and the claim released.
    eventually("the orphan released", STEP_TIMEOUT, || async {
        let held = leases.get_opt(&lone_key).await.map_err(|e| e.to_string())?;
        let power = lab.power_state(LONE);
        if held.is_none() && power.as_deref() == Some("Off") {
            Ok(())
        } else {
            Err(format!("claim held {}, power {power:?}", held.is_some()))
        }
    })
    .await;
    // (Claim times are whole seconds.)
    assert!(
        started.elapsed() + Duration::from_secs(1) >= min_age,
        "released only after its min age"
    );
    let herd_claims = claim_leases(&client)
        .await
        .into_iter()
        .filter(|l| {
            l.annotations()
                .get("kube-node.io/node-class")
                .map(String::as_str)
                == Some("herd")
        })
        .count();
    assert_eq!(herd_claims, 3, "the breaker kept every herd claim");
    assert_eq!(powered_on(lab, HERD..HERD + 3), 3, "and every herd host on");
    cluster.shutdown().await.expect("shutdown");
    rack_off(lab, HERD..LONE + 1).await;
}
