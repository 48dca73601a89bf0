//! `cargo bench -p suanli-broker --bench cluster` — lease request+end throughput and latency
//! of a 3-node broker cluster on loopback, against etcd (3 members on loopback) driven by the
//! same client harness at the same concurrency and payload size; then leader failover time.
//!
//! Each operation is two replicated writes: Suanli `RequestLease` (1 card) + `EndLease`;
//! etcd a conditional create (`Txn`: create_revision == 0 → put) + `DeleteRange` of its own key.
//! Clients spread over the three members; followers forward to the leader in both systems.
//!
//! Flags: `--clients 1,16,256`, `--seconds 10`, `--failovers 20`, `--no-etcd`, `--leader-only`
//! (Suanli clients call the leader directly, as a leader-aware client would).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{self, register};
use suanli_types::ClusterClass;
use tonic::transport::{Channel, Endpoint};

// ---- a minimal subset of etcd's v3 KV API, by field number --------------------------------

mod etcd {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteRangeRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeleteRangeResponse {
        #[prost(int64, tag = "2")]
        pub deleted: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Compare {
        /// 0 = EQUAL
        #[prost(int32, tag = "1")]
        pub result: i32,
        /// 1 = CREATE (create_revision)
        #[prost(int32, tag = "2")]
        pub target: i32,
        #[prost(bytes = "vec", tag = "3")]
        pub key: Vec<u8>,
        #[prost(int64, tag = "5")]
        pub create_revision: i64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct RequestOp {
        #[prost(message, optional, tag = "2")]
        pub request_put: Option<PutRequest>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TxnRequest {
        #[prost(message, repeated, tag = "1")]
        pub compare: Vec<Compare>,
        #[prost(message, repeated, tag = "2")]
        pub success: Vec<RequestOp>,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TxnResponse {
        #[prost(bool, tag = "2")]
        pub succeeded: bool,
    }
}

async fn etcd_unary<Req, Resp>(channel: &Channel, path: &'static str, request: Req) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    Ok(grpc.unary(tonic::Request::new(request), path, tonic_prost::ProstCodec::default()).await?.into_inner())
}

// ---- harness -------------------------------------------------------------------------------

struct Args {
    clients: Vec<usize>,
    seconds: u64,
    failovers: usize,
    etcd: bool,
    /// Suanli clients talk to the leader only (a leader-aware client), no forwarding hop.
    leader_only: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { clients: vec![1, 16, 256], seconds: 10, failovers: 20, etcd: true, leader_only: false };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--clients" => a.clients = it.next().context("--clients N,N")?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--seconds" => a.seconds = it.next().context("--seconds N")?.parse()?,
            "--failovers" => a.failovers = it.next().context("--failovers N")?.parse()?,
            "--no-etcd" => a.etcd = false,
            "--leader-only" => a.leader_only = true,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct Run {
    ops: usize,
    errors: usize,
    latencies_us: Vec<u64>,
    elapsed: Duration,
}

impl Run {
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 - 1.0) * p).round() as usize;
        self.latencies_us[i] as f64 / 1000.0
    }
}

/// Runs `clients` loops of `op` for `seconds`, each client on its own channel to one member.
async fn drive<F, Fut>(channels: &[Channel], clients: usize, seconds: u64, op: F) -> Run
where
    F: Fn(Channel, usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let channel = channels[c % channels.len()].clone();
            let (op, stop) = (op.clone(), stop.clone());
            tokio::spawn(async move {
                let mut run = Run::default();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let t = Instant::now();
                    if op(channel.clone(), c, seq).await {
                        run.ops += 1;
                        run.latencies_us.push(t.elapsed().as_micros() as u64);
                    } else {
                        run.errors += 1;
                    }
                }
                run
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Run::default();
    for t in tasks {
        if let Ok(run) = t.await {
            total.ops += run.ops;
            total.errors += run.errors;
            total.latencies_us.extend(run.latencies_us);
        }
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    total
}

async fn channels(addresses: &[String]) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for a in addresses {
        // One HTTP/2 connection per member per 32 clients, as a real client pool would.
        for _ in 0..8 {
            out.push(Endpoint::from_shared(format!("http://{a}"))?.tcp_nodelay(true).connect().await?);
        }
    }
    // Interleave members so consecutive clients hit different members.
    let per = 8;
    let members = addresses.len();
    Ok((0..out.len()).map(|i| out[(i % members) * per + i / members].clone()).collect())
}

// ---- Suanli ---------------------------------------------------------------------------------

struct Market {
    researcher_token: String,
    cluster_id: u64,
}

/// A supplier with one Class B cluster of 8 nodes × 64 cards, and a researcher.
async fn market(cluster: &BrokerCluster) -> anyhow::Result<Market> {
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    let mut platform = cluster.client(leader, PLATFORM_TOKEN).await?;
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "bench-supplier").await?;
    let (_, researcher_token) = register(&mut platform, AccountKind::Researcher, "bench-researcher").await?;
    let mut supplier = cluster.client(leader, &supplier_token).await?;
    let cluster_id = fixtures::publish(&mut supplier, ClusterClass::B, 8, 64, "bench").await?.cluster_id;
    Ok(Market { researcher_token, cluster_id })
}

fn lease_request(cluster_id: u64, request_id: String) -> v1::RequestLeaseRequest {
    v1::RequestLeaseRequest { request_id, cluster_id, node_ids: vec![], cards: 1, billing_mode: v1::BillingMode::Hourly.into(), periods: 1 }
}

async fn suanli_op(channel: Channel, token: Arc<String>, cluster_id: u64, client: usize, seq: u64, round: usize) -> bool {
    let Ok(mut c) = suanli_proto::client::with_token(channel, Some(&token)) else { return false };
    let Ok(lease) = c.request_lease(lease_request(cluster_id, format!("r{round}-c{client}-{seq}"))).await else { return false };
    let end = v1::EndLeaseRequest {
        request_id: format!("e{round}-c{client}-{seq}"),
        lease_id: lease.into_inner().lease_id,
        reason: v1::EndReason::ByResearcher.into(),
    };
    c.end_lease(end).await.is_ok()
}

/// kill -9 the leader, time until a write succeeds through a surviving node, restart, repeat.
async fn failovers(cluster: &mut BrokerCluster, market: &Market, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for k in 0..kills {
        let leader = cluster.leader(Duration::from_secs(30)).await?;
        let survivors: Vec<u64> = cluster.live().into_iter().filter(|id| *id != leader).collect();
        let mut clients = Vec::new();
        for id in &survivors {
            clients.push(cluster.client(*id, &market.researcher_token).await?);
        }
        cluster.kill(leader).await?;
        let killed = Instant::now();
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            let n = clients.len();
            let client = &mut clients[attempt % n];
            let mut request = tonic::Request::new(lease_request(market.cluster_id, format!("failover-{k}")));
            request.set_timeout(Duration::from_millis(500));
            if client.request_lease(request).await.is_ok() {
                times.push(killed.elapsed());
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no write succeeded within 30 s of killing node {leader}");
            }
        }
        cluster.restart(leader).await?;
        cluster.converge(Duration::from_secs(30)).await?;
    }
    times.sort();
    Ok(times)
}

// ---- etcd -----------------------------------------------------------------------------------

struct Etcd {
    /// Killed on drop (`kill_on_drop`).
    _children: Vec<tokio::process::Child>,
    clients: Vec<String>,
    _dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_etcd() -> anyhow::Result<Etcd> {
    let binary = which("etcd").context("etcd not found: run ops/install-bench-deps")?;
    let dir = tempfile::TempDir::new()?;
    let ports: Vec<(u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
    let initial = ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect::<Vec<_>>().join(",");
    let mut children = Vec::new();
    let mut clients = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let log = std::fs::File::create(dir.path().join(format!("etcd-{i}.log")))?;
        let child = tokio::process::Command::new(&binary)
            .args([
                "--name",
                &format!("e{i}"),
                "--data-dir",
                &dir.path().join(format!("e{i}")).display().to_string(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "suanli-bench",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        children.push(child);
        clients.push(format!("127.0.0.1:{client}"));
    }
    // Ready when a write commits (needs a leader).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Endpoint::from_shared(format!("http://{}", clients[0]))?.connect().await {
            let put = etcd::TxnRequest {
                compare: vec![],
                success: vec![etcd::RequestOp { request_put: Some(etcd::PutRequest { key: b"ready".to_vec(), value: vec![] }) }],
            };
            if etcd_unary::<_, etcd::TxnResponse>(&channel, "/etcdserverpb.KV/Txn", put).await.is_ok() {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("etcd did not become ready; logs in {}", dir.path().display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Etcd { _children: children, clients, _dir: dir })
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

async fn etcd_op(channel: Channel, payload: Arc<Vec<u8>>, client: usize, seq: u64, round: usize) -> bool {
    let key = format!("lease/{round}/{client}/{seq}").into_bytes();
    let create = etcd::TxnRequest {
        compare: vec![etcd::Compare { result: 0, target: 1, key: key.clone(), create_revision: 0 }],
        success: vec![etcd::RequestOp { request_put: Some(etcd::PutRequest { key: key.clone(), value: payload.to_vec() }) }],
    };
    match etcd_unary::<_, etcd::TxnResponse>(&channel, "/etcdserverpb.KV/Txn", create).await {
        Ok(r) if r.succeeded => {}
        _ => return false,
    }
    etcd_unary::<_, etcd::DeleteRangeResponse>(&channel, "/etcdserverpb.KV/DeleteRange", etcd::DeleteRangeRequest { key }).await.is_ok_and(|r| r.deleted == 1)
}

// ---- main -----------------------------------------------------------------------------------

fn row(name: &str, clients: usize, run: &Run) -> String {
    format!(
        "| {name:<6} | {clients:>7} | {:>9.0} | {:>8.2} | {:>8.2} | {:>6} |",
        run.throughput(),
        run.percentile_ms(0.50),
        run.percentile_ms(0.99),
        run.errors
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let binary = Path::new(env!("CARGO_BIN_EXE_suanli-broker"));
    let mut cluster = BrokerCluster::start_with(binary, 3, Some("[broker]\nsnapshot_every_entries = 100000\n"), false).await?;
    let market = market(&cluster).await?;
    let mut addresses: Vec<String> = cluster.ids().iter().map(|id| cluster.address(*id).map(str::to_owned)).collect::<anyhow::Result<_>>()?;
    if args.leader_only {
        addresses = vec![cluster.address(cluster.leader(Duration::from_secs(20)).await?)?.to_owned()];
    }
    let suanli_channels = channels(&addresses).await?;
    let token = Arc::new(market.researcher_token.clone());
    // The etcd value is as large as Suanli's encoded lease request.
    let payload_len = prost::Message::encoded_len(&lease_request(market.cluster_id, "r0-c000-0000000".into()));
    let payload = Arc::new(vec![b'x'; payload_len]);

    let etcd = if args.etcd { Some(start_etcd().await?) } else { None };
    let etcd_channels = match &etcd {
        Some(e) => Some(channels(&e.clients).await?),
        None => None,
    };

    println!("3 members each on loopback, {} s per run; op = lease request + end (2 writes); payload {payload_len} B", args.seconds);
    println!();
    println!("| system | clients | ops/s     | p50 ms   | p99 ms   | errors |");
    println!("|--------|--------:|----------:|---------:|---------:|-------:|");
    let mut ratios = Vec::new();
    for (round, clients) in args.clients.iter().copied().enumerate() {
        let (t, id) = (token.clone(), market.cluster_id);
        let ours = drive(&suanli_channels, clients, args.seconds, move |ch, c, seq| suanli_op(ch, t.clone(), id, c, seq, round)).await;
        println!("{}", row("suanli", clients, &ours));
        if let Some(channels) = &etcd_channels {
            let p = payload.clone();
            let theirs = drive(channels, clients, args.seconds, move |ch, c, seq| etcd_op(ch, p.clone(), c, seq, round)).await;
            println!("{}", row("etcd", clients, &theirs));
            ratios.push((clients, ours.throughput() / theirs.throughput()));
        }
    }
    println!();
    for (clients, ratio) in ratios {
        println!("throughput ratio suanli/etcd at {clients:>3} clients: {ratio:.2}");
    }
    drop(etcd);

    if args.failovers > 0 {
        let times = failovers(&mut cluster, &market, args.failovers).await?;
        let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0;
        println!();
        println!(
            "leader failover (kill -9 -> first successful write), {} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            times.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0)
        );
    }
    Ok(())
}
