//! Who may send which command. [`State::authorize`] is the first thing applying a command does,
//! and the broker asks it before proposing one ([`State::precheck`]): a command its caller may
//! not send, or that is malformed, is refused without entering the log, so no account, agent
//! or enrollee can fill the replicated log with refusals. Read-only, and the same answer either
//! way: a refusal here is exactly the refusal applying the command would have given.

use suanli_types::error::EntityKind;
use suanli_types::{AccountKind, Caller, DomainError, EndReason, LeaseAction, RequestId};

use super::{check_periods, require, State};
use crate::state::command::Command;

impl State {
    /// Whether a command would be refused before it changed anything: `Err` with the refusal
    /// applying it would give. A retry of a request this state remembers passes (its first
    /// answer comes from the log); the same request ID with another command does not.
    pub fn precheck(&self, caller: &Caller, request_id: &RequestId, command: &Command) -> Result<(), DomainError> {
        let remembered = self.requests.get(&(caller.clone(), request_id.clone()));
        if remembered.is_some_and(|r| r.digest == super::digest(command)) {
            return Ok(());
        }
        self.authorize(caller, command)
    }

    /// The caller may send this command about what it names, and the command is well formed.
    /// What it then does may still be refused (a transition, funds, capacity).
    pub(super) fn authorize(&self, caller: &Caller, command: &Command) -> Result<(), DomainError> {
        let platform = matches!(caller, Caller::Platform);
        let system = matches!(caller, Caller::System);
        let intervening = matches!(caller, Caller::Operator(role) if role.may_intervene());
        match command {
            Command::RegisterAccount { .. } => require(platform, "only the platform registers accounts"),
            Command::AddSshKey { account, .. } => require(platform || *caller == Caller::Account(*account), "only the account itself adds its keys"),
            Command::RemoveSshKey { account, .. } => require(platform || *caller == Caller::Account(*account), "only the account itself removes its keys"),
            Command::RotateAccountToken { account, .. } => {
                require(platform || *caller == Caller::Account(*account), "only the account itself, or the platform, replaces its token")
            }
            Command::EnrollNode { inventory } => {
                self.account_of_kind(caller, AccountKind::Supplier)?;
                inventory.validate()
            }
            Command::IssueEnrollmentToken { .. } => self.account_of_kind(caller, AccountKind::Supplier).map(drop),
            // `System`: entries written before enrollees had request IDs of their own.
            Command::EnrollAgent { token_hash, .. } => require(*caller == Caller::Enrollee(*token_hash) || system, "agents enroll through the enrollment API"),
            Command::RevokeAgent { node } => {
                let n = self.nodes.get(node).ok_or(DomainError::not_found(EntityKind::Node, node))?;
                let allowed = platform || intervening || *caller == Caller::Account(n.supplier);
                // Strangers are not told the node exists.
                if allowed {
                    Ok(())
                } else {
                    Err(DomainError::not_found(EntityKind::Node, node))
                }
            }
            Command::SetNodeAccess { node, .. } => {
                // The node's own agent says where its access gateway listens.
                let known = self.nodes.contains_key(node);
                if known && *caller == Caller::Agent(*node) {
                    Ok(())
                } else {
                    Err(DomainError::not_found(EntityKind::Node, node))
                }
            }
            Command::SetCardHealth { .. } => require(system, "card health is set by the broker's monitoring"),
            Command::PublishCluster { class, listing, .. } => {
                self.account_of_kind(caller, AccountKind::Supplier)?;
                listing.validate(*class)
            }
            Command::ModifyCluster { cluster, listing } => {
                let c = self.owned_cluster(caller, *cluster, false)?;
                listing.validate(c.class)
            }
            Command::DelistCluster { cluster } => self.owned_cluster(caller, *cluster, true).map(drop),
            Command::SetCardStatus { card, status } => {
                let c = self.cards.get(card).ok_or(DomainError::not_found(EntityKind::Card, card))?;
                let node = self.nodes.get(&c.node).ok_or(DomainError::not_found(EntityKind::Node, c.node))?;
                let allowed = match caller {
                    Caller::Account(id) => *id == node.supplier,
                    Caller::Agent(n) => *n == node.id,
                    _ => intervening,
                };
                require(allowed, "only the card's supplier, its agent or an operator sets its status")?;
                if status.settable_by_supplier() {
                    Ok(())
                } else {
                    Err(DomainError::invalid("status", "reserved and busy are set by leases only"))
                }
            }
            Command::RequestLease { periods, .. } => {
                self.account_of_kind(caller, AccountKind::Researcher)?;
                check_periods(*periods)
            }
            Command::ApproveLease { lease, .. } => self.lease_of_supplier(caller, *lease).map(drop),
            Command::VerifyAuthCode { lease, .. } | Command::SetLeasePassword { lease, .. } => self.lease_of_researcher(caller, *lease).map(drop),
            Command::ExtendLease { lease, periods } => {
                let l = self.lease_of_researcher(caller, *lease)?;
                self.transition_check(l, LeaseAction::Extend)?;
                check_periods(*periods)
            }
            Command::ActivateLease { lease } => {
                let l = self.leases.get(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                let allowed = match caller {
                    Caller::Account(id) => *id == l.supplier,
                    Caller::Agent(node) => l.cards.iter().any(|c| self.cards.get(c).is_some_and(|c| c.node == *node)),
                    _ => false,
                };
                require(allowed, "only the supplier or its agent confirms provisioning")
            }
            Command::RevokeSshCertificate { lease, .. } => {
                let l = self.leases.get(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                if matches!(caller, Caller::Account(id) if *id == l.researcher || *id == l.supplier) {
                    Ok(())
                } else {
                    Err(DomainError::not_found(EntityKind::Lease, lease))
                }
            }
            Command::EndLease { lease, reason } => {
                let l = self.leases.get(lease).ok_or(DomainError::not_found(EntityKind::Lease, lease))?;
                let allowed = match (caller, reason) {
                    (Caller::Account(id), EndReason::ByResearcher) => *id == l.researcher,
                    (Caller::Account(id), EndReason::BySupplier(_)) => *id == l.supplier,
                    (Caller::Operator(_), EndReason::ByOperator) => intervening,
                    // The scheduler releases what it leased for a job, on the researcher's behalf.
                    (Caller::Platform, EndReason::ByResearcher) => l.auto_for.is_some(),
                    _ => false,
                };
                match caller {
                    _ if allowed => Ok(()),
                    // A stranger learns nothing about someone else's lease.
                    Caller::Account(id) if *id != l.researcher && *id != l.supplier => Err(DomainError::not_found(EntityKind::Lease, lease)),
                    _ => Err(DomainError::PermissionDenied(format!("{caller} may not end {lease} as {reason:?}"))),
                }
            }
            Command::ExpireLease { .. } => require(system, "only the broker's reaper expires leases"),
            Command::RetireBrokerNode { .. } => require(platform, "only the platform administers broker nodes"),
            Command::SubmitJob { spec } => {
                self.account_of_kind(caller, AccountKind::Researcher)?;
                spec.validate()
            }
            Command::CancelJob { job } => {
                let j = self.jobs.get(job).ok_or(DomainError::not_found(EntityKind::Job, job))?;
                if intervening || *caller == Caller::Account(j.owner) {
                    Ok(())
                } else {
                    Err(DomainError::not_found(EntityKind::Job, job))
                }
            }
            Command::AcquireSchedulerLease { .. } => require(platform, "only the platform's scheduler takes the leader lease"),
            Command::PlaceJobs { .. } | Command::StopJobs { .. } | Command::AutoLease { .. } => require(platform, "only the platform's scheduler places jobs"),
            Command::JobStarted { job, attempt } => self.reporting_attempt(caller, *job, *attempt, "start").map(drop),
            Command::JobEnded { job, attempt, .. } => self.reporting_attempt(caller, *job, *attempt, "end").map(drop),
            Command::JobCheckpoint { job, attempt, .. } => self.reporting_attempt(caller, *job, *attempt, "checkpoint").map(drop),
            Command::JobProgress { job, attempt, .. } => self.reporting_attempt(caller, *job, *attempt, "report progress of").map(drop),
            Command::Deposit { .. } => require(platform, "only the platform's payment service records deposits"),
            Command::GrantCredit { .. } => require(platform || intervening, "only the platform or an operator grants credit"),
            Command::SettleLeases { .. } => require(system, "only the broker's leader settles leases"),
            Command::ArchiveEnded { .. } => require(system, "only the broker's leader archives"),
            Command::RaiseClusterFormat { .. } => require(system, "only the broker's leader raises the cluster format"),
            Command::Batch { .. } => require(system, "only the broker's leader batches requests"),
            Command::RequestRemoteLease { member, member_name, cards, periods, price_per_card, .. } => {
                require(platform, "only the platform's federation gateway leases other members' cards")?;
                super::remote::validate(member, member_name, *cards, *periods, price_per_card)
            }
            Command::ConfirmRemoteLease { .. } | Command::EndRemoteLease { .. } => {
                require(platform, "only the platform's federation gateway records other members' answers")
            }
        }
    }
}
