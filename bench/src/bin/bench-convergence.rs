//! bench-convergence: how long a mesh change takes to be applied by every
//! node of a real lab cluster (control plane + real agents + wireguard-go in
//! network namespaces).
//!
//! Each round joins one node and then removes the oldest one, so the fleet
//! stays at `--nodes` (one more between the two halves of a round).
//!
//! * REMOVE: t0 = just before `DELETE /v1/nodes/<name>` is sent; t1 = the
//!   first `list_nodes` answer (polled every `--poll-ms`) in which every
//!   remaining node has `applied_revision >=` the revision the DELETE returned.
//! * JOIN: the change happens when the new agent's registration commits, which
//!   the bench does not see directly. t0 = the moment the bench sent the first
//!   `list_nodes` request whose answer contains the new node (uncertainty: one
//!   poll interval plus one `list_nodes` round trip); R = the new node's
//!   revision in that answer (registration bumps every node to R); t1 = the
//!   first answer in which every node, the new one included, has
//!   `applied_revision >= R`. Also shown: the same for the existing nodes only,
//!   and the time from the start of `Lab::add_node` (token, namespace, agent
//!   process) to that first sighting of the registered node.
//!
//! Agents report status right after applying a revision, so `applied_revision`
//! in `list_nodes` moves as soon as a node has applied.

use anyhow::Context;
use berth_bench::{init_tls, ms, print_summary, until_interrupted};
use berth_client::AdminClient;
use berth_protocol::NodeInfo;
use clap::Parser;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "bench-convergence",
    about = "Mesh change → applied on every node: join and remove latency"
)]
struct Args {
    /// Lab id (underlay 198.18.ID.0/24).
    #[arg(long, default_value_t = 90)]
    id: u8,
    /// Lab directory (removed afterwards unless --keep-logs).
    #[arg(long, default_value = "/tmp/berth-bench-90")]
    dir: PathBuf,
    /// Nodes in the fleet.
    #[arg(long, default_value_t = 5)]
    nodes: u16,
    /// Rounds (each round = one join + one remove).
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Interval between list_nodes polls, milliseconds.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// Give up on one change after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Keep the lab directory (logs) afterwards.
    #[arg(long)]
    keep_logs: bool,
}

/// One list_nodes answer and when its request was sent / its answer arrived.
struct Observation {
    sent: Instant,
    received: Instant,
    nodes: Vec<NodeInfo>,
}

async fn observe(admin: &AdminClient, rtts: &mut Vec<Duration>) -> anyhow::Result<Observation> {
    let sent = Instant::now();
    let nodes = admin.list_nodes().await?;
    let received = Instant::now();
    rtts.push(received - sent);
    Ok(Observation { sent, received, nodes })
}

fn all_applied<'a>(nodes: impl IntoIterator<Item = &'a NodeInfo>, rev: u64) -> bool {
    nodes.into_iter().all(|n| n.applied_revision >= rev)
}

fn describe(nodes: &[NodeInfo]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}:{}/{}", n.name, n.applied_revision, n.revision))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Default)]
struct Results {
    remove: Vec<Duration>,
    remove_api: Vec<Duration>,
    join_all: Vec<Duration>,
    join_existing: Vec<Duration>,
    join_new: Vec<Duration>,
    join_spawn_to_registered: Vec<Duration>,
    list_rtt: Vec<Duration>,
    timeouts: u32,
}

