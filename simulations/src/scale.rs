//! `suanli-sim scale`: the broker's state machine at 1×, 10×, … the size of a large market,
//! to show which costs grow with it.
//!
//! At 1× (issue 26): 100,000 cards in 10,000 Class B clusters of one 10-card node, a live
//! lease of 2 cards on every cluster, 50,000 live (queued) jobs, and 100,000 leases that ran
//! and ended, moved out of the hot state by `ArchiveEnded` as the reaper moves them (the
//! archive itself is the storage layer's column family, not this state). Everything is built
//! by applying the commands the services send, on the broker's own `State`.
//!
//! Then, on the built state, measured one at a time: a lease request and its end, a job
//! submission and its cancellation, settling every live lease, a catalogue query (first page,
//! and a filtered search that pages to the end), and the snapshot: after a quiet day (the
//! at-most-once memory down to its floor of 10,000 requests, as on a replica a day later) the
//! state encoded as the broker's snapshot encodes it (postcard), then decoded with its indexes
//! rebuilt ([`install`]). Memory: the resident memory that install adds. `suanli-sim scale`
//! runs each size in a fresh process and each install in another, so what the allocator kept
//! from building is not counted.

use std::fmt::Write as _;
use std::time::Instant;

use suanli_broker::state::{Archived, Command, Envelope, Response, State};
use suanli_types::{
    AccountKind, BillingMode, Caller, CardSpec, CatalogueFilter, ClusterClass, ClusterId, Currency, EndReason, JobSpec, LeaseId, LeaseUnit, Money,
    NodeInventory, PageRequest, RequestId, SecretHash, Timestamp,
};

use crate::market::{listing, MODELS};
use crate::metrics::percentile;
use crate::rng::SplitMix64;

/// The market at 1×; `factor` multiplies every count.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleConfig {
    pub factor: f64,
    pub cards_per_cluster: u32,
    /// Operations timed per measure.
    pub samples: usize,
    pub seed: u64,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig { factor: 1.0, cards_per_cluster: 10, samples: 2_000, seed: 1 }
    }
}

impl ScaleConfig {
    pub fn clusters(&self) -> usize {
        (10_000.0 * self.factor).round().max(1.0) as usize
    }
    pub fn live_jobs(&self) -> usize {
        (50_000.0 * self.factor).round() as usize
    }
    pub fn ended_leases(&self) -> usize {
        (100_000.0 * self.factor).round() as usize
    }
    fn researchers(&self) -> usize {
        (1_000.0 * self.factor).round().max(1.0) as usize
    }
}

/// One size's figures; times in microseconds unless named otherwise.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScaleRow {
    pub factor: f64,
    pub cards: usize,
    pub clusters: usize,
    pub live_leases: usize,
    pub live_jobs: usize,
    pub ended_leases_archived: usize,
    pub build_s: f64,
    /// Resident memory a snapshot install added to its process: the state as a replica holds it.
    pub rss_bytes: u64,
    pub snapshot_bytes: usize,
    pub snapshot_encode_ms: f64,
    pub snapshot_decode_ms: f64,
    pub lease_request_end_p50: f64,
    pub lease_request_end_p99: f64,
    pub job_submit_cancel_p50: f64,
    pub job_submit_cancel_p99: f64,
    pub settle_per_lease: f64,
    pub catalogue_first_page_p50: f64,
    pub catalogue_first_page_p99: f64,
    /// A search that matches few clusters, so it pages through the whole catalogue.
    pub catalogue_search_p50: f64,
    pub catalogue_search_p99: f64,
}

/// Applies commands at a clock that moves 1 ms per command.
struct Driver {
    state: State,
    now_ms: i64,
    seq: u64,
}

impl Driver {
    fn apply(&mut self, caller: Caller, command: Command) -> Result<Response, String> {
        self.seq += 1;
        self.now_ms += 1;
        let name = command.name();
        let request_id = RequestId::parse(&format!("scale-{}", self.seq)).map_err(|e| e.to_string())?;
        let envelope = Envelope { caller, request_id, at: Timestamp::from_millis(self.now_ms), command };
        self.state.apply(&envelope).0.map_err(|e| format!("{name}: {e}"))
    }

