//! Crowdsourced annotation projects (seed 001) in SQL: projects over a dataset version, their
//! members, tasks of overlapping slots, each annotator's saved work, the time they spent, and
//! what agreement and review made of it. What a shape may be and how overlapping work is
//! compared is `suanli_annotation`'s; the HTTP side is `api/annotation.rs`.
//!
//! The life of a slot (one annotator's pass over one task):
//!
//! ```text
//!  open ──pull / push──▶ held (annotator, lease_until) ──submit──▶ submitted
//!   ▲                      │ lease ran out and someone else pulled it
//!   └──── release ─────────┘ (its holder's saves are refused from then on)
//! ```
//!
//! Invariants, each held by SQL rather than by a lock in this process (portals may be many):
//! - **a slot has one holder**: a pull takes a slot in the one `UPDATE` that checks it is free
//!   (open, or its lease ran out), a push by a compare-and-set on its `generation` (which every
//!   take, submit and release moves);
//! - **an annotator holds at most one slot of a task** (so an image's `overlap` annotators are
//!   different people): a unique index on `(project, task, annotator)`;
//! - **work is saved against the revision it was based on**, so a second tab or a replayed
//!   save cannot overwrite newer work; a retry of the save that just applied gets its answer;
//! - an expired lease whose slot nobody took stays its holder's: the next save renews it.
//!
//! When a task's last slot is submitted its images are compared (`annotation_results`,
//! `annotation_scores`), so the dashboard reads sums and never recomputes agreement.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use suanli_annotation::agreement::{self, Decision};
use suanli_annotation::{compare_image, score_against_gold, Annotation, Geometry, ImageAgreement, LabelSchema, Work};
use suanli_cv::annotation::{Object, Shape};

use crate::db::{now_ms, opt_i64, opt_str, Db};
use crate::error::{ApiError, ApiResult, Code};

/// A member's part in a project (its owner is not a member: it may do everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Reviewer,
    Annotator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Reviewer => "reviewer",
            Role::Annotator => "annotator",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Owner, Role::Reviewer, Role::Annotator].into_iter().find(|r| r.as_str() == s)
    }
}

/// A slot's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SlotState {
    Open,
    Held,
    Submitted,
}

impl SlotState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Open => "open",
            SlotState::Held => "held",
            SlotState::Submitted => "submitted",
        }
    }

    fn parse(s: &str) -> SlotState {
        match s {
            "held" => SlotState::Held,
            "submitted" => SlotState::Submitted,
            _ => SlotState::Open,
        }
    }
}

/// A project as its row has it.
#[derive(Clone, Debug)]
pub struct Project {
    pub id: i64,
    pub owner: i64,
    pub name: String,
    pub dataset_id: i64,
    pub version: i64,
    pub schema: LabelSchema,
    pub task_size: i64,
    pub overlap: i64,
    pub lease_ms: i64,
    pub open_call: bool,
    pub images: i64,
    pub created_ms: i64,
}

const PROJECT_COLUMNS: &str = "id, owner, name, dataset_id, version, label_schema, task_size, overlap, lease_ms, open_call, images, created_ms";

fn project_row(row: &sqlx::any::AnyRow) -> ApiResult<Project> {
    Ok(Project {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        name: row.try_get("name")?,
        dataset_id: row.try_get("dataset_id")?,
        version: row.try_get("version")?,
        schema: serde_json::from_str(&row.try_get::<String, _>("label_schema")?).map_err(ApiError::internal)?,
        task_size: row.try_get("task_size")?,
        overlap: row.try_get("overlap")?,
        lease_ms: row.try_get("lease_ms")?,
        open_call: row.try_get::<i64, _>("open_call")? != 0,
        images: row.try_get("images")?,
        created_ms: row.try_get("created_ms")?,
    })
}

