//! The agent's end: dial the portal, then serve the portal's requests by forwarding each to the
//! service it names.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use crate::wire::{AgentError, AGENT_ERROR_HEADER, CONTROL_SERVICE, SERVICE_HEADER, TUNNEL_PATH, UPGRADED_HEADER, UPGRADE_TOKEN};
use crate::{empty, strip_hop_by_hop, Body, TunnelError};

/// Where a service listens on the node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// A Unix socket (in a directory only the lease's account can enter).
    Unix(PathBuf),
    /// A loopback TCP port.
    Loopback(u16),
}

/// The node's services as the tunnel sees them.
pub trait Resolve: Send + Sync + 'static {
    /// Maps the service a request names to where it listens, or refuses (the agent's own check:
    /// the service must be one it runs for a live lease). Called for every request.
    fn resolve(&self, service: &str) -> impl Future<Output = Result<Address, AgentError>> + Send;

    /// Answers a request naming [`CONTROL_SERVICE`] ([`crate::control`]); an agent that runs no
    /// services knows no such service.
    fn control(&self, request: Request<Body>) -> impl Future<Output = Response<Body>> + Send {
        let _ = request;
        async { refuse(AgentError::UnknownService, "this agent runs no services") }
    }
}

/// Dials the portal over `io` (already connected, and TLS-wrapped where the portal is remote):
/// asks for the upgrade with `ticket`, and returns the upgraded connection for [`serve`].
/// Set `TCP_NODELAY` on the socket (and the portal on its side): HTTP/2 frames small answers
/// in writes of their own, which Nagle's algorithm would hold back for the peer's delayed ACK
/// (40 ms a small request, measured by the tunnel bench).
pub async fn dial<IO>(io: IO, authority: &str, ticket: &str) -> Result<Connection, TunnelError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel handshake connection ended");
        }
    });
    let request = Request::get(TUNNEL_PATH)
        .header(header::HOST, authority)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE_TOKEN)
        .header(header::AUTHORIZATION, format!("Bearer {ticket}"))
        .body(empty())
        .map_err(|e| TunnelError::BadRequest(e.to_string()))?;
    let response = send.send_request(request).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = response.status();
        let text =
            http_body_util::BodyExt::collect(response.into_body()).await.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned()).unwrap_or_default();
        return Err(TunnelError::Refused { status, message: text });
    }
    Ok(TokioIo::new(hyper::upgrade::on(response).await?))
}

/// The agent's end of a tunnel the portal accepted, for [`serve`].
pub type Connection = TokioIo<hyper::upgrade::Upgraded>;

/// Serves the portal's requests on an upgraded connection until the portal closes it.
pub async fn serve<IO, R>(io: IO, resolve: R) -> Result<(), TunnelError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    R: Resolve,
{
    serve_until(io, resolve, std::future::pending()).await
}

