//! End-to-end tests of berth-proxy on 127.0.0.1: real TLS handshakes, real
//! sockets, backends written here.

mod common;

use berth_protocol::proxy::{AlpnChallenge, Http01Challenge, ProxyConfig, ProxyRoute, ProxyTcpRoute};
use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const A: &str = "a.example.com";
const B: &str = "b.example.com";

fn cfg(revision: u64, pki: &Pki, routes: Vec<ProxyRoute>) -> ProxyConfig {
    ProxyConfig {
        revision,
        certs: routes.iter().map(|r| pki.proxy_cert(&r.domain)).collect(),
        http_routes: routes,
        ..Default::default()
    }
}

#[tokio::test]
async fn https_get_over_http1_and_http2_with_access_log() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;

    let (status, body) = h.get(A, "/hello?x=1").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("one\nGET /hello?x=1\n"), "{body}");

    // HTTP/2 negotiated by ALPN, forwarded as HTTP/1.1 with a Host header.
    let tls = h.tls(A, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = hyper::client::conn::http2::handshake(executor(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    for i in 0..3 {
        let req = Request::builder()
            .uri(format!("https://{A}/h2/{i}"))
            .body(full(""))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(body.contains(&format!("GET /h2/{i}")), "{body}");
        assert_eq!(header(&body, "host"), Some(A));
    }

    let log = h.access_log();
    let first = log
        .iter()
        .find(|l| l["path"] == "/hello")
        .expect("access log line for /hello");
    assert_eq!(first["host"], A);
    assert_eq!(first["method"], "GET");
    assert_eq!(first["status"], 200);
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["upstream"], be.to_string());
    assert!(first["bytes"].as_u64().unwrap() > 0);
    assert!(first["duration_ms"].as_f64().is_some());
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        log.iter()
            .filter(|l| l["path"].as_str().unwrap().starts_with("/h2/"))
            .count(),
        3
    );
}

#[tokio::test]
async fn http_port_redirects_answers_acme_http01_and_404s_unknown_hosts() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let mut c = cfg(1, &pki, vec![route(A, &[be])]);
    c.http01 = vec![Http01Challenge {
        token: "tok123".into(),
        key_authorization: "tok123.thumbprint".into(),
    }];
    let h = Harness::start(pki, &c).await;
    let tcp = TcpStream::connect(h.http()).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);

    let req = |host: &str, path: &str| {
        Request::builder()
            .uri(path)
            .header("host", host)
            .body(full(""))
            .unwrap()
    };
    let r = s.send_request(req("A.example.com:80", "/p/q?x=1&y=2")).await.unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(r.headers()["location"], "https://a.example.com/p/q?x=1&y=2");

    // Challenges are answered for any host, even one the proxy does not route.
    let r = s
        .send_request(req("not-yet-routed.example.org", "/.well-known/acme-challenge/tok123"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert_eq!(r.into_body().collect().await.unwrap().to_bytes(), "tok123.thumbprint");

    let r = s
        .send_request(req(A, "/.well-known/acme-challenge/other"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = s.send_request(req("unknown.example.net", "/")).await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn tls_alpn01_answers_with_acme_identifier_certificate() {
    let pki = Pki::new();
    let mut c = cfg(1, &pki, vec![]);
    c.alpn01 = vec![AlpnChallenge {
        domain: "new.example.com".into(),
        key_authorization: "tokABC.thumb".into(),
    }];
    let h = Harness::start(pki, &c).await;

    // ACME validators do not trust the self-signed certificate; accept any.
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            // webpki refuses the (unknown to it) critical acmeIdentifier extension.
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cc = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    let tcp = TcpStream::connect(h.https()).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cc))
        .connect("new.example.com".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(&b"acme-tls/1"[..]));
    let der = conn.peer_certificates().unwrap()[0].as_ref().to_vec();
    let digest = Sha256::digest(b"tokABC.thumb");
    let mut want = vec![
        0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f, 0x01, 0x01, 0xff,
    ];
    want.extend_from_slice(&[0x04, 0x22, 0x04, 0x20]);
    want.extend_from_slice(&digest);
    assert!(
        der.windows(want.len()).any(|w| w == want.as_slice()),
        "critical acmeIdentifier with SHA-256(key authorization)"
    );
    assert!(der.windows(15).any(|w| w == b"new.example.com"), "dNSName SAN");
    // The proxy closes the connection after the handshake.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "closed: {n:?}");
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() || m.is_binary() {
                        ws.send(m).await.unwrap();
                    }
                }
            });
        }
    });
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[ws_addr])]);
    let h = Harness::start(pki, &c).await;
    let tls = h.tls(A, &[b"http/1.1"]).await;
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("wss://{A}/socket"), tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..5 {
        let msg = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn sse_events_arrive_one_by_one() {
    let (ctl_tx, ctl_rx) = mpsc::channel::<mpsc::Receiver<Bytes>>(1);
    let ctl_rx = Arc::new(tokio::sync::Mutex::new(ctl_rx));
    let be = backend(move |_r: Request<Incoming>| {
        let ctl_rx = ctl_rx.clone();
        async move {
            let events = ctl_rx.lock().await.recv().await.unwrap();
            let mut r = Response::new(ChannelBody(events).boxed());
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
    })
    .await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;
    let (ev_tx, ev_rx) = mpsc::channel::<Bytes>(1);
    ctl_tx.send(ev_rx).await.unwrap();
    let mut s = h.h1(A).await;
    let req = Request::builder()
        .uri("/events")
        .header("host", A)
        .body(full(""))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    for i in 0..3 {
        let ev = format!("data: event {i}\n\n");
        ev_tx.send(Bytes::from(ev.clone())).await.unwrap();
        // The event must arrive while the upstream is still producing.
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("event not delivered before the stream ended")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), ev);
    }
    drop(ev_tx);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn large_upload_streams_through() {
    let be = echo_backend("up").await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        for _ in 0..128 {
            tx.send(Bytes::from(vec![7u8; 64 * 1024])).await.unwrap();
        }
    });
    let mut s = h.h1(A).await;
    let (status, body) = send(&mut s, A, "POST", "/upload", ChannelBody(rx).boxed()).await;
    assert_eq!(status, 200);
    assert_eq!(header(&body, "body-bytes"), Some("8388608"));
}

