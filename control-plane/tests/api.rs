//! The control plane's HTTPS API, through a real server started with
//! `start()`: registration, the desired-state long-poll, status reports,
//! refusals that must change nothing, request signing, and two replicas
//! sharing one PostgreSQL. Every test but the last runs on SQLite and on
//! PostgreSQL.

#[macro_use]
mod common;

use berth_protocol::signing::{self, HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::token::JoinToken;
use berth_protocol::{DesiredState, ErrorCode, NodeInfo, PeerStatus, RegisterResponse, Role, StatusReport, TokenState};
use common::{now, Agent, Cp, Db, Reply};
use reqwest::{Method, StatusCode};
use std::time::{Duration, Instant};

on_both_stores!(
    register_long_poll_and_report,
    long_poll_times_out_without_a_change,
    refused_registrations_change_nothing,
    admin_api_refuses_bad_calls,
    signed_agent_requests_are_checked,
    removed_node_is_refused,
);

/// A long-poll must return this much before its `wait` when the revision moves.
const WAKE_BOUND: Duration = Duration::from_secs(4);

async fn register_long_poll_and_report(db: &Db) {
    let cp = Cp::start(db).await;
    assert_eq!(
        Reply::from(cp.http.get(format!("{}/healthz", cp.url)).send().await.unwrap())
            .await
            .status,
        200
    );

    // A token, listed as valid, with a ready-to-paste agent command.
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/tokens")
            .json(&serde_json::json!({ "ttl_secs": 600 }))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let created: serde_json::Value = r.json();
    let token = created["token"].as_str().unwrap().to_string();
    let token_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["role"], "worker");
    assert!(created["agent_command"].as_str().unwrap().contains(&token), "{created}");
    assert_eq!(JoinToken::parse(&token).unwrap().ca_hash, cp.ca_hash());
    assert_eq!(cp.token_state(&token_id).await, TokenState::Valid);

    // Register: the first addresses of each pool.
    let mut a = Agent::new("alpha");
    let mut req = a.register_request(&token);
    req.private_addr = Some("198.18.0.11/24".into());
    let r = cp.register_req(&a, &req).await;
    let reg: RegisterResponse = r.json();
    a.node_id = reg.node_id.clone();
    assert_eq!(reg.name, "alpha");
    assert_eq!(reg.role, Role::Worker);
    assert_eq!(reg.mesh_ip.to_string(), "10.100.0.1");
    assert_eq!(reg.mesh_cidr, "10.100.0.0/16");
    assert_eq!(reg.subnet, "10.200.0.0/24");
    assert_eq!(cp.token_state(&token_id).await, TokenState::Used);
    assert_eq!(cp.revision().await, 1);

    // The first long-poll answers at once with the node's own state.
    let started = Instant::now();
    let r = cp.desired(&a, 0, 5).await;
    assert!(started.elapsed() < WAKE_BOUND, "after=0 must not wait");
    let d: DesiredState = r.json();
    assert_eq!(d.revision, 1);
    assert_eq!(d.node.node_id, a.node_id);
    assert_eq!(d.node.mesh_ip, reg.mesh_ip);
    assert_eq!(d.node.subnet, "10.200.0.0/24");
    assert_eq!(d.node.subnet_pool, "10.200.0.0/13");
    assert!(d.peers.is_empty());

    // A long-poll at the current revision waits, and returns as soon as a
    // second node registers, with that node as a peer.
    let poll = {
        let cp_url = cp.url.clone();
        let http = cp.http.clone();
        let pq = format!("/v1/agent/desired?after={}&wait=5", d.revision);
        let h = signing::sign(&a.key, "GET", &pq, b"", now());
        let node = a.node_id.clone();
        tokio::spawn(async move {
            let resp = http
                .get(format!("{cp_url}{pq}"))
                .header(HEADER_NODE, node)
                .header(HEADER_TIMESTAMP, h.timestamp)
                .header(HEADER_NONCE, h.nonce)
                .header(HEADER_SIGNATURE, h.signature)
                .send()
                .await
                .unwrap();
            (Reply::from(resp).await, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished(), "a long-poll at the current revision must wait");
    let mut b = Agent::new("bravo");
    let token_b = cp.create_token(false).await;
    let mut req = b.register_request(&token_b.token);
    req.private_addr = Some("198.18.0.12/24".into());
    let registered_at = Instant::now();
    let reg_b: RegisterResponse = cp.register_req(&b, &req).await.json();
    b.node_id = reg_b.node_id.clone();
    let (r, returned_at) = poll.await.unwrap();
    let took = returned_at.duration_since(registered_at);
    assert!(
        took < WAKE_BOUND,
        "the long-poll returned {took:?} after the change (wait was 5 s)"
    );
    let d: DesiredState = r.json();
    assert_eq!(d.revision, 2);
    assert_eq!(d.peers.len(), 1);
    let peer = &d.peers[0];
    assert_eq!(peer.node_id, b.node_id);
    assert_eq!(peer.name, "bravo");
    assert_eq!(peer.wg_public_key, b.wg_public);
    assert_eq!(peer.mesh_ip.to_string(), "10.100.0.2");
    assert_eq!(peer.subnet, "10.200.1.0/24");
    assert_eq!(
        peer.endpoint,
        Some("198.18.0.12:51820".parse().unwrap()),
        "same network: private address"
    );

    // A proxy node on another network, without a public_ip: peers reach
    // it at the address its registration came from.
    let mut c = Agent::new("charlie");
    let token_c = cp.create_token(true).await;
    assert_eq!(token_c.role, Role::Proxy);
    let mut req = c.register_request(&token_c.token);
    req.proxy = true;
    req.private_addr = Some("192.168.7.5/24".into());
    req.wg_port = 51999;
    let reg_c: RegisterResponse = cp.register_req(&c, &req).await.json();
    c.node_id = reg_c.node_id.clone();
    assert_eq!(reg_c.role, Role::Proxy);
    let d: DesiredState = cp.desired(&a, 2, 5).await.json();
    assert_eq!(d.revision, 3);
    let pc = d.peers.iter().find(|p| p.name == "charlie").expect("charlie is a peer");
    assert_eq!(pc.endpoint, Some("127.0.0.1:51999".parse().unwrap()));
    let d_c: DesiredState = cp.desired(&c, 0, 5).await.json();
    assert_eq!(d_c.node.role, Role::Proxy);
    assert_eq!(
        d_c.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "bravo"]
    );

    // A status report makes the node online with what it applied.
    let nodes = cp.nodes().await;
    assert!(nodes.iter().all(|n| !n.online && n.last_seen.is_none()), "{nodes:?}");
    // alpha is an agent from before `peers_up`: it sends every peer. 7 s
    // is up; charlie never handshook, so it is down.
    let peer = |key: &str, age: Option<u64>| PeerStatus {
        wg_public_key: key.into(),
        handshake_age_secs: age,
        rx_bytes: 1,
        tx_bytes: 2,
    };
    let report = StatusReport {
        applied_revision: 3,
        agent_version: "0.1.0-test".into(),
        peers: vec![peer(&b.wg_public, Some(7)), peer(&c.wg_public, None)],
        error: None,
        rss_bytes: Some(1 << 20),
        ..Default::default()
    };
    let r = Reply::from(
        cp.signed(
            &a,
            Method::POST,
            "/v1/agent/status",
            serde_json::to_vec(&report).unwrap(),
        )
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap(),
    )
    .await;
    let v: serde_json::Value = r.json();
    assert_eq!(v["revision"], 3);
    let nodes = cp.nodes().await;
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "bravo", "charlie"]
    );
    let na = &nodes[0];
    assert!(na.online, "{na:?}");
    assert!(na.last_seen.is_some_and(|t| (t - now()).abs() <= 5));
    assert_eq!(na.revision, 3);
    assert_eq!(na.applied_revision, 3);
    assert_eq!(na.agent_version.as_deref(), Some("0.1.0-test"));
    assert_eq!(na.error, None);
    assert_eq!(na.peers_up, Some(1), "bravo, 7 s ago: {na:?}");
    let down: Vec<(&str, Option<u64>)> = na
        .peers
        .iter()
        .map(|p| (p.name.as_str(), p.handshake_age_secs))
        .collect();
    assert_eq!(down, [("charlie", None)]);
    assert!(!nodes[1].online && !nodes[2].online, "the others have not reported");
    assert_eq!(nodes[2].role, Role::Proxy);
    assert_eq!((nodes[1].peers_up, nodes[1].peers.len()), (None, 0), "never reported");

    // bravo is a current agent: a count and the peers down. alpha's last
    // handshake was 400 s ago (past 180 s: down).
    let report = StatusReport {
        applied_revision: 3,
        agent_version: "0.1.0-test".into(),
        peers_up: Some(1),
        peers_down: Some(vec![peer(&a.wg_public, Some(400))]),
        ..Default::default()
    };
    cp.report(&b, &report).await;
    // A report without peer state (an apply report) keeps it.
    cp.report(
        &b,
        &StatusReport {
            applied_revision: 3,
            agent_version: "0.1.0-test".into(),
            ..Default::default()
        },
    )
    .await;
    let nodes = cp.nodes().await;
    let nb = &nodes[1];
    assert_eq!(nb.peers_up, Some(1), "{nb:?}");
    assert_eq!(nb.peers.len(), 1, "{nb:?}");
    assert_eq!(nb.peers[0].name, "alpha");
    // Aged as of now: 400 s plus the seconds since the report.
    assert!(
        nb.peers[0]
            .handshake_age_secs
            .is_some_and(|age| (400..=405).contains(&age)),
        "{nb:?}"
    );
    // The JSON: `peers_up` beside the down peers.
    let raw: serde_json::Value = Reply::from(cp.admin(Method::GET, "/v1/nodes").send().await.unwrap())
        .await
        .json();
    assert_eq!(raw[1]["peers_up"], 1, "{raw}");
    assert_eq!(raw[1]["peers"][0]["name"], "alpha", "{raw}");
    assert!(raw[2].get("peers_up").is_none(), "charlie never reported: {raw}");
}

