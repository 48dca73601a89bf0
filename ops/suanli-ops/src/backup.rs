//! Backups of the whole platform — portal database, broker state, artifacts — tied by one
//! manifest to one point in time, kept with retention and copied off-site.
//!
//! A backup root holds one directory per backup (named by its UTC start, `20261203T080000Z`)
//! and `pool/`, the artifacts of every backup stored once by content:
//!
//! ```text
//! <root>/pool/ab/abcd…                 artifacts (suanli_artifacts::backup)
//! <root>/<name>/portal/                `suanli-portal backup`
//! <root>/<name>/broker/                `suanli-broker backup`
//! <root>/<name>/artifacts.json         what the artifact store held, and who uploaded what
//! <root>/<name>/manifest.json          this module's manifest, written last
//! ```
//!
//! **One point in time.** The parts are taken in the order their references point: the portal
//! names broker accounts and leases, broker state names artifacts (job inputs, outputs,
//! checkpoints). Each part is taken after the one that refers to it, so everything a part
//! refers to already existed when the next was copied: broker state only grows by what the
//! portal has not seen yet, and an artifact no job refers to any more is kept for the garbage
//! collector's grace period (hours) before it may go. The manifest pins every file of every
//! part by size and SHA-256; a part swapped in from another backup, or one bit changed, is
//! refused before anything is restored.
//!
//! **Off-site.** After a backup is verified, its files go to an S3-compatible bucket under
//! `<name>/…` (manifest last: a copy without one is unfinished) and the pool's artifacts under
//! `pool/<sha256>`, each only once. Retention keeps the newest `keep` backups in both places.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use suanli_artifacts::backup::{self as artifacts, ArtifactsManifest};
use suanli_artifacts::bucket::{Bucket, BucketConfig, BucketError};
use suanli_artifacts::{LocalStore, Store};
use tokio::process::Command;

/// This module's manifest layout.
pub const PLATFORM_BACKUP_FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const ARTIFACTS_MANIFEST: &str = "artifacts.json";
pub const POOL: &str = "pool";

