//! Authentication: admin bearer token for the CLI or a dashboard session
//! cookie (checked once for the whole admin router by [`admin_only`]);
//! for agents an Ed25519 request signature or a session's MAC
//! ([`require_node`], in each node handler: both cover the body).

use crate::error::{ApiErr, ApiResult};
use crate::node_sessions::Refusal;
use crate::sessions;
use crate::state::{AppState, SharedState};
use crate::store::{nodes::NodeRow, now, users::SessionRow};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::Response;
use berth_protocol::session::{HEADER_COUNTER, HEADER_MAC, HEADER_SESSION};
use berth_protocol::signing::{self, SignedHeaders, HEADER_NODE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use berth_protocol::user::{ADMIN_USER, CSRF_HEADER};
use berth_protocol::ErrorCode;
use sha2::{Digest, Sha256};

pub fn hash_admin_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Whether `given` is the admin token.
pub fn is_admin_token(state: &AppState, given: &str) -> bool {
    // Compare digests so the comparison time says nothing about the token.
    sessions::same(&hash_admin_token(given), &state.admin_token_hash)
}

/// Checks `Authorization: Bearer <admin token>`.
fn require_admin(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiErr::unauthorized("authorization", "authorization: missing admin bearer token"))?;
    if is_admin_token(state, given) {
        Ok(())
    } else {
        Err(ApiErr::unauthorized(
            "authorization",
            "authorization: admin token is not valid",
        ))
    }
}

/// Middleware of every admin route (see [`crate::api::router`]): lets a
/// request through only with the admin token or, without an
/// `Authorization` header, a valid session cookie (then with the CSRF and
/// WebSocket origin checks a browser needs). It wraps the routes'
/// handlers only, so unknown paths still get their 404 and wrong methods
/// their 405.
pub async fn admin_only(State(s): State<SharedState>, mut req: Request, next: Next) -> ApiResult<Response> {
    let headers = req.headers();
    let actor = if headers.contains_key("authorization") || sessions::cookie(headers).is_none() {
        require_admin(&s, headers)?;
        ADMIN_USER.to_string()
    } else {
        let session = session_of(&s, headers).await?;
        check_csrf(req.method(), headers, &session)?;
        check_websocket_origin(headers, req.uri())?;
        session.user
    };
    req.extensions_mut().insert(Actor(actor));
    Ok(next.run(req).await)
}

/// Who made an admin request, for release history and events: `admin`
/// (the admin token, or a sign-in with it) or the dashboard user's name.
/// [`admin_only`] sets it; outside it, `admin`.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Actor {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Actor>()
            .cloned()
            .unwrap_or_else(|| Actor(ADMIN_USER.to_string())))
    }
}

/// The live session the request's `__Host-berth_session` cookie opens (401 on `cookie` if none).
pub async fn session_of(state: &AppState, headers: &HeaderMap) -> ApiResult<SessionRow> {
    let secret = sessions::cookie(headers)
        .ok_or_else(|| ApiErr::unauthorized("cookie", "cookie: no __Host-berth_session cookie"))?;
    state
        .store
        .session(&sessions::session_id(secret), now())
        .await?
        .ok_or_else(|| ApiErr::unauthorized("cookie", "cookie: the session has ended or expired; sign in again"))
}

/// A cookie-authenticated request that may change something must carry the
/// session's CSRF token: another site can make the browser send the
/// cookie, but cannot read the token.
pub fn check_csrf(method: &Method, headers: &HeaderMap, session: &SessionRow) -> ApiResult<()> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let given = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("");
    if sessions::same(given, &session.csrf) {
        return Ok(());
    }
    Err(ApiErr::new(
        StatusCode::FORBIDDEN,
        ErrorCode::CsrfRequired,
        format!("{CSRF_HEADER}: missing or not this session's token (see GET /v1/session)"),
    )
    .on(CSRF_HEADER))
}

/// A WebSocket upgrade (a GET, so no CSRF token) authenticated by the cookie
/// must come from a page of this control plane: browsers send the cookie
/// with another site's WebSocket too, but tell its Origin.
fn check_websocket_origin(headers: &HeaderMap, uri: &Uri) -> ApiResult<()> {
    let upgrade = headers
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return Ok(());
    }
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    let origin = headers.get("origin").and_then(|v| v.to_str().ok());
    match (origin, host) {
        (Some(o), Some(h)) if sessions::same_origin(o, h) => Ok(()),
        _ => Err(ApiErr::new(
            StatusCode::FORBIDDEN,
            ErrorCode::CrossOrigin,
            "origin: a WebSocket signed in by cookie must come from this control plane's own pages",
        )
        .on("origin")),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> ApiResult<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiErr::unauthorized(name, format!("{name}: missing")))
}

