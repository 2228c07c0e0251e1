//! WireGuard mesh reconciler.
//!
//! One WireGuard interface per node carries the whole mesh. [`Mesh::ensure_up`]
//! brings it up (or adopts the one that is already running) and
//! [`Mesh::apply`] diffs the desired peers against the interface's current
//! peers ([`diff_peers`]) and changes only the difference, in place: the
//! tunnel is never torn down and peers that did not change are never touched,
//! so adding or removing a node does not interrupt traffic to the others.
//!
//! Two backends, one file each, behind [`Backend`]:
//!
//! * **Kernel** WireGuard (`kernel.rs`), driven over netlink through
//!   `defguard_wireguard_rs` (`WGApi<Kernel>`), when the module is available.
//! * **Userspace** `wireguard-go` (`userspace.rs`), started as its own daemon
//!   ([`wireguard_go`]: own process group, reparented to init), so it
//!   outlives the agent — a restart, crash or SIGKILL of the agent never
//!   drops the tunnel. It is driven through its UAPI socket
//!   `/var/run/wireguard/<if>.sock`: peers with `defguard_wireguard_rs`'s
//!   `WGApi<Userspace>`, the private key and listen port with a small UAPI
//!   client of our own ([`uapi`]), because defguard's `configure_interface`
//!   always sends `replace_peers=true`.
//!
//! The UAPI socket path is global (not per network namespace), so interface
//! names must be unique on the host.

mod diff;
mod kernel;
pub mod uapi;
mod userspace;
pub mod wireguard_go;

pub use diff::{diff_peers, CurrentPeer, DesiredPeer, PeerDiff};

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, process::Stdio, time::SystemTime};

use anyhow::{anyhow, bail, Context};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use defguard_wireguard_rs::{
    error::WireguardInterfaceError, host::Host, key::Key, net::IpAddrMask, peer::Peer as WgPeer, WireguardInterfaceApi,
};
use ipnet::Ipv4Net;
use tokio::process::Command;

use diff::{current_peer, to_ipnet};

/// Persistent keepalive for every mesh peer, in seconds.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

/// Configuration of this node's mesh interface.
#[derive(Clone)]
pub struct MeshConfig {
    /// Interface name, e.g. `berth0`. Must be unique on the host (the UAPI
    /// socket path is global, not per network namespace).
    pub interface: String,
    /// UDP port WireGuard listens on. `0` keeps whatever the interface has.
    pub listen_port: u16,
    /// WireGuard private key, base64.
    pub private_key: String,
    /// This node's mesh IP with the prefix of the whole mesh pool, e.g.
    /// `10.100.0.5/16`: the connected route covers every node's mesh IP.
    pub address: Ipv4Net,
    /// The pool the nodes' container subnets come from (e.g. `10.200.0.0/16`),
    /// routed into the interface; this node's own, more specific subnet stays
    /// on its local bridge.
    pub subnet_pool: Ipv4Net,
    /// `wireguard-go` binary, used when there is no kernel module.
    pub wireguard_go: PathBuf,
}

// Manual `Debug` so the private key never ends up in a log.
impl std::fmt::Debug for MeshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConfig")
            .field("interface", &self.interface)
            .field("listen_port", &self.listen_port)
            .field("address", &self.address)
            .field("subnet_pool", &self.subnet_pool)
            .field("wireguard_go", &self.wireguard_go)
            .finish_non_exhaustive()
    }
}

/// Which WireGuard implementation drives the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel module, over netlink.
    Kernel,
    /// A separately running `wireguard-go`, over its UAPI socket.
    Userspace,
}

/// Handle on the running mesh interface. Dropping it leaves the interface
/// (and `wireguard-go`) running; only [`Mesh::destroy`] removes it.
#[derive(Debug)]
pub struct Mesh {
    interface: String,
    backend: Backend,
    public_key: Key,
    wireguard_go: PathBuf,
    /// Serialises `apply` calls: a diff is only valid until the next change.
    apply_lock: tokio::sync::Mutex<()>,
}

