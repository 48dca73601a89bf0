//! The market through the portal: the catalogue (Ivcpc), cluster detail and monitoring (Irmds),
//! leases for researchers, and the supplier's side (Icpcss). Researchers and suppliers act on
//! the broker with their own account token, so the broker's rules decide what each may see and
//! do; the portal adds nothing it would have to keep in step.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use suanli_proto::convert::{
    self, billing_mode_from_wire, billing_mode_to_wire, card_status_from_wire, cluster_class_from_wire, cluster_class_to_wire, lease_state_from_wire,
};
use suanli_proto::v1;
use suanli_types::{BillingMode, CatalogueFilter, ClusterClass, Currency, DiskMedium, ErrorCode, Listing, LocalStorage, PriceList, ResourceType};
use tokio_stream::StreamExt;
use utoipa::{IntoParams, ToSchema};

use super::{fresh_request_id, idempotency_key, request_id, ApiJson, ApiPath, ApiQuery};
use crate::auth::{MaybePrincipal, Principal, Researcher, Supplier};
use crate::db::now_ms;
use crate::error::{ApiError, ApiResult, Problems};
use crate::market::Entry;
use crate::model::{Permission, UserKind};
use crate::state::AppState;

// ---------------------------------------------------------------------------------------------
// Views

/// The OpenAPI schema of a domain enum: a string, one of `values`.
fn one_of(values: impl IntoIterator<Item = &'static str>) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String).enum_values(Some(values)).build()
}

fn billing_mode_schema() -> utoipa::openapi::Object {
    one_of(BillingMode::ALL.map(BillingMode::as_str))
}

fn medium_schema() -> utoipa::openapi::Object {
    one_of(DiskMedium::ALL.map(DiskMedium::as_str))
}

fn class_schema() -> utoipa::openapi::Object {
    one_of([ClusterClass::A, ClusterClass::B].map(ClusterClass::as_str))
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct PriceView {
    #[schema(schema_with = billing_mode_schema)]
    pub billing_mode: BillingMode,
    /// Per card per period, in the currency's minor unit (fen).
    pub per_card_minor: i64,
}

#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct StorageView {
    pub data_disks: u32,
    pub data_disk_gb: u32,
    pub system_disk_gb: u32,
    #[schema(schema_with = medium_schema)]
    pub medium: DiskMedium,
}

#[derive(Clone, Serialize, ToSchema)]
pub struct ClusterView {
    pub cluster_id: u64,
    pub cpc_id: String,
    /// A (bare metal) or B (virtualized)
    #[schema(schema_with = class_schema)]
    pub class: ClusterClass,
    pub supplier_account: u64,
    pub title: String,
    pub resource_type: String,
    pub gpu_model: String,
    pub vram_gib: u32,
    pub total_cards: u32,
    pub idle_cards: u32,
    pub nodes: u32,
    pub memory_gib: u32,
    pub vcpus: u32,
    pub vendor: String,
    pub region: String,
    pub storage: StorageView,
    pub currency: String,
    pub prices: Vec<PriceView>,
    pub usage_instructions: String,
    pub delisted: bool,
    pub published_ms: i64,
    pub modified_ms: i64,
}

pub fn cluster_view(e: &Entry) -> ClusterView {
    let c = &e.cluster;
    let l = c.listing.clone().unwrap_or_default();
    let s = &e.listing.local_storage;
    ClusterView {
        cluster_id: c.cluster_id,
        cpc_id: c.cpc_id.clone(),
        class: e.class,
        supplier_account: c.supplier_id,
        title: l.title,
        resource_type: "GPU".into(),
        gpu_model: l.gpu_model,
        vram_gib: l.vram_gib,
        total_cards: c.total_cards,
        idle_cards: c.idle_cards,
        nodes: c.node_ids.len() as u32,
        memory_gib: l.memory_gib,
        vcpus: l.vcpus,
        vendor: l.vendor,
        region: l.region,
        storage: StorageView { data_disks: s.data_disks, data_disk_gb: s.data_disk_gb, system_disk_gb: s.system_disk_gb, medium: s.medium },
        currency: l.currency,
        prices: e.listing.prices.per_card.iter().map(|(m, p)| PriceView { billing_mode: *m, per_card_minor: *p }).collect(),
        usage_instructions: l.usage_instructions,
        delisted: c.delisted,
        published_ms: c.published_at_ms,
        modified_ms: c.modified_at_ms,
    }
}

// ---------------------------------------------------------------------------------------------
// Catalogue

/// Every listing field can be filtered on; empty parameters are ignored (HTML forms send them).
#[derive(Clone, Debug, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CatalogueQuery {
    /// A or B
    pub class: Option<String>,
    /// Case-insensitive substring.
    pub gpu_model: Option<String>,
    pub min_vram_gib: Option<String>,
    /// Total cards in the cluster.
    pub min_cards: Option<String>,
    pub min_idle_cards: Option<String>,
    pub min_memory_gib: Option<String>,
    pub min_vcpus: Option<String>,
    pub min_storage_gb: Option<String>,
    pub vendor: Option<String>,
    /// Exact, case-insensitive.
    pub region: Option<String>,
    /// hourly, daily, monthly or yearly: only clusters offering it (and priced by it).
    pub billing_mode: Option<String>,
    /// Per card per period of billing_mode, in fen.
    pub max_price_minor: Option<String>,
    pub currency: Option<String>,
    /// Suppliers see their own delisted clusters, operators all.
    pub include_delisted: Option<String>,
    /// newest (default), price, -price, idle, vram
    pub sort: Option<String>,
    /// 1-based.
    pub page: Option<String>,
    /// At most 100; default 20.
    pub page_size: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    Newest,
    PriceLow,
    PriceHigh,
    MostIdle,
    MostVram,
}

