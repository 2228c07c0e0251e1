//! Wire types shared by `berth-agent`, `berth-control-plane` and the `berth` CLI.
//!
//! Everything that crosses the network between an agent and the control plane
//! is defined here, so both ends agree on it by construction.

pub mod api;
pub mod keyfile;
pub mod names;
pub mod proxy;
pub mod seal;
pub mod service;
pub mod signing;
pub mod token;

pub use api::*;
