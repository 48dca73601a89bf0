//! The portal's view of the marketplace: gRPC clients to the broker, and an in-memory copy of the
//! catalogue kept current from the broker's event stream (`Watch`), so listing, filtering and
//! sorting 10,000 clusters costs no broker round trip. The copy is only a cache: every write goes
//! to the broker, and what a user just changed is fetched back at once (read your writes).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use suanli_proto::client::{bearer, with_token, Bearer, Client};
use suanli_proto::convert::{cluster_class_from_wire, listing_from_wire};
use suanli_proto::v1;
use suanli_proto::v1::monitoring_service_client::MonitoringServiceClient;
use suanli_proto::v1::supplier_service_client::SupplierServiceClient;
use suanli_types::{CatalogueFacts, CatalogueFilter, ClusterClass, ClusterState, Listing};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::error::{ApiError, ApiResult};

/// One catalogue entry: the broker's record and its listing in domain form (for the filter).
#[derive(Clone, Debug)]
pub struct Entry {
    pub cluster: v1::Cluster,
    pub class: ClusterClass,
    pub listing: Listing,
}

impl Entry {
    fn from_wire(cluster: v1::Cluster) -> Option<Entry> {
        let class = cluster_class_from_wire(cluster.class)?;
        let listing = listing_from_wire(cluster.listing.clone()).ok()?;
        Some(Entry { cluster, class, listing })
    }
    pub fn state(&self) -> ClusterState {
        if self.cluster.delisted {
            ClusterState::Delisted
        } else {
            ClusterState::Listed
        }
    }
    pub fn matches(&self, filter: &CatalogueFilter) -> bool {
        filter.matches(&CatalogueFacts { class: self.class, state: self.state(), listing: &self.listing, idle_cards: self.cluster.idle_cards })
    }
}

/// The numbers of one entry, packed, in a vector ordered by cluster ID: a query scans these
/// (a few hundred KB for 10,000 listings, cache-resident) and runs the full domain filter only
/// on entries that pass. Sort keys come from here too.
#[derive(Clone, Copy, Debug)]
pub struct Facts {
    pub cluster_id: u64,
    pub class: ClusterClass,
    pub delisted: bool,
    pub supplier: u64,
    pub vram_gib: u32,
    pub memory_gib: u32,
    pub vcpus: u32,
    pub idle_cards: u32,
    pub total_cards: u32,
    /// Hash of the region, lower-cased (regions match exactly, case-insensitively).
    pub region: u64,
    /// Price per card by billing mode (`BillingMode::ALL` order); `None` where not offered.
    pub prices: [Option<i64>; 4],
}

pub fn region_key(region: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    region.trim().to_ascii_lowercase().hash(&mut h);
    h.finish()
}

pub fn mode_slot(mode: suanli_types::BillingMode) -> usize {
    suanli_types::BillingMode::ALL.iter().position(|m| *m == mode).unwrap_or(0)
}

impl Facts {
    fn of(e: &Entry) -> Facts {
        let mut prices = [None; 4];
        for (mode, price) in &e.listing.prices.per_card {
            prices[mode_slot(*mode)] = Some(*price);
        }
        Facts {
            cluster_id: e.cluster.cluster_id,
            class: e.class,
            delisted: e.cluster.delisted,
            supplier: e.cluster.supplier_id,
            vram_gib: e.listing.vram_gib,
            memory_gib: e.listing.memory_gib,
            vcpus: e.listing.vcpus,
            idle_cards: e.cluster.idle_cards,
            total_cards: e.cluster.total_cards,
            region: region_key(&e.listing.region),
            prices,
        }
    }

