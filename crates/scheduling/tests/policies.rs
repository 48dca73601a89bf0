//! Each policy on small hand-made snapshots.

mod common;

use common::*;
use suanli_scheduling::{build, check_decisions, Decision, Policy, PolicyConfig, PolicyKind, Snapshot, ThroughputTable};
use suanli_types::{JobId, Timestamp};

const NOW: Timestamp = Timestamp(10 * HOUR_MS as i64);

fn decide(kind: PolicyKind, config: &PolicyConfig, snapshot: &Snapshot) -> Vec<Decision> {
    let mut policy = build(kind, config);
    let decisions = policy.decide(snapshot, NOW);
    check_decisions(snapshot, &decisions).unwrap_or_else(|v| panic!("{kind}: {v}\n{decisions:?}"));
    decisions
}

fn each_policy(snapshot: &Snapshot) -> Vec<(PolicyKind, Vec<Decision>)> {
    PolicyKind::ALL.into_iter().map(|k| (k, decide(k, &PolicyConfig::default(), snapshot))).collect()
}

#[test]
fn a_gang_gets_all_its_cards_or_none() {
    let snapshot =
        Snapshot { cards: node(1, 1, "A100", 1, 2), queued: vec![queued(1, 1, spec("big", 3), 0), queued(2, 1, spec("small", 2), 1)], running: vec![] };
    for (kind, decisions) in each_policy(&snapshot) {
        let placed = placements(&decisions);
        assert!(!placed.contains_key(&1), "{kind}");
        // The 3-card job can never fit on 2 cards, so it does not block the 2-card one.
        assert_eq!(placed.get(&2), Some(&vec![1, 2]), "{kind}");
    }
}

#[test]
fn single_node_jobs_stay_on_one_node_and_others_spread() {
    let mut cards = node(1, 1, "A100", 1, 4);
    cards.extend(node(2, 1, "A100", 5, 4));
    let snapshot = Snapshot {
        cards,
        queued: vec![queued(1, 1, spec("split", 4), 0), {
            let mut s = spec("nvlink", 4);
            s.resources.single_node = true;
            queued(2, 1, s, 1)
        }],
        // Two cards busy on each node: 2 + 2 free.
        running: vec![running(10, 1, &[1, 2]), running(11, 1, &[5, 6])],
    };
    for (kind, decisions) in each_policy(&snapshot) {
        let placed = placements(&decisions);
        assert!(!placed.contains_key(&2), "{kind}: single_node job split");
        assert_eq!(placed.get(&1), Some(&vec![3, 4, 7, 8]), "{kind}");
    }
}

#[test]
fn multi_card_jobs_take_the_fewest_nodes_and_small_jobs_the_smallest_gap() {
    // Free cards per node: 2, 2, 4, 4 (node n has ids n*10..).
    let mut cards = Vec::new();
    for n in 1..=4 {
        cards.extend(node(n, 1, "A100", n * 10, 4));
    }
    let snapshot = Snapshot {
        cards,
        queued: vec![queued(1, 1, spec("six", 6), 0), queued(2, 1, spec("one", 1), 1)],
        running: vec![running(90, 1, &[10, 11]), running(91, 1, &[20, 21])],
    };
    for (kind, decisions) in each_policy(&snapshot) {
        let placed = placements(&decisions);
        let six = &placed[&1];
        let nodes: std::collections::BTreeSet<u64> = six.iter().map(|c| c / 10).collect();
        // A 4-card node plus the best-fitting 2-card remainder: two nodes, one 4-node intact.
        assert_eq!(nodes.len(), 2, "{kind}: {six:?}");
        assert_eq!(six.iter().filter(|&&c| c / 10 >= 3).count(), 4, "{kind}: {six:?}");
        // The one-card job goes into the remaining 2-card gap, not onto the whole node.
        let one = placed[&2][0];
        assert!(one / 10 <= 2, "{kind}: {one}");
    }
}

#[test]
fn an_owner_never_gets_another_owners_cards_and_a_blocked_owner_blocks_nobody_else() {
    let mut cards = node(1, 1, "A100", 1, 2);
    cards.extend(node(2, 2, "A100", 3, 2));
    let snapshot = Snapshot {
        cards,
        queued: vec![
            // Owner 1's head needs both its cards, one is busy: blocked.
            queued(1, 1, spec("head", 2), 0),
            queued(2, 1, spec("later", 1), 1),
            queued(3, 2, spec("other", 2), 2),
        ],
        running: vec![running(10, 1, &[1])],
    };
    let placed = placements(&decide(PolicyKind::Fifo, &PolicyConfig::default(), &snapshot));
    // Owner 2 runs although owner 1's head waits; owner 1's later job has no estimate, so
    // it is not backfilled, and nothing of owner 1 lands on owner 2's free cards.
    assert_eq!(placed, [(3, vec![3, 4])].into());
}