/// `[backup]` of a configuration file (`ops/backup.example.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupConfig {
    /// The backup root.
    pub dir: PathBuf,
    /// How many backups to keep (here and off-site); older ones go once a new one is verified.
    pub keep: usize,
    /// Where `suanli-broker` and `suanli-portal` are: default beside this program, then `$PATH`.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    pub broker: BrokerSource,
    pub portal: PortalSource,
    pub artifacts: ArtifactsSource,
    #[serde(default)]
    pub offsite: Option<BucketConfig>,
    /// Where a successful run writes its Prometheus metrics (node_exporter's textfile
    /// collector: `--collector.textfile.directory`), so an alert fires when backups stop.
    #[serde(default)]
    pub metrics_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSource {
    /// The cluster's client endpoints; the leader's state is taken. The platform token (or a
    /// service's with `admin`) comes from `$SUANLI_BROKER_PLATFORM_TOKEN`.
    pub endpoints: Vec<String>,
    /// The cluster CA, to check `https://` endpoints.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortalSource {
    /// `sqlite://…` or `postgres://user@host/db` (a password through `$PGPASSWORD` or
    /// `~/.pgpass`, never in this file).
    pub database_url: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsSource {
    /// The scheduler's `--artifacts-dir`.
    pub dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    backup: BackupConfig,
}

impl BackupConfig {
    /// Reads `[backup]` from a TOML file.
    pub fn load(path: &Path) -> Result<BackupConfig, BackupError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        BackupConfig::parse(&text).map_err(|e| BackupError::Config(format!("{}: {e}", path.display())))
    }

    pub fn parse(text: &str) -> Result<BackupConfig, String> {
        let config = toml::from_str::<ConfigFile>(text).map_err(|e| e.to_string())?.backup;
        if config.keep == 0 {
            return Err("backup.keep must be at least 1".into());
        }
        if config.broker.endpoints.is_empty() {
            return Err("backup.broker.endpoints names no node".into());
        }
        Ok(config)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    Portal,
    Broker,
    Artifacts,
}

/// The manifest tying the parts together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformManifest {
    pub backup_format: u32,
    pub name: String,
    pub began_at_ms: i64,
    pub finished_at_ms: i64,
    /// In the order they were taken.
    pub parts: Vec<Part>,
    /// Every file of every part, relative to the backup's directory, sorted by path.
    pub files: Vec<FileRecord>,
    /// Artifacts (in the pool) and their bytes.
    pub artifacts: u64,
    pub artifact_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{program} failed ({status}): {stderr}")]
    Tool { program: String, status: String, stderr: String },
    #[error("artifacts: {0}")]
    Artifacts(#[from] artifacts::ArtifactsBackupError),
    #[error("store: {0}")]
    Store(#[from] suanli_artifacts::StoreError),
    #[error("off-site: {0}")]
    Bucket(#[from] BucketError),
    #[error("the backup is damaged or mismatched: {0}")]
    Damaged(String),
    #[error("backup format {0}; this program reads format {PLATFORM_BACKUP_FORMAT}")]
    Format(u32),
    #[error("{0} is not empty: a restore writes only into new places")]
    NotEmpty(PathBuf),
    #[error("another backup is running in {0}")]
    Busy(PathBuf),
    #[error("no backup named {0}")]
    NoSuchBackup(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(path.to_owned(), e)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// `20261203T080000Z` for a Unix time in milliseconds.
pub fn backup_name(unix_ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_ms.div_euclid(1000)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}{:02}{:02}T{:02}{:02}{:02}Z", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute(), t.second())
}

fn is_backup_name(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() == 16 && b[8] == b'T' && b[15] == b'Z' && b.iter().enumerate().all(|(i, c)| i == 8 || i == 15 || c.is_ascii_digit())
}

/// The program `name` (`suanli-broker`, `suanli-portal`): in `bin_dir`, else beside this
/// program, else found on `$PATH`.
fn program(bin_dir: Option<&Path>, name: &str) -> PathBuf {
    if let Some(dir) = bin_dir {
        return dir.join(name);
    }
    if let Some(beside) = std::env::current_exe().ok().and_then(|exe| exe.parent().map(|d| d.join(name))).filter(|p| p.is_file()) {
        return beside;
    }
    PathBuf::from(name)
}

async fn run(command: &mut Command) -> Result<(), BackupError> {
    let program = command.as_std().get_program().to_string_lossy().into_owned();
    let out = command.output().await.map_err(io(Path::new(&program)))?;
    if out.status.success() {
        return Ok(());
    }
    Err(BackupError::Tool { program, status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
}

/// Holds the backup root: exclusively for what writes or deletes there (take, run, fetch), so
/// two runs never sweep each other's pool; shared for what reads a backup (verify, restore), so
/// a scheduled run never prunes the backup being restored under it.
pub struct RootLock {
    _file: std::fs::File,
}

impl RootLock {
    pub fn take(root: &Path) -> Result<RootLock, BackupError> {
        RootLock::lock(root, rustix::fs::FlockOperation::NonBlockingLockExclusive)
    }

    pub fn shared(root: &Path) -> Result<RootLock, BackupError> {
        RootLock::lock(root, rustix::fs::FlockOperation::NonBlockingLockShared)
    }

    fn lock(root: &Path, how: rustix::fs::FlockOperation) -> Result<RootLock, BackupError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let path = root.join(".lock");
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))?;
        rustix::fs::flock(&file, how).map_err(|_| BackupError::Busy(root.to_owned()))?;
        Ok(RootLock { _file: file })
    }
}

fn sha256_file(path: &Path) -> Result<(u64, String), BackupError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// Every regular file under `dir`, as paths relative to `base` with `/` separators.
fn files_under(base: &Path, dir: &Path, out: &mut Vec<FileRecord>) -> Result<(), BackupError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            files_under(base, &path, out)?;
        } else if kind.is_file() {
            let (bytes, sha256) = sha256_file(&path)?;
            let relative = path.strip_prefix(base).map_err(|_| BackupError::Damaged(format!("{} is outside the backup", path.display())))?;
            out.push(FileRecord { path: relative.to_string_lossy().replace('\\', "/"), bytes, sha256 });
        }
    }
    Ok(())
}

fn write_json_synced(path: &Path, value: &impl Serialize) -> Result<(), BackupError> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let text = serde_json::to_vec_pretty(value).map_err(|e| BackupError::Damaged(e.to_string()))?;
    std::fs::write(&partial, text).map_err(io(&partial))?;
    std::fs::File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    std::fs::rename(&partial, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    }
    Ok(())
}