/// The project and the caller's role in it; a project the caller may not see is `NOT_FOUND`
/// (its existence is nobody else's business), one with an open call is seen by everyone.
pub async fn project_for(db: &Db, id: u64, user: i64) -> ApiResult<(Project, Option<Role>)> {
    let sql = format!("SELECT {PROJECT_COLUMNS} FROM annotation_projects WHERE id = $1");
    let row = sqlx::query(&sql).bind(id as i64).fetch_optional(&db.pool).await?;
    let Some(row) = row else { return Err(ApiError::not_found(format!("annotation project {id}"))) };
    let project = project_row(&row)?;
    let role = if project.owner == user {
        Some(Role::Owner)
    } else {
        let member = sqlx::query("SELECT role FROM annotation_members WHERE project_id = $1 AND user_id = $2")
            .bind(project.id)
            .bind(user)
            .fetch_optional(&db.pool)
            .await?;
        member.map(|m| m.try_get::<String, _>("role")).transpose()?.and_then(|r| Role::parse(&r))
    };
    if role.is_none() && !project.open_call {
        return Err(ApiError::not_found(format!("annotation project {id}")));
    }
    Ok((project, role))
}

/// As [`project_for`], and the caller has one of `roles`.
pub async fn project_as(db: &Db, id: u64, user: i64, roles: &[Role]) -> ApiResult<(Project, Role)> {
    let (project, role) = project_for(db, id, user).await?;
    match role {
        Some(r) if roles.contains(&r) => Ok((project, r)),
        _ => Err(ApiError::forbidden(format!(
            "this needs the {} role in project {:?}",
            roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" or "),
            project.name
        ))),
    }
}

/// One image of a project.
#[derive(Clone, Debug)]
pub struct ProjectImage {
    pub image_no: i64,
    pub name: String,
    pub sha256: String,
    pub size: i64,
    pub width: u32,
    pub height: u32,
    pub honeypot: bool,
    pub gold: Vec<Annotation>,
    pub pre: Vec<Annotation>,
}

fn image_row(row: &sqlx::any::AnyRow) -> ApiResult<ProjectImage> {
    let shapes = |col: &str| -> ApiResult<Vec<Annotation>> {
        opt_str(row, col)?.map(|s| serde_json::from_str(&s)).transpose().map_err(ApiError::internal).map(Option::unwrap_or_default)
    };
    Ok(ProjectImage {
        image_no: row.try_get("image_no")?,
        name: row.try_get("name")?,
        sha256: row.try_get("sha256")?,
        size: row.try_get("size")?,
        width: row.try_get::<i64, _>("width")? as u32,
        height: row.try_get::<i64, _>("height")? as u32,
        honeypot: row.try_get::<i64, _>("honeypot")? != 0,
        gold: shapes("gold")?,
        pre: shapes("pre")?,
    })
}

pub async fn images_of(db: &Db, project: i64, numbers: &[i64]) -> ApiResult<Vec<ProjectImage>> {
    let mut out = Vec::with_capacity(numbers.len());
    for chunk in numbers.chunks(500) {
        let list = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "SELECT image_no, name, sha256, size, width, height, honeypot, gold, pre FROM annotation_images WHERE project_id = $1 AND image_no IN ({list})"
        );
        let mut query = sqlx::query(&sql).bind(project);
        for n in chunk {
            query = query.bind(*n);
        }
        for row in query.fetch_all(&db.pool).await? {
            out.push(image_row(&row)?);
        }
    }
    let order: HashMap<i64, usize> = numbers.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    out.sort_by_key(|img| order.get(&img.image_no).copied().unwrap_or(usize::MAX));
    Ok(out)
}

pub async fn task_images(db: &Db, project: i64, task_no: i64) -> ApiResult<Vec<i64>> {
    let row =
        sqlx::query("SELECT images FROM annotation_tasks WHERE project_id = $1 AND task_no = $2").bind(project).bind(task_no).fetch_optional(&db.pool).await?;
    let row = row.ok_or_else(|| ApiError::not_found(format!("task {task_no}")))?;
    serde_json::from_str(&row.try_get::<String, _>("images")?).map_err(ApiError::internal)
}

/// A slot as its row has it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Slot {
    pub task: u64,
    pub slot: u64,
    pub state: SlotState,
    #[serde(skip)]
    pub annotator: Option<i64>,
    pub lease_until_ms: Option<i64>,
    #[serde(skip)]
    pub generation: i64,
}