impl SortKey {
    pub const ALL: [(SortKey, &'static str); 5] =
        [(SortKey::Newest, "newest"), (SortKey::PriceLow, "price"), (SortKey::PriceHigh, "-price"), (SortKey::MostIdle, "idle"), (SortKey::MostVram, "vram")];
    pub fn parse(s: &str) -> Option<SortKey> {
        SortKey::ALL.iter().find(|(_, n)| *n == s).map(|(k, _)| *k)
    }
}

/// The parsed query: the shared domain filter plus what only the portal adds.
pub struct CatalogueSearch {
    pub filter: CatalogueFilter,
    pub min_cards: Option<u32>,
    pub sort: SortKey,
    pub page: usize,
    pub page_size: usize,
}

fn nonempty(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

fn number<T: std::str::FromStr>(p: &mut Problems, field: &str, v: &Option<String>) -> Option<T> {
    let raw = nonempty(v)?;
    match raw.parse::<T>() {
        Ok(n) => Some(n),
        Err(_) => {
            p.add(field, "must be a non-negative whole number");
            None
        }
    }
}

pub fn parse_billing_mode(p: &mut Problems, field: &str, raw: &str) -> Option<BillingMode> {
    match BillingMode::parse(raw) {
        Ok(m) => Some(m),
        Err(_) => {
            p.add(field, "hourly, daily, monthly or yearly");
            None
        }
    }
}

impl CatalogueQuery {
    pub fn parse(&self) -> ApiResult<CatalogueSearch> {
        let mut p = Problems::default();
        let class = nonempty(&self.class).and_then(|c| ClusterClass::parse(c).map_err(|_| p.add("class", "A or B")).ok());
        let billing_mode = nonempty(&self.billing_mode).and_then(|m| parse_billing_mode(&mut p, "billing_mode", m));
        let max_price_minor = number::<i64>(&mut p, "max_price_minor", &self.max_price_minor);
        let currency = nonempty(&self.currency).and_then(|c| match Currency::parse(c) {
            Ok(c) => Some(c),
            Err(e) => {
                p.add("currency", e.problem);
                None
            }
        });
        let filter = CatalogueFilter {
            class,
            gpu_model: nonempty(&self.gpu_model).map(str::to_owned),
            min_vram_gib: number(&mut p, "min_vram_gib", &self.min_vram_gib),
            min_idle_cards: number(&mut p, "min_idle_cards", &self.min_idle_cards),
            min_memory_gib: number(&mut p, "min_memory_gib", &self.min_memory_gib),
            min_vcpus: number(&mut p, "min_vcpus", &self.min_vcpus),
            vendor: nonempty(&self.vendor).map(str::to_owned),
            region: nonempty(&self.region).map(str::to_owned),
            min_storage_gb: number(&mut p, "min_storage_gb", &self.min_storage_gb),
            billing_mode,
            max_price_minor,
            currency,
            include_delisted: matches!(nonempty(&self.include_delisted), Some("true" | "1" | "on")),
        };
        if let Err(e) = filter.validate() {
            for f in e.field_errors() {
                p.add(&f.field, f.problem.clone());
            }
        }
        let sort = match nonempty(&self.sort) {
            None => SortKey::Newest,
            Some(s) => SortKey::parse(s).unwrap_or_else(|| {
                p.add("sort", "newest, price, -price, idle or vram");
                SortKey::Newest
            }),
        };
        if matches!(sort, SortKey::PriceLow | SortKey::PriceHigh) && filter.billing_mode.is_none() {
            p.add("sort", "sorting by price needs a billing_mode");
        }
        let page = number::<usize>(&mut p, "page", &self.page).unwrap_or(1);
        let page_size = number::<usize>(&mut p, "page_size", &self.page_size).unwrap_or(20);
        if page == 0 || page > 100_000 {
            p.add("page", "between 1 and 100000");
        }
        if page_size == 0 || page_size > 100 {
            p.add("page_size", "between 1 and 100");
        }
        let min_cards = number(&mut p, "min_cards", &self.min_cards);
        p.finish()?;
        Ok(CatalogueSearch { filter, min_cards, sort, page, page_size })
    }
}

#[derive(Serialize, ToSchema)]
pub struct CataloguePage {
    pub clusters: Vec<ClusterView>,
    pub total: usize,
    pub page: usize,
    pub page_size: usize,
    /// False until the portal has caught up with the broker once after starting.
    pub synced: bool,
}

/// Filters, sorts and pages the cached catalogue. `viewer_supplier`: whose delisted clusters
/// may be included (an operator passes `None` with `all_delisted`).
pub fn search_catalogue(state: &AppState, search: &CatalogueSearch, viewer: Option<&Principal>) -> CataloguePage {
    let cat = state.market.catalogue.read().unwrap_or_else(|p| p.into_inner());
    let sees_all = viewer.is_some_and(|v| v.can(Permission::ViewMarket));
    let own_account = viewer.filter(|v| v.kind == UserKind::Supplier).and_then(|v| v.broker_account);
    search_in(&cat, search, sees_all, own_account)
}

/// The search itself, over a catalogue copy: `sees_all` (operators who view the market) and
/// `own_account` (a supplier's) decide which delisted clusters `include_delisted` may show.
pub fn search_in(cat: &crate::market::Catalogue, search: &CatalogueSearch, sees_all: bool, own_account: Option<u64>) -> CataloguePage {
    let f = &search.filter;
    let region = f.region.as_deref().map(crate::market::region_key);
    // Text filters need the entry itself (the region hash only narrows); without them the
    // packed facts decide alone.
    let needs_entry = f.gpu_model.is_some() || f.vendor.is_some() || f.currency.is_some() || f.min_storage_gb.is_some() || f.region.is_some();
    let mut hits: Vec<&crate::market::Facts> = cat
        .facts
        .iter()
        .filter(|x| x.may_match(f, region))
        .filter(|x| !x.delisted || (f.include_delisted && (sees_all || Some(x.supplier) == own_account)))
        .filter(|x| search.min_cards.is_none_or(|m| x.total_cards >= m))
        .filter(|x| !needs_entry || cat.clusters.get(&x.cluster_id).is_some_and(|e| e.matches(f)))
        .collect();
    // Newest first is descending cluster ID (IDs are drawn in publication order): the scan
    // order reversed, no sort. Other orders sort only what the page needs.
    let total = hits.len();
    let start = (search.page - 1).saturating_mul(search.page_size).min(total);
    let end = (start + search.page_size).min(total);
    let slot = f.billing_mode.map(crate::market::mode_slot);
    let price = |x: &crate::market::Facts| slot.and_then(|s| x.prices[s]).unwrap_or(i64::MAX);
    let key = |x: &crate::market::Facts| -> (i64, u64) {
        match search.sort {
            SortKey::Newest => (0, u64::MAX - x.cluster_id),
            SortKey::PriceLow => (price(x), x.cluster_id),
            SortKey::PriceHigh => (-price(x), x.cluster_id),
            SortKey::MostIdle => (-i64::from(x.idle_cards), x.cluster_id),
            SortKey::MostVram => (-i64::from(x.vram_gib), x.cluster_id),
        }
    };
    if search.sort == SortKey::Newest {
        hits.reverse();
    } else if end > 0 {
        if end < total {
            hits.select_nth_unstable_by_key(end - 1, |x| key(x));
            hits.truncate(end);
        }
        hits.sort_unstable_by_key(|x| key(x));
    }
    let clusters = hits.get(start..end).unwrap_or_default().iter().filter_map(|x| cat.clusters.get(&x.cluster_id)).map(|e| cluster_view(e)).collect();
    CataloguePage { clusters, total, page: search.page, page_size: search.page_size, synced: cat.synced }
}

#[utoipa::path(get, path = "/api/v1/catalogue", params(CatalogueQuery), tag = "market",
    responses((status = 200, body = CataloguePage), (status = 400, body = crate::error::ErrorBody)))]
pub async fn catalogue(State(state): State<AppState>, viewer: MaybePrincipal, ApiQuery(q): ApiQuery<CatalogueQuery>) -> ApiResult<axum::Json<CataloguePage>> {
    let search = q.parse()?;
    Ok(axum::Json(search_catalogue(&state, &search, viewer.0.as_ref())))
}

#[derive(Serialize, ToSchema)]
pub struct CardView {
    pub card_id: u64,
    pub node_id: u64,
    pub index: u32,
    pub model: String,
    pub vram_mib: u64,
    /// idle, reserved, busy, offline or faulty
    pub status: String,
    pub health: String,
}

pub fn card_view(c: &v1::Card) -> CardView {
    let spec = c.spec.clone().unwrap_or_default();
    CardView {
        card_id: c.card_id,
        node_id: c.node_id,
        index: spec.index,
        model: spec.model,
        vram_mib: spec.vram_mib,
        status: card_status_from_wire(c.status).map_or("unknown", |s| s.as_str()).into(),
        health: match v1::CardHealth::try_from(c.health).unwrap_or(v1::CardHealth::Unspecified) {
            v1::CardHealth::Healthy => "healthy",
            v1::CardHealth::Lost => "lost",
            v1::CardHealth::Overheating => "overheating",
            v1::CardHealth::XidError => "xid_error",
            v1::CardHealth::AgentSilent => "agent_silent",
            v1::CardHealth::Unspecified => "unknown",
        }
        .into(),
    }
}

#[derive(Serialize, ToSchema)]
pub struct ClusterDetail {
    pub cluster: ClusterView,
    pub cards: Vec<CardView>,
}

/// A cluster the viewer may see (delisted ones only by their supplier and operators).
pub async fn visible_cluster(state: &AppState, id: u64, viewer: Option<&Principal>) -> ApiResult<std::sync::Arc<Entry>> {
    let entry = match state.market.cached(id) {
        Some(e) => e,
        None => state.market.refresh_cluster(id).await?.ok_or_else(|| ApiError::not_found(format!("cluster {id}")))?,
    };
    let sees = !entry.cluster.delisted
        || viewer.is_some_and(|v| v.can(Permission::ViewMarket) || (v.kind == UserKind::Supplier && v.broker_account == Some(entry.cluster.supplier_id)));
    if sees {
        Ok(entry)
    } else {
        Err(ApiError::not_found(format!("cluster {id}")))
    }
}

pub async fn cluster_detail_of(state: &AppState, id: u64, viewer: Option<&Principal>) -> ApiResult<ClusterDetail> {
    let entry = visible_cluster(state, id, viewer).await?;
    let cards = state.market.platform()?.list_cards(v1::ListCardsRequest { cluster_id: id }).await?.into_inner().cards;
    Ok(ClusterDetail { cluster: cluster_view(&entry), cards: cards.iter().map(card_view).collect() })
}

#[utoipa::path(get, path = "/api/v1/clusters/{id}", params(("id" = u64, Path)), tag = "market",
    responses((status = 200, body = ClusterDetail), (status = 404, body = crate::error::ErrorBody)))]
