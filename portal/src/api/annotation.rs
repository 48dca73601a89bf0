//! Crowdsourced annotation (seed 001) over HTTP: projects, members, pulling and saving tasks,
//! review, the dashboard and exports. The rules are in `crate::annotation` (SQL) and
//! `suanli_annotation` (shapes, agreement).
//!
//! Who sees what: a project is visible to its owner, its members, and — while it has an open
//! call — any researcher (who may then join as an annotator); to anyone else it does not exist
//! (`NOT_FOUND`). Annotators see their own work only, and only the images of tasks they hold or
//! held; reviewers and the owner see everyone's work on complete images, decide conflicts and
//! export them; nobody but the owner changes membership, pushes tasks or makes dataset versions.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use suanli_annotation::agreement::{self, Decision};
use suanli_annotation::plan::{plan_tasks, PlanRequest};
use suanli_annotation::{compare_image, Annotation, LabelSchema, Work};
use suanli_cv::annotation::{AnnotatedImage, AnnotationSet, Format};
use utoipa::{IntoParams, ToSchema};

use super::datasets::files_of;
use super::{ApiJson, ApiPath, ApiQuery};
use crate::annotation::{self as ann, Project, Role, Slot, SlotState};
use crate::auth::{Principal, Researcher};
use crate::db::{new_public_id, now_ms, opt_i64};
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

/// The most images one project takes.
pub const MAX_PROJECT_IMAGES: usize = 1_000_000;

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProject {
    pub name: String,
    pub dataset: u64,
    /// 0 (or absent): the latest version.
    #[serde(default)]
    pub version: u32,
    /// `{"classes": [{"name", "colour": "#rrggbb", "attributes": [{"name", "kind": "select"|"checkbox"|"text"|"number", …}]}], "kinds": ["box", "polygon", "polyline", "points", "mask"]}`
    #[schema(value_type = Object)]
    pub schema: LabelSchema,
    /// Images per task.
    pub task_size: u32,
    /// Annotators per image (1: no overlap).
    pub overlap: u32,
    /// Images (by name) whose labels in the dataset version are known to be right: mixed into
    /// tasks to score annotators, never given out as ordinary work.
    #[serde(default)]
    pub honeypots: Vec<String>,
    #[serde(default)]
    pub honeypots_per_task: u32,
    /// How long a pulled task stays the annotator's without a save (5 s to a day; default
    /// 30 minutes). Every save renews it.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u32,
    /// Whether any researcher may join as an annotator.
    #[serde(default)]
    pub open_call: bool,
    /// Start from the version's own objects (a `pre_annotate` job's output imported as the
    /// version): shown to annotators to accept or fix. Objects of classes or kinds the schema
    /// does not have are left out.
    #[serde(default)]
    pub pre_annotations: bool,
}

fn default_lease_seconds() -> u32 {
    30 * 60
}

#[derive(Serialize, ToSchema)]
pub struct ProjectView {
    pub id: u64,
    pub name: String,
    pub owner: String,
    pub dataset: u64,
    pub version: u32,
    #[schema(value_type = Object)]
    pub schema: LabelSchema,
    pub images: u64,
    pub tasks: u64,
    pub task_size: u32,
    pub overlap: u32,
    pub lease_seconds: u32,
    pub open_call: bool,
    /// The caller's role (`null`: not a member of a project with an open call).
    pub role: Option<Role>,
    pub slots_submitted: u64,
    pub slots_total: u64,
}

async fn project_view(state: &AppState, project: &Project, role: Option<Role>) -> ApiResult<ProjectView> {
    let row = sqlx::query(
        "SELECT (SELECT username FROM users WHERE id = $2) AS owner,
                (SELECT COUNT(*) FROM annotation_tasks WHERE project_id = $1) AS tasks,
                (SELECT COUNT(*) FROM annotation_slots WHERE project_id = $1) AS slots,
                (SELECT COUNT(*) FROM annotation_slots WHERE project_id = $1 AND state = 'submitted') AS submitted",
    )
    .bind(project.id)
    .bind(project.owner)
    .fetch_one(&state.db.pool)
    .await?;
    Ok(ProjectView {
        id: project.id as u64,
        name: project.name.clone(),
        owner: row.try_get::<Option<String>, _>("owner")?.unwrap_or_default(),
        dataset: project.dataset_id as u64,
        version: project.version as u32,
        schema: project.schema.clone(),
        images: project.images as u64,
        tasks: row.try_get::<i64, _>("tasks")? as u64,
        task_size: project.task_size as u32,
        overlap: project.overlap as u32,
        lease_seconds: (project.lease_ms / 1000) as u32,
        open_call: project.open_call,
        role,
        slots_submitted: row.try_get::<i64, _>("submitted")? as u64,
        slots_total: row.try_get::<i64, _>("slots")? as u64,
    })
}

