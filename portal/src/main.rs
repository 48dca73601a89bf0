//! `suanli-portal`: serve the portal, create operators, rotate the data keys.
//!
//! Configuration: a TOML file (`--config`, table `[portal]`), overridden by `SUANLI_PORTAL_*`
//! environment variables, overridden by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use sqlx::Row;
use suanli_notify::{Mailer, SmtpConfig, SmtpSecurity};
use suanli_portal::artifacts::ArtifactStoreLink;
use suanli_portal::crypto::KeyFile;
use suanli_portal::datasets::DatasetStore;
use suanli_portal::db::Db;
use suanli_portal::demo::{self, Adopt};
use suanli_portal::federation::FederationLink;
use suanli_portal::market::Market;
use suanli_portal::model::Role;
use suanli_portal::state::{AppState, Inner, Notifiers, Settings};
use suanli_portal::{alerts, app, outbox};

#[derive(Parser)]
#[command(name = "suanli-portal", about = "Suanli web portal and REST API")]
struct Cli {
    /// TOML file with a [portal] table.
    #[arg(long, global = true, env = "SUANLI_PORTAL_CONFIG")]
    config: Option<PathBuf>,
    /// sqlite://path (default: ./.dev/portal/portal.db) or postgres://…
    #[arg(long, global = true, env = "SUANLI_PORTAL_DATABASE_URL")]
    database_url: Option<String>,
    /// Key file for personal data at rest (made, mode 0600, when the database is new).
    #[arg(long, global = true, env = "SUANLI_PORTAL_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Make a new key file although the database holds accounts (their sealed personal data
    /// becomes unreadable): only to start over.
    #[arg(long, global = true)]
    create_key_file: bool,
    /// Without a subcommand: serve the portal.
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Create an operator with roles; prints the generated password and TOTP secret.
    CreateOperator {
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: String,
        /// Comma-separated: dispatcher, monitor, operator, auditor, system_administrator.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// Add a new data key, re-seal all personal data under it, and retire the old keys.
    RotateKeys,
    /// Print the current code of a base32 TOTP secret (for the demo operator and scripts).
    Totp { secret: String },
    /// Back up the database (--database-url) into a new directory: pg_dump or SQLite's
    /// VACUUM INTO, with a checksummed manifest. The key file is not included: keep it apart.
    Backup {
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into an empty database (--database-url); checks it first.
    Restore {
        #[arg(long)]
        backup: PathBuf,
    },
    /// Apply pending schema migrations. Expand migrations are applied by any portal that
    /// starts; with --contract also the contract ones (drops, renames), refused while a portal
    /// of an older release still runs against the database.
    Migrate {
        #[arg(long)]
        contract: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "SUANLI_PORTAL_LISTEN")]
    listen: Option<SocketAddr>,
    /// How users reach the portal (links in emails).
    #[arg(long, env = "SUANLI_PORTAL_PUBLIC_URL")]
    public_url: Option<String>,
    /// The broker's gRPC endpoint (http:// or https://).
    #[arg(long, env = "SUANLI_PORTAL_BROKER")]
    broker: Option<String>,
    /// CA certificate to check an https:// broker endpoint against.
    #[arg(long, env = "SUANLI_PORTAL_BROKER_CA")]
    broker_ca: Option<PathBuf>,
    #[arg(long, env = "SUANLI_PORTAL_PLATFORM_TOKEN", hide_env_values = true)]
    platform_token: Option<String>,
    /// SMTP relay host:port; without one, mail is written to the log.
    #[arg(long, env = "SUANLI_PORTAL_SMTP")]
    smtp: Option<String>,
    #[arg(long, env = "SUANLI_PORTAL_SMTP_SECURITY")]
    smtp_security: Option<SmtpSecurity>,
    #[arg(long, env = "SUANLI_PORTAL_SMTP_FROM")]
    smtp_from: Option<String>,
    /// A generic JSON SMS gateway (POST {"id","to","text"}; token in SUANLI_PORTAL_SMS_TOKEN).
    /// Alibaba Cloud SMS is configured in [portal.sms].
    #[arg(long, env = "SUANLI_PORTAL_SMS_JSON_URL")]
    sms_json_url: Option<String>,
    /// Registration with a mobile number needs the code sent to it by SMS (needs a gateway).
    #[arg(long, env = "SUANLI_PORTAL_VERIFY_PHONES")]
    verify_phones: bool,
    /// Hosts (as written in webhook URLs) users' webhooks may reach although they are not
    /// public addresses (an internal receiver on purpose). Comma-separated.
    #[arg(long, env = "SUANLI_PORTAL_WEBHOOK_ALLOW", value_delimiter = ',')]
    webhook_allow: Vec<String>,
    /// The key operator assertions are signed with (the broker's `operator_key_file`): the
    /// broker then enforces operators' roles itself.
    #[arg(long, env = "SUANLI_PORTAL_OPERATOR_KEY_FILE")]
    operator_key_file: Option<PathBuf>,
    /// The key agents' tunnel tickets are signed with (the broker's `tunnel_key_file`): with it
    /// supplier agents open their tunnels here (`/api/v1/agent-tunnel`).
    #[arg(long, env = "SUANLI_PORTAL_TUNNEL_KEY_FILE")]
    tunnel_key_file: Option<PathBuf>,
    /// A listener for agents' tunnels alone (agents' `--portal https://HOST:PORT`), in TLS with
    /// `--tunnel-tls-cert`/`--tunnel-tls-key` (off loopback it must be). Without it, agents
    /// dial the portal's own listener (`http://` from the same host, or `https://` through a
    /// TLS proxy in front of the portal).
    #[arg(long, env = "SUANLI_PORTAL_TUNNEL_LISTEN")]
    tunnel_listen: Option<SocketAddr>,
    /// The tunnel listener's certificate (PEM; from the cluster CA, which agents trust by
    /// default: `suanli-broker server-cert`) and its key.
    #[arg(long, env = "SUANLI_PORTAL_TUNNEL_TLS_CERT")]
    tunnel_tls_cert: Option<PathBuf>,
    #[arg(long, env = "SUANLI_PORTAL_TUNNEL_TLS_KEY")]
    tunnel_tls_key: Option<PathBuf>,
    /// The domain services on leased cards are published under: each gets the origin
    /// `<random name>.<domain>` (a wildcard DNS name pointing at this portal; `localhost`
    /// locally, whose subdomains browsers resolve to this machine). Without it, no services.
    #[arg(long, env = "SUANLI_PORTAL_SERVICES_DOMAIN")]
    services_domain: Option<String>,
    /// An environment (a terminal, JupyterLab) nobody has used for this many seconds stops:
    /// no request and no browser tab connected (default 3600; 0: never).
    #[arg(long, env = "SUANLI_PORTAL_ENVIRONMENT_IDLE_S")]
    environment_idle_s: Option<u64>,
    /// Addresses of the reverse proxies in front of the portal: from them alone the client's
    /// address is taken from `X-Forwarded-For` (login throttle, audit log). Comma-separated.
    #[arg(long, env = "SUANLI_PORTAL_TRUSTED_PROXY", value_delimiter = ',')]
    trusted_proxy: Vec<std::net::IpAddr>,
    /// This member's federation gateway API (`suanli-federation serve`), e.g.
    /// http://127.0.0.1:4080: the portal then shows other members' offers and the members.
    #[arg(long, env = "SUANLI_PORTAL_FEDERATION_API")]
    federation_api: Option<String>,
    /// The gateway API's bearer token.
    #[arg(long, env = "SUANLI_PORTAL_FEDERATION_TOKEN", hide_env_values = true)]
    federation_token: Option<String>,
    /// The artifact store (the scheduler's `--artifacts-listen`), for researchers to download
    /// their jobs' outputs: https://, or http:// on this machine.
    #[arg(long, env = "SUANLI_PORTAL_ARTIFACTS_URL")]
    artifacts_url: Option<String>,
    /// The CA (PEM) an https:// artifact store's certificate comes from: the cluster CA.
    #[arg(long, env = "SUANLI_PORTAL_ARTIFACTS_CA_FILE")]
    artifacts_ca_file: Option<PathBuf>,
    /// Where datasets' files (each content once) and unfinished uploads are kept; default
    /// `.dev/portal/datasets`. With `[portal.datasets_bucket]` the files go to an S3 bucket and
    /// only uploads under way stay here.
    #[arg(long, env = "SUANLI_PORTAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Bytes each account's datasets and unfinished uploads may take (default 20 GiB).
    #[arg(long, env = "SUANLI_PORTAL_DATASET_QUOTA_BYTES")]
    dataset_quota_bytes: Option<u64>,
    /// The image embedder for similar-image search: a `suanli-job serve` in `embed` mode
    /// (e.g. http://127.0.0.1:8501). Without one, image search answers 503.
    #[arg(long, env = "SUANLI_PORTAL_IMAGE_EMBEDDER_URL")]
    image_embedder_url: Option<String>,
    /// A file holding the embedder's bearer token (its `SUANLI_SERVE_TOKEN`).
    #[arg(long, env = "SUANLI_PORTAL_IMAGE_EMBEDDER_TOKEN_FILE")]
    image_embedder_token_file: Option<PathBuf>,
    /// Prometheus `/metrics` (HTTP requests, the outbox) on this address: loopback or a private
    /// network, never the public port.
    #[arg(long, env = "SUANLI_PORTAL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// A file holding the bearer token Prometheus' Alertmanager posts operators' alerts with
    /// (`POST /api/v1/operations/alertmanager`; at least 16 characters).
    #[arg(long, env = "SUANLI_PORTAL_ALERTMANAGER_TOKEN_FILE")]
    alertmanager_token_file: Option<PathBuf>,
    /// Cookies without `Secure` and `__Host-` (only for plain-HTTP hosts other than localhost).
    #[arg(long, env = "SUANLI_PORTAL_INSECURE_COOKIES")]
    insecure_cookies: bool,
    /// Create the demo researcher, supplier and operator and print their logins.
    #[arg(long)]
    demo: bool,
    /// Demo: the broker account (ID:TOKEN) the demo researcher uses.
    #[arg(long)]
    demo_researcher: Option<Adopt>,
    /// Demo: the broker account (ID:TOKEN) the demo supplier uses.
    #[arg(long)]
    demo_supplier: Option<Adopt>,
    #[arg(long, env = "SUANLI_PORTAL_LOG", default_value = "info")]
    log: String,
}

#[derive(Deserialize, Default)]
struct FileConfig {
    #[serde(default)]
    portal: PortalSection,
}

#[derive(Deserialize, Default)]
struct PortalSection {
    listen: Option<SocketAddr>,
    public_url: Option<String>,
    database_url: Option<String>,
    key_file: Option<PathBuf>,
    broker: Option<String>,
    broker_ca: Option<PathBuf>,
    platform_token: Option<String>,
    smtp: Option<SmtpConfig>,
    sms: Option<SmsSection>,
    #[serde(default)]
    alerts: suanli_portal::alerts::AlertSettings,
    insecure_cookies: Option<bool>,
    verify_phones: Option<bool>,
    #[serde(default)]
    webhook_allow: Vec<String>,
    operator_key_file: Option<PathBuf>,
    tunnel_key_file: Option<PathBuf>,
    tunnel_listen: Option<SocketAddr>,
    tunnel_tls_cert: Option<PathBuf>,
    tunnel_tls_key: Option<PathBuf>,
    services_domain: Option<String>,
    environment_idle_s: Option<u64>,
    #[serde(default)]
    trusted_proxy: Vec<std::net::IpAddr>,
    federation_api: Option<String>,
    federation_token_file: Option<PathBuf>,
    artifacts_url: Option<String>,
    artifacts_ca_file: Option<PathBuf>,
    alertmanager_token_file: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    dataset_quota_bytes: Option<u64>,
    image_embedder_url: Option<String>,
    image_embedder_token_file: Option<PathBuf>,
    /// `[portal.datasets_bucket]`: datasets' files in an S3-compatible bucket (`endpoint`,
    /// `bucket`, `region`, `access_key_id`, `secret_access_key_env`, `prefix`).
    datasets_bucket: Option<suanli_artifacts::BucketConfig>,
}

/// `[portal.sms]`: `provider = "json"` with `url` (and `token`), or `provider = "aliyun"` with
/// Alibaba Cloud's keys, sign name and template.
#[derive(Deserialize)]
struct SmsSection {
    provider: String,
    url: Option<String>,
    token: Option<String>,
    #[serde(flatten)]
    aliyun: Option<suanli_notify::sms::AliyunConfig>,
}

fn sms_gateway(section: Option<SmsSection>, json_url: Option<&str>) -> anyhow::Result<Option<suanli_notify::sms::SmsGateway>> {
    use suanli_notify::sms::{AliyunSms, JsonGateway, SmsGateway};
    if let Some(url) = json_url {
        return Ok(Some(SmsGateway::Json(JsonGateway::new(url, std::env::var("SUANLI_PORTAL_SMS_TOKEN").ok()))));
    }
    let Some(s) = section else { return Ok(None) };
    Ok(Some(match s.provider.as_str() {
        "json" => SmsGateway::Json(JsonGateway::new(&s.url.context("[portal.sms] url is required for the json provider")?, s.token)),
        "aliyun" => SmsGateway::Aliyun(AliyunSms::new(s.aliyun.context("[portal.sms] needs access_key_id, access_key_secret, sign_name and template_code")?)),
        other => bail!("[portal.sms] provider must be json or aliyun, not {other:?}"),
    }))
}

fn load_file(path: Option<&Path>) -> anyhow::Result<PortalSection> {
    match path {
        None => Ok(PortalSection::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(toml::from_str::<FileConfig>(&text).with_context(|| format!("parsing {}", p.display()))?.portal)
        }
    }
}

struct Storage {
    db: Db,
    keys: KeyFile,
    key_path: PathBuf,
}

fn database_url(cli: &Cli, file: &PortalSection) -> String {
    cli.database_url.clone().or(file.database_url.clone()).unwrap_or_else(|| "sqlite://.dev/portal/portal.db".into())
}

async fn open_storage(cli: &Cli, file: &PortalSection) -> anyhow::Result<Storage> {
    let url = database_url(cli, file);
    if let Some(path) = url.strip_prefix("sqlite://") {
        if let Some(dir) = Path::new(path.split('?').next().unwrap_or(path)).parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
    }
    let db = Db::connect(&url).await.with_context(|| format!("opening the database {}", url.split('@').next_back().unwrap_or(&url)))?;
    let key_path = cli.key_file.clone().or(file.key_file.clone()).unwrap_or_else(|| PathBuf::from(".dev/portal/keys.toml"));
    let keys = match KeyFile::load(&key_path)? {
        Some(keys) => keys,
        None => {
            // New keys only for a new database (or when asked): a mistyped path must not
            // start a portal whose sealed personal data it can no longer read.
            let users: i64 = sqlx::query("SELECT COUNT(*) AS n FROM users").fetch_one(&db.pool).await?.try_get("n")?;
            if users > 0 && !cli.create_key_file {
                bail!(
                    "the key file {} does not exist, and the database already holds {users} accounts sealed with a key file: \
                     give the right --key-file (or --create-key-file, which leaves their sealed personal data unreadable)",
                    key_path.display()
                );
            }
            KeyFile::create(&key_path)?
        }
    };
    Ok(Storage { db, keys, key_path })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let file = load_file(cli.config.as_deref())?;
    match &cli.command {
        Some(Command::Totp { secret }) => {
            let raw = totp_rs::Secret::Encoded(secret.clone()).to_bytes().map_err(|e| anyhow::anyhow!("{e:?}"))?;
            println!("{}", suanli_portal::api::accounts::totp_for(&raw).map_err(|e| anyhow::anyhow!(e.message))?.generate_current()?);
            Ok(())
        }
        Some(Command::CreateOperator { username, email, roles }) => {
            init_logging("warn");
            let roles = roles.iter().map(|r| Role::parse(r.trim()).with_context(|| format!("unknown role {r}"))).collect::<anyhow::Result<Vec<_>>>()?;
            let state = offline_state(open_storage(&cli, &file).await?)?;
            // Letters and digits for certain (a random token alone may lack digits).
            let password = format!("{}-{:04}", suanli_portal::crypto::random_token(12), rand_digits());
            let setup =
                demo::create_operator(&state, username, email, &password, &roles).await.map_err(|e| anyhow::anyhow!("{}: {}", e.code.as_str(), e.message))?;
            println!("operator {username} created\npassword: {password}\nTOTP secret: {}\n{}", setup.secret, setup.otpauth_url);
            Ok(())
        }
        Some(Command::Backup { out }) => {
            init_logging("warn");
            let url = database_url(&cli, &file);
            let m = suanli_portal::backup::take(&url, out).await?;
            println!("backed up schema version {} ({} bytes, sha256 {}) to {}", m.schema_version, m.bytes, m.sha256, out.display());
            Ok(())
        }
        Some(Command::Restore { backup }) => {
            init_logging("warn");
            let url = database_url(&cli, &file);
            let m = suanli_portal::backup::restore(backup, &url).await?;
            println!("restored schema version {} from {}", m.schema_version, backup.display());
            Ok(())
        }
        Some(Command::Migrate { contract }) => {
            init_logging("warn");
            let url = database_url(&cli, &file);
            let db = Db::connect(&url).await?;
            if *contract {
                db.migrate_with(suanli_portal::db::MIGRATIONS, true).await?;
            }
            println!("schema version {} applied", db.schema_version().await?);
            Ok(())
        }
        Some(Command::RotateKeys) => {
            init_logging("warn");
            rotate_keys(open_storage(&cli, &file).await?).await
        }
        None => serve(&cli, file).await,
    }
}

fn rand_digits() -> u16 {
    u16::from_le_bytes(suanli_portal::crypto::random_bytes::<2>()) % 10_000
}

fn init_logging(level: &str) {
    suanli_observability::init_logging(level, suanli_observability::LogTo::Stderr);
}

/// State for commands that touch only the database (no broker calls are made).
fn offline_state(s: Storage) -> anyhow::Result<AppState> {
    let market = Market::new("http://127.0.0.1:1", None, "offline").map_err(anyhow::Error::msg)?;
    Ok(AppState(Arc::new(Inner {
        db: s.db,
        keys: s.keys.ring()?,
        market,
        mailer: None,
        notifiers: Default::default(),
        settings: Settings::default(),
        outbox_wake: Default::default(),
        federation: None,
        artifacts: None,
        datasets: None,
        image_search: None,
        metrics: Default::default(),
        tunnels: suanli_portal::tunnels::Tunnels::new(None),
        services: suanli_portal::services::ServiceHub::new(None, ""),
    })))
}

/// Warns in the log, daily, once the tunnel listener's certificate has less than 30 days left
/// (it is read at start: a renewed one takes a restart), and says so louder once it expired.
async fn watch_certificate_expiry(cert: PathBuf) {
    const WARN_BEFORE_S: i64 = 30 * 86_400;
    loop {
        let left = std::fs::read_to_string(&cert)
            .map_err(|e| e.to_string())
            .and_then(|pem| suanli_pki::pem_certificate_not_after(&pem).map_err(|e| e.to_string()))
            .map(|not_after| not_after - suanli_portal::db::now_ms() / 1000);
        match left {
            Ok(left) if left <= 0 => {
                tracing::error!(cert = %cert.display(), "the tunnel listener's certificate has expired: agents cannot open their tunnels (suanli-broker server-cert, then restart)")
            }
            Ok(left) if left < WARN_BEFORE_S => {
                tracing::warn!(cert = %cert.display(), days_left = left / 86_400, "the tunnel listener's certificate expires soon: issue a new one (suanli-broker server-cert) and restart")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(cert = %cert.display(), error = %e, "the tunnel listener's certificate could not be read"),
        }
        tokio::time::sleep(Duration::from_secs(86_400)).await;
    }
}

async fn serve(cli: &Cli, file: PortalSection) -> anyhow::Result<()> {
    let args = &cli.serve;
    init_logging(&args.log);
    let s = open_storage(cli, &file).await?;
    let listen = args.listen.or(file.listen).unwrap_or_else(|| "127.0.0.1:8080".parse().expect("literal address"));
    let broker = args.broker.clone().or(file.broker.clone()).unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let platform_token = args
        .platform_token
        .clone()
        .or(file.platform_token.clone())
        .context("set the broker's platform token: --platform-token or SUANLI_PORTAL_PLATFORM_TOKEN")?;
    let ca = match args.broker_ca.clone().or(file.broker_ca.clone()) {
        Some(p) => Some(std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let mut market = Market::new(&broker, ca.as_deref(), &platform_token).map_err(anyhow::Error::msg)?;
    if let Some(path) = args.operator_key_file.clone().or(file.operator_key_file.clone()) {
        market = market.with_operator_key(suanli_pki::assertion::OperatorKey::load(&path, false)?);
    }
    let tunnel_key = match args.tunnel_key_file.clone().or(file.tunnel_key_file.clone()) {
        Some(path) => Some(suanli_pki::tunnel_ticket::TunnelKey::load(&path, false).with_context(|| format!("tunnel_key_file {}", path.display()))?),
        None => None,
    };
    let tunnel_listener = match args.tunnel_listen.or(file.tunnel_listen) {
        Some(listen) => {
            if tunnel_key.is_none() {
                bail!("--tunnel-listen without --tunnel-key-file: no agent could open a tunnel there");
            }
            let cert = args.tunnel_tls_cert.clone().or(file.tunnel_tls_cert.clone());
            let key = args.tunnel_tls_key.clone().or(file.tunnel_tls_key.clone());
            let tls = match (cert, key) {
                (Some(cert), Some(key)) => {
                    let config = suanli_artifacts::tls::load_server_config(&cert, &key).context("the tunnel listener's certificate")?;
                    tokio::spawn(watch_certificate_expiry(cert));
                    Some(config)
                }
                (None, None) if listen.ip().is_loopback() => None,
                (None, None) => bail!("the tunnel listener {listen} is off loopback: give it --tunnel-tls-cert and --tunnel-tls-key"),
                _ => bail!("give both --tunnel-tls-cert and --tunnel-tls-key, or neither"),
            };
            let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the tunnel listener {listen}"))?;
            Some((listener, tls))
        }
        None => None,
    };
    let smtp = match (&args.smtp, file.smtp) {
        (Some(hostport), _) => {
            let (host, port) = hostport.rsplit_once(':').context("--smtp is host:port")?;
            Some(SmtpConfig {
                host: host.into(),
                port: port.parse().context("--smtp port")?,
                security: args.smtp_security.unwrap_or_default(),
                username: std::env::var("SUANLI_PORTAL_SMTP_USERNAME").ok(),
                password: std::env::var("SUANLI_PORTAL_SMTP_PASSWORD").ok(),
                from: args.smtp_from.clone().unwrap_or_else(|| "Suanli <noreply@suanli.local>".into()),
            })
        }
        (None, from_file) => from_file,
    };
    let mailer = smtp.as_ref().map(Mailer::new).transpose()?;
    // Bound first, so `--listen 127.0.0.1:0` yields a real port for the links in emails.
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let public_url = args.public_url.clone().or(file.public_url).unwrap_or_else(|| format!("http://{addr}"));
    if public_url.starts_with("http://") && !(public_url.contains("127.0.0.1") || public_url.contains("localhost")) && !args.insecure_cookies {
        bail!("{public_url} is plain HTTP: browsers drop Secure cookies there; serve it over https, or pass --insecure-cookies");
    }
    let settings = Settings {
        public_url: public_url.trim_end_matches('/').to_owned(),
        secure_cookies: !(args.insecure_cookies || file.insecure_cookies.unwrap_or(false)),
        mail_configured: mailer.is_some(),
        trusted_proxies: if args.trusted_proxy.is_empty() { file.trusted_proxy } else { args.trusted_proxy.clone() },
        alertmanager_token: match args.alertmanager_token_file.clone().or(file.alertmanager_token_file) {
            Some(path) => {
                let token = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned();
                if token.len() < 16 {
                    bail!("the Alertmanager token in {} must be at least 16 characters", path.display());
                }
                Some(token)
            }
            None => None,
        },
        ..Settings::default()
    };
    let webhook_allow = if args.webhook_allow.is_empty() { file.webhook_allow } else { args.webhook_allow.clone() };
    let notifiers =
        Notifiers { sms: sms_gateway(file.sms, args.sms_json_url.as_deref())?, webhooks: suanli_notify::webhook::WebhookSender::allowing(webhook_allow) };
    let verify_phones = args.verify_phones || file.verify_phones.unwrap_or(false);
    if verify_phones && notifiers.sms.is_none() {
        bail!("verifying phones needs an SMS gateway: --sms-json-url or [portal.sms]");
    }
    let settings = Settings { verify_phones, ..settings };
    let federation = match (args.federation_api.clone().or(file.federation_api), &args.federation_token, &file.federation_token_file) {
        (None, _, _) => None,
        (Some(api), Some(token), _) => Some(FederationLink::new(&api, token).map_err(anyhow::Error::msg)?),
        (Some(api), None, Some(path)) => {
            let token = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
            Some(FederationLink::new(&api, token.trim()).map_err(anyhow::Error::msg)?)
        }
        (Some(_), None, None) => bail!("the federation gateway needs its token: --federation-token or federation_token_file"),
    };
    let artifacts = match args.artifacts_url.clone().or(file.artifacts_url) {
        None => None,
        Some(url) => {
            let ca = match args.artifacts_ca_file.clone().or(file.artifacts_ca_file) {
                Some(path) => Some(std::fs::read_to_string(&path).with_context(|| path.display().to_string())?),
                None => None,
            };
            Some(ArtifactStoreLink::new(&url, ca).map_err(anyhow::Error::msg)?)
        }
    };
    let quota = args.dataset_quota_bytes.or(file.dataset_quota_bytes).unwrap_or(suanli_portal::datasets::DEFAULT_QUOTA_BYTES);
    let data_dir = args.data_dir.clone().or(file.data_dir.clone()).unwrap_or_else(|| PathBuf::from(".dev/portal/datasets"));
    let datasets = match &file.datasets_bucket {
        Some(bucket) => {
            let blobs = suanli_artifacts::BucketStore::new(suanli_artifacts::Bucket::connect(bucket)?, suanli_portal::datasets::DEFAULT_MAX_UPLOAD_BYTES);
            DatasetStore::new(Arc::new(blobs), &data_dir.join("uploads"), quota, suanli_portal::datasets::DEFAULT_MAX_UPLOAD_BYTES)
                .with_context(|| format!("the dataset staging folder under {}", data_dir.display()))?
        }
        None => DatasetStore::local(&data_dir, quota).with_context(|| format!("the dataset store in {}", data_dir.display()))?,
    };
    let image_search = match args.image_embedder_url.clone().or(file.image_embedder_url) {
        Some(url) => {
            let dir = data_dir.join("search");
            let token = match args.image_embedder_token_file.clone().or(file.image_embedder_token_file) {
                Some(path) => {
                    let token = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?.trim().to_owned();
                    if token.is_empty() {
                        bail!("{} is empty: it should hold the embedder's token", path.display());
                    }
                    Some(token)
                }
                None => None,
            };
            let parsed = reqwest::Url::parse(&url).with_context(|| format!("--image-embedder-url {url:?}"))?;
            let host = parsed.host_str().unwrap_or_default();
            let loopback = host == "localhost" || host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            // Pictures and the token cross the network only encrypted; off this machine the
            // embedder must also check who calls it.
            match (parsed.scheme(), loopback, token.is_some()) {
                ("http", true, _) | ("https", _, true) => {}
                ("https", _, false) => bail!("the image embedder at {url} is off this machine: give its token (--image-embedder-token-file)"),
                _ => bail!("--image-embedder-url {url}: https://, or http:// to this machine only"),
            }
            Some(Arc::new(
                suanli_portal::image_search::ImageSearch::new(dir.clone(), &url, token).with_context(|| format!("the image indexes in {}", dir.display()))?,
            ))
        }
        None => None,
    };
    let services_domain = args.services_domain.clone().or(file.services_domain.clone());
    let environment_idle = match args.environment_idle_s.or(file.environment_idle_s) {
        Some(0) => None,
        Some(seconds) => Some(Duration::from_secs(seconds)),
        None => Some(suanli_portal::services::DEFAULT_IDLE_STOP),
    };
    let public_url = settings.public_url.clone();
    let services = suanli_portal::services::ServiceHub::new(services_domain, &public_url).with_idle_stop(environment_idle);
    if services.would_take_the_portals_host(&public_url) {
        bail!("--services-domain covers the portal's own host ({public_url}): give services a domain of their own, e.g. svc.<the portal's host>");
    }
    let state = AppState(Arc::new(Inner {
        db: s.db,
        keys: s.keys.ring()?,
        market: market.clone(),
        mailer,
        notifiers,
        settings,
        outbox_wake: Default::default(),
        federation,
        artifacts,
        datasets: Some(Arc::new(datasets)),
        image_search,
        metrics: Default::default(),
        tunnels: suanli_portal::tunnels::Tunnels::new(tunnel_key),
        services,
    }));
    market.spawn_follower();
    outbox::spawn_worker(state.clone());
    suanli_portal::image_search::spawn_indexer(state.clone());
    alerts::spawn(state.clone(), file.alerts);
    if state.services.enabled() {
        tokio::spawn(suanli_portal::services::run_sweeper(state.clone()));
    }
    // This portal says which schema it knows, so a contract migration waits for older ones.
    let instance = suanli_portal::crypto::random_token(12);
    let heartbeat = {
        let (db, instance, started_ms) = (state.db.clone(), instance.clone(), suanli_portal::db::now_ms());
        tokio::spawn(async move {
            loop {
                if let Err(e) = db.heartbeat(&instance, suanli_portal::db::SCHEMA_VERSION, started_ms).await {
                    tracing::warn!(error = %e, "could not record that this portal runs");
                }
                tokio::time::sleep(Duration::from_millis(suanli_portal::db::INSTANCE_HEARTBEAT_MS)).await;
            }
        })
    };
    let db = state.db.clone();
    if args.demo {
        let mut lines = None;
        for _ in 0..50 {
            match demo::seed(&state, args.demo_researcher.clone(), args.demo_supplier.clone()).await {
                Ok(l) => {
                    lines = Some(l);
                    break;
                }
                Err(e) => {
                    tracing::warn!("demo accounts: {} (retrying)", e.message);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        for line in lines.context("could not create the demo accounts")? {
            println!("{line}");
        }
    }
    let metrics_addr = match args.metrics_listen.or(file.metrics_listen) {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the metrics listener {listen}"))?;
            let addr = listener.local_addr()?;
            let metrics = suanli_portal::metrics::router(state.clone());
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, metrics).await {
                    tracing::error!(error = %e, "the metrics listener failed");
                }
            });
            addr.to_string()
        }
        None => "-".into(),
    };
    let tunnel_addr = match tunnel_listener {
        Some((listener, tls)) => {
            let addr = listener.local_addr()?;
            let app = suanli_portal::tunnels::router(state.clone());
            tokio::spawn(async move {
                let served = match tls {
                    Some(tls) => match suanli_artifacts::tls::TlsListener::new(listener, tls) {
                        Ok(listener) => axum::serve(listener, app).await,
                        Err(e) => Err(e),
                    },
                    None => axum::serve(axum::serve::ListenerExt::tap_io(listener, |tcp| drop(tcp.set_nodelay(true))), app).await,
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "the tunnel listener failed");
                }
            });
            addr.to_string()
        }
        None => "-".into(),
    };
    println!("SUANLI_READY http={addr} metrics={metrics_addr} tunnel={tunnel_addr}");
    println!("Suanli portal on {}", state.settings.public_url);
    let app = app::router(state).into_make_service_with_connect_info::<SocketAddr>();
    // Small answers (an API call, a frame of a service's WebSocket) go out at once, not after
    // the client's delayed ACK.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
        // A visitor gone without a word (a laptop asleep) is noticed in minutes, so their
        // WebSocket stops keeping a service in use.
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(15)).with_retries(4);
        let _ = socket2::SockRef::from(&*tcp).set_tcp_keepalive(&keepalive);
    });
    axum::serve(listener, app).with_graceful_shutdown(stop_requested()).await?;
    heartbeat.abort();
    if let Err(e) = db.forget_instance(&instance).await {
        tracing::warn!(error = %e, "could not remove this portal's record");
    }
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM (what systemd and Kubernetes send to stop a service).
async fn stop_requested() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

