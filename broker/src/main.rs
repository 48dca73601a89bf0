//! `suanli-broker`: run a broker node, a local demo marketplace, or query one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use suanli_broker::demo;
use suanli_broker::server::{self, AgentCaSource, NodeConfig};
use suanli_broker::storage::DEFAULT_EVENTS_RETAINED;
use suanli_proto::client;
use suanli_proto::convert::billing_mode_from_wire;
use suanli_proto::v1;

mod lease_cli;

/// The Suanli broker: the GPU marketplace's replicated source of truth (suppliers, clusters,
/// cards, leases), served over gRPC.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker node.
    ///
    /// Settings come from, in rising order: built-in defaults, the TOML file given with
    /// --config (section [broker]), SUANLI_BROKER_* environment variables, flags.
    Serve(Box<ServeArgs>),
    /// Run a local single-node marketplace with demo suppliers, clusters and a researcher
    /// account, on embedded defaults (data under ./.dev/broker). Prints the tokens to use.
    Dev(DevArgs),
    /// List the catalogue of a running broker as a table.
    Catalogue(CatalogueArgs),
    /// Mint a one-time enrollment token for a supplier agent (`suanli-agent run
    /// --enrollment-token …`). Prints the token only, for scripts.
    EnrollmentToken(EnrollmentTokenArgs),
    /// Administer the broker cluster: status, add a node, promote it to voter, remove one.
    ///
    /// A 3-node cluster: start node 1 with `serve --bootstrap`, nodes 2 and 3 with `serve`,
    /// then `cluster add-learner 2 PEER_HOST:PEER_PORT`, `cluster promote 2`, and the same for 3.
    Cluster(ClusterArgs),
    /// A researcher's leases: request cards, see how to log in, end.
    Lease(lease_cli::LeaseArgs),
    /// Register an SSH public key for an account (what the agents' gateways accept).
    SshKey(lease_cli::SshKeyArgs),
    /// Development: publish an agent's node as a Class B cluster of its own (`ops/run-local`).
    #[command(hide = true)]
    DevPublish(DevPublishArgs),
    /// Make a new agent CA (certificate and key) for a cluster; give both files to every node
    /// (`agent_ca_cert`, `agent_ca_key`). Refuses to overwrite.
    AgentCa(AgentCaArgs),
    /// Issue a TLS server certificate from the cluster CA for one of the platform's other
    /// listeners (the portal's agent tunnels, `--tunnel-listen`; the artifact store): agents
    /// trust it as they trust the brokers. Valid 90 days: issue a new one and restart before.
    ServerCert(ServerCertArgs),
    /// Back up a running cluster's state into a new directory (manifest + state, checksummed):
    /// everything committed before the call, taken from the leader without stopping anything.
    Backup(BackupArgs),
    /// Build a new node's data directory from a backup: the node (started with `serve`, no
    /// `--bootstrap`) is the only voter of a restored cluster; add the others as learners.
    Restore(RestoreArgs),
}

#[derive(Args)]
struct BackupArgs {
    /// Nodes of the cluster (repeat, or comma-separated); the leader's answer is taken.
    #[arg(long, env = "SUANLI_BROKER_ENDPOINT", value_delimiter = ',', default_value = "http://127.0.0.1:50051")]
    endpoint: Vec<String>,
    #[arg(long, env = "SUANLI_BROKER_PLATFORM_TOKEN", hide_env_values = true)]
    platform_token: String,
    /// The cluster CA, to check an `https://` endpoint.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// The new backup directory (missing or empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct RestoreArgs {
    /// A directory `suanli-broker backup` wrote.
    #[arg(long)]
    backup: PathBuf,
    /// The new node's data directory (missing or empty).
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    node_id: u64,
    /// Where the other nodes will reach this node's peer port (`--peer-listen`), HOST:PORT.
    #[arg(long)]
    peer_address: String,
}

#[derive(Args)]
struct DevPublishArgs {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// The supplier's account token.
    #[arg(long)]
    token: String,
    #[arg(long)]
    node: u64,
    #[arg(long)]
    model: String,
    #[arg(long)]
    cards: u32,
    #[arg(long)]
    vram_gib: u32,
}

