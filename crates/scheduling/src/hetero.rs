//! Heterogeneity-aware placement (Gavel-style), as a fast greedy on top of LAS.
//!
//! *Who* runs is decided exactly as in [`Las`](crate::Las) (same queues, same preemption);
//! this policy changes *where*. A job's throughput on each model it accepts in its pool comes
//! from the [`ThroughputTable`]; normalised by its best model it says how much of its speed the
//! job keeps elsewhere. What matters when two jobs compete for a model is not who is fastest
//! there in absolute terms, but who loses most by not getting it, so each (job, model) pair
//! is scored by
//!
//! ```text
//! advantage(job, model) = tput(job, model) / max over the job's other models of tput(job, other)
//! ```
//!
//! (> 1 on the job's best model, by how much it beats the runner-up; < 1 elsewhere, by how
//! little it loses there; +∞ if the pool offers it only one model.)
//!
//! Each round, per pool:
//! 1. The *window*: the longest prefix of the LAS order whose card demand fits the pool's
//!    free cards — the jobs fairness says should run now.
//! 2. All (window job, model) pairs, by advantage (highest first; LAS order, then model name
//!    break ties): a job not placed yet is placed on free cards of that one model if it fits.
//!    This is the "give each model's cards to the jobs with the largest ratio" greedy; it is
//!    O(window × models × log) and sends a job that barely cares to the slow cards while a
//!    job that runs 5× faster on V100 gets the V100s.
//! 3. Then the LAS pass over every job not yet placed (window leftovers included): each tries
//!    its models fastest first, then any mix of them, and may preempt as in LAS — victims on
//!    its fastest model first, so a new job displaces a long one from the card it wants
//!    rather than from whatever card the least deserving victim happens to hold.
//!
//! Models too slow for a job are not offered at all: below
//! [`min_relative_speed`](HeterogeneityConfig::min_relative_speed) (default 0.25) of its best
//! model's speed, unless its faster models could never hold it. Running jobs are not
//! migrated, so without this rule a long job that lands on a card where it crawls (ResNet-18
//! on a K80 runs at 8 % of its V100 speed) stays there for weeks; in the Gavel replay it is
//! what makes this policy beat LAS (0 reproduces the work-conserving greedy, which loses to
//! LAS there).
//!
//! Speeds: a job with no entry for any of its models is equally fast everywhere (advantage 1).
//! A model missing while others are known counts as fast as the slowest known one (no
//! reason to prefer it). A speed of 0 means the job does not run there: the model is not
//! offered (unless every model is 0, which is treated as no information). Floats are only
//! compared, never accumulated across rounds, so decisions stay deterministic.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use suanli_types::{JobId, Timestamp};

use crate::core::{Demand, FastMap, Round, SetId, Work};
use crate::las::{LasConfig, Ranked, ServiceOrder};
use crate::model::{type_key, Decision, QueuedJob, Snapshot};
use crate::policy::Policy;
use crate::throughput::ThroughputTable;

/// The heterogeneity-aware knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeterogeneityConfig {
    /// A job is not placed on a model where it runs below this fraction of its speed on its
    /// best model in the pool, unless the faster models could never hold it. Jobs are not
    /// migrated once started, so a long job parked on a card where it crawls stays there.
    pub min_relative_speed: f64,
}

impl Default for HeterogeneityConfig {
    fn default() -> Self {
        HeterogeneityConfig { min_relative_speed: 0.25 }
    }
}

/// Heterogeneity-aware LAS; see the module documentation.
#[derive(Clone, Debug)]
pub struct Heterogeneity {
    order: ServiceOrder,
    min_relative_speed: f64,
    table: ThroughputTable,
}

/// One model a job could run on, as a set of the job's pool.
struct ModelChoice {
    model: usize,
    set: SetId,
    speed: f64,
}

/// [`Heterogeneity::choices`] depends on nothing else, and jobs repeat these a lot: the
/// choices are worked out once per round for each (type key, pool, accepted set, gang).
type ChoiceCache<'s> = FastMap<(&'s str, usize, SetId, u32, bool, bool), Choices>;

/// Where a job may go: its models fastest first, and the set of all of them.
struct Choices {
    models: Vec<ModelChoice>,
    anywhere: SetId,
}

impl Heterogeneity {
    pub fn new(las: &LasConfig, config: &HeterogeneityConfig, table: ThroughputTable) -> Self {
        let min_relative_speed = if config.min_relative_speed.is_finite() { config.min_relative_speed.clamp(0.0, 1.0) } else { 0.0 };
        Heterogeneity { order: ServiceOrder::new(las), min_relative_speed, table }
    }

