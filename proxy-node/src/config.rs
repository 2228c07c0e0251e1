//! The config file: loading and validating it into an immutable
//! [`LoadedConfig`], swapping loaded configs atomically, and watching the file
//! (inode/mtime poll every [`POLL_INTERVAL`], and SIGHUP).

use crate::access_log::AccessLog;
use crate::metrics::{HostStats, Metrics};
use crate::tls;
use crate::upstream::{Pool, UpstreamStates};
use crate::{Options, Timeouts};
use anyhow::Context;
use berth_protocol::proxy::ProxyConfig;
use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// How often the config file is stat()ed for a change (inode, size, times):
/// one `statx` per tick, so a short interval is cheap, and a new config is
/// served within it. Rollouts wait for a proxy to load a config twice per
/// replica, so this bounds their pace.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// An HTTP route: its upstreams and its counters.
#[derive(Debug)]
pub struct Route {
    pub domain: Box<str>,
    pub pool: Pool,
    pub stats: Arc<HostStats>,
}

/// One loaded configuration; never changed, replaced as a whole.
#[derive(Default)]
pub struct LoadedConfig {
    pub revision: u64,
    pub http_routes: HashMap<Box<str>, Arc<Route>>,
    pub passthrough: HashMap<Box<str>, Arc<Pool>>,
    pub tcp_routes: HashMap<u16, Arc<Pool>>,
    pub certs: HashMap<Box<str>, Arc<CertifiedKey>>,
    /// token → key authorization.
    pub http01: HashMap<Box<str>, Bytes>,
    /// domain → challenge certificate.
    pub alpn01: HashMap<Box<str>, Arc<CertifiedKey>>,
}

impl std::fmt::Debug for LoadedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedConfig")
            .field("revision", &self.revision)
            .field("http_routes", &self.http_routes.len())
            .field("passthrough", &self.passthrough.len())
            .field("tcp_routes", &self.tcp_routes.len())
            .field("certs", &self.certs.len())
            .finish_non_exhaustive()
    }
}

fn domain_key(field: &str, d: &str) -> Result<Box<str>, String> {
    let d = d.trim_end_matches('.').to_ascii_lowercase();
    if d.is_empty() || d.len() > 253 || d.bytes().any(|b| !(b.is_ascii_alphanumeric() || b"-._*".contains(&b))) {
        return Err(format!("{field}: {d:?} is not a host name"));
    }
    Ok(d.into())
}

impl LoadedConfig {
    /// Validates `cfg` and builds a loaded config. Upstream state (ejection, idle connections) is taken
    /// from `old` and recorded in `new`. Any error rejects the whole file.
    pub fn build(
        cfg: &ProxyConfig,
        old: &UpstreamStates,
        new: &mut UpstreamStates,
        metrics: &Metrics,
    ) -> Result<LoadedConfig, String> {
        let mut s = LoadedConfig {
            revision: cfg.revision,
            ..Default::default()
        };
        for r in &cfg.http_routes {
            let domain = domain_key("http_routes", &r.domain)?;
            let pool = Pool::new(&r.upstreams, old, new).map_err(|e| format!("http_routes {domain}: {e}"))?;
            let route = Route {
                stats: metrics.host(&domain),
                domain: domain.clone(),
                pool,
            };
            if s.http_routes.insert(domain.clone(), Arc::new(route)).is_some() {
                return Err(format!("http_routes: {domain} appears twice"));
            }
        }
        for r in &cfg.passthrough {
            let domain = domain_key("passthrough", &r.domain)?;
            if s.http_routes.contains_key(&domain) {
                return Err(format!("passthrough: {domain} is also an HTTP route"));
            }
            let pool = Pool::new(&r.upstreams, old, new).map_err(|e| format!("passthrough {domain}: {e}"))?;
            if s.passthrough.insert(domain.clone(), Arc::new(pool)).is_some() {
                return Err(format!("passthrough: {domain} appears twice"));
            }
        }
        for r in &cfg.tcp_routes {
            if r.listen == 0 {
                return Err("tcp_routes: listen port 0".into());
            }
            let pool = Pool::new(&r.upstreams, old, new).map_err(|e| format!("tcp_routes {}: {e}", r.listen))?;
            if s.tcp_routes.insert(r.listen, Arc::new(pool)).is_some() {
                return Err(format!("tcp_routes: port {} appears twice", r.listen));
            }
        }
        for c in &cfg.certs {
            let domain = domain_key("certs", &c.domain)?;
            let ck = tls::certified_key(&c.chain_pem, &c.key_pem).map_err(|e| format!("certs {domain}: {e}"))?;
            s.certs.insert(domain, Arc::new(ck));
        }
        for h in &cfg.http01 {
            if h.token.is_empty() || h.token.contains('/') {
                return Err(format!("http01: token {:?} is not a token", h.token));
            }
            s.http01
                .insert(h.token.as_str().into(), Bytes::from(h.key_authorization.clone()));
        }
        for a in &cfg.alpn01 {
            let domain = domain_key("alpn01", &a.domain)?;
            let ck =
                tls::alpn_challenge_cert(&domain, &a.key_authorization).map_err(|e| format!("alpn01 {domain}: {e}"))?;
            s.alpn01.insert(domain, Arc::new(ck));
        }
        Ok(s)
    }
}

