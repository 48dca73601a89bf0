//! Jobs for researchers (submit, follow, cancel, what each cost) and monthly statements for
//! researchers and suppliers. The broker validates specs and keeps the ledger; the portal
//! passes the user's own broker token, so it can only ever see that user's jobs and money.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use suanli_proto::v1;
use suanli_proto::v1::job_service_client::JobServiceClient;
use utoipa::{IntoParams, ToSchema};

use super::{idempotency_key, ApiJson, ApiPath, ApiQuery};
use crate::auth::{Principal, Researcher};
use crate::error::{ApiError, ApiResult};
use crate::model::UserKind;
use crate::state::AppState;

type Jobs = JobServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, suanli_proto::client::Bearer>>;

fn jobs_client(state: &AppState, p: &Principal) -> ApiResult<Jobs> {
    state.market.jobs_as(&p.broker_token(state)?)
}

#[derive(Serialize, ToSchema)]
pub struct AttemptView {
    pub number: u32,
    pub card_ids: Vec<u64>,
    pub node_ids: Vec<u64>,
    pub placed_ms: i64,
    pub started_ms: i64,
    pub ended_ms: i64,
    /// `completed`, `exit_status`, `card_lost`, `preempted`, … (see the broker's JobEndReason).
    pub end_reason: Option<String>,
    pub exit_status: Option<i32>,
    pub cost_minor: i64,
}

