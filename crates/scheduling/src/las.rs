//! Least attained service (Tiresias-style discretized 2D-LAS).
//!
//! Service is measured in two dimensions at once: cards × time (`attained_gpu_ms`), so a wide
//! job ages as fast as it consumes. Jobs fall into discrete queues by thresholds on that
//! service (default: < 1 GPU-hour, < 10 GPU-hours, the rest); lower queues go first, and
//! within a queue it is FIFO (priority first, then submission time, then id). Discrete queues
//! rather than a strict sort are what keeps LAS from time-slicing two similar jobs forever.
//!
//! A waiting job that does not fit may preempt running jobs that are preemptible, have run
//! at least `min_run_ms` in their current attempt (no thrashing), sit in a strictly higher
//! queue and have no higher priority. Victims go least deserving first: highest queue,
//! lowest priority, most recently started. Preemption and the placement it makes room for
//! come in the same decision list (see [`Decision`](crate::Decision)). A gang victim may
//! free more cards than the job takes; jobs passed over earlier in the round get a second
//! try at those, so no card is left idle for a round that a waiting job could use.
//!
//! The ordering and the preemption loop are shared with the heterogeneity-aware policy,
//! which only changes *where* a job goes.

use std::cmp::Reverse;

use serde::{Deserialize, Serialize};
use suanli_types::{JobId, Timestamp};

use crate::core::{Demand, FastMap, Round, SetId, Victim, Work};
use crate::model::{Decision, QueuedJob, RunningJob, Snapshot};
use crate::policy::Policy;

/// The LAS knobs, shared with the heterogeneity-aware policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LasConfig {
    /// Upper bounds (exclusive) of the queues, in card-milliseconds; a job with at least the
    /// last threshold is in the last queue. Sorted and deduplicated when a policy is built.
    pub thresholds_gpu_ms: Vec<u64>,
    /// A job whose current attempt started less than this long ago is not preempted.
    pub min_run_ms: u64,
}

impl Default for LasConfig {
    fn default() -> Self {
        const GPU_HOUR_MS: u64 = 3_600_000;
        // One Gavel-sized round (6 minutes) of guaranteed progress per attempt.
        LasConfig { thresholds_gpu_ms: vec![GPU_HOUR_MS, 10 * GPU_HOUR_MS], min_run_ms: 360_000 }
    }
}

/// A waiting job with its LAS queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ranked<'s> {
    pub job: &'s QueuedJob,
    pub queue: usize,
}

/// The LAS order of waiting jobs and running victims.
#[derive(Clone, Debug)]
pub(crate) struct ServiceOrder {
    thresholds: Vec<u64>,
    min_run_ms: u64,
}

impl ServiceOrder {
    pub fn new(config: &LasConfig) -> Self {
        let mut thresholds = config.thresholds_gpu_ms.clone();
        thresholds.sort_unstable();
        thresholds.dedup();
        ServiceOrder { thresholds, min_run_ms: config.min_run_ms }
    }

    pub fn queue(&self, attained_gpu_ms: u64) -> usize {
        self.thresholds.partition_point(|&t| t <= attained_gpu_ms)
    }

