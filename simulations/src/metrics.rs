//! The scheduling literature's metrics, with its definitions, and the CSVs a person can
//! recompute them from.
//!
//! * **JCT** (job completion time) = completion − submission, queueing included.
//! * **Average JCT**, two ways: *pooled* (over every job of every workload) and *mean of
//!   per-workload means* (what Pollux and Sia report over their 8 workloads).
//! * **Percentiles** by the nearest-rank method: the p-th percentile of n sorted values is
//!   the ⌈p/100 · n⌉-th smallest.
//! * **Makespan** = last completion − first submission.
//! * **Queueing delay** = first start − submission.
//! * **GPU utilisation** = card-time held by jobs (start delays included) / (cards ×
//!   makespan), overall and by card model.
//! * **Finish-time fairness** (Themis, NSDI '20): ρ = JCT with the cluster shared /
//!   JCT alone, where "alone" is the job's first start delay plus its work on its gang of the
//!   fastest model it accepts, with no queueing, no wait for a round and no restarts
//!   (`JobRecord::isolated_ms`; floored at 1 ms). ρ ≤ 1 is fair; reported per job and as
//!   mean, max (Themis' objective) and the fraction of jobs with ρ > 1.5.
//! * **Decision time** = wall-clock time of one `decide` call, per round (mean, p99, max);
//!   the only measured, hence non-deterministic, output: printed and written to
//!   `timing.csv`, never to `summary.csv`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::engine::{Job, JobRecord, RunResult};

/// The nearest-rank percentile of `sorted` (ascending); 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// One run's summary; seconds unless named otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub policy: String,
    pub jobs: usize,
    pub workloads: usize,
    pub avg_jct_pooled: f64,
    pub avg_jct_workload_means: f64,
    pub p50_jct: f64,
    pub p95_jct: f64,
    pub p99_jct: f64,
    pub makespan: f64,
    pub avg_queueing: f64,
    pub p95_queueing: f64,
    pub utilisation: f64,
    pub utilisation_by_model: BTreeMap<String, f64>,
    pub restarts: u64,
    pub rounds: u64,
    pub placements: u64,
    pub preemptions: u64,
    pub ftf_mean: f64,
    pub ftf_max: f64,
    /// Fraction of jobs with ρ > 1.5.
    pub ftf_over_1_5: f64,
}

/// A job's finish-time fairness ρ = JCT / isolated JCT.
pub fn ftf(r: &JobRecord) -> f64 {
    (r.end_ms - r.submit_ms) as f64 / r.isolated_ms.max(1) as f64
}

pub fn summarize(jobs: &[Job], run: &RunResult) -> Summary {
    let ms = |v: i64| v as f64 / 1000.0;
    let mut jct: Vec<f64> = run.records.iter().map(|r| ms(r.end_ms - r.submit_ms)).collect();
    let mut by_workload: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for (job, &j) in jobs.iter().zip(&jct) {
        by_workload.entry(job.workload.as_str()).or_default().push(j);
    }
    let workload_means: Vec<f64> = by_workload.values().map(|v| mean(v)).collect();
    let avg_jct_pooled = mean(&jct);
    jct.sort_by(f64::total_cmp);
    let mut queueing: Vec<f64> = run.records.iter().map(|r| ms(r.first_start_ms - r.submit_ms)).collect();
    let avg_queueing = mean(&queueing);
    queueing.sort_by(f64::total_cmp);
    let first = run.records.iter().map(|r| r.submit_ms).min().unwrap_or(0);
    let last = run.records.iter().map(|r| r.end_ms).max().unwrap_or(0);
    let makespan = ms(last - first);
    let total_cards: u32 = run.cards_by_model.values().sum();
    let span_ms = (last - first).max(1) as f64;
    let busy: u64 = run.records.iter().map(|r| r.gpu_ms).sum();
    let mut busy_by_model: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &run.records {
        // A job's card-time is split evenly over the models it ran on (exact on a
        // homogeneous cluster; an approximation for jobs moved between models).
        let n = r.models.len().max(1) as f64;
        for m in &r.models {
            *busy_by_model.entry(m.as_str()).or_default() += r.gpu_ms as f64 / n;
        }
    }
    let rho: Vec<f64> = run.records.iter().map(ftf).collect();
    let utilisation_by_model =
        run.cards_by_model.iter().map(|(m, &c)| (m.clone(), busy_by_model.get(m.as_str()).copied().unwrap_or(0.0) / (f64::from(c.max(1)) * span_ms))).collect();
    Summary {
        policy: run.policy.to_owned(),
        jobs: jobs.len(),
        workloads: by_workload.len(),
        avg_jct_pooled,
        avg_jct_workload_means: mean(&workload_means),
        p50_jct: percentile(&jct, 50.0),
        p95_jct: percentile(&jct, 95.0),
        p99_jct: percentile(&jct, 99.0),
        makespan,
        avg_queueing,
        p95_queueing: percentile(&queueing, 95.0),
        utilisation: busy as f64 / (f64::from(total_cards.max(1)) * span_ms),
        utilisation_by_model,
        restarts: run.records.iter().map(|r| u64::from(r.restarts)).sum(),
        rounds: run.rounds,
        placements: run.placements,
        preemptions: run.preemptions,
        ftf_mean: mean(&rho),
        ftf_max: rho.iter().copied().fold(0.0, f64::max),
        ftf_over_1_5: if rho.is_empty() { 0.0 } else { rho.iter().filter(|&&r| r > 1.5).count() as f64 / rho.len() as f64 },
    }
}

