//! The simulated backend's configuration, resolved from a NodeClass and checked once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube_node_crds::v1alpha1::{ProviderType, SimulatedFaults, SimulatedProviderSpec};
use kube_node_provider::{ProviderError, ResolvedClass, Result};

/// The zone used when a NodeClass names none.
pub const DEFAULT_ZONE: &str = "sim-a";
/// The machine type reported when a NodeClass names none.
pub const DEFAULT_INSTANCE_TYPE: &str = "sim.standard";

const FIELD: &str = "spec.provider.simulated";

/// A simulated NodeClass, defaulted and validated: everything a simulated machine of the class
/// needs, copied so the provider never looks at the NodeClass again.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// The NodeClass's name.
    pub class_name: String,
    /// The cluster name kube-node runs with.
    pub cluster_name: String,
    /// The machine type reported for every machine.
    pub instance_type: String,
    /// Zones machines are spread across, round-robin; never empty.
    pub zones: Vec<String>,
    /// Create → Running.
    pub boot_delay: Duration,
    /// Delete → gone.
    pub delete_delay: Duration,
    /// Create → visible to list.
    pub list_lag: Duration,
    /// The most machines of the class that may exist at once.
    pub capacity: Option<u32>,
    /// The account quota on machines of the class.
    pub quota: Option<u32>,
    /// Injected faults.
    pub faults: SimulatedFaults,
    /// Whether the simulated kubelet registers the machines.
    pub register: bool,
    /// The seed of the class's random choices.
    pub seed: u64,
    /// What the kubelet reports as `status.capacity`; every machine of the class shares it.
    pub node_capacity: Arc<BTreeMap<String, Quantity>>,
    /// What the kubelet reports as `status.allocatable`; shared the same way.
    pub node_allocatable: Arc<BTreeMap<String, Quantity>>,
    /// The simulated group the class is backed by, if any.
    pub group: Option<String>,
}

impl SimConfig {
    /// Resolves and validates a NodeClass of the simulated backend. Fails with
    /// [`ProviderError::InvalidConfig`] naming the field.
    pub fn from_class(class: &ResolvedClass) -> Result<Self> {
        if class.spec.provider.type_ != ProviderType::Simulated {
            return Err(ProviderError::InvalidConfig(format!(
                "spec.provider.type: the simulated backend cannot serve provider type {:?}",
                class.spec.provider.type_.as_str()
            )));
        }
        let spec = class.spec.provider.simulated.clone().unwrap_or_default();
        validate_spec(&spec)?;
        let zones = if spec.zones.is_empty() {
            vec![DEFAULT_ZONE.to_string()]
        } else {
            spec.zones.clone()
        };
        Ok(Self {
            class_name: class.name.clone(),
            cluster_name: class.cluster_name.clone(),
            instance_type: spec
                .instance_type
                .clone()
                .unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.to_string()),
            zones,
            boot_delay: spec.boot_delay.map_or(Duration::ZERO, Into::into),
            delete_delay: spec.delete_delay.map_or(Duration::ZERO, Into::into),
            list_lag: spec.list_lag.map_or(Duration::ZERO, Into::into),
            capacity: spec.capacity,
            quota: spec.quota,
            faults: spec.faults.clone().unwrap_or_default(),
            register: spec.register.unwrap_or(true),
            // A class without a seed still replays: its seed is derived from its name.
            seed: spec.seed.unwrap_or_else(|| fnv1a(class.name.as_bytes())),
            node_capacity: Arc::new(class.spec.capacity.clone()),
            node_allocatable: Arc::new(class.spec.allocatable_or_capacity().clone()),
            group: spec.group.as_ref().map(|g| g.name.clone()),
        })
    }
}

/// Checks a simulated backend's configuration for nonsense. The error names the field.
pub fn validate_spec(spec: &SimulatedProviderSpec) -> Result<()> {
    let invalid = |field: &str, why: String| {
        Err(ProviderError::InvalidConfig(format!(
            "{FIELD}.{field}: {why}"
        )))
    };
    if let Some(t) = &spec.instance_type
        && (t.is_empty() || t.contains('/'))
    {
        return invalid(
            "instanceType",
            format!("{t:?} is not a machine type name (non-empty, no '/')"),
        );
    }
    let mut seen = BTreeSet::new();
    for (i, zone) in spec.zones.iter().enumerate() {
        // The zone is a path segment of the provider ID.
        if zone.is_empty() || zone.contains('/') {
            return invalid(
                &format!("zones[{i}]"),
                format!("{zone:?} is not a zone name (non-empty, no '/')"),
            );
        }
        if !seen.insert(zone.as_str()) {
            return invalid(
                &format!("zones[{i}]"),
                format!("zone {zone:?} is listed twice"),
            );
        }
    }
    if let Some(g) = &spec.group
        && let Err(why) = kube_node_crds::validation::check_group_name(&g.name)
    {
        return invalid("group.name", format!("{:?} {why}", g.name));
    }
    if spec.capacity == Some(0) && spec.quota.is_some() {
        return invalid(
            "quota",
            "capacity is 0, so no machine can ever exist and the quota can never apply".into(),
        );
    }
    if let Some(f) = &spec.faults {
        for (field, pct) in [
            (
                "insufficientCapacityPercent",
                f.insufficient_capacity_percent,
            ),
            ("throttlePercent", f.throttle_percent),
            ("transientPercent", f.transient_percent),
        ] {
            if pct > 100 {
                return invalid(
                    &format!("faults.{field}"),
                    format!("{pct} is not a percentage (0 to 100)"),
                );
            }
        }
        // One draw decides a call's fault, so the shares must fit in 100.
        let total = u64::from(f.insufficient_capacity_percent)
            + u64::from(f.throttle_percent)
            + u64::from(f.transient_percent);
        if total > 100 {
            return invalid(
                "faults",
                format!("the fault percentages add up to {total}, more than 100"),
            );
        }
        if f.fail_create_call == Some(0) {
            return invalid(
                "faults.failCreateCall",
                "create calls are counted from 1".into(),
            );
        }
    }
    Ok(())
}

/// A stable 64-bit hash (FNV-1a), so derived seeds do not change between runs or builds.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
