//! The broker's state and the one function that changes it.
//!
//! `State::apply` is deterministic: its only inputs are the state and the envelope (time
//! included), so every replica that applies the same log reaches the same state. It checks
//! authority itself instead of trusting the service layer, and it never panics on any input:
//! every rejection is a `DomainError` that leaves the state as it was (the one exception is a
//! wrong authorization code, which must cost an attempt).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use suanli_types::error::EntityKind;
use suanli_types::{
    AccountId, AccountKind, Caller, CardHealth, CardId, CardStatus, CatalogueFacts, CatalogueFilter, ClusterClass, ClusterId, ClusterState, CpcId, Currency,
    DomainError, EndReason, JobEndReason, JobId, LeaseAction, LeaseId, LeaseState, LeaseUnit, LedgerAccount, Money, NodeId, PageRequest, RemoteLeaseId,
    RequestId, SecretHash, Timestamp, Transaction,
};

use super::command::{Command, Envelope};
use super::event::Event;
use super::model::{Account, AuthCode, Card, Cluster, EnrollmentToken, Job, Lease, LeaseAccount, Node, RemoteLease, SchedulerLease, ServiceEvaluation};

mod agents;
pub mod archive;
mod authority;
pub mod format_v3;
pub mod format_v4;
pub mod format_v5;
pub mod index;
pub mod jobs;
pub mod ledger;
mod remote;
pub mod upgrade;

/// Limits that are part of the replicated rules (changing them is a format change).
pub mod rules {
    /// A Class A lease waits this long for approval and verification.
    pub const RESERVATION_SECONDS_CLASS_A: i64 = 24 * 3600;
    /// A Class B lease waits this long for the agent to provision it.
    pub const RESERVATION_SECONDS_CLASS_B: i64 = 15 * 60;
    pub const AUTH_CODE_ATTEMPTS: u32 = 5;
    /// How long a request ID is remembered for at-most-once application...
    pub const REQUEST_ID_RETENTION_SECONDS: i64 = 24 * 3600;
    /// ...and never fewer than this many of the latest requests, whatever the clock says: a
    /// leader's clock that jumps a day ahead does not empty the at-most-once memory.
    pub const REQUESTS_REMEMBERED_AT_LEAST: usize = 10_000;
    pub const MAX_SSH_KEYS_PER_ACCOUNT: usize = 32;
    pub const MAX_NODES_PER_CLUSTER: usize = 1024;
    pub const MAX_PERIODS_PER_REQUEST: u32 = suanli_types::lease::MAX_PERIODS_PER_REQUEST;
    /// Largest encoded command the broker accepts.
    pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
    /// Revoked SSH certificates one lease may list (they are short-lived anyway).
    pub const MAX_REVOKED_CERTIFICATES: usize = 256;
    /// Leases one researcher may have waiting (requested or approved, not yet active) at once:
    /// requesting and abandoning leases costs the researcher nothing but grows the state.
    pub const MAX_WAITING_LEASES_PER_RESEARCHER: usize = 64;
    /// Leases of other members' cards one researcher may hold at once (format 5).
    pub const MAX_LIVE_REMOTE_LEASES_PER_RESEARCHER: usize = 64;
    /// An enrollment token lives at most this long.
    pub const ENROLLMENT_TOKEN_MAX_SECONDS: i64 = 7 * 24 * 3600;
    /// Records one `ArchiveEnded` command moves out of the hot state at most (a bounded
    /// entry, a bounded pause of readers).
    pub const MAX_ARCHIVED_PER_COMMAND: usize = 1000;
    /// Ledger lines stay hot at least this long, whatever the configured retention: the daily
    /// deposit cap sums the last day of the hot ledger.
    pub const LEDGER_HOT_SECONDS: i64 = 2 * 24 * 3600;
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Empty,
    Account(AccountId),
    Node(Box<Node>),
    Cluster(Box<Cluster>),
    Card(Box<Card>),
    Lease(Box<Lease>),
    Job(Box<Job>),
    /// One result per placement or stop, in order.
    Placements(Vec<Result<(), DomainError>>),
    SchedulerLease(SchedulerLease),
    Transaction(Box<Transaction>),
    // Appended (format 5): remembered outcomes name variants by position.
    RemoteLease(Box<RemoteLease>),
    /// A `Batch`'s outcomes, one per request in it, in order (format 7; never remembered).
    Batch(Vec<Outcome>),
}

pub type Outcome = Result<Response, DomainError>;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    digest: [u8; 32],
    at: Timestamp,
    outcome: Outcome,
}

