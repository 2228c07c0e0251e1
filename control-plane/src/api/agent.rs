//! What agents call: registration (public, proven by a join token and a
//! self-signature), then, signed by the node's key or by a session opened
//! with it, the desired-state long-poll and status reports. The signature
//! (or the session's MAC) covers the body, so each handler checks it
//! ([`require_node`]) once it has the body.

use super::{body, RemoteAddr, Routes, MAX_STATUS_BODY, MAX_WAIT_SECS};
use crate::auth::{claimed_node, require_node, require_signed_node, verify_node, verify_self_signed};
use crate::desired;
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::nodes::{NewNode, RegisterError};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use berth_protocol::names::validate_dns_label;
use berth_protocol::session::OpenedSession;
use berth_protocol::signing::validate_wg_key;
use berth_protocol::token::JoinToken;
use berth_protocol::{
    delta::DesiredUpdate, DesiredQuery, DesiredState, ErrorCode, RegisterRequest, RegisterResponse, Revision,
    StatusReport, TokenState,
};
use std::net::IpAddr;
use std::time::Duration;
use utoipa_axum::router::UtoipaMethodRouterExt;
use utoipa_axum::routes;

/// The node-signed routes.
pub fn routes() -> Routes {
    Routes::default()
        .routes(routes!(desired_state))
        .routes(routes!(open_session))
        // A report lists every peer (~130 bytes each): room for thousands.
        .routes(routes!(status).layer(DefaultBodyLimit::max(MAX_STATUS_BODY)))
}

/// Validates a registration body; every error names its field.
fn validate_register(req: &RegisterRequest) -> ApiResult<()> {
    validate_dns_label("name", &req.name)?;
    validate_wg_key("wg_public_key", &req.wg_public_key)?;
    if let Some(k) = &req.sealing_key {
        validate_wg_key("sealing_key", k)?;
    }
    if req.wg_port == 0 {
        return Err(ApiErr::invalid("wg_port", "wg_port: must be 1-65535"));
    }
    if let Some(p) = &req.private_addr {
        p.parse::<ipnet::Ipv4Net>().map_err(|_| {
            ApiErr::invalid(
                "private_addr",
                format!("private_addr: {p:?} is not an IPv4 address with prefix"),
            )
        })?;
    }
    Ok(())
}

fn register_error(e: RegisterError) -> ApiErr {
    let m = e.to_string();
    match e {
        RegisterError::UnknownToken => ApiErr::unauthorized("token", m),
        RegisterError::TokenNotUsable(state) => {
            let code = match state {
                TokenState::Used => ErrorCode::TokenUsed,
                TokenState::Revoked => ErrorCode::TokenRevoked,
                TokenState::Expired | TokenState::Valid => ErrorCode::TokenExpired,
            };
            ApiErr::new(StatusCode::UNAUTHORIZED, code, m).on("token")
        }
        RegisterError::RoleMismatch { .. } => ApiErr::invalid("proxy", m),
        RegisterError::NameTaken(_) => ApiErr::conflict(ErrorCode::NameTaken, m).on("name"),
        RegisterError::KeyTaken(field) => ApiErr::conflict(ErrorCode::Conflict, m).on(field),
        RegisterError::PoolExhausted(_) => ApiErr::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::PoolExhausted, m),
        RegisterError::Store(e) => ApiErr::internal(e),
    }
}

/// Registers a new node with a join token. The request is signed (the
/// `x-berth-*` headers) with the key it registers, proving possession.
#[utoipa::path(post, path = "/v1/register", tag = "public", request_body = RegisterRequest,
    params(
        ("x-berth-timestamp" = String, Header, description = "Unix seconds"),
        ("x-berth-nonce" = String, Header, description = "Random, single use"),
        ("x-berth-signature" = String, Header, description = "Signature with `signing_key`'s private key (see the node signature scheme)"),
    ),
    responses((status = 200, description = "The node's identity and addresses", body = RegisterResponse)))]
