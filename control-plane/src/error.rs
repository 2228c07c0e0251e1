//! API errors: `{"error": "...", "code": "...", "field": "..."}` with the
//! right status. The code and the field are set where the error is made,
//! never read back from the message.

use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use berth_protocol::{ApiError, ErrorCode, FieldError};

#[derive(Debug)]
pub struct ApiErr {
    pub status: StatusCode,
    pub code: ErrorCode,
    /// The input the error is about; the message starts with it.
    pub field: Option<String>,
    pub message: String,
}

impl ApiErr {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiErr {
            status,
            code,
            field: None,
            message: message.into(),
        }
    }

    /// Names the input the error is about (the message already starts with it).
    pub fn on(mut self, field: impl Into<String>) -> Self {
        let field = field.into();
        debug_assert!(
            self.message.starts_with(&format!("{field}:")),
            "{:?} does not start with its field {field:?}",
            self.message
        );
        self.field = Some(field);
        self
    }

    /// 400 `invalid_field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, message).on(field)
    }
    /// 401 `unauthorized`.
    pub fn unauthorized(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message).on(field)
    }
    /// 404 `not_found`.
    pub fn not_found(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message).on(field)
    }
    /// 409 with `code`.
    pub fn conflict(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 500 `internal`; the cause goes to the log only.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "internal error; see the control plane's log",
        )
    }

    /// A body that could not be read: too large (413) or cut short.
    pub fn body(e: &BytesRejection, message: String) -> Self {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::BodyTooLarge
        } else {
            ErrorCode::InvalidField
        };
        Self::new(e.status(), code, message).on("body")
    }
}

/// A refused input: 400 `invalid_field`, naming it.
impl From<FieldError> for ApiErr {
    fn from(e: FieldError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, e.message).on(e.field)
    }
}

impl From<sqlx::Error> for ApiErr {
    fn from(e: sqlx::Error) -> Self {
        ApiErr::internal(e)
    }
}

impl IntoResponse for ApiErr {
    fn into_response(self) -> Response {
        let body = ApiError {
            error: self.message,
            code: self.code,
            field: self.field,
            detail: None,
        };
        (self.status, Json(body)).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiErr>;

/// Parses a JSON body; serde's message says what is wrong with it.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiErr::invalid("body", format!("body: {e}")))
}
