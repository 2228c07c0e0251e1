//! HTTP routes. Inputs are validated here, at the edge; the store only sees
//! well-formed values.

use crate::auth::{require_admin, require_node, verify_self_signed};
use crate::desired;
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::nodes::{NewNode, RegisterError};
use crate::store::now;
use crate::store::services::{DeployError, RemoveService, ServiceRow};
use crate::store::upgrades::UpgradeError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use berth_protocol::names::validate_dns_label;
use berth_protocol::service::{ReplicaInfo, ScaleRequest, ServiceInfo, ServiceSpec};
use berth_protocol::signing::validate_wg_key;
use berth_protocol::token::JoinToken;
use berth_protocol::{
    CreateTokenRequest, NodeInfo, PeerStatusNamed, RegisterRequest, RegisterResponse, Role, StatusReport,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

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

pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/ca.pem", get(ca_pem))
        .route("/v1/register", post(register))
        .route("/v1/agent/desired", get(desired_state))
        // A report lists every peer (~130 bytes each): room for thousands.
        .route(
            "/v1/agent/status",
            post(status).layer(DefaultBodyLimit::max(MAX_STATUS_BODY)),
        )
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/upgrade", post(upgrade_nodes))
        .route("/v1/nodes/{name}", delete(remove_node))
        .route("/v1/revision", get(revision))
        .route("/v1/services", post(deploy_service).get(list_services))
        .route("/v1/services/{name}", get(show_service).delete(remove_service))
        .route("/v1/services/{name}/scale", post(scale_service))
        .merge(crate::proxy_api::routes())
        .merge(crate::releases::routes())
        .fallback(|| async { ApiErr::not_found("path: no such API endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

fn body(b: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    b.map_err(|e| {
        ApiErr::new(
            e.status(),
            format!("body: {} (limit {} KiB)", e.body_text(), MAX_BODY / 1024),
        )
    })
}

async fn ca_pem(State(s): State<SharedState>) -> impl IntoResponse {
    ([("content-type", "application/x-pem-file")], s.ca_pem.clone())
}

/// Validates a registration body; every error names its field.
fn validate_register(req: &RegisterRequest) -> ApiResult<()> {
    validate_dns_label("name", &req.name).map_err(ApiErr::bad_request)?;
    validate_wg_key("wg_public_key", &req.wg_public_key).map_err(ApiErr::bad_request)?;
    if let Some(k) = &req.sealing_key {
        validate_wg_key("sealing_key", k).map_err(ApiErr::bad_request)?;
    }
    if req.wg_port == 0 {
        return Err(ApiErr::bad_request("wg_port: must be 1-65535"));
    }
    if let Some(p) = &req.private_addr {
        p.parse::<ipnet::Ipv4Net>()
            .map_err(|_| ApiErr::bad_request(format!("private_addr: {p:?} is not an IPv4 address with prefix")))?;
    }
    Ok(())
}

async fn register(
    State(s): State<SharedState>,
    Extension(RemoteAddr(remote)): Extension<RemoteAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RegisterResponse>> {
    let raw = body(raw)?;
    let req: RegisterRequest = parse_json(&raw)?;
    let token = JoinToken::parse(&req.token).map_err(ApiErr::unauthorized)?;
    if token.ca_hash != s.ca_hash {
        return Err(ApiErr::unauthorized(
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
    let (node, rev) = s.store.register_node(&new, s.pools).await.map_err(|e| match e {
        RegisterError::UnknownToken | RegisterError::TokenNotUsable(_) => ApiErr::unauthorized(e.to_string()),
        RegisterError::RoleMismatch { .. } => ApiErr::bad_request(e.to_string()),
        RegisterError::NameTaken(_) | RegisterError::KeyTaken(_) => ApiErr::conflict(e.to_string()),
        RegisterError::PoolExhausted(_) => ApiErr::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        RegisterError::Store(e) => ApiErr::internal(e),
    })?;
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

#[derive(Deserialize)]
struct DesiredQuery {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    wait: Option<u64>,
}

/// Long-poll: answers at once if the node's revision is past `after`,
/// otherwise waits until it is (or `wait` seconds pass: 204).
async fn desired_state(
    State(s): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<DesiredQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let node = require_node(&s, &method, &uri, &headers, b"").await?;
    let Query(q) = q.map_err(|e| ApiErr::bad_request(format!("query: {}", e.body_text())))?;
    let after = q.after.unwrap_or(0);
    let wait = Duration::from_secs(q.wait.unwrap_or(25).min(MAX_WAIT_SECS));
    let deadline = tokio::time::Instant::now() + wait;
    let mut rx = s.subscribe();
    loop {
        let snap = s.snapshot().await?;
        match desired::encode_for_node(&snap, &node.id, s.pools.mesh, s.pools.subnets, &s.secrets_key) {
            None => return Err(ApiErr::new(StatusCode::GONE, "node: removed from the fleet")),
            Some((rev, json)) if rev > after => {
                return Ok(([("content-type", "application/json")], json).into_response());
            }
            Some(_) => {}
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn status(
    State(s): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let raw = body(raw)?;
    let node = require_node(&s, &method, &uri, &headers, &raw).await?;
    let report: StatusReport = parse_json(&raw)?;
    s.store.record_status(&node.id, &report).await?;
    if let Some(rev) = s.store.advance_rollout(&node.id, &report.agent_version).await? {
        s.revision_moved(rev).await;
    }
    if let Some(rev) = s.store.record_containers(&node.id, &report.containers).await? {
        s.revision_moved(rev).await;
    }
    Ok(Json(serde_json::json!({ "revision": node.revision })))
}

async fn create_token(
    State(s): State<SharedState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    require_admin(&s, &headers)?;
    let req: CreateTokenRequest = parse_json(&body(raw)?)?;
    if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&req.ttl_secs) {
        return Err(ApiErr::bad_request(format!(
            "ttl_secs: {} is outside {MIN_TOKEN_TTL}..={MAX_TOKEN_TTL} (1 minute to 30 days)",
            req.ttl_secs
        )));
    }
    let role = if req.proxy { Role::Proxy } else { Role::Worker };
    let t = s.store.create_token(role, req.ttl_secs as i64, &s.ca_hash).await?;
    let proxy = if req.proxy { " --proxy" } else { "" };
    let command = format!(
        "berth-agent --url {} --token {}{proxy} --data-dir /var/lib/berth",
        s.advertise_url, t.token
    );
    let mut v = serde_json::to_value(&t).map_err(ApiErr::internal)?;
    v["agent_command"] = command.into();
    Ok(Json(v))
}

async fn list_tokens(State(s): State<SharedState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    require_admin(&s, &headers)?;
    let now = now();
    let list: Vec<_> = s.store.list_tokens().await?.iter().map(|t| t.info(now)).collect();
    Ok(Json(serde_json::to_value(list).map_err(ApiErr::internal)?))
}

async fn revoke_token(
    State(s): State<SharedState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    require_admin(&s, &headers)?;
    use crate::store::tokens::TokenState;
    match s.store.revoke_token(&id).await? {
        None => Err(ApiErr::not_found(format!("id: no token {id:?}"))),
        Some(TokenState::Used) => Err(ApiErr::conflict(format!("id: token {id:?} was already used"))),
        Some(TokenState::Revoked) => Err(ApiErr::conflict(format!("id: token {id:?} is already revoked"))),
        Some(_) => Ok(Json(serde_json::json!({ "revoked": id }))),
    }
}

async fn list_nodes(State(s): State<SharedState>, headers: HeaderMap) -> ApiResult<Json<Vec<NodeInfo>>> {
    require_admin(&s, &headers)?;
    let nodes = s.store.list_nodes().await?;
    let statuses = s.store.node_statuses().await?;
    let names: HashMap<&str, &str> = nodes
        .iter()
        .map(|n| (n.wg_public_key.as_str(), n.name.as_str()))
        .collect();
    let now = now();
    let list = nodes
        .iter()
        .map(|n| NodeInfo {
            node_id: n.id.clone(),
            name: n.name.clone(),
            role: n.role,
            mesh_ip: n.mesh_ip,
            subnet: n.subnet.to_string(),
            online: n.last_seen.is_some_and(|t| now - t <= s.offline_after_secs),
            last_seen: n.last_seen,
            revision: n.revision as u64,
            applied_revision: n.applied_revision as u64,
            agent_version: n.agent_version.clone(),
            error: n.last_error.clone(),
            peers: statuses
                .get(&n.id)
                .map(|st| {
                    st.peers
                        .iter()
                        .filter_map(|p| {
                            names.get(p.wg_public_key.as_str()).map(|name| PeerStatusNamed {
                                name: name.to_string(),
                                handshake_age_secs: p.handshake_age_secs,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    Ok(Json(list))
}

async fn remove_node(
    State(s): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    require_admin(&s, &headers)?;
    validate_dns_label("name", &name).map_err(ApiErr::bad_request)?;
    let rev = s
        .store
        .remove_node(&name, s.offline_after_secs)
        .await?
        .ok_or_else(|| ApiErr::not_found(format!("name: no node named {name:?}")))?;
    tracing::info!(node = %name, revision = rev, "node removed");
    s.revision_moved(rev).await;
    Ok(Json(serde_json::json!({ "removed": name, "revision": rev })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeRequest {
    version: String,
    #[serde(default)]
    canary: Option<String>,
}

/// Starts a rollout: the canary first, every other node once the canary
/// reports the version.
async fn upgrade_nodes(
    State(s): State<SharedState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    require_admin(&s, &headers)?;
    let req: UpgradeRequest = parse_json(&body(raw)?)?;
    if !berth_protocol::names::valid_version(&req.version) {
        return Err(ApiErr::bad_request(format!(
            "version: {:?} is not a version name (letters, digits, . + - _)",
            req.version
        )));
    }
    if !s.releases.exists(&req.version) {
        return Err(ApiErr::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "version: no signed release {} on this control plane (berth release sign)",
                req.version
            ),
        ));
    }
    if let Some(c) = &req.canary {
        validate_dns_label("canary", c).map_err(ApiErr::bad_request)?;
    }
    let (rollout, rev) = s
        .store
        .start_rollout(&req.version, req.canary.as_deref())
        .await
        .map_err(|e| match e {
            UpgradeError::UnknownCanary(_) => ApiErr::not_found(e.to_string()),
            UpgradeError::NoNodes => ApiErr::conflict(e.to_string()),
            UpgradeError::Store(e) => ApiErr::internal(e),
        })?;
    tracing::info!(version = %rollout.version, canary = %rollout.canary, "upgrade started");
    s.revision_moved(rev).await;
    Ok(Json(serde_json::json!({
        "version": rollout.version,
        "canary": rollout.canary,
        "waiting": rollout.waiting,
        "revision": rev,
    })))
}

async fn revision(State(s): State<SharedState>, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    require_admin(&s, &headers)?;
    Ok(Json(serde_json::json!({ "revision": s.store.revision().await? })))
}

fn deploy_error(e: DeployError) -> ApiErr {
    match e {
        DeployError::Invalid(m) if m.starts_with("name: a service") => ApiErr::conflict(m),
        DeployError::Invalid(m) => ApiErr::bad_request(m),
        DeployError::NotFound(_) => ApiErr::not_found(e.to_string()),
        DeployError::SubnetFull(_) => ApiErr::conflict(e.to_string()),
        DeployError::Store(e) => ApiErr::internal(e),
    }
}

async fn service_info(s: &SharedState, row: &ServiceRow) -> ApiResult<ServiceInfo> {
    let nodes = s.store.list_nodes().await?;
    let replicas = s.store.list_replicas().await?;
    let secret_names = row
        .secrets_sealed
        .as_deref()
        .and_then(|x| berth_protocol::seal::open(&s.secrets_key, x).ok())
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, String>>(&b).ok())
        .map(|m| m.into_keys().collect())
        .unwrap_or_default();
    Ok(ServiceInfo {
        spec: row.spec.clone(),
        secret_names,
        replicas: replicas
            .iter()
            .filter(|r| r.service == row.name)
            .map(|r| ReplicaInfo {
                replica: r.name(),
                node: crate::store::nodes::name_of(&nodes, &r.node_id),
                ip: r.ip,
                state: r.state.clone().unwrap_or_else(|| "pending".into()),
                healthy: r.healthy,
                restarts: r.restarts,
                error: r.last_error.clone(),
            })
            .collect(),
    })
}

async fn deploy_service(
    State(s): State<SharedState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ServiceInfo>> {
    require_admin(&s, &headers)?;
    let spec: ServiceSpec = parse_json(&body(raw)?)?;
    spec.validate().map_err(ApiErr::bad_request)?;
    let secrets = if spec.secrets.is_empty() {
        None
    } else {
        let plain = serde_json::to_vec(&spec.secrets).map_err(ApiErr::internal)?;
        let cp_public = x25519_dalek::PublicKey::from(&s.secrets_key);
        Some(Some(berth_protocol::seal::seal(&cp_public, &plain)))
    };
    let rev = s
        .store
        .deploy_service(&spec, secrets, s.offline_after_secs, false)
        .await
        .map_err(deploy_error)?;
    tracing::info!(service = %spec.name, replicas = spec.replicas, revision = rev, "service deployed");
    s.revision_moved(rev).await;
    let row = s
        .store
        .get_service(&spec.name)
        .await?
        .ok_or_else(|| ApiErr::internal("service vanished"))?;
    Ok(Json(service_info(&s, &row).await?))
}

async fn list_services(State(s): State<SharedState>, headers: HeaderMap) -> ApiResult<Json<Vec<ServiceInfo>>> {
    require_admin(&s, &headers)?;
    let mut out = vec![];
    for row in s.store.list_services().await? {
        out.push(service_info(&s, &row).await?);
    }
    Ok(Json(out))
}

async fn show_service(
    State(s): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<ServiceInfo>> {
    require_admin(&s, &headers)?;
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| ApiErr::not_found(format!("name: no service named {name:?}")))?;
    Ok(Json(service_info(&s, &row).await?))
}

async fn scale_service(
    State(s): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ServiceInfo>> {
    require_admin(&s, &headers)?;
    let req: ScaleRequest = parse_json(&body(raw)?)?;
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| ApiErr::not_found(format!("name: no service named {name:?}")))?;
    let mut spec = row.spec.clone();
    spec.replicas = req.replicas;
    spec.validate().map_err(ApiErr::bad_request)?;
    let rev = s
        .store
        .deploy_service(&spec, None, s.offline_after_secs, false)
        .await
        .map_err(deploy_error)?;
    s.revision_moved(rev).await;
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| ApiErr::internal("service vanished"))?;
    Ok(Json(service_info(&s, &row).await?))
}

async fn remove_service(
    State(s): State<SharedState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    require_admin(&s, &headers)?;
    let rev = match s.store.remove_service(&name).await? {
        RemoveService::Removed(rev) => rev,
        RemoveService::NotFound => return Err(ApiErr::not_found(format!("name: no service named {name:?}"))),
        RemoveService::Routed(routes) => {
            return Err(ApiErr::conflict(format!(
                "name: {name:?} still receives traffic from {}; remove those first",
                routes.join(", ")
            )))
        }
    };
    s.revision_moved(rev).await;
    Ok(Json(serde_json::json!({ "removed": name, "revision": rev })))
}
