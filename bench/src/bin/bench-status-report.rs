//! bench-status-report: what one status report costs the control plane's
//! own code, apart from the transport.
//!
//! Starts the control plane in this process (`berth_control_plane::start`,
//! SQLite in a temporary directory), registers `--nodes` nodes and opens a
//! session for each through its router, then sends `--reports` heartbeats
//! (round robin over the nodes, each the same as the node's last: the hot
//! path) straight into the router (`tower::ServiceExt::oneshot`): no TLS,
//! HTTP/2 or sockets, which `bench-cp-scale` measures with them. The
//! requests are made before the clock starts. Printed: CPU (utime+stime of
//! the process, whose runtime has one thread; one clock tick, 10 ms, over
//! the run) and wall time per report, in sessions and signed.

use anyhow::{bail, Context};
use axum::body::Body;
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use berth_bench::{sample, ticks_secs};
use berth_control_plane::api::RemoteAddr;
use berth_protocol::session::{self, OpenedSession};
use berth_protocol::signing::{self, HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::{NodeUsage, RegisterResponse, StatusReport};
use clap::Parser;
use ed25519_dalek::SigningKey;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use tower::ServiceExt;

#[derive(Parser)]
#[command(
    name = "bench-status-report",
    about = "CPU per status report in the control plane's own code (router, authentication, hot path), without the transport"
)]
struct Args {
    /// Nodes registered (the reports go round robin over them).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Reports measured, per way of authenticating.
    #[arg(long, default_value_t = 50_000)]
    reports: usize,
}

struct Node {
    id: String,
    key: SigningKey,
    session: (String, [u8; 32]),
    counter: u64,
}

fn request(method: &str, path: &str, body: Vec<u8>) -> axum::http::request::Builder {
    let mut b = axum::http::Request::builder().method(method).uri(path);
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    b.extension(RemoteAddr("127.0.0.1:40000".parse().expect("an address")))
}

fn signed(key: &SigningKey, node: Option<&str>, method: &str, path: &str, body: Vec<u8>) -> axum::http::Request<Body> {
    let h = signing::sign(key, method, path, &body, berth_control_plane::store::now());
    let mut b = request(method, path, vec![])
        .header(HEADER_TIMESTAMP, h.timestamp)
        .header(HEADER_NONCE, h.nonce)
        .header(HEADER_SIGNATURE, h.signature)
        .header("content-type", "application/json");
    if let Some(n) = node {
        b = b.header(HEADER_NODE, n);
    }
    b.body(Body::from(body)).expect("a request")
}

fn in_session(node: &mut Node, path: &str, body: Vec<u8>) -> axum::http::Request<Body> {
    node.counter += 1;
    let (id, key) = &node.session;
    session::headers(id, key, "POST", path, node.counter, &body)
        .into_iter()
        .fold(request("POST", path, vec![]), |b, (name, value)| b.header(name, value))
        .header(HEADER_NODE, &node.id)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("a request")
}

