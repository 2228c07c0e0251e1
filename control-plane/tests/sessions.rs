//! Dashboard sign-in over real HTTPS: users, session cookies and what they
//! may do (CSRF token, WebSocket origin), refusals that look and take the
//! same, the limit on failures, sign-out, removed users and expiry.

#[macro_use]
mod common;

use berth_protocol::user::{SessionInfo, UserInfo, UserRemoved};
use berth_protocol::ErrorCode;
use common::*;
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};

on_both_stores!(
    token_and_password_sign_ins_set_a_strict_cookie_that_opens_the_admin_api,
    wrong_credentials_are_refused_alike_and_repeated_failures_wait,
    removing_a_user_ends_its_sessions,
    expired_sessions_are_refused_and_deleted,
    user_names_and_passwords_are_checked,
    a_cookie_websocket_must_come_from_this_control_planes_origin,
    parallel_failures_cannot_outrun_the_limit,
);

const PASSWORD: &str = "correct horse battery";

/// A sign-in's reply and, on success, the `name=value` to send as Cookie.
struct SignIn {
    reply: Reply,
    set_cookie: Option<String>,
    elapsed: Duration,
}

impl SignIn {
    fn cookie(&self) -> String {
        let set = self.set_cookie.as_deref().expect("a Set-Cookie header");
        set.split(';').next().unwrap().to_string()
    }

    fn session(&self) -> SessionInfo {
        self.reply.json()
    }
}

