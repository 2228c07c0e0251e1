//! Prometheus text exposition on `--metrics` (any path; `/metrics` by convention).

use crate::config::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

/// Counters for one routed host.
#[derive(Debug, Default)]
pub struct HostStats {
    /// Responses by status class: 1xx..5xx.
    pub by_class: [AtomicU64; 5],
    pub upstream_errors: AtomicU64,
}

impl HostStats {
    pub fn count(&self, status: u16) {
        let i = ((status / 100).clamp(1, 5) - 1) as usize;
        self.by_class[i].fetch_add(1, Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
pub enum ConnKind {
    Http,
    Https,
    Passthrough,
    Tcp,
}

#[derive(Debug, Default)]
pub struct Metrics {
    active: [AtomicI64; 4],
    accepted: [AtomicU64; 4],
    pub tls_handshake_errors: AtomicU64,
    pub upstream_connect_errors: AtomicU64,
    pub ejections: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub revision: AtomicU64,
    pub access_log_dropped: AtomicU64,
    hosts: Mutex<BTreeMap<Box<str>, Arc<HostStats>>>,
    /// Requests for hosts no route knows.
    pub unknown_host: Arc<HostStats>,
}

/// Counts a connection as active until dropped.
pub struct ConnGuard<'a>(&'a AtomicI64);

impl Drop for ConnGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub fn connection(&self, kind: ConnKind) -> ConnGuard<'_> {
        let i = kind as usize;
        self.accepted[i].fetch_add(1, Relaxed);
        self.active[i].fetch_add(1, Relaxed);
        ConnGuard(&self.active[i])
    }

    /// The counters of `host`, created on first use and kept across reloads.
    pub fn host(&self, host: &str) -> Arc<HostStats> {
        let mut m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(host.into()).or_default().clone()
    }

    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let kinds = ["http", "https", "passthrough", "tcp"];
        o.push_str("# HELP berth_proxy_connections_active Client connections open now.\n");
        o.push_str("# TYPE berth_proxy_connections_active gauge\n");
        for (i, k) in kinds.iter().enumerate() {
            let _ = writeln!(
                o,
                "berth_proxy_connections_active{{listener=\"{k}\"}} {}",
                self.active[i].load(Relaxed)
            );
        }
        o.push_str("# HELP berth_proxy_connections_total Client connections accepted.\n");
        o.push_str("# TYPE berth_proxy_connections_total counter\n");
        for (i, k) in kinds.iter().enumerate() {
            let _ = writeln!(
                o,
                "berth_proxy_connections_total{{listener=\"{k}\"}} {}",
                self.accepted[i].load(Relaxed)
            );
        }
        o.push_str("# HELP berth_proxy_requests_total HTTP requests answered, by host and status class.\n");
        o.push_str("# TYPE berth_proxy_requests_total counter\n");
        let hosts: Vec<(Box<str>, Arc<HostStats>)> = {
            let m = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let all = hosts
            .iter()
            .map(|(h, s)| (escape(h), s))
            .chain(std::iter::once(("_unknown".to_string(), &self.unknown_host)));
        let all: Vec<_> = all.collect();
        for (h, s) in &all {
            for (i, c) in s.by_class.iter().enumerate() {
                let v = c.load(Relaxed);
                if v > 0 {
                    let _ = writeln!(o, "berth_proxy_requests_total{{host=\"{h}\",code=\"{}xx\"}} {v}", i + 1);
                }
            }
        }
        o.push_str("# HELP berth_proxy_upstream_errors_total Requests whose upstream failed (connect or response).\n");
        o.push_str("# TYPE berth_proxy_upstream_errors_total counter\n");
        for (h, s) in &all {
            let v = s.upstream_errors.load(Relaxed);
            if v > 0 {
                let _ = writeln!(o, "berth_proxy_upstream_errors_total{{host=\"{h}\"}} {v}");
            }
        }
        let simple: [(&str, &str, &str, u64); 7] = [
            (
                "berth_proxy_upstream_connect_errors_total",
                "counter",
                "Failed connections to upstreams (HTTP and TCP).",
                self.upstream_connect_errors.load(Relaxed),
            ),
            (
                "berth_proxy_ejections_total",
                "counter",
                "Upstreams taken out of rotation after a failure.",
                self.ejections.load(Relaxed),
            ),
            (
                "berth_proxy_tls_handshake_errors_total",
                "counter",
                "TLS handshakes that failed or timed out.",
                self.tls_handshake_errors.load(Relaxed),
            ),
            (
                "berth_proxy_config_reloads_total",
                "counter",
                "Config files loaded.",
                self.reloads_ok.load(Relaxed),
            ),
            (
                "berth_proxy_config_reload_errors_total",
                "counter",
                "Config files rejected (the previous config stays).",
                self.reloads_failed.load(Relaxed),
            ),
            (
                "berth_proxy_config_revision",
                "gauge",
                "Revision of the config being served.",
                self.revision.load(Relaxed),
            ),
            (
                "berth_proxy_access_log_dropped_total",
                "counter",
                "Access-log lines dropped because the writer fell behind.",
                self.access_log_dropped.load(Relaxed),
            ),
        ];
        for (name, typ, help, v) in simple {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {typ}\n{name} {v}");
        }
        o
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves the metrics page until the listener fails.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("metrics listener: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = shared.metrics.render();
                async move {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        m.host("a.example.com").count(200);
        m.host("a.example.com").count(204);
        m.host("a.example.com").count(503);
        m.unknown_host.count(404);
        let g = m.connection(ConnKind::Https);
        m.revision.store(7, Relaxed);
        let t = m.render();
        assert!(
            t.contains("berth_proxy_requests_total{host=\"a.example.com\",code=\"2xx\"} 2"),
            "{t}"
        );
        assert!(t.contains("berth_proxy_requests_total{host=\"a.example.com\",code=\"5xx\"} 1"));
        assert!(t.contains("berth_proxy_requests_total{host=\"_unknown\",code=\"4xx\"} 1"));
        assert!(t.contains("berth_proxy_connections_active{listener=\"https\"} 1"));
        assert!(t.contains("berth_proxy_config_revision 7"));
        drop(g);
        assert!(m
            .render()
            .contains("berth_proxy_connections_active{listener=\"https\"} 0"));
    }
}
