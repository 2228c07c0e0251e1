//! Network plumbing of a local lab: network namespaces, a bridge and veth
//! pairs, built with `ip` and `sysctl`.
//!
//! Lab `k` uses the underlay 198.18.k.0/24 (inside 198.18.0.0/15, reserved for
//! network tests):
//!
//! * namespace `bl<k>-br` holds the bridge `br0`;
//! * host link `bl<k>-host` (root namespace, 198.18.k.1/24) is a veth whose
//!   peer `host` is a port of `br0`; IPv4 forwarding is off on it and IPv6
//!   disabled, and no route other than the connected /24 points into the lab;
//! * node `i` lives in namespace `bl<k>-n<i>` with `eth0` = 198.18.k.(10+i)/24
//!   (no default route) and `net.ipv4.ip_forward=1`; its veth peer `n<i>` is a
//!   port of `br0`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::process;

/// Highest node index `add_node` accepts (addresses end at 198.18.k.210).
pub const MAX_NODES: u16 = 200;
/// Name of the bridge inside the bridge namespace.
pub const BRIDGE: &str = "br0";
/// Name of the bridge port that is the peer of the host link.
const HOST_PORT: &str = "host";
/// Grace period between SIGTERM and SIGKILL for processes in lab namespaces.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The network of lab `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabNet {
    pub id: u8,
}