/// As [`serve`], until `retire` resolves (the agent's next tunnel is open): then the portal is
/// told to send nothing new here (HTTP/2's GOAWAY), and what is under way (a download, a
/// terminal's or a notebook's WebSocket) goes on to its end, after which this returns (after
/// [`LONGEST_RETIREMENT`] at the most). So a tunnel's rotation, every few minutes, cuts no
/// connection.
pub async fn serve_until<IO, R>(io: IO, resolve: R, retire: impl Future<Output = ()>) -> Result<(), TunnelError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    R: Resolve,
{
    let resolve = Arc::new(resolve);
    let pool = Pool::default();
    let service = hyper::service::service_fn(move |request| {
        let (resolve, pool) = (resolve.clone(), pool.clone());
        async move { Ok::<_, std::convert::Infallible>(forward(request, resolve.as_ref(), &pool).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .enable_connect_protocol()
        // A portal gone without a word is noticed in seconds, not at the ticket's end.
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection, retire);
    tokio::select! {
        served = connection.as_mut() => return Ok(served?),
        () = retire => connection.as_mut().graceful_shutdown(),
    }
    // A connection nobody closes (a visitor gone without a word) does not hold it for ever.
    match tokio::time::timeout(LONGEST_RETIREMENT, connection).await {
        Ok(served) => Ok(served?),
        Err(_) => Ok(()),
    }
}

/// The longest a retired tunnel carries what it carried (a terminal left open for a day).
pub const LONGEST_RETIREMENT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The agent's own answer to a request it does not forward.
pub fn refuse(error: AgentError, detail: &str) -> Response<Body> {
    let mut response = Response::new(crate::full(format!("{}: {detail}", error.code())));
    *response.status_mut() = error.status();
    response.headers_mut().insert(AGENT_ERROR_HEADER, HeaderValue::from_static(error.code()));
    response
}

/// One forwarded request: resolved, replayed to the service over HTTP/1.1, answered.
async fn forward<R: Resolve>(mut request: Request<Incoming>, resolve: &R, pool: &Pool) -> Response<Body> {
    let Some(service) = request.headers().get(SERVICE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned) else {
        return refuse(AgentError::BadRequest, "no service named");
    };
    if service == CONTROL_SERVICE {
        let (mut parts, body) = request.into_parts();
        parts.headers.remove(SERVICE_HEADER);
        return resolve.control(Request::from_parts(parts, crate::body(body))).await;
    }
    let address = match resolve.resolve(&service).await {
        Ok(address) => address,
        Err(e) => return refuse(e, &format!("service {service}")),
    };
    let upgrade = (request.method() == Method::CONNECT).then(|| request.extensions().get::<hyper::ext::Protocol>().map(|p| p.as_str().to_owned())).flatten();
    let from_portal = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let Some(path) = request.uri().path_and_query().cloned() else {
        return refuse(AgentError::BadRequest, "no path");
    };
    let (mut parts, body) = request.into_parts();
    parts.headers.remove(SERVICE_HEADER);
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(header::HOST, HeaderValue::from_static("localhost"));
    parts.uri = path.into();
    parts.version = http::Version::HTTP_11;
    if let Some(protocol) = &upgrade {
        parts.method = Method::GET;
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        match HeaderValue::from_str(protocol) {
            Ok(value) => parts.headers.insert(header::UPGRADE, value),
            Err(_) => return refuse(AgentError::BadRequest, "the upgrade protocol is not a header value"),
        };
    }
    let to_service = Request::from_parts(parts, crate::body(body));
    let sent = if upgrade.is_some() { send(&address, to_service, true).await } else { pool.send(&address, to_service).await };
    let mut response = match sent {
        Ok(response) => response,
        Err(e) => return refuse(AgentError::Unreachable, &e.to_string()),
    };
    strip_hop_by_hop(response.headers_mut());
    if let (Some(from_portal), StatusCode::SWITCHING_PROTOCOLS) = (from_portal, response.status()) {
        crate::splice(from_portal, hyper::upgrade::on(&mut response), ());
        let (mut parts, _) = response.into_parts();
        parts.status = StatusCode::OK;
        parts.headers.insert(UPGRADED_HEADER, HeaderValue::from_static("101"));
        return Response::from_parts(parts, empty());
    }
    response.map(crate::body)
}

/// Kept-alive connections to services, by address: a request takes an idle one or opens one,
/// and gives it back once its answer has been read (hyper says so by being ready again).
#[derive(Clone, Default)]
struct Pool {
    idle: Arc<std::sync::Mutex<std::collections::HashMap<Address, Vec<SendRequest<Body>>>>>,
}

/// Idle connections kept per service: enough for bursts, few enough to hold no service's
/// connection limit hostage.
const IDLE_PER_SERVICE: usize = 32;

impl Pool {
    async fn send(&self, address: &Address, request: Request<Body>) -> Result<Response<Incoming>, TunnelError> {
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let list = idle.entry(address.clone()).or_default();
            list.retain(|s| !s.is_closed());
            list.pop()
        };
        let mut sender = match idle {
            Some(sender) => sender,
            None => connect(address, false).await?,
        };
        let response = sender.send_request(request).await?;
        let (pool, address) = (self.clone(), address.clone());
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                let mut idle = pool.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let list = idle.entry(address).or_default();
                if list.len() < IDLE_PER_SERVICE {
                    list.push(sender);
                }
            }
        });
        Ok(response)
    }
}

/// Sends one request to the service on a fresh HTTP/1.1 connection (an upgrade keeps it).
async fn send(address: &Address, request: Request<Body>, upgrade: bool) -> Result<Response<Incoming>, TunnelError> {
    Ok(connect(address, upgrade).await?.send_request(request).await?)
}

async fn connect(address: &Address, upgrade: bool) -> Result<SendRequest<Body>, TunnelError> {
    match address {
        Address::Unix(path) => handshake(UnixStream::connect(path).await?, upgrade).await,
        Address::Loopback(port) => handshake(TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, *port)).await?, upgrade).await,
    }
}

async fn handshake<IO>(io: IO, upgrade: bool) -> Result<SendRequest<Body>, TunnelError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let done = if upgrade { conn.with_upgrades().await } else { conn.await };
        if let Err(e) = done {
            tracing::debug!(error = %e, "a connection to a service ended");
        }
    });
    Ok(sender)
}
