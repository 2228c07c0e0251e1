//! Applies a desired-state document to this node: the WireGuard mesh, the
//! firewall, the containers, the DNS records and, on proxy nodes,
//! berth-proxy's config. Idempotent: applying the same document twice
//! changes nothing the second time.

use crate::containers::{Runtime, RuntimeConfig};
use crate::dns::{self, records, DnsConfig, DnsServer};
use crate::firewall::{self, FirewallConfig};
use crate::mesh::{Mesh, MeshConfig};
use crate::proxy::{BerthProxySettings, BerthProxySupervisor};
use anyhow::Context;
use berth_protocol::{DesiredState, StatusReport};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

pub struct Settings {
    pub data_dir: PathBuf,
    pub interface: String,
    pub wireguard_go: PathBuf,
    pub wg_private: String,
    pub sealing: x25519_dalek::StaticSecret,
    pub runtime: RuntimeConfig,
    /// Where the upstream resolvers for names outside the zone are read from.
    pub resolv_conf: PathBuf,
    /// DNS port on the container gateway (53; tests may pick another).
    pub dns_port: u16,
    /// Set on proxy nodes: run berth-proxy.
    pub berth_proxy: Option<BerthProxySettings>,
    /// Where Podman looks for registries' CAs (`HOST:PORT/ca.crt`).
    pub certs_dir: PathBuf,
}

pub struct Reconciler {
    settings: Settings,
    mesh: Option<Mesh>,
    /// The mesh config the interface was brought up with (address, port, pool).
    mesh_shape: Option<String>,
    firewall_rules: Option<String>,
    runtime: Runtime,
    dns: Option<(SocketAddr, DnsServer)>,
    desired: Option<DesiredState>,
    berth_proxy: Option<BerthProxySupervisor>,
    berth_proxy_error: Option<String>,
    /// berth-proxy did not show the config as last written within
    /// [`crate::proxy::LOAD_WAIT`] (cleared once it does).
    berth_proxy_unloaded: Option<String>,
    applied: AppliedGate,
    pub last_error: Option<String>,
    containers_error: Option<String>,
}

/// The revision a node reports as applied: only one that every part of the
/// node serves. A document whose every part is in place but berth-proxy's
/// config (not yet loaded, or not buildable) is pending: the previous
/// revision is still reported, and the pending one once the proxy confirms.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct AppliedGate {
    applied: u64,
    pending: Option<u64>,
}

impl AppliedGate {
    /// The document of `revision` is in place; `proxy_serves`: berth-proxy
    /// serves its config (always true on workers).
    fn applied(&mut self, revision: u64, proxy_serves: bool) {
        if proxy_serves {
            self.applied = revision;
            self.pending = None;
        } else {
            self.pending = Some(revision);
        }
    }

    /// berth-proxy now serves the config of the last document applied;
    /// returns whether the applied revision moved.
    fn proxy_serves(&mut self) -> bool {
        match self.pending.take() {
            Some(r) => {
                let moved = r != self.applied;
                self.applied = r;
                moved
            }
            None => false,
        }
    }

    /// The revision the desired-state long-poll waits past: a pending one
    /// is not fetched again.
    fn received(&self) -> u64 {
        self.pending.unwrap_or(self.applied)
    }
}

const CACHE: &str = "desired.json";

/// Reads the cached desired state, if any. A corrupt cache is reported and
/// ignored: the control plane will send a fresh one.
pub fn load_cache(data_dir: &Path) -> Option<DesiredState> {
    let p = data_dir.join(CACHE);
    let bytes = std::fs::read(&p).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(path = %p.display(), error = %e, "ignoring corrupt desired-state cache");
            None
        }
    }
}

pub fn save_cache(data_dir: &Path, d: &DesiredState) -> anyhow::Result<()> {
    Ok(crate::identity::write_private(
        &data_dir.join(CACHE),
        &serde_json::to_vec(d)?,
    )?)
}