#[tokio::test]
async fn dead_upstream_is_ejected_and_requests_still_succeed() {
    let live = echo_backend("live").await;
    let dead = dead_addr().await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[dead, live])]);
    let h = Harness::start(pki, &c).await;
    let mut s = h.h1(A).await;
    for _ in 0..10 {
        let (status, body) = send(&mut s, A, "GET", "/", full("")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("live\n"));
    }
    // A non-idempotent request is never retried, but the dead one is ejected,
    // so it goes to the live upstream too.
    let (status, _) = send(&mut s, A, "POST", "/", full("x")).await;
    assert_eq!(status, 200);
    let m = h.proxy.shared().metrics.render();
    assert!(m.contains("berth_proxy_ejections_total 1\n"), "{m}");
    assert!(m.contains("berth_proxy_upstream_connect_errors_total 1\n"), "{m}");
    let log = h.access_log();
    assert!(log.iter().all(|l| l["upstream"] == live.to_string()));

    // Only dead upstreams: 502 (after trying), none configured: 503.
    let c = cfg(2, &h.pki, vec![route(A, &[dead]), route(B, &[])]);
    h.replace_config(&c).await;
    assert_eq!(h.get(A, "/").await.0, 502);
    assert_eq!(h.get(B, "/").await.0, 503);
}

#[tokio::test]
async fn weighted_upstreams_share_traffic_by_weight_and_drained_ones_get_none() {
    let heavy = echo_backend("heavy").await;
    let light = echo_backend("light").await;
    let drained = echo_backend("drained").await;
    let pki = Pki::new();
    let weighted = |weights: [u32; 3]| {
        let mut r = route(A, &[heavy, light, drained]);
        for (u, w) in r.upstreams.iter_mut().zip(weights) {
            u.weight = w;
        }
        r
    };
    let c = cfg(1, &pki, vec![weighted([3, 1, 0])]);
    let h = Harness::start(pki, &c).await;
    let mut s = h.h1(A).await;
    let mut names = vec![];
    for _ in 0..8 {
        let (status, body) = send(&mut s, A, "GET", "/", full("")).await;
        assert_eq!(status, 200, "{body}");
        names.push(body.lines().next().unwrap().to_string());
    }
    // 3:1, spread out; the drained upstream gets nothing.
    let expect = ["heavy", "heavy", "light", "heavy"].repeat(2);
    assert_eq!(names, expect);

    // A weight over the maximum rejects the file, naming the field; the
    // previous config keeps serving.
    let mut bad = cfg(2, &h.pki, vec![weighted([3, 1, 0])]);
    bad.http_routes[0].upstreams[1].weight = 5000;
    write_config(&h.path, &bad);
    let e = h.proxy.reload().await.unwrap_err().to_string();
    assert!(
        e.contains(&format!("http_routes {A}: upstream {light}: weight: 5000")),
        "{e}"
    );
    assert_eq!(h.proxy.revision(), 1);

    // Only the drained upstream left able to answer: it takes the traffic.
    let c = ProxyConfig {
        http_routes: vec![ProxyRoute {
            domain: A.into(),
            upstreams: vec![
                berth_protocol::proxy::Upstream {
                    addr: dead_addr().await,
                    ..up(heavy)
                },
                berth_protocol::proxy::Upstream {
                    weight: 0,
                    ..up(drained)
                },
            ],
        }],
        ..cfg(3, &h.pki, vec![route(A, &[])])
    };
    h.replace_config(&c).await;
    for _ in 0..3 {
        let (status, body) = send(&mut s, A, "GET", "/", full("")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("drained\n"), "{body}");
    }
}

