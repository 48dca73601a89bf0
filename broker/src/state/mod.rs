//! The replicated state machine, pure: no I/O, no clock, no openraft. `store/` wraps it for
//! openraft; `service/` turns gRPC calls into [`Envelope`]s.

pub mod command;
pub mod event;
pub mod machine;
pub mod model;

pub use command::{Command, Envelope};
pub use event::{AppliedEvents, Event};
pub use machine::archive::Archived;
pub use machine::{rules, ClusterSummary, Outcome, Response, State};
pub use model::{Account, Attempt, AuthCode, Card, Cluster, EnrollmentToken, Job, Lease, LeaseAccount, Node, RemoteLease, SchedulerLease, ServiceEvaluation};

#[cfg(all(test, feature = "server"))]
mod golden_tests;
#[cfg(all(test, feature = "server"))]
mod tests;
