//! Prometheus metrics, served at `/metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::storage::{LogStore, Raft, StateMachineStore};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    /// `cluster_ca`, `client_port`, `agent_port` or `peer_port`.
    certificate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<MethodLabel, Histogram>,
    term: Gauge<i64, std::sync::atomic::AtomicI64>,
    leader: Gauge<i64, std::sync::atomic::AtomicI64>,
    last_log_index: Gauge<u64, AtomicU64>,
    applied_index: Gauge<u64, AtomicU64>,
    apply_lag: Gauge<u64, AtomicU64>,
    snapshot_index: Gauge<u64, AtomicU64>,
    snapshot_bytes: Gauge<u64, AtomicU64>,
    committed_index: Gauge<u64, AtomicU64>,
    /// Commands refused before they were proposed (`Shared::precheck`).
    pub refused_before_proposal: Counter,
    /// Requests per log entry this node proposed (`batcher.rs`).
    pub requests_per_entry: Histogram,
    /// Bytes of running jobs' output this node holds (`job_logs.rs`; the leader's).
    pub job_log_bytes: Gauge<i64, std::sync::atomic::AtomicI64>,
    certificate_expiry: Family<CertificateLabel, Gauge<i64, std::sync::atomic::AtomicI64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut metrics = Metrics {
            registry: Mutex::new(Registry::with_prefix("suanli_broker")),
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 18))),
            term: Gauge::default(),
            leader: Gauge::default(),
            last_log_index: Gauge::default(),
            applied_index: Gauge::default(),
            apply_lag: Gauge::default(),
            snapshot_index: Gauge::default(),
            snapshot_bytes: Gauge::default(),
            committed_index: Gauge::default(),
            refused_before_proposal: Counter::default(),
            requests_per_entry: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            job_log_bytes: Gauge::default(),
            certificate_expiry: Family::default(),
        };
        // Metric handles share their values with their clones, so the registry holds clones.
        let registry = metrics.registry.get_mut().unwrap_or_else(|p| p.into_inner());
        registry.register("requests", "gRPC requests by method and result code", metrics.requests.clone());
        registry.register("request_seconds", "gRPC request latency", metrics.latency.clone());
        registry.register("raft_term", "current Raft term", metrics.term.clone());
        registry.register("raft_leader", "current leader's node id, -1 when unknown", metrics.leader.clone());
        registry.register("raft_last_log_index", "last log index", metrics.last_log_index.clone());
        registry.register("raft_applied_index", "last applied log index", metrics.applied_index.clone());
        registry.register("raft_apply_lag", "log entries not yet applied", metrics.apply_lag.clone());
        registry.register("raft_snapshot_index", "log index of the last snapshot", metrics.snapshot_index.clone());
        registry.register("raft_snapshot_bytes", "size of the last snapshot built or installed", metrics.snapshot_bytes.clone());
        registry.register("raft_committed_index", "last committed log index known to this node", metrics.committed_index.clone());
        registry.register(
            "refused_before_proposal",
            "commands refused without entering the log: the caller may not send them, or they are malformed",
            metrics.refused_before_proposal.clone(),
        );
        registry.register(
            "requests_per_entry",
            "requests each log entry this node proposed carried (more than one: they arrived together and were batched)",
            metrics.requests_per_entry.clone(),
        );
        registry.register("job_log_bytes", "bytes of job attempts' output held in memory for researchers to watch", metrics.job_log_bytes.clone());
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "when each certificate this node serves or trusts stops being valid (Unix seconds)",
            metrics.certificate_expiry.clone(),
        );
        metrics
    }

    /// Records when `certificate` (PEM) expires; an unreadable one is left out (and logged).
    pub fn observe_certificate(&self, certificate: &'static str, pem: &str) {
        match suanli_pki::pem_certificate_not_after(pem) {
            Ok(not_after) => self.observe_expiry(certificate, not_after),
            Err(e) => tracing::warn!(certificate, error = %e, "cannot read a certificate's expiry"),
        }
    }

    /// Records that `certificate` expires at `not_after` (Unix seconds).
    pub fn observe_expiry(&self, certificate: &'static str, not_after: i64) {
        self.certificate_expiry.get_or_create(&CertificateLabel { certificate }).set(not_after);
    }

    pub fn observe_request(&self, method: &'static str, code: String, elapsed: Duration) {
        self.requests.get_or_create(&RequestLabels { method, code }).inc();
        self.latency.get_or_create(&MethodLabel { method }).observe(elapsed.as_secs_f64());
    }

    /// Renders the exposition text, refreshing the Raft gauges first.
    pub fn render(&self, raft: &Raft, log: &LogStore, sm: &StateMachineStore) -> String {
        self.committed_index.set(log.committed_index());
        self.snapshot_bytes.set(sm.last_snapshot_bytes());
        let m = raft.metrics().borrow().clone();
        self.term.set(m.current_term as i64);
        self.leader.set(m.current_leader.map_or(-1, |l| l as i64));
        let last_log = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        self.last_log_index.set(last_log);
        self.applied_index.set(applied);
        // Committed but not yet applied: how far the state machine trails the log.
        self.apply_lag.set(log.committed_index().saturating_sub(applied));
        self.snapshot_index.set(m.snapshot.map_or(0, |l| l.index));
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = encode(&mut out, &registry);
        }
        out
    }
}
