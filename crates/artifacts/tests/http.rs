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

/// The code of a refusal, and its HTTP status.
fn refusal(result: Result<impl std::fmt::Debug, suanli_artifacts::ClientError>) -> (u16, String) {
    match result {
        Err(suanli_artifacts::ClientError::Refused { status, body }) => {
            let code = serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_owned)).unwrap_or(body);
            (status, code)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_capability_reaches_its_own_artifacts_only_within_its_owners_quota() {
    use suanli_artifacts::{server::Access, CapabilityKey, Grant};
    let dir = tempfile::tempdir().expect("dir");
    let key = CapabilityKey::generate();
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.path().join("store"), 1 << 20).expect("store"));
    let access = Access { token: TOKEN.into(), capabilities: Some(key.clone()), owners_dir: Some(dir.path().join("owners")), quota_bytes: Some(100) };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, server::router_with(store, access)).await });
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    };
    // Another tenant's artifact, put there by the platform.
    let service = ArtifactClient::new(&base, TOKEN);
    let theirs = service.upload_file(&file("theirs", b"another tenant's model")).await.expect("upload");
    let mine_input = service.upload_file(&file("input", b"my dataset")).await.expect("upload");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let grant = Grant { owner: 7, scope: "job 1 attempt 1".into(), read: vec![mine_input.to_hex()], write: true, expires_ms: now + 60_000 };
    let holder = ArtifactClient::new(&base, &key.sign(&grant));
    holder.download_to(mine_input, &dir.path().join("got-input")).await.expect("its own input");
    assert_eq!(refusal(holder.download_to(theirs, &dir.path().join("stolen")).await), (403, "FORBIDDEN".into()));
    assert!(!dir.path().join("stolen").exists(), "nothing of the other tenant's arrived");
    // Widened, expired or foreign capabilities are not capabilities.
    let expired = ArtifactClient::new(&base, &key.sign(&Grant { expires_ms: now - 1, ..grant.clone() }));
    assert_eq!(refusal(expired.download_to(mine_input, &dir.path().join("x")).await).0, 401);
    let foreign = ArtifactClient::new(&base, &CapabilityKey::generate().sign(&Grant { read: vec![theirs.to_hex()], ..grant.clone() }));
    assert_eq!(refusal(foreign.download_to(theirs, &dir.path().join("y")).await).0, 401);
    let read_only = ArtifactClient::new(&base, &key.sign(&Grant { write: false, ..grant.clone() }));
    assert_eq!(refusal(read_only.upload_file(&file("ro", b"not allowed")).await), (403, "FORBIDDEN".into()));
    // Uploads count against the owner's 100 bytes: checked before each upload.
    holder.upload_file(&file("out-1", &[1u8; 60])).await.expect("first output");
    holder.upload_file(&file("out-2", &[2u8; 60])).await.expect("second output (60 < 100 before it)");
    assert_eq!(refusal(holder.upload_file(&file("out-3", &[3u8; 10])).await), (403, "QUOTA_EXCEEDED".into()));
    // The platform's own token is not held to a tenant's quota.
    service.upload_file(&file("platform", &[4u8; 200])).await.expect("the service token");
    // Another account's job naming this owner's output among its inputs gets a capability
    // for that digest from the broker, and still cannot read it.
    let output = suanli_artifacts::client::hash_file(&dir.path().join("out-1")).await.expect("hash");
    let snoop = ArtifactClient::new(&base, &key.sign(&Grant { owner: 8, read: vec![output.to_hex()], ..grant.clone() }));
    assert_eq!(refusal(snoop.download_to(output, &dir.path().join("snooped")).await), (403, "FORBIDDEN".into()));
    let own = ArtifactClient::new(&base, &key.sign(&Grant { read: vec![output.to_hex()], ..grant.clone() }));
    own.download_to(output, &dir.path().join("own-output")).await.expect("the owner's next attempt reads it");
}

/// Sets an artifact's stored time back, as if it had been uploaded `seconds` ago.
fn age(store_root: &std::path::Path, digest: Digest, seconds: u64) {
    let hex = digest.to_hex();
    let file = std::fs::File::options().write(true).open(store_root.join(&hex[..2]).join(&hex)).expect("artifact file");
    file.set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(seconds)).expect("set mtime");
}

