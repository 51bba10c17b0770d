//! nodeset-controller
