//! `berth-agent`, the per-node daemon: flags, logging, registration, then the
//! data plane from the cached desired state and the long-poll loop
//! (`sync_loop`). Each desired state goes to `berth_agent::reconcile`, which
//! runs the reconcilers (mesh, firewall, DNS, containers, berth-proxy).

use anyhow::{bail, Context};
use berth_agent::client::{fetch_pinned_ca, Client, Poll, Refused};
use berth_agent::containers::RuntimeConfig;
use berth_agent::identity::{self, Identity, Registration};
use berth_agent::proxy::BerthProxySettings;
use berth_agent::reconcile::{self, Reconciler, Settings};
use berth_agent::upgrade::{self, Upgrader};
use berth_protocol::token::JoinToken;
use berth_protocol::{RegisterRequest, StatusReport};
use clap::Parser;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// berth-agent: the per-node daemon. Registers with the control plane once
/// (with --token), then keeps this node's WireGuard mesh, firewall, containers
/// (on Podman) and cluster DNS in the state the control plane asks for. It starts from its cached state, so the
/// data plane comes up even while the control plane is unreachable.
#[derive(Parser)]
#[command(name = "berth-agent", version = berth_agent::VERSION)]
struct Args {
    /// Control plane URL, e.g. https://cp.example.com:7443.
    #[arg(long, env = "BERTH_URL")]
    url: Option<String>,
    /// Join token from `berth token create`; needed on the first run only.
    #[arg(long, env = "BERTH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Where keys, the registration and the cached desired state live.
    #[arg(long, default_value = "/var/lib/berth", env = "BERTH_DATA_DIR")]
    data_dir: PathBuf,
    /// Register as a proxy node (must match the token).
    #[arg(long)]
    proxy: bool,
    /// Node name (a DNS label). Default: the host name.
    #[arg(long)]
    name: Option<String>,
    /// WireGuard interface name (unique on the host).
    #[arg(long, default_value = "berth0")]
    interface: String,
    /// WireGuard UDP port.
    #[arg(long, default_value_t = 51820)]
    wg_port: u16,
    /// This node's address on its local network with prefix (peers on the
    /// same network use it). Default: the address that routes to the control plane.
    #[arg(long)]
    private_addr: Option<ipnet::Ipv4Net>,
    /// Address peers on other networks reach this node at. Default: the
    /// address the control plane sees the node connect from.
    #[arg(long)]
    public_ip: Option<IpAddr>,
    /// wireguard-go binary, used when the kernel has no WireGuard module.
    #[arg(long, default_value = "wireguard-go")]
    wireguard_go: PathBuf,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 10)]
    heartbeat: u64,
    /// Podman's API socket (`systemctl enable --now podman.socket`).
    #[arg(long, default_value = "/run/podman/podman.sock")]
    podman_socket: PathBuf,
    /// Name of the Podman bridge network for this node's containers.
    #[arg(long, default_value = "berth")]
    podman_network: String,
    /// Linux bridge of that network (at most 15 characters).
    #[arg(long, default_value = "berth-br0")]
    bridge: String,
    /// The cluster DNS zone served on the container gateway.
    #[arg(long, default_value = "internal")]
    dns_zone: String,
    /// Port of the DNS server on the container gateway.
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Where the upstream resolvers (for names outside the zone) are read from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Where Podman looks for registry CAs: the agent writes the control
    /// plane's CA there for the fleet registry's host.
    #[arg(long, default_value = "/etc/containers/certs.d")]
    containers_certs_dir: PathBuf,
    /// berth-proxy binary, run on proxy nodes. Default: next to this binary, else from PATH.
    #[arg(long)]
    proxy_binary: Option<PathBuf>,
    /// Proxy nodes: public HTTP address (ACME HTTP-01 and the redirect to HTTPS).
    #[arg(long, default_value = "0.0.0.0:80")]
    proxy_http: String,
    /// Proxy nodes: public HTTPS address.
    #[arg(long, default_value = "0.0.0.0:443")]
    proxy_https: String,
    /// Proxy nodes: Prometheus metrics address (keep it local).
    #[arg(long, default_value = "127.0.0.1:9180")]
    proxy_metrics: String,
    /// The agent's own Prometheus metrics (docs/monitoring.md); `off` serves none.
    #[arg(long, default_value = "127.0.0.1:9181")]
    metrics: String,
    /// Proxy nodes: run berth-proxy as this user, with only CAP_NET_BIND_SERVICE.
    #[arg(long)]
    proxy_user: Option<String>,
    /// Proxy nodes: berth-proxy is run by systemd (berth-proxy.service), not
    /// by the agent; the agent only writes its config and waits for the reload.
    #[arg(long)]
    proxy_external: bool,
    /// Register with the control plane (--url, --token) and exit; setup.sh uses
    /// it so a bad token fails the install before any service starts.
    #[arg(long)]
    register_only: bool,
    /// Script `berth nodes upgrade` runs (through systemd-run) to upgrade this node.
    #[arg(long, default_value = "/usr/local/lib/berth/update.sh")]
    update_script: PathBuf,
    /// Seconds a replica that was healthy may fail its health check before
    /// it is restarted (then, if restarts do not help, recreated); 0 turns
    /// autoheal off.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    autoheal_after: u64,
    /// Workers: take no image builds (by default every worker may build).
    #[arg(long, conflicts_with = "builder")]
    no_builds: bool,
    /// Workers: preferred for image builds; other workers build only while
    /// no --builder node of the architecture is free.
    #[arg(long)]
    builder: bool,
    /// How this node builds images: auto (BuildKit when `buildctl` is
    /// installed and buildkitd answers at --buildkit-addr, else Podman's
    /// builder), buildkit or podman.
    #[arg(long, default_value = "auto", value_parser = berth_agent::build::EngineChoice::parse)]
    build_engine: berth_agent::build::EngineChoice,
    /// The buildkitd that `buildctl` talks to.
    #[arg(long, default_value = berth_agent::build::buildkit::DEFAULT_ADDR)]
    buildkit_addr: String,
    /// The file this agent's output goes to, for `berth nodes logs` when the
    /// agent does not run under systemd (whose journal is read otherwise).
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,
    /// Log format: text, json, or journald (default: journald under systemd, else text).
    #[arg(long, value_parser = ["text", "json", "journald"])]
    log_format: Option<String>,
}

