//! Domains (`/v1/domains`) and TCP routes (`/v1/routes/tcp`), admin only:
//! the traffic proxy nodes take from the internet and where it goes.
//! Every refusal names its field and changes nothing. A domain is listed
//! with how many of the online proxies serve it (`proxies_serving` of
//! `proxies_online`, from their status reports).

use super::{AdminRoutes, Path};
use crate::error::{ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::now;
use crate::store::routes::RouteError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use berth_protocol::routes::{DomainInfo, DomainSpec, TcpRouteSpec};
use berth_protocol::{ErrorCode, Removed};
use serde::de::DeserializeOwned;
use utoipa_axum::routes;

pub fn routes() -> AdminRoutes {
    vec![
        routes!(add_domain, list_domains),
        routes!(get_domain, remove_domain),
        routes!(add_tcp_route, list_tcp_routes),
        routes!(remove_tcp_route),
    ]
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Port,
    Bool,
}

/// Parses a JSON object, checking the type and range of each listed field
/// first: serde's own messages ("expected u16 at line 1 column 40") do not
/// say which field was wrong.
fn parse_checked<T: DeserializeOwned>(raw: Result<Bytes, BytesRejection>, fields: &[(&str, Kind)]) -> ApiResult<T> {
    let raw = raw.map_err(|e| {
        let message = format!("body: {}", e.body_text());
        ApiErr::body(&e, message)
    })?;
    let v: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| ApiErr::invalid("body", format!("body: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiErr::invalid("body", "body: expected a JSON object"))?;
    for (name, kind) in fields {
        let Some(x) = obj.get(*name) else { continue };
        let ok = match kind {
            Kind::Str => x.is_string(),
            Kind::Bool => x.is_boolean(),
            Kind::Port => x.as_u64().is_some_and(|p| (1..=65535).contains(&p)),
        };
        if !ok {
            let want = match kind {
                Kind::Str => "a string",
                Kind::Bool => "true or false",
                Kind::Port => "a port number 1-65535",
            };
            return Err(ApiErr::invalid(name, format!("{name}: must be {want}, got {x}")));
        }
    }
    serde_json::from_value(v).map_err(|e| ApiErr::invalid("body", format!("body: {e}")))
}

fn route_error(e: RouteError) -> ApiErr {
    let m = e.to_string();
    match e {
        RouteError::DomainTaken { .. } => ApiErr::conflict(ErrorCode::NameTaken, m).on("domain"),
        RouteError::ListenTaken { .. } => ApiErr::conflict(ErrorCode::NameTaken, m).on("listen"),
        RouteError::UnknownService(_) => {
            ApiErr::new(StatusCode::UNPROCESSABLE_ENTITY, ErrorCode::UnknownService, m).on("service")
        }
        RouteError::Store(e) => ApiErr::internal(e),
    }
}

/// Serves a public domain from the proxy nodes (HTTPS with an automatic certificate).
#[utoipa::path(post, path = "/v1/domains", tag = "routes", request_body = DomainSpec,
    responses((status = 201, description = "Added", body = DomainInfo)))]
async fn add_domain(
    State(s): State<SharedState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<DomainInfo>)> {
    let spec: DomainSpec = parse_checked(
        raw,
        &[
            ("domain", Kind::Str),
            ("service", Kind::Str),
            ("port", Kind::Port),
            ("passthrough", Kind::Bool),
        ],
    )?;
    spec.validate()?;
    let rev = s.store.add_domain(&spec).await.map_err(route_error)?;
    tracing::info!(domain = %spec.domain, service = %spec.service, port = spec.port, passthrough = spec.passthrough, revision = rev, "domain added");
    s.revision_moved(rev).await;
    s.acme_wake.notify_one();
    let row = s
        .store
        .get_domain(&spec.domain)
        .await?
        .ok_or_else(|| ApiErr::internal("domain vanished"))?;
    let now = now();
    let proxies = s.store.proxy_counts(now, s.offline_after_secs).await?;
    Ok((StatusCode::CREATED, Json(row.info(now, &proxies))))
}

#[utoipa::path(get, path = "/v1/domains", tag = "routes",
    responses((status = 200, description = "Every domain", body = Vec<DomainInfo>)))]
