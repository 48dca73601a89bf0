//! Self-fencing: a node cut off from every broker stops its jobs on its own, within
//! `--fence-after-s`, so that the copy the scheduler places elsewhere (after 30 s of silence)
//! never runs beside this one.

mod support;

use std::time::Duration;

use suanli_proto::v1;
use support::{World, POLL};

/// Whether a process whose command line holds `marker` is alive on this machine.
fn running(marker: &str) -> bool {
    std::process::Command::new("pgrep").args(["-f", marker]).output().is_ok_and(|o| o.status.success())
}

/// A world whose one agent fences after `fence_s`, running a job that would last ten minutes;
/// returns the world and the job's marker (its command line), once the job runs.
async fn world_with_a_long_job(fence_s: u64, tag: &str, seed: u32) -> (World, String) {
    let w = World::start_with(1, 1, 1, &["--fence-after-s", &fence_s.to_string()]).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let marker = format!("sleep {seed}{:05}", std::process::id() % 100_000);
    let spec = serde_json::json!({
        "name": "long", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", format!("exec {marker}")] } },
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, tag, &spec).await.job_id;
    suanli_testkit::eventually(Duration::from_secs(60), POLL, || {
        let mut c = jobs.clone();
        let marker = marker.clone();
        async move {
            let j = c.get_job(v1::GetJobRequest { job_id: job }).await.ok()?.into_inner();
            (j.state == "running" && running(&marker)).then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the job runs: {e}\n{}", w.logs()));
    (w, marker)
}

#[tokio::test]
async fn a_node_cut_off_from_every_broker_stops_its_jobs() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    const FENCE_S: u64 = 3;
    let (mut w, marker) = world_with_a_long_job(FENCE_S, "long", 6).await;
    // While the broker answers, the job keeps running past the fencing time.
    let started = std::time::Instant::now();
    suanli_testkit::eventually(Duration::from_secs(30), POLL, || async {
        (started.elapsed() > Duration::from_secs(FENCE_S + 2) && running(&marker)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("not fenced while the broker answers: {e}\n{}", w.logs()));
    assert!(running(&marker), "still running with the broker up");
    // Every broker gone: the node stops the job on its own.
    w.broker.kill(1).await.expect("kill the broker");
    let cut_off = std::time::Instant::now();
    suanli_testkit::eventually(Duration::from_secs(30), POLL, || async { (!running(&marker)).then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("the cut-off node stops its job: {e}\n{}", w.logs()));
    assert!(cut_off.elapsed() >= Duration::from_secs(FENCE_S - 1), "not before the fencing time: {:?}", cut_off.elapsed());
    assert!(w.logs().contains("self-fencing"), "{}", w.logs());
}

#[tokio::test]
async fn a_job_does_not_outlive_its_crashed_agent() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    const FENCE_S: u64 = 3;
    let (w, marker) = world_with_a_long_job(FENCE_S, "orphan", 7).await;
    // The agent dies at once (no shutdown code runs) and does not come back.
    let agent = w.agents[0].service.pid().expect("the agent's pid");
    let killed = std::process::Command::new("kill").args(["-KILL", &agent.to_string()]).status().expect("kill");
    assert!(killed.success(), "kill -9 the agent");
    let crashed = std::time::Instant::now();
    suanli_testkit::eventually(Duration::from_secs(30), POLL, || async { (!running(&marker)).then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("the job of a crashed agent stops: {e}\n{}", w.logs()));
    assert!(crashed.elapsed() >= Duration::from_secs(FENCE_S - 1), "not before the fencing time: {:?}", crashed.elapsed());
    assert!(w.logs().contains("fence guard"), "{}", w.logs());
}