    /// Whether the entry can match `f`: a necessary condition, never sufficient on its own (the
    /// text fields are left to `CatalogueFilter::matches`, which has the final word).
    pub fn may_match(&self, f: &CatalogueFilter, region: Option<u64>) -> bool {
        f.class.is_none_or(|c| c == self.class)
            && f.min_vram_gib.is_none_or(|v| self.vram_gib >= v)
            && f.min_memory_gib.is_none_or(|v| self.memory_gib >= v)
            && f.min_vcpus.is_none_or(|v| self.vcpus >= v)
            && f.min_idle_cards.is_none_or(|v| self.idle_cards >= v)
            && region.is_none_or(|r| r == self.region)
            && f.billing_mode.is_none_or(|m| self.prices[mode_slot(m)].is_some_and(|p| f.max_price_minor.is_none_or(|max| p <= max)))
    }
}

#[derive(Default)]
pub struct Catalogue {
    pub index: u64,
    pub clusters: BTreeMap<u64, Arc<Entry>>,
    /// One `Facts` per entry of `clusters`, in the same (cluster ID) order.
    pub facts: Vec<Facts>,
    card_to_cluster: HashMap<u64, u64>,
    pub synced: bool,
}

impl Catalogue {
    fn upsert(&mut self, entry: Entry, cards: &[u64]) {
        for c in cards {
            self.card_to_cluster.insert(*c, entry.cluster.cluster_id);
        }
        let facts = Facts::of(&entry);
        match self.facts.binary_search_by_key(&facts.cluster_id, |f| f.cluster_id) {
            Ok(i) => self.facts[i] = facts,
            Err(i) => self.facts.insert(i, facts),
        }
        self.clusters.insert(entry.cluster.cluster_id, Arc::new(entry));
    }
    /// Adds a cluster as the event stream would (tests build catalogues with it).
    pub fn upsert_for_tests(&mut self, cluster: v1::Cluster) {
        if let Some(entry) = Entry::from_wire(cluster) {
            self.upsert(entry, &[]);
        }
    }

    /// Every entry, for the caller to filter and sort.
    pub fn entries(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.clusters.values()
    }
}

#[derive(Clone)]
pub struct Market {
    channel: Channel,
    platform_token: String,
    /// Signs the assertion of which operator acts, sent with every operator call (the broker
    /// enforces the role rules with it); `None`: the broker asks for none.
    operator_key: Option<suanli_pki::assertion::OperatorKey>,
    pub catalogue: Arc<RwLock<Catalogue>>,
}

pub type Monitoring = MonitoringServiceClient<InterceptedService<Channel, Bearer>>;
pub type Suppliers = SupplierServiceClient<InterceptedService<Channel, Bearer>>;

