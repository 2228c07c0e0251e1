//! Builds through the API: the admin creates a build and uploads its
//! context, a node acting as builder claims it (`/v1/agent/builds/next`),
//! fetches the context, posts its log and reports the result; the control
//! plane checks the real docker-registry for the pushed tag before it
//! releases anything. The tests play the builder node with signed requests
//! (and push with real Podman where an image is needed).

#[macro_use]
mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use berth_control_plane::builds::BuildsConfig;
use berth_control_plane::registry::RegistryConfig;
use berth_protocol::build::{BuildInfo, BuildJob, BuildLogAck, BuildState, DEFAULT_TIMEOUT_SECS, MAX_TIMEOUT_SECS};
use berth_protocol::ErrorCode;
use common::podman::{import_one_file_image, podman_in, text};
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Whether the registry binary is here (a skip elsewhere, a failure under CI).
fn have_registry() -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "{REGISTRY_BIN} is missing under CI");
    eprintln!("skipped: {REGISTRY_BIN} is not installed");
    false
}

/// A control plane with the fleet registry on a port of its own, once the
/// registry listens; returns it with the registry's `HOST:PORT`.
async fn start(db: &Db, builds: BuildsConfig) -> (Cp, String) {
    let port = free_port();
    let cp = Cp::start_with_builds(
        db,
        RegistryConfig {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            binary: REGISTRY_BIN.into(),
            storage_config: None,
            retention: 10,
            prune_every: None,
        },
        builds,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "the registry never listened on port {port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (cp, format!("127.0.0.1:{port}"))
}

/// A build request for service `name` (no replicas: a release needs no node).
fn request(name: &str) -> Value {
    json!({
        "spec": {"name": name, "image": "", "replicas": 0, "port": 8080},
        "dockerfile": "Dockerfile",
    })
}

async fn create(cp: &Cp, req: &Value) -> Reply {
    Reply::from(cp.admin(Method::POST, "/v1/builds").json(req).send().await.unwrap()).await
}

/// Creates a build that a builder is (about to be) ready for: a long-poll
/// just started may not have reached the control plane yet, and a refusal
/// stores nothing, so a 503 is tried again for a while.
async fn create_ready(cp: &Cp, req: &Value) -> BuildInfo {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = create(cp, req).await;
        if r.status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        return r.json();
    }
}

async fn list(cp: &Cp) -> Vec<BuildInfo> {
    Reply::from(cp.admin(Method::GET, "/v1/builds").send().await.unwrap())
        .await
        .json()
}

async fn show(cp: &Cp, id: u64) -> BuildInfo {
    Reply::from(cp.admin(Method::GET, &format!("/v1/builds/{id}")).send().await.unwrap())
        .await
        .json()
}

