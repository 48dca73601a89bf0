//! Rolling windows of card telemetry, kept in memory on the leader.
//!
//! Each card has a few tiers of fixed-width buckets: one-second buckets for the last minutes
//! (the raw samples, one per bucket at 1 Hz), one-minute buckets for hours and ten-minute
//! buckets for more than a day. Every sample is added to every tier, so a query for any range
//! reads the finest tier that still covers it. Buckets hold exact integer sums, never averages,
//! so aggregating buckets into wider steps loses nothing.

use std::collections::{BTreeMap, VecDeque};

use suanli_types::{CardId, NodeId};

/// A tier: buckets `width_ms` wide, at most `capacity` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tier {
    pub width_ms: i64,
    pub capacity: usize,
}

/// Two minutes of raw samples, three hours of minutes, a day and an hour of ten minutes.
pub const TIERS: [Tier; 3] = [Tier { width_ms: 1_000, capacity: 120 }, Tier { width_ms: 60_000, capacity: 180 }, Tier { width_ms: 600_000, capacity: 150 }];

/// One card's reading; `None` in a sample means the card has fallen off the bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    pub gpu_utilization_pct: u32,
    pub memory_utilization_pct: u32,
    pub memory_used_mib: u64,
    pub temperature_c: u32,
    pub power_draw_mw: u32,
}

/// Sums over the samples that fell in `[start_ms, start_ms + width)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub start_ms: i64,
    pub samples: u32,
    pub lost_samples: u32,
    pub sum_gpu_utilization_pct: u64,
    pub sum_memory_utilization_pct: u64,
    pub sum_memory_used_mib: u64,
    pub sum_temperature_c: u64,
    pub max_temperature_c: u32,
    pub sum_power_draw_mw: u64,
}

impl Bucket {
    fn empty(start_ms: i64) -> Bucket {
        Bucket { start_ms, ..Default::default() }
    }

    fn add(&mut self, reading: Option<&Reading>) {
        let Some(r) = reading else {
            self.lost_samples += 1;
            return;
        };
        self.samples += 1;
        self.sum_gpu_utilization_pct += u64::from(r.gpu_utilization_pct);
        self.sum_memory_utilization_pct += u64::from(r.memory_utilization_pct);
        self.sum_memory_used_mib += r.memory_used_mib;
        self.sum_temperature_c += u64::from(r.temperature_c);
        self.max_temperature_c = self.max_temperature_c.max(r.temperature_c);
        self.sum_power_draw_mw += u64::from(r.power_draw_mw);
    }

    fn merge(&mut self, other: &Bucket) {
        self.samples += other.samples;
        self.lost_samples += other.lost_samples;
        self.sum_gpu_utilization_pct += other.sum_gpu_utilization_pct;
        self.sum_memory_utilization_pct += other.sum_memory_utilization_pct;
        self.sum_memory_used_mib += other.sum_memory_used_mib;
        self.sum_temperature_c += other.sum_temperature_c;
        self.max_temperature_c = self.max_temperature_c.max(other.max_temperature_c);
        self.sum_power_draw_mw += other.sum_power_draw_mw;
    }
}

#[derive(Clone, Debug, Default)]
struct CardSeries {
    tiers: [VecDeque<Bucket>; TIERS.len()],
}

impl CardSeries {
    fn add(&mut self, at_ms: i64, reading: Option<&Reading>) {
        for (tier, buckets) in TIERS.iter().zip(self.tiers.iter_mut()) {
            let start = at_ms.div_euclid(tier.width_ms) * tier.width_ms;
            match buckets.back_mut() {
                Some(last) if last.start_ms == start => last.add(reading),
                // A sample older than the newest bucket (a clock stepped back) cannot be
                // placed without reordering; it is dropped from this tier only.
                Some(last) if last.start_ms > start => {}
                _ => {
                    if buckets.len() == tier.capacity {
                        buckets.pop_front();
                    }
                    let mut bucket = Bucket::empty(start);
                    bucket.add(reading);
                    buckets.push_back(bucket);
                }
            }
        }
    }

    /// The finest tier that still covers `from_ms` (one that never filled up has lost
    /// nothing), falling back to the coarsest.
    fn tier_for(&self, from_ms: i64) -> usize {
        (0..TIERS.len())
            .find(|&i| self.tiers[i].len() < TIERS[i].capacity || self.tiers[i].front().is_some_and(|b| b.start_ms <= from_ms))
            .unwrap_or(TIERS.len() - 1)
    }
}

/// What one node last sent, and its cards' series.
#[derive(Debug, Default)]
struct NodeSeries {
    stored_through_seq: u64,
    last_at_ms: i64,
    cards: BTreeMap<CardId, CardSeries>,
}

/// The result of storing one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    New,
    /// Its sequence number was at or below what the node had already stored.
    Duplicate,
}

#[derive(Debug, Default)]
pub struct TelemetryStore {
    nodes: BTreeMap<NodeId, NodeSeries>,
}

impl TelemetryStore {
    pub fn new() -> Self {
        TelemetryStore::default()
    }

    /// The last sequence number stored for `node` (0: none).
    pub fn stored_through(&self, node: NodeId) -> u64 {
        self.nodes.get(&node).map_or(0, |n| n.stored_through_seq)
    }

