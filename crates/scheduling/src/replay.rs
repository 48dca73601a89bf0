//! Trace replay: Gavel's job traces and throughput table, and a round-based simulator that
//! drives any [`Policy`] through them.
//!
//! Pure like the rest of the crate: it parses text the caller has read and simulates time as
//! data, so the test suite and a future `suanli-sim` share it.
//!
//! The simulation follows Gavel's: time advances in fixed rounds; at each round boundary
//! arrived jobs join the queue, the policy decides on a [`Snapshot`], its decisions are
//! checked with [`check_decisions`] (a policy that breaks an invariant fails the run) and
//! carried out; then every running job progresses for one round at its throughput on its
//! cards — a gang spread over different models runs at the pace of the slowest — and a job
//! done mid-round frees its cards at the next boundary. A job restarted after preemption
//! first loses `restart_penalty_s` (checkpoint reload). Jobs accept only the models they have
//! a non-zero throughput for (Gavel marks out-of-memory combinations with 0).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::Deserialize;
use suanli_types::job::limits::MAX_ATTEMPTS;
use suanli_types::{AccountId, CardId, JobId, JobKind, JobRun, JobSpec, LeaseId, NodeId, Resources, Timestamp};

use crate::model::{CardView, Decision, QueuedJob, RunningJob, Snapshot};
use crate::policy::Policy;
use crate::throughput::ThroughputTable;
use crate::validate::{check_decisions, Violation};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("trace line {line}: {reason}")]
    Trace { line: usize, reason: String },
    #[error("throughput key {0:?} is not of the form \"('job type', cards)\"")]
    ThroughputKey(String),
    #[error("{policy} broke an invariant in round {round}: {violation}")]
    Invariant { policy: &'static str, round: u64, violation: Violation },
    #[error("{policy} did not finish the workload within {rounds} rounds")]
    Stalled { policy: &'static str, rounds: u64 },
}

/// One line of a Gavel trace (the 7-column format of `traces/msr`).
#[derive(Clone, Debug, PartialEq)]
pub struct TraceJob {
    pub job_type: String,
    pub command: String,
    pub total_steps: u64,
    pub arrival_s: f64,
    pub scale_factor: u32,
}

/// Parses `job_type, command, num_steps_arg, needs_data_dir, total_steps, arrival_time_s,
/// scale_factor`, tab-separated. Columns are taken from both ends, so a tab inside the
/// command cannot shift the numbers. Blank lines are skipped.
pub fn parse_gavel_trace(text: &str) -> Result<Vec<TraceJob>, ReplayError> {
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let err = |reason: String| ReplayError::Trace { line: line_no, reason };
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() < 7 {
            return Err(err(format!("expected 7 tab-separated columns, got {}", fields.len())));
        }
        let n = fields.len();
        let number = |col: usize, what: &str| -> Result<f64, ReplayError> {
            let raw = fields[col].trim();
            raw.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| err(format!("{what}: {raw:?} is not a non-negative number")))
        };
        let total_steps = number(n - 3, "total_steps")?;
        let arrival_s = number(n - 2, "arrival_time")?;
        let scale = number(n - 1, "scale_factor")?;
        if scale < 1.0 || scale.fract() != 0.0 || scale > f64::from(u32::MAX) {
            return Err(err(format!("scale_factor {scale} is not a whole number of GPUs")));
        }
        jobs.push(TraceJob {
            job_type: fields[0].trim().to_owned(),
            command: fields[1..n - 5].join("\t").trim().to_owned(),
            total_steps: total_steps.round() as u64,
            arrival_s,
            scale_factor: scale as u32,
        });
    }
    Ok(jobs)
}

/// `simulation_throughputs.json`: worker type → `"(job_type, scale_factor)"` → `"null"` (the
/// job alone) or another job's key (the two space-sharing) → speed(s).
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct GavelThroughputs(pub BTreeMap<String, BTreeMap<String, BTreeMap<String, GavelEntry>>>);

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum GavelEntry {
    /// Steps per second of the job alone on its GPUs.
    Alone(f64),
    /// Steps per second of each of two jobs sharing the GPUs (not used by the policies).
    Paired(Vec<f64>),
}

