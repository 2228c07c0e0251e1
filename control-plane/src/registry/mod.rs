//! The fleet registry: the real Distribution registry (Debian's
//! `docker-registry`), run and supervised by the control plane. It serves
//! the control plane's own certificate (the nodes already trust its CA) and
//! takes bearer tokens from the control plane's token endpoint ([`token`]),
//! so who may pull or push is decided here: nodes pull with credentials of
//! their own (dead once the node is removed), the admin does everything.

pub mod client;
pub mod prune;
pub mod token;

use anyhow::Context;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// `--registry-*`: where the registry listens and what runs it.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    pub listen: SocketAddr,
    /// The `docker-registry` executable.
    pub binary: PathBuf,
    /// A `storage:` section (YAML) to use instead of the data dir, e.g. S3.
    pub storage_config: Option<PathBuf>,
    /// Releases whose images each service keeps (see [`prune`]).
    pub retention: usize,
    /// How often retention and garbage collection run; None: on request only.
    pub prune_every: Option<Duration>,
}

/// What the rest of the control plane knows of the running registry.
pub struct Registry {
    /// `HOST:PORT` as nodes and users name it in image references.
    pub host: String,
    pub signer: token::Signer,
    /// Node registry passwords are derived from it (see [`Registry::node_password`]).
    secret: ring::hmac::Key,
    /// The control plane's own way in, for listing what is stored.
    pub client: client::RegistryClient,
    /// Asks the supervisor to run garbage collection (see [`Registry::collect_garbage`]).
    gc: tokio::sync::mpsc::Sender<GcRequest>,
    /// One prune at a time.
    pub prune_lock: tokio::sync::Mutex<()>,
    /// Releases whose images each service keeps.
    pub retention: usize,
    pub prune_every: Option<Duration>,
}

type GcRequest = tokio::sync::oneshot::Sender<anyhow::Result<String>>;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Node `node_id`'s registry password: an HMAC of its ID, so nothing
    /// per node is stored, and a removed node's password names no node.
    pub fn node_password(&self, node_id: &str) -> String {
        hex::encode(ring::hmac::sign(&self.secret, format!("node:{node_id}").as_bytes()).as_ref())
    }

    /// `(repository, tag)` when `image` names an image of this registry by
    /// tag (`HOST/REPO[:TAG]`, the tag `latest` when left out); None for
    /// other registries and for references already pinned to a digest.
    pub fn tagged(&self, image: &str) -> Option<(String, String)> {
        let rest = image.strip_prefix(&self.host)?.strip_prefix('/')?;
        if rest.contains('@') || rest.is_empty() {
            return None;
        }
        let name_start = rest.rfind('/').map_or(0, |i| i + 1);
        Some(match rest[name_start..].rfind(':') {
            Some(i) => (
                rest[..name_start + i].to_string(),
                rest[name_start + i + 1..].to_string(),
            ),
            None => (rest.to_string(), "latest".to_string()),
        })
    }

    /// Runs the registry's garbage collection: the registry is stopped
    /// for it (collecting while a push runs could delete the blobs being
    /// pushed) and started again. Returns its summary line.
    pub async fn collect_garbage(&self) -> anyhow::Result<String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.gc
            .send(tx)
            .await
            .map_err(|_| anyhow::anyhow!("the registry supervisor has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the registry supervisor has stopped"))?
    }

    /// The registry user of build `id`: a dot cannot be in a node name.
    pub fn build_user(id: u64) -> String {
        format!("build.{id}")
    }

    /// Build `id`'s registry password, good while the build runs.
    pub fn build_password(&self, id: u64) -> String {
        hex::encode(ring::hmac::sign(&self.secret, format!("build:{id}").as_bytes()).as_ref())
    }

    pub fn check_build_password(&self, id: u64, password: &str) -> bool {
        let Ok(given) = hex::decode(password) else {
            return false;
        };
        ring::hmac::verify(&self.secret, format!("build:{id}").as_bytes(), &given).is_ok()
    }

    /// Whether `password` is node `node_id`'s, in constant time.
    pub fn check_node_password(&self, node_id: &str, password: &str) -> bool {
        let Ok(given) = hex::decode(password) else {
            return false;
        };
        ring::hmac::verify(&self.secret, format!("node:{node_id}").as_bytes(), &given).is_ok()
    }
}

/// Paths the registry's files live at, under `DATA_DIR/registry`.
struct Files {
    dir: PathBuf,
    config: PathBuf,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    storage: PathBuf,
}

impl Files {
    fn new(data_dir: &Path) -> Files {
        let dir = data_dir.join("registry");
        Files {
            config: dir.join("config.yml"),
            tls_cert: dir.join("tls.pem"),
            tls_key: dir.join("tls.key"),
            storage: dir.join("storage"),
            dir,
        }
    }
}

