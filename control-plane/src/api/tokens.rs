//! Join tokens (admin): create one (with the agent command to paste), list
//! them with their state, revoke an unused one.

use super::{body, AdminRoutes, Path, MAX_TOKEN_TTL, MIN_TOKEN_TTL};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::now;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use berth_protocol::{CreateTokenRequest, CreatedToken, ErrorCode, Role, TokenInfo, TokenRevoked, TokenState};
use utoipa_axum::routes;

pub fn routes() -> AdminRoutes {
    vec![routes!(create_token, list_tokens), routes!(revoke_token)]
}

/// A join token, with the agent command to paste on the new server.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses((status = 200, description = "The token (shown once)", body = CreatedToken)))]
async fn create_token(
    State(s): State<SharedState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<CreatedToken>> {
    let req: CreateTokenRequest = parse_json(&body(raw)?)?;
    if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&req.ttl_secs) {
        return Err(ApiErr::invalid(
            "ttl_secs",
            format!(
                "ttl_secs: {} is outside {MIN_TOKEN_TTL}..={MAX_TOKEN_TTL} (1 minute to 30 days)",
                req.ttl_secs
            ),
        ));
    }
    let role = if req.proxy { Role::Proxy } else { Role::Worker };
    let t = s.store.create_token(role, req.ttl_secs as i64, &s.ca_hash).await?;
    let proxy = if req.proxy { " --proxy" } else { "" };
    let agent_command = format!(
        "berth-agent --url {} --token {}{proxy} --data-dir /var/lib/berth",
        s.advertise_url, t.token
    );
    // With a self-made CA (the default), curl needs it: `ca.pem` is
    // `GET /v1/ca.pem`, as the README's join steps fetch it.
    let setup_command = format!(
        "curl -sSL --cacert ca.pem {}/setup.sh | sudo bash -s -- --token {}{proxy}",
        s.advertise_url, t.token
    );
    Ok(Json(CreatedToken {
        setup_command,
        id: t.id,
        token: t.token,
        role: t.role,
        expires_at: t.expires_at,
        agent_command,
    }))
}

/// Every join token with its state.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "The tokens", body = Vec<TokenInfo>)))]
async fn list_tokens(State(s): State<SharedState>) -> ApiResult<Json<Vec<TokenInfo>>> {
    let now = now();
    Ok(Json(s.store.list_tokens().await?.iter().map(|t| t.info(now)).collect()))
}

/// Revokes an unused token.
#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 200, description = "Revoked", body = TokenRevoked)))]
async fn revoke_token(State(s): State<SharedState>, Path(id): Path<String>) -> ApiResult<Json<TokenRevoked>> {
    match s.store.revoke_token(&id).await? {
        None => Err(ApiErr::not_found("id", format!("id: no token {id:?}"))),
        Some(TokenState::Used) => {
            Err(ApiErr::conflict(ErrorCode::TokenUsed, format!("id: token {id:?} was already used")).on("id"))
        }
        Some(TokenState::Revoked) => {
            Err(ApiErr::conflict(ErrorCode::TokenRevoked, format!("id: token {id:?} is already revoked")).on("id"))
        }
        Some(TokenState::Valid | TokenState::Expired) => Ok(Json(TokenRevoked { revoked: id })),
    }
}
