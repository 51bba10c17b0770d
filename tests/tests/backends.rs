//! The two real backends end to end: the real node-controller and nodeset-controller, in
//! process, against the embedded API server, with
//!
//! - the `exec` backend running the reference program `examples/exec-provider/machines.py`
//!   (its machines are JSON files in a temporary state directory), and
//! - the `aws` backend against the moto EC2 emulator (`KUBE_NODE_MOTO_ENDPOINT`, as
//!   `tests/run.sh` exports it, or a private moto started from `.venv/`).
//!
//! These machines never boot, so no kubelet would ever register. The test plays the kubelet
//! instead: as soon as a Node has its `spec.providerID`, [`Harness`] posts a `Ready=True`
//! condition on its status, the way a kubelet that joined would. The Nodes then go through
//! the whole lifecycle (unregistered taint and bootstrap token removed on Ready; cordon,
//! delete the machine and drop the finalizer on deletion), and each step asserts on the
//! backend's own state (the program's state directory, moto's instances) and on the Nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use kube_node_crds::names::{
    BOOTSTRAP_TOKEN_ANNOTATION, MACHINE_FINALIZER, MACHINE_READY_CONDITION, NODE_CLASS_ANNOTATION,
    UNREGISTERED_TAINT, tags,
};
use kube_node_crds::v1alpha1::{AwsProviderSpec, AwsRootVolume};
use kube_node_crds::{NodeClassSpec, NodeSet};
use kube_node_provider::{CreateRequest, Credentials, ProviderFactory, ResolvedClass, Sensitive};
use kube_node_provider_aws::aws_sdk_ec2;
use kube_node_provider_aws::emulator::{self, MotoNetwork, MotoServer};
use kube_node_provider_aws::{AwsFactory, CallCounter, inspect};
use kube_node_provider_exec::ExecFactory;
use serde_json::json;

/// The join endpoint the node-controller puts into user-data.
const API_SERVER_ENDPOINT: &str = "10.0.0.1:6443";
/// Where the AWS credentials Secret lives.
const SECRET_NAMESPACE: &str = "kube-node-system";
const SECRET_NAME: &str = "aws-credentials";
/// How long one step may take to converge (a step takes a few seconds; this only bounds a hang).
const STEP_TIMEOUT: Duration = Duration::from_secs(40);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A name unique to this test run, so reruns against one moto never see old instances.
fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{:x}", std::process::id(), n & 0xffff_ffff_ffff)
}

/// Polls `check` until it returns `Ok`, at most `timeout`; panics with its last complaint.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(why) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: not reached within {}s: {why}",
                    timeout.as_secs()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- the cluster: embedded API, both controllers, a kubelet stand-in ----------------------

struct Harness {
    cluster: kube_node::harness::Harness,
    client: Client,
}

impl Harness {
    /// The embedded API with the CRDs and the cluster CA, and `backend` registered; nothing
    /// running yet.
    async fn new(cluster: &str, backend: Arc<dyn ProviderFactory>) -> Self {
        let cluster = kube_node::harness::Harness::builder()
            .with_provider(backend)
            .node_config(node_controller::Config {
                cluster_name: cluster.to_string(),
                api_server_endpoint: Some(API_SERVER_ENDPOINT.to_string()),
                concurrency: 8,
                // The defaults of `kube-node run` otherwise: the orphan collector lists once
                // at start and then every 60 s, and collects nothing younger than 10 minutes.
                ..node_controller::Config::default()
            })
            // These machines never boot: the test plays their kubelet (see `start`).
            .without_kubelet()
            .controllers_stopped()
            .start()
            .await
            .expect("cluster");
        Self {
            client: cluster.client.clone(),
            cluster,
        }
    }

    /// Starts the node-controller (tagging machines with the cluster name), the
    /// nodeset-controller and the kubelet stand-in.
    fn start(&mut self) {
        self.cluster.start_controllers();
        self.cluster.spawn(kubelet(self.client.clone()));
    }

