//! The fleet registry: the real docker-registry run by the control plane,
//! real Podman pushing and pulling through it. Who may do what is decided
//! by the control plane's token endpoint: the admin pushes and pulls, a node
//! pulls with the credentials in its desired state, nobody else gets in.

#[macro_use]
mod common;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use berth_control_plane::registry::RegistryConfig;
use berth_protocol::ErrorCode;
use common::podman::{import_one_file_image, podman_in, text};
use common::*;
use reqwest::{Method, StatusCode};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const TEST_IMAGE: &str = "localhost/berth-test/busybox:latest";

/// `podman pull` into `store`, trusting the control plane's CA (in `certs`).
fn pull(store: &Path, certs: &Path, creds: Option<&str>, image: &str) -> Output {
    let mut cmd = podman_in(store);
    cmd.args(["pull", "--quiet", "--cert-dir"]).arg(certs);
    if let Some(c) = creds {
        cmd.args(["--creds", c]);
    }
    cmd.arg(image).output().expect("run podman")
}

/// `podman push` of the test image from `store` (made there by
/// scripts/make-test-image.sh: the host's store is left alone).
fn push(store: &Path, certs: &Path, creds: Option<&str>, to: &str) -> Output {
    push_image(store, certs, creds, TEST_IMAGE, to)
}

/// `podman push` of `image` from `store`.
fn push_image(store: &Path, certs: &Path, creds: Option<&str>, image: &str, to: &str) -> Output {
    let mut cmd = podman_in(store);
    cmd.args(["push", "--quiet", "--cert-dir"]).arg(certs);
    if let Some(c) = creds {
        cmd.args(["--creds", c]);
    }
    cmd.args([image, to]).output().expect("run podman")
}

fn make_test_image(store: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/make-test-image.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("--root")
        .arg(store.join("root"))
        .arg("--runroot")
        .arg(store.join("run"))
        .args(["--storage-driver", "vfs"])
        .output()
        .expect("run make-test-image.sh");
    assert!(out.status.success(), "make-test-image.sh: {}", text(&out));
}

/// `(image, digest)` of an image pinned in the registry at `host`, which
/// must be `HOST/berth-test/busybox@sha256:…`.
fn pinned_image(image: &str, host: &str) -> (String, String) {
    let digest = image
        .strip_prefix(&format!("{host}/berth-test/busybox@"))
        .unwrap_or_else(|| panic!("not pinned to a digest: {image}"));
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{image}");
    (image.to_string(), digest.to_string())
}

/// The claims of a JWT (not verified: the registry does that).
fn claims(jwt: &str) -> serde_json::Value {
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

async fn token(cp: &Cp, creds: Option<(&str, &str)>, scope: &str) -> Reply {
    let mut req = cp.http.get(format!(
        "{}/v1/registry/token?service=berth-registry&scope={scope}",
        cp.url
    ));
    if let Some((u, p)) = creds {
        req = req.header(
            "authorization",
            format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))),
        );
    }
    Reply::from(req.send().await.unwrap()).await
}

on_both_stores!(nodes_pull_admins_push_and_nobody_else_gets_in);

