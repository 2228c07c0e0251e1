//! Services through the real HTTPS API: placement, container IPs, sealed
//! secrets, scaling, moving replicas off a removed node, health-driven DNS
//! records, and refusals that change nothing. On SQLite and PostgreSQL.

#[macro_use]
mod common;

use berth_protocol::service::{ContainerStatus, ServiceInfo};
use berth_protocol::{DesiredState, ErrorCode, StatusReport};
use common::{Cp, Db, Reply, SealedNode};
use reqwest::{Method, StatusCode};
use std::collections::BTreeMap;

on_both_stores!(deploy_scale_move_and_health, bad_services_change_nothing);

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

async fn deploy(cp: &Cp, spec: serde_json::Value) -> Reply {
    Reply::from(cp.admin(Method::POST, "/v1/services").json(&spec).send().await.unwrap()).await
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
            "env": {"MODE": "demo"}, "secrets": {"API_KEY": "hunter2-secret"}, "health_http": "/healthz"
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
                restarts: 0,
                error: None,
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

    // Scale to 3: one per node. Scale to 0: nothing anywhere, the name stays.
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services/web/scale")
            .json(&serde_json::json!({"replicas": 3}))
            .send()
            .await
            .unwrap(),
    )
    .await;
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

    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services/web/scale")
            .json(&serde_json::json!({"replicas": 0}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(r.json::<ServiceInfo>().replicas.is_empty());
    assert!(desired(&cp, &a).await.containers.is_empty());

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
