//! The state as format 5 stored it, kept to read format-5 snapshots and backups and the
//! snapshots format-5 nodes send during a rolling upgrade: format 6 appended `cluster_format`
//! (`upgrade.rs`). Format 5 is format 4's fields followed by `remote_leases`; a format-5 state
//! is at cluster format 5.
//!
//! Frozen: this definition changes never; the next format adds a `format_v6.rs` of its own.

use std::collections::BTreeMap;

use serde::Deserialize;
use suanli_types::RemoteLeaseId;

use super::format_v4::StateV4;
use super::State;
use crate::state::model::RemoteLease;

/// [`State`] in format 5: format 4's fields, then `remote_leases`.
#[derive(Deserialize)]
pub struct StateV5 {
    base: StateV4,
    remote_leases: BTreeMap<RemoteLeaseId, RemoteLease>,
}

impl From<StateV5> for State {
    fn from(v5: StateV5) -> State {
        let mut state = State::from(v5.base);
        state.remote_leases = v5.remote_leases;
        state
    }
}
