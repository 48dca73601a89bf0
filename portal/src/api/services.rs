//! Services on leased cards (`crate::services`): a researcher deploys a model version of theirs
//! as a demo on a lease of theirs, watches it, changes who may reach it, updates it to another
//! version without a failed request, and stops it. A service is its owner's alone: anyone
//! else's is `NOT_FOUND` here.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::{ApiJson, ApiPath};
use crate::auth::{Principal, Researcher};
use crate::db::{new_public_id, now_ms, opt_i64, opt_str};
use crate::error::{ApiError, ApiResult, Code};
use crate::model::{ServiceKindName, ServiceVisibility};
use crate::services::{Deployment, CLASSIFIER_FILES};
use crate::state::AppState;
use suanli_tunnel::control::{ServiceKind, ServiceSpec};
use suanli_types::ErrorCode;

/// Replicas a demo may ask for (each on its own card of the lease).
const MAX_REPLICAS: u32 = 16;
/// Requests per minute each visitor of a demo gets, unless its owner says otherwise.
const DEFAULT_RATE_PER_MINUTE: u32 = 600;

#[derive(Deserialize, ToSchema)]
pub struct CreateService {
    /// An active lease of the caller's; the service runs on its first node.
    pub lease_id: u64,
    /// `classifier_demo` (the default): a model's demo; `terminal`: a login shell of the
    /// lease's account in the browser; `jupyter`: JupyterLab in the lease's home (these two
    /// private only).
    #[serde(default)]
    pub kind: Option<ServiceKindName>,
    /// For a demo: a model of the caller's whose version is a classifier `suanli-job` trained
    /// (its job left `model.json` and `model.safetensors`).
    #[serde(default)]
    pub model: Option<String>,
    /// 0 or absent: the serving version, else the latest.
    #[serde(default)]
    pub version: u32,
    /// `private` (the default), `link` or `public`.
    #[serde(default)]
    pub visibility: Option<ServiceVisibility>,
    /// Processes, one per card of the lease on the node (1 to 16; default 1).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Requests per minute each visitor other than the owner may make (default 600).
    #[serde(default)]
    pub rate_per_minute: Option<u32>,
}

#[derive(Deserialize, ToSchema)]
pub struct UpdateService {
    pub visibility: Option<ServiceVisibility>,
    /// Another version of the same model: started beside the running one, which stops once the
    /// new one answers (no request fails).
    pub version: Option<u32>,
    pub rate_per_minute: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct ServiceView {
    pub service_id: u64,
    pub lease_id: u64,
    pub node_id: u64,
    /// `classifier_demo`
    pub kind: String,
    pub model: String,
    pub version: u32,
    pub visibility: ServiceVisibility,
    /// Where visitors reach it (its own origin).
    pub url: String,
    /// Raised by each update.
    pub generation: u64,
    pub replicas: u32,
    pub rate_per_minute: u32,
    /// `running` or `stopped` (for good: its URL answers 410).
    pub state: String,
    pub stop_reason: Option<String>,
    pub created_ms: i64,
    pub stopped_ms: Option<i64>,
    /// Metering: how long it has run, and the requests it was sent (written every few seconds).
    pub running_ms: i64,
    pub requests: i64,
    /// When it was last used (a request, or a browser connected), as of the last few seconds;
    /// an environment stops when nobody has used it for the portal's idle time.
    pub last_used_ms: Option<i64>,
    /// What its node's agent says now (`state`: starting, ready, restarting, stopped;
    /// `ready_replicas`, `restarts`, `last_exit`); absent when the node is not connected.
    #[schema(value_type = Option<Object>)]
    pub live: Option<serde_json::Value>,
}

const VIEW_COLUMNS: &str =
    "id, lease_id, node_id, kind, model_name, model_version, visibility, slug, generation, replicas, rate_per_minute, state, stop_reason, created_ms, stopped_ms, requests, last_request_ms";

fn view_of(state: &AppState, row: &sqlx::any::AnyRow) -> ApiResult<ServiceView> {
    let created_ms: i64 = row.try_get("created_ms")?;
    let stopped_ms = opt_i64(row, "stopped_ms")?;
    Ok(ServiceView {
        service_id: row.try_get::<i64, _>("id")? as u64,
        lease_id: row.try_get::<i64, _>("lease_id")? as u64,
        node_id: row.try_get::<i64, _>("node_id")? as u64,
        kind: row.try_get("kind")?,
        model: opt_str(row, "model_name")?.unwrap_or_default(),
        version: opt_i64(row, "model_version")?.unwrap_or(0) as u32,
        visibility: ServiceVisibility::parse(&row.try_get::<String, _>("visibility")?).unwrap_or(ServiceVisibility::Private),
        url: format!("{}/", state.services.origin(&row.try_get::<String, _>("slug")?)),
        generation: row.try_get::<i64, _>("generation")? as u64,
        replicas: row.try_get::<i64, _>("replicas")? as u32,
        rate_per_minute: row.try_get::<i64, _>("rate_per_minute")? as u32,
        state: row.try_get("state")?,
        stop_reason: opt_str(row, "stop_reason")?,
        created_ms,
        stopped_ms,
        running_ms: stopped_ms.unwrap_or_else(now_ms) - created_ms,
        requests: row.try_get("requests")?,
        last_used_ms: opt_i64(row, "last_request_ms")?,
        live: None,
    })
}

/// The caller's service `id` (anyone else's is not found).
pub async fn own(state: &AppState, p: &Principal, id: u64) -> ApiResult<ServiceView> {
    let row = sqlx::query(&format!("SELECT {VIEW_COLUMNS} FROM services WHERE id = $1 AND owner_id = $2"))
        .bind(id as i64)
        .bind(p.user.0)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("service {id}")))?;
    view_of(state, &row)
}

