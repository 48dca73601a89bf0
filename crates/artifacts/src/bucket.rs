//! An S3-compatible bucket (AWS S3, SeaweedFS, MinIO, Ceph RGW): files in, files out, listed
//! and deleted by key. The off-site copy of backups lives in one. This module is the only place
//! that knows S3 (`object_store`); large files go up in parts (multipart upload).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::ObjectStore;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

/// Where a bucket is and who we are to it. The secret comes from the environment or a file,
/// never from a configuration file others may read.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// `https://s3.eu-central-1.amazonaws.com`, or a self-hosted server's URL.
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key_id: String,
    /// The environment variable holding the secret access key.
    #[serde(default = "default_secret_env")]
    pub secret_access_key_env: String,
    /// Every key this code writes starts with it (`suanli/backups/`): one bucket can hold
    /// several platforms' copies.
    #[serde(default)]
    pub prefix: String,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_secret_env() -> String {
    "SUANLI_S3_SECRET_ACCESS_KEY".into()
}

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("${0} is not set: the bucket's secret access key comes from the environment")]
    NoSecret(String),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("S3: {0}")]
    S3(#[from] object_store::Error),
    #[error("{0:?} is not a key this code writes")]
    BadKey(String),
}

pub struct Bucket {
    store: Arc<AmazonS3>,
    prefix: String,
}

impl Bucket {
    /// A client for `config`, with the secret from its environment variable.
    pub fn connect(config: &BucketConfig) -> Result<Bucket, BucketError> {
        let secret = std::env::var(&config.secret_access_key_env).map_err(|_| BucketError::NoSecret(config.secret_access_key_env.clone()))?;
        Bucket::with_secret(config, &secret)
    }

    pub fn with_secret(config: &BucketConfig, secret: &str) -> Result<Bucket, BucketError> {
        let store = AmazonS3Builder::new()
            .with_endpoint(&config.endpoint)
            .with_allow_http(config.endpoint.starts_with("http://"))
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(secret)
            // Path-style (`endpoint/bucket/key`): what self-hosted servers answer without DNS.
            .with_virtual_hosted_style_request(false)
            .build()?;
        Ok(Bucket { store: Arc::new(store), prefix: config.prefix.trim_matches('/').to_owned() })
    }

    fn key(&self, key: &str) -> Result<Key, BucketError> {
        let full = if self.prefix.is_empty() { key.to_owned() } else { format!("{}/{key}", self.prefix) };
        Key::parse(&full).map_err(|_| BucketError::BadKey(full))
    }

