//! The stream relay of `berth logs` and `berth exec`, with the test playing
//! the agent over real HTTPS and WebSockets: a job reaches only the node
//! that runs the replica, its socket is accepted only when signed by that
//! node and never twice, and what either side sends reaches the other.
//! The real agent's side is tested on the lab (tests/tests/streams.rs).

#[macro_use]
mod common;

use berth_protocol::signing::{self, HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::stream::{ExecControl, LogLine, StreamJob, StreamJobs, StreamKind};
use berth_protocol::ErrorCode;
use common::*;
use ed25519_dalek::SigningKey;
use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// The headers `node_id` signs a GET of `path` with, using `key`.
fn signed(node_id: &str, key: &SigningKey, path: &str) -> Vec<(&'static str, String)> {
    let h = signing::sign(key, "GET", path, &[], now());
    vec![
        (HEADER_NODE, node_id.to_string()),
        (HEADER_TIMESTAMP, h.timestamp),
        (HEADER_NONCE, h.nonce),
        (HEADER_SIGNATURE, h.signature),
    ]
}

async fn next_jobs(cp: &Cp, agent: &Agent) -> Reply {
    Reply::from(
        cp.signed(agent, Method::GET, "/v1/agent/streams/next?wait=5", vec![])
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// A control plane with service `web` (one replica) on node n1, and n2
/// running nothing; both online.
async fn fleet(db: &Db) -> (Cp, SealedNode, SealedNode) {
    let cp = Cp::start(db).await;
    let n1 = cp.join_sealed("n1", false).await;
    let n2 = cp.join_sealed("n2", false).await;
    let spec = serde_json::json!({
        "name": "web", "image": "localhost/berth-test/busybox:latest", "replicas": 1, "nodes": ["n1"],
    });
    let r = Reply::from(cp.admin(Method::POST, "/v1/services").json(&spec).send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The rollout places the replica on its own: report until it runs.
    for _ in 0..100 {
        play_agents(&cp, &[&n1, &n2], &|_| true).await;
        let info = show_service(&cp, "web").await;
        if info.replicas.len() == 1 && info.replicas[0].state == "running" {
            return (cp, n1, n2);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("web never ran: {:?}", show_service(&cp, "web").await);
}

on_both_stores!(
    a_log_stream_goes_only_to_its_node_and_its_socket_only_once,
    exec_relays_both_ways_and_is_refused_without_the_admin_or_the_node,
);

async fn a_log_stream_goes_only_to_its_node_and_its_socket_only_once(db: &Db) {
    let (cp, n1, n2) = fleet(db).await;
    let logs = {
        let req = cp.admin(Method::GET, "/v1/services/web/logs?tail=5");
        tokio::spawn(async move { req.send().await.unwrap() })
    };
    // n2 runs no replica of web: nothing for it.
    let none = next_jobs(&cp, &n2.agent).await;
    assert_eq!(none.status, StatusCode::NO_CONTENT, "{}", none.body);
    let r = next_jobs(&cp, &n1.agent).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let jobs: StreamJobs = r.json();
    let job: &StreamJob = &jobs.jobs[0];
    assert_eq!(jobs.jobs.len(), 1);
    assert!(job.replica.starts_with("web-"), "{job:?}");
    let StreamKind::Logs(req) = &job.kind else {
        panic!("{job:?}")
    };
    assert_eq!((req.follow, req.tail), (false, Some(5)));
    let path = format!("/v1/agent/streams/{}", job.id);

    // Refused: another node, a forged signature, no signature.
    let (status, body) = ws(&cp, &path, &signed(&n2.agent.node_id, &n2.agent.key, &path))
        .await
        .unwrap_err();
    assert_eq!(status, 404, "{body}");
    let forger = SigningKey::generate(&mut rand::rngs::OsRng);
    let (status, body) = ws(&cp, &path, &signed(&n1.agent.node_id, &forger, &path))
        .await
        .unwrap_err();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"unauthorized\""), "{body}");
    assert_eq!(ws(&cp, &path, &[]).await.unwrap_err().0, 401);

    // The node's own socket carries its lines to the admin.
    let headers = signed(&n1.agent.node_id, &n1.agent.key, &path);
    let mut sock = ws(&cp, &path, &headers).await.unwrap();
    // The same signed request again: replayed.
    let (status, body) = ws(&cp, &path, &headers).await.unwrap_err();
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("replayed"), "{body}");
    // Freshly signed, but the stream is taken.
    let again = signed(&n1.agent.node_id, &n1.agent.key, &path);
    assert_eq!(ws(&cp, &path, &again).await.unwrap_err().0, 404);
    let line = LogLine {
        replica: job.replica.clone(),
        stream: Some("stdout".into()),
        ts: None,
        line: Some("hello from n1".into()),
        notice: None,
    };
    let text = serde_json::to_string(&line).unwrap() + "\n";
    sock.send(Message::text(text)).await.unwrap();
    sock.close(None).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), logs)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = tokio::time::timeout(Duration::from_secs(10), resp.text())
        .await
        .unwrap()
        .unwrap();
    let got: Vec<LogLine> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got[0], line, "{body}");
    assert_eq!(got[1].notice.as_deref(), Some("ended"), "{body}");
    assert_eq!(got.len(), 2, "{body}");

    // A removed node asks for nothing more.
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/n2").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = next_jobs(&cp, &n2.agent).await;
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some(HEADER_NODE));
}

