//! The `wireguard-go` process: starting it as a daemon of its own (own
//! process group, reparented to init, so it outlives the agent), finding it
//! again by its command line, telling whether it is alive, and stopping it.

use std::{path::Path, process::Stdio, time::Duration};

use anyhow::{anyhow, bail, Context};
use tokio::process::Command;

use super::uapi::{self, Probe};

/// How long `wireguard-go` may take to create its device and daemonise.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts `wireguard-go <if>`. It daemonises by itself: the process we start
/// creates the TUN device and the UAPI socket, re-executes itself in the
/// background and exits. It is started in a process group of its own, so
/// signals to the agent's group (Ctrl-C, a group kill) never reach it, and
/// the daemon is reparented to init, so it outlives the agent. (Under
/// systemd the agent's unit must not kill its whole cgroup on stop, e.g.
/// `KillMode=process`, or the daemon goes with it.)
pub(super) async fn start(binary: &Path, ifname: &str) -> anyhow::Result<()> {
    tracing::info!(interface = %ifname, binary = %binary.display(), "starting wireguard-go");
    // Without LOG_LEVEL the daemon gets /dev/null as stdout/stderr, so our
    // pipe closes when the launcher exits (with LOG_LEVEL it would inherit
    // the pipe and `output()` would wait for the daemon).
    let child = Command::new(binary)
        .arg(ifname)
        .env_remove("LOG_LEVEL")
        .env_remove("WG_PROCESS_FOREGROUND")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let out = tokio::time::timeout(START_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{} {ifname} did not daemonise in time", binary.display()))??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!(
            "{} {ifname} failed ({}): {}",
            binary.display(),
            out.status,
            stderr.trim()
        );
    }
    tracing::debug!(interface = %ifname, output = %stderr.trim(), "wireguard-go daemonised");

    // The launcher creates the socket before it forks, but be tolerant.
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if uapi::probe(ifname).await? == Probe::Alive {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("wireguard-go for {ifname} started but its UAPI socket does not answer");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finds the `wireguard-go` daemon for `ifname` by its command line
/// (`<binary> [-f] <ifname>`; the daemon keeps the launcher's argv). The UAPI
/// socket's peer credentials would name the launcher, which has exited.
pub fn find_pid(ifname: &str, binary: &Path) -> Option<u32> {
    let binary_name = binary.file_name()?.to_str()?;
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).filter(|arg| !arg.is_empty()).collect();
        let first = Path::new(std::str::from_utf8(args.first()?).ok()?);
        let matches = args.len() >= 2
            && first.file_name()?.to_str()? == binary_name
            && *args.last()? == ifname.as_bytes()
            && process_alive(pid);
        matches.then_some(pid)
    })
}

/// True while the process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// SIGTERM, wait up to 5 s, then SIGKILL.
pub(super) async fn stop(pid: u32) {
    use nix::{sys::signal, unistd::Pid};
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let _ = signal::kill(Pid::from_raw(raw), signal::Signal::SIGTERM);
    for _ in 0..100 {
        if !process_alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(pid, "wireguard-go did not stop on SIGTERM, killing it");
    let _ = signal::kill(Pid::from_raw(raw), signal::Signal::SIGKILL);
}
