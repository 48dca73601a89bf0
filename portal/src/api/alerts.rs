//! A user's alerts and how they want to receive them.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::ApiJson;
use crate::alerts::{alerts_of, AlertView};
use crate::auth::Principal;
use crate::db::{opt_i64, opt_str};
use crate::error::{ApiResult, Problems};
use crate::state::AppState;

#[utoipa::path(get, path = "/api/v1/me/alerts", tag = "accounts", responses((status = 200, body = [AlertView]), (status = 401, body = crate::error::ErrorBody)))]
pub async fn list(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<Vec<AlertView>>> {
    Ok(axum::Json(alerts_of(&state, principal.user.0).await?))
}

#[derive(Serialize, Deserialize, ToSchema, Default, Clone)]
pub struct NotificationSettings {
    pub email: bool,
    pub sms: bool,
    /// Receives signed POSTs (see crates/notify/src/webhook.rs); empty: none.
    #[serde(default)]
    pub webhook_url: String,
    /// Write-only: never returned. Required with a new webhook URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
    /// `HH:MM-HH:MM` in China Standard Time (UTC+8), or empty.
    #[serde(default)]
    pub quiet_hours: String,
}

fn hhmm(s: &str) -> Option<i64> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    ((0..24).contains(&h) && (0..60).contains(&m)).then_some(h * 60 + m)
}

fn show(min: i64) -> String {
    format!("{:02}:{:02}", min / 60, min % 60)
}

pub async fn settings_of(state: &AppState, user: i64) -> ApiResult<NotificationSettings> {
    let row = sqlx::query("SELECT email_on, sms_on, webhook_enc, quiet_start_min, quiet_end_min FROM notify_prefs WHERE user_id = $1")
        .bind(user)
        .fetch_optional(&state.db.pool)
        .await?;
    let Some(r) = row else { return Ok(NotificationSettings { email: true, sms: true, ..Default::default() }) };
    let webhook: Option<serde_json::Value> = opt_str(&r, "webhook_enc")?.map(|s| state.keys.open(&s)).transpose()?.and_then(|s| serde_json::from_str(&s).ok());
    Ok(NotificationSettings {
        email: r.try_get::<i64, _>("email_on")? == 1,
        sms: r.try_get::<i64, _>("sms_on")? == 1,
        webhook_url: webhook.as_ref().and_then(|w| w["url"].as_str()).unwrap_or_default().to_owned(),
        webhook_secret: None,
        quiet_hours: match (opt_i64(&r, "quiet_start_min")?, opt_i64(&r, "quiet_end_min")?) {
            (Some(a), Some(b)) => format!("{}-{}", show(a), show(b)),
            _ => String::new(),
        },
    })
}

#[utoipa::path(get, path = "/api/v1/me/notifications", tag = "accounts", responses((status = 200, body = NotificationSettings), (status = 401, body = crate::error::ErrorBody)))]
pub async fn get_settings(State(state): State<AppState>, principal: Principal) -> ApiResult<axum::Json<NotificationSettings>> {
    Ok(axum::Json(settings_of(&state, principal.user.0).await?))
}

#[utoipa::path(put, path = "/api/v1/me/notifications", request_body = NotificationSettings, tag = "accounts",
    responses((status = 200, body = NotificationSettings), (status = 400, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody)))]
pub async fn put_settings(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(req): ApiJson<NotificationSettings>,
) -> ApiResult<axum::Json<NotificationSettings>> {
    let mut p = Problems::default();
    let quiet = match req.quiet_hours.trim() {
        "" => None,
        q => match q.split_once('-').and_then(|(a, b)| hhmm(a).zip(hhmm(b))) {
            Some(pair) => Some(pair),
            None => {
                p.add("quiet_hours", "HH:MM-HH:MM, e.g. 22:00-07:30");
                None
            }
        },
    };
    let url = req.webhook_url.trim();
    let webhook = if url.is_empty() {
        None
    } else {
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() > 2048 {
            p.add("webhook_url", "an http(s) URL");
        } else if let Err(e) = state.notifiers.webhooks.destination(url).await {
            // Checked again at every delivery (a name can be re-pointed); said here first.
            p.add("webhook_url", e.to_string());
        }
        match req.webhook_secret.as_deref().map(str::trim) {
            Some(s) if s.len() >= 16 && s.len() <= 256 => Some(serde_json::json!({"url": url, "secret": s}).to_string()),
            _ => {
                p.add("webhook_secret", "16 to 256 characters, to sign each delivery with");
                None
            }
        }
    };
    p.finish()?;
    let user = principal.user.0;
    let mut tx = state.db.pool.begin().await?;
    sqlx::query("DELETE FROM notify_prefs WHERE user_id = $1").bind(user).execute(&mut *tx).await?;
    sqlx::query("INSERT INTO notify_prefs (user_id, email_on, sms_on, webhook_enc, quiet_start_min, quiet_end_min) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(user)
        .bind(i64::from(req.email))
        .bind(i64::from(req.sms))
        .bind(webhook.map(|w| state.keys.seal(&w)))
        .bind(quiet.map(|q| q.0))
        .bind(quiet.map(|q| q.1))
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(axum::Json(settings_of(&state, user).await?))
}
