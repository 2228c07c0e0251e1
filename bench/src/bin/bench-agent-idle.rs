//! bench-agent-idle: what an idle `berth-agent` costs.
//!
//! Builds a lab (real control plane, real agents, wireguard-go) with
//! `--nodes` nodes, waits until it has converged, waits `--warmup` seconds
//! more, then samples every agent for `--seconds`:
//!
//! * RSS: VmRSS from /proc/<pid>/status, sampled every `--interval-ms`
//!   (mean and max of the samples), and VmHWM (peak) at the end;
//! * CPU %: (utime + stime) consumed during the window, from
//!   /proc/<pid>/stat, divided by the window's wall time (100 % = one core);
//!   CPU of short-lived children the agent ran and waited for
//!   (cutime + cstime) is shown separately.
//!
//! The userspace `wireguard-go` each lab node runs (no kernel WireGuard on
//! this machine) is a separate process and is shown separately.

use berth_bench::{init_tls, mib, sample_pid, ticks_secs, until_interrupted, ProcSample};
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "bench-agent-idle", about = "Idle berth-agent: resident memory and CPU")]
struct Args {
    /// Lab id (underlay 198.18.ID.0/24).
    #[arg(long, default_value_t = 91)]
    id: u8,
    /// Lab directory (removed afterwards unless --keep-logs).
    #[arg(long, default_value = "/tmp/berth-bench-91")]
    dir: PathBuf,
    /// Nodes in the lab.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Seconds to wait after convergence before sampling.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Length of the sampling window, seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// RSS sampling interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Keep the lab directory (logs) afterwards.
    #[arg(long)]
    keep_logs: bool,
}

/// A process sampled over the window.
struct Sampled {
    label: String,
    pid: u32,
    start: ProcSample,
    rss: Vec<u64>,
    end: ProcSample,
}

impl Sampled {
    fn new(label: String, pid: u32) -> anyhow::Result<Sampled> {
        let start = sample_pid(pid)?;
        Ok(Sampled {
            label,
            pid,
            start,
            rss: vec![start.rss_kib],
            end: start,
        })
    }
}

struct Row {
    label: String,
    pid: u32,
    rss_mean: f64,
    rss_max: f64,
    hwm: f64,
    cpu_pct: f64,
    child_pct: f64,
}

async fn run(args: &Args, rows: &mut Vec<Row>) -> anyhow::Result<f64> {
    let lab = berth_bench::lab_up(args.id, &args.dir, args.nodes, args.keep_logs).await?;
    println!(
        "converged; idling {} s before sampling for {} s",
        args.warmup, args.seconds
    );
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;

    let mut sampled = Vec::new();
    for n in &lab.state.nodes {
        let pid = n.agent_pid.ok_or_else(|| anyhow::anyhow!("{}: no agent pid", n.name))?;
        sampled.push(Sampled::new(format!("{} berth-agent", n.name), pid)?);
    }
    for n in &lab.state.nodes {
        let ifname = lab.interface(n.index);
        for pid in berth_bench::find_pids(&["wireguard-go", &ifname]) {
            sampled.push(Sampled::new(format!("{} wireguard-go ({ifname})", n.name), pid)?);
        }
    }
    if let Some(pid) = lab.state.cp_pid {
        sampled.push(Sampled::new("control plane (3 agents)".into(), pid)?);
    }
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(args.seconds);
    let interval = Duration::from_millis(args.interval_ms.max(10));
    let mut next = t0 + interval;
    while next <= end {
        tokio::time::sleep_until(next.into()).await;
        for t in &mut sampled {
            t.rss.push(sample_pid(t.pid)?.rss_kib);
        }
        next += interval;
    }
    tokio::time::sleep_until(end.into()).await;
    for t in &mut sampled {
        t.end = sample_pid(t.pid)?;
        t.rss.push(t.end.rss_kib);
    }
    let wall = t0.elapsed().as_secs_f64();
    println!("sampled; load average now {}", berth_bench::loadavg());
    for t in &sampled {
        let mean = t.rss.iter().sum::<u64>() as f64 / t.rss.len() as f64;
        rows.push(Row {
            label: t.label.clone(),
            pid: t.pid,
            rss_mean: mib(mean as u64),
            rss_max: mib(*t.rss.iter().max().unwrap_or(&0)),
            hwm: mib(t.end.hwm_kib),
            cpu_pct: 100.0 * ticks_secs(t.end.cpu_ticks.saturating_sub(t.start.cpu_ticks)) / wall,
            child_pct: 100.0 * ticks_secs(t.end.child_ticks.saturating_sub(t.start.child_ticks)) / wall,
        });
    }
    Ok(wall)
}

#[tokio::main]
async fn main() {
    init_tls();
    let args = Args::parse();
    let mut rows = Vec::new();
    let outcome = until_interrupted(run(&args, &mut rows)).await;
    if let Ok(wall) = &outcome {
        println!();
        println!(
            "== bench-agent-idle: {} nodes, {:.1} s window after {} s idle, RSS sampled every {} ms ==",
            args.nodes, wall, args.warmup, args.interval_ms
        );
        println!(
            "(CPU %: of one core; {} CPUs here; resolution {:.3} % = one clock tick over the window; \
             lab agents run with --heartbeat 5 and debug logging)",
            std::thread::available_parallelism().map(|x| x.get()).unwrap_or(1),
            100.0 / berth_bench::clk_tck() as f64 / wall
        );
        println!(
            "  {:<36} {:>7} {:>13} {:>12} {:>10} {:>8} {:>12}",
            "process", "pid", "RSS mean MB", "RSS max MB", "HWM MB", "CPU %", "children %"
        );
        for r in &rows {
            println!(
                "  {:<36} {:>7} {:>13.1} {:>12.1} {:>10.1} {:>8.2} {:>12.2}",
                r.label, r.pid, r.rss_mean, r.rss_max, r.hwm, r.cpu_pct, r.child_pct
            );
        }
        let agents: Vec<&Row> = rows.iter().filter(|r| r.label.ends_with("berth-agent")).collect();
        let max_rss = agents.iter().map(|r| r.rss_max).fold(0.0, f64::max);
        let max_cpu = agents.iter().map(|r| r.cpu_pct + r.child_pct).fold(0.0, f64::max);
        println!(
            "  target agent RSS < 25 MB: {} (max {max_rss:.1} MB)",
            if max_rss < 25.0 { "met" } else { "MISSED" }
        );
        println!("  target agent CPU ~0 %: max {max_cpu:.2} % of one core (agent + its children)");
    }
    if let Err(e) = outcome {
        eprintln!("bench-agent-idle: {e:#}");
        std::process::exit(1);
    }
}
