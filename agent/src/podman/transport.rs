//! HTTP/1.1 over the Podman unix socket: one connection per request (the
//! service is local, a connect costs microseconds, and no idle connection can
//! go stale across a Podman restart).

use super::Error;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::UnixStream;

/// A request body: sent in one piece, or streamed from a channel (a build
/// context read from disk, which may be gigabytes).
pub(crate) enum ReqBody {
    Full(Option<Bytes>),
    Stream(tokio::sync::mpsc::Receiver<Bytes>),
}

impl ReqBody {
    pub(crate) fn new(data: Vec<u8>) -> Self {
        ReqBody::Full(if data.is_empty() { None } else { Some(Bytes::from(data)) })
    }

    /// Streams `prefix`, then `file` in chunks read by a task of its own.
    pub(crate) fn file(prefix: Vec<u8>, mut file: tokio::fs::File) -> Self {
        use tokio::io::AsyncReadExt;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            if !prefix.is_empty() && tx.send(Bytes::from(prefix)).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match file.read(&mut buf).await {
                    // A read error ends the body early; Podman then fails
                    // the request on the short tar.
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        ReqBody::Stream(rx)
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ReqBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ReqBody::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ReqBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ReqBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// Sends one request and returns the response head with its still-streaming
/// body. The connection is driven by a task that ends with the body.
pub(crate) async fn send(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response<Incoming>, Error> {
    send_with(socket, method, path, body.map(ReqBody::new), &[]).await
}

/// [`send`] with extra request headers; a body is JSON unless they say
/// otherwise.
pub(crate) async fn send_with(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<ReqBody>,
    headers: &[(&str, String)],
) -> Result<Response<Incoming>, Error> {
    let stream = UnixStream::connect(socket).await.map_err(|e| Error::Connect {
        socket: socket.to_path_buf(),
        source: e,
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http {
            what: format!("{method} {path}"),
            source: e,
        })?;
    tokio::spawn(async move {
        // Errors surface through the request or the body; nothing to add here.
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(&method)
        .uri(path)
        .header(hyper::header::HOST, "podman");
    if body.is_some() && !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("content-type")) {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req
        .body(body.unwrap_or(ReqBody::Full(None)))
        .map_err(|e| Error::Decode(format!("building request {method} {path}: {e}")))?;
    sender.send_request(req).await.map_err(|e| Error::Http {
        what: format!("{method} {path}"),
        source: e,
    })
}

/// The next data chunk of a streaming body; `None` at the end.
pub(crate) async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await?;
        match frame {
            Err(e) => return Some(Err(e)),
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
                // Trailers: skip.
            }
        }
    }
}

/// Reads a whole body.
pub(crate) async fn read_all(body: &mut Incoming, what: &str) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    while let Some(chunk) = next_chunk(body).await {
        let chunk = chunk.map_err(|e| Error::Http {
            what: what.to_string(),
            source: e,
        })?;
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The JSON objects of a newline-delimited stream, as they come (how
/// Podman reports pulls, pushes and builds); lines that are not JSON are
/// skipped.
pub(crate) struct JsonLines<'a> {
    body: &'a mut Incoming,
    what: &'a str,
    buf: Vec<u8>,
    ended: bool,
}

impl<'a> JsonLines<'a> {
    pub(crate) fn new(body: &'a mut Incoming, what: &'a str) -> Self {
        JsonLines {
            body,
            what,
            buf: Vec::new(),
            ended: false,
        }
    }

    pub(crate) async fn next(&mut self) -> Result<Option<serde_json::Value>, Error> {
        loop {
            let line: Vec<u8> = match self.buf.iter().position(|b| *b == b'\n') {
                Some(nl) => self.buf.drain(..=nl).collect(),
                None if self.ended && self.buf.is_empty() => return Ok(None),
                None if self.ended => std::mem::take(&mut self.buf),
                None => {
                    match next_chunk(self.body).await {
                        None => self.ended = true,
                        Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                        Some(Err(e)) => {
                            return Err(Error::Http {
                                what: self.what.to_string(),
                                source: e,
                            })
                        }
                    }
                    continue;
                }
            };
            if let Ok(v) = serde_json::from_slice(&line) {
                return Ok(Some(v));
            }
        }
    }
}

/// A whole request: status and body, bounded by `timeout`.
pub(crate) async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(StatusCode, Vec<u8>), Error> {
    let what = format!("{method} {path}");
    let fut = async {
        let mut resp = send(socket, method, path, body).await?;
        let status = resp.status();
        let data = read_all(resp.body_mut(), &what).await?;
        Ok((status, data))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout { what, after: timeout }),
    }
}

/// Percent-encodes a query value or a path segment (everything but RFC 3986
/// unreserved characters, plus `keep`).
pub(crate) fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            encode(r#"{"label":["a=b c"]}"#, b""),
            "%7B%22label%22%3A%5B%22a%3Db%20c%22%5D%7D"
        );
        assert_eq!(encode("localhost/x/y:1", b"/:"), "localhost/x/y:1");
        assert_eq!(encode("a/b", b""), "a%2Fb");
    }
}