/// Takes a backup of the running platform into a new directory of the root.
pub async fn take(config: &BackupConfig) -> Result<PlatformManifest, BackupError> {
    let _lock = RootLock::take(&config.dir)?;
    take_locked(config, &BTreeSet::new()).await
}

/// Takes a backup under a name neither the root nor `taken` (the names off-site, where another
/// root may have sent one in the same second) holds.
async fn take_locked(config: &BackupConfig, taken: &BTreeSet<String>) -> Result<PlatformManifest, BackupError> {
    let began_at_ms = now_ms();
    let mut name = backup_name(began_at_ms);
    while config.dir.join(&name).exists() || taken.contains(&name) {
        // Two backups in one second: the second waits for the next name.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        name = backup_name(now_ms());
    }
    let out = config.dir.join(&name);
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let taken = take_parts(config, &out).await;
    let manifest = match taken {
        Ok((artifacts, artifact_bytes)) => {
            let mut files = Vec::new();
            files_under(&out, &out, &mut files)?;
            files.sort_by(|a, b| a.path.cmp(&b.path));
            PlatformManifest {
                backup_format: PLATFORM_BACKUP_FORMAT,
                name: name.clone(),
                began_at_ms,
                finished_at_ms: now_ms(),
                parts: vec![Part::Portal, Part::Broker, Part::Artifacts],
                files,
                artifacts,
                artifact_bytes,
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&out);
            return Err(e);
        }
    };
    write_json_synced(&out.join(MANIFEST), &manifest)?;
    Ok(manifest)
}

async fn take_parts(config: &BackupConfig, out: &Path) -> Result<(u64, u64), BackupError> {
    run(Command::new(program(config.bin_dir.as_deref(), "suanli-portal"))
        .arg("--database-url")
        .arg(&config.portal.database_url)
        .arg("backup")
        .arg("--out")
        .arg(out.join("portal")))
    .await?;
    let mut broker = Command::new(program(config.bin_dir.as_deref(), "suanli-broker"));
    broker.arg("backup").arg("--endpoint").arg(config.broker.endpoints.join(",")).arg("--out").arg(out.join("broker"));
    if let Some(ca) = &config.broker.ca {
        broker.arg("--ca").arg(ca);
    }
    run(&mut broker).await?;
    let pool = LocalStore::open(&config.dir.join(POOL), u64::MAX)?;
    let manifest = artifacts::take(&config.artifacts.dir, &pool).await?;
    write_json_synced(&out.join(ARTIFACTS_MANIFEST), &manifest)?;
    Ok((manifest.artifacts.len() as u64, manifest.total_bytes()))
}

/// Reads a backup's manifest and checks every file it names (size and SHA-256), that no file
/// was added, and every artifact in the pool (re-hashed).
pub async fn verify(root: &Path, name: &str) -> Result<PlatformManifest, BackupError> {
    let _lock = RootLock::shared(root)?;
    verify_unlocked(root, name, Depth::Artifacts).await
}

/// How far a verification goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// The backup's own files only: its artifacts were hashed on their way into the pool.
    Files,
    /// And every artifact in the pool, re-hashed (bit rot, a damaged copy).
    Artifacts,
}

