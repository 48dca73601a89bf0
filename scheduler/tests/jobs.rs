//! Real processes end to end: a broker, two agents with simulated GPUs and two scheduler
//! replicas run 200 mixed jobs on a researcher's two leases. The jobs write their own records
//! (node, Unix user, visible devices, start and end) into a directory outside the system, and
//! the test checks those against the broker's lease history: no job ran on cards its owner did
//! not lease, no two jobs shared a card unless both asked to share. Midway the acting
//! scheduler is killed; the standby takes over. At the end the charges are recomputed from the
//! lease records and compared with the ledger and the statement, to the fen.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use suanli_proto::v1;
use suanli_testkit::cluster::PLATFORM_TOKEN;
use suanli_testkit::fixtures;
use support::{wait_done, World};

const JOBS: usize = 200;
const CARDS_PER_NODE: u32 = 4;

/// One line a job wrote: `<job> <attempt> <node> <user> <devices> <nanos> start|end`.
#[derive(Debug)]
struct Record {
    job: u64,
    node: u64,
    user: String,
    devices: Vec<u32>,
    start: u128,
    end: Option<u128>,
}

fn records(path: &Path) -> BTreeMap<(u64, u32), Record> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: BTreeMap<(u64, u32), Record> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [job, attempt, node, user, devices, nanos, what] = f[..] else { panic!("malformed record {line:?}") };
        let key = (job.parse().expect("job"), attempt.parse().expect("attempt"));
        let nanos: u128 = nanos.parse().expect("time");
        let rec = out.entry(key).or_insert_with(|| Record {
            job: key.0,
            node: node.parse().expect("node"),
            user: user.to_owned(),
            devices: devices.split(',').map(|d| d.parse().expect("device")).collect(),
            start: 0,
            end: None,
        });
        match what {
            "start" => rec.start = nanos,
            "end" => rec.end = Some(nanos),
            other => panic!("unknown record kind {other}"),
        }
    }
    out
}

fn spec(i: usize, record: &Path) -> serde_json::Value {
    // A third share a card (inference services), the rest train on one or two cards.
    let (kind, cards, shared) = match i % 3 {
        0 => ("inference", 1, true),
        1 => ("training", 1, false),
        _ => ("training", 2, false),
    };
    let script = format!(
        "line() {{ echo \"$SUANLI_JOB_ID $SUANLI_JOB_ATTEMPT $SUANLI_NODE_ID $(id -un) $CUDA_VISIBLE_DEVICES $(date +%s%N) $1\" >> {r}; }}; line start; sleep 0.{d}; line end",
        r = record.display(),
        d = 1 + i % 4,
    );
    serde_json::json!({
        "name": format!("job-{i}"), "kind": kind,
        "resources": { "cards": cards, "shared": shared },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "preemptible": i.is_multiple_of(2),
        "expected_seconds": 1,
    })
}

