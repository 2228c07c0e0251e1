//! Builds (see [`crate::builds`]). The admin creates one (`POST /v1/builds`:
//! validated before anything is uploaded), uploads its context
//! (`PUT /v1/builds/ID/context`, streamed to disk, 413 past the limit),
//! follows its log and may cancel it. A builder node claims it by
//! long-polling `/v1/agent/builds/next`, fetches the context, posts its log
//! and reports the result; a success is released by digest at once.

use super::{body, services, AdminRoutes, Path, Routes};
use crate::auth::require_node;
use crate::builds::{any_ready, may_take};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::registry::Registry;
use crate::state::SharedState;
use crate::store::builds::BuildRow;
use crate::store::now;
use crate::store::releases::Origin;
use crate::store::services::SecretsUpdate;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_protocol::build::{
    is_commit_id, platform_arch, stays_inside, BuildDone, BuildInfo, BuildJob, BuildLogAck, BuildRequest, BuildState,
    BuilderQuery, DEFAULT_TIMEOUT_SECS, MAX_TIMEOUT_SECS,
};
use berth_protocol::event::EventKind;
use berth_protocol::{ErrorCode, RegistryAccess, Role};
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use utoipa_axum::router::UtoipaMethodRouterExt;
use utoipa_axum::routes;

pub fn admin_routes() -> AdminRoutes {
    vec![
        routes!(create, list),
        routes!(show),
        routes!(upload).layer(DefaultBodyLimit::disable()),
        routes!(logs),
        routes!(cancel),
    ]
}

/// The node-signed routes.
pub fn agent_routes() -> Routes {
    Routes::default()
        .routes(routes!(next))
        .routes(routes!(context))
        .routes(routes!(log))
        .routes(routes!(done))
}

fn registry(s: &SharedState) -> ApiResult<std::sync::Arc<Registry>> {
    s.registry.clone().ok_or_else(|| {
        ApiErr::conflict(
            ErrorCode::Conflict,
            "registry: builds push to the fleet registry, and this control plane runs none",
        )
        .on("registry")
    })
}

/// 409 on `id`: the build is not in a state for this.
fn id_conflict(message: String) -> ApiErr {
    ApiErr::conflict(ErrorCode::Conflict, message).on("id")
}

fn no_such_build(id: u64) -> ApiErr {
    ApiErr::not_found("id", format!("id: no build {id}"))
}

async fn build(s: &SharedState, id: u64) -> ApiResult<BuildRow> {
    s.store.get_build(id).await?.ok_or_else(|| no_such_build(id))
}

async fn info(s: &SharedState, b: &BuildRow) -> ApiResult<BuildInfo> {
    Ok(info_of(&s.store.list_nodes().await?, b))
}

/// `b` as shown, its builder named from `nodes`.
fn info_of(nodes: &[crate::store::nodes::NodeRow], b: &BuildRow) -> BuildInfo {
    let node = b.node_id.as_deref().map(|id| crate::store::nodes::name_of(nodes, id));
    BuildInfo {
        id: b.id,
        service: b.service.clone(),
        state: b.state,
        dockerfile: b.request.dockerfile.clone(),
        created_by: b.created_by.clone(),
        created_at: b.created_at,
        started_at: b.started_at,
        finished_at: b.finished_at,
        node,
        context_bytes: b.context_bytes,
        image: b.image.clone(),
        release: b.release,
        error: b.error.clone(),
        timeout_secs: b.timeout_secs,
        git: b.request.git.as_ref().map(|g| match &g.reference {
            Some(r) => format!("{}#{r}", g.url),
            None => g.url.clone(),
        }),
        commit: b.commit.clone(),
        platforms: b.request.platforms.clone(),
        parent: b.parent,
    }
}

/// The architecture of a multi-platform build's own row: no builder has it,
/// so only its parts (one per platform) are claimed.
const MULTI_ARCH: &str = "multi";

/// The tag a build pushes: `HOST/SERVICE:build-ID`.
fn tag(registry: &Registry, service: &str, id: u64) -> String {
    format!("{}/{service}:build-{id}", registry.host)
}

