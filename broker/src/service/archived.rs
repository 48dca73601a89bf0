//! Reads that reach past the hot state into the archive (`storage::archive`): a record is read
//! from the hot state when it is there, from the archive otherwise; ledger lines from the
//! archive only up to what the state counts as archived, leases and jobs only below the
//! state's next ID (a snapshot may carry archive rows written after its own index).
//!
//! The state's lock is held only to copy what is hot; the archive is read after it is
//! released (its rows are immutable and written before the state that no longer holds them
//! is visible), so a long history never holds up applying the log.

use suanli_types::{AccountId, JobId, LeaseId, Month, Transaction};

use crate::state::{Job, Lease, ServiceEvaluation, State};
use crate::storage::{Archive, StateMachineStore, StoreError};

/// The record with ID `id`: hot if the state holds it, else archived if the state has handed
/// the ID out already.
fn hot_else_archived<T>(
    sm: &StateMachineStore,
    id: u64,
    hot: impl FnOnce(&State) -> Option<T>,
    archived: impl FnOnce(&Archive) -> Result<Option<T>, StoreError>,
) -> Result<Option<T>, StoreError> {
    match sm.read(|s| (hot(s), s.next_id())) {
        (Some(record), _) => Ok(Some(record)),
        (None, next_id) if id < next_id => archived(sm.archive()),
        (None, _) => Ok(None),
    }
}

pub fn lease(sm: &StateMachineStore, id: LeaseId) -> Result<Option<Lease>, StoreError> {
    hot_else_archived(sm, id.0, |s| s.lease(id).cloned(), |a| Ok(a.lease(id)?.map(|a| a.lease)))
}

pub fn job(sm: &StateMachineStore, id: JobId) -> Result<Option<Job>, StoreError> {
    hot_else_archived(sm, id.0, |s| s.job(id).cloned(), |a| a.job(id))
}

pub fn evaluation(sm: &StateMachineStore, lease: LeaseId) -> Result<Option<ServiceEvaluation>, StoreError> {
    hot_else_archived(sm, lease.0, |s| s.evaluation(lease).cloned(), |a| a.evaluation(lease))
}

/// The ledger lines touching `holder`'s accounts with IDs after `after`, archived then hot,
/// oldest first, optionally within a month; at most `max` of the archived ones (the hot ones
/// are bounded by the retention).
pub fn transactions_of(sm: &StateMachineStore, holder: AccountId, month: Option<Month>, after: u64, max: usize) -> Result<Vec<Transaction>, StoreError> {
    let (hot, archived) =
        sm.read(|s| (s.transactions_of(holder, month).into_iter().filter(|t| t.id > after).cloned().collect::<Vec<_>>(), s.ledger_archived()));
    let bounds = month.map(Month::bounds);
    let in_month = |tx: &Transaction| bounds.is_none_or(|(start, end)| tx.at >= start && tx.at < end);
    let mut lines = sm.archive().transactions_of(holder, after, archived, in_month, max)?;
    lines.extend(hot);
    Ok(lines)
}

/// The owner's jobs, archived then hot, by ID.
pub fn jobs_of(sm: &StateMachineStore, owner: AccountId) -> Result<Vec<Job>, StoreError> {
    let (hot, next_id) = sm.read(|s| (s.jobs_of(owner).cloned().collect::<Vec<_>>(), s.next_id()));
    let mut jobs: Vec<Job> = sm.archive().jobs_of(owner, next_id)?.into_iter().filter(|j| !hot.iter().any(|h| h.id == j.id)).collect();
    jobs.extend(hot);
    jobs.sort_by_key(|j| j.id);
    Ok(jobs)
}
