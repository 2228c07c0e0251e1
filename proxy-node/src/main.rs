//! The `berth-proxy` binary: command-line flags into [`berth_proxy::Options`],
//! then [`berth_proxy::start`] until SIGTERM or SIGINT. The proxy itself is the
//! library: start at its `lib.rs` (server → tls → http → upstream → client),
//! and docs/proxy.md.

use anyhow::Context;
use berth_proxy::{Listeners, Options, Timeouts};
use clap::Parser;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Berth proxy node: terminates TLS for the cluster's domains and routes
/// HTTP(S), TLS passthrough and TCP traffic to service replicas.
#[derive(Debug, Parser)]
#[command(name = "berth-proxy", version)]
struct Args {
    /// JSON config file (ProxyConfig) written by the agent; replaced
    /// atomically and reloaded when it changes (polled every 100 ms) or on SIGHUP.
    #[arg(long, value_name = "PATH")]
    config: PathBuf,
    /// Plain-HTTP listener: ACME HTTP-01 answers and redirects to HTTPS.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:80")]
    http: SocketAddr,
    /// HTTPS listener: TLS termination by SNI, TLS-ALPN-01, TLS passthrough.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:443")]
    https: SocketAddr,
    /// Prometheus metrics listener (text exposition at /metrics); `off` disables it.
    #[arg(long, value_name = "ADDR|off", default_value = "127.0.0.1:9180")]
    metrics: String,
    /// Address the config's TCP routes listen on (with each route's port).
    #[arg(long, value_name = "IP", default_value = "0.0.0.0")]
    tcp_bind: IpAddr,
    /// Access log, one JSON line per request: `stdout`, `off`, or a file path (appended).
    #[arg(long, value_name = "stdout|off|PATH", default_value = "stdout")]
    access_log: String,
    /// Time allowed to send the ClientHello and finish the TLS handshake.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    tls_handshake_timeout: Duration,
    /// HTTP/1.1: time allowed for a request's headers; also how long a
    /// keep-alive connection may wait for its next request.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// Close a client connection that moved no bytes for this long.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Connecting to an upstream (after which another upstream is tried).
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Waiting for an upstream's response headers (504 after); bodies may stream longer.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = parse_duration)]
    response_timeout: Duration,
    /// How long an upstream that failed is left out of rotation.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    ejection: Duration,
    /// Extra upstreams tried when connecting fails (requests without a body
    /// and idempotent methods, TCP routes, passthrough).
    #[arg(long, value_name = "N", default_value_t = 2)]
    retries: u32,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list); larger gets 431. At least 8192.
    #[arg(long, value_name = "BYTES", default_value_t = 65536)]
    max_header_bytes: usize,
    /// Worker threads; 0: one per CPU this process may run on. With one,
    /// a single-threaded runtime is used (no cross-thread wake-ups).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
}

/// `500ms`, `3s`, `2m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 3s, 2m)"))?;
    if !v.is_finite() || v < 0.0 || v * mul > 86400.0 * 365.0 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let threads = match args.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("starting the runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let access_log: Option<Box<dyn std::io::Write + Send>> = match args.access_log.as_str() {
        "off" => None,
        "stdout" | "-" => Some(Box::new(std::io::stdout())),
        path => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--access-log: opening {path}"))?,
        )),
    };
    let metrics = match args.metrics.as_str() {
        "off" => None,
        a => Some(
            a.parse::<SocketAddr>()
                .with_context(|| format!("--metrics: {a:?} is not an address"))?,
        ),
    };
    let opts = Options {
        config_path: args.config,
        tcp_bind: args.tcp_bind,
        timeouts: Timeouts {
            tls_handshake: args.tls_handshake_timeout,
            header_read: args.header_timeout,
            idle: args.idle_timeout,
            upstream_connect: args.connect_timeout,
            upstream_response: args.response_timeout,
        },
        max_header_bytes: args.max_header_bytes,
        ejection: args.ejection,
        retries: args.retries,
        poll_interval: berth_proxy::config::POLL_INTERVAL,
        access_log,
    };
    let listeners = Listeners::bind(args.http, args.https, metrics).await?;
    let proxy = berth_proxy::start(opts, listeners).await?;
    tracing::info!(
        "berth-proxy serving http on {:?}, https on {:?}, metrics on {:?}",
        proxy.http_addr(),
        proxy.https_addr(),
        proxy.metrics_addr()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: exiting"),
    }
    proxy.flush_access_log(Duration::from_secs(2));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Args::command().debug_assert();
        let a = Args::try_parse_from(["berth-proxy", "--config", "/x.json"]).unwrap();
        assert_eq!(a.https, "0.0.0.0:443".parse().unwrap());
        assert!(Args::try_parse_from(["berth-proxy"]).is_err(), "--config is required");
    }
}