async fn call(router: &axum::Router, req: axum::http::Request<Body>) -> anyhow::Result<Vec<u8>> {
    let resp = router.clone().oneshot(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes().to_vec();
    if !status.is_success() {
        bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

/// A heartbeat like berth-agent's on a node with three replicas.
fn heartbeat(applied: u64) -> Vec<u8> {
    let containers: Vec<serde_json::Value> = (0..3)
        .map(|i| {
            serde_json::json!({
                "replica": format!("web-{i}"), "service": "web", "container_id": format!("{i:064x}"),
                "image_id": format!("{:064x}", 7), "state": "running", "healthy": true, "restarts": 0,
                "cpu_millicores": 12, "memory_bytes": 50_000_000u64,
            })
        })
        .collect();
    let mut report: serde_json::Value = serde_json::to_value(StatusReport {
        applied_revision: applied,
        agent_version: "bench".into(),
        rss_bytes: Some(20 << 20),
        usage: Some(NodeUsage {
            cores: 2,
            cpu_millicores: 300,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 4 << 30,
        }),
        ..Default::default()
    })
    .expect("a report serializes");
    report["containers"] = containers.into();
    serde_json::to_vec(&report).expect("a report serializes")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let started = berth_control_plane::start(berth_control_plane::ServeConfig {
        data_dir: dir.path().join("cp"),
        database: format!("sqlite://{}", dir.path().join("cp.db").display()),
        listen: "127.0.0.1:0".parse()?,
        sans: vec![],
        own_cert: None,
        advertise_url: None,
        pools: berth_control_plane::store::nodes::Pools {
            mesh: "10.64.0.0/10".parse()?,
            subnets: "10.128.0.0/9".parse()?,
            subnet_prefix: 24,
        },
        offline_after_secs: 30,
        acme: None,
        releases_dir: None,
        registry: None,
        builds: Default::default(),
        streams: Default::default(),
        events: Default::default(),
        metrics_token: None,
        sessions: Default::default(),
    })
    .await?;
    let admin = std::fs::read_to_string(&started.admin_token_file)?.trim().to_string();
    let router = berth_control_plane::api::router(started.state.clone());

    let t = Instant::now();
    let mut nodes = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let token: serde_json::Value = serde_json::from_slice(
            &call(
                &router,
                request("POST", "/v1/tokens", vec![])
                    .header("authorization", format!("Bearer {admin}"))
                    .header("content-type", "application/json")
                    .body(Body::from(r#"{"ttl_secs": 600}"#))?,
            )
            .await
            .context("creating a token")?,
        )?;
        let key = SigningKey::generate(&mut rand::rngs::OsRng);
        let sealing = x25519_dalek::StaticSecret::random_from_rng(rand::rngs::OsRng);
        let body = serde_json::to_vec(&serde_json::json!({
            "token": token["token"],
            "name": format!("n{i:05}"),
            "signing_key": B64.encode(key.verifying_key().as_bytes()),
            "wg_public_key": B64.encode(rand::random::<[u8; 32]>()),
            "sealing_key": B64.encode(x25519_dalek::PublicKey::from(&sealing).as_bytes()),
            "wg_port": 51820,
        }))?;
        let reg: RegisterResponse =
            serde_json::from_slice(&call(&router, signed(&key, None, "POST", "/v1/register", body)).await?)?;
        let opened: OpenedSession = serde_json::from_slice(
            &call(
                &router,
                signed(&key, Some(&reg.node_id), "POST", "/v1/agent/session", vec![]),
            )
            .await
            .context("opening a session")?,
        )?;
        let session_key: [u8; 32] = berth_protocol::seal::open(&sealing, &opened.key_sealed)
            .map_err(anyhow::Error::msg)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("a session key of 32 bytes"))?;
        nodes.push(Node {
            id: reg.node_id,
            key,
            session: (opened.id, session_key),
            counter: 0,
        });
    }
    let revision = started.state.current_revision() as u64;
    // Each node's first report takes the full path; from then on the same
    // report is the hot path.
    for n in &mut nodes {
        call(&router, in_session(n, "/v1/agent/status", heartbeat(revision))).await?;
    }
    println!(
        "{} nodes registered, each with a session, in {:.1} s",
        args.nodes,
        t.elapsed().as_secs_f64()
    );
    // Let the write-behind of the first reports land.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let body = heartbeat(revision);
    for way in ["in sessions (HMAC)", "signed (Ed25519)"] {
        let reqs: Vec<_> = (0..args.reports)
            .map(|i| {
                let n = &mut nodes[i % args.nodes];
                if way.starts_with("signed") {
                    signed(&n.key, Some(&n.id), "POST", "/v1/agent/status", body.clone())
                } else {
                    in_session(n, "/v1/agent/status", body.clone())
                }
            })
            .collect();
        let (cpu0, t0) = (sample("self")?, Instant::now());
        for req in reqs {
            call(&router, req).await?;
        }
        let (cpu, wall) = (ticks_secs(sample("self")?.cpu_ticks - cpu0.cpu_ticks), t0.elapsed());
        let us = cpu * 1e6 / args.reports as f64;
        println!(
            "{} reports {way}: {:.1} µs CPU, {:.1} µs wall per report in the control plane's own code \
             (TLS, HTTP/2 and the socket are in bench-cp-scale's figure); target < 50 µs: {}",
            args.reports,
            us,
            wall.as_secs_f64() * 1e6 / args.reports as f64,
            if us < 50.0 { "met" } else { "MISSED" }
        );
    }
    Ok(())
}
