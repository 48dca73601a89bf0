//! Backups of the whole platform (`suanli-ops backup`), as an operator runs them: the restore
//! drill — back up while leases are being made and artifacts uploaded, copy off-site to a real
//! S3 server (SeaweedFS), destroy everything here, fetch the backup back, restore to new
//! directories, ports and database, and find every acknowledged lease, account and artifact —
//! then retention, and the refusals of a damaged, mismatched or unfinished backup, which leave
//! nothing behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_artifacts::{Digest, LocalStore, Store};
use suanli_proto::v1;
use suanli_testkit::cluster::{leases_as_applied, BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::portal::command as portal;
use suanli_testkit::portal::{database_url, drop_database};
use suanli_testkit::s3::{S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use suanli_testkit::storm::{self, Storm};
use suanli_testkit::workspace_binary;

const BUCKET: &str = "suanli-offsite";

fn ops() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-ops"))
}

fn broker() -> PathBuf {
    workspace_binary("suanli-broker", "suanli-broker").expect("broker binary")
}

/// Where the broker and portal binaries are (the backup runs them).
fn bin_dir() -> PathBuf {
    workspace_binary("suanli-portal", "suanli-portal").expect("portal binary");
    broker().parent().expect("bin dir").to_owned()
}

fn config(root: &Path, cluster: &BrokerCluster, database: &str, artifacts: &Path, s3: Option<&S3Server>, keep: usize) -> String {
    let endpoints: Vec<String> = cluster.live().iter().map(|id| format!("\"http://{}\"", cluster.address(*id).expect("address"))).collect();
    let mut text = format!(
        "[backup]\ndir = {root:?}\nkeep = {keep}\nbin_dir = {bin:?}\nmetrics_file = {metrics:?}\n[backup.broker]\nendpoints = [{endpoints}]\n[backup.portal]\ndatabase_url = {database:?}\n[backup.artifacts]\ndir = {artifacts:?}\n",
        bin = bin_dir(),
        metrics = root.with_extension("prom"),
        endpoints = endpoints.join(", "),
    );
    if let Some(s3) = s3 {
        text.push_str(&format!("[backup.offsite]\nendpoint = {:?}\nbucket = {BUCKET:?}\naccess_key_id = {ACCESS_KEY_ID:?}\nprefix = \"drill\"\n", s3.endpoint));
    }
    text
}

async fn suanli_ops(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(ops())
        .args(args)
        .env("SUANLI_BROKER_PLATFORM_TOKEN", PLATFORM_TOKEN)
        .env("SUANLI_S3_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        .output()
        .await
        .expect("run suanli-ops")
}

fn said(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

async fn create_operator(url: &str, keys: &Path, name: &str) {
    let made = portal(url, keys, &["create-operator", "--username", name, "--email", &format!("{name}@suanli.test"), "--roles", "monitor"]).await;
    assert!(made.status.success(), "{}", said(&made));
}

async fn usernames(url: &str) -> Vec<String> {
    let out = tokio::process::Command::new("psql").args([url, "-Atc", "SELECT username FROM users ORDER BY username"]).output().await.expect("psql");
    assert!(out.status.success(), "{}", said(&out));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// Random bytes of `len`, stored; returns their digest.
async fn put_artifact(store: &LocalStore, len: usize) -> Digest {
    let bytes: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
    let (digest, _) = store.put(Box::new(std::io::Cursor::new(bytes)), None).await.expect("put");
    digest
}

async fn contents(store: &LocalStore) -> BTreeMap<Digest, u64> {
    store.list().await.expect("list").into_iter().map(|l| (l.digest, l.size)).collect()
}

/// The name a `backup run` printed.
fn backup_name(out: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).expect("backup NAME verified").to_owned()
}

fn postgres_or_skip(url: Option<String>) -> Option<String> {
    if url.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "SUANLI_TEST_POSTGRES_URL is needed under CI=true");
        eprintln!("SUANLI_TEST_POSTGRES_URL is not set: skipping");
    }
    url
}

#[tokio::test]
async fn a_platform_backed_up_under_load_and_copied_off_site_comes_back_whole_after_everything_here_is_lost() {
    let dir = tempfile::tempdir().expect("dir");
    let Some(database) = postgres_or_skip(database_url(dir.path(), true).await.expect("database")) else { return };
    let s3 = S3Server::start(&dir.path().join("s3")).await.expect("SeaweedFS");
    s3.create_bucket(BUCKET).await.expect("bucket");

    // The platform: a 3-node broker cluster with a market, the portal's database with two
    // operators, an artifact store with artifacts (one of them twice).
    let cluster = BrokerCluster::start(&broker(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let market = storm::market(&cluster, leader, 8).await;
    let keys = dir.path().join("portal-keys.toml");
    for name in ["ops_zhao", "ops_qian"] {
        create_operator(&database, &keys, name).await;
    }
    let users_then = usernames(&database).await;
    let artifacts_dir = dir.path().join("artifacts");
    let store = LocalStore::open(&artifacts_dir, u64::MAX).expect("store");
    for len in [0, 1, 1000, 300_000, 2_000_000] {
        put_artifact(&store, len).await;
    }
    let root = dir.path().join("backups");
    let config_path = dir.path().join("backup.toml");
    std::fs::write(&config_path, config(&root, &cluster, &database, &artifacts_dir, Some(&s3), 2)).expect("config");
    let config_arg = config_path.display().to_string();

    // Under load: four clients leasing and ending, and an uploader, while backups are taken.
    let storm = Storm::start(&cluster, &market, 4);
    storm.progresses(0, 20, Duration::from_secs(30)).await.expect("the storm runs");
    let uploading = {
        let store = LocalStore::open(&artifacts_dir, u64::MAX).expect("store");
        tokio::spawn(async move {
            for _ in 0..40 {
                put_artifact(&store, 50_000).await;
            }
        })
    };
    let mut names = Vec::new();
    let mut leases_before = Vec::new();
    let mut artifacts_before = BTreeMap::new();
    for run in 0..3 {
        leases_before = storm.acked_leases();
        artifacts_before = contents(&store).await;
        let out = suanli_ops(&["backup", "run", "--config", &config_arg]).await;
        assert!(out.status.success(), "run {run}: {}", said(&out));
        names.push(backup_name(&out));
        let acked = storm.acked_so_far();
        storm.progresses(acked, 10, Duration::from_secs(30)).await.expect("the market goes on during backups");
    }
    uploading.await.expect("uploader");
    let history = storm.stop().await;
    history.check(&cluster).await;
    assert!(leases_before.len() >= 20, "{}", history.summary());

    // The run left its metrics for node_exporter: the last success, just now.
    let metrics = std::fs::read_to_string(root.with_extension("prom")).expect("metrics file");
    assert!(metrics.contains("suanli_backup_last_success_timestamp_seconds "), "{metrics}");
    // Retention: the newest two, here and off-site; the first went from both.
    let listed = suanli_ops(&["backup", "list", "--config", &config_arg]).await;
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().collect::<Vec<_>>(), names[1..].to_vec(), "{}", said(&listed));
    let offsite = suanli_ops(&["backup", "list", "--offsite", "--config", &config_arg]).await;
    assert_eq!(String::from_utf8_lossy(&offsite.stdout).lines().collect::<Vec<_>>(), names[1..].to_vec(), "{}", said(&offsite));

    // A new, empty local root (a replaced volume) costs the off-site copies nothing: off-site
    // keeps its own newest two.
    let fresh_root = dir.path().join("backups-on-a-new-volume");
    let fresh_config = dir.path().join("backup-fresh.toml");
    std::fs::write(&fresh_config, std::fs::read_to_string(&config_path).expect("config").replace(&format!("dir = {root:?}"), &format!("dir = {fresh_root:?}")))
        .expect("config");
    let fresh = suanli_ops(&["backup", "run", "--config", &fresh_config.display().to_string()]).await;
    assert!(fresh.status.success(), "{}", said(&fresh));
    let offsite = suanli_ops(&["backup", "list", "--offsite", "--config", &config_arg]).await;
    assert_eq!(String::from_utf8_lossy(&offsite.stdout).lines().collect::<Vec<_>>(), vec![names[2].clone(), backup_name(&fresh)], "{}", said(&offsite));

    // Everything here is lost: the cluster, the database, the artifact store, the local backups.
    drop(cluster);
    drop_database(&database);
    std::fs::remove_dir_all(&artifacts_dir).expect("artifacts gone");
    std::fs::remove_dir_all(&root).expect("local backups gone");

    // Disaster recovery: the newest backup back from off-site, then restored into new places.
    let latest = names.last().expect("a backup").clone();
    let new_root = dir.path().join("recovered");
    let fetched = suanli_ops(&["backup", "fetch", "--config", &config_arg, &latest, "--into", &new_root.display().to_string()]).await;
    assert!(fetched.status.success(), "{}", said(&fetched));
    let new_database = database_url(&dir.path().join("new"), true).await.expect("database").expect("PostgreSQL");
    let new_artifacts = dir.path().join("artifacts-restored");
    let restored = BrokerCluster::restore_with(&broker(), 3, |data: PathBuf, peer: String| {
        let (root, latest, database, artifacts) = (new_root.clone(), latest.clone(), new_database.clone(), new_artifacts.clone());
        async move {
            let out = suanli_ops(&[
                "backup",
                "restore",
                "--root",
                &root.display().to_string(),
                &latest,
                "--portal-database-url",
                &database,
                "--broker-data-dir",
                &data.display().to_string(),
                "--broker-peer-address",
                &peer,
                "--artifacts-dir",
                &artifacts.display().to_string(),
                "--bin-dir",
                &bin_dir().display().to_string(),
            ])
            .await;
            anyhow::ensure!(out.status.success(), "suanli-ops backup restore: {}", said(&out));
            Ok(())
        }
    })
    .await
    .expect("restored cluster");
    restored.converge(Duration::from_secs(60)).await.expect("the joined nodes caught up");

    // Every lease acknowledged before the backup began, on every node, with its cards.
    for id in restored.ids() {
        let now: BTreeMap<u64, v1::Lease> = leases_as_applied(&restored.client(id, PLATFORM_TOKEN).await.expect("client"), false)
            .await
            .expect("leases")
            .into_iter()
            .map(|l| (l.lease_id, l))
            .collect();
        for lease in &leases_before {
            let kept = now.get(&lease.lease_id).unwrap_or_else(|| panic!("node {id} lacks acknowledged lease {}", lease.lease_id));
            assert_eq!(kept.card_ids, lease.card_ids);
        }
    }
    // The researcher's account and token, and the portal's accounts.
    let mut researcher = restored.client(restored.leader(Duration::from_secs(10)).await.expect("leader"), &market.researcher_token).await.expect("client");
    researcher.get_balance(v1::GetBalanceRequest { account_id: 0, currency: "CNY".into() }).await.expect("the researcher's account is back");
    assert_eq!(usernames(&new_database).await, users_then);
    // The restored database opens with the same key file, and takes new accounts.
    create_operator(&new_database, &keys, "ops_sun").await;
    // Every artifact stored before the backup began, byte for byte (a put checks the hash).
    let new_store = LocalStore::open(&new_artifacts, u64::MAX).expect("restored store");
    let restored_contents = contents(&new_store).await;
    for (digest, size) in &artifacts_before {
        assert_eq!(restored_contents.get(digest), Some(size), "artifact {digest}");
    }
    drop_database(&new_database);
}

/// A small platform (one broker node, a SQLite portal, three artifacts) and one backup of it.
struct Taken {
    dir: tempfile::TempDir,
    _cluster: BrokerCluster,
    config: String,
    root: PathBuf,
    name: String,
}

async fn take_one() -> Taken {
    let dir = tempfile::tempdir().expect("dir");
    let cluster = BrokerCluster::start(&broker(), 1, None).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let database = database_url(dir.path(), false).await.expect("url").expect("sqlite");
    create_operator(&database, &dir.path().join("keys.toml"), "ops_li").await;
    let artifacts = dir.path().join("artifacts");
    let store = LocalStore::open(&artifacts, u64::MAX).expect("store");
    for len in [10, 20_000, 70_000] {
        put_artifact(&store, len).await;
    }
    let root = dir.path().join("backups");
    let config = dir.path().join("backup.toml");
    std::fs::write(&config, self::config(&root, &cluster, &database, &artifacts, None, 3)).expect("config");
    let config = config.display().to_string();
    let out = suanli_ops(&["backup", "run", "--config", &config]).await;
    assert!(out.status.success(), "{}", said(&out));
    let name = backup_name(&out);
    Taken { dir, _cluster: cluster, config, root, name }
}

impl Taken {
    async fn verify(&self, root: &Path) -> std::process::Output {
        let config = std::fs::read_to_string(&self.config).expect("config").replace(&format!("{:?}", self.root), &format!("{root:?}"));
        let path = self.dir.path().join(format!("verify-{}.toml", rand::random::<u32>()));
        std::fs::write(&path, config).expect("config");
        suanli_ops(&["backup", "verify", "--config", &path.display().to_string(), &self.name]).await
    }

    /// A copy of the backup root to damage.
    fn copy(&self, label: &str) -> PathBuf {
        let to = self.dir.path().join(label);
        let status = std::process::Command::new("cp").arg("-a").arg(&self.root).arg(&to).status().expect("cp");
        assert!(status.success());
        to
    }

    async fn restore_into(&self, root: &Path, label: &str) -> (std::process::Output, PathBuf) {
        let target = self.dir.path().join(label);
        let out = suanli_ops(&[
            "backup",
            "restore",
            "--root",
            &root.display().to_string(),
            &self.name,
            "--portal-database-url",
            &format!("sqlite://{}/portal.db", target.display()),
            "--broker-data-dir",
            &target.join("broker").display().to_string(),
            "--broker-peer-address",
            "127.0.0.1:1",
            "--artifacts-dir",
            &target.join("artifacts").display().to_string(),
            "--bin-dir",
            &bin_dir().display().to_string(),
        ])
        .await;
        (out, target)
    }
}

fn nothing_made(target: &Path) {
    assert!(!target.exists() || std::fs::read_dir(target).expect("dir").next().is_none(), "{} holds something", target.display());
}

#[tokio::test]
async fn a_backup_with_one_changed_byte_a_swapped_part_or_a_lost_artifact_is_refused_and_nothing_is_restored() {
    let taken = take_one().await;
    let whole = taken.verify(&taken.root).await;
    assert!(whole.status.success(), "{}", said(&whole));

    // One byte of the broker's state changed.
    let flipped = taken.copy("flipped");
    let state = flipped.join(&taken.name).join("broker/broker-state.bin");
    let mut bytes = std::fs::read(&state).expect("state");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&state, bytes).expect("write");
    let (out, target) = taken.restore_into(&flipped, "target-flipped").await;
    assert!(!out.status.success() && said(&out).contains("broker/broker-state.bin") && said(&out).contains("SHA-256"), "{}", said(&out));
    nothing_made(&target);

    // The portal part of another backup (taken later, of the same platform) swapped in.
    let again = suanli_ops(&["backup", "take", "--config", &taken.config]).await;
    assert!(again.status.success(), "{}", said(&again));
    let swapped = taken.copy("swapped");
    let other = suanli_ops(&["backup", "list", "--config", &taken.config]).await;
    let later = String::from_utf8_lossy(&other.stdout).lines().last().expect("a later backup").to_owned();
    assert_ne!(later, taken.name);
    std::fs::remove_dir_all(swapped.join(&taken.name).join("portal")).expect("rm");
    let status =
        std::process::Command::new("cp").arg("-a").arg(swapped.join(&later).join("portal")).arg(swapped.join(&taken.name).join("portal")).status().expect("cp");
    assert!(status.success());
    let (out, target) = taken.restore_into(&swapped, "target-swapped").await;
    assert!(!out.status.success() && said(&out).contains("portal/"), "{}", said(&out));
    nothing_made(&target);

    // An artifact lost from the pool.
    let lost = taken.copy("lost");
    let pool = LocalStore::open(&lost.join("pool"), u64::MAX).expect("pool");
    let victim = pool.list().await.expect("list")[0].digest;
    assert!(pool.delete_if_stored_before(victim, std::time::SystemTime::now() + Duration::from_secs(60)).await.expect("delete"));
    let out = taken.verify(&lost).await;
    assert!(!out.status.success() && said(&out).contains(&victim.to_hex()), "{}", said(&out));
    let (out, target) = taken.restore_into(&lost, "target-lost").await;
    assert!(!out.status.success(), "{}", said(&out));
    nothing_made(&target);

    // A backup that never finished (no manifest).
    let unfinished = taken.copy("unfinished");
    std::fs::remove_file(unfinished.join(&taken.name).join("manifest.json")).expect("rm");
    let out = taken.verify(&unfinished).await;
    assert!(!out.status.success() && said(&out).contains("never finished"), "{}", said(&out));

    // And the untouched backup restores; a second restore onto the same places is refused.
    let (out, target) = taken.restore_into(&taken.root, "target-good").await;
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(contents(&LocalStore::reader(&target.join("artifacts"))).await.len(), 3);
    let (again, _) = taken.restore_into(&taken.root, "target-good").await;
    assert!(!again.status.success() && said(&again).contains("not empty"), "{}", said(&again));
}

#[tokio::test]
async fn a_second_run_while_one_holds_the_root_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let root = dir.path().join("backups");
    let _held = suanli_ops::backup::RootLock::take(&root).expect("lock");
    let config = dir.path().join("backup.toml");
    std::fs::write(
        &config,
        format!("[backup]\ndir = {root:?}\nkeep = 1\n[backup.broker]\nendpoints = [\"http://127.0.0.1:1\"]\n[backup.portal]\ndatabase_url = \"sqlite:///nowhere.db\"\n[backup.artifacts]\ndir = \"/nowhere\"\n"),
    )
    .expect("config");
    let out = suanli_ops(&["backup", "run", "--config", &config.display().to_string()]).await;
    assert!(!out.status.success() && said(&out).contains("another backup is running"), "{}", said(&out));
    assert_eq!(std::fs::read_dir(&root).expect("root").count(), 1, "only the lock file");
}

#[test]
fn the_backup_units_verify_with_systemd_analyze() {
    let dir = tempfile::tempdir().expect("dir");
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd");
    for unit in ["suanli-backup.service", "suanli-backup.timer"] {
        // The program where the unit expects it is this build's.
        let text = std::fs::read_to_string(shipped.join(unit)).expect("unit").replace("/usr/local/bin/suanli-ops", &ops().display().to_string());
        std::fs::write(dir.path().join(unit), text).expect("unit");
    }
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("suanli-backup.service"))
        .arg(dir.path().join("suanli-backup.timer"))
        .output()
        .expect("systemd-analyze");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
