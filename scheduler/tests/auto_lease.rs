//! A researcher with no lease submits a job that allows auto-leasing: the scheduler leases
//! the cheapest Class B cards the job accepts within its budget, the job runs there, and the
//! lease is released once the job is over and the cards are idle. (Which cluster wins, and
//! the refusals for budget and region, are unit-tested on the state machine.)

mod support;

use std::time::Duration;

use suanli_proto::v1;
use suanli_testkit::eventually;
use support::{World, POLL};

#[tokio::test]
async fn the_cheapest_matching_cards_are_leased_for_a_job_and_released_after_it() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let mut w = World::bare(2, 2, 1).await;
    let dear = w.publish(&[0], 900, "dear").await;
    let cheap = w.publish(&[1], 600, "cheap").await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let script = format!("echo \"$SUANLI_JOB_ID $SUANLI_NODE_ID $(id -un)\" >> {}; sleep 1", w.record.display());
    let spec = |name: &str, budget: i64| {
        serde_json::json!({
            "name": name, "kind": "training",
            "resources": { "cards": 2, "gpu_models": ["A100"] },
            "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
            "budget_minor": budget,
            "auto_lease": { "billing_mode": "hourly", "region": "Beijing" },
        })
    };
    // 2 cards × 6.00 CNY for an hour fits 20.00; the dear cluster would too, but costs more.
    let job = w.submit(&mut jobs, "fits", &spec("fits", 2_000)).await.job_id;

    let mut researcher = w.researcher.clone();
    let lease = eventually(Duration::from_secs(60), POLL, || {
        let mut c = researcher.clone();
        async move {
            let leases = c.list_leases(v1::ListLeasesRequest { live_only: false, ..Default::default() }).await.ok()?.into_inner().leases;
            leases.into_iter().find(|l| l.auto_for_job_id == job)
        }
    })
    .await
    .expect("a lease was taken for the job");
    assert_eq!(lease.cluster_id, cheap, "the cheaper cluster (not {dear})");
    assert_eq!(lease.card_ids.len(), 2);

    let done = eventually(Duration::from_secs(90), POLL, || {
        let mut c = jobs.clone();
        async move {
            let j = c.get_job(v1::GetJobRequest { job_id: job }).await.ok()?.into_inner();
            (j.state == "succeeded").then_some(j)
        }
    })
    .await
    .expect("the job ran on the leased cards");
    let attempt = done.attempts.last().expect("attempt");
    assert!(attempt.lease_ids.iter().all(|l| *l == lease.lease_id), "{attempt:?}");
    let record = std::fs::read_to_string(&w.record).expect("record");
    assert!(record.contains(&format!("{job} {} ", w.agents[1].node)), "ran on the cheap node: {record}");

    // Idle and its job over: released.
    let ended = w.wait_lease(lease.lease_id, v1::LeaseState::Ended).await;
    assert!(ended.ended_at_ms >= done.ended_at_ms);
    // The lease was charged for the time it was active, and the rest of the hold came back.
    let balance = researcher.get_balance(v1::GetBalanceRequest { account_id: 0, currency: String::new() }).await.expect("balance").into_inner();
    let used_ms = (ended.ended_at_ms - ended.activated_at_ms) as i128;
    let charge = (600 * 2 * used_ms + 1_800_000) / 3_600_000;
    assert_eq!((balance.available_minor as i128, balance.held_minor), (suanli_testkit::fixtures::RESEARCHER_FUNDS as i128 - charge, 0));
}
