//! Git links and the push webhook. `PUT /v1/services/NAME/link` links a
//! service to a repository's branch and returns a webhook secret (sealed
//! to the control plane's key in the store). `POST /v1/hooks/github` takes
//! GitHub's push deliveries (`X-Hub-Signature-256: sha256=HEX`, HMAC-SHA256
//! of the body) and Gitea's and Forgejo's (`X-Gitea-Signature` /
//! `X-Forgejo-Signature`: the bare HEX), and builds the pushed commit for
//! every service linked to that repository and branch.

use super::builds::start;
use super::{body, AdminRoutes, Path, Routes};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::state::SharedState;
use crate::store::links::LinkRow;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_protocol::build::{is_commit_id, stays_inside, BuildRequest, GitLink, GitLinkInfo, GitSource, HookOutcome};
use berth_protocol::Removed;
use utoipa_axum::routes;

pub const HOOK_PATH: &str = "/v1/hooks/github";

pub fn admin_routes() -> AdminRoutes {
    vec![routes!(link, show, unlink)]
}

/// The webhook: anyone may post; the signature proves the sender.
pub fn routes() -> Routes {
    Routes::default().routes(routes!(hook))
}

fn info(l: &LinkRow, secret: Option<String>) -> GitLinkInfo {
    GitLinkInfo {
        service: l.service.clone(),
        link: GitLink {
            url: l.url.clone(),
            branch: l.branch.clone(),
            context: l.context.clone(),
            dockerfile: l.dockerfile.clone(),
            credential: None,
            known_hosts: l.known_hosts.clone(),
        },
        has_credential: l.credential_sealed.is_some(),
        secret,
        hook_path: HOOK_PATH.into(),
    }
}

/// Links a service to a repository's branch: a push builds and deploys
/// it. The answer holds the webhook secret, shown this once.
#[utoipa::path(put, path = "/v1/services/{name}/link", tag = "builds",
    params(("name" = String, Path, description = "Service name")), request_body = GitLink,
    responses((status = 200, description = "The link, with its webhook secret", body = GitLinkInfo)))]
