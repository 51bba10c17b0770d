//! `kube-node simulate`: the real controllers, unchanged, against an embedded API server with
//! the simulated provider, driven by a scenario file.

mod runner;
mod scenario;

pub use runner::{Summary, simulate, simulate_scenario};
pub use scenario::{Expect, Scenario, Step};
