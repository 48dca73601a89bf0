//! Online inference service (SPEC §6): a trained model behind HTTP and WebSocket, with
//! concurrent requests and dynamic batching.
//!
//! # Batching
//!
//! Requests are decoded on the async side (on tokio's blocking pool) and the decoded images go
//! into one bounded FIFO queue. A single dedicated thread owns the [`BatchPredictor`] (libtorch
//! tensors are not `Sync`, and one model instance per GPU is what you want anyway). It takes
//! the first waiting image, then keeps collecting until it holds [`ServeConfig::max_batch`]
//! images or [`ServeConfig::max_wait_ms`] have passed since that first one was taken, runs
//! *one* [`BatchPredictor::predict_batch`], and answers every image through its own oneshot
//! channel. Images from different HTTP requests and from WebSocket streams share batches.
//!
//! A full queue is refused at once with 503 rather than waiting: under overload the client
//! (or its load balancer) can retry elsewhere, and memory stays bounded at `max_queue`
//! decoded images. A `/v1/predict/batch` request is admitted all-or-nothing.
//!
//! # Endpoints
//!
//! | Method | Path                | Body / messages                                     | Success |
//! |--------|---------------------|-----------------------------------------------------|---------|
//! | POST   | `/v1/predict`       | raw bytes of one JPEG/PNG/TIFF                      | `200 {"result": …, "batch_size": n, "batch": id}` |
//! | POST   | `/v1/predict/batch` | JSON `{"images": ["<base64>", …]}`, 1..=`4*max_batch` | `200 {"results": [… or null], "errors": [{"index", "code", "message"}]}` |
//! | GET    | `/v1/stream`        | WebSocket; client sends one binary message per encoded frame | one text reply per frame, in order: `{"frame": i, "result": …, "batch_size": n, "batch": id}` or `{"frame": i, "error": {…}}` |
//! | GET    | `/v1/model`         |                                                     | `200` the predictor's [`BatchPredictor::describe`] |
//! | GET    | `/v1/stats`         |                                                     | `200` [`ServeStats`] as JSON |
//! | GET    | `/v1/health`        |                                                     | `200 ok` |
//!
//! `batch` is the 0-based sequence number of the predictor call that produced the result, so a
//! client (or a test) can see which requests were batched together.
//!
//! # Errors
//!
//! Every HTTP error body is `{"error": {"code": "<CODE>", "message": "<human text>"}}`; on the
//! WebSocket the same object comes as `"error"` of the frame's reply.
//!
//! | HTTP | Code              | When |
//! |------|-------------------|------|
//! | 401  | `UNAUTHENTICATED` | the service has a token ([`ServeConfig::bearer_token`]) and the request did not send it |
//! | 400  | `EMPTY_BODY`      | `/v1/predict` with no bytes; an empty image in a batch or stream |
//! | 400  | `BAD_IMAGE`       | not JPEG/PNG/TIFF, or corrupt; the message is the decoder's reason |
//! | 400  | `BAD_BASE64`      | a batch entry that is not valid base64 (per index) |
//! | 400  | `BAD_JSON`        | `/v1/predict/batch` body is not `{"images": [...]}` |
//! | 400  | `EMPTY_BATCH`     | `/v1/predict/batch` with no images |
//! | 400  | `TOO_MANY_IMAGES` | more than `4 * max_batch` images in one batch request |
//! | 400  | `TEXT_MESSAGE`    | WebSocket only: a text message; the stream goes on (no frame index is used up) |
//! | 404  | `NOT_FOUND`       | unknown path |
//! | 413  | `TOO_LARGE`       | body over `max_body_bytes`, or image dimensions over [`ServeConfig::limits`] |
//! | 500  | `PREDICT_FAILED`  | the predictor returned an error (or panicked, or returned the wrong number of results); every request in that batch gets it |
//! | 503  | `QUEUE_FULL`      | the queue already holds `max_queue` images |
//! | 503  | `SHUTTING_DOWN`   | the server is stopping |
//!
//! In a batch request, per-image problems (`BAD_BASE64`, `EMPTY_BODY`, `BAD_IMAGE`,
//! `TOO_LARGE`) are listed by index in a 200 answer and the other images are still scored;
//! `PREDICT_FAILED`, `QUEUE_FULL` and `SHUTTING_DOWN` fail the whole request.
//!
//! # Shutdown
//!
//! [`Server::shutdown`] stops accepting connections, lets in-flight HTTP requests finish
//! (their images still get predicted), sends open WebSocket streams a 1001 close, then stops
//! the predictor thread once its queue is drained. Dropping the [`Server`] starts the same
//! shutdown without waiting for it.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures::stream::FuturesOrdered;
use futures::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::{oneshot, watch};

