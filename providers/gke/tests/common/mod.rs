//! An in-test fake of exactly the Google Cloud endpoints the GKE backend calls, answering
//! with the JSON shapes of the published APIs (Kubernetes Engine v1, Compute Engine v1):
//!
//! - `GET  /v1/projects/{p}/locations/{l}/clusters/{c}/nodePools/{np}` → a NodePool
//! - `GET  /compute/v1/projects/{p}/zones/{z}/instanceGroupManagers/{g}` → an InstanceGroupManager
//! - `POST .../instanceGroupManagers/{g}/resize?size=&requestId=` → an Operation
//! - `POST .../instanceGroupManagers/{g}/deleteInstances?requestId=` → an Operation
//! - `POST .../instanceGroupManagers/{g}/listManagedInstances?maxResults=&pageToken=`
//! - `GET  /compute/v1/projects/{p}/zones/{z}/operations/{op}` → an Operation
//!
//! It models: operations that are DONE only after `op_delay`; `requestId` de-duplication (a
//! repeated id returns the first operation and changes nothing); a fingerprint that changes
//! with every change of a group; group membership that follows the target size (new machines
//! are `CREATING` for `boot_delay`, then `RUNNING`; removed ones are `DELETING` for
//! `delete_delay`, then gone); short pages (at most `page_cap` machines per page); bearer
//! tokens that must be JWTs signed for the test's service account; and injected failures
//! (an HTTP error with a Google error body, an operation that finishes with an error, or
//! machine creations of a zone that fail: the machine stays `CREATING` with
//! `lastAttempt.errors`, as a group whose VM creations hit a quota or a stockout shows it).

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kube_node_crds::NodeClassSpec;
use kube_node_crds::v1alpha1::{GkeProviderSpec, ProviderSpec, ProviderType, SecretReference};
use kube_node_provider::{Credentials, ResolvedClass};
use serde_json::{Value, json};

pub const PROJECT: &str = "kube-node-test";
pub const LOCATION: &str = "europe-west1";
pub const CLUSTER: &str = "prod";
pub const POOL: &str = "pool-1";
pub const ZONES: [&str; 3] = ["europe-west1-b", "europe-west1-c", "europe-west1-d"];
pub const SERVICE_ACCOUNT: &str = include_str!("../data/service-account.json");
pub const CLIENT_EMAIL: &str = "kube-node@kube-node-test.iam.gserviceaccount.com";

/// The API method names the fake counts requests by (the same names as the backend's
/// `calls` table, so both counts can be compared).
pub mod method {
    pub const GET_NODE_POOL: &str = "container.projects.locations.clusters.nodePools.get";
    pub const GET_MIG: &str = "compute.instanceGroupManagers.get";
    pub const LIST: &str = "compute.instanceGroupManagers.listManagedInstances";
    pub const RESIZE: &str = "compute.instanceGroupManagers.resize";
    pub const DELETE: &str = "compute.instanceGroupManagers.deleteInstances";
    pub const GET_OPERATION: &str = "compute.zoneOperations.get";
}

#[derive(Clone, Debug)]
pub struct Machine {
    pub name: String,
    pub id: u64,
    created: Instant,
    deleting_since: Option<Instant>,
    /// Its creation failed with this (code, message): it stays `CREATING` with the error in
    /// `lastAttempt`, as a group that keeps retrying shows it, until it is deleted.
    pub failure: Option<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct Group {
    pub zone: String,
    pub name: String,
    pub base: String,
    pub target: u32,
    pub fingerprint: u64,
    pub machines: Vec<Machine>,
}

#[derive(Clone, Debug)]
struct Op {
    name: String,
    id: u64,
    zone: String,
    kind: String,
    target_link: String,
    done_at: Instant,
    error: Option<(String, String, u16)>,
}

/// An injected HTTP failure for the next `times` requests of `method`.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: String,
    pub http: u16,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub times: u32,
    /// Apply the request's effect, then answer with the failure (a lost response).
    pub after_effect: bool,
    pub retry_after: Option<u64>,
    pub permission: Option<String>,
}

