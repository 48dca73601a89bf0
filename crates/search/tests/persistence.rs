//! The saved format (`suanli.vector-index/1`): round trips, crash safety, and refusing what
//! we cannot read.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use suanli_search::{IndexParams, LibraryIndex, SearchError, HEADER_FILE};

const DIM: u32 = 16;

fn header(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(dir.join(HEADER_FILE)).expect("read header")).expect("json")
}

fn data_file(dir: &Path) -> std::path::PathBuf {
    let h = header(dir);
    dir.join(h["data"].as_str().expect("data name"))
}

fn saved(seed: u64, n: usize) -> (tempfile::TempDir, Vec<(u64, Vec<f32>)>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(seed, n, DIM as usize);
    build(DIM, &data).save(dir.path()).expect("save");
    (dir, data)
}

fn assert_format_error(dir: &Path, what: &str) {
    match LibraryIndex::open(dir) {
        Err(SearchError::Format(msg)) => eprintln!("{what}: refused: {msg}"),
        Err(e) => panic!("{what}: expected Format, got {e:?}"),
        Ok(_) => panic!("{what}: opened"),
    }
}

#[test]
fn save_then_open_gives_identical_search_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(20, 1500, DIM as usize);
    let idx = build(DIM, &data);
    idx.save(dir.path()).expect("save");
    let back = LibraryIndex::open(dir.path()).expect("open");
    assert_eq!(back.space(), idx.space());
    assert_eq!(back.params(), idx.params());
    assert_eq!(back.len(), idx.len());
    let queries = dataset(21, 50, DIM as usize);
    for (_, q) in &queries {
        let a = idx.search(&model(), q, 10, None).expect("search");
        let b = back.search(&model(), q, 10, None).expect("search");
        assert_eq!(a, b);
    }
}

#[test]
fn opened_index_accepts_inserts_and_saves_again() {
    let (dir, data) = saved(22, 100);
    let mut idx = LibraryIndex::open(dir.path()).expect("open");
    let more = dataset(23, 200, DIM as usize);
    for (k, v) in &more {
        idx.insert(k + 1000, &model(), v).expect("insert after open");
    }
    assert!(!idx.insert(0, &model(), &data[0].1).expect("idempotent after open"));
    idx.save(dir.path()).expect("save again");
    let back = LibraryIndex::open(dir.path()).expect("reopen");
    assert_eq!(back.len(), 300);
    let hits = back.search(&model(), &more[7].1, 1, None).expect("search");
    assert_eq!(keys(&hits), vec![1007]);
}

#[test]
fn removed_keys_stay_removed_after_save_and_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(24, 400, DIM as usize);
    let mut idx = build(DIM, &data);
    for k in (0..400).step_by(4) {
        assert!(idx.remove(k).expect("remove"));
    }
    idx.save(dir.path()).expect("save");
    let back = LibraryIndex::open(dir.path()).expect("open");
    assert_eq!(back.len(), 300);
    assert_eq!(header(dir.path())["count"], 300);
    for (k, v) in &data {
        assert_eq!(back.contains(*k), !k.is_multiple_of(4));
        let hits = back.search(&model(), v, 50, None).expect("search");
        assert!(hits.iter().all(|h| !h.key.is_multiple_of(4)), "removed key returned");
    }
}

#[test]
fn stray_files_of_an_interrupted_save_do_not_hide_the_previous_one() {
    let (dir, data) = saved(25, 50);
    // What an interrupted save can leave: a half-written data file under a temporary name,
    // a complete data file of the next generation, and a half-written header.
    fs::write(dir.path().join(".vectors.2.usearch.tmp-999"), b"partial").expect("write");
    fs::write(dir.path().join("vectors.2.usearch"), b"next generation").expect("write");
    fs::write(dir.path().join(".index.json.tmp-999"), b"{\"format\":").expect("write");
    let idx = LibraryIndex::open(dir.path()).expect("previous save opens");
    assert_eq!(idx.len(), 50);
    let hits = idx.search(&model(), &data[9].1, 1, None).expect("search");
    assert_eq!(keys(&hits), vec![9]);
    // The next save commits a new generation and removes the leftovers, not foreign files.
    fs::write(dir.path().join("README"), b"not ours").expect("write");
    idx.save(dir.path()).expect("save");
    let mut names: Vec<String> = fs::read_dir(dir.path()).expect("read_dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, vec!["README", "index.json", "vectors.3.usearch"]);
    assert_eq!(LibraryIndex::open(dir.path()).expect("open").len(), 50);
}

#[test]
fn header_of_a_tiny_index_matches_the_golden_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Explicit parameters: the golden pins the format, not the library's defaults.
    let params = IndexParams { connectivity: 16, expansion_add: 128, expansion_search: 64 };
    let mut idx = LibraryIndex::create(space(4), params).expect("create");
    idx.insert(1, &model(), &[1.0, 0.0, 0.0, 0.0]).expect("insert");
    idx.insert(2, &model(), &[0.0, 1.0, 0.0, 0.0]).expect("insert");
    idx.insert(3, &model(), &[0.0, 0.0, 0.6, 0.8]).expect("insert");
    idx.save(dir.path()).expect("save");
    let text = fs::read_to_string(dir.path().join(HEADER_FILE)).expect("header");

    // The data file's length and digest are usearch's bytes, not our format: check them
    // against the file, then mask them so the golden pins every other header byte.
    let h = header(dir.path());
    let data = fs::read(data_file(dir.path())).expect("data");
    assert_eq!(h["data_bytes"].as_u64(), Some(data.len() as u64));
    let sha = h["data_sha256"].as_str().expect("sha");
    assert_eq!(sha.len(), 64);
    assert!(sha.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    let masked: String = text
        .lines()
        .map(|l| {
            if l.starts_with("  \"data_bytes\": ") {
                "  \"data_bytes\": 0,".to_owned()
            } else if l.starts_with("  \"data_sha256\": ") {
                "  \"data_sha256\": \"<sha256>\",".to_owned()
            } else {
                l.to_owned()
            }
        })
        .map(|l| l + "\n")
        .collect();

    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/index-v1.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        fs::write(&golden, &masked).expect("write golden");
    }
    let want = fs::read_to_string(&golden).expect("golden file (UPDATE_GOLDEN=1 writes it)");
    assert_eq!(masked, want, "the v1 header changed: that is a new format version");
}

