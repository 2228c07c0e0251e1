//! Long-running lab processes: the control plane (root namespace) and one agent
//! per node namespace, started as daemons that outlive `berth lab up`.
//!
//! Daemons are started through util-linux `setsid` (a new session, no
//! controlling terminal) and, for a node, `ip netns exec`. Both `exec` the next
//! program in place, so the pid returned by [`spawn_daemon`] is the pid of the
//! real program. (`setsid` only forks when it is already a process-group
//! leader, which a freshly spawned child never is.) This keeps the crate free
//! of `unsafe` (`pre_exec`), which the workspace denies.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Daemons this process spawned and has not reaped yet. Only these are ever
/// passed to `waitpid`: with pid_max at 32768, a stale pid of an exited daemon
/// is soon reused, and waiting on it could reap another thread's
/// `Command::output()` child, which then fails with ECHILD.
static UNREAPED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// How often liveness is polled while waiting for a process to end.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait for a process to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Spawns `program args` detached: a new session (via `setsid`), stdin from
/// `/dev/null`, stdout and stderr appended to `log` (its parent directory is
/// created if needed), with the extra environment variables `env` on top of
/// the current environment. With `netns`, the program runs inside that network
/// namespace through `ip netns exec <netns>`. Returns the pid of the program
/// itself.
///
/// The process is not waited for; it outlives the caller. If the caller keeps
/// running, [`is_alive`] / [`stop`] / [`kill9`] reap it once it has exited.
pub fn spawn_daemon(
    netns: Option<&str>,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log: &Path,
) -> Result<u32> {
    if program.components().count() > 1 && !program.exists() {
        bail!("cannot start {}: no such file", program.display());
    }
    if let Some(ns) = netns {
        if ns.is_empty() || ns.contains('/') || !Path::new("/run/netns").join(ns).exists() {
            bail!(
                "cannot start {} in network namespace {ns:?}: no such namespace",
                program.display()
            );
        }
    }
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating log directory {}", dir.display()))?;
    }
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening log file {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("duplicating log file handle {}", log.display()))?;

    let mut cmd = Command::new("setsid");
    if let Some(ns) = netns {
        cmd.args(["ip", "netns", "exec", ns]);
    }
    cmd.arg(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::from(File::open("/dev/null").context("opening /dev/null")?))
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let child = cmd.spawn().with_context(|| {
        format!(
            "spawning {}{} {}",
            netns.map(|ns| format!("(in netns {ns}) ")).unwrap_or_default(),
            program.display(),
            args.join(" ")
        )
    })?;
    // Dropping `Child` neither kills nor waits; the process is reaped later by
    // `is_alive` (WNOHANG) if we are still its parent when it exits.
    let pid = child.id();
    UNREAPED.lock().unwrap_or_else(|e| e.into_inner()).insert(pid);
    wait_exec(pid, program);
    Ok(pid)
}

/// How long `spawn_daemon` waits for `setsid` / `ip netns exec` to exec the
/// real program.
const EXEC_WAIT: Duration = Duration::from_secs(2);

/// Waits (at most `EXEC_WAIT`) until `pid` runs `program` (its comm is the
/// program's file name, truncated like the kernel does) or has ended, so that
/// callers see the real program behind the pid.
fn wait_exec(pid: u32, program: &Path) {
    let Some(name) = program.file_name() else {
        return;
    };
    let name = name.as_encoded_bytes();
    let want = &name[..name.len().min(15)];
    let deadline = Instant::now() + EXEC_WAIT;
    while Instant::now() < deadline {
        match std::fs::read(format!("/proc/{pid}/comm")) {
            Ok(comm) if comm.strip_suffix(b"\n").unwrap_or(&comm) == want => return,
            Ok(_) if is_alive(pid) => sleep(Duration::from_millis(2)),
            _ => return,
        }
    }
}

/// Converts a pid to a `Pid`, refusing values that `kill`/`waitpid` would treat
/// as groups or "every process" (0, negative after the cast) and init.
fn target(pid: u32) -> Option<Pid> {
    match i32::try_from(pid) {
        Ok(p) if p > 1 => Some(Pid::from_raw(p)),
        _ => None,
    }
}

/// Reaps `pid` if it is an exited daemon that this process spawned. Returns
/// true if it was reaped.
fn reap(pid: Pid) -> bool {
    let mut set = UNREAPED.lock().unwrap_or_else(|e| e.into_inner());
    if !set.contains(&(pid.as_raw() as u32)) {
        return false;
    }
    match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(nix::sys::wait::WaitStatus::StillAlive) => false,
        Ok(_) => {
            set.remove(&(pid.as_raw() as u32));
            true
        }
        // ECHILD: no longer ours; never wait on it again, /proc decides.
        Err(_) => {
            set.remove(&(pid.as_raw() as u32));
            false
        }
    }
}

/// Process state letter from `/proc/<pid>/stat`, `None` if there is no such
/// process.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ..." - comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

/// True if `pid` is a running (not zombie, not dead) process. Reaps it first if
/// it is an exited child of ours.
pub fn is_alive(pid: u32) -> bool {
    let Some(p) = target(pid) else {
        return false;
    };
    if reap(p) {
        return false;
    }
    !matches!(proc_state(pid), None | Some('Z') | Some('X') | Some('x'))
}

/// Sends `sig`; Ok if the process is already gone.
fn signal(pid: u32, sig: Signal) -> Result<()> {
    let Some(p) = target(pid) else {
        bail!("refusing to signal pid {pid}");
    };
    match kill(p, sig) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("sending {sig} to pid {pid}")),
    }
}

