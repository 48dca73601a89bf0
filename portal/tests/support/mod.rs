//! What the portal's process tests share: a one-node broker, an SMTP server, a portal on SQLite
//! or PostgreSQL, and an HTTP client that behaves like the portal's own script (cookie + CSRF).

#![allow(dead_code)]

use std::time::Duration;

use sha2::{Digest, Sha256};

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::portal::{database_url, PortalOptions, PortalProcess};
use suanli_testkit::smtp::SmtpSink;
use suanli_testkit::workspace_binary;

pub struct World {
    pub broker: BrokerCluster,
    pub smtp: SmtpSink,
    pub portal: PortalProcess,
    pub dir: tempfile::TempDir,
    db_url: String,
}

pub enum Backend {
    Sqlite,
    Postgres,
}

impl World {
    /// `None` when PostgreSQL is asked for and `SUANLI_TEST_POSTGRES_URL` is not set.
    pub async fn start(backend: Backend) -> anyhow::Result<Option<World>> {
        World::start_with(backend, &[]).await
    }

    /// As `start`, with more portal flags (a `--config` file, say).
    pub async fn start_with(backend: Backend, extra: &[String]) -> anyhow::Result<Option<World>> {
        World::start_binary(backend, extra, None).await
    }

    /// As `start_with`, running another build of the portal (the previous release's).
    pub async fn start_binary(backend: Backend, extra: &[String], binary: Option<&std::path::Path>) -> anyhow::Result<Option<World>> {
        let dir = tempfile::TempDir::new()?;
        let Some(db) = database_url(dir.path(), matches!(backend, Backend::Postgres)).await? else {
            eprintln!("SUANLI_TEST_POSTGRES_URL is not set: skipping the PostgreSQL run");
            return Ok(None);
        };
        // Operators act on the broker with the portal's signed assertion (the broker enforces
        // their roles too).
        let operator_key = dir.path().join("operator-key");
        suanli_pki::assertion::OperatorKey::load(&operator_key, true)?;
        // Agents open their tunnels here with tickets the broker signs.
        let tunnel_key = dir.path().join("tunnel-key");
        suanli_pki::tunnel_ticket::TunnelKey::load(&tunnel_key, true)?;
        let config = format!("[broker]\noperator_key_file = \"{}\"\ntunnel_key_file = \"{}\"\n", operator_key.display(), tunnel_key.display());
        let broker = BrokerCluster::start(&workspace_binary("suanli-broker", "suanli-broker")?, 1, Some(&config)).await?;
        broker.leader(Duration::from_secs(20)).await?;
        let smtp = SmtpSink::start(dir.path()).await?;
        let endpoint = format!("http://{}", broker.address(1)?);
        let mut flags: Vec<String> = vec!["--operator-key-file".into(), operator_key.display().to_string()];
        if binary.is_none() {
            // Another release's portal (the upgrade tests) may not know the flag.
            flags.extend(["--tunnel-key-file".into(), tunnel_key.display().to_string()]);
        }
        flags.extend(extra.iter().cloned());
        let portal = PortalProcess::start(
            dir.path(),
            &PortalOptions {
                broker: &endpoint,
                platform_token: PLATFORM_TOKEN,
                database_url: &db,
                smtp: Some(&smtp.address),
                extra: &flags.iter().map(String::as_str).collect::<Vec<_>>(),
                binary,
            },
        )
        .await?;
        Ok(Some(World { broker, smtp, portal, dir, db_url: db }))
    }