    async fn shutdown(self) {
        self.cluster.shutdown().await.expect("controllers stop");
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn nodesets(&self) -> Api<NodeSet> {
        Api::all(self.client.clone())
    }

    async fn create_node_class(&self, name: &str, spec: serde_json::Value) {
        self.cluster
            .create_node_class(name, spec)
            .await
            .expect("create NodeClass");
    }

    async fn create_node_set(&self, name: &str, class: &str) {
        self.cluster
            .create_node_set(name, class, 0)
            .await
            .expect("create NodeSet");
    }

    /// `kubectl scale nodeset NAME --replicas=N`: through the `/scale` subresource.
    async fn scale(&self, name: &str, replicas: i32) {
        self.nodesets()
            .patch_scale(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .unwrap_or_else(|e| panic!("scaling NodeSet {name} to {replicas}: {e}"));
    }

    async fn aws_credentials(&self) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.into()),
                namespace: Some(SECRET_NAMESPACE.into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (
                    "aws_access_key_id".to_string(),
                    ByteString(b"AKIAKUBENODETEST".to_vec()),
                ),
                (
                    "aws_secret_access_key".to_string(),
                    ByteString(b"kube-node-test-secret".to_vec()),
                ),
            ])),
            ..Default::default()
        };
        Api::<Secret>::namespaced(self.client.clone(), SECRET_NAMESPACE)
            .create(&PostParams::default(), &secret)
            .await
            .expect("credentials Secret");
    }

    /// Every Node, and the live (not deleting) Nodes of `nodeset`.
    async fn nodes_of(&self, nodeset: &str) -> Result<(Vec<Node>, Vec<Node>), String> {
        let all = self
            .nodes()
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing Nodes: {e}"))?
            .items;
        let live = all
            .iter()
            .filter(|n| {
                n.metadata.deletion_timestamp.is_none()
                    && n.owner_references()
                        .iter()
                        .any(|o| o.kind == "NodeSet" && o.name == nodeset)
            })
            .cloned()
            .collect();
        Ok((all, live))
    }

    /// Whether a Node went all the way to Ready on the controller's side: MachineReady=Ready,
    /// the unregistered taint gone, its bootstrap token deleted.
    async fn registered(&self, node: &Node) -> Result<(), String> {
        let name = node.name_any();
        let phase = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == MACHINE_READY_CONDITION))
            .and_then(|c| c.reason.clone());
        if phase.as_deref() != Some("Ready") {
            return Err(format!("Node {name}: MachineReady phase {phase:?}"));
        }
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|ts| ts.iter().any(|t| t.key == UNREGISTERED_TAINT));
        if tainted {
            return Err(format!("Node {name} still has the unregistered taint"));
        }
        if node.annotations().contains_key(BOOTSTRAP_TOKEN_ANNOTATION) {
            return Err(format!("Node {name} still names its bootstrap token"));
        }
        let tokens = self.token_secrets(&node.uid().unwrap_or_default()).await?;
        if tokens > 0 {
            return Err(format!(
                "Node {name}: {tokens} bootstrap token Secrets left"
            ));
        }
        Ok(())
    }

    /// The bootstrap token Secrets of one Node UID.
    async fn token_secrets(&self, uid: &str) -> Result<usize, String> {
        Api::<Secret>::namespaced(self.client.clone(), "kube-system")
            .list(&ListParams::default().labels(&format!("{}={uid}", tags::NODE_UID)))
            .await
            .map(|l| l.items.len())
            .map_err(|e| format!("listing token Secrets: {e}"))
    }

    /// A Node as a node-controller that crashed mid-launch leaves it: finalizer on, phase
    /// Launching, no providerID (and the name of its bootstrap token, when given). Its UID.
    async fn crashed_node(&self, name: &str, class: &str, token: Option<&str>) -> String {
        let mut annotations = BTreeMap::from([(NODE_CLASS_ANNOTATION, class)]);
        if let Some(t) = token {
            annotations.insert(BOOTSTRAP_TOKEN_ANNOTATION, t);
        }
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": annotations,
                "finalizers": [MACHINE_FINALIZER],
            },
        }))
        .expect("Node");
        let uid = self
            .nodes()
            .create(&PostParams::default(), &node)
            .await
            .expect("create Node")
            .uid()
            .expect("uid");
        self.nodes()
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Strategic(json!({"status": {"conditions": [{
                    "type": MACHINE_READY_CONDITION,
                    "status": "False",
                    "reason": "Launching",
                    "message": "creating the machine",
                    "lastTransitionTime": jiff::Timestamp::now().to_string(),
                }]}})),
            )
            .await
            .expect("Launching condition");
        uid
    }

    /// Every bootstrap token Secret kube-node made.
    async fn all_token_secrets(&self) -> Result<usize, String> {
        Api::<Secret>::namespaced(self.client.clone(), "kube-system")
            .list(&ListParams::default().labels(&format!(
                "{}={}",
                tags::MANAGED_BY,
                tags::MANAGED_BY_VALUE
            )))
            .await
            .map(|l| l.items.len())
            .map_err(|e| format!("listing token Secrets: {e}"))
    }
}

fn provider_id(node: &Node) -> Option<String> {
    node.spec
        .as_ref()?
        .provider_id
        .clone()
        .filter(|p| !p.is_empty())
}

