//! Failed-password throttling, per source address and per login: once either has failed too
//! often within the window, every further password is refused — the right one included, so a
//! guesser learns nothing — until the window has passed. Keys and certificates are never
//! throttled (the gateway does not ask), so failed passwords cannot lock a lease's holder out.
//!
//! And [`ConnectionRate`]: new connections per source address, a token bucket, so one source
//! cannot flood the gateway with handshakes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// A login may fail this many times more often than one source, since many sources may share it.
const PER_LOGIN_FACTOR: u32 = 3;
/// Entries kept before old windows are swept.
const SWEEP_ABOVE: usize = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key<'a> {
    Source(IpAddr),
    Login(&'a str),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum OwnedKey {
    Source(IpAddr),
    Login(String),
}

impl From<Key<'_>> for OwnedKey {
    fn from(k: Key<'_>) -> Self {
        match k {
            Key::Source(ip) => OwnedKey::Source(ip),
            Key::Login(l) => OwnedKey::Login(l.to_owned()),
        }
    }
}

pub struct Throttle {
    per_source: u32,
    window: Duration,
    /// Start of the current window and failures in it.
    failures: HashMap<OwnedKey, (Instant, u32)>,
}

impl Throttle {
    pub fn new(per_source: u32, window: Duration) -> Throttle {
        Throttle { per_source, window, failures: HashMap::new() }
    }

    fn limit(&self, key: &OwnedKey) -> u32 {
        match key {
            OwnedKey::Source(_) => self.per_source,
            OwnedKey::Login(_) => self.per_source.saturating_mul(PER_LOGIN_FACTOR),
        }
    }

    fn count(&self, key: OwnedKey, now: Instant) -> u32 {
        match self.failures.get(&key) {
            Some((start, n)) if now.duration_since(*start) < self.window => *n,
            _ => 0,
        }
    }

    /// Whether an attempt from `source` for `login` must be refused unheard.
    pub fn blocked(&self, now: Instant, source: IpAddr, login: &str) -> bool {
        [Key::Source(source), Key::Login(login)].into_iter().map(OwnedKey::from).any(|k| {
            let limit = self.limit(&k);
            self.count(k, now) >= limit
        })
    }

    pub fn failed(&mut self, now: Instant, source: IpAddr, login: &str) {
        if self.failures.len() > SWEEP_ABOVE {
            let window = self.window;
            self.failures.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        for key in [Key::Source(source), Key::Login(login)].map(OwnedKey::from) {
            let entry = self.failures.entry(key).or_insert((now, 0));
            if now.duration_since(entry.0) >= self.window {
                *entry = (now, 0);
            }
            entry.1 += 1;
        }
    }
}

/// New connections per source: a bucket of `per_minute` tokens, refilled continuously.
pub struct ConnectionRate {
    per_minute: u32,
    buckets: HashMap<IpAddr, (Instant, f64)>,
}

impl ConnectionRate {
    pub fn new(per_minute: u32) -> ConnectionRate {
        ConnectionRate { per_minute: per_minute.max(1), buckets: HashMap::new() }
    }

    /// Whether a connection from `source` may proceed now (taking a token if so).
    pub fn admit(&mut self, now: Instant, source: IpAddr) -> bool {
        let capacity = f64::from(self.per_minute);
        if self.buckets.len() > SWEEP_ABOVE {
            // A full bucket says nothing a fresh one would not.
            self.buckets.retain(|_, (at, tokens)| *tokens + now.duration_since(*at).as_secs_f64() * capacity / 60.0 < capacity);
        }
        let (at, tokens) = self.buckets.entry(source).or_insert((now, capacity));
        let refilled = (*tokens + now.duration_since(*at).as_secs_f64() * capacity / 60.0).min(capacity);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            true
        } else {
            *tokens = refilled;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_source_is_blocked_after_its_limit_until_the_window_passes() {
        let mut t = Throttle::new(3, Duration::from_secs(60));
        let start = Instant::now();
        for _ in 0..3 {
            assert!(!t.blocked(start, A, "sl1"));
            t.failed(start, A, "sl1");
        }
        assert!(t.blocked(start, A, "sl1"), "the fourth attempt is refused");
        assert!(t.blocked(start, A, "sl2"), "from that source, for any login");
        assert!(!t.blocked(start, B, "sl2"), "other sources and logins are not affected");
        assert!(!t.blocked(start + Duration::from_secs(61), A, "sl1"), "the window passes");
    }

    #[test]
    fn a_login_is_blocked_after_failures_from_many_sources() {
        let mut t = Throttle::new(2, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..6u8 {
            let source = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i));
            t.failed(now, source, "sl9");
        }
        assert!(t.blocked(now, IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, 1)), "sl9"));
        assert!(!t.blocked(now, IpAddr::V4(std::net::Ipv4Addr::new(10, 2, 0, 1)), "sl8"));
    }

    #[test]
    fn connections_per_source_are_capped_and_refill() {
        let mut rate = ConnectionRate::new(3);
        let now = Instant::now();
        assert!((0..3).all(|_| rate.admit(now, A)), "a burst up to the cap");
        assert!(!rate.admit(now, A), "then refused");
        assert!(rate.admit(now, B), "other sources are not affected");
        assert!(rate.admit(now + Duration::from_secs(20), A), "a token back after a third of a minute");
        assert!(!rate.admit(now + Duration::from_secs(20), A));
    }
}
