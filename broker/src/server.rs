//! Starting and stopping one broker node: storage, Raft, the gRPC services, the metrics
//! endpoint and the reaper.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, SnapshotPolicy};
use suanli_proto::v1::{
    broker_server::BrokerServer, cluster_admin_server::ClusterAdminServer, job_service_server::JobServiceServer,
    monitoring_service_server::MonitoringServiceServer, raft_internal_server::RaftInternalServer, supplier_service_server::SupplierServiceServer,
    task_service_server::TaskServiceServer,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tracing::info;

use crate::network::forward::{ForwardLayer, LeaderRouter, Port};
use crate::network::{Network, PeerAddresses, PeerFormats, PeerTls, RaftService};
use crate::service::admin::Admin;
use crate::service::broker_api::BrokerApi;
use crate::service::jobs::Jobs;
use crate::service::metrics::Metrics;
use crate::service::monitoring::Irmds;
use crate::service::southbound::{Icpcss, Itm};
use crate::service::{reaper, Shared};
use crate::storage::{self, Raft, StoreError};
use crate::telemetry::{self, Telemetry};

/// How often the leader commits card health and looks for silent agents.
const HEALTH_TICK: Duration = Duration::from_millis(500);

/// Largest gRPC message a node accepts; commands are further limited to 64 KiB.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How fast a cluster notices a dead leader. A follower that has heard from its leader waits
/// out the leader's lease (`election_timeout_ms[1]`) and then its own random election timeout
/// (between the two bounds) before it stands for election, so a leader's death costs about
/// `max + min..max` milliseconds of writes; a leader that stays silent that long on a busy
/// machine is replaced while alive. The defaults put failover at about half a second on a LAN
/// (etcd's own defaults: heartbeat 100 ms, election 1,000 ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftTiming {
    pub heartbeat_ms: u64,
    pub election_timeout_ms: [u64; 2],
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming { heartbeat_ms: 50, election_timeout_ms: [150, 300] }
    }
}