/// The caller's services, newest first; `lease`: only those on that lease.
pub async fn services_of(state: &AppState, p: &Principal, lease: Option<u64>) -> ApiResult<Vec<ServiceView>> {
    let rows = match lease {
        Some(lease) => {
            sqlx::query(&format!("SELECT {VIEW_COLUMNS} FROM services WHERE owner_id = $1 AND lease_id = $2 ORDER BY created_ms DESC"))
                .bind(p.user.0)
                .bind(lease as i64)
                .fetch_all(&state.db.pool)
                .await?
        }
        None => {
            sqlx::query(&format!("SELECT {VIEW_COLUMNS} FROM services WHERE owner_id = $1 ORDER BY created_ms DESC"))
                .bind(p.user.0)
                .fetch_all(&state.db.pool)
                .await?
        }
    };
    rows.iter().map(|r| view_of(state, r)).collect()
}

/// The files of a model version that `suanli-job serve` loads, by name: their SHA-256.
async fn classifier_files(state: &AppState, p: &Principal, model: &str, version: u32) -> ApiResult<(u32, u64, BTreeMap<String, String>)> {
    let v = super::models::version_of(state, p, model, version).await?;
    let job = super::jobs::job_of(state, p, v.job_id).await?;
    let mut files = BTreeMap::new();
    for name in CLASSIFIER_FILES {
        let sha = job.outputs.get(name).ok_or_else(|| {
            ApiError::field("model", format!("version {} of {model} is not a classifier suanli-job serves: its job left no {name}", v.version))
        })?;
        files.insert(name.to_owned(), sha.clone());
    }
    Ok((v.version, v.job_id, files))
}

fn check_rate(rate: Option<u32>) -> ApiResult<Option<u32>> {
    match rate {
        Some(r) if !(1..=1_000_000).contains(&r) => Err(ApiError::field("rate_per_minute", "1 to 1000000")),
        other => Ok(other),
    }
}