pub async fn cluster_detail(State(state): State<AppState>, viewer: MaybePrincipal, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<ClusterDetail>> {
    Ok(axum::Json(cluster_detail_of(&state, id, viewer.0.as_ref()).await?))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TelemetryQuery {
    /// How far back, 1–1440 minutes (default 60).
    pub minutes: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct TelemetryPoint {
    pub at_ms: i64,
    /// Averages over the cluster's present cards in this step.
    pub gpu_utilization_pct: f64,
    pub memory_utilization_pct: f64,
    pub temperature_c: f64,
    pub max_temperature_c: u32,
    pub power_w: f64,
    /// Card-samples in which a card was missing from the bus.
    pub lost_samples: u32,
}

#[derive(Serialize, ToSchema)]
pub struct TelemetrySeries {
    pub step_seconds: u32,
    pub points: Vec<TelemetryPoint>,
}

pub async fn telemetry_of(state: &AppState, id: u64, minutes: u32, viewer: Option<&Principal>) -> ApiResult<TelemetrySeries> {
    let entry = visible_cluster(state, id, viewer).await?;
    if entry.class != ClusterClass::B {
        return Err(ApiError::broker(ErrorCode::InvalidArgument, "Class A clusters are not monitored (SPEC §2)"));
    }
    let now = now_ms();
    let step = (minutes * 60 / 60).max(10);
    let reply = state
        .market
        .monitoring_for(state, viewer)?
        .query_telemetry(v1::QueryTelemetryRequest {
            scope: Some(v1::query_telemetry_request::Scope::ClusterId(id)),
            from_ms: now - i64::from(minutes) * 60_000,
            to_ms: 0,
            step_seconds: step,
        })
        .await?
        .into_inner();
    // Sum the cards' exact sums per step, then divide once.
    #[derive(Default)]
    struct Acc {
        samples: u64,
        lost: u32,
        util: u64,
        mem: u64,
        temp: u64,
        max_temp: u32,
        power: u64,
    }
    let mut steps: BTreeMap<i64, Acc> = BTreeMap::new();
    for card in &reply.cards {
        for p in &card.points {
            let a = steps.entry(p.at_ms).or_default();
            a.samples += u64::from(p.samples);
            a.lost += p.lost_samples;
            a.util += p.sum_gpu_utilization_pct;
            a.mem += p.sum_memory_utilization_pct;
            a.temp += p.sum_temperature_c;
            a.max_temp = a.max_temp.max(p.max_temperature_c);
            a.power += p.sum_power_draw_mw;
        }
    }
    let points = steps
        .into_iter()
        .map(|(at_ms, a)| {
            let n = a.samples.max(1) as f64;
            TelemetryPoint {
                at_ms,
                gpu_utilization_pct: a.util as f64 / n,
                memory_utilization_pct: a.mem as f64 / n,
                temperature_c: a.temp as f64 / n,
                max_temperature_c: a.max_temp,
                power_w: a.power as f64 / n / 1000.0,
                lost_samples: a.lost,
            }
        })
        .collect();
    Ok(TelemetrySeries { step_seconds: reply.step_seconds, points })
}

#[utoipa::path(get, path = "/api/v1/clusters/{id}/telemetry", params(("id" = u64, Path), TelemetryQuery), tag = "market",
    responses((status = 200, body = TelemetrySeries), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn telemetry(
    State(state): State<AppState>,
    viewer: MaybePrincipal,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<TelemetryQuery>,
) -> ApiResult<axum::Json<TelemetrySeries>> {
    let minutes = q.minutes.unwrap_or(60);
    if !(1..=1440).contains(&minutes) {
        return Err(ApiError::field("minutes", "between 1 and 1440"));
    }
    Ok(axum::Json(telemetry_of(&state, id, minutes, viewer.0.as_ref()).await?))
}

#[derive(Serialize, ToSchema)]
pub struct LiveCard {
    pub card_id: u64,
    pub present: bool,
    pub gpu_utilization_pct: u32,
    pub temperature_c: u32,
    pub power_w: f64,
}

/// One node sample as it arrives: what the cluster page's live charts plot.
#[derive(Serialize, ToSchema)]
pub struct LiveSample {
    pub node_id: u64,
    pub at_ms: i64,
    pub cpu_utilization_pct: f64,
    pub memory_used_mib: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub rtt_ms: f64,
    pub packet_loss_permille: f64,
    pub cards: Vec<LiveCard>,
}

/// Server-sent events, one `sample` event per node sample of the cluster (Class B).
#[utoipa::path(get, path = "/api/v1/clusters/{id}/live", params(("id" = u64, Path)), tag = "market",
    responses((status = 200, description = "text/event-stream of LiveSample"), (status = 400, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn live(
    State(state): State<AppState>,
    viewer: MaybePrincipal,
    ApiPath(id): ApiPath<u64>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let entry = visible_cluster(&state, id, viewer.0.as_ref()).await?;
    if entry.class != ClusterClass::B {
        return Err(ApiError::broker(ErrorCode::InvalidArgument, "Class A clusters are not monitored (SPEC §2)"));
    }
    let stream = state
        .market
        .monitoring_for(&state, viewer.0.as_ref())?
        .subscribe_telemetry(v1::SubscribeTelemetryRequest { scope: Some(v1::subscribe_telemetry_request::Scope::ClusterId(id)) })
        .await?
        .into_inner();
    let events = stream.map_while(|m| m.ok()).map(|m| {
        let s = m.sample.unwrap_or_default();
        let n = s.node.unwrap_or_default();
        let sample = LiveSample {
            node_id: m.node_id,
            at_ms: s.at_ms,
            cpu_utilization_pct: f64::from(n.cpu_utilization_permille) / 10.0,
            memory_used_mib: n.memory_used_mib,
            net_rx_bytes: n.net_rx_bytes,
            net_tx_bytes: n.net_tx_bytes,
            rtt_ms: f64::from(n.broker_rtt_us) / 1000.0,
            packet_loss_permille: f64::from(n.packet_loss_ppm) / 1000.0,
            cards: s
                .cards
                .iter()
                .zip(m.card_ids.iter())
                .map(|(c, id)| LiveCard {
                    card_id: *id,
                    present: c.present,
                    gpu_utilization_pct: c.gpu_utilization_pct,
                    temperature_c: c.temperature_c,
                    power_w: f64::from(c.power_draw_mw) / 1000.0,
                })
                .collect(),
        };
        Ok(Event::default().event("sample").data(serde_json::to_string(&sample).unwrap_or_default()))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

// ---------------------------------------------------------------------------------------------
// Leases

#[derive(Clone, Serialize, ToSchema)]
pub struct LeaseView {
    pub lease_id: u64,
    pub cluster_id: u64,
    pub cpc_id: String,
    #[schema(schema_with = class_schema)]
    pub class: ClusterClass,
    pub researcher_account: u64,
    pub supplier_account: u64,
    pub node_ids: Vec<u64>,
    pub card_ids: Vec<u64>,
    #[schema(schema_with = billing_mode_schema)]
    pub billing_mode: BillingMode,
    pub periods: u32,
    pub currency: String,
    pub price_per_card_minor: i64,
    pub amount_minor: i64,
    /// requested, approved, active, ended, expired or cancelled
    pub state: String,
    pub requested_ms: i64,
    pub reserved_until_ms: i64,
    pub activated_ms: i64,
    pub paid_until_ms: i64,
    pub ended_ms: i64,
    pub end_reason: String,
    pub auth_code_attempts_left: u32,
    /// Only for the approving supplier, while the lease waits for the researcher to verify it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authorization_code: Option<String>,
}

pub fn lease_view(state: &AppState, l: &v1::Lease) -> LeaseView {
    let price = l.price_per_card.clone().unwrap_or_default();
    let amount = l.amount.clone().unwrap_or_default();
    LeaseView {
        lease_id: l.lease_id,
        cluster_id: l.cluster_id,
        cpc_id: state.market.cached(l.cluster_id).map(|e| e.cluster.cpc_id.clone()).unwrap_or_default(),
        // The broker names both for every lease it sends; a reader of a broken one gets the
        // defaults rather than no page.
        class: cluster_class_from_wire(l.class).unwrap_or(ClusterClass::B),
        researcher_account: l.researcher_id,
        supplier_account: l.supplier_id,
        node_ids: l.node_ids.clone(),
        card_ids: l.card_ids.clone(),
        billing_mode: billing_mode_from_wire(l.billing_mode).unwrap_or(BillingMode::Hourly),
        periods: l.periods,
        currency: price.currency,
        price_per_card_minor: price.minor,
        amount_minor: amount.minor,
        state: lease_state_from_wire(l.state).map_or("unspecified".into(), |s| s.to_string()),
        requested_ms: l.requested_at_ms,
        reserved_until_ms: l.reserved_until_ms,
        activated_ms: l.activated_at_ms,
        paid_until_ms: l.paid_until_ms,
        ended_ms: l.ended_at_ms,
        end_reason: v1::EndReason::try_from(l.end_reason)
            .map_or("unspecified".into(), |r| r.as_str_name().trim_start_matches("END_REASON_").to_ascii_lowercase()),
        auth_code_attempts_left: l.auth_code_attempts_left,
        authorization_code: None,
    }
}

fn market_client(state: &AppState, p: &Principal) -> ApiResult<suanli_proto::client::Client> {
    state.market.as_token(&p.broker_token(state)?)
}

/// An operator who may intervene, acting on the broker in one of their intervening roles.
fn intervening_client(state: &AppState, p: &Principal) -> ApiResult<suanli_proto::client::Client> {
    p.require(Permission::Intervene)?;
    let role = p.roles.iter().copied().find(|r| r.may_intervene()).ok_or_else(|| ApiError::forbidden("no intervening role"))?;
    state.market.as_operator(p, role)
}

#[derive(Deserialize, ToSchema)]
pub struct LeaseRequest {
    pub cluster_id: u64,
    /// Class B: how many cards.
    #[serde(default)]
    pub cards: u32,
    /// Class A: the whole nodes wanted.
    #[serde(default)]
    pub node_ids: Vec<u64>,
    /// hourly, daily, monthly or yearly
    pub billing_mode: String,
    pub periods: u32,
    /// Optional idempotency key: a retry with the same key is applied once.
    #[serde(default)]
    pub request_id: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/leases", request_body = LeaseRequest, tag = "leases",
    responses((status = 201, body = LeaseView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn request_lease(State(state): State<AppState>, Researcher(principal): Researcher, ApiJson(req): ApiJson<LeaseRequest>) -> ApiResult<Response> {
    let mut p = Problems::default();
    let mode = parse_billing_mode(&mut p, "billing_mode", &req.billing_mode);
    if let Err(e) = suanli_types::lease::check_periods(req.periods) {
        p.0.extend(e.field_errors().iter().cloned());
    }
    p.finish()?;
    let mode = mode.ok_or_else(|| ApiError::field("billing_mode", "required"))?;
    let request_id = idempotency_key("lease", principal.user, req.request_id.as_deref());
    let lease = market_client(&state, &principal)?
        .request_lease(v1::RequestLeaseRequest {
            request_id,
            cluster_id: req.cluster_id,
            node_ids: req.node_ids,
            cards: req.cards,
            billing_mode: billing_mode_to_wire(mode),
            periods: req.periods,
        })
        .await?
        .into_inner();
    state.market.refresh_cluster(lease.cluster_id).await?;
    Ok((StatusCode::CREATED, axum::Json(lease_view(&state, &lease))).into_response())
}

/// The caller's leases: a researcher's own, a supplier's on its clusters (with codes it issued).
pub async fn my_leases(state: &AppState, p: &Principal) -> ApiResult<Vec<LeaseView>> {
    let leases = suanli_proto::client::all_leases(&market_client(state, p)?, false).await?;
    let mut views: Vec<LeaseView> = leases.iter().map(|l| lease_view(state, l)).collect();
    if p.kind == UserKind::Supplier {
        attach_codes(state, p, &mut views).await?;
    }
    views.sort_by_key(|v| std::cmp::Reverse(v.lease_id));
    Ok(views)
}

async fn attach_codes(state: &AppState, p: &Principal, views: &mut [LeaseView]) -> ApiResult<()> {
    let rows = sqlx::query("SELECT lease_id, code_enc FROM auth_codes WHERE supplier_user_id = $1").bind(p.user.0).fetch_all(&state.db.pool).await?;
    for r in rows {
        let lease_id = r.try_get::<i64, _>("lease_id")? as u64;
        if let Some(v) = views.iter_mut().find(|v| v.lease_id == lease_id && v.state == "approved") {
            v.authorization_code = Some(state.keys.open(&r.try_get::<String, _>("code_enc")?)?);
        }
    }
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/leases", tag = "leases", responses((status = 200, body = [LeaseView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_leases(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<Vec<LeaseView>>> {
    if principal.kind == UserKind::Operator {
        principal.require(Permission::ViewMarket)?;
        let leases = suanli_proto::client::all_leases(&state.market.platform()?, false).await?;
        return Ok(axum::Json(leases.iter().rev().map(|l| lease_view(&state, l)).collect()));
    }
    Ok(axum::Json(my_leases(&state, &principal).await?))
}

pub async fn lease_of(state: &AppState, p: &Principal, id: u64) -> ApiResult<LeaseView> {
    let lease = if p.kind == UserKind::Operator {
        p.require(Permission::ViewMarket)?;
        state.market.platform()?.get_lease(v1::GetLeaseRequest { lease_id: id }).await?.into_inner()
    } else {
        market_client(state, p)?.get_lease(v1::GetLeaseRequest { lease_id: id }).await?.into_inner()
    };
    let mut views = vec![lease_view(state, &lease)];
    if p.kind == UserKind::Supplier {
        attach_codes(state, p, &mut views).await?;
    }
    Ok(views.remove(0))
}

#[utoipa::path(get, path = "/api/v1/leases/{id}", params(("id" = u64, Path)), tag = "leases",
    responses((status = 200, body = LeaseView), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get_lease(State(state): State<AppState>, principal: Principal, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<LeaseView>> {
    Ok(axum::Json(lease_of(&state, &principal, id).await?))
}

#[derive(Deserialize, ToSchema)]
pub struct VerifyRequest {
    pub authorization_code: String,
}

#[utoipa::path(post, path = "/api/v1/leases/{id}/verify", params(("id" = u64, Path)), request_body = VerifyRequest, tag = "leases",
    responses((status = 200, body = LeaseView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn verify_code(
    State(state): State<AppState>,
    Researcher(principal): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<VerifyRequest>,
) -> ApiResult<axum::Json<LeaseView>> {
    let code = req.authorization_code.trim().to_ascii_uppercase();
    if code.is_empty() || code.len() > 64 {
        return Err(ApiError::field("authorization_code", "the 16-character code from the supplier"));
    }
    let lease = market_client(&state, &principal)?
        .verify_auth_code(v1::VerifyAuthCodeRequest { request_id: fresh_request_id("verify"), lease_id: id, authorization_code: code })
        .await?
        .into_inner();
    state.market.refresh_cluster(lease.cluster_id).await?;
    Ok(axum::Json(lease_view(&state, &lease)))
}

#[derive(Serialize, ToSchema)]
pub struct NodeLoginView {
    pub node_id: u64,
    pub login: String,
    pub ssh_host: String,
    pub ssh_port: u32,
    pub ssh_command: String,
    pub known_hosts_line: String,
    pub card_indexes: Vec<u32>,
    pub vnc_port: u32,
    pub vnc_tunnel: String,
}

#[derive(Serialize, ToSchema)]
pub struct AccessView {
    pub lease_id: u64,
    pub state: String,
    pub nodes: Vec<NodeLoginView>,
}

pub async fn access_of(state: &AppState, p: &Principal, id: u64) -> ApiResult<AccessView> {
    if p.kind == UserKind::Operator {
        return Err(ApiError::forbidden("access details are for the lease's researcher and supplier"));
    }
    let a = market_client(state, p)?.get_lease_access(v1::GetLeaseRequest { lease_id: id }).await?.into_inner();
    Ok(AccessView {
        lease_id: a.lease_id,
        state: lease_state_from_wire(a.state).map_or("unspecified".into(), |s| s.to_string()),
        nodes: a
            .nodes
            .into_iter()
            .map(|n| NodeLoginView {
                node_id: n.node_id,
                login: n.login,
                ssh_host: n.ssh_host,
                ssh_port: n.ssh_port,
                ssh_command: n.ssh_command,
                known_hosts_line: n.known_hosts_line,
                card_indexes: n.card_indexes,
                vnc_port: n.vnc_port,
                vnc_tunnel: n.vnc_tunnel,
            })
            .collect(),
    })
}

#[utoipa::path(get, path = "/api/v1/leases/{id}/access", params(("id" = u64, Path)), tag = "leases",
    responses((status = 200, body = AccessView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn lease_access(State(state): State<AppState>, principal: Principal, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<AccessView>> {
    Ok(axum::Json(access_of(&state, &principal, id).await?))
}

#[derive(Deserialize, ToSchema)]
pub struct SshCertificateRequest {
    /// An OpenSSH public key line (`ssh-ed25519 AAAA… comment`): the key the certificate is for.
    pub public_key: String,
    /// How long it is valid; absent: 8 hours. Never past the paid term, nor 24 hours.
    pub valid_seconds: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct SshCertificateView {
    /// Save beside the private key as `<key>-cert.pub` (or pass `-o CertificateFile=`).
    pub certificate: String,
    pub serial: u64,
    /// The lease's logins it admits.
    pub principals: Vec<String>,
    pub valid_before_ms: i64,
}

/// A short-lived OpenSSH user certificate for the lessee's key, signed by the platform's SSH
/// user CA, for the lease's logins (what `suanli ssh` uses).
#[utoipa::path(post, path = "/api/v1/leases/{id}/ssh-certificate", params(("id" = u64, Path)), tag = "leases", request_body = SshCertificateRequest,
    responses((status = 200, body = SshCertificateView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn ssh_certificate(
    State(state): State<AppState>,
    Researcher(principal): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<SshCertificateRequest>,
) -> ApiResult<axum::Json<SshCertificateView>> {
    let issue = v1::IssueSshCertificateRequest { lease_id: id, public_key: req.public_key, valid_seconds: req.valid_seconds.unwrap_or(0) };
    let c = market_client(&state, &principal)?.issue_ssh_certificate(issue).await?.into_inner();
    Ok(axum::Json(SshCertificateView { certificate: c.certificate, serial: c.serial, principals: c.principals, valid_before_ms: c.valid_before_ms }))
}

#[derive(Serialize, ToSchema)]
pub struct PasswordView {
    pub lease_id: u64,
    /// Shown once; the platform keeps only a hash.
    pub password: String,
}

#[utoipa::path(post, path = "/api/v1/leases/{id}/password", params(("id" = u64, Path)), tag = "leases",
    responses((status = 200, body = PasswordView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn lease_password(
    State(state): State<AppState>,
    Researcher(principal): Researcher,
    ApiPath(id): ApiPath<u64>,
) -> ApiResult<axum::Json<PasswordView>> {
    let r = market_client(&state, &principal)?
        .set_lease_password(v1::SetLeasePasswordRequest { request_id: fresh_request_id("password"), lease_id: id })
        .await?
        .into_inner();
    Ok(axum::Json(PasswordView { lease_id: r.lease_id, password: r.password }))
}

#[derive(Deserialize, ToSchema)]
pub struct ExtendRequest {
    pub periods: u32,
}

#[utoipa::path(post, path = "/api/v1/leases/{id}/extend", params(("id" = u64, Path)), request_body = ExtendRequest, tag = "leases",
    responses((status = 200, body = LeaseView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn extend_lease(
    State(state): State<AppState>,
    Researcher(principal): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<ExtendRequest>,
) -> ApiResult<axum::Json<LeaseView>> {
    suanli_types::lease::check_periods(req.periods).map_err(|e| ApiError::invalid(e.field_errors().to_vec()))?;
    let lease = market_client(&state, &principal)?
        .extend_lease(v1::ExtendLeaseRequest { request_id: fresh_request_id("extend"), lease_id: id, periods: req.periods })
        .await?
        .into_inner();
    Ok(axum::Json(lease_view(&state, &lease)))
}

#[derive(Deserialize, ToSchema, Default)]
pub struct EndRequest {
    /// Suppliers: hardware_fault, maintenance, policy_violation or non_payment.
    #[serde(default)]
    pub reason: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/leases/{id}/end", params(("id" = u64, Path)), request_body = EndRequest, tag = "leases",
    responses((status = 200, body = LeaseView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn end_lease(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<EndRequest>,
) -> ApiResult<axum::Json<LeaseView>> {
    let (mut client, reason) = match principal.kind {
        UserKind::Researcher => (market_client(&state, &principal)?, v1::EndReason::ByResearcher),
        UserKind::Supplier => {
            let reason = match req.reason.as_deref().unwrap_or("maintenance") {
                "hardware_fault" => v1::EndReason::SupplierHardwareFault,
                "maintenance" => v1::EndReason::SupplierMaintenance,
                "policy_violation" => v1::EndReason::SupplierPolicyViolation,
                "non_payment" => v1::EndReason::SupplierNonPayment,
                _ => return Err(ApiError::field("reason", "hardware_fault, maintenance, policy_violation or non_payment")),
            };
            (market_client(&state, &principal)?, reason)
        }
        UserKind::Operator => (intervening_client(&state, &principal)?, v1::EndReason::ByOperator),
    };
    let lease = client.end_lease(v1::EndLeaseRequest { request_id: fresh_request_id("end"), lease_id: id, reason: reason.into() }).await?.into_inner();
    state.market.refresh_cluster(lease.cluster_id).await?;
    Ok(axum::Json(lease_view(&state, &lease)))
}

#[derive(Serialize, ToSchema)]
pub struct SpendView {
    /// Sum of the amounts of leases that became active, per currency, in minor units: what
    /// was committed to. What was actually charged is in the broker's ledger (`balance`).
    pub committed: BTreeMap<String, i64>,
    pub balance: BalanceView,
    pub leases: Vec<LeaseView>,
}

/// The account's money in the broker's ledger, CNY minor units.
#[derive(Serialize, ToSchema)]
pub struct BalanceView {
    /// The broker's ID of this account (deposits name it).
    pub account_id: u64,
    pub currency: String,
    /// Prepaid money no lease holds (may be negative down to the credit limit).
    pub available_minor: i64,
    /// Held for live leases and not yet charged.
    pub held_minor: i64,
    /// Suppliers: earned, after the platform fee.
    pub earnings_minor: i64,
    pub credit_limit_minor: i64,
    /// Suppliers: mean score (0–100) of the last evaluated Class B leases; 0 with none.
    pub reliability_score: u32,
    pub evaluations: u32,
}

pub async fn spend_of(state: &AppState, p: &Principal) -> ApiResult<SpendView> {
    let leases = my_leases(state, p).await?;
    let mut committed = BTreeMap::new();
    for l in leases.iter().filter(|l| l.activated_ms > 0) {
        *committed.entry(l.currency.clone()).or_insert(0) += l.amount_minor;
    }
    let b = market_client(state, p)?.get_balance(v1::GetBalanceRequest { account_id: 0, currency: String::new() }).await?.into_inner();
    let balance = BalanceView {
        account_id: b.account_id,
        currency: b.currency,
        available_minor: b.available_minor,
        held_minor: b.held_minor,
        earnings_minor: b.earnings_minor,
        credit_limit_minor: b.credit_limit_minor,
        reliability_score: b.reliability_score,
        evaluations: b.evaluations,
    };
    Ok(SpendView { committed, balance, leases })
}

#[utoipa::path(get, path = "/api/v1/me/spend", tag = "leases", responses((status = 200, body = SpendView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn spend(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<SpendView>> {
    if principal.kind == UserKind::Operator {
        return Err(ApiError::forbidden("spend and earnings belong to researchers and suppliers"));
    }
    Ok(axum::Json(spend_of(&state, &principal).await?))
}

// ---------------------------------------------------------------------------------------------
// Suppliers

#[derive(Deserialize, ToSchema, Default)]
pub struct EnrollmentRequest {
    /// Default one day, at most 7 days.
    #[serde(default)]
    pub valid_seconds: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct EnrollmentToken {
    pub token: String,
    pub expires_ms: i64,
    /// What to run on the GPU node (see ops/ for the remote installer).
    pub install_hint: String,
}

#[utoipa::path(post, path = "/api/v1/supplier/enrollment-tokens", request_body = EnrollmentRequest, tag = "supplier",
    responses((status = 201, body = EnrollmentToken), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn enrollment_token(State(state): State<AppState>, Supplier(principal): Supplier, ApiJson(req): ApiJson<EnrollmentRequest>) -> ApiResult<Response> {
    let valid = req.valid_seconds.unwrap_or(86_400);
    if valid == 0 || valid > 7 * 86_400 {
        return Err(ApiError::field("valid_seconds", "between 1 and 604800"));
    }
    let r = state
        .market
        .suppliers(&principal.broker_token(&state)?)?
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id: fresh_request_id("enroll"), valid_seconds: valid })
        .await?
        .into_inner();
    let hint = format!("suanli-agent run --broker https://<broker>:50061 --broker-ca agent-ca.pem --enrollment-token {}", r.token);
    Ok((StatusCode::CREATED, axum::Json(EnrollmentToken { token: r.token, expires_ms: r.expires_at_ms, install_hint: hint })).into_response())
}

#[derive(Serialize, ToSchema)]
pub struct NodeView {
    pub node_id: u64,
    pub hostname: String,
    pub cpu_model: String,
    pub vcpus: u32,
    pub memory_gib: u32,
    pub disk_gib: u64,
    /// 0 while not in a cluster.
    pub cluster_id: u64,
    pub gateway: Option<String>,
    pub cards: Vec<CardView>,
    /// The node's agent's tunnel to this portal, while it is open (how the portal reaches
    /// services on the node).
    pub tunnel: Option<crate::tunnels::TunnelStatus>,
}

pub async fn my_nodes(state: &AppState, p: &Principal) -> ApiResult<Vec<NodeView>> {
    p.require_kind(UserKind::Supplier)?;
    let r = suanli_proto::client::all_nodes(&market_client(state, p)?, false).await?;
    Ok(r.nodes
        .iter()
        .map(|n| {
            let inv = n.inventory.clone().unwrap_or_default();
            NodeView {
                node_id: n.node_id,
                hostname: inv.hostname,
                cpu_model: inv.cpu_model,
                vcpus: inv.vcpus,
                memory_gib: inv.memory_gib,
                disk_gib: inv.disk_gib,
                cluster_id: n.cluster_id,
                gateway: n.access.as_ref().map(|a| format!("{}:{}", a.ssh_host, a.ssh_port)),
                cards: r.cards.iter().filter(|c| c.node_id == n.node_id).map(card_view).collect(),
                tunnel: state.tunnels.status(n.node_id),
            }
        })
        .collect())
}

#[utoipa::path(get, path = "/api/v1/supplier/nodes", tag = "supplier", responses((status = 200, body = [NodeView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_nodes(State(state): State<AppState>, Supplier(principal): Supplier) -> ApiResult<axum::Json<Vec<NodeView>>> {
    Ok(axum::Json(my_nodes(&state, &principal).await?))
}

pub fn my_clusters(state: &AppState, p: &Principal) -> ApiResult<Vec<ClusterView>> {
    p.require_kind(UserKind::Supplier)?;
    let cat = state.market.catalogue.read().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<ClusterView> = cat.entries().filter(|e| Some(e.cluster.supplier_id) == p.broker_account).map(|e| cluster_view(e)).collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.cluster_id));
    Ok(out)
}

#[utoipa::path(get, path = "/api/v1/supplier/clusters", tag = "supplier", responses((status = 200, body = [ClusterView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_my_clusters(State(state): State<AppState>, Supplier(principal): Supplier) -> ApiResult<axum::Json<Vec<ClusterView>>> {
    Ok(axum::Json(my_clusters(&state, &principal)?))
}

/// What a supplier states about a cluster (SPEC §2).
#[derive(Deserialize, ToSchema)]
pub struct ListingInput {
    pub title: String,
    pub gpu_model: String,
    pub vram_gib: u32,
    pub memory_gib: u32,
    pub vcpus: u32,
    pub vendor: String,
    pub region: String,
    pub storage: StorageView,
    /// ISO 4217, e.g. CNY
    pub currency: String,
    pub prices: Vec<PriceView>,
    /// Class A: required. Class B: leave empty.
    #[serde(default)]
    pub usage_instructions: String,
}

/// The supplier's listing in domain form, checked by the listing's own rules
/// (`Listing::validate` in crates/types, the same the broker applies) so a form shows every
/// problem at once; `None` when something could not be read (each problem recorded in `p`).
fn listing_of(p: &mut Problems, l: &ListingInput, class: Option<ClusterClass>) -> Option<Listing> {
    // A bad currency is one problem among the others: the rules run with a stand-in.
    let currency = Currency::parse(&l.currency).map_err(|e| p.add("currency", e.problem)).ok();
    let readable = currency.is_some();
    let mut per_card = BTreeMap::new();
    for (i, price) in l.prices.iter().enumerate() {
        if per_card.insert(price.billing_mode, price.per_card_minor).is_some() {
            p.add(&format!("prices[{i}].billing_mode"), format!("{} is priced twice", price.billing_mode));
        }
    }
    let listing = Listing {
        title: l.title.clone(),
        resource_type: ResourceType::Gpu,
        gpu_model: l.gpu_model.clone(),
        vram_gib: l.vram_gib,
        memory_gib: l.memory_gib,
        vcpus: l.vcpus,
        vendor: l.vendor.clone(),
        region: l.region.clone(),
        local_storage: LocalStorage {
            data_disks: l.storage.data_disks,
            data_disk_gb: l.storage.data_disk_gb,
            system_disk_gb: l.storage.system_disk_gb,
            medium: l.storage.medium,
        },
        prices: PriceList { currency: currency.unwrap_or_else(Currency::cny), per_card },
        usage_instructions: l.usage_instructions.clone(),
    };
    if let Some(class) = class {
        if let Err(e) = listing.validate(class) {
            p.0.extend(e.field_errors().iter().cloned());
        }
    }
    readable.then_some(listing)
}

#[derive(Deserialize, ToSchema)]
pub struct PublishRequest {
    /// A or B
    #[schema(schema_with = class_schema)]
    pub class: ClusterClass,
    pub node_ids: Vec<u64>,
    pub listing: ListingInput,
    #[serde(default)]
    pub request_id: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/supplier/clusters", request_body = PublishRequest, tag = "supplier",
    responses((status = 201, body = ClusterView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn publish(State(state): State<AppState>, Supplier(principal): Supplier, ApiJson(req): ApiJson<PublishRequest>) -> ApiResult<Response> {
    let mut p = Problems::default();
    if req.node_ids.is_empty() {
        p.add("node_ids", "choose at least one enrolled node");
    }
    let listing = listing_of(&mut p, &req.listing, Some(req.class));
    p.finish()?;
    let listing = listing.ok_or_else(|| ApiError::field("listing", "unreadable"))?;
    let request_id = idempotency_key("publish", principal.user, req.request_id.as_deref());
    let cluster = market_client(&state, &principal)?
        .publish_cluster(v1::PublishClusterRequest {
            request_id,
            class: cluster_class_to_wire(req.class),
            node_ids: req.node_ids,
            listing: Some(convert::listing_to_wire(&listing)),
        })
        .await?
        .into_inner();
    let entry = state.market.refresh_cluster(cluster.cluster_id).await?.ok_or_else(|| ApiError::internal("published cluster vanished"))?;
    Ok((StatusCode::CREATED, axum::Json(cluster_view(&entry))).into_response())
}

#[utoipa::path(put, path = "/api/v1/supplier/clusters/{id}/listing", params(("id" = u64, Path)), request_body = ListingInput, tag = "supplier",
    responses((status = 200, body = ClusterView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn modify(
    State(state): State<AppState>,
    Supplier(principal): Supplier,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<ListingInput>,
) -> ApiResult<axum::Json<ClusterView>> {
    let mut p = Problems::default();
    // The class decides some rules; a cluster this portal has not seen yet is checked by the
    // broker alone.
    let listing = listing_of(&mut p, &req, state.market.cached(id).map(|e| e.class));
    p.finish()?;
    let listing = listing.ok_or_else(|| ApiError::field("listing", "unreadable"))?;
    market_client(&state, &principal)?
        .modify_cluster(v1::ModifyClusterRequest { request_id: fresh_request_id("modify"), cluster_id: id, listing: Some(convert::listing_to_wire(&listing)) })
        .await?;
    let entry = state.market.refresh_cluster(id).await?.ok_or_else(|| ApiError::not_found(format!("cluster {id}")))?;
    Ok(axum::Json(cluster_view(&entry)))
}

#[utoipa::path(post, path = "/api/v1/supplier/clusters/{id}/delist", params(("id" = u64, Path)), tag = "supplier",
    responses((status = 200, body = ClusterView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn delist(State(state): State<AppState>, principal: Principal, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<ClusterView>> {
    let mut client = match principal.kind {
        UserKind::Supplier => market_client(&state, &principal)?,
        UserKind::Operator => intervening_client(&state, &principal)?,
        UserKind::Researcher => return Err(ApiError::forbidden("only the cluster's supplier or an operator delists it")),
    };
    client.delist_cluster(v1::DelistClusterRequest { request_id: request_id(&["delist", &id.to_string()]), cluster_id: id }).await?;
    let entry = state.market.refresh_cluster(id).await?.ok_or_else(|| ApiError::not_found(format!("cluster {id}")))?;
    Ok(axum::Json(cluster_view(&entry)))
}

#[derive(Deserialize, ToSchema, Default)]
pub struct ApproveRequest {
    /// How long the code stays valid; default: until the reservation ends.
    #[serde(default)]
    pub code_valid_seconds: Option<u32>,
}

#[utoipa::path(post, path = "/api/v1/supplier/leases/{id}/approve", params(("id" = u64, Path)), request_body = ApproveRequest, tag = "supplier",
    responses((status = 200, body = LeaseView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn approve(
    State(state): State<AppState>,
    Supplier(principal): Supplier,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<ApproveRequest>,
) -> ApiResult<axum::Json<LeaseView>> {
    let r = market_client(&state, &principal)?
        .approve_lease(v1::ApproveLeaseRequest {
            request_id: fresh_request_id("approve"),
            lease_id: id,
            code_valid_seconds: req.code_valid_seconds.unwrap_or(0),
        })
        .await?
        .into_inner();
    let lease = r.lease.ok_or_else(|| ApiError::internal("approval without a lease"))?;
    if !r.authorization_code.is_empty() {
        // Kept sealed so the supplier can look it up again until the researcher verifies it.
        let sealed = state.keys.seal(&r.authorization_code);
        let updated = sqlx::query("UPDATE auth_codes SET code_enc = $1, created_ms = $2 WHERE lease_id = $3 AND supplier_user_id = $4")
            .bind(&sealed)
            .bind(now_ms())
            .bind(id as i64)
            .bind(principal.user.0)
            .execute(&state.db.pool)
            .await?;
        if updated.rows_affected() == 0 {
            sqlx::query("INSERT INTO auth_codes (lease_id, supplier_user_id, code_enc, created_ms) VALUES ($1, $2, $3, $4)")
                .bind(id as i64)
                .bind(principal.user.0)
                .bind(&sealed)
                .bind(now_ms())
                .execute(&state.db.pool)
                .await?;
        }
    }
    let mut view = lease_view(&state, &lease);
    view.authorization_code = Some(r.authorization_code).filter(|c| !c.is_empty());
    Ok(axum::Json(view))
}

#[derive(Deserialize, ToSchema)]
pub struct CardStatusRequest {
    /// idle, offline or faulty
    pub status: String,
}

#[utoipa::path(put, path = "/api/v1/supplier/cards/{id}/status", params(("id" = u64, Path)), request_body = CardStatusRequest, tag = "supplier",
    responses((status = 200, body = CardView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn set_card_status(
    State(state): State<AppState>,
    Supplier(principal): Supplier,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<CardStatusRequest>,
) -> ApiResult<axum::Json<CardView>> {
    let status = match req.status.as_str() {
        "idle" => v1::CardStatus::Idle,
        "offline" => v1::CardStatus::Offline,
        "faulty" => v1::CardStatus::Faulty,
        _ => return Err(ApiError::field("status", "idle, offline or faulty")),
    };
    let card = market_client(&state, &principal)?
        .set_card_status(v1::SetCardStatusRequest { request_id: fresh_request_id("card"), card_id: id, status: status.into() })
        .await?
        .into_inner();
    Ok(axum::Json(card_view(&card)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::market::{Catalogue, Entry};
    use proptest::prelude::*;
    use suanli_types::BillingMode;

    const REGIONS: [&str; 3] = ["Shenzhen", "Beijing", "shenzhen-north"];

    fn cluster(id: u64, class_b: bool, region: usize, vram: u32, idle: u32, hourly: Option<i64>, delisted: bool) -> v1::Cluster {
        let mut prices = vec![v1::Price { mode: billing_mode_to_wire(BillingMode::Monthly), per_card_minor: 100_000 }];
        if let Some(p) = hourly {
            prices.push(v1::Price { mode: billing_mode_to_wire(BillingMode::Hourly), per_card_minor: p });
        }
        v1::Cluster {
            cluster_id: id,
            cpc_id: format!("CPC{id:08}"),
            supplier_id: 1 + id % 2,
            class: if class_b { v1::ClusterClass::B } else { v1::ClusterClass::A }.into(),
            delisted,
            listing: Some(v1::Listing {
                title: format!("t{id}"),
                gpu_model: "A100".into(),
                vram_gib: vram,
                memory_gib: 256,
                vcpus: 32,
                vendor: "v".into(),
                region: REGIONS[region].into(),
                local_storage: Some(v1::LocalStorage { data_disks: 1, data_disk_gb: 100, system_disk_gb: 100, medium: v1::DiskMedium::Ssd.into() }),
                currency: "CNY".into(),
                prices,
                usage_instructions: if class_b { String::new() } else { "ssh".into() },
            }),
            total_cards: 8,
            idle_cards: idle,
            published_at_ms: id as i64,
            ..Default::default()
        }
    }

    /// The obvious algorithm: the domain filter on every entry, a full sort, then the window.
    fn naive(cat: &Catalogue, s: &CatalogueSearch) -> Vec<u64> {
        let mut hits: Vec<&Entry> = cat.clusters.values().map(|e| e.as_ref()).filter(|e| e.matches(&s.filter) && !e.cluster.delisted).collect();
        let price = |e: &Entry| s.filter.billing_mode.and_then(|m| e.listing.prices.per_card.get(&m).copied()).unwrap_or(i64::MAX);
        match s.sort {
            SortKey::Newest => hits.sort_by_key(|e| std::cmp::Reverse(e.cluster.cluster_id)),
            SortKey::PriceLow => hits.sort_by_key(|e| (price(e), e.cluster.cluster_id)),
            SortKey::PriceHigh => hits.sort_by_key(|e| (std::cmp::Reverse(price(e)), e.cluster.cluster_id)),
            SortKey::MostIdle => hits.sort_by_key(|e| (std::cmp::Reverse(e.cluster.idle_cards), e.cluster.cluster_id)),
            SortKey::MostVram => hits.sort_by_key(|e| (std::cmp::Reverse(e.listing.vram_gib), e.cluster.cluster_id)),
        }
        hits.iter().skip((s.page - 1) * s.page_size).take(s.page_size).map(|e| e.cluster.cluster_id).collect()
    }

    proptest! {
        #[test]
        fn packed_scan_and_window_sort_equal_the_obvious_search(
            clusters in proptest::collection::vec((any::<bool>(), 0usize..3, prop_oneof![Just(24u32), Just(48), Just(80)], 0u32..9, proptest::option::of(100i64..2000), proptest::bool::weighted(0.1)), 0..60),
            class in proptest::option::of(any::<bool>()),
            region in proptest::option::of(0usize..3),
            min_vram in proptest::option::of(prop_oneof![Just(48u32), Just(80)]),
            hourly in any::<bool>(),
            max_price in proptest::option::of(100i64..2000),
            sort in 0usize..5,
            page in 1usize..4,
            page_size in 1usize..7,
        ) {
            let mut cat = Catalogue::default();
            for (i, (b, r, vram, idle, price, delisted)) in clusters.into_iter().enumerate() {
                cat.upsert_for_tests(cluster(i as u64 + 1, b, r, vram, idle, price, delisted));
            }
            let sort = SortKey::ALL[sort].1;
            let needs_mode = matches!(sort, "price" | "-price") || max_price.is_some();
            let q = CatalogueQuery {
                class: class.map(|b| if b { "B" } else { "A" }.to_owned()),
                region: region.map(|r| REGIONS[r].to_uppercase()),
                min_vram_gib: min_vram.map(|v| v.to_string()),
                billing_mode: (hourly || needs_mode).then(|| "hourly".to_owned()),
                max_price_minor: max_price.map(|p| p.to_string()),
                sort: Some(sort.to_owned()),
                page: Some(page.to_string()),
                page_size: Some(page_size.to_string()),
                ..Default::default()
            };
            let search = q.parse().expect("valid query");
            let got: Vec<u64> = search_in(&cat, &search, false, None).clusters.iter().map(|c| c.cluster_id).collect();
            prop_assert_eq!(got, naive(&cat, &search));
        }
    }
}
