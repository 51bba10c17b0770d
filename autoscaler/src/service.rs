//! The `CloudProvider` gRPC service: every RPC reads or writes NodeSets (and reads Nodes and
//! NodeClasses); nothing here talks to a cloud.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use kube_node_crds::names::NODE_CLASS_ANNOTATION;
use kube_node_crds::v1alpha1::{NodeClass, NodeSet};
use nodeset_controller::conflict::{RetryError, retry_on_conflict};
use nodeset_controller::observe::nodeset_owner;
use prost::Message;
use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::proto::cloud_provider_server::CloudProvider;
use crate::proto::*;
use crate::{instances, options, template};

/// What `Refresh` read, so `NodeGroupForNode` (called for every Node in every
/// cluster-autoscaler loop) costs no request. Writes always read fresh objects.
#[derive(Default)]
struct Snapshot {
    nodes: HashMap<String, Node>,
    by_provider_id: HashMap<String, String>,
    nodesets: HashMap<String, NodeSet>,
}

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct NodeSetCloudProvider {
    client: Client,
    snapshot: Arc<RwLock<Option<Snapshot>>>,
}

impl NodeSetCloudProvider {
    /// A service acting through `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            snapshot: Arc::new(RwLock::new(None)),
        }
    }

    fn nodesets(&self) -> Api<NodeSet> {
        Api::all(self.client.clone())
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    fn with_snapshot<T>(&self, f: impl FnOnce(&Snapshot) -> Option<T>) -> Option<T> {
        let guard = self
            .snapshot
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.as_ref().and_then(f)
    }

    /// The NodeSet behind a node group id, read fresh; NotFound unless it opts in.
    async fn group(&self, id: &str) -> Result<NodeSet, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument("node group id is empty"));
        }
        match self.nodesets().get_opt(id).await.map_err(kube_status)? {
            Some(ns) if ns.spec.autoscaling_enabled() => Ok(ns),
            Some(_) => Err(Status::not_found(format!(
                "NodeSet {id} is not a node group: set spec.minSize and spec.maxSize"
            ))),
            None => Err(Status::not_found(format!("node group {id} not found"))),
        }
    }

    /// The Nodes a NodeSet's selector matches (the NodeSet's own are among them).
    async fn group_nodes(&self, ns: &NodeSet) -> Result<Vec<Node>, Status> {
        let selector = ns.spec.selector.to_selector_string();
        if selector.is_empty() {
            return Ok(Vec::new());
        }
        let list = self
            .nodes()
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(kube_status)?;
        Ok(list.items)
    }

    async fn node_by_name(&self, name: &str) -> Result<Option<Node>, Status> {
        if let Some(n) = self.with_snapshot(|s| s.nodes.get(name).cloned()) {
            return Ok(Some(n));
        }
        self.nodes().get_opt(name).await.map_err(kube_status)
    }

    async fn name_for_provider_id(&self, provider_id: &str) -> Result<Option<String>, Status> {
        if provider_id.is_empty() {
            return Ok(None);
        }
        if let Some(n) = self.with_snapshot(|s| s.by_provider_id.get(provider_id).cloned()) {
            return Ok(Some(n));
        }
        if let Some(name) = provider_id.strip_prefix(instances::PENDING_ID_PREFIX) {
            return Ok(Some(name.to_string()));
        }
        let list = self
            .nodes()
            .list(&ListParams::default())
            .await
            .map_err(kube_status)?;
        Ok(list
            .items
            .into_iter()
            .find(|n| n.spec.as_ref().and_then(|s| s.provider_id.as_deref()) == Some(provider_id))
            .map(|n| n.name_any()))
    }

    /// The Node name of an `ExternalGrpcNode` (CA sends name and providerID).
    async fn node_name(&self, node: &ExternalGrpcNode) -> Result<Option<String>, Status> {
        if !node.name.is_empty() {
            return Ok(Some(node.name.clone()));
        }
        self.name_for_provider_id(&node.provider_id).await
    }

    async fn nodeset_cached(&self, name: &str) -> Result<Option<NodeSet>, Status> {
        if let Some(ns) = self.with_snapshot(|s| s.nodesets.get(name).cloned()) {
            return Ok(Some(ns));
        }
        self.nodesets().get_opt(name).await.map_err(kube_status)
    }
}