    /// The models `d` may use, with the job's speed on each (see the module documentation).
    fn choices(&self, round: &mut Round<'_>, key: &str, d: &Demand) -> Choices {
        let models = round.models_of(d);
        let known: Vec<Option<f64>> = models.iter().map(|(m, _)| self.table.speed(key, d.cards, m)).collect();
        let slowest = known.iter().flatten().copied().fold(f64::INFINITY, f64::min);
        let mut options: Vec<ModelChoice> = models
            .iter()
            .zip(&known)
            .enumerate()
            .map(|(model, ((_, set), speed))| ModelChoice { model, set: *set, speed: if slowest.is_finite() { speed.unwrap_or(slowest) } else { 1.0 } })
            .collect();
        if options.iter().any(|o| o.speed > 0.0) {
            options.retain(|o| o.speed > 0.0);
        } else {
            options.iter_mut().for_each(|o| o.speed = 1.0);
        }
        let best = options.iter().map(|o| o.speed).fold(0.0, f64::max);
        let fast_enough = |o: &ModelChoice| o.speed >= self.min_relative_speed * best;
        if !options.iter().all(fast_enough) {
            let fast: Vec<SetId> = options.iter().filter(|o| fast_enough(o)).map(|o| o.set).collect();
            let union = round.union(d.pool, &fast);
            if round.fits_ever(&Demand { set: union, ..*d }) {
                options.retain(fast_enough);
            }
        }
        options.sort_by(|a, b| b.speed.total_cmp(&a.speed).then(a.model.cmp(&b.model)));
        let sets: Vec<SetId> = options.iter().map(|o| o.set).collect();
        let anywhere = match sets.as_slice() {
            [only] => *only,
            _ => round.union(d.pool, &sets),
        };
        Choices { models: options, anywhere }
    }

    fn cached<'s, 'c>(&self, cache: &'c mut ChoiceCache<'s>, round: &mut Round<'s>, job: &'s QueuedJob, d: &Demand) -> &'c Choices {
        let key = type_key(&job.spec);
        cache.entry((key, d.pool, d.set, d.cards, d.single_node, d.sharing)).or_insert_with(|| self.choices(round, key, d))
    }

    /// Step 2 of the module documentation; returns the jobs it placed.
    fn place_window<'s>(&self, cache: &mut ChoiceCache<'s>, round: &mut Round<'s>, pool: usize, ranked: &[Ranked<'s>]) -> BTreeSet<JobId> {
        let mut budget = round.free_cards(pool);
        let mut window: Vec<(usize, Demand)> = Vec::new();
        for (rank, r) in ranked.iter().enumerate() {
            let Some(d) = round.demand(pool, &r.job.spec) else {
                continue;
            };
            if !round.fits_ever(&d) {
                continue;
            }
            // A sharing job may fit on a shared card; counting it as one card keeps the
            // window conservative.
            let need = if d.sharing { 1 } else { d.cards };
            if need > budget {
                break;
            }
            budget -= need;
            window.push((rank, d));
        }
        // (advantage, rank in the window's LAS order, model, set)
        let mut pairs: Vec<(f64, usize, usize, SetId)> = Vec::new();
        for &(rank, d) in &window {
            let options = &self.cached(cache, round, ranked[rank].job, &d).models;
            for (i, o) in options.iter().enumerate() {
                let best_other = options.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, other)| other.speed).fold(0.0_f64, f64::max);
                let advantage = if best_other > 0.0 { o.speed / best_other } else { f64::INFINITY };
                pairs.push((advantage, rank, o.model, o.set));
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut placed = BTreeSet::new();
        let demands: BTreeMap<usize, Demand> = window.into_iter().collect();
        for (_, rank, _, set) in pairs {
            let job = ranked[rank].job;
            if placed.contains(&job.id) {
                continue;
            }
            if let Some(d) = demands.get(&rank) {
                if round.place(job.id, d, &[set]) {
                    placed.insert(job.id);
                }
            }
        }
        placed
    }
}

impl Policy for Heterogeneity {
    fn name(&self) -> &'static str {
        "heterogeneity"
    }

    fn decide(&mut self, snapshot: &Snapshot, now: Timestamp) -> Vec<Decision> {
        self.decide_in(snapshot, now)
    }
}

impl Heterogeneity {
    fn decide_in<'s>(&self, snapshot: &'s Snapshot, now: Timestamp) -> Vec<Decision> {
        let mut round = Round::new(snapshot, now);
        let mut cache = ChoiceCache::default();
        for Work { pool, queued, running } in round.work_by_pool(snapshot) {
            let mut victims = self.order.victims(&running, now);
            if victims.is_empty() && !round.has_room(pool) {
                continue;
            }
            let ranked = self.order.rank(&queued);
            let placed = self.place_window(&mut cache, &mut round, pool, &ranked);
            let fastest_first = |round: &mut Round<'s>, job: &'s QueuedJob, d: &Demand| {
                let choices = self.cached(&mut cache, round, job, d);
                let mut sets: Vec<SetId> = choices.models.iter().map(|o| o.set).collect();
                if sets.len() > 1 {
                    sets.push(choices.anywhere);
                }
                sets
            };
            self.order.serve(&mut round, pool, &ranked, &mut victims, |id| placed.contains(&id), fastest_first);
        }
        round.finish()
    }
}