pub const SUMMARY_HEADER: &str = "trace,policy,seed,jobs,workloads,avg_jct_pooled_s,avg_jct_workload_means_s,p50_jct_s,p95_jct_s,p99_jct_s,makespan_s,avg_queueing_s,p95_queueing_s,gpu_utilisation,gpu_utilisation_by_model,restarts,rounds,placements,preemptions,ftf_mean,ftf_max,ftf_over_1_5\n";

/// One `summary.csv` row (after [`SUMMARY_HEADER`]); deterministic.
pub fn summary_row(trace: &str, seed: &str, s: &Summary) -> String {
    let by_model: Vec<String> = s.utilisation_by_model.iter().map(|(m, u)| format!("{m}={u:.4}")).collect();
    format!(
        "{trace},{},{seed},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.4},{},{},{},{},{},{:.4},{:.4},{:.4}\n",
        s.policy,
        s.jobs,
        s.workloads,
        s.avg_jct_pooled,
        s.avg_jct_workload_means,
        s.p50_jct,
        s.p95_jct,
        s.p99_jct,
        s.makespan,
        s.avg_queueing,
        s.p95_queueing,
        s.utilisation,
        by_model.join(";"),
        s.restarts,
        s.rounds,
        s.placements,
        s.preemptions,
        s.ftf_mean,
        s.ftf_max,
        s.ftf_over_1_5
    )
}

/// The per-job CSV: one row per job in the workload's order; deterministic.
pub fn jobs_csv(jobs: &[Job], run: &RunResult) -> String {
    let mut out = String::from("name,workload,type,submit_s,first_start_s,end_s,jct_s,queueing_s,gpus,models,restarts,gpu_s,isolated_s,ftf\n");
    for (job, r) in jobs.iter().zip(&run.records) {
        let ms = |v: i64| v as f64 / 1000.0;
        let models: Vec<&str> = r.models.iter().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{:.3},{:.3},{:.4}",
            job.name,
            job.workload,
            job.type_key.replace(',', ";"),
            ms(r.submit_ms),
            ms(r.first_start_ms),
            ms(r.end_ms),
            ms(r.end_ms - r.submit_ms),
            ms(r.first_start_ms - r.submit_ms),
            r.gpus,
            models.join(";"),
            r.restarts,
            r.gpu_ms as f64 / 1000.0,
            ms(r.isolated_ms),
            ftf(r)
        );
    }
    out
}

/// Mean and sample standard deviation (n − 1); the deviation is 0 for fewer than 2 values.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let m = mean(values);
    if values.len() < 2 {
        return (m, 0.0);
    }
    let var = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (values.len() - 1) as f64;
    (m, var.sqrt())
}

