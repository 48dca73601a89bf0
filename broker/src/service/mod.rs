//! The gRPC edge: authentication, turning calls into commands, proposing them through Raft,
//! and the reads. The rules themselves live in `state`; this layer only establishes *who* is
//! calling and *when*, hashes secrets before they reach the log, and maps outcomes to statuses.

pub mod admin;
pub mod archived;
pub mod batcher;
pub mod broker_api;
pub mod job_logs;
pub mod jobs;
pub mod metrics;
pub mod monitoring;
pub mod paging;
pub mod powers;
pub mod read_barrier;
pub mod reaper;
pub mod remote_leases;
pub mod southbound;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use suanli_proto::client::ACTING_OPERATOR_HEADER;
use suanli_proto::error::status;
use suanli_proto::to_status;
use suanli_types::{Caller, DomainError, ErrorCode, OperatorRole, RequestId, SecretHash, Timestamp};
use tonic::{Request, Status};

use crate::network::forward::AgentKey;
use crate::state::{rules, Command, Envelope, Response, State};
use crate::storage::{Raft, StateMachineStore};
use metrics::Metrics;

/// Hash domain of API tokens (platform and account tokens).
pub const TOKEN_DOMAIN: &str = "api-token";

pub fn auth_code_domain(lease: suanli_types::LeaseId) -> String {
    format!("auth-code:{lease}")
}

/// Everything a request handler needs, shared by all services of one node.
#[derive(Clone)]
pub struct Shared {
    pub raft: Arc<Raft>,
    pub sm: StateMachineStore,
    platform_token: SecretHash,
    pub metrics: Arc<Metrics>,
    /// Signs enrolled agents' client certificates; every node of a cluster holds the same one.
    pub agent_ca: Option<Arc<suanli_pki::Ca>>,
    /// Signs researchers' SSH certificates for their leases' logins.
    pub ssh_ca: Option<Arc<suanli_pki::ssh::SshCa>>,
    /// Further SSH user CA keys agents admit certificates of (OpenSSH lines), while the SSH
    /// user CA is rotated.
    pub ssh_cas_also_trusted: Vec<String>,
    /// Running jobs' output, as their agents send it (held by the leader, in memory).
    pub job_logs: Arc<job_logs::JobLogs>,
    /// The request ID of the latest call that changed each recent lease here (agents log it).
    pub lease_requests: Arc<std::sync::Mutex<RecentRequests>>,
    /// How much money the platform may pay in, per call and per day.
    pub deposit_limits: DepositLimits,
    /// The platform's services' own tokens (`powers.rs`): each authenticates as the platform,
    /// within its powers (checked in `network::forward`).
    pub services: powers::Services,
    /// Signs the artifact store capabilities agents get with their jobs; `None`: none issued.
    pub artifact_key: Option<suanli_artifacts::CapabilityKey>,
    /// Checks the portal's operator assertions; `None`: the platform token and a role name
    /// suffice to act as an operator (a deployment without the portal's key).
    pub operator_key: Option<suanli_pki::assertion::OperatorKey>,
    /// Signs the tickets agents open their tunnel to the portal with; `None`: none issued.
    pub tunnel_key: Option<suanli_pki::tunnel_ticket::TunnelKey>,
    /// What each peer said of the store format it runs (the leader raises the cluster format
    /// from it, `reaper.rs`).
    pub peer_formats: crate::network::PeerFormats,
    /// Membership changes and the raise of the cluster format take turns: a node added
    /// between the leader's check that every member runs its format and the raise could not
    /// read what follows (`reaper.rs`, `admin.rs`).
    pub membership_turn: Arc<tokio::sync::Mutex<()>>,
    /// Linearizable reads share leadership rounds (a flood of reads, or of unknown tokens to
    /// confirm, costs the cluster a round at a time, not one per request).
    read_barrier: Arc<read_barrier::ReadBarrier>,
    /// Proposes what arrives together as one log entry (group commit).
    batcher: Arc<batcher::Batcher>,
}

/// Caps on deposits (`[broker] max_deposit_minor`, `max_deposits_per_day_minor`): the token
/// that pays money in is a service's, and a stolen one mints at most this much.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DepositLimits {
    pub per_call_minor: i64,
    /// Over any 24 hours, all accounts together.
    pub per_day_minor: i64,
}

impl Default for DepositLimits {
    fn default() -> Self {
        // 1 million CNY a call, 10 billion a day: wide bounds an operator narrows to what its
        // payment service really takes in (ops/broker.example.toml).
        DepositLimits { per_call_minor: 100_000_000, per_day_minor: 1_000_000_000_000 }
    }
}

