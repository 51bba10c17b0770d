//! The AWS EC2 backend of kube-node (`spec.provider.type: aws`).
//!
//! This crate owns everything that talks to EC2, and is the only one that depends on
//! aws-sdk-ec2. [`AwsFactory`] builds an [`AwsProvider`] per NodeClass:
//!
//! - create = DescribeInstances for a live instance tagged with the Node's UID (idempotency
//!   that survives restarts, since moto and a lost response defeat ClientToken alone), then
//!   RunInstances with a ClientToken derived from the UID, the tags on the instance and its
//!   volumes at launch and the join payload as user-data; on InsufficientInstanceCapacity it
//!   tries the other subnets, then the alternative instance types.
//! - get / list = DescribeInstances. list is one paginated request per NodeClass per
//!   reconcile wave, filtered by tags and live states. get is batched (module `batch`): the gets
//!   of all Nodes arriving within [`DESCRIBE_WINDOW`] (or while the previous batch is in
//!   flight) share one DescribeInstances filtered by `instance-id` (unknown ids are absent,
//!   not an error for the whole call); create's idempotency lookup by node UID is batched the
//!   same way.
//! - delete = TerminateInstances; an unknown or already terminated instance is success.
//! - validate = DescribeImages, DescribeSubnets, DescribeSecurityGroups (and SSM GetParameter
//!   when the AMI comes from `amiSsmParameter`; the resolved id is cached for 10 minutes).
//!
//! Errors map to [`kube_node_provider::ProviderError`] by [`errors::classify`], from EC2's
//! error code. Credentials come from the NodeClass's Secret or, when it references none, from
//! the SDK's default chain (feature `default-chain`). TLS is rustls with `ring` only.
//!
//! For tests: [`CallCounter`] counts EC2 operations by name, [`FaultInjector`] makes chosen
//! calls fail with chosen EC2 error codes, [`inspect`] reads back what was launched, and
//! [`emulator`] starts moto and makes a network in it.

mod batch;
mod client;
pub mod emulator;
pub mod errors;
pub mod inspect;
pub mod plan;
mod provider;

use std::sync::Arc;

use aws_smithy_runtime_api::client::http::SharedHttpClient;
use kube_node_provider::{Provider, ProviderFactory, ResolvedClass, Result};

pub use client::{
    ACCESS_KEY_ID_KEYS, CallCounter, FaultInjector, SECRET_ACCESS_KEY_KEYS, SESSION_TOKEN_KEYS,
    emulator_client, emulator_ssm_client, https_client, ssm_endpoint, static_credentials,
};
pub use provider::{AwsProvider, DESCRIBE_WINDOW, PROVIDER_TYPE, to_instance};

/// Re-exported so users of [`AwsProvider::client`] and [`inspect`] need no direct dependency.
pub use aws_sdk_ec2;
/// Re-exported for tests that put the AMI parameter into an emulator.
pub use aws_sdk_ssm;

/// Options shared by every provider a factory builds.
#[derive(Clone, Debug)]
pub struct AwsOptions {
    /// The HTTP client (one connection pool for all NodeClasses).
    pub http: SharedHttpClient,
    /// Counts EC2 operations, when set.
    pub counter: Option<CallCounter>,
    /// Injects EC2 errors, when set (tests only).
    pub faults: Option<FaultInjector>,
    /// Attempts per EC2 call including the SDK's own retries of throttling and 5xx (default 3).
    pub max_attempts: u32,
}

impl Default for AwsOptions {
    fn default() -> Self {
        Self {
            http: https_client(),
            counter: None,
            faults: None,
            max_attempts: 3,
        }
    }
}

/// Builds [`AwsProvider`]s for NodeClasses of type `aws`.
#[derive(Clone, Debug, Default)]
pub struct AwsFactory {
    options: AwsOptions,
}

impl AwsFactory {
    /// A factory with default options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts every EC2 operation of every provider this factory builds.
    pub fn with_call_counter(mut self, counter: CallCounter) -> Self {
        self.options.counter = Some(counter);
        self
    }

    /// Lets tests make EC2 calls fail with chosen error codes.
    pub fn with_fault_injector(mut self, faults: FaultInjector) -> Self {
        self.options.faults = Some(faults);
        self
    }

    /// Attempts per EC2 call, including the SDK's retries (at least 1).
    pub fn with_max_attempts(mut self, attempts: u32) -> Self {
        self.options.max_attempts = attempts.max(1);
        self
    }

    /// The options providers are built with.
    pub fn options(&self) -> &AwsOptions {
        &self.options
    }

    /// Builds the concrete provider (for tests that need [`AwsProvider::client`]).
    pub fn build_aws(&self, class: &ResolvedClass) -> Result<AwsProvider> {
        AwsProvider::new(class, &self.options)
    }
}

impl ProviderFactory for AwsFactory {
    fn provider_type(&self) -> &'static str {
        PROVIDER_TYPE
    }

    fn build(&self, class: &ResolvedClass) -> Result<Arc<dyn Provider>> {
        Ok(Arc::new(self.build_aws(class)?))
    }
}