/// The upload is sent on a connection of its own (`Connection: close`): a
/// refused upload is answered before its body is read, without telling the
/// client the connection is done, so a pooled connection would be reused
/// after the server dropped it (the next request then fails).
async fn upload(cp: &Cp, id: u64, body: impl Into<reqwest::Body>) -> Reply {
    Reply::from(
        cp.admin(Method::PUT, &format!("/v1/builds/{id}/context"))
            .header("content-type", "application/x-tar")
            .header("connection", "close")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn cancel(cp: &Cp, id: u64) -> Reply {
    Reply::from(
        cp.admin(Method::POST, &format!("/v1/builds/{id}/cancel"))
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn logs(cp: &Cp, id: u64) -> String {
    let r = Reply::from(
        cp.admin(Method::GET, &format!("/v1/builds/{id}/logs"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.body
}

/// A signed request of `agent`, answered.
async fn agent(cp: &Cp, agent: &Agent, method: Method, path: &str, body: Vec<u8>) -> Reply {
    Reply::from(cp.signed(agent, method, path, body).send().await.unwrap()).await
}

/// `agent`'s long-poll for a build of `arch`, running on its own.
fn poll(cp: &Cp, agent: &Agent, arch: &str, wait: u64) -> tokio::task::JoinHandle<Reply> {
    let req = cp.signed(
        agent,
        Method::GET,
        &format!("/v1/agent/builds/next?arch={arch}&wait={wait}"),
        vec![],
    );
    tokio::spawn(async move { Reply::from(req.send().await.unwrap()).await })
}

/// One look for work that does not wait: the node counts as a ready
/// builder of `arch` afterwards. Nothing must be queued for it.
async fn ready(cp: &Cp, a: &Agent, arch: &str) {
    let r = agent(
        cp,
        a,
        Method::GET,
        &format!("/v1/agent/builds/next?arch={arch}&wait=0"),
        vec![],
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
}

/// The job of a long-poll that must have found one.
async fn job(poll: tokio::task::JoinHandle<Reply>) -> BuildJob {
    let r = tokio::time::timeout(Duration::from_secs(30), poll)
        .await
        .expect("the long-poll never answered")
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    r.json()
}

async fn log(cp: &Cp, a: &Agent, id: u64, chunk: &[u8]) -> BuildLogAck {
    agent(
        cp,
        a,
        Method::POST,
        &format!("/v1/agent/builds/{id}/log"),
        chunk.to_vec(),
    )
    .await
    .json()
}

async fn done(cp: &Cp, a: &Agent, id: u64, error: Option<&str>) -> BuildInfo {
    let body = serde_json::to_vec(&json!({ "error": error })).unwrap();
    agent(cp, a, Method::POST, &format!("/v1/agent/builds/{id}/done"), body)
        .await
        .json()
}

/// A registered worker node.
async fn worker(cp: &Cp, name: &str) -> Agent {
    let mut a = Agent::new(name);
    cp.join(&mut a).await;
    a
}

/// A real (small) tar of a context: a Dockerfile and a file it copies.
fn context_tar() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY hello /hello\n").unwrap();
    std::fs::write(dir.path().join("hello"), "hello from a build context\n").unwrap();
    let out = Command::new("tar")
        .arg("-C")
        .arg(dir.path())
        .args(["-cf", "-", "Dockerfile", "hello"])
        .output()
        .expect("run tar");
    assert!(out.status.success(), "tar: {}", text(&out));
    assert!(!out.stdout.is_empty());
    out.stdout
}

/// What the registry's token endpoint answers these Basic credentials.
async fn registry_token(cp: &Cp, user: &str, password: &str, scope: &str) -> Reply {
    Reply::from(
        cp.http
            .get(format!(
                "{}/v1/registry/token?service=berth-registry&scope={scope}",
                cp.url
            ))
            .header(
                "authorization",
                format!("Basic {}", STANDARD.encode(format!("{user}:{password}"))),
            )
            .send()
            .await
            .unwrap(),
    )
    .await
}

/// The `access` claim of a registry token (not verified: the registry does that).
fn access_of(r: &Reply) -> Value {
    let v: Value = r.json();
    let jwt = v["token"].as_str().unwrap();
    let claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap();
    claims["access"].clone()
}

on_both_stores!(
    without_a_registry_there_are_no_builds,
    a_build_request_is_validated_before_anything_is_stored,
    a_build_needs_a_ready_builder_of_its_architecture,
    a_builder_claims_fetches_logs_and_is_cancelled,
    an_oversized_context_is_refused_and_fails_the_build,
    a_build_is_released_only_once_its_image_is_in_the_registry,
    a_git_credential_is_kept_sealed_and_reaches_only_the_builder,
    a_multi_platform_build_is_built_per_architecture_and_released_as_one_list,
);

async fn without_a_registry_there_are_no_builds(db: &Db) {
    // Nowhere to push: refused, naming it, whoever asks for work.
    let cp = Cp::start(db).await;
    let r = create(&cp, &request("web")).await;
    r.coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("registry"));
    assert_eq!(list(&cp).await, vec![]);
    let n1 = worker(&cp, "n1").await;
    let r = agent(&cp, &n1, Method::GET, "/v1/agent/builds/next?arch=amd64&wait=0", vec![]).await;
    r.coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("registry"));
    let r = create(&cp, &request("web")).await;
    r.coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("registry"));
}

async fn a_build_request_is_validated_before_anything_is_stored(db: &Db) {
    if !have_registry() {
        return;
    }
    let (cp, _host) = start(db, BuildsConfig::default()).await;
    // Refusals are about the request, whether or not a builder is ready.
    let mut cases: Vec<(Value, &str)> = vec![];
    let mut with = |edit: &dyn Fn(&mut Value), field: &'static str| {
        let mut req = request("web");
        edit(&mut req);
        cases.push((req, field));
    };
    with(&|r| r["spec"]["image"] = json!("busybox:latest"), "spec.image");
    for bad in ["", "/abs/Dockerfile", "../x", "sub/../../Dockerfile", "a\0b"] {
        with(&move |r| r["dockerfile"] = json!(bad), "dockerfile");
    }
    for bad in ["BAD-NAME", "", "a b", "é"] {
        with(&move |r| r["build_args"] = json!({ bad: "1" }), "build_args");
    }
    for bad in ["", "bad stage", "stage/1"] {
        with(&move |r| r["target"] = json!(bad), "target");
    }
    for bad in [0, MAX_TIMEOUT_SECS + 1] {
        with(&move |r| r["timeout_secs"] = json!(bad), "timeout_secs");
    }
    for bad in ["", "../x", "x86-64"] {
        with(&move |r| r["arch"] = json!(bad), "arch");
    }
    with(&|r| r["git"] = json!({"url": "example.com/a.git"}), "git.url");
    with(
        &|r| r["git"] = json!({"url": "https://x/a", "ref": "--upload-pack=sh"}),
        "git.ref",
    );
    with(
        &|r| r["git"] = json!({"url": "https://x/a", "context": "../up"}),
        "git.context",
    );
    // Not JSON of a build request at all.
    with(&|r| r["surprise"] = json!(true), "body");
    for (req, field) in &cases {
        let r = create(&cp, req).await;
        r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some(field));
    }
    // The service spec is validated as it will be deployed: some field is named.
    let mut req = request("web");
    req["spec"]["name"] = json!("Not A Name");
    let r = create(&cp, &req).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    let err: berth_protocol::ApiError = serde_json::from_str(&r.body).unwrap();
    assert_eq!(err.code, ErrorCode::InvalidField, "{}", r.body);
    assert!(err.field.is_some(), "no field named: {}", r.body);

    // The admin only.
    let r = Reply::from(
        cp.http
            .post(format!("{}/v1/builds", cp.url))
            .json(&request("web"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));

    // Nothing was stored; there is no build 1 to show, upload, follow or cancel.
    assert_eq!(list(&cp).await, vec![]);
    let r = Reply::from(cp.admin(Method::GET, "/v1/builds/1").send().await.unwrap()).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("id"));
    let r = upload(&cp, 1, context_tar()).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("id"));
    let r = Reply::from(cp.admin(Method::GET, "/v1/builds/1/logs").send().await.unwrap()).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("id"));
    cancel(&cp, 1)
        .await
        .coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("id"));
    assert_eq!(list(&cp).await, vec![]);
}

