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

use std::path::PathBuf;

use crate::capability::{CapabilityKey, Grant};
use crate::store::{Digest, Store, StoreError};
use crate::ErrorCode;

struct Shared {
    store: Arc<dyn Store>,
    access: Access,
    /// Uploads hold it shared from storing the bytes to recording their owner; the garbage
    /// collector holds it alone while it deletes one artifact and its records.
    sweep: Arc<tokio::sync::RwLock<()>>,
}

/// Who may do what.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The platform's services (the scheduler, tools): everything.
    pub token: String,
    /// Checks capabilities (`capability.rs`); `None`: only the service token is accepted.
    pub capabilities: Option<CapabilityKey>,
    /// Where the store records who uploaded what through a capability (`<dir>/owners/<owner>/
    /// <sha256>` and `<dir>/digests/<sha256>/<owner>`): an artifact some account uploaded is
    /// read through capabilities of that account only, whatever digests a job spec names.
    pub owners_dir: Option<PathBuf>,
    /// Bytes each owner's uploads may take, checked before each upload; `None`: no quota.
    pub quota_bytes: Option<u64>,
}

/// Who a request comes from.
enum Caller {
    Service,
    Holder(Grant),
}

/// The router: `PUT /v1/artifacts`, `GET`/`HEAD /v1/artifacts/{sha256}`, all behind
/// `Authorization: Bearer <token>`, the service token only.
pub fn router(store: Arc<dyn Store>, token: &str) -> Router {
    router_with(store, Access { token: token.to_owned(), ..Access::default() })
}

/// As [`router`], with capabilities and quotas.
pub fn router_with(store: Arc<dyn Store>, access: Access) -> Router {
    router_and_collector(store, access).0
}

/// As [`router_with`], and the garbage collector of the same store (where the store records
/// owners: what no owner uploaded is never collected).
pub fn router_and_collector(store: Arc<dyn Store>, access: Access) -> (Router, Option<Collector>) {
    let sweep = Arc::new(tokio::sync::RwLock::new(()));
    let collector = access.owners_dir.clone().map(|owners_dir| Collector { store: store.clone(), owners_dir, sweep: sweep.clone() });
    let shared = Arc::new(Shared { store, access, sweep });
    let router = Router::new().route("/v1/artifacts", put(upload)).route("/v1/artifacts/{digest}", get(download).head(download)).with_state(shared);
    (router, collector)
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct Stored {
    pub sha256: String,
    pub size: u64,
}

/// `{"error": {"code", "message"}}`: the shape of every Suanli HTTP service's errors (the
/// portal's, the inference service's).
#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
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
        ErrorCode::Forbidden | ErrorCode::QuotaExceeded => StatusCode::FORBIDDEN,
    };
    (status, axum::Json(ErrorBody { error: ErrorDetail { code: code.as_str(), message: message.into() } })).into_response()
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

/// Who the bearer token names: the service token, or a capability this store's key signed and
/// that has not expired; anything else is refused.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<Caller, String> {
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    let service: bool = presented.as_bytes().ct_eq(shared.access.token.as_bytes()).into();
    if service && !shared.access.token.is_empty() {
        return Ok(Caller::Service);
    }
    if let (Some(key), true) = (&shared.access.capabilities, CapabilityKey::is_capability(presented)) {
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        return key.verify(presented, now_ms).map(Caller::Holder).map_err(|e| e.to_string());
    }
    Err("send `Authorization: Bearer <artifact token or capability>`".into())
}

/// The owners' record: `<dir>/owners/<owner>/<sha256>` for each artifact an owner uploaded.
fn owned_path(dir: &std::path::Path, owner: u64, digest: Option<Digest>) -> PathBuf {
    let owner_dir = dir.join("owners").join(owner.to_string());
    match digest {
        Some(d) => owner_dir.join(d.to_hex()),
        None => owner_dir,
    }
}

/// The reverse record: `<dir>/digests/<sha256>/<owner>`.
fn owners_of_path(dir: &std::path::Path, digest: Digest) -> PathBuf {
    dir.join("digests").join(digest.to_hex())
}

