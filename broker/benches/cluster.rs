//! `cargo bench -p suanli-broker --bench cluster` — lease request+end throughput and latency
//! of a 3-node broker cluster on loopback, against etcd (3 members on loopback) driven by the
//! same client harness at the same concurrency and payload size; then leader failover time.
//!
//! Each operation is two replicated writes: Suanli `RequestLease` (1 card) + `EndLease`;
//! etcd a conditional create (`Txn`: create_revision == 0 → put) + `DeleteRange` of its own key.
//! Clients spread over the three members; followers forward to the leader in both systems.
//! Suanli's clients act as one researcher per 32 clients on four 512-card clusters, so that
//! neither a researcher's cap on waiting leases nor the cards run out at 1,024 clients.
//!
//! Flags: `--clients 1,16,256`, `--seconds 10`, `--failovers 20`, `--no-etcd`, `--leader-only`
//! (Suanli clients call the leader directly, as a leader-aware client would), `--also-timing
//! HEARTBEAT,MIN,MAX` (the failovers once more on a cluster with these Raft timeouts in ms, the
//! baseline for a change of them: `100,400,800` were the timeouts before 2026-12-06).

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
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
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
    /// Raft timeouts (heartbeat, election min, max) of a second cluster whose failovers are
    /// measured too.
    also_timing: Option<[u64; 3]>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { clients: vec![1, 16, 256], seconds: 10, failovers: 20, etcd: true, leader_only: false, also_timing: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--clients" => a.clients = it.next().context("--clients N,N")?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--seconds" => a.seconds = it.next().context("--seconds N")?.parse()?,
            "--failovers" => a.failovers = it.next().context("--failovers N")?.parse()?,
            "--no-etcd" => a.etcd = false,
            "--leader-only" => a.leader_only = true,
            "--also-timing" => {
                let ms: Vec<u64> = it.next().context("--also-timing HEARTBEAT,MIN,MAX")?.split(',').map(str::parse).collect::<Result<_, _>>()?;
                a.also_timing = Some(ms.try_into().map_err(|_| anyhow::anyhow!("--also-timing takes three numbers"))?);
            }
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
    /// Researchers' tokens: client `c` acts as researcher `c % len`.
    researcher_tokens: Vec<String>,
    /// Clusters: client `c` leases from cluster `c % len`.
    cluster_ids: Vec<u64>,
}

/// Clients per researcher: below the broker's cap on one researcher's waiting leases (a
/// Class B lease waits for its agent, and no agent runs here), so 1,024 clients are refused
/// nothing a real crowd of researchers would not be.
const CLIENTS_PER_RESEARCHER: usize = 32;

/// A supplier with four Class B clusters of 8 nodes × 64 cards (2,048 cards: every client of
/// the largest run can hold a lease at once, each cluster as large as before), and
/// `researchers` researchers.
async fn market(cluster: &BrokerCluster, researchers: usize) -> anyhow::Result<Market> {
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    let mut platform = cluster.client(leader, PLATFORM_TOKEN).await?;
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "bench-supplier").await?;
    let mut researcher_tokens = Vec::new();
    for r in 0..researchers.max(1) {
        researcher_tokens.push(register(&mut platform, AccountKind::Researcher, &format!("bench-researcher-{r}")).await?.1);
    }
    let mut supplier = cluster.client(leader, &supplier_token).await?;
    let mut cluster_ids = Vec::new();
    for c in 0..4 {
        cluster_ids.push(fixtures::publish(&mut supplier, ClusterClass::B, 8, 64, &format!("bench-{c}")).await?.cluster_id);
    }
    Ok(Market { researcher_tokens, cluster_ids })
}

fn lease_request(cluster_id: u64, request_id: String) -> v1::RequestLeaseRequest {
    v1::RequestLeaseRequest { request_id, cluster_id, node_ids: vec![], cards: 1, billing_mode: v1::BillingMode::Hourly.into(), periods: 1 }
}

