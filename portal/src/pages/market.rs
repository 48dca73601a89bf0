//! Catalogue, cluster detail with monitoring charts, leases.

use axum::extract::{OriginalUri, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::{html, Markup};

use super::{api_form, error_page, field, page, pre, select, svg_chart, Ctx};
use crate::api::market::{access_of, cluster_detail_of, lease_of, search_catalogue, spend_of, telemetry_of, CatalogueQuery, ClusterView, LeaseView, SortKey};
use crate::api::{ApiPath, ApiQuery};
use crate::auth::MaybePrincipal;
use crate::error::ApiError;
use crate::i18n::{datetime, money, Msg};
use crate::model::UserKind;
use crate::state::AppState;
use suanli_types::{BillingMode, ClusterClass};

fn mode_name(ctx: &Ctx, mode: BillingMode) -> &'static str {
    match mode {
        BillingMode::Hourly => ctx.t(Msg::Hourly),
        BillingMode::Daily => ctx.t(Msg::Daily),
        BillingMode::Monthly => ctx.t(Msg::Monthly),
        BillingMode::Yearly => ctx.t(Msg::Yearly),
    }
}

fn prices(ctx: &Ctx, c: &ClusterView) -> Markup {
    html! {
        ul.prices { @for p in &c.prices { li { (money(&c.currency, p.per_card_minor, ctx.lang)) " / " (mode_name(ctx, p.billing_mode)) } } }
    }
}

fn class_name(ctx: &Ctx, class: ClusterClass) -> &'static str {
    match class {
        ClusterClass::A => ctx.t(Msg::ClassA),
        ClusterClass::B => ctx.t(Msg::ClassB),
    }
}

