//! The state as format 4 stored it, kept to read format-4 snapshots and backups: format 5
//! appended `remote_leases` (leases of other federation members' cards). A format-4 state has
//! none. Postcard writes a struct as its fields one after another, so format 4 is format 3's
//! fields followed by `ledger_archived`.
//!
//! Frozen: this definition changes never; the next format adds a `format_v5.rs` of its own.

use serde::Deserialize;

use super::format_v3::StateV3;
use super::State;

/// [`State`] in format 4: format 3's fields, then `ledger_archived`.
#[derive(Deserialize)]
pub struct StateV4 {
    base: StateV3,
    ledger_archived: u64,
}

impl From<StateV4> for State {
    fn from(v4: StateV4) -> State {
        v4.base.into_state(v4.ledger_archived)
    }
}