#[derive(Args)]
struct AgentCaArgs {
    #[arg(long, default_value = "agent-ca.pem")]
    cert: PathBuf,
    /// Written readable by its owner only.
    #[arg(long, default_value = "agent-ca.key")]
    key: PathBuf,
}

#[derive(Args)]
struct ServerCertArgs {
    /// The cluster CA's certificate and key (`agent_ca_cert`, `agent_ca_key`).
    #[arg(long, default_value = "agent-ca.pem")]
    ca_cert: PathBuf,
    #[arg(long, default_value = "agent-ca.key")]
    ca_key: PathBuf,
    /// A DNS name or IP address the listener is reached by (repeat, or comma-separated).
    #[arg(long = "name", required = true, value_delimiter = ',')]
    names: Vec<String>,
    /// What the certificate is for, as its common name (e.g. `suanli-portal tunnels`).
    #[arg(long, default_value = "suanli")]
    common_name: String,
    #[arg(long)]
    cert: PathBuf,
    /// Written readable by its owner only.
    #[arg(long)]
    key: PathBuf,
}

#[derive(Args)]
struct ClusterArgs {
    /// Any node of the cluster; membership changes are forwarded to the leader.
    #[arg(long, env = "SUANLI_BROKER_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    #[arg(long, env = "SUANLI_BROKER_PLATFORM_TOKEN", hide_env_values = true)]
    platform_token: String,
    #[command(subcommand)]
    action: ClusterAction,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Leader, term, indexes and members as the answering node sees them.
    Status,
    /// Add a node (already running `serve`, not bootstrapped) as a learner; waits until it has
    /// caught up.
    AddLearner {
        node_id: u64,
        /// Its peer port (`--peer-listen`) as the other nodes reach it, HOST:PORT.
        address: String,
    },
    /// Make a learner a voter.
    Promote { node_id: u64 },
    /// Remove a node. Its ID can never be used again.
    Remove { node_id: u64 },
}

#[derive(Args, Default)]
struct ServeArgs {
    /// TOML configuration file; see ops/broker.example.toml.
    #[arg(long, env = "SUANLI_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// This node's Raft ID (a positive integer, never reused).
    #[arg(long, env = "SUANLI_BROKER_NODE_ID")]
    node_id: Option<u64>,
    /// Where the Raft log, snapshots and state live.
    #[arg(long, env = "SUANLI_BROKER_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address for clients (bearer tokens).
    #[arg(long, env = "SUANLI_BROKER_LISTEN")]
    listen: Option<SocketAddr>,
    /// Address clients use to reach this node, if not the listen address.
    #[arg(long, env = "SUANLI_BROKER_ADVERTISE")]
    advertise: Option<String>,
    /// The peer port: Raft and forwarded calls between broker nodes, mutual TLS with
    /// certificates of the cluster CA (`--agent-ca-cert`/`--agent-ca-key`, the same on every
    /// node). Needed by every node of a cluster of more than one.
    #[arg(long, env = "SUANLI_BROKER_PEER_LISTEN")]
    peer_listen: Option<SocketAddr>,
    /// Address other nodes reach this node's peer port by, if not `--peer-listen`.
    #[arg(long, env = "SUANLI_BROKER_PEER_ADVERTISE")]
    peer_advertise: Option<String>,
    /// Prometheus /metrics listen address.
    #[arg(long, env = "SUANLI_BROKER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// The agent port (mutual TLS): where supplier agents enroll and stream telemetry.
    #[arg(long, env = "SUANLI_BROKER_AGENT_LISTEN")]
    agent_listen: Option<SocketAddr>,
    /// The agent CA's certificate (PEM), the same on every node (`suanli-broker agent-ca`).
    /// Without it and its key, a node with an agent port makes its own in the data directory.
    #[arg(long, env = "SUANLI_BROKER_AGENT_CA_CERT")]
    agent_ca_cert: Option<PathBuf>,
    #[arg(long, env = "SUANLI_BROKER_AGENT_CA_KEY")]
    agent_ca_key: Option<PathBuf>,
    /// Further CA certificates (PEM) whose certificates the agent and peer ports accept, while
    /// the cluster CA is rotated (ops/README.md).
    #[arg(long, env = "SUANLI_BROKER_AGENT_CA_ALSO_TRUSTED")]
    agent_ca_also_trusted: Option<PathBuf>,
    /// The platform's SSH user CA key (OpenSSH format), the same on every node. Without it a
    /// node makes its own as `<data-dir>/ssh-user-ca`.
    #[arg(long, env = "SUANLI_BROKER_SSH_CA_KEY")]
    ssh_ca_key: Option<PathBuf>,
    /// Further SSH user CA public keys (OpenSSH lines) agents admit certificates of, while the
    /// SSH user CA is rotated.
    #[arg(long, env = "SUANLI_BROKER_SSH_CA_ALSO_TRUSTED")]
    ssh_ca_also_trusted: Option<PathBuf>,
    /// Token of the platform's own services (registers accounts). At least 16 characters.
    #[arg(long, env = "SUANLI_BROKER_PLATFORM_TOKEN", hide_env_values = true)]
    platform_token: Option<String>,
    /// Initialize a new cluster with this node as its only member, if its data directory is
    /// empty. Give it to exactly one node; add the others with `cluster add-learner`/`promote`.
    #[arg(long)]
    bootstrap: bool,
    /// Log filter, e.g. `info` or `suanli_broker=debug,openraft=warn`.
    #[arg(long, env = "SUANLI_LOG", default_value = "info,openraft=warn")]
    log: String,
}