    fn timed(&mut self, caller: Caller, command: Command) -> Result<(Response, f64), String> {
        let t = Instant::now();
        let r = self.apply(caller, command)?;
        Ok((r, t.elapsed().as_nanos() as f64 / 1000.0))
    }

    fn register(&mut self, kind: AccountKind) -> Result<suanli_types::AccountId, String> {
        let token_hash = SecretHash::of("api-token", &format!("scale-{}", self.seq));
        match self.apply(Caller::Platform, Command::RegisterAccount { kind, token_hash })? {
            Response::Account(id) => Ok(id),
            other => Err(format!("RegisterAccount answered {other:?}")),
        }
    }

    fn request_lease(&mut self, researcher: suanli_types::AccountId, cluster: ClusterId, cards: u32) -> Result<(LeaseId, f64), String> {
        let command = Command::RequestLease { cluster, unit: LeaseUnit::Cards(cards), billing_mode: BillingMode::Hourly, periods: 24 };
        match self.timed(Caller::Account(researcher), command)? {
            (Response::Lease(l), took) => Ok((l.id, took)),
            (other, _) => Err(format!("RequestLease answered {other:?}")),
        }
    }
}

/// The process's resident set size (`VmRSS`), in bytes; 0 where `/proc` cannot say.
pub fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

