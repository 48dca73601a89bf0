//! The tunnel end to end on real sockets: a service on a Unix socket (as a lease's service
//! listens), an agent that dials a portal over TCP and serves its requests, and a portal that
//! forwards visitors' HTTP requests and WebSockets through the tunnel. Visitors try to name
//! another service, agents try without a ticket or with another version.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::Router;
use futures::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use suanli_tunnel::agent::{self, Address, Resolve};
use suanli_tunnel::portal::{self, Tunnel};
use suanli_tunnel::wire::{AgentError, AGENT_ERROR_HEADER, TUNNEL_PATH};
use suanli_tunnel::TunnelError;
use tokio::sync::{watch, Notify};

const TICKET: &str = "ticket-of-node-1";
const WAIT: Duration = Duration::from_secs(20);

/// The service, as a lease would run it: echo, hash a streamed upload, stream a response in two
/// parts (the second when the test says), and a WebSocket echo.
fn service(release: Arc<Notify>) -> Router {
    Router::new()
        .route(
            "/echo",
            post(|headers: HeaderMap, body: axum::body::Bytes| async move {
                let seen: Vec<String> = headers.keys().map(|k| k.as_str().to_owned()).filter(|k| k.starts_with("suanli-")).collect();
                axum::Json(serde_json::json!({"body": String::from_utf8_lossy(&body), "suanli_headers": seen, "host": headers.get("host").and_then(|h| h.to_str().ok())}))
            }),
        )
        .route(
            "/hash",
            post(|body: axum::body::Body| async move {
                let mut stream = body.into_data_stream();
                let (mut hash, mut len) = (Sha256::new(), 0usize);
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.expect("upload chunk");
                    len += chunk.len();
                    hash.update(&chunk);
                }
                format!("{len} {}", hex::encode(hash.finalize()))
            }),
        )
        .route(
            "/stream",
            get(move || {
                let release = release.clone();
                async move {
                    let parts = futures::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"first\n")) }).chain(futures::stream::once(async move {
                        release.notified().await;
                        Ok(axum::body::Bytes::from_static(b"second\n"))
                    }));
                    axum::body::Body::from_stream(parts)
                }
            }),
        )
        .route("/ws", get(|ws: WebSocketUpgrade| async move { ws.max_message_size(4 << 20).on_upgrade(echo) }))
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        let reply = match message {
            Message::Text(t) => Message::Text(t),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}

/// The agent's table: service 7 listens on the socket, service 8 is known but not listening.
struct Services {
    socket: std::path::PathBuf,
    dead: std::path::PathBuf,
}

impl Resolve for Services {
    async fn resolve(&self, service: &str) -> Result<Address, AgentError> {
        match service {
            "7" => Ok(Address::Unix(self.socket.clone())),
            "8" => Ok(Address::Unix(self.dead.clone())),
            _ => Err(AgentError::UnknownService),
        }
    }

    /// The agent's own answer to the portal's control requests: what it was asked.
    async fn control(&self, request: axum::http::Request<suanli_tunnel::Body>) -> axum::http::Response<suanli_tunnel::Body> {
        let named = request.headers().keys().filter(|k| k.as_str().starts_with("suanli-")).count();
        let body = http_body_util::BodyExt::collect(request.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
        axum::http::Response::new(suanli_tunnel::full(format!("control {} answered ({named} tunnel headers)", String::from_utf8_lossy(&body))))
    }
}

/// A portal that accepts one agent's tunnel and forwards `/s/{service}/…` through it.
#[derive(Clone)]
struct Portal {
    tunnel: watch::Sender<Option<Tunnel>>,
}

async fn accept_tunnel(State(portal): State<Portal>, mut request: Request) -> Response {
    if let Some(refusal) = portal::version_refusal(request.headers()) {
        return refusal.into_response();
    }
    if request.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TICKET}")) {
        return (StatusCode::UNAUTHORIZED, "no valid ticket").into_response();
    }
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let Ok((tunnel, driver)) = Tunnel::handshake(upgraded).await else { return };
        portal.tunnel.send_replace(Some(tunnel));
        driver.await;
    });
    portal::switching().into_response()
}

async fn proxy(State(portal): State<Portal>, Path((service, rest)): Path<(String, String)>, mut request: Request) -> Response {
    let Some(tunnel) = portal.tunnel.borrow().clone() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no agent").into_response();
    };
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    *request.uri_mut() = format!("/{rest}{query}").parse().expect("a path");
    match tunnel.forward(&service, request).await {
        Ok(response) => response.map(axum::body::Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

struct World {
    url: String,
    addr: std::net::SocketAddr,
    release: Arc<Notify>,
    tunnel: watch::Receiver<Option<Tunnel>>,
    agent: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("service.sock");
    let release = Arc::new(Notify::new());
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind the service");
    let app = service(release.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("service") });

    let (tx, rx) = watch::channel(None);
    let portal = Portal { tunnel: tx };
    let app = Router::new().route(TUNNEL_PATH, get(accept_tunnel)).route("/s/{service}/{*rest}", any(proxy)).with_state(portal);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the portal");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("portal") });

    let services = Services { socket, dead: dir.path().join("nobody.sock") };
    let agent = tokio::spawn(async move {
        let io = tokio::net::TcpStream::connect(addr).await.expect("dial the portal");
        io.set_nodelay(true).expect("nodelay");
        let upgraded = agent::dial(io, &addr.to_string(), TICKET).await.expect("the tunnel");
        let _ = agent::serve(upgraded, services).await;
    });
    let mut tunnel = rx.clone();
    tokio::time::timeout(WAIT, tunnel.wait_for(Option::is_some)).await.expect("the agent's tunnel in time").expect("tunnel");
    World { url: format!("http://{addr}"), addr, release, tunnel: rx, agent, _dir: dir }
}

#[tokio::test]
async fn a_request_reaches_the_service_the_portal_names_and_no_other() {
    let w = world().await;
    let client = reqwest::Client::new();
    // The visitor names service 8 in the tunnel's own header: the portal's choice (7) stands.
    let response = client.post(format!("{}/s/7/echo", w.url)).header("suanli-service", "8").body("hello").send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["body"], "hello");
    assert_eq!(body["suanli_headers"], serde_json::json!([]), "the service sees none of the tunnel's headers");
    assert_eq!(body["host"], "localhost");
}

