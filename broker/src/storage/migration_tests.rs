//! Stores and backups as formats 3 to 6 wrote them, made from those formats' pinned states
//! (`broker/formats/v3/state.txt` to `v6/state.txt`, with the archive after a format-4, 5 or 6
//! export), open and restore under this code; other formats are refused untouched. And the
//! snapshots this code sends: format 5's bytes while its cluster is at format 5, marked ones
//! after (marked 6 while it is at 6).

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, CommittedLeaderId, SnapshotMeta, StoredMembership};
use serde::Serialize;

use super::*;
use crate::state::machine::format_v3::StateV3;
use crate::state::machine::format_v4::StateV4;
use crate::state::machine::format_v5::StateV5;
use crate::state::State;

fn fixture(format: u32, file: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("formats/v{format}/{file}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| l.split_once(' ').expect("`<name or hex> <hex>`"))
        .map(|(a, b)| (hex::decode(a).unwrap_or_default(), hex::decode(b.trim()).expect("hex")))
        .collect()
}

fn old_state_bytes(format: u32) -> Vec<u8> {
    fixture(format, "state.txt").remove(0).1
}

/// The state an earlier format's pinned state means in this format.
fn old_state(format: u32) -> State {
    let bytes = old_state_bytes(format);
    match format {
        3 => State::from(postcard::from_bytes::<StateV3>(&bytes).expect("format 3 state")),
        4 => State::from(postcard::from_bytes::<StateV4>(&bytes).expect("format 4 state")),
        5 => State::from(postcard::from_bytes::<StateV5>(&bytes).expect("format 5 state")),
        // Format 7 changed no stored type.
        6 => postcard::from_bytes::<State>(&bytes).expect("format 6 state"),
        _ => unreachable!("no fixture of format {format}"),
    }
}

const LAST: u64 = 37;

fn membership() -> StoredMembership<NodeId, BasicNode> {
    let last = LogId::new(CommittedLeaderId::new(2, 1), LAST);
    let nodes = BTreeMap::from([(1, BasicNode { addr: "127.0.0.1:1".into() })]);
    StoredMembership::new(Some(last), openraft::Membership::new(vec![BTreeSet::from([1])], nodes))
}

/// A snapshot payload as an earlier format encoded it: position, membership, state (postcard
/// writes a struct as its fields one after another).
fn old_payload(format: u32) -> Vec<u8> {
    let last = Some(LogId::new(CommittedLeaderId::new(2, 1), LAST));
    let mut bytes = postcard::to_allocvec(&last).expect("encode");
    bytes.extend(postcard::to_allocvec(&membership()).expect("encode"));
    bytes.extend(old_state_bytes(format));
    bytes
}

/// A format-4 or 5 export: the payload, then the archive in one chunk.
fn old_export(format: u32) -> Vec<u8> {
    let mut bytes = old_payload(format);
    bytes.extend(postcard::to_allocvec(&fixture(format, "archive.txt")).expect("encode"));
    bytes
}

/// The stored snapshot's shape (unchanged since format 3).
#[derive(Serialize)]
struct StoredOld {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// A store holding what a format-`format` broker left: its format mark and a snapshot of the
/// format `payload_format` wrote.
fn old_store(path: &Path, format: u32, payload_format: u32) {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let db = DB::open_cf_descriptors(&options, path, [CF_LOG, CF_META, CF_SNAPSHOT, CF_EVENTS].map(|n| ColumnFamilyDescriptor::new(n, Options::default())))
        .expect("open");
    db.put_cf(cf(&db, CF_META).expect("cf"), KEY_FORMAT, format.to_be_bytes()).expect("put");
    let meta = SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), LAST)), last_membership: membership(), snapshot_id: "old".into() };
    let stored = postcard::to_allocvec(&StoredOld { meta, data: old_payload(payload_format) }).expect("encode");
    db.put_cf(cf(&db, CF_SNAPSHOT).expect("cf"), b"current", stored).expect("put");
}

fn stored_format(path: &Path) -> u32 {
    let db = DB::open_cf_for_read_only(&Options::default(), path, [CF_LOG, CF_META, CF_SNAPSHOT, CF_EVENTS, CF_ARCHIVE], false).expect("open");
    let bytes = db.get_cf(cf(&db, CF_META).expect("cf"), KEY_FORMAT).expect("get").expect("a format mark");
    u32::from_be_bytes(bytes.as_slice().try_into().expect("4 bytes"))
}

