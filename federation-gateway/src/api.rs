//! The gateway's HTTP API (JSON), for the member's portal and CLI. Every route but `/healthz`
//! needs `Authorization: Bearer <api token>`.
//!
//! - `GET /v1/catalogue?origin=NAME&include_stale=true`: the merged catalogue, every listing
//!   with its origin member and age (stale ones only when asked for);
//! - `GET /v1/members`: the membership (name, region, peer ID), which are connected, and the
//!   age of each member's latest offer;
//! - leases of other members' cards, for a researcher the portal authenticated
//!   (`researcher_id`): `POST /v1/remote-leases` ([`LeaseRequest`]: `key` is the researcher's
//!   idempotency key), `GET /v1/remote-leases?researcher_id=N`, `POST
//!   /v1/remote-leases/{id}/access` (`{"researcher_id", "public_key"}`: where to log in, with a
//!   certificate for that key), `POST /v1/remote-leases/{id}/end` (`{"researcher_id"}`);
//! - `GET /v1/settlements`: every settlement both members signed, and who owes whom;
//! - `GET /metrics`: Prometheus text (libp2p's, the federation node's and the gateway's own
//!   settling backlog, `suanli_gateway_*`), bearer token too.
//!
//! Errors are `{"error": {"code", "message"}}`, as every Suanli HTTP service's: `401
//! UNAUTHENTICATED`, `400 INVALID_ARGUMENT`, `404 NOT_FOUND`, `409 REFUSED` with the owning
//! member's own code as `owner_code` (it said no), `503 UNAVAILABLE` (the owner did not answer:
//! retry with the same key), and this member's broker's own codes. (Gateways before 0.1 of
//! this shape sent the detail's fields at the top level; portals read both.)

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use suanli_federation::{Answer, FederationNode, ListingDigest};
use suanli_proto::v1;
use subtle::ConstantTimeEq;

use crate::requester::{LeaseRequest, RequestError, Requester};
use crate::settlements::{Journal, ReportRow};

#[derive(Clone)]
pub struct ApiState {
    pub node: FederationNode,
    pub token: Arc<String>,
    pub requester: Requester,
    pub journal: Journal,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/catalogue", get(catalogue))
        .route("/v1/members", get(members))
        .route("/v1/remote-leases", post(lease).get(remote_leases))
        .route("/v1/remote-leases/{id}/access", post(access))
        .route("/v1/remote-leases/{id}/end", post(end))
        .route("/v1/settlements", get(settlements))
        .route("/metrics", get(metrics))
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

/// `{"error": {"code", "message"}}`: the shape of every Suanli HTTP service's errors (the
/// portal's, the artifact store's, the inference service's). A refusal by the owning member
/// adds its own code as `owner_code`.
#[derive(Serialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner_code: Option<String>,
}

