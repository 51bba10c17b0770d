//! kube-node-provider-simulated