async fn suanli_op(channel: Channel, market: Arc<Market>, client: usize, seq: u64, round: usize) -> bool {
    let token = &market.researcher_tokens[client % market.researcher_tokens.len()];
    let cluster_id = market.cluster_ids[client % market.cluster_ids.len()];
    let Ok(mut c) = suanli_proto::client::with_token(channel, Some(token)) else { return false };
    let lease = match c.request_lease(lease_request(cluster_id, format!("r{round}-c{client}-{seq}"))).await {
        Ok(lease) => lease,
        Err(status) => return said_why(&status),
    };
    let end = v1::EndLeaseRequest {
        request_id: format!("e{round}-c{client}-{seq}"),
        lease_id: lease.into_inner().lease_id,
        reason: v1::EndReason::ByResearcher.into(),
    };
    match c.end_lease(end).await {
        Ok(_) => true,
        Err(status) => said_why(&status),
    }
}

/// Prints why an operation failed, for the first few failures of the process; `false`.
fn said_why(status: &tonic::Status) -> bool {
    static SAID: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if SAID.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("suanli op failed: {:?} {}", status.code(), status.message());
    }
    false
}

/// How long after `killed` the first write succeeds, trying `attempt(k)` for k = 1, 2, …
/// back to back (each attempt bounded by its own 500 ms timeout, as a client would).
async fn first_write_after<F, Fut>(killed: Instant, mut attempt: F) -> anyhow::Result<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for k in 1.. {
        if tokio::time::timeout(ATTEMPT_TIMEOUT, attempt(k)).await.unwrap_or(false) {
            return Ok(killed.elapsed());
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no write succeeded within 30 s of the kill");
        }
    }
    unreachable!("the loop above only ends by returning")
}

const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

/// kill -9 the leader, time until a write succeeds through a surviving node, restart, repeat.
async fn failovers(cluster: &mut BrokerCluster, market: &Market, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for k in 0..kills {
        let leader = cluster.leader(Duration::from_secs(30)).await?;
        let survivors: Vec<u64> = cluster.live().into_iter().filter(|id| *id != leader).collect();
        let mut clients = Vec::new();
        for id in &survivors {
            // A researcher per kill in turn: each kill leaves a lease waiting (no agent runs).
            clients.push(cluster.client(*id, &market.researcher_tokens[k % market.researcher_tokens.len()]).await?);
        }
        let term_before = cluster.status(leader).await?.term;
        // Where each survivor's log stands, to show a slow kill's elections (with
        // `SUANLI_LOG=info,openraft=info` the brokers log their votes).
        let logged: Vec<usize> = survivors.iter().map(|id| cluster.log(*id).len()).collect();
        cluster.kill(leader).await?;
        let killed = Instant::now();
        let attempts = std::sync::atomic::AtomicUsize::new(0);
        let took = first_write_after(killed, |attempt| {
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut client = clients[attempt % clients.len()].clone();
            let request = lease_request(market.cluster_ids[0], format!("failover-{k}"));
            async move { client.request_lease(request).await.is_ok() }
        })
        .await
        .with_context(|| format!("killing broker node {leader}"))?;
        times.push(took);
        // Per kill, for the slow ones' cause: more than one term passed = a split vote or a
        // lost election.
        let status = cluster.status(survivors[0]).await?;
        eprintln!(
            "kill {k}: node {leader} killed, node {} leads after {} term(s), first write after {} ms and {} attempts",
            status.leader_id,
            status.term - term_before,
            took.as_millis(),
            attempts.into_inner()
        );
        if took > Duration::from_secs(1) {
            for (id, from) in survivors.iter().zip(logged) {
                let log = cluster.log(*id);
                let election = log.get(from..).unwrap_or_default().lines().filter(|l| ["vote", "elect", "leader", "greater"].iter().any(|w| l.contains(w)));
                for line in election {
                    eprintln!("  node {id}: {line}");
                }
            }
        }
        cluster.restart(leader).await?;
        cluster.converge(Duration::from_secs(30)).await?;
    }
    times.sort();
    Ok(times)
}