#[test]
fn other_format_versions_are_refused() {
    let (dir, _) = saved(26, 10);
    let text = fs::read_to_string(dir.path().join(HEADER_FILE)).expect("header");
    let v2 = text.replace("suanli.vector-index/1", "suanli.vector-index/2");
    assert_ne!(v2, text);
    fs::write(dir.path().join(HEADER_FILE), v2).expect("write");
    assert_format_error(dir.path(), "format /2");
    fs::write(dir.path().join(HEADER_FILE), r#"{"format":"suanli.vector-index/2","anything":1}"#).expect("write");
    assert_format_error(dir.path(), "format /2, other fields");
}

#[test]
fn malformed_headers_are_refused() {
    let (dir, _) = saved(27, 10);
    let good = fs::read_to_string(dir.path().join(HEADER_FILE)).expect("header");
    let cases = [
        ("empty", String::new()),
        ("truncated", good[..good.len() / 2].to_owned()),
        ("not json", "index v1".to_owned()),
        ("no format", good.replace("\"format\"", "\"fmt\"")),
        ("other metric", good.replace("\"cos\"", "\"l2sq\"")),
        ("data path escapes", {
            let h = header(dir.path());
            let name = h["data"].as_str().expect("data").to_owned();
            good.replace(&name, &format!("../{name}"))
        }),
        ("unknown field", good.replacen('{', "{\n  \"extra\": 1,", 1)),
        ("bad model", good.replace("resnet18w32@sha256:0123abcd", "a b")),
        ("wrong dim", good.replace("\"dim\": 16", "\"dim\": 17")),
        ("wrong count", good.replace("\"count\": 10", "\"count\": 11")),
    ];
    for (what, text) in cases {
        assert_ne!(text, good, "{what}: case did not change the header");
        fs::write(dir.path().join(HEADER_FILE), &text).expect("write");
        assert_format_error(dir.path(), what);
    }
}

#[test]
fn missing_data_file_is_refused() {
    let (dir, _) = saved(28, 10);
    fs::remove_file(data_file(dir.path())).expect("remove");
    assert_format_error(dir.path(), "missing data");
}

#[test]
fn truncated_data_file_is_refused() {
    let (dir, _) = saved(29, 10);
    let path = data_file(dir.path());
    let bytes = fs::read(&path).expect("read");
    for len in [0, 10, bytes.len() / 2, bytes.len() - 1] {
        fs::write(&path, &bytes[..len]).expect("truncate");
        assert_format_error(dir.path(), &format!("truncated to {len}"));
    }
}

#[test]
fn altered_data_file_is_refused() {
    let (dir, _) = saved(30, 10);
    let path = data_file(dir.path());
    let mut bytes = fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(&path, &bytes).expect("write");
    assert_format_error(dir.path(), "flipped bit");
}

#[test]
fn a_directory_without_a_saved_index_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    match LibraryIndex::open(dir.path()) {
        Err(SearchError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn empty_index_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let idx = LibraryIndex::create(space(DIM), IndexParams::default()).expect("create");
    idx.save(dir.path()).expect("save");
    let mut back = LibraryIndex::open(dir.path()).expect("open");
    assert!(back.is_empty());
    let v = unit_vector(&mut rng(31), DIM as usize);
    assert!(back.insert(1, &model(), &v).expect("insert"));
    assert_eq!(keys(&back.search(&model(), &v, 5, None).expect("search")), vec![1]);
}
