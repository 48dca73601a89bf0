//! A member's node on the federation network: libp2p over TCP with Noise and Yamux, identify
//! and ping, gossipsub for announcements and membership documents, request-response for
//! anti-entropy and for calls between members (`calls.rs`), and Prometheus metrics of all of it
//! ([`FederationNode::metrics_text`]).
//!
//! Only members connect: an allow list holding the membership's peer IDs refuses every other
//! connection as it is established (after Noise proved the peer's key), in both directions,
//! before any protocol runs. A gossip message is checked before it is forwarded (signature by
//! the member it names, newer than what is known); one that fails is rejected, not relayed.
//! Gossip alone may lose a message (a member that was not connected); every few seconds each
//! node sends its version vector to its peers and gets back what it lacked.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::allow_block_list::{self, AllowedPeers};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::metrics::{Metrics, Recorder, Registry};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, noise, ping, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::calls::{Answer, Call, CallRequest, CALL_FORMAT};
use crate::catalogue::{Announcement, Applied, Catalogue, FederatedListing, Freshness, ListingDigest, SignedAnnouncement};
use crate::membership::{Membership, MembershipChain, MembershipError, SignedMembership, FORMAT};

const CATALOGUE_TOPIC: &str = "suanli/catalogue/1";
const MEMBERSHIP_TOPIC: &str = "suanli/membership/1";
const ANTI_ENTROPY: StreamProtocol = StreamProtocol::new("/suanli/anti-entropy/1");
const CALLS: StreamProtocol = StreamProtocol::new("/suanli/call/1");
/// A node dials members by itself (at the addresses the membership lists) only while it has
/// fewer connections than this, one per round: enough for gossip and anti-entropy to reach
/// everyone, never a full mesh.
const DIAL_WHILE_FEWER_THAN: usize = 4;
/// How long a call waits for the other member's answer (it decides in its own Raft group).
const CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Calls from other members waiting for this member's gateway at once; more are refused
/// (`UNAVAILABLE`, the caller retries).
const CALLS_QUEUED: usize = 64;
/// Bytes (postcard-encoded) of membership changes and announcements one anti-entropy answer
/// carries at most; the rest follow in the next rounds. The answer travels in libp2p's CBOR
/// codec, which takes at most 10 MiB and writes every field name (about 3× postcard for a
/// listing): 2 MiB of postcard stays well inside it.
const ANSWER_BUDGET: usize = 2 * 1024 * 1024;
/// Largest gossip message accepted.
const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// What travels in gossip, tagged with its format.
#[derive(Serialize, Deserialize)]
pub(crate) enum Gossip {
    Announcement(SignedAnnouncement),
    Membership(SignedMembership),
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Wire {
    pub(crate) format: u32,
    pub(crate) gossip: Gossip,
}

/// Anti-entropy: "this is what I know", answered with what the asker lacks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionVector {
    pub format: u32,
    pub versions: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Missing {
    pub announcements: Vec<SignedAnnouncement>,
    /// The membership changes after the asker's version, in order (it checks each against the
    /// one before).
    pub membership: Vec<SignedMembership>,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    members_only: allow_block_list::Behaviour<AllowedPeers>,
    gossip: gossipsub::Behaviour,
    anti_entropy: request_response::cbor::Behaviour<(VersionVector, u64), Missing>,
    calls: request_response::cbor::Behaviour<CallRequest, Answer>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub keypair: Keypair,
    /// The federation's first membership document and every change since.
    pub membership: MembershipChain,
    /// Where to listen, e.g. `/ip4/0.0.0.0/tcp/4001`.
    pub listen: Multiaddr,
    /// Members to dial at start (their addresses in the membership are dialled too).
    pub dial: Vec<Multiaddr>,
    pub transport: TransportKind,
    /// Where to keep the membership chain as changes are adopted (JSON), so a restart resumes
    /// from the latest membership instead of the configured one.
    pub persist_membership: Option<std::path::PathBuf>,
    pub anti_entropy_every: Duration,
    pub freshness: Freshness,
    /// Where calls from other members go (the gateway answers them); `None`: every call is
    /// refused.
    pub calls: Option<mpsc::Sender<IncomingCall>>,
}

/// A call from another member, to be answered on `reply`.
#[derive(Debug)]
pub struct IncomingCall {
    /// The calling member, as Noise proved it.
    pub from: PeerId,
    pub call: Call,
    pub reply: oneshot::Sender<Answer>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error("this node's key is not a member of the federation")]
    NotAMember,
    #[error("network: {0}")]
    Network(String),
    #[error("the node has stopped")]
    Stopped,
    #[error("the offer is {0} bytes encoded; a gossip message carries at most {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("{0} is not a member of the federation")]
    NotMember(PeerId),
    /// The call did not reach the member or got no answer in time; it may have been applied
    /// (calls carry idempotency keys: retry it).
    #[error("the call to {peer} failed: {why}")]
    Call { peer: PeerId, why: String },
}