async fn a_build_needs_a_ready_builder_of_its_architecture(db: &Db) {
    if !have_registry() {
        return;
    }
    let (cp, _host) = start(db, BuildsConfig::default()).await;
    // No node asks for work: nobody could build it.
    let r = create(&cp, &request("web")).await;
    r.coded(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NoBuilder, Some("builder"));
    assert_eq!(list(&cp).await, vec![], "a refused build was stored");

    // Who may ask: a signed worker, with an architecture's name.
    let arm = worker(&cp, "arm").await;
    let r = Reply::from(
        cp.http
            .get(format!("{}/v1/agent/builds/next?arch=amd64&wait=0", cp.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    for bad in ["", "x86-64", "amd64%2F1"] {
        let r = agent(
            &cp,
            &arm,
            Method::GET,
            &format!("/v1/agent/builds/next?arch={bad}&wait=0"),
            vec![],
        )
        .await;
        r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("arch"));
    }
    let edge = cp.join_sealed("edge", true).await;
    let r = agent(
        &cp,
        &edge.agent,
        Method::GET,
        "/v1/agent/builds/next?arch=amd64&wait=0",
        vec![],
    )
    .await;
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("role"));
    // Neither the refused asks nor a proxy made anyone a builder.
    let r = create(&cp, &request("web")).await;
    r.coded(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NoBuilder, Some("builder"));

    // An arm64 builder only: an amd64 build is refused, one that names no
    // architecture goes to arm64.
    ready(&cp, &arm, "arm64").await;
    let mut amd = request("web");
    amd["arch"] = json!("amd64");
    create(&cp, &amd)
        .await
        .coded(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NoBuilder, Some("builder"));
    let r = create(&cp, &request("web")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let b: BuildInfo = r.json();
    assert_eq!(list(&cp).await.len(), 1);
    let r = upload(&cp, b.id, context_tar()).await;
    assert_eq!(r.json::<BuildInfo>().state, BuildState::Queued);
    // An amd64 builder is not given it; the arm64 one is.
    let x86 = worker(&cp, "x86").await;
    let r = tokio::time::timeout(Duration::from_secs(10), poll(&cp, &x86, "amd64", 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let j = job(poll(&cp, &arm, "arm64", 5)).await;
    assert_eq!(j.id, b.id);
    let b = show(&cp, b.id).await;
    assert_eq!((b.state, b.node.as_deref()), (BuildState::Running, Some("arm")));
}

async fn a_builder_claims_fetches_logs_and_is_cancelled(db: &Db) {
    if !have_registry() {
        return;
    }
    let (cp, host) = start(db, BuildsConfig::default()).await;
    let n1 = worker(&cp, "n1").await;
    let n2 = worker(&cp, "n2").await;

    // n1 waits for work, as a builder does.
    let waiting = poll(&cp, &n1, "amd64", 30);
    let mut req = request("web");
    req["build_args"] = json!({"VERSION": "1.2", "_x9": ""});
    req["target"] = json!("final-stage.1");
    req["timeout_secs"] = json!(600);
    let b = create_ready(&cp, &req).await;
    assert_eq!(b.service, "web");
    assert_eq!(b.state, BuildState::Uploading);
    assert_eq!(b.dockerfile, "Dockerfile");
    assert_eq!(b.created_by, "admin");
    assert_eq!(b.timeout_secs, 600);
    assert_eq!(
        (
            &b.node,
            b.context_bytes,
            &b.image,
            b.release,
            &b.error,
            b.started_at,
            b.finished_at
        ),
        (&None, None, &None, None, &None, None, None),
        "{b:?}"
    );
    assert_eq!(list(&cp).await, vec![b.clone()]);
    assert_eq!(show(&cp, b.id).await, b);
    let id = b.id;
    // Not claimed yet: it is no node's build.
    let r = agent(&cp, &n1, Method::GET, &format!("/v1/agent/builds/{id}/context"), vec![]).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("id"));

    // The context: queued once whole, and n1 (woken) claims it.
    let tar = context_tar();
    let r = upload(&cp, id, tar.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let up: BuildInfo = r.json();
    assert!(matches!(up.state, BuildState::Queued | BuildState::Running), "{up:?}");
    assert_eq!(up.context_bytes, Some(tar.len() as u64));
    let j = job(waiting).await;
    assert_eq!(j.id, id);
    assert_eq!(j.tag, format!("{host}/web:build-{id}"));
    assert_eq!(j.dockerfile, "Dockerfile");
    assert_eq!(j.target.as_deref(), Some("final-stage.1"));
    assert_eq!(
        j.build_args,
        std::collections::BTreeMap::from([
            ("VERSION".to_string(), "1.2".to_string()),
            ("_x9".to_string(), String::new())
        ])
    );
    assert_eq!(j.timeout_secs, 600);
    assert_eq!(j.registry.host, host);
    assert_eq!(j.registry.username, format!("build.{id}"));
    assert!(!j.registry.password.is_empty());
    let b = show(&cp, id).await;
    assert_eq!(b.state, BuildState::Running);
    assert_eq!(b.node.as_deref(), Some("n1"));
    assert!(b.started_at.is_some() && b.finished_at.is_none(), "{b:?}");
    // Uploaded already: a second upload is refused.
    upload(&cp, id, tar.clone())
        .await
        .coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("id"));
    // Nothing else is queued: another look for work finds none.
    let r = agent(&cp, &n2, Method::GET, "/v1/agent/builds/next?arch=amd64&wait=0", vec![]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);

    // The job's credentials: push and pull on the service's repository,
    // pull only on the others.
    let (user, password) = (&j.registry.username, &j.registry.password);
    let t = registry_token(&cp, user, password, "repository:web:pull,push").await;
    assert_eq!(
        access_of(&t),
        json!([{"type": "repository", "name": "web", "actions": ["pull", "push"]}])
    );
    let t = registry_token(&cp, user, password, "repository:other:pull,push").await;
    assert_eq!(
        access_of(&t),
        json!([{"type": "repository", "name": "other", "actions": ["pull"]}])
    );
    registry_token(&cp, user, "00ff", "repository:web:pull").await.coded(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        Some("authorization"),
    );

    // The context is exactly what was uploaded.
    let resp = cp
        .signed(&n1, Method::GET, &format!("/v1/agent/builds/{id}/context"), vec![])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-tar");
    assert_eq!(resp.bytes().await.unwrap().to_vec(), tar);

    // Another node is told there is no such build, whatever it asks.
    for (method, path, body) in [
        (Method::GET, "context", vec![]),
        (Method::POST, "log", b"intruder\n".to_vec()),
        (Method::POST, "done", br#"{"error":null}"#.to_vec()),
    ] {
        let r = agent(&cp, &n2, method, &format!("/v1/agent/builds/{id}/{path}"), body).await;
        r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("id"));
    }
    assert_eq!(show(&cp, id).await.state, BuildState::Running);

    // The log: appended as posted, followed until the build ends.
    let follow = {
        let req = cp.admin(Method::GET, &format!("/v1/builds/{id}/logs?follow=true"));
        tokio::spawn(async move { Reply::from(req.send().await.unwrap()).await })
    };
    let first = b"STEP 1/2: FROM scratch\n";
    let second = b"STEP 2/2: COPY hello /hello\n\xe2\x9c\x93\n";
    assert_eq!(log(&cp, &n1, id, first).await, BuildLogAck { stop: false });
    assert_eq!(log(&cp, &n1, id, second).await, BuildLogAck { stop: false });
    let both = format!("{}{}", String::from_utf8_lossy(first), String::from_utf8_lossy(second));
    let text = logs(&cp, id).await;
    assert!(text.ends_with(&both), "{text:?}");
    assert!(!text.contains("intruder"), "{text:?}");
    assert!(!follow.is_finished(), "the follower left a running build");

    // Cancelled: final, and the builder is told to stop.
    let r = cancel(&cp, id).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let b: BuildInfo = r.json();
    assert_eq!(b.state, BuildState::Cancelled);
    assert!(b.error.is_some() && b.finished_at.is_some(), "{b:?}");
    assert_eq!(show(&cp, id).await, b);
    let followed = tokio::time::timeout(Duration::from_secs(15), follow)
        .await
        .expect("the log follower did not end with the build")
        .unwrap();
    assert_eq!(followed.status, StatusCode::OK, "{}", followed.body);
    assert!(followed.body.contains(&both), "{:?}", followed.body);
    assert_eq!(log(&cp, &n1, id, b"too late\n").await, BuildLogAck { stop: true });
    assert!(!logs(&cp, id).await.contains("too late"));
    let r = agent(&cp, &n1, Method::GET, &format!("/v1/agent/builds/{id}/context"), vec![]).await;
    r.coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("id"));
    // Its credentials died with it.
    registry_token(&cp, user, password, "repository:web:pull").await.coded(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        Some("authorization"),
    );
    // A late report changes nothing; nor does a second cancel.
    assert_eq!(done(&cp, &n1, id, None).await, b);
    cancel(&cp, id)
        .await
        .coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("id"));
    assert_eq!(show(&cp, id).await, b);
    let r = Reply::from(cp.admin(Method::GET, "/v1/services/web").send().await.unwrap()).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "a cancelled build deployed: {}",
        r.body
    );
}

