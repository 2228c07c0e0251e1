//! `GET /metrics` in Prometheus's text format (docs/monitoring.md): API
//! requests by route and status, long-poll waiters, the revision and how
//! fast it reaches the waiting nodes, nodes, releases and builds by state,
//! ACME orders, certificate expiry, live streams. Counters are kept here;
//! the rest is read from the store at scrape time.

use crate::auth::is_admin_token;
use crate::error::{ApiErr, ApiResult};
use crate::state::SharedState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use berth_protocol::prom::{escape, family, Histogram};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Upper bounds (seconds) of the fan-out histogram's buckets.
const FANOUT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    longpoll_waiters: AtomicI64,
    fanout: Histogram,
    /// The last revision this process moved, and when.
    moved: Mutex<Option<(i64, Instant)>>,
}

/// Counts a long-poll waiting while it lives.
pub struct Waiting<'a>(&'a Metrics);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.longpoll_waiters.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            longpoll_waiters: AtomicI64::default(),
            fanout: Histogram::new(&FANOUT_BUCKETS),
            moved: Mutex::default(),
        }
    }
}

impl Metrics {
    pub fn waiting(&self) -> Waiting<'_> {
        self.longpoll_waiters.fetch_add(1, Ordering::Relaxed);
        Waiting(self)
    }

    pub fn revision_moved(&self, rev: i64) {
        if let Ok(mut m) = self.moved.lock() {
            if m.is_none_or(|(r, _)| rev > r) {
                *m = Some((rev, Instant::now()));
            }
        }
    }

    /// A waiting long-poll answered with `rev`, woken by its move.
    pub fn delivered(&self, rev: i64) {
        let moved = self.moved.lock().ok().and_then(|m| *m);
        if let Some((r, at)) = moved {
            if r == rev {
                self.fanout.observe(at.elapsed().as_secs_f64());
            }
        }
    }
}

/// Middleware of every route: counts requests by matched route and status.
pub async fn count(State(s): State<SharedState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |m| m.as_str().to_string());
    let resp = next.run(req).await;
    if let Ok(mut r) = s.metrics.requests.lock() {
        *r.entry((route, resp.status().as_u16())).or_default() += 1;
    }
    resp
}

fn authorized(s: &SharedState, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    if is_admin_token(s, given) {
        return true;
    }
    // Compare digests, as for the admin token.
    s.metrics_token_hash
        .as_ref()
        .is_some_and(|h| crate::auth::hash_admin_token(given) == *h)
}

/// `GET /metrics`, with the metrics token or the admin token.
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "public", security(("admin" = [])),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn serve(State(s): State<SharedState>, headers: HeaderMap) -> ApiResult<Response> {
    if !authorized(&s, &headers) {
        return Err(ApiErr::unauthorized(
            "authorization",
            "authorization: a bearer token (--metrics-token-file, or the admin token) is needed",
        ));
    }
    let mut out = String::with_capacity(8 * 1024);
    let m = &s.metrics;

    family(
        &mut out,
        "berth_api_requests_total",
        "counter",
        "API requests by matched route and status.",
    );
    if let Ok(r) = m.requests.lock() {
        for ((route, status), n) in r.iter() {
            let _ = writeln!(
                out,
                "berth_api_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
    }
    family(
        &mut out,
        "berth_longpoll_waiters",
        "gauge",
        "Agents waiting in a desired-state long-poll.",
    );
    let _ = writeln!(
        out,
        "berth_longpoll_waiters {}",
        m.longpoll_waiters.load(Ordering::Relaxed)
    );
    family(&mut out, "berth_revision", "gauge", "The cluster's current revision.");
    let _ = writeln!(out, "berth_revision {}", s.current_revision());
    family(
        &mut out,
        "berth_fanout_seconds",
        "histogram",
        "From a revision moving to each waiting long-poll answering with it.",
    );
    m.fanout.write(&mut out, "berth_fanout_seconds");

    let now = crate::store::now();
    let nodes = s.store.list_nodes().await?;
    let mut by_state: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for role in ["worker", "proxy"] {
        for state in ["online", "offline"] {
            by_state.insert((role, state), 0);
        }
    }
    for n in &nodes {
        let online = n.online(now, s.offline_after_secs);
        *by_state
            .entry((n.role.as_str(), if online { "online" } else { "offline" }))
            .or_default() += 1;
    }
    family(&mut out, "berth_nodes", "gauge", "Nodes by role and state.");
    for ((role, state), n) in by_state {
        let _ = writeln!(out, "berth_nodes{{role=\"{role}\",state=\"{state}\"}} {n}");
    }

    let replicas = s.store.list_replicas().await?;
    family(
        &mut out,
        "berth_replicas",
        "gauge",
        "Replicas by service and whether they run healthy.",
    );
    let mut per: BTreeMap<(&str, bool), u64> = BTreeMap::new();
    for r in &replicas {
        per.entry((r.service.as_str(), true)).or_default();
        per.entry((r.service.as_str(), false)).or_default();
        let ok = r.state.as_deref() == Some("running") && r.healthy;
        *per.entry((r.service.as_str(), ok)).or_default() += 1;
    }
    for ((service, ok), n) in per {
        let _ = writeln!(
            out,
            "berth_replicas{{service=\"{}\",healthy=\"{ok}\"}} {n}",
            escape(service)
        );
    }

    family(
        &mut out,
        "berth_releases",
        "gauge",
        "Releases by state (queued, rolling, complete, failed, rolled-back).",
    );
    for (state, n) in s.store.count_by_state("releases").await? {
        let _ = writeln!(out, "berth_releases{{state=\"{}\"}} {n}", escape(&state));
    }
    family(
        &mut out,
        "berth_rollouts_rolling_back",
        "gauge",
        "Releases rolling back now.",
    );
    let _ = writeln!(
        out,
        "berth_rollouts_rolling_back {}",
        s.store.count_rolling_back().await?
    );
    family(&mut out, "berth_builds", "gauge", "Builds by state.");
    for (state, n) in s.store.count_by_state("builds").await? {
        let _ = writeln!(out, "berth_builds{{state=\"{}\"}} {n}", escape(&state));
    }

    family(
        &mut out,
        "berth_acme_orders_total",
        "counter",
        "ACME orders this process created.",
    );
    let _ = writeln!(out, "berth_acme_orders_total {}", s.acme_orders.load(Ordering::Relaxed));
    family(
        &mut out,
        "berth_certificate_expiry_timestamp_seconds",
        "gauge",
        "When each domain's certificate expires (Unix seconds); absent without one.",
    );
    family(
        &mut out,
        "berth_certificate_failures",
        "gauge",
        "Failed orders in a row, per domain.",
    );
    let domains = s.store.list_domains().await?;
    for d in &domains {
        if let Some(t) = d.not_after {
            let _ = writeln!(
                out,
                "berth_certificate_expiry_timestamp_seconds{{domain=\"{}\"}} {t}",
                escape(&d.spec.domain)
            );
        }
    }
    for d in domains.iter().filter(|d| !d.spec.passthrough) {
        let _ = writeln!(
            out,
            "berth_certificate_failures{{domain=\"{}\"}} {}",
            escape(&d.spec.domain),
            d.failures
        );
    }

    let streams = s.streams.open_count();
    family(
        &mut out,
        "berth_streams_open",
        "gauge",
        "Live log and exec streams (berth logs, berth exec).",
    );
    let _ = writeln!(out, "berth_streams_open {streams}");

    Ok(([("content-type", "text/plain; version=0.0.4; charset=utf-8")], out).into_response())
}
