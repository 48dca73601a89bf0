//! The durable outbox: every email is recorded (recipient and body sealed, they are personal
//! data) before anything is sent, then delivered by a worker that retries with backoff until the
//! relay takes it or it expires. The row ID is the Message-ID, so a retry after a crash between
//! "sent" and "marked sent" reaches the recipient as the same message.

use std::time::Duration;

use sqlx::Row;
use suanli_notify::Email;

use crate::db::{new_id, now_ms};
use crate::error::ApiResult;
use crate::state::AppState;

/// How long a message is retried before it is given up.
const EXPIRE_AFTER_MS: i64 = 24 * 3600 * 1000;

pub async fn queue_email<'e, E>(state: &AppState, executor: E, to: &str, subject: &str, text: &str) -> ApiResult<String>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let id = format!("m{:016x}", new_id());
    let now = now_ms();
    sqlx::query(
        "INSERT INTO outbox (id, channel, recipient_enc, subject, body_enc, state, attempts, next_attempt_ms, created_ms)
         VALUES ($1, 'email', $2, $3, $4, 'pending', 0, $5, $6)",
    )
    .bind(&id)
    .bind(state.keys.seal(to))
    .bind(subject)
    .bind(state.keys.seal(text))
    .bind(now)
    .bind(now)
    .execute(executor)
    .await?;
    Ok(id)
}

fn backoff(attempts: i64) -> Duration {
    Duration::from_secs(1u64 << attempts.clamp(0, 9) as u64).min(Duration::from_secs(600))
}

/// Delivers what is due, then sleeps until woken or the next retry. Runs for the portal's life.
pub fn spawn_worker(state: AppState) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let wait = match deliver_due(&state).await {
                Ok(n) if n > 0 => Duration::ZERO,
                Ok(_) => Duration::from_secs(1),
                Err(e) => {
                    tracing::warn!("outbox: {}", e.message);
                    Duration::from_secs(2)
                }
            };
            if !wait.is_zero() {
                let _ = tokio::time::timeout(wait, state.outbox_wake.notified()).await;
            }
        }
    })
}

/// One pass over due messages; returns how many were attempted.
pub async fn deliver_due(state: &AppState) -> ApiResult<usize> {
    let now = now_ms();
    let rows = sqlx::query(
        "SELECT id, recipient_enc, subject, body_enc, attempts, created_ms FROM outbox
         WHERE state = 'pending' AND next_attempt_ms <= $1 ORDER BY next_attempt_ms LIMIT 20",
    )
    .bind(now)
    .fetch_all(&state.db.pool)
    .await?;
    for row in &rows {
        let id: String = row.try_get("id")?;
        let attempts: i64 = row.try_get("attempts")?;
        let created: i64 = row.try_get("created_ms")?;
        let email = Email {
            id: id.clone(),
            to: state.keys.open(&row.try_get::<String, _>("recipient_enc")?)?,
            subject: row.try_get("subject")?,
            text: state.keys.open(&row.try_get::<String, _>("body_enc")?)?,
            html: None,
        };
        let outcome = match &state.mailer {
            Some(mailer) => mailer.send(&email).await,
            None => {
                // No relay configured (the embedded default): the mail goes to the log instead.
                tracing::info!(to = %email.to, subject = %email.subject, "mail (no SMTP relay configured):\n{}", email.text);
                Ok(())
            }
        };
        match outcome {
            Ok(()) => {
                sqlx::query("UPDATE outbox SET state = 'sent', sent_ms = $1, attempts = $2, last_error = NULL WHERE id = $3")
                    .bind(now_ms())
                    .bind(attempts + 1)
                    .bind(&id)
                    .execute(&state.db.pool)
                    .await?;
            }
            Err(e) => {
                let give_up = !e.is_retryable() || now - created > EXPIRE_AFTER_MS;
                let next = now + backoff(attempts + 1).as_millis() as i64;
                tracing::warn!(%id, attempts = attempts + 1, give_up, "mail not delivered: {e}");
                sqlx::query("UPDATE outbox SET state = $1, attempts = $2, next_attempt_ms = $3, last_error = $4 WHERE id = $5")
                    .bind(if give_up { "failed" } else { "pending" })
                    .bind(attempts + 1)
                    .bind(next)
                    .bind(e.to_string())
                    .bind(&id)
                    .execute(&state.db.pool)
                    .await?;
            }
        }
    }
    Ok(rows.len())
}