    /// Adds one sample of `node`; each card is `(card, reading)`.
    pub fn add(&mut self, node: NodeId, seq: u64, at_ms: i64, cards: &[(CardId, Option<Reading>)]) -> Stored {
        let series = self.nodes.entry(node).or_default();
        if seq <= series.stored_through_seq {
            return Stored::Duplicate;
        }
        series.stored_through_seq = seq;
        series.last_at_ms = series.last_at_ms.max(at_ms);
        for (card, reading) in cards {
            series.cards.entry(*card).or_default().add(at_ms, reading.as_ref());
        }
        Stored::New
    }

    /// Each card's buckets over `[from_ms, to_ms)` aggregated into steps of `step_ms`, rounded
    /// up to a multiple of the tier's width; returns the step used. Steps without samples are
    /// left out.
    pub fn query(&self, cards: &[(NodeId, CardId)], from_ms: i64, to_ms: i64, step_ms: i64) -> (i64, Vec<Vec<Bucket>>) {
        let step_ms = step_ms.max(TIERS[0].width_ms);
        let mut used_step = step_ms;
        let series = cards
            .iter()
            .map(|(node, card)| {
                let Some(s) = self.nodes.get(node).and_then(|n| n.cards.get(card)) else { return Vec::new() };
                let tier = s.tier_for(from_ms);
                let width = TIERS[tier].width_ms;
                let step = (step_ms + width - 1) / width * width;
                used_step = used_step.max(step);
                let mut out: Vec<Bucket> = Vec::new();
                for b in s.tiers[tier].iter().filter(|b| b.start_ms >= from_ms - (width - 1) && b.start_ms < to_ms) {
                    let start = b.start_ms.div_euclid(step) * step;
                    match out.last_mut() {
                        Some(last) if last.start_ms == start => last.merge(b),
                        _ => {
                            let mut fresh = Bucket::empty(start);
                            fresh.merge(b);
                            out.push(fresh);
                        }
                    }
                }
                out
            })
            .collect();
        (used_step, series)
    }

    /// Nodes and the time of their newest sample.
    pub fn last_seen(&self) -> impl Iterator<Item = (NodeId, i64)> + '_ {
        self.nodes.iter().map(|(id, n)| (*id, n.last_at_ms))
    }

    /// Forgets a node's telemetry (it was revoked or removed).
    pub fn forget(&mut self, node: NodeId) {
        self.nodes.remove(&node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(util: u32, temp: u32) -> Option<Reading> {
        Some(Reading { gpu_utilization_pct: util, temperature_c: temp, memory_used_mib: 100, ..Default::default() })
    }

    #[test]
    fn duplicates_by_sequence_are_dropped() {
        let mut store = TelemetryStore::new();
        let card = [(CardId(7), reading(50, 60))];
        assert_eq!(store.add(NodeId(1), 1, 1_000, &card), Stored::New);
        assert_eq!(store.add(NodeId(1), 1, 1_000, &card), Stored::Duplicate);
        assert_eq!(store.add(NodeId(1), 2, 2_000, &card), Stored::New);
        assert_eq!(store.stored_through(NodeId(1)), 2);
        let (_, series) = store.query(&[(NodeId(1), CardId(7))], 0, 10_000, 10_000);
        assert_eq!(series[0].len(), 1);
        assert_eq!(series[0][0].samples, 2);
    }

    #[test]
    fn steps_hold_exact_sums_and_maxima() {
        let mut store = TelemetryStore::new();
        let base = 1_700_000_000_000;
        for i in 0..60u32 {
            let r = if i == 30 { None } else { reading(i, 40 + i % 7) };
            store.add(NodeId(1), u64::from(i) + 1, base + i64::from(i) * 1_000, &[(CardId(3), r)]);
        }
        let (step, series) = store.query(&[(NodeId(1), CardId(3))], base, base + 60_000, 10_000);
        assert_eq!(step, 10_000);
        let points = &series[0];
        let total: u32 = points.iter().map(|b| b.samples).sum();
        assert_eq!(total, 59);
        assert_eq!(points.iter().map(|b| b.lost_samples).sum::<u32>(), 1);
        let want_util: u64 = (0..60u64).filter(|i| *i != 30).sum();
        assert_eq!(points.iter().map(|b| b.sum_gpu_utilization_pct).sum::<u64>(), want_util);
        assert_eq!(points.iter().map(|b| b.max_temperature_c).max(), Some(46));
    }

    #[test]
    fn old_ranges_come_from_coarser_tiers() {
        let mut store = TelemetryStore::new();
        let base = 1_700_000_400_000; // a whole number of ten-minute buckets
                                      // Two hours at one sample per second: the raw tier keeps two minutes only.
        for i in 0..7_200i64 {
            store.add(NodeId(1), i as u64 + 1, base + i * 1_000, &[(CardId(1), reading(10, 50))]);
        }
        let (step, series) = store.query(&[(NodeId(1), CardId(1))], base, base + 7_200_000, 1_000);
        assert_eq!(step, 60_000, "an hour-old start needs the minute tier");
        assert_eq!(series[0].iter().map(|b| b.samples).sum::<u32>(), 7_200);
        let (step, series) = store.query(&[(NodeId(1), CardId(1))], base + 7_140_000, base + 7_200_000, 1_000);
        assert_eq!(step, 1_000);
        assert_eq!(series[0].len(), 60);
    }
}
