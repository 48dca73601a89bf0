//! Configuration: a TOML file (`ops/agent.example.toml`), overridden by `SUANLI_AGENT_*`
//! environment variables and flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

#[derive(Args, Debug, Default)]
pub struct AgentArgs {
    /// TOML configuration file; see ops/agent.example.toml.
    #[arg(long, env = "SUANLI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The brokers' agent ports, `https://HOST:PORT`, comma-separated (any node will do).
    #[arg(long, env = "SUANLI_AGENT_BROKER", value_delimiter = ',')]
    pub broker: Vec<String>,
    /// The agent CA's certificate (PEM): the brokers' agent ports must present a certificate
    /// it signed. The supplier gets it with the enrollment token.
    #[arg(long, env = "SUANLI_AGENT_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,
    /// Where the agent keeps its key, certificate and node identity.
    #[arg(long, env = "SUANLI_AGENT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// `suanli-job`, which runs built-in CV tasks on leased cards (not needed for jobs that
    /// name their own program).
    #[arg(long, env = "SUANLI_AGENT_JOB_BINARY")]
    pub job_binary: Option<PathBuf>,
    /// The artifact store jobs' inputs, outputs and checkpoints go through (`https://host:port`,
    /// its certificate from the cluster CA in `broker_ca`; `http://` only on loopback).
    #[arg(long, env = "SUANLI_AGENT_ARTIFACTS_URL")]
    pub artifacts_url: Option<String>,
    /// A store-wide bearer token, only for stores that take no capabilities: the broker hands
    /// each job attempt placed here a capability for its own artifacts, which is all a node
    /// needs.
    #[arg(long, env = "SUANLI_AGENT_ARTIFACTS_TOKEN", hide_env_values = true)]
    pub artifacts_token: Option<String>,
    /// The portal to keep a tunnel to, through which the portal reaches services on this node:
    /// `https://HOST[:PORT]` (its tunnel port, or its public address behind a TLS proxy), or
    /// `http://HOST:PORT` (or `HOST:PORT`) for a portal on this host only.
    #[arg(long, env = "SUANLI_AGENT_PORTAL")]
    pub portal: Option<String>,
    /// The CA certificates (PEM) an `https://` portal's certificate must come from; default the
    /// cluster CA (`broker_ca`). A public CA's bundle where the portal is behind a TLS proxy.
    #[arg(long, env = "SUANLI_AGENT_PORTAL_CA")]
    pub portal_ca: Option<PathBuf>,
    /// Where the environments services run in are installed, once each (JupyterLab's), shared
    /// by every lease read-only (default /var/lib/suanli/templates).
    #[arg(long, env = "SUANLI_AGENT_TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,
    /// The Python interpreter JupyterLab's environment is made with; every lease's account must
    /// be able to run it (a system interpreter, not one under a home; default /usr/bin/python3).
    #[arg(long, env = "SUANLI_AGENT_JUPYTER_PYTHON")]
    pub jupyter_python: Option<PathBuf>,
    /// Packages the notebooks import besides JupyterLab's: a `site-packages` of the same Python
    /// version holding the node's PyTorch.
    #[arg(long, env = "SUANLI_AGENT_JUPYTER_PACKAGES")]
    pub jupyter_packages: Option<PathBuf>,
    /// One-time enrollment token from the supplier (only needed until the node is enrolled).
    #[arg(long, env = "SUANLI_AGENT_ENROLLMENT_TOKEN", hide_env_values = true)]
    pub enrollment_token: Option<String>,
    /// Prometheus /metrics listen address (dcgm-exporter's port by default).
    #[arg(long, env = "SUANLI_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// GPU source: `nvml` (the NVIDIA driver) or `simulated`.
    #[arg(long, env = "SUANLI_AGENT_SOURCE")]
    pub source: Option<SourceKind>,
    /// Simulated cards' model, e.g. "A100 80GB".
    #[arg(long, env = "SUANLI_AGENT_SIM_MODEL")]
    pub sim_model: Option<String>,
    #[arg(long, env = "SUANLI_AGENT_SIM_CARDS")]
    pub sim_cards: Option<u32>,
    #[arg(long, env = "SUANLI_AGENT_SIM_SEED")]
    pub sim_seed: Option<u64>,
    /// The node's name as enrolled (default: the system's hostname).
    #[arg(long, env = "SUANLI_AGENT_HOSTNAME")]
    pub hostname: Option<String>,
    #[arg(long, env = "SUANLI_AGENT_SAMPLE_INTERVAL_MS")]
    pub sample_interval_ms: Option<u64>,
    /// The SSH gateway's listen address; leases are reached through it. Unset: no gateway.
    #[arg(long, env = "SUANLI_AGENT_SSH_LISTEN")]
    pub ssh_listen: Option<SocketAddr>,
    /// The host name or address researchers reach the gateway by (default: the listen
    /// address, or the hostname when listening on all interfaces).
    #[arg(long, env = "SUANLI_AGENT_SSH_ADVERTISE")]
    pub ssh_advertise: Option<String>,
    /// Where lease accounts get their homes.
    #[arg(long, env = "SUANLI_AGENT_HOME_ROOT")]
    pub home_root: Option<PathBuf>,
    /// Lease logins are `<prefix><lease id>`.
    #[arg(long, env = "SUANLI_AGENT_LOGIN_PREFIX")]
    pub login_prefix: Option<String>,
    /// Failed SSH logins per source address per minute before it is refused outright.
    #[arg(long, env = "SUANLI_AGENT_MAX_LOGIN_FAILURES")]
    pub max_login_failures: Option<u32>,
    /// Where the cards' device nodes are (`/dev`); each lease may open its own cards' only.
    #[arg(long, env = "SUANLI_AGENT_DEVICES_DIR")]
    pub devices_dir: Option<PathBuf>,
    /// What becomes of a lease's home at its end: `wipe` (default) or `keep`.
    #[arg(long, env = "SUANLI_AGENT_SCRATCH_POLICY")]
    pub scratch_policy: Option<crate::access::ScratchPolicy>,
    /// First and last UID of lease accounts (`FIRST-LAST`); several agents on one host need
    /// disjoint ranges [default: 2000000-2999999]
    #[arg(long, env = "SUANLI_AGENT_UID_RANGE")]
    pub uid_range: Option<String>,
    /// Which of /tmp,/var/tmp,/dev/shm each lease gets privately, comma-separated
    /// [default: all three]
    #[arg(long, env = "SUANLI_AGENT_PRIVATE_DIRS")]
    pub private_dirs: Option<String>,
    /// Seconds without any broker before this node stops its jobs (self-fencing; below the
    /// scheduler's 30 s, so no attempt runs twice) [default: 20]
    #[arg(long, env = "SUANLI_AGENT_FENCE_AFTER_S")]
    pub fence_after_s: Option<u64>,
    /// How a job's rendezvous port (MASTER_PORT) is kept to the lease's own processes:
    /// nftables rules, or off [default: nftables]
    #[arg(long, env = "SUANLI_AGENT_RENDEZVOUS_FIREWALL")]
    pub rendezvous_firewall: Option<crate::access::firewall::FirewallKind>,
    /// Also append every sample, as sent, to this JSON-lines file (audits and tests).
    #[arg(long, env = "SUANLI_AGENT_RECORD")]
    pub record: Option<PathBuf>,
    /// Log filter, e.g. `info` or `suanli_agent=debug`.
    #[arg(long, env = "SUANLI_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Nvml,
    Simulated,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    agent: Option<FileAgent>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    broker: Option<Vec<String>>,
    broker_ca: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    job_binary: Option<PathBuf>,
    artifacts_url: Option<String>,
    artifacts_token: Option<String>,
    portal: Option<String>,
    portal_ca: Option<PathBuf>,
    templates_dir: Option<PathBuf>,
    jupyter_python: Option<PathBuf>,
    jupyter_packages: Option<PathBuf>,
    enrollment_token: Option<String>,
    metrics_listen: Option<SocketAddr>,
    hostname: Option<String>,
    sample_interval_ms: Option<u64>,
    retain_samples: Option<usize>,
    max_batch: Option<usize>,
    source: Option<SourceKind>,
    nvml_library: Option<PathBuf>,
    /// Use the simulated source when the NVIDIA library cannot be loaded.
    fallback_to_simulated: Option<bool>,
    simulated: Option<FileSimulated>,
    access: Option<FileAccess>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAccess {
    ssh_listen: Option<SocketAddr>,
    ssh_advertise: Option<String>,
    home_root: Option<PathBuf>,
    login_prefix: Option<String>,
    shell: Option<PathBuf>,
    sftp_server: Option<PathBuf>,
    max_login_failures: Option<u32>,
    devices_dir: Option<PathBuf>,
    xvnc: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    scratch_policy: Option<crate::access::ScratchPolicy>,
    /// First and last UID of lease accounts, as "FIRST-LAST".
    uid_range: Option<String>,
    /// Which of /tmp, /var/tmp and /dev/shm each lease gets privately, with its own IPC
    /// namespace (default all three; [] switches it off).
    private_dirs: Option<Vec<String>>,
    /// Fraction of the node's memory and CPU the leases share, by cards (default 0.9).
    lease_fraction: Option<f64>,
    /// Seconds past paid_until before a lease is ended here without the broker (default 30).
    expiry_grace_s: Option<u64>,
    /// New SSH connections per source address per minute (default 120).
    connections_per_source: Option<u32>,
    /// Largest checkpoint or output read from a lease (default 64 GiB).
    max_job_file_bytes: Option<u64>,
    /// Seconds one job transfer may take (default 1800).
    job_transfer_deadline_s: Option<u64>,
    /// Seconds without any broker before this node stops its jobs (default 20).
    fence_after_s: Option<u64>,
    /// "nftables" (default) or "off": whether only the lease reaches its jobs' rendezvous port.
    rendezvous_firewall: Option<crate::access::firewall::FirewallKind>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileSimulated {
    model: Option<String>,
    cards: Option<u32>,
    seed: Option<u64>,
    /// Target load of every card, 0.0–1.0.
    load: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct SimulatedConfig {
    pub model: String,
    pub cards: u32,
    pub seed: u64,
    pub load: f64,
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub brokers: Vec<String>,
    pub broker_ca: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub job_binary: Option<PathBuf>,
    /// The artifact store's URL and, for stores without capabilities, a token.
    pub artifacts: Option<(String, Option<String>)>,
    /// The portal to keep a tunnel to.
    pub portal: Option<PortalEndpoint>,
    /// The CA an `https://` portal's certificate must come from (default: `broker_ca`'s).
    pub portal_ca: Option<PathBuf>,
    /// Where services' environments are installed, and the Python JupyterLab's is made with.
    pub templates_dir: PathBuf,
    pub jupyter_python: PathBuf,
    pub jupyter_packages: Option<PathBuf>,
    pub enrollment_token: Option<String>,
    pub metrics_listen: SocketAddr,
    pub hostname: Option<String>,
    pub sample_interval: Duration,
    /// Samples kept after the broker acknowledged them, to refill a new leader's windows.
    pub retain_samples: usize,
    pub max_batch: usize,
    pub source: SourceKind,
    pub nvml_library: Option<PathBuf>,
    pub fallback_to_simulated: bool,
    pub simulated: SimulatedConfig,
    pub record: Option<PathBuf>,
    /// The SSH gateway, when configured.
    pub ssh_listen: Option<SocketAddr>,
    pub ssh_advertise: Option<String>,
    pub access: crate::access::AccessConfig,
    pub job_files: crate::jobs::FileLimits,
    /// Without any broker this long, the node stops its jobs.
    pub fence_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

impl AgentConfig {
    pub fn resolve(args: &AgentArgs) -> Result<AgentConfig, ConfigError> {
        let file = match &args.config {
            Some(path) => load(path)?,
            None => FileAgent::default(),
        };
        let sim = file.simulated.unwrap_or_default();
        let access = file.access.unwrap_or_default();
        let brokers = if args.broker.is_empty() { file.broker.unwrap_or_default() } else { args.broker.clone() };
        let config = AgentConfig {
            brokers,
            broker_ca: args.broker_ca.clone().or(file.broker_ca),
            // Absolute: lease programs resolve paths under it after changing directory.
            state_dir: absolute(args.state_dir.clone().or(file.state_dir).unwrap_or_else(|| PathBuf::from("/var/lib/suanli/agent")))?,
            job_binary: args.job_binary.clone().or(file.job_binary),
            artifacts: match (args.artifacts_url.clone().or(file.artifacts_url), args.artifacts_token.clone().or(file.artifacts_token)) {
                (Some(url), _) if !artifact_url_is_safe(&url) => {
                    return Err(ConfigError::Invalid(format!(
                        "artifacts_url {url:?}: capabilities travel only inside TLS (https://), or to a store on this host"
                    )))
                }
                (Some(url), token) => Some((url, token)),
                (None, None) => None,
                (None, Some(_)) => return Err(ConfigError::Invalid("an artifact token without the store's URL".into())),
            },
            portal: args.portal.clone().or(file.portal).map(|p| PortalEndpoint::parse(&p)).transpose()?,
            portal_ca: args.portal_ca.clone().or(file.portal_ca),
            templates_dir: absolute(args.templates_dir.clone().or(file.templates_dir).unwrap_or_else(|| PathBuf::from("/var/lib/suanli/templates")))?,
            jupyter_python: args.jupyter_python.clone().or(file.jupyter_python).unwrap_or_else(|| PathBuf::from("/usr/bin/python3")),
            jupyter_packages: args.jupyter_packages.clone().or(file.jupyter_packages),
            enrollment_token: args.enrollment_token.clone().or(file.enrollment_token),
            metrics_listen: args.metrics_listen.or(file.metrics_listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9400))),
            hostname: args.hostname.clone().or(file.hostname),
            sample_interval: Duration::from_millis(args.sample_interval_ms.or(file.sample_interval_ms).unwrap_or(1000)),
            retain_samples: file.retain_samples.unwrap_or(600),
            max_batch: file.max_batch.unwrap_or(100),
            source: args.source.or(file.source).unwrap_or(SourceKind::Nvml),
            nvml_library: file.nvml_library,
            fallback_to_simulated: file.fallback_to_simulated.unwrap_or(false),
            simulated: SimulatedConfig {
                model: args.sim_model.clone().or(sim.model).unwrap_or_else(|| "A100 80GB".into()),
                cards: args.sim_cards.or(sim.cards).unwrap_or(8),
                seed: args.sim_seed.or(sim.seed).unwrap_or(1),
                load: sim.load.unwrap_or(0.3),
            },
            record: args.record.clone(),
            ssh_listen: args.ssh_listen.or(access.ssh_listen),
            ssh_advertise: args.ssh_advertise.clone().or(access.ssh_advertise),
            access: crate::access::AccessConfig {
                home_root: absolute(args.home_root.clone().or(access.home_root).unwrap_or_else(|| PathBuf::from("/home/suanli")))?,
                login_prefix: args.login_prefix.clone().or(access.login_prefix).unwrap_or_else(|| "sl".into()),
                shell: access.shell.unwrap_or_else(|| PathBuf::from("/bin/bash")),
                sftp_server: access.sftp_server.unwrap_or_else(|| PathBuf::from("/usr/lib/openssh/sftp-server")),
                max_login_failures: args.max_login_failures.or(access.max_login_failures).unwrap_or(10).max(1),
                devices_dir: args.devices_dir.clone().or(access.devices_dir).unwrap_or_else(|| PathBuf::from("/dev")),
                xvnc: access.xvnc.or_else(|| Some(PathBuf::from("/usr/bin/Xvnc"))).filter(|p| p.exists()),
                cgroup_root: access.cgroup_root.or_else(|| Some(PathBuf::from("/sys/fs/cgroup"))).filter(|p| p.is_dir()),
                scratch: args.scratch_policy.or(access.scratch_policy).unwrap_or(crate::access::ScratchPolicy::Wipe),
                state_dir: PathBuf::new(), // set below, from the agent's own
                uid_range: parse_uid_range(args.uid_range.as_deref().or(access.uid_range.as_deref()).unwrap_or("2000000-2999999"))?,
                private_dirs: args
                    .private_dirs
                    .as_deref()
                    .map(|list| list.split(',').map(str::trim).filter(|d| !d.is_empty()).map(str::to_owned).collect())
                    .or(access.private_dirs)
                    .unwrap_or_else(|| crate::access::sandbox::PRIVATE_DIRS.iter().map(|(d, _)| (*d).to_owned()).collect()),
                lease_fraction: access.lease_fraction.unwrap_or(0.9),
                host_memory_bytes: 0,
                host_cpus: 0,
                expiry_grace: Duration::from_secs(access.expiry_grace_s.unwrap_or(30)),
                connections_per_source: access.connections_per_source.unwrap_or(120),
                rendezvous_firewall: args.rendezvous_firewall.or(access.rendezvous_firewall).unwrap_or(crate::access::firewall::FirewallKind::Nftables),
            },
            job_files: crate::jobs::FileLimits {
                max_bytes: access.max_job_file_bytes.unwrap_or(crate::jobs::FileLimits::default().max_bytes),
                deadline: access.job_transfer_deadline_s.map_or(crate::jobs::FileLimits::default().deadline, Duration::from_secs),
            },
            fence_after: Duration::from_secs(args.fence_after_s.or(access.fence_after_s).unwrap_or(20)),
        };
        let mut config = config;
        config.access.state_dir = config.state_dir.clone();
        let host = crate::host::facts(None);
        config.access.host_memory_bytes = u64::from(host.memory_gib) << 30;
        config.access.host_cpus = host.vcpus;
        config.validate()?;
        Ok(config)
    }

    /// For running (not for `inventory`): the agent needs a broker to talk to, over TLS, and
    /// the CA to check it by. Returns that CA's certificate.
    pub fn require_broker(&self) -> Result<String, ConfigError> {
        if self.brokers.is_empty() {
            return Err(ConfigError::Invalid("name the broker: --broker, SUANLI_AGENT_BROKER or [agent] broker".into()));
        }
        if let Some(plain) = self.brokers.iter().find(|b| !b.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!("broker endpoint {plain:?}: agents talk to the broker's agent port over TLS (https://HOST:PORT)")));
        }
        let ca = self
            .broker_ca
            .as_ref()
            .ok_or_else(|| ConfigError::Invalid("give the agent CA's certificate: --broker-ca, SUANLI_AGENT_BROKER_CA or [agent] broker_ca".into()))?;
        std::fs::read_to_string(ca).map_err(|e| ConfigError::Read(ca.clone(), e))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |why: &str| Err(ConfigError::Invalid(why.into()));
        if self.sample_interval < Duration::from_millis(100) || self.sample_interval > Duration::from_secs(60) {
            return bad("sample_interval_ms must be between 100 and 60000");
        }
        if !(1..=1000).contains(&self.max_batch) {
            return bad("max_batch must be between 1 and 1000 (the broker's batch limit)");
        }
        if self.retain_samples < self.max_batch {
            return bad("retain_samples must be at least max_batch");
        }
        if !(0.0..=1.0).contains(&self.simulated.load) {
            return bad("simulated.load must be between 0.0 and 1.0");
        }
        if self.simulated.cards == 0 || self.simulated.cards as usize > suanli_types::node::MAX_CARDS_PER_NODE {
            return bad("simulated.cards must be between 1 and 64");
        }
        if !(0.0..=1.0).contains(&self.access.lease_fraction) || self.access.lease_fraction == 0.0 {
            return bad("lease_fraction must be above 0.0 and at most 1.0");
        }
        if let Some(bad_dir) = self.access.private_dirs.iter().find(|d| !crate::access::sandbox::PRIVATE_DIRS.iter().any(|(t, _)| t == d)) {
            return Err(ConfigError::Invalid(format!("private_dirs: {bad_dir:?} is not one of /tmp, /var/tmp, /dev/shm")));
        }
        if self.fence_after < Duration::from_secs(2) {
            return bad("fence_after_s must be at least 2");
        }
        if !suanli_types::node::valid_login_prefix(&self.access.login_prefix) {
            return Err(ConfigError::Invalid(format!("login_prefix: {}", suanli_types::node::LOGIN_PREFIX_RULE)));
        }
        if suanli_telemetry::models::find(&self.simulated.model).is_none() {
            let known: Vec<&str> = suanli_telemetry::models::MODELS.iter().map(|m| m.name).collect();
            return Err(ConfigError::Invalid(format!("unknown simulated model {:?}; known: {}", self.simulated.model, known.join(", "))));
        }
        Ok(())
    }
}

