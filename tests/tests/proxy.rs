//! End-to-end: a proxy node with berth-proxy, a certificate from Pebble
//! (ACME) through the control plane, HTTPS and WebSockets routed across the
//! mesh to replicas on two workers.

use berth_protocol::routes::DomainSpec;
use berth_protocol::service::ServiceSpec;
use berth_tests::*;
use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

const SETTLE: Duration = Duration::from_secs(60);

fn web(lab: &Lab) -> ServiceSpec {
    ServiceSpec {
        health_http: Some("/index.html".into()),
        nodes: vec!["n1".into(), "n2".into()],
        ..demo::web_service(lab, "web", 2)
    }
}

async fn wait_cert(lab: &LabGuard, domain: &str) {
    let admin = lab.admin().unwrap();
    demo::wait_cert(&admin, domain, SETTLE).await.unwrap();
}

fn domain(name: &str) -> DomainSpec {
    DomainSpec {
        domain: name.into(),
        service: "web".into(),
        port: 8080,
        passthrough: false,
    }
}

/// The test image's WebSocket echo server (berth-ws-echo) listens on 8081.
const WS_PORT: u16 = 8081;

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A TLS client that trusts only the certificates in the PEM file `root`
/// (Pebble's issuing root) and offers HTTP/1.1, where WebSocket upgrades live.
fn tls_client(root: &Path) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root).expect("read the root") {
        roots.add(cert.expect("parse the root")).expect("add the root");
    }
    let mut cc = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cc))
}

/// Opens `wss://host/echo` through the proxy at `ip:443` (certificate
/// verified for `host`); returns the socket and the replica that answered
/// (the echo server's `X-Echo-Hostname`).
async fn ws_connect(tls: &tokio_rustls::TlsConnector, ip: &str, host: &str) -> anyhow::Result<(Ws, String)> {
    let t = Duration::from_secs(10);
    let tcp = tokio::time::timeout(t, TcpStream::connect((ip, 443))).await??;
    let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let stream = tokio::time::timeout(t, tls.connect(name, tcp)).await??;
    let (ws, resp) =
        tokio::time::timeout(t, tokio_tungstenite::client_async(format!("wss://{host}/echo"), stream)).await??;
    anyhow::ensure!(resp.status() == 101, "status {}", resp.status());
    let replica = resp
        .headers()
        .get("x-echo-hostname")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((ws, replica))
}

/// The next message on `ws` (10 s at most); panics on anything else.
async fn ws_next(ws: &mut Ws) -> Message {
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
        Ok(Some(Ok(m))) => m,
        other => panic!("no message from the echo server: {other:?}"),
    }
}

/// Text and binary messages of every length encoding (7-bit, 16-bit and
/// 64-bit) and a ping come back unchanged, one by one and pipelined; then the
/// close handshake completes with the status code we sent.
async fn ws_echo_session(ws: &mut Ws) {
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let messages = [
        Message::text("hello through berth-proxy"),
        Message::binary(vec![0u8, 1, 2, 0x7f, 0x80, 0xfe, 0xff]),
        Message::text("grüße, 世界 ⚓"),
        Message::text("x".repeat(300)),
        Message::binary(big),
        Message::text(""),
        Message::binary(Vec::new()),
    ];
    for m in &messages {
        ws.send(m.clone()).await.unwrap();
        assert_eq!(&ws_next(ws).await, m);
    }
    ws.send(Message::Ping(b"are you there"[..].into())).await.unwrap();
    assert_eq!(ws_next(ws).await, Message::Pong(b"are you there"[..].into()));
    // Pipelined: 20 messages out before any comes back, echoed in order.
    let burst: Vec<Message> = (0..20)
        .map(|i| {
            if i % 2 == 0 {
                Message::text(format!("burst {i}"))
            } else {
                Message::binary(vec![i as u8; i * 10])
            }
        })
        .collect();
    for m in &burst {
        ws.feed(m.clone()).await.unwrap();
    }
    ws.flush().await.unwrap();
    for m in &burst {
        assert_eq!(&ws_next(ws).await, m);
    }
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    match ws_next(ws).await {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected the close handshake, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap();
    assert!(
        end.is_none() || end.is_some_and(|r| r.is_err()),
        "the stream ends after close"
    );
}

/// SHA-256 of the leaf certificate a server at `ip:443` presents for `host`.
fn served_cert(ip: &str, host: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect {ip}:443 -servername {host} </dev/null 2>/dev/null | openssl x509 -noout -fingerprint -sha256"
        ))
        .output()
        .expect("openssl");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The pid of the berth-proxy running in a node's namespace.
