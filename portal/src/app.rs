//! The router: pages, the REST API, its OpenAPI document, the audit middleware.

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use utoipa::OpenApi;

use crate::api::{accounts, alerts, annotation, datasets, federation, image_search, jobs, market, models, operations, operator, services};
use crate::error::ApiError;
use crate::pages;
use crate::state::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Suanli portal API", version = "1", description = "Accounts, catalogue, leases, suppliers and operators. Errors: {\"error\": {\"code\", \"message\", \"fields\"}}; codes in portal/API.md. Authenticate with the session cookie (+ X-CSRF-Token on writes) or `Authorization: Bearer <API token>`."),
    paths(
        accounts::register, accounts::send_phone_code, accounts::activate, accounts::login, accounts::login_totp, accounts::logout, accounts::refresh,
        accounts::me, accounts::update_me, accounts::deregister, accounts::request_reset, accounts::confirm_reset,
        accounts::begin_totp, accounts::confirm_totp, accounts::create_api_token, accounts::list_api_tokens, accounts::revoke_api_token,
        accounts::add_ssh_key, accounts::list_ssh_keys, accounts::remove_ssh_key, alerts::list, alerts::get_settings, alerts::put_settings,
        market::catalogue, market::cluster_detail, market::telemetry, market::live,
        market::request_lease, market::list_leases, market::get_lease, market::verify_code, market::lease_access, market::lease_password, market::ssh_certificate,
        market::extend_lease, market::end_lease, market::spend, jobs::statement,
        jobs::submit, jobs::list, jobs::get, jobs::cancel, jobs::log, jobs::curves, jobs::output,
        datasets::storage, datasets::create_upload, datasets::head_upload, datasets::get_upload, datasets::patch_upload, datasets::delete_upload,
        datasets::create, datasets::list, datasets::get, datasets::delete, datasets::get_version, datasets::create_version, datasets::archive, datasets::split, datasets::file,
        datasets::share, datasets::unshare,
        models::register, models::list, models::get, models::promote, models::download, models::compare,
        annotation::create, annotation::list, annotation::get, annotation::set_member, annotation::remove_member, annotation::join, annotation::next,
        annotation::assign, annotation::my_slots, annotation::get_slot, annotation::save, annotation::submit, annotation::release, annotation::slot_image_file, annotation::image_file,
        annotation::conflicts, annotation::decide, annotation::dashboard, annotation::export, annotation::export_version,
        image_search::list, image_search::add_dataset, image_search::rebuild, image_search::image, image_search::remove_image, image_search::search, image_search::similar, image_search::rebuild_global,
        market::enrollment_token, market::list_nodes, market::list_my_clusters, market::publish, market::modify, market::delist, market::approve,
        market::set_card_status,
        operator::list_reviews, operator::decide_review, operator::list_operators, operator::set_roles, operator::audit, operations::alertmanager,
        federation::catalogue, federation::members, federation::lease, federation::list, federation::access, federation::end,
        services::create, services::list, services::get, services::log, services::update, services::stop, services::public_demos,
    ),
    tags((name = "accounts"), (name = "market"), (name = "leases"), (name = "jobs"), (name = "datasets"), (name = "models"), (name = "image search"), (name = "annotation"), (name = "services"), (name = "supplier"), (name = "operator"), (name = "operations"))
)]
pub struct ApiDoc;

async fn openapi_json() -> Response {
    let doc = ApiDoc::openapi().to_json().unwrap_or_else(|_| "{}".into());
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

async fn api_not_found() -> ApiError {
    ApiError::not_found("endpoint")
}

async fn health() -> &'static str {
    "ok"
}

