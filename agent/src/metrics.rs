//! The agent's Prometheus endpoint, `--metrics ADDR` (docs/monitoring.md):
//! mesh peers, replicas by state and health, restarts, per-replica CPU,
//! memory and network from Podman, apply latency, and DNS queries by
//! answer. What the agent last reported, and every peer's status as of the
//! last heartbeat, are kept in a [`Snapshot`]; Podman's stats are read at
//! scrape time.

use crate::podman::Podman;
use berth_protocol::prom::{escape, family, Histogram};
use berth_protocol::StatusReport;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// How DNS queries were answered.
#[derive(Clone, Copy)]
pub enum DnsAnswer {
    /// From the cluster zone, with an answer (or an empty one).
    NoError,
    /// From the cluster zone: no such name.
    NxDomain,
    /// Sent to the upstream resolver; its answer was relayed.
    Forwarded,
    /// Refused, malformed, or the upstream failed (SERVFAIL).
    Failed,
}

static DNS: [AtomicU64; 4] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];
const DNS_LABELS: [&str; 4] = ["noerror", "nxdomain", "forwarded", "failed"];

pub fn dns(answer: DnsAnswer) {
    DNS[answer as usize].fetch_add(1, Ordering::Relaxed);
}

/// Desired-state answers received, by kind: a whole document, or a delta.
static DESIRED: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
const DESIRED_LABELS: [&str; 2] = ["full", "delta"];

/// The long-poll answered with a delta (true) or a whole document.
pub fn desired_answer(delta: bool) {
    DESIRED[delta as usize].fetch_add(1, Ordering::Relaxed);
}

/// (whole documents, deltas) received so far.
pub fn desired_answers() -> (u64, u64) {
    (DESIRED[0].load(Ordering::Relaxed), DESIRED[1].load(Ordering::Relaxed))
}

static STREAMS: AtomicU64 = AtomicU64::new(0);

/// Counts a live `berth logs` / `berth exec` stream while it lives.
pub struct StreamOpen(());

impl StreamOpen {
    pub fn new() -> StreamOpen {
        STREAMS.fetch_add(1, Ordering::Relaxed);
        StreamOpen(())
    }
}

impl Default for StreamOpen {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StreamOpen {
    fn drop(&mut self) {
        STREAMS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upper bounds (seconds) of the apply histogram's buckets.
const APPLY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];
static APPLY: Histogram = Histogram::new(&APPLY_BUCKETS);

/// One apply of a desired state took `secs`.
pub fn applied(secs: f64) {
    APPLY.observe(secs);
}

/// What the agent last told the control plane, and its peers' status and names.
#[derive(Default)]
pub struct Snapshot {
    report: Option<StatusReport>,
    peers: Vec<berth_protocol::PeerStatus>,
    peer_names: HashMap<String, String>,
}

pub type SharedSnapshot = Arc<Mutex<Snapshot>>;

impl Snapshot {
    /// Keeps `report`.
    pub fn reported(&mut self, report: &StatusReport) {
        self.report = Some(report.clone());
    }

    /// Keeps every peer's status, read at each heartbeat: the per-peer
    /// figures live here, reports carry only the peers down.
    pub fn mesh_status(&mut self, peers: Vec<berth_protocol::PeerStatus>) {
        self.peers = peers;
    }

    /// The peers' names by WireGuard key, from a desired state.
    pub fn peer_names(&mut self, peers: &[berth_protocol::Peer]) {
        self.peer_names = peers
            .iter()
            .map(|p| (p.wg_public_key.clone(), p.name.clone()))
            .collect();
    }
}

/// A replica's figures from Podman's stats.
struct Usage {
    cpu_ns: u64,
    memory: u64,
    net_in: u64,
    net_out: u64,
}

async fn usage(podman: &Podman) -> HashMap<String, Usage> {
    let Ok(stats) = podman.stats().await else {
        return HashMap::new();
    };
    stats
        .iter()
        .filter_map(|s| {
            let replica = s["Name"].as_str()?.strip_prefix("berth-")?.to_string();
            let n = |k: &str| s[k].as_u64().unwrap_or(0);
            Some((
                replica,
                Usage {
                    cpu_ns: n("CPUNano"),
                    memory: n("MemUsage"),
                    net_in: n("NetInput"),
                    net_out: n("NetOutput"),
                },
            ))
        })
        .collect()
}

/// The metrics page.
pub async fn render(snapshot: &SharedSnapshot, podman: &Podman) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let (report, peers, names) = match snapshot.lock() {
        Ok(s) => (s.report.clone(), s.peers.clone(), s.peer_names.clone()),
        Err(_) => (None, vec![], HashMap::new()),
    };
    family(
        &mut out,
        "berth_agent_info",
        "gauge",
        "Always 1; the agent's version as a label.",
    );
    let _ = writeln!(out, "berth_agent_info{{version=\"{}\"}} 1", escape(crate::VERSION));
    family(
        &mut out,
        "berth_agent_applied_revision",
        "gauge",
        "The last desired state applied completely.",
    );
    let _ = writeln!(
        out,
        "berth_agent_applied_revision {}",
        report.as_ref().map_or(0, |r| r.applied_revision)
    );
    family(
        &mut out,
        "berth_agent_apply_seconds",
        "histogram",
        "How long applying a desired state took.",
    );
    APPLY.write(&mut out, "berth_agent_apply_seconds");

