//! Certificates through ACME against a real Pebble (Debian package
//! `pebble`), which is started per test on loopback ports with
//! `PEBBLE_VA_ALWAYS_VALID=1`: this tests the order flow (account, order,
//! challenge published to the proxies, finalize, storage, distribution);
//! real HTTP-01/TLS-ALPN-01 validation is covered end to end in `tests/`.
//! DNS-01 is validated for real here: Pebble resolves through
//! `pebble-challtestsrv`, whose TXT records the test's DNS hook sets.
//! On SQLite and PostgreSQL.

#[macro_use]
mod common;

use berth_control_plane::acme::AcmeConfig;
use berth_protocol::proxy::{AlpnChallenge, Http01Challenge};
use berth_protocol::routes::{CertState, DomainInfo};
use berth_protocol::{DesiredState, StatusReport};
use common::{free_port, Cp, Db, Reply, SealedNode};
use reqwest::{Method, StatusCode};
use sqlx::Row;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

on_both_stores!(
    pebble_issues_one_certificate_for_every_proxy,
    pebble_tls_alpn_01,
    acme_failures_are_recorded,
    dns_01_through_the_hook_without_any_proxy,
    dns_01_wrong_txt_record_is_refused_by_the_ca,
    a_failing_dns_hook_fails_the_order
);

/// A Pebble process with its own CA-signed HTTPS certificate; killed on drop.
struct Pebble {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    mgmt_port: u16,
    ca_file: PathBuf,
}

impl Pebble {
    fn start() -> Pebble {
        Pebble::start_with(None)
    }

