//! Property tests: on random snapshots every policy keeps the hard invariants (checked by
//! the independent `check_decisions`), decides the same whatever the input order, preempts
//! only as its rules allow, and LAS-style policies leave no job waiting that fits as is.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::HOUR_MS;
use proptest::prelude::*;
use suanli_scheduling::{
    build, check_decisions, is_sharing, CardView, Decision, LasConfig, PolicyConfig, PolicyKind, QueuedJob, RunningJob, Snapshot, ThroughputTable,
};
use suanli_types::job::limits::MAX_JOBS_PER_SHARED_CARD;
use suanli_types::{AccountId, CardId, JobId, JobKind, LeaseId, NodeId, Timestamp};

const NOW: i64 = 100 * HOUR_MS as i64;
const MODELS: [&str; 3] = ["NVIDIA A100-SXM4-80GB", "NVIDIA H100", "NVIDIA L4"];
const NAMES: [&str; 3] = ["resnet", "bert", "yolo"];

/// What a generated card hosts.
#[derive(Clone, Copy, Debug)]
enum Host {
    Free,
    Whole,
    Sharing(u32),
}

/// (owner, model, large memory, usable, what it hosts)
type CardArgs = (u64, usize, bool, bool, Host);

fn arb_card() -> impl Strategy<Value = CardArgs> {
    let host = prop_oneof![
        4 => Just(Host::Free),
        2 => Just(Host::Whole),
        2 => (1..=MAX_JOBS_PER_SHARED_CARD).prop_map(Host::Sharing),
    ];
    (1u64..=3, 0..MODELS.len(), any::<bool>(), prop::bool::weighted(0.9), host)
}

/// Attributes of a running job: (gang size, preemptible, priority, age ms, attained h, expected end offset s)
type RunArgs = (usize, bool, i32, i64, u64, Option<i64>);

fn arb_run() -> impl Strategy<Value = RunArgs> {
    (1usize..=3, any::<bool>(), -1i32..=1, 0i64..2 * HOUR_MS as i64, 0u64..30, prop::option::of(-600i64..20_000))
}

/// (owner, cards, model mask, min vram, single node, shared, priority, expected s, attained h, name, submitted)
type JobArgs = (u64, u32, u8, bool, bool, bool, i32, Option<u64>, u64, usize, i64);

fn arb_job() -> impl Strategy<Value = JobArgs> {
    (
        1u64..=4,
        1u32..=5,
        0u8..8,
        prop::bool::weighted(0.2),
        any::<bool>(),
        prop::bool::weighted(0.25),
        -1i32..=1,
        prop::option::of(60u64..30_000),
        prop_oneof![3 => Just(0u64), 1 => 0u64..30],
        0..NAMES.len(),
        0i64..1_000,
    )
}