    family(&mut out, "berth_mesh_peers", "gauge", "WireGuard peers configured.");
    let _ = writeln!(out, "berth_mesh_peers {}", peers.len());
    family(
        &mut out,
        "berth_mesh_peer_handshake_age_seconds",
        "gauge",
        "Seconds since each peer's last handshake; absent before the first.",
    );
    for p in &peers {
        if let Some(age) = p.handshake_age_secs {
            let name = names.get(&p.wg_public_key).unwrap_or(&p.wg_public_key);
            let _ = writeln!(
                out,
                "berth_mesh_peer_handshake_age_seconds{{peer=\"{}\"}} {age}",
                escape(name)
            );
        }
    }
    for (metric, help, pick) in [
        (
            "berth_mesh_peer_receive_bytes_total",
            "Bytes received from each peer.",
            (|p: &berth_protocol::PeerStatus| p.rx_bytes) as fn(&berth_protocol::PeerStatus) -> u64,
        ),
        (
            "berth_mesh_peer_transmit_bytes_total",
            "Bytes sent to each peer.",
            |p: &berth_protocol::PeerStatus| p.tx_bytes,
        ),
    ] {
        family(&mut out, metric, "counter", help);
        for p in &peers {
            let name = names.get(&p.wg_public_key).unwrap_or(&p.wg_public_key);
            let _ = writeln!(out, "{metric}{{peer=\"{}\"}} {}", escape(name), pick(p));
        }
    }

    let containers = report.as_ref().map(|r| r.containers.clone()).unwrap_or_default();
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for state in ["running", "exited", "missing", "pending"] {
        by_state.insert(state.to_string(), 0);
    }
    for c in &containers {
        *by_state.entry(c.state.clone()).or_default() += 1;
    }
    family(
        &mut out,
        "berth_containers",
        "gauge",
        "Replicas this node runs, by container state.",
    );
    for (state, n) in by_state {
        let _ = writeln!(out, "berth_containers{{state=\"{}\"}} {n}", escape(&state));
    }
    family(
        &mut out,
        "berth_replica_healthy",
        "gauge",
        "1 when the replica's health check passes.",
    );
    for c in &containers {
        let _ = writeln!(
            out,
            "berth_replica_healthy{{replica=\"{}\"}} {}",
            escape(&c.replica),
            u8::from(c.healthy)
        );
    }
    family(
        &mut out,
        "berth_replica_restarts_total",
        "counter",
        "Restarts of each replica's container.",
    );
    for c in &containers {
        let _ = writeln!(
            out,
            "berth_replica_restarts_total{{replica=\"{}\"}} {}",
            escape(&c.replica),
            c.restarts
        );
    }
    let usage = usage(podman).await;
    let mine: Vec<(&String, &Usage)> = containers
        .iter()
        .filter_map(|c| usage.get_key_value(&c.replica))
        .collect();
    family(
        &mut out,
        "berth_replica_cpu_seconds_total",
        "counter",
        "CPU time each replica used.",
    );
    for (r, u) in &mine {
        let _ = writeln!(
            out,
            "berth_replica_cpu_seconds_total{{replica=\"{}\"}} {}",
            escape(r),
            u.cpu_ns as f64 / 1e9
        );
    }
    family(
        &mut out,
        "berth_replica_memory_bytes",
        "gauge",
        "Memory each replica uses.",
    );
    for (r, u) in &mine {
        let _ = writeln!(
            out,
            "berth_replica_memory_bytes{{replica=\"{}\"}} {}",
            escape(r),
            u.memory
        );
    }
    family(
        &mut out,
        "berth_replica_network_receive_bytes_total",
        "counter",
        "Bytes each replica received.",
    );
    for (r, u) in &mine {
        let _ = writeln!(
            out,
            "berth_replica_network_receive_bytes_total{{replica=\"{}\"}} {}",
            escape(r),
            u.net_in
        );
    }
    family(
        &mut out,
        "berth_replica_network_transmit_bytes_total",
        "counter",
        "Bytes each replica sent.",
    );
    for (r, u) in &mine {
        let _ = writeln!(
            out,
            "berth_replica_network_transmit_bytes_total{{replica=\"{}\"}} {}",
            escape(r),
            u.net_out
        );
    }

    family(
        &mut out,
        "berth_agent_streams_open",
        "gauge",
        "Live log and exec streams this agent serves.",
    );
    let _ = writeln!(out, "berth_agent_streams_open {}", STREAMS.load(Ordering::Relaxed));
    family(
        &mut out,
        "berth_dns_queries_total",
        "counter",
        "DNS queries by how they were answered.",
    );
    for (i, label) in DNS_LABELS.iter().enumerate() {
        let _ = writeln!(
            out,
            "berth_dns_queries_total{{answer=\"{label}\"}} {}",
            DNS[i].load(Ordering::Relaxed)
        );
    }
    family(
        &mut out,
        "berth_agent_desired_answers_total",
        "counter",
        "Desired-state answers from the control plane: whole documents, or deltas.",
    );
    for (i, label) in DESIRED_LABELS.iter().enumerate() {
        let _ = writeln!(
            out,
            "berth_agent_desired_answers_total{{kind=\"{label}\"}} {}",
            DESIRED[i].load(Ordering::Relaxed)
        );
    }
    out
}

/// Serves `GET /metrics` on `addr` until the agent stops.
pub async fn serve(addr: SocketAddr, snapshot: SharedSnapshot, podman: Podman) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "--metrics: cannot listen; no metrics");
            return;
        }
    };
    tracing::info!(%addr, "metrics served");
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (snapshot, podman) = (snapshot.clone(), podman.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (snapshot, podman) = (snapshot.clone(), podman.clone());
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(render(&snapshot, &podman).await)
                    } else {
                        Response::builder()
                            .status(404)
                            .body("not found: try /metrics\n".to_string())
                    };
                    Ok::<_, std::convert::Infallible>(resp.unwrap_or_default())
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
