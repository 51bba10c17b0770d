//! node-controller
