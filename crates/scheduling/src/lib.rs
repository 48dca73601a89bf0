//! Suanli scheduling policies: which queued job runs on which of its owner's leased cards.
//!
//! # Rules of this crate
//!
//! * **Pure and deterministic.** No I/O, no clock, no randomness: the caller passes `now`
//!   with the [`Snapshot`]. The scheduler service and the simulator link the same code, and
//!   the same input always yields the same decisions — policies iterate sorted vectors and
//!   `BTree` maps only (hash maps are used for lookups, never iterated), and break ties by
//!   [`JobId`](suanli_types::JobId), then [`CardId`](suanli_types::CardId). The order of the
//!   snapshot's vectors does not matter.
//! * **One placement core.** Every policy only *orders* jobs and *chooses among* card sets;
//!   placing and preempting go through one core (`core.rs`) that enforces the hard
//!   invariants, whatever the policy asks:
//!   1. a job runs only on cards its owner leases, that are usable, and that its spec accepts
//!      ([`JobSpec::accepts_card`](suanli_types::JobSpec::accepts_card));
//!   2. gang placement: exactly `resources.cards` cards or none; `single_node` → one node;
//!   3. a card goes to one job — except that up to
//!      [`MAX_JOBS_PER_SHARED_CARD`](suanli_types::job::limits::MAX_JOBS_PER_SHARED_CARD)
//!      sharing jobs ([`is_sharing`]) share a card that hosts only sharing jobs; a sharing
//!      job goes to the fullest shared card with room, else to a free card on the node with
//!      the fewest free cards, so whole cards and nodes stay free for training;
//!   4. only preemptible jobs are preempted, and only when the cards freed let a waiting job
//!      be placed **in the same decision list**: its `Preempt`s come first, then the `Place`
//!      using their cards (the service completes the preemptions before that placement);
//!   5. a multi-card job goes onto one node when one has room (the smallest that does —
//!      best fit), else, unless `single_node`, onto the fewest nodes (most free first).
//!
//!   [`check_decisions`] re-checks 1–4 independently (5 is a preference, unit-tested); the
//!   property tests run every policy through it on random snapshots, and the replay
//!   simulator fails a policy that breaks it.
//! * **Per-owner pools.** Jobs only compete with their owner's other jobs, so each owner's
//!   cards are a separate pool and a job blocked in one pool never holds up another.
//!
//! # Policies
//!
//! * [`Fifo`] — priority, then submission order, with conservative backfill.
//! * [`Las`] — Tiresias-style discretized least attained service, with preemption.
//! * [`Heterogeneity`] — LAS's order, Gavel-style choice of GPU model by relative speed.
//!
//! Build one with [`build`] from a [`PolicyKind`] (`"fifo"`, `"las"`, `"heterogeneity"`) and a
//! [`PolicyConfig`]. [`replay`] replays Gavel traces through any policy.

mod core;
mod fifo;
mod hetero;
mod las;
mod model;
mod policy;
pub mod replay;
mod throughput;
mod validate;

pub use fifo::Fifo;
pub use hetero::{Heterogeneity, HeterogeneityConfig};
pub use las::{Las, LasConfig};
pub use model::{is_sharing, type_key, CardView, Decision, QueuedJob, RunningJob, Snapshot};
pub use policy::{build, Policy, PolicyConfig, PolicyKind, UnknownPolicy};
pub use throughput::ThroughputTable;
pub use validate::{check_decisions, Violation};
