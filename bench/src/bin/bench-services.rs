//! bench-services: what running services costs, on a real lab (control
//! plane, agents, wireguard-go and one Podman service per node).
//!
//! * DEPLOY: t0 = just before `POST /v1/services` (2 replicas of the local
//!   test image, an HTTP health check, no pinning). Done = the control plane
//!   shows both replicas running and healthy AND the DNS server of every node
//!   that runs a replica answers `NAME.internal` with both IPs (a real query
//!   with `dig` inside the node's namespace, polled). Reported: time to
//!   "running and healthy at the control plane", and to "in DNS everywhere".
//!   The service is removed between rounds and its containers waited out.
//! * IDLE WITH CONTAINERS: `--containers` replicas pinned to n1, all healthy;
//!   then n1's agent is sampled for `--seconds` (RSS, CPU), as bench-agent-idle does.

use anyhow::{bail, Context};
use berth_bench::{init_tls, mib, print_summary, sample_pid, ticks_secs, until_interrupted};
use berth_lab::Lab;
use berth_protocol::service::ServiceSpec;
use clap::Parser;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "bench-services",
    about = "Service deploy latency and agent cost with containers"
)]
struct Args {
    /// Lab id (underlay 198.18.ID.0/24).
    #[arg(long, default_value_t = 92)]
    id: u8,
    /// Lab directory (removed afterwards unless --keep-logs).
    #[arg(long, default_value = "/tmp/berth-bench-92")]
    dir: PathBuf,
    /// Deploy rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Containers on n1 for the idle measurement.
    #[arg(long, default_value_t = 20)]
    containers: u32,
    /// Length of the idle sampling window, seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Keep the lab directory (logs) afterwards.
    #[arg(long)]
    keep_logs: bool,
}

fn spec(lab: &Lab, name: &str, replicas: u32, nodes: &[&str]) -> ServiceSpec {
    ServiceSpec {
        health_http: Some("/index.html".into()),
        nodes: nodes.iter().map(|s| s.to_string()).collect(),
        ..berth_lab::demo::web_service(lab, name, replicas)
    }
}

/// The A records of `name` from node `node`'s DNS server (on its gateway).
fn dig(lab: &Lab, node: &str, gateway: Ipv4Addr, name: &str) -> Vec<Ipv4Addr> {
    let at = format!("@{gateway}");
    let Ok(out) = lab.exec(node, &["dig", "+short", "+time=1", "+tries=1", &at, name, "A"]) else {
        return vec![];
    };
    let mut ips: Vec<Ipv4Addr> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    ips.sort();
    ips
}

async fn gateways(lab: &Lab) -> anyhow::Result<BTreeMap<String, Ipv4Addr>> {
    let mut out = BTreeMap::new();
    for n in lab.admin()?.list_nodes().await? {
        let net: ipnet::Ipv4Net = n.subnet.parse()?;
        out.insert(n.name, net.hosts().next().context("subnet")?);
    }
    Ok(out)
}

async fn wait_gone(lab: &Lab, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = 0;
        for n in &lab.state.nodes {
            let out = lab.podman(
                &n.name,
                &["ps", "-aq", "--filter", &format!("label=io.berth.service={name}")],
            )?;
            left += String::from_utf8_lossy(&out.stdout).lines().count();
        }
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} containers of {name} still there after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Idle {
    rss_mean: f64,
    rss_max: f64,
    hwm: f64,
    cpu_pct: f64,
    wall: f64,
}

