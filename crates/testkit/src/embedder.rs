//! The image embedder image search uses, for tests and benchmarks: `suanli-job serve` in
//! `embed` mode over a seeded, untrained backbone (`suanli-job backbone`), on a free loopback
//! port, requiring a bearer token. Needs the torch build of `suanli-job` (`SUANLI_JOB_BINARY`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::Service;

/// The token test embedders require (`SUANLI_SERVE_TOKEN`).
pub const TOKEN: &str = "embedder-token-for-tests";

/// `SUANLI_JOB_BINARY` when this run has the torch build; under CI=true it must.
pub fn job_binary() -> Option<PathBuf> {
    let path = std::env::var_os("SUANLI_JOB_BINARY").map(PathBuf::from).filter(|p| p.is_file());
    if path.is_none() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "SUANLI_JOB_BINARY must name the torch build of suanli-job under CI=true (.ci/run sets it)");
        eprintln!("skipped: SUANLI_JOB_BINARY is not set (ops/cargo-torch build -p suanli-cv --features torch --bin suanli-job)");
    }
    path
}

/// Starts an embedder whose weights come from `seed` (another seed: another model version);
/// its base URL is `service.get("url")`. Files go under `dir`.
pub async fn start(job: &Path, dir: &Path, seed: i64) -> anyhow::Result<Service> {
    let model = dir.join(format!("embedder-{seed}"));
    let made =
        tokio::process::Command::new(job).arg("backbone").arg(&model).args(["--seed", &seed.to_string(), "--width", "16", "--side", "96"]).output().await?;
    anyhow::ensure!(made.status.success(), "suanli-job backbone: {}", String::from_utf8_lossy(&made.stderr));
    let spec = dir.join(format!("embedder-{seed}.json"));
    std::fs::write(&spec, json!({"task": "serve", "mode": "embed", "model": model, "listen": "127.0.0.1:0", "device": "cpu"}).to_string())?;
    let args = ["run".to_owned(), spec.display().to_string()];
    Service::start_until(&format!("embedder-{seed}"), job, &args, &[("SUANLI_SERVE_TOKEN", TOKEN)], dir, Duration::from_secs(60), |line| {
        let v: Value = serde_json::from_str(line).ok()?;
        let url = v["url"].as_str().filter(|_| v["event"] == "serving")?;
        Some([("url".to_owned(), url.trim_end_matches("/v1/predict").to_owned())].into_iter().collect())
    })
    .await
}
