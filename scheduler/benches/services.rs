//! The portal's proxy to a service on leased cards against calling the service directly on its
//! node (issue 23): the proxy's cost.
//!
//! Starts the services world of `tests/services.rs` (a broker, a scheduler with the artifact
//! store, one agent with simulated GPUs keeping its tunnel to the portal; a classifier trained
//! on the lease and deployed as a private demo), then drives the demo's `suanli-job serve` two
//! ways with the same raw HTTP/1.1 keep-alive client: through the portal (TCP, the service's
//! origin in `Host`, the owner's API token: the proxy's lookup, authentication, the tunnel and
//! the agent) and directly on the node's Unix socket (as root, beside the agent). Rows:
//! - small JSON (`GET /v1/model`), `--clients` concurrent clients for `--seconds`;
//! - 5 MB uploads (`POST /v1/predict` with 5 MiB that is not an image: the service reads all of
//!   it and answers `BAD_IMAGE` without decoding, so the transport is what is measured);
//! - WebSocket round trips (`/v1/stream`, one small frame answered at a time, sequential).
//!
//! Needs root, `SUANLI_JOB_BINARY` (the `torch` build) and `SUANLI_CV_DATA`:
//! `SUANLI_JOB_BINARY=$CARGO_TARGET_DIR/debug/suanli-job SUANLI_CV_DATA=/var/tmp/suanli-cache/cv-data cargo bench -p suanli-scheduler --bench services -- --seconds 5 --clients 32`

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Where the requests go.
#[derive(Clone)]
enum Target {
    /// The portal's listener, with the service's origin as `Host` and the owner's token.
    Proxy { port: u16, host: String, token: String },
    /// The service's socket on the node.
    Direct(std::path::PathBuf),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Target {
    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        Ok(match self {
            Target::Proxy { port, .. } => {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", *port)).await?;
                tcp.set_nodelay(true)?;
                Box::new(tcp)
            }
            Target::Direct(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
        })
    }

    /// The request's head: the same for both targets but for where it is addressed.
    fn head(&self, method: &str, path: &str, length: usize) -> String {
        let (host, auth) = match self {
            Target::Proxy { host, token, .. } => (host.as_str(), format!("authorization: Bearer {token}\r\n")),
            Target::Direct(_) => ("localhost", String::new()),
        };
        format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n{auth}content-length: {length}\r\n\r\n")
    }
}

/// One request on a kept-alive connection; the answer's status (its body read and dropped).
async fn exchange(conn: &mut BufReader<Box<dyn Io>>, head: &[u8], body: &[u8]) -> std::io::Result<u16> {
    conn.get_mut().write_all(head).await?;
    conn.get_mut().write_all(body).await?;
    let mut line = String::new();
    conn.read_line(&mut line).await?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| std::io::Error::other(format!("status line {line:?}")))?;
    let (mut length, mut chunked) = (0usize, false);
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        let header = line.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if header.starts_with("transfer-encoding:") && header.contains("chunked") {
            chunked = true;
        }
    }
    if !chunked {
        let mut sink = vec![0u8; length];
        conn.read_exact(&mut sink).await?;
        return Ok(status);
    }
    loop {
        line.clear();
        conn.read_line(&mut line).await?;
        let size = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
        let mut sink = vec![0u8; size + 2];
        conn.read_exact(&mut sink).await?;
        if size == 0 {
            return Ok(status);
        }
    }
}

struct Load {
    requests: usize,
    failed: usize,
    latencies_ms: Vec<f64>,
    seconds: f64,
}

