//! Backups of an artifact store's directory, taken while the store serves.
//!
//! The artifacts go into a **pool**: a [`LocalStore`] shared by every backup, so an artifact
//! already in it (from an earlier backup) is not copied again, and every copy is hashed on its
//! way in (a bit flipped on the way is refused, not kept). A backup itself is a
//! [`ArtifactsManifest`]: each artifact's digest and size, and the store's records of who
//! uploaded what (capabilities read by them, quotas count them, garbage collection spares the
//! platform's own uploads).
//!
//! The point in time: the records are read first, then the artifacts listed. An artifact that
//! appears after the backup began and that no record read names was uploaded after the backup
//! point (uploads store the bytes, then record the owner) and is left to the next backup.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::server::{record_owner, record_service_upload};
use crate::store::{Digest, LocalStore, Store, StoreError};

/// The manifest's layout; a reader refuses any other.
pub const ARTIFACTS_BACKUP_FORMAT: u32 = 1;

/// Where, inside a store's directory, the scheduler keeps who uploaded what
/// (`server::Access::owners_dir`).
pub const RECORDS_DIR: &str = "accounts";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsManifest {
    pub backup_format: u32,
    /// Sorted by digest.
    pub artifacts: Vec<BackedUp>,
    /// `(account, sha256)`: artifacts an account uploaded through a capability.
    pub owners: Vec<(u64, String)>,
    /// Artifacts the platform's service token uploaded.
    pub service_uploads: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackedUp {
    pub sha256: String,
    pub bytes: u64,
}

impl ArtifactsManifest {
    pub fn total_bytes(&self) -> u64 {
        self.artifacts.iter().map(|a| a.bytes).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactsBackupError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("artifacts backup format {0}; this code reads format {ARTIFACTS_BACKUP_FORMAT}")]
    Format(u32),
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("{0} is not empty: artifacts restore only into a new store")]
    NotEmpty(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactsBackupError + '_ {
    move |e| ArtifactsBackupError::Io(path.to_owned(), e)
}

/// Names in `dir` (none if it does not exist).
fn names(dir: &Path) -> Result<Vec<String>, ArtifactsBackupError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()).map_err(io(dir))).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Who uploaded what: `(account, artifact)` pairs, and what the platform's token uploaded.
struct Records {
    owners: BTreeSet<(u64, Digest)>,
    service: BTreeSet<Digest>,
}

/// The records under `records` (`<store>/accounts`).
fn read_records(records: &Path) -> Result<Records, ArtifactsBackupError> {
    let mut owners = BTreeSet::new();
    for owner in names(&records.join("owners"))? {
        let Ok(account) = owner.parse::<u64>() else { continue };
        for file in names(&records.join("owners").join(&owner))? {
            if let Ok(digest) = file.parse::<Digest>() {
                owners.insert((account, digest));
            }
        }
    }
    let service = names(&records.join("service"))?.iter().filter_map(|f| f.parse::<Digest>().ok()).collect();
    Ok(Records { owners, service })
}

/// Backs up the store at `store_dir` (which a scheduler may be serving) into `pool`.
pub async fn take(store_dir: &Path, pool: &LocalStore) -> Result<ArtifactsManifest, ArtifactsBackupError> {
    let began = SystemTime::now();
    let Records { owners, service } = read_records(&store_dir.join(RECORDS_DIR))?;
    let source = LocalStore::reader(store_dir);
    let recorded: BTreeSet<Digest> = owners.iter().map(|(_, d)| *d).chain(service.iter().copied()).collect();
    let mut artifacts = Vec::new();
    for listed in source.list().await? {
        if listed.stored_at >= began && !recorded.contains(&listed.digest) {
            continue;
        }
        let in_pool = pool.size(listed.digest).await.ok();
        if in_pool != Some(listed.size) {
            let opened = match source.open(listed.digest, 0, listed.size).await {
                Ok(o) => o,
                // Collected as garbage since it was listed: it is in no later state either.
                Err(StoreError::NotFound(_)) => continue,
                Err(e) => return Err(e.into()),
            };
            pool.put(opened.reader, Some(listed.digest)).await?;
        }
        artifacts.push(BackedUp { sha256: listed.digest.to_hex(), bytes: listed.size });
    }
    let kept: BTreeSet<String> = artifacts.iter().map(|a| a.sha256.clone()).collect();
    Ok(ArtifactsManifest {
        backup_format: ARTIFACTS_BACKUP_FORMAT,
        owners: owners.into_iter().map(|(o, d)| (o, d.to_hex())).filter(|(_, d)| kept.contains(d)).collect(),
        service_uploads: service.into_iter().map(Digest::to_hex).filter(|d| kept.contains(d)).collect(),
        artifacts,
    })
}

