//! The broker's configuration: a TOML file's `[broker]` table (`ops/broker.example.toml`) with
//! command-line and environment values over it (`suanli-broker serve`), checked and turned into
//! a [`NodeConfig`]. A library function, so tests load every shipped example the way the
//! binary does.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::server::{AgentCaSource, NodeConfig};
use crate::storage::DEFAULT_EVENTS_RETAINED;

/// Ten missed one-second samples.
pub const DEFAULT_AGENT_SILENT_AFTER_MS: u64 = 10_000;
/// Ended leases and jobs leave the hot state after 30 days.
pub const DEFAULT_ARCHIVE_AFTER_S: u64 = 30 * 24 * 3600;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("parsing {0}: {1}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("{0}")]
    Invalid(String),
}

/// What the command line and the environment set; each wins over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub node_id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub peer_listen: Option<SocketAddr>,
    pub peer_advertise: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub agent_listen: Option<SocketAddr>,
    pub agent_ca_cert: Option<PathBuf>,
    pub agent_ca_key: Option<PathBuf>,
    pub agent_ca_also_trusted: Option<PathBuf>,
    pub ssh_ca_key: Option<PathBuf>,
    pub ssh_ca_also_trusted: Option<PathBuf>,
    pub platform_token: Option<String>,
    pub bootstrap: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub broker: Option<FileBroker>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileBroker {
    pub node_id: Option<u64>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub advertise: Option<String>,
    pub peer_listen: Option<SocketAddr>,
    pub peer_advertise: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub platform_token: Option<String>,
    pub bootstrap: Option<bool>,
    pub reaper_interval_ms: Option<u64>,
    /// Ended leases and jobs, and ledger lines, older than this leave the hot state for the
    /// archive (default 30 days).
    pub archive_after_s: Option<u64>,
    pub snapshot_every_entries: Option<u64>,
    pub events_retained: Option<u64>,
    /// An enrolled agent not heard from for this long has its cards marked silent.
    pub agent_silent_after_ms: Option<u64>,
    /// Raft heartbeat interval (default 50 ms).
    pub raft_heartbeat_ms: Option<u64>,
    /// Raft election timeout bounds `[min, max]` (default `[150, 300]`); see `RaftTiming`.
    pub raft_election_timeout_ms: Option<[u64; 2]>,
    /// Overheating and XID thresholds: `overheat_c`, `recover_c`, `xid_quiet_ms`.
    #[serde(default)]
    pub health: crate::telemetry::health::HealthRules,
    /// The platform's services' own tokens, each with only the powers it needs.
    #[serde(default)]
    pub services: Vec<FileService>,
    /// The key agents' artifact capabilities are signed with (hex, 32 bytes; the same file the
    /// artifact store is given). Without it agents get no capabilities.
    pub artifact_key_file: Option<PathBuf>,
    /// The key the portal signs operator assertions with (hex, 32 bytes; the portal's
    /// `operator_key_file`): with it an operator acts only with the portal's signed word.
    pub operator_key_file: Option<PathBuf>,
    /// The key agents' tunnel tickets are signed with (hex, 32 bytes; the portal's
    /// `tunnel_key_file`): with it agents may open their tunnel to the portal.
    pub tunnel_key_file: Option<PathBuf>,
    /// The largest single deposit, and all deposits over any 24 hours (minor units).
    pub max_deposit_minor: Option<i64>,
    pub max_deposits_per_day_minor: Option<i64>,
    pub agent_listen: Option<SocketAddr>,
    pub agent_ca_cert: Option<PathBuf>,
    pub agent_ca_key: Option<PathBuf>,
    /// Further CA certificates (PEM) whose certificates the agent and peer ports accept, while
    /// the cluster CA is rotated (ops/README.md, "Rotating the cluster CA").
    pub agent_ca_also_trusted: Option<PathBuf>,
    pub ssh_ca_key: Option<PathBuf>,
    /// Further SSH user CA public keys (OpenSSH lines) whose certificates agents admit, while the
    /// SSH user CA is rotated.
    pub ssh_ca_also_trusted: Option<PathBuf>,
    /// DNS names or IP addresses agents reach this node by (the agent port's certificate).
    #[serde(default)]
    pub agent_tls_names: Vec<String>,
    /// Per-peer address overrides: node id → HOST:PORT this node dials instead of the address
    /// in the membership (NAT, sidecars, the test harness's fault-injecting links).
    #[serde(default)]
    pub peers: std::collections::BTreeMap<String, String>,
}

/// `[[broker.services]]`: `name`, `token_file` (a file holding the token, kept like a key:
/// never the token itself in the configuration), and `powers` (accounts, deposits, operators,
/// scheduling, read, admin).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileService {
    pub name: String,
    pub token_file: PathBuf,
    pub powers: Vec<crate::service::powers::Power>,
}

