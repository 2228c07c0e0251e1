//! berth-agent: the per-node daemon, one module per concern.

pub mod client;
pub mod containers;
pub mod dns;
pub mod firewall;
pub mod identity;
pub mod mesh;
pub mod podman;
pub mod proxy;
pub mod reconcile;
pub mod records;
