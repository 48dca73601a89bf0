//! Similar-image search (seed 003): image libraries, their vector indexes, and the indexer.
//!
//! A **library** is a set of images by content: each researcher's own (`mine`) and one
//! `global` library every researcher may search. Images come into a library from dataset
//! versions (`image_libraries`, `library_images` in SQL: what is in it, indexed or not, and
//! why an image failed); their vectors live in one `suanli-search` index per library, on this
//! portal's disk (`<data dir>/search/<library id>/`). The SQL rows are the truth, the index a
//! cache of them: at load, rows marked indexed whose key the index lacks (a crash before the
//! index was saved, a lost folder) are queued again; a key never outlives its row, since it
//! leaves the index before the row is deleted.
//!
//! **Vectors** come from the embedder, a `suanli-job serve` in `embed` mode (`--image-embedder-url`;
//! on a leased card, or on this host's CPU): the same service embeds library images (the
//! indexer, in batches) and queries (one at a time), so both are always the same model. Each
//! index is pinned to the model version of its first vector and refuses any other; when the
//! embedder's model changes, indexing a library built with the old one fails with the reason
//! and the library must be rebuilt (`POST …/rebuild`).
//!
//! **Isolation** is by name, not by ID: the API names `mine` (the caller's own) or `global`,
//! so no request can even name another researcher's library.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use sqlx::Row;
use suanli_search::{IndexParams, LibraryIndex, ModelVersion, SearchError, Space};

use crate::db::now_ms;
use crate::error::{ApiError, ApiResult, Code};
use crate::state::AppState;

/// The global library's owner column (no user has ID 0).
pub const GLOBAL_OWNER: i64 = 0;
/// Images sent to the embedder in one request (its `/v1/predict/batch` takes up to 4×max_batch).
const INDEX_BATCH: usize = 16;
/// The largest picture indexed (and searched by, as a query or "more like this").
pub const MAX_IMAGE_BYTES: u64 = 16 << 20;
/// Raw bytes sent to the embedder in one batch (base64 makes them a third larger; the embedder
/// takes 32 MiB a request), unless one picture alone is larger.
const BATCH_BYTES: u64 = 8 << 20;
/// Vectors added to an index between saves (and always when a library's queue empties): a
/// crash loses at most these, which the next start queues again.
const SAVE_EVERY: usize = 2048;
/// How long a library whose indexing failed waits before it is tried again.
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);
/// How often the indexer looks for work when nobody woke it.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// Which library a request names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibraryName {
    Mine,
    Global,
}

impl LibraryName {
    pub fn parse(s: &str) -> Option<LibraryName> {
        match s {
            "mine" => Some(LibraryName::Mine),
            "global" => Some(LibraryName::Global),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            LibraryName::Mine => "mine",
            LibraryName::Global => "global",
        }
    }
    fn owner(self, user: i64) -> i64 {
        match self {
            LibraryName::Mine => user,
            LibraryName::Global => GLOBAL_OWNER,
        }
    }
}

/// A library's indexing state, as the page and the API show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexState {
    /// Nothing waits to be indexed.
    Done,
    /// Images wait; the indexer has not reached them yet.
    Queued,
    Running,
    /// The last attempt stopped; `error` says why (the embedder's model changed, it is down…).
    Failed,
}

impl IndexState {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexState::Done => "done",
            IndexState::Queued => "queued",
            IndexState::Running => "running",
            IndexState::Failed => "failed",
        }
    }
    pub fn parse(s: &str) -> IndexState {
        match s {
            "queued" => IndexState::Queued,
            "running" => IndexState::Running,
            "failed" => IndexState::Failed,
            _ => IndexState::Done,
        }
    }
}

/// One image's vector as the embedder answers it.
#[derive(Deserialize)]
struct Embedded {
    model: String,
    vector: Vec<f32>,
}

#[derive(Deserialize)]
struct EmbedderError {
    code: String,
    message: String,
}

/// One slot of `/v1/predict/batch`'s `results` (null where the image was refused).
#[derive(Deserialize)]
struct BatchResult {
    result: Embedded,
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<Option<BatchResult>>,
    #[serde(default)]
    errors: Vec<BatchError>,
}

#[derive(Deserialize)]
struct BatchError {
    index: usize,
    #[serde(flatten)]
    error: EmbedderError,
}

