//! The agent's client against a real control plane
//! (`berth-control-plane serve`, SQLite, on loopback).
//!
//! Deltas: an agent that missed revisions gets a delta and merges it into
//! exactly the full document; one restarted (holding nothing), one whose
//! base the control plane no longer keeps, and one facing a restarted
//! control plane (its views gone) get full documents; and an agent from
//! before deltas, which does not ask for them, still gets a plain
//! `DesiredState`.
//!
//! Sessions: the client opens one and sends every request in it; by hand,
//! each counter is accepted once, the MAC and the node are checked, a
//! session cannot open another; a node without a sealing key signs each
//! request; a restarted control plane's refusal makes the client open a
//! new session and send the request again.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use berth_agent::client::{Client, Poll};
use berth_agent::metrics::desired_answers;
use berth_client::AdminClient;
use berth_lab::control_plane::ControlPlane;
use berth_protocol::service::ServiceSpec;
use berth_protocol::session::{self, OpenedSession, HEADER_COUNTER, HEADER_MAC, HEADER_SESSION};
use berth_protocol::signing::{self, HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::{ApiError, DesiredState, ErrorCode, RegisterRequest, StatusReport};
use ed25519_dalek::SigningKey;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use x25519_dalek::StaticSecret;

struct Cp {
    pid: u32,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    port: u16,
}

impl Cp {
    fn spec(&self) -> ControlPlane<'_> {
        ControlPlane {
            bin_dir: &self.bin_dir,
            data_dir: &self.data_dir,
            listen: (Ipv4Addr::LOCALHOST, self.port).into(),
            extra_args: &[],
            log_level: "warn",
            log: &self.log,
        }
    }

    /// A control plane of its own, in a new temporary directory, on a free port.
    async fn fresh() -> (tempfile::TempDir, Cp, AdminClient) {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (cp, admin) = Cp::start(dir.path(), port).await;
        (dir, cp, admin)
    }

    async fn start(dir: &Path, port: u16) -> (Cp, AdminClient) {
        let mut cp = Cp {
            pid: 0,
            bin_dir: berth_lab::default_bin_dir(),
            data_dir: dir.join("cp"),
            log: dir.join("cp.log"),
            port,
        };
        let admin = cp.restart().await;
        (cp, admin)
    }

    async fn restart(&mut self) -> AdminClient {
        if self.pid != 0 {
            berth_lab::process::stop(self.pid, Duration::from_secs(10)).unwrap();
        }
        let spec = self.spec();
        let pid = spec.spawn().unwrap();
        let admin = spec.wait_ready(pid).await.unwrap();
        self.pid = pid;
        admin
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.data_dir.join("ca.pem")
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = berth_lab::process::stop(self.pid, Duration::from_secs(10));
    }
}

struct Node {
    key: SigningKey,
    sealing: StaticSecret,
    id: String,
    name: String,
}

/// Registers a node, with a sealing key as berth-agent does.
async fn join(cp: &Cp, admin: &AdminClient, name: &str) -> Node {
    join_sealed(cp, admin, name, true).await
}

async fn join_sealed(cp: &Cp, admin: &AdminClient, name: &str, with_sealing_key: bool) -> Node {
    let token = admin.create_token(false, 600).await.unwrap().token;
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let sealing = StaticSecret::random_from_rng(rand::rngs::OsRng);
    let mut req = serde_json::json!({
        "token": token,
        "name": name,
        "signing_key": B64.encode(key.verifying_key().as_bytes()),
        "wg_public_key": B64.encode(rand::random::<[u8; 32]>()),
        "wg_port": 51820,
        "private_addr": "198.18.77.10/24",
    });
    if with_sealing_key {
        req["sealing_key"] = B64.encode(x25519_dalek::PublicKey::from(&sealing).as_bytes()).into();
    }
    let req: RegisterRequest = serde_json::from_value(req).unwrap();
    let reg = Client::new(&cp.url(), &cp.ca(), key.clone(), String::new())
        .unwrap()
        .register(&req)
        .await
        .unwrap();
    Node {
        key,
        sealing,
        id: reg.node_id,
        name: name.into(),
    }
}

impl Node {
    /// A fresh client: an agent just started, holding no document (and no
    /// session).
    fn client(&self, cp: &Cp) -> Arc<Client> {
        Arc::new(
            Client::new(&cp.url(), &cp.ca(), self.key.clone(), self.id.clone())
                .unwrap()
                .with_sessions(self.sealing.clone()),
        )
    }
}

async fn poll(client: &Client, after: u64) -> Arc<DesiredState> {
    match client.poll_desired(after, 5).await.unwrap() {
        Poll::Changed(d) => d,
        Poll::Unchanged => panic!("no new document after revision {after}"),
    }
}

/// What a fresh client fetches: the full document, the reference.
async fn full(cp: &Cp, node: &Node) -> DesiredState {
    DesiredState::clone(&*poll(&node.client(cp), 0).await)
}

/// Held by each test: the answer counters ([`desired_answers`]) count the
/// whole process's polls.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// (full documents, deltas) received since `before`.
fn answers_since(before: (u64, u64)) -> (u64, u64) {
    let now = desired_answers();
    (now.0 - before.0, now.1 - before.1)
}