/// The same for etcd: kill -9 its leader, time until a put succeeds through a survivor.
async fn etcd_failovers(etcd: &mut Etcd, kills: usize) -> anyhow::Result<Vec<Duration>> {
    let mut times = Vec::new();
    for k in 0..kills {
        let leader = etcd.leader(Duration::from_secs(30)).await?;
        let mut survivors = Vec::new();
        for (i, address) in etcd.clients.iter().enumerate().filter(|(i, _)| *i != leader) {
            survivors.push((i, Endpoint::from_shared(format!("http://{address}"))?.tcp_nodelay(true).connect().await?));
        }
        etcd.kill(leader).await?;
        let killed = Instant::now();
        let took = first_write_after(killed, |attempt| {
            let channel = survivors[attempt % survivors.len()].1.clone();
            let put = etcd::TxnRequest {
                compare: vec![],
                success: vec![etcd::RequestOp { request_put: Some(etcd::PutRequest { key: format!("failover-{k}").into_bytes(), value: vec![] }) }],
            };
            async move { etcd_unary::<_, etcd::TxnResponse>(&channel, "/etcdserverpb.KV/Txn", put).await.is_ok() }
        })
        .await
        .with_context(|| format!("killing etcd member {leader}"))?;
        times.push(took);
        etcd.spawn(leader)?;
        etcd.converge(Duration::from_secs(30)).await?;
    }
    times.sort();
    Ok(times)
}

// ---- etcd -----------------------------------------------------------------------------------

