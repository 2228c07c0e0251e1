//! The agent's HTTPS client to the control plane: pins the control plane's
//! CA and authenticates every request: with a session
//! ([`berth_protocol::session`]) when it holds one, else with the node's
//! Ed25519 signature. A session is opened by one signed request, lazily,
//! and again when the control plane no longer knows it.

use anyhow::{anyhow, bail, Context};
use berth_protocol::build::{BuildDone, BuildJob, BuildLogAck, BuilderQuery};
use berth_protocol::delta::DesiredUpdate;
use berth_protocol::session::{self, OpenedSession};
use berth_protocol::signing::{self, HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::token::{ca_hash, JoinToken};
use berth_protocol::{ApiError, DesiredState, ErrorCode, RegisterRequest, RegisterResponse, StatusReport};
use bytes::Bytes;
use ed25519_dalek::SigningKey;
use reqwest::{Method, StatusCode};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

pub struct Client {
    http: reqwest::Client,
    /// For the WebSockets of `berth logs` and `berth exec`.
    tls: std::sync::Arc<rustls::ClientConfig>,
    base: reqwest::Url,
    key: SigningKey,
    node_id: String,
    /// The last document received and the control plane's view it came
    /// from: what the next long-poll's delta applies to.
    held: std::sync::Mutex<Option<(u64, std::sync::Arc<DesiredState>)>>,
    /// Opens session keys; without it every request is signed.
    sealing: Option<x25519_dalek::StaticSecret>,
    session: std::sync::Mutex<SessionSlot>,
    /// Held by the one task opening a session; the others do not wait for
    /// it (they use the session they have, or sign).
    opening: tokio::sync::Mutex<()>,
    sessions_opened: AtomicU64,
}

#[derive(Default)]
struct SessionSlot {
    current: Option<Arc<Session>>,
    /// After a failed opening: sign requests until then.
    retry_at: Option<Instant>,
}

struct Session {
    id: String,
    key: [u8; 32],
    counter: AtomicU64,
    /// Open the next one from then on (before the control plane ends it).
    renew_at: Instant,
}

/// After an opening was refused for good (an older control plane, a node
/// without a sealing key), or a fresh session was not known either.
const SESSION_RETRY_REFUSED: Duration = Duration::from_secs(600);
/// After an opening failed otherwise (unreachable, 5xx).
const SESSION_RETRY_UNREACHED: Duration = Duration::from_secs(15);

/// How a request is authenticated.
enum Auth<'a> {
    Signature,
    Session(&'a Session),
}

/// A stream's WebSocket to the control plane.
pub type StreamSocket = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Outcome of one long-poll.
pub enum Poll {
    /// Shared with the copy the client keeps to apply the next delta to:
    /// dropping it before the next poll spares that a copy.
    Changed(std::sync::Arc<DesiredState>),
    Unchanged,
}

/// An error the control plane answered with, kept apart from transport errors.
#[derive(Debug, thiserror::Error)]
#[error("control plane answered {status}: {message}")]
pub struct Refused {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn http_client(ca_pem: &[u8]) -> anyhow::Result<reqwest::Client> {
    let ca = reqwest::Certificate::from_pem(ca_pem).context("the pinned CA is not a PEM certificate")?;
    Ok(reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(5))
        .build()?)
}

fn tls_config(ca_pem: &[u8]) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.context("the pinned CA is not a PEM certificate")?)?;
    }
    let cfg =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(std::sync::Arc::new(cfg))
}