fn kubelet_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The kubelet stand-in: a Node whose machine exists (its providerID is set) gets the
/// `Ready=True` condition a joined kubelet would post, by a strategic merge patch of its
/// status (conditions merge by type, so kube-node's `MachineReady` stays).
async fn kubelet(client: Client) {
    let nodes: Api<Node> = Api::all(client);
    loop {
        if let Ok(list) = nodes.list(&ListParams::default()).await {
            for n in list.items {
                if provider_id(&n).is_none()
                    || n.metadata.deletion_timestamp.is_some()
                    || kubelet_ready(&n)
                {
                    continue;
                }
                let now = jiff::Timestamp::now().to_string();
                let patch = json!({"status": {"conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "kubelet is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }]}});
                // A Node deleted meanwhile is not an error of the kubelet's.
                let _ = nodes
                    .patch_status(
                        &n.name_any(),
                        &PatchParams::default(),
                        &Patch::Strategic(patch),
                    )
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// --- exec ----------------------------------------------------------------------------------

/// The machines the reference program keeps (`<stateDir>/machines/<id>.json`).
fn exec_machines(state_dir: &Path) -> Result<Vec<serde_json::Value>, String> {
    let dir = state_dir.join("machines");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        // The program writes through a temporary file and a rename, but a file may vanish
        // between the listing and the read.
        match std::fs::read(&path) {
            Ok(bytes) => out.push(
                serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{}: not JSON: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    Ok(out)
}

/// The step's expectation for exec: exactly `replicas` Nodes, all Ready, and the program's
/// state holds exactly their machines (none of them being deleted, nothing else).
async fn exec_converged(
    h: &Harness,
    nodeset: &str,
    state_dir: &Path,
    replicas: usize,
) -> Result<(), String> {
    let (all, live) = h.nodes_of(nodeset).await?;
    if all.len() != replicas || live.len() != replicas {
        return Err(format!(
            "{} Nodes ({} live), want {replicas}",
            all.len(),
            live.len()
        ));
    }
    let machines = exec_machines(state_dir)?;
    let (deleting, alive): (Vec<_>, Vec<_>) = machines
        .iter()
        .partition(|m| !m["deleteRequestedUnix"].is_null());
    if alive.len() != replicas || !deleting.is_empty() {
        return Err(format!(
            "{} machines ({} being deleted), want {replicas}",
            machines.len(),
            deleting.len()
        ));
    }
    let by_key: BTreeMap<&str, &serde_json::Value> = alive
        .iter()
        .filter_map(|m| Some((m["idempotencyKey"].as_str()?, *m)))
        .collect();
    let uids: BTreeSet<String> = live.iter().filter_map(|n| n.uid()).collect();
    let keys: BTreeSet<String> = by_key.keys().map(|k| k.to_string()).collect();
    if keys != uids {
        return Err(format!(
            "machines' idempotency keys {keys:?} != the NodeSet's Node UIDs {uids:?}"
        ));
    }
    for n in &live {
        let m = by_key[n.uid().unwrap_or_default().as_str()];
        let pid = provider_id(n);
        if pid.as_deref() != m["providerId"].as_str() {
            return Err(format!(
                "Node {}: providerID {pid:?}, its machine's {}",
                n.name_any(),
                m["providerId"]
            ));
        }
        if m["nodeName"].as_str() != Some(n.name_any().as_str()) {
            return Err(format!("machine {} names Node {}", m["id"], m["nodeName"]));
        }
        h.registered(n).await?;
    }
    Ok(())
}

/// Issue 6: a NodeSet of an `exec` NodeClass scales 0 → 3 → 1, and the reference program's
/// state holds exactly the right machines after each step; deleting the NodeSet leaves none.
#[tokio::test]
async fn exec_nodeset_scales_0_3_1_and_the_reference_program_holds_exactly_its_machines() {
    let state = tempfile::tempdir().expect("temp dir");
    let program = repo_root().join("examples/exec-provider/machines.py");
    assert!(program.exists(), "{} is missing", program.display());
    let cluster = unique("exec-e2e");
    let (class, nodeset) = ("exec-lab", "lab");

    let mut h = Harness::new(&cluster, Arc::new(ExecFactory::new())).await;
    h.start();
    h.create_node_class(
        class,
        json!({"provider": {"type": "exec", "exec": {
            "command": ["python3", program.display().to_string()],
            "timeout": "30s",
            "maxConcurrency": 4,
            "config": {"stateDir": state.path().display().to_string()},
        }}}),
    )
    .await;
    h.create_node_set(nodeset, class).await;

    for replicas in [0, 3, 1] {
        h.scale(nodeset, replicas).await;
        eventually(
            &format!("exec: NodeSet scaled to {replicas}"),
            STEP_TIMEOUT,
            || exec_converged(&h, nodeset, state.path(), replicas as usize),
        )
        .await;
        // Every machine the program keeps is tagged for this cluster, class and NodeSet.
        for m in exec_machines(state.path()).expect("machines") {
            let t = &m["tags"];
            assert_eq!(t[tags::CLUSTER], json!(cluster), "{m}");
            assert_eq!(t[tags::NODE_CLASS], json!(class), "{m}");
            assert_eq!(t[tags::NODESET], json!(nodeset), "{m}");
            assert_eq!(t[tags::NODE_UID], m["idempotencyKey"], "{m}");
            assert_eq!(t[tags::MANAGED_BY], json!(tags::MANAGED_BY_VALUE), "{m}");
            assert!(
                m["userDataSha256"].is_string(),
                "create got a join payload: {m}"
            );
        }
    }

    h.nodesets()
        .delete(nodeset, &DeleteParams::default())
        .await
        .expect("delete NodeSet");
    eventually("exec: NodeSet deleted", STEP_TIMEOUT, || async {
        let nodes = h
            .nodes()
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items;
        let machines = exec_machines(state.path())?;
        let tokens = h.all_token_secrets().await?;
        if nodes.is_empty() && machines.is_empty() && tokens == 0 {
            Ok(())
        } else {
            Err(format!(
                "{} Nodes, {} machines, {tokens} token Secrets left",
                nodes.len(),
                machines.len()
            ))
        }
    })
    .await;
    h.shutdown().await;
}

// --- aws -----------------------------------------------------------------------------------

/// moto: `KUBE_NODE_MOTO_ENDPOINT` (tests/run.sh), else one started for this process.
fn moto() -> &'static str {
    static MOTO: OnceLock<MotoServer> = OnceLock::new();
    MOTO.get_or_init(|| {
        MotoServer::from_env_or_spawn(&repo_root()).unwrap_or_else(|e| panic!("{e}"))
    })
    .endpoint()
}

struct Aws {
    endpoint: String,
    ec2: aws_sdk_ec2::Client,
    network: MotoNetwork,
}

impl Aws {
    async fn new() -> Self {
        let endpoint = moto().to_string();
        let network = emulator::setup_network(&endpoint)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            ec2: kube_node_provider_aws::emulator_client(&endpoint, emulator::REGION),
            endpoint,
            network,
        }
    }

    fn provider_spec(&self) -> AwsProviderSpec {
        AwsProviderSpec {
            region: emulator::REGION.into(),
            instance_type: "t3.small".into(),
            alternative_instance_types: vec![],
            ami: Some(self.network.ami.clone()),
            ami_ssm_parameter: None,
            subnet_ids: self.network.subnets.clone(),
            security_group_ids: vec![self.network.security_group.clone()],
            iam_instance_profile: None,
            key_name: None,
            root_volume: Some(AwsRootVolume {
                size_gib: Some(20),
                volume_type: Some("gp3".into()),
                device_name: None,
            }),
            capacity_type: None,
            tags: BTreeMap::from([("team".to_string(), "infra".to_string())]),
            endpoint_url: Some(self.endpoint.clone()),
        }
    }

    /// The NodeClass spec: aws against moto, credentials from the Secret. Never without the
    /// Secret: the SDK's default chain would query the instance metadata service.
    fn class_spec(&self) -> serde_json::Value {
        json!({
            "provider": {"type": "aws", "aws": self.provider_spec()},
            "credentialsSecretRef": {"namespace": SECRET_NAMESPACE, "name": SECRET_NAME},
        })
    }

    async fn running(&self, cluster: &str) -> Result<Vec<aws_sdk_ec2::types::Instance>, String> {
        inspect::running_instances(&self.ec2, cluster)
            .await
            .map_err(|e| format!("DescribeInstances: {e}"))
    }
}

/// `aws:///<zone>/<instance-id>`.
impl Aws {
    /// RunInstances for Node `node_name` (UID `uid`) as kube-node makes it (keyed by the UID,
    /// tagged), outside the controllers: what a node-controller did before it crashed.
    async fn launch_as_kube_node(
        &self,
        cluster: &str,
        class: &str,
        node_name: &str,
        uid: &str,
        user_data: Sensitive,
    ) -> Result<kube_node_provider::Instance, kube_node_provider::ProviderError> {
        let spec: NodeClassSpec = serde_json::from_value(self.class_spec()).expect("spec");
        let provider = AwsFactory::new()
            .build_aws(&ResolvedClass {
                name: class.into(),
                generation: 1,
                spec,
                credentials: Some(Credentials(BTreeMap::from([
                    (
                        "aws_access_key_id".to_string(),
                        b"AKIAKUBENODETEST".to_vec(),
                    ),
                    (
                        "aws_secret_access_key".to_string(),
                        b"kube-node-test-secret".to_vec(),
                    ),
                ]))),
                cluster_name: cluster.to_string(),
                inventory: None,
                claims: None,
            })
            .expect("provider");
        kube_node_provider::Provider::create(
            &provider,
            &CreateRequest {
                idempotency_key: uid.to_string(),
                node_name: node_name.into(),
                tags: BTreeMap::from([
                    (tags::CLUSTER.to_string(), cluster.to_string()),
                    (tags::NODE_NAME.to_string(), node_name.to_string()),
                    (tags::NODE_UID.to_string(), uid.to_string()),
                    (tags::NODE_CLASS.to_string(), class.to_string()),
                    (
                        tags::MANAGED_BY.to_string(),
                        tags::MANAGED_BY_VALUE.to_string(),
                    ),
                ]),
                user_data: Some(user_data),
            },
        )
        .await
    }
}

fn aws_provider_id(i: &aws_sdk_ec2::types::Instance) -> String {
    let zone = i
        .placement()
        .and_then(|p| p.availability_zone())
        .unwrap_or_default();
    format!("aws:///{zone}/{}", i.instance_id().unwrap_or_default())
}

/// The step's expectation for aws: exactly `replicas` Nodes, all Ready, and moto runs exactly
/// their instances, one per Node UID, each the one its Node's providerID names.
async fn aws_converged(
    h: &Harness,
    aws: &Aws,
    cluster: &str,
    nodeset: &str,
    replicas: usize,
) -> Result<(), String> {
    let (all, live) = h.nodes_of(nodeset).await?;
    if all.len() != replicas || live.len() != replicas {
        return Err(format!(
            "{} Nodes ({} live), want {replicas}",
            all.len(),
            live.len()
        ));
    }
    let running = aws.running(cluster).await?;
    if running.len() != replicas {
        return Err(format!(
            "{} running instances, want {replicas}",
            running.len()
        ));
    }
    let mut by_uid = BTreeMap::new();
    for i in &running {
        let uid = inspect::tags_of(i)
            .get(tags::NODE_UID)
            .cloned()
            .unwrap_or_default();
        if by_uid.insert(uid.clone(), i).is_some() {
            return Err(format!("two running instances for Node UID {uid:?}"));
        }
    }
    for n in &live {
        let uid = n.uid().unwrap_or_default();
        let Some(i) = by_uid.get(&uid) else {
            return Err(format!("no running instance for Node {}", n.name_any()));
        };
        if provider_id(n) != Some(aws_provider_id(i)) {
            return Err(format!(
                "Node {}: providerID {:?}, its instance {}",
                n.name_any(),
                provider_id(n),
                aws_provider_id(i)
            ));
        }
        h.registered(n).await?;
    }
    Ok(())
}

/// What every running instance of a converged step must carry: the tags at launch on it and
/// its volumes, and a cloud-init join payload naming its Node.
async fn assert_instances_describe_their_nodes(
    h: &Harness,
    aws: &Aws,
    cluster: &str,
    class: &str,
    nodeset: &str,
) {
    let (_, live) = h.nodes_of(nodeset).await.expect("nodes");
    let running = aws.running(cluster).await.expect("instances");
    for i in &running {
        let id = i.instance_id().unwrap_or_default();
        let t = inspect::tags_of(i);
        let node = live
            .iter()
            .find(|n| n.uid().as_ref() == t.get(tags::NODE_UID))
            .unwrap_or_else(|| panic!("instance {id} serves no live Node: {t:?}"));
        let name = node.name_any();
        let uid = node.uid().unwrap_or_default();
        for (k, v) in [
            (tags::CLUSTER, cluster),
            (tags::NODE_NAME, name.as_str()),
            (tags::NODE_UID, uid.as_str()),
            (tags::NODESET, nodeset),
            (tags::NODE_CLASS, class),
            (tags::MANAGED_BY, tags::MANAGED_BY_VALUE),
            ("team", "infra"),
        ] {
            assert_eq!(
                t.get(k).map(String::as_str),
                Some(v),
                "instance {id} tag {k}: {t:?}"
            );
        }

        let volumes = inspect::volume_tags(&aws.ec2, id)
            .await
            .expect("DescribeVolumes");
        assert!(!volumes.is_empty(), "instance {id} has a root volume");
        for (vol, vt) in &volumes {
            for k in [
                tags::CLUSTER,
                tags::NODE_NAME,
                tags::NODE_UID,
                tags::NODESET,
                tags::MANAGED_BY,
            ] {
                assert_eq!(vt.get(k), t.get(k), "volume {vol} of {id}, tag {k}: {vt:?}");
            }
        }

        let user_data = inspect::user_data(&aws.ec2, id)
            .await
            .expect("DescribeInstanceAttribute")
            .unwrap_or_else(|| panic!("instance {id} has no user-data"));
        assert_join_payload(&user_data, &name);
    }
}

/// A cloud-init document that runs `kubeadm join` with a JoinConfiguration registering the
/// machine as `node`, against the configured endpoint.
fn assert_join_payload(user_data: &str, node: &str) {
    let body = user_data
        .strip_prefix("#cloud-config\n")
        .unwrap_or_else(|| panic!("user-data is not a cloud-config document:\n{user_data}"));
    let doc: serde_yaml::Value = serde_yaml::from_str(body).expect("cloud-config is YAML");
    let runcmd: Vec<String> = doc["runcmd"]
        .as_sequence()
        .expect("runcmd")
        .iter()
        .map(|c| match c {
            serde_yaml::Value::Sequence(args) => args
                .iter()
                .filter_map(|a| a.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            other => other.as_str().unwrap_or_default().to_string(),
        })
        .collect();
    assert!(
        runcmd.iter().any(|c| c.starts_with("kubeadm join")),
        "runcmd runs kubeadm join: {runcmd:?}"
    );
    let join = doc["write_files"]
        .as_sequence()
        .expect("write_files")
        .iter()
        .filter_map(|f| f["content"].as_str())
        .filter_map(|c| serde_yaml::from_str::<serde_yaml::Value>(c).ok())
        .find(|c| c["kind"].as_str() == Some("JoinConfiguration"))
        .expect("a kubeadm JoinConfiguration among write_files");
    assert_eq!(
        join["nodeRegistration"]["name"].as_str(),
        Some(node),
        "nodeRegistration.name: {join:?}"
    );
    assert_eq!(
        join["discovery"]["bootstrapToken"]["apiServerEndpoint"].as_str(),
        Some(API_SERVER_ENDPOINT),
        "{join:?}"
    );
}

/// Issue 4: a NodeSet of an `aws` NodeClass scales 0 → 5 → 2 → 0 against moto, which holds
/// exactly the expected running instances after each step (tags, volume tags, user-data), and
/// none at the end. Also prints and bounds the EC2 calls per node lifecycle.
#[tokio::test]
async fn aws_nodeset_scales_0_5_2_0_and_moto_runs_exactly_its_instances() {
    let aws = Aws::new().await;
    let cluster = unique("aws-e2e");
    let (class, nodeset) = ("general", "workers");
    let counter = CallCounter::new();

    let mut h = Harness::new(
        &cluster,
        Arc::new(AwsFactory::new().with_call_counter(counter.clone())),
    )
    .await;
    h.aws_credentials().await;
    h.start();
    h.create_node_class(class, aws.class_spec()).await;
    h.create_node_set(nodeset, class).await;

    let mut lifecycles = 0;
    let mut previous = 0;
    for replicas in [0usize, 5, 2, 0] {
        h.scale(nodeset, replicas as i32).await;
        lifecycles += replicas.saturating_sub(previous);
        previous = replicas;
        eventually(
            &format!("aws: NodeSet scaled to {replicas}"),
            STEP_TIMEOUT,
            || aws_converged(&h, &aws, &cluster, nodeset, replicas),
        )
        .await;
        assert_instances_describe_their_nodes(&h, &aws, &cluster, class, nodeset).await;
    }
    assert!(
        aws.running(&cluster).await.expect("instances").is_empty(),
        "no instance runs at the end"
    );
    eventually("aws: bootstrap tokens deleted", STEP_TIMEOUT, || async {
        match h.all_token_secrets().await? {
            0 => Ok(()),
            n => Err(format!("{n} token Secrets left")),
        }
    })
    .await;
    h.shutdown().await;

    // EC2 calls per node lifecycle (create → Ready → delete), everything the controllers did.
    let calls = counter.snapshot();
    let total = counter.total();
    let per_node = total as f64 / lifecycles as f64;
    println!(
        "aws e2e: {lifecycles} node lifecycles (NodeSet 0 → 5 → 2 → 0), {total} EC2 calls, \
         {per_node:.1} per node: {calls:?}"
    );
    assert_eq!(lifecycles, 5);
    // Exactly one launch and one termination per Node: no retry storm, no duplicate.
    assert_eq!(counter.get("RunInstances"), 5, "{calls:?}");
    assert_eq!(counter.get("TerminateInstances"), 5, "{calls:?}");
    // The bound, per node lifecycle. The node-controller asks for a Node's machine with one
    // get on every pass while the Node is not Ready yet (the providerID write, the Launching
    // and Registering conditions, labels/taints, the kubelet's Ready: at most 6 passes) and
    // on every pass while it is being deleted (deletion, cordon, Deleting condition, the pass
    // after TerminateInstances, the one that confirms it is gone: at most 5), plus create's
    // idempotency lookup by node UID. Once Ready, a Node is checked against the orphan
    // collector's listing (at most 2 in this test), never with a get. The AWS provider
    // batches those lookups across Nodes: the gets (and the UID lookups) arriving within
    // 25 ms, or while the previous DescribeInstances is in flight, share one call. The Nodes
    // of a NodeSet step through these passes together, so a wave costs one DescribeInstances
    // whatever its size. Measured: 11-12 DescribeInstances, 24-25 EC2 calls in all (4.8-5.0
    // per node lifecycle); with one DescribeInstances per get it was 30 and 43 (8.6 per node).
    // Bound: at most 4 DescribeInstances per node lifecycle (20 here, room for waves split
    // by a slow machine); a call per Node per poll (30 here) or a retry storm breaks it.
    let describes = counter.get("DescribeInstances");
    assert!(
        describes <= 4 * lifecycles as u64,
        "DescribeInstances: {describes} for {lifecycles} node lifecycles: {calls:?}"
    );
    // In all: that, one RunInstances and one TerminateInstances per node, and validating the
    // NodeClass once (DescribeImages, DescribeSubnets, DescribeSecurityGroups).
    assert!(
        total <= 6 * lifecycles as u64 + 3,
        "EC2 calls: {total} for {lifecycles} node lifecycles: {calls:?}"
    );
    for op in [
        "DescribeImages",
        "DescribeSubnets",
        "DescribeSecurityGroups",
    ] {
        assert!(
            counter.get(op) <= 1,
            "{op} once per NodeClass generation: {calls:?}"
        );
    }
}

/// Issue 4: the node-controller crashed between RunInstances and the providerID write. The
/// restarted controllers find that instance by the Node's UID: moto still holds exactly one
/// instance for the Node, and its providerID is that instance's.
#[tokio::test]
async fn aws_restart_between_run_instances_and_provider_id_write_launches_no_second_instance() {
    let aws = Aws::new().await;
    let cluster = unique("aws-restart");
    let class = "general";
    let node_name = "worker-restarted";

    // The controllers start only after the crashed controller's leftovers are in place.
    let counter = CallCounter::new();
    let mut h = Harness::new(
        &cluster,
        Arc::new(AwsFactory::new().with_call_counter(counter.clone())),
    )
    .await;
    h.aws_credentials().await;
    h.create_node_class(class, aws.class_spec()).await;
    // The Node as the crashed controller left it: finalizer on, phase Launching, no providerID.
    let uid = h.crashed_node(node_name, class, None).await;
    // What the crashed controller did: RunInstances for the Node, keyed by its UID.
    let launched = aws
        .launch_as_kube_node(
            &cluster,
            class,
            node_name,
            &uid,
            Sensitive(format!(
                "#cloud-config\nruncmd:\n  - [kubeadm, join, --node-name, {node_name}]\n"
            )),
        )
        .await
        .expect("RunInstances before the crash");
    assert_eq!(aws.running(&cluster).await.expect("instances").len(), 1);

    // The restart.
    h.start();
    let pid = eventually("the Node gets its providerID", STEP_TIMEOUT, || async {
        let n = h.nodes().get(node_name).await.map_err(|e| e.to_string())?;
        provider_id(&n).ok_or_else(|| "no providerID yet".to_string())
    })
    .await;
    assert_eq!(
        pid, launched.provider_id,
        "the Node adopted the instance launched before the crash"
    );
    // Let the Node go Ready (a later pass would be the one to launch a duplicate), then check.
    eventually("the Node is Ready", STEP_TIMEOUT, || async {
        let n = h.nodes().get(node_name).await.map_err(|e| e.to_string())?;
        h.registered(&n).await
    })
    .await;
    let running = aws.running(&cluster).await.expect("instances");
    assert_eq!(
        running.iter().map(aws_provider_id).collect::<Vec<_>>(),
        vec![launched.provider_id.clone()],
        "exactly one instance for the Node"
    );
    assert_eq!(
        counter.get("RunInstances"),
        0,
        "the restarted controller launched nothing: {:?}",
        counter.snapshot()
    );

    // Clean up through the controllers: deleting the Node terminates its instance.
    h.nodes()
        .delete(node_name, &DeleteParams::default())
        .await
        .expect("delete Node");
    eventually(
        "the Node and its instance are gone",
        STEP_TIMEOUT,
        || async {
            let left = h
                .nodes()
                .get_opt(node_name)
                .await
                .map_err(|e| e.to_string())?;
            let running = aws.running(&cluster).await?;
            if left.is_none() && running.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "Node present: {}, {} instances running",
                    left.is_some(),
                    running.len()
                ))
            }
        },
    )
    .await;
    h.shutdown().await;
}