#[test]
fn fifo_backfills_only_jobs_known_to_end_before_the_head_can_start() {
    let with_estimate = |id, seconds: Option<u64>, at| {
        let mut s = spec("bf", 1);
        s.expected_seconds = seconds;
        queued(id, 1, s, at)
    };
    let snapshot = Snapshot {
        cards: node(1, 1, "A100", 1, 4),
        queued: vec![
            queued(1, 1, spec("head", 4), 0),
            with_estimate(2, Some(7_200), 1), // ends after the release: would delay the head
            with_estimate(3, None, 2),        // unknown
            with_estimate(4, Some(1_800), 3), // fits before the release
            with_estimate(5, Some(3_600), 4), // exactly at the release
        ],
        running: vec![{
            let mut r = running(10, 1, &[1, 2]);
            r.expected_end = Some(NOW.plus_seconds(3_600));
            r
        }],
    };
    let placed = placements(&decide(PolicyKind::Fifo, &PolicyConfig::default(), &snapshot));
    assert_eq!(placed.keys().copied().collect::<Vec<_>>(), vec![4, 5]);
}

#[test]
fn fifo_serves_priority_first() {
    let mut urgent = spec("urgent", 1);
    urgent.priority = 5;
    let snapshot = Snapshot { cards: node(1, 1, "A100", 1, 1), queued: vec![queued(1, 1, spec("early", 1), 0), queued(2, 1, urgent, 100)], running: vec![] };
    assert_eq!(placements(&decide(PolicyKind::Fifo, &PolicyConfig::default(), &snapshot)), [(2, vec![1])].into());
}

#[test]
fn sharing_jobs_pack_onto_the_fullest_shared_card_and_never_onto_training_cards() {
    // Node 1: card 1 hosts 2 sharing jobs, card 2 hosts 3, card 3 runs training.
    // Node 2: cards 4 and 5 free. Node 3: card 6 free (the smallest gap).
    let mut cards = node(1, 1, "L4", 1, 3);
    cards.extend(node(2, 1, "L4", 4, 2));
    cards.extend(node(3, 1, "L4", 6, 1));
    let snapshot = Snapshot {
        cards,
        queued: (1..=5).map(|i| queued(i, 1, sharing_spec("svc"), i as i64)).chain([queued(9, 1, spec("train", 2), 9)]).collect(),
        running: vec![sharing(20, 1, 1), sharing(21, 1, 1), sharing(22, 1, 2), sharing(23, 1, 2), sharing(24, 1, 2), running(25, 1, &[3])],
    };
    for (kind, decisions) in each_policy(&snapshot) {
        let placed = placements(&decisions);
        // Card 2 fills up (3 → 4), then card 1 (2 → 4), then a fresh card on the node with
        // the fewest free cards (node 3), leaving node 2 whole for the 2-card training job.
        assert_eq!(placed[&1], vec![2], "{kind}");
        assert_eq!(placed[&2], vec![1], "{kind}");
        assert_eq!(placed[&3], vec![1], "{kind}");
        assert_eq!(placed[&4], vec![6], "{kind}");
        assert_eq!(placed[&5], vec![6], "{kind}");
        assert_eq!(placed[&9], vec![4, 5], "{kind}");
    }
}

fn las_victim(id: u64, card: u64, attained_hours: u64) -> suanli_scheduling::RunningJob {
    let mut r = running(id, 1, &[card]);
    r.preemptible = true;
    r.attained_gpu_ms = attained_hours * HOUR_MS;
    r
}

#[test]
fn las_preempts_the_least_served_job_first_and_places_in_the_same_list() {
    let snapshot = Snapshot {
        cards: node(1, 1, "A100", 1, 3),
        queued: vec![queued(1, 1, spec("new", 1), 0)],
        running: vec![las_victim(10, 1, 2), las_victim(11, 2, 20), las_victim(12, 3, 0)],
    };
    for kind in [PolicyKind::Las, PolicyKind::Heterogeneity] {
        let decisions = decide(kind, &PolicyConfig::default(), &snapshot);
        assert_eq!(decisions, vec![Decision::Preempt { job: JobId(11) }, Decision::Place { job: JobId(1), cards: vec![suanli_types::CardId(2)] }], "{kind}");
    }
    // FIFO never preempts.
    assert!(decide(PolicyKind::Fifo, &PolicyConfig::default(), &snapshot).is_empty());
}

