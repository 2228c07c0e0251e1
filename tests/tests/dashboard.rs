//! End-to-end: the dashboard in a real headless Chromium (Debian's), driven
//! by playwright-core (tests/browser/dashboard.test.mjs), against a lab's
//! control plane with two nodes, the demo service and a service that logs
//! a line a second. A dashboard user is made with `berth users add`. The
//! browser's screenshots land in target/browser-shots.

use berth_protocol::service::ServiceSpec;
use berth_tests::*;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

const USER: &str = "ops";
const PASSWORD: &str = "correct horse battery";

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_works_in_a_real_browser() {
    let browser_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/browser` (scripts/test.sh does)"
    );
    let lab = lab_up(216, 2).await;
    let admin = lab.admin().unwrap();
    admin.deploy_service(&demo::web_service(&lab, "demo", 2)).await.unwrap();
    let ticker = ServiceSpec {
        name: "ticker".into(),
        image: lab.test_image(),
        replicas: 1,
        command: Some("i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done".into()),
        ..Default::default()
    };
    admin.deploy_service(&ticker).await.unwrap();
    demo::wait_healthy(&admin, "demo", 2, Duration::from_secs(60), |_| {})
        .await
        .expect("demo healthy");
    demo::wait_healthy(&admin, "ticker", 1, Duration::from_secs(60), |_| {})
        .await
        .expect("ticker running");

    let mut add = berth_command(&lab, &["users", "add", USER, "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("berth users add");
    writeln!(add.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    let out = add.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "berth users add: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser-shots");
    let nodes: Vec<String> = lab.state.nodes.iter().map(|n| n.name.clone()).collect();
    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec", "dashboard.test.mjs"])
        .current_dir(&browser_dir)
        .env("BERTH_URL", lab.url())
        .env("BERTH_USER", USER)
        .env("BERTH_PASSWORD", PASSWORD)
        .env("BERTH_DEMO_SERVICE", "demo")
        .env("BERTH_TICKER_SERVICE", "ticker")
        .env("BERTH_IMAGE", lab.test_image())
        .env("BERTH_NODES", nodes.join(","))
        .env("BERTH_SHOTS", &shots)
        .output()
        .expect("node");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the browser tests failed (screenshots in {})",
        shots.display()
    );

    // What the browser did, seen through the API: the demo was scaled to 3
    // and the launch form's service runs, with its secret stored.
    let demo = admin.show_service("demo").await.unwrap();
    assert_eq!(demo.spec.replicas, 3, "scaled from the service page");
    let launched = admin.show_service("launched").await.unwrap();
    assert_eq!(launched.secret_names, ["API_KEY"]);
    assert_eq!(launched.spec.env.get("GREETING").map(String::as_str), Some("hello"));
}
