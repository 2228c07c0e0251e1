//! Domains and TCP routes through the real HTTPS API: what proxy nodes are
//! told to serve (routes to the service's replicas, certificates sealed to
//! each proxy), what workers are not told, and refusals that name their
//! field and change nothing. On SQLite and PostgreSQL.

#[macro_use]
mod common;

use berth_protocol::routes::{CertState, DomainInfo, TcpRouteSpec};
use berth_protocol::service::ServiceInfo;
use berth_protocol::{DesiredState, ErrorCode, StatusReport};
use common::{Cp, Db, Reply, SealedNode};
use reqwest::{Method, StatusCode};

on_both_stores!(routes_reach_proxies_only, bad_routes_change_nothing);

/// Registers `name` (a proxy when `proxy`) with a sealing key, online.
async fn node(cp: &Cp, name: &str, proxy: bool) -> SealedNode {
    let n = cp.join_sealed(name, proxy).await;
    cp.report(&n.agent, &StatusReport::default()).await;
    n
}

async fn post(cp: &Cp, path: &str, body: serde_json::Value) -> Reply {
    Reply::from(cp.admin(Method::POST, path).json(&body).send().await.unwrap()).await
}

async fn get(cp: &Cp, path: &str) -> Reply {
    Reply::from(cp.admin(Method::GET, path).send().await.unwrap()).await
}

async fn del(cp: &Cp, path: &str) -> Reply {
    Reply::from(cp.admin(Method::DELETE, path).send().await.unwrap()).await
}

async fn desired(cp: &Cp, n: &SealedNode) -> DesiredState {
    cp.desired(&n.agent, 0, 1).await.json()
}

async fn deploy(cp: &Cp, name: &str, replicas: u32, port: u16) -> ServiceInfo {
    post(
        cp,
        "/v1/services",
        serde_json::json!({
            "name": name, "image": "localhost/x:1", "replicas": replicas, "port": port,
            "rollout": {"min_ready_secs": 0, "drain_secs": 0}
        }),
    )
    .await
    .json()
}