impl Reconciler {
    pub fn new(settings: Settings) -> Reconciler {
        Reconciler {
            runtime: Runtime::new(settings.runtime.clone(), settings.sealing.clone()),
            berth_proxy: settings.berth_proxy.clone().map(BerthProxySupervisor::new),
            berth_proxy_error: None,
            berth_proxy_unloaded: None,
            settings,
            mesh: None,
            mesh_shape: None,
            firewall_rules: None,
            dns: None,
            desired: None,
            applied: AppliedGate::default(),
            last_error: None,
            containers_error: None,
        }
    }

    /// The revision every part of this node serves (what it reports).
    pub fn applied_revision(&self) -> u64 {
        self.applied.applied
    }

    /// The revision of the last document applied, even if berth-proxy has
    /// not confirmed it yet: the desired-state long-poll asks for newer ones.
    pub fn received_revision(&self) -> u64 {
        self.applied.received()
    }

    /// Applies `d`. The applied revision moves to `d.revision` only once
    /// berth-proxy (on proxy nodes) serves its config; if it does not within
    /// [`crate::proxy::LOAD_WAIT`], [`Self::tick`] keeps checking and moves
    /// it then.
    pub async fn apply(&mut self, d: &DesiredState) -> anyhow::Result<()> {
        let res = self.apply_inner(d).await;
        match &res {
            Ok(()) => {
                let proxy_serves = self.proxy_serves_desired();
                self.applied.applied(d.revision, proxy_serves);
                if !proxy_serves {
                    tracing::info!(
                        revision = d.revision,
                        reported = self.applied.applied,
                        "applied, but berth-proxy does not serve it yet"
                    );
                }
                self.last_error = None;
            }
            Err(e) => self.last_error = Some(format!("{e:#}")),
        }
        res
    }