fn agent_ca_source(cert: Option<PathBuf>, key: Option<PathBuf>, needed: bool) -> Result<AgentCaSource, ConfigError> {
    Ok(match (cert, key) {
        (Some(cert), Some(key)) => AgentCaSource::Files { cert, key },
        (None, None) if needed => AgentCaSource::DataDir,
        (None, None) => AgentCaSource::None,
        _ => return Err(invalid("give both agent_ca_cert and agent_ca_key, or neither")),
    })
}

fn invalid(why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(why.into())
}

/// The node's configuration: the file at `path` (if any) under `args`.
pub fn node_config(path: Option<&Path>, args: Overrides) -> Result<NodeConfig, ConfigError> {
    let file = match path {
        Some(path) => load_file(path)?,
        None => FileBroker::default(),
    };
    let platform_token = args
        .platform_token
        .or(file.platform_token)
        .ok_or_else(|| invalid("set a platform token: --platform-token, SUANLI_BROKER_PLATFORM_TOKEN or [broker] platform_token"))?;
    let agent_listen = args.agent_listen.or(file.agent_listen);
    let peer_listen = args.peer_listen.or(file.peer_listen);
    let needs_ca = agent_listen.is_some() || peer_listen.is_some();
    let agent_ca = agent_ca_source(args.agent_ca_cert.or(file.agent_ca_cert), args.agent_ca_key.or(file.agent_ca_key), needs_ca)?;
    Ok(NodeConfig {
        peer_listen,
        peer_advertise: args.peer_advertise.or(file.peer_advertise),
        agent_listen,
        agent_ca,
        agent_ca_also_trusted: args.agent_ca_also_trusted.or(file.agent_ca_also_trusted),
        agent_tls_names: file.agent_tls_names,
        ssh_ca_key: args.ssh_ca_key.or(file.ssh_ca_key),
        ssh_ca_also_trusted: args.ssh_ca_also_trusted.or(file.ssh_ca_also_trusted),
        node_id: args.node_id.or(file.node_id).unwrap_or(1),
        data_dir: args.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("/var/lib/suanli/broker")),
        listen: args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 50051))),
        advertise: args.advertise.or(file.advertise),
        metrics_listen: args.metrics_listen.or(file.metrics_listen),
        platform_token,
        bootstrap: args.bootstrap || file.bootstrap.unwrap_or(false),
        reaper_interval: Duration::from_millis(file.reaper_interval_ms.unwrap_or(1000)),
        archive_after: Duration::from_secs(file.archive_after_s.unwrap_or(DEFAULT_ARCHIVE_AFTER_S)),
        snapshot_every_entries: file.snapshot_every_entries.unwrap_or(10_000),
        events_retained: file.events_retained.unwrap_or(DEFAULT_EVENTS_RETAINED),
        agent_silent_after: Duration::from_millis(file.agent_silent_after_ms.unwrap_or(DEFAULT_AGENT_SILENT_AFTER_MS)),
        raft_timing: {
            let defaults = crate::server::RaftTiming::default();
            let timing = crate::server::RaftTiming {
                heartbeat_ms: file.raft_heartbeat_ms.unwrap_or(defaults.heartbeat_ms),
                election_timeout_ms: file.raft_election_timeout_ms.unwrap_or(defaults.election_timeout_ms),
            };
            timing.check().map_err(invalid)?;
            timing
        },
        health: {
            file.health.check().map_err(invalid)?;
            file.health
        },
        services: {
            let mut tokens = Vec::new();
            for s in &file.services {
                let token = std::fs::read_to_string(&s.token_file)
                    .map_err(|e| invalid(format!("[[broker.services]] {}: reading {}: {e}", s.name, s.token_file.display())))?;
                let token = token.trim();
                if token.len() < 16 {
                    return Err(invalid(format!("[[broker.services]] {}: the token in {} must be at least 16 characters", s.name, s.token_file.display())));
                }
                tokens.push(crate::service::powers::ServiceToken::new(&s.name, token, s.powers.clone()));
            }
            crate::service::powers::Services::new(tokens)
        },
        operator_key: match &file.operator_key_file {
            Some(path) => {
                Some(suanli_pki::assertion::OperatorKey::load(path, false).map_err(|e| invalid(format!("operator_key_file {}: {e}", path.display())))?)
            }
            None => None,
        },
        tunnel_key: match &file.tunnel_key_file {
            Some(path) => {
                Some(suanli_pki::tunnel_ticket::TunnelKey::load(path, false).map_err(|e| invalid(format!("tunnel_key_file {}: {e}", path.display())))?)
            }
            None => None,
        },
        artifact_key: match &file.artifact_key_file {
            Some(path) => Some(suanli_artifacts::CapabilityKey::load(path, false).map_err(|e| invalid(format!("artifact_key_file {}: {e}", path.display())))?),
            None => None,
        },
        deposit_limits: {
            let defaults = crate::service::DepositLimits::default();
            let limits = crate::service::DepositLimits {
                per_call_minor: file.max_deposit_minor.unwrap_or(defaults.per_call_minor),
                per_day_minor: file.max_deposits_per_day_minor.unwrap_or(defaults.per_day_minor),
            };
            if limits.per_call_minor <= 0 || limits.per_day_minor < limits.per_call_minor {
                return Err(invalid("[broker] max_deposit_minor must be positive and at most max_deposits_per_day_minor"));
            }
            limits
        },
        peer_overrides: file
            .peers
            .iter()
            .map(|(id, addr)| Ok((id.parse::<u64>().map_err(|_| invalid(format!("[broker.peers] key {id:?} is not a node id")))?, addr.clone())))
            .collect::<Result<_, ConfigError>>()?,
    })
}