async fn nodes_pull_admins_push_and_nobody_else_gets_in(db: &Db) {
    if !Path::new(REGISTRY_BIN).exists() {
        assert!(std::env::var_os("CI").is_none(), "{REGISTRY_BIN} is missing under CI");
        eprintln!("skipped: {REGISTRY_BIN} is not installed");
        return;
    }
    let port = free_port();
    let cp = Cp::start_with_registry(
        db,
        RegistryConfig {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            binary: REGISTRY_BIN.into(),
            storage_config: None,
            retention: 10,
            prune_every: None,
        },
    )
    .await;
    let n1 = cp.join_sealed("n1", false).await;
    // Online (a service can be placed on it).
    cp.report(&n1.agent, &berth_protocol::StatusReport::default()).await;
    let d: berth_protocol::DesiredState = cp.desired(&n1.agent, 0, 1).await.json();
    let access = d.registry.expect("the desired state names the registry");
    let host = format!("127.0.0.1:{port}");
    assert_eq!(access.host, host);
    assert_eq!(access.username, "n1");

    // Podman trusts the control plane's CA for the registry's host.
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&cp.started.ca_file, certs.join("ca.crt")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry never listened on {host}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Pruning an empty registry is no error.
    let r = Reply::from(cp.admin(Method::POST, "/v1/images/prune").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let report: berth_protocol::api::PruneReport = r.json();
    assert_eq!((report.keep, report.deleted.len()), (10, 0), "{report:?}");

    // The token endpoint: anonymous and wrong passwords are refused with
    // the same code; a node asking for push gets pull only.
    let anon = token(&cp, None, "repository:demo:pull").await;
    anon.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    let wrong = token(&cp, Some(("n1", "00ff")), "repository:demo:pull").await;
    wrong.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    let not_admin = token(&cp, Some(("admin", &access.password)), "repository:demo:pull").await;
    not_admin.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    let t = token(&cp, Some(("n1", &access.password)), "repository:demo:pull,push").await;
    assert_eq!(t.status, StatusCode::OK, "{}", t.body);
    let c = claims(t.json::<serde_json::Value>()["token"].as_str().unwrap());
    assert_eq!(c["sub"], "node:n1");
    assert_eq!(
        c["access"],
        serde_json::json!([{"type": "repository", "name": "demo", "actions": ["pull"]}])
    );
    let bad = token(&cp, Some(("admin", &cp.admin_token)), "repository").await;
    bad.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("scope"));

    let image = format!("{host}/berth-test/busybox:v1");
    // Nobody pushes anonymously, a node cannot push, the admin can.
    let source = work.path().join("source");
    make_test_image(&source);
    let node_creds = format!("n1:{}", access.password);
    let out = push(&source, &certs, None, &image);
    assert!(!out.status.success(), "an anonymous push went through: {}", text(&out));
    let out = push(&source, &certs, Some(&node_creds), &image);
    assert!(!out.status.success(), "a node pushed: {}", text(&out));
    let out = push(&source, &certs, Some(&format!("admin:{}", cp.admin_token)), &image);
    assert!(out.status.success(), "the admin's push failed: {}", text(&out));

    // What the registry holds, with the releases that use it.
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services")
            .json(&serde_json::json!({"name": "web", "image": image, "replicas": 1, "port": 8080}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Deployed by the digest the tag named (every node runs the same bits).
    let info: berth_protocol::service::ServiceInfo = r.json();
    let (pinned, first_digest) = pinned_image(&info.spec.image, &host);
    let d: berth_protocol::DesiredState = cp.desired(&n1.agent, 0, 1).await.json();
    assert_eq!(d.containers.len(), 1, "{d:?}");
    assert_eq!(d.containers[0].image, pinned);
    let r = Reply::from(cp.admin(Method::GET, "/v1/images").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let list: Vec<berth_protocol::api::ImageInfo> = r.json();
    assert_eq!(list.len(), 1, "{list:?}");
    let i = &list[0];
    assert_eq!((i.repository.as_str(), i.tag.as_str()), ("berth-test/busybox", "v1"));
    assert_eq!(i.reference, image);
    assert!(i.digest.starts_with("sha256:") && i.digest.len() == 71, "{i:?}");
    assert!(
        i.size.is_some_and(|s| s > 100_000),
        "the busybox layer is in the size: {i:?}"
    );
    assert_eq!(
        i.releases,
        vec![berth_protocol::api::ReleaseRef {
            service: "web".into(),
            number: 1
        }]
    );
    assert_eq!(i.digest, first_digest);
    let r = Reply::from(cp.admin(Method::GET, "/v1/images?service=web").send().await.unwrap()).await;
    assert_eq!(r.json::<Vec<berth_protocol::api::ImageInfo>>().len(), 1);

    // Another image pushed to the same tag: nothing changes until the next
    // deploy, which pins the new digest.
    import_one_file_image(&source, work.path(), "localhost/other:1", "marker", "second image\n");
    let admin_creds = format!("admin:{}", cp.admin_token);
    let out = push_image(&source, &certs, Some(&admin_creds), "localhost/other:1", &image);
    assert!(out.status.success(), "the second push failed: {}", text(&out));
    let d: berth_protocol::DesiredState = cp.desired(&n1.agent, 0, 1).await.json();
    assert_eq!(d.containers[0].image, pinned, "a push moved a running service");
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services")
            .json(&serde_json::json!({"name": "web", "image": image, "replicas": 1, "port": 8080}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let info: berth_protocol::service::ServiceInfo = r.json();
    let (repinned, second_digest) = pinned_image(&info.spec.image, &host);
    assert_ne!(second_digest, first_digest, "{repinned}");
    let r = Reply::from(cp.admin(Method::GET, "/v1/images?service=web").send().await.unwrap()).await;
    let list: Vec<berth_protocol::api::ImageInfo> = r.json();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].digest, second_digest);
    assert_eq!(list[0].releases.last().map(|r| r.number), Some(2), "{list:?}");

    // A tag the registry does not have is refused, naming the field;
    // nothing is stored.
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services")
            .json(&serde_json::json!({"name": "web", "image": format!("{host}/berth-test/busybox:nope"), "replicas": 1, "port": 8080}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("image"));
    let r = Reply::from(cp.admin(Method::GET, "/v1/services/web/releases").send().await.unwrap()).await;
    assert_eq!(r.json::<Vec<serde_json::Value>>().len(), 2, "{}", r.body);

    // Retention: a service with no replicas and two releases of two
    // images; keeping one release deletes the older image (its tag goes
    // with it), leaves an image pushed but never deployed, and the
    // garbage collection runs with the registry back up after it.
    let a = format!("{host}/pr:a");
    let b = format!("{host}/pr:b");
    let spare = format!("{host}/pr:spare");
    for (from, to) in [
        (TEST_IMAGE, &a),
        ("localhost/other:1", &b),
        ("localhost/other:1", &spare),
    ] {
        let out = push_image(&source, &certs, Some(&admin_creds), from, to);
        assert!(out.status.success(), "push {to}: {}", text(&out));
    }
    let mut pinned_pr = vec![];
    for image in [&a, &b] {
        let r = Reply::from(
            cp.admin(Method::POST, "/v1/services")
                .json(&serde_json::json!({"name": "pr", "image": image, "replicas": 0, "port": 8080}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        pinned_pr.push(r.json::<berth_protocol::service::ServiceInfo>().spec.image);
    }
    let r = Reply::from(cp.admin(Method::POST, "/v1/images/prune?keep=0").send().await.unwrap()).await;
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("keep"));
    let r = Reply::from(cp.admin(Method::POST, "/v1/images/prune?keep=1").send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let report: berth_protocol::api::PruneReport = r.json();
    let a_digest = pinned_pr[0].rsplit_once('@').unwrap().1;
    let pr_deleted: Vec<&berth_protocol::api::PrunedImage> =
        report.deleted.iter().filter(|d| d.repository == "pr").collect();
    assert_eq!(pr_deleted.len(), 1, "{report:?}");
    assert_eq!(pr_deleted[0].digest, a_digest);
    // Release 1 of pr ran pr's own image, so it was tagged pr:1 too.
    assert_eq!(pr_deleted[0].tags, ["1", "a"]);
    assert!(
        report.garbage_collection.contains("eligible for deletion"),
        "{report:?}"
    );
    let admin_store = work.path().join("admin-store");
    let out = pull(&admin_store, &certs, Some(&admin_creds), &pinned_pr[0]);
    assert!(!out.status.success(), "the pruned image is still there: {}", text(&out));
    for image in [&pinned_pr[1], &spare] {
        let out = pull(&admin_store, &certs, Some(&admin_creds), image);
        assert!(out.status.success(), "{image} went: {}", text(&out));
    }
    let r = Reply::from(cp.admin(Method::GET, "/v1/images?service=pr").send().await.unwrap()).await;
    let mut tags: Vec<String> = r
        .json::<Vec<berth_protocol::api::ImageInfo>>()
        .into_iter()
        .map(|i| i.tag)
        .collect();
    tags.sort();
    // spare names the same digest as b, so release 2 uses it too (and
    // tags it pr:2); a is gone, with pr:1.
    assert_eq!(tags, ["2", "b", "spare"], "what pr's releases use");
    let r = Reply::from(cp.admin(Method::GET, "/v1/images?service=nope").send().await.unwrap()).await;
    r.coded(StatusCode::NOT_FOUND, ErrorCode::NotFound, Some("service"));
    let r = Reply::from(cp.http.get(format!("{}/v1/images", cp.url)).send().await.unwrap()).await;
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));

    // Pulls: anonymous refused, the node's credentials work.
    let store = work.path().join("store");
    let out = pull(&store, &certs, None, &image);
    assert!(!out.status.success(), "an anonymous pull went through: {}", text(&out));
    let out = pull(&store, &certs, Some(&node_creds), &image);
    assert!(out.status.success(), "the node's pull failed: {}", text(&out));
    let out = podman_in(&store).args(["image", "exists", &image]).output().unwrap();
    assert!(
        out.status.success(),
        "the pulled image is not in the store: {}",
        text(&out)
    );

    // A removed node's credentials are dead.
    let r = Reply::from(cp.admin(Method::DELETE, "/v1/nodes/n1").send().await.unwrap()).await;
    assert!(r.status.is_success(), "{}", r.body);
    let gone = token(&cp, Some(("n1", &access.password)), "repository:demo:pull").await;
    gone.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    let store2 = work.path().join("store2");
    let out = pull(&store2, &certs, Some(&node_creds), &image);
    assert!(!out.status.success(), "a removed node pulled: {}", text(&out));
    // The stores go with the temporary directory (vfs: plain files).
    // Never `podman system reset`: it also empties the host's /run/libpod
    // and network configs, which other Podmans use.
}
