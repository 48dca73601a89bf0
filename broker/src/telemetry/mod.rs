//! Telemetry on the broker: rolling windows of what agents report ([`store`]), the health
//! rules ([`health`]) and the monitor that turns health conclusions and silent agents into
//! Raft commands.
//!
//! Samples are not replicated: agents stream them to the leader (the forwarding layer routes
//! them there), which keeps them in memory. After a leader change agents resend what they
//! retain (see `proto/suanli/v1/irmds.proto`), so the new leader's windows start with the last
//! minutes, not empty.

pub mod health;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use suanli_proto::v1;
use suanli_types::{Caller, CardHealth, CardId, NodeId};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::service::Shared;
use crate::state::Command;
use store::TelemetryStore;

/// Live samples kept for slow subscribers before they start missing some.
const LIVE_BUFFER: usize = 1024;

pub struct Telemetry {
    store: Mutex<TelemetryStore>,
    /// Broker clock when each node was last heard from (agents' clocks are not trusted for
    /// silence).
    last_heard: Mutex<HashMap<NodeId, Instant>>,
    /// Critical XIDs by card: when each was last reported.
    last_critical_xid: Mutex<HashMap<CardId, i64>>,
    /// Each card's uncorrected-ECC counter as last reported (a rise is as bad as XID 48).
    ecc_uncorrected: Mutex<HashMap<CardId, u64>>,
    /// The health each card's latest samples imply, waiting for the monitor to commit it.
    desired: Mutex<HashMap<CardId, CardHealth>>,
    live: broadcast::Sender<Arc<v1::LiveSample>>,
    silent_after: Duration,
    rules: health::HealthRules,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind: keep serving.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Telemetry {
    pub fn new(silent_after: Duration, rules: health::HealthRules) -> Arc<Self> {
        Arc::new(Telemetry {
            store: Mutex::new(TelemetryStore::new()),
            last_heard: Mutex::new(HashMap::new()),
            last_critical_xid: Mutex::new(HashMap::new()),
            ecc_uncorrected: Mutex::new(HashMap::new()),
            desired: Mutex::new(HashMap::new()),
            live: broadcast::channel(LIVE_BUFFER).0,
            silent_after,
            rules,
        })
    }

    /// The health thresholds in force.
    pub fn rules(&self) -> &health::HealthRules {
        &self.rules
    }

    pub fn store(&self) -> MutexGuard<'_, TelemetryStore> {
        lock(&self.store)
    }

    pub fn heard_from(&self, node: NodeId) {
        lock(&self.last_heard).insert(node, Instant::now());
    }

    pub fn note_critical_xid(&self, card: CardId, at_ms: i64) {
        let mut xids = lock(&self.last_critical_xid);
        let last = xids.entry(card).or_insert(at_ms);
        *last = (*last).max(at_ms);
    }

    /// Records a card's uncorrected-ECC counter; a rise since the last report counts as a
    /// critical error at `at_ms` (the first report is only the baseline). Returns whether it rose.
    pub fn note_ecc_uncorrected(&self, card: CardId, counter: u64, at_ms: i64) -> bool {
        let rose = match lock(&self.ecc_uncorrected).insert(card, counter) {
            Some(before) => counter > before,
            None => false,
        };
        if rose {
            self.note_critical_xid(card, at_ms);
        }
        rose
    }

    pub fn last_critical_xid(&self, card: CardId) -> Option<i64> {
        lock(&self.last_critical_xid).get(&card).copied()
    }

    /// Records what a card's samples imply; the monitor commits it if it differs from the state.
    pub fn want_health(&self, card: CardId, health: CardHealth) {
        lock(&self.desired).insert(card, health);
    }

    pub fn publish(&self, sample: v1::LiveSample) {
        if self.live.receiver_count() > 0 {
            // No subscriber between the check and the send is fine: nobody missed anything.
            let _ = self.live.send(Arc::new(sample));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<v1::LiveSample>> {
        self.live.subscribe()
    }
}

/// Commits health changes and detects silent agents. Runs on every node, acts only while this
/// node is the leader; the state machine ignores a change that is already recorded.
pub async fn monitor(shared: Shared, telemetry: Arc<Telemetry>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let me = shared.raft.metrics().borrow().id;
        if shared.raft.metrics().borrow().current_leader != Some(me) {
            leader_since = None;
            continue;
        }
        // A new leader has heard from nobody yet: give every agent a full silence period.
        let since = *leader_since.get_or_insert_with(Instant::now);
        let changes = pending_changes(&shared, &telemetry, since);
        if changes.is_empty() {
            continue;
        }
        let request_id = format!("health-{me}-{}", super::service::random_secret(16));
        match shared.propose(Caller::System, &request_id, Command::SetCardHealth { changes: changes.clone() }).await {
            Ok(_) => debug!(?changes, "card health committed"),
            Err(status) => warn!(%status, "could not commit card health; retrying"),
        }
    }
}

/// Desired healths that differ from the state, and silence for agents not heard from.
fn pending_changes(shared: &Shared, telemetry: &Telemetry, leader_since: Instant) -> Vec<(CardId, CardHealth)> {
    let desired: Vec<(CardId, CardHealth)> = lock(&telemetry.desired).iter().map(|(c, h)| (*c, *h)).collect();
    let heard = lock(&telemetry.last_heard).clone();
    let silent_after = telemetry.silent_after;
    let (changes, settled) = shared.sm.read(|s| {
        let mut changes = Vec::new();
        let mut settled = Vec::new();
        let mut silent_nodes = Vec::new();
        for node in s.nodes().filter(|n| n.agent_credential.is_some()) {
            let last = heard.get(&node.id).copied().map_or(leader_since, |h| h.max(leader_since));
            if last.elapsed() > silent_after {
                silent_nodes.push(node.id);
                for card in node.cards.iter().filter_map(|c| s.card(*c)) {
                    if !matches!(card.health, CardHealth::AgentSilent | CardHealth::Lost) {
                        changes.push((card.id, CardHealth::AgentSilent));
                    }
                }
            }
        }
        for (card, health) in desired {
            match s.card(card) {
                Some(c) if silent_nodes.contains(&c.node) => {}
                Some(c) if c.health != health => changes.push((card, health)),
                _ => settled.push(card),
            }
        }
        (changes, settled)
    });
    let mut desired = lock(&telemetry.desired);
    for card in settled {
        desired.remove(&card);
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rising_uncorrected_ecc_counter_is_a_critical_error() {
        let t = Telemetry::new(Duration::from_secs(10), health::HealthRules::default());
        let card = CardId(7);
        assert!(!t.note_ecc_uncorrected(card, 3, 1_000), "the first report is the baseline");
        assert_eq!(t.last_critical_xid(card), None);
        assert!(!t.note_ecc_uncorrected(card, 3, 2_000));
        assert!(t.note_ecc_uncorrected(card, 4, 3_000));
        assert_eq!(t.last_critical_xid(card), Some(3_000));
        // A reset counter (driver reload) is a new baseline, not an error.
        assert!(!t.note_ecc_uncorrected(card, 0, 4_000));
        assert_eq!(t.last_critical_xid(card), Some(3_000));
    }
}
