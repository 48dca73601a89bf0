//! The scheduler service: turns the broker's view of leased cards and live jobs into a
//! [`suanli_scheduling::Snapshot`], asks the configured policy for decisions, and commits them
//! through the broker — which re-checks every placement, so a bug here can waste a round but
//! never put a job on a card its owner does not hold.
//!
//! Several replicas may run; exactly one acts: each round starts by taking or renewing the
//! broker's scheduler lease, and every placement carries the lease's epoch, which the broker
//! refuses once another replica has taken over (fencing).

pub mod artifact_gc;
pub mod metrics;
pub mod service;
pub mod spec;
pub mod view;