fn an_old_store_is_migrated_when_opened_and_reads_as_it_was_left(format: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    old_store(&path, format, format);
    let (_, sm) = open(&path).expect("migrated");
    sm.read(|s| assert_eq!(s, &old_state(format)));
    assert_eq!(sm.applied_index(), LAST);
    sm.read(|s| s.check_invariants()).expect("invariants");
    drop(sm);
    assert_eq!(stored_format(&path), FORMAT_VERSION, "marked migrated");
    let (_, again) = open(&path).expect("reopened");
    again.read(|s| assert_eq!(s, &old_state(format)));
}

#[test]
fn a_format_3_store_is_migrated_when_opened_and_reads_as_format_3_left_it() {
    an_old_store_is_migrated_when_opened_and_reads_as_it_was_left(3);
}

#[test]
fn a_format_4_store_is_migrated_when_opened_and_reads_as_format_4_left_it() {
    an_old_store_is_migrated_when_opened_and_reads_as_it_was_left(4);
}

#[test]
fn a_format_5_store_is_migrated_when_opened_and_reads_as_format_5_left_it() {
    an_old_store_is_migrated_when_opened_and_reads_as_it_was_left(5);
}

#[test]
fn a_format_6_store_is_migrated_when_opened_and_reads_as_format_6_left_it() {
    an_old_store_is_migrated_when_opened_and_reads_as_it_was_left(6);
}

/// What a format-6 node sends or exports: its format's mark, then the payload and the archive.
fn format_6_transfer() -> Vec<u8> {
    let mut bytes = b"SLTF".to_vec();
    bytes.extend(6u32.to_be_bytes());
    bytes.extend(old_export(6));
    bytes
}

#[test]
fn a_format_6_backup_with_its_archive_restores_into_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("restored");
    let position = restore(&path, &format_6_transfer(), 6, 7, "127.0.0.1:7").expect("restore");
    assert_eq!(position.map(|p| p.index), Some(LAST));
    let (_, sm) = open(&path).expect("open");
    sm.read(|s| assert_eq!(s, &old_state(6)));
    assert!(sm.archive().lease(suanli_types::LeaseId(7)).expect("read").is_some(), "the archive came along");
}

/// While its cluster is at format 6 (a rolling upgrade from format 6), this code sends a node
/// of format 6 what that node would have sent: marked 6, then the same payload bytes.
#[test]
fn a_snapshot_sent_while_the_cluster_is_at_format_6_is_format_6s_bytes() {
    let stored = old_payload(6);
    let sent = state_machine::transfer_payload(&stored, 6).expect("format 6");
    assert!(sent.starts_with(b"SLTF") && sent[4..8] == 6u32.to_be_bytes() && sent[8..] == stored[..]);
}

/// A leader of format 6 sends its snapshot marked 6: a node of this format installs it.
#[tokio::test]
async fn a_snapshot_a_format_6_leader_sends_installs_here() {
    use openraft::storage::RaftStateMachine;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, mut sm) = open(&dir.path().join("follower")).expect("open");
    let meta = SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), LAST)), last_membership: membership(), snapshot_id: "2-37-0".into() };
    sm.install_snapshot(&meta, Box::new(SnapshotData::new(format_6_transfer()))).await.expect("installed");
    sm.read(|s| assert_eq!(s, &old_state(6)));
    assert_eq!(sm.cluster_format_watch().get(), 6, "the format-6 state's cluster is at format 6");
    assert!(sm.archive().lease(suanli_types::LeaseId(7)).expect("read").is_some(), "the archive came along");
}

#[test]
fn a_format_3_backup_restores_into_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("restored");
    let position = restore(&path, &old_payload(3), 3, 7, "127.0.0.1:7").expect("restore");
    assert_eq!(position.map(|p| p.index), Some(LAST));
    let (_, sm) = open(&path).expect("open");
    sm.read(|s| assert_eq!(s, &old_state(3)));
}

/// A format-4 or 5 export is the payload followed by archive chunks: the payload's end is found
/// by that format's shape, and the archive lands in the store.
fn an_old_backup_with_its_archive_restores_into_a_new_store(format: u32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("restored");
    let position = restore(&path, &old_export(format), format, 7, "127.0.0.1:7").expect("restore");
    assert_eq!(position.map(|p| p.index), Some(LAST));
    let (_, sm) = open(&path).expect("open");
    sm.read(|s| assert_eq!(s, &old_state(format)));
    // The golden samples' lease 7 ended and was archived (`archive.txt`, key `L` + 7).
    assert!(sm.archive().lease(suanli_types::LeaseId(7)).expect("read").is_some(), "the archive came along");
}

#[test]
fn a_format_4_backup_with_its_archive_restores_into_a_new_store() {
    an_old_backup_with_its_archive_restores_into_a_new_store(4);
}