/// Records that `owner` uploaded `digest`, both ways, durably.
pub(crate) async fn record_owner(dir: &std::path::Path, owner: u64, digest: Digest) -> std::io::Result<()> {
    for (folder, file) in [(owned_path(dir, owner, None), digest.to_hex()), (owners_of_path(dir, digest), owner.to_string())] {
        tokio::fs::create_dir_all(&folder).await?;
        tokio::fs::File::create(folder.join(file)).await?.sync_all().await?;
    }
    Ok(())
}

/// The platform's record: `<dir>/service/<sha256>` for each artifact the service token
/// uploaded (never collected as garbage: the platform keeps what it put there).
fn service_upload_path(dir: &std::path::Path, digest: Digest) -> PathBuf {
    dir.join("service").join(digest.to_hex())
}

pub(crate) async fn record_service_upload(dir: &std::path::Path, digest: Digest) -> std::io::Result<()> {
    let path = service_upload_path(dir, digest);
    if let Some(folder) = path.parent() {
        tokio::fs::create_dir_all(folder).await?;
    }
    tokio::fs::File::create(&path).await?.sync_all().await
}

/// Deletes artifacts no one needs any more: uploaded through capabilities (by jobs: outputs,
/// checkpoints), referred to by no job, and stored longer ago than a grace period (an upload
/// whose record is still on its way is young). What the platform's services uploaded, and what
/// no owner's record names, is left alone.
pub struct Collector {
    store: Arc<dyn Store>,
    owners_dir: PathBuf,
    sweep: Arc<tokio::sync::RwLock<()>>,
}

/// What one collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub deleted: u64,
    pub freed_bytes: u64,
    pub kept: u64,
}

impl Collector {
    /// One collection: everything `referenced` names is kept, and so is anything stored at or
    /// after `stored_before`.
    pub async fn collect(&self, referenced: &std::collections::HashSet<Digest>, stored_before: std::time::SystemTime) -> Result<Collected, StoreError> {
        let mut done = Collected::default();
        for listed in self.store.list().await? {
            let digest = listed.digest;
            if referenced.contains(&digest) || listed.stored_at >= stored_before || !self.uploaded_by_owners_only(digest).await? {
                done.kept += 1;
                continue;
            }
            // Never waits for uploads (a slow one would hold every other upload up behind the
            // collector): while any upload is under way, this artifact is left for next time.
            let Ok(_alone) = self.sweep.try_write() else {
                done.kept += 1;
                continue;
            };
            // Looked at again under the lock: an upload of the same bytes may have come.
            if !self.uploaded_by_owners_only(digest).await? || !self.store.delete_if_stored_before(digest, stored_before).await? {
                done.kept += 1;
                continue;
            }
            self.forget_owners(digest).await?;
            tracing::info!(%digest, size = listed.size, "artifact collected: no job refers to it");
            done.deleted += 1;
            done.freed_bytes += listed.size;
        }
        Ok(done)
    }

