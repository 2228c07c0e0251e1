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
use std::collections::BTreeMap;
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

/// Writes berth-proxy's config and keeps the berth-proxy process up.
pub struct BerthProxySupervisor {
    settings: BerthProxySettings,
    /// The config as last written, without the revision (a new revision that
    /// changes nothing for the proxy is not rewritten).
    written: Option<ProxyConfig>,
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
            child: None,
            adopted: None,
            next_start: Instant::now(),
            failures: 0,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.settings.dir.join("config.json")
    }

    fn pid_path(&self) -> PathBuf {
        self.settings.dir.join("berth-proxy.pid")
    }

    /// Replaces the config file atomically when it changed; returns whether it did.
    pub fn write(&mut self, cfg: &ProxyConfig) -> anyhow::Result<bool> {
        let mut cmp = cfg.clone();
        cmp.revision = 0;
        if self.written.as_ref() == Some(&cmp) && self.config_path().exists() {
            return Ok(false);
        }
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
        Ok(true)
    }

    /// Waits, at most [`LOAD_WAIT`], until the proxy's metrics show
    /// `revision` (it polls its config file every 500 ms): the agent reports a
    /// revision applied only once berth-proxy serves it, which ACME challenges
    /// rely on. No SIGHUP: a proxy started a moment ago may not handle it yet,
    /// and SIGHUP's default action would end it. Returns whether it got there.
    pub async fn wait_loaded(&self, revision: u64) -> bool {
        if self.pid().is_none() {
            return false;
        }
        let deadline = Instant::now() + LOAD_WAIT;
        loop {
            if loaded_revision(&self.settings.metrics)
                .await
                .is_some_and(|r| r >= revision)
            {
                return true;
            }
            if Instant::now() > deadline {
                tracing::warn!(revision, "berth-proxy has not loaded the new config yet");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

/// `berth_proxy_config_revision` from the proxy's metrics endpoint.
async fn loaded_revision(metrics: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(metrics).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        parse_revision(&body)
    };
    tokio::time::timeout(Duration::from_secs(1), fetch).await.ok().flatten()
}

fn parse_revision(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("berth_proxy_config_revision "))
        .and_then(|v| v.trim().parse().ok())
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
    fn revision_from_metrics() {
        let text = "# TYPE berth_proxy_config_revision gauge\nberth_proxy_config_revision 42\nberth_proxy_x 1\n";
        assert_eq!(parse_revision(text), Some(42));
        assert_eq!(parse_revision("nothing"), None);
    }

    #[test]
    fn worker_gets_an_empty_config() {
        let mut d = desired(String::new());
        d.proxy = None;
        let cfg = config_from(&d, &StaticSecret::from([1u8; 32]), &BTreeMap::new()).unwrap();
        assert!(cfg.http_routes.is_empty() && cfg.certs.is_empty());
    }

    #[test]
    fn write_is_atomic_private_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut sup = BerthProxySupervisor::new(BerthProxySettings {
            binary: "berth-proxy".into(),
            dir: dir.path().join("proxy"),
            http: "127.0.0.1:0".into(),
            https: "127.0.0.1:0".into(),
            metrics: "127.0.0.1:0".into(),
            user: None,
            external: false,
        });
        let mut cfg = ProxyConfig {
            revision: 1,
            ..Default::default()
        };
        assert!(sup.write(&cfg).unwrap());
        let path = sup.config_path();
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let ino = std::fs::metadata(&path).unwrap().ino();
        cfg.revision = 2;
        assert!(!sup.write(&cfg).unwrap());
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "same content: not rewritten"
        );
        cfg.http01.push(berth_protocol::proxy::Http01Challenge {
            token: "t".into(),
            key_authorization: "k".into(),
        });
        sup.write(&cfg).unwrap();
        let back: ProxyConfig = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }
}