#[test]
fn a_format_5_backup_with_its_archive_restores_into_a_new_store() {
    an_old_backup_with_its_archive_restores_into_a_new_store(5);
}

/// The format-5 state as this store holds it (format 6, its cluster at 5), and its stored
/// snapshot payload.
fn migrated_format_5_payload() -> (State, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    old_store(&path, 5, 5);
    let (_, sm) = open(&path).expect("migrated");
    let state = sm.read(|s| s.clone());
    drop(sm);
    let db = DB::open_cf_for_read_only(&Options::default(), &path, [CF_LOG, CF_META, CF_SNAPSHOT, CF_EVENTS, CF_ARCHIVE], false).expect("open");
    let stored = db.get_cf(cf(&db, CF_SNAPSHOT).expect("cf"), state_machine::KEY_SNAPSHOT).expect("get").expect("a snapshot");
    #[derive(serde::Deserialize)]
    struct Stored {
        #[allow(dead_code)]
        meta: SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
    }
    (state, postcard::from_bytes::<Stored>(&stored).expect("stored snapshot").data)
}

/// While its cluster is at format 5, this code sends a node of format 5 the very bytes that
/// node would have sent: format 5's payload, unmarked.
#[test]
fn a_snapshot_sent_while_the_cluster_is_at_format_5_is_format_5s_bytes() {
    let (state, stored) = migrated_format_5_payload();
    assert_eq!(state.cluster_format(), 5);
    let sent = state_machine::transfer_payload(&stored, 5).expect("format 5");
    assert!(sent == old_payload(5), "a format-5 node reads exactly what it wrote");
}

/// Once raised, snapshots carry their format's mark, and one a node cannot read is refused:
/// a node of format 5 would fail to decode it rather than misread it.
#[test]
fn a_snapshot_sent_at_this_format_is_marked_and_reads_back_as_the_same_state() {
    let (state, stored) = migrated_format_5_payload();
    let sent = state_machine::transfer_payload(&stored, FORMAT_VERSION).expect("this format");
    assert!(sent.starts_with(b"SLTF") && sent[4..8] == FORMAT_VERSION.to_be_bytes(), "marked with its format");
    assert!(postcard::from_bytes::<state_machine::OlderSnapshotPayload<StateV5>>(&sent).is_err(), "a format-5 node refuses it");
    // Restored as a backup of this format, it is the same state; claimed as another, refused.
    let dir = tempfile::tempdir().expect("tempdir");
    restore(&dir.path().join("a"), &sent, FORMAT_VERSION, 7, "127.0.0.1:7").expect("restore");
    let (_, sm) = open(&dir.path().join("a")).expect("open");
    sm.read(|s| assert_eq!(s, &state));
    assert!(matches!(restore(&dir.path().join("b"), &sent, 5, 7, "127.0.0.1:7"), Err(StoreError::Corrupt(_))));
    assert!(matches!(restore(&dir.path().join("c"), &stored, FORMAT_VERSION, 7, "127.0.0.1:7"), Err(StoreError::Corrupt(_))), "unmarked");
    assert!(!dir.path().join("b").exists() && !dir.path().join("c").exists(), "no half-made store");
}

#[test]
fn a_store_or_backup_of_a_format_this_code_does_not_read_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in [2, FORMAT_VERSION + 1] {
        let path = dir.path().join(format!("store-{format}"));
        old_store(&path, format, 3);
        assert!(matches!(open(&path), Err(StoreError::FormatVersion { found, .. }) if found == format));
        assert_eq!(stored_format(&path), format, "left as it was");
        let target = dir.path().join(format!("restore-{format}"));
        assert!(matches!(restore(&target, &old_payload(3), format, 1, "127.0.0.1:1"), Err(StoreError::FormatVersion { .. })));
        assert!(!target.exists(), "no half-made store");
    }
}

/// A leader of format 5 sends its snapshot unmarked, in format 5: a node of this format
/// installs it as format 5 left it, at cluster format 5.
#[tokio::test]
async fn a_snapshot_a_format_5_leader_sends_installs_here() {
    use openraft::storage::RaftStateMachine;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, mut sm) = open(&dir.path().join("follower")).expect("open");
    let meta = SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), LAST)), last_membership: membership(), snapshot_id: "2-37-0".into() };
    sm.install_snapshot(&meta, Box::new(SnapshotData::new(old_export(5)))).await.expect("installed");
    sm.read(|s| assert_eq!(s, &old_state(5)));
    assert_eq!(sm.cluster_format_watch().get(), 5, "it speaks format 5 to its cluster");
    assert!(sm.archive().lease(suanli_types::LeaseId(7)).expect("read").is_some(), "the archive came along");
}