fn init_logging(format: Option<&str>) {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let format = format.unwrap_or(if std::env::var_os("JOURNAL_STREAM").is_some() {
        "journald"
    } else {
        "text"
    });
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        "journald" => match tracing_journald::layer() {
            Ok(j) => registry.with(j).init(),
            Err(_) => registry.with(tracing_subscriber::fmt::layer()).init(),
        },
        "json" => registry.with(tracing_subscriber::fmt::layer().json()).init(),
        _ => registry.with(tracing_subscriber::fmt::layer()).init(),
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    init_logging(args.log_format.as_deref());
    if let Err(e) = run(args).await {
        tracing::error!("{e:#}");
        eprintln!("berth-agent: {e:#}");
        std::process::exit(1);
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_lowercase())
        .unwrap_or_default()
}

/// The local address used to reach `url`'s host, with its prefix length.
async fn detect_private_addr(url: &str) -> Option<ipnet::Ipv4Net> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?.to_string();
    let port = u.port_or_known_default()?;
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .ok()?
        .find(|a| a.is_ipv4())?;
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(target).ok()?;
    let IpAddr::V4(local) = sock.local_addr().ok()?.ip() else {
        return None;
    };
    let out = tokio::process::Command::new("ip")
        .args(["-j", "-4", "addr", "show"])
        .output()
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    for link in v.as_array()? {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["local"].as_str() == Some(&local.to_string()) {
                let prefix = a["prefixlen"].as_u64()? as u8;
                return ipnet::Ipv4Net::new(local, prefix).ok();
            }
        }
    }
    None
}

