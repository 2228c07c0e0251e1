//! Test harness: a test CA and leaf certificates (rcgen), backends on
//! 127.0.0.1:0, the proxy started in-process on port 0, and TLS clients
//! trusting the test CA.
#![allow(dead_code)]

use berth_protocol::proxy::{ProxyCert, ProxyConfig, ProxyRoute, Upstream};
use berth_proxy::{Listeners, Options, Proxy};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(s: impl Into<Bytes>) -> TestBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed()
}

/// A body fed by a channel, for streaming tests.
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

pub struct Pki {
    pub ca_cert: rcgen::Certificate,
    pub ca_key: rcgen::KeyPair,
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, "berth test CA");
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca_cert = p.self_signed(&ca_key).unwrap();
        Pki { ca_cert, ca_key }
    }

    /// (chain PEM: leaf then CA, key PEM)
    pub fn leaf(&self, domain: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let p = rcgen::CertificateParams::new(vec![domain.to_string()]).unwrap();
        let cert = p.signed_by(&key, &self.ca_cert, &self.ca_key).unwrap();
        (format!("{}{}", cert.pem(), self.ca_cert.pem()), key.serialize_pem())
    }

    pub fn proxy_cert(&self, domain: &str) -> ProxyCert {
        let (chain_pem, key_pem) = self.leaf(domain);
        ProxyCert {
            domain: domain.into(),
            chain_pem,
            key_pem,
        }
    }

    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A TLS server config for a backend that terminates TLS itself.
    pub fn server_config(&self, domain: &str) -> Arc<rustls::ServerConfig> {
        let (chain, key) = self.leaf(domain);
        use rustls::pki_types::pem::PemObject;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        Arc::new(cfg)
    }
}

pub fn up(addr: SocketAddr) -> Upstream {
    Upstream {
        addr,
        local: false,
        healthy: true,
        weight: 1,
    }
}

pub fn route(domain: &str, addrs: &[SocketAddr]) -> ProxyRoute {
    ProxyRoute {
        domain: domain.into(),
        upstreams: addrs.iter().copied().map(up).collect(),
    }
}

/// Captures the access log.
#[derive(Clone, Default)]
pub struct LogBuf(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub proxy: Proxy,
    pub pki: Pki,
    pub log: LogBuf,
}

impl Harness {
    pub async fn start(pki: Pki, cfg: &ProxyConfig) -> Harness {
        Self::start_with(pki, cfg, |_| {}).await
    }

    pub async fn start_with(pki: Pki, cfg: &ProxyConfig, tweak: impl FnOnce(&mut Options)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.json");
        write_config(&path, cfg);
        let log = LogBuf::default();
        let mut opts = Options::new(path.clone());
        opts.tcp_bind = "127.0.0.1".parse().unwrap();
        opts.poll_interval = Duration::from_millis(100);
        opts.access_log = Some(Box::new(log.clone()));
        tweak(&mut opts);
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listeners = Listeners::bind(local, local, Some(local)).await.unwrap();
        let proxy = berth_proxy::start(opts, listeners).await.unwrap();
        assert_eq!(proxy.revision(), cfg.revision, "initial config loaded");
        Harness {
            dir,
            path,
            proxy,
            pki,
            log,
        }
    }

    pub fn https(&self) -> SocketAddr {
        self.proxy.https_addr().unwrap()
    }

    pub fn http(&self) -> SocketAddr {
        self.proxy.http_addr().unwrap()
    }

    /// Writes a new config the way the agent does (temp + rename) and waits
    /// until the file watcher has loaded it.
    pub async fn replace_config(&self, cfg: &ProxyConfig) {
        write_config(&self.path, cfg);
        for _ in 0..100 {
            if self.proxy.revision() == cfg.revision {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("revision {} not loaded by the watcher", cfg.revision);
    }

    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.proxy.flush_access_log(Duration::from_secs(5));
        let b = self.log.0.lock().unwrap().clone();
        String::from_utf8(b)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub async fn tls(&self, domain: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        tls_connect(self.https(), &self.pki, domain, alpn).await
    }

    /// An HTTP/1.1 connection over TLS to `domain`.
    pub async fn h1(&self, domain: &str) -> hyper::client::conn::http1::SendRequest<TestBody> {
        let tls = self.tls(domain, &[b"http/1.1"]).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
        tokio::spawn(conn.with_upgrades());
        send
    }

    /// GET https://domain/path over a fresh HTTP/1.1 connection.
    pub async fn get(&self, domain: &str, path: &str) -> (u16, String) {
        let mut s = self.h1(domain).await;
        send(&mut s, domain, "GET", path, full("")).await
    }
}

pub async fn send(
    s: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    host: &str,
    method: &str,
    path: &str,
    body: TestBody,
) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(body)
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub fn write_config(path: &std::path::Path, cfg: &ProxyConfig) {
    write_raw(path, &serde_json::to_vec_pretty(cfg).unwrap());
}

pub fn write_raw(path: &std::path::Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

pub async fn tls_connect(addr: SocketAddr, pki: &Pki, domain: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let c = tokio_rustls::TlsConnector::from(pki.client_config(alpn));
    c.connect(ServerName::try_from(domain.to_string()).unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {domain} via {addr}: {e}"))
}

/// An HTTP/1.1 backend running `f` for each request.
pub async fn backend<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let f = f.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(r).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// A backend answering `name` and the request's method, path and headers.
pub async fn echo_backend(name: &'static str) -> SocketAddr {
    backend(move |r: Request<Incoming>| async move {
        let mut s = format!("{name}\n{} {}\n", r.method(), r.uri());
        for (k, v) in r.headers() {
            s.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
        }
        let n = r.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        s.push_str(&format!("body-bytes: {n}\n"));
        Response::new(full(s))
    })
    .await
}

/// An address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

pub fn header<'a>(echo: &'a str, name: &str) -> Option<&'a str> {
    echo.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(": ")))
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}
