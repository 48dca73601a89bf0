//! `suanli-sim`'s library: trace loaders, a round-based discrete-event engine that drives
//! `suanli-scheduling`'s real policies, and the metrics the scheduling literature reports;
//! the market over months on the broker's own state machine ([`market`]); many real
//! federation members in one process ([`gossip`]); the broker's state at 1×, 10×, … a large
//! market ([`scale`]).
//!
//! The binary (`src/main.rs`) only parses arguments and calls [`run::trace`],
//! [`compare::compare_to`] or [`compare::max_rate_to`]; the tests in `tests/` drive the same
//! code.

pub mod compare;
pub mod engine;
pub mod gossip;
pub mod market;
pub mod metrics;
pub mod plot;
pub mod rng;
pub mod run;
pub mod scale;
pub mod synthetic;
pub mod trace;
