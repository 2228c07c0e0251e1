//! Browser sign-in for the dashboard (no prior authentication): `POST
//! /v1/session` with the admin token or a user's password sets the
//! session cookie, `GET` returns the session (its CSRF token after a
//! reload), `DELETE` ends it. Every refusal of credentials looks and takes
//! the same; repeated failures are refused for a while (see
//! [`crate::sessions`]).

use super::{body, RemoteAddr};
use crate::auth::{check_csrf, is_admin_token, session_of};
use crate::error::{parse_json, ApiErr, ApiResult};
use crate::sessions::{self, Key, FAILURE_PADDING};
use crate::state::SharedState;
use crate::store::{now, users::SessionRow};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header::{RETRY_AFTER, SET_COOKIE};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use berth_protocol::user::{validate_user_name, LoginRequest, SessionInfo, ADMIN_USER};
use berth_protocol::ErrorCode;
use std::time::Instant;
use utoipa_axum::routes;

/// Public: signing in needs no credentials; reading or ending a session
/// takes its cookie (each handler checks it).
pub fn routes() -> super::Routes {
    super::Routes::default().routes(routes!(login, current, logout))
}

enum Credentials {
    Token(String),
    Password { user: String, password: String },
}

fn info(s: &SessionRow) -> SessionInfo {
    SessionInfo {
        user: s.user.clone(),
        csrf: s.csrf.clone(),
        expires_at: s.expires_at,
    }
}

/// The one refusal of every wrong credential.
fn invalid_credentials() -> ApiErr {
    ApiErr::new(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidCredentials,
        "credentials: the user name and password, or the admin token, are not valid",
    )
    .on("credentials")
}

/// Signs in with a user's password or the admin token; sets the
/// `__Host-berth_session` cookie (HttpOnly, Secure, SameSite=Strict).
#[utoipa::path(post, path = "/v1/session", tag = "session", request_body = LoginRequest, security(()),
    responses((status = 200, description = "Signed in; `Set-Cookie: __Host-berth_session=...`", body = SessionInfo)))]
async fn login(
    State(s): State<SharedState>,
    remote: Option<Extension<RemoteAddr>>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let start = Instant::now();
    // JSON only: a cross-site HTML form (text/plain, urlencoded) cannot
    // send it without a CORS preflight, so no page elsewhere can sign a
    // browser in as someone else (login CSRF).
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return Err(ApiErr::invalid(
            "content-type",
            "content-type: signing in takes application/json",
        ));
    }
    let req: LoginRequest = parse_json(&body(raw)?)?;
    let creds = match req {
        LoginRequest {
            token: Some(token),
            user: None,
            password: None,
        } => Credentials::Token(token),
        LoginRequest {
            token: None,
            user: Some(user),
            password: Some(password),
        } => Credentials::Password { user, password },
        _ => {
            return Err(ApiErr::invalid(
                "body",
                "body: give either \"token\", or \"user\" and \"password\"",
            ))
        }
    };
    // Failures count per address and, for a name that could be a user's,
    // per name (token sign-ins have none: the token cannot be guessed).
    let mut keys = vec![];
    if let Some(Extension(RemoteAddr(addr))) = remote {
        keys.push(Key::Ip(addr.ip()));
    }
    if let Credentials::Password { user, .. } = &creds {
        if validate_user_name(user).is_ok() {
            keys.push(Key::User(user.clone()));
        }
    }
    // Counted as a failure until it succeeds (see Limiter::attempt).
    let attempt = s.sessions.limiter().attempt(&keys, start);
    if let Err(until) = attempt {
        let secs = until.saturating_duration_since(start).as_secs().max(1);
        let at = berth_protocol::time::Utc::from_secs(now() + secs as i64).rfc3339();
        let err = ApiErr::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyAttempts,
            format!("credentials: too many failed sign-ins; try again in {secs} s (at {at})"),
        )
        .on("credentials");
        return Ok(([(RETRY_AFTER, secs.to_string())], err).into_response());
    }

    let dummy = s.sessions.dummy_hash().await.to_string();
    // One Argon2 verification whatever was given, so a wrong token, an
    // unknown user and a wrong password cost the same.
    let user = match creds {
        Credentials::Token(token) => {
            verify(String::new(), dummy).await?;
            is_admin_token(&s, &token).then(|| ADMIN_USER.to_string())
        }
        Credentials::Password { user, password } => {
            let stored = match validate_user_name(&user) {
                Ok(()) => s.store.user_password_hash(&user).await?,
                Err(_) => None,
            };
            let known = stored.is_some();
            let ok = verify(password, stored.unwrap_or(dummy)).await?;
            (known && ok).then_some(user)
        }
    };
    let Some(user) = user else {
        tokio::time::sleep(FAILURE_PADDING.saturating_sub(start.elapsed())).await;
        return Err(invalid_credentials());
    };

    s.sessions.limiter().succeeded(&keys, start);
    let ttl = s.sessions.config.ttl;
    let (secret, id) = sessions::new_secret();
    let created_at = now();
    let session = SessionRow {
        id,
        user,
        csrf: hex::encode(rand::random::<[u8; 32]>()),
        created_at,
        expires_at: created_at + ttl.as_secs() as i64,
    };
    s.store.create_session(&session).await?;
    tracing::info!(user = %session.user, "dashboard sign-in");
    Ok(([(SET_COOKIE, sessions::set_cookie(&secret, ttl))], Json(info(&session))).into_response())
}

async fn verify(password: String, hash: String) -> ApiResult<bool> {
    tokio::task::spawn_blocking(move || sessions::verify_password(&password, &hash))
        .await
        .map_err(ApiErr::internal)
}

/// The session of the cookie sent (its CSRF token, after a page reload).
#[utoipa::path(get, path = "/v1/session", tag = "session", security(("session" = [])),
    responses((status = 200, description = "The session", body = SessionInfo)))]
async fn current(State(s): State<SharedState>, headers: HeaderMap) -> ApiResult<Json<SessionInfo>> {
    Ok(Json(info(&session_of(&s, &headers).await?)))
}

/// Signs out: the session ends and the cookie is cleared. Needs `x-csrf-token`.
#[utoipa::path(delete, path = "/v1/session", tag = "session", security(("session" = [])),
    params(("x-csrf-token" = String, Header, description = "The session's CSRF token")),
    responses((status = 204, description = "Signed out; the cookie is cleared")))]
async fn logout(State(s): State<SharedState>, method: Method, headers: HeaderMap) -> ApiResult<Response> {
    let session = session_of(&s, &headers).await?;
    check_csrf(&method, &headers, &session)?;
    s.store.delete_session(&session.id).await?;
    Ok((StatusCode::NO_CONTENT, [(SET_COOKIE, sessions::clear_cookie())]).into_response())
}
