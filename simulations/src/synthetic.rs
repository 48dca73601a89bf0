//! A synthetic workload: Poisson arrivals with a Philly-like mix of gang sizes and durations.
//!
//! The mix is measured from `sia/philly.csv` (82,247 Philly jobs, 2017): gang sizes with
//! their observed frequencies ([`PHILLY_SIZES`]); durations log-normal with the log-mean and
//! log-standard-deviation of the same jobs' durations (μ = 6.79, σ = 2.16: median 19 min,
//! a heavy tail), clipped to `[60 s, max_duration_s]`.

use crate::engine::{Job, Work};
use crate::rng::SplitMix64;

/// `(GPUs, jobs)` in `sia/philly.csv`.
pub const PHILLY_SIZES: [(u32, u32); 10] = [(1, 76_627), (2, 1_818), (4, 1_870), (8, 1_643), (12, 7), (16, 199), (24, 7), (32, 67), (64, 6), (128, 3)];
pub const PHILLY_LOG_MEAN: f64 = 6.79;
pub const PHILLY_LOG_SD: f64 = 2.16;

#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    pub jobs: usize,
    /// Mean arrivals per hour.
    pub jobs_per_hour: f64,
    /// Sizes above this are left out of the mix (the cluster could never run them).
    pub max_gpus: u32,
    pub max_duration_s: f64,
    pub seed: u64,
}

pub fn generate(config: &SyntheticConfig) -> Vec<Job> {
    let mut rng = SplitMix64::new(config.seed);
    let sizes: Vec<(u32, u32)> = PHILLY_SIZES.iter().copied().filter(|&(g, _)| g <= config.max_gpus.max(1)).collect();
    let total: u64 = sizes.iter().map(|&(_, n)| u64::from(n)).sum();
    let mut t = 0.0;
    (0..config.jobs)
        .map(|i| {
            t += rng.exponential(3600.0 / config.jobs_per_hour.max(1e-9));
            let mut pick = rng.next_u64() % total.max(1);
            let mut gpus = 1;
            for &(g, n) in &sizes {
                if pick < u64::from(n) {
                    gpus = g;
                    break;
                }
                pick -= u64::from(n);
            }
            let duration = (PHILLY_LOG_MEAN + PHILLY_LOG_SD * rng.normal()).exp().clamp(60.0, config.max_duration_s.max(60.0));
            Job {
                name: format!("syn-{i}"),
                workload: format!("seed-{}", config.seed),
                submit_s: t.round(),
                gpus,
                type_key: "synthetic".into(),
                models: vec![],
                share_milli: None,
                work: Work::Seconds(duration.round()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_jobs_and_a_philly_like_mix() {
        let config = SyntheticConfig { jobs: 5_000, jobs_per_hour: 30.0, max_gpus: 64, max_duration_s: 7.0 * 86_400.0, seed: 3 };
        let a = generate(&config);
        assert_eq!(a, generate(&config));
        assert_ne!(a, generate(&SyntheticConfig { seed: 4, ..config.clone() }));
        let single = a.iter().filter(|j| j.gpus == 1).count() as f64 / a.len() as f64;
        assert!((0.9..0.96).contains(&single), "{single}");
        assert!(a.iter().all(|j| j.gpus <= 64));
        let hours = a.last().map_or(0.0, |j| j.submit_s) / 3600.0;
        assert!((hours - 5_000.0 / 30.0).abs() < 15.0, "{hours}");
    }
}
