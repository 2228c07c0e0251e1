//! WireGuard mesh reconciler.
//!
//! One WireGuard interface per node carries the whole mesh. [`Mesh::ensure_up`]
//! brings it up (or adopts the one that is already running) and
//! [`Mesh::apply`] diffs the desired peers against the interface's current
//! peers and changes only the difference, in place: the tunnel is never torn
//! down and peers that did not change are never touched, so adding or removing
//! a node does not interrupt traffic to the others.
//!
//! Two backends:
//!
//! * **Kernel** WireGuard, driven over netlink through `defguard_wireguard_rs`
//!   (`WGApi<Kernel>`), when the module is available.
//! * **Userspace** `wireguard-go`, started as its own daemon (own process
//!   group, reparented to init), so it outlives the agent — a restart, crash
//!   or SIGKILL of the agent never drops the tunnel. It is driven through its
//!   UAPI socket `/var/run/wireguard/<if>.sock`: peers are added, changed,
//!   removed and read with `defguard_wireguard_rs`'s `WGApi<Userspace>`
//!   (which speaks the UAPI text protocol and, as long as `create_interface`
//!   is not called, never starts its built-in boringtun engine). The private
//!   key and listen port are set with a small UAPI client of our own, because
//!   defguard's `configure_interface` always sends `replace_peers=true`.
//!
//! The UAPI socket path is global (not per network namespace), so interface
//! names must be unique on the host.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, bail, Context};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine};
use defguard_wireguard_rs::{
    error::WireguardInterfaceError, host::Host, key::Key, net::IpAddrMask, peer::Peer as WgPeer,
    InterfaceConfiguration, Kernel, Userspace, WGApi, WireguardInterfaceApi,
};
use ipnet::{IpNet, Ipv4Net};
use tokio::process::Command;

/// Persistent keepalive for every mesh peer, in seconds.
pub const PERSISTENT_KEEPALIVE: u16 = 25;

/// Where `wireguard-go` (and every other UAPI implementation) puts its sockets.
const UAPI_DIR: &str = "/var/run/wireguard";
/// How long one UAPI request may take.
const UAPI_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `wireguard-go` may take to create its device and daemonise.
const START_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What [`Mesh::apply`] changed, as base64 public keys (each list sorted).
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub struct PeerDiff {
    pub add: Vec<String>,
    pub update: Vec<String>,
    pub remove: Vec<String>,
}

impl PeerDiff {
    /// True when nothing had to change.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

/// A peer as configured on the interface right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentPeer {
    /// Base64 public key.
    pub public_key: String,
    /// The endpoint the interface uses (configured or learnt from the peer).
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// `None` (or `Some(0)`) when off.
    pub persistent_keepalive: Option<u16>,
}

/// A peer as the control plane wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Base64 public key.
    pub public_key: String,
    /// `None` means "no opinion": whatever the interface has (for instance an
    /// endpoint learnt from the peer's own handshakes) is kept.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

