//! HTTP request handling: routing by Host, the reverse proxy (forwarding
//! headers, retries, upgrades, streaming bodies), ACME HTTP-01 answers and
//! the HTTP→HTTPS redirect.

use crate::access_log::{rfc3339, Entry};
use crate::client::{self, Answer, ResponseBody};
use crate::config::{Route, Shared};
use crate::metrics::HostStats;
use crate::upstream::{mark, Tried};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};
use tokio::io::AsyncWriteExt;

const ACME_PREFIX: &str = "/.well-known/acme-challenge/";
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What is logged when the response body is done.
struct Pending {
    shared: Arc<Shared>,
    start: Instant,
    time: SystemTime,
    client: IpAddr,
    host: String,
    method: Method,
    path: String,
    status: u16,
    upstream: Option<SocketAddr>,
    bytes: u64,
}

enum Inner {
    Full(Option<Bytes>),
    Upstream(ResponseBody),
}

/// Response body: a local answer or the upstream's body, streamed; logs
/// the request when dropped (finished or aborted).
pub struct ProxyBody {
    inner: Inner,
    pending: Option<Box<Pending>>,
}

impl ProxyBody {
    fn full(b: impl Into<Bytes>) -> Self {
        ProxyBody {
            inner: Inner::Full(Some(b.into())),
            pending: None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = match &mut this.inner {
            Inner::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            Inner::Upstream(s) => Pin::new(s).poll_frame(cx),
        };
        if let (Poll::Ready(Some(Ok(f))), Some(p)) = (&r, this.pending.as_mut()) {
            if let Some(d) = f.data_ref() {
                p.bytes += d.len() as u64;
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Inner::Upstream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream(s) => s.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.shared.access_log.log(&Entry {
                time: rfc3339(p.time),
                client: p.client,
                host: &p.host,
                method: p.method.as_str(),
                path: &p.path,
                status: p.status,
                bytes: p.bytes,
                duration_ms: (p.start.elapsed().as_micros() as f64) / 1000.0,
                upstream: p.upstream,
            });
        }
    }
}

/// Per-request context.
struct Ctx {
    shared: Arc<Shared>,
    /// When the request came, for the access log (no clock read without one).
    start: Option<(Instant, SystemTime)>,
    client: SocketAddr,
}

impl Ctx {
    fn new(shared: Arc<Shared>, client: SocketAddr) -> Self {
        let start = shared.access_log.enabled().then(|| (Instant::now(), SystemTime::now()));
        Ctx { shared, start, client }
    }

    /// Wraps a response so that it is counted and logged.
    fn finish(
        &self,
        resp: Response<ProxyBody>,
        stats: &HostStats,
        host: &str,
        method: &Method,
        path: &str,
        upstream: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        stats.count(resp.status().as_u16());
        let Some((start, time)) = self.start else {
            return resp;
        };
        let status = resp.status().as_u16();
        let (parts, mut body) = resp.into_parts();
        body.pending = Some(Box::new(Pending {
            shared: self.shared.clone(),
            start,
            time,
            client: self.client.ip(),
            host: host.to_string(),
            method: method.clone(),
            path: path.to_string(),
            status,
            upstream,
            bytes: 0,
        }));
        Response::from_parts(parts, body)
    }
}

fn local(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Requests answered before routing: several Host headers (RFC 9112 §3.2:
/// the upstream might pick another one than the route) and CONNECT (a
/// reverse proxy is no tunnel).
fn refusal<B>(req: &Request<B>) -> Option<Response<ProxyBody>> {
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Some(local(StatusCode::BAD_REQUEST, "more than one Host header\n"));
    }
    if req.method() == Method::CONNECT {
        return Some(local(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n"));
    }
    None
}

/// [`refusal`], counted and logged as for an unknown host.
fn refuse<B>(ctx: &Ctx, req: &Request<B>) -> Option<Response<ProxyBody>> {
    let r = refusal(req)?;
    let stats = &ctx.shared.metrics.unknown_host;
    Some(ctx.finish(r, stats, "", req.method(), req.uri().path(), None))
}

/// The host a request is for: the URI's authority (HTTP/2, absolute-form)
/// or else the Host header; port stripped, lowercased. None if absent/invalid.
pub fn request_host<B>(req: &Request<B>) -> Option<Cow<'_, str>> {
    let raw = match req.uri().authority() {
        Some(a) => a.as_str(),
        None => req.headers().get(header::HOST)?.to_str().ok()?,
    };
    let raw = raw.rsplit_once('@').map_or(raw, |(_, h)| h);
    let host = if raw.starts_with('[') {
        &raw[..raw.find(']')? + 1]
    } else {
        raw.split_once(':').map_or(raw, |(h, _)| h)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

pub(crate) fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    list_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The comma-separated tokens of every `name` header, trimmed. Split on
/// bytes, so a value with a non-ASCII byte does not hide the tokens beside it.
fn list_tokens(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
}

/// An HTTP/1.1 `Upgrade` request (WebSocket and others).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Host is never hop-by-hop: a client naming it must not strip it from
    // what the upstream sees (it was routed on it).
    let named: Vec<HeaderName> = list_tokens(headers, header::CONNECTION)
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .filter(|n| *n != header::HOST)
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
}

/// Rewrites the client's request headers for the upstream.
pub fn forward_headers(
    headers: &mut HeaderMap,
    uri: &Uri,
    version: Version,
    client: IpAddr,
    proto: &'static str,
    upgrade: bool,
) {
    let upgrade_value = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(headers);
    headers.remove(header::EXPECT);
    if let Some(u) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, u);
    }
    // HTTP/2 carries the host in :authority; an absolute-form URI overrides Host.
    if let Some(a) = uri.authority() {
        if let Ok(v) = HeaderValue::from_str(a.as_str()) {
            headers.insert(header::HOST, v);
        }
    }
    // HTTP/2 may split cookies; HTTP/1.1 wants one header.
    if version == Version::HTTP_2 && headers.get_all(header::COOKIE).iter().nth(1).is_some() {
        let joined = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join("; ");
        if let Ok(v) = HeaderValue::from_str(&joined) {
            headers.insert(header::COOKIE, v);
        }
    }
    let mut xff = String::with_capacity(48);
    for v in headers.get_all(&X_FORWARDED_FOR).iter() {
        if let Ok(s) = v.to_str() {
            xff.push_str(s);
            xff.push_str(", ");
        }
    }
    let _ = write!(xff, "{client}");
    // From the String's own buffer: no copy.
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    // The client's own X-Forwarded-Host never reaches the upstream.
    headers.remove(&X_FORWARDED_HOST);
    if let Some(h) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), h);
    }
}