async fn an_oversized_context_is_refused_and_fails_the_build(db: &Db) {
    if !have_registry() {
        return;
    }
    const LIMIT: u64 = 4096;
    let (cp, _host) = start(
        db,
        BuildsConfig {
            max_context_bytes: LIMIT,
        },
    )
    .await;
    let n1 = worker(&cp, "n1").await;
    ready(&cp, &n1, "amd64").await;

    // Declared too large (Content-Length): refused before reading it.
    let b = create_ready(&cp, &request("web")).await;
    let r = upload(&cp, b.id, vec![7u8; LIMIT as usize + 1]).await;
    r.coded(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BodyTooLarge, Some("body"));
    let failed = show(&cp, b.id).await;
    assert_eq!(failed.state, BuildState::Failed, "{failed:?}");
    assert!(failed.error.is_some() && failed.finished_at.is_some(), "{failed:?}");
    assert_eq!(failed.context_bytes, None);
    // Over: no second try, no cancel.
    upload(&cp, b.id, vec![1u8; 10])
        .await
        .coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("id"));
    cancel(&cp, b.id)
        .await
        .coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("id"));

    // Streamed with no length: refused once past the limit.
    let b = create_ready(&cp, &request("web")).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..8).map(|_| Ok(vec![9u8; 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let r = upload(&cp, b.id, body).await;
    r.coded(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::BodyTooLarge, Some("body"));
    assert_eq!(show(&cp, b.id).await.state, BuildState::Failed);

    // Nothing of them is handed to a builder.
    ready(&cp, &n1, "amd64").await;

    // Exactly the limit is accepted, streamed or not.
    let b = create_ready(&cp, &request("web")).await;
    let r = upload(&cp, b.id, vec![3u8; LIMIT as usize]).await;
    let b = r.json::<BuildInfo>();
    assert_eq!((b.state, b.context_bytes), (BuildState::Queued, Some(LIMIT)));
    let c = create_ready(&cp, &request("web")).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..4).map(|_| Ok(vec![4u8; 1024])).collect();
    let r = upload(
        &cp,
        c.id,
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
    )
    .await;
    let c = r.json::<BuildInfo>();
    assert_eq!((c.state, c.context_bytes), (BuildState::Queued, Some(LIMIT)));
    let states: Vec<BuildState> = list(&cp).await.into_iter().map(|b| b.state).collect();
    assert_eq!(
        states,
        [
            BuildState::Queued,
            BuildState::Queued,
            BuildState::Failed,
            BuildState::Failed
        ],
        "newest first"
    );
}

fn have_podman() -> bool {
    if Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "podman is missing under CI");
    eprintln!("skipped (the push): podman is not installed");
    false
}