impl Market {
    /// Connects lazily: the portal starts (and serves its pages) while the broker is away.
    pub fn new(endpoint: &str, ca_pem: Option<&str>, platform_token: &str) -> Result<Market, String> {
        let mut target = Endpoint::from_shared(endpoint.to_owned()).map_err(|e| e.to_string())?.tcp_nodelay(true).connect_timeout(Duration::from_secs(5));
        if let Some(ca) = ca_pem {
            target = target.tls_config(ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca))).map_err(|e| e.to_string())?;
        }
        Ok(Market { channel: target.connect_lazy(), platform_token: platform_token.to_owned(), operator_key: None, catalogue: Arc::default() })
    }

    /// Operator calls carry an assertion signed with `key` (the broker's `operator_key_file`).
    pub fn with_operator_key(mut self, key: suanli_pki::assertion::OperatorKey) -> Market {
        self.operator_key = Some(key);
        self
    }

    /// The platform acting for `operator` in `role`: the interceptor, with the signed
    /// assertion of who acts and which roles they hold where a key is configured.
    fn operator_interceptor(&self, operator: &crate::auth::Principal, role: suanli_types::OperatorRole) -> ApiResult<Bearer> {
        let assertion = self.operator_key.as_ref().map(|key| {
            key.sign(&suanli_pki::assertion::OperatorAssertion {
                operator: operator.user.0 as u64,
                roles: operator.roles.iter().map(|r| r.as_str().to_owned()).collect(),
                acting: role.as_str().to_owned(),
                expires_ms: crate::db::now_ms() + suanli_pki::assertion::ASSERTION_LIFETIME_MS,
            })
        });
        suanli_proto::client::operator_bearer(&self.platform_token, role.as_str(), assertion.as_deref()).map_err(ApiError::internal)
    }

    pub fn platform(&self) -> ApiResult<Client> {
        self.as_token(&self.platform_token)
    }

    pub fn as_token(&self, token: &str) -> ApiResult<Client> {
        with_token(self.channel.clone(), Some(token)).map_err(ApiError::internal)
    }

    /// The broker's job service as the platform.
    pub fn jobs_platform(
        &self,
    ) -> ApiResult<
        suanli_proto::v1::job_service_client::JobServiceClient<
            tonic::service::interceptor::InterceptedService<tonic::transport::Channel, suanli_proto::client::Bearer>,
        >,
    > {
        self.jobs_as(&self.platform_token.clone())
    }

    /// The broker's job service as the user whose token this is.
    pub fn jobs_as(
        &self,
        token: &str,
    ) -> ApiResult<
        suanli_proto::v1::job_service_client::JobServiceClient<
            tonic::service::interceptor::InterceptedService<tonic::transport::Channel, suanli_proto::client::Bearer>,
        >,
    > {
        let auth = bearer(Some(token)).map_err(ApiError::internal)?;
        Ok(suanli_proto::v1::job_service_client::JobServiceClient::with_interceptor(self.channel.clone(), auth).max_decoding_message_size(64 * 1024 * 1024))
    }

    /// The platform acting for `operator` in `role` (the portal checked the operator holds it;
    /// the broker checks again where it has the operator key).
    pub fn as_operator(&self, operator: &crate::auth::Principal, role: suanli_types::OperatorRole) -> ApiResult<Client> {
        let interceptor = self.operator_interceptor(operator, role)?;
        Ok(suanli_proto::v1::broker_client::BrokerClient::with_interceptor(self.channel.clone(), interceptor).max_decoding_message_size(64 * 1024 * 1024))
    }

    /// The broker's monitoring as the platform: for the portal's own work (alert rules), never
    /// to show a user what the broker would not show them.
    pub fn monitoring(&self) -> ApiResult<Monitoring> {
        Ok(MonitoringServiceClient::with_interceptor(self.channel.clone(), bearer(Some(&self.platform_token)).map_err(ApiError::internal)?))
    }

    /// The broker's monitoring as `viewer` sees it: with their own market account's token, or
    /// for an operator as the platform acting in a role that views the market, so the broker's
    /// own rule decides what each may watch. Nobody watches anonymously.
    pub fn monitoring_for(&self, state: &crate::state::AppState, viewer: Option<&crate::auth::Principal>) -> ApiResult<Monitoring> {
        let viewer = viewer.ok_or_else(ApiError::unauthenticated)?;
        let interceptor = match viewer.roles.iter().copied().find(|r| crate::model::permissions(*r).contains(&crate::model::Permission::ViewMarket)) {
            Some(role) => self.operator_interceptor(viewer, role)?,
            None => bearer(Some(&viewer.broker_token(state)?)).map_err(ApiError::internal)?,
        };
        Ok(MonitoringServiceClient::with_interceptor(self.channel.clone(), interceptor))
    }

    pub fn suppliers(&self, token: &str) -> ApiResult<Suppliers> {
        Ok(SupplierServiceClient::with_interceptor(self.channel.clone(), bearer(Some(token)).map_err(ApiError::internal)?))
    }

    /// Fetches one cluster from the broker into the cache (after a write, or on an event).
    pub async fn refresh_cluster(&self, cluster_id: u64) -> ApiResult<Option<Arc<Entry>>> {
        let mut client = self.platform()?;
        let cluster = match client.get_cluster(v1::GetClusterRequest { cluster_id }).await {
            Ok(c) => c.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(s.into()),
        };
        let cards = client.list_cards(v1::ListCardsRequest { cluster_id }).await?.into_inner().cards;
        let card_ids: Vec<u64> = cards.iter().map(|c| c.card_id).collect();
        let Some(entry) = Entry::from_wire(cluster) else { return Ok(None) };
        let mut cat = self.catalogue.write().unwrap_or_else(|p| p.into_inner());
        cat.upsert(entry, &card_ids);
        Ok(cat.clusters.get(&cluster_id).cloned())
    }

    pub fn cached(&self, cluster_id: u64) -> Option<Arc<Entry>> {
        self.catalogue.read().unwrap_or_else(|p| p.into_inner()).clusters.get(&cluster_id).cloned()
    }

    /// Follows the broker's event stream forever, reconnecting with backoff.
    pub fn spawn_follower(&self) -> tokio::task::JoinHandle<()> {
        let market = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                match market.follow_once().await {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => {
                        tracing::warn!("catalogue stream from the broker ended: {e}; reconnecting in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        })
    }

    async fn follow_once(&self) -> Result<(), ApiError> {
        let (after_index, synced) = {
            let cat = self.catalogue.read().unwrap_or_else(|p| p.into_inner());
            (cat.index, cat.synced)
        };
        // Nothing cached yet: one bulk copy of the market instead of replaying its history
        // (a fetch per cluster an event touched). A broker older than the field replays.
        let mut stream = self.platform()?.watch(v1::WatchRequest { after_index, resync: !synced }).await?.into_inner();
        // A resync comes in parts; the state is replaced once the last has arrived.
        let mut resync: Option<v1::Resync> = None;
        while let Some(message) = stream.next().await {
            match message?.kind {
                Some(v1::watch_response::Kind::Resync(part)) => {
                    let whole = match resync.take() {
                        Some(mut so_far) if so_far.index == part.index => {
                            so_far.clusters.extend(part.clusters);
                            so_far.cards.extend(part.cards);
                            so_far.leases.extend(part.leases);
                            so_far.more = part.more;
                            so_far
                        }
                        _ => part,
                    };
                    if whole.more {
                        resync = Some(whole);
                    } else {
                        self.apply_resync(whole);
                    }
                }
                Some(v1::watch_response::Kind::Batch(b)) => self.apply_batch(b).await,
                None => {}
            }
        }
        Ok(())
    }

    fn apply_resync(&self, r: v1::Resync) {
        let mut fresh = Catalogue { index: r.index, synced: true, ..Default::default() };
        let mut node_to_cluster = HashMap::new();
        for c in &r.clusters {
            for n in &c.node_ids {
                node_to_cluster.insert(*n, c.cluster_id);
            }
        }
        let mut cards_by_cluster: HashMap<u64, Vec<u64>> = HashMap::new();
        for card in &r.cards {
            if let Some(cl) = node_to_cluster.get(&card.node_id) {
                cards_by_cluster.entry(*cl).or_default().push(card.card_id);
            }
        }
        for c in r.clusters {
            let cards = cards_by_cluster.remove(&c.cluster_id).unwrap_or_default();
            if let Some(entry) = Entry::from_wire(c) {
                fresh.upsert(entry, &cards);
            }
        }
        *self.catalogue.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    async fn apply_batch(&self, b: v1::EventBatch) {
        use v1::event::Kind;
        let mut dirty = Vec::new();
        {
            let cat = self.catalogue.read().unwrap_or_else(|p| p.into_inner());
            for e in &b.events {
                match &e.kind {
                    Some(Kind::ClusterPublished(c) | Kind::ClusterModified(c) | Kind::ClusterDelisted(c)) => dirty.push(c.cluster_id),
                    Some(Kind::CardStatusChanged(c)) => dirty.extend(cat.card_to_cluster.get(&c.card_id)),
                    _ => {}
                }
            }
        }
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty {
            if let Err(e) = self.refresh_cluster(id).await {
                tracing::warn!("refreshing cluster {id}: {}", e.message);
            }
        }
        let mut cat = self.catalogue.write().unwrap_or_else(|p| p.into_inner());
        cat.index = cat.index.max(b.index);
        cat.synced = true;
    }
}
