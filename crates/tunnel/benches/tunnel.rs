//! What the tunnel costs: the same requests to a service on a Unix socket, sent directly (as
//! a process on the node would) and through a portal and an agent's tunnel (as a visitor's go),
//! the tunnel dialled in plain TCP and in TLS (a second portal with a tunnel port of its own),
//! in one process, printing a table and the ratios.
//!
//! `cargo bench -p suanli-tunnel --bench tunnel -- [--seconds 5] [--clients 32]`
//!
//! Rows: small JSON requests (requests/s, p50, p99, with `--clients` connections each sending
//! one request at a time), 5 MB uploads (the same, 4 clients), and WebSocket round trips (one
//! socket, 2,000 small messages, p50/p99). Both paths use one kept-alive HTTP/1.1 connection
//! per client; through the tunnel that connection is to the portal.

use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use suanli_tunnel::agent::{self, Address, Resolve};
use suanli_tunnel::portal::{self, Tunnel};
use suanli_tunnel::wire::{AgentError, TUNNEL_PATH};
use tokio::sync::watch;

struct One(std::path::PathBuf);

impl Resolve for One {
    async fn resolve(&self, _service: &str) -> Result<Address, AgentError> {
        Ok(Address::Unix(self.0.clone()))
    }
}

async fn accept(State(slot): State<watch::Sender<Option<Tunnel>>>, mut request: Request) -> Response {
    if let Some(refusal) = portal::version_refusal(request.headers()) {
        return refusal.into_response();
    }
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let Ok((tunnel, driver)) = Tunnel::handshake(upgraded).await else { return };
        slot.send_replace(Some(tunnel));
        driver.await;
    });
    portal::switching().into_response()
}

async fn proxy(State(slot): State<watch::Sender<Option<Tunnel>>>, Path((service, rest)): Path<(String, String)>, mut request: Request) -> Response {
    let Some(tunnel) = slot.borrow().clone() else { return StatusCode::SERVICE_UNAVAILABLE.into_response() };
    *request.uri_mut() = format!("/{rest}").parse().expect("path");
    match tunnel.forward(&service, request).await {
        Ok(response) => response.map(axum::body::Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(m)) = socket.recv().await {
        if matches!(m, Message::Text(_) | Message::Binary(_)) && socket.send(m).await.is_err() {
            break;
        }
    }
}

/// Where a client connects: the service's socket, or the portal (with the path prefix).
#[derive(Clone)]
enum Via {
    Direct(std::path::PathBuf),
    Portal(std::net::SocketAddr),
}

impl Via {
    fn path(&self, rest: &str) -> String {
        match self {
            Via::Direct(_) => rest.to_owned(),
            Via::Portal(_) => format!("/s/1{rest}"),
        }
    }

    async fn connect(&self) -> hyper::client::conn::http1::SendRequest<suanli_tunnel::Body> {
        macro_rules! handshake {
            ($io:expr) => {{
                let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new($io)).await.expect("handshake");
                tokio::spawn(conn);
                send
            }};
        }
        match self {
            Via::Direct(path) => handshake!(tokio::net::UnixStream::connect(path).await.expect("service")),
            Via::Portal(addr) => handshake!({
                let tcp = tokio::net::TcpStream::connect(addr).await.expect("portal");
                tcp.set_nodelay(true).expect("nodelay");
                tcp
            }),
        }
    }
}

/// `clients` connections sending `body` to `path` one at a time for `seconds`: requests/s and
/// the latencies, sorted.
async fn load(via: &Via, clients: usize, seconds: f64, path: &str, body: bytes::Bytes) -> (f64, Vec<Duration>) {
    let start = Instant::now();
    let until = start + Duration::from_secs_f64(seconds);
    let workers = (0..clients).map(|_| {
        let (via, body, path) = (via.clone(), body.clone(), via.path(path));
        tokio::spawn(async move {
            let mut send = via.connect().await;
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let t = Instant::now();
                let request = http::Request::post(&path).header("host", "bench").body(suanli_tunnel::full(body.clone())).expect("request");
                send.ready().await.expect("ready");
                let response = send.send_request(request).await.expect("response");
                assert_eq!(response.status(), StatusCode::OK);
                response.into_body().collect().await.expect("body");
                latencies.push(t.elapsed());
            }
            latencies
        })
    });
    let mut all = Vec::new();
    for w in futures::future::join_all(workers).await {
        all.extend(w.expect("worker"));
    }
    all.sort();
    (all.len() as f64 / start.elapsed().as_secs_f64(), all)
}

