//! Fixture builders shared by the simulated backend's tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

use kube_node_crds::NodeClassSpec;
use kube_node_crds::names::tags;
use kube_node_provider::{CreateRequest, ResolvedClass};
use serde_json::{Value, json};

pub const CLUSTER: &str = "test-cluster";

/// A simulated NodeClass named `name` whose `spec.provider.simulated` is `sim`.
pub fn class(name: &str, sim: Value) -> ResolvedClass {
    let spec: NodeClassSpec = serde_json::from_value(json!({
        "provider": {"type": "simulated", "simulated": sim},
        "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
        "allocatable": {"cpu": "3800m", "memory": "15Gi", "pods": "110"},
    }))
    .expect("a valid NodeClass spec");
    ResolvedClass {
        name: name.to_string(),
        generation: 1,
        spec,
        credentials: None,
        cluster_name: CLUSTER.to_string(),
        inventory: None,
        claims: None,
    }
}

/// The request the node-controller makes for Node `name` with UID `uid` of class `class`.
pub fn request(class: &str, uid: &str, name: &str) -> CreateRequest {
    CreateRequest {
        idempotency_key: uid.to_string(),
        node_name: name.to_string(),
        tags: BTreeMap::from([
            (tags::CLUSTER.to_string(), CLUSTER.to_string()),
            (tags::NODE_NAME.to_string(), name.to_string()),
            (tags::NODE_UID.to_string(), uid.to_string()),
            (tags::NODE_CLASS.to_string(), class.to_string()),
            (
                tags::MANAGED_BY.to_string(),
                tags::MANAGED_BY_VALUE.to_string(),
            ),
        ]),
        user_data: None,
    }
}
