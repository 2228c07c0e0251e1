//! `berth lab`: a whole Berth cluster on one machine. The control plane runs
//! in the root namespace on the lab's host link; every node is its own
//! network namespace on a lab bridge, running a real `berth-agent` with a
//! real WireGuard (wireguard-go here). Used by the README and the e2e tests.

pub mod net;
pub mod process;

use crate::client::{AdminClient, Target};
use anyhow::{bail, Context};
use berth_protocol::NodeInfo;
use net::LabNet;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

/// Port the lab's control plane listens on (on the host link).
pub const CP_PORT: u16 = 7443;

/// What a lab is made of, saved in `<dir>/lab.json` so later commands
/// (status, exec, down) and tests can find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub id: u8,
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pub cp_pid: Option<u32>,
    pub nodes: Vec<LabNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub index: u16,
    pub name: String,
    pub proxy: bool,
    pub agent_pid: Option<u32>,
}

pub struct Lab {
    pub state: LabState,
    pub net: LabNet,
}

/// Default directory of lab `id`.
pub fn default_dir(id: u8) -> PathBuf {
    PathBuf::from(format!("/var/lib/berth-lab/{id}"))
}

/// Directory holding `berth-agent` and `berth-control-plane`: next to this binary,
/// or one level up (test binaries live in target/<profile>/deps).
pub fn default_bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.join("berth-agent").exists() {
        return dir;
    }
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}

impl Lab {
    pub fn url(&self) -> String {
        format!("https://{}:{CP_PORT}", self.net.host_ip())
    }

    pub fn target(&self) -> Target {
        Target {
            url: self.url(),
            admin_token_file: self.state.dir.join("cp/admin.token"),
            ca_file: self.state.dir.join("cp/ca.pem"),
        }
    }

    pub fn admin(&self) -> anyhow::Result<AdminClient> {
        AdminClient::new(&self.target())
    }

    fn save(&self) -> anyhow::Result<()> {
        std::fs::write(self.state.dir.join("lab.json"), serde_json::to_vec_pretty(&self.state)?)?;
        Ok(())
    }