impl Shared {
    pub fn new(raft: Arc<Raft>, sm: StateMachineStore, platform_token: &str, metrics: Arc<Metrics>, agent_ca: Option<Arc<suanli_pki::Ca>>) -> Self {
        Shared {
            batcher: Arc::new(batcher::Batcher::new(raft.clone(), sm.clone(), metrics.clone())),
            raft,
            sm,
            platform_token: SecretHash::of(TOKEN_DOMAIN, platform_token),
            metrics,
            agent_ca,
            ssh_ca: None,
            ssh_cas_also_trusted: Vec::new(),
            job_logs: Arc::default(),
            lease_requests: Default::default(),
            deposit_limits: DepositLimits::default(),
            services: powers::Services::default(),
            artifact_key: None,
            operator_key: None,
            tunnel_key: None,
            peer_formats: crate::network::PeerFormats::default(),
            membership_turn: Arc::default(),
            read_barrier: Arc::default(),
        }
    }

    /// Who sent this request: the agent whose key the transport established (mutual TLS on the
    /// agent port, see `network::forward`), else the `authorization: Bearer …` header's owner.
    ///
    /// A credential this node does not know may be one the cluster has just committed and this
    /// node not yet applied: "unknown" is answered only after this node has confirmed it leads
    /// and has applied everything committed ([`Shared::confirm_absent`]); until then the caller
    /// hears `UNAVAILABLE` and retries. (The future holds no borrow of the request.)
    pub fn caller<T>(&self, request: &Request<T>) -> impl Future<Output = Result<Caller, Status>> + Send + 'static {
        let found = self.known_caller(request);
        let shared = self.clone();
        async move {
            match found {
                Ok(caller) => Ok(caller),
                Err(Unknown::Agent(hash)) => {
                    let find = move |s: &State| s.node_by_agent_credential(&hash).map(Caller::Agent);
                    shared.confirm_absent(find, "this agent's key is not enrolled, or it was revoked").await
                }
                Err(Unknown::Token(hash)) => {
                    let find = move |s: &State| s.account_by_token(&hash).map(|a| Caller::Account(a.id));
                    shared.confirm_absent(find, "unknown or revoked token").await
                }
                Err(Unknown::Refused(status)) => Err(status),
            }
        }
    }

    /// `find` on this node's state; if it finds nothing, again once this node has confirmed
    /// that it leads and has applied everything committed before now. Finding nothing then is
    /// definitive: `UNAUTHENTICATED` with `why`.
    pub async fn confirm_absent<T>(&self, find: impl Fn(&State) -> Option<T>, why: &str) -> Result<T, Status> {
        if let Some(found) = self.sm.read(&find) {
            return Ok(found);
        }
        self.linearizable().await.map_err(|e| status(ErrorCode::Unavailable, format!("cannot confirm the credential on this node now ({e}); retry"), &[]))?;
        self.sm.read(&find).ok_or_else(|| to_status(&DomainError::Unauthenticated(why.into())))
    }

    fn known_caller<T>(&self, request: &Request<T>) -> Result<Caller, Unknown> {
        let unauthenticated = |why: &str| Unknown::Refused(to_status(&DomainError::Unauthenticated(why.into())));
        if let Some(AgentKey(key)) = request.extensions().get::<AgentKey>() {
            let hash = southbound::agent_key_hash(key);
            return self.sm.read(|s| s.node_by_agent_credential(&hash)).map(Caller::Agent).ok_or(Unknown::Agent(hash));
        }
        let header = request.metadata().get("authorization").ok_or_else(|| unauthenticated("send `authorization: Bearer <token>`"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(|| unauthenticated("malformed authorization header"))?;
        let hash = SecretHash::of(TOKEN_DOMAIN, token);
        if hash.matches(&self.platform_token) || self.services.knows(&hash) {
            // The portal authenticates its operators and says which role one acts in; only the
            // platform token may say so.
            return match request.metadata().get(ACTING_OPERATOR_HEADER) {
                None => Ok(Caller::Platform),
                Some(role) => {
                    let role = role
                        .to_str()
                        .ok()
                        .and_then(OperatorRole::parse)
                        .ok_or_else(|| Unknown::Refused(to_status(&DomainError::invalid(ACTING_OPERATOR_HEADER, "an operator role"))))?;
                    self.check_operator(request, role).map_err(Unknown::Refused)?;
                    Ok(Caller::Operator(role))
                }
            };
        }
        self.sm.read(|s| s.account_by_token(&hash).map(|a| Caller::Account(a.id))).ok_or(Unknown::Token(hash))
    }

    /// With an operator key configured: the call carries the portal's signed assertion of which
    /// operator acts, holding which roles, and the broker enforces the role rules itself (the
    /// role acted in is held; no exclusive pair is held together).
    fn check_operator<T>(&self, request: &Request<T>, role: OperatorRole) -> Result<(), Status> {
        let Some(key) = &self.operator_key else { return Ok(()) };
        let denied = |why: String| to_status(&DomainError::PermissionDenied(why));
        let text = request
            .metadata()
            .get(suanli_proto::client::OPERATOR_ASSERTION_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| denied("an operator acts with the portal's signed assertion (x-suanli-operator-assertion)".into()))?;
        let assertion = key.verify(text, now().millis()).map_err(|e| denied(e.to_string()))?;
        let held: Vec<OperatorRole> = assertion.roles.iter().filter_map(|r| OperatorRole::parse(r)).collect();
        if assertion.acting != role.as_str() || !held.contains(&role) {
            return Err(denied(format!("operator {} does not hold the role {}", assertion.operator, role.as_str())));
        }
        if let Some((a, b)) = OperatorRole::conflict(&held) {
            return Err(denied(format!("operator {} holds {} and {}, which exclude each other", assertion.operator, a.as_str(), b.as_str())));
        }
        tracing::info!(target: "audit", operator = assertion.operator, role = role.as_str(), "operator call");
        Ok(())
    }

    /// Commits a command through Raft and returns its outcome. A write is acknowledged only
    /// once it is committed and applied.
    pub async fn propose(&self, caller: Caller, request_id: &str, command: Command) -> Result<Response, Status> {
        let request_id = RequestId::parse(request_id).map_err(|e| to_status(&e.into()))?;
        let cluster_format = self.sm.read(|s| s.cluster_format());
        command.may_propose_at(cluster_format).map_err(|why| status(ErrorCode::Unavailable, why, &[]))?;
        let envelope = Envelope { caller, request_id, at: self.sm.proposal_time(now()), command };
        let size = postcard::to_allocvec(&envelope).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > rules::MAX_COMMAND_BYTES {
            return Err(to_status(&DomainError::PayloadTooLarge { size, limit: rules::MAX_COMMAND_BYTES }));
        }
        self.precheck(&envelope.caller, &envelope.request_id, &envelope.command).await?;
        match self.batcher.write(envelope, size).await {
            Ok(outcome) => {
                if let (Ok(Response::Lease(lease)), Some(id)) = (&outcome, suanli_observability::current()) {
                    self.lease_requests.lock().unwrap_or_else(|p| p.into_inner()).record(lease.id.0, id.to_string());
                }
                outcome.map_err(|e| to_status(&e))
            }
            Err(e) => Err(status(ErrorCode::Unavailable, format!("not committed: {e}"), &[])),
        }
    }

    /// Refuses, without proposing it, a command its caller may not send or that is malformed
    /// (`State::precheck`): nobody writes refusals into the log at will. A refusal from this
    /// node's state is given only once it has applied everything committed before the call (a
    /// retry of a committed request, or a command about something just created, is never
    /// refused by a node that has not caught up).
    async fn precheck(&self, caller: &Caller, request_id: &RequestId, command: &Command) -> Result<(), Status> {
        if self.sm.read(|s| s.precheck(caller, request_id, command)).is_ok() {
            return Ok(());
        }
        self.linearizable().await.map_err(|e| status(ErrorCode::Unavailable, format!("cannot check the request on this node now ({e}); retry"), &[]))?;
        self.sm.read(|s| s.precheck(caller, request_id, command)).map_err(|e| {
            self.metrics.refused_before_proposal.inc();
            to_status(&e)
        })
    }

    /// Runs `f` on the state. A linearizable read first makes sure this node is the leader and
    /// has applied everything committed before the call; a stale read uses what this node has.
    pub async fn read<T>(&self, consistency: Consistency, f: impl FnOnce(&State) -> T) -> Result<T, Status> {
        self.barrier(consistency).await?;
        Ok(self.sm.read(f))
    }

    /// For a linearizable read, waits until this node is known to lead and has applied what
    /// was committed before the call; a stale read passes at once.
    async fn barrier(&self, consistency: Consistency) -> Result<(), Status> {
        if consistency == Consistency::Linearizable {
            self.linearizable().await.map_err(|e| status(ErrorCode::Unavailable, format!("cannot confirm leadership: {e}"), &[]))?;
        }
        Ok(())
    }

    /// [`Self::read`] of the hot state and the archive together, for reads that reach what
    /// ended long ago (a lease or job by ID, statements).
    /// `f` gets the store and reads with `archived::*`, which hold the state's lock only to copy
    /// what is hot.
    pub async fn read_with_archive<T>(
        &self,
        consistency: Consistency,
        f: impl FnOnce(&crate::storage::StateMachineStore) -> Result<T, crate::storage::StoreError>,
    ) -> Result<T, Status> {
        self.barrier(consistency).await?;
        f(&self.sm).map_err(|e| {
            tracing::error!(error = %e, "reading the archive failed");
            status(ErrorCode::Internal, "the archive could not be read", &[])
        })
    }

    /// Returns once this node has confirmed, in a round that began after the call, that it
    /// leads and has applied everything committed before it.
    pub async fn linearizable(&self) -> Result<(), String> {
        let raft = self.raft.clone();
        self.read_barrier
            .pass(move || {
                let raft = raft.clone();
                async move { raft.ensure_linearizable().await.map(|_| ()).map_err(|e| e.to_string()) }
            })
            .await
    }

    /// Times a handler and counts its outcome by code.
    pub async fn observe<T>(&self, method: &'static str, f: impl Future<Output = Result<T, Status>>) -> Result<T, Status> {
        let started = Instant::now();
        let result = f.await;
        let code = match &result {
            Ok(_) => "OK".to_owned(),
            Err(status) => {
                let code = suanli_proto::decode_status(status).code.as_str().to_owned();
                // In the call's span: with the caller's request ID, so the operator who has
                // the ID of a failed request finds why here.
                tracing::info!(method, code = code.as_str(), elapsed_ms = started.elapsed().as_millis() as u64, "call refused");
                code
            }
        };
        self.metrics.observe_request(method, code, started.elapsed());
        result
    }
}

/// Why [`Shared::known_caller`] found no caller in this node's state.
enum Unknown {
    /// No enrolled agent has this key here.
    Agent(SecretHash),
    /// No account has this token here.
    Token(SecretHash),
    /// The request is refused whatever the state (no or a malformed credential).
    Refused(Status),
}

/// How fresh a read must be. Linearizable by default; `x-suanli-read: stale` asks for the
/// local state of whichever node answers (see `network::forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    Linearizable,
    Stale,
}

