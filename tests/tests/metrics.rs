//! End-to-end: a real Prometheus (Debian's), started by the test, scrapes
//! the lab's control plane, every agent and the proxy's berth-proxy. Its
//! targets API shows each of them up, and its queries count the running
//! replicas right. `promtool check metrics` takes every endpoint's page.
//! `berth nodes list` and `berth service show` show CPU and memory.

use berth_lab::{AGENT_METRICS_PORT, PROXY_METRICS_PORT};
use berth_tests::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(90);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        String::new()
    } else {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// One instant query's single value.
fn query(prom: &str, q: &str) -> Option<f64> {
    let text = curl(&[
        "-G",
        &format!("http://{prom}/api/v1/query"),
        "--data-urlencode",
        &format!("query={q}"),
    ]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_part_of_the_lab() {
    let mut lab = lab_up(214, 2).await;
    let proxy = lab.add_node(true).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let admin = lab.admin().unwrap();
    admin.deploy_service(&demo::web_service(&lab, "web", 2)).await.unwrap();
    demo::wait_healthy(&admin, "web", 2, SETTLE, |_| {}).await.unwrap();

    let cfg = lab.client_config();
    let cp = cfg.url.trim_start_matches("https://").to_string();
    let ip = |name: &str| lab.net.node_ip(lab.node(name).unwrap().index).to_string();
    let agents: Vec<String> = ["n1", "n2", proxy.as_str()]
        .iter()
        .map(|n| format!("{}:{AGENT_METRICS_PORT}", ip(n)))
        .collect();
    let proxy_target = format!("{}:{PROXY_METRICS_PORT}", ip(&proxy));

    // Every page passes promtool.
    let token = std::fs::read_to_string(&cfg.admin_token_file).unwrap();
    let cp_page = curl(&[
        "--cacert",
        cfg.ca_file.to_str().unwrap(),
        "-H",
        &format!("Authorization: Bearer {}", token.trim()),
        &format!("https://{cp}/metrics"),
    ]);
    assert_eq!(promtool(&cp_page), "", "control plane:\n{cp_page}");
    for t in agents.iter().chain([&proxy_target]) {
        let page = curl(&[&format!("http://{t}/metrics")]);
        assert_eq!(promtool(&page), "", "{t}:\n{page}");
    }

    let dir = lab.state.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let quote = |v: &[String]| v.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n\
         - job_name: control-plane\n  scheme: https\n  tls_config:\n    ca_file: '{}'\n  authorization:\n    credentials_file: '{}'\n  static_configs:\n  - targets: ['{cp}']\n\
         - job_name: agent\n  static_configs:\n  - targets: [{}]\n\
         - job_name: proxy\n  static_configs:\n  - targets: ['{proxy_target}']\n",
        cfg.ca_file.display(),
        cfg.admin_token_file.display(),
        quote(&agents),
    );
    std::fs::write(dir.join("prometheus.yml"), &config).unwrap();
    let prom = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _server = KillOnDrop(
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus (apt install prometheus; scripts/install-deps.sh does)"),
    );

    // All five targets up.
    let deadline = Instant::now() + SETTLE;
    loop {
        let text = Command::new("curl")
            .args(["-s", &format!("http://{prom}/api/v1/targets")])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&text.stdout).unwrap_or_default();
        let targets = v["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
        let up = targets.iter().filter(|t| t["health"] == "up").count();
        if targets.len() == 5 && up == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "targets: {targets:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The queries see what runs: 2 replicas, healthy, on the agents and in
    // the control plane's view; 3 nodes online; peers with handshakes.
    let deadline = Instant::now() + SETTLE;
    loop {
        let running = query(&prom, r#"sum(berth_containers{state="running"})"#);
        let healthy = query(&prom, r#"sum(berth_replica_healthy)"#);
        let cp_healthy = query(&prom, r#"berth_replicas{service="web",healthy="true"}"#);
        let online = query(&prom, r#"sum(berth_nodes{state="online"})"#);
        let peers = query(&prom, "sum(berth_mesh_peers)");
        let memory = query(&prom, "count(berth_replica_memory_bytes > 0)");
        let got = (running, healthy, cp_healthy, online, peers, memory);
        if got == (Some(2.0), Some(2.0), Some(2.0), Some(3.0), Some(6.0), Some(2.0)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "running, healthy, cp healthy, online, peers, memory: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The same figures in `berth nodes list` and `berth service show`, from
    // the heartbeats (CPU once two of them came).
    let deadline = Instant::now() + SETTLE;
    loop {
        let nodes = admin.list_nodes().await.unwrap();
        let web = admin.show_service("web").await.unwrap();
        let nodes_ok = nodes.len() == 3
            && nodes.iter().all(|n| {
                n.usage.is_some_and(|u| {
                    u.cores >= 1 && u.memory_used_bytes > 0 && u.memory_total_bytes >= u.memory_used_bytes
                })
            });
        let replicas_ok = web
            .replicas
            .iter()
            .all(|r| r.memory_bytes.is_some_and(|m| m > 0) && r.cpu_millicores.is_some());
        if nodes_ok && replicas_ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage: {:?} {:?}",
            nodes.iter().map(|n| n.usage).collect::<Vec<_>>(),
            web.replicas
                .iter()
                .map(|r| (r.cpu_millicores, r.memory_bytes))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = berth(&lab, &["service", "show", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("CPU") && text.contains("MEMORY") && text.contains("Mi "),
        "{text}"
    );
}
