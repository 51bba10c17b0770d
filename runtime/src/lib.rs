//! How a kube-node controller runs: the plumbing every controller of the binary shares and
//! none of them owns (in the spirit of kube-rs's `kube-runtime` and Karpenter's
//! `pkg/operator`). The controllers meet each other only through the API server; what they
//! have in common lives here:
//!
//! - [`metrics`]: the reconcile metric families (`kube_node_reconcile_total`,
//!   `..._duration_seconds`, `..._errors_total`) and each controller's work-queue depth
//!   (`kube_node_workqueue_depth`), registered once per process and labelled by controller;
//! - [`backoff`]: the per-object exponential backoff of the error policies;
//! - [`events`]: the best-effort event path ([`EventSink`]: bounded queue, per-object spam
//!   filter, its own token bucket) and the uncached writer of Normal transition events;
//! - [`client`]: a Kubernetes client behind its own client-side token bucket (QPS and burst),
//!   one per controller;
//! - [`cached_node`]: the Node cache's compact element, [`CachedNode`], and the one trim of
//!   a cached Node;
//! - [`shared`]: one watch per kind for the whole process, fanned out to every controller;
//! - [`tolerant`]: NodeClass and NodeSet watches that decode one object at a time, setting
//!   aside (and reporting on itself) any object the types cannot hold;
//! - [`node_status`]: the `Ready=Unknown` condition a Node carries until its kubelet posts;
//! - [`groups`]: the providers of group-backed NodeClasses and the per-group lock both
//!   controllers hold around a group's size.

pub mod backoff;
pub mod cached_node;
pub mod client;
pub mod events;
pub mod groups;
mod intern;
pub mod metrics;
pub mod node_status;
pub mod shared;
pub mod tolerant;

pub use backoff::Backoff;
pub use cached_node::{CachedNode, cached_event, trim_node};
pub use client::{RateLimitLayer, TokenBucket, limited_client, urgent};
pub use events::{EventSink, publish_transition};
pub use groups::GroupAccess;
pub use metrics::{ReconcileFamilies, WorkQueue};
pub use shared::{Fanout, Shared, WatchSource};
