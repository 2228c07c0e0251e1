//! End-to-end: a proxy node with berth-proxy, a certificate from Pebble
//! (ACME) through the control plane, HTTPS routed across the mesh to
//! replicas on two workers.

use berth_protocol::proxy::DomainSpec;
use berth_protocol::service::ServiceSpec;
use berth_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

const IMAGE: &str = "localhost/berth-test/busybox:latest";
const SETTLE: Duration = Duration::from_secs(60);

fn web() -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        image: IMAGE.into(),
        replicas: 2,
        port: Some(8080),
        env: BTreeMap::new(),
        secrets: BTreeMap::new(),
        volumes: vec![],
        cpu: None,
        memory: None,
        health_cmd: None,
        health_http: Some("/index.html".into()),
        command: None,
        nodes: vec!["n1".into(), "n2".into()],
    }
}

/// curl from the host to the proxy at `ip`, the domain resolved to it.
fn curl(ip: &str, root: &std::path::Path, url: &str, extra: &[&str]) -> (String, String) {
    let host = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(root)
        .args(["--resolve", &format!("{host}:443:{ip}"), "--resolve", &format!("{host}:80:{ip}")])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (body.to_string(), format!("{status} {}", String::from_utf8_lossy(&out.stderr).trim()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_the_proxy_with_an_acme_certificate() {
    let mut lab = lab_up(207, 2).await;
    let proxy = lab.add_node(true).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    lab.start_pebble(&proxy).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let admin = lab.admin().unwrap();
    admin.deploy_service(&web()).await.unwrap();
    let proxy_ip = lab.net.node_ip(lab.node(&proxy).unwrap().index).to_string();

    admin
        .add_domain(&DomainSpec {
            domain: "app.example.com".into(),
            service: "web".into(),
            port: 8080,
            passthrough: false,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + SETTLE;
    loop {
        let d = admin.list_domains().await.unwrap();
        if d.iter().any(|d| d.spec.domain == "app.example.com" && d.cert_state == "valid") {
            break;
        }
        assert!(Instant::now() < deadline, "no certificate: {d:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let root = lab.state.dir.join("pebble-root.pem");
    let pebble = lab.state.pebble.clone().unwrap();
    std::fs::write(&root, pebble.issuing_root().await.unwrap()).unwrap();

    // HTTPS with Pebble's root reaches both replicas (on n1 and n2).
    let deadline = Instant::now() + SETTLE;
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        let (body, status) = curl(&proxy_ip, &root, "https://app.example.com/cgi-bin/hostname", &[]);
        if status.starts_with("200") {
            seen.insert(body.trim().to_string());
        }
        assert!(Instant::now() < deadline, "replicas reached: {seen:?}; last: {status}");
    }
    assert_eq!(seen, BTreeSet::from(["web-1".to_string(), "web-2".to_string()]));

    // HTTP/2 by ALPN, forwarding headers, redirect, unknown host.
    let (body, status) = curl(&proxy_ip, &root, "https://app.example.com/cgi-bin/env", &["--http2"]);
    assert!(status.starts_with("200 2"), "{status}");
    assert!(body.contains("HTTP_X_FORWARDED_PROTO=https"), "{body}");
    assert!(body.contains("HTTP_X_FORWARDED_HOST=app.example.com"), "{body}");
    let (_, status) = curl(&proxy_ip, &root, "http://app.example.com/x?y=1", &["-o", "/dev/null"]);
    assert!(status.starts_with("308"), "{status}");
    let (_, status) = curl(&proxy_ip, &root, "http://nobody.example.com/", &[]);
    assert!(status.starts_with("404"), "{status}");

    // SIGKILL the proxy node's agent: berth-proxy keeps serving.
    let pidx = lab.node(&proxy).unwrap().index;
    lab.kill_agent(pidx).unwrap();
    for _ in 0..20 {
        let (_, status) = curl(&proxy_ip, &root, "https://app.example.com/index.html", &[]);
        assert!(status.starts_with("200"), "{status}");
    }
    lab.start_agent(pidx, None).unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let (_, status) = curl(&proxy_ip, &root, "https://app.example.com/index.html", &[]);
    assert!(status.starts_with("200"), "{status}");
}
