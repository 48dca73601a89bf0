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
    #[error("the backup has schema version {found}; this portal knows versions up to {}", crate::db::SCHEMA_VERSION)]
    NewerSchema { found: i64 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(path.to_owned(), e)
}

/// The file of a `sqlite://path` or `sqlite:path` URL (percent-escapes are not decoded: such
/// paths are refused rather than guessed at).
fn sqlite_path(url: &str) -> Option<Result<PathBuf, BackupError>> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    if path.contains('%') {
        return Some(Err(BackupError::Damaged(format!("{path}: give the SQLite path without percent-escapes"))));
    }
    Some(Ok(PathBuf::from(path)))
}

fn backend(url: &str) -> &'static str {
    if url.starts_with("sqlite:") {
        "sqlite"
    } else {
        "postgres"
    }
}

/// Size and SHA-256 of a file, read in pieces (a dump may be larger than memory).
fn sha256_of(path: &Path) -> Result<(u64, String), BackupError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// A PostgreSQL URL without its password, and the password: the tools get the password in
/// their environment, never on a command line others can read (`ps`).
fn without_password(url: &str) -> (String, Option<String>) {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let password = parsed.password().map(str::to_owned);
            let _ = parsed.set_password(None);
            (parsed.to_string(), password)
        }
        Err(_) => (url.to_owned(), None),
    }
}

async fn run(tool: &'static str, url: &str, args: &[&str]) -> Result<(), BackupError> {
    let (url, password) = without_password(url);
    let mut command = tokio::process::Command::new(tool);
    command.arg(format!("--dbname={url}")).args(args);
    if let Some(p) = password {
        command.env("PGPASSWORD", p);
    }
    let out = command.output().await.map_err(|e| BackupError::Io(PathBuf::from(tool), e))?;
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
            run("pg_dump", url, &["--format=custom", "--no-owner", "--no-privileges", &format!("--file={}", target.display())]).await?;
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
        return Err(BackupError::Damaged(format!(
            "{} is {bytes} bytes with SHA-256 {sha256}; the manifest says {} and {}",
            file.display(),
            manifest.bytes,
            manifest.sha256
        )));
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
    if manifest.schema_version > crate::db::SCHEMA_VERSION {
        return Err(BackupError::NewerSchema { found: manifest.schema_version });
    }
    match sqlite_path(url) {
        Some(target) => {
            let target = target?;
            // A leftover write-ahead log or journal would be replayed onto the restored file.
            for companion in ["", "-wal", "-shm", "-journal"] {
                let path = PathBuf::from(format!("{}{companion}", target.display()));
                if path.exists() {
                    return Err(BackupError::NotEmpty(path.display().to_string()));
                }
            }
            if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            let partial = PathBuf::from(format!("{}.restoring.{}", target.display(), std::process::id()));
            let placed = (|| {
                std::fs::copy(&file, &partial).map_err(io(&partial))?;
                std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
                // A link, not a rename: it fails if anything created the target meanwhile.
                std::fs::hard_link(&partial, &target).map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => BackupError::NotEmpty(target.display().to_string()),
                    _ => BackupError::Io(target.clone(), e),
                })
            })();
            let _ = std::fs::remove_file(&partial);
            placed?;
        }
        None => {
            sqlx::any::install_default_drivers();
            let pool = AnyPoolOptions::new().max_connections(1).connect(url).await?;
            // Every relation in a user schema, whatever this role may see of it.
            let tables: i64 = sqlx::query(
                "SELECT COUNT(*) AS n FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'S') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'",
            )
            .fetch_one(&pool)
            .await?
            .try_get("n")?;
            pool.close().await;
            if tables > 0 {
                return Err(BackupError::NotEmpty("the target database".into()));
            }
            let file = std::fs::canonicalize(&file).map_err(io(&file))?;
            let file = file.display().to_string();
            run("pg_restore", url, &["--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction", "--", &file]).await?;
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_reaches_a_command_line() {
        let (url, password) = without_password("postgres://portal:s3cret@db.example:5432/portal");
        assert_eq!((url.as_str(), password.as_deref()), ("postgres://portal@db.example:5432/portal", Some("s3cret")));
        assert_eq!(without_password("postgres://db.example/portal").1, None);
    }

    #[test]
    fn sqlite_paths_are_read_as_sqlx_reads_them_or_refused() {
        let path = |url: &str| sqlite_path(url).map(|r| r.map(|p| p.display().to_string()).map_err(|e| e.to_string()));
        assert_eq!(path("sqlite:///var/lib/portal.db?mode=rwc"), Some(Ok("/var/lib/portal.db".into())));
        assert_eq!(path("sqlite:portal.db"), Some(Ok("portal.db".into())));
        assert!(matches!(path("sqlite:///a%20b.db"), Some(Err(_))));
        assert_eq!(path("postgres://db/portal"), None);
    }

    #[tokio::test]
    async fn a_sqlite_restore_never_lands_on_a_leftover_log() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let source = format!("sqlite://{}/source.db", dir.path().display());
        crate::db::Db::connect(&source).await.expect("a database");
        let backup = dir.path().join("backup");
        take(&source, &backup).await.expect("backup");
        let target = dir.path().join("target.db");
        std::fs::write(dir.path().join("target.db-wal"), b"an old log").expect("leftover");
        let refused = restore(&backup, &format!("sqlite://{}", target.display())).await;
        assert!(matches!(refused, Err(BackupError::NotEmpty(_))), "{refused:?}");
        assert!(!target.exists());
        std::fs::remove_file(dir.path().join("target.db-wal")).expect("remove");
        restore(&backup, &format!("sqlite://{}", target.display())).await.expect("restore");
        assert!(target.exists());
        assert!(
            std::fs::read_dir(dir.path()).expect("dir").all(|e| !e.expect("entry").file_name().to_string_lossy().contains("restoring")),
            "no partial file left"
        );
    }
}
