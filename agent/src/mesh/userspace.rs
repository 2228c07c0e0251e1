//! Userspace backend: a separately running `wireguard-go` (see
//! [`super::wireguard_go`]), driven through its UAPI socket. Peers are added,
//! changed, removed and read with `defguard_wireguard_rs`'s
//! `WGApi<Userspace>` (which speaks the UAPI text protocol and, as long as
//! `create_interface` is not called, never starts its built-in boringtun
//! engine); the private key and listen port are set with our own UAPI client
//! ([`super::uapi`]), which leaves the peers alone.

use std::{io, path::Path};

use anyhow::{bail, Context};
use defguard_wireguard_rs::{error::WireguardInterfaceError, key::Key, Userspace, WGApi};

use super::{
    link_kind,
    uapi::{self, Probe},
    wireguard_go,
};

/// defguard's API on the UAPI socket of `ifname`. (`WGApi::new` only stores
/// the name: no boringtun engine is started.)
pub(super) fn api(ifname: String) -> Result<WGApi<Userspace>, WireguardInterfaceError> {
    WGApi::<Userspace>::new(ifname)
}

/// Adopts a live `wireguard-go` serving `ifname` (its UAPI socket answers
/// `get=1`): `Ok(true)`. A stale socket (nobody listening) is removed and
/// `Ok(false)` returned, as when there is none. A live daemon whose interface
/// is not in this network namespace is an error: the name is taken elsewhere
/// on the host.
pub(super) async fn adopt(ifname: &str) -> anyhow::Result<bool> {
    match uapi::probe(ifname).await? {
        Probe::Alive => {
            if link_kind(ifname).await?.is_none() {
                bail!(
                    "{} answers, but there is no interface {ifname} in this network \
                     namespace: the name is taken by a wireguard-go elsewhere on the host",
                    uapi::path(ifname).display()
                );
            }
            tracing::info!(interface = %ifname, "adopting running wireguard-go");
            Ok(true)
        }
        Probe::Stale => {
            tracing::warn!(interface = %ifname, "removing stale UAPI socket");
            match std::fs::remove_file(uapi::path(ifname)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err).context("removing stale UAPI socket"),
            }
            Ok(false)
        }
        Probe::Absent => Ok(false),
    }
}

/// Starts `binary <ifname>` and waits until its UAPI socket answers.
pub(super) async fn create(binary: &Path, ifname: &str) -> anyhow::Result<()> {
    wireguard_go::start(binary, ifname).await
}

/// Sets the private key and/or the listen port (only those given: sending
/// the same listen port again would make wireguard-go rebind its socket),
/// keeping every peer.
pub(super) async fn set_key_and_port(
    ifname: &str,
    private_key: Option<&Key>,
    listen_port: Option<u16>,
) -> anyhow::Result<()> {
    let mut body = String::new();
    if let Some(key) = private_key {
        body.push_str(&format!("private_key={}\n", key.to_lower_hex()));
    }
    if let Some(port) = listen_port {
        body.push_str(&format!("listen_port={port}\n"));
    }
    let ifname = ifname.to_owned();
    tokio::task::spawn_blocking(move || uapi::set(&ifname, &body))
        .await?
        .context("setting private key / listen port over UAPI")?;
    Ok(())
}

/// Stops the `wireguard-go` serving `ifname` and removes its UAPI socket
/// (its TUN device goes away with the process).
pub(super) async fn destroy(ifname: &str, binary: &Path) -> anyhow::Result<()> {
    if let Some(pid) = wireguard_go::find_pid(ifname, binary) {
        wireguard_go::stop(pid).await;
    }
    match std::fs::remove_file(uapi::path(ifname)) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).context("removing UAPI socket"),
    }
}
