//! The audit log (SPEC §1: every user operation audited and traceable). A middleware records
//! every state-changing API request — who (as the authentication extractor established it),
//! what (method and route), on what (the path), the outcome (HTTP status) and from where — after
//! the handler ran, so no handler can forget to. Auditors search it.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::auth::AuditSlot;
use crate::db::{new_id, now_ms};
use crate::state::AppState;

pub async fn record_writes(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let method = request.method().clone();
    if matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let slot = AuditSlot::default();
    request.extensions_mut().insert(slot.clone());
    let route = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_else(|| "(unmatched)".into());
    let target = request.uri().path().to_owned();
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let source = crate::auth::source_address(&state.settings.trusted_proxies, peer, request.headers());
    let response = next.run(request).await;
    let status = response.status();
    let outcome = if status.is_success() || status.is_redirection() { "ok".to_owned() } else { format!("refused {}", status.as_u16()) };
    let actor = slot.0.get().copied();
    let written = sqlx::query("INSERT INTO audit_log (id, at_ms, actor_id, action, target, outcome, detail, source) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(new_id())
        .bind(now_ms())
        .bind(actor)
        .bind(format!("{method} {route}"))
        .bind(target)
        .bind(outcome)
        .bind("")
        .bind(source)
        .execute(&state.db.pool)
        .await;
    if let Err(e) = written {
        // The action already happened; losing its record is logged loudly rather than hidden.
        tracing::error!("audit record not written: {e}");
    }
    response
}
