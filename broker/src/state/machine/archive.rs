//! Bounded hot state: what has ended long enough ago leaves the replicated in-memory state for
//! the archive (a RocksDB column family on every node, `storage::archive`), where it stays
//! readable by ID and in statements but costs no memory, no snapshot-building time and no
//! scan of the reaper's.
//!
//! The leader proposes [`Command::ArchiveEnded`](crate::state::Command::ArchiveEnded) with a
//! cut-off (`ended_before`) from its configured retention; every replica then moves the same
//! records, because the selection depends only on the state and the command. What moved is
//! handed to the storage layer through [`State::take_archived`], written in the same batch as
//! the entry's events, before the change is visible to readers.
//!
//! What moves, in this order, at most [`rules::MAX_ARCHIVED_PER_COMMAND`] records per command:
//! - ended leases (with their money record) that ended before the cut-off and that no live
//!   job's current attempt still names;
//! - ended jobs that ended before the cut-off;
//! - ledger lines older than the cut-off *and* than [`rules::LEDGER_HOT_SECONDS`] (the daily
//!   deposit cap sums the last day's lines from the hot ledger), oldest first: the ledger's
//!   IDs stay positions, offset by `ledger_archived`;
//! - service evaluations outside a supplier's reliability window (the window stays hot: it is
//!   what the reliability score reads).

use serde::{Deserialize, Serialize};
use suanli_types::{AccountId, DomainError, Timestamp, Transaction};

use super::ledger::RELIABILITY_WINDOW;
use super::{rules, State};
use crate::state::model::{Job, Lease, LeaseAccount, ServiceEvaluation};

/// One record moved out of the hot state: persisted in the archive column family (a declared
/// format: see `storage::archive`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Archived {
    Lease {
        lease: Lease,
        account: Option<LeaseAccount>,
    },
    Job(Job),
    /// A ledger line and the accounts whose statements list it.
    Transaction {
        transaction: Transaction,
        holders: Vec<AccountId>,
    },
    Evaluation(ServiceEvaluation),
}

impl State {
    /// Moves what ended before `ended_before` into the archive (see the module comment).
    pub(super) fn archive_ended(&mut self, ended_before: Timestamp, at: Timestamp) -> Result<(), DomainError> {
        if ended_before > at {
            return Err(DomainError::invalid("ended_before", "must not be after the command's time"));
        }
        let mut budget = rules::MAX_ARCHIVED_PER_COMMAND;
        self.archive_leases(ended_before, &mut budget);
        self.archive_jobs(ended_before, &mut budget);
        let ledger_cutoff = ended_before.min(at.plus_millis(-rules::LEDGER_HOT_SECONDS * 1000));
        self.archive_ledger(ledger_cutoff, &mut budget);
        self.archive_evaluations(ended_before, &mut budget);
        Ok(())
    }

    /// Whether [`Self::archive_ended`] with this cut-off at this time would move anything: the
    /// leader proposes only then.
    pub fn has_archivable(&self, ended_before: Timestamp, at: Timestamp) -> bool {
        let ledger_cutoff = ended_before.min(at.plus_millis(-rules::LEDGER_HOT_SECONDS * 1000));
        self.archivable_leases(ended_before).next().is_some()
            || self.archivable_jobs(ended_before).next().is_some()
            || self.transactions.first().is_some_and(|tx| tx.at < ledger_cutoff)
            || self.archivable_evaluations(ended_before).next().is_some()
    }

    /// The records the last commands moved out, for the storage layer to write (and forget).
    pub fn take_archived(&mut self) -> Vec<Archived> {
        std::mem::take(&mut self.archived)
    }

    /// How many ledger lines (the lowest IDs) live in the archive.
    pub fn ledger_archived(&self) -> u64 {
        self.ledger_archived
    }

    fn archivable_leases(&self, ended_before: Timestamp) -> impl Iterator<Item = &Lease> {
        self.leases.values().filter(move |l| {
            !l.state.is_live()
                && l.ended_at.is_some_and(|e| e < ended_before)
                // A running attempt on a lease that ended waits for its agent to confirm the
                // kill, and still names the lease until then.
                && !l.cards.iter().any(|card| {
                    self.card_jobs.get(card).into_iter().flatten().any(|job| {
                        self.jobs.get(job).and_then(|j| j.current()).is_some_and(|a| a.leases.contains(&l.id))
                    })
                })
        })
    }

    fn archive_leases(&mut self, ended_before: Timestamp, budget: &mut usize) {
        let ids: Vec<_> = self.archivable_leases(ended_before).take(*budget).map(|l| l.id).collect();
        *budget -= ids.len();
        for id in ids {
            if let Some(lease) = self.leases.remove(&id) {
                let account = self.lease_accounts.remove(&id);
                self.archived.push(Archived::Lease { lease, account });
            }
        }
    }

    fn archivable_jobs(&self, ended_before: Timestamp) -> impl Iterator<Item = &Job> {
        self.jobs.values().filter(move |j| !j.state.is_live() && j.ended_at.is_some_and(|e| e < ended_before))
    }

    fn archive_jobs(&mut self, ended_before: Timestamp, budget: &mut usize) {
        let ids: Vec<_> = self.archivable_jobs(ended_before).take(*budget).map(|j| j.id).collect();
        *budget -= ids.len();
        for id in ids {
            if let Some(job) = self.jobs.remove(&id) {
                self.archived.push(Archived::Job(job));
            }
        }
    }

    fn archive_ledger(&mut self, cutoff: Timestamp, budget: &mut usize) {
        let count = self.transactions.iter().take(*budget).take_while(|tx| tx.at < cutoff).count();
        if count == 0 {
            return;
        }
        *budget -= count;
        for transaction in self.transactions.drain(..count) {
            let mut holders: Vec<AccountId> = transaction.entries.iter().filter_map(|e| e.account.holder()).collect();
            holders.sort_unstable();
            holders.dedup();
            self.archived.push(Archived::Transaction { transaction, holders });
        }
        self.ledger_archived += count as u64;
        let first_hot = self.ledger_archived + 1;
        self.transactions_by_holder.retain(|_, ids| {
            let archived = ids.partition_point(|id| *id < first_hot);
            ids.drain(..archived);
            !ids.is_empty()
        });
    }

    fn archivable_evaluations(&self, ended_before: Timestamp) -> impl Iterator<Item = &ServiceEvaluation> {
        self.evaluations_by_supplier.values().flat_map(move |leases| {
            let outside_window = leases.len().saturating_sub(RELIABILITY_WINDOW);
            leases[..outside_window].iter().filter_map(|l| self.evaluations.get(l)).filter(move |e| e.at < ended_before)
        })
    }

    fn archive_evaluations(&mut self, ended_before: Timestamp, budget: &mut usize) {
        let leases: Vec<_> = self.archivable_evaluations(ended_before).take(*budget).map(|e| e.lease).collect();
        *budget -= leases.len();
        for lease in leases {
            if let Some(evaluation) = self.evaluations.remove(&lease) {
                if let Some(list) = self.evaluations_by_supplier.get_mut(&evaluation.supplier) {
                    list.retain(|l| *l != lease);
                }
                self.archived.push(Archived::Evaluation(evaluation));
            }
        }
    }
}
