//! Similar-image search (seed 003) over a researcher's library (`mine`) and the `global` one:
//! add a dataset version's images (indexed asynchronously, with status), search by an uploaded
//! image or by one already in a library ("more like this"), remove an image. How libraries
//! and indexes work: `crate::image_search`.
//!
//! Who sees what: `mine` is always the caller's own library, so no request can name another's;
//! `global` is searched by every researcher, and grows by researchers contributing dataset
//! versions they own (each image then shows to everyone); an image leaves the global library
//! only at the request of whoever added it.

use std::collections::{HashMap, HashSet};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use suanli_search::ModelVersion;
use utoipa::{IntoParams, ToSchema};

use super::datasets::{files_of, owned, pick_version, readable};
use super::{ApiJson, ApiPath, ApiQuery};
use crate::auth::{Operator, Principal, Researcher};
use crate::db::{new_id, opt_i64, opt_str};
use crate::error::{ApiError, ApiResult, Code};
use crate::image_search::{library_id, read_image, ImageSearch, IndexState, LibraryName};
use crate::model::Permission;
use crate::state::AppState;

/// The largest query image accepted (the embedder decodes it; 16 MiB is a 24-megapixel JPEG).
pub const MAX_QUERY_BYTES: usize = crate::image_search::MAX_IMAGE_BYTES as usize;
/// The most results one search returns.
pub const MAX_TOP: u32 = 100;

/// The search engine; a portal without an embedder offers no image search (`NOT_FOUND`, as a
/// portal outside any federation answers for the federation's endpoints).
fn engine(state: &AppState) -> ApiResult<&ImageSearch> {
    state
        .image_search
        .as_deref()
        .ok_or_else(|| ApiError::broker(suanli_types::ErrorCode::NotFound, "this portal offers no image search (it has no --image-embedder-url)"))
}

fn library_name(s: &str) -> ApiResult<LibraryName> {
    LibraryName::parse(s).ok_or_else(|| ApiError::field("library", "mine or global"))
}

#[derive(Serialize, ToSchema)]
pub struct LibraryView {
    /// `mine` or `global`.
    pub library: String,
    /// `done`, `queued`, `running` or `failed`.
    pub state: String,
    /// Why the last indexing attempt stopped (with `failed`).
    pub error: Option<String>,
    /// The model version its vectors come from (none before the first is indexed).
    pub model: Option<String>,
    pub images: u64,
    pub indexed: u64,
    pub waiting: u64,
    /// Images that could not be indexed (not decodable, over 16 MiB, their bytes gone).
    pub failed: u64,
}

async fn library_view(state: &AppState, p: &Principal, name: LibraryName) -> ApiResult<LibraryView> {
    let id = library_id(state, p.user.0, name).await?;
    let row = sqlx::query(
        "SELECT l.state, l.error, l.model,
                (SELECT COUNT(*) FROM library_images i WHERE i.library_id = l.id) AS images,
                (SELECT COUNT(*) FROM library_images i WHERE i.library_id = l.id AND i.indexed = 1) AS indexed,
                (SELECT COUNT(*) FROM library_images i WHERE i.library_id = l.id AND i.indexed = 0) AS waiting,
                (SELECT COUNT(*) FROM library_images i WHERE i.library_id = l.id AND i.indexed = -1) AS failed
         FROM image_libraries l WHERE l.id = $1",
    )
    .bind(id)
    .fetch_one(&state.db.pool)
    .await?;
    let count = |c: &str| -> ApiResult<u64> { Ok(row.try_get::<i64, _>(c)?.max(0) as u64) };
    Ok(LibraryView {
        library: name.as_str().into(),
        state: IndexState::parse(&row.try_get::<String, _>("state")?).as_str().into(),
        error: opt_str(&row, "error")?,
        model: opt_str(&row, "model")?,
        images: count("images")?,
        indexed: count("indexed")?,
        waiting: count("waiting")?,
        failed: count("failed")?,
    })
}