async fn verify_unlocked(root: &Path, name: &str, depth: Depth) -> Result<PlatformManifest, BackupError> {
    let dir = root.join(name);
    let manifest = read_manifest(&dir)?;
    if manifest.name != name {
        return Err(BackupError::Damaged(format!("the manifest in {name} is backup {}'s", manifest.name)));
    }
    let mut found = Vec::new();
    files_under(&dir, &dir, &mut found)?;
    found.retain(|f| f.path != MANIFEST);
    found.sort_by(|a, b| a.path.cmp(&b.path));
    for expected in &manifest.files {
        match found.iter().find(|f| f.path == expected.path) {
            None => return Err(BackupError::Damaged(format!("{} is missing", expected.path))),
            Some(f) if f != expected => {
                return Err(BackupError::Damaged(format!(
                    "{} is {} bytes with SHA-256 {}; the manifest says {} bytes, {}",
                    f.path, f.bytes, f.sha256, expected.bytes, expected.sha256
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = found.iter().find(|f| !manifest.files.iter().any(|e| e.path == f.path)) {
        return Err(BackupError::Damaged(format!("{} is not part of this backup", extra.path)));
    }
    if depth == Depth::Artifacts {
        let artifacts = read_artifacts_manifest(&dir)?;
        artifacts::verify(&artifacts, &LocalStore::reader(&root.join(POOL))).await?;
    }
    Ok(manifest)
}

fn read_manifest(dir: &Path) -> Result<PlatformManifest, BackupError> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackupError::Damaged(format!("{} has no {MANIFEST}: the backup never finished", dir.display())))
        }
        Err(e) => return Err(io(&path)(e)),
    };
    #[derive(Deserialize)]
    struct Version {
        backup_format: u32,
    }
    let version: Version = serde_json::from_str(&text).map_err(|e| BackupError::Damaged(format!("{MANIFEST}: {e}")))?;
    if version.backup_format != PLATFORM_BACKUP_FORMAT {
        return Err(BackupError::Format(version.backup_format));
    }
    serde_json::from_str(&text).map_err(|e| BackupError::Damaged(format!("{MANIFEST}: {e}")))
}

fn read_artifacts_manifest(dir: &Path) -> Result<ArtifactsManifest, BackupError> {
    let path = dir.join(ARTIFACTS_MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| BackupError::Damaged(format!("{ARTIFACTS_MANIFEST}: {e}")))
}

/// Finished backups in the root, oldest first.
pub fn list(root: &Path) -> Result<Vec<String>, BackupError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let name = entry.map_err(io(root))?.file_name().to_string_lossy().into_owned();
        if is_backup_name(&name) && root.join(&name).join(MANIFEST).is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Where a restore puts each part: all new (a restore never writes over anything).
#[derive(Clone, Debug)]
pub struct RestoreTarget {
    pub portal_database_url: String,
    pub broker_data_dir: PathBuf,
    pub broker_node_id: u64,
    pub broker_peer_address: String,
    pub artifacts_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
}

/// Restores backup `name` of `root`: checks everything first, then the portal database (which
/// refuses a database with tables before writing), the broker's first node, and the artifacts.
pub async fn restore(root: &Path, name: &str, target: &RestoreTarget) -> Result<PlatformManifest, BackupError> {
    let _lock = RootLock::shared(root)?;
    let manifest = verify_unlocked(root, name, Depth::Artifacts).await?;
    for dir in [&target.broker_data_dir, &target.artifacts_dir] {
        if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
            return Err(BackupError::NotEmpty(dir.clone()));
        }
    }
    let dir = root.join(name);
    let bin_dir = target.bin_dir.as_deref();
    run(Command::new(program(bin_dir, "suanli-portal"))
        .arg("--database-url")
        .arg(&target.portal_database_url)
        .arg("restore")
        .arg("--backup")
        .arg(dir.join("portal")))
    .await?;
    run(Command::new(program(bin_dir, "suanli-broker"))
        .arg("restore")
        .arg("--backup")
        .arg(dir.join("broker"))
        .arg("--data-dir")
        .arg(&target.broker_data_dir)
        .arg("--node-id")
        .arg(target.broker_node_id.to_string())
        .arg("--peer-address")
        .arg(&target.broker_peer_address))
    .await?;
    let artifacts_manifest = read_artifacts_manifest(&dir)?;
    artifacts::restore(&artifacts_manifest, &LocalStore::reader(&root.join(POOL)), &target.artifacts_dir).await?;
    Ok(manifest)
}

/// What one scheduled run did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    pub manifest: PlatformManifest,
    pub pruned: Vec<String>,
    pub pool_swept: usize,
    /// Files and artifacts sent off-site (what was there already is not sent again).
    pub sent_offsite: usize,
}

