//! One error format for every REST endpoint:
//!
//! ```json
//! {"error": {"code": "INVALID_ARGUMENT", "message": "…", "fields": [{"field": "id_number", "problem": "…"}]}}
//! ```
//!
//! `code` is stable (the table is in `portal/API.md`; a test keeps it in step); clients switch on
//! it, never on the message. Broker errors keep the broker's code.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use suanli_types::{ErrorCode, FieldError};
use utoipa::ToSchema;

/// Codes of the portal's own; the broker's codes pass through unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Broker(ErrorCode),
    CsrfFailed,
    AccountNotActivated,
    AccountPendingReview,
    AccountDisabled,
    MfaRequired,
    MfaInvalid,
    TooManyAttempts,
    TokenInvalid,
    RoleConflict,
    PayloadTooLarge,
    QuotaExceeded,
    UploadOffsetMismatch,
    UploadIncomplete,
    ChecksumMismatch,
    BadImage,
    TaskNotHeld,
    StaleRevision,
    ServiceGone,
}

/// The portal's own codes with their HTTP status, for the documentation test.
pub const PORTAL_CODES: &[(Code, &str)] = &[
    (Code::CsrfFailed, "CSRF_FAILED"),
    (Code::AccountNotActivated, "ACCOUNT_NOT_ACTIVATED"),
    (Code::AccountPendingReview, "ACCOUNT_PENDING_REVIEW"),
    (Code::AccountDisabled, "ACCOUNT_DISABLED"),
    (Code::MfaRequired, "MFA_REQUIRED"),
    (Code::MfaInvalid, "MFA_INVALID"),
    (Code::TooManyAttempts, "TOO_MANY_ATTEMPTS"),
    (Code::TokenInvalid, "TOKEN_INVALID"),
    (Code::RoleConflict, "ROLE_CONFLICT"),
    (Code::PayloadTooLarge, "PAYLOAD_TOO_LARGE"),
    (Code::QuotaExceeded, "QUOTA_EXCEEDED"),
    (Code::UploadOffsetMismatch, "UPLOAD_OFFSET_MISMATCH"),
    (Code::UploadIncomplete, "UPLOAD_INCOMPLETE"),
    (Code::ChecksumMismatch, "CHECKSUM_MISMATCH"),
    (Code::BadImage, "BAD_IMAGE"),
    (Code::TaskNotHeld, "TASK_NOT_HELD"),
    (Code::StaleRevision, "STALE_REVISION"),
    (Code::ServiceGone, "SERVICE_GONE"),
];

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Broker(c) => c.as_str(),
            other => PORTAL_CODES.iter().find(|(c, _)| *c == other).map_or("INTERNAL", |(_, s)| s),
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::Broker(c) => StatusCode::from_u16(c.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Code::CsrfFailed | Code::AccountNotActivated | Code::AccountPendingReview | Code::AccountDisabled | Code::RoleConflict => StatusCode::FORBIDDEN,
            Code::MfaRequired | Code::MfaInvalid => StatusCode::UNAUTHORIZED,
            Code::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
            Code::TokenInvalid | Code::BadImage => StatusCode::BAD_REQUEST,
            Code::PayloadTooLarge | Code::QuotaExceeded => StatusCode::PAYLOAD_TOO_LARGE,
            Code::UploadOffsetMismatch | Code::UploadIncomplete | Code::TaskNotHeld | Code::StaleRevision => StatusCode::CONFLICT,
            // tus' checksum extension answers a mismatch with 460.
            Code::ServiceGone => StatusCode::GONE,
            Code::ChecksumMismatch => StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub fields: Vec<FieldError>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), fields: Vec::new() }
    }
    pub fn broker(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError::new(Code::Broker(code), message)
    }
    pub fn unauthenticated() -> ApiError {
        ApiError::broker(ErrorCode::Unauthenticated, "log in first, or send an API token")
    }
    pub fn forbidden(why: impl Into<String>) -> ApiError {
        ApiError::broker(ErrorCode::PermissionDenied, why)
    }
    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::broker(ErrorCode::NotFound, format!("{} not found", what.into()))
    }
    pub fn invalid(fields: Vec<FieldError>) -> ApiError {
        let message = fields.iter().map(|f| format!("{}: {}", f.field, f.problem)).collect::<Vec<_>>().join("; ");
        ApiError { code: Code::Broker(ErrorCode::InvalidArgument), message, fields }
    }
    pub fn field(field: &str, problem: impl Into<String>) -> ApiError {
        ApiError::invalid(vec![FieldError::new(field, problem.into())])
    }
    pub fn conflict_field(field: &str, problem: impl Into<String>) -> ApiError {
        let problem = problem.into();
        ApiError { code: Code::Broker(ErrorCode::AlreadyExists), message: format!("{field}: {problem}"), fields: vec![FieldError::new(field, problem)] }
    }
    pub fn internal(what: impl std::fmt::Display) -> ApiError {
        tracing::error!("internal error: {what}");
        ApiError::broker(ErrorCode::Internal, "internal error; it has been logged")
    }
    pub fn unavailable(what: impl std::fmt::Display) -> ApiError {
        tracing::warn!("dependency unavailable: {what}");
        ApiError::broker(ErrorCode::Unavailable, format!("try again shortly: {what}"))
    }
}

/// Collects every problem of a request before answering, so a form shows all of them at once.
#[derive(Default)]
pub struct Problems(pub Vec<FieldError>);

impl Problems {
    pub fn add(&mut self, field: &str, problem: impl Into<String>) {
        self.0.push(FieldError::new(field, problem.into()));
    }
    /// Records `result`'s problem under `field`, returning the value when there is none.
    pub fn check<T>(&mut self, field: &str, result: Result<T, &'static str>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(problem) => {
                self.add(field, problem);
                None
            }
        }
    }
    pub fn finish(self) -> ApiResult<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(self.0))
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: see portal/API.md.
    pub code: String,
    pub message: String,
    pub fields: Vec<FieldProblem>,
}

#[derive(Serialize, ToSchema)]
pub struct FieldProblem {
    pub field: String,
    pub problem: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_owned(),
                message: self.message,
                fields: self.fields.into_iter().map(|f| FieldProblem { field: f.field, problem: f.problem }).collect(),
            },
        };
        (self.code.status(), axum::Json(body)).into_response()
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => ApiError::unavailable(format!("database: {e}")),
            other => ApiError::internal(format!("database: {other}")),
        }
    }
}

impl From<crate::crypto::CryptoError> for ApiError {
    fn from(e: crate::crypto::CryptoError) -> ApiError {
        ApiError::internal(e)
    }
}

impl From<suanli_proto::ApiError> for ApiError {
    fn from(e: suanli_proto::ApiError) -> ApiError {
        ApiError { code: Code::Broker(e.code), message: e.message, fields: e.fields }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> ApiError {
        suanli_proto::decode_status(&s).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// API.md lists every code the portal can answer with, with the HTTP status it uses.
    #[test]
    fn every_code_is_documented_with_its_status() {
        let doc = include_str!("../API.md");
        let codes = ErrorCode::ALL.iter().map(|c| Code::Broker(*c)).chain(PORTAL_CODES.iter().map(|(c, _)| *c));
        for code in codes {
            let row = format!("| `{}` | {} |", code.as_str(), code.status().as_u16());
            assert!(doc.contains(&row), "API.md lacks the row {row}");
        }
    }
}