#[tokio::test]
async fn unknown_host_is_404_and_never_an_open_proxy() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;
    let mut s = h.h1(A).await;
    let (status, body) = send(&mut s, "other.example.net", "GET", "/", full("")).await;
    assert_eq!(status, 404);
    assert_eq!(body, "unknown host\n");
    // Absolute-form request target naming another host.
    let (status, _) = send(&mut s, A, "GET", "http://127.0.0.1:9/x", full("")).await;
    assert_eq!(status, 404);
    let (status, _) = send(&mut s, A, "GET", "/", full("")).await;
    assert_eq!(status, 200);
    // A name without a certificate fails the handshake.
    let tcp = TcpStream::connect(h.https()).await.unwrap();
    let r = tokio_rustls::TlsConnector::from(h.pki.client_config(&[]))
        .connect("nocert.example.com".try_into().unwrap(), tcp)
        .await;
    assert!(r.is_err());
}

#[tokio::test]
async fn forwarding_headers_reach_the_backend() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;
    let mut s = h.h1(A).await;
    let req = Request::builder()
        .uri("/x")
        .header("host", "A.example.com")
        .header("x-forwarded-for", "198.51.100.7")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("x-app", "kept")
        .body(full(""))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(
        header(&body, "x-forwarded-for"),
        Some("198.51.100.7, 127.0.0.1"),
        "{body}"
    );
    assert_eq!(header(&body, "x-forwarded-proto"), Some("https"));
    assert_eq!(header(&body, "x-forwarded-host"), Some("A.example.com"));
    assert_eq!(header(&body, "host"), Some("A.example.com"));
    assert_eq!(header(&body, "x-app"), Some("kept"));
    assert_eq!(header(&body, "x-hop"), None);

    // A client can neither strip Host nor choose X-Forwarded-Host.
    let req = Request::builder()
        .uri("/x")
        .header("host", A)
        .header("connection", "host")
        .header("x-forwarded-host", "evil.example")
        .body(full(""))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let body = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert_eq!(header(&body, "host"), Some(A), "{body}");
    assert_eq!(header(&body, "x-forwarded-host"), Some(A), "{body}");
}

#[tokio::test]
async fn two_host_headers_get_400_and_connect_405() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;
    // Written by hand: clients refuse to send these.
    for (raw, want) in [
        (
            format!("GET / HTTP/1.1\r\nhost: {A}\r\nhost: admin.internal\r\n\r\n"),
            "HTTP/1.1 400",
        ),
        (
            format!("CONNECT {A}:443 HTTP/1.1\r\nhost: {A}:443\r\n\r\n"),
            "HTTP/1.1 405",
        ),
    ] {
        let mut tls = h.tls(A, &[b"http/1.1"]).await;
        tls.write_all(raw.as_bytes()).await.unwrap();
        let mut resp = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut resp))
            .await
            .expect("an answer")
            .unwrap();
        let resp = String::from_utf8_lossy(&resp[..n]);
        assert!(resp.starts_with(want), "{raw:?}: {resp}");
    }
}

#[tokio::test]
async fn too_large_headers_get_431() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;
    let mut tls = h.tls(A, &[b"http/1.1"]).await;
    let big = "x".repeat(70 * 1024);
    let req = format!("GET / HTTP/1.1\r\nhost: {A}\r\nx-big: {big}\r\n\r\n");
    let _ = tls.write_all(req.as_bytes()).await;
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let c = cfg(1, &pki, vec![route(A, &[be])]);
    let h = Harness::start_with(pki, &c, |o| o.timeouts.header_read = Duration::from_millis(300)).await;
    let mut tls = h.tls(A, &[b"http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: a.exa").await.unwrap();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "connection closed by the proxy");
}

