//! Expires leases whose reservation or paid term is over, charges active leases' use, moves
//! what ended long ago to the archive, and raises the cluster format once every member runs
//! this store format (`state::machine::upgrade`). Runs on every node but proposes only
//! while this node is the leader; the state machine re-checks the deadline, so a proposal from a
//! deposed leader or a skewed clock is refused with `NOT_YET_DUE` and changes nothing.

use std::time::Duration;

use suanli_types::Caller;
use tracing::{debug, info, warn};

use super::{now, Shared};
use crate::state::Command;
use crate::storage::FORMAT_VERSION;

/// How often active leases are charged for their use: one log entry per this period for all
/// of them (in chunks of the command's limit), not one per lease-second.
pub const SETTLEMENT_EVERY_MS: u64 = 60_000;

/// How often the leader looks for something to archive.
pub const ARCHIVE_EVERY: Duration = Duration::from_secs(10);

pub async fn run(shared: Shared, every: Duration, archive_after: Duration) {
    let mut last_archive: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let me = shared.raft.metrics().borrow().id;
        if shared.raft.metrics().borrow().current_leader != Some(me) {
            continue;
        }
        let at = now();
        let due = shared.sm.read(|s| s.due_for_expiry(at).into_iter().map(|id| (id, s.lease(id).map(|l| l.state))).collect::<Vec<_>>());
        for (lease, state) in due {
            // One request ID per lease and state: a retry after a lost answer is recognised.
            let request_id = format!("expire-{}-{}", lease.0, state.map_or("gone", |s| s.as_str()));
            match shared.propose(Caller::System, &request_id, Command::ExpireLease { lease }).await {
                Ok(_) => debug!(%lease, "expired"),
                Err(status) => warn!(%lease, %status, "could not expire lease"),
            }
        }
        settle(&shared, at).await;
        raise_cluster_format(&shared).await;
        if last_archive.is_none_or(|t| t.elapsed() >= ARCHIVE_EVERY) {
            last_archive = Some(tokio::time::Instant::now());
            archive(&shared, at, archive_after).await;
        }
    }
}

/// Moves what ended more than `after` ago to the archive, a bounded command at a time.
async fn archive(shared: &Shared, at: suanli_types::Timestamp, after: Duration) {
    let ended_before = at.plus_millis(-(after.as_millis().min(i64::MAX as u128) as i64));
    // Bounded: a backlog is worked off over a few rounds, never by one long loop.
    for round in 0..16 {
        if !shared.sm.read(|s| s.has_archivable(ended_before, at)) {
            return;
        }
        let request_id = format!("archive-{}-{round}", at.millis());
        match shared.propose(Caller::System, &request_id, Command::ArchiveEnded { ended_before }).await {
            Ok(_) => debug!(round, "archived"),
            Err(status) => {
                warn!(%status, "could not archive");
                return;
            }
        }
    }
}

/// How recently every member must have said it runs this store format for the leader to raise
/// the cluster format to it (members answer every heartbeat).
const FORMAT_HEARD_WITHIN: Duration = Duration::from_secs(3);

/// Raises the cluster format to this code's store format once every other member of the
/// membership, voters and learners, has said lately that it runs it too. A member of the
/// format before says nothing, and holds the cluster where it is.
async fn raise_cluster_format(shared: &Shared) {
    if shared.sm.read(|s| s.cluster_format()) >= FORMAT_VERSION {
        return;
    }
    // No member joins between the check and the raise.
    let _turn = shared.membership_turn.lock().await;
    let (me, members): (u64, Vec<u64>) = {
        let metrics = shared.raft.metrics().borrow().clone();
        (metrics.id, metrics.membership_config.membership().nodes().map(|(id, _)| *id).collect())
    };
    let behind: Vec<u64> = members
        .into_iter()
        .filter(|id| *id != me)
        .filter(|id| shared.peer_formats.newest(*id, FORMAT_HEARD_WITHIN).is_none_or(|f| f < FORMAT_VERSION))
        .collect();
    if !behind.is_empty() {
        debug!(?behind, "members not yet known to run store format {FORMAT_VERSION}");
        return;
    }
    let request_id = format!("raise-cluster-format-{FORMAT_VERSION}");
    match shared.propose(Caller::System, &request_id, Command::RaiseClusterFormat { to: FORMAT_VERSION }).await {
        Ok(_) => info!(format = FORMAT_VERSION, "every member runs store format {FORMAT_VERSION}: the cluster format is raised"),
        Err(status) => warn!(%status, "could not raise the cluster format"),
    }
}

/// Charges every active lease not charged for a settlement period.
async fn settle(shared: &Shared, at: suanli_types::Timestamp) {
    let due = shared.sm.read(|s| s.due_for_settlement(at, SETTLEMENT_EVERY_MS));
    for chunk in due.chunks(crate::state::machine::ledger::MAX_SETTLEMENTS_PER_COMMAND.min(4_000)) {
        // A fresh ID per round: settling twice is harmless (the second charges the difference).
        let request_id = format!("settle-{}-{}", at.millis(), chunk[0].0);
        if let Err(status) = shared.propose(Caller::System, &request_id, Command::SettleLeases { leases: chunk.to_vec() }).await {
            warn!(%status, leases = chunk.len(), "could not settle leases");
        }
    }
}
