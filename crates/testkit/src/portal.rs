//! The portal as a real process, against a broker given by endpoint.

use std::path::Path;
use std::time::Duration;

use crate::{workspace_binary, Service};

pub struct PortalProcess {
    pub service: Service,
    /// `http://127.0.0.1:PORT`
    pub url: String,
}

pub struct PortalOptions<'a> {
    pub broker: &'a str,
    pub platform_token: &'a str,
    pub database_url: &'a str,
    pub smtp: Option<&'a str>,
    pub extra: &'a [&'a str],
    /// Another build of the portal (a benchmark's release binary); default: this build's.
    pub binary: Option<&'a Path>,
}

impl<'a> PortalOptions<'a> {
    pub fn new(broker: &'a str, platform_token: &'a str, database_url: &'a str) -> PortalOptions<'a> {
        PortalOptions { broker, platform_token, database_url, smtp: None, extra: &[], binary: None }
    }
}

impl PortalProcess {
    pub async fn start(dir: &Path, o: &PortalOptions<'_>) -> anyhow::Result<PortalProcess> {
        Self::start_env(dir, o, &[]).await
    }

    /// As `start`, with more environment (fail points).
    pub async fn start_env(dir: &Path, o: &PortalOptions<'_>, env: &[(&str, &str)]) -> anyhow::Result<PortalProcess> {
        let binary = match o.binary {
            Some(b) => b.to_owned(),
            None => workspace_binary("suanli-portal", "suanli-portal")?,
        };
        let mut args: Vec<String> =
            ["--database-url", o.database_url, "--broker", o.broker, "--platform-token", o.platform_token].iter().map(|s| s.to_string()).collect();
        // Any free port, unless the extra flags name one (agents told the address beforehand).
        if !o.extra.contains(&"--listen") {
            args.extend(["--listen".to_owned(), "127.0.0.1:0".to_owned()]);
        }
        args.push("--key-file".into());
        args.push(dir.join("portal-keys.toml").display().to_string());
        if let Some(smtp) = o.smtp {
            args.push("--smtp".into());
            args.push(smtp.into());
        }
        args.extend(o.extra.iter().map(|s| s.to_string()));
        // Each portal keeps its datasets in its own test folder (older releases ignore this).
        let data_dir = dir.join("portal-datasets").display().to_string();
        let mut all_env = vec![("SUANLI_PORTAL_LOG", "info,sqlx=warn"), ("SUANLI_PORTAL_DATA_DIR", data_dir.as_str())];
        all_env.extend_from_slice(env);
        let service = Service::start("portal", &binary, &args, &all_env, dir, Duration::from_secs(60)).await?;
        let url = format!("http://{}", service.get("http")?);
        Ok(PortalProcess { service, url })
    }
}

/// A database URL for a portal under test: SQLite in `dir`, or a fresh PostgreSQL database on
/// the server in `SUANLI_TEST_POSTGRES_URL` (created here; the server must allow CREATE DATABASE).
pub async fn database_url(dir: &Path, postgres: bool) -> anyhow::Result<Option<String>> {
    if !postgres {
        return Ok(Some(format!("sqlite://{}/portal.db", dir.display())));
    }
    let Ok(server) = std::env::var("SUANLI_TEST_POSTGRES_URL") else {
        // No silent passes: CI runs every PostgreSQL test, so a missing server is a failure there.
        anyhow::ensure!(std::env::var("CI").as_deref() != Ok("true"), "CI=true but SUANLI_TEST_POSTGRES_URL is not set: the PostgreSQL runs cannot be skipped");
        return Ok(None);
    };
    let name = format!("suanli_portal_test_{}", std::process::id() as u64 * 1000 + rand_suffix());
    let status = tokio::process::Command::new("psql").args([&server, "-q", "-c", &format!("CREATE DATABASE {name}")]).status().await?;
    anyhow::ensure!(status.success(), "psql could not create {name} on {server}");
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b).to_owned();
    Ok(Some(format!("{base}/{name}")))
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64 % 1000).unwrap_or(0)
}

/// Drops a database `database_url` made (PostgreSQL only; forcing out the portal's connections).
pub fn drop_database(url: &str) {
    let (Ok(server), Some((_, name))) = (std::env::var("SUANLI_TEST_POSTGRES_URL"), url.rsplit_once('/')) else { return };
    if url.starts_with("postgres") && name.starts_with("suanli_portal_test_") {
        let _ = std::process::Command::new("psql").args([&server, "-q", "-c", &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")]).status();
    }
}

/// Runs a `suanli-portal` command (`backup`, `create-operator`, …) on the database at `url`
/// with the key file `keys`, as an operator would; panics if it cannot be started.
pub async fn command(url: &str, keys: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(workspace_binary("suanli-portal", "suanli-portal").expect("portal binary"))
        .args(["--database-url", url, "--key-file"])
        .arg(keys)
        .args(args)
        .output()
        .await
        .expect("run the portal")
}

/// A signed-in browser-like session at a portal: its cookie kept, and the CSRF token its
/// writes send as `x-csrf-token`.
pub struct Session {
    pub http: reqwest::Client,
    pub csrf: String,
}

/// Signs `login` in at the portal at `url` with `password` (no TOTP: researchers and
/// suppliers, the demo accounts).
pub async fn log_in(url: &str, login: &str, password: &str) -> anyhow::Result<Session> {
    let http = reqwest::Client::builder().cookie_store(true).build()?;
    let response = http.post(format!("{url}/api/v1/session")).json(&serde_json::json!({"login": login, "password": password})).send().await?;
    let status = response.status();
    let session: serde_json::Value = response.json().await?;
    let csrf = session["csrf_token"].as_str().ok_or_else(|| anyhow::anyhow!("signing {login} in: {status} {session}"))?.to_owned();
    Ok(Session { http, csrf })
}

/// A portal (SQLite in `dir`) in demo mode whose demo researcher is the broker account
/// `researcher` (`--demo-researcher ID:TOKEN`), and an API token made for it in a signed-in
/// session, as on the account page: what a researcher's `suanli login` takes. `more` are
/// further flags for the portal.
pub async fn researcher_portal(
    dir: &Path,
    broker_url: &str,
    platform_token: &str,
    researcher: (u64, &str),
    demo_password: &str,
    more: &[&str],
) -> anyhow::Result<(PortalProcess, String)> {
    let database = database_url(dir, false).await?.ok_or_else(|| anyhow::anyhow!("no SQLite database"))?;
    let adopt = format!("{}:{}", researcher.0, researcher.1);
    let mut extra = vec!["--demo", "--demo-researcher", adopt.as_str()];
    extra.extend_from_slice(more);
    let options = PortalOptions { extra: &extra, ..PortalOptions::new(broker_url, platform_token, &database) };
    let portal = PortalProcess::start(dir, &options).await?;
    let Session { http, csrf } = log_in(&portal.url, "demo-researcher", demo_password).await?;
    let made: serde_json::Value = http
        .post(format!("{}/api/v1/me/api-tokens", portal.url))
        .header("x-csrf-token", csrf)
        .json(&serde_json::json!({"name": "cli", "expires_in_days": 7}))
        .send()
        .await?
        .json()
        .await?;
    let token = made["token"].as_str().ok_or_else(|| anyhow::anyhow!("no token in {made}"))?.to_owned();
    Ok((portal, token))
}