/// First contact: fetches the control plane's CA and accepts it only if its
/// hash matches the one carried in the join token. Returns the CA (PEM).
pub async fn fetch_pinned_ca(url: &str, token: &JoinToken) -> anyhow::Result<String> {
    // Unverified on purpose: the CA is authenticated by the token's hash below.
    let http = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()?;
    let pem = http
        .get(format!("{}/v1/ca.pem", url.trim_end_matches('/')))
        .send()
        .await
        .with_context(|| format!("--url {url}: cannot reach the control plane"))?
        .error_for_status()?
        .text()
        .await?;
    let der = pem_first_cert(&pem).ok_or_else(|| anyhow!("the control plane sent no CA certificate"))?;
    let got = ca_hash(&der);
    if got != token.ca_hash {
        bail!("--token: the control plane's CA (sha256 {got}) is not the one the token names ({}); wrong --url or a man in the middle", token.ca_hash);
    }
    Ok(pem)
}

fn pem_first_cert(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let start = pem.find("-----BEGIN CERTIFICATE-----")? + "-----BEGIN CERTIFICATE-----".len();
    let end = pem[start..].find("-----END CERTIFICATE-----")? + start;
    let b64: String = pem[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

async fn refused(resp: reqwest::Response) -> Refused {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    match serde_json::from_str::<ApiError>(&text) {
        Ok(e) => Refused {
            status,
            code: e.code,
            message: e.error,
        },
        Err(_) => Refused {
            status,
            code: ErrorCode::Unknown,
            message: text,
        },
    }
}

impl Client {
    pub fn new(url: &str, ca_pem_path: &Path, key: SigningKey, node_id: String) -> anyhow::Result<Client> {
        let pem = std::fs::read(ca_pem_path).with_context(|| format!("reading {}", ca_pem_path.display()))?;
        Ok(Client {
            http: http_client(&pem)?,
            tls: tls_config(&pem)?,
            base: reqwest::Url::parse(url).with_context(|| format!("--url {url:?}"))?,
            key,
            node_id,
            held: Default::default(),
            sealing: None,
            session: Default::default(),
            opening: Default::default(),
            sessions_opened: AtomicU64::new(0),
        })
    }

    /// Authenticate requests with sessions, whose keys come sealed to
    /// `sealing` (the node's sealing key, registered with it).
    pub fn with_sessions(mut self, sealing: x25519_dalek::StaticSecret) -> Client {
        self.sealing = Some(sealing);
        self
    }

    /// Sessions this client has opened so far.
    pub fn sessions_opened(&self) -> u64 {
        self.sessions_opened.load(Ordering::Relaxed)
    }

    /// A request authenticated by `auth`, whose body (if any) is of `content_type`.
    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
        content_type: &str,
        auth: Auth<'_>,
    ) -> anyhow::Result<reqwest::RequestBuilder> {
        let url = self.base.join(path_and_query)?;
        let pq = match url.query() {
            Some(q) => format!("{}?{}", url.path(), q),
            None => url.path().to_string(),
        };
        let mut req = match auth {
            Auth::Signature => {
                let h = signing::sign(&self.key, method.as_str(), &pq, &body, now());
                self.http
                    .request(method, url)
                    .header(HEADER_TIMESTAMP, h.timestamp)
                    .header(HEADER_NONCE, h.nonce)
                    .header(HEADER_SIGNATURE, h.signature)
            }
            Auth::Session(s) => {
                let counter = s.counter.fetch_add(1, Ordering::Relaxed) + 1;
                let headers = session::headers(&s.id, &s.key, method.as_str(), &pq, counter, &body);
                headers
                    .into_iter()
                    .fold(self.http.request(method, url), |req, (name, value)| {
                        req.header(name, value)
                    })
            }
        };
        if !self.node_id.is_empty() {
            req = req.header(HEADER_NODE, &self.node_id);
        }
        if !body.is_empty() {
            req = req.header("content-type", content_type).body(body);
        }
        Ok(req)
    }

    /// Sends a request of this node, in its session if it has one (opening
    /// one first if it may). A request refused (401) in a session is sent
    /// again: in a new session if the control plane no longer knew this
    /// one, else signed. Authentication comes before anything a handler
    /// does, so the refused request was not acted on. A 401 comes back as
    /// a [`Refused`] error.
    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: impl Into<Bytes>,
        content_type: &str,
        timeout: Option<Duration>,
    ) -> anyhow::Result<reqwest::Response> {
        let body = body.into();
        let mut refused_in: Option<Arc<Session>> = None;
        let mut sign = false;
        loop {
            let session = if sign {
                None
            } else {
                self.session(refused_in.as_ref()).await
            };
            let auth = session.as_deref().map_or(Auth::Signature, Auth::Session);
            let mut req = self.request(method.clone(), path_and_query, body.clone(), content_type, auth)?;
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            let resp = req.send().await?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let refusal = refused(resp).await;
            let Some(s) = session else {
                return Err(refusal.into());
            };
            match (refusal.code, refused_in.is_some()) {
                // Unknown here: a new session, once.
                (ErrorCode::SessionInvalid, false) => refused_in = Some(s),
                // A fresh session unknown too (another replica answers each
                // request?), or a counter or MAC refused: sign this one,
                // and sign for a while.
                _ => {
                    if refusal.code == ErrorCode::SessionInvalid {
                        self.sign_for(SESSION_RETRY_REFUSED);
                    }
                    sign = true;
                }
            }
        }
    }

    /// Signs every request for `wait` (the session held is dropped).
    fn sign_for(&self, wait: Duration) {
        let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        slot.current = None;
        slot.retry_at = Some(Instant::now() + wait);
    }

    /// The session to send a request in: the one held, or a new one when
    /// none is held, it is due for renewal or it was `refused`. None: sign
    /// the request. While another task opens one, this one does not wait:
    /// it sends in the session held, or signs.
    async fn session(&self, refused: Option<&Arc<Session>>) -> Option<Arc<Session>> {
        let sealing = self.sealing.as_ref()?;
        if self.node_id.is_empty() {
            return None;
        }
        let held = {
            let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some(held), Some(refused)) = (&slot.current, refused) {
                if Arc::ptr_eq(held, refused) {
                    slot.current = None;
                }
            }
            let now = Instant::now();
            match &slot.current {
                Some(s) if now < s.renew_at => return Some(s.clone()),
                _ if slot.retry_at.is_some_and(|t| now < t) => return slot.current.clone(),
                current => current.clone(),
            }
        };
        // Due for a new one; a renewal keeps using the old one until then.
        let Ok(_opening) = self.opening.try_lock() else {
            return held;
        };
        let opened = self.open_session(sealing).await;
        let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        match opened {
            Ok(s) => {
                self.sessions_opened.fetch_add(1, Ordering::Relaxed);
                slot.retry_at = None;
                slot.current = Some(Arc::new(s));
            }
            Err(e) => {
                // No such endpoint (a control plane before sessions) or a
                // node it will not open one for: not soon again.
                let refused = e.downcast_ref::<Refused>().is_some_and(|r| {
                    matches!(
                        r.status,
                        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED | StatusCode::CONFLICT
                    )
                });
                let wait = if refused {
                    SESSION_RETRY_REFUSED
                } else {
                    SESSION_RETRY_UNREACHED
                };
                tracing::debug!(error = %format!("{e:#}"), "opening a session failed; signing each request for now");
                slot.retry_at = Some(Instant::now() + wait);
            }
        }
        slot.current.clone()
    }

    async fn open_session(&self, sealing: &x25519_dalek::StaticSecret) -> anyhow::Result<Session> {
        let resp = self
            .request(
                Method::POST,
                "/v1/agent/session",
                Bytes::new(),
                "application/json",
                Auth::Signature,
            )?
            .timeout(Duration::from_secs(15))
            .send()
            .await?;
        if !resp.status().is_success() {
            return Err(refused(resp).await.into());
        }
        let opened: OpenedSession = resp.json().await?;
        let key: [u8; 32] = berth_protocol::seal::open(sealing, &opened.key_sealed)
            .map_err(|e| anyhow!("the session key: {e}"))?
            .try_into()
            .map_err(|_| anyhow!("the session key is not 32 bytes"))?;
        // Renew at four fifths of its life: in-flight requests of the old
        // one still land before it ends.
        let life = Duration::from_secs(opened.expires_in_secs);
        Ok(Session {
            id: opened.id,
            key,
            counter: AtomicU64::new(0),
            renew_at: Instant::now() + life * 4 / 5,
        })
    }

    /// Registers this node; the request is signed with the key it registers.
    pub async fn register(&self, req: &RegisterRequest) -> anyhow::Result<RegisterResponse> {
        let body = serde_json::to_vec(req)?;
        let resp = self
            .request(
                Method::POST,
                "/v1/register",
                body.into(),
                "application/json",
                Auth::Signature,
            )?
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .context("registering with the control plane")?;
        if !resp.status().is_success() {
            return Err(refused(resp).await.into());
        }
        Ok(resp.json().await?)
    }

    /// Long-polls for a desired state newer than `after`. Asks for a delta
    /// against the last document received (see [`berth_protocol::delta`])
    /// and returns the merged, whole document.
    pub async fn poll_desired(&self, after: u64, wait_secs: u64) -> anyhow::Result<Poll> {
        let base = self.held_view();
        let mut path = format!("/v1/agent/desired?after={after}&wait={wait_secs}&delta=true");
        if let Some(view) = base {
            path.push_str(&format!("&base={view}"));
        }
        let resp = self
            .send(
                Method::GET,
                &path,
                Bytes::new(),
                "",
                Some(Duration::from_secs(wait_secs + 15)),
            )
            .await?;
        match resp.status() {
            StatusCode::NO_CONTENT => Ok(Poll::Unchanged),
            s if s.is_success() => {
                let update: DesiredUpdate = resp.json().await?;
                Ok(Poll::Changed(self.merge(update)?))
            }
            _ => Err(refused(resp).await.into()),
        }
    }

    fn held_view(&self) -> Option<u64> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.as_ref().map(|(view, _)| *view)
    }

    /// Brings the held document to `update`'s view and returns it.
    fn merge(&self, update: DesiredUpdate) -> anyhow::Result<std::sync::Arc<DesiredState>> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let doc = match (update.full, update.delta, held.take()) {
            (Some(full), _, _) => {
                crate::metrics::desired_answer(false);
                std::sync::Arc::new(full)
            }
            (None, Some(delta), Some((view, mut doc))) if view == delta.base => {
                crate::metrics::desired_answer(true);
                delta.apply(std::sync::Arc::make_mut(&mut doc));
                doc
            }
            // Nothing held (now) to apply it to: the next poll, with no
            // base, gets the full document.
            (None, Some(delta), _) => bail!("a delta from view {} arrived for no document of it", delta.base),
            (None, None, _) => bail!("the control plane's answer has neither `full` nor `delta`"),
        };
        *held = Some((update.view, doc.clone()));
        Ok(doc)
    }

    pub async fn report(&self, report: &StatusReport) -> anyhow::Result<()> {
        let resp = self
            .send(
                Method::POST,
                "/v1/agent/status",
                serde_json::to_vec(report)?,
                "application/json",
                Some(Duration::from_secs(15)),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(refused(resp).await.into());
        }
        Ok(())
    }

    /// Long-polls for a build this node may take; None after `q.wait`.
    pub async fn next_build(&self, q: &BuilderQuery) -> anyhow::Result<Option<BuildJob>> {
        let wait = q.wait.unwrap_or(25);
        let path = format!(
            "/v1/agent/builds/next?arch={}&preferred={}&wait={wait}",
            q.arch, q.preferred
        );
        let resp = self
            .send(
                Method::GET,
                &path,
                Bytes::new(),
                "",
                Some(Duration::from_secs(wait + 15)),
            )
            .await?;
        match resp.status() {
            StatusCode::NO_CONTENT => Ok(None),
            s if s.is_success() => Ok(Some(resp.json().await?)),
            _ => Err(refused(resp).await.into()),
        }
    }

    /// Downloads build `id`'s context into `dest`, streamed; returns its size.
    pub async fn build_context(&self, id: u64, dest: &Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt;
        let mut resp = self
            .send(
                Method::GET,
                &format!("/v1/agent/builds/{id}/context"),
                Bytes::new(),
                "",
                None,
            )
            .await?;
        if !resp.status().is_success() {
            return Err(refused(resp).await.into());
        }
        let mut file = tokio::fs::File::create(dest)
            .await
            .with_context(|| format!("creating {}", dest.display()))?;
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await.context("downloading the build context")? {
            file.write_all(&chunk).await?;
            n += chunk.len() as u64;
        }
        file.flush().await?;
        Ok(n)
    }

    /// Appends to build `id`'s log; the answer says whether to stop.
    pub async fn build_log(&self, id: u64, chunk: Vec<u8>) -> anyhow::Result<BuildLogAck> {
        let resp = self
            .send(
                Method::POST,
                &format!("/v1/agent/builds/{id}/log"),
                chunk,
                "application/octet-stream",
                Some(Duration::from_secs(15)),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(refused(resp).await.into());
        }
        Ok(resp.json().await?)
    }

    /// Reports how build `id` ended on this node.
    pub async fn build_done(&self, id: u64, done: &BuildDone) -> anyhow::Result<()> {
        let resp = self
            .send(
                Method::POST,
                &format!("/v1/agent/builds/{id}/done"),
                serde_json::to_vec(done)?,
                "application/json",
                Some(Duration::from_secs(60)),
            )
            .await?;
        if !resp.status().is_success() {
            return Err(refused(resp).await.into());
        }
        Ok(())
    }

    /// Long-polls for streams to open (`berth logs`, `berth exec`).
    pub async fn next_streams(&self, wait_secs: u64) -> anyhow::Result<Vec<berth_protocol::stream::StreamJob>> {
        let resp = self
            .send(
                Method::GET,
                &format!("/v1/agent/streams/next?wait={wait_secs}"),
                Bytes::new(),
                "",
                Some(Duration::from_secs(wait_secs + 15)),
            )
            .await?;
        match resp.status() {
            StatusCode::NO_CONTENT => Ok(vec![]),
            s if s.is_success() => Ok(resp.json::<berth_protocol::stream::StreamJobs>().await?.jobs),
            _ => Err(refused(resp).await.into()),
        }
    }

    /// Opens the WebSocket of stream `id`, signed (its body, empty, is what
    /// the signature covers; a stream is rare, so no session).
    pub async fn stream_socket(&self, id: &str) -> anyhow::Result<StreamSocket> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::HeaderValue;
        let path = format!("/v1/agent/streams/{id}");
        let mut url = self.base.join(&path)?;
        let host = match url.host_str() {
            Some(h) => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            None => bail!("--url has no host"),
        };
        let port = url.port_or_known_default().unwrap_or(443);
        url.set_scheme("wss").map_err(|_| anyhow!("--url: not an https URL"))?;
        let h = signing::sign(&self.key, "GET", &path, &[], now());
        let mut req = url.as_str().into_client_request()?;
        let headers = req.headers_mut();
        headers.insert(HEADER_NODE, HeaderValue::from_str(&self.node_id)?);
        headers.insert(HEADER_TIMESTAMP, HeaderValue::from_str(&h.timestamp)?);
        headers.insert(HEADER_NONCE, HeaderValue::from_str(&h.nonce)?);
        headers.insert(HEADER_SIGNATURE, HeaderValue::from_str(&h.signature)?);
        let tcp = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .context("connecting to the control plane: timed out")??;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from(host.clone())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let (ws, _) = tokio::time::timeout(Duration::from_secs(15), tokio_tungstenite::client_async(req, tls))
            .await
            .context("opening the stream: timed out")??;
        Ok(ws)
    }
}
