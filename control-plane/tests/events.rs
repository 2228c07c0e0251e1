//! The event stream (`GET /v1/events`): what a deploy, its rollout, a
//! health change and nodes joining and leaving write, in order; following
//! it; retention; and the signed webhook, retried until it takes them.

#[macro_use]
mod common;

use berth_control_plane::events::{sign, EventsConfig, SIGNATURE_HEADER};
use berth_protocol::event::{Event, EventKind};
use berth_protocol::ErrorCode;
use common::*;
use reqwest::{Method, StatusCode};
use std::sync::{Arc, Mutex};
use std::time::Duration;

on_both_stores!(
    a_deploy_its_rollout_a_health_change_and_nodes_are_told_in_order,
    the_webhook_gets_every_event_signed_and_retried,
);

async fn events(cp: &Cp, query: &str) -> Vec<Event> {
    let r = cp
        .admin(Method::GET, &format!("/v1/events{query}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

async fn deploy_web(cp: &Cp) {
    let spec = serde_json::json!({
        "name": "web", "image": "localhost/berth-test/busybox:latest", "replicas": 1, "nodes": ["n1"],
        "rollout": {"min_ready_secs": 0},
    });
    let r = Reply::from(cp.admin(Method::POST, "/v1/services").json(&spec).send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

async fn a_deploy_its_rollout_a_health_change_and_nodes_are_told_in_order(db: &Db) {
    let cp = Cp::start(db).await;
    let n1 = cp.join_sealed("n1", false).await;
    // Online before the deploy: a node that never reported gets its new
    // replicas replaced on every step (see the rollout machine).
    play_agents(&cp, &[&n1], &|_| true).await;
    deploy_web(&cp).await;
    // Play the agent until the release is complete.
    for _ in 0..200 {
        play_agents(&cp, &[&n1], &|_| true).await;
        if releases_of(&cp, "web").await[0].state.as_str() == "complete" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    play_agents(&cp, &[&n1], &|_| false).await;

    let all = events(&cp, "?tail=100").await;
    let seen: Vec<(EventKind, &str)> = all.iter().map(|e| (e.kind, e.message.as_str())).collect();
    let at = |kind: EventKind, starts: &str| {
        all.iter()
            .position(|e| e.kind == kind && e.message.starts_with(starts))
            .unwrap_or_else(|| panic!("no {kind:?} event starting {starts:?} in {seen:#?}"))
    };
    let joined = at(EventKind::Node, "n1 joined as a worker");
    let deployed = at(
        EventKind::Deploy,
        "release 1: 1 × localhost/berth-test/busybox:latest (by admin)",
    );
    let starting = at(EventKind::Rollout, "release 1 slot 0: web-");
    assert!(all[starting].message.ends_with(" starting"), "{:?}", all[starting]);
    let starts = all.iter().filter(|e| e.message.ends_with(" starting")).count();
    assert_eq!(starts, 1, "one replica started: {seen:#?}");
    let replica = show_service(&cp, "web").await.replicas[0].replica.clone();
    let done = at(EventKind::Rollout, &format!("release 1 slot 0: {replica} done"));
    let complete = at(EventKind::Release, "release 1 complete");
    let unhealthy = at(EventKind::Health, &format!("{replica} unhealthy: "));
    assert!(
        joined < deployed && deployed < starting && starting < done && done <= complete + 1 && complete < unhealthy,
        "{seen:#?}"
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "ids go up");
    assert_eq!(all[unhealthy].node.as_deref(), Some("n1"));
    assert_eq!(all[unhealthy].service.as_deref(), Some("web"));
    assert!(all[unhealthy].message.contains("HTTP 404"), "{:?}", all[unhealthy]);

    // One service's events, and what came after one.
    let web = events(&cp, "?service=web&tail=100").await;
    assert!(web.iter().all(|e| e.service.as_deref() == Some("web")));
    assert_eq!(web.len(), all.iter().filter(|e| e.service.is_some()).count());
    let after = events(&cp, &format!("?after={}", all[deployed].id)).await;
    assert_eq!(after[0], all[deployed + 1]);
    assert_eq!(events(&cp, "?tail=2").await, all[all.len() - 2..]);

    // Followed: a removal arrives while the stream is open.
    let mut follow = cp
        .admin(
            Method::GET,
            &format!("/v1/events?follow=true&after={}", all.last().unwrap().id),
        )
        .send()
        .await
        .unwrap();
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/n1").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let chunk = tokio::time::timeout(Duration::from_secs(10), follow.chunk())
        .await
        .expect("the followed stream got nothing")
        .unwrap()
        .unwrap();
    let e: Event = serde_json::from_slice(chunk.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(
        (e.kind, e.message.as_str(), e.node.as_deref()),
        (EventKind::Node, "n1 removed", Some("n1"))
    );

    // Bad asks.
    let r = Reply::from(cp.admin(Method::GET, "/v1/events?service=nope").send().await.unwrap()).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("service"));
    let r = Reply::from(cp.admin(Method::GET, "/v1/events?tail=x").send().await.unwrap()).await;
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("query"));
    let r = Reply::from(
        cp.http
            .get(format!("{}/v1/events", cp.url))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));

    // Retention keeps the newest.
    let before = events(&cp, "?tail=10000").await;
    let deleted = cp.store().prune_events(3).await.unwrap();
    assert_eq!(deleted as usize, before.len() - 3);
    assert_eq!(events(&cp, "?tail=10000").await, before[before.len() - 3..]);
}

/// What the receiver got: each post's signature header and body.
type Posts = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A webhook receiver: refuses the first post with 500, takes the rest.
async fn receiver() -> (String, Posts) {
    use axum::http::HeaderMap;
    let got: Posts = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let sig = headers
                    .get(SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let mut g = sink.lock().unwrap();
                g.push((sig, body.to_vec()));
                if g.len() == 1 {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

async fn the_webhook_gets_every_event_signed_and_retried(db: &Db) {
    let (url, got) = receiver().await;
    let cp = Cp::start_with_events(
        db,
        EventsConfig {
            webhook: Some(url),
            webhook_secret: b"hook-key".to_vec(),
            ..Default::default()
        },
    )
    .await;
    let _n1 = cp.join_sealed("n1", false).await;
    let _n2 = cp.join_sealed("n2", false).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let posts = loop {
        let posts = got.lock().unwrap().clone();
        let delivered: Vec<Event> = posts
            .iter()
            .skip(1)
            .flat_map(|(_, b)| serde_json::from_slice::<Vec<Event>>(b).unwrap())
            .collect();
        if delivered.iter().filter(|e| e.kind == EventKind::Node).count() >= 2 {
            break posts;
        }
        assert!(std::time::Instant::now() < deadline, "webhook posts: {}", posts.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (sig, body) in &posts {
        assert_eq!(sig, &sign(b"hook-key", body), "every post is signed over its body");
    }
    // The refused first post is sent again: its events come first after it.
    let first: Vec<Event> = serde_json::from_slice(&posts[0].1).unwrap();
    let retried: Vec<Event> = serde_json::from_slice(&posts[1].1).unwrap();
    assert_eq!(retried[..first.len()], first[..]);
    let delivered: Vec<Event> = posts
        .iter()
        .skip(1)
        .flat_map(|(_, b)| serde_json::from_slice::<Vec<Event>>(b).unwrap())
        .collect();
    let messages: Vec<&str> = delivered.iter().map(|e| e.message.as_str()).collect();
    assert!(messages.iter().any(|m| m.starts_with("n1 joined")), "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("n2 joined")), "{messages:?}");
    assert!(delivered.windows(2).all(|w| w[0].id < w[1].id), "in order, none twice");
}
