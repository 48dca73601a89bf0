//! Raft's transport: openraft's RPCs carried over the `RaftInternal` gRPC service, served
//! only on the **peer port**, where both ends show a peer certificate of the cluster CA
//! (mutual TLS, [`PeerTls`]); never on the client port.
//!
//! Payloads are openraft's own request and response types, postcard-encoded. Responses carry
//! openraft's `Result` so a remote `RaftError` (e.g. a higher vote) reaches the caller as such,
//! distinct from a transport failure (`Unreachable`), which openraft retries with backoff.
//!
//! Rolling upgrades: a node speaks the wire format of its cluster's format
//! (`state::machine::upgrade`), so nodes of the format before keep reading it, answers every
//! message in the format it came in, and says in each message which store format it runs
//! ([`PeerFormats`]), from which the leader learns when it may raise the cluster format.

pub mod forward;

use std::collections::HashMap;
use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use suanli_proto::v1::raft_internal_client::RaftInternalClient;
use suanli_proto::v1::raft_internal_server::RaftInternal;
use suanli_proto::v1::RaftMessage;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::storage::{ClusterFormatWatch, Raft, TypeConfig, FORMAT_VERSION};

/// Bumped when the encoding of Raft messages changes incompatibly. 3: log entries may carry
/// `ArchiveEnded` (store format 4), which a format-3 node cannot decode; 4: the remote-lease
/// commands and outcomes (store format 5); 5: `RaiseClusterFormat` and marked snapshots (store
/// format 6); 6: `Batch` entries and outcomes (store format 7).
pub const WIRE_FORMAT_VERSION: u32 = 6;
/// The oldest wire format this node reads and speaks: that of store format 5's nodes, spoken
/// while its cluster is at store format 5. A node refuses any other outright.
pub const OLDEST_WIRE_FORMAT: u32 = 4;

/// The Raft wire format of a cluster at store format `cluster_format`: each store format from
/// 5 on speaks the wire format one below its number.
pub fn wire_format_of(cluster_format: u32) -> u32 {
    cluster_format.clamp(crate::state::machine::upgrade::FIRST_CLUSTER_FORMAT, FORMAT_VERSION) - 1
}

type NodeId = u64;

fn encode<T: Serialize>(value: &T, wire_format: u32) -> Result<RaftMessage, postcard::Error> {
    Ok(RaftMessage { format_version: wire_format, payload: postcard::to_allocvec(value)?, newest_store_format: FORMAT_VERSION })
}

fn decode<T: DeserializeOwned>(message: &RaftMessage) -> Result<T, String> {
    if !(OLDEST_WIRE_FORMAT..=WIRE_FORMAT_VERSION).contains(&message.format_version) {
        return Err(format!("raft wire format {} received, this node speaks {OLDEST_WIRE_FORMAT} to {WIRE_FORMAT_VERSION}", message.format_version));
    }
    postcard::from_bytes(&message.payload).map_err(|e| e.to_string())
}

/// What each peer last said of the newest store format it runs (`RaftMessage`'s
/// `newest_store_format`), and when: the leader's evidence that every member can read a
/// higher cluster format.
#[derive(Clone, Default)]
pub struct PeerFormats(Arc<std::sync::Mutex<HashMap<NodeId, (u32, std::time::Instant)>>>);

impl PeerFormats {
    fn record(&self, node: NodeId, newest_store_format: u32) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(node, (newest_store_format, std::time::Instant::now()));
    }

    /// What `node` said within the last `within` (0: a node of format 5 or older, which says
    /// nothing); `None` when it said nothing that recently.
    pub fn newest(&self, node: NodeId, within: std::time::Duration) -> Option<u32> {
        let heard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        heard.get(&node).filter(|(_, at)| at.elapsed() <= within).map(|(format, _)| *format)
    }
}

/// Where this node reaches its peers: the address in the Raft membership, unless the
/// configuration overrides it for this node (a NAT, a sidecar, or the test harness's fault
/// injecting links).
#[derive(Clone, Debug, Default)]
pub struct PeerAddresses {
    overrides: Arc<std::collections::BTreeMap<NodeId, String>>,
}

impl PeerAddresses {
    pub fn new(overrides: std::collections::BTreeMap<NodeId, String>) -> Self {
        PeerAddresses { overrides: Arc::new(overrides) }
    }

    pub fn of(&self, id: NodeId, node: &BasicNode) -> String {
        self.overrides.get(&id).cloned().unwrap_or_else(|| node.addr.clone())
    }
}

