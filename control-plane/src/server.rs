//! HTTPS serving: a TLS accept loop in front of the axum router.

use crate::api::RemoteAddr;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Encrypted bytes a connection holds for its peer beyond what the kernel
/// takes: one TLS record.
const SEND_BUFFER: usize = 16 * 1024 + 512;

/// The most an HTTP/1 connection buffers of what it reads.
const HTTP1_READ_BUFFER: usize = 64 * 1024;

/// How long a closed connection keeps discarding what its client still sends.
const LINGER: Duration = Duration::from_secs(5);

pub async fn serve_tls(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Router) -> anyhow::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, remote): (_, SocketAddr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let mut tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // rustls buffers up to 64 KiB of records a slow reader has not
            // taken yet; a fleet resyncing at once would hold that per agent.
            tls.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
            // The peer's address goes into each request (a layer per
            // connection would rebuild the router for each: 15 KB apiece).
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(RemoteAddr(remote));
                tower::Service::call(&mut app.clone(), req)
            });
            let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // Request bodies the handlers have not read yet are buffered up
            // to the window. An adaptive window starts at HTTP/2's 64 KB
            // and grows only with the connection's bandwidth-delay product:
            // a burst of peer reports from 5,000 agents waits in its
            // senders, while an upload over a slow link still gets a window
            // that fills it. Its bandwidth PING rides on every heartbeat
            // (hyper samples at most every 10 s); fixed windows made
            // reports cheaper but slowed the PostgreSQL fan-out
            // (docs/benchmarks.md), so it stays.
            http.http2().adaptive_window(true);
            // HTTP/1's read buffer grows to the largest body read through
            // it (400 KB by default) and stays: an agent's peer report on
            // each idle connection would hold that much.
            http.http1().max_buf_size(HTTP1_READ_BUFFER);
            let _ = http
                .serve_connection_with_upgrades(TokioIo::new(Lingering(Some(tls))), svc)
                .await;
        });
    }
}

/// A connection that closes the way nginx's `lingering_close` does.
///
/// hyper drops a connection right after answering a request it refused
/// before reading all of its body: a malformed header (400), or a handler
/// that answered without reading it (a 401 to an upload). Closing a socket
/// with unread bytes makes the kernel send a reset, which can overtake the
/// answer: the client then sees a broken connection instead of the error.
/// So on drop the stream is closed for writing, and what the client still
/// sends is read and thrown away, for at most [`LINGER`].
struct Lingering(Option<TlsStream<TcpStream>>);

impl Lingering {
    fn stream(&mut self) -> &mut TlsStream<TcpStream> {
        self.0.as_mut().expect("a Lingering stream is only taken on drop")
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let (Some(tls), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(async move {
            let _ = tokio::time::timeout(LINGER, linger(tls)).await;
        });
    }
}

async fn linger(mut tls: TlsStream<TcpStream>) {
    // close_notify and FIN: the client knows the answer is complete.
    let _ = tls.shutdown().await;
    let (mut tcp, _) = tls.into_inner();
    let mut sink = [0u8; 16 * 1024];
    while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
}

impl AsyncRead for Lingering {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    /// A client that sends a whole request (headers, then a body bigger
    /// than the socket buffers) before it reads the answer, as
    /// schemathesis's requests and most HTTP/1 clients do.
    async fn send_then_read(addr: SocketAddr, ca_pem: &str, head: &str, body_len: usize) -> io::Result<String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert?).unwrap();
        }
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await?;
        tls.write_all(format!("{head}content-length: {body_len}\r\n\r\n").as_bytes())
            .await?;
        tls.write_all(&vec![b'x'; body_len]).await?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn a_refused_request_gets_its_answer_while_its_body_is_still_coming() {
        let dir = tempfile::tempdir().unwrap();
        let tls = crate::tls::generated(dir.path(), &["127.0.0.1".into()]).unwrap();
        // Answers without reading the body, as an auth check does.
        let app = Router::new().fallback(|| async { StatusCode::UNAUTHORIZED });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_tls(listener, tls.server_config.clone(), app));

        let body = 4 << 20;
        let bad_header = "POST /upload HTTP/1.1\r\nhost: a\r\nx-bad: a\x01b\r\n";
        let answer = send_then_read(addr, &tls.ca_pem, bad_header, body).await;
        assert!(
            answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 400")),
            "malformed header: {answer:?}"
        );
        let unread = "POST /upload HTTP/1.1\r\nhost: a\r\nconnection: close\r\n";
        let answer = send_then_read(addr, &tls.ca_pem, unread, body).await;
        assert!(
            answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 401")),
            "unread body: {answer:?}"
        );
    }
}
