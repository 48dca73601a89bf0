//! `cargo bench -p suanli-broker --bench telemetry` — telemetry ingestion on one broker node.
//!
//! Starts a real broker process, enrolls `--nodes` agents of `--cards` cards each (through
//! enrollment tokens, as agents do), opens one `StreamTelemetry` per node on the agent port
//! (mutual TLS, each with its own client certificate) and pushes batches of
//! `--batch` samples as fast as the acknowledgements allow (4 batches in flight per stream, as
//! the agent does) for `--seconds`. Reports acknowledged card-samples per second and per
//! second of the broker's CPU time (utime + stime from /proc), against the target load of
//! 100,000 cards at 1 Hz. Baseline in the same run: the same card-samples through the broker's
//! in-process `TelemetryStore` alone (no gRPC, no validation) — the ceiling of this design.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use suanli_broker::telemetry::store::{Reading, TelemetryStore};
use suanli_proto::client::bearer;
use suanli_proto::convert::inventory_to_wire;
use suanli_proto::v1::{self, monitoring_service_client::MonitoringServiceClient, supplier_service_client::SupplierServiceClient, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{self, register};
use suanli_types::{CardId, NodeId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

const TARGET_CARD_SAMPLES_PER_S: f64 = 100_000.0;
const IN_FLIGHT: usize = 4;

struct Args {
    nodes: u64,
    cards: u32,
    seconds: u64,
    batch: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { nodes: 100, cards: 8, seconds: 10, batch: 20 };
    let raw: Vec<String> = std::env::args().skip(1).filter(|s| s != "--bench").collect();
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("flag needs a value");
        match flag.as_str() {
            "--nodes" => a.nodes = value()?.parse()?,
            "--cards" => a.cards = value()?.parse()?,
            "--seconds" => a.seconds = value()?.parse()?,
            "--batch" => a.batch = value()?.parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    suanli_testkit::process::cpu_seconds(pid).with_context(|| format!("reading /proc/{pid}/stat"))
}

fn sample(seq: u64, at_ms: i64, cards: u32) -> v1::NodeSample {
    v1::NodeSample {
        seq,
        at_ms,
        node: Some(v1::NodeMetrics { cpu_utilization_permille: 300, memory_used_mib: 1024, ..Default::default() }),
        cards: (0..cards)
            .map(|index| v1::CardSample {
                index,
                present: true,
                gpu_utilization_pct: (seq % 100) as u32,
                memory_utilization_pct: 40,
                memory_used_mib: 1000,
                temperature_c: 60,
                power_draw_mw: 200_000,
                power_limit_mw: 350_000,
                ..Default::default()
            })
            .collect(),
    }
}

fn store_baseline(a: &Args) -> f64 {
    let mut store = TelemetryStore::new();
    let now = suanli_broker::service::now().millis();
    let reading = Some(Reading { gpu_utilization_pct: 50, memory_utilization_pct: 40, memory_used_mib: 1000, temperature_c: 60, power_draw_mw: 200_000 });
    let cards: Vec<Vec<(CardId, Option<Reading>)>> = (0..a.nodes).map(|n| (0..a.cards).map(|c| (CardId(n * 1000 + u64::from(c)), reading)).collect()).collect();
    let started = Instant::now();
    let mut card_samples = 0u64;
    let mut seq = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        seq += 1;
        for (n, node_cards) in cards.iter().enumerate() {
            store.add(NodeId(n as u64), seq, now + seq as i64 * 1000, node_cards);
            card_samples += node_cards.len() as u64;
        }
    }
    card_samples as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let binary = suanli_testkit::workspace_binary("suanli-broker", "suanli-broker")?;
    let cluster = BrokerCluster::start_with(&binary, 1, None, false).await?;
    let endpoint = format!("http://{}", cluster.address(1)?);
    let mut platform = cluster.client(1, PLATFORM_TOKEN).await?;
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "bench-supplier").await?;
    let channel = suanli_proto::client::channel(&endpoint).await?;
    let mut supplier = SupplierServiceClient::with_interceptor(channel.clone(), bearer(Some(&supplier_token))?);
    // Agents enroll and stream on the agent port, by mutual TLS, as the real agent does.
    let agent_port = cluster.agent_endpoint(1)?;
    let ca = Certificate::from_pem(std::fs::read_to_string(cluster.agent_ca_cert())?);
    let tls = || ClientTlsConfig::new().ca_certificate(ca.clone());
    let anonymous = suanli_proto::client::channel_with(&agent_port, Some(tls())).await?;
    let mut identities = Vec::new();
    for n in 0..a.nodes {
        let token =
            supplier.create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id: format!("t-{n}"), valid_seconds: 600 }).await?.into_inner().token;
        let key = suanli_pki::new_private_key()?;
        let enrolled = SupplierServiceClient::new(anonymous.clone())
            .enroll_agent(v1::EnrollAgentRequest {
                request_id: format!("e-{n}"),
                enrollment_token: token,
                csr_pem: suanli_pki::signing_request(&key, &format!("bench-{n}"))?,
                inventory: Some(inventory_to_wire(&fixtures::inventory(&format!("bench-{n}"), a.cards))),
            })
            .await?
            .into_inner();
        identities.push(Identity::from_pem(enrolled.certificate_pem, key));
    }

    let acked = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let pid = cluster.pid(1).context("broker pid")?;
    let cpu_before = cpu_seconds(pid)?;
    let load_cpu_before = cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let mut streams = Vec::new();
    for identity in identities {
        let channel = suanli_proto::client::channel_with(&agent_port, Some(tls().identity(identity))).await?;
        let acked = acked.clone();
        let (cards, batch) = (a.cards, a.batch);
        streams.push(tokio::spawn(async move {
            let mut client = MonitoringServiceClient::new(channel);
            let (tx, rx) = mpsc::channel(IN_FLIGHT);
            let mut acks = client.stream_telemetry(ReceiverStream::new(rx)).await?.into_inner();
            acks.message().await?;
            // Samples 100 ms apart starting two hours back: all within the accepted range.
            let base = suanli_broker::service::now().millis() - 7_200_000;
            let mut seq = 0u64;
            let mut in_flight = 0;
            while Instant::now() < deadline {
                while in_flight < IN_FLIGHT {
                    let samples = (0..batch)
                        .map(|_| {
                            seq += 1;
                            sample(seq, base + seq as i64 * 100, cards)
                        })
                        .collect();
                    tx.send(v1::TelemetryBatch { samples }).await?;
                    in_flight += 1;
                }
                if acks.message().await?.is_none() {
                    break;
                }
                in_flight -= 1;
                acked.fetch_add((batch as u64) * u64::from(cards), Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for s in streams {
        s.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let load_cpu = cpu_seconds(std::process::id())? - load_cpu_before;
    // A reading no process could produce means the reading, not the broker, is off.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    anyhow::ensure!(cpu > 0.0 && cpu <= elapsed * cores + 0.05, "broker CPU reading {cpu:.2} s over {elapsed:.1} s wall on {cores} cores cannot be right");
    let total = acked.load(Ordering::Relaxed) as f64;
    let rate = total / elapsed;
    let per_cpu = total / cpu.max(0.01);
    let baseline = store_baseline(&a);
    println!("telemetry ingestion, one broker node: {} streams × {} cards, batches of {}, {} s", a.nodes, a.cards, a.batch, a.seconds);
    println!("{:<44} {:>14}", "measure", "card-samples/s");
    println!("{:<44} {:>14.0}", "end to end (gRPC, validated, stored, acked)", rate);
    println!("{:<44} {:>14.0}", "end to end per broker CPU-second", per_cpu);
    println!("{:<44} {:>14.0}", "baseline: TelemetryStore::add alone, 1 core", baseline);
    println!("broker CPU {cpu:.1} s, load generator CPU {load_cpu:.1} s, over {elapsed:.1} s wall on {cores} cores");
    println!("ratio end-to-end per CPU-second / store baseline: {:.3}", per_cpu / baseline);
    println!(
        "cores needed for 100,000 cards at 1 Hz: {:.2} (target per core met: {})",
        TARGET_CARD_SAMPLES_PER_S / per_cpu,
        per_cpu >= TARGET_CARD_SAMPLES_PER_S
    );
    Ok(())
}