fn validate(req: &BuildRequest, registry: &Registry) -> ApiResult<()> {
    if !req.spec.image.is_empty() {
        return Err(ApiErr::invalid(
            "spec.image",
            "spec.image: leave it empty for a build (the build makes the image)",
        ));
    }
    let mut planned = req.spec.clone();
    planned.image = tag(registry, &req.spec.name, 1);
    planned.validate()?;
    if let Some(g) = &req.git {
        g.validate()?;
    }
    if !req.platforms.is_empty() {
        if req.arch.is_some() {
            return Err(ApiErr::invalid(
                "platforms",
                "platforms: give platforms or arch, not both",
            ));
        }
        let mut archs = std::collections::BTreeSet::new();
        for p in &req.platforms {
            if !archs.insert(platform_arch(p)?) {
                return Err(ApiErr::invalid(
                    "platforms",
                    format!("platforms: {p:?}: two platforms of one architecture"),
                ));
            }
        }
    }
    let d = &req.dockerfile;
    // A git build may leave it to the builder (Containerfile, else Dockerfile).
    let left_to_builder = d.is_empty() && req.git.is_some();
    if !left_to_builder && (d.is_empty() || !stays_inside(d)) {
        return Err(ApiErr::invalid(
            "dockerfile",
            format!("dockerfile: {d:?} must be a path inside the context"),
        ));
    }
    for k in req.build_args.keys() {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(ApiErr::invalid(
                "build_args",
                format!("build_args: {k:?} is not a valid argument name"),
            ));
        }
    }
    if let Some(t) = &req.target {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
            return Err(ApiErr::invalid("target", format!("target: {t:?} is not a stage name")));
        }
    }
    if let Some(t) = req.timeout_secs {
        if t == 0 || t > MAX_TIMEOUT_SECS {
            return Err(ApiErr::invalid(
                "timeout_secs",
                format!("timeout_secs: must be 1-{MAX_TIMEOUT_SECS}"),
            ));
        }
    }
    Ok(())
}

/// Creates a build: from a git source (starts at once) or from a context
/// to upload next (`PUT /v1/builds/{id}/context`).
#[utoipa::path(post, path = "/v1/builds", tag = "builds", request_body = BuildRequest,
    responses((status = 201, description = "Created", body = BuildInfo)))]
async fn create(
    State(s): State<SharedState>,
    crate::auth::Actor(actor): crate::auth::Actor,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let req: BuildRequest = parse_json(&body(raw)?)?;
    if req.git.as_ref().is_some_and(|g| g.credential_sealed.is_some()) {
        return Err(ApiErr::invalid(
            "git.credential_sealed",
            "git.credential_sealed: set by the control plane; give the token or key as git.credential",
        ));
    }
    let row = start(&s, req, &actor).await?;
    Ok((StatusCode::CREATED, Json(info(&s, &row).await?)).into_response())
}

/// Validates and stores a build (also made by push webhooks).
pub(super) async fn start(s: &SharedState, mut req: BuildRequest, created_by: &str) -> ApiResult<BuildRow> {
    let registry = registry(s)?;
    validate(&req, &registry)?;
    if let Some(a) = &req.arch {
        check_arch(a)?;
    }
    let builders = s.builds.builders();
    let now_i = Instant::now();
    // One builder per platform of a multi-platform build, each of its own
    // architecture; else one of the asked (or a ready) architecture.
    let archs: Vec<String> = if !req.platforms.is_empty() {
        req.platforms
            .iter()
            .map(|p| platform_arch(p).map(String::from))
            .collect::<Result<_, _>>()?
    } else {
        vec![match &req.arch {
            Some(a) => a.clone(),
            None if any_ready(&builders, "amd64", now_i) => "amd64".into(),
            None => builders
                .values()
                .find(|b| any_ready(&builders, &b.arch, now_i))
                .map(|b| b.arch.clone())
                .unwrap_or_else(|| "amd64".into()),
        }]
    };
    if let Some(arch) = archs.iter().find(|a| !any_ready(&builders, a, now_i)) {
        return Err(ApiErr::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::NoBuilder,
            format!("builder: no {arch} builder node is ready (a worker builds unless started with --no-builds; is one online?)"),
        )
        .on("builder"));
    }
    let sealed = if req.spec.secrets.is_empty() {
        None
    } else {
        Some(services::seal_secrets(s, &req.spec.secrets)?)
    };
    req.spec.secrets.clear();
    // The credential is stored sealed only (the request is kept as JSON).
    if let Some(g) = &mut req.git {
        if let Some(c) = g.credential.take() {
            g.credential_sealed = Some(s.seal_for_store(c.trim().as_bytes()));
        }
    }
    let timeout = req.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS);
    let multi = !req.platforms.is_empty();
    let arch = if multi { MULTI_ARCH } else { archs[0].as_str() };
    let id = s
        .store
        .create_build(&req, sealed.as_deref(), arch, created_by, timeout, None)
        .await
        .map_err(ApiErr::internal)?;
    tracing::info!(build = id, service = %req.spec.name, %arch, %created_by, "build created");
    let source = match &req.git {
        Some(g) => format!("{} {}", g.url, g.reference.as_deref().unwrap_or("HEAD")),
        None => "an uploaded directory".to_string(),
    };
    s.store
        .record_event(
            EventKind::Build,
            Some(&req.spec.name),
            None,
            &format!("build {id} started from {source} (by {created_by})"),
        )
        .await?;
    if multi {
        // A part per platform, with that platform alone.
        for (platform, arch) in req.platforms.iter().zip(&archs) {
            let part = BuildRequest {
                platforms: vec![platform.clone()],
                arch: Some(arch.clone()),
                ..req.clone()
            };
            let part_id = s
                .store
                .create_build(&part, sealed.as_deref(), arch, created_by, timeout, Some(id))
                .await
                .map_err(ApiErr::internal)?;
            let _ = s
                .builds
                .append_log(id, format!("{platform}: build {part_id}\n").as_bytes());
        }
    }
    if req.git.is_some() {
        s.builds.notify();
    }
    build(s, id).await
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    service: Option<String>,
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/builds", tag = "builds", params(ListQuery),
    responses((status = 200, description = "Builds, newest first", body = Vec<BuildInfo>)))]
