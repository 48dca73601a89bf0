//! `suanli-broker`: the marketplace's source of truth.
//!
//! - [`state`]: the pure, deterministic state machine (commands, rules, reads).
//! - [`storage`]: openraft's log and state-machine storage over RocksDB.
//! - [`network`]: Raft's RPCs between nodes, over gRPC.
//! - [`service`]: the public gRPC services, authentication, metrics, the lease reaper.
//! - [`telemetry`]: rolling windows of agent telemetry, card health, silent agents.
//! - [`server`]: wiring one node together.
//! - [`backup`]: backups of the replicated state and restores into a new cluster.
//! - [`demo`]: demo listings for a local marketplace.

pub mod backup;
pub mod config;
pub mod demo;
pub mod network;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod telemetry;