/// `clients` connections each sending the request back to back for `seconds`.
async fn load(target: &Target, method: &str, path: &str, body: Arc<Vec<u8>>, expect: u16, clients: u64, seconds: u64) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (target, stop, body) = (target.clone(), stop.clone(), body.clone());
            let head = target.head(method, path, body.len()).into_bytes();
            tokio::spawn(async move {
                let (mut latencies, mut failed) = (Vec::new(), 0usize);
                let mut conn = BufReader::new(target.connect().await.expect("connect"));
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match exchange(&mut conn, &head, &body).await {
                        Ok(status) if status == expect => latencies.push(t.elapsed().as_secs_f64() * 1e3),
                        Ok(_) => failed += 1,
                        Err(_) => {
                            failed += 1;
                            conn = BufReader::new(target.connect().await.expect("connect"));
                        }
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (mut latencies_ms, mut failed) = (Vec::new(), 0);
    for w in workers {
        let (l, f) = w.await.expect("worker");
        latencies_ms.extend(l);
        failed += f;
    }
    latencies_ms.sort_by(f64::total_cmp);
    Load { requests: latencies_ms.len(), failed, latencies_ms, seconds: started.elapsed().as_secs_f64() }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// Sequential WebSocket round trips: one small frame out, its answer back.
async fn round_trips(target: &Target, n: usize) -> Vec<f64> {
    let io = target.connect().await.expect("connect");
    let (host, auth) = match target {
        Target::Proxy { host, token, .. } => (host.clone(), Some(format!("Bearer {token}"))),
        Target::Direct(_) => ("localhost".to_owned(), None),
    };
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{host}/v1/stream")).expect("request");
    if let Some(auth) = auth {
        request.headers_mut().insert("authorization", auth.parse().expect("header"));
    }
    let (mut ws, _) = tokio_tungstenite::client_async(request, io).await.expect("websocket");
    let frame = vec![7u8; 64];
    let mut rtts = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        ws.send(tokio_tungstenite::tungstenite::Message::Binary(frame.clone().into())).await.expect("send");
        loop {
            match ws.next().await.expect("an answer").expect("frame") {
                tokio_tungstenite::tungstenite::Message::Text(_) => break,
                _ => continue,
            }
        }
        rtts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rtts.sort_by(f64::total_cmp);
    rtts
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (seconds, clients) = (arg("--seconds", 5), arg("--clients", 32));
    let stage = support::services::stage(true).await.ok_or_else(|| anyhow::anyhow!("needs root, SUANLI_JOB_BINARY and SUANLI_CV_DATA"))?;
    let view = stage.deploy("private").await;
    let id = view["service_id"].as_u64().expect("id");
    let url = view["url"].as_str().expect("url");
    let host = url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let proxy = Target::Proxy { port: stage.port, host, token: stage.token.clone() };
    let direct = Target::Direct(stage.w.dir.path().join("agent0/state/services").join(id.to_string()).join("g1-0.sock"));
    let upload = Arc::new((0..5u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect::<Vec<u8>>());

    println!("services on leased cards: the portal's proxy against the service directly ({clients} clients, {seconds} s per row)");
    println!("{:<34} {:>10} {:>9} {:>9} {:>7} {:>8}", "row", "req/s", "p50 ms", "p99 ms", "failed", "ratio");
    // The upload is refused as no image (400), after the service read all of it.
    for (name, method, path, body, expect) in
        [("small JSON (GET /v1/model)", "GET", "/v1/model", Arc::new(Vec::new()), 200), ("5 MB upload (POST /v1/predict)", "POST", "/v1/predict", upload, 400)]
    {
        let base = load(&direct, method, path, body.clone(), expect, clients, seconds).await;
        let through = load(&proxy, method, path, body, expect, clients, seconds).await;
        let rate = |l: &Load| l.requests as f64 / l.seconds;
        for (label, l, ratio) in [("direct", &base, None), ("through the portal", &through, Some(rate(&through) / rate(&base)))] {
            println!(
                "{:<34} {:>10.0} {:>9.2} {:>9.2} {:>7} {:>8}",
                format!("{name}, {label}"),
                rate(l),
                percentile(&l.latencies_ms, 0.5),
                percentile(&l.latencies_ms, 0.99),
                l.failed,
                ratio.map_or(String::new(), |r| format!("{r:.2}×"))
            );
        }
    }
    let n = 2000;
    let base = round_trips(&direct, n).await;
    let through = round_trips(&proxy, n).await;
    for (label, rtts, ratio) in [("direct", &base, None), ("through the portal", &through, Some(percentile(&through, 0.5) / percentile(&base, 0.5)))] {
        println!(
            "{:<34} {:>10} {:>9.3} {:>9.3} {:>7} {:>8}",
            format!("WebSocket RTT, {label}"),
            "",
            percentile(rtts, 0.5),
            percentile(rtts, 0.99),
            0,
            ratio.map_or(String::new(), |r| format!("{r:.2}×"))
        );
    }
    Ok(())
}
