//! How many bytes the Node cache holds per Node: 5000 realistic Nodes (kubelet status, 13
//! labels, managed fields, foreign annotations, 100 NodeSets) as trimmed `Node`s and as
//! `CachedNode`s, each behind the `Arc` a reflector store keeps. Prints, never asserts:
//! `cargo nextest run -p kube-node-runtime --test cached_node_size --no-capture`.
//! The CachedNode figure includes the interner's table and the shared strings themselves.

use std::alloc::System;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use kube_node_runtime::{CachedNode, trim_node};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

#[path = "../src/cached_node/fixture.rs"]
mod fixture;

const NODES: usize = 5000;
const NODESETS: usize = 100;

/// Bytes still allocated after `build`, less the Vec of Arcs itself.
fn held<T>(build: impl FnOnce() -> Vec<Arc<T>>) -> (Vec<Arc<T>>, usize) {
    let region = Region::new(GLOBAL);
    let v = build();
    let s = region.change();
    // Reallocations are already in both byte counts (growth allocated, shrinking deallocated).
    let net = s.bytes_allocated as isize - s.bytes_deallocated as isize;
    let vec = v.capacity() * std::mem::size_of::<Arc<T>>();
    (v, usize::try_from(net).unwrap_or(0).saturating_sub(vec))
}

#[test]
fn bytes_per_cached_node() {
    let raw: Vec<Node> = (0..NODES)
        .map(|i| fixture::kubelet_node(i, NODESETS))
        .collect();
    let (whole, whole_bytes) = held(|| raw.iter().cloned().map(Arc::new).collect());
    drop(whole);
    let (trimmed, trimmed_bytes) = held(|| {
        raw.iter()
            .cloned()
            .map(|mut n| {
                trim_node(&mut n);
                Arc::new(n)
            })
            .collect()
    });
    let (cached, cached_bytes) = held(|| {
        raw.iter()
            .cloned()
            .map(|n| Arc::new(CachedNode::from(n)))
            .collect()
    });
    // Each Node once more: the shared strings are all interned already, so this is the
    // marginal cost of one more Node (resourceVersion bumps replace Nodes one by one too).
    let (again, again_bytes) = held(|| {
        raw.iter()
            .cloned()
            .map(|n| Arc::new(CachedNode::from(n)))
            .collect()
    });
    println!(
        "inline: Node {} B, CachedNode {} B",
        std::mem::size_of::<Node>(),
        std::mem::size_of::<CachedNode>()
    );
    for (what, bytes) in [
        ("whole Node", whole_bytes),
        ("trimmed Node", trimmed_bytes),
        ("CachedNode (with the interner)", cached_bytes),
        ("CachedNode (strings already interned)", again_bytes),
    ] {
        println!(
            "{NODES} Nodes as {what}: {bytes} B held, {} B per Node",
            bytes / NODES
        );
    }
    drop((trimmed, cached, again));
}