#[tokio::test]
async fn agents_converge_from_deltas_and_resync_with_full_documents() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, mut cp, admin) = Cp::fresh().await;
    let a = join(&cp, &admin, "a").await;
    let b = join(&cp, &admin, "b").await;
    let c = join(&cp, &admin, "c").await;
    let agent = a.client(&cp);

    // First poll: nothing held, so a full document.
    let before = desired_answers();
    let first = poll(&agent, 0).await;
    assert_eq!(answers_since(before), (1, 0));
    assert_eq!(first.peers.len(), 2);

    // Missed revisions: a join, a removal and a deploy while not polling.
    let d = join(&cp, &admin, "d").await;
    admin.remove_node(&c.name).await.unwrap();
    let spec: ServiceSpec =
        serde_json::from_value(serde_json::json!({"name": "web", "image": "example/web:1", "replicas": 0})).unwrap();
    admin.deploy_service(&spec).await.unwrap();
    let before = desired_answers();
    let merged = poll(&agent, first.revision).await;
    assert_eq!(answers_since(before), (0, 1), "one delta");
    let want = full(&cp, &a).await;
    assert_eq!(*merged, want);
    let names: Vec<&str> = merged.peers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["b", "d"]);
    assert!(merged.dns.iter().any(|s| s.name == "web"));

    // Restarted from its cache: the new process holds nothing and asks
    // from the cached revision; it gets the whole current document.
    let restarted = a.client(&cp);
    admin.remove_node(&d.name).await.unwrap();
    let before = desired_answers();
    let doc = poll(&restarted, merged.revision).await;
    assert_eq!(answers_since(before).0, 1, "a full document");
    assert_eq!(*doc, full(&cp, &a).await);

    // A base older than the views the control plane keeps: every change
    // below is seen by another agent (each poll makes a view), not by
    // `agent`, whose base then falls out of the history.
    let other = b.client(&cp);
    let mut seen_by_other = poll(&other, 0).await.revision;
    let mut joined = vec![];
    for i in 0..20 {
        joined.push(join(&cp, &admin, &format!("e{i:02}")).await);
        seen_by_other = poll(&other, seen_by_other).await.revision;
    }
    let before = desired_answers();
    let doc = poll(&agent, merged.revision).await;
    assert_eq!(answers_since(before), (1, 0), "the base is gone: a full document");
    assert_eq!(*doc, full(&cp, &a).await);
    assert_eq!(doc.peers.len(), 21);

    // The control plane restarts: its views are gone, so the base is
    // unknown and the answer is whole again.
    let admin = cp.restart().await;
    admin.remove_node(&joined[0].name).await.unwrap();
    let before = desired_answers();
    let after_restart = poll(&agent, doc.revision).await;
    assert_eq!(answers_since(before), (1, 0), "a full document after the restart");
    assert_eq!(*after_restart, full(&cp, &a).await);
    // And deltas resume from the new process's views.
    admin.remove_node(&joined[1].name).await.unwrap();
    let before = desired_answers();
    let resumed = poll(&agent, after_restart.revision).await;
    assert_eq!(answers_since(before), (0, 1));
    assert_eq!(*resumed, full(&cp, &a).await);
    assert_eq!(resumed.peers.len(), 19);

    // An agent from before deltas asks without `delta` and gets a plain
    // DesiredState, as it always did.
    let path = "/v1/agent/desired?after=0&wait=1";
    let signed = signing::sign(&a.key, "GET", path, b"", chrono_free_now());
    let ca = reqwest::Certificate::from_pem(&std::fs::read(cp.ca()).unwrap()).unwrap();
    let http = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let old: DesiredState = http
        .get(format!("{}{path}", cp.url()))
        .header(HEADER_NODE, &a.id)
        .header(HEADER_TIMESTAMP, signed.timestamp)
        .header(HEADER_NONCE, signed.nonce)
        .header(HEADER_SIGNATURE, signed.signature)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(old, *resumed);
}

fn chrono_free_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A raw request of `node`, authenticated by session `id` (key `key`)
/// with `counter`, naming `as_node`: (status, error code).
#[allow(clippy::too_many_arguments)]
async fn in_session(
    http: &reqwest::Client,
    cp: &Cp,
    as_node: &str,
    id: &str,
    key: &[u8; 32],
    counter: u64,
    mac_counter: u64,
    body: &[u8],
) -> (u16, ErrorCode, Option<String>) {
    let path = "/v1/agent/status";
    let resp = http
        .post(format!("{}{path}", cp.url()))
        .header(HEADER_NODE, as_node)
        .header(HEADER_SESSION, id)
        .header(HEADER_COUNTER, counter)
        // A MAC over `mac_counter`: another counter than sent, to test.
        .header(HEADER_MAC, session::mac(key, "POST", path, mac_counter, body))
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status == 200 {
        return (status, ErrorCode::Unknown, None);
    }
    let e: ApiError = resp.json().await.unwrap();
    (status, e.code, e.field)
}

