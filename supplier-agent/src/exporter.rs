//! The agent's HTTP endpoint: Prometheus `/metrics` with the DCGM exporter's names (so an
//! existing Grafana GPU dashboard works unchanged) plus the agent's own, `/healthz`, and —
//! for simulated GPUs only — `/simulated/…` to drive load and inject faults in demos and tests.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use suanli_telemetry::simulated::Fault;

use suanli_telemetry::dcgm::escape;

use crate::runtime::{lock, Agent};

pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/simulated/cards/{index}/fault/{kind}", post(inject))
        .route("/simulated/cards/{index}/fault", delete(clear))
        .route("/simulated/cards/{index}/load/{percent}", put(load))
        .with_state(agent)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let mut text = {
        let latest = lock(&agent.latest);
        suanli_telemetry::dcgm::render_latched(&agent.hostname, &agent.cards, &latest.cards, &latest.xids)
    };
    own_metrics(&agent, &mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
}

/// The agent's own health as metrics, Prometheus-style names.
fn own_metrics(agent: &Agent, out: &mut String) {
    let (unacked, dropped) = {
        let outbox = lock(&agent.outbox);
        (outbox.unacked(), outbox.dropped_unacked())
    };
    let quality = *lock(&agent.quality);
    let c = &agent.counters;
    let families: [(&str, &str, &str, f64); 7] = [
        ("suanli_agent_samples_total", "counter", "Samples taken.", c.samples.load(Ordering::Relaxed) as f64),
        ("suanli_agent_batches_sent_total", "counter", "Telemetry batches sent to the broker.", c.batches_sent.load(Ordering::Relaxed) as f64),
        ("suanli_agent_unacked_samples", "gauge", "Samples the broker has not acknowledged yet.", unacked as f64),
        ("suanli_agent_dropped_samples_total", "counter", "Unacknowledged samples dropped because the broker was unreachable too long.", dropped as f64),
        ("suanli_agent_broker_connected", "gauge", "1 while the telemetry stream to the broker is open.", u8::from(c.connected.load(Ordering::Relaxed)) as f64),
        ("suanli_agent_broker_rtt_seconds", "gauge", "Mean TCP connect round trip to the broker.", f64::from(quality.rtt_us) / 1e6),
        ("suanli_agent_broker_packet_loss_ratio", "gauge", "Share of broker probes unanswered.", f64::from(quality.loss_ppm) / 1e6),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{hostname=\"{}\"}} {value}", escape(&agent.hostname));
    }
}

async fn healthz(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    let outbox = lock(&agent.outbox);
    Json(serde_json::json!({
        "node_id": agent.node_id,
        "connected": agent.counters.connected.load(Ordering::Relaxed),
        "acked_through": agent.counters.acked_through.load(Ordering::Relaxed),
        "next_seq": outbox.next_seq(),
        "unacked": outbox.unacked(),
        "full_telemetry": agent.full_telemetry.load(Ordering::Relaxed),
    }))
}

fn with_simulated(agent: &Agent, index: u32, f: impl FnOnce(&mut suanli_telemetry::simulated::SimulatedSource)) -> (StatusCode, String) {
    if index as usize >= agent.cards.len() {
        return (StatusCode::NOT_FOUND, format!("no card {index}\n"));
    }
    match lock(&agent.gpus).simulated() {
        Some(sim) => {
            f(sim);
            (StatusCode::NO_CONTENT, String::new())
        }
        None => (StatusCode::CONFLICT, "this agent reads real GPUs; faults can only be injected into simulated ones\n".into()),
    }
}

async fn inject(State(agent): State<Arc<Agent>>, Path((index, kind)): Path<(u32, String)>) -> (StatusCode, String) {
    let fault = match kind.as_str() {
        "fallen-off-bus" => Fault::FallenOffBus,
        "overheat" => Fault::Overheat,
        "xid-storm" => Fault::XidStorm,
        other => return (StatusCode::BAD_REQUEST, format!("unknown fault {other:?}: fallen-off-bus, overheat or xid-storm\n")),
    };
    with_simulated(&agent, index, |sim| sim.inject(index, fault))
}

async fn clear(State(agent): State<Arc<Agent>>, Path(index): Path<u32>) -> (StatusCode, String) {
    with_simulated(&agent, index, |sim| sim.clear(index))
}

async fn load(State(agent): State<Arc<Agent>>, Path((index, percent)): Path<(u32, u32)>) -> (StatusCode, String) {
    if percent > 100 {
        return (StatusCode::BAD_REQUEST, "load is a percentage, 0 to 100\n".into());
    }
    with_simulated(&agent, index, |sim| sim.set_load(index, f64::from(percent) / 100.0))
}
