//! The portal's database: SQLite (embedded default) or PostgreSQL (production), through one
//! set of runtime-checked queries over sqlx's `Any` driver.
//!
//! Why runtime-checked `Any` queries rather than `query!` macros or a query layer per backend:
//! the macros check against one live database at compile time, which would make every build
//! need a running server and would still only check one of the two backends; a layer per backend
//! doubles every query. Instead the SQL is written once in the common subset of both dialects
//! (TEXT and BIGINT columns only, `$n` placeholders in order — SQLite reads `$1` as parameter 1),
//! and the whole suite runs against both backends (PostgreSQL where `SUANLI_TEST_POSTGRES_URL`
//! is set, which `.ci/run` does).

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A random positive 63-bit row ID: IDs reveal neither how many rows exist nor their order.
pub fn new_id() -> i64 {
    (rand::random::<u64>() >> 1).max(1) as i64
}

/// Schema migrations, in order; each runs once, in a transaction, recorded in `portal_schema`.
/// The schema version this portal writes: how many migrations it has.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

const MIGRATIONS: &[&[&str]] = &[&[
    "CREATE TABLE users (
        id BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,
        user_type TEXT NOT NULL,
        username TEXT NOT NULL UNIQUE,
        email_hash TEXT NOT NULL UNIQUE,
        email_enc TEXT NOT NULL,
        phone_hash TEXT UNIQUE,
        phone_enc TEXT,
        password_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        real_name_enc TEXT,
        id_number_hash TEXT,
        profile_enc TEXT NOT NULL,
        lang TEXT NOT NULL,
        broker_account_id BIGINT,
        broker_token_enc TEXT,
        totp_secret_enc TEXT,
        totp_enabled BIGINT NOT NULL,
        review_note TEXT,
        created_ms BIGINT NOT NULL,
        activated_ms BIGINT,
        deregistered_ms BIGINT
    )",
    "CREATE TABLE email_tokens (
        token_hash TEXT PRIMARY KEY,
        user_id BIGINT NOT NULL,
        purpose TEXT NOT NULL,
        expires_ms BIGINT NOT NULL,
        used_ms BIGINT
    )",
    "CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,
        user_id BIGINT NOT NULL,
        csrf TEXT NOT NULL,
        mfa_ok BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        idle_until_ms BIGINT NOT NULL
    )",
    "CREATE INDEX sessions_by_user ON sessions (user_id)",
    "CREATE TABLE api_tokens (
        id BIGINT PRIMARY KEY,
        token_hash TEXT NOT NULL UNIQUE,
        user_id BIGINT NOT NULL,
        name TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        last_used_ms BIGINT,
        revoked_ms BIGINT
    )",
    "CREATE TABLE roles (
        user_id BIGINT NOT NULL,
        role TEXT NOT NULL,
        granted_by BIGINT,
        granted_ms BIGINT NOT NULL,
        PRIMARY KEY (user_id, role)
    )",
    "CREATE TABLE audit_log (
        id BIGINT PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        actor_id BIGINT,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        outcome TEXT NOT NULL,
        detail TEXT NOT NULL,
        source TEXT NOT NULL
    )",
    "CREATE INDEX audit_by_time ON audit_log (at_ms)",
    "CREATE TABLE login_throttle (
        throttle_key TEXT PRIMARY KEY,
        failures BIGINT NOT NULL,
        window_start_ms BIGINT NOT NULL
    )",
    "CREATE TABLE licences (
        user_id BIGINT PRIMARY KEY,
        filename TEXT NOT NULL,
        content_type TEXT NOT NULL,
        data_enc TEXT NOT NULL
    )",
    "CREATE TABLE ssh_keys (
        id BIGINT PRIMARY KEY,
        user_id BIGINT NOT NULL,
        public_key TEXT NOT NULL,
        added_ms BIGINT NOT NULL
    )",
    "CREATE TABLE auth_codes (
        lease_id BIGINT PRIMARY KEY,
        supplier_user_id BIGINT NOT NULL,
        code_enc TEXT NOT NULL,
        created_ms BIGINT NOT NULL
    )",
    "CREATE TABLE outbox (
        id TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        recipient_enc TEXT NOT NULL,
        subject TEXT NOT NULL,
        body_enc TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts BIGINT NOT NULL,
        next_attempt_ms BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        sent_ms BIGINT,
        last_error TEXT
    )",
    "CREATE INDEX outbox_due ON outbox (state, next_attempt_ms)",
],
// 2: the last TOTP step used per user (no replay of a code within its window).
&["ALTER TABLE users ADD COLUMN totp_last_step BIGINT"],
// 3: alerts, who receives them, how, and where the alert engine is in the broker's events.
&[
    "ALTER TABLE outbox ADD COLUMN user_id BIGINT",
    "ALTER TABLE outbox ADD COLUMN alert_id BIGINT",
    "CREATE INDEX outbox_by_user ON outbox (user_id, created_ms)",
    "CREATE TABLE notify_prefs (
        user_id BIGINT PRIMARY KEY,
        email_on BIGINT NOT NULL,
        sms_on BIGINT NOT NULL,
        webhook_enc TEXT,
        quiet_start_min BIGINT,
        quiet_end_min BIGINT
    )",
    "CREATE TABLE alerts (
        id BIGINT PRIMARY KEY,
        condition_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        subject TEXT NOT NULL,
        state TEXT NOT NULL,
        opened_ms BIGINT NOT NULL,
        resolved_ms BIGINT,
        detail TEXT NOT NULL
    )",
    "CREATE UNIQUE INDEX alerts_one_open ON alerts (condition_key) WHERE state = 'open'",
    "CREATE INDEX alerts_by_key ON alerts (condition_key)",
    "CREATE TABLE alert_recipients (
        alert_id BIGINT NOT NULL,
        user_id BIGINT NOT NULL,
        PRIMARY KEY (alert_id, user_id)
    )",
    "CREATE TABLE event_cursor (name TEXT PRIMARY KEY, last_index BIGINT NOT NULL, since_ms BIGINT NOT NULL)",
],
// 4: SMS verification codes for registration (keyed hashes only).
&["CREATE TABLE phone_codes (
    phone_hash TEXT PRIMARY KEY,
    code_hash TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    sent_ms BIGINT NOT NULL
)"],
// 5: API tokens expire (those made before: 90 days after they were made).
&[
    "ALTER TABLE api_tokens ADD COLUMN expires_ms BIGINT",
    "UPDATE api_tokens SET expires_ms = created_ms + 7776000000 WHERE expires_ms IS NULL",
]];