fn absolute(path: PathBuf) -> Result<PathBuf, ConfigError> {
    std::path::absolute(&path).map_err(|e| ConfigError::Read(path, e))
}

/// "FIRST-LAST", both inclusive, above the host's own users.
fn parse_uid_range(text: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::Invalid(format!("uid_range {text:?}: FIRST-LAST, with 100000 <= FIRST <= LAST < 4294967294"));
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let (first, last): (u32, u32) = (first.trim().parse().map_err(|_| bad())?, last.trim().parse().map_err(|_| bad())?);
    if first < 100_000 || first > last || last >= u32::MAX - 1 {
        return Err(bad());
    }
    Ok((first, last))
}

fn load(path: &Path) -> Result<FileAgent, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_owned(), e))?;
    let parsed: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
    Ok(parsed.agent.unwrap_or_default())
}

/// `https://` anywhere, `http://` only to this host's loopback.
fn artifact_url_is_safe(url: &str) -> bool {
    if url.starts_with("https://") {
        return true;
    }
    let Some(rest) = url.strip_prefix("http://") else { return false };
    portal_is_on_this_host(rest.split(['/', '?', '#']).next().unwrap_or_default())
}

/// Where the agent keeps its tunnel: the portal's host and port, and whether the dial is wrapped
/// in TLS. Plain TCP goes only to this host: whoever answers the dial controls the node's
/// services (a shell as any live lease), so off this host the portal must prove its name first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalEndpoint {
    /// A DNS name or an IP address (IPv6 in brackets), as the portal's certificate names it.
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl PortalEndpoint {
    /// `https://HOST[:PORT]` (port 443 by default), `http://HOST:PORT` or `HOST:PORT` (this
    /// host only); nothing after the authority but `/`.
    pub fn parse(text: &str) -> Result<PortalEndpoint, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid(format!("portal {text:?}: {why}"));
        let (tls, rest) = match text.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some(_) => return Err(bad("https://HOST[:PORT], or http://HOST:PORT on this host")),
            None => (false, text),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad("only a host and a port: the agent dials the portal's tunnel path itself"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (host, Some(port.parse::<u16>().map_err(|_| bad("the port is a number"))?)),
            _ => (authority, None),
        };
        let port = match (port, tls) {
            (Some(0), _) => return Err(bad("port 0")),
            (Some(port), _) => port,
            (None, true) => 443,
            (None, false) => return Err(bad("give the port")),
        };
        let bracketed = host.starts_with('[') && host.ends_with(']');
        if host.is_empty() || (host.contains(':') && !bracketed) {
            return Err(bad("an IPv6 address goes in brackets"));
        }
        let endpoint = PortalEndpoint { host: host.to_ascii_lowercase(), port, tls };
        if !tls && !portal_is_on_this_host(&endpoint.authority()) {
            return Err(bad("the tunnel carries control of this node's services: plain TCP only to a portal on this host, any other over https://"));
        }
        Ok(endpoint)
    }

    /// `host:port`, to dial and for the request's `Host`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl std::fmt::Display for PortalEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}", if self.tls { "https" } else { "http" }, self.authority())
    }
}

