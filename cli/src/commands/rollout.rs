//! Following a release: the plan, then each step's progress until the
//! rollout completes (exit 0) or fails (exit 1, with the reason).

use berth_client::AdminClient;
use berth_protocol::release::{ReleaseState, RolloutInfo, RolloutStep, StepStage};
use berth_protocol::service::ServiceInfo;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the rollout is read while following it.
const POLL: Duration = Duration::from_millis(250);

/// What a release will do, before it starts.
pub fn print_plan(info: &ServiceInfo) {
    let Some(r) = &info.rollout else {
        println!(
            "service {}: release {} (no new containers: {} replicas)",
            info.spec.name,
            info.current_release.unwrap_or(0),
            info.spec.replicas
        );
        return;
    };
    let p = &info.spec.rollout;
    let from = r
        .from_release
        .map(|f| format!(" (replacing release {f})"))
        .unwrap_or_default();
    println!(
        "service {}: release {}{from}, {} replicas",
        info.spec.name, r.release, info.spec.replicas
    );
    if r.state == ReleaseState::Queued {
        println!("  queued behind the rollout in progress (--force replaces it)");
    }
    if r.stop_first {
        println!(
            "  stop-first: the service has a volume, so each old replica stops before its successor starts;\n  \
             {} replica(s) at a time are out of service meanwhile",
            r.batch
        );
    } else if r.from_release.is_some() {
        println!(
            "  new before old, {} at a time (max surge {}, max unavailable {}); each new replica must be healthy \
             for {} s and loaded by every node before an old one drains for {} s",
            r.batch, p.max_surge, p.max_unavailable, p.min_ready_secs, p.drain_secs
        );
    }
    println!(
        "  a replica not healthy within {} s fails the release and rolls it back",
        p.timeout_secs
    );
}

fn step_line(s: &RolloutStep) -> String {
    let new = s.new_replica.as_deref().unwrap_or("(new replica)");
    let node = s.node.as_deref().map(|n| format!(" on {n}")).unwrap_or_default();
    let old = s
        .old_replica
        .as_deref()
        .map(|o| format!(" replaces {o}"))
        .unwrap_or_default();
    format!("  {new}{node}{old}: {}", s.stage)
}

/// Follows the newest release of `name` until it is final, printing its
/// steps (redrawn in place on a terminal, one line per change otherwise).
/// Returns the exit code: 0 complete, 1 failed.
pub async fn follow(api: &AdminClient, name: &str, release: u64) -> anyhow::Result<i32> {
    let tty = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut printed: Vec<String> = vec![];
    let mut drawn = 0usize;
    loop {
        let info = api.show_service(name).await?;
        let Some(r) = info.rollout.clone().filter(|r| r.release == release) else {
            // A release without a rollout (a scale) is complete at once.
            println!("release {release} of {name} complete");
            return Ok(0);
        };
        let lines: Vec<String> = r.steps.iter().map(step_line).collect();
        let mut out = std::io::stdout().lock();
        if tty {
            if drawn > 0 {
                write!(out, "\x1b[{drawn}A")?;
            }
            for l in &lines {
                writeln!(out, "\x1b[2K{l}")?;
            }
            drawn = lines.len();
        } else {
            for l in lines.iter().filter(|l| !printed.contains(l)) {
                writeln!(out, "{l}")?;
            }
            printed = lines.clone();
        }
        out.flush()?;
        drop(out);
        if let Some(code) = outcome(&r, started.elapsed()) {
            return Ok(code);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The end of a rollout, printed, with its exit code; None while it runs.
fn outcome(r: &RolloutInfo, took: Duration) -> Option<i32> {
    match r.state {
        ReleaseState::Complete => {
            println!("release {} complete in {:.1} s", r.release, took.as_secs_f64());
            Some(0)
        }
        ReleaseState::Failed | ReleaseState::RolledBack if !r.rolling_back => {
            let reason = r.reason.as_deref().unwrap_or("no reason recorded");
            eprintln!("release {} failed: {reason}", r.release);
            if let Some(f) = r.from_release {
                eprintln!("release {f} still serves");
            }
            Some(1)
        }
        _ => None,
    }
}

/// Whether every step is done (for `service status`).
pub fn print_status(info: &ServiceInfo) {
    let s = &info.spec;
    let healthy = info
        .replicas
        .iter()
        .filter(|r| r.healthy && r.phase == "active")
        .count();
    println!(
        "service {}  current release {}  {healthy}/{} healthy",
        s.name,
        info.current_release
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
        s.replicas
    );
    if let Some(r) = &info.rollout {
        let what = if r.rolling_back {
            format!("failed, rolling back to release {}", r.from_release.unwrap_or(0))
        } else {
            r.state.to_string()
        };
        println!("release {}: {what}", r.release);
        if let Some(reason) = &r.reason {
            println!("  {reason}");
        }
        for st in &r.steps {
            let times = st
                .times
                .windows(2)
                .map(|w| format!("{} {} ms", w[1].0, w[1].1 - w[0].1))
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "{}{}",
                step_line(st),
                if times.is_empty() {
                    String::new()
                } else {
                    format!("  ({times})")
                }
            );
        }
        if r.steps.iter().all(|s| s.stage == StepStage::Done) && r.state == ReleaseState::Complete {
            println!("  every replica runs release {}", r.release);
        }
    }
}