/// What the node has seen, for metrics and tests.
#[derive(Debug, Default)]
pub struct Counters {
    pub announcements_applied: AtomicU64,
    pub announcements_known: AtomicU64,
    pub announcements_refused: AtomicU64,
    pub announcements_expired: AtomicU64,
    pub connections_refused: AtomicU64,
    pub anti_entropy_rounds: AtomicU64,
    pub calls_sent: AtomicU64,
    pub calls_failed: AtomicU64,
    pub calls_received: AtomicU64,
    pub calls_refused: AtomicU64,
    /// Gossip messages, anti-entropy questions and answers, and calls received (what a member
    /// handles; identify and ping are not counted).
    pub messages_received: AtomicU64,
}

struct Shared {
    /// libp2p's metrics (swarm, gossipsub, identify, ping) in their registry.
    registry: Registry,
    membership: Membership,
    /// The membership's history, served to members that lag behind.
    chain: MembershipChain,
    catalogue: Catalogue,
}

enum Command {
    Announce(Vec<ListingDigest>, oneshot::Sender<Result<SignedAnnouncement, NodeError>>),
    Dial(Multiaddr),
    Connected(oneshot::Sender<Vec<PeerId>>),
    ChangeMembership(SignedMembership, oneshot::Sender<Result<u64, MembershipError>>),
    Call(PeerId, Call, oneshot::Sender<Result<Answer, NodeError>>),
}

/// A running member node. Dropping every handle stops it.
#[derive(Clone)]
pub struct FederationNode {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    shared: Arc<Mutex<Shared>>,
    counters: Arc<Counters>,
    started: Instant,
    freshness: Freshness,
    changes: watch::Receiver<u64>,
    listening: watch::Receiver<Vec<Multiaddr>>,
}

