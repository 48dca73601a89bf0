//! Garbage collection of the artifact store this replica hosts: every so often, the digests
//! the broker's jobs still refer to (inputs, outputs, latest checkpoints) are gathered, and
//! what jobs uploaded that none of them refers to any more (superseded checkpoints, outputs of
//! attempts that lost) is deleted once older than a grace period. A round that cannot gather
//! every job's references collects nothing.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use suanli_artifacts::{Collector, Digest};
use suanli_proto::v1;
use suanli_types::JobSpec;

/// Everything a list of jobs refers to.
pub fn referenced_by(jobs: &[v1::Job]) -> HashSet<Digest> {
    let mut digests = HashSet::new();
    for job in jobs {
        digests.extend(job.outputs.values().filter_map(|d| d.parse::<Digest>().ok()));
        digests.extend(job.checkpoint_sha256.parse::<Digest>().ok());
        if let Ok(spec) = serde_json::from_str::<JobSpec>(&job.spec_json) {
            digests.extend(spec.inputs.iter().filter_map(|i| i.sha256.parse::<Digest>().ok()));
        }
    }
    digests
}

/// Where the references come from and how often.
#[derive(Clone, Debug)]
pub struct GcConfig {
    pub brokers: Vec<String>,
    pub broker_ca: Option<String>,
    pub platform_token: String,
    pub every: Duration,
    /// Uploads younger than this are kept whatever refers to them: their record may still be
    /// on its way to the broker.
    pub grace: Duration,
}

/// One collection: the jobs' references from the first broker that answers, then the sweep.
pub async fn collect_once(collector: &Collector, config: &GcConfig) -> Result<suanli_artifacts::Collected, String> {
    let mut last_error = String::from("no broker configured");
    for endpoint in &config.brokers {
        let jobs = async {
            let channel = suanli_proto::client::channel_checked(endpoint, config.broker_ca.as_deref()).await.map_err(|e| e.to_string())?;
            let auth = suanli_proto::client::bearer(Some(&config.platform_token)).map_err(|e| e.to_string())?;
            let client = v1::job_service_client::JobServiceClient::with_interceptor(channel, auth).max_decoding_message_size(256 * 1024 * 1024);
            suanli_proto::client::all_jobs(&client, false).await.map_err(|s| s.message().to_owned())
        };
        match jobs.await {
            Ok(jobs) => {
                let referenced = referenced_by(&jobs);
                let stored_before = SystemTime::now().checked_sub(config.grace).unwrap_or(SystemTime::UNIX_EPOCH);
                return collector.collect(&referenced, stored_before).await.map_err(|e| e.to_string());
            }
            Err(e) => last_error = format!("{endpoint}: {e}"),
        }
    }
    Err(last_error)
}

/// Collects every `config.every`, for as long as the process runs.
pub async fn run(collector: Collector, config: GcConfig) {
    let mut tick = tokio::time::interval(config.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match collect_once(&collector, &config).await {
            Ok(done) => tracing::info!(deleted = done.deleted, freed_bytes = done.freed_bytes, kept = done.kept, "artifact garbage collected"),
            Err(why) => tracing::warn!(%why, "artifact garbage collection skipped: the jobs' references could not be read"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: u8) -> String {
        Digest([byte; 32]).to_hex()
    }

    #[test]
    fn inputs_outputs_and_checkpoints_are_references() {
        let spec = serde_json::json!({
            "name": "t", "kind": "training", "resources": { "cards": 1 },
            "inputs": [{ "name": "data.tar", "sha256": digest(1) }],
            "run": { "command": { "program": "/bin/true", "args": [] } },
        });
        let job =
            v1::Job { spec_json: spec.to_string(), outputs: [("model".to_owned(), digest(2))].into(), checkpoint_sha256: digest(3), ..Default::default() };
        let refs = referenced_by(&[job]);
        let want: HashSet<Digest> = [1u8, 2, 3].iter().map(|b| Digest([*b; 32])).collect();
        assert_eq!(refs, want);
    }

    #[test]
    fn junk_in_a_job_is_no_reference_and_no_panic() {
        let job =
            v1::Job { spec_json: "{".into(), outputs: [("x".to_owned(), "nope".to_owned())].into(), checkpoint_sha256: "ZZ".into(), ..Default::default() };
        assert!(referenced_by(&[job]).is_empty());
    }
}
