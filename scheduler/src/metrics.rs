//! The scheduler replica's Prometheus metrics (`--metrics-listen`): rounds by outcome and how
//! long each took, whether this replica is the acting one, and what the rounds decided.

use std::sync::atomic::AtomicI64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::service::RoundReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    /// `acting` (this replica scheduled), `standby` (another holds the lease) or `failed`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decision {
    /// `placed`, `refused`, `stopped`, `auto_leased` or `released`.
    decision: &'static str,
}

pub struct SchedulerMetrics {
    registry: Mutex<Registry>,
    rounds: Family<Outcome, Counter>,
    round_seconds: Histogram,
    acting: Gauge<i64, AtomicI64>,
    decisions: Family<Decision, Counter>,
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        let metrics = SchedulerMetrics {
            registry: Mutex::new(Registry::with_prefix("suanli_scheduler")),
            rounds: Family::default(),
            round_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            acting: Gauge::default(),
            decisions: Family::default(),
        };
        if let Ok(mut registry) = metrics.registry.lock() {
            registry.register("rounds", "scheduling rounds by outcome", metrics.rounds.clone());
            registry.register("round_seconds", "time one round took", metrics.round_seconds.clone());
            registry.register("acting", "1 while this replica holds the scheduler lease and schedules", metrics.acting.clone());
            registry.register("decisions", "what rounds decided, by kind", metrics.decisions.clone());
        }
        metrics
    }
}

impl SchedulerMetrics {
    pub fn observe_round(&self, result: &Result<RoundReport, String>, took: Duration) {
        self.round_seconds.observe(took.as_secs_f64());
        let outcome = match result {
            Ok(report) if report.acting => "acting",
            Ok(_) => "standby",
            Err(_) => "failed",
        };
        self.rounds.get_or_create(&Outcome { outcome }).inc();
        // A replica that cannot reach the broker schedules nothing, whatever lease it held.
        self.acting.set(i64::from(matches!(result, Ok(report) if report.acting)));
        if let Ok(report) = result {
            for (decision, n) in [
                ("placed", report.placed),
                ("refused", report.refused),
                ("stopped", report.stopped),
                ("auto_leased", report.auto_leased),
                ("released", report.released),
            ] {
                self.decisions.get_or_create(&Decision { decision }).inc_by(n as u64);
            }
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = encode(&mut out, &registry);
        }
        out
    }
}
