//! Datasets for researchers: resumable uploads (the tus 1.0.0 protocol: core, creation and
//! termination, with the SHA-256 named at creation checked at the end), versions imported
//! from them, browsing, archives, shares and quotas. How bytes are kept: `crate::datasets`.
//!
//! Who sees what: a dataset is its owner's, and readable by the accounts it is shared with;
//! only the owner writes (new versions, shares, deletion). Anyone else gets `NOT_FOUND`, never
//! a hint that it exists. An upload is its creator's alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use suanli_artifacts::{Digest, StoreError};
use suanli_cv::intake::Rejected;
use tokio::io::AsyncWriteExt;
use utoipa::{IntoParams, ToSchema};

use super::{ApiJson, ApiPath, ApiQuery};
use crate::auth::{Principal, Researcher};
use crate::datasets::{self, check_name, DatasetRef, DatasetStore, FileEntry, LabelSource};
use crate::db::{new_public_id, now_ms, opt_str};
use crate::error::{ApiError, ApiResult, Code};
use crate::model::UserId;
use crate::state::AppState;

const TUS_VERSION: &str = "1.0.0";
/// Uploads nobody finished or used are deleted after a week.
const UPLOAD_LIFETIME_MS: i64 = 7 * 86_400_000;
/// Names listed per kind of change in a version's answer (the counts are exact).
const CHANGES_LISTED: usize = 1_000;
/// Uploads one new version may name (the page's uploader sends each picture as an upload, so
/// it checks this before sending anything; larger folders go as an archive).
pub const UPLOADS_PER_VERSION: usize = 1_000;

pub(crate) fn store(state: &AppState) -> ApiResult<&DatasetStore> {
    state.datasets.as_deref().ok_or_else(|| ApiError::new(Code::Broker(suanli_types::ErrorCode::Unavailable), "this portal keeps no datasets"))
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound(d) => ApiError::internal(format!("a dataset file's bytes are missing: {d}")),
        other => ApiError::internal(other),
    }
}

// ---- uploads (tus) ----

#[derive(Serialize, ToSchema)]
pub struct UploadView {
    pub upload_id: String,
    pub filename: String,
    pub length: u64,
    pub offset: u64,
    pub complete: bool,
}

struct UploadRow {
    id: String,
    filename: String,
    sha256: String,
    length: u64,
    complete: bool,
}

async fn upload_of(state: &AppState, p: &Principal, id: &str) -> ApiResult<UploadRow> {
    let missing = || ApiError::not_found(format!("upload {id}"));
    if !datasets::is_upload_id(id) {
        return Err(missing());
    }
    let row = sqlx::query("SELECT filename, sha256, length, complete FROM uploads WHERE id = $1 AND owner = $2")
        .bind(id)
        .bind(p.user.0)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(missing)?;
    Ok(UploadRow {
        id: id.to_owned(),
        filename: row.try_get("filename")?,
        sha256: row.try_get("sha256")?,
        length: row.try_get::<i64, _>("length")? as u64,
        complete: row.try_get::<i64, _>("complete")? != 0,
    })
}

async fn staged_len(store: &DatasetStore, id: &str) -> ApiResult<u64> {
    let path = store.staged(id).ok_or_else(|| ApiError::not_found("upload"))?;
    match tokio::fs::metadata(&path).await {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(ApiError::internal(e)),
    }
}

fn view_of(u: &UploadRow, offset: u64) -> UploadView {
    UploadView { upload_id: u.id.clone(), filename: u.filename.clone(), length: u.length, offset, complete: u.complete }
}

fn tus_headers(offset: u64, length: u64) -> [(header::HeaderName, HeaderValue); 4] {
    [
        (header::HeaderName::from_static("tus-resumable"), HeaderValue::from_static(TUS_VERSION)),
        (header::HeaderName::from_static("upload-offset"), HeaderValue::from(offset)),
        (header::HeaderName::from_static("upload-length"), HeaderValue::from(length)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ]
}

/// `Upload-Metadata`: `key base64,key base64`.
fn metadata(headers: &HeaderMap) -> ApiResult<HashMap<String, String>> {
    use base64::Engine;
    let raw = headers.get("upload-metadata").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let mut out = HashMap::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once(' ').unwrap_or((pair, ""));
        let bytes =
            base64::engine::general_purpose::STANDARD.decode(value.trim()).map_err(|_| ApiError::field("Upload-Metadata", format!("{key}: not base64")))?;
        let text = String::from_utf8(bytes).map_err(|_| ApiError::field("Upload-Metadata", format!("{key}: not UTF-8")))?;
        out.insert(key.to_owned(), text);
    }
    Ok(out)
}

/// Bytes the account's datasets take (each content once) and its uploads will take.
pub async fn storage_used(state: &AppState, user: UserId) -> ApiResult<u64> {
    let files: i64 = sqlx::query(
        "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) AS n FROM (SELECT DISTINCT f.sha256, f.size FROM dataset_files f JOIN datasets d ON d.id = f.dataset_id WHERE d.owner = $1) AS kept",
    )
    .bind(user.0)
    .fetch_one(&state.db.pool)
    .await?
    .try_get("n")?;
    let uploads: i64 = sqlx::query("SELECT CAST(COALESCE(SUM(length), 0) AS BIGINT) AS n FROM uploads WHERE owner = $1")
        .bind(user.0)
        .fetch_one(&state.db.pool)
        .await?
        .try_get("n")?;
    Ok((files + uploads).max(0) as u64)
}

/// Deletes uploads older than their lifetime (anyone's: a sweep on the way).
async fn sweep_stale_uploads(state: &AppState, store: &DatasetStore) -> ApiResult<()> {
    let stale = sqlx::query("SELECT id FROM uploads WHERE created_ms < $1").bind(now_ms() - UPLOAD_LIFETIME_MS).fetch_all(&state.db.pool).await?;
    for row in stale.iter().take(100) {
        let id: String = row.try_get("id")?;
        forget_upload(state, store, &id).await?;
    }
    Ok(())
}

async fn forget_upload(state: &AppState, store: &DatasetStore, id: &str) -> ApiResult<()> {
    sqlx::query("DELETE FROM uploads WHERE id = $1").bind(id).execute(&state.db.pool).await?;
    if let Some(path) = store.staged(id) {
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(ApiError::internal(e)),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Serialize, ToSchema)]
pub struct Storage {
    pub used_bytes: u64,
    pub quota_bytes: u64,
}