/// Serves a request that arrived over TLS: route by host and proxy.
pub async fn handle_https(
    shared: Arc<Shared>,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let ctx = Ctx::new(shared, client);
    if let Some(r) = refuse(&ctx, &req) {
        return Ok(r);
    }
    let snap = ctx.shared.config();
    let route = request_host(&req).and_then(|h| snap.http_routes.get(h.as_ref()).cloned());
    let Some(route) = route else {
        let host = request_host(&req).map(|h| h.into_owned()).unwrap_or_default();
        let r = local(StatusCode::NOT_FOUND, "unknown host\n");
        let stats = ctx.shared.metrics.unknown_host.clone();
        return Ok(ctx.finish(r, &stats, &host, req.method(), req.uri().path(), None));
    };
    drop(snap);
    Ok(proxy(&ctx, &route, req, "https").await)
}

/// Serves a request on the plain-HTTP port: ACME HTTP-01, else redirect.
pub async fn handle_http(
    shared: Arc<Shared>,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let ctx = Ctx::new(shared, client);
    if let Some(r) = refuse(&ctx, &req) {
        return Ok(r);
    }
    let snap = ctx.shared.config();
    let host = request_host(&req).map(|h| h.into_owned()).unwrap_or_default();
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(ACME_PREFIX) {
        if matches!(*req.method(), Method::GET | Method::HEAD) {
            // Never a metrics series per arbitrary Host: challenges are answered for any.
            let stats = match snap.http_routes.get(host.as_str()) {
                Some(r) => r.stats.clone(),
                None => ctx.shared.metrics.unknown_host.clone(),
            };
            let r = match snap.http01.get(token) {
                Some(ka) => {
                    let mut r = Response::new(ProxyBody::full(ka.clone()));
                    r.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                    r
                }
                None => local(StatusCode::NOT_FOUND, "unknown challenge token\n"),
            };
            return Ok(ctx.finish(r, &stats, &host, req.method(), path, None));
        }
    }
    let route = snap.http_routes.get(host.as_str());
    if route.is_none() && !snap.passthrough.contains_key(host.as_str()) {
        let r = local(StatusCode::NOT_FOUND, "unknown host\n");
        let stats = ctx.shared.metrics.unknown_host.clone();
        return Ok(ctx.finish(r, &stats, &host, req.method(), path, None));
    }
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{pq}");
    let mut r = local(StatusCode::PERMANENT_REDIRECT, "redirecting to https\n");
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            r.headers_mut().insert(header::LOCATION, v);
        }
        Err(_) => r = local(StatusCode::BAD_REQUEST, "bad request target\n"),
    }
    let stats = match route {
        Some(rt) => rt.stats.clone(),
        None => ctx.shared.metrics.host(&host),
    };
    Ok(ctx.finish(r, &stats, &host, req.method(), path, None))
}