pub(super) async fn register(
    State(s): State<SharedState>,
    Extension(RemoteAddr(remote)): Extension<RemoteAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RegisterResponse>> {
    let raw = body(raw)?;
    let req: RegisterRequest = parse_json(&raw)?;
    let token = JoinToken::parse(&req.token).map_err(|m| ApiErr::unauthorized("token", m))?;
    if token.ca_hash != s.ca_hash {
        return Err(ApiErr::unauthorized(
            "token",
            "token: issued by a different control plane (CA hash differs)",
        ));
    }
    validate_register(&req)?;
    verify_self_signed(&req.signing_key, &method, &uri, &headers, &raw)?;
    let new = NewNode {
        token_id: token.id.clone(),
        token_secret_hash: token.secret_hash(),
        name: req.name.clone(),
        proxy: req.proxy,
        signing_key: req.signing_key.clone(),
        wg_public_key: req.wg_public_key.clone(),
        wg_port: req.wg_port,
        sealing_key: req.sealing_key.clone(),
        private_addr: req.private_addr.as_deref().and_then(|p| p.parse().ok()),
        public_ip: Some(req.public_ip.unwrap_or(match remote.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        })),
    };
    let (node, rev) = s.store.register_node(&new, s.pools).await.map_err(register_error)?;
    tracing::info!(node = %node.name, mesh_ip = %node.mesh_ip, subnet = %node.subnet, "node registered");
    s.revision_moved(rev).await;
    Ok(Json(RegisterResponse {
        node_id: node.id,
        name: node.name,
        role: node.role,
        mesh_ip: node.mesh_ip,
        mesh_cidr: s.pools.mesh.to_string(),
        subnet: node.subnet.to_string(),
    }))
}

/// Opens a node session (see `berth_protocol::session`): the request must
/// be signed with the node's key; later requests may carry the session's
/// MAC instead of a signature, which is far cheaper to check.
#[utoipa::path(post, path = "/v1/agent/session", tag = "agent",
    responses(
        (status = 200, description = "The session, its key sealed to the node's sealing key", body = OpenedSession),
        (status = 409, description = "`conflict` on `sealing_key`: the node registered without one; sign each request instead"),
    ))]
async fn open_session(
    State(s): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Json<OpenedSession>> {
    let node = require_signed_node(&s, &method, &uri, &headers, b"").await?;
    let sealing_key = node
        .sealing_key
        .as_deref()
        .and_then(|k| berth_protocol::seal::parse_public("sealing_key", k).ok())
        .ok_or_else(|| {
            ApiErr::conflict(
                ErrorCode::Conflict,
                "sealing_key: the node registered without one, and a session key is sealed to it; sign each request instead",
            )
            .on("sealing_key")
        })?;
    let (id, key) = s.node_sessions.open(&node.id, crate::store::now());
    Ok(Json(OpenedSession {
        id,
        key_sealed: berth_protocol::seal::seal(&sealing_key, &key),
        expires_in_secs: crate::node_sessions::SESSION_TTL_SECS as u64,
    }))
}

/// Long-poll: answers at once if the node's revision is past `after`,
/// otherwise waits until it is (or `wait` seconds pass: 204). With
/// `delta=true` the answer is a `DesiredUpdate` (the changes since the
/// document of view `base`), else the whole `DesiredState`.
#[utoipa::path(get, path = "/v1/agent/desired", tag = "agent", params(DesiredQuery),
    responses(
        (status = 200, description = "The node's desired state, or with `delta=true` the changes since `base`",
            body = DesiredState, content((DesiredState), (DesiredUpdate))),
        (status = 204, description = "Still at `after` when `wait` ran out"),
    ))]
