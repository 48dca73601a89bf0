use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use suanli_agent::config::{AgentArgs, AgentConfig};
use suanli_agent::identity;
use suanli_agent::runtime::{self, lock, Agent};
use suanli_agent::source::Gpus;
use suanli_agent::{access, exporter, host, inventory, jobs, probe, provisioner, services, tunnel, uplink};
use suanli_proto::v1;
use suanli_telemetry::GpuSource;

#[derive(Parser)]
#[command(name = "suanli-agent", version, about = "Suanli supplier agent: enrollment, GPU telemetry, health")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll (first start) and report this node's GPUs to the broker until stopped.
    Run(AgentArgs),
    /// Print the inventory this node would enroll with, as JSON, and exit.
    Inventory(AgentArgs),
    /// Check which of the protections between leases and the node are active here; exits
    /// non-zero when one is missing.
    Doctor(AgentArgs),
    /// Started by the agent beside each job attempt (fence_guard.rs): kills the attempt when
    /// the agent has been gone for the fencing time.
    #[command(hide = true)]
    FenceGuard {
        #[arg(long)]
        pid: u32,
        /// The job leader's start time (`/proc/PID/stat` field 22).
        #[arg(long)]
        started: u64,
        #[arg(long)]
        after_ms: u64,
        #[arg(long)]
        cgroup_procs: Vec<std::path::PathBuf>,
    },
    /// Started by the agent as a lease's user for a service that listens on a path of its own
    /// (JupyterLab): runs the program after `--` and carries the handed-over socket's
    /// connections to `--socket` (bridge.rs).
    #[command(hide = true)]
    ServiceBridge {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

/// How often the agent looks for Class B leases to provision on its node.
const PROVISION_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How often the agent checks which job attempts it must start or stop.
const JOB_CHECK_EVERY: Duration = Duration::from_millis(500);
/// How often network quality to the broker is measured.
const PROBE_EVERY: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Doctor(args) => {
            let config = AgentConfig::resolve(&args)?;
            let report = suanli_agent::doctor::check(&config.access);
            print!("{report}");
            if report.healthy() {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Command::FenceGuard { pid, started, after_ms, cgroup_procs } => {
            suanli_observability::init_logging("info", suanli_observability::LogTo::Stderr);
            suanli_agent::fence_guard::main(pid, started, Duration::from_millis(after_ms), &cgroup_procs)
                .with_context(|| format!("guarding job process {pid}"))?;
            Ok(())
        }
        Command::ServiceBridge { listen, socket, command } => {
            let code = suanli_agent::bridge::run(&listen, &socket, &command).await.with_context(|| format!("serving {}", socket.display()))?;
            std::process::exit(code)
        }
        Command::Inventory(args) => {
            let config = AgentConfig::resolve(&args)?;
            let facts = host::facts(config.hostname.as_deref());
            let gpus = Gpus::open(&config, &facts.hostname)?;
            let inventory = inventory(&facts, &gpus.cards());
            println!("{}", serde_json::to_string_pretty(&inventory)?);
            Ok(())
        }
    }
}

async fn run(args: AgentArgs) -> anyhow::Result<()> {
    suanli_observability::init_logging(&args.log, suanli_observability::LogTo::Stderr);
    let config = AgentConfig::resolve(&args)?;
    if config.ssh_listen.is_some() {
        // Before anything is enrolled or made: a home root lease users cannot enter is refused.
        access::accounts::check_home_root(&config.access.home_root).map_err(anyhow::Error::msg)?;
    }
    let cluster_ca_pem = config.require_broker()?;
    let trust = identity::BrokerTls::new(&cluster_ca_pem);
    let facts = host::facts(config.hostname.as_deref());
    let gpus = Gpus::open(&config, &facts.hostname)?;
    let inventory = inventory(&facts, &gpus.cards());
    inventory.validate().context("this node's inventory")?;

    let identity = enroll(&config, &trust, &inventory).await?;
    let record = match &config.record {
        Some(path) => Some(std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("opening {}", path.display()))?),
        None => None,
    };
    let agent = Arc::new(Agent::new(facts.hostname.clone(), identity.node_id(), gpus, config.retain_samples, record));
    agent.full_telemetry.store(identity.node.full_telemetry, std::sync::atomic::Ordering::Relaxed);

    let listener = tokio::net::TcpListener::bind(config.metrics_listen).await.with_context(|| format!("binding {}", config.metrics_listen))?;
    let metrics_addr = listener.local_addr()?;
    let app = exporter::router(agent.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    tokio::spawn(runtime::sampler(agent.clone(), config.sample_interval));
    tokio::spawn(uplink::run(agent.clone(), config.brokers.clone(), identity.tls.clone(), config.max_batch));
    let (access, gateway, ssh_addr) = match config.ssh_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding the ssh gateway to {listen}"))?;
            let ssh_addr = listener.local_addr()?;
            let host_key = access::gateway::host_key(&config.state_dir.join("ssh_host_ed25519_key"))?;
            let published = v1::NodeAccess {
                ssh_host: config.ssh_advertise.clone().unwrap_or_else(|| {
                    if ssh_addr.ip().is_unspecified() {
                        facts.hostname.clone()
                    } else {
                        ssh_addr.ip().to_string()
                    }
                }),
                ssh_port: u32::from(ssh_addr.port()),
                host_key: access::gateway::public_line(&host_key),
                login_prefix: config.access.login_prefix.clone(),
            };
            let access = access::Access::new(config.access.clone())?;
            tokio::spawn(access::gateway::serve(listener, access::gateway::config(host_key), access.clone()));
            (Some(access), Some(published), Some(ssh_addr))
        }
        None => (None, None, None),
    };
    let firewall = Arc::new(access::firewall::RendezvousFirewall::new(config.access.rendezvous_firewall, identity.node_id(), &config.state_dir));
    let services = match access.clone() {
        Some(access) => {
            let templates =
                suanli_agent::templates::Templates::new(config.templates_dir.clone(), config.jupyter_python.clone(), config.jupyter_packages.clone());
            Some(services::Services::new(access, &config.state_dir, config.job_binary.clone(), templates).context("the services' directory")?)
        }
        None => None,
    };
    if let Some(access) = access.clone() {
        let runner = jobs::JobRunner {
            brokers: config.brokers.clone(),
            tls: identity.tls.clone(),
            access,
            node: suanli_types::NodeId(identity.node_id()),
            state_dir: config.state_dir.clone(),
            job_binary: config.job_binary.clone(),
            // An https:// store is trusted on the cluster CA's word only, as the broker is.
            artifacts: config.artifacts.clone().map(|(url, token)| jobs::ArtifactStore { url, token, ca_pem: Some(cluster_ca_pem.clone()) }),
            capabilities: Default::default(),
            files: config.job_files,
            fence_after: config.fence_after,
            firewall: firewall.clone(),
        };
        if config.access.rendezvous_firewall == access::firewall::FirewallKind::Off {
            tracing::warn!("the rendezvous firewall is off: a job's MASTER_PORT is open to whoever reaches this node");
        }
        tokio::spawn(runner.run(JOB_CHECK_EVERY));
    }
    let provisioner =
        provisioner::Provisioner { brokers: config.brokers.clone(), tls: identity.tls.clone(), access, gateway, state_dir: config.state_dir.clone() };
    tokio::spawn(provisioner.run(PROVISION_CHECK_EVERY));
    if let Some(portal) = config.portal.clone() {
        // The portal is trusted on the cluster CA's word, as the broker is, unless told otherwise.
        let portal_ca = match &config.portal_ca {
            Some(path) => std::fs::read(path).with_context(|| format!("portal_ca {}", path.display()))?,
            None => cluster_ca_pem.clone().into_bytes(),
        };
        let portal_trust = suanli_tunnel::tls::PortalTrust::from_pem(&portal_ca).context("portal_ca")?;
        tokio::spawn(tunnel::PortalTunnel { brokers: config.brokers.clone(), tls: identity.tls.clone(), portal, portal_trust, services }.run());
    }
    let probed = agent.clone();
    let target = config.brokers[0].trim_start_matches("http://").trim_start_matches("https://").to_owned();
    tokio::spawn(async move {
        loop {
            let quality = probe::measure(&target).await;
            *lock(&probed.quality) = quality;
            tokio::time::sleep(PROBE_EVERY).await;
        }
    });

    let ssh = ssh_addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
    println!("SUANLI_READY metrics={metrics_addr} node={} ssh={ssh}", identity.node_id());
    use std::io::Write;
    std::io::stdout().flush()?;
    tracing::info!(node = identity.node_id(), metrics = %metrics_addr, cards = agent.cards.len(), "agent running");
    shutdown_signal().await;
    tracing::info!("shutting down");
    // The rendezvous rules stay (what the jobs forked may outlive this process): the next agent
    // kills what is left of them, then empties its table.
    Ok(())
}

/// Establishes the node's identity with the first broker that answers, retrying while the
/// brokers are unreachable (an agent may start before them).
async fn enroll(config: &AgentConfig, trust: &identity::BrokerTls, inventory: &suanli_types::NodeInventory) -> anyhow::Result<identity::Identity> {
    let mut backoff = Duration::from_millis(200);
    let mut attempt = 0usize;
    loop {
        let endpoint = &config.brokers[attempt % config.brokers.len()];
        attempt += 1;
        match identity::establish(endpoint, trust, &config.state_dir, config.enrollment_token.as_deref(), inventory).await {
            Ok(identity) => return Ok(identity),
            Err(e) if e.is_transient() => {
                tracing::warn!(broker = %endpoint, why = %e, "broker not reachable yet; retrying");
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