#[derive(Args)]
struct DevArgs {
    #[arg(long, default_value = ".dev/broker")]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// The agent port (mutual TLS); its CA is `<data-dir>/agent-ca.pem`.
    #[arg(long, default_value = "127.0.0.1:50061")]
    agent_listen: SocketAddr,
    /// Delete the data directory first.
    #[arg(long)]
    fresh: bool,
    #[arg(long, env = "SUANLI_LOG", default_value = "info,openraft=warn")]
    log: String,
}

#[derive(Args)]
struct EnrollmentTokenArgs {
    #[arg(long, env = "SUANLI_BROKER_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// The supplier's account token.
    #[arg(long, env = "SUANLI_TOKEN", hide_env_values = true)]
    token: String,
    /// How long the token may be used (at most 7 days).
    #[arg(long, default_value_t = 3600)]
    valid_seconds: u32,
}

#[derive(Args)]
struct CatalogueArgs {
    #[arg(long, env = "SUANLI_BROKER_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// Any account token or the platform token.
    #[arg(long, env = "SUANLI_TOKEN", hide_env_values = true)]
    token: String,
    /// A or B.
    #[arg(long)]
    class: Option<String>,
    #[arg(long)]
    gpu_model: Option<String>,
    #[arg(long)]
    region: Option<String>,
    #[arg(long)]
    vendor: Option<String>,
    #[arg(long)]
    min_idle_cards: Option<u32>,
    #[arg(long)]
    min_vram_gib: Option<u32>,
    /// hourly, daily, monthly or yearly.
    #[arg(long)]
    billing_mode: Option<String>,
    /// Most per card per period of --billing-mode, in minor units (fen).
    #[arg(long)]
    max_price_minor: Option<i64>,
}

/// The development platform token: fine on loopback, refused nowhere, never for production.
const DEV_PLATFORM_TOKEN: &str = "dev-platform-token-not-for-production";

fn init_logging(filter: &str) {
    suanli_observability::init_logging(filter, suanli_observability::LogTo::Stdout);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(args) => serve(*args).await,
        Command::Dev(args) => dev(args).await,
        Command::Catalogue(args) => catalogue(args).await,
        Command::EnrollmentToken(args) => enrollment_token(args).await,
        Command::Cluster(args) => cluster(args).await,
        Command::AgentCa(args) => agent_ca(args),
        Command::ServerCert(args) => server_cert(args),
        Command::Lease(args) => lease_cli::lease(args).await,
        Command::Backup(args) => {
            let ca = args.ca.as_deref().map(std::fs::read_to_string).transpose().context("reading --ca")?;
            let manifest = suanli_broker::backup::take(&args.endpoint, &args.platform_token, ca.as_deref(), &args.out).await?;
            println!(
                "backup of log index {} ({} bytes, sha256 {}) in {}",
                manifest.broker.last_applied_index,
                manifest.broker.bytes,
                manifest.broker.sha256,
                args.out.display()
            );
            Ok(())
        }
        Command::Restore(args) => {
            let manifest = suanli_broker::backup::restore(&args.backup, &args.data_dir, args.node_id, &args.peer_address)?;
            println!(
                "restored log index {} into {}: start it with `suanli-broker serve --node-id {} --data-dir {} --peer-listen …` (no --bootstrap)",
                manifest.broker.last_applied_index,
                args.data_dir.display(),
                args.node_id,
                args.data_dir.display()
            );
            Ok(())
        }
        Command::SshKey(args) => lease_cli::ssh_key(args).await,
        Command::DevPublish(args) => {
            let channel = client::channel(&args.endpoint).await?;
            let cluster = demo::publish_agent_node(channel, &args.token, args.node, &args.model, args.cards, args.vram_gib).await?;
            println!("{cluster}");
            Ok(())
        }
    }
}

