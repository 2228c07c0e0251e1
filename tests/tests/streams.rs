//! End-to-end: `berth logs` and `berth exec` on a lab of two workers. A
//! service prints a numbered line every 100 ms on both. Its log reaches the
//! CLI from both nodes, each replica's lines in order with none missing,
//! and a followed log takes in the replicas a rollout starts. Exec runs
//! commands with their exit codes, pipes stdin, and drives a shell through
//! a terminal. `berth nodes logs` reads and follows an agent's own log.
//! Killing the CLI ends the streams on the control plane and
//! the agents. `berth events -f` sees the rollout's steps and the new
//! replicas' health. A wrong admin token gets nothing, and a reader that takes
//! nothing is cut off without the agent's memory growing.

use berth_client::{AdminClient, ClientConfig, ExecQuery, LogsQuery};
use berth_protocol::event::{Event, EventKind};
use berth_protocol::service::ServiceSpec;
use berth_protocol::stream::LogLine;
use berth_protocol::ErrorCode;
use berth_tests::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(60);
const TICKER: &str = "i=0; while true; do echo \"tick $i\"; i=$((i+1)); sleep 0.1; done";

fn ticker(lab: &Lab, name: &str, env: &str) -> ServiceSpec {
    ServiceSpec {
        command: Some(TICKER.into()),
        port: None,
        health_http: None,
        env: BTreeMap::from([("RUN".to_string(), env.to_string())]),
        ..demo::web_service(lab, name, 2)
    }
}

/// The numbers of each replica's `tick N` lines, in the order they came.
fn ticks(lines: &[LogLine]) -> BTreeMap<String, Vec<u64>> {
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for l in lines {
        if let Some(n) = l.line.as_deref().and_then(|t| t.strip_prefix("tick ")) {
            out.entry(l.replica.clone()).or_default().push(n.parse().unwrap());
        }
    }
    out
}

/// Each replica's numbers go up by one: nothing lost, nothing reordered.
fn assert_consecutive(ticks: &BTreeMap<String, Vec<u64>>) {
    for (replica, ns) in ticks {
        for w in ns.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{replica}: {} follows {} in {ns:?}", w[1], w[0]);
        }
    }
}

