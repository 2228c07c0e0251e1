//! bench-rollout: what a rolling deploy costs beyond the app's own start
//! and the drain, on a real lab (2 workers, 1 proxy with a Pebble
//! certificate), under continuous load.
//!
//! A service of `--replicas` replicas whose app listens 1 s after it starts
//! (`sleep 1; exec /bin/serve`, HTTP health check on `/`) gets `--rounds`
//! new releases (an env change each). During each rollout `berth_tests::load`
//! sends 20 HTTPS requests/s through the proxy and 20 requests/s from a
//! container on n2 that resolves `demo.internal` for every request.
//!
//! Reported per round: deploy → complete, and the failed requests. Per step
//! (one replacement), from the control plane's own stage times: starting →
//! healthy (create, the app's 1 s start, the first passing check), healthy
//! → old draining (the new replica loaded by every node's DNS and every
//! proxy, then the old one taken out of every route), draining → done (the
//! drain), and the gap from a step's draining to the next step's start.
//!
//! A step's successor starts as soon as its old replica drains, so the
//! drains overlap the next starts and a rollout of B batches takes
//! B × (starting → draining) + one drain. Berth's overhead per batch is
//! therefore (deploy → complete − drain) / B − app start − min_ready
//! (target < 500 ms), and per step starting → draining − app start − min_ready.

use anyhow::{bail, Context};
use berth_bench::{init_tls, print_summary, until_interrupted};
use berth_client::AdminClient;
use berth_lab::{demo, Lab, LabGuard};
use berth_protocol::release::{ReleaseState, RolloutInfo, RolloutStep, StepStage};
use berth_protocol::routes::DomainSpec;
use berth_protocol::service::ServiceSpec;
use berth_tests::load::{Load, LoadSpec};
use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The app's own start: `sleep 1` before it listens.
const APP_START: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_secs(120);

#[derive(Parser)]
#[command(
    name = "bench-rollout",
    about = "Rolling-deploy overhead per batch and failed requests under load, on a lab"
)]
struct Args {
    /// Lab id (underlay 198.18.ID.0/24).
    #[arg(long, default_value_t = 93)]
    id: u8,
    /// Lab directory (removed afterwards unless --keep-logs).
    #[arg(long, default_value = "/tmp/berth-bench-93")]
    dir: PathBuf,
    /// Releases rolled out after the first.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Replicas of the service (spread over the 2 workers).
    #[arg(long, default_value_t = 4)]
    replicas: u32,
    /// The rollout's drain, seconds.
    #[arg(long, default_value_t = 2)]
    drain: u32,
    /// Seconds a new replica must stay healthy before it counts (part of
    /// what is subtracted as the app's own time, like the drain).
    #[arg(long, default_value_t = 0)]
    min_ready: u32,
    /// New replicas started beyond the wanted count at a time (batch size).
    #[arg(long, default_value_t = 1)]
    max_surge: u32,
    /// Keep the lab directory (logs) afterwards.
    #[arg(long)]
    keep_logs: bool,
    /// Print every step's stage times (ms after the deploy).
    #[arg(long)]
    verbose: bool,
}