/// Everything [`start`] needs besides the config.
pub struct Setup<'a> {
    pub data_dir: &'a Path,
    /// The control plane's server chain and key (PEM).
    pub chain_pem: &'a str,
    pub key_pem: &'a str,
    /// The host nodes reach the control plane at (no port).
    pub advertise_host: &'a str,
    /// The token endpoint's URL.
    pub realm: String,
    /// The control plane's CA (PEM), which the registry's certificate chains to.
    pub ca_pem: &'a str,
    /// Shared by the control-plane replicas (from the store).
    pub secret: [u8; 32],
}

/// Writes the registry's config, key and certificates and starts it under
/// supervision (restarted when it exits). Fails at once when the binary is
/// missing, so a misconfigured registry is an error at start, not later.
pub fn start(cfg: &RegistryConfig, setup: Setup<'_>) -> anyhow::Result<Registry> {
    if !cfg.binary.exists() {
        anyhow::bail!(
            "--registry-bin: {} does not exist (install Debian's docker-registry, or pass --no-registry)",
            cfg.binary.display()
        );
    }
    let files = Files::new(setup.data_dir);
    std::fs::create_dir_all(&files.storage).with_context(|| format!("creating {}", files.storage.display()))?;
    let signer = token::Signer::load_or_create(&files.dir)?;
    std::fs::write(&files.tls_cert, setup.chain_pem)?;
    crate::tls::write_private(&files.tls_key, setup.key_pem.as_bytes())?;
    let storage = match &cfg.storage_config {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("--registry-storage-config {}", p.display()))?,
        None => default_storage(&files.storage),
    };
    let http_secret =
        hex::encode(ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &setup.secret), b"http").as_ref());
    let config = config_yaml(cfg.listen, &files, &storage, &setup.realm, &http_secret);
    std::fs::write(&files.config, config)?;
    let host = format!("{}:{}", setup.advertise_host, cfg.listen.port());
    let (gc, gc_rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(supervise(
        cfg.binary.clone(),
        files.config.clone(),
        files.dir.join("registry.pid"),
        gc_rx,
        cfg.listen,
    ));
    tracing::info!(%host, listen = %cfg.listen, "fleet registry started");
    let client = client::RegistryClient::new(&host, cfg.listen, setup.ca_pem)?;
    Ok(Registry {
        host,
        signer,
        secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &setup.secret),
        client,
        gc,
        prune_lock: Default::default(),
        retention: cfg.retention,
        prune_every: cfg.prune_every,
    })
}

fn default_storage(root: &Path) -> String {
    format!(
        "storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n",
        root.display()
    )
}

fn config_yaml(listen: SocketAddr, files: &Files, storage: &str, realm: &str, http_secret: &str) -> String {
    format!(
        "# Written by berth-control-plane at every start; edits are lost.\n\
         version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         {storage}\
         http:\n  addr: {listen}\n  secret: {http_secret}\n  tls:\n    certificate: {cert}\n    key: {key}\n\
         auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {bundle}\n",
        storage = if storage.ends_with('\n') { storage.to_string() } else { format!("{storage}\n") },
        cert = files.tls_cert.display(),
        key = files.tls_key.display(),
        service = token::SERVICE,
        issuer = token::ISSUER,
        bundle = files.dir.join("token.pem").display(),
    )
}

