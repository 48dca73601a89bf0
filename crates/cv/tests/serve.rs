//! The inference service over real loopback HTTP and WebSocket. The test predictor computes a
//! real function of the pixels (per-channel mean and its argmax, plus the size), and every
//! request uses an image of its own color and size, so a result routed to the wrong request
//! would not match. Ordering is made deterministic with a predictor that blocks until the test
//! releases it, never with sleeps.

use std::collections::HashMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use suanli_cv::serve::{serve, BatchPredictor, Bound, Listener, ServeConfig, ServeStats, Server};
use suanli_cv::Image;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------- test predictors and images

/// Per image: mean of each channel (0..=255, rounded), the channel with the largest mean, and
/// the size.
fn score(image: &Image) -> Value {
    let c = image.channels as usize;
    let pixels = (image.width * image.height) as f64;
    let mut sums = vec![0f64; c];
    for (i, v) in image.data.iter().enumerate() {
        sums[i % c] += f64::from(*v);
    }
    let means: Vec<u64> = sums.iter().map(|s| (s / pixels * 255.0).round() as u64).collect();
    let argmax = (0..c).fold(0, |best, i| if means[i] > means[best] { i } else { best });
    json!({ "mean": means, "argmax": argmax, "size": [image.width, image.height] })
}

struct ColorPredictor;

impl BatchPredictor for ColorPredictor {
    fn predict_batch(&mut self, images: Vec<Image>) -> Result<Vec<Value>, String> {
        Ok(images.iter().map(score).collect())
    }
    fn describe(&self) -> Value {
        json!({ "name": "channel-means", "classes": ["red", "green", "blue"], "input": "any RGB" })
    }
}

/// Reports each batch's size on `entered`, then waits for one `()` on `gate`; once the test
/// drops the gate's sender it no longer waits.
struct GatedPredictor {
    entered: mpsc::UnboundedSender<usize>,
    gate: std::sync::mpsc::Receiver<()>,
}

impl BatchPredictor for GatedPredictor {
    fn predict_batch(&mut self, images: Vec<Image>) -> Result<Vec<Value>, String> {
        let _ = self.entered.send(images.len());
        let _ = self.gate.recv();
        Ok(images.iter().map(score).collect())
    }
    fn describe(&self) -> Value {
        json!({ "name": "gated" })
    }
}

fn gated() -> (Box<dyn BatchPredictor>, mpsc::UnboundedReceiver<usize>, std::sync::mpsc::Sender<()>) {
    let (entered, entered_rx) = mpsc::unbounded_channel();
    let (gate_tx, gate) = std::sync::mpsc::channel();
    (Box::new(GatedPredictor { entered, gate }), entered_rx, gate_tx)
}

/// Fails in three different ways depending on the image width, works otherwise.
struct FlakyPredictor;

impl BatchPredictor for FlakyPredictor {
    fn predict_batch(&mut self, images: Vec<Image>) -> Result<Vec<Value>, String> {
        if images.iter().any(|i| i.width == 7) {
            return Err("model exploded on a 7-wide image".into());
        }
        if images.iter().any(|i| i.width == 9) {
            panic!("nine is not allowed");
        }
        if images.iter().any(|i| i.width == 11) {
            return Ok(vec![]);
        }
        Ok(images.iter().map(score).collect())
    }
    fn describe(&self) -> Value {
        json!({ "name": "flaky" })
    }
}

/// Image number `i`: its own color (and so its own means) and its own size.
fn color(i: usize) -> [u8; 3] {
    [(i * 4 % 256) as u8, (255 - i * 4 % 256) as u8, ((i * 37 + 11) % 256) as u8]
}

fn size(i: usize) -> (u32, u32) {
    (3 + (i % 5) as u32, 2 + (i % 3) as u32)
}

fn png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb(rgb));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).expect("encode png");
    out.into_inner()
}

fn image_bytes(i: usize) -> Vec<u8> {
    let (w, h) = size(i);
    png(w, h, color(i))
}