use crate::image::Image;
use crate::intake::{load_bytes, IntakeError, IntakeLimits};

/// A model that scores a batch of decoded images at once. Runs on one dedicated thread
/// (libtorch tensors aren't `Sync`), so `&mut self` is fine.
pub trait BatchPredictor: Send + 'static {
    /// One JSON result per image, in order. An `Err` fails the whole batch (every request in it
    /// gets a 500 with the message).
    fn predict_batch(&mut self, images: Vec<Image>) -> Result<Vec<Value>, String>;
    /// Short description for `GET /v1/model` (name, classes, input shape...). Called once, at
    /// start-up, before the predictor moves to its thread.
    fn describe(&self) -> Value;
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Most images handed to one `predict_batch`.
    pub max_batch: usize,
    /// How long the predictor thread waits for a batch to fill after taking its first image.
    pub max_wait_ms: u64,
    /// Most decoded images waiting for the predictor; beyond it requests get 503 `QUEUE_FULL`.
    pub max_queue: usize,
    /// Largest request body (and WebSocket message) accepted, in bytes.
    pub max_body_bytes: usize,
    /// Decoding bounds. Tighter than intake's defaults: a service decodes many images at once
    /// and holds `max_queue` of them, at 12 bytes a pixel.
    pub limits: IntakeLimits,
    /// When set, every endpoint but `/v1/health` needs `Authorization: Bearer <this>` (401
    /// `UNAUTHENTICATED` otherwise, before the body is read). Not part of a spec: the `serve`
    /// task takes it from `SUANLI_SERVE_TOKEN`, so it never lands in a job's recorded spec.
    #[serde(skip)]
    pub bearer_token: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            max_batch: 32,
            max_wait_ms: 5,
            max_queue: 1024,
            max_body_bytes: 32 << 20,
            limits: IntakeLimits { max_width: 8192, max_height: 8192, max_pixels: 16 << 20, max_file_bytes: 32 << 20 },
            bearer_token: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid serve config: {0}")]
    InvalidConfig(String),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("could not start the predictor thread: {0}")]
    Thread(std::io::Error),
    #[error("the server task failed: {0}")]
    Task(String),
}

/// Counters since start-up, as returned by `GET /v1/stats` and [`Server::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServeStats {
    /// Prediction requests received: each `/v1/predict`, each `/v1/predict/batch`, each
    /// WebSocket frame (good or bad).
    pub requests: u64,
    /// `predict_batch` calls.
    pub batches: u64,
    /// Images handed to the predictor (the sum of all batch sizes).
    pub images: u64,
    pub largest_batch: u64,
    /// Requests (and stream frames) answered with an error of any kind, `QUEUE_FULL` included.
    pub errors: u64,
    /// Of those, refused because the queue was full.
    pub queue_full: u64,
    /// Images waiting for the predictor right now.
    pub queue_depth: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    batches: AtomicU64,
    images: AtomicU64,
    largest_batch: AtomicU64,
    errors: AtomicU64,
    queue_full: AtomicU64,
}

/// The result of one image.
#[derive(Clone, Debug)]
struct Prediction {
    value: Value,
    batch_size: usize,
    batch: u64,
}

type Reply = Result<Prediction, String>;

struct Job {
    image: Image,
    reply: oneshot::Sender<Reply>,
}

struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// Why an image was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubmitError {
    Full,
    Closed,
}

