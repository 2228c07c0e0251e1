//! `berth-control-plane serve`: parses the flags into a [`ServeConfig`],
//! starts the control plane (the library's `start`) and serves until
//! SIGTERM or Ctrl-C. Everything else lives in the library.

use berth_control_plane::acme::AcmeConfig;
use berth_control_plane::registry::RegistryConfig;
use berth_control_plane::{start, store::nodes::Pools, tls::OwnCert, ServeConfig};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// The Berth control plane: registers nodes, allocates their addresses and
/// pushes each node its desired state.
#[derive(Parser)]
#[command(name = "berth-control-plane", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API over HTTPS.
    Serve(Serve),
}

#[derive(clap::Args)]
struct Serve {
    /// Where the CA, the admin token and the SQLite store live.
    #[arg(long, default_value = "/var/lib/berth", env = "BERTH_DATA_DIR")]
    data_dir: PathBuf,
    /// Store URL: sqlite://PATH (default: DATA_DIR/cp.db) or postgres://USER:PASS@HOST/DB.
    #[arg(long, env = "BERTH_DATABASE")]
    database: Option<String>,
    /// Address and port to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// Extra name or IP for the generated certificate (repeatable). The first
    /// one is also used in the agent command printed with new tokens.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Use this certificate (PEM chain) instead of generating one.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA that signed --tls-cert; agents pin its hash. Default: the chain's last certificate.
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
    /// URL agents use to reach this control plane (printed with new tokens).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Pool node mesh IPs are taken from.
    #[arg(long, default_value = "10.100.0.0/16")]
    mesh_pool: ipnet::Ipv4Net,
    /// Pool node container subnets are taken from.
    #[arg(long, default_value = "10.200.0.0/13")]
    subnet_pool: ipnet::Ipv4Net,
    /// Prefix length of each node's container subnet.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(8..=30))]
    subnet_prefix: u8,
    /// A node without a heartbeat for this many seconds is shown offline.
    #[arg(long, default_value_t = 30)]
    offline_after: i64,
    /// ACME directory certificates for domains are ordered from.
    #[arg(long, default_value = berth_control_plane::acme::LETS_ENCRYPT)]
    acme_directory: String,
    /// ACME account contact, e.g. mailto:ops@example.com.
    #[arg(long)]
    acme_contact: Option<String>,
    /// Extra root certificate (PEM) to trust for the ACME server, e.g. Pebble's CA.
    #[arg(long)]
    acme_ca_file: Option<PathBuf>,
    /// Challenge type: http-01 (proxies answer on port 80), tls-alpn-01 (proxies, port 443)
    /// or dns-01 (a TXT record published by --acme-dns-hook; no proxy needed).
    #[arg(long, default_value = "http-01")]
    acme_challenge: berth_control_plane::acme::ChallengeKind,
    /// dns-01: executable run as `HOOK present|cleanup _acme-challenge.DOMAIN. VALUE`
    /// (no shell, 120 s limit); a non-zero exit fails the order with its stderr.
    #[arg(long)]
    acme_dns_hook: Option<PathBuf>,
    /// dns-01: seconds to wait after the hook's `present` before asking the CA to validate.
    #[arg(long, default_value_t = 0)]
    acme_dns_propagation_secs: u64,
    /// Signed agent builds served to nodes, made with `berth release sign`
    /// (default: DATA_DIR/releases).
    #[arg(long)]
    releases_dir: Option<PathBuf>,
    /// Where the fleet registry listens (default: --listen's address, port 5000).
    #[arg(long)]
    registry_listen: Option<std::net::SocketAddr>,
    /// The Distribution registry executable (Debian's docker-registry). When
    /// neither this nor --registry-listen is given and it is not installed,
    /// the control plane runs without a registry (and says so).
    #[arg(long)]
    registry_bin: Option<PathBuf>,
    /// A YAML file with the registry's `storage:` section, e.g. S3, instead
    /// of DATA_DIR/registry/storage (see docs/builds.md).
    #[arg(long)]
    registry_storage_config: Option<PathBuf>,
    /// Images kept per service by retention: those of its last N releases
    /// (plus whatever replicas run). Older images are deleted by the
    /// scheduled prune and by `berth image prune`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    image_retention: u64,
    /// How often retention and the registry's garbage collection run, in
    /// hours; 0: only when asked (`berth image prune`).
    #[arg(long, default_value_t = 24)]
    registry_prune_hours: u64,
    /// Largest build context accepted (`berth service deploy --build`), in
    /// MiB; a larger upload is refused with 413.
    #[arg(long, default_value_t = berth_protocol::build::DEFAULT_MAX_CONTEXT_MIB, value_parser = clap::value_parser!(u64).range(1..))]
    max_build_context_mib: u64,
    /// Live `berth logs` and `berth exec` streams one node may carry at once;
    /// one more is refused with 429 too_many_streams.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    max_streams_per_node: u64,
    /// Live streams the admin may hold at once, over all nodes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    max_streams_per_admin: u64,
    /// A `berth logs` reader that takes nothing for this many seconds has
    /// its stream cut (the control plane holds no more than a small buffer).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    stream_stall_secs: u64,
    /// A file holding a token `GET /metrics` takes (Bearer), so Prometheus
    /// needs no admin token; the admin token works too.
    #[arg(long, value_name = "FILE")]
    metrics_token_file: Option<PathBuf>,
    /// Events kept for `berth events`; older ones are deleted.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    event_retention: u64,
    /// POST every new event here, as a JSON array, signed with HMAC-SHA256
    /// in the X-Berth-Signature-256 header (`sha256=HEX`).
    #[arg(long, value_name = "URL", requires = "events_webhook_secret_file")]
    events_webhook: Option<String>,
    /// The webhook's HMAC key (the file's bytes, trailing newline dropped).
    #[arg(long, value_name = "FILE")]
    events_webhook_secret_file: Option<PathBuf>,
    /// How long a dashboard sign-in (`POST /v1/session`) lasts: 30m, 12h,
    /// 7d (1 minute to 30 days). The browser drops the cookie then too.
    #[arg(long, default_value = "12h", value_parser = session_ttl)]
    session_ttl: u64,
    /// Run no fleet registry.
    #[arg(long, conflicts_with_all = ["registry_listen", "registry_bin", "registry_storage_config"])]
    no_registry: bool,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// `--session-ttl`: a duration from one minute to 30 days.
fn session_ttl(s: &str) -> Result<u64, String> {
    let secs = berth_protocol::time::parse_duration(s)?;
    if !(60..=30 * 86_400).contains(&secs) {
        return Err(format!("{s:?} is outside 1m..30d"));
    }
    Ok(secs)
}

/// The registry to run, if any: off with --no-registry, and off (with a
/// warning) when docker-registry is not installed and no registry flag asks
/// for it; a flag that asks for it makes a missing binary an error.
fn registry_config(s: &Serve) -> Option<RegistryConfig> {
    const DEFAULT_BIN: &str = "/usr/bin/docker-registry";
    if s.no_registry {
        return None;
    }
    let asked = s.registry_listen.is_some() || s.registry_bin.is_some() || s.registry_storage_config.is_some();
    let binary = s.registry_bin.clone().unwrap_or_else(|| DEFAULT_BIN.into());
    if !asked && !binary.exists() {
        tracing::warn!(
            "{DEFAULT_BIN} is not installed: no fleet registry (apt install docker-registry, or pass --no-registry)"
        );
        return None;
    }
    Some(RegistryConfig {
        listen: s
            .registry_listen
            .unwrap_or_else(|| std::net::SocketAddr::new(s.listen.ip(), 5000)),
        binary,
        storage_config: s.registry_storage_config.clone(),
        retention: s.image_retention as usize,
        prune_every: (s.registry_prune_hours > 0)
            .then(|| std::time::Duration::from_secs(s.registry_prune_hours * 3600)),
    })
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Command::Serve(s) = Cli::parse().command;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt().with_env_filter(filter);
    if s.log_format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let database = s
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", s.data_dir.join("cp.db").display()));
    let registry = registry_config(&s);
    let webhook_secret = match &s.events_webhook_secret_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(k) if !k.trim().is_empty() => k.trim_end().as_bytes().to_vec(),
            Ok(_) => {
                eprintln!(
                    "berth-control-plane: --events-webhook-secret-file {}: empty",
                    f.display()
                );
                std::process::exit(2);
            }
            Err(e) => {
                eprintln!("berth-control-plane: --events-webhook-secret-file {}: {e}", f.display());
                std::process::exit(2);
            }
        },
        None => vec![],
    };
    if let Some(url) = &s.events_webhook {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            eprintln!("berth-control-plane: --events-webhook {url:?}: not an http:// or https:// URL");
            std::process::exit(2);
        }
    }
    let metrics_token = match &s.metrics_token_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                eprintln!("berth-control-plane: --metrics-token-file {}: empty", f.display());
                std::process::exit(2);
            }
            Err(e) => {
                eprintln!("berth-control-plane: --metrics-token-file {}: {e}", f.display());
                std::process::exit(2);
            }
        },
        None => None,
    };
    let cfg = ServeConfig {
        data_dir: s.data_dir,
        database,
        listen: s.listen,
        sans: s.sans,
        own_cert: s.tls_cert.map(|cert| OwnCert {
            cert,
            key: s.tls_key.unwrap_or_default(),
            ca: s.tls_ca,
        }),
        advertise_url: s.advertise_url,
        pools: Pools {
            mesh: s.mesh_pool.trunc(),
            subnets: s.subnet_pool.trunc(),
            subnet_prefix: s.subnet_prefix,
        },
        offline_after_secs: s.offline_after,
        acme: Some(AcmeConfig {
            contact: s.acme_contact,
            ca_file: s.acme_ca_file,
            challenge: s.acme_challenge,
            dns_hook: s.acme_dns_hook,
            dns_propagation: std::time::Duration::from_secs(s.acme_dns_propagation_secs),
            ..AcmeConfig::new(s.acme_directory)
        }),
        releases_dir: s.releases_dir,
        registry,
        builds: berth_control_plane::builds::BuildsConfig {
            max_context_bytes: s.max_build_context_mib << 20,
        },
        streams: berth_control_plane::streams::StreamLimits {
            per_node: s.max_streams_per_node as usize,
            per_admin: s.max_streams_per_admin as usize,
            stall_timeout: std::time::Duration::from_secs(s.stream_stall_secs),
            ..Default::default()
        },
        events: berth_control_plane::events::EventsConfig {
            retention: s.event_retention,
            webhook: s.events_webhook,
            webhook_secret,
        },
        metrics_token,
        sessions: berth_control_plane::sessions::SessionConfig {
            ttl: std::time::Duration::from_secs(s.session_ttl),
        },
    };
    let started = match start(cfg).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth-control-plane: {e:#}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "berth-control-plane: serving on https://{}\n  admin token: {}\n  CA:          {}",
        started.addr,
        started.admin_token_file.display(),
        started.ca_file.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        r = started.task => {
            if let Ok(Err(e)) = r { eprintln!("berth-control-plane: {e:#}"); std::process::exit(1); }
        }
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