/// Checks a manifest against the pool: its format, and every artifact there whole (re-hashed,
/// byte for byte).
pub async fn verify(manifest: &ArtifactsManifest, pool: &LocalStore) -> Result<(), ArtifactsBackupError> {
    if manifest.backup_format != ARTIFACTS_BACKUP_FORMAT {
        return Err(ArtifactsBackupError::Format(manifest.backup_format));
    }
    let damaged = |why: String| ArtifactsBackupError::Damaged(why);
    for artifact in &manifest.artifacts {
        let digest: Digest = artifact.sha256.parse().map_err(|e: StoreError| damaged(e.to_string()))?;
        let opened = pool.open(digest, 0, u64::MAX).await.map_err(|e| damaged(format!("artifact {digest}: {e}")))?;
        if opened.size != artifact.bytes {
            return Err(damaged(format!("artifact {digest} is {} bytes in the pool; the manifest says {}", opened.size, artifact.bytes)));
        }
        let (actual, _) = hash(opened.reader).await.map_err(|e| damaged(format!("artifact {digest}: {e}")))?;
        if actual != digest {
            return Err(damaged(format!("artifact {digest} in the pool hashes to {actual}")));
        }
    }
    let listed: BTreeSet<&str> = manifest.artifacts.iter().map(|a| a.sha256.as_str()).collect();
    if let Some(stray) = manifest.owners.iter().map(|(_, d)| d).chain(&manifest.service_uploads).find(|d| !listed.contains(d.as_str())) {
        return Err(damaged(format!("a record names {stray}, which the backup does not hold")));
    }
    Ok(())
}

async fn hash(mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>) -> std::io::Result<(Digest, u64)> {
    use sha2::Digest as _;
    use tokio::io::AsyncReadExt;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((Digest(hasher.finalize().into()), size));
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
}

/// Restores a verified backup into a new store at `store_dir` (missing or empty), records
/// included.
pub async fn restore(manifest: &ArtifactsManifest, pool: &LocalStore, store_dir: &Path) -> Result<(), ArtifactsBackupError> {
    if std::fs::read_dir(store_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(ArtifactsBackupError::NotEmpty(store_dir.to_owned()));
    }
    verify(manifest, pool).await?;
    let target = LocalStore::open(store_dir, u64::MAX)?;
    for artifact in &manifest.artifacts {
        let digest: Digest = artifact.sha256.parse()?;
        let opened = pool.open(digest, 0, artifact.bytes).await?;
        target.put(opened.reader, Some(digest)).await?;
    }
    let records = store_dir.join(RECORDS_DIR);
    for (owner, sha256) in &manifest.owners {
        record_owner(&records, *owner, sha256.parse()?).await.map_err(io(&records))?;
    }
    for sha256 in &manifest.service_uploads {
        record_service_upload(&records, sha256.parse()?).await.map_err(io(&records))?;
    }
    Ok(())
}