/// The bounded queue between the async handlers and the predictor thread, plus the counters.
/// A mutex and condvar rather than a channel: batch requests need all-or-nothing admission,
/// and the thread needs "wait until this deadline for more".
struct Batcher {
    state: Mutex<QueueState>,
    ready: Condvar,
    capacity: usize,
    counters: Counters,
}

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Nothing panics while holding this lock (predictions run outside it), but if something
        // ever did, the queue itself is still consistent: keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&self, images: Vec<Image>) -> Result<Vec<oneshot::Receiver<Reply>>, SubmitError> {
        let mut state = self.lock();
        if state.closed {
            return Err(SubmitError::Closed);
        }
        if state.jobs.len() + images.len() > self.capacity {
            return Err(SubmitError::Full);
        }
        let receivers = images
            .into_iter()
            .map(|image| {
                let (reply, rx) = oneshot::channel();
                state.jobs.push_back(Job { image, reply });
                rx
            })
            .collect();
        drop(state);
        self.ready.notify_one();
        Ok(receivers)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    fn stats(&self) -> ServeStats {
        let c = &self.counters;
        ServeStats {
            requests: c.requests.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            images: c.images.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            queue_full: c.queue_full.load(Ordering::Relaxed),
            queue_depth: self.lock().jobs.len() as u64,
        }
    }

    /// The next batch: blocks for the first job, then collects until `max_batch` or the
    /// deadline. `None` once closed and drained.
    fn next_batch(&self, max_batch: usize, max_wait: Duration) -> Option<Vec<Job>> {
        let mut state = self.lock();
        while state.jobs.is_empty() {
            if state.closed {
                return None;
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        let deadline = Instant::now() + max_wait;
        let mut batch = Vec::with_capacity(max_batch);
        while batch.len() < max_batch {
            if let Some(job) = state.jobs.pop_front() {
                // A client that went away (dropped connection) needs no prediction.
                if !job.reply.is_closed() {
                    batch.push(job);
                }
                continue;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                break;
            }
            state = self.ready.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(batch)
    }
}

fn run_predictor(batcher: &Batcher, mut predictor: Box<dyn BatchPredictor>, max_batch: usize, max_wait: Duration) {
    let mut batch_no: u64 = 0;
    while let Some(jobs) = batcher.next_batch(max_batch, max_wait) {
        if jobs.is_empty() {
            continue;
        }
        let n = jobs.len();
        let (images, replies): (Vec<Image>, Vec<oneshot::Sender<Reply>>) = jobs.into_iter().map(|j| (j.image, j.reply)).unzip();
        let c = &batcher.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.images.fetch_add(n as u64, Ordering::Relaxed);
        c.largest_batch.fetch_max(n as u64, Ordering::Relaxed);
        // A panicking model must not take the thread down with it: every later request would
        // queue forever. Its state after a panic is the model's business; we keep calling it.
        let outcome = match catch_unwind(AssertUnwindSafe(|| predictor.predict_batch(images))) {
            Ok(Ok(values)) if values.len() == n => Ok(values),
            Ok(Ok(values)) => Err(format!("the model returned {} results for {n} images", values.len())),
            Ok(Err(message)) => Err(message),
            Err(panic) => Err(format!("the model panicked: {}", panic_message(&*panic))),
        };
        match outcome {
            Ok(values) => {
                for (reply, value) in replies.into_iter().zip(values) {
                    // The receiver may be gone (client disconnected); nothing to tell it.
                    let _ = reply.send(Ok(Prediction { value, batch_size: n, batch: batch_no }));
                }
            }
            Err(message) => {
                tracing::warn!(batch = batch_no, size = n, %message, "predict_batch failed");
                for reply in replies {
                    let _ = reply.send(Err(message.clone()));
                }
            }
        }
        batch_no += 1;
    }
    tracing::debug!(batches = batch_no, "predictor thread finished");
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// An error answer: status, machine-readable code, human message.
#[derive(Debug, Clone)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    fn body(&self) -> Value {
        json!({ "code": self.code, "message": self.message })
    }

    fn from_intake(e: &IntakeError) -> Self {
        match e {
            IntakeError::Empty { .. } => ApiError::new(StatusCode::BAD_REQUEST, "EMPTY_BODY", "empty image"),
            IntakeError::TooLarge { .. } => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "TOO_LARGE", e.to_string()),
            _ => ApiError::new(StatusCode::BAD_REQUEST, "BAD_IMAGE", e.to_string()),
        }
    }

    fn from_submit(e: SubmitError) -> Self {
        match e {
            SubmitError::Full => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "QUEUE_FULL", "the prediction queue is full; retry later"),
            SubmitError::Closed => shutting_down(),
        }
    }

    fn predict_failed(message: String) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "PREDICT_FAILED", message)
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN", "the server is shutting down")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.body() }))).into_response()
    }
}

