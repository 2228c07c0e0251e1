//! The lab: a whole Berth cluster on one machine, for `berth lab`, the
//! end-to-end tests and the benchmarks. Start at [`LabGuard::up`], which
//! builds one; [`Lab`] is a running lab (its nodes, agents and Podmans).
//!
//! The control plane runs in the root namespace on the lab's host link; every
//! node is its own network namespace on a lab bridge, running a real
//! `berth-agent` with a real WireGuard (wireguard-go here) and its own Podman
//! service (see [`podman`]). Nothing of this ships in the `berth` CLI.

pub mod control_plane;
pub mod demo;
pub mod net;
pub mod pebble;
pub mod podman;
pub mod process;
mod up;

pub use podman::TEST_IMAGE;
pub use up::{LabExists, LabGuard, LabSpec};

use anyhow::{anyhow, bail, Context};
use berth_client::{AdminClient, ClientConfig};
use berth_protocol::NodeInfo;
use net::LabNet;
use podman::{FirstError, NodePodman};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
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
    /// The ACME server, in labs with proxy nodes.
    #[serde(default)]
    pub pebble: Option<pebble::PebbleState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabNode {
    pub index: u16,
    pub name: String,
    pub proxy: bool,
    pub agent_pid: Option<u32>,
    /// The node's `podman system service` (absent in labs made before it).
    #[serde(default)]
    pub podman_pid: Option<u32>,
}

