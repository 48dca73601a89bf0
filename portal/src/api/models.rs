//! The model registry: versions of a researcher's models, each one a succeeded job's output
//! with its lineage (the dataset versions the job was given, the job, what it ran and with
//! which parameters, the metrics it reported), a model card, and which version serves.
//!
//! The bytes stay where the job left them (the artifact store, kept for as long as the job's
//! record refers to them); a download goes through the job's outputs, with the broker's
//! read-only capability for its owner. A model is its owner's alone.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::{ApiJson, ApiPath, ApiQuery};
use crate::auth::{Principal, Researcher};
use crate::db::{new_public_id, now_ms, opt_i64, opt_str};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct ModelVersionView {
    pub model: String,
    pub version: u32,
    pub job_id: u64,
    pub job_name: String,
    /// The job's output that is the model.
    pub output: String,
    pub sha256: String,
    /// `owner/name@version` of the dataset the job trained on, when it was given one.
    pub dataset: Option<String>,
    /// What trained it: the job's kind, task or program, parameters, and every dataset input.
    #[schema(value_type = Object)]
    pub lineage: serde_json::Value,
    /// Numbers the job reported when it finished (accuracy, macro_f1, …).
    pub metrics: BTreeMap<String, f64>,
    pub created_ms: i64,
    /// The model card (Markdown).
    pub card: String,
}

#[derive(Serialize, ToSchema)]
pub struct ModelSummary {
    pub model_id: u64,
    pub name: String,
    pub versions: u32,
    /// The version that serves (`promote`), if one was chosen.
    pub serving: Option<u32>,
    pub created_ms: i64,
}

#[derive(Serialize, ToSchema)]
pub struct ModelView {
    pub name: String,
    pub serving: Option<u32>,
    pub versions: Vec<ModelVersionView>,
}

#[derive(Deserialize, ToSchema)]
pub struct RegisterModel {
    pub name: String,
    pub job_id: u64,
    /// The output that is the model; may be left out when the job left exactly one.
    pub output: Option<String>,
    #[serde(default)]
    pub card: String,
}

/// The output a job's metrics are read from, when it left one.
const METRICS_OUTPUT: &str = "metrics.json";

fn check_model_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) || name.starts_with('.') {
        return Err("1 to 64 letters, digits, '.', '_' or '-', not starting with '.'".into());
    }
    Ok(())
}

/// The numbers of a finished job's last progress line (`{"event":"done","summary":{…}}`):
/// every numeric field of its summary, or of the line itself when it has none.
pub fn metrics_of(progress: Option<&serde_json::Value>) -> BTreeMap<String, f64> {
    let Some(progress) = progress else { return BTreeMap::new() };
    let source = progress.get("summary").filter(|s| s.is_object()).unwrap_or(progress);
    source.as_object().into_iter().flatten().filter_map(|(k, v)| v.as_f64().map(|n| (k.clone(), n))).collect()
}

async fn model_id(state: &AppState, p: &Principal, name: &str) -> ApiResult<(i64, Option<i64>)> {
    let row = sqlx::query("SELECT id, serving FROM models WHERE owner = $1 AND name = $2")
        .bind(p.user.0)
        .bind(name)
        .fetch_optional(&state.db.pool)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("model {name}")))?;
    Ok((row.try_get("id")?, opt_i64(&row, "serving")?))
}

async fn versions_of(state: &AppState, model: i64, name: &str) -> ApiResult<Vec<ModelVersionView>> {
    let rows = sqlx::query("SELECT version, job_id, job_name, output, sha256, dataset, lineage, metrics, card, created_ms FROM model_versions WHERE model_id = $1 ORDER BY version")
        .bind(model)
        .fetch_all(&state.db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(ModelVersionView {
                model: name.to_owned(),
                version: r.try_get::<i64, _>("version")? as u32,
                job_id: r.try_get::<i64, _>("job_id")? as u64,
                job_name: r.try_get("job_name")?,
                output: r.try_get("output")?,
                sha256: r.try_get("sha256")?,
                dataset: opt_str(r, "dataset")?,
                lineage: serde_json::from_str(&r.try_get::<String, _>("lineage")?).unwrap_or_default(),
                metrics: serde_json::from_str(&r.try_get::<String, _>("metrics")?).unwrap_or_default(),
                card: r.try_get("card")?,
                created_ms: r.try_get("created_ms")?,
            })
        })
        .collect()
}

