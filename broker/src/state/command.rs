//! The closed set of commands the replicated log carries.
//!
//! Every command travels in an [`Envelope`] that names its authenticated caller, the client's
//! request ID (applied at most once per caller) and the time the leader accepted it, so that
//! `apply` never reads a clock and every replica computes the same state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use suanli_types::{
    AccountId, AccountKind, BillingMode, Caller, CardHealth, CardId, CardStatus, ClusterClass, ClusterId, EndReason, JobEndReason, JobId, JobSpec, LeaseId,
    LeaseUnit, Listing, Money, NodeAccess, NodeId, NodeInventory, RemoteLeaseId, RequestId, SecretHash, SshPublicKey, Timestamp,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub caller: Caller,
    pub request_id: RequestId,
    /// Leader's wall clock when it accepted the command, in milliseconds.
    pub at: Timestamp,
    pub command: Command,
}

/// Secrets never appear here in plain text: tokens and authorization codes arrive already
/// hashed by the service layer (`SecretHash`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Platform only. `token_hash` is the hash of the API token the service handed out.
    RegisterAccount {
        kind: AccountKind,
        token_hash: SecretHash,
    },
    /// The account itself, or the platform on its behalf.
    AddSshKey {
        account: AccountId,
        key: SshPublicKey,
    },
    /// A supplier enrolls a server it owns.
    EnrollNode {
        inventory: NodeInventory,
    },
    /// A supplier mints a one-time enrollment token for an agent (hashed by the service).
    IssueEnrollmentToken {
        token_hash: SecretHash,
        expires_at: Timestamp,
    },
    /// An agent enrolls with a supplier's token; the token is its only authority (the caller
    /// is `Enrollee(token_hash)`; `System` in entries written before enrollees had one). `credential_hash` is the hash of a secret the agent drew itself, so a
    /// retried enrollment is the same command. A node of the same supplier that shares a card
    /// UUID or the hostname is a reinstall: it keeps its IDs and history.
    EnrollAgent {
        token_hash: SecretHash,
        credential_hash: SecretHash,
        inventory: NodeInventory,
    },
    /// The supplier or an operator withdraws a node's agent credential.
    RevokeAgent {
        node: NodeId,
    },
    /// The node's own agent reports its access gateway (validated by the service).
    SetNodeAccess {
        node: NodeId,
        access: NodeAccess,
    },
    /// System only: what the leader's health monitor concluded from telemetry and silence.
    SetCardHealth {
        changes: Vec<(CardId, CardHealth)>,
    },
    PublishCluster {
        class: ClusterClass,
        nodes: Vec<NodeId>,
        listing: Listing,
    },
    ModifyCluster {
        cluster: ClusterId,
        listing: Listing,
    },
    DelistCluster {
        cluster: ClusterId,
    },
    SetCardStatus {
        card: CardId,
        status: CardStatus,
    },
    RequestLease {
        cluster: ClusterId,
        unit: LeaseUnit,
        billing_mode: BillingMode,
        periods: u32,
    },
    /// Class A: the supplier approves and issues an authorization code (hashed here), valid
    /// until `code_expires_at`.
    ApproveLease {
        lease: LeaseId,
        code_hash: SecretHash,
        code_expires_at: Timestamp,
    },
    /// Class A: the lessee presents a code (hashed by the service).
    VerifyAuthCode {
        lease: LeaseId,
        candidate_hash: SecretHash,
    },
    /// Class B: the supplier's agent confirms the cards are provisioned.
    ActivateLease {
        lease: LeaseId,
    },
    ExtendLease {
        lease: LeaseId,
        periods: u32,
    },
    /// The lessee has a new lease password drawn (hashed by the service).
    SetLeasePassword {
        lease: LeaseId,
        password_hash: SecretHash,
    },
    /// The lessee or the supplier withdraws one of the lease's SSH certificates.
    RevokeSshCertificate {
        lease: LeaseId,
        serial: u64,
    },
    EndLease {
        lease: LeaseId,
        reason: EndReason,
    },
    /// System only: the reservation or paid term is over (checked against `Envelope::at`).
    ExpireLease {
        lease: LeaseId,
    },
    /// Platform only: a broker node was removed from the Raft group; its ID is never reused.
    RetireBrokerNode {
        node: u64,
    },

    // ---- jobs ------------------------------------------------------------------------------
    /// A researcher submits a job for its own leased cards.
    SubmitJob {
        spec: JobSpec,
    },
    /// The owner (or an intervening operator) cancels a job; a running attempt is stopped.
    CancelJob {
        job: JobId,
    },
    /// Platform (a scheduler replica): take or renew the leader lease. Granted when it is free,
    /// expired or already `holder`'s.
    AcquireSchedulerLease {
        holder: String,
        ttl_ms: u32,
    },
    /// The acting scheduler commits a round's placements; each is checked on its own, so one
    /// refused placement does not hold up the rest.
    PlaceJobs {
        epoch: u64,
        placements: Vec<(JobId, Vec<CardId>)>,
    },
    /// The acting scheduler stops jobs holding cards: a placed attempt goes back to the queue at
    /// once; a running one is asked to stop, except `NodeLost`, whose agent cannot answer.
    StopJobs {
        epoch: u64,
        stops: Vec<(JobId, JobEndReason)>,
    },
    /// A placed node's agent started the attempt.
    JobStarted {
        job: JobId,
        attempt: u32,
    },
    /// The node's agent saw the attempt end; `outputs` are the content hashes it uploaded.
    JobEnded {
        job: JobId,
        attempt: u32,
        reason: JobEndReason,
        outputs: BTreeMap<String, String>,
    },
    /// The running attempt uploaded a checkpoint; the next attempt resumes from it.
    JobCheckpoint {
        job: JobId,
        attempt: u32,
        sha256: String,
    },
    /// The running attempt's latest progress line (a JSON object the job printed), relayed by
    /// its agent at most every few seconds.
    JobProgress {
        job: JobId,
        attempt: u32,
        progress: String,
    },
    /// The acting scheduler leases cards for a queued job that opted in: the cheapest Class B
    /// cards the job accepts, in its region, one period within its budget, as its owner.
    AutoLease {
        epoch: u64,
        job: JobId,
    },

    // ---- money -----------------------------------------------------------------------------
    /// Platform only: money paid in for a researcher (the payment service confirmed it).
    Deposit {
        account: AccountId,
        amount: Money,
    },
    /// Platform or an intervening operator: how far below zero a researcher's available
    /// balance may go.
    GrantCredit {
        account: AccountId,
        limit: Money,
    },
    /// System only (the leader, periodically): charge these active leases' use up to
    /// `Envelope::at`. Batched, so metering costs one log entry per round, not one per second.
    SettleLeases {
        leases: Vec<LeaseId>,
    },

    // ---- appended: encoded commands name variants by position, so new ones go last --------
    /// The account itself, or the platform on its behalf: a registered SSH key is withdrawn
    /// (its leases' nodes stop accepting it at their next sync).
    RemoveSshKey {
        account: AccountId,
        key: SshPublicKey,
    },
    /// The account itself, or the platform on its behalf (a deregistration, a leaked token):
    /// the account's API token is replaced by the one hashed here and the old one stops working
    /// at once.
    RotateAccountToken {
        account: AccountId,
        token_hash: SecretHash,
    },
    /// System only (the leader, periodically, format 4): move what ended before `ended_before`
    /// out of the hot state into the archive (`state::machine::archive`).
    ArchiveEnded {
        ended_before: Timestamp,
    },
    /// The platform's federation gateway (format 5), for a researcher it authenticated: hold
    /// price × cards × periods of their money for a lease of another member's cards, before
    /// asking that member. The request ID is the researcher's idempotency key, so a retried
    /// request holds once and gets the same remote lease.
    RequestRemoteLease {
        researcher: AccountId,
        member: String,
        member_name: String,
        remote_cluster: u64,
        cards: u32,
        billing_mode: BillingMode,
        periods: u32,
        price_per_card: Money,
    },
    /// The federation gateway: the owning member leased the cards as its lease `remote_lease`.
    ConfirmRemoteLease {
        remote: RemoteLeaseId,
        remote_lease: u64,
    },
    /// The federation gateway: the remote lease is over (the owner ended it, or refused the
    /// request: nothing charged); `charged_minor` of the hold goes to the federation payable,
    /// the rest back to the researcher.
    EndRemoteLease {
        remote: RemoteLeaseId,
        charged_minor: i64,
    },
    /// System only (the leader, format 6), once every node of the cluster has said it runs a
    /// broker of store format `to` or later: from this entry on, the cluster writes format
    /// `to` (`state::machine::upgrade`). Never lowers it.
    ///
    /// Rule for the formats to come (format 7 added `Batch`): a command added by a
    /// later format is proposed only once the cluster format has reached that format, since
    /// nodes still running the format before could not decode it. This one is the exception:
    /// the leader proposes it only after every member said it runs `to`.
    RaiseClusterFormat {
        to: u32,
    },
    /// System only (the leader's proposer, format 7): requests that arrived together, in one log
    /// entry and so one disk sync per node (`service::batcher`). Each is applied in order
    /// exactly as if it were an entry of its own (its own caller, request ID, at-most-once
    /// memory and time) and answered with its own outcome; the batch itself is remembered by no
    /// one and nests no batch.
    Batch {
        envelopes: Vec<Envelope>,
    },
}