    /// Passes `result` through, printing what the services logged when it is an error.
    pub fn explain<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            eprintln!("--- portal log ---\n{}\n--- mail received ---\n{:#?}", self.portal.service.log(), self.smtp.messages());
        }
        result
    }

    pub fn database_url(&self) -> String {
        self.db_url.clone()
    }

    pub fn client(&self) -> Api {
        Api::new(&self.portal.url)
    }

    pub async fn platform(&self) -> anyhow::Result<suanli_proto::client::Client> {
        self.broker.client(1, PLATFORM_TOKEN).await
    }

    /// Registers a personal researcher (or individual supplier), activates it from the mail
    /// and logs in. Returns the logged-in client.
    pub async fn person(&self, kind: &str, username: &str) -> anyhow::Result<Api> {
        let api = self.client();
        let email = format!("{username}@example.cn");
        let (status, body) = api.post("/api/v1/accounts", registration(kind, username, &email)).await?;
        anyhow::ensure!(status == StatusCode::CREATED, "registration of {username}: {status} {body}");
        let token = activation_token(&self.smtp.wait_for(&email, Duration::from_secs(20)).await?.text)?;
        let (status, body) = api.post("/api/v1/activation", json!({ "token": token })).await?;
        anyhow::ensure!(status == StatusCode::OK && body["state"] == "active", "activation: {status} {body}");
        api.login(username, PASSWORD).await?;
        if kind == "researcher" {
            let (status, spend) = api.get("/api/v1/me/spend").await?;
            anyhow::ensure!(status == StatusCode::OK, "spend: {status} {spend}");
            self.fund(spend["balance"]["account_id"].as_u64().unwrap_or_default(), username).await?;
        }
        Ok(api)
    }

    /// Logs an existing user in again (after the portal restarted, say).
    pub async fn person_again(&self, username: &str) -> anyhow::Result<Api> {
        let api = self.client();
        api.login(username, PASSWORD).await?;
        Ok(api)
    }

    /// Pays money in for a researcher's broker account, as the payment service would.
    pub async fn fund(&self, broker_account: u64, tag: &str) -> anyhow::Result<()> {
        let mut platform = self.platform().await?;
        suanli_testkit::fixtures::deposit(&mut platform, broker_account, suanli_testkit::fixtures::RESEARCHER_FUNDS, &format!("fund-{tag}")).await
    }
}

impl Drop for World {
    fn drop(&mut self) {
        suanli_testkit::portal::drop_database(&self.db_url);
        // Lease accounts the test's agents recorded making (`start_agent`: `<dir>/<host>/state`),
        // whatever the test left: the agents themselves are gone by now (their `Service`s are
        // dropped before the world they were started in).
        for host in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            suanli_testkit::remove_recorded_lease_accounts(&host.path().join("state"));
        }
    }
}

pub const PASSWORD: &str = "correct-horse-42";

/// A valid ID-card number from any 17 digits (the checksum of GB 11643).
pub fn id_number(first17: &str) -> String {
    let weights = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = first17.bytes().zip(weights).map(|(b, w)| u32::from(b - b'0') * w).sum();
    format!("{first17}{}", ["1", "0", "X", "9", "8", "7", "6", "5", "4", "3", "2"][(sum % 11) as usize])
}

pub fn registration(kind: &str, username: &str, email: &str) -> Value {
    let seq = username.bytes().map(u32::from).sum::<u32>() % 1000;
    let mut body = json!({
        "kind": kind,
        "user_type": if kind == "supplier" { "individual" } else { "personal" },
        "username": username,
        "email": email,
        "password": PASSWORD,
        "password_confirm": PASSWORD,
        "real_name": "张三",
        "id_number": id_number(&format!("44030519900101{seq:03}")),
        "agree_terms": true,
        "lang": "en",
    });
    if kind == "supplier" {
        body["phone"] = json!(format!("1380013{:04}", seq));
        body["address"] = json!("深圳市南山区");
        body["affiliation"] = json!("Shenzhen Lab");
    }
    body
}

/// The token of the activation or reset link in a mail.
pub fn activation_token(text: &str) -> anyhow::Result<String> {
    let start = text.find("token=").ok_or_else(|| anyhow::anyhow!("no link in {text}"))? + "token=".len();
    Ok(text[start..].split_whitespace().next().unwrap_or_default().to_owned())
}

