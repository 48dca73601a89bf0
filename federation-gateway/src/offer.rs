//! This member's offer: its broker's listed clusters, as the federation sees them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use suanli_federation::{FederationNode, ListingDigest};
use suanli_proto::v1;

/// How the gateway reaches its broker.
#[derive(Clone, Debug)]
pub struct BrokerAccess {
    pub endpoint: String,
    /// A service token with the `read` power (and `federation`, to lease other members'
    /// cards for this member's researchers).
    pub token: String,
    /// The cluster CA (PEM), for an `https://` endpoint.
    pub ca_pem: Option<String>,
    /// One channel for every call (it reconnects by itself and multiplexes calls).
    channel: Arc<tokio::sync::OnceCell<tonic::transport::Channel>>,
}

impl BrokerAccess {
    pub fn new(endpoint: String, token: String, ca_pem: Option<String>) -> BrokerAccess {
        BrokerAccess { endpoint, token, ca_pem, channel: Default::default() }
    }

    /// A client authenticated as `token` (this gateway's own when `None`), over the shared
    /// channel.
    pub async fn client(&self, token: Option<&str>) -> Result<suanli_proto::client::Client, suanli_proto::client::ClientError> {
        let channel = self.channel.get_or_try_init(|| suanli_proto::client::channel_checked(&self.endpoint, self.ca_pem.as_deref())).await?.clone();
        suanli_proto::client::with_token(channel, Some(token.unwrap_or(&self.token)))
    }
}

/// One listed cluster as a federation listing.
pub fn digest(cluster: &v1::Cluster) -> ListingDigest {
    let listing = cluster.listing.clone().unwrap_or_default();
    let prices: BTreeMap<String, i64> =
        listing.prices.iter().filter_map(|p| v1::BillingMode::try_from(p.mode).ok().map(|m| (mode_name(m).to_owned(), p.per_card_minor))).collect();
    ListingDigest {
        cluster_id: cluster.cluster_id,
        class: match v1::ClusterClass::try_from(cluster.class) {
            Ok(v1::ClusterClass::A) => "A".into(),
            _ => "B".into(),
        },
        title: listing.title,
        gpu_model: listing.gpu_model,
        vram_gib: listing.vram_gib,
        region: listing.region,
        total_cards: cluster.total_cards,
        free_cards: cluster.idle_cards,
        currency: listing.currency,
        prices,
    }
}

fn mode_name(mode: v1::BillingMode) -> &'static str {
    match mode {
        v1::BillingMode::Hourly => "hourly",
        v1::BillingMode::Daily => "daily",
        v1::BillingMode::Monthly => "monthly",
        v1::BillingMode::Yearly => "yearly",
        v1::BillingMode::Unspecified => "unspecified",
    }
}

/// Every listed cluster of the broker, page by page.
pub async fn read(broker: &BrokerAccess) -> Result<Vec<ListingDigest>, String> {
    let client = broker.client(None).await.map_err(|e| e.to_string())?;
    let clusters = suanli_proto::client::all_pages(|after| {
        let mut c = client.clone();
        async move {
            let page = c
                .list_catalogue(v1::ListCatalogueRequest { page_after_cluster_id: after, page_size: suanli_proto::client::LARGEST_PAGE, ..Default::default() })
                .await?
                .into_inner();
            Ok((page.clusters, page.next_page_after_cluster_id))
        }
    })
    .await
    .map_err(|s| format!("{:?}", suanli_proto::decode_status(&s)))?;
    Ok(clusters.iter().filter(|c| !c.delisted).map(digest).collect())
}

/// Reads the broker and announces its offer every `every` (a change reaches the federation
/// within one period; an unchanged offer is re-announced so it stays fresh). While the broker
/// cannot be read nothing is announced (logged), so the others see this offer go stale.
pub async fn announce_loop(node: FederationNode, broker: BrokerAccess, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match read(&broker).await {
            Ok(listings) => {
                if let Err(e) = node.announce(listings).await {
                    tracing::warn!(error = %e, "could not announce");
                    if matches!(e, suanli_federation::NodeError::Stopped) {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, endpoint = %broker.endpoint, "could not read the broker's catalogue"),
        }
    }
}