/// What went wrong embedding a query image.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The bytes are not an image we read (or too large): the embedder's reason.
    #[error("{message}")]
    Image { too_large: bool, message: String },
    #[error("the image embedder is unavailable: {0}")]
    Unavailable(String),
}

impl From<EmbedError> for ApiError {
    fn from(e: EmbedError) -> ApiError {
        match e {
            EmbedError::Image { too_large: true, message } => ApiError::new(Code::PayloadTooLarge, message),
            EmbedError::Image { too_large: false, message } => ApiError::new(Code::BadImage, message),
            // The details (the embedder's address among them) go to the log, not to the caller.
            EmbedError::Unavailable(why) => {
                tracing::warn!("image embedder: {why}");
                ApiError::broker(suanli_types::ErrorCode::Unavailable, "the image embedder is unavailable; try again shortly")
            }
        }
    }
}

/// The engine the portal's state holds: the embedder's address and the open indexes.
pub struct ImageSearch {
    dir: PathBuf,
    embedder: String,
    /// The embedder's bearer token (`--image-embedder-token-file`), when it has one.
    token: Option<String>,
    http: reqwest::Client,
    indexes: tokio::sync::Mutex<HashMap<i64, Arc<RwLock<LibraryIndex>>>>,
    /// Vectors added to each library's index since it was last saved.
    unsaved: tokio::sync::Mutex<HashMap<i64, usize>>,
    /// One writer per library at a time: the indexer's batch, a removal, a rebuild.
    writers: tokio::sync::Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes the indexer when images are queued.
    pub wake: tokio::sync::Notify,
}

impl ImageSearch {
    /// `dir` holds one folder per library's index; `embedder` is the embed service's base URL.
    pub fn new(dir: PathBuf, embedder: &str, token: Option<String>) -> std::io::Result<ImageSearch> {
        std::fs::create_dir_all(&dir)?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().map_err(std::io::Error::other)?;
        Ok(ImageSearch {
            dir,
            embedder: embedder.trim_end_matches('/').to_owned(),
            token,
            http,
            indexes: Default::default(),
            unsaved: Default::default(),
            writers: Default::default(),
            wake: Default::default(),
        })
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.post(format!("{}{path}", self.embedder));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Held while a library's index or rows change, so a rebuild never races a batch that
    /// would save the old index back.
    pub async fn writer(&self, library: i64) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.writers.lock().await.entry(library).or_default().clone();
        lock.lock_owned().await
    }

    fn folder(&self, library: i64) -> PathBuf {
        self.dir.join(library.to_string())
    }

    /// Embeds one query image.
    pub async fn embed(&self, bytes: Vec<u8>) -> Result<(ModelVersion, Vec<f32>), EmbedError> {
        let answer = self.post("/v1/predict").body(bytes).send().await.map_err(|e| EmbedError::Unavailable(e.to_string()))?;
        let status = answer.status();
        let body: serde_json::Value = answer.json().await.map_err(|e| EmbedError::Unavailable(e.to_string()))?;
        if !status.is_success() {
            let err: EmbedderError = serde_json::from_value(body["error"].clone()).map_err(|e| EmbedError::Unavailable(format!("{status}: {e}")))?;
            return Err(match err.code.as_str() {
                "BAD_IMAGE" | "EMPTY_BODY" => EmbedError::Image { too_large: false, message: err.message },
                "TOO_LARGE" => EmbedError::Image { too_large: true, message: err.message },
                _ => EmbedError::Unavailable(format!("{}: {}", err.code, err.message)),
            });
        }
        let e: Embedded = serde_json::from_value(body["result"].clone()).map_err(|e| EmbedError::Unavailable(format!("an answer without a vector: {e}")))?;
        let model = e.model.parse().map_err(|e: SearchError| EmbedError::Unavailable(e.to_string()))?;
        Ok((model, e.vector))
    }

