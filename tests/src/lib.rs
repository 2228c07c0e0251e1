//! Helpers for the end-to-end tests: bringing a lab up, pings, and
//! WireGuard inspection inside lab nodes. The lab itself is the `berth-lab`
//! crate; tests get its items from here too.

use anyhow::bail;
pub use berth_lab::{default_bin_dir, demo, Lab, LabGuard, LabSpec};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod load;

/// Builds lab `id` with `nodes` workers (in the temp dir) and waits until it
/// has converged; removed when the guard drops.
pub async fn lab_up(id: u8, nodes: u16) -> LabGuard {
    let dir = std::env::temp_dir().join(format!("berth-e2e-{id}"));
    LabGuard::up(&LabSpec::new(id, dir, nodes)).await.expect("lab up")
}

/// Mesh IP of a lab node, as the control plane allocated it.
pub async fn mesh_ip(lab: &Lab, name: &str) -> String {
    let nodes = lab.admin().unwrap().list_nodes().await.unwrap();
    nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
        .mesh_ip
        .to_string()
}

/// Pings `ip` from `from` until one reply arrives or `within` passes.
pub fn ping_within(lab: &Lab, from: &str, ip: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = lab.exec(from, &["ping", "-c", "1", "-W", "1", ip])?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{from} cannot ping {ip}: {}", String::from_utf8_lossy(&out.stdout));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A ping running in the background (20 per second) from a lab node.
pub struct ContinuousPing {
    child: Option<Child>,
    label: String,
}

/// Pings of a [`ContinuousPing`] sent before `finish` was called. The ones
/// sent during its last second are left out: their replies may still have
/// been on the way when ping was interrupted (it does not wait for them).
#[derive(Debug, Clone)]
pub struct PingResult {
    pub sent: u32,
    pub received: u32,
    /// Sequence numbers of settled pings that got no reply.
    pub missing: Vec<u32>,
}

/// Pings sent in the last second before the stop (`-i 0.05`, `-W 1`).
const PINGS_IN_FLIGHT: u32 = 20;

impl ContinuousPing {
    pub fn start(lab: &Lab, from: &str, ip: &str) -> ContinuousPing {
        let ns = lab.net.node_ns(lab.node(from).unwrap().index);
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "ping", "-i", "0.05", "-W", "1", ip])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ping");
        ContinuousPing {
            child: Some(child),
            label: format!("{from} -> {ip}"),
        }
    }

    /// Stops the ping (SIGINT, so it prints its summary) and returns the
    /// counts. Ping goes on for the in-flight second first, so every ping
    /// sent before this call is counted.
    pub fn finish(mut self) -> PingResult {
        std::thread::sleep(Duration::from_millis(50) * PINGS_IN_FLIGHT);
        let child = self.child.take().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let out = child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout);
        parse_ping_output(&text).unwrap_or_else(|| panic!("no ping summary for {}: {text}", self.label))
    }
}

/// Reads iputils ping's output: the replies by sequence number and the
/// summary's count of packets transmitted.
fn parse_ping_output(text: &str) -> Option<PingResult> {
    let summary = text.lines().find(|l| l.contains("packets transmitted"))?;
    let transmitted: u32 = summary.split_whitespace().next()?.parse().ok()?;
    let replied: std::collections::BTreeSet<u32> = text
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    let settled = transmitted.saturating_sub(PINGS_IN_FLIGHT);
    let missing: Vec<u32> = (1..=settled).filter(|seq| !replied.contains(seq)).collect();
    Some(PingResult {
        sent: settled,
        received: settled - missing.len() as u32,
        missing,
    })
}

impl Drop for ContinuousPing {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A server a test started (`git daemon`, busybox httpd): killed when the
/// test ends, passed or not, so none outlives its namespace.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Public keys of the WireGuard peers configured on a lab node, sorted
/// (wireguard-go lists them in no fixed order).
pub fn wg_peers(lab: &Lab, node: &str) -> anyhow::Result<Vec<String>> {
    let idx = lab.node(node)?.index;
    let out = lab.exec(node, &["wg", "show", &lab.interface(idx), "peers"])?;
    if !out.status.success() {
        bail!("wg show on {node}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut peers: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    peers.sort();
    Ok(peers)
}

/// Public key of a lab node's WireGuard interface.
pub fn wg_public_key(lab: &Lab, node: &str) -> anyhow::Result<String> {
    let idx = lab.node(node)?.index;
    let out = lab.exec(node, &["wg", "show", &lab.interface(idx), "public-key"])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Pids of the wireguard-go processes in a lab node's namespace.
pub fn wireguard_go_pids(lab: &Lab, node: &str) -> anyhow::Result<Vec<u32>> {
    berth_lab::net::ns_program_pids(&lab.net.node_ns(lab.node(node)?.index), "wireguard-go")
}

/// Runs the `berth` CLI (beside the lab's binaries) against the lab's
/// control plane.
pub fn berth(lab: &Lab, args: &[&str]) -> std::process::Output {
    berth_command(lab, args).output().expect("run berth")
}

/// The `berth` command line [`berth`] runs, to spawn it instead.
pub fn berth_command(lab: &Lab, args: &[&str]) -> Command {
    let target = lab.client_config();
    let mut cmd = Command::new(default_bin_dir().join("berth"));
    cmd.args(args)
        .env("BERTH_URL", &target.url)
        .env("BERTH_ADMIN_TOKEN_FILE", &target.admin_token_file)
        .env("BERTH_CA_FILE", &target.ca_file);
    cmd
}

#[cfg(test)]
mod ping_tests {
    use super::parse_ping_output;

    fn output(transmitted: u32, replies: &[u32]) -> String {
        let mut s = String::from("PING 10.100.0.3 (10.100.0.3) 56(84) bytes of data.\n");
        for seq in replies {
            s += &format!("64 bytes from 10.100.0.3: icmp_seq={seq} ttl=64 time=0.4 ms\n");
        }
        s += &format!(
            "\n--- 10.100.0.3 ping statistics ---\n{transmitted} packets transmitted, {} received, 0% packet loss, time 3000ms\n",
            replies.len()
        );
        s
    }

    #[test]
    fn replies_still_in_flight_at_the_stop_are_not_losses() {
        let replies: Vec<u32> = (1..=74).collect();
        let r = parse_ping_output(&output(75, &replies)).unwrap();
        assert_eq!((r.sent, r.received), (55, 55));
        assert!(r.missing.is_empty());
    }

    #[test]
    fn a_settled_ping_without_reply_is_lost() {
        let replies: Vec<u32> = (1..=75).filter(|s| *s != 30 && *s != 31).collect();
        let r = parse_ping_output(&output(75, &replies)).unwrap();
        assert_eq!((r.sent, r.received), (55, 53));
        assert_eq!(r.missing, [30, 31]);
    }

    #[test]
    fn unreachable_lines_and_duplicates_are_not_replies() {
        let mut text = output(40, &[1, 2, 2, 3]);
        text += "From 10.100.0.1 icmp_seq=4 Destination Host Unreachable\n";
        let r = parse_ping_output(&text).unwrap();
        assert_eq!((r.sent, r.received), (20, 3));
        assert_eq!(r.missing.first(), Some(&4));
    }

    #[test]
    fn no_summary_is_none() {
        assert!(parse_ping_output("ping: connect: Network is unreachable\n").is_none());
    }
}
