//! Uploads to the portal by tus 1.0.0 (`/api/v1/uploads`): made with their length, name and
//! SHA-256 (a quota refusal comes before any byte is sent), then sent in chunks from where the
//! portal says it is. A chunk that fails (a broken connection, a 5xx, an offset the portal does
//! not have) is followed by a `HEAD` to learn the offset and the rest is sent from there, a
//! bounded number of times in a row, waiting longer each time.
//!
//! What is on its way is written down in the [`ResumeBook`] (`uploads.json` in the CLI's
//! configuration directory), by the content's SHA-256 and size: the same push run again after
//! an interruption goes on with the upload it began instead of sending everything again.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::Method;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::client::{segment, ClientError, Portal};
use crate::pack::Prepared;
use crate::table::size;

/// The size of one `PATCH`, as the contract asks of the CLI.
pub const CHUNK: usize = 16 * 1024 * 1024;
const TUS_VERSION: &str = "1.0.0";
/// How long one chunk may take before it counts as failed (16 MiB at ~60 KiB/s).
const PATCH_TIMEOUT: Duration = Duration::from_secs(300);
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Portal(#[from] ClientError),
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("sending {filename} failed {tries} times in a row (the last: {last}); run the same command again to go on from byte {offset}")]
    GaveUp { filename: String, tries: u32, offset: u64, last: String },
    #[error("the portal no longer has the upload of {0} (expired or deleted); run the same command again to send it anew")]
    Gone(String),
    #[error("the portal says it has {offset} bytes of {filename}, which has {size}")]
    BeyondEnd { filename: String, offset: u64, size: u64 },
    #[error(transparent)]
    Resume(#[from] ResumeError),
}

/// One upload as the portal shows it.
#[derive(Debug, Clone, Deserialize)]
pub struct UploadView {
    pub upload_id: String,
    #[serde(default)]
    pub filename: String,
    #[serde(default)]
    pub length: u64,
    #[serde(default)]
    pub offset: u64,
    #[serde(default)]
    pub complete: bool,
}

/// The tus client of one portal.
pub struct Tus<'a> {
    portal: &'a Portal,
    /// Bytes per `PATCH`.
    pub chunk: usize,
    /// Failures in a row after which an upload is given up (for a later run to resume).
    pub retries: u32,
    /// The first wait after a failure; doubled each time, at most [`MAX_BACKOFF`].
    pub backoff: Duration,
}

/// What to do after a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Ask the portal where the upload is and go on from there; after a pause if it may be
    /// away for a while (a broken connection, a 5xx), at once if it only disagreed on the offset.
    Reoffset { pause: bool },
    /// The portal refused: trying again would be refused again.
    Fail,
}

fn recovery(error: &ClientError) -> Recovery {
    match error {
        ClientError::Transport(..) => Recovery::Reoffset { pause: true },
        ClientError::Refused(r) if r.status == 409 && r.code == "UPLOAD_OFFSET_MISMATCH" => Recovery::Reoffset { pause: false },
        ClientError::Refused(r) if r.status >= 500 => Recovery::Reoffset { pause: true },
        ClientError::Unreadable { status, .. } if *status >= 500 => Recovery::Reoffset { pause: true },
        _ => Recovery::Fail,
    }
}

/// Whether the portal threw the upload away, so that it cannot be resumed: it does not know it
/// (404), or its bytes did not hash to the SHA-256 it was made with (460, deleted).
fn upload_discarded(error: &UploadError) -> bool {
    match error {
        UploadError::Gone(_) => true,
        UploadError::Portal(ClientError::Refused(r)) => r.status == 404 || r.code == "CHECKSUM_MISMATCH",
        _ => false,
    }
}

