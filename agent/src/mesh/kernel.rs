//! Kernel backend: the `wireguard` module, driven over netlink through
//! `defguard_wireguard_rs` (`WGApi<Kernel>`).

use std::{net::IpAddr, path::Path};

use anyhow::Context;
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use defguard_wireguard_rs::{
    error::WireguardInterfaceError, key::Key, net::IpAddrMask, peer::Peer as WgPeer, InterfaceConfiguration, Kernel,
    WGApi, WireguardInterfaceApi,
};
use ipnet::Ipv4Net;

use super::ip;

/// defguard's API on the kernel link `ifname`. (`WGApi::new` only stores
/// the name: no interface is created.)
pub(super) fn api(ifname: String) -> Result<WGApi<Kernel>, WireguardInterfaceError> {
    WGApi::<Kernel>::new(ifname)
}

/// Creates a kernel WireGuard link `ifname`. `Ok(false)` when the kernel has
/// no WireGuard (the caller falls back to userspace); an error when the
/// module is loaded but the link cannot be made.
pub(super) async fn create(ifname: &str) -> anyhow::Result<bool> {
    if Path::new("/sys/module/wireguard").is_dir() {
        let name = ifname.to_owned();
        tokio::task::spawn_blocking(move || api(name)?.create_interface())
            .await?
            .context("creating kernel WireGuard interface")?;
        return Ok(true);
    }
    // The module may not be loaded yet: creating a link autoloads it.
    Ok(ip(&["link", "add", "dev", ifname, "type", "wireguard"]).await.is_ok())
}

/// Sets private key and listen port. defguard's netlink `set_host` always
/// sets the "replace peers" flag, then re-adds the peers it is given: pass
/// the current ones (`peers`) so none is lost. This only runs when the key or
/// the port actually changes (first start or a new identity), which
/// interrupts the tunnel anyway.
pub(super) async fn set_key_and_port(
    ifname: &str,
    private_key: &Key,
    address: Ipv4Net,
    listen_port: u16,
    peers: Vec<WgPeer>,
) -> anyhow::Result<()> {
    let config = InterfaceConfiguration {
        name: ifname.to_owned(),
        prvkey: BASE64.encode(private_key.as_slice()),
        addresses: vec![IpAddrMask::new(IpAddr::V4(address.addr()), address.prefix_len())],
        port: listen_port,
        peers,
        mtu: None,
        fwmark: None,
    };
    let name = ifname.to_owned();
    tokio::task::spawn_blocking(move || api(name)?.configure_interface(&config))
        .await?
        .context("configuring kernel WireGuard interface")?;
    Ok(())
}
