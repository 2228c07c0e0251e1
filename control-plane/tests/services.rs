//! Services through the real HTTPS API: placement, container IPs, sealed
//! secrets, scaling, moving replicas off a removed node, health-driven DNS
//! records, and refusals that change nothing. On SQLite and PostgreSQL.

#[macro_use]
mod common;

use berth_protocol::release::ReleaseState;
use berth_protocol::service::{ContainerStatus, ServiceInfo};
use berth_protocol::{DesiredState, ErrorCode, StatusReport};
use common::{releases_of, settle, show_service, Cp, Db, Reply, SealedNode};
use reqwest::{Method, StatusCode};
use std::collections::BTreeMap;

on_both_stores!(
    deploy_scale_move_and_health,
    bad_services_change_nothing,
    rollouts_history_and_rollback
);

/// Registers `name` with a sealing key and makes it online with a heartbeat.
async fn node(cp: &Cp, name: &str) -> SealedNode {
    let n = cp.join_sealed(name, false).await;
    report(cp, &n, vec![]).await;
    n
}

async fn report(cp: &Cp, n: &SealedNode, containers: Vec<ContainerStatus>) {
    let r = StatusReport {
        containers,
        ..Default::default()
    };
    cp.report(&n.agent, &r).await;
}

/// A report that says the node applied `revision` and runs `containers`.
async fn confirm(cp: &Cp, n: &SealedNode, revision: u64, containers: Vec<ContainerStatus>) {
    let r = StatusReport {
        applied_revision: revision,
        containers,
        ..Default::default()
    };
    cp.report(&n.agent, &r).await;
}

async fn deploy(cp: &Cp, spec: serde_json::Value) -> Reply {
    Reply::from(cp.admin(Method::POST, "/v1/services").json(&spec).send().await.unwrap()).await
}

