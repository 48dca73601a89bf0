//! The state machine side of openraft: the in-memory [`State`], snapshots in RocksDB, the
//! event log that feeds `Watch`, and the archive of what left the hot state.
//!
//! A snapshot as stored is the hot state only ([`SnapshotPayload`]). As sent to a follower or
//! exported for a backup, it is that payload followed by the archive in chunks of
//! [`ARCHIVE_CHUNK`] key-value pairs ([`Transfer`]), read from a consistent view of the archive
//! column family when the bytes are first read (`SnapshotData`): openraft's look at the current
//! snapshot at every start reads no archive. While one is sent or received its bytes are in
//! memory (the hot state is bounded by the archive's retention; the archive is not).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{Entry, EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::archive::{self, Archive};
use super::snapshot_data::SnapshotData;
use super::{
    cf, index_key, io_err, key_index, LogId, NodeId, StorageError, StoreError, TypeConfig, CF_EVENTS, CF_META, CF_SNAPSHOT, FORMAT_VERSION,
    OLDEST_READABLE_FORMAT,
};
use crate::state::machine::format_v3::StateV3;
use crate::state::machine::format_v4::StateV4;
use crate::state::machine::format_v5::StateV5;
use crate::state::{AppliedEvents, Outcome, Response, State};
use suanli_types::Timestamp;

pub(super) const KEY_SNAPSHOT: &[u8] = b"current";
/// Events below this index were discarded (compaction, or a snapshot installed from a leader).
const KEY_EVENTS_FLOOR: &[u8] = b"events_floor";
/// By default, how many log indexes of events are kept behind the latest snapshot for watchers
/// to resume from.
pub const DEFAULT_EVENTS_RETAINED: u64 = 100_000;

type Membership = StoredMembership<NodeId, openraft::BasicNode>;

struct Applied {
    state: State,
    last_applied: Option<LogId>,
    membership: Membership,
}

#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    last_applied: Option<LogId>,
    membership: Membership,
    state: State,
}

/// [`SnapshotPayload`] as an earlier format wrote it, with that format's state (`StateV3`,
/// `StateV4`, `StateV5`): read by the migrations, by restores of older backups and from nodes
/// of the format before during a rolling upgrade.
#[derive(Deserialize)]
pub(super) struct OlderSnapshotPayload<S> {
    last_applied: Option<LogId>,
    membership: Membership,
    state: S,
}

impl<S: Into<State>> From<OlderSnapshotPayload<S>> for SnapshotPayload {
    fn from(old: OlderSnapshotPayload<S>) -> Self {
        SnapshotPayload { last_applied: old.last_applied, membership: old.membership, state: old.state.into() }
    }
}

/// A snapshot payload of store format `format` (3 to the current one) as this format's, with
/// the bytes that follow it (format 4 on: the archive's chunks).
fn take_payload(bytes: &[u8], format: u32) -> Result<(SnapshotPayload, &[u8]), StoreError> {
    Ok(match format {
        // Format 3 sent nothing after the payload.
        3 => (postcard::from_bytes::<OlderSnapshotPayload<StateV3>>(bytes)?.into(), &[]),
        4 => {
            let (old, rest) = postcard::take_from_bytes::<OlderSnapshotPayload<StateV4>>(bytes)?;
            (old.into(), rest)
        }
        5 => {
            let (old, rest) = postcard::take_from_bytes::<OlderSnapshotPayload<StateV5>>(bytes)?;
            (old.into(), rest)
        }
        _ => postcard::take_from_bytes::<SnapshotPayload>(bytes)?,
    })
}

/// Archive key-value pairs per chunk of a sent snapshot.
pub const ARCHIVE_CHUNK: usize = 4096;

/// A snapshot sent or exported in format 6 or later begins with this mark and its store format
/// (a big-endian u32), so a receiver knows which format it holds whichever node sent it. Format
/// 5's and older begin with the payload, whose first byte (an `Option`'s tag) is 0 or 1.
const TRANSFER_MARK: &[u8; 4] = b"SLTF";
/// The first store format whose snapshots carry [`TRANSFER_MARK`].
const FIRST_MARKED_FORMAT: u32 = 6;