/// Waits until `pid` is no longer alive or `timeout` passes; returns whether it
/// ended.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(POLL);
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Ok if the process is already
/// gone. Errors if it still exists a few seconds after SIGKILL.
pub fn stop(pid: u32, grace: Duration) -> Result<()> {
    if !is_alive(pid) {
        return Ok(());
    }
    signal(pid, Signal::SIGTERM)?;
    if wait_gone(pid, grace) {
        return Ok(());
    }
    kill9(pid)
}

/// SIGKILL, then wait (a few seconds at most) until it is gone. Ok if it is
/// already gone.
pub fn kill9(pid: u32) -> Result<()> {
    if !is_alive(pid) {
        return Ok(());
    }
    signal(pid, Signal::SIGKILL)?;
    if wait_gone(pid, KILL_WAIT) {
        Ok(())
    } else {
        bail!("pid {pid} still exists {}s after SIGKILL", KILL_WAIT.as_secs())
    }
}

/// Stops many processes at once: SIGTERM to all, wait up to `grace` for all of
/// them, then SIGKILL the rest. Returns the first error.
pub fn stop_all(pids: &[u32], grace: Duration) -> Result<()> {
    let mut first: Option<anyhow::Error> = None;
    for &pid in pids {
        if is_alive(pid) {
            if let Err(e) = signal(pid, Signal::SIGTERM) {
                first.get_or_insert(e);
            }
        }
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| is_alive(p)) && Instant::now() < deadline {
        sleep(POLL);
    }
    for &pid in pids {
        if let Err(e) = kill9(pid) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

// --- /proc scanners ---

/// The program name of `pid` (cut to 15 bytes by the kernel).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_string())
}

/// The arguments `pid` was started with.
pub fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every process but this one.
pub fn all_pids() -> Vec<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&p| p != me)
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// Kills the process on drop (test failure included).
    struct ProcGuard(u32);
    impl Drop for ProcGuard {
        fn drop(&mut self) {
            let _ = kill9(self.0);
        }
    }

    /// A temporary directory removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!("berth-lab-proc-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn comm(pid: u32) -> String {
        super::comm(pid).unwrap_or_default()
    }

    #[test]
    fn is_alive_never_reaps_a_child_it_did_not_spawn() {
        // A `Command` child of another thread, whose pid might be a reused
        // daemon pid: checking it must leave its exit status to its owner.
        let mut child = Command::new("/bin/true").spawn().unwrap();
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc_state(pid) != Some('Z') && Instant::now() < deadline {
            sleep(POLL);
        }
        assert_eq!(proc_state(pid), Some('Z'), "/bin/true exited");
        assert!(!is_alive(pid), "a zombie is not alive");
        let status = child.wait().expect("the owner still reaps its child");
        assert!(status.success());
    }

    #[test]
    fn daemon_is_detached_logs_and_stops() {
        let dir = TempDir::new("detach");
        let log = dir.0.join("sub/sleep.log");
        let pid = spawn_daemon(None, Path::new("/bin/sleep"), &["300".to_string()], &[], &log).unwrap();
        let _g = ProcGuard(pid);
        assert!(is_alive(pid));
        assert_eq!(comm(pid), "sleep", "returned pid is the program itself");
        let sid = nix::unistd::getsid(Some(Pid::from_raw(pid as i32))).unwrap();
        assert_eq!(sid.as_raw(), pid as i32, "runs in its own session");
        assert!(log.exists());
        stop(pid, Duration::from_secs(5)).unwrap();
        assert!(!is_alive(pid));
        // Already gone: still fine.
        stop(pid, Duration::from_secs(1)).unwrap();
        kill9(pid).unwrap();
    }

    #[test]
    fn output_and_env_go_to_log_and_exit_is_not_alive() {
        let dir = TempDir::new("log");
        let log = dir.0.join("sh.log");
        std::fs::write(&log, "previous\n").unwrap();
        let pid = spawn_daemon(
            None,
            Path::new("/bin/sh"),
            &["-c".to_string(), "echo out=$BERTH_TEST_VAR; echo err >&2".to_string()],
            &[("BERTH_TEST_VAR".to_string(), "hello".to_string())],
            &log,
        )
        .unwrap();
        let _g = ProcGuard(pid);
        // It exits by itself; as our child it becomes a zombie that is_alive
        // treats as dead (and reaps).
        assert!(wait_gone(pid, Duration::from_secs(10)));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.starts_with("previous\n"), "log is appended: {text:?}");
        assert!(text.contains("out=hello"), "{text:?}");
        assert!(text.contains("err"), "{text:?}");
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_err(), "reaped");
    }

    #[test]
    fn sigterm_ignored_falls_back_to_sigkill() {
        let dir = TempDir::new("term");
        let log = dir.0.join("trap.log");
        let pid = spawn_daemon(
            None,
            Path::new("/bin/sh"),
            &[
                "-c".to_string(),
                "trap '' TERM; echo ready; while :; do sleep 0.05; done".to_string(),
            ],
            &[],
            &log,
        )
        .unwrap();
        let _g = ProcGuard(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap().contains("ready") {
            assert!(Instant::now() < deadline, "shell did not start");
            sleep(POLL);
        }
        let t = Instant::now();
        stop(pid, Duration::from_millis(300)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert!(!is_alive(pid));
    }

    #[test]
    fn bad_inputs() {
        assert!(!is_alive(0));
        assert!(!is_alive(u32::MAX));
        assert!(kill9(0).is_ok(), "not alive, nothing to do");
        let dir = TempDir::new("bad");
        let log = dir.0.join("x.log");
        assert!(spawn_daemon(None, Path::new("/nonexistent/prog"), &[], &[], &log).is_err());
        assert!(spawn_daemon(Some("bl-no-such-ns"), Path::new("/bin/true"), &[], &[], &log).is_err());
    }
}
