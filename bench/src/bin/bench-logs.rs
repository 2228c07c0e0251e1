//! bench-logs: `berth logs -f` on a real lab (one worker, its Podman, the
//! control plane relaying), read through the API exactly as the CLI reads it.
//!
//! - **Latency.** Every 20 ms, a replica prints the kernel's uptime
//!   (`/proc/uptime`, 10 ms steps, the same clock for the container and this
//!   process). A line's latency runs from that time to the line's arrival
//!   here. Podman 4.3 stamps log lines only to the second, so its `ts` cannot
//!   serve.
//! - **Throughput.** A replica writes as fast as `yes` can. The figure is the
//!   lines per second that reach this process after a warm-up second. When
//!   the stream carries less than the container writes, the figure is what
//!   the stream can carry.
//! - **Cost.** A replica writes about 1,000 lines/s (bursts of 100 every
//!   100 ms). The figure is the CPU that the agent and the control plane use
//!   while one follower reads them.

use anyhow::Context;
use berth_bench::{init_tls, lab_up, print_summary, sample_pid, ticks_secs, until_interrupted};
use berth_client::{AdminClient, LogsQuery};
use berth_protocol::service::ServiceSpec;
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "berth logs -f on a lab: latency, throughput, agent CPU")]
struct Args {
    /// Lab id (underlay 198.18.ID.0/24).
    #[arg(long, default_value_t = 95)]
    id: u8,
    /// Lab directory (removed afterwards unless --keep-logs).
    #[arg(long, default_value = "/tmp/berth-bench-95")]
    dir: PathBuf,
    /// Seconds each measurement runs.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    #[arg(long)]
    keep_logs: bool,
}

/// The first figure of a `/proc/uptime` line: seconds since boot.
fn uptime_secs(line: &str) -> Option<f64> {
    line.split_whitespace().next()?.parse().ok()
}

fn uptime() -> Option<f64> {
    uptime_secs(&std::fs::read_to_string("/proc/uptime").ok()?)
}

async fn service(admin: &AdminClient, lab: &berth_lab::Lab, name: &str, command: &str) -> anyhow::Result<()> {
    let spec = ServiceSpec {
        command: Some(command.into()),
        port: None,
        health_http: None,
        ..berth_lab::demo::web_service(lab, name, 1)
    };
    admin.deploy_service(&spec).await?;
    berth_lab::demo::wait_healthy(admin, name, 1, Duration::from_secs(120), |_| {}).await?;
    Ok(())
}

/// Follows `name`'s log for `secs`, passing each line to `each`.
async fn follow(admin: &AdminClient, name: &str, secs: u64, mut each: impl FnMut(&berth_protocol::stream::LogLine)) {
    let q = LogsQuery {
        follow: true,
        tail: Some(0),
        ..Default::default()
    };
    let _ = tokio::time::timeout(Duration::from_secs(secs), admin.service_logs(name, &q, |l| each(&l))).await;
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let lab = lab_up(args.id, &args.dir, 1, args.keep_logs).await?;
    let admin = lab.admin()?;
    let agent = lab.node("n1")?.agent_pid.context("n1 has no agent")?;
    let cp = lab.state.cp_pid.context("the lab has no control plane")?;

    // Latency.
    service(
        &admin,
        &lab,
        "ticker",
        "while true; do cat /proc/uptime; usleep 20000; done",
    )
    .await?;
    let mut lat = vec![];
    follow(&admin, "ticker", args.secs, |l| {
        let written = l.line.as_deref().and_then(uptime_secs);
        if let (Some(w), Some(now)) = (written, uptime()) {
            lat.push(Duration::from_secs_f64((now - w).max(0.0)));
        }
    })
    .await;
    lat.sort();
    print_summary("latency, line logged -> berth logs -f (50 lines/s)", &lat);
    admin.remove_service("ticker").await?;

    // Throughput.
    service(
        &admin,
        &lab,
        "flood",
        "yes 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'",
    )
    .await?;
    let start = Instant::now();
    let (mut counted, mut first) = (0u64, None);
    follow(&admin, "flood", args.secs + 1, |l| {
        if l.line.is_some() && start.elapsed() >= Duration::from_secs(1) {
            first.get_or_insert_with(Instant::now);
            counted += 1;
        }
    })
    .await;
    let took = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
    println!(
        "throughput: {counted} lines in {took:.1} s = {:.0} lines/s through one stream (64-byte lines)",
        counted as f64 / took.max(0.001)
    );
    admin.remove_service("flood").await?;

    // Cost at ~1,000 lines/s.
    service(
        &admin,
        &lab,
        "steady",
        "while true; do i=0; while [ $i -lt 100 ]; do echo line $i; i=$((i+1)); done; usleep 100000; done",
    )
    .await?;
    let (a0, c0, t0) = (sample_pid(agent)?, sample_pid(cp)?, Instant::now());
    let mut lines = 0u64;
    follow(&admin, "steady", args.secs, |l| lines += u64::from(l.line.is_some())).await;
    let (a1, c1, secs) = (sample_pid(agent)?, sample_pid(cp)?, t0.elapsed().as_secs_f64());
    println!(
        "cost at {:.0} lines/s: agent {:.1}% of a core, control plane {:.1}% (RSS agent {} KiB, control plane {} KiB)",
        lines as f64 / secs,
        100.0 * ticks_secs(a1.cpu_ticks - a0.cpu_ticks) / secs,
        100.0 * ticks_secs(c1.cpu_ticks - c0.cpu_ticks) / secs,
        a1.rss_kib,
        c1.rss_kib
    );
    Ok(())
}

#[tokio::main]
async fn main() {
    init_tls();
    let args = Args::parse();
    if let Err(e) = until_interrupted(run(&args)).await {
        eprintln!("bench-logs: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uptime_lines_read_as_seconds() {
        assert_eq!(super::uptime_secs("12345.67 54321.00"), Some(12345.67));
        assert_eq!(super::uptime_secs("tick"), None);
        assert!(super::uptime().is_some_and(|u| u > 0.0));
    }
}
