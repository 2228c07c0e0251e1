//! Services (admin): deploy (create or update), list, show, scale and
//! remove. Secret values go in sealed and never come back out: a service
//! is shown with its secrets' names only.

use super::{body, AdminRoutes};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::nodes::name_of;
use crate::store::services::{DeployError, RemoveService, SecretsUpdate, ServiceRow};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::Json;
use berth_protocol::service::{ReplicaInfo, ScaleRequest, ServiceInfo, ServiceSpec};
use berth_protocol::{ErrorCode, Removed};
use std::collections::BTreeMap;

pub fn routes() -> AdminRoutes {
    vec![
        ("/v1/services", post(deploy_service).get(list_services)),
        ("/v1/services/{name}", get(show_service).delete(remove_service)),
        ("/v1/services/{name}/scale", post(scale_service)),
    ]
}

fn deploy_error(e: DeployError) -> ApiErr {
    match e {
        DeployError::Placement(e) => e.into(),
        DeployError::SubnetFull(_) => ApiErr::conflict(ErrorCode::SubnetFull, e.to_string()).on("replicas"),
        DeployError::Encode(e) => ApiErr::internal(e),
        DeployError::Store(e) => ApiErr::internal(e),
    }
}

fn no_such_service(name: &str) -> ApiErr {
    ApiErr::not_found("name", format!("name: no service named {name:?}"))
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
                node: name_of(&nodes, &r.node_id),
                ip: r.ip,
                state: r.state.clone().unwrap_or_else(|| "pending".into()),
                healthy: r.healthy,
                restarts: r.restarts,
                error: r.last_error.clone(),
            })
            .collect(),
    })
}

/// The service as stored now (it was just written).
async fn stored_info(s: &SharedState, name: &str) -> ApiResult<Json<ServiceInfo>> {
    let row = s
        .store
        .get_service(name)
        .await?
        .ok_or_else(|| ApiErr::internal("service vanished"))?;
    Ok(Json(service_info(s, &row).await?))
}

async fn deploy_service(
    State(s): State<SharedState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ServiceInfo>> {
    let spec: ServiceSpec = parse_json(&body(raw)?)?;
    spec.validate()?;
    // A deploy without secrets keeps the ones stored.
    let secrets = if spec.secrets.is_empty() {
        SecretsUpdate::Keep
    } else {
        let plain = serde_json::to_vec(&spec.secrets).map_err(ApiErr::internal)?;
        let cp_public = x25519_dalek::PublicKey::from(&s.secrets_key);
        SecretsUpdate::Set(berth_protocol::seal::seal(&cp_public, &plain))
    };
    let rev = s
        .store
        .deploy_service(&spec, &secrets, s.offline_after_secs)
        .await
        .map_err(deploy_error)?;
    tracing::info!(service = %spec.name, replicas = spec.replicas, revision = rev, "service deployed");
    s.revision_moved(rev).await;
    stored_info(&s, &spec.name).await
}

async fn list_services(State(s): State<SharedState>) -> ApiResult<Json<Vec<ServiceInfo>>> {
    let mut out = vec![];
    for row in s.store.list_services().await? {
        out.push(service_info(&s, &row).await?);
    }
    Ok(Json(out))
}

async fn show_service(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<ServiceInfo>> {
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| no_such_service(&name))?;
    Ok(Json(service_info(&s, &row).await?))
}

async fn scale_service(
    State(s): State<SharedState>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ServiceInfo>> {
    let req: ScaleRequest = parse_json(&body(raw)?)?;
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| no_such_service(&name))?;
    let mut spec = row.spec.clone();
    spec.replicas = req.replicas;
    spec.validate()?;
    let rev = s
        .store
        .deploy_service(&spec, &SecretsUpdate::Keep, s.offline_after_secs)
        .await
        .map_err(deploy_error)?;
    s.revision_moved(rev).await;
    stored_info(&s, &name).await
}

async fn remove_service(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<Removed>> {
    let rev = match s.store.remove_service(&name).await? {
        RemoveService::Removed(rev) => rev,
        RemoveService::NotFound => return Err(no_such_service(&name)),
        RemoveService::Routed(routes) => {
            return Err(ApiErr::conflict(
                ErrorCode::StillRouted,
                format!(
                    "name: {name:?} still receives traffic from {}; remove those first",
                    routes.join(", ")
                ),
            )
            .on("name"))
        }
    };
    s.revision_moved(rev).await;
    Ok(Json(Removed {
        removed: name,
        revision: rev as u64,
    }))
}
