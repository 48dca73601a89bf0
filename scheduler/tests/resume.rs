//! A card fault mid-training: the broker sees the card fall off the bus, the job's agent
//! stops it, the scheduler places it on the other node's card, and that agent hands it the
//! checkpoint the first attempt uploaded: the job resumes where it was and finishes, and its
//! output is in the artifact store.

mod support;

use std::time::Duration;

use suanli_artifacts::{ArtifactClient, Digest};
use suanli_proto::v1;
use support::{wait_done, World, ARTIFACT_TOKEN, POLL};

const STEPS: u32 = 40;

#[tokio::test]
async fn a_job_on_a_card_that_falls_off_resumes_from_its_checkpoint_elsewhere() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(2, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    // Counts to STEPS, a step per 0.15 s, checkpointing every step (write, then rename), and
    // starts from the checkpoint it is given.
    let script = format!(
        r#"step=0
if [ -n "$SUANLI_RESUME_FROM" ]; then step=$(cat "$SUANLI_RESUME_FROM"); fi
echo "$SUANLI_JOB_ATTEMPT $SUANLI_NODE_ID $step" >> {record}
while [ "$step" -lt {STEPS} ]; do
  step=$((step + 1))
  echo "$step" > "$SUANLI_CHECKPOINT_DIR/checkpoint.tmp"
  mv "$SUANLI_CHECKPOINT_DIR/checkpoint.tmp" "$SUANLI_CHECKPOINT_DIR/checkpoint"
  echo "{{\"step\": $step, \"of\": {STEPS}}}"
  sleep 0.15
done
echo "trained for $step steps" > "$SUANLI_OUTPUT_DIR/model.txt""#,
        record = w.record.display()
    );
    let spec = serde_json::json!({
        "name": "counting", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "outputs": ["model.txt"],
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, "counting", &spec).await.job_id;

    // Once a checkpoint is on record, the card it runs on falls off the bus.
    let running = suanli_testkit::eventually(Duration::from_secs(60), POLL, || {
        let mut c = jobs.clone();
        async move {
            let j = c.get_job(v1::GetJobRequest { job_id: job }).await.ok()?.into_inner();
            (j.state == "running" && !j.checkpoint_sha256.is_empty()).then_some(j)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("the job runs and checkpoints: {e}\n{}", w.logs()));
    let first = running.attempts.last().expect("an attempt").clone();
    // Its progress lines reach the broker while it runs.
    let progress = suanli_testkit::eventually(Duration::from_secs(30), POLL, || {
        let mut c = jobs.clone();
        async move {
            let j = c.get_job(v1::GetJobRequest { job_id: job }).await.ok()?.into_inner();
            let p: serde_json::Value = serde_json::from_str(&j.progress_json).ok()?;
            (p["of"] == STEPS).then_some(p)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("progress relayed: {e}\n{}", w.logs()));
    assert!(progress["step"].as_u64().is_some_and(|s| s >= 1), "{progress}");
    let agent = w.agent_of(first.node_ids[0]);
    let metrics = agent.service.get("metrics").expect("metrics address");
    let fault = reqwest::Client::new()
        .post(format!("http://{metrics}/simulated/cards/{}/fault/fallen-off-bus", first.card_indexes[0]))
        .send()
        .await
        .expect("inject the fault");
    assert!(fault.status().is_success(), "{}", fault.status());

    let done = wait_done(&mut jobs, 1, Duration::from_secs(120)).await;
    let j = done.iter().find(|j| j.job_id == job).expect("the job");
    assert_eq!(j.state, "succeeded", "{j:?}");
    assert_eq!(j.failures, 0, "losing a card is not the job's failure (it had one attempt to spare)");
    let attempts = &j.attempts;
    assert!(attempts.len() >= 2, "{attempts:?}");
    let last = attempts.last().expect("last");
    assert_ne!(last.node_ids, first.node_ids, "resumed on the other node");
    assert_eq!(attempts[0].end_reason.as_ref().map(|r| r.kind.as_str()), Some("card_lost"));

    // The job's own record: the second attempt started from where the first had got to.
    let lines: Vec<Vec<u32>> =
        std::fs::read_to_string(&w.record).expect("record").lines().map(|l| l.split_whitespace().map(|f| f.parse().expect("number")).collect()).collect();
    assert_eq!(lines.len(), attempts.len(), "one start per attempt: {lines:?}");
    assert_eq!(lines[0][2], 0, "the first attempt started from scratch");
    let resumed_at = lines.last().expect("last start")[2];
    assert!(resumed_at > 0 && resumed_at < STEPS, "resumed at step {resumed_at}");

    // The output is in the store, and it is what the job wrote.
    let sha = j.outputs.get("model.txt").expect("the output was recorded");
    let store = ArtifactClient::new(&w.artifacts, ARTIFACT_TOKEN);
    let back = w.dir.path().join("model.txt");
    store.download_to(sha.parse::<Digest>().expect("digest"), &back).await.expect("download the output");
    assert_eq!(std::fs::read_to_string(&back).expect("read"), format!("trained for {STEPS} steps\n"));
}

/// A job that checkpoints and dies at once: the agent saves the checkpoint it left before it
/// reports the end, so a retry (or the researcher) has it, however short the run was.
#[tokio::test]
async fn the_checkpoint_a_job_leaves_as_it_dies_is_saved_before_its_end_is_reported() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(1, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let script = r#"echo "step 7" > "$SUANLI_CHECKPOINT_DIR/checkpoint"; exit 3"#;
    let spec = serde_json::json!({
        "name": "short-lived", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, "short-lived", &spec).await.job_id;
    let done = wait_done(&mut jobs, 1, Duration::from_secs(60)).await;
    let j = done.iter().find(|j| j.job_id == job).expect("the job");
    assert_eq!(j.state, "failed", "{j:?}\n{}", w.logs());
    assert!(!j.checkpoint_sha256.is_empty(), "the last checkpoint was saved: {j:?}\n{}", w.logs());
    let store = ArtifactClient::new(&w.artifacts, ARTIFACT_TOKEN);
    let back = w.dir.path().join("checkpoint");
    store.download_to(j.checkpoint_sha256.parse::<Digest>().expect("digest"), &back).await.expect("download the checkpoint");
    assert_eq!(std::fs::read_to_string(&back).expect("read"), "step 7\n");
}
