//! What applying a command changed, as a stream clients can watch.

use serde::{Deserialize, Serialize};
use suanli_types::{
    AccountId, AccountKind, CardHealth, CardId, CardStatus, ClusterId, CpcId, EndReason, JobEndReason, JobId, JobState, LeaseId, LeaseState, NodeId,
    RemoteLeaseId, RemoteLeaseState, Timestamp, TransactionKind,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    AccountRegistered {
        account: AccountId,
        kind: AccountKind,
    },
    SshKeyAdded {
        account: AccountId,
    },
    NodeEnrolled {
        node: NodeId,
        supplier: AccountId,
        cards: Vec<CardId>,
    },
    ClusterPublished {
        cluster: ClusterId,
        cpc: CpcId,
    },
    ClusterModified {
        cluster: ClusterId,
        revision: u64,
    },
    ClusterDelisted {
        cluster: ClusterId,
    },
    AgentEnrolled {
        node: NodeId,
        supplier: AccountId,
        reenrolled: bool,
    },
    AgentRevoked {
        node: NodeId,
    },
    CardHealthChanged {
        card: CardId,
        from: CardHealth,
        to: CardHealth,
    },
    CardStatusChanged {
        card: CardId,
        from: CardStatus,
        to: CardStatus,
        lease: Option<LeaseId>,
    },
    LeaseStateChanged {
        lease: LeaseId,
        from: Option<LeaseState>,
        to: LeaseState,
        reason: Option<EndReason>,
    },
    LeaseExtended {
        lease: LeaseId,
        periods: u32,
        paid_until: Timestamp,
    },
    AuthCodeRejected {
        lease: LeaseId,
        attempts_left: u32,
    },
    JobStateChanged {
        job: JobId,
        owner: AccountId,
        from: Option<JobState>,
        to: JobState,
        attempt: u32,
        reason: Option<JobEndReason>,
    },
    /// The platform asked a running attempt to stop; the node's agent acts on it.
    JobStopRequested {
        job: JobId,
        attempt: u32,
        reason: JobEndReason,
    },
    SchedulerLeaseChanged {
        holder: String,
        epoch: u64,
    },
    /// `account`: the researcher whose balance moved, if any.
    Ledger {
        transaction: u64,
        kind: TransactionKind,
        lease: Option<LeaseId>,
        account: Option<AccountId>,
    },
    LeaseEvaluated {
        lease: LeaseId,
        supplier: AccountId,
        score: u32,
    },
    // Appended (events are stored and sent by position, like commands).
    SshKeyRemoved {
        account: AccountId,
    },
    AccountTokenRotated {
        account: AccountId,
    },
    /// A remote lease (format 5) was requested, confirmed by its owner, or ended.
    RemoteLeaseChanged {
        remote: RemoteLeaseId,
        researcher: AccountId,
        state: RemoteLeaseState,
    },
}

/// The events of one applied log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedEvents {
    pub index: u64,
    pub at: Timestamp,
    pub events: Vec<Event>,
}