impl Consistency {
    pub fn of<T>(request: &Request<T>) -> Consistency {
        let stale = request.metadata().get(crate::network::forward::READ_HEADER).is_some_and(|v| v.as_bytes() == b"stale");
        if stale {
            Consistency::Stale
        } else {
            Consistency::Linearizable
        }
    }
}

/// Whether `caller` may see `lease`: its researcher, its supplier, the platform or an operator.
/// Anyone else is told it does not exist.
pub fn may_see_lease(caller: &Caller, lease: &crate::state::Lease) -> bool {
    match caller {
        Caller::Account(id) => *id == lease.researcher || *id == lease.supplier,
        Caller::Platform | Caller::Operator(_) | Caller::System => true,
        Caller::Agent(_) | Caller::Enrollee(_) => false,
    }
}

/// `INVALID_ARGUMENT` for one field.
pub fn invalid(field: &str, problem: &str) -> Status {
    to_status(&DomainError::invalid(field, problem))
}

pub fn now() -> Timestamp {
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    Timestamp::from_millis(ms)
}

const BASE32: &[u8; 32] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

/// A random secret of `len` characters from a 32-symbol alphabet without look-alikes
/// (5 bits each: 16 characters are 80 bits).
pub fn random_secret(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len).map(|_| BASE32[rng.random_range(0..32)] as char).collect()
}