async fn websocket(url: &str, rounds: usize) -> Vec<Duration> {
    use tokio_tungstenite::tungstenite::Message as M;
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("websocket");
    let mut latencies = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        socket.send(M::text(format!("{{\"n\": {i}}}"))).await.expect("send");
        socket.next().await.expect("reply").expect("frame");
        latencies.push(t.elapsed());
    }
    latencies.sort();
    latencies
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted.get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1))).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn arg(name: &str, default: f64) -> f64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let (seconds, clients) = (arg("--seconds", 5.0), arg("--clients", 32.0) as usize);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("service.sock");
    let service = Router::new()
        .route("/json", post(|body: axum::body::Bytes| async move { axum::Json(serde_json::json!({"label": "cat", "score": 0.93, "bytes": body.len()})) }))
        .route("/upload", post(|body: axum::body::Bytes| async move { body.len().to_string() }))
        .route("/ws", get(|ws: WebSocketUpgrade| async move { ws.on_upgrade(echo) }))
        .layer(axum::extract::DefaultBodyLimit::disable());
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
    tokio::spawn(async move { axum::serve(listener, service).await.expect("service") });

    let addr = portal_with_agent(socket.clone(), false).await;
    let tls_addr = portal_with_agent(socket.clone(), true).await;

    let small = bytes::Bytes::from_static(br#"{"image": "cat.jpg", "top_k": 5}"#);
    let five_mb = bytes::Bytes::from(vec![7u8; 5 << 20]);
    let build = if cfg!(debug_assertions) { "debug build" } else { "release build" };
    println!("tunnel bench: {clients} clients, {seconds} s a row, {build}, one process (all parts share the machine's cores)");
    println!("{:<40} {:>12} {:>10} {:>10} {:>10}", "row", "requests/s", "p50 ms", "p99 ms", "vs direct");
    for (name, path, body, n) in [("small JSON", "/json", small, clients), ("5 MB upload", "/upload", five_mb, 4)] {
        let (direct_rps, direct) = load(&Via::Direct(socket.clone()), n, seconds, path, body.clone()).await;
        println!("{:<40} {:>12.0} {:>10.2} {:>10.2} {:>10}", format!("{name}, direct"), direct_rps, pct(&direct, 0.5), pct(&direct, 0.99), "");
        for (how, portal) in [("through the tunnel", addr), ("through the tunnel in TLS", tls_addr)] {
            let (tunnel_rps, tunnel) = load(&Via::Portal(portal), n, seconds, path, body.clone()).await;
            println!(
                "{:<40} {:>12.0} {:>10.2} {:>10.2} {:>9.2}×",
                format!("{name}, {how}"),
                tunnel_rps,
                pct(&tunnel, 0.5),
                pct(&tunnel, 0.99),
                tunnel_rps / direct_rps
            );
        }
    }
    // The service's WebSocket directly: it listens on a Unix socket, so the bench reaches it
    // through a loopback TCP relay of its own for the baseline (a relay costs a little, too).
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let relay_addr = relay.local_addr().expect("addr");
    let target = socket.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let mut outbound = tokio::net::UnixStream::connect(target).await.expect("service");
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let direct = websocket(&format!("ws://{relay_addr}/ws"), 2_000).await;
    println!("{:<40} {:>12} {:>10.3} {:>10.3} {:>10}", "WebSocket RTT, direct", "", pct(&direct, 0.5), pct(&direct, 0.99), "");
    for (how, portal) in [("tunnel", addr), ("tunnel in TLS", tls_addr)] {
        let tunnel = websocket(&format!("ws://{portal}/s/1/ws"), 2_000).await;
        println!(
            "{:<40} {:>12} {:>10.3} {:>10.3} {:>9.2}×",
            format!("WebSocket RTT, {how}"),
            "",
            pct(&tunnel, 0.5),
            pct(&tunnel, 0.99),
            pct(&tunnel, 0.5) / pct(&direct, 0.5)
        );
    }
}

/// A portal whose visitors' listener is plain HTTP and an agent that keeps its tunnel to it,
/// reaching the service on `socket`: dialled on the same listener, or with `tls` on a listener
/// of its own in TLS (as `--tunnel-listen` with a certificate); returns the visitors' address.
async fn portal_with_agent(socket: std::path::PathBuf, tls: bool) -> std::net::SocketAddr {
    let (tx, mut rx) = watch::channel(None);
    let app = Router::new().route(TUNNEL_PATH, get(accept)).route("/s/{service}/{*rest}", any(proxy)).with_state(tx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    // As the portal serves: small writes go out at once (no Nagle delay on requests' answers).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let tunnels = app.clone();
    tokio::spawn(async move { axum::serve(listener, app).await.expect("portal") });
    let (dial_to, trust) = if tls {
        let ca = suanli_pki::Ca::generate("bench CA").expect("CA");
        let issued = ca.server_certificate(&["localhost".into()]).expect("certificate");
        let config = suanli_artifacts::tls::server_config(issued.cert_pem.as_bytes(), issued.key_pem.as_bytes()).expect("TLS");
        let listener =
            suanli_artifacts::tls::TlsListener::new(tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"), config).expect("TLS listener");
        let tls_addr = axum::serve::Listener::local_addr(&listener).expect("addr");
        tokio::spawn(async move { axum::serve(listener, tunnels).await.expect("tunnel port") });
        (tls_addr, Some(suanli_tunnel::tls::PortalTrust::from_pem(ca.cert_pem().as_bytes()).expect("trust")))
    } else {
        (addr, None)
    };
    let resolve = One(socket);
    tokio::spawn(async move {
        let tcp = tokio::net::TcpStream::connect(dial_to).await.expect("dial");
        tcp.set_nodelay(true).expect("nodelay");
        let upgraded = match trust {
            Some(trust) => agent::dial(trust.connect(tcp, "localhost").await.expect("TLS"), &format!("localhost:{}", dial_to.port()), "ticket").await,
            None => agent::dial(tcp, &dial_to.to_string(), "ticket").await,
        }
        .expect("tunnel");
        let _ = agent::serve(upgraded, resolve).await;
    });
    rx.wait_for(Option::is_some).await.expect("tunnel");
    addr
}