async fn list(
    State(s): State<SharedState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<BuildInfo>>> {
    let q = super::query(q)?;
    let rows = s
        .store
        .list_builds(q.service.as_deref(), q.limit.unwrap_or(50).min(1000))
        .await?;
    let nodes = s.store.list_nodes().await?;
    Ok(Json(rows.iter().map(|r| info_of(&nodes, r)).collect()))
}

#[utoipa::path(get, path = "/v1/builds/{id}", operation_id = "show_build", tag = "builds",
    params(("id" = u64, Path, description = "Build id")),
    responses((status = 200, description = "The build", body = BuildInfo)))]
async fn show(State(s): State<SharedState>, Path(id): Path<u64>) -> ApiResult<Json<BuildInfo>> {
    let row = build(&s, id).await?;
    Ok(Json(info(&s, &row).await?))
}

/// Ends a build: its row, its context file, and everyone waiting is told.
/// A multi-platform build ends with each of its platforms: one that fails
/// (or is cut off) fails the whole, and the whole ending early cancels
/// the platforms still building.
async fn end(
    s: &SharedState,
    id: u64,
    state: BuildState,
    error: Option<&str>,
    image: Option<&str>,
    release: Option<u64>,
) -> ApiResult<bool> {
    let ended = end_one(s, id, state, error, image, release).await?;
    if !ended || state == BuildState::Succeeded {
        return Ok(ended);
    }
    let Some(b) = s.store.get_build(id).await? else {
        return Ok(ended);
    };
    if let Some(parent) = b.parent {
        let platform = b.request.platforms.first().map(String::as_str).unwrap_or("?");
        let why = format!("{platform}: {}", error.unwrap_or(state.as_str()));
        end_one(s, parent, BuildState::Failed, Some(&why), None, None).await?;
    }
    let group = b.parent.unwrap_or(b.id);
    for part in s.store.build_parts(group).await? {
        if !part.state.is_final() {
            let why = format!(
                "build {group} {}",
                if b.parent.is_some() { "failed" } else { state.as_str() }
            );
            end_one(s, part.id, BuildState::Cancelled, Some(&why), None, None).await?;
        }
    }
    Ok(ended)
}

async fn end_one(
    s: &SharedState,
    id: u64,
    state: BuildState,
    error: Option<&str>,
    image: Option<&str>,
    release: Option<u64>,
) -> ApiResult<bool> {
    let ended = s.store.finish_build(id, state, error, image, release).await?;
    s.builds.flush_platform_log(id);
    if ended {
        let _ = std::fs::remove_file(s.builds.context_path(id));
        let _ = std::fs::remove_file(s.builds.context_path(id).with_extension("part"));
        tracing::info!(
            build = id,
            state = state.as_str(),
            error = error.unwrap_or(""),
            "build ended"
        );
        if let Some(b) = s.store.get_build(id).await? {
            let mut message = format!("build {id} {}", state.as_str());
            if let Some(r) = release {
                message.push_str(&format!(", release {r}"));
            }
            if let Some(e) = error {
                message.push_str(&format!(": {e}"));
            }
            s.store
                .record_event(EventKind::Build, Some(&b.service), None, &message)
                .await?;
        }
        if let Some(e) = error {
            let _ = s
                .builds
                .append_log(id, format!("\nbuild {id} {}: {e}\n", state.as_str()).as_bytes());
        }
    }
    s.builds.notify();
    Ok(ended)
}