async fn desired_state(
    State(s): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<DesiredQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let node = require_node(&s, &method, &uri, &headers, b"").await?;
    let q = super::query(q)?;
    let after = q.after.unwrap_or(0);
    let wait = Duration::from_secs(q.wait.unwrap_or(25).min(MAX_WAIT_SECS));
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = s.subscribe();
    let mut waited = None;
    let gone = || ApiErr::new(StatusCode::GONE, ErrorCode::Gone, "node: removed from the fleet").on("node");
    loop {
        let fleet = s.fleet_view().await?;
        let me = fleet.node(&node.id).ok_or_else(gone)?;
        if me.revision as u64 > after {
            let wants_delta = q.delta == Some(true);
            let base = q.base.filter(|_| wants_delta).and_then(|b| s.delta_base(b, &fleet));
            let (mesh, pool) = (s.pools.mesh, s.pools.subnets);
            let answer = if wants_delta {
                let base = base.as_ref().map(|(view, changed)| (&**view, changed));
                desired::encode_update(&fleet, base, &node.id, mesh, pool, &s.secrets_key)
            } else {
                desired::encode_for_node(&fleet, &node.id, mesh, pool, &s.secrets_key)
            };
            let doc = answer.ok_or_else(gone)?;
            if waited.is_some() {
                s.metrics.delivered(doc.revision as i64);
            }
            let body = axum::body::Body::new(ChunksBody::new(doc.chunks));
            return Ok(([("content-type", "application/json")], body).into_response());
        }
        // A view is big: a waiting poll must not keep an old one alive.
        drop(fleet);
        if waited.is_none() {
            waited = Some(s.metrics.waiting());
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A body of ready chunks, its length known (so it goes with a
/// Content-Length). A full document's chunks are mostly slices of its
/// view's shared peer blocks: a body in flight holds no copy of them.
struct ChunksBody {
    chunks: std::collections::VecDeque<Bytes>,
    left: u64,
}

impl ChunksBody {
    fn new(chunks: Vec<Bytes>) -> ChunksBody {
        let left = chunks.iter().map(|c| c.len() as u64).sum();
        ChunksBody {
            chunks: chunks.into(),
            left,
        }
    }
}

impl http_body::Body for ChunksBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let chunk = self.chunks.pop_front();
        if let Some(c) = &chunk {
            self.left -= c.len() as u64;
        }
        std::task::Poll::Ready(chunk.map(|c| Ok(http_body::Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.left)
    }
}

/// Records a heartbeat; answers with the node's current revision.
#[utoipa::path(post, path = "/v1/agent/status", tag = "agent", request_body = StatusReport,
    responses((status = 200, description = "The node's current revision", body = Revision)))]
async fn status(
    State(s): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    req: axum::extract::Request,
) -> ApiResult<Json<Revision>> {
    // Only a request naming a registered node waits for a slot: a
    // stranger's slow upload must not hold one.
    let node = claimed_node(&s, &headers).await?;
    let _permit = s.report_bodies.acquire().await;
    let raw = body(<Bytes as axum::extract::FromRequest<()>>::from_request(req, &()).await)?;
    let node = verify_node(&s, node, &method, &uri, &headers, &raw).await?;
    let report: StatusReport = parse_json(&raw)?;
    if let Ok(mut u) = s.usage.lock() {
        u.report(&node.id, &report);
    }
    let fingerprint = crate::heartbeats::fingerprint(&report);
    let seen = crate::heartbeats::Seen {
        at: crate::store::now(),
        applied_revision: report.applied_revision as i64,
        fingerprint,
    };
    if s.heartbeats.same_as_recorded(&node.id, seen) {
        return Ok(Json(Revision {
            revision: node.revision as u64,
        }));
    }
    s.store.record_status(&node.id, &report, fingerprint).await?;
    if let Some(rev) = s.store.advance_rollout(&node.id, &report.agent_version).await? {
        s.revision_moved(rev).await;
    }
    if let Some(rev) = s.store.record_containers(&node.id, &report.containers).await? {
        s.revision_moved(rev).await;
    }
    // A report may confirm a revision a rollout waits for.
    s.rollout_wake.notify_one();
    s.heartbeats
        .recorded(&node.id, fingerprint, report.applied_revision as i64);
    Ok(Json(Revision {
        revision: node.revision as u64,
    }))
}
