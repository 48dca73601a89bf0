//! The supplier's dashboard and the operators' console.

use axum::extract::{OriginalUri, State};
use axum::http::HeaderMap;
use axum::response::Response;
use maud::html;

use super::market::status_name;
use super::{api_form, error_page, field, page, select, Ctx};
use crate::api::market::{my_clusters, my_nodes};
use crate::api::operator::{audit_of, operators_of, reviews_of, AuditQuery};
use crate::api::ApiQuery;
use crate::auth::MaybePrincipal;
use crate::error::ApiError;
use crate::i18n::{datetime, Msg};
use crate::model::{Permission, Role, UserKind};
use crate::state::AppState;

pub async fn supplier_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let Some(v) = ctx.viewer.clone() else { return error_page(&ctx, ApiError::unauthenticated()) };
    if v.kind != UserKind::Supplier {
        return error_page(&ctx, ApiError::forbidden("this is for supplier accounts"));
    }
    let nodes = match my_nodes(&state, &v).await {
        Ok(n) => n,
        Err(e) => return error_page(&ctx, e),
    };
    let clusters = my_clusters(&state, &v).unwrap_or_default();
    let t = |m| ctx.t(m);
    let free: Vec<_> = nodes.iter().filter(|n| n.cluster_id == 0).collect();
    // Pre-fill the listing from the first free node's inventory.
    let first = free.first();
    let model = first.and_then(|n| n.cards.first()).map(|c| c.model.clone()).unwrap_or_default();
    let vram = first.and_then(|n| n.cards.first()).map(|c| (c.vram_mib / 1024).to_string()).unwrap_or_default();
    let body = html! {
        h2 { (t(Msg::EnrollmentToken)) }
        (api_form("/api/v1/supplier/enrollment-tokens", "POST", None, Some("token,install_hint"), t(Msg::EnrollmentToken), html! {}))
        h2 { (t(Msg::MyNodes)) }
        table.nodes {
            thead { tr { th { "node" } th { "host" } th { (t(Msg::Vcpus)) } th { (t(Msg::Memory)) } th { (t(Msg::CardList)) } th { "cluster" } th { "gateway" } } }
            tbody { @for n in &nodes { tr {
                td { (n.node_id) } td { (n.hostname) } td { (n.vcpus) } td { (n.memory_gib) }
                td { @for c in &n.cards { span.card title=(c.model) { "#" (c.index) " " (status_name(&ctx, &c.status)) } " " } }
                td { @if n.cluster_id > 0 { a href={ "/clusters/" (n.cluster_id) } { (n.cluster_id) } } }
                td { (n.gateway.clone().unwrap_or_default()) }
            } } }
        }
        h2 { (t(Msg::MyClusters)) }
        table.clusters {
            thead { tr { th { "CPcId" } th { (t(Msg::Title)) } th { (t(Msg::Class)) } th { (t(Msg::IdleCards)) } th { (t(Msg::Status)) } th {} } }
            tbody { @for c in &clusters { tr {
                td { a href={ "/clusters/" (c.cluster_id) } { (c.cpc_id) } } td { (c.title) } td { (c.class) } td { (c.idle_cards) " / " (c.total_cards) }
                td { @if c.delisted { (t(Msg::Delisted)) } @else { (t(Msg::Listed)) } }
                td { @if !c.delisted { (api_form(&format!("/api/v1/supplier/clusters/{}/delist", c.cluster_id), "POST", Some("/supplier"), None, t(Msg::Delist), html! {})) } }
            } } }
        }
        @if !free.is_empty() {
            h2 { (t(Msg::Publish)) }
            (api_form("/api/v1/supplier/clusters", "POST", Some("/clusters/{cluster_id}"), None, t(Msg::Publish), html! {
                (select(t(Msg::Class), "class", &[("B", t(Msg::ClassB)), ("A", t(Msg::ClassA))], "B"))
                label { span { (t(Msg::Nodes)) }
                    @for n in &free { label.inline { input type="checkbox" name="node_ids" value=(n.node_id) data-type="number-list" checked[free.len() == 1]; " " (n.hostname) " (" (n.cards.len()) ")" } }
                    small.problem data-for="node_ids" {}
                }
                (field(t(Msg::Title), "listing.title", "text", "", true))
                (field(t(Msg::GpuModel), "listing.gpu_model", "text", &model, true))
                (field(t(Msg::Vram), "listing.vram_gib", "number", &vram, true))
                (field(t(Msg::Memory), "listing.memory_gib", "number", &first.map(|n| n.memory_gib.to_string()).unwrap_or_default(), true))
                (field(t(Msg::Vcpus), "listing.vcpus", "number", &first.map(|n| n.vcpus.to_string()).unwrap_or_default(), true))
                (field(t(Msg::Vendor), "listing.vendor", "text", "", true))
                (field(t(Msg::Region), "listing.region", "text", "", true))
                (field("data disks", "listing.storage.data_disks", "number", "1", true))
                (field("data disk GB", "listing.storage.data_disk_gb", "number", &first.map(|n| n.disk_gib.to_string()).unwrap_or_default(), true))
                (field("system disk GB", "listing.storage.system_disk_gb", "number", "100", true))
                (select("medium", "listing.storage.medium", &[("nvme", "NVMe"), ("ssd", "SSD"), ("hdd", "HDD")], "nvme"))
                input type="hidden" name="listing.currency" value="CNY";
                (field(&format!("{} ({}, CNY)", t(Msg::Price), t(Msg::Hourly)), "price.hourly", "number", "", false))
                (field(&format!("{} ({}, CNY)", t(Msg::Price), t(Msg::Monthly)), "price.monthly", "number", "", false))
                small.problem data-for="prices" {}
                label { span { (t(Msg::UsageInstructions)) " (A)" } textarea name="listing.usage_instructions" {} small.problem data-for="usage_instructions" {} }
            }))
        }
    };
    page(&ctx, t(Msg::Supplier), body)
}

