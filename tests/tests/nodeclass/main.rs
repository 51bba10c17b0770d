//! The node-controller and its NodeClasses, on the shared harness with the node-controller
//! alone (no NodeSet plays a part): in-use protection of a NodeClass being deleted, bootstrap
//! tokens across a restart, and labels and taints removed from a class.

mod class_meta;
mod common;
mod in_use;
mod tokens;
