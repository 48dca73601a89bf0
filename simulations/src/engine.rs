//! The round-based discrete-event engine: drives a real [`Policy`] through a workload the way
//! the scheduler service does, one decision round at a time.
//!
//! Each round, at a boundary `k × round_s`: jobs submitted by then join the queue; the policy
//! decides on a [`Snapshot`] (its wall-clock decision time is measured); the decisions are
//! re-checked with [`check_decisions`] (a policy that breaks an invariant fails the run) and
//! carried out in order; then every running job progresses for one round. A job that
//! completes mid-round records its exact end time but frees its cards at the next boundary
//! (as in Gavel's and Pollux's simulators). Each attempt first pays a start delay
//! (`first_start_delay_s` for the first, `restart_delay_s` after a preemption: checkpoint
//! reload, container start) during which it holds its cards without progressing.
//!
//! A round with no job queued skips the snapshot and the policy: every policy of
//! `crates/scheduling` serves only pools with queued jobs (`Round::work_by_pool`) and preempts
//! only to place one, so it would decide nothing. The round still counts and its jobs still
//! progress, so results are the same bytes (checked on the Pollux and Gavel runs' per-job
//! CSVs); only `decision_ns` has fewer entries. The snapshot's cards are built once.
//!
//! How fast a job progresses is its [`Work`]: wall seconds at its fixed gang size (the
//! trace's own duration, or a duration model's), or steps at a per-model throughput from a
//! [`ThroughputTable`], a gang running at its slowest card's pace.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use suanli_scheduling::replay::{cluster_cards, GpuGroup, SIMULATED_OWNER};
use suanli_scheduling::{check_decisions, is_sharing, Decision, Policy, QueuedJob, RunningJob, Snapshot, ThroughputTable, Violation};
use suanli_types::job::limits::MAX_ATTEMPTS;
use suanli_types::{AccountId, CardId, JobId, JobKind, JobRun, JobSpec, Resources, Timestamp};

/// How much a job has to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    /// Seconds of running on its gang, on any accepted card.
    Seconds(f64),
    /// Steps, at [`ThroughputTable::exact`]`(type_key, gpus, model)` steps per second.
    Steps(f64),
}

/// A job of a workload, as a trace loader produces it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub name: String,
    /// The group for per-workload means (a Pollux workload file, a Philly VC, …).
    pub workload: String,
    pub submit_s: f64,
    pub gpus: u32,
    /// The policy's type key (the spec's name): the application or Gavel job type.
    pub type_key: String,
    /// GPU models the job accepts; empty: any.
    pub models: Vec<String>,
    /// A one-card job that shares its card (an inference pod asking for part of a GPU), using
    /// this many thousandths of it: the placement core lets up to
    /// `MAX_JOBS_PER_SHARED_CARD` such jobs share a card (by count, not by thousandths).
    pub share_milli: Option<u32>,
    pub work: Work,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    pub round_s: u64,
    pub first_start_delay_s: u64,
    pub restart_delay_s: u64,
    /// A run needing more rounds fails with [`EngineError::Stalled`] (a starving policy).
    pub max_rounds: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { round_s: 60, first_start_delay_s: 0, restart_delay_s: 30, max_rounds: 10_000_000 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{policy} broke an invariant in round {round}: {violation}")]
    Invariant { policy: &'static str, round: u64, violation: Violation },
    #[error("{policy} did not finish the workload within {rounds} rounds ({left} jobs left)")]
    Stalled { policy: &'static str, rounds: u64, left: usize },
    #[error("job {name:?} can never run: {reason}")]
    Unrunnable { name: String, reason: String },
}

/// What happened to one job; times in milliseconds since the trace's time zero.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobRecord {
    pub submit_ms: i64,
    pub first_start_ms: i64,
    pub end_ms: i64,
    pub gpus: u32,
    /// Models it ran on, over all attempts.
    pub models: BTreeSet<String>,
    /// Attempts after the first (each one a preemption and a restart).
    pub restarts: u32,
    /// Card-milliseconds held, start delays included (a sharing job: its share of its card).
    pub gpu_ms: u64,
    /// Its JCT alone on the cluster: the first start delay plus its work on its gang of the
    /// fastest model it accepts, with no queueing, no waiting for a round and no restarts
    /// (finish-time fairness's denominator).
    pub isolated_ms: i64,
}

/// The cluster at one round, after the round's decisions were carried out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub t_ms: i64,
    /// Cards held by running jobs (a sharing job counts its share of its card).
    pub busy_cards: f64,
    /// Jobs waiting.
    pub queued: u32,
}