fn check_create(req: &CreateProject) -> ApiResult<()> {
    let mut problems = Vec::new();
    if req.name.trim().is_empty() || req.name.chars().count() > 100 || req.name.chars().any(char::is_control) {
        problems.push(suanli_types::FieldError::new("name", "1 to 100 printable characters"));
    }
    if let Err(e) = req.schema.check() {
        problems.push(suanli_types::FieldError::new("schema", e.to_string()));
    }
    if req.pre_annotations && !req.honeypots.is_empty() {
        // Honeypots would be the images without a model's shapes: easy to spot.
        problems.push(suanli_types::FieldError::new("pre_annotations", "not with honeypots: the images without pre-annotations would give them away"));
    }
    if !(5..=24 * 3600).contains(&req.lease_seconds) {
        problems.push(suanli_types::FieldError::new("lease_seconds", "5 to 86400"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(problems))
    }
}

/// The shapes of a file's objects the schema can hold (pre-annotations and known labels).
fn shapes_for(schema: &LabelSchema, objects: &[suanli_cv::annotation::Object], width: u32, height: u32) -> Vec<Annotation> {
    objects.iter().enumerate().map(|(i, o)| ann::from_object(i, o)).filter(|a| schema.check_shapes(std::slice::from_ref(a), width, height).is_ok()).collect()
}

#[utoipa::path(post, path = "/api/v1/annotation-projects", tag = "annotation", request_body = CreateProject,
    responses((status = 201, body = ProjectView), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn create(State(state): State<AppState>, Researcher(p): Researcher, ApiJson(req): ApiJson<CreateProject>) -> ApiResult<Response> {
    check_create(&req)?;
    // The owner's own dataset only: a project shows its pictures to annotators (and, with an open
    // call, to anyone), which a read-only share does not allow.
    let d = super::datasets::owned(&state, &p, req.dataset).await?;
    let version = super::datasets::pick_version(&d, req.version)?;
    let files = files_of(&state, d.id(), version).await?;
    if files.len() > MAX_PROJECT_IMAGES {
        return Err(ApiError::field("dataset", format!("a project takes at most {MAX_PROJECT_IMAGES} images")));
    }
    let index: HashMap<&str, usize> = files.iter().enumerate().map(|(i, f)| (f.name.as_str(), i)).collect();
    let mut honeypots = Vec::new();
    for name in &req.honeypots {
        let i = *index.get(name.as_str()).ok_or_else(|| ApiError::field("honeypots", format!("{name:?} is not an image of the version")))?;
        let f = &files[i];
        if shapes_for(&req.schema, &f.objects, f.width, f.height).len() != f.objects.len() {
            return Err(ApiError::field(
                "honeypots",
                format!("{name:?} has labels the schema cannot hold: a honeypot's known labels must use its classes and kinds"),
            ));
        }
        honeypots.push(i);
    }
    let plan = plan_tasks(&PlanRequest {
        images: files.len(),
        task_size: req.task_size as usize,
        overlap: req.overlap as usize,
        honeypots: honeypots.clone(),
        honeypots_per_task: req.honeypots_per_task as usize,
    })
    .map_err(|e| {
        use suanli_annotation::PlanError as E;
        let field = match e {
            E::TaskSize => "task_size",
            E::Overlap => "overlap",
            E::NoImages | E::UnknownHoneypot(_) => "honeypots",
            E::TooFewHoneypots { .. } | E::TooManyHoneypots => "honeypots_per_task",
        };
        ApiError::field(field, e.to_string())
    })?;
    let honeypot_set: HashSet<usize> = honeypots.into_iter().collect();

    let id = new_public_id();
    let now = now_ms();
    let mut tx = state.db.pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO annotation_projects (id, owner, name, dataset_id, version, label_schema, task_size, overlap, lease_ms, open_call, images, created_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(id)
    .bind(p.user.0)
    .bind(&req.name)
    .bind(d.id())
    .bind(version)
    .bind(serde_json::to_string(&req.schema).map_err(ApiError::internal)?)
    .bind(i64::from(req.task_size))
    .bind(i64::from(req.overlap))
    .bind(i64::from(req.lease_seconds) * 1000)
    .bind(i64::from(req.open_call))
    .bind(files.len() as i64)
    .bind(now)
    .execute(&mut *tx)
    .await;
    match inserted {
        Err(e) if crate::db::Db::is_unique_violation(&e) => {
            return Err(ApiError::conflict_field("name", format!("you already have a project named {}", req.name)))
        }
        other => other?,
    };
    let numbered: Vec<(usize, &crate::datasets::FileEntry)> = files.iter().enumerate().collect();
    for chunk in numbered.chunks(400) {
        let mut sql = String::from("INSERT INTO annotation_images (project_id, image_no, name, sha256, size, width, height, honeypot, gold, pre) VALUES ");
        for i in 0..chunk.len() {
            let b = i * 10;
            sql.push_str(if i > 0 { ", (" } else { "(" });
            sql.push_str(&(1..=10).map(|k| format!("${}", b + k)).collect::<Vec<_>>().join(", "));
            sql.push(')');
        }
        let mut query = sqlx::query(&sql);
        for (i, f) in chunk {
            let honeypot = honeypot_set.contains(i);
            let shapes = shapes_for(&req.schema, &f.objects, f.width, f.height);
            let json = |s: &[Annotation]| serde_json::to_string(s).map_err(ApiError::internal);
            let gold = if honeypot { Some(json(&shapes)?) } else { None };
            let pre = if req.pre_annotations && !honeypot && !shapes.is_empty() { Some(json(&shapes)?) } else { None };
            query = query
                .bind(id)
                .bind(*i as i64)
                .bind(f.name.clone())
                .bind(f.sha256.clone())
                .bind(f.size as i64)
                .bind(i64::from(f.width))
                .bind(i64::from(f.height))
                .bind(i64::from(honeypot))
                .bind(gold)
                .bind(pre);
        }
        query.execute(&mut *tx).await?;
    }
    for (chunk_no, chunk) in plan.chunks(400).enumerate() {
        let first = chunk_no * 400;
        let mut sql = String::from("INSERT INTO annotation_tasks (project_id, task_no, images, image_count) VALUES ");
        sql.push_str(&(0..chunk.len()).map(|i| format!("(${}, ${}, ${}, ${})", 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4)).collect::<Vec<_>>().join(", "));
        let mut query = sqlx::query(&sql);
        for (i, images) in chunk.iter().enumerate() {
            query = query.bind(id).bind((first + i) as i64).bind(serde_json::to_string(images).map_err(ApiError::internal)?).bind(images.len() as i64);
        }
        query.execute(&mut *tx).await?;
        let slots: Vec<(i64, i64, i64)> = chunk
            .iter()
            .enumerate()
            .flat_map(|(i, images)| (0..i64::from(req.overlap)).map(move |slot| ((first + i) as i64, slot, images.len() as i64)))
            .collect();
        for part in slots.chunks(400) {
            let mut sql = String::from("INSERT INTO annotation_slots (project_id, task_no, slot, state, generation, images) VALUES ");
            sql.push_str(
                &(0..part.len()).map(|i| format!("(${}, ${}, ${}, 'open', 0, ${})", 4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4)).collect::<Vec<_>>().join(", "),
            );
            let mut query = sqlx::query(&sql);
            for (task_no, slot, images) in part {
                query = query.bind(id).bind(*task_no).bind(*slot).bind(*images);
            }
            query.execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    let (project, role) = ann::project_for(&state.db, id as u64, p.user.0).await?;
    Ok((StatusCode::CREATED, axum::Json(project_view(&state, &project, role).await?)).into_response())
}

#[utoipa::path(get, path = "/api/v1/annotation-projects", tag = "annotation",
    responses((status = 200, body = [ProjectView]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, Researcher(p): Researcher) -> ApiResult<axum::Json<Vec<ProjectView>>> {
    Ok(axum::Json(projects_of(&state, &p).await?))
}

/// The projects `p` owns, is a member of, or may join.
pub async fn projects_of(state: &AppState, p: &Principal) -> ApiResult<Vec<ProjectView>> {
    let rows = sqlx::query(
        "SELECT id FROM annotation_projects WHERE owner = $1 OR open_call = 1 OR id IN (SELECT project_id FROM annotation_members WHERE user_id = $1) ORDER BY created_ms DESC LIMIT 200",
    )
    .bind(p.user.0)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let (project, role) = ann::project_for(&state.db, row.try_get::<i64, _>("id")? as u64, p.user.0).await?;
        out.push(project_view(state, &project, role).await?);
    }
    Ok(out)
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}", tag = "annotation", params(("id" = u64, Path)),
    responses((status = 200, body = ProjectView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn get(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<ProjectView>> {
    let (project, role) = ann::project_for(&state.db, id, p.user.0).await?;
    Ok(axum::Json(project_view(&state, &project, role).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMember {
    /// `annotator` or `reviewer`.
    pub role: Role,
}

#[utoipa::path(put, path = "/api/v1/annotation-projects/{id}/members/{username}", tag = "annotation", params(("id" = u64, Path), ("username" = String, Path)), request_body = SetMember,
    responses((status = 204), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn set_member(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, username)): ApiPath<(u64, String)>,
    ApiJson(req): ApiJson<SetMember>,
) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner]).await?;
    if req.role == Role::Owner {
        return Err(ApiError::field("role", "annotator or reviewer"));
    }
    let user = super::datasets::user_named(&state, &username).await?;
    if user == project.owner {
        return Err(ApiError::field("username", "the owner does everything already"));
    }
    sqlx::query("INSERT INTO annotation_members (project_id, user_id, role, joined_ms) VALUES ($1, $2, $3, $4) ON CONFLICT (project_id, user_id) DO UPDATE SET role = $3")
        .bind(project.id)
        .bind(user)
        .bind(req.role.as_str())
        .bind(now_ms())
        .execute(&state.db.pool)
        .await?;
    if req.role != Role::Annotator {
        // A reviewer holds no work of their own: what they held goes back to the pool.
        release_all(&state, project.id, user).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(delete, path = "/api/v1/annotation-projects/{id}/members/{username}", tag = "annotation", params(("id" = u64, Path), ("username" = String, Path)),
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn remove_member(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, username)): ApiPath<(u64, String)>) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner]).await?;
    let user = super::datasets::user_named(&state, &username).await?;
    sqlx::query("DELETE FROM annotation_members WHERE project_id = $1 AND user_id = $2").bind(project.id).bind(user).execute(&state.db.pool).await?;
    release_all(&state, project.id, user).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// What `user` holds in the project goes back to the pool; what they submitted stays.
async fn release_all(state: &AppState, project: i64, user: i64) -> ApiResult<()> {
    sqlx::query("UPDATE annotation_slots SET state = 'open', annotator = NULL, lease_until = NULL, generation = generation + 1 WHERE project_id = $1 AND annotator = $2 AND state = 'held'")
        .bind(project)
        .bind(user)
        .execute(&state.db.pool)
        .await?;
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/annotation-projects/{id}/join", tag = "annotation", params(("id" = u64, Path)),
    responses((status = 200, body = ProjectView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn join(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<ProjectView>> {
    let (project, role) = ann::project_for(&state.db, id, p.user.0).await?;
    if role.is_none() {
        if !project.open_call {
            return Err(ApiError::forbidden("this project takes annotators by invitation only"));
        }
        sqlx::query("INSERT INTO annotation_members (project_id, user_id, role, joined_ms) VALUES ($1, $2, 'annotator', $3) ON CONFLICT (project_id, user_id) DO NOTHING")
            .bind(project.id)
            .bind(p.user.0)
            .bind(now_ms())
            .execute(&state.db.pool)
            .await?;
    }
    let (project, role) = ann::project_for(&state.db, id, p.user.0).await?;
    Ok(axum::Json(project_view(&state, &project, role).await?))
}

/// One image of a slot as the tool needs it: the annotator's own last save (or, before the
/// first, the pre-annotations).
#[derive(Serialize, ToSchema)]
/// An image of the annotator's task, known by its place in the task only: a honeypot must not
/// stand out by a number out of sequence, a number seen in another task, or its file name.
pub struct SlotImage {
    /// 1-based place in the task; the save and file paths take it.
    pub position: u64,
    pub width: u32,
    pub height: u32,
    /// 0 before the first save.
    pub revision: u64,
    #[schema(value_type = Vec<Object>)]
    pub shapes: Vec<Annotation>,
    /// A model's shapes to accept or fix (only while nothing was saved).
    #[schema(value_type = Vec<Object>)]
    pub pre: Vec<Annotation>,
}

#[derive(Serialize, ToSchema)]
pub struct SlotView {
    pub project: u64,
    pub task: u64,
    pub slot: u64,
    pub state: SlotState,
    pub lease_until_ms: Option<i64>,
    pub images: Vec<SlotImage>,
}

async fn slot_view(state: &AppState, project: &Project, s: &Slot, user: i64) -> ApiResult<SlotView> {
    let numbers = ann::task_images(&state.db, project.id, s.task as i64).await?;
    let images = ann::images_of(&state.db, project.id, &numbers).await?;
    let mut work = ann::saved_work(&state.db, project.id, s, user).await?;
    Ok(SlotView {
        project: project.id as u64,
        task: s.task,
        slot: s.slot,
        state: s.state,
        lease_until_ms: s.lease_until_ms,
        images: images
            .into_iter()
            .zip(1..)
            .map(|(i, position)| {
                let saved = work.remove(&i.image_no);
                SlotImage {
                    position,
                    width: i.width,
                    height: i.height,
                    revision: saved.as_ref().map_or(0, |s| s.revision as u64),
                    pre: if saved.is_none() { i.pre } else { Vec::new() },
                    shapes: saved.map(|s| s.shapes).unwrap_or_default(),
                }
            })
            .collect(),
    })
}

#[utoipa::path(post, path = "/api/v1/annotation-projects/{id}/next", tag = "annotation", params(("id" = u64, Path)),
    responses((status = 200, body = SlotView, description = "the slot the caller holds, or a newly taken one"), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody, description = "no project, or no task left for the caller")))]
pub async fn next(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<SlotView>> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Annotator]).await?;
    let s = ann::pull(&state.db, &project, p.user.0).await?.ok_or_else(|| ApiError::not_found(format!("a task left for you in {}", project.name)))?;
    Ok(axum::Json(slot_view(&state, &project, &s, p.user.0).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Assign {
    pub username: String,
}

#[utoipa::path(post, path = "/api/v1/annotation-projects/{id}/tasks/{task}/slots/{slot}/assign", tag = "annotation", params(("id" = u64, Path), ("task" = u64, Path), ("slot" = u64, Path)),
    request_body = Assign,
    responses((status = 204), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn assign(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, task, slot)): ApiPath<(u64, u64, u64)>,
    ApiJson(req): ApiJson<Assign>,
) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner]).await?;
    let user = super::datasets::user_named(&state, &req.username).await?;
    let (_, role) = ann::project_for(&state.db, id, user).await?;
    if role != Some(Role::Annotator) {
        return Err(ApiError::field("username", format!("{} is not an annotator of this project", req.username)));
    }
    ann::push(&state.db, &project, to_i64(task)?, to_i64(slot)?, user).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn to_i64(n: u64) -> ApiResult<i64> {
    i64::try_from(n).map_err(|_| ApiError::field("path", "a number below 2^63"))
}

#[derive(Serialize, ToSchema)]
pub struct MySlot {
    pub task: u64,
    pub slot: u64,
    pub state: SlotState,
    pub lease_until_ms: Option<i64>,
    pub images: u64,
    /// Images saved at least once.
    pub saved: u64,
    pub active_ms: i64,
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}/my-slots", tag = "annotation", params(("id" = u64, Path)),
    responses((status = 200, body = [MySlot]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn my_slots(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<Vec<MySlot>>> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Annotator]).await?;
    let rows = sqlx::query(
        "SELECT s.task_no, s.slot, s.state, s.lease_until, t.images,
                (SELECT COUNT(*) FROM annotation_work w WHERE w.project_id = s.project_id AND w.task_no = s.task_no AND w.slot = s.slot AND w.annotator = s.annotator) AS saved,
                (SELECT active_ms FROM annotation_time m WHERE m.project_id = s.project_id AND m.task_no = s.task_no AND m.slot = s.slot AND m.annotator = s.annotator) AS active
         FROM annotation_slots s JOIN annotation_tasks t ON t.project_id = s.project_id AND t.task_no = s.task_no
         WHERE s.project_id = $1 AND s.annotator = $2 ORDER BY s.task_no",
    )
    .bind(project.id)
    .bind(p.user.0)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let images: Vec<i64> = serde_json::from_str(&r.try_get::<String, _>("images")?).map_err(ApiError::internal)?;
        out.push(MySlot {
            task: r.try_get::<i64, _>("task_no")? as u64,
            slot: r.try_get::<i64, _>("slot")? as u64,
            state: match r.try_get::<String, _>("state")?.as_str() {
                "submitted" => SlotState::Submitted,
                _ => SlotState::Held,
            },
            lease_until_ms: opt_i64(&r, "lease_until")?,
            images: images.len() as u64,
            saved: r.try_get::<i64, _>("saved")? as u64,
            active_ms: opt_i64(&r, "active")?.unwrap_or(0),
        });
    }
    Ok(axum::Json(out))
}

/// The slot as its annotator sees it: held, or submitted by them (read only).
async fn own_slot(state: &AppState, project: &Project, task: u64, slot: u64, user: i64) -> ApiResult<Slot> {
    let s = ann::slot(&state.db, project.id, to_i64(task)?, to_i64(slot)?).await?;
    if s.annotator != Some(user) {
        return Err(ApiError::new(crate::error::Code::TaskNotHeld, format!("slot {slot} of task {task} is not yours")));
    }
    Ok(s)
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}/tasks/{task}/slots/{slot}", tag = "annotation", params(("id" = u64, Path), ("task" = u64, Path), ("slot" = u64, Path)),
    responses((status = 200, body = SlotView), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn get_slot(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, task, slot)): ApiPath<(u64, u64, u64)>,
) -> ApiResult<axum::Json<SlotView>> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Annotator]).await?;
    let s = own_slot(&state, &project, task, slot, p.user.0).await?;
    Ok(axum::Json(slot_view(&state, &project, &s, p.user.0).await?))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveWork {
    #[schema(value_type = Vec<Object>)]
    pub shapes: Vec<Annotation>,
    /// The revision these shapes were based on (0 for the first save).
    pub revision: u64,
    /// Milliseconds the annotator worked since the last save, as the tool measured it.
    #[serde(default)]
    pub active_ms: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Saved {
    pub revision: u64,
    pub lease_until_ms: Option<i64>,
}

/// The image at `position` (1-based) of the slot's task.
async fn image_at(state: &AppState, project: &Project, s: &Slot, position: u64) -> ApiResult<ann::ProjectImage> {
    let numbers = ann::task_images(&state.db, project.id, s.task as i64).await?;
    let image_no =
        position.checked_sub(1).and_then(|i| numbers.get(i as usize)).ok_or_else(|| ApiError::not_found(format!("image {position} of task {}", s.task)))?;
    ann::images_of(&state.db, project.id, &[*image_no]).await?.pop().ok_or_else(|| ApiError::not_found(format!("image {position} of task {}", s.task)))
}

#[utoipa::path(put, path = "/api/v1/annotation-projects/{id}/tasks/{task}/slots/{slot}/images/{position}", tag = "annotation",
    params(("id" = u64, Path), ("task" = u64, Path), ("slot" = u64, Path), ("position" = u64, Path, description = "1-based place in the task")), request_body = SaveWork,
    responses((status = 200, body = Saved), (status = 400, body = crate::error::ErrorBody, description = "a shape the schema or the image refuses, with its index and the reason"),
        (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody),
        (status = 409, body = crate::error::ErrorBody, description = "TASK_NOT_HELD, STALE_REVISION, or the task is submitted")))]