/// The most a NodeSet can reach now: `maxSize`, and for a class with a fixed pool (bare-metal
/// hosts) no more than its current Nodes plus the free machines, so cluster-autoscaler never
/// asks for servers that do not exist and tries another group at once.
pub fn effective_max_size(ns: &NodeSet) -> i32 {
    let max = ns.spec.max_size.unwrap_or(0);
    match ns.status.as_ref().and_then(|s| s.free_machines) {
        Some(free) => {
            let current = ns
                .status
                .as_ref()
                .map_or(0, |s| s.replicas)
                .max(ns.spec.replicas);
            max.min(current.saturating_add(free.max(0)))
        }
        None => max,
    }
}

fn node_group(ns: &NodeSet) -> NodeGroup {
    let name = ns.name_any();
    let min = ns.spec.min_size.unwrap_or(0);
    let max = effective_max_size(ns);
    NodeGroup {
        debug: format!(
            "NodeSet {name}: replicas={} min={min} max={max} nodeClass={}",
            ns.spec.replicas,
            ns.spec.template.spec.node_classes().join(",")
        ),
        id: name,
        min_size: min,
        max_size: max,
    }
}

/// Maps a Kubernetes API error onto the gRPC code cluster-autoscaler should see: it retries
/// every failed call in its next loop, so conflicts and overload are only "try again".
/// Lists every object of a kind and decodes each one alone: an object the types cannot hold
/// (kept from an older, looser schema) is skipped, never failing the whole answer to the
/// autoscaler; the controllers report it on the object itself.
async fn list_valid<K>(
    client: &Client,
    decode: fn(serde_json::Value) -> Result<K, kube_node_crds::InvalidSpec>,
) -> Result<Vec<K>, kube::Error>
where
    K: kube::Resource<DynamicType = ()>,
{
    let ar = kube::api::ApiResource::erase::<K>(&());
    let list = Api::<kube::api::DynamicObject>::all_with(client.clone(), &ar)
        .list(&ListParams::default())
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|mut o| {
            o.types.get_or_insert_with(|| kube::api::TypeMeta {
                api_version: ar.api_version.clone(),
                kind: ar.kind.clone(),
            });
            let name = o.name_any();
            match serde_json::to_value(&o)
                .map_err(|e| kube_node_crds::InvalidSpec::one("spec", e.to_string()))
                .and_then(decode)
            {
                Ok(k) => Some(k),
                Err(e) => {
                    warn!(kind = %ar.kind, name = %name, error = %e, "skipped an invalid object");
                    None
                }
            }
        })
        .collect())
}

pub(crate) fn kube_status(e: kube::Error) -> Status {
    match &e {
        kube::Error::Api(s) => match s.code {
            404 => Status::not_found(s.message.clone()),
            409 => Status::aborted(s.message.clone()),
            400 | 422 => Status::invalid_argument(s.message.clone()),
            401 | 403 => Status::permission_denied(s.message.clone()),
            429 => Status::resource_exhausted(s.message.clone()),
            _ => Status::unavailable(s.message.clone()),
        },
        _ => Status::unavailable(e.to_string()),
    }
}

