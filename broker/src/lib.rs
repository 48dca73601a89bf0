//! `suanli-broker`: the marketplace's source of truth.
//!
//! - [`state`]: the pure, deterministic state machine (commands, rules, reads).
//! - [`store`]: openraft's log and state-machine storage over RocksDB.
//! - [`service`]: the tonic gRPC services and their authentication.

pub mod state;