    /// With `dns`: Pebble resolves through that DNS server and really
    /// validates challenges; without: every challenge is taken as valid.
    fn start_with(dns: Option<SocketAddr>) -> Pebble {
        let found = Command::new("pebble")
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            found,
            "pebble is not installed: run `apt-get install -y pebble` (Debian) to run the ACME tests"
        );
        let dir = tempfile::tempdir().unwrap();
        // Pebble's HTTPS certificate must be a leaf signed by a CA.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "berth test pebble CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).unwrap();
        let (port, mgmt_port) = (free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.path().join("cert.pem"),
            "privateKey": dir.path().join("key.pem"),
            "httpPort": free_port(),
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }});
        let config_file = dir.path().join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let log = std::fs::File::create(dir.path().join("pebble.log")).unwrap();
        let mut cmd = Command::new("pebble");
        cmd.arg("-config").arg(&config_file);
        match dns {
            Some(dns) => cmd.arg("-dnsserver").arg(dns.to_string()),
            None => cmd.env("PEBBLE_VA_ALWAYS_VALID", "1"),
        };
        let child = cmd
            .env("PEBBLE_VA_NOSLEEP", "1")
            // Pebble rejects 5% of good nonces by default; keep runs deterministic.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = Pebble {
            child,
            dir,
            port,
            mgmt_port,
            ca_file,
        };
        p.wait_listening();
        p
    }

    fn wait_listening(&mut self) {
        for _ in 0..200 {
            let up = |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up(self.port) && up(self.mgmt_port) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("pebble exited ({st}):\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pebble did not listen within 10 s:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }

    fn directory(&self) -> String {
        format!("https://localhost:{}/dir", self.port)
    }

    /// Pebble's root CA (it issues from a fresh one at every start).
    async fn root(&self) -> String {
        let http = common::client(&std::fs::read(&self.ca_file).unwrap());
        let r = http
            .get(format!("https://localhost:{}/roots/0", self.mgmt_port))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        r.text().await.unwrap()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pebble-challtestsrv` serving DNS only (Pebble's resolver in the DNS-01
/// tests), TXT records set through its management API; killed on drop.
struct ChallTestSrv {
    child: Child,
    dns: SocketAddr,
    mgmt_port: u16,
    log: PathBuf,
}

impl ChallTestSrv {
    fn start(dir: &Path) -> ChallTestSrv {
        let dns: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mgmt_port = free_port();
        let log = dir.join("challtestsrv.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("pebble-challtestsrv")
            .args(["-dns01", &dns.to_string()])
            .args(["-management", &format!("127.0.0.1:{mgmt_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("pebble-challtestsrv is not installed (Debian package pebble)");
        let mut s = ChallTestSrv {
            child,
            dns,
            mgmt_port,
            log,
        };
        for _ in 0..200 {
            let up = |port| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            if up(s.dns.port()) && up(s.mgmt_port) {
                return s;
            }
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("pebble-challtestsrv exited ({st}):\n{}", s.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pebble-challtestsrv did not listen within 10 s:\n{}", s.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl ChallTestSrv {
    /// A DNS hook's body that sets (present) or clears (cleanup) the TXT
    /// record through the management API, as a real hook would through a
    /// DNS provider's API; `value` is what it publishes (`$3`: the right one).
    fn hook_body(&self, value: &str) -> String {
        format!(
            r#"case "$1" in
  present) path=set-txt; body="{{\"host\":\"$2\",\"value\":\"{value}\"}}" ;;
  cleanup) path=clear-txt; body="{{\"host\":\"$2\"}}" ;;
  *) echo "unknown action $1" >&2; exit 2 ;;
esac
curl -sS --fail -X POST -d "$body" "http://127.0.0.1:{}/$path""#,
            self.mgmt_port
        )
    }
}

impl Drop for ChallTestSrv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes an executable DNS hook: it logs every call to `calls` (one line,
/// "ACTION FQDN VALUE"), then runs `body`.
fn dns_hook(dir: &Path, calls: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let hook = dir.join("dns-hook.sh");
    let script = format!("#!/bin/sh\necho \"$1 $2 $3\" >> '{}'\n{body}\n", calls.display());
    std::fs::write(&hook, script).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    hook
}

async fn proxy_node(cp: &Cp, name: &str) -> SealedNode {
    cp.join_sealed(name, true).await
}

async fn report_applied(cp: &Cp, n: &SealedNode, applied: u64) {
    let r = StatusReport {
        applied_revision: applied,
        ..Default::default()
    };
    cp.report(&n.agent, &r).await;
}

/// Challenges a proxy was given.
#[derive(Default)]
struct Seen {
    http01: Vec<Http01Challenge>,
    alpn01: Vec<AlpnChallenge>,
}

/// Plays an online proxy agent: applies every desired state it is given
/// (reports its revision) and remembers the challenges it saw.
async fn fake_proxy(cp: &Cp, n: &SealedNode, seen: &Mutex<Seen>) {
    let mut applied = 0;
    loop {
        let r = cp.desired(&n.agent, applied, 2).await;
        if r.status == StatusCode::OK {
            let d: DesiredState = r.json();
            if let Some(p) = d.proxy {
                let mut seen = seen.lock().unwrap();
                seen.http01.extend(p.http01);
                seen.alpn01.extend(p.alpn01);
            }
            applied = d.revision;
        }
        report_applied(cp, n, applied).await;
    }
}

async fn domains(cp: &Cp) -> Vec<DomainInfo> {
    Reply::from(cp.admin(Method::GET, "/v1/domains").send().await.unwrap())
        .await
        .json()
}

/// Waits until `domain` reaches `state` (panics on another final state).
async fn wait_state(cp: &Cp, domain: &str, state: CertState, within: Duration) -> DomainInfo {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let d = domains(cp).await.into_iter().find(|d| d.spec.domain == domain).unwrap();
        if d.cert_state == state {
            return d;
        }
        if d.cert_state == CertState::Failed || tokio::time::Instant::now() > deadline {
            panic!("{domain}: wanted {state}, got {d:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn add_domain(cp: &Cp, domain: &str) {
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/domains")
            .json(&serde_json::json!({"domain": domain, "service": "web", "port": 8080}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
}

async fn deploy_web(cp: &Cp) {
    let r = Reply::from(
        cp.admin(Method::POST, "/v1/services")
            .json(&serde_json::json!({"name": "web", "image": "localhost/x:1", "replicas": 0, "port": 8080}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

fn verify_chain(chain_pem: &str, root_pem: &str, domain: &str) {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut root_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<CertificateDer> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(certs.len() >= 2, "leaf and intermediate expected");
    let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
        .build()
        .unwrap();
    verifier
        .verify_server_cert(
            &certs[0],
            &certs[1..],
            &ServerName::try_from(domain.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .expect("the chain verifies up to Pebble's root");
}

/// Every file of a SQLite store (main file and WAL).
fn sqlite_files(data_dir: &Path, url: &str) -> Vec<PathBuf> {
    let db = PathBuf::from(url.trim_start_matches("sqlite://"));
    let mut files = vec![db.clone(), db.with_extension("db-wal")];
    files.push(data_dir.join("cp.db"));
    files.into_iter().filter(|f| f.exists()).collect()
}

async fn pebble_issues_one_certificate_for_every_proxy(db: &Db) {
    let pebble = Pebble::start();
    let dir = tempfile::tempdir().unwrap();
    let mut acme = AcmeConfig::new(pebble.directory());
    acme.ca_file = Some(pebble.ca_file.clone());
    acme.contact = Some("mailto:ops@example.com".into());
    let cp = Cp::start_with(dir.path(), &db.url, None, Some(acme)).await;
    let p1 = proxy_node(&cp, "p1").await;
    report_applied(&cp, &p1, 0).await;
    deploy_web(&cp).await;
    add_domain(&cp, "app.example.com").await;

    // p1 is online: the task waits for it to apply the challenge.
    let seen = Mutex::new(Seen::default());
    let info = tokio::select! {
        _ = fake_proxy(&cp, &p1, &seen) => unreachable!(),
        d = wait_state(&cp, "app.example.com", CertState::Valid, Duration::from_secs(90)) => d,
    };
    assert!(info.last_error.is_none(), "{info:?}");
    assert!(info.cert_not_after.is_some());
    let seen = seen.into_inner().unwrap().http01;
    assert!(!seen.is_empty(), "the proxy was never given the HTTP-01 challenge");
    assert!(
        seen.iter()
            .all(|c| c.key_authorization.starts_with(&format!("{}.", c.token))),
        "{seen:?}"
    );

    // The certificate chains to Pebble's root; the key is stored sealed.
    let root = pebble.root().await;
    let row = sqlx::query("SELECT cert_chain, cert_key_sealed FROM domains WHERE domain = $1")
        .bind("app.example.com")
        .fetch_one(&cp.store().pool)
        .await
        .unwrap();
    let chain: String = row.get(0);
    let sealed: String = row.get(1);
    verify_chain(&chain, &root, "app.example.com");
    assert!(!sealed.contains("PRIVATE KEY"));
    let key_pem =
        String::from_utf8(berth_protocol::seal::open(&cp.started.state.secrets_key, &sealed).unwrap()).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    let (_, leaf) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
    let leaf = leaf.parse_x509().unwrap();
    assert_eq!(
        leaf.public_key().raw,
        key.public_key_der().as_slice(),
        "the key matches the leaf"
    );
    // Nothing secret in clear anywhere in the store: not the certificate
    // key, not the ACME account key.
    let settings = sqlx::query("SELECT key, value FROM settings")
        .fetch_all(&cp.store().pool)
        .await
        .unwrap();
    let account: Vec<String> = settings
        .iter()
        .filter(|r| r.get::<String, _>(0).starts_with("acme_account"))
        .map(|r| r.get(1))
        .collect();
    assert_eq!(account.len(), 1, "one ACME account stored");
    assert!(!account[0].contains("key_pkcs8"), "account credentials stored in clear");
    for f in sqlite_files(dir.path(), &db.url) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"PRIVATE KEY"),
            "a private key in clear in {}",
            f.display()
        );
    }

    // The challenge was withdrawn after issuance.
    let d: DesiredState = cp.desired(&p1.agent, 0, 1).await.json();
    let px = d.proxy.unwrap();
    assert!(px.http01.is_empty() && px.alpn01.is_empty());
    assert_eq!(px.certs.len(), 1);

    // A proxy that joins later gets the same certificate from the store,
    // its key sealed to that proxy, and no new order is made.
    let p2 = proxy_node(&cp, "p2").await;
    let d: DesiredState = cp.desired(&p2.agent, 0, 1).await.json();
    let certs = d.proxy.unwrap().certs;
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].chain_pem, chain);
    assert_eq!(px.certs[0].chain_pem, chain);
    let opened = berth_protocol::seal::open(&p2.seal, &certs[0].sealed_key_pem).unwrap();
    assert_eq!(String::from_utf8(opened).unwrap(), key_pem);
    assert!(berth_protocol::seal::open(&p1.seal, &certs[0].sealed_key_pem).is_err());
    cp.started.state.acme_wake.notify_one();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        cp.started.state.acme_orders.load(Ordering::Relaxed),
        1,
        "one order for the domain, whatever the number of proxies"
    );
    assert_eq!(domains(&cp).await[0].cert_state, CertState::Valid);
    let log = pebble.log();
    assert_eq!(
        log.matches("POST /order-plz").count(),
        1,
        "Pebble saw one order:\n{log}"
    );
    assert_eq!(log.matches("Issued certificate").count(), 1, "{log}");
}

async fn pebble_tls_alpn_01(db: &Db) {
    let pebble = Pebble::start();
    let dir = tempfile::tempdir().unwrap();
    let mut acme = AcmeConfig::new(pebble.directory());
    acme.ca_file = Some(pebble.ca_file.clone());
    acme.challenge = berth_control_plane::acme::ChallengeKind::TlsAlpn01;
    let cp = Cp::start_with(dir.path(), &db.url, None, Some(acme)).await;
    let p1 = proxy_node(&cp, "p1").await;
    report_applied(&cp, &p1, 0).await;
    deploy_web(&cp).await;
    add_domain(&cp, "alpn.example.com").await;
    let seen = Mutex::new(Seen::default());
    tokio::select! {
        _ = fake_proxy(&cp, &p1, &seen) => unreachable!(),
        _ = wait_state(&cp, "alpn.example.com", CertState::Valid, Duration::from_secs(90)) => {}
    };
    let seen = seen.into_inner().unwrap();
    assert!(seen.http01.is_empty());
    assert!(
        !seen.alpn01.is_empty(),
        "the proxy was never given the TLS-ALPN-01 challenge"
    );
    assert!(seen.alpn01.iter().all(|c| c.domain == "alpn.example.com"));
}

async fn acme_failures_are_recorded(db: &Db) {
    // Nothing listens on port 1: every attempt fails at the directory.
    let dir = tempfile::tempdir().unwrap();
    let cp = Cp::start_with(
        dir.path(),
        &db.url,
        None,
        Some(AcmeConfig::new("https://127.0.0.1:1/dir")),
    )
    .await;
    deploy_web(&cp).await;
    add_domain(&cp, "app.example.com").await;
    // The error is recorded, the API keeps answering, the next attempt waits.
    let info = wait_state(&cp, "app.example.com", CertState::Failed, Duration::from_secs(20)).await;
    assert!(
        info.last_error.as_deref().is_some_and(|e| e.contains("ACME account")),
        "{info:?}"
    );
    let next: i64 = sqlx::query("SELECT next_attempt_at FROM domains")
        .fetch_one(&cp.store().pool)
        .await
        .unwrap()
        .get(0);
    assert!(next >= common::now() + 20, "backs off ({next})");
    assert_eq!(cp.started.state.acme_orders.load(Ordering::Relaxed), 0);
}

async fn dns_01_through_the_hook_without_any_proxy(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let dns = ChallTestSrv::start(dir.path());
    let pebble = Pebble::start_with(Some(dns.dns));
    let calls = dir.path().join("calls.log");
    // The hook publishes and removes the TXT record through challtestsrv's
    // management API, as a real hook would through a DNS provider's API.
    let hook = dns_hook(dir.path(), &calls, &dns.hook_body("$3"));
    let mut acme = AcmeConfig::new(pebble.directory());
    acme.ca_file = Some(pebble.ca_file.clone());
    acme.challenge = berth_control_plane::acme::ChallengeKind::Dns01;
    acme.dns_hook = Some(hook);
    let cp = Cp::start_with(&dir.path().join("cp"), &db.url, None, Some(acme)).await;
    // No proxy node at all: DNS-01 does not need one.
    deploy_web(&cp).await;
    add_domain(&cp, "dns.example.com").await;
    let info = wait_state(&cp, "dns.example.com", CertState::Valid, Duration::from_secs(90)).await;
    assert!(info.last_error.is_none(), "{info:?}");

    // Pebble looked the TXT record up for real and issued a certificate
    // for the domain that chains to its root.
    let root = pebble.root().await;
    let chain: String = sqlx::query("SELECT cert_chain FROM domains WHERE domain = $1")
        .bind("dns.example.com")
        .fetch_one(&cp.store().pool)
        .await
        .unwrap()
        .get(0);
    verify_chain(&chain, &root, "dns.example.com");
    let (_, leaf) = x509_parser::pem::parse_x509_pem(chain.as_bytes()).unwrap();
    let leaf = leaf.parse_x509().unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, ["dns.example.com"]);
    let log = pebble.log();
    assert!(
        log.contains(&format!("Using custom DNS resolver for ACME challenges: {}", dns.dns)),
        "{log}"
    );

    // present, then cleanup with the same record; the record is gone.
    let calls = std::fs::read_to_string(&calls).unwrap();
    let lines: Vec<&str> = calls.lines().collect();
    assert_eq!(lines.len(), 2, "{calls}");
    let present: Vec<&str> = lines[0].split(' ').collect();
    assert_eq!(present[..2], ["present", "_acme-challenge.dns.example.com."], "{calls}");
    // base64url of a SHA-256 digest, no padding.
    assert_eq!(present[2].len(), 43, "{calls}");
    assert_eq!(lines[1], lines[0].replacen("present", "cleanup", 1), "{calls}");
    // The server writes its log line after answering the hook's cleanup
    // call: give it a moment to reach the file.
    let removed = "Removed DNS-01 TXT challenge for Host \"_acme-challenge.dns.example.com.\"";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !dns.log().contains(removed) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let srv = dns.log();
    assert!(
        srv.contains("Added DNS-01 TXT challenge for Host \"_acme-challenge.dns.example.com.\""),
        "{srv}"
    );
    assert!(
        srv.contains("Removed DNS-01 TXT challenge for Host \"_acme-challenge.dns.example.com.\""),
        "{srv}"
    );

    // Nothing was published to proxies.
    let n: i64 = sqlx::query("SELECT COUNT(*) FROM acme_challenges")
        .fetch_one(&cp.store().pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

async fn a_failing_dns_hook_fails_the_order(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let dns = ChallTestSrv::start(dir.path());
    let pebble = Pebble::start_with(Some(dns.dns));
    let calls = dir.path().join("calls.log");
    let hook = dns_hook(
        dir.path(),
        &calls,
        r#"[ "$1" = cleanup ] && exit 0
echo "zone example.com is not managed by this account" >&2
exit 3"#,
    );
    let mut acme = AcmeConfig::new(pebble.directory());
    acme.ca_file = Some(pebble.ca_file.clone());
    acme.challenge = berth_control_plane::acme::ChallengeKind::Dns01;
    acme.dns_hook = Some(hook.clone());
    let cp = Cp::start_with(&dir.path().join("cp"), &db.url, None, Some(acme)).await;
    deploy_web(&cp).await;
    add_domain(&cp, "dns.example.com").await;

    // The hook's message is the domain's error; no certificate; backoff.
    let info = wait_state(&cp, "dns.example.com", CertState::Failed, Duration::from_secs(60)).await;
    let err = info.last_error.clone().unwrap_or_default();
    assert!(
        err.contains("zone example.com is not managed by this account"),
        "{info:?}"
    );
    assert!(
        err.contains(&format!(
            "DNS hook {} present _acme-challenge.dns.example.com.",
            hook.display()
        )),
        "{info:?}"
    );
    assert!(info.cert_not_after.is_none());
    let row = sqlx::query("SELECT cert_chain, next_attempt_at FROM domains WHERE domain = $1")
        .bind("dns.example.com")
        .fetch_one(&cp.store().pool)
        .await
        .unwrap();
    assert!(row.get::<Option<String>, _>(0).is_none());
    assert!(row.get::<i64, _>(1) >= common::now() + 20, "backs off");
    // The CA was never told the challenge was ready, so nothing was issued;
    // cleanup still ran.
    let log = pebble.log();
    assert_eq!(log.matches("Issued certificate").count(), 0, "{log}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    let actions: Vec<&str> = calls.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(actions, ["present", "cleanup"], "{calls}");
}

async fn dns_01_wrong_txt_record_is_refused_by_the_ca(db: &Db) {
    // The hook publishes a wrong value: Pebble really looks the record up,
    // so the order fails with the CA's reason, and the record is removed.
    let dir = tempfile::tempdir().unwrap();
    let dns = ChallTestSrv::start(dir.path());
    let pebble = Pebble::start_with(Some(dns.dns));
    let calls = dir.path().join("calls.log");
    let hook = dns_hook(dir.path(), &calls, &dns.hook_body("not-the-digest"));
    let mut acme = AcmeConfig::new(pebble.directory());
    acme.ca_file = Some(pebble.ca_file.clone());
    acme.challenge = berth_control_plane::acme::ChallengeKind::Dns01;
    acme.dns_hook = Some(hook);
    let cp = Cp::start_with(&dir.path().join("cp"), &db.url, None, Some(acme)).await;
    deploy_web(&cp).await;
    add_domain(&cp, "dns.example.com").await;
    let info = wait_state(&cp, "dns.example.com", CertState::Failed, Duration::from_secs(90)).await;
    let err = info.last_error.clone().unwrap_or_default();
    assert!(err.contains("Correct value not found for DNS challenge"), "{info:?}");
    let log = pebble.log();
    assert_eq!(log.matches("Issued certificate").count(), 0, "{log}");
    let calls = std::fs::read_to_string(&calls).unwrap();
    let actions: Vec<&str> = calls.lines().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(actions, ["present", "cleanup"], "{calls}");
    assert!(dns.log().contains("Removed DNS-01 TXT challenge"), "{}", dns.log());
}
