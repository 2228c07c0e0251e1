//! The client-facing listeners: accept loops, the TLS front door (ClientHello
//! peek → passthrough or termination → TLS-ALPN-01 or HTTP), and serving
//! HTTP/1.1 and HTTP/2 connections.

use crate::config::Shared;
use crate::io::{with_idle_timeout, Activity, ConnIo, Lingering};
use crate::metrics::ConnKind;
use crate::{http, sni, tcp, tls};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Accepts forever; transient errors (e.g. out of file descriptors) back off.
pub(crate) async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((s, a)) => {
                let _ = s.set_nodelay(true);
                return (s, a);
            }
            Err(e) => {
                tracing::warn!("{what} listener: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Plain HTTP: ACME HTTP-01 answers and redirects to HTTPS.
pub async fn serve_http(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, peer) = accept(&listener, "HTTP").await;
        let shared = shared.clone();
        tokio::spawn(async move {
            let _g = shared.metrics.connection(ConnKind::Http);
            let activity = Activity::new();
            let io = ConnIo::new(Lingering::new(stream), Vec::new(), activity.clone());
            let s = shared.clone();
            let svc = service_fn(move |req| http::handle_http(s.clone(), peer, req));
            let conn = shared.h1.serve_connection(TokioIo::new(io), svc);
            with_idle_timeout(conn, &activity, shared.timeouts.idle).await;
        });
    }
}

/// HTTPS (and TLS passthrough by SNI).
pub async fn serve_https(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, peer) = accept(&listener, "HTTPS").await;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = tls_connection(&shared, stream, peer).await {
                shared.metrics.tls_handshake_errors.fetch_add(1, Relaxed);
                tracing::debug!("TLS connection from {peer}: {e}");
            }
        });
    }
}

async fn tls_connection(shared: &Arc<Shared>, mut stream: TcpStream, peer: SocketAddr) -> Result<(), String> {
    let hs_timeout = shared.timeouts.tls_handshake;
    let mut hello_bytes = Vec::new();
    let hello = tokio::time::timeout(hs_timeout, sni::read_client_hello(&mut stream, &mut hello_bytes))
        .await
        .map_err(|_| format!("no ClientHello within {hs_timeout:?}"))?
        .map_err(|e| format!("reading ClientHello: {e}"))?;
    if let Some(name) = hello.sni.as_deref() {
        let pool = shared.config().passthrough.get(name).cloned();
        if let Some(pool) = pool {
            let _g = shared.metrics.connection(ConnKind::Passthrough);
            tcp::splice(shared, stream, hello_bytes, &pool, peer, name).await;
            return Ok(());
        }
    }
    let _g = shared.metrics.connection(ConnKind::Https);
    let activity = Activity::new();
    let io = ConnIo::new(Lingering::new(stream), hello_bytes, activity.clone());
    let tls_stream = tokio::time::timeout(hs_timeout, shared.tls.accept(io))
        .await
        .map_err(|_| format!("TLS handshake not done within {hs_timeout:?}"))?
        .map_err(|e| format!("TLS handshake (SNI {:?}): {e}", hello.sni))?;
    let alpn = tls_stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    let s = shared.clone();
    let svc = service_fn(move |req| http::handle_https(s.clone(), peer, req));
    let io = TokioIo::new(tls_stream);
    match alpn.as_deref() {
        Some(tls::ALPN_ACME) => {
            // TLS-ALPN-01: the handshake was the answer.
            tracing::info!("answered TLS-ALPN-01 challenge for {:?} from {peer}", hello.sni);
            let _ = io.into_inner().shutdown().await;
        }
        Some(tls::ALPN_H2) => {
            let conn = shared.h2.serve_connection(io, svc);
            with_idle_timeout(conn, &activity, shared.timeouts.idle).await;
        }
        _ => {
            let conn = shared.h1.serve_connection(io, svc).with_upgrades();
            with_idle_timeout(conn, &activity, shared.timeouts.idle).await;
        }
    }
    Ok(())
}
