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
use crate::error::{ApiError, ApiResult, Code};
use crate::model::UserKind;
use crate::state::AppState;
use futures::StreamExt;
use suanli_types::ErrorCode;

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
    /// The job spec, as `suanli-scheduler validate` documents it (name, kind, resources, run, …):
    /// the object, or its text in YAML or JSON.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// Idempotency key: a retry with the same key submits once.
    pub request_id: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = SubmitRequest,
    responses((status = 201, body = JobView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn submit(State(state): State<AppState>, Researcher(p): Researcher, ApiJson(req): ApiJson<SubmitRequest>) -> ApiResult<Response> {
    // A form sends the spec as YAML or JSON text (YAML is a superset of JSON: one parser reads
    // both); scripts send the object itself.
    let spec = match req.spec {
        serde_json::Value::String(text) => {
            serde_yaml::from_str::<serde_json::Value>(&text).map_err(|e| ApiError::field("spec", format!("neither YAML nor JSON: {e}")))?
        }
        other => other,
    };
    let mut spec = spec;
    if !spec.is_object() {
        return Err(ApiError::field("spec", "a job spec object"));
    }
    let datasets = datasets_to_artifacts(&state, &p, &mut spec).await?;
    let request_id = idempotency_key("job", p.user, req.request_id.as_deref());
    let job = jobs_client(&state, &p)?.submit_job(v1::SubmitJobRequest { request_id, spec_json: spec.to_string() }).await?.into_inner();
    super::datasets::record_job_inputs(&state, job.job_id, &datasets).await?;
    Ok((StatusCode::CREATED, axum::Json(view(&job))).into_response())
}

/// Dataset inputs one job may name.
const MAX_DATASET_INPUTS: usize = 8;

/// Inputs that name a dataset version (`{"name": "digits.tar", "dataset": "digits@2"}`) become
/// the version's archive in the artifact store (`{"name", "sha256"}`), as the broker's spec
/// has it. Returns `(input name, dataset, version)` for each, for the lineage of what the job
/// makes.
async fn datasets_to_artifacts(state: &AppState, p: &Principal, spec: &mut serde_json::Value) -> ApiResult<Vec<(String, i64, i64)>> {
    let mut used = Vec::new();
    let Some(inputs) = spec.get_mut("inputs").and_then(|i| i.as_array_mut()) else {
        return Ok(used);
    };
    let named = inputs.iter().filter(|i| i.get("dataset").is_some()).count();
    if named > MAX_DATASET_INPUTS {
        return Err(ApiError::field("inputs", format!("at most {MAX_DATASET_INPUTS} dataset inputs a job (each is archived and stored for it)")));
    }
    for (i, input) in inputs.iter_mut().enumerate() {
        let Some(object) = input.as_object_mut() else { continue };
        let Some(reference) = object.remove("dataset") else { continue };
        let field = format!("inputs[{i}].dataset");
        let reference = reference.as_str().ok_or_else(|| ApiError::field(&field, "NAME, NAME@VERSION or OWNER/NAME@VERSION"))?;
        let reference = crate::datasets::DatasetRef::parse(reference).map_err(|why| ApiError::field(&field, why))?;
        let name = object.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_owned();
        if !name.ends_with(".tar") {
            return Err(ApiError::field(&format!("inputs[{i}].name"), "a dataset arrives as a tar archive: a name ending in .tar"));
        }
        if object.contains_key("sha256") {
            return Err(ApiError::field(&field, "an input is a dataset or an artifact (sha256), not both"));
        }
        let (dataset, version) = super::datasets::resolve(state, p, &reference)
            .await
            .map_err(|e| ApiError { fields: vec![suanli_types::FieldError::new(&field, e.message.clone())], ..e })?;
        let sha256 = super::datasets::stage_for_job(state, p, &dataset, version).await?;
        object.insert("sha256".into(), serde_json::Value::String(sha256));
        used.push((name, dataset.id(), version));
    }
    Ok(used)
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
    Ok(axum::Json(job_of(&state, &p, id).await?))
}

pub async fn job_of(state: &AppState, p: &Principal, id: u64) -> ApiResult<JobView> {
    Ok(view(&jobs_client(state, p)?.get_job(v1::GetJobRequest { job_id: id }).await?.into_inner()))
}

#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs", params(("id" = u64, Path)),
    responses((status = 200, body = JobView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn cancel(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<JobView>> {
    let request_id = idempotency_key("cancel-job", p.user, Some(&id.to_string()));
    let job = jobs_client(&state, &p)?.cancel_job(v1::JobRef { request_id, job_id: id }).await?.into_inner();
    Ok(axum::Json(view(&job)))
}

/// An output the job left, streamed from the artifact store: `x-suanli-sha256` names its hash
/// (check it; the portal also does, and cuts a wrong one short). The broker signs the owner a
/// read-only capability for the job's outputs for each download; nobody else gets one.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/outputs/{name}", tag = "jobs", params(("id" = u64, Path), ("name" = String, Path)),
    responses((status = 200, description = "the output's bytes", content_type = "application/octet-stream"), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn output(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, name)): ApiPath<(u64, String)>) -> ApiResult<Response> {
    output_of(&state, &p, id, &name).await
}

/// Job `id`'s output `name`, whole in memory when it is at most `limit` bytes (a metrics
/// file); `None` when the job left no such output.
pub async fn small_output(state: &AppState, p: &Principal, id: u64, name: &str, limit: u64) -> ApiResult<Option<Vec<u8>>> {
    let grant = jobs_client(state, p)?.grant_job_outputs(v1::GetJobRequest { job_id: id }).await?.into_inner();
    let Some(sha) = grant.outputs.get(name) else { return Ok(None) };
    let store = state.artifacts.as_ref().ok_or_else(|| ApiError::new(Code::Broker(ErrorCode::Unavailable), "this portal reaches no artifact store"))?;
    let digest: suanli_artifacts::Digest = sha.parse().map_err(|_| ApiError::internal(format!("job {id}'s output {name:?} has no valid hash")))?;
    let client = store.client(&grant.capability).map_err(ApiError::internal)?;
    let unavailable = |e: suanli_artifacts::ClientError| ApiError::new(Code::Broker(ErrorCode::Unavailable), format!("the artifact store: {e}"));
    let (length, chunks) = client.download_stream(digest).await.map_err(unavailable)?;
    let mut chunks = Box::pin(chunks);
    if length.is_some_and(|n| n > limit) {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        bytes.extend_from_slice(&chunk.map_err(unavailable)?);
        if bytes.len() as u64 > limit {
            return Ok(None);
        }
    }
    Ok(Some(bytes))
}

/// Streams job `id`'s output `name` to its owner `p` (the model registry's downloads too).
pub async fn output_of(state: &AppState, p: &Principal, id: u64, name: &str) -> ApiResult<Response> {
    let name = name.to_owned();
    let grant = jobs_client(state, p)?.grant_job_outputs(v1::GetJobRequest { job_id: id }).await?.into_inner();
    let sha = grant.outputs.get(&name).ok_or_else(|| ApiError::not_found(format!("job {id} left no output {name:?}")))?;
    let store = state.artifacts.as_ref().ok_or_else(|| ApiError::new(Code::Broker(ErrorCode::Unavailable), "this portal reaches no artifact store"))?;
    let digest: suanli_artifacts::Digest = sha.parse().map_err(|_| ApiError::internal(format!("job {id}'s output {name:?} has no valid hash")))?;
    let client = store.client(&grant.capability).map_err(ApiError::internal)?;
    let (length, bytes) = client.download_stream(digest).await.map_err(|e| {
        tracing::warn!(job = id, output = %name, error = %e, "artifact store refused an output");
        ApiError::new(Code::Broker(ErrorCode::Unavailable), format!("the artifact store: {e}"))
    })?;
    let body = axum::body::Body::from_stream(bytes.map(|chunk| chunk.map_err(std::io::Error::other)));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/octet-stream"));
    if let Some(length) = length {
        headers.insert(axum::http::header::CONTENT_LENGTH, length.into());
    }
    if let Ok(v) = axum::http::HeaderValue::from_str(sha) {
        headers.insert("x-suanli-sha256", v);
    }
    // The name is the job's own: only ASCII letters, digits and `._-` go into the header.
    let file: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')).collect();
    if let Ok(v) = axum::http::HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        headers.insert(axum::http::header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[derive(Deserialize, IntoParams)]
pub struct LogQuery {
    /// The attempt (1, 2, …); absent: the latest.
    pub attempt: Option<u32>,
    /// The byte offset to read from (a previous answer's `next`); absent: 0.
    pub from: Option<u64>,
    /// How long to wait for output past `from` while the attempt runs, at most 30000 ms;
    /// absent: answer at once.
    pub wait_ms: Option<u32>,
}

/// A piece of an attempt's output (stdout and stderr together, as the job wrote them).
#[derive(Serialize, ToSchema)]
pub struct LogView {
    pub attempt: u32,
    /// Where `text` begins: `from`, or later when the bytes there are no longer held.
    pub from: u64,
    /// The offset to ask for next.
    pub next: u64,
    /// The first byte the platform still holds (the most recent 4 MiB of an attempt; the
    /// whole output stays in the lease's `job.log`).
    pub retained_from: u64,
    /// The attempt has ended and `text` reaches the end of what it wrote.
    pub ended: bool,
    pub text: String,
}

/// A job's output is watched by polling with `from` = the previous `next`; a character cut
/// by a read's end is left to the next read.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/log", tag = "jobs", params(("id" = u64, Path), LogQuery),
    responses((status = 200, body = LogView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn log(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> ApiResult<axum::Json<LogView>> {
    let read = v1::ReadJobLogRequest {
        job_id: id,
        attempt: q.attempt.unwrap_or(0),
        from_offset: q.from.unwrap_or(0),
        max_bytes: 0,
        wait_ms: q.wait_ms.unwrap_or(0).min(MAX_LOG_WAIT_MS),
    };
    let chunk = jobs_client(&state, &p)?.read_job_log(read).await?.into_inner();
    let (text, used) = whole_characters(&chunk.data, chunk.ended);
    Ok(axum::Json(LogView {
        attempt: chunk.attempt,
        from: chunk.from_offset,
        next: chunk.from_offset + used as u64,
        retained_from: chunk.retained_from,
        ended: chunk.ended && used == chunk.data.len(),
        text,
    }))
}

/// The longest a log request waits for output (the broker's bound too).
const MAX_LOG_WAIT_MS: u32 = 30_000;

/// `data` as text, and how many of its bytes that is: a UTF-8 sequence cut off at the end is
/// left for the next read (unless nothing else is there, or no more will come); bytes that
/// are not UTF-8 become U+FFFD.
fn whole_characters(data: &[u8], last: bool) -> (String, usize) {
    let used = match std::str::from_utf8(data) {
        Err(e) if e.error_len().is_none() && !last && e.valid_up_to() > 0 => e.valid_up_to(),
        _ => data.len(),
    };
    (String::from_utf8_lossy(&data[..used]).into_owned(), used)
}

#[derive(Deserialize, IntoParams)]
pub struct CurvesQuery {
    /// The attempt (1, 2, …); absent: the latest.
    pub attempt: Option<u32>,
}

/// The numbers a job printed in its JSON-lines progress, as series over its steps.
#[derive(Serialize, ToSchema, Default, Debug, PartialEq)]
pub struct CurvesView {
    pub attempt: u32,
    /// Each numeric field of the progress objects (`loss`, `val_accuracy`, `lr`, …) as
    /// `[step, value]` points, in the order printed. The step is the object's `step`, else the
    /// last step printed before it (0 before any).
    pub series: BTreeMap<String, Vec<[f64; 2]>>,
    /// The first byte of output they were read from (earlier output is no longer held).
    pub retained_from: u64,
}

/// Fields that count or time the run rather than measure the model.
const NOT_CURVES: &[&str] = &["step", "epoch", "total_steps", "of", "total", "done", "eta_s", "seconds", "trial", "images", "count"];

/// The most of an attempt's output read for its curves (what the broker holds of it).
const CURVE_SOURCE_BYTES: u64 = 4 << 20;

#[utoipa::path(get, path = "/api/v1/jobs/{id}/curves", tag = "jobs", params(("id" = u64, Path), CurvesQuery),
    responses((status = 200, body = CurvesView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn curves(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<CurvesQuery>,
) -> ApiResult<axum::Json<CurvesView>> {
    Ok(axum::Json(curves_for(&state, &p, id, q.attempt).await?))
}

pub async fn curves_for(state: &AppState, p: &Principal, id: u64, attempt: Option<u32>) -> ApiResult<CurvesView> {
    let mut client = jobs_client(state, p)?;
    let mut output = Vec::new();
    let (mut attempt, mut from, mut retained_from) = (attempt.unwrap_or(0), 0, None);
    loop {
        let read = v1::ReadJobLogRequest { job_id: id, attempt, from_offset: from, max_bytes: 0, wait_ms: 0 };
        let chunk = client.read_job_log(read).await?.into_inner();
        attempt = chunk.attempt;
        retained_from.get_or_insert(chunk.from_offset);
        output.extend_from_slice(&chunk.data);
        if chunk.data.is_empty() || output.len() as u64 >= CURVE_SOURCE_BYTES {
            break;
        }
        from = chunk.next_offset;
    }
    let mut view = curves_of(&String::from_utf8_lossy(&output));
    view.attempt = attempt;
    view.retained_from = retained_from.unwrap_or(0);
    Ok(view)
}

/// The curves in a job's output: every line that is a JSON object is a progress report.
pub fn curves_of(output: &str) -> CurvesView {
    let mut view = CurvesView::default();
    let mut step = 0.0;
    for line in output.lines() {
        let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(line.trim()) else { continue };
        if let Some(s) = fields.get("step").and_then(serde_json::Value::as_f64) {
            step = s;
        }
        for (name, value) in &fields {
            let Some(v) = value.as_f64().filter(|v| v.is_finite()) else { continue };
            if NOT_CURVES.contains(&name.as_str()) || name.len() > 64 || view.series.len() >= 32 && !view.series.contains_key(name) {
                continue;
            }
            view.series.entry(name.clone()).or_default().push([step, v]);
        }
    }
    view
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_follow_the_steps_and_skip_what_is_not_a_measure() {
        let output = "starting\n{\"event\":\"step\",\"step\":10,\"loss\":2.5,\"eta_s\":30}\nnot json {\n{\"step\":20,\"loss\":1.5}\n{\"event\":\"epoch\",\"epoch\":1,\"val_accuracy\":0.75,\"seconds\":3}\n[1,2]\n";
        let view = curves_of(output);
        assert_eq!(view.series.keys().collect::<Vec<_>>(), ["loss", "val_accuracy"]);
        assert_eq!(view.series["loss"], vec![[10.0, 2.5], [20.0, 1.5]]);
        assert_eq!(view.series["val_accuracy"], vec![[20.0, 0.75]], "an epoch's numbers sit at the last step printed");
    }

    #[test]
    fn a_character_cut_by_the_read_is_left_for_the_next() {
        let text = "步".as_bytes(); // three bytes
        let cut = [b"ok ".as_slice(), &text[..2]].concat();
        assert_eq!(whole_characters(&cut, false), ("ok ".to_owned(), 3));
        assert_eq!(whole_characters(&cut, true).1, 5, "nothing more will come: shown as it is");
        assert_eq!(whole_characters(&text[..2], false).1, 2, "a read of nothing but the cut piece still moves on");
        assert_eq!(whole_characters(b"a\xffb", false), ("a\u{fffd}b".to_owned(), 3));
    }
}