/// A portal client: keeps the session cookie and sends the CSRF token on writes, as the pages do.
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub csrf: std::sync::Mutex<Option<String>>,
    pub bearer: Option<String>,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let http = reqwest::Client::builder().cookie_store(true).build().expect("http client");
        Api { http, base: base.to_owned(), csrf: Default::default(), bearer: None }
    }

    pub fn with_bearer(base: &str, token: &str) -> Api {
        let mut api = Api::new(base);
        api.bearer = Some(token.to_owned());
        api
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(csrf) = self.csrf.lock().expect("lock").clone() {
            req = req.header("x-csrf-token", csrf);
        }
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await?;
        let status = res.status();
        let text = res.text().await?;
        let value = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Ok((status, value))
    }

    /// POSTs raw bytes (a picture) rather than JSON.
    pub async fn post_bytes(&self, path: &str, bytes: Vec<u8>) -> anyhow::Result<(StatusCode, Value)> {
        let mut req = self.http.post(format!("{}{path}", self.base)).header("content-type", "application/octet-stream").body(bytes);
        if let Some(csrf) = self.csrf.lock().expect("lock").clone() {
            req = req.header("x-csrf-token", csrf);
        }
        let res = req.send().await?;
        let status = res.status();
        let text = res.text().await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
    }

    /// A `GET` whose answer is not JSON (an archive), refused unless it succeeds.
    pub async fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(b) = &self.bearer {
            req = req.bearer_auth(b);
        }
        let res = req.send().await?;
        anyhow::ensure!(res.status().is_success(), "GET {path}: {}", res.status());
        Ok(res.bytes().await?.to_vec())
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.send(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<(StatusCode, Value)> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn login(&self, login: &str, password: &str) -> anyhow::Result<Value> {
        let (status, body) = self.post("/api/v1/session", json!({ "login": login, "password": password })).await?;
        anyhow::ensure!(status == StatusCode::OK, "login {login}: {status} {body}");
        *self.csrf.lock().expect("lock") = body["csrf_token"].as_str().map(str::to_owned);
        Ok(body)
    }

    /// The code of an error answer.
    pub fn code(body: &Value) -> &str {
        body["error"]["code"].as_str().unwrap_or("")
    }
}

/// The fields an error answer names, sorted.
pub fn fields(body: &Value) -> Vec<String> {
    let mut f: Vec<String> = body["error"]["fields"].as_array().into_iter().flatten().filter_map(|f| f["field"].as_str().map(str::to_owned)).collect();
    f.sort();
    f
}

/// A supplier agent with simulated cards, enrolled with `token` (from the portal). With
/// `gateway` (root only) it also runs its SSH gateway, so leases get SSH details.
pub async fn start_agent(w: &World, token: &str, hostname: &str, model: &str, cards: u32, gateway: bool) -> anyhow::Result<suanli_testkit::Service> {
    start_agent_with(w, token, hostname, model, cards, gateway, &[]).await
}

/// As [`start_agent`], with more flags.
pub async fn start_agent_with(
    w: &World,
    token: &str,
    hostname: &str,
    model: &str,
    cards: u32,
    gateway: bool,
    extra: &[String],
) -> anyhow::Result<suanli_testkit::Service> {
    let dir = w.dir.path().join(hostname);
    std::fs::create_dir_all(&dir)?;
    let mut args: Vec<String> = vec![
        "run".into(),
        "--broker".into(),
        w.broker.agent_endpoint(1)?,
        "--broker-ca".into(),
        w.broker.agent_ca_cert().display().to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--enrollment-token".into(),
        token.into(),
        "--hostname".into(),
        hostname.into(),
        "--source".into(),
        "simulated".into(),
        "--sim-model".into(),
        model.into(),
        "--sim-cards".into(),
        cards.to_string(),
        "--metrics-listen".into(),
        "127.0.0.1:0".into(),
    ];
    if gateway {
        let devices = dir.join("dev");
        std::fs::create_dir_all(&devices)?;
        for card in 0..cards {
            let out = std::process::Command::new("mknod").arg(devices.join(format!("nvidia{card}"))).args(["c", "195", &card.to_string()]).output()?;
            anyhow::ensure!(out.status.success(), "mknod: {}", String::from_utf8_lossy(&out.stderr));
        }
        let prefix = format!("t{:06x}z", std::process::id() & 0x00ff_ffff);
        for (flag, value) in [
            ("--ssh-listen", "127.0.0.1:0".to_owned()),
            ("--home-root", dir.join("homes").display().to_string()),
            ("--login-prefix", prefix),
            ("--devices-dir", devices.display().to_string()),
        ] {
            args.push(flag.into());
            args.push(value);
        }
    }
    args.extend(extra.iter().cloned());
    let binary = workspace_binary("suanli-agent", "suanli-agent")?;
    suanli_testkit::Service::start(hostname, &binary, &args, &[], &dir, Duration::from_secs(60)).await
}