fn agent_ca(args: AgentCaArgs) -> anyhow::Result<()> {
    if args.cert.exists() || args.key.exists() {
        bail!("{} or {} exists already: not overwriting an agent CA", args.cert.display(), args.key.display());
    }
    suanli_pki::Ca::load(&args.cert, &args.key, true)?;
    println!("agent CA: certificate {}, key {} (0600)", args.cert.display(), args.key.display());
    Ok(())
}

fn server_cert(args: ServerCertArgs) -> anyhow::Result<()> {
    // A slip of the flags must not write over the CA itself.
    let same = |a: &std::path::Path, b: &std::path::Path| {
        let resolved = |p: &std::path::Path| p.canonicalize().or_else(|_| std::path::absolute(p)).ok();
        resolved(a).is_some_and(|a| resolved(b) == Some(a))
    };
    for out in [&args.cert, &args.key] {
        if same(out, &args.ca_cert) || same(out, &args.ca_key) {
            bail!("{} is the CA's own file: write the server certificate elsewhere", out.display());
        }
    }
    if same(&args.cert, &args.key) {
        bail!("--cert and --key are one file");
    }
    let ca = suanli_pki::Ca::load(&args.ca_cert, &args.ca_key, false).context("the cluster CA")?;
    let issued = ca.named_server_certificate(&args.common_name, &args.names)?;
    // Both written beside and then renamed into place: a failed write leaves the old pair whole.
    let beside = |p: &std::path::Path| PathBuf::from(format!("{}.new", p.display()));
    let (key_new, cert_new) = (beside(&args.key), beside(&args.cert));
    suanli_pki::write_private_file(&key_new, &issued.key_pem)?;
    std::fs::write(&cert_new, &issued.cert_pem).with_context(|| format!("writing {}", cert_new.display()))?;
    std::fs::rename(&key_new, &args.key).with_context(|| format!("writing {}", args.key.display()))?;
    std::fs::rename(&cert_new, &args.cert).with_context(|| format!("writing {}", args.cert.display()))?;
    let not_after = suanli_pki::pem_certificate_not_after(&issued.cert_pem)?;
    println!("certificate {} for {} (key {}, 0600), valid until {not_after} (unix seconds)", args.cert.display(), args.names.join(", "), args.key.display());
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    let overrides = suanli_broker::config::Overrides {
        node_id: args.node_id,
        data_dir: args.data_dir,
        listen: args.listen,
        advertise: args.advertise,
        peer_listen: args.peer_listen,
        peer_advertise: args.peer_advertise,
        metrics_listen: args.metrics_listen,
        agent_listen: args.agent_listen,
        agent_ca_cert: args.agent_ca_cert,
        agent_ca_key: args.agent_ca_key,
        agent_ca_also_trusted: args.agent_ca_also_trusted,
        ssh_ca_key: args.ssh_ca_key,
        ssh_ca_also_trusted: args.ssh_ca_also_trusted,
        platform_token: args.platform_token,
        bootstrap: args.bootstrap,
    };
    let config = suanli_broker::config::node_config(args.config.as_deref(), overrides)?;
    let bootstrapped = config.bootstrap;
    let node = server::start(config).await?;
    if bootstrapped {
        node.wait_for_leader(Duration::from_secs(30)).await?;
    }
    announce_ready(&node);
    stop_requested().await?;
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM (what systemd and Kubernetes send to stop a service).
async fn stop_requested() -> std::io::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted,
        _ = terminate.recv() => Ok(()),
    }
}