    /// Waiting jobs, most deserving first.
    pub fn rank<'s>(&self, jobs: &[&'s QueuedJob]) -> Vec<Ranked<'s>> {
        // Keys computed once, next to the job: comparing through the spec's `Arc` would miss
        // the cache on every comparison.
        let mut keyed: Vec<_> = jobs
            .iter()
            .map(|&job| {
                let queue = self.queue(job.attained_gpu_ms);
                ((queue, Reverse(job.spec.priority), job.submitted_at, job.id), Ranked { job, queue })
            })
            .collect();
        keyed.sort_unstable_by_key(|(key, _)| *key);
        keyed.into_iter().map(|(_, r)| r).collect()
    }

    /// Running jobs that may be preempted at `now`, least deserving first.
    pub fn victims<'s>(&self, running: &[&'s RunningJob], now: Timestamp) -> Vec<Victim<'s>> {
        let mut victims: Vec<Victim<'s>> = running
            .iter()
            .filter(|j| j.preemptible && j.started_at.millis().saturating_add(self.min_run_ms as i64) <= now.millis())
            .map(|&job| Victim { job, rank: self.queue(job.attained_gpu_ms) })
            .collect();
        victims.sort_unstable_by_key(|v| (Reverse(v.rank), v.job.priority, Reverse(v.job.started_at), Reverse(v.job.id)));
        victims
    }

    /// Serves one pool in LAS order: each job goes onto the first of the sets `preference`
    /// gives it where it fits (each a subset of the job's accepted set, the last a superset
    /// of the others), else it may preempt for them in the same order. Jobs in `skip` were
    /// already placed.
    pub fn serve<'s>(
        &self,
        round: &mut Round<'s>,
        pool: usize,
        ranked: &[Ranked<'s>],
        victims: &mut Vec<Victim<'s>>,
        skip: impl Fn(JobId) -> bool,
        mut preference: impl FnMut(&mut Round<'s>, &'s QueuedJob, &Demand) -> Vec<SetId>,
    ) {
        // Shapes that could not be placed even by preempting, with the smallest gang size that
        // failed. Within a round resources only shrink and later jobs sit in the same or a
        // higher queue (fewer victims), so a larger gang of the same shape fails too. The set
        // in the shape is the job's widest (its last preference, a superset of the others):
        // what cannot fit there by preempting cannot fit on any part of it either.
        let mut failed: FastMap<(SetId, bool, bool, usize, i32), u32> = FastMap::default();
        // Jobs passed over, for the second pass.
        let mut waiting: Vec<&'s QueuedJob> = Vec::new();
        let mut preempted_any = false;
        for r in ranked {
            let job = r.job;
            // Victims are sorted by queue, highest first: none is eligible for this job or
            // any later one once the highest is not above this job's queue.
            let can_preempt = victims.first().is_some_and(|v| v.rank > r.queue);
            if !can_preempt && !round.has_room(pool) {
                break;
            }
            if skip(job.id) {
                continue;
            }
            if !can_preempt && !round.might_fit(pool, &job.spec) {
                waiting.push(job);
                continue;
            }
            let Some(d) = round.demand(pool, &job.spec) else {
                continue;
            };
            if !round.fits_ever(&d) {
                continue;
            }
            let sets = preference(round, job, &d);
            if round.place(job.id, &d, &sets) {
                continue;
            }
            let widest = sets.last().copied().unwrap_or(d.set);
            let shape = (widest, d.single_node, d.sharing, r.queue, job.spec.priority);
            if can_preempt && failed.get(&shape).is_none_or(|&k| d.cards < k) {
                let (queue, priority) = (r.queue, job.spec.priority);
                let eligible = |v: &Victim<'_>| v.rank > queue && v.job.priority <= priority;
                if round.place_by_preempting(job.id, &d, &sets, victims, eligible) {
                    preempted_any = true;
                    continue;
                }
                let k = failed.entry(shape).or_insert(d.cards);
                *k = (*k).min(d.cards);
            }
            waiting.push(job);
        }
        // A preempted gang may free more cards than the job it made room for takes: a job
        // passed over earlier may use them now rather than leave them idle for a round.
        if preempted_any {
            for job in waiting {
                if !round.has_room(pool) {
                    break;
                }
                if !round.might_fit(pool, &job.spec) {
                    continue;
                }
                let Some(d) = round.demand(pool, &job.spec) else {
                    continue;
                };
                let sets = preference(round, job, &d);
                round.place(job.id, &d, &sets);
            }
        }
    }
}

/// Least attained service; see the module documentation.
#[derive(Clone, Debug)]
pub struct Las {
    order: ServiceOrder,
}

impl Las {
    pub fn new(config: &LasConfig) -> Self {
        Las { order: ServiceOrder::new(config) }
    }
}

impl Policy for Las {
    fn name(&self) -> &'static str {
        "las"
    }

    fn decide(&mut self, snapshot: &Snapshot, now: Timestamp) -> Vec<Decision> {
        let mut round = Round::new(snapshot, now);
        for Work { pool, queued, running } in round.work_by_pool(snapshot) {
            let mut victims = self.order.victims(&running, now);
            if victims.is_empty() && !round.has_room(pool) {
                continue;
            }
            let ranked = self.order.rank(&queued);
            self.order.serve(&mut round, pool, &ranked, &mut victims, |_| false, |_, _, d| vec![d.set]);
        }
        round.finish()
    }
}