/// What every handler shares.
struct App {
    batcher: Arc<Batcher>,
    config: ServeConfig,
    /// Decodes in flight at once: each holds a decoded image (up to `limits.max_pixels` × 12
    /// bytes), so this and the queue bound the memory a burst of requests can take.
    decodes: tokio::sync::Semaphore,
    model: Value,
    shutdown: watch::Receiver<bool>,
}

type AppState = Arc<App>;

impl App {
    fn count_error(&self, e: &ApiError) {
        self.batcher.counters.errors.fetch_add(1, Ordering::Relaxed);
        if e.code == "QUEUE_FULL" {
            self.batcher.counters.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Decodes off the async threads: a large PNG takes long enough to stall other requests.
    async fn decode(&self, bytes: Bytes) -> Result<Image, ApiError> {
        let limits = self.config.limits.clone();
        let _permit = self.decodes.acquire().await.map_err(|_| shutting_down())?;
        let decoded = tokio::task::spawn_blocking(move || load_bytes("image", &bytes, &limits))
            .await
            // Only a panic escaping the decoder (or a runtime going down) gets here.
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "BAD_IMAGE", format!("the decoder failed on this image: {e}")))?;
        decoded.map(|loaded| loaded.image).map_err(|e| ApiError::from_intake(&e))
    }

    /// Decodes and queues one image; the returned future waits for its prediction.
    async fn predict_one(self: Arc<Self>, bytes: Bytes) -> Result<Prediction, ApiError> {
        if bytes.is_empty() {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "EMPTY_BODY", "the request has no image bytes"));
        }
        let image = self.decode(bytes).await?;
        let mut receivers = self.batcher.submit(vec![image]).map_err(ApiError::from_submit)?;
        let rx = receivers.pop().ok_or_else(shutting_down)?;
        await_reply(rx).await
    }
}

async fn await_reply(rx: oneshot::Receiver<Reply>) -> Result<Prediction, ApiError> {
    match rx.await {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(message)) => Err(ApiError::predict_failed(message)),
        // Only when the predictor thread is gone without answering.
        Err(_) => Err(shutting_down()),
    }
}

fn body_error(rejection: &axum::extract::rejection::BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "TOO_LARGE", rejection.body_text())
    } else {
        ApiError::new(StatusCode::BAD_REQUEST, "BAD_BODY", rejection.body_text())
    }
}