struct Etcd {
    binary: PathBuf,
    /// Each member's command line; its process while it runs (killed on drop: `kill_on_drop`).
    members: Vec<(Vec<String>, Option<tokio::process::Child>)>,
    clients: Vec<String>,
    dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    async fn start() -> anyhow::Result<Etcd> {
        let binary = which("etcd").context("etcd not found: run ops/install-bench-deps")?;
        let dir = tempfile::TempDir::new()?;
        let ports: Vec<(u16, u16)> = (0..3).map(|_| Ok((free_port()?, free_port()?))).collect::<anyhow::Result<_>>()?;
        let initial = ports.iter().enumerate().map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}")).collect::<Vec<_>>().join(",");
        let mut etcd = Etcd { binary, members: Vec::new(), clients: Vec::new(), dir };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let args = [
                "--name".to_owned(),
                format!("e{i}"),
                "--data-dir".to_owned(),
                etcd.dir.path().join(format!("e{i}")).display().to_string(),
                "--listen-client-urls".to_owned(),
                format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls".to_owned(),
                format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls".to_owned(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls".to_owned(),
                format!("http://127.0.0.1:{peer}"),
                "--initial-cluster".to_owned(),
                initial.clone(),
                // A member restarted after a kill finds its data directory and ignores these.
                "--initial-cluster-state".to_owned(),
                "new".to_owned(),
                "--initial-cluster-token".to_owned(),
                "suanli-bench".to_owned(),
            ];
            etcd.members.push((args.to_vec(), None));
            etcd.clients.push(format!("127.0.0.1:{client}"));
            etcd.spawn(i)?;
        }
        etcd.converge(Duration::from_secs(30)).await?;
        Ok(etcd)
    }

    /// Starts member `i` (again), logging to its own file.
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("etcd-{i}.log")))?;
        let child =
            tokio::process::Command::new(&self.binary).args(&self.members[i].0).stdout(Stdio::null()).stderr(Stdio::from(log)).kill_on_drop(true).spawn()?;
        self.members[i].1 = Some(child);
        Ok(())
    }

    /// `kill -9` of member `i`.
    async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.members[i].1.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Each member's view: its own ID and the leader it follows.
    async fn status(&self, i: usize) -> anyhow::Result<(u64, u64)> {
        let channel = Endpoint::from_shared(format!("http://{}", self.clients[i]))?.connect().await?;
        let status: etcd::StatusResponse = etcd_unary(&channel, "/etcdserverpb.Maintenance/Status", etcd::StatusRequest {}).await?;
        Ok((status.header.map_or(0, |h| h.member_id), status.leader))
    }

    /// The index of the member every running member names as leader.
    async fn leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            for i in (0..self.members.len()).filter(|i| self.members[*i].1.is_some()) {
                views.push((i, self.status(i).await.ok()));
            }
            let leaders: std::collections::BTreeSet<u64> = views.iter().filter_map(|(_, v)| v.map(|(_, leader)| leader)).collect();
            let all_answered = views.iter().all(|(_, v)| v.is_some());
            if let (true, 1, Some(leader)) = (all_answered, leaders.len(), leaders.first()) {
                if let Some((i, _)) = views.iter().find(|(_, v)| v.is_some_and(|(me, _)| me == *leader)) {
                    return Ok(*i);
                }
            }
            if Instant::now() > deadline {
                bail!("etcd members did not agree on a leader; logs in {}", self.dir.path().display());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every member runs, agrees on the leader, and a write through each commits.
    async fn converge(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        self.leader(timeout).await?;
        for address in &self.clients {
            loop {
                let put = etcd::TxnRequest {
                    compare: vec![],
                    success: vec![etcd::RequestOp { request_put: Some(etcd::PutRequest { key: b"ready".to_vec(), value: vec![] }) }],
                };
                if let Ok(channel) = Endpoint::from_shared(format!("http://{address}"))?.connect().await {
                    if etcd_unary::<_, etcd::TxnResponse>(&channel, "/etcdserverpb.KV/Txn", put).await.is_ok() {
                        break;
                    }
                }
                if Instant::now() > deadline {
                    bail!("etcd did not become ready; logs in {}", self.dir.path().display());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
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
    let researchers = args.clients.iter().copied().chain([args.failovers]).max().unwrap_or(1).div_ceil(CLIENTS_PER_RESEARCHER);
    let market = Arc::new(market(&cluster, researchers).await?);
    let mut addresses: Vec<String> = cluster.ids().iter().map(|id| cluster.address(*id).map(str::to_owned)).collect::<anyhow::Result<_>>()?;
    if args.leader_only {
        addresses = vec![cluster.address(cluster.leader(Duration::from_secs(20)).await?)?.to_owned()];
    }
    let suanli_channels = channels(&addresses).await?;
    // The etcd value is as large as Suanli's encoded lease request.
    let payload_len = prost::Message::encoded_len(&lease_request(market.cluster_ids[0], "r0-c000-0000000".into()));
    let payload = Arc::new(vec![b'x'; payload_len]);

    let mut etcd = if args.etcd { Some(Etcd::start().await?) } else { None };
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
        let m = market.clone();
        let ours = drive(&suanli_channels, clients, args.seconds, move |ch, c, seq| suanli_op(ch, m.clone(), c, seq, round)).await;
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

    if args.failovers > 0 {
        println!();
        println!("leader failover (kill -9 -> first successful write through a survivor), {} kills:", args.failovers);
        println!();
        println!("| system | p50 ms | p90 ms | p99 ms | max ms | over 1 s |");
        println!("|--------|-------:|-------:|-------:|-------:|---------:|");
        let ours = failovers(&mut cluster, &market, args.failovers).await?;
        let theirs = match etcd.as_mut() {
            Some(etcd) => Some(etcd_failovers(etcd, args.failovers).await?),
            None => None,
        };
        let mut rows = vec![("suanli".to_owned(), Some(ours)), ("etcd".to_owned(), theirs)];
        if let Some([heartbeat, min, max]) = args.also_timing {
            let config = format!("[broker]\nsnapshot_every_entries = 100000\nraft_heartbeat_ms = {heartbeat}\nraft_election_timeout_ms = [{min}, {max}]\n");
            let mut other = BrokerCluster::start_with(binary, 3, Some(&config), false).await?;
            let other_market = crate::market(&other, args.failovers.div_ceil(CLIENTS_PER_RESEARCHER)).await?;
            rows.push((format!("suanli, Raft {heartbeat} ms / {min}–{max} ms"), Some(failovers(&mut other, &other_market, args.failovers).await?)));
        }
        for (name, times) in rows {
            if let Some(t) = times {
                let slow = t.iter().filter(|d| **d > Duration::from_secs(1)).count();
                println!(
                    "| {name:<6} | {:>6.0} | {:>6.0} | {:>6.0} | {:>6.0} | {slow} of {} |",
                    percentile_ms(&t, 0.5),
                    percentile_ms(&t, 0.9),
                    percentile_ms(&t, 0.99),
                    percentile_ms(&t, 1.0),
                    t.len()
                );
                let all: Vec<String> = t.iter().map(|d| format!("{}", d.as_millis())).collect();
                eprintln!("{name} failovers, ms, sorted: {}", all.join(" "));
            }
        }
    }
    drop(etcd);
    Ok(())
}