fn removal_status(e: nodeset_controller::Error) -> Status {
    use nodeset_controller::Error as E;
    match e {
        E::Kube(k) => kube_status(k),
        E::NotChildren { .. } => Status::invalid_argument(e.to_string()),
        E::BelowMinSize { .. } => Status::failed_precondition(e.to_string()),
        E::Conflict { .. } => Status::aborted(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// A scale of `spec.replicas` to `to`, guarded by the resourceVersion of the NodeSet `ns` it
/// was computed from: a concurrent change makes it fail with a conflict instead of being
/// overwritten (and the caller recomputes from a fresh read).
async fn scale(api: &Api<NodeSet>, ns: &NodeSet, to: i32) -> Result<(), kube::Error> {
    let mut patch = serde_json::json!({ "spec": { "replicas": to } });
    if let Some(rv) = &ns.metadata.resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    api.patch_scale(
        &ns.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// What one attempt of a guarded NodeSet write ended with.
enum WriteError {
    /// The resourceVersion moved between the read and the write: read again and retry.
    Conflict(kube::Error),
    /// Anything else, already the status cluster-autoscaler gets.
    Status(Status),
}

impl From<Status> for WriteError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

impl From<kube::Error> for WriteError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.is_conflict() => Self::Conflict(e),
            _ => Self::Status(kube_status(e)),
        }
    }
}

/// cluster-autoscaler's externalgrpc client gives every call a deadline, 5 s unless its
/// cloud-config sets `grpc_timeout` (`externalgrpc_cloud_provider.go`: a fixed `grpcTimeout`
/// in 1.28, `defaultGRPCTimeout` in 1.31), and sends it as `grpc-timeout`; a client that sends
/// none gets this.
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a write keeps retrying, whatever the client's deadline.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Kept free at the end of a call for the answer to reach the client.
const CALL_MARGIN: Duration = Duration::from_millis(500);

/// Parses a `grpc-timeout` header value (`1-8 digits` then `H M S m u n`).
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Until when a write may retry conflicts: the client's deadline ([`DEFAULT_CALL_TIMEOUT`]
/// without one, at most [`MAX_CALL_TIMEOUT`]) less [`CALL_MARGIN`].
pub(crate) fn call_deadline(metadata: &tonic::metadata::MetadataMap) -> Instant {
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(DEFAULT_CALL_TIMEOUT, |t| t.min(MAX_CALL_TIMEOUT));
    Instant::now() + timeout.saturating_sub(CALL_MARGIN)
}

/// Runs a guarded read-compute-write `attempt` until it does not conflict or `deadline`.
async fn retry_write<T, F, Fut>(id: &str, deadline: Instant, attempt: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, WriteError>>,
{
    let is_conflict = |e: &WriteError| matches!(e, WriteError::Conflict(_));
    match retry_on_conflict(deadline, is_conflict, attempt).await {
        Ok(v) => Ok(v),
        Err(RetryError::Failed(WriteError::Status(s))) => Err(s),
        Err(RetryError::Failed(WriteError::Conflict(e))) => Err(kube_status(e)),
        Err(RetryError::GaveUp { attempts, last }) => {
            let detail = match last {
                WriteError::Conflict(e) => e.to_string(),
                WriteError::Status(s) => s.message().to_string(),
            };
            warn!(nodeset = %id, attempts, "gave up on conflicting NodeSet writes");
            Err(Status::aborted(format!(
                "NodeSet {id} kept changing: {attempts} conflicting writes before the deadline \
                 (last: {detail})"
            )))
        }
    }
}

#[tonic::async_trait]
impl CloudProvider for NodeSetCloudProvider {
    async fn node_groups(
        &self,
        _: Request<NodeGroupsRequest>,
    ) -> Result<Response<NodeGroupsResponse>, Status> {
        let list = list_valid(&self.client, NodeSet::decode_and_validate)
            .await
            .map_err(kube_status)?;
        let mut node_groups: Vec<NodeGroup> = list
            .iter()
            .filter(|ns| ns.spec.autoscaling_enabled())
            .map(node_group)
            .collect();
        node_groups.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(NodeGroupsResponse { node_groups }))
    }

    async fn node_group_for_node(
        &self,
        request: Request<NodeGroupForNodeRequest>,
    ) -> Result<Response<NodeGroupForNodeResponse>, Status> {
        // An empty id tells CA the Node is not ours, which it requires for foreign Nodes.
        let none = || {
            Ok(Response::new(NodeGroupForNodeResponse {
                node_group: Some(NodeGroup::default()),
            }))
        };
        let Some(req_node) = request.into_inner().node else {
            return Err(Status::invalid_argument("node is missing"));
        };
        let Some(name) = self.node_name(&req_node).await? else {
            return none();
        };
        let Some(node) = self.node_by_name(&name).await? else {
            return none();
        };
        let Some((owner, uid)) = nodeset_owner(&node) else {
            return none();
        };
        match self.nodeset_cached(owner).await? {
            Some(ns)
                if ns.metadata.uid.as_deref() == Some(uid) && ns.spec.autoscaling_enabled() =>
            {
                Ok(Response::new(NodeGroupForNodeResponse {
                    node_group: Some(node_group(&ns)),
                }))
            }
            _ => none(),
        }
    }

    async fn pricing_node_price(
        &self,
        _: Request<PricingNodePriceRequest>,
    ) -> Result<Response<PricingNodePriceResponse>, Status> {
        Err(Status::unimplemented("kube-node has no pricing"))
    }

    async fn pricing_pod_price(
        &self,
        _: Request<PricingPodPriceRequest>,
    ) -> Result<Response<PricingPodPriceResponse>, Status> {
        Err(Status::unimplemented("kube-node has no pricing"))
    }

    async fn gpu_label(
        &self,
        _: Request<GpuLabelRequest>,
    ) -> Result<Response<GpuLabelResponse>, Status> {
        Ok(Response::new(GpuLabelResponse {
            label: template::GPU_LABEL.to_string(),
        }))
    }

    async fn get_available_gpu_types(
        &self,
        _: Request<GetAvailableGpuTypesRequest>,
    ) -> Result<Response<GetAvailableGpuTypesResponse>, Status> {
        let list = list_valid(&self.client, NodeClass::decode_and_validate)
            .await
            .map_err(kube_status)?;
        let gpu_types = template::gpu_types(&list)
            .into_iter()
            .map(|t| (t, prost_types::Any::default()))
            .collect();
        Ok(Response::new(GetAvailableGpuTypesResponse { gpu_types }))
    }

    async fn cleanup(
        &self,
        _: Request<CleanupRequest>,
    ) -> Result<Response<CleanupResponse>, Status> {
        *self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        Ok(Response::new(CleanupResponse {}))
    }

    async fn refresh(
        &self,
        _: Request<RefreshRequest>,
    ) -> Result<Response<RefreshResponse>, Status> {
        let nodes = self
            .nodes()
            .list(&ListParams::default())
            .await
            .map_err(kube_status)?;
        let nodesets = list_valid(&self.client, NodeSet::decode_and_validate)
            .await
            .map_err(kube_status)?;
        let mut snap = Snapshot::default();
        for node in nodes.items {
            let name = node.name_any();
            if let Some(p) = node.spec.as_ref().and_then(|s| s.provider_id.clone()) {
                snap.by_provider_id.insert(p, name.clone());
            }
            snap.nodes.insert(name, node);
        }
        for ns in nodesets {
            snap.nodesets.insert(ns.name_any(), ns);
        }
        *self
            .snapshot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(snap);
        Ok(Response::new(RefreshResponse {}))
    }

    async fn node_group_target_size(
        &self,
        request: Request<NodeGroupTargetSizeRequest>,
    ) -> Result<Response<NodeGroupTargetSizeResponse>, Status> {
        let ns = self.group(&request.into_inner().id).await?;
        Ok(Response::new(NodeGroupTargetSizeResponse {
            target_size: ns.spec.replicas,
        }))
    }

    async fn node_group_increase_size(
        &self,
        request: Request<NodeGroupIncreaseSizeRequest>,
    ) -> Result<Response<NodeGroupIncreaseSizeResponse>, Status> {
        let deadline = call_deadline(request.metadata());
        let req = request.into_inner();
        if req.delta <= 0 {
            return Err(Status::invalid_argument(format!(
                "size increase must be positive, got {}",
                req.delta
            )));
        }
        let api = self.nodesets();
        // Every attempt reads the NodeSet afresh and recomputes: only one guarded write can
        // succeed per resourceVersion, so the delta is applied exactly once, on top of
        // whatever changed meanwhile, and the maxSize check holds for what is written.
        let (from, target) = retry_write(&req.id, deadline, || async {
            let ns = self.group(&req.id).await?;
            if let Some((_, message)) = instances::backoff(&ns) {
                // Accepting a size that will not be met would keep cluster-autoscaler waiting
                // on this group instead of trying another.
                return Err(Status::failed_precondition(format!(
                    "cannot increase the size of node group {}: {message}",
                    req.id
                ))
                .into());
            }
            let max = effective_max_size(&ns);
            let target = ns.spec.replicas.saturating_add(req.delta);
            if target > max {
                let why = if max < ns.spec.max_size.unwrap_or(0) {
                    format!("only {max} can exist: its NodeClass has no more free machines")
                } else {
                    format!("maxSize is {max}")
                };
                return Err(Status::failed_precondition(format!(
                    "size increase too large: NodeSet {} would have {target} replicas, {why}",
                    req.id
                ))
                .into());
            }
            scale(&api, &ns, target).await?;
            Ok((ns.spec.replicas, target))
        })
        .await?;
        info!(nodeset = %req.id, from, to = target, "increased node group size");
        Ok(Response::new(NodeGroupIncreaseSizeResponse {}))
    }

    async fn node_group_delete_nodes(
        &self,
        request: Request<NodeGroupDeleteNodesRequest>,
    ) -> Result<Response<NodeGroupDeleteNodesResponse>, Status> {
        let deadline = call_deadline(request.metadata());
        let req = request.into_inner();
        self.group(&req.id).await?;
        let mut names: Vec<String> = Vec::with_capacity(req.nodes.len());
        for node in &req.nodes {
            match self.node_name(node).await? {
                Some(name) => names.push(name),
                None => {
                    return Err(Status::invalid_argument(format!(
                        "node {:?} (providerID {:?}) is not a Node of node group {}",
                        node.name, node.provider_id, req.id
                    )));
                }
            }
        }
        if names.is_empty() {
            return Ok(Response::new(NodeGroupDeleteNodesResponse {}));
        }
        nodeset_controller::remove_nodes_until(&self.client, &req.id, &names, deadline)
            .await
            .map_err(removal_status)?;
        info!(nodeset = %req.id, count = names.len(), nodes = ?names, "removed nodes from node group");
        Ok(Response::new(NodeGroupDeleteNodesResponse {}))
    }

    async fn node_group_decrease_target_size(
        &self,
        request: Request<NodeGroupDecreaseTargetSizeRequest>,
    ) -> Result<Response<NodeGroupDecreaseTargetSizeResponse>, Status> {
        let deadline = call_deadline(request.metadata());
        let req = request.into_inner();
        if req.delta >= 0 {
            return Err(Status::invalid_argument(format!(
                "size decrease must be negative, got {}",
                req.delta
            )));
        }
        let api = self.nodesets();
        let (from, target) = retry_write(&req.id, deadline, || async {
            let ns = self.group(&req.id).await?;
            let nodes = self.group_nodes(&ns).await?;
            let registered = i32::try_from(instances::registered(&ns, &nodes)).unwrap_or(i32::MAX);
            let target = ns.spec.replicas.saturating_add(req.delta);
            // Only requests not yet fulfilled may go: the NodeSet removes unregistered Nodes
            // before registered ones, so a target no lower than the registered count never
            // touches a running Node.
            if target < registered {
                return Err(Status::failed_precondition(format!(
                    "attempt to delete existing nodes: NodeSet {} has {registered} registered \
                     Nodes, target size {} delta {}",
                    req.id, ns.spec.replicas, req.delta
                ))
                .into());
            }
            scale(&api, &ns, target).await?;
            Ok((ns.spec.replicas, target))
        })
        .await?;
        info!(nodeset = %req.id, from, to = target, "decreased node group target size");
        Ok(Response::new(NodeGroupDecreaseTargetSizeResponse {}))
    }

    async fn node_group_nodes(
        &self,
        request: Request<NodeGroupNodesRequest>,
    ) -> Result<Response<NodeGroupNodesResponse>, Status> {
        let ns = self.group(&request.into_inner().id).await?;
        let nodes = self.group_nodes(&ns).await?;
        Ok(Response::new(NodeGroupNodesResponse {
            instances: instances::instances(&ns, &nodes),
        }))
    }

    async fn node_group_template_node_info(
        &self,
        request: Request<NodeGroupTemplateNodeInfoRequest>,
    ) -> Result<Response<NodeGroupTemplateNodeInfoResponse>, Status> {
        let ns = self.group(&request.into_inner().id).await?;
        // With several classes, the one new Nodes would get now (scale-ups land there).
        let class_name = ns.class_for_new_nodes();
        let classes: Api<NodeClass> = Api::all(self.client.clone());
        let class = classes
            .get_opt(class_name)
            .await
            .map_err(kube_status)?
            .ok_or_else(|| {
                Status::failed_precondition(format!("NodeClass {class_name} not found"))
            })?;
        let uid = ns.metadata.uid.clone();
        let nodes = self.group_nodes(&ns).await?;
        let own = nodes.iter().filter(|n| {
            nodeset_owner(n).is_some_and(|(_, u)| Some(u) == uid.as_deref())
                && n.annotations()
                    .get(NODE_CLASS_ANNOTATION)
                    .map(String::as_str)
                    == Some(class_name)
        });
        let node = template::template_node_from(&ns, &class, template::registered_example(own));
        // Field 2 is `v1.Node#Marshal()`: the bare message, no `k8s\0` envelope; CA 1.34+
        // decodes it with `v1.Node#Unmarshal`. Field 1 serves CA <= 1.33.
        let node_bytes = node.encode_to_vec();
        Ok(Response::new(NodeGroupTemplateNodeInfoResponse {
            node_info: Some(node),
            node_bytes,
            resource_slice_bytes: Vec::new(),
        }))
    }

    async fn node_group_get_options(
        &self,
        request: Request<NodeGroupAutoscalingOptionsRequest>,
    ) -> Result<Response<NodeGroupAutoscalingOptionsResponse>, Status> {
        let req = request.into_inner();
        let ns = self.group(&req.id).await?;
        let annotations: BTreeMap<String, String> = ns.annotations().clone();
        let (opts, bad) = options::options(&annotations, req.defaults.as_ref());
        for b in &bad {
            warn!(nodeset = %req.id, annotation = b.key, value = %b.value, "ignored unusable autoscaling option");
        }
        // No options: every cluster-autoscaler release then uses its own defaults.
        Ok(Response::new(NodeGroupAutoscalingOptionsResponse {
            node_group_autoscaling_options: opts,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        assert_eq!(
            parse_grpc_timeout("4999m"),
            Some(Duration::from_millis(4999))
        );
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1M"), Some(Duration::from_secs(60)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "5", "5x", "-5m", "123456789m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_is_the_clients_less_a_margin() {
        let mut md = tonic::metadata::MetadataMap::new();
        let now = Instant::now();
        assert_eq!(call_deadline(&md), now + Duration::from_millis(4500));
        md.insert("grpc-timeout", "2S".parse().expect("value"));
        assert_eq!(call_deadline(&md), now + Duration::from_millis(1500));
        md.insert("grpc-timeout", "10S".parse().expect("value"));
        assert_eq!(call_deadline(&md), now + Duration::from_millis(9500));
        md.insert("grpc-timeout", "2H".parse().expect("value"));
        assert_eq!(call_deadline(&md), now + Duration::from_millis(59_500));
        md.insert("grpc-timeout", "100m".parse().expect("value"));
        assert_eq!(call_deadline(&md), now);
    }
}