fn too_large(limit: u64) -> ApiErr {
    ApiErr::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::BodyTooLarge,
        format!(
            "body: the build context is larger than the control plane accepts ({} MiB, --max-build-context-mib); exclude files with .dockerignore",
            limit >> 20
        ),
    )
    .on("body")
}

/// The context, streamed to `ID.tar.part` and renamed once whole. A
/// refusal closes the connection: the rest of the body is never read, so
/// the connection cannot carry another request.
#[utoipa::path(put, path = "/v1/builds/{id}/context", tag = "builds",
    params(("id" = u64, Path, description = "Build id")),
    request_body(content = Vec<u8>, content_type = "application/x-tar", description = "The build context, a tar archive (gzip allowed)"),
    responses((status = 200, description = "Uploaded; the build is queued", body = BuildInfo)))]
async fn upload(State(s): State<SharedState>, Path(id): Path<u64>, headers: HeaderMap, body: Body) -> Response {
    // A small body is read whole first, so that the client has sent it all
    // when a refusal comes: closing on unread bytes resets the connection,
    // and the client would see that instead of the answer. A large one
    // streams, and a refusal cuts it off.
    let small = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .is_some_and(|n| n <= super::MAX_BODY);
    let body = if small {
        match axum::body::to_bytes(body, super::MAX_BODY).await {
            Ok(b) => Body::from(b),
            Err(e) => return ApiErr::invalid("body", format!("body: the upload broke off: {e}")).into_response(),
        }
    } else {
        body
    };
    match receive(&s, id, &headers, body).await {
        Ok(info) => info.into_response(),
        Err(e) => {
            let mut r = e.into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

async fn receive(s: &SharedState, id: u64, headers: &HeaderMap, body: Body) -> ApiResult<Json<BuildInfo>> {
    let s = s.clone();
    let row = build(&s, id).await?;
    let Some(_slot) = s.builds.upload_slot(id) else {
        return Err(id_conflict(format!(
            "id: build {id}'s context is being uploaded by another request"
        )));
    };
    if let Some(parent) = row.parent {
        return Err(id_conflict(format!(
            "id: build {id} is one platform of build {parent}: upload build {parent}'s context"
        )));
    }
    if row.state != BuildState::Uploading {
        return Err(id_conflict(format!(
            "id: build {id} is {}, its context is already uploaded",
            row.state.as_str()
        )));
    }
    let limit = s.builds.config.max_context_bytes;
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let refuse = |e: ApiErr| async {
        end(&s, id, BuildState::Failed, Some(&e.message), None, None).await?;
        Err::<Json<BuildInfo>, ApiErr>(e)
    };
    if declared.is_some_and(|n| n > limit) {
        return refuse(too_large(limit)).await;
    }
    let part = s.builds.context_path(id).with_extension("part");
    let mut file = tokio::fs::File::create(&part).await.map_err(ApiErr::internal)?;
    let mut stream = body.into_data_stream();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return refuse(ApiErr::invalid("body", format!("body: the upload broke off: {e}"))).await,
        };
        bytes += chunk.len() as u64;
        if bytes > limit {
            drop(file);
            return refuse(too_large(limit)).await;
        }
        file.write_all(&chunk).await.map_err(ApiErr::internal)?;
    }
    file.sync_all().await.map_err(ApiErr::internal)?;
    drop(file);
    let renamed = std::fs::rename(&part, s.builds.context_path(id));
    if renamed.is_err() || !s.store.build_uploaded(id, bytes).await? {
        let _ = std::fs::remove_file(s.builds.context_path(id));
        return Err(id_conflict(format!("id: build {id} was ended during the upload")));
    }
    // A multi-platform build's platforms build from its context.
    for part in s.store.build_parts(id).await? {
        s.store.build_uploaded(part.id, bytes).await?;
    }
    let _ = s.builds.append_log(
        id,
        format!("context: {bytes} bytes received; waiting for a builder\n").as_bytes(),
    );
    let row = build(&s, id).await?;
    Ok(Json(info(&s, &row).await?))
}

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

/// The log as text; with `follow`, kept open until the build ends.
#[utoipa::path(get, path = "/v1/builds/{id}/logs", operation_id = "build_logs", tag = "builds",
    params(("id" = u64, Path, description = "Build id"), LogsQuery),
    responses((status = 200, description = "The log, streamed", content_type = "text/plain", body = String)))]