async fn a_build_is_released_only_once_its_image_is_in_the_registry(db: &Db) {
    if !have_registry() {
        return;
    }
    let (cp, host) = start(db, BuildsConfig::default()).await;
    let n1 = worker(&cp, "n1").await;
    let n2 = worker(&cp, "n2").await;
    ready(&cp, &n1, "amd64").await;

    // Claimed by n1; returns its job.
    let claimed = |req: Value| {
        let cp = &cp;
        let n1 = &n1;
        async move {
            let b = create_ready(cp, &req).await;
            assert_eq!(b.timeout_secs, DEFAULT_TIMEOUT_SECS);
            let r = upload(cp, b.id, context_tar()).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            let j = job(poll(cp, n1, "amd64", 10)).await;
            assert_eq!(j.id, b.id);
            j
        }
    };

    // "Success" with nothing pushed: the registry has no such tag, so the
    // build failed and nothing was released.
    let j = claimed(request("web")).await;
    let b = done(&cp, &n1, j.id, None).await;
    assert_eq!(b.state, BuildState::Failed, "{b:?}");
    assert!(b.error.is_some() && b.finished_at.is_some(), "{b:?}");
    assert_eq!((&b.image, b.release), (&None, None));
    assert_eq!(show(&cp, j.id).await, b);
    assert_eq!(log(&cp, &n1, j.id, b"more\n").await, BuildLogAck { stop: true });
    let r = Reply::from(cp.admin(Method::GET, "/v1/services/web").send().await.unwrap()).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("name"));

    // A failure the builder reports is kept as it said it.
    let j = claimed(request("web")).await;
    let b = done(&cp, &n1, j.id, Some("STEP 2/2: exit status 1")).await;
    assert_eq!(b.state, BuildState::Failed);
    assert_eq!(b.error.as_deref(), Some("STEP 2/2: exit status 1"));
    assert_eq!((&b.image, b.release), (&None, None));
    // A report must be one.
    let j = claimed(request("web")).await;
    for bad in [&b"not json"[..], br#"{"error": null, "extra": 1}"#] {
        let r = agent(
            &cp,
            &n1,
            Method::POST,
            &format!("/v1/agent/builds/{}/done", j.id),
            bad.to_vec(),
        )
        .await;
        r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("body"));
    }
    assert_eq!(show(&cp, j.id).await.state, BuildState::Running);
    cancel(&cp, j.id).await.json::<BuildInfo>();

    if !have_podman() {
        return;
    }
    // A real push with the job's credentials, then done: released by digest.
    let mut req = request("web");
    req["spec"]["env"] = json!({"GREETING": "hi"});
    let j = claimed(req).await;
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&cp.started.ca_file, certs.join("ca.crt")).unwrap();
    let store = work.path().join("store");
    import_one_file_image(
        &store,
        work.path(),
        "localhost/built:1",
        "hello",
        &format!("built by build {}\n", j.id),
    );
    let creds = format!("{}:{}", j.registry.username, j.registry.password);
    let push = |to: &str| {
        podman_in(&store)
            .args(["push", "--quiet", "--cert-dir"])
            .arg(&certs)
            .args(["--creds", &creds, "localhost/built:1", to])
            .output()
            .unwrap()
    };
    // Not to another service's repository...
    let out = push(&format!("{host}/other:build-{}", j.id));
    assert!(
        !out.status.success(),
        "a build pushed to another repository: {}",
        text(&out)
    );
    // ...but to its own tag.
    let out = push(&j.tag);
    assert!(out.status.success(), "the build's push failed: {}", text(&out));
    // A node that did not claim it cannot report it.
    let r = agent(
        &cp,
        &n2,
        Method::POST,
        &format!("/v1/agent/builds/{}/done", j.id),
        br#"{"error":null}"#.to_vec(),
    )
    .await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("id"));
    let b = done(&cp, &n1, j.id, None).await;
    assert_eq!(b.state, BuildState::Succeeded, "{b:?}");
    assert_eq!(b.error, None);
    let image = b.image.clone().expect("a succeeded build names its image");
    let digest = image
        .strip_prefix(&format!("{host}/web@"))
        .unwrap_or_else(|| panic!("not pinned to a digest: {image}"));
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{image}");
    assert_eq!(b.release, Some(1));
    assert_eq!(show(&cp, j.id).await, b);
    // The service runs that digest, with the spec the build was given.
    let svc = show_service(&cp, "web").await;
    assert_eq!(svc.spec.image, image);
    assert_eq!(svc.spec.env.get("GREETING").map(String::as_str), Some("hi"));
    let rels = releases_of(&cp, "web").await;
    assert_eq!(rels.len(), 1, "{rels:?}");
    assert_eq!((rels[0].number, rels[0].spec.image.as_str()), (1, image.as_str()));
    // Tagged web:1 (SERVICE:RELEASE) as well as web:build-ID, one digest.
    let images: Vec<berth_protocol::api::ImageInfo> =
        Reply::from(cp.admin(Method::GET, "/v1/images?service=web").send().await.unwrap())
            .await
            .json();
    let mut tags: Vec<(&str, &str)> = images.iter().map(|i| (i.tag.as_str(), i.digest.as_str())).collect();
    tags.sort();
    let build_tag = format!("build-{}", j.id);
    assert_eq!(tags, [("1", digest), (build_tag.as_str(), digest)], "{images:?}");
    // Over: its credentials are dead, a repeated report changes nothing.
    registry_token(&cp, &j.registry.username, &j.registry.password, "repository:web:pull")
        .await
        .coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    assert_eq!(done(&cp, &n1, j.id, None).await, b);
    assert_eq!(releases_of(&cp, "web").await.len(), 1);
    assert_eq!(log(&cp, &n1, j.id, b"after\n").await, BuildLogAck { stop: true });
    // A rollback to it is release 2, tagged web:2 with the same digest.
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services/web/rollback")
            .json(&json!({"to": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let images: Vec<berth_protocol::api::ImageInfo> =
        Reply::from(cp.admin(Method::GET, "/v1/images?service=web").send().await.unwrap())
            .await
            .json();
    assert!(images.iter().any(|i| i.tag == "2" && i.digest == digest), "{images:?}");
    let states: Vec<BuildState> = list(&cp).await.into_iter().map(|b| b.state).collect();
    assert_eq!(
        states,
        [
            BuildState::Succeeded,
            BuildState::Cancelled,
            BuildState::Failed,
            BuildState::Failed
        ]
    );
}

/// HMAC-SHA256 of `body` under `secret`, as GitHub signs a delivery.
fn hub_signature(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(ring::hmac::sign(&key, body).as_ref()))
}

async fn a_git_credential_is_kept_sealed_and_reaches_only_the_builder(db: &Db) {
    if !have_registry() {
        return;
    }
    let (cp, _host) = start(db, BuildsConfig::default()).await;
    let n1 = cp.join_sealed("n1", false).await;
    let opened = |sealed: &Option<String>| {
        let sealed = sealed.as_deref().expect("the job has a sealed credential");
        String::from_utf8(berth_protocol::seal::open(&n1.seal, sealed).unwrap()).unwrap()
    };
    let token = "ghp_tokenthatmustnotleak42";
    let git_request = |git: Value| {
        let mut req = request("web");
        req["dockerfile"] = json!("");
        req["git"] = git;
        req
    };

    // Refused before anything is stored, naming the field.
    for (git, field) in [
        (
            json!({"url": "https://h/app.git", "credential_sealed": "AAAA"}),
            "git.credential_sealed",
        ),
        (json!({"url": "git://h/app.git", "credential": token}), "git.credential"),
        (json!({"url": format!("https://ci:{token}@h/app.git")}), "git.url"),
        (
            json!({"url": "https://h/app.git", "known_hosts": "h ssh-ed25519 AAAA"}),
            "git.known_hosts",
        ),
    ] {
        let r = create(&cp, &git_request(git)).await;
        r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some(field));
        assert!(!r.body.contains(token), "{}", r.body);
    }
    assert_eq!(list(&cp).await, vec![]);

    // A token: never shown, stored sealed, opened by the builder only.
    ready(&cp, &n1.agent, "amd64").await;
    let waiting = poll(&cp, &n1.agent, "amd64", 30);
    let b = create_ready(
        &cp,
        &git_request(json!({"url": "https://h/app.git", "ref": "main", "credential": format!("{token}\n")})),
    )
    .await;
    let j = job(waiting).await;
    assert_eq!(j.id, b.id);
    let g = j.git.clone().unwrap();
    assert_eq!((g.credential, opened(&g.credential_sealed)), (None, token.to_string()));
    let shown = Reply::from(cp.admin(Method::GET, "/v1/builds").send().await.unwrap()).await;
    assert!(
        !shown.body.contains(token) && !shown.body.contains("credential"),
        "{}",
        shown.body
    );
    let stored = cp.store().get_build(b.id).await.unwrap().unwrap();
    let json = serde_json::to_string(&stored.request).unwrap();
    assert!(!json.contains(token) && json.contains("credential_sealed"), "{json}");
    done(&cp, &n1.agent, j.id, Some("stop here")).await;

    // A link with a deploy key: a push builds with it.
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services")
            .json(&json!({"name": "web", "image": "localhost/web:1", "replicas": 0}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(r.status.is_success(), "{}", r.body);
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END OPENSSH PRIVATE KEY-----\n";
    let hosts = "[git.example]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA\n";
    let url = "ssh://git@git.example:2222/org/web.git";
    let link = |body: Value| cp.admin(Method::PUT, "/v1/services/web/link").json(&body).send();
    let r = Reply::from(
        link(json!({"url": url, "branch": "main", "credential": "token"}))
            .await
            .unwrap(),
    )
    .await;
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("credential"));
    let r = Reply::from(
        link(json!({"url": url, "branch": "main", "credential": key, "known_hosts": hosts}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(!r.body.contains("c2VjcmV0"), "{}", r.body);
    let made: berth_protocol::build::GitLinkInfo = r.json();
    assert!(made.has_credential);
    assert_eq!(made.link.known_hosts.as_deref(), Some(hosts));
    let shown = Reply::from(cp.admin(Method::GET, "/v1/services/web/link").send().await.unwrap()).await;
    assert!(!shown.body.contains("c2VjcmV0"), "{}", shown.body);
    assert!(shown.json::<berth_protocol::build::GitLinkInfo>().has_credential);

    let waiting = poll(&cp, &n1.agent, "amd64", 30);
    let commit = "c".repeat(40);
    let push = serde_json::to_vec(&json!({
        "ref": "refs/heads/main",
        "after": commit,
        "repository": {"ssh_url": url},
    }))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = Reply::from(
            cp.http
                .post(format!("{}/v1/hooks/github", cp.url))
                .header("x-github-event", "push")
                .header(
                    "x-hub-signature-256",
                    hub_signature(made.secret.as_deref().unwrap(), &push),
                )
                .body(push.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        // The long-poll may not have made n1 a ready builder yet.
        if r.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let j = job(waiting).await;
    let g = j.git.clone().unwrap();
    assert_eq!(g.reference.as_deref(), Some(commit.as_str()));
    assert_eq!(opened(&g.credential_sealed), key.trim());
    assert_eq!(g.known_hosts.as_deref(), Some(hosts));
}

/// A multi-platform build. This machine has amd64 only: the arm64 builder
/// is played by a second signed node asking with `arch=arm64` (as every
/// builder in this file is played), and both platforms' pushes are the
/// same real image; the control plane's side (parts, claims, logs, the
/// manifest list in the real registry, the release) is what is tested.
async fn a_multi_platform_build_is_built_per_architecture_and_released_as_one_list(db: &Db) {
    if !have_registry() || !have_podman() {
        return;
    }
    let (cp, host) = start(db, BuildsConfig::default()).await;
    let amd = worker(&cp, "n1").await;
    let arm = worker(&cp, "n2").await;
    let multi = |platforms: Value| {
        let mut req = request("web");
        req["platforms"] = platforms;
        req
    };
    let two = json!(["linux/amd64", "linux/arm64"]);

    // Refused before anything is stored.
    let mut both = multi(two.clone());
    both["arch"] = json!("amd64");
    for (req, field) in [
        (both, "platforms"),
        (multi(json!(["linux/amd64", "linux/amd64"])), "platforms"),
        (multi(json!(["windows/amd64"])), "platforms"),
    ] {
        create(&cp, &req)
            .await
            .coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some(field));
    }
    ready(&cp, &amd, "amd64").await;
    let r = create(&cp, &multi(two.clone())).await;
    r.coded(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::NoBuilder, Some("builder"));
    assert!(r.body.contains("no arm64 builder"), "{}", r.body);
    assert_eq!(list(&cp).await, vec![]);
    ready(&cp, &arm, "arm64").await;

    // The build and a part per platform; the context goes to the build.
    let b = create_ready(&cp, &multi(two.clone())).await;
    assert_eq!(b.platforms, ["linux/amd64", "linux/arm64"]);
    let parts: Vec<BuildInfo> = list(&cp).await.into_iter().filter(|p| p.parent == Some(b.id)).collect();
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert_eq!(
        parts.iter().map(|p| p.platforms[0].as_str()).collect::<Vec<_>>(),
        ["linux/arm64", "linux/amd64"]
    );
    let r = upload(&cp, parts[0].id, context_tar()).await;
    r.coded(StatusCode::CONFLICT, ErrorCode::Conflict, Some("id"));
    let tar = context_tar();
    let r = upload(&cp, b.id, tar.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let ja = job(poll(&cp, &amd, "amd64", 10)).await;
    let jr = job(poll(&cp, &arm, "arm64", 10)).await;
    assert_eq!(
        (ja.platform.as_deref(), jr.platform.as_deref()),
        (Some("linux/amd64"), Some("linux/arm64"))
    );
    assert_eq!(ja.tag, format!("{host}/web:build-{}", ja.id));
    assert_eq!(show(&cp, b.id).await.state, BuildState::Running);
    // Each builder fetches the build's context.
    let r = agent(
        &cp,
        &arm,
        Method::GET,
        &format!("/v1/agent/builds/{}/context", jr.id),
        vec![],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (StatusCode::OK, tar.len()));
    // Their logs meet in the build's, each line marked with its platform.
    log(&cp, &arm, jr.id, b"STEP 1/2: FROM scr").await;
    log(&cp, &amd, ja.id, b"STEP 1/2\n").await;
    log(&cp, &arm, jr.id, b"atch\nSTEP 2/2\n").await;
    let merged = logs(&cp, b.id).await;
    for line in [
        "[linux/arm64] STEP 1/2: FROM scratch\n",
        "[linux/amd64] STEP 1/2\n",
        "[linux/arm64] STEP 2/2\n",
    ] {
        assert!(merged.contains(line), "{line:?} not in:\n{merged}");
    }

    // Both push (the same real image, as each builder would its own).
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&cp.started.ca_file, certs.join("ca.crt")).unwrap();
    let store = work.path().join("store");
    import_one_file_image(&store, work.path(), "localhost/built:1", "hello", "multi\n");
    for j in [&ja, &jr] {
        let creds = format!("{}:{}", j.registry.username, j.registry.password);
        let out = podman_in(&store)
            .args(["push", "--quiet", "--cert-dir"])
            .arg(&certs)
            .args(["--creds", &creds, "localhost/built:1", &j.tag])
            .output()
            .unwrap();
        assert!(out.status.success(), "push: {}", text(&out));
    }
    // One platform done: that part succeeded, the build still runs.
    let pa = done(&cp, &amd, ja.id, None).await;
    assert_eq!((pa.state, pa.release), (BuildState::Succeeded, None), "{pa:?}");
    assert_eq!(show(&cp, b.id).await.state, BuildState::Running);
    let pr = done(&cp, &arm, jr.id, None).await;
    assert_eq!(pr.state, BuildState::Succeeded, "{pr:?}");
    let whole = show(&cp, b.id).await;
    assert_eq!(
        (whole.state, whole.release),
        (BuildState::Succeeded, Some(1)),
        "{whole:?}"
    );
    let image = whole.image.clone().unwrap();
    assert_eq!(show_service(&cp, "web").await.spec.image, image);

    // The release runs a manifest list of both platforms' manifests.
    let digest = image.strip_prefix(&format!("{host}/web@")).unwrap();
    let token: Value = registry_token(&cp, "admin", &cp.admin_token, "repository:web:pull")
        .await
        .json();
    let r = Reply::from(
        cp.http
            .get(format!("https://{host}/v2/web/manifests/{digest}"))
            .bearer_auth(token["token"].as_str().unwrap())
            .header(
                "accept",
                "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json",
            )
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let list: Value = r.json();
    let entries: Vec<(String, String)> = list["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"].as_str().unwrap().to_string(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let part_digest = |p: &BuildInfo| p.image.as_deref().unwrap().rsplit_once('@').unwrap().1.to_string();
    // In the order the platforms were asked for.
    assert_eq!(
        entries,
        [
            ("amd64".to_string(), part_digest(&pa)),
            ("arm64".to_string(), part_digest(&pr))
        ]
    );

    // A platform that fails fails the build and cancels the other.
    let b = create_ready(&cp, &multi(two.clone())).await;
    upload(&cp, b.id, context_tar()).await;
    let ja = job(poll(&cp, &amd, "amd64", 10)).await;
    let jr = job(poll(&cp, &arm, "arm64", 10)).await;
    done(&cp, &arm, jr.id, Some("STEP 2/2: exit status 1")).await;
    let whole = show(&cp, b.id).await;
    assert_eq!(whole.state, BuildState::Failed);
    assert_eq!(whole.error.as_deref(), Some("linux/arm64: STEP 2/2: exit status 1"));
    assert_eq!(show(&cp, ja.id).await.state, BuildState::Cancelled);
    assert_eq!(log(&cp, &amd, ja.id, b"late\n").await, BuildLogAck { stop: true });
    assert_eq!(releases_of(&cp, "web").await.len(), 1);

    // Retention with keep 1 after a second multi-platform release (of
    // another image): the first list goes, and its platforms' manifest
    // with it (nothing a release ran names that); the second stays whole.
    let first_list = digest.to_string();
    let first_platform = part_digest(&pa);
    let b = create_ready(&cp, &multi(two)).await;
    upload(&cp, b.id, context_tar()).await;
    let ja = job(poll(&cp, &amd, "amd64", 10)).await;
    let jr = job(poll(&cp, &arm, "arm64", 10)).await;
    let store2 = work.path().join("store2");
    import_one_file_image(&store2, work.path(), "localhost/built:2", "hello", "multi, second\n");
    for j in [&ja, &jr] {
        let creds = format!("{}:{}", j.registry.username, j.registry.password);
        let out = podman_in(&store2)
            .args(["push", "--quiet", "--cert-dir"])
            .arg(&certs)
            .args(["--creds", &creds, "localhost/built:2", &j.tag])
            .output()
            .unwrap();
        assert!(out.status.success(), "push: {}", text(&out));
    }
    done(&cp, &amd, ja.id, None).await;
    let second = done(&cp, &arm, jr.id, None).await;
    assert_eq!(show(&cp, b.id).await.release, Some(2), "{second:?}");
    let r = Reply::from(cp.admin(Method::POST, "/v1/images/prune?keep=1").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let report: berth_protocol::api::PruneReport = r.json();
    let mut deleted: Vec<&str> = report.deleted.iter().map(|d| d.digest.as_str()).collect();
    deleted.sort();
    let mut want = [first_list.as_str(), first_platform.as_str()];
    want.sort();
    assert_eq!(deleted, want, "{report:?}");
    let images: Vec<berth_protocol::api::ImageInfo> =
        Reply::from(cp.admin(Method::GET, "/v1/images").send().await.unwrap())
            .await
            .json();
    let second_platform = part_digest(&second);
    assert!(
        images.iter().any(|i| i.digest == second_platform) && !images.iter().any(|i| i.digest == first_platform),
        "{images:?}"
    );

    // A git build whose platforms cloned different commits (the branch
    // moved between the clones) fails instead of listing both.
    let mut req = multi(json!(["linux/amd64", "linux/arm64"]));
    req["dockerfile"] = json!("");
    req["git"] = json!({"url": "https://git.example/app.git", "ref": "main"});
    let b = create_ready(&cp, &req).await;
    let ja = job(poll(&cp, &amd, "amd64", 10)).await;
    let jr = job(poll(&cp, &arm, "arm64", 10)).await;
    let creds = format!("{}:{}", ja.registry.username, ja.registry.password);
    let out = podman_in(&store2)
        .args(["push", "--quiet", "--cert-dir"])
        .arg(&certs)
        .args(["--creds", &creds, "localhost/built:2", &ja.tag])
        .output()
        .unwrap();
    assert!(out.status.success(), "push: {}", text(&out));
    let report = |j: &BuildJob, commit: String| {
        (
            format!("/v1/agent/builds/{}/done", j.id),
            serde_json::to_vec(&json!({"error": null, "commit": commit})).unwrap(),
        )
    };
    let (path, body) = report(&ja, "a".repeat(40));
    let r: BuildInfo = agent(&cp, &amd, Method::POST, &path, body).await.json();
    assert_eq!(r.state, BuildState::Succeeded, "{r:?}");
    let (path, body) = report(&jr, "b".repeat(40));
    let r: BuildInfo = agent(&cp, &arm, Method::POST, &path, body).await.json();
    assert_eq!(r.state, BuildState::Failed, "{r:?}");
    let whole = show(&cp, b.id).await;
    assert_eq!(whole.state, BuildState::Failed);
    assert!(
        whole.error.as_deref().is_some_and(|e| e.contains("different commits")),
        "{whole:?}"
    );
    assert_eq!(releases_of(&cp, "web").await.len(), 2);
}