pub async fn save(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, task, slot, position)): ApiPath<(u64, u64, u64, u64)>,
    ApiJson(req): ApiJson<SaveWork>,
) -> ApiResult<axum::Json<Saved>> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Annotator]).await?;
    let s = ann::held_slot(&state.db, project.id, to_i64(task)?, to_i64(slot)?, p.user.0).await?;
    let image = image_at(&state, &project, &s, position).await?;
    let image_no = image.image_no;
    // Checking a polygon is quadratic in its vertices: off the async threads.
    let (schema, shapes) = (project.schema.clone(), req.shapes);
    let shapes = tokio::task::spawn_blocking(move || schema.check_shapes(&shapes, image.width, image.height).map(|()| shapes))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::field(&format!("shapes[{}]", e.index), e.to_string()))?;
    // Renewed first: from then on nobody else can take the slot, so the work written next is
    // the holder's (a lease that went to someone else meanwhile is TASK_NOT_HELD here).
    ann::renew(&state.db, &project, &s, p.user.0).await?;
    let revision = ann::save(&state.db, project.id, &s, p.user.0, image_no, &shapes, to_i64(req.revision)?).await?;
    ann::add_time(&state.db, project.id, &s, p.user.0, i64::try_from(req.active_ms).unwrap_or(i64::MAX)).await?;
    let s = ann::slot(&state.db, project.id, s.task as i64, s.slot as i64).await?;
    Ok(axum::Json(Saved { revision: revision as u64, lease_until_ms: s.lease_until_ms }))
}