async fn link(
    State(s): State<SharedState>,
    Path(name): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<GitLinkInfo>> {
    let l: GitLink = parse_json(&body(raw)?)?;
    if s.store.get_service(&name).await?.is_none() {
        return Err(ApiErr::not_found(
            "name",
            format!("name: no service {name:?} (deploy it first; a push deploys its spec with the built image)"),
        ));
    }
    GitSource {
        credential: l.credential.clone(),
        known_hosts: l.known_hosts.clone(),
        ..GitSource::new(&l.url, Some(&l.branch), l.context.as_deref())
    }
    .validate()
    .map_err(|e| {
        let field = if e.field == "git.ref" {
            "branch".to_string()
        } else {
            e.field.replace("git.", "")
        };
        ApiErr::invalid(
            &field,
            format!("{field}{}", e.message.strip_prefix(e.field.as_str()).unwrap_or("")),
        )
    })?;
    if let Some(d) = &l.dockerfile {
        if d.is_empty() || !stays_inside(d) {
            return Err(ApiErr::invalid(
                "dockerfile",
                format!("dockerfile: {d:?} must be a path inside the context"),
            ));
        }
    }
    let secret = hex::encode(rand::random::<[u8; 24]>());
    let row = LinkRow {
        service: name,
        url: l.url,
        branch: l.branch,
        context: l.context,
        dockerfile: l.dockerfile,
        secret_sealed: s.seal_for_store(secret.as_bytes()),
        credential_sealed: l.credential.map(|c| s.seal_for_store(c.trim().as_bytes())),
        known_hosts: l.known_hosts,
    };
    s.store.set_link(&row).await?;
    tracing::info!(service = %row.service, url = %row.url, branch = %row.branch, "service linked to git");
    Ok(Json(info(&row, Some(secret))))
}

fn no_link(name: &str) -> ApiErr {
    ApiErr::not_found("name", format!("name: service {name:?} is not linked to a repository"))
}

#[utoipa::path(get, path = "/v1/services/{name}/link", operation_id = "show_link", tag = "builds",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, description = "The link (no secret)", body = GitLinkInfo)))]
async fn show(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<GitLinkInfo>> {
    let l = s.store.get_link(&name).await?.ok_or_else(|| no_link(&name))?;
    Ok(Json(info(&l, None)))
}

#[utoipa::path(delete, path = "/v1/services/{name}/link", tag = "builds",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, description = "Unlinked", body = Removed<String>)))]
async fn unlink(State(s): State<SharedState>, Path(name): Path<String>) -> ApiResult<Json<Removed<String>>> {
    if !s.store.remove_link(&name).await? {
        return Err(no_link(&name));
    }
    let revision = s.store.revision().await? as u64;
    Ok(Json(Removed {
        removed: name,
        revision,
    }))
}

/// Whether `header` (`sha256=HEX` or bare HEX) is the HMAC-SHA256 of `body`
/// under `secret`; compared in constant time.
pub fn signature_ok(secret: &[u8], body: &[u8], header: &str) -> bool {
    let hex_sig = header.strip_prefix("sha256=").unwrap_or(header);
    let Ok(sig) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &sig).is_ok()
}

/// A repository URL as compared: no trailing `/` or `.git`, lowercase host part.
fn same_repo(a: &str, b: &str) -> bool {
    let norm = |u: &str| u.trim_end_matches('/').trim_end_matches(".git").to_ascii_lowercase();
    !a.is_empty() && norm(a) == norm(b)
}

#[derive(serde::Deserialize)]
struct Push {
    #[serde(rename = "ref", default)]
    reference: String,
    #[serde(default)]
    after: String,
    repository: Repository,
}

#[derive(serde::Deserialize)]
struct Repository {
    #[serde(default)]
    clone_url: String,
    #[serde(default)]
    ssh_url: String,
    #[serde(default)]
    git_url: String,
    #[serde(default)]
    html_url: String,
}

fn outcome(status: StatusCode, what: &str, builds: Vec<u64>) -> Response {
    (
        status,
        Json(HookOutcome {
            status: what.into(),
            builds,
        }),
    )
        .into_response()
}

/// The push webhook of GitHub, Gitea and Forgejo. Anyone may post; the
/// HMAC-SHA256 of the body with a link's secret (`X-Hub-Signature-256:
/// sha256=HEX`, or `X-Gitea-Signature` / `X-Forgejo-Signature`: HEX)
/// proves the sender.
#[utoipa::path(post, path = "/v1/hooks/github", tag = "builds",
    params(
        ("x-hub-signature-256" = Option<String>, Header, description = "`sha256=HEX` (GitHub)"),
        ("x-github-event" = Option<String>, Header, description = "`push` or `ping`"),
    ),
    request_body(content = serde_json::Value, description = "The forge's push event"),
    responses(
        (status = 200, description = "A ping answered, or a delivery already taken", body = HookOutcome),
        (status = 202, description = "Builds started, or nothing to build (no link to that repository and branch)", body = HookOutcome),
    ))]