impl<'a> Tus<'a> {
    pub fn new(portal: &'a Portal) -> Tus<'a> {
        Tus { portal, chunk: CHUNK, retries: 8, backoff: Duration::from_secs(1) }
    }

    /// Sends `item`, resuming what `book` says was begun; returns the upload's ID once the
    /// portal has every byte (and found they hash as announced).
    pub async fn upload(&self, item: &Prepared, book: &mut ResumeBook, progress: &mut dyn Progress) -> Result<String, UploadError> {
        let key = ResumeBook::key(&item.sha256, item.size);
        let (id, from) = match self.resumable(book, &key).await? {
            Some(found) => found,
            None => {
                let made = self.create(&item.filename, item.size, &item.sha256).await?;
                book.insert(&key, ResumeEntry { portal: self.portal.base().to_owned(), upload_id: made.upload_id.clone(), filename: item.filename.clone() })?;
                (made.upload_id, 0)
            }
        };
        progress.start(&item.filename, item.size, from);
        let sent = self.send(&id, &item.filename, &item.path, item.size, from, progress).await;
        progress.finish();
        match sent {
            Ok(()) => Ok(id),
            Err(e) if upload_discarded(&e) => {
                book.remove(&key)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The upload `book` holds for `key` on this portal and its offset, if the portal still
    /// has it; an entry it no longer knows is dropped.
    async fn resumable(&self, book: &mut ResumeBook, key: &str) -> Result<Option<(String, u64)>, UploadError> {
        let Some(entry) = book.get(key).filter(|e| e.portal == self.portal.base()).cloned() else { return Ok(None) };
        match self.offset(&entry.upload_id).await? {
            Some(offset) => Ok(Some((entry.upload_id, offset))),
            None => {
                book.remove(key)?;
                Ok(None)
            }
        }
    }

    /// `POST /uploads`: an empty upload of `size` bytes named `filename` that must hash to `sha256`.
    pub async fn create(&self, filename: &str, size: u64, sha256: &str) -> Result<UploadView, UploadError> {
        let request = self
            .portal
            .request(Method::POST, "/api/v1/uploads")
            .header("Tus-Resumable", TUS_VERSION)
            .header("Upload-Length", size.to_string())
            .header("Upload-Metadata", upload_metadata(filename, sha256));
        Ok(self.portal.send(request).await?)
    }

    /// `HEAD /uploads/{id}`: how many bytes the portal has; `None` if it has no such upload.
    pub async fn offset(&self, id: &str) -> Result<Option<u64>, ClientError> {
        let request = self.portal.request(Method::HEAD, &upload_path(id)).header("Tus-Resumable", TUS_VERSION).timeout(HEAD_TIMEOUT);
        let response = self.portal.send_raw(request).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(self.portal.refusal(response).await);
        }
        upload_offset(&response).map(Some).ok_or_else(|| missing_offset(response.status().as_u16(), "HEAD"))
    }

    /// `PATCH /uploads/{id}` with `bytes` at `offset`: the portal's new offset.
    async fn patch(&self, id: &str, offset: u64, bytes: Vec<u8>) -> Result<u64, ClientError> {
        let request = self
            .portal
            .request(Method::PATCH, &upload_path(id))
            .header("Tus-Resumable", TUS_VERSION)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .timeout(PATCH_TIMEOUT)
            .body(bytes);
        let response = self.portal.send_raw(request).await?;
        if !response.status().is_success() {
            return Err(self.portal.refusal(response).await);
        }
        upload_offset(&response).ok_or_else(|| missing_offset(response.status().as_u16(), "PATCH"))
    }

    /// Sends `path`'s bytes from `from` to the end, recovering from failures as the module says.
    async fn send(&self, id: &str, filename: &str, path: &Path, size: u64, from: u64, progress: &mut dyn Progress) -> Result<(), UploadError> {
        let file_error = |source| UploadError::File { path: path.to_owned(), source };
        let mut file = tokio::fs::File::open(path).await.map_err(file_error)?;
        // `known`: whether `offset` is what the portal has; if not, it is asked (HEAD).
        let (mut offset, mut failures, mut known) = (from, 0u32, true);
        loop {
            if known && offset == size {
                return Ok(());
            }
            let answer = if known {
                let bytes = read_chunk(&mut file, offset, self.chunk_at(offset, size)).await.map_err(file_error)?;
                self.patch(id, offset, bytes).await.map(Some)
            } else {
                self.offset(id).await
            };
            let failure = match answer {
                Ok(Some(at)) if at > size => return Err(UploadError::BeyondEnd { filename: filename.to_owned(), offset: at, size }),
                // A chunk taken without the offset moving on is no progress either.
                Ok(Some(at)) if known && at <= offset => (format!("the portal took a chunk at {offset} and stayed at {at}"), true),
                Ok(Some(at)) => {
                    // Only bytes that went through end a run of failures: a HEAD that answers
                    // while every PATCH fails must not keep the upload trying forever.
                    if known {
                        failures = 0;
                    }
                    (offset, known) = (at, true);
                    progress.advanced(offset);
                    continue;
                }
                Ok(None) => return Err(UploadError::Gone(filename.to_owned())),
                Err(e) => match recovery(&e) {
                    Recovery::Reoffset { pause } => (e.to_string(), pause),
                    Recovery::Fail => return Err(e.into()),
                },
            };
            let (what, pause) = failure;
            failures += 1;
            if failures > self.retries {
                return Err(UploadError::GaveUp { filename: filename.to_owned(), tries: failures, offset, last: what });
            }
            progress.note(&format!("{what}; asking the portal where the upload is"));
            if pause {
                tokio::time::sleep(self.pause(failures)).await;
            }
            known = false;
        }
    }

    fn chunk_at(&self, offset: u64, size: u64) -> usize {
        usize::try_from(size - offset).map_or(self.chunk, |left| left.min(self.chunk))
    }

    /// The wait after the `failures`-th failure in a row: the backoff, doubled each time.
    fn pause(&self, failures: u32) -> Duration {
        self.backoff.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_BACKOFF)
    }
}

/// Tus's `Upload-Metadata`: each value base64-encoded.
fn upload_metadata(filename: &str, sha256: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    format!("filename {},sha256 {}", b64(filename), b64(&sha256.to_ascii_lowercase()))
}

fn upload_path(id: &str) -> String {
    format!("/api/v1/uploads/{}", segment(id))
}

fn upload_offset(response: &reqwest::Response) -> Option<u64> {
    response.headers().get("Upload-Offset")?.to_str().ok()?.trim().parse().ok()
}

fn missing_offset(status: u16, request: &str) -> ClientError {
    ClientError::Unreadable { status, body: format!("the answer to {request} has no Upload-Offset header") }
}

async fn read_chunk(file: &mut tokio::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut bytes = vec![0; len];
    file.read_exact(&mut bytes).await?;
    Ok(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is not what suanli writes there ({source}); it only lists uploads to resume, so it may be deleted")]
    Unreadable { path: PathBuf, source: serde_json::Error },
    #[error(
        "{path} was written by a newer suanli (format {found}, this one reads up to {RESUME_FORMAT}); it only lists uploads to resume, so it may be deleted"
    )]
    Newer { path: PathBuf, found: u32 },
}

/// The resume file's layout; a file without the field is format 1 (the first).
pub const RESUME_FORMAT: u32 = 1;

fn first_format() -> u32 {
    1
}

/// An upload begun and not yet made into a dataset version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeEntry {
    /// The portal's base URL: an upload is resumed on the portal that has it only.
    pub portal: String,
    /// `/api/v1/uploads/{upload_id}`.
    pub upload_id: String,
    /// For whoever reads the file.
    pub filename: String,
}