#[utoipa::path(post, path = "/api/v1/annotation-projects/{id}/tasks/{task}/slots/{slot}/submit", tag = "annotation", params(("id" = u64, Path), ("task" = u64, Path), ("slot" = u64, Path)),
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn submit(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, task, slot)): ApiPath<(u64, u64, u64)>) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Annotator]).await?;
    let s = own_slot(&state, &project, task, slot, p.user.0).await?;
    if s.state == SlotState::Held {
        ann::submit(&state.db, &project, &s, p.user.0).await?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/api/v1/annotation-projects/{id}/tasks/{task}/slots/{slot}/release", tag = "annotation", params(("id" = u64, Path), ("task" = u64, Path), ("slot" = u64, Path)),
    responses((status = 204), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn release(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, task, slot)): ApiPath<(u64, u64, u64)>) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Annotator]).await?;
    let s = ann::held_slot(&state.db, project.id, to_i64(task)?, to_i64(slot)?, p.user.0).await?;
    ann::release(&state.db, project.id, &s, p.user.0).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}/tasks/{task}/slots/{slot}/images/{position}/file", tag = "annotation",
    params(("id" = u64, Path), ("task" = u64, Path), ("slot" = u64, Path), ("position" = u64, Path, description = "1-based place in the task")),
    responses((status = 200, description = "the image's bytes", content_type = "application/octet-stream"), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn slot_image_file(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, task, slot, position)): ApiPath<(u64, u64, u64, u64)>,
) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Annotator]).await?;
    // The slot's holder, now or when it was submitted.
    let s = own_slot(&state, &project, task, slot, p.user.0).await?;
    let image = image_at(&state, &project, &s, position).await?;
    let store = super::datasets::store(&state)?;
    super::datasets::blob_response(store, &image.sha256, image.size as u64, None).await
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}/images/{image_no}/file", tag = "annotation", params(("id" = u64, Path), ("image_no" = u64, Path)),
    responses((status = 200, description = "the image's bytes (for the owner and reviewers; annotators fetch their task's images by position)", content_type = "application/octet-stream"),
        (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn image_file(State(state): State<AppState>, Researcher(p): Researcher, ApiPath((id, image_no)): ApiPath<(u64, u64)>) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner, Role::Reviewer]).await?;
    let image_no = to_i64(image_no)?;
    let image = ann::images_of(&state.db, project.id, &[image_no]).await?.pop().ok_or_else(|| ApiError::not_found(format!("image {image_no}")))?;
    let store = super::datasets::store(&state)?;
    super::datasets::blob_response(store, &image.sha256, image.size as u64, None).await
}

