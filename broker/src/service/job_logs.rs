//! The live output of job attempts (`AppendJobLog`, `ReadJobLog`): what a researcher watches
//! while a job runs.
//!
//! Output is not replicated state: it is large, it changes many times a second, and the node
//! that produced it keeps the whole of it (`job.log` in the lease's home). The leader (both
//! calls are forwarded to it) holds the most recent [`ATTEMPT_BYTES`] of each attempt in
//! memory, [`TOTAL_BYTES`] in all, the least recently written attempts dropped first. After a
//! leader change the new leader holds nothing: it answers the agent's next append with offset
//! 0, and the agent sends the attempt's output again from there, or from as far back as the
//! leader keeps (`start_here`). A reader following with offsets sees a jump in
//! `retained_from`, never a byte twice or out of place.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use suanli_types::JobId;
use tokio::sync::watch;

/// The most of one attempt's output the leader holds: its last 4 MiB.
pub const ATTEMPT_BYTES: usize = 4 << 20;
/// The most of all attempts' output the leader holds.
pub const TOTAL_BYTES: usize = 256 << 20;
/// The largest append an agent sends, and the largest read.
pub const MAX_CHUNK: usize = 1 << 20;
/// No attempt's output reaches this offset (2^62 bytes); an append past it is refused, so
/// offsets never overflow.
pub const MAX_OFFSET: u64 = 1 << 62;
/// The largest read a caller may ask for (within gRPC's 4 MiB message).
pub const MAX_READ: usize = 2 << 20;

pub type AttemptKey = (JobId, u32);

/// What an append asks of the leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Append<'a> {
    pub offset: u64,
    pub data: &'a [u8],
    /// The agent sends nothing before `offset` (more than the leader would keep): hold the
    /// attempt's output from here.
    pub start_here: bool,
}

/// A read's answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    /// Where `data` begins: the offset asked for, or the first byte still held when that is
    /// later.
    pub from: u64,
    pub data: Vec<u8>,
    pub next: u64,
    pub retained_from: u64,
    /// The end of what is held.
    pub end: u64,
}

struct Buffer {
    /// The offset of `bytes[0]` in the attempt's output.
    start: u64,
    bytes: VecDeque<u8>,
    /// When it was last written, in appends (for dropping the stalest first).
    touched: u64,
}