#[derive(Debug)]
pub struct State {
    pub pool_exists: bool,
    pub autoscaling: bool,
    pub groups: Vec<Group>,
    ops: BTreeMap<String, Op>,
    request_ids: BTreeMap<String, String>,
    /// Requests by method.
    pub counts: BTreeMap<String, u64>,
    /// Mutations applied (resizes and deletions that changed a group), by method.
    pub applied: BTreeMap<String, u64>,
    /// Every requestId seen on a mutating call, in order.
    pub seen_request_ids: Vec<String>,
    /// Requests whose bearer token was missing or not a JWT of the test's service account.
    pub unauthenticated: u64,
    faults: VecDeque<Fault>,
    op_faults: VecDeque<(String, String, String)>,
    /// Per zone, the errors (code, message) the next machine creations there fail with.
    creation_faults: BTreeMap<String, VecDeque<(String, String)>>,
    pub op_delay: Duration,
    pub boot_delay: Duration,
    pub delete_delay: Duration,
    pub page_cap: usize,
    seq: u64,
    /// A manual clock: when set, time moves only by [`Fake::advance`].
    manual_now: Option<Instant>,
}

impl State {
    /// The fake's time: the manual clock when there is one, else the wall clock.
    pub fn now(&self) -> Instant {
        self.manual_now.unwrap_or_else(Instant::now)
    }

    fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Membership follows the target size: machines past their delete delay go; missing
    /// ones are created; surplus ones start deleting (still-creating ones first, then the
    /// newest), as a managed instance group does.
    fn settle(&mut self, now: Instant) {
        let delete_delay = self.delete_delay;
        let mut new_ids = Vec::new();
        for (gi, g) in self.groups.iter_mut().enumerate() {
            g.machines
                .retain(|m| m.deleting_since.is_none_or(|t| now < t + delete_delay));
            let live = g
                .machines
                .iter()
                .filter(|m| m.deleting_since.is_none())
                .count() as u32;
            if live < g.target {
                for _ in live..g.target {
                    new_ids.push(gi);
                }
            } else if live > g.target {
                let mut surplus = (live - g.target) as usize;
                let mut order: Vec<usize> = (0..g.machines.len())
                    .filter(|&i| g.machines[i].deleting_since.is_none())
                    .collect();
                order.sort_by_key(|&i| std::cmp::Reverse(g.machines[i].created));
                for i in order {
                    if surplus == 0 {
                        break;
                    }
                    g.machines[i].deleting_since = Some(now);
                    surplus -= 1;
                }
            }
        }
        for gi in new_ids {
            let n = self.next();
            let g = &mut self.groups[gi];
            let failure = self
                .creation_faults
                .get_mut(&g.zone)
                .and_then(VecDeque::pop_front);
            g.machines.push(Machine {
                name: format!("{}-{:04x}", g.base, n),
                id: 9_000_000 + n,
                created: now,
                deleting_since: None,
                failure,
            });
        }
    }

    fn take_fault(&mut self, method: &str) -> Option<Fault> {
        let front = self.faults.front_mut()?;
        if front.method != method {
            return None;
        }
        let f = front.clone();
        front.times = front.times.saturating_sub(1);
        if front.times == 0 {
            self.faults.pop_front();
        }
        Some(f)
    }

    fn new_op(&mut self, zone: &str, kind: &str, target: &str, now: Instant) -> Op {
        let n = self.next();
        let error = match self.op_faults.front() {
            Some((m, _, _)) if m == kind => self
                .op_faults
                .pop_front()
                .map(|(_, code, msg)| (code, msg, 400)),
            _ => None,
        };
        let op = Op {
            name: format!("operation-{n}-{kind}"),
            id: 7_000_000 + n,
            zone: zone.to_string(),
            kind: kind.to_string(),
            target_link: target.to_string(),
            done_at: now + self.op_delay,
            error,
        };
        self.ops.insert(op.name.clone(), op.clone());
        op
    }