#[derive(Serialize, ToSchema)]
pub struct ConflictShape {
    pub annotator: String,
    #[schema(value_type = Object)]
    pub shape: Annotation,
}

#[derive(Serialize, ToSchema)]
pub struct ConflictView {
    pub key: String,
    /// Annotators who did not draw it.
    pub missing: Vec<String>,
    pub labels_differ: bool,
    pub shapes: Vec<ConflictShape>,
    #[schema(value_type = Option<Object>)]
    pub decision: Option<Decision>,
}

#[derive(Serialize, ToSchema)]
pub struct ImageConflicts {
    pub image_no: u64,
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub agreement: Option<f64>,
    pub conflicts: Vec<ConflictView>,
}

#[derive(Deserialize, IntoParams)]
pub struct ConflictQuery {
    /// Only images with conflicts nobody has decided (default true).
    pub undecided: Option<bool>,
    /// At most this many images (1 to 100, default 20).
    pub limit: Option<u32>,
}

async fn usernames(state: &AppState, ids: impl IntoIterator<Item = i64>) -> ApiResult<HashMap<i64, String>> {
    let mut out = HashMap::new();
    for id in ids.into_iter().collect::<HashSet<_>>() {
        let row = sqlx::query("SELECT username FROM users WHERE id = $1").bind(id).fetch_optional(&state.db.pool).await?;
        out.insert(id, row.map(|r| r.try_get::<String, _>("username")).transpose()?.unwrap_or_else(|| format!("user {id}")));
    }
    Ok(out)
}