/// Sorted, deduplicated, host bits cleared (the way WireGuard stores them).
fn normalize_ips(ips: &[IpNet]) -> Vec<IpNet> {
    ips.iter()
        .map(IpNet::trunc)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Pure diff of the interface's peers against the desired ones.
///
/// * desired but not current: `add`;
/// * in both but different allowed IPs (order does not matter), a different
///   endpoint (only when the desired one is set) or a different keepalive:
///   `update`;
/// * current but not desired: `remove`.
///
/// Unchanged peers appear nowhere. When a key is desired twice, the last one
/// wins. Each list is sorted.
pub fn diff_peers(current: &[CurrentPeer], desired: &[DesiredPeer]) -> PeerDiff {
    let current: BTreeMap<&str, &CurrentPeer> = current.iter().map(|peer| (peer.public_key.as_str(), peer)).collect();
    let desired: BTreeMap<&str, &DesiredPeer> = desired.iter().map(|peer| (peer.public_key.as_str(), peer)).collect();

    let mut diff = PeerDiff::default();
    for (key, want) in &desired {
        match current.get(key) {
            None => diff.add.push((*key).to_owned()),
            Some(have) => {
                let ips_differ = normalize_ips(&want.allowed_ips) != normalize_ips(&have.allowed_ips);
                let endpoint_differs = want.endpoint.is_some() && want.endpoint != have.endpoint;
                let keepalive_differs =
                    want.persistent_keepalive.unwrap_or(0) != have.persistent_keepalive.unwrap_or(0);
                if ips_differ || endpoint_differs || keepalive_differs {
                    diff.update.push((*key).to_owned());
                }
            }
        }
    }
    diff.remove = current
        .keys()
        .filter(|key| !desired.contains_key(*key))
        .map(|key| (*key).to_owned())
        .collect();
    diff
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
        match uapi_probe(ifname).await? {
            Probe::Alive => {
                if link_kind(ifname).await?.is_none() {
                    bail!(
                        "{} answers, but there is no interface {ifname} in this network \
                         namespace: the name is taken by a wireguard-go elsewhere on the host",
                        uapi_path(ifname).display()
                    );
                }
                tracing::info!(interface = %ifname, "adopting running wireguard-go");
                return Ok(Backend::Userspace);
            }
            Probe::Stale => {
                tracing::warn!(interface = %ifname, "removing stale UAPI socket");
                match std::fs::remove_file(uapi_path(ifname)) {
                    Ok(()) => {}
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(err).context("removing stale UAPI socket"),
                }
            }
            Probe::Absent => {}
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

        if Path::new("/sys/module/wireguard").is_dir() {
            let name = ifname.clone();
            tokio::task::spawn_blocking(move || WGApi::<Kernel>::new(name)?.create_interface())
                .await?
                .context("creating kernel WireGuard interface")?;
            return Ok(Backend::Kernel);
        }
        // The module may not be loaded yet: creating a link autoloads it.
        if ip(&["link", "add", "dev", ifname, "type", "wireguard"]).await.is_ok() {
            return Ok(Backend::Kernel);
        }

        start_wireguard_go(&cfg.wireguard_go, ifname).await?;
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
                let mut body = String::new();
                if key_differs {
                    body.push_str(&format!("private_key={}\n", private_key.to_lower_hex()));
                }
                if port_differs {
                    body.push_str(&format!("listen_port={}\n", cfg.listen_port));
                }
                let ifname = self.interface.clone();
                tokio::task::spawn_blocking(move || uapi_set(&ifname, &body))
                    .await?
                    .context("setting private key / listen port over UAPI")?;
            }
            Backend::Kernel => {
                // defguard's netlink `set_host` always sets the "replace peers"
                // flag, then re-adds the peers it is given: pass the current
                // ones so none is lost. This only runs when the key or the port
                // actually changes (first start or a new identity), which
                // interrupts the tunnel anyway.
                let config = InterfaceConfiguration {
                    name: self.interface.clone(),
                    prvkey: BASE64.encode(private_key.as_slice()),
                    addresses: vec![IpAddrMask::new(
                        IpAddr::V4(cfg.address.addr()),
                        cfg.address.prefix_len(),
                    )],
                    port: if cfg.listen_port == 0 {
                        host.listen_port
                    } else {
                        cfg.listen_port
                    },
                    peers: host.peers.into_values().collect(),
                    mtu: None,
                    fwmark: None,
                };
                let name = self.interface.clone();
                tokio::task::spawn_blocking(move || WGApi::<Kernel>::new(name)?.configure_interface(&config))
                    .await?
                    .context("configuring kernel WireGuard interface")?;
            }
        }
        Ok(())
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
            if let Some(pid) = find_wireguard_go_pid(&ifname, &self.wireguard_go) {
                stop_process(pid).await;
            }
            match std::fs::remove_file(uapi_path(&ifname)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err).context("removing UAPI socket"),
            }
        }
        // wireguard-go's TUN device goes away with the process; a kernel link
        // has to be deleted.
        if link_kind(&ifname).await?.is_some() {
            ip(&["link", "del", "dev", &ifname]).await?;
        }
        tracing::info!(interface = %ifname, "mesh interface destroyed");
        Ok(())
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.interface
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
            Backend::Userspace => find_wireguard_go_pid(&self.interface, &self.wireguard_go),
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
            // `WGApi::new` only stores the name: no interface is created and,
            // for userspace, no boringtun engine is started.
            Backend::Kernel => f(&WGApi::<Kernel>::new(ifname)?),
            Backend::Userspace => f(&WGApi::<Userspace>::new(ifname)?),
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

fn to_ipnet(mask: &IpAddrMask) -> Option<IpNet> {
    IpNet::new(mask.address, mask.cidr).ok()
}

fn current_peer(peer: &WgPeer) -> CurrentPeer {
    CurrentPeer {
        public_key: BASE64.encode(peer.public_key.as_slice()),
        endpoint: peer.endpoint,
        allowed_ips: normalize_ips(&peer.allowed_ips.iter().filter_map(to_ipnet).collect::<Vec<_>>()),
        persistent_keepalive: peer.persistent_keepalive_interval.filter(|&k| k != 0),
    }
}

/// Seconds since the last handshake. The UAPI reports "never" as time 0,
/// which defguard turns into the Unix epoch: that is `None` here.
fn handshake_age(last: Option<SystemTime>, now: SystemTime) -> Option<u64> {
    let last = last.filter(|&t| t > SystemTime::UNIX_EPOCH)?;
    Some(now.duration_since(last).map(|d| d.as_secs()).unwrap_or(0))
}