pub async fn catalogue_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiQuery(q): ApiQuery<CatalogueQuery>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let result = q.parse().map(|search| search_catalogue(&state, &search, ctx.viewer.as_ref()));
    let federated = federated_matches(&state, &q).await;
    let v = |f: &Option<String>| f.clone().unwrap_or_default();
    let any = ctx.t(Msg::Any);
    let modes = [("", any), ("hourly", ctx.t(Msg::Hourly)), ("daily", ctx.t(Msg::Daily)), ("monthly", ctx.t(Msg::Monthly)), ("yearly", ctx.t(Msg::Yearly))];
    let sorts: Vec<(&str, &str)> = SortKey::ALL
        .iter()
        .map(|(k, n)| {
            (
                *n,
                match k {
                    SortKey::Newest => ctx.t(Msg::Newest),
                    SortKey::PriceLow => ctx.t(Msg::PriceLow),
                    SortKey::PriceHigh => ctx.t(Msg::PriceHigh),
                    SortKey::MostIdle => ctx.t(Msg::MostIdle),
                    SortKey::MostVram => ctx.t(Msg::MostVram),
                },
            )
        })
        .collect();
    let filters = html! {
        form.filters method="get" action="/" {
            (select(ctx.t(Msg::Class), "class", &[("", any), ("A", ctx.t(Msg::ClassA)), ("B", ctx.t(Msg::ClassB))], &v(&q.class)))
            (field(ctx.t(Msg::GpuModel), "gpu_model", "text", &v(&q.gpu_model), false))
            (field(ctx.t(Msg::Vram), "min_vram_gib", "number", &v(&q.min_vram_gib), false))
            (field(ctx.t(Msg::Cards), "min_cards", "number", &v(&q.min_cards), false))
            (field(ctx.t(Msg::IdleCards), "min_idle_cards", "number", &v(&q.min_idle_cards), false))
            (field(ctx.t(Msg::Memory), "min_memory_gib", "number", &v(&q.min_memory_gib), false))
            (field(ctx.t(Msg::Vcpus), "min_vcpus", "number", &v(&q.min_vcpus), false))
            (field(ctx.t(Msg::Storage), "min_storage_gb", "number", &v(&q.min_storage_gb), false))
            (field(ctx.t(Msg::Region), "region", "text", &v(&q.region), false))
            (field(ctx.t(Msg::Vendor), "vendor", "text", &v(&q.vendor), false))
            (select(ctx.t(Msg::BillingMode), "billing_mode", &modes, &v(&q.billing_mode)))
            (field(ctx.t(Msg::MaxPrice), "max_price_minor", "number", &v(&q.max_price_minor), false))
            (select(ctx.t(Msg::Sort), "sort", &sorts, &v(&q.sort)))
            button type="submit" { (ctx.t(Msg::Filter)) }
            a href="/" { (ctx.t(Msg::Reset)) }
        }
    };
    let body = match result {
        Err(e) => html! { (filters) p.error { (e.message) } },
        Ok(page_data) => {
            let pages = page_data.total.div_ceil(page_data.page_size).max(1);
            let link = |n: usize| {
                let mut q2 = q.clone();
                q2.page = Some(n.to_string());
                format!("/?{}", serde_urlencoded_like(&q2))
            };
            html! {
                (filters)
                p.count { (page_data.total) " " (ctx.t(Msg::Results)) }
                @if page_data.clusters.is_empty() { p { (ctx.t(Msg::NoResults)) } }
                @else {
                    table.catalogue {
                        thead { tr {
                            th { "CPcId" } th { (ctx.t(Msg::Title)) } th { (ctx.t(Msg::Class)) } th { (ctx.t(Msg::GpuModel)) }
                            th { (ctx.t(Msg::Vram)) } th { (ctx.t(Msg::IdleCards)) " / " (ctx.t(Msg::Cards)) } th { (ctx.t(Msg::Memory)) }
                            th { (ctx.t(Msg::Vcpus)) } th { (ctx.t(Msg::Region)) } th { (ctx.t(Msg::Vendor)) } th { (ctx.t(Msg::Price)) } th { (ctx.t(Msg::Status)) }
                        } }
                        tbody {
                            @for c in &page_data.clusters {
                                tr {
                                    td { a href={ "/clusters/" (c.cluster_id) } { (c.cpc_id) } }
                                    td { (c.title) } td { (class_name(&ctx, c.class)) } td { (c.gpu_model) } td { (c.vram_gib) }
                                    td { (c.idle_cards) " / " (c.total_cards) } td { (c.memory_gib) } td { (c.vcpus) } td { (c.region) } td { (c.vendor) }
                                    td { (prices(&ctx, c)) }
                                    td { @if c.delisted { (ctx.t(Msg::Delisted)) } @else { (ctx.t(Msg::Listed)) } }
                                }
                            }
                        }
                    }
                    nav.pager {
                        @if page_data.page > 1 { a href=(link(page_data.page - 1)) { (ctx.t(Msg::Previous)) } }
                        span { (page_data.page) " / " (pages) }
                        @if page_data.page < pages { a href=(link(page_data.page + 1)) { (ctx.t(Msg::Next)) } }
                    }
                }
            }
        }
    };
    let body = html! {
        (body)
        @if !federated.is_empty() {
            h2 { (ctx.t(Msg::FederatedOffers)) }
            table.catalogue.federated {
                thead { tr {
                    th { (ctx.t(Msg::Origin)) } th { "ID" } th { (ctx.t(Msg::Title)) } th { (ctx.t(Msg::Class)) } th { (ctx.t(Msg::GpuModel)) }
                    th { (ctx.t(Msg::Vram)) } th { (ctx.t(Msg::IdleCards)) " / " (ctx.t(Msg::Cards)) } th { (ctx.t(Msg::Region)) } th { (ctx.t(Msg::Hourly)) }
                } }
                tbody {
                    @for o in &federated {
                        tr data-origin=(o.origin) {
                            td { a href="/federation" { (o.origin) } } td { (o.listing.cluster_id) } td { (o.listing.title) } td { (o.listing.class) }
                            td { (o.listing.gpu_model) } td { (o.listing.vram_gib) } td { (o.listing.free_cards) " / " (o.listing.total_cards) }
                            td { (o.listing.region) }
                            td { (o.listing.prices.get("hourly").map(|p| money(&o.listing.currency, *p, ctx.lang)).unwrap_or_else(|| "—".into())) }
                        }
                    }
                }
            }
        }
    };
    page(&ctx, ctx.t(Msg::Catalogue), body)
}

/// Other members' current offers that pass the search's filters on what they announce (class,
/// GPU model, VRAM, idle cards, region); none outside a federation or when its gateway does not
/// answer (the local catalogue is shown regardless).
async fn federated_matches(state: &AppState, q: &CatalogueQuery) -> Vec<crate::federation::FederatedEntry> {
    let Ok(link) = crate::federation::link(state) else { return Vec::new() };
    let (Ok(members), Ok(offers)) = tokio::join!(link.members(), link.catalogue(None)) else { return Vec::new() };
    let me: Vec<&str> = members.members.iter().filter(|m| m.is_self).map(|m| m.name.as_str()).collect();
    let number = |v: &Option<String>| v.as_deref().and_then(|v| v.trim().parse::<u32>().ok()).unwrap_or(0);
    let text = |v: &Option<String>| v.as_deref().map(|v| v.trim().to_lowercase()).filter(|v| !v.is_empty());
    let (class, model, region) = (text(&q.class), text(&q.gpu_model), text(&q.region));
    offers
        .into_iter()
        .filter(|o| !me.contains(&o.origin.as_str()))
        .filter(|o| class.as_ref().is_none_or(|c| o.listing.class.to_lowercase() == *c))
        .filter(|o| model.as_ref().is_none_or(|m| o.listing.gpu_model.to_lowercase().contains(m.as_str())))
        .filter(|o| region.as_ref().is_none_or(|r| o.listing.region.to_lowercase() == *r))
        .filter(|o| o.listing.vram_gib >= number(&q.min_vram_gib) && o.listing.free_cards >= number(&q.min_idle_cards))
        .collect()
}

