//! Download throughput of a job's output: through the portal and `suanli job pull` (a
//! capability the broker signs for the owner, the portal streaming from the artifact store and
//! checking the hash, the CLI checking it again and renaming) against the raw transfer from
//! the same store with its service token (`ArtifactClient::download_to`, what `aws s3 cp` is to
//! S3), in the same process, interleaved.
//!
//! Starts the scheduler tests' world (a broker, a scheduler serving the artifact store, one
//! agent with a simulated GPU; needs root for the lease's Unix account), runs a job that
//! leaves `--mib` MiB of random bytes as its output, then downloads it `--rounds` times each
//! way. Prints each run, the medians in MiB/s and their ratio.
//!
//! `cargo bench -p suanli-scheduler --bench outputs --profile dev -- --mib 1024 --rounds 3`

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use suanli_artifacts::{ArtifactClient, Digest};
use suanli_proto::v1;
use suanli_testkit::cluster::PLATFORM_TOKEN;
use suanli_testkit::portal::researcher_portal;
use suanli_testkit::workspace_binary;
use support::{wait_done, World, ARTIFACT_TOKEN};

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (mib, rounds) = (arg("--mib", 1024), arg("--rounds", 3));
    anyhow::ensure!(suanli_testkit::require_root("lease accounts (Unix users)"), "the bench runs a job: run it as root");
    let w = World::start(1, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let script = format!(r#"head -c {bytes} /dev/urandom > "$SUANLI_OUTPUT_DIR/model.bin""#, bytes = mib << 20);
    let spec = serde_json::json!({
        "name": "big-output", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "outputs": ["model.bin"],
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, "big-output", &spec).await.job_id;
    let done = wait_done(&mut jobs, 1, Duration::from_secs(1800)).await;
    anyhow::ensure!(done[0].state == "succeeded", "the job: {:?}\n{}", done[0], w.logs());
    let job_record = jobs.get_job(v1::GetJobRequest { job_id: job }).await?.into_inner();
    let sha = job_record.outputs.get("model.bin").cloned().ok_or_else(|| anyhow::anyhow!("no output recorded"))?;
    let digest: Digest = sha.parse()?;

    let broker_url = format!("http://{}", w.broker.address(1)?);
    let researcher = (w.researcher_id, w.researcher_token.as_str());
    let more = ["--artifacts-url", w.artifacts.as_str()];
    let (portal, token) = researcher_portal(w.dir.path(), &broker_url, PLATFORM_TOKEN, researcher, suanli_portal::demo::DEMO_PASSWORD, &more).await?;
    let config = w.dir.path().join("cli");
    let suanli = workspace_binary("suanli-cli", "suanli")?;
    let login =
        std::process::Command::new(&suanli).env("SUANLI_CONFIG_DIR", &config).env("SUANLI_TOKEN", &token).args(["login", "--portal", &portal.url]).output()?;
    anyhow::ensure!(login.status.success(), "login: {}", String::from_utf8_lossy(&login.stderr));

    let store = ArtifactClient::new(&w.artifacts, ARTIFACT_TOKEN);
    let (mut raw, mut through) = (Vec::new(), Vec::new());
    println!("{mib} MiB output, {rounds} rounds each way, interleaved");
    println!("{:<44} {:>8} {:>10}", "transfer", "seconds", "MiB/s");
    for round in 0..rounds {
        let dest = w.dir.path().join(format!("raw-{round}.bin"));
        let started = Instant::now();
        store.download_to(digest, &dest).await?;
        let s = started.elapsed().as_secs_f64();
        std::fs::remove_file(&dest)?;
        raw.push(mib as f64 / s);
        println!("{:<44} {:>8.2} {:>10.1}", "store → file (service token, raw)", s, mib as f64 / s);

        let dir = w.dir.path().join(format!("pulled-{round}"));
        let started = Instant::now();
        let pull = std::process::Command::new(&suanli).env("SUANLI_CONFIG_DIR", &config).args(["job", "pull", &job.to_string(), "--dir"]).arg(&dir).output()?;
        let s = started.elapsed().as_secs_f64();
        anyhow::ensure!(pull.status.success(), "pull: {}", String::from_utf8_lossy(&pull.stderr));
        std::fs::remove_dir_all(&dir)?;
        through.push(mib as f64 / s);
        println!("{:<44} {:>8.2} {:>10.1}", "store → portal → suanli job pull → file", s, mib as f64 / s);
    }
    let (raw, through) = (median(raw), median(through));
    println!("median: raw {raw:.1} MiB/s, through the portal and CLI {through:.1} MiB/s, ratio {:.2}", through / raw);
    Ok(())
}
