//! `berth nodes upgrade` through the real HTTPS API: the canary is asked
//! first, the other nodes only once the canary reports the version; unknown
//! versions and canaries change nothing; the installer scripts and release
//! files are served with this control plane's values. On SQLite and PostgreSQL.

#[macro_use]
mod common;

use berth_protocol::{DesiredState, ErrorCode, StatusReport};
use common::{Cp, Db, Reply, SealedNode};
use reqwest::{Method, StatusCode};

on_both_stores!(canary_first_then_the_rest, installer_and_release_files_are_served);

/// Publishes `version` the way `berth release sign` lays it out (the
/// control plane checks only that a signed manifest exists).
fn publish(cp: &Cp, version: &str) {
    let dir = cp.data_dir.join("releases").join(version);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("berth-agent-linux-amd64"), b"agent build").unwrap();
    std::fs::write(dir.join("manifest"), "0123  berth-agent-linux-amd64\n").unwrap();
    std::fs::write(dir.join("manifest.sig"), [7u8; 64]).unwrap();
    std::fs::write(cp.data_dir.join("releases/latest"), format!("{version}\n")).unwrap();
    std::fs::write(
        cp.data_dir.join("releases/release.pub"),
        "-----BEGIN PUBLIC KEY-----\nKEY\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
}

async fn upgrade(cp: &Cp, body: serde_json::Value) -> Reply {
    Reply::from(
        cp.admin(Method::POST, "/v1/nodes/upgrade")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await
}

async fn target(cp: &Cp, n: &SealedNode) -> Option<String> {
    let d: DesiredState = cp.desired(&n.agent, 0, 1).await.json();
    d.upgrade_to
}

async fn reports_version(cp: &Cp, n: &SealedNode, version: &str) {
    let r = StatusReport {
        agent_version: version.into(),
        ..Default::default()
    };
    cp.report(&n.agent, &r).await;
}

async fn canary_first_then_the_rest(db: &Db) {
    let cp = Cp::start(db).await;
    let a = cp.join_sealed("a", false).await;
    let b = cp.join_sealed("b", false).await;
    let p = cp.join_sealed("p", true).await;
    for n in [&a, &b, &p] {
        reports_version(&cp, n, "1.0.0").await;
    }
    publish(&cp, "1.1.0");

    // Refusals change nothing.
    let rev = cp.revision().await;
    let r = upgrade(&cp, serde_json::json!({"version": "9.9.9"})).await;
    r.error(StatusCode::UNPROCESSABLE_ENTITY, "version: no signed release 9.9.9");
    r.coded(
        StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::UnknownRelease,
        Some("version"),
    );
    let r = upgrade(&cp, serde_json::json!({"version": "../1"})).await;
    r.error(StatusCode::BAD_REQUEST, "version:");
    let r = upgrade(&cp, serde_json::json!({"version": "1.1.0", "canary": "nosuch"})).await;
    r.error(StatusCode::NOT_FOUND, "canary: no node named \"nosuch\"");
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("canary"));
    let r = upgrade(&cp, serde_json::json!({"version": "1.1.0", "canery": "b"})).await;
    r.error(StatusCode::BAD_REQUEST, "");
    assert_eq!(cp.revision().await, rev, "a refused upgrade moved the revision");
    for n in [&a, &b, &p] {
        assert_eq!(target(&cp, n).await, None);
    }

    // The canary alone is asked.
    let r = upgrade(&cp, serde_json::json!({"version": "1.1.0", "canary": "b"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = r.json();
    assert_eq!(v["canary"], "b");
    assert_eq!(v["waiting"], serde_json::json!(["a", "p"]));
    assert_eq!(target(&cp, &b).await.as_deref(), Some("1.1.0"));
    assert_eq!(target(&cp, &a).await, None);
    assert_eq!(target(&cp, &p).await, None);

    // Others reporting anything, and the canary reporting its old version
    // (its upgrade failed and was reverted), move nothing.
    reports_version(&cp, &a, "1.1.0").await;
    let failed = StatusReport {
        agent_version: "1.0.0".into(),
        upgrade_error: Some("berth-agent 1.1.0 did not report within 60s; reverted".into()),
        ..Default::default()
    };
    cp.report(&b.agent, &failed).await;
    assert_eq!(target(&cp, &p).await, None);
    let nodes = cp.nodes().await;
    let nb = nodes.iter().find(|n| n.name == "b").unwrap();
    assert!(nb.error.as_deref().unwrap_or("").contains("reverted"), "{nb:?}");

    // The canary runs the version: everyone else is asked for it.
    reports_version(&cp, &b, "1.1.0").await;
    for n in [&a, &b, &p] {
        assert_eq!(target(&cp, n).await.as_deref(), Some("1.1.0"));
    }
    let nodes = cp.nodes().await;
    assert_eq!(
        nodes.iter().find(|n| n.name == "b").unwrap().agent_version.as_deref(),
        Some("1.1.0")
    );

    // Without --canary, the first node by name goes first.
    publish(&cp, "1.2.0");
    let r = upgrade(&cp, serde_json::json!({"version": "1.2.0"})).await;
    assert_eq!(r.json::<serde_json::Value>()["canary"], "a");
    assert_eq!(target(&cp, &a).await.as_deref(), Some("1.2.0"));
    assert_eq!(target(&cp, &b).await.as_deref(), Some("1.1.0"));
}

async fn installer_and_release_files_are_served(db: &Db) {
    let cp = Cp::start(db).await;
    let get = |path: &str| {
        let req = cp.http.get(format!("{}{path}", cp.url));
        async move { Reply::from(req.send().await.unwrap()).await }
    };
    // No release yet: the scripts still come, and say so when run.
    let r = get("/releases/latest").await;
    r.error(StatusCode::NOT_FOUND, "release: no release published");

    publish(&cp, "1.1.0");
    let setup = get("/setup.sh").await;
    assert_eq!(setup.status, StatusCode::OK);
    assert!(setup.body.starts_with("#!/usr/bin/env bash"));
    assert!(
        setup
            .body
            .contains(&format!("BERTH_URL=\"{}\"", cp.started.state.advertise_url)),
        "URL filled in"
    );
    assert!(setup.body.contains("BERTH_LATEST=\"1.1.0\""));
    assert!(setup
        .body
        .contains(std::fs::read_to_string(cp.data_dir.join("ca.pem")).unwrap().trim()));
    assert!(setup.body.contains("-----BEGIN PUBLIC KEY-----\nKEY"));
    assert!(
        setup.body.contains("Type=notify") && setup.body.contains("KillMode=process"),
        "units inlined"
    );
    assert!(!setup.body.contains("@@"), "a placeholder was left");
    for script in ["/update.sh", "/uninstall.sh"] {
        let r = get(script).await;
        assert_eq!(r.status, StatusCode::OK, "{script}");
        assert!(!r.body.contains("@@"), "{script}");
    }

    assert_eq!(get("/releases/latest").await.body, "1.1.0\n");
    assert_eq!(get("/releases/1.1.0/berth-agent-linux-amd64").await.body, "agent build");
    assert_eq!(get("/releases/1.1.0/manifest").await.status, StatusCode::OK);
    // Only what the manifest lists, never other files of the data dir.
    std::fs::write(cp.data_dir.join("releases/1.1.0/notes"), "x").unwrap();
    for path in [
        "/releases/1.1.0/notes",
        "/releases/1.1.0/..%2F..%2Fsecrets.key",
        "/releases/..%2F/admin.token",
        "/releases/9.9.9/manifest",
    ] {
        assert_eq!(get(path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
}