/// The `<id>.<secret>` token of the kubeadm JoinConfiguration in a machine's user-data.
fn join_token(user_data: &str) -> String {
    let body = user_data
        .strip_prefix("#cloud-config\n")
        .unwrap_or_else(|| panic!("user-data is not a cloud-config document"));
    let doc: serde_yaml::Value = serde_yaml::from_str(body).expect("cloud-config is YAML");
    doc["write_files"]
        .as_sequence()
        .expect("write_files")
        .iter()
        .filter_map(|f| f["content"].as_str())
        .filter_map(|c| serde_yaml::from_str::<serde_yaml::Value>(c).ok())
        .find(|c| c["kind"].as_str() == Some("JoinConfiguration"))
        .and_then(|c| {
            c["discovery"]["bootstrapToken"]["token"]
                .as_str()
                .map(str::to_string)
        })
        .expect("a JoinConfiguration with a bootstrap token")
}

/// The `<id>.<secret>` token of the bootstrap token Secrets of one Node UID.
async fn secret_tokens(client: &Client, uid: &str) -> Result<Vec<String>, String> {
    let list = Api::<Secret>::namespaced(client.clone(), "kube-system")
        .list(&ListParams::default().labels(&format!("{}={uid}", tags::NODE_UID)))
        .await
        .map_err(|e| format!("listing token Secrets: {e}"))?;
    Ok(list
        .items
        .iter()
        .filter_map(|s| {
            let data = s.data.as_ref()?;
            let part = |k: &str| String::from_utf8(data.get(k)?.0.clone()).ok();
            Some(format!("{}.{}", part("token-id")?, part("token-secret")?))
        })
        .collect())
}