pub fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
}

/// Authenticates a request from a registered node (see [`verify_node`]).
pub async fn require_node(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<NodeRow> {
    let node = claimed_node(state, headers).await?;
    verify_node(state, node, method, uri, headers, body).await
}

/// The registered node a request says it comes from (not yet verified: see
/// [`verify_node`]), checked before its body is read.
pub async fn claimed_node(state: &AppState, headers: &HeaderMap) -> ApiResult<NodeRow> {
    let node_id = header(headers, HEADER_NODE)?;
    // The fleet view holds every node at the current revision; a node
    // registered or removed since is looked up in the store.
    let known = state.fleet_view().await?.node(node_id).cloned();
    let node = match known {
        Some(n) => Some(n),
        None => state.store.get_node(node_id).await?,
    };
    node.ok_or_else(|| {
        ApiErr::unauthorized(
            HEADER_NODE,
            format!("{HEADER_NODE}: unknown node {node_id:?} (removed?)"),
        )
    })
}

/// Authenticates a request from `node` ([`claimed_node`]): by its session
/// MAC when it names a session (`x-berth-session`), else by its Ed25519
/// signature.
pub async fn verify_node(
    state: &AppState,
    node: NodeRow,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<NodeRow> {
    if headers.contains_key(HEADER_SESSION) {
        verify_session(state, &node, method, uri, headers, body)?;
        return Ok(node);
    }
    verify_signature(state, node, method, uri, headers, body).await
}

/// A signed request from a registered node, not a session's: what opens a
/// session (so a session cannot renew itself).
pub async fn require_signed_node(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<NodeRow> {
    let node = claimed_node(state, headers).await?;
    verify_signature(state, node, method, uri, headers, body).await
}

fn verify_session(
    state: &AppState,
    node: &NodeRow,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<()> {
    let id = header(headers, HEADER_SESSION)?;
    let counter: u64 = header(headers, HEADER_COUNTER)?
        .parse()
        .map_err(|_| ApiErr::unauthorized(HEADER_COUNTER, format!("{HEADER_COUNTER}: not a number")))?;
    let mac = header(headers, HEADER_MAC)?;
    let checked = state.node_sessions.verify(
        id,
        &node.id,
        method.as_str(),
        path_and_query(uri),
        counter,
        body,
        mac,
        now(),
    );
    checked.map_err(|r| match r {
        Refusal::Invalid => ApiErr::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::SessionInvalid,
            format!("{HEADER_SESSION}: not a live session of this node here (expired, or the control plane restarted); open a new one"),
        )
        .on(HEADER_SESSION),
        Refusal::BadMac => ApiErr::unauthorized(HEADER_MAC, format!("{HEADER_MAC}: does not verify")),
        Refusal::Replayed => ApiErr::unauthorized(HEADER_COUNTER, format!("{HEADER_COUNTER}: replayed")),
    })
}

/// Verifies the Ed25519 signature of a request from `node` and records
/// its nonce.
async fn verify_signature(
    state: &AppState,
    node: NodeRow,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<NodeRow> {
    let ts = header(headers, HEADER_TIMESTAMP)?;
    let nonce = header(headers, HEADER_NONCE)?;
    let sig = header(headers, HEADER_SIGNATURE)?;
    let key = signing::parse_verifying_key("signing_key", &node.signing_key).map_err(ApiErr::internal)?;
    let now = now();
    let signed = SignedHeaders {
        timestamp: ts.into(),
        nonce: nonce.into(),
        signature: sig.into(),
    };
    signing::verify(&key, method.as_str(), path_and_query(uri), body, &signed, now).map_err(refused)?;
    let ts: i64 = ts.parse().unwrap_or(now);
    let fresh = state
        .replay
        .fresh(&node.id, nonce, ts + signing::MAX_CLOCK_SKEW_SECS + 1)
        .await?;
    if !fresh {
        return Err(ApiErr::unauthorized(HEADER_NONCE, format!("{HEADER_NONCE}: replayed")));
    }
    Ok(node)
}

/// Verifies that a registration request is signed by the key it registers
/// (proof of possession of the private key).
pub fn verify_self_signed(
    key_b64: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<()> {
    let key = signing::parse_verifying_key("signing_key", key_b64)?;
    signing::verify(
        &key,
        method.as_str(),
        path_and_query(uri),
        body,
        &SignedHeaders {
            timestamp: header(headers, HEADER_TIMESTAMP)?.into(),
            nonce: header(headers, HEADER_NONCE)?.into(),
            signature: header(headers, HEADER_SIGNATURE)?.into(),
        },
        now(),
    )
    .map_err(refused)
}

fn refused(e: signing::VerifyError) -> ApiErr {
    ApiErr::unauthorized(e.header(), e.to_string())
}
