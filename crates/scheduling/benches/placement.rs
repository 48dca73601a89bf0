//! Placement throughput of every policy on a large synthetic market.
//!
//! `cargo bench -p suanli-scheduling --bench placement` (release build).
//!
//! Cluster: 1,250 nodes × 8 cards = 10,000 cards of three models, leased by 100 owners (a
//! fifth of the nodes split between two owners, as Class B card leases are). Queue: 50,000
//! jobs — 1/2/4/8-card training (half the 8-card ones single_node), sharing inference, a
//! third with a model wish, some with a memory wish.
//!
//! Scenarios, per policy:
//! * `empty`: one `decide()` on the idle cluster.
//! * `steady`: three one-hour rounds are played (decisions applied, service accrued), then
//!   100 running jobs finish and the next `decide()` is timed.
//!
//! `decisions/s` = (placements + preemptions) / elapsed. Baseline, in the same process and
//! on the same snapshots: a naive FIFO that, for every job in order, scans all 10,000 cards
//! linearly for free acceptable cards of the job's owner (no index, no packing, no
//! backfill rule). `× naive` compares decisions/s with it.

use std::collections::{BTreeMap, HashSet};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use suanli_scheduling::{build, is_sharing, CardView, Decision, PolicyConfig, PolicyKind, QueuedJob, RunningJob, Snapshot, ThroughputTable};
use suanli_types::{AccountId, CardId, JobId, JobKind, JobRun, JobSpec, LeaseId, NodeId, Resources, Timestamp};

const NODES: u64 = 1_250;
const CARDS_PER_NODE: u64 = 8;
const OWNERS: u64 = 100;
const JOBS: u64 = 50_000;
const FINISHED: usize = 100;
const RUNS: usize = 9;
const HOUR_MS: i64 = 3_600_000;
const MODELS: [(&str, u64); 3] = [("NVIDIA A100-SXM4-80GB", 81_920), ("NVIDIA H100 80GB HBM3", 81_920), ("NVIDIA L40S", 46_068)];
const WISHES: [&str; 3] = ["A100", "H100", "L40S"];
const TYPES: usize = 10;

/// splitmix64: a fixed-seed generator, so every run benchmarks the same market.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn cluster(rng: &mut Rng) -> Vec<CardView> {
    let mut cards = Vec::with_capacity((NODES * CARDS_PER_NODE) as usize);
    for node in 0..NODES {
        let (model, vram) = MODELS[rng.below(3) as usize];
        let owner = 1 + rng.below(OWNERS);
        let second = if rng.chance(20) { 1 + rng.below(OWNERS) } else { owner };
        for i in 0..CARDS_PER_NODE {
            let owner = if i < CARDS_PER_NODE / 2 { owner } else { second };
            cards.push(CardView {
                id: CardId(node * CARDS_PER_NODE + i + 1),
                node: NodeId(node + 1),
                model: model.into(),
                vram_mib: vram,
                lease: LeaseId(owner),
                owner: AccountId(owner),
                usable: !rng.chance(1),
            });
        }
    }
    cards
}

fn jobs(rng: &mut Rng) -> Vec<QueuedJob> {
    (1..=JOBS)
        .map(|id| {
            let roll = rng.below(100);
            let (cards, shared) = match roll {
                0..35 => (1, false),
                35..55 => (2, false),
                55..70 => (4, false),
                70..80 => (8, false),
                _ => (1, true),
            };
            let gpu_models = if rng.chance(33) { vec![WISHES[rng.below(3) as usize].to_owned()] } else { vec![] };
            let spec = JobSpec {
                name: format!("type-{}", rng.below(TYPES as u64)),
                kind: if shared { JobKind::Inference } else { JobKind::Training },
                resources: Resources {
                    cards,
                    gpu_models,
                    min_vram_mib: if rng.chance(10) { 50_000 } else { 0 },
                    single_node: cards == 8 && rng.chance(50),
                    shared,
                },
                inputs: vec![],
                outputs: vec![],
                run: JobRun::Builtin { task: "train_classifier".into(), params: BTreeMap::new() },
                priority: if rng.chance(10) { 1 } else { 0 },
                preemptible: rng.chance(60),
                deadline: None,
                budget_minor: None,
                max_attempts: 3,
                expected_seconds: rng.chance(50).then(|| 600 + rng.below(20 * 3_600)),
                auto_lease: None,
            };
            QueuedJob {
                id: JobId(id),
                owner: AccountId(1 + rng.below(OWNERS)),
                spec: Arc::new(spec),
                submitted_at: Timestamp(rng.below(HOUR_MS as u64) as i64),
                attained_gpu_ms: if rng.chance(60) { 0 } else { rng.below(20 * HOUR_MS as u64) },
            }
        })
        .collect()
}

fn table(rng: &mut Rng) -> ThroughputTable {
    let mut t = ThroughputTable::new();
    for ty in 0..TYPES {
        for (model, _) in MODELS {
            for cards in [1, 2, 4, 8] {
                t.insert(format!("type-{ty}"), cards, model, (1 + rng.below(100)) as f64 * f64::from(cards));
            }
        }
    }
    t
}