/// A finished run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    pub policy: &'static str,
    /// Per job, in the workload's order.
    pub records: Vec<JobRecord>,
    pub rounds: u64,
    pub placements: u64,
    pub preemptions: u64,
    pub cards_by_model: BTreeMap<String, u32>,
    /// Wall-clock nanoseconds of each `decide` call: the only non-deterministic output.
    pub decision_ns: Vec<u64>,
    /// One sample per round, and a zero sample where the cluster fell idle.
    pub timeline: Vec<Sample>,
}

const OWNER: AccountId = SIMULATED_OWNER;

/// The spec a researcher would submit for `job`: preemptible training on `gpus` cards,
/// with `expected_seconds` (FIFO's backfill reads it) from `estimate_s`.
fn spec(job: &Job, estimate_s: Option<f64>) -> JobSpec {
    let shared = job.share_milli.is_some() && job.gpus == 1;
    JobSpec {
        name: job.type_key.clone(),
        // Only inference jobs may share a card.
        kind: if shared { JobKind::Inference } else { JobKind::Training },
        resources: Resources { cards: job.gpus, gpu_models: job.models.clone(), min_vram_mib: 0, single_node: false, shared },
        inputs: vec![],
        outputs: vec![],
        run: JobRun::Command { program: "/bin/true".into(), args: vec![], env: BTreeMap::new() },
        priority: 0,
        preemptible: true,
        deadline: None,
        budget_minor: None,
        max_attempts: MAX_ATTEMPTS,
        expected_seconds: estimate_s.map(|s| s.ceil().clamp(1.0, 365.0 * 86_400.0) as u64),
        auto_lease: None,
    }
}

struct Attempt {
    cards: Vec<CardId>,
    started_ms: i64,
    delay_ms: i64,
    /// Work per millisecond on these cards, and the pacing model.
    rate: f64,
}

struct State {
    left: f64,
    attained_gpu_ms: u64,
    attempt: Option<Attempt>,
    starts: u32,
    first_start_ms: Option<i64>,
    end_ms: Option<i64>,
    models: BTreeSet<String>,
    gpu_ms: u64,
}

