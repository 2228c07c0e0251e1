//! `GET /v1/registry/token`: the fleet registry's token endpoint (see
//! [`crate::registry::token`]). Callers prove who they are with HTTP Basic:
//! `admin` with the admin token, or a node's name with the registry password
//! in its desired state. Podman and Docker come here by themselves, told
//! to by the registry's 401 challenge.

use super::{AdminRoutes, Routes};
use crate::auth::is_admin_token;
use crate::error::{ApiErr, ApiResult};
use crate::registry::token::{self, Access, Caller};
use crate::state::SharedState;
use crate::store::now;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use berth_protocol::api::{ImageInfo, PruneReport, RegistryInfo};
use utoipa_axum::routes;

pub fn routes() -> Routes {
    Routes::default().routes(routes!(issue))
}

/// Behind the admin check: where the registry is.
pub fn admin_routes() -> AdminRoutes {
    vec![routes!(info), routes!(images), routes!(prune)]
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct PruneQuery {
    keep: Option<usize>,
}

/// Retention now, then garbage collection (see [`crate::registry::prune`]).
#[utoipa::path(post, path = "/v1/images/prune", tag = "registry", params(PruneQuery),
    responses((status = 200, description = "What was deleted and kept", body = PruneReport)))]
async fn prune(
    State(s): State<SharedState>,
    q: Result<axum::extract::Query<PruneQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<berth_protocol::api::PruneReport>> {
    let q = super::query(q)?;
    let registry = running(&s)?;
    let keep = q.keep.unwrap_or(registry.retention);
    if keep == 0 {
        return Err(ApiErr::invalid(
            "keep",
            "keep: must be at least 1 (the current release's image is always needed)",
        ));
    }
    let report = crate::registry::prune::run(&registry, &s.store, keep)
        .await
        .map_err(|e| {
            ApiErr::new(
                axum::http::StatusCode::BAD_GATEWAY,
                berth_protocol::ErrorCode::RegistryUnavailable,
                format!("registry: {e:#}"),
            )
            .on("registry")
        })?;
    Ok(Json(report))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ImagesQuery {
    service: Option<String>,
}

/// What the registry holds, tag by tag, with the releases that use each
/// (by tag or by digest); with `service`, only what that service's
/// releases use.
#[utoipa::path(get, path = "/v1/images", tag = "registry", params(ImagesQuery),
    responses((status = 200, description = "The images", body = Vec<ImageInfo>)))]
async fn images(
    State(s): State<SharedState>,
    q: Result<axum::extract::Query<ImagesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<berth_protocol::api::ImageInfo>>> {
    let q = super::query(q)?;
    let registry = running(&s)?;
    let services = s.store.list_services().await.map_err(ApiErr::internal)?;
    if let Some(name) = &q.service {
        if !services.iter().any(|x| &x.name == name) {
            return Err(ApiErr::not_found("service", format!("service: no service {name:?}")));
        }
    }
    let mut releases = vec![];
    for svc in &services {
        releases.extend(s.store.list_releases(&svc.name).await.map_err(ApiErr::internal)?);
    }
    let unreachable = |e: anyhow::Error| {
        ApiErr::new(
            axum::http::StatusCode::BAD_GATEWAY,
            berth_protocol::ErrorCode::RegistryUnavailable,
            format!("registry: {e:#}"),
        )
        .on("registry")
    };
    let client = &registry.client;
    let mut out = vec![];
    for repository in client.repositories(&registry.signer).await.map_err(unreachable)? {
        for tag in client.tags(&registry.signer, &repository).await.map_err(unreachable)? {
            let m = client
                .manifest(&registry.signer, &repository, &tag)
                .await
                .map_err(unreachable)?;
            let reference = format!("{}/{repository}:{tag}", registry.host);
            let by_digest = format!("{}/{repository}@{}", registry.host, m.digest);
            let used: Vec<berth_protocol::api::ReleaseRef> = releases
                .iter()
                .filter(|r| r.spec.image == reference || r.spec.image == by_digest)
                .map(|r| berth_protocol::api::ReleaseRef {
                    service: r.service.clone(),
                    number: r.number,
                })
                .collect();
            if q.service
                .as_ref()
                .is_some_and(|name| !used.iter().any(|u| &u.service == name))
            {
                continue;
            }
            out.push(berth_protocol::api::ImageInfo {
                repository: repository.clone(),
                tag,
                reference,
                digest: m.digest,
                size: m.size,
                releases: used,
            });
        }
    }
    Ok(Json(out))
}

/// Where the fleet registry is.
#[utoipa::path(get, path = "/v1/registry", tag = "registry",
    responses((status = 200, description = "The registry's host", body = RegistryInfo)))]