fn build_snapshot(nodes: Vec<Vec<CardArgs>>, runs: Vec<RunArgs>, jobs: Vec<JobArgs>) -> Snapshot {
    let mut cards = Vec::new();
    let mut running = Vec::new();
    let mut runs = runs.into_iter().cycle();
    let mut next_job = 1_000u64;
    let mut whole_by_owner: BTreeMap<u64, Vec<CardId>> = BTreeMap::new();
    for (n, node) in nodes.into_iter().enumerate() {
        for (owner, model, big, usable, host) in node {
            let id = CardId(cards.len() as u64 + 1);
            cards.push(CardView {
                id,
                node: NodeId(n as u64 + 1),
                model: MODELS[model].into(),
                vram_mib: if big { 81_920 } else { 24_576 },
                lease: LeaseId(owner),
                owner: AccountId(owner),
                usable,
            });
            let run = |next_job: &mut u64, cards: Vec<CardId>, shared: bool, args: RunArgs| {
                *next_job += 1;
                let (_, preemptible, priority, age, attained, end) = args;
                RunningJob {
                    id: JobId(*next_job),
                    owner: AccountId(owner),
                    cards,
                    shared,
                    preemptible,
                    priority,
                    started_at: Timestamp(NOW - age),
                    expected_end: end.map(|s| Timestamp(NOW + s * 1000)),
                    attained_gpu_ms: attained * HOUR_MS,
                }
            };
            match host {
                Host::Free => {}
                Host::Whole => whole_by_owner.entry(owner).or_default().push(id),
                Host::Sharing(k) => {
                    for _ in 0..k {
                        let args = runs.next().unwrap_or((1, true, 0, 0, 0, None));
                        running.push(run(&mut next_job, vec![id], true, args));
                    }
                }
            }
        }
    }
    // Whole-card running jobs: consecutive busy cards of an owner, in gangs of 1 to 3.
    for (owner, busy) in whole_by_owner {
        let mut rest = busy.as_slice();
        while !rest.is_empty() {
            let args = runs.next().unwrap_or((1, true, 0, 0, 0, None));
            let take = args.0.min(rest.len());
            next_job += 1;
            let (_, preemptible, priority, age, attained, end) = args;
            running.push(RunningJob {
                id: JobId(next_job),
                owner: AccountId(owner),
                cards: rest[..take].to_vec(),
                shared: false,
                preemptible,
                priority,
                started_at: Timestamp(NOW - age),
                expected_end: end.map(|s| Timestamp(NOW + s * 1000)),
                attained_gpu_ms: attained * HOUR_MS,
            });
            rest = &rest[take..];
        }
    }
    let queued = jobs
        .into_iter()
        .enumerate()
        .map(|(i, (owner, n, mask, min_vram, single, shared, priority, expected, attained, name, submitted))| {
            let mut spec = common::spec(NAMES[name], if shared { 1 } else { n });
            if shared {
                spec.kind = JobKind::Inference;
                spec.resources.shared = true;
            }
            spec.resources.single_node = single;
            spec.resources.gpu_models = ["a100", "H100", "l4"].iter().enumerate().filter(|(b, _)| mask & (1 << b) != 0).map(|(_, m)| m.to_string()).collect();
            spec.resources.min_vram_mib = if min_vram { 40_000 } else { 0 };
            spec.priority = priority;
            spec.preemptible = true;
            spec.expected_seconds = expected;
            QueuedJob {
                id: JobId(i as u64 + 1),
                owner: AccountId(owner),
                spec: Arc::new(spec),
                submitted_at: Timestamp(submitted),
                attained_gpu_ms: attained * HOUR_MS,
            }
        })
        .collect();
    Snapshot { cards, queued, running }
}

fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
    (prop::collection::vec(prop::collection::vec(arb_card(), 1..=4), 1..=6), prop::collection::vec(arb_run(), 1..=12), prop::collection::vec(arb_job(), 0..=24))
        .prop_map(|(nodes, runs, jobs)| build_snapshot(nodes, runs, jobs))
}

/// Speeds of each name on each model; `None`: not measured, 0: does not run there.
fn arb_speeds() -> impl Strategy<Value = Vec<Option<f64>>> {
    prop::collection::vec(prop::option::of(prop_oneof![1 => Just(0.0), 6 => 0.1f64..100.0]), 9)
}

fn table(speeds: &[Option<f64>], keep_zeros: bool) -> ThroughputTable {
    let mut table = ThroughputTable::new();
    for (i, speed) in speeds.iter().enumerate() {
        if let Some(s) = speed.filter(|&s| keep_zeros || s > 0.0) {
            for cards in [1, 2, 4] {
                table.insert(NAMES[i / 3], cards, MODELS[i % 3], s);
            }
        }
    }
    table
}

fn config(table: ThroughputTable) -> PolicyConfig {
    PolicyConfig { las: LasConfig::default(), throughput: table, ..PolicyConfig::default() }
}