/// Replays `jobs` (sorted by submission time) on `cluster` under `policy`.
pub fn run(policy: &mut dyn Policy, cluster: &[GpuGroup], jobs: &[Job], table: &ThroughputTable, config: &EngineConfig) -> Result<RunResult, EngineError> {
    let cards = cluster_cards(cluster);
    let model_of: BTreeMap<CardId, &str> = cards.iter().map(|c| (c.id, c.model.as_str())).collect();
    let mut cards_by_model = BTreeMap::new();
    for c in &cards {
        *cards_by_model.entry(c.model.clone()).or_insert(0) += 1;
    }
    // Work per millisecond of job `j` on cards of `model` (0: cannot run there).
    let rate_on = |j: &Job, model: &str| -> f64 {
        if !j.models.is_empty() && !j.models.iter().any(|m| m == model) {
            return 0.0;
        }
        match j.work {
            Work::Seconds(_) => 1.0 / 1000.0,
            Work::Steps(_) => table.exact(&j.type_key, j.gpus, model).unwrap_or(0.0) / 1000.0,
        }
    };
    let models: BTreeSet<&str> = cards.iter().map(|c| c.model.as_str()).collect();
    let mut specs = Vec::with_capacity(jobs.len());
    let mut state = Vec::with_capacity(jobs.len());
    let mut isolated_ms = Vec::with_capacity(jobs.len());
    for j in jobs {
        let (work, unit) = match j.work {
            Work::Seconds(s) => (s, "seconds"),
            Work::Steps(s) => (s, "steps"),
        };
        if !(work.is_finite() && work >= 0.0) {
            return Err(EngineError::Unrunnable { name: j.name.clone(), reason: format!("{work} {unit} of work") });
        }
        let slowest = models.iter().map(|m| rate_on(j, m)).filter(|&r| r > 0.0).min_by(f64::total_cmp);
        let fastest = models.iter().map(|m| rate_on(j, m)).filter(|&r| r > 0.0).max_by(f64::total_cmp);
        let (Some(slowest), Some(fastest)) = (slowest, fastest) else {
            return Err(EngineError::Unrunnable { name: j.name.clone(), reason: "no card model of the cluster runs it".into() });
        };
        isolated_ms.push(config.first_start_delay_s as i64 * 1000 + (work / fastest).ceil() as i64);
        specs.push(Arc::new(spec(j, Some(work / slowest / 1000.0))));
        state.push(State { left: work, attained_gpu_ms: 0, attempt: None, starts: 0, first_start_ms: None, end_ms: None, models: BTreeSet::new(), gpu_ms: 0 });
    }
    let submit_ms: Vec<i64> = jobs.iter().map(|j| (j.submit_s * 1000.0).round() as i64).collect();
    let round_ms = config.round_s.max(1) as i64 * 1000;
    let (mut queued, mut running) = (BTreeSet::<usize>::new(), BTreeSet::<usize>::new());
    let (mut arrived, mut now, mut rounds, mut placements, mut preemptions) = (0, 0_i64, 0_u64, 0_u64, 0_u64);
    let mut decision_ns = Vec::new();
    let mut timeline = Vec::new();
    let mut finished = 0;
    let mut snapshot = Snapshot { cards: cards.clone(), queued: Vec::new(), running: Vec::new() };
    loop {
        while arrived < jobs.len() && submit_ms[arrived] <= now {
            queued.insert(arrived);
            arrived += 1;
        }
        if queued.is_empty() && running.is_empty() {
            let Some(&next) = submit_ms.get(arrived) else { break };
            let next = (next.max(0) + round_ms - 1) / round_ms * round_ms;
            if rounds > 0 && next > now {
                // Idle from here until the round before the next arrival's.
                timeline.push(Sample { t_ms: now, busy_cards: 0.0, queued: 0 });
                if next - round_ms > now {
                    timeline.push(Sample { t_ms: next - round_ms, busy_cards: 0.0, queued: 0 });
                }
            }
            now = next;
            continue;
        }
        if rounds >= config.max_rounds {
            return Err(EngineError::Stalled { policy: policy.name(), rounds, left: jobs.len() - finished });
        }
        // Nothing queued: every policy decides nothing (see the module's docs).
        if !queued.is_empty() {
            snapshot.queued.clear();
            snapshot.queued.extend(queued.iter().map(|&j| QueuedJob {
                id: JobId(j as u64),
                owner: OWNER,
                spec: specs[j].clone(),
                submitted_at: Timestamp(submit_ms[j]),
                attained_gpu_ms: state[j].attained_gpu_ms,
            }));
            snapshot.running.clear();
            snapshot.running.extend(running.iter().filter_map(|&j| {
                let s = &state[j];
                let a = s.attempt.as_ref()?;
                Some(RunningJob {
                    id: JobId(j as u64),
                    owner: OWNER,
                    cards: a.cards.clone(),
                    shared: is_sharing(&specs[j]),
                    preemptible: true,
                    priority: 0,
                    started_at: Timestamp(a.started_ms),
                    // The simulator knows the truth.
                    expected_end: (a.rate > 0.0).then(|| Timestamp(now + a.delay_ms + (s.left / a.rate).ceil() as i64)),
                    attained_gpu_ms: s.attained_gpu_ms,
                })
            }));
            let t = Instant::now();
            let decisions = policy.decide(&snapshot, Timestamp(now));
            decision_ns.push(t.elapsed().as_nanos() as u64);
            check_decisions(&snapshot, &decisions).map_err(|violation| EngineError::Invariant { policy: policy.name(), round: rounds, violation })?;
            for decision in decisions {
                match decision {
                    Decision::Preempt { job } => {
                        let j = job.0 as usize;
                        running.remove(&j);
                        queued.insert(j);
                        state[j].attempt = None;
                        preemptions += 1;
                    }
                    Decision::Place { job, cards } => {
                        let j = job.0 as usize;
                        queued.remove(&j);
                        running.insert(j);
                        let s = &mut state[j];
                        let delay_s = if s.starts == 0 { config.first_start_delay_s } else { config.restart_delay_s };
                        let rate = cards.iter().map(|c| rate_on(&jobs[j], model_of.get(c).copied().unwrap_or(""))).fold(f64::INFINITY, f64::min);
                        let rate = if rate.is_finite() { rate } else { 0.0 };
                        if let Some((_, model)) =
                            cards.iter().map(|c| model_of.get(c).copied().unwrap_or("")).map(|m| (rate_on(&jobs[j], m), m)).min_by(|a, b| a.0.total_cmp(&b.0))
                        {
                            s.models.insert(model.to_owned());
                        }
                        s.attempt = Some(Attempt { cards, started_ms: now, delay_ms: delay_s as i64 * 1000, rate });
                        s.starts += 1;
                        s.first_start_ms.get_or_insert(now);
                        placements += 1;
                    }
                }
            }
        }
        let mut done = Vec::new();
        let mut busy_cards = 0.0;
        for &j in &running {
            let s = &mut state[j];
            let Some(a) = s.attempt.as_mut() else { continue };
            let width = a.cards.len() as u64;
            busy_cards += match jobs[j].share_milli {
                Some(milli) if width == 1 => f64::from(milli.min(1000)) / 1000.0,
                _ => width as f64,
            };
            let delay = a.delay_ms.min(round_ms);
            a.delay_ms -= delay;
            let budget = round_ms - delay;
            let used = if a.rate > 0.0 && a.rate * budget as f64 >= s.left {
                let need = (s.left / a.rate).ceil() as i64;
                s.left = 0.0;
                s.end_ms = Some(now + delay + need);
                done.push(j);
                delay + need
            } else {
                s.left -= a.rate * budget as f64;
                round_ms
            };
            s.attained_gpu_ms += width * used as u64;
            s.gpu_ms += match jobs[j].share_milli {
                Some(milli) if width == 1 => used as u64 * u64::from(milli.min(1000)) / 1000,
                _ => width * used as u64,
            };
        }
        timeline.push(Sample { t_ms: now, busy_cards, queued: queued.len() as u32 });
        for j in done {
            running.remove(&j);
            state[j].attempt = None;
            finished += 1;
        }
        now += round_ms;
        rounds += 1;
    }
    let records = state
        .into_iter()
        .zip(&submit_ms)
        .zip(jobs)
        .zip(isolated_ms)
        .map(|(((s, &submit_ms), j), isolated_ms)| JobRecord {
            submit_ms,
            first_start_ms: s.first_start_ms.unwrap_or(submit_ms),
            end_ms: s.end_ms.unwrap_or(submit_ms),
            gpus: j.gpus,
            models: s.models,
            restarts: s.starts.saturating_sub(1),
            gpu_ms: s.gpu_ms,
            isolated_ms,
        })
        .collect();
    Ok(RunResult { policy: policy.name(), records, rounds, placements, preemptions, cards_by_model, decision_ns, timeline })
}

