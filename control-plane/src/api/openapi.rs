//! The API's OpenAPI 3.1 document, served at `GET /v1/openapi.json`.
//!
//! Every route is registered through a utoipa-axum [`OpenApiRouter`] with
//! `routes!(handler)`, which takes the method and path from the handler's
//! `#[utoipa::path]`: the router and the document come from that one
//! list, so a route cannot be served undocumented or documented unserved.
//! This module adds what is the same for many routes: who may call them
//! ([`secured`], by route group), the error responses and the security
//! schemes ([`finish`]).

use axum::body::Bytes;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Extension;
use berth_protocol::session::{HEADER_COUNTER, HEADER_MAC, HEADER_SESSION};
use berth_protocol::signing::{HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::{ApiError, ErrorCode};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, ResponseBuilder};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub const PATH: &str = "/v1/openapi.json";

/// The document's frame; the paths come from the routers.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Berth control plane",
        description = "The API the `berth` CLI and the agents use. JSON in and out; \
            every error is an `ApiError` naming the input it is about. \
            See docs/api.md in the repository."
    ),
    components(schemas(ApiError, ErrorCode)),
    tags(
        (name = "public", description = "No authentication: health, the CA, the installer and releases, registration (proves itself with a join token)"),
        (name = "agent", description = "Called by a registered node, every request signed with the node's Ed25519 key or authenticated by a session opened with it"),
        (name = "nodes"), (name = "tokens"), (name = "services"), (name = "routes"),
        (name = "builds"), (name = "registry"), (name = "events"), (name = "streams"),
        (name = "users", description = "Dashboard users"),
        (name = "session", description = "Dashboard sign-in: the `__Host-berth_session` cookie"),
    )
)]
struct Frame;

pub const ADMIN: &str = "admin";
/// The dashboard's session cookie scheme.
pub const SESSION: &str = "session";

/// Who may call a group of routes.
#[derive(Clone, Copy)]
pub enum Caller {
    /// `Authorization: Bearer <admin token>`, or the dashboard's session
    /// cookie (with `x-csrf-token` on changes).
    Admin,
    /// A registered node: the `x-berth-*` signature or session headers.
    Node,
}

/// Marks every operation of `r` as needing `who`'s credentials.
pub fn secured<S: Send + Sync + Clone + 'static>(mut r: OpenApiRouter<S>, who: Caller) -> OpenApiRouter<S> {
    let requirements = match who {
        // Either one: two alternative requirements.
        Caller::Admin => vec![
            SecurityRequirement::new(ADMIN, Vec::<String>::new()),
            SecurityRequirement::new(SESSION, Vec::<String>::new()),
        ],
        // The node and either its signature (three headers) or its
        // session's (three more): two requirements naming each header.
        Caller::Node => [
            [HEADER_TIMESTAMP, HEADER_NONCE, HEADER_SIGNATURE],
            [HEADER_SESSION, HEADER_COUNTER, HEADER_MAC],
        ]
        .into_iter()
        .map(|headers| {
            headers
                .into_iter()
                .fold(SecurityRequirement::new(HEADER_NODE, Vec::<String>::new()), |req, h| {
                    req.add(h, Vec::<String>::new())
                })
        })
        .collect(),
    };
    for item in r.get_openapi_mut().paths.paths.values_mut() {
        for op in operations(item) {
            op.security = Some(requirements.clone());
        }
    }
    r
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
        &mut item.head,
        &mut item.options,
        &mut item.trace,
    ]
    .into_iter()
    .flatten()
}

/// The root router, with the document's frame.
pub fn root<S: Send + Sync + Clone + 'static>() -> OpenApiRouter<S> {
    OpenApiRouter::with_openapi(Frame::openapi())
}

/// Completes the collected document: version, security schemes, and the
/// `ApiError` body on every operation's 4XX and 5XX answers (every error
/// of this API is one; see crate::error).
pub fn finish(mut doc: OpenApi) -> OpenApi {
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        ADMIN.into(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some("The admin token: DATA_DIR/admin.token on the control plane (the CLI reads it from `--admin-token-file`)."))
                .build(),
        ),
    );
    components.security_schemes.insert(
        SESSION.into(),
        SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
            "__Host-berth_session",
            "The dashboard's session cookie, from POST /v1/session; requests that change something \
             also send the session's CSRF token in `x-csrf-token`.",
        ))),
    );
    components.security_schemes.insert(
        "registry".into(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Basic)
                .description(Some("The registry's token server: `admin` and the admin token, or a node's name and its registry password."))
                .build(),
        ),
    );
    for (h, what) in [
        (HEADER_NODE, "The node's id, from its registration."),
        (
            HEADER_TIMESTAMP,
            "Unix seconds; within 300 s of the control plane's clock.",
        ),
        (HEADER_NONCE, "Random, never reused by the node."),
        (
            HEADER_SIGNATURE,
            "Base64 Ed25519 signature, with the node's key, over method, path and query, \
             SHA-256 of the body, timestamp and nonce (berth_protocol::signing).",
        ),
        (
            HEADER_SESSION,
            "Instead of a signature: the id of a session from POST /v1/agent/session.",
        ),
        (
            HEADER_COUNTER,
            "With a session: 1, 2, 3... each accepted once (berth_protocol::session).",
        ),
        (
            HEADER_MAC,
            "With a session: hex HMAC-SHA256, with the session key, over method, path and query, \
             counter and body (berth_protocol::session).",
        ),
    ] {
        components.security_schemes.insert(
            h.into(),
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(h, what))),
        );
    }
    components.responses.insert(
        "Error".into(),
        RefOr::T(
            ResponseBuilder::new()
                .description(
                    "An ApiError: `error` says what is wrong and starts with `field`, the input it is about; \
                     `code` is stable for programs.",
                )
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ApiError")))
                        .build(),
                )
                .build(),
        ),
    );
    for item in doc.paths.paths.values_mut() {
        for op in operations(item) {
            for range in ["4XX", "5XX"] {
                op.responses
                    .responses
                    .entry(range.into())
                    .or_insert_with(|| RefOr::Ref(Ref::from_response_name("Error")));
            }
        }
    }
    doc
}

/// The serialized document, made once when the router is built.
#[derive(Clone)]
pub struct Document(pub Bytes);

impl Document {
    pub fn new(doc: &OpenApi) -> Self {
        Document(Bytes::from(
            doc.to_pretty_json().expect("the OpenAPI document serializes"),
        ))
    }
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", operation_id = "openapi", tag = "public",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")))]
pub async fn serve(Extension(doc): Extension<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.0)
}