/// The `[broker]` table of a TOML file.
pub fn load_file(path: &Path) -> Result<FileBroker, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.to_owned(), e))?;
    let parsed: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_owned(), e))?;
    Ok(parsed.broker.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/broker.example.toml")
    }

    #[test]
    fn the_shipped_example_loads_as_the_binary_loads_it() {
        let config = node_config(Some(&example()), Overrides { platform_token: Some("a-platform-token-for-the-test".into()), ..Overrides::default() })
            .expect("ops/broker.example.toml");
        assert_eq!(config.node_id, 1);
        assert_eq!(config.listen, "0.0.0.0:50051".parse().expect("address"));
        assert!(matches!(config.agent_ca, AgentCaSource::Files { .. }));
        assert_eq!(config.archive_after, Duration::from_secs(2_592_000));
        assert_eq!(config.raft_timing, crate::server::RaftTiming { heartbeat_ms: 50, election_timeout_ms: [150, 300] });
    }

    #[test]
    fn raft_timeouts_that_would_elect_between_heartbeats_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("broker.toml");
        let token = || Overrides { platform_token: Some("a-platform-token-for-the-test".into()), ..Overrides::default() };
        for bad in ["raft_heartbeat_ms = 200\nraft_election_timeout_ms = [150, 300]", "raft_election_timeout_ms = [300, 300]", "raft_heartbeat_ms = 0"] {
            std::fs::write(&path, format!("[broker]\n{bad}\n")).expect("write");
            let Err(refused) = node_config(Some(&path), token()) else { panic!("{bad} is refused") };
            assert!(refused.to_string().contains("raft timing"), "{bad}: {refused}");
        }
        std::fs::write(&path, "[broker]\nraft_heartbeat_ms = 100\nraft_election_timeout_ms = [400, 800]\n").expect("write");
        let config = node_config(Some(&path), token()).expect("etcd-like timing");
        assert_eq!(config.raft_timing.election_timeout_ms, [400, 800]);
    }

    #[test]
    fn the_command_line_wins_over_the_file_and_a_platform_token_is_required() {
        let overrides = Overrides { node_id: Some(7), platform_token: Some("a-platform-token-for-the-test".into()), ..Overrides::default() };
        assert_eq!(node_config(Some(&example()), overrides).expect("config").node_id, 7);
        let Err(refused) = node_config(Some(&example()), Overrides::default()) else { panic!("no token, no node") };
        assert!(refused.to_string().contains("platform token"), "{refused}");
    }

    #[test]
    fn an_unknown_key_in_the_file_is_refused_with_its_name() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, "[broker]\nnode_id = 1\nsnapshot_every = 10\n").expect("write");
        let Err(refused) = load_file(&path) else { panic!("a typo is refused") };
        assert!(refused.to_string().contains("snapshot_every"), "{refused}");
    }

    #[test]
    fn the_kubernetes_config_map_loads_as_each_pod_loads_it() {
        let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/kubernetes/broker.yaml")).expect("broker.yaml");
        // The block under `broker.toml: |`, unindented.
        let mut lines = manifest.lines().skip_while(|l| l.trim() != "broker.toml: |");
        lines.next().expect("the ConfigMap entry");
        let block: Vec<&str> = lines.take_while(|l| l.starts_with("    ") || l.trim().is_empty()).map(|l| l.get(4..).unwrap_or("")).collect();
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("broker.toml");
        std::fs::write(&path, block.join("\n")).expect("write");
        let file = load_file(&path).expect("the ConfigMap's broker.toml");
        assert!(file.artifact_key_file.is_some() && file.agent_listen.is_some());
        // The pods give node ID, peer address and token on the command line and environment.
        let config =
            node_config(Some(&path), Overrides { node_id: Some(2), platform_token: Some("a-platform-token-for-the-test".into()), ..Overrides::default() });
        assert!(matches!(config, Err(ConfigError::Invalid(ref why)) if why.contains("operator_key_file")), "only the secret files are missing here");
    }
}