impl Buffer {
    fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

#[derive(Default)]
struct Inner {
    buffers: HashMap<AttemptKey, Buffer>,
    total: usize,
    appends: u64,
}

pub struct JobLogs {
    inner: Mutex<Inner>,
    attempt_bytes: usize,
    total_bytes: usize,
    /// Bumped on every append that added bytes; readers waiting for more watch it.
    changed: watch::Sender<u64>,
}

impl Default for JobLogs {
    fn default() -> Self {
        JobLogs::with_limits(ATTEMPT_BYTES, TOTAL_BYTES)
    }
}

impl JobLogs {
    pub fn with_limits(attempt_bytes: usize, total_bytes: usize) -> Self {
        JobLogs { inner: Mutex::default(), attempt_bytes, total_bytes, changed: watch::channel(0).0 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends what the agent sent; returns where its next append should begin.
    pub fn append(&self, key: AttemptKey, a: Append<'_>) -> u64 {
        let mut inner = self.lock();
        inner.appends += 1;
        let touched = inner.appends;
        let Inner { buffers, total, .. } = &mut *inner;
        let buffer = match buffers.entry(key) {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(_) if a.offset > 0 && !a.start_here => return 0, // the start first
            Entry::Vacant(none) => none.insert(Buffer { start: a.offset, bytes: VecDeque::new(), touched }),
        };
        if a.offset > buffer.end() {
            if !a.start_here {
                return buffer.end(); // no gaps unasked
            }
            // The agent skipped ahead: what is held no longer joins up with what comes.
            *total -= buffer.bytes.len();
            buffer.bytes.clear();
            buffer.start = a.offset;
        }
        buffer.touched = touched;
        // A retry, or a resend after a reply was lost, overlaps what is held: only the rest is new.
        let already = (buffer.end() - a.offset.min(buffer.end())) as usize;
        let fresh = a.data.get(already..).unwrap_or_default();
        buffer.bytes.extend(fresh);
        *total += fresh.len();
        let over = buffer.bytes.len().saturating_sub(self.attempt_bytes);
        buffer.bytes.drain(..over);
        buffer.start += over as u64;
        *total -= over;
        let next = buffer.end();
        self.shrink_to_total(&mut inner, key);
        if !fresh.is_empty() {
            self.changed.send_modify(|n| *n += 1);
        }
        next
    }

    /// Drops the least recently written attempts' output until all of it fits (never `keep`'s).
    fn shrink_to_total(&self, inner: &mut Inner, keep: AttemptKey) {
        while inner.total > self.total_bytes {
            let Some(stalest) = inner.buffers.iter().filter(|(k, _)| **k != keep).min_by_key(|(_, b)| b.touched).map(|(k, _)| *k) else { return };
            if let Some(b) = inner.buffers.remove(&stalest) {
                inner.total -= b.bytes.len();
            }
        }
    }

    /// Up to `max` bytes of the attempt's output from `from` (or from the first byte held, if
    /// later). Past the end of what is held, nothing, and `next` stays `from`: a reader ahead
    /// of a new leader (which holds the attempt's output only from where the agent sent it
    /// again) waits for the output to reach it, and never gets a byte twice. `None`: nothing of
    /// the attempt is held.
    pub fn read(&self, key: AttemptKey, from: u64, max: usize) -> Option<Chunk> {
        let inner = self.lock();
        let b = inner.buffers.get(&key)?;
        let (start, end) = (b.start, b.end());
        if from > end {
            return Some(Chunk { from, data: Vec::new(), next: from, retained_from: start, end });
        }
        let begin = from.max(start);
        let skip = (begin - start) as usize;
        let (front, back) = b.bytes.as_slices();
        let (front, back) = if skip < front.len() { (&front[skip..], back) } else { (&[][..], &back[skip - front.len()..]) };
        let (take_front, take_back) = (front.len().min(max), back.len().min(max - front.len().min(max)));
        let mut data = Vec::with_capacity(take_front + take_back);
        data.extend_from_slice(&front[..take_front]);
        data.extend_from_slice(&back[..take_back]);
        Some(Chunk { from: begin, next: begin + data.len() as u64, data, retained_from: start, end })
    }

    /// How many bytes are held in all (a gauge).
    pub fn held_bytes(&self) -> usize {
        self.lock().total
    }

    /// Wakes when any attempt's output grows.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: AttemptKey = (JobId(7), 1);

    fn append(logs: &JobLogs, offset: u64, data: &[u8]) -> u64 {
        logs.append(KEY, Append { offset, data, start_here: false })
    }

    fn held(logs: &JobLogs, key: AttemptKey) -> (u64, Vec<u8>) {
        let c = logs.read(key, 0, usize::MAX).expect("held");
        (c.from, c.data)
    }

    #[test]
    fn appends_join_up_and_a_retry_changes_nothing() {
        let logs = JobLogs::default();
        assert_eq!(append(&logs, 0, b"one\n"), 4);
        assert_eq!(append(&logs, 4, b"two\n"), 8);
        assert_eq!(append(&logs, 4, b"two\n"), 8, "the same append again");
        assert_eq!(append(&logs, 6, b"o\nthree\n"), 14, "an overlapping resend adds only what is new");
        assert_eq!(held(&logs, KEY), (0, b"one\ntwo\nthree\n".to_vec()));
    }

    #[test]
    fn a_gap_is_refused_unless_the_agent_says_it_starts_there() {
        let logs = JobLogs::default();
        append(&logs, 0, b"abc");
        assert_eq!(append(&logs, 10, b"xyz"), 3, "the leader asks for what it is missing");
        assert_eq!(held(&logs, KEY), (0, b"abc".to_vec()), "nothing changed");
        assert_eq!(logs.append(KEY, Append { offset: 10, data: b"xyz", start_here: true }), 13);
        assert_eq!(held(&logs, KEY), (10, b"xyz".to_vec()));
    }

    #[test]
    fn a_new_leader_asks_for_the_start_and_takes_a_late_start_when_told() {
        let logs = JobLogs::default();
        assert_eq!(append(&logs, 500, b"late"), 0, "it holds nothing: from the start, please");
        assert!(logs.read(KEY, 0, 10).is_none(), "nothing was kept");
        assert_eq!(logs.append(KEY, Append { offset: 100, data: b"tail", start_here: true }), 104);
        let c = logs.read(KEY, 0, 10).expect("held");
        assert_eq!((c.from, c.retained_from, c.data.as_slice(), c.next), (100, 100, &b"tail"[..], 104));
    }

    #[test]
    fn an_attempt_keeps_its_last_bytes_and_all_attempts_fit_the_total() {
        let logs = JobLogs::with_limits(8, 12);
        append(&logs, 0, b"0123456789");
        assert_eq!(held(&logs, KEY), (2, b"23456789".to_vec()), "the last 8 bytes");
        let other = (JobId(8), 1);
        logs.append(other, Append { offset: 0, data: b"abcdef", start_here: false });
        assert!(logs.read(KEY, 0, 100).is_none(), "the stalest attempt made room");
        assert_eq!(held(&logs, other), (0, b"abcdef".to_vec()));
        assert_eq!(logs.held_bytes(), 6);
    }

    #[test]
    fn reads_page_through_from_any_offset() {
        let logs = JobLogs::default();
        append(&logs, 0, b"hello world");
        let c = logs.read(KEY, 6, 3).expect("held");
        assert_eq!((c.from, c.data.as_slice(), c.next), (6, &b"wor"[..], 9));
        let c = logs.read(KEY, 99, 3).expect("held");
        assert_eq!((c.from, c.data.len(), c.next), (99, 0, 99), "past the end: nothing yet, and no step back");
    }

    #[test]
    fn a_reader_ahead_of_a_new_leader_waits_and_never_gets_a_byte_twice() {
        let logs = JobLogs::with_limits(4, 100);
        append(&logs, 0, b"0123");
        append(&logs, 4, b"4567"); // the buffer wraps inside its VecDeque
        let c = logs.read(KEY, 5, 10).expect("held");
        assert_eq!((c.from, c.data.as_slice(), c.next, c.retained_from), (5, &b"567"[..], 8, 4));
        // A new leader holds only what the agent sent again, from 20 on; the reader was at 30.
        let fresh = JobLogs::default();
        fresh.append(KEY, Append { offset: 20, data: b"0123456789", start_here: true });
        let c = fresh.read(KEY, 30, 10).expect("held");
        assert_eq!((c.from, c.data.len(), c.next), (30, 0, 30), "nothing until the output passes 30");
        fresh.append(KEY, Append { offset: 30, data: b"abc", start_here: false });
        let c = fresh.read(KEY, 30, 10).expect("held");
        assert_eq!((c.from, c.data.as_slice()), (30, &b"abc"[..]));
    }

    #[tokio::test]
    async fn a_reader_waiting_for_more_wakes_on_an_append() {
        let logs = std::sync::Arc::new(JobLogs::default());
        let mut changes = logs.subscribe();
        let writer = logs.clone();
        tokio::spawn(async move { writer.append(KEY, Append { offset: 0, data: b"x", start_here: false }) });
        changes.changed().await.expect("woken");
        assert_eq!(held(&logs, KEY).1, b"x");
    }
}
