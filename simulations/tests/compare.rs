//! `suanli-sim compare` and `max-rate` on a tiny subset: the table's shape, and determinism.

use std::path::{Path, PathBuf};

use suanli_scheduling::{LasConfig, PolicyKind};
use suanli_sim::compare::{self, MaxRateArgs, Setting};
use suanli_sim::engine::EngineConfig;
use suanli_sim::run::Format;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn subset() -> Vec<Setting> {
    vec![
        Setting { las: Some((&[600], 0)), ..Setting::new("tiny", Format::Tiresias, &["tiny.csv"], "2x4:v100") },
        Setting { synthetic: Some((200, 6.0)), ..Setting::new("synthetic-200", Format::Synthetic, &[], "2x4:v100") },
    ]
}

#[test]
fn compare_table_shape_and_determinism() {
    let policies = [PolicyKind::Fifo, PolicyKind::Las];
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let md = compare::compare_to(&subset(), &data(), &policies, &[1, 2, 3], a.path()).expect("compare");
    let md2 = compare::compare_to(&subset(), &data(), &policies, &[1, 2, 3], b.path()).expect("compare again");
    assert_eq!(md, md2);
    let csv = std::fs::read_to_string(a.path().join("compare.csv")).expect("csv");
    assert_eq!(csv, std::fs::read_to_string(b.path().join("compare.csv")).expect("csv"), "compare.csv differs between two runs");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], compare::COMPARE_HEADER.trim_end());
    assert_eq!(lines.len(), 1 + 2 * 2, "{csv}");
    let cols = lines[0].split(',').count();
    assert!(lines.iter().all(|l| l.split(',').count() == cols));
    // Markdown: header, rule, one row per trace and policy.
    assert_eq!(md.lines().count(), 2 + 4, "{md}");

    let rows = compare::compare(&subset(), &data(), &policies, &[1, 2, 3]).expect("rows");
    let names: Vec<(&str, PolicyKind, usize, usize)> = rows.iter().map(|r| (r.trace.as_str(), r.policy, r.runs, r.jobs)).collect();
    assert_eq!(
        names,
        [
            ("tiny", PolicyKind::Fifo, 1, 10),
            ("tiny", PolicyKind::Las, 1, 10),
            ("synthetic-200", PolicyKind::Fifo, 3, 600),
            ("synthetic-200", PolicyKind::Las, 3, 600)
        ]
    );
    for r in &rows {
        assert!(r.avg_jct.0 > 0.0 && r.p99_jct.0 >= r.avg_jct.0 && r.utilisation.0 > 0.0 && r.utilisation.0 <= 1.0 && r.ftf_mean.0 >= 1.0, "{r:?}");
        if r.runs == 1 {
            assert_eq!(r.avg_jct.1, 0.0, "a fixed trace has no spread");
        } else {
            assert!(r.avg_jct.1 > 0.0, "three seeds differ");
        }
    }
    // The tiny trace's FIFO average is the pinned per-job results' (tests/data/expected).
    let expected = std::fs::read_to_string(data().join("expected/tiny.fifo.jobs.csv")).expect("expected");
    let jct: Vec<f64> = expected.lines().skip(1).map(|l| l.split(',').nth(6).expect("jct").parse().expect("number")).collect();
    assert!((rows[0].avg_jct.0 - jct.iter().sum::<f64>() / jct.len() as f64).abs() < 1e-6);
}

#[test]
fn readme_settings_are_the_published_set() {
    let names: Vec<&str> = compare::settings().iter().map(|s| s.name).collect();
    assert_eq!(names, ["pollux-1.0", "gavel-ed69ec-300", "philly-ed69ec", "tiresias-60", "synthetic"]);
}

#[test]
fn max_rate_on_a_small_cluster() {
    let args = |out: &Path| MaxRateArgs {
        cluster: "2x4:v100".into(),
        policies: vec![PolicyKind::Fifo, PolicyKind::Las],
        engine: EngineConfig::default(),
        las: LasConfig::default(),
        jobs: 200,
        max_duration_s: 4.0 * 3600.0,
        seeds: vec![1, 2],
        mix: None,
        max_avg_queueing_s: 3600.0,
        precision: 0.05,
        out: out.to_owned(),
    };
    let (a, b) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let md = compare::max_rate_to(&args(a.path())).expect("max-rate");
    assert_eq!(md, compare::max_rate_to(&args(b.path())).expect("again"));
    assert_eq!(std::fs::read_to_string(a.path().join("max-rate.csv")).expect("csv"), std::fs::read_to_string(b.path().join("max-rate.csv")).expect("csv"));
    for policy in [PolicyKind::Fifo, PolicyKind::Las] {
        let (rate, probes) = compare::max_rate(&args(a.path()), policy).expect("search");
        assert!(rate > 0.5, "{policy}: {rate}");
        // The answer was probed and sustained; some rate at most 5 % above it was not.
        assert!(probes.iter().any(|p| p.jobs_per_hour == rate && p.sustained));
        assert!(probes.iter().any(|p| !p.sustained && p.jobs_per_hour > rate && p.jobs_per_hour <= rate * 1.05 + 1e-9), "{probes:?}");
        // Far above capacity it is not sustained; at a tenth of it, it is.
        assert!(!compare::probe(&args(a.path()), policy, rate * 4.0).expect("probe").sustained);
        assert!(compare::probe(&args(a.path()), policy, rate / 10.0).expect("probe").sustained);
    }
}

#[test]
fn max_rate_draws_from_a_traces_job_mix() {
    // The tiny trace's 10 jobs (gangs of 1 to 8 on 2 × 4 GPUs) as the mix.
    let tiny = Setting { las: Some((&[600], 0)), ..Setting::new("tiny", Format::Tiresias, &["tiny.csv"], "2x4:v100") };
    let (mix, cluster, engine, las) = compare::JobMix::of(&tiny, &data()).expect("the mix");
    assert_eq!((mix.pool.len(), cluster.as_str(), engine.round_s), (10, "2x4:v100", 60));
    let drawn = mix.draw(500, 10.0, 3);
    assert_eq!(drawn, mix.draw(500, 10.0, 3), "same seed, same jobs");
    assert_ne!(drawn, mix.draw(500, 10.0, 4));
    // Every drawn job is one of the pool's, at a new time.
    for job in &drawn {
        assert!(mix.pool.iter().any(|p| p.gpus == job.gpus && p.work == job.work && p.type_key == job.type_key), "{job:?}");
    }
    let hours = drawn.last().map_or(0.0, |j| j.submit_s) / 3600.0;
    assert!((hours - 50.0).abs() < 8.0, "{hours}");
    let out = tempfile::tempdir().expect("tempdir");
    let args = MaxRateArgs {
        cluster,
        policies: vec![PolicyKind::Las],
        engine,
        las,
        jobs: 200,
        max_duration_s: 0.0,
        seeds: vec![1],
        mix: Some(mix),
        max_avg_queueing_s: 3600.0,
        precision: 0.05,
        out: out.path().to_owned(),
    };
    let (rate, probes) = compare::max_rate(&args, PolicyKind::Las).expect("search");
    assert!(rate > 0.0 && probes.iter().any(|p| !p.sustained), "{probes:?}");
    // The offered load at the answer is what the mix's work says: below 1, and near it for LAS.
    let at = probes.iter().find(|p| p.jobs_per_hour == rate).expect("the answer was probed");
    assert!(at.offered_load < 1.0, "{at:?}");
}
