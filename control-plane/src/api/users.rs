//! Dashboard users (admin): add one with a password, list them, remove
//! one (which ends all of its sessions at once).

use super::{body, AdminRoutes, Path};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::sessions::hash_password;
use crate::state::SharedState;
use crate::store::now;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use berth_protocol::user::{validate_password, validate_user_name, CreateUserRequest, UserInfo, UserRemoved};
use berth_protocol::ErrorCode;
use utoipa_axum::routes;

pub fn routes() -> AdminRoutes {
    vec![routes!(create_user, list_users), routes!(remove_user)]
}

#[utoipa::path(post, path = "/v1/users", tag = "users", request_body = CreateUserRequest,
    responses((status = 200, description = "The user, added", body = UserInfo)))]
async fn create_user(State(s): State<SharedState>, raw: Result<Bytes, BytesRejection>) -> ApiResult<Json<UserInfo>> {
    let req: CreateUserRequest = parse_json(&body(raw)?)?;
    validate_user_name(&req.name)?;
    validate_password(&req.password)?;
    let password = req.password;
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(ApiErr::internal)?
        .map_err(ApiErr::internal)?;
    let created_at = now();
    if !s.store.create_user(&req.name, &hash, created_at).await? {
        return Err(ApiErr::conflict(
            ErrorCode::UserExists,
            format!("name: a user {:?} already exists", req.name),
        )
        .on("name"));
    }
    tracing::info!(user = %req.name, "dashboard user added");
    Ok(Json(UserInfo {
        name: req.name,
        created_at,
    }))
}

#[utoipa::path(get, path = "/v1/users", tag = "users",
    responses((status = 200, description = "Every dashboard user (never a password hash)", body = Vec<UserInfo>)))]
async fn list_users(State(s): State<SharedState>) -> ApiResult<Json<Vec<UserInfo>>> {
    let users = s.store.list_users().await?;
    Ok(Json(
        users
            .into_iter()
            .map(|u| UserInfo {
                name: u.name,
                created_at: u.created_at,
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/users/{name}", tag = "users",
    params(("name" = String, Path, description = "User name")),
    responses((status = 200, description = "The user is removed and every session of it ended", body = UserRemoved)))]
async fn remove_user(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<UserRemoved>> {
    match s.store.delete_user(&name).await? {
        None => Err(ApiErr::not_found("name", format!("name: no user {name:?}"))),
        Some(sessions_ended) => {
            tracing::info!(user = %name, sessions_ended, "dashboard user removed");
            Ok(Json(UserRemoved {
                removed: name,
                sessions_ended,
            }))
        }
    }
}