/// The machine-readable line test harnesses and scripts wait for (`suanli-testkit`).
fn announce_ready(node: &server::RunningNode) {
    use std::io::Write;
    let metrics = node.metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    let agents = node.agent_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    let peers = node.peer_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!("SUANLI_READY grpc={} agents={agents} peers={peers} metrics={metrics}", node.grpc_addr);
    let _ = std::io::stdout().flush();
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    init_logging(&args.log);
    if args.fresh && args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)?;
    }
    let fresh = !server::raft_dir(&args.data_dir).exists();
    std::fs::create_dir_all(&args.data_dir)?;
    // Signs the artifact capabilities of jobs, as in production: the local scheduler's store
    // checks them with the same file (`ops/run-local`), and the agents hold no store token.
    let artifact_key = suanli_artifacts::CapabilityKey::load(&args.data_dir.join("artifact.key"), true)?;
    // And agents' tunnel tickets for the local portal (`--tunnel-key-file .dev/broker/tunnel.key`).
    let tunnel_key = suanli_pki::tunnel_ticket::TunnelKey::load(&args.data_dir.join("tunnel.key"), true)?;
    let node = server::start(NodeConfig {
        node_id: 1,
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        advertise: None,
        peer_listen: None,
        peer_advertise: None,
        metrics_listen: Some(args.metrics_listen),
        platform_token: DEV_PLATFORM_TOKEN.into(),
        bootstrap: true,
        reaper_interval: Duration::from_secs(1),
        archive_after: Duration::from_secs(suanli_broker::config::DEFAULT_ARCHIVE_AFTER_S),
        snapshot_every_entries: 10_000,
        events_retained: DEFAULT_EVENTS_RETAINED,
        agent_silent_after: Duration::from_millis(suanli_broker::config::DEFAULT_AGENT_SILENT_AFTER_MS),
        raft_timing: Default::default(),
        health: Default::default(),
        deposit_limits: Default::default(),
        services: Default::default(),
        artifact_key: Some(artifact_key),
        operator_key: None,
        tunnel_key: Some(tunnel_key),
        peer_overrides: Default::default(),
        agent_listen: Some(args.agent_listen),
        agent_ca: AgentCaSource::DataDir,
        agent_ca_also_trusted: None,
        agent_tls_names: Vec::new(),
        ssh_ca_key: None,
        ssh_ca_also_trusted: None,
    })
    .await?;
    node.wait_for_leader(Duration::from_secs(10)).await?;
    let endpoint = format!("http://{}", node.grpc_addr);
    announce_ready(&node);
    println!("Suanli broker (dev) on {endpoint}, metrics on http://{}/metrics", args.metrics_listen);
    println!("agent port https://{} (CA {})", args.agent_listen, args.data_dir.join("agent-ca.pem").display());
    println!("platform token: {DEV_PLATFORM_TOKEN}");
    if fresh {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())?.connect().await?;
        let accounts = demo::seed(channel, DEV_PLATFORM_TOKEN).await?;
        for (id, token) in &accounts.suppliers {
            println!("supplier   acc-{id}: {token}");
        }
        println!("researcher acc-{}: {}", accounts.researcher.0, accounts.researcher.1);
        println!();
        println!("Try:  cargo run -p suanli-broker -- catalogue --token {DEV_PLATFORM_TOKEN} --class B");
    } else {
        println!("(existing data in {}; tokens were printed on first start; --fresh starts over)", args.data_dir.display());
    }
    tokio::signal::ctrl_c().await?;
    node.shutdown().await;
    Ok(())
}

async fn enrollment_token(args: EnrollmentTokenArgs) -> anyhow::Result<()> {
    use suanli_proto::v1::supplier_service_client::SupplierServiceClient;
    let channel = client::channel(&args.endpoint).await?;
    let mut supplier = SupplierServiceClient::with_interceptor(channel, client::bearer(Some(&args.token))?);
    let request_id = format!("enrollment-token-{}", suanli_broker::service::random_secret(12));
    let reply = supplier
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id, valid_seconds: args.valid_seconds })
        .await
        .map_err(|s| suanli_proto::decode_status(&s))?
        .into_inner();
    println!("{}", reply.token);
    Ok(())
}