impl RaftTiming {
    /// Refuses bounds openraft would misbehave with: an election timeout must exceed the
    /// heartbeat (else followers elect between heartbeats) and the bounds must form a range.
    pub fn check(&self) -> Result<(), String> {
        let [min, max] = self.election_timeout_ms;
        if self.heartbeat_ms == 0 || min <= self.heartbeat_ms || max <= min {
            return Err(format!("raft timing: need 0 < raft_heartbeat_ms ({}) < raft_election_timeout_ms min ({min}) < max ({max})", self.heartbeat_ms));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: u64,
    pub data_dir: PathBuf,
    /// The client port: the public API with bearer tokens.
    pub listen: SocketAddr,
    /// Address clients reach this one by; defaults to `listen`. (A node without a peer port
    /// also names itself by it in the Raft membership.)
    pub advertise: Option<String>,
    /// The peer port: Raft and calls forwarded between nodes, mutual TLS with peer
    /// certificates from the cluster CA (`agent_ca`). `None`: a single-node cluster, which
    /// neither reaches nor is reached by peers.
    pub peer_listen: Option<SocketAddr>,
    /// Address other nodes reach this node's peer port by (its address in the Raft
    /// membership); defaults to `peer_listen`.
    pub peer_advertise: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
    pub platform_token: String,
    /// Initialize a new cluster with this node as its only member on first start. Exactly one
    /// node of a cluster is bootstrapped; the others are added with `cluster add-learner`.
    pub bootstrap: bool,
    pub reaper_interval: Duration,
    /// Leases and jobs that ended this long ago, and ledger lines this old, leave the hot
    /// state for the archive (`state::machine::archive`).
    pub archive_after: Duration,
    pub snapshot_every_entries: u64,
    /// Log indexes of events kept behind each snapshot for `Watch` to resume from.
    pub events_retained: u64,
    /// Addresses to reach particular peers by, instead of the ones in the membership.
    pub peer_overrides: BTreeMap<u64, String>,
    /// An enrolled agent not heard from for this long has its cards marked silent.
    pub agent_silent_after: Duration,
    /// Raft heartbeat and election timeouts (`[broker]` `raft_heartbeat_ms`,
    /// `raft_election_timeout_ms`).
    pub raft_timing: RaftTiming,
    /// Overheating and XID thresholds (`[broker.health]`).
    pub health: crate::telemetry::health::HealthRules,
    /// Caps on the money the platform may pay in.
    pub deposit_limits: crate::service::DepositLimits,
    /// The platform's services' own tokens and powers (`service::powers`).
    pub services: crate::service::powers::Services,
    /// The key artifact capabilities are signed with, shared with the artifact store.
    pub artifact_key: Option<suanli_artifacts::CapabilityKey>,
    /// The key the portal signs operator assertions with; `None`: none required.
    pub operator_key: Option<suanli_pki::assertion::OperatorKey>,
    /// The key agents' tunnel tickets are signed with, shared with the portal; `None`: none.
    pub tunnel_key: Option<suanli_pki::tunnel_ticket::TunnelKey>,
    /// The TLS port: agents by mutual TLS (Icpcss, Irmds), and the public API for clients that
    /// want it encrypted (bearer tokens). `None`: no TLS port, agents cannot connect here.
    pub agent_listen: Option<SocketAddr>,
    /// The agent CA every node of the cluster shares.
    pub agent_ca: AgentCaSource,
    /// Further CAs (a PEM bundle) the agent and peer ports accept certificates of, while the
    /// cluster CA is rotated.
    pub agent_ca_also_trusted: Option<PathBuf>,
    /// Names (DNS or IP) agents reach this node by, besides its listen and advertised addresses.
    pub agent_tls_names: Vec<String>,
    /// The platform's SSH user CA key (OpenSSH format), the same on every node; `None`:
    /// `<data_dir>/ssh-user-ca`, made on first start (single node only).
    pub ssh_ca_key: Option<PathBuf>,
    /// Further SSH user CA public keys (OpenSSH lines, one per line) agents admit certificates
    /// of, while the SSH user CA is rotated.
    pub ssh_ca_also_trusted: Option<PathBuf>,
}

/// Where a node finds the agent CA.
#[derive(Clone, Debug)]
pub enum AgentCaSource {
    /// Certificate and key files, which must exist (every node of a cluster is given the same).
    Files { cert: PathBuf, key: PathBuf },
    /// `agent-ca.pem` and `agent-ca.key` in the data directory, made on first start: for a
    /// single node only, since another node would make a different CA.
    DataDir,
    /// None: this node neither serves agents nor signs their certificates.
    None,
}

impl AgentCaSource {
    fn load(&self, data_dir: &std::path::Path) -> Result<Option<suanli_pki::Ca>, ServeError> {
        let loaded = match self {
            AgentCaSource::Files { cert, key } => suanli_pki::Ca::load(cert, key, false),
            AgentCaSource::DataDir => suanli_pki::Ca::load(&data_dir.join("agent-ca.pem"), &data_dir.join("agent-ca.key"), true),
            AgentCaSource::None => return Ok(None),
        };
        loaded.map(Some).map_err(|e| ServeError::Config(format!("agent CA: {e}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

pub struct RunningNode {
    pub shared: Shared,
    pub grpc_addr: SocketAddr,
    /// The agent port (mutual TLS), where configured.
    pub agent_addr: Option<SocketAddr>,
    /// The peer port (mutual TLS between nodes), where configured.
    pub peer_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    stop: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

pub async fn start(config: NodeConfig) -> Result<RunningNode, ServeError> {
    if config.platform_token.len() < 16 {
        return Err(ServeError::Config("platform_token must be at least 16 characters".into()));
    }
    std::fs::create_dir_all(&config.data_dir)?;
    let (log_store, sm) = storage::open(&raft_dir(&config.data_dir))?;
    let log_for_metrics = log_store.clone();
    sm.set_events_retained(config.events_retained);
    let raft_config = openraft::Config {
        cluster_name: "suanli-broker".into(),
        heartbeat_interval: config.raft_timing.heartbeat_ms,
        election_timeout_min: config.raft_timing.election_timeout_ms[0],
        election_timeout_max: config.raft_timing.election_timeout_ms[1],
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_entries),
        // openraft's 200 ms default covers sending the last segment *and* installing the whole
        // snapshot on the follower: with a large state (100,000 leases) the install alone takes
        // longer, the send is retried from the start forever, and a node that fell behind the
        // purged log never catches up (found by benches/operations.rs).
        install_snapshot_timeout: 120_000,
        max_in_snapshot_log_to_keep: 1000,
        ..Default::default()
    }
    .validate()
    .map_err(|e| ServeError::Raft(e.to_string()))?;
    let agent_ca = match (config.agent_ca.load(&config.data_dir)?, &config.agent_ca_also_trusted) {
        (Some(ca), Some(bundle)) => {
            let pem = std::fs::read_to_string(bundle).map_err(|e| ServeError::Config(format!("agent_ca_also_trusted {}: {e}", bundle.display())))?;
            Some(ca.also_trusting(&pem).map_err(|e| ServeError::Config(format!("agent_ca_also_trusted {}: {e}", bundle.display())))?)
        }
        (None, Some(_)) => return Err(ServeError::Config("agent_ca_also_trusted needs the cluster CA (agent_ca_cert, agent_ca_key)".into())),
        (ca, None) => ca,
    }
    .map(Arc::new);
    let listener = TcpListener::bind(config.listen).await?;
    let grpc_addr = listener.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| grpc_addr.to_string());
    let peer_listener = match (config.peer_listen, &agent_ca) {
        (None, _) => None,
        (Some(_), None) => return Err(ServeError::Config("peer_listen needs the cluster CA (agent_ca_cert, agent_ca_key)".into())),
        (Some(addr), Some(ca)) => {
            let listener = TcpListener::bind(addr).await?;
            let addr = listener.local_addr()?;
            let peer_advertise = config.peer_advertise.clone().unwrap_or_else(|| addr.to_string());
            let names = tls_names(&[addr, grpc_addr], &[&peer_advertise, &advertise], &config.agent_tls_names);
            let tls = PeerTls::issue(ca, config.node_id, &names).map_err(|e| ServeError::Config(format!("peer certificate: {e}")))?;
            Some((listener, addr, peer_advertise, tls))
        }
    };
    let peer_tls = peer_listener.as_ref().map(|(_, _, _, tls)| tls.clone());
    let peers = PeerAddresses::new(config.peer_overrides.clone());
    let peer_formats = PeerFormats::default();
    let network = Network::new(peers.clone(), peer_tls.clone(), sm.cluster_format_watch(), peer_formats.clone());
    let raft = Raft::new(config.node_id, Arc::new(raft_config), network, log_store, sm.clone()).await.map_err(|e| ServeError::Raft(e.to_string()))?;
    let raft = Arc::new(raft);

    let initialized = raft.is_initialized().await.map_err(|e| ServeError::Raft(e.to_string()))?;
    if config.bootstrap && !initialized {
        // Peers reach a node at its peer port; a node without one names its client address.
        let address = peer_listener.as_ref().map_or_else(|| advertise.clone(), |(_, _, a, _)| a.clone());
        let members = BTreeMap::from([(config.node_id, BasicNode { addr: address.clone() })]);
        raft.initialize(members).await.map_err(|e| ServeError::Raft(e.to_string()))?;
        info!(node = config.node_id, %address, "initialized a new single-node cluster");
    }

    let ssh_ca = match &config.ssh_ca_key {
        Some(path) => suanli_pki::ssh::SshCa::load(path, false),
        None => suanli_pki::ssh::SshCa::load(&config.data_dir.join("ssh-user-ca"), true),
    }
    .map_err(|e| ServeError::Config(format!("SSH user CA: {e}")))?;
    let metrics = Arc::new(Metrics::new());
    if let Some(ca) = &agent_ca {
        metrics.observe_certificate("cluster_ca", ca.cert_pem());
    }
    let mut shared = Shared::new(raft.clone(), sm, &config.platform_token, metrics.clone(), agent_ca.clone());
    shared.ssh_ca = Some(Arc::new(ssh_ca));
    shared.ssh_cas_also_trusted = match &config.ssh_ca_also_trusted {
        Some(path) => suanli_pki::ssh::public_lines(path).map_err(|e| ServeError::Config(format!("ssh_ca_also_trusted: {e}")))?,
        None => Vec::new(),
    };
    shared.deposit_limits = config.deposit_limits;
    shared.services = config.services.clone();
    shared.artifact_key = config.artifact_key.clone();
    shared.operator_key = config.operator_key.clone();
    shared.tunnel_key = config.tunnel_key.clone();
    shared.peer_formats = peer_formats;
    let mut stop = Vec::new();
    let mut tasks = Vec::new();
    let telemetry = Telemetry::new(config.agent_silent_after, config.health);

    let (stop_grpc, stopped) = oneshot::channel::<()>();
    stop.push(stop_grpc);
    let leader_router = Arc::new(LeaderRouter::new(raft.clone(), peers, peer_tls, config.services.clone()));
    // Bearer tokens cross the client port: in the clear only on loopback (a local portal or
    // scheduler, development); anywhere else it speaks TLS with a certificate of the cluster
    // CA, which its clients check.
    let mut client_port = tonic::transport::Server::builder();
    if !grpc_addr.ip().is_loopback() {
        let ca = agent_ca.as_ref().ok_or_else(|| {
            ServeError::Config(format!("the client port {grpc_addr} is not on loopback, so it serves TLS: give the cluster CA (agent_ca_cert, agent_ca_key)"))
        })?;
        let names = tls_names(&[grpc_addr], &[&advertise], &config.agent_tls_names);
        let cert = ca.server_certificate(&names).map_err(|e| ServeError::Config(format!("client port certificate: {e}")))?;
        metrics.observe_certificate("client_port", &cert.cert_pem);
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
        client_port = client_port.tls_config(tls).map_err(|e| ServeError::Config(format!("client port TLS: {e}")))?;
    }
    let router = client_port
        .layer(ForwardLayer::new(leader_router.clone(), Port::Client))
        .add_service(ClusterAdminServer::new(Admin::new(shared.clone())))
        .add_service(BrokerServer::new(BrokerApi::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(SupplierServiceServer::new(Icpcss::new(shared.clone())))
        .add_service(TaskServiceServer::new(Itm::new(shared.clone())))
        .add_service(MonitoringServiceServer::new(Irmds::new(shared.clone(), telemetry.clone())))
        .add_service(JobServiceServer::new(Jobs::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES));
    tasks.push(tokio::spawn(async move {
        // Without TCP_NODELAY a response's trailing frames wait for the client's delayed ACK:
        // ~40 ms added to a share of the calls.
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, async {
                stopped.await.ok();
            })
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));

    // The peer port: Raft, and every client service for calls other nodes forward here.
    let peer_addr = match peer_listener {
        None => None,
        Some((listener, addr, _, tls)) => {
            metrics.observe_expiry("peer_port", tls.not_after);
            let peer_router = tonic::transport::Server::builder()
                .tls_config(tls.server())
                .map_err(|e| ServeError::Config(format!("peer port TLS: {e}")))?
                .layer(ForwardLayer::new(leader_router.clone(), Port::Peer))
                .add_service(RaftInternalServer::new(RaftService::new(raft.clone())).max_decoding_message_size(256 * 1024 * 1024))
                .add_service(ClusterAdminServer::new(Admin::new(shared.clone())))
                .add_service(BrokerServer::new(BrokerApi::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES))
                .add_service(SupplierServiceServer::new(Icpcss::new(shared.clone())))
                .add_service(TaskServiceServer::new(Itm::new(shared.clone())))
                .add_service(MonitoringServiceServer::new(Irmds::new(shared.clone(), telemetry.clone())))
                .add_service(JobServiceServer::new(Jobs::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES));
            let (stop_peers, stopped) = oneshot::channel::<()>();
            stop.push(stop_peers);
            tasks.push(tokio::spawn(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                if let Err(e) = peer_router
                    .serve_with_incoming_shutdown(incoming, async {
                        stopped.await.ok();
                    })
                    .await
                {
                    tracing::error!(error = %e, "peer port failed");
                }
            }));
            Some(addr)
        }
    };

    let agent_addr = match (config.agent_listen, &agent_ca) {
        (None, _) => None,
        (Some(_), None) => return Err(ServeError::Config("agent_listen needs an agent CA".into())),
        (Some(addr), Some(ca)) => {
            let listener = TcpListener::bind(addr).await?;
            let addr = listener.local_addr()?;
            let names = tls_names(&[grpc_addr, addr], &[&advertise], &config.agent_tls_names);
            let server_cert = ca.server_certificate(&names).map_err(|e| ServeError::Config(format!("agent port certificate: {e}")))?;
            metrics.observe_certificate("agent_port", &server_cert.cert_pem);
            // Client certificates are optional at the handshake, so an agent can enroll before
            // it has one; every other call needs an enrolled key (`Shared::caller`).
            let tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(&server_cert.cert_pem, &server_cert.key_pem))
                .client_ca_root(Certificate::from_pem(ca.trust_pem()))
                .client_auth_optional(true);
            let agent_router = tonic::transport::Server::builder()
                .tls_config(tls)
                .map_err(|e| ServeError::Config(format!("agent port TLS: {e}")))?
                .layer(ForwardLayer::new(leader_router.clone(), Port::Agent))
                .add_service(SupplierServiceServer::new(Icpcss::new(shared.clone())))
                .add_service(MonitoringServiceServer::new(Irmds::new(shared.clone(), telemetry.clone())))
                // The public API too, for clients that want it encrypted (researchers fetching
                // a lease password): bearer tokens, no client certificate.
                .add_service(BrokerServer::new(BrokerApi::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES))
                .add_service(TaskServiceServer::new(Itm::new(shared.clone())))
                .add_service(JobServiceServer::new(Jobs::new(shared.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES));
            let (stop_agents, stopped) = oneshot::channel::<()>();
            stop.push(stop_agents);
            tasks.push(tokio::spawn(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
                if let Err(e) = agent_router
                    .serve_with_incoming_shutdown(incoming, async {
                        stopped.await.ok();
                    })
                    .await
                {
                    tracing::error!(error = %e, "agent port failed");
                }
            }));
            Some(addr)
        }
    };

    let metrics_addr = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await?;
            let addr = listener.local_addr()?;
            let (stop_metrics, stopped) = oneshot::channel::<()>();
            stop.push(stop_metrics);
            let raft = raft.clone();
            let sm = shared.sm.clone();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let body = metrics.render(&raft, &log_for_metrics, &sm);
                    async move { ([("content-type", "text/plain; version=0.0.4")], body) }
                }),
            );
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        stopped.await.ok();
                    })
                    .await;
            }));
            Some(addr)
        }
        None => None,
    };

    tasks.push(tokio::spawn(reaper::run(shared.clone(), config.reaper_interval, config.archive_after)));
    tasks.push(tokio::spawn(telemetry::monitor(shared.clone(), telemetry, HEALTH_TICK)));
    info!(node = config.node_id, grpc = %grpc_addr, agents = ?agent_addr, metrics = ?metrics_addr, "broker node serving");
    Ok(RunningNode { shared, grpc_addr, agent_addr, peer_addr, metrics_addr, stop, tasks })
}

