//! Errors: the body of every failed API call ([`ApiError`], with a stable
//! [`ErrorCode`]), and [`FieldError`], what the validators here return.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Error body of every failed API call:
/// `{"error": "name: ...", "code": "name_taken", "field": "name"}`.
///
/// `error` is for people and may change; `code` and `field` are for
/// programs and do not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// What went wrong, in a sentence that starts with the field it is
    /// about (`"ttl_secs: 5 is outside ..."`) when there is one.
    pub error: String,
    /// The kind of failure. Absent (from something that is not a Berth
    /// control plane) reads as [`ErrorCode::Unknown`].
    #[serde(default)]
    pub code: ErrorCode,
    /// The request field, query parameter, path segment or header the
    /// error is about, e.g. `name`, `port`, `body`, `x-berth-nonce`; absent
    /// when it is about none in particular.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// More about the failure, as any JSON value, when there is more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)
    }
}

impl std::error::Error for ApiError {}

/// Why an API call failed, stable across releases (new codes may be added).
/// Each is sent with one HTTP status, except where two are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: a value is malformed, of the wrong type or out of range, or the
    /// body or query does not parse (`field`: `body`, `query`); also a
    /// registration whose `proxy` flag does not match its token, and a
    /// service whose replicas cannot be placed (`nodes`, `replicas`).
    InvalidField,
    /// 401: no or a wrong admin token (`authorization`); a node request
    /// whose signature or session MAC is missing, malformed, stale,
    /// replayed or from an unknown node (`x-berth-*`); a join token that is malformed, unknown
    /// or from another control plane (`token`); a session cookie that is
    /// unknown, ended or expired (`cookie`).
    Unauthorized,
    /// 401 when registering with it, 409 when revoking it: the join token
    /// was already used.
    TokenUsed,
    /// 401 when registering with it, 409 when revoking it again: the join
    /// token was revoked.
    TokenRevoked,
    /// 401: registering with a join token past its lifetime.
    TokenExpired,
    /// 404: no such node, service, token, domain, TCP route, canary node or
    /// release file; or no such endpoint (`path`).
    NotFound,
    /// 409: the node name, domain or TCP port is already taken (`name`,
    /// `domain`, `listen`).
    NameTaken,
    /// 409: the request clashes with the fleet as it is: a key already
    /// registered to another node (`signing_key`, `wg_public_key`), or no
    /// nodes to upgrade.
    Conflict,
    /// 409: the service still receives traffic from domains or TCP routes;
    /// remove those first.
    StillRouted,
    /// 409: a node's container subnet has no free address left (`replicas`).
    SubnetFull,
    /// 410: the node was removed from the fleet (`node`).
    Gone,
    /// 413: the body is larger than the endpoint accepts (`body`).
    BodyTooLarge,
    /// 422: a domain or TCP route names a service that does not exist (`service`).
    UnknownService,
    /// 422: no signed release of that version on this control plane (`version`).
    UnknownRelease,
    /// 500: a fault on the control plane's side; its log has the cause.
    Internal,
    /// 503: no free mesh address or container subnet left in the pool.
    PoolExhausted,
    /// 502: the fleet registry did not answer as it should (`registry`).
    RegistryUnavailable,
    /// 503: no builder node is ready for the build: none of the right
    /// architecture asked for work in the last minute (`builder`).
    NoBuilder,
    /// 429: the node or the admin has as many live streams (`berth logs`,
    /// `berth exec`) as allowed; one must end first (`streams`).
    TooManyStreams,
    /// 504: the replica's node is offline, or did not open the stream it
    /// was asked for in time (`node`).
    NodeUnreachable,
    /// 409: a dashboard user of that name already exists (`name`).
    UserExists,
    /// 401: a sign-in (`POST /v1/session`) with a wrong password, an
    /// unknown user or a wrong admin token; one message for all three
    /// (`credentials`).
    InvalidCredentials,
    /// 429: too many failed sign-ins from this address or for this user
    /// lately; the message says when to try again (`credentials`).
    TooManyAttempts,
    /// 403: a request authenticated by the session cookie that changes
    /// something came without the session's `x-csrf-token`.
    CsrfRequired,
    /// 403: a WebSocket authenticated by the session cookie whose `Origin`
    /// is not this control plane's own `Host` (`origin`).
    CrossOrigin,
    /// 405: the path exists but not with this method; the `Allow` header
    /// lists the methods it takes (`method`).
    MethodNotAllowed,
    /// 401: a node request's session (`x-berth-session`) is not one this
    /// control plane holds: it expired, was opened on another control plane
    /// or before a restart, or belongs to another node. Open a new one
    /// (`POST /v1/agent/session`) and send the request again.
    SessionInvalid,
    /// Never sent: what a client reads for a code newer than itself, or for
    /// an error body without one.
    #[default]
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenUsed => "token_used",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::Conflict => "conflict",
            ErrorCode::StillRouted => "still_routed",
            ErrorCode::SubnetFull => "subnet_full",
            ErrorCode::Gone => "gone",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::UnknownService => "unknown_service",
            ErrorCode::UnknownRelease => "unknown_release",
            ErrorCode::Internal => "internal",
            ErrorCode::PoolExhausted => "pool_exhausted",
            ErrorCode::RegistryUnavailable => "registry_unavailable",
            ErrorCode::NoBuilder => "no_builder",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::NodeUnreachable => "node_unreachable",
            ErrorCode::UserExists => "user_exists",
            ErrorCode::InvalidCredentials => "invalid_credentials",
            ErrorCode::TooManyAttempts => "too_many_attempts",
            ErrorCode::CsrfRequired => "csrf_required",
            ErrorCode::CrossOrigin => "cross_origin",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::SessionInvalid => "session_invalid",
            ErrorCode::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A refused input, naming its field. Displays as the whole message
