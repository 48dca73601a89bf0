//! Reads that reach past the hot state into the archive (`storage::archive`): a record is read
//! from the hot state when it is there, from the archive otherwise; ledger lines from the
//! archive only up to what the state counts as archived.

use std::borrow::Cow;

use suanli_types::{AccountId, JobId, LeaseId, Month, Transaction};

use crate::state::{Job, Lease, ServiceEvaluation, State};
use crate::storage::{Archive, StoreError};

pub fn lease<'a>(s: &'a State, archive: &Archive, id: LeaseId) -> Result<Option<Cow<'a, Lease>>, StoreError> {
    match s.lease(id) {
        Some(l) => Ok(Some(Cow::Borrowed(l))),
        None => Ok(archive.lease(id)?.map(|a| Cow::Owned(a.lease))),
    }
}

pub fn job<'a>(s: &'a State, archive: &Archive, id: JobId) -> Result<Option<Cow<'a, Job>>, StoreError> {
    match s.job(id) {
        Some(j) => Ok(Some(Cow::Borrowed(j))),
        None => Ok(archive.job(id)?.map(Cow::Owned)),
    }
}

pub fn evaluation<'a>(s: &'a State, archive: &Archive, lease: LeaseId) -> Result<Option<Cow<'a, ServiceEvaluation>>, StoreError> {
    match s.evaluation(lease) {
        Some(e) => Ok(Some(Cow::Borrowed(e))),
        None => Ok(archive.evaluation(lease)?.map(Cow::Owned)),
    }
}

/// Every ledger line touching `holder`'s accounts, archived then hot, oldest first,
/// optionally within a month.
pub fn transactions_of<'a>(s: &'a State, archive: &Archive, holder: AccountId, month: Option<Month>) -> Result<Vec<Cow<'a, Transaction>>, StoreError> {
    let bounds = month.map(Month::bounds);
    let mut lines: Vec<Cow<'a, Transaction>> = archive
        .transactions_of(holder, s.ledger_archived())?
        .into_iter()
        .filter(|tx| bounds.is_none_or(|(start, end)| tx.at >= start && tx.at < end))
        .map(Cow::Owned)
        .collect();
    lines.extend(s.transactions_of(holder, month).into_iter().map(Cow::Borrowed));
    Ok(lines)
}

/// The owner's jobs, archived then hot.
pub fn jobs_of<'a>(s: &'a State, archive: &Archive, owner: AccountId) -> Result<Vec<Cow<'a, Job>>, StoreError> {
    let mut jobs: Vec<Cow<'a, Job>> = archive.jobs_of(owner)?.into_iter().filter(|j| s.job(j.id).is_none()).map(Cow::Owned).collect();
    jobs.extend(s.jobs_of(owner).map(Cow::Borrowed));
    jobs.sort_by_key(|j| j.id);
    Ok(jobs)
}
