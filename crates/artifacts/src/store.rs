//! Where artifacts live. [`LocalStore`] keeps `root/ab/abcdef…` (the first two hex digits fan
//! the files out over 256 directories) and writes through `root/tmp/`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// A SHA-256, the artifact's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Digest {
    type Err = StoreError;

    /// Lower-case hex only, so one artifact has one name.
    fn from_str(s: &str) -> Result<Digest, StoreError> {
        if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(StoreError::InvalidDigest(s.chars().take(80).collect()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| StoreError::InvalidDigest(s.into()))?;
        Ok(Digest(out))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not a lower-case hex SHA-256: {0:?}")]
    InvalidDigest(String),
    #[error("no artifact {0}")]
    NotFound(Digest),
    #[error("the bytes hash to {actual}, not {expected}")]
    ChecksumMismatch { expected: Digest, actual: Digest },
    #[error("larger than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
}

/// An artifact's bytes, or a range of them.
pub struct Opened {
    pub size: u64,
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
}

/// A boxed future: keeps [`Store`] usable as a trait object.
pub type Fut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A backend. The local directory is the embedded default; an S3-compatible backend
/// implements the same three calls.
pub trait Store: Send + Sync + 'static {
    /// Stores what `body` yields; returns its digest and size. With `expected`, refuses
    /// (storing nothing) bytes that hash to something else.
    fn put<'a>(&'a self, body: Box<dyn AsyncRead + Send + Unpin + 'a>, expected: Option<Digest>) -> Fut<'a, (Digest, u64)>;
    /// Size of an artifact, if stored.
    fn size<'a>(&'a self, digest: Digest) -> Fut<'a, u64>;
    /// Bytes `[start, start + len)` of an artifact (`len` within its size).
    fn open<'a>(&'a self, digest: Digest, start: u64, len: u64) -> Fut<'a, Opened>;
    /// Every stored artifact, for garbage collection.
    fn list<'a>(&'a self) -> Fut<'a, Vec<Listed>>;
    /// Deletes an artifact unless it was (re)stored at or after `than`: an upload of the same
    /// bytes meanwhile keeps it. Whether it was deleted.
    fn delete_if_stored_before<'a>(&'a self, digest: Digest, than: SystemTime) -> Fut<'a, bool>;
}

/// An artifact as a listing shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub digest: Digest,
    pub size: u64,
    /// When its bytes were last stored (an upload of the same bytes stores them again).
    pub stored_at: SystemTime,
}

pub struct LocalStore {
    root: PathBuf,
    max_bytes: u64,
}

impl LocalStore {
    /// A store under `root` (created if missing) accepting artifacts up to `max_bytes`.
    /// Uploads a crash cut short are swept: nothing in `tmp/` was ever acknowledged, and
    /// nothing else writes there while the store is closed.
    pub fn open(root: &Path, max_bytes: u64) -> Result<LocalStore, StoreError> {
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let path = entry?.path();
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "could not sweep an unfinished upload");
            }
        }
        Ok(LocalStore { root: root.to_path_buf(), max_bytes })
    }

    /// A view of a store another process serves, for reading (backups): unlike [`open`], it
    /// leaves `tmp/` alone, where that process's uploads are on their way. Nothing is put
    /// through it.
    ///
    /// [`open`]: LocalStore::open
    pub fn reader(root: &Path) -> LocalStore {
        LocalStore { root: root.to_path_buf(), max_bytes: 0 }
    }

    fn path(&self, digest: Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join(&hex[..2]).join(hex)
    }

    async fn put_inner(&self, mut body: Box<dyn AsyncRead + Send + Unpin + '_>, expected: Option<Digest>) -> Result<(Digest, u64), StoreError> {
        let tmp = self.root.join("tmp").join(format!("{:016x}", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            let (actual, size) = copy_hashing(&mut *body, &mut file, self.max_bytes).await?;
            if let Some(expected) = expected.filter(|e| *e != actual) {
                return Err(StoreError::ChecksumMismatch { expected, actual });
            }
            // On disk before it is acknowledged; the rename makes it appear whole or not at all.
            file.sync_all().await?;
            let dest = self.path(actual);
            if let Some(dir) = dest.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            tokio::fs::rename(&tmp, &dest).await?;
            if let Some(dir) = dest.parent() {
                tokio::fs::File::open(dir).await?.sync_all().await?;
            }
            Ok((actual, size))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

/// Copies `body` into `sink`, hashing the bytes on the way: their digest and size. More than
/// `max_bytes` is refused (what was written so far is the caller's to discard).
pub(crate) async fn copy_hashing<W: tokio::io::AsyncWrite + Unpin>(
    body: &mut (dyn AsyncRead + Send + Unpin + '_),
    sink: &mut W,
    max_bytes: u64,
) -> Result<(Digest, u64), StoreError> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = body.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max_bytes {
            return Err(StoreError::TooLarge { limit: max_bytes });
        }
        hasher.update(&buf[..n]);
        sink.write_all(&buf[..n]).await?;
    }
    Ok((Digest(hasher.finalize().into()), size))
}

impl Store for LocalStore {
    fn put<'a>(&'a self, body: Box<dyn AsyncRead + Send + Unpin + 'a>, expected: Option<Digest>) -> Fut<'a, (Digest, u64)> {
        Box::pin(self.put_inner(body, expected))
    }

    fn size<'a>(&'a self, digest: Digest) -> Fut<'a, u64> {
        Box::pin(async move {
            match tokio::fs::metadata(self.path(digest)).await {
                Ok(m) => Ok(m.len()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NotFound(digest)),
                Err(e) => Err(e.into()),
            }
        })
    }

    fn open<'a>(&'a self, digest: Digest, start: u64, len: u64) -> Fut<'a, Opened> {
        Box::pin(async move {
            let mut file = match tokio::fs::File::open(self.path(digest)).await {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound(digest)),
                Err(e) => return Err(e.into()),
            };
            let size = file.metadata().await?.len();
            file.seek(std::io::SeekFrom::Start(start.min(size))).await?;
            Ok(Opened { size, reader: Box::new(file.take(len)) })
        })
    }

    fn list<'a>(&'a self) -> Fut<'a, Vec<Listed>> {
        Box::pin(async move {
            let mut out = Vec::new();
            let mut fans = tokio::fs::read_dir(&self.root).await?;
            while let Some(fan) = fans.next_entry().await? {
                // Only the 256 two-hex-digit fan-out directories hold artifacts (not `tmp/`).
                let name = fan.file_name();
                let Some(prefix) = name.to_str().filter(|n| n.len() == 2 && n.bytes().all(|b| b.is_ascii_hexdigit())) else { continue };
                if !fan.file_type().await?.is_dir() {
                    continue;
                }
                let mut files = tokio::fs::read_dir(fan.path()).await?;
                while let Some(file) = files.next_entry().await? {
                    let Some(digest) = file.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else { continue };
                    if !digest.to_hex().starts_with(prefix) {
                        continue;
                    }
                    let meta = file.metadata().await?;
                    if meta.is_file() {
                        out.push(Listed { digest, size: meta.len(), stored_at: meta.modified()? });
                    }
                }
            }
            out.sort_by_key(|l| l.digest);
            Ok(out)
        })
    }

    fn delete_if_stored_before<'a>(&'a self, digest: Digest, than: SystemTime) -> Fut<'a, bool> {
        Box::pin(async move {
            let path = self.path(digest);
            let meta = match tokio::fs::metadata(&path).await {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            if meta.modified()? >= than {
                return Ok(false);
            }
            tokio::fs::remove_file(&path).await?;
            Ok(true)
        })
    }
}