#[tokio::test]
async fn two_hundred_jobs_run_only_on_leased_cards_and_are_charged_exactly() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let mut w = World::start(2, CARDS_PER_NODE, 2).await;
    let (cluster, researcher_id, record) = (w.cluster, w.researcher_id, w.record.clone());
    let mut researcher = w.researcher.clone();
    let mut jobs = w.jobs(&w.researcher_token).await;
    let mut platform_jobs = w.jobs(PLATFORM_TOKEN).await;
    for i in 0..JOBS {
        w.submit(&mut jobs, &i.to_string(), &spec(i, &record)).await;
    }

    // Kill whichever replica acts once a quarter of the jobs are done; the other takes over.
    wait_done(&mut jobs, JOBS / 4, Duration::from_secs(240)).await;
    let acting = platform_jobs.get_scheduling_view(v1::GetSchedulingViewRequest {}).await.expect("view").into_inner().lease.expect("lease");
    let victim = if acting.holder == "sched-0" { 0 } else { 1 };
    w.schedulers[victim].take().expect("replica").kill().await.expect("kill the acting scheduler");
    let (agents, leases) = (&w.agents, &w.leases);
    let done = wait_done(&mut jobs, JOBS, Duration::from_secs(240)).await;
    let after = platform_jobs.get_scheduling_view(v1::GetSchedulingViewRequest {}).await.expect("view").into_inner().lease.expect("lease");
    assert_ne!(after.holder, acting.holder, "the standby took over");
    assert!(after.epoch > acting.epoch);

    let unsuccessful: Vec<String> = done
        .iter()
        .filter(|j| j.state != "succeeded")
        .map(|j| format!("job {} {} ({:?}) on nodes {:?}", j.job_id, j.state, j.end_reason, j.attempts.last().map(|a| &a.node_ids)))
        .collect();
    assert!(
        unsuccessful.is_empty(),
        "{unsuccessful:#?}\nrecords:\n{}",
        std::fs::read_to_string(&record).unwrap_or_default().lines().take(20).collect::<Vec<_>>().join("\n")
    );

    // The jobs' own records against the lease history.
    let recs = records(&record);
    assert_eq!(recs.len(), JOBS, "every job ran once: {} records", recs.len());
    let lease_of_node: BTreeMap<u64, (u64, &str)> = {
        let mut m = BTreeMap::new();
        for lease in leases {
            let l = researcher.get_lease(v1::GetLeaseRequest { lease_id: *lease }).await.expect("lease").into_inner();
            assert_eq!(l.researcher_id, researcher_id);
            let cards = researcher.list_cards(v1::ListCardsRequest { cluster_id: cluster }).await.expect("cards").into_inner().cards;
            let node = cards.iter().find(|c| l.card_ids.contains(&c.card_id)).expect("a card of the lease").node_id;
            let prefix = agents.iter().find(|a| a.node == node).expect("agent").prefix.as_str();
            m.insert(node, (*lease, prefix));
        }
        m
    };
    let shared: BTreeSet<u64> = done.iter().filter(|j| j.kind == "inference").map(|j| j.job_id).collect();
    let mut by_device: BTreeMap<(u64, u32), Vec<&Record>> = BTreeMap::new();
    for r in recs.values() {
        let (lease, prefix) = lease_of_node.get(&r.node).expect("the job ran on a node the researcher leases");
        assert_eq!(r.user, format!("{prefix}{lease}"), "job {} ran as the lease's account", r.job);
        assert!(r.devices.iter().all(|d| *d < CARDS_PER_NODE), "job {} saw devices {:?}", r.job, r.devices);
        assert!(r.end.is_some(), "job {} never finished", r.job);
        for d in &r.devices {
            by_device.entry((r.node, *d)).or_default().push(r);
        }
    }
    for ((node, device), mut runs) in by_device {
        runs.sort_by_key(|r| r.start);
        for pair in runs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let overlap = a.end.unwrap_or(u128::MAX) > b.start;
            assert!(!overlap || (shared.contains(&a.job) && shared.contains(&b.job)), "jobs {} and {} shared card {device} of node {node}", a.job, b.job);
        }
    }

    // Money: end the leases, recompute each charge from the lease record, compare.
    let mut expected_total = 0;
    for lease in leases {
        let l = researcher
            .end_lease(v1::EndLeaseRequest { request_id: format!("end-{lease}"), lease_id: *lease, reason: v1::EndReason::ByResearcher.into() })
            .await
            .expect("end")
            .into_inner();
        let used_ms = (l.ended_at_ms - l.activated_at_ms) as i128;
        let price = l.price_per_card.expect("price").minor as i128;
        let expected = (price * l.card_ids.len() as i128 * used_ms + 1_800_000) / 3_600_000; // half up, hourly
        let txs = researcher
            .list_transactions(v1::ListTransactionsRequest { account_id: 0, month: String::new(), ..Default::default() })
            .await
            .expect("transactions")
            .into_inner()
            .transactions;
        let charged: i64 = txs
            .iter()
            .filter(|t| t.lease_id == *lease && t.kind == "charge")
            .flat_map(|t| t.entries.iter().filter(|e| e.account == format!("held:{researcher_id}")))
            .map(|e| -e.minor)
            .sum();
        assert_eq!(charged as i128, expected, "{lease}: ledger charge vs the lease's own record");
        expected_total += expected as i64;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let month = suanli_types::Month::containing(suanli_types::Timestamp::from_millis(now)).to_string();
    let statement = researcher
        .get_statement(v1::GetStatementRequest { account_id: 0, month: month.clone(), currency: String::new() })
        .await
        .expect("statement")
        .into_inner();
    assert_eq!(statement.charged_minor, expected_total, "statement {month}");
    assert_eq!(statement.closing_minor, fixtures::RESEARCHER_FUNDS - expected_total, "what is left is what was not charged");
    assert_eq!(statement.jobs.len(), JOBS, "every job's cost is on the statement");
    let balance = researcher.get_balance(v1::GetBalanceRequest { account_id: 0, currency: String::new() }).await.expect("balance").into_inner();
    assert_eq!((balance.available_minor, balance.held_minor), (fixtures::RESEARCHER_FUNDS - expected_total, 0));
}