async fn run(args: &Args) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, Idle)> {
    let lab = berth_bench::lab_up(args.id, &args.dir, 3, args.keep_logs).await?;
    let admin = lab.admin()?;
    let gw = gateways(&lab).await?;

    let (mut healthy_at, mut dns_at) = (vec![], vec![]);
    for round in 1..=args.rounds {
        let name = "bench";
        let t0 = Instant::now();
        admin.deploy_service(&spec(&lab, name, 2, &[])).await?;
        let mut t_healthy = None;
        let deadline = t0 + Duration::from_secs(60);
        let done = loop {
            let info = admin.show_service(name).await?;
            let all = info.replicas.len() == 2 && info.replicas.iter().all(|r| r.state == "running" && r.healthy);
            if all && t_healthy.is_none() {
                t_healthy = Some(t0.elapsed());
            }
            if all {
                let mut want: Vec<Ipv4Addr> = info.replicas.iter().map(|r| r.ip).collect();
                want.sort();
                let in_dns = info
                    .replicas
                    .iter()
                    .all(|r| dig(&lab, &r.node, gw[&r.node], &format!("{name}.internal")) == want);
                if in_dns {
                    break t0.elapsed();
                }
            }
            if Instant::now() > deadline {
                bail!("round {round}: not running and in DNS after 60 s: {:?}", info.replicas);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let th = t_healthy.unwrap_or(done);
        println!(
            "  round {round}: healthy at the control plane {:.0} ms, in DNS everywhere {:.0} ms",
            th.as_secs_f64() * 1000.0,
            done.as_secs_f64() * 1000.0
        );
        healthy_at.push(th);
        dns_at.push(done);
        admin.remove_service(name).await?;
        wait_gone(&lab, name).await?;
    }

    println!("deploying {} replicas on n1 ...", args.containers);
    admin
        .deploy_service(&spec(&lab, "idle", args.containers, &["n1"]))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = admin.show_service("idle").await?;
        let ok = info
            .replicas
            .iter()
            .filter(|r| r.state == "running" && r.healthy)
            .count();
        if ok == args.containers as usize {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {ok}/{} replicas healthy after 300 s", args.containers);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!(
        "all healthy; idling 5 s, then sampling n1's agent for {} s",
        args.seconds
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = lab.node("n1")?.agent_pid.context("n1 has no agent pid")?;
    let start = sample_pid(pid)?;
    let mut rss = vec![start.rss_kib];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(sample_pid(pid)?.rss_kib);
    }
    let end = sample_pid(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let idle = Idle {
        rss_mean: mib(rss.iter().sum::<u64>() / rss.len() as u64),
        rss_max: mib(*rss.iter().max().unwrap_or(&0)),
        hwm: mib(end.hwm_kib),
        cpu_pct: 100.0 * ticks_secs(end.cpu_ticks.saturating_sub(start.cpu_ticks)) / wall,
        wall,
    };
    Ok((healthy_at, dns_at, idle))
}

#[tokio::main]
async fn main() {
    init_tls();
    let args = Args::parse();
    let outcome = until_interrupted(run(&args)).await;
    match outcome {
        Ok((healthy, dns, idle)) => {
            println!();
            println!(
                "== bench-services: deploy of 2 replicas (local image), {} rounds ==",
                healthy.len()
            );
            print_summary("running+healthy at CP", &healthy);
            print_summary("running+in DNS everywhere", &dns);
            let worst = dns.iter().max().copied().unwrap_or_default();
            println!(
                "  target < 2 s: {} (worst {:.0} ms)",
                if worst < Duration::from_secs(2) {
                    "met"
                } else {
                    "MISSED"
                },
                worst.as_secs_f64() * 1000.0
            );
            println!(
                "== n1's agent with {} containers, {:.1} s window (health checks every 3 s each) ==",
                args.containers, idle.wall
            );
            println!(
                "  RSS mean {:.1} MB, max {:.1} MB, HWM {:.1} MB; CPU {:.2} % of one core",
                idle.rss_mean, idle.rss_max, idle.hwm, idle.cpu_pct
            );
            println!(
                "  target RSS < 25 MB: {}",
                if idle.rss_max < 25.0 { "met" } else { "MISSED" }
            );
        }
        Err(e) => {
            eprintln!("bench-services: {e:#}");
            std::process::exit(1);
        }
    }
}
