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

/// A request body sent in one piece.
pub(crate) struct FullBody(Option<Bytes>);

impl FullBody {
    pub(crate) fn new(data: Vec<u8>) -> Self {
        FullBody(if data.is_empty() { None } else { Some(Bytes::from(data)) })
    }
}

impl Body for FullBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.as_ref().map_or(0, |b| b.len() as u64))
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
    send_with(socket, method, path, body, &[]).await
}

/// [`send`] with extra request headers.
pub(crate) async fn send_with(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
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
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    for (name, value) in headers {
        req = req.header(*name, value);
    }
    let req = req
        .body(FullBody::new(body.unwrap_or_default()))
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
