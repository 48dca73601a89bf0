//! The CV pipeline through the marketplace: a researcher's built-in `train_classifier` job is
//! placed on a leased card, the agent runs `suanli-job` as the lease's account, its JSON-lines
//! progress reaches the broker, its checkpoint and its model reach the artifact store, and the
//! model it trained is good. Needs root (lease accounts), `SUANLI_JOB_BINARY` and
//! `SUANLI_CV_DATA` (.ci/run sets both after building the `torch` feature).

mod support;

use std::time::Duration;

use suanli_artifacts::{ArtifactClient, Digest};
use support::{wait_done, World, ARTIFACT_TOKEN};

#[tokio::test]
async fn a_builtin_training_job_runs_on_a_leased_card_and_its_model_lands_in_the_store() {
    let Some(data) = support::cv_data() else { return };
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(1, 2, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let spec = support::digits_training(&data, 4);
    let job = w.submit(&mut jobs, "digits", &spec).await.job_id;
    let done = wait_done(&mut jobs, 1, Duration::from_secs(300)).await;
    let j = done.iter().find(|j| j.job_id == job).expect("the job");
    assert_eq!(j.state, "succeeded", "{j:?}\n{}", w.logs());
    assert!(!j.checkpoint_sha256.is_empty(), "a checkpoint was uploaded while it trained");
    let progress: serde_json::Value = serde_json::from_str(&j.progress_json).expect("progress is JSON");
    assert!(progress.get("event").is_some(), "the job's own progress line was relayed: {progress}");

    let store = ArtifactClient::new(&w.artifacts, ARTIFACT_TOKEN);
    let fetch = |name: &str| {
        let sha: Digest = j.outputs.get(name).unwrap_or_else(|| panic!("{name} recorded")).parse().expect("digest");
        let to = w.dir.path().join(name);
        let store = &store;
        async move {
            store.download_to(sha, &to).await.expect("download");
            std::fs::read(&to).expect("read")
        }
    };
    let metrics: serde_json::Value = serde_json::from_slice(&fetch("metrics.json").await).expect("metrics");
    assert!(metrics["accuracy"].as_f64().is_some_and(|a| a >= 0.9), "{metrics}");
    let card: serde_json::Value = serde_json::from_slice(&fetch("model.json").await).expect("card");
    assert_eq!(card["classes"].as_array().map(Vec::len), Some(10));
    assert!(fetch("model.safetensors").await.len() > 10_000);
}