fn slot_row(row: &sqlx::any::AnyRow) -> ApiResult<Slot> {
    Ok(Slot {
        task: row.try_get::<i64, _>("task_no")? as u64,
        slot: row.try_get::<i64, _>("slot")? as u64,
        state: SlotState::parse(&row.try_get::<String, _>("state")?),
        annotator: opt_i64(row, "annotator")?,
        lease_until_ms: opt_i64(row, "lease_until")?,
        generation: row.try_get("generation")?,
    })
}

const SLOT_COLUMNS: &str = "task_no, slot, state, annotator, lease_until, generation";

pub async fn slot(db: &Db, project: i64, task_no: i64, slot_no: i64) -> ApiResult<Slot> {
    let sql = format!("SELECT {SLOT_COLUMNS} FROM annotation_slots WHERE project_id = $1 AND task_no = $2 AND slot = $3");
    let row = sqlx::query(&sql).bind(project).bind(task_no).bind(slot_no).fetch_optional(&db.pool).await?;
    slot_row(&row.ok_or_else(|| ApiError::not_found(format!("slot {slot_no} of task {task_no}")))?)
}

/// The slot, if `user` holds it (an expired lease nobody took still counts).
pub async fn held_slot(db: &Db, project: i64, task_no: i64, slot_no: i64, user: i64) -> ApiResult<Slot> {
    let s = slot(db, project, task_no, slot_no).await?;
    match (s.state, s.annotator) {
        (SlotState::Held, Some(a)) if a == user => Ok(s),
        (SlotState::Submitted, Some(a)) if a == user => {
            Err(ApiError::broker(suanli_types::ErrorCode::InvalidTransition, "this task is submitted: it can no longer change"))
        }
        _ => Err(ApiError::new(
            Code::TaskNotHeld,
            format!("slot {slot_no} of task {task_no} is not yours (its lease ran out and it went to someone else, or it was never yours)"),
        )),
    }
}