pub async fn operator_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let Some(v) = ctx.viewer.clone() else { return error_page(&ctx, ApiError::unauthenticated()) };
    if v.kind != UserKind::Operator {
        return error_page(&ctx, ApiError::forbidden("this is for operators"));
    }
    let t = |m| ctx.t(m);
    let reviews = if v.can(Permission::ReviewAccounts) { reviews_of(&state, &v).await.ok() } else { None };
    let audit = if v.can(Permission::ReadAudit) { audit_of(&state, &v, &q).await.ok() } else { None };
    let operators = if v.can(Permission::ManageRoles) { operators_of(&state, &v).await.ok() } else { None };
    let body = html! {
        p { (t(Msg::Roles)) ": " (v.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")) }
        @if let Some(reviews) = reviews {
            h2 { (t(Msg::Reviews)) }
            table { tbody { @for r in &reviews { tr {
                td { (r.username) } td { (r.user_type) } td { (r.org_name.clone().unwrap_or_default()) } td { (r.credit_code.clone().unwrap_or_default()) }
                td { (r.licence_filename.clone().unwrap_or_default()) }
                td { (api_form(&format!("/api/v1/operator/reviews/{}", r.user_id), "POST", Some("/operator"), None, t(Msg::Approve), html! { input type="hidden" name="approve" value="true" data-type="bool-value"; })) }
                td { (api_form(&format!("/api/v1/operator/reviews/{}", r.user_id), "POST", Some("/operator"), None, t(Msg::Reject), html! { input type="hidden" name="approve" value="false" data-type="bool-value"; })) }
            } } } }
        }
        @if let Some(ops) = operators {
            h2 { (t(Msg::Roles)) }
            table { tbody { @for o in &ops { tr {
                td { (o.username) } td { (o.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")) }
                td { @if o.user_id != v.user.0.to_string() {
                    (api_form(&format!("/api/v1/operator/users/{}/roles", o.user_id), "PUT", Some("/operator"), None, t(Msg::Save), html! {
                        @for r in Role::ALL { label.inline { input type="checkbox" name="roles" value=(r.as_str()) data-type="list" checked[o.roles.contains(&r)]; " " (r.as_str()) } }
                        small.problem data-for="roles" {}
                    }))
                } }
            } } } }
        }
        @if let Some(entries) = audit {
            h2 { (t(Msg::AuditLog)) }
            form.filters method="get" action="/operator" {
                (field(t(Msg::Actor), "actor", "text", &q.actor.clone().unwrap_or_default(), false))
                (field(t(Msg::Action), "action", "text", &q.action.clone().unwrap_or_default(), false))
                button type="submit" { (t(Msg::Filter)) }
            }
            table.audit {
                thead { tr { th { (t(Msg::Time)) } th { (t(Msg::Actor)) } th { (t(Msg::Action)) } th { (t(Msg::Target)) } th { (t(Msg::Outcome)) } th { "source" } } }
                tbody { @for e in &entries { tr { td { (datetime(e.at_ms, ctx.lang)) } td { (e.actor.clone().unwrap_or_default()) } td { (e.action) } td { (e.target) } td { (e.outcome) } td { (e.source) } } } }
            }
        }
    };
    page(&ctx, t(Msg::Operations), body)
}
