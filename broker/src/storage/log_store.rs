//! The Raft log and vote, in RocksDB.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{cf, index_key, io_err, key_index, LogId, NodeId, StorageError, StoreError, TypeConfig, CF_LOG, CF_META};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"last_purged";

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The committed index openraft last reported, for metrics.
    committed: Arc<std::sync::atomic::AtomicU64>,
}

impl LogStore {
    pub(super) fn new(db: Arc<DB>) -> Self {
        LogStore { db, committed: Arc::default() }
    }

    /// The committed log index as last reported by openraft (0 before the first commit).
    pub fn committed_index(&self) -> u64 {
        self.committed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        let meta = cf(&self.db, CF_META)?;
        match self.db.get_cf(meta, key)? {
            Some(bytes) => Ok(Some(postcard::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Writes a meta value; `sync` makes it durable before returning.
    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T, sync: bool) -> Result<(), StoreError> {
        let meta = cf(&self.db, CF_META)?;
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db.put_cf_opt(meta, key, postcard::to_allocvec(value)?, &options)?;
        Ok(())
    }

    /// A restored store: the log up to `log_id` is taken as purged (its effect is in the
    /// restored snapshot), so the log goes on after it.
    pub(super) fn mark_purged(&self, log_id: LogId) -> Result<(), StoreError> {
        self.put_meta(KEY_PURGED, &log_id, true)
    }

    /// A restored store: `node` voted for itself in the term of the restored position, so its
    /// first election is in a later term than any entry it holds.
    pub(super) fn seed_vote(&self, term: u64, node: NodeId) -> Result<(), StoreError> {
        self.put_meta(KEY_VOTE, &Vote::new(term, node), true)
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let log = cf(&self.db, CF_LOG)?;
        match self.db.iterator_cf(log, IteratorMode::End).next() {
            Some(item) => {
                let (_, value) = item?;
                let entry: Entry<TypeConfig> = postcard::from_bytes(&value)?;
                Ok(Some(*entry.get_log_id()))
            }
            None => Ok(None),
        }
    }

    fn read_range(&self, start: u64, end: Bound<u64>) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        let log = cf(&self.db, CF_LOG)?;
        let mut entries = Vec::new();
        for item in self.db.iterator_cf(log, IteratorMode::From(&index_key(start), Direction::Forward)) {
            let (key, value) = item?;
            let Some(index) = key_index(&key) else { continue };
            let within = match end {
                Bound::Included(e) => index <= e,
                Bound::Excluded(e) => index < e,
                Bound::Unbounded => true,
            };
            if !within {
                break;
            }
            entries.push(postcard::from_bytes(&value)?);
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        self.read_range(start, range.end_bound().cloned()).map_err(|e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = |e| io_err(ErrorSubject::Logs, ErrorVerb::Read, e);
        let last_purged: Option<LogId> = self.get_meta(KEY_PURGED).map_err(read)?;
        let last = self.last_entry_log_id().map_err(read)?.or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        // Synced: a node must never forget a vote it may already have sent.
        self.put_meta(KEY_VOTE, vote, true).map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(KEY_VOTE).map_err(|e| io_err(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.committed.store(committed.map_or(0, |c| c.index), std::sync::atomic::Ordering::Relaxed);
        // Not synced: losing it only means re-learning the commit index from the leader; it lets
        // a restarted node re-apply its committed entries at once.
        // Outside the WAL, too: a WAL write would join the next log append's fsync group and
        // wait for that disk sync on Raft's critical path.
        let write = |e| io_err(ErrorSubject::Store, ErrorVerb::Write, e);
        let meta = cf(&self.db, CF_META).map_err(write)?;
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        let bytes = postcard::to_allocvec(&committed).map_err(|e| write(e.into()))?;
        self.db.put_cf_opt(meta, KEY_COMMITTED, bytes, &options).map_err(|e| write(e.into()))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> = self.get_meta(KEY_COMMITTED).map_err(|e| io_err(ErrorSubject::Store, ErrorVerb::Read, e))?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = |e| io_err(ErrorSubject::Logs, ErrorVerb::Write, e);
        let log = cf(&self.db, CF_LOG).map_err(write)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let bytes = postcard::to_allocvec(&entry).map_err(|e| write(e.into()))?;
            batch.put_cf(log, index_key(entry.get_log_id().index), bytes);
        }
        let mut options = WriteOptions::default();
        options.set_sync(true);
        let result = self.db.write_opt(batch, &options);
        // Only now, with the batch on disk, may openraft count these entries as persisted.
        let io_result = result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string()));
        callback.log_io_completed(io_result);
        result.map_err(|e| write(e.into()))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write = |e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        let log = cf(&self.db, CF_LOG).map_err(write)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(log, index_key(log_id.index), index_key(u64::MAX));
        batch.delete_cf(log, index_key(u64::MAX));
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch, &options).map_err(|e| write(e.into()))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write = |e| io_err(ErrorSubject::Logs, ErrorVerb::Delete, e);
        // Record the purge mark first: if we crash in between, the extra entries are harmless.
        self.put_meta(KEY_PURGED, &log_id, true).map_err(write)?;
        let log = cf(&self.db, CF_LOG).map_err(write)?;
        self.db.delete_range_cf(log, index_key(0), index_key(log_id.index.saturating_add(1))).map_err(|e| write(e.into()))
    }
}
