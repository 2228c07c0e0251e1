//! HTTP routes, grouped by who may call them: anyone (`public()` here,
//! [`releases`], and registration in [`agent`]), a registered node signing
//! its requests (the rest of [`agent`]), or the admin ([`tokens`],
//! [`nodes`], [`services`], [`routes`], [`users`], all behind one
//! [`admin_only`] check: the admin token or a dashboard session cookie,
//! which [`session`] hands out). Inputs are validated here, at the edge; the store only sees
//! well-formed values.

pub mod agent;
pub mod builds;
pub mod events;
pub mod hooks;
pub mod nodes;
pub mod registry;
pub mod releases;
pub mod routes;
pub mod services;
pub mod session;
pub mod streams;
pub mod tokens;
pub mod users;

use crate::auth::admin_only;
use crate::error::{ApiErr, ApiResult};
use crate::state::SharedState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::middleware::{from_fn_with_state, map_response};
use axum::response::IntoResponse;
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use std::net::SocketAddr;

/// Largest request body accepted anywhere.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest status report.
pub const MAX_STATUS_BODY: usize = 4 * 1024 * 1024;
/// Longest a long-poll may wait.
pub const MAX_WAIT_SECS: u64 = 60;
pub const MIN_TOKEN_TTL: u64 = 60;
pub const MAX_TOKEN_TTL: u64 = 30 * 24 * 3600;

/// The peer address of the TLS connection a request came on.
#[derive(Clone, Copy)]
pub struct RemoteAddr(pub SocketAddr);

/// An admin module's routes: path and methods, before the admin check.
pub type AdminRoutes = Vec<(&'static str, MethodRouter<SharedState>)>;

pub fn router(state: SharedState) -> Router {
    // The admin check wraps each admin route's handlers, not the route as
    // a whole: an unknown path stays a 404 and a wrong method a 405 for
    // everyone, as they are for the other routes.
    let admin_only = from_fn_with_state(state.clone(), admin_only);
    let admin = [
        tokens::routes(),
        nodes::routes(),
        services::routes(),
        routes::routes(),
        registry::admin_routes(),
        builds::admin_routes(),
        hooks::admin_routes(),
        streams::admin_routes(),
        events::routes(),
        users::routes(),
    ]
    .into_iter()
    .flatten()
    .fold(Router::new(), |r, (path, methods)| {
        r.route(path, methods.route_layer(admin_only.clone()))
    });
    Router::new()
        .merge(public())
        .merge(agent::routes())
        .merge(builds::agent_routes())
        .merge(streams::agent_routes())
        .merge(admin)
        .route("/metrics", get(crate::metrics::serve))
        .fallback(|| async { ApiErr::not_found("path", "path: no such API endpoint") })
        .layer(from_fn_with_state(state.clone(), crate::metrics::count))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(map_response(security_headers))
        .with_state(state)
}

/// On every response: no content sniffing (a JSON error is never run as
/// a script) and no Referer leaving the dashboard with its URLs.
async fn security_headers(mut resp: axum::response::Response) -> axum::response::Response {
    use axum::http::header::{HeaderValue, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS};
    let h = resp.headers_mut();
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

/// What anyone may fetch or send: health, the CA, registration (it proves
/// itself with a join token) and the installer scripts and releases.
fn public() -> Router<SharedState> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .merge(crate::dashboard::routes())
        .route("/v1/ca.pem", get(ca_pem))
        .route("/v1/register", post(agent::register))
        .merge(releases::routes())
        .merge(registry::routes())
        .merge(hooks::routes())
        .merge(session::routes())
}

async fn ca_pem(State(s): State<SharedState>) -> impl IntoResponse {
    ([("content-type", "application/x-pem-file")], s.ca_pem.clone())
}

/// The query, or why it does not parse (400 on `query`).
pub(crate) fn query<T>(q: Result<axum::extract::Query<T>, axum::extract::rejection::QueryRejection>) -> ApiResult<T> {
    q.map(|axum::extract::Query(q)| q)
        .map_err(|e| ApiErr::invalid("query", format!("query: {}", e.body_text())))
}

/// A streamed `application/x-ndjson` response: each chunk from `rx` as it
/// comes, ended when every sender is gone.
pub(crate) fn ndjson_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> axum::response::Response {
    let body = axum::body::Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    }));
    ([("content-type", "application/x-ndjson")], body).into_response()
}

/// The request body, or why it could not be read (too large: 413).
pub(crate) fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        let message = format!("body: {} (limit {} KiB)", e.body_text(), MAX_BODY / 1024);
        ApiErr::body(&e, message)
    })
}
