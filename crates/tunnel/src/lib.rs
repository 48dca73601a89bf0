//! The tunnel that carries the portal's requests to services on leased cards.
//!
//! A supplier's node exposes nothing to the internet: its agent dials the portal
//! ([`agent::dial`]), asks for an HTTP/1.1 upgrade to [`wire::UPGRADE_TOKEN`], and once the portal
//! answers `101` the roles turn round: on that one connection the portal is an HTTP/2 client
//! ([`portal::Tunnel`]) and the agent an HTTP/2 server ([`agent::serve`]). Every request the
//! portal forwards is one HTTP/2 stream, so bodies stream both ways with HTTP/2's flow control,
//! many requests share the connection, and a slow one holds up no other.
//!
//! Each forwarded request names its service in [`wire::SERVICE_HEADER`], set by the portal
//! (never by the visitor: [`portal::Tunnel::forward`] overwrites it); the agent resolves the name
//! to an address on the node only the lease can reach ([`agent::Resolve`]) and forwards the
//! request there over HTTP/1.1. An upgrade (a WebSocket, a terminal) crosses the tunnel as
//! HTTP/2's extended CONNECT (RFC 8441): the agent replays it to the service as an HTTP/1.1
//! upgrade and reports the service's `101` in [`wire::UPGRADED_HEADER`]; from then on bytes are
//! copied both ways.
//!
//! Requests naming [`wire::CONTROL_SERVICE`] are the agent's own to answer: the portal starts,
//! updates and stops services with them ([`control`]).
//!
//! An agent dials a portal on its own host in plain TCP, any other only inside TLS ([`tls`]): the
//! portal proves its name before the agent says anything.
//!
//! What crosses between agent and portal releases is declared in [`wire`] and [`control`], with
//! its version.

pub mod agent;
pub mod control;
pub mod portal;
pub mod tls;
pub mod wire;

/// A body of any origin, boxed: requests and responses cross between hyper, axum and tests.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Boxes any body whose errors convert.
pub fn body<B>(body: B) -> Body
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    body.map_err(Into::into).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    body(http_body_util::Empty::new())
}

/// A whole body from bytes.
pub fn full(bytes: impl Into<bytes::Bytes>) -> Body {
    body(http_body_util::Full::new(bytes.into()))
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the portal refused the tunnel: {status} {message}")]
    Refused { status: http::StatusCode, message: String },
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad request to forward: {0}")]
    BadRequest(String),
    #[error("tls: {0}")]
    Tls(String),
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1): never forwarded.
pub(crate) const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization"];

/// Removes hop-by-hop headers, and those the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut http::HeaderMap) {
    let named: Vec<http::HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| http::HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Copies bytes both ways between two connections once both have switched protocols (an
/// upgrade through the tunnel: the visitor's and the tunnel's at the portal, the tunnel's and the
/// service's at the agent), in a task of its own, which holds `hold` until the copying ends.
pub(crate) fn splice<H: Send + 'static>(near: hyper::upgrade::OnUpgrade, far: hyper::upgrade::OnUpgrade, hold: H) {
    use hyper_util::rt::TokioIo;
    tokio::spawn(async move {
        let _hold = hold;
        match (near.await, far.await) {
            (Ok(a), Ok(b)) => {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b)).await;
            }
            (a, b) => tracing::debug!(near = a.is_ok(), far = b.is_ok(), "an upgrade through the tunnel did not complete"),
        }
    });
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` and `Upgrade:`).
pub(crate) fn upgrade_protocol(headers: &http::HeaderMap) -> Option<String> {
    let asks = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    if !asks {
        return None;
    }
    headers.get(http::header::UPGRADE).and_then(|v| v.to_str().ok()).map(str::to_owned)
}