/// Reads and parses the config file.
pub fn read_file(path: &Path) -> anyhow::Result<ProxyConfig> {
    let text = std::fs::read(path).with_context(|| format!("reading config file {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// Everything the serving tasks share.
pub struct Shared {
    pub config_path: PathBuf,
    pub tcp_bind: IpAddr,
    pub timeouts: Timeouts,
    pub ejection: Duration,
    pub retries: u32,
    pub poll_interval: Duration,
    snap: watch::Sender<Arc<LoadedConfig>>,
    upstreams: Mutex<UpstreamStates>,
    reload_lock: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub tls: TlsAcceptor,
    /// Connection builders. Without ALPN h2 a connection is HTTP/1.1 (RFC 9113 §3.2).
    pub h1: http1::Builder,
    pub h2: http2::Builder<TokioExecutor>,
}

impl Shared {
    pub fn new(opts: Options) -> anyhow::Result<Arc<Shared>> {
        let (snap, rx) = watch::channel(Arc::new(LoadedConfig::default()));
        let resolver = Arc::new(tls::Resolver::new(rx));
        let tls = TlsAcceptor::from(tls::server_config(resolver).map_err(anyhow::Error::msg)?);
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            .header_read_timeout(opts.timeouts.header_read)
            .max_buf_size(opts.max_header_bytes)
            .max_header_size(opts.max_header_bytes)
            .keep_alive(true)
            .half_close(false);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(opts.max_header_bytes as u32)
            .max_concurrent_streams(256);
        let access_log = AccessLog::new(opts.access_log).context("starting the access-log writer")?;
        Ok(Arc::new(Shared {
            config_path: opts.config_path,
            tcp_bind: opts.tcp_bind,
            timeouts: opts.timeouts,
            ejection: opts.ejection,
            retries: opts.retries,
            poll_interval: opts.poll_interval,
            snap,
            upstreams: Mutex::new(HashMap::new()),
            reload_lock: tokio::sync::Mutex::new(()),
            metrics: Metrics::default(),
            access_log,
            tls,
            h1,
            h2,
        }))
    }

    /// Closes upstream connections that sat idle too long.
    pub fn prune_idle_upstreams(&self) {
        let upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        crate::client::prune_all(upstreams.values().map(|u| &*u.idle));
    }

    /// The configuration being served.
    pub fn config(&self) -> Arc<LoadedConfig> {
        self.snap.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<LoadedConfig>> {
        self.snap.subscribe()
    }

    /// Loads the file and swaps it in; on error the previous config stays.
    pub async fn reload(self: &Arc<Self>) -> anyhow::Result<u64> {
        let _serial = self.reload_lock.lock().await;
        let me = self.clone();
        let r = tokio::task::spawn_blocking(move || me.load()).await;
        let r = r.unwrap_or_else(|e| Err(anyhow::anyhow!("config load task failed: {e}")));
        match &r {
            Ok(rev) => {
                self.metrics.reloads_ok.fetch_add(1, Relaxed);
                self.metrics.revision.store(*rev, Relaxed);
            }
            Err(e) => {
                self.metrics.reloads_failed.fetch_add(1, Relaxed);
                tracing::error!("config not loaded, keeping revision {}: {e:#}", self.config().revision);
            }
        }
        r
    }

    fn load(&self) -> anyhow::Result<u64> {
        let cfg = read_file(&self.config_path)?;
        let mut upstreams = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = HashMap::new();
        let snap = LoadedConfig::build(&cfg, &upstreams, &mut new, &self.metrics)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", self.config_path.display()))?;
        *upstreams = new;
        tracing::info!(
            "config revision {} loaded: {} http routes, {} passthrough, {} tcp routes, {} certificates, {} challenges",
            snap.revision,
            snap.http_routes.len(),
            snap.passthrough.len(),
            snap.tcp_routes.len(),
            snap.certs.len(),
            snap.http01.len() + snap.alpn01.len()
        );
        let rev = snap.revision;
        self.snap.send_replace(Arc::new(snap));
        Ok(rev)
    }
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// Reloads when the file's inode, size or times change, and on SIGHUP.
pub async fn watch(shared: Arc<Shared>) {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!("cannot handle SIGHUP ({e}); relying on polling the config file");
            None
        }
    };
    let mut last = stamp(&shared.config_path);
    let mut tick = tokio::time::interval(shared.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let hup_recv = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {
                let now = stamp(&shared.config_path);
                if now != last {
                    last = now;
                    if now.is_some() {
                        let _ = shared.reload().await;
                    } else {
                        tracing::warn!("config file {} disappeared; keeping the current config", shared.config_path.display());
                    }
                }
            }
            _ = hup_recv => {
                tracing::info!("SIGHUP: reloading {}", shared.config_path.display());
                last = stamp(&shared.config_path);
                let _ = shared.reload().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::proxy::{ProxyCert, ProxyRoute, ProxyTcpRoute, Upstream};

    fn up(a: &str) -> Upstream {
        Upstream {
            addr: a.parse().unwrap(),
            local: false,
            healthy: true,
            weight: 1,
        }
    }

    #[test]
    fn builds_route_table() {
        let (c, k) = crate::tls::tests::self_signed(&["a.example.com"]);
        let cfg = ProxyConfig {
            revision: 3,
            http_routes: vec![ProxyRoute {
                domain: "A.Example.com".into(),
                upstreams: vec![up("10.0.0.1:80")],
            }],
            passthrough: vec![ProxyRoute {
                domain: "tls.example.com".into(),
                upstreams: vec![up("10.0.0.2:443")],
            }],
            tcp_routes: vec![ProxyTcpRoute {
                listen: 5432,
                upstreams: vec![up("10.0.0.3:5432")],
            }],
            certs: vec![ProxyCert {
                domain: "a.example.com".into(),
                chain_pem: c,
                key_pem: k,
            }],
            ..Default::default()
        };
        let m = Metrics::default();
        let mut reg = HashMap::new();
        let s = LoadedConfig::build(&cfg, &HashMap::new(), &mut reg, &m).unwrap();
        assert_eq!(s.revision, 3);
        assert!(s.http_routes.contains_key("a.example.com"));
        assert!(s.passthrough.contains_key("tls.example.com"));
        assert!(s.tcp_routes.contains_key(&5432));
        assert!(s.certs.contains_key("a.example.com"));
        assert_eq!(reg.len(), 3);
    }

    #[test]
    fn bad_configs_name_what_failed() {
        let m = Metrics::default();
        let build = |cfg: &ProxyConfig| LoadedConfig::build(cfg, &HashMap::new(), &mut HashMap::new(), &m).unwrap_err();
        let route = ProxyRoute {
            domain: "a.example.com".into(),
            upstreams: vec![up("10.0.0.1:80")],
        };
        let dup = ProxyConfig {
            http_routes: vec![route.clone(), route.clone()],
            ..Default::default()
        };
        assert!(build(&dup).contains("a.example.com appears twice"));
        let bad_cert = ProxyConfig {
            certs: vec![ProxyCert {
                domain: "a.example.com".into(),
                chain_pem: "nope".into(),
                key_pem: "nope".into(),
            }],
            ..Default::default()
        };
        assert!(build(&bad_cert).starts_with("certs a.example.com:"));
        let bad_name = ProxyConfig {
            http_routes: vec![ProxyRoute {
                domain: "a b".into(),
                ..route
            }],
            ..Default::default()
        };
        assert!(build(&bad_name).starts_with("http_routes:"));
    }
}