async fn run(args: &Args, res: &mut Results) -> anyhow::Result<()> {
    let poll = Duration::from_millis(args.poll_ms);
    let timeout = Duration::from_secs(args.timeout);
    let t = Instant::now();
    let mut lab = berth_bench::lab_up(args.id, &args.dir, args.nodes, args.keep_logs).await?;
    println!(
        "lab converged in {:.1} s (from an empty lab, informative)",
        t.elapsed().as_secs_f64()
    );
    let admin = lab.admin()?;

    for round in 1..=args.rounds {
        // ---- JOIN ----
        let spawn = Instant::now();
        let name = lab.add_node(false).await?;
        let (t0, rev) = loop {
            let o = observe(&admin, &mut res.list_rtt).await?;
            if let Some(n) = o.nodes.iter().find(|n| n.name == name) {
                break (o.sent, n.revision);
            }
            if spawn.elapsed() > timeout {
                anyhow::bail!("{name} did not register within {timeout:?}; see {}", args.dir.display());
            }
            tokio::time::sleep_until((o.sent + poll).into()).await;
        };
        res.join_spawn_to_registered.push(t0 - spawn);
        let (mut existing_done, mut new_done) = (None, None);
        let join = loop {
            let o = observe(&admin, &mut res.list_rtt).await?;
            if existing_done.is_none() && all_applied(o.nodes.iter().filter(|n| n.name != name), rev) {
                existing_done = Some(o.received);
            }
            if new_done.is_none() && all_applied(o.nodes.iter().filter(|n| n.name == name), rev) {
                new_done = Some(o.received);
            }
            if all_applied(&o.nodes, rev) {
                break Some(o.received - t0);
            }
            if t0.elapsed() > timeout {
                println!(
                    "  round {round:>2} JOIN   {name}: TIMEOUT after {timeout:?}: {}",
                    describe(&o.nodes)
                );
                break None;
            }
            tokio::time::sleep_until((o.sent + poll).into()).await;
        };
        match join {
            Some(d) => {
                let ex = existing_done.map(|e| e - t0).unwrap_or_default();
                let nw = new_done.map(|e| e - t0).unwrap_or_default();
                res.join_all.push(d);
                res.join_existing.push(ex);
                res.join_new.push(nw);
                println!(
                    "  round {round:>2} JOIN   {name:<4} rev {rev:>3}: all applied {:>7} ms (existing {:>7} ms, new node {:>7} ms; add_node→registered {:>7} ms)",
                    ms(d),
                    ms(ex),
                    ms(nw),
                    ms(t0 - spawn)
                );
            }
            None => res.timeouts += 1,
        }

        // ---- REMOVE (the oldest node) ----
        let victim = lab.state.nodes.first().cloned().context("no node left to remove")?;
        let t0 = Instant::now();
        let rev = admin.remove_node(&victim.name).await?;
        res.remove_api.push(t0.elapsed());
        let remove = loop {
            let o = observe(&admin, &mut res.list_rtt).await?;
            if all_applied(&o.nodes, rev) {
                break Some(o.received - t0);
            }
            if t0.elapsed() > timeout {
                println!(
                    "  round {round:>2} REMOVE {}: TIMEOUT after {timeout:?}: {}",
                    victim.name,
                    describe(&o.nodes)
                );
                break None;
            }
            tokio::time::sleep_until((o.sent + poll).into()).await;
        };
        match remove {
            Some(d) => {
                res.remove.push(d);
                println!(
                    "  round {round:>2} REMOVE {:<4} rev {rev:>3}: all applied {:>7} ms",
                    victim.name,
                    ms(d)
                );
            }
            None => res.timeouts += 1,
        }
        // Clean the removed node up (outside the measured window): its agent,
        // its wireguard-go and its namespace; `berth lab down` then sees the
        // same nodes.
        if let Some(pid) = victim.agent_pid {
            berth_lab::process::stop(pid, Duration::from_secs(5))?;
        }
        lab.net.remove_node(victim.index)?;
        lab.state.nodes.retain(|n| n.index != victim.index);
        lab.save()?;
    }
    Ok(())
}

fn report(args: &Args, res: &Results) {
    println!();
    println!(
        "== bench-convergence: {} nodes, {} rounds, list_nodes polled every {} ms ==",
        args.nodes, args.rounds, args.poll_ms
    );
    println!(
        "machine: {} CPUs; control plane, agents, wireguard-go and this bench share them; load average now {}",
        num_cpus(),
        berth_bench::loadavg()
    );
    print_summary("REMOVE → all applied", &res.remove);
    print_summary("JOIN (registered) → all", &res.join_all);
    print_summary("  of which existing nodes", &res.join_existing);
    print_summary("  of which the new node", &res.join_new);
    print_summary("add_node() → registered", &res.join_spawn_to_registered);
    print_summary("DELETE API call itself", &res.remove_api);
    print_summary("list_nodes round trip", &res.list_rtt);
    if res.timeouts > 0 {
        println!(
            "  TIMEOUTS: {} change(s) did not converge within {} s",
            res.timeouts, args.timeout
        );
    }
    let p99 = |v: &[Duration]| berth_bench::Summary::of(v).map(|s| s.p99);
    for (label, v) in [("REMOVE", &res.remove), ("JOIN", &res.join_all)] {
        match p99(v) {
            Some(p) if p < Duration::from_secs(1) => println!("  target p99 < 1 s: {label} met ({} ms)", ms(p)),
            Some(p) => println!("  target p99 < 1 s: {label} MISSED ({} ms)", ms(p)),
            None => println!("  target p99 < 1 s: {label} no data"),
        }
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[tokio::main]
async fn main() {
    init_tls();
    let args = Args::parse();
    let mut res = Results::default();
    // The lab is destroyed when run() ends or is dropped (interrupted).
    let outcome = until_interrupted(run(&args, &mut res)).await;
    report(&args, &res);
    if let Err(e) = outcome {
        eprintln!("bench-convergence: {e:#}");
        std::process::exit(1);
    }
}
