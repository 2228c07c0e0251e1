//! The `berth` command: the admin CLI of a Berth control plane and the
//! local lab cluster.

pub mod client;
pub mod lab;
pub mod release;
