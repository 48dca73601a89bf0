//! Sign-up, activation, login, password reset, the account page, language switch, legal texts.

use axum::extract::{OriginalUri, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::html;
use serde::Deserialize;

use super::{api_form, error_page, field, page, select, Ctx, LANG_COOKIE};
use crate::api::accounts::{activate_with_token, me_of};
use crate::api::{ApiPath, ApiQuery};
use crate::auth::MaybePrincipal;
use crate::error::ApiError;
use crate::i18n::{datetime, Lang, Msg};
use crate::model::{AccountState, UserKind};
use crate::state::AppState;

#[derive(Deserialize, Default)]
pub struct NextQuery {
    pub next: Option<String>,
    pub token: Option<String>,
    pub kind: Option<String>,
    pub back: Option<String>,
}

/// Only same-site paths are followed after login (no open redirect). Browsers drop tabs and
/// line breaks from a URL and read a backslash as `/`, so a tab or a backslash after the first
/// `/` would leave the site: a path with any of them, or any control character or space, is not
/// followed.
fn safe_next(next: Option<&str>) -> String {
    let same_site =
        |n: &str| n.starts_with('/') && !n.starts_with("//") && n.len() <= 2048 && n.chars().all(|c| !c.is_control() && !c.is_whitespace() && c != '\\');
    match next {
        Some(n) if same_site(n) => n.to_owned(),
        _ => "/".into(),
    }
}

pub async fn login_page(headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal, ApiQuery(q): ApiQuery<NextQuery>) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let next = safe_next(q.next.as_deref());
    let body = html! {
        (api_form("/api/v1/session", "POST", Some(&next), None, ctx.t(Msg::Login), html! {
            (field(ctx.t(Msg::UsernameOrEmail), "login", "text", "", true))
            (field(ctx.t(Msg::Password), "password", "password", "", true))
            (field(ctx.t(Msg::TotpCode), "totp_code", "text", "", false))
        }))
        p { a href="/reset" { (ctx.t(Msg::ForgotPassword)) } " · " a href="/register" { (ctx.t(Msg::Register)) } }
    };
    page(&ctx, ctx.t(Msg::Login), body)
}

pub async fn register_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiQuery(q): ApiQuery<NextQuery>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let supplier = q.kind.as_deref() == Some("supplier");
    let t = |m| ctx.t(m);
    let types: Vec<(&str, &str)> = if supplier {
        vec![("individual", t(Msg::Individual)), ("enterprise", t(Msg::Enterprise))]
    } else {
        vec![("personal", t(Msg::Personal)), ("university", t(Msg::University)), ("institute", t(Msg::Institute)), ("enterprise", t(Msg::Enterprise))]
    };
    let body = html! {
        @if state.settings.verify_phones {
            (api_form("/api/v1/phone-codes", "POST", None, None, t(Msg::SendCode), html! {
                input type="hidden" name="lang" value=(ctx.lang.as_str());
                (field(t(Msg::Phone), "phone", "tel", "", true))
            }))
        }
        p.tabs {
            a href="/register" aria-current=[(!supplier).then_some("page")] { (t(Msg::AsResearcher)) }
            " · "
            a href="/register?kind=supplier" aria-current=[supplier.then_some("page")] { (t(Msg::AsSupplier)) }
        }
        (api_form("/api/v1/accounts", "POST", None, Some("state"), t(Msg::Register), html! {
            input type="hidden" name="kind" value=(if supplier { "supplier" } else { "researcher" });
            input type="hidden" name="lang" value=(ctx.lang.as_str());
            (select(t(Msg::UserType), "user_type", &types, ""))
            (field(t(Msg::Username), "username", "text", "", true))
            (field(t(Msg::Email), "email", "email", "", true))
            (field(t(Msg::Phone), "phone", "tel", "", supplier))
            @if state.settings.verify_phones { (field(t(Msg::PhoneCode), "phone_code", "text", "", false)) }
            (field(t(Msg::Password), "password", "password", "", true))
            (field(t(Msg::PasswordConfirm), "password_confirm", "password", "", true))
            (field(t(Msg::RealName), "real_name", "text", "", true))
            fieldset.person {
                (field(t(Msg::IdNumber), "id_number", "text", "", false))
                @if supplier { (field(t(Msg::Address), "address", "text", "", false)) (field(t(Msg::Affiliation), "affiliation", "text", "", false)) }
            }
            fieldset.org {
                (field(t(Msg::OrgName), "org_name", "text", "", false))
                (field(t(Msg::CreditCode), "credit_code", "text", "", false))
                @if supplier {
                    (field(t(Msg::LegalRep), "legal_representative", "text", "", false))
                    label { span { (t(Msg::RegisteredCapital)) } input type="number" name="registered_capital_minor" data-type="yuan"; small.problem data-for="registered_capital_minor" {} }
                    (field(t(Msg::SettlementAccount), "settlement_account", "text", "", false))
                }
                label { span { (t(Msg::Licence)) } input type="file" name="licence" data-type="file-base64" accept=".pdf,.png,.jpg,.jpeg"; small.problem data-for="licence_base64" {} }
            }
            label.inline {
                input type="checkbox" name="agree_terms" data-type="bool";
                " " (t(Msg::Agree)) " " a href="/terms" target="_blank" { (t(Msg::Terms)) } " " (t(Msg::And)) " " a href="/privacy" target="_blank" { (t(Msg::Privacy)) }
                small.problem data-for="agree_terms" {}
            }
        }))
        p.hidden data-after="/api/v1/accounts" { (t(Msg::RegisteredCheckMail)) }
    };
    page(&ctx, t(Msg::Register), body)
}

