//! `/api/v1/federation/…`: other marketplaces' offers and the federation's members, as this
//! member's gateway sees them (public, like the local catalogue), and a researcher's leases of
//! other members' cards (`/api/v1/federation/leases`: this member holds the money, the owning
//! member leases the cards; the gateway carries the calls).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::{idempotency_key, ApiJson, ApiPath, ApiQuery};
use crate::auth::{Principal, Researcher};
use crate::error::{ApiError, ApiResult, Problems};
use crate::federation::{link, FederatedEntry, FederationMembers, RemoteAccessView, RemoteLeaseView};
use crate::state::AppState;

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FederatedQuery {
    /// Only this member's offers (its name in the membership).
    pub origin: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/federation/catalogue", tag = "market", params(FederatedQuery),
    responses((status = 200, body = [FederatedEntry]), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn catalogue(State(state): State<AppState>, ApiQuery(q): ApiQuery<FederatedQuery>) -> ApiResult<axum::Json<Vec<FederatedEntry>>> {
    Ok(axum::Json(link(&state)?.catalogue(q.origin.as_deref()).await?))
}

#[utoipa::path(get, path = "/api/v1/federation/members", tag = "market",
    responses((status = 200, body = FederationMembers), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn members(State(state): State<AppState>) -> ApiResult<axum::Json<FederationMembers>> {
    Ok(axum::Json(link(&state)?.members().await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteLeaseRequest {
    /// The owning member (its name in the membership).
    pub origin: String,
    /// The cluster's ID at its own member.
    pub cluster_id: u64,
    pub cards: u32,
    /// hourly, daily, monthly or yearly
    pub billing_mode: String,
    pub periods: u32,
    /// Optional idempotency key: a retry with the same key leases once.
    #[serde(default)]
    pub request_id: Option<String>,
}

fn account_of(p: &Principal) -> ApiResult<u64> {
    p.broker_account.ok_or_else(|| ApiError::forbidden("this account has no market account yet"))
}

#[utoipa::path(post, path = "/api/v1/federation/leases", request_body = RemoteLeaseRequest, tag = "leases",
    responses((status = 201, body = RemoteLeaseView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn lease(State(state): State<AppState>, Researcher(principal): Researcher, ApiJson(req): ApiJson<RemoteLeaseRequest>) -> ApiResult<Response> {
    let mut p = Problems::default();
    if req.origin.is_empty() || req.origin.len() > 128 {
        p.add("origin", "a member's name");
    }
    if req.cards == 0 || req.cards > 1024 {
        p.add("cards", "between 1 and 1024");
    }
    if let Err(e) = suanli_types::lease::check_periods(req.periods) {
        p.0.extend(e.field_errors().iter().cloned());
    }
    crate::api::market::parse_billing_mode(&mut p, "billing_mode", &req.billing_mode);
    p.finish()?;
    let key = idempotency_key("rlease", principal.user, req.request_id.as_deref());
    let body = serde_json::json!({
        "key": key, "origin": req.origin, "cluster_id": req.cluster_id, "cards": req.cards,
        "billing_mode": req.billing_mode, "periods": req.periods,
    });
    let lease = link(&state)?.lease(account_of(&principal)?, body).await?;
    Ok((StatusCode::CREATED, axum::Json(lease)).into_response())
}

#[utoipa::path(get, path = "/api/v1/federation/leases", tag = "leases",
    responses((status = 200, body = [RemoteLeaseView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, Researcher(principal): Researcher) -> ApiResult<axum::Json<Vec<RemoteLeaseView>>> {
    let mut leases = link(&state)?.remote_leases(account_of(&principal)?).await?;
    leases.reverse();
    Ok(axum::Json(leases))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteAccessRequest {
    /// An OpenSSH public key; the owning member signs a short-lived certificate for it.
    pub public_key: String,
}

#[utoipa::path(post, path = "/api/v1/federation/leases/{id}/access", params(("id" = u64, Path)), request_body = RemoteAccessRequest, tag = "leases",
    responses((status = 200, body = RemoteAccessView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn access(
    State(state): State<AppState>,
    Researcher(principal): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<RemoteAccessRequest>,
) -> ApiResult<axum::Json<RemoteAccessView>> {
    let key = req.public_key.trim();
    if key.is_empty() || key.len() > 4096 || suanli_types::SshPublicKey::parse(key).is_err() {
        return Err(ApiError::field("public_key", "an OpenSSH public key line"));
    }
    Ok(axum::Json(link(&state)?.access(account_of(&principal)?, id, key).await?))
}

#[utoipa::path(post, path = "/api/v1/federation/leases/{id}/end", params(("id" = u64, Path)), tag = "leases",
    responses((status = 200, body = RemoteLeaseView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn end(State(state): State<AppState>, Researcher(principal): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<RemoteLeaseView>> {
    Ok(axum::Json(link(&state)?.end(account_of(&principal)?, id).await?))
}