async fn long_poll_times_out_without_a_change(db: &Db) {
    let cp = Cp::start(db).await;
    let mut a = Agent::new("alpha");
    cp.join(&mut a).await;
    let started = Instant::now();
    let r = cp.desired(&a, 1, 1).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "returned before its wait"
    );
    // A node that is ahead of the control plane (e.g. after a restore) gets nothing new either.
    assert_eq!(cp.desired(&a, 99, 0).await.status, StatusCode::NO_CONTENT);
    let r = Reply::from(
        cp.signed(&a, Method::GET, "/v1/agent/desired?after=x", vec![])
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.error(StatusCode::BAD_REQUEST, "query: ");
}

async fn refused_registrations_change_nothing(db: &Db) {
    let cp = Cp::start(db).await;
    let first = Agent::new("first");
    let used = cp.create_token(false).await;
    let _: RegisterResponse = cp
        .register_req(&first, &first.register_request(&used.token))
        .await
        .json();
    let token = cp.create_token(false).await;
    let fresh = Agent::new("fresh");
    let good = || fresh.register_request(&token.token);

    let before = cp.fleet().await;
    assert_eq!(before.revision, 1);
    assert_eq!(before.nodes.len(), 1);
    let unchanged = || async {
        assert_eq!(cp.fleet().await, before, "a refused registration changed the store");
        assert_eq!(cp.token_state(&token.id).await, TokenState::Valid);
    };

    // Tokens.
    let mut req = good();
    req.token = "berth1.nope".into();
    cp.register_req(&fresh, &req)
        .await
        .error(StatusCode::UNAUTHORIZED, "token: malformed");
    unchanged().await;

    let mut other = JoinToken::parse(&token.token).unwrap();
    other.ca_hash = "ab".repeat(32);
    let mut req = good();
    req.token = other.to_string();
    let msg = cp
        .register_req(&fresh, &req)
        .await
        .error(StatusCode::UNAUTHORIZED, "token: ");
    assert!(msg.contains("different control plane"), "{msg}");
    unchanged().await;

    let mut unknown = JoinToken::parse(&token.token).unwrap();
    unknown.id = "zzzzzzzz".into();
    let mut req = good();
    req.token = unknown.to_string();
    cp.register_req(&fresh, &req)
        .await
        .error(StatusCode::UNAUTHORIZED, "token: unknown");
    unchanged().await;

    let mut wrong_secret = JoinToken::parse(&token.token).unwrap();
    wrong_secret.secret = "x".repeat(32);
    let mut req = good();
    req.token = wrong_secret.to_string();
    cp.register_req(&fresh, &req)
        .await
        .error(StatusCode::UNAUTHORIZED, "token: unknown");
    unchanged().await;

    let mut req = good();
    req.token = used.token.clone();
    let r = cp.register_req(&fresh, &req).await;
    r.error(StatusCode::UNAUTHORIZED, "token: already used");
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::TokenUsed, Some("token"));
    unchanged().await;

    // Revoked and expired tokens: made here, so compare from after they exist.
    let revoked = cp.create_token(false).await;
    let r = Reply::from(
        cp.admin(Method::DELETE, &format!("/v1/tokens/{}", revoked.id))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let v: serde_json::Value = r.json();
    assert_eq!(v["revoked"], revoked.id.as_str());
    assert_eq!(cp.token_state(&revoked.id).await, TokenState::Revoked);
    let expired = {
        let r = Reply::from(
            cp.admin(Method::POST, "/v1/tokens")
                .json(&serde_json::json!({ "ttl_secs": 60 }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        r.json::<berth_protocol::CreatedToken>()
    };
    sqlx::query("UPDATE tokens SET expires_at = 0 WHERE id = $1")
        .bind(&expired.id)
        .execute(&cp.store().pool)
        .await
        .unwrap();
    assert_eq!(cp.token_state(&expired.id).await, TokenState::Expired);
    let before = cp.fleet().await;
    let unchanged = || async {
        assert_eq!(cp.fleet().await, before, "a refused registration changed the store");
        assert_eq!(cp.token_state(&token.id).await, TokenState::Valid);
    };
    let mut req = good();
    req.token = revoked.token.clone();
    let r = cp.register_req(&fresh, &req).await;
    r.error(StatusCode::UNAUTHORIZED, "token: revoked");
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::TokenRevoked, Some("token"));
    unchanged().await;
    let mut req = good();
    req.token = expired.token.clone();
    let r = cp.register_req(&fresh, &req).await;
    r.error(StatusCode::UNAUTHORIZED, "token: expired");
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::TokenExpired, Some("token"));
    unchanged().await;

    // Fields.
    type Edit = fn(&mut berth_protocol::RegisterRequest);
    let cases: &[(&str, Edit)] = &[
        ("name: ", |r| r.name = "Bad_Name".into()),
        ("name: ", |r| r.name = String::new()),
        ("name: ", |r| r.name = "x".repeat(64)),
        ("wg_public_key: ", |r| r.wg_public_key = "abc".into()),
        ("wg_public_key: ", |r| r.wg_public_key = String::new()),
        ("wg_port: ", |r| r.wg_port = 0),
        ("private_addr: ", |r| r.private_addr = Some("10.0.0.1".into())),
        ("private_addr: ", |r| r.private_addr = Some("300.0.0.1/24".into())),
        ("private_addr: ", |r| r.private_addr = Some("fd00::1/64".into())),
        ("signing_key: ", |r| r.signing_key = "not-a-key".into()),
        ("proxy: ", |r| r.proxy = true),
    ];
    for (prefix, edit) in cases {
        let mut req = good();
        edit(&mut req);
        cp.register_req(&fresh, &req)
            .await
            .error(StatusCode::BAD_REQUEST, prefix);
        unchanged().await;
    }
    // A worker agent cannot use a proxy token either.
    let proxy_token = cp.create_token(true).await;
    let before_proxy = cp.fleet().await;
    cp.register_req(&fresh, &fresh.register_request(&proxy_token.token))
        .await
        .error(StatusCode::BAD_REQUEST, "proxy: ");
    assert_eq!(cp.fleet().await, before_proxy);
    assert_eq!(cp.token_state(&proxy_token.id).await, TokenState::Valid);
    let before = before_proxy;
    let unchanged = || async {
        assert_eq!(cp.fleet().await, before, "a refused registration changed the store");
        assert_eq!(cp.token_state(&token.id).await, TokenState::Valid);
    };

    // Name or keys already taken: 409.
    let mut req = good();
    req.name = "first".into();
    let r = cp.register_req(&fresh, &req).await;
    r.error(StatusCode::CONFLICT, "name: ");
    r.coded(StatusCode::CONFLICT, ErrorCode::NameTaken, Some("name"));
    unchanged().await;
    let mut req = good();
    req.wg_public_key = first.wg_public.clone();
    cp.register_req(&fresh, &req)
        .await
        .error(StatusCode::CONFLICT, "wg_public_key: ");
    unchanged().await;
    let req = first.register_request(&token.token);
    let mut renamed = req.clone();
    renamed.name = "first-again".into();
    renamed.wg_public_key = fresh.wg_public.clone();
    cp.register_req(&first, &renamed)
        .await
        .error(StatusCode::CONFLICT, "signing_key: ");
    unchanged().await;

    // Bodies.
    cp.register_raw(&fresh.key, b"{not json".to_vec())
        .await
        .error(StatusCode::BAD_REQUEST, "body: ");
    unchanged().await;
    cp.register_raw(&fresh.key, br#"{"token": "x"}"#.to_vec())
        .await
        .error(StatusCode::BAD_REQUEST, "body: ");
    unchanged().await;
    let mut big = serde_json::to_vec(&good()).unwrap();
    big.pop();
    big.extend_from_slice(br#", "padding": ""#);
    big.extend(std::iter::repeat_n(b'x', 70 * 1024));
    big.extend_from_slice(br#""}"#);
    let r = cp.register_raw(&fresh.key, big).await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "body: ");
    r.coded(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BodyTooLarge, Some("body"));
    unchanged().await;

    // Proof of possession: the body must be signed by the key it registers.
    let impostor = Agent::new("impostor");
    let r = cp
        .register_raw(&impostor.key, serde_json::to_vec(&good()).unwrap())
        .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-signature: ");
    unchanged().await;
    let r = Reply::from(
        cp.http
            .post(format!("{}/v1/register", cp.url))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&good()).unwrap())
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-timestamp: missing");
    unchanged().await;
    let body = serde_json::to_vec(&good()).unwrap();
    let h = signing::sign(&fresh.key, "POST", "/v1/register", &body, now() - 3600);
    let r = Reply::from(
        cp.http
            .post(format!("{}/v1/register", cp.url))
            .header(HEADER_TIMESTAMP, h.timestamp)
            .header(HEADER_NONCE, h.nonce)
            .header(HEADER_SIGNATURE, h.signature)
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-timestamp: ");
    unchanged().await;

    // After all of that the token still registers the node, once.
    let reg: RegisterResponse = cp.register_req(&fresh, &good()).await.json();
    assert_eq!(reg.mesh_ip.to_string(), "10.100.0.2");
    assert_eq!(cp.token_state(&token.id).await, TokenState::Used);
    assert_eq!(cp.revision().await, before.revision + 1);
}

async fn admin_api_refuses_bad_calls(db: &Db) {
    let cp = Cp::start(db).await;
    let mut a = Agent::new("alpha");
    cp.join(&mut a).await;
    let before = cp.fleet().await;

    let url = |p: &str| format!("{}{p}", cp.url);
    for (method, path) in [
        (Method::GET, "/v1/nodes"),
        (Method::GET, "/v1/tokens"),
        (Method::POST, "/v1/tokens"),
        (Method::DELETE, "/v1/tokens/abcdefgh"),
        (Method::DELETE, "/v1/nodes/alpha"),
        (Method::GET, "/v1/revision"),
    ] {
        let body = r#"{"ttl_secs": 600}"#;
        let r = Reply::from(
            cp.http
                .request(method.clone(), url(path))
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        r.error(StatusCode::UNAUTHORIZED, "authorization: ");
        r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
        let r = Reply::from(
            cp.http
                .request(method.clone(), url(path))
                .bearer_auth("0".repeat(64))
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        r.error(StatusCode::UNAUTHORIZED, "authorization: ");
        let r = Reply::from(
            cp.http
                .request(method.clone(), url(path))
                .basic_auth("admin", Some(&cp.admin_token))
                .body(body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        r.error(StatusCode::UNAUTHORIZED, "authorization: ");
        // An agent's signature is no admin credential.
        let r = Reply::from(cp.signed(&a, method.clone(), path, body.into()).send().await.unwrap()).await;
        r.error(StatusCode::UNAUTHORIZED, "authorization: ");
    }
    assert_eq!(cp.fleet().await, before);

    let r = Reply::from(cp.admin(Method::DELETE, "/v1/tokens/nosuchid").send().await.unwrap()).await;
    r.error(StatusCode::NOT_FOUND, "id: ");
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/nosuch").send().await.unwrap()).await;
    r.error(StatusCode::NOT_FOUND, "name: ");
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/Bad_Name").send().await.unwrap()).await;
    r.error(StatusCode::BAD_REQUEST, "name: ");
    for ttl in [0, 59, 30 * 24 * 3600 + 1] {
        let r = Reply::from(
            cp.admin(Method::POST, "/v1/tokens")
                .json(&serde_json::json!({ "ttl_secs": ttl }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        r.error(StatusCode::BAD_REQUEST, "ttl_secs: ");
    }
    for body in [r#"{"ttl_secs": -1}"#, r#"{"proxy": true}"#, "nope"] {
        let r = Reply::from(cp.admin(Method::POST, "/v1/tokens").body(body).send().await.unwrap()).await;
        r.error(StatusCode::BAD_REQUEST, "body: ");
    }
    let r = Reply::from(cp.admin(Method::GET, "/v1/nope").send().await.unwrap()).await;
    r.error(StatusCode::NOT_FOUND, "path: ");
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("path"));
    // Without the admin token an unknown path is still a 404, not a 401.
    let r = Reply::from(cp.http.get(url("/v1/nope")).send().await.unwrap()).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("path"));
    // And a method an admin path does not have is a 405 for everyone.
    let r = Reply::from(cp.http.put(url("/v1/tokens")).send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.body);
    assert_eq!(cp.fleet().await, before, "refused admin calls changed the store");

    // The bounds themselves are accepted.
    for ttl in [60, 30 * 24 * 3600] {
        let r = Reply::from(
            cp.admin(Method::POST, "/v1/tokens")
                .json(&serde_json::json!({ "ttl_secs": ttl }))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // Revoking a used token is a conflict and leaves it used.
    let used_id = before.tokens[0].0.clone();
    let r = Reply::from(
        cp.admin(Method::DELETE, &format!("/v1/tokens/{used_id}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.error(StatusCode::CONFLICT, "id: ");
    r.coded(StatusCode::CONFLICT, ErrorCode::TokenUsed, Some("id"));
    assert_eq!(cp.token_state(&used_id).await, TokenState::Used);

    // The CA an agent fetches is the one whose hash tokens carry.
    let pem = Reply::from(cp.http.get(url("/v1/ca.pem")).send().await.unwrap()).await;
    assert_eq!(pem.status, StatusCode::OK);
    assert_eq!(pem.body, std::fs::read_to_string(&cp.started.ca_file).unwrap());
    use base64::Engine;
    let b64: String = pem.body.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    assert_eq!(berth_protocol::token::ca_hash(&der), cp.ca_hash());
}

async fn signed_agent_requests_are_checked(db: &Db) {
    let cp = Cp::start(db).await;
    let mut a = Agent::new("alpha");
    cp.join(&mut a).await;
    let pq = "/v1/agent/desired?after=0&wait=0";
    let send = |rb: reqwest::RequestBuilder| async move { Reply::from(rb.send().await.unwrap()).await };
    let report = serde_json::to_vec(&StatusReport {
        applied_revision: 1,
        agent_version: "t".into(),
        ..Default::default()
    })
    .unwrap();

    assert_eq!(
        send(cp.signed(&a, Method::GET, pq, vec![])).await.status,
        StatusCode::OK
    );

    // Signed by another key.
    let mut forger = Agent::new("alpha");
    forger.node_id = a.node_id.clone();
    send(cp.signed(&forger, Method::GET, pq, vec![]))
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-signature: ");
    send(cp.signed(&forger, Method::POST, "/v1/agent/status", report.clone()))
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-signature: ");

    // Signed for one thing, used for another: query, method, body.
    let h = signing::sign(&a.key, "GET", pq, b"", now());
    let r = send(
        cp.http
            .get(format!("{}/v1/agent/desired?after=0&wait=1", cp.url))
            .header(HEADER_NODE, &a.node_id)
            .header(HEADER_TIMESTAMP, &h.timestamp)
            .header(HEADER_NONCE, &h.nonce)
            .header(HEADER_SIGNATURE, &h.signature),
    )
    .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-signature: ");
    let h = signing::sign(&a.key, "POST", "/v1/agent/status", &report, now());
    let mut tampered: StatusReport = serde_json::from_slice(&report).unwrap();
    tampered.error = Some("injected".into());
    let r = send(
        cp.http
            .post(format!("{}/v1/agent/status", cp.url))
            .header(HEADER_NODE, &a.node_id)
            .header(HEADER_TIMESTAMP, &h.timestamp)
            .header(HEADER_NONCE, &h.nonce)
            .header(HEADER_SIGNATURE, &h.signature)
            .body(serde_json::to_vec(&tampered).unwrap()),
    )
    .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-signature: ");
    assert!(cp.nodes().await[0].last_seen.is_none(), "a refused report was recorded");

    // Stale and future timestamps.
    send(cp.signed_at(&a, Method::GET, pq, vec![], now() - 1000))
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-timestamp: ");
    send(cp.signed_at(&a, Method::GET, pq, vec![], now() + 1000))
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-timestamp: ");

    // Missing or malformed headers.
    let r = send(cp.http.get(format!("{}{pq}", cp.url))).await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-node: missing");
    let h = signing::sign(&a.key, "GET", pq, b"", now());
    let r = send(
        cp.http
            .get(format!("{}{pq}", cp.url))
            .header(HEADER_NODE, &a.node_id)
            .header(HEADER_TIMESTAMP, &h.timestamp)
            .header(HEADER_NONCE, "short")
            .header(HEADER_SIGNATURE, &h.signature),
    )
    .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-nonce: ");
    let r = send(
        cp.http
            .get(format!("{}{pq}", cp.url))
            .header(HEADER_NODE, &a.node_id)
            .header(HEADER_TIMESTAMP, &h.timestamp)
            .header(HEADER_NONCE, &h.nonce),
    )
    .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-signature: missing");

    // Unknown node.
    let mut stranger = Agent::new("stranger");
    stranger.node_id = "n0000000000000000".into();
    send(cp.signed(&stranger, Method::GET, pq, vec![]))
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-node: ");

    // Reports that name no registered node are refused before their bodies
    // are read: uploads that never end take none of the slots reports are
    // read in, and a real report still goes through.
    let stalled = (0..berth_control_plane::state::REPORT_BODIES + 1).map(|_| {
        let never_ends = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
        let req = cp
            .http
            .post(format!("{}/v1/agent/status", cp.url))
            .header(HEADER_NODE, &stranger.node_id)
            .body(reqwest::Body::wrap_stream(never_ends));
        tokio::time::timeout(Duration::from_secs(10), send(req))
    });
    for r in futures_util::future::join_all(stalled).await {
        r.expect("a stranger's report is answered before its body ends")
            .error(StatusCode::UNAUTHORIZED, "x-berth-node: ");
    }
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        send(cp.signed(&a, Method::POST, "/v1/agent/status", report.clone())),
    )
    .await
    .expect("a node's report is read while strangers' uploads hang");
    assert_eq!(r.status, StatusCode::OK);

    // Replay: the very same signed request, twice.
    let once = cp.signed(&a, Method::GET, pq, vec![]);
    let twice = once.try_clone().unwrap();
    assert_eq!(send(once).await.status, StatusCode::OK);
    send(twice)
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-nonce: replayed");
    let once = cp.signed(&a, Method::POST, "/v1/agent/status", report.clone());
    let twice = once.try_clone().unwrap();
    assert_eq!(send(once).await.status, StatusCode::OK);
    send(twice)
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-nonce: replayed");

    // A well-signed but malformed report names the body.
    send(cp.signed(&a, Method::POST, "/v1/agent/status", b"{}".to_vec()))
        .await
        .error(StatusCode::BAD_REQUEST, "body: ");
}

async fn removed_node_is_refused(db: &Db) {
    let cp = Cp::start(db).await;
    let mut a = Agent::new("alpha");
    let mut b = Agent::new("bravo");
    cp.join(&mut a).await;
    cp.join(&mut b).await;
    assert_eq!(cp.revision().await, 2);

    // A long-poll in flight when its node is removed ends at once.
    let poll = {
        let rb = cp.signed(&a, Method::GET, "/v1/agent/desired?after=2&wait=10", vec![]);
        tokio::spawn(async move {
            let r = Reply::from(rb.send().await.unwrap()).await;
            (r, Instant::now())
        })
    };
    // b's long-poll wakes with a's peer gone.
    let poll_b = {
        let rb = cp.signed(&b, Method::GET, "/v1/agent/desired?after=2&wait=10", vec![]);
        tokio::spawn(async move { Reply::from(rb.send().await.unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished());
    let removed_at = Instant::now();
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/alpha").send().await.unwrap()).await;
    let v: serde_json::Value = r.json();
    assert_eq!(v["removed"], "alpha");
    assert_eq!(v["revision"], 3);
    let (r, at) = poll.await.unwrap();
    assert!(
        at.duration_since(removed_at) < WAKE_BOUND,
        "the removed node's long-poll kept waiting"
    );
    r.error(StatusCode::GONE, "node: ");
    r.coded(StatusCode::GONE, ErrorCode::Gone, Some("node"));
    let d: DesiredState = poll_b.await.unwrap().json();
    assert_eq!(d.revision, 3);
    assert!(d.peers.is_empty(), "{:?}", d.peers);

    // Every later request of the removed node is refused.
    cp.desired(&a, 0, 0)
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-node: ");
    let report = serde_json::to_vec(&StatusReport::default()).unwrap();
    let r = Reply::from(
        cp.signed(&a, Method::POST, "/v1/agent/status", report)
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.error(StatusCode::UNAUTHORIZED, "x-berth-node: ");
    let nodes = cp.nodes().await;
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, "bravo");
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/alpha").send().await.unwrap()).await;
    r.error(StatusCode::NOT_FOUND, "name: ");

    // Its name can be used again, with new keys and a new token.
    let mut again = Agent::new("alpha");
    let reg = cp.join(&mut again).await;
    assert_ne!(reg.node_id, a.node_id);
    assert_eq!(reg.mesh_ip.to_string(), "10.100.0.1", "the freed address is reused");
    cp.desired(&a, 0, 0)
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-node: ");
}

/// Two replicas sharing one PostgreSQL: a change made through one wakes
/// long-polls held by the other (LISTEN/NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_share_postgres_and_wake_each_other() {
    let Some(db) = Db::postgres().await else {
        return;
    };
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = Cp::start_in(dir_a.path(), &db.url, None).await;
    for f in ["ca.pem", "ca.key"] {
        std::fs::copy(dir_a.path().join(f), dir_b.path().join(f)).unwrap();
    }
    let b = Cp::start_in(dir_b.path(), &db.url, Some(&a.admin_token)).await;
    assert_eq!(a.ca_hash(), b.ca_hash(), "both replicas present the same CA");
    assert!(
        !dir_b.path().join("admin.token").exists(),
        "the second replica makes no admin token of its own"
    );
    assert_eq!(
        b.nodes().await.len(),
        0,
        "the first replica's admin token works on the second"
    );

    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener.listen("berth_revision").await.unwrap();

    // A token made on A registers a node through B.
    let mut n1 = Agent::new("one");
    let t1 = a.create_token(false).await;
    let reg: RegisterResponse = b.register_req(&n1, &n1.register_request(&t1.token)).await.json();
    n1.node_id = reg.node_id;
    assert_eq!(a.token_state(&t1.id).await, TokenState::Used);
    let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(note.payload(), "1");
    let d: DesiredState = a.desired(&n1, 0, 5).await.json();
    assert_eq!(d.revision, 1);

    // n1 long-polls replica B; n2 registers through replica A.
    for (round, (poller, writer)) in [(&b, &a), (&a, &b)].into_iter().enumerate() {
        let rev = round as u64 + 1;
        let poll = {
            let rb = poller.signed(
                &n1,
                Method::GET,
                &format!("/v1/agent/desired?after={rev}&wait=20"),
                vec![],
            );
            tokio::spawn(async move {
                let r = Reply::from(rb.send().await.unwrap()).await;
                (r, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!poll.is_finished(), "round {round}: the long-poll must wait");
        let mut n = Agent::new(&format!("joiner-{round}"));
        let changed_at = Instant::now();
        writer.join(&mut n).await;
        let (r, at) = poll.await.unwrap();
        let took = at.duration_since(changed_at);
        assert!(
            took < WAKE_BOUND,
            "round {round}: the other replica's long-poll woke after {took:?} (wait was 20 s)"
        );
        let d: DesiredState = r.json();
        assert_eq!(d.revision, rev + 1);
        assert!(
            d.peers.iter().any(|p| p.node_id == n.node_id),
            "round {round}: {:?}",
            d.peers
        );
        let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(note.payload(), (rev + 1).to_string());
    }

    // Nonces are shared: a request replayed to the other replica is refused.
    let pq = "/v1/agent/desired?after=0&wait=0";
    let h = signing::sign(&n1.key, "GET", pq, b"", now());
    let send = |cp: &Cp| {
        cp.http
            .get(format!("{}{pq}", cp.url))
            .header(HEADER_NODE, &n1.node_id)
            .header(HEADER_TIMESTAMP, &h.timestamp)
            .header(HEADER_NONCE, &h.nonce)
            .header(HEADER_SIGNATURE, &h.signature)
            .send()
    };
    assert_eq!(send(&a).await.unwrap().status(), StatusCode::OK);
    Reply::from(send(&b).await.unwrap())
        .await
        .error(StatusCode::UNAUTHORIZED, "x-berth-nonce: replayed");

    // Both replicas list the same fleet.
    assert_eq!(a.fleet().await, b.fleet().await);
    assert_eq!(a.nodes().await.len(), 3);

    // Status reports move between replicas. A report repeating the one a
    // replica recorded is kept in its memory, and written behind only
    // while the store still holds that report; else the replica forgets
    // it, and the node's next report there is written in full.
    let error = |e: &str| berth_protocol::StatusReport {
        applied_revision: 3,
        error: Some(e.into()),
        ..Default::default()
    };
    let stored_error = |nodes: Vec<NodeInfo>| nodes.into_iter().find(|n| n.node_id == n1.node_id).unwrap().error;
    a.report(&n1, &error("first")).await;
    b.report(&n1, &error("second")).await;
    a.report(&n1, &error("first")).await;
    assert_eq!(
        stored_error(b.nodes().await).as_deref(),
        Some("second"),
        "a repeated report is not written at once"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await; // A's write-behind ran
    a.report(&n1, &error("first")).await;
    assert_eq!(
        stored_error(b.nodes().await).as_deref(),
        Some("first"),
        "A's memory no longer matched the store: the report was written in full"
    );
}
