//! `GET /metrics`: who may read it, what it counts, and that Prometheus's
//! own `promtool check metrics` takes it.

#[macro_use]
mod common;

use berth_protocol::ErrorCode;
use common::*;
use reqwest::{Method, StatusCode};
use std::io::Write;
use std::time::Duration;

on_both_stores!(metrics_count_requests_nodes_replicas_and_fanout);

/// The value of the series `name{labels}` exactly as written, if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

async fn scrape(cp: &Cp, token: &str) -> (StatusCode, String) {
    let r = cp
        .http
        .get(format!("{}/metrics", cp.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status(), r.text().await.unwrap())
}

/// `promtool check metrics` on `text`: its complaints, empty when none.
fn promtool(text: &str) -> String {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt install prometheus; scripts/install-deps.sh does)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        String::new()
    } else {
        said
    }
}

async fn metrics_count_requests_nodes_replicas_and_fanout(db: &Db) {
    let cp = Cp::start(db).await;
    let n1 = cp.join_sealed("n1", false).await;
    play_agents(&cp, &[&n1], &|_| true).await;

    // A long-poll that waits, woken by a deploy: one fan-out observed.
    let rev = cp.revision().await as u64;
    let poll = {
        let req = cp.signed(
            &n1.agent,
            Method::GET,
            &format!("/v1/agent/desired?after={rev}&wait=20"),
            vec![],
        );
        tokio::spawn(async move { req.send().await.unwrap().status() })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = scrape(&cp, &cp.admin_token).await;
        if value(&text, "berth_longpoll_waiters") == Some(1.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the long-poll never waited:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spec = serde_json::json!({
        "name": "web", "image": "localhost/berth-test/busybox:latest", "replicas": 1, "nodes": ["n1"],
    });
    let r = Reply::from(cp.admin(Method::POST, "/v1/services").json(&spec).send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(poll.await.unwrap(), StatusCode::OK);
    for _ in 0..100 {
        play_agents(&cp, &[&n1], &|_| true).await;
        if show_service(&cp, "web").await.replicas.iter().any(|r| r.healthy) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The metrics token and the admin token read it; nothing else does.
    let (status, text) = scrape(&cp, "metrics-token").await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(scrape(&cp, &cp.admin_token).await.0, StatusCode::OK);
    let r = Reply::from(cp.http.get(format!("{}/metrics", cp.url)).send().await.unwrap()).await;
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    assert_eq!(scrape(&cp, "wrong").await.0, StatusCode::UNAUTHORIZED);

    assert_eq!(promtool(&text), "", "promtool check metrics:\n{text}");
    assert_eq!(
        value(&text, r#"berth_nodes{role="worker",state="online"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"berth_nodes{role="proxy",state="online"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"berth_replicas{service="web",healthy="true"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(
        value(
            &text,
            r#"berth_api_requests_total{route="/v1/agent/status",status="200"}"#
        ) >= Some(2.0)
    );
    assert_eq!(
        value(&text, r#"berth_api_requests_total{route="/v1/services",status="200"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(value(&text, "berth_fanout_seconds_count") >= Some(1.0), "{text}");
    assert_eq!(value(&text, "berth_longpoll_waiters"), Some(0.0), "{text}");
    assert_eq!(value(&text, "berth_revision"), Some(cp.revision().await as f64));
    assert!(
        value(&text, r#"berth_releases{state="complete"}"#).is_some()
            || value(&text, r#"berth_releases{state="rolling"}"#).is_some(),
        "{text}"
    );
    assert_eq!(value(&text, "berth_streams_open"), Some(0.0));
    // A refused scrape is counted too, under its route.
    let (_, later) = scrape(&cp, "metrics-token").await;
    assert!(
        value(&later, r#"berth_api_requests_total{route="/metrics",status="401"}"#) >= Some(2.0),
        "{later}"
    );
}
