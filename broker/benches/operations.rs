//! `cargo bench -p suanli-broker --bench operations` — operating a 3-node broker cluster that
//! holds a market's history: `--clusters` Class B clusters (default 10,000) and `--leases`
//! leases requested and ended (default 100,000), written through the API. Then, measured:
//!
//! 1. **Upgrade availability**: a lease storm (`--workers` clients, each request retried with its
//!    ID until answered) against the cluster as it is, for `--storm-seconds`; then the same storm
//!    while the cluster is upgraded node by node from the previous release
//!    (`ops/build-previous-release`) to this build, followers first, until the cluster format is
//!    raised. Failed calls and latency of the two side by side.
//! 2. **Backup**: `suanli-broker backup` of the running cluster, its time and size.
//! 3. **Restore (RTO)**: `suanli-broker restore` into new directories and ports and a 3-node
//!    cluster from it, until every node has applied the restored state; every lease is there.
//!
//! `--no-upgrade` starts the cluster on this build and skips (1).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{leases_as_applied, previous_release_broker, BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{self, register};
use suanli_testkit::storm::{self, History, Storm};
use suanli_types::ClusterClass;

struct Args {
    clusters: usize,
    leases: usize,
    workers: usize,
    storm_seconds: u64,
    upgrade: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { clusters: 10_000, leases: 100_000, workers: 16, storm_seconds: 20, upgrade: true };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> anyhow::Result<usize> { Ok(it.next().with_context(|| format!("{name} N"))?.parse()?) };
        match arg.as_str() {
            "--clusters" => a.clusters = number("--clusters")?,
            "--leases" => a.leases = number("--leases")?,
            "--workers" => a.workers = number("--workers")?,
            "--storm-seconds" => a.storm_seconds = number("--storm-seconds")? as u64,
            "--no-upgrade" => a.upgrade = false,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn this_broker() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-broker"))
}

/// How many calls run at once while the history is written.
const WRITERS: usize = 128;

/// Runs `op(i)` for every `i` in `0..n`, `WRITERS` at a time; fails on the first error.
async fn in_parallel<F, Fut>(n: usize, op: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    op(i).await?;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Runs `call` until it succeeds, at most 50 times: every call here carries its request ID,
/// so a retry after a lost answer or a leader change applies once.
async fn retrying<T, F, Fut>(mut call: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0;
    loop {
        match call().await {
            Ok(value) => return Ok(value),
            Err(e) if tries >= 50 => return Err(e),
            Err(_) => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Suppliers publishing `clusters` clusters of one node and 2 cards, and researchers
/// requesting and ending `leases` leases across them: a market's history.
async fn write_history(cluster: &BrokerCluster, clusters: usize, leases: usize) -> anyhow::Result<()> {
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    let mut platform = cluster.client(leader, PLATFORM_TOKEN).await?;
    let mut suppliers = Vec::new();
    let mut researchers = Vec::new();
    for n in 0..16 {
        suppliers.push(cluster.client(leader, &register(&mut platform, AccountKind::Supplier, &format!("history-supplier-{n}")).await?.1).await?);
        researchers.push(cluster.client(leader, &register(&mut platform, AccountKind::Researcher, &format!("history-researcher-{n}")).await?.1).await?);
    }
    let started = Instant::now();
    let (suppliers, researchers) = (Arc::new(suppliers), Arc::new(researchers));
    let ids = Arc::new(std::sync::Mutex::new(Vec::with_capacity(clusters)));
    let (s, published) = (suppliers.clone(), ids.clone());
    in_parallel(clusters, move |i| {
        let (supplier, published) = (s[i % s.len()].clone(), published.clone());
        async move {
            let c = retrying(|| {
                let mut supplier = supplier.clone();
                async move { fixtures::publish(&mut supplier, ClusterClass::B, 1, 2, &format!("history-{i}")).await }
            })
            .await?;
            published.lock().expect("ids").push(c.cluster_id);
            Ok(())
        }
    })
    .await?;
    println!("  {clusters} clusters published in {:.1} s", started.elapsed().as_secs_f64());
    let ids = Arc::new(std::mem::take(&mut *ids.lock().expect("ids")));
    let started = Instant::now();
    in_parallel(leases, move |i| {
        let (researcher, ids) = (researchers[i % researchers.len()].clone(), ids.clone());
        async move {
            let request = storm::lease_request(ids[i % ids.len()], format!("history-{i}"));
            let lease = retrying(|| {
                let (mut c, r) = (researcher.clone(), request.clone());
                async move { Ok(c.request_lease(r).await?.into_inner()) }
            })
            .await?;
            let end = v1::EndLeaseRequest { request_id: format!("history-end-{i}"), lease_id: lease.lease_id, reason: v1::EndReason::ByResearcher.into() };
            retrying(|| {
                let (mut c, r) = (researcher.clone(), end.clone());
                async move { Ok(c.end_lease(r).await.map(drop)?) }
            })
            .await
        }
    })
    .await?;
    println!("  {leases} leases requested and ended in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Stops a storm started at `started` once it has run `seconds`.
async fn stop_after(storm: Storm, started: Instant, seconds: u64) -> (History, Duration) {
    tokio::time::sleep_until((started + Duration::from_secs(seconds)).into()).await;
    let history = storm.stop().await;
    (history, started.elapsed())
}

/// Upgrades every node to this build, followers first, and waits for the cluster format to be
/// raised.
async fn upgrade(cluster: &mut BrokerCluster) -> anyhow::Result<()> {
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    let mut order: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != leader).collect();
    order.push(leader);
    for id in order {
        cluster.upgrade(id, this_broker()).await?;
        if let Err(e) = cluster.converge(Duration::from_secs(120)).await {
            for node in cluster.ids() {
                let log = cluster.log(node);
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("--- node {node}'s log, last lines ---\n{}", lines[lines.len().saturating_sub(40)..].join("\n"));
            }
            return Err(e.context(format!("after upgrading node {id}")));
        }
    }
    suanli_testkit::eventually(Duration::from_secs(60), Duration::from_millis(100), || async {
        for id in cluster.live() {
            if cluster.status(id).await.ok()?.cluster_format < 6 {
                return None;
            }
        }
        Some(())
    })
    .await
}

fn directory_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        total += if meta.is_dir() { 0 } else { meta.len() };
    }
    Ok(total)
}

fn storm_row(name: &str, h: &History, took: Duration) -> String {
    format!(
        "| {name} | {:.1} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
        took.as_secs_f64(),
        h.acked().len(),
        h.failed_calls(),
        h.unknown() + h.refused().values().sum::<usize>(),
        h.latency_quantile(0.5).as_secs_f64() * 1e3,
        h.latency_quantile(0.99).as_secs_f64() * 1e3,
        h.latency_quantile(1.0).as_secs_f64() * 1e3,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let first: PathBuf = if args.upgrade { previous_release_broker()? } else { this_broker().to_owned() };
    println!("3 broker nodes on loopback (first running {}), {} clusters, {} leases", first.display(), args.clusters, args.leases);
    let mut cluster = BrokerCluster::start_with(&first, 3, None, false).await?;
    write_history(&cluster, args.clusters, args.leases).await?;
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    let market = storm::market(&cluster, leader, 16).await;

    if args.upgrade {
        println!("\n| storm of {} clients | s | acknowledged | failed calls | unanswered | p50 ms | p99 ms | max ms |", args.workers);
        println!("|---|---|---|---|---|---|---|---|");
        let (steady, took) = stop_after(Storm::start(&cluster, &market, args.workers), Instant::now(), args.storm_seconds).await;
        println!("{}", storm_row("steady, previous release", &steady, took));
        let (storm, started) = (Storm::start(&cluster, &market, args.workers), Instant::now());
        upgrade(&mut cluster).await?;
        let (during, took) = stop_after(storm, started, args.storm_seconds).await;
        println!("{}", storm_row("rolling upgrade to this build", &during, took));
        println!(
            "\nupgrade / steady: p99 {:.2}×, failed calls {} vs {}",
            during.latency_quantile(0.99).as_secs_f64() / steady.latency_quantile(0.99).as_secs_f64().max(1e-9),
            during.failed_calls(),
            steady.failed_calls()
        );
    }

    cluster.converge(Duration::from_secs(120)).await?;
    let work = tempfile::tempdir()?;
    let backup = work.path().join("backup");
    let started = Instant::now();
    cluster.backup(&backup).await?;
    let backup_took = started.elapsed();
    let size = directory_bytes(&backup)?;
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    let original = leases_as_applied(&cluster.client(leader, PLATFORM_TOKEN).await?, false).await?.len();

    let started = Instant::now();
    let restored = BrokerCluster::restore(this_broker(), &backup, 3).await?;
    restored.converge(Duration::from_secs(300)).await?;
    let rto = started.elapsed();
    let mut counts = Vec::new();
    for id in restored.ids() {
        counts.push(leases_as_applied(&restored.client(id, PLATFORM_TOKEN).await?, false).await?.len());
    }
    if counts.iter().any(|c| *c != original) {
        bail!("the restored cluster's nodes hold {counts:?} leases; the backed-up one {original}");
    }
    println!("\n| operation | seconds | bytes |");
    println!("|---|---|---|");
    println!("| backup of the running cluster ({original} leases) | {:.2} | {size} |", backup_took.as_secs_f64());
    println!("| restore: 3 new nodes, every one applied the backup (RTO) | {:.2} | |", rto.as_secs_f64());
    Ok(())
}
