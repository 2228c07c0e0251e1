//! One Podman service per lab node: its own storage (`--root`, `--runroot`),
//! network configs and API socket under `<lab dir>/n<i>-podman`, running in
//! the node's network namespace so that the bridges, veths and firewall rules
//! netavark makes stay inside the node.
//!
//! Podman runs through `nsenter --net=/run/netns/<ns>`, not `ip netns exec`:
//! `ip netns exec` also enters a new mount namespace with a fresh /sys, which
//! hides the cgroup v1 hierarchies under /sys/fs/cgroup, and runc then fails
//! with "no cgroup mount found". A side effect: Podman's mounts (overlay
//! storage, shm, container netns files in /run/netns) are made in the host's
//! mount namespace, so cleanup unmounts what is left under the node's dir.
//!
//! Rootful Podman keeps one IPAM database for the whole host
//! (/run/containers/networks/ipam.db), so network names are unique per node
//! and lab (`bl<k>n<i>`), and containers are removed through Podman (which
//! releases their addresses) before the network and the service go.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::process;

/// The test image as scripts/make-test-image.sh names it in the lab's
/// image store; nodes get it from the fleet registry (`Lab::test_image`).
pub const TEST_IMAGE: &str = "localhost/berth-test/busybox:latest";
/// Its repository in the fleet registry.
pub const TEST_REPOSITORY: &str = "berth-test/busybox";
/// Linux bridge of every node's Podman network (inside the node's namespace,
/// so the same name on every node is fine).
pub const BRIDGE: &str = "berth-br0";
/// The cluster DNS zone, the search domain of `lab run` containers.
pub const ZONE: &str = "internal";
/// The WebSocket echo server the test image runs on port 8081 (crate
/// ws-echo/), taken from the lab's binary directory.
pub const WS_ECHO_BIN: &str = "berth-ws-echo";
/// Builds the test image from busybox-static; embedded so that `berth` works
/// outside the source tree.
const MAKE_TEST_IMAGE: &str = include_str!("../../scripts/make-test-image.sh");
/// How long a fresh Podman service may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for each Podman call made during cleanup (a wedged Podman must
/// not hang `berth lab down`).
const CLEANUP_TIMEOUT: &str = "60";
/// Grace between SIGTERM and SIGKILL for the service.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Longest path a unix socket address holds (sun_path is 108 bytes).
const MAX_SOCKET_PATH: usize = 107;

/// The Podman of lab node `n<index>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePodman {
    /// The node's name, `n<i>`.
    pub node: String,
    /// `<lab dir>/n<i>-podman`: storage, network configs and the socket.
    pub dir: PathBuf,
    /// `<lab dir>/n<i>-podman.log`: the service's output.
    pub log: PathBuf,
    /// The node's network namespace, `bl<k>-n<i>`.
    pub netns: String,
    /// The node's Podman network, `bl<k>n<i>` (unique on the host).
    pub network: String,
}

/// A Podman network's address plan, as `podman network inspect` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetworkAddrs {
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
}

impl NodePodman {
    /// The Podman of node `index` of lab `lab_id` whose directory is `lab_dir`.
    pub fn new(lab_dir: &Path, lab_id: u8, index: u16) -> NodePodman {
        NodePodman {
            node: format!("n{index}"),
            dir: lab_dir.join(format!("n{index}-podman")),
            log: lab_dir.join(format!("n{index}-podman.log")),
            netns: format!("bl{lab_id}-n{index}"),
            network: network_name(lab_id, index),
        }
    }

