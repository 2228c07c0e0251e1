//! HTTP routes, grouped by who may call them: anyone (`public()` here,
//! [`releases`], and registration in [`agent`]), a registered node signing
//! its requests (the rest of [`agent`]), or the admin ([`tokens`],
//! [`nodes`], [`services`], [`routes`], [`users`], all behind one
//! [`admin_only`] check: the admin token or a dashboard session cookie,
//! which [`session`] hands out). Inputs are validated here, at the edge; the store only sees
//! well-formed values. Every route is registered with utoipa-axum's
//! `routes!`, from its handler's `#[utoipa::path]`, and so is in the
//! OpenAPI document served at `/v1/openapi.json` ([`openapi`]).

pub mod agent;
pub mod builds;
pub mod events;
pub mod hooks;
pub mod nodes;
pub mod openapi;
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
use axum::{Extension, Router};
use std::net::SocketAddr;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;

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

/// A group's routes: each registered with `routes!(handler, ...)`, so
/// the router and the OpenAPI document come from the same list (see
/// [`openapi`]).
pub type Routes = OpenApiRouter<SharedState>;
/// An admin module's routes, before the admin check.
pub type AdminRoutes = Vec<UtoipaMethodRouter<SharedState>>;

pub fn router(state: SharedState) -> Router {
    // The admin check wraps each admin route's handlers (the method
    // router's route_layer), not the route: an unknown path stays a 404
    // and a wrong method a 405 for everyone, as for the other routes.
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
    .fold(Routes::default(), |r, route| {
        r.routes(route.map(|m| m.route_layer(admin_only.clone())))
    });
    let agent = Routes::default()
        .merge(agent::routes())
        .merge(builds::agent_routes())
        .merge(streams::agent_routes());
    let (router, doc) = openapi::root()
        .merge(public())
        .merge(openapi::secured(agent, openapi::Caller::Node))
        .merge(openapi::secured(admin, openapi::Caller::Admin))
        .split_for_parts();
    let doc = openapi::Document::new(&openapi::finish(doc));
    router
        // The dashboard's page and assets: not API, so not in the document.
        .merge(crate::dashboard::routes())
        // Both after every route: they apply to the routes there are.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { ApiErr::not_found("path", "path: no such API endpoint") })
        .layer(Extension(doc))
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

/// A known path with a method it does not take: an ApiError like every
/// other refusal (axum's own is an empty body); axum adds `Allow`.
async fn method_not_allowed(method: axum::http::Method) -> ApiErr {
    ApiErr::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        berth_protocol::ErrorCode::MethodNotAllowed,
        format!("method: {method} is not allowed on this path (see the Allow header)"),
    )
    .on("method")
}

/// What anyone may fetch or send: health, the CA, this API's document,
/// registration (it proves itself with a join token), the installer
/// scripts and releases, and the two routes that check credentials of
/// their own (/metrics: the metrics token; the registry's token server).
fn public() -> Routes {
    Routes::default()
        .routes(routes!(healthz))
        .routes(routes!(ca_pem))
        .routes(routes!(openapi::serve))
        .routes(routes!(agent::register))
        .routes(routes!(crate::metrics::serve))
        .merge(releases::routes())
        .merge(registry::routes())
        .merge(hooks::routes())
        .merge(session::routes())
}

/// Liveness: answers while the process serves.
#[utoipa::path(get, path = "/healthz", tag = "public",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// The CA certificate that signed the control plane's TLS certificate.
#[utoipa::path(get, path = "/v1/ca.pem", tag = "public",
    responses((status = 200, description = "PEM", content_type = "application/x-pem-file", body = String)))]
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

/// `axum::extract::Path`, but a segment that does not parse is an
/// [`ApiErr`] naming it (400 `invalid_field`), like every other input;
/// axum's own rejection is plain text.
pub(crate) struct Path<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for Path<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiErr;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiErr> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        let e = match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => return Ok(Path(v)),
            Err(e) => e,
        };
        // The parameter's name: from the error, else the route's first one.
        let named = match &e {
            PathRejection::FailedToDeserializePathParams(d) => match d.kind() {
                ErrorKind::ParseErrorAtKey { key, .. }
                | ErrorKind::InvalidUtf8InPathParam { key }
                | ErrorKind::DeserializeError { key, .. } => Some(key.clone()),
                _ => None,
            },
            _ => None,
        };
        let field = named
            .or_else(|| {
                let route = parts.extensions.get::<axum::extract::MatchedPath>()?.as_str();
                let start = route.find('{')? + 1;
                Some(route[start..start + route[start..].find('}')?].to_string())
            })
            .unwrap_or_else(|| "path".into());
        Err(ApiErr::invalid(&field, format!("{field}: {}", e.body_text())))
    }
}