    pub fn group(&self, zone: &str) -> &Group {
        self.groups
            .iter()
            .find(|g| g.zone == zone)
            .expect("a group in the zone")
    }

    pub fn total_target(&self) -> u32 {
        self.groups.iter().map(|g| g.target).sum()
    }

    pub fn count(&self, method: &str) -> u64 {
        self.counts.get(method).copied().unwrap_or(0)
    }
}

fn op_json(base: &str, op: &Op, now: Instant) -> Value {
    let done = now >= op.done_at;
    let mut v = json!({
        "kind": "compute#operation",
        "id": op.id.to_string(),
        "name": op.name,
        "zone": format!("{base}/compute/v1/projects/{PROJECT}/zones/{}", op.zone),
        "operationType": op.kind,
        "targetLink": op.target_link,
        "status": if done { "DONE" } else { "RUNNING" },
        "progress": if done { 100 } else { 0 },
        "insertTime": "2026-12-07T12:00:00.000-08:00",
        "user": CLIENT_EMAIL,
        "selfLink": format!("{base}/compute/v1/projects/{PROJECT}/zones/{}/operations/{}", op.zone, op.name),
    });
    if done && let Some((code, msg, http)) = &op.error {
        v["error"] = json!({"errors": [{"code": code, "message": msg}]});
        v["httpErrorStatusCode"] = json!(http);
        v["httpErrorMessage"] = json!("BAD REQUEST");
    }
    v
}

fn error_json(f: &Fault) -> Value {
    let mut details = vec![json!({
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": f.reason,
        "domain": "googleapis.com",
        "metadata": f.permission.as_ref().map(|p| json!({"permission": p})).unwrap_or(json!({})),
    })];
    if f.reason.is_empty() {
        details.clear();
    }
    json!({"error": {
        "code": f.http,
        "message": f.message,
        "status": f.status,
        "errors": [{"message": f.message, "domain": "global", "reason": f.reason}],
        "details": details,
    }})
}