#[derive(Serialize, ToSchema)]
pub struct JobView {
    pub job_id: u64,
    pub name: String,
    pub kind: String,
    /// queued, placed, running, succeeded, failed or cancelled.
    pub state: String,
    pub submitted_ms: i64,
    pub ended_ms: i64,
    pub end_reason: Option<String>,
    /// Set while the platform waits for a running attempt to stop.
    pub stopping: Option<String>,
    pub failures: u32,
    pub attempts: Vec<AttemptView>,
    /// Card-seconds of service so far (ended attempts).
    pub card_seconds: u64,
    /// What the job cost so far, CNY fen: card-time × each card's lease price.
    pub cost_minor: i64,
    /// The outputs the job left, by name: their SHA-256 in the artifact store.
    pub outputs: BTreeMap<String, String>,
    pub checkpoint_sha256: Option<String>,
    /// The running attempt's latest progress line as the job printed it (step, loss, ETA …).
    #[schema(value_type = Option<Object>)]
    pub progress: Option<serde_json::Value>,
    pub progress_ms: i64,
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

fn view(j: &v1::Job) -> JobView {
    let reason = |r: &Option<v1::JobEndReason>| r.as_ref().map(|r| r.kind.clone());
    JobView {
        job_id: j.job_id,
        name: j.name.clone(),
        kind: j.kind.clone(),
        state: j.state.clone(),
        submitted_ms: j.submitted_at_ms,
        ended_ms: j.ended_at_ms,
        end_reason: reason(&j.end_reason),
        stopping: reason(&j.stop_requested),
        failures: j.failures,
        attempts: j
            .attempts
            .iter()
            .map(|a| AttemptView {
                number: a.number,
                card_ids: a.card_ids.clone(),
                node_ids: a.node_ids.clone(),
                placed_ms: a.placed_at_ms,
                started_ms: a.started_at_ms,
                ended_ms: a.ended_at_ms,
                end_reason: reason(&a.end_reason),
                exit_status: a.end_reason.as_ref().filter(|r| r.kind == "exit_status").map(|r| r.exit_status),
                cost_minor: a.cost_minor,
            })
            .collect(),
        card_seconds: j.attained_card_ms / 1000,
        cost_minor: j.cost_minor,
        outputs: j.outputs.clone().into_iter().collect(),
        checkpoint_sha256: Some(j.checkpoint_sha256.clone()).filter(|s| !s.is_empty()),
        progress: serde_json::from_str(&j.progress_json).ok(),
        progress_ms: j.progress_at_ms,
        spec: serde_json::from_str(&j.spec_json).unwrap_or_default(),
    }
}

#[derive(Deserialize, ToSchema)]
pub struct SubmitRequest {
    /// The job spec, as `suanli-scheduler validate` documents it (name, kind, resources, run, …).
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// Idempotency key: a retry with the same key submits once.
    pub request_id: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = SubmitRequest,
    responses((status = 201, body = JobView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn submit(State(state): State<AppState>, Researcher(p): Researcher, ApiJson(req): ApiJson<SubmitRequest>) -> ApiResult<Response> {
    // A form sends the spec as JSON text; scripts send the object itself.
    let spec = match req.spec {
        serde_json::Value::String(text) => serde_json::from_str(&text).map_err(|e| ApiError::field("spec", format!("not JSON: {e}")))?,
        other => other,
    };
    if !spec.is_object() {
        return Err(ApiError::field("spec", "a job spec object"));
    }
    let request_id = idempotency_key("job", p.user, req.request_id.as_deref());
    let job = jobs_client(&state, &p)?.submit_job(v1::SubmitJobRequest { request_id, spec_json: spec.to_string() }).await?.into_inner();
    Ok((StatusCode::CREATED, axum::Json(view(&job))).into_response())
}

#[derive(Deserialize, IntoParams)]
pub struct ListQuery {
    /// Only queued, placed and running jobs.
    pub live: Option<bool>,
}

#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = [JobView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, Researcher(p): Researcher, ApiQuery(q): ApiQuery<ListQuery>) -> ApiResult<axum::Json<Vec<JobView>>> {
    Ok(axum::Json(jobs_of(&state, &p, q.live.unwrap_or(false)).await?))
}

pub async fn jobs_of(state: &AppState, p: &Principal, live_only: bool) -> ApiResult<Vec<JobView>> {
    let jobs = suanli_proto::client::all_jobs(&jobs_client(state, p)?, live_only).await?;
    Ok(jobs.iter().rev().map(view).collect())
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = u64, Path)),
    responses((status = 200, body = JobView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<JobView>> {
    let job = jobs_client(&state, &p)?.get_job(v1::GetJobRequest { job_id: id }).await?.into_inner();
    Ok(axum::Json(view(&job)))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = u64, Path)),
    responses((status = 200, body = JobView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn cancel(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<JobView>> {
    let request_id = idempotency_key("cancel-job", p.user, Some(&id.to_string()));
    let job = jobs_client(&state, &p)?.cancel_job(v1::JobRef { request_id, job_id: id }).await?.into_inner();
    Ok(axum::Json(view(&job)))
}

#[derive(Deserialize, IntoParams)]
pub struct StatementQuery {
    /// `YYYY-MM`, UTC.
    pub month: String,
}

#[derive(Serialize, ToSchema)]
pub struct StatementLineView {
    pub lease_id: u64,
    pub charged_minor: i64,
    pub fee_minor: i64,
    pub refunded_minor: i64,
    pub credited_minor: i64,
}

#[derive(Serialize, ToSchema)]
pub struct JobCostView {
    pub job_id: u64,
    pub name: String,
    pub card_seconds: u64,
    pub cost_minor: i64,
}

#[derive(Serialize, ToSchema)]
pub struct StatementView {
    pub month: String,
    pub currency: String,
    pub opening_minor: i64,
    pub deposits_minor: i64,
    /// Researchers: charged for use.
    pub charged_minor: i64,
    pub refunded_minor: i64,
    pub credited_minor: i64,
    /// Suppliers: earned after the platform fee.
    pub earned_minor: i64,
    pub closing_minor: i64,
    pub leases: Vec<StatementLineView>,
    pub jobs: Vec<JobCostView>,
}

#[utoipa::path(get, path = "/api/v1/me/statement", tag = "leases", params(StatementQuery),
    responses((status = 200, body = StatementView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn statement(State(state): State<AppState>, p: Principal, ApiQuery(q): ApiQuery<StatementQuery>) -> ApiResult<axum::Json<StatementView>> {
    if p.kind == UserKind::Operator {
        return Err(ApiError::forbidden("statements belong to researchers and suppliers"));
    }
    let s = state
        .market
        .as_token(&p.broker_token(&state)?)?
        .get_statement(v1::GetStatementRequest { account_id: 0, month: q.month, currency: String::new() })
        .await?
        .into_inner();
    Ok(axum::Json(StatementView {
        month: s.month,
        currency: s.currency,
        opening_minor: s.opening_minor,
        deposits_minor: s.deposits_minor,
        charged_minor: s.charged_minor,
        refunded_minor: s.refunded_minor,
        credited_minor: s.credited_minor,
        earned_minor: s.earned_minor,
        closing_minor: s.closing_minor,
        leases: s
            .leases
            .into_iter()
            .map(|l| StatementLineView {
                lease_id: l.lease_id,
                charged_minor: l.charged_minor,
                fee_minor: l.fee_minor,
                refunded_minor: l.refunded_minor,
                credited_minor: l.credited_minor,
            })
            .collect(),
        jobs: s.jobs.into_iter().map(|j| JobCostView { job_id: j.job_id, name: j.name, card_seconds: j.card_ms / 1000, cost_minor: j.cost_minor }).collect(),
    }))
}