/// A snapshot as sent or exported: the payload, then the archive's pairs in chunks.
struct Transfer {
    payload: SnapshotPayload,
    /// The payload's bytes as they arrived (what the receiver stores as its snapshot).
    payload_bytes: Vec<u8>,
    archive: Vec<archive::Pairs>,
}

impl Transfer {
    /// Decodes a snapshot sent by a leader: marked with its format, or format 5's (a node of
    /// format 5, or one of this format whose cluster is still at 5).
    fn decode_sent(bytes: &[u8]) -> Result<Transfer, StoreError> {
        match read_mark(bytes)? {
            Some((format, rest)) => Transfer::decode(rest, format),
            None => Transfer::decode(bytes, crate::state::machine::upgrade::FIRST_CLUSTER_FORMAT),
        }
    }

    /// Decodes a backup's state, which its manifest says is of store format `format`.
    fn decode_exported(bytes: &[u8], format: u32) -> Result<Transfer, StoreError> {
        match read_mark(bytes)? {
            Some((marked, rest)) if marked == format => Transfer::decode(rest, format),
            Some((marked, _)) => Err(StoreError::Corrupt(format!("the backup says store format {format}; its data is format {marked}"))),
            // Formats before 6 wrote no mark; 6 and later always do.
            None if format <= crate::state::machine::upgrade::FIRST_CLUSTER_FORMAT => Transfer::decode(bytes, format),
            None => Err(StoreError::Corrupt(format!("a format-{format} state without its format mark"))),
        }
    }

    /// Decodes an unmarked snapshot of store format `format` (this one, or an earlier one:
    /// migrated).
    fn decode(bytes: &[u8], format: u32) -> Result<Transfer, StoreError> {
        if !(OLDEST_READABLE_FORMAT..=FORMAT_VERSION).contains(&format) {
            return Err(StoreError::FormatVersion { path: "a snapshot".into(), found: format });
        }
        let (payload, mut rest) = take_payload(bytes, format)?;
        let payload_bytes = if format == FORMAT_VERSION { bytes[..bytes.len() - rest.len()].to_vec() } else { postcard::to_allocvec(&payload)? };
        let mut archive = Vec::new();
        while !rest.is_empty() {
            let (chunk, after): (archive::Pairs, &[u8]) = postcard::take_from_bytes(rest)?;
            archive::validate(&chunk)?;
            archive.push(chunk);
            rest = after;
        }
        Ok(Transfer { payload, payload_bytes, archive })
    }
}

/// The format a marked transfer is in and what follows the mark; `None` for an unmarked one.
fn read_mark(bytes: &[u8]) -> Result<Option<(u32, &[u8])>, StoreError> {
    let Some(rest) = bytes.strip_prefix(TRANSFER_MARK.as_slice()) else { return Ok(None) };
    let Some((format, rest)) = rest.split_first_chunk::<4>() else {
        return Err(StoreError::Corrupt("a snapshot cut short in its format mark".into()));
    };
    Ok(Some((u32::from_be_bytes(*format), rest)))
}

/// A stored payload (this store format's) as a snapshot of store format `format` begins when
/// sent: marked, or, for a cluster still at format 5, format 5's bytes (the state without its
/// cluster format, `State::encode_as_format_5`).
pub(super) fn transfer_payload(stored: &[u8], format: u32) -> Result<Vec<u8>, StoreError> {
    // Format 7 changed no stored type (it added a command): a format-6 state has the same bytes.
    if (FIRST_MARKED_FORMAT..=FORMAT_VERSION).contains(&format) {
        let mut bytes = Vec::with_capacity(stored.len() + 8);
        bytes.extend_from_slice(TRANSFER_MARK);
        bytes.extend_from_slice(&format.to_be_bytes());
        bytes.extend_from_slice(stored);
        return Ok(bytes);
    }
    if format != crate::state::machine::upgrade::FIRST_CLUSTER_FORMAT {
        return Err(StoreError::FormatVersion { path: "a snapshot to send".into(), found: format });
    }
    let payload: SnapshotPayload = postcard::from_bytes(stored)?;
    // A struct's fields one after another, as a tuple's.
    let mut bytes = postcard::to_allocvec(&(&payload.last_applied, &payload.membership))?;
    bytes.extend(payload.state.encode_as_format_5()?);
    Ok(bytes)
}