impl Command {
    /// The store format that added this command. The rule for the formats to come is here, in
    /// code: a cluster below that format is never sent the command (`Shared::propose` refuses
    /// it), since nodes still running the format before could not decode it. A new variant
    /// must be named here with the format that adds it.
    pub fn introduced_in(&self) -> u32 {
        use crate::state::machine::upgrade::FIRST_CLUSTER_FORMAT;
        use Command::*;
        match self {
            // Formats 3 to 5: every node a cluster can hold reads them (clusters start at 5).
            RegisterAccount { .. }
            | AddSshKey { .. }
            | EnrollNode { .. }
            | IssueEnrollmentToken { .. }
            | EnrollAgent { .. }
            | RevokeAgent { .. }
            | SetNodeAccess { .. }
            | SetCardHealth { .. }
            | PublishCluster { .. }
            | ModifyCluster { .. }
            | DelistCluster { .. }
            | SetCardStatus { .. }
            | RequestLease { .. }
            | ApproveLease { .. }
            | VerifyAuthCode { .. }
            | ActivateLease { .. }
            | ExtendLease { .. }
            | SetLeasePassword { .. }
            | RevokeSshCertificate { .. }
            | EndLease { .. }
            | ExpireLease { .. }
            | RetireBrokerNode { .. }
            | SubmitJob { .. }
            | CancelJob { .. }
            | AcquireSchedulerLease { .. }
            | PlaceJobs { .. }
            | StopJobs { .. }
            | JobStarted { .. }
            | JobEnded { .. }
            | JobCheckpoint { .. }
            | JobProgress { .. }
            | AutoLease { .. }
            | Deposit { .. }
            | GrantCredit { .. }
            | SettleLeases { .. }
            | RemoveSshKey { .. }
            | RotateAccountToken { .. }
            | ArchiveEnded { .. }
            | RequestRemoteLease { .. }
            | ConfirmRemoteLease { .. }
            | EndRemoteLease { .. } => FIRST_CLUSTER_FORMAT,
            RaiseClusterFormat { .. } => 6,
            Batch { .. } => 7,
        }
    }

