//! The entities the broker keeps. Plain data: the rules live in `machine.rs`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use suanli_types::{
    AccountId, AccountKind, BillingMode, CardHealth, CardId, CardSpec, CardStatus, ClusterClass, ClusterId, ClusterState, CpcId, EndReason, JobEndReason,
    JobId, JobSpec, JobState, LeaseId, LeaseState, LeaseUnit, Listing, Money, NodeId, NodeInventory, SecretHash, SshPublicKey, Timestamp,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub kind: AccountKind,
    pub token_hash: SecretHash,
    pub ssh_keys: Vec<SshPublicKey>,
    pub registered_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub supplier: AccountId,
    pub inventory: NodeInventory,
    /// In inventory order.
    pub cards: Vec<CardId>,
    pub cluster: Option<ClusterId>,
    pub enrolled_at: Timestamp,
    /// Hash of the credential the node's agent authenticates with; `None` when no agent is
    /// enrolled (a node enrolled by hand) or its agent was revoked.
    pub agent_credential: Option<SecretHash>,
    /// Where researchers log in to this node's leases, as its agent last reported.
    pub access: Option<suanli_types::NodeAccess>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub id: CardId,
    pub node: NodeId,
    pub spec: CardSpec,
    pub status: CardStatus,
    /// The live lease holding this card; `Some` exactly when `status` is reserved or busy.
    pub lease: Option<LeaseId>,
    pub health: CardHealth,
}

/// A one-time token a supplier hands to an agent it installs; stored only as a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub supplier: AccountId,
    pub expires_at: Timestamp,
    /// The node that enrolled with it: a token works once.
    pub used_by: Option<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub id: ClusterId,
    pub cpc: CpcId,
    pub supplier: AccountId,
    pub class: ClusterClass,
    pub nodes: Vec<NodeId>,
    pub listing: Listing,
    pub state: ClusterState,
    pub published_at: Timestamp,
    pub modified_at: Timestamp,
    /// Bumped by every modification, so clients can tell which listing a lease was made on.
    pub revision: u64,
}

/// A Class A authorization code, stored only as a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthCode {
    pub hash: SecretHash,
    pub expires_at: Timestamp,
    pub attempts_left: u32,
}

/// A lease is also the task record of SPEC §3/§4 Itm: cluster, user and billing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub cluster: ClusterId,
    pub class: ClusterClass,
    pub researcher: AccountId,
    pub supplier: AccountId,
    pub unit: LeaseUnit,
    pub cards: Vec<CardId>,
    pub billing_mode: BillingMode,
    /// Periods bought so far (request plus extensions).
    pub periods: u32,
    /// Price per card per period, fixed when the lease was requested.
    pub price_per_card: Money,
    /// What the periods bought so far cost: price × cards × periods, exact.
    pub amount: Money,
    pub state: LeaseState,
    pub requested_at: Timestamp,
    /// A lease not active by then is cancelled by the reaper.
    pub reserved_until: Timestamp,
    pub auth_code: Option<AuthCode>,
    /// Hash of the lease password the researcher last had set (`lease_password_domain`); the
    /// node agents check logins against it.
    pub password_hash: Option<SecretHash>,
    /// SSH certificates for this lease withdrawn before their expiry.
    pub revoked_certificates: std::collections::BTreeSet<u64>,
    pub activated_at: Option<Timestamp>,
    /// Set at activation: activation + periods × period length.
    pub paid_until: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub end_reason: Option<EndReason>,
    /// Class B: the nodes whose agents have confirmed provisioning so far.
    pub provisioned: std::collections::BTreeSet<NodeId>,
    /// Leased by the scheduler for this job (the researcher opted in with `auto_lease`); the
    /// scheduler may end it once it is idle.
    pub auto_for: Option<JobId>,
}

