//! Fidelity against the Pollux artifact's published Tiresias results (issue 25): its
//! workloads on 16 nodes × 4 GPUs, 60 s rounds, 30 s delay on every allocation, two LAS queues
//! split at the artifact's 16 GPU-hours, preemption at any round. Needs the shared checkout's
//! `traces/pollux` and `traces/sia` (see `../shared/traces/README.md`).
//!
//! The bounds pin what BENCHMARKS.md reports ("Trace simulations"): at load 0.5, where jobs
//! barely queue, the duration model alone decides the JCT, and per-job JCTs land within a
//! few percent of the published ones; at load 1.0 the average lands within the 15 %.

use std::path::{Path, PathBuf};

use suanli_scheduling::{LasConfig, PolicyKind};
use suanli_sim::engine::EngineConfig;
use suanli_sim::metrics::percentile;
use suanli_sim::run::{self, Format, TraceArgs};
use suanli_sim::synthetic::SyntheticConfig;

fn traces() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces");
    assert!(dir.join("pollux").is_dir(), "trace data not found at {} (the shared checkout's traces/, see its README)", dir.display());
    dir
}

/// Ours and published mean of per-workload means, and per-job ratios ours / published.
fn compare(load: &str) -> (f64, f64, Vec<f64>) {
    let t = traces();
    let dir = if load == "1.0" { "workloads".to_owned() } else { format!("workloads-{load}") };
    let args = TraceArgs {
        format: Format::Pollux,
        inputs: vec![t.join("pollux").join(dir)],
        policies: vec![PolicyKind::Las],
        cluster: "16x4:v100".into(),
        nodes: None,
        engine: EngineConfig { round_s: 60, first_start_delay_s: 30, restart_delay_s: 30, ..EngineConfig::default() },
        las: LasConfig { thresholds_gpu_ms: vec![16 * 3_600_000], min_run_ms: 0 },
        profiles: Some(t.join("sia/throughput_profiles")),
        throughputs: None,
        philly_clusters: vec![],
        max_jobs: None,
        time_scale: 1.0,
        synthetic: SyntheticConfig { jobs: 0, jobs_per_hour: 1.0, max_gpus: 64, max_duration_s: 1.0, seed: 0 },
        seeds: vec![],
        compare: None,
        out: PathBuf::new(),
        name: String::new(),
    };
    let published = run::published(&t.join(format!("pollux/results-jobload/tiresias-{load}.summary.json"))).expect("published summary");
    let outcome = run::simulate(&args).expect("simulates").remove(0);
    let (mut ours_means, mut theirs_means, mut ratios) = (vec![], vec![], vec![]);
    for (name, jobs, result) in &outcome.runs {
        let theirs = &published[name];
        let (mut o, mut p) = (0.0, 0.0);
        for (job, r) in jobs.iter().zip(&result.records) {
            let jct = (r.end_ms - r.submit_ms) as f64 / 1000.0;
            o += jct;
            p += theirs[&job.name];
            ratios.push(jct / theirs[&job.name]);
        }
        ours_means.push(o / jobs.len() as f64);
        theirs_means.push(p / jobs.len() as f64);
    }
    ratios.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    (mean(&ours_means), mean(&theirs_means), ratios)
}

#[test]
fn low_load_per_job_jcts_match_the_published_ones() {
    let (ours, theirs, ratios) = compare("0.5");
    assert_eq!(ratios.len(), 8 * 80);
    println!("load 0.5: ours {ours:.0} s, published {theirs:.0} s");
    assert!((ours / theirs - 1.0).abs() < 0.05, "ours {ours:.0} s, published {theirs:.0} s");
    let (p10, p90) = (percentile(&ratios, 10.0), percentile(&ratios, 90.0));
    assert!(p10 > 0.95 && p90 < 1.05, "per-job ratio p10 {p10:.3}, p90 {p90:.3}");
}

#[test]
fn load_one_average_jct_is_within_15_percent_of_the_published_4038_s() {
    let (ours, theirs, ratios) = compare("1.0");
    assert_eq!(ratios.len(), 8 * 160);
    assert!((theirs - 4038.18).abs() < 0.01, "{theirs}");
    println!("load 1.0: ours {ours:.0} s, published {theirs:.0} s ({:+.1} %)", (ours / theirs - 1.0) * 100.0);
    assert!((ours / theirs - 1.0).abs() < 0.15, "ours {ours:.0} s, published {theirs:.0} s");
}