impl GavelThroughputs {
    /// The isolated (`"null"`) speeds of the given worker types (all if empty), keyed by the
    /// job type as the type key and the worker type as the model.
    pub fn table(&self, workers: &[&str]) -> Result<ThroughputTable, ReplayError> {
        let mut table = ThroughputTable::new();
        for (worker, jobs) in &self.0 {
            if !workers.is_empty() && !workers.contains(&worker.as_str()) {
                continue;
            }
            for (key, entries) in jobs {
                let (job_type, cards) = parse_gavel_key(key).ok_or_else(|| ReplayError::ThroughputKey(key.clone()))?;
                if let Some(GavelEntry::Alone(speed)) = entries.get("null") {
                    table.insert(job_type, cards, worker.as_str(), *speed);
                }
            }
        }
        Ok(table)
    }
}

/// Splits a Gavel key, the Python `repr` of a `(job_type, scale_factor)` tuple such as
/// `('ResNet-18 (batch size 64)', 2)`. Job types contain spaces and parentheses, so the key
/// is taken apart from its ends: the quote after `(` (Python uses `"` when the type has a
/// `'`), and the last `<quote>, ` before the number.
pub fn parse_gavel_key(key: &str) -> Option<(&str, u32)> {
    let inner = key.trim().strip_prefix('(')?.strip_suffix(')')?;
    let quote = inner.chars().next().filter(|&c| c == '\'' || c == '"')?;
    let inner = &inner[1..];
    let (job_type, cards) = inner.rsplit_once(&format!("{quote}, ") as &str)?;
    let cards: u32 = cards.trim().parse().ok()?;
    (cards >= 1 && !job_type.is_empty()).then_some((job_type, cards))
}

/// Identical nodes of one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuGroup {
    pub model: String,
    pub nodes: u32,
    pub cards_per_node: u32,
    pub vram_mib: u64,
}

/// Gavel's simulated cluster: 12 K80, 12 P100 and 12 V100 on 4-GPU nodes.
pub fn gavel_cluster() -> Vec<GpuGroup> {
    [("k80", 12_288), ("p100", 16_384), ("v100", 16_384)]
        .into_iter()
        .map(|(model, vram_mib)| GpuGroup { model: model.into(), nodes: 3, cards_per_node: 4, vram_mib })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    pub round_s: u64,
    pub restart_penalty_s: u64,
    /// A run that needs more rounds fails with [`ReplayError::Stalled`] (a starving policy).
    pub max_rounds: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig { round_s: 360, restart_penalty_s: 30, max_rounds: 1_000_000 }
    }
}

/// A job of the workload.
#[derive(Clone, Debug, PartialEq)]
pub struct SimJob {
    pub job_type: String,
    pub cards: u32,
    pub total_steps: u64,
    pub arrival_ms: i64,
    /// What the researcher submits: only models with a throughput, and an upper-bound
    /// `expected_seconds` (its run time on the slowest of them) for FIFO's backfill.
    pub spec: Arc<JobSpec>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// By arrival.
    pub jobs: Vec<SimJob>,
    /// Trace jobs left out: no non-zero throughput for their (type, gang size) on any model.
    pub skipped: usize,
}