    /// Loads a running lab from its directory.
    pub fn load(dir: &Path) -> anyhow::Result<Lab> {
        let p = dir.join("lab.json");
        let state: LabState = serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("no lab at {} (run `berth lab up` first)", dir.display()))?,
        )?;
        Ok(Lab {
            net: LabNet { id: state.id },
            state,
        })
    }

    /// Builds the lab's network and starts its control plane (no nodes yet).
    pub async fn create(id: u8, dir: &Path, bin_dir: &Path) -> anyhow::Result<Lab> {
        for b in ["berth-agent", "berth-control-plane"] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{b} not found in {} (build with `cargo build`, or pass --bin-dir)",
                    bin_dir.display()
                );
            }
        }
        let net = LabNet { id };
        if net.exists() {
            bail!("lab {id} already exists; remove it with `berth lab down --id {id}`");
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)?;
        net.create_base()?;
        let mut lab = Lab {
            net,
            state: LabState {
                id,
                dir: dir.to_path_buf(),
                bin_dir: bin_dir.to_path_buf(),
                cp_pid: None,
                nodes: vec![],
            },
        };
        lab.save()?;
        lab.start_cp().await?;
        Ok(lab)
    }

    pub async fn start_cp(&mut self) -> anyhow::Result<()> {
        let host = self.net.host_ip().to_string();
        let args: Vec<String> = [
            "serve",
            "--data-dir",
            &self.state.dir.join("cp").display().to_string(),
            "--listen",
            &format!("{host}:{CP_PORT}"),
            "--san",
            &host,
            "--offline-after",
            "15",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pid = process::spawn_daemon(
            None,
            &self.state.bin_dir.join("berth-control-plane"),
            &args,
            &[("BERTH_LOG".into(), "info".into())],
            &self.state.dir.join("cp.log"),
        )?;
        self.state.cp_pid = Some(pid);
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.state.dir.join("cp/admin.token").exists() || self.admin()?.revision().await.is_err() {
            if !process::is_alive(pid) {
                bail!(
                    "the control plane exited; see {}",
                    self.state.dir.join("cp.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the control plane did not answer within 20 s; see {}",
                    self.state.dir.join("cp.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    pub fn stop_cp(&mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.state.cp_pid.take() {
            process::stop(pid, Duration::from_secs(5))?;
        }
        self.save()
    }

    pub fn node(&self, name: &str) -> anyhow::Result<&LabNode> {
        let key = name.trim_start_matches('n');
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name || n.index.to_string() == key)
            .with_context(|| format!("no node {name:?} in lab {}", self.state.id))
    }

    fn node_mut(&mut self, index: u16) -> anyhow::Result<&mut LabNode> {
        let id = self.state.id;
        self.state
            .nodes
            .iter_mut()
            .find(|n| n.index == index)
            .with_context(|| format!("no node {index} in lab {id}"))
    }

    /// WireGuard interface name of node `index` (unique on the host).
    pub fn interface(&self, index: u16) -> String {
        format!("bl{}w{index}", self.state.id)
    }

    /// Adds a namespace for a new node and starts its agent with a fresh token.
    pub async fn add_node(&mut self, proxy: bool) -> anyhow::Result<String> {
        let index = self.state.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        let name = format!("n{index}");
        let token = self.admin()?.create_token(proxy, 3600).await?;
        let token = token["token"].as_str().context("no token in the answer")?.to_string();
        self.net.add_node(index)?;
        self.state.nodes.push(LabNode {
            index,
            name: name.clone(),
            proxy,
            agent_pid: None,
        });
        self.save()?;
        self.start_agent(index, Some(&token))?;
        Ok(name)
    }

    /// Starts (or restarts) the agent of node `index`.
    pub fn start_agent(&mut self, index: u16, token: Option<&str>) -> anyhow::Result<()> {
        let node = self.node_mut(index)?.clone();
        let mut args: Vec<String> = vec![
            "--url".into(),
            self.url(),
            "--data-dir".into(),
            self.state.dir.join(&node.name).display().to_string(),
            "--name".into(),
            node.name.clone(),
            "--interface".into(),
            self.interface(index),
            "--log-format".into(),
            "text".into(),
            "--heartbeat".into(),
            "5".into(),
        ];
        if let Some(t) = token {
            args.extend(["--token".into(), t.into()]);
        }
        if node.proxy {
            args.push("--proxy".into());
        }
        let pid = process::spawn_daemon(
            Some(&self.net.node_ns(index)),
            &self.state.bin_dir.join("berth-agent"),
            &args,
            &[("BERTH_LOG".into(), "info,berth_agent=debug".into())],
            &self.state.dir.join(format!("{}.log", node.name)),
        )?;
        self.node_mut(index)?.agent_pid = Some(pid);
        self.save()
    }

    /// SIGKILLs a node's agent (the tunnel and containers must stay up).
    pub fn kill_agent(&mut self, index: u16) -> anyhow::Result<()> {
        if let Some(pid) = self.node_mut(index)?.agent_pid.take() {
            process::kill9(pid)?;
        }
        self.save()
    }

    /// Removes a node from the fleet (API) and deletes its namespace.
    pub async fn remove_node(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?.clone();
        self.admin()?.remove_node(&node.name).await?;
        if let Some(pid) = node.agent_pid {
            process::stop(pid, Duration::from_secs(5))?;
        }
        self.net.remove_node(node.index)?;
        self.state.nodes.retain(|n| n.index != node.index);
        self.save()
    }

    /// Runs a command inside a node's namespace and waits for it.
    pub fn exec(&self, name: &str, cmd: &[&str]) -> anyhow::Result<Output> {
        let node = self.node(name)?;
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.net.node_ns(node.index)])
            .args(cmd)
            .output()
            .with_context(|| format!("running {cmd:?} in {name}"))
    }

    /// Waits until every lab node is registered, online and has applied the
    /// current revision. Returns the node list.
    pub async fn wait_converged(&self, timeout: Duration) -> anyhow::Result<Vec<NodeInfo>> {
        let deadline = Instant::now() + timeout;
        let admin = self.admin()?;
        loop {
            let nodes = admin.list_nodes().await.unwrap_or_default();
            let all_in = self
                .state
                .nodes
                .iter()
                .all(|ln| nodes.iter().any(|n| n.name == ln.name));
            let converged = nodes.iter().all(|n| n.online && n.applied_revision >= n.revision);
            if all_in && converged && !nodes.is_empty() {
                return Ok(nodes);
            }
            if Instant::now() > deadline {
                let detail: Vec<String> = nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "{} online={} applied={}/{} error={:?}",
                            n.name, n.online, n.applied_revision, n.revision, n.error
                        )
                    })
                    .collect();
                bail!(
                    "lab did not converge within {timeout:?}: {detail:?}; logs in {}",
                    self.state.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every process and removes every namespace, link and file of the lab.
    pub fn destroy(self, keep_logs: bool) -> anyhow::Result<()> {
        let pids: Vec<u32> = self
            .state
            .nodes
            .iter()
            .filter_map(|n| n.agent_pid)
            .chain(self.state.cp_pid)
            .collect();
        let first = process::stop_all(&pids, Duration::from_secs(3)).err();
        let net = self.net.destroy().err();
        if !keep_logs {
            let _ = std::fs::remove_dir_all(&self.state.dir);
        }
        match first.or(net) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Removes lab `id` even when its state file is gone or corrupt.
pub fn destroy_by_id(id: u8, dir: &Path, keep_logs: bool) -> anyhow::Result<()> {
    match Lab::load(dir) {
        Ok(lab) => lab.destroy(keep_logs),
        Err(_) => {
            let r = LabNet { id }.destroy();
            if !keep_logs {
                let _ = std::fs::remove_dir_all(dir);
            }
            r
        }
    }
}
