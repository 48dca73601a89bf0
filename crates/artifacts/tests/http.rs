//! The store over real HTTP on loopback: our client, and `curl` as an outside client for the
//! range requests and refusals.

use std::sync::Arc;

use suanli_artifacts::{server, ArtifactClient, Digest, LocalStore, Store};

const TOKEN: &str = "artifact-token-for-tests";

async fn serve(root: &std::path::Path) -> String {
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(root, 64 * 1024 * 1024).expect("store"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, server::router(store, TOKEN)).await });
    format!("http://{addr}")
}

fn curl(args: &[&str]) -> (String, Vec<u8>) {
    let out = std::process::Command::new("curl").args(["-s", "-o", "-", "-w", "\n%{http_code}"]).args(args).output().expect("curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = out.stdout;
    let split = text.iter().rposition(|b| *b == b'\n').expect("status line");
    (String::from_utf8_lossy(&text[split + 1..]).into_owned(), text[..split].to_vec())
}

// Multi-threaded: the test blocks on `curl` while the server answers it on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_download_ranges_and_refusals() {
    let dir = tempfile::tempdir().expect("dir");
    let base = serve(&dir.path().join("store")).await;
    let client = ArtifactClient::new(&base, TOKEN);
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let src = dir.path().join("checkpoint.bin");
    std::fs::write(&src, &bytes).expect("write");

    let digest = client.upload_file(&src).await.expect("upload");
    assert_eq!(digest, Digest::of(&bytes));
    // Uploading the same bytes again names the same artifact.
    assert_eq!(client.upload_file(&src).await.expect("again"), digest);

    let dest = dir.path().join("back.bin");
    assert_eq!(client.download_to(digest, &dest).await.expect("download"), bytes.len() as u64);
    assert_eq!(std::fs::read(&dest).expect("read"), bytes);

    let url = format!("{base}/v1/artifacts/{digest}");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let (status, body) = curl(&["-H", &auth, "-H", "Range: bytes=1000-1999", &url]);
    assert_eq!((status.as_str(), body.as_slice()), ("206", &bytes[1000..2000]));
    let (status, body) = curl(&["-H", &auth, "-H", "Range: bytes=-16", &url]);
    assert_eq!((status.as_str(), body.as_slice()), ("206", &bytes[bytes.len() - 16..]));
    let (status, _) = curl(&["-H", &auth, "-H", "Range: bytes=400000-", &url]);
    assert_eq!(status, "416");
    let (status, body) = curl(&["-H", "Authorization: Bearer wrong", &url]);
    assert_eq!(status, "401", "{}", String::from_utf8_lossy(&body));
    let (status, _) = curl(&["-H", &auth, &format!("{base}/v1/artifacts/{}", Digest::of(b"nothing"))]);
    assert_eq!(status, "404");
    let (status, body) = curl(&["-H", &auth, &format!("{base}/v1/artifacts/NOT-HEX")]);
    assert_eq!(status, "400", "{}", String::from_utf8_lossy(&body));

    // Bytes that do not hash to what the uploader named are refused and leave nothing behind.
    let wrong = Digest::of(b"something else");
    let (status, body) = curl(&["-H", &auth, "-X", "PUT", "--data-binary", "@-", &format!("{base}/v1/artifacts?sha256={wrong}")]);
    assert_eq!(status, "422", "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("CHECKSUM_MISMATCH"));
    let leftovers = std::fs::read_dir(dir.path().join("store/tmp")).expect("tmp").count();
    assert_eq!(leftovers, 0, "a refused upload leaves no temporary file");
    // A download that does not match is not moved into place.
    let err = client.download_to(wrong, &dir.path().join("missing.bin")).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    assert!(!dir.path().join("missing.bin").exists());
}

#[tokio::test]
async fn an_upload_a_crash_cut_short_is_swept_when_the_store_opens_again() {
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path().join("store");
    let store = LocalStore::open(&root, 1024).expect("store");
    let kept = store.put(Box::new(&b"acknowledged"[..]), None).await.expect("put").0;
    drop(store);
    // What a crash mid-upload leaves: a partial file in tmp/.
    std::fs::write(root.join("tmp").join("00000000deadbeef"), b"half an uplo").expect("partial");
    let store = LocalStore::open(&root, 1024).expect("reopened");
    assert_eq!(std::fs::read_dir(root.join("tmp")).expect("tmp").count(), 0, "the partial upload is gone");
    assert_eq!(store.size(kept).await.expect("kept"), 12, "acknowledged artifacts stay");
}