#[tokio::test]
async fn reload_swaps_routes_and_certs_without_dropping_connections() {
    let one = echo_backend("one").await;
    let two = echo_backend("two").await;
    let pki = Pki::new();
    let c1 = cfg(1, &pki, vec![route(A, &[one])]);
    let h = Harness::start(pki, &c1).await;
    let mut s = h.h1(A).await;
    assert!(send(&mut s, A, "GET", "/", full("")).await.1.starts_with("one\n"));
    let cert_before = h.tls(A, &[]).await.get_ref().1.peer_certificates().unwrap()[0].clone();

    // New revision (written by rename): A moves to backend two, B is added,
    // A gets a new certificate.
    let c2 = cfg(2, &h.pki, vec![route(A, &[two]), route(B, &[one])]);
    h.replace_config(&c2).await;
    assert!(!s.is_closed(), "open connection survived the reload");
    assert!(send(&mut s, A, "GET", "/", full("")).await.1.starts_with("two\n"));
    assert!(h.get(B, "/").await.1.starts_with("one\n"));
    let cert_after = h.tls(A, &[]).await.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(cert_before, cert_after, "new handshakes use the new certificate");

    // A bad file is ignored: the previous config keeps serving.
    write_raw(&h.path, b"{ not json");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.proxy.revision(), 2);
    assert!(h.proxy.reload().await.is_err());
    assert!(send(&mut s, A, "GET", "/", full("")).await.1.starts_with("two\n"));
    let m = h.proxy.shared().metrics.render();
    assert!(m.contains("berth_proxy_config_revision 2\n"), "{m}");
    assert!(!m.contains("berth_proxy_config_reload_errors_total 0\n"), "{m}");

    // Removing a route: 404 for it, on the same connection.
    let c3 = cfg(3, &h.pki, vec![route(A, &[two])]);
    h.replace_config(&c3).await;
    assert_eq!(send(&mut s, B, "GET", "/", full("")).await.0, 404);
}

async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn tcp_route_carries_bytes_and_follows_reloads() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let pki = Pki::new();
    let port = free_port().await;
    let mut c = cfg(1, &pki, vec![]);
    c.tcp_routes = vec![ProxyTcpRoute {
        listen: port,
        upstreams: vec![up(dead_addr().await), up(echo)],
    }];
    let h = Harness::start(pki, &c).await;
    let mut conn = None;
    for _ in 0..50 {
        if let Ok(s) = TcpStream::connect(("127.0.0.1", port)).await {
            conn = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = conn.expect("tcp route listener");
    let payload = vec![42u8; 256 * 1024];
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&payload).await.unwrap();
    };
    let mut back = vec![0u8; payload.len()];
    let read = r.read_exact(&mut back);
    let (_, n) = tokio::join!(write, read);
    n.unwrap();
    assert_eq!(back, payload);

    // Removing the route closes its listener; the open connection stays.
    h.replace_config(&cfg(2, &h.pki, vec![])).await;
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "listener removed");
    s.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"still here");
}

#[tokio::test]
async fn passthrough_by_sni_reaches_a_tls_backend() {
    let pki = Pki::new();
    let pt = "pt.example.com";
    // The backend terminates TLS itself with its own certificate.
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(pt));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut tls = acceptor.accept(s).await.unwrap();
                let mut line = [0u8; 4];
                tls.read_exact(&mut line).await.unwrap();
                tls.write_all(b"backend got ").await.unwrap();
                tls.write_all(&line).await.unwrap();
                tls.shutdown().await.unwrap();
            });
        }
    });
    let web = echo_backend("web").await;
    let mut c = cfg(1, &pki, vec![route(A, &[web])]);
    c.passthrough = vec![route(pt, &[be])];
    let h = Harness::start(pki, &c).await;
    // The proxy holds no certificate for pt.example.com: the handshake only
    // succeeds because the backend answers it.
    let mut tls = h.tls(pt, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None, "backend offers no ALPN");
    tls.write_all(b"ping").await.unwrap();
    let mut out = String::new();
    tls.read_to_string(&mut out).await.unwrap();
    assert_eq!(out, "backend got ping");
    // Terminated routes still work on the same port.
    assert_eq!(h.get(A, "/").await.0, 200);
}

#[tokio::test]
async fn metrics_endpoint_exports_counters() {
    let be = echo_backend("one").await;
    let pki = Pki::new();
    let c = cfg(5, &pki, vec![route(A, &[be])]);
    let h = Harness::start(pki, &c).await;
    assert_eq!(h.get(A, "/").await.0, 200);
    assert_eq!(h.get(A, "/").await.0, 200);
    let tcp = TcpStream::connect(h.proxy.metrics_addr().unwrap()).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (status, text) = send(&mut s, "localhost", "GET", "/metrics", full("")).await;
    assert_eq!(status, 200);
    assert!(
        text.contains("berth_proxy_requests_total{host=\"a.example.com\",code=\"2xx\"} 2"),
        "{text}"
    );
    assert!(text.contains("berth_proxy_config_revision 5\n"));
    assert!(text.contains("berth_proxy_config_reloads_total 1\n"));
    assert!(text.contains("berth_proxy_connections_total{listener=\"https\"} 2"));
}
