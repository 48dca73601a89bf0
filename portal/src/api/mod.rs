//! The REST/JSON API under `/api/v1`. Every page's data comes from these handlers' service
//! functions; every error is the one JSON format of `crate::error`.

pub mod accounts;
pub mod alerts;
pub mod annotation;
pub mod datasets;
pub mod federation;
pub mod image_search;
pub mod jobs;
pub mod market;
pub mod models;
pub mod operations;
pub mod operator;
pub mod services;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// `Json<T>` whose rejections are answered in the portal's error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::field("body", "send Content-Type: application/json")),
            Err(JsonRejection::BytesRejection(e)) if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(crate::error::Code::PayloadTooLarge, "the request body is too large"))
            }
            Err(e) => Err(ApiError::field("body", e.body_text())),
        }
    }
}

pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e @ QueryRejection::FailedToDeserializeQueryString(_)) => Err(ApiError::field("query", e.body_text())),
            Err(e) => Err(ApiError::field("query", e.body_text())),
        }
    }
}

pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e @ PathRejection::FailedToDeserializePathParams(_)) => Err(ApiError::field("path", e.body_text())),
            Err(e) => Err(ApiError::internal(e.body_text())),
        }
    }
}

/// A request ID for the broker derived from what identifies the action, so a retried click
/// cannot apply twice; or a fresh one where each call is a new action.
pub fn request_id(parts: &[&str]) -> String {
    let mut id = parts.join("-");
    id.retain(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    id.truncate(64);
    id
}

/// The broker request ID of a user's action: derived from the client's idempotency key when
/// it sent one (so its retry applies once), fresh otherwise.
pub fn idempotency_key(prefix: &str, user: crate::model::UserId, client_key: Option<&str>) -> String {
    match client_key {
        Some(key) => request_id(&[prefix, &user.0.to_string(), key]),
        None => fresh_request_id(prefix),
    }
}

pub fn fresh_request_id(prefix: &str) -> String {
    format!("{prefix}-{}", crate::crypto::random_token(12).replace(['-', '_'], "x"))
}
