//! The EC2 provider: create / get / list / delete / validate on top of aws-sdk-ec2.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification,
    InstanceInterruptionBehavior, InstanceMarketOptionsRequest, InstanceType, MarketType,
    ResourceType, SpotInstanceType, SpotMarketOptions, Tag, TagSpecification, VolumeType,
};
use base64::Engine as _;
use kube_node_crds::names::tags;
use kube_node_crds::v1alpha1::{AwsCapacityType, AwsProviderSpec};
use kube_node_provider::{
    Capabilities, CreateRequest, DeleteOutcome, Instance, InstanceAddress, ListFilter, Provider,
    ProviderError, ResolvedClass, Result,
};

use crate::AwsOptions;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::batch::{Batcher, FetchFn, FetchFuture};
use crate::client::{self, ClientParams};
use crate::errors::{self, from_sdk};
use crate::plan::{self, Candidate};

/// How long an AMI resolved from SSM is reused.
pub const SSM_AMI_TTL: Duration = Duration::from_secs(600);

/// The backend's name, as in `spec.provider.type`.
pub const PROVIDER_TYPE: &str = "aws";

/// How long the first lookup of a batch waits for others before the DescribeInstances goes
/// out. Lookups arriving while that call is in flight wait for it and share the next one, so
/// a reconcile wave of N Nodes costs one or two DescribeInstances instead of N.
pub const DESCRIBE_WINDOW: Duration = Duration::from_millis(25);

/// EC2 rejects a call with more than 200 filter values in all (FilterLimitExceeded).
const MAX_FILTER_VALUES: usize = 200;

/// EC2 machines of one NodeClass.
#[derive(Debug)]
pub struct AwsProvider {
    client: Client,
    /// `get`: DescribeInstances filtered by `instance-id`, batched across callers.
    by_id: Batcher<Instance>,
    /// `create`'s idempotency lookup: DescribeInstances by the node-UID tag, batched.
    by_uid: Batcher<Instance>,
    ssm: aws_sdk_ssm::Client,
    /// The AMI resolved from `amiSsmParameter`, and when.
    resolved_ami: Mutex<Option<(String, Instant)>>,
    spec: AwsProviderSpec,
    class_name: String,
    generation: i64,
}

impl AwsProvider {
    /// Builds the provider for a NodeClass without I/O. Fails with InvalidConfig naming the
    /// field when the `aws` configuration is unusable, or Unauthorized when the referenced
    /// Secret lacks keys.
    pub fn new(class: &ResolvedClass, options: &AwsOptions) -> Result<Self> {
        let spec = class.spec.provider.aws.clone().ok_or_else(|| {
            ProviderError::InvalidConfig(
                "spec.provider.aws: required when spec.provider.type is aws".into(),
            )
        })?;
        check_spec(&spec)?;
        let credentials = match (&class.credentials, &class.spec.credentials_secret_ref) {
            (Some(c), _) => Some(client::static_credentials(c)?),
            (None, Some(_)) => {
                return Err(ProviderError::Unauthorized(
                    "spec.credentialsSecretRef: the referenced Secret has no data".into(),
                ));
            }
            (None, None) => None,
        };
        let clients = client::clients(ClientParams {
            region: &spec.region,
            endpoint_url: spec.endpoint_url.as_deref(),
            credentials,
            http: options.http.clone(),
            counter: options.counter.clone(),
            faults: options.faults.clone(),
            max_attempts: options.max_attempts,
        });
        Ok(Self {
            by_id: Batcher::new(
                "DescribeInstances by instance id",
                DESCRIBE_WINDOW,
                MAX_FILTER_VALUES,
                fetch_by_id(clients.ec2.clone()),
            ),
            by_uid: Batcher::new(
                "DescribeInstances by node UID",
                DESCRIBE_WINDOW,
                MAX_FILTER_VALUES - plan::LIVE_STATES.len(),
                fetch_by_uid(clients.ec2.clone()),
            ),
            client: clients.ec2,
            ssm: clients.ssm,
            resolved_ami: Mutex::new(None),
            spec,
            class_name: class.name.clone(),
            generation: class.generation,
        })
    }