/// Builds the market at `config.factor` and measures it; also returns the snapshot's bytes.
/// The install figures are measured here, in this process (see [`install`] for a clean one).
pub fn measure(config: &ScaleConfig) -> Result<(ScaleRow, Vec<u8>), String> {
    let started = Instant::now();
    let mut rng = SplitMix64::new(config.seed);
    let mut d = Driver { state: State::new(), now_ms: 1_800_000_000_000, seq: 0 };
    let clusters = config.clusters();
    let suppliers: Vec<_> = (0..clusters.div_ceil(10)).map(|_| d.register(AccountKind::Supplier)).collect::<Result<_, _>>()?;
    let researchers: Vec<_> = (0..config.researchers()).map(|_| d.register(AccountKind::Researcher)).collect::<Result<_, _>>()?;
    for r in &researchers {
        d.apply(Caller::Platform, Command::Deposit { account: *r, amount: Money::new(Currency::cny(), 9_000_000_000) })?;
    }
    const REGIONS: [&str; 8] = ["Shenzhen", "Beijing", "Shanghai", "Hangzhou", "Chengdu", "Wuhan", "Xi'an", "Guangzhou"];
    let mut cluster_ids = Vec::with_capacity(clusters);
    for c in 0..clusters {
        let supplier = suppliers[c / 10];
        let model = c % MODELS.len();
        let (name, vram, base, _) = MODELS[model];
        let inventory = NodeInventory {
            hostname: format!("n{c}.scale"),
            cpu_model: "Intel Xeon".into(),
            vcpus: 64,
            memory_gib: 512,
            cards: (0..config.cards_per_cluster)
                .map(|i| CardSpec { index: i, uuid: format!("GPU-{c}-{i}"), model: name.into(), vram_mib: u64::from(vram) * 1024, ..Default::default() })
                .collect(),
            ..Default::default()
        };
        let node = match d.apply(Caller::Account(supplier), Command::EnrollNode { inventory })? {
            Response::Node(n) => n.id,
            other => return Err(format!("EnrollNode answered {other:?}")),
        };
        let price = base + (rng.next_u64() % 200) as i64;
        let command = Command::PublishCluster { class: ClusterClass::B, nodes: vec![node], listing: listing(model, price, REGIONS[c % REGIONS.len()]) };
        match d.apply(Caller::Account(supplier), command)? {
            Response::Cluster(cl) => cluster_ids.push((cl.id, supplier)),
            other => return Err(format!("PublishCluster answered {other:?}")),
        }
    }
    // History: leases that ran and ended, archived three days later as the reaper archives.
    let ended = config.ended_leases();
    for i in 0..ended {
        let (cluster, supplier) = cluster_ids[i % clusters];
        let (lease, _) = d.request_lease(researchers[i % researchers.len()], cluster, 1)?;
        d.apply(Caller::Account(supplier), Command::ActivateLease { lease })?;
        d.apply(Caller::Account(researchers[i % researchers.len()]), Command::EndLease { lease, reason: EndReason::ByResearcher })?;
    }
    d.now_ms += 3 * 24 * 3_600_000;
    let mut archived = 0;
    loop {
        let before = Timestamp::from_millis(d.now_ms - 2 * 24 * 3_600_000);
        d.apply(Caller::System, Command::ArchiveEnded { ended_before: before })?;
        let moved = d.state.take_archived();
        archived += moved.iter().filter(|a| matches!(a, Archived::Lease { .. })).count();
        if moved.is_empty() {
            break;
        }
    }
    // The live market: a 2-card lease on every cluster, queued jobs.
    let mut live = Vec::with_capacity(clusters);
    for (i, (cluster, supplier)) in cluster_ids.iter().enumerate() {
        let (lease, _) = d.request_lease(researchers[i % researchers.len()], *cluster, 2)?;
        d.apply(Caller::Account(*supplier), Command::ActivateLease { lease })?;
        live.push(lease);
    }
    let spec = queued_job_spec();
    for j in 0..config.live_jobs() {
        d.apply(Caller::Account(researchers[j % researchers.len()]), Command::SubmitJob { spec: spec.clone() })?;
    }
    let build_s = started.elapsed().as_secs_f64();
    d.state.check_invariants()?;

    // Lease request + end on random clusters.
    let mut lease_us = Vec::with_capacity(config.samples);
    for s in 0..config.samples {
        let (cluster, _) = cluster_ids[(rng.next_u64() % clusters as u64) as usize];
        let researcher = researchers[s % researchers.len()];
        let (lease, requested) = d.request_lease(researcher, cluster, 1)?;
        let (_, ended) = d.timed(Caller::Account(researcher), Command::EndLease { lease, reason: EndReason::ByResearcher })?;
        lease_us.push(requested + ended);
    }
    let mut job_us = Vec::with_capacity(config.samples);
    for s in 0..config.samples {
        let owner = researchers[s % researchers.len()];
        let (job, submitted) = match d.timed(Caller::Account(owner), Command::SubmitJob { spec: spec.clone() })? {
            (Response::Job(j), took) => (j.id, took),
            (other, _) => return Err(format!("SubmitJob answered {other:?}")),
        };
        let (_, cancelled) = d.timed(Caller::Account(owner), Command::CancelJob { job })?;
        job_us.push(submitted + cancelled);
    }
    d.now_ms += 3_600_000;
    let mut settle_us = 0.0;
    for batch in live.chunks(10_000) {
        settle_us += d.timed(Caller::System, Command::SettleLeases { leases: batch.to_vec() })?.1;
    }

    let first_page = CatalogueFilter { class: Some(ClusterClass::B), billing_mode: Some(BillingMode::Hourly), ..CatalogueFilter::default() };
    let search = CatalogueFilter {
        class: Some(ClusterClass::B),
        region: Some("Shanghai".into()),
        min_vram_gib: Some(80),
        min_idle_cards: Some(8),
        billing_mode: Some(BillingMode::Hourly),
        max_price_minor: Some(MODELS[2].2 + 20),
        ..CatalogueFilter::default()
    };
    let catalogue = |filter: &CatalogueFilter, all_pages: bool| -> Result<Vec<f64>, String> {
        let mut times = Vec::with_capacity(config.samples);
        for _ in 0..config.samples {
            let t = Instant::now();
            let mut page = PageRequest { after: None, limit: 20 };
            loop {
                let (found, next) = d.state.catalogue(filter, &page).map_err(|e| e.to_string())?;
                std::hint::black_box(found);
                match next {
                    Some(after) if all_pages => page.after = Some(after),
                    _ => break,
                }
            }
            times.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
        Ok(times)
    };
    let mut first_us = catalogue(&first_page, false)?;
    let mut search_us = catalogue(&search, true)?;

    // A quiet day later: only the newest requests are still remembered.
    d.now_ms += 25 * 3_600_000;
    d.apply(Caller::System, Command::ArchiveEnded { ended_before: Timestamp::from_millis(d.now_ms - 2 * 24 * 3_600_000) })?;
    d.state.take_archived();
    let t = Instant::now();
    let bytes = postcard::to_allocvec(&d.state).map_err(|e| e.to_string())?;
    let snapshot_encode_ms = t.elapsed().as_secs_f64() * 1000.0;
    let (decoded, snapshot_decode_ms, rss_bytes) = install_state(&bytes)?;
    if decoded != d.state {
        return Err("the decoded snapshot differs from the state".into());
    }
    drop(decoded);

    for v in [&mut lease_us, &mut job_us, &mut first_us, &mut search_us] {
        v.sort_by(f64::total_cmp);
    }
    let row = ScaleRow {
        factor: config.factor,
        cards: clusters * config.cards_per_cluster as usize,
        clusters,
        live_leases: live.len(),
        live_jobs: config.live_jobs(),
        ended_leases_archived: archived,
        build_s,
        rss_bytes,
        snapshot_bytes: bytes.len(),
        snapshot_encode_ms,
        snapshot_decode_ms,
        lease_request_end_p50: percentile(&lease_us, 50.0),
        lease_request_end_p99: percentile(&lease_us, 99.0),
        job_submit_cancel_p50: percentile(&job_us, 50.0),
        job_submit_cancel_p99: percentile(&job_us, 99.0),
        settle_per_lease: settle_us / live.len().max(1) as f64,
        catalogue_first_page_p50: percentile(&first_us, 50.0),
        catalogue_first_page_p99: percentile(&first_us, 99.0),
        catalogue_search_p50: percentile(&search_us, 50.0),
        catalogue_search_p99: percentile(&search_us, 99.0),
    };
    Ok((row, bytes))
}

/// A snapshot installed as a replica installs it: decoded, indexes rebuilt. Returns the
/// milliseconds that took and the resident memory it added to this process.
pub fn install(snapshot: &[u8]) -> Result<(f64, u64), String> {
    let (state, ms, rss) = install_state(snapshot)?;
    state.check_invariants()?;
    Ok((ms, rss))
}

fn install_state(snapshot: &[u8]) -> Result<(State, f64, u64), String> {
    let rss_before = resident_bytes();
    let t = Instant::now();
    let mut state: State = postcard::from_bytes(snapshot).map_err(|e| e.to_string())?;
    state.rebuild_indexes();
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    Ok((state, ms, resident_bytes().saturating_sub(rss_before)))
}

/// A one-card training job on the researcher's own leases: it stays queued here.
fn queued_job_spec() -> JobSpec {
    let value = serde_json::json!({
        "name": "scale-train",
        "kind": "training",
        "resources": { "cards": 1 },
        "run": { "command": { "program": "/bin/true" } },
    });
    serde_json::from_value(value).expect("a valid job spec")
}

/// The rows as a Markdown table, with each measure's growth from the first row against the
/// growth of the market.
pub fn table(rows: &[ScaleRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| size | cards | clusters | live jobs | archived leases | build s | RSS MB | RSS B/card | snapshot MB | encode ms | decode+index ms | lease req+end p50 / p99 µs | job submit+cancel p50 / p99 µs | settle µs/lease | catalogue page p50 / p99 µs | catalogue search p50 / p99 µs |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in rows {
        let _ = writeln!(
            out,
            "| {}× | {} | {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.1} | {:.0} | {:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} | {:.1} / {:.1} | {:.0} / {:.0} |",
            r.factor,
            r.cards,
            r.clusters,
            r.live_jobs,
            r.ended_leases_archived,
            r.build_s,
            r.rss_bytes as f64 / 1e6,
            r.rss_bytes as f64 / r.cards.max(1) as f64,
            r.snapshot_bytes as f64 / 1e6,
            r.snapshot_encode_ms,
            r.snapshot_decode_ms,
            r.lease_request_end_p50,
            r.lease_request_end_p99,
            r.job_submit_cancel_p50,
            r.job_submit_cancel_p99,
            r.settle_per_lease,
            r.catalogue_first_page_p50,
            r.catalogue_first_page_p99,
            r.catalogue_search_p50,
            r.catalogue_search_p99,
        );
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        if rows.len() > 1 {
            let market = last.factor / first.factor;
            let grew = |a: f64, b: f64| if a > 0.0 { format!("{:.1}×", b / a) } else { "n/a".into() };
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "From {}× to {}× ({market:.0}× the market): snapshot encode {}, decode {}, memory {}, lease req+end p50 {}, job p50 {}, settle per lease {}, catalogue page p50 {}, catalogue search p50 {}",
                first.factor,
                last.factor,
                grew(first.snapshot_encode_ms, last.snapshot_encode_ms),
                grew(first.snapshot_decode_ms, last.snapshot_decode_ms),
                grew(first.rss_bytes as f64, last.rss_bytes as f64),
                grew(first.lease_request_end_p50, last.lease_request_end_p50),
                grew(first.job_submit_cancel_p50, last.job_submit_cancel_p50),
                grew(first.settle_per_lease, last.settle_per_lease),
                grew(first.catalogue_first_page_p50, last.catalogue_first_page_p50),
                grew(first.catalogue_search_p50, last.catalogue_search_p50),
            );
        }
    }
    out
}

impl ScaleRow {
    /// One data line of [`csv`] read back (`suanli-sim scale` measures each size in a child
    /// process that prints its line).
    pub fn from_csv_line(line: &str) -> Result<ScaleRow, String> {
        let f: Vec<&str> = line.trim().split(',').collect();
        if f.len() != 20 {
            return Err(format!("expected 20 fields, found {}: {line}", f.len()));
        }
        let num = |i: usize| f[i].parse::<f64>().map_err(|e| format!("field {}: {e}: {line}", i + 1));
        let int = |i: usize| f[i].parse::<u64>().map_err(|e| format!("field {}: {e}: {line}", i + 1));
        Ok(ScaleRow {
            factor: num(0)?,
            cards: int(1)? as usize,
            clusters: int(2)? as usize,
            live_leases: int(3)? as usize,
            live_jobs: int(4)? as usize,
            ended_leases_archived: int(5)? as usize,
            build_s: num(6)?,
            rss_bytes: int(7)?,
            snapshot_bytes: int(8)? as usize,
            snapshot_encode_ms: num(9)?,
            snapshot_decode_ms: num(10)?,
            lease_request_end_p50: num(11)?,
            lease_request_end_p99: num(12)?,
            job_submit_cancel_p50: num(13)?,
            job_submit_cancel_p99: num(14)?,
            settle_per_lease: num(15)?,
            catalogue_first_page_p50: num(16)?,
            catalogue_first_page_p99: num(17)?,
            catalogue_search_p50: num(18)?,
            catalogue_search_p99: num(19)?,
        })
    }
}

/// The rows as CSV.
pub fn csv(rows: &[ScaleRow]) -> String {
    let mut out = String::from(
        "factor,cards,clusters,live_leases,live_jobs,ended_leases_archived,build_s,rss_bytes,snapshot_bytes,snapshot_encode_ms,snapshot_decode_ms,lease_request_end_p50_us,lease_request_end_p99_us,job_submit_cancel_p50_us,job_submit_cancel_p99_us,settle_per_lease_us,catalogue_first_page_p50_us,catalogue_first_page_p99_us,catalogue_search_p50_us,catalogue_search_p99_us\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{:.3},{},{},{:.3},{:.3},{:.2},{:.2},{:.2},{:.2},{:.3},{:.2},{:.2},{:.2},{:.2}",
            r.factor,
            r.cards,
            r.clusters,
            r.live_leases,
            r.live_jobs,
            r.ended_leases_archived,
            r.build_s,
            r.rss_bytes,
            r.snapshot_bytes,
            r.snapshot_encode_ms,
            r.snapshot_decode_ms,
            r.lease_request_end_p50,
            r.lease_request_end_p99,
            r.job_submit_cancel_p50,
            r.job_submit_cancel_p99,
            r.settle_per_lease,
            r.catalogue_first_page_p50,
            r.catalogue_first_page_p99,
            r.catalogue_search_p50,
            r.catalogue_search_p99,
        );
    }
    out
}
