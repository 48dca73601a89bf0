//! The client agents and tools use: uploads name the hash they computed (the server checks
//! it), downloads are hashed as they arrive and only moved into place when they match.

use std::path::Path;

use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use crate::server::Stored;
use crate::store::Digest;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("artifact store unreachable: {0}")]
    Http(#[from] reqwest::Error),
    #[error("artifact store answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("{0}: the download hashes to {1}")]
    ChecksumMismatch(Digest, Digest),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub struct ArtifactClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ArtifactClient {
    /// `base` is the server's root URL (`http://host:port`, or `https://` checked against the
    /// system's roots).
    pub fn new(base: &str, token: &str) -> ArtifactClient {
        ArtifactClient { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), http: reqwest::Client::new() }
    }

    /// As [`ArtifactClient::new`], trusting only `ca_pem` (the cluster CA, or every CA of a
    /// bundle while it is rotated) for an `https://` store: the bearer capability never goes to
    /// a server those CAs did not certify.
    pub fn with_ca(base: &str, token: &str, ca_pem: &str) -> Result<ArtifactClient, ClientError> {
        let mut builder = reqwest::Client::builder().tls_built_in_root_certs(false);
        for ca in reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes())? {
            builder = builder.add_root_certificate(ca);
        }
        let http = builder.build()?;
        Ok(ArtifactClient { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), http })
    }

    /// The client for a store at `base` as a deployment names it: an `https://` store checked
    /// against `ca_pem` when one is given ([`ArtifactClient::with_ca`]), else as
    /// [`ArtifactClient::new`].
    pub fn for_store(base: &str, credential: &str, ca_pem: Option<&str>) -> Result<ArtifactClient, ClientError> {
        match ca_pem {
            Some(ca) if base.starts_with("https://") => ArtifactClient::with_ca(base, credential, ca),
            _ => Ok(ArtifactClient::new(base, credential)),
        }
    }

    /// Hashes the file, then streams it up; the server refuses it if what arrived differs.
    pub async fn upload_file(&self, path: &Path) -> Result<Digest, ClientError> {
        let digest = hash_file(path).await?;
        let file = tokio::fs::File::open(path).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        let response = self.http.put(format!("{}/v1/artifacts?sha256={digest}", self.base)).bearer_auth(&self.token).body(body).send().await?;
        if !response.status().is_success() {
            return Err(ClientError::Refused { status: response.status().as_u16(), body: response.text().await.unwrap_or_default() });
        }
        let stored: Stored = response.json().await?;
        if stored.sha256 != digest.to_hex() {
            return Err(ClientError::Refused { status: 200, body: format!("stored as {}", stored.sha256) });
        }
        Ok(digest)
    }

    /// The artifact's size (as the store announced it) and its bytes as they arrive, for
    /// passing on (the portal streams jobs' outputs to their owners). The last piece is held
    /// back until the whole artifact has hashed to `digest`: a wrong one ends in
    /// [`ClientError::ChecksumMismatch`] before the receiver has every byte.
    pub async fn download_stream(
        &self,
        digest: Digest,
    ) -> Result<(Option<u64>, impl futures::Stream<Item = Result<axum::body::Bytes, ClientError>> + Send + 'static), ClientError> {
        let response = self.http.get(format!("{}/v1/artifacts/{digest}", self.base)).bearer_auth(&self.token).send().await?;
        if !response.status().is_success() {
            return Err(ClientError::Refused { status: response.status().as_u16(), body: response.text().await.unwrap_or_default() });
        }
        let length = response.content_length();
        let start = (response.bytes_stream(), Sha256::new(), None::<axum::body::Bytes>, false);
        let stream = futures::stream::unfold(start, move |(mut chunks, mut hasher, mut held, over)| async move {
            if over {
                return None;
            }
            loop {
                match chunks.next().await {
                    Some(Ok(chunk)) => {
                        hasher.update(&chunk);
                        if let Some(previous) = held.replace(chunk) {
                            return Some((Ok(previous), (chunks, hasher, held, false)));
                        }
                    }
                    Some(Err(e)) => return Some((Err(ClientError::from(e)), (chunks, hasher, None, true))),
                    None => {
                        let actual = Digest(hasher.clone().finalize().into());
                        if actual != digest {
                            return Some((Err(ClientError::ChecksumMismatch(digest, actual)), (chunks, hasher, None, true)));
                        }
                        return held.take().map(|last| (Ok(last), (chunks, hasher, None, true)));
                    }
                }
            }
        });
        Ok((length, stream))
    }

    /// Streams the artifact to `dest`, verifying it; `dest` appears only if the bytes match.
    pub async fn download_to(&self, digest: Digest, dest: &Path) -> Result<u64, ClientError> {
        let partial = dest.with_extension("partial");
        let mut file = tokio::fs::File::create(&partial).await?;
        let written = self.download_into(digest, &mut file).await;
        if written.is_ok() {
            file.sync_all().await?;
        }
        match written {
            Ok(size) => {
                tokio::fs::rename(&partial, dest).await?;
                Ok(size)
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                Err(e)
            }
        }
    }

    /// Streams the artifact into `out` (a file the caller opened, wherever it must live),
    /// verifying it; on an error the caller discards what was written.
    pub async fn download_into<W: tokio::io::AsyncWrite + Unpin>(&self, digest: Digest, out: &mut W) -> Result<u64, ClientError> {
        let response = self.http.get(format!("{}/v1/artifacts/{digest}", self.base)).bearer_auth(&self.token).send().await?;
        if !response.status().is_success() {
            return Err(ClientError::Refused { status: response.status().as_u16(), body: response.text().await.unwrap_or_default() });
        }
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        let actual = Digest(hasher.finalize().into());
        if actual != digest {
            return Err(ClientError::ChecksumMismatch(digest, actual));
        }
        Ok(size)
    }
}

pub async fn hash_file(path: &Path) -> Result<Digest, std::io::Error> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(Digest(hasher.finalize().into()))
}
