//! Operators: the review queue for organisation accounts, roles, the audit log.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::{IntoParams, ToSchema};

use super::accounts::open_market_account;
use super::{ApiJson, ApiPath, ApiQuery};
use crate::auth::{Operator, Principal};
use crate::db::{now_ms, opt_str};
use crate::error::{ApiError, ApiResult, Code};
use crate::model::{role_conflict, AccountState, Permission, Role, UserId, UserKind, UserType};
use crate::state::AppState;

#[derive(Serialize, ToSchema)]
pub struct ReviewItem {
    pub user_id: String,
    pub username: String,
    pub kind: UserKind,
    pub user_type: UserType,
    pub org_name: Option<String>,
    pub credit_code: Option<String>,
    pub contact_name: Option<String>,
    pub licence_filename: Option<String>,
    pub licence_content_type: Option<String>,
    pub registered_ms: i64,
}

pub async fn reviews_of(state: &AppState, p: &Principal) -> ApiResult<Vec<ReviewItem>> {
    p.require(Permission::ReviewAccounts)?;
    let rows = sqlx::query(
        "SELECT u.id, u.username, u.kind, u.user_type, u.profile_enc, u.real_name_enc, u.created_ms, l.filename, l.content_type
         FROM users u LEFT JOIN licences l ON l.user_id = u.id WHERE u.state = 'pending_review' ORDER BY u.created_ms",
    )
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        let profile: super::accounts::Profile = serde_json::from_str(&state.keys.open(&r.try_get::<String, _>("profile_enc")?)?).unwrap_or_default();
        out.push(ReviewItem {
            user_id: r.try_get::<i64, _>("id")?.to_string(),
            username: r.try_get("username")?,
            kind: UserKind::parse(&r.try_get::<String, _>("kind")?).unwrap_or(UserKind::Researcher),
            user_type: UserType::parse(&r.try_get::<String, _>("user_type")?).unwrap_or(UserType::Enterprise),
            org_name: profile.org_name,
            credit_code: profile.credit_code,
            contact_name: opt_str(&r, "real_name_enc")?.map(|s| state.keys.open(&s)).transpose()?,
            licence_filename: opt_str(&r, "filename")?,
            licence_content_type: opt_str(&r, "content_type")?,
            registered_ms: r.try_get("created_ms")?,
        });
    }
    Ok(out)
}

