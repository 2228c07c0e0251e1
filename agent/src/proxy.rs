//! berth-proxy, the agent's side of it: on a `--proxy` node, turns the proxy
//! part of the desired state into the config file of the `berth-proxy`
//! process ([`config_from`]) and keeps that process running
//! ([`BerthProxySupervisor`]). The proxy itself is the `proxy-node` crate.
//!
//! berth-proxy is its own process, in its own process group, so an agent
//! restart, upgrade or crash never drops a connection: a new agent adopts the
//! running proxy through its pid file. With `--proxy-user` it runs as that
//! user with only CAP_NET_BIND_SERVICE (through util-linux `setpriv`).

use anyhow::Context;
use berth_protocol::proxy::{ProxyCert, ProxyConfig, ProxyRoute, ProxyTcpRoute, Upstream, UpstreamDesired};
use berth_protocol::DesiredState;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use x25519_dalek::StaticSecret;

/// How the agent runs berth-proxy on this node.
#[derive(Debug, Clone)]
pub struct BerthProxySettings {
    pub binary: PathBuf,
    /// Holds config.json, berth-proxy.pid and berth-proxy.log.
    pub dir: PathBuf,
    pub http: String,
    pub https: String,
    pub metrics: String,
    pub user: Option<String>,
    /// berth-proxy is run by systemd (berth-proxy.service): write its config,
    /// never start or adopt it.
    pub external: bool,
}

/// The config for berth-proxy. Keys are opened with this node's sealing key;
/// local replicas' health is the agent's own.
pub fn config_from(
    d: &DesiredState,
    sealing: &StaticSecret,
    local_health: &BTreeMap<String, bool>,
) -> anyhow::Result<ProxyConfig> {
    let Some(p) = &d.proxy else {
        return Ok(ProxyConfig {
            revision: d.revision,
            ..Default::default()
        });
    };
    let upstreams = |list: &[UpstreamDesired]| -> Vec<Upstream> {
        list.iter()
            .map(|u| {
                let local = u.node == d.node.name;
                Upstream {
                    addr: SocketAddr::from((u.ip, u.port)),
                    local,
                    healthy: if local {
                        local_health.get(&u.replica).copied().unwrap_or(false)
                    } else {
                        u.healthy
                    },
                    weight: u.weight,
                }
            })
            .collect()
    };
    let mut certs = vec![];
    for c in &p.certs {
        let key = berth_protocol::seal::open(sealing, &c.sealed_key_pem).map_err(|e| {
            anyhow::anyhow!(
                "certificate for {}: the key does not open with this node's key: {e}",
                c.domain
            )
        })?;
        certs.push(ProxyCert {
            domain: c.domain.clone(),
            chain_pem: c.chain_pem.clone(),
            key_pem: String::from_utf8(key).with_context(|| format!("certificate for {}: key is not PEM", c.domain))?,
        });
    }
    Ok(ProxyConfig {
        revision: d.revision,
        http_routes: p
            .http_routes
            .iter()
            .map(|r| ProxyRoute {
                domain: r.domain.clone(),
                upstreams: upstreams(&r.upstreams),
            })
            .collect(),
        passthrough: p
            .passthrough
            .iter()
            .map(|r| ProxyRoute {
                domain: r.domain.clone(),
                upstreams: upstreams(&r.upstreams),
            })
            .collect(),
        tcp_routes: p
            .tcp_routes
            .iter()
            .map(|r| ProxyTcpRoute {
                listen: r.listen,
                upstreams: upstreams(&r.upstreams),
            })
            .collect(),
        certs,
        http01: p.http01.clone(),
        alpn01: p.alpn01.clone(),
    })
}