/// Tries to take `candidate` for `user` until `lease_until`; false when another request took
/// it first, its holder saved or submitted meanwhile (it is no longer free at `now`), or `user`
/// already holds a slot of the same task.
async fn take(db: &Db, project: i64, candidate: &Slot, user: i64, now: i64, lease_until: i64) -> ApiResult<bool> {
    let taken = sqlx::query(
        "UPDATE annotation_slots SET state = 'held', annotator = $1, lease_until = $2, assigned_ms = $3, generation = generation + 1
         WHERE project_id = $4 AND task_no = $5 AND slot = $6 AND generation = $7
           AND (state = 'open' OR (state = 'held' AND lease_until <= $3))",
    )
    .bind(user)
    .bind(lease_until)
    .bind(now)
    .bind(project)
    .bind(candidate.task as i64)
    .bind(candidate.slot as i64)
    .bind(candidate.generation)
    .execute(&db.pool)
    .await;
    match taken {
        Ok(done) => Ok(done.rows_affected() == 1),
        Err(e) if Db::is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// "Give me the next task": the slot `user` holds already, else the first free one (open, or
/// its lease ran out) of a task they hold no other slot of, taken in one statement: the
/// `UPDATE` picks and takes the row together, so concurrent pulls never retry on each other.
/// On PostgreSQL the pick locks its row and skips rows other pulls have locked (`FOR UPDATE SKIP
/// LOCKED`, the queue idiom: each concurrent pull gets the next row, nobody waits); SQLite runs
/// one writer at a time, so its statement is atomic as it is (the one place the two dialects
/// differ, `Db::backend`). `None` when nothing is left for them.
pub async fn pull(db: &Db, project: &Project, user: i64) -> ApiResult<Option<Slot>> {
    let now = now_ms();
    let sql = format!("SELECT {SLOT_COLUMNS} FROM annotation_slots WHERE project_id = $1 AND state = 'held' AND annotator = $2 ORDER BY task_no LIMIT 1");
    if let Some(row) = sqlx::query(&sql).bind(project.id).bind(user).fetch_optional(&db.pool).await? {
        let mine = slot_row(&row)?;
        renew(db, project, &mine, user).await?;
        return slot(db, project.id, mine.task as i64, mine.slot as i64).await.map(Some);
    }
    let postgres = db.backend == crate::db::Backend::Postgres;
    // Slots whose lease ran out first (their work has waited longest), then open ones: each
    // probe is one statement that reads a partial index of its own (migration 11), so a pull
    // reads free slots only, never the thousands already taken ahead of them. The slot is
    // picked by a scalar subquery, which both databases run once per statement (as `IN (…)`,
    // PostgreSQL may run it again for each candidate row and, skipping its own locks, hand
    // one annotator two slots of a task).
    let take = |free: &str, lock: &str| {
        format!(
            "UPDATE annotation_slots SET state = 'held', annotator = $1, lease_until = $2, assigned_ms = $3, generation = generation + 1
             WHERE project_id = $4 AND {free}
               AND (task_no, slot) = (
                 SELECT s.task_no, s.slot FROM annotation_slots s
                 WHERE s.project_id = $4 AND {free}
                   AND NOT EXISTS (SELECT 1 FROM annotation_slots o WHERE o.project_id = s.project_id AND o.task_no = s.task_no AND o.annotator = $1)
                 ORDER BY s.task_no, s.slot LIMIT 1{lock})
             RETURNING task_no, slot"
        )
    };
    // On PostgreSQL the first try skips slots other pulls are taking at that instant; should
    // every free one be in someone's hands, the next tries wait for them (a taken slot is then
    // passed over for the next free one) instead of spinning.
    let (skip, wait) = if postgres { (" FOR UPDATE SKIP LOCKED", " FOR UPDATE") } else { ("", "") };
    let expired = "state = 'held' AND lease_until <= $3";
    let first = [take(expired, skip), take("state = 'open'", skip)];
    let again = [take(expired, wait), take("state = 'open'", wait)];
    // A pull finds no row only when none is free for it, or when every free row was being taken
    // by other pulls at that instant: then it asks again.
    for round in 0..8 {
        for sql in if round == 0 { &first } else { &again } {
            let taken = sqlx::query(sql).bind(user).bind(now + project.lease_ms).bind(now).bind(project.id).fetch_optional(&db.pool).await;
            let row = match taken {
                Ok(row) => row,
                // The same annotator pulling twice at once: the other pull took a slot of this task.
                Err(e) if Db::is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            };
            if let Some(row) = row {
                return slot(db, project.id, row.try_get("task_no")?, row.try_get("slot")?).await.map(Some);
            }
        }
        let free = sqlx::query(
            "SELECT COUNT(*) AS n FROM annotation_slots s WHERE s.project_id = $1 AND (s.state = 'open' OR (s.state = 'held' AND s.lease_until <= $2))
               AND NOT EXISTS (SELECT 1 FROM annotation_slots o WHERE o.project_id = s.project_id AND o.task_no = s.task_no AND o.annotator = $3)",
        )
        .bind(project.id)
        .bind(now)
        .bind(user)
        .fetch_one(&db.pool)
        .await?
        .try_get::<i64, _>("n")?;
        if free == 0 {
            return Ok(None);
        }
    }
    Err(ApiError::unavailable("every free slot was being taken by someone else: ask again"))
}

/// The owner gives `slot` to `user` (open, or its lease ran out).
pub async fn push(db: &Db, project: &Project, task_no: i64, slot_no: i64, user: i64) -> ApiResult<Slot> {
    let now = now_ms();
    let s = slot(db, project.id, task_no, slot_no).await?;
    let free = s.state == SlotState::Open || (s.state == SlotState::Held && s.lease_until_ms.is_some_and(|t| t <= now));
    if !free {
        return Err(ApiError::broker(suanli_types::ErrorCode::InvalidTransition, format!("slot {slot_no} of task {task_no} is {}", s.state.as_str())));
    }
    if !take(db, project.id, &s, user, now, now + project.lease_ms).await? {
        return Err(ApiError::conflict_field("slot", "taken meanwhile, or the annotator already has a slot of this task"));
    }
    slot(db, project.id, task_no, slot_no).await
}

/// Extends the lease of a slot `user` holds; `TASK_NOT_HELD` when it is no longer theirs (it
/// went to someone else after its lease ran out). Once renewed nobody else can take it, so
/// what the holder writes next is theirs to write.
pub async fn renew(db: &Db, project: &Project, s: &Slot, user: i64) -> ApiResult<()> {
    let renewed =
        sqlx::query("UPDATE annotation_slots SET lease_until = $1 WHERE project_id = $2 AND task_no = $3 AND slot = $4 AND annotator = $5 AND state = 'held'")
            .bind(now_ms() + project.lease_ms)
            .bind(project.id)
            .bind(s.task as i64)
            .bind(s.slot as i64)
            .bind(user)
            .execute(&db.pool)
            .await?;
    if renewed.rows_affected() != 1 {
        return Err(ApiError::new(Code::TaskNotHeld, format!("slot {} of task {} is no longer yours", s.slot, s.task)));
    }
    Ok(())
}

/// Gives a held slot back to the pool.
pub async fn release(db: &Db, project: i64, s: &Slot, user: i64) -> ApiResult<()> {
    sqlx::query(
        "UPDATE annotation_slots SET state = 'open', annotator = NULL, lease_until = NULL, generation = generation + 1
         WHERE project_id = $1 AND task_no = $2 AND slot = $3 AND annotator = $4 AND state = 'held'",
    )
    .bind(project)
    .bind(s.task as i64)
    .bind(s.slot as i64)
    .bind(user)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// An annotator's saved shapes on one image of a slot.
#[derive(Clone, Debug)]
pub struct Saved {
    pub shapes: Vec<Annotation>,
    pub revision: i64,
}

pub async fn saved_work(db: &Db, project: i64, s: &Slot, user: i64) -> ApiResult<HashMap<i64, Saved>> {
    let rows = sqlx::query("SELECT image_no, shapes, revision FROM annotation_work WHERE project_id = $1 AND task_no = $2 AND slot = $3 AND annotator = $4")
        .bind(project)
        .bind(s.task as i64)
        .bind(s.slot as i64)
        .bind(user)
        .fetch_all(&db.pool)
        .await?;
    rows.iter()
        .map(|r| {
            let shapes = serde_json::from_str(&r.try_get::<String, _>("shapes")?).map_err(ApiError::internal)?;
            Ok((r.try_get("image_no")?, Saved { shapes, revision: r.try_get("revision")? }))
        })
        .collect()
}

/// Saves `shapes` as the next revision after `base` (0: the first save). A save that finds
/// its own shapes already stored at `base + 1` is a retry and gets the same answer.
pub async fn save(db: &Db, project: i64, s: &Slot, user: i64, image_no: i64, shapes: &[Annotation], base: i64) -> ApiResult<i64> {
    let next = base.checked_add(1).ok_or_else(|| ApiError::field("revision", "no image has that many revisions"))?;
    let json = serde_json::to_string(shapes).map_err(ApiError::internal)?;
    let now = now_ms();
    let applied = if base == 0 {
        let inserted = sqlx::query(
            "INSERT INTO annotation_work (project_id, task_no, slot, image_no, annotator, shapes, revision, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, 1, $7)",
        )
        .bind(project)
        .bind(s.task as i64)
        .bind(s.slot as i64)
        .bind(image_no)
        .bind(user)
        .bind(&json)
        .bind(now)
        .execute(&db.pool)
        .await;
        match inserted {
            Ok(_) => true,
            Err(e) if Db::is_unique_violation(&e) => false,
            Err(e) => return Err(e.into()),
        }
    } else {
        sqlx::query(
            "UPDATE annotation_work SET shapes = $1, revision = revision + 1, updated_ms = $2
             WHERE project_id = $3 AND task_no = $4 AND slot = $5 AND image_no = $6 AND annotator = $7 AND revision = $8",
        )
        .bind(&json)
        .bind(now)
        .bind(project)
        .bind(s.task as i64)
        .bind(s.slot as i64)
        .bind(image_no)
        .bind(user)
        .bind(base)
        .execute(&db.pool)
        .await?
        .rows_affected()
            == 1
    };
    if applied {
        return Ok(next);
    }
    let current = saved_work(db, project, s, user).await?.remove(&image_no);
    match current {
        Some(c) if c.revision == next && c.shapes == shapes => Ok(c.revision),
        Some(c) => Err(ApiError::new(Code::StaleRevision, format!("this image was saved meanwhile (revision {}); load it again before saving", c.revision))),
        None => Err(ApiError::new(Code::StaleRevision, "this image has not been saved yet: save it with revision 0")),
    }
}

/// The longest stretch of work one save may count (a tab left open overnight is not work).
pub const MAX_ACTIVE_PER_SAVE_MS: i64 = 5 * 60_000;

/// Adds the time the tool says the annotator worked since its last save, no more than the wall
/// time since that save (or since the slot was taken) and [`MAX_ACTIVE_PER_SAVE_MS`].
pub async fn add_time(db: &Db, project: i64, s: &Slot, user: i64, active_ms: i64) -> ApiResult<()> {
    let now = now_ms();
    let row = sqlx::query(
        "SELECT COALESCE((SELECT last_save_ms FROM annotation_time WHERE project_id = $1 AND annotator = $2 AND task_no = $3 AND slot = $4),
                         (SELECT assigned_ms FROM annotation_slots WHERE project_id = $1 AND task_no = $3 AND slot = $4)) AS since",
    )
    .bind(project)
    .bind(user)
    .bind(s.task as i64)
    .bind(s.slot as i64)
    .fetch_one(&db.pool)
    .await?;
    let since = opt_i64(&row, "since")?.unwrap_or(now);
    let counted = active_ms.clamp(0, MAX_ACTIVE_PER_SAVE_MS).min((now - since).max(0));
    sqlx::query(
        "INSERT INTO annotation_time (project_id, annotator, task_no, slot, active_ms, last_save_ms) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (project_id, annotator, task_no, slot) DO UPDATE SET active_ms = annotation_time.active_ms + $5, last_save_ms = $6",
    )
    .bind(project)
    .bind(user)
    .bind(s.task as i64)
    .bind(s.slot as i64)
    .bind(counted)
    .bind(now)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Submits a held slot; scores its honeypots and, when it was the task's last, compares the
/// task's images. Submitting again is a no-op.
pub async fn submit(db: &Db, project: &Project, s: &Slot, user: i64) -> ApiResult<()> {
    let done = sqlx::query(
        "UPDATE annotation_slots SET state = 'submitted', submitted_ms = $1, lease_until = NULL, generation = generation + 1
         WHERE project_id = $2 AND task_no = $3 AND slot = $4 AND annotator = $5 AND state = 'held'",
    )
    .bind(now_ms())
    .bind(project.id)
    .bind(s.task as i64)
    .bind(s.slot as i64)
    .bind(user)
    .execute(&db.pool)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(());
    }
    let numbers = task_images(db, project.id, s.task as i64).await?;
    let images = images_of(db, project.id, &numbers).await?;
    let work = saved_work(db, project.id, s, user).await?;
    for image in images.iter().filter(|i| i.honeypot) {
        let drawn = work.get(&image.image_no).map(|w| w.shapes.as_slice()).unwrap_or_default();
        let f1 = score_against_gold(image.width, image.height, drawn, &image.gold);
        record_score(db, project.id, user, image.image_no, "honeypot", f1).await?;
    }
    let open = sqlx::query("SELECT COUNT(*) AS n FROM annotation_slots WHERE project_id = $1 AND task_no = $2 AND state <> 'submitted'")
        .bind(project.id)
        .bind(s.task as i64)
        .fetch_one(&db.pool)
        .await?
        .try_get::<i64, _>("n")?;
    if open == 0 {
        compare_task(db, project, s.task as i64, &images).await?;
    }
    Ok(())
}

/// Compares every image of a complete task and then marks the task compared: a crash part way
/// leaves it unmarked, for [`compare_pending`] to finish.
async fn compare_task(db: &Db, project: &Project, task_no: i64, images: &[ProjectImage]) -> ApiResult<()> {
    for image in images.iter().filter(|i| !i.honeypot) {
        compare_and_record(db, project, task_no, image).await?;
    }
    sqlx::query("UPDATE annotation_tasks SET compared_ms = $1 WHERE project_id = $2 AND task_no = $3")
        .bind(now_ms())
        .bind(project.id)
        .bind(task_no)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Compares the complete tasks whose comparison never finished (the portal stopped between the
/// last submit and the end of [`compare_task`]); reviewers' lists and exports call it first, so
/// no complete image is missing from them. Returns how many tasks it compared.
pub async fn compare_pending(db: &Db, project: &Project) -> ApiResult<usize> {
    let rows = sqlx::query(
        "SELECT t.task_no FROM annotation_tasks t WHERE t.project_id = $1 AND t.compared_ms IS NULL
         AND NOT EXISTS (SELECT 1 FROM annotation_slots s WHERE s.project_id = t.project_id AND s.task_no = t.task_no AND s.state <> 'submitted')",
    )
    .bind(project.id)
    .fetch_all(&db.pool)
    .await?;
    for r in &rows {
        let task_no: i64 = r.try_get("task_no")?;
        let images = images_of(db, project.id, &task_images(db, project.id, task_no).await?).await?;
        compare_task(db, project, task_no, &images).await?;
    }
    Ok(rows.len())
}

async fn record_score(db: &Db, project: i64, user: i64, image_no: i64, kind: &str, f1: f64) -> ApiResult<()> {
    sqlx::query(
        "INSERT INTO annotation_scores (project_id, annotator, image_no, kind, f1_ppm) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (project_id, annotator, kind, image_no) DO UPDATE SET f1_ppm = $5",
    )
    .bind(project)
    .bind(user)
    .bind(image_no)
    .bind(kind)
    .bind(ppm(f1))
    .execute(&db.pool)
    .await?;
    Ok(())
}

fn ppm(score: f64) -> i64 {
    (score * 1e6).round() as i64
}

/// Every submitted annotator's shapes on one (complete) image, in slot order: `(annotator,
/// shapes)`.
pub async fn works_on(db: &Db, project: i64, task_no: i64, image_no: i64) -> ApiResult<Vec<(i64, Vec<Annotation>)>> {
    let rows = sqlx::query(
        "SELECT s.annotator, w.shapes FROM annotation_slots s
         LEFT JOIN annotation_work w ON w.project_id = s.project_id AND w.task_no = s.task_no AND w.slot = s.slot AND w.annotator = s.annotator AND w.image_no = $3
         WHERE s.project_id = $1 AND s.task_no = $2 AND s.state = 'submitted' ORDER BY s.slot",
    )
    .bind(project)
    .bind(task_no)
    .bind(image_no)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            let shapes = opt_str(r, "shapes")?.map(|s| serde_json::from_str(&s)).transpose().map_err(ApiError::internal)?.unwrap_or_default();
            Ok((r.try_get("annotator")?, shapes))
        })
        .collect()
}

/// What a reviewer decided on an image, by conflict key.
pub async fn decisions_on(db: &Db, project: i64, image_no: i64) -> ApiResult<HashMap<String, Decision>> {
    let rows = sqlx::query("SELECT conflict_key, decision FROM annotation_decisions WHERE project_id = $1 AND image_no = $2")
        .bind(project)
        .bind(image_no)
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(|r| Ok((r.try_get("conflict_key")?, serde_json::from_str(&r.try_get::<String, _>("decision")?).map_err(ApiError::internal)?))).collect()
}

/// Compares a complete image's work and records the result, each pair's agreement, and the
/// reviewed shapes' label counts (replacing what an earlier comparison recorded).
pub async fn compare_and_record(db: &Db, project: &Project, task_no: i64, image: &ProjectImage) -> ApiResult<()> {
    let works = works_on(db, project.id, task_no, image.image_no).await?;
    let views: Vec<Work<'_>> = works.iter().map(|(a, shapes)| Work { annotator: *a as u64, shapes }).collect();
    let result = compare_image(image.width, image.height, &views);
    // Two reviewers deciding on one image at once: each writes the result of the decisions it
    // read, and then reads them again; whoever read a set that has changed since writes again,
    // so the last result written is that of every decision.
    let mut decisions = decisions_on(db, project.id, image.image_no).await?;
    loop {
        record_result(db, project, task_no, image, &result, &views, &decisions).await?;
        let now = decisions_on(db, project.id, image.image_no).await?;
        if now == decisions {
            break;
        }
        decisions = now;
    }
    // Each annotator's agreement with each other one on this image.
    for (a, _) in &works {
        let mine: Vec<f64> = result.pairs.iter().filter(|p| p.a == *a as u64 || p.b == *a as u64).map(|p| p.f1).collect();
        if !mine.is_empty() {
            record_score(db, project.id, *a, image.image_no, "peer", mine.iter().sum::<f64>() / mine.len() as f64).await?;
        }
    }
    Ok(())
}

/// Writes one image's result (reviewed shapes, agreement, conflicts left) and label counts.
async fn record_result(
    db: &Db,
    project: &Project,
    task_no: i64,
    image: &ProjectImage,
    result: &ImageAgreement,
    views: &[Work<'_>],
    decisions: &HashMap<String, Decision>,
) -> ApiResult<()> {
    let (shapes, undecided) = agreement::reviewed_shapes(result, views, decisions);
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO annotation_results (project_id, image_no, task_no, agreement_ppm, conflicts, undecided, shapes, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (project_id, image_no) DO UPDATE SET agreement_ppm = $4, conflicts = $5, undecided = $6, shapes = $7, updated_ms = $8",
    )
    .bind(project.id)
    .bind(image.image_no)
    .bind(task_no)
    .bind(result.score.map(ppm))
    .bind(result.conflicts().count() as i64)
    .bind(undecided.len() as i64)
    .bind(serde_json::to_string(&shapes).map_err(ApiError::internal)?)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM annotation_labels WHERE project_id = $1 AND image_no = $2").bind(project.id).bind(image.image_no).execute(&mut *tx).await?;
    let mut labels: HashMap<&str, i64> = HashMap::new();
    for s in &shapes {
        *labels.entry(s.label.as_str()).or_default() += 1;
    }
    for (label, count) in labels {
        sqlx::query("INSERT INTO annotation_labels (project_id, image_no, label, shapes) VALUES ($1, $2, $3, $4)")
            .bind(project.id)
            .bind(image.image_no)
            .bind(label)
            .bind(count)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// A dataset object as a shape the tool shows (pre-annotations, honeypots' known labels).
pub fn from_object(index: usize, object: &Object) -> Annotation {
    let geometry = match &object.shape {
        Shape::Box { x, y, w, h } => Geometry::Box { x: *x, y: *y, w: *w, h: *h },
        Shape::Polygon { points } => Geometry::Polygon { points: points.clone() },
        Shape::Points { points } => Geometry::Points { points: points.clone() },
        Shape::Mask { rle } => Geometry::Mask { rle: rle.clone() },
    };
    Annotation { id: format!("pre{index}"), label: object.category.clone(), geometry, attributes: Default::default(), score: object.score }
}

/// A reviewed shape as a dataset object; `None` for polylines, which the COCO/VOC/YOLO model
/// has no place for (an export counts them as left out).
pub fn to_object(shape: &Annotation) -> Option<Object> {
    let shape_of = match &shape.geometry {
        Geometry::Box { x, y, w, h } => Shape::Box { x: *x, y: *y, w: *w, h: *h },
        Geometry::Polygon { points } => Shape::Polygon { points: points.clone() },
        Geometry::Points { points } => Shape::Points { points: points.clone() },
        Geometry::Mask { rle } => Shape::Mask { rle: rle.clone() },
        Geometry::Polyline { .. } => return None,
    };
    Some(Object { category: shape.label.clone(), shape: shape_of, score: None })
}
