//! End-to-end: the load generator of the rollout tests (`berth_tests::load`)
//! on a real lab. Against a steady demo it counts only successes, at 20
//! requests/s per client; with the demo's replicas stopped under it, it
//! records failures (so a rollout test that sees none has a generator that
//! can see them).

use berth_protocol::routes::DomainSpec;
use berth_protocol::service::ServiceSpec;
use berth_tests::load::{Load, LoadSpec};
use berth_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(60);

/// One HTTPS request from the host through the proxy at `ip`: true on a 200.
fn served(ip: &str, root: &Path) -> bool {
    let out = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "--cacert",
        ])
        .arg(root)
        .args(["--resolve", &format!("{}:443:{ip}", demo::DEMO_DOMAIN)])
        .arg(format!("https://{}/", demo::DEMO_DOMAIN))
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).trim() == "200"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_sees_successes_and_failures() {
    // Two workers and a proxy (n3). The demo's two replicas both run on n1;
    // the DNS client runs on n2, so its requests cross the mesh.
    let mut lab = lab_up(209, 2).await;
    let proxy = lab.add_node(true).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    lab.start_pebble(&proxy).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let admin = lab.admin().unwrap();
    let spec = ServiceSpec {
        nodes: vec!["n1".into()],
        ..demo::web_service(&lab, "demo", 2)
    };
    admin.deploy_service(&spec).await.unwrap();
    demo::wait_healthy(&admin, "demo", 2, SETTLE, |_| {}).await.unwrap();
    admin
        .add_domain(&DomainSpec {
            domain: demo::DEMO_DOMAIN.into(),
            service: "demo".into(),
            port: demo::WEB_PORT,
            passthrough: false,
        })
        .await
        .unwrap();
    demo::wait_cert(&admin, demo::DEMO_DOMAIN, SETTLE).await.unwrap();
    let root = lab.state.dir.join("pebble-root.pem");
    let pebble = lab.state.pebble.clone().unwrap();
    std::fs::write(&root, pebble.issuing_root().await.unwrap()).unwrap();

    // Steady: the proxy serves the domain, n2 resolves and reaches the demo.
    let proxy_ip = lab.net.node_ip(lab.node(&proxy).unwrap().index).to_string();
    let deadline = Instant::now() + SETTLE;
    while !served(&proxy_ip, &root) {
        assert!(
            Instant::now() < deadline,
            "the proxy does not serve {}",
            demo::DEMO_DOMAIN
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + SETTLE;
    loop {
        let out = lab
            .run_container("n2", &["timeout", "5", "wget", "-qO-", "http://demo.internal:8080/"])
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "demo.internal from n2: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // 5 s of load on a steady service: at least 80 successes per client
    // (20/s) and no failure.
    let load_spec = LoadSpec::new(&proxy, &root, "n2");
    let load = Load::start(&lab, &load_spec).unwrap();
    tokio::time::sleep(Duration::from_millis(5_200)).await;
    let steady = load.stop();
    println!("steady:\n{steady}");
    steady.assert_no_failures();
    steady.assert_ok_at_least(80);
    for c in [&steady.https, &steady.dns] {
        assert!(c.rate() >= 18.0, "{c}");
    }

    // The replicas stopped under load: both clients record failures. n1's
    // agent is killed first, or it would start them again within a second
    // (faster than the proxy gives up on a request).
    let n1 = lab.node("n1").unwrap().index;
    lab.kill_agent(n1).unwrap();
    let load = Load::start(&lab, &load_spec).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = load.summary();
    assert_eq!(
        before.failed(),
        0,
        "failures before the replicas were stopped:\n{before}"
    );
    let out = lab
        .podman("n1", &["stop", "--time", "0", "berth-demo-1", "berth-demo-2"])
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = load.summary();
        if s.https.failed > 0 && s.dns.failed > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no failures with the replicas stopped:\n{s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let broken = load.stop();
    println!("replicas stopped:\n{broken}");
    assert!(broken.https.failed > 0 && broken.dns.failed > 0, "{broken}");
    assert!(broken.https.failures.iter().all(|f| !f.reason.is_empty()));
    let panicked = std::panic::catch_unwind(|| broken.assert_no_failures());
    assert!(panicked.is_err(), "assert_no_failures passed with failures");
}