fn spec(lab: &Lab, args: &Args, version: u32) -> ServiceSpec {
    let mut s = demo::web_service(lab, "demo", args.replicas);
    s.command = Some("sleep 1; exec /bin/serve".into());
    s.env.insert("VERSION".into(), version.to_string());
    s.rollout.drain_secs = args.drain;
    s.rollout.max_surge = args.max_surge;
    s.rollout.min_ready_secs = args.min_ready;
    s
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Waits until `release` is final (and done rolling back).
async fn wait_release(admin: &AdminClient, release: u64) -> anyhow::Result<RolloutInfo> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let info = admin.show_service("demo").await?;
        if let Some(r) = info.rollout.filter(|r| r.release == release) {
            if r.state.is_final() && !r.rolling_back {
                return Ok(r);
            }
        }
        if Instant::now() > deadline {
            bail!("release {release} did not end within {} s", SETTLE.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The HTTP status of one HTTPS request through the proxy at `ip`.
fn fetch_status(ip: &str, root: &Path) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "--cacert",
        ])
        .arg(root)
        .args(["--resolve", &format!("{}:443:{ip}", demo::DEMO_DOMAIN)])
        .arg(format!("https://{}/", demo::DEMO_DOMAIN))
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// Containers of the demo on every worker (old ones stop in the background).
fn containers(lab: &LabGuard) -> anyhow::Result<usize> {
    let mut n = 0;
    for node in lab.state.nodes.iter().filter(|n| !n.proxy) {
        let out = lab.podman(&node.name, &["ps", "-aq", "--filter", "label=io.berth.service=demo"])?;
        n += String::from_utf8_lossy(&out.stdout).lines().count();
    }
    Ok(n)
}

/// Milliseconds from stage `a` to stage `b` of a step, when it reached both.
fn between(step: &RolloutStep, a: StepStage, b: StepStage) -> Option<Duration> {
    let at = |s: StepStage| step.times.iter().find(|(x, _)| *x == s).map(|(_, t)| *t);
    let d = at(b)? - at(a)?;
    Some(Duration::from_millis(d.max(0) as u64))
}

#[derive(Default)]
struct Figures {
    complete: Vec<Duration>,
    first_start: Vec<Duration>,
    to_healthy: Vec<Duration>,
    to_draining: Vec<Duration>,
    step_overhead: Vec<Duration>,
    to_done: Vec<Duration>,
    gaps: Vec<Duration>,
    overhead: Vec<Duration>,
    requests: u64,
    failed: u64,
}

async fn rig(args: &Args) -> anyhow::Result<(LabGuard, String, PathBuf)> {
    let mut lab = berth_bench::lab_up(args.id, &args.dir, 2, args.keep_logs).await?;
    let proxy = lab.add_node(true).await?;
    lab.wait_converged(SETTLE).await?;
    lab.start_pebble(&proxy).await?;
    lab.wait_converged(SETTLE).await?;
    let admin = lab.admin()?;
    println!("deploying release 1 ({} replicas) and a domain ...", args.replicas);
    let first = admin.deploy_service(&spec(&lab, args, 0)).await?;
    let n = first.rollout.context("the deploy made no rollout")?.release;
    let r = wait_release(&admin, n).await?;
    if r.state != ReleaseState::Complete {
        bail!("release 1 ended {:?}: {:?}", r.state, r.reason);
    }
    admin
        .add_domain(&DomainSpec {
            domain: demo::DEMO_DOMAIN.into(),
            service: "demo".into(),
            port: demo::WEB_PORT,
            passthrough: false,
        })
        .await?;
    demo::wait_cert(&admin, demo::DEMO_DOMAIN, SETTLE).await?;
    let root = lab.state.dir.join("pebble-root.pem");
    let pebble = lab.state.pebble.clone().context("no Pebble")?;
    std::fs::write(&root, pebble.issuing_root().await?)?;
    let proxy_ip = lab.net.node_ip(lab.node(&proxy)?.index).to_string();
    let deadline = Instant::now() + SETTLE;
    while fetch_status(&proxy_ip, &root) != "200" {
        if Instant::now() > deadline {
            bail!("the proxy does not serve the demo");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok((lab, proxy, root))
}

async fn run(args: &Args) -> anyhow::Result<Figures> {
    let (lab, proxy, root) = rig(args).await?;
    let admin = lab.admin()?;
    let mut f = Figures::default();
    let batches = args.replicas.div_ceil(args.max_surge.max(1));
    for round in 1..=args.rounds {
        // Old replicas of the round before are gone (they stop in the background).
        let deadline = Instant::now() + SETTLE;
        while containers(&lab)? > args.replicas as usize {
            if Instant::now() > deadline {
                bail!("old containers still there after {} s", SETTLE.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let load = Load::start(&lab, &LoadSpec::new(&proxy, &root, "n2"))?;
        let (t0, t0_ms) = (Instant::now(), now_ms());
        let info = admin.deploy_service(&spec(&lab, args, round)).await?;
        let release = info.rollout.context("the deploy made no rollout")?.release;
        let r = wait_release(&admin, release).await?;
        let complete = t0.elapsed();
        let s = load.stop();
        if r.state != ReleaseState::Complete {
            bail!("round {round}: release {release} ended {:?}: {:?}", r.state, r.reason);
        }
        let own = APP_START + Duration::from_secs(args.min_ready.into());
        let overhead = (complete.saturating_sub(Duration::from_secs(args.drain.into())) / batches).saturating_sub(own);
        println!(
            "  round {round}: release {release} complete in {:.0} ms ({} steps), overhead per batch {:.0} ms, {} of {} requests failed",
            complete.as_secs_f64() * 1000.0,
            r.steps.len(),
            overhead.as_secs_f64() * 1000.0,
            s.failed(),
            s.https.total + s.dns.total,
        );
        if s.failed() > 0 {
            println!("{s}");
        }
        f.complete.push(complete);
        f.overhead.push(overhead);
        f.requests += s.https.total + s.dns.total;
        f.failed += s.failed();
        let mut steps = r.steps.clone();
        steps.sort_by_key(|s| s.times.iter().find(|(x, _)| *x == StepStage::Starting).map(|(_, t)| *t));
        let start_of = |s: &RolloutStep| s.times.iter().find(|(x, _)| *x == StepStage::Starting).map(|(_, t)| *t);
        let draining_of = |s: &RolloutStep| s.times.iter().find(|(x, _)| *x == StepStage::Draining).map(|(_, t)| *t);
        if let Some(first) = steps.first().and_then(start_of) {
            f.first_start.push(Duration::from_millis((first - t0_ms).max(0) as u64));
        }
        for (i, step) in steps.iter().enumerate() {
            if args.verbose {
                let times: Vec<String> = step.times.iter().map(|(x, t)| format!("{x} +{}", t - t0_ms)).collect();
                println!(
                    "    slot {} on {}: {}",
                    step.slot,
                    step.node.as_deref().unwrap_or("?"),
                    times.join(", ")
                );
            }
            f.to_healthy
                .extend(between(step, StepStage::Starting, StepStage::Healthy));
            f.to_draining
                .extend(between(step, StepStage::Healthy, StepStage::Draining));
            f.to_done.extend(between(step, StepStage::Draining, StepStage::Done));
            f.step_overhead
                .extend(between(step, StepStage::Starting, StepStage::Draining).map(|d| d.saturating_sub(own)));
            // With one step per batch, the next one starts when this one's old replica drains.
            if args.max_surge == 1 {
                if let (Some(end), Some(next)) = (draining_of(step), steps.get(i + 1).and_then(start_of)) {
                    f.gaps.push(Duration::from_millis((next - end).max(0) as u64));
                }
            }
        }
    }
    Ok(f)
}

#[tokio::main]
async fn main() {
    init_tls();
    let args = Args::parse();
    match until_interrupted(run(&args)).await {
        Ok(f) => {
            println!();
            println!(
                "== bench-rollout: {} replicas on 2 nodes, batch {}, app listens 1 s after start, drain {} s, min_ready {} s, {} rounds ==",
                args.replicas,
                args.max_surge,
                args.drain,
                args.min_ready,
                f.complete.len()
            );
            print_summary("deploy -> complete", &f.complete);
            print_summary("deploy -> first step starts", &f.first_start);
            print_summary("starting -> healthy (incl. 1 s app start)", &f.to_healthy);
            print_summary("healthy -> routed, old draining", &f.to_draining);
            print_summary(&format!("draining -> done (incl. {} s drain)", args.drain), &f.to_done);
            if !f.gaps.is_empty() {
                print_summary("old draining -> next step starts", &f.gaps);
            }
            print_summary("overhead per step", &f.step_overhead);
            print_summary("overhead per batch", &f.overhead);
            println!("  failed requests under load: {} of {}", f.failed, f.requests);
            let worst = f.overhead.iter().max().copied().unwrap_or_default();
            println!(
                "  target overhead < 500 ms with 0 failed requests: {} (worst {:.0} ms, {} failed)",
                if worst < Duration::from_millis(500) && f.failed == 0 {
                    "met"
                } else {
                    "MISSED"
                },
                worst.as_secs_f64() * 1000.0,
                f.failed
            );
        }
        Err(e) => {
            eprintln!("bench-rollout: {e:#}");
            std::process::exit(1);
        }
    }
}
