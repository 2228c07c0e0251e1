//! berth-agent: the per-node daemon, one module per concern. Start reading at
//! `main.rs` (flags, startup from the cached state, the long-poll loop), then
//! [`reconcile`], which applies a desired state through each reconciler in turn:
//! [`mesh`], [`firewall`], [`dns`], [`containers`] (on [`podman`]) and [`proxy`].

pub mod build;
pub mod client;
pub mod containers;
pub mod dns;
pub mod firewall;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod podman;
pub mod proxy;
pub mod reconcile;
pub mod registry;
pub mod streams;
pub mod upgrade;
pub mod usage;

/// This build's version: `BERTH_VERSION` at build time (release builds), else the crate version.
pub const VERSION: &str = match option_env!("BERTH_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
