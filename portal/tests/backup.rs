//! `suanli-portal backup` and `restore`, as an operator runs them, on SQLite and PostgreSQL: a
//! restored database holds every row the backed-up one held; a damaged backup, a non-empty
//! target and a used backup directory are refused, and nothing is written.

use sqlx::any::AnyPoolOptions;
use sqlx::Row;
use suanli_testkit::portal::command as portal;
use suanli_testkit::portal::database_url;

/// Every table's name and row count.
async fn contents(url: &str) -> Vec<(String, i64)> {
    sqlx::any::install_default_drivers();
    let url = if url.starts_with("sqlite:") { format!("{url}?mode=ro") } else { url.to_owned() };
    let pool = AnyPoolOptions::new().max_connections(1).connect(&url).await.expect("connect");
    let list = if url.starts_with("sqlite:") {
        "SELECT name AS t FROM sqlite_master WHERE type = 'table' ORDER BY name"
    } else {
        "SELECT table_name::text AS t FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name"
    };
    let names: Vec<String> = sqlx::query(list).fetch_all(&pool).await.expect("tables").iter().map(|r| r.try_get("t").expect("name")).collect();
    let mut out = Vec::new();
    for name in names {
        let n: i64 = sqlx::query(&format!("SELECT COUNT(*) AS n FROM {name}")).fetch_one(&pool).await.expect("count").try_get("n").expect("n");
        out.push((name, n));
    }
    pool.close().await;
    out
}

async fn round_trip(postgres: bool) {
    let dir = tempfile::TempDir::new().expect("tempdir");
    let Some(original) = database_url(dir.path(), postgres).await.expect("database") else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "SUANLI_TEST_POSTGRES_URL is needed under CI=true");
        eprintln!("SUANLI_TEST_POSTGRES_URL is not set: skipping the PostgreSQL run");
        return;
    };
    let keys = dir.path().join("keys.toml");
    for (name, roles) in [("ops_zhao", "monitor"), ("audit_sun", "auditor")] {
        let made = portal(&original, &keys, &["create-operator", "--username", name, "--email", &format!("{name}@suanli.test"), "--roles", roles]).await;
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    }
    let before = contents(&original).await;
    assert!(before.iter().any(|(t, n)| t == "users" && *n >= 2), "{before:?}");

    let backup = dir.path().join("backup");
    let taken = portal(&original, &keys, &["backup", "--out", &backup.display().to_string()]).await;
    assert!(taken.status.success(), "{}", String::from_utf8_lossy(&taken.stderr));
    let again = portal(&original, &keys, &["backup", "--out", &backup.display().to_string()]).await;
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("not empty"), "a used directory is refused");

    // Into the database it came from (not empty): refused, nothing changed.
    let onto = portal(&original, &keys, &["restore", "--backup", &backup.display().to_string()]).await;
    assert!(!onto.status.success() && String::from_utf8_lossy(&onto.stderr).contains("not empty"));
    assert_eq!(contents(&original).await, before);

    // Into a new one: every table with every row.
    let restored = if postgres {
        database_url(dir.path(), true).await.expect("database").expect("postgres")
    } else {
        format!("sqlite://{}/restored.db", dir.path().display())
    };
    let done = portal(&restored, &keys, &["restore", "--backup", &backup.display().to_string()]).await;
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert_eq!(contents(&restored).await, before);
    // The restored database serves the portal: its operators are there (a second one of the
    // same name is refused).
    let twice = portal(&restored, &keys, &["create-operator", "--username", "ops_zhao", "--email", "other@suanli.test", "--roles", "monitor"]).await;
    assert!(!twice.status.success(), "ops_zhao came back with the restore");

    // One flipped byte: refused before anything is written.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir_all(&damaged).expect("dir");
    for entry in std::fs::read_dir(&backup).expect("backup") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), damaged.join(entry.file_name())).expect("copy");
    }
    let file = if postgres { "portal.dump" } else { "portal.sqlite" };
    let mut bytes = std::fs::read(damaged.join(file)).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(damaged.join(file), bytes).expect("write");
    let target = if postgres {
        database_url(dir.path(), true).await.expect("database").expect("postgres")
    } else {
        format!("sqlite://{}/never.db", dir.path().display())
    };
    let refused = portal(&target, &keys, &["restore", "--backup", &damaged.display().to_string()]).await;
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("damaged"), "{}", String::from_utf8_lossy(&refused.stderr));
    if !postgres {
        assert!(!dir.path().join("never.db").exists(), "nothing was written");
    } else {
        assert!(contents(&target).await.is_empty(), "nothing was written");
    }
    for url in [&original, &restored, &target] {
        suanli_testkit::portal::drop_database(url);
    }
}

#[tokio::test]
async fn a_backup_restores_every_row_on_sqlite_and_refuses_damage_and_occupied_targets() {
    round_trip(false).await;
}

#[tokio::test]
async fn a_backup_restores_every_row_on_postgres_and_refuses_damage_and_occupied_targets() {
    round_trip(true).await;
}
