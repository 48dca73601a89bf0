//! Stores and backups as format 3 wrote them, made from format 3's pinned state
//! (`broker/formats/v3/state.txt`), open and restore under this code; other formats are refused
//! untouched.

use std::collections::{BTreeMap, BTreeSet};

use openraft::{BasicNode, CommittedLeaderId, SnapshotMeta, StoredMembership};
use serde::Serialize;

use super::*;
use crate::state::machine::format_v3::StateV3;
use crate::state::State;

fn v3_state_bytes() -> Vec<u8> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("formats/v3/state.txt");
    let text = std::fs::read_to_string(&path).expect("format 3 fixture");
    hex::decode(text.split_once(' ').expect("`state <hex>`").1.trim()).expect("hex")
}

fn v3_state() -> State {
    State::from(postcard::from_bytes::<StateV3>(&v3_state_bytes()).expect("format 3 state"))
}

const LAST: u64 = 37;

fn membership() -> StoredMembership<NodeId, BasicNode> {
    let last = LogId::new(CommittedLeaderId::new(2, 1), LAST);
    let nodes = BTreeMap::from([(1, BasicNode { addr: "127.0.0.1:1".into() })]);
    StoredMembership::new(Some(last), openraft::Membership::new(vec![BTreeSet::from([1])], nodes))
}

/// A snapshot payload as format 3 encoded it: position, membership, state (postcard writes a
/// struct as its fields one after another).
fn v3_payload() -> Vec<u8> {
    let last = Some(LogId::new(CommittedLeaderId::new(2, 1), LAST));
    let mut bytes = postcard::to_allocvec(&last).expect("encode");
    bytes.extend(postcard::to_allocvec(&membership()).expect("encode"));
    bytes.extend(v3_state_bytes());
    bytes
}

/// The stored snapshot's shape in format 3 (unchanged in format 4).
#[derive(Serialize)]
struct StoredV3 {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// A store holding what a format-`format` broker left: its format mark and a format-3 snapshot.
fn old_store(path: &Path, format: u32) {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let db = DB::open_cf_descriptors(&options, path, [CF_LOG, CF_META, CF_SNAPSHOT, CF_EVENTS].map(|n| ColumnFamilyDescriptor::new(n, Options::default())))
        .expect("open");
    db.put_cf(cf(&db, CF_META).expect("cf"), KEY_FORMAT, format.to_be_bytes()).expect("put");
    let meta = SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), LAST)), last_membership: membership(), snapshot_id: "v3".into() };
    let stored = postcard::to_allocvec(&StoredV3 { meta, data: v3_payload() }).expect("encode");
    db.put_cf(cf(&db, CF_SNAPSHOT).expect("cf"), b"current", stored).expect("put");
}

fn stored_format(path: &Path) -> u32 {
    let db = DB::open_cf_for_read_only(&Options::default(), path, [CF_LOG, CF_META, CF_SNAPSHOT, CF_EVENTS, CF_ARCHIVE], false).expect("open");
    let bytes = db.get_cf(cf(&db, CF_META).expect("cf"), KEY_FORMAT).expect("get").expect("a format mark");
    u32::from_be_bytes(bytes.as_slice().try_into().expect("4 bytes"))
}

#[test]
fn a_format_3_store_is_migrated_when_opened_and_reads_as_format_3_left_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store");
    old_store(&path, 3);
    let (_, sm) = open(&path).expect("migrated");
    sm.read(|s| assert_eq!(s, &v3_state()));
    assert_eq!(sm.applied_index(), LAST);
    sm.read(|s| s.check_invariants()).expect("invariants");
    drop(sm);
    assert_eq!(stored_format(&path), FORMAT_VERSION, "marked migrated");
    let (_, again) = open(&path).expect("reopened");
    again.read(|s| assert_eq!(s, &v3_state()));
}

#[test]
fn a_format_3_backup_restores_into_a_new_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("restored");
    let position = restore(&path, &v3_payload(), 3, 7, "127.0.0.1:7").expect("restore");
    assert_eq!(position.map(|p| p.index), Some(LAST));
    let (_, sm) = open(&path).expect("open");
    sm.read(|s| assert_eq!(s, &v3_state()));
}

#[test]
fn a_store_or_backup_of_a_format_this_code_does_not_read_is_refused_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    for format in [2, FORMAT_VERSION + 1] {
        let path = dir.path().join(format!("store-{format}"));
        old_store(&path, format);
        assert!(matches!(open(&path), Err(StoreError::FormatVersion { found, .. }) if found == format));
        assert_eq!(stored_format(&path), format, "left as it was");
        let target = dir.path().join(format!("restore-{format}"));
        assert!(matches!(restore(&target, &v3_payload(), format, 1, "127.0.0.1:1"), Err(StoreError::FormatVersion { .. })));
        assert!(!target.exists(), "no half-made store");
    }
}
