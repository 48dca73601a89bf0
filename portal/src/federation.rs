//! The federation, as this portal shows it: other members' offers and the member list, read
//! from this member's federation gateway (`suanli-federation serve`, its JSON API; a declared
//! boundary: the types below mirror the gateway's `api.rs`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// One listing of the federated catalogue.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FederatedEntry {
    /// The member whose cards these are.
    pub origin: String,
    pub origin_peer_id: String,
    /// Milliseconds since that member's offer was last confirmed.
    pub age_ms: u64,
    pub stale: bool,
    pub listing: FederatedListing,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FederatedListing {
    /// The cluster's ID at its own member.
    pub cluster_id: u64,
    /// A or B
    pub class: String,
    pub title: String,
    pub gpu_model: String,
    pub vram_gib: u32,
    pub region: String,
    pub total_cards: u32,
    pub free_cards: u32,
    pub currency: String,
    /// Per card per period, minor units, by billing mode.
    pub prices: BTreeMap<String, i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FederationMember {
    pub name: String,
    pub region: String,
    pub peer_id: String,
    pub connected: bool,
    pub is_self: bool,
    /// Milliseconds since its latest offer arrived (how far behind gossip is); none before the first.
    pub offer_age_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct FederationMembers {
    pub federation: String,
    /// The membership document's version.
    pub version: u64,
    pub members: Vec<FederationMember>,
}

/// This member's gateway.
#[derive(Clone)]
pub struct FederationLink {
    api: String,
    token: String,
    http: reqwest::Client,
}

impl FederationLink {
    pub fn new(api: &str, token: &str) -> Result<FederationLink, String> {
        if !(api.starts_with("http://") || api.starts_with("https://")) {
            return Err(format!("{api}: the federation gateway's API is an http(s):// URL"));
        }
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
        Ok(FederationLink { api: api.trim_end_matches('/').to_owned(), token: token.to_owned(), http })
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str, query: &[(&str, &str)]) -> Result<T, ApiError> {
        let response = self
            .http
            .get(format!("{}{path}", self.api))
            .query(query)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("the federation gateway: {e}")))?;
        if !response.status().is_success() {
            return Err(ApiError::unavailable(format!("the federation gateway answered {}", response.status())));
        }
        response.json().await.map_err(|e| ApiError::unavailable(format!("the federation gateway's answer: {e}")))
    }

    /// Every member's current offers (stale ones left out), optionally one member's only.
    pub async fn catalogue(&self, origin: Option<&str>) -> Result<Vec<FederatedEntry>, ApiError> {
        let query: Vec<(&str, &str)> = origin.map(|o| ("origin", o)).into_iter().collect();
        self.get("/v1/catalogue", &query).await
    }

    pub async fn members(&self) -> Result<FederationMembers, ApiError> {
        self.get("/v1/members", &[]).await
    }
}

/// The link, or the answer for a marketplace that is not in a federation.
pub fn link(state: &crate::state::AppState) -> Result<&FederationLink, ApiError> {
    state.federation.as_ref().ok_or_else(|| ApiError::not_found("federation (this marketplace is not in one)"))
}
