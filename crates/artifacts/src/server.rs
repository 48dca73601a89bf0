//! The artifact store over HTTP.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::store::{Digest, Store, StoreError};
use crate::ErrorCode;

struct Shared {
    store: Arc<dyn Store>,
    token: String,
}

/// The router: `PUT /v1/artifacts`, `GET`/`HEAD /v1/artifacts/{sha256}`, all behind
/// `Authorization: Bearer <token>`.
pub fn router(store: Arc<dyn Store>, token: &str) -> Router {
    let shared = Arc::new(Shared { store, token: token.to_owned() });
    Router::new()
        .route("/v1/artifacts", put(upload))
        .route("/v1/artifacts/{digest}", get(download).head(download))
        .with_state(shared)
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Stored {
    pub sha256: String,
    pub size: u64,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    let status = match code {
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::InvalidDigest => StatusCode::BAD_REQUEST,
        ErrorCode::ChecksumMismatch => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::RangeNotSatisfiable => StatusCode::RANGE_NOT_SATISFIABLE,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Storage => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (status, axum::Json(ErrorBody { code: code.as_str(), message: message.into() })).into_response()
}

fn store_error(e: StoreError) -> Response {
    let code = match &e {
        StoreError::InvalidDigest(_) => ErrorCode::InvalidDigest,
        StoreError::NotFound(_) => ErrorCode::NotFound,
        StoreError::ChecksumMismatch { .. } => ErrorCode::ChecksumMismatch,
        StoreError::TooLarge { .. } => ErrorCode::TooLarge,
        StoreError::Io(io) => {
            tracing::error!(error = %io, "artifact store");
            ErrorCode::Storage
        }
    };
    error(code, e.to_string())
}

/// The refusal to send when the bearer token is missing or wrong.
fn unauthorized(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    let ok: bool = presented.as_bytes().ct_eq(shared.token.as_bytes()).into();
    (!ok || shared.token.is_empty()).then(|| error(ErrorCode::Unauthenticated, "send `Authorization: Bearer <artifact token>`"))
}

#[derive(Deserialize)]
struct UploadQuery {
    sha256: Option<String>,
}

async fn upload(State(shared): State<Arc<Shared>>, Query(q): Query<UploadQuery>, request: Request) -> Response {
    if let Some(r) = unauthorized(&shared, request.headers()) {
        return r;
    }
    let expected = match q.sha256.as_deref().map(str::parse::<Digest>).transpose() {
        Ok(e) => e,
        Err(e) => return store_error(e),
    };
    let stream = request.into_body().into_data_stream().map_err(std::io::Error::other);
    match shared.store.put(Box::new(StreamReader::new(stream)), expected).await {
        Ok((digest, size)) => (StatusCode::CREATED, axum::Json(Stored { sha256: digest.to_hex(), size })).into_response(),
        Err(e) => store_error(e),
    }
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` within `size`; `None` when unsatisfiable.
pub fn parse_range(raw: &str, size: u64) -> Option<(u64, u64)> {
    let spec = raw.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // one range per request
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok()?;
            if n == 0 {
                return None;
            }
            (size.saturating_sub(n), size.checked_sub(1)?)
        }
        (a, "") => (a.parse().ok()?, size.checked_sub(1)?),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(size.checked_sub(1)?)),
    };
    (start <= end && start < size).then_some((start, end))
}

async fn download(State(shared): State<Arc<Shared>>, method: Method, Path(raw): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = unauthorized(&shared, &headers) {
        return r;
    }
    let digest: Digest = match raw.parse() {
        Ok(d) => d,
        Err(e) => return store_error(e),
    };
    let size = match shared.store.size(digest).await {
        Ok(s) => s,
        Err(e) => return store_error(e),
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, size.saturating_sub(1)),
        Some(raw) => match parse_range(raw, size) {
            Some((s, e)) => (StatusCode::PARTIAL_CONTENT, s, e),
            None => {
                let mut r = error(ErrorCode::RangeNotSatisfiable, format!("{raw:?} is not within {size} bytes"));
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
        },
    };
    let len = if size == 0 { 0 } else { end - start + 1 };
    let mut response = if method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        match shared.store.open(digest, start, len).await {
            Ok(opened) => Response::new(Body::from_stream(ReaderStream::new(opened.reader))),
            Err(e) => return store_error(e),
        }
    };
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = HeaderValue::from_str(&len.to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }
}