#[derive(Serialize, Deserialize)]
struct ResumeFile {
    #[serde(default = "first_format")]
    format: u32,
    /// By [`ResumeBook::key`].
    uploads: BTreeMap<String, ResumeEntry>,
}

/// The uploads begun, in `uploads.json` in the configuration directory (0600, like the login
/// beside it; written whole, then renamed).
pub struct ResumeBook {
    path: PathBuf,
    uploads: BTreeMap<String, ResumeEntry>,
}

impl ResumeBook {
    /// The book in `config_dir`; empty if there is none yet.
    pub fn open(config_dir: &Path) -> Result<ResumeBook, ResumeError> {
        let path = config_dir.join("uploads.json");
        let uploads = match std::fs::read(&path) {
            Ok(bytes) => {
                let file = serde_json::from_slice::<ResumeFile>(&bytes).map_err(|source| ResumeError::Unreadable { path: path.clone(), source })?;
                if file.format > RESUME_FORMAT {
                    return Err(ResumeError::Newer { path, found: file.format });
                }
                file.uploads
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(ResumeError::Io { path, source }),
        };
        Ok(ResumeBook { path, uploads })
    }

    /// Content is known by its hash and size: the same folder packs to the same bytes.
    pub fn key(sha256: &str, size: u64) -> String {
        format!("{}-{size}", sha256.to_ascii_lowercase())
    }

    pub fn get(&self, key: &str) -> Option<&ResumeEntry> {
        self.uploads.get(key)
    }

    pub fn insert(&mut self, key: &str, entry: ResumeEntry) -> Result<(), ResumeError> {
        self.uploads.insert(key.to_owned(), entry);
        self.save()
    }

    /// Forgets `key`'s upload (made into a version, or gone); nothing if it was not there.
    pub fn remove(&mut self, key: &str) -> Result<(), ResumeError> {
        if self.uploads.remove(key).is_some() {
            self.save()?;
        }
        Ok(())
    }

    fn save(&self) -> Result<(), ResumeError> {
        fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ResumeError + '_ {
            move |source| ResumeError::Io { path: path.to_owned(), source }
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let partial = self.path.with_extension("json.partial");
        let text = serde_json::to_vec_pretty(&ResumeFile { format: RESUME_FORMAT, uploads: self.uploads.clone() }).map_err(|e| io(&self.path)(e.into()))?;
        let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&partial).map_err(io(&partial))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io(&partial))?;
        file.write_all(&text).map_err(io(&partial))?;
        file.sync_all().map_err(io(&partial))?;
        std::fs::rename(&partial, &self.path).map_err(io(&self.path))
    }
}

