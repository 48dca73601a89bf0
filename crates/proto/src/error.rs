//! Domain errors on the wire.
//!
//! Every error status carries a `google.rpc.ErrorInfo` with `reason` = the stable
//! [`ErrorCode`] string and domain `suanli.v1`, a `google.rpc.BadRequest` listing each invalid
//! field when there are any, and the same code in the `x-suanli-error` metadata for tools
//! that do not decode details (grpcurl, logs). The table is documented in
//! `proto/suanli/v1/errors.md`; a test keeps the two in step.

use std::collections::HashMap;

use suanli_types::{DomainError, ErrorCode, FieldError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const ERROR_DOMAIN: &str = "suanli.v1";
pub const ERROR_METADATA_KEY: &str = "x-suanli-error";

/// The gRPC status code for each stable error code (`ErrorCode::transport`, the one table).
pub fn grpc_code(code: ErrorCode) -> Code {
    Code::from_i32(code.grpc_status() as i32)
}

pub fn status(code: ErrorCode, message: impl Into<String>, fields: &[FieldError]) -> Status {
    let mut details = ErrorDetails::with_error_info(code.as_str(), ERROR_DOMAIN, HashMap::new());
    for f in fields {
        details.add_bad_request_violation(f.field.clone(), f.problem.clone());
    }
    let mut status = Status::with_error_details(grpc_code(code), message, details);
    if let Ok(value) = code.as_str().parse() {
        status.metadata_mut().insert(ERROR_METADATA_KEY, value);
    }
    status
}

pub fn to_status(err: &DomainError) -> Status {
    status(err.code(), err.to_string(), err.field_errors())
}

/// A decoded error status, as a client sees it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub fields: Vec<FieldError>,
}

/// Reads the stable code back from a status; statuses from outside our services (a proxy, a
/// transport failure) map to `UNAVAILABLE` or `INTERNAL` by their gRPC code.
pub fn decode_status(status: &Status) -> ApiError {
    let details = status.get_error_details();
    let code = details.error_info().as_ref().filter(|info| info.domain == ERROR_DOMAIN).and_then(|info| ErrorCode::parse(&info.reason)).unwrap_or(match status
        .code()
    {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    });
    let fields = details
        .bad_request()
        .as_ref()
        .map(|b| b.field_violations.iter().map(|v| FieldError::new(v.field.clone(), v.description.clone())).collect())
        .unwrap_or_default();
    ApiError { code, message: status.message().to_owned(), fields }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_a_status() {
        for code in ErrorCode::ALL {
            let fields = [FieldError::new("listing.title", "must not be empty")];
            let decoded = decode_status(&status(*code, "msg", &fields));
            assert_eq!(decoded.code, *code);
            assert_eq!(decoded.fields, fields);
        }
    }

    #[test]
    fn errors_md_documents_every_code_with_its_grpc_and_http_status() {
        let doc = include_str!("../../../proto/suanli/v1/errors.md");
        for code in ErrorCode::ALL {
            let row = format!("| `{}` | `{:?}` | {} |", code.as_str(), grpc_code(*code), code.http_status());
            assert!(doc.contains(&row), "errors.md lacks the row starting {row}");
        }
    }

    #[test]
    fn foreign_statuses_are_classified() {
        assert_eq!(decode_status(&Status::unavailable("no leader")).code, ErrorCode::Unavailable);
        assert_eq!(decode_status(&Status::unknown("?")).code, ErrorCode::Internal);
    }
}