impl FederationNode {
    /// Starts the node on the current tokio runtime.
    pub async fn start(config: NodeConfig) -> Result<FederationNode, NodeError> {
        let membership = config.membership.verify()?;
        let peer_id = config.keypair.public().to_peer_id();
        if !membership.contains(&peer_id) {
            return Err(NodeError::NotAMember);
        }
        let mut swarm = build_swarm(&config.keypair, &membership, config.transport)?;
        swarm.listen_on(config.listen.clone()).map_err(|e| NodeError::Network(e.to_string()))?;
        let dial: Vec<Multiaddr> = membership
            .peers()
            .filter(|p| **p != peer_id)
            .filter_map(|p| membership.member(p))
            .flat_map(|m| m.addresses.iter().filter_map(|a| a.parse().ok()))
            .chain(config.dial.iter().cloned())
            .collect();
        for address in dial {
            let _ = swarm.dial(address);
        }
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let shared = Arc::new(Mutex::new(Shared { registry, membership, chain: config.membership.clone(), catalogue: Catalogue::default() }));
        let counters = Arc::new(Counters::default());
        let (commands, receiver) = mpsc::channel(64);
        let started = Instant::now();
        let (changed, changes) = watch::channel(0);
        let (listens, listening) = watch::channel(Vec::new());
        let (answers_tx, answers_rx) = mpsc::unbounded_channel();
        let node =
            FederationNode { peer_id, commands, shared: shared.clone(), counters: counters.clone(), started, freshness: config.freshness, changes, listening };
        let driver = Driver {
            swarm,
            shared,
            counters,
            key: config.keypair,
            started,
            next_version: 0,
            changed,
            listens,
            freshness: config.freshness,
            persist: config.persist_membership,
            answer_start: 0,
            asked_for_gap: BTreeMap::new(),
            calls_to: config.calls,
            metrics,
            rounds: 0,
            calls_out: HashMap::new(),
            answers: answers_tx,
        };
        tokio::spawn(driver.run(receiver, answers_rx, config.anti_entropy_every));
        Ok(node)
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Announces this member's whole offer (replacing the previous one).
    pub async fn announce(&self, listings: Vec<ListingDigest>) -> Result<SignedAnnouncement, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Announce(listings, tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    pub async fn dial(&self, address: Multiaddr) -> Result<(), NodeError> {
        self.commands.send(Command::Dial(address)).await.map_err(|_| NodeError::Stopped)
    }

    pub async fn connected(&self) -> Result<Vec<PeerId>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Connected(tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Where this node listens now (empty until its listener is up).
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.listening.borrow().clone()
    }

    /// Where this node listens, once its listener is up.
    pub async fn listen_addr(&self) -> Result<Multiaddr, NodeError> {
        let mut listening = self.listening.clone();
        let addresses = listening.wait_for(|a| !a.is_empty()).await.map_err(|_| NodeError::Stopped)?;
        addresses.first().cloned().ok_or(NodeError::Stopped)
    }

    /// Adopts (and gossips) a newer membership document signed by a quorum of the current
    /// members; connections of peers it no longer lists are closed and their offers dropped.
    pub async fn change_membership(&self, next: SignedMembership) -> Result<u64, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::ChangeMembership(next, tx)).await.map_err(|_| NodeError::Stopped)?;
        Ok(rx.await.map_err(|_| NodeError::Stopped)??)
    }

    /// The node's metrics in Prometheus' text format: libp2p's (connections, gossipsub, identify,
    /// ping) and this node's (`suanli_federation_*`: announcements, calls, refused
    /// connections, anti-entropy rounds, the catalogue).
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        let listings = self.catalogue().len();
        let members = {
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = prometheus_client::encoding::text::encode_registry(&mut text, &shared.registry) {
                tracing::warn!(error = %e, "encoding libp2p's metrics");
            }
            shared.membership.peers().count()
        };
        let c = &self.counters;
        let counters = [
            ("announcements_applied", "announcements that were newer than what was known", &c.announcements_applied),
            ("announcements_known", "announcements already known (gossip and anti-entropy overlap)", &c.announcements_known),
            ("announcements_refused", "announcements dropped: forged, replayed, not a member's", &c.announcements_refused),
            ("announcements_expired", "announcements issued longer ago than offers are shown", &c.announcements_expired),
            ("connections_refused", "connections of peers outside the membership refused", &c.connections_refused),
            ("anti_entropy_rounds", "anti-entropy rounds", &c.anti_entropy_rounds),
            ("calls_sent", "calls to other members", &c.calls_sent),
            ("calls_failed", "calls that got no answer (unreachable, timed out)", &c.calls_failed),
            ("calls_received", "calls from other members", &c.calls_received),
            ("calls_refused", "calls refused before the gateway saw them", &c.calls_refused),
            ("messages_received", "gossip messages, anti-entropy questions and answers, and calls received", &c.messages_received),
        ];
        for (name, help, value) in counters {
            text.push_str(&format!(
                "# HELP suanli_federation_{name} {help}.\n# TYPE suanli_federation_{name} counter\nsuanli_federation_{name}_total {}\n",
                value.load(Ordering::Relaxed)
            ));
        }
        text.push_str(&format!(
            "# HELP suanli_federation_listings Listings in the merged catalogue (stale ones included).\n# TYPE suanli_federation_listings gauge\nsuanli_federation_listings {listings}\n"
        ));
        text.push_str(&format!(
            "# HELP suanli_federation_members Members in the membership.\n# TYPE suanli_federation_members gauge\nsuanli_federation_members {members}\n"
        ));
        text
    }

    /// Calls member `to` and waits for its answer (at most `CALL_TIMEOUT`).
    pub async fn call(&self, to: PeerId, call: Call) -> Result<Answer, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Call(to, call, tx)).await.map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// The merged catalogue now: every member's offer (this one's too), stale ones marked,
    /// hidden ones left out.
    pub fn catalogue(&self) -> Vec<FederatedListing> {
        let now = self.started.elapsed().as_millis() as u64;
        let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.catalogue.listings(&shared.membership, self.freshness, now)
    }

    /// The membership this node holds now.
    pub fn membership(&self) -> Membership {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).membership.clone()
    }

    /// Whether the membership this node holds lists it (a member voted out is refused by the
    /// others and should be looked at).
    pub fn is_member(&self) -> bool {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).membership.contains(&self.peer_id)
    }

    pub fn membership_version(&self) -> u64 {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).membership.version()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// A counter that grows whenever the catalogue takes a newer offer (to wait on instead of
    /// polling).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }
}

