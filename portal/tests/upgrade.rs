//! The portal's rolling upgrade, expand then contract, with the previous release's real binary
//! (`ops/previous-release`, built by `ops/build-previous-release`): a portal of that release
//! serves a PostgreSQL database; a portal of this build starts on the same database and applies
//! this release's expand migrations while the old one goes on serving; accounts made through
//! either log in through the other; then `migrate --contract` runs (this release has no
//! contract migration: the schema stays where expand put it).

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use suanli_testkit::cluster::{previous_release_binary, PLATFORM_TOKEN};
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use support::{activation_token, registration, Api, Backend, World, PASSWORD};

async fn psql(url: &str, query: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("psql").args([url, "-Atc", query]).output().await?;
    anyhow::ensure!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Registers a researcher through the portal at `api`, activates it from the mail and logs in.
async fn register(w: &World, api: &Api, username: &str) -> anyhow::Result<()> {
    let email = format!("{username}@example.cn");
    let (status, body) = api.post("/api/v1/accounts", registration("researcher", username, &email)).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "registration of {username}: {status} {body}");
    let token = activation_token(&w.smtp.wait_for(&email, Duration::from_secs(20)).await?.text)?;
    let (status, body) = api.post("/api/v1/activation", json!({ "token": token })).await?;
    anyhow::ensure!(status == StatusCode::OK && body["state"] == "active", "activation: {status} {body}");
    api.login(username, PASSWORD).await?;
    Ok(())
}

async fn signed_in(api: &Api, who: &str) -> anyhow::Result<()> {
    let (status, me) = api.get("/api/v1/me").await?;
    anyhow::ensure!(status == StatusCode::OK && me["username"] == who, "{status} {me}");
    Ok(())
}

#[tokio::test]
async fn a_portal_of_the_previous_release_keeps_serving_while_this_release_expands_its_database() -> anyhow::Result<()> {
    let previous = previous_release_binary("suanli-portal")?;
    let Some(w) = World::start_binary(Backend::Postgres, &[], Some(&previous)).await? else {
        anyhow::ensure!(std::env::var("CI").as_deref() != Ok("true"), "SUANLI_TEST_POSTGRES_URL is needed under CI=true");
        return Ok(());
    };
    let result = scenario(&w).await;
    w.explain(result)
}

async fn scenario(w: &World) -> anyhow::Result<()> {
    let old = w.client();
    register(w, &old, "made_before").await?;
    let before: i64 = psql(&w.database_url(), "SELECT COUNT(*) FROM portal_schema").await?.parse()?;

    // This build's portal on the same database (the same key file: the same directory).
    let broker = format!("http://{}", w.broker.address(1)?);
    let operator_key = w.dir.path().join("operator-key").display().to_string();
    let new_portal = PortalProcess::start(
        w.dir.path(),
        &PortalOptions {
            smtp: Some(&w.smtp.address),
            extra: &["--operator-key-file", &operator_key],
            ..PortalOptions::new(&broker, PLATFORM_TOKEN, &w.database_url())
        },
    )
    .await?;
    let after: i64 = psql(&w.database_url(), "SELECT COUNT(*) FROM portal_schema").await?.parse()?;
    anyhow::ensure!(after == suanli_portal::db::SCHEMA_VERSION && after > before, "expanded from {before} to {after}");
    let instances = psql(&w.database_url(), "SELECT knows_version FROM portal_instances").await?;
    anyhow::ensure!(instances == after.to_string(), "the new portal says it runs: {instances:?}");

    // Both serve, each with the other's accounts: the old one on an expanded schema.
    signed_in(&old, "made_before").await?;
    let new = Api::new(&new_portal.url);
    new.login("made_before", PASSWORD).await?;
    signed_in(&new, "made_before").await?;
    register(w, &Api::new(&new_portal.url), "made_during").await?;
    let old_again = w.client();
    old_again.login("made_during", PASSWORD).await?;
    signed_in(&old_again, "made_during").await?;
    let (status, catalogue) = old.get("/api/v1/catalogue").await?;
    anyhow::ensure!(status == StatusCode::OK, "the old portal's catalogue: {status} {catalogue}");

    // The rollout done, the operator contracts: nothing to contract in this release.
    let out = tokio::process::Command::new(suanli_testkit::workspace_binary("suanli-portal", "suanli-portal")?)
        .args(["--database-url", &w.database_url(), "--key-file"])
        .arg(w.dir.path().join("portal-keys.toml"))
        .args(["migrate", "--contract"])
        .output()
        .await?;
    let said = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success() && said.contains(&format!("schema version {after}")), "{said}{}", String::from_utf8_lossy(&out.stderr));
    signed_in(&new, "made_before").await?;
    Ok(())
}
