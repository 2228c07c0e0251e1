//! Dashboard users (admin): add one with a password, list them, remove
//! one (which ends all of its sessions at once).

use super::{body, AdminRoutes};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::sessions::hash_password;
use crate::state::SharedState;
use crate::store::now;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::routing::{delete, post};
use axum::Json;
use berth_protocol::user::{validate_password, validate_user_name, CreateUserRequest, UserInfo, UserRemoved};
use berth_protocol::ErrorCode;

pub fn routes() -> AdminRoutes {
    vec![
        ("/v1/users", post(create_user).get(list_users)),
        ("/v1/users/{name}", delete(remove_user)),
    ]
}

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
