//! Dashboard users and browser sessions: `POST/GET/DELETE /v1/users` for
//! the admin, and `POST/GET/DELETE /v1/session` for signing in with a
//! password or the admin token (see docs/dashboard.md).

use crate::error::FieldError;
use crate::names::validate_dns_label;
use serde::{Deserialize, Serialize};

/// The cookie a session travels in. The `__Host-` prefix makes browsers
/// refuse it unless it is Secure, has Path=/ and no Domain, so a sibling
/// subdomain cannot plant one of its own (cookie tossing).
pub const SESSION_COOKIE: &str = "__Host-berth_session";
/// The header every cookie-authenticated request other than GET, HEAD and
/// OPTIONS must carry, holding the session's `csrf` token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// The session user of a sign-in with the admin token; no user may take it.
pub const ADMIN_USER: &str = "admin";
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest password accepted (hashing is bounded too).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// `POST /v1/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub name: String,
    pub password: String,
}

/// A user as `GET /v1/users` lists it (never its password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserInfo {
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// `DELETE /v1/users/NAME`: the user is gone, and so are its sessions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserRemoved {
    pub removed: String,
    pub sessions_ended: u64,
}

/// `POST /v1/session`: `{"token": ADMIN_TOKEN}` or `{"user": NAME, "password": ...}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

/// A signed-in session, as `POST` and `GET /v1/session` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionInfo {
    /// The user's name, or `admin` for a sign-in with the admin token.
    pub user: String,
    /// What to send in `x-csrf-token` with every request that changes something.
    pub csrf: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A user name: a DNS label like every other name, and not `admin`.
pub fn validate_user_name(name: &str) -> Result<(), FieldError> {
    validate_dns_label("name", name)?;
    if name == ADMIN_USER {
        return Err(FieldError::new(
            "name",
            "\"admin\" is reserved for sign-ins with the admin token",
        ));
    }
    Ok(())
}

/// A new password: at least [`MIN_PASSWORD_CHARS`] characters.
pub fn validate_password(password: &str) -> Result<(), FieldError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(FieldError::new(
            "password",
            format_args!("{chars} characters; at least {MIN_PASSWORD_CHARS} are needed"),
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(FieldError::new(
            "password",
            format_args!("longer than {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_passwords_are_checked_and_name_their_field() {
        assert!(validate_user_name("alice").is_ok());
        assert_eq!(validate_user_name("Alice").unwrap_err().field, "name");
        assert_eq!(validate_user_name("admin").unwrap_err().field, "name");
        assert_eq!(validate_user_name("").unwrap_err().field, "name");
        assert!(validate_password("0123456789").is_ok());
        assert!(validate_password("éééééééééé").is_ok(), "characters, not bytes");
        assert_eq!(validate_password("012345678").unwrap_err().field, "password");
        assert!(validate_password(&"x".repeat(MAX_PASSWORD_BYTES + 1)).is_err());
    }

    #[test]
    fn a_login_is_a_token_or_a_user_and_password() {
        let t: LoginRequest = serde_json::from_str(r#"{"token":"t"}"#).unwrap();
        assert_eq!(t.token.as_deref(), Some("t"));
        let u: LoginRequest = serde_json::from_str(r#"{"user":"a","password":"p"}"#).unwrap();
        assert_eq!((u.user.as_deref(), u.password.as_deref()), (Some("a"), Some("p")));
        assert!(serde_json::from_str::<LoginRequest>(r#"{"username":"a"}"#).is_err());
    }
}
