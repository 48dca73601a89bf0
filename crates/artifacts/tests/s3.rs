//! The artifact store in a real S3-compatible server (SeaweedFS, `testkit::s3`): the same
//! contract as the local directory, checked on both, and the HTTP store served from the bucket.
//! SeaweedFS comes from the project's tools venv (ops/install-build-deps); without it these
//! tests fail.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use suanli_artifacts::{server, ArtifactClient, Bucket, BucketConfig, BucketStore, Digest, LocalStore, Store, StoreError};
use suanli_testkit::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use tokio::io::AsyncReadExt;

const MAX: u64 = 32 << 20;

async fn bucket_store(dir: &std::path::Path) -> (S3Server, BucketStore) {
    let server = S3Server::start(dir).await.expect("SeaweedFS (ops/install-build-deps installs it)");
    server.create_bucket("artifacts").await.expect("bucket");
    let config = BucketConfig {
        endpoint: server.endpoint.clone(),
        bucket: "artifacts".into(),
        region: "us-east-1".into(),
        access_key_id: ACCESS_KEY_ID.into(),
        secret_access_key_env: String::new(),
        prefix: "suanli".into(),
    };
    let bucket = Bucket::with_secret(&config, SECRET_ACCESS_KEY).expect("client");
    (server, BucketStore::new(bucket, MAX))
}

async fn read_all(store: &dyn Store, digest: Digest, start: u64, len: u64) -> Vec<u8> {
    let mut opened = store.open(digest, start, len).await.expect("open");
    let mut out = Vec::new();
    opened.reader.read_to_end(&mut out).await.expect("read");
    out
}

/// What every backend must do, the same way.
async fn contract(store: &dyn Store) {
    // Large enough for a multipart upload in the bucket (8 MiB parts); the small one is one PUT.
    let big: Vec<u8> = (0..20_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let small = b"a small artifact".to_vec();
    let (digest, size) = store.put(Box::new(&big[..]), Some(Digest::of(&big))).await.expect("put, digest named");
    assert_eq!((digest, size), (Digest::of(&big), big.len() as u64));
    let (small_digest, _) = store.put(Box::new(&small[..]), None).await.expect("put, digest found");
    assert_eq!(small_digest, Digest::of(&small));
    // The same bytes again: the same artifact, once.
    assert_eq!(store.put(Box::new(&small[..]), None).await.expect("again").0, small_digest);
    assert_eq!(store.size(digest).await.expect("size"), big.len() as u64);
    assert_eq!(read_all(store, digest, 0, big.len() as u64).await, big);
    assert_eq!(read_all(store, digest, 9_000_000, 4096).await, &big[9_000_000..9_004_096], "a range across parts");
    assert_eq!(read_all(store, digest, 5, 0).await, Vec::<u8>::new());

    // Wrong bytes for a named digest, and too many bytes: refused, nothing stored, and the
    // good artifact at that name untouched.
    let refused = store.put(Box::new(&small[..]), Some(digest)).await.expect_err("wrong bytes");
    assert!(matches!(refused, StoreError::ChecksumMismatch { .. }), "{refused}");
    assert_eq!(read_all(store, digest, 0, big.len() as u64).await, big, "the artifact already there is untouched");
    // The same, in more bytes than one part of a multipart upload: aborted, never completed.
    let mut wrong_big = big.clone();
    wrong_big[12_345_678] ^= 1;
    let refused = store.put(Box::new(&wrong_big[..]), Some(digest)).await.expect_err("wrong bytes, multipart");
    assert!(matches!(refused, StoreError::ChecksumMismatch { .. }), "{refused}");
    assert_eq!(read_all(store, digest, 0, big.len() as u64).await, big, "the artifact already there is untouched");
    let refused = store.put(Box::new(&wrong_big[..]), Some(Digest::of(b"a new name"))).await.expect_err("wrong bytes, new name");
    assert!(matches!(refused, StoreError::ChecksumMismatch { .. }), "{refused}");
    assert!(matches!(store.size(Digest::of(b"a new name")).await, Err(StoreError::NotFound(_))));
    // Ranges as the local store reads them: past the end nothing, across the end what is there.
    assert_eq!(read_all(store, digest, big.len() as u64 + 10, 5).await, Vec::<u8>::new());
    assert_eq!(read_all(store, digest, big.len() as u64 - 3, 100).await, &big[big.len() - 3..]);
    let other = b"never stored".to_vec();
    let refused = store.put(Box::new(&other[..]), Some(Digest::of(b"something else"))).await.expect_err("wrong bytes");
    assert!(matches!(refused, StoreError::ChecksumMismatch { .. }), "{refused}");
    assert!(matches!(store.size(Digest::of(b"something else")).await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.size(Digest::of(&other)).await, Err(StoreError::NotFound(_))));
    let huge = vec![7u8; MAX as usize + 1];
    assert!(matches!(store.put(Box::new(&huge[..]), None).await, Err(StoreError::TooLarge { .. })));
    assert!(matches!(store.size(Digest::of(&huge)).await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.open(Digest::of(b"nothing"), 0, 1).await, Err(StoreError::NotFound(_))));

    // Listed: exactly the two artifacts (no upload on its way, no refused bytes).
    let listed = store.list().await.expect("list");
    let mut expected = vec![(digest, big.len() as u64), (small_digest, small.len() as u64)];
    expected.sort();
    assert_eq!(listed.iter().map(|l| (l.digest, l.size)).collect::<Vec<_>>(), expected);
    // Collected only when stored before the cut-off.
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    assert!(!store.delete_if_stored_before(small_digest, long_ago).await.expect("kept"));
    assert!(store.delete_if_stored_before(small_digest, SystemTime::now() + Duration::from_secs(60)).await.expect("deleted"));
    assert!(matches!(store.size(small_digest).await, Err(StoreError::NotFound(_))));
    assert!(!store.delete_if_stored_before(small_digest, SystemTime::now()).await.expect("already gone"));
}

#[tokio::test]
async fn the_local_directory_keeps_the_store_contract() {
    let dir = tempfile::tempdir().expect("dir");
    contract(&LocalStore::open(dir.path(), MAX).expect("store")).await;
}

#[tokio::test]
async fn an_s3_bucket_keeps_the_same_contract() {
    let dir = tempfile::tempdir().expect("dir");
    let (_server, store) = bucket_store(dir.path()).await;
    contract(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_store_serves_uploads_and_ranges_from_the_bucket() {
    let dir = tempfile::tempdir().expect("dir");
    let (_server, store) = bucket_store(dir.path()).await;
    let store: Arc<dyn Store> = Arc::new(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, server::router(store, "artifact-token-for-tests")).await });
    let client = ArtifactClient::new(&format!("http://{addr}"), "artifact-token-for-tests");
    let bytes: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
    let src = dir.path().join("model.pt");
    std::fs::write(&src, &bytes).expect("write");
    let digest = client.upload_file(&src).await.expect("upload");
    assert_eq!(digest, Digest::of(&bytes));
    let back = dir.path().join("back.pt");
    assert_eq!(client.download_to(digest, &back).await.expect("download"), bytes.len() as u64);
    assert_eq!(std::fs::read(&back).expect("read"), bytes);
}