/// Runs `ip` with `args`, returning stdout; a failure carries stderr.
async fn ip(args: &[&str]) -> anyhow::Result<String> {
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

/// Starts `wireguard-go <if>`. It daemonises by itself: the process we start
/// creates the TUN device and the UAPI socket, re-executes itself in the
/// background and exits. It is started in a process group of its own, so
/// signals to the agent's group (Ctrl-C, a group kill) never reach it, and
/// the daemon is reparented to init, so it outlives the agent. (Under
/// systemd the agent's unit must not kill its whole cgroup on stop, e.g.
/// `KillMode=process`, or the daemon goes with it.)
async fn start_wireguard_go(binary: &Path, ifname: &str) -> anyhow::Result<()> {
    tracing::info!(interface = %ifname, binary = %binary.display(), "starting wireguard-go");
    // Without LOG_LEVEL the daemon gets /dev/null as stdout/stderr, so our
    // pipe closes when the launcher exits (with LOG_LEVEL it would inherit
    // the pipe and `output()` would wait for the daemon).
    let child = Command::new(binary)
        .arg(ifname)
        .env_remove("LOG_LEVEL")
        .env_remove("WG_PROCESS_FOREGROUND")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let out = tokio::time::timeout(START_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{} {ifname} did not daemonise in time", binary.display()))??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{} {ifname} failed ({}): {}",
            binary.display(),
            out.status,
            stderr.trim()
        );
    }
    tracing::debug!(interface = %ifname, output = %stderr.trim(), "wireguard-go daemonised");

    // The launcher creates the socket before it forks, but be tolerant.
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if uapi_probe(ifname).await? == Probe::Alive {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("wireguard-go for {ifname} started but its UAPI socket does not answer");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn uapi_path(ifname: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{ifname}.sock"))
}

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// Answers `get=1` with `errno=0`.
    Alive,
    /// The socket file exists but nobody listens on it.
    Stale,
    /// No socket file.
    Absent,
}

async fn uapi_probe(ifname: &str) -> anyhow::Result<Probe> {
    let name = ifname.to_owned();
    tokio::task::spawn_blocking(move || {
        let path = uapi_path(&name);
        if std::fs::symlink_metadata(&path).is_err() {
            return Ok(Probe::Absent);
        }
        match uapi_request(&name, "get=1\n\n") {
            Ok(response) => match uapi_errno(&response) {
                Some(0) => Ok(Probe::Alive),
                errno => Err(anyhow!("UAPI get on {} answered errno {errno:?}", path.display())),
            },
            Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => Ok(Probe::Stale),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Probe::Absent),
            // Not a socket at all (a leftover regular file): as good as stale.
            Err(err) if err.raw_os_error() == Some(libc::ENOTSOCK) => Ok(Probe::Stale),
            // Anything else (e.g. a timeout) may be a live but busy daemon:
            // never remove its socket.
            Err(err) => Err(err).with_context(|| format!("probing {}", path.display())),
        }
    })
    .await?
}

/// One UAPI request; returns the response up to (not including) the blank
/// line that ends it.
fn uapi_request(ifname: &str, request: &str) -> io::Result<String> {
    let mut stream = UnixStream::connect(uapi_path(ifname))?;
    stream.set_read_timeout(Some(UAPI_TIMEOUT))?;
    stream.set_write_timeout(Some(UAPI_TIMEOUT))?;
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut response = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\n" {
            break;
        }
        response.push_str(&line);
    }
    Ok(response)
}

fn uapi_errno(response: &str) -> Option<i64> {
    response
        .lines()
        .find_map(|line| line.strip_prefix("errno="))
        .and_then(|value| value.trim().parse().ok())
}

/// A UAPI `set` of `body` (lines ending in `\n`), which must report errno 0.
/// Without `replace_peers=true` no peer is touched.
fn uapi_set(ifname: &str, body: &str) -> anyhow::Result<()> {
    let response = uapi_request(ifname, &format!("set=1\n{body}\n"))
        .with_context(|| format!("UAPI set on {}", uapi_path(ifname).display()))?;
    match uapi_errno(&response) {
        Some(0) => Ok(()),
        errno => bail!("UAPI set on {ifname} failed: errno {errno:?}"),
    }
}

/// Finds the `wireguard-go` daemon for `ifname` by its command line
/// (`<binary> [-f] <ifname>`; the daemon keeps the launcher's argv). The UAPI
/// socket's peer credentials would name the launcher, which has exited.
pub(crate) fn find_wireguard_go_pid(ifname: &str, binary: &Path) -> Option<u32> {
    let binary_name = binary.file_name()?.to_str()?;
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).filter(|arg| !arg.is_empty()).collect();
        let first = Path::new(std::str::from_utf8(args.first()?).ok()?);
        let matches = args.len() >= 2
            && first.file_name()?.to_str()? == binary_name
            && *args.last()? == ifname.as_bytes()
            && process_alive(pid);
        matches.then_some(pid)
    })
}