#[tokio::test]
async fn garbage_collection_deletes_only_old_unreferenced_uploads_of_jobs_and_frees_their_quota() {
    use std::collections::HashSet;
    use suanli_artifacts::{server::Access, CapabilityKey, Grant};
    let dir = tempfile::tempdir().expect("dir");
    let key = CapabilityKey::generate();
    let root = dir.path().join("store");
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(&root, 1 << 20).expect("store"));
    let access = Access { token: TOKEN.into(), capabilities: Some(key.clone()), owners_dir: Some(dir.path().join("owners")), quota_bytes: Some(100) };
    let (router, collector) = server::router_and_collector(store.clone(), access);
    let collector = collector.expect("a collector where owners are recorded");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, router).await });
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let grant = Grant { owner: 7, scope: "job 1 attempt 1".into(), read: Vec::new(), write: true, expires_ms: now + 60_000 };
    let job = ArtifactClient::new(&base, &key.sign(&grant));
    let service = ArtifactClient::new(&base, TOKEN);
    let old_checkpoint = job.upload_file(&file("ckpt-1", &[1u8; 70])).await.expect("upload");
    let latest_checkpoint = job.upload_file(&file("ckpt-2", &[2u8; 25])).await.expect("upload");
    let fresh_output = job.upload_file(&file("out", &[3u8; 5])).await.expect("upload");
    let platform_data = service.upload_file(&file("data", &[4u8; 50])).await.expect("upload");
    for d in [old_checkpoint, latest_checkpoint, platform_data] {
        age(&root, d, 2 * 86_400);
    }
    // The owner's quota is full (100 of 100 bytes).
    assert_eq!(refusal(job.upload_file(&file("out-2", &[5u8; 10])).await), (403, "QUOTA_EXCEEDED".into()));
    let before: Vec<_> = store.list().await.expect("list").into_iter().map(|l| l.digest).collect();
    assert_eq!(before.len(), 4);

    let referenced: HashSet<Digest> = [latest_checkpoint].into();
    let day_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(86_400);
    let done = collector.collect(&referenced, day_ago).await.expect("collect");
    assert_eq!((done.deleted, done.freed_bytes, done.kept), (1, 70, 3), "{done:?}");
    let after: HashSet<Digest> = store.list().await.expect("list").into_iter().map(|l| l.digest).collect();
    assert_eq!(after, [latest_checkpoint, fresh_output, platform_data].into(), "only the superseded checkpoint went");
    assert_eq!(refusal(service.download_to(old_checkpoint, &dir.path().join("gone")).await).0, 404);
    // Its bytes no longer count against the owner's quota: uploads fit again.
    job.upload_file(&file("out-2", &[5u8; 10])).await.expect("room freed by the collection");
    // The same bytes uploaded again are stored again, and young: the next collection keeps them.
    let again = job.upload_file(&file("ckpt-1-again", &[1u8; 70])).await.expect("upload");
    assert_eq!(again, old_checkpoint);
    let done = collector.collect(&referenced, day_ago).await.expect("collect");
    assert_eq!(done.deleted, 0, "{done:?}");
    service.download_to(again, &dir.path().join("back")).await.expect("stored again");
}

#[tokio::test]
async fn over_tls_the_store_is_reached_only_by_clients_trusting_its_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let ca = suanli_pki::Ca::generate("artifacts test CA").expect("ca");
    let cert = ca.server_certificate(&["127.0.0.1".into()]).expect("certificate");
    let config = suanli_artifacts::tls::server_config(cert.cert_pem.as_bytes(), cert.key_pem.as_bytes()).expect("tls config");
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(&dir.path().join("store"), 1 << 20).expect("store"));
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let listener = suanli_artifacts::tls::TlsListener::new(tcp, config).expect("listener");
    tokio::spawn(async move { axum::serve(listener, server::router(store, TOKEN)).await });
    // A client that connects and never speaks TLS holds up no one: its handshake waits on a
    // task of its own (10 s deadline), while the next client is served at once.
    let _silent = tokio::net::TcpStream::connect(addr).await.expect("a silent connection");

    let base = format!("https://{addr}");
    let path = dir.path().join("model");
    std::fs::write(&path, b"weights").expect("write");
    let trusted = ArtifactClient::with_ca(&base, TOKEN, ca.cert_pem()).expect("client");
    let served = tokio::time::timeout(std::time::Duration::from_secs(5), trusted.upload_file(&path)).await;
    let digest = served.expect("not held up behind the silent connection").expect("upload over TLS");
    trusted.download_to(digest, &dir.path().join("back")).await.expect("download over TLS");
    assert_eq!(std::fs::read(dir.path().join("back")).expect("read"), b"weights");

    // A client trusting another CA never sends its token; plain HTTP gets no answer.
    let other = suanli_pki::Ca::generate("someone else").expect("ca");
    let fooled = ArtifactClient::with_ca(&base, TOKEN, other.cert_pem()).expect("client");
    assert!(matches!(fooled.upload_file(&path).await, Err(suanli_artifacts::ClientError::Http(_))), "a certificate of another CA is refused");
    let plain = ArtifactClient::new(&format!("http://{addr}"), TOKEN);
    assert!(plain.upload_file(&path).await.is_err(), "no plaintext on the TLS port");
}