async fn logs(
    State(s): State<SharedState>,
    Path(id): Path<u64>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = super::query(q)?;
    build(&s, id).await?;
    let (mut tx, rx) = tokio::io::duplex(64 * 1024);
    let path = s.builds.log_path(id);
    tokio::spawn(async move {
        let mut changes = s.builds.subscribe();
        let mut offset = 0u64;
        loop {
            // Subscribed before reading: a chunk written after the read
            // marks the channel changed.
            changes.borrow_and_update();
            let over = s
                .store
                .get_build(id)
                .await
                .ok()
                .flatten()
                .is_none_or(|b| b.state.is_final());
            // Only what was appended since the last look is read.
            if let Ok(mut file) = tokio::fs::File::open(&path).await {
                if file.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                    match tokio::io::copy(&mut file, &mut tx).await {
                        Ok(n) => offset += n,
                        Err(_) => return, // the reader left
                    }
                }
            }
            if over || !q.follow {
                return;
            }
            // Another replica's change moves no local signal: look again now and then.
            let _ = tokio::time::timeout(Duration::from_secs(2), changes.changed()).await;
        }
    });
    Ok((
        [("content-type", "text/plain; charset=utf-8")],
        Body::from_stream(tokio_util::io::ReaderStream::new(rx)),
    )
        .into_response())
}

#[utoipa::path(post, path = "/v1/builds/{id}/cancel", tag = "builds",
    params(("id" = u64, Path, description = "Build id")),
    responses((status = 200, description = "The build, cancelled", body = BuildInfo)))]
async fn cancel(State(s): State<SharedState>, Path(id): Path<u64>) -> ApiResult<Json<BuildInfo>> {
    let ending = s.builds.ending.lock().await;
    // One platform of a multi-platform build cancels the whole.
    let id = build(&s, id).await?.parent.unwrap_or(id);
    let row = build(&s, id).await?;
    if !end(
        &s,
        id,
        BuildState::Cancelled,
        Some("cancelled by the admin"),
        None,
        None,
    )
    .await?
    {
        return Err(id_conflict(format!("id: build {id} is already {}", row.state.as_str())));
    }
    drop(ending);
    let row = build(&s, id).await?;
    Ok(Json(info(&s, &row).await?))
}

/// Ends builds past their time (counted from their creation).
pub async fn sweep(s: SharedState) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let Ok(open) = s.store.unfinished_builds().await else {
            continue;
        };
        for b in open {
            if now() >= b.created_at + b.timeout_secs as i64 {
                let why = format!("timed out after {} s", b.timeout_secs);
                let _ending = s.builds.ending.lock().await;
                if let Err(e) = end(&s, b.id, BuildState::Failed, Some(&why), None, None).await {
                    tracing::warn!(build = b.id, error = %e.message, "ending a timed-out build failed");
                }
            }
        }
    }
}

fn check_arch(arch: &str) -> ApiResult<()> {
    // `multi` names a multi-platform build's own row, which nothing claims.
    if arch.is_empty() || arch.len() > 32 || !arch.bytes().all(|b| b.is_ascii_alphanumeric()) || arch == MULTI_ARCH {
        return Err(ApiErr::invalid(
            "arch",
            format!("arch: {arch:?} is not an architecture"),
        ));
    }
    Ok(())
}

async fn builder_node(
    s: &SharedState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<crate::store::nodes::NodeRow> {
    let node = require_node(s, method, uri, headers, body).await?;
    if node.role != Role::Worker {
        return Err(ApiErr::invalid("role", "role: proxy nodes do not build"));
    }
    Ok(node)
}

/// Build `id`, for the signed request of the node that claimed it; any
/// other node is told there is no such build.
async fn owned(
    s: &SharedState,
    id: u64,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> ApiResult<BuildRow> {
    let node = builder_node(s, method, uri, headers, body).await?;
    let b = build(s, id).await?;
    if b.node_id.as_deref() != Some(node.id.as_str()) {
        return Err(no_such_build(id));
    }
    Ok(b)
}

/// Long-poll for work: a build of this node's architecture it may take
/// (see [`may_take`]), or 204 after `wait` seconds.
#[utoipa::path(get, path = "/v1/agent/builds/next", operation_id = "next_build", tag = "agent", params(BuilderQuery),
    responses(
        (status = 200, description = "A build to run", body = BuildJob),
        (status = 204, description = "None within `wait` seconds"),
    ))]