    /// Embeds a batch for the indexer: a vector or the reason, per image.
    async fn embed_batch(&self, images: &[Vec<u8>]) -> Result<Vec<Result<(String, Vec<f32>), String>>, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = serde_json::json!({"images": images.iter().map(|b| b64.encode(b)).collect::<Vec<_>>()});
        // What goes back is shown on the library's status (the global one's to everyone): the
        // details, the embedder's address among them, go to the log.
        let answer = self.post("/v1/predict/batch").json(&body).send().await.map_err(|e| {
            tracing::warn!("image embedder: {e}");
            "the image embedder did not answer".to_owned()
        })?;
        let status = answer.status();
        if !status.is_success() {
            tracing::warn!("image embedder answered {status}: {}", answer.text().await.unwrap_or_default().chars().take(500).collect::<String>());
            return Err(format!("the image embedder answered HTTP {}", status.as_u16()));
        }
        let answer: BatchAnswer = answer.json().await.map_err(|e| {
            tracing::warn!("image embedder's answer: {e}");
            "the image embedder's answer could not be read".to_owned()
        })?;
        let mut out: Vec<Result<(String, Vec<f32>), String>> =
            answer.results.into_iter().map(|r| r.map(|r| (r.result.model, r.result.vector)).ok_or_else(|| "no vector".to_owned())).collect();
        for e in answer.errors {
            if let Some(slot) = out.get_mut(e.index) {
                *slot = Err(format!("{}: {}", e.error.code, e.error.message));
            }
        }
        if out.len() != images.len() {
            return Err(format!("the embedder answered {} results for {} images", out.len(), images.len()));
        }
        Ok(out)
    }

    /// The library's index, opened (and reconciled with SQL) on first use; `None` while the
    /// library has no model yet (nothing was ever indexed).
    pub async fn index(&self, state: &AppState, library: i64) -> ApiResult<Option<Arc<RwLock<LibraryIndex>>>> {
        let mut open = self.indexes.lock().await;
        if let Some(index) = open.get(&library) {
            return Ok(Some(index.clone()));
        }
        let folder = self.folder(library);
        if !folder.join("index.json").exists() {
            // Rows marked indexed with no index to hold them (a crash before the first save, a
            // restored database, a lost folder) are queued again.
            requeue(state, library, None).await?;
            return Ok(None);
        }
        let index = tokio::task::spawn_blocking(move || LibraryIndex::open(&folder)).await.map_err(ApiError::internal)?.map_err(ApiError::internal)?;
        let index = Arc::new(RwLock::new(index));
        requeue(state, library, Some(&index)).await?;
        open.insert(library, index.clone());
        Ok(Some(index))
    }

    async fn create_index(&self, library: i64, model: ModelVersion, dim: usize) -> ApiResult<Arc<RwLock<LibraryIndex>>> {
        let space = Space { model, dim: dim as u32 };
        let index = Arc::new(RwLock::new(LibraryIndex::create(space, IndexParams::default()).map_err(ApiError::internal)?));
        self.indexes.lock().await.insert(library, index.clone());
        Ok(index)
    }

    async fn save(&self, library: i64, index: &Arc<RwLock<LibraryIndex>>) -> ApiResult<()> {
        let (index, folder) = (index.clone(), self.folder(library));
        tokio::task::spawn_blocking(move || index.read().map_err(|_| SearchError::Index("index lock poisoned".into()))?.save(&folder))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)
    }

    /// Forgets a library's index (rebuild): the next vectors start a new one.
    pub async fn drop_index(&self, library: i64) -> ApiResult<()> {
        // Under the cache's lock, so no search reopens the folder while it goes.
        let mut open = self.indexes.lock().await;
        open.remove(&library);
        self.unsaved.lock().await.remove(&library);
        match tokio::fs::remove_dir_all(self.folder(library)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ApiError::internal(e)),
            _ => Ok(()),
        }
    }

    /// Removes one key from the library's index and saves it (the caller holds the library's
    /// [`ImageSearch::writer`]).
    pub async fn remove(&self, state: &AppState, library: i64, key: i64) -> ApiResult<()> {
        if let Some(index) = self.index(state, library).await? {
            index.write().map_err(|_| ApiError::internal("index lock poisoned"))?.remove(key as u64).map_err(ApiError::internal)?;
            self.save(library, &index).await?;
        }
        Ok(())
    }
}