async fn image_conflicts(state: &AppState, project: &Project, task_no: i64, image: &ann::ProjectImage, score: Option<f64>) -> ApiResult<ImageConflicts> {
    let works = ann::works_on(&state.db, project.id, task_no, image.image_no).await?;
    let views: Vec<Work<'_>> = works.iter().map(|(a, shapes)| Work { annotator: *a as u64, shapes }).collect();
    let result = compare_image(image.width, image.height, &views);
    let decisions = ann::decisions_on(&state.db, project.id, image.image_no).await?;
    let names = usernames(state, works.iter().map(|(a, _)| *a)).await?;
    let name = |a: u64| names.get(&(a as i64)).cloned().unwrap_or_default();
    let conflicts = result
        .conflicts()
        .map(|c| {
            let d = c.conflict.clone().unwrap_or(agreement::Disagreement { missing: Vec::new(), labels_differ: false });
            ConflictView {
                key: c.key.clone(),
                missing: d.missing.iter().map(|a| name(*a)).collect(),
                labels_differ: d.labels_differ,
                shapes: c.members.iter().map(|&(w, s)| ConflictShape { annotator: name(views[w].annotator), shape: views[w].shapes[s].clone() }).collect(),
                decision: decisions.get(&c.key).cloned(),
            }
        })
        .collect();
    Ok(ImageConflicts { image_no: image.image_no as u64, name: image.name.clone(), width: image.width, height: image.height, agreement: score, conflicts })
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}/conflicts", tag = "annotation", params(("id" = u64, Path), ConflictQuery),
    responses((status = 200, body = [ImageConflicts]), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn conflicts(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<ConflictQuery>,
) -> ApiResult<axum::Json<Vec<ImageConflicts>>> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner, Role::Reviewer]).await?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::field("limit", "1 to 100"));
    }
    ann::compare_pending(&state.db, &project).await?;
    let column = if q.undecided.unwrap_or(true) { "undecided" } else { "conflicts" };
    let sql = format!("SELECT image_no, task_no, agreement_ppm FROM annotation_results WHERE project_id = $1 AND {column} > 0 ORDER BY image_no LIMIT $2");
    let rows = sqlx::query(&sql).bind(project.id).bind(i64::from(limit)).fetch_all(&state.db.pool).await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let image_no: i64 = r.try_get("image_no")?;
        let image = ann::images_of(&state.db, project.id, &[image_no]).await?.pop().ok_or_else(|| ApiError::internal("a result without its image"))?;
        let score = opt_i64(&r, "agreement_ppm")?.map(|ppm| ppm as f64 / 1e6);
        out.push(image_conflicts(&state, &project, r.try_get("task_no")?, &image, score).await?);
    }
    Ok(axum::Json(out))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Decide {
    /// The conflict's key, as listed.
    pub key: String,
    /// `{"decision": "accept", "annotator": <username>, "shape": <id>}`, `{"decision":
    /// "replace", "shape": {…}}` or `{"decision": "reject"}`.
    #[schema(value_type = Object)]
    pub decision: serde_json::Value,
}

#[utoipa::path(post, path = "/api/v1/annotation-projects/{id}/images/{image_no}/decisions", tag = "annotation", params(("id" = u64, Path), ("image_no" = u64, Path)),
    request_body = Decide,
    responses((status = 200, body = ImageConflicts), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn decide(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath((id, image_no)): ApiPath<(u64, u64)>,
    ApiJson(req): ApiJson<Decide>,
) -> ApiResult<axum::Json<ImageConflicts>> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner, Role::Reviewer]).await?;
    let image_no = to_i64(image_no)?;
    let row = sqlx::query("SELECT task_no FROM annotation_results WHERE project_id = $1 AND image_no = $2")
        .bind(project.id)
        .bind(image_no)
        .fetch_optional(&state.db.pool)
        .await?;
    let task_no: i64 = row.ok_or_else(|| ApiError::not_found(format!("a complete image {image_no}")))?.try_get("task_no")?;
    let image = ann::images_of(&state.db, project.id, &[image_no]).await?.pop().ok_or_else(|| ApiError::not_found(format!("image {image_no}")))?;
    // The API names annotators by username; the decision stored names them by ID.
    let mut raw = req.decision;
    if let Some(username) = raw.get("annotator").and_then(|a| a.as_str()).map(str::to_owned) {
        let user =
            super::datasets::user_named(&state, &username).await.map_err(|_| ApiError::field("decision.annotator", format!("no annotator {username}")))?;
        raw["annotator"] = serde_json::json!(user);
    }
    let decision: Decision = serde_json::from_value(raw).map_err(|e| ApiError::field("decision", e.to_string()))?;
    if let Decision::Replace { shape } = &decision {
        project.schema.check_shapes(std::slice::from_ref(shape), image.width, image.height).map_err(|e| ApiError::field("decision.shape", e.why))?;
    }
    let works = ann::works_on(&state.db, project.id, task_no, image_no).await?;
    let views: Vec<Work<'_>> = works.iter().map(|(a, shapes)| Work { annotator: *a as u64, shapes }).collect();
    let result = compare_image(image.width, image.height, &views);
    agreement::check_decision(&result, &views, &req.key, &decision).map_err(|e| ApiError::field("key", e.to_string()))?;
    sqlx::query(
        "INSERT INTO annotation_decisions (project_id, image_no, conflict_key, decision, reviewer, decided_ms) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (project_id, image_no, conflict_key) DO UPDATE SET decision = $4, reviewer = $5, decided_ms = $6",
    )
    .bind(project.id)
    .bind(image_no)
    .bind(&req.key)
    .bind(serde_json::to_string(&decision).map_err(ApiError::internal)?)
    .bind(p.user.0)
    .bind(now_ms())
    .execute(&state.db.pool)
    .await?;
    ann::compare_and_record(&state.db, &project, task_no, &image).await?;
    Ok(axum::Json(image_conflicts(&state, &project, task_no, &image, result.score).await?))
}

#[derive(Serialize, ToSchema)]
pub struct AnnotatorStats {
    pub username: String,
    pub slots_held: u64,
    pub slots_submitted: u64,
    pub images_submitted: u64,
    /// Time the tool measured, for paying them.
    pub active_ms: i64,
    /// Mean agreement with the others on the same images (F1), when compared.
    pub agreement: Option<f64>,
    /// Mean honeypot score (F1 against known labels), when any was scored.
    pub honeypot_score: Option<f64>,
    /// Images submitted per hour of active time.
    pub images_per_hour: Option<f64>,
}

