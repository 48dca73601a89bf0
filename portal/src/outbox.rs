//! The durable outbox: every email, SMS and webhook delivery is recorded (recipient and body
//! sealed, they are personal data) before anything is sent, then delivered by a worker that
//! retries with backoff until the relay takes it or it expires. The row ID is the Message-ID (the
//! SMS `OutId`, the webhook event ID), so a retry after a crash between "sent" and "marked sent"
//! reaches the recipient as the same message.

use std::time::Duration;

use sqlx::Row;
use suanli_notify::sms::{Sms, SmsProvider};
use suanli_notify::webhook::WebhookEvent;
use suanli_notify::Email;

use crate::db::{new_id, now_ms};
use crate::error::ApiResult;
use crate::state::AppState;

/// How long a worker holds a message it is sending before another may try it.
const CLAIM_MS: i64 = 15_000;

/// How long a message is retried before it is given up.
const EXPIRE_AFTER_MS: i64 = 24 * 3600 * 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Email,
    Sms,
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Sms => "sms",
            Channel::Webhook => "webhook",
        }
    }
}

/// One message to record. `recipient`: an address, a mobile number, or for webhooks the JSON
/// `{"url", "secret"}`.
pub struct Outgoing<'a> {
    pub channel: Channel,
    pub recipient: &'a str,
    pub subject: &'a str,
    pub body: &'a str,
    pub user_id: Option<i64>,
    pub alert_id: Option<i64>,
    /// Not before (quiet hours, rate limits); `None`: now.
    pub not_before_ms: Option<i64>,
}

pub async fn queue<'e, E>(state: &AppState, executor: E, m: &Outgoing<'_>) -> ApiResult<String>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let id = format!("m{:016x}", new_id());
    let now = now_ms();
    sqlx::query(
        "INSERT INTO outbox (id, channel, recipient_enc, subject, body_enc, state, attempts, next_attempt_ms, created_ms, user_id, alert_id)
         VALUES ($1, $2, $3, $4, $5, 'pending', 0, $6, $7, $8, $9)",
    )
    .bind(&id)
    .bind(m.channel.as_str())
    .bind(state.keys.seal(m.recipient))
    .bind(m.subject)
    .bind(state.keys.seal(m.body))
    .bind(m.not_before_ms.unwrap_or(now).max(now))
    .bind(now)
    .bind(m.user_id)
    .bind(m.alert_id)
    .execute(executor)
    .await?;
    Ok(id)
}

pub async fn queue_email<'e, E>(state: &AppState, executor: E, to: &str, subject: &str, text: &str) -> ApiResult<String>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    queue(state, executor, &Outgoing { channel: Channel::Email, recipient: to, subject, body: text, user_id: None, alert_id: None, not_before_ms: None }).await
}

fn crash_after_send() -> bool {
    static FAILPOINT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAILPOINT.get_or_init(|| std::env::var("SUANLI_PORTAL_FAILPOINT").is_ok_and(|v| v == "crash-after-send"))
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
        "SELECT id, channel, recipient_enc, subject, body_enc, attempts, created_ms, next_attempt_ms FROM outbox
         WHERE state = 'pending' AND next_attempt_ms <= $1 ORDER BY next_attempt_ms LIMIT 20",
    )
    .bind(now)
    .fetch_all(&state.db.pool)
    .await?;
    for row in &rows {
        let id: String = row.try_get("id")?;
        let attempts: i64 = row.try_get("attempts")?;
        // Claim the row first, so two portals (replicas, or an old process not yet gone) never
        // send it at the same time; a claim a crashed worker leaves behind lapses after CLAIM_MS.
        let claimed = sqlx::query("UPDATE outbox SET next_attempt_ms = $1 WHERE id = $2 AND state = 'pending' AND next_attempt_ms = $3")
            .bind(now + CLAIM_MS)
            .bind(&id)
            .bind(row.try_get::<i64, _>("next_attempt_ms")?)
            .execute(&state.db.pool)
            .await?;
        if claimed.rows_affected() != 1 {
            continue;
        }
        let created: i64 = row.try_get("created_ms")?;
        let recipient = state.keys.open(&row.try_get::<String, _>("recipient_enc")?)?;
        let subject: String = row.try_get("subject")?;
        let text = state.keys.open(&row.try_get::<String, _>("body_enc")?)?;
        let outcome = match row.try_get::<String, _>("channel")?.as_str() {
            "sms" => match &state.notifiers.sms {
                Some(gateway) => {
                    let params = std::collections::BTreeMap::from([("title".to_owned(), subject.clone())]);
                    gateway.send(&Sms { id: id.clone(), to: recipient, text, params }).await
                }
                None => Err(suanli_notify::NotifyError::Config("no SMS gateway is configured".into())),
            },
            "webhook" => {
                let target: serde_json::Value = serde_json::from_str(&recipient).unwrap_or_default();
                let event = WebhookEvent { id: id.clone(), attempt: attempts as u32 + 1, body: text };
                state.notifiers.webhooks.send(target["url"].as_str().unwrap_or_default(), target["secret"].as_str().unwrap_or_default(), &event).await
            }
            _ => {
                let email = Email { id: id.clone(), to: recipient, subject, text, html: None };
                match &state.mailer {
                    Some(mailer) => mailer.send(&email).await,
                    None => {
                        // No relay configured (the embedded default): the mail goes to the log instead.
                        tracing::info!(to = %email.to, subject = %email.subject, "mail (no SMTP relay configured):\n{}", email.text);
                        Ok(())
                    }
                }
            }
        };
        match outcome {
            Ok(()) if crash_after_send() => {
                // Fail point for the redelivery test: the relay has the message, the outbox does
                // not know yet — the crash a real process can have at exactly this line.
                tracing::error!(%id, "SUANLI_PORTAL_FAILPOINT=crash-after-send: exiting before marking the message sent");
                std::process::exit(86);
            }
            Ok(()) => {
                sqlx::query("UPDATE outbox SET state = 'sent', sent_ms = $1, attempts = $2, last_error = NULL WHERE id = $3 AND state = 'pending'")
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
                sqlx::query("UPDATE outbox SET state = $1, attempts = $2, next_attempt_ms = $3, last_error = $4 WHERE id = $5 AND state = 'pending'")
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