/// Whether `name` is usable as a Linux interface name (and is safe to put in
/// a socket path or an nftables rule): 1 to 15 of `[A-Za-z0-9_.-]`, not `.`
/// or `..`.
pub fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Mesh {
    /// Brings the interface up, or adopts it when it is already running;
    /// idempotent, and never tears down an existing interface or its peers.
    ///
    /// 1. A live `wireguard-go` (its UAPI socket answers `get=1`) is adopted;
    ///    a stale socket (nobody listening) is removed.
    /// 2. An existing kernel WireGuard link is adopted.
    /// 3. Otherwise a kernel link is created when the module is available,
    ///    else `wireguard-go <if>` is started in its own process group.
    ///
    /// Then the private key and listen port are set if they differ (peers are
    /// kept), the address is assigned (other IPv4 addresses on the interface
    /// are removed), the link is set up and the subnet pool is routed into it.
    pub async fn ensure_up(cfg: MeshConfig) -> anyhow::Result<Mesh> {
        let ifname = cfg.interface.clone();
        if !valid_interface_name(&ifname) {
            bail!("invalid interface name {ifname:?}");
        }
        let private_key = Key::try_from(cfg.private_key.trim()).map_err(|_| anyhow!("invalid private key"))?;

        let backend = Self::bring_up(&cfg).await?;
        let mesh = Mesh {
            interface: ifname.clone(),
            backend,
            public_key: private_key.public_key(),
            wireguard_go: cfg.wireguard_go.clone(),
            apply_lock: tokio::sync::Mutex::new(()),
        };

        mesh.set_key_and_port(&private_key, &cfg).await?;

        // Stale addresses go first: deleting a primary address also deletes
        // the secondaries in its subnet, which could include ours.
        mesh.remove_other_addresses(cfg.address).await?;
        let address = cfg.address.to_string();
        ip(&["addr", "replace", &address, "dev", &ifname]).await?;
        ip(&["link", "set", "dev", &ifname, "up"]).await?;
        ip(&["route", "replace", &cfg.subnet_pool.trunc().to_string(), "dev", &ifname]).await?;

        tracing::info!(
            interface = %ifname,
            backend = ?backend,
            address = %cfg.address,
            listen_port = cfg.listen_port,
            "mesh interface up"
        );
        Ok(mesh)
    }

    /// Decides the backend, adopting or creating the interface.
    async fn bring_up(cfg: &MeshConfig) -> anyhow::Result<Backend> {
        let ifname = &cfg.interface;
        if userspace::adopt(ifname).await? {
            return Ok(Backend::Userspace);
        }

        match link_kind(ifname).await?.as_deref() {
            Some("wireguard") => {
                tracing::info!(interface = %ifname, "adopting kernel WireGuard interface");
                return Ok(Backend::Kernel);
            }
            Some(kind) => bail!(
                "interface {ifname} exists but is not a running WireGuard interface \
                 (kind {kind:?}, no live UAPI socket)"
            ),
            None => {}
        }

        if kernel::create(ifname).await? {
            return Ok(Backend::Kernel);
        }
        userspace::create(&cfg.wireguard_go, ifname).await?;
        Ok(Backend::Userspace)
    }

    /// Sets private key and listen port when they differ from the running
    /// ones, keeping every peer. (Sending the same listen port to
    /// wireguard-go would rebind its socket, so unchanged values are not sent.)
    async fn set_key_and_port(&self, private_key: &Key, cfg: &MeshConfig) -> anyhow::Result<()> {
        let host = self.read_host().await?;
        let key_differs = host.private_key.as_ref().map(Key::as_array) != Some(private_key.as_array());
        let port_differs = cfg.listen_port != 0 && host.listen_port != cfg.listen_port;
        if !key_differs && !port_differs {
            return Ok(());
        }
        tracing::info!(
            interface = %self.interface,
            key_changed = key_differs,
            port_changed = port_differs,
            "setting WireGuard private key / listen port"
        );
        match self.backend {
            Backend::Userspace => {
                userspace::set_key_and_port(
                    &self.interface,
                    key_differs.then_some(private_key),
                    port_differs.then_some(cfg.listen_port),
                )
                .await
            }
            Backend::Kernel => {
                let port = if cfg.listen_port == 0 {
                    host.listen_port
                } else {
                    cfg.listen_port
                };
                let peers = host.peers.into_values().collect();
                kernel::set_key_and_port(&self.interface, private_key, cfg.address, port, peers).await
            }
        }
    }

    /// Removes IPv4 addresses other than `keep` from the interface (left over
    /// from an earlier mesh address).
    async fn remove_other_addresses(&self, keep: Ipv4Net) -> anyhow::Result<()> {
        let out = ip(&["-j", "-4", "addr", "show", "dev", &self.interface]).await?;
        let links: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j addr show`")?;
        let infos = links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|link| link.get("addr_info")?.as_array())
            .flatten();
        for info in infos {
            let (Some(local), Some(prefix)) = (
                info.get("local").and_then(|v| v.as_str()),
                info.get("prefixlen").and_then(|v| v.as_u64()),
            ) else {
                continue;
            };
            let addr = format!("{local}/{prefix}");
            if addr != keep.to_string() {
                tracing::info!(interface = %self.interface, %addr, "removing stale address");
                ip(&["addr", "del", &addr, "dev", &self.interface]).await?;
            }
        }
        Ok(())
    }

    /// Applies the desired peers in place: only the difference is changed
    /// (removals first, then updates, then additions). Allowed IPs of a peer
    /// are its mesh IP /32 and its container subnet; keepalive 25 s; peers
    /// without an endpoint get none set. Peers with an unusable key or subnet
    /// are skipped with a warning, and so is this node's own key.
    pub async fn apply(&self, peers: &[berth_protocol::Peer]) -> anyhow::Result<PeerDiff> {
        let _guard = self.apply_lock.lock().await;

        let mut wanted: BTreeMap<String, WgPeer> = BTreeMap::new();
        for peer in peers {
            match desired_wg_peer(peer) {
                Ok(wg) if wg.public_key == self.public_key => {
                    tracing::debug!(node = %peer.name, "skipping this node's own key");
                }
                Ok(wg) => {
                    let key = BASE64.encode(wg.public_key.as_slice());
                    if wanted.insert(key, wg).is_some() {
                        tracing::warn!(node = %peer.name, "duplicate peer public key");
                    }
                }
                Err(err) => {
                    tracing::warn!(node = %peer.name, error = %err, "skipping unusable peer");
                }
            }
        }
        let desired: Vec<DesiredPeer> = wanted
            .iter()
            .map(|(key, wg)| DesiredPeer {
                public_key: key.clone(),
                endpoint: wg.endpoint,
                allowed_ips: wg.allowed_ips.iter().filter_map(to_ipnet).collect(),
                persistent_keepalive: wg.persistent_keepalive_interval,
            })
            .collect();

        let host = self.read_host().await?;
        let current: Vec<CurrentPeer> = host.peers.values().map(current_peer).collect();
        let diff = diff_peers(&current, &desired);
        if diff.is_empty() {
            return Ok(diff);
        }

        let to_remove: Vec<Key> = diff
            .remove
            .iter()
            .filter_map(|key| host.peers.keys().find(|k| BASE64.encode(k.as_slice()) == *key))
            .cloned()
            .collect();
        let to_configure: Vec<WgPeer> = diff
            .update
            .iter()
            .chain(&diff.add)
            .filter_map(|key| wanted.get(key).cloned())
            .collect();
        self.with_api(move |api| {
            for key in &to_remove {
                api.remove_peer(key)?;
            }
            for peer in &to_configure {
                api.configure_peer(peer)?;
            }
            Ok(())
        })
        .await
        .context("applying WireGuard peer changes")?;

        tracing::info!(
            interface = %self.interface,
            added = diff.add.len(),
            updated = diff.update.len(),
            removed = diff.remove.len(),
            "mesh peers applied"
        );
        Ok(diff)
    }

    /// Handshake age and traffic counters of every peer on the interface.
    pub async fn status(&self) -> anyhow::Result<Vec<berth_protocol::PeerStatus>> {
        let host = self.read_host().await?;
        let now = SystemTime::now();
        let mut status: Vec<berth_protocol::PeerStatus> = host
            .peers
            .values()
            .map(|peer| berth_protocol::PeerStatus {
                wg_public_key: BASE64.encode(peer.public_key.as_slice()),
                handshake_age_secs: handshake_age(peer.last_handshake, now),
                rx_bytes: peer.rx_bytes,
                tx_bytes: peer.tx_bytes,
            })
            .collect();
        status.sort_by(|a, b| a.wg_public_key.cmp(&b.wg_public_key));
        Ok(status)
    }

    /// Removes the interface and stops `wireguard-go` (tests and uninstall
    /// only: the agent itself never tears the mesh down).
    pub async fn destroy(self) -> anyhow::Result<()> {
        let ifname = self.interface.clone();
        if self.backend == Backend::Userspace {
            userspace::destroy(&ifname, &self.wireguard_go).await?;
        }
        // wireguard-go's TUN device goes away with the process; a kernel link
        // has to be deleted.
        if link_kind(&ifname).await?.is_some() {
            ip(&["link", "del", "dev", &ifname]).await?;
        }
        tracing::info!(interface = %ifname, "mesh interface destroyed");
        Ok(())
    }

    /// Which implementation drives the interface.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// This node's WireGuard public key, base64.
    pub fn public_key(&self) -> String {
        BASE64.encode(self.public_key.as_slice())
    }

    /// PID of the `wireguard-go` daemon serving the interface, if any.
    pub fn wireguard_go_pid(&self) -> Option<u32> {
        match self.backend {
            Backend::Userspace => wireguard_go::find_pid(&self.interface, &self.wireguard_go),
            Backend::Kernel => None,
        }
    }

    async fn read_host(&self) -> anyhow::Result<Host> {
        self.with_api(|api| api.read_interface_data())
            .await
            .with_context(|| format!("reading WireGuard interface {}", self.interface))
    }

    /// Runs `f` with the backend's defguard API on the blocking pool (the
    /// defguard API is blocking).
    async fn with_api<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn WireguardInterfaceApi) -> Result<T, WireguardInterfaceError> + Send + 'static,
    {
        let ifname = self.interface.clone();
        let backend = self.backend;
        let result = tokio::task::spawn_blocking(move || match backend {
            Backend::Kernel => f(&kernel::api(ifname)?),
            Backend::Userspace => f(&userspace::api(ifname)?),
        })
        .await?;
        Ok(result?)
    }
}

/// The defguard peer for a protocol peer: mesh IP /32 + container subnet,
/// keepalive, endpoint only when known.
fn desired_wg_peer(peer: &berth_protocol::Peer) -> anyhow::Result<WgPeer> {
    let key = Key::try_from(peer.wg_public_key.trim())
        .map_err(|_| anyhow!("invalid WireGuard public key {:?}", peer.wg_public_key))?;
    let mut allowed_ips = vec![IpAddrMask::new(IpAddr::V4(peer.mesh_ip), 32)];
    let subnet = peer.subnet.trim();
    if !subnet.is_empty() {
        let net: Ipv4Net = subnet.parse().with_context(|| format!("invalid subnet {subnet:?}"))?;
        let net = net.trunc();
        allowed_ips.push(IpAddrMask::new(IpAddr::V4(net.addr()), net.prefix_len()));
    }
    let mut wg = WgPeer::new(key);
    wg.endpoint = peer.endpoint;
    wg.persistent_keepalive_interval = Some(PERSISTENT_KEEPALIVE);
    wg.allowed_ips = allowed_ips;
    Ok(wg)
}

/// Seconds since the last handshake. The UAPI reports "never" as time 0,
/// which defguard turns into the Unix epoch: that is `None` here.
fn handshake_age(last: Option<SystemTime>, now: SystemTime) -> Option<u64> {
    let last = last.filter(|&t| t > SystemTime::UNIX_EPOCH)?;
    Some(now.duration_since(last).map(|d| d.as_secs()).unwrap_or(0))
}

/// Heartbeats carry peer state at least this often (a minute at the
/// default 10 s heartbeat), so a restarted control plane soon shows it.
pub const PEERS_EVERY: u64 = 6;

/// Decides which heartbeats carry peer state (`peers_up`, `peers_down`):
/// the ones where the up count or the set of down peers changed since the
/// last sent, and every [`PEERS_EVERY`]-th. A down peer's age growing is
/// no change: the control plane ages it itself.
#[derive(Default)]
pub struct PeerStateReports {
    heartbeats: u64,
    last_sent: Option<(u32, Vec<String>)>,
}

impl PeerStateReports {
    /// For the next heartbeat, from the peers' status: the up count and the
    /// down peers to send, or None to send no peer state.
    pub fn next(&mut self, status: &[berth_protocol::PeerStatus]) -> Option<(u32, Vec<berth_protocol::PeerStatus>)> {
        let due = self.heartbeats.is_multiple_of(PEERS_EVERY);
        self.heartbeats += 1;
        let (up, down) = berth_protocol::split_peers(status);
        let down_keys: Vec<String> = down.iter().map(|p| p.wg_public_key.clone()).collect();
        let changed = self
            .last_sent
            .as_ref()
            .is_none_or(|(last_up, last_down)| *last_up != up || *last_down != down_keys);
        if !due && !changed {
            return None;
        }
        self.last_sent = Some((up, down_keys));
        Some((up, down))
    }
}

/// Runs `ip` with `args`, returning stdout; a failure carries stderr.
pub(crate) async fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The link's kind (`wireguard`, `tun`, ...) or `None` when there is no such
/// interface in this network namespace. (Asked through `ip` rather than
/// `/sys/class/net`, which shows the namespace sysfs was mounted in.)
async fn link_kind(ifname: &str) -> anyhow::Result<Option<String>> {
    let out = Command::new("ip")
        .args(["-d", "-j", "link", "show", "dev", ifname])
        .stdin(Stdio::null())
        .output()
        .await
        .context("running `ip`")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("does not exist") {
            return Ok(None);
        }
        bail!("`ip link show dev {ifname}` failed: {}", stderr.trim());
    }
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing `ip -j link show`")?;
    let kind = links
        .get(0)
        .and_then(|link| link.get("linkinfo"))
        .and_then(|info| info.get("info_kind"))
        .and_then(|kind| kind.as_str())
        .unwrap_or("")
        .to_owned();
    Ok(Some(kind))
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::*;

    fn b64(key: &Key) -> String {
        BASE64.encode(key.as_slice())
    }

    fn protocol_peer(
        name: &str,
        key: &Key,
        mesh_ip: [u8; 4],
        subnet: &str,
        endpoint: Option<&str>,
    ) -> berth_protocol::Peer {
        berth_protocol::Peer {
            node_id: format!("id-{name}"),
            name: name.into(),
            wg_public_key: b64(key),
            mesh_ip: Ipv4Addr::from(mesh_ip),
            subnet: subnet.into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
        }
    }

    #[test]
    fn protocol_peer_to_wireguard_peer() {
        let key = Key::generate().public_key();
        let peer = protocol_peer("n", &key, [10, 100, 0, 7], "10.200.7.0/24", None);
        let wg = desired_wg_peer(&peer).unwrap();
        assert_eq!(wg.public_key, key);
        assert_eq!(wg.endpoint, None);
        assert_eq!(wg.persistent_keepalive_interval, Some(25));
        let ips: Vec<String> = wg.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.100.0.7/32", "10.200.7.0/24"]);

        let mut bad = peer.clone();
        bad.wg_public_key = "not a key".into();
        assert!(desired_wg_peer(&bad).is_err());
        let mut bad = peer;
        bad.subnet = "10.200.7.0/99".into();
        assert!(desired_wg_peer(&bad).is_err());
    }

    #[test]
    fn handshake_age_treats_epoch_as_never() {
        let now = SystemTime::now();
        assert_eq!(handshake_age(None, now), None);
        assert_eq!(handshake_age(Some(SystemTime::UNIX_EPOCH), now), None);
        assert_eq!(handshake_age(Some(now - Duration::from_secs(7)), now), Some(7));
        assert_eq!(handshake_age(Some(now + Duration::from_secs(7)), now), Some(0));
    }

    fn status(key: &str, age: Option<u64>) -> berth_protocol::PeerStatus {
        berth_protocol::PeerStatus {
            wg_public_key: key.into(),
            handshake_age_secs: age,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    /// What each heartbeat sends: None, or (up, down keys).
    fn sent(r: &mut PeerStateReports, peers: &[berth_protocol::PeerStatus]) -> Option<(u32, Vec<String>)> {
        r.next(peers)
            .map(|(up, down)| (up, down.into_iter().map(|p| p.wg_public_key).collect()))
    }

    #[test]
    fn peer_state_rides_on_changes_and_every_sixth_heartbeat() {
        let mut r = PeerStateReports::default();
        let healthy = [status("a", Some(10)), status("b", Some(100)), status("c", None)];
        assert_eq!(
            sent(&mut r, &healthy),
            Some((2, vec!["c".into()])),
            "the first heartbeat"
        );
        // Ages move (c stays never, a and b stay up): nothing to send.
        let aged = [status("a", Some(50)), status("b", Some(2)), status("c", None)];
        for _ in 1..PEERS_EVERY {
            assert_eq!(sent(&mut r, &aged), None);
        }
        assert_eq!(
            sent(&mut r, &aged),
            Some((2, vec!["c".into()])),
            "the 6th after the first"
        );
        // b goes down: the set of down peers changed.
        let b_down = [status("a", Some(5)), status("b", Some(200)), status("c", None)];
        assert_eq!(sent(&mut r, &b_down), Some((1, vec!["b".into(), "c".into()])));
        // b's age grows: no change.
        let b_older = [status("a", Some(5)), status("b", Some(300)), status("c", None)];
        assert_eq!(sent(&mut r, &b_older), None);
        // A peer added, up: the up count changed.
        let more = [
            status("a", Some(5)),
            status("b", Some(310)),
            status("c", None),
            status("d", Some(1)),
        ];
        assert_eq!(sent(&mut r, &more), Some((2, vec!["b".into(), "c".into()])));
        // The same count with other peers down is a change too.
        let swapped = [
            status("a", Some(500)),
            status("b", Some(3)),
            status("c", None),
            status("d", Some(1)),
        ];
        assert_eq!(sent(&mut r, &swapped), Some((2, vec!["a".into(), "c".into()])));
    }

    #[test]
    fn interface_names() {
        assert!(valid_interface_name("berth0"));
        assert!(valid_interface_name("a.b-c_d"));
        assert!(!valid_interface_name(""));
        assert!(!valid_interface_name("a23456789012345x"));
        assert!(!valid_interface_name("../x"));
        assert!(!valid_interface_name(".."));
        assert!(!valid_interface_name("a b"));
        assert!(!valid_interface_name("a\"b"));
    }
}
