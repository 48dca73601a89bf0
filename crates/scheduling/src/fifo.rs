//! First come, first served, with conservative (EASY-style) backfill. Never preempts.
//!
//! Jobs are served per owner pool (a job runs only on its owner's cards, so owners never
//! compete and a blocked job of one owner never holds up another's), in the order priority
//! (highest first), submission time, id.
//!
//! When the first job of a pool that could ever run there does not fit now (the *head*),
//! later jobs of that pool are only *backfilled* if they cannot delay it: their
//! `expected_seconds` is known and they would end no later than the earliest known expected
//! release of a job holding cards in the pool (including jobs placed earlier this round).
//! The head cannot start before some running job ends, so a job done by then cannot be in
//! its way. With no estimate on either side there is no backfill in that pool. A job that
//! could not run even on the pool's empty cards (no accepted model, too large) never
//! becomes the head: it would block its owner forever.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use suanli_types::{JobId, Timestamp};

use crate::core::{Round, Work};
use crate::model::{is_sharing, Decision, QueuedJob, Snapshot};
use crate::policy::Policy;

/// FIFO with backfill; see the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fifo;

impl Fifo {
    fn serve<'s>(round: &mut Round<'s>, work: Work<'s>) {
        let Work { pool, queued, running } = work;
        if !round.has_room(pool) {
            return;
        }
        let now = round.now;
        // One pass over the specs gathers all the queue needs (each spec is a cache miss);
        // after that only these compact entries are touched.
        let entries: Vec<Entry> = queued.iter().map(|&job| Entry::of(job, now)).collect();
        // A heap rather than a sort: in a busy cluster the pool fills (or its head blocks)
        // after a few jobs, and only then does the rest of the queue matter.
        let mut heap: BinaryHeap<Reverse<(Key, usize)>> = entries.iter().enumerate().map(|(i, e)| Reverse((e.key, i))).collect();
        let mut soonest_release: Option<Timestamp> = running.iter().filter_map(|r| r.expected_end).min();
        let mut blocked = false;
        while let Some(Reverse((_, i))) = heap.pop() {
            if !round.has_room(pool) {
                return;
            }
            let job = queued[i];
            let Some(d) = round.demand(pool, &job.spec) else {
                continue;
            };
            if !round.fits_ever(&d) {
                continue;
            }
            if round.place(job.id, &d, &[d.set]) {
                if let Some(end) = entries[i].expected_end {
                    soonest_release = Some(soonest_release.map_or(end, |t| t.min(end)));
                }
            } else {
                blocked = true;
                break;
            }
        }
        let Some(until) = soonest_release.filter(|_| blocked) else {
            return;
        };
        // Backfill: only jobs known to end by `until` are candidates; filter, then sort.
        let mut candidates: Vec<(Key, usize)> =
            heap.into_iter().map(|Reverse(entry)| entry).filter(|&(_, i)| entries[i].expected_end.is_some_and(|end| end <= until)).collect();
        candidates.sort_unstable();
        for (_, i) in candidates {
            if !round.has_room(pool) {
                return;
            }
            let (e, job) = (&entries[i], queued[i]);
            if !round.might_fit_shape(pool, e.cards, e.sharing) {
                continue;
            }
            if let Some(d) = round.demand(pool, &job.spec) {
                round.place(job.id, &d, &[d.set]);
            }
        }
    }
}

/// What FIFO needs of a queued job, copied out of its spec.
struct Entry {
    key: Key,
    /// `now + expected_seconds`.
    expected_end: Option<Timestamp>,
    cards: u32,
    sharing: bool,
}

impl Entry {
    fn of(job: &QueuedJob, now: Timestamp) -> Entry {
        let spec = &job.spec;
        Entry {
            key: (Reverse(spec.priority), job.submitted_at, job.id),
            expected_end: spec.expected_seconds.map(|s| now.plus_seconds(s as i64)),
            cards: spec.resources.cards,
            sharing: is_sharing(spec),
        }
    }
}

/// FIFO order: priority (highest first), submission time, id.
type Key = (Reverse<i32>, Timestamp, JobId);

impl Policy for Fifo {
    fn name(&self) -> &'static str {
        "fifo"
    }

    fn decide(&mut self, snapshot: &Snapshot, now: Timestamp) -> Vec<Decision> {
        let mut round = Round::new(snapshot, now);
        for work in round.work_by_pool(snapshot) {
            Self::serve(&mut round, work);
        }
        round.finish()
    }
}