/// One scheduled run: take a backup, verify it, copy it off-site, then keep only the newest
/// `keep` backups here and there (and the pool's artifacts they need).
pub async fn run_once(config: &BackupConfig) -> Result<RunReport, BackupError> {
    let _lock = RootLock::take(&config.dir)?;
    // A run that died midway left a directory without a manifest: never a backup, so removed.
    for entry in std::fs::read_dir(&config.dir).map_err(io(&config.dir))? {
        let name = entry.map_err(io(&config.dir))?.file_name().to_string_lossy().into_owned();
        if is_backup_name(&name) && !config.dir.join(&name).join(MANIFEST).exists() {
            std::fs::remove_dir_all(config.dir.join(&name)).map_err(io(&config.dir.join(&name)))?;
        }
    }
    let bucket = config.offsite.as_ref().map(Bucket::connect).transpose()?;
    let mut taken = BTreeSet::new();
    if let Some(bucket) = &bucket {
        taken.extend(bucket.list("").await?.iter().filter_map(|k| k.split('/').next()).filter(|t| is_backup_name(t)).map(str::to_owned));
    }
    let manifest = take_locked(config, &taken).await?;
    // Its artifacts were hashed on their way into the pool; `backup verify` re-hashes them all.
    verify_unlocked(&config.dir, &manifest.name, Depth::Files).await?;
    let mut sent_offsite = 0;
    if let Some(bucket) = &bucket {
        sent_offsite = send_offsite(bucket, &config.dir, &manifest).await?;
    }
    let names = list(&config.dir)?;
    let (old, kept) = names.split_at(names.len().saturating_sub(config.keep));
    for name in old {
        std::fs::remove_dir_all(config.dir.join(name)).map_err(io(&config.dir.join(name)))?;
    }
    let kept_artifacts = kept.iter().map(|n| read_artifacts_manifest(&config.dir.join(n))).collect::<Result<Vec<_>, _>>()?;
    let pool_swept = artifacts::sweep_pool(&LocalStore::open(&config.dir.join(POOL), u64::MAX)?, &kept_artifacts).await?;
    if let Some(bucket) = &bucket {
        prune_offsite(bucket, config.keep).await?;
    }
    if let Some(path) = &config.metrics_file {
        write_metrics(path, &manifest)?;
    }
    Ok(RunReport { manifest, pruned: old.to_vec(), pool_swept, sent_offsite })
}

/// The textfile a successful run leaves for node_exporter (written beside, then renamed).
fn write_metrics(path: &Path, m: &PlatformManifest) -> Result<(), BackupError> {
    let file_bytes: u64 = m.files.iter().map(|f| f.bytes).sum();
    let text = format!(
        "# HELP suanli_backup_last_success_timestamp_seconds When the last backup run finished (verified, copied off-site, pruned).\n\
         # TYPE suanli_backup_last_success_timestamp_seconds gauge\n\
         suanli_backup_last_success_timestamp_seconds {}\n\
         # HELP suanli_backup_last_duration_seconds How long the last backup took.\n\
         # TYPE suanli_backup_last_duration_seconds gauge\n\
         suanli_backup_last_duration_seconds {}\n\
         # HELP suanli_backup_last_bytes The last backup's files and artifacts.\n\
         # TYPE suanli_backup_last_bytes gauge\n\
         suanli_backup_last_bytes {}\n",
        m.finished_at_ms / 1000,
        (m.finished_at_ms - m.began_at_ms) as f64 / 1000.0,
        file_bytes + m.artifact_bytes,
    );
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    std::fs::write(&partial, text).map_err(io(&partial))?;
    std::fs::rename(&partial, path).map_err(io(path))
}

fn pool_key(sha256: &str) -> String {
    format!("{POOL}/{sha256}")
}

fn pool_file(root: &Path, sha256: &str) -> Result<PathBuf, BackupError> {
    let digest: suanli_artifacts::Digest = sha256.parse()?;
    let hex = digest.to_hex();
    Ok(root.join(POOL).join(&hex[..2]).join(hex))
}

/// Sends a verified backup off-site: pool artifacts it needs that are not there yet, its
/// files, then its manifest. Returns how many objects were sent.
pub async fn send_offsite(bucket: &Bucket, root: &Path, manifest: &PlatformManifest) -> Result<usize, BackupError> {
    let dir = root.join(&manifest.name);
    let mut sent = 0;
    for artifact in read_artifacts_manifest(&dir)?.artifacts {
        if bucket.size(&pool_key(&artifact.sha256)).await? != Some(artifact.bytes) {
            bucket.put_file(&pool_key(&artifact.sha256), &pool_file(root, &artifact.sha256)?).await?;
            sent += 1;
        }
    }
    for file in &manifest.files {
        bucket.put_file(&format!("{}/{}", manifest.name, file.path), &dir.join(&file.path)).await?;
        sent += 1;
    }
    bucket.put_file(&format!("{}/{MANIFEST}", manifest.name), &dir.join(MANIFEST)).await?;
    Ok(sent + 1)
}