async fn predict(State(app): State<AppState>, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Response {
    app.batcher.counters.requests.fetch_add(1, Ordering::Relaxed);
    let outcome = match body {
        Ok(bytes) => app.clone().predict_one(bytes).await,
        Err(rejection) => Err(body_error(&rejection)),
    };
    match outcome {
        Ok(p) => Json(json!({ "result": p.value, "batch_size": p.batch_size, "batch": p.batch })).into_response(),
        Err(e) => {
            app.count_error(&e);
            e.into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    images: Vec<String>,
}

async fn predict_batch(State(app): State<AppState>, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Response {
    app.batcher.counters.requests.fetch_add(1, Ordering::Relaxed);
    match predict_batch_inner(&app, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => {
            app.count_error(&e);
            e.into_response()
        }
    }
}

async fn predict_batch_inner(app: &Arc<App>, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Result<Value, ApiError> {
    let bytes = body.map_err(|r| body_error(&r))?;
    // Parsed by hand rather than with the `Json` extractor so a missing Content-Type is not
    // an error and every failure has our error shape.
    let request: BatchRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "BAD_JSON", format!("expected {{\"images\": [\"<base64>\", ...]}}: {e}")))?;
    let max = app.config.max_batch.saturating_mul(4);
    if request.images.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "EMPTY_BATCH", "\"images\" is empty"));
    }
    if request.images.len() > max {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "TOO_MANY_IMAGES", format!("{} images, at most {max} per request", request.images.len())));
    }
    let n = request.images.len();
    // Decode all images concurrently; each failure is reported by its index.
    let decoded = futures::future::join_all(request.images.into_iter().map(|b64| async move {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "BAD_BASE64", format!("not base64: {e}")))?;
        if raw.is_empty() {
            return Err(ApiError::new(StatusCode::BAD_REQUEST, "EMPTY_BODY", "empty image"));
        }
        app.decode(Bytes::from(raw)).await
    }))
    .await;
    let mut errors = Vec::new();
    let mut good_index = Vec::new();
    let mut good = Vec::new();
    for (index, d) in decoded.into_iter().enumerate() {
        match d {
            Ok(image) => {
                good_index.push(index);
                good.push(image);
            }
            Err(e) => errors.push(json!({ "index": index, "code": e.code, "message": e.message })),
        }
    }
    let mut results = vec![Value::Null; n];
    if !good.is_empty() {
        let receivers = app.batcher.submit(good).map_err(ApiError::from_submit)?;
        let replies = futures::future::join_all(receivers.into_iter().map(await_reply)).await;
        for (index, reply) in good_index.into_iter().zip(replies) {
            let p = reply?;
            results[index] = json!({ "result": p.value, "batch_size": p.batch_size, "batch": p.batch });
        }
    }
    Ok(json!({ "results": results, "errors": errors }))
}

async fn model(State(app): State<AppState>) -> Json<Value> {
    Json(app.model.clone())
}

async fn stats(State(app): State<AppState>) -> Json<ServeStats> {
    Json(app.batcher.stats())
}

async fn health() -> &'static str {
    "ok"
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such endpoint; see /v1/health, /v1/model, /v1/predict, /v1/stream")
}

async fn stream(State(app): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let limit = app.config.max_body_bytes;
    ws.max_message_size(limit).max_frame_size(limit).on_upgrade(move |socket| run_stream(app, socket))
}

/// Frames whose replies are still outstanding, per stream. When reached the server stops
/// reading the socket, so a fast camera cannot queue unbounded work (TCP pushes back instead).
const MAX_IN_FLIGHT_FRAMES: usize = 256;

type PendingReply = Pin<Box<dyn Future<Output = Value> + Send>>;

async fn run_stream(app: AppState, socket: WebSocket) {
    let (mut sink, mut source) = socket.split();
    let mut shutdown = app.shutdown.clone();
    // Replies complete out of order (different batches); FuturesOrdered yields them in the
    // order the frames arrived, which is the order the client needs.
    let mut pending: FuturesOrdered<PendingReply> = FuturesOrdered::new();
    let mut next_frame: u64 = 0;
    let mut client_closed = false;
    loop {
        tokio::select! {
            message = source.next(), if !client_closed && pending.len() < MAX_IN_FLIGHT_FRAMES => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    let frame = next_frame;
                    next_frame += 1;
                    app.batcher.counters.requests.fetch_add(1, Ordering::Relaxed);
                    let app = app.clone();
                    pending.push_back(Box::pin(async move {
                        match app.clone().predict_one(bytes).await {
                            Ok(p) => json!({ "frame": frame, "result": p.value, "batch_size": p.batch_size, "batch": p.batch }),
                            Err(e) => {
                                app.count_error(&e);
                                json!({ "frame": frame, "error": e.body() })
                            }
                        }
                    }));
                }
                Some(Ok(Message::Text(_))) => {
                    let e = ApiError::new(StatusCode::BAD_REQUEST, "TEXT_MESSAGE", "send each frame as a binary message of image bytes");
                    app.count_error(&e);
                    pending.push_back(Box::pin(futures::future::ready(json!({ "error": e.body() }))));
                }
                // Pings are answered by the WebSocket layer itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // The peer is gone: replies can no longer be sent (the protocol forbids data
                // after a close), so outstanding ones are dropped. The close reply goes out
                // when the socket is flushed/dropped.
                Some(Ok(Message::Close(_))) | None => client_closed = true,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "websocket read failed");
                    return;
                }
            },
            Some(reply) = pending.next(), if !pending.is_empty() => {
                if let Err(e) = sink.send(Message::Text(reply.to_string().into())).await {
                    tracing::debug!(error = %e, "websocket write failed");
                    return;
                }
            }
            // Err (the Server handle gone) means stop as well.
            // (The guard `wait_for` returns is not Send, hence the wrapper dropping it.)
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; }, if !client_closed => {
                let close = CloseFrame { code: 1001, reason: "server shutting down".into() };
                let _ = sink.send(Message::Close(Some(close))).await;
                return;
            }
        }
        if client_closed {
            // Completes the closing handshake tungstenite queued when the peer's close came.
            let _ = sink.close().await;
            return;
        }
    }
}