async fn register(args: &Args, id: &Identity) -> anyhow::Result<Registration> {
    let Some(url) = &args.url else {
        bail!("--url: needed for the first run (this node is not registered yet)")
    };
    let Some(token) = &args.token else {
        bail!("--token: this node is not registered yet; create a token with `berth token create` on the control plane")
    };
    let token = JoinToken::parse(token).map_err(anyhow::Error::msg)?;
    let name = args.name.clone().unwrap_or_else(hostname);
    berth_protocol::names::validate_dns_label("--name", &name).map_err(anyhow::Error::msg)?;
    tracing::info!(%url, %name, "registering with the control plane");
    let ca = fetch_pinned_ca(url, &token).await?;
    let ca_path = args.data_dir.join("ca.pem");
    std::fs::write(&ca_path, &ca)?;
    let private_addr = match args.private_addr {
        Some(a) => Some(a),
        None => detect_private_addr(url).await,
    };
    let client = Client::new(url, &ca_path, id.signing_key.clone(), String::new())?;
    let resp = client
        .register(&RegisterRequest {
            token: token.to_string(),
            name: name.clone(),
            signing_key: id.signing_public(),
            wg_public_key: id.wg_public.clone(),
            wg_port: args.wg_port,
            private_addr: private_addr.map(|a| a.to_string()),
            public_ip: args.public_ip,
            proxy: args.proxy,
            sealing_key: Some(id.sealing_public()),
        })
        .await?;
    let reg = Registration {
        node_id: resp.node_id,
        name: resp.name,
        url: url.clone(),
        proxy: args.proxy,
    };
    identity::save_registration(&args.data_dir, &reg)?;
    tracing::info!(node_id = %reg.node_id, mesh_ip = %resp.mesh_ip, subnet = %resp.subnet, "registered");
    Ok(reg)
}

/// `berth-proxy` next to this binary (how releases and the lab ship it), else from PATH.
fn default_proxy_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("berth-proxy")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("berth-proxy"))
}

