//! Reading back what the backend launched, for tests and tools: every instance of a cluster
//! (in any state), its user-data, and its volumes' tags.

use std::collections::BTreeMap;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, InstanceAttributeName};
use base64::Engine as _;
use kube_node_crds::names::tags;
use kube_node_provider::Result;

use crate::errors::from_sdk;

/// Every instance tagged with `cluster` (`kube-node.io/cluster`), in every state, terminated
/// ones included (check `state()`), across all pages.
pub async fn instances_tagged(
    client: &Client,
    cluster: &str,
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let page = client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{}", tags::CLUSTER))
                    .values(cluster)
                    .build(),
            )
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

/// The instances of `cluster` that are pending or running.
pub async fn running_instances(
    client: &Client,
    cluster: &str,
) -> Result<Vec<aws_sdk_ec2::types::Instance>> {
    Ok(instances_tagged(client, cluster)
        .await?
        .into_iter()
        .filter(|i| {
            matches!(
                i.state().and_then(|s| s.name()).map(|n| n.as_str()),
                Some("pending" | "running")
            )
        })
        .collect())
}

/// An instance's user-data, base64-decoded (`None` when it has none).
pub async fn user_data(client: &Client, instance_id: &str) -> Result<Option<String>> {
    let out = client
        .describe_instance_attribute()
        .instance_id(instance_id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .map_err(|e| from_sdk("DescribeInstanceAttribute", e))?;
    let Some(encoded) = out.user_data().and_then(|v| v.value()) else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| {
            kube_node_provider::ProviderError::Transient(format!("user-data is not base64: {e}"))
        })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// The tags of every EBS volume attached to an instance, by volume id.
pub async fn volume_tags(
    client: &Client,
    instance_id: &str,
) -> Result<BTreeMap<String, BTreeMap<String, String>>> {
    let out = client
        .describe_volumes()
        .filters(
            Filter::builder()
                .name("attachment.instance-id")
                .values(instance_id)
                .build(),
        )
        .send()
        .await
        .map_err(|e| from_sdk("DescribeVolumes", e))?;
    Ok(out
        .volumes()
        .iter()
        .filter_map(|v| {
            let id = v.volume_id()?.to_string();
            let t = v
                .tags()
                .iter()
                .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                .collect();
            Some((id, t))
        })
        .collect())
}

/// An instance's tags as a map.
pub fn tags_of(instance: &aws_sdk_ec2::types::Instance) -> BTreeMap<String, String> {
    instance
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
        .collect()
}