/// Where a lab node's agent serves its metrics, on the node's address.
pub const AGENT_METRICS_PORT: u16 = 9181;
/// Where a lab proxy node's berth-proxy serves its metrics.
pub const PROXY_METRICS_PORT: u16 = 9180;

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
        self.client_config().url
    }

    /// Where the lab's control plane listens (on the host link).
    fn cp_listen(&self) -> SocketAddr {
        (self.net.host_ip(), CP_PORT).into()
    }

    pub fn client_config(&self) -> ClientConfig {
        control_plane::client_config(self.cp_listen(), &self.state.dir.join("cp"))
    }

    pub fn admin(&self) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(&self.client_config())?)
    }

    /// The fleet registry's `HOST:PORT`: the control plane runs it on its
    /// own address, port 5000 (when docker-registry is installed).
    pub fn registry_host(&self) -> String {
        format!("{}:5000", self.net.host_ip())
    }

    /// The test image in the fleet registry, as services and `lab run`
    /// containers name it: `HOST:PORT/berth-test/busybox:latest`.
    pub fn test_image(&self) -> String {
        format!("{}/{}:latest", self.registry_host(), podman::TEST_REPOSITORY)
    }

    /// The admin's registry credentials (`admin:TOKEN`) and a directory
    /// with the control plane's CA as `ca.crt`, for `podman --creds
    /// --cert-dir`.
    pub fn registry_login(&self) -> anyhow::Result<(String, PathBuf)> {
        let cfg = self.client_config();
        let certs = self.state.dir.join("registry-certs");
        std::fs::create_dir_all(&certs)?;
        std::fs::copy(&cfg.ca_file, certs.join("ca.crt")).context("copying the control plane's CA")?;
        let token = std::fs::read_to_string(&cfg.admin_token_file).context("reading the admin token")?;
        Ok((format!("admin:{}", token.trim()), certs))
    }

    /// Builds the test image in the lab's image store and pushes it to the
    /// fleet registry, which the nodes pull it from.
    async fn seed_registry(&self) -> anyhow::Result<()> {
        if !Path::new(REGISTRY_BIN).exists() {
            anyhow::bail!(
                "{REGISTRY_BIN} is not installed: the lab's nodes pull their test image from the fleet \
                 registry (apt-get install docker-registry, or run scripts/install-deps.sh)"
            );
        }
        podman::ImageStore::new(&self.state.dir).import_test_image(&self.state.bin_dir.join(podman::WS_ECHO_BIN))?;
        self.push_test_image_as(podman::TEST_REPOSITORY).await?;
        Ok(())
    }

    /// Pushes the test image from the lab's image store into the fleet
    /// registry as `REPOSITORY:latest` (as the admin), retrying while the
    /// registry starts. Returns its reference there.
    pub async fn push_test_image_as(&self, repository: &str) -> anyhow::Result<String> {
        let (creds, certs) = self.registry_login()?;
        let to = format!("{}/{repository}:latest", self.registry_host());
        let certs = certs.display().to_string();
        let store = podman::ImageStore::new(&self.state.dir);
        let args = [
            "push",
            "--quiet",
            "--cert-dir",
            &certs,
            "--creds",
            &creds,
            podman::TEST_IMAGE,
            &to,
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match store.podman(&args) {
                Ok(_) => return Ok(to),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(e.context(format!("pushing the test image to {to}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Writes the state file (`lab.json`), which `berth lab down` reads.
    pub fn save(&self) -> anyhow::Result<()> {
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
        for b in ["berth-agent", "berth-control-plane", podman::WS_ECHO_BIN] {
            if !bin_dir.join(b).exists() {
                bail!(
                    "{b} not found in {} (build with `cargo build`, or pass --bin-dir)",
                    bin_dir.display()
                );
            }
        }
        let net = LabNet { id };
        if net.exists() {
            return Err(LabExists { id }.into());
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
                pebble: None,
            },
        };
        lab.save()?;
        lab.start_cp().await?;
        lab.seed_registry().await?;
        Ok(lab)
    }

    pub async fn start_cp(&mut self) -> anyhow::Result<()> {
        let mut extra = vec!["--offline-after".to_string(), "15".to_string()];
        if let Some(p) = &self.state.pebble {
            extra.extend([
                "--acme-directory".to_string(),
                p.directory_url(),
                "--acme-ca-file".to_string(),
                p.https_ca().display().to_string(),
                "--acme-challenge".to_string(),
                p.challenge.clone(),
            ]);
        }
        let cp = control_plane::ControlPlane {
            bin_dir: &self.state.bin_dir,
            data_dir: &self.state.dir.join("cp"),
            listen: self.cp_listen(),
            extra_args: &extra,
            log_level: "info",
            log: &self.state.dir.join("cp.log"),
        };
        let pid = cp.spawn()?;
        self.state.cp_pid = Some(pid);
        self.save()?;
        cp.wait_ready(pid).await?;
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

    /// The Podman of node `index`: storage, socket, network, log.
    pub fn node_podman(&self, index: u16) -> NodePodman {
        NodePodman::new(&self.state.dir, self.state.id, index)
    }

    /// Name of node `index`'s Podman network, `bl<k>n<i>`: unique on the host,
    /// since rootful Podman shares one IPAM database across storage roots.
    pub fn podman_network(&self, index: u16) -> String {
        podman::network_name(self.state.id, index)
    }

    /// Node `index`'s Podman API socket.
    pub fn podman_socket(&self, index: u16) -> PathBuf {
        self.node_podman(index).socket()
    }

    /// Runs `podman <node flags> args...` inside the node's namespace and waits for it.
    pub fn podman(&self, name: &str, args: &[&str]) -> anyhow::Result<Output> {
        let node = self.node(name)?;
        self.node_podman(node.index).output(args)
    }

    /// The command for a throwaway container of the test image on node
    /// `name`, on the node's Podman network (at its last address, with the
    /// node's DNS and the cluster search domain), running `cmd`. Waits up to
    /// 10 s for the network, which the agent creates.
    pub fn container_command(&self, name: &str, cmd: &[&str]) -> anyhow::Result<Command> {
        if cmd.is_empty() {
            bail!("no command to run in the container");
        }
        let node = self.node(name)?;
        let p = self.node_podman(node.index);
        p.wait_network(Duration::from_secs(10), &self.agent_log(&node.name))?;
        // The network's own subnet (the agent made it from the one the
        // control plane gave the node): right even while the control plane
        // is down.
        let addrs = p.network_addrs()?;
        let ip = podman::run_ip(&addrs)?.to_string();
        let dns = addrs.gateway.to_string();
        let image = self.test_image();
        let mut args = vec![
            "run",
            "--rm",
            "--network",
            &p.network,
            "--ip",
            &ip,
            "--dns",
            &dns,
            "--dns-search",
            podman::ZONE,
            &image,
        ];
        args.extend_from_slice(cmd);
        Ok(p.command(&args))
    }

    /// Runs `cmd` in a throwaway container on node `name` (see
    /// [`container_command`](Self::container_command)) and waits for it.
    pub fn run_container(&self, name: &str, cmd: &[&str]) -> anyhow::Result<Output> {
        self.container_command(name, cmd)?
            .output()
            .with_context(|| format!("running {cmd:?} in a container on {name}"))
    }

    fn agent_log(&self, name: &str) -> PathBuf {
        self.state.dir.join(format!("{name}.log"))
    }

    /// Adds a namespace for a new node, starts its Podman service (with the
    /// test image in its storage) and its agent with a fresh token.
    pub async fn add_node(&mut self, proxy: bool) -> anyhow::Result<String> {
        let index = self.state.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        let name = format!("n{index}");
        let token = self.admin()?.create_token(proxy, 3600).await?.token;
        self.net.add_node(index)?;
        self.state.nodes.push(LabNode {
            index,
            name: name.clone(),
            proxy,
            agent_pid: None,
            podman_pid: None,
        });
        self.save()?;
        self.start_podman(index).await?;
        self.start_agent(index, Some(&token))?;
        Ok(name)
    }

    /// Starts node `index`'s Podman service on fresh storage, imports the test
    /// image and waits until the service answers.
    async fn start_podman(&mut self, index: u16) -> anyhow::Result<()> {
        let p = self.node_podman(index);
        // Storage of an earlier node with this index (removed, then re-added).
        if p.dir.exists() {
            podman::unmount_under(&p.dir)?;
            std::fs::remove_dir_all(&p.dir).with_context(|| format!("clearing {}", p.dir.display()))?;
        }
        let pid = p.start()?;
        self.node_mut(index)?.podman_pid = Some(pid);
        self.save()?;
        p.wait_ready(pid).await?;
        // From the fleet registry, over the node's link: `lab run`
        // containers need it even while the control plane is down.
        let (creds, certs) = self.registry_login()?;
        p.pull(&self.test_image(), &creds, &certs)
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
            "--podman-socket".into(),
            self.podman_socket(index).display().to_string(),
            "--podman-network".into(),
            self.podman_network(index),
            "--bridge".into(),
            podman::BRIDGE.into(),
        ];
        // Its output goes to this file: `berth nodes logs` reads it.
        args.extend(["--log-file".into(), self.agent_log(&node.name).display().to_string()]);
        // Metrics on the node's lab address, where the host can scrape them.
        let ip = self.net.node_ip(index);
        args.extend(["--metrics".into(), format!("{ip}:{AGENT_METRICS_PORT}")]);
        if let Some(t) = token {
            args.extend(["--token".into(), t.into()]);
        }
        if node.proxy {
            args.extend(["--proxy-metrics".into(), format!("{ip}:{PROXY_METRICS_PORT}")]);
            // berth-proxy runs unprivileged, as it would on a real server.
            args.extend(["--proxy".into(), "--proxy-user".into(), "nobody".into()]);
        }
        let pid = process::spawn_daemon(
            Some(&self.net.node_ns(index)),
            &self.state.bin_dir.join("berth-agent"),
            &args,
            &[("BERTH_LOG".into(), "info,berth_agent=debug".into())],
            &self.agent_log(&node.name),
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

    /// Removes a node from the fleet (API), stops its agent, removes its
    /// containers, Podman network, Podman service and storage, and deletes
    /// its namespace. Its logs stay until the lab goes.
    pub async fn remove_node(&mut self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name)?.clone();
        self.admin()?.remove_node(&node.name).await?;
        // The agent first: it would recreate the containers removed below.
        if let Some(pid) = node.agent_pid {
            process::stop(pid, Duration::from_secs(5))?;
        }
        let p = self.node_podman(node.index);
        let mut first = FirstError::default();
        first.note(p.teardown(node.podman_pid));
        first.note(self.net.remove_node(node.index));
        if p.dir.exists() {
            first.note(std::fs::remove_dir_all(&p.dir).with_context(|| format!("removing {}", p.dir.display())));
        }
        self.state.nodes.retain(|n| n.index != node.index);
        first.note(self.save());
        first.into_result()
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

    /// Stops every process and removes every namespace, link, container,
    /// Podman network, mount and file of the lab (with `keep_logs`, the logs
    /// and the agents' data stay in the lab directory).
    /// Restarts the control plane asking proxies for `challenge`
    /// (`http-01` or `tls-alpn-01`) from now on.
    pub async fn set_acme_challenge(&mut self, challenge: &str) -> anyhow::Result<()> {
        let p = self.state.pebble.as_mut().context("no Pebble in this lab")?;
        p.challenge = challenge.to_string();
        self.save()?;
        self.stop_cp()?;
        self.start_cp().await
    }

    /// Starts Pebble (ACME) answering names with `proxy`'s underlay address,
    /// and restarts the control plane with it as its ACME directory.
    pub async fn start_pebble(&mut self, proxy: &str) -> anyhow::Result<()> {
        if self.state.pebble.is_some() {
            return Ok(());
        }
        let index = self.node(proxy)?.index;
        let p = pebble::start(&self.state.dir, self.net.host_ip(), self.net.node_ip(index)).await?;
        self.state.pebble = Some(p);
        self.save()?;
        self.stop_cp()?;
        self.start_cp().await
    }

    pub fn destroy(self, keep_logs: bool) -> anyhow::Result<()> {
        let pids: Vec<u32> = self
            .state
            .nodes
            .iter()
            .filter_map(|n| n.agent_pid)
            .chain(self.state.cp_pid)
            .chain(
                self.state
                    .pebble
                    .iter()
                    .flat_map(|p| [p.pebble_pid, p.challtestsrv_pid]),
            )
            .collect();
        let mut first = FirstError::default();
        // Agents before containers: an agent would recreate what is removed.
        first.note(process::stop_all(&pids, Duration::from_secs(3)));
        let known: Vec<(u16, Option<u32>)> = self.state.nodes.iter().map(|n| (n.index, n.podman_pid)).collect();
        first.note(teardown_podmans(self.state.id, &self.state.dir, &known));
        first.note(self.net.destroy());
        remove_registry_trust(&self.net);
        remove_files(&self.state.dir, keep_logs, &mut first);
        first.into_result()
    }
}

/// The agents made Podman trust the lab's CA for its registry's host (in
/// the host's `/etc/containers/certs.d`): the lab takes that back.
fn remove_registry_trust(net: &LabNet) {
    let dir = Path::new(REGISTRY_CERTS_DIR).join(format!("{}:5000", net.host_ip()));
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("warning: removing {}: {e}", dir.display());
        }
        // And the directory itself when the agents made it for nothing else.
        let _ = std::fs::remove_dir(REGISTRY_CERTS_DIR);
    }
}

/// Where the lab's agents (with the default `--containers-certs-dir`) put
/// the fleet registry's CA.
const REGISTRY_CERTS_DIR: &str = "/etc/containers/certs.d";
/// The Distribution registry the lab's control plane runs.
const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Tears down the Podman of every node in `known` and of every `n<i>-podman`
/// directory in `dir`, in parallel. Needs the node namespaces: call before
/// deleting them.
fn teardown_podmans(id: u8, dir: &Path, known: &[(u16, Option<u32>)]) -> anyhow::Result<()> {
    let mut nodes: BTreeMap<u16, Option<u32>> = known.iter().copied().collect();
    for i in podman::node_dirs(dir) {
        nodes.entry(i).or_insert(None);
    }
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|(&i, &pid)| s.spawn(move || NodePodman::new(dir, id, i).teardown(pid)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("Podman teardown thread panicked")))
            })
            .collect()
    });
    let mut first = FirstError::default();
    results.into_iter().for_each(|r| first.note(r));
    first.into_result()
}