/// A machine is launched before its bootstrap token's Secret is made, and the Secret holds the
/// token of the instance's user-data in moto. If the node-controller stops in between (the
/// crashed controller is played here: RunInstances for a Node that records its token's name,
/// with the token derived from the installation's key), the successor makes the Secret of the
/// very token the instance holds, so the machine can still join, and launches nothing new.
#[tokio::test]
async fn aws_restart_between_run_instances_and_the_token_secret_makes_the_token_the_machine_holds()
{
    let aws = Aws::new().await;
    let cluster = unique("aws-token");
    let class = "general";
    let counter = CallCounter::new();
    let mut h = Harness::new(
        &cluster,
        Arc::new(AwsFactory::new().with_call_counter(counter.clone())),
    )
    .await;
    h.aws_credentials().await;
    h.create_node_class(class, aws.class_spec()).await;
    // No kubelet: the machines never join, so their tokens stay.
    h.cluster.start_controllers();

    // 1. The normal order: launch, then the token's Secret, which is the token launched with.
    let first: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "worker-first", "annotations": {NODE_CLASS_ANNOTATION: class}},
    }))
    .expect("Node");
    let first_uid = h
        .nodes()
        .create(&PostParams::default(), &first)
        .await
        .expect("create Node")
        .uid()
        .expect("uid");
    let (first_pid, made) = eventually("launched, its token made", STEP_TIMEOUT, || async {
        let n = h
            .nodes()
            .get("worker-first")
            .await
            .map_err(|e| e.to_string())?;
        let pid = provider_id(&n).ok_or("no providerID yet")?;
        let tokens = secret_tokens(&h.client, &first_uid).await?;
        (tokens.len() == 1)
            .then(|| (pid, tokens[0].clone()))
            .ok_or_else(|| format!("token Secrets: {}", tokens.len()))
    })
    .await;
    let instance_id = first_pid.rsplit('/').next().unwrap_or_default().to_string();
    let user_data = inspect::user_data(&aws.ec2, &instance_id)
        .await
        .expect("DescribeInstanceAttribute")
        .expect("user-data");
    assert_eq!(
        made,
        join_token(&user_data),
        "the Secret is the token the machine holds"
    );

    // 2. The crash: a Node the controller had launched a machine for, then stopped before the
    // token's Secret and the providerID write.
    h.cluster
        .stop_controllers()
        .await
        .expect("controllers stop");
    let key = Api::<Secret>::namespaced(h.client.clone(), SECRET_NAMESPACE)
        .get(node_controller::bootstrap::TOKEN_KEY_SECRET)
        .await
        .expect("the installation's token key, made on first use");
    let key = node_controller::bootstrap::TokenKey::from_secret(&key).expect("a 32-byte key");
    let node_name = "worker-crashed";
    let uid = h
        .crashed_node(node_name, class, Some("bootstrap-token-crash1"))
        .await;
    let token = node_controller::bootstrap::BootstrapToken::derive(&key, "crash1", &uid)
        .expect("a valid id");
    let user_data =
        node_controller::bootstrap::render_user_data(&node_controller::bootstrap::JoinParams {
            node_name,
            api_server_endpoint: API_SERVER_ENDPOINT,
            token: &token,
            ca_cert_hashes: &["sha256:00".to_string()],
        })
        .expect("user-data");
    let held = join_token(&user_data.0);
    let launched = aws
        .launch_as_kube_node(&cluster, class, node_name, &uid, user_data)
        .await
        .expect("RunInstances before the crash");
    let runs = counter.get("RunInstances");

    // The restart.
    h.cluster.start_controllers();
    let remade = eventually(
        "the successor's token and providerID",
        STEP_TIMEOUT,
        || async {
            let n = h.nodes().get(node_name).await.map_err(|e| e.to_string())?;
            let again = provider_id(&n).ok_or("no providerID yet")?;
            let tokens = secret_tokens(&h.client, &uid).await?;
            (tokens.len() == 1)
                .then(|| (again, tokens[0].clone()))
                .ok_or_else(|| format!("token Secrets: {}", tokens.len()))
        },
    )
    .await;
    assert_eq!(
        remade.0, launched.provider_id,
        "the instance launched before the crash"
    );
    assert_eq!(
        remade.1, held,
        "the successor's Secret is the token the machine holds"
    );
    assert_eq!(aws.running(&cluster).await.expect("instances").len(), 2);
    assert_eq!(
        counter.get("RunInstances"),
        runs,
        "nothing launched after the restart: {:?}",
        counter.snapshot()
    );

    for n in ["worker-first", node_name] {
        h.nodes()
            .delete(n, &DeleteParams::default())
            .await
            .expect("delete Node");
    }
    eventually(
        "the Nodes, instances and tokens gone",
        STEP_TIMEOUT,
        || async {
            let left = h
                .nodes()
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            let running = aws.running(&cluster).await?.len();
            let tokens = h.all_token_secrets().await?;
            (left == 0 && running == 0 && tokens == 0)
                .then_some(())
                .ok_or_else(|| format!("{left} Nodes, {running} instances, {tokens} tokens"))
        },
    )
    .await;
    h.shutdown().await;
}