fn pinned_http(cp: &Cp) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(cp.ca()).unwrap()).unwrap();
    reqwest::Client::builder().add_root_certificate(ca).build().unwrap()
}

/// Opens a session of `node` by hand: (status, the session and its key).
async fn open_session(http: &reqwest::Client, cp: &Cp, node: &Node) -> (u16, Option<(String, [u8; 32])>) {
    let path = "/v1/agent/session";
    let signed = signing::sign(&node.key, "POST", path, b"", chrono_free_now());
    let resp = http
        .post(format!("{}{path}", cp.url()))
        .header(HEADER_NODE, &node.id)
        .header(HEADER_TIMESTAMP, signed.timestamp)
        .header(HEADER_NONCE, signed.nonce)
        .header(HEADER_SIGNATURE, signed.signature)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    let opened: OpenedSession = resp.json().await.unwrap();
    assert!(opened.expires_in_secs >= 60, "{opened:?}");
    let key = berth_protocol::seal::open(&node.sealing, &opened.key_sealed).unwrap();
    (status, Some((opened.id, key.try_into().unwrap())))
}

#[tokio::test]
async fn agents_authenticate_in_sessions_and_reopen_them() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (_dir, mut cp, admin) = Cp::fresh().await;
    let a = join(&cp, &admin, "a").await;
    let b = join(&cp, &admin, "b").await;
    let report = StatusReport {
        agent_version: "test".into(),
        ..Default::default()
    };

    // The agent's client opens one session and sends everything in it.
    let agent = a.client(&cp);
    let first = poll(&agent, 0).await;
    agent.report(&report).await.unwrap();
    agent.report(&report).await.unwrap();
    assert!(matches!(
        agent.poll_desired(first.revision, 1).await.unwrap(),
        Poll::Unchanged
    ));
    assert_eq!(agent.sessions_opened(), 1);

    // The protocol by hand: each counter once, the MAC checked, the
    // session bound to its node, unknown sessions refused with the code
    // that makes the agent open a new one.
    let http = pinned_http(&cp);
    let (status, opened) = open_session(&http, &cp, &a).await;
    assert_eq!(status, 200);
    let (id, key) = opened.unwrap();
    let body = serde_json::to_vec(&report).unwrap();
    assert_eq!(in_session(&http, &cp, &a.id, &id, &key, 1, 1, &body).await.0, 200);
    assert_eq!(
        in_session(&http, &cp, &a.id, &id, &key, 1, 1, &body).await,
        (401, ErrorCode::Unauthorized, Some(HEADER_COUNTER.into())),
        "a replayed counter"
    );
    assert_eq!(in_session(&http, &cp, &a.id, &id, &key, 3, 3, &body).await.0, 200);
    assert_eq!(
        in_session(&http, &cp, &a.id, &id, &key, 2, 2, &body).await.0,
        200,
        "out of order"
    );
    assert_eq!(
        in_session(&http, &cp, &a.id, &id, &key, 4, 5, &body).await,
        (401, ErrorCode::Unauthorized, Some(HEADER_MAC.into())),
        "a MAC over another counter"
    );
    assert_eq!(
        in_session(&http, &cp, &a.id, &id, &[7; 32], 4, 4, &body).await,
        (401, ErrorCode::Unauthorized, Some(HEADER_MAC.into())),
        "a MAC with another key"
    );
    assert_eq!(
        in_session(&http, &cp, &b.id, &id, &key, 4, 4, &body).await,
        (401, ErrorCode::SessionInvalid, Some(HEADER_SESSION.into())),
        "a's session naming b"
    );
    assert_eq!(
        in_session(&http, &cp, &a.id, "00ff", &key, 4, 4, &body).await,
        (401, ErrorCode::SessionInvalid, Some(HEADER_SESSION.into())),
        "an unknown session"
    );
    // A session cannot open another: that takes the node's signature.
    let resp = http
        .post(format!("{}/v1/agent/session", cp.url()))
        .header(HEADER_NODE, &a.id)
        .header(HEADER_SESSION, &id)
        .header(HEADER_COUNTER, 9)
        .header(HEADER_MAC, session::mac(&key, "POST", "/v1/agent/session", 9, b""))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // A node registered without a sealing key cannot open one, and its
    // agent signs each request instead.
    let old = join_sealed(&cp, &admin, "old", false).await;
    assert_eq!(open_session(&http, &cp, &old).await.0, 409);
    let old_agent = old.client(&cp);
    old_agent.report(&report).await.unwrap();
    poll(&old_agent, 0).await;
    assert_eq!(old_agent.sessions_opened(), 0);

    // A restarted control plane knows no session: the agent's next
    // request is refused with session_invalid, and sent again in a new one.
    cp.restart().await;
    assert_eq!(
        in_session(&http, &cp, &a.id, &id, &key, 10, 10, &body).await,
        (401, ErrorCode::SessionInvalid, Some(HEADER_SESSION.into()))
    );
    agent.report(&report).await.unwrap();
    assert_eq!(agent.sessions_opened(), 2);
    poll(&agent, 0).await;
    assert_eq!(agent.sessions_opened(), 2);
}
