//! Pages of services on leased cards: the portal's door to a private service
//! (`/services/{id}/open`), and a demo's own page, served on the demo's origin.

use axum::extract::{OriginalUri, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use super::data::researcher;
use super::{api_form, error_page, Ctx};
use crate::api::services::ServiceView;
use crate::api::ApiPath;
use crate::auth::MaybePrincipal;
use crate::i18n::{datetime, Msg};
use crate::model::ServiceKindName;
use crate::services::{Published, LOGIN_PATH};
use crate::state::AppState;

/// The files the portal serves under `/.suanli/` on services' origins.
const DEMO_JS: &str = include_str!("../../static/demo.js");
const TERMINAL_JS: &str = include_str!("../../static/terminal.js");
/// xterm.js 6.0.0 and its fit addon, from npm (`ops/vendor-web-deps`; MIT, `vendor/xterm/LICENSE`).
const XTERM_JS: &str = include_str!("../../static/vendor/xterm/xterm.js");
const XTERM_CSS: &str = include_str!("../../static/vendor/xterm/xterm.css");
const XTERM_FIT_JS: &str = include_str!("../../static/vendor/xterm/addon-fit.js");

/// `GET /services/{id}/open`: the owner goes to the service's origin with a grant (one use, a
/// minute), which becomes that origin's cookie for as long as the owner's portal session lasts
/// (two hours at most). Anyone else's service is not found.
pub async fn open(
    State(state): State<AppState>,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    viewer: MaybePrincipal,
    ApiPath(id): ApiPath<u64>,
) -> Response {
    let ctx = Ctx::new(&headers, viewer.0, &uri.to_string());
    let v = match researcher(&ctx) {
        Ok(v) => v,
        Err(e) => return error_page(&ctx, e),
    };
    let service = match crate::api::services::own(&state, &v, id).await {
        Ok(service) => service,
        Err(e) => return error_page(&ctx, e),
    };
    if service.state != "running" {
        return error_page(&ctx, crate::services::gone());
    }
    // Pages are signed in by a session; the visit is bound to it (it ends when the session does).
    let crate::auth::Via::Session { token_hash, .. } = &v.via else {
        return error_page(&ctx, crate::error::ApiError::unauthenticated());
    };
    let grant = crate::services::grant(&state, id as i64, v.user, token_hash);
    let to = format!("{}{LOGIN_PATH}?grant={grant}", service.url.trim_end_matches('/'));
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

/// The services of a lease or a model: where each runs, its state, how to open or stop it.
pub fn services_table(ctx: &Ctx, services: &[ServiceView]) -> Markup {
    let t = |m| ctx.t(m);
    html! {
        table.services {
            thead { tr { th { (t(Msg::Model)) } th { (t(Msg::Lease)) } th { (t(Msg::WhoMayOpen)) } th { (t(Msg::State)) } th { (t(Msg::Requests)) } th { (t(Msg::Created)) } th { "" } } }
            tbody {
                @for s in services {
                    tr data-service=(s.service_id) data-state=(s.state) {
                        td {
                            @if s.kind == ServiceKindName::Terminal.as_str() { (t(Msg::Terminal)) }
                            @else if s.kind == ServiceKindName::Jupyter.as_str() { "JupyterLab" }
                            @else { a href={ "/models/" (super::urlencode(&s.model)) } { (s.model) } " v" (s.version) }
                        }
                        td { a href={ "/leases/" (s.lease_id) } { "lease-" (s.lease_id) } }
                        td { (s.visibility.as_str()) }
                        td { (s.state) @if let Some(why) = &s.stop_reason { br; small { (why) } } }
                        td { (s.requests) }
                        td { (datetime(s.created_ms, ctx.lang)) }
                        td {
                            @if s.state == "running" {
                                a.open href={ "/services/" (s.service_id) "/open" } target="_blank" rel="noopener" { (t(Msg::OpenService)) }
                                (api_form(&format!("/api/v1/services/{}", s.service_id), "DELETE", Some(&ctx.path), None, t(Msg::StopService), html! {}))
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What the portal serves itself on a service's origin: its front page (`/`) by kind, and the
/// files under `/.suanli/`.
pub fn on_origin(service: &Published, path: &str) -> Response {
    let file =
        |content_type: &'static str, body: &'static str| ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response();
    let mut response = match (service.kind, path) {
        (ServiceKindName::ClassifierDemo, "/") => demo_page(service),
        (ServiceKindName::ClassifierDemo, "/.suanli/demo.js") => file("text/javascript; charset=utf-8", DEMO_JS),
        (ServiceKindName::Terminal, "/") => terminal_page(),
        (ServiceKindName::Terminal, "/.suanli/terminal.js") => file("text/javascript; charset=utf-8", TERMINAL_JS),
        (ServiceKindName::Terminal, "/.suanli/xterm.js") => file("text/javascript; charset=utf-8", XTERM_JS),
        (ServiceKindName::Terminal, "/.suanli/addon-fit.js") => file("text/javascript; charset=utf-8", XTERM_FIT_JS),
        (ServiceKindName::Terminal, "/.suanli/xterm.css") => file("text/css; charset=utf-8", XTERM_CSS),
        _ => (StatusCode::NOT_FOUND, "not found\n").into_response(),
    };
    let h = response.headers_mut();
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    response
}

/// A page the portal serves on a service's origin: `title`, the files `head` names, `body`.
fn origin_page(title: &str, head: Markup, body_style: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                (head)
            }
            body style=(body_style) { (body) }
        }
    };
    Html(markup.into_string()).into_response()
}

/// A terminal's page: xterm.js, connected to `/pty`.
fn terminal_page() -> Response {
    let head = html! {
        link rel="stylesheet" href="/.suanli/xterm.css";
        script src="/.suanli/xterm.js" defer {}
        script src="/.suanli/addon-fit.js" defer {}
        script src="/.suanli/terminal.js" defer {}
    };
    let body = html! {
        p #status style="color: #ccc; font-family: sans-serif; margin: 0.25rem" {}
        div #terminal style="flex: 1" {}
    };
    origin_page("Terminal · Suanli", head, "margin: 0; background: #000; height: 100vh; display: flex; flex-direction: column", body)
}

/// A demo's page: choose an image, see its classes.
fn demo_page(service: &Published) -> Response {
    let title = format!("{} v{} · Suanli demo", service.model, service.version);
    let body = html! {
        h1 { (service.model) " " small { "v" (service.version) } }
        p { "Choose an image to classify it. 选择一张图片进行分类。" }
        input #image type="file" accept="image/*";
        div { img #preview alt="" style="max-width: 100%; max-height: 20rem; margin-top: 1rem"; }
        ol #result aria-live="polite" {}
        h2 { "API" }
        p { code { "POST /v1/predict" } " with an image's bytes answers " code { "{\"result\": {\"class\", \"score\", \"top\"}}" } "; "
            code { "POST /v1/predict/batch" } " takes " code { "{\"images\": [base64, …]}" } "; " code { "GET /v1/model" } " describes the model." }
    };
    origin_page(&title, html! { script src="/.suanli/demo.js" defer {} }, "font-family: sans-serif; max-width: 40rem; margin: 2rem auto", body)
}
