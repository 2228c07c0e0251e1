//! The node bridge's MAC address, pinned to one derived from the gateway IP.
//!
//! A Linux bridge whose address was never set takes the lowest MAC of its
//! ports, and netavark before 1.9 (Debian 12 ships 1.4) leaves it so. Then a
//! container coming or going changes the gateway's MAC; when the old address
//! leaves with a removed container's port, the other containers' ARP entries
//! point nowhere and their packets are dropped until the entry expires (seen
//! in the lab as 5 s stalls during rollouts). An address set by hand sticks
//! for the bridge's life; netavark makes a new bridge only after the last
//! container left, so re-checking after each pass that creates any is enough.

use super::create_spec::mac_for;
use crate::mesh::ip;
use anyhow::Context;
use std::net::Ipv4Addr;

/// Gives `bridge` the MAC of `gateway` unless it has it. `Ok(false)` when
/// there is no such bridge (yet: netavark makes it with the first container).
pub async fn pin_mac(bridge: &str, gateway: Ipv4Addr) -> anyhow::Result<bool> {
    let want = mac_for(gateway);
    // All links rather than `dev BRIDGE`, whose absence is only told in prose.
    let links = ip(&["-j", "link", "show"]).await?;
    let links: serde_json::Value = serde_json::from_str(&links).context("parsing `ip -j link show`")?;
    let Some(link) = links
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["ifname"].as_str() == Some(bridge))
    else {
        return Ok(false);
    };
    let have = link["address"].as_str().unwrap_or_default().to_ascii_lowercase();
    if have != want {
        ip(&["link", "set", "dev", bridge, "address", &want]).await?;
        tracing::info!(%bridge, from = %have, to = %want, "pinned the bridge's MAC address");
    }
    Ok(true)
}
