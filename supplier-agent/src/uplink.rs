//! Streams the outbox to the broker over `MonitoringService.StreamTelemetry`, reconnecting
//! (to the next broker endpoint) whenever the stream breaks.
//!
//! Backpressure: at most `IN_FLIGHT_BATCHES` batches are sent ahead of the broker's
//! acknowledgements; beyond that the agent stops sending and the outbox absorbs the samples
//! (keeping the newest `retain_samples`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use suanli_proto::decode_status;
use suanli_proto::v1::{self, monitoring_service_client::MonitoringServiceClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::identity::BrokerTls;
use crate::runtime::{lock, Agent};

const IN_FLIGHT_BATCHES: usize = 4;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub async fn run(agent: Arc<Agent>, brokers: Vec<String>, tls: BrokerTls, max_batch: usize) {
    let mut backoff = MIN_BACKOFF;
    let mut which = 0usize;
    loop {
        let endpoint = &brokers[which % brokers.len()];
        let Err(why) = stream_once(&agent, endpoint, &tls, max_batch).await;
        tracing::warn!(broker = %endpoint, %why, "telemetry stream broke; reconnecting");
        if agent.counters.connected.swap(false, Ordering::Relaxed) {
            // It worked until now: retry soon, same broker first (it forwards to any new leader).
            backoff = MIN_BACKOFF;
        } else {
            which += 1;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        tokio::time::sleep(backoff).await;
    }
}

/// One connection: runs until the stream breaks.
async fn stream_once(agent: &Agent, endpoint: &str, tls: &BrokerTls, max_batch: usize) -> Result<std::convert::Infallible, String> {
    let channel = tls.connect(endpoint).await.map_err(|e| e.to_string())?;
    let mut client = MonitoringServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<v1::TelemetryBatch>(IN_FLIGHT_BATCHES);
    let describe = |status: tonic::Status| {
        let e = decode_status(&status);
        let fields: Vec<String> = e.fields.iter().map(|f| f.to_string()).collect();
        format!("{}: {} {}", e.code.as_str(), e.message, fields.join("; "))
    };
    let mut acks = client.stream_telemetry(ReceiverStream::new(rx)).await.map_err(describe)?.into_inner();
    let first = acks.message().await.map_err(describe)?.ok_or("the broker closed the stream at once")?;
    lock(&agent.outbox).reconnected(first.stored_through_seq);
    agent.full_telemetry.store(first.full_telemetry, Ordering::Relaxed);
    agent.counters.connects.fetch_add(1, Ordering::Relaxed);
    agent.counters.connected.store(true, Ordering::Relaxed);
    tracing::info!(broker = %endpoint, stored_through = first.stored_through_seq, "telemetry stream open");
    // Batches sent and not yet acknowledged; the broker acknowledges each batch once.
    let mut in_flight: usize = 0;
    loop {
        while in_flight < IN_FLIGHT_BATCHES {
            let batch = lock(&agent.outbox).next_batch(max_batch);
            if batch.is_empty() {
                break;
            }
            // Never waits: the channel holds IN_FLIGHT_BATCHES and no more are unacknowledged.
            tx.send(v1::TelemetryBatch { samples: batch }).await.map_err(|_| "the stream's sender closed")?;
            in_flight += 1;
            agent.counters.batches_sent.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            ack = acks.message() => match ack {
                Ok(Some(ack)) => {
                    in_flight = in_flight.saturating_sub(1);
                    lock(&agent.outbox).acked(ack.stored_through_seq);
                    agent.counters.acked_through.fetch_max(ack.stored_through_seq, Ordering::Relaxed);
                    agent.full_telemetry.store(ack.full_telemetry, Ordering::Relaxed);
                }
                Ok(None) => return Err("the broker ended the stream".into()),
                Err(status) => return Err(describe(status)),
            },
            _ = agent.new_sample.notified() => {}
        }
    }
}
