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

/// A lease of another member's cards (the gateway's `RemoteLeaseView`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
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
    /// requested, active or ended
    pub state: String,
    pub requested_at_ms: i64,
    pub ended_at_ms: i64,
    /// Set while the owning member does not answer: for how long (ms).
    pub unreachable_for_ms: Option<u64>,
}

/// One node of a remote lease as its researcher reaches it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RemoteAccessNode {
    pub host: String,
    pub port: u32,
    pub login: String,
    pub known_hosts_line: String,
    pub card_indexes: Vec<u32>,
}

/// Where to log into a remote lease, and a certificate for the researcher's key (save it as
/// `<key>-cert.pub`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct RemoteAccessView {
    pub owner_lease_id: u64,
    pub state: String,
    pub nodes: Vec<RemoteAccessNode>,
    pub certificate: String,
    pub valid_before_ms: i64,
}

/// The gateway's error: `{"error": {…}}` as every Suanli HTTP service's, or the same fields at
/// the top level as earlier gateways sent them (a member may upgrade its portal first).
#[derive(Deserialize)]
#[serde(untagged)]
enum GatewayErrorBody {
    Nested { error: GatewayError },
    Flat(GatewayError),
}

#[derive(Deserialize, Debug, PartialEq)]
struct GatewayError {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    owner_code: Option<String>,
}

impl GatewayErrorBody {
    fn detail(self) -> GatewayError {
        match self {
            GatewayErrorBody::Nested { error } | GatewayErrorBody::Flat(error) => error,
        }
    }
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

    async fn post<T: serde::de::DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T, ApiError> {
        let response = self
            .http
            .post(format!("{}{path}", self.api))
            .bearer_auth(&self.token)
            .json(body)
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .map_err(|e| ApiError::unavailable(format!("the federation gateway: {e}")))?;
        if response.status().is_success() {
            return response.json().await.map_err(|e| ApiError::unavailable(format!("the federation gateway's answer: {e}")));
        }
        let status = response.status();
        let e: GatewayErrorBody = response.json().await.map_err(|_| ApiError::unavailable(format!("the federation gateway answered {status}")))?;
        Err(gateway_error(e.detail()))
    }

    /// Leases another member's cards for `researcher` (this member's broker account).
    pub async fn lease(&self, researcher: u64, body: serde_json::Value) -> Result<RemoteLeaseView, ApiError> {
        let mut body = body;
        body["researcher_id"] = researcher.into();
        self.post("/v1/remote-leases", &body).await
    }

    pub async fn remote_leases(&self, researcher: u64) -> Result<Vec<RemoteLeaseView>, ApiError> {
        self.get("/v1/remote-leases", &[("researcher_id", &researcher.to_string())]).await
    }

    pub async fn access(&self, researcher: u64, id: u64, public_key: &str) -> Result<RemoteAccessView, ApiError> {
        self.post(&format!("/v1/remote-leases/{id}/access"), &serde_json::json!({"researcher_id": researcher, "public_key": public_key})).await
    }

    pub async fn end(&self, researcher: u64, id: u64) -> Result<RemoteLeaseView, ApiError> {
        self.post(&format!("/v1/remote-leases/{id}/end"), &serde_json::json!({"researcher_id": researcher})).await
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

/// The gateway's refusal as this portal's error: its code when it is one of the broker's,
/// the owning member's code for a refusal, `UNAVAILABLE` otherwise.
fn gateway_error(e: GatewayError) -> ApiError {
    let code = e.owner_code.as_deref().unwrap_or(&e.code);
    match suanli_types::ErrorCode::parse(code) {
        Some(suanli_types::ErrorCode::InvalidArgument) => ApiError::field("request", e.message),
        Some(code) => ApiError::broker(code, e.message),
        None => ApiError::unavailable(format!("{}: {}", e.code, e.message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateways_errors_are_read_in_the_shared_shape_and_in_the_earlier_flat_one() {
        let expected = GatewayError { code: "REFUSED".into(), message: "no".into(), owner_code: Some("INSUFFICIENT_CAPACITY".into()) };
        for body in [
            r#"{"error":{"code":"REFUSED","message":"no","owner_code":"INSUFFICIENT_CAPACITY"}}"#,
            r#"{"code":"REFUSED","message":"no","owner_code":"INSUFFICIENT_CAPACITY"}"#,
        ] {
            let read: GatewayErrorBody = serde_json::from_str(body).expect(body);
            assert_eq!(read.detail(), expected, "{body}");
        }
    }
}