/// One try at running a job: where it was placed and how it ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first placement; every placement gets the next number, so an agent's report
    /// about an attempt that was superseded is recognisable and refused.
    pub number: u32,
    pub cards: Vec<CardId>,
    /// The lease each placed card belonged to at placement (same order as `cards`).
    pub leases: Vec<LeaseId>,
    pub placed_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub end_reason: Option<JobEndReason>,
    /// What this attempt cost: the card-seconds it ran at each card's lease price, rounded
    /// once per attempt, half up.
    pub cost_minor: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub owner: AccountId,
    pub spec: JobSpec,
    pub state: JobState,
    pub submitted_at: Timestamp,
    /// Attempts that failed because of the job itself (they count against `max_attempts`).
    pub failures: u32,
    /// Every placement, oldest first; the last is current while the job holds cards.
    pub attempts: Vec<Attempt>,
    /// Set when the platform wants a running attempt stopped (preemption, a card lost, the
    /// lease ended, a cancel): the node's agent kills it and reports the end.
    pub stop_requested: Option<JobEndReason>,
    /// Content hash of the last checkpoint an attempt uploaded: the next attempt resumes it.
    pub checkpoint: Option<String>,
    /// Content hashes of the outputs the successful attempt uploaded, by name.
    pub outputs: BTreeMap<String, String>,
    pub ended_at: Option<Timestamp>,
    pub end_reason: Option<JobEndReason>,
    /// Card-milliseconds of service received so far (ended attempts): least-attained-service
    /// scheduling orders by it.
    pub attained_card_ms: u64,
    /// Sum of the attempts' costs.
    pub cost_minor: i64,
    /// The current attempt's latest progress line and when it was relayed.
    pub progress: Option<(String, Timestamp)>,
}

impl Job {
    pub fn current(&self) -> Option<&Attempt> {
        self.attempts.last().filter(|_| self.state.holds_cards())
    }
}

/// The scheduler replica allowed to act, until `expires_at`. `epoch` grows with every change
/// of holder: a command carrying an older epoch comes from a replica that lost the lease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerLease {
    pub holder: String,
    pub epoch: u64,
    pub expires_at: Timestamp,
}

/// A lease's money: the hold it took and how much of it has been charged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAccount {
    /// Total held from the researcher for this lease (request and extensions).
    pub held_minor: i64,
    /// Total charged so far (supplier earnings plus fee).
    pub charged_minor: i64,
    pub fee_minor: i64,
    /// The instant up to which usage was charged.
    pub settled_until: Option<Timestamp>,
    /// Card-milliseconds cards of this lease spent unhealthy while it was active: not charged.
    pub down_card_ms: u64,
    /// Cards of this lease unhealthy right now, since when.
    pub down_since: BTreeMap<CardId, Timestamp>,
    /// Cards that dropped off at least once during the lease.
    pub cards_dropped: BTreeSet<CardId>,
    /// Card-milliseconds jobs ran on this lease's cards (ended attempts).
    pub job_card_ms: u64,
}

/// SPEC §3: how a Class B lease went, computed when it ends (formula in `machine/ledger.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEvaluation {
    pub lease: LeaseId,
    pub supplier: AccountId,
    /// Healthy card-time over all card-time of the active period, in basis points.
    pub uptime_bps: u32,
    pub cards_dropped: u32,
    /// Card-time jobs ran over all card-time, in basis points.
    pub utilization_bps: u32,
    /// 0–100, from the three above.
    pub score: u32,
    pub at: Timestamp,
}

/// A lease of another federation member's cards, as this (the requesting) member records it
/// (format 5). This member holds its researcher's money; the owning member decides and keeps
/// the lease itself in its own Raft group, and reports what it charged when the lease ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLease {
    pub id: suanli_types::RemoteLeaseId,
    pub researcher: AccountId,
    /// The owning member: its peer ID (base58) and its name in the federation's membership.
    pub member: String,
    pub member_name: String,
    /// The owner's cluster, and the owner's lease once it leased the cards.
    pub remote_cluster: u64,
    pub remote_lease: Option<u64>,
    pub cards: u32,
    pub billing_mode: BillingMode,
    pub periods: u32,
    /// The owner's announced price per card per period, and what was held: price × cards ×
    /// periods, exact.
    pub price_per_card: Money,
    pub held: Money,
    pub state: suanli_types::RemoteLeaseState,
    pub requested_at: Timestamp,
    pub ended_at: Option<Timestamp>,
    /// What the owner charged (at most `held`); the rest went back to the researcher.
    pub charged_minor: i64,
}
