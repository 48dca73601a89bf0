//! The tus client against a stand-in for the portal's `/api/v1/uploads` that fails on cue,
//! and the resume book.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use sha2::Digest as _;

use super::*;
use crate::client::Refusal;

/// What the stand-in does with one `PATCH` (numbered from 1 over its whole life).
#[derive(Clone, Copy)]
enum Fault {
    /// Keeps the first half of the chunk, then answers 500 (a request cut short).
    KeepHalf,
    /// Answers 503 and keeps nothing.
    Unavailable,
    /// Claims the offset is wrong (409) and keeps nothing.
    Mismatch,
}

struct FakeUpload {
    length: u64,
    sha256: String,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Fake {
    uploads: HashMap<String, FakeUpload>,
    made: u32,
    patches: u32,
    faults: HashMap<u32, Fault>,
    /// The `Upload-Offset` of every `PATCH`, in order.
    patch_offsets: Vec<u64>,
}

type Shared = Arc<Mutex<Fake>>;

fn error(status: StatusCode, code: &str) -> Response {
    (status, format!(r#"{{"error":{{"code":"{code}","message":"{code}","fields":[]}}}}"#)).into_response()
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> &'h str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn metadata(headers: &HeaderMap, key: &str) -> String {
    let value = header(headers, "Upload-Metadata").split(',').find_map(|pair| pair.strip_prefix(&format!("{key} "))).unwrap_or("");
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(value).expect("base64")).expect("UTF-8")
}

async fn create(State(fake): State<Shared>, headers: HeaderMap) -> Response {
    assert_eq!(header(&headers, "Tus-Resumable"), "1.0.0");
    assert_eq!(header(&headers, "Authorization"), "Bearer slp_test");
    let length: u64 = header(&headers, "Upload-Length").parse().expect("length");
    let mut fake = fake.lock().expect("lock");
    fake.made += 1;
    let id = format!("u{}", fake.made);
    fake.uploads.insert(id.clone(), FakeUpload { length, sha256: metadata(&headers, "sha256"), bytes: Vec::new() });
    let body = format!(r#"{{"upload_id":"{id}","filename":"{}","length":{length},"offset":0,"complete":false}}"#, metadata(&headers, "filename"));
    (StatusCode::CREATED, [("Location", format!("/api/v1/uploads/{id}"))], body).into_response()
}

async fn head(State(fake): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    match fake.lock().expect("lock").uploads.get(&id) {
        Some(u) => (StatusCode::OK, [("Upload-Offset", u.bytes.len().to_string()), ("Upload-Length", u.length.to_string())]).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn patch(State(fake): State<Shared>, UrlPath(id): UrlPath<String>, headers: HeaderMap, body: Bytes) -> Response {
    assert_eq!(header(&headers, "Content-Type"), "application/offset+octet-stream");
    let offset: u64 = header(&headers, "Upload-Offset").parse().expect("offset");
    let mut fake = fake.lock().expect("lock");
    fake.patches += 1;
    fake.patch_offsets.push(offset);
    let fault = fake.faults.get(&fake.patches).copied();
    let Some(upload) = fake.uploads.get_mut(&id) else { return error(StatusCode::NOT_FOUND, "NOT_FOUND") };
    if offset != upload.bytes.len() as u64 {
        return error(StatusCode::CONFLICT, "UPLOAD_OFFSET_MISMATCH");
    }
    match fault {
        Some(Fault::KeepHalf) => {
            upload.bytes.extend_from_slice(&body[..body.len() / 2]);
            return error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL");
        }
        Some(Fault::Unavailable) => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Some(Fault::Mismatch) => return error(StatusCode::CONFLICT, "UPLOAD_OFFSET_MISMATCH"),
        None => {}
    }
    upload.bytes.extend_from_slice(&body);
    let now = upload.bytes.len() as u64;
    if now == upload.length && hex::encode(sha2::Sha256::digest(&upload.bytes)) != upload.sha256 {
        fake.uploads.remove(&id);
        return error(StatusCode::from_u16(460).expect("460"), "CHECKSUM_MISMATCH");
    }
    (StatusCode::NO_CONTENT, [("Upload-Offset", now.to_string())]).into_response()
}

async fn stand_in(faults: &[(u32, Fault)]) -> (Shared, String) {
    let fake: Shared = Arc::new(Mutex::new(Fake { faults: faults.iter().copied().collect(), ..Fake::default() }));
    let app = axum::Router::new()
        .route("/api/v1/uploads", axum::routing::post(create))
        .route("/api/v1/uploads/{id}", axum::routing::head(head).patch(patch))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (fake, url)
}

/// An image of `size` bytes that are not all alike, ready to send.
fn image(dir: &Path, size: usize) -> (Prepared, Vec<u8>) {
    let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    let path = dir.join("photo.jpg");
    std::fs::write(&path, &bytes).expect("write");
    (crate::pack::prepare(&path).expect("prepare"), bytes)
}

fn quick(portal: &Portal) -> Tus<'_> {
    Tus { chunk: 1000, backoff: Duration::ZERO, ..Tus::new(portal) }
}

#[tokio::test]
async fn an_upload_goes_on_from_where_the_portal_is_after_failed_chunks() {
    let (fake, url) = stand_in(&[(2, Fault::KeepHalf), (4, Fault::Mismatch), (6, Fault::Unavailable)]).await;
    let portal = Portal::new(&url, "slp_test");
    let dir = tempfile::tempdir().expect("dir");
    let (item, bytes) = image(dir.path(), 4_500);
    let mut book = ResumeBook::open(&dir.path().join("config")).expect("book");
    let id = quick(&portal).upload(&item, &mut book, &mut Silent).await.expect("uploaded");
    let fake = fake.lock().expect("lock");
    assert_eq!(fake.uploads[&id].bytes, bytes, "every byte, once, in order");
    // Half of the second chunk arrived, so the third request went on from 1500, not 1000.
    assert_eq!(fake.patch_offsets, [0, 1000, 1500, 2500, 2500, 3500, 3500]);
    assert_eq!(fake.made, 1);
    // Still listed: only a version made of it ends an upload's entry.
    assert_eq!(book.get(&ResumeBook::key(&item.sha256, item.size)).map(|e| e.upload_id.as_str()), Some(id.as_str()));
}

#[tokio::test]
async fn the_same_push_run_again_resumes_the_upload_it_began() {
    let (fake, url) = stand_in(&[(3, Fault::Unavailable)]).await;
    let portal = Portal::new(&url, "slp_test");
    let dir = tempfile::tempdir().expect("dir");
    let (item, bytes) = image(dir.path(), 4_500);
    let config = dir.path().join("config");

    let mut book = ResumeBook::open(&config).expect("book");
    let impatient = Tus { retries: 0, ..quick(&portal) };
    let stopped = impatient.upload(&item, &mut book, &mut Silent).await.expect_err("gives up at once");
    assert!(matches!(&stopped, UploadError::GaveUp { offset: 2000, .. }), "{stopped}");
    assert!(stopped.to_string().contains("run the same command again"), "{stopped}");

    // A later run: the book from disk, the same bytes, another client.
    let mut book = ResumeBook::open(&config).expect("book");
    let id = quick(&portal).upload(&item, &mut book, &mut Silent).await.expect("resumed");
    let fake = fake.lock().expect("lock");
    assert_eq!((fake.made, id.as_str()), (1, "u1"), "the upload begun, not a new one");
    assert_eq!(fake.patch_offsets, [0, 1000, 2000, 2000, 3000, 4000]);
    assert_eq!(fake.uploads[&id].bytes, bytes);
}

#[tokio::test]
async fn bytes_that_do_not_hash_as_announced_are_refused_and_the_upload_forgotten() {
    let (fake, url) = stand_in(&[]).await;
    let portal = Portal::new(&url, "slp_test");
    let dir = tempfile::tempdir().expect("dir");
    let (mut item, _) = image(dir.path(), 1_500);
    item.sha256 = "0".repeat(64);
    let mut book = ResumeBook::open(&dir.path().join("config")).expect("book");
    let refused = quick(&portal).upload(&item, &mut book, &mut Silent).await.expect_err("refused");
    assert!(matches!(&refused, UploadError::Portal(ClientError::Refused(Refusal { status: 460, code, .. })) if code == "CHECKSUM_MISMATCH"), "{refused}");
    assert!(book.get(&ResumeBook::key(&item.sha256, item.size)).is_none());
    assert!(ResumeBook::open(&dir.path().join("config")).expect("book").get(&ResumeBook::key(&item.sha256, item.size)).is_none(), "on disk too");
    assert!(fake.lock().expect("lock").uploads.is_empty());
}

#[tokio::test]
async fn an_upload_the_portal_no_longer_has_is_begun_anew() {
    let (fake, url) = stand_in(&[]).await;
    let portal = Portal::new(&url, "slp_test");
    let dir = tempfile::tempdir().expect("dir");
    let (item, bytes) = image(dir.path(), 1_500);
    let key = ResumeBook::key(&item.sha256, item.size);
    let mut book = ResumeBook::open(&dir.path().join("config")).expect("book");
    book.insert(&key, ResumeEntry { portal: url.clone(), upload_id: "expired".into(), filename: item.filename.clone() }).expect("insert");
    let id = quick(&portal).upload(&item, &mut book, &mut Silent).await.expect("uploaded");
    assert_eq!(fake.lock().expect("lock").uploads[&id].bytes, bytes);
    assert_eq!(book.get(&key).map(|e| e.upload_id.as_str()), Some(id.as_str()));
}

#[test]
fn the_resume_book_survives_a_restart_and_is_its_owners_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("suanli");
    let mut book = ResumeBook::open(&config).expect("empty");
    assert!(book.get("k").is_none());
    let entry = ResumeEntry { portal: "https://portal.example".into(), upload_id: "u-7".into(), filename: "digits.tar".into() };
    let key = ResumeBook::key("ABCDEF", 42);
    assert_eq!(key, "abcdef-42");
    book.insert(&key, entry.clone()).expect("insert");
    book.insert("other-1", ResumeEntry { upload_id: "u-8".into(), ..entry.clone() }).expect("insert");
    let path = config.join("uploads.json");
    assert_eq!(std::fs::metadata(&path).expect("file").permissions().mode() & 0o777, 0o600);

    let mut again = ResumeBook::open(&config).expect("reopen");
    assert_eq!(again.get(&key), Some(&entry));
    again.remove(&key).expect("remove");
    again.remove("never-there").expect("nothing to remove");
    let last = ResumeBook::open(&config).expect("reopen");
    assert!(last.get(&key).is_none());
    assert_eq!(last.get("other-1").map(|e| e.upload_id.as_str()), Some("u-8"));

    std::fs::write(&path, "not json").expect("spoil");
    let spoiled = ResumeBook::open(&config).err().expect("refused, not taken as empty");
    assert!(spoiled.to_string().contains("may be deleted"), "{spoiled}");
}

#[test]
fn failures_are_recovered_from_only_where_trying_again_can_help() {
    let refusal = |status, code: &str| ClientError::Refused(Refusal { status, code: code.into(), message: String::new(), fields: Vec::new() });
    assert_eq!(recovery(&refusal(409, "UPLOAD_OFFSET_MISMATCH")), Recovery::Reoffset { pause: false });
    assert_eq!(recovery(&refusal(503, "UNAVAILABLE")), Recovery::Reoffset { pause: true });
    assert_eq!(recovery(&ClientError::Unreadable { status: 502, body: "bad gateway".into() }), Recovery::Reoffset { pause: true });
    for fatal in [refusal(460, "CHECKSUM_MISMATCH"), refusal(413, "QUOTA_EXCEEDED"), refusal(409, "ALREADY_EXISTS"), refusal(401, "UNAUTHENTICATED")] {
        assert_eq!(recovery(&fatal), Recovery::Fail, "{fatal}");
    }
    let portal = Portal::new("http://127.0.0.1:1", "t");
    let tus = Tus { backoff: Duration::from_secs(1), ..Tus::new(&portal) };
    let pauses: Vec<u64> = (1..=7).map(|n| tus.pause(n).as_secs()).collect();
    assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
}

#[test]
fn metadata_names_the_file_and_its_hash_in_base64() {
    let value = upload_metadata("cats & dogs.tar", "ABC123");
    let decode = |b: &str| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).expect("base64")).expect("UTF-8");
    let pairs: Vec<(String, String)> = value.split(',').map(|p| p.split_once(' ').expect("key value")).map(|(k, v)| (k.to_owned(), decode(v))).collect();
    assert_eq!(pairs, [("filename".to_owned(), "cats & dogs.tar".to_owned()), ("sha256".to_owned(), "abc123".to_owned())]);
}

/// The resume file is a format kept across versions of the CLI: format 1 as written, a file
/// from before the field existed, and a newer one refused with a clear error.
#[test]
fn the_resume_file_keeps_its_format() {
    let dir = tempfile::tempdir().expect("dir");
    let mut book = ResumeBook::open(dir.path()).expect("open");
    let entry = ResumeEntry { portal: "https://portal.example".into(), upload_id: "0123456789abcdef0123456789abcdef".into(), filename: "digits.tar".into() };
    book.insert(&ResumeBook::key(&"ab".repeat(32), 42), entry.clone()).expect("insert");
    let golden = format!(
        "{{\n  \"format\": 1,\n  \"uploads\": {{\n    \"{}-42\": {{\n      \"portal\": \"https://portal.example\",\n      \"upload_id\": \"0123456789abcdef0123456789abcdef\",\n      \"filename\": \"digits.tar\"\n    }}\n  }}\n}}",
        "ab".repeat(32)
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("uploads.json")).expect("read"), golden);
    std::fs::write(dir.path().join("uploads.json"), golden.replace("\"format\": 1,\n  ", "")).expect("write");
    assert_eq!(ResumeBook::open(dir.path()).expect("no format field").get(&ResumeBook::key(&"ab".repeat(32), 42)), Some(&entry));
    std::fs::write(dir.path().join("uploads.json"), golden.replace("\"format\": 1", "\"format\": 2")).expect("write");
    assert!(matches!(ResumeBook::open(dir.path()), Err(ResumeError::Newer { found: 2, .. })));
}