/// Re-seals every sealed column under a new key, then retires the keys nothing uses any more.
async fn rotate_keys(mut s: Storage) -> anyhow::Result<()> {
    let old = s.keys.ring()?;
    let new_id = s.keys.add_key();
    // Saved first: if re-sealing stops halfway, both keys are in the file and everything opens.
    s.keys.save(&s.key_path)?;
    let ring = s.keys.ring()?;
    let columns: &[(&str, &str, &[&str])] = &[
        ("users", "id", &["email_enc", "phone_enc", "real_name_enc", "profile_enc", "broker_token_enc", "totp_secret_enc"]),
        ("licences", "user_id", &["data_enc"]),
        ("auth_codes", "lease_id", &["code_enc"]),
        ("outbox", "id", &["recipient_enc", "body_enc"]),
    ];
    let mut resealed = 0;
    for (table, key, cols) in columns {
        for col in *cols {
            let rows =
                sqlx::query(&format!("SELECT {key} AS k, {col} AS v FROM {table} WHERE {col} IS NOT NULL AND {col} <> ''")).fetch_all(&s.db.pool).await?;
            for r in rows {
                let v: String = r.try_get("v")?;
                if !ring.is_stale(&v) {
                    continue;
                }
                let plain = old.open(&v)?;
                let q = format!("UPDATE {table} SET {col} = $1 WHERE {key} = $2 AND {col} = $3");
                let updated = if *table == "outbox" {
                    sqlx::query(&q).bind(ring.seal(&plain)).bind(r.try_get::<String, _>("k")?).bind(&v).execute(&s.db.pool).await?
                } else {
                    sqlx::query(&q).bind(ring.seal(&plain)).bind(r.try_get::<i64, _>("k")?).bind(&v).execute(&s.db.pool).await?
                };
                resealed += updated.rows_affected();
            }
        }
    }
    s.keys.keys.retain(|id, _| *id == new_id);
    s.keys.save(&s.key_path)?;
    println!("re-sealed {resealed} values under key {new_id}; older keys retired");
    Ok(())
}