fn notify(state: sd_notify::NotifyState) {
    let _ = sd_notify::notify(false, &[state]);
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("--data-dir {}", args.data_dir.display()))?;
    let id = Identity::load_or_create(&args.data_dir)?;
    let reg = match identity::load_registration(&args.data_dir)? {
        Some(r) => {
            if args.token.is_some() {
                tracing::info!(node = %r.name, "already registered; ignoring --token");
            }
            r
        }
        None => register(&args, &id).await?,
    };
    if args.register_only {
        println!("registered as {} ({})", reg.name, reg.node_id);
        return Ok(());
    }
    let url = args.url.clone().unwrap_or_else(|| reg.url.clone());
    let rec = Arc::new(Mutex::new(Reconciler::new(Settings {
        data_dir: args.data_dir.clone(),
        interface: args.interface.clone(),
        wireguard_go: args.wireguard_go.clone(),
        wg_private: id.wg_private.clone(),
        sealing: id.sealing.clone(),
        runtime: RuntimeConfig {
            socket: args.podman_socket.clone(),
            network: args.podman_network.clone(),
            bridge: args.bridge.clone(),
            zone: args.dns_zone.clone(),
            volumes_dir: args.data_dir.join("volumes"),
            autoheal: berth_agent::containers::autoheal::Policy {
                after: Duration::from_secs(args.autoheal_after),
                ..Default::default()
            },
        },
        resolv_conf: args.resolv_conf.clone(),
        dns_port: args.dns_port,
        certs_dir: args.containers_certs_dir.clone(),
        berth_proxy: reg.proxy.then(|| BerthProxySettings {
            binary: args.proxy_binary.clone().unwrap_or_else(default_proxy_binary),
            dir: args.data_dir.join("proxy"),
            http: args.proxy_http.clone(),
            https: args.proxy_https.clone(),
            metrics: args.proxy_metrics.clone(),
            user: args.proxy_user.clone(),
            external: args.proxy_external,
        }),
    })));

    // Data plane first, from the cache: the control plane may be down.
    let cached = reconcile::load_cache(&args.data_dir);
    if let Some(cached) = &cached {
        match rec.lock().await.apply(cached).await {
            Ok(()) => tracing::info!(revision = cached.revision, "applied the cached desired state"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "applying the cached desired state failed"),
        }
        notify(sd_notify::NotifyState::Ready);
    }

    let client = Arc::new(
        Client::new(
            &url,
            &args.data_dir.join("ca.pem"),
            id.signing_key.clone(),
            reg.node_id.clone(),
        )?
        .with_sessions(id.sealing.clone()),
    );
    let report_now = Arc::new(tokio::sync::Notify::new());
    let snapshot = berth_agent::metrics::SharedSnapshot::default();
    if let Some(d) = &cached {
        if let Ok(mut s) = snapshot.lock() {
            s.peer_names(&d.peers);
        }
    }
    match args.metrics.as_str() {
        "off" => {}
        addr => match addr.parse() {
            Ok(addr) => {
                tokio::spawn(berth_agent::metrics::serve(
                    addr,
                    snapshot.clone(),
                    berth_agent::podman::Podman::new(&args.podman_socket),
                ));
            }
            Err(_) => anyhow::bail!("--metrics {addr:?}: not an address (IP:PORT) or off"),
        },
    }
    let reporter = Arc::new(Reporter {
        client: client.clone(),
        snapshot,
        data_dir: args.data_dir.clone(),
        upgrader: std::sync::Mutex::new(Upgrader::new(args.data_dir.clone(), args.update_script.clone())),
    });
    // A reverted upgrade is reported from the first heartbeat on, not only
    // once the desired state next changes.
    if let (Some(d), Ok(mut u)) = (&cached, reporter.upgrader.lock()) {
        u.want(d.upgrade_to.as_deref());
    }
    tokio::spawn(heartbeat(
        reporter.clone(),
        rec.clone(),
        Duration::from_secs(args.heartbeat.max(1)),
        report_now.clone(),
        berth_agent::podman::Podman::new(&args.podman_socket),
    ));
    tokio::spawn(container_ticks(rec.clone(), report_now));
    tokio::spawn(watchdog());
    tokio::spawn(berth_agent::streams::run(
        client.clone(),
        berth_agent::podman::Podman::new(&args.podman_socket),
        berth_agent::streams::AgentLog {
            file: args.log_file.clone(),
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
        },
    ));
    if reg.proxy {
        if args.builder {
            tracing::warn!("--builder: proxy nodes do not build; ignored");
        }
    } else if !args.no_builds {
        // A builder that cannot build is left out; the node runs on.
        match args.build_engine.resolve(&args.buildkit_addr).await {
            Ok(engine) => {
                tracing::info!(?engine, "builds enabled");
                tokio::spawn(berth_agent::build::run(
                    client.clone(),
                    berth_agent::build::BuilderSettings {
                        engine,
                        podman: berth_agent::podman::Podman::new(&args.podman_socket),
                        sealing: id.sealing.clone(),
                        work_dir: args.data_dir.join("builds"),
                        arch: berth_protocol::build::host_arch().to_string(),
                        preferred: args.builder,
                    },
                ));
            }
            Err(e) => tracing::error!(error = %e, "this node does not build"),
        }
    }
    sync_loop(client, reporter, rec).await
}

/// Sends status reports; after each accepted one, writes the status file
/// update.sh waits for.
struct Reporter {
    client: Arc<Client>,
    /// What `--metrics` shows.
    snapshot: berth_agent::metrics::SharedSnapshot,
    data_dir: PathBuf,
    upgrader: std::sync::Mutex<Upgrader>,
}

impl Reporter {
    async fn send(&self, mut report: StatusReport) {
        report.upgrade_error = self.upgrader.lock().map(|u| u.error()).unwrap_or_default();
        if let Ok(mut s) = self.snapshot.lock() {
            s.reported(&report);
        }
        match self.client.report(&report).await {
            Ok(()) => {
                if let Err(e) = upgrade::write_status(&self.data_dir) {
                    tracing::warn!(error = %e, "writing the status file failed");
                }
            }
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "status report failed"),
        }
    }
}

