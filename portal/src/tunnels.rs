//! Agents' tunnels (`suanli-tunnel`, issue 23): a supplier's agent dials in to
//! `GET /api/v1/agent-tunnel` with a ticket the broker issued for its node
//! (`suanli_pki::tunnel_ticket`, under the key the broker and this portal share), and the portal
//! keeps one tunnel per node for as long as the ticket is good. Requests for services on a
//! node go through its tunnel: the node itself listens to nothing from outside.
//!
//! Agents dial either the portal's own listener (from its host, or through a TLS proxy in
//! front) or a listener for tunnels alone ([`router`], `--tunnel-listen`, in TLS with a
//! certificate from the cluster CA, which agents trust by default).
//!
//! The ticket is the only credential here: no session, no API token, no CSRF (an agent is not
//! a browser). A request without a good ticket is answered before anything is kept. A ticket is
//! good for ten minutes and may travel in the clear (an agent on the portal's host dials plain
//! TCP), so a copy of it must not take over a tunnel: only a dial with a newer ticket replaces
//! the node's open one (the agent's own next dial). The replaced connection takes no new
//! request; what it carries (a terminal, a notebook's kernel) goes on until it ends, and the
//! agent closes it then (a day at most: `suanli_tunnel::agent::serve_until`), so a tunnel's
//! rotation cuts no connection. Tunnels live in this process: with several portal processes,
//! each keeps the tunnels that reached it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use suanli_pki::tunnel_ticket::TunnelKey;
use suanli_tunnel::portal::Tunnel;

use crate::db::now_ms;
use crate::error::ApiError;
use crate::state::AppState;
use suanli_types::ErrorCode;

/// The tunnels open now, by node.
pub struct Tunnels {
    key: Option<TunnelKey>,
    open: Mutex<HashMap<u64, Open>>,
    generation: AtomicU64,
}

struct Open {
    tunnel: Tunnel,
    since_ms: i64,
    expires_ms: i64,
    generation: u64,
    /// Closes the connection (the tunnel was replaced by a newer one).
    close: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What the portal knows of a node's tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct TunnelStatus {
    pub since_ms: i64,
    /// When its ticket runs out (the agent dials again before).
    pub expires_ms: i64,
}

impl Tunnels {
    /// `key`: the broker's `tunnel_key_file`; without it no agent may open a tunnel.
    pub fn new(key: Option<TunnelKey>) -> Tunnels {
        Tunnels { key, open: Mutex::default(), generation: AtomicU64::new(0) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Open>> {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn status(&self, node: u64) -> Option<TunnelStatus> {
        self.lock().get(&node).filter(|o| !o.tunnel.is_closed()).map(|o| TunnelStatus { since_ms: o.since_ms, expires_ms: o.expires_ms })
    }

    /// The node's open tunnel.
    pub fn tunnel(&self, node: u64) -> Option<Tunnel> {
        self.lock().get(&node).filter(|o| !o.tunnel.is_closed()).map(|o| o.tunnel.clone())
    }

    /// Whether a dial with a ticket good until `expires_ms` may replace the node's open tunnel:
    /// only a newer ticket may (the agent's next dial), so a copy of the ticket the open tunnel
    /// came with takes nothing over.
    fn may_open(&self, node: u64, expires_ms: i64) -> bool {
        self.lock().get(&node).is_none_or(|o| o.tunnel.is_closed() || expires_ms > o.expires_ms)
    }

    /// Keeps `tunnel` as the node's, closing the one it replaces, until its connection closes,
    /// its ticket runs out or a newer dial replaces it; a dial no newer than the open tunnel's
    /// is closed at once.
    async fn keep(&self, node: u64, expires_ms: i64, tunnel: Tunnel, driver: impl std::future::Future<Output = ()>) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = tokio::sync::oneshot::channel();
        {
            let mut open = self.lock();
            if open.get(&node).is_some_and(|o| !o.tunnel.is_closed() && o.expires_ms >= expires_ms) {
                tracing::warn!(node, "a second tunnel with a ticket no newer than the open one's: closed");
                return;
            }
            if let Some(replaced) = open.insert(node, Open { tunnel, since_ms: now_ms(), expires_ms, generation, close: Some(close) }) {
                if let Some(close) = replaced.close {
                    let _ = close.send(());
                }
            }
        }
        tracing::info!(node, expires_ms, "an agent opened its tunnel");
        let left = std::time::Duration::from_millis(u64::try_from(expires_ms - now_ms()).unwrap_or(0));
        tokio::select! {
            () = driver => tracing::info!(node, "an agent's tunnel closed"),
            () = tokio::time::sleep(left) => tracing::info!(node, "an agent's tunnel outlived its ticket: closed"),
            // The agent's next tunnel takes the new requests. What this one still carries (a
            // terminal, a notebook's kernel) goes on in hyper's own connection task until it
            // ends, and the agent closes the connection then (it retired it: GOAWAY).
            _ = closed => tracing::info!(node, "an agent's tunnel was replaced by its next one"),
        }
        let mut open = self.lock();
        if open.get(&node).is_some_and(|o| o.generation == generation) {
            open.remove(&node);
        }
    }
}

/// The tunnel listener's routes (`--tunnel-listen`): agents' dials, and nothing else.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new().route("/api/v1/agent-tunnel", axum::routing::get(accept)).with_state(state)
}

/// `GET /api/v1/agent-tunnel`: an agent's dial (`Connection: upgrade`, `Upgrade:
/// suanli-tunnel/1`, `Authorization: Bearer <ticket>`). `101` and the tunnel, or `426` for a
/// version this portal does not speak, `401` for a missing, forged or expired ticket, `409`
/// for a ticket no newer than that of the node's open tunnel (a copy of it), `503` where this
/// portal holds no tunnel key.
pub async fn accept(State(state): State<AppState>, mut request: Request) -> Response {
    if let Some(refusal) = suanli_tunnel::portal::version_refusal(request.headers()) {
        return refusal.map(axum::body::Body::new);
    }
    let Some(key) = state.tunnels.key.clone() else {
        return ApiError::broker(ErrorCode::Unavailable, "this portal takes no agent tunnels (no tunnel_key_file)").into_response();
    };
    let ticket = request.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    let ticket = match ticket.map(|t| key.verify(t, now_ms())) {
        Some(Ok(ticket)) => ticket,
        Some(Err(e)) => return ApiError::broker(ErrorCode::Unauthenticated, format!("tunnel ticket: {e}")).into_response(),
        None => return ApiError::broker(ErrorCode::Unauthenticated, "a tunnel needs the broker's ticket (Authorization: Bearer)").into_response(),
    };
    if !state.tunnels.may_open(ticket.node, ticket.expires_ms) {
        return ApiError::broker(ErrorCode::AlreadyExists, "this node's tunnel is open with this ticket or a newer one").into_response();
    }
    let upgrade = suanli_tunnel::portal::take(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok((tunnel, driver)) => {
                // The node's services are sent again once the tunnel is kept (its agent keeps
                // none of them across a restart).
                tokio::spawn(crate::services::reconcile_node(state.clone(), ticket.node));
                state.tunnels.keep(ticket.node, ticket.expires_ms, tunnel, driver).await
            }
            Err(e) => tracing::info!(node = ticket.node, error = %e, "an agent's tunnel did not start"),
        }
    });
    suanli_tunnel::portal::switching().map(axum::body::Body::new)
}
