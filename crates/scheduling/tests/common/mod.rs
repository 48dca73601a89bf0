//! Builders shared by the tests and the benchmark.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use suanli_scheduling::{CardView, Decision, QueuedJob, RunningJob};
use suanli_types::{AccountId, CardId, JobId, JobKind, JobRun, JobSpec, LeaseId, NodeId, Resources, Timestamp};

pub const HOUR_MS: u64 = 3_600_000;

pub fn card(id: u64, node: u64, owner: u64, model: &str) -> CardView {
    CardView { id: CardId(id), node: NodeId(node), model: model.into(), vram_mib: 81_920, lease: LeaseId(owner), owner: AccountId(owner), usable: true }
}

/// `count` cards of `model` on `node`, ids `first..`.
pub fn node(node: u64, owner: u64, model: &str, first: u64, count: u64) -> Vec<CardView> {
    (first..first + count).map(|id| card(id, node, owner, model)).collect()
}

/// A training job on `cards` cards of any model.
pub fn spec(name: &str, cards: u32) -> JobSpec {
    JobSpec {
        name: name.into(),
        kind: JobKind::Training,
        resources: Resources { cards, gpu_models: vec![], min_vram_mib: 0, single_node: false, shared: false },
        inputs: vec![],
        outputs: vec![],
        run: JobRun::Builtin { task: "train_classifier".into(), params: BTreeMap::new() },
        priority: 0,
        preemptible: false,
        deadline: None,
        budget_minor: None,
        max_attempts: 3,
        expected_seconds: None,
        auto_lease: None,
    }
}

/// An inference job that shares its card.
pub fn sharing_spec(name: &str) -> JobSpec {
    let mut s = spec(name, 1);
    s.kind = JobKind::Inference;
    s.resources.shared = true;
    s
}

pub fn queued(id: u64, owner: u64, spec: JobSpec, submitted_ms: i64) -> QueuedJob {
    QueuedJob { id: JobId(id), owner: AccountId(owner), spec: Arc::new(spec), submitted_at: Timestamp(submitted_ms), attained_gpu_ms: 0 }
}

pub fn running(id: u64, owner: u64, cards: &[u64]) -> RunningJob {
    RunningJob {
        id: JobId(id),
        owner: AccountId(owner),
        cards: cards.iter().map(|&c| CardId(c)).collect(),
        shared: false,
        preemptible: false,
        priority: 0,
        started_at: Timestamp(0),
        expected_end: None,
        attained_gpu_ms: 0,
    }
}

pub fn sharing(id: u64, owner: u64, card: u64) -> RunningJob {
    RunningJob { shared: true, ..running(id, owner, &[card]) }
}

/// Placements by job (card ids as numbers).
pub fn placements(decisions: &[Decision]) -> BTreeMap<u64, Vec<u64>> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Place { job, cards } => Some((job.0, cards.iter().map(|c| c.0).collect())),
            Decision::Preempt { .. } => None,
        })
        .collect()
}

pub fn preemptions(decisions: &[Decision]) -> Vec<u64> {
    decisions
        .iter()
        .filter_map(|d| match d {
            Decision::Preempt { job } => Some(job.0),
            Decision::Place { .. } => None,
        })
        .collect()
}
