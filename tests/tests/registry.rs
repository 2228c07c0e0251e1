//! End-to-end: the fleet registry on a lab. The test image is pushed into
//! the registry the control plane runs; a service of that image runs on
//! both nodes, each of which pulls it over the network with its own
//! credentials, trusting the control plane's CA.

use berth_tests::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const SETTLE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_pull_a_service_image_from_the_fleet_registry() {
    if !Path::new("/usr/bin/docker-registry").exists() {
        assert!(std::env::var_os("CI").is_none(), "docker-registry is missing under CI");
        eprintln!("skipped: docker-registry is not installed");
        return;
    }
    let lab = lab_up(211, 2).await;
    // The test image under a repository of its own: every node pulled
    // berth-test/busybox at its start, but none has this name yet.
    let image = lab.push_test_image_as("berth-test/reg").await.unwrap();
    assert_eq!(image, format!("{}/berth-test/reg:latest", lab.registry_host()));
    for n in ["n1", "n2"] {
        let out = lab.podman(n, &["image", "exists", &image]).unwrap();
        assert!(!out.status.success(), "{n} has {image} before the deploy");
    }

    let admin = lab.admin().unwrap();
    let mut spec = demo::web_service(&lab, "reg", 2);
    spec.image = image.clone();
    admin.deploy_service(&spec).await.unwrap();
    let info = demo::wait_healthy(&admin, "reg", 2, SETTLE, |_| {}).await.unwrap();
    let mut nodes: Vec<&str> = info.replicas.iter().map(|r| r.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"], "{info:?}");

    // The release runs the image by the digest the tag named at the deploy.
    let pinned = &info.spec.image;
    let digest = pinned
        .strip_prefix(&format!("{}/berth-test/reg@", lab.registry_host()))
        .unwrap_or_else(|| panic!("not pinned to a digest: {pinned}"));
    assert!(digest.starts_with("sha256:"), "{pinned}");
    // Each node's agent pulled it, and trusts the CA for the registry's host.
    for n in ["n1", "n2"] {
        let out = lab.podman(n, &["image", "exists", pinned]).unwrap();
        assert!(out.status.success(), "{n} did not pull {pinned}");
    }
    let ca = std::fs::read(lab.client_config().ca_file).unwrap();
    let trusted = std::fs::read(format!("/etc/containers/certs.d/{}/ca.crt", lab.registry_host())).unwrap();
    assert_eq!(trusted, ca);

    // And it serves: a container on n2 reaches both replicas by name.
    let out = lab
        .run_container("n2", &["wget", "-qO-", "http://reg.internal:8080/"])
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The admin's machine (this host): `berth registry show` names the
    // registry, `berth registry login` lets plain `podman pull` in.
    let out = berth(&lab, &["registry", "show"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), lab.registry_host());
    let out = berth(&lab, &["image", "list", "reg"]);
    assert!(out.status.success(), "{}", text(&out));
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    let row = listed
        .lines()
        .find(|l| l.starts_with("berth-test/reg "))
        .unwrap_or_else(|| panic!("the image is not listed:\n{listed}"));
    assert!(
        row.contains(" latest ") && row.contains("sha256:") && row.ends_with("reg#1"),
        "{row}"
    );
    let store = tempfile::tempdir().unwrap();
    let pull = || {
        Command::new("podman")
            .arg("--root")
            .arg(store.path().join("root"))
            .arg("--runroot")
            .arg(store.path().join("run"))
            .args(["--storage-driver", "vfs", "pull", "--quiet", &image])
            .output()
            .unwrap()
    };
    let out = berth(&lab, &["registry", "login"]);
    let logged_in = out.status.success();
    let pulled = pull();
    // `berth image prune`: reg's only release keeps its image, and the
    // registry is back after its garbage collection.
    let pruned = berth(&lab, &["image", "prune", "--keep", "1"]);
    let pulled_after_prune = pull();
    let _ = Command::new("podman").args(["logout", &lab.registry_host()]).output();
    assert!(logged_in, "{}", text(&out));
    assert!(pulled.status.success(), "pull after login: {}", text(&pulled));
    assert!(pruned.status.success(), "{}", text(&pruned));
    let report = String::from_utf8_lossy(&pruned.stdout);
    assert!(
        report.contains("0 image(s) deleted") && report.contains("eligible for deletion"),
        "{report}"
    );
    assert!(
        pulled_after_prune.status.success(),
        "pull after prune: {}",
        text(&pulled_after_prune)
    );
    let out = pull();
    assert!(!out.status.success(), "pulled after logout: {}", text(&out));
    // The store goes with its temporary directory (vfs: plain files).
    // Never `podman system reset` here: it also empties the host's
    // /run/libpod and network configs, which the lab's Podmans use.
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