/// The whole replicated state. Serialized as a whole for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    accounts: BTreeMap<AccountId, Account>,
    accounts_by_token: BTreeMap<SecretHash, AccountId>,
    nodes: BTreeMap<NodeId, Node>,
    cards: BTreeMap<CardId, Card>,
    clusters: BTreeMap<ClusterId, Cluster>,
    leases: BTreeMap<LeaseId, Lease>,
    /// Live leases only, for the reaper.
    live_leases: BTreeMap<LeaseId, ()>,
    requests: BTreeMap<(Caller, RequestId), Remembered>,
    requests_by_age: VecDeque<(Timestamp, Caller, RequestId)>,
    next_id: u64,
    enrollment_tokens: BTreeMap<SecretHash, EnrollmentToken>,
    nodes_by_credential: BTreeMap<SecretHash, NodeId>,
    /// Raft node IDs of removed broker nodes: never admitted again.
    retired_broker_nodes: BTreeSet<u64>,
    jobs: BTreeMap<JobId, Job>,
    queued_jobs: BTreeSet<JobId>,
    live_jobs_by_owner: BTreeMap<AccountId, BTreeSet<JobId>>,
    /// Which live jobs' current attempts hold each card.
    card_jobs: BTreeMap<CardId, BTreeSet<JobId>>,
    scheduler_lease: SchedulerLease,
    balances: BTreeMap<(LedgerAccount, Currency), i64>,
    credit_limits: BTreeMap<(AccountId, Currency), i64>,
    /// The hot ledger; a transaction's ID is its position plus one plus `ledger_archived`.
    transactions: Vec<Transaction>,
    transactions_by_holder: BTreeMap<AccountId, Vec<u64>>,
    lease_accounts: BTreeMap<LeaseId, LeaseAccount>,
    evaluations: BTreeMap<LeaseId, ServiceEvaluation>,
    evaluations_by_supplier: BTreeMap<AccountId, Vec<LeaseId>>,
    /// Ledger lines moved to the archive (format 4): the hot ledger's first line has this
    /// ID plus one.
    ledger_archived: u64,
    /// Leases of other federation members' cards this member's researchers asked for (format
    /// 5; appended last, so a format-4 state reads as this one with none).
    remote_leases: BTreeMap<RemoteLeaseId, RemoteLease>,
    /// The store format every node of the cluster reads (format 6; see `upgrade.rs`). Must
    /// stay the last field: format 5's bytes are format 6's without it.
    cluster_format: upgrade::ClusterFormat,
    /// Records the last commands moved out of the hot state, until the storage layer takes
    /// them (`take_archived`); never part of a snapshot.
    #[serde(skip)]
    archived: Vec<archive::Archived>,
    /// Derived from the fields above (`index.rs`); never part of a snapshot.
    #[serde(skip)]
    index: index::Indexes,
}

/// A cluster as the catalogue shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSummary<'a> {
    pub cluster: &'a Cluster,
    pub total_cards: u32,
    pub idle_cards: u32,
}

impl State {
    pub fn new() -> Self {
        State { next_id: 1, ..Default::default() }
    }

    /// Applies one command. Retrying the same request ID from the same caller returns the
    /// first outcome without applying anything; reusing it for a different command is refused.
    pub fn apply(&mut self, envelope: &Envelope) -> (Outcome, Vec<Event>) {
        self.ensure_indexes();
        if let Command::Batch { envelopes } = &envelope.command {
            return self.apply_batch(&envelope.caller, envelopes);
        }
        let at = self.command_time(envelope.at);
        self.forget_old_requests(at);
        let digest = digest(&envelope.command);
        let key = (envelope.caller.clone(), envelope.request_id.clone());
        if let Some(seen) = self.requests.get(&key) {
            return if seen.digest == digest { (seen.outcome.clone(), Vec::new()) } else { (Err(DomainError::RequestIdConflict), Vec::new()) };
        }
        let mut events = Vec::new();
        let outcome = self.dispatch(envelope, at, &mut events);
        self.requests.insert(key.clone(), Remembered { digest, at, outcome: outcome.clone() });
        self.requests_by_age.push_back((at, key.0, key.1));
        (outcome, events)
    }

    /// A batch's requests, each applied as an entry of its own would be. The batch leaves no
    /// trace of its own: its request ID is the proposer's, and the requests in it are what is
    /// remembered, so a client's retry finds its first answer whether it came in a batch or not.
    fn apply_batch(&mut self, caller: &Caller, envelopes: &[Envelope]) -> (Outcome, Vec<Event>) {
        let batch = Command::Batch { envelopes: Vec::new() };
        if let Err(refused) = self.authorize(caller, &batch) {
            return (Err(refused), Vec::new());
        }
        let mut events = Vec::new();
        let outcomes = envelopes
            .iter()
            .map(|inner| {
                if matches!(inner.command, Command::Batch { .. }) {
                    return Err(DomainError::invalid("command", "a batch holds no batch"));
                }
                let (outcome, inner_events) = self.apply(inner);
                events.extend(inner_events);
                outcome
            })
            .collect();
        (Ok(Response::Batch(outcomes)), events)
    }

    /// Whether a request with this ID from this caller is remembered (a retry gets its first
    /// answer).
    pub fn remembers(&self, caller: &Caller, request_id: &str) -> bool {
        RequestId::parse(request_id).is_ok_and(|id| self.requests.contains_key(&(caller.clone(), id)))
    }

    /// The time a command proposed at `proposed` is applied at: never before the command
    /// applied last, so the replicated clock never runs backwards, whichever node's clock
    /// proposed it (a new leader's may be behind the old one's).
    pub fn command_time(&self, proposed: Timestamp) -> Timestamp {
        self.requests_by_age.back().map_or(proposed, |(last, _, _)| proposed.max(*last))
    }

    fn forget_old_requests(&mut self, now: Timestamp) {
        while let Some((at, _, _)) = self.requests_by_age.front() {
            let few = self.requests_by_age.len() <= rules::REQUESTS_REMEMBERED_AT_LEAST;
            if few || now.seconds_since(*at) < rules::REQUEST_ID_RETENTION_SECONDS {
                break;
            }
            if let Some((_, caller, request)) = self.requests_by_age.pop_front() {
                self.requests.remove(&(caller, request));
            }
        }
    }