/// The jobs left waiting that would fit on the cards left free, ignoring preemption.
fn waiting_that_fit(snapshot: &Snapshot, decisions: &[Decision]) -> Vec<JobId> {
    let mut whole: BTreeMap<CardId, u32> = BTreeMap::new();
    let mut sharing: BTreeMap<CardId, u32> = BTreeMap::new();
    let preempted: BTreeSet<JobId> = decisions.iter().filter_map(|d| if let Decision::Preempt { job } = d { Some(*job) } else { None }).collect();
    for r in snapshot.running.iter().filter(|r| !preempted.contains(&r.id)) {
        for c in &r.cards {
            *(if r.shared { &mut sharing } else { &mut whole }).entry(*c).or_default() += 1;
        }
    }
    let mut placed = BTreeSet::new();
    for d in decisions {
        if let Decision::Place { job, cards } = d {
            placed.insert(*job);
            let sharing_job = snapshot.queued.iter().find(|q| q.id == *job).is_some_and(|q| is_sharing(&q.spec));
            for c in cards {
                *(if sharing_job { &mut sharing } else { &mut whole }).entry(*c).or_default() += 1;
            }
        }
    }
    let count = |m: &BTreeMap<CardId, u32>, c: CardId| m.get(&c).copied().unwrap_or(0);
    let mut fits = Vec::new();
    for q in snapshot.queued.iter().filter(|q| !placed.contains(&q.id)) {
        let mut free_by_node: BTreeMap<NodeId, u32> = BTreeMap::new();
        let mut shared_room = false;
        for c in &snapshot.cards {
            if !c.usable || c.owner != q.owner || !q.spec.accepts_card(&c.model, c.vram_mib) {
                continue;
            }
            let (w, s) = (count(&whole, c.id), count(&sharing, c.id));
            if w == 0 && s == 0 {
                *free_by_node.entry(c.node).or_default() += 1;
            }
            shared_room |= w == 0 && s > 0 && s < MAX_JOBS_PER_SHARED_CARD;
        }
        let k = q.spec.resources.cards;
        let fit = if is_sharing(&q.spec) {
            shared_room || !free_by_node.is_empty()
        } else if q.spec.resources.single_node {
            free_by_node.values().any(|&f| f >= k)
        } else {
            free_by_node.values().sum::<u32>() >= k
        };
        if fit {
            fits.push(q.id);
        }
    }
    fits
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_policy_keeps_the_invariants_and_is_order_independent(snapshot in arb_snapshot(), speeds in arb_speeds()) {
        // Without zero speeds ("does not run there") and with `min_relative_speed` 0, the
        // heterogeneity-aware policy, like LAS, must leave no job waiting that fits as is;
        // otherwise it may refuse cards too slow for a job.
        let mut work_conserving = config(table(&speeds, false));
        work_conserving.heterogeneity.min_relative_speed = 0.0;
        let default = config(table(&speeds, true));
        let now = Timestamp(NOW);
        for (config, conserving) in [(&work_conserving, true), (&default, false)] {
            for kind in PolicyKind::ALL {
                let decisions = build(kind, config).decide(&snapshot, now);
                if let Err(v) = check_decisions(&snapshot, &decisions) {
                    return Err(TestCaseError::fail(format!("{kind}: {v}\n{decisions:?}")));
                }
                let mut shuffled = snapshot.clone();
                shuffled.cards.reverse();
                shuffled.queued.reverse();
                shuffled.running.reverse();
                prop_assert_eq!(&build(kind, config).decide(&shuffled, now), &decisions, "{} depends on input order", kind);
                if kind == PolicyKind::Fifo {
                    prop_assert!(decisions.iter().all(|d| matches!(d, Decision::Place { .. })), "FIFO preempted");
                } else if conserving || kind == PolicyKind::Las {
                    let left = waiting_that_fit(&snapshot, &decisions);
                    prop_assert!(left.is_empty(), "{}: {:?} wait although they fit", kind, left);
                }
            }
        }
    }

    #[test]
    fn las_preempts_only_old_enough_jobs_of_a_higher_queue_for_the_next_placement(
        snapshot in arb_snapshot(),
        speeds in arb_speeds(),
    ) {
        let config = config(table(&speeds, true));
        let queue = |attained: u64| config.las.thresholds_gpu_ms.iter().filter(|&&t| t <= attained).count();
        for kind in [PolicyKind::Las, PolicyKind::Heterogeneity] {
            let decisions = build(kind, &config).decide(&snapshot, Timestamp(NOW));
            for (i, d) in decisions.iter().enumerate() {
                let Decision::Preempt { job } = d else { continue };
                let victim = snapshot.running.iter().find(|r| r.id == *job).expect("a running job");
                prop_assert!(victim.started_at.millis() + config.las.min_run_ms as i64 <= NOW, "{}: too young", kind);
                // The placement it makes room for is the next `Place` in the list.
                let placed = decisions[i..].iter().find_map(|d| match d {
                    Decision::Place { job, .. } => snapshot.queued.iter().find(|q| q.id == *job),
                    Decision::Preempt { .. } => None,
                }).expect("a placement follows");
                prop_assert!(queue(victim.attained_gpu_ms) > queue(placed.attained_gpu_ms), "{}: same queue", kind);
                prop_assert!(victim.priority <= placed.spec.priority, "{}: priority inverted", kind);
            }
        }
    }
}