/// What [`score`] must say about image `i`, computed from the color directly.
fn expected(i: usize) -> Value {
    let c = color(i);
    let argmax = (0..3).fold(0, |best, k| if c[k] > c[best] { k } else { best });
    let (w, h) = size(i);
    json!({ "mean": [c[0], c[1], c[2]], "argmax": argmax, "size": [w, h] })
}

// ---------------------------------------------------------------- harness

async fn start(predictor: Box<dyn BatchPredictor>, config: ServeConfig) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    serve(listener, predictor, config).await.expect("serve")
}

fn config(max_batch: usize, max_wait_ms: u64, max_queue: usize) -> ServeConfig {
    ServeConfig { max_batch, max_wait_ms, max_queue, ..ServeConfig::default() }
}

fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

async fn post_image(client: &reqwest::Client, addr: SocketAddr, bytes: Vec<u8>) -> (u16, Value) {
    let resp = client.post(url(addr, "/v1/predict")).body(bytes).send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

/// Polls a condition on the server's own counters (not a timed wait: it returns as soon as the
/// condition holds, and only gives up after a generous deadline).
async fn wait_for(server: &Server, what: &str, cond: impl Fn(&ServeStats) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond(&server.stats()) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {:?}", server.stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_each_get_their_own_result() {
    let server = start(Box::new(ColorPredictor), config(8, 20, 1024)).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { (i, post_image(&client, addr, image_bytes(i)).await) })
        })
        .collect();
    let mut batches: HashMap<u64, (u64, u64)> = HashMap::new(); // batch id -> (batch_size, seen)
    for task in tasks {
        let (i, (status, body)) = task.await.expect("task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"], expected(i), "request {i} got someone else's result");
        let size = body["batch_size"].as_u64().expect("batch_size");
        let entry = batches.entry(body["batch"].as_u64().expect("batch")).or_insert((size, 0));
        assert_eq!(entry.0, size, "one batch, two sizes");
        entry.1 += 1;
    }
    for (id, (size, seen)) in &batches {
        assert_eq!(size, seen, "batch {id} claims {size} images but {seen} requests were in it");
    }
    let stats = server.stats();
    assert_eq!(stats.requests, 64);
    assert_eq!(stats.images, 64);
    assert_eq!(stats.batches, batches.len() as u64);
    assert_eq!(batches.values().map(|(s, _)| s).sum::<u64>(), 64);
    assert!(stats.largest_batch <= 8 && stats.largest_batch >= 1, "{stats:?}");
    assert_eq!(stats.largest_batch, batches.values().map(|(s, _)| *s).max().unwrap_or(0));
    assert_eq!((stats.errors, stats.queue_depth), (0, 0));

    // The same counters over HTTP.
    let over_http: ServeStats = client.get(url(addr, "/v1/stats")).send().await.expect("stats").json().await.expect("json");
    assert_eq!(over_http, stats);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_queued_behind_a_busy_predictor_form_full_batches() {
    let (predictor, mut entered, gate) = gated();
    // A batch fills at 10 or after 200 ms, whichever first.
    let server = start(predictor, config(10, 200, 1024)).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();

    let first = {
        let client = client.clone();
        tokio::spawn(async move { post_image(&client, addr, image_bytes(100)).await })
    };
    // Alone, it waits out max_wait and runs as a batch of one; the predictor now blocks on it.
    assert_eq!(entered.recv().await, Some(1));

    let queued: Vec<_> = (0..12)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { (i, post_image(&client, addr, image_bytes(i)).await) })
        })
        .collect();
    wait_for(&server, "12 queued images", |s| s.queue_depth == 12).await;
    drop(gate); // release every batch from now on

    // The queue holds 12: one full batch of 10 at once, then the 2 left over.
    assert_eq!(entered.recv().await, Some(10));
    assert_eq!(entered.recv().await, Some(2));

    let (status, body) = first.await.expect("task");
    assert_eq!((status, &body["result"], body["batch_size"].as_u64()), (200, &expected(100), Some(1)));
    let mut sizes = HashMap::new();
    let mut ids_of_ten = std::collections::HashSet::new();
    for task in queued {
        let (i, (status, body)) = task.await.expect("task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"], expected(i));
        let size = body["batch_size"].as_u64().expect("batch_size");
        *sizes.entry(size).or_insert(0) += 1;
        if size == 10 {
            ids_of_ten.insert(body["batch"].as_u64().expect("batch"));
        }
    }
    assert_eq!(sizes, HashMap::from([(10, 10), (2, 2)]));
    assert_eq!(ids_of_ten.len(), 1, "the ten came from one predictor call");
    let stats = server.stats();
    assert_eq!((stats.batches, stats.images, stats.largest_batch), (3, 13, 10));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_503_then_the_queued_requests_complete() {
    let (predictor, mut entered, gate) = gated();
    let server = start(predictor, config(4, 0, 4)).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();

    let busy = {
        let client = client.clone();
        tokio::spawn(async move { post_image(&client, addr, image_bytes(50)).await })
    };
    assert_eq!(entered.recv().await, Some(1));
    let queued: Vec<_> = (0..4)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { (i, post_image(&client, addr, image_bytes(i)).await) })
        })
        .collect();
    wait_for(&server, "a full queue", |s| s.queue_depth == 4).await;

    let (status, body) = post_image(&client, addr, image_bytes(9)).await;
    assert_eq!((status, error_code(&body)), (503, "QUEUE_FULL"), "{body}");
    // A batch request is admitted all-or-nothing, so one image is already too many.
    let b64 = base64::engine::general_purpose::STANDARD.encode(image_bytes(9));
    let resp = client.post(url(addr, "/v1/predict/batch")).json(&json!({ "images": [b64] })).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(error_code(&resp.json::<Value>().await.expect("json")), "QUEUE_FULL");

    drop(gate);
    assert_eq!(entered.recv().await, Some(4));
    let (status, body) = busy.await.expect("task");
    assert_eq!((status, &body["result"]), (200, &expected(50)));
    for task in queued {
        let (i, (status, body)) = task.await.expect("task");
        assert_eq!((status, &body["result"], body["batch_size"].as_u64()), (200, &expected(i), Some(4)));
    }
    let stats = server.stats();
    assert_eq!((stats.requests, stats.errors, stats.queue_full, stats.images), (7, 2, 2, 5));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_4xx_with_a_code_and_the_decoders_reason() {
    let mut cfg = config(4, 0, 16);
    cfg.max_body_bytes = 4096;
    cfg.limits.max_width = 64;
    let server = start(Box::new(ColorPredictor), cfg).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();

    let (status, body) = post_image(&client, addr, b"GIF89a definitely not a png".to_vec()).await;
    assert_eq!((status, error_code(&body)), (400, "BAD_IMAGE"), "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("unsupported format"), "{message}");

    let mut truncated = image_bytes(3);
    truncated.truncate(truncated.len() / 2);
    let (status, body) = post_image(&client, addr, truncated).await;
    assert_eq!((status, error_code(&body)), (400, "BAD_IMAGE"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("PNG"), "{body}");

    let (status, body) = post_image(&client, addr, Vec::new()).await;
    assert_eq!((status, error_code(&body)), (400, "EMPTY_BODY"), "{body}");

    let (status, body) = post_image(&client, addr, vec![0x89; 8192]).await;
    assert_eq!((status, error_code(&body)), (413, "TOO_LARGE"), "{body}");

    // Small file, but wider than the configured decoding limit: refused before decoding.
    let (status, body) = post_image(&client, addr, png(100, 2, [1, 2, 3])).await;
    assert_eq!((status, error_code(&body)), (413, "TOO_LARGE"), "{body}");

    let resp = client.get(url(addr, "/v2/nothing")).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 404);
    assert_eq!(error_code(&resp.json::<Value>().await.expect("json")), "NOT_FOUND");

    // The service is unharmed.
    let (status, body) = post_image(&client, addr, image_bytes(5)).await;
    assert_eq!((status, &body["result"]), (200, &expected(5)));
    let stats = server.stats();
    assert_eq!((stats.requests, stats.errors, stats.images), (6, 5, 1));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn predictor_failures_are_500_and_the_service_keeps_going() {
    let server = start(Box::new(FlakyPredictor), config(4, 0, 16)).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();
    for (width, needle) in [(7, "exploded"), (9, "panicked: nine is not allowed"), (11, "returned 0 results for 1 images")] {
        let (status, body) = post_image(&client, addr, png(width, 2, [9, 9, 9])).await;
        assert_eq!((status, error_code(&body)), (500, "PREDICT_FAILED"), "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message:?} should mention {needle:?}");
    }
    let (status, body) = post_image(&client, addr, image_bytes(2)).await;
    assert_eq!((status, &body["result"]), (200, &expected(2)));
    assert_eq!(server.stats().errors, 3);
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_endpoint_reports_bad_images_by_index() {
    let server = start(Box::new(ColorPredictor), config(2, 5, 64)).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();
    let b64 = |bytes: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(bytes);
    let images = json!([b64(image_bytes(0)), b64(image_bytes(1)), "%%% not base64 %%%", b64(b"plain text".to_vec()), b64(image_bytes(4)), "",]);
    let resp = client.post(url(addr, "/v1/predict/batch")).json(&json!({ "images": images })).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    let body: Value = resp.json().await.expect("json");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 6);
    for i in [0, 1, 4] {
        assert_eq!(results[i]["result"], expected(i), "{body}");
        assert!(results[i]["batch_size"].as_u64().is_some_and(|n| (1..=2).contains(&n)), "max_batch is 2: {body}");
    }
    for i in [2, 3, 5] {
        assert!(results[i].is_null(), "{body}");
    }
    let errors: Vec<(u64, &str)> =
        body["errors"].as_array().expect("errors").iter().map(|e| (e["index"].as_u64().unwrap_or(99), e["code"].as_str().unwrap_or(""))).collect();
    assert_eq!(errors, vec![(2, "BAD_BASE64"), (3, "BAD_IMAGE"), (5, "EMPTY_BODY")]);

    // Whole-request problems.
    for (body, status, code) in [
        (json!({ "images": [] }).to_string(), 400, "EMPTY_BATCH"),
        (json!({ "images": vec![b64(image_bytes(0)); 9] }).to_string(), 400, "TOO_MANY_IMAGES"),
        (json!({ "pictures": [] }).to_string(), 400, "BAD_JSON"),
        ("not json".to_owned(), 400, "BAD_JSON"),
    ] {
        let resp = client.post(url(addr, "/v1/predict/batch")).body(body).send().await.expect("send");
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(error_code(&resp.json::<Value>().await.expect("json")), code);
    }
    server.shutdown().await.expect("shutdown");
}

async fn ws_connect(addr: SocketAddr) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/stream")).await.expect("ws connect");
    ws
}

async fn next_text<S>(ws: &mut S) -> Value
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).expect("reply is json"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text reply, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_stream_replies_in_order_and_survives_bad_frames() {
    let server = start(Box::new(ColorPredictor), config(8, 2, 1024)).await;
    let mut ws = ws_connect(server.local_addr().expect("a TCP service")).await;
    // 21 frames, frame 10 is garbage; a text message after frame 15.
    for frame in 0..21usize {
        let bytes = if frame == 10 { b"\xFF\xD8\xFF not really a jpeg".to_vec() } else { image_bytes(frame) };
        ws.send(Message::Binary(bytes.into())).await.expect("send frame");
        if frame == 15 {
            ws.send(Message::Text("hello?".into())).await.expect("send text");
        }
    }
    for frame in 0..21u64 {
        let reply = next_text(&mut ws).await;
        assert_eq!(reply["frame"], json!(frame), "out of order: {reply}");
        if frame == 10 {
            assert_eq!(error_code(&reply), "BAD_IMAGE", "{reply}");
        } else {
            assert_eq!(reply["result"], expected(frame as usize), "{reply}");
            assert!(reply.get("error").is_none());
        }
        if frame == 15 {
            let text_reply = next_text(&mut ws).await;
            assert_eq!(error_code(&text_reply), "TEXT_MESSAGE", "{text_reply}");
            assert!(text_reply.get("frame").is_none());
        }
    }
    // Clean close: our close is answered with the server's and the stream ends.
    ws.close(None).await.expect("close");
    loop {
        match ws.next().await {
            None | Some(Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)) => break,
            Some(Ok(Message::Close(_))) => continue,
            other => panic!("unexpected after close: {other:?}"),
        }
    }
    let stats = server.stats();
    assert_eq!((stats.requests, stats.images, stats.errors), (21, 20, 2));
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_frames_are_pipelined_and_batched_with_http_requests() {
    let (predictor, mut entered, gate) = gated();
    let server = start(predictor, config(16, 0, 1024)).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();
    let busy = {
        let client = client.clone();
        tokio::spawn(async move { post_image(&client, addr, image_bytes(40)).await })
    };
    assert_eq!(entered.recv().await, Some(1));

    // Five frames and one HTTP request queue up behind the busy predictor...
    let mut ws = ws_connect(addr).await;
    for frame in 0..5 {
        ws.send(Message::Binary(image_bytes(frame).into())).await.expect("send");
    }
    wait_for(&server, "5 queued frames", |s| s.queue_depth == 5).await;
    let http = {
        let client = client.clone();
        tokio::spawn(async move { post_image(&client, addr, image_bytes(41)).await })
    };
    wait_for(&server, "6 queued images", |s| s.queue_depth == 6).await;
    drop(gate);
    // ...and go to the predictor as one batch.
    assert_eq!(entered.recv().await, Some(6));
    for frame in 0..5u64 {
        let reply = next_text(&mut ws).await;
        assert_eq!((&reply["frame"], &reply["result"], &reply["batch_size"]), (&json!(frame), &expected(frame as usize), &json!(6)));
    }
    let (status, body) = http.await.expect("task");
    assert_eq!((status, &body["result"], &body["batch_size"]), (200, &expected(41), &json!(6)));
    assert_eq!(busy.await.expect("task").0, 200);
    ws.close(None).await.expect("close");
    server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_and_health_endpoints() {
    let server = start(Box::new(ColorPredictor), ServeConfig::default()).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();
    let model: Value = client.get(url(addr, "/v1/model")).send().await.expect("send").json().await.expect("json");
    assert_eq!(model, ColorPredictor.describe());
    let health = client.get(url(addr, "/v1/health")).send().await.expect("send");
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.text().await.expect("text"), "ok");
    server.shutdown().await.expect("shutdown");
}

/// One HTTP/1.1 request over a Unix socket; the whole answer as text.
async fn over_unix(path: &std::path::Path, request: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::UnixStream::connect(path).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_on_a_unix_socket_answers_and_a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("service.sock");
    let listen = format!("unix:{}", path.display());
    for round in 0..2 {
        // The second round binds where the first one's socket file was left behind.
        let server = serve(Listener::bind(&listen).await.expect("bind"), Box::new(ColorPredictor), ServeConfig::default()).await.expect("serve");
        assert_eq!(server.bound(), &Bound::Unix(path.clone()));
        assert_eq!(server.local_addr(), None);
        let health = over_unix(&path, "GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
        assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok"), "round {round}: {health}");
        server.shutdown().await.expect("shutdown");
    }
    // A file that is not a socket is never removed to make room.
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").expect("write");
    assert!(Listener::bind(&format!("unix:{}", file.display())).await.is_err());
    assert_eq!(std::fs::read_to_string(&file).expect("still there"), "keep me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_takes_over_a_listening_socket_it_was_handed_and_refuses_anything_else() {
    use std::os::fd::IntoRawFd as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("activated.sock");
    // As the agent hands it over: bound and listening before the service starts.
    let fd = std::os::unix::net::UnixListener::bind(&path).expect("bind").into_raw_fd();
    let server = serve(Listener::bind(&format!("fd:{fd}")).await.expect("take over"), Box::new(ColorPredictor), ServeConfig::default()).await.expect("serve");
    assert_eq!(server.bound(), &Bound::Unix(path.clone()));
    let health = over_unix(&path, "GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    server.shutdown().await.expect("shutdown");
    // A standard stream, a number that is not open, not a number, a file that is not a socket.
    let file = std::fs::File::create(dir.path().join("plain")).expect("file").into_raw_fd();
    for listen in ["fd:1".to_owned(), "fd:999999".to_owned(), "fd:x".to_owned(), format!("fd:{file}")] {
        assert!(Listener::bind(&listen).await.is_err(), "{listen} is refused");
    }
}

#[test]
fn config_defaults_and_strict_parsing() {
    let cfg: ServeConfig = serde_json::from_str("{}").expect("defaults");
    assert_eq!((cfg.max_batch, cfg.max_wait_ms, cfg.max_queue, cfg.max_body_bytes), (32, 5, 1024, 32 << 20));
    let cfg: ServeConfig = serde_json::from_str(r#"{"max_batch": 8}"#).expect("partial");
    assert_eq!(cfg.max_batch, 8);
    assert!(serde_json::from_str::<ServeConfig>(r#"{"max_bach": 8}"#).is_err(), "typos are refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_refused() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let err = serve(listener, Box::new(ColorPredictor), config(0, 5, 10)).await.err().expect("max_batch 0 refused");
    assert!(err.to_string().contains("max_batch"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_in_flight_work_and_closes_streams() {
    let (predictor, mut entered, gate) = gated();
    let server = start(predictor, config(4, 0, 64)).await;
    let addr = server.local_addr().expect("a TCP service");
    let client = reqwest::Client::new();
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { post_image(&client, addr, image_bytes(7)).await })
    };
    assert_eq!(entered.recv().await, Some(1));
    let mut ws = ws_connect(addr).await;

    let stopping = tokio::spawn(server.shutdown());
    // Open streams are told the server is going away...
    match ws.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    // ...new connections are refused once the listener is gone...
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting connections");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // ...while the request already being predicted still gets its answer.
    drop(gate);
    let (status, body) = in_flight.await.expect("task");
    assert_eq!((status, &body["result"]), (200, &expected(7)));
    stopping.await.expect("task").expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_a_call_without_it_is_refused_before_anything_is_predicted() {
    let server = start(Box::new(ColorPredictor), ServeConfig { bearer_token: Some("s3cret-token".into()), ..config(4, 1, 16) }).await;
    let client = reqwest::Client::new();
    for auth in [None, Some("Bearer wrong"), Some("s3cret-token"), Some("Bearer s3cret-toke"), Some("Bearer s3cret-token2")] {
        let mut request = client.post(url(server.local_addr().expect("a TCP service"), "/v1/predict")).body(image_bytes(1));
        if let Some(a) = auth {
            request = request.header("authorization", a);
        }
        let response = request.send().await.expect("post");
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        let body: Value = response.json().await.expect("json");
        assert_eq!(error_code(&body), "UNAUTHENTICATED");
    }
    assert_eq!(server.stats().images, 0, "nothing predicted");
    let health = client.get(url(server.local_addr().expect("a TCP service"), "/v1/health")).send().await.expect("health");
    assert_eq!(health.status().as_u16(), 200, "health needs no token");
    let ok = client
        .post(url(server.local_addr().expect("a TCP service"), "/v1/predict"))
        .bearer_auth("s3cret-token")
        .body(image_bytes(1))
        .send()
        .await
        .expect("post");
    assert_eq!(ok.status().as_u16(), 200);
    let body: Value = ok.json().await.expect("json");
    assert_eq!(body["result"], expected(1));
}