async fn sign_in_with(http: &reqwest::Client, cp: &Cp, body: serde_json::Value) -> SignIn {
    let start = Instant::now();
    let resp = http
        .post(format!("{}/v1/session", cp.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string());
    let reply = Reply::from(resp).await;
    SignIn {
        reply,
        set_cookie,
        elapsed: start.elapsed(),
    }
}

async fn sign_in(cp: &Cp, body: serde_json::Value) -> SignIn {
    sign_in_with(&cp.http, cp, body).await
}

async fn as_admin(cp: &Cp) -> SignIn {
    let s = sign_in(cp, serde_json::json!({"token": cp.admin_token})).await;
    assert_eq!(s.reply.status, StatusCode::OK, "{}", s.reply.body);
    s
}

async fn as_user(cp: &Cp, name: &str) -> SignIn {
    let s = sign_in(cp, serde_json::json!({"user": name, "password": PASSWORD})).await;
    assert_eq!(s.reply.status, StatusCode::OK, "{}", s.reply.body);
    s
}

/// A request authenticated by `cookie` only.
fn with_cookie(cp: &Cp, method: Method, path: &str, cookie: &str) -> reqwest::RequestBuilder {
    cp.http
        .request(method, format!("{}{path}", cp.url))
        .header("cookie", cookie)
}

async fn add_user(cp: &Cp, name: &str) -> UserInfo {
    let body = serde_json::json!({"name": name, "password": PASSWORD});
    Reply::from(cp.admin(Method::POST, "/v1/users").json(&body).send().await.unwrap())
        .await
        .json()
}

async fn get(req: reqwest::RequestBuilder) -> Reply {
    Reply::from(req.send().await.unwrap()).await
}

fn new_token() -> serde_json::Value {
    serde_json::json!({"proxy": false, "ttl_secs": 3600})
}

async fn token_and_password_sign_ins_set_a_strict_cookie_that_opens_the_admin_api(db: &Db) {
    let cp = Cp::start(db).await;
    let alice = add_user(&cp, "alice").await;
    assert_eq!(alice.name, "alice");

    // Only JSON signs in: a cross-site form (text/plain) cannot.
    let form = cp
        .http
        .post(format!("{}/v1/session", cp.url))
        .header("content-type", "text/plain")
        .body(serde_json::json!({"token": cp.admin_token}).to_string())
        .send()
        .await
        .unwrap();
    assert!(form.headers().get("set-cookie").is_none(), "no cookie for a form");
    Reply::from(form)
        .await
        .coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("content-type"));

    let admin = as_admin(&cp).await;
    let set = admin.set_cookie.clone().unwrap();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    assert_eq!(
        attrs[1..],
        ["HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age=43200"],
        "{set}"
    );
    let secret = attrs[0].strip_prefix("__Host-berth_session=").unwrap();
    assert!(
        secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "{set}"
    );
    let session = admin.session();
    assert_eq!(session.user, "admin");
    assert_eq!(session.csrf.len(), 64);
    assert!((session.expires_at - (now() + 43200)).abs() <= 5, "{session:?}");
    // The store keeps the secret's hash, never the secret.
    let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM sessions")
        .fetch_all(&cp.store().pool)
        .await
        .unwrap();
    assert_eq!(ids, [hex::encode(Sha256::digest(secret.as_bytes()))]);

    let user = as_user(&cp, "alice").await;
    assert_eq!(user.session().user, "alice");
    assert_ne!(user.cookie(), admin.cookie());

    // The cookie opens the admin API for reading, and tells the page its session.
    let r = get(with_cookie(&cp, Method::GET, "/v1/tokens", &user.cookie())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = get(with_cookie(&cp, Method::GET, "/v1/session", &user.cookie())).await;
    assert_eq!(r.json::<SessionInfo>(), user.session());

    // A change needs the session's own CSRF token.
    let post = |csrf: Option<&str>| {
        let mut b = with_cookie(&cp, Method::POST, "/v1/tokens", &user.cookie()).json(&new_token());
        if let Some(c) = csrf {
            b = b.header("x-csrf-token", c);
        }
        b
    };
    get(post(None))
        .await
        .coded(StatusCode::FORBIDDEN, ErrorCode::CsrfRequired, Some("x-csrf-token"));
    get(post(Some("0".repeat(64).as_str()))).await.coded(
        StatusCode::FORBIDDEN,
        ErrorCode::CsrfRequired,
        Some("x-csrf-token"),
    );
    get(post(Some(&session.csrf)))
        .await
        .coded(StatusCode::FORBIDDEN, ErrorCode::CsrfRequired, Some("x-csrf-token"));
    let before = cp.tokens().await.len();
    let r = get(post(Some(&user.session().csrf))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(cp.tokens().await.len(), before + 1);
    // The bearer token still needs no CSRF token.
    let r = get(cp.admin(Method::POST, "/v1/tokens").json(&new_token())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // What a user changes is told as theirs, in history and events.
    let spec = serde_json::json!({"name": "web", "image": "localhost/berth-test/busybox:latest", "replicas": 0});
    let r = get(with_cookie(&cp, Method::POST, "/v1/services", &user.cookie())
        .header("x-csrf-token", &user.session().csrf)
        .json(&spec))
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = get(cp.admin(Method::GET, "/v1/services/web/releases")).await;
    let releases: Vec<berth_protocol::release::ReleaseInfo> = r.json();
    assert_eq!(releases[0].created_by, "alice", "{releases:?}");
    let r = get(cp.admin(Method::POST, "/v1/services/web/restart")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let releases: Vec<berth_protocol::release::ReleaseInfo> =
        get(cp.admin(Method::GET, "/v1/services/web/releases")).await.json();
    assert_eq!(releases[0].created_by, "admin", "the token is the admin");

    // Signing out needs the token too, clears the cookie and ends the session.
    get(with_cookie(&cp, Method::DELETE, "/v1/session", &user.cookie()))
        .await
        .coded(StatusCode::FORBIDDEN, ErrorCode::CsrfRequired, Some("x-csrf-token"));
    let resp = with_cookie(&cp, Method::DELETE, "/v1/session", &user.cookie())
        .header("x-csrf-token", &user.session().csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        resp.headers()["set-cookie"],
        "__Host-berth_session=; HttpOnly; Secure; SameSite=Strict; Path=/; Max-Age=0"
    );
    for path in ["/v1/tokens", "/v1/session"] {
        get(with_cookie(&cp, Method::GET, path, &user.cookie())).await.coded(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            Some("cookie"),
        );
    }
    // The admin's session is another one and lives on.
    let r = get(with_cookie(&cp, Method::GET, "/v1/nodes", &admin.cookie())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // No cookie, no session; a made-up cookie opens nothing.
    get(cp.http.get(format!("{}/v1/session", cp.url))).await.coded(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        Some("cookie"),
    );
    get(with_cookie(&cp, Method::GET, "/v1/tokens", "__Host-berth_session=00ff"))
        .await
        .coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("cookie"));
    get(cp.http.get(format!("{}/v1/tokens", cp.url))).await.coded(
        StatusCode::UNAUTHORIZED,
        ErrorCode::Unauthorized,
        Some("authorization"),
    );

    // Every response, refusals and unknown paths included, forbids sniffing and referrers.
    for path in ["/healthz", "/v1/tokens", "/v1/nope"] {
        let resp = cp.http.get(format!("{}{path}", cp.url)).send().await.unwrap();
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(resp.headers()["referrer-policy"], "no-referrer", "{path}");
    }
    // A body that is neither a token nor a user and password.
    let bad = sign_in(&cp, serde_json::json!({"token": "x", "user": "alice"})).await;
    bad.reply
        .coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("body"));
}

/// A client whose connections come from `ip` (a loopback address).
fn client_from(cp: &Cp, ip: &str) -> reqwest::Client {
    let ca = std::fs::read(&cp.started.ca_file).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .tls_built_in_root_certs(false)
        .use_rustls_tls()
        .local_address(ip.parse::<std::net::IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn wrong_credentials_are_refused_alike_and_repeated_failures_wait(db: &Db) {
    let cp = Cp::start(db).await;
    add_user(&cp, "alice").await;
    add_user(&cp, "bob").await;
    let tries = [
        serde_json::json!({"user": "alice", "password": "not the password"}),
        serde_json::json!({"user": "mallory", "password": PASSWORD}),
        serde_json::json!({"token": "0".repeat(64)}),
    ];
    let mut seen = vec![];
    for t in &tries {
        let s = sign_in(&cp, t.clone()).await;
        let err = s.reply.coded(
            StatusCode::UNAUTHORIZED,
            ErrorCode::InvalidCredentials,
            Some("credentials"),
        );
        assert!(s.set_cookie.is_none());
        assert!(s.elapsed >= Duration::from_millis(400), "{t}: took {:?}", s.elapsed);
        seen.push((s.reply.status, err));
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:#?}");

    // Two more from this address make five; the sixth waits, right password or not.
    for _ in 0..2 {
        let s = sign_in(&cp, tries[0].clone()).await;
        assert_eq!(s.reply.status, StatusCode::UNAUTHORIZED, "{}", s.reply.body);
    }
    let limited = |s: &SignIn| {
        let err = s.reply.coded(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::TooManyAttempts,
            Some("credentials"),
        );
        assert!(err.error.contains("try again in"), "{}", err.error);
        assert!(s.set_cookie.is_none());
    };
    limited(&sign_in(&cp, serde_json::json!({"user": "alice", "password": PASSWORD})).await);
    // By address: bob, and the token, are refused from here too ...
    limited(&sign_in(&cp, serde_json::json!({"user": "bob", "password": PASSWORD})).await);
    limited(&sign_in(&cp, serde_json::json!({"token": cp.admin_token})).await);
    // ... and by name, from any address: alice has three failures, two more make five.
    let elsewhere = client_from(&cp, "127.0.0.2");
    for _ in 0..2 {
        let s = sign_in_with(
            &elsewhere,
            &cp,
            serde_json::json!({"user": "alice", "password": "wrong again"}),
        )
        .await;
        assert_eq!(s.reply.status, StatusCode::UNAUTHORIZED, "{}", s.reply.body);
    }
    limited(
        &sign_in_with(
            &elsewhere,
            &cp,
            serde_json::json!({"user": "alice", "password": PASSWORD}),
        )
        .await,
    );
    // That other address may still sign in as someone else.
    let s = sign_in_with(
        &elsewhere,
        &cp,
        serde_json::json!({"user": "bob", "password": PASSWORD}),
    )
    .await;
    assert_eq!(s.reply.status, StatusCode::OK, "{}", s.reply.body);
    assert_eq!(s.session().user, "bob");
}

async fn removing_a_user_ends_its_sessions(db: &Db) {
    let cp = Cp::start(db).await;
    add_user(&cp, "alice").await;
    add_user(&cp, "bob").await;
    let a1 = as_user(&cp, "alice").await;
    let a2 = as_user(&cp, "alice").await;
    let b = as_user(&cp, "bob").await;

    let removed: UserRemoved = get(cp.admin(Method::DELETE, "/v1/users/alice")).await.json();
    assert_eq!(
        removed,
        UserRemoved {
            removed: "alice".into(),
            sessions_ended: 2
        }
    );
    for s in [&a1, &a2] {
        get(with_cookie(&cp, Method::GET, "/v1/nodes", &s.cookie()))
            .await
            .coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("cookie"));
    }
    let r = get(with_cookie(&cp, Method::GET, "/v1/nodes", &b.cookie())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let s = sign_in(&cp, serde_json::json!({"user": "alice", "password": PASSWORD})).await;
    s.reply.coded(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidCredentials,
        Some("credentials"),
    );

    get(cp.admin(Method::DELETE, "/v1/users/alice")).await.coded(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        Some("name"),
    );
    let r = get(cp.admin(Method::GET, "/v1/users")).await;
    assert!(!r.body.contains("argon2") && !r.body.contains("hash"), "{}", r.body);
    let users: Vec<UserInfo> = r.json();
    assert_eq!(users.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["bob"]);
    // A user signed in by cookie may remove users too (with the CSRF token).
    let r =
        get(with_cookie(&cp, Method::DELETE, "/v1/users/bob", &b.cookie()).header("x-csrf-token", &b.session().csrf))
            .await;
    assert_eq!(r.json::<UserRemoved>().sessions_ended, 1);
}

async fn expired_sessions_are_refused_and_deleted(db: &Db) {
    let cp = Cp::start(db).await;
    let old = as_admin(&cp).await;
    let fresh = as_admin(&cp).await;
    let old_id = hex::encode(Sha256::digest(
        old.cookie().strip_prefix("__Host-berth_session=").unwrap(),
    ));
    sqlx::query("UPDATE sessions SET expires_at = $1 WHERE id = $2")
        .bind(now() - 1)
        .bind(&old_id)
        .execute(&cp.store().pool)
        .await
        .unwrap();
    for path in ["/v1/nodes", "/v1/session"] {
        get(with_cookie(&cp, Method::GET, path, &old.cookie())).await.coded(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            Some("cookie"),
        );
    }
    let left: Vec<String> = sqlx::query_scalar("SELECT id FROM sessions")
        .fetch_all(&cp.store().pool)
        .await
        .unwrap();
    assert!(!left.contains(&old_id), "the expired session was deleted on lookup");
    assert_eq!(left.len(), 1);
    let r = get(with_cookie(&cp, Method::GET, "/v1/nodes", &fresh.cookie())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The periodic prune takes what has expired by then, and only that.
    assert_eq!(cp.store().prune_sessions(now()).await.unwrap(), 0);
    assert_eq!(cp.store().prune_sessions(now() + 43_201).await.unwrap(), 1);
}

async fn user_names_and_passwords_are_checked(db: &Db) {
    let cp = Cp::start(db).await;
    let post = |body: serde_json::Value| cp.admin(Method::POST, "/v1/users").json(&body);
    for name in ["Alice", "a b", "", "admin", &"a".repeat(64)] {
        let r = get(post(serde_json::json!({"name": name, "password": PASSWORD}))).await;
        r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("name"));
    }
    let r = get(post(serde_json::json!({"name": "alice", "password": "123456789"}))).await;
    r.error(StatusCode::BAD_REQUEST, "password: 9 characters; at least 10");
    let r = get(post(
        serde_json::json!({"name": "alice", "password": PASSWORD, "admin": true}),
    ))
    .await;
    r.coded(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, Some("body"));
    add_user(&cp, "alice").await;
    let r = get(post(
        serde_json::json!({"name": "alice", "password": "another password"}),
    ))
    .await;
    r.coded(StatusCode::CONFLICT, ErrorCode::UserExists, Some("name"));
    // Only the admin adds users.
    let r = get(cp
        .http
        .post(format!("{}/v1/users", cp.url))
        .json(&serde_json::json!({"name": "eve", "password": PASSWORD})))
    .await;
    r.coded(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, Some("authorization"));
    let users: Vec<UserInfo> = get(cp.admin(Method::GET, "/v1/users")).await.json();
    assert_eq!(users.len(), 1);
    assert!((users[0].created_at - now()).abs() <= 5);
}

async fn a_cookie_websocket_must_come_from_this_control_planes_origin(db: &Db) {
    let cp = Cp::start(db).await;
    let admin = as_admin(&cp).await;
    // No service "web": a request that gets past authentication is a 404.
    let path = "/v1/services/web/exec?cmd=%5B%22sh%22%5D";
    let cookie = ("cookie", admin.cookie());
    let own = format!("https://{}", cp.started.addr);
    for origin in [None, Some("https://evil.example".to_string()), Some(format!("{own}1"))] {
        let mut headers = vec![cookie.clone()];
        if let Some(o) = &origin {
            headers.push(("origin", o.clone()));
        }
        let (status, body) = ws(&cp, path, &headers).await.unwrap_err();
        assert_eq!(status, 403, "{origin:?}: {body}");
        let err: berth_protocol::ApiError = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (err.code, err.field.as_deref()),
            (ErrorCode::CrossOrigin, Some("origin"))
        );
    }
    let (status, body) = ws(&cp, path, &[cookie.clone(), ("origin", own)]).await.unwrap_err();
    assert_eq!(status, 404, "{body}");
    // The bearer token is no browser's: no Origin asked.
    let bearer = ("authorization", format!("Bearer {}", cp.admin_token));
    let (status, body) = ws(&cp, path, &[bearer]).await.unwrap_err();
    assert_eq!(status, 404, "{body}");
}

async fn parallel_failures_cannot_outrun_the_limit(db: &Db) {
    let cp = Cp::start(db).await;
    add_user(&cp, "alice").await;
    // Eight at once: each is counted before its password is checked, so
    // only five get as far as a check.
    let tries = (0..8).map(|_| sign_in(&cp, serde_json::json!({"user": "alice", "password": "guess guess"})));
    let mut statuses: Vec<u16> = futures_util::future::join_all(tries)
        .await
        .iter()
        .map(|s| s.reply.status.as_u16())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429, 429]);
}