    /// The EC2 client this provider uses (for tests that inspect what it launched).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The AMI: `ami`, or the value of the SSM parameter `amiSsmParameter` (cached for
    /// [`SSM_AMI_TTL`], so a wave of creates costs one GetParameter).
    async fn ami(&self) -> Result<String> {
        let parameter = match (&self.spec.ami, &self.spec.ami_ssm_parameter) {
            (Some(ami), _) => return Ok(ami.clone()),
            (None, Some(p)) => p,
            (None, None) => {
                return Err(ProviderError::InvalidConfig(
                    "spec.provider.aws.ami: set ami (or amiSsmParameter)".into(),
                ));
            }
        };
        if let Ok(cached) = self.resolved_ami.lock()
            && let Some((ami, at)) = cached.as_ref()
            && at.elapsed() < SSM_AMI_TTL
        {
            return Ok(ami.clone());
        }
        let out = self
            .ssm
            .get_parameter()
            .name(parameter)
            .send()
            .await
            .map_err(|e| match errors::code_of(&e) {
                Some(code @ ("ParameterNotFound" | "ParameterVersionNotFound" | "ValidationException")) => {
                    ProviderError::InvalidConfig(format!(
                        "spec.provider.aws.amiSsmParameter: {code}: parameter {parameter} cannot be read"
                    ))
                }
                _ => from_sdk("GetParameter", e),
            })?;
        let ami = out
            .parameter()
            .and_then(|p| p.value())
            .map(str::trim)
            .filter(|v| v.starts_with("ami-"))
            .ok_or_else(|| {
                ProviderError::InvalidConfig(format!(
                    "spec.provider.aws.amiSsmParameter: parameter {parameter} does not hold an AMI id"
                ))
            })?
            .to_string();
        if let Ok(mut cached) = self.resolved_ami.lock() {
            *cached = Some((ami.clone(), Instant::now()));
        }
        Ok(ami)
    }

    /// Instances matching the filters, across every page.
    async fn describe(&self, filters: Vec<Filter>) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
        describe(&self.client, filters).await
    }

    /// The live instance launched for a Node (by its UID tag), looked up together with the
    /// other creates of the wave.
    async fn find_by_uid(&self, uid: &str) -> Result<Option<Instance>> {
        self.by_uid.get(uid).await
    }

    async fn run(
        &self,
        request: &CreateRequest,
        candidate: &Candidate,
        ami: &str,
        tags: &BTreeMap<String, String>,
        user_data: Option<&str>,
    ) -> std::result::Result<Instance, (Option<String>, ProviderError)> {
        let ec2_tags: Vec<Tag> = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let spec_for = |rt: ResourceType| {
            TagSpecification::builder()
                .resource_type(rt)
                .set_tags(Some(ec2_tags.clone()))
                .build()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default();
        let mut call = self
            .client
            .run_instances()
            .image_id(ami)
            .instance_type(InstanceType::from(candidate.instance_type.as_str()))
            .subnet_id(&candidate.subnet_id)
            .min_count(1)
            .max_count(1)
            .client_token(plan::client_token(
                &request.idempotency_key,
                self.generation,
                candidate,
                now,
            ))
            .tag_specifications(spec_for(ResourceType::Instance))
            .tag_specifications(spec_for(ResourceType::Volume));
        if !self.spec.security_group_ids.is_empty() {
            call = call.set_security_group_ids(Some(self.spec.security_group_ids.clone()));
        }
        if let Some(ud) = user_data {
            call = call.user_data(ud);
        }
        if let Some(profile) = self
            .spec
            .iam_instance_profile
            .as_deref()
            .filter(|p| !p.is_empty())
        {
            let p = IamInstanceProfileSpecification::builder();
            let p = if plan::instance_profile_is_arn(profile) {
                p.arn(profile)
            } else {
                p.name(profile)
            };
            call = call.iam_instance_profile(p.build());
        }
        if let Some(key) = self.spec.key_name.as_deref().filter(|k| !k.is_empty()) {
            call = call.key_name(key);
        }
        if let Some(root) = &self.spec.root_volume {
            let mut ebs = EbsBlockDevice::builder().delete_on_termination(true);
            if let Some(size) = root.size_gib {
                ebs = ebs.volume_size(size);
            }
            if let Some(t) = root.volume_type.as_deref().filter(|t| !t.is_empty()) {
                ebs = ebs.volume_type(VolumeType::from(t));
            }
            call = call.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(root.device_name.as_deref().unwrap_or("/dev/xvda"))
                    .ebs(ebs.build())
                    .build(),
            );
        }
        if self.spec.capacity_type == Some(AwsCapacityType::Spot) {
            call = call.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(
                        SpotMarketOptions::builder()
                            .spot_instance_type(SpotInstanceType::OneTime)
                            .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                            .build(),
                    )
                    .build(),
            );
        }
        let out = match call.send().await {
            Ok(out) => out,
            Err(e) => {
                let code = errors::code_of(&e).map(str::to_string);
                return Err((code, from_sdk("RunInstances", e)));
            }
        };
        let Some(raw) = out.instances().first() else {
            return Err((
                None,
                ProviderError::Transient("RunInstances returned no instance".into()),
            ));
        };
        let Some(mut instance) = to_instance(raw) else {
            // The ClientToken matched an instance that is already terminated (a Node whose
            // machine was deleted and is being recreated within the token window): wait for
            // the token to rotate rather than adopt a dead machine.
            return Err((
                None,
                ProviderError::Transient(format!(
                    "RunInstances returned terminated instance {} for a reused client token; \
                     retrying after the token rotates",
                    raw.instance_id().unwrap_or_default()
                )),
            ));
        };
        // RunInstances may answer before the tags are visible on the instance; what we sent is
        // what it carries.
        for (k, v) in tags {
            instance.tags.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Ok(instance)
    }
}

