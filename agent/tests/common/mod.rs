//! Helpers shared by the agent's integration tests: [`podman`], a private
//! Podman service per test, and [`netns`], network namespaces with
//! `wireguard-go` for the mesh and firewall tests.
//!
//! Every test binary compiles this module on its own and uses a part of it.
#![allow(dead_code)]

pub mod netns;
pub mod podman;
