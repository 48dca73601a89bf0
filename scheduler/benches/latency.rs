//! Submit-to-placed latency through the real service under load.
//!
//! Starts a broker and one scheduler replica (the binary), enrolls `--nodes` nodes of 8 cards
//! (no agents: the supplier activates the lease itself, and placed jobs are never started, so
//! each card takes one job), leases every card, then submits `--jobs` one-card jobs from 16
//! concurrent clients as fast as the broker takes them. A job's latency is read from its own
//! record — placed_at − submitted_at, both stamped by the broker, so no client clock or
//! polling is in it. Prints p50/p90/p99/max, submissions/s and placements/s, and the p50 as a
//! ratio of the scheduler's round (the floor: a job waits for the next round).
//!
//! `SUANLI_BENCH_BROKER=…/debug/suanli-broker cargo bench -p suanli-scheduler --bench latency -- --nodes 125 --jobs 1000 --round-ms 200`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use suanli_proto::convert::{cluster_class_to_wire, inventory_to_wire, listing_to_wire};
use suanli_proto::v1::{self, job_service_client::JobServiceClient, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{inventory, listing, register};
use suanli_testkit::{workspace_binary, Service};
use suanli_types::ClusterClass;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (nodes, jobs, round_ms) = (arg("--nodes", 125), arg("--jobs", 1000), arg("--round-ms", 200));
    let broker_bin = std::env::var("SUANLI_BENCH_BROKER").map(PathBuf::from).or_else(|_| workspace_binary("suanli-broker", "suanli-broker"))?;
    let broker = BrokerCluster::start_with(&broker_bin, 1, None, false).await?;
    broker.leader(Duration::from_secs(20)).await?;
    let endpoint = format!("http://{}", broker.address(1)?);
    let mut platform = broker.client(1, PLATFORM_TOKEN).await?;
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "bench-supplier").await?;
    let (_, researcher_token) = register(&mut platform, AccountKind::Researcher, "bench-researcher").await?;
    let mut supplier = broker.client(1, &supplier_token).await?;
    let mut node_ids = Vec::new();
    for n in 0..nodes {
        let inv = inventory_to_wire(&inventory(&format!("bench-{n}"), 8));
        let node = supplier.enroll_node(v1::EnrollNodeRequest { request_id: format!("node-{n}"), inventory: Some(inv) }).await?.into_inner();
        node_ids.push(node.node_id);
    }
    let cluster = supplier
        .publish_cluster(v1::PublishClusterRequest {
            request_id: "publish".into(),
            class: cluster_class_to_wire(ClusterClass::B),
            node_ids,
            listing: Some(listing_to_wire(&listing(ClusterClass::B))),
        })
        .await?
        .into_inner()
        .cluster_id;
    let mut researcher = broker.client(1, &researcher_token).await?;
    let lease = researcher.request_lease(suanli_testkit::fixtures::hourly_lease("lease", cluster, (nodes * 8) as u32)).await?.into_inner();
    supplier.activate_lease(v1::LeaseRef { request_id: "activate".into(), lease_id: lease.lease_id }).await?;

    let dir = tempfile::tempdir()?;
    let args: Vec<String> =
        ["--broker", &endpoint, "--token", PLATFORM_TOKEN, "--name", "bench", "--policy", "las", "--round-ms", &round_ms.to_string(), "--lease-ttl-ms", "5000"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let _scheduler = Service::start("scheduler", Path::new(env!("CARGO_BIN_EXE_suanli-scheduler")), &args, &[], dir.path(), Duration::from_secs(20)).await?;

    let channel = suanli_proto::client::channel(&endpoint).await?;
    let client = JobServiceClient::with_interceptor(channel, suanli_proto::client::bearer(Some(&researcher_token))?);
    let spec = serde_json::json!({"name": "bench", "kind": "training", "resources": {"cards": 1}, "run": {"command": {"program": "/bin/true"}}}).to_string();
    let started = Instant::now();
    let submitted: Vec<anyhow::Result<u64>> = stream::iter(0..jobs)
        .map(|i| {
            let (mut c, spec) = (client.clone(), spec.clone());
            async move { Ok(c.submit_job(v1::SubmitJobRequest { request_id: format!("j{i}"), spec_json: spec }).await?.into_inner().job_id) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let submit_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(submitted.iter().all(Result::is_ok), "a submission failed");
    let all = loop {
        let list = suanli_proto::client::all_jobs(&client, false).await?;
        if list.iter().filter(|j| j.state == "placed").count() as u64 >= jobs {
            break list;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "not all jobs were placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let placed_secs = started.elapsed().as_secs_f64();
    let mut latency: Vec<i64> = all.iter().filter_map(|j| j.attempts.first().map(|a| a.placed_at_ms - j.submitted_at_ms)).collect();
    latency.sort_unstable();
    let p50 = percentile(&latency, 0.5);
    println!("submit-to-placed, {jobs} one-card jobs onto {} leased cards, scheduler round {round_ms} ms (LAS)", nodes * 8);
    println!("| submitted/s | all placed after | p50 ms | p90 ms | p99 ms | max ms | p50 / round |");
    println!("|--:|--:|--:|--:|--:|--:|--:|");
    println!(
        "| {:.0} | {:.2} s | {p50} | {} | {} | {} | {:.2} |",
        jobs as f64 / submit_secs,
        placed_secs,
        percentile(&latency, 0.9),
        percentile(&latency, 0.99),
        latency.last().copied().unwrap_or(0),
        p50 as f64 / round_ms as f64
    );
    Ok(())
}