pub fn running_as_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A listing body for the portal's publish endpoint.
pub fn listing(title: &str, model: &str, region: &str, class: &str) -> Value {
    json!({
        "title": title, "gpu_model": model, "vram_gib": 80, "memory_gib": 512, "vcpus": 64,
        "vendor": "Inspur", "region": region,
        "storage": {"data_disks": 2, "data_disk_gb": 3840, "system_disk_gb": 480, "medium": "nvme"},
        "currency": "CNY",
        "prices": [{"billing_mode": "hourly", "per_card_minor": 1200}, {"billing_mode": "monthly", "per_card_minor": 500000}],
        "usage_instructions": if class == "A" { "SSH with the account shown after verifying the code." } else { "" },
    })
}

/// Enrolls an agent through the portal and publishes its node as a cluster; returns the
/// cluster ID and the agent process.
pub async fn publish_node(
    w: &World,
    supplier: &Api,
    hostname: &str,
    class: &str,
    region: &str,
    gateway: bool,
) -> anyhow::Result<(u64, suanli_testkit::Service)> {
    let (status, tok) = supplier.post("/api/v1/supplier/enrollment-tokens", json!({"valid_seconds": 600})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "enrollment token: {status} {tok}");
    let agent = start_agent(w, tok["token"].as_str().unwrap_or_default(), hostname, "A100 80GB", 4, gateway).await?;
    let node: u64 = agent.get("node")?.parse()?;
    let (status, nodes) = supplier.get("/api/v1/supplier/nodes").await?;
    anyhow::ensure!(status == StatusCode::OK && nodes.as_array().into_iter().flatten().any(|n| n["node_id"] == node), "node {node} listed: {nodes}");
    let body = json!({"class": class, "node_ids": [node], "listing": listing(&format!("4*A100 {hostname}"), "A100 80GB", region, class)});
    let (status, cluster) = supplier.post("/api/v1/supplier/clusters", body).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "publish: {status} {cluster}");
    Ok((cluster["cluster_id"].as_u64().unwrap_or_default(), agent))
}

pub fn totp_now(secret_b32: &str) -> String {
    totp_at(secret_b32, 0)
}

/// The code `steps` 30-second steps from now (the portal accepts one step of drift either way).
pub fn totp_at(secret_b32: &str, steps: i64) -> String {
    let raw = totp_rs::Secret::Encoded(secret_b32.to_owned()).to_bytes().expect("base32 secret");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    suanli_portal::api::accounts::totp_for(&raw).expect("totp").generate((now + 30 * steps) as u64)
}

/// Creates an operator with the CLI against the running portal's database; logs it in.
pub async fn operator(w: &World, db_url: &str, name: &str, roles: &str) -> anyhow::Result<(Api, String)> {
    let binary = suanli_testkit::workspace_binary("suanli-portal", "suanli-portal")?;
    let out = tokio::process::Command::new(binary)
        .args(["--database-url", db_url, "--key-file"])
        .arg(w.dir.path().join("portal-keys.toml"))
        .args(["create-operator", "--username", name, "--email", &format!("{name}@suanli.test"), "--roles", roles])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(out.status.success(), "create-operator: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let grab = |label: &str| stdout.lines().find_map(|l| l.strip_prefix(label)).map(str::trim).map(str::to_owned).unwrap_or_default();
    let (password, secret) = (grab("password:"), grab("TOTP secret:"));
    let api = w.client();
    let (status, body) = api.post("/api/v1/session", json!({"login": name, "password": password})).await?;
    anyhow::ensure!(status == reqwest::StatusCode::OK && body["mfa_required"] == true, "operator login must ask for TOTP: {status} {body}");
    *api.csrf.lock().expect("lock") = body["csrf_token"].as_str().map(str::to_owned);
    // Without the second factor the session opens nothing.
    let (status, body) = api.get("/api/v1/me").await?;
    anyhow::ensure!(status == reqwest::StatusCode::UNAUTHORIZED && Api::code(&body) == "MFA_REQUIRED", "{status} {body}");
    let (status, body) = api.post("/api/v1/session/totp", json!({"code": "000000"})).await?;
    anyhow::ensure!(status == reqwest::StatusCode::UNAUTHORIZED && Api::code(&body) == "MFA_INVALID" || totp_now(&secret) == "000000", "{status} {body}");
    let (status, body) = api.post("/api/v1/session/totp", json!({"code": totp_now(&secret)})).await?;
    anyhow::ensure!(status == reqwest::StatusCode::OK, "totp: {status} {body}");
    *api.csrf.lock().expect("lock") = body["csrf_token"].as_str().map(str::to_owned);
    Ok((api, secret))
}

// ---- datasets: the tus client, archives, hashes ----

pub fn tar_of(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, bytes.as_slice()).expect("append");
    }
    b.into_inner().expect("tar")
}

