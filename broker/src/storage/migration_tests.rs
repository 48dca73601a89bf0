//! Stores and backups as formats 3 and 4 wrote them, made from those formats' pinned states
//! (`broker/formats/v3/state.txt`, `v4/state.txt`, with `v4/archive.txt` after a format-4
//! export), open and restore under this code; other formats are refused untouched.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, CommittedLeaderId, SnapshotMeta, StoredMembership};
use serde::Serialize;

use super::*;
use crate::state::machine::format_v3::StateV3;
use crate::state::machine::format_v4::StateV4;
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

/// A format-4 export: the payload, then the archive in one chunk.
fn v4_export() -> Vec<u8> {
    let mut bytes = old_payload(4);
    bytes.extend(postcard::to_allocvec(&fixture(4, "archive.txt")).expect("encode"));
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
fn a_format_3_backup_restores_into_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("restored");
    let position = restore(&path, &old_payload(3), 3, 7, "127.0.0.1:7").expect("restore");
    assert_eq!(position.map(|p| p.index), Some(LAST));
    let (_, sm) = open(&path).expect("open");
    sm.read(|s| assert_eq!(s, &old_state(3)));
}

/// A format-4 export is the payload followed by archive chunks: the payload's end is found by
/// format 4's shape, and the archive lands in the store.
#[test]
fn a_format_4_backup_with_its_archive_restores_into_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("restored");
    let position = restore(&path, &v4_export(), 4, 7, "127.0.0.1:7").expect("restore");
    assert_eq!(position.map(|p| p.index), Some(LAST));
    let (_, sm) = open(&path).expect("open");
    sm.read(|s| assert_eq!(s, &old_state(4)));
    // The golden samples' lease 7 ended and was archived (`v4/archive.txt`, key `L` + 7).
    assert!(sm.archive().lease(suanli_types::LeaseId(7)).expect("read").is_some(), "the archive came along");
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
