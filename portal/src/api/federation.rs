//! `/api/v1/federation/…`: other marketplaces' offers and the federation's members, as this
//! member's gateway sees them. Public, like the local catalogue.

use axum::extract::State;
use serde::Deserialize;
use utoipa::IntoParams;

use super::ApiQuery;
use crate::error::ApiResult;
use crate::federation::{link, FederatedEntry, FederationMembers};
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
