//! Samples waiting for the broker, and the recent ones it already has.
//!
//! Every sample gets the next sequence number. The outbox keeps the last `retain` samples,
//! acknowledged or not: when the agent reconnects, the broker says which sequence it holds
//! for this node, and everything retained beyond that is sent again — to the same leader
//! that is nothing (it drops duplicates by sequence), to a new leader it is the last minutes
//! of history. When the broker is unreachable for longer than `retain` samples, the oldest
//! unacknowledged ones are dropped and counted.
//!
//! A restarted agent numbers from 1 again; on its first connection the broker's stored
//! sequence tells it where the node's sequence stands, and the samples taken before that
//! connection are renumbered to follow it, so nothing is mistaken for a duplicate.

use std::collections::VecDeque;

use suanli_proto::v1;

pub struct Outbox {
    samples: VecDeque<v1::NodeSample>,
    retain: usize,
    next_seq: u64,
    /// Highest sequence handed to the sender on the current connection.
    sent_through: u64,
    /// Highest sequence the broker acknowledged.
    acked_through: u64,
    dropped_unacked: u64,
    connected_before: bool,
}

impl Outbox {
    pub fn new(retain: usize) -> Self {
        Outbox { samples: VecDeque::with_capacity(retain), retain, next_seq: 1, sent_through: 0, acked_through: 0, dropped_unacked: 0, connected_before: false }
    }

    /// Assigns the next sequence number to `sample` and keeps it.
    pub fn push(&mut self, mut sample: v1::NodeSample) -> u64 {
        sample.seq = self.next_seq;
        self.next_seq += 1;
        if self.samples.len() == self.retain {
            if let Some(oldest) = self.samples.pop_front() {
                if oldest.seq > self.acked_through {
                    self.dropped_unacked += 1;
                }
            }
        }
        self.samples.push_back(sample);
        self.next_seq - 1
    }

    /// A new connection: the broker holds everything through `stored_through`; send the rest.
    pub fn reconnected(&mut self, stored_through: u64) {
        if !std::mem::replace(&mut self.connected_before, true) {
            self.continue_after(stored_through);
        }
        self.acked_through = self.acked_through.max(stored_through);
        self.sent_through = stored_through;
    }

    /// Renumbers the samples of a fresh start to follow what the broker already holds.
    fn continue_after(&mut self, stored_through: u64) {
        let first = self.samples.front().map_or(self.next_seq, |s| s.seq);
        if stored_through < first {
            return;
        }
        let shift = stored_through + 1 - first;
        for sample in &mut self.samples {
            sample.seq += shift;
        }
        self.next_seq += shift;
    }

    /// The next batch to send (at most `max` samples), marked as sent.
    pub fn next_batch(&mut self, max: usize) -> Vec<v1::NodeSample> {
        let batch: Vec<v1::NodeSample> = self.samples.iter().filter(|s| s.seq > self.sent_through).take(max).cloned().collect();
        if let Some(last) = batch.last() {
            self.sent_through = last.seq;
        }
        batch
    }

    pub fn acked(&mut self, through: u64) {
        self.acked_through = self.acked_through.max(through);
    }

    pub fn unacked(&self) -> usize {
        self.samples.iter().filter(|s| s.seq > self.acked_through).count()
    }

    pub fn dropped_unacked(&self) -> u64 {
        self.dropped_unacked
    }

    /// The sequence number the next sample will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: i64) -> v1::NodeSample {
        v1::NodeSample { at_ms, ..Default::default() }
    }

    fn seqs(batch: &[v1::NodeSample]) -> Vec<u64> {
        batch.iter().map(|s| s.seq).collect()
    }

    #[test]
    fn sends_each_sample_once_per_connection_and_resends_what_a_new_broker_lacks() {
        let mut outbox = Outbox::new(10);
        for i in 0..5 {
            outbox.push(sample(i));
        }
        outbox.reconnected(0);
        assert_eq!(seqs(&outbox.next_batch(3)), [1, 2, 3]);
        assert_eq!(seqs(&outbox.next_batch(3)), [4, 5]);
        assert!(outbox.next_batch(3).is_empty());
        outbox.acked(5);
        assert_eq!(outbox.unacked(), 0);
        // The same leader after a reconnect: it has everything, nothing is resent.
        outbox.reconnected(5);
        assert!(outbox.next_batch(10).is_empty());
        // A new leader with nothing: the retained window is sent again.
        outbox.reconnected(0);
        assert_eq!(seqs(&outbox.next_batch(10)), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn an_unreachable_broker_costs_only_the_oldest_samples_and_they_are_counted() {
        let mut outbox = Outbox::new(4);
        for i in 0..6 {
            outbox.push(sample(i));
        }
        assert_eq!(outbox.dropped_unacked(), 2);
        outbox.reconnected(0);
        assert_eq!(seqs(&outbox.next_batch(10)), [3, 4, 5, 6]);
    }

    #[test]
    fn a_restart_continues_the_sequence_the_broker_holds() {
        let mut outbox = Outbox::new(4);
        outbox.push(sample(0));
        outbox.push(sample(1));
        outbox.reconnected(1_000);
        assert_eq!(seqs(&outbox.next_batch(10)), [1_001, 1_002]);
        assert_eq!(outbox.push(sample(2)), 1_003);
        // Only the first connection renumbers: later ones resend.
        outbox.reconnected(0);
        assert_eq!(seqs(&outbox.next_batch(10)), [1_001, 1_002, 1_003]);
    }
}
