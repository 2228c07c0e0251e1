//! Containers: what the node runs through Podman.

pub mod diff;