impl Db {
    /// `sqlite://path` (created if missing) or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let (backend, url, max) = if url.starts_with("sqlite:") {
            let url = if url.contains('?') { url.to_owned() } else { format!("{url}?mode=rwc") };
            (Backend::Sqlite, url, 8)
        } else {
            (Backend::Postgres, url.to_owned(), 16)
        };
        let pool = AnyPoolOptions::new().max_connections(max).connect(&url).await?;
        if backend == Backend::Sqlite {
            // WAL: readers never wait for the writer; a persistent property of the file.
            sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await?;
        }
        let db = Db { pool, backend };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), sqlx::Error> {
        sqlx::query("CREATE TABLE IF NOT EXISTS portal_schema (version BIGINT NOT NULL)").execute(&self.pool).await?;
        let done: i64 = sqlx::query("SELECT COUNT(*) AS n FROM portal_schema").fetch_one(&self.pool).await?.try_get("n")?;
        for (i, statements) in MIGRATIONS.iter().enumerate().skip(done as usize) {
            let mut tx = self.pool.begin().await?;
            for statement in *statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO portal_schema (version) VALUES ($1)").bind(i as i64 + 1).execute(&mut *tx).await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Whether an error is a unique-constraint violation (a duplicate username or email).
    pub fn is_unique_violation(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Database(d) => {
                d.is_unique_violation() || d.message().contains("UNIQUE constraint failed") || d.code().as_deref() == Some("23505")
            }
            _ => false,
        }
    }
}

/// Reads an optional column, treating SQL NULL as `None`.
pub fn opt_i64(row: &AnyRow, col: &str) -> Result<Option<i64>, sqlx::Error> {
    row.try_get::<Option<i64>, _>(col)
}

pub fn opt_str(row: &AnyRow, col: &str) -> Result<Option<String>, sqlx::Error> {
    row.try_get::<Option<String>, _>(col)
}