/// The fake, serving on 127.0.0.1 on a random port until dropped.
pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    /// A pool with one group per zone of [`ZONES`], each at size 0.
    pub async fn start() -> Self {
        let groups = ZONES
            .iter()
            .enumerate()
            .map(|(i, z)| Group {
                zone: z.to_string(),
                name: format!("gke-{CLUSTER}-{POOL}-{:08x}-grp", 0xabc0 + i),
                base: format!("gke-{CLUSTER}-{POOL}-{:08x}", 0xabc0 + i),
                target: 0,
                fingerprint: 1,
                machines: Vec::new(),
            })
            .collect();
        let state = Arc::new(Mutex::new(State {
            pool_exists: true,
            autoscaling: false,
            groups,
            ops: BTreeMap::new(),
            request_ids: BTreeMap::new(),
            counts: BTreeMap::new(),
            applied: BTreeMap::new(),
            seen_request_ids: Vec::new(),
            unauthenticated: 0,
            faults: VecDeque::new(),
            op_faults: VecDeque::new(),
            creation_faults: BTreeMap::new(),
            op_delay: Duration::from_millis(150),
            boot_delay: Duration::from_millis(200),
            delete_delay: Duration::from_millis(200),
            page_cap: 2,
            seq: 0,
            manual_now: None,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(req, state, addr).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// Switches to a manual clock: operations are DONE at once, machines boot and go away
    /// one [`Fake::advance`] after they were created or deleted, and nothing changes between
    /// two advances.
    pub fn manual_clock(&self) {
        self.with(|s| {
            s.manual_now = Some(Instant::now());
            s.op_delay = Duration::ZERO;
            s.boot_delay = Duration::from_secs(1);
            s.delete_delay = Duration::from_secs(1);
        });
    }

    /// Moves the manual clock on by one second.
    pub fn advance(&self) {
        self.with(|s| {
            if let Some(t) = s.manual_now.as_mut() {
                *t += Duration::from_secs(1);
            }
        });
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut s = self.state.lock().expect("state");
        f(&mut s)
    }

    /// Fails the next `times` requests of `method` with an HTTP error and a Google error body.
    pub fn fail_next(
        &self,
        method: &str,
        http: u16,
        status: &str,
        reason: &str,
        message: &str,
        times: u32,
    ) {
        self.push_fault(Fault {
            method: method.into(),
            http,
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            times,
            after_effect: false,
            retry_after: None,
            permission: None,
        });
    }

    pub fn push_fault(&self, f: Fault) {
        self.with(|s| s.faults.push_back(f));
    }

    /// The next operation of `kind` (`resize`, `deleteInstances`) finishes with this error.
    pub fn fail_next_operation(&self, kind: &str, code: &str, message: &str) {
        self.with(|s| {
            s.op_faults
                .push_back((kind.into(), code.into(), message.into()))
        });
    }

    /// The next `times` machine creations in `zone` fail with this error code and message
    /// (`ZONE_RESOURCE_POOL_EXHAUSTED`, `QUOTA_EXCEEDED`, ...): the group keeps its target
    /// size and lists each such machine `CREATING`, without an instance status, with
    /// `lastAttempt.errors.errors[{code, message}]`, until it is deleted.
    pub fn fail_next_creations(&self, zone: &str, times: u32, code: &str, message: &str) {
        self.with(|s| {
            let q = s.creation_faults.entry(zone.to_string()).or_default();
            for _ in 0..times {
                q.push_back((code.to_string(), message.to_string()));
            }
        });
    }

    /// The machines whose creation failed: (zone, name, code).
    pub fn failed_machines(&self) -> Vec<(String, String, String)> {
        self.with(|s| {
            s.groups
                .iter()
                .flat_map(|g| {
                    g.machines.iter().filter_map(|m| {
                        m.failure
                            .as_ref()
                            .map(|(code, _)| (g.zone.clone(), m.name.clone(), code.clone()))
                    })
                })
                .collect()
        })
    }

    pub fn pending_faults(&self) -> usize {
        self.with(|s| s.faults.len() + s.op_faults.len())
    }

    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.with(|s| s.counts.clone())
    }

    pub fn reset_counts(&self) {
        self.with(|s| s.counts.clear());
    }

    /// The machines of the pool as the fake sees them now: (zone, name, deleting).
    pub fn machines(&self) -> Vec<(String, String, bool)> {
        self.with(|s| {
            let now = s.now();
            s.settle(now);
            s.groups
                .iter()
                .flat_map(|g| {
                    g.machines
                        .iter()
                        .map(|m| (g.zone.clone(), m.name.clone(), m.deleting_since.is_some()))
                })
                .collect()
        })
    }

    /// The provider ID of a machine.
    pub fn provider_id(zone: &str, name: &str) -> String {
        format!("gce://{PROJECT}/{zone}/{name}")
    }

    /// A NodeClass of type gke pointing at this fake, with the test service-account key.
    pub fn class(&self, name: &str) -> ResolvedClass {
        let spec = NodeClassSpec {
            provider: ProviderSpec {
                type_: ProviderType::Gke,
                simulated: None,
                aws: None,
                exec: None,
                baremetal: None,
                gke: Some(GkeProviderSpec {
                    project: PROJECT.into(),
                    location: LOCATION.into(),
                    cluster: CLUSTER.into(),
                    node_pool: POOL.into(),
                    container_endpoint: Some(self.url()),
                    compute_endpoint: Some(self.url()),
                }),
            },
            credentials_secret_ref: Some(SecretReference {
                namespace: "kube-node-system".into(),
                name: "gke-credentials".into(),
            }),
            labels: Default::default(),
            taints: vec![],
            capacity: Default::default(),
            allocatable: None,
            bootstrap: None,
            timeouts: None,
        };
        ResolvedClass {
            name: name.into(),
            generation: 1,
            spec,
            credentials: Some(Credentials(
                [(
                    "service-account.json".to_string(),
                    SERVICE_ACCOUNT.as_bytes().to_vec(),
                )]
                .into(),
            )),
            cluster_name: "test-cluster".into(),
            inventory: None,
            claims: None,
        }
    }
}

/// Whether the request carries a bearer JWT issued by the test's service account.
fn authenticated(req: &Request<Incoming>) -> bool {
    let Some(token) = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let Ok(claims) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return false;
    };
    let Ok(claims) = serde_json::from_slice::<Value>(&claims) else {
        return false;
    };
    !sig.is_empty() && claims["iss"] == CLIENT_EMAIL && claims["sub"] == CLIENT_EMAIL
}

fn respond(status: u16, body: Value, retry_after: Option<u64>) -> Response<Full<Bytes>> {
    let mut r = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json; charset=UTF-8");
    if let Some(s) = retry_after {
        r = r.header("retry-after", s.to_string());
    }
    r.body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn not_found(what: &str) -> Response<Full<Bytes>> {
    respond(
        404,
        json!({"error": {"code": 404, "message": format!("The resource '{what}' was not found"),
            "status": "NOT_FOUND", "errors": [{"message": format!("The resource '{what}' was not found"), "domain": "global", "reason": "notFound"}]}}),
        None,
    )
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%2F", "/")))
        .collect()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
) -> Response<Full<Bytes>> {
    let base = format!("http://{addr}");
    let path = req.uri().path().to_string();
    let q = query(&req);
    let auth_ok = authenticated(&req);
    let post = req.method() == hyper::Method::POST;
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut s = match state.lock() {
        Ok(s) => s,
        Err(_) => return respond(500, json!({}), None),
    };
    let now = s.now();
    let method = match segs.as_slice() {
        [
            "v1",
            "projects",
            _,
            "locations",
            _,
            "clusters",
            _,
            "nodePools",
            _,
        ] => method::GET_NODE_POOL,
        [
            "compute",
            "v1",
            "projects",
            _,
            "zones",
            _,
            "instanceGroupManagers",
            _,
        ] => method::GET_MIG,
        [
            "compute",
            "v1",
            "projects",
            _,
            "zones",
            _,
            "instanceGroupManagers",
            _,
            "resize",
        ] => method::RESIZE,
        [
            "compute",
            "v1",
            "projects",
            _,
            "zones",
            _,
            "instanceGroupManagers",
            _,
            "deleteInstances",
        ] => method::DELETE,
        [
            "compute",
            "v1",
            "projects",
            _,
            "zones",
            _,
            "instanceGroupManagers",
            _,
            "listManagedInstances",
        ] => method::LIST,
        ["compute", "v1", "projects", _, "zones", _, "operations", _] => method::GET_OPERATION,
        _ => return not_found(&path),
    };
    *s.counts.entry(method.to_string()).or_insert(0) += 1;
    if !auth_ok {
        s.unauthenticated += 1;
        return respond(
            401,
            json!({"error": {"code": 401, "message": "Request had invalid authentication credentials.", "status": "UNAUTHENTICATED"}}),
            None,
        );
    }
    let fault = s.take_fault(method);
    if let Some(f) = &fault
        && !f.after_effect
    {
        return respond(f.http, error_json(f), f.retry_after);
    }
    s.settle(now);
    let out = route(&mut s, method, &segs, &q, &body, post, &base, now);
    s.settle(now);
    match fault {
        Some(f) => respond(f.http, error_json(&f), f.retry_after),
        None => out,
    }
}

#[allow(clippy::too_many_arguments)]
fn route(
    s: &mut State,
    method: &str,
    segs: &[&str],
    q: &BTreeMap<String, String>,
    body: &Bytes,
    post: bool,
    base: &str,
    now: Instant,
) -> Response<Full<Bytes>> {
    match method {
        method::GET_NODE_POOL => {
            let (project, location, cluster, pool) = (segs[2], segs[4], segs[6], segs[8]);
            if !s.pool_exists
                || project != PROJECT
                || location != LOCATION
                || cluster != CLUSTER
                || pool != POOL
            {
                return respond(
                    404,
                    json!({"error": {"code": 404, "message": format!("Not found: projects/{project}/locations/{location}/clusters/{cluster}/nodePools/{pool}."), "status": "NOT_FOUND"}}),
                    None,
                );
            }
            let urls: Vec<String> = s
                .groups
                .iter()
                .map(|g| format!("https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{}/instanceGroupManagers/{}", g.zone, g.name))
                .collect();
            respond(
                200,
                json!({
                    "name": POOL,
                    "config": {"machineType": "e2-standard-4", "diskSizeGb": 100},
                    "initialNodeCount": 0,
                    "locations": ZONES,
                    "selfLink": format!("https://container.googleapis.com/v1/projects/{PROJECT}/locations/{LOCATION}/clusters/{CLUSTER}/nodePools/{POOL}"),
                    "version": "1.33.5-gke.1000000",
                    "instanceGroupUrls": urls,
                    "status": "RUNNING",
                    "autoscaling": {"enabled": s.autoscaling},
                    "management": {"autoUpgrade": true, "autoRepair": true},
                    "etag": "abc",
                }),
                None,
            )
        }
        method::GET_OPERATION => {
            let (zone, name) = (segs[5], segs[7]);
            match s.ops.get(name).filter(|o| o.zone == zone) {
                Some(op) => respond(200, op_json(base, op, now), None),
                None => not_found(&format!(
                    "projects/{PROJECT}/zones/{zone}/operations/{name}"
                )),
            }
        }
        _ => {
            let (project, zone, name) = (segs[3], segs[5], segs[7]);
            let Some(gi) = s
                .groups
                .iter()
                .position(|g| project == PROJECT && g.zone == zone && g.name == name)
            else {
                return not_found(&format!(
                    "projects/{project}/zones/{zone}/instanceGroupManagers/{name}"
                ));
            };
            let target_link = format!(
                "{base}/compute/v1/projects/{PROJECT}/zones/{zone}/instanceGroupManagers/{name}"
            );
            match method {
                method::GET_MIG => {
                    let g = &s.groups[gi];
                    respond(
                        200,
                        json!({
                            "kind": "compute#instanceGroupManager",
                            "id": (5_000_000 + gi).to_string(),
                            "name": g.name,
                            "zone": format!("{base}/compute/v1/projects/{PROJECT}/zones/{zone}"),
                            "baseInstanceName": g.base,
                            "instanceTemplate": format!("{base}/compute/v1/projects/{PROJECT}/global/instanceTemplates/{}", g.base),
                            "instanceGroup": format!("{base}/compute/v1/projects/{PROJECT}/zones/{zone}/instanceGroups/{}", g.name),
                            "targetSize": g.target,
                            "fingerprint": base64::engine::general_purpose::STANDARD.encode(g.fingerprint.to_be_bytes()),
                            "status": {"isStable": g.machines.iter().all(|m| m.deleting_since.is_none() && m.failure.is_none() && now >= m.created + s.boot_delay)},
                            "selfLink": target_link,
                        }),
                        None,
                    )
                }
                method::LIST => {
                    if !post {
                        return respond(405, json!({}), None);
                    }
                    let boot = s.boot_delay;
                    let g = &s.groups[gi];
                    let start: usize = q.get("pageToken").and_then(|t| t.parse().ok()).unwrap_or(0);
                    let max: usize = q
                        .get("maxResults")
                        .and_then(|m| m.parse().ok())
                        .unwrap_or(500);
                    let page = max.min(s.page_cap).max(1);
                    let items: Vec<Value> = g
                        .machines
                        .iter()
                        .skip(start)
                        .take(page)
                        .map(|m| {
                            let (action, status) = match (&m.deleting_since, &m.failure) {
                                (Some(_), Some(_)) => ("DELETING", None),
                                (Some(_), None) => ("DELETING", Some("STOPPING")),
                                (None, Some(_)) => ("CREATING", None),
                                (None, None) if now < m.created + boot => ("CREATING", Some("STAGING")),
                                (None, None) => ("NONE", Some("RUNNING")),
                            };
                            let mut v = json!({
                                "instance": format!("https://www.googleapis.com/compute/v1/projects/{PROJECT}/zones/{zone}/instances/{}", m.name),
                                "name": m.name,
                                "currentAction": action,
                                "version": {"instanceTemplate": format!("projects/{PROJECT}/global/instanceTemplates/{}", g.base)},
                            });
                            if let Some(status) = status {
                                // A machine whose creation failed has no VM: no status, no id.
                                v["instanceStatus"] = json!(status);
                                v["id"] = json!(m.id.to_string());
                            }
                            if let Some((code, message)) = &m.failure {
                                v["lastAttempt"] = json!({"errors": {"errors": [
                                    {"code": code, "message": message},
                                ]}});
                            }
                            v
                        })
                        .collect();
                    let mut v = json!({"managedInstances": items});
                    if start + page < g.machines.len() {
                        v["nextPageToken"] = json!((start + page).to_string());
                    }
                    respond(200, v, None)
                }
                method::RESIZE | method::DELETE => {
                    if !post {
                        return respond(405, json!({}), None);
                    }
                    let kind = if method == method::RESIZE {
                        "resize"
                    } else {
                        "deleteInstances"
                    };
                    let rid = q.get("requestId").cloned().unwrap_or_default();
                    s.seen_request_ids.push(rid.clone());
                    if !rid.is_empty()
                        && let Some(existing) = s.request_ids.get(&rid).and_then(|n| s.ops.get(n))
                    {
                        return respond(200, op_json(base, existing, now), None);
                    }
                    let failing = s.op_faults.front().is_some_and(|(k, _, _)| k == kind);
                    if !failing {
                        let g = &mut s.groups[gi];
                        if method == method::RESIZE {
                            let Some(size) = q.get("size").and_then(|v| v.parse::<u32>().ok())
                            else {
                                return respond(
                                    400,
                                    json!({"error": {"code": 400, "message": "Invalid value for field 'size'", "status": "INVALID_ARGUMENT"}}),
                                    None,
                                );
                            };
                            g.target = size;
                        } else {
                            let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                            let wanted: Vec<String> = req["instances"]
                                .as_array()
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|x| x.as_str())
                                        .filter_map(|u| {
                                            u.rsplit_once("/instances/").map(|(_, n)| n.to_string())
                                        })
                                        .collect()
                                })
                                .unwrap_or_default();
                            let skip = req["skipInstancesOnValidationError"]
                                .as_bool()
                                .unwrap_or(false);
                            let live: Vec<usize> = wanted
                                .iter()
                                .filter_map(|w| {
                                    g.machines
                                        .iter()
                                        .position(|m| &m.name == w && m.deleting_since.is_none())
                                })
                                .collect();
                            if live.len() != wanted.len() && !skip {
                                return respond(
                                    400,
                                    json!({"error": {"code": 400, "message": "Instance is not a member of the group", "status": "INVALID_ARGUMENT"}}),
                                    None,
                                );
                            }
                            for i in &live {
                                g.machines[*i].deleting_since = Some(now);
                            }
                            g.target = g.target.saturating_sub(live.len() as u32);
                        }
                        g.fingerprint += 1;
                        *s.applied.entry(method.to_string()).or_insert(0) += 1;
                    }
                    let op = s.new_op(zone, kind, &target_link, now);
                    if !rid.is_empty() {
                        s.request_ids.insert(rid, op.name.clone());
                    }
                    respond(200, op_json(base, &op, now), None)
                }
                _ => not_found(&target_link),
            }
        }
    }
}
