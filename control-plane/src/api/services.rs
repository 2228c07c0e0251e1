//! Services (admin): deploy (create or update), list, show, scale,
//! history, rollback and remove. Each change is a release
//! (store/releases.rs). Secret values go in sealed and never come back
//! out: a service is shown with its secrets' names only.

use super::{body, AdminRoutes, Path};
use crate::auth::Actor;
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::nodes::{name_of, NodeRow};
use crate::store::releases::Origin;
use crate::store::services::{DeployError, RemoveService, ReplicaRow, SecretsUpdate, ServiceRow};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::Json;
use berth_protocol::release::{DeployQuery, ReleaseInfo, ReleaseState, RollbackRequest};
use berth_protocol::service::{ReplicaInfo, ScaleRequest, ServiceInfo, ServiceSpec};
use berth_protocol::{ErrorCode, Removed};
use std::collections::BTreeMap;
use utoipa_axum::routes;

pub fn routes() -> AdminRoutes {
    vec![
        routes!(deploy_service, list_services),
        routes!(show_service, remove_service),
        routes!(scale_service),
        routes!(list_releases),
        routes!(rollback_service),
        routes!(restart_service),
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

fn open_secrets(s: &SharedState, sealed: Option<&str>) -> BTreeMap<String, String> {
    sealed
        .and_then(|x| berth_protocol::seal::open(&s.secrets_key, x).ok())
        .and_then(|b| serde_json::from_slice::<BTreeMap<String, String>>(&b).ok())
        .unwrap_or_default()
}

/// What every service's view reads once: nodes, replicas and the usage
/// figures, so listing many services copies nothing per service. Read
/// fresh, not from `desired::FleetView`: replica states and heartbeats
/// change without a new revision.
struct ServiceListing {
    nodes: Vec<NodeRow>,
    replicas: Vec<ReplicaRow>,
    usage: std::collections::HashMap<String, (Option<u32>, Option<u64>)>,
}

impl ServiceListing {
    async fn read(s: &SharedState) -> ApiResult<ServiceListing> {
        Ok(ServiceListing {
            nodes: s.store.list_nodes().await?,
            replicas: s.store.list_replicas().await?,
            usage: s.usage.lock().map(|u| u.replicas.clone()).unwrap_or_default(),
        })
    }
}

async fn service_info(s: &SharedState, row: &ServiceRow) -> ApiResult<ServiceInfo> {
    service_info_in(s, row, &ServiceListing::read(s).await?).await
}

async fn service_info_in(s: &SharedState, row: &ServiceRow, fleet: &ServiceListing) -> ApiResult<ServiceInfo> {
    let secret_names = open_secrets(s, row.secrets_sealed.as_deref()).into_keys().collect();
    let latest = s.store.list_releases(&row.name).await?.into_iter().next();
    Ok(ServiceInfo {
        spec: row.spec.clone(),
        secret_names,
        replicas: fleet
            .replicas
            .iter()
            .filter(|r| r.service == row.name)
            .map(|r| {
                let (cpu_millicores, memory_bytes) = fleet.usage.get(&r.name()).copied().unwrap_or_default();
                ReplicaInfo {
                    cpu_millicores,
                    memory_bytes,
                    replica: r.name(),
                    node: name_of(&fleet.nodes, &r.node_id),
                    ip: r.ip,
                    state: r.state.clone().unwrap_or_else(|| "pending".into()),
                    healthy: r.healthy,
                    restarts: r.restarts,
                    error: r.last_error.clone(),
                    release: r.release,
                    phase: r.phase_str().into(),
                    recreates: r.recreates,
                    gave_up: r.gave_up,
                }
            })
            .collect(),
        current_release: row.current_release,
        rollout: latest
            .filter(|l| l.rollout || !l.state.is_final())
            .map(|l| l.rollout_info()),
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

/// Stores a new release of `spec` and starts it (see [`Store::deploy_service`]).
async fn release(
    s: &SharedState,
    spec: &ServiceSpec,
    secrets: SecretsUpdate,
    origin: Origin,
) -> ApiResult<Json<ServiceInfo>> {
    make_release(s, spec, secrets, origin).await?;
    stored_info(s, &spec.name).await
}

/// [`release`] without the answer: the release's number.
pub(super) async fn make_release(
    s: &SharedState,
    spec: &ServiceSpec,
    secrets: SecretsUpdate,
    origin: Origin,
) -> ApiResult<u64> {
    let (rev, number) = s
        .store
        .deploy_service(spec, &secrets, s.offline_after_secs, &origin)
        .await
        .map_err(deploy_error)?;
    tracing::info!(service = %spec.name, release = number, replicas = spec.replicas, revision = rev, "release made");
    s.revision_moved(rev).await;
    s.rollout_wake.notify_one();
    tag_release(s, spec, number).await;
    Ok(number)
}

/// A release of the service's own image in the fleet registry
/// (`HOST/SERVICE@DIGEST`: a build's, or a rollback to one) is also
/// tagged `SERVICE:RELEASE`, for people and other tools. The release runs
/// the digest, so a failed tag changes nothing.
async fn tag_release(s: &SharedState, spec: &ServiceSpec, number: u64) {
    let Some(registry) = &s.registry else {
        return;
    };
    let own = format!("{}/{}@", registry.host, spec.name);
    let Some(digest) = spec.image.strip_prefix(&own) else {
        return;
    };
    let tag = number.to_string();
    // Bounded: a registry that hangs must not hold the deploy (or a build's end) for long.
    let tagging = registry.client.add_tag(&registry.signer, &spec.name, digest, &tag);
    match tokio::time::timeout(std::time::Duration::from_secs(5), tagging).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(service = %spec.name, release = number, error = %format!("{e:#}"), "tagging the release's image failed")
        }
        Err(_) => tracing::warn!(service = %spec.name, release = number, "tagging the release's image timed out"),
    }
}

/// Secrets sealed to the control plane's key, as a service stores them.
pub(super) fn seal_secrets(s: &SharedState, secrets: &BTreeMap<String, String>) -> ApiResult<String> {
    let plain = serde_json::to_vec(secrets).map_err(ApiErr::internal)?;
    Ok(s.seal_for_store(&plain))
}

/// An image of the fleet registry named by tag is deployed by the digest
/// the tag names now: every node runs the same bits, and a later push to
/// the tag changes nothing until the next deploy (or `apply`).
async fn pin_image(s: &SharedState, spec: &mut ServiceSpec) -> ApiResult<()> {
    let Some(registry) = &s.registry else {
        return Ok(());
    };
    let Some((repository, tag)) = registry.tagged(&spec.image) else {
        return Ok(());
    };
    match registry.client.digest(&registry.signer, &repository, &tag).await {
        Ok(Some(digest)) => {
            spec.image = format!("{}/{repository}@{digest}", registry.host);
            Ok(())
        }
        Ok(None) => Err(ApiErr::invalid(
            "image",
            format!(
                "image: the fleet registry has no {repository}:{tag} (push it first; `berth registry login` lets podman push)"
            ),
        )),
        Err(e) => Err(ApiErr::new(
            axum::http::StatusCode::BAD_GATEWAY,
            ErrorCode::RegistryUnavailable,
            format!("registry: {e:#}"),
        )
        .on("registry")),
    }
}

/// Creates or updates a service: a new release, rolled out per its policy.
#[utoipa::path(post, path = "/v1/services", tag = "services", params(DeployQuery), request_body = ServiceSpec,
    responses((status = 200, description = "The service after the deploy", body = ServiceInfo)))]
async fn deploy_service(
    State(s): State<SharedState>,
    Actor(actor): Actor,
    q: Result<Query<DeployQuery>, QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ServiceInfo>> {
    let q = super::query(q)?;
    let mut spec: ServiceSpec = parse_json(&body(raw)?)?;
    spec.validate()?;
    pin_image(&s, &mut spec).await?;
    let stored = s.store.get_service(&spec.name).await?;
    // A deploy without secrets keeps the ones stored; the same secrets
    // again are no change (sealing is randomised, so compare them open).
    let same = stored
        .as_ref()
        .is_some_and(|r| open_secrets(&s, r.secrets_sealed.as_deref()) == spec.secrets);
    let secrets = if spec.secrets.is_empty() || same {
        SecretsUpdate::Keep
    } else {
        SecretsUpdate::Set(seal_secrets(&s, &spec.secrets)?)
    };
    let origin = Origin {
        created_by: actor,
        reason: None,
        force: q.force,
        restart: false,
    };
    release(&s, &spec, secrets, origin).await
}

#[utoipa::path(get, path = "/v1/services", tag = "services",
    responses((status = 200, description = "Every service", body = Vec<ServiceInfo>)))]
