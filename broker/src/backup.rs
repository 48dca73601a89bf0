//! Backups of the replicated state, and restores into a new cluster.
//!
//! A backup is a directory: `manifest.json` (versioned, [`BACKUP_FORMAT`]) and
//! `broker-state.bin`, the state as the leader had applied it when asked (`ExportState`:
//! everything committed before the call), in the store's snapshot encoding, with its SHA-256
//! and the log position it reflects. Taking one does not stop or slow the cluster beyond one
//! copy of the state. A restore checks the manifest, the size, the checksum, the store format
//! and the state's invariants before it writes anything, and makes a *new* store whose only
//! voter is the restoring node (`storage::restore`); the other nodes join it as learners.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use crate::storage::{self, StoreError, FORMAT_VERSION, OLDEST_READABLE_FORMAT};
use suanli_proto::v1;

/// The layout of a backup directory this code writes and reads.
pub const BACKUP_FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const BROKER_STATE: &str = "broker-state.bin";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub backup_format: u32,
    pub taken_at_ms: i64,
    pub broker: BrokerPart,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerPart {
    /// The broker's on-disk format the state is encoded in (`storage::FORMAT_VERSION`).
    pub store_format: u32,
    pub last_applied_index: u64,
    pub last_applied_term: u64,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0} already holds something: a backup never writes over another")]
    NotEmpty(PathBuf),
    #[error("no broker answered as leader: {0}")]
    Remote(String),
    #[error("the manifest is unreadable: {0}")]
    Manifest(String),
    #[error("backup format {found}; this broker reads format {BACKUP_FORMAT}")]
    BackupFormat { found: u32 },
    #[error("the state was written in store format {found}; this broker restores formats {OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}")]
    StoreFormat { found: u32 },
    #[error("{file} is damaged: {why}")]
    Damaged { file: PathBuf, why: String },
    #[error("restore: {0}")]
    Store(#[from] StoreError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(path.to_owned(), e)
}

/// Takes a backup from the first of `endpoints` that is the leader, into the new directory
/// `out` (missing or empty). Files appear whole or not at all (written beside, synced, renamed).
pub async fn take(endpoints: &[String], token: &str, ca_pem: Option<&str>, out: &Path) -> Result<Manifest, BackupError> {
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::NotEmpty(out.to_owned()));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut why = Vec::new();
    for endpoint in endpoints {
        match take_from(endpoint, token, ca_pem, out).await {
            Ok(manifest) => return Ok(manifest),
            Err(BackupError::Remote(e)) => why.push(format!("{endpoint}: {e}")),
            Err(e) => return Err(e),
        }
    }
    Err(BackupError::Remote(why.join("; ")))
}

async fn take_from(endpoint: &str, token: &str, ca_pem: Option<&str>, out: &Path) -> Result<Manifest, BackupError> {
    let remote = |e: &dyn std::fmt::Display| BackupError::Remote(e.to_string());
    let channel = suanli_proto::client::channel_checked(endpoint, ca_pem).await.map_err(|e| remote(&e))?;
    let auth = suanli_proto::client::bearer(Some(token)).map_err(|e| remote(&e))?;
    let mut admin = v1::cluster_admin_client::ClusterAdminClient::with_interceptor(channel, auth);
    let mut stream = admin.export_state(v1::ExportStateRequest {}).await.map_err(|s| remote(&suanli_proto::decode_status(&s)))?.into_inner();
    let header = match stream.next().await {
        Some(Ok(h)) => h,
        Some(Err(s)) => return Err(remote(&suanli_proto::decode_status(&s))),
        None => return Err(remote(&"the export ended before it began")),
    };
    let partial = out.join(format!("{BROKER_STATE}.partial"));
    let mut file = tokio::fs::File::create(&partial).await.map_err(io(&partial))?;
    let (mut hasher, mut written) = (Sha256::new(), 0u64);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| remote(&suanli_proto::decode_status(&s)))?;
        hasher.update(&chunk.data);
        written += chunk.data.len() as u64;
        file.write_all(&chunk.data).await.map_err(io(&partial))?;
    }
    let sha256 = hex::encode(hasher.finalize());
    if written != header.total_bytes || sha256 != header.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(remote(&format!("the export arrived damaged ({written} of {} bytes, sha256 {sha256})", header.total_bytes)));
    }
    file.sync_all().await.map_err(io(&partial))?;
    let state = out.join(BROKER_STATE);
    std::fs::rename(&partial, &state).map_err(io(&state))?;
    let manifest = Manifest {
        backup_format: BACKUP_FORMAT,
        taken_at_ms: crate::service::now().millis(),
        broker: BrokerPart {
            store_format: header.store_format,
            last_applied_index: header.last_applied_index,
            last_applied_term: header.last_applied_term,
            file: BROKER_STATE.into(),
            bytes: written,
            sha256,
        },
    };
    write_manifest(out, &manifest)?;
    Ok(manifest)
}

fn write_manifest(out: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let partial = out.join(format!("{MANIFEST}.partial"));
    let text = serde_json::to_string_pretty(manifest).map_err(|e| BackupError::Manifest(e.to_string()))?;
    std::fs::write(&partial, text).map_err(io(&partial))?;
    std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    let path = out.join(MANIFEST);
    std::fs::rename(&partial, &path).map_err(io(&path))?;
    std::fs::File::open(out).and_then(|d| d.sync_all()).map_err(io(out))
}

/// Reads and checks a backup: its manifest, and the state file's size and checksum.
pub fn open(backup: &Path) -> Result<(Manifest, Vec<u8>), BackupError> {
    let path = backup.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| BackupError::Manifest(e.to_string()))?;
    if manifest.backup_format != BACKUP_FORMAT {
        return Err(BackupError::BackupFormat { found: manifest.backup_format });
    }
    let name = Path::new(&manifest.broker.file);
    if name.components().count() != 1 || name.file_name().is_none() {
        return Err(BackupError::Manifest(format!("{name:?} is not a file name inside the backup")));
    }
    let path = backup.join(name);
    let data = std::fs::read(&path).map_err(io(&path))?;
    let damaged = |why: String| BackupError::Damaged { file: path.clone(), why };
    if data.len() as u64 != manifest.broker.bytes {
        return Err(damaged(format!("{} bytes, the manifest says {}", data.len(), manifest.broker.bytes)));
    }
    let sha256 = hex::encode(Sha256::digest(&data));
    if sha256 != manifest.broker.sha256 {
        return Err(damaged(format!("its SHA-256 is {sha256}, the manifest says {}", manifest.broker.sha256)));
    }
    if !(OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&manifest.broker.store_format) {
        return Err(BackupError::StoreFormat { found: manifest.broker.store_format });
    }
    Ok((manifest, data))
}

/// Restores `backup` into a new store at `data_dir` for node `node_id`, which its future peers
/// will reach at `peer_address`.
pub fn restore(backup: &Path, data_dir: &Path, node_id: u64, peer_address: &str) -> Result<Manifest, BackupError> {
    let (manifest, data) = open(backup)?;
    if std::fs::read_dir(data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::Store(StoreError::NotEmpty(data_dir.display().to_string())));
    }
    if let Err(e) = storage::restore(&crate::server::raft_dir(data_dir), &data, manifest.broker.store_format, node_id, peer_address) {
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(e.into());
    }
    Ok(manifest)
}