#[tokio::test]
async fn a_request_naming_the_control_service_is_the_agents_own_to_answer() {
    let w = world().await;
    let response =
        reqwest::Client::new().put(format!("{}/s/{}/v1/services/7", w.url, suanli_tunnel::wire::CONTROL_SERVICE)).body("spec").send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get(AGENT_ERROR_HEADER).is_none());
    assert_eq!(response.text().await.expect("text"), "control spec answered (0 tunnel headers)", "answered by the agent, not forwarded");
}

#[tokio::test]
async fn a_large_upload_streams_through_whole() {
    let w = world().await;
    let upload: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let want = format!("{} {}", upload.len(), hex::encode(Sha256::digest(&upload)));
    let response = reqwest::Client::new().post(format!("{}/s/7/hash", w.url)).body(upload).send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.expect("text"), want);
}

#[tokio::test]
async fn a_streamed_answer_arrives_as_the_service_writes_it() {
    let w = world().await;
    let mut response = reqwest::Client::new().get(format!("{}/s/7/stream", w.url)).send().await.expect("send");
    // The first part arrives while the service still holds back the second.
    let first = tokio::time::timeout(WAIT, response.chunk()).await.expect("the first part in time").expect("chunk");
    assert_eq!(first.as_deref(), Some(&b"first\n"[..]));
    w.release.notify_one();
    let second = tokio::time::timeout(WAIT, response.chunk()).await.expect("the second part in time").expect("chunk");
    assert_eq!(second.as_deref(), Some(&b"second\n"[..]));
}

#[tokio::test]
async fn a_websocket_crosses_the_tunnel() {
    let w = world().await;
    let (mut socket, answer) = tokio_tungstenite::connect_async(format!("ws://{}/s/7/ws", w.addr)).await.expect("a WebSocket through the portal");
    assert_eq!(answer.status(), StatusCode::SWITCHING_PROTOCOLS);
    use tokio_tungstenite::tungstenite::Message as M;
    socket.send(M::text("ping")).await.expect("send");
    assert_eq!(socket.next().await.expect("reply").expect("frame"), M::text("ping"));
    let big: Vec<u8> = (0..(1u32 << 20)).map(|i| i as u8).collect();
    socket.send(M::binary(big.clone())).await.expect("send");
    assert_eq!(socket.next().await.expect("reply").expect("frame"), M::binary(big));
    socket.close(None).await.expect("close");
}

#[tokio::test]
async fn many_requests_share_the_tunnel() {
    let w = world().await;
    let client = reqwest::Client::new();
    let answers = futures::future::join_all((0..200).map(|i| {
        let client = client.clone();
        let url = format!("{}/s/7/echo", w.url);
        async move { client.post(url).body(format!("n{i}")).send().await.expect("send").json::<serde_json::Value>().await.expect("json") }
    }))
    .await;
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(answer["body"], format!("n{i}"), "each gets its own answer");
    }
}

#[tokio::test]
async fn the_agent_refuses_services_it_does_not_run_and_says_when_one_is_down() {
    let w = world().await;
    let client = reqwest::Client::new();
    for (service, error) in [("99", AgentError::UnknownService), ("8", AgentError::Unreachable)] {
        let response = client.post(format!("{}/s/{service}/echo", w.url)).body("x").send().await.expect("send");
        assert_eq!(response.status(), error.status(), "service {service}");
        assert_eq!(response.headers().get(AGENT_ERROR_HEADER).and_then(|v| v.to_str().ok()), Some(error.code()));
    }
}

#[tokio::test]
async fn an_agent_without_the_ticket_or_the_version_gets_no_tunnel() {
    let w = world().await;
    let io = tokio::net::TcpStream::connect(w.addr).await.expect("dial");
    match agent::dial(io, &w.addr.to_string(), "someone-elses").await {
        Err(TunnelError::Refused { status, .. }) => assert_eq!(status, StatusCode::UNAUTHORIZED),
        other => panic!("a wrong ticket: {:?}", other.map(|_| ())),
    }
    let response = reqwest::Client::new()
        .get(format!("{}{TUNNEL_PATH}", w.url))
        .header("connection", "upgrade")
        .header("upgrade", "suanli-tunnel/0")
        .header("authorization", format!("Bearer {TICKET}"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(response.headers().get("upgrade").and_then(|v| v.to_str().ok()), Some("suanli-tunnel/1"));
}

#[tokio::test]
async fn the_portal_sees_the_agent_go() {
    let w = world().await;
    let tunnel = w.tunnel.borrow().clone().expect("tunnel");
    assert!(!tunnel.is_closed());
    w.agent.abort();
    let _ = w.agent.await;
    let gone = suanli_tunnel_wait(WAIT, || tunnel.is_closed()).await;
    assert!(gone, "the tunnel closes when the agent goes");
    let response = reqwest::Client::new().post(format!("{}/s/7/echo", w.url)).body("x").send().await.expect("send");
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
}

/// Polls `done` until it holds or `within` passes (the closing is noticed by another task).
async fn suanli_tunnel_wait(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}