/// Runs `docker-registry serve CONFIG` until the control plane exits,
/// starting it again (after a pause) whenever it stops; its log lines go to
/// the control plane's log.
async fn supervise(
    binary: PathBuf,
    config: PathBuf,
    pid_file: PathBuf,
    mut gc: tokio::sync::mpsc::Receiver<GcRequest>,
    listen: SocketAddr,
) {
    stop_leftover(&pid_file).await;
    // A collection's answer, sent once the registry serves again.
    let mut answer: Option<(GcRequest, anyhow::Result<String>)> = None;
    loop {
        let mut cmd = Command::new(&binary);
        cmd.arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match cmd.spawn() {
            Ok(mut child) => {
                if let Some(pid) = child.id() {
                    let _ = std::fs::write(&pid_file, format!("{pid}\n"));
                }
                for out in [
                    child
                        .stdout
                        .take()
                        .map(|o| Box::new(o) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
                    child.stderr.take().map(|e| Box::new(e) as _),
                ]
                .into_iter()
                .flatten()
                {
                    tokio::spawn(async move {
                        let mut lines = BufReader::new(out).lines();
                        while let Ok(Some(line)) = lines.next_line().await {
                            tracing::info!(target: "registry", "{line}");
                        }
                    });
                }
                if let Some((reply, result)) = answer.take() {
                    wait_listening(listen).await;
                    let _ = reply.send(result);
                }
                tokio::select! {
                    waited = child.wait() => match waited {
                        Ok(status) => tracing::warn!(%status, "the fleet registry exited; starting it again"),
                        Err(e) => tracing::warn!(error = %e, "waiting for the fleet registry"),
                    },
                    Some(reply) = gc.recv() => {
                        if let Some(pid) = child.id() {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                nix::sys::signal::Signal::SIGTERM,
                            );
                        }
                        if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                        answer = Some((reply, garbage_collect(&binary, &config).await));
                        // Straight back up: pulls wait only for the collection.
                        continue;
                    }
                }
            }
            Err(e) => {
                tracing::error!(binary = %binary.display(), error = %e, "cannot start the fleet registry");
                if let Some((reply, result)) = answer.take() {
                    let _ =
                        reply.send(result.and_then(|_| Err(anyhow::anyhow!("the registry did not start again: {e}"))));
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Until something accepts connections on `listen` (at most 10 s).
async fn wait_listening(listen: SocketAddr) {
    let addr = if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `docker-registry garbage-collect CONFIG` (not `-m`: deleting untagged
/// manifests breaks multi-platform images in 2.8); the registry must be
/// stopped. Returns the summary line it ends with.
async fn garbage_collect(binary: &Path, config: &Path) -> anyhow::Result<String> {
    let started = std::time::Instant::now();
    let out = Command::new(binary)
        .arg("garbage-collect")
        .arg(config)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} garbage-collect", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        anyhow::bail!("garbage-collect failed ({}): {}", out.status, text.trim());
    }
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("eligible for deletion"))
        .unwrap_or("done")
        .trim()
        .to_string();
    tracing::info!(%summary, took_ms = started.elapsed().as_millis() as u64, "fleet registry garbage collected");
    Ok(summary)
}

/// A registry left running by a control plane that was SIGKILLed (the
/// child is killed when the control plane exits, not when it is killed)
/// would hold the port: stop it, if the PID is still a docker-registry.
async fn stop_leftover(pid_file: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("registry") {
        return;
    }
    tracing::info!(pid, "stopping a fleet registry left by an earlier run");
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..50 {
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(dir: &Path) -> Registry {
        let ca = crate::tls::generated(dir, &[]).unwrap().ca_pem;
        Registry {
            host: "cp:5000".into(),
            signer: token::Signer::load_or_create(dir).unwrap(),
            secret: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[7; 32]),
            client: client::RegistryClient::new("cp:5000", "127.0.0.1:5000".parse().unwrap(), &ca).unwrap(),
            gc: tokio::sync::mpsc::channel(1).0,
            prune_lock: Default::default(),
            retention: 10,
            prune_every: None,
        }
    }

    #[test]
    fn tagged_references_of_this_registry_only() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let t = |a: &str, b: &str| Some((a.to_string(), b.to_string()));
        assert_eq!(r.tagged("cp:5000/web:v1"), t("web", "v1"));
        assert_eq!(r.tagged("cp:5000/team/web"), t("team/web", "latest"));
        assert_eq!(r.tagged("cp:5000/a/b/web:1.2"), t("a/b/web", "1.2"));
        assert_eq!(r.tagged("cp:5000/web@sha256:00"), None, "already pinned");
        assert_eq!(r.tagged("cp:5000/web:v1@sha256:00"), None, "already pinned");
        assert_eq!(r.tagged("cp:50001/web:v1"), None, "another port");
        assert_eq!(r.tagged("docker.io/web:v1"), None);
        assert_eq!(r.tagged("web:v1"), None);
        assert_eq!(r.tagged("cp:5000/"), None);
    }

    #[test]
    fn node_passwords_are_per_node_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let r = registry(dir.path());
        let p1 = r.node_password("id-1");
        assert_eq!(p1, r.node_password("id-1"), "stable");
        assert_ne!(p1, r.node_password("id-2"));
        assert!(r.check_node_password("id-1", &p1));
        assert!(!r.check_node_password("id-2", &p1));
        assert!(!r.check_node_password("id-1", "not hex"));
        assert!(!r.check_node_password("id-1", ""));
    }

    #[test]
    fn the_config_names_the_token_server_tls_and_storage() {
        let dir = tempfile::tempdir().unwrap();
        let files = Files::new(dir.path());
        let y = config_yaml(
            "127.0.0.1:5000".parse().unwrap(),
            &files,
            &default_storage(&files.storage),
            "https://cp:7443/v1/registry/token",
            "s",
        );
        assert!(y.contains("addr: 127.0.0.1:5000"), "{y}");
        assert!(y.contains("realm: https://cp:7443/v1/registry/token"), "{y}");
        assert!(y.contains(&format!("service: {}", token::SERVICE)), "{y}");
        assert!(
            y.contains(&format!("rootdirectory: {}", files.storage.display())),
            "{y}"
        );
        assert!(y.contains("delete:\n    enabled: true"), "{y}");
    }
}
