//! The tunnel end to end on real sockets: a service on a Unix socket (as a lease's service
//! listens), an agent that dials a portal over TCP and serves its requests, and a portal that
//! forwards visitors' HTTP requests and WebSockets through the tunnel. Visitors try to name
//! another service, agents try without a ticket or with another version.

use std::sync::atomic::{AtomicUsize, Ordering};
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
#[derive(Clone)]
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

/// A portal that accepts one agent's tunnel and forwards `/s/{service}/…` through it, counting
/// the visitors' connections open through it.
#[derive(Clone)]
struct Portal {
    tunnel: watch::Sender<Option<Tunnel>>,
    open: Arc<AtomicUsize>,
}

/// Counted open while it lives: what the portal holds for a visitor's connection.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(count: &Arc<AtomicUsize>) -> Open {
        count.fetch_add(1, Ordering::SeqCst);
        Open(count.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
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
    match tunnel.forward_holding(&service, request, Open::new(&portal.open)).await {
        Ok(response) => response.map(axum::body::Body::new),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}

struct World {
    url: String,
    addr: std::net::SocketAddr,
    release: Arc<Notify>,
    tunnel: watch::Receiver<Option<Tunnel>>,
    /// Visitors' connections open through the portal.
    open: Arc<AtomicUsize>,
    agent: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// How the agent reaches the portal.
enum Dial {
    /// Plain TCP (a portal on the node's own host).
    Plain,
    /// TLS: the portal serves `served` (a certificate and its key), the agent trusts `trusted`.
    Tls { served: suanli_pki::CertifiedKey, trusted: String },
}

/// A certificate for 127.0.0.1 and localhost from a new CA, and that CA's certificate.
fn certified(ca: &str) -> (suanli_pki::CertifiedKey, String) {
    let ca = suanli_pki::Ca::generate(ca).expect("a CA");
    (ca.server_certificate(&["127.0.0.1".into(), "localhost".into()]).expect("a certificate"), ca.cert_pem().to_owned())
}

/// The service on its socket and a portal on `127.0.0.1:<port>` (over TLS where `dial` says).
/// A portal and a service, before any agent dialled.
struct Ends {
    addr: std::net::SocketAddr,
    release: Arc<Notify>,
    tunnel: watch::Receiver<Option<Tunnel>>,
    open: Arc<AtomicUsize>,
    services: Services,
    dir: tempfile::TempDir,
}

async fn portal_and_service(dial: &Dial) -> Ends {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("service.sock");
    let release = Arc::new(Notify::new());
    let listener = tokio::net::UnixListener::bind(&socket).expect("bind the service");
    let app = service(release.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.expect("service") });

    let (tx, rx) = watch::channel(None);
    let open = Arc::new(AtomicUsize::new(0));
    let portal = Portal { tunnel: tx, open: open.clone() };
    let app = Router::new().route(TUNNEL_PATH, get(accept_tunnel)).route("/s/{service}/{*rest}", any(proxy)).with_state(portal);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the portal");
    let addr = listener.local_addr().expect("addr");
    match dial {
        Dial::Plain => drop(tokio::spawn(async move { axum::serve(listener, app).await.expect("portal") })),
        Dial::Tls { served, .. } => {
            let config = suanli_artifacts::tls::server_config(served.cert_pem.as_bytes(), served.key_pem.as_bytes()).expect("the portal's TLS");
            let listener = suanli_artifacts::tls::TlsListener::new(listener, config).expect("the TLS listener");
            tokio::spawn(async move { axum::serve(listener, app).await.expect("portal") });
        }
    }
    let services = Services { socket, dead: dir.path().join("nobody.sock") };
    Ends { addr, release, tunnel: rx, open, services, dir }
}

/// The agent's dial: TCP, TLS where `dial` says, the upgrade.
async fn dial_portal(dial: &Dial, addr: std::net::SocketAddr, ticket: &str) -> Result<agent::Connection, TunnelError> {
    let io = tokio::net::TcpStream::connect(addr).await?;
    io.set_nodelay(true)?;
    match dial {
        Dial::Plain => agent::dial(io, &addr.to_string(), ticket).await,
        Dial::Tls { trusted, .. } => {
            let tls = suanli_tunnel::tls::PortalTrust::from_pem(trusted.as_bytes())?.connect(io, "localhost").await?;
            agent::dial(tls, &format!("localhost:{}", addr.port()), ticket).await
        }
    }
}

async fn world() -> World {
    world_over(Dial::Plain).await
}

async fn world_over(dial: Dial) -> World {
    let Ends { addr, release, tunnel: rx, open, services, dir } = portal_and_service(&dial).await;
    let scheme = if matches!(dial, Dial::Plain) { "http" } else { "https" };
    let agent = tokio::spawn(async move {
        let upgraded = dial_portal(&dial, addr, TICKET).await.expect("the tunnel");
        let _ = agent::serve(upgraded, services).await;
    });
    let mut tunnel = rx.clone();
    tokio::time::timeout(WAIT, tunnel.wait_for(Option::is_some)).await.expect("the agent's tunnel in time").expect("tunnel");
    World { url: format!("{scheme}://{addr}"), addr, release, tunnel: rx, open, agent, _dir: dir }
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

/// The agent's next tunnel takes over without cutting what the one before carries: retired, the
/// old tunnel takes nothing new, its WebSocket goes on, and it ends when that closes.
#[tokio::test]
async fn a_retired_tunnel_finishes_its_websockets_while_the_next_one_takes_the_requests() {
    let ends = portal_and_service(&Dial::Plain).await;
    let mut slot = ends.tunnel.clone();
    let (retire, retired) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let (services, addr) = (ends.services.clone(), ends.addr);
        let upgraded = dial_portal(&Dial::Plain, addr, TICKET).await.expect("the first tunnel");
        tokio::spawn(agent::serve_until(upgraded, services, async move {
            let _ = retired.await;
        }))
    };
    tokio::time::timeout(WAIT, slot.wait_for(Option::is_some)).await.expect("in time").expect("the first tunnel kept");
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/s/7/ws", ends.addr)).await.expect("a WebSocket through the first tunnel");
    use tokio_tungstenite::tungstenite::Message as M;
    socket.send(M::text("before")).await.expect("send");
    assert_eq!(socket.next().await.expect("reply").expect("frame"), M::text("before"));

    // The next tunnel opens and the portal keeps it; the first is retired.
    slot.mark_unchanged();
    let upgraded = dial_portal(&Dial::Plain, ends.addr, TICKET).await.expect("the next tunnel");
    let second = tokio::spawn(agent::serve(upgraded, ends.services.clone()));
    tokio::time::timeout(WAIT, slot.changed()).await.expect("in time").expect("the next tunnel kept");
    retire.send(()).expect("retire the first");

    let answer = reqwest::Client::new().post(format!("http://{}/s/7/echo", ends.addr)).body("after").send().await.expect("send");
    assert_eq!(answer.status(), StatusCode::OK, "new requests go through the next tunnel");
    socket.send(M::text("during")).await.expect("send");
    assert_eq!(socket.next().await.expect("reply").expect("frame"), M::text("during"), "the WebSocket outlives its tunnel's retirement");
    assert!(!first.is_finished(), "the retired tunnel serves on while it carries a WebSocket");
    socket.close(None).await.expect("close");
    drop(socket);
    let finished = tokio::time::timeout(WAIT, first).await.expect("the retired tunnel ends once its WebSocket has").expect("task");
    assert!(finished.is_ok(), "{finished:?}");
    assert!(!second.is_finished(), "the next tunnel serves on");
}

/// What the portal gives a forwarded request to hold lives as long as its WebSocket, and no
/// longer than an ordinary request: how the portal knows somebody is connected to a service.
#[tokio::test]
async fn a_websocket_holds_what_the_portal_gave_it_until_it_closes() {
    let w = world().await;
    let answer = reqwest::Client::new().post(format!("{}/s/7/echo", w.url)).body("x").send().await.expect("send");
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(w.open.load(Ordering::SeqCst), 0, "an ordinary request holds nothing once answered");
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/s/7/ws", w.addr)).await.expect("a WebSocket through the portal");
    assert_eq!(w.open.load(Ordering::SeqCst), 1, "held while the WebSocket is open");
    use tokio_tungstenite::tungstenite::Message as M;
    socket.send(M::text("ping")).await.expect("send");
    assert_eq!(socket.next().await.expect("reply").expect("frame"), M::text("ping"));
    assert_eq!(w.open.load(Ordering::SeqCst), 1);
    socket.close(None).await.expect("close");
    drop(socket);
    assert!(suanli_tunnel_wait(WAIT, || w.open.load(Ordering::SeqCst) == 0).await, "let go when it closes");
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

#[tokio::test]
async fn a_tunnel_inside_tls_carries_requests() {
    let (served, trusted) = certified("the cluster CA");
    let w = world_over(Dial::Tls { served, trusted }).await;
    let tunnel = w.tunnel.borrow().clone().expect("tunnel");
    let request = axum::http::Request::post("/echo").body(axum::body::Body::from("over tls")).expect("request");
    let answer = tunnel.forward("7", request).await.expect("through the tunnel");
    assert_eq!(answer.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(answer.into_body()).await.expect("body").to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["body"], "over tls");
}

/// A portal with a certificate from a CA the agent was not given (a machine that took the
/// portal's address): the agent stops at the handshake, and the ticket never leaves it.
#[tokio::test]
async fn an_agent_tells_nothing_to_a_portal_it_does_not_trust() {
    let (impostor, _) = certified("someone else's CA");
    let (_, trusted) = certified("the cluster CA");
    let dial = Dial::Tls { served: impostor, trusted };
    let ends = portal_and_service(&dial).await;
    match dial_portal(&dial, ends.addr, TICKET).await {
        Err(TunnelError::Tls(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("a portal the agent does not trust: {:?}", other.map(|_| ())),
    }
    assert!(ends.tunnel.borrow().is_none(), "no tunnel opened");
    // Nor does a certificate for another name pass, from the trusted CA.
    let ca = suanli_pki::Ca::generate("the cluster CA").expect("a CA");
    let elsewhere = ca.server_certificate(&["portal.example".into()]).expect("a certificate");
    let dial = Dial::Tls { served: elsewhere, trusted: ca.cert_pem().to_owned() };
    let ends = portal_and_service(&dial).await;
    match dial_portal(&dial, ends.addr, TICKET).await {
        Err(TunnelError::Tls(why)) => assert!(why.contains("certificate"), "{why}"),
        other => panic!("a certificate for another name: {:?}", other.map(|_| ())),
    }
    assert!(ends.tunnel.borrow().is_none(), "no tunnel opened");
}

#[test]
fn a_ca_file_without_a_certificate_is_refused() {
    for pem in ["", "not pem at all", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"] {
        assert!(matches!(suanli_tunnel::tls::PortalTrust::from_pem(pem.as_bytes()), Err(TunnelError::Tls(_))), "{pem:?}");
    }
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
