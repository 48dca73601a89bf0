//! Backups of the portal's database and restores into an empty one (`suanli-portal backup`,
//! `restore`).
//!
//! A backup directory holds the database (`portal.dump`, PostgreSQL's custom format from
//! `pg_dump`; or `portal.sqlite`, SQLite's `VACUUM INTO`) and `manifest.json` (format, backend,
//! schema version, size, SHA-256). A restore checks the manifest, size and checksum before it
//! writes anything, and writes only into an empty database. The key file that seals personal
//! data is **not** in the backup: keep it apart (a backup that holds both gives away both); a
//! restored database is readable only with the same key file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::any::AnyPoolOptions;
use sqlx::Row;

pub const BACKUP_FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub backup_format: u32,
    /// `postgres` or `sqlite`.
    pub backend: String,
    /// The portal schema version the database had (`db.rs` migrations applied).
    pub schema_version: i64,
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub taken_at_ms: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{tool} failed: {stderr}")]
    Tool { tool: &'static str, stderr: String },
    #[error("{0} is not empty: a backup goes into a new directory, a restore into an empty database")]
    NotEmpty(String),
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("backup format {0}; this portal reads format {BACKUP_FORMAT}")]
    Format(u32),
    #[error("the backup is of a {found} database; the target is {target}")]
    Backend { found: String, target: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(path.to_owned(), e)
}

fn sqlite_path(url: &str) -> Option<PathBuf> {
    url.strip_prefix("sqlite://").map(|p| PathBuf::from(p.split('?').next().unwrap_or(p)))
}

fn backend(url: &str) -> &'static str {
    if url.starts_with("sqlite:") { "sqlite" } else { "postgres" }
}

fn sha256_of(path: &Path) -> Result<(u64, String), BackupError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    Ok((bytes.len() as u64, hex::encode(Sha256::digest(&bytes))))
}

async fn run(tool: &'static str, args: &[&str]) -> Result<(), BackupError> {
    let out = tokio::process::Command::new(tool).args(args).output().await.map_err(|e| BackupError::Io(PathBuf::from(tool), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(BackupError::Tool { tool, stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
    }
}

/// Backs up the database at `url` (a running portal's too: both tools read a consistent
/// snapshot) into the new directory `out`.
pub async fn take(url: &str, out: &Path) -> Result<Manifest, BackupError> {
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::NotEmpty(out.display().to_string()));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new().max_connections(1).connect(url).await?;
    let schema_version: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM portal_schema").fetch_one(&pool).await?.try_get("v")?;
    let file = match backend(url) {
        "sqlite" => {
            let file = "portal.sqlite";
            let target = out.join(file);
            sqlx::query("VACUUM INTO ?").bind(target.display().to_string()).execute(&pool).await?;
            file
        }
        _ => {
            let file = "portal.dump";
            let target = out.join(file);
            run("pg_dump", &["--format=custom", "--no-owner", "--file", &target.display().to_string(), url]).await?;
            file
        }
    };
    pool.close().await;
    let path = out.join(file);
    std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
    let (bytes, sha256) = sha256_of(&path)?;
    let taken_at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let manifest = Manifest { backup_format: BACKUP_FORMAT, backend: backend(url).into(), schema_version, file: file.into(), bytes, sha256, taken_at_ms };
    let partial = out.join(format!("{MANIFEST}.partial"));
    std::fs::write(&partial, serde_json::to_vec_pretty(&manifest).unwrap_or_default()).map_err(io(&partial))?;
    std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    std::fs::rename(&partial, out.join(MANIFEST)).map_err(io(out))?;
    Ok(manifest)
}

/// Reads and checks a backup: manifest, file name, size and checksum.
pub fn open(backup: &Path) -> Result<(Manifest, PathBuf), BackupError> {
    let path = backup.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| BackupError::Damaged(format!("manifest: {e}")))?;
    if manifest.backup_format != BACKUP_FORMAT {
        return Err(BackupError::Format(manifest.backup_format));
    }
    if !["portal.sqlite", "portal.dump"].contains(&manifest.file.as_str()) {
        return Err(BackupError::Damaged(format!("{:?} is not a file this portal writes", manifest.file)));
    }
    let file = backup.join(&manifest.file);
    let (bytes, sha256) = sha256_of(&file)?;
    if bytes != manifest.bytes || sha256 != manifest.sha256 {
        return Err(BackupError::Damaged(format!("{} is {bytes} bytes with SHA-256 {sha256}; the manifest says {} and {}", file.display(), manifest.bytes, manifest.sha256)));
    }
    Ok((manifest, file))
}

/// Restores `backup` into the empty database at `url` (a SQLite file that does not exist yet,
/// or a PostgreSQL database without tables).
pub async fn restore(backup: &Path, url: &str) -> Result<Manifest, BackupError> {
    let (manifest, file) = open(backup)?;
    if manifest.backend != backend(url) {
        return Err(BackupError::Backend { found: manifest.backend.clone(), target: backend(url).into() });
    }
    match sqlite_path(url) {
        Some(target) => {
            if target.exists() {
                return Err(BackupError::NotEmpty(target.display().to_string()));
            }
            let partial = target.with_extension("restoring");
            std::fs::copy(&file, &partial).map_err(io(&partial))?;
            std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
            std::fs::rename(&partial, &target).map_err(io(&target))?;
        }
        None => {
            sqlx::any::install_default_drivers();
            let pool = AnyPoolOptions::new().max_connections(1).connect(url).await?;
            let tables: i64 = sqlx::query("SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = 'public'").fetch_one(&pool).await?.try_get("n")?;
            pool.close().await;
            if tables > 0 {
                return Err(BackupError::NotEmpty(url.rsplit('/').next().unwrap_or(url).to_owned()));
            }
            run("pg_restore", &["--no-owner", "--exit-on-error", "--single-transaction", "--dbname", url, &file.display().to_string()]).await?;
        }
    }
    Ok(manifest)
}
