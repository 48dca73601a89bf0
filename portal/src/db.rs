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

/// A random positive row ID below 2^53, for IDs the API hands out: JavaScript (and tools
/// that read JSON numbers as doubles) holds integers exactly only that far.
pub fn new_public_id() -> i64 {
    (rand::random::<u64>() >> 11).max(1) as i64
}

/// Schema migrations, in order; each runs once, in a transaction, recorded in `portal_schema`.
/// The schema version this portal writes: how many migrations it has.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How a migration may be applied while portals of two releases share the database during a
/// rolling upgrade (expand, then contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Adds only what older code ignores (tables, nullable columns, indexes, backfills): applied
    /// by the first portal of the new release that starts, while older ones still serve.
    Expand,
    /// Takes away or tightens what older code uses (drops, renames, `NOT NULL`): applied only by
    /// `suanli-portal migrate --contract`, and only once no portal of an older release runs.
    /// From then on a portal that does not know this migration refuses to start.
    Contract,
}

#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub phase: Phase,
    pub statements: &'static [&'static str],
}

pub const fn expand(statements: &'static [&'static str]) -> Migration {
    Migration { phase: Phase::Expand, statements }
}

pub const fn contract(statements: &'static [&'static str]) -> Migration {
    Migration { phase: Phase::Contract, statements }
}

/// A portal that has not said it runs for this long is taken to be gone (it says so every
/// [`INSTANCE_HEARTBEAT_MS`]).
pub const INSTANCE_GONE_AFTER_MS: i64 = 60_000;
pub const INSTANCE_HEARTBEAT_MS: u64 = 15_000;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("this database was contracted to schema version {floor}; this portal knows versions up to {knows}: run a newer portal")]
    TooOld { floor: i64, knows: i64 },
    #[error("contract migration {version} is pending and this portal's migrations go past it: run `suanli-portal migrate --contract` once no portal older than it runs, then start this one")]
    ContractPending { version: i64 },
    #[error("a portal that knows schema versions only up to {knows} still runs (instance {id}, seen {ago_s} s ago): upgrade or stop it before contract migration {version}")]
    OlderPortalRunning { id: String, knows: i64, ago_s: i64, version: i64 },
}