/// Deletes from the pool every artifact none of `kept` names (after older backups were
/// pruned); returns how many.
pub async fn sweep_pool(pool: &LocalStore, kept: &[ArtifactsManifest]) -> Result<usize, ArtifactsBackupError> {
    let needed: BTreeSet<&str> = kept.iter().flat_map(|m| m.artifacts.iter().map(|a| a.sha256.as_str())).collect();
    let mut removed = 0;
    for listed in pool.list().await? {
        if !needed.contains(listed.digest.to_hex().as_str()) && pool.delete_if_stored_before(listed.digest, SystemTime::now()).await? {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn put(store: &LocalStore, bytes: &[u8]) -> Digest {
        store.put(Box::new(std::io::Cursor::new(bytes.to_vec())), None).await.expect("put").0
    }

    #[tokio::test]
    async fn a_backup_restores_every_artifact_and_who_uploaded_it_and_copies_each_once() {
        let dir = tempfile::tempdir().expect("dir");
        let (source_dir, pool_dir) = (dir.path().join("store"), dir.path().join("pool"));
        let source = LocalStore::open(&source_dir, u64::MAX).expect("store");
        let owned = put(&source, b"a checkpoint of account 7").await;
        let platform = put(&source, b"a dataset the platform put there").await;
        let records = source_dir.join(RECORDS_DIR);
        record_owner(&records, 7, owned).await.expect("record");
        record_service_upload(&records, platform).await.expect("record");
        let pool = LocalStore::open(&pool_dir, u64::MAX).expect("pool");

        let first = take(&source_dir, &pool).await.expect("backup");
        assert_eq!(first.artifacts.len(), 2);
        assert_eq!(first.owners, vec![(7, owned.to_hex())]);
        assert_eq!(first.service_uploads, vec![platform.to_hex()]);
        verify(&first, &pool).await.expect("whole");
        let stored_at = pool.list().await.expect("list").iter().map(|l| l.stored_at).collect::<Vec<_>>();
        let second = take(&source_dir, &pool).await.expect("again");
        assert_eq!(second, first);
        assert_eq!(pool.list().await.expect("list").iter().map(|l| l.stored_at).collect::<Vec<_>>(), stored_at, "nothing copied twice");

        let restored = dir.path().join("restored");
        restore(&first, &pool, &restored).await.expect("restore");
        let again = take(&restored, &LocalStore::open(&dir.path().join("pool-2"), u64::MAX).expect("pool")).await.expect("backup of the restore");
        assert_eq!(again, first, "the same artifacts and records");
        let refused = restore(&first, &pool, &restored).await;
        assert!(matches!(refused, Err(ArtifactsBackupError::NotEmpty(_))), "{refused:?}");
    }

    #[tokio::test]
    async fn an_artifact_changed_or_lost_in_the_pool_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let source_dir = dir.path().join("store");
        let source = LocalStore::open(&source_dir, u64::MAX).expect("store");
        let digest = put(&source, b"weights").await;
        let pool_dir = dir.path().join("pool");
        let pool = LocalStore::open(&pool_dir, u64::MAX).expect("pool");
        let manifest = take(&source_dir, &pool).await.expect("backup");
        let file = pool_dir.join(&digest.to_hex()[..2]).join(digest.to_hex());
        std::fs::write(&file, b"weighty").expect("tamper");
        let changed = verify(&manifest, &pool).await.expect_err("changed");
        assert!(changed.to_string().contains(&digest.to_hex()), "{changed}");
        std::fs::remove_file(&file).expect("lose it");
        let lost = verify(&manifest, &pool).await.expect_err("lost");
        assert!(lost.to_string().contains(&digest.to_hex()), "{lost}");
        let target = dir.path().join("target");
        assert!(restore(&manifest, &pool, &target).await.is_err());
        assert!(!target.exists(), "nothing restored from a damaged pool");
    }

    #[tokio::test]
    async fn an_upload_after_the_backup_began_with_no_record_yet_is_left_for_the_next_backup() {
        let dir = tempfile::tempdir().expect("dir");
        let source_dir = dir.path().join("store");
        let source = LocalStore::open(&source_dir, u64::MAX).expect("store");
        let before = put(&source, b"before").await;
        // Stored "in the future" (after the backup began), owner record still on its way.
        let later = put(&source, b"later").await;
        let file = std::fs::File::options().write(true).open(source_dir.join(&later.to_hex()[..2]).join(later.to_hex())).expect("open");
        file.set_modified(SystemTime::now() + std::time::Duration::from_secs(60)).expect("mtime");
        let manifest = take(&source_dir, &LocalStore::open(&dir.path().join("pool"), u64::MAX).expect("pool")).await.expect("backup");
        assert_eq!(manifest.artifacts.iter().map(|a| a.sha256.clone()).collect::<Vec<_>>(), vec![before.to_hex()]);
    }
}