/// Turns trace jobs into a workload for a cluster with `models`, with arrival times
/// multiplied by `time_scale` (below 1 compresses the trace, raising the load).
pub fn workload(trace: &[TraceJob], table: &ThroughputTable, models: &[&str], time_scale: f64) -> Workload {
    let mut jobs = Vec::new();
    let mut skipped = 0;
    for t in trace {
        let speeds: Vec<(&str, f64)> =
            models.iter().filter_map(|&m| table.exact(&t.job_type, t.scale_factor, m).filter(|&s| s > 0.0).map(|s| (m, s))).collect();
        let Some(slowest) = speeds.iter().map(|&(_, s)| s).min_by(f64::total_cmp) else {
            skipped += 1;
            continue;
        };
        let expected = (t.total_steps as f64 / slowest).ceil().clamp(1.0, 365.0 * 86_400.0) as u64;
        let spec = JobSpec {
            name: t.job_type.clone(),
            kind: JobKind::Training,
            resources: Resources {
                cards: t.scale_factor,
                gpu_models: speeds.iter().map(|&(m, _)| m.to_owned()).collect(),
                min_vram_mib: 0,
                single_node: false,
                shared: false,
            },
            inputs: vec![],
            outputs: vec![],
            run: JobRun::Command { program: "/bin/sh".into(), args: vec!["-c".into(), t.command.clone()], env: BTreeMap::new() },
            priority: 0,
            preemptible: true,
            deadline: None,
            budget_minor: None,
            max_attempts: MAX_ATTEMPTS,
            expected_seconds: Some(expected),
            auto_lease: None,
        };
        jobs.push(SimJob {
            job_type: t.job_type.clone(),
            cards: t.scale_factor,
            total_steps: t.total_steps,
            arrival_ms: (t.arrival_s * time_scale * 1000.0).round() as i64,
            spec: Arc::new(spec),
        });
    }
    jobs.sort_by_key(|j| j.arrival_ms);
    Workload { jobs, skipped }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SimReport {
    pub policy: &'static str,
    pub jobs: usize,
    /// Per job of the workload, in its order.
    pub outcomes: Vec<JobOutcome>,
    pub avg_jct_s: f64,
    pub median_jct_s: f64,
    pub makespan_s: f64,
    pub rounds: u64,
    pub placements: u64,
    pub preemptions: u64,
}

/// What happened to one job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobOutcome {
    pub jct_s: f64,
    pub starts: u32,
    /// Seconds run, by the model that set the pace (a gang's slowest).
    pub seconds_by_model: BTreeMap<String, u64>,
}

struct Run {
    cards: Vec<CardId>,
    started_ms: i64,
    /// Restart penalty still to pay before the job progresses.
    penalty_ms: i64,
}

struct JobState {
    remaining_steps: f64,
    attained_gpu_ms: u64,
    run: Option<Run>,
    preempted: bool,
    finished_ms: Option<i64>,
    starts: u32,
    ms_by_model: BTreeMap<String, i64>,
}

/// The owner of every card of a simulated cluster (one account leases them all).
pub const SIMULATED_OWNER: AccountId = AccountId(1);

/// The cards of `cluster`, node by node (IDs from 1), all leased by [`SIMULATED_OWNER`] in one
/// lease.
pub fn cluster_cards(cluster: &[GpuGroup]) -> Vec<CardView> {
    let mut cards = Vec::new();
    let mut node = 0;
    for group in cluster {
        for _ in 0..group.nodes {
            node += 1;
            for _ in 0..group.cards_per_node {
                cards.push(CardView {
                    id: CardId(cards.len() as u64 + 1),
                    node: NodeId(node),
                    model: group.model.clone(),
                    vram_mib: group.vram_mib,
                    lease: LeaseId(1),
                    owner: SIMULATED_OWNER,
                    usable: true,
                });
            }
        }
    }
    cards
}