/// This node's side of the mutual TLS between broker nodes: its peer certificate (issued by
/// itself at start from the cluster CA every node holds, see `suanli_pki`) and the CA it
/// checks its peers' certificates against.
#[derive(Clone)]
pub struct PeerTls {
    identity: Identity,
    ca: Certificate,
    /// When the peer certificate stops being valid (Unix seconds).
    pub not_after: i64,
}

impl PeerTls {
    /// A fresh peer certificate for node `node`, valid for `names`.
    pub fn issue(ca: &suanli_pki::Ca, node: NodeId, names: &[String]) -> Result<PeerTls, suanli_pki::PkiError> {
        let cert = ca.peer_certificate(node, names)?;
        let not_after = suanli_pki::pem_certificate_not_after(&cert.cert_pem)?;
        Ok(PeerTls { identity: Identity::from_pem(&cert.cert_pem, &cert.key_pem), ca: Certificate::from_pem(ca.trust_pem()), not_after })
    }

    /// The peer port's: a client certificate of the CA is required at the handshake (that it
    /// is a *peer* certificate is checked per call, `forward::Port::Peer`).
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }

    /// Dialing a peer: its certificate checked against the CA, this node's shown.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone())
    }

    /// A lazily connected channel to a peer's port at `address` (`HOST:PORT`).
    pub fn channel(&self, address: &str) -> Option<Channel> {
        let endpoint = Endpoint::from_shared(format!("https://{address}")).ok()?.tls_config(self.client()).ok()?;
        Some(endpoint.connect_timeout(std::time::Duration::from_secs(1)).tcp_nodelay(true).connect_lazy())
    }
}

/// Lazily connected channels to peers, one per address, kept (a channel reconnects by itself):
/// openraft asks for a client per replication stream and for every leadership check of a
/// linearizable read, and forwarding needs one per call; a fresh channel each time would pay a
/// TCP and mutual-TLS handshake per read (slower than the heartbeat interval the check waits
/// for, in a debug build).
#[derive(Clone, Default)]
pub struct PeerChannels(Arc<std::sync::Mutex<HashMap<String, Channel>>>);

impl PeerChannels {
    pub fn get(&self, tls: &PeerTls, address: String) -> Option<Channel> {
        let mut channels = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.get(&address) {
            return Some(channel.clone());
        }
        let channel = tls.channel(&address)?;
        channels.insert(address, channel.clone());
        Some(channel)
    }
}

/// Raft's network; without [`PeerTls`] (a node with no peer port) no peer is reachable.
#[derive(Clone)]
pub struct Network {
    peers: PeerAddresses,
    tls: Option<PeerTls>,
    channels: PeerChannels,
    cluster_format: ClusterFormatWatch,
    peer_formats: PeerFormats,
}

impl Network {
    pub fn new(peers: PeerAddresses, tls: Option<PeerTls>, cluster_format: ClusterFormatWatch, peer_formats: PeerFormats) -> Self {
        Network { peers, tls, channels: PeerChannels::default(), cluster_format, peer_formats }
    }

    fn channel(&self, address: String) -> Option<Channel> {
        self.channels.get(self.tls.as_ref()?, address)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let channel = self.channel(self.peers.of(target, node));
        PeerClient {
            target,
            client: channel.map(RaftInternalClient::new),
            cluster_format: self.cluster_format.clone(),
            peer_formats: self.peer_formats.clone(),
        }
    }
}

pub struct PeerClient {
    target: NodeId,
    client: Option<RaftInternalClient<Channel>>,
    cluster_format: ClusterFormatWatch,
    peer_formats: PeerFormats,
}

/// The most bytes of entries one AppendEntries carries when it carries more than one entry.
/// openraft sends up to 300 entries a call and gives each call one heartbeat interval (50 ms by
/// default) before it retries the same range; entries of batched requests (up to
/// `batcher::MAX_BATCH_BYTES` each) would make a lagging follower's catch-up calls too big to
/// finish in time, over and over. A bigger call is refused here with how many entries fit, and
/// openraft sends fewer.
pub const MAX_APPEND_BYTES: usize = 512 * 1024;

/// How many of `entries` entries encoded in `bytes` one AppendEntries may carry, when that is
/// fewer than all of them (a single entry always goes, whatever its size).
pub fn entries_that_fit(entries: usize, bytes: usize) -> Option<u64> {
    (entries > 1 && bytes > MAX_APPEND_BYTES).then(|| ((entries as u128 * MAX_APPEND_BYTES as u128 / bytes as u128) as u64).max(1))
}