async fn hook(
    State(s): State<SharedState>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let raw = body(raw)?;
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let Some(signature) = header("x-hub-signature-256")
        .or_else(|| header("x-gitea-signature"))
        .or_else(|| header("x-forgejo-signature"))
    else {
        return Err(ApiErr::unauthorized(
            "signature",
            "signature: no X-Hub-Signature-256 (or X-Gitea-Signature) header; set the link's secret on the webhook",
        ));
    };
    let event = header("x-github-event")
        .or_else(|| header("x-gitea-event"))
        .or_else(|| header("x-forgejo-event"))
        .unwrap_or("push");
    let delivery = header("x-github-delivery")
        .or_else(|| header("x-gitea-delivery"))
        .or_else(|| header("x-forgejo-delivery"))
        .map(String::from);
    let push: Push = match serde_json::from_slice(&raw) {
        Ok(p) => p,
        // A ping has a repository too, but nothing else matters about it.
        Err(e) if event != "ping" => return Err(ApiErr::invalid("body", format!("body: not a push event: {e}"))),
        Err(_) => return Ok(outcome(StatusCode::ACCEPTED, "ignored", vec![])),
    };
    let r = &push.repository;
    let links: Vec<LinkRow> = s
        .store
        .list_links()
        .await?
        .into_iter()
        .filter(|l| {
            [&r.clone_url, &r.ssh_url, &r.git_url, &r.html_url]
                .iter()
                .any(|u| same_repo(u, &l.url))
        })
        .collect();
    if links.is_empty() {
        return Ok(outcome(StatusCode::ACCEPTED, "ignored", vec![]));
    }
    // Signed by the secret of a link to this repository, or refused.
    let signed: Vec<LinkRow> = links
        .into_iter()
        .filter(|l| {
            berth_protocol::seal::open(&s.secrets_key, &l.secret_sealed)
                .is_ok_and(|secret| signature_ok(&secret, &raw, signature))
        })
        .collect();
    if signed.is_empty() {
        return Err(ApiErr::unauthorized(
            "signature",
            "signature: does not match the secret of any link to this repository",
        ));
    }
    if event == "ping" {
        return Ok(outcome(StatusCode::OK, "pong", vec![]));
    }
    let branch = push.reference.strip_prefix("refs/heads/").unwrap_or("");
    let targets: Vec<&LinkRow> = signed.iter().filter(|l| l.branch == branch).collect();
    if event != "push" || targets.is_empty() || push.after.bytes().all(|b| b == b'0') {
        return Ok(outcome(StatusCode::ACCEPTED, "ignored", vec![]));
    }
    if !is_commit_id(&push.after) {
        return Err(ApiErr::invalid(
            "after",
            format!("after: {:?} is not a commit ID", push.after),
        ));
    }
    // Claimed by delivery ID and by the body's hash: the ID is not signed,
    // so a signed body posted again under a new ID (a replay, which would
    // deploy an old commit again) is a duplicate too.
    let body_key = format!(
        "sha256:{}",
        hex::encode(ring::digest::digest(&ring::digest::SHA256, &raw))
    );
    let mut claimed: Vec<String> = vec![];
    for key in delivery.iter().chain(std::iter::once(&body_key)) {
        if !s.store.claim_delivery(key).await? {
            for k in &claimed {
                let _ = s.store.forget_delivery(k).await;
            }
            let builds = s.store.delivery(key).await?.unwrap_or_default();
            return Ok(outcome(StatusCode::OK, "duplicate", builds));
        }
        claimed.push(key.clone());
    }
    let mut builds = vec![];
    let mut errors: Vec<ApiErr> = vec![];
    for l in targets {
        let made = async {
            let svc = s
                .store
                .get_service(&l.service)
                .await?
                .ok_or_else(|| ApiErr::not_found("name", format!("name: service {:?} is gone", l.service)))?;
            let mut spec = svc.spec;
            spec.image.clear();
            let req = BuildRequest {
                spec,
                dockerfile: l.dockerfile.clone().unwrap_or_default(),
                build_args: Default::default(),
                target: None,
                timeout_secs: None,
                force: false,
                arch: None,
                platforms: vec![],
                git: Some(GitSource {
                    credential_sealed: l.credential_sealed.clone(),
                    known_hosts: l.known_hosts.clone(),
                    ..GitSource::new(&l.url, Some(&push.after), l.context.as_deref())
                }),
            };
            let by = format!("push {} to {branch}", &push.after[..12]);
            start(&s, req, &by).await
        }
        .await;
        match made {
            Ok(b) => builds.push(b.id),
            Err(e) => {
                tracing::warn!(service = %l.service, error = %e.message, "webhook build not started");
                errors.push(e);
            }
        }
    }
    if builds.is_empty() {
        // Nothing built: a redelivery may try again.
        for k in &claimed {
            let _ = s.store.forget_delivery(k).await;
        }
        let first = errors
            .iter()
            .position(|e| e.code == berth_protocol::ErrorCode::NoBuilder)
            .unwrap_or(0);
        return Err(errors.swap_remove(first));
    }
    for k in &claimed {
        s.store.set_delivery_builds(k, &builds).await?;
    }
    tracing::info!(commit = %push.after, %branch, ?builds, "push webhook: building");
    Ok(outcome(StatusCode::ACCEPTED, "building", builds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    }

    #[test]
    fn signatures_are_checked_in_both_header_forms() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = sign(b"s3cret", body);
        assert!(signature_ok(b"s3cret", body, &format!("sha256={sig}")));
        assert!(signature_ok(b"s3cret", body, &sig), "Gitea's bare hex");
        assert!(!signature_ok(b"other", body, &format!("sha256={sig}")));
        assert!(!signature_ok(b"s3cret", b"{}", &format!("sha256={sig}")));
        assert!(!signature_ok(b"s3cret", body, "sha256=zz"));
        assert!(!signature_ok(b"s3cret", body, ""));
        // GitHub's documented example (docs.github.com, "Validating webhook deliveries").
        assert!(signature_ok(
            b"It's a Secret to Everybody",
            b"Hello, World!",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        ));
    }

    #[test]
    fn repository_urls_match_loosely() {
        assert!(same_repo("https://github.com/a/b.git", "https://github.com/a/b"));
        assert!(same_repo("https://GitHub.com/a/b/", "https://github.com/a/b.git"));
        assert!(!same_repo("https://github.com/a/bc", "https://github.com/a/b"));
        assert!(!same_repo("", ""));
    }
}