#[derive(Serialize, ToSchema)]
pub struct Dashboard {
    pub images: u64,
    pub honeypots: u64,
    pub tasks: u64,
    pub slots_open: u64,
    pub slots_held: u64,
    pub slots_submitted: u64,
    /// Images whose every annotator submitted (compared).
    pub images_complete: u64,
    pub agreement: Option<f64>,
    pub conflicts: u64,
    pub undecided: u64,
    /// Reviewed shapes per label over complete images.
    pub labels: BTreeMap<String, u64>,
    pub annotators: Vec<AnnotatorStats>,
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}/dashboard", tag = "annotation", params(("id" = u64, Path)),
    responses((status = 200, body = Dashboard), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn dashboard(State(state): State<AppState>, Researcher(p): Researcher, ApiPath(id): ApiPath<u64>) -> ApiResult<axum::Json<Dashboard>> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner, Role::Reviewer]).await?;
    Ok(axum::Json(dashboard_of(&state.db, &project).await?))
}

/// The dashboard from sums SQL keeps (a fixed number of grouped queries, however many images
/// and annotators: agreement was computed when each task completed).
pub async fn dashboard_of(db: &crate::db::Db, project: &Project) -> ApiResult<Dashboard> {
    let pool = &db.pool;
    let count = |r: &sqlx::any::AnyRow, c: &str| -> ApiResult<u64> { Ok(r.try_get::<Option<i64>, _>(c)?.unwrap_or(0).max(0) as u64) };
    let totals = sqlx::query(
        "SELECT (SELECT COUNT(*) FROM annotation_images WHERE project_id = $1 AND honeypot = 1) AS honeypots,
                (SELECT COUNT(*) FROM annotation_tasks WHERE project_id = $1) AS tasks",
    )
    .bind(project.id)
    .fetch_one(pool)
    .await?;
    let results = sqlx::query(
        "SELECT COUNT(*) AS complete, CAST(AVG(agreement_ppm) AS BIGINT) AS agreement, CAST(SUM(conflicts) AS BIGINT) AS conflicts,
                CAST(SUM(undecided) AS BIGINT) AS undecided FROM annotation_results WHERE project_id = $1",
    )
    .bind(project.id)
    .fetch_one(pool)
    .await?;
    let mut slots: HashMap<String, u64> = HashMap::new();
    for r in sqlx::query("SELECT state, COUNT(*) AS n FROM annotation_slots WHERE project_id = $1 GROUP BY state").bind(project.id).fetch_all(pool).await? {
        slots.insert(r.try_get("state")?, count(&r, "n")?);
    }
    let slots_in = |state: SlotState| slots.get(state.as_str()).copied().unwrap_or(0);
    let labels = sqlx::query("SELECT label, CAST(SUM(shapes) AS BIGINT) AS n FROM annotation_labels WHERE project_id = $1 GROUP BY label ORDER BY label")
        .bind(project.id)
        .fetch_all(pool)
        .await?;
    let people = sqlx::query(
        "SELECT g.annotator, u.username, g.held, g.submitted, g.images FROM (
           SELECT s.annotator,
                  CAST(SUM(CASE WHEN s.state = 'held' THEN 1 ELSE 0 END) AS BIGINT) AS held,
                  CAST(SUM(CASE WHEN s.state = 'submitted' THEN 1 ELSE 0 END) AS BIGINT) AS submitted,
                  CAST(SUM(CASE WHEN s.state = 'submitted' THEN s.images ELSE 0 END) AS BIGINT) AS images
           FROM annotation_slots s WHERE s.project_id = $1 AND s.annotator IS NOT NULL GROUP BY s.annotator) g
         LEFT JOIN users u ON u.id = g.annotator",
    )
    .bind(project.id)
    .fetch_all(pool)
    .await?;
    let time = sqlx::query("SELECT annotator, CAST(SUM(active_ms) AS BIGINT) AS active FROM annotation_time WHERE project_id = $1 GROUP BY annotator")
        .bind(project.id)
        .fetch_all(pool)
        .await?;
    let scores = sqlx::query("SELECT annotator, kind, CAST(AVG(f1_ppm) AS BIGINT) AS f1 FROM annotation_scores WHERE project_id = $1 GROUP BY annotator, kind")
        .bind(project.id)
        .fetch_all(pool)
        .await?;
    let active: HashMap<i64, i64> = time.iter().map(|r| Ok((r.try_get("annotator")?, opt_i64(r, "active")?.unwrap_or(0)))).collect::<ApiResult<_>>()?;
    let mut score: HashMap<(i64, String), Option<f64>> = HashMap::new();
    for r in &scores {
        score.insert((r.try_get("annotator")?, r.try_get("kind")?), average_ppm(r, "f1")?);
    }
    let mut annotators = Vec::with_capacity(people.len());
    for r in &people {
        let user: i64 = r.try_get("annotator")?;
        let active_ms = active.get(&user).copied().unwrap_or(0);
        let images_submitted = count(r, "images")?;
        annotators.push(AnnotatorStats {
            username: crate::db::opt_str(r, "username")?.unwrap_or_else(|| format!("user {user}")),
            slots_held: count(r, "held")?,
            slots_submitted: count(r, "submitted")?,
            images_submitted,
            active_ms,
            agreement: score.get(&(user, "peer".into())).copied().flatten(),
            honeypot_score: score.get(&(user, "honeypot".into())).copied().flatten(),
            images_per_hour: (active_ms > 0).then(|| images_submitted as f64 / (active_ms as f64 / 3_600_000.0)),
        });
    }
    annotators.sort_by(|a, b| a.username.cmp(&b.username));
    Ok(Dashboard {
        images: project.images as u64,
        honeypots: count(&totals, "honeypots")?,
        tasks: count(&totals, "tasks")?,
        slots_open: slots_in(SlotState::Open),
        slots_held: slots_in(SlotState::Held),
        slots_submitted: slots_in(SlotState::Submitted),
        images_complete: count(&results, "complete")?,
        agreement: average_ppm(&results, "agreement")?,
        conflicts: count(&results, "conflicts")?,
        undecided: count(&results, "undecided")?,
        labels: labels.iter().map(|r| Ok((r.try_get::<String, _>("label")?, count(r, "n")?))).collect::<ApiResult<_>>()?,
        annotators,
    })
}

