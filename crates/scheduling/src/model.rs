//! What a policy sees (a [`Snapshot`]) and what it answers (a list of [`Decision`]s).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use suanli_types::{AccountId, CardId, JobId, JobSpec, LeaseId, NodeId, Timestamp};

/// One card as the scheduler sees it: where it is, what it is, and whose lease holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardView {
    pub id: CardId,
    pub node: NodeId,
    /// The model as the agent reports it (`NVIDIA A100-SXM4-80GB`); matched by
    /// [`JobSpec::accepts_card`] and, exactly, by the [`ThroughputTable`](crate::ThroughputTable).
    pub model: String,
    pub vram_mib: u64,
    pub lease: LeaseId,
    /// The lessee: only this account's jobs may run on the card.
    pub owner: AccountId,
    /// Healthy and its lease active. Unusable cards are invisible to every policy.
    pub usable: bool,
}

/// A job waiting for cards (new, or requeued after preemption or a lost card).
#[derive(Clone, Debug, PartialEq)]
pub struct QueuedJob {
    pub id: JobId,
    pub owner: AccountId,
    /// Shared so that the service and a simulator can hand the same spec to every round
    /// without cloning it.
    pub spec: Arc<JobSpec>,
    pub submitted_at: Timestamp,
    /// Card-milliseconds of service received so far over all attempts (LAS orders by it).
    pub attained_gpu_ms: u64,
}

/// A job holding cards (placed or running).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    pub id: JobId,
    pub owner: AccountId,
    pub cards: Vec<CardId>,
    /// A sharing job (see [`is_sharing`]): its card may host other sharing jobs.
    pub shared: bool,
    pub preemptible: bool,
    pub priority: i32,
    /// When the current attempt started.
    pub started_at: Timestamp,
    /// When it is expected to release its cards (`started_at + expected_seconds` for the
    /// service; the simulator knows better). `None`: unknown. FIFO's backfill uses it.
    pub expected_end: Option<Timestamp>,
    pub attained_gpu_ms: u64,
}

/// Everything a policy needs for one round. Order of the vectors does not matter: every
/// policy sorts what it iterates, so a shuffled snapshot yields the same decisions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub cards: Vec<CardView>,
    pub queued: Vec<QueuedJob>,
    pub running: Vec<RunningJob>,
}

/// One thing the service should do. A list of decisions is carried out **in order**: a
/// `Place` may name cards held by jobs in earlier `Preempt`s of the same list, and must wait
/// until those preemptions have completed (or be dropped if one of them fails).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Start `job` on exactly these cards (sorted by id).
    Place { job: JobId, cards: Vec<CardId> },
    /// Stop `job` and requeue it; its cards go to a `Place` later in the same list.
    Preempt { job: JobId },
}

/// Whether a spec asks to share its card. Only a one-card job can share (the spec's own
/// validation refuses anything else; an invalid spec is treated as not sharing, which is
/// the safe reading: it then needs a whole card).
pub fn is_sharing(spec: &JobSpec) -> bool {
    spec.resources.shared && spec.resources.cards == 1
}

/// The key of a job in a [`ThroughputTable`](crate::ThroughputTable): its spec's `name`.
///
/// Why the name and not the builtin task: `train_classifier` covers a ResNet-18 and a ViT-L
/// whose speeds differ wildly, while a researcher resubmits the same workload under the same
/// name, so measured throughputs keyed by name carry over between runs.
pub fn type_key(spec: &JobSpec) -> &str {
    &spec.name
}