async fn next(
    State(s): State<SharedState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    q: Result<Query<BuilderQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let node = builder_node(&s, &method, &uri, &headers, b"").await?;
    let q = super::query(q)?;
    check_arch(&q.arch)?;
    let registry = registry(&s)?;
    // A node asks only while idle: a build still running on it was cut off
    // (its agent restarted) and would otherwise wait for its timeout.
    for b in s.store.unfinished_builds().await? {
        if b.state == BuildState::Running && b.node_id.as_deref() == Some(node.id.as_str()) {
            let _ending = s.builds.ending.lock().await;
            end(
                &s,
                b.id,
                BuildState::Failed,
                Some("the builder stopped during the build (its agent restarted)"),
                None,
                None,
            )
            .await?;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.wait.unwrap_or(25).min(super::MAX_WAIT_SECS));
    let mut changes = s.builds.subscribe();
    loop {
        changes.borrow_and_update();
        s.builds.seen(&node.id, &q.arch, q.preferred, true);
        if may_take(&s.builds.builders(), &node.id, Instant::now()) {
            if let Some(b) = s.store.claim_build(&node.id, &q.arch).await? {
                if let Some(parent) = b.parent {
                    s.store.parent_started(parent).await?;
                }
                s.builds.seen(&node.id, &q.arch, q.preferred, false);
                s.builds.notify();
                let _ = s
                    .builds
                    .append_log(b.id, format!("builder: {}\n", node.name).as_bytes());
                tracing::info!(build = b.id, node = %node.name, "build claimed");
                // The secrets the release will have: the build's own, else the service's.
                let sealed = match &b.secrets_sealed {
                    Some(x) => Some(x.clone()),
                    None => s.store.get_service(&b.service).await?.and_then(|r| r.secrets_sealed),
                };
                let sealed_secrets =
                    sealed.and_then(|x| crate::desired::reseal(&s.secrets_key, &x, node.sealing_key.as_deref()));
                let mut git = b.request.git.clone();
                if let Some(g) = &mut git {
                    if let Some(c) = g.credential_sealed.take() {
                        g.credential_sealed = crate::desired::reseal(&s.secrets_key, &c, node.sealing_key.as_deref());
                        // Cloning without it would fail with git's own, vaguer words.
                        if g.credential_sealed.is_none() {
                            let _ending = s.builds.ending.lock().await;
                            let why = format!(
                                "git.credential: builder {} has no sealing key to receive it (upgrade its agent)",
                                node.name
                            );
                            end(&s, b.id, BuildState::Failed, Some(&why), None, None).await?;
                            continue;
                        }
                    }
                }
                let job = BuildJob {
                    id: b.id,
                    dockerfile: b.request.dockerfile.clone(),
                    build_args: b.request.build_args.clone(),
                    target: b.request.target.clone(),
                    tag: tag(&registry, &b.service, b.id),
                    registry: RegistryAccess {
                        host: registry.host.clone(),
                        username: Registry::build_user(b.id),
                        password: registry.build_password(b.id),
                    },
                    timeout_secs: b.timeout_secs,
                    platform: b.parent.and(b.request.platforms.first().cloned()),
                    sealed_secrets,
                    git,
                };
                return Ok(Json(job).into_response());
            }
        }
        // Woken by a new build; also now and then, for builds queued on
        // another replica and for a --builder node that went busy.
        let tick = tokio::time::Instant::now() + Duration::from_secs(2);
        if tokio::time::timeout_at(tick.min(deadline), changes.changed())
            .await
            .is_err()
            && tokio::time::Instant::now() >= deadline
        {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
    }
}

/// The context of a build this node claimed.
#[utoipa::path(get, path = "/v1/agent/builds/{id}/context", tag = "agent",
    params(("id" = u64, Path, description = "Build id")),
    responses((status = 200, description = "The tar archive", content_type = "application/x-tar", body = Vec<u8>)))]
async fn context(
    State(s): State<SharedState>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let b = owned(&s, id, &method, &uri, &headers, b"").await?;
    if b.state != BuildState::Running {
        return Err(id_conflict(format!("id: build {id} is {}", b.state.as_str())));
    }
    let file = tokio::fs::File::open(s.builds.context_path(b.parent.unwrap_or(id)))
        .await
        .map_err(ApiErr::internal)?;
    Ok((
        [("content-type", "application/x-tar")],
        Body::from_stream(tokio_util::io::ReaderStream::new(file)),
    )
        .into_response())
}