/// All endpoints over one shared [`App`]; the body limit also covers the batch endpoint's JSON.
fn router(app: AppState) -> Router {
    let body_limit = app.config.max_body_bytes;
    let mut routes = Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/predict/batch", post(predict_batch))
        .route("/v1/stream", get(stream))
        .route("/v1/model", get(model))
        .route("/v1/stats", get(stats));
    if let Some(token) = &app.config.bearer_token {
        let expected: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        routes = routes.route_layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| async move {
            // Compared as digests: equal-length values, so the comparison's time says nothing
            // about how much of a guess was right.
            let sent = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
            let given: Option<[u8; 32]> = sent.map(|s| Sha256::digest(s.as_bytes()).into());
            if given != Some(expected) {
                return ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "send Authorization: Bearer <the service's token>").into_response();
            }
            next.run(request).await
        }));
    }
    routes.route("/v1/health", get(health)).fallback(not_found).layer(DefaultBodyLimit::max(body_limit)).with_state(app)
}

/// Where a service listens: a TCP address, or a Unix socket (as a lease's service does, in a
/// directory only the lease's account may enter, so that only the lease reaches it).
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl From<tokio::net::TcpListener> for Listener {
    fn from(listener: tokio::net::TcpListener) -> Self {
        Listener::Tcp(listener)
    }
}

impl From<tokio::net::UnixListener> for Listener {
    fn from(listener: tokio::net::UnixListener) -> Self {
        Listener::Unix(listener)
    }
}

impl Listener {
    /// `unix:<path>` or a TCP address (`127.0.0.1:8500`). A stale socket file at the path (left
    /// by an earlier run) is replaced; any other file there is an error.
    ///
    /// `fd:<n>`: a listening Unix socket this process was started with (socket activation: the
    /// supplier's agent binds it where only the agent reaches it and hands it over, so no path
    /// the service could change ever lies between the agent and the service).
    pub async fn bind(listen: &str) -> std::io::Result<Listener> {
        if let Some(fd) = listen.strip_prefix("fd:") {
            let fd: i32 = fd.parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{listen}: not a descriptor number")))?;
            return inherited(fd);
        }
        match listen.strip_prefix("unix:") {
            Some(path) => {
                use std::os::unix::fs::FileTypeExt as _;
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(tokio::net::UnixListener::bind(path)?))
            }
            None => Ok(Listener::Tcp(tokio::net::TcpListener::bind(listen).await?)),
        }
    }

    fn bound(&self) -> std::io::Result<Bound> {
        Ok(match self {
            Listener::Tcp(l) => Bound::Tcp(l.local_addr()?),
            Listener::Unix(l) => Bound::Unix(l.local_addr()?.as_pathname().map(std::path::Path::to_path_buf).unwrap_or_default()),
        })
    }
}

/// The listening Unix socket at descriptor `fd`, which this process was started with.
#[allow(unsafe_code)]
fn inherited(fd: i32) -> std::io::Result<Listener> {
    use std::os::fd::FromRawFd as _;
    // Descriptors 0-2 are the standard streams, never a listener handed over.
    if fd < 3 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("fd:{fd} is a standard stream")));
    }
    // Only a descriptor that is open is taken over (ownership of a closed number could later be
    // claimed by another file the process opens).
    if !std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("fd:{fd} is not open")));
    }
    // SAFETY: the descriptor is open (checked above) and was given to this process at its start
    // to own; nothing else in the process uses it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    // A descriptor that is not a Unix socket fails here.
    listener.local_addr()?;
    // A copy that is close-on-exec again (the handed-over number closes with the original), so
    // what this process starts does not inherit the listener.
    let listener = listener.try_clone()?;
    listener.set_nonblocking(true)?;
    Ok(Listener::Unix(tokio::net::UnixListener::from_std(listener)?))
}

