//! `berth-proxy`: the internet-facing TLS terminator and router of a Berth
//! proxy node. Start reading at [`start`], then follow a request: [`server`]
//! (accept, ClientHello) → [`tls`] (certificate by SNI) → [`http`] (routing,
//! headers, retries) → [`upstream`] (picking a replica) → [`client`] (the
//! upstream HTTP/1.1 client).
//!
//! It reads its whole configuration ([`berth_protocol::proxy::ProxyConfig`])
//! from a JSON file that the agent replaces atomically, reloads it when the
//! file changes (polled) or on SIGHUP, and keeps serving the previous
//! configuration when a new file is bad.
//!
//! Embedding (tests, or a supervisor that wants the proxy in-process):
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use berth_proxy::{Listeners, Options};
//! let listeners = Listeners::bind("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?, None).await?;
//! let proxy = berth_proxy::start(Options::new("/run/berth/proxy.json".into()), listeners).await?;
//! println!("https on {}", proxy.https_addr().unwrap());
//! proxy.wait().await;
//! # Ok(()) }
//! ```

pub mod access_log;
pub mod client;
pub mod config;
pub mod http;
pub mod io;
pub mod metrics;
pub mod server;
pub mod sni;
pub mod tcp;
pub mod tls;
pub mod upstream;

use anyhow::Context;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use config::Shared;

/// Timeouts; every one of them has a command-line flag.
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// Reading the ClientHello and completing the TLS handshake.
    pub tls_handshake: Duration,
    /// HTTP/1.1: time allowed for a request's headers; it also bounds how
    /// long a keep-alive connection may wait for its next request.
    pub header_read: Duration,
    /// A client connection with no bytes read or written for this long is closed.
    pub idle: Duration,
    /// Connecting to an upstream.
    pub upstream_connect: Duration,
    /// Waiting for an upstream's response headers (the body may then stream
    /// for as long as it likes).
    pub upstream_response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tls_handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(30),
            idle: Duration::from_secs(120),
            upstream_connect: Duration::from_secs(3),
            upstream_response: Duration::from_secs(300),
        }
    }
}

/// How the proxy runs; [`Options::new`] gives the defaults of the binary.
pub struct Options {
    /// The JSON [`berth_protocol::proxy::ProxyConfig`] file.
    pub config_path: PathBuf,
    /// Address TCP routes listen on (`tcp_bind:listen`).
    pub tcp_bind: IpAddr,
    pub timeouts: Timeouts,
    /// Largest request head accepted (HTTP/1.1 read buffer, HTTP/2 header
    /// list); larger → 431. At least 8192.
    pub max_header_bytes: usize,
    /// How long an upstream that failed is left out of rotation.
    pub ejection: Duration,
    /// Extra attempts on another upstream when connecting fails (idempotent
    /// requests without a body, TCP routes, passthrough).
    pub retries: u32,
    /// How often the config file's inode/mtime is checked ([`config::POLL_INTERVAL`] by default).
    pub poll_interval: Duration,
    /// Where access-log JSON lines go; None disables the access log.
    pub access_log: Option<Box<dyn std::io::Write + Send>>,
}

impl Options {
    pub fn new(config_path: PathBuf) -> Self {
        Options {
            config_path,
            tcp_bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            timeouts: Timeouts::default(),
            max_header_bytes: 64 * 1024,
            ejection: Duration::from_secs(10),
            retries: 2,
            poll_interval: config::POLL_INTERVAL,
            access_log: Some(Box::new(std::io::stdout())),
        }
    }
}

/// The sockets the proxy serves; any may be absent.
#[derive(Default)]
pub struct Listeners {
    pub http: Option<TcpListener>,
    pub https: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the HTTP and HTTPS listeners (and metrics, when given).
    pub async fn bind(http: SocketAddr, https: SocketAddr, metrics: Option<SocketAddr>) -> anyhow::Result<Self> {
        let http = TcpListener::bind(http)
            .await
            .with_context(|| format!("binding HTTP listener {http}"))?;
        let https = TcpListener::bind(https)
            .await
            .with_context(|| format!("binding HTTPS listener {https}"))?;
        let metrics = match metrics {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .with_context(|| format!("binding metrics listener {a}"))?,
            ),
            None => None,
        };
        Ok(Listeners {
            http: Some(http),
            https: Some(https),
            metrics,
        })
    }
}

/// A running proxy. Dropping it does not stop it; call [`Proxy::shutdown`].
pub struct Proxy {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
}

/// Loads the config file (a missing or bad file is logged and the proxy
/// starts with an empty configuration, picking the file up once it is valid),
/// then serves every listener and watches the file.
pub async fn start(opts: Options, listeners: Listeners) -> anyhow::Result<Proxy> {
    if opts.max_header_bytes < 8192 {
        anyhow::bail!("max header bytes: must be at least 8192, got {}", opts.max_header_bytes);
    }
    let shared = Shared::new(opts)?;
    if let Err(e) = shared.reload().await {
        tracing::error!("initial config: {e:#}; serving an empty configuration until the file is valid");
    }
    let mut tasks = JoinSet::new();
    let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (http_addr, https_addr, metrics_addr) =
        (addr(&listeners.http), addr(&listeners.https), addr(&listeners.metrics));
    if let Some(l) = listeners.http {
        tasks.spawn(server::serve_http(shared.clone(), l));
    }
    if let Some(l) = listeners.https {
        tasks.spawn(server::serve_https(shared.clone(), l));
    }
    if let Some(l) = listeners.metrics {
        tasks.spawn(metrics::serve(shared.clone(), l));
    }
    tasks.spawn(config::watch(shared.clone()));
    tasks.spawn(tcp::manage(shared.clone()));
    let s = shared.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(client::PRUNE_INTERVAL);
        loop {
            every.tick().await;
            s.prune_idle_upstreams();
        }
    });
    Ok(Proxy {
        shared,
        tasks,
        http_addr,
        https_addr,
        metrics_addr,
    })
}

impl Proxy {
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    /// Revision of the configuration being served (0 before any valid file).
    pub fn revision(&self) -> u64 {
        self.shared.config().revision
    }
    /// Reads the config file now (as SIGHUP does); Err keeps the previous config.
    pub async fn reload(&self) -> anyhow::Result<u64> {
        self.shared.reload().await
    }
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
    /// Flushes buffered access-log lines (waits at most `max`).
    pub fn flush_access_log(&self, max: Duration) {
        self.shared.access_log.flush(max);
    }
    /// Runs until a serving task ends (which only happens on a fatal error).
    pub async fn wait(mut self) {
        while let Some(r) = self.tasks.join_next().await {
            if let Err(e) = r {
                if e.is_panic() {
                    tracing::error!("a proxy task panicked: {e}");
                }
            }
        }
    }
    /// Stops accepting on every listener (open connections are not waited for).
    pub fn shutdown(mut self) {
        self.tasks.abort_all();
    }
}