/// Makes the index agree with SQL after a crash between the two: queues again the rows of
/// `library` marked indexed whose key `index` lacks (vectors added after its last save; all of
/// them without an index), and wakes the library if any were. The other way round cannot
/// happen: a key goes into the index before its row is marked, and out of the index before its
/// row is deleted.
async fn requeue(state: &AppState, library: i64, index: Option<&Arc<RwLock<LibraryIndex>>>) -> ApiResult<()> {
    let rows = sqlx::query("SELECT item_key FROM library_images WHERE library_id = $1 AND indexed = 1").bind(library).fetch_all(&state.db.pool).await?;
    let mut missing = Vec::new();
    {
        let guard = match index {
            Some(i) => Some(i.read().map_err(|_| ApiError::internal("index lock poisoned"))?),
            None => None,
        };
        for r in &rows {
            let key: i64 = r.try_get("item_key")?;
            if !guard.as_ref().is_some_and(|g| g.contains(key as u64)) {
                missing.push(key);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    tracing::warn!(library, images = missing.len(), "image index behind its rows: queued again");
    for key in missing {
        sqlx::query("UPDATE library_images SET indexed = 0 WHERE library_id = $1 AND item_key = $2").bind(library).bind(key).execute(&state.db.pool).await?;
    }
    set_state(state, library, IndexState::Queued, None).await
}

/// An image's bytes from the dataset store.
pub async fn read_image(state: &AppState, sha256: &str, size: i64) -> ApiResult<Vec<u8>> {
    let store = state.datasets.as_deref().ok_or_else(|| ApiError::internal("image search without a dataset store"))?;
    let digest: suanli_artifacts::Digest = sha256.parse().map_err(ApiError::internal)?;
    let opened = store.blobs().open(digest, 0, size.max(0) as u64).await.map_err(ApiError::internal)?;
    let mut bytes = Vec::with_capacity(size.max(0) as usize);
    let mut reader = opened.reader;
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut bytes).await.map_err(ApiError::internal)?;
    Ok(bytes)
}

/// The library `name` of `user`, created on first use; its ID.
pub async fn library_id(state: &AppState, user: i64, name: LibraryName) -> ApiResult<i64> {
    let owner = name.owner(user);
    let find = || sqlx::query("SELECT id FROM image_libraries WHERE owner = $1 AND name = $2").bind(owner).bind(name.as_str());
    if let Some(row) = find().fetch_optional(&state.db.pool).await? {
        return Ok(row.try_get("id")?);
    }
    let made = sqlx::query("INSERT INTO image_libraries (id, owner, name, model, state, error, updated_ms) VALUES ($1, $2, $3, NULL, 'done', NULL, $4)")
        .bind(crate::db::new_id())
        .bind(owner)
        .bind(name.as_str())
        .bind(now_ms())
        .execute(&state.db.pool)
        .await;
    match made {
        Err(e) if !crate::db::Db::is_unique_violation(&e) => return Err(e.into()),
        _ => {}
    }
    Ok(find().fetch_one(&state.db.pool).await?.try_get("id")?)
}

async fn set_state(state: &AppState, library: i64, s: IndexState, error: Option<&str>) -> ApiResult<()> {
    sqlx::query("UPDATE image_libraries SET state = $1, error = $2, updated_ms = $3 WHERE id = $4")
        .bind(s.as_str())
        .bind(error)
        .bind(now_ms())
        .bind(library)
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

/// Starts the indexer: one task, one library batch at a time.
pub fn spawn_indexer(state: AppState) {
    tokio::spawn(async move {
        let Some(search) = state.image_search.clone() else { return };
        loop {
            match index_some(&state, &search).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => tracing::warn!("image indexer: {e}"),
            }
            let _ = tokio::time::timeout(IDLE_POLL, search.wake.notified()).await;
        }
    });
}

/// Indexes one batch of one library that has images waiting; false when none has.
async fn index_some(state: &AppState, search: &ImageSearch) -> ApiResult<bool> {
    // Work is chosen by the rows, not the state (a library marked done while a concurrent
    // add queued pictures still gets them); a failed library is tried again after a while
    // (an embedder that was down is back).
    let Some(row) = sqlx::query(
        "SELECT l.id FROM image_libraries l WHERE (l.state <> 'failed' OR l.updated_ms < $1)
           AND EXISTS (SELECT 1 FROM library_images i WHERE i.library_id = l.id AND i.indexed = 0) ORDER BY l.updated_ms LIMIT 1",
    )
    .bind(now_ms() - RETRY_FAILED_AFTER.as_millis() as i64)
    .fetch_optional(&state.db.pool)
    .await?
    else {
        // Libraries whose queue emptied are done.
        sqlx::query("UPDATE image_libraries SET state = 'done', updated_ms = $1 WHERE state IN ('queued', 'running') AND NOT EXISTS (SELECT 1 FROM library_images i WHERE i.library_id = image_libraries.id AND i.indexed = 0)")
            .bind(now_ms())
            .execute(&state.db.pool)
            .await?;
        return Ok(false);
    };
    let library: i64 = row.try_get("id")?;
    let _writer = search.writer(library).await;
    set_state(state, library, IndexState::Running, None).await?;
    let batch = sqlx::query("SELECT item_key, sha256, size FROM library_images WHERE library_id = $1 AND indexed = 0 ORDER BY item_key LIMIT $2")
        .bind(library)
        .bind(INDEX_BATCH as i64)
        .fetch_all(&state.db.pool)
        .await?;
    let mut keys = Vec::with_capacity(batch.len());
    let mut images = Vec::with_capacity(batch.len());
    let mut bytes_in_batch = 0;
    for r in &batch {
        let key: i64 = r.try_get("item_key")?;
        let size: i64 = r.try_get("size")?;
        if size as u64 > MAX_IMAGE_BYTES {
            mark(state, library, key, -1, Some(&format!("{size} bytes: pictures over {MAX_IMAGE_BYTES} bytes are not indexed"))).await?;
            continue;
        }
        // The embedder takes a bounded request; the rest waits for the next batch.
        if !images.is_empty() && bytes_in_batch + size as u64 > BATCH_BYTES {
            break;
        }
        bytes_in_batch += size as u64;
        match read_image(state, &r.try_get::<String, _>("sha256")?, size).await {
            Ok(bytes) => {
                keys.push(key);
                images.push(bytes);
            }
            // One picture whose bytes are gone must not hold the rest of the library back.
            Err(e) => mark(state, library, key, -1, Some(&format!("the picture's bytes could not be read: {}", e.message))).await?,
        }
    }
    if images.is_empty() {
        return Ok(true);
    }
    let answers = match search.embed_batch(&images).await {
        Ok(a) => a,
        Err(why) => {
            set_state(state, library, IndexState::Failed, Some(&why)).await?;
            return Ok(false);
        }
    };
    let mut index = search.index(state, library).await?;
    for (key, answer) in keys.iter().zip(answers) {
        let (model, vector) = match answer {
            Ok(v) => v,
            Err(why) => {
                mark(state, library, *key, -1, Some(&why)).await?;
                continue;
            }
        };
        let model: ModelVersion = model.parse().map_err(ApiError::internal)?;
        let idx = match &index {
            Some(i) => i.clone(),
            None => {
                sqlx::query("UPDATE image_libraries SET model = $1 WHERE id = $2").bind(model.to_string()).bind(library).execute(&state.db.pool).await?;
                let made = search.create_index(library, model.clone(), vector.len()).await?;
                index = Some(made.clone());
                made
            }
        };
        let inserted = idx.write().map_err(|_| ApiError::internal("index lock poisoned"))?.insert(*key as u64, &model, &vector);
        match inserted {
            Ok(_) => mark(state, library, *key, 1, None).await?,
            Err(SearchError::ModelMismatch { index, given }) => {
                let why = format!("this library's index holds vectors of model {index}; the embedder now answers with {given}: rebuild the library");
                set_state(state, library, IndexState::Failed, Some(&why)).await?;
                return Ok(false);
            }
            Err(other) => mark(state, library, *key, -1, Some(&other.to_string())).await?,
        }
    }
    if let Some(idx) = &index {
        let unsaved = {
            let mut counts = search.unsaved.lock().await;
            let n = counts.entry(library).or_default();
            *n += keys.len();
            *n
        };
        let waiting =
            sqlx::query("SELECT 1 FROM library_images WHERE library_id = $1 AND indexed = 0 LIMIT 1").bind(library).fetch_optional(&state.db.pool).await?;
        if unsaved >= SAVE_EVERY || waiting.is_none() {
            search.save(library, idx).await?;
            search.unsaved.lock().await.remove(&library);
        }
    }
    Ok(true)
}

async fn mark(state: &AppState, library: i64, key: i64, indexed: i64, error: Option<&str>) -> ApiResult<()> {
    sqlx::query("UPDATE library_images SET indexed = $1, error = $2 WHERE library_id = $3 AND item_key = $4")
        .bind(indexed)
        .bind(error)
        .bind(library)
        .bind(key)
        .execute(&state.db.pool)
        .await?;
    Ok(())
}
