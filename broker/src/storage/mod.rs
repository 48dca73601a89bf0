//! openraft storage over one RocksDB database.
//!
//! Column families:
//! - `log`: Raft log entries, key = big-endian u64 index (so byte order is index order);
//! - `meta`: the vote, the committed log id, the last purged log id, the events purge mark and
//!   `format_version`;
//! - `snapshot`: the latest snapshot (meta + data);
//! - `events`: the events of each applied entry, key = big-endian u64 index, for `Watch`;
//! - `archive`: what left the hot state (ended leases, jobs, old ledger lines), by ID
//!   (`archive.rs`).
//!
//! Durability: the vote and every appended batch are written with `sync = true` before openraft
//! is told they are persisted, so an acknowledged write survives power loss, not only `kill -9`.
//! The state machine lives in memory and is rebuilt on start from the latest snapshot plus the
//! committed log; its events and archive records are written without sync because
//! re-applying recreates them (and the synced write of a snapshot that no longer holds them
//! syncs RocksDB's write-ahead log up to it, them included).
//!
//! Formats: 4 added the archive, 5 remote leases, 6 (this code) the cluster format
//! (`state::machine::upgrade`); a format-3, 4 or 5 store is migrated when opened ([`migrate`]),
//! an older backup when restored. While its cluster is at format 5 this code sends format 5's
//! snapshots (`state_machine::transfer_payload`).

pub(crate) mod archive;
mod log_store;
mod snapshot_data;
mod state_machine;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

pub use archive::{Archive, ArchivedLease};
pub use log_store::LogStore;
pub use snapshot_data::SnapshotData;
pub use state_machine::{ClusterFormatWatch, StateMachineStore, DEFAULT_EVENTS_RETAINED};

use crate::state::{Envelope, Outcome};

openraft::declare_raft_types!(
    /// The broker's Raft types: the log carries command envelopes, applying one yields its outcome.
    pub TypeConfig:
        D = Envelope,
        R = Outcome,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// The on-disk format this code reads and writes. Bumped on any incompatible change; a node
/// refuses to open data of another version instead of misreading it.
pub const FORMAT_VERSION: u32 = 7;
/// The oldest format this code migrates from.
pub const OLDEST_READABLE_FORMAT: u32 = 3;

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_SNAPSHOT: &str = "snapshot";
pub(crate) const CF_EVENTS: &str = "events";
pub(crate) const CF_ARCHIVE: &str = "archive";

pub(crate) const KEY_FORMAT: &[u8] = b"format_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("encoding: {0}")]
    Codec(#[from] postcard::Error),
    #[error("data in {path} has on-disk format {found}; this broker reads format {FORMAT_VERSION}")]
    FormatVersion { path: String, found: u32 },
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    #[error("column family {0} missing")]
    MissingColumnFamily(&'static str),
    #[error("{0} is not empty: a restore makes a new store, it never writes over one")]
    NotEmpty(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// Opens (or creates) the store at `path`: the log store and the state machine share one
/// RocksDB instance.
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let cfs = [CF_LOG, CF_META, CF_SNAPSHOT, CF_EVENTS, CF_ARCHIVE].into_iter().map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = Arc::new(DB::open_cf_descriptors(&options, path, cfs)?);
    check_format(&db, path)?;
    let log = LogStore::new(db.clone());
    let sm = StateMachineStore::open(db)?;
    Ok((log, sm))
}

/// Builds a new store at `path` (missing or empty) from a state exported by a broker of store
/// format `format` ([`StateMachineStore::export`]), for node `node` reachable by its peers at
/// `address`, the only voter of the restored cluster. Refuses data that does not decode or
/// breaks the state's invariants, and any existing store. Returns the log position the state
/// reflects.
pub fn restore(path: &Path, exported: &[u8], format: u32, node: NodeId, address: &str) -> Result<Option<LogId>, StoreError> {
    if !(OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&format) {
        return Err(StoreError::FormatVersion { path: "the backup".into(), found: format });
    }
    let occupied = match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(StoreError::Io(path.display().to_string(), e)),
    };
    if occupied {
        return Err(StoreError::NotEmpty(path.display().to_string()));
    }
    // A bad backup leaves no half-made store behind.
    let made = (|| -> Result<Option<LogId>, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::Io(path.display().to_string(), e))?;
        let (log, sm) = open(path)?;
        let position = sm.seed(exported, format, node, address)?;
        if let Some(position) = position {
            log.mark_purged(position)?;
            log.seed_vote(position.leader_id.term, node)?;
        }
        Ok(position)
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(path);
    }
    made
}

fn check_format(db: &DB, path: &Path) -> Result<(), StoreError> {
    let meta = cf(db, CF_META)?;
    match db.get_cf(meta, KEY_FORMAT)? {
        Some(bytes) => {
            let found = bytes.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(u32::MAX);
            match found {
                FORMAT_VERSION => {}
                3..=6 => migrate(db, found)?,
                _ => return Err(StoreError::FormatVersion { path: path.display().to_string(), found }),
            }
        }
        None => {
            let mut sync = rocksdb::WriteOptions::default();
            sync.set_sync(true);
            db.put_cf_opt(meta, KEY_FORMAT, FORMAT_VERSION.to_be_bytes(), &sync)?;
        }
    }
    Ok(())
}

/// Format 3, 4, 5 or 6 → this one. Format 4 gave the snapshot's state `ledger_archived` (0: a
/// format-3 broker archived nothing) and the store an empty archive; format 5 gave the state
/// `remote_leases` (none before); format 6 the cluster format (5 for what format 5 or older
/// wrote: the cluster may still have nodes of format 5, and is raised when it has none); format
/// 7 only the `Batch` command and its outcome (a format-6 state is a format-7 state byte for
/// byte). The log and the events read unchanged (commands, events, outcomes and ledger accounts
/// only gained variants, appended). One synced write: a crash leaves the old format.
fn migrate(db: &DB, found: u32) -> Result<(), StoreError> {
    let mut batch = rocksdb::WriteBatch::default();
    if let Some(bytes) = db.get_cf(cf(db, CF_SNAPSHOT)?, state_machine::KEY_SNAPSHOT)? {
        batch.put_cf(cf(db, CF_SNAPSHOT)?, state_machine::KEY_SNAPSHOT, state_machine::stored_snapshot_to_current(&bytes, found)?);
    }
    batch.put_cf(cf(db, CF_META)?, KEY_FORMAT, FORMAT_VERSION.to_be_bytes());
    let mut sync = rocksdb::WriteOptions::default();
    sync.set_sync(true);
    db.write_opt(batch, &sync)?;
    tracing::info!("store migrated from format {found} to {FORMAT_VERSION}");
    Ok(())
}

pub(crate) fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a rocksdb::ColumnFamily, StoreError> {
    db.cf_handle(name).ok_or(StoreError::MissingColumnFamily(name))
}

/// A storage failure as openraft reports it: what was being read or written, and why.
pub(crate) fn io_err(subject: openraft::ErrorSubject<NodeId>, verb: openraft::ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&e)).into()
}

pub(crate) fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub(crate) fn key_index(key: &[u8]) -> Option<u64> {
    key.try_into().ok().map(u64::from_be_bytes)
}

#[cfg(test)]
mod migration_tests;
