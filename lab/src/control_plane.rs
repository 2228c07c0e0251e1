//! Starting a `berth-control-plane` for a lab or a benchmark, and waiting
//! until it answers with the admin token it made on first start.

use anyhow::bail;
use berth_client::{AdminClient, ClientConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a fresh control plane may take to answer.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// How the CLI reaches a control plane on `listen` with its data in
/// `data_dir`, where it writes its admin token and CA on first start.
pub fn client_config(listen: SocketAddr, data_dir: &Path) -> ClientConfig {
    ClientConfig {
        url: format!("https://{listen}"),
        admin_token_file: data_dir.join("admin.token"),
        ca_file: data_dir.join("ca.pem"),
    }
}

/// `berth-control-plane serve` on `listen`, with its data in `data_dir`.
pub struct ControlPlane<'a> {
    /// Where `berth-control-plane` is.
    pub bin_dir: &'a Path,
    pub data_dir: &'a Path,
    /// Also its certificate's only SAN.
    pub listen: SocketAddr,
    /// More `serve` flags.
    pub extra_args: &'a [String],
    /// `BERTH_LOG`.
    pub log_level: &'a str,
    pub log: &'a Path,
}

impl ControlPlane<'_> {
    /// The CLI's view of it: its URL, admin token and CA.
    pub fn client_config(&self) -> ClientConfig {
        client_config(self.listen, self.data_dir)
    }

    /// Starts it as a daemon (it outlives this process) and returns its pid.
    pub fn spawn(&self) -> anyhow::Result<u32> {
        let bin = self.bin_dir.join("berth-control-plane");
        if !bin.exists() {
            bail!(
                "{} not found: build with `cargo build --workspace`, or pass --bin-dir",
                bin.display()
            );
        }
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--listen".into(),
            self.listen.to_string(),
            "--san".into(),
            self.listen.ip().to_string(),
        ];
        args.extend(self.extra_args.iter().cloned());
        crate::process::spawn_daemon(
            None,
            &bin,
            &args,
            &[
                ("BERTH_LOG".into(), self.log_level.into()),
                // As systemd/berth-control-plane.service sets it.
                (
                    "MALLOC_ARENA_MAX".into(),
                    std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "2".into()),
                ),
            ],
            self.log,
        )
    }

    /// Waits until process `pid` answers the admin API; fails early if it exits.
    pub async fn wait_ready(&self, pid: u32) -> anyhow::Result<AdminClient> {
        let cfg = self.client_config();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if cfg.admin_token_file.exists() {
                if let Ok(a) = AdminClient::new(&cfg) {
                    if a.revision().await.is_ok() {
                        return Ok(a);
                    }
                }
            }
            if !crate::process::is_alive(pid) {
                bail!("the control plane exited; see {}", self.log.display());
            }
            if Instant::now() > deadline {
                bail!(
                    "the control plane did not answer within {} s; see {}",
                    READY_WITHIN.as_secs(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
