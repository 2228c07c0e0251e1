//! nftables reconciler.
//!
//! Berth owns exactly one table, `inet berth`, and nothing else: other tables
//! (the distribution's, Podman's, the operator's) are never read or changed.
//! The table is replaced atomically in a single `nft -f -` transaction, so
//! there is never a moment without Berth's rules.
//!
//! All base chains use `policy accept`: a bug here must never lock anyone
//! out of a server.
//!
//! Note on precedence: an `accept` in this table does NOT override a `drop`
//! in another table. Every base chain registered at a hook sees the packet
//! (in priority order) and the packet survives only if none of them drops it;
//! an accept merely ends the evaluation of *this* chain. If the host's own
//! firewall drops forwarded or incoming WireGuard traffic (e.g. an `inet
//! filter` forward chain with `policy drop`), the operator has to allow it
//! there too. Our chains run just before the standard filter priority, so
//! they are also the place for any drop Berth may add later.

use std::process::Stdio;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use tokio::{io::AsyncWriteExt, process::Command};

use crate::mesh::valid_interface_name;

/// What the firewall rules are built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirewallConfig {
    /// The mesh (WireGuard) interface, e.g. `berth0`.
    pub interface: String,
    /// WireGuard's UDP listen port.
    pub listen_port: u16,
    /// This node's container subnet.
    pub subnet: Ipv4Net,
    /// The pool of node mesh IPs (e.g. `10.100.0.0/16`).
    pub mesh_cidr: Ipv4Net,
    /// The pool every node's container subnet comes from.
    pub subnet_pool: Ipv4Net,
}

/// Name of Berth's table (family `inet`).
pub const TABLE: &str = "berth";

/// The full text of Berth's table `inet berth` (pure: no I/O).
pub fn ruleset(cfg: &FirewallConfig) -> String {
    let ifname = &cfg.interface;
    let port = cfg.listen_port;
    let subnet = cfg.subnet.trunc();
    let mesh = cfg.mesh_cidr.trunc();
    let pool = cfg.subnet_pool.trunc();
    format!(
        r#"table inet {TABLE} {{
	# Accepting here does not override a drop in another table: see the
	# firewall module of berth-agent. Policies are accept on purpose.
	chain input {{
		type filter hook input priority filter - 5; policy accept;
		udp dport {port} accept comment "berth: WireGuard mesh"
		iifname "{ifname}" ip saddr {mesh} accept comment "berth: node to node over the mesh"
	}}

	chain forward {{
		type filter hook forward priority filter - 5; policy accept;
		ct state established,related accept
		iifname "{ifname}" ip daddr {subnet} accept comment "berth: mesh to local containers"
		oifname "{ifname}" ip saddr {subnet} accept comment "berth: local containers to mesh"
	}}

	# Podman's bridge masquerades everything that leaves the subnet. Container
	# to container across the mesh keeps its source address: an identity SNAT
	# here, before Podman's rules (srcnat), binds the connection's NAT first,
	# and the kernel then skips the later masquerade.
	chain postrouting {{
		type nat hook postrouting priority srcnat - 5; policy accept;
		oifname "{ifname}" ip saddr {subnet} ip daddr {pool} snat ip to ip saddr comment "berth: container source kept across the mesh"
	}}
}}
"#
    )
}

/// The `nft -f -` script replacing the table in one transaction: create it
/// if missing (so the delete cannot fail), delete it, define it anew.
fn replace_script(cfg: &FirewallConfig) -> String {
    format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n{}", ruleset(cfg))
}

/// Installs Berth's table, replacing the previous version atomically, and
/// turns on IPv4 forwarding (per network namespace). Idempotent.
pub async fn apply(cfg: &FirewallConfig) -> anyhow::Result<()> {
    if !valid_interface_name(&cfg.interface) {
        bail!("invalid interface name {:?}", cfg.interface);
    }
    nft_script(&replace_script(cfg))
        .await
        .context("installing nftables table inet berth")?;
    enable_ip_forward()?;
    tracing::info!(
        interface = %cfg.interface,
        subnet = %cfg.subnet,
        listen_port = cfg.listen_port,
        "firewall applied"
    );
    Ok(())
}

/// Deletes Berth's table if it exists (and nothing else).
pub async fn remove() -> anyhow::Result<()> {
    nft_script(&format!("table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"))
        .await
        .context("removing nftables table inet berth")
}

/// Runs `nft -f -` with `script` on stdin: one atomic transaction.
async fn nft_script(script: &str) -> anyhow::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `nft` (is nftables installed?)")?;
    let mut stdin = child.stdin.take().context("nft stdin")?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Sets `net.ipv4.ip_forward=1` unless already set. The file is resolved in
/// the calling thread's network namespace.
fn enable_ip_forward() -> anyhow::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let current = std::fs::read_to_string(PATH).with_context(|| format!("reading {PATH}"))?;
    if current.trim() != "1" {
        std::fs::write(PATH, "1\n").with_context(|| format!("writing {PATH}"))?;
        tracing::info!("enabled IPv4 forwarding");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FirewallConfig {
        FirewallConfig {
            interface: "berth0".into(),
            listen_port: 51820,
            subnet: "10.200.3.0/24".parse().unwrap(),
            mesh_cidr: "10.100.0.0/16".parse().unwrap(),
            subnet_pool: "10.200.0.0/13".parse().unwrap(),
        }
    }

    #[test]
    fn ruleset_contains_the_rules() {
        let text = ruleset(&cfg());
        assert!(text.starts_with("table inet berth {"));
        for needle in [
            "chain input {",
            "type filter hook input priority filter - 5; policy accept;",
            "udp dport 51820 accept",
            "iifname \"berth0\" ip saddr 10.100.0.0/16 accept",
            "chain forward {",
            "type filter hook forward priority filter - 5; policy accept;",
            "ct state established,related accept",
            "iifname \"berth0\" ip daddr 10.200.3.0/24 accept",
            "oifname \"berth0\" ip saddr 10.200.3.0/24 accept",
            "type nat hook postrouting priority srcnat - 5; policy accept;",
            "oifname \"berth0\" ip saddr 10.200.3.0/24 ip daddr 10.200.0.0/13 snat ip to ip saddr",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(!text.contains("policy drop"));
        // Balanced braces: nft would reject the script otherwise.
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn ruleset_normalises_networks() {
        let mut cfg = cfg();
        cfg.subnet = "10.200.3.7/24".parse().unwrap();
        let text = ruleset(&cfg);
        assert!(text.contains("ip daddr 10.200.3.0/24"));
        assert!(!text.contains("10.200.3.7"));
    }

    #[test]
    fn replace_script_is_one_transaction_touching_only_our_table() {
        let script = replace_script(&cfg());
        let lines: Vec<&str> = script.lines().collect();
        assert_eq!(lines[0], "table inet berth {}");
        assert_eq!(lines[1], "delete table inet berth");
        assert_eq!(lines[2], "table inet berth {");
        for line in &lines {
            let line = line.trim_start();
            if line.starts_with("table") || line.starts_with("delete") {
                assert!(line.contains("inet berth"), "touches another table: {line}");
            }
        }
    }

    #[tokio::test]
    async fn apply_rejects_bad_interface_names() {
        let mut cfg = cfg();
        cfg.interface = "bad\"name".into();
        assert!(apply(&cfg).await.is_err());
    }
}