/// Keeps the newest `keep` finished backups off-site — counted there, whatever the local root
/// holds (a lost or new local volume must not cost the off-site copies) — and the pool objects
/// they need. A stale backup goes manifest first (no longer a finished backup, its leftovers
/// are stale however the pruning ends); pool objects go last.
async fn prune_offsite(bucket: &Bucket, keep: usize) -> Result<(), BackupError> {
    let finished = list_offsite(bucket).await?;
    let kept: BTreeSet<&str> = finished.iter().rev().take(keep).map(String::as_str).collect();
    let mut needed = BTreeSet::new();
    for name in &kept {
        let text = bucket.get_bytes(&format!("{name}/{ARTIFACTS_MANIFEST}")).await?;
        let manifest: ArtifactsManifest =
            serde_json::from_slice(&text).map_err(|e| BackupError::Damaged(format!("{name}/{ARTIFACTS_MANIFEST} off-site: {e}")))?;
        needed.extend(manifest.artifacts.into_iter().map(|a| pool_key(&a.sha256)));
    }
    // Only backups older than the oldest kept one are stale: a newer one without a manifest may
    // be on its way from another run.
    let oldest_kept = kept.iter().next().copied().unwrap_or_default();
    let keys = bucket.list("").await?;
    let stale_backup = |top: &str| is_backup_name(top) && !kept.contains(top) && top < oldest_kept;
    for key in keys.iter().filter(|k| k.ends_with(&format!("/{MANIFEST}")) && stale_backup(k.split('/').next().unwrap_or_default())) {
        bucket.delete(key).await?;
    }
    for key in keys.iter().filter(|k| stale_backup(k.split('/').next().unwrap_or_default())) {
        bucket.delete(key).await?;
    }
    for key in keys.iter().filter(|k| k.split('/').next() == Some(POOL) && !needed.contains(*k)) {
        bucket.delete(key).await?;
    }
    Ok(())
}

/// Backups that have a manifest off-site, oldest first.
pub async fn list_offsite(bucket: &Bucket) -> Result<Vec<String>, BackupError> {
    let keys = bucket.list("").await?;
    let mut names: Vec<String> = keys.iter().filter_map(|k| k.strip_suffix(&format!("/{MANIFEST}"))).filter(|n| is_backup_name(n)).map(str::to_owned).collect();
    names.sort();
    Ok(names)
}

/// Brings backup `name` back from off-site into the (new or existing) root `into`, with the
/// artifacts it needs, and verifies it there.
pub async fn fetch_offsite(bucket: &Bucket, name: &str, into: &Path) -> Result<PlatformManifest, BackupError> {
    if !is_backup_name(name) || !list_offsite(bucket).await?.iter().any(|n| n == name) {
        return Err(BackupError::NoSuchBackup(name.to_owned()));
    }
    let _lock = RootLock::take(into)?;
    let dir = into.join(name);
    if std::fs::read_dir(&dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(BackupError::NotEmpty(dir));
    }
    let staging = into.join(".fetching");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let fetched = fetch_files(bucket, name, into, &staging).await;
    if fetched.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let _ = std::fs::remove_dir_all(&staging);
    fetched?;
    verify_unlocked(into, name, Depth::Artifacts).await
}