/// The query string of a catalogue query (for pager links).
fn serde_urlencoded_like(q: &CatalogueQuery) -> String {
    let value = serde_json::to_value(q).unwrap_or_default();
    let mut out = Vec::new();
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            if let Some(s) = v.as_str().filter(|s| !s.is_empty()) {
                out.push(format!("{k}={}", super::urlencode(s)));
            }
        }
    }
    out.join("&")
}

pub async fn cluster_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiPath(id): ApiPath<u64>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let detail = match cluster_detail_of(&state, id, ctx.viewer.as_ref()).await {
        Ok(d) => d,
        Err(e) => return error_page(&ctx, e),
    };
    let c = &detail.cluster;
    let monitoring = if c.class == ClusterClass::B {
        match telemetry_of(&state, id, 60, ctx.viewer.as_ref()).await {
            Ok(series) => {
                let pick = |f: fn(&crate::api::market::TelemetryPoint) -> f64| series.points.iter().map(|p| (p.at_ms, f(p))).collect::<Vec<_>>();
                html! {
                    section.monitoring data-live={ "/api/v1/clusters/" (id) "/live" } {
                        h2 { (ctx.t(Msg::Telemetry)) }
                        div.charts {
                            (svg_chart(ctx.t(Msg::GpuUtil), &pick(|p| p.gpu_utilization_pct), 100.0))
                            (svg_chart(ctx.t(Msg::Temperature), &pick(|p| p.temperature_c), 90.0))
                            (svg_chart(ctx.t(Msg::Power), &pick(|p| p.power_w), 100.0))
                        }
                        div.charts.live {
                            @for (key, label, max) in [("cpu", ctx.t(Msg::CpuUtil), 100.0), ("net", ctx.t(Msg::Network), 100.0), ("rtt", ctx.t(Msg::Latency), 10.0), ("loss", ctx.t(Msg::Loss), 1.0), ("gpu", ctx.t(Msg::GpuUtil), 100.0), ("temp", ctx.t(Msg::Temperature), 90.0)] {
                                figure.chart data-series=(key) data-max=(max) {
                                    figcaption { (label) ": " strong { "—" } }
                                    svg viewBox="0 0 360 120" preserveAspectRatio="none" { polyline points="" fill="none" stroke="currentColor" stroke-width="2" {} }
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => html! { p.error { (e.message) } },
        }
    } else {
        html! { p.note { (ctx.t(Msg::NotMonitored)) } }
    };
    let request = match &ctx.viewer {
        Some(v) if v.kind == UserKind::Researcher && !c.delisted => {
            let modes: Vec<(&str, &str)> = c.prices.iter().map(|p| (p.billing_mode.as_str(), mode_name(&ctx, p.billing_mode))).collect();
            let nodes = detail.cards.iter().map(|card| card.node_id).collect::<std::collections::BTreeSet<_>>();
            html! {
                section.request {
                    h2 { (ctx.t(Msg::RequestLease)) }
                    (api_form("/api/v1/leases", "POST", Some("/leases/{lease_id}"), None, ctx.t(Msg::RequestLease), html! {
                        input type="hidden" name="cluster_id" value=(c.cluster_id) data-type="number";
                        @if c.class == ClusterClass::A {
                            label { span { (ctx.t(Msg::Nodes)) }
                                @for n in &nodes { label.inline { input type="checkbox" name="node_ids" value=(n) data-type="number-list"; " node-" (n) } }
                                small.problem data-for="node_ids" {}
                            }
                        } @else {
                            (field(ctx.t(Msg::Cards), "cards", "number", "1", true))
                        }
                        (select(ctx.t(Msg::BillingMode), "billing_mode", &modes, ""))
                        (field(ctx.t(Msg::Periods), "periods", "number", "1", true))
                    }))
                }
            }
        }
        _ => html! {},
    };
    let owner = ctx.viewer.as_ref().is_some_and(|v| v.kind == UserKind::Supplier && v.broker_account == Some(c.supplier_account));
    let modify = if owner && !c.delisted {
        let price_of = |mode: BillingMode| {
            c.prices.iter().find(|p| p.billing_mode == mode).map(|p| format!("{}.{:02}", p.per_card_minor / 100, p.per_card_minor % 100)).unwrap_or_default()
        };
        let t = |m| ctx.t(m);
        html! {
            section.modify {
                h2 { (t(Msg::Modify)) }
                form.api data-api={ "/api/v1/supplier/clusters/" (c.cluster_id) "/listing" } data-method="PUT" data-next={ "/clusters/" (c.cluster_id) } data-prices="top" {
                    (field(t(Msg::Title), "title", "text", &c.title, true))
                    (field(t(Msg::GpuModel), "gpu_model", "text", &c.gpu_model, true))
                    (field(t(Msg::Vram), "vram_gib", "number", &c.vram_gib.to_string(), true))
                    (field(t(Msg::Memory), "memory_gib", "number", &c.memory_gib.to_string(), true))
                    (field(t(Msg::Vcpus), "vcpus", "number", &c.vcpus.to_string(), true))
                    (field(t(Msg::Vendor), "vendor", "text", &c.vendor, true))
                    (field(t(Msg::Region), "region", "text", &c.region, true))
                    (field("data disks", "storage.data_disks", "number", &c.storage.data_disks.to_string(), true))
                    (field("data disk GB", "storage.data_disk_gb", "number", &c.storage.data_disk_gb.to_string(), true))
                    (field("system disk GB", "storage.system_disk_gb", "number", &c.storage.system_disk_gb.to_string(), true))
                    (select("medium", "storage.medium", &[("nvme", "NVMe"), ("ssd", "SSD"), ("hdd", "HDD")], c.storage.medium.as_str()))
                    input type="hidden" name="currency" value=(c.currency);
                    @for mode in BillingMode::ALL {
                        (field(&format!("{} ({}, {})", t(Msg::Price), mode_name(&ctx, mode), c.currency), &format!("price.{mode}"), "text", &price_of(mode), false))
                    }
                    small.problem data-for="prices" {}
                    @if c.class == ClusterClass::A {
                        label { span { (t(Msg::UsageInstructions)) } textarea name="usage_instructions" { (c.usage_instructions) } small.problem data-for="usage_instructions" {} }
                    }
                    p.form-error role="alert" {}
                    button type="submit" { (t(Msg::Save)) }
                }
            }
        }
    } else {
        html! {}
    };
    let body = html! {
        dl.facts {
            dt { "CPcId" } dd { (c.cpc_id) }
            dt { (ctx.t(Msg::Class)) } dd { (class_name(&ctx, c.class)) }
            dt { (ctx.t(Msg::Status)) } dd { @if c.delisted { (ctx.t(Msg::Delisted)) } @else { (ctx.t(Msg::Listed)) } }
            dt { (ctx.t(Msg::GpuModel)) } dd { (c.nodes) " × " (c.total_cards / c.nodes.max(1)) " × " (c.gpu_model) " (" (c.resource_type) ")" }
            dt { (ctx.t(Msg::Vram)) } dd { (c.vram_gib) }
            dt { (ctx.t(Msg::IdleCards)) } dd { (c.idle_cards) " / " (c.total_cards) }
            dt { (ctx.t(Msg::Memory)) } dd { (c.memory_gib) }
            dt { (ctx.t(Msg::Vcpus)) } dd { (c.vcpus) }
            dt { (ctx.t(Msg::Storage)) } dd { (c.storage.data_disks) " × " (c.storage.data_disk_gb) " GB " (c.storage.medium) " + " (c.storage.system_disk_gb) " GB" }
            dt { (ctx.t(Msg::Region)) } dd { (c.region) }
            dt { (ctx.t(Msg::Vendor)) } dd { (c.vendor) }
            dt { (ctx.t(Msg::Price)) } dd { (prices(&ctx, c)) }
        }
        @if !c.usage_instructions.is_empty() { h2 { (ctx.t(Msg::UsageInstructions)) } (pre(&c.usage_instructions)) }
        (request)
        (modify)
        (monitoring)
        h2 { (ctx.t(Msg::CardList)) }
        table { thead { tr { th { "#" } th { (ctx.t(Msg::GpuModel)) } th { "node" } th { (ctx.t(Msg::Status)) } th { "health" } } }
            tbody { @for card in &detail.cards { tr { td { (card.index) } td { (card.model) } td { (card.node_id) } td.status { (status_name(&ctx, &card.status)) } td { (card.health) } } } } }
    };
    page(&ctx, &format!("{} — {}", c.cpc_id, c.title), body)
}

pub fn status_name(ctx: &Ctx, s: &str) -> &'static str {
    match s {
        "idle" => ctx.t(Msg::Idle),
        "reserved" => ctx.t(Msg::Reserved),
        "busy" => ctx.t(Msg::Busy),
        "offline" => ctx.t(Msg::Offline),
        "faulty" => ctx.t(Msg::Faulty),
        _ => "?",
    }
}

fn lease_state_name(ctx: &Ctx, s: &str) -> &'static str {
    match s {
        "requested" => ctx.t(Msg::StateRequested),
        "approved" => ctx.t(Msg::StateApproved),
        "active" => ctx.t(Msg::StateActive),
        "ended" => ctx.t(Msg::StateEnded),
        "expired" => ctx.t(Msg::StateExpired),
        "cancelled" => ctx.t(Msg::StateCancelled),
        _ => "?",
    }
}

pub fn lease_table(ctx: &Ctx, leases: &[LeaseView]) -> Markup {
    html! {
        table.leases {
            thead { tr { th { (ctx.t(Msg::Lease)) } th { "CPcId" } th { (ctx.t(Msg::State)) } th { (ctx.t(Msg::Cards)) } th { (ctx.t(Msg::BillingMode)) } th { (ctx.t(Msg::Amount)) } th { (ctx.t(Msg::Requested)) } th { (ctx.t(Msg::PaidUntil)) } th { (ctx.t(Msg::AuthCode)) } } }
            tbody {
                @for l in leases {
                    tr data-lease=(l.lease_id) {
                        td { a href={ "/leases/" (l.lease_id) } { "lease-" (l.lease_id) } }
                        td { (l.cpc_id) } td.state data-state=(l.state) { (lease_state_name(ctx, &l.state)) } td { (l.card_ids.len()) }
                        td { (l.periods) " × " (mode_name(ctx, l.billing_mode)) }
                        td { (money(&l.currency, l.amount_minor, ctx.lang)) }
                        td { (datetime(l.requested_ms, ctx.lang)) } td { (datetime(l.paid_until_ms, ctx.lang)) }
                        td { @if let Some(code) = &l.authorization_code { code.auth-code { (code) } } }
                    }
                }
            }
        }
    }
}

pub async fn leases_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let Some(v) = ctx.viewer.clone() else { return error_page(&ctx, ApiError::unauthenticated()) };
    if v.kind == UserKind::Operator {
        return error_page(&ctx, ApiError::forbidden("operators see leases under Operations"));
    }
    let spend = match spend_of(&state, &v).await {
        Ok(s) => s,
        Err(e) => return error_page(&ctx, e),
    };
    let label = if v.kind == UserKind::Researcher { ctx.t(Msg::Spend) } else { ctx.t(Msg::Earnings) };
    let body = html! {
        p.spend { (label) ": " @for (cur, minor) in &spend.committed { strong { (money(cur, *minor, ctx.lang)) } " " } @if spend.committed.is_empty() { (money("CNY", 0, ctx.lang)) } }
        @let b = &spend.balance;
        @if v.kind == UserKind::Researcher {
            p.balance { (ctx.t(Msg::Available)) ": " strong.available { (money(&b.currency, b.available_minor, ctx.lang)) } " · " (ctx.t(Msg::Held)) ": " strong.held { (money(&b.currency, b.held_minor, ctx.lang)) } }
        } @else {
            p.balance { (ctx.t(Msg::EarnedLedger)) ": " strong.earned { (money(&b.currency, b.earnings_minor, ctx.lang)) } @if b.evaluations > 0 { " · " (ctx.t(Msg::Reliability)) ": " strong { (b.reliability_score) } } }
        }
        (lease_table(&ctx, &spend.leases))
        @if v.kind == UserKind::Supplier {
            @for l in spend.leases.iter().filter(|l| l.state == "requested") {
                (api_form(&format!("/api/v1/supplier/leases/{}/approve", l.lease_id), "POST", None, Some("authorization_code"), &format!("{} lease-{}", ctx.t(Msg::Approve), l.lease_id), html! {}))
            }
        }
    };
    let title = if v.kind == UserKind::Supplier { ctx.t(Msg::LeaseRequests) } else { ctx.t(Msg::MyLeases) };
    page(&ctx, title, body)
}

/// A researcher's jobs and what each cost; a form to submit a spec (YAML or JSON), which goes
/// to the new job's page, with the dataset versions a spec may name as inputs.
pub async fn jobs_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match job_owner(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let jobs = match crate::api::jobs::jobs_of(&state, &v, false).await {
        Ok(j) => j,
        Err(e) => return error_page(&ctx, e),
    };
    // The datasets a spec may name as inputs, at their latest versions (`NAME@VERSION`, or
    // `OWNER/NAME@VERSION` for one shared with the researcher).
    let datasets = match crate::api::datasets::datasets_of(&state, &v).await {
        Ok(d) => d,
        Err(e) => return error_page(&ctx, e),
    };
    let example = r#"{"name": "resnet18", "kind": "training", "resources": {"cards": 1}, "run": {"command": {"program": "/usr/bin/python3", "args": ["train.py"]}}, "preemptible": true}"#;
    let body = html! {
        table.jobs {
            thead { tr { th { (ctx.t(Msg::Job)) } th { (ctx.t(Msg::Title)) } th { (ctx.t(Msg::Kind)) } th { (ctx.t(Msg::State)) } th { (ctx.t(Msg::Attempts)) } th { (ctx.t(Msg::CardSeconds)) } th { (ctx.t(Msg::Cost)) } } }
            tbody {
                @for j in &jobs {
                    tr data-job=(j.job_id) {
                        td { a href={ "/jobs/" (j.job_id) } { "job-" (j.job_id) } } td { (j.name) } td { (j.kind) }
                        td.state data-state=(j.state) { (j.state) @if let Some(r) = &j.end_reason { " (" (r) ")" } }
                        td { (j.attempts.len()) } td { (j.card_seconds) } td { (money("CNY", j.cost_minor, ctx.lang)) }
                    }
                }
            }
        }
        h2 { (ctx.t(Msg::SubmitJob)) }
        (api_form("/api/v1/jobs", "POST", Some("/jobs/{job_id}"), None, ctx.t(Msg::SubmitJob), html! {
            label { "spec (YAML or JSON)" textarea name="spec" rows="8" cols="80" required { (example) } }
            p.problem data-for="spec" {}
        }))
        @if datasets.iter().any(|d| d.latest_version > 0) {
            p { (ctx.t(Msg::DatasetInputs)) }
            ul.dataset-refs {
                @for d in datasets.iter().filter(|d| d.latest_version > 0) {
                    @let reference = if d.mine { format!("{}@{}", d.name, d.latest_version) } else { format!("{}/{}@{}", d.owner, d.name, d.latest_version) };
                    li data-dataset-ref=(reference) { code { (reference) } @if !d.description.is_empty() { " — " (d.description) } }
                }
            }
        }
    };
    page(&ctx, ctx.t(Msg::Jobs), body)
}

/// The signed-in researcher, or why jobs are not for this viewer.
fn job_owner(ctx: &Ctx) -> Result<crate::auth::Principal, ApiError> {
    let v = ctx.viewer.clone().ok_or_else(ApiError::unauthenticated)?;
    if v.kind != UserKind::Researcher {
        return Err(ApiError::forbidden("jobs belong to researchers"));
    }
    Ok(v)
}

/// One job: its state, attempts, the files it left (once it succeeded, one of them registers as
/// a model), its curves and its output, followed live (`app.js` reads `/api/v1/jobs/{id}/log`
/// from where it got to and redraws the curves, then reads the page again when it ends).
pub async fn job_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiPath(id): ApiPath<u64>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match job_owner(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let job = match crate::api::jobs::job_of(&state, &v, id).await {
        Ok(j) => j,
        Err(e) => return error_page(&ctx, e),
    };
    let curves = crate::api::jobs::curves_for(&state, &v, id, None).await.unwrap_or_default();
    let live = matches!(job.state.as_str(), "queued" | "placed" | "running");
    // The first output that looks like weights is offered as the model.
    let model_file = job
        .outputs
        .keys()
        .find(|n| [".safetensors", ".pt", ".pth", ".onnx", ".bin"].iter().any(|ext| n.ends_with(ext)))
        .or_else(|| job.outputs.keys().next())
        .cloned()
        .unwrap_or_default();
    let output_names: Vec<(&str, &str)> = job.outputs.keys().map(|n| (n.as_str(), n.as_str())).collect();
    // What changes when the job ends is in `data-refresh` blocks: `app.js` reads the page again
    // once the output has ended and replaces them.
    let body = html! {
        div.job-state data-refresh="job-state" {
            p { (ctx.t(Msg::State)) ": " span.state data-state=(job.state) { (job.state) } @if let Some(r) = &job.end_reason { " (" (r) ")" }
                " · " (ctx.t(Msg::CardSeconds)) ": " (job.card_seconds) " · " (ctx.t(Msg::Cost)) ": " (money("CNY", job.cost_minor, ctx.lang)) }
            @if live {
                (api_form(&format!("/api/v1/jobs/{id}/cancel"), "POST", Some(&format!("/jobs/{id}")), None, ctx.t(Msg::Cancel), html! {}))
            }
        }
        table.attempts data-refresh="attempts" {
            thead { tr { th { "#" } th { "nodes" } th { (ctx.t(Msg::State)) } th { (ctx.t(Msg::Cost)) } } }
            tbody {
                @for a in &job.attempts {
                    tr { td { (a.number) } td { (format!("{:?}", a.node_ids)) } td { (a.end_reason.as_deref().unwrap_or(if a.started_ms > 0 { "running" } else { "placed" })) } td { (money("CNY", a.cost_minor, ctx.lang)) } }
                }
            }
        }
        section.outputs data-refresh="outputs" {
            @if !job.outputs.is_empty() {
                h2 { (ctx.t(Msg::Outputs)) }
                ul.outputs { @for (name, sha) in &job.outputs { li data-output=(name) { a href={ "/api/v1/jobs/" (id) "/outputs/" (name) } download=(name) { (name) } " sha256:" code { (sha) } } } }
                @if job.state == "succeeded" {
                    div.register-model {
                        h3 { (ctx.t(Msg::RegisterModel)) }
                        (api_form("/api/v1/models", "POST", Some("/models/{model}"), None, ctx.t(Msg::RegisterModel), html! {
                            input type="hidden" name="job_id" value=(id) data-type="number";
                            (field(ctx.t(Msg::ModelName), "name", "text", "", true))
                            (select(ctx.t(Msg::ModelFile), "output", &output_names, &model_file))
                            label { span { (ctx.t(Msg::ModelCard)) } textarea name="card" rows="3" {} small.problem data-for="card" {} }
                        }))
                    }
                }
            }
        }
        h2 { (ctx.t(Msg::Curves)) }
        section.curves data-curves={ "/api/v1/jobs/" (id) "/curves" } {
            @for (name, points) in &curves.series {
                figure.chart data-curve=(name) data-range="auto" data-digits="4" {
                    figcaption { (name) ": " strong { (points.last().map(|p| format!("{:.4}", p[1])).unwrap_or_default()) } }
                    svg viewBox="0 0 360 120" preserveAspectRatio="none" role="img" aria-label=(name) { polyline points="" fill="none" stroke="currentColor" stroke-width="2" {} }
                }
            }
        }
        h2 { (ctx.t(Msg::Output)) }
        pre.job-log data-job-log={ "/api/v1/jobs/" (id) "/log" } data-live=(live) {}
        // The spec as the platform kept it (dataset inputs already resolved to their archives),
        // to change and submit as a new job.
        details.resubmit {
            summary { (ctx.t(Msg::ResubmitWithChanges)) }
            (api_form("/api/v1/jobs", "POST", Some("/jobs/{job_id}"), None, ctx.t(Msg::ResubmitWithChanges), html! {
                label { "spec (YAML or JSON)" textarea name="spec" rows="14" cols="80" required { (serde_json::to_string_pretty(&job.spec).unwrap_or_default()) } }
                p.problem data-for="spec" {}
            }))
        }
    };
    page(&ctx, &format!("{} job-{id} · {}", ctx.t(Msg::Job), job.name), body)
}

pub async fn lease_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiPath(id): ApiPath<u64>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let Some(v) = ctx.viewer.clone() else { return error_page(&ctx, ApiError::unauthenticated()) };
    let lease = match lease_of(&state, &v, id).await {
        Ok(l) => l,
        Err(e) => return error_page(&ctx, e),
    };
    let researcher = v.kind == UserKind::Researcher;
    let access = if lease.state == "active" && v.kind != UserKind::Operator { access_of(&state, &v, id).await.ok() } else { None };
    let services = if researcher { crate::api::services::services_of(&state, &v, Some(id)).await.unwrap_or_default() } else { Vec::new() };
    let body = html! {
        (lease_table(&ctx, std::slice::from_ref(&lease)))
        @if !services.is_empty() {
            section.services { h2 { (ctx.t(Msg::Services)) } (super::services::services_table(&ctx, &services)) }
        }
        @if researcher && lease.state == "approved" && lease.class == ClusterClass::A {
            h2 { (ctx.t(Msg::VerifyCode)) }
            (api_form(&format!("/api/v1/leases/{id}/verify"), "POST", Some(&format!("/leases/{id}")), None, ctx.t(Msg::VerifyCode), html! {
                (field(ctx.t(Msg::AuthCode), "authorization_code", "text", "", true))
            }))
        }
        @if v.kind == UserKind::Supplier && lease.state == "requested" {
            (api_form(&format!("/api/v1/supplier/leases/{id}/approve"), "POST", None, Some("authorization_code"), ctx.t(Msg::Approve), html! {}))
        }
        @if let Some(a) = &access {
            section.access {
                h2 { (ctx.t(Msg::Access)) }
                @for n in &a.nodes {
                    h3 { "node-" (n.node_id) " · " (n.login) " · CUDA_VISIBLE_DEVICES=" (n.card_indexes.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")) }
                    p { (ctx.t(Msg::SshCommand)) } (pre(&n.ssh_command))
                    p { (ctx.t(Msg::KnownHosts)) } (pre(&n.known_hosts_line))
                    @if !n.vnc_tunnel.is_empty() { p { (ctx.t(Msg::VncTunnel)) } (pre(&n.vnc_tunnel)) }
                }
                @if a.nodes.is_empty() { p { (ctx.t(Msg::None)) } }
                @if researcher {
                    (api_form(&format!("/api/v1/leases/{id}/password"), "POST", None, Some("password"), ctx.t(Msg::NewPassword), html! {}))
                    @if state.services.enabled() {
                        @for (class, kind, label) in [("open-terminal", "terminal", ctx.t(Msg::OpenTerminal)), ("open-jupyter", "jupyter", ctx.t(Msg::OpenJupyter))] {
                            div class=(class) {
                                (api_form("/api/v1/services", "POST", Some("/services/{service_id}/open"), None, label, html! {
                                    input type="hidden" name="kind" value=(kind);
                                    input type="hidden" name="lease_id" value=(id) data-type="number";
                                }))
                            }
                        }
                    }
                }
            }
        }
        @if lease.state == "active" || lease.state == "requested" || lease.state == "approved" {
            @if v.kind != UserKind::Operator || v.can(crate::model::Permission::Intervene) {
                (api_form(&format!("/api/v1/leases/{id}/end"), "POST", Some(&format!("/leases/{id}")), None, ctx.t(Msg::EndLease), html! {}))
            }
        }
    };
    page(&ctx, &format!("{} lease-{id}", ctx.t(Msg::Lease)), body)
}

/// The federation: its members (connected, how old their latest offer is) and every other
/// member's current offers with their origin, as this member's gateway sees them.
pub async fn federation_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let link = match crate::federation::link(&state) {
        Ok(link) => link,
        Err(e) => return error_page(&ctx, e),
    };
    let (members, offers) = match (link.members().await, link.catalogue(None).await) {
        (Ok(m), Ok(o)) => (m, o),
        (Err(e), _) | (_, Err(e)) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let seconds = |ms: u64| format!("{} s", ms / 1000);
    let others: Vec<_> = offers.iter().filter(|o| members.members.iter().any(|m| m.name == o.origin && !m.is_self)).collect();
    // A researcher leases other members' cards here and sees those leases.
    let researcher = ctx.viewer.as_ref().filter(|v| v.kind == UserKind::Researcher).and_then(|v| v.broker_account);
    let remote_leases = match researcher {
        Some(account) => match link.remote_leases(account).await {
            Ok(mut leases) => {
                leases.reverse();
                leases
            }
            Err(e) => return error_page(&ctx, e),
        },
        None => Vec::new(),
    };
    let body = html! {
        h2 { (t(Msg::FederationMembers)) " · " (members.federation) " v" (members.version) }
        table.federation-members {
            thead { tr { th { (t(Msg::Origin)) } th { (t(Msg::Region)) } th { "" } th { (t(Msg::OfferAge)) } } }
            tbody {
                @for m in &members.members {
                    tr {
                        td { (m.name) @if m.is_self { " (" (t(Msg::ThisMember)) ")" } }
                        td { (m.region) }
                        td { @if m.is_self { "" } @else if m.connected { (t(Msg::ConnectedNow)) } @else { (t(Msg::NotConnected)) } }
                        td { (m.offer_age_ms.map(seconds).unwrap_or_else(|| "—".into())) }
                    }
                }
            }
        }
        h2 { (t(Msg::FederatedOffers)) }
        @if others.is_empty() {
            p { (t(Msg::NoFederatedOffers)) }
        } @else {
            table.federated-offers {
                thead { tr { th { (t(Msg::Origin)) } th { "ID" } th { (t(Msg::Title)) } th { "GPU" } th { "VRAM" } th { (t(Msg::Region)) } th { (t(Msg::IdleCards)) } th { (t(Msg::Hourly)) } } }
                tbody {
                    @for o in &others {
                        tr data-origin=(o.origin) {
                            td { (o.origin) }
                            td { (o.listing.cluster_id) }
                            td { (o.listing.title) }
                            td { (o.listing.gpu_model) }
                            td { (o.listing.vram_gib) " GiB" }
                            td { (o.listing.region) }
                            td { (o.listing.free_cards) " / " (o.listing.total_cards) }
                            td { (o.listing.prices.get("hourly").map(|p| money(&o.listing.currency, *p, ctx.lang)).unwrap_or_else(|| "—".into())) }
                            @if researcher.is_some() {
                                td {
                                    (api_form("/api/v1/federation/leases", "POST", Some("/federation"), None, t(Msg::LeaseHere), html! {
                                        input type="hidden" name="origin" value=(o.origin);
                                        input type="hidden" name="cluster_id" value=(o.listing.cluster_id) data-type="number";
                                        input type="hidden" name="billing_mode" value="hourly";
                                        (field(t(Msg::Cards), "cards", "number", "1", true))
                                        (field(t(Msg::Periods), "periods", "number", "1", true))
                                    }))
                                }
                            }
                        }
                    }
                }
            }
        }
        @if researcher.is_some() {
            h2 { (t(Msg::RemoteLeases)) }
            table.remote-leases {
                thead { tr { th { "ID" } th { (t(Msg::Origin)) } th { (t(Msg::OwnerLease)) } th { (t(Msg::Cards)) } th { (t(Msg::State)) } th { (t(Msg::Held)) } th { (t(Msg::Charged)) } th { "" } } }
                tbody {
                    @for r in &remote_leases {
                        tr data-remote-lease=(r.id) {
                            td { "rlease-" (r.id) }
                            td { (r.member) }
                            td { @if r.owner_lease_id > 0 { "lease-" (r.owner_lease_id) } @else { "—" } }
                            td { (r.cards) }
                            td { (r.state) @if r.unreachable_for_ms.is_some() { " (" (t(Msg::Unreachable)) ")" } }
                            td { (money(&r.currency, r.held_minor, ctx.lang)) }
                            td { (money(&r.currency, r.charged_minor, ctx.lang)) }
                            td {
                                @if r.state == "active" {
                                    (api_form(&format!("/api/v1/federation/leases/{}/access", r.id), "POST", None, Some("certificate"), t(Msg::GetCertificate), html! {
                                        (field(t(Msg::PublicKey), "public_key", "text", "", true))
                                    }))
                                    (api_form(&format!("/api/v1/federation/leases/{}/end", r.id), "POST", Some("/federation"), None, t(Msg::EndLease), html! {}))
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(&ctx, t(Msg::Federation), body)
}