/// Told how an upload goes.
pub trait Progress {
    /// An upload of `total` bytes begins, the portal already having `from`.
    fn start(&mut self, name: &str, total: u64, from: u64);
    /// The portal has `offset` bytes.
    fn advanced(&mut self, offset: u64);
    /// Something went wrong and is being recovered from.
    fn note(&mut self, what: &str);
    fn finish(&mut self);
}

/// Says nothing.
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: u64, _: u64) {}
    fn advanced(&mut self, _: u64) {}
    fn note(&mut self, _: &str) {}
    fn finish(&mut self) {}
}

/// Progress on standard error: one line rewritten in place on a terminal, else a line now
/// and then (a log should not fill with carriage returns).
pub struct StderrProgress {
    terminal: bool,
    name: String,
    total: u64,
    from: u64,
    offset: u64,
    started: Instant,
    shown: Option<Instant>,
}

impl Default for StderrProgress {
    fn default() -> Self {
        StderrProgress { terminal: std::io::stderr().is_terminal(), name: String::new(), total: 0, from: 0, offset: 0, started: Instant::now(), shown: None }
    }
}

impl StderrProgress {
    fn every(&self) -> Duration {
        if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        }
    }

    fn line(&self) -> String {
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = (self.offset - self.from.min(self.offset)) as f64 / seconds / MIB;
        let percent = (self.offset * 100).checked_div(self.total).unwrap_or(100);
        format!("{}  {} of {}  {percent}%  {rate:.1} MiB/s", self.name, size(self.offset), size(self.total))
    }

    fn show(&mut self) {
        let line = self.line();
        if self.terminal {
            // Cleared to the end: a shorter line leaves nothing of the one before.
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        self.shown = Some(Instant::now());
    }
}

const MIB: f64 = 1024.0 * 1024.0;

impl Progress for StderrProgress {
    fn start(&mut self, name: &str, total: u64, from: u64) {
        (self.name, self.total, self.from, self.offset, self.started, self.shown) = (name.to_owned(), total, from, from, Instant::now(), None);
        if from > 0 {
            eprintln!("{name}: resuming the upload begun, the portal having {}", size(from));
        }
        self.show();
    }

    fn advanced(&mut self, offset: u64) {
        self.offset = offset;
        if self.shown.is_none_or(|at| at.elapsed() >= self.every()) {
            self.show();
        }
    }

    fn note(&mut self, what: &str) {
        if self.terminal {
            eprintln!();
        }
        eprintln!("{}: {what}", self.name);
    }

    fn finish(&mut self) {
        self.show();
        if self.terminal {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests;