/// The files of backup `name` into `into/name`, its artifacts into the pool, and its manifest
/// last (until then the directory is no finished backup).
async fn fetch_files(bucket: &Bucket, name: &str, into: &Path, staging: &Path) -> Result<(), BackupError> {
    let dir = into.join(name);
    let staged_manifest = staging.join(MANIFEST);
    bucket.get_file(&format!("{name}/{MANIFEST}"), &staged_manifest).await?;
    let manifest = read_manifest(staging)?;
    for file in &manifest.files {
        let relative = Path::new(&file.path);
        if file.path.is_empty()
            || file.path == MANIFEST
            || relative.is_absolute()
            || relative.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(BackupError::Damaged(format!("{:?} is not a path inside the backup", file.path)));
        }
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        bucket.get_file(&format!("{name}/{}", file.path), &path).await?;
    }
    let pool = LocalStore::open(&into.join(POOL), u64::MAX)?;
    for artifact in read_artifacts_manifest(&dir)?.artifacts {
        let digest: suanli_artifacts::Digest = artifact.sha256.parse()?;
        if pool.size(digest).await.ok() == Some(artifact.bytes) {
            continue;
        }
        let file = staging.join(&artifact.sha256);
        bucket.get_file(&pool_key(&artifact.sha256), &file).await?;
        let reader = tokio::fs::File::open(&file).await.map_err(io(&file))?;
        // Hashed on its way into the pool: a damaged copy is refused here.
        pool.put(Box::new(reader), Some(digest)).await?;
        std::fs::remove_file(&file).map_err(io(&file))?;
    }
    std::fs::rename(&staged_manifest, dir.join(MANIFEST)).map_err(io(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_names_sort_by_time_and_nothing_else_is_taken_for_one() {
        assert_eq!(backup_name(1_796_284_800_000), "20261203T080000Z");
        assert!(backup_name(1_796_284_800_000) < backup_name(1_796_284_801_000));
        assert!(is_backup_name("20261203T080000Z"));
        for other in [POOL, ".lock", "20261203T080000", "2026120XT080000Z", "20261203T080000Z.partial"] {
            assert!(!is_backup_name(other), "{other}");
        }
    }

    #[test]
    fn the_example_configuration_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../backup.example.toml");
        let config = BackupConfig::load(&path).expect("ops/backup.example.toml");
        assert!(config.keep >= 1);
        assert!(config.offsite.is_some(), "the example shows the off-site copy");
    }

    #[test]
    fn a_configuration_that_keeps_nothing_or_names_no_broker_is_refused() {
        let base = "[backup]\ndir = \"/b\"\nkeep = 1\n[backup.broker]\nendpoints = [\"http://127.0.0.1:50051\"]\n[backup.portal]\ndatabase_url = \"sqlite:///p.db\"\n[backup.artifacts]\ndir = \"/a\"\n";
        assert!(BackupConfig::parse(base).is_ok());
        assert!(BackupConfig::parse(&base.replace("keep = 1", "keep = 0")).unwrap_err().contains("keep"));
        assert!(BackupConfig::parse(&base.replace("[\"http://127.0.0.1:50051\"]", "[]")).unwrap_err().contains("endpoints"));
        assert!(BackupConfig::parse(&base.replace("keep = 1", "keep = 1\nkep = 2")).is_err(), "an unknown key is a typo, refused");
    }
}

/// Backups are read years after they were written: format 1's manifests, as written then, must
/// read the same forever (`ops/suanli-ops/formats/`). A change that breaks these tests needs a
/// new `backup_format` and a reader for the old one.
#[cfg(test)]
mod format_tests {
    use super::*;

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("formats").join(name)).expect("fixture")
    }

    #[test]
    fn a_format_1_platform_manifest_reads_as_written() {
        let text = fixture("platform-manifest-v1.json");
        let manifest: PlatformManifest = serde_json::from_str(&text).expect("format 1 reads");
        assert_eq!(manifest.name, "20261203T080000Z");
        assert_eq!(manifest.parts, vec![Part::Portal, Part::Broker, Part::Artifacts]);
        assert_eq!(manifest.files.len(), 5);
        let written: serde_json::Value = serde_json::to_value(&manifest).expect("json");
        assert_eq!(
            written,
            serde_json::from_str::<serde_json::Value>(&text).expect("json"),
            "written as format 1 was: bump PLATFORM_BACKUP_FORMAT and keep a reader for 1"
        );
    }

    #[test]
    fn a_format_1_artifacts_manifest_reads_as_written() {
        let text = fixture("artifacts-manifest-v1.json");
        let manifest: ArtifactsManifest = serde_json::from_str(&text).expect("format 1 reads");
        assert_eq!((manifest.artifacts.len(), manifest.owners.len(), manifest.total_bytes()), (2, 1, 1024));
        let written: serde_json::Value = serde_json::to_value(&manifest).expect("json");
        assert_eq!(
            written,
            serde_json::from_str::<serde_json::Value>(&text).expect("json"),
            "written as format 1 was: bump ARTIFACTS_BACKUP_FORMAT and keep a reader for 1"
        );
    }

    #[test]
    fn a_manifest_of_a_later_format_is_refused_by_its_number() {
        let dir = tempfile::tempdir().expect("dir");
        let later = fixture("platform-manifest-v1.json").replace("\"backup_format\": 1", "\"backup_format\": 2");
        std::fs::write(dir.path().join(MANIFEST), later).expect("write");
        assert!(matches!(read_manifest(dir.path()), Err(BackupError::Format(2))));
    }
}
