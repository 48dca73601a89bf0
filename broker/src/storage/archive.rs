//! The archive column family: what left the hot state ([`Archived`]), by ID, immutable.
//!
//! Keys (a declared format, pinned by golden bytes in `broker/formats/v4/archive.txt`):
//! - `L` + lease ID (u64, big-endian) → [`ArchivedLease`];
//! - `J` + job ID → `Job`;
//! - `O` + owner account ID + job ID → nothing (a statement's jobs);
//! - `T` + transaction ID → `Transaction`;
//! - `H` + holder account ID + transaction ID → nothing (a statement's index);
//! - `E` + lease ID → `ServiceEvaluation`.
//!
//! A record is written once, by the entry that archived it, with the same bytes on every
//! replica; it is never changed or deleted. So a snapshot may carry the archive as it is when
//! the snapshot is sent (a superset of what its index had archived): a record both hot and
//! archived on a node that installed such a snapshot is read from the hot state, and ledger
//! lines are read from the archive only up to the state's `ledger_archived`.

use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use suanli_types::{AccountId, JobId, LeaseId, Transaction};

use super::{cf, StoreError, CF_ARCHIVE};
use crate::state::{Archived, Job, Lease, LeaseAccount, ServiceEvaluation};

const LEASE: u8 = b'L';
const JOB: u8 = b'J';
const TRANSACTION: u8 = b'T';
const HOLDER: u8 = b'H';
const OWNER: u8 = b'O';
const EVALUATION: u8 = b'E';

/// Archive records as stored: key, value.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An archived lease and its money record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedLease {
    pub lease: Lease,
    pub account: Option<LeaseAccount>,
}

fn key(tag: u8, id: u64) -> [u8; 9] {
    let mut key = [tag; 9];
    key[1..].copy_from_slice(&id.to_be_bytes());
    key
}

/// An index key: `tag` + account + record ID.
fn index_key(tag: u8, account: AccountId, id: u64) -> [u8; 17] {
    let mut key = [tag; 17];
    key[1..9].copy_from_slice(&account.0.to_be_bytes());
    key[9..].copy_from_slice(&id.to_be_bytes());
    key
}

/// The key-value pairs one archived record is stored as.
pub(crate) fn encode(record: &Archived) -> Result<Pairs, StoreError> {
    Ok(match record {
        Archived::Lease { lease, account } => {
            let value = ArchivedLease { lease: lease.clone(), account: account.clone() };
            vec![(key(LEASE, lease.id.0).to_vec(), postcard::to_allocvec(&value)?)]
        }
        Archived::Job(job) => vec![(key(JOB, job.id.0).to_vec(), postcard::to_allocvec(job)?), (index_key(OWNER, job.owner, job.id.0).to_vec(), Vec::new())],
        Archived::Transaction { transaction, holders } => {
            let mut pairs = vec![(key(TRANSACTION, transaction.id).to_vec(), postcard::to_allocvec(transaction)?)];
            pairs.extend(holders.iter().map(|h| (index_key(HOLDER, *h, transaction.id).to_vec(), Vec::new())));
            pairs
        }
        Archived::Evaluation(evaluation) => vec![(key(EVALUATION, evaluation.lease.0).to_vec(), postcard::to_allocvec(evaluation)?)],
    })
}

/// Adds what applying an entry archived to that entry's write batch.
pub(crate) fn write(db: &DB, batch: &mut WriteBatch, records: &[Archived]) -> Result<(), StoreError> {
    let archive = cf(db, CF_ARCHIVE)?;
    for record in records {
        for (key, value) in encode(record)? {
            batch.put_cf(archive, key, value);
        }
    }
    Ok(())
}

/// Reads the archive. Cheap to clone.
#[derive(Clone)]
pub struct Archive {
    db: Arc<DB>,
}