/// [`SnapshotPayload`] by reference: the same bytes, without copying the state.
#[derive(Serialize)]
struct SnapshotPayloadRef<'a> {
    last_applied: &'a Option<LogId>,
    membership: &'a Membership,
    state: &'a State,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

struct Inner {
    db: Arc<DB>,
    applied: RwLock<Applied>,
    events: broadcast::Sender<Arc<AppliedEvents>>,
    snapshots_built: AtomicU64,
    events_retained: AtomicU64,
    last_snapshot_bytes: AtomicU64,
    clock: CommandClock,
    archive: Archive,
    cluster_format: ClusterFormatWatch,
}

/// The cluster format of the state this node has applied (`State::cluster_format`), for its
/// network layer: the format its snapshots are sent in and its Raft messages spoken in.
#[derive(Clone, Debug)]
pub struct ClusterFormatWatch(Arc<AtomicU32>);

impl ClusterFormatWatch {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    fn observe(&self, state: &State) {
        self.0.store(state.cluster_format(), Ordering::Relaxed);
    }
}

/// How far a proposer's wall clock may run ahead of the cluster's command time (as this node
/// has seen it advance, by its own monotonic clock) before the difference is refused.
pub const MAX_CLOCK_STEP: Duration = Duration::from_secs(10);

/// The command time of the last command this node applied while it was current (its time
/// within [`MAX_CLOCK_STEP`] of this node's wall clock), and when, by the monotonic clock: the
/// reference a proposal's time is checked against. Not replicated: each node keeps its own.
#[derive(Default)]
struct CommandClock(std::sync::Mutex<Option<(Timestamp, Instant)>>);

impl CommandClock {
    fn observe(&self, at: Timestamp) {
        let wall = crate::service::now();
        // A command replayed after a restart, or proposed by a clock far from this one, says
        // nothing about how time moves here.
        if wall.millis().abs_diff(at.millis()) <= MAX_CLOCK_STEP.as_millis() as u64 {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((at, Instant::now()));
        }
    }

    /// `wall`, or, when it is more than [`MAX_CLOCK_STEP`] ahead of where command time should
    /// be by now, that bound instead (the jump is refused and logged).
    fn bound(&self, wall: Timestamp) -> Timestamp {
        let Some((at, seen)) = *self.0.lock().unwrap_or_else(|p| p.into_inner()) else { return wall };
        let limit = at.plus_millis((seen.elapsed() + MAX_CLOCK_STEP).as_millis() as i64);
        if wall > limit {
            tracing::error!(
                ahead_ms = wall.millis_since(limit),
                "this node's wall clock jumped ahead of the cluster's command time; proposing at the bound instead"
            );
            return limit;
        }
        wall
    }
}

/// Cheap to clone; all clones share one state.
#[derive(Clone)]
pub struct StateMachineStore {
    inner: Arc<Inner>,
}

fn sm_read(e: StoreError) -> StorageError {
    io_err(ErrorSubject::StateMachine, ErrorVerb::Read, e)
}