#[utoipa::path(get, path = "/api/v1/operator/reviews", tag = "operator",
    responses((status = 200, body = [ReviewItem]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_reviews(State(state): State<AppState>, Operator(principal): Operator) -> ApiResult<axum::Json<Vec<ReviewItem>>> {
    Ok(axum::Json(reviews_of(&state, &principal).await?))
}

#[derive(Deserialize, ToSchema)]
pub struct ReviewDecision {
    pub approve: bool,
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReviewOutcome {
    pub state: AccountState,
}

#[utoipa::path(post, path = "/api/v1/operator/reviews/{user_id}", params(("user_id" = String, Path)), request_body = ReviewDecision, tag = "operator",
    responses((status = 200, body = ReviewOutcome), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn decide_review(
    State(state): State<AppState>,
    Operator(principal): Operator,
    ApiPath(user_id): ApiPath<String>,
    ApiJson(req): ApiJson<ReviewDecision>,
) -> ApiResult<axum::Json<ReviewOutcome>> {
    principal.require(Permission::ReviewAccounts)?;
    let id: i64 = user_id.parse().map_err(|_| ApiError::not_found("account"))?;
    let row = sqlx::query("SELECT kind FROM users WHERE id = $1 AND state = 'pending_review'").bind(id).fetch_optional(&state.db.pool).await?;
    let row = row.ok_or_else(|| ApiError::not_found("account waiting for review"))?;
    let note: String = req.note.unwrap_or_default().chars().take(500).collect();
    sqlx::query("UPDATE users SET review_note = $1 WHERE id = $2").bind(&note).bind(id).execute(&state.db.pool).await?;
    if !req.approve {
        sqlx::query("UPDATE users SET state = 'rejected' WHERE id = $1").bind(id).execute(&state.db.pool).await?;
        return Ok(axum::Json(ReviewOutcome { state: AccountState::Rejected }));
    }
    let kind = UserKind::parse(&row.try_get::<String, _>("kind")?).unwrap_or(UserKind::Researcher);
    open_market_account(&state, UserId(id), kind).await?;
    Ok(axum::Json(ReviewOutcome { state: AccountState::Active }))
}

#[derive(Serialize, ToSchema)]
pub struct UserSummary {
    pub user_id: String,
    pub username: String,
    pub kind: UserKind,
    pub state: AccountState,
    #[schema(value_type = Vec<String>)]
    pub roles: Vec<Role>,
}

#[utoipa::path(get, path = "/api/v1/operator/users", tag = "operator",
    responses((status = 200, body = [UserSummary]), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn list_operators(State(state): State<AppState>, Operator(principal): Operator) -> ApiResult<axum::Json<Vec<UserSummary>>> {
    Ok(axum::Json(operators_of(&state, &principal).await?))
}

pub async fn operators_of(state: &AppState, p: &Principal) -> ApiResult<Vec<UserSummary>> {
    p.require(Permission::ManageRoles)?;
    let rows = sqlx::query("SELECT id, username, kind, state FROM users WHERE kind = 'operator' ORDER BY username").fetch_all(&state.db.pool).await?;
    let mut out = Vec::new();
    for r in rows {
        let id: i64 = r.try_get("id")?;
        let roles = sqlx::query("SELECT role FROM roles WHERE user_id = $1 ORDER BY role").bind(id).fetch_all(&state.db.pool).await?;
        out.push(UserSummary {
            user_id: id.to_string(),
            username: r.try_get("username")?,
            kind: UserKind::Operator,
            state: AccountState::parse(&r.try_get::<String, _>("state")?).unwrap_or(AccountState::Active),
            roles: roles.iter().filter_map(|x| x.try_get::<String, _>("role").ok().and_then(|s| Role::parse(&s))).collect(),
        });
    }
    Ok(out)
}

#[derive(Deserialize, ToSchema)]
pub struct RolesRequest {
    /// The operator's complete set of roles.
    #[schema(value_type = Vec<String>)]
    pub roles: Vec<Role>,
}

/// Replaces an operator's roles; mutually exclusive pairs are refused, and nobody changes their
/// own roles (a system administrator cannot make themselves an auditor or dispatcher).
pub async fn set_roles_of(state: &AppState, p: &Principal, target: i64, roles: &[Role]) -> ApiResult<()> {
    p.require(Permission::ManageRoles)?;
    if target == p.user.0 {
        return Err(ApiError::forbidden("nobody changes their own roles"));
    }
    if let Some((a, b)) = role_conflict(roles) {
        return Err(ApiError::new(Code::RoleConflict, format!("{} and {} may not be held together", a.as_str(), b.as_str())));
    }
    let row = sqlx::query("SELECT kind FROM users WHERE id = $1 AND state = 'active'").bind(target).fetch_optional(&state.db.pool).await?;
    match row {
        Some(r) if r.try_get::<String, _>("kind")? == "operator" => {}
        _ => return Err(ApiError::not_found("operator")),
    }
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM roles WHERE user_id = $1").bind(target).execute(&mut *tx).await?;
    for role in roles {
        sqlx::query("INSERT INTO roles (user_id, role, granted_by, granted_ms) VALUES ($1, $2, $3, $4)")
            .bind(target)
            .bind(role.as_str())
            .bind(p.user.0)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[utoipa::path(put, path = "/api/v1/operator/users/{user_id}/roles", params(("user_id" = String, Path)), request_body = RolesRequest, tag = "operator",
    responses((status = 204), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody), (status = 404, body = crate::error::ErrorBody)))]
pub async fn set_roles(
    State(state): State<AppState>,
    Operator(principal): Operator,
    ApiPath(user_id): ApiPath<String>,
    ApiJson(req): ApiJson<RolesRequest>,
) -> ApiResult<StatusCode> {
    let target: i64 = user_id.parse().map_err(|_| ApiError::not_found("operator"))?;
    set_roles_of(&state, &principal, target, &req.roles).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Username of the actor.
    pub actor: Option<String>,
    /// Substring of the action, e.g. `POST /api/v1/leases`.
    pub action: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// At most 500, default 100.
    pub limit: Option<u32>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEntry {
    pub at_ms: i64,
    pub actor: Option<String>,
    pub action: String,
    pub target: String,
    pub outcome: String,
    pub source: String,
}

pub async fn audit_of(state: &AppState, p: &Principal, q: &AuditQuery) -> ApiResult<Vec<AuditEntry>> {
    p.require(Permission::ReadAudit)?;
    let limit = i64::from(q.limit.unwrap_or(100).clamp(1, 500));
    let action = q.action.as_deref().map(|a| a.trim().chars().take(100).collect::<String>()).unwrap_or_default();
    let actor = q.actor.as_deref().map(str::trim).unwrap_or("");
    // LIKE wildcards in the user's text are matched literally.
    let pattern = format!("%{}%", action.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_"));
    let rows = sqlx::query(
        "SELECT a.at_ms, a.action, a.target, a.outcome, a.source, u.username FROM audit_log a LEFT JOIN users u ON u.id = a.actor_id
         WHERE a.at_ms >= $1 AND a.at_ms <= $2 AND a.action LIKE $3 ESCAPE '\\' AND ($4 = '' OR u.username = $4)
         ORDER BY a.at_ms DESC, a.id LIMIT $5",
    )
    .bind(q.from_ms.unwrap_or(0))
    .bind(q.to_ms.unwrap_or(i64::MAX))
    .bind(pattern)
    .bind(actor)
    .bind(limit)
    .fetch_all(&state.db.pool)
    .await?;
    let mut out = Vec::new();
    for r in rows {
        out.push(AuditEntry {
            at_ms: r.try_get("at_ms")?,
            actor: opt_str(&r, "username")?,
            action: r.try_get("action")?,
            target: r.try_get("target")?,
            outcome: r.try_get("outcome")?,
            source: r.try_get("source")?,
        });
    }
    Ok(out)
}

#[utoipa::path(get, path = "/api/v1/operator/audit", params(AuditQuery), tag = "operator",
    responses((status = 200, body = [AuditEntry]), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)))]
pub async fn audit(State(state): State<AppState>, Operator(principal): Operator, ApiQuery(q): ApiQuery<AuditQuery>) -> ApiResult<axum::Json<Vec<AuditEntry>>> {
    Ok(axum::Json(audit_of(&state, &principal, &q).await?))
}