/// The caller's library and the global one, with their indexing status.
pub async fn libraries_of(state: &AppState, p: &Principal) -> ApiResult<Vec<LibraryView>> {
    Ok(vec![library_view(state, p, LibraryName::Mine).await?, library_view(state, p, LibraryName::Global).await?])
}

#[utoipa::path(get, path = "/api/v1/image-libraries", tag = "image search",
    responses((status = 200, body = [LibraryView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, Researcher(p): Researcher) -> ApiResult<axum::Json<Vec<LibraryView>>> {
    Ok(axum::Json(libraries_of(&state, &p).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddDataset {
    pub dataset: u64,
    /// 0 (or absent): the latest version.
    #[serde(default)]
    pub version: u32,
}

#[derive(Serialize, ToSchema)]
pub struct Added {
    /// Images new to the library, now waiting to be indexed.
    pub added: u64,
    /// Images the library already held (by content): indexing twice adds nothing.
    pub already_present: u64,
}

/// Adds a dataset version's images to a library and wakes the indexer; the caller must be
/// able to read the dataset, and own it to contribute it to the global library.
pub async fn add_dataset_images(state: &AppState, p: &Principal, name: LibraryName, req: &AddDataset) -> ApiResult<Added> {
    engine(state)?;
    let d = match name {
        LibraryName::Mine => readable(state, p, req.dataset).await?,
        LibraryName::Global => owned(state, p, req.dataset).await?,
    };
    let version = pick_version(&d, req.version)?;
    let files = files_of(state, d.id(), version).await?;
    let library = library_id(state, p.user.0, name).await?;
    let mut tx = state.db.pool.begin().await?;
    let mut added = 0;
    for f in &files {
        let done = sqlx::query(
            "INSERT INTO library_images (library_id, item_key, sha256, size, name, dataset_id, version, label, added_by, indexed, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, NULL) ON CONFLICT DO NOTHING",
        )
        .bind(library)
        .bind(new_id())
        .bind(&f.sha256)
        .bind(f.size as i64)
        .bind(&f.name)
        .bind(d.id())
        .bind(version)
        .bind(f.label.as_deref())
        .bind(p.user.0)
        .execute(&mut *tx)
        .await?;
        added += done.rows_affected();
    }
    if added > 0 {
        sqlx::query("UPDATE image_libraries SET state = 'queued', error = NULL, updated_ms = $1 WHERE id = $2")
            .bind(crate::db::now_ms())
            .bind(library)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    if let Some(search) = &state.image_search {
        search.wake.notify_one();
    }
    Ok(Added { added, already_present: files.len() as u64 - added })
}

#[utoipa::path(post, path = "/api/v1/image-libraries/{library}/datasets", tag = "image search", request_body = AddDataset,
    params(("library" = String, Path, description = "mine or global")),
    responses((status = 202, body = Added), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn add_dataset(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(library): ApiPath<String>,
    ApiJson(req): ApiJson<AddDataset>,
) -> ApiResult<Response> {
    let name = library_name(&library)?;
    Ok((StatusCode::ACCEPTED, axum::Json(add_dataset_images(&state, &p, name, &req).await?)).into_response())
}

/// Starts library `id` over with the embedder's current model: every picture waits again.
/// The rows are reset before the index goes, so a crash in between leaves pictures queued
/// (the next load finds no index and indexes them), never rows that claim a vector.
async fn rebuild_library(state: &AppState, id: i64) -> ApiResult<()> {
    let search = engine(state)?;
    let _writer = search.writer(id).await;
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("UPDATE library_images SET indexed = 0, error = NULL WHERE library_id = $1").bind(id).execute(&mut *tx).await?;
    sqlx::query("UPDATE image_libraries SET model = NULL, state = 'queued', error = NULL, updated_ms = $1 WHERE id = $2")
        .bind(crate::db::now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    search.drop_index(id).await?;
    search.wake.notify_one();
    Ok(())
}

/// Starts the caller's library over with the embedder's current model.
#[utoipa::path(post, path = "/api/v1/image-libraries/{library}/rebuild", tag = "image search",
    params(("library" = String, Path, description = "mine (the global library: POST /api/v1/operator/image-libraries/global/rebuild)")),
    responses((status = 202, body = LibraryView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn rebuild(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(library): ApiPath<String>) -> ApiResult<Response> {
    if library_name(&library)? != LibraryName::Mine {
        return Err(ApiError::forbidden("only your own library: the global one is rebuilt by operators"));
    }
    rebuild_library(&state, library_id(&state, p.user.0, LibraryName::Mine).await?).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(library_view(&state, &p, LibraryName::Mine).await?)).into_response())
}

/// Operators who may intervene rebuild the global library (after the embedder's model changed).
#[utoipa::path(post, path = "/api/v1/operator/image-libraries/global/rebuild", tag = "operator",
    responses((status = 202, body = LibraryView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn rebuild_global(State(state): State<AppState>, Operator(p): Operator) -> ApiResult<Response> {
    if !p.can(Permission::Intervene) {
        return Err(ApiError::forbidden("rebuilding the global image library needs the dispatcher or operator role"));
    }
    rebuild_library(&state, library_id(&state, p.user.0, LibraryName::Global).await?).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(library_view(&state, &p, LibraryName::Global).await?)).into_response())
}

struct ImageRow {
    key: i64,
    size: i64,
    added_by: i64,
}

/// Whether the dataset a library row came from is still readable by the caller (`$U`): a
/// picture added to one's own library from a dataset shared with one leaves it, for that
/// researcher, when the share or the dataset goes.
const STILL_READABLE: &str = "EXISTS (SELECT 1 FROM datasets d WHERE d.id = i.dataset_id AND (d.owner = $U OR EXISTS (SELECT 1 FROM dataset_shares s WHERE s.dataset_id = d.id AND s.user_id = $U)))";

/// A picture of library `library` by its hash; with `readable_by`, only while that user may
/// still read the dataset it came from.
async fn image_in(state: &AppState, library: i64, sha256: &str, readable_by: Option<i64>) -> ApiResult<ImageRow> {
    let readable = match readable_by {
        Some(_) => STILL_READABLE.replace("$U", "$3"),
        None => "$3 = $3".to_owned(),
    };
    let sql = format!("SELECT i.item_key, i.size, i.added_by FROM library_images i WHERE i.library_id = $1 AND i.sha256 = $2 AND {readable}");
    let row = sqlx::query(&sql)
        .bind(library)
        .bind(sha256)
        .bind(readable_by.unwrap_or(0))
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("image {sha256} in this library")))?;
    Ok(ImageRow { key: row.try_get("item_key")?, size: row.try_get("size")?, added_by: row.try_get("added_by")? })
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ImageQuery {
    /// A PNG of at most this many pixels on its longer side (16 to 512) instead of the file.
    pub thumbnail: Option<u32>,
}

#[utoipa::path(get, path = "/api/v1/image-libraries/{library}/images/{sha256}", tag = "image search",
    params(("library" = String, Path), ("sha256" = String, Path), ImageQuery),
    responses((status = 200, description = "the image, or its thumbnail"), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn image(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((library, sha256)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<ImageQuery>,
) -> ApiResult<Response> {
    let name = library_name(&library)?;
    let id = library_id(&state, p.user.0, name).await?;
    let row = image_in(&state, id, &sha256, (name == LibraryName::Mine).then_some(p.user.0)).await?;
    let store = state.datasets.as_deref().ok_or_else(|| ApiError::unavailable("this portal keeps no datasets"))?;
    super::datasets::blob_response(store, &sha256, row.size as u64, q.thumbnail).await
}

#[utoipa::path(delete, path = "/api/v1/image-libraries/{library}/images/{sha256}", tag = "image search",
    params(("library" = String, Path), ("sha256" = String, Path)),
    responses((status = 204), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 503, body = crate::error::ErrorBody)))]
pub async fn remove_image(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((library, sha256)): ApiPath<(String, String)>,
) -> ApiResult<Response> {
    let search = engine(&state)?;
    let name = library_name(&library)?;
    let id = library_id(&state, p.user.0, name).await?;
    // One's own library is cleaned up whatever became of the datasets its pictures came from.
    let row = image_in(&state, id, &sha256, None).await?;
    if name == LibraryName::Global && row.added_by != p.user.0 {
        return Err(ApiError::forbidden("only whoever added an image to the global library removes it"));
    }
    // Out of the index first: a crash in between leaves a row the next load indexes again,
    // never a vector no row explains.
    let _writer = search.writer(id).await;
    search.remove(&state, id, row.key).await?;
    sqlx::query("DELETE FROM library_images WHERE library_id = $1 AND item_key = $2").bind(id).bind(row.key).execute(&state.db.pool).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// The caller's library and the global one.
    #[default]
    All,
    Mine,
    Global,
}

impl Scope {
    fn libraries(self) -> &'static [LibraryName] {
        match self {
            Scope::All => &[LibraryName::Mine, LibraryName::Global],
            Scope::Mine => &[LibraryName::Mine],
            Scope::Global => &[LibraryName::Global],
        }
    }
}

#[derive(Clone, Deserialize, IntoParams, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    #[serde(default)]
    pub library: Scope,
    /// How many results (1 to 100; default 20).
    pub top: Option<u32>,
    /// Only images that came from this dataset.
    pub dataset: Option<u64>,
    /// Only images with this label.
    pub label: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct SearchHit {
    /// `mine` or `global`.
    pub library: String,
    pub sha256: String,
    pub name: String,
    /// The dataset it came from, when the caller may read that dataset.
    pub dataset_id: Option<u64>,
    pub dataset: Option<String>,
    pub version: u32,
    pub label: Option<String>,
    /// Cosine similarity, 1 for the same picture.
    pub score: f32,
    /// Where the picture is (add `?thumbnail=160` for a small one).
    pub url: String,
}

#[derive(Serialize, ToSchema)]
pub struct SearchResults {
    pub model: String,
    pub results: Vec<SearchHit>,
    /// Libraries not searched, and why (one indexed with another model and not yet rebuilt).
    pub skipped: Vec<Skipped>,
    pub took_ms: f64,
}

#[derive(Serialize, ToSchema)]
pub struct Skipped {
    pub library: String,
    pub reason: String,
}

fn check_query(q: &SearchQuery) -> ApiResult<usize> {
    let top = q.top.unwrap_or(20);
    if !(1..=MAX_TOP).contains(&top) {
        return Err(ApiError::field("top", format!("between 1 and {MAX_TOP}")));
    }
    if q.dataset.is_some_and(|d| d == 0 || d > i64::MAX as u64) {
        return Err(ApiError::field("dataset", "a dataset's ID"));
    }
    if q.label.as_ref().is_some_and(|l| l.is_empty() || l.len() > 200) {
        return Err(ApiError::field("label", "1 to 200 characters"));
    }
    Ok(top as usize)
}

/// The best `top` images of the libraries `q` names for `vector`, best first (`q` checked,
/// `top` its count, by [`check_query`] before the picture was embedded).
async fn search_with(
    state: &AppState,
    p: &Principal,
    (model, vector): (ModelVersion, Vec<f32>),
    q: &SearchQuery,
    top: usize,
    started: std::time::Instant,
) -> ApiResult<SearchResults> {
    let (model, vector) = (&model, vector.as_slice());
    let search = engine(state)?;
    let mut hits: Vec<(LibraryName, i64, u64, f32)> = Vec::new();
    let mut skipped = Vec::new();
    for &name in q.library.libraries() {
        let id = library_id(state, p.user.0, name).await?;
        let Some(index) = search.index(state, id).await? else { continue };
        let allowed: Option<HashSet<u64>> = if q.dataset.is_some() || q.label.is_some() {
            let rows = sqlx::query(
                "SELECT item_key FROM library_images WHERE library_id = $1 AND indexed = 1 AND ($2 < 0 OR dataset_id = $2) AND ($3 = '' OR label = $3)",
            )
            .bind(id)
            .bind(q.dataset.map_or(-1, |d| d as i64))
            .bind(q.label.as_deref().unwrap_or(""))
            .fetch_all(&state.db.pool)
            .await?;
            Some(rows.iter().map(|r| r.try_get::<i64, _>("item_key").map(|k| k as u64)).collect::<Result<_, _>>()?)
        } else {
            None
        };
        let found = {
            let guard = index.read().map_err(|_| ApiError::internal("index lock poisoned"))?;
            let filter = allowed.as_ref().map(|set| move |k: u64| set.contains(&k));
            guard.search(model, vector, top, filter.as_ref().map(|f| f as &dyn Fn(u64) -> bool))
        };
        match found {
            Ok(found) => hits.extend(found.into_iter().map(|h| (name, id, h.key, h.score))),
            Err(suanli_search::SearchError::ModelMismatch { index, given }) => skipped.push(Skipped {
                library: name.as_str().into(),
                reason: format!("indexed with model {index}, the query was embedded by {given}: rebuild the library"),
            }),
            Err(
                e @ (suanli_search::SearchError::NotNormalised { .. } | suanli_search::SearchError::NotFinite | suanli_search::SearchError::Dimension { .. }),
            ) => return Err(ApiError::new(Code::BadImage, format!("the embedder made no usable vector of this picture: {e}"))),
            Err(e) => return Err(ApiError::internal(e)),
        }
    }
    hits.sort_by(|a, b| b.3.total_cmp(&a.3));
    hits.truncate(top);
    let mut results = Vec::with_capacity(hits.len());
    let mut rows_by_library: HashMap<i64, HashMap<i64, sqlx::any::AnyRow>> = HashMap::new();
    let readable = STILL_READABLE.replace("$U", "$2");
    for (name, id, _, _) in &hits {
        if rows_by_library.contains_key(id) {
            continue;
        }
        let keys: Vec<String> = hits.iter().filter(|h| h.1 == *id).map(|h| (h.2 as i64).to_string()).collect();
        // In one's own library, a picture whose dataset one can no longer read (a share
        // withdrawn) is not shown; in the global one, the dataset is named only to those who
        // may read it.
        let only_readable = if *name == LibraryName::Mine { format!(" AND {readable}") } else { String::new() };
        // Keys are integers we produced, so the IN list is safe to write out.
        let sql = format!(
            "SELECT i.item_key, i.sha256, i.name, i.version, i.label,
                    CASE WHEN {readable} THEN d.name ELSE NULL END AS dataset, CASE WHEN {readable} THEN i.dataset_id ELSE NULL END AS dataset_id
             FROM library_images i LEFT JOIN datasets d ON d.id = i.dataset_id WHERE i.library_id = $1 AND i.item_key IN ({}){only_readable}",
            keys.join(",")
        );
        let rows = sqlx::query(&sql).bind(*id).bind(p.user.0).fetch_all(&state.db.pool).await?;
        let by_key = rows.into_iter().map(|r| Ok((r.try_get::<i64, _>("item_key")?, r))).collect::<Result<HashMap<_, _>, sqlx::Error>>()?;
        rows_by_library.insert(*id, by_key);
    }
    for (name, id, key, score) in hits {
        // A hit whose row went (removed between the search and this read) is dropped.
        let Some(r) = rows_by_library.get(&id).and_then(|m| m.get(&(key as i64))) else { continue };
        let sha256: String = r.try_get("sha256")?;
        results.push(SearchHit {
            library: name.as_str().into(),
            url: format!("/api/v1/image-libraries/{}/images/{sha256}", name.as_str()),
            sha256,
            name: r.try_get("name")?,
            dataset_id: opt_i64(r, "dataset_id")?.map(|d| d as u64),
            dataset: opt_str(r, "dataset")?,
            version: opt_i64(r, "version")?.unwrap_or_default() as u32,
            label: opt_str(r, "label")?,
            score,
        });
    }
    Ok(SearchResults { model: model.to_string(), results, skipped, took_ms: started.elapsed().as_secs_f64() * 1000.0 })
}

/// Searches by the image in the request body (raw bytes: JPEG, PNG or TIFF, cropped in the
/// browser if the user wished).
pub async fn search_by_bytes(state: &AppState, p: &Principal, bytes: Vec<u8>, q: &SearchQuery) -> ApiResult<SearchResults> {
    let started = std::time::Instant::now();
    let top = check_query(q)?;
    if bytes.is_empty() {
        return Err(ApiError::new(Code::BadImage, "send the query image as the request body"));
    }
    let embedded = engine(state)?.embed(bytes).await?;
    search_with(state, p, embedded, q, top, started).await
}

#[utoipa::path(post, path = "/api/v1/image-search", tag = "image search", params(SearchQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the query image: JPEG, PNG or TIFF, at most 16 MiB"),
    responses((status = 200, body = SearchResults), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn search(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiQuery(q): ApiQuery<SearchQuery>,
    request: Request,
) -> ApiResult<axum::Json<SearchResults>> {
    let bytes = axum::body::to_bytes(request.into_body(), MAX_QUERY_BYTES)
        .await
        .map_err(|_| ApiError::new(Code::PayloadTooLarge, format!("the query image is over {MAX_QUERY_BYTES} bytes")))?;
    Ok(axum::Json(search_by_bytes(&state, &p, bytes.to_vec(), &q).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimilarTo {
    /// The library the picture is in: `mine` or `global`.
    pub from: String,
    pub sha256: String,
    /// Where to search: `all` (default), `mine` or `global`.
    #[serde(default)]
    pub library: Scope,
    pub top: Option<u32>,
    pub dataset: Option<u64>,
    pub label: Option<String>,
}

/// "More like this": searches by an image already in one of the caller's libraries.
pub async fn search_similar(state: &AppState, p: &Principal, req: &SimilarTo) -> ApiResult<SearchResults> {
    let started = std::time::Instant::now();
    let query = SearchQuery { library: req.library, top: req.top, dataset: req.dataset, label: req.label.clone() };
    let top = check_query(&query)?;
    let name = library_name(&req.from)?;
    let id = library_id(state, p.user.0, name).await?;
    let row = image_in(state, id, &req.sha256, (name == LibraryName::Mine).then_some(p.user.0)).await?;
    if row.size as u64 > crate::image_search::MAX_IMAGE_BYTES {
        return Err(ApiError::new(
            Code::PayloadTooLarge,
            format!("this picture is over {} bytes: too large to search by", crate::image_search::MAX_IMAGE_BYTES),
        ));
    }
    let bytes = read_image(state, &req.sha256, row.size).await?;
    let embedded = engine(state)?.embed(bytes).await?;
    search_with(state, p, embedded, &query, top, started).await
}

#[utoipa::path(post, path = "/api/v1/image-search/similar", tag = "image search", request_body = SimilarTo,
    responses((status = 200, body = SearchResults), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 413, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn similar(State(state): State<AppState>, Researcher(p): Researcher, ApiJson(req): ApiJson<SimilarTo>) -> ApiResult<axum::Json<SearchResults>> {
    Ok(axum::Json(search_similar(&state, &p, &req).await?))
}