/// The link in the activation mail.
pub async fn activate_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, ApiQuery(q): ApiQuery<NextQuery>) -> Response {
    let ctx = Ctx::new(&headers, None, uri.path());
    let outcome = activate_with_token(&state, q.token.as_deref().unwrap_or("")).await;
    let body = match outcome {
        Ok(AccountState::Active) => html! { p.ok #activated { (ctx.t(Msg::Activated)) } p { a href="/login" { (ctx.t(Msg::Login)) } } },
        Ok(_) => html! { p.ok #activated { (ctx.t(Msg::PendingReview)) } },
        Err(e) => html! { p.error { (ctx.t(Msg::ActivationFailed)) " (" (e.code.as_str()) ")" } },
    };
    page(&ctx, ctx.t(Msg::Register), body)
}

pub async fn reset_page(headers: HeaderMap, OriginalUri(uri): OriginalUri, ApiQuery(q): ApiQuery<NextQuery>) -> Response {
    let ctx = Ctx::new(&headers, None, uri.path());
    let body = match q.token {
        None => html! {
            (api_form("/api/v1/password-reset", "POST", None, None, ctx.t(Msg::Submit), html! { (field(ctx.t(Msg::Email), "email", "email", "", true)) }))
            p.hidden data-after="/api/v1/password-reset" { (ctx.t(Msg::ResetSent)) }
        },
        Some(token) => html! {
            (api_form("/api/v1/password-reset/confirm", "POST", Some("/login"), None, ctx.t(Msg::SetPassword), html! {
                input type="hidden" name="token" value=(token);
                (field(ctx.t(Msg::Password), "password", "password", "", true))
                (field(ctx.t(Msg::PasswordConfirm), "password_confirm", "password", "", true))
            }))
        },
    };
    page(&ctx, ctx.t(Msg::ForgotPassword), body)
}

pub async fn me_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let Some(v) = ctx.viewer.clone() else { return error_page(&ctx, ApiError::unauthenticated()) };
    let me = match me_of(&state, &v).await {
        Ok(m) => m,
        Err(e) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let body = html! {
        dl.facts {
            dt { (t(Msg::Username)) } dd { (me.username) }
            dt { (t(Msg::Email)) } dd { (me.email) }
            dt { (t(Msg::Phone)) } dd { (me.phone.clone().unwrap_or_default()) }
            dt { (t(Msg::RealName)) } dd { (me.real_name.clone().unwrap_or_default()) }
            dt { (t(Msg::UserType)) } dd { (me.kind) " / " (me.user_type) }
            @if !me.roles.is_empty() { dt { (t(Msg::Roles)) } dd { (me.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")) } }
            @if let Some(acc) = &me.market_account { dt { "market account" } dd { (acc) } }
        }
        h2 { (t(Msg::Profile)) }
        (api_form("/api/v1/me", "PATCH", Some("/me"), None, t(Msg::Save), html! {
            (select(t(Msg::Language), "lang", &[("en", "English"), ("zh", "中文")], me.lang.as_str()))
            (field(t(Msg::Phone), "phone", "tel", &me.phone.clone().unwrap_or_default(), false))
            (field(t(Msg::Address), "address", "text", &me.profile.address.clone().unwrap_or_default(), false))
        }))
        @if v.kind == UserKind::Researcher {
            h2 { (t(Msg::SshKeys)) }
            (api_form("/api/v1/me/ssh-keys", "POST", Some("/me"), None, t(Msg::AddKey), html! { (field("ssh-ed25519 AAAA…", "public_key", "text", "", true)) }))
        }
        h2 { (t(Msg::EnableTotp)) }
        @if me.totp_enabled { p { "✓" } } @else {
            (api_form("/api/v1/me/totp", "POST", None, Some("secret,otpauth_url"), t(Msg::EnableTotp), html! {}))
            (api_form("/api/v1/me/totp/confirm", "POST", Some("/me"), None, t(Msg::Submit), html! { (field(t(Msg::TotpCode), "code", "text", "", true)) }))
        }
        h2 { (t(Msg::ApiTokens)) }
        (api_form("/api/v1/me/api-tokens", "POST", None, Some("token"), t(Msg::NewToken), html! { (field(t(Msg::Title), "name", "text", "cli", true)) }))
        @if v.kind != UserKind::Operator {
            h2 { (t(Msg::Deregister)) }
            p.warning { (t(Msg::DeregisterWarning)) }
            (api_form("/api/v1/me", "DELETE", Some("/"), None, t(Msg::Deregister), html! { (field(t(Msg::Password), "password", "password", "", true)) }))
        }
        p.muted { (datetime(crate::db::now_ms(), ctx.lang)) }
    };
    page(&ctx, t(Msg::Account), body)
}

/// `/lang/zh?back=/…`: remembers the choice in a cookie and goes back.
pub async fn switch_lang(ApiPath(lang): ApiPath<String>, ApiQuery(q): ApiQuery<NextQuery>) -> Response {
    let Some(lang) = Lang::parse(&lang) else { return (StatusCode::NOT_FOUND, "unknown language").into_response() };
    let back = safe_next(q.back.as_deref());
    (
        StatusCode::SEE_OTHER,
        [(header::LOCATION, back), (header::SET_COOKIE, format!("{LANG_COOKIE}={}; Path=/; SameSite=Lax; Max-Age=31536000", lang.as_str()))],
    )
        .into_response()
}

pub async fn terms_page(headers: HeaderMap) -> Response {
    let ctx = Ctx::new(&headers, None, "/terms");
    page(
        &ctx,
        ctx.t(Msg::Terms),
        html! {
            p { "Suanli connects researchers with GPU suppliers. Researchers pay for the cards they lease for the term they choose; suppliers keep their machines available as listed; operators may end leases that break the law or these terms." }
            p { "算力平台连接研究用户与GPU供应商。研究用户按所选周期为租用的GPU卡付费；供应商按发布信息保证资源可用；运营方可终止违反法律或本协议的租用。" }
        },
    )
}

pub async fn privacy_page(headers: HeaderMap) -> Response {
    let ctx = Ctx::new(&headers, None, "/privacy");
    page(
        &ctx,
        ctx.t(Msg::Privacy),
        html! {
            p { "We keep identity card numbers only as keyed hashes, encrypt other personal data at rest, and erase it when you close your account, except the records that law and accounting require." }
            p { "身份证号仅以加密哈希保存，其他个人信息加密存储；注销账户时删除个人信息，法律和财务要求保留的记录除外。" }
        },
    )
}

/// The alert history with each message's delivery, and the notification settings.
pub async fn alerts_page(State(state): State<AppState>, headers: HeaderMap, OriginalUri(uri): OriginalUri, viewer: MaybePrincipal) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let Some(v) = ctx.viewer.clone() else { return error_page(&ctx, ApiError::unauthenticated()) };
    let (alerts, settings) = match (crate::alerts::alerts_of(&state, v.user.0).await, crate::api::alerts::settings_of(&state, v.user.0).await) {
        (Ok(a), Ok(s)) => (a, s),
        (Err(e), _) | (_, Err(e)) => return error_page(&ctx, e),
    };
    let t = |m| ctx.t(m);
    let body = html! {
        table.alerts {
            thead { tr { th { (t(Msg::Time)) } th { (t(Msg::Alerts)) } th { (t(Msg::State)) } th { (t(Msg::Delivery)) } } }
            tbody { @for a in &alerts { tr data-alert-state=(a.state) {
                td { (datetime(a.opened_ms, ctx.lang)) }
                td { (a.subject) }
                td { (a.state) @if let Some(r) = a.resolved_ms { " " (datetime(r, ctx.lang)) } }
                td { @for d in &a.deliveries { span.delivery title=(d.last_error.clone().unwrap_or_default()) { (d.channel) ": " (d.state) " (" (d.attempts) ")" } " " } }
            } } }
        }
        @if alerts.is_empty() { p { (t(Msg::None)) } }
        h2 { (t(Msg::NotificationSettings)) }
        (api_form("/api/v1/me/notifications", "PUT", Some("/alerts"), None, t(Msg::Save), html! {
            label.inline { input type="checkbox" name="email" data-type="bool" checked[settings.email]; " " (t(Msg::EmailOn)) }
            label.inline { input type="checkbox" name="sms" data-type="bool" checked[settings.sms]; " " (t(Msg::SmsOn)) }
            (field(t(Msg::QuietHours), "quiet_hours", "text", &settings.quiet_hours, false))
            (field(t(Msg::WebhookUrl), "webhook_url", "url", &settings.webhook_url, false))
            (field(t(Msg::WebhookSecret), "webhook_secret", "password", "", false))
        }))
    };
    page(&ctx, t(Msg::Alerts), body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn next_leads_only_to_paths_of_this_site() {
        for ok in ["/", "/leases/7", "/clusters?class=B", "/a/b/../c"] {
            assert_eq!(super::safe_next(Some(ok)), ok);
        }
        for off in [
            "//evil.example",
            "/\\evil.example",
            "/\t/evil.example",
            "/\n/evil.example",
            "/\r//evil.example",
            "https://evil.example",
            "evil.example",
            " /x",
            "/\u{0}/x",
            "/ /evil",
        ] {
            assert_eq!(super::safe_next(Some(off)), "/", "{off:?}");
        }
        assert_eq!(super::safe_next(None), "/");
    }
}