fn sm_write(e: StoreError) -> StorageError {
    io_err(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

impl StateMachineStore {
    /// Restores the state from the stored snapshot, if any; openraft re-applies the committed
    /// log after it.
    pub(super) fn open(db: Arc<DB>) -> Result<Self, StoreError> {
        let mut applied = Applied { state: State::new(), last_applied: None, membership: Membership::default() };
        if let Some(stored) = read_stored_snapshot(&db)? {
            let mut payload: SnapshotPayload = postcard::from_bytes(&stored.data)?;
            payload.state.rebuild_indexes();
            applied = Applied { state: payload.state, last_applied: payload.last_applied, membership: payload.membership };
        }
        let (events, _) = broadcast::channel(4096);
        let cluster_format = ClusterFormatWatch(Arc::new(AtomicU32::new(applied.state.cluster_format())));
        Ok(StateMachineStore {
            inner: Arc::new(Inner {
                db: db.clone(),
                applied: RwLock::new(applied),
                events,
                snapshots_built: AtomicU64::new(0),
                events_retained: AtomicU64::new(DEFAULT_EVENTS_RETAINED),
                last_snapshot_bytes: AtomicU64::new(0),
                clock: CommandClock::default(),
                archive: Archive::new(db.clone()),
                cluster_format,
            }),
        })
    }

    /// The time to propose a command at, given this node's wall clock: see [`CommandClock`].
    pub fn proposal_time(&self, wall: Timestamp) -> Timestamp {
        self.inner.clock.bound(wall)
    }

    /// The current state as a snapshot is sent (what a backup keeps: the hot state and the
    /// archive), in this store format (marked), and the log position it reflects.
    pub fn export(&self) -> Result<(Vec<u8>, Option<LogId>), StoreError> {
        let (mut bytes, position) = {
            let applied = self.inner.applied.read().unwrap_or_else(|p| p.into_inner());
            let payload = SnapshotPayloadRef { last_applied: &applied.last_applied, membership: &applied.membership, state: &applied.state };
            (transfer_payload(&postcard::to_allocvec(&payload)?, FORMAT_VERSION)?, applied.last_applied)
        };
        super::snapshot_data::append_archive(&self.inner.archive, &mut bytes)?;
        Ok((bytes, position))
    }

    /// What left the hot state, readable by ID.
    pub fn archive(&self) -> &Archive {
        &self.inner.archive
    }

    /// The applied state's cluster format, kept current as entries apply.
    pub fn cluster_format_watch(&self) -> ClusterFormatWatch {
        self.inner.cluster_format.clone()
    }

    /// Makes an exported state this (new, empty) store's snapshot, as the state of a cluster
    /// whose only voter is `node` at `address`: started, the node elects itself and goes on
    /// from the exported position; other nodes join it as learners. Returns that position.
    pub(super) fn seed(&self, exported: &[u8], format: u32, node: NodeId, address: &str) -> Result<Option<LogId>, StoreError> {
        let Transfer { payload, archive, .. } = Transfer::decode_exported(exported, format)?;
        payload.state.check_invariants().map_err(StoreError::Corrupt)?;
        for chunk in archive {
            self.inner.archive.put_all(chunk)?;
        }
        let voters = std::collections::BTreeSet::from([node]);
        let nodes = std::collections::BTreeMap::from([(node, openraft::BasicNode { addr: address.to_owned() })]);
        let membership = StoredMembership::new(payload.last_applied, openraft::Membership::new(vec![voters], nodes));
        let seeded = SnapshotPayload { last_applied: payload.last_applied, membership: membership.clone(), state: payload.state };
        let index = seeded.last_applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta { last_log_id: seeded.last_applied, last_membership: membership, snapshot_id: format!("restored-{index}") };
        self.persist_snapshot(&StoredSnapshot { meta, data: postcard::to_allocvec(&seeded)? })?;
        // No events before the restored position are kept: watchers from before it resync.
        self.discard_events_below(index.saturating_add(1))?;
        Ok(seeded.last_applied)
    }

    /// Size of the last snapshot built or installed, in bytes.
    pub fn last_snapshot_bytes(&self) -> u64 {
        self.inner.last_snapshot_bytes.load(Ordering::Relaxed)
    }

    /// How many log indexes of events to keep behind each snapshot.
    pub fn set_events_retained(&self, entries: u64) {
        self.inner.events_retained.store(entries, Ordering::Relaxed);
    }

    /// Runs `f` on the current state (no linearizability by itself: see `Shared::read`).
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let applied = self.inner.applied.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&applied.state)
    }

    /// Runs `f` on the state together with the log index it reflects.
    pub fn read_with_index<T>(&self, f: impl FnOnce(&State, u64) -> T) -> T {
        let applied = self.inner.applied.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&applied.state, applied.last_applied.map_or(0, |l| l.index))
    }

    pub fn applied_index(&self) -> u64 {
        self.read_with_index(|_, index| index)
    }

    /// Events applied from now on, as they are applied.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedEvents>> {
        self.inner.events.subscribe()
    }

    /// Stored events with index ≥ `from`, oldest first, at most `limit`.
    pub fn events_since(&self, from: u64, limit: usize) -> Result<Vec<AppliedEvents>, StoreError> {
        let db = &self.inner.db;
        let events = cf(db, CF_EVENTS)?;
        let mut out = Vec::new();
        for item in db.iterator_cf(events, IteratorMode::From(&index_key(from), Direction::Forward)).take(limit) {
            let (_, value) = item?;
            out.push(postcard::from_bytes(&value)?);
        }
        Ok(out)
    }

    /// The lowest index whose events are still guaranteed to be stored: a watcher that needs
    /// anything below it must resync from a snapshot. `None` when nothing was ever discarded.
    pub fn first_event_index(&self) -> Option<u64> {
        let db = &self.inner.db;
        let meta = cf(db, CF_META).ok()?;
        let floor = db.get_cf(meta, KEY_EVENTS_FLOOR).ok()??;
        key_index(&floor)
    }

    fn discard_events_below(&self, floor: u64) -> Result<(), StoreError> {
        let db = &self.inner.db;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(db, CF_EVENTS)?, index_key(0), index_key(floor));
        batch.put_cf(cf(db, CF_META)?, KEY_EVENTS_FLOOR, index_key(floor));
        db.write(batch)?;
        Ok(())
    }

    fn persist_snapshot(&self, stored: &StoredSnapshot) -> Result<(), StoreError> {
        self.inner.last_snapshot_bytes.store(stored.data.len() as u64, Ordering::Relaxed);
        let db = &self.inner.db;
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        db.put_cf_opt(cf(db, CF_SNAPSHOT)?, KEY_SNAPSHOT, postcard::to_allocvec(stored)?, &options)?;
        Ok(())
    }
}