#[utoipa::path(get, path = "/api/v1/me/storage", tag = "datasets",
    responses((status = 200, body = Storage), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn storage(State(state): State<AppState>, Researcher(p): Researcher) -> ApiResult<axum::Json<Storage>> {
    let quota_bytes = store(&state)?.quota_bytes;
    Ok(axum::Json(Storage { used_bytes: storage_used(&state, p.user).await?, quota_bytes }))
}

/// Creates an upload (tus creation): `Upload-Length` and `Upload-Metadata` with `filename`
/// and `sha256` (each base64). The account's quota is checked here, before any byte is sent.
#[utoipa::path(post, path = "/api/v1/uploads", tag = "datasets",
    params(("Upload-Length" = u64, Header, description = "bytes the upload will have"),
           ("Upload-Metadata" = String, Header, description = "`filename <base64>,sha256 <base64 of the lower-case hex SHA-256>`"),
           ("Tus-Resumable" = String, Header, description = "1.0.0")),
    responses((status = 201, body = UploadView, description = "`Location` names the upload"), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn create_upload(State(state): State<AppState>, Researcher(p): Researcher, headers: HeaderMap) -> ApiResult<Response> {
    let store = store(&state)?;
    let length = headers
        .get("upload-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::field("Upload-Length", "the upload's size in bytes, at least 1"))?;
    let meta = metadata(&headers)?;
    let filename = meta.get("filename").cloned().unwrap_or_default();
    let sha256 = meta.get("sha256").cloned().unwrap_or_default();
    let mut problems = Vec::new();
    if let Err(why) = check_name(&filename) {
        problems.push(suanli_types::FieldError::new("Upload-Metadata.filename", why));
    }
    if sha256.parse::<Digest>().is_err() {
        problems.push(suanli_types::FieldError::new("Upload-Metadata.sha256", "the bytes' SHA-256, 64 lower-case hex digits"));
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    if length > store.max_upload_bytes {
        return Err(ApiError::new(Code::PayloadTooLarge, format!("{length} bytes; one upload may have at most {}", store.max_upload_bytes)));
    }
    sweep_stale_uploads(&state, store).await?;
    // Checked and recorded under one lock, so uploads created at the same time cannot all
    // pass the same check (one portal; replicas each hold their own).
    let _quota = store.quota_lock.lock().await;
    let used = storage_used(&state, p.user).await?;
    if used.saturating_add(length) > store.quota_bytes {
        return Err(ApiError::new(
            Code::QuotaExceeded,
            format!("{length} more bytes would pass your quota: your datasets and uploads take {used} of {} bytes", store.quota_bytes),
        ));
    }
    let id = datasets::new_upload_id();
    let path = store.staged(&id).ok_or_else(|| ApiError::internal("a fresh upload ID of the wrong shape"))?;
    tokio::fs::File::create(&path).await.map_err(ApiError::internal)?;
    sqlx::query("INSERT INTO uploads (id, owner, filename, sha256, length, created_ms, complete) VALUES ($1, $2, $3, $4, $5, $6, 0)")
        .bind(&id)
        .bind(p.user.0)
        .bind(&filename)
        .bind(&sha256)
        .bind(length as i64)
        .bind(now_ms())
        .execute(&state.db.pool)
        .await?;
    let row = UploadRow { id: id.clone(), filename, sha256, length, complete: false };
    let mut response = (StatusCode::CREATED, tus_headers(0, length), axum::Json(view_of(&row, 0))).into_response();
    response.headers_mut().insert(header::LOCATION, HeaderValue::from_str(&format!("/api/v1/uploads/{id}")).map_err(ApiError::internal)?);
    Ok(response)
}

/// Where an upload stands (tus `HEAD`): `Upload-Offset` says how many bytes arrived.
#[utoipa::path(head, path = "/api/v1/uploads/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, description = "`Upload-Offset` and `Upload-Length`"), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn head_upload(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<String>) -> ApiResult<Response> {
    let store = store(&state)?;
    let upload = upload_of(&state, &p, &id).await?;
    let offset = staged_len(store, &id).await?;
    Ok((StatusCode::OK, tus_headers(offset, upload.length)).into_response())
}

#[utoipa::path(get, path = "/api/v1/uploads/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 200, body = UploadView), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_upload(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<String>) -> ApiResult<Response> {
    let store = store(&state)?;
    let upload = upload_of(&state, &p, &id).await?;
    let offset = staged_len(store, &id).await?;
    Ok((tus_headers(offset, upload.length), axum::Json(view_of(&upload, offset))).into_response())
}

#[utoipa::path(delete, path = "/api/v1/uploads/{id}", tag = "datasets", params(("id" = String, Path)),
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete_upload(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<String>) -> ApiResult<Response> {
    let store = store(&state)?;
    let upload = upload_of(&state, &p, &id).await?;
    let _writing = store.begin_patch(&upload.id).ok_or_else(|| ApiError::new(Code::UploadOffsetMismatch, "a PATCH is writing this upload"))?;
    forget_upload(&state, store, &upload.id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Appends bytes at `Upload-Offset` (tus `PATCH`). A request cut short keeps what arrived;
/// the last byte makes the portal hash the whole, and a wrong hash deletes the upload.
#[utoipa::path(patch, path = "/api/v1/uploads/{id}", tag = "datasets", params(("id" = String, Path), ("Upload-Offset" = u64, Header)),
    request_body(content = Vec<u8>, content_type = "application/offset+octet-stream"),
    responses((status = 204, description = "`Upload-Offset`: the bytes arrived so far"), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody),
        (status = 460, body = crate::error::ErrorBody)))]
pub async fn patch_upload(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<String>, request: Request) -> ApiResult<Response> {
    let store = store(&state)?;
    let upload = upload_of(&state, &p, &id).await?;
    if request.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) != Some("application/offset+octet-stream") {
        return Err(ApiError::field("Content-Type", "application/offset+octet-stream"));
    }
    let claimed = request
        .headers()
        .get("upload-offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| ApiError::field("Upload-Offset", "the byte offset this PATCH starts at"))?;
    let _writing = store.begin_patch(&upload.id).ok_or_else(|| ApiError::new(Code::UploadOffsetMismatch, "another PATCH is writing this upload"))?;
    let offset = staged_len(store, &upload.id).await?;
    if upload.complete || claimed != offset {
        return Err(ApiError::new(Code::UploadOffsetMismatch, format!("the upload has {offset} of {} bytes; this PATCH starts at {claimed}", upload.length)));
    }
    let path = store.staged(&upload.id).ok_or_else(|| ApiError::not_found("upload"))?;
    // Created if a crash lost the empty file made with the upload (its offset reads as 0).
    let mut file = tokio::fs::OpenOptions::new().append(true).create(true).open(&path).await.map_err(ApiError::internal)?;
    let mut body = request.into_body().into_data_stream();
    let mut written = offset;
    let mut cut_short = None;
    while let Some(chunk) = body.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                cut_short = Some(e.to_string());
                break;
            }
        };
        if written + chunk.len() as u64 > upload.length {
            drop(file);
            let undo = tokio::fs::OpenOptions::new().write(true).open(&path).await.map_err(ApiError::internal)?;
            undo.set_len(offset).await.map_err(ApiError::internal)?;
            undo.sync_all().await.map_err(ApiError::internal)?;
            return Err(ApiError::new(Code::PayloadTooLarge, format!("the upload is {} bytes; this PATCH goes past its end", upload.length)));
        }
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
        written += chunk.len() as u64;
    }
    // What arrived is kept (and said) even when the connection broke: the client goes on
    // from there.
    file.sync_all().await.map_err(ApiError::internal)?;
    drop(file);
    if let Some(why) = cut_short {
        tracing::info!(upload = %upload.id, offset = written, %why, "an upload's PATCH was cut short");
        return Ok((StatusCode::NO_CONTENT, tus_headers(written, upload.length)).into_response());
    }
    if written == upload.length {
        finish(&state, store, &upload).await?;
    }
    Ok((StatusCode::NO_CONTENT, tus_headers(written, upload.length)).into_response())
}

