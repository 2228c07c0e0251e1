//! The `berth` command: the admin CLI of a Berth control plane. Start at
//! [`commands::run`]; [`args`] defines the command line, [`output`] prints
//! tables, [`release`] signs agent builds offline. `berth lab` runs the
//! separate `berth-lab` binary (crate `lab/`).

pub mod args;
pub mod commands;
pub mod context;
pub mod output;
pub mod release;
