//! Server-rendered HTML pages (maud: markup checked at compile time, every interpolation
//! escaped). Pages read through the same service functions as the REST API; forms submit JSON to
//! the API with a few lines of plain JavaScript (`static/app.js`, embedded — no build step), which
//! shows each field's problem beside the field.

pub mod account;
pub mod annotate;
pub mod data;
pub mod market;
pub mod services;
pub mod staff;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::auth::{cookie_value, Principal};
use crate::error::ApiError;
use crate::i18n::{Lang, Msg};
use crate::model::{Permission, UserKind};

pub const APP_JS: &str = include_str!("../../static/app.js");
pub const APP_CSS: &str = include_str!("../../static/app.css");
pub const LANG_COOKIE: &str = "suanli_lang";

/// What every page knows about its viewer.
pub struct Ctx {
    pub lang: Lang,
    pub viewer: Option<Principal>,
    pub path: String,
}

impl Ctx {
    pub fn new(headers: &HeaderMap, viewer: Option<Principal>, path: &str) -> Ctx {
        let lang = cookie_value(headers, LANG_COOKIE)
            .and_then(|c| Lang::parse(&c))
            .or_else(|| viewer.as_ref().map(|v| v.lang))
            .unwrap_or_else(|| Lang::from_accept_language(headers.get(header::ACCEPT_LANGUAGE).and_then(|v| v.to_str().ok()).unwrap_or("")));
        Ctx { lang, viewer, path: path.to_owned() }
    }
    pub fn t(&self, m: Msg) -> &'static str {
        m.text(self.lang)
    }
}

pub fn page(ctx: &Ctx, title: &str, body: Markup) -> Response {
    let t = |m| ctx.t(m);
    let csrf = ctx.viewer.as_ref().and_then(|v| v.csrf()).unwrap_or("");
    let other = match ctx.lang {
        Lang::En => "zh",
        Lang::Zh => "en",
    };
    let markup = html! {
        (DOCTYPE)
        html lang=(ctx.lang.html_tag()) {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="csrf-token" content=(csrf);
                title { (title) " · " (t(Msg::Brand)) }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                header.top {
                    a.brand href="/" { (t(Msg::Brand)) }
                    nav {
                        a href="/" { (t(Msg::Catalogue)) }
                        @if let Some(v) = &ctx.viewer {
                            @match v.kind {
                                UserKind::Researcher => {
                                    a href="/leases" { (t(Msg::MyLeases)) } a href="/jobs" { (t(Msg::Jobs)) }
                                    a href="/datasets" { (t(Msg::Datasets)) } a href="/models" { (t(Msg::Models)) }
                                    a href="/search" { (t(Msg::ImageSearch)) } a href="/annotation" { (t(Msg::Annotation)) }
                                }
                                UserKind::Supplier => { a href="/supplier" { (t(Msg::Supplier)) } a href="/leases" { (t(Msg::LeaseRequests)) } }
                                UserKind::Operator => { a href="/operator" { (t(Msg::Operations)) } }
                            }
                            a href="/alerts" { (t(Msg::Alerts)) }
                            a href="/me" { (t(Msg::Account)) " (" (v.username) ")" }
                            button.link type="button" data-logout="1" { (t(Msg::Logout)) }
                        } @else {
                            a href="/login" { (t(Msg::Login)) }
                            a href="/register" { (t(Msg::Register)) }
                        }
                        a.lang href={ "/lang/" (other) "?back=" (ctx.path) } { (t(Msg::Language)) }
                    }
                }
                main { h1 { (title) } (body) }
                footer { a href="/terms" { (t(Msg::Terms)) } " · " a href="/privacy" { (t(Msg::Privacy)) } " · " a href="/federation" { (t(Msg::Federation)) } " · " a href="/api/v1/openapi.json" { "API" } }
            }
        }
    };
    Html(markup.into_string()).into_response()
}

/// An error as a page: the same code and message the API gives.
pub fn error_page(ctx: &Ctx, e: ApiError) -> Response {
    let status = e.code.status();
    if status == StatusCode::UNAUTHORIZED {
        let back = urlencode(&ctx.path);
        return (StatusCode::SEE_OTHER, [(header::LOCATION, format!("/login?next={back}"))]).into_response();
    }
    let mut r = page(ctx, ctx.t(Msg::Error), html! { p.error { code { (e.code.as_str()) } " — " (e.message) } });
    *r.status_mut() = status;
    r
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A form the script submits as JSON to `api` with `method`, then goes to `next` (`{field}`
/// is replaced from the answer) or shows the answer's fields listed in `show`.
pub fn api_form(api: &str, method: &str, next: Option<&str>, show: Option<&str>, submit: &str, fields: Markup) -> Markup {
    html! {
        form.api data-api=(api) data-method=(method) data-next=[next] data-show=[show] {
            (fields)
            p.form-error role="alert" {}
            button type="submit" { (submit) }
            output.result {}
        }
    }
}

/// A labelled input with the slot where its problem appears.
pub fn field(label: &str, name: &str, kind: &str, value: &str, required: bool) -> Markup {
    html! {
        label {
            span { (label) @if required { " *" } }
            input type=(kind) name=(name) value=(value) required[required] data-type=[(kind == "number").then_some("number")];
            small.problem data-for=(name) {}
        }
    }
}

pub fn select(label: &str, name: &str, options: &[(&str, &str)], selected: &str) -> Markup {
    html! {
        label {
            span { (label) }
            select name=(name) {
                @for (value, text) in options {
                    option value=(value) selected[*value == selected] { (text) }
                }
            }
            small.problem data-for=(name) {}
        }
    }
}

pub async fn static_js() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], APP_JS).into_response()
}

pub async fn static_css() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")], APP_CSS).into_response()
}

pub fn can_operate(ctx: &Ctx, p: Permission) -> bool {
    ctx.viewer.as_ref().is_some_and(|v| v.can(p))
}

pub fn pre(text: &str) -> Markup {
    html! { pre { code { (text) } } }
}

/// Inline SVG line chart of `points` (x ascending), no library needed.
pub fn svg_chart(title: &str, points: &[(i64, f64)], max_hint: f64) -> Markup {
    let (w, h) = (360.0, 120.0);
    let max = points.iter().map(|p| p.1).fold(max_hint, f64::max).max(1.0);
    let (x0, x1) = (points.first().map_or(0, |p| p.0), points.last().map_or(1, |p| p.0).max(points.first().map_or(0, |p| p.0) + 1));
    let coords: Vec<String> = points.iter().map(|(x, y)| format!("{:.1},{:.1}", (*x - x0) as f64 / (x1 - x0) as f64 * w, h - y / max * (h - 10.0))).collect();
    let last = points.last().map(|p| format!("{:.1}", p.1)).unwrap_or_else(|| "—".into());
    html! {
        figure.chart {
            figcaption { (title) ": " strong { (last) } }
            svg viewBox={ "0 0 " (w) " " (h) } preserveAspectRatio="none" role="img" aria-label=(title) {
                polyline points=(coords.join(" ")) fill="none" stroke="currentColor" stroke-width="2" {}
            }
        }
    }
}

pub fn raw(s: &str) -> PreEscaped<String> {
    PreEscaped(s.to_owned())
}
