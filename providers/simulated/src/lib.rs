//! The simulated backend: in-process machines that boot after a delay, fail on command and play
//! the kubelet, so kube-node runs end to end without a cloud (tests, demos, `kube-node
//! simulate`, and real clusters with `--simulated-kubelet`).
//!
//! This crate owns [`SimulatedCloud`] (the shared state of every simulated machine, with hooks
//! for tests), the [`kube_node_provider::Provider`] bound to one NodeClass
//! ([`SimulatedProvider`], built by the factory from [`SimulatedCloud::factory`]), and the
//! simulated kubelet ([`SimulatedCloud::start_kubelet`]).

mod cloud;
mod config;
mod kubelet;

pub use cloud::{
    Method, PROVIDER_NAME, SimulatedCloud, SimulatedFactory, SimulatedProvider,
    THROTTLE_RETRY_AFTER, parse_provider_id,
};
pub use config::{DEFAULT_INSTANCE_TYPE, DEFAULT_ZONE, SimConfig, validate_spec};
pub use kubelet::{KUBELET_VERSION, KubeletConfig, KubeletHandle, NODE_LEASE_NAMESPACE};