impl Archive {
    pub(crate) fn new(db: Arc<DB>) -> Self {
        Archive { db }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.db.get_pinned_cf(cf(&self.db, CF_ARCHIVE)?, key)? {
            Some(bytes) => Ok(Some(postcard::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn lease(&self, id: LeaseId) -> Result<Option<ArchivedLease>, StoreError> {
        self.get(&key(LEASE, id.0))
    }

    pub fn job(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        self.get(&key(JOB, id.0))
    }

    pub fn evaluation(&self, lease: LeaseId) -> Result<Option<ServiceEvaluation>, StoreError> {
        self.get(&key(EVALUATION, lease.0))
    }

    /// The archived ledger lines touching `holder`'s accounts with IDs in `(after, up_to]`
    /// (`up_to`: the state's `ledger_archived`) that `keep` accepts, oldest first, at most `max`.
    pub fn transactions_of(
        &self,
        holder: AccountId,
        after: u64,
        up_to: u64,
        keep: impl Fn(&Transaction) -> bool,
        max: usize,
    ) -> Result<Vec<Transaction>, StoreError> {
        self.indexed(HOLDER, holder, TRANSACTION, after, up_to, keep, max)
    }

    /// The owner's archived jobs with IDs below `below` (the state's next ID), by ID.
    pub fn jobs_of(&self, owner: AccountId, below: u64) -> Result<Vec<Job>, StoreError> {
        self.indexed(OWNER, owner, JOB, 0, below.saturating_sub(1), |_| true, usize::MAX)
    }

    /// The records an account's index names with IDs in `(after, up_to]` that `keep` accepts,
    /// in ID order, at most `max`.
    #[allow(clippy::too_many_arguments)]
    fn indexed<T: serde::de::DeserializeOwned>(
        &self,
        index: u8,
        account: AccountId,
        tag: u8,
        after: u64,
        up_to: u64,
        keep: impl Fn(&T) -> bool,
        max: usize,
    ) -> Result<Vec<T>, StoreError> {
        let archive = cf(&self.db, CF_ARCHIVE)?;
        let prefix = index_key(index, account, 0);
        let start = index_key(index, account, after.saturating_add(1));
        let mut out = Vec::new();
        for item in self.db.iterator_cf(archive, IteratorMode::From(&start, Direction::Forward)) {
            if out.len() >= max {
                break;
            }
            let (k, _) = item?;
            let Some(id) = k.strip_prefix(&prefix[..9]).and_then(|id| id.try_into().ok()).map(u64::from_be_bytes) else { break };
            if id > up_to {
                break;
            }
            let record: T = self.get(&key(tag, id))?.ok_or_else(|| StoreError::Corrupt(format!("archived record {}{id} missing", tag as char)))?;
            if keep(&record) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Every key-value pair, in key order, in chunks of at most `chunk` pairs, from a
    /// consistent view (what a snapshot carries).
    pub(crate) fn chunks(&self, chunk: usize, mut each: impl FnMut(Pairs) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let view = self.db.snapshot();
        let mut pairs = Vec::with_capacity(chunk);
        for item in view.iterator_cf(cf(&self.db, CF_ARCHIVE)?, IteratorMode::Start) {
            let (k, v) = item?;
            pairs.push((k.into_vec(), v.into_vec()));
            if pairs.len() == chunk {
                each(std::mem::take(&mut pairs))?;
            }
        }
        if !pairs.is_empty() {
            each(pairs)?;
        }
        Ok(())
    }

    /// Stores pairs a snapshot carried (the same bytes the sender's entries wrote).
    pub(crate) fn put_all(&self, pairs: Pairs) -> Result<(), StoreError> {
        let archive = cf(&self.db, CF_ARCHIVE)?;
        let mut batch = WriteBatch::default();
        for (k, v) in pairs {
            batch.put_cf(archive, k, v);
        }
        self.db.write(batch)?;
        Ok(())
    }
}

/// Refuses pairs a snapshot carried that this format does not write: an unknown tag, a key of
/// the wrong length, a value that does not decode as its tag's record.
pub(crate) fn validate(pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), StoreError> {
    for (k, v) in pairs {
        let decodes = match (k.first().copied(), k.len()) {
            (Some(LEASE), 9) => postcard::from_bytes::<ArchivedLease>(v).is_ok(),
            (Some(JOB), 9) => postcard::from_bytes::<Job>(v).is_ok(),
            (Some(TRANSACTION), 9) => postcard::from_bytes::<Transaction>(v).is_ok(),
            (Some(EVALUATION), 9) => postcard::from_bytes::<ServiceEvaluation>(v).is_ok(),
            (Some(HOLDER | OWNER), 17) => v.is_empty(),
            _ => false,
        };
        if !decodes {
            return Err(StoreError::Corrupt(format!("an archive record this format does not write (key {k:02x?})")));
        }
    }
    Ok(())
}