/// Where a started service listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Tcp(addr) => write!(f, "{addr}"),
            Bound::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A running service. Dropping it starts a graceful shutdown in the background.
pub struct Server {
    addr: Bound,
    batcher: Arc<Batcher>,
    shutdown: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    /// Where it listens.
    pub fn bound(&self) -> &Bound {
        &self.addr
    }

    /// Its TCP address; `None` on a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self.addr {
            Bound::Tcp(addr) => Some(addr),
            Bound::Unix(_) => None,
        }
    }

    pub fn stats(&self) -> ServeStats {
        self.batcher.stats()
    }

    /// Stops accepting connections, finishes in-flight requests, closes streams, drains and
    /// stops the predictor thread; returns when all of that is done.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        let _ = self.shutdown.send(true);
        match self.task.take() {
            Some(task) => task.await.map_err(|e| ServeError::Task(e.to_string()))?,
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The background task sees this and winds everything down on its own.
        let _ = self.shutdown.send(true);
    }
}

/// Starts the service on `listener`: the predictor thread and the HTTP/WebSocket server.
/// Must be called inside a tokio runtime.
pub async fn serve(listener: impl Into<Listener>, predictor: Box<dyn BatchPredictor>, config: ServeConfig) -> Result<Server, ServeError> {
    let listener = listener.into();
    if config.max_batch == 0 {
        return Err(ServeError::InvalidConfig("max_batch must be at least 1".into()));
    }
    if config.max_queue == 0 {
        return Err(ServeError::InvalidConfig("max_queue must be at least 1".into()));
    }
    if config.max_body_bytes == 0 {
        return Err(ServeError::InvalidConfig("max_body_bytes must be at least 1".into()));
    }
    if config.max_wait_ms > 10_000 {
        return Err(ServeError::InvalidConfig("max_wait_ms: at most 10000".into()));
    }
    let addr = listener.bound()?;
    let model = predictor.describe();
    let batcher = Arc::new(Batcher {
        state: Mutex::new(QueueState { jobs: VecDeque::new(), closed: false }),
        ready: Condvar::new(),
        capacity: config.max_queue,
        counters: Counters::default(),
    });
    let (max_batch, max_wait) = (config.max_batch, Duration::from_millis(config.max_wait_ms));
    let thread_batcher = batcher.clone();
    let predictor_thread = std::thread::Builder::new()
        .name("suanli-predictor".into())
        .spawn(move || run_predictor(&thread_batcher, predictor, max_batch, max_wait))
        .map_err(ServeError::Thread)?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let decodes = tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()) * 2);
    let app = Arc::new(App { batcher: batcher.clone(), config, decodes, model, shutdown: shutdown_rx.clone() });
    let routes = router(app);
    let mut signal = shutdown_rx;
    let task_batcher = batcher.clone();
    let task_addr = addr.clone();
    let task = tokio::spawn(async move {
        // Err means the Server handle is gone, which also means stop.
        let stop = async move {
            let _ = signal.wait_for(|stop| *stop).await;
        };
        let served = match listener {
            Listener::Tcp(l) => axum::serve(l, routes).with_graceful_shutdown(stop).await,
            Listener::Unix(l) => axum::serve(l, routes).with_graceful_shutdown(stop).await,
        };
        let addr = task_addr;
        // HTTP requests are all answered now; streams got their close. Let the predictor
        // finish what is queued and exit.
        task_batcher.close();
        let joined = tokio::task::spawn_blocking(move || predictor_thread.join()).await;
        tracing::info!(%addr, "inference server stopped");
        served?;
        match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ServeError::Task("the predictor thread panicked".into())),
            Err(e) => Err(ServeError::Task(e.to_string())),
        }
    });
    tracing::info!(%addr, max_batch, max_wait_ms = max_wait.as_millis() as u64, "inference server listening");
    Ok(Server { addr, batcher, shutdown: shutdown_tx, task: Some(task) })
}