fn lab_proxy_pid(lab: &LabGuard, node: &str) -> u32 {
    let ns = lab.net.node_ns(lab.node(node).unwrap().index);
    let pids = berth_lab::net::ns_program_pids(&ns, "berth-proxy").unwrap();
    assert_eq!(pids.len(), 1, "berth-proxy processes in {node}: {pids:?}");
    pids[0]
}

/// curl from the host to the proxy at `ip`, the domain resolved to it.
fn curl(ip: &str, root: &std::path::Path, url: &str, extra: &[&str]) -> (String, String) {
    let host = url.split("://").nth(1).unwrap().split('/').next().unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(root)
        .args([
            "--resolve",
            &format!("{host}:443:{ip}"),
            "--resolve",
            &format!("{host}:80:{ip}"),
        ])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        body.to_string(),
        format!("{status} {}", String::from_utf8_lossy(&out.stderr).trim()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_through_the_proxy_with_an_acme_certificate() {
    let mut lab = lab_up(207, 2).await;
    let proxy = lab.add_node(true).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    lab.start_pebble(&proxy).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let admin = lab.admin().unwrap();
    admin.deploy_service(&web(&lab)).await.unwrap();
    let proxy_ip = lab.net.node_ip(lab.node(&proxy).unwrap().index).to_string();

    // HTTP-01, answered by berth-proxy on port 80. ws.example.com goes to
    // the same service's WebSocket echo server (port 8081).
    admin.add_domain(&domain("app.example.com")).await.unwrap();
    admin
        .add_domain(&DomainSpec {
            port: WS_PORT,
            ..domain("ws.example.com")
        })
        .await
        .unwrap();
    wait_cert(&lab, "app.example.com").await;
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

    // Server-sent events stream through unbuffered: the first event arrives
    // while the replica's script still waits to send the second.
    let mut sse = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "40", "--cacert"])
        .arg(&root)
        .args(["--resolve", &format!("app.example.com:443:{proxy_ip}")])
        .arg("https://app.example.com/cgi-bin/sse")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = sse.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("data:") && tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(first.as_deref(), Ok("data: first"), "first event not streamed");
    assert!(rx.try_recv().is_err(), "the second event came before it was released");
    // Release it in every replica (whichever one serves this stream).
    for node in ["n1", "n2"] {
        for name in ["berth-web-1", "berth-web-2"] {
            let _ = lab.podman(node, &["exec", name, "touch", "/tmp/sse-go"]);
        }
    }
    assert_eq!(rx.recv_timeout(Duration::from_secs(20)).as_deref(), Ok("data: second"));
    let _ = sse.wait();

    // A WebSocket echo through the proxy: TLS with ws.example.com's Pebble
    // certificate, the upgrade forwarded across the mesh to the echo server
    // of a replica on a worker. New sockets go round the replicas: both are
    // reached, each on a worker, never on the proxy node.
    wait_cert(&lab, "ws.example.com").await;
    let tls = tls_client(&root);
    let deadline = Instant::now() + SETTLE;
    let mut replicas = BTreeSet::new();
    while replicas.len() < 2 {
        // Until the proxy has the certificate and the route, connecting may
        // fail; once a socket is open, everything on it must work.
        let (mut ws, replica) = match ws_connect(&tls, &proxy_ip, "ws.example.com").await {
            Ok(c) => c,
            Err(e) => {
                assert!(Instant::now() < deadline, "WebSocket through the proxy: {e:#}");
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            }
        };
        ws_echo_session(&mut ws).await;
        let on: Vec<&str> = ["n1", "n2", proxy.as_str()]
            .into_iter()
            .filter(|n| {
                lab.podman(n, &["container", "exists", &format!("berth-{replica}")])
                    .is_ok_and(|o| o.status.success())
            })
            .collect();
        assert!(on == ["n1"] || on == ["n2"], "replica {replica:?} runs on {on:?}");
        replicas.insert(replica);
        assert!(Instant::now() < deadline, "replicas reached: {replicas:?}");
    }
    assert_eq!(replicas, BTreeSet::from(["web-1".to_string(), "web-2".to_string()]));

    // A replica's container removed under load: its requests are retried on
    // the other replica until the agent has recreated it; none fails.
    let out = lab.podman("n1", &["rm", "-f", "-t", "0", "berth-web-1"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..30 {
        let (_, status) = curl(&proxy_ip, &root, "https://app.example.com/index.html", &[]);
        assert!(status.starts_with("200"), "{status}");
    }

    // A TCP route carries traffic.
    admin
        .add_tcp_route(&berth_protocol::routes::TcpRouteSpec {
            listen: 9000,
            service: "web".into(),
            port: 8080,
        })
        .await
        .unwrap();
    let deadline = Instant::now() + SETTLE;
    loop {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", &format!("http://{proxy_ip}:9000/index.html")])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains("berth test") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TCP route: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // TLS-ALPN-01 for a second domain, answered by berth-proxy on port 443.
    lab.set_acme_challenge("tls-alpn-01").await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let admin = lab.admin().unwrap();
    admin.add_domain(&domain("alpn.example.com")).await.unwrap();
    wait_cert(&lab, "alpn.example.com").await;
    // The certificate reaches the proxy with its next revision.
    let deadline = Instant::now() + SETTLE;
    loop {
        let (body, status) = curl(&proxy_ip, &root, "https://alpn.example.com/index.html", &[]);
        if status.starts_with("200") && body.contains("berth test") {
            break;
        }
        assert!(Instant::now() < deadline, "alpn.example.com: {status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // A second proxy serves the same certificates; Pebble saw one order per domain.
    let proxy2 = lab.add_node(true).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let proxy2_ip = lab.net.node_ip(lab.node(&proxy2).unwrap().index).to_string();
    let deadline = Instant::now() + SETTLE;
    loop {
        let (_, status) = curl(&proxy2_ip, &root, "https://app.example.com/index.html", &[]);
        if status.starts_with("200") {
            break;
        }
        assert!(Instant::now() < deadline, "second proxy: {status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for host in ["app.example.com", "ws.example.com", "alpn.example.com"] {
        let one = served_cert(&proxy_ip, host);
        assert!(one.contains("Fingerprint"), "{one}");
        assert_eq!(served_cert(&proxy2_ip, host), one, "{host}");
    }
    assert_eq!(pebble.orders(), 3, "one order per domain");

    // berth-proxy runs as nobody with CAP_NET_BIND_SERVICE only.
    let pid = lab_proxy_pid(&lab, &proxy);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert_eq!(field("Uid:").split_whitespace().next(), Some("65534"), "{status}");
    assert_eq!(field("CapEff:"), "0000000000000400", "only CAP_NET_BIND_SERVICE");

    // SIGKILL the proxy node's agent: berth-proxy keeps serving.
    let pidx = lab.node(&proxy).unwrap().index;
    lab.kill_agent(pidx).unwrap();
    for _ in 0..20 {
        let (_, status) = curl(&proxy_ip, &root, "https://app.example.com/index.html", &[]);
        assert!(status.starts_with("200"), "{status}");
    }
    lab.start_agent(pidx, None).unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        lab_proxy_pid(&lab, &proxy),
        pid,
        "the new agent adopted the running proxy"
    );
    let (_, status) = curl(&proxy_ip, &root, "https://app.example.com/index.html", &[]);
    assert!(status.starts_with("200"), "{status}");
}

/// The row of `domain` in `berth domain list`, split on whitespace.
fn domain_list_row(lab: &LabGuard, domain: &str) -> Vec<String> {
    let out = berth(lab, &["domain", "list"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().next().unwrap_or_default().contains("PROXIES"), "{text}");
    text.lines()
        .find(|l| l.starts_with(&format!("{domain} ")))
        .unwrap_or_else(|| panic!("{domain} not in\n{text}"))
        .split_whitespace()
        .map(String::from)
        .collect()
}

/// Waits until `domain` is served by `serving` of `online` online proxies.
async fn wait_proxies(lab: &LabGuard, domain: &str, serving: u32, online: u32) {
    let admin = lab.admin().unwrap();
    let deadline = Instant::now() + SETTLE;
    loop {
        let d = admin.get_domain(domain).await.unwrap();
        assert!(d.proxies_serving <= d.proxies_online, "{d:?}");
        if (d.proxies_serving, d.proxies_online) == (serving, online) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{domain}: want {serving}/{online}, have {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Node `name`'s desired and applied revisions.
async fn revisions(lab: &LabGuard, name: &str) -> (u64, u64) {
    let nodes = lab.admin().unwrap().list_nodes().await.unwrap();
    let n = nodes.iter().find(|n| n.name == name).unwrap();
    (n.revision, n.applied_revision)
}

async fn applied(lab: &LabGuard, name: &str) -> u64 {
    revisions(lab, name).await.1
}

/// Issue 12 (i): `berth domain list` counts the online proxies that serve a
/// domain (`1/1`, then `2/2` once a second proxy loaded the certificate),
/// `domain add --wait` returns once it is served, and a proxy whose
/// berth-proxy has not loaded a revision does not report it applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_is_served_when_every_proxy_serves_it() {
    let mut lab = lab_up(208, 1).await;
    let proxy = lab.add_node(true).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    lab.start_pebble(&proxy).await.unwrap();
    lab.wait_converged(SETTLE).await.unwrap();
    let admin = lab.admin().unwrap();
    let web = ServiceSpec {
        nodes: vec!["n1".into()],
        ..demo::web_service(&lab, "web", 1)
    };
    admin.deploy_service(&web).await.unwrap();
    demo::wait_healthy(&admin, "web", 1, SETTLE, |_| {}).await.unwrap();
    let host = "app.example.com";
    let proxy_ip = lab.net.node_ip(lab.node(&proxy).unwrap().index).to_string();

    // `domain add --wait` returns once the certificate is issued and the
    // one proxy serves it; the list says 1/1.
    let out = berth(
        &lab,
        &[
            "domain",
            "add",
            host,
            "--service",
            "web",
            "--port",
            "8080",
            "--wait",
            "--timeout",
            "90",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("{host}: certificate valid until")) && stdout.contains("served by 1/1 online proxies"),
        "{stdout}"
    );
    let row = domain_list_row(&lab, host);
    assert_eq!(row[3..5], ["valid", "1/1"], "{row:?}");
    // Served means the TLS handshake works at once (no alert for a missing
    // certificate), with the Pebble certificate.
    let root = lab.state.dir.join("pebble-root.pem");
    let pebble = lab.state.pebble.clone().unwrap();
    std::fs::write(&root, pebble.issuing_root().await.unwrap()).unwrap();
    let first = served_cert(&proxy_ip, host);
    assert!(first.contains("Fingerprint"), "{first}");
    let (body, status) = curl(&proxy_ip, &root, &format!("https://{host}/index.html"), &[]);
    assert!(status.starts_with("200") && body.contains("berth test"), "{status}");

    // A second proxy joins: online at its first report, serving once its
    // berth-proxy loaded the certificate: 2/2.
    let proxy2 = lab.add_node(true).await.unwrap();
    let proxy2_ip = lab.net.node_ip(lab.node(&proxy2).unwrap().index).to_string();
    wait_proxies(&lab, host, 2, 2).await;
    let row = domain_list_row(&lab, host);
    assert_eq!(row[3..5], ["valid", "2/2"], "{row:?}");
    assert_eq!(
        served_cert(&proxy2_ip, host),
        first,
        "the second proxy serves the same certificate"
    );
    let deadline = Instant::now() + SETTLE;
    loop {
        // The route also needs the mesh to the replica's node.
        let (body, status) = curl(&proxy2_ip, &root, &format!("https://{host}/index.html"), &[]);
        if status.starts_with("200") && body.contains("berth test") {
            break;
        }
        assert!(Instant::now() < deadline, "through the second proxy: {status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    lab.wait_converged(SETTLE).await.unwrap();

    // The second proxy's berth-proxy stopped (SIGSTOP): a new route is
    // applied by the first proxy, not by the second, whose agent keeps
    // reporting the previous revision, and the route is served by 1/2.
    // Once it runs again, it loads the route and the revision is applied.
    let pid = lab_proxy_pid(&lab, &proxy2).to_string();
    let signal = |sig: &str| {
        let st = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(st.success(), "kill {sig} {pid}");
    };
    let before = applied(&lab, &proxy2).await;
    signal("-STOP");
    let tls = "tls.example.com";
    admin
        .add_domain(&DomainSpec {
            passthrough: true,
            ..domain(tls)
        })
        .await
        .unwrap();
    // The revision that brings the route (both proxies get the same).
    let rev = revisions(&lab, &proxy2).await.0;
    assert!(rev > before);
    wait_proxies(&lab, tls, 1, 2).await;
    let deadline = Instant::now() + SETTLE;
    while applied(&lab, &proxy).await < rev {
        assert!(Instant::now() < deadline, "the first proxy did not apply {rev}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its agent applied everything else long ago (and reports every few s).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let stuck = applied(&lab, &proxy2).await;
    assert!(
        (before..rev).contains(&stuck),
        "a stopped berth-proxy: applied {stuck}, before {before}, new {rev}"
    );
    assert_eq!(domain_list_row(&lab, tls)[3..5], ["passthrough", "1/2"]);
    signal("-CONT");
    wait_proxies(&lab, tls, 2, 2).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while applied(&lab, &proxy2).await < rev {
        assert!(
            Instant::now() < deadline,
            "{proxy2} did not apply {rev} once berth-proxy ran again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, status) = curl(&proxy2_ip, &root, &format!("https://{host}/index.html"), &[]);
    assert!(status.starts_with("200"), "{status}");
}