    /// Some account uploaded it, and the platform's services never did.
    async fn uploaded_by_owners_only(&self, digest: Digest) -> std::io::Result<bool> {
        if tokio::fs::try_exists(service_upload_path(&self.owners_dir, digest)).await? {
            return Ok(false);
        }
        let mut owners = match tokio::fs::read_dir(owners_of_path(&self.owners_dir, digest)).await {
            Ok(o) => o,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(owners.next_entry().await?.is_some())
    }

    /// Removes the owner records of a deleted artifact (their quotas no longer count it).
    async fn forget_owners(&self, digest: Digest) -> std::io::Result<()> {
        let by_digest = owners_of_path(&self.owners_dir, digest);
        let mut owners = tokio::fs::read_dir(&by_digest).await?;
        while let Some(owner) = owners.next_entry().await? {
            if let Some(owner) = owner.file_name().to_str().and_then(|o| o.parse::<u64>().ok()) {
                match tokio::fs::remove_file(owned_path(&self.owners_dir, owner, Some(digest))).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
        }
        tokio::fs::remove_dir_all(&by_digest).await
    }
}

/// Whether `owner` may read `digest` by its capability: it uploaded it, or no account did (an
/// artifact the platform put there, reachable by whoever knows its hash).
async fn owner_may_read(dir: &std::path::Path, owner: u64, digest: Digest) -> std::io::Result<bool> {
    let owners = owners_of_path(dir, digest);
    let mut entries = match tokio::fs::read_dir(&owners).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let mut anyone = false;
    while let Some(entry) = entries.next_entry().await? {
        anyone = true;
        if entry.file_name().to_str() == Some(owner.to_string().as_str()) {
            return Ok(true);
        }
    }
    Ok(!anyone)
}

/// Bytes of the artifacts `owner` uploaded.
async fn usage(store: &dyn Store, dir: &std::path::Path, owner: u64) -> Result<u64, StoreError> {
    let mut total = 0;
    let mut entries = match tokio::fs::read_dir(owned_path(dir, owner, None)).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    while let Some(entry) = entries.next_entry().await? {
        if let Some(digest) = entry.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) {
            total += store.size(digest).await.unwrap_or(0);
        }
    }
    Ok(total)
}

#[derive(Deserialize)]
struct UploadQuery {
    sha256: Option<String>,
}

/// At most this much of a refused upload's body is read (and dropped) before the refusal is
/// sent, so that a client still writing a small body reads the answer instead of a broken
/// connection; a larger body's sender may see the connection closed instead.
const REFUSED_BODY_DRAINED: usize = 1 << 20;

/// Answers `response` to an upload refused before its body was read, after reading what the
/// client sends of it (up to [`REFUSED_BODY_DRAINED`], for at most two seconds).
async fn refused(request: Request, response: Response) -> Response {
    let drain = async {
        let mut body = request.into_body().into_data_stream();
        let mut seen = 0usize;
        while let Some(Ok(chunk)) = futures::StreamExt::next(&mut body).await {
            seen += chunk.len();
            if seen > REFUSED_BODY_DRAINED {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), drain).await;
    response
}

async fn upload(State(shared): State<Arc<Shared>>, Query(q): Query<UploadQuery>, request: Request) -> Response {
    let owner = match authenticate(&shared, request.headers()) {
        Ok(Caller::Service) => None,
        Ok(Caller::Holder(grant)) if grant.write => Some(grant.owner),
        Ok(Caller::Holder(grant)) => return refused(request, error(ErrorCode::Forbidden, format!("the capability for {} does not upload", grant.scope))).await,
        Err(why) => return refused(request, error(ErrorCode::Unauthenticated, why)).await,
    };
    let expected = match q.sha256.as_deref().map(str::parse::<Digest>).transpose() {
        Ok(e) => e,
        Err(e) => return refused(request, store_error(e)).await,
    };
    // Quotas count what an owner uploaded (checked before each upload: one artifact at most
    // goes past it).
    if let (Some(owner), Some(dir), Some(limit)) = (owner, &shared.access.owners_dir, &shared.access.quota_bytes) {
        match usage(shared.store.as_ref(), dir, owner).await {
            Ok(used) if used >= *limit => {
                let why = format!("account {owner}'s artifacts take {used} of its {limit} bytes");
                return refused(request, error(ErrorCode::QuotaExceeded, why)).await;
            }
            Ok(_) => {}
            Err(e) => return refused(request, store_error(e)).await,
        }
    }
    let stream = request.into_body().into_data_stream().map_err(std::io::Error::other);
    let _not_swept = shared.sweep.read().await;
    match shared.store.put(Box::new(StreamReader::new(stream)), expected).await {
        Ok((digest, size)) => {
            if let Some(dir) = &shared.access.owners_dir {
                let recorded = match owner {
                    Some(owner) => record_owner(dir, owner, digest).await,
                    None => record_service_upload(dir, digest).await,
                };
                if let Err(e) = recorded {
                    return store_error(e.into());
                }
            }
            (StatusCode::CREATED, axum::Json(Stored { sha256: digest.to_hex(), size })).into_response()
        }
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
    let caller = match authenticate(&shared, &headers) {
        Ok(c) => c,
        Err(why) => return error(ErrorCode::Unauthenticated, why),
    };
    let digest: Digest = match raw.parse() {
        Ok(d) => d,
        Err(e) => return store_error(e),
    };
    if let Caller::Holder(grant) = &caller {
        let owned = match &shared.access.owners_dir {
            Some(dir) => match owner_may_read(dir, grant.owner, digest).await {
                Ok(ok) => ok,
                Err(e) => return store_error(e.into()),
            },
            None => true,
        };
        if !grant.may_read(digest) || !owned {
            return error(ErrorCode::Forbidden, format!("the capability for {} does not cover {digest}", grant.scope));
        }
    }
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