fn error(status: StatusCode, code: &'static str, message: impl Into<String>) -> Response {
    (status, Json(ErrorBody { error: ErrorDetail { code, message: message.into(), owner_code: None } })).into_response()
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

async fn catalogue(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<CatalogueQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
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

/// A lease of another member's cards, as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RemoteLeaseView {
    pub id: u64,
    pub researcher_id: u64,
    /// The owning member's name and peer ID.
    pub member: String,
    pub member_peer_id: String,
    pub cluster_id: u64,
    /// The owner's lease (0 until it leased the cards).
    pub owner_lease_id: u64,
    pub cards: u32,
    pub periods: u32,
    pub currency: String,
    pub price_per_card_minor: i64,
    pub held_minor: i64,
    pub charged_minor: i64,
    /// `requested`, `active` or `ended`.
    pub state: String,
    pub requested_at_ms: i64,
    pub ended_at_ms: i64,
    /// Set while the owning member does not answer: for how long.
    pub unreachable_for_ms: Option<u64>,
}

fn view(r: &v1::RemoteLease, requester: &Requester) -> RemoteLeaseView {
    let price = r.price_per_card.clone().unwrap_or_default();
    RemoteLeaseView {
        id: r.remote_lease_id,
        researcher_id: r.researcher_id,
        member: r.member_name.clone(),
        member_peer_id: r.member.clone(),
        cluster_id: r.remote_cluster_id,
        owner_lease_id: r.remote_lease_id_at_owner,
        cards: r.cards,
        periods: r.periods,
        currency: price.currency,
        price_per_card_minor: price.minor,
        held_minor: r.held.as_ref().map_or(0, |m| m.minor),
        charged_minor: r.charged_minor,
        state: match v1::RemoteLeaseState::try_from(r.state) {
            Ok(v1::RemoteLeaseState::Requested) => "requested",
            Ok(v1::RemoteLeaseState::Active) => "active",
            Ok(v1::RemoteLeaseState::Ended) => "ended",
            _ => "unspecified",
        }
        .into(),
        requested_at_ms: r.requested_at_ms,
        ended_at_ms: r.ended_at_ms,
        unreachable_for_ms: requester.unreachable_for(r.remote_lease_id).map(|d| d.as_millis() as u64),
    }
}

fn request_error(e: RequestError) -> Response {
    match e {
        RequestError::Invalid(m) => error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", m),
        RequestError::NotFound => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such remote lease"),
        RequestError::Unreachable(m) => error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", m),
        RequestError::Refused { code, message } => {
            (StatusCode::CONFLICT, Json(ErrorBody { error: ErrorDetail { code: "REFUSED", message, owner_code: Some(code) } })).into_response()
        }
        RequestError::Broker { code, message } => {
            let status = match code.as_str() {
                "INVALID_ARGUMENT" | "INSUFFICIENT_FUNDS" | "FAILED_PRECONDITION" => StatusCode::BAD_REQUEST,
                "PERMISSION_DENIED" => StatusCode::FORBIDDEN,
                "UNAVAILABLE" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            #[derive(Serialize)]
            struct BrokerError {
                code: String,
                message: String,
            }
            (status, Json(BrokerError { code, message })).into_response()
        }
    }
}

type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// The request's JSON body, once its bearer token is the API's.
fn authorized<T>(state: &ApiState, headers: &HeaderMap, body: JsonBody<T>) -> Result<T, Box<Response>> {
    if let Some(refused) = unauthorized(state, headers) {
        return Err(Box::new(refused));
    }
    body.map(|Json(b)| b).map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", e.body_text())))
}

async fn lease(State(state): State<ApiState>, headers: HeaderMap, request: JsonBody<LeaseRequest>) -> Response {
    let request = match authorized(&state, &headers, request) {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    match state.requester.lease(request).await {
        Ok(r) => Json(view(&r, &state.requester)).into_response(),
        Err(e) => request_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResearcherQuery {
    pub researcher_id: u64,
}

async fn remote_leases(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<ResearcherQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let Ok(Query(q)) = query else { return error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "researcher_id is required") };
    if q.researcher_id == 0 {
        return error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", "researcher_id is required");
    }
    match state.requester.list(q.researcher_id).await {
        Ok(list) => Json(list.iter().map(|r| view(r, &state.requester)).collect::<Vec<_>>()).into_response(),
        Err(e) => request_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRequest {
    pub researcher_id: u64,
    pub public_key: String,
}

/// Where to log into a remote lease: the owner's access gateway, and a certificate for the
/// researcher's key (save it as `<key>-cert.pub`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AccessView {
    pub owner_lease_id: u64,
    pub state: String,
    pub nodes: Vec<suanli_federation::AccessNode>,
    pub certificate: String,
    pub valid_before_ms: i64,
}

async fn access(State(state): State<ApiState>, headers: HeaderMap, Path(id): Path<u64>, request: JsonBody<AccessRequest>) -> Response {
    let request = match authorized(&state, &headers, request) {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    match state.requester.access(request.researcher_id, id, request.public_key).await {
        Ok(Answer::Access { lease_id, state, nodes, certificate, valid_before_ms }) => {
            Json(AccessView { owner_lease_id: lease_id, state, nodes, certificate, valid_before_ms }).into_response()
        }
        Ok(other) => error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", format!("an unexpected answer: {other:?}")),
        Err(e) => request_error(e),
    }
}

async fn end(State(state): State<ApiState>, headers: HeaderMap, Path(id): Path<u64>, request: JsonBody<ResearcherQuery>) -> Response {
    let request = match authorized(&state, &headers, request) {
        Ok(r) => r,
        Err(refused) => return *refused,
    };
    match state.requester.end(request.researcher_id, id).await {
        Ok(r) => Json(view(&r, &state.requester)).into_response(),
        Err(e) => request_error(e),
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SettlementsView {
    pub report: Vec<ReportRow>,
    pub records: Vec<suanli_federation::SignedSettlement>,
}

async fn settlements(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let membership = state.node.membership();
    Json(SettlementsView { report: state.journal.report(&membership), records: state.journal.all() }).into_response()
}

async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Some(refused) = unauthorized(&state, &headers) {
        return refused;
    }
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let text = state.node.metrics_text() + &state.requester.backlog(now_ms).metrics_text();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