/// A stored snapshot as store format `format` wrote it, re-encoded in this format (see
/// `migrate`). The stored snapshot's envelope has not changed since format 3; its payload has.
pub(super) fn stored_snapshot_to_current(bytes: &[u8], format: u32) -> Result<Vec<u8>, StoreError> {
    let stored: StoredSnapshot = postcard::from_bytes(bytes)?;
    let (payload, _) = take_payload(&stored.data, format)?;
    Ok(postcard::to_allocvec(&StoredSnapshot { meta: stored.meta, data: postcard::to_allocvec(&payload)? })?)
}

fn read_stored_snapshot(db: &DB) -> Result<Option<StoredSnapshot>, StoreError> {
    match db.get_cf(cf(db, CF_SNAPSHOT)?, KEY_SNAPSHOT)? {
        Some(bytes) => Ok(Some(postcard::from_bytes(&bytes)?)),
        None => Ok(None),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_applied, membership) = {
            let applied = self.inner.applied.read().unwrap_or_else(|p| p.into_inner());
            let payload = SnapshotPayload { last_applied: applied.last_applied, membership: applied.membership.clone(), state: applied.state.clone() };
            let data = postcard::to_allocvec(&payload).map_err(|e| sm_read(e.into()))?;
            (data, applied.last_applied, applied.membership.clone())
        };
        let seq = self.inner.snapshots_built.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
            None => format!("0-0-{seq}"),
        };
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        // Stored (and returned: openraft keeps only the meta of a built snapshot) without the
        // archive, which `get_current_snapshot` appends when one is sent.
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.persist_snapshot(&stored).map_err(|e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Write, e))?;
        let retained = self.inner.events_retained.load(Ordering::Relaxed);
        if let Some(index) = last_applied.map(|l| l.index).filter(|i| *i > retained) {
            self.discard_events_below(index - retained).map_err(sm_write)?;
        }
        let format = self.inner.cluster_format.get();
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::to_send(stored.data, format, self.inner.archive.clone())) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let applied = self.inner.applied.read().unwrap_or_else(|p| p.into_inner());
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = self.inner.db.clone();
        let events_cf = cf(&db, CF_EVENTS).map_err(sm_write)?;
        let mut outcomes = Vec::new();
        let mut published = Vec::new();
        let mut batch = WriteBatch::default();
        {
            let mut applied = self.inner.applied.write().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => outcomes.push(Ok(Response::Empty)),
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                        outcomes.push(Ok(Response::Empty));
                    }
                    EntryPayload::Normal(envelope) => {
                        let at = applied.state.command_time(envelope.at);
                        let (outcome, events) = applied.state.apply(&envelope);
                        self.inner.cluster_format.observe(&applied.state);
                        self.inner.clock.observe(at);
                        archive::write(&db, &mut batch, &applied.state.take_archived()).map_err(sm_write)?;
                        outcomes.push(outcome);
                        if !events.is_empty() {
                            let record = AppliedEvents { index: entry.log_id.index, at, events };
                            let bytes = postcard::to_allocvec(&record).map_err(|e| sm_write(e.into()))?;
                            batch.put_cf(events_cf, index_key(record.index), bytes);
                            published.push(Arc::new(record));
                        }
                    }
                }
            }
            // Written before the state is released: a reader never finds a record neither hot
            // nor archived. Stored before broadcast, so a watcher that reads the store after
            // subscribing sees every event at least once.
            db.write(batch).map_err(|e| sm_write(e.into()))?;
        }
        for record in published {
            let _ = self.inner.events.send(record);
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(SnapshotData::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<NodeId, openraft::BasicNode>, snapshot: Box<SnapshotData>) -> Result<(), StorageError> {
        let snapshot_err = |e: StoreError| io_err(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Read, e);
        let data = snapshot.into_bytes().map_err(|e| snapshot_err(StoreError::Io("the received snapshot".into(), e)))?;
        let Transfer { mut payload, payload_bytes, archive } = Transfer::decode_sent(&data).map_err(snapshot_err)?;
        drop(data);
        // Before any reader sees it (and before the check, which then checks them too).
        payload.state.rebuild_indexes();
        if let Err(violation) = payload.state.check_invariants() {
            return Err(snapshot_err(StoreError::Corrupt(violation)));
        }
        // The archive first: the state installed below may already count its records as gone.
        for chunk in archive {
            self.inner.archive.put_all(chunk).map_err(sm_write)?;
        }
        self.persist_snapshot(&StoredSnapshot { meta: meta.clone(), data: payload_bytes }).map_err(sm_write)?;
        // The events the snapshot covers never reached this node: watchers below it resync.
        if let Some(index) = meta.last_log_id.map(|l| l.index) {
            self.discard_events_below(index.saturating_add(1)).map_err(sm_write)?;
        }
        let mut applied = self.inner.applied.write().unwrap_or_else(|p| p.into_inner());
        self.inner.cluster_format.observe(&payload.state);
        *applied = Applied { state: payload.state, last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let read_err = |e| io_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e);
        let Some(stored) = read_stored_snapshot(&self.inner.db).map_err(read_err)? else { return Ok(None) };
        // Sent in the format the cluster reads (a node of it may still be of format 5), the
        // archive after the payload, once the bytes are read; openraft's look at the metadata
        // at every start costs neither.
        let format = self.inner.cluster_format.get();
        Ok(Some(Snapshot { meta: stored.meta, snapshot: Box::new(SnapshotData::to_send(stored.data, format, self.inner.archive.clone())) }))
    }
}