/// Whether `authority` (`host:port`) names this host (a loopback address or `localhost`).
fn portal_is_on_this_host(authority: &str) -> bool {
    if authority.contains('@') {
        return false; // `http://127.0.0.1@elsewhere/`: the host is what follows the `@`
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: AgentArgs,
    }

    fn resolve(flags: &[&str]) -> Result<AgentConfig, ConfigError> {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/agent.example.toml");
        let argv = ["suanli-agent", "--config", example].into_iter().chain(flags.iter().copied());
        AgentConfig::resolve(&Cli::parse_from(argv).args)
    }

    #[test]
    fn the_example_configuration_is_accepted_whole() {
        let config = resolve(&[]).expect("ops/agent.example.toml resolves");
        assert_eq!(config.access.uid_range, (2_000_000, 2_999_999));
        assert_eq!(config.access.private_dirs, ["/tmp", "/var/tmp", "/dev/shm"]);
        assert_eq!(config.fence_after, Duration::from_secs(20));
        assert_eq!(config.job_files.max_bytes, 64 << 30);
        assert_eq!(config.access.rendezvous_firewall, crate::access::firewall::FirewallKind::Nftables);
        let off = resolve(&["--rendezvous-firewall", "off"]).expect("the firewall can be switched off by flag");
        assert_eq!(off.access.rendezvous_firewall, crate::access::firewall::FirewallKind::Off);
        assert!(Cli::try_parse_from(["suanli-agent", "--rendezvous-firewall", "iptables"]).is_err(), "an unknown firewall is refused");
    }

    #[test]
    fn bad_protection_settings_are_refused_with_the_field_named() {
        for (flags, field) in [
            (&["--uid-range", "1000-2000"][..], "uid_range"),
            (&["--uid-range", "3000000-2000000"][..], "uid_range"),
            (&["--private-dirs", "/etc"][..], "private_dirs"),
            (&["--fence-after-s", "0"][..], "fence_after_s"),
            (&["--login-prefix", "sl1"][..], "login_prefix"),
        ] {
            let err = resolve(flags).err().unwrap_or_else(|| panic!("{flags:?} must be refused"));
            assert!(err.to_string().contains(field), "{flags:?}: {err}");
        }
        let off = resolve(&["--private-dirs", ""]).expect("an empty list turns private dirs off");
        assert!(off.access.private_dirs.is_empty());
    }

    #[test]
    fn capabilities_never_travel_in_plaintext_off_this_host() {
        for url in
            ["http://store.example:8090", "http://10.0.0.5:8090", "ftp://x", "store:8090", "http://[::1]@evil.example/", "http://127.0.0.1@evil.example:80"]
        {
            let err = resolve(&["--artifacts-url", url]).err().unwrap_or_else(|| panic!("{url} must be refused"));
            assert!(err.to_string().contains("artifacts_url"), "{url}: {err}");
        }
        for url in ["https://store.example:8090", "http://127.0.0.1:8090", "http://localhost:8090", "http://[::1]:8090/"] {
            resolve(&["--artifacts-url", url]).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    /// Whoever answers at the portal's address controls the node's services (a shell as any
    /// live lease): plain TCP goes only to a portal on this host, any other is dialled in TLS.
    #[test]
    fn the_tunnel_goes_in_plain_tcp_only_to_a_portal_on_this_host() {
        for portal in [
            "portal.example:8080",
            "http://portal.example:8080",
            "10.0.0.5:8080",
            "127.0.0.1@evil.example:80",
            "[::1]@evil.example:80",
            "https://127.0.0.1@evil.example",
            "https://portal.example/tunnel",
            "https://portal.example:0",
            "https://portal.example:x",
            "https://::1:8443",
            "ftp://portal.example",
            "127.0.0.1",
            "",
        ] {
            let err = resolve(&["--portal", portal]).err().unwrap_or_else(|| panic!("{portal} must be refused"));
            assert!(err.to_string().contains("portal"), "{portal}: {err}");
        }
        let endpoint = |host: &str, port, tls| Some(PortalEndpoint { host: host.into(), port, tls });
        for (portal, want) in [
            ("127.0.0.1:8080", endpoint("127.0.0.1", 8080, false)),
            ("http://localhost:8080/", endpoint("localhost", 8080, false)),
            ("[::1]:8080", endpoint("[::1]", 8080, false)),
            ("https://Portal.Example", endpoint("portal.example", 443, true)),
            ("https://10.0.0.5:8443", endpoint("10.0.0.5", 8443, true)),
            ("https://[2001:db8::1]:8443/", endpoint("[2001:db8::1]", 8443, true)),
        ] {
            assert_eq!(resolve(&["--portal", portal]).unwrap_or_else(|e| panic!("{portal}: {e}")).portal, want, "{portal}");
        }
    }
}