/// The whole application. Requests larger than 8 MiB (a licence scan is at most 5 MiB, base64)
/// are refused before a handler sees them.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/accounts", post(accounts::register))
        .route("/activation", post(accounts::activate))
        .route("/phone-codes", post(accounts::send_phone_code))
        .route("/session", post(accounts::login).delete(accounts::logout))
        .route("/session/totp", post(accounts::login_totp))
        .route("/session/refresh", post(accounts::refresh))
        .route("/password-reset", post(accounts::request_reset))
        .route("/password-reset/confirm", post(accounts::confirm_reset))
        .route("/me", get(accounts::me).patch(accounts::update_me).delete(accounts::deregister))
        .route("/me/totp", post(accounts::begin_totp))
        .route("/me/totp/confirm", post(accounts::confirm_totp))
        .route("/me/api-tokens", get(accounts::list_api_tokens).post(accounts::create_api_token))
        .route("/me/api-tokens/{id}", axum::routing::delete(accounts::revoke_api_token))
        .route("/me/ssh-keys", get(accounts::list_ssh_keys).post(accounts::add_ssh_key))
        .route("/me/ssh-keys/{id}", axum::routing::delete(accounts::remove_ssh_key))
        .route("/me/spend", get(market::spend))
        .route("/me/statement", get(jobs::statement))
        .route("/jobs", get(jobs::list).post(jobs::submit))
        .route("/jobs/{id}", get(jobs::get))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/log", get(jobs::log))
        .route("/jobs/{id}/curves", get(jobs::curves))
        .route("/jobs/{id}/outputs/{name}", get(jobs::output))
        .route("/me/storage", get(datasets::storage))
        .route("/uploads", post(datasets::create_upload))
        .route(
            "/uploads/{id}",
            get(datasets::get_upload)
                .head(datasets::head_upload)
                .patch(datasets::patch_upload)
                .delete(datasets::delete_upload)
                // A PATCH streams to disk whatever its size: the 8 MiB limit is for bodies read into memory.
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/datasets", get(datasets::list).post(datasets::create))
        .route("/datasets/{id}", get(datasets::get).delete(datasets::delete))
        .route("/datasets/{id}/versions", post(datasets::create_version))
        .route("/datasets/{id}/versions/{version}", get(datasets::get_version))
        .route("/datasets/{id}/versions/{version}/archive", get(datasets::archive))
        .route("/datasets/{id}/versions/{version}/split", get(datasets::split))
        .route("/datasets/{id}/versions/{version}/files/{*name}", get(datasets::file))
        .route("/datasets/{id}/shares/{username}", put(datasets::share).delete(datasets::unshare))
        .route("/models", get(models::list).post(models::register))
        .route("/models/{name}", get(models::get))
        .route("/models/{name}/promote", post(models::promote))
        .route("/models/{name}/versions/{version}/download", get(models::download))
        .route("/models/{name}/compare", get(models::compare))
        .route("/agent-tunnel", get(crate::tunnels::accept))
        .route("/services", get(services::list).post(services::create))
        .route("/services/{id}", get(services::get).patch(services::update).delete(services::stop))
        .route("/services/{id}/log", get(services::log))
        .route("/demos", get(services::public_demos))
        .route("/annotation-projects", get(annotation::list).post(annotation::create))
        .route("/annotation-projects/{id}", get(annotation::get))
        .route("/annotation-projects/{id}/members/{username}", put(annotation::set_member).delete(annotation::remove_member))
        .route("/annotation-projects/{id}/join", post(annotation::join))
        .route("/annotation-projects/{id}/next", post(annotation::next))
        .route("/annotation-projects/{id}/my-slots", get(annotation::my_slots))
        .route("/annotation-projects/{id}/tasks/{task}/slots/{slot}", get(annotation::get_slot))
        .route("/annotation-projects/{id}/tasks/{task}/slots/{slot}/assign", post(annotation::assign))
        .route("/annotation-projects/{id}/tasks/{task}/slots/{slot}/images/{position}", put(annotation::save))
        .route("/annotation-projects/{id}/tasks/{task}/slots/{slot}/images/{position}/file", get(annotation::slot_image_file))
        .route("/annotation-projects/{id}/tasks/{task}/slots/{slot}/submit", post(annotation::submit))
        .route("/annotation-projects/{id}/tasks/{task}/slots/{slot}/release", post(annotation::release))
        .route("/annotation-projects/{id}/images/{image_no}/file", get(annotation::image_file))
        .route("/annotation-projects/{id}/images/{image_no}/decisions", post(annotation::decide))
        .route("/annotation-projects/{id}/conflicts", get(annotation::conflicts))
        .route("/annotation-projects/{id}/dashboard", get(annotation::dashboard))
        .route("/annotation-projects/{id}/export", get(annotation::export))
        .route("/annotation-projects/{id}/export-version", post(annotation::export_version))
        .route("/image-libraries", get(image_search::list))
        .route("/image-libraries/{library}/datasets", post(image_search::add_dataset))
        .route("/image-libraries/{library}/rebuild", post(image_search::rebuild))
        .route("/image-libraries/{library}/images/{sha256}", get(image_search::image).delete(image_search::remove_image))
        .route("/image-search", post(image_search::search))
        .route("/image-search/similar", post(image_search::similar))
        .route("/me/alerts", get(alerts::list))
        .route("/me/notifications", get(alerts::get_settings).put(alerts::put_settings))
        .route("/catalogue", get(market::catalogue))
        .route("/federation/catalogue", get(federation::catalogue))
        .route("/federation/members", get(federation::members))
        .route("/federation/leases", get(federation::list).post(federation::lease))
        .route("/federation/leases/{id}/access", post(federation::access))
        .route("/federation/leases/{id}/end", post(federation::end))
        .route("/clusters/{id}", get(market::cluster_detail))
        .route("/clusters/{id}/telemetry", get(market::telemetry))
        .route("/clusters/{id}/live", get(market::live))
        .route("/leases", get(market::list_leases).post(market::request_lease))
        .route("/leases/{id}", get(market::get_lease))
        .route("/leases/{id}/verify", post(market::verify_code))
        .route("/leases/{id}/access", get(market::lease_access))
        .route("/leases/{id}/password", post(market::lease_password))
        .route("/leases/{id}/ssh-certificate", post(market::ssh_certificate))
        .route("/leases/{id}/extend", post(market::extend_lease))
        .route("/leases/{id}/end", post(market::end_lease))
        .route("/supplier/enrollment-tokens", post(market::enrollment_token))
        .route("/supplier/nodes", get(market::list_nodes))
        .route("/supplier/clusters", get(market::list_my_clusters).post(market::publish))
        .route("/supplier/clusters/{id}/listing", put(market::modify))
        .route("/supplier/clusters/{id}/delist", post(market::delist))
        .route("/supplier/leases/{id}/approve", post(market::approve))
        .route("/supplier/cards/{id}/status", put(market::set_card_status))
        .route("/operator/reviews", get(operator::list_reviews))
        .route("/operator/reviews/{user_id}", post(operator::decide_review))
        .route("/operator/users", get(operator::list_operators))
        .route("/operator/users/{user_id}/roles", put(operator::set_roles))
        .route("/operator/audit", get(operator::audit))
        .route("/operator/image-libraries/global/rebuild", post(image_search::rebuild_global))
        .route("/operations/alertmanager", post(operations::alertmanager))
        .route("/openapi.json", get(openapi_json))
        .fallback(api_not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::audit::record_writes));

    Router::new()
        .route("/", get(pages::market::catalogue_page))
        .route("/clusters/{id}", get(pages::market::cluster_page))
        .route("/leases", get(pages::market::leases_page))
        .route("/leases/{id}", get(pages::market::lease_page))
        .route("/jobs", get(pages::market::jobs_page))
        .route("/jobs/{id}", get(pages::market::job_page))
        .route("/datasets", get(pages::data::datasets_page))
        .route("/datasets/{id}", get(pages::data::dataset_page))
        .route("/models", get(pages::data::models_page))
        .route("/models/{name}", get(pages::data::model_page))
        .route("/search", get(pages::data::image_search_page))
        .route("/annotation", get(pages::annotate::projects_page))
        .route("/annotation/{id}", get(pages::annotate::project_page))
        .route("/annotation/{id}/tasks/{task}/slots/{slot}", get(pages::annotate::tool_page))
        .route("/login", get(pages::account::login_page))
        .route("/register", get(pages::account::register_page))
        .route("/activate", get(pages::account::activate_page))
        .route("/reset", get(pages::account::reset_page))
        .route("/me", get(pages::account::me_page))
        .route("/alerts", get(pages::account::alerts_page))
        .route("/supplier", get(pages::staff::supplier_page))
        .route("/operator", get(pages::staff::operator_page))
        .route("/lang/{lang}", get(pages::account::switch_lang))
        .route("/terms", get(pages::account::terms_page))
        .route("/federation", get(pages::market::federation_page))
        .route("/privacy", get(pages::account::privacy_page))
        .route("/services/{id}/open", get(pages::services::open))
        .route("/static/app.js", get(pages::static_js))
        .route("/static/app.css", get(pages::static_css))
        .route("/static/annotate.js", get(pages::annotate::static_annotate_js))
        .route("/healthz", get(health))
        .nest("/api/v1", api)
        .layer(DefaultBodyLimit::max(8 * 1024 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn_with_state(state.clone(), request_id))
        // Outermost: a request to a service's origin is the proxy's alone (`services.rs`).
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::services::route))
        .with_state(state)
}

/// Gives each request an ID (the caller's `x-request-id` when it is a safe one), runs it in a
/// span that carries the ID into every log line, makes it the ID the broker's calls carry
/// (`suanli_observability::scope`), and answers with it. Failed requests are logged at info,
/// the rest at debug.
async fn request_id(State(state): State<AppState>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use suanli_observability::{RequestId, REQUEST_ID_HEADER};
    use tracing::Instrument;
    let id = request.headers().get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).and_then(RequestId::parse).unwrap_or_default();
    let span = tracing::info_span!("request", request_id = id.as_str(), method = %request.method(), path = request.uri().path());
    let started = std::time::Instant::now();
    let mut response = suanli_observability::scope(id.clone(), next.run(request)).instrument(span.clone()).await;
    let (status, elapsed) = (response.status().as_u16(), started.elapsed());
    state.metrics.observe_request(status, elapsed);
    let elapsed_ms = elapsed.as_millis() as u64;
    span.in_scope(|| {
        if status >= 400 {
            tracing::info!(status, elapsed_ms, "answered");
        } else {
            tracing::debug!(status, elapsed_ms, "answered");
        }
    });
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

/// Defence in depth for every response: no framing, no sniffing, scripts only from ourselves.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    response
}
