//! End-to-end: services on a lab with a real Podman per node. Replicas are
//! placed by the control plane, run by the agents, found by `.internal` DNS
//! from containers on other nodes and reached over the WireGuard mesh.

use berth_protocol::service::{ServiceInfo, ServiceSpec};
use berth_tests::*;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(40);

fn web(lab: &Lab, replicas: u32, nodes: &[&str], secret: &str) -> ServiceSpec {
    ServiceSpec {
        env: BTreeMap::from([("GREETING".to_string(), "hello-from-berth".to_string())]),
        secrets: BTreeMap::from([("API_KEY".to_string(), secret.to_string())]),
        cpu: Some(0.5),
        memory: Some(64 << 20),
        health_http: Some("/index.html".into()),
        nodes: nodes.iter().map(|s| s.to_string()).collect(),
        ..demo::web_service(lab, "web", replicas)
    }
}

/// Waits until `name` has exactly `n` replicas, all running and healthy.
async fn wait_running(lab: &LabGuard, name: &str, n: usize) -> ServiceInfo {
    let admin = lab.admin().unwrap();
    demo::wait_healthy(&admin, name, n, SETTLE, |_| {}).await.unwrap()
}

/// `name`'s A records as a container on node `from` resolves them (busybox
/// nslookup against the node's DNS, as the container's resolv.conf says).
fn resolve(lab: &LabGuard, from: &str, name: &str) -> Result<Vec<Ipv4Addr>, String> {
    let out = lab.run_container(from, &["nslookup", "-type=a", name]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if text.contains("NXDOMAIN") {
        return Err("NXDOMAIN".into());
    }
    // The server's own address is printed as "Address: IP:53"; answers without a port.
    let mut ips: Vec<Ipv4Addr> = text
        .lines()
        .skip_while(|l| !l.starts_with("Name:"))
        .filter_map(|l| l.strip_prefix("Address:"))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    ips.sort();
    if ips.is_empty() {
        return Err(format!("no answer: {text}"));
    }
    Ok(ips)
}

/// Polls `resolve` until it gives `want` (sorted).
async fn resolve_until(lab: &LabGuard, from: &str, name: &str, want: Result<Vec<Ipv4Addr>, String>) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = resolve(lab, from, name);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} from {from}: got {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// An HTTP GET made from a container on `from`.
fn http_get(lab: &LabGuard, from: &str, url: &str) -> String {
    // (busybox 1.35's `wget -T` crashes: bound it with `timeout` instead.)
    let out = lab
        .run_container(from, &["timeout", "10", "wget", "-q", "-O", "-", url])
        .unwrap();
    assert!(
        out.status.success(),
        "GET {url} from {from}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Berth's containers on a node: name → (ID, state, started at).
fn containers(lab: &LabGuard, node: &str) -> BTreeMap<String, (String, String, i64)> {
    let out = lab
        .podman(
            node,
            &["ps", "-a", "--filter", "label=io.berth.owner=berth", "--format", "json"],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "podman ps: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.iter()
        .map(|c| {
            (
                c["Names"][0].as_str().unwrap_or_default().to_string(),
                (
                    c["Id"].as_str().unwrap_or_default().to_string(),
                    c["State"].as_str().unwrap_or_default().to_string(),
                    c["StartedAt"].as_i64().unwrap_or_default(),
                ),
            )
        })
        .collect()
}

fn ips(info: &ServiceInfo) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = info.replicas.iter().map(|r| r.ip).collect();
    v.sort();
    v
}

fn secret_value() -> String {
    format!("s3cret-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_lifecycle_dns_health_and_secrets() {
    let lab = lab_up(205, 3).await;
    let admin = lab.admin().unwrap();
    let secret = secret_value();

    // Two replicas pinned to n1 and n2; n3 only looks them up.
    let deployed = admin
        .deploy_service(&web(&lab, 2, &["n1", "n2"], &secret))
        .await
        .unwrap();
    let info = wait_running(&lab, "web", 2).await;
    let mut nodes: Vec<&str> = info.replicas.iter().map(|r| r.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"]);

    // From a container on n3: the name gives both replicas, and each answers
    // over the mesh; the env and the secret are in the container's environment.
    resolve_until(&lab, "n3", "web.internal", Ok(ips(&info))).await;
    // `berth lab run` containers take the subnet's .254; the replicas see that
    // address as the client: no NAT on the way across the mesh.
    let n3 = admin
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.name == "n3")
        .unwrap();
    let [a, b, c, _] = n3
        .subnet
        .split('/')
        .next()
        .unwrap()
        .parse::<Ipv4Addr>()
        .unwrap()
        .octets();
    let client = Ipv4Addr::new(a, b, c, 254);
    for r in &info.replicas {
        let env = http_get(&lab, "n3", &format!("http://{}:8080/cgi-bin/env", r.ip));
        // (busybox httpd prints it IPv4-mapped.)
        assert!(
            env.contains(&format!("REMOTE_ADDR=[::ffff:{client}]")),
            "source address rewritten: {env}"
        );
        assert!(env.contains("GREETING=hello-from-berth"), "{env}");
        assert!(
            env.contains(&format!("API_KEY={secret}")),
            "secret missing in {}",
            r.replica
        );
        assert!(env.contains(&format!("HOSTNAME={}", r.replica)), "{env}");
        let one = resolve(&lab, "n3", &format!("{}.web.internal", r.replica)).unwrap();
        assert_eq!(one, vec![r.ip]);
    }
    assert!(http_get(&lab, "n3", "http://web:8080/index.html").contains("berth test"));
    let n1_mesh: Ipv4Addr = mesh_ip(&lab, "n1").await.parse().unwrap();
    assert_eq!(resolve(&lab, "n3", "n1.node.internal").unwrap(), vec![n1_mesh]);

    // The secret is in no API answer, no process list and no log.
    let api_text = serde_json::to_string(&deployed).unwrap()
        + &serde_json::to_string(&admin.show_service("web").await.unwrap()).unwrap()
        + &serde_json::to_string(&admin.list_services().await.unwrap()).unwrap();
    assert!(api_text.contains("API_KEY"), "the secret's name is shown");
    assert!(!api_text.contains(&secret), "the API echoed the secret");
    let ps = std::process::Command::new("ps")
        .args(["-eww", "-o", "args"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&ps.stdout).contains(&secret),
        "secret on a command line"
    );
    for entry in std::fs::read_dir(&lab.state.dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            assert!(!text.contains(&secret), "secret in {}", p.display());
        }
    }

    // Scale to 3 (the third lands on n1 or n2: pinned), then to 0.
    admin.scale_service("web", 3).await.unwrap();
    let info3 = wait_running(&lab, "web", 3).await;
    resolve_until(&lab, "n3", "web.internal", Ok(ips(&info3))).await;
    admin.scale_service("web", 0).await.unwrap();
    let deadline = Instant::now() + SETTLE;
    while !(containers(&lab, "n1").is_empty() && containers(&lab, "n2").is_empty()) {
        assert!(Instant::now() < deadline, "containers left after scale to 0");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(resolve(&lab, "n3", "web.internal").is_err());
    admin.scale_service("web", 2).await.unwrap();
    let info = wait_running(&lab, "web", 2).await;
    resolve_until(&lab, "n3", "web.internal", Ok(ips(&info))).await;

    // Kill n1's container: it comes back (restart policy or the agent).
    let on_n1 = info.replicas.iter().find(|r| r.node == "n1").unwrap().clone();
    let cname = format!("berth-{}", on_n1.replica);
    let (id_before, _, _) = containers(&lab, "n1")[&cname].clone();
    let out = lab.podman("n1", &["kill", &cname]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = containers(&lab, "n1");
        if now.get(&cname).is_some_and(|(_, state, _)| state == "running") {
            break;
        }
        assert!(Instant::now() < deadline, "{cname} did not come back: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The restart reaches `berth service show` with n1's next report.
    let deadline = Instant::now() + SETTLE;
    let info = loop {
        let info = wait_running(&lab, "web", 2).await;
        let back = info.replicas.iter().find(|r| r.replica == on_n1.replica).unwrap();
        if back.restarts >= 1 {
            break info;
        }
        assert!(Instant::now() < deadline, "restart not counted: {back:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(containers(&lab, "n1")[&cname].0, id_before, "restarted, not recreated");

    // Break its health check: it leaves DNS everywhere; fix it: it returns.
    let other = info.replicas.iter().find(|r| r.node == "n2").unwrap().ip;
    let out = lab.podman("n1", &["exec", &cname, "rm", "/www/index.html"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    resolve_until(&lab, "n3", "web.internal", Ok(vec![other])).await;
    resolve_until(&lab, "n1", "web.internal", Ok(vec![other])).await;
    let out = lab
        .podman(
            "n1",
            &["exec", &cname, "sh", "-c", "echo '<p>berth test</p>' > /www/index.html"],
        )
        .unwrap();
    assert!(out.status.success());
    resolve_until(&lab, "n3", "web.internal", Ok(ips(&info))).await;

    // Bad requests change nothing.
    let mut bad = web(&lab, 2, &["n9"], "x");
    assert!(admin
        .deploy_service(&bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("nodes"));
    bad = web(&lab, 2, &[], "x");
    bad.port = Some(0);
    assert!(admin
        .deploy_service(&bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("port"));
    assert_eq!(ips(&admin.show_service("web").await.unwrap()), ips(&info));

    // Remove: containers gone, the name is NXDOMAIN.
    admin.remove_service("web").await.unwrap();
    resolve_until(&lab, "n3", "web.internal", Err("NXDOMAIN".into())).await;
    let deadline = Instant::now() + SETTLE;
    while !(containers(&lab, "n1").is_empty() && containers(&lab, "n2").is_empty()) {
        assert!(Instant::now() < deadline, "containers left after remove");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_and_dns_outlive_the_agent_and_the_control_plane() {
    let mut lab = lab_up(206, 3).await;
    let admin = lab.admin().unwrap();
    admin
        .deploy_service(&web(&lab, 2, &["n1", "n2"], "unused"))
        .await
        .unwrap();
    let info = wait_running(&lab, "web", 2).await;
    resolve_until(&lab, "n3", "web.internal", Ok(ips(&info))).await;
    let before = containers(&lab, "n1");
    assert_eq!(before.len(), 1);

    // SIGKILL n1's agent and start a new one: same container, never restarted.
    let n1 = lab.node("n1").unwrap().index;
    lab.kill_agent(n1).unwrap();
    assert_eq!(
        containers(&lab, "n1"),
        before,
        "killing the agent touched the container"
    );
    lab.start_agent(n1, None).unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        containers(&lab, "n1"),
        before,
        "the new agent did not adopt the container"
    );
    wait_running(&lab, "web", 2).await;

    // Control plane down: names resolve, replicas answer; an agent restarted
    // meanwhile comes up from its cache and keeps serving DNS.
    lab.stop_cp().unwrap();
    resolve_until(&lab, "n3", "web.internal", Ok(ips(&info))).await;
    lab.kill_agent(n1).unwrap();
    lab.start_agent(n1, None).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    resolve_until(&lab, "n1", "web.internal", Ok(ips(&info))).await;
    for r in &info.replicas {
        assert!(http_get(&lab, "n3", &format!("http://{}:8080/index.html", r.ip)).contains("berth test"));
    }
    assert_eq!(containers(&lab, "n1"), before);
    lab.start_cp().await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    wait_running(&lab, "web", 2).await;
    assert_eq!(containers(&lab, "n1"), before);
}