    /// Whether a cluster at `cluster_format` may be sent this command: `Err` with what it
    /// waits for. `RaiseClusterFormat` is the one exception: the leader proposes it, below its
    /// own format, only once every member said it runs that format.
    pub fn may_propose_at(&self, cluster_format: u32) -> Result<(), String> {
        let needs = self.introduced_in();
        if needs <= cluster_format || matches!(self, Command::RaiseClusterFormat { .. }) {
            return Ok(());
        }
        Err(format!("this request needs store format {needs}; the cluster is at {cluster_format} until every node runs the new version (a rolling upgrade in progress): retry then"))
    }

    /// What identifies a request for at-most-once application: the command without the
    /// values the service mints for it (a new token or authorization code, an expiry computed
    /// from the clock). A client retrying "register me" or "approve lease 7" after a lost
    /// answer sends the same request, though the service drew a fresh secret for the retry.
    pub fn identity(&self) -> Command {
        let mut identity = self.clone();
        match &mut identity {
            Command::RegisterAccount { token_hash, .. } | Command::RotateAccountToken { token_hash, .. } => *token_hash = SecretHash([0; 32]),
            Command::IssueEnrollmentToken { token_hash, expires_at } => {
                *token_hash = SecretHash([0; 32]);
                *expires_at = Timestamp::from_millis(0);
            }
            Command::SetLeasePassword { password_hash, .. } => *password_hash = SecretHash([0; 32]),
            Command::ApproveLease { code_hash, code_expires_at, .. } => {
                *code_hash = SecretHash([0; 32]);
                *code_expires_at = Timestamp::from_millis(0);
            }
            _ => {}
        }
        identity
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::RegisterAccount { .. } => "register_account",
            Command::AddSshKey { .. } => "add_ssh_key",
            Command::EnrollNode { .. } => "enroll_node",
            Command::IssueEnrollmentToken { .. } => "issue_enrollment_token",
            Command::EnrollAgent { .. } => "enroll_agent",
            Command::RevokeAgent { .. } => "revoke_agent",
            Command::SetNodeAccess { .. } => "set_node_access",
            Command::SetCardHealth { .. } => "set_card_health",
            Command::PublishCluster { .. } => "publish_cluster",
            Command::ModifyCluster { .. } => "modify_cluster",
            Command::DelistCluster { .. } => "delist_cluster",
            Command::SetCardStatus { .. } => "set_card_status",
            Command::RequestLease { .. } => "request_lease",
            Command::ApproveLease { .. } => "approve_lease",
            Command::VerifyAuthCode { .. } => "verify_auth_code",
            Command::ActivateLease { .. } => "activate_lease",
            Command::ExtendLease { .. } => "extend_lease",
            Command::SetLeasePassword { .. } => "set_lease_password",
            Command::RevokeSshCertificate { .. } => "revoke_ssh_certificate",
            Command::EndLease { .. } => "end_lease",
            Command::ExpireLease { .. } => "expire_lease",
            Command::RetireBrokerNode { .. } => "retire_broker_node",
            Command::SubmitJob { .. } => "submit_job",
            Command::CancelJob { .. } => "cancel_job",
            Command::AcquireSchedulerLease { .. } => "acquire_scheduler_lease",
            Command::PlaceJobs { .. } => "place_jobs",
            Command::StopJobs { .. } => "stop_jobs",
            Command::JobStarted { .. } => "job_started",
            Command::JobEnded { .. } => "job_ended",
            Command::JobCheckpoint { .. } => "job_checkpoint",
            Command::AutoLease { .. } => "auto_lease",
            Command::JobProgress { .. } => "job_progress",
            Command::Deposit { .. } => "deposit",
            Command::GrantCredit { .. } => "grant_credit",
            Command::SettleLeases { .. } => "settle_leases",
            Command::RemoveSshKey { .. } => "remove_ssh_key",
            Command::RotateAccountToken { .. } => "rotate_account_token",
            Command::ArchiveEnded { .. } => "archive_ended",
            Command::RequestRemoteLease { .. } => "request_remote_lease",
            Command::ConfirmRemoteLease { .. } => "confirm_remote_lease",
            Command::EndRemoteLease { .. } => "end_remote_lease",
            Command::RaiseClusterFormat { .. } => "raise_cluster_format",
            Command::Batch { .. } => "batch",
        }
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;
    use crate::state::machine::upgrade::FIRST_CLUSTER_FORMAT;
    use crate::storage::FORMAT_VERSION;

    #[test]
    fn a_command_is_sent_only_to_a_cluster_that_reads_it_but_the_raise_of_the_format_itself() {
        let old = Command::RevokeAgent { node: suanli_types::NodeId(1) };
        assert_eq!(old.introduced_in(), FIRST_CLUSTER_FORMAT);
        assert!(old.may_propose_at(FIRST_CLUSTER_FORMAT).is_ok());
        // A cluster below what a command needs is refused it, retryably, with what it waits for.
        let refused = old.may_propose_at(FIRST_CLUSTER_FORMAT - 1).expect_err("below its format");
        assert!(refused.contains(&format!("needs store format {FIRST_CLUSTER_FORMAT}")), "{refused}");
        let raise = Command::RaiseClusterFormat { to: FORMAT_VERSION };
        assert_eq!(raise.introduced_in(), 6);
        assert!(raise.may_propose_at(FIRST_CLUSTER_FORMAT).is_ok(), "the leader raises a cluster below its own format");
        assert!(raise.introduced_in() <= FORMAT_VERSION, "no command comes from a format this code does not write");
    }
}