    /// The API socket: `<dir>/podman.sock`.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("podman.sock")
    }

    /// Global flags that point the podman CLI at this node's storage,
    /// configured for this kind of host (runc, cgroupfs, file events).
    pub fn flags(&self) -> Vec<String> {
        let p = |s: &str| self.dir.join("podman").join(s).display().to_string();
        vec![
            "--root".into(),
            p("root"),
            "--runroot".into(),
            p("runroot"),
            "--network-config-dir".into(),
            p("net"),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--runtime".into(),
            "runc".into(),
            "--events-backend".into(),
            "file".into(),
        ]
    }

    /// "n1 (bl7-n1)", for messages.
    fn who(&self) -> String {
        format!("{} ({})", self.node, self.netns)
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    /// `podman <flags> args...` inside the node's network namespace (stdin
    /// from /dev/null; the caller picks how to collect the output).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path()))
            .arg("podman")
            .args(self.flags())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `podman <flags> args...` in the node's namespace and waits for it.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.command(args)
            .output()
            .with_context(|| format!("running `podman {}` in {}", args.join(" "), self.who()))
    }

    /// Like [`output`](Self::output) but fails unless podman exits 0; the
    /// error carries podman's stderr.
    fn check(&self, args: &[&str]) -> Result<Output> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "`podman {}` in {} failed ({}): {}",
                args.join(" "),
                self.who(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Starts `podman system service` for this node, detached (new session,
    /// output appended to the log). Returns the pid of podman itself.
    pub fn start(&self) -> Result<u32> {
        if !Path::new(&self.netns_path()).exists() {
            bail!("cannot start Podman on {}: no such network namespace", self.who());
        }
        let socket = self.socket();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "Podman socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter lab --dir",
                socket.display()
            );
        }
        std::fs::create_dir_all(self.dir.join("podman"))
            .with_context(|| format!("creating {}", self.dir.join("podman").display()))?;
        // A socket left by an earlier service would answer nothing.
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening log file {}", self.log.display()))?;
        let err = log
            .try_clone()
            .with_context(|| format!("duplicating log file handle {}", self.log.display()))?;
        // setsid and nsenter (only a net namespace: no fork) exec in place, so
        // the pid is podman's. Spawned here rather than with
        // process::spawn_daemon, which only knows `ip netns exec` (see the
        // module docs).
        let child = Command::new("setsid")
            .arg("nsenter")
            .arg(format!("--net={}", self.netns_path()))
            .arg("podman")
            .args(self.flags())
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("starting the Podman service of {}", self.who()))?;
        let pid = child.id();
        // Wait until the pid is podman itself, so that callers never signal
        // setsid or nsenter.
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && process::is_alive(pid) && process::comm(pid).as_deref() != Some("podman") {
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(pid)
    }

    /// Waits until the service behind `pid` answers on its socket.
    pub async fn wait_ready(&self, pid: u32) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let err = match ping(&self.socket()).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if !process::is_alive(pid) {
                bail!(
                    "the Podman service of {} exited; see {}",
                    self.who(),
                    self.log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the Podman service of {} did not answer on {} within {} s ({err:#}); see {}",
                    self.who(),
                    self.socket().display(),
                    READY_TIMEOUT.as_secs(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Pulls `image` into the node's storage from the node's namespace (over
    /// its link, as the agent pulls), signed in with `creds` and trusting
    /// the CA in `cert_dir`.
    pub fn pull(&self, image: &str, creds: &str, cert_dir: &Path) -> Result<()> {
        let certs = cert_dir.display().to_string();
        self.check(&["pull", "--quiet", "--cert-dir", &certs, "--creds", creds, image])?;
        Ok(())
    }
}

/// The lab's own image storage, in the host's namespaces (`vfs`: nothing
/// is mounted): the test image is built here once per lab and pushed to
/// the fleet registry, which every node pulls it from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageStore {
    /// `<lab dir>/images`.
    pub dir: PathBuf,
}

impl ImageStore {
    pub fn new(lab_dir: &Path) -> ImageStore {
        ImageStore {
            dir: lab_dir.join("images"),
        }
    }

    pub fn flags(&self) -> Vec<String> {
        let p = |s: &str| self.dir.join(s).display().to_string();
        [
            "--root",
            &p("root"),
            "--runroot",
            &p("runroot"),
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--runtime",
            "runc",
            "--events-backend",
            "file",
        ]
        .map(String::from)
        .to_vec()
    }

    /// `podman <flags> args...`, waited for; fails unless it exits 0.
    pub fn podman(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new("podman")
            .args(self.flags())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running `podman {}` on the lab's image store", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "`podman {}` on the lab's image store failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// Imports the test image with the embedded scripts/make-test-image.sh
    /// (nothing is done if it is already there), with `ws_echo` (a
    /// berth-ws-echo binary) in it.
    pub fn import_test_image(&self, ws_echo: &Path) -> Result<()> {
        let mut child = Command::new("bash")
            .args(["-s", "--", "--ws-echo"])
            .arg(ws_echo)
            .args(self.flags())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running bash for make-test-image.sh")?;
        // The script is a few KB, well below a pipe's buffer: write it whole,
        // then close stdin so bash sees its end.
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(MAKE_TEST_IMAGE.as_bytes())
                .context("feeding make-test-image.sh to bash")?;
        }
        let out = child.wait_with_output().context("waiting for make-test-image.sh")?;
        if !out.status.success() {
            bail!(
                "importing {TEST_IMAGE} into the lab's image store failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }
}

impl NodePodman {
    /// True if the node's Podman network exists (the agent creates it).
    pub fn network_exists(&self) -> bool {
        self.output(&["network", "exists", &self.network])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Waits (at most `timeout`) for the node's Podman network.
    pub fn wait_network(&self, timeout: Duration, agent_log: &Path) -> Result<()> {
        if !Path::new(&self.netns_path()).exists() {
            bail!("{}: no such network namespace", self.who());
        }
        let deadline = Instant::now() + timeout;
        while !self.network_exists() {
            if Instant::now() > deadline {
                bail!(
                    "{} has no Podman network {} after {} s: the agent creates it once it has applied \
                     its desired state; see {} and {}",
                    self.who(),
                    self.network,
                    timeout.as_secs(),
                    agent_log.display(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// The subnet and gateway of the node's Podman network.
    pub fn network_addrs(&self) -> Result<NetworkAddrs> {
        let out = self.check(&["network", "inspect", &self.network])?;
        parse_network_inspect(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("Podman network {} of {}", self.network, self.who()))
    }

    /// Removes everything this node's Podman made and stops its service:
    /// containers (through Podman, so netavark releases their addresses in the
    /// host-wide IPAM db and removes their netns), the node's network, the
    /// service (`pid` if it still is that service, and any other service on
    /// this socket), processes left from its containers, container network
    /// namespaces left on the node's bridge, and mounts under its dir. Needs
    /// the node's namespace for the Podman part (netavark tears down in the
    /// caller's namespace); without it that part is skipped. Best effort:
    /// continues past errors and returns the first. The dir itself stays.
    pub fn teardown(&self, pid: Option<u32>) -> Result<()> {
        let mut first = FirstError::default();
        let ns_exists = Path::new(&self.netns_path()).exists();
        let has_storage = self.dir.join("podman/root").exists();
        // Container namespaces hanging on the node's bridge, in case Podman
        // cannot remove them.
        let container_nss = if ns_exists {
            container_netns(&self.netns)
        } else {
            vec![]
        };
        let ids = container_ids(&self.dir);
        if ns_exists && has_storage {
            first.note(self.cleanup_call(&["rm", "--all", "--force", "--time", "0"]));
            first.note(self.cleanup_call(&["network", "rm", "--force", &self.network]));
        }
        let mut pids = service_pids(&self.socket());
        if let Some(p) = pid.filter(|p| !pids.contains(p) && is_service_of(*p, &self.socket())) {
            pids.push(p);
        }
        first.note(process::stop_all(&pids, STOP_GRACE));
        for p in leftover_pids(&self.dir, &ids) {
            first.note(process::kill9(p));
        }
        for ns in container_nss {
            if Path::new("/run/netns").join(&ns).exists() {
                first.note(
                    run_quiet(Command::new("ip").args(["netns", "del", &ns])).with_context(|| format!("deleting {ns}")),
                );
            }
        }
        first.note(unmount_under(&self.dir));
        first.into_result()
    }

    /// A Podman call during cleanup: bounded in time, error carries stderr.
    fn cleanup_call(&self, args: &[&str]) -> Result<()> {
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=5", CLEANUP_TIMEOUT, "nsenter"])
            .arg(format!("--net={}", self.netns_path()))
            .arg("podman")
            .args(self.flags())
            .args(args)
            .stdin(Stdio::null());
        run_quiet(&mut cmd).with_context(|| format!("`podman {}` for {}", args.join(" "), self.who()))
    }
}

/// The Podman network of node `index` of lab `lab_id`: `bl<k>n<i>`.
pub fn network_name(lab_id: u8, index: u16) -> String {
    format!("bl{lab_id}n{index}")
}

/// Indices `i` of the `n<i>-podman` directories in `lab_dir`.
pub fn node_dirs(lab_dir: &Path) -> Vec<u16> {
    let mut v: Vec<u16> = std::fs::read_dir(lab_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    let i: u16 = name.strip_prefix('n')?.strip_suffix("-podman")?.parse().ok()?;
                    (format!("n{i}-podman") == name).then_some(i)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

/// GET `/_ping` on a Podman API socket; Ok on a 200.
pub async fn ping(socket: &Path) -> Result<()> {
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(socket).await?;
        s.write_all(b"GET /v4.0.0/libpod/_ping HTTP/1.0\r\nHost: d\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .with_context(|| format!("{}: no answer within 2 s", socket.display()))?
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text.lines().next().unwrap_or_default();
    if status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        bail!("{}: unexpected answer {status:?}", socket.display())
    }
}

/// Reads subnet and gateway from `podman network inspect` JSON (an array with
/// one network). The gateway defaults to the subnet's first host.
pub fn parse_network_inspect(json: &str) -> Result<NetworkAddrs> {
    let v: serde_json::Value = serde_json::from_str(json).context("`podman network inspect` did not print JSON")?;
    let net = v.get(0).unwrap_or(&v);
    let first = net["subnets"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["subnet"].as_str().is_some_and(|x| x.parse::<Ipv4Net>().is_ok()))
        })
        .context("the network has no IPv4 subnet")?;
    let subnet: Ipv4Net = first["subnet"].as_str().unwrap_or_default().parse()?;
    let gateway = match first["gateway"].as_str() {
        Some(g) if !g.is_empty() => g.parse().with_context(|| format!("gateway {g:?}"))?,
        _ => subnet.hosts().next().context("the subnet has no hosts")?,
    };
    Ok(NetworkAddrs { subnet, gateway })
}

/// The address a throwaway `lab run` container takes: the subnet's last host
/// (.254 in a /24), far from the replicas the control plane places from the
/// bottom.
pub fn run_ip(addrs: &NetworkAddrs) -> Result<Ipv4Addr> {
    let last = u32::from(addrs.subnet.broadcast()).checked_sub(1);
    match last.map(Ipv4Addr::from) {
        Some(ip) if ip > addrs.subnet.network() && ip != addrs.gateway && addrs.subnet.contains(&ip) => Ok(ip),
        _ => bail!("subnet {} has no room for a lab run container", addrs.subnet),
    }
}

/// Unmounts (lazily, deepest first) everything mounted at or under `dir` in
/// our mount namespace. Errors only if something is still mounted afterwards.
pub fn unmount_under(dir: &Path) -> Result<()> {
    let Some(root) = absolute(dir) else {
        return Ok(());
    };
    for _ in 0..3 {
        let mounts = mounts_under(
            &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            &root,
        );
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&m)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    let left = mounts_under(
        &std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        &root,
    );
    if left.is_empty() {
        Ok(())
    } else {
        bail!("still mounted under {}: {}", root.display(), left.join(", "))
    }
}

/// `dir` as an absolute path without symlinks (mountinfo has real paths).
fn absolute(dir: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(dir)
        .ok()
        .or_else(|| std::env::current_dir().ok().map(|c| c.join(dir)))
}

/// Mount points at or under `root` in a /proc/<pid>/mountinfo text, deepest
/// first. `/` matches nothing: a bad lab dir must not unmount the host.
fn mounts_under(mountinfo: &str, root: &Path) -> Vec<String> {
    let root = root.to_string_lossy();
    let root = root.trim_end_matches('/');
    let mut v: Vec<String> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| !root.is_empty() && (m == root || m.strip_prefix(root).is_some_and(|r| r.starts_with('/'))))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.len()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let n = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            if let Ok(c) = u8::try_from(n) {
                out.push(c);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True if `args` is a `podman ... system service ... unix://<socket>`.
fn is_service_cmdline(args: &[String], socket: &Path) -> bool {
    let url = format!("unix://{}", socket.display());
    args.first().is_some_and(|a| a == "podman" || a.ends_with("/podman"))
        && args.windows(2).any(|w| w[0] == "system" && w[1] == "service")
        && args.contains(&url)
}

fn is_service_of(pid: u32, socket: &Path) -> bool {
    process::is_alive(pid) && is_service_cmdline(&process::cmdline(pid), socket)
}

/// Pids of the Podman services listening on `socket`.
fn service_pids(socket: &Path) -> Vec<u32> {
    process::all_pids()
        .into_iter()
        .filter(|&p| is_service_of(p, socket))
        .collect()
}

/// Processes left from containers of the storage in `dir`: conmon (its
/// arguments name the storage) and the containers themselves (found by the
/// cgroup Podman made for each container id in that storage). Only needed
/// when Podman could not remove them.
/// The IDs of the containers in the node's storage.
fn container_ids(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("podman/root/overlay-containers"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.len() == 64 && n.bytes().all(|b| b.is_ascii_hexdigit()))
                .collect()
        })
        .unwrap_or_default()
}

/// Processes left from the node's containers `ids` (taken before Podman
/// removed them: a container stopped half-way, its conmon gone, keeps its
/// processes after `podman rm`) and their conmons.
fn leftover_pids(dir: &Path, ids: &[String]) -> Vec<u32> {
    let Some(dir) = absolute(dir) else {
        return vec![];
    };
    let prefix = format!("{}/", dir.display());
    process::all_pids()
        .into_iter()
        .filter(|&p| {
            let args = process::cmdline(p);
            let conmon =
                args.first().is_some_and(|a| a.ends_with("conmon")) && args.iter().any(|a| a.starts_with(&prefix));
            conmon || {
                let cg = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
                ids.iter().any(|id| in_container_cgroup(&cg, id))
            }
        })
        .collect()
}

/// True if a /proc/<pid>/cgroup text puts the process in container `id`'s
/// cgroup (cgroupfs manager: `.../libpod-<id>` or `.../libpod-conmon-<id>`).
fn in_container_cgroup(cgroup: &str, id: &str) -> bool {
    cgroup.lines().any(|l| {
        l.rsplit(':').next().is_some_and(|path| {
            path.split('/')
                .any(|c| c == format!("libpod-{id}") || c == format!("libpod-conmon-{id}"))
        })
    })
}

/// Named network namespaces (`netns-*`, Podman's) at the other end of veths
/// in namespace `ns`: the containers on the node's bridge.
fn container_netns(ns: &str) -> Vec<String> {
    let out = Command::new("ip").args(["-n", ns, "-o", "link", "show"]).output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    parse_link_netns(&text)
}

fn parse_link_netns(ip_o_link: &str) -> Vec<String> {
    let mut v: Vec<String> = ip_o_link
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "link-netns")?;
            words.next().map(str::to_string)
        })
        .filter(|n| n.starts_with("netns-") && !n.contains('/'))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Runs a command; the error carries its status and stderr.
fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!("{} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status);
    }
    Ok(())
}

/// Collects the first error of a best-effort sequence.
#[derive(Default)]
pub(crate) struct FirstError(Option<anyhow::Error>);

impl FirstError {
    pub(crate) fn note(&mut self, r: Result<()>) {
        if let Err(e) = r {
            self.0.get_or_insert(e);
        }
    }
    pub(crate) fn into_result(self) -> Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_flags() {
        let p = NodePodman::new(Path::new("/var/lib/berth-lab/7"), 7, 3);
        assert_eq!(p.dir, Path::new("/var/lib/berth-lab/7/n3-podman"));
        assert_eq!(p.log, Path::new("/var/lib/berth-lab/7/n3-podman.log"));
        assert_eq!(p.socket(), Path::new("/var/lib/berth-lab/7/n3-podman/podman.sock"));
        assert_eq!(p.netns, "bl7-n3");
        assert_eq!(p.node, "n3");
        assert_eq!(p.network, "bl7n3");
        assert_eq!(
            p.flags().join(" "),
            "--root /var/lib/berth-lab/7/n3-podman/podman/root \
             --runroot /var/lib/berth-lab/7/n3-podman/podman/runroot \
             --network-config-dir /var/lib/berth-lab/7/n3-podman/podman/net \
             --cgroup-manager cgroupfs --runtime runc --events-backend file"
        );
        let cmd = p.command(&["ps"]);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(cmd.get_program(), "nsenter");
        assert_eq!(args[0], "--net=/run/netns/bl7-n3");
        assert_eq!(args[1], "podman");
        assert_eq!(args.last().map(String::as_str), Some("ps"));
        // Unique on the host across labs and nodes.
        assert_ne!(network_name(1, 12), network_name(11, 2));
    }

    #[test]
    fn network_inspect_and_run_address() {
        let json = r#"[{"name":"bl7n1","driver":"bridge","network_interface":"berth-br0",
            "subnets":[{"subnet":"10.100.3.0/24","gateway":"10.100.3.1"}],"dns_enabled":false}]"#;
        let a = parse_network_inspect(json).unwrap();
        assert_eq!(a.subnet, "10.100.3.0/24".parse::<Ipv4Net>().unwrap());
        assert_eq!(a.gateway, Ipv4Addr::new(10, 100, 3, 1));
        assert_eq!(run_ip(&a).unwrap(), Ipv4Addr::new(10, 100, 3, 254));

        let no_gw = parse_network_inspect(r#"[{"subnets":[{"subnet":"10.9.0.0/16"}]}]"#).unwrap();
        assert_eq!(no_gw.gateway, Ipv4Addr::new(10, 9, 0, 1));
        assert_eq!(run_ip(&no_gw).unwrap(), Ipv4Addr::new(10, 9, 255, 254));

        assert!(parse_network_inspect("[]").is_err());
        assert!(parse_network_inspect("not json").is_err());
        assert!(parse_network_inspect(r#"[{"subnets":[{"subnet":"fd00::/64"}]}]"#).is_err());
        let tiny = NetworkAddrs {
            subnet: "10.0.0.0/31".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 0),
        };
        assert!(run_ip(&tiny).is_err());
        let slash30 = NetworkAddrs {
            subnet: "10.0.0.0/30".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 0, 2),
        };
        assert!(run_ip(&slash30).is_err(), "the only spare host is the gateway");
    }

    #[test]
    fn mountinfo_filtering() {
        let mi = "\
22 1 0:21 / / rw shared:1 - ext4 /dev/sda1 rw
90 22 0:50 / /var/lib/berth-lab/7/n1-podman/podman/root/overlay rw - ext4 /dev/sda1 rw
91 22 0:51 / /var/lib/berth-lab/7/n1-podman/podman/root/overlay/abc/merged rw - overlay overlay rw
92 22 0:52 / /var/lib/berth-lab/7/n1-podman-other rw - tmpfs tmpfs rw
93 22 0:53 / /var/lib/berth-lab/7/n1-podman/with\\040space rw - tmpfs tmpfs rw
94 22 0:54 / /var/lib/berth-lab/70/n1-podman rw - tmpfs tmpfs rw
";
        let m = mounts_under(mi, Path::new("/var/lib/berth-lab/7/n1-podman"));
        assert_eq!(
            m,
            vec![
                "/var/lib/berth-lab/7/n1-podman/podman/root/overlay/abc/merged",
                "/var/lib/berth-lab/7/n1-podman/podman/root/overlay",
                "/var/lib/berth-lab/7/n1-podman/with space",
            ]
        );
        assert_eq!(mounts_under(mi, Path::new("/var/lib/berth-lab/7")).len(), 4);
        assert!(mounts_under(mi, Path::new("/")).is_empty(), "never everything");
        assert!(mounts_under(mi, Path::new("/nonexistent")).is_empty());
        assert_eq!(unescape_mountinfo("a\\011b\\134c"), "a\tb\\c");
        assert_eq!(unescape_mountinfo("trailing\\04"), "trailing\\04");
        assert_eq!(unescape_mountinfo("\\777"), "\\777", "out of range stays as is");
    }

    #[test]
    fn process_matching() {
        let sock = Path::new("/l/7/n1-podman/podman.sock");
        let args = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();
        assert!(is_service_cmdline(
            &args("podman --root /l/7/n1-podman/podman/root system service --time=0 unix:///l/7/n1-podman/podman.sock"),
            sock
        ));
        assert!(is_service_cmdline(
            &args("/usr/bin/podman system service unix:///l/7/n1-podman/podman.sock"),
            sock
        ));
        // Another node's service, a client, or an editor with the path.
        assert!(!is_service_cmdline(
            &args("podman system service unix:///l/7/n11-podman/podman.sock"),
            sock
        ));
        assert!(!is_service_cmdline(
            &args("podman --url unix:///l/7/n1-podman/podman.sock ps"),
            sock
        ));
        assert!(!is_service_cmdline(
            &args("vi system service unix:///l/7/n1-podman/podman.sock"),
            sock
        ));
        assert!(!is_service_cmdline(&[], sock));

        let id = "a".repeat(64);
        let cg = format!("12:cpu,cpuacct:/libpod_parent/libpod-{id}\n0::/\n");
        assert!(in_container_cgroup(&cg, &id));
        let cg = format!("5:memory:/libpod_parent/libpod-conmon-{id}\n");
        assert!(in_container_cgroup(&cg, &id));
        assert!(!in_container_cgroup(
            &format!("5:memory:/libpod_parent/libpod-{id}x\n"),
            &id
        ));
        assert!(!in_container_cgroup("5:memory:/user.slice\n", &id));
    }

    #[test]
    fn container_namespaces_from_ip_link() {
        let text = "\
1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00
2: eth0@if7: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP\\    link/ether 02:00 brd ff:ff link-netns bl7-br
9: veth0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 master berth-br0\\    link/ether aa:a9 brd ff:ff link-netns netns-f1c507d1-d17b-2fcf-628e-49c1f632e282
10: veth1@if2: <BROADCAST> mtu 1500 master berth-br0\\    link/ether 06:aa brd ff:ff link-netns netns-f748bab1-14ed-360a-cda0-146670480656
";
        assert_eq!(
            parse_link_netns(text),
            vec![
                "netns-f1c507d1-d17b-2fcf-628e-49c1f632e282",
                "netns-f748bab1-14ed-360a-cda0-146670480656"
            ]
        );
        assert!(parse_link_netns("").is_empty());
    }

    #[test]
    fn node_dir_listing() {
        let dir = std::env::temp_dir().join(format!("berth-lab-podman-dirs-{}", std::process::id()));
        for d in [
            "n1-podman",
            "n12-podman",
            "n1",
            "n01-podman",
            "nx-podman",
            "n3-podman.log",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        assert_eq!(node_dirs(&dir), vec![1, 12]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(node_dirs(&dir).is_empty());
    }

    #[test]
    fn the_embedded_script_is_the_image_builder() {
        assert!(MAKE_TEST_IMAGE.starts_with("#!/usr/bin/env bash"));
        assert!(MAKE_TEST_IMAGE.contains(TEST_IMAGE));
        assert!(
            MAKE_TEST_IMAGE.contains("--ws-echo)"),
            "the option import_test_image passes"
        );
    }
}