async fn scale(cp: &Cp, name: &str, replicas: u32) -> Reply {
    let body = serde_json::json!({ "replicas": replicas });
    Reply::from(
        cp.admin(Method::POST, &format!("/v1/services/{name}/scale"))
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn restart(cp: &Cp, name: &str) -> Reply {
    Reply::from(
        cp.admin(Method::POST, &format!("/v1/services/{name}/restart"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn desired(cp: &Cp, n: &SealedNode) -> DesiredState {
    cp.desired(&n.agent, 0, 1).await.json()
}

async fn deploy_scale_move_and_health(db: &Db) {
    let cp = Cp::start(db).await;
    let a = node(&cp, "a").await;
    let b = node(&cp, "b").await;
    let c = node(&cp, "c").await;

    let r = deploy(
        &cp,
        serde_json::json!({
            "name": "web", "image": "localhost/berth-test/busybox:latest", "replicas": 2, "port": 8080,
            "env": {"MODE": "demo"}, "secrets": {"API_KEY": "hunter2-secret"}, "health_http": "/healthz",
            "rollout": {"drain_secs": 0}
        }),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        !r.body.contains("hunter2-secret"),
        "the API echoed a secret: {}",
        r.body
    );
    let info: ServiceInfo = r.json();
    assert_eq!(info.secret_names, ["API_KEY"]);
    assert_eq!(info.replicas.len(), 2);
    let nodes: Vec<&str> = info.replicas.iter().map(|r| r.node.as_str()).collect();
    assert_ne!(nodes[0], nodes[1], "spread over two nodes");

    // Each node gets exactly its replicas, with an IP in its own subnet
    // (never the gateway) and the secrets sealed to its own key only.
    let mut placed = 0;
    for n in [&a, &b, &c] {
        let d = desired(&cp, n).await;
        let subnet: ipnet::Ipv4Net = d.node.subnet.parse().unwrap();
        for ctr in &d.containers {
            placed += 1;
            assert!(
                subnet.contains(&ctr.ip) && ctr.ip != subnet.hosts().next().unwrap(),
                "{} in {subnet}",
                ctr.ip
            );
            assert_eq!(ctr.env["MODE"], "demo");
            let sealed = ctr.sealed_secrets.as_deref().expect("secrets sent sealed");
            assert!(!sealed.contains("hunter2"));
            let plain = berth_protocol::seal::open(&n.seal, sealed).unwrap();
            let map: BTreeMap<String, String> = serde_json::from_slice(&plain).unwrap();
            assert_eq!(map["API_KEY"], "hunter2-secret");
            let other = if std::ptr::eq(n, &a) { &b } else { &a };
            assert!(berth_protocol::seal::open(&other.seal, sealed).is_err());
        }
        assert_eq!(d.dns.len(), 1);
        assert!(
            d.dns[0].replicas.iter().all(|r| !r.healthy),
            "nothing reported healthy yet"
        );
    }
    assert_eq!(placed, 2);
    let listed = Reply::from(cp.admin(Method::GET, "/v1/services").send().await.unwrap()).await;
    assert!(!listed.body.contains("hunter2-secret"));

    // Health reports reach every node's DNS records.
    let d = desired(&cp, &a).await;
    let on_a: Vec<_> = d.containers.iter().map(|c| c.replica.clone()).collect();
    let rev = d.revision;
    if !on_a.is_empty() {
        let st = on_a
            .iter()
            .map(|r| ContainerStatus {
                replica: r.clone(),
                container_id: Some("abc".into()),
                state: "running".into(),
                healthy: true,
                ..Default::default()
            })
            .collect();
        report(&cp, &a, st).await;
        let d2: DesiredState = cp.desired(&c.agent, rev, 5).await.json();
        let healthy: Vec<_> = d2.dns[0]
            .replicas
            .iter()
            .filter(|r| r.healthy)
            .map(|r| r.replica.clone())
            .collect();
        assert_eq!(healthy, on_a);
    }

    // Release 1 completes once every node confirmed; then scale to 3: one per node.
    settle(&cp, &[&a, &b, &c], "web", 1, &|_| true, 0).await;
    // Scale to 0 (below): nothing anywhere, the name stays.
    let r = scale(&cp, "web", 3).await;
    let info: ServiceInfo = r.json();
    let mut nodes: Vec<_> = info.replicas.iter().map(|r| r.node.clone()).collect();
    nodes.sort();
    assert_eq!(nodes, ["a", "b", "c"]);
    let ips: std::collections::HashSet<_> = info.replicas.iter().map(|r| r.ip).collect();
    assert_eq!(ips.len(), 3);

    // Removing node c moves its replica to a or b.
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/c").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let info: ServiceInfo = Reply::from(cp.admin(Method::GET, "/v1/services/web").send().await.unwrap())
        .await
        .json();
    assert_eq!(info.replicas.len(), 3);
    assert!(
        info.replicas.iter().all(|r| r.node == "a" || r.node == "b"),
        "{:?}",
        info.replicas
    );

    let r = scale(&cp, "web", 0).await;
    // Scaling down drains: out of DNS at once, stopped once every node
    // has loaded that (and the drain time, 0 here, has passed).
    let info: ServiceInfo = r.json();
    assert!(
        info.replicas.iter().all(|r| r.phase == "draining"),
        "{:?}",
        info.replicas
    );
    assert!(desired(&cp, &a).await.dns[0].replicas.is_empty());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        for n in [&a, &b] {
            let d = desired(&cp, n).await;
            confirm(&cp, n, d.revision, vec![]).await;
        }
        let d = desired(&cp, &a).await;
        if d.containers.is_empty() && desired(&cp, &b).await.containers.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "drained replicas were never removed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Removal: gone from every node's DNS.
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/services/web").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(desired(&cp, &b).await.dns.is_empty());
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/services/web").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

async fn bad_services_change_nothing(db: &Db) {
    let cp = Cp::start(db).await;
    let _a = node(&cp, "a").await;
    let ok = serde_json::json!({"name": "db", "image": "localhost/x:1", "volumes": [{"name": "data", "path": "/var/lib/db"}]});
    assert_eq!(deploy(&cp, ok).await.status, StatusCode::OK);
    let mut before = cp.revision().await;
    let cases = [
        (
            serde_json::json!({"name": "Bad", "image": "x"}),
            StatusCode::BAD_REQUEST,
            "name:",
        ),
        (
            serde_json::json!({"name": "web", "image": "Not An Image"}),
            StatusCode::BAD_REQUEST,
            "image:",
        ),
        (
            serde_json::json!({"name": "web", "image": "x", "port": 70000}),
            StatusCode::BAD_REQUEST,
            "body:",
        ),
        (
            serde_json::json!({"name": "web", "image": "x", "port": 0}),
            StatusCode::BAD_REQUEST,
            "port:",
        ),
        (
            serde_json::json!({"name": "web", "image": "x", "nodes": ["nosuch"]}),
            StatusCode::BAD_REQUEST,
            "nodes:",
        ),
        (
            serde_json::json!({"name": "web", "image": "x", "replicas": 2, "nodes": []}),
            StatusCode::OK,
            "",
        ),
        (
            serde_json::json!({"name": "web", "image": "x", "colour": "red"}),
            StatusCode::BAD_REQUEST,
            "body:",
        ),
    ];
    for (spec, status, prefix) in cases {
        let r = deploy(&cp, spec.clone()).await;
        assert_eq!(r.status, status, "{spec}: {}", r.body);
        if status != StatusCode::OK {
            r.error(status, prefix);
            r.coded(status, ErrorCode::InvalidField, prefix.split(':').next());
            assert_eq!(cp.revision().await, before, "{spec} changed the store");
        } else {
            Reply::from(cp.admin(Method::DELETE, "/v1/services/web").send().await.unwrap()).await;
            before = cp.revision().await;
        }
    }
    // No online worker at all: refused, nothing stored.
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/a").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    let before = cp.revision().await;
    let r = deploy(&cp, serde_json::json!({"name": "lonely", "image": "x"})).await;
    r.error(StatusCode::BAD_REQUEST, "replicas:");
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("replicas"));
    assert_eq!(cp.revision().await, before);
    let r = Reply::from(cp.admin(Method::GET, "/v1/services/lonely").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

async fn rollouts_history_and_rollback(db: &Db) {
    let cp = Cp::start(db).await;
    let a = node(&cp, "a").await;
    let b = node(&cp, "b").await;
    let nodes = [&a, &b];
    let spec = |mode: &str, health: &str| {
        serde_json::json!({
            "name": "web", "image": "localhost/berth-test/busybox:latest", "replicas": 2, "port": 8080,
            "env": {"MODE": mode}, "health_http": health,
            "rollout": {"drain_secs": 0, "min_ready_secs": 0, "timeout_secs": 2}
        })
    };
    // Release 1: a first deploy starts both replicas and completes once they serve.
    let r = deploy(&cp, spec("one", "/")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let info = settle(&cp, &nodes, "web", 1, &|_| true, 0).await;
    assert_eq!(info.current_release, Some(1), "{:?}", releases_of(&cp, "web").await);
    // The image its replicas reported pins the release to those bits.
    let digest = releases_of(&cp, "web").await[0].image_digest.clone();
    assert_eq!(digest, Some(format!("sha256:{}", common::FAKE_IMAGE_ID)));
    let first: Vec<String> = info.replicas.iter().map(|r| r.replica.clone()).collect();
    assert_eq!(first, ["web-1", "web-2"]);

    // Release 2: new replicas (new names) one at a time; never fewer than 2 serving.
    let r = deploy(&cp, spec("two", "/")).await;
    let info: ServiceInfo = r.json();
    assert_eq!(
        info.replicas.len(),
        3,
        "one new replica beside the two old: {:?}",
        info.replicas
    );
    let ro = info.rollout.expect("a rollout");
    assert_eq!(
        (ro.release, ro.from_release, ro.batch, ro.stop_first),
        (2, Some(1), 1, false)
    );
    let info = settle(&cp, &nodes, "web", 2, &|_| true, 2).await;
    assert_eq!(info.current_release, Some(2));
    assert!(info
        .replicas
        .iter()
        .all(|r| r.release == 2 && !first.contains(&r.replica)));
    let steps = info.rollout.unwrap().steps;
    assert!(
        steps
            .iter()
            .all(|s| s.stage == berth_protocol::release::StepStage::Done),
        "{steps:?}"
    );

    // A scale is a release without a rollout.
    let r = scale(&cp, "web", 2).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let h = releases_of(&cp, "web").await;
    assert_eq!(
        (h[0].number, h[0].rollout, h[0].state),
        (3, false, ReleaseState::Complete)
    );

    // Release 4 never gets healthy: it fails with the health output, and
    // release 3's replicas keep serving throughout.
    let before: Vec<String> = show_service(&cp, "web")
        .await
        .replicas
        .iter()
        .map(|r| r.replica.clone())
        .collect();
    deploy(&cp, spec("four", "/nope")).await;
    let bad = |r: &str| before.iter().any(|b| b == r);
    let info = settle(&cp, &nodes, "web", 4, &bad, 2).await;
    let h = releases_of(&cp, "web").await;
    assert_eq!(h[0].state, ReleaseState::Failed);
    let reason = h[0].reason.clone().unwrap();
    assert!(
        reason.contains("not healthy within 2 s") && reason.contains("HTTP 404"),
        "{reason}"
    );
    assert_eq!(info.current_release, Some(3));
    let now: Vec<String> = info.replicas.iter().map(|r| r.replica.clone()).collect();
    assert_eq!(now, before, "the old replicas stay, the failed ones are gone");

    // Rollback to release 1's spec: a new release, and release 3 is rolled back.
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services/web/rollback")
            .json(&serde_json::json!({"to": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    settle(&cp, &nodes, "web", 5, &|_| true, 2).await;
    let h = releases_of(&cp, "web").await;
    assert_eq!(h[0].state, ReleaseState::Complete);
    assert_eq!(h[0].reason.as_deref(), Some("rollback to 1"));
    assert_eq!(h[0].spec.env["MODE"], "one");
    assert_eq!(
        h.iter().find(|r| r.number == 3).unwrap().state,
        ReleaseState::RolledBack
    );

    // Bad rollbacks change nothing.
    let rev = cp.revision().await;
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services/web/rollback")
            .json(&serde_json::json!({"to": 99}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("to"));
    assert_eq!(cp.revision().await, rev);

    // A deploy while one rolls queues behind it; --force replaces it.
    deploy(&cp, spec("six", "/")).await;
    deploy(&cp, spec("seven", "/")).await;
    assert_eq!(releases_of(&cp, "web").await[0].state, ReleaseState::Queued);
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services?force=true")
            .json(&spec("eight", "/"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let h = releases_of(&cp, "web").await;
    assert_eq!(h[1].state, ReleaseState::Failed, "{:?}", h[1]);
    assert!(h[1].reason.as_deref().unwrap().contains("superseded by release 8"));
    assert!(h[2].reason.as_deref().unwrap().contains("replaced by release 8"));
    settle(&cp, &nodes, "web", 8, &|_| true, 0).await;
    let info = show_service(&cp, "web").await;
    assert_eq!(info.current_release, Some(8));
    assert!(info.replicas.iter().all(|r| r.release == 8), "{:?}", info.replicas);

    // A restart is release 9 of the same spec: every replica is replaced.
    let before: Vec<String> = info.replicas.iter().map(|r| r.replica.clone()).collect();
    let r = restart(&cp, "web").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let info = settle(&cp, &nodes, "web", 9, &|_| true, 2).await;
    assert_eq!(info.current_release, Some(9));
    assert!(
        info.replicas
            .iter()
            .all(|r| r.release == 9 && !before.contains(&r.replica)),
        "{:?}",
        info.replicas
    );
    let h = releases_of(&cp, "web").await;
    assert_eq!(h[0].reason.as_deref(), Some("restart"));
    assert_eq!(h[0].spec, h[1].spec, "the same spec");

    // A restart queued behind a rollout and overtaken by a scale is not
    // lost: the scale replaces every replica too.
    deploy(&cp, spec("nine", "/")).await;
    let rolling: Vec<String> = show_service(&cp, "web")
        .await
        .replicas
        .iter()
        .map(|r| r.replica.clone())
        .collect();
    let r = restart(&cp, "web").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(releases_of(&cp, "web").await[0].state, ReleaseState::Queued);
    let r = scale(&cp, "web", 2).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let info = settle(&cp, &nodes, "web", 12, &|_| true, 2).await;
    assert!(
        info.replicas
            .iter()
            .all(|r| r.release == 12 && !rolling.contains(&r.replica)),
        "{:?} after {rolling:?}",
        info.replicas
    );
    let r = restart(&cp, "nope").await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("name"));
}
