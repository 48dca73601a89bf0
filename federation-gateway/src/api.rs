//! The gateway's HTTP API (JSON), for the member's portal and CLI. Every route but `/healthz`
//! needs `Authorization: Bearer <api token>`.
//!
//! - `GET /v1/catalogue?origin=NAME&include_stale=true`: the merged catalogue, every listing
//!   with its origin member and age (stale ones only when asked for);
//! - `GET /v1/members`: the membership (name, region, peer ID), which are connected, and the
//!   age of each member's latest offer.
//!
//! Errors: `401 {"code":"UNAUTHENTICATED"}`, `400 {"code":"INVALID_ARGUMENT","message":…}`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use suanli_federation::{FederationNode, ListingDigest};

#[derive(Clone)]
pub struct ApiState {
    pub node: FederationNode,
    pub token: Arc<String>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/catalogue", get(catalogue))
        .route("/v1/members", get(members))
        .route("/healthz", get(health))
        .with_state(state)
}

/// 200 while this member is in the federation's membership; 503 once a change left it out.
async fn health(State(state): State<ApiState>) -> Response {
    if state.node.is_member() {
        "ok".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "this member is not in the federation's membership").into_response()
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CatalogueEntry {
    /// The member whose cards these are.
    pub origin: String,
    pub origin_peer_id: String,
    /// Milliseconds since that member's offer was last confirmed.
    pub age_ms: u64,
    pub stale: bool,
    pub listing: ListingDigest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueQuery {
    pub origin: Option<String>,
    #[serde(default)]
    pub include_stale: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub name: String,
    pub region: String,
    pub peer_id: String,
    pub connected: bool,
    pub is_self: bool,
    /// Milliseconds since its latest offer arrived; none before the first.
    pub offer_age_ms: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MembersView {
    pub federation: String,
    pub version: u64,
    pub members: Vec<MemberView>,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { code, message: message.into() })).into_response()
}

/// The refusal to send when the request does not carry the API token.
fn unauthorized(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
    if !state.token.is_empty() && bool::from(presented.as_bytes().ct_eq(state.token.as_bytes())) {
        None
    } else {
        Some(error(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "a bearer token is required"))
    }
}

async fn catalogue(State(state): State<ApiState>, headers: HeaderMap, query: Result<Query<CatalogueQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", e.body_text()),
    };
    let entries: Vec<CatalogueEntry> = state
        .node
        .catalogue()
        .into_iter()
        .filter(|l| q.include_stale || !l.stale)
        .filter(|l| q.origin.as_ref().is_none_or(|o| *o == l.origin_name))
        .map(|l| CatalogueEntry {
            origin: l.origin_name,
            origin_peer_id: l.origin.to_base58(),
            age_ms: l.age.as_millis() as u64,
            stale: l.stale,
            listing: l.listing,
        })
        .collect();
    Json(entries).into_response()
}

async fn members(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let connected = match state.node.connected().await {
        Ok(c) => c,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", e.to_string()),
    };
    let mut ages: BTreeMap<String, u64> = BTreeMap::new();
    for l in state.node.catalogue() {
        let age = l.age.as_millis() as u64;
        ages.entry(l.origin.to_base58()).and_modify(|a| *a = (*a).min(age)).or_insert(age);
    }
    let membership = state.node.membership();
    let me = state.node.peer_id();
    let members = membership
        .peers()
        .filter_map(|p| membership.member(p).map(|m| (p, m)))
        .map(|(p, m)| MemberView {
            name: m.name.clone(),
            region: m.region.clone(),
            peer_id: p.to_base58(),
            connected: connected.contains(p),
            is_self: *p == me,
            offer_age_ms: ages.get(&p.to_base58()).copied(),
        })
        .collect();
    Json(MembersView { federation: membership.federation().to_owned(), version: membership.version(), members }).into_response()
}