pub const MIGRATIONS: &[Migration] = &[
    expand(&[
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
    ]),
    // 2: the last TOTP step used per user (no replay of a code within its window).
    expand(&["ALTER TABLE users ADD COLUMN totp_last_step BIGINT"]),
    // 3: alerts, who receives them, how, and where the alert engine is in the broker's events.
    expand(&[
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
    ]),
    // 4: SMS verification codes for registration (keyed hashes only).
    expand(&["CREATE TABLE phone_codes (
    phone_hash TEXT PRIMARY KEY,
    code_hash TEXT NOT NULL,
    expires_ms BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    sent_ms BIGINT NOT NULL
)"]),
    // 5: API tokens expire (those made before: 90 days after they were made).
    expand(&["ALTER TABLE api_tokens ADD COLUMN expires_ms BIGINT", "UPDATE api_tokens SET expires_ms = created_ms + 7776000000 WHERE expires_ms IS NULL"]),
    // 6: which portals run against this database, and which schema each knows: a contract
    // migration waits until no portal of an older release is running.
    expand(&["CREATE TABLE portal_instances (
    id TEXT PRIMARY KEY,
    knows_version BIGINT NOT NULL,
    started_ms BIGINT NOT NULL,
    seen_ms BIGINT NOT NULL
)"]),
    // 7: datasets (versions of files by content, shares), resumable uploads, the model registry.
    expand(&[
        "CREATE TABLE datasets (
    id BIGINT PRIMARY KEY,
    owner BIGINT NOT NULL,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    latest_version BIGINT NOT NULL,
    UNIQUE (owner, name)
)",
        "CREATE TABLE dataset_versions (
    dataset_id BIGINT NOT NULL,
    version BIGINT NOT NULL,
    message TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    items BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    report TEXT NOT NULL,
    request_id TEXT,
    PRIMARY KEY (dataset_id, version),
    UNIQUE (dataset_id, request_id)
)",
        "CREATE TABLE dataset_files (
    dataset_id BIGINT NOT NULL,
    version BIGINT NOT NULL,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    label TEXT,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    objects TEXT,
    PRIMARY KEY (dataset_id, version, name)
)",
        "CREATE TABLE dataset_shares (dataset_id BIGINT NOT NULL, user_id BIGINT NOT NULL, PRIMARY KEY (dataset_id, user_id))",
        "CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    owner BIGINT NOT NULL,
    filename TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    length BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    complete BIGINT NOT NULL
)",
        "CREATE TABLE job_datasets (job_id BIGINT NOT NULL, input TEXT NOT NULL, dataset_id BIGINT NOT NULL, version BIGINT NOT NULL, PRIMARY KEY (job_id, input))",
        "CREATE TABLE models (
    id BIGINT PRIMARY KEY,
    owner BIGINT NOT NULL,
    name TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    serving BIGINT,
    UNIQUE (owner, name)
)",
        "CREATE TABLE model_versions (
    model_id BIGINT NOT NULL,
    version BIGINT NOT NULL,
    job_id BIGINT NOT NULL,
    job_name TEXT NOT NULL,
    output TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    dataset TEXT,
    lineage TEXT NOT NULL,
    metrics TEXT NOT NULL,
    card TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (model_id, version)
)",
    ]),
    // 8: what the quota and the dataset list look up by account.
    expand(&["CREATE INDEX uploads_by_owner ON uploads (owner)", "CREATE INDEX dataset_shares_by_user ON dataset_shares (user_id)"]),
    // 9: image search (`image_search.rs`): each researcher's library and the global one (owner
    // 0), and the images in them by content, with where each came from and whether it is indexed
    // (0 waiting, 1 in the index, -1 failed with `error`).
    expand(&[
        "CREATE TABLE image_libraries (
    id BIGINT PRIMARY KEY,
    owner BIGINT NOT NULL,
    name TEXT NOT NULL,
    model TEXT,
    state TEXT NOT NULL,
    error TEXT,
    updated_ms BIGINT NOT NULL,
    UNIQUE (owner, name)
)",
        "CREATE TABLE library_images (
    library_id BIGINT NOT NULL,
    item_key BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    name TEXT NOT NULL,
    dataset_id BIGINT NOT NULL,
    version BIGINT NOT NULL,
    label TEXT,
    added_by BIGINT NOT NULL,
    indexed BIGINT NOT NULL,
    error TEXT,
    PRIMARY KEY (library_id, item_key),
    UNIQUE (library_id, sha256)
)",
        "CREATE INDEX library_images_waiting ON library_images (library_id, indexed)",
    ]),
    // 10: crowdsourced annotation (`annotation.rs`): projects over a dataset version, their
    // members, tasks of overlapping slots, each annotator's work by revision and time, what
    // comparing a complete image found, reviewers' decisions. Scores are parts per million.
    expand(&[
        "CREATE TABLE annotation_projects (
    id BIGINT PRIMARY KEY,
    owner BIGINT NOT NULL,
    name TEXT NOT NULL,
    dataset_id BIGINT NOT NULL,
    version BIGINT NOT NULL,
    label_schema TEXT NOT NULL,
    task_size BIGINT NOT NULL,
    overlap BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL,
    open_call BIGINT NOT NULL,
    images BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    UNIQUE (owner, name)
)",
        "CREATE TABLE annotation_members (
    project_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL,
    role TEXT NOT NULL,
    joined_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, user_id)
)",
        "CREATE INDEX annotation_members_by_user ON annotation_members (user_id)",
        "CREATE TABLE annotation_images (
    project_id BIGINT NOT NULL,
    image_no BIGINT NOT NULL,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    width BIGINT NOT NULL,
    height BIGINT NOT NULL,
    honeypot BIGINT NOT NULL,
    gold TEXT,
    pre TEXT,
    PRIMARY KEY (project_id, image_no)
)",
        "CREATE TABLE annotation_tasks (project_id BIGINT NOT NULL, task_no BIGINT NOT NULL, images TEXT NOT NULL, image_count BIGINT NOT NULL, PRIMARY KEY (project_id, task_no))",
        "CREATE TABLE annotation_slots (
    project_id BIGINT NOT NULL,
    task_no BIGINT NOT NULL,
    slot BIGINT NOT NULL,
    state TEXT NOT NULL,
    annotator BIGINT,
    lease_until BIGINT,
    assigned_ms BIGINT,
    submitted_ms BIGINT,
    generation BIGINT NOT NULL,
    images BIGINT NOT NULL,
    PRIMARY KEY (project_id, task_no, slot)
)",
        "CREATE UNIQUE INDEX annotation_slots_one_per_task ON annotation_slots (project_id, task_no, annotator)",
        "CREATE INDEX annotation_slots_by_state ON annotation_slots (project_id, state, task_no)",
        "CREATE INDEX annotation_slots_by_annotator ON annotation_slots (project_id, annotator)",
        "CREATE TABLE annotation_work (
    project_id BIGINT NOT NULL,
    task_no BIGINT NOT NULL,
    slot BIGINT NOT NULL,
    image_no BIGINT NOT NULL,
    annotator BIGINT NOT NULL,
    shapes TEXT NOT NULL,
    revision BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, task_no, slot, annotator, image_no)
)",
        "CREATE TABLE annotation_time (
    project_id BIGINT NOT NULL,
    annotator BIGINT NOT NULL,
    task_no BIGINT NOT NULL,
    slot BIGINT NOT NULL,
    active_ms BIGINT NOT NULL,
    last_save_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, annotator, task_no, slot)
)",
        "CREATE TABLE annotation_results (
    project_id BIGINT NOT NULL,
    image_no BIGINT NOT NULL,
    task_no BIGINT NOT NULL,
    agreement_ppm BIGINT,
    conflicts BIGINT NOT NULL,
    undecided BIGINT NOT NULL,
    shapes TEXT NOT NULL,
    updated_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, image_no)
)",
        "CREATE TABLE annotation_labels (project_id BIGINT NOT NULL, image_no BIGINT NOT NULL, label TEXT NOT NULL, shapes BIGINT NOT NULL, PRIMARY KEY (project_id, image_no, label))",
        "CREATE TABLE annotation_scores (
    project_id BIGINT NOT NULL,
    annotator BIGINT NOT NULL,
    image_no BIGINT NOT NULL,
    kind TEXT NOT NULL,
    f1_ppm BIGINT NOT NULL,
    PRIMARY KEY (project_id, annotator, kind, image_no)
)",
        // The dashboard's averages read this index alone (no row lookups).
        "CREATE INDEX annotation_scores_sums ON annotation_scores (project_id, annotator, kind, f1_ppm)",
        "CREATE TABLE annotation_decisions (
    project_id BIGINT NOT NULL,
    image_no BIGINT NOT NULL,
    conflict_key TEXT NOT NULL,
    decision TEXT NOT NULL,
    reviewer BIGINT NOT NULL,
    decided_ms BIGINT NOT NULL,
    PRIMARY KEY (project_id, image_no, conflict_key)
)",
    ]),
    // 11: when a task's images were last compared (NULL: not since its last slot was submitted);
    // a comparison cut short by a crash is redone from it (`annotation::compare_pending`). And
    // the free slots a pull looks for, each kind in a partial index of its own: the open ones in
    // task order, the held ones by when their lease runs out.
    expand(&[
        "ALTER TABLE annotation_tasks ADD COLUMN compared_ms BIGINT",
        "CREATE INDEX annotation_tasks_uncompared ON annotation_tasks (project_id, compared_ms)",
        // Tasks complete before this migration were compared when their last slot was
        // submitted: marked, so that they are not all compared again.
        "UPDATE annotation_tasks SET compared_ms = 0 WHERE NOT EXISTS (SELECT 1 FROM annotation_slots s WHERE s.project_id = annotation_tasks.project_id AND s.task_no = annotation_tasks.task_no AND s.state <> 'submitted')",
        "CREATE INDEX annotation_slots_open ON annotation_slots (project_id, task_no, slot) WHERE state = 'open'",
        "CREATE INDEX annotation_slots_leases ON annotation_slots (project_id, lease_until) WHERE state = 'held'",
    ]),
    // 12: services on leased cards (`services.rs`): what should run where, for whom, who may
    // reach it (its origin is `<slug>.<services domain>`), its generation (raised by each
    // update), and its metering (from created_ms to stopped_ms; requests).
    expand(&[
        "CREATE TABLE services (
        id BIGINT PRIMARY KEY,
        owner_id BIGINT NOT NULL,
        lease_id BIGINT NOT NULL,
        node_id BIGINT NOT NULL,
        kind TEXT NOT NULL,
        model_name TEXT,
        model_version BIGINT,
        job_id BIGINT NOT NULL,
        files TEXT NOT NULL,
        visibility TEXT NOT NULL,
        slug TEXT NOT NULL UNIQUE,
        generation BIGINT NOT NULL,
        replicas BIGINT NOT NULL,
        rate_per_minute BIGINT NOT NULL,
        state TEXT NOT NULL,
        stop_reason TEXT,
        created_ms BIGINT NOT NULL,
        stopped_ms BIGINT,
        requests BIGINT NOT NULL DEFAULT 0,
        last_request_ms BIGINT
        )",
        "CREATE INDEX services_owner ON services (owner_id, created_ms)",
        "CREATE INDEX services_running ON services (node_id, state)",
    ]),
];