/// The domains a proxy with config `cfg` serves: every HTTP route with a
/// certificate for it (exact, or a wildcard for its parent, as berth-proxy
/// picks them) and every passthrough route; lowercased, without a trailing
/// dot, sorted. A challenge certificate (`alpn01`) does not serve a domain.
pub fn served_domains(cfg: &ProxyConfig) -> Vec<String> {
    let norm = |d: &str| d.trim_end_matches('.').to_ascii_lowercase();
    let certs: BTreeSet<String> = cfg.certs.iter().map(|c| norm(&c.domain)).collect();
    let has_cert = |d: &String| {
        certs.contains(d)
            || d.split_once('.')
                .is_some_and(|(_, parent)| parent.contains('.') && certs.contains(&format!("*.{parent}")))
    };
    let mut out: Vec<String> = cfg
        .http_routes
        .iter()
        .map(|r| norm(&r.domain))
        .filter(has_cert)
        .chain(cfg.passthrough.iter().map(|r| norm(&r.domain)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What berth-proxy's metrics say about the config it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadState {
    /// `berth_proxy_config_revision`: the revision of the config being served.
    pub revision: u64,
    /// `berth_proxy_config_reloads_total`: config files loaded (rejected
    /// ones are not counted) since the process started.
    pub reloads: u64,
}

/// The config file as last written, until berth-proxy is seen serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    revision: u64,
    /// The proxy's reload count just before the write, taken when it already
    /// served `revision`: a rewrite under the same revision (local health
    /// moved, or a new agent rewriting its cached revision) shows only as
    /// one more reload. None: the revision alone tells.
    reloads_before: Option<u64>,
    /// What the proxy serves once it loaded this file.
    domains: Vec<String>,
}

impl Written {
    /// Whether a proxy whose metrics read `seen` serves this file. A reload
    /// count that went down is a restarted proxy, which read the file anew.
    fn loaded_by(&self, seen: LoadState) -> bool {
        seen.revision == self.revision && self.reloads_before.is_none_or(|before| seen.reloads != before)
    }
}

/// Writes berth-proxy's config and keeps the berth-proxy process up.
pub struct BerthProxySupervisor {
    settings: BerthProxySettings,
    /// The config as last written, without the revision (a new revision that
    /// changes nothing for the proxy is not rewritten).
    written: Option<ProxyConfig>,
    /// The file last written and whether the proxy was seen serving it.
    last_write: Option<Written>,
    loaded: bool,
    /// The domains of the last config the running proxy was seen serving.
    served: Vec<String>,
    child: Option<tokio::process::Child>,
    adopted: Option<u32>,
    next_start: Instant,
    failures: u32,
}

impl BerthProxySupervisor {
    pub fn new(settings: BerthProxySettings) -> BerthProxySupervisor {
        BerthProxySupervisor {
            settings,
            written: None,
            last_write: None,
            loaded: false,
            served: vec![],
            child: None,
            adopted: None,
            next_start: Instant::now(),
            failures: 0,
        }
    }

    /// Whether the running berth-proxy serves the config file as last
    /// written (confirmed through its metrics).
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    /// The revision of the config file as last written.
    pub fn written_revision(&self) -> Option<u64> {
        self.last_write.as_ref().map(|w| w.revision)
    }

    /// The domains berth-proxy was last seen serving ([`served_domains`] of
    /// the config it loaded); empty while it is not running.
    pub fn served_domains(&self) -> &[String] {
        &self.served
    }

    /// The proxy process is gone: it serves nothing, and a new one loads the
    /// file afresh when it starts.
    fn lost(&mut self) {
        self.loaded = false;
        self.served.clear();
        if let Some(w) = &mut self.last_write {
            w.reloads_before = None;
        }
    }

    /// Records what the proxy's metrics read; returns whether it serves the
    /// file as last written.
    fn observe(&mut self, seen: Option<LoadState>) -> bool {
        if let (Some(w), Some(seen)) = (&self.last_write, seen) {
            if !self.loaded && w.loaded_by(seen) {
                self.loaded = true;
                self.served = w.domains.clone();
            }
        }
        self.loaded
    }

    pub fn config_path(&self) -> PathBuf {
        self.settings.dir.join("config.json")
    }

    fn pid_path(&self) -> PathBuf {
        self.settings.dir.join("berth-proxy.pid")
    }

    /// Replaces the config file atomically when it changed; returns whether
    /// it did. Until [`Self::wait_loaded`] or [`Self::check_loaded`] sees the
    /// proxy serve the new file, [`Self::is_loaded`] is false.
    pub async fn write(&mut self, cfg: &ProxyConfig) -> anyhow::Result<bool> {
        let mut cmp = cfg.clone();
        cmp.revision = 0;
        if self.written.as_ref() == Some(&cmp) && self.config_path().exists() {
            return Ok(false);
        }
        // Only a rewrite under the revision the proxy may already show
        // needs its reload count to be told apart.
        let same_revision = self.last_write.as_ref().is_none_or(|w| w.revision == cfg.revision);
        let reloads_before = match same_revision {
            true => load_state(&self.settings.metrics)
                .await
                .filter(|seen| seen.revision == cfg.revision)
                .map(|seen| seen.reloads),
            false => None,
        };
        std::fs::create_dir_all(&self.settings.dir)
            .with_context(|| format!("creating {}", self.settings.dir.display()))?;
        let path = self.config_path();
        berth_protocol::keyfile::write_private(&path, &serde_json::to_vec(cfg)?)
            .with_context(|| format!("writing {}", path.display()))?;
        if let Some(user) = &self.settings.user {
            chown(&path, user)?;
        }
        tracing::info!(
            revision = cfg.revision,
            routes = cfg.http_routes.len(),
            certs = cfg.certs.len(),
            tcp = cfg.tcp_routes.len(),
            "proxy config written"
        );
        self.written = Some(cmp);
        self.last_write = Some(Written {
            revision: cfg.revision,
            reloads_before,
            domains: served_domains(cfg),
        });
        self.loaded = false;
        Ok(true)
    }

    /// Waits, at most [`LOAD_WAIT`], until the proxy's metrics show that it
    /// serves the file as last written (it polls the file every 100 ms): the
    /// agent reports a revision applied only once berth-proxy serves it,
    /// which ACME challenges and rollouts rely on. No SIGHUP: a proxy
    /// started a moment ago may not handle it yet, and SIGHUP's default
    /// action would end it. Returns whether it got there.
    pub async fn wait_loaded(&mut self) -> bool {
        if self.loaded || self.last_write.is_none() || (!self.settings.external && self.pid().is_none()) {
            return self.loaded;
        }
        let deadline = Instant::now() + LOAD_WAIT;
        loop {
            let seen = load_state(&self.settings.metrics).await;
            if self.observe(seen) {
                return true;
            }
            if Instant::now() > deadline {
                tracing::warn!(
                    revision = self.written_revision(),
                    ?seen,
                    "berth-proxy has not loaded the new config yet"
                );
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Looks once whether the proxy serves the file as last written (a
    /// proxy that was slow, or restarted); returns [`Self::is_loaded`].
    pub async fn check_loaded(&mut self) -> bool {
        if self.loaded || self.last_write.is_none() {
            return self.loaded;
        }
        let seen = load_state(&self.settings.metrics).await;
        if self.observe(seen) {
            tracing::info!(revision = self.written_revision(), "berth-proxy serves the new config");
        }
        self.loaded
    }

    /// Starts berth-proxy unless it runs (ours, or adopted from a previous
    /// agent); restarts it with backoff when it died.
    pub async fn ensure_running(&mut self) {
        if self.settings.external {
            return;
        }
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(None) => return,
                Ok(Some(status)) => {
                    tracing::warn!(%status, "berth-proxy exited; restarting");
                    self.child = None;
                    self.lost();
                    self.failures += 1;
                    self.next_start = Instant::now() + backoff(self.failures);
                }
                Err(e) => tracing::warn!(error = %e, "berth-proxy status"),
            }
        }
        if self.adopted.is_none() && self.child.is_none() {
            self.adopted = self.running_from_pid_file();
            if let Some(pid) = self.adopted {
                tracing::info!(pid, "adopted the running berth-proxy");
            }
        }
        if let Some(pid) = self.adopted {
            if is_proxy(pid, &self.config_path()) {
                return;
            }
            tracing::warn!(pid, "the adopted berth-proxy is gone; starting a new one");
            self.adopted = None;
            self.lost();
        }
        if Instant::now() < self.next_start || !self.config_path().exists() {
            return;
        }
        match self.spawn() {
            Ok(child) => {
                let pid = child.id().unwrap_or_default();
                tracing::info!(pid, "started berth-proxy");
                let _ = std::fs::write(self.pid_path(), pid.to_string());
                self.child = Some(child);
            }
            Err(e) => {
                self.failures += 1;
                self.next_start = Instant::now() + backoff(self.failures);
                tracing::warn!(error = %format!("{e:#}"), "cannot start berth-proxy");
            }
        }
    }

    /// The pid of the running berth-proxy (ours or adopted).
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id()).or(self.adopted)
    }

    fn running_from_pid_file(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid_path()).ok()?.trim().parse().ok()?;
        is_proxy(pid, &self.config_path()).then_some(pid)
    }

    fn spawn(&self) -> anyhow::Result<tokio::process::Child> {
        let s = &self.settings;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("berth-proxy.log"))
            .context("opening berth-proxy.log")?;
        let config = self.config_path();
        let args: Vec<String> = vec![
            "--config".into(),
            config.display().to_string(),
            "--http".into(),
            s.http.clone(),
            "--https".into(),
            s.https.clone(),
            "--metrics".into(),
            s.metrics.clone(),
        ];
        let mut cmd = match &s.user {
            Some(user) => {
                // Numeric ids: the user's primary group is often not named
                // like the user (nobody:nogroup on Debian).
                let u = nix::unistd::User::from_name(user)
                    .with_context(|| format!("--proxy-user {user}"))?
                    .with_context(|| format!("--proxy-user: no user {user:?}"))?;
                let mut c = tokio::process::Command::new("setpriv");
                c.args([
                    &format!("--reuid={}", u.uid),
                    &format!("--regid={}", u.gid),
                    "--init-groups",
                    "--inh-caps=-all,+net_bind_service",
                    "--ambient-caps=-all,+net_bind_service",
                    "--bounding-set=-all,+net_bind_service",
                    "--",
                ])
                .arg(&s.binary);
                c
            }
            None => tokio::process::Command::new(&s.binary),
        };
        cmd.args(&args)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Own process group: signals to the agent's group never reach it.
            .process_group(0)
            .kill_on_drop(false);
        cmd.spawn().with_context(|| format!("starting {}", s.binary.display()))
    }
}