/// (`"port: must be 1-65535"`), which always starts with `field: `.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    /// The whole message, field prefix included.
    pub message: String,
}

impl FieldError {
    /// `FieldError::new("port", "must be 1-65535")` reads "port: must be 1-65535".
    pub fn new(field: impl Into<String>, what: impl fmt::Display) -> FieldError {
        let field = field.into();
        FieldError {
            message: format!("{field}: {what}"),
            field,
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FieldError {}

/// For callers that collect errors as text (`Result<_, String>` and `?`).
impl From<FieldError> for String {
    fn from(e: FieldError) -> String {
        e.message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_unknown_ones_still_parse() {
        let e = ApiError {
            error: "name: taken".into(),
            code: ErrorCode::NameTaken,
            field: Some("name".into()),
            detail: None,
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": "name: taken", "code": "name_taken", "field": "name"})
        );
        assert_eq!(serde_json::from_value::<ApiError>(json).unwrap(), e);
        let newer: ApiError = serde_json::from_str(r#"{"error": "x", "code": "from_the_future"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
        let bare: ApiError = serde_json::from_str(r#"{"error": "x"}"#).unwrap();
        assert_eq!((bare.code, bare.field), (ErrorCode::Unknown, None));
        assert_eq!(format!("[{:<14}]", ErrorCode::Gone), "[gone          ]");
        use ErrorCode::*;
        for c in [
            InvalidField,
            Unauthorized,
            TokenUsed,
            TokenRevoked,
            TokenExpired,
            NotFound,
            NameTaken,
            Conflict,
            StillRouted,
            SubnetFull,
            Gone,
            BodyTooLarge,
            UnknownService,
            UnknownRelease,
            Internal,
            PoolExhausted,
            RegistryUnavailable,
            NoBuilder,
            TooManyStreams,
            NodeUnreachable,
            UserExists,
            InvalidCredentials,
            TooManyAttempts,
            CsrfRequired,
            CrossOrigin,
            MethodNotAllowed,
            SessionInvalid,
            Unknown,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    #[test]
    fn field_errors_read_as_their_message() {
        let e = FieldError::new("port", "must be 1-65535");
        assert_eq!(e.to_string(), "port: must be 1-65535");
        assert_eq!(e.field, "port");
        let s: String = e.into();
        assert_eq!(s, "port: must be 1-65535");
    }
}