/// An upload whose every byte arrived: it is complete if they hash to what it announced, and
/// deleted (nothing kept) if not. The caller holds its PATCH guard.
async fn finish(state: &AppState, store: &DatasetStore, upload: &UploadRow) -> ApiResult<()> {
    let path = store.staged(&upload.id).ok_or_else(|| ApiError::not_found("upload"))?;
    let actual = datasets::hash_file(&path).await.map_err(ApiError::internal)?;
    if actual != upload.sha256 {
        forget_upload(state, store, &upload.id).await?;
        return Err(ApiError::new(
            Code::ChecksumMismatch,
            format!("{} arrived as SHA-256 {actual}, not {} as announced: the upload is deleted", upload.filename, upload.sha256),
        ));
    }
    sqlx::query("UPDATE uploads SET complete = 1 WHERE id = $1").bind(&upload.id).execute(&state.db.pool).await?;
    Ok(())
}

// ---- datasets ----

#[derive(Serialize, ToSchema)]
pub struct VersionSummary {
    pub version: u32,
    pub message: String,
    pub created_ms: i64,
    pub items: u64,
    pub bytes: u64,
    pub added: u64,
    pub removed: u64,
    pub modified: u64,
}

#[derive(Serialize, ToSchema)]
pub struct DatasetView {
    pub dataset_id: u64,
    pub name: String,
    /// The owner's username.
    pub owner: String,
    pub description: String,
    pub created_ms: i64,
    /// 0: nothing committed yet.
    pub latest_version: u32,
    pub mine: bool,
    /// Usernames it is shared with (the owner sees them; others see an empty list).
    pub shared_with: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<VersionSummary>>,
}

/// What a version recorded when it was made.
#[derive(Serialize, Deserialize, Default, ToSchema)]
pub struct VersionReport {
    pub changes: ChangeLists,
    pub added: u64,
    pub removed: u64,
    pub modified: u64,
    #[schema(value_type = Vec<Object>)]
    pub rejected: Vec<Rejected>,
    /// Every file refused (the list holds the first thousand).
    #[serde(default)]
    pub rejected_count: u64,
    pub duplicates: u64,
    pub annotations: u64,
}

#[derive(Serialize, Deserialize, Default, ToSchema)]
pub struct ChangeLists {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub modified: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct VersionView {
    pub dataset_id: u64,
    pub version: u32,
    pub message: String,
    pub created_ms: i64,
    pub items: u64,
    pub bytes: u64,
    #[serde(flatten)]
    pub report: VersionReport,
    /// Files per class label (`""`: none) and objects per category (`object:cat`).
    pub labels: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileEntry>>,
}

/// A dataset as its SQL row has it.
pub struct DatasetRow {
    id: i64,
    owner: i64,
    owner_name: String,
    name: String,
    description: String,
    created_ms: i64,
    latest: i64,
}

const DATASET_COLUMNS: &str = "d.id, d.owner, u.username AS owner_name, d.name, d.description, d.created_ms, d.latest_version";

fn dataset_row(row: &sqlx::any::AnyRow) -> Result<DatasetRow, sqlx::Error> {
    Ok(DatasetRow {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        owner_name: row.try_get("owner_name")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        created_ms: row.try_get("created_ms")?,
        latest: row.try_get("latest_version")?,
    })
}

/// The dataset if `p` may read it (its owner, or shared with them); `NOT_FOUND` otherwise.
pub(crate) async fn readable(state: &AppState, p: &Principal, id: u64) -> ApiResult<DatasetRow> {
    let sql = format!(
        "SELECT {DATASET_COLUMNS} FROM datasets d JOIN users u ON u.id = d.owner WHERE d.id = $1 AND (d.owner = $2 OR EXISTS (SELECT 1 FROM dataset_shares s WHERE s.dataset_id = d.id AND s.user_id = $2))"
    );
    let row = sqlx::query(&sql).bind(id as i64).bind(p.user.0).fetch_optional(&state.db.pool).await?;
    row.map(|r| dataset_row(&r)).transpose()?.ok_or_else(|| ApiError::not_found(format!("dataset {id}")))
}

/// As [`readable`], and `p` owns it.
pub(crate) async fn owned(state: &AppState, p: &Principal, id: u64) -> ApiResult<DatasetRow> {
    let d = readable(state, p, id).await?;
    if d.owner != p.user.0 {
        return Err(ApiError::forbidden(format!("dataset {id} is {}'s: shared with you to read only", d.owner_name)));
    }
    Ok(d)
}

async fn shares_of(state: &AppState, dataset: i64) -> ApiResult<Vec<String>> {
    let rows = sqlx::query("SELECT u.username FROM dataset_shares s JOIN users u ON u.id = s.user_id WHERE s.dataset_id = $1 ORDER BY u.username")
        .bind(dataset)
        .fetch_all(&state.db.pool)
        .await?;
    Ok(rows.iter().map(|r| r.try_get("username")).collect::<Result<_, _>>()?)
}

async fn dataset_view(state: &AppState, p: &Principal, d: &DatasetRow) -> ApiResult<DatasetView> {
    let mine = d.owner == p.user.0;
    Ok(DatasetView {
        dataset_id: d.id as u64,
        name: d.name.clone(),
        owner: d.owner_name.clone(),
        description: d.description.clone(),
        created_ms: d.created_ms,
        latest_version: d.latest as u32,
        mine,
        shared_with: if mine { shares_of(state, d.id).await? } else { Vec::new() },
        versions: None,
    })
}

fn check_dataset_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) || name.starts_with('.') {
        return Err("1 to 64 letters, digits, '.', '_' or '-', not starting with '.'".into());
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not only digits (those name datasets by ID)".into());
    }
    Ok(())
}