/// Forwards `req` to an upstream of `route`.
async fn proxy(ctx: &Ctx, route: &Route, req: Request<Incoming>, proto: &'static str) -> Response<ProxyBody> {
    let shared = &ctx.shared;
    let upgrade = is_upgrade(&req);
    let (mut parts, body) = req.into_parts();
    let client_upgrade = if upgrade {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    forward_headers(
        &mut parts.headers,
        &parts.uri,
        parts.version,
        ctx.client.ip(),
        proto,
        upgrade,
    );
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = parts.uri.path();
    // A request without a body that failed to connect can go to another upstream.
    let retryable = is_idempotent(&parts.method) && body.is_end_stream();
    let attempts = if retryable { 1 + shared.retries as usize } else { 1 };
    let attempts = attempts.min(route.pool.len());
    let mut body = if retryable { None } else { Some(body) };
    let mut tried: Tried = 0;
    let mut failure = (StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n", None);
    for _ in 0..attempts {
        let Some(i) = route.pool.pick(tried) else { break };
        mark(&mut tried, i);
        let t = &route.pool.members[i];
        let out = client::Request {
            method: &parts.method,
            target,
            headers: &parts.headers,
            body: body.take(),
        };
        let sent = client::send(&t.state.idle, t.addr, shared.timeouts.upstream_connect, out);
        let err = match tokio::time::timeout(shared.timeouts.upstream_response, sent).await {
            Ok(Ok(answer)) => {
                let resp = upstream_response(answer, client_upgrade, t.addr);
                return ctx.finish(resp, &route.stats, &route.domain, &parts.method, path, Some(t.addr));
            }
            Ok(Err(e)) => e,
            Err(_) => {
                route.stats.upstream_errors.fetch_add(1, Relaxed);
                tracing::warn!(
                    "{}: upstream {} sent no response headers within {:?}",
                    route.domain,
                    t.addr,
                    shared.timeouts.upstream_response
                );
                let r = local(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n");
                return ctx.finish(r, &route.stats, &route.domain, &parts.method, path, Some(t.addr));
            }
        };
        route.stats.upstream_errors.fetch_add(1, Relaxed);
        // Neither the client's failure nor a keep-alive race says the upstream is unwell.
        let upstream_fault = !matches!(err, client::Error::Client(_) | client::Error::Closed(_));
        if upstream_fault && t.state.eject(shared.ejection) {
            shared.metrics.ejections.fetch_add(1, Relaxed);
            tracing::warn!("upstream {} ejected for {:?}: {err}", t.addr, shared.ejection);
        }
        if let client::Error::Connect(_) = err {
            shared.metrics.upstream_connect_errors.fetch_add(1, Relaxed);
            failure = (StatusCode::BAD_GATEWAY, "upstream unreachable\n", Some(t.addr));
            continue;
        }
        tracing::debug!("{}: upstream {}: {err}", route.domain, t.addr);
        failure = (StatusCode::BAD_GATEWAY, "upstream failed\n", Some(t.addr));
        break;
    }
    let (status, msg, addr) = failure;
    ctx.finish(
        local(status, msg),
        &route.stats,
        &route.domain,
        &parts.method,
        path,
        addr,
    )
}

/// Prepares the upstream's answer for the client; for `101 Switching
/// Protocols` it splices the client's upgraded connection with the upstream's.
fn upstream_response(answer: Answer, client_upgrade: Option<OnUpgrade>, upstream: SocketAddr) -> Response<ProxyBody> {
    match answer {
        Answer::Response(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(
                parts,
                ProxyBody {
                    inner: Inner::Upstream(body),
                    pending: None,
                },
            )
        }
        Answer::Switching(resp, conn) => {
            let Some(client) = client_upgrade else {
                // The client did not ask for an upgrade: never let one through.
                return local(StatusCode::BAD_GATEWAY, "unexpected upgrade from upstream\n");
            };
            let Some((mut up, early)) = conn.into_parts() else {
                return local(
                    StatusCode::BAD_GATEWAY,
                    "upgrade while the request body was still being sent\n",
                );
            };
            tokio::spawn(async move {
                let c = match client.await {
                    Ok(c) => c,
                    Err(e) => return tracing::debug!("upgrade to {upstream} not completed by the client: {e}"),
                };
                let mut c = hyper_util::rt::TokioIo::new(c);
                // Bytes the upstream sent right after its 101 go first.
                let r = async {
                    c.write_all(&early).await?;
                    tokio::io::copy_bidirectional(&mut c, &mut up).await
                };
                if let Err(e) = r.await {
                    tracing::debug!("upgraded connection to {upstream}: {e}");
                }
            });
            let (parts, ()) = resp.into_parts();
            Response::from_parts(parts, ProxyBody::full(Bytes::new()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_is_normalised() {
        assert_eq!(
            request_host(&req("/", Some("App.Example.COM:8443"))).unwrap(),
            "app.example.com"
        );
        assert_eq!(
            request_host(&req("/", Some("a.example.com."))).unwrap(),
            "a.example.com"
        );
        assert_eq!(request_host(&req("/", Some("[::1]:80"))).unwrap(), "[::1]");
        assert_eq!(
            request_host(&req("http://other.example.net/x", Some("a.example.com"))).unwrap(),
            "other.example.net",
            "absolute-form wins over Host"
        );
        assert!(request_host(&req("/", None)).is_none());
        assert!(request_host(&req("/", Some(""))).is_none());
    }

    #[test]
    fn forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("a.example.com"));
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("spoofed"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let uri: Uri = "/p?q=1".parse().unwrap();
        forward_headers(
            &mut h,
            &uri,
            Version::HTTP_11,
            "203.0.113.9".parse().unwrap(),
            "https",
            false,
        );
        for gone in ["connection", "x-secret", "keep-alive", "transfer-encoding", "te"] {
            assert!(!h.contains_key(gone), "{gone} removed");
        }
        assert_eq!(h["host"], "a.example.com");
        assert_eq!(h["x-forwarded-for"], "198.51.100.1, 203.0.113.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.example.com");
        assert_eq!(h["x-app"], "kept");
    }

    #[test]
    fn upgrade_headers_survive_and_h2_gets_host() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        let uri: Uri = "/ws".parse().unwrap();
        forward_headers(&mut h, &uri, Version::HTTP_11, "::1".parse().unwrap(), "http", true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["x-forwarded-for"], "::1");

        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        let uri: Uri = "https://a.example.com/x".parse().unwrap();
        forward_headers(
            &mut h,
            &uri,
            Version::HTTP_2,
            "10.1.1.1".parse().unwrap(),
            "https",
            false,
        );
        assert_eq!(h["host"], "a.example.com");
        assert_eq!(h["cookie"], "a=1; b=2");
    }

    #[test]
    fn a_client_cannot_strip_host_or_choose_x_forwarded_host() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("app.example.com"));
        h.insert("connection", HeaderValue::from_static("host"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        let uri: Uri = "/reset".parse().unwrap();
        forward_headers(&mut h, &uri, Version::HTTP_11, "::1".parse().unwrap(), "https", false);
        assert_eq!(h["host"], "app.example.com");
        assert_eq!(
            h.get_all("x-forwarded-host").iter().collect::<Vec<_>>(),
            ["app.example.com"]
        );

        // Without any Host left to copy, the client's value is still dropped.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        forward_headers(&mut h, &uri, Version::HTTP_11, "::1".parse().unwrap(), "https", false);
        assert!(!h.contains_key("x-forwarded-host"));
    }

    #[test]
    fn connection_tokens_beside_non_ascii_bytes_count() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_bytes(b"x-secret, \xff").unwrap());
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(!h.contains_key("x-secret"));

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_bytes(b"close, \xff").unwrap());
        assert!(has_token(&h, header::CONNECTION, "close"));
        assert!(!has_token(&h, header::CONNECTION, "upgrade"));
    }

    #[test]
    fn several_hosts_and_connect_are_refused() {
        let two = Request::builder()
            .header("host", "a.example.com")
            .header("host", "admin.internal")
            .body(())
            .unwrap();
        assert_eq!(refusal(&two).unwrap().status(), StatusCode::BAD_REQUEST);
        let connect = Request::builder()
            .method(Method::CONNECT)
            .uri("a.example.com:443")
            .body(())
            .unwrap();
        assert_eq!(refusal(&connect).unwrap().status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(refusal(&req("/", Some("a.example.com"))).is_none());
    }

    #[test]
    fn upgrade_detection() {
        let r = Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&r));
        let r = Request::builder().header("upgrade", "websocket").body(()).unwrap();
        assert!(!is_upgrade(&r));
    }
}