/// One of `p`'s models with every version (`GET /models/{name}`; its page reads it too).
pub async fn model_view(state: &AppState, p: &Principal, name: &str) -> ApiResult<ModelView> {
    let (id, serving) = model_id(state, p, name).await?;
    Ok(ModelView { name: name.to_owned(), serving: serving.map(|v| v as u32), versions: versions_of(state, id, name).await? })
}

/// Registers a succeeded job's output as the next version of the model `name` (made on first
/// use).
#[utoipa::path(post, path = "/api/v1/models", tag = "models", request_body = RegisterModel,
    responses((status = 201, body = ModelVersionView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn register(State(state): State<AppState>, Researcher(p): Researcher, ApiJson(req): ApiJson<RegisterModel>) -> ApiResult<Response> {
    let mut problems = Vec::new();
    if let Err(why) = check_model_name(&req.name) {
        problems.push(suanli_types::FieldError::new("name", why));
    }
    if req.card.chars().count() > 100_000 {
        problems.push(suanli_types::FieldError::new("card", "at most 100000 characters"));
    }
    if !problems.is_empty() {
        return Err(ApiError::invalid(problems));
    }
    // The broker answers for the caller only: someone else's job is NOT_FOUND.
    let job = super::jobs::job_of(&state, &p, req.job_id).await?;
    if job.state != "succeeded" {
        return Err(ApiError::broker(
            suanli_types::ErrorCode::JobTransition,
            format!("job {} is {}: only a succeeded job's output is a model", job.job_id, job.state),
        ));
    }
    let output = match (&req.output, job.outputs.len()) {
        (Some(o), _) => o.clone(),
        (None, 1) => job.outputs.keys().next().cloned().unwrap_or_default(),
        (None, n) => return Err(ApiError::field("output", format!("job {} left {n} outputs: name the one that is the model", job.job_id))),
    };
    let sha256 = job.outputs.get(&output).cloned().ok_or_else(|| ApiError::field("output", format!("job {} left no output {output:?}", job.job_id)))?;
    let inputs = super::datasets::job_inputs(&state, job.job_id).await?;
    let dataset = inputs.values().next().cloned();
    let lineage = serde_json::json!({
        "job": {"id": job.job_id, "name": job.name, "kind": job.kind, "submitted_ms": job.submitted_ms, "ended_ms": job.ended_ms},
        "run": job.spec.get("run"),
        "datasets": inputs,
        "inputs": job.spec.get("inputs"),
        "platform": env!("CARGO_PKG_VERSION"),
    });
    // A `metrics.json` the job left (what `train_classifier` writes) says it best; otherwise
    // the last progress line that reached the broker.
    let metrics = match super::jobs::small_output(&state, &p, job.job_id, METRICS_OUTPUT, 1 << 20).await? {
        Some(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes).map(|v| metrics_of(Some(&v))).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let metrics = if metrics.is_empty() { metrics_of(job.progress.as_ref()) } else { metrics };

    let mut tx = state.db.pool.begin().await?;
    let existing = sqlx::query("SELECT id FROM models WHERE owner = $1 AND name = $2").bind(p.user.0).bind(&req.name).fetch_optional(&mut *tx).await?;
    let model = match existing {
        Some(row) => row.try_get::<i64, _>("id")?,
        None => {
            let id = new_public_id();
            let made = sqlx::query("INSERT INTO models (id, owner, name, created_ms) VALUES ($1, $2, $3, $4)")
                .bind(id)
                .bind(p.user.0)
                .bind(&req.name)
                .bind(now_ms())
                .execute(&mut *tx)
                .await;
            match made {
                Err(e) if crate::db::Db::is_unique_violation(&e) => {
                    return Err(ApiError::broker(
                        suanli_types::ErrorCode::AlreadyExists,
                        format!("{} was registered by another request meanwhile: try again", req.name),
                    ))
                }
                other => other?,
            };
            id
        }
    };
    let next: i64 =
        sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM model_versions WHERE model_id = $1").bind(model).fetch_one(&mut *tx).await?.try_get("v")?;
    let inserted = sqlx::query(
        "INSERT INTO model_versions (model_id, version, job_id, job_name, output, sha256, dataset, lineage, metrics, card, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(model)
    .bind(next)
    .bind(job.job_id as i64)
    .bind(&job.name)
    .bind(&output)
    .bind(&sha256)
    .bind(dataset)
    .bind(lineage.to_string())
    .bind(serde_json::to_string(&metrics).map_err(ApiError::internal)?)
    .bind(&req.card)
    .bind(now_ms())
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(e) if crate::db::Db::is_unique_violation(&e) => {
            return Err(ApiError::broker(
                suanli_types::ErrorCode::AlreadyExists,
                format!("another version of {} was registered meanwhile: try again", req.name),
            ))
        }
        other => other?,
    };
    tx.commit().await?;
    let versions = versions_of(&state, model, &req.name).await?;
    let made = versions.into_iter().find(|v| i64::from(v.version) == next).ok_or_else(|| ApiError::internal("a registered version went missing"))?;
    Ok((StatusCode::CREATED, axum::Json(made)).into_response())
}

#[utoipa::path(get, path = "/api/v1/models", tag = "models",
    responses((status = 200, body = [ModelSummary]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, Researcher(p): Researcher) -> ApiResult<axum::Json<Vec<ModelSummary>>> {
    Ok(axum::Json(models_of(&state, &p).await?))
}

/// `p`'s models by name (`GET /models`; the models page reads it too).
pub async fn models_of(state: &AppState, p: &Principal) -> ApiResult<Vec<ModelSummary>> {
    let rows = sqlx::query(
        "SELECT m.id, m.name, m.serving, m.created_ms, (SELECT COUNT(*) FROM model_versions v WHERE v.model_id = m.id) AS versions FROM models m WHERE m.owner = $1 ORDER BY m.name",
    )
    .bind(p.user.0)
    .fetch_all(&state.db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(ModelSummary {
                model_id: r.try_get::<i64, _>("id")? as u64,
                name: r.try_get("name")?,
                versions: r.try_get::<i64, _>("versions")? as u32,
                serving: opt_i64(r, "serving")?.map(|v| v as u32),
                created_ms: r.try_get("created_ms")?,
            })
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v1/models/{name}", tag = "models", params(("name" = String, Path)),
    responses((status = 200, body = ModelView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(name): ApiPath<String>) -> ApiResult<axum::Json<ModelView>> {
    Ok(axum::Json(model_view(&state, &p, &name).await?))
}

#[derive(Deserialize, ToSchema)]
pub struct Promote {
    pub version: u32,
}

/// Makes `version` the one that serves; promoting an older one is a rollback.
#[utoipa::path(post, path = "/api/v1/models/{name}/promote", tag = "models", params(("name" = String, Path)), request_body = Promote,
    responses((status = 200, body = ModelView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn promote(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<Promote>,
) -> ApiResult<axum::Json<ModelView>> {
    let (id, _) = model_id(&state, &p, &name).await?;
    let exists = sqlx::query("SELECT 1 AS one FROM model_versions WHERE model_id = $1 AND version = $2")
        .bind(id)
        .bind(i64::from(req.version))
        .fetch_optional(&state.db.pool)
        .await?;
    if exists.is_none() {
        return Err(ApiError::field("version", format!("{name} has no version {}", req.version)));
    }
    sqlx::query("UPDATE models SET serving = $1 WHERE id = $2").bind(i64::from(req.version)).bind(id).execute(&state.db.pool).await?;
    Ok(axum::Json(model_view(&state, &p, &name).await?))
}

pub(crate) async fn version_of(state: &AppState, p: &Principal, name: &str, version: u32) -> ApiResult<ModelVersionView> {
    let (id, serving) = model_id(state, p, name).await?;
    let versions = versions_of(state, id, name).await?;
    let wanted = match version {
        0 => serving.map(|v| v as u32).or(versions.last().map(|v| v.version)).unwrap_or(0),
        v => v,
    };
    versions.into_iter().find(|v| v.version == wanted).ok_or_else(|| ApiError::not_found(format!("version {version} of model {name}")))
}

/// The model's bytes (the job's output), `x-suanli-sha256` naming their hash. Version 0: the
/// serving one, or the latest.
#[utoipa::path(get, path = "/api/v1/models/{name}/versions/{version}/download", tag = "models", params(("name" = String, Path), ("version" = u32, Path)),
    responses((status = 200, description = "the model's bytes", content_type = "application/octet-stream"), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 503, body = crate::error::ErrorBody)))]
pub async fn download(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((name, version)): ApiPath<(String, u32)>) -> ApiResult<Response> {
    let v = version_of(&state, &p, &name, version).await?;
    super::jobs::output_of(&state, &p, v.job_id, &v.output).await
}

#[derive(Deserialize, IntoParams)]
pub struct CompareQuery {
    pub a: u32,
    pub b: u32,
}

#[derive(Serialize, ToSchema)]
pub struct MetricRow {
    pub metric: String,
    pub a: Option<f64>,
    pub b: Option<f64>,
    /// b − a, where both have it.
    pub delta: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct Comparison {
    pub a: ModelVersionView,
    pub b: ModelVersionView,
    pub metrics: Vec<MetricRow>,
}

/// Two versions side by side: every metric either reported, and the difference.
#[utoipa::path(get, path = "/api/v1/models/{name}/compare", tag = "models", params(("name" = String, Path), CompareQuery),
    responses((status = 200, body = Comparison), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn compare(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<CompareQuery>,
) -> ApiResult<axum::Json<Comparison>> {
    if q.a == 0 || q.b == 0 {
        return Err(ApiError::field("query", "a and b are version numbers (1, 2, …)"));
    }
    let (a, b) = (version_of(&state, &p, &name, q.a).await?, version_of(&state, &p, &name, q.b).await?);
    Ok(axum::Json(Comparison { metrics: metric_rows(&a.metrics, &b.metrics), a, b }))
}

pub fn metric_rows(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> Vec<MetricRow> {
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    names
        .into_iter()
        .map(|m| {
            let (x, y) = (a.get(m).copied(), b.get(m).copied());
            MetricRow { metric: m.clone(), a: x, b: y, delta: x.zip(y).map(|(x, y)| y - x) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_come_from_the_summary_of_the_last_line() {
        let done = serde_json::json!({"event": "done", "summary": {"accuracy": 0.75, "macro_f1": 0.5, "output": "/x", "steps": 40}});
        let m = metrics_of(Some(&done));
        assert_eq!(m.get("accuracy"), Some(&0.75));
        assert_eq!(m.get("steps"), Some(&40.0));
        assert!(!m.contains_key("output"));
        assert!(metrics_of(None).is_empty());
    }

    #[test]
    fn a_comparison_lists_every_metric_once_with_its_change() {
        let a = BTreeMap::from([("accuracy".to_owned(), 0.5), ("loss".to_owned(), 1.0)]);
        let b = BTreeMap::from([("accuracy".to_owned(), 0.75), ("f1".to_owned(), 0.5)]);
        let rows = metric_rows(&a, &b);
        let names: Vec<&str> = rows.iter().map(|r| r.metric.as_str()).collect();
        assert_eq!(names, ["accuracy", "f1", "loss"]);
        assert_eq!(rows[0].delta, Some(0.25));
        assert_eq!(rows[1].delta, None);
    }
}
