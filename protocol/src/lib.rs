//! Wire types shared by every Berth crate: whatever crosses the network is
//! defined here, so both ends agree on it by construction. Start with [`api`],
//! then [`service`], [`routes`], [`proxy`]; [`error`] is every failed call's body.

pub mod api;
pub mod build;
pub mod delta;
pub mod error;
pub mod event;
pub mod keyfile;
pub mod names;
pub mod prom;
pub mod proxy;
pub mod release;
pub mod routes;
pub mod seal;
pub mod service;
pub mod session;
pub mod signing;
pub mod stream;
pub mod time;
pub mod token;
pub mod user;

pub use api::*;
pub use error::{ApiError, ErrorCode, FieldError};