async fn info(State(s): State<SharedState>) -> ApiResult<Json<berth_protocol::api::RegistryInfo>> {
    let registry = running(&s)?;
    Ok(Json(berth_protocol::api::RegistryInfo {
        host: registry.host.clone(),
    }))
}

fn running(s: &SharedState) -> ApiResult<std::sync::Arc<crate::registry::Registry>> {
    s.registry.clone().ok_or_else(|| {
        ApiErr::not_found(
            "path",
            "path: this control plane runs no registry (started with --no-registry, or docker-registry is not installed)",
        )
    })
}

/// The fleet registry's token server (Docker registry token auth): a JWT
/// for the `scope`s asked, to the extent the caller may have them. HTTP
/// Basic: `admin` with the admin token, a node's name with its registry
/// password, or `build.<id>` with a running build's password.
#[utoipa::path(get, path = "/v1/registry/token", tag = "registry",
    params(
        ("service" = Option<String>, Query, description = "Must be this registry's service name"),
        ("scope" = Option<String>, Query, description = "`repository:NAME:pull,push`; repeatable, or several space-separated"),
    ),
    security(("registry" = [])),
    responses((status = 200, description = "`{token, access_token, expires_in}`", content_type = "application/json")))]
async fn issue(State(s): State<SharedState>, headers: HeaderMap, RawQuery(query): RawQuery) -> ApiResult<Response> {
    let registry = running(&s)?;
    let caller = match caller(&s, &headers).await {
        Ok(c) => c,
        Err(e) => {
            // Ask for Basic credentials, as `docker login` expects.
            let mut r = e.into_response();
            r.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Basic realm=\"berth registry\""),
            );
            return Ok(r);
        }
    };
    let mut asked: Vec<Access> = vec![];
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "service" if value != token::SERVICE => {
                return Err(ApiErr::invalid(
                    "service",
                    format!("service: {value:?} is not this registry ({})", token::SERVICE),
                ))
            }
            // Repeated, and one value may hold several, space-separated.
            "scope" => {
                for one in value.split(' ').filter(|x| !x.is_empty()) {
                    let a = Access::parse(one).map_err(|e| ApiErr::invalid("scope", e))?;
                    if !asked.contains(&a) {
                        asked.push(a);
                    }
                }
            }
            _ => {}
        }
    }
    // What was asked and may not be had is left out, not refused: the
    // registry then answers the request itself with 401 insufficient_scope.
    let granted = caller.grant(&asked);
    let jwt = registry
        .signer
        .sign(&caller.subject(), &granted, now())
        .map_err(ApiErr::internal)?;
    Ok(Json(serde_json::json!({
        "token": jwt,
        "access_token": jwt,
        "expires_in": token::TTL_SECS,
    }))
    .into_response())
}

/// Who the Basic credentials name: the admin, or a node that is still in
/// the fleet with its own password. The same 401 for every failure.
async fn caller(s: &SharedState, headers: &HeaderMap) -> ApiResult<Caller> {
    let refused = || ApiErr::unauthorized("authorization", "authorization: unknown user or wrong password");
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .ok_or_else(|| {
            ApiErr::unauthorized(
                "authorization",
                "authorization: anonymous access is refused; log in (berth registry login)",
            )
        })?;
    let decoded = STANDARD.decode(basic.trim()).map_err(|_| refused())?;
    let decoded = String::from_utf8(decoded).map_err(|_| refused())?;
    let (user, password) = decoded.split_once(':').ok_or_else(refused)?;
    if user == "admin" {
        return if is_admin_token(s, password) {
            Ok(Caller::Admin)
        } else {
            Err(refused())
        };
    }
    let registry = s.registry.as_ref().ok_or_else(refused)?;
    if let Some(id) = user.strip_prefix("build.").and_then(|n| n.parse::<u64>().ok()) {
        if !registry.check_build_password(id, password) {
            return Err(refused());
        }
        return match s.store.get_build(id).await.map_err(ApiErr::internal)? {
            Some(b) if b.state == berth_protocol::build::BuildState::Running => Ok(Caller::Build {
                id,
                repository: b.service,
            }),
            _ => Err(refused()),
        };
    }
    let nodes = s.store.list_nodes().await.map_err(ApiErr::internal)?;
    match nodes.iter().find(|n| n.name == user) {
        Some(n) if registry.check_node_password(&n.id, password) => Ok(Caller::Node { name: n.name.clone() }),
        _ => Err(refused()),
    }
}