impl Db {
    /// `sqlite://path` (created if missing) or `postgres://…`.
    pub async fn connect(url: &str) -> Result<Db, MigrateError> {
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

    async fn migrate(&self) -> Result<(), MigrateError> {
        self.migrate_with(MIGRATIONS, false).await
    }

    /// Applies what `migrations` has beyond the database's version: every expand migration up
    /// to the first contract one, and with `contract` the contract ones too (refused while a
    /// portal of an older release runs). Refuses a database contracted beyond `migrations`.
    pub async fn migrate_with(&self, migrations: &[Migration], contract: bool) -> Result<(), MigrateError> {
        sqlx::query("CREATE TABLE IF NOT EXISTS portal_schema (version BIGINT NOT NULL)").execute(&self.pool).await?;
        sqlx::query("CREATE TABLE IF NOT EXISTS portal_schema_floor (floor BIGINT NOT NULL)").execute(&self.pool).await?;
        let knows = migrations.len() as i64;
        let floor: i64 = sqlx::query("SELECT COALESCE(MAX(floor), 0) AS f FROM portal_schema_floor").fetch_one(&self.pool).await?.try_get("f")?;
        if floor > knows {
            return Err(MigrateError::TooOld { floor, knows });
        }
        let done: i64 = sqlx::query("SELECT COUNT(*) AS n FROM portal_schema").fetch_one(&self.pool).await?.try_get("n")?;
        for (i, migration) in migrations.iter().enumerate().skip(done as usize) {
            let version = i as i64 + 1;
            if migration.phase == Phase::Contract {
                if !contract {
                    // Later migrations cannot be applied past it, and this code needs them.
                    if knows > version {
                        return Err(MigrateError::ContractPending { version });
                    }
                    tracing::warn!(version, "contract migration pending: run `suanli-portal migrate --contract` once every portal runs this release");
                    break;
                }
                self.no_older_portal_runs(version).await?;
            }
            let mut tx = self.pool.begin().await?;
            // Portals starting together take turns (PostgreSQL; SQLite serialises writers), and
            // one that waited finds the migration applied.
            if self.backend == Backend::Postgres {
                sqlx::query("SELECT pg_advisory_xact_lock(7316001)").execute(&mut *tx).await?;
            }
            let applied: i64 = sqlx::query("SELECT COUNT(*) AS n FROM portal_schema").fetch_one(&mut *tx).await?.try_get("n")?;
            if applied >= version {
                tx.rollback().await?;
                continue;
            }
            for statement in migration.statements {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO portal_schema (version) VALUES ($1)").bind(version).execute(&mut *tx).await?;
            if migration.phase == Phase::Contract {
                sqlx::query("INSERT INTO portal_schema_floor (floor) VALUES ($1)").bind(version).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// Refuses while a portal that does not know migration `version` said it runs within
    /// [`INSTANCE_GONE_AFTER_MS`]. (Before schema 6 portals kept no such record: an operator
    /// upgrading from such a release stops them first.)
    async fn no_older_portal_runs(&self, version: i64) -> Result<(), MigrateError> {
        let since = now_ms() - INSTANCE_GONE_AFTER_MS;
        let row =
            sqlx::query("SELECT id, knows_version, seen_ms FROM portal_instances WHERE knows_version < $1 AND seen_ms >= $2 ORDER BY seen_ms DESC LIMIT 1")
                .bind(version)
                .bind(since)
                .fetch_optional(&self.pool)
                .await?;
        match row {
            Some(row) => Err(MigrateError::OlderPortalRunning {
                id: row.try_get("id")?,
                knows: row.try_get("knows_version")?,
                ago_s: (now_ms() - row.try_get::<i64, _>("seen_ms")?) / 1000,
                version,
            }),
            None => Ok(()),
        }
    }

    /// How many migrations the database has applied.
    pub async fn schema_version(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM portal_schema").fetch_one(&self.pool).await?.try_get("n")
    }

    /// Says that portal `id` runs and knows this release's schema (every
    /// [`INSTANCE_HEARTBEAT_MS`] while it serves).
    pub async fn heartbeat(&self, id: &str, knows_version: i64, started_ms: i64) -> Result<(), sqlx::Error> {
        let now = now_ms();
        let updated = sqlx::query("UPDATE portal_instances SET seen_ms = $1, knows_version = $2 WHERE id = $3")
            .bind(now)
            .bind(knows_version)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if updated.rows_affected() == 0 {
            sqlx::query("INSERT INTO portal_instances (id, knows_version, started_ms, seen_ms) VALUES ($1, $2, $3, $4)")
                .bind(id)
                .bind(knows_version)
                .bind(started_ms)
                .bind(now)
                .execute(&self.pool)
                .await?;
        }
        // Instances long gone are forgotten.
        sqlx::query("DELETE FROM portal_instances WHERE seen_ms < $1").bind(now - 7 * 24 * 3_600_000).execute(&self.pool).await?;
        Ok(())
    }

    /// A portal stopping cleanly takes its record with it (no wait for a contract migration).
    pub async fn forget_instance(&self, id: &str) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM portal_instances WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// Whether an error is a unique-constraint violation (a duplicate username or email).
    pub fn is_unique_violation(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Database(d) => d.is_unique_violation() || d.message().contains("UNIQUE constraint failed") || d.code().as_deref() == Some("23505"),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// This release's migrations, then a next release's: one expand, one contract.
    fn next_release() -> Vec<Migration> {
        let mut next = MIGRATIONS.to_vec();
        next.push(expand(&["CREATE TABLE shiny (id BIGINT PRIMARY KEY, label TEXT)"]));
        next.push(contract(&["DROP TABLE phone_codes"]));
        next
    }

    async fn has_table(db: &Db, name: &str) -> bool {
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = $1")
            .bind(name)
            .fetch_one(&db.pool)
            .await
            .expect("query")
            .try_get("n")
            .expect("n");
        n == 1
    }

    async fn database() -> (tempfile::TempDir, Db) {
        let dir = tempfile::TempDir::new().expect("dir");
        let db = Db::connect(&format!("sqlite://{}/portal.db", dir.path().display())).await.expect("db");
        (dir, db)
    }

    #[tokio::test]
    async fn a_new_release_expands_at_start_and_its_contract_waits_for_the_operator() {
        let (_dir, db) = database().await;
        assert_eq!(db.schema_version().await.expect("version"), SCHEMA_VERSION);
        let next = next_release();
        db.migrate_with(&next, false).await.expect("expand");
        assert_eq!(db.schema_version().await.expect("version"), SCHEMA_VERSION + 1, "the expand applied, the contract not");
        assert!(has_table(&db, "shiny").await && has_table(&db, "phone_codes").await);
        // A portal of this (older) release still runs on the expanded database.
        db.migrate_with(MIGRATIONS, false).await.expect("the older release starts on an expanded database");
    }

    #[tokio::test]
    async fn a_contract_is_refused_while_an_older_portal_runs_and_changes_nothing() {
        let (_dir, db) = database().await;
        db.heartbeat("old-portal", SCHEMA_VERSION, now_ms()).await.expect("heartbeat");
        let next = next_release();
        let refused = db.migrate_with(&next, true).await.expect_err("an older portal runs");
        assert!(matches!(refused, MigrateError::OlderPortalRunning { ref id, knows, .. } if id == "old-portal" && knows == SCHEMA_VERSION), "{refused}");
        assert!(has_table(&db, "phone_codes").await, "nothing contracted");
        assert_eq!(db.schema_version().await.expect("version"), SCHEMA_VERSION + 1);
        // A portal of the new release does not hold it back; the old one stopping does not either.
        db.heartbeat("new-portal", next.len() as i64, now_ms()).await.expect("heartbeat");
        db.forget_instance("old-portal").await.expect("forget");
        db.migrate_with(&next, true).await.expect("contract");
        assert!(!has_table(&db, "phone_codes").await);
        assert_eq!(db.schema_version().await.expect("version"), next.len() as i64);
    }

    #[tokio::test]
    async fn an_older_portal_gone_quiet_no_longer_holds_a_contract_back() {
        let (_dir, db) = database().await;
        db.heartbeat("crashed", SCHEMA_VERSION, now_ms()).await.expect("heartbeat");
        sqlx::query("UPDATE portal_instances SET seen_ms = $1").bind(now_ms() - INSTANCE_GONE_AFTER_MS - 1).execute(&db.pool).await.expect("age it");
        db.migrate_with(&next_release(), true).await.expect("contract");
    }

    #[tokio::test]
    async fn after_a_contract_an_older_portal_refuses_to_start() {
        let (_dir, db) = database().await;
        db.migrate_with(&next_release(), true).await.expect("contract");
        let refused = db.migrate_with(MIGRATIONS, false).await.expect_err("too old");
        assert!(matches!(refused, MigrateError::TooOld { floor, knows } if floor == SCHEMA_VERSION + 2 && knows == SCHEMA_VERSION), "{refused}");
        assert!(refused.to_string().contains("run a newer portal"), "{refused}");
    }

    #[tokio::test]
    async fn a_release_whose_migrations_go_past_a_pending_contract_refuses_to_start() {
        let (_dir, db) = database().await;
        let mut later = MIGRATIONS.to_vec();
        later.push(contract(&["DROP TABLE phone_codes"]));
        later.push(expand(&["CREATE TABLE shiny (id BIGINT PRIMARY KEY)"]));
        let refused = db.migrate_with(&later, false).await.expect_err("the contract is pending");
        assert!(matches!(refused, MigrateError::ContractPending { version } if version == SCHEMA_VERSION + 1), "{refused}");
        assert!(!has_table(&db, "shiny").await && has_table(&db, "phone_codes").await, "nothing applied out of order");
        db.migrate_with(&later, true).await.expect("contract, then the rest");
        assert!(has_table(&db, "shiny").await && !has_table(&db, "phone_codes").await);
    }
}