/// Appends to the log of a build this node claimed.
#[utoipa::path(post, path = "/v1/agent/builds/{id}/log", tag = "agent",
    params(("id" = u64, Path, description = "Build id")),
    request_body(content = String, content_type = "text/plain", description = "Log output"),
    responses((status = 200, description = "Whether to stop", body = BuildLogAck)))]
async fn log(
    State(s): State<SharedState>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BuildLogAck>> {
    let raw = body(raw)?;
    let b = owned(&s, id, &method, &uri, &headers, &raw).await?;
    if b.state == BuildState::Running {
        s.builds.append_log(id, &raw).map_err(ApiErr::internal)?;
        // The multi-platform build's log has every platform's, line by line.
        if let Some(parent) = b.parent {
            let platform = b.request.platforms.first().map(String::as_str).unwrap_or("?");
            s.builds
                .append_platform_log(id, parent, &format!("[{platform}] "), &raw)
                .map_err(ApiErr::internal)?;
        }
    }
    Ok(Json(BuildLogAck {
        stop: b.state != BuildState::Running,
    }))
}

/// The builder's result. A success is pinned to the digest the registry
/// has for the pushed tag and released at once.
#[utoipa::path(post, path = "/v1/agent/builds/{id}/done", tag = "agent",
    params(("id" = u64, Path, description = "Build id")), request_body = BuildDone,
    responses((status = 200, description = "The build, ended", body = BuildInfo)))]