/// A score column in parts per million (averages are cast to BIGINT in SQL: PostgreSQL would
/// answer NUMERIC, which the `Any` driver does not read).
fn average_ppm(row: &sqlx::any::AnyRow, column: &str) -> ApiResult<Option<f64>> {
    Ok(opt_i64(row, column)?.map(|ppm| ppm as f64 / 1e6))
}

#[derive(Deserialize, IntoParams)]
pub struct ExportQuery {
    /// `coco` (one JSON document), `voc` or `yolo` (a tar of their files).
    pub format: String,
    /// Export the complete, decided images even while others are not (default false: refused).
    pub partial: Option<bool>,
}

/// The reviewed shapes of every complete, decided image, as an annotation set; refused while
/// any image is incomplete or undecided unless `partial`.
async fn reviewed_set(state: &AppState, project: &Project, partial: bool, format: Option<Format>) -> ApiResult<(AnnotationSet, u64)> {
    // Keypoints and masks have no place in VOC or YOLO files, polylines none in any.
    let fits = |o: &suanli_cv::annotation::Object| {
        !(matches!(o.shape, suanli_cv::annotation::Shape::Points { .. } | suanli_cv::annotation::Shape::Mask { .. })
            && matches!(format, Some(Format::Voc | Format::Yolo)))
    };
    ann::compare_pending(&state.db, project).await?;
    let rows = sqlx::query(
        "SELECT i.image_no, i.name, i.width, i.height, r.shapes, r.undecided FROM annotation_images i
         LEFT JOIN annotation_results r ON r.project_id = i.project_id AND r.image_no = i.image_no
         WHERE i.project_id = $1 AND i.honeypot = 0 ORDER BY i.image_no",
    )
    .bind(project.id)
    .fetch_all(&state.db.pool)
    .await?;
    let mut set = AnnotationSet { categories: project.schema.classes.iter().map(|c| c.name.clone()).collect(), images: Vec::new() };
    let (mut waiting, mut left_out) = (0u64, 0u64);
    for r in rows {
        let undecided = opt_i64(&r, "undecided")?;
        let Some(shapes) = crate::db::opt_str(&r, "shapes")?.filter(|_| undecided == Some(0)) else {
            waiting += 1;
            continue;
        };
        let shapes: Vec<Annotation> = serde_json::from_str(&shapes).map_err(ApiError::internal)?;
        let objects: Vec<_> = shapes.iter().filter_map(ann::to_object).filter(|o| fits(o)).collect();
        left_out += (shapes.len() - objects.len()) as u64;
        set.images.push(AnnotatedImage {
            file_name: r.try_get("name")?,
            width: r.try_get::<i64, _>("width")? as u32,
            height: r.try_get::<i64, _>("height")? as u32,
            objects,
        });
    }
    if waiting > 0 && !partial {
        return Err(ApiError::broker(
            suanli_types::ErrorCode::InvalidTransition,
            format!("{waiting} images are not yet annotated by everyone or have conflicts nobody decided: finish them, or export with partial=true"),
        ));
    }
    Ok((set, left_out))
}

#[utoipa::path(get, path = "/api/v1/annotation-projects/{id}/export", tag = "annotation", params(("id" = u64, Path), ExportQuery),
    responses((status = 200, description = "COCO JSON, or a tar of VOC/YOLO files; `x-suanli-left-out` counts shapes the format cannot hold"),
        (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody),
        (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn export(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner, Role::Reviewer]).await?;
    let format = match q.format.as_str() {
        "coco" => Format::Coco,
        "voc" => Format::Voc,
        "yolo" => Format::Yolo,
        _ => return Err(ApiError::field("format", "coco, voc or yolo")),
    };
    let (set, left_out) = reviewed_set(&state, &project, q.partial.unwrap_or(false), Some(format)).await?;
    let left_out = HeaderValue::from(left_out);
    if format == Format::Coco {
        let json = suanli_cv::annotation::coco::write(&set).map_err(|e| ApiError::field("project", e.to_string()))?;
        return Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json")), (header::HeaderName::from_static("x-suanli-left-out"), left_out)],
            json,
        )
            .into_response());
    }
    let tar = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        set.write_dir(format, dir.path()).map_err(|e| e.to_string())?;
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        builder.append_dir_all(".", dir.path()).map_err(|e| e.to_string())?;
        builder.into_inner().map_err(|e| e.to_string())
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::field("project", e))?;
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar")), (header::HeaderName::from_static("x-suanli-left-out"), left_out)], tar)
        .into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportVersion {
    #[serde(default)]
    pub message: String,
    /// A retry with the same key gets the version the first try made.
    pub request_id: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/annotation-projects/{id}/export-version", tag = "annotation", params(("id" = u64, Path)), request_body = ExportVersion,
    responses((status = 201, body = super::datasets::VersionView, description = "The new version; `x-suanli-left-out` counts shapes a dataset cannot hold (polylines)"), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
        (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody), (status = 409, body = crate::error::ErrorBody)))]
pub async fn export_version(
    State(state): State<AppState>,
    Researcher(p): Researcher,
    ApiPath(id): ApiPath<u64>,
    ApiJson(req): ApiJson<ExportVersion>,
) -> ApiResult<Response> {
    let (project, _) = ann::project_as(&state.db, id, p.user.0, &[Role::Owner]).await?;
    let (set, left_out) = reviewed_set(&state, &project, false, None).await?;
    let d = super::datasets::owned(&state, &p, project.dataset_id as u64).await?;
    let mut files = files_of(&state, d.id(), project.version).await?;
    let reviewed: HashMap<&str, &AnnotatedImage> = set.images.iter().map(|i| (i.file_name.as_str(), i)).collect();
    for f in &mut files {
        if let Some(image) = reviewed.get(f.name.as_str()) {
            f.objects = image.objects.clone();
        }
    }
    let message = if req.message.is_empty() { format!("annotated in project {}", project.name) } else { req.message };
    let mut response = super::datasets::commit_files(&state, &d, &files, message, req.request_id).await?;
    // Polylines have no place in a dataset's objects: say how many stayed behind.
    response.headers_mut().insert(header::HeaderName::from_static("x-suanli-left-out"), HeaderValue::from(left_out));
    Ok(response)
}