async fn list_domains(State(s): State<SharedState>) -> ApiResult<Json<Vec<DomainInfo>>> {
    let now = now();
    let proxies = s.store.proxy_counts(now, s.offline_after_secs).await?;
    Ok(Json(
        s.store
            .list_domains()
            .await?
            .iter()
            .map(|d| d.info(now, &proxies))
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/domains/{domain}", tag = "routes",
    params(("domain" = String, Path, description = "The domain")),
    responses((status = 200, description = "The domain", body = DomainInfo)))]
async fn get_domain(State(s): State<SharedState>, Path(domain): Path<String>) -> ApiResult<Json<DomainInfo>> {
    let row = s
        .store
        .get_domain(&domain)
        .await?
        .ok_or_else(|| ApiErr::not_found("domain", format!("domain: no domain {domain:?} is routed")))?;
    let now = now();
    let proxies = s.store.proxy_counts(now, s.offline_after_secs).await?;
    Ok(Json(row.info(now, &proxies)))
}

#[utoipa::path(delete, path = "/v1/domains/{domain}", tag = "routes",
    params(("domain" = String, Path, description = "The domain")),
    responses((status = 200, description = "Removed", body = Removed<String>)))]
async fn remove_domain(State(s): State<SharedState>, Path(domain): Path<String>) -> ApiResult<Json<Removed>> {
    let rev = s
        .store
        .remove_domain(&domain)
        .await?
        .ok_or_else(|| ApiErr::not_found("domain", format!("domain: no domain {domain:?} is routed")))?;
    tracing::info!(%domain, revision = rev, "domain removed");
    s.revision_moved(rev).await;
    Ok(Json(Removed {
        removed: domain,
        revision: rev as u64,
    }))
}

/// Forwards a TCP port of the proxy nodes to a service.
#[utoipa::path(post, path = "/v1/routes/tcp", tag = "routes", request_body = TcpRouteSpec,
    responses((status = 201, description = "Added", body = TcpRouteSpec)))]
async fn add_tcp_route(
    State(s): State<SharedState>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<TcpRouteSpec>)> {
    let spec: TcpRouteSpec = parse_checked(
        raw,
        &[("listen", Kind::Port), ("service", Kind::Str), ("port", Kind::Port)],
    )?;
    spec.validate()?;
    let rev = s.store.add_tcp_route(&spec).await.map_err(route_error)?;
    tracing::info!(listen = spec.listen, service = %spec.service, port = spec.port, revision = rev, "TCP route added");
    s.revision_moved(rev).await;
    Ok((StatusCode::CREATED, Json(spec)))
}

#[utoipa::path(get, path = "/v1/routes/tcp", tag = "routes",
    responses((status = 200, description = "Every TCP route", body = Vec<TcpRouteSpec>)))]
async fn list_tcp_routes(State(s): State<SharedState>) -> ApiResult<Json<Vec<TcpRouteSpec>>> {
    Ok(Json(
        s.store.list_tcp_routes().await?.into_iter().map(|r| r.spec).collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/routes/tcp/{listen}", tag = "routes",
    params(("listen" = u16, Path, description = "The listening port, 1-65535")),
    responses((status = 200, description = "Removed", body = Removed<u16>)))]
async fn remove_tcp_route(State(s): State<SharedState>, Path(listen): Path<String>) -> ApiResult<Json<Removed<u16>>> {
    let port: u16 = listen
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ApiErr::invalid("listen", format!("listen: {listen:?} is not a port number 1-65535")))?;
    let rev = s
        .store
        .remove_tcp_route(port)
        .await?
        .ok_or_else(|| ApiErr::not_found("listen", format!("listen: no TCP route on port {port}")))?;
    tracing::info!(listen = port, revision = rev, "TCP route removed");
    s.revision_moved(rev).await;
    Ok(Json(Removed {
        removed: port,
        revision: rev as u64,
    }))
}