/// Long-polls the control plane and applies every new revision.
async fn sync_loop(client: Arc<Client>, reporter: Arc<Reporter>, rec: Arc<Mutex<Reconciler>>) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(250);
    loop {
        let after = rec.lock().await.received_revision();
        match client.poll_desired(after, 25).await {
            Ok(Poll::Unchanged) => backoff = Duration::from_millis(250),
            Ok(Poll::Changed(d)) => {
                if let Err(e) = reconcile::save_cache(rec.lock().await.data_dir(), &d) {
                    tracing::warn!(error = %format!("{e:#}"), "caching the desired state failed");
                }
                let started = std::time::Instant::now();
                let res = rec.lock().await.apply(&d).await;
                berth_agent::metrics::applied(started.elapsed().as_secs_f64());
                if let Ok(mut s) = reporter.snapshot.lock() {
                    s.peer_names(&d.peers);
                }
                notify(sd_notify::NotifyState::Ready);
                if let Ok(mut u) = reporter.upgrader.lock() {
                    u.want(d.upgrade_to.as_deref());
                }
                // Only the revision matters here; peer state rides on heartbeats.
                let report = rec.lock().await.report();
                reporter.send(report).await;
                match res {
                    Ok(()) => {
                        tracing::debug!(revision = d.revision, "applied");
                        backoff = Duration::from_millis(250);
                    }
                    Err(e) => {
                        tracing::warn!(revision = d.revision, error = %format!("{e:#}"), "apply failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
            Err(e) => {
                let gone = e.downcast_ref::<Refused>().map(|r| r.status.as_u16());
                match gone {
                    Some(401) | Some(410) => {
                        tracing::error!(error = %format!("{e:#}"), "the control plane refuses this node; keeping the current state")
                    }
                    _ => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot reach the control plane; keeping the current state")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(if gone.is_some() { 60 } else { 5 }));
            }
        }
    }
}

/// Pings systemd's watchdog (WatchdogSec= in the unit) at half its period
/// from a task of its own: an image pull may hold the reconciler for minutes
/// and must not get the agent killed; a wedged runtime stops the pings.
async fn watchdog() {
    let Some(us) = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_micros(us / 2).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        notify(sd_notify::NotifyState::Watchdog);
    }
}

/// Every second (more often while a new replica waits for its first
/// passing check): repair containers and run due health checks; a change is
/// reported at once (it moves DNS on every node).
async fn container_ticks(rec: Arc<Mutex<Reconciler>>, report_now: Arc<tokio::sync::Notify>) {
    loop {
        let wait = {
            let mut rec = rec.lock().await;
            if rec.tick().await {
                report_now.notify_one();
            }
            rec.tick_interval()
        };
        tokio::time::sleep(wait).await;
    }
}

async fn heartbeat(
    reporter: Arc<Reporter>,
    rec: Arc<Mutex<Reconciler>>,
    every: Duration,
    report_now: Arc<tokio::sync::Notify>,
    podman: berth_agent::podman::Podman,
) {
    let mut tick = tokio::time::interval(every);
    let mut usage = berth_agent::usage::Sampler::default();
    // Reports carry the peers down and a count of the rest, and only when
    // that changed or on every PEERS_EVERY-th heartbeat (never with urgent
    // or apply reports): a list of every peer would grow with the fleet.
    let mut peer_state = berth_agent::mesh::PeerStateReports::default();
    loop {
        let urgent = tokio::select! {
            _ = tick.tick() => false,
            _ = report_now.notified() => true,
        };
        if urgent {
            let report = rec.lock().await.report();
            reporter.send(report).await;
            continue;
        }
        let (mut report, mesh) = {
            let rec = rec.lock().await;
            (rec.report(), rec.mesh_status().await)
        };
        if let Some(mesh) = mesh {
            if let Some((up, down)) = peer_state.next(&mesh) {
                report.peers_up = Some(up);
                report.peers_down = Some(down);
            }
            if let Ok(mut s) = reporter.snapshot.lock() {
                s.mesh_status(mesh);
            }
        }
        usage.fill(&podman, &mut report).await;
        reporter.send(report).await;
    }
}