#[derive(Deserialize, ToSchema)]
pub struct CreateDataset {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[utoipa::path(post, path = "/api/v1/datasets", tag = "datasets", request_body = CreateDataset,
    responses((status = 201, body = DatasetView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create(State(state): State<AppState>, Researcher(p): Researcher, ApiJson(req): ApiJson<CreateDataset>) -> ApiResult<Response> {
    let mut problems = Vec::new();
    if let Err(why) = check_dataset_name(&req.name) {
        problems.push(suanli_types::FieldError::new("name", why));
    }
    if req.description.chars().count() > 2000 {
        problems.push(suanli_types::FieldError::new("description", "at most 2000 characters"));
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    let id = new_public_id();
    let inserted = sqlx::query("INSERT INTO datasets (id, owner, name, description, created_ms, latest_version) VALUES ($1, $2, $3, $4, $5, 0)")
        .bind(id)
        .bind(p.user.0)
        .bind(&req.name)
        .bind(&req.description)
        .bind(now_ms())
        .execute(&state.db.pool)
        .await;
    match inserted {
        Err(e) if crate::db::Db::is_unique_violation(&e) => {
            return Err(ApiError::conflict_field("name", format!("you already have a dataset named {}", req.name)))
        }
        other => other?,
    };
    let d = readable(&state, &p, id as u64).await?;
    Ok((StatusCode::CREATED, axum::Json(dataset_view(&state, &p, &d).await?)).into_response())
}

#[utoipa::path(get, path = "/api/v1/datasets", tag = "datasets",
    responses((status = 200, body = [DatasetView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, Researcher(p): Researcher) -> ApiResult<axum::Json<Vec<DatasetView>>> {
    Ok(axum::Json(datasets_of(&state, &p).await?))
}

pub async fn datasets_of(state: &AppState, p: &Principal) -> ApiResult<Vec<DatasetView>> {
    let sql = format!(
        "SELECT {DATASET_COLUMNS} FROM datasets d JOIN users u ON u.id = d.owner WHERE d.owner = $1 OR EXISTS (SELECT 1 FROM dataset_shares s WHERE s.dataset_id = d.id AND s.user_id = $1) ORDER BY d.name, u.username"
    );
    let rows = sqlx::query(&sql).bind(p.user.0).fetch_all(&state.db.pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(dataset_view(state, p, &dataset_row(row)?).await?);
    }
    // Mine first.
    out.sort_by_key(|d| !d.mine);
    Ok(out)
}

async fn version_summaries(state: &AppState, dataset: i64) -> ApiResult<Vec<VersionSummary>> {
    let rows = sqlx::query("SELECT version, message, created_ms, items, bytes, report FROM dataset_versions WHERE dataset_id = $1 ORDER BY version")
        .bind(dataset)
        .fetch_all(&state.db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            let report: VersionReport = serde_json::from_str(&r.try_get::<String, _>("report")?).unwrap_or_default();
            Ok(VersionSummary {
                version: r.try_get::<i64, _>("version")? as u32,
                message: r.try_get("message")?,
                created_ms: r.try_get("created_ms")?,
                items: r.try_get::<i64, _>("items")? as u64,
                bytes: r.try_get::<i64, _>("bytes")? as u64,
                added: report.added,
                removed: report.removed,
                modified: report.modified,
            })
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v1/datasets/{id}", tag = "datasets", params(("id" = u64, Path)),
    responses((status = 200, body = DatasetView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<DatasetView>> {
    Ok(axum::Json(dataset_of(&state, &p, id).await?))
}

/// A dataset `p` may read, with its versions (`GET /datasets/{id}`; its page reads it too).
pub async fn dataset_of(state: &AppState, p: &Principal, id: u64) -> ApiResult<DatasetView> {
    let d = readable(state, p, id).await?;
    let mut view = dataset_view(state, p, &d).await?;
    view.versions = Some(version_summaries(state, d.id).await?);
    Ok(view)
}

/// How many files each listed dataset's latest version holds (none yet: not in the map).
pub async fn latest_items(state: &AppState, datasets: &[DatasetView]) -> ApiResult<BTreeMap<u64, u64>> {
    let mut out = BTreeMap::new();
    for d in datasets.iter().filter(|d| d.latest_version > 0) {
        let row = sqlx::query("SELECT items FROM dataset_versions WHERE dataset_id = $1 AND version = $2")
            .bind(d.dataset_id as i64)
            .bind(i64::from(d.latest_version))
            .fetch_optional(&state.db.pool)
            .await?;
        if let Some(row) = row {
            out.insert(d.dataset_id, row.try_get::<i64, _>("items")? as u64);
        }
    }
    Ok(out)
}

#[utoipa::path(delete, path = "/api/v1/datasets/{id}", tag = "datasets", params(("id" = u64, Path)),
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn delete(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<Response> {
    let d = owned(&state, &p, id).await?;
    let mut tx = state.db.pool.begin().await?;
    // The dataset's row first: a version being committed meanwhile waits on it, then finds
    // the dataset gone (its UPDATE moves nothing), rather than leaving rows behind.
    sqlx::query("DELETE FROM datasets WHERE id = $1").bind(d.id).execute(&mut *tx).await?;
    for table in ["dataset_files", "dataset_versions", "dataset_shares"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE dataset_id = $1")).bind(d.id).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn files_of(state: &AppState, dataset: i64, version: i64) -> ApiResult<Vec<FileEntry>> {
    let rows = sqlx::query("SELECT name, sha256, size, label, width, height, objects FROM dataset_files WHERE dataset_id = $1 AND version = $2 ORDER BY name")
        .bind(dataset)
        .bind(version)
        .fetch_all(&state.db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            let objects = match opt_str(r, "objects")? {
                Some(text) => serde_json::from_str(&text).map_err(ApiError::internal)?,
                None => Vec::new(),
            };
            Ok(FileEntry {
                name: r.try_get("name")?,
                sha256: r.try_get("sha256")?,
                size: r.try_get::<i64, _>("size")? as u64,
                label: opt_str(r, "label")?,
                width: r.try_get::<i64, _>("width")? as u32,
                height: r.try_get::<i64, _>("height")? as u32,
                objects,
            })
        })
        .collect()
}

/// `0` names the latest version; a version that does not exist is `NOT_FOUND`.
pub(crate) fn pick_version(d: &DatasetRow, version: u32) -> ApiResult<i64> {
    let v = if version == 0 { d.latest } else { i64::from(version) };
    if v == 0 || v > d.latest {
        return Err(ApiError::not_found(format!("version {version} of dataset {}", d.name)));
    }
    Ok(v)
}

async fn version_view(state: &AppState, d: &DatasetRow, version: i64, with_files: bool) -> ApiResult<VersionView> {
    let row = sqlx::query("SELECT message, created_ms, items, bytes, report FROM dataset_versions WHERE dataset_id = $1 AND version = $2")
        .bind(d.id)
        .bind(version)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("version {version} of dataset {}", d.name)))?;
    let files = files_of(state, d.id, version).await?;
    Ok(VersionView {
        dataset_id: d.id as u64,
        version: version as u32,
        message: row.try_get("message")?,
        created_ms: row.try_get("created_ms")?,
        items: row.try_get::<i64, _>("items")? as u64,
        bytes: row.try_get::<i64, _>("bytes")? as u64,
        report: serde_json::from_str(&row.try_get::<String, _>("report")?).unwrap_or_default(),
        labels: datasets::label_counts(&files),
        files: with_files.then_some(files),
    })
}

#[utoipa::path(get, path = "/api/v1/datasets/{id}/versions/{version}", tag = "datasets", params(("id" = u64, Path), ("version" = u32, Path, description = "0: the latest")),
    responses((status = 200, body = VersionView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_version(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, version)): ApiPath<(u64, u32)>,
) -> ApiResult<axum::Json<VersionView>> {
    Ok(axum::Json(version_of(&state, &p, id, version).await?))
}

/// A version of a dataset `p` may read, with its files (`0`: the latest).
pub async fn version_of(state: &AppState, p: &Principal, id: u64, version: u32) -> ApiResult<VersionView> {
    let d = readable(state, p, id).await?;
    let v = pick_version(&d, version)?;
    version_view(state, &d, v, true).await
}

#[derive(Deserialize, ToSchema)]
pub struct CreateVersion {
    /// Completed uploads (each an image, or a `.tar`/`.tar.gz`/`.tgz` of a folder): used up.
    #[serde(default)]
    pub uploads: Vec<String>,
    /// Files of the latest version to leave out.
    #[serde(default)]
    pub remove: Vec<String>,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub labels: LabelSource,
    /// A retry with the same key gets the version the first try made.
    pub request_id: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/datasets/{id}/versions", tag = "datasets", params(("id" = u64, Path)), request_body = CreateVersion,
    responses((status = 201, body = VersionView), (status = 200, body = VersionView, description = "nothing changed, or a retry: the version as it is"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn create_version(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CreateVersion>,
) -> ApiResult<Response> {
    let store = store(&state)?;
    let d = owned(&state, &p, id).await?;
    let mut problems = Vec::new();
    if req.uploads.is_empty() && req.remove.is_empty() {
        problems.push(suanli_types::FieldError::new("uploads", "name at least one upload, or files to remove"));
    }
    if req.uploads.len() > UPLOADS_PER_VERSION {
        problems.push(suanli_types::FieldError::new("uploads", format!("at most {UPLOADS_PER_VERSION} uploads a version")));
    }
    if req.message.chars().count() > 2000 {
        problems.push(suanli_types::FieldError::new("message", "at most 2000 characters"));
    }
    if let Some(key) = &req.request_id {
        if key.is_empty() || key.len() > 128 {
            problems.push(suanli_types::FieldError::new("request_id", "1 to 128 characters"));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    if let Some(done) = version_made_by(&state, &d, req.request_id.as_deref()).await? {
        return Ok(done);
    }
    let mut uploads = Vec::new();
    for upload_id in &req.uploads {
        let mut upload = upload_of(&state, &p, upload_id).await?;
        if !upload.complete {
            let offset = staged_len(store, upload_id).await?;
            if offset != upload.length {
                return Err(ApiError::new(Code::UploadIncomplete, format!("upload {upload_id} has {offset} of its {} bytes", upload.length)));
            }
            // Every byte arrived but the PATCH that brought the last ones ended before it
            // was checked (a client gone, a restart): check it now.
            let _writing = store.begin_patch(&upload.id).ok_or_else(|| ApiError::new(Code::UploadOffsetMismatch, "a PATCH is writing this upload"))?;
            finish(&state, store, &upload).await?;
            upload.complete = true;
        }
        uploads.push(upload);
    }

    let base = if d.latest > 0 { files_of(&state, d.id, d.latest).await? } else { Vec::new() };
    let mut next: BTreeMap<String, FileEntry> = base.iter().map(|f| (f.name.clone(), f.clone())).collect();
    let mut report = VersionReport::default();
    for name in &req.remove {
        if next.remove(name).is_none() {
            return Err(ApiError::field("remove", format!("{name:?} is not in version {}", d.latest)));
        }
    }
    // What the pictures may take: the quota, less what the account keeps besides these
    // uploads (whose lengths counted while they waited; an archive may unpack to more).
    let waiting: u64 = uploads.iter().map(|u| u.length).sum();
    let mut budget = store.quota_bytes.saturating_sub(storage_used(&state, p.user).await?.saturating_sub(waiting));
    for upload in &uploads {
        let imported = import(store, upload, req.labels, budget).await?;
        budget = budget.saturating_sub(imported.files.iter().map(|f| f.size).sum());
        report.duplicates += imported.duplicates.len() as u64;
        report.annotations += imported.annotations;
        report.rejected_count += imported.rejected_count;
        report.rejected.extend(imported.rejected);
        report.rejected.truncate(CHANGES_LISTED);
        for file in imported.files {
            next.insert(file.name.clone(), file);
        }
    }
    if next.len() > datasets::MAX_ITEMS {
        return Err(ApiError::field("uploads", format!("a version holds at most {} files", datasets::MAX_ITEMS)));
    }
    record_changes(&mut report, &base, next.values());

    if report.added + report.removed + report.modified == 0 && d.latest > 0 {
        // The same content again: no new version; the uploads are used up all the same.
        for upload in &uploads {
            forget_upload(&state, store, &upload.id).await?;
        }
        // The answer is about this request: nothing was added, removed or changed.
        let mut view = version_view(&state, &d, d.latest, false).await?;
        view.report = VersionReport { rejected: report.rejected, duplicates: report.duplicates, annotations: report.annotations, ..VersionReport::default() };
        return Ok((StatusCode::OK, axum::Json(view)).into_response());
    }
    let files: Vec<FileEntry> = next.into_values().collect();
    let version = commit(&state, &d, &files, &report, &req).await?;
    for upload in &uploads {
        forget_upload(&state, store, &upload.id).await?;
    }
    let mut view = version_view(&state, &d, version, false).await?;
    view.report = report;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// The version an earlier request with the same `request_id` made, as the answer to its retry.
async fn version_made_by(state: &AppState, d: &DatasetRow, request_id: Option<&str>) -> ApiResult<Option<Response>> {
    let Some(key) = request_id else { return Ok(None) };
    let done = sqlx::query("SELECT version FROM dataset_versions WHERE dataset_id = $1 AND request_id = $2")
        .bind(d.id)
        .bind(key)
        .fetch_optional(&state.db.pool)
        .await?;
    match done {
        Some(row) => Ok(Some((StatusCode::OK, axum::Json(version_view(state, d, row.try_get("version")?, false).await?)).into_response())),
        None => Ok(None),
    }
}

/// Fills the report's added, modified and removed files of `next` against `base` (the lists
/// cut at [`CHANGES_LISTED`], the counts whole).
fn record_changes<'a>(report: &mut VersionReport, base: &[FileEntry], next: impl Iterator<Item = &'a FileEntry>) {
    let old: BTreeMap<&str, &FileEntry> = base.iter().map(|f| (f.name.as_str(), f)).collect();
    let mut names = HashSet::new();
    for file in next {
        names.insert(file.name.as_str());
        match old.get(file.name.as_str()) {
            None => report.changes.added.push(file.name.clone()),
            Some(before) if *before != file => report.changes.modified.push(file.name.clone()),
            Some(_) => {}
        }
    }
    report.changes.removed = old.keys().filter(|n| !names.contains(**n)).map(|n| (*n).to_owned()).collect();
    (report.added, report.removed, report.modified) =
        (report.changes.added.len() as u64, report.changes.removed.len() as u64, report.changes.modified.len() as u64);
    for list in [&mut report.changes.added, &mut report.changes.removed, &mut report.changes.modified] {
        list.truncate(CHANGES_LISTED);
    }
}

/// Commits `files` as the dataset's next version (an annotation project's reviewed labels on
/// its version's images): `201` with the version, or `200` with the one a retry's
/// `request_id` made already.
pub(crate) async fn commit_files(state: &AppState, d: &DatasetRow, files: &[FileEntry], message: String, request_id: Option<String>) -> ApiResult<Response> {
    if request_id.as_ref().is_some_and(|key| key.is_empty() || key.len() > 128) {
        return Err(ApiError::field("request_id", "1 to 128 characters"));
    }
    if message.chars().count() > 2000 {
        return Err(ApiError::field("message", "at most 2000 characters"));
    }
    if let Some(done) = version_made_by(state, d, request_id.as_deref()).await? {
        return Ok(done);
    }
    let base = if d.latest > 0 { files_of(state, d.id, d.latest).await? } else { Vec::new() };
    let mut report = VersionReport::default();
    record_changes(&mut report, &base, files.iter());
    let req = CreateVersion { uploads: Vec::new(), remove: Vec::new(), message, labels: LabelSource::None, request_id };
    let version = commit(state, d, files, &report, &req).await?;
    let mut view = version_view(state, d, version, false).await?;
    view.report = report;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// How many pictures an import stores at once: the store is a network hop away (S3), and
/// one at a time leaves the decoder waiting on round trips.
const STORES_IN_FLIGHT: usize = 16;

async fn import(store: &DatasetStore, upload: &UploadRow, labels: LabelSource, budget: u64) -> ApiResult<datasets::Imported> {
    let path = store.staged(&upload.id).ok_or_else(|| ApiError::not_found("upload"))?;
    let blobs = Arc::clone(store.blobs());
    let filename = upload.filename.clone();
    // The decoder (a blocking thread) hands each new picture to a task that stores up to
    // STORES_IN_FLIGHT of them at a time; the first failure stops the import.
    let (to_store, mut pending) = tokio::sync::mpsc::channel::<(Vec<u8>, Digest)>(2 * STORES_IN_FLIGHT);
    let storing = tokio::spawn(async move {
        let mut in_flight = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                next = pending.recv(), if in_flight.len() < STORES_IN_FLIGHT => match next {
                    Some((bytes, digest)) => {
                        let blobs = Arc::clone(&blobs);
                        in_flight.push(async move { datasets::keep_blob(blobs.as_ref(), bytes, digest).await });
                    }
                    None => break,
                },
                Some(done) = in_flight.next(), if !in_flight.is_empty() => done?,
            }
        }
        while let Some(done) = in_flight.next().await {
            done?;
        }
        Ok::<(), StoreError>(())
    });
    let imported = tokio::task::spawn_blocking(move || {
        datasets::import_upload(&path, &filename, labels, datasets::ImportLimits::with_bytes(budget), &mut |bytes, digest| {
            to_store.blocking_send((bytes, digest)).map_err(|_| StoreError::Io(std::io::Error::other("the store stopped taking pictures")))
        })
    })
    .await
    .map_err(ApiError::internal)?;
    let stored = storing.await.map_err(ApiError::internal)?;
    // The store's own error explains a stop better than the channel closing does.
    stored.map_err(store_error)?;
    imported.map_err(|e| match e {
        datasets::ImportError::Unreadable(e) => ApiError::field("uploads", format!("{}: the archive does not read: {e}", upload.filename)),
        datasets::ImportError::TooManyEntries(limit) => ApiError::field("uploads", format!("{}: more than {limit} entries", upload.filename)),
        datasets::ImportError::OverQuota(left) => {
            ApiError::new(Code::QuotaExceeded, format!("{}: its pictures take more than the {left} bytes left of your quota", upload.filename))
        }
        datasets::ImportError::Store(e) => store_error(e),
    })
}

/// Writes the version and its files in one transaction; the dataset's latest version moves
/// only if no other version was committed meanwhile.
async fn commit(state: &AppState, d: &DatasetRow, files: &[FileEntry], report: &VersionReport, req: &CreateVersion) -> ApiResult<i64> {
    let version = d.latest + 1;
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let mut tx = state.db.pool.begin().await?;
    let moved = sqlx::query("UPDATE datasets SET latest_version = $1 WHERE id = $2 AND latest_version = $3")
        .bind(version)
        .bind(d.id)
        .bind(d.latest)
        .execute(&mut *tx)
        .await?;
    if moved.rows_affected() != 1 {
        return Err(ApiError::broker(
            suanli_types::ErrorCode::AlreadyExists,
            format!("another version of {} was committed meanwhile: look at it and try again", d.name),
        ));
    }
    sqlx::query(
        "INSERT INTO dataset_versions (dataset_id, version, message, created_ms, items, bytes, report, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(d.id)
    .bind(version)
    .bind(&req.message)
    .bind(now_ms())
    .bind(files.len() as i64)
    .bind(bytes as i64)
    .bind(serde_json::to_string(report).map_err(ApiError::internal)?)
    .bind(req.request_id.clone())
    .execute(&mut *tx)
    .await?;
    // Many rows per statement (a version may hold a million files); well under both
    // databases' limits on parameters.
    for chunk in files.chunks(500) {
        let mut sql = String::from("INSERT INTO dataset_files (dataset_id, version, name, sha256, size, label, width, height, objects) VALUES ");
        for i in 0..chunk.len() {
            let b = i * 9;
            if i > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9));
        }
        let mut query = sqlx::query(&sql);
        for f in chunk {
            let objects = if f.objects.is_empty() { None } else { Some(serde_json::to_string(&f.objects).map_err(ApiError::internal)?) };
            query = query
                .bind(d.id)
                .bind(version)
                .bind(f.name.clone())
                .bind(f.sha256.clone())
                .bind(f.size as i64)
                .bind(f.label.clone())
                .bind(i64::from(f.width))
                .bind(i64::from(f.height))
                .bind(objects);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(version)
}

/// Streams a version as a tar archive: every file at its name, in name order, fixed modes and
/// times (`datasets::write_archive`).
#[utoipa::path(get, path = "/api/v1/datasets/{id}/versions/{version}/archive", tag = "datasets", params(("id" = u64, Path), ("version" = u32, Path, description = "0: the latest")),
    responses((status = 200, description = "the version as a tar archive", content_type = "application/x-tar"), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn archive(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, version)): ApiPath<(u64, u32)>) -> ApiResult<Response> {
    let store = store(&state)?;
    let d = readable(&state, &p, id).await?;
    let v = pick_version(&d, version)?;
    let files = files_of(&state, d.id, v).await?;
    let (reader, writer) = tokio::io::duplex(256 * 1024);
    let blobs = Arc::clone(store.blobs());
    let runtime = tokio::runtime::Handle::current();
    let what = format!("dataset {} version {v}", d.id);
    tokio::task::spawn_blocking(move || {
        let out = tokio_util::io::SyncIoBridge::new(writer);
        if let Err(e) = write_version(out, &files, &blobs, &runtime) {
            // The client sees the archive end early (no end-of-archive blocks): tar says so.
            tracing::warn!(%what, error = %e, "an archive stopped part way");
        }
    });
    let name = format!("{}-v{v}.tar", d.name);
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar")),
            (header::CONTENT_DISPOSITION, HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")).map_err(ApiError::internal)?),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(reader)),
    )
        .into_response())
}

/// Writes a version's archive to `out` on a blocking thread, reading each file from `blobs`.
pub fn write_version<W: std::io::Write>(
    out: W,
    files: &[FileEntry],
    blobs: &Arc<dyn suanli_artifacts::Store>,
    runtime: &tokio::runtime::Handle,
) -> Result<W, StoreError> {
    datasets::write_archive(out, files, &mut |f| {
        let digest: Digest = f.sha256.parse()?;
        let opened = runtime.block_on(blobs.open(digest, 0, f.size))?;
        Ok(Box::new(tokio_util::io::SyncIoBridge::new_with_handle(opened.reader, runtime.clone())) as Box<dyn std::io::Read>)
    })
}

#[derive(Deserialize, IntoParams)]
pub struct SplitQuery {
    /// Shares of the version for training, validation and test (summing to 1); 0.8/0.1/0.1
    /// when left out.
    pub train: Option<f32>,
    pub val: Option<f32>,
    pub test: Option<f32>,
    /// `random`, or `stratified` (every label keeps its share in each part; needs labels).
    pub method: Option<String>,
    /// The same seed and version always give the same split.
    pub seed: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct SplitView {
    pub version: u32,
    pub seed: u64,
    pub method: String,
    /// File names, each list in name order.
    pub train: Vec<String>,
    pub val: Vec<String>,
    pub test: Vec<String>,
}

/// A reproducible train/validation/test split of a version (`suanli_cv::dataset::split`: the
/// same files, ratios and seed always give the same parts, whatever order they came in).
#[utoipa::path(get, path = "/api/v1/datasets/{id}/versions/{version}/split", tag = "datasets",
    params(("id" = u64, Path), ("version" = u32, Path, description = "0: the latest"), SplitQuery),
    responses((status = 200, body = SplitView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn split(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, version)): ApiPath<(u64, u32)>,
    ApiQuery(q): ApiQuery<SplitQuery>,
) -> ApiResult<axum::Json<SplitView>> {
    use suanli_cv::dataset::{Item, SplitMethod, SplitSpec};
    let method = match q.method.as_deref().unwrap_or("random") {
        "random" => SplitMethod::Random,
        "stratified" => SplitMethod::Stratified,
        other => return Err(ApiError::field("method", format!("random or stratified, not {other:?}"))),
    };
    let spec = SplitSpec { train: q.train.unwrap_or(0.8), val: q.val.unwrap_or(0.1), test: q.test.unwrap_or(0.1), method, seed: q.seed.unwrap_or(0) };
    let problems: Vec<suanli_types::FieldError> = spec.validate().into_iter().map(|e| suanli_types::FieldError::new(&e.path, e.message.clone())).collect();
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    let d = readable(&state, &p, id).await?;
    let v = pick_version(&d, version)?;
    let items: Vec<Item> = files_of(&state, d.id, v).await?.into_iter().map(|f| Item { name: f.name, sha256: f.sha256, label: f.label }).collect();
    let parts = suanli_cv::dataset::split(&items, &spec).map_err(|e| ApiError::field("method", e.to_string()))?;
    let names = |items: Vec<Item>| items.into_iter().map(|i| i.name).collect();
    Ok(axum::Json(SplitView {
        version: v as u32,
        seed: spec.seed,
        method: q.method.unwrap_or_else(|| "random".into()),
        train: names(parts.train),
        val: names(parts.val),
        test: names(parts.test),
    }))
}

#[derive(Deserialize, IntoParams)]
pub struct FileQuery {
    /// A PNG no larger than this many pixels on either side (16 to 512), instead of the file.
    pub thumbnail: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/datasets/{id}/versions/{version}/files/{name}", tag = "datasets",
    params(("id" = u64, Path), ("version" = u32, Path, description = "0: the latest"), ("name" = String, Path), FileQuery),
    responses((status = 200, description = "the file's bytes, or its thumbnail", content_type = "application/octet-stream"), (status = 400, body = crate::error::ErrorBody),
        (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn file(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, version, name)): ApiPath<(u64, u32, String)>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> ApiResult<Response> {
    let store = store(&state)?;
    let d = readable(&state, &p, id).await?;
    let v = pick_version(&d, version)?;
    let row = sqlx::query("SELECT sha256, size FROM dataset_files WHERE dataset_id = $1 AND version = $2 AND name = $3")
        .bind(d.id)
        .bind(v)
        .bind(&name)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("{name:?} in version {v} of {}", d.name)))?;
    let sha256: String = row.try_get("sha256")?;
    blob_response(store, &sha256, row.try_get::<i64, _>("size")? as u64, q.thumbnail).await
}

/// A stored picture's bytes as a response, or a PNG thumbnail of it `edge` pixels on its
/// longer side (the dataset browser and image search results show them).
pub(crate) async fn blob_response(store: &DatasetStore, sha256: &str, size: u64, thumbnail: Option<u32>) -> ApiResult<Response> {
    let digest: Digest = sha256.parse().map_err(ApiError::internal)?;
    let opened = store.blobs().open(digest, 0, size).await.map_err(store_error)?;
    let Some(edge) = thumbnail else {
        return Ok((
            [
                (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
                (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400, immutable")),
            ],
            Body::from_stream(tokio_util::io::ReaderStream::new(opened.reader)),
        )
            .into_response());
    };
    if !(16..=512).contains(&edge) {
        return Err(ApiError::field("thumbnail", "16 to 512 pixels"));
    }
    // A few at a time: each holds a whole picture's pixels while it is shrunk.
    let _turn = store.thumbnails.acquire().await.map_err(ApiError::internal)?;
    let mut bytes = Vec::with_capacity(size as usize);
    let mut reader = opened.reader;
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes).await.map_err(ApiError::internal)?;
    let limits = suanli_cv::intake::IntakeLimits { max_pixels: datasets::THUMBNAIL_MAX_PIXELS, ..suanli_cv::intake::IntakeLimits::default() };
    let png =
        tokio::task::spawn_blocking(move || suanli_cv::intake::thumbnail_png(&bytes, edge, &limits)).await.map_err(ApiError::internal)?.map_err(
            |e| match e {
                suanli_cv::intake::IntakeError::TooLarge { detail, .. } => {
                    ApiError::field("thumbnail", format!("too large to make a thumbnail of ({detail}): fetch the file itself"))
                }
                other => ApiError::internal(other),
            },
        )?;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static("image/png")), (header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400, immutable"))],
        png,
    )
        .into_response())
}

pub(crate) async fn user_named(state: &AppState, username: &str) -> ApiResult<i64> {
    let row = sqlx::query("SELECT id FROM users WHERE username = $1 AND kind = 'researcher' AND state = 'active'")
        .bind(username)
        .fetch_optional(&state.db.pool)
        .await?;
    Ok(row.ok_or_else(|| ApiError::not_found(format!("researcher {username}")))?.try_get("id")?)
}

#[utoipa::path(put, path = "/api/v1/datasets/{id}/shares/{username}", tag = "datasets", params(("id" = u64, Path), ("username" = String, Path)),
    responses((status = 204), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn share(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, username)): ApiPath<(u64, String)>) -> ApiResult<Response> {
    let d = owned(&state, &p, id).await?;
    let user = user_named(&state, &username).await?;
    if user == p.user.0 {
        return Err(ApiError::field("username", "the dataset is yours already"));
    }
    let inserted = sqlx::query("INSERT INTO dataset_shares (dataset_id, user_id) VALUES ($1, $2)").bind(d.id).bind(user).execute(&state.db.pool).await;
    match inserted {
        Err(e) if crate::db::Db::is_unique_violation(&e) => {}
        other => {
            other?;
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(delete, path = "/api/v1/datasets/{id}/shares/{username}", tag = "datasets", params(("id" = u64, Path), ("username" = String, Path)),
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn unshare(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, username)): ApiPath<(u64, String)>) -> ApiResult<Response> {
    let d = owned(&state, &p, id).await?;
    let user = user_named(&state, &username).await?;
    sqlx::query("DELETE FROM dataset_shares WHERE dataset_id = $1 AND user_id = $2").bind(d.id).bind(user).execute(&state.db.pool).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The version a job input names (`digits@2`, `bob/digits`, `12@3`), if `p` may read it.
pub async fn resolve(state: &AppState, p: &Principal, reference: &DatasetRef) -> ApiResult<(DatasetRow, i64)> {
    let visible = datasets_of(state, p).await?;
    let named = |d: &&DatasetView| {
        (d.name == reference.name || d.dataset_id.to_string() == reference.name)
            && match &reference.owner {
                Some(owner) => &d.owner == owner,
                None => true,
            }
    };
    // One's own dataset of that name; else the one shared under it, if only one is.
    let candidates: Vec<&DatasetView> = visible.iter().filter(named).collect();
    let found = match (candidates.iter().find(|d| d.mine), candidates.as_slice()) {
        (Some(mine), _) => *mine,
        (None, [only]) => *only,
        (None, []) => return Err(ApiError::not_found(format!("dataset {}", reference.name))),
        (None, several) => {
            let owners: Vec<String> = several.iter().map(|d| format!("{}/{}", d.owner, d.name)).collect();
            return Err(ApiError::field("dataset", format!("{} names several datasets shared with you: write one of {}", reference.name, owners.join(", "))));
        }
    };
    let d = readable(state, p, found.dataset_id).await?;
    let v = pick_version(&d, reference.version.unwrap_or(0))?;
    Ok((d, v))
}

/// Puts a version's archive in the job artifact store as `p` (an upload-only capability the
/// broker signs for their account), and returns its SHA-256 for the job spec.
pub async fn stage_for_job(state: &AppState, p: &Principal, d: &DatasetRow, version: i64) -> ApiResult<String> {
    let store = store(state)?;
    let artifacts =
        state.artifacts.as_ref().ok_or_else(|| ApiError::new(Code::Broker(suanli_types::ErrorCode::Unavailable), "this portal reaches no artifact store"))?;
    let files = files_of(state, d.id, version).await?;
    let dir = tempfile::Builder::new().prefix("suanli-dataset-").tempdir_in(store.staging_dir()).map_err(ApiError::internal)?;
    let path = dir.path().join("archive.tar");
    let (blobs, runtime, target) = (Arc::clone(store.blobs()), tokio::runtime::Handle::current(), path.clone());
    tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
        let file = std::io::BufWriter::new(std::fs::File::create(&target)?);
        let file = write_version(file, &files, &blobs, &runtime)?;
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(store_error)?;
    let purpose = format!("dataset {} version {version}", d.id);
    let grant =
        state.market.jobs_as(&p.broker_token(state)?)?.grant_artifact_upload(suanli_proto::v1::GrantArtifactUploadRequest { purpose }).await?.into_inner();
    let client = artifacts.client(&grant.capability).map_err(ApiError::internal)?;
    let digest = client.upload_file(&path).await.map_err(|e| match e {
        suanli_artifacts::ClientError::Refused { status: 413, body } => {
            ApiError::new(Code::QuotaExceeded, format!("the artifact store refused the dataset: {body}"))
        }
        other => ApiError::unavailable(format!("the artifact store: {other}")),
    })?;
    Ok(digest.to_hex())
}

/// Records which dataset versions a job was given (a model's lineage starts there).
pub async fn record_job_inputs(state: &AppState, job_id: u64, inputs: &[(String, i64, i64)]) -> ApiResult<()> {
    for (input, dataset, version) in inputs {
        let inserted = sqlx::query("INSERT INTO job_datasets (job_id, input, dataset_id, version) VALUES ($1, $2, $3, $4)")
            .bind(job_id as i64)
            .bind(input)
            .bind(dataset)
            .bind(version)
            .execute(&state.db.pool)
            .await;
        match inserted {
            Err(e) if crate::db::Db::is_unique_violation(&e) => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

/// `name@version` of the datasets a job was given, by input name.
pub async fn job_inputs(state: &AppState, job_id: u64) -> ApiResult<BTreeMap<String, String>> {
    let rows = sqlx::query("SELECT j.input, d.name, u.username, j.version FROM job_datasets j JOIN datasets d ON d.id = j.dataset_id JOIN users u ON u.id = d.owner WHERE j.job_id = $1")
        .bind(job_id as i64)
        .fetch_all(&state.db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("input")?,
                format!("{}/{}@{}", r.try_get::<String, _>("username")?, r.try_get::<String, _>("name")?, r.try_get::<i64, _>("version")?),
            ))
        })
        .collect()
}

impl DatasetRow {
    pub fn id(&self) -> i64 {
        self.id
    }
}
