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