/// Replays `workload` on `cluster` under `policy`; see the module documentation.
pub fn simulate(
    policy: &mut dyn Policy,
    cluster: &[GpuGroup],
    workload: &Workload,
    table: &ThroughputTable,
    config: &SimConfig,
) -> Result<SimReport, ReplayError> {
    let cards = cluster_cards(cluster);
    let model_of: BTreeMap<CardId, &str> = cards.iter().map(|c| (c.id, c.model.as_str())).collect();
    let jobs = &workload.jobs;
    let mut state: Vec<JobState> = jobs
        .iter()
        .map(|j| JobState {
            remaining_steps: j.total_steps as f64,
            attained_gpu_ms: 0,
            run: None,
            preempted: false,
            finished_ms: None,
            starts: 0,
            ms_by_model: BTreeMap::new(),
        })
        .collect();
    // The pace of job `j` on `cards`: its slowest card's model and speed.
    let pace = |j: usize, cards: &[CardId]| -> (&str, f64) {
        cards
            .iter()
            .map(|c| {
                let model = model_of.get(c).copied().unwrap_or("");
                (model, table.exact(&jobs[j].job_type, jobs[j].cards, model).unwrap_or(0.0))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("", 0.0))
    };
    let round_ms = config.round_s as i64 * 1000;
    let penalty_ms = config.restart_penalty_s as i64 * 1000;
    let (mut queued, mut running) = (BTreeSet::<usize>::new(), BTreeSet::<usize>::new());
    let (mut arrived, mut now, mut rounds, mut placements, mut preemptions) = (0, 0_i64, 0_u64, 0_u64, 0_u64);
    loop {
        while arrived < jobs.len() && jobs[arrived].arrival_ms <= now {
            queued.insert(arrived);
            arrived += 1;
        }
        if queued.is_empty() && running.is_empty() {
            let Some(next) = jobs.get(arrived) else { break };
            // Idle until the round boundary at or after the next arrival.
            now = (next.arrival_ms.max(0) + round_ms - 1) / round_ms * round_ms;
            continue;
        }
        if rounds >= config.max_rounds {
            return Err(ReplayError::Stalled { policy: policy.name(), rounds });
        }
        let snapshot = Snapshot {
            cards: cards.clone(),
            queued: queued
                .iter()
                .map(|&j| QueuedJob {
                    id: JobId(j as u64),
                    owner: SIMULATED_OWNER,
                    spec: jobs[j].spec.clone(),
                    submitted_at: Timestamp(jobs[j].arrival_ms),
                    attained_gpu_ms: state[j].attained_gpu_ms,
                })
                .collect(),
            running: running
                .iter()
                .filter_map(|&j| {
                    let s = &state[j];
                    let run = s.run.as_ref()?;
                    let (_, v) = pace(j, &run.cards);
                    let left_ms = run.penalty_ms as f64 + s.remaining_steps / v * 1000.0;
                    Some(RunningJob {
                        id: JobId(j as u64),
                        owner: SIMULATED_OWNER,
                        cards: run.cards.clone(),
                        shared: false,
                        preemptible: true,
                        priority: 0,
                        started_at: Timestamp(run.started_ms),
                        expected_end: (v > 0.0).then(|| Timestamp(now + left_ms.ceil() as i64)),
                        attained_gpu_ms: s.attained_gpu_ms,
                    })
                })
                .collect(),
        };
        let decisions = policy.decide(&snapshot, Timestamp(now));
        check_decisions(&snapshot, &decisions).map_err(|violation| ReplayError::Invariant { policy: policy.name(), round: rounds, violation })?;
        for decision in decisions {
            match decision {
                Decision::Preempt { job } => {
                    let j = job.0 as usize;
                    running.remove(&j);
                    queued.insert(j);
                    state[j].run = None;
                    state[j].preempted = true;
                    preemptions += 1;
                }
                Decision::Place { job, cards } => {
                    let j = job.0 as usize;
                    queued.remove(&j);
                    running.insert(j);
                    let penalty = if state[j].preempted { penalty_ms } else { 0 };
                    state[j].run = Some(Run { cards, started_ms: now, penalty_ms: penalty });
                    state[j].starts += 1;
                    placements += 1;
                }
            }
        }
        let mut done = Vec::new();
        for &j in &running {
            let s = &mut state[j];
            let Some(run) = s.run.as_mut() else { continue };
            let (model, v) = pace(j, &run.cards);
            let penalty = run.penalty_ms.min(round_ms);
            run.penalty_ms -= penalty;
            let steps = v * (round_ms - penalty) as f64 / 1000.0;
            let width = run.cards.len() as u64;
            if v > 0.0 && steps >= s.remaining_steps {
                let used_ms = penalty + (s.remaining_steps / v * 1000.0).ceil() as i64;
                s.finished_ms = Some(now + used_ms);
                *s.ms_by_model.entry(model.to_owned()).or_default() += used_ms;
                s.attained_gpu_ms += width * used_ms as u64;
                s.remaining_steps = 0.0;
                done.push(j);
            } else {
                s.remaining_steps -= steps;
                *s.ms_by_model.entry(model.to_owned()).or_default() += round_ms;
                s.attained_gpu_ms += width * round_ms as u64;
            }
        }
        for j in done {
            running.remove(&j);
            state[j].run = None;
        }
        now += round_ms;
        rounds += 1;
    }
    let outcomes: Vec<JobOutcome> = jobs
        .iter()
        .zip(&state)
        .map(|(j, s)| JobOutcome {
            jct_s: (s.finished_ms.unwrap_or(now) - j.arrival_ms) as f64 / 1000.0,
            starts: s.starts,
            seconds_by_model: s.ms_by_model.iter().map(|(m, &ms)| (m.clone(), (ms / 1000) as u64)).collect(),
        })
        .collect();
    let mut jct: Vec<f64> = outcomes.iter().map(|o| o.jct_s).collect();
    jct.sort_by(f64::total_cmp);
    let n = jct.len().max(1) as f64;
    Ok(SimReport {
        policy: policy.name(),
        jobs: jobs.len(),
        outcomes,
        avg_jct_s: jct.iter().sum::<f64>() / n,
        median_jct_s: jct.get(jct.len() / 2).copied().unwrap_or(0.0),
        makespan_s: state.iter().filter_map(|s| s.finished_ms).max().unwrap_or(0) as f64 / 1000.0,
        rounds,
        placements,
        preemptions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gavel_keys_keep_parentheses_and_spaces_in_job_types() {
        assert_eq!(parse_gavel_key("('ResNet-18 (batch size 64)', 2)"), Some(("ResNet-18 (batch size 64)", 2)));
        assert_eq!(parse_gavel_key("('A3C', 1)"), Some(("A3C", 1)));
        assert_eq!(parse_gavel_key("(\"Bob's model, v2\", 8)"), Some(("Bob's model, v2", 8)));
        assert_eq!(parse_gavel_key("('A3C', 0)"), None);
        assert_eq!(parse_gavel_key("A3C, 1"), None);
        assert_eq!(parse_gavel_key("null"), None);
    }

    #[test]
    fn trace_lines_parse_from_both_ends() {
        let text = "ResNet-18 (batch size 32)\tcd %s && python3 main.py \t--num_steps\t1\t1104675\t6.000000\t1\n\n\
                    LM (batch size 5)\ta\tb\t-n\t1\t10\t0.5\t4\n";
        let jobs = parse_gavel_trace(text).expect("valid trace");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[0].job_type, "ResNet-18 (batch size 32)");
        assert_eq!((jobs[0].total_steps, jobs[0].arrival_s, jobs[0].scale_factor), (1_104_675, 6.0, 1));
        assert_eq!(jobs[1].command, "a\tb");
        assert_eq!(jobs[1].scale_factor, 4);
        assert!(parse_gavel_trace("x\t1\t2\n").is_err());
        assert!(parse_gavel_trace("x\tc\t-n\t1\t10\t0\t0\n").is_err());
    }

    #[test]
    fn gavel_entries_deserialize_from_either_shape() {
        // serde only: the JSON itself is parsed by the caller (see tests/replay.rs).
        let mut jobs = BTreeMap::new();
        jobs.insert(
            "('A3C', 1)".to_owned(),
            BTreeMap::from([("null".to_owned(), GavelEntry::Alone(7.0)), ("x".to_owned(), GavelEntry::Paired(vec![1.0, 2.0]))]),
        );
        let g = GavelThroughputs(BTreeMap::from([("v100".to_owned(), jobs.clone()), ("k80".to_owned(), jobs)]));
        let t = g.table(&["v100"]).expect("keys parse");
        assert_eq!(t.exact("A3C", 1, "v100"), Some(7.0));
        assert_eq!(t.exact("A3C", 1, "k80"), None);
    }
}