#[test]
fn las_spares_young_unpreemptible_equally_served_and_useless_victims() {
    let young = {
        let mut r = las_victim(10, 1, 20);
        r.started_at = Timestamp(NOW.millis() - 60_000);
        r
    };
    let pinned = {
        let mut r = las_victim(11, 1, 20);
        r.preemptible = false;
        r
    };
    let same_queue = las_victim(12, 1, 0);
    let cases = [("young", young), ("not preemptible", pinned), ("same queue", same_queue)];
    for (why, victim) in cases {
        let snapshot = Snapshot { cards: node(1, 1, "A100", 1, 1), queued: vec![queued(1, 1, spec("new", 1), 0)], running: vec![victim] };
        assert!(decide(PolicyKind::Las, &PolicyConfig::default(), &snapshot).is_empty(), "{why}");
    }
    // Nodes {1, 2} and {3, 4}; only card 4 is free, card 1 holds the one victim. Freeing it
    // leaves one free card per node: useless to a single-node pair, enough for a plain one.
    let mut cards = node(1, 1, "A100", 1, 2);
    cards.extend(node(2, 1, "A100", 3, 2));
    let running_jobs = vec![las_victim(10, 1, 20), running(11, 1, &[2]), running(12, 1, &[3])];
    let mut pair = spec("nvlink", 2);
    pair.resources.single_node = true;
    let snapshot = Snapshot { cards: cards.clone(), queued: vec![queued(1, 1, pair, 0)], running: running_jobs.clone() };
    assert!(decide(PolicyKind::Las, &PolicyConfig::default(), &snapshot).is_empty());
    let snapshot = Snapshot { cards, queued: vec![queued(1, 1, spec("pair", 2), 0)], running: running_jobs };
    let decisions = decide(PolicyKind::Las, &PolicyConfig::default(), &snapshot);
    assert_eq!(preemptions(&decisions), vec![10]);
    assert_eq!(placements(&decisions), [(1, vec![1, 4])].into());
}

