//! kube-node-embedded-api