/// How long the agent waits for berth-proxy to load a new config.
pub const LOAD_WAIT: Duration = Duration::from_secs(3);

/// The config revision and reload count from the proxy's metrics endpoint.
async fn load_state(metrics: &str) -> Option<LoadState> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(metrics).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        parse_load_state(&body)
    };
    tokio::time::timeout(Duration::from_secs(1), fetch).await.ok().flatten()
}

fn parse_load_state(metrics: &str) -> Option<LoadState> {
    let value = |name: &str| -> Option<u64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(LoadState {
        revision: value("berth_proxy_config_revision")?,
        reloads: value("berth_proxy_config_reloads_total")?,
    })
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64 << failures.min(6)).min(Duration::from_secs(30))
}

/// `pid` runs berth-proxy with this config (not a reused pid).
fn is_proxy(pid: u32, config: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'));
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let config = config.display().to_string();
    !zombie && args.iter().any(|a| a.ends_with(b"berth-proxy")) && args.contains(&config.as_bytes())
}

fn chown(path: &Path, user: &str) -> anyhow::Result<()> {
    let u = nix::unistd::User::from_name(user)
        .with_context(|| format!("--proxy-user {user}"))?
        .with_context(|| format!("--proxy-user: no user {user:?}"))?;
    nix::unistd::chown(path, Some(u.uid), Some(u.gid)).with_context(|| format!("chown {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_protocol::proxy::{CertDesired, HttpRouteDesired, ProxyDesired};

    fn desired(sealed: String) -> DesiredState {
        let mut d: DesiredState = serde_json::from_value(serde_json::json!({
            "revision": 9,
            "node": {"node_id": "p", "name": "p1", "role": "proxy", "mesh_ip": "10.100.0.9",
                     "mesh_cidr": "10.100.0.0/16", "subnet": "10.200.9.0/24",
                     "subnet_pool": "10.200.0.0/13", "wg_port": 51820},
            "peers": []
        }))
        .unwrap();
        d.proxy = Some(ProxyDesired {
            http_routes: vec![HttpRouteDesired {
                domain: "app.example.com".into(),
                service: "web".into(),
                upstreams: vec![
                    UpstreamDesired {
                        replica: "web-1".into(),
                        node: "p1".into(),
                        ip: "10.200.9.2".parse().unwrap(),
                        port: 8080,
                        healthy: false,
                        weight: 1,
                    },
                    UpstreamDesired {
                        replica: "web-2".into(),
                        node: "n2".into(),
                        ip: "10.200.1.2".parse().unwrap(),
                        port: 8080,
                        healthy: true,
                        weight: 1,
                    },
                ],
            }],
            certs: vec![CertDesired {
                domain: "app.example.com".into(),
                chain_pem: "CHAIN".into(),
                sealed_key_pem: sealed,
            }],
            ..Default::default()
        });
        d
    }

    #[test]
    fn config_opens_keys_and_marks_local_upstreams() {
        let key = StaticSecret::from([7u8; 32]);
        let sealed = berth_protocol::seal::seal(&x25519_dalek::PublicKey::from(&key), b"KEY PEM");
        let d = desired(sealed);
        let local = BTreeMap::from([("web-1".to_string(), true)]);
        let cfg = config_from(&d, &key, &local).unwrap();
        assert_eq!(cfg.revision, 9);
        assert_eq!(cfg.certs[0].key_pem, "KEY PEM");
        let ups = &cfg.http_routes[0].upstreams;
        assert_eq!(ups[0].addr, "10.200.9.2:8080".parse().unwrap());
        assert!(ups[0].local && ups[0].healthy, "local health is the agent's own");
        assert!(!ups[1].local && ups[1].healthy);

        let other = StaticSecret::from([8u8; 32]);
        let err = config_from(&d, &other, &local).unwrap_err().to_string();
        assert!(err.contains("app.example.com"), "{err}");
    }

    #[test]
    fn load_state_from_metrics() {
        let text = "# TYPE berth_proxy_config_revision gauge\nberth_proxy_config_revision 42\nberth_proxy_x 1\n\
                    # HELP berth_proxy_config_reloads_total Config files loaded.\n\
                    berth_proxy_config_reloads_total_other 9\nberth_proxy_config_reloads_total 3\n";
        assert_eq!(
            parse_load_state(text),
            Some(LoadState {
                revision: 42,
                reloads: 3
            })
        );
        assert_eq!(parse_load_state("nothing"), None);
        assert_eq!(parse_load_state("berth_proxy_config_revision 42\n"), None);
    }

    fn route(domain: &str) -> ProxyRoute {
        ProxyRoute {
            domain: domain.into(),
            upstreams: vec![],
        }
    }

    fn cert(domain: &str) -> ProxyCert {
        ProxyCert {
            domain: domain.into(),
            chain_pem: String::new(),
            key_pem: String::new(),
        }
    }

    #[test]
    fn served_domains_need_a_certificate_or_passthrough() {
        let cfg = ProxyConfig {
            http_routes: vec![
                route("b.example.com"),
                route("App.Example.com."),
                route("nocert.example.com"),
                route("x.wild.example.com"),
                route("wild.example.com"),
            ],
            passthrough: vec![route("tls.example.com")],
            certs: vec![
                cert("app.example.com"),
                cert("b.example.com"),
                cert("*.wild.example.com"),
            ],
            alpn01: vec![berth_protocol::proxy::AlpnChallenge {
                domain: "nocert.example.com".into(),
                key_authorization: "k".into(),
            }],
            ..Default::default()
        };
        assert_eq!(
            served_domains(&cfg),
            [
                "app.example.com",
                "b.example.com",
                "tls.example.com",
                "x.wild.example.com"
            ],
            "the wildcard covers one label below it, not its parent; a challenge serves nothing"
        );
        assert!(served_domains(&ProxyConfig::default()).is_empty());
    }

    #[test]
    fn a_file_is_loaded_when_the_proxy_shows_it() {
        let seen = |revision, reloads| Some(LoadState { revision, reloads });
        let w = |revision, reloads_before| Written {
            revision,
            reloads_before,
            domains: vec!["a.example.com".into()],
        };
        // A new revision: the revision tells.
        assert!(w(5, None).loaded_by(seen(5, 1).unwrap()));
        assert!(!w(5, None).loaded_by(seen(4, 9).unwrap()));
        // Rewritten under the revision the proxy already showed: only one
        // more reload tells (or a restarted proxy's lower count).
        assert!(!w(5, Some(3)).loaded_by(seen(5, 3).unwrap()));
        assert!(w(5, Some(3)).loaded_by(seen(5, 4).unwrap()));
        assert!(w(5, Some(3)).loaded_by(seen(5, 1).unwrap()));

        let dir = tempfile::tempdir().unwrap();
        let mut sup = supervisor(dir.path());
        assert!(!sup.observe(seen(5, 1)), "nothing written yet");
        sup.last_write = Some(w(5, Some(3)));
        assert!(!sup.observe(seen(5, 3)) && !sup.observe(None));
        assert!(sup.served_domains().is_empty());
        assert!(sup.observe(seen(5, 4)));
        assert_eq!(sup.served_domains(), ["a.example.com"]);
        // The process died: nothing is served until a new one shows the file.
        sup.lost();
        assert!(!sup.is_loaded() && sup.served_domains().is_empty());
        assert!(sup.observe(seen(5, 1)), "a new process loads the file at start");
        assert_eq!(sup.served_domains(), ["a.example.com"]);
    }

    fn supervisor(dir: &Path) -> BerthProxySupervisor {
        BerthProxySupervisor::new(BerthProxySettings {
            binary: "berth-proxy".into(),
            dir: dir.join("proxy"),
            http: "127.0.0.1:0".into(),
            https: "127.0.0.1:0".into(),
            metrics: "127.0.0.1:0".into(),
            user: None,
            external: false,
        })
    }

    #[test]
    fn worker_gets_an_empty_config() {
        let mut d = desired(String::new());
        d.proxy = None;
        let cfg = config_from(&d, &StaticSecret::from([1u8; 32]), &BTreeMap::new()).unwrap();
        assert!(cfg.http_routes.is_empty() && cfg.certs.is_empty());
    }

    #[tokio::test]
    async fn write_is_atomic_private_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = supervisor(dir.path());
        let mut cfg = ProxyConfig {
            revision: 1,
            ..Default::default()
        };
        assert!(sup.write(&cfg).await.unwrap());
        assert_eq!(sup.written_revision(), Some(1));
        assert!(!sup.is_loaded(), "no proxy has shown it yet");
        assert!(!sup.wait_loaded().await, "no proxy runs: no wait");
        let path = sup.config_path();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let ino = std::fs::metadata(&path).unwrap().ino();
        cfg.revision = 2;
        assert!(!sup.write(&cfg).await.unwrap());
        assert_eq!(sup.written_revision(), Some(1), "the file keeps its revision");
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "same content: not rewritten"
        );
        cfg.http01.push(berth_protocol::proxy::Http01Challenge {
            token: "t".into(),
            key_authorization: "k".into(),
        });
        sup.write(&cfg).await.unwrap();
        assert_eq!(sup.written_revision(), Some(2));
        let back: ProxyConfig = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }
}