#[cfg(test)]
mod tests {
    use suanli_scheduling::{build, PolicyConfig, PolicyKind};

    use super::*;

    fn job(name: &str, submit_s: f64, gpus: u32, work: Work) -> Job {
        Job { name: name.into(), workload: "w".into(), submit_s, gpus, type_key: "t".into(), models: vec![], share_milli: None, work }
    }

    fn group(model: &str, nodes: u32, cards_per_node: u32) -> GpuGroup {
        GpuGroup { model: model.into(), nodes, cards_per_node, vram_mib: 16_384 }
    }

    /// By hand, 60 s rounds, 30 s first-start delay: `a` (2 cards, 90 s) is placed at 0, pays
    /// 30 s, runs 30 s in round 0 and 60 s in round 1: ends at 120. `b` (submitted at 10 s)
    /// waits for the boundary at 60, then needs 30 + 40 s: ends at 130.
    #[test]
    fn rounds_start_delays_and_mid_round_ends() {
        let jobs = vec![job("a", 0.0, 2, Work::Seconds(90.0)), job("b", 10.0, 2, Work::Seconds(40.0))];
        let config = EngineConfig { round_s: 60, first_start_delay_s: 30, restart_delay_s: 30, max_rounds: 100 };
        let mut fifo = build(PolicyKind::Fifo, &PolicyConfig::default());
        let r = run(fifo.as_mut(), &[group("v100", 1, 4)], &jobs, &ThroughputTable::new(), &config).expect("runs");
        let ends: Vec<(i64, i64, i64)> = r.records.iter().map(|x| (x.submit_ms, x.first_start_ms, x.end_ms)).collect();
        assert_eq!(ends, vec![(0, 0, 120_000), (10_000, 60_000, 130_000)]);
        assert_eq!(r.records[0].gpu_ms, 2 * 120_000);
        // Alone: the start delay and the work, no wait for a round (b: 30 + 40 s).
        assert_eq!((r.records[0].isolated_ms, r.records[1].isolated_ms), (120_000, 70_000));
        // Rounds at 0, 60 and 120 s: a holds 2 cards, then a and b 4, then b 2.
        let samples: Vec<(i64, f64, u32)> = r.timeline.iter().map(|s| (s.t_ms, s.busy_cards, s.queued)).collect();
        assert_eq!(samples, vec![(0, 2.0, 0), (60_000, 4.0, 0), (120_000, 2.0, 0)]);
        assert_eq!((r.rounds, r.placements, r.preemptions), (3, 2, 0));
        // At 120 s nothing is queued: the policy is not called.
        assert_eq!(r.decision_ns.len(), 2);
    }

