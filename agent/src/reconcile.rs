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
    pub applied_revision: u64,
    pub last_error: Option<String>,
    containers_error: Option<String>,
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
            settings,
            mesh: None,
            mesh_shape: None,
            firewall_rules: None,
            dns: None,
            desired: None,
            applied_revision: 0,
            last_error: None,
            containers_error: None,
        }
    }

    pub async fn apply(&mut self, d: &DesiredState) -> anyhow::Result<()> {
        let res = self.apply_inner(d).await;
        match &res {
            Ok(()) => {
                self.applied_revision = d.revision;
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

    /// Rewrites berth-proxy's config (when it changed) and keeps it running.
    /// A failure is reported, never fatal: berth-proxy keeps its last config.
    async fn refresh_berth_proxy(&mut self) {
        let (Some(sup), Some(d)) = (&mut self.berth_proxy, &self.desired) else {
            return;
        };
        let res = crate::proxy::config_from(d, &self.settings.sealing, &self.runtime.local_health())
            .and_then(|cfg| Ok((sup.write(&cfg)?, cfg.revision)));
        let written = match res {
            Ok((written, revision)) => {
                self.berth_proxy_error = None;
                written.then_some(revision)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "proxy config not updated");
                self.berth_proxy_error = Some(format!("proxy: {e:#}"));
                None
            }
        };
        sup.ensure_running().await;
        if let Some(revision) = written {
            sup.wait_loaded(revision).await;
        }
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

    /// Repairs containers and runs due health checks; returns whether a
    /// replica changed (the caller then reports at once).
    pub async fn tick(&mut self) -> bool {
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
        changed
    }

    pub async fn report(&self) -> StatusReport {
        let peers = match &self.mesh {
            Some(m) => m.status().await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading WireGuard peer status failed");
                vec![]
            }),
            None => vec![],
        };
        StatusReport {
            applied_revision: self.applied_revision,
            agent_version: crate::VERSION.to_string(),
            peers,
            error: self
                .last_error
                .clone()
                .or_else(|| self.containers_error.clone())
                .or_else(|| self.berth_proxy_error.clone()),
            rss_bytes: rss_bytes(),
            containers: self.runtime.statuses(),
            upgrade_error: None,
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