pub fn sha_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A researcher's API token, for plain `reqwest` calls with tus headers.
pub async fn token(api: &Api) -> anyhow::Result<String> {
    let (status, made) = api.post("/api/v1/me/api-tokens", json!({"name": "datasets", "expires_in_days": 1})).await?;
    anyhow::ensure!(status == StatusCode::CREATED || status == StatusCode::OK, "token: {status} {made}");
    Ok(made["token"].as_str().unwrap_or_default().to_owned())
}

pub struct Tus {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Tus {
    pub fn new(w: &World, token: &str) -> Tus {
        Tus { http: reqwest::Client::new(), base: w.portal.url.clone(), token: token.to_owned() }
    }

    pub async fn create(&self, filename: &str, length: u64, sha256: &str) -> anyhow::Result<(StatusCode, Value, Option<String>)> {
        let res = self
            .http
            .post(format!("{}/api/v1/uploads", self.base))
            .bearer_auth(&self.token)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", length.to_string())
            .header("upload-metadata", format!("filename {},sha256 {}", b64(filename), b64(sha256)))
            .send()
            .await?;
        let status = res.status();
        let location = res.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body: Value = res.json().await.unwrap_or(Value::Null);
        Ok((status, body, location))
    }

    pub async fn offset(&self, location: &str) -> anyhow::Result<(StatusCode, u64)> {
        let res = self.http.head(format!("{}{location}", self.base)).bearer_auth(&self.token).header("tus-resumable", "1.0.0").send().await?;
        let offset = res.headers().get("upload-offset").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok((res.status(), offset))
    }

    pub async fn patch(&self, location: &str, offset: u64, body: reqwest::Body) -> anyhow::Result<(StatusCode, Value)> {
        let res = self
            .http
            .patch(format!("{}{location}", self.base))
            .bearer_auth(&self.token)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .body(body)
            .send()
            .await?;
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// The whole file in one PATCH; the upload's ID.
    pub async fn upload(&self, filename: &str, bytes: &[u8]) -> anyhow::Result<String> {
        let (status, body, location) = self.create(filename, bytes.len() as u64, &sha_hex(bytes)).await?;
        anyhow::ensure!(status == StatusCode::CREATED, "create: {status} {body}");
        let location = location.unwrap_or_default();
        let (status, body) = self.patch(&location, 0, bytes.to_vec().into()).await?;
        anyhow::ensure!(status == StatusCode::NO_CONTENT, "patch: {status} {body}");
        Ok(location.rsplit('/').next().unwrap_or_default().to_owned())
    }
}

pub async fn new_dataset(api: &Api, name: &str) -> anyhow::Result<u64> {
    let (status, made) = api.post("/api/v1/datasets", json!({"name": name, "description": "test pictures"})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "create dataset: {status} {made}");
    Ok(made["dataset_id"].as_u64().unwrap_or_default())
}

// ---- the browser: Chromium through WebDriver ----

/// Where browser tests save their screenshots (`target/tmp/portal-screenshots/`).
pub fn screenshots() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("portal-screenshots")
}

/// Signs `user` in (password [`PASSWORD`]) on the portal's login page, as a person would.
pub async fn browser_login(b: &suanli_testkit::webdriver::Browser, url: &str, user: &str) -> anyhow::Result<()> {
    b.goto(&format!("{url}/login")).await?;
    b.type_into("input[name=login]", user).await?;
    b.type_into("input[name=password]", PASSWORD).await?;
    b.click("form.api button[type=submit]").await?;
    b.wait_for("button[data-logout]", Duration::from_secs(30)).await?;
    Ok(())
}