/// The request IDs of the latest calls that changed recent leases, in this node's memory only
/// (a few thousand; the oldest forgotten first): what lets an agent's log line about a lease
/// name the portal request that caused it. Logs, not state: a failover forgets them.
#[derive(Default)]
pub struct RecentRequests {
    by_lease: std::collections::HashMap<u64, String>,
    order: std::collections::VecDeque<u64>,
}

impl RecentRequests {
    const KEPT: usize = 4096;

    pub fn record(&mut self, lease: u64, request_id: String) {
        if self.by_lease.insert(lease, request_id).is_none() {
            self.order.push_back(lease);
            while self.order.len() > Self::KEPT {
                if let Some(oldest) = self.order.pop_front() {
                    self.by_lease.remove(&oldest);
                }
            }
        }
    }

    pub fn of(&self, lease: u64) -> Option<&str> {
        self.by_lease.get(&lease).map(String::as_str)
    }
}

#[cfg(test)]
mod recent_requests_tests {
    use super::RecentRequests;

    #[test]
    fn the_latest_request_per_lease_is_kept_and_the_oldest_leases_forgotten() {
        let mut recent = RecentRequests::default();
        recent.record(1, "a".into());
        recent.record(1, "b".into());
        assert_eq!(recent.of(1), Some("b"));
        for lease in 2..=RecentRequests::KEPT as u64 + 1 {
            recent.record(lease, format!("r{lease}"));
        }
        assert_eq!(recent.of(1), None, "the oldest lease is forgotten");
        assert_eq!(recent.of(2), Some("r2"));
        assert_eq!(recent.by_lease.len(), RecentRequests::KEPT);
    }
}
