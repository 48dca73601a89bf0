//! Network quality to the broker (SPEC §2 asks it of Class B): round-trip time, jitter and
//! loss, measured with TCP connects to the broker's gRPC port — no ICMP privileges needed.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// Connect attempts per measurement.
const PROBES: usize = 5;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quality {
    pub rtt_us: u32,
    pub jitter_us: u32,
    pub loss_ppm: u32,
}

/// Summarises probe outcomes: mean RTT of the answered ones, mean absolute difference of
/// consecutive RTTs (RFC 3550's jitter without the smoothing), and the share unanswered.
pub fn summarise(rtts: &[Option<Duration>]) -> Quality {
    let answered: Vec<u64> = rtts.iter().flatten().map(|d| d.as_micros() as u64).collect();
    let loss_ppm = if rtts.is_empty() { 0 } else { ((rtts.len() - answered.len()) * 1_000_000 / rtts.len()) as u32 };
    if answered.is_empty() {
        return Quality { rtt_us: 0, jitter_us: 0, loss_ppm };
    }
    let rtt_us = (answered.iter().sum::<u64>() / answered.len() as u64) as u32;
    let jitter_us = if answered.len() < 2 {
        0
    } else {
        let diffs: u64 = answered.windows(2).map(|w| w[0].abs_diff(w[1])).sum();
        (diffs / (answered.len() as u64 - 1)) as u32
    };
    Quality { rtt_us, jitter_us, loss_ppm }
}

/// Measures the path to `address` (`host:port`).
pub async fn measure(address: &str) -> Quality {
    let mut rtts = Vec::with_capacity(PROBES);
    for _ in 0..PROBES {
        let started = Instant::now();
        let answered = tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(address)).await;
        rtts.push(matches!(answered, Ok(Ok(_))).then(|| started.elapsed()));
    }
    summarise(&rtts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_probes() {
        let ms = |n| Some(Duration::from_millis(n));
        let q = summarise(&[ms(10), ms(14), None, ms(12)]);
        assert_eq!(q, Quality { rtt_us: 12_000, jitter_us: 3_000, loss_ppm: 250_000 });
        assert_eq!(summarise(&[None, None]).loss_ppm, 1_000_000);
    }
}