/// Live streams: the control plane's (`berth_streams_open`), then each
/// agent's (`berth_agent_streams_open`), read from their metrics.
fn streams_open(lab: &Lab) -> Vec<u64> {
    let read = |args: &[&str], metric: &str| -> u64 {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "5"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {metric} in {text}"))
    };
    let cfg = lab.client_config();
    let token = std::fs::read_to_string(&cfg.admin_token_file).unwrap();
    let mut out = vec![read(
        &[
            "--cacert",
            cfg.ca_file.to_str().unwrap(),
            "-H",
            &format!("Authorization: Bearer {}", token.trim()),
            &format!("{}/metrics", cfg.url),
        ],
        "berth_streams_open",
    )];
    for n in &lab.state.nodes {
        let url = format!(
            "http://{}:{}/metrics",
            lab.net.node_ip(n.index),
            berth_lab::AGENT_METRICS_PORT
        );
        out.push(read(&[&url], "berth_agent_streams_open"));
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_exec_reach_every_replica() {
    let lab = lab_up(213, 2).await;
    let admin = lab.admin().unwrap();
    admin.deploy_service(&ticker(&lab, "ticker", "1")).await.unwrap();
    let info = demo::wait_healthy(&admin, "ticker", 2, SETTLE, |_| {}).await.unwrap();
    let nodes: BTreeSet<&str> = info.replicas.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "one replica per node: {:?}", info.replicas);
    let first: BTreeSet<String> = info.replicas.iter().map(|r| r.replica.clone()).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. The last lines of both replicas, each in order.
    let mut lines = vec![];
    let q = LogsQuery {
        tail: Some(20),
        ..Default::default()
    };
    admin.service_logs("ticker", &q, |l| lines.push(l)).await.unwrap();
    let got = ticks(&lines);
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), first, "{lines:?}");
    for ns in got.values() {
        assert_eq!(ns.len(), 20, "--tail 20: {ns:?}");
    }
    assert_consecutive(&got);
    let (text, notices): (Vec<&LogLine>, Vec<&LogLine>) = lines.iter().partition(|l| l.line.is_some());
    assert!(
        text.iter()
            .all(|l| l.ts.is_some() && l.stream.as_deref() == Some("stdout")),
        "{text:?}"
    );
    // Without -f, each replica's stream ends, and says so.
    assert_eq!(notices.len(), 2, "{notices:?}");
    assert!(
        notices.iter().all(|n| n.notice.as_deref() == Some("ended")),
        "{notices:?}"
    );
    // The CLI shows them after their replica.
    let out = berth(&lab, &["logs", "ticker", "--tail", "3"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    for r in &first {
        assert!(text.contains(&format!("{r} | tick ")), "{text}");
    }

    // The agent's own log, from its --log-file.
    let out = berth(&lab, &["nodes", "logs", "n1", "--tail", "5", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let own: Vec<LogLine> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (own_lines, own_notices): (Vec<&LogLine>, Vec<&LogLine>) = own.iter().partition(|l| l.line.is_some());
    assert_eq!(own_lines.len(), 5, "{own:?}");
    assert!(own_lines.iter().all(|l| l.replica == "n1" && l.ts.is_some()), "{own:?}");
    assert_eq!(own_notices.len(), 1, "{own:?}");
    let e = admin.node_logs("n9", &LogsQuery::default(), |_| {}).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");

    // 2. `-f` through a rollout: the new replicas' lines come in too.
    let mut follow = berth_command(&lab, &["logs", "ticker", "-f", "--json", "--tail", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::<LogLine>::new()));
    let reader = {
        let seen = seen.clone();
        let stdout = follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                seen.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).expect("--json lines"));
            }
        })
    };
    // The event stream, followed from now on.
    let mut events = berth_command(&lab, &["events", "-f", "--json", "--service", "ticker", "--tail", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let got_events = Arc::new(Mutex::new(Vec::<Event>::new()));
    let events_reader = {
        let got = got_events.clone();
        let stdout = events.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                got.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).expect("--json events"));
            }
        })
    };
    // And the agents' own logs, followed: a rollout makes them write.
    let mut own_follow = berth_command(&lab, &["nodes", "logs", "n2", "-f", "--tail", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let own_lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let own_reader = {
        let got = own_lines.clone();
        let stdout = own_follow.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                got.lock().unwrap().push(line);
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    admin.deploy_service(&ticker(&lab, "ticker", "2")).await.unwrap();
    let deadline = Instant::now() + SETTLE;
    let new = loop {
        let now = ticks(&seen.lock().unwrap());
        let new: Vec<String> = now.keys().filter(|r| !first.contains(*r)).cloned().collect();
        if new.len() == 2 && new.iter().all(|r| now[r].len() >= 5) {
            break new;
        }
        assert!(
            Instant::now() < deadline,
            "no new replicas in the followed log: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = follow.kill();
    let _ = follow.wait();
    reader.join().unwrap();
    let all = seen.lock().unwrap().clone();
    let got = ticks(&all);
    assert_consecutive(&got);
    for r in &new {
        // A new replica's log is read from its start.
        assert_eq!(got[r][0], 0, "{r}: {:?}", got[r]);
    }
    assert!(
        all.iter()
            .any(|l| l.notice.as_deref().is_some_and(|n| n.starts_with("new replica"))),
        "{all:?}"
    );

    // The deploy's steps and the new replicas' health changes, as they came.
    demo::wait_healthy(&admin, "ticker", 2, SETTLE, |_| {}).await.unwrap();
    let deadline = Instant::now() + SETTLE;
    loop {
        let got = got_events.lock().unwrap().clone();
        let has = |kind: EventKind, text: &str| got.iter().any(|e| e.kind == kind && e.message.contains(text));
        let healthy = new.iter().all(|r| has(EventKind::Health, &format!("{r} healthy")));
        if has(EventKind::Deploy, "release 2")
            && has(EventKind::Rollout, "done")
            && has(EventKind::Release, "release 2 complete")
            && healthy
        {
            assert!(got.iter().all(|e| e.service.as_deref() == Some("ticker")), "{got:#?}");
            break;
        }
        assert!(Instant::now() < deadline, "berth events -f saw: {got:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = events.kill();
    let _ = events.wait();
    events_reader.join().unwrap();
    let _ = own_follow.kill();
    let _ = own_follow.wait();
    own_reader.join().unwrap();
    let own = own_lines.lock().unwrap().clone();
    assert!(
        own.iter().any(|l| l.starts_with("n2 | ")),
        "berth nodes logs n2 -f: {own:?}"
    );
    // Killing the CLIs (logs -f, nodes logs -f) ended their streams: the control plane's, and each agent's.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let open = streams_open(&lab);
        if open.iter().all(|n| *n == 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "streams still open after the CLI was killed: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 3. Exec: exit codes, both streams, stdin through a pipe.
    let out = berth(&lab, &["exec", "ticker", "--", "hostname"]);
    assert!(out.status.success(), "{out:?}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty(), "{out:?}");
    let out = berth(&lab, &["exec", "ticker", "--", "sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let replica = &new[0];
    let target = format!("ticker/{replica}");
    let out = berth(&lab, &["exec", &target, "--", "sh", "-c", "echo out; echo err >&2"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n", "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n", "{out:?}");
    let mut piped = berth_command(&lab, &["exec", "-i", &target, "--", "sh"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    piped
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo piped-$((40+2))\nexit 5\n")
        .unwrap();
    let out = piped.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped-42\n");

    // 4. A shell with a terminal, driven through a pseudo-terminal
    // (script(1) gives the CLI one; -e returns the CLI's exit code).
    let cli = berth_command(&lab, &[]);
    let envs: Vec<String> = cli
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v?.to_str()?)))
        .collect();
    let line = format!(
        "env {} {} exec -it {target} -- sh",
        envs.join(" "),
        cli.get_program().to_str().unwrap()
    );
    let mut pty = std::process::Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = pty.stdin.take().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    input.write_all(b"tty -s && echo pty-$((6*7))\r").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    input.write_all(b"exit 7\r").unwrap();
    let out = tokio::task::block_in_place(|| pty.wait_with_output()).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pty-42"), "{text:?}");
    assert_eq!(out.status.code(), Some(7), "{text:?}");

    // 5. A wrong admin token streams nothing.
    let bad = lab.state.dir.join("wrong.token");
    std::fs::write(&bad, "not-the-token").unwrap();
    let intruder = AdminClient::new(&ClientConfig {
        admin_token_file: bad,
        ..lab.client_config()
    })
    .unwrap();
    let e = intruder
        .service_logs("ticker", &LogsQuery::default(), |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e}");
    let e = intruder
        .exec_socket(
            "ticker",
            &ExecQuery {
                cmd: vec!["hostname".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized), "{e}");
    let e = admin
        .service_logs("nope", &LogsQuery::default(), |_| {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound), "{e}");

    // 6. A reader that takes nothing: the stream is cut, and the agent
    // does not hold what the reader left.
    let flood = ServiceSpec {
        // About 250 KB/s: past any socket buffer in seconds, and under
        // the container log's 10 MiB cap in the test's time.
        command: Some(
            "while true; do echo xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; usleep 200; done"
                .into(),
        ),
        replicas: 1,
        ..ticker(&lab, "flood", "1")
    };
    let flood_info = {
        admin.deploy_service(&flood).await.unwrap();
        demo::wait_healthy(&admin, "flood", 1, SETTLE, |_| {}).await.unwrap()
    };
    let node = lab.node(&flood_info.replicas[0].node).unwrap();
    let agent = node.agent_pid.unwrap();
    let before = rss_kib(agent);
    let mut stalled = StalledReader::open(&lab, "/v1/services/flood/logs?follow=true").await;
    // Read nothing until the control plane cuts the stream: its buffers
    // (socket, channel) fill first, at the flood's pace, which a loaded
    // machine slows; then the send stalls for --stream-stall-secs.
    let stall_start = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = rss_kib(agent);
    while streams_open(&lab)[0] > 0 && stall_start.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!("stalled reader: cut after {:?}", stall_start.elapsed());
    let (bytes, ended) = stalled.drain(Duration::from_secs(30)).await;
    eprintln!("stalled reader: {bytes} bytes held until the cut; agent RSS {before} KiB before, {during} KiB during");
    assert!(ended, "the stalled stream was not cut ({bytes} bytes read)");
    assert!(
        bytes < 64 << 20,
        "{bytes} bytes were held for a reader that took nothing"
    );
    assert!(
        during < before + 20 * 1024,
        "agent RSS grew from {before} KiB to {during} KiB for a stalled reader"
    );
}

/// A follow request whose response is not read.
struct StalledReader {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl StalledReader {
    async fn open(lab: &Lab, path: &str) -> StalledReader {
        use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
        use tokio::io::AsyncWriteExt;
        let cfg = lab.client_config();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&cfg.ca_file).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let url = cfg.url.trim_start_matches("https://").to_string();
        let (host, port) = url.rsplit_once(':').unwrap();
        // A small receive buffer, so the control plane's side fills soon.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(16 * 1024).unwrap();
        let tcp = sock.connect(format!("{host}:{port}").parse().unwrap()).await.unwrap();
        let name = ServerName::try_from(host.to_string()).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        let token = std::fs::read_to_string(&cfg.admin_token_file).unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {}\r\n\r\n",
            token.trim()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        StalledReader { tls }
    }

    /// Reads what is left; whether the response ended within `within`.
    async fn drain(&mut self, within: Duration) -> (usize, bool) {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        let mut tail: Vec<u8> = vec![];
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.tls.read(&mut buf)).await {
                Err(_) => return (total, false),
                Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
                Ok(Ok(n)) => {
                    total += n;
                    tail.extend_from_slice(&buf[n.saturating_sub(8)..n]);
                    tail.drain(..tail.len().saturating_sub(8));
                    // The chunked body's last chunk: the response is over.
                    if tail.ends_with(b"\r\n0\r\n\r\n") {
                        return (total, true);
                    }
                }
            }
        }
    }
}