    fn dispatch(&mut self, env: &Envelope, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        let caller = &env.caller;
        // Who may send it is settled first, the same way the broker settles it before proposing
        // (`authority.rs`); the arms below act for a caller already allowed.
        self.authorize(caller, &env.command)?;
        match &env.command {
            Command::RegisterAccount { kind, token_hash } => {
                if self.accounts_by_token.contains_key(token_hash) {
                    return Err(DomainError::AlreadyExists { kind: EntityKind::Account, id: "token".into() });
                }
                let id = AccountId(self.next());
                self.accounts.insert(id, Account { id, kind: *kind, token_hash: *token_hash, ssh_keys: Vec::new(), registered_at: at });
                self.accounts_by_token.insert(*token_hash, id);
                events.push(Event::AccountRegistered { account: id, kind: *kind });
                Ok(Response::Account(id))
            }
            Command::AddSshKey { account, key } => {
                let acc = self.accounts.get_mut(account).ok_or(DomainError::not_found(EntityKind::Account, account))?;
                if acc.ssh_keys.contains(key) {
                    return Err(DomainError::AlreadyExists { kind: EntityKind::SshKey, id: key.as_str().into() });
                }
                if acc.ssh_keys.len() >= rules::MAX_SSH_KEYS_PER_ACCOUNT {
                    return Err(DomainError::invalid("ssh_public_key", format!("at most {} keys per account", rules::MAX_SSH_KEYS_PER_ACCOUNT)));
                }
                acc.ssh_keys.push(key.clone());
                events.push(Event::SshKeyAdded { account: *account });
                Ok(Response::Empty)
            }
            Command::RemoveSshKey { account, key } => {
                let acc = self.accounts.get_mut(account).ok_or(DomainError::not_found(EntityKind::Account, account))?;
                let before = acc.ssh_keys.len();
                acc.ssh_keys.retain(|k| k != key);
                if acc.ssh_keys.len() == before {
                    return Err(DomainError::not_found(EntityKind::SshKey, key.as_str()));
                }
                events.push(Event::SshKeyRemoved { account: *account });
                Ok(Response::Empty)
            }
            Command::RotateAccountToken { account, token_hash } => {
                if self.accounts_by_token.contains_key(token_hash) {
                    return Err(DomainError::AlreadyExists { kind: EntityKind::Account, id: "token".into() });
                }
                let acc = self.accounts.get_mut(account).ok_or(DomainError::not_found(EntityKind::Account, account))?;
                let old = std::mem::replace(&mut acc.token_hash, *token_hash);
                self.accounts_by_token.remove(&old);
                self.accounts_by_token.insert(*token_hash, *account);
                events.push(Event::AccountTokenRotated { account: *account });
                Ok(Response::Empty)
            }
            Command::EnrollNode { inventory } => {
                let supplier = self.account_of_kind(caller, AccountKind::Supplier)?;
                let node = self.add_node(supplier, inventory, at, events);
                Ok(Response::Node(Box::new(self.nodes[&node].clone())))
            }
            Command::IssueEnrollmentToken { token_hash, expires_at } => self.issue_enrollment_token(caller, *token_hash, *expires_at, at),
            Command::EnrollAgent { token_hash, credential_hash, inventory } => self.enroll_agent(token_hash, credential_hash, inventory, at, events),
            Command::RevokeAgent { node } => self.revoke_agent(*node, events),
            Command::SetNodeAccess { node, access } => self.set_node_access(*node, access),
            Command::SetCardHealth { changes } => self.set_card_health(changes, at, events),
            Command::PublishCluster { class, nodes, listing } => {
                let supplier = self.account_of_kind(caller, AccountKind::Supplier)?;
                if nodes.is_empty() || nodes.len() > rules::MAX_NODES_PER_CLUSTER {
                    return Err(DomainError::invalid("nodes", format!("between 1 and {} enrolled nodes", rules::MAX_NODES_PER_CLUSTER)));
                }
                let mut seen = std::collections::BTreeSet::new();
                for node_id in nodes {
                    if !seen.insert(*node_id) {
                        return Err(DomainError::invalid("nodes", format!("{node_id} is listed twice")));
                    }
                    let node = self.nodes.get(node_id).ok_or(DomainError::not_found(EntityKind::Node, node_id))?;
                    if node.supplier != supplier {
                        return Err(DomainError::PermissionDenied(format!("{node_id} belongs to another supplier")));
                    }
                    if let Some(cluster) = node.cluster {
                        return Err(DomainError::NodeInUse { node: *node_id, cluster });
                    }
                    if node.cards.is_empty() {
                        return Err(DomainError::invalid("nodes", format!("{node_id} has no GPU cards")));
                    }
                }
                let id = ClusterId(self.next());
                let cluster = Cluster {
                    id,
                    cpc: CpcId::for_cluster(id),
                    supplier,
                    class: *class,
                    nodes: nodes.clone(),
                    listing: listing.clone(),
                    state: ClusterState::Listed,
                    published_at: at,
                    modified_at: at,
                    revision: 1,
                };
                for node_id in nodes {
                    if let Some(node) = self.nodes.get_mut(node_id) {
                        node.cluster = Some(id);
                    }
                }
                self.clusters.insert(id, cluster.clone());
                self.recount_cluster(id);
                self.reindex_offers(id, &[]);
                events.push(Event::ClusterPublished { cluster: id, cpc: cluster.cpc.clone() });
                Ok(Response::Cluster(Box::new(cluster)))
            }
            Command::ModifyCluster { cluster, listing } => {
                let before = self.offered(*cluster);
                let c = self.clusters.get_mut(cluster).ok_or(DomainError::not_found(EntityKind::Cluster, cluster))?;
                if c.state == ClusterState::Delisted {
                    return Err(DomainError::ClusterDelisted(*cluster));
                }
                c.listing = listing.clone();
                c.modified_at = at;
                c.revision += 1;
                events.push(Event::ClusterModified { cluster: *cluster, revision: c.revision });
                let modified = c.clone();
                self.reindex_offers(*cluster, &before);
                Ok(Response::Cluster(Box::new(modified)))
            }
            Command::DelistCluster { cluster } => {
                let before = self.offered(*cluster);
                let c = self.clusters.get_mut(cluster).ok_or(DomainError::not_found(EntityKind::Cluster, cluster))?;
                if c.state == ClusterState::Delisted {
                    return Err(DomainError::ClusterDelisted(*cluster));
                }
                c.state = ClusterState::Delisted;
                c.modified_at = at;
                events.push(Event::ClusterDelisted { cluster: *cluster });
                let delisted = c.clone();
                self.reindex_offers(*cluster, &before);
                Ok(Response::Cluster(Box::new(delisted)))
            }
            Command::SetCardStatus { card, status } => {
                let c = self.cards.get(card).ok_or(DomainError::not_found(EntityKind::Card, card))?;
                if c.lease.is_some() {
                    return Err(DomainError::CardUnavailable { card: *card, status: c.status });
                }
                if *status == CardStatus::Idle && c.health != CardHealth::Healthy {
                    return Err(DomainError::invalid("status", format!("the card is {}; it returns to idle when monitoring sees it healthy", c.health)));
                }
                self.set_card(*card, *status, None, events);
                Ok(Response::Card(Box::new(self.cards[card].clone())))
            }
            Command::RequestLease { cluster, unit, billing_mode, periods } => {
                let researcher = self.account_of_kind(caller, AccountKind::Researcher)?;
                self.request_lease(researcher, *cluster, unit, *billing_mode, *periods, None, at, events)
            }
            Command::ApproveLease { lease, code_hash, code_expires_at } => {
                let l = self.lease_of_supplier(caller, *lease)?;
                self.transition_check(l, LeaseAction::Approve)?;
                if *code_expires_at <= at || *code_expires_at > l.reserved_until {
                    return Err(DomainError::invalid("code_expires_at", "must be in the future and within the lease's reservation"));
                }
                let from = l.state;
                let l = self.leases.get_mut(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                l.auth_code = Some(AuthCode { hash: *code_hash, expires_at: *code_expires_at, attempts_left: rules::AUTH_CODE_ATTEMPTS });
                l.state = LeaseState::Approved;
                if from != LeaseState::Approved {
                    events.push(Event::LeaseStateChanged { lease: *lease, from: Some(from), to: l.state, reason: None });
                }
                Ok(Response::Lease(Box::new(l.clone())))
            }
            Command::VerifyAuthCode { lease, candidate_hash } => {
                let l = self.lease_of_researcher(caller, *lease)?;
                self.transition_check(l, LeaseAction::Verify)?;
                let Some(code) = l.auth_code.clone() else {
                    return Err(DomainError::InvalidTransition { lease: *lease, state: l.state, action: LeaseAction::Verify });
                };
                if at >= code.expires_at {
                    return Err(DomainError::AuthCodeExpired);
                }
                if !code.hash.matches(candidate_hash) {
                    let attempts_left = code.attempts_left.saturating_sub(1);
                    if attempts_left == 0 {
                        self.finish_lease(*lease, LeaseState::Cancelled, EndReason::AuthCodeAttemptsExhausted, at, events);
                        return Err(DomainError::AuthCodeAttemptsExhausted);
                    }
                    if let Some(AuthCode { attempts_left: left, .. }) = self.leases.get_mut(lease).and_then(|l| l.auth_code.as_mut()) {
                        *left = attempts_left;
                    }
                    events.push(Event::AuthCodeRejected { lease: *lease, attempts_left });
                    return Err(DomainError::AuthCodeMismatch { attempts_left });
                }
                self.activate(*lease, at, events)
            }
            Command::ActivateLease { lease } => {
                let l = self.leases.get(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                self.transition_check(l, LeaseAction::Activate)?;
                // An agent speaks for its own node: the lease starts once every node holding
                // its cards has provisioned them. The supplier speaks for all of them.
                if let Caller::Agent(node) = caller {
                    let nodes: BTreeSet<NodeId> = l.cards.iter().filter_map(|c| self.cards.get(c)).map(|c| c.node).collect();
                    let l = self.leases.get_mut(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                    l.provisioned.insert(*node);
                    if !nodes.is_subset(&l.provisioned) {
                        return Ok(Response::Lease(Box::new(l.clone())));
                    }
                }
                self.activate(*lease, at, events)
            }
            Command::ExtendLease { lease, periods } => {
                let l = self.lease_of_researcher(caller, *lease)?;
                self.transition_check(l, LeaseAction::Extend)?;
                let added = l.price_per_card.minor as i128 * l.cards.len() as i128 * *periods as i128;
                let amount = i64::try_from(l.amount.minor as i128 + added).map_err(|_| DomainError::invalid("periods", "the total price is out of range"))?;
                let total_periods = l.periods.checked_add(*periods).filter(|p| *p <= rules::MAX_PERIODS_PER_REQUEST * 10);
                let Some(total_periods) = total_periods else {
                    return Err(DomainError::invalid("periods", "the lease would run too long"));
                };
                let extra = l.billing_mode.period_seconds() * *periods as i64;
                let (researcher, currency, added_minor) = (l.researcher, l.price_per_card.currency.clone(), amount - l.amount.minor);
                self.check_funds(researcher, &currency, added_minor)?;
                self.hold(*lease, researcher, &currency, added_minor, at, events);
                let l = self.leases.get_mut(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                l.periods = total_periods;
                l.amount.minor = amount;
                let paid_until = l.paid_until.unwrap_or(at).plus_seconds(extra);
                l.paid_until = Some(paid_until);
                events.push(Event::LeaseExtended { lease: *lease, periods: total_periods, paid_until });
                Ok(Response::Lease(Box::new(l.clone())))
            }
            Command::SetLeasePassword { lease, password_hash } => {
                let l = self.lease_of_researcher(caller, *lease)?;
                if !l.state.is_live() {
                    return Err(DomainError::invalid("lease_id", "the lease is over: passwords are for live leases"));
                }
                let l = self.leases.get_mut(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                l.password_hash = Some(*password_hash);
                Ok(Response::Lease(Box::new(l.clone())))
            }
            Command::RevokeSshCertificate { lease, serial } => {
                let l = self.leases.get(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                if l.revoked_certificates.len() >= rules::MAX_REVOKED_CERTIFICATES {
                    return Err(DomainError::invalid("serial", "too many revoked certificates on this lease"));
                }
                let l = self.leases.get_mut(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                l.revoked_certificates.insert(*serial);
                Ok(Response::Lease(Box::new(l.clone())))
            }
            Command::EndLease { lease, reason } => {
                let l = self.leases.get(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                self.transition_check(l, LeaseAction::End)?;
                let to = if l.state == LeaseState::Active { LeaseState::Ended } else { LeaseState::Cancelled };
                self.finish_lease(*lease, to, *reason, at, events);
                Ok(Response::Lease(Box::new(self.leases[lease].clone())))
            }
            Command::RetireBrokerNode { node } => {
                self.retired_broker_nodes.insert(*node);
                Ok(Response::Empty)
            }
            Command::SubmitJob { spec } => self.submit_job(caller, spec, at, events),
            Command::CancelJob { job } => self.cancel_job(*job, at, events),
            Command::AcquireSchedulerLease { holder, ttl_ms } => self.acquire_scheduler_lease(holder, *ttl_ms, at, events),
            Command::PlaceJobs { epoch, placements } => self.place_jobs(*epoch, placements, at, events),
            Command::StopJobs { epoch, stops } => self.stop_jobs(*epoch, stops, at, events),
            Command::JobStarted { job, attempt } => self.job_started(caller, *job, *attempt, at, events),
            Command::JobEnded { job, attempt, reason, outputs } => self.job_ended(caller, *job, *attempt, reason, outputs, at, events),
            Command::JobCheckpoint { job, attempt, sha256 } => self.job_checkpoint(caller, *job, *attempt, sha256),
            Command::AutoLease { epoch, job } => self.auto_lease(*epoch, *job, at, events),
            Command::JobProgress { job, attempt, progress } => self.job_progress(caller, *job, *attempt, progress, at),
            Command::Deposit { account, amount } => self.deposit(*account, amount, at, events),
            Command::GrantCredit { account, limit } => self.grant_credit(*account, limit),
            Command::SettleLeases { leases } => self.settle_leases(leases, at, events),
            Command::ArchiveEnded { ended_before } => self.archive_ended(*ended_before, at).map(|()| Response::Empty),
            Command::RequestRemoteLease { researcher, member, member_name, remote_cluster, cards, billing_mode, periods, price_per_card } => {
                let request = remote::Request {
                    researcher: *researcher,
                    member,
                    member_name,
                    remote_cluster: *remote_cluster,
                    cards: *cards,
                    billing_mode: *billing_mode,
                    periods: *periods,
                    price_per_card,
                };
                self.request_remote_lease(request, at, events)
            }
            Command::ConfirmRemoteLease { remote, remote_lease } => self.confirm_remote_lease(*remote, *remote_lease, events),
            Command::RaiseClusterFormat { to } => Ok(self.raise_cluster_format(*to)),
            // `apply` takes a batch apart before it gets here.
            Command::Batch { .. } => Err(DomainError::invalid("command", "a batch holds no batch")),
            Command::EndRemoteLease { remote, charged_minor } => self.end_remote_lease(*remote, *charged_minor, at, events),
            Command::ExpireLease { lease } => {
                let l = self.leases.get(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                self.transition_check(l, LeaseAction::Expire)?;
                let (due, to, reason) = match l.state {
                    LeaseState::Active => (l.paid_until.unwrap_or(at), LeaseState::Expired, EndReason::TermElapsed),
                    _ => (l.reserved_until, LeaseState::Cancelled, EndReason::ReservationTimedOut),
                };
                if at < due {
                    return Err(DomainError::NotYetDue);
                }
                self.finish_lease(*lease, to, reason, at, events);
                Ok(Response::Lease(Box::new(self.leases[lease].clone())))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn request_lease(
        &mut self,
        researcher: AccountId,
        cluster_id: ClusterId,
        unit: &LeaseUnit,
        billing_mode: suanli_types::BillingMode,
        periods: u32,
        auto: Option<(JobId, Vec<CardId>)>,
        at: Timestamp,
        events: &mut Vec<Event>,
    ) -> Outcome {
        check_periods(periods)?;
        if self.waiting_leases(researcher) >= rules::MAX_WAITING_LEASES_PER_RESEARCHER {
            return Err(DomainError::invalid(
                "cluster_id",
                format!("at most {} leases may wait for approval or provisioning at once", rules::MAX_WAITING_LEASES_PER_RESEARCHER),
            ));
        }
        let cluster = self.clusters.get(&cluster_id).ok_or(DomainError::not_found(EntityKind::Cluster, cluster_id))?;
        if cluster.state == ClusterState::Delisted {
            return Err(DomainError::ClusterDelisted(cluster_id));
        }
        if !unit.fits(cluster.class) {
            return Err(DomainError::invalid(
                "unit",
                match cluster.class {
                    ClusterClass::A => "a Class A lease takes whole nodes",
                    ClusterClass::B => "a Class B lease takes a number of cards",
                },
            ));
        }
        let price = cluster.listing.prices.price(billing_mode)?;
        let (auto_for, cards) = match auto {
            Some((job, cards)) => (Some(job), cards),
            None => (None, self.pick_cards(cluster, unit)?),
        };
        let count = cards.len() as u32;
        let amount = cluster.listing.prices.quote(billing_mode, count, periods)?;
        let (class, supplier, currency) = (cluster.class, cluster.supplier, cluster.listing.prices.currency.clone());
        let reservation = match class {
            ClusterClass::A => rules::RESERVATION_SECONDS_CLASS_A,
            ClusterClass::B => rules::RESERVATION_SECONDS_CLASS_B,
        };
        self.check_funds(researcher, &currency, amount.minor)?;
        let id = LeaseId(self.next());
        let lease = Lease {
            id,
            cluster: cluster_id,
            class,
            researcher,
            supplier,
            unit: unit.clone(),
            cards: cards.clone(),
            billing_mode,
            periods,
            price_per_card: Money::new(currency, price),
            amount,
            state: LeaseState::Requested,
            requested_at: at,
            reserved_until: at.plus_seconds(reservation),
            auth_code: None,
            password_hash: None,
            revoked_certificates: BTreeSet::new(),
            activated_at: None,
            paid_until: None,
            ended_at: None,
            end_reason: None,
            provisioned: BTreeSet::new(),
            auto_for,
        };
        for card_id in &cards {
            self.set_card(*card_id, CardStatus::Reserved, Some(id), events);
        }
        self.leases.insert(id, lease.clone());
        self.live_leases.insert(id, ());
        self.note_lease_requested(researcher, id, auto_for);
        events.push(Event::LeaseStateChanged { lease: id, from: None, to: LeaseState::Requested, reason: None });
        self.hold(id, researcher, &lease.price_per_card.currency, lease.amount.minor, at, events);
        Ok(Response::Lease(Box::new(lease)))
    }

    /// Chooses the cards a lease takes. Class A: every card of each named node, all idle.
    /// Class B: `n` idle cards, preferring the node that fits them most tightly so whole nodes
    /// stay free for larger requests.
    fn pick_cards(&self, cluster: &Cluster, unit: &LeaseUnit) -> Result<Vec<CardId>, DomainError> {
        match unit {
            LeaseUnit::Nodes(nodes) => {
                if nodes.is_empty() {
                    return Err(DomainError::invalid("unit.nodes", "name at least one node"));
                }
                let mut seen = std::collections::BTreeSet::new();
                let mut cards = Vec::new();
                for node_id in nodes {
                    if !seen.insert(*node_id) {
                        return Err(DomainError::invalid("unit.nodes", format!("{node_id} is listed twice")));
                    }
                    if !cluster.nodes.contains(node_id) {
                        return Err(DomainError::NodeNotInCluster { node: *node_id, cluster: cluster.id });
                    }
                    let node = self.nodes.get(node_id).ok_or(DomainError::not_found(EntityKind::Node, node_id))?;
                    for card_id in &node.cards {
                        let card = self.cards.get(card_id).ok_or(DomainError::not_found(EntityKind::Card, card_id))?;
                        if card.status != CardStatus::Idle || card.lease.is_some() {
                            return Err(DomainError::CardUnavailable { card: *card_id, status: card.status });
                        }
                        cards.push(*card_id);
                    }
                }
                Ok(cards)
            }
            LeaseUnit::Cards(n) => {
                let n = *n as usize;
                if n == 0 {
                    return Err(DomainError::invalid("unit.cards", "lease at least one card"));
                }
                let mut idle_by_node: Vec<Vec<CardId>> = cluster
                    .nodes
                    .iter()
                    .filter_map(|node_id| self.nodes.get(node_id))
                    .map(|node| node.cards.iter().copied().filter(|c| self.is_idle(*c)).collect())
                    .collect();
                let available: usize = idle_by_node.iter().map(Vec::len).sum();
                if available < n {
                    return Err(DomainError::InsufficientCapacity { cluster: cluster.id, requested: n as u32, available: available as u32 });
                }
                if let Some(best) = idle_by_node.iter().filter(|idle| idle.len() >= n).min_by_key(|idle| idle.len()) {
                    return Ok(best[..n].to_vec());
                }
                // No single node fits: spread over the fullest nodes first (stable sort keeps
                // node order among equals, so every replica picks the same cards).
                idle_by_node.sort_by_key(|idle| std::cmp::Reverse(idle.len()));
                Ok(idle_by_node.into_iter().flatten().take(n).collect())
            }
        }
    }

    fn is_idle(&self, card: CardId) -> bool {
        self.cards.get(&card).is_some_and(|c| c.status == CardStatus::Idle && c.lease.is_none())
    }

    fn activate(&mut self, lease: LeaseId, at: Timestamp, events: &mut Vec<Event>) -> Outcome {
        let l = self.leases.get_mut(&lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
        let from = l.state;
        l.state = LeaseState::Active;
        l.auth_code = None;
        l.activated_at = Some(at);
        l.paid_until = Some(at.plus_seconds(l.billing_mode.period_seconds() * l.periods as i64));
        let (cards, researcher) = (l.cards.clone(), l.researcher);
        if from != LeaseState::Active {
            self.note_lease_activated(researcher);
        }
        events.push(Event::LeaseStateChanged { lease, from: Some(from), to: LeaseState::Active, reason: None });
        for card in cards {
            self.set_card(card, CardStatus::Busy, Some(lease), events);
        }
        self.open_lease_account(lease, at);
        Ok(Response::Lease(Box::new(self.leases[&lease].clone())))
    }

    fn finish_lease(&mut self, lease: LeaseId, to: LeaseState, reason: EndReason, at: Timestamp, events: &mut Vec<Event>) {
        let Some(l) = self.leases.get_mut(&lease) else { return };
        let from = l.state;
        l.state = to;
        l.ended_at = Some(at);
        l.end_reason = Some(reason);
        l.auth_code = None;
        let (cards, researcher, auto_for) = (l.cards.clone(), l.researcher, l.auto_for);
        if self.live_leases.remove(&lease).is_some() {
            self.note_lease_ended(researcher, from, auto_for);
        }
        events.push(Event::LeaseStateChanged { lease, from: Some(from), to, reason: Some(reason) });
        self.close_lease_account(lease, from == LeaseState::Active, at, events);
        for card in &cards {
            self.evict_jobs_from(*card, JobEndReason::LeaseEnded, at, events);
        }
        for card in cards {
            let released = self.cards.get(&card).map_or(CardStatus::Idle, |c| c.health.idle_status());
            self.set_card(card, released, None, events);
        }
    }

    fn set_card(&mut self, card: CardId, to: CardStatus, lease: Option<LeaseId>, events: &mut Vec<Event>) {
        let was_idle = self.is_idle(card);
        if let Some(c) = self.cards.get_mut(&card) {
            let from = c.status;
            c.status = to;
            c.lease = lease;
            if from != to {
                events.push(Event::CardStatusChanged { card, from, to, lease });
            }
        }
        self.note_idle_change(card, was_idle, self.is_idle(card));
    }

    fn transition_check(&self, l: &Lease, action: LeaseAction) -> Result<(), DomainError> {
        match l.state.after(action, l.class) {
            Some(_) => Ok(()),
            None => Err(DomainError::InvalidTransition { lease: l.id, state: l.state, action }),
        }
    }

    fn next(&mut self) -> u64 {
        let id = self.next_id.max(1);
        self.next_id = id + 1;
        id
    }

    fn account_of_kind(&self, caller: &Caller, kind: AccountKind) -> Result<AccountId, DomainError> {
        let Caller::Account(id) = caller else {
            return Err(DomainError::PermissionDenied(format!("{caller} is not a {kind} account")));
        };
        let account = self.accounts.get(id).ok_or(DomainError::Unauthenticated(format!("unknown account {id}")))?;
        if account.kind != kind {
            return Err(DomainError::WrongAccountKind(*id, kind));
        }
        Ok(*id)
    }

    /// The cluster if `caller` owns it (or, when `operators_too`, is an intervening operator).
    /// Strangers get `NOT_FOUND`, never a hint that the cluster exists.
    fn owned_cluster(&self, caller: &Caller, id: ClusterId, operators_too: bool) -> Result<&Cluster, DomainError> {
        let c = self.clusters.get(&id).ok_or(DomainError::not_found(EntityKind::Cluster, id))?;
        match caller {
            Caller::Account(acc) if *acc == c.supplier => Ok(c),
            Caller::Operator(role) if operators_too && role.may_intervene() => Ok(c),
            Caller::Account(_) => Err(DomainError::PermissionDenied(format!("{id} belongs to another supplier"))),
            _ => Err(DomainError::PermissionDenied(format!("{caller} may not change {id}"))),
        }
    }

    fn lease_of_supplier(&self, caller: &Caller, id: LeaseId) -> Result<&Lease, DomainError> {
        let l = self.leases.get(&id).ok_or(DomainError::not_found(EntityKind::Lease, id))?;
        match caller {
            Caller::Account(acc) if *acc == l.supplier => Ok(l),
            Caller::Account(acc) if *acc == l.researcher => Err(DomainError::PermissionDenied("only the supplier may do this".into())),
            _ => Err(DomainError::not_found(EntityKind::Lease, id)),
        }
    }

    fn lease_of_researcher(&self, caller: &Caller, id: LeaseId) -> Result<&Lease, DomainError> {
        let l = self.leases.get(&id).ok_or(DomainError::not_found(EntityKind::Lease, id))?;
        match caller {
            Caller::Account(acc) if *acc == l.researcher => Ok(l),
            Caller::Account(acc) if *acc == l.supplier => Err(DomainError::PermissionDenied("only the lessee may do this".into())),
            _ => Err(DomainError::not_found(EntityKind::Lease, id)),
        }
    }

    // ---- reads -------------------------------------------------------------------------------

    pub fn broker_node_retired(&self, node: u64) -> bool {
        self.retired_broker_nodes.contains(&node)
    }

    pub fn account_by_token(&self, token_hash: &SecretHash) -> Option<&Account> {
        self.accounts_by_token.get(token_hash).and_then(|id| self.accounts.get(id))
    }

    /// The node whose agent holds this credential.
    /// Whether an enrollment token with this hash was issued (used or not): only its holder
    /// may ask to enroll (and retry an enrollment) with it.
    pub fn enrollment_token_issued(&self, token_hash: &SecretHash) -> bool {
        self.enrollment_tokens.contains_key(token_hash)
    }

    pub fn node_by_agent_credential(&self, credential_hash: &SecretHash) -> Option<NodeId> {
        self.nodes_by_credential.get(credential_hash).copied()
    }

    pub fn account(&self, id: AccountId) -> Option<&Account> {
        self.accounts.get(&id)
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    pub fn card(&self, id: CardId) -> Option<&Card> {
        self.cards.get(&id)
    }

    pub fn cluster(&self, id: ClusterId) -> Option<&Cluster> {
        self.clusters.get(&id)
    }

    /// The next ID the state will hand out: every lease, job and account has a lower one.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    pub fn lease(&self, id: LeaseId) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub fn clusters(&self) -> impl Iterator<Item = &Cluster> {
        self.clusters.values()
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Leases with IDs after `after`, in ID order (a page's start).
    pub fn leases_after(&self, after: u64) -> impl Iterator<Item = &Lease> {
        self.leases.range(LeaseId(after.saturating_add(1))..).map(|(_, l)| l)
    }

    /// Nodes with IDs after `after`, in ID order.
    pub fn nodes_after(&self, after: u64) -> impl Iterator<Item = &Node> {
        self.nodes.range(NodeId(after.saturating_add(1))..).map(|(_, n)| n)
    }

    pub fn cards(&self) -> impl Iterator<Item = &Card> {
        self.cards.values()
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn cards_of_cluster(&self, id: ClusterId) -> Vec<&Card> {
        let Some(cluster) = self.clusters.get(&id) else { return Vec::new() };
        cluster.nodes.iter().filter_map(|n| self.nodes.get(n)).flat_map(|n| n.cards.iter().filter_map(|c| self.cards.get(c))).collect()
    }

    pub fn summary<'a>(&'a self, cluster: &'a Cluster) -> ClusterSummary<'a> {
        let counts = self.card_counts(cluster.id);
        ClusterSummary { cluster, total_cards: counts.total, idle_cards: counts.idle }
    }

    /// One page of the catalogue, ordered by cluster ID; the second value is the cursor for the
    /// next page, if there is one.
    pub fn catalogue(&self, filter: &CatalogueFilter, page: &PageRequest) -> Result<(Vec<ClusterSummary<'_>>, Option<ClusterId>), DomainError> {
        filter.validate()?;
        let limit = page.effective_limit()?;
        let start = page.after.map(|a| ClusterId(a.0.saturating_add(1))).unwrap_or(ClusterId(0));
        let mut out = Vec::with_capacity(limit.min(64));
        let mut more = false;
        for cluster in self.clusters.range(start..).map(|(_, c)| c) {
            // The listing first (as if every card were idle): most clusters fail a search
            // there, without their card counts being looked up.
            let facts = |idle_cards| CatalogueFacts { class: cluster.class, state: cluster.state, listing: &cluster.listing, idle_cards };
            if !filter.matches(&facts(u32::MAX)) {
                continue;
            }
            let summary = self.summary(cluster);
            if !filter.matches(&facts(summary.idle_cards)) {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(summary);
        }
        let next = if more { out.last().map(|s| s.cluster.id) } else { None };
        Ok((out, next))
    }

    /// Leases in which `account` is the researcher or the supplier.
    pub fn leases_of(&self, account: AccountId) -> impl Iterator<Item = &Lease> {
        self.leases.values().filter(move |l| l.researcher == account || l.supplier == account)
    }

    /// Live leases whose reservation or paid term is over at `now`: the reaper's work list.
    pub fn due_for_expiry(&self, now: Timestamp) -> Vec<LeaseId> {
        self.live_leases
            .keys()
            .filter_map(|id| self.leases.get(id))
            .filter(|l| match l.state {
                LeaseState::Active => l.paid_until.is_some_and(|p| now >= p),
                _ => now >= l.reserved_until,
            })
            .map(|l| l.id)
            .collect()
    }

    /// The state without the request-ID memory, for comparing what a command changed.
    #[cfg(all(test, feature = "server"))]
    pub(crate) fn market(&self) -> State {
        State { requests: BTreeMap::new(), requests_by_age: VecDeque::new(), ..self.clone() }
    }

    /// The invariants every reachable state keeps. Used by tests and by a debug check after
    /// snapshot installation; returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut holder: BTreeMap<CardId, LeaseId> = BTreeMap::new();
        for lease in self.leases.values() {
            if lease.state.is_live() != self.live_leases.contains_key(&lease.id) {
                return Err(format!("{} live index out of step", lease.id));
            }
            if !lease.state.is_live() {
                continue;
            }
            for card in &lease.cards {
                if let Some(other) = holder.insert(*card, lease.id) {
                    return Err(format!("{card} is in two live leases: {other} and {}", lease.id));
                }
                let c = self.cards.get(card).ok_or(format!("{} holds unknown {card}", lease.id))?;
                let want = if lease.state == LeaseState::Active { CardStatus::Busy } else { CardStatus::Reserved };
                if c.lease != Some(lease.id) || c.status != want {
                    return Err(format!("{card} is {} for {:?}, expected {want} for {}", c.status, c.lease, lease.id));
                }
            }
        }
        for card in self.cards.values() {
            if card.lease.is_some() != holder.contains_key(&card.id) {
                return Err(format!("{} points at a lease that does not hold it", card.id));
            }
            if card.lease.is_none() && matches!(card.status, CardStatus::Reserved | CardStatus::Busy) {
                return Err(format!("{} is {} without a lease", card.id, card.status));
            }
            if card.status == CardStatus::Idle && card.health != CardHealth::Healthy {
                return Err(format!("{} is idle (in the market) while {}", card.id, card.health));
            }
        }
        for (credential, node) in &self.nodes_by_credential {
            if self.nodes.get(node).and_then(|n| n.agent_credential.as_ref()) != Some(credential) {
                return Err(format!("credential index points at {node}, which holds another credential"));
            }
        }
        self.check_index_invariants()?;
        self.check_job_invariants()?;
        self.check_ledger_invariants()?;
        self.check_remote_lease_invariants()
    }
}

fn require(ok: bool, why: &str) -> Result<(), DomainError> {
    if ok {
        Ok(())
    } else {
        Err(DomainError::PermissionDenied(why.to_owned()))
    }
}

fn check_periods(periods: u32) -> Result<(), DomainError> {
    suanli_types::lease::check_periods(periods)
}

pub(super) fn digest(command: &Command) -> [u8; 32] {
    // postcard of a closed enum is a canonical encoding of the command.
    let bytes = postcard::to_allocvec(&command.identity()).unwrap_or_default();
    Sha256::digest(&bytes).into()
}