/// Unmounts what is left under the lab dir, then removes the dir (or, with
/// `keep_logs`, only the nodes' Podman storage).
fn remove_files(dir: &Path, keep_logs: bool, first: &mut FirstError) {
    first.note(podman::unmount_under(dir));
    if keep_logs {
        for i in podman::node_dirs(dir) {
            // The lab id does not matter for the directory.
            let d = NodePodman::new(dir, 0, i).dir;
            first.note(std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display())));
        }
    } else if dir.exists() {
        first.note(std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display())));
    }
}

/// Pids of the control plane and agents started for the lab in `dir` (their
/// `--data-dir` is in it), found without the state file.
fn lab_daemons(dir: &Path) -> Vec<u32> {
    let mut roots = vec![dir.display().to_string()];
    if let Ok(c) = std::fs::canonicalize(dir) {
        roots.push(c.display().to_string());
    }
    let in_lab = |data_dir: &str| {
        roots.iter().any(|r| {
            data_dir
                .strip_prefix(r.trim_end_matches('/'))
                .is_some_and(|rest| rest.starts_with('/'))
        })
    };
    process::all_pids()
        .into_iter()
        .filter(|&p| {
            // comm is cut to 15 bytes: berth-control-plane reads berth-control-p.
            matches!(process::comm(p).as_deref(), Some("berth-agent" | "berth-control-p"))
                && process::cmdline(p)
                    .windows(2)
                    .any(|w| w[0] == "--data-dir" && in_lab(&w[1]))
        })
        .collect()
}

/// Removes lab `id` even when its state file is gone or corrupt.
pub fn destroy_by_id(id: u8, dir: &Path, keep_logs: bool) -> anyhow::Result<()> {
    match Lab::load(dir) {
        Ok(lab) => lab.destroy(keep_logs),
        Err(_) => {
            let mut first = FirstError::default();
            // Without pids: the daemons are found by their data dirs, the
            // Podman services by their sockets.
            first.note(process::stop_all(&lab_daemons(dir), Duration::from_secs(3)));
            let net = LabNet { id };
            let known: Vec<(u16, Option<u32>)> = net.nodes().into_iter().map(|i| (i, None)).collect();
            first.note(teardown_podmans(id, dir, &known));
            first.note(net.destroy());
            remove_registry_trust(&net);
            remove_files(dir, keep_logs, &mut first);
            first.into_result()
        }
    }
}