#[utoipa::path(post, path = "/api/v1/services", tag = "services", request_body = CreateService,
    responses((status = 201, body = ServiceView), (status = 200, description = "the lease's running terminal or JupyterLab (one of each per lease)", body = ServiceView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn create(State(state): State<AppState>, Researcher(p): Researcher, ApiJson(req): ApiJson<CreateService>) -> ApiResult<Response> {
    if !state.services.enabled() {
        return Err(ApiError::broker(ErrorCode::Unavailable, "this portal publishes no services (it has no services_domain)"));
    }
    let replicas = req.replicas.unwrap_or(1);
    if !(1..=MAX_REPLICAS).contains(&replicas) {
        return Err(ApiError::field("replicas", format!("1 to {MAX_REPLICAS}")));
    }
    let rate = check_rate(req.rate_per_minute)?.unwrap_or(DEFAULT_RATE_PER_MINUTE);
    // The broker answers for the caller only: someone else's lease is not found.
    let lease = super::market::lease_of(&state, &p, req.lease_id).await?;
    if lease.state != "active" {
        return Err(ApiError::broker(ErrorCode::InvalidTransition, format!("lease {} is {}: a service runs on an active lease", lease.lease_id, lease.state)));
    }
    // The lease's first node (a Class B lease names its cards; the access says their nodes).
    let node = match lease.node_ids.first() {
        Some(node) => *node,
        None => super::market::access_of(&state, &p, lease.lease_id)
            .await?
            .nodes
            .first()
            .map(|n| n.node_id)
            .ok_or_else(|| ApiError::unavailable("the lease's node is not known yet"))?,
    };
    let kind = req.kind.unwrap_or(ServiceKindName::ClassifierDemo);
    let visibility = req.visibility.unwrap_or(ServiceVisibility::Private);
    let (model, version, job_id, files, kind_spec) = match kind {
        ServiceKindName::ClassifierDemo => {
            let model = req.model.clone().ok_or_else(|| ApiError::field("model", "a demo needs the model to serve"))?;
            let (version, job_id, files) = classifier_files(&state, &p, &model, req.version).await?;
            (Some(model), Some(version), job_id, files.clone(), ServiceKind::ClassifierDemo { files })
        }
        ServiceKindName::Terminal | ServiceKindName::Jupyter => {
            // A shell or a notebook as the lease's account is its owner's alone, whatever is asked.
            if visibility != ServiceVisibility::Private || replicas != 1 {
                return Err(ApiError::field("visibility", format!("a {kind} is private, with one replica")));
            }
            // One of each per lease: asking again opens the one that runs.
            let running = services_of(&state, &p, Some(lease.lease_id)).await?.into_iter().find(|s| s.kind == kind.as_str() && s.state == "running");
            if let Some(running) = running {
                return Ok((StatusCode::OK, axum::Json(running)).into_response());
            }
            (None, None, 0, BTreeMap::new(), if kind == ServiceKindName::Terminal { ServiceKind::Terminal } else { ServiceKind::Jupyter })
        }
    };
    let id = new_public_id();
    let slug = crate::services::new_slug();
    let d =
        Deployment { id, running: true, owner: p.user, node, job_id, spec: ServiceSpec { lease: lease.lease_id, generation: 1, replicas, kind: kind_spec } };
    sqlx::query(
        "INSERT INTO services (id, owner_id, lease_id, node_id, kind, model_name, model_version, job_id, files, visibility, slug, generation, replicas, rate_per_minute, state, created_ms)
         VALUES ($1, $2, $3, $4, $14, $5, $6, $7, $8, $9, $10, 1, $11, $12, 'running', $13)",
    )
    .bind(id)
    .bind(p.user.0)
    .bind(lease.lease_id as i64)
    .bind(node as i64)
    .bind(model)
    .bind(version.map(i64::from))
    .bind(job_id as i64)
    .bind(serde_json::to_string(&files).map_err(ApiError::internal)?)
    .bind(visibility.as_str())
    .bind(&slug)
    .bind(i64::from(replicas))
    .bind(i64::from(rate))
    .bind(now_ms())
    .bind(kind.as_str())
    .execute(&state.db.pool)
    .await?;
    // A service its node was not told of is not kept: the caller sees why and nothing remains.
    if let Err(e) = crate::services::deploy(&state, &d).await {
        sqlx::query("DELETE FROM services WHERE id = $1").bind(id).execute(&state.db.pool).await?;
        return Err(e.into());
    }
    Ok((StatusCode::CREATED, axum::Json(own(&state, &p, id as u64).await?)).into_response())
}

#[utoipa::path(get, path = "/api/v1/services", tag = "services",
    responses((status = 200, body = [ServiceView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, Researcher(p): Researcher) -> ApiResult<axum::Json<Vec<ServiceView>>> {
    Ok(axum::Json(services_of(&state, &p, None).await?))
}

#[utoipa::path(get, path = "/api/v1/services/{id}", tag = "services", params(("id" = u64, Path)),
    responses((status = 200, body = ServiceView), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<ServiceView>> {
    let mut view = own(&state, &p, id).await?;
    if view.state == "running" {
        view.live = crate::services::live_status(&state, view.node_id, id as i64).await.and_then(|s| serde_json::to_value(s).ok());
    }
    Ok(axum::Json(view))
}

/// The end of the service's log (its output and the agent's notes: starts, ends, restarts).
#[utoipa::path(get, path = "/api/v1/services/{id}/log", tag = "services", params(("id" = u64, Path)),
    responses((status = 200, description = "the end of the log", content_type = "text/plain"), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 410, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn log(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<Response> {
    let view = own(&state, &p, id).await?;
    if view.state != "running" {
        return Err(crate::services::gone());
    }
    let text = crate::services::log(&state, view.node_id, id as i64).await.map_err(ApiError::unavailable)?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[utoipa::path(patch, path = "/api/v1/services/{id}", tag = "services", params(("id" = u64, Path)), request_body = UpdateService,
    responses((status = 200, body = ServiceView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody), (status = 410, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<UpdateService>,
) -> ApiResult<axum::Json<ServiceView>> {
    let rate = check_rate(req.rate_per_minute)?;
    let view = own(&state, &p, id).await?;
    if view.state != "running" {
        return Err(crate::services::gone());
    }
    if ServiceKindName::parse(&view.kind).is_some_and(ServiceKindName::private_only)
        && (req.version.is_some() || req.visibility.is_some_and(|v| v != ServiceVisibility::Private))
    {
        return Err(ApiError::field("visibility", format!("a {} is private and has no model version", view.kind)));
    }
    if let Some(version) = req.version.filter(|v| *v != view.version) {
        let (version, job_id, files) = classifier_files(&state, &p, &view.model, version).await?;
        let mut d = crate::services::deployment(&state, id as i64).await?.ok_or_else(|| ApiError::not_found(format!("service {id}")))?;
        let previous = d.spec.generation;
        d.job_id = job_id;
        d.spec.generation = previous + 1;
        d.spec.kind = ServiceKind::ClassifierDemo { files: files.clone() };
        // The node first: the table says what runs only once it does.
        crate::services::deploy(&state, &d).await?;
        let moved = sqlx::query("UPDATE services SET generation = $1, model_version = $2, job_id = $3, files = $4 WHERE id = $5 AND generation = $6")
            .bind(d.spec.generation as i64)
            .bind(i64::from(version))
            .bind(job_id as i64)
            .bind(serde_json::to_string(&files).map_err(ApiError::internal)?)
            .bind(id as i64)
            .bind(previous as i64)
            .execute(&state.db.pool)
            .await?
            .rows_affected();
        if moved == 0 {
            return Err(ApiError::new(Code::Broker(ErrorCode::AlreadyExists), "the service was updated by another request meanwhile: look at it again"));
        }
    }
    if req.visibility.is_some() || rate.is_some() {
        sqlx::query("UPDATE services SET visibility = COALESCE($1, visibility), rate_per_minute = COALESCE($2, rate_per_minute) WHERE id = $3")
            .bind(req.visibility.map(|v| v.as_str()))
            .bind(rate.map(i64::from))
            .bind(id as i64)
            .execute(&state.db.pool)
            .await?;
    }
    let view = own(&state, &p, id).await?;
    state.services.forget_id(id as i64);
    Ok(axum::Json(view))
}

#[utoipa::path(delete, path = "/api/v1/services/{id}", tag = "services", params(("id" = u64, Path)),
    responses((status = 204, description = "stopped (also when it had stopped already)"), (status = 401, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn stop(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<StatusCode> {
    own(&state, &p, id).await?;
    crate::services::stop(&state, id as i64, "stopped by its owner").await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct PublicDemo {
    pub model: String,
    pub version: u32,
    pub url: String,
    pub created_ms: i64,
}

/// Demos their owners made public, newest first (no login needed).
#[utoipa::path(get, path = "/api/v1/demos", tag = "services", responses((status = 200, body = [PublicDemo])))]
pub async fn public_demos(State(state): State<AppState>) -> ApiResult<axum::Json<Vec<PublicDemo>>> {
    let rows = sqlx::query(
        "SELECT model_name, model_version, slug, created_ms FROM services WHERE visibility = 'public' AND state = 'running' ORDER BY created_ms DESC LIMIT 200",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let demos: ApiResult<Vec<PublicDemo>> = rows
        .iter()
        .map(|r| {
            Ok(PublicDemo {
                model: opt_str(r, "model_name")?.unwrap_or_default(),
                version: opt_i64(r, "model_version")?.unwrap_or(0) as u32,
                url: format!("{}/", state.services.origin(&r.try_get::<String, _>("slug")?)),
                created_ms: r.try_get("created_ms")?,
            })
        })
        .collect();
    Ok(axum::Json(demos?))
}
