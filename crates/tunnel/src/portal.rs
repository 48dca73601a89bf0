//! The portal's end: accept an agent's tunnel, then forward visitors' requests through it.

use std::future::Future;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::wire::{SERVICE_HEADER, UPGRADED_HEADER, UPGRADE_TOKEN, VERSIONS};
use crate::{empty, strip_hop_by_hop, upgrade_protocol, Body, BoxError, TunnelError};

/// The answer to an agent asking for a tunnel version this portal does not speak (`426 Upgrade
/// Required`, naming the one it does); `None` when it speaks the version asked for.
pub fn version_refusal(headers: &http::HeaderMap) -> Option<Response<Body>> {
    match upgrade_protocol(headers) {
        Some(asked) if VERSIONS.contains(&asked.as_str()) => None,
        _ => {
            let mut response = Response::new(crate::full(format!("this portal speaks {}", VERSIONS.join(", "))));
            *response.status_mut() = StatusCode::UPGRADE_REQUIRED;
            response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_TOKEN));
            Some(response)
        }
    }
}

/// The `101` that accepts an agent's tunnel (after the agent's ticket was checked).
pub fn switching() -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_TOKEN));
    response
}

/// Takes an agent's connection from its tunnel request (after its ticket was checked; answer
/// the request with [`switching`]): resolves to the tunnel and the future that drives it once
/// the `101` has gone out.
pub fn take<B>(request: &mut Request<B>) -> impl Future<Output = Result<(Tunnel, impl Future<Output = ()> + Send), TunnelError>> + Send + 'static {
    let upgrade = hyper::upgrade::on(request);
    async move { Tunnel::handshake(upgrade.await?).await }
}

/// One agent's tunnel, as the portal holds it: cheap to clone, one per node.
#[derive(Clone)]
pub struct Tunnel {
    sender: SendRequest<Body>,
}

impl Tunnel {
    /// Starts HTTP/2 on the agent's upgraded connection. The returned future drives the
    /// connection and ends when it closes: spawn it, and drop the tunnel when it ends.
    pub async fn handshake(upgraded: hyper::upgrade::Upgraded) -> Result<(Tunnel, impl Future<Output = ()> + Send), TunnelError> {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // A large upload or a fast stream is not held to HTTP/2's 64 KiB default windows.
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .adaptive_window(true)
            .keep_alive_interval(std::time::Duration::from_secs(20))
            // An idle tunnel is pinged too: a NAT that dropped it is noticed in seconds.
            .keep_alive_while_idle(true)
            .keep_alive_timeout(std::time::Duration::from_secs(20))
            .handshake(upgraded)
            .await?;
        let driver = async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "an agent's tunnel closed");
            }
        };
        Ok((Tunnel { sender }, driver))
    }

    /// Whether the agent has gone (its connection closed).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Forwards a visitor's request to `service` on the agent's node and returns the service's
    /// answer, streaming. An upgrade request (a WebSocket) is answered `101` and its bytes are
    /// then copied to and from the service. The visitor's own `suanli-*` headers are dropped: only
    /// the portal names the service. Answers the agent made itself carry
    /// [`AGENT_ERROR_HEADER`](crate::wire::AGENT_ERROR_HEADER).
    ///
    /// Everything else the visitor sent goes to the service, cookies and `Authorization`
    /// included (a notebook keeps its own): the caller removes the portal's own credentials
    /// (its session cookie, API tokens) first, and serves services from origins of their own so
    /// that a service's pages never run where the portal's cookies are sent.
    pub async fn forward<B>(&self, service: &str, request: Request<B>) -> Result<Response<Body>, TunnelError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        self.forward_holding(service, request, ()).await
    }

    /// As [`Tunnel::forward`], keeping `hold` for as long as an upgraded connection (a
    /// WebSocket) stays open, and dropping it at once for any other request: how the caller
    /// knows who is connected to a service.
    pub async fn forward_holding<B, H>(&self, service: &str, mut request: Request<B>, hold: H) -> Result<Response<Body>, TunnelError>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
        H: Send + 'static,
    {
        let upgrade = upgrade_protocol(request.headers());
        let from_visitor = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let ours: Vec<_> = parts.headers.keys().filter(|k| k.as_str().starts_with("suanli-")).cloned().collect();
        for name in ours {
            parts.headers.remove(name);
        }
        parts.headers.remove(header::HOST);
        parts.headers.insert(SERVICE_HEADER, HeaderValue::from_str(service).map_err(|e| TunnelError::BadRequest(e.to_string()))?);
        parts.uri = format!("http://service{path}").parse().map_err(|e: http::uri::InvalidUri| TunnelError::BadRequest(e.to_string()))?;
        parts.version = http::Version::HTTP_2;
        let body = match &upgrade {
            Some(protocol) => {
                parts.method = Method::CONNECT;
                parts.extensions.insert(hyper::ext::Protocol::from(protocol.as_str()));
                empty()
            }
            None => crate::body(body),
        };
        let mut sender = self.sender.clone();
        sender.ready().await?;
        let mut response = sender.send_request(Request::from_parts(parts, body)).await?;
        let switched = response.headers().get(UPGRADED_HEADER).is_some_and(|v| v == "101");
        match (from_visitor, upgrade, switched && response.status() == StatusCode::OK) {
            (Some(from_visitor), Some(protocol), true) => {
                crate::splice(from_visitor, hyper::upgrade::on(&mut response), hold);
                let (mut parts, _) = response.into_parts();
                parts.status = StatusCode::SWITCHING_PROTOCOLS;
                parts.headers.remove(UPGRADED_HEADER);
                parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                parts.headers.insert(header::UPGRADE, HeaderValue::from_str(&protocol).map_err(|e| TunnelError::BadRequest(e.to_string()))?);
                parts.version = http::Version::HTTP_11;
                Ok(Response::from_parts(parts, empty()))
            }
            _ => {
                strip_hop_by_hop(response.headers_mut());
                let mut response = response.map(crate::body);
                *response.version_mut() = http::Version::HTTP_11;
                Ok(response)
            }
        }
    }
}