async fn list_services(State(s): State<SharedState>) -> ApiResult<Json<Vec<ServiceInfo>>> {
    let fleet = ServiceListing::read(&s).await?;
    let mut out = vec![];
    for row in s.store.list_services().await? {
        out.push(service_info_in(&s, &row, &fleet).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, description = "The service", body = ServiceInfo)))]
async fn show_service(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<ServiceInfo>> {
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| no_such_service(&name))?;
    Ok(Json(service_info(&s, &row).await?))
}

#[utoipa::path(post, path = "/v1/services/{name}/scale", tag = "services",
    params(("name" = String, Path, description = "Service name")), request_body = ScaleRequest,
    responses((status = 200, description = "The service", body = ServiceInfo)))]
async fn scale_service(
    State(s): State<SharedState>,
    Actor(actor): Actor,
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
    let origin = Origin {
        created_by: actor,
        reason: None,
        force: false,
        restart: false,
    };
    release(&s, &spec, SecretsUpdate::Keep, origin).await
}

#[utoipa::path(get, path = "/v1/services/{name}/releases", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, description = "The service's releases, newest first", body = Vec<ReleaseInfo>)))]
async fn list_releases(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<Vec<ReleaseInfo>>> {
    if s.store.get_service(&name).await?.is_none() {
        return Err(no_such_service(&name));
    }
    Ok(Json(
        s.store.list_releases(&name).await?.iter().map(|r| r.info()).collect(),
    ))
}

#[utoipa::path(post, path = "/v1/services/{name}/rollback", tag = "services",
    params(("name" = String, Path, description = "Service name")), request_body = RollbackRequest,
    responses((status = 200, description = "The service", body = ServiceInfo)))]
