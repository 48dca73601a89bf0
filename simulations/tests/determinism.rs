//! Same inputs → byte-identical outputs, and a small trace's per-job results pinned.
//!
//! `tests/data/tiny.csv` is a hand-made 10-job Tiresias-format trace on 2 nodes × 4 GPUs:
//! gangs of 1 to 8, arrivals that queue, and LAS preemptions. The expected per-job CSVs in
//! `tests/data/expected/` were produced by this simulator and checked by hand against the
//! engine's rules; a change to the engine, the policies or the metrics that moves any job
//! shows up here as a diff.
//!
//! FIFO by hand (60 s rounds): jobs 0 and 1 (4 GPUs each) fill the cluster at 0; job 0 ends at
//! 600, where job 2 starts and the 8-GPU job 3 reserves job 1's end (1200), so the 1-GPU jobs
//! 4 and 5 backfill (they end by 720) but the 2400 s job 6 may not; job 7 backfills at 900
//! (ends exactly at 1200); job 3 runs 1200–2100; then jobs 6 and 8, and job 9 waits for job 6
//! (4500–5100).

use std::path::{Path, PathBuf};

use suanli_scheduling::{LasConfig, PolicyKind};
use suanli_sim::engine::EngineConfig;
use suanli_sim::run::{self, Format, TraceArgs};
use suanli_sim::synthetic::SyntheticConfig;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn args(format: Format, out: &Path) -> TraceArgs {
    TraceArgs {
        format,
        inputs: vec![data().join("tiny.csv")],
        policies: vec![PolicyKind::Las, PolicyKind::Fifo],
        cluster: "2x4:v100".into(),
        nodes: None,
        engine: EngineConfig { round_s: 60, first_start_delay_s: 0, restart_delay_s: 30, ..EngineConfig::default() },
        // Two queues: below and above 10 GPU-minutes; no minimum run before a preemption.
        las: LasConfig { thresholds_gpu_ms: vec![600_000], min_run_ms: 0 },
        profiles: None,
        throughputs: None,
        philly_clusters: vec![],
        max_jobs: None,
        time_scale: 1.0,
        synthetic: SyntheticConfig { jobs: 300, jobs_per_hour: 12.0, max_gpus: 8, max_duration_s: 86_400.0, seed: 0 },
        seeds: vec![1, 2, 3],
        compare: None,
        out: out.to_owned(),
        name: "tiny".into(),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn same_trace_same_bytes_and_pinned_per_job_results() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    run::trace(&args(Format::Tiresias, a.path())).expect("first run");
    run::trace(&args(Format::Tiresias, b.path())).expect("second run");
    for file in ["tiny.summary.csv", "tiny.las.jobs.csv", "tiny.fifo.jobs.csv", "tiny.jct-cdf.svg", "tiny.timeline.svg"] {
        assert_eq!(read(&a.path().join(file)), read(&b.path().join(file)), "{file} differs between two runs");
    }
    for policy in ["las", "fifo"] {
        let file = format!("tiny.{policy}.jobs.csv");
        let got = read(&a.path().join(&file));
        let want = read(&data().join("expected").join(&file));
        assert_eq!(got, want, "{file} moved; if on purpose, copy the new one into tests/data/expected/:\n{got}");
    }
}

#[test]
fn same_seed_same_bytes_for_the_synthetic_generator() {
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    run::trace(&args(Format::Synthetic, a.path())).expect("first run");
    run::trace(&args(Format::Synthetic, b.path())).expect("second run");
    for file in ["tiny.summary.csv", "tiny.las.jobs.csv", "tiny.fifo.jobs.csv"] {
        assert_eq!(read(&a.path().join(file)), read(&b.path().join(file)), "{file} differs between two runs");
    }
    // One summary row per seed and policy, plus one overall row per policy.
    assert_eq!(read(&a.path().join("tiny.summary.csv")).lines().count(), 1 + 2 * (3 + 1));
}
