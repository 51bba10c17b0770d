//! `kube-node.io/v1alpha1`: NodeClass (how to make a machine) and NodeSet (how many).

mod common;
mod nodeclass;
mod nodeset;

pub use common::*;
pub use nodeclass::*;
pub use nodeset::*;
