//! The portal's Prometheus metrics, served on a listener of their own (`--metrics-listen`:
//! loopback or a private network, never the public port): HTTP requests by status class and
//! their latency, and the outbox — messages due and not yet sent, how long the oldest has
//! waited, messages given up on — which alerts watch (`ops/prometheus/alerts.yml`).

use std::sync::atomic::AtomicI64;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::State;
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use sqlx::Row;

use crate::db::{now_ms, opt_i64};
use crate::state::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusClass {
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    status: &'static str,
}

pub struct PortalMetrics {
    registry: Mutex<Registry>,
    requests: Family<StatusClass, Counter>,
    latency: Histogram,
    outbox_due: Gauge<i64, AtomicI64>,
    outbox_oldest_due_seconds: Gauge<i64, AtomicI64>,
    outbox_failed: Gauge<i64, AtomicI64>,
}

impl Default for PortalMetrics {
    fn default() -> Self {
        let metrics = PortalMetrics {
            registry: Mutex::new(Registry::with_prefix("suanli_portal")),
            requests: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            outbox_due: Gauge::default(),
            outbox_oldest_due_seconds: Gauge::default(),
            outbox_failed: Gauge::default(),
        };
        if let Ok(mut registry) = metrics.registry.lock() {
            registry.register("http_requests", "HTTP requests answered, by status class", metrics.requests.clone());
            registry.register("http_request_seconds", "time to answer an HTTP request", metrics.latency.clone());
            registry.register("outbox_due", "messages (mail, SMS, webhooks) due and not yet sent", metrics.outbox_due.clone());
            registry.register("outbox_oldest_due_seconds", "how long the oldest message due has waited", metrics.outbox_oldest_due_seconds.clone());
            registry.register("outbox_failed", "messages given up on after their retries", metrics.outbox_failed.clone());
        }
        metrics
    }
}

impl PortalMetrics {
    pub fn observe_request(&self, status: u16, elapsed: Duration) {
        let status = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.requests.get_or_create(&StatusClass { status }).inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// Reads the outbox's state and renders the exposition text.
    pub async fn render(&self, state: &AppState) -> Result<String, sqlx::Error> {
        let now = now_ms();
        let due = sqlx::query("SELECT COUNT(*) AS n, MIN(next_attempt_ms) AS oldest FROM outbox WHERE state = 'pending' AND next_attempt_ms <= $1")
            .bind(now)
            .fetch_one(&state.db.pool)
            .await?;
        let failed: i64 = sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE state = 'failed'").fetch_one(&state.db.pool).await?.try_get("n")?;
        self.outbox_due.set(due.try_get("n")?);
        self.outbox_oldest_due_seconds.set(opt_i64(&due, "oldest")?.map_or(0, |oldest| (now - oldest).max(0) / 1000));
        self.outbox_failed.set(failed);
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = encode(&mut out, &registry);
        }
        Ok(out)
    }
}

/// `GET /metrics` on the metrics listener.
pub async fn serve_metrics(State(state): State<AppState>) -> axum::response::Response {
    match state.metrics.render(&state).await {
        Ok(text) => ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("the database did not answer: {e}")).into_response(),
    }
}

/// The metrics listener's router.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new().route("/metrics", axum::routing::get(serve_metrics)).with_state(state)
}