#[test]
fn las_serves_the_least_attained_queue_first_then_in_submission_order() {
    let mut served = queued(1, 1, spec("served", 1), 0);
    served.attained_gpu_ms = 5 * HOUR_MS;
    let mut slightly = queued(3, 1, spec("slightly", 1), 1);
    slightly.attained_gpu_ms = HOUR_MS / 2;
    let snapshot = Snapshot { cards: node(1, 1, "A100", 1, 2), queued: vec![served, slightly, queued(2, 1, spec("fresh", 1), 2)], running: vec![] };
    // Queue 0 holds jobs 3 and 2 (FIFO between them: 3 came first); job 1 is in queue 1.
    let placed = placements(&decide(PolicyKind::Las, &PolicyConfig::default(), &snapshot));
    assert_eq!(placed.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
}

fn two_model_pool() -> Vec<suanli_scheduling::CardView> {
    let mut cards = node(1, 1, "NVIDIA V100", 1, 1);
    cards.extend(node(2, 1, "NVIDIA K80", 2, 1));
    cards
}

#[test]
fn heterogeneity_gives_each_model_to_the_job_that_gains_most_from_it() {
    let mut table = ThroughputTable::new();
    // "indifferent" is 1.2x faster on V100, "picky" 10x: picky should get the V100 even
    // though indifferent came first and is faster there in absolute terms.
    table.insert("indifferent", 1, "NVIDIA V100", 12.0);
    table.insert("indifferent", 1, "NVIDIA K80", 10.0);
    table.insert("picky", 1, "NVIDIA V100", 10.0);
    table.insert("picky", 1, "NVIDIA K80", 1.0);
    let snapshot =
        Snapshot { cards: two_model_pool(), queued: vec![queued(1, 1, spec("indifferent", 1), 0), queued(2, 1, spec("picky", 1), 1)], running: vec![] };
    let config = PolicyConfig { throughput: table, ..PolicyConfig::default() };
    let placed = placements(&decide(PolicyKind::Heterogeneity, &config, &snapshot));
    assert_eq!(placed, [(1, vec![2]), (2, vec![1])].into());
}

#[test]
fn heterogeneity_puts_a_lone_job_on_its_fastest_model_and_runs_unknown_jobs_anyway() {
    let mut table = ThroughputTable::new();
    table.insert("fast-on-k80", 1, "NVIDIA V100", 2.0);
    table.insert("fast-on-k80", 1, "NVIDIA K80", 3.0);
    let config = PolicyConfig { throughput: table, ..PolicyConfig::default() };
    let snapshot = Snapshot { cards: two_model_pool(), queued: vec![queued(1, 1, spec("fast-on-k80", 1), 0)], running: vec![] };
    assert_eq!(placements(&decide(PolicyKind::Heterogeneity, &config, &snapshot)), [(1, vec![2])].into());
    let snapshot =
        Snapshot { cards: two_model_pool(), queued: vec![queued(1, 1, spec("unknown", 1), 0), queued(2, 1, spec("unknown", 1), 1)], running: vec![] };
    assert_eq!(placements(&decide(PolicyKind::Heterogeneity, &config, &snapshot)).len(), 2);
}

#[test]
fn heterogeneity_refuses_models_too_slow_for_a_job_unless_nothing_faster_could_hold_it() {
    let mut table = ThroughputTable::new();
    table.insert("crawls-on-k80", 1, "NVIDIA V100", 10.0);
    table.insert("crawls-on-k80", 1, "NVIDIA K80", 1.0);
    table.insert("crawls-on-k80", 2, "NVIDIA V100", 20.0);
    table.insert("crawls-on-k80", 2, "NVIDIA K80", 2.0);
    let config = PolicyConfig { throughput: table, ..PolicyConfig::default() };
    // The V100 is busy: the job waits for it rather than crawl on the K80 at 10 %.
    let snapshot = Snapshot { cards: two_model_pool(), queued: vec![queued(1, 1, spec("crawls-on-k80", 1), 0)], running: vec![running(10, 1, &[1])] };
    assert!(decide(PolicyKind::Heterogeneity, &config, &snapshot).is_empty());
    // LAS, which knows no speeds, takes the K80.
    assert_eq!(placements(&decide(PolicyKind::Las, &config, &snapshot)), [(1, vec![2])].into());
    // A pair cannot fit on the one V100 ever, so the K80s are better than nothing.
    let mut cards = two_model_pool();
    cards.extend(node(3, 1, "NVIDIA K80", 3, 1));
    let snapshot = Snapshot { cards, queued: vec![queued(1, 1, spec("crawls-on-k80", 2), 0)], running: vec![] };
    assert_eq!(placements(&decide(PolicyKind::Heterogeneity, &config, &snapshot)), [(1, vec![2, 3])].into());
}

#[test]
fn heterogeneity_preempts_on_the_model_the_job_runs_fastest_on() {
    let mut table = ThroughputTable::new();
    table.insert("picky", 1, "NVIDIA V100", 10.0);
    table.insert("picky", 1, "NVIDIA K80", 4.0);
    let config = PolicyConfig { throughput: table, ..PolicyConfig::default() };
    // Both cards hold preemptible jobs of queue 2; the one on the K80 is the least deserving
    // (started last), so LAS takes it — the heterogeneity-aware policy takes the V100.
    let mut on_v100 = las_victim(10, 1, 20);
    on_v100.started_at = Timestamp(0);
    let mut on_k80 = las_victim(11, 2, 20);
    on_k80.started_at = Timestamp(HOUR_MS as i64);
    let snapshot = Snapshot { cards: two_model_pool(), queued: vec![queued(1, 1, spec("picky", 1), 0)], running: vec![on_v100, on_k80] };
    let las = decide(PolicyKind::Las, &config, &snapshot);
    assert_eq!((preemptions(&las), placements(&las)), (vec![11], [(1, vec![2])].into()));
    let hetero = decide(PolicyKind::Heterogeneity, &config, &snapshot);
    assert_eq!((preemptions(&hetero), placements(&hetero)), (vec![10], [(1, vec![1])].into()));
}

#[test]
fn decisions_do_not_depend_on_input_order() {
    let mut cards = two_model_pool();
    cards.extend(node(3, 2, "A100", 3, 4));
    let snapshot = Snapshot { cards, queued: (1..=8).map(|i| queued(i, 1 + i % 2, spec("j", 1 + (i % 3) as u32), 0)).collect(), running: vec![] };
    let mut reversed = snapshot.clone();
    reversed.cards.reverse();
    reversed.queued.reverse();
    for kind in PolicyKind::ALL {
        assert_eq!(decide(kind, &PolicyConfig::default(), &snapshot), decide(kind, &PolicyConfig::default(), &reversed), "{kind}");
    }
}

#[test]
fn policies_are_usable_as_trait_objects_across_threads() {
    fn assert_send<T: Send + ?Sized>() {}
    assert_send::<dyn Policy>();
}
