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

//!
//! Only [`state`] is built without the default `server` feature (the simulator links it so).

#[cfg(feature = "server")]
pub mod backup;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod demo;
#[cfg(feature = "server")]
pub mod network;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod service;
pub mod state;
#[cfg(feature = "server")]
pub mod storage;
#[cfg(feature = "server")]
pub mod telemetry;
