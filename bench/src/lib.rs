//! Shared pieces of the Berth benchmarks (`src/bin/bench-*.rs`): percentile
//! summaries, /proc sampling, a process guard and signal handling. The labs
//! they run on come from the `berth-lab` crate.
//!
//! The benchmarks print figures; they never assert on timing.

use anyhow::{bail, Context};
use berth_lab::{LabGuard, LabSpec};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// Installs the rustls crypto provider (once, before any TLS).
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Summary of a set of durations. Percentiles use the nearest-rank method:
/// pN is the smallest sample such that at least N % of the samples are <= it
/// (so with 20 samples, p99 is the maximum).
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub count: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort();
        let total: Duration = s.iter().sum();
        Some(Summary {
            count: s.len(),
            min: s[0],
            p50: percentile(&s, 50.0),
            p90: percentile(&s, 90.0),
            p99: percentile(&s, 99.0),
            max: s[s.len() - 1],
            mean: total / s.len() as u32,
        })
    }

    /// One line: `count=20 min=.. p50=.. p90=.. p99=.. max=.. mean=.. (ms)`.
    pub fn line(&self) -> String {
        format!(
            "count={:<3} min={:>8} p50={:>8} p90={:>8} p99={:>8} max={:>8} mean={:>8}  (ms)",
            self.count,
            ms(self.min),
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.max),
            ms(self.mean)
        )
    }
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Prints a summary line with a label, or "no samples".
pub fn print_summary(label: &str, samples: &[Duration]) {
    match Summary::of(samples) {
        Some(s) => println!("  {label:<28} {}", s.line()),
        None => println!("  {label:<28} no samples"),
    }
}

// ---------------------------------------------------------------------------
// /proc sampling
// ---------------------------------------------------------------------------

/// Memory and CPU of one process, read from /proc/<pid>/{status,stat}.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// Resident set size now (VmRSS), KiB.
    pub rss_kib: u64,
    /// Peak resident set size (VmHWM), KiB.
    pub hwm_kib: u64,
    /// utime + stime of the process (all its threads), clock ticks.
    pub cpu_ticks: u64,
    /// cutime + cstime: CPU of children it has waited for, clock ticks.
    pub child_ticks: u64,
}

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clk_tck() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as u64,
        _ => 100,
    }
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Samples process `pid` ("self" works too).
pub fn sample(pid: &str) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    // "pid (comm) state ppid ..." — comm may contain spaces; fields after ')'
    // start at field 3 (state). utime is field 14, stime 15, cutime 16, cstime 17.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> u64 { f.get(i - 3).and_then(|s| s.parse().ok()).unwrap_or(0) };
    Ok(ProcSample {
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
        cpu_ticks: num(14) + num(15),
        child_ticks: num(16) + num(17),
    })
}

/// Samples process `pid`.
pub fn sample_pid(pid: u32) -> anyhow::Result<ProcSample> {
    sample(&pid.to_string())
}

/// CPU seconds between two tick counts.
pub fn ticks_secs(ticks: u64) -> f64 {
    ticks as f64 / clk_tck() as f64
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Pids of processes whose command line contains every one of `needles`.
pub fn find_pids(needles: &[&str]) -> Vec<u32> {
    use berth_lab::process::{all_pids, cmdline};
    all_pids()
        .into_iter()
        .filter(|&p| {
            let cmd = cmdline(p).join(" ");
            needles.iter().all(|n| cmd.contains(n))
        })
        .collect()
}

/// Busy and total CPU time of the whole machine (all CPUs), clock ticks,
/// from the first line of /proc/stat. Busy = everything but idle and iowait.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// The 1, 5 and 15 minute load averages, as printed by `uptime`.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Raises RLIMIT_NOFILE to `want` (capped at the hard limit). Child processes
/// started afterwards inherit it. Returns the new soft limit.
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let target = want.min(hard);
    if target > soft && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        return target;
    }
    soft
}

// ---------------------------------------------------------------------------
// Interruption and cleanup
// ---------------------------------------------------------------------------

/// Runs `fut` until it finishes or the process gets SIGINT (Ctrl-C) or
/// SIGTERM. On a signal the future is dropped (so guards it borrowed are
/// released by the caller's scope) and an error is returned.
pub async fn until_interrupted<T>(fut: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        r = fut => r,
        _ = int.recv() => bail!("interrupted (SIGINT); cleaning up"),
        _ = term.recv() => bail!("terminated (SIGTERM); cleaning up"),
    }
}

/// The benchmarks' lab: `nodes` workers (each with its Podman) in `dir`,
/// 120 s to converge, a leftover lab `id` removed first. Removed when the
/// guard drops, which also happens when the benchmark is interrupted.
pub async fn lab_up(id: u8, dir: &Path, nodes: u16, keep_logs: bool) -> anyhow::Result<LabGuard> {
    println!(
        "building lab {id} in {} with {nodes} nodes ... (load average {})",
        dir.display(),
        loadavg()
    );
    LabGuard::up(&LabSpec {
        converge_within: Duration::from_secs(120),
        keep_logs,
        ..LabSpec::new(id, dir, nodes)
    })
    .await
}

/// Stops a process we started (SIGTERM, then SIGKILL) on drop.
pub struct ProcessGuard {
    pub pid: u32,
    pub name: &'static str,
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if let Err(e) = berth_lab::process::stop(self.pid, Duration::from_secs(5)) {
            eprintln!("warning: stopping {} (pid {}): {e:#}", self.name, self.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        let s = Summary::of(&v).unwrap();
        assert_eq!(s.p50, Duration::from_millis(10));
        assert_eq!(s.p90, Duration::from_millis(18));
        assert_eq!(s.p99, Duration::from_millis(20));
        assert_eq!(s.max, Duration::from_millis(20));
        assert_eq!(s.min, Duration::from_millis(1));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn samples_self() {
        let s = sample("self").unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib);
    }
}