    /// Uploads the file at `path` as `key`, in parts when it is large. The object appears whole
    /// or not at all.
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<u64, BucketError> {
        let mut file = tokio::fs::File::open(path).await.map_err(|e| BucketError::Io(path.to_owned(), e))?;
        let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), self.key(key)?);
        let copied = tokio::io::copy(&mut file, &mut writer).await;
        let finished = match copied {
            Ok(n) => writer.shutdown().await.map(|()| n),
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        };
        finished.map_err(|e| BucketError::Io(path.to_owned(), e))
    }

    /// Downloads `key` into a new file at `path` (written beside, then renamed).
    pub async fn get_file(&self, key: &str, path: &Path) -> Result<u64, BucketError> {
        let io = |e| BucketError::Io(path.to_owned(), e);
        let partial = PathBuf::from(format!("{}.partial", path.display()));
        let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
        let mut stream = self.store.get(&self.key(key)?).await?.into_stream();
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            written += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        tokio::fs::rename(&partial, path).await.map_err(io)?;
        Ok(written)
    }

    /// A small object's bytes (a manifest).
    pub async fn get_bytes(&self, key: &str) -> Result<Vec<u8>, BucketError> {
        Ok(self.store.get(&self.key(key)?).await?.bytes().await?.to_vec())
    }

    /// Size of `key`, or `None` if there is no such object.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, BucketError> {
        match self.store.head(&self.key(key)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every key under `prefix` (relative to the bucket's prefix), sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, BucketError> {
        let under = self.key(prefix)?;
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let mut keys = Vec::new();
        let mut listing = self.store.list(Some(&under));
        while let Some(meta) = listing.next().await {
            let location = meta?.location.to_string();
            keys.push(location.strip_prefix(&strip).unwrap_or(&location).to_owned());
        }
        keys.sort();
        Ok(keys)
    }

    pub async fn delete(&self, key: &str) -> Result<(), BucketError> {
        match self.store.delete(&self.key(key)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The artifact store in a bucket: `<prefix>/artifacts/ab/<sha256>`, as [`LocalStore`] keeps
/// `root/ab/<sha256>` on one machine. Several scheduler replicas can serve the same bucket.
///
/// An upload whose digest is named up front goes straight to its final key, and the S3 upload
/// (one PUT, or a multipart upload for large ones) is completed only once the bytes hash to
/// that digest: the object appears whole and right, or not at all, and an object already there
/// (the same bytes) is never disturbed by a failed one. Without a digest the bytes go to
/// `artifacts/tmp/<random>`, are hashed on the way and copied into place (S3 copies up to
/// 5 GiB in one request: name the digest for anything larger).
///
/// [`LocalStore`]: crate::LocalStore
pub struct BucketStore {
    bucket: Bucket,
    max_bytes: u64,
}

const ARTIFACTS: &str = "artifacts";
/// Bytes per part of a multipart upload (S3 wants at least 5 MiB but for the last); anything
/// smaller goes up in one PUT.
const PART_BYTES: usize = 8 << 20;

fn storage(e: impl std::error::Error + Send + Sync + 'static) -> crate::StoreError {
    crate::StoreError::Io(std::io::Error::other(e))
}

impl BucketStore {
    /// Artifacts up to `max_bytes` in `bucket`.
    pub fn new(bucket: Bucket, max_bytes: u64) -> BucketStore {
        BucketStore { bucket, max_bytes }
    }

    fn key_of(&self, digest: crate::Digest) -> Result<Key, crate::StoreError> {
        let hex = digest.to_hex();
        self.bucket.key(&format!("{ARTIFACTS}/{}/{hex}", &hex[..2])).map_err(storage)
    }

    async fn put_inner(
        &self,
        mut body: Box<dyn tokio::io::AsyncRead + Send + Unpin + '_>,
        expected: Option<crate::Digest>,
    ) -> Result<(crate::Digest, u64), crate::StoreError> {
        let target = match expected {
            Some(digest) => self.key_of(digest)?,
            None => self.bucket.key(&format!("{ARTIFACTS}/tmp/{:016x}", rand::random::<u64>())).map_err(storage)?,
        };
        let mut writer = object_store::buffered::BufWriter::with_capacity(self.bucket.store.clone(), target.clone(), PART_BYTES);
        let sent = async {
            let (actual, size) = crate::store::copy_hashing(&mut *body, &mut writer, self.max_bytes).await?;
            match expected.filter(|e| *e != actual) {
                Some(expected) => Err(crate::StoreError::ChecksumMismatch { expected, actual }),
                None => Ok((actual, size)),
            }
        }
        .await;
        let (actual, size) = match sent {
            Ok(done) => done,
            Err(e) => {
                // Never completed: nothing appears, and an earlier object at that key stays.
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(error = %abort, key = %target, "could not abort an unfinished upload (the bucket's lifecycle rules remove it)");
                }
                return Err(e);
            }
        };
        writer.shutdown().await?;
        if expected.is_none() {
            let dest = self.key_of(actual)?;
            let copied = self.bucket.store.copy(&target, &dest).await.map_err(storage);
            // The temporary object goes whether or not the copy worked.
            if let Err(e) = self.bucket.store.delete(&target).await {
                tracing::warn!(error = %e, key = %target, "could not delete an upload's temporary object");
            }
            copied?;
        }
        Ok((actual, size))
    }
}

impl crate::Store for BucketStore {
    fn put<'a>(
        &'a self,
        body: Box<dyn tokio::io::AsyncRead + Send + Unpin + 'a>,
        expected: Option<crate::Digest>,
    ) -> crate::store::Fut<'a, (crate::Digest, u64)> {
        Box::pin(self.put_inner(body, expected))
    }

    fn size<'a>(&'a self, digest: crate::Digest) -> crate::store::Fut<'a, u64> {
        Box::pin(async move {
            match self.bucket.store.head(&self.key_of(digest)?).await {
                Ok(meta) => Ok(meta.size),
                Err(object_store::Error::NotFound { .. }) => Err(crate::StoreError::NotFound(digest)),
                Err(e) => Err(storage(e)),
            }
        })
    }

    fn open<'a>(&'a self, digest: crate::Digest, start: u64, len: u64) -> crate::store::Fut<'a, crate::store::Opened> {
        Box::pin(async move {
            let key = self.key_of(digest)?;
            let not_found = |e: object_store::Error| match e {
                object_store::Error::NotFound { .. } => crate::StoreError::NotFound(digest),
                e => storage(e),
            };
            // As the local store: a range past the end reads nothing, and a length past it what is there.
            let size = self.bucket.store.head(&key).await.map_err(not_found)?.size;
            let end = start.saturating_add(len).min(size);
            if start >= end {
                return Ok(crate::store::Opened { size, reader: Box::new(tokio::io::empty()) });
            }
            let options = object_store::GetOptions { range: Some(object_store::GetRange::Bounded(start..end)), ..Default::default() };
            let got = self.bucket.store.get_opts(&key, options).await.map_err(not_found)?;
            let size = got.meta.size;
            let stream = got.into_stream().map(|chunk| chunk.map_err(std::io::Error::other));
            Ok(crate::store::Opened { size, reader: Box::new(tokio_util::io::StreamReader::new(Box::pin(stream))) })
        })
    }

    fn list<'a>(&'a self) -> crate::store::Fut<'a, Vec<crate::store::Listed>> {
        Box::pin(async move {
            let under = self.bucket.key(ARTIFACTS).map_err(storage)?;
            let mut out = Vec::new();
            let mut listing = self.bucket.store.list(Some(&under));
            while let Some(meta) = listing.next().await {
                let meta = meta.map_err(storage)?;
                // `…/artifacts/ab/<sha256>` only: not the uploads on their way (`tmp/`).
                let mut parts = meta.location.parts().map(|p| p.as_ref().to_owned()).collect::<Vec<_>>().into_iter().rev();
                let (Some(name), Some(fan)) = (parts.next(), parts.next()) else { continue };
                let Ok(digest) = name.parse::<crate::Digest>() else { continue };
                if fan.len() != 2 || !name.starts_with(&fan) {
                    continue;
                }
                out.push(crate::store::Listed { digest, size: meta.size, stored_at: meta.last_modified.into() });
            }
            out.sort_by_key(|l| l.digest);
            Ok(out)
        })
    }

    fn delete_if_stored_before<'a>(&'a self, digest: crate::Digest, than: std::time::SystemTime) -> crate::store::Fut<'a, bool> {
        Box::pin(async move {
            let key = self.key_of(digest)?;
            let stored_at: std::time::SystemTime = match self.bucket.store.head(&key).await {
                Ok(meta) => meta.last_modified.into(),
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(storage(e)),
            };
            if stored_at >= than {
                return Ok(false);
            }
            // S3 has no conditional delete. The collector holds the store's sweep lock, so no
            // upload through this replica lands in between; an upload of the same bytes through
            // another replica could, so replicas sharing a bucket collect on one of them only
            // (`artifacts_gc_every_s = 0` on the others).
            match self.bucket.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
                Err(e) => Err(storage(e)),
            }
        })
    }
}