/// Carries out `decisions` and lets one hour pass.
fn apply(snapshot: &mut Snapshot, decisions: &[Decision], all: &BTreeMap<JobId, QueuedJob>, now: Timestamp) {
    let mut placed = HashSet::new();
    let attained: BTreeMap<JobId, u64> = snapshot.queued.iter().map(|q| (q.id, q.attained_gpu_ms)).collect();
    for d in decisions {
        match d {
            Decision::Preempt { job } => {
                if let Some(i) = snapshot.running.iter().position(|r| r.id == *job) {
                    let r = snapshot.running.swap_remove(i);
                    let mut q = all[job].clone();
                    q.attained_gpu_ms = r.attained_gpu_ms;
                    snapshot.queued.push(q);
                }
            }
            Decision::Place { job, cards } => {
                placed.insert(*job);
                let q = &all[job];
                snapshot.running.push(RunningJob {
                    id: *job,
                    owner: q.owner,
                    cards: cards.clone(),
                    shared: is_sharing(&q.spec),
                    preemptible: q.spec.preemptible,
                    priority: q.spec.priority,
                    started_at: now,
                    expected_end: q.spec.expected_seconds.map(|s| now.plus_seconds(s as i64)),
                    attained_gpu_ms: attained.get(job).copied().unwrap_or(0),
                });
            }
        }
    }
    snapshot.queued.retain(|q| !placed.contains(&q.id));
    for r in &mut snapshot.running {
        r.attained_gpu_ms += r.cards.len() as u64 * HOUR_MS as u64;
    }
}

/// Median wall time of `runs` calls, and the last result.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut out = None;
    for _ in 0..runs {
        let start = Instant::now();
        let r = black_box(f());
        times.push(start.elapsed());
        out = Some(r);
    }
    times.sort();
    (times[runs / 2], out.expect("at least one run"))
}

/// The baseline: FIFO by scanning every card for every job.
fn naive_fifo(snapshot: &Snapshot) -> usize {
    let mut busy: Vec<bool> = vec![false; snapshot.cards.len()];
    let index: BTreeMap<CardId, usize> = snapshot.cards.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    for r in &snapshot.running {
        for c in &r.cards {
            if let Some(&i) = index.get(c) {
                busy[i] = true;
            }
        }
    }
    let mut order: Vec<&QueuedJob> = snapshot.queued.iter().collect();
    order.sort_by_key(|j| (std::cmp::Reverse(j.spec.priority), j.submitted_at, j.id));
    let mut placed = 0;
    for job in order {
        let k = job.spec.resources.cards as usize;
        let mut per_node: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
        let mut any: Vec<usize> = Vec::new();
        for (i, c) in snapshot.cards.iter().enumerate() {
            if c.owner == job.owner && c.usable && !busy[i] && job.spec.accepts_card(&c.model, c.vram_mib) {
                any.push(i);
                per_node.entry(c.node).or_default().push(i);
            }
        }
        let chosen = if job.spec.resources.single_node { per_node.into_values().find(|v| v.len() >= k) } else { (any.len() >= k).then_some(any) };
        if let Some(cards) = chosen {
            for &i in &cards[..k] {
                busy[i] = true;
            }
            placed += 1;
        }
    }
    placed
}

fn count(decisions: &[Decision]) -> (usize, usize) {
    let places = decisions.iter().filter(|d| matches!(d, Decision::Place { .. })).count();
    (places, decisions.len() - places)
}

fn main() {
    let mut rng = Rng(0x5EED);
    let cards = cluster(&mut rng);
    let queue = jobs(&mut rng);
    let all: BTreeMap<JobId, QueuedJob> = queue.iter().map(|q| (q.id, q.clone())).collect();
    let config = PolicyConfig { throughput: table(&mut rng), ..PolicyConfig::default() };
    let start = Timestamp(HOUR_MS);
    let empty = Snapshot { cards: cards.clone(), queued: queue, running: vec![] };

    println!("{} cards on {} nodes, {} owners, {} queued jobs; median of {RUNS} runs (naive: 1 run)\n", cards.len(), NODES, OWNERS, empty.queued.len());
    println!("| scenario | policy | places | preempts | elapsed ms | decisions/s | × naive |");
    println!("|----------|--------|-------:|---------:|-----------:|------------:|--------:|");
    let row = |scenario: &str, policy: &str, places: usize, preempts: usize, elapsed: Duration, naive_rate: f64| {
        let rate = (places + preempts) as f64 / elapsed.as_secs_f64();
        let ratio = if naive_rate > 0.0 { format!("{:.0}", rate / naive_rate) } else { "—".into() };
        println!("| {scenario} | {policy} | {places} | {preempts} | {:.2} | {:.0} | {ratio} |", elapsed.as_secs_f64() * 1e3, rate);
        rate
    };

    // The steady snapshots, one per policy: three rounds played, then 100 jobs finish.
    let mut steady: Vec<Snapshot> = Vec::new();
    for kind in PolicyKind::ALL {
        let mut policy = build(kind, &config);
        let mut snapshot = empty.clone();
        let mut now = start;
        for _ in 0..3 {
            let decisions = policy.decide(&snapshot, now);
            apply(&mut snapshot, &decisions, &all, now);
            now = Timestamp(now.millis() + HOUR_MS);
        }
        for _ in 0..FINISHED {
            let i = rng.below(snapshot.running.len() as u64) as usize;
            snapshot.running.swap_remove(i);
        }
        steady.push(snapshot);
    }
    let steady_now = Timestamp(start.millis() + 3 * HOUR_MS);

    for (scenario, snapshots, now) in [("empty", vec![empty.clone(), empty.clone(), empty.clone()], start), ("steady", steady, steady_now)] {
        let (naive_time, naive_places) = time(1, || naive_fifo(&snapshots[0]));
        let naive_rate = row(scenario, "naive FIFO (baseline)", naive_places, 0, naive_time, 0.0);
        for (kind, snapshot) in PolicyKind::ALL.into_iter().zip(&snapshots) {
            let (elapsed, decisions) = time(RUNS, || build(kind, &config).decide(snapshot, now));
            let (places, preempts) = count(&decisions);
            row(scenario, kind.as_str(), places, preempts, elapsed, naive_rate);
        }
    }
    println!("\nsteady: the baseline runs on FIFO's steady snapshot; each policy on its own.");
}