/// A self-signed certificate and its key, as PEM.
fn test_cert(domain: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![domain.to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (cert.pem(), key.serialize_pem())
}

async fn routes_reach_proxies_only(db: &Db) {
    let cp = Cp::start(db).await;
    let a = node(&cp, "a", false).await;
    let b = node(&cp, "b", false).await;
    let p = node(&cp, "p", true).await;
    let q = node(&cp, "q", true).await;
    let web = deploy(&cp, "web", 2, 8080).await;
    let tcpdb = deploy(&cp, "db", 1, 5432).await;
    assert_eq!(web.replicas.len(), 2);

    let worker_rev = desired(&cp, &a).await.revision;
    let proxy_rev = desired(&cp, &p).await.revision;
    assert!(desired(&cp, &a).await.proxy.is_none());
    assert_eq!(desired(&cp, &p).await.proxy.unwrap_or_default(), Default::default());

    // Adding a domain wakes the proxies' long-polls, not the workers'.
    let poll = cp.desired(&p.agent, proxy_rev, 10);
    let (r, added) = tokio::join!(
        poll,
        post(
            &cp,
            "/v1/domains",
            serde_json::json!({"domain": "app.example.com", "service": "web", "port": 8081}),
        )
    );
    assert_eq!(added.status, StatusCode::CREATED, "{}", added.body);
    let info: DomainInfo = serde_json::from_str(&added.body).unwrap();
    assert_eq!(info.cert_state, CertState::Pending);
    assert_eq!(info.spec.port, 8081);
    assert_eq!(r.status, StatusCode::OK, "the proxy's long-poll returned: {}", r.body);
    let d: DesiredState = r.json();
    assert!(d.revision > proxy_rev);
    assert_eq!(desired(&cp, &a).await.revision, worker_rev, "workers did not move");

    let r = post(
        &cp,
        "/v1/domains",
        serde_json::json!({"domain": "tls.example.com", "service": "web", "port": 8443, "passthrough": true}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(
        serde_json::from_str::<DomainInfo>(&r.body).unwrap().cert_state,
        CertState::Passthrough
    );
    assert!(r.body.contains(r#""cert_state":"passthrough""#), "{}", r.body);
    let r = post(
        &cp,
        "/v1/routes/tcp",
        serde_json::json!({"listen": 15432, "service": "db", "port": 5432}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);

    // The proxy's routes carry the service's replicas on the route's port.
    let d = desired(&cp, &p).await;
    let px = d.proxy.expect("a proxy node gets a proxy section");
    assert_eq!(px.http_routes.len(), 1);
    let route = &px.http_routes[0];
    assert_eq!(
        (route.domain.as_str(), route.service.as_str()),
        ("app.example.com", "web")
    );
    let mut want: Vec<_> = web
        .replicas
        .iter()
        .map(|r| (r.replica.clone(), r.node.clone(), r.ip, 8081u16))
        .collect();
    let mut got: Vec<_> = route
        .upstreams
        .iter()
        .map(|u| (u.replica.clone(), u.node.clone(), u.ip, u.port))
        .collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(px.passthrough.len(), 1);
    assert_eq!(px.passthrough[0].domain, "tls.example.com");
    assert!(px.passthrough[0].upstreams.iter().all(|u| u.port == 8443));
    assert_eq!(px.tcp_routes.len(), 1);
    assert_eq!(px.tcp_routes[0].listen, 15432);
    assert_eq!(px.tcp_routes[0].upstreams.len(), 1);
    assert_eq!(px.tcp_routes[0].upstreams[0].ip, tcpdb.replicas[0].ip);
    assert_eq!(px.tcp_routes[0].upstreams[0].port, 5432);
    assert!(px.certs.is_empty(), "no certificate yet");
    for w in [&a, &b] {
        let d = desired(&cp, w).await;
        assert!(d.proxy.is_none(), "worker {} got proxy routes", w.agent.name);
        assert_eq!(d.revision, worker_rev);
    }

    // Lists.
    let list: Vec<DomainInfo> = get(&cp, "/v1/domains").await.json();
    let names: Vec<_> = list.iter().map(|d| d.spec.domain.as_str()).collect();
    assert_eq!(names, ["app.example.com", "tls.example.com"]);
    let tcp: Vec<TcpRouteSpec> = get(&cp, "/v1/routes/tcp").await.json();
    assert_eq!(tcp.len(), 1);
    assert_eq!(
        (tcp[0].listen, tcp[0].service.as_str(), tcp[0].port),
        (15432, "db", 5432)
    );

    // A stored certificate reaches every proxy, its key sealed to each one.
    let (chain, key) = test_cert("app.example.com");
    let cp_public = x25519_dalek::PublicKey::from(&cp.started.state.secrets_key);
    let sealed = berth_protocol::seal::seal(&cp_public, key.as_bytes());
    let now = common::now();
    let rev = cp
        .store()
        .store_cert("app.example.com", &chain, &sealed, now - 10, now + 90 * 86400)
        .await
        .unwrap()
        .expect("domain exists");
    cp.started.state.revision_moved(rev).await;
    for (me, other) in [(&p, &q), (&q, &p)] {
        let r = cp.desired(&me.agent, 0, 1).await;
        assert!(!r.body.contains("PRIVATE KEY"), "a key in clear in the desired state");
        let d: DesiredState = r.json();
        let certs = d.proxy.unwrap().certs;
        assert_eq!(certs.len(), 1);
        assert_eq!(certs[0].domain, "app.example.com");
        assert_eq!(certs[0].chain_pem, chain);
        let opened = berth_protocol::seal::open(&me.seal, &certs[0].sealed_key_pem).unwrap();
        assert_eq!(String::from_utf8(opened).unwrap(), key);
        assert!(berth_protocol::seal::open(&other.seal, &certs[0].sealed_key_pem).is_err());
        assert!(berth_protocol::seal::open(&a.seal, &certs[0].sealed_key_pem).is_err());
    }
    let list: Vec<DomainInfo> = get(&cp, "/v1/domains").await.json();
    assert_eq!(list[0].cert_state, CertState::Valid);
    assert!(list[0].cert_not_after.as_deref().is_some_and(|t| t.ends_with('Z')));
    assert!(!get(&cp, "/v1/domains").await.body.contains("PRIVATE KEY"));

    // Scaling the service changes the proxy's upstreams, once its first
    // release is complete (a scale queues behind a rollout).
    common::settle(&cp, &[&a, &b, &p, &q], "web", 1, &|_| true, 0).await;
    let r = post(&cp, "/v1/services/web/scale", serde_json::json!({"replicas": 1})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let d = desired(&cp, &p).await;
    assert_eq!(d.proxy.unwrap().http_routes[0].upstreams.len(), 1);
    let worker_rev = desired(&cp, &a).await.revision;

    // Removal: gone from the proxies, a second removal is a 404.
    let r = del(&cp, "/v1/domains/app.example.com").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    del(&cp, "/v1/domains/app.example.com")
        .await
        .error(StatusCode::NOT_FOUND, "domain:");
    let r = del(&cp, "/v1/routes/tcp/15432").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    del(&cp, "/v1/routes/tcp/15432")
        .await
        .error(StatusCode::NOT_FOUND, "listen:");
    let px = desired(&cp, &p).await.proxy.unwrap();
    assert!(px.http_routes.is_empty() && px.certs.is_empty() && px.tcp_routes.is_empty());
    assert_eq!(px.passthrough.len(), 1);
    assert_eq!(
        desired(&cp, &a).await.revision,
        worker_rev,
        "removing routes did not move workers"
    );
}

/// Everything a refused call must leave as it was.
async fn routes_state(cp: &Cp) -> (i64, String, String) {
    (
        cp.revision().await,
        get(cp, "/v1/domains").await.body,
        get(cp, "/v1/routes/tcp").await.body,
    )
}

/// The code a refused route change comes with, by its status.
fn route_code(status: StatusCode) -> ErrorCode {
    match status {
        StatusCode::CONFLICT => ErrorCode::NameTaken,
        StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::UnknownService,
        _ => ErrorCode::InvalidField,
    }
}

async fn bad_routes_change_nothing(db: &Db) {
    let cp = Cp::start(db).await;
    let _a = node(&cp, "a", false).await;
    let _p = node(&cp, "p", true).await;
    deploy(&cp, "web", 1, 8080).await;
    let ok = post(
        &cp,
        "/v1/domains",
        serde_json::json!({"domain": "app.example.com", "service": "web", "port": 8080}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    let ok = post(
        &cp,
        "/v1/routes/tcp",
        serde_json::json!({"listen": 2222, "service": "web", "port": 22}),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED, "{}", ok.body);
    let before = routes_state(&cp).await;

    use serde_json::json;
    let bad = StatusCode::BAD_REQUEST;
    let domain_cases = [
        (
            json!({"domain": "Bad_Host.example.com", "service": "web", "port": 80}),
            bad,
            "domain:",
        ),
        (
            json!({"domain": "localhost", "service": "web", "port": 80}),
            bad,
            "domain:",
        ),
        (
            json!({"domain": "*.example.com", "service": "web", "port": 80}),
            bad,
            "domain:",
        ),
        (
            json!({"domain": "a.example.com.", "service": "web", "port": 80}),
            bad,
            "domain:",
        ),
        (json!({"domain": 5, "service": "web", "port": 80}), bad, "domain:"),
        (
            json!({"domain": "b.example.com", "service": "Web!", "port": 80}),
            bad,
            "service:",
        ),
        (
            json!({"domain": "b.example.com", "service": "nosuch", "port": 80}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "service:",
        ),
        (
            json!({"domain": "b.example.com", "service": "web", "port": 0}),
            bad,
            "port:",
        ),
        (
            json!({"domain": "b.example.com", "service": "web", "port": 70000}),
            bad,
            "port:",
        ),
        (
            json!({"domain": "b.example.com", "service": "web", "port": -1}),
            bad,
            "port:",
        ),
        (
            json!({"domain": "b.example.com", "service": "web", "port": "80"}),
            bad,
            "port:",
        ),
        (
            json!({"domain": "b.example.com", "service": "web", "port": 80, "passthrough": "yes"}),
            bad,
            "passthrough:",
        ),
        (
            json!({"domain": "b.example.com", "service": "web"}),
            bad,
            "body: missing field `port`",
        ),
        (
            json!({"domain": "b.example.com", "service": "web", "port": 80, "colour": "red"}),
            bad,
            "body: unknown field `colour`",
        ),
        (
            json!({"domain": "app.example.com", "service": "web", "port": 9090}),
            StatusCode::CONFLICT,
            "domain:",
        ),
        (json!(["app.example.com"]), bad, "body:"),
    ];
    for (body, status, prefix) in domain_cases {
        let r = post(&cp, "/v1/domains", body.clone()).await;
        r.error(status, prefix);
        r.coded(status, route_code(status), prefix.split(':').next());
        assert_eq!(routes_state(&cp).await, before, "{body} changed the store");
    }
    let tcp_cases = [
        (json!({"listen": 80, "service": "web", "port": 80}), bad, "listen:"),
        (json!({"listen": 443, "service": "web", "port": 80}), bad, "listen:"),
        (json!({"listen": 0, "service": "web", "port": 80}), bad, "listen:"),
        (json!({"listen": 65536, "service": "web", "port": 80}), bad, "listen:"),
        (json!({"listen": 3333, "service": "web", "port": 0}), bad, "port:"),
        (json!({"listen": 3333, "service": "web", "port": 1e3}), bad, "port:"),
        (
            json!({"listen": 3333, "service": "no_such", "port": 80}),
            bad,
            "service:",
        ),
        (
            json!({"listen": 3333, "service": "nosuch", "port": 80}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "service:",
        ),
        (
            json!({"listen": 2222, "service": "web", "port": 23}),
            StatusCode::CONFLICT,
            "listen:",
        ),
        (
            json!({"listen": 3333, "port": 80}),
            bad,
            "body: missing field `service`",
        ),
    ];
    for (body, status, prefix) in tcp_cases {
        let r = post(&cp, "/v1/routes/tcp", body.clone()).await;
        r.error(status, prefix);
        r.coded(status, route_code(status), prefix.split(':').next());
        assert_eq!(routes_state(&cp).await, before, "{body} changed the store");
    }
    del(&cp, "/v1/routes/tcp/abc").await.error(bad, "listen:");
    del(&cp, "/v1/routes/tcp/0").await.error(bad, "listen:");
    del(&cp, "/v1/routes/tcp/9999")
        .await
        .error(StatusCode::NOT_FOUND, "listen:");
    del(&cp, "/v1/domains/nope.example.com")
        .await
        .error(StatusCode::NOT_FOUND, "domain:");
    let r = Reply::from(
        cp.http
            .post(format!("{}/v1/domains", cp.url))
            .json(&json!({"domain": "b.example.com", "service": "web", "port": 80}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    assert_eq!(routes_state(&cp).await, before);

    // A service that still receives traffic is not removed.
    let r = del(&cp, "/v1/services/web").await;
    r.error(StatusCode::CONFLICT, "name:");
    r.coded(StatusCode::CONFLICT, ErrorCode::StillRouted, Some("name"));
    assert!(
        r.body.contains("domain app.example.com") && r.body.contains("TCP route 2222"),
        "{}",
        r.body
    );
    assert_eq!(get(&cp, "/v1/services/web").await.status, StatusCode::OK);
    assert_eq!(routes_state(&cp).await, before);
    assert_eq!(del(&cp, "/v1/domains/app.example.com").await.status, StatusCode::OK);
    assert_eq!(del(&cp, "/v1/routes/tcp/2222").await.status, StatusCode::OK);
    let r = del(&cp, "/v1/services/web").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}