/// Static checks of the `aws` configuration (no I/O).
fn check_spec(spec: &AwsProviderSpec) -> Result<()> {
    let invalid = |m: &str| Err(ProviderError::InvalidConfig(m.to_string()));
    if spec.region.trim().is_empty() {
        return invalid("spec.provider.aws.region: must not be empty");
    }
    if spec.instance_type.trim().is_empty() {
        return invalid("spec.provider.aws.instanceType: must not be empty");
    }
    if spec.subnet_ids.iter().all(|s| s.trim().is_empty()) {
        return invalid("spec.provider.aws.subnetIds: at least one subnet is required");
    }
    match (&spec.ami, &spec.ami_ssm_parameter) {
        (Some(a), None) if !a.trim().is_empty() => {}
        (None, Some(p)) if !p.trim().is_empty() => {}
        _ => return invalid("spec.provider.aws.ami: set exactly one of ami and amiSsmParameter"),
    }
    if let Some(url) = spec.endpoint_url.as_deref().filter(|u| !u.is_empty())
        && !(url.starts_with("http://") || url.starts_with("https://"))
    {
        return invalid("spec.provider.aws.endpointUrl: must start with http:// or https://");
    }
    Ok(())
}

/// Instances matching the filters, across every page.
async fn describe(
    client: &Client,
    filters: Vec<Filter>,
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client
            .describe_instances()
            .set_filters(Some(filters.clone()))
            .max_results(1000)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| from_sdk("DescribeInstances", e))?;
        for r in page.reservations() {
            out.extend(r.instances().iter().cloned());
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// The batched fetch behind `get`: one DescribeInstances for many instance ids. It filters by
/// `instance-id` rather than passing `InstanceIds`, because EC2 fails the whole call with
/// InvalidInstanceID.NotFound when any one id is unknown; with the filter an unknown id is
/// simply absent. Terminated instances are absent too (they are gone).
fn fetch_by_id(client: Client) -> FetchFn<Instance> {
    Arc::new(move |ids: Vec<String>| {
        let client = client.clone();
        Box::pin(async move {
            let filter = Filter::builder()
                .name("instance-id")
                .set_values(Some(ids))
                .build();
            let found = describe(&client, vec![filter]).await?;
            Ok(found
                .iter()
                .filter_map(to_instance)
                .map(|i| (i.id.clone(), i))
                .collect())
        }) as FetchFuture<Instance>
    })
}

/// The batched fetch behind `create`'s idempotency lookup: one DescribeInstances for the live
/// instances tagged with any of many node UIDs.
fn fetch_by_uid(client: Client) -> FetchFn<Instance> {
    Arc::new(move |uids: Vec<String>| {
        let client = client.clone();
        Box::pin(async move {
            let filter = Filter::builder()
                .name(format!("tag:{}", tags::NODE_UID))
                .set_values(Some(uids))
                .build();
            let found = describe(&client, vec![filter, live_state_filter()]).await?;
            Ok(oldest_per_node_uid(found.iter().filter_map(to_instance)))
        }) as FetchFuture<Instance>
    })
}

/// The oldest live instance of each node UID. Two live machines for one Node can only come
/// from an outside launch with our tags; returning the oldest keeps the answer stable, and the
/// orphan collector (which sees the other without a Node providerID) removes the rest.
fn oldest_per_node_uid(instances: impl Iterator<Item = Instance>) -> HashMap<String, Instance> {
    let mut by_uid: HashMap<String, Vec<Instance>> = HashMap::new();
    for i in instances {
        if let Some(uid) = i.tags.get(tags::NODE_UID) {
            by_uid.entry(uid.clone()).or_default().push(i);
        }
    }
    by_uid
        .into_iter()
        .filter_map(|(uid, mut live)| {
            if live.len() > 1 {
                tracing::warn!(
                    node_uid = %uid,
                    count = live.len(),
                    "found several live instances for one node"
                );
            }
            live.sort_by_key(|i| (i.created_unix, i.id.clone()));
            let oldest = live.into_iter().next()?;
            Some((uid, oldest))
        })
        .collect()
}

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

fn live_state_filter() -> Filter {
    Filter::builder()
        .name("instance-state-name")
        .set_values(Some(
            plan::LIVE_STATES.iter().map(|s| s.to_string()).collect(),
        ))
        .build()
}

/// Converts an EC2 instance; `None` when it is terminated (gone) or has no id.
pub fn to_instance(i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let id = i.instance_id().filter(|s| !s.is_empty())?;
    let ec2_state = i
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str())
        .unwrap_or("pending");
    let state = plan::state_of(ec2_state)?;
    let zone = i
        .placement()
        .and_then(|p| p.availability_zone())
        .filter(|z| !z.is_empty())
        .map(str::to_string);
    let tags = i
        .tags()
        .iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect();
    let mut addresses = Vec::new();
    let mut push = |kind: &str, value: Option<&str>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            addresses.push(InstanceAddress {
                kind: kind.to_string(),
                address: v.to_string(),
            });
        }
    };
    push("InternalIP", i.private_ip_address());
    push("ExternalIP", i.public_ip_address());
    push("InternalDNS", i.private_dns_name());
    push("ExternalDNS", i.public_dns_name());
    Some(Instance {
        id: id.to_string(),
        provider_id: plan::provider_id(zone.as_deref(), id),
        state,
        tags,
        zone,
        instance_type: i.instance_type().map(|t| t.as_str().to_string()),
        addresses,
        created_unix: i.launch_time().map(|t| t.secs()),
        labels: Default::default(),
        failure: None,
    })
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        PROVIDER_TYPE
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            group_sized: false,
            // DescribeInstances may miss an instance for a few seconds after RunInstances.
            eventually_consistent_list: true,
        }
    }

    async fn validate(&self) -> Result<()> {
        let ami = self.ami().await?;
        let ami = ami.as_str();
        let images = self
            .client
            .describe_images()
            .image_ids(ami)
            .send()
            .await
            .map_err(|e| from_sdk("DescribeImages", e))?;
        if !images.images().iter().any(|i| i.image_id() == Some(ami)) {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.aws.ami: image {ami} does not exist in {}",
                self.spec.region
            )));
        }
        let subnets: Vec<String> = self
            .spec
            .subnet_ids
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect();
        let found = self
            .client
            .describe_subnets()
            .set_subnet_ids(Some(subnets.clone()))
            .send()
            .await
            .map_err(|e| from_sdk("DescribeSubnets", e))?;
        if let Some(missing) = subnets.iter().find(|s| {
            !found
                .subnets()
                .iter()
                .any(|f| f.subnet_id() == Some(s.as_str()))
        }) {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.aws.subnetIds: subnet {missing} does not exist"
            )));
        }
        if !self.spec.security_group_ids.is_empty() {
            let found = self
                .client
                .describe_security_groups()
                .set_group_ids(Some(self.spec.security_group_ids.clone()))
                .send()
                .await
                .map_err(|e| from_sdk("DescribeSecurityGroups", e))?;
            if let Some(missing) = self.spec.security_group_ids.iter().find(|g| {
                !found
                    .security_groups()
                    .iter()
                    .any(|f| f.group_id() == Some(g.as_str()))
            }) {
                return Err(ProviderError::InvalidConfig(format!(
                    "spec.provider.aws.securityGroupIds: security group {missing} does not exist"
                )));
            }
        }
        Ok(())
    }

    async fn create(&self, request: &CreateRequest) -> Result<Instance> {
        // Idempotency first: a machine already launched for this Node (by us before a restart,
        // or a RunInstances whose answer was lost) is the answer.
        if let Some(existing) = self.find_by_uid(&request.idempotency_key).await? {
            tracing::debug!(
                node = %request.node_name,
                provider_id = %existing.provider_id,
                "found the instance launched earlier"
            );
            return Ok(existing);
        }
        let ami = self.ami().await?;
        let user_data = match &request.user_data {
            Some(ud) if ud.0.len() > plan::MAX_USER_DATA_BYTES => {
                return Err(ProviderError::InvalidConfig(format!(
                    "spec.bootstrap: the user-data is {} bytes; EC2 allows {}",
                    ud.0.len(),
                    plan::MAX_USER_DATA_BYTES
                )));
            }
            Some(ud) => Some(base64::engine::general_purpose::STANDARD.encode(ud.0.as_bytes())),
            None => None,
        };
        let tags = plan::launch_tags(
            &self.spec.tags,
            &request.tags,
            &self.class_name,
            &request.node_name,
        );
        if tags.len() > plan::MAX_TAGS {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.aws.tags: {} tags with kube-node's own; EC2 allows {}",
                tags.len(),
                plan::MAX_TAGS
            )));
        }
        let candidates = plan::candidates(
            &request.idempotency_key,
            &self.spec.instance_type,
            &self.spec.alternative_instance_types,
            &self.spec.subnet_ids,
        );
        let mut last: Option<ProviderError> = None;
        for candidate in &candidates {
            match self
                .run(request, candidate, &ami, &tags, user_data.as_deref())
                .await
            {
                Ok(instance) => {
                    tracing::info!(
                        node = %request.node_name,
                        provider_id = %instance.provider_id,
                        zone = instance.zone.as_deref().unwrap_or_default(),
                        instance_type = %candidate.instance_type,
                        "launched instance"
                    );
                    return Ok(instance);
                }
                Err((Some(code), e)) if errors::try_next_candidate(&code) => {
                    tracing::info!(
                        node = %request.node_name,
                        instance_type = %candidate.instance_type,
                        subnet = %candidate.subnet_id,
                        reason = e.reason(),
                        "no capacity; trying the next instance type or subnet"
                    );
                    last = Some(e);
                }
                Err((_, e)) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ProviderError::InvalidConfig(
                "spec.provider.aws.subnetIds: no subnet to launch into".into(),
            )
        }))
    }

    async fn get(&self, provider_id: &str) -> Result<Instance> {
        let Some(id) = plan::instance_id_of(provider_id) else {
            return Err(ProviderError::NotFound(format!(
                "{provider_id} is not an aws provider ID"
            )));
        };
        // Batched with the other gets of this reconcile wave: one DescribeInstances for all.
        self.by_id
            .get(id)
            .await?
            .ok_or_else(|| ProviderError::NotFound(format!("instance {id} is gone")))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<Instance>> {
        let mut filters = vec![
            tag_filter(tags::CLUSTER, &filter.cluster),
            tag_filter(tags::MANAGED_BY, tags::MANAGED_BY_VALUE),
            live_state_filter(),
        ];
        if let Some(class) = &filter.node_class {
            filters.push(tag_filter(tags::NODE_CLASS, class));
        }
        let found = self.describe(filters).await?;
        Ok(found.iter().filter_map(to_instance).collect())
    }

    async fn delete(&self, provider_id: &str) -> Result<DeleteOutcome> {
        let Some(id) = plan::instance_id_of(provider_id) else {
            // Not an EC2 instance id: nothing of ours can be behind it.
            return Ok(DeleteOutcome::Gone);
        };
        match self
            .client
            .terminate_instances()
            .instance_ids(id)
            .send()
            .await
        {
            Ok(out) => {
                let previous = out
                    .terminating_instances()
                    .iter()
                    .find(|c| c.instance_id() == Some(id))
                    .and_then(|c| c.previous_state())
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_string());
                match previous.as_deref() {
                    Some("terminated") => Ok(DeleteOutcome::Gone),
                    _ => {
                        tracing::info!(provider_id, "terminating instance");
                        Ok(DeleteOutcome::Deleting)
                    }
                }
            }
            Err(e) => match from_sdk("TerminateInstances", e) {
                ProviderError::NotFound(_) => Ok(DeleteOutcome::Gone),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> AwsProviderSpec {
        AwsProviderSpec {
            region: "us-east-1".into(),
            instance_type: "t3.small".into(),
            ami: Some("ami-1".into()),
            subnet_ids: vec!["subnet-1".into()],
            ..Default::default()
        }
    }

    fn instance(id: &str, uid: Option<&str>, created: i64) -> Instance {
        Instance {
            id: id.into(),
            provider_id: format!("aws:///us-east-1a/{id}"),
            state: kube_node_provider::InstanceState::Running,
            tags: uid
                .map(|u| (tags::NODE_UID.to_string(), u.to_string()))
                .into_iter()
                .collect(),
            zone: Some("us-east-1a".into()),
            instance_type: None,
            addresses: vec![],
            created_unix: Some(created),
            labels: Default::default(),
            failure: None,
        }
    }

    #[test]
    fn the_oldest_live_instance_answers_for_each_node_uid() {
        let found = oldest_per_node_uid(
            vec![
                instance("i-b", Some("uid-1"), 20),
                instance("i-a", Some("uid-1"), 10),
                instance("i-c", Some("uid-2"), 30),
                instance("i-untagged", None, 1),
            ]
            .into_iter(),
        );
        assert_eq!(found.len(), 2);
        assert_eq!(found["uid-1"].id, "i-a");
        assert_eq!(found["uid-2"].id, "i-c");
    }

    #[test]
    fn spec_checks_name_the_field() {
        assert!(check_spec(&spec()).is_ok());
        let cases: Vec<(AwsProviderSpec, &str)> = vec![
            (
                AwsProviderSpec {
                    region: " ".into(),
                    ..spec()
                },
                "spec.provider.aws.region",
            ),
            (
                AwsProviderSpec {
                    subnet_ids: vec![],
                    ..spec()
                },
                "spec.provider.aws.subnetIds",
            ),
            (
                AwsProviderSpec {
                    ami: Some("ami-1".into()),
                    ami_ssm_parameter: Some("/aws/service/eks".into()),
                    ..spec()
                },
                "spec.provider.aws.ami",
            ),
            (
                AwsProviderSpec {
                    ami: None,
                    ..spec()
                },
                "spec.provider.aws.ami",
            ),
            (
                AwsProviderSpec {
                    endpoint_url: Some("localhost:5000".into()),
                    ..spec()
                },
                "spec.provider.aws.endpointUrl",
            ),
        ];
        for (s, field) in cases {
            let e = check_spec(&s).expect_err(field);
            assert_eq!(e.reason(), "InvalidConfig");
            assert!(e.message().starts_with(field), "{e} should name {field}");
        }
    }
}