/// The names a node's TLS certificate is valid for: loopback, the specific addresses it
/// listens on, the hosts of the addresses it advertises, and the operator's `extra`.
fn tls_names(listening: &[SocketAddr], advertised: &[&str], extra: &[String]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    names.extend(listening.iter().map(|a| a.ip()).filter(|ip| !ip.is_unspecified()).map(|ip| ip.to_string()));
    for address in advertised {
        if let Some((host, _)) = address.rsplit_once(':') {
            names.push(host.trim_matches(['[', ']']).to_owned());
        }
    }
    names.extend(extra.iter().cloned());
    names.sort();
    names.dedup();
    names
}

impl RunningNode {
    pub fn raft(&self) -> &Raft {
        &self.shared.raft
    }

    /// Waits until this node sees a leader (itself, on a single-node cluster).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<u64, ServeError> {
        let metrics = self
            .shared
            .raft
            .wait(Some(timeout))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await
            .map_err(|e| ServeError::Raft(e.to_string()))?;
        metrics.current_leader.ok_or_else(|| ServeError::Raft("no leader".into()))
    }

    /// Stops accepting calls, lets in-flight ones finish (up to 10 s), then stops Raft.
    pub async fn shutdown(mut self) {
        for stop in self.stop.drain(..) {
            let _ = stop.send(());
        }
        let mut tasks = self.tasks.drain(..);
        // The first task is the gRPC server: wait for its graceful stop.
        if let Some(grpc) = tasks.next() {
            let abort = grpc.abort_handle();
            if tokio::time::timeout(Duration::from_secs(10), grpc).await.is_err() {
                abort.abort();
            }
        }
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        let _ = self.shared.raft.shutdown().await;
    }
}

/// Where a node keeps its Raft log and state machine, inside its data directory.
pub fn raft_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("raft")
}