    /// Steps at the table's speed: 600 steps at 10/s on a v100 take 60 s, at 2/s on a k80 300 s
    /// (FIFO knows no speeds: a job accepting any model may land on the k80, so each job here
    /// names its model). A job no model can run is refused up front.
    #[test]
    fn steps_run_at_the_speed_of_the_model() {
        let mut table = ThroughputTable::new();
        table.insert("t", 1, "v100", 10.0);
        table.insert("t", 1, "k80", 2.0);
        let (mut fast, mut slow) = (job("fast", 0.0, 1, Work::Steps(600.0)), job("slow", 0.0, 1, Work::Steps(600.0)));
        fast.models = vec!["v100".into()];
        slow.models = vec!["k80".into()];
        let jobs = vec![fast, slow];
        let config = EngineConfig { round_s: 60, first_start_delay_s: 0, restart_delay_s: 0, max_rounds: 100 };
        let cluster = [group("k80", 1, 1), group("v100", 1, 1)];
        let mut fifo = build(PolicyKind::Fifo, &PolicyConfig::default());
        let r = run(fifo.as_mut(), &cluster, &jobs, &table, &config).expect("runs");
        assert_eq!((r.records[0].end_ms, r.records[1].end_ms), (60_000, 300_000));
        assert_eq!(r.records[1].models, BTreeSet::from(["k80".to_owned()]));
        let unrunnable = vec![job("x", 0.0, 2, Work::Steps(1.0))];
        assert!(matches!(run(fifo.as_mut(), &cluster, &unrunnable, &table, &config), Err(EngineError::Unrunnable { .. })));
    }
}