async fn exec_relays_both_ways_and_is_refused_without_the_admin_or_the_node(db: &Db) {
    let (cp, n1, _n2) = fleet(db).await;
    let cmd = "%5B%22sh%22%5D"; // ["sh"]
    let path = format!("/v1/services/web/exec?cmd={cmd}&interactive=true");
    let bearer = |t: &str| vec![("authorization", format!("Bearer {t}"))];

    // Refused before anything is asked of the node.
    assert_eq!(ws(&cp, &path, &bearer("wrong")).await.unwrap_err().0, 401);
    assert_eq!(ws(&cp, &path, &[]).await.unwrap_err().0, 401);
    let (status, body) = ws(&cp, "/v1/services/web/exec?cmd=sh", &bearer(&cp.admin_token))
        .await
        .unwrap_err();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"field\":\"cmd\""), "{body}");
    let (status, body) = ws(&cp, &format!("{path}&replica=web-99"), &bearer(&cp.admin_token))
        .await
        .unwrap_err();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("\"field\":\"replica\""), "{body}");
    // Not a WebSocket at all.
    let r = Reply::from(cp.admin(Method::GET, &path).send().await.unwrap()).await;
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("upgrade"));
    let r = next_jobs(&cp, &n1.agent).await;
    assert_eq!(
        r.status,
        StatusCode::NO_CONTENT,
        "refused execs queue nothing: {}",
        r.body
    );

    // The admin's socket opens once the node's does.
    let admin = {
        let cp = &cp;
        let auth = bearer(&cp.admin_token);
        let fut = ws(cp, &path, &auth);
        let r = next_jobs(cp, &n1.agent);
        let (admin, jobs) = tokio::join!(fut, async {
            let r = r.await;
            if r.status != StatusCode::OK {
                return Err(r.body);
            }
            let jobs: StreamJobs = r.json();
            let job = jobs.jobs[0].clone();
            let StreamKind::Exec(req) = &job.kind else {
                panic!("{job:?}")
            };
            assert_eq!(req.cmd, ["sh"]);
            assert!(req.interactive && !req.tty);
            let p = format!("/v1/agent/streams/{}", job.id);
            Ok(ws(cp, &p, &signed(&n1.agent.node_id, &n1.agent.key, &p)).await.unwrap())
        });
        (admin.unwrap(), jobs.unwrap())
    };
    let (mut admin, mut agent) = admin;
    admin.send(Message::binary(b"echo hi\n".to_vec())).await.unwrap();
    let got = agent.next().await.unwrap().unwrap();
    assert_eq!(got, Message::binary(b"echo hi\n".to_vec()));
    admin
        .send(Message::text(serde_json::to_string(&ExecControl::Eof).unwrap()))
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<ExecControl>(agent.next().await.unwrap().unwrap().to_text().unwrap()).unwrap(),
        ExecControl::Eof
    );
    agent.send(Message::binary(b"\x01hi\n".to_vec())).await.unwrap();
    let exit = serde_json::to_string(&ExecControl::Exit { code: 3 }).unwrap();
    agent.send(Message::text(exit.clone())).await.unwrap();
    assert_eq!(
        admin.next().await.unwrap().unwrap(),
        Message::binary(b"\x01hi\n".to_vec())
    );
    assert_eq!(admin.next().await.unwrap().unwrap(), Message::text(exit));
    agent.close(None).await.unwrap();
    // The agent's close ends the admin's socket.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match admin.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the admin's socket stayed open");

    // A node that never opens the stream: 504 node_unreachable.
    let started = std::time::Instant::now();
    let (status, body) = ws(&cp, &path, &bearer(&cp.admin_token)).await.unwrap_err();
    assert_eq!(status, 504, "{body}");
    assert!(body.contains("\"node_unreachable\""), "{body}");
    assert!(started.elapsed() >= Duration::from_secs(9));
}