async fn rollback_service(
    State(s): State<SharedState>,
    Actor(actor): Actor,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ServiceInfo>> {
    let raw = body(raw)?;
    let req: RollbackRequest = if raw.is_empty() {
        RollbackRequest::default()
    } else {
        parse_json(&raw)?
    };
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| no_such_service(&name))?;
    let releases = s.store.list_releases(&name).await?;
    let to = match req.to {
        Some(n) => releases
            .iter()
            .find(|r| r.number == n)
            .ok_or_else(|| ApiErr::not_found("to", format!("to: {name} has no release {n}")))?,
        None => {
            let current = row.current_release.unwrap_or(0);
            releases
                .iter()
                .find(|r| {
                    r.number < current
                        && r.rollout
                        && matches!(r.state, ReleaseState::Complete | ReleaseState::RolledBack)
                })
                .ok_or_else(|| {
                    ApiErr::conflict(
                        ErrorCode::Conflict,
                        format!("to: {name} has no complete release before release {current} to roll back to"),
                    )
                    .on("to")
                })?
        }
    };
    let mut spec = to.spec.clone();
    // The count stays what it is now: a rollback restores what runs, not how many.
    spec.replicas = row.spec.replicas;
    let secrets = match &to.secrets_sealed {
        Some(sealed) => SecretsUpdate::Set(sealed.clone()),
        None => SecretsUpdate::Clear,
    };
    let origin = Origin {
        created_by: actor,
        reason: Some(format!("rollback to {}", to.number)),
        force: req.force,
        restart: false,
    };
    release(&s, &spec, secrets, origin).await
}

#[utoipa::path(delete, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, description = "Removed", body = Removed<String>)))]
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

/// A new release of the same spec: every replica is replaced by the
/// service's rollout policy (a rolling restart), secrets kept.
#[utoipa::path(post, path = "/v1/services/{name}/restart", tag = "services",
    params(("name" = String, Path, description = "Service name"), DeployQuery),
    responses((status = 200, description = "The service, its restart release started", body = ServiceInfo)))]
async fn restart_service(
    State(s): State<SharedState>,
    Actor(actor): Actor,
    Path(name): Path<String>,
    q: Result<Query<DeployQuery>, QueryRejection>,
) -> ApiResult<Json<ServiceInfo>> {
    let q = super::query(q)?;
    let row = s
        .store
        .get_service(&name)
        .await?
        .ok_or_else(|| no_such_service(&name))?;
    let origin = Origin {
        created_by: actor,
        reason: Some("restart".into()),
        force: q.force,
        restart: true,
    };
    release(&s, &row.spec, SecretsUpdate::Keep, origin).await
}