    async fn apply_inner(&mut self, d: &DesiredState) -> anyhow::Result<()> {
        let mesh_cidr: ipnet::Ipv4Net = d.node.mesh_cidr.parse().context("node.mesh_cidr")?;
        let subnet_pool: ipnet::Ipv4Net = d.node.subnet_pool.parse().context("node.subnet_pool")?;
        let subnet: ipnet::Ipv4Net = d.node.subnet.parse().context("node.subnet")?;
        let address = ipnet::Ipv4Net::new(d.node.mesh_ip, mesh_cidr.prefix_len())?;
        let shape = format!("{address} {subnet_pool} {}", d.node.wg_port);
        if self.mesh.is_none() || self.mesh_shape.as_deref() != Some(shape.as_str()) {
            let mesh = Mesh::ensure_up(MeshConfig {
                interface: self.settings.interface.clone(),
                listen_port: d.node.wg_port,
                private_key: self.settings.wg_private.clone(),
                address,
                subnet_pool,
                wireguard_go: self.settings.wireguard_go.clone(),
            })
            .await
            .context("bringing up the WireGuard interface")?;
            self.mesh = Some(mesh);
            self.mesh_shape = Some(shape);
        }
        let fw = FirewallConfig {
            interface: self.settings.interface.clone(),
            listen_port: d.node.wg_port,
            subnet,
            mesh_cidr,
            subnet_pool,
        };
        let rules = firewall::ruleset(&fw);
        if self.firewall_rules.as_deref() != Some(rules.as_str()) {
            firewall::apply(&fw).await.context("applying the nftables table")?;
            self.firewall_rules = Some(rules);
        }
        if let Some(mesh) = &self.mesh {
            let diff = mesh.apply(&d.peers).await.context("updating WireGuard peers")?;
            if diff != Default::default() {
                tracing::info!(
                    revision = d.revision,
                    add = diff.add.len(),
                    update = diff.update.len(),
                    remove = diff.remove.len(),
                    "mesh peers changed"
                );
            }
        }
        self.ensure_dns(subnet).await?;
        if let Some(r) = &d.registry {
            let ca = self.settings.data_dir.join("ca.pem");
            let trusted =
                std::fs::read(&ca).and_then(|pem| crate::registry::trust(&self.settings.certs_dir, &r.host, &pem));
            if let Err(e) = trusted {
                tracing::warn!(registry = %r.host, error = %e, "cannot make Podman trust the fleet registry's CA");
            }
        }
        self.runtime.set_registry(d.registry.clone());
        // A container that cannot run is that replica's error (reported per
        // replica and retried every tick), not a failure of the whole document.
        self.containers_error = match self.runtime.apply(subnet, &d.containers).await {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(revision = d.revision, error = %format!("{e:#}"), "containers not all running");
                Some(format!("containers: {e:#}"))
            }
        };
        self.desired = Some(d.clone());
        self.refresh_dns();
        self.refresh_berth_proxy().await;
        Ok(())
    }

    /// Whether berth-proxy serves the config of the current desired state
    /// (true on workers).
    fn proxy_serves_desired(&self) -> bool {
        match &self.berth_proxy {
            Some(sup) => self.berth_proxy_error.is_none() && sup.is_loaded(),
            None => true,
        }
    }

    /// Rewrites berth-proxy's config (when it changed), keeps it running and
    /// waits, at most [`crate::proxy::LOAD_WAIT`], until it serves a new
    /// config. A failure is reported, never fatal: berth-proxy keeps its
    /// last config.
    async fn refresh_berth_proxy(&mut self) {
        let (Some(sup), Some(d)) = (&mut self.berth_proxy, &self.desired) else {
            return;
        };
        let written = match crate::proxy::config_from(d, &self.settings.sealing, &self.runtime.local_health()) {
            Ok(cfg) => sup.write(&cfg).await,
            Err(e) => Err(e),
        };
        let written = match written {
            Ok(written) => {
                self.berth_proxy_error = None;
                written
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "proxy config not updated");
                self.berth_proxy_error = Some(format!("proxy: {e:#}"));
                false
            }
        };
        sup.ensure_running().await;
        let loaded = match written {
            true => sup.wait_loaded().await,
            // Unchanged: only look whether a slow proxy caught up.
            false => sup.check_loaded().await,
        };
        if loaded {
            self.berth_proxy_unloaded = None;
        } else if written {
            self.berth_proxy_unloaded = Some(format!(
                "proxy: berth-proxy has not loaded config revision {} within {} s (see {})",
                sup.written_revision().unwrap_or_default(),
                crate::proxy::LOAD_WAIT.as_secs(),
                self.settings
                    .berth_proxy
                    .as_ref()
                    .map(|p| p.dir.join("berth-proxy.log").display().to_string())
                    .unwrap_or_default()
            ));
        }
    }

    /// Looks whether berth-proxy now serves the config of the last document
    /// applied (it was slow, or it restarted); if so the applied revision
    /// moves. Returns whether the applied revision moved.
    async fn confirm_proxy(&mut self) -> bool {
        let Some(sup) = &mut self.berth_proxy else {
            return false;
        };
        if !sup.check_loaded().await {
            return false;
        }
        self.berth_proxy_unloaded = None;
        if self.berth_proxy_error.is_some() {
            return false;
        }
        let moved = self.applied.proxy_serves();
        if moved {
            tracing::info!(revision = self.applied.applied, "berth-proxy serves it: applied");
        }
        moved
    }

    /// Starts the DNS server on the container gateway (IP_FREEBIND: the bridge
    /// may not exist yet), or moves it when the subnet changed.
    async fn ensure_dns(&mut self, subnet: ipnet::Ipv4Net) -> anyhow::Result<()> {
        let gateway = subnet.hosts().next().context("node.subnet has no gateway address")?;
        let listen = SocketAddr::new(IpAddr::V4(gateway), self.settings.dns_port);
        if matches!(&self.dns, Some((at, _)) if *at == listen) {
            return Ok(());
        }
        if let Some((_, old)) = self.dns.take() {
            old.shutdown().await;
        }
        let upstreams = dns::upstreams_from_resolv_conf(&self.settings.resolv_conf, &[IpAddr::V4(gateway)])
            .unwrap_or_else(|e| {
                tracing::warn!(error = %format!("{e:#}"), "no upstream resolvers: names outside the zone will be refused");
                vec![]
            });
        let server = DnsServer::start(
            DnsConfig {
                listen: vec![listen],
                zone: self.settings.runtime.zone.clone(),
                upstreams,
            },
            Default::default(),
        )
        .await
        .with_context(|| format!("starting the DNS server on {listen}"))?;
        self.dns = Some((listen, server));
        Ok(())
    }

    fn refresh_dns(&self) {
        if let (Some((_, server)), Some(d)) = (&self.dns, &self.desired) {
            server.set_records(records::build(d, &self.runtime.local_health()));
        }
    }

    /// Repairs containers, runs due health checks and checks on
    /// berth-proxy; returns whether a replica changed, the applied revision
    /// moved or the domains berth-proxy serves changed (the caller then
    /// reports at once).
    pub async fn tick(&mut self) -> bool {
        let served_before = self.served_domains();
        let changed = self.runtime.tick().await;
        if changed || self.berth_proxy_error.is_some() {
            // Local health moved (the proxy's upstreams follow), or the last
            // config write failed: build and write it again.
            self.refresh_berth_proxy().await;
        } else if let Some(sup) = &mut self.berth_proxy {
            // Only keep it running; the config is unchanged.
            sup.ensure_running().await;
        }
        if changed {
            self.refresh_dns();
            if self.runtime.statuses().iter().all(|s| s.error.is_none()) {
                self.containers_error = None;
            }
        }
        let applied_moved = self.confirm_proxy().await;
        changed || applied_moved || self.served_domains() != served_before
    }

    /// When to call [`Reconciler::tick`] again.
    pub fn tick_interval(&self) -> std::time::Duration {
        self.runtime.tick_interval()
    }

    /// Proxy nodes: the domains berth-proxy serves, as of the config it was
    /// last seen serving. None on workers.
    fn served_domains(&self) -> Option<Vec<String>> {
        self.berth_proxy.as_ref().map(|sup| sup.served_domains().to_vec())
    }

    /// The report of what was applied, without peer state (heartbeats
    /// add it from [`Reconciler::mesh_status`]).
    pub fn report(&self) -> StatusReport {
        StatusReport {
            applied_revision: self.applied.applied,
            agent_version: crate::VERSION.to_string(),
            peers: vec![],
            peers_up: None,
            peers_down: None,
            error: self
                .last_error
                .clone()
                .or_else(|| self.containers_error.clone())
                .or_else(|| self.berth_proxy_error.clone())
                .or_else(|| self.berth_proxy_unloaded.clone()),
            rss_bytes: rss_bytes(),
            containers: self.runtime.statuses(),
            upgrade_error: None,
            served_domains: self.served_domains(),
            usage: None,
        }
    }

    /// Every mesh peer's handshake age and counters; None without a mesh
    /// or when the interface could not be read (nothing is known then).
    pub async fn mesh_status(&self) -> Option<Vec<berth_protocol::PeerStatus>> {
        match self.mesh.as_ref()?.status().await {
            Ok(status) => Some(status),
            Err(e) => {
                tracing::warn!(error = %e, "reading WireGuard peer status failed");
                None
            }
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.settings.data_dir
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::AppliedGate;

    #[test]
    fn applied_moves_only_once_the_proxy_serves_it() {
        let mut g = AppliedGate::default();
        g.applied(3, true);
        assert_eq!((g.applied, g.received()), (3, 3));
        // The proxy has not loaded 4's config: 3 is reported, 4 not fetched again.
        g.applied(4, false);
        assert_eq!((g.applied, g.received()), (3, 4));
        // A newer document, still not loaded: it is the one waited for.
        g.applied(5, false);
        assert_eq!((g.applied, g.received()), (3, 5));
        assert!(g.proxy_serves(), "loaded: 5 is applied");
        assert_eq!((g.applied, g.received()), (5, 5));
        assert!(!g.proxy_serves(), "nothing was pending");
        // A document whose proxy config is unchanged and served moves at once.
        g.applied(6, true);
        assert_eq!((g.applied, g.received()), (6, 6));
        // Loaded later under a document that did not wait: nothing moves back.
        g.applied(7, false);
        g.applied(8, true);
        assert!(!g.proxy_serves());
        assert_eq!((g.applied, g.received()), (8, 8));
    }
}