/// How members reach each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportKind {
    /// TCP with Noise and Yamux: the network.
    #[default]
    Tcp,
    /// libp2p's in-process memory transport with the same Noise and Yamux (`/memory/N`
    /// addresses): the simulations run thousands of real nodes in one process with it.
    Memory,
}

type BehaviourError = Box<dyn std::error::Error + Send + Sync>;

fn behaviour(key: &Keypair) -> Result<Behaviour, BehaviourError> {
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(MAX_MESSAGE_BYTES)
        .build()?;
    let gossip = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)?;
    let anti_entropy = request_response::cbor::Behaviour::new([(ANTI_ENTROPY, ProtocolSupport::Full)], request_response::Config::default());
    let calls =
        request_response::cbor::Behaviour::new([(CALLS, ProtocolSupport::Full)], request_response::Config::default().with_request_timeout(CALL_TIMEOUT));
    let identify = identify::Behaviour::new(identify::Config::new("/suanli/federation/1".into(), key.public()));
    Ok(Behaviour {
        members_only: allow_block_list::Behaviour::default(),
        gossip,
        anti_entropy,
        calls,
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
    })
}

fn build_swarm(key: &Keypair, membership: &Membership, transport: TransportKind) -> Result<Swarm<Behaviour>, NodeError> {
    let network = |e: &dyn std::fmt::Display| NodeError::Network(e.to_string());
    let idle = |c: libp2p::swarm::Config| c.with_idle_connection_timeout(Duration::from_secs(60));
    let builder = libp2p::SwarmBuilder::with_existing_identity(key.clone()).with_tokio();
    let mut swarm = match transport {
        TransportKind::Tcp => builder
            .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
            .map_err(|e| network(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| network(&e))?
            .with_swarm_config(idle)
            .build(),
        TransportKind::Memory => builder
            .with_other_transport(|key| -> Result<_, BehaviourError> {
                use libp2p::core::transport::{MemoryTransport, Transport as _};
                Ok(MemoryTransport::default()
                    .upgrade(libp2p::core::upgrade::Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()))
            })
            .map_err(|e| network(&e))?
            .with_behaviour(behaviour)
            .map_err(|e| network(&e))?
            .with_swarm_config(idle)
            .build(),
    };
    for peer in membership.peers() {
        swarm.behaviour_mut().members_only.allow_peer(*peer);
    }
    for topic in [CATALOGUE_TOPIC, MEMBERSHIP_TOPIC] {
        swarm.behaviour_mut().gossip.subscribe(&IdentTopic::new(topic)).map_err(|e| network(&e))?;
    }
    Ok(swarm)
}

struct Driver {
    swarm: Swarm<Behaviour>,
    shared: Arc<Mutex<Shared>>,
    counters: Arc<Counters>,
    key: Keypair,
    started: Instant,
    next_version: u64,
    changed: watch::Sender<u64>,
    listens: watch::Sender<Vec<Multiaddr>>,
    freshness: Freshness,
    persist: Option<std::path::PathBuf>,
    /// Rotates where anti-entropy answers start, so a full answer is not always the same.
    answer_start: usize,
    /// When each peer was last asked because its gossip showed this node behind (at most once
    /// a second per peer, whatever unchecked gossip claims).
    asked_for_gap: BTreeMap<PeerId, Instant>,
    calls_to: Option<mpsc::Sender<IncomingCall>>,
    /// Calls this node sent, waiting for their answers.
    calls_out: HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Answer, NodeError>>>,
    /// Answers the gateway gave to calls from other members, to send back.
    answers: mpsc::UnboundedSender<(request_response::ResponseChannel<Answer>, Answer)>,
    metrics: Metrics,
    rounds: u64,
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut answers: mpsc::UnboundedReceiver<(request_response::ResponseChannel<Answer>, Answer)>,
        every: Duration,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => return,
                },
                event = self.swarm.select_next_some() => self.event(event),
                Some((channel, answer)) = answers.recv() => {
                    let _ = self.swarm.behaviour_mut().calls.send_response(channel, answer);
                }
                _ = tick.tick() => self.round(),
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Announce(listings, reply) => {
                let _ = reply.send(self.announce(listings));
            }
            Command::Dial(address) => {
                let _ = self.swarm.dial(address);
            }
            Command::Connected(reply) => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::ChangeMembership(next, reply) => {
                let adopted = self.adopt(next.clone());
                if adopted.is_ok() {
                    self.publish(Gossip::Membership(next));
                }
                let _ = reply.send(adopted);
            }
            Command::Call(peer, call, reply) => {
                let addresses: Option<Vec<Multiaddr>> =
                    self.shared().membership.member(&peer).map(|m| m.addresses.iter().filter_map(|a| a.parse().ok()).collect());
                let Some(addresses) = addresses else {
                    let _ = reply.send(Err(NodeError::NotMember(peer)));
                    return;
                };
                // Not connected: request-response dials it at the addresses the membership lists.
                for address in addresses {
                    self.swarm.add_peer_address(peer, address);
                }
                self.counters.calls_sent.fetch_add(1, Ordering::Relaxed);
                let id = self.swarm.behaviour_mut().calls.send_request(&peer, CallRequest { format: CALL_FORMAT, call });
                self.calls_out.insert(id, reply);
            }
        }
    }

    /// A call from another member: handed to the gateway, whose answer goes back through
    /// `answers`; refused at once when nobody takes calls, the call is malformed, or too many
    /// wait.
    fn incoming_call(&mut self, from: PeerId, request: CallRequest, channel: request_response::ResponseChannel<Answer>) {
        self.counters.calls_received.fetch_add(1, Ordering::Relaxed);
        let refuse = |code: &str, message: String| Answer::Refused { code: code.into(), message };
        let refused = if request.format != CALL_FORMAT {
            Some(refuse("INVALID_ARGUMENT", format!("call format {} received, this member speaks {CALL_FORMAT}", request.format)))
        } else if !self.shared().membership.contains(&from) {
            Some(refuse("PERMISSION_DENIED", "not a member of the federation".into()))
        } else if let Err(why) = request.call.validate() {
            Some(refuse("INVALID_ARGUMENT", why))
        } else {
            match &self.calls_to {
                None => Some(refuse("UNIMPLEMENTED", "this member takes no calls".into())),
                Some(to) => {
                    let (reply, answer) = oneshot::channel();
                    match to.try_send(IncomingCall { from, call: request.call, reply }) {
                        Ok(()) => {
                            let answers = self.answers.clone();
                            tokio::spawn(async move {
                                let answer = answer.await.unwrap_or_else(|_| Answer::Refused {
                                    code: "UNAVAILABLE".into(),
                                    message: "the member's gateway dropped the call".into(),
                                });
                                let _ = answers.send((channel, answer));
                            });
                            return;
                        }
                        Err(_) => Some(refuse("UNAVAILABLE", format!("more than {CALLS_QUEUED} calls are waiting; retry"))),
                    }
                }
            }
        };
        if let Some(answer) = refused {
            self.counters.calls_refused.fetch_add(1, Ordering::Relaxed);
            let _ = self.swarm.behaviour_mut().calls.send_response(channel, answer);
        }
    }

    fn announce(&mut self, listings: Vec<ListingDigest>) -> Result<SignedAnnouncement, NodeError> {
        // Versions grow across restarts too: they start from the wall clock's milliseconds.
        let wall_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.next_version = self.next_version.max(wall_ms).saturating_add(1);
        let announcement =
            Announcement { member: self.key.public().to_peer_id().to_base58(), version: self.next_version, issued_at_ms: wall_ms as i64, listings };
        let signed = SignedAnnouncement::sign(announcement, &self.key).map_err(|e| NodeError::Network(e.to_string()))?;
        let size = postcard::experimental::serialized_size(&signed).unwrap_or(usize::MAX);
        if size > MAX_MESSAGE_BYTES - 1024 {
            return Err(NodeError::TooLarge(size));
        }
        let (now, freshness) = (self.now_ms(), self.freshness);
        {
            let mut shared = self.shared();
            let Shared { membership, catalogue, .. } = &mut *shared;
            catalogue.apply(membership, signed.clone(), now, wall_ms as i64, freshness).map_err(|e| NodeError::Network(e.to_string()))?;
        }
        self.publish(Gossip::Announcement(signed.clone()));
        Ok(signed)
    }

    fn publish(&mut self, gossip: Gossip) {
        let topic = match gossip {
            Gossip::Announcement(_) => CATALOGUE_TOPIC,
            Gossip::Membership(_) => MEMBERSHIP_TOPIC,
        };
        let Ok(bytes) = postcard::to_allocvec(&Wire { format: FORMAT, gossip }) else { return };
        match self.swarm.behaviour_mut().gossip.publish(IdentTopic::new(topic), bytes) {
            Ok(_) => {}
            // No peer yet is not an error: anti-entropy delivers it when one connects.
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic | gossipsub::PublishError::Duplicate) => {
                tracing::debug!("gossip not sent now; anti-entropy will carry it");
            }
            Err(e) => tracing::warn!(error = %e, "gossip not sent; anti-entropy will carry it"),
        }
    }

    fn adopt(&mut self, next: SignedMembership) -> Result<u64, MembershipError> {
        let adopted = self.shared().membership.accept(next.clone())?;
        let version = adopted.version();
        let gone: Vec<PeerId> = self.shared().membership.peers().filter(|p| !adopted.contains(p)).copied().collect();
        for peer in adopted.peers() {
            self.swarm.behaviour_mut().members_only.allow_peer(*peer);
        }
        for peer in &gone {
            self.swarm.behaviour_mut().members_only.disallow_peer(*peer);
        }
        if !adopted.contains(&self.key.public().to_peer_id()) {
            // The others refuse this node's connections from now on; it keeps running (it may
            // be listed again by a later version) and says so (`FederationNode::is_member`).
            tracing::error!(version, "this member is not in the federation's membership any more");
        }
        // Kept on disk before it takes effect: what the node acts on, a restart resumes from.
        let mut chain = self.shared().chain.clone();
        chain.changes.push(next);
        if let Some(path) = &self.persist {
            if let Err(e) = persist_chain(path, &chain) {
                tracing::error!(error = %e, path = %path.display(), "could not keep the adopted membership; a restart would begin from the older one");
            }
        }
        {
            let mut shared = self.shared();
            shared.catalogue.retain_members(&adopted);
            shared.membership = adopted;
            shared.chain = chain;
        }
        tracing::info!(version, left = gone.len(), "federation membership changed");
        Ok(version)
    }

    /// Anti-entropy: ask every connected member for what this node lacks. (This member's offer
    /// stays fresh only by its owner announcing it again: a gateway whose broker went silent
    /// lets its offer go stale.)
    fn round(&mut self) {
        self.counters.anti_entropy_rounds.fetch_add(1, Ordering::Relaxed);
        self.rounds += 1;
        self.reconnect();
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            self.ask(peer);
        }
    }

    /// While this node has fewer than `DIAL_WHILE_FEWER_THAN` connections, dials one member it
    /// is not connected to (at the addresses the membership lists),
    /// a different one each round: a member that was away or cut off is met again without a
    /// restart, and no member is everyone's first choice.
    fn reconnect(&mut self) {
        let me = self.key.public().to_peer_id();
        // A member voted out dials nobody: the others refuse it.
        if self.swarm.connected_peers().count() >= DIAL_WHILE_FEWER_THAN || !self.shared().membership.contains(&me) {
            return;
        }
        let candidate = {
            let shared = self.shared();
            let missing: Vec<&PeerId> = shared.membership.peers().filter(|p| **p != me && !self.swarm.is_connected(p)).collect();
            // Rotates with the round and starts where this node's own ID points, so members
            // spread their dials instead of all choosing the lowest peer IDs.
            let start = (self.rounds as usize).wrapping_add(me.to_bytes().iter().map(|b| *b as usize).sum::<usize>());
            missing.get(start % missing.len().max(1)).map(|p| {
                let addresses: Vec<Multiaddr> =
                    shared.membership.member(p).map(|m| m.addresses.iter().filter_map(|a| a.parse().ok()).collect()).unwrap_or_default();
                (**p, addresses)
            })
        };
        if let Some((peer, addresses)) = candidate {
            let dial =
                DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).addresses(addresses).extend_addresses_through_behaviour().build();
            // A member that lists no address is not an error: it dials in itself.
            let _ = self.swarm.dial(dial);
        }
    }

    fn ask(&mut self, peer: PeerId) {
        let (versions, membership) = {
            let shared = self.shared();
            (shared.catalogue.versions(), shared.membership.version())
        };
        self.swarm.behaviour_mut().anti_entropy.send_request(&peer, (VersionVector { format: FORMAT, versions }, membership));
    }

    fn receive(&mut self, signed: SignedAnnouncement) -> Result<Applied, crate::catalogue::Refused> {
        let (now, wall, freshness) = (self.now_ms(), wall_ms(), self.freshness);
        let mut shared = self.shared();
        let Shared { membership, catalogue, .. } = &mut *shared;
        let result = catalogue.apply(membership, signed, now, wall, freshness);
        if result == Ok(Applied::Newer) {
            self.changed.send_modify(|generation| *generation += 1);
        }
        let counter = match result {
            Ok(Applied::Newer) => &self.counters.announcements_applied,
            Ok(Applied::Known) => &self.counters.announcements_known,
            Ok(Applied::Expired) => &self.counters.announcements_expired,
            Err(_) => &self.counters.announcements_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        self.metrics.record(&event);
        if let SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossip)) = &event {
            self.metrics.record(gossip);
        }
        if matches!(
            event,
            SwarmEvent::Behaviour(
                BehaviourEvent::Gossip(gossipsub::Event::Message { .. })
                    | BehaviourEvent::AntiEntropy(request_response::Event::Message { .. })
                    | BehaviourEvent::Calls(request_response::Event::Message { .. })
            )
        ) {
            self.counters.messages_received.fetch_add(1, Ordering::Relaxed);
        }
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => self.metrics.record(&event),
            SwarmEvent::Behaviour(BehaviourEvent::Ping(event)) => self.metrics.record(&event),
            SwarmEvent::Behaviour(BehaviourEvent::Gossip(gossipsub::Event::Message { propagation_source, message_id, message })) => {
                let acceptance = match postcard::from_bytes::<Wire>(&message.data) {
                    Ok(Wire { format: FORMAT, gossip: Gossip::Announcement(signed) }) => match self.receive(signed) {
                        Ok(Applied::Newer) => MessageAcceptance::Accept,
                        Ok(Applied::Known | Applied::Expired) => MessageAcceptance::Ignore,
                        Err(why) => {
                            tracing::warn!(%propagation_source, %why, "announcement dropped");
                            MessageAcceptance::Reject
                        }
                    },
                    Ok(Wire { format: FORMAT, gossip: Gossip::Membership(next) }) => match self.adopt(next) {
                        Ok(_) => MessageAcceptance::Accept,
                        Err(MembershipError::NotNewer { .. }) => MessageAcceptance::Ignore,
                        // This node missed changes: it asks for them in order.
                        Err(MembershipError::Gap { .. }) => {
                            let recently = self.asked_for_gap.get(&propagation_source).is_some_and(|t| t.elapsed() < Duration::from_secs(1));
                            if !recently {
                                self.asked_for_gap.insert(propagation_source, Instant::now());
                                self.ask(propagation_source);
                            }
                            MessageAcceptance::Ignore
                        }
                        Err(why) => {
                            tracing::warn!(%propagation_source, %why, "membership document dropped");
                            MessageAcceptance::Reject
                        }
                    },
                    _ => MessageAcceptance::Reject,
                };
                let _ = self.swarm.behaviour_mut().gossip.report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            SwarmEvent::Behaviour(BehaviourEvent::AntiEntropy(request_response::Event::Message { peer, message, .. })) => match message {
                request_response::Message::Request { request: (theirs, their_membership), channel, .. } => {
                    self.answer_start = self.answer_start.wrapping_add(1);
                    let (now, freshness, start) = (self.now_ms(), self.freshness, self.answer_start);
                    let answer = {
                        let shared = self.shared();
                        // Membership changes first (always at least one when the asker lacks
                        // any), counted against the budget; announcements fill the rest.
                        let mut used = 0usize;
                        let mut membership: Vec<SignedMembership> = Vec::new();
                        for change in shared.chain.changes.iter().filter(|c| c.doc.version > their_membership) {
                            let size = postcard::experimental::serialized_size(change).unwrap_or(usize::MAX);
                            if !membership.is_empty() && used.saturating_add(size) > ANSWER_BUDGET {
                                break;
                            }
                            used = used.saturating_add(size);
                            membership.push(change.clone());
                        }
                        let announcements = shared.catalogue.newer_than(&theirs.versions, now, freshness, start, ANSWER_BUDGET.saturating_sub(used));
                        Missing { announcements, membership }
                    };
                    let _ = self.swarm.behaviour_mut().anti_entropy.send_response(channel, answer);
                }
                request_response::Message::Response { response, .. } => {
                    for next in response.membership {
                        match self.adopt(next) {
                            Ok(_) | Err(MembershipError::NotNewer { .. }) => {}
                            Err(why) => {
                                tracing::warn!(%peer, %why, "membership change from anti-entropy not adopted");
                                break;
                            }
                        }
                    }
                    for signed in response.announcements {
                        if let Err(why) = self.receive(signed) {
                            tracing::warn!(%peer, %why, "announcement from anti-entropy dropped");
                        }
                    }
                }
            },
            SwarmEvent::Behaviour(BehaviourEvent::Calls(event)) => match event {
                request_response::Event::Message { peer, message: request_response::Message::Request { request, channel, .. }, .. } => {
                    self.incoming_call(peer, request, channel);
                }
                request_response::Event::Message { message: request_response::Message::Response { request_id, response }, .. } => {
                    if let Some(reply) = self.calls_out.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
                request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                    self.counters.calls_failed.fetch_add(1, Ordering::Relaxed);
                    if let Some(reply) = self.calls_out.remove(&request_id) {
                        let _ = reply.send(Err(NodeError::Call { peer, why: error.to_string() }));
                    }
                }
                _ => {}
            },
            SwarmEvent::ConnectionEstablished { peer_id, .. } => self.ask(peer_id),
            SwarmEvent::NewListenAddr { address, .. } => self.listens.send_modify(|a| a.push(address)),
            SwarmEvent::ExpiredListenAddr { address, .. } => self.listens.send_modify(|a| a.retain(|x| *x != address)),
            SwarmEvent::IncomingConnectionError { error, send_back_addr, .. } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.counters.connections_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%send_back_addr, "a peer outside the federation was refused");
                }
            }
            _ => {}
        }
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Writes the chain next to `path` and renames it into place (a crash leaves the old file).
fn persist_chain(path: &std::path::Path, chain: &MembershipChain) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = path.with_file_name(format!("{name}.{}.partial", std::process::id()));
    let json = serde_json::to_vec_pretty(chain).map_err(std::io::Error::other)?;
    std::fs::write(&partial, json)?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
