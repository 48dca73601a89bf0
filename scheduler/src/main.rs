//! `suanli-scheduler`: run a scheduler replica, or check and submit a job spec.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;
use suanli_scheduler::service::{Config, Scheduler};
use suanli_scheduling::{build, PolicyConfig, PolicyKind};

/// The Suanli scheduler: places jobs on researchers' leased GPUs through the broker.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML file with a `[scheduler]` table; flags and environment override it.
    #[arg(long, env = "SUANLI_SCHEDULER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Broker endpoints, comma-separated.
    #[arg(long, env = "SUANLI_SCHEDULER_BROKER", value_delimiter = ',', global = true)]
    broker: Vec<String>,
    /// The cluster CA's certificate (PEM) to check `https://` broker endpoints against.
    #[arg(long, env = "SUANLI_SCHEDULER_BROKER_CA", global = true)]
    broker_ca: Option<PathBuf>,
    /// The platform token (the scheduler acts for the platform); with `submit`, the
    /// researcher's API token.
    #[arg(long, env = "SUANLI_SCHEDULER_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Prometheus `/metrics` (rounds, decisions, whether this replica acts) on this address.
    #[arg(long, env = "SUANLI_SCHEDULER_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// This replica's name (unique among replicas); the hostname by default.
    #[arg(long, env = "SUANLI_SCHEDULER_NAME")]
    name: Option<String>,
    /// fifo, las or heterogeneity.
    #[arg(long, env = "SUANLI_SCHEDULER_POLICY")]
    policy: Option<PolicyKind>,
    #[arg(long, env = "SUANLI_SCHEDULER_ROUND_MS")]
    round_ms: Option<u64>,
    #[arg(long, env = "SUANLI_SCHEDULER_LEASE_TTL_MS")]
    lease_ttl_ms: Option<u64>,
    /// Serve the artifact store (job inputs, outputs, checkpoints) on this address.
    #[arg(long, env = "SUANLI_ARTIFACTS_LISTEN")]
    artifacts_listen: Option<std::net::SocketAddr>,
    /// The artifact store's directory (the embedded backend).
    #[arg(long, env = "SUANLI_ARTIFACTS_DIR")]
    artifacts_dir: Option<PathBuf>,
    /// The artifact store's service token (the platform's tools).
    #[arg(long, env = "SUANLI_ARTIFACTS_TOKEN", hide_env_values = true)]
    artifacts_token: Option<String>,
    /// The key the broker signs agents' artifact capabilities with (the broker's
    /// `artifact_key_file`): with it, nodes reach their own jobs' artifacts and nothing else.
    #[arg(long, env = "SUANLI_ARTIFACTS_KEY_FILE")]
    artifacts_key_file: Option<PathBuf>,
    /// The artifact store's TLS certificate (PEM, from the cluster CA agents trust); with
    /// `--artifacts-tls-key` the store serves HTTPS. Required off loopback.
    #[arg(long, env = "SUANLI_ARTIFACTS_TLS_CERT")]
    artifacts_tls_cert: Option<PathBuf>,
    #[arg(long, env = "SUANLI_ARTIFACTS_TLS_KEY")]
    artifacts_tls_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a job spec (YAML or JSON) and list every problem.
    Validate { spec: PathBuf },
    /// Submit a job spec as the researcher whose token is given; prints the job.
    Submit { spec: PathBuf },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    scheduler: Option<FileScheduler>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileScheduler {
    broker: Option<Vec<String>>,
    broker_ca: Option<PathBuf>,
    name: Option<String>,
    policy: Option<PolicyKind>,
    round_ms: Option<u64>,
    lease_ttl_ms: Option<u64>,
    artifacts_listen: Option<std::net::SocketAddr>,
    artifacts_dir: Option<PathBuf>,
    /// `[scheduler.artifacts_bucket]`: keep the artifacts' bytes in an S3-compatible bucket
    /// (`endpoint`, `bucket`, `region`, `access_key_id`, `secret_access_key_env`, `prefix`)
    /// instead of `artifacts_dir`, which then keeps only who uploaded what.
    artifacts_bucket: Option<suanli_artifacts::BucketConfig>,
    /// Largest artifact accepted, in bytes (64 GiB by default).
    artifacts_max_bytes: Option<u64>,
    artifacts_key_file: Option<PathBuf>,
    /// Bytes each account's uploads (through capabilities) may take; none: no quota.
    artifacts_quota_bytes: Option<u64>,
    artifacts_tls_cert: Option<PathBuf>,
    artifacts_tls_key: Option<PathBuf>,
    /// Seconds between garbage collections of the artifact store (3600 by default; 0: never).
    artifacts_gc_every_s: Option<u64>,
    /// Uploads younger than this many seconds are never collected (86400 by default).
    artifacts_gc_grace_s: Option<u64>,
    metrics_listen: Option<std::net::SocketAddr>,
    /// Policy tuning (LAS queue thresholds, heterogeneity throughput table).
    policy_config: Option<PolicyConfig>,
}