async fn catalogue(args: CatalogueArgs) -> anyhow::Result<()> {
    let mut client = client::connect(&args.endpoint, Some(&args.token)).await?;
    let class = match args.class.as_deref().map(str::to_ascii_uppercase).as_deref() {
        None => v1::ClusterClass::Unspecified,
        Some("A") => v1::ClusterClass::A,
        Some("B") => v1::ClusterClass::B,
        Some(other) => bail!("--class must be A or B, not {other}"),
    };
    let billing_mode = match args.billing_mode.as_deref() {
        None => v1::BillingMode::Unspecified,
        Some(raw) => {
            let mode = suanli_types::BillingMode::parse(raw).map_err(|e| anyhow::anyhow!("{e}"))?;
            v1::BillingMode::try_from(suanli_proto::convert::billing_mode_to_wire(mode))?
        }
    };
    let mut request = v1::ListCatalogueRequest {
        class: class.into(),
        gpu_model: args.gpu_model.unwrap_or_default(),
        region: args.region.unwrap_or_default(),
        vendor: args.vendor.unwrap_or_default(),
        min_idle_cards: args.min_idle_cards.unwrap_or(0),
        min_vram_gib: args.min_vram_gib.unwrap_or(0),
        billing_mode: billing_mode.into(),
        max_price_minor: args.max_price_minor,
        ..Default::default()
    };
    println!("{:>4} {:<12} {:<5} {:<11} {:>5} {:>5} {:<10} {:<12} PRICES (per card)", "ID", "CPC", "CLASS", "MODEL", "IDLE", "CARDS", "REGION", "VENDOR");
    loop {
        let page = client.list_catalogue(request.clone()).await.map_err(|s| suanli_proto::decode_status(&s))?.into_inner();
        for c in &page.clusters {
            let l = c.listing.clone().unwrap_or_default();
            let prices: Vec<String> = l
                .prices
                .iter()
                .filter_map(|p| {
                    let mode = billing_mode_from_wire(p.mode)?;
                    Some(format!("{}.{:02} {}/{}", p.per_card_minor / 100, p.per_card_minor % 100, l.currency, mode))
                })
                .collect();
            let class = if c.class == i32::from(v1::ClusterClass::A) { "A" } else { "B" };
            println!(
                "{:>4} {:<12} {:<5} {:<11} {:>5} {:>5} {:<10} {:<12} {}",
                c.cluster_id,
                c.cpc_id,
                class,
                l.gpu_model,
                c.idle_cards,
                c.total_cards,
                l.region,
                l.vendor,
                prices.join(", ")
            );
        }
        if page.next_page_after_cluster_id == 0 {
            break;
        }
        request.page_after_cluster_id = page.next_page_after_cluster_id;
    }
    Ok(())
}

async fn cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let mut admin = client::admin(&args.endpoint, &args.platform_token).await?;
    let status = match args.action {
        ClusterAction::Status => admin.status(v1::StatusRequest {}).await,
        ClusterAction::AddLearner { node_id, address } => admin.add_learner(v1::AddLearnerRequest { node_id, address }).await,
        ClusterAction::Promote { node_id } => admin.promote(v1::NodeRef { node_id }).await,
        ClusterAction::Remove { node_id } => admin.remove(v1::NodeRef { node_id }).await,
    }
    .map_err(|s| suanli_proto::decode_status(&s))?
    .into_inner();
    println!(
        "node {} sees leader {} in term {}; log {}, applied {}, snapshot {}; runs store format {}, the cluster writes format {}",
        status.node_id,
        status.leader_id,
        status.term,
        status.last_log_index,
        status.applied_index,
        status.snapshot_index,
        status.store_format,
        status.cluster_format
    );
    for m in &status.members {
        let runs = match m.newest_store_format {
            0 => "store format unknown (5 or older, or not heard)".to_owned(),
            f => format!("runs store format {f}"),
        };
        println!("  node {:<4} {:<22} {:<8} {runs}", m.node_id, m.address, if m.voter { "voter" } else { "learner" });
    }
    Ok(())
}