async fn done(
    State(s): State<SharedState>,
    Path(id): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BuildInfo>> {
    let raw = body(raw)?;
    owned(&s, id, &method, &uri, &headers, &raw).await?;
    let report: BuildDone = parse_json(&raw)?;
    let ending = s.builds.ending.lock().await;
    // Looked at again under the lock: a cancel, a timeout or a repeated
    // report may have ended it meanwhile.
    let b = build(&s, id).await?;
    if b.state == BuildState::Running {
        let mut error = report.error;
        if let Some(c) = report.commit.as_deref().filter(|_| b.request.git.is_some()) {
            if !is_commit_id(c) {
                return Err(ApiErr::invalid("commit", format!("commit: {c:?} is not a commit ID")));
            }
            s.store.set_build_commit(id, c).await?;
            if let Some(parent) = b.parent {
                // Each platform cloned the ref itself: a push in between
                // would put two commits in one list.
                match build(&s, parent).await?.commit {
                    Some(first) if first != c => {
                        error.get_or_insert(format!(
                            "commit: the platforms built different commits ({first}, {c}): the ref moved during the \
                             build; build a commit (--ref COMMIT) or try again"
                        ));
                    }
                    _ => s.store.set_build_commit(parent, c).await?,
                }
            }
        }
        match (error, b.parent) {
            (Some(e), _) => {
                end(&s, id, BuildState::Failed, Some(&e), None, None).await?;
            }
            (None, None) => {
                if let Err(e) = release(&s, &b).await {
                    end(&s, id, BuildState::Failed, Some(&e), None, None).await?;
                }
            }
            (None, Some(parent)) => {
                if let Err(e) = platform_done(&s, &b, parent).await {
                    end(&s, id, BuildState::Failed, Some(&e), None, None).await?;
                    end(&s, parent, BuildState::Failed, Some(&e), None, None).await?;
                }
            }
        }
    }
    drop(ending);
    let row = build(&s, id).await?;
    Ok(Json(info(&s, &row).await?))
}

/// The digest build `b`'s tag (`build-ID`) names in the registry.
async fn pushed_digest(registry: &Registry, b: &BuildRow) -> Result<String, String> {
    let tag = format!("build-{}", b.id);
    // A registry that blinks (restarting for garbage collection) is asked
    // again before the pushed build is failed.
    let mut looked = registry.client.digest(&registry.signer, &b.service, &tag).await;
    for _ in 0..5 {
        if looked.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        looked = registry.client.digest(&registry.signer, &b.service, &tag).await;
    }
    match looked {
        Ok(Some(d)) => Ok(d),
        Ok(None) => Err(format!(
            "the builder reported success, but the registry has no {}:{tag}",
            b.service
        )),
        Err(e) => Err(format!("registry: {e:#}")),
    }
}

/// One platform of multi-platform build `parent` is pushed: it ends
/// `succeeded` with its digest, and the last one lists them all in a
/// manifest list (`SERVICE:build-PARENT`), which is released.
async fn platform_done(s: &SharedState, b: &BuildRow, parent: u64) -> Result<(), String> {
    let registry = registry(s).map_err(|e| e.message)?;
    let digest = pushed_digest(&registry, b).await?;
    let image = format!("{}/{}@{digest}", registry.host, b.service);
    end(s, b.id, BuildState::Succeeded, None, Some(&image), None)
        .await
        .map_err(|e| e.message)?;
    let parts = s.store.build_parts(parent).await.map_err(|e| e.to_string())?;
    let whole = build(s, parent).await.map_err(|e| e.message)?;
    if whole.state.is_final() || !parts.iter().all(|p| p.state == BuildState::Succeeded) {
        return Ok(());
    }
    let mut manifests = vec![];
    let mut list_type = OCI_INDEX;
    for p in &parts {
        let d = p
            .image
            .as_deref()
            .and_then(|i| i.rsplit_once('@'))
            .map(|(_, d)| d)
            .unwrap_or("");
        let (media_type, bytes) = registry
            .client
            .manifest_raw(&registry.signer, &b.service, d)
            .await
            .map_err(|e| format!("registry: {e:#}"))?
            .ok_or_else(|| format!("registry: {}@{d} is gone", b.service))?;
        if media_type.starts_with("application/vnd.docker.") {
            list_type = DOCKER_MANIFEST_LIST;
        }
        let platform = p.request.platforms.first().map(String::as_str).unwrap_or("");
        manifests.push(serde_json::json!({
            "mediaType": media_type,
            "digest": d,
            "size": bytes.len(),
            "platform": platform_json(platform),
        }));
    }
    let list = serde_json::json!({"schemaVersion": 2, "mediaType": list_type, "manifests": manifests});
    let list_digest = registry
        .client
        .put_manifest(
            &registry.signer,
            &b.service,
            &format!("build-{parent}"),
            list_type,
            serde_json::to_vec(&list).map_err(|e| e.to_string())?.into(),
        )
        .await
        .map_err(|e| format!("registry: pushing the manifest list: {e:#}"))?;
    let _ = s.builds.append_log(
        parent,
        format!("manifest list {list_digest}: {}\n", whole.request.platforms.join(", ")).as_bytes(),
    );
    // The commit tag names the list (each builder left it to us).
    if let Some(c) = &whole.commit {
        let tag = format!("git-{}", &c[..c.len().min(12)]);
        if let Err(e) = registry
            .client
            .add_tag(&registry.signer, &b.service, &list_digest, &tag)
            .await
        {
            tracing::warn!(build = parent, error = %format!("{e:#}"), "tagging the manifest list with its commit failed");
        }
    }
    release(s, &whole).await
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `linux/arm64/v8` as a manifest list entry's `platform`.
fn platform_json(platform: &str) -> serde_json::Value {
    let mut parts = platform.split('/');
    let os = parts.next().unwrap_or("linux");
    let arch = parts.next().unwrap_or("");
    match parts.next() {
        Some(v) => serde_json::json!({"os": os, "architecture": arch, "variant": v}),
        None => serde_json::json!({"os": os, "architecture": arch}),
    }
}

/// Pins the pushed tag to its digest and releases the service with it.
async fn release(s: &SharedState, b: &BuildRow) -> Result<(), String> {
    let registry = registry(s).map_err(|e| e.message)?;
    let digest = pushed_digest(&registry, b).await?;
    let image = format!("{}/{}@{digest}", registry.host, b.service);
    let mut spec = b.request.spec.clone();
    spec.image = image.clone();
    let secrets = match &b.secrets_sealed {
        Some(sealed) => SecretsUpdate::Set(sealed.clone()),
        None => SecretsUpdate::Keep,
    };
    let origin = Origin {
        created_by: format!("build {}", b.id),
        reason: None,
        force: b.request.force,
        restart: false,
    };
    let number = services::make_release(s, &spec, secrets, origin)
        .await
        .map_err(|e| format!("deploy: {}", e.message))?;
    let _ = s.builds.append_log(
        b.id,
        format!("pushed {image}\nrelease {number} of {} made\n", b.service).as_bytes(),
    );
    end(s, b.id, BuildState::Succeeded, None, Some(&image), Some(number))
        .await
        .map_err(|e| e.message)?;
    Ok(())
}