impl LabNet {
    /// The host end of the lab: 198.18.k.1.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.id, 1)
    }

    /// The underlay address of node `i`: 198.18.k.(10+i).
    ///
    /// # Panics
    /// If `i > 245` (the address would leave the /24); `add_node` only accepts
    /// `1..=MAX_NODES`.
    pub fn node_ip(&self, i: u16) -> Ipv4Addr {
        let last =
            u8::try_from(10 + u32::from(i)).unwrap_or_else(|_| panic!("node index {i} out of range (max {MAX_NODES})"));
        Ipv4Addr::new(198, 18, self.id, last)
    }

    /// The underlay prefix length (the lab is a /24).
    pub fn prefix_len(&self) -> u8 {
        24
    }

    /// `bl<k>-br`
    pub fn bridge_ns(&self) -> String {
        format!("bl{}-br", self.id)
    }

    /// `bl<k>-n<i>`
    pub fn node_ns(&self, i: u16) -> String {
        format!("bl{}-n{i}", self.id)
    }

    /// `bl<k>-host`
    pub fn host_link(&self) -> String {
        format!("bl{}-host", self.id)
    }

    /// Prefix shared by every namespace of this lab: `bl<k>-`.
    pub fn ns_prefix(&self) -> String {
        format!("bl{}-", self.id)
    }

    /// Name of node `i`'s veth end in the bridge namespace.
    fn node_port(i: u16) -> String {
        format!("n{i}")
    }

    /// Creates the bridge namespace with `br0` and the host link. Fails if any
    /// part of lab `k` already exists. On failure, whatever was created is
    /// removed again.
    pub fn create_base(&self) -> Result<()> {
        if self.exists() {
            bail!(
                "lab {} already exists (namespace {} or link {} or other {}* namespaces present); destroy it first",
                self.id,
                self.bridge_ns(),
                self.host_link(),
                self.ns_prefix()
            );
        }
        self.try_create_base().map_err(|e| {
            let _ = self.destroy();
            e.context(format!("creating the network of lab {}", self.id))
        })
    }

    fn try_create_base(&self) -> Result<()> {
        let br = self.bridge_ns();
        let host = self.host_link();
        let addr = format!("{}/{}", self.host_ip(), self.prefix_len());
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&["-n", &br, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", BRIDGE, "up"])?;
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", HOST_PORT, "netns", &br,
        ])?;
        ip(&["-n", &br, "link", "set", HOST_PORT, "master", BRIDGE, "up"])?;
        // The host end only terminates traffic for the control plane: never
        // forward what arrives on it, and keep IPv6 (RA, SLAAC) out of it.
        sysctl(None, &format!("net.ipv4.conf.{host}.forwarding"), "0")?;
        sysctl(None, &format!("net.ipv6.conf.{host}.disable_ipv6"), "1")?;
        ip(&["addr", "add", &addr, "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        Ok(())
    }

    /// Adds node `i` (1..=MAX_NODES): its namespace, `lo` up, `eth0` with
    /// 198.18.k.(10+i)/24 attached to the bridge, IPv4 forwarding on. Fails if
    /// the lab's bridge namespace is missing or the node already exists. On
    /// failure, whatever was created is removed again.
    pub fn add_node(&self, i: u16) -> Result<()> {
        if !(1..=MAX_NODES).contains(&i) {
            bail!("node index {i} out of range 1..={MAX_NODES}");
        }
        let nss = netns_list()?;
        if !nss.contains(&self.bridge_ns()) {
            bail!(
                "lab {} has no bridge namespace {}; create the lab first",
                self.id,
                self.bridge_ns()
            );
        }
        if nss.contains(&self.node_ns(i)) {
            bail!(
                "node {i} of lab {} already exists (namespace {})",
                self.id,
                self.node_ns(i)
            );
        }
        self.try_add_node(i).map_err(|e| {
            let _ = self.delete_node_port(i);
            let _ = ip(&["netns", "del", &self.node_ns(i)]);
            e.context(format!("adding node {i} to lab {}", self.id))
        })
    }

    fn try_add_node(&self, i: u16) -> Result<()> {
        let br = self.bridge_ns();
        let ns = self.node_ns(i);
        let port = Self::node_port(i);
        let addr = format!("{}/{}", self.node_ip(i), self.prefix_len());
        // A port left over from a node namespace deleted behind our back
        // (namespace teardown is asynchronous) would block the name.
        self.delete_node_port(i)?;
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", &br, "link", "set", &port, "master", BRIDGE, "up"])?;
        ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        sysctl(Some(&ns), "net.ipv4.ip_forward", "1")?;
        Ok(())
    }

    /// Deletes node `i`'s port in the bridge namespace if it is there.
    fn delete_node_port(&self, i: u16) -> Result<()> {
        let br = self.bridge_ns();
        let port = Self::node_port(i);
        if ip(&["-n", &br, "link", "show", "dev", &port]).is_ok() {
            ip(&["-n", &br, "link", "del", "dev", &port])?;
        }
        Ok(())
    }

    /// Kills every process in node `i`'s namespace (SIGTERM, then SIGKILL),
    /// removes its bridge port and deletes the namespace. Fails if the node
    /// does not exist; otherwise continues past errors and returns the first.
    pub fn remove_node(&self, i: u16) -> Result<()> {
        let ns = self.node_ns(i);
        if !netns_list()?.contains(&ns) {
            bail!("node {i} of lab {} does not exist (no namespace {ns})", self.id);
        }
        let mut first = FirstError::default();
        first.note(kill_ns_processes(std::slice::from_ref(&ns)));
        first.note(self.delete_node_port(i));
        first.note(ip(&["netns", "del", &ns]).map(drop));
        first.into_result()
    }

    /// True if node `i`'s namespace exists.
    pub fn node_exists(&self, i: u16) -> bool {
        netns_list().map(|l| l.contains(&self.node_ns(i))).unwrap_or(false)
    }

    /// Indices of the nodes whose namespaces exist, ascending.
    pub fn nodes(&self) -> Vec<u16> {
        let prefix = format!("{}n", self.ns_prefix());
        let mut v: Vec<u16> = netns_list()
            .unwrap_or_default()
            .iter()
            .filter_map(|n| {
                let i: u16 = n.strip_prefix(&prefix)?.parse().ok()?;
                (self.node_ns(i) == *n).then_some(i)
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Removes everything of lab `k`: kills the processes of all `bl<k>-*`
    /// namespaces (SIGTERM, then SIGKILL), deletes those namespaces and the
    /// host link. Best effort: continues past errors and returns the first.
    /// Succeeds on a lab that does not exist.
    pub fn destroy(&self) -> Result<()> {
        let mut first = FirstError::default();
        let prefix = self.ns_prefix();
        let nss: Vec<String> = match netns_list() {
            Ok(l) => l.into_iter().filter(|n| n.starts_with(&prefix)).collect(),
            Err(e) => {
                first.note(Err(e));
                Vec::new()
            }
        };
        first.note(kill_ns_processes(&nss));
        for ns in &nss {
            first.note(ip(&["netns", "del", ns]).map(drop));
        }
        let host = self.host_link();
        if link_exists(&host) {
            first.note(ip(&["link", "del", "dev", &host]).map(drop));
        }
        first.into_result()
    }

    /// True if any part of lab `k` exists: a `bl<k>-*` namespace or the host
    /// link.
    pub fn exists(&self) -> bool {
        let prefix = self.ns_prefix();
        netns_list().unwrap_or_default().iter().any(|n| n.starts_with(&prefix)) || link_exists(&self.host_link())
    }
}

/// Lists lab ids that currently exist (any `bl<k>-*` namespace or `bl<k>-host`
/// link), ascending.
pub fn existing_labs() -> Vec<u8> {
    let mut ids = BTreeSet::new();
    for ns in netns_list().unwrap_or_default() {
        ids.extend(lab_id_of(&ns));
    }
    for link in root_links().unwrap_or_default() {
        if link.ends_with("-host") {
            ids.extend(lab_id_of(&link));
        }
    }
    ids.into_iter().collect()
}

/// `k` from a name `bl<k>-...` (canonical decimal only, so that it matches
/// what `LabNet { id: k }` would name).
fn lab_id_of(name: &str) -> Option<u8> {
    let (digits, rest) = name.strip_prefix("bl")?.split_once('-')?;
    let id: u8 = digits.parse().ok()?;
    (id.to_string() == digits && !rest.is_empty()).then_some(id)
}

/// Collects the first error of a best-effort sequence.
#[derive(Default)]
struct FirstError(Option<anyhow::Error>);

impl FirstError {
    fn note(&mut self, r: Result<()>) {
        if let Err(e) = r {
            self.0.get_or_insert(e);
        }
    }
    fn into_result(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// Runs `program args`; on failure the error names the command line and
/// carries its stderr. Returns stdout.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let line = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        return Err(anyhow!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// `sysctl -w key=value`, in the root namespace or inside `netns`.
fn sysctl(netns: Option<&str>, key: &str, value: &str) -> Result<()> {
    let kv = format!("{key}={value}");
    match netns {
        None => run("sysctl", &["-q", "-w", &kv]),
        Some(ns) => ip(&["netns", "exec", ns, "sysctl", "-q", "-w", &kv]),
    }
    .map(drop)
}

/// Names of all named network namespaces (`ip netns list`).
pub fn netns_list() -> Result<Vec<String>> {
    // Lines look like "bl7-br (id: 0)" or "bl7-n1".
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

/// Names of all links in the root namespace.
fn root_links() -> Result<Vec<String>> {
    // Lines look like "5: bl7-host@if3: <BROADCAST,...".
    Ok(ip(&["-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .collect())
}

pub fn link_exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).is_ok()
}

/// Pids of the processes in namespace `ns` (`ip netns pids`), without our own.
pub fn ns_pids(ns: &str) -> Result<Vec<u32>> {
    let me = std::process::id();
    Ok(ip(&["netns", "pids", ns])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|&p| p != me)
        .collect())
}

/// Pids of the processes in namespace `ns` that run `program` (by comm).
pub fn ns_program_pids(ns: &str, program: &str) -> Result<Vec<u32>> {
    Ok(ns_pids(ns)?
        .into_iter()
        .filter(|&p| process::comm(p).as_deref() == Some(program))
        .collect())
}

/// Stops every process in the namespaces `nss`: SIGTERM, `STOP_GRACE`, then
/// SIGKILL; repeated a few times for processes that appear meanwhile (forks).
fn kill_ns_processes(nss: &[String]) -> Result<()> {
    let mut first = FirstError::default();
    for round in 0..5 {
        let mut pids = Vec::new();
        for ns in nss {
            match ns_pids(ns) {
                Ok(p) => pids.extend(p),
                Err(e) => first.note(Err(e)),
            }
        }
        pids.retain(|&p| process::is_alive(p));
        if pids.is_empty() {
            return first.into_result();
        }
        let grace = if round == 0 { STOP_GRACE } else { Duration::ZERO };
        first.note(process::stop_all(&pids, grace));
    }
    first.note(Err(anyhow!(
        "processes keep appearing in namespaces {}",
        nss.join(", ")
    )));
    first.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let lab = LabNet { id: 7 };
        assert_eq!(lab.host_ip(), Ipv4Addr::new(198, 18, 7, 1));
        assert_eq!(lab.node_ip(1), Ipv4Addr::new(198, 18, 7, 11));
        assert_eq!(lab.node_ip(MAX_NODES), Ipv4Addr::new(198, 18, 7, 210));
        assert_eq!(lab.node_ip(245), Ipv4Addr::new(198, 18, 7, 255));
        assert_eq!(lab.bridge_ns(), "bl7-br");
        assert_eq!(lab.node_ns(3), "bl7-n3");
        assert_eq!(lab.host_link(), "bl7-host");
        let max = LabNet { id: 255 };
        assert!(max.host_link().len() <= 15, "IFNAMSIZ");
        assert_eq!(lab_id_of("bl7-br"), Some(7));
        assert_eq!(lab_id_of("bl255-n200"), Some(255));
        assert_eq!(lab_id_of("bl250-host"), Some(250));
        assert_eq!(lab_id_of("bl07-br"), None);
        assert_eq!(lab_id_of("bl256-br"), None);
        assert_eq!(lab_id_of("bl7"), None);
        assert_eq!(lab_id_of("blx-br"), None);
        assert_eq!(lab_id_of("other"), None);
    }
}