fn read_spec(path: &PathBuf) -> anyhow::Result<suanli_types::JobSpec> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    suanli_scheduler::spec::parse(&text).map_err(|e| {
        let lines: Vec<String> = e.field_errors().iter().map(|f| format!("  {}: {}", f.field, f.problem)).collect();
        anyhow::anyhow!("{} is not a valid job spec:\n{}", path.display(), if lines.is_empty() { e.to_string() } else { lines.join("\n") })
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    suanli_observability::init_logging(&std::env::var("SUANLI_LOG").unwrap_or_else(|_| "info".into()), suanli_observability::LogTo::Stderr);
    let args = Args::parse();
    let file: FileScheduler = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            toml::from_str::<File>(&text).with_context(|| format!("parsing {}", path.display()))?.scheduler.unwrap_or_default()
        }
        None => FileScheduler::default(),
    };
    let brokers = if args.broker.is_empty() { file.broker.clone().unwrap_or_default() } else { args.broker.clone() };
    let broker_ca = match args.broker_ca.clone().or(file.broker_ca.clone()) {
        Some(path) => Some(std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?),
        None => None,
    };
    match &args.command {
        Some(Command::Validate { spec }) => {
            let spec = read_spec(spec)?;
            println!("{}", serde_json::to_string_pretty(&spec)?);
            Ok(())
        }
        Some(Command::Submit { spec }) => {
            let spec = read_spec(spec)?;
            let endpoint = brokers.first().context("--broker is required")?;
            let token = args.token.as_deref().context("--token (the researcher's API token) is required")?;
            let ch = suanli_proto::client::channel_checked(endpoint, broker_ca.as_deref()).await?;
            let mut jobs = suanli_proto::v1::job_service_client::JobServiceClient::with_interceptor(ch, suanli_proto::client::bearer(Some(token))?);
            let request_id = format!("submit-{}-{}", spec.name, std::process::id());
            let job = jobs
                .submit_job(suanli_proto::v1::SubmitJobRequest { request_id, spec_json: serde_json::to_string(&spec)? })
                .await
                .map_err(|s| anyhow::anyhow!("{}", suanli_proto::decode_status(&s)))?
                .into_inner();
            println!("job-{} {}", job.job_id, job.state);
            Ok(())
        }
        None => {
            anyhow::ensure!(!brokers.is_empty(), "--broker is required");
            let token = args.token.clone().context("--token (the platform token) is required")?;
            let s = &args.serve;
            let name = s
                .name
                .clone()
                .or(file.name.clone())
                .unwrap_or_else(|| std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "scheduler".into()));
            let kind = s.policy.or(file.policy).unwrap_or(PolicyKind::Las);
            let config = Config {
                brokers,
                broker_ca,
                platform_token: token,
                name: name.clone(),
                round: Duration::from_millis(s.round_ms.or(file.round_ms).unwrap_or(500)),
                lease_ttl: Duration::from_millis(s.lease_ttl_ms.or(file.lease_ttl_ms).unwrap_or(5_000)),
            };
            anyhow::ensure!(config.lease_ttl > config.round * 2, "the lease must outlive two rounds, or the acting replica loses it between renewals");
            let policy = build(kind, &file.policy_config.unwrap_or_default());
            let mut artifacts = String::from("-");
            if let Some(listen) = s.artifacts_listen.or(file.artifacts_listen) {
                let dir = s.artifacts_dir.clone().or(file.artifacts_dir.clone()).context("--artifacts-dir is required with --artifacts-listen")?;
                let token = s.artifacts_token.clone().context("--artifacts-token is required with --artifacts-listen")?;
                anyhow::ensure!(token.len() >= 16, "the artifact token must be at least 16 characters");
                let max_bytes = file.artifacts_max_bytes.unwrap_or(64 << 30);
                let store: std::sync::Arc<dyn suanli_artifacts::Store> = match &file.artifacts_bucket {
                    Some(bucket) => std::sync::Arc::new(suanli_artifacts::BucketStore::new(suanli_artifacts::Bucket::connect(bucket)?, max_bytes)),
                    None => std::sync::Arc::new(suanli_artifacts::LocalStore::open(&dir, max_bytes)?),
                };
                let tls =
                    match (s.artifacts_tls_cert.clone().or(file.artifacts_tls_cert.clone()), s.artifacts_tls_key.clone().or(file.artifacts_tls_key.clone())) {
                        (Some(cert), Some(key)) => Some(suanli_artifacts::tls::load_server_config(&cert, &key)?),
                        (None, None) => None,
                        _ => anyhow::bail!("give both --artifacts-tls-cert and --artifacts-tls-key, or neither"),
                    };
                // Capabilities are bearer credentials: they cross a network only inside TLS.
                anyhow::ensure!(
                    tls.is_some() || listen.ip().is_loopback(),
                    "the artifact store serves off loopback ({listen}) only with TLS: --artifacts-tls-cert and --artifacts-tls-key"
                );
                let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
                artifacts = listener.local_addr()?.to_string();
                let capabilities = match s.artifacts_key_file.clone().or(file.artifacts_key_file.clone()) {
                    Some(path) => Some(suanli_artifacts::CapabilityKey::load(&path, false)?),
                    None => None,
                };
                // Who uploaded what through capabilities, and what each account's uploads may take.
                let access = suanli_artifacts::server::Access {
                    token,
                    capabilities,
                    owners_dir: Some(dir.join(suanli_artifacts::backup::RECORDS_DIR)),
                    quota_bytes: file.artifacts_quota_bytes,
                };
                let (app, collector) = suanli_artifacts::server::router_and_collector(store, access);
                let every = file.artifacts_gc_every_s.unwrap_or(3600);
                if let (Some(collector), true) = (collector, every > 0) {
                    let gc = suanli_scheduler::artifact_gc::GcConfig {
                        brokers: config.brokers.clone(),
                        broker_ca: config.broker_ca.clone(),
                        platform_token: config.platform_token.clone(),
                        every: Duration::from_secs(every),
                        grace: Duration::from_secs(file.artifacts_gc_grace_s.unwrap_or(24 * 3600)),
                    };
                    tokio::spawn(suanli_scheduler::artifact_gc::run(collector, gc));
                }
                match tls {
                    Some(config) => spawn_listener(suanli_artifacts::tls::TlsListener::new(listener, config)?, app),
                    None => spawn_listener(listener, app),
                }
            }
            let scheduler = Scheduler::new(config, policy);
            let mut metrics_addr = String::from("-");
            if let Some(listen) = s.metrics_listen.or(file.metrics_listen) {
                let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
                metrics_addr = listener.local_addr()?.to_string();
                let metrics = scheduler.metrics();
                let app = axum::Router::new().route(
                    "/metrics",
                    axum::routing::get(move || {
                        let metrics = metrics.clone();
                        async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics.render()) }
                    }),
                );
                spawn_listener(listener, app);
            }
            println!("SUANLI_READY scheduler={name} policy={} artifacts={artifacts} metrics={metrics_addr}", kind.as_str());
            use std::io::Write;
            std::io::stdout().flush()?;
            tracing::info!(%name, policy = kind.as_str(), "scheduler replica running");
            scheduler.run().await;
            Ok(())
        }
    }
}

/// Serves `app` (the artifact store, the metrics) for as long as the process runs (over TLS or
/// not: the listener decides).
fn spawn_listener<L>(listener: L, app: axum::Router)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "a listener stopped");
        }
    });
}
