//! openraft's storage conformance suite against our RocksDB store, and what survives a reopen.

use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use suanli_broker::state::{Command, Envelope, Response};
use suanli_broker::storage::{self, LogStore, StateMachineStore, StorageError, StoreError, TypeConfig};
use suanli_types::{AccountKind, Caller, RequestId, SecretHash, Timestamp};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().map_err(|e| openraft::StorageIOError::write(openraft::AnyError::new(&e)))?;
        let (log, sm) = storage::open(dir.path()).map_err(|e| openraft::StorageIOError::write(openraft::AnyError::new(&e)))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    if let Err(e) = Suite::test_all(Builder) {
        panic!("storage suite failed: {e}");
    }
}

fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn register(index: u64) -> Entry<TypeConfig> {
    let envelope = Envelope {
        caller: Caller::Platform,
        request_id: RequestId::parse(&format!("r{index}")).expect("id"),
        at: Timestamp::from_millis(1_000 * index as i64),
        command: Command::RegisterAccount { kind: AccountKind::Researcher, token_hash: SecretHash::of("api-token", &format!("t{index}")) },
    };
    Entry { log_id: log_id(1, index), payload: EntryPayload::Normal(envelope) }
}

#[tokio::test]
async fn vote_log_snapshot_and_state_survive_reopen() {
    let dir = TempDir::new().expect("tempdir");
    let vote = Vote::new_committed(1, 1);
    {
        let (mut log, mut sm) = storage::open(dir.path()).expect("open");
        log.save_vote(&vote).await.expect("vote");
        let entries: Vec<_> = (1..=5).map(register).collect();
        log.blocking_append(entries.clone()).await.expect("append");
        let outcomes = sm.apply(entries[..3].to_vec()).await.expect("apply");
        assert!(matches!(outcomes[0], Ok(Response::Account(_))));
        sm.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
        sm.apply(entries[3..].to_vec()).await.expect("apply rest");
        assert!(sm.read(|s| s.account_by_token(&SecretHash::of("api-token", "t5")).is_some()));
    }
    let (mut log, mut sm) = storage::open(dir.path()).expect("reopen");
    assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id, Some(log_id(1, 5)));
    assert_eq!(log.try_get_log_entries(1..6).await.expect("entries").len(), 5);
    // The state machine comes back at the snapshot; openraft re-applies the rest of the log.
    let (applied, _) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(1, 3)));
    assert!(sm.read(|s| s.account_by_token(&SecretHash::of("api-token", "t3")).is_some()));
    assert!(sm.read(|s| s.account_by_token(&SecretHash::of("api-token", "t4")).is_none()));
    assert!(sm.get_current_snapshot().await.expect("snapshot").is_some());
    // The events of every applied entry are kept for watchers.
    let events = sm.events_since(1, 100).expect("events");
    assert_eq!(events.iter().map(|e| e.index).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
}

#[test]
fn a_store_of_another_format_version_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    drop(storage::open(dir.path()).expect("create"));
    {
        let mut options = rocksdb::Options::default();
        options.create_missing_column_families(true);
        let cfs = ["log", "meta", "snapshot", "events", "archive"];
        let db = rocksdb::DB::open_cf(&options, dir.path(), cfs).expect("raw open");
        let meta = db.cf_handle("meta").expect("meta");
        db.put_cf(meta, b"format_version", 99u32.to_be_bytes()).expect("put");
    }
    match storage::open(dir.path()) {
        Err(StoreError::FormatVersion { found: 99, .. }) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("opened a store of format 99"),
    }
}