impl PeerClient {
    /// Sends `req`; `entries` is how many log entries it carries (AppendEntries only), to split
    /// a call that is too big ([`MAX_APPEND_BYTES`]).
    async fn call<Req, Resp, E>(
        &mut self,
        req: &Req,
        entries: usize,
        option: &RPCOption,
        send: impl AsyncFnOnce(RaftInternalClient<Channel>, Request<RaftMessage>) -> Result<Response<RaftMessage>, Status>,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable = |why: String| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)));
        let client = self.client.clone().ok_or_else(|| unreachable(format!("node {} has a bad address, or this node has no peer port", self.target)))?;
        let message = encode(req, wire_format_of(self.cluster_format.get())).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if let Some(fit) = entries_that_fit(entries, message.payload.len()) {
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
        }
        let mut request = Request::new(message);
        request.set_timeout(option.hard_ttl());
        let response = send(client, request).await.map_err(|status| unreachable(status.to_string()))?;
        self.peer_formats.record(self.target, response.get_ref().newest_store_format);
        let result: Result<Resp, E> = decode(response.get_ref()).map_err(|e| RPCError::Network(NetworkError::new(&std::io::Error::other(e))))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        self.call(&rpc, entries, &option, async |mut c, r| c.append_entries(r).await).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>> {
        self.call(&rpc, 0, &option, async |mut c, r| c.install_snapshot(r).await).await
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, 0, &option, async |mut c, r| c.vote(r).await).await
    }
}

/// The receiving side: hands each message to the local Raft node.
pub struct RaftService {
    raft: Arc<Raft>,
}

impl RaftService {
    pub fn new(raft: Arc<Raft>) -> Self {
        RaftService { raft }
    }
}

/// The answer, in the wire format the request came in (a node of the format before reads it).
fn reply<T: Serialize>(value: &T, request: &RaftMessage) -> Result<Response<RaftMessage>, Status> {
    encode(value, request.format_version).map(Response::new).map_err(|e| Status::internal(e.to_string()))
}

#[tonic::async_trait]
impl RaftInternal for RaftService {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req: AppendEntriesRequest<TypeConfig> = decode(request.get_ref()).map_err(Status::invalid_argument)?;
        reply(&self.raft.append_entries(req).await, request.get_ref())
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req: VoteRequest<NodeId> = decode(request.get_ref()).map_err(Status::invalid_argument)?;
        reply(&self.raft.vote(req).await, request.get_ref())
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> = decode(request.get_ref()).map_err(Status::invalid_argument)?;
        reply(&self.raft.install_snapshot(req).await, request.get_ref())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_append_too_big_for_one_call_is_split_by_what_fits_and_one_entry_always_goes() {
        assert_eq!(entries_that_fit(300, MAX_APPEND_BYTES), None, "at the budget: sent");
        assert_eq!(entries_that_fit(300, 30 * MAX_APPEND_BYTES), Some(10));
        assert_eq!(entries_that_fit(300, 3000 * MAX_APPEND_BYTES), Some(1), "at least one entry a call");
        assert_eq!(entries_that_fit(1, 100 * MAX_APPEND_BYTES), None, "a single entry goes whatever its size");
        assert_eq!(entries_that_fit(0, 0), None);
    }

    #[test]
    fn the_wire_format_follows_the_cluster_format() {
        assert_eq!(wire_format_of(5), OLDEST_WIRE_FORMAT, "a cluster at format 5 speaks format 5's wire");
        assert_eq!(wire_format_of(6), 5, "a cluster at format 6 speaks format 6's wire");
        assert_eq!(wire_format_of(FORMAT_VERSION), WIRE_FORMAT_VERSION);
    }

    #[test]
    fn messages_of_the_previous_wire_format_and_this_one_are_read_and_others_refused() {
        for format in [OLDEST_WIRE_FORMAT, WIRE_FORMAT_VERSION] {
            let message = encode(&7u64, format).expect("encode");
            assert_eq!(message.newest_store_format, FORMAT_VERSION, "every message says which format its sender runs");
            assert_eq!(decode::<u64>(&message), Ok(7));
        }
        for format in [OLDEST_WIRE_FORMAT - 1, WIRE_FORMAT_VERSION + 1] {
            let message = encode(&7u64, format).expect("encode");
            assert!(decode::<u64>(&message).is_err(), "wire format {format} refused");
        }
    }

    #[test]
    fn a_peer_runs_a_format_only_as_it_last_said_and_only_while_it_says_so() {
        let formats = PeerFormats::default();
        let lately = Duration::from_secs(3);
        assert_eq!(formats.newest(2, lately), None, "never heard: not known to run anything");
        formats.record(2, FORMAT_VERSION);
        assert_eq!(formats.newest(2, lately), Some(FORMAT_VERSION));
        // Restarted with the previous release, whose messages say nothing.
        formats.record(2, 0);
        assert_eq!(formats.newest(2, lately), Some(0));
        assert_eq!(formats.newest(3, lately), None, "another peer");
    }
}
