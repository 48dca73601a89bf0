//! The state as format 3 stored it, kept to read format-3 snapshots and backups: format 4 added
//! the archive (`ledger_archived`, appended last). A format-3 state has archived nothing.
//!
//! Frozen: this definition changes never (format 4 reads it too, `format_v4.rs`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::Deserialize;
use suanli_types::{AccountId, Caller, CardId, ClusterId, Currency, JobId, LeaseId, LedgerAccount, NodeId, RequestId, SecretHash, Timestamp, Transaction};

use super::{Remembered, State};
use crate::state::model::{Account, Card, Cluster, EnrollmentToken, Job, Lease, LeaseAccount, Node, SchedulerLease, ServiceEvaluation};

/// [`State`] up to format 3: the same fields, in the same order, without `ledger_archived`.
#[derive(Deserialize)]
pub struct StateV3 {
    accounts: BTreeMap<AccountId, Account>,
    accounts_by_token: BTreeMap<SecretHash, AccountId>,
    nodes: BTreeMap<NodeId, Node>,
    cards: BTreeMap<CardId, Card>,
    clusters: BTreeMap<ClusterId, Cluster>,
    leases: BTreeMap<LeaseId, Lease>,
    live_leases: BTreeMap<LeaseId, ()>,
    requests: BTreeMap<(Caller, RequestId), Remembered>,
    requests_by_age: VecDeque<(Timestamp, Caller, RequestId)>,
    next_id: u64,
    enrollment_tokens: BTreeMap<SecretHash, EnrollmentToken>,
    nodes_by_credential: BTreeMap<SecretHash, NodeId>,
    retired_broker_nodes: BTreeSet<u64>,
    jobs: BTreeMap<JobId, Job>,
    queued_jobs: BTreeSet<JobId>,
    live_jobs_by_owner: BTreeMap<AccountId, BTreeSet<JobId>>,
    card_jobs: BTreeMap<CardId, BTreeSet<JobId>>,
    scheduler_lease: SchedulerLease,
    balances: BTreeMap<(LedgerAccount, Currency), i64>,
    credit_limits: BTreeMap<(AccountId, Currency), i64>,
    transactions: Vec<Transaction>,
    transactions_by_holder: BTreeMap<AccountId, Vec<u64>>,
    lease_accounts: BTreeMap<LeaseId, LeaseAccount>,
    evaluations: BTreeMap<LeaseId, ServiceEvaluation>,
    evaluations_by_supplier: BTreeMap<AccountId, Vec<LeaseId>>,
}

impl From<StateV3> for State {
    fn from(v3: StateV3) -> State {
        v3.into_state(0)
    }
}

impl StateV3 {
    /// This state with what later formats appended: `ledger_archived` (format 4; 0 for a
    /// format-3 state), no remote leases (format 5) and the first cluster format (format 6).
    pub(super) fn into_state(self, ledger_archived: u64) -> State {
        let v3 = self;
        State {
            accounts: v3.accounts,
            accounts_by_token: v3.accounts_by_token,
            nodes: v3.nodes,
            cards: v3.cards,
            clusters: v3.clusters,
            leases: v3.leases,
            live_leases: v3.live_leases,
            requests: v3.requests,
            requests_by_age: v3.requests_by_age,
            next_id: v3.next_id,
            enrollment_tokens: v3.enrollment_tokens,
            nodes_by_credential: v3.nodes_by_credential,
            retired_broker_nodes: v3.retired_broker_nodes,
            jobs: v3.jobs,
            queued_jobs: v3.queued_jobs,
            live_jobs_by_owner: v3.live_jobs_by_owner,
            card_jobs: v3.card_jobs,
            scheduler_lease: v3.scheduler_lease,
            balances: v3.balances,
            credit_limits: v3.credit_limits,
            transactions: v3.transactions,
            transactions_by_holder: v3.transactions_by_holder,
            lease_accounts: v3.lease_accounts,
            evaluations: v3.evaluations,
            evaluations_by_supplier: v3.evaluations_by_supplier,
            ledger_archived,
            remote_leases: BTreeMap::new(),
            cluster_format: Default::default(),
            archived: Vec::new(),
            index: Default::default(),
        }
    }
}
