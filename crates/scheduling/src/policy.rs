//! The policy interface the scheduler service (and the simulator) call.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use suanli_types::Timestamp;

use crate::fifo::Fifo;
use crate::hetero::{Heterogeneity, HeterogeneityConfig};
use crate::las::{Las, LasConfig};
use crate::model::{Decision, Snapshot};
use crate::throughput::ThroughputTable;

/// A scheduling policy: one round of decisions for a snapshot.
///
/// `decide` must be deterministic in `(snapshot, now)` and its own state; it does no I/O and
/// reads no clock. `&mut self` lets a policy keep state between rounds; the ones here do not.
/// Preconditions on the snapshot: job ids are unique over `queued` and `running`.
pub trait Policy: Send {
    fn name(&self) -> &'static str;
    fn decide(&mut self, snapshot: &Snapshot, now: Timestamp) -> Vec<Decision>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    Fifo,
    Las,
    Heterogeneity,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 3] = [PolicyKind::Fifo, PolicyKind::Las, PolicyKind::Heterogeneity];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Fifo => "fifo",
            PolicyKind::Las => "las",
            PolicyKind::Heterogeneity => "heterogeneity",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduling policy {0:?} (expected fifo, las or heterogeneity)")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownPolicy(s.to_owned()))
    }
}

/// Everything any policy may be configured with; each takes what it needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// LAS queues and anti-thrashing (LAS and heterogeneity-aware).
    pub las: LasConfig,
    /// Heterogeneity-aware only.
    pub heterogeneity: HeterogeneityConfig,
    /// Speeds by job type and model (heterogeneity-aware).
    pub throughput: ThroughputTable,
}

pub fn build(kind: PolicyKind, config: &PolicyConfig) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Fifo => Box::new(Fifo),
        PolicyKind::Las => Box::new(Las::new(&config.las)),
        PolicyKind::Heterogeneity => Box::new(Heterogeneity::new(&config.las, &config.heterogeneity, config.throughput.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in PolicyKind::ALL {
            assert_eq!(kind.as_str().parse::<PolicyKind>(), Ok(kind));
            assert_eq!(build(kind, &PolicyConfig::default()).name(), kind.as_str());
        }
        assert!("drf".parse::<PolicyKind>().is_err());
    }
}
