//! The running agent: one sampler (GPU source + host metrics → outbox), the uplink to the
//! broker (`uplink.rs`) and the metrics endpoint (`exporter.rs`) share an [`Agent`].

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use suanli_proto::v1;
use suanli_telemetry::dcgm::XidLatch;
use suanli_telemetry::{CardError, CardInfo, CardSample, GpuSource};
use tokio::sync::Notify;

use crate::host::{NodeReading, NodeSampler};
use crate::outbox::Outbox;
use crate::probe::Quality;
use crate::source::Gpus;

pub struct Agent {
    pub hostname: String,
    pub node_id: u64,
    pub gpus: Mutex<Gpus>,
    pub cards: Vec<CardInfo>,
    pub outbox: Mutex<Outbox>,
    /// The latest reading of each card and of the node, for `/metrics`.
    pub latest: Mutex<Latest>,
    pub quality: Mutex<Quality>,
    /// Class A nodes report availability only (the broker says which, SPEC §2).
    pub full_telemetry: AtomicBool,
    pub new_sample: Notify,
    pub counters: Counters,
    record: Option<Mutex<File>>,
}

#[derive(Default)]
pub struct Latest {
    pub cards: Vec<Result<CardSample, CardError>>,
    pub node: NodeReading,
    /// The last XID of each card, kept as DCGM keeps it, so a scrape between samples sees it.
    pub xids: XidLatch,
}

#[derive(Default)]
pub struct Counters {
    pub samples: AtomicU64,
    pub batches_sent: AtomicU64,
    pub acked_through: AtomicU64,
    pub connects: AtomicU64,
    pub connected: AtomicBool,
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Agent {
    pub fn new(hostname: String, node_id: u64, gpus: Gpus, retain: usize, record: Option<File>) -> Agent {
        let cards = gpus.cards();
        Agent {
            hostname,
            node_id,
            gpus: Mutex::new(gpus),
            cards,
            outbox: Mutex::new(Outbox::new(retain)),
            latest: Mutex::new(Latest::default()),
            quality: Mutex::new(Quality::default()),
            full_telemetry: AtomicBool::new(true),
            new_sample: Notify::new(),
            counters: Counters::default(),
            record: record.map(Mutex::new),
        }
    }

    /// Takes one sample of every card and of the node, and queues it for the broker.
    pub fn sample_once(&self, node_sampler: &mut NodeSampler) {
        let at_ms = now_ms();
        let cards = lock(&self.gpus).sample(at_ms);
        let node = node_sampler.sample();
        let quality = *lock(&self.quality);
        let full = self.full_telemetry.load(Ordering::Relaxed);
        let sample = v1::NodeSample {
            seq: 0,
            at_ms,
            node: Some(node_metrics(&node, &quality)),
            cards: self.cards.iter().zip(&cards).map(|(info, result)| card_sample(info.index, result, full)).collect(),
        };
        let seq = lock(&self.outbox).push(sample.clone());
        if let Some(file) = &self.record {
            let line = serde_json::json!({
                "seq_local": seq,
                "at_ms": at_ms,
                "cards": sample.cards.iter().map(|c| serde_json::json!({
                    "index": c.index, "present": c.present,
                    "gpu_utilization_pct": c.gpu_utilization_pct, "memory_utilization_pct": c.memory_utilization_pct,
                    "memory_used_mib": c.memory_used_mib, "temperature_c": c.temperature_c,
                    "power_draw_mw": c.power_draw_mw,
                })).collect::<Vec<_>>(),
            });
            if let Err(e) = writeln!(lock(file), "{line}") {
                tracing::warn!(error = %e, "cannot record sample");
            }
        }
        let mut latest = lock(&self.latest);
        latest.xids.observe(&cards);
        latest.cards = cards;
        latest.node = node;
        drop(latest);
        self.counters.samples.fetch_add(1, Ordering::Relaxed);
        self.new_sample.notify_one();
    }
}

fn node_metrics(n: &NodeReading, q: &Quality) -> v1::NodeMetrics {
    v1::NodeMetrics {
        cpu_utilization_permille: n.cpu_utilization_permille,
        load1_centi: n.load1_centi,
        memory_used_mib: n.memory_used_mib,
        memory_total_mib: n.memory_total_mib,
        disk_used_gib: n.disk_used_gib,
        disk_total_gib: n.disk_total_gib,
        net_rx_bytes: n.net_rx_bytes,
        net_tx_bytes: n.net_tx_bytes,
        broker_rtt_us: q.rtt_us,
        broker_jitter_us: q.jitter_us,
        packet_loss_ppm: q.loss_ppm,
    }
}

/// One card on the wire. Without full telemetry (Class A) only presence is reported.
pub fn card_sample(index: u32, result: &Result<CardSample, CardError>, full: bool) -> v1::CardSample {
    match result {
        Ok(s) if full => v1::CardSample {
            index,
            present: true,
            gpu_utilization_pct: s.gpu_utilization_pct,
            memory_utilization_pct: s.memory_utilization_pct,
            memory_used_mib: s.memory_used_mib,
            temperature_c: s.temperature_c,
            power_draw_mw: s.power_draw_mw,
            power_limit_mw: s.power_limit_mw,
            sm_clock_mhz: s.sm_clock_mhz,
            memory_clock_mhz: s.memory_clock_mhz,
            fan_pct: s.fan_pct,
            ecc_corrected: s.ecc_corrected,
            ecc_uncorrected: s.ecc_uncorrected,
            xid_events: s.xid_events.clone(),
            pcie_rx_kbps: s.pcie_rx_kbps,
            pcie_tx_kbps: s.pcie_tx_kbps,
        },
        // An unreadable card that is still on the bus counts as present.
        Ok(_) | Err(CardError::Unreadable { .. }) => v1::CardSample { index, present: true, ..Default::default() },
        Err(CardError::FallenOffBus(_)) => v1::CardSample { index, present: false, ..Default::default() },
    }
}

/// Samples every `interval` until the process ends.
pub async fn sampler(agent: std::sync::Arc<Agent>, interval: Duration) {
    let mut node_sampler = NodeSampler::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let agent = agent.clone();
        // NVML calls block; keep them off the async workers.
        node_sampler = match tokio::task::spawn_blocking(move || {
            agent.sample_once(&mut node_sampler);
            node_sampler
        })
        .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "sampling failed");
                NodeSampler::default()
            }
        };
    }
}