/// True while the process exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// SIGTERM, wait up to 5 s, then SIGKILL.
async fn stop_process(pid: u32) {
    use nix::{sys::signal, unistd::Pid};
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let _ = signal::kill(Pid::from_raw(raw), signal::Signal::SIGTERM);
    for _ in 0..100 {
        if !process_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(pid, "wireguard-go did not stop on SIGTERM, killing it");
    let _ = signal::kill(Pid::from_raw(raw), signal::Signal::SIGKILL);
}

/// Network-namespace lab for this crate's tests: namespaces, veths and
/// `wireguard-go` daemons, all removed on drop even when a test fails.
#[cfg(test)]
pub(crate) mod test_lab {
    use std::{
        future::Future,
        path::Path,
        process::{Command, Stdio},
        time::Duration,
    };

    /// Everything one test created, removed on drop.
    pub(crate) struct Lab {
        tag: String,
        namespaces: Vec<String>,
        interfaces: Vec<String>,
    }

    impl Lab {
        /// `tag`: two characters, unique per test (names must not clash
        /// between tests running in parallel).
        pub(crate) fn new(tag: &str) -> Lab {
            assert_eq!(tag.len(), 2);
            Lab {
                tag: tag.to_owned(),
                namespaces: Vec::new(),
                interfaces: Vec::new(),
            }
        }

        /// A fresh network namespace with loopback up.
        pub(crate) fn netns(&mut self, side: &str) -> String {
            let name = format!("bm-test-{}-{side}-{}", self.tag, std::process::id());
            // Left over from a crashed run with the same pid: start clean.
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
            run_ok("ip", &["netns", "add", &name], None);
            self.namespaces.push(name.clone());
            run_ok("ip", &["-n", &name, "link", "set", "lo", "up"], None);
            name
        }

        /// A WireGuard interface name unique on the host, cleaned up on drop
        /// (wireguard-go killed, UAPI socket removed).
        pub(crate) fn ifname(&mut self, side: &str) -> String {
            let name = format!("bm{}{side}{}", self.tag, std::process::id());
            assert!(name.len() <= 15, "{name} too long");
            cleanup_interface(&name);
            self.interfaces.push(name.clone());
            name
        }

        /// A veth pair between two namespaces, both ends up and addressed.
        pub(crate) fn veth(&self, ns_a: &str, addr_a: &str, ns_b: &str, addr_b: &str) {
            run_ok(
                "ip",
                &[
                    "-n", ns_a, "link", "add", "veth0", "type", "veth", "peer", "name", "veth0", "netns", ns_b,
                ],
                None,
            );
            for (ns, addr) in [(ns_a, addr_a), (ns_b, addr_b)] {
                run_ok("ip", &["-n", ns, "addr", "add", addr, "dev", "veth0"], None);
                run_ok("ip", &["-n", ns, "link", "set", "veth0", "up"], None);
            }
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            // Daemons first: their sockets keep the namespaces alive.
            for ifname in &self.interfaces {
                cleanup_interface(ifname);
            }
            for ns in &self.namespaces {
                let _ = Command::new("ip")
                    .args(["netns", "del", ns])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }

    fn cleanup_interface(ifname: &str) {
        while let Some(pid) = super::find_wireguard_go_pid(ifname, Path::new("wireguard-go")) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            for _ in 0..100 {
                if !super::process_alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_file(super::uapi_path(ifname));
    }

    /// Runs a command, panicking with its stderr unless it succeeds; returns
    /// stdout.
    pub(crate) fn run_ok(cmd: &str, args: &[&str], stdin: Option<&str>) -> String {
        use std::io::Write;
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd}: {e}"));
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread of its own that has entered network namespace
    /// `ns`, under a current-thread tokio runtime (so every command it
    /// spawns, and every blocking-pool thread, is in `ns` too).
    pub(crate) fn in_netns<F, Fut, T>(ns: &str, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(f())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::Ipv4Addr,
        os::unix::net::UnixListener,
        process::{Command as StdCommand, Stdio},
        sync::Arc,
    };

    use super::{test_lab::*, *};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn cur(key: &str, endpoint: Option<&str>, ips: &[&str]) -> CurrentPeer {
        CurrentPeer {
            public_key: key.into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            persistent_keepalive: Some(25),
        }
    }

    fn des(key: &str, endpoint: Option<&str>, ips: &[&str]) -> DesiredPeer {
        DesiredPeer {
            public_key: key.into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: ips.iter().map(|s| net(s)).collect(),
            persistent_keepalive: Some(25),
        }
    }

    #[test]
    fn diff_add_update_remove_unchanged() {
        let current = [
            cur("same", Some("198.18.0.1:51820"), &["10.100.0.1/32", "10.200.1.0/24"]),
            cur("moved", Some("198.18.0.2:51820"), &["10.100.0.2/32", "10.200.2.0/24"]),
            cur("renet", Some("198.18.0.3:51820"), &["10.100.0.3/32", "10.200.3.0/24"]),
            cur("gone", Some("198.18.0.4:51820"), &["10.100.0.4/32"]),
        ];
        let desired = [
            des("new", Some("198.18.0.5:51820"), &["10.100.0.5/32", "10.200.5.0/24"]),
            // Same allowed IPs in another order: unchanged.
            des("same", Some("198.18.0.1:51820"), &["10.200.1.0/24", "10.100.0.1/32"]),
            des("moved", Some("198.18.0.22:51820"), &["10.100.0.2/32", "10.200.2.0/24"]),
            des("renet", Some("198.18.0.3:51820"), &["10.100.0.3/32", "10.200.33.0/24"]),
        ];
        assert_eq!(
            diff_peers(&current, &desired),
            PeerDiff {
                add: vec!["new".into()],
                update: vec!["moved".into(), "renet".into()],
                remove: vec!["gone".into()],
            }
        );
    }

    #[test]
    fn diff_of_identical_sets_is_empty() {
        let current = [cur("a", Some("198.18.0.1:1"), &["10.100.0.1/32"])];
        let desired = [des("a", Some("198.18.0.1:1"), &["10.100.0.1/32"])];
        assert!(diff_peers(&current, &desired).is_empty());
        assert!(diff_peers(&[], &[]).is_empty());
    }

    #[test]
    fn diff_ignores_allowed_ip_order_duplicates_and_host_bits() {
        let current = [cur("a", None, &["10.200.1.0/24", "10.100.0.1/32"])];
        let desired = [des("a", None, &["10.100.0.1/32", "10.200.1.9/24", "10.100.0.1/32"])];
        assert!(diff_peers(&current, &desired).is_empty());
    }

    #[test]
    fn diff_without_desired_endpoint_keeps_learnt_one() {
        // The interface learnt an endpoint from the peer's handshakes; the
        // control plane has none to offer: nothing to do.
        let current = [cur("a", Some("198.18.0.9:4000"), &["10.100.0.1/32"])];
        let desired = [des("a", None, &["10.100.0.1/32"])];
        assert!(diff_peers(&current, &desired).is_empty());
        // But a desired endpoint on a peer that has none is an update.
        let current = [cur("a", None, &["10.100.0.1/32"])];
        let desired = [des("a", Some("198.18.0.9:4000"), &["10.100.0.1/32"])];
        assert_eq!(diff_peers(&current, &desired).update, vec!["a".to_owned()]);
    }

    #[test]
    fn diff_keepalive_change_is_an_update() {
        let mut current = cur("a", None, &["10.100.0.1/32"]);
        current.persistent_keepalive = None;
        let desired = [des("a", None, &["10.100.0.1/32"])];
        assert_eq!(diff_peers(&[current.clone()], &desired).update, vec!["a".to_owned()]);
        // 0 and None both mean "off".
        current.persistent_keepalive = Some(0);
        let mut off = des("a", None, &["10.100.0.1/32"]);
        off.persistent_keepalive = None;
        assert!(diff_peers(&[current], &[off]).is_empty());
    }

    #[test]
    fn diff_lists_are_sorted() {
        let desired = [des("c", None, &[]), des("a", None, &[]), des("b", None, &[])];
        assert_eq!(diff_peers(&[], &desired).add, vec!["a", "b", "c"]);
    }

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

    #[test]
    fn errno_parsing() {
        assert_eq!(uapi_errno("listen_port=1\nerrno=0\n"), Some(0));
        assert_eq!(uapi_errno("errno=22\n"), Some(22));
        assert_eq!(uapi_errno("listen_port=1\n"), None);
    }

    // ---- real WireGuard (wireguard-go) in network namespaces ----

    fn mesh_cfg(ifname: &str, key: &Key, address: &str, port: u16) -> MeshConfig {
        MeshConfig {
            interface: ifname.into(),
            listen_port: port,
            private_key: b64(key),
            address: address.parse().unwrap(),
            subnet_pool: "10.200.0.0/16".parse().unwrap(),
            wireguard_go: "wireguard-go".into(),
        }
    }

    /// One peer line of `wg show <if> dump`.
    #[derive(Debug, Clone, PartialEq)]
    struct DumpPeer {
        endpoint: String,
        allowed_ips: String,
        latest_handshake: u64,
        rx: u64,
        tx: u64,
        keepalive: String,
    }

    /// Listen port and peers (by base64 key) from `wg show <if> dump`.
    fn wg_dump(ns: &str, ifname: &str) -> (u16, HashMap<String, DumpPeer>) {
        let out = run_ok("ip", &["netns", "exec", ns, "wg", "show", ifname, "dump"], None);
        let mut lines = out.lines();
        let first: Vec<&str> = lines.next().unwrap().split('\t').collect();
        let port = first[2].parse().unwrap();
        let peers = lines
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                (
                    f[0].to_owned(),
                    DumpPeer {
                        endpoint: f[2].into(),
                        allowed_ips: f[3].into(),
                        latest_handshake: f[4].parse().unwrap(),
                        rx: f[5].parse().unwrap(),
                        tx: f[6].parse().unwrap(),
                        keepalive: f[7].into(),
                    },
                )
            })
            .collect();
        (port, peers)
    }

    fn ping(ns: &str, count: &str, target: &str) -> bool {
        StdCommand::new("ip")
            .args(["netns", "exec", ns, "ping", "-n", "-q", "-c", count, "-W", "1", target])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }

    /// Pings until one answer (the first packets wait for the handshake),
    /// then asserts `ping -c 3 -W 1` works.
    fn assert_ping(ns: &str, target: &str) {
        let reached = (0..10).any(|_| ping(ns, "1", target));
        assert!(reached, "{target} unreachable from {ns}");
        assert!(ping(ns, "3", target), "ping -c 3 {target} from {ns} failed");
    }

    #[test]
    fn two_nodes_talk_and_peers_change_in_place() {
        let mut lab = Lab::new("pg");
        let ns_a = lab.netns("a");
        let ns_b = lab.netns("b");
        lab.veth(&ns_a, "198.18.200.1/24", &ns_b, "198.18.200.2/24");
        let if_a = lab.ifname("a");
        let if_b = lab.ifname("b");
        // A container address behind B, inside B's subnet (no dummy module
        // here, so on loopback).
        run_ok("ip", &["-n", &ns_b, "addr", "add", "10.200.2.1/32", "dev", "lo"], None);

        let (key_a, key_b, key_c) = (Key::generate(), Key::generate(), Key::generate());
        let peer_a = protocol_peer(
            "a",
            &key_a.public_key(),
            [10, 100, 0, 1],
            "10.200.1.0/24",
            Some("198.18.200.1:51820"),
        );
        let peer_b = protocol_peer(
            "b",
            &key_b.public_key(),
            [10, 100, 0, 2],
            "10.200.2.0/24",
            Some("198.18.200.2:51820"),
        );
        // Nobody answers for C; its endpoint stays inside the lab.
        let peer_c = protocol_peer(
            "c",
            &key_c.public_key(),
            [10, 100, 0, 3],
            "10.200.3.0/24",
            Some("198.18.200.3:51820"),
        );

        let cfg_a = mesh_cfg(&if_a, &key_a, "10.100.0.1/16", 51820);
        let cfg_b = mesh_cfg(&if_b, &key_b, "10.100.0.2/16", 51820);
        let mesh_a = Arc::new(in_netns(&ns_a, move || async move { Mesh::ensure_up(cfg_a).await }).unwrap());
        let mesh_b = Arc::new(in_netns(&ns_b, move || async move { Mesh::ensure_up(cfg_b).await }).unwrap());
        assert_eq!(mesh_a.backend(), Backend::Userspace);
        assert_eq!(mesh_a.public_key(), b64(&key_a.public_key()));

        let apply = |ns: &str, mesh: &Arc<Mesh>, peers: Vec<berth_protocol::Peer>| {
            let mesh = Arc::clone(mesh);
            in_netns(ns, move || async move { mesh.apply(&peers).await }).unwrap()
        };

        // Each node's own entry in the list is skipped.
        let diff = apply(&ns_a, &mesh_a, vec![peer_a.clone(), peer_b.clone()]);
        assert_eq!(diff.add, vec![peer_b.wg_public_key.clone()]);
        assert!(diff.update.is_empty() && diff.remove.is_empty());
        let diff = apply(&ns_b, &mesh_b, vec![peer_a.clone(), peer_b.clone()]);
        assert_eq!(diff.add, vec![peer_a.wg_public_key.clone()]);

        assert_ping(&ns_a, "10.100.0.2");
        assert_ping(&ns_b, "10.100.0.1");
        // Through the subnet route and B's allowed IPs to B's container side.
        assert_ping(&ns_a, "10.200.2.1");

        let (_, before) = wg_dump(&ns_a, &if_a);
        let b_before = before[&peer_b.wg_public_key].clone();
        assert_eq!(b_before.endpoint, "198.18.200.2:51820");
        assert_eq!(b_before.keepalive, "25");
        assert!(b_before.latest_handshake > 0);

        // A continuous ping from A to B while C is added, changed and removed.
        let pinger = StdCommand::new("ip")
            .args([
                "netns",
                "exec",
                &ns_a,
                "ping",
                "-n",
                "-q",
                "-i",
                "0.2",
                "-c",
                "20",
                "-W",
                "1",
                "10.100.0.2",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));

        let diff = apply(&ns_a, &mesh_a, vec![peer_b.clone(), peer_c.clone()]);
        assert_eq!(
            diff,
            PeerDiff {
                add: vec![peer_c.wg_public_key.clone()],
                ..PeerDiff::default()
            }
        );
        std::thread::sleep(Duration::from_millis(500));

        let mut peer_c2 = peer_c.clone();
        peer_c2.endpoint = Some("198.18.200.4:51820".parse().unwrap());
        peer_c2.subnet = "10.200.33.0/24".into();
        let diff = apply(&ns_a, &mesh_a, vec![peer_b.clone(), peer_c2.clone()]);
        assert_eq!(
            diff,
            PeerDiff {
                update: vec![peer_c.wg_public_key.clone()],
                ..PeerDiff::default()
            }
        );
        let (_, during) = wg_dump(&ns_a, &if_a);
        let c = &during[&peer_c.wg_public_key];
        assert_eq!(c.endpoint, "198.18.200.4:51820");
        assert!(c.allowed_ips.contains("10.200.33.0/24"), "{c:?}");
        assert!(!c.allowed_ips.contains("10.200.3.0/24"), "{c:?}");

        let out = pinger.wait_with_output().unwrap();
        let summary = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && summary.contains("20 received") && summary.contains(" 0% packet loss"),
            "continuous ping lost packets: {summary}"
        );

        // B's peer entry was never touched: same endpoint, same handshake.
        let (_, after) = wg_dump(&ns_a, &if_a);
        let b_after = &after[&peer_b.wg_public_key];
        assert_eq!(b_after.endpoint, b_before.endpoint);
        assert_eq!(b_after.allowed_ips, b_before.allowed_ips);
        assert_eq!(b_after.latest_handshake, b_before.latest_handshake);
        assert!(b_after.rx > b_before.rx && b_after.tx > b_before.tx);

        // Remove C.
        let diff = apply(&ns_a, &mesh_a, vec![peer_b.clone()]);
        assert_eq!(
            diff,
            PeerDiff {
                remove: vec![peer_c.wg_public_key.clone()],
                ..PeerDiff::default()
            }
        );
        let peers = run_ok("ip", &["netns", "exec", &ns_a, "wg", "show", &if_a, "peers"], None);
        assert!(!peers.contains(&peer_c.wg_public_key), "{peers}");
        assert!(peers.contains(&peer_b.wg_public_key), "{peers}");
        // Nothing left to do.
        assert!(apply(&ns_a, &mesh_a, vec![peer_b.clone()]).is_empty());
        assert_ping(&ns_a, "10.100.0.2");

        let mesh = Arc::clone(&mesh_a);
        let status = in_netns(&ns_a, move || async move { mesh.status().await }).unwrap();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].wg_public_key, peer_b.wg_public_key);
        assert!(status[0].handshake_age_secs.is_some_and(|age| age < 60), "{status:?}");
        assert!(status[0].rx_bytes > 0 && status[0].tx_bytes > 0);

        // Tear down through the API.
        for (ns, mesh, ifname) in [(&ns_a, mesh_a, &if_a), (&ns_b, mesh_b, &if_b)] {
            let pid = mesh.wireguard_go_pid().expect("wireguard-go pid");
            let mesh = Arc::try_unwrap(mesh).unwrap();
            in_netns(ns, move || async move { mesh.destroy().await }).unwrap();
            assert!(!super::process_alive(pid));
            assert!(!uapi_path(ifname).exists());
            let links = run_ok("ip", &["-n", ns, "-o", "link"], None);
            assert!(!links.contains(ifname.as_str()), "{links}");
        }
    }

    #[test]
    fn ensure_up_adopts_running_daemon_and_keeps_peers() {
        let mut lab = Lab::new("ad");
        let ns = lab.netns("a");
        let ifname = lab.ifname("a");

        // A stale socket (nobody listening) from a dead daemon.
        std::fs::create_dir_all(UAPI_DIR).unwrap();
        drop(UnixListener::bind(uapi_path(&ifname)).unwrap());
        assert!(uapi_path(&ifname).exists());

        let key = Key::generate();
        let cfg = mesh_cfg(&ifname, &key, "10.100.0.1/16", 51821);
        let up = |cfg: MeshConfig| in_netns(&ns, move || async move { Mesh::ensure_up(cfg).await });

        let mesh = up(cfg.clone()).expect("ensure_up over a stale socket");
        assert_eq!(mesh.backend(), Backend::Userspace);
        let pid = mesh.wireguard_go_pid().expect("wireguard-go running");

        // The daemon is not in our process group and not our child: killing
        // the agent (or its group) leaves it running.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let (ppid, pgrp): (u32, i32) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
        assert_ne!(pgrp, nix::unistd::getpgrp().as_raw());
        assert_ne!(ppid, std::process::id());

        let (x, y) = (Key::generate().public_key(), Key::generate().public_key());
        let peers = vec![
            protocol_peer("x", &x, [10, 100, 0, 8], "10.200.8.0/24", None),
            protocol_peer("y", &y, [10, 100, 0, 9], "10.200.9.0/24", Some("198.18.200.9:51820")),
        ];
        let mesh = Arc::new(mesh);
        let m = Arc::clone(&mesh);
        let p = peers.clone();
        let diff = in_netns(&ns, move || async move { m.apply(&p).await }).unwrap();
        assert_eq!(diff.add.len(), 2);
        let (port, dump) = wg_dump(&ns, &ifname);
        assert_eq!(port, 51821);
        assert_eq!(dump[&b64(&x)].endpoint, "(none)");
        assert_eq!(dump[&b64(&y)].endpoint, "198.18.200.9:51820");

        // Again, same config: the same daemon is adopted, peers kept.
        let again = up(cfg.clone()).unwrap();
        assert_eq!(again.wireguard_go_pid(), Some(pid));
        assert_eq!(wg_dump(&ns, &ifname).1.len(), 2);
        let p = peers.clone();
        let diff = in_netns(&ns, move || async move { again.apply(&p).await }).unwrap();
        assert!(diff.is_empty(), "{diff:?}");

        // New port, key and address: applied in place, peers kept, the old
        // address removed.
        let key2 = Key::generate();
        let mut cfg2 = mesh_cfg(&ifname, &key2, "10.100.0.77/16", 51822);
        cfg2.subnet_pool = "10.200.0.0/15".parse().unwrap();
        let moved = up(cfg2).unwrap();
        assert_eq!(moved.wireguard_go_pid(), Some(pid));
        assert_eq!(moved.public_key(), b64(&key2.public_key()));
        let (port, dump) = wg_dump(&ns, &ifname);
        assert_eq!(port, 51822);
        assert_eq!(dump.len(), 2);
        let iface = run_ok("ip", &["netns", "exec", &ns, "wg", "show", &ifname, "public-key"], None);
        assert_eq!(iface.trim(), b64(&key2.public_key()));
        let addrs = run_ok("ip", &["-n", &ns, "-4", "-o", "addr", "show", "dev", &ifname], None);
        assert!(addrs.contains("10.100.0.77/16"), "{addrs}");
        assert!(!addrs.contains("10.100.0.1/"), "{addrs}");
        let routes = run_ok("ip", &["-n", &ns, "route", "show", "dev", &ifname], None);
        assert!(routes.contains("10.200.0.0/15"), "{routes}");
        assert!(routes.contains("10.100.0.0/16"), "{routes}");
        let link = run_ok("ip", &["-n", &ns, "-o", "link", "show", "dev", &ifname], None);
        assert!(link.contains(",UP") || link.contains("<UP"), "{link}");

        // Drop the handle: the daemon keeps running.
        drop(moved);
        drop(mesh);
        assert!(super::process_alive(pid));

        let last = up(cfg).unwrap();
        assert_eq!(last.wireguard_go_pid(), Some(pid));
        in_netns(&ns, move || async move { last.destroy().await }).unwrap();
        assert!(!super::process_alive(pid));
        assert!(!uapi_path(&ifname).exists());
    }

    #[test]
    fn ensure_up_rejects_a_name_taken_in_another_namespace() {
        let mut lab = Lab::new("ns");
        let ns_a = lab.netns("a");
        let ns_b = lab.netns("b");
        let ifname = lab.ifname("a");
        let cfg = mesh_cfg(&ifname, &Key::generate(), "10.100.0.1/16", 51820);
        let c = cfg.clone();
        let mesh = in_netns(&ns_a, move || async move { Mesh::ensure_up(c).await }).unwrap();
        let pid = mesh.wireguard_go_pid().unwrap();
        // Same name in another namespace: refused, and A's daemon survives.
        let err = in_netns(&ns_b, move || async move { Mesh::ensure_up(cfg).await }).unwrap_err();
        assert!(
            err.to_string().contains("another") || format!("{err:#}").contains("elsewhere"),
            "{err:#}"
        );
        assert!(super::process_alive(pid));
        in_netns(&ns_a, move || async move { mesh.destroy().await }).unwrap();
    }
}