/// Decision time per round: mean, p99 and max, in microseconds.
pub fn decision_times_us(run: &RunResult) -> (f64, f64, f64) {
    let mut us: Vec<f64> = run.decision_ns.iter().map(|&n| n as f64 / 1000.0).collect();
    let m = mean(&us);
    us.sort_by(f64::total_cmp);
    (m, percentile(&us, 99.0), us.last().copied().unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::engine::{JobRecord, Work};

    fn job(name: &str, workload: &str) -> Job {
        Job {
            name: name.into(),
            workload: workload.into(),
            submit_s: 0.0,
            gpus: 1,
            type_key: "t".into(),
            models: vec![],
            share_milli: None,
            work: Work::Seconds(1.0),
        }
    }

    fn record(submit: i64, start: i64, end: i64, gpus: u32) -> JobRecord {
        JobRecord {
            submit_ms: submit * 1000,
            first_start_ms: start * 1000,
            end_ms: end * 1000,
            gpus,
            models: BTreeSet::from(["v100".to_owned()]),
            restarts: 0,
            gpu_ms: (end - start) as u64 * 1000 * u64::from(gpus),
            isolated_ms: (end - start) * 1000,
        }
    }

    #[test]
    fn mean_and_sample_std() {
        assert_eq!(mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]), (5.0, (32.0_f64 / 7.0).sqrt()));
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 10.0);
        assert_eq!(percentile(&v, 95.0), 19.0);
        assert_eq!(percentile(&v, 99.0), 20.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    /// Three jobs on 2 cards, by hand: workload a has JCTs 10 and 30, workload b has 60.
    #[test]
    fn a_hand_computed_example() {
        let jobs = vec![job("j1", "a"), job("j2", "a"), job("j3", "b")];
        let run = RunResult {
            policy: "las",
            // j1: submit 0, runs 0..10 on 1 card. j2: submit 0, waits 10, runs 10..30 on 1.
            // j3: submit 20, waits 10, runs 30..80 on 2 cards.
            records: vec![record(0, 0, 10, 1), record(0, 10, 30, 1), record(20, 30, 80, 2)],
            rounds: 8,
            placements: 3,
            preemptions: 0,
            cards_by_model: BTreeMap::from([("v100".to_owned(), 2)]),
            decision_ns: vec![1000, 3000],
            timeline: vec![],
        };
        let s = summarize(&jobs, &run);
        // JCTs 10, 30, 60: pooled (10 + 30 + 60) / 3; per workload a = 20, b = 60 → 40.
        assert!((s.avg_jct_pooled - 100.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.avg_jct_workload_means, 40.0);
        assert_eq!((s.p50_jct, s.p95_jct, s.p99_jct), (30.0, 60.0, 60.0));
        assert_eq!(s.makespan, 80.0);
        // Queueing 0, 10, 10.
        assert!((s.avg_queueing - 20.0 / 3.0).abs() < 1e-9);
        // Busy 10 + 20 + 100 = 130 card-s of 2 cards × 80 s.
        assert!((s.utilisation - 130.0 / 160.0).abs() < 1e-9);
        assert!((s.utilisation_by_model["v100"] - 130.0 / 160.0).abs() < 1e-9);
        assert_eq!(decision_times_us(&run), (2.0, 3.0, 3.0));
        let csv = jobs_csv(&jobs, &run);
        assert_eq!(csv.lines().nth(3), Some("j3,b,t,20.000,30.000,80.000,60.000,10.000,2,v100,0,100.000,50.000,1.2000"));
        // Finish-time fairness: alone, each job runs exactly its service time (10, 20, 50 s);
        // ρ = 10/10, 30/20, 60/50 = 1, 1.5, 1.2: mean 3.7/3, max 1.5, none above 1.5.
        assert!((s.ftf_mean - 3.7 / 3.0).abs() < 1e-9);
        assert_eq!((s.ftf_max, s.ftf_over_1_5), (1.5, 0.0));
        let mut slow = run.clone();
        slow.records[1].end_ms = 40_000;
        let s = summarize(&jobs, &slow);
        // j2 now ρ = 40/20 = 2: 1 job of 3 above 1.5.
        assert_eq!((s.ftf_max, s.ftf_over_1_5), (2.0, 1.0 / 3.0));
    }
}
