//! `berth logs` and `berth exec`: a service's merged log as NDJSON, and the
//! exec WebSocket (docs/logs.md).

use super::{AdminClient, Error, Result};
use berth_protocol::event::Event;
use berth_protocol::stream::LogLine;
use berth_protocol::ApiError;
use std::sync::Arc;
use std::time::Duration;

/// What `berth logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogsQuery {
    pub follow: bool,
    /// A duration back from now (`10m`) or Unix seconds.
    pub since: Option<String>,
    pub tail: Option<u32>,
    pub replica: Option<String>,
}

/// What `berth events` asks for.
#[derive(Debug, Clone, Default)]
pub struct EventsQuery {
    pub follow: bool,
    pub service: Option<String>,
    /// Without `after`: the last N events (the control plane's default: 50).
    pub tail: Option<u32>,
    pub after: Option<i64>,
}

/// What `berth exec` runs.
#[derive(Debug, Clone, Default)]
pub struct ExecQuery {
    pub replica: Option<String>,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub interactive: bool,
    pub rows: u16,
    pub cols: u16,
}

pub type ExecSocket = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

fn encode(v: &str) -> String {
    form_urlencoded::byte_serialize(v.as_bytes()).collect()
}

impl AdminClient {
    /// Service `name`'s log, each line passed to `each` as it comes; with
    /// `follow`, until the admin stops reading (drops the future).
    pub async fn service_logs(&self, name: &str, q: &LogsQuery, each: impl FnMut(LogLine)) -> Result<()> {
        let mut path = format!("/v1/services/{}/logs?follow={}", encode(name), q.follow);
        if let Some(s) = &q.since {
            path.push_str(&format!("&since={}", encode(s)));
        }
        if let Some(t) = q.tail {
            path.push_str(&format!("&tail={t}"));
        }
        if let Some(r) = &q.replica {
            path.push_str(&format!("&replica={}", encode(r)));
        }
        self.ndjson(&path, each).await
    }

    /// Node `name`'s agent log (`berth nodes logs`); `q.replica` is ignored.
    pub async fn node_logs(&self, name: &str, q: &LogsQuery, each: impl FnMut(LogLine)) -> Result<()> {
        let mut path = format!("/v1/nodes/{}/logs?follow={}", encode(name), q.follow);
        if let Some(s) = &q.since {
            path.push_str(&format!("&since={}", encode(s)));
        }
        if let Some(t) = q.tail {
            path.push_str(&format!("&tail={t}"));
        }
        self.ndjson(&path, each).await
    }

    /// The event stream (`berth events`), each event passed to `each`; with
    /// `follow`, until the caller drops the future.
    pub async fn events(&self, q: &EventsQuery, each: impl FnMut(Event)) -> Result<()> {
        let mut path = format!("/v1/events?follow={}", q.follow);
        if let Some(s) = &q.service {
            path.push_str(&format!("&service={}", encode(s)));
        }
        if let Some(t) = q.tail {
            path.push_str(&format!("&tail={t}"));
        }
        if let Some(a) = q.after {
            path.push_str(&format!("&after={a}"));
        }
        self.ndjson(&path, each).await
    }

    /// A streamed NDJSON answer, each line decoded and passed to `each`.
    async fn ndjson<T: serde::de::DeserializeOwned>(&self, path: &str, mut each: impl FnMut(T)) -> Result<()> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(365 * 24 * 3600))
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            return Err(self.refused(resp).await);
        }
        let mut resp = resp;
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
            buf.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
                let line = &buf[start..start + nl];
                start += nl + 1;
                match serde_json::from_slice::<T>(line) {
                    Ok(v) => each(v),
                    Err(e) => {
                        return Err(Error::Decode {
                            path: path.to_string(),
                            reason: format!("a line is not the JSON expected: {e}"),
                        })
                    }
                }
            }
            buf.drain(..start);
        }
        Ok(())
    }

    /// Opens the exec WebSocket of service `name`. A refusal before the
    /// command starts is the API's error, as for any call.
    pub async fn exec_socket(&self, name: &str, q: &ExecQuery) -> Result<ExecSocket> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let cmd = serde_json::to_string(&q.cmd).unwrap_or_default();
        let mut path = format!(
            "/v1/services/{}/exec?cmd={}&tty={}&interactive={}&rows={}&cols={}",
            encode(name),
            encode(&cmd),
            q.tty,
            q.interactive,
            q.rows,
            q.cols
        );
        if let Some(r) = &q.replica {
            path.push_str(&format!("&replica={}", encode(r)));
        }
        let config = |m: String| Error::Config(m);
        let url = reqwest::Url::parse(&format!("{}{path}", self.base)).map_err(|e| config(format!("--url: {e}")))?;
        let host = url
            .host_str()
            .ok_or_else(|| config("--url: no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_or_known_default().unwrap_or(443);
        let mut ws_url = url.clone();
        ws_url
            .set_scheme("wss")
            .map_err(|_| config("--url: not an https URL".into()))?;
        let mut req = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| config(format!("--url: {e}")))?;
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {}", self.token))
                .map_err(|_| config("--admin-token-file: not a header value".into()))?,
        );
        let io = |e: std::io::Error| Error::Decode {
            path: path.clone(),
            reason: format!("connecting: {e}"),
        };
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| io(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out")))?
        .map_err(io)?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| config(format!("--url: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(io)?;
        match tokio_tungstenite::client_async(req, tls).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let text = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                let body = serde_json::from_str::<ApiError>(&text).unwrap_or_else(|_| super::unparsed(text));
                Err(Error::Api { status, body })
            }
            Err(e) => Err(Error::Decode {
                path,
                reason: format!("opening the WebSocket: {e}"),
            }),
        }
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};
        let bad = |e: String| Error::Config(format!("--ca-file: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }
}
