//! `suanli-sim compare`: every policy on every trace of `simulations/README.md`, one table; and
//! `suanli-sim max-rate`: the highest job rate a cluster sustains under a policy (synthetic
//! jobs, or jobs drawn from one of the traces with its cluster: `--mix pollux-1.0`).
//!
//! The trace set and each trace's settings live in one place, [`settings`]; `compare --only
//! NAME` reruns one of them (the README's `trace` commands spell out the same settings).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use suanli_scheduling::{LasConfig, PolicyKind, ThroughputTable};

use crate::engine::{EngineConfig, Job, RunResult};
use crate::metrics;
use crate::rng::SplitMix64;
use crate::run::{self, Format, SimError, TraceArgs};
use crate::synthetic::{self, SyntheticConfig};

/// One trace of the comparison set and the settings it runs with.
#[derive(Clone, Debug)]
pub struct Setting {
    pub name: &'static str,
    pub format: Format,
    /// Relative to the traces directory (`../shared/traces`).
    pub inputs: &'static [&'static str],
    pub cluster: &'static str,
    pub round_s: u64,
    pub first_start_delay_s: u64,
    pub restart_delay_s: u64,
    /// LAS `(threshold GPU-seconds, minimum run seconds)`; the crate's defaults if `None`.
    pub las: Option<(&'static [u64], u64)>,
    pub profiles: Option<&'static str>,
    pub throughputs: Option<&'static str>,
    pub philly_clusters: &'static [&'static str],
    pub max_jobs: Option<usize>,
    /// Synthetic: `(jobs per seed, jobs per hour)`; seeded runs, one per `--seeds` value.
    pub synthetic: Option<(usize, f64)>,
}

impl Setting {
    pub const fn new(name: &'static str, format: Format, inputs: &'static [&'static str], cluster: &'static str) -> Self {
        Setting {
            name,
            format,
            inputs,
            cluster,
            round_s: 60,
            first_start_delay_s: 0,
            restart_delay_s: 30,
            las: None,
            profiles: None,
            throughputs: None,
            philly_clusters: &[],
            max_jobs: None,
            synthetic: None,
        }
    }

    /// The `trace` arguments of this setting.
    pub fn args(&self, traces: &Path, policies: &[PolicyKind], seeds: &[u64], out: &Path) -> TraceArgs {
        let default = LasConfig::default();
        let las = self.las.map_or(default, |(t, m)| LasConfig { thresholds_gpu_ms: t.iter().map(|s| s * 1000).collect(), min_run_ms: m * 1000 });
        let max_gpus = run::parse_cluster(self.cluster).map_or(u32::MAX, |g| g.iter().map(|g| g.nodes * g.cards_per_node).sum());
        let (jobs, jobs_per_hour) = self.synthetic.unwrap_or((0, 1.0));
        TraceArgs {
            format: self.format,
            inputs: self.inputs.iter().map(|i| traces.join(i)).collect(),
            policies: policies.to_vec(),
            cluster: self.cluster.into(),
            nodes: None,
            engine: EngineConfig {
                round_s: self.round_s,
                first_start_delay_s: self.first_start_delay_s,
                restart_delay_s: self.restart_delay_s,
                ..EngineConfig::default()
            },
            las,
            profiles: self.profiles.map(|p| traces.join(p)),
            throughputs: self.throughputs.map(|p| traces.join(p)),
            philly_clusters: self.philly_clusters.iter().map(|s| (*s).to_owned()).collect(),
            max_jobs: self.max_jobs,
            time_scale: 1.0,
            synthetic: SyntheticConfig { jobs, jobs_per_hour, max_gpus, max_duration_s: 7.0 * 86_400.0, seed: 0 },
            seeds: if self.synthetic.is_some() { seeds.to_vec() } else { vec![0] },
            compare: None,
            out: out.to_owned(),
            name: self.name.into(),
        }
    }
}

/// The README's trace set (`simulations/README.md`, "One command per result").
pub fn settings() -> Vec<Setting> {
    vec![
        Setting {
            first_start_delay_s: 30,
            las: Some((&[57_600], 0)),
            profiles: Some("sia/throughput_profiles"),
            ..Setting::new("pollux-1.0", Format::Pollux, &["pollux/workloads"], "16x4:v100")
        },
        Setting {
            round_s: 360,
            throughputs: Some("gavel/simulation_throughputs.json"),
            max_jobs: Some(300),
            ..Setting::new("gavel-ed69ec-300", Format::Gavel, &["gavel/msr/seed=0/ed69ec.trace"], "gavel")
        },
        Setting { philly_clusters: &["ed69ec"], ..Setting::new("philly-ed69ec", Format::Philly, &["sia/philly.csv"], "8x4:v100") },
        Setting::new("tiresias-60", Format::Tiresias, &["tiresias/60_job.csv"], "4x4:v100"),
        Setting { synthetic: Some((2000, 10.0)), ..Setting::new("synthetic", Format::Synthetic, &[], "8x8:v100") },
    ]
}

/// One row of the comparison: a trace and a policy, mean and sample std over its runs' seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub trace: String,
    pub policy: PolicyKind,
    /// Runs the statistics are over: the seeds of a seeded trace; 1 for a fixed trace (its
    /// workloads pooled as `trace` does).
    pub runs: usize,
    pub jobs: usize,
    /// `(mean, std)` of: avg JCT (pooled), p99 JCT, avg queueing, GPU utilisation, FTF mean.
    pub avg_jct: (f64, f64),
    pub p99_jct: (f64, f64),
    pub queueing: (f64, f64),
    pub utilisation: (f64, f64),
    pub ftf_mean: (f64, f64),
}

/// Runs every setting with every policy.
pub fn compare(settings: &[Setting], traces: &Path, policies: &[PolicyKind], seeds: &[u64]) -> Result<Vec<Row>, SimError> {
    let mut rows = Vec::new();
    for setting in settings {
        let args = setting.args(traces, policies, seeds, Path::new("."));
        for o in run::simulate(&args)? {
            let each: Vec<metrics::Summary> = if setting.synthetic.is_some() {
                o.runs.iter().map(|(_, jobs, result)| metrics::summarize(jobs, result)).collect()
            } else {
                vec![o.overall.clone()]
            };
            let stat = |f: &dyn Fn(&metrics::Summary) -> f64| metrics::mean_std(&each.iter().map(f).collect::<Vec<_>>());
            rows.push(Row {
                trace: setting.name.into(),
                policy: o.policy,
                runs: each.len(),
                jobs: o.overall.jobs,
                avg_jct: stat(&|s| s.avg_jct_pooled),
                p99_jct: stat(&|s| s.p99_jct),
                queueing: stat(&|s| s.avg_queueing),
                utilisation: stat(&|s| s.utilisation),
                ftf_mean: stat(&|s| s.ftf_mean),
            });
        }
    }
    Ok(rows)
}

pub const COMPARE_HEADER: &str = "trace,policy,runs,jobs,avg_jct_s,avg_jct_std_s,p99_jct_s,p99_jct_std_s,avg_queueing_s,avg_queueing_std_s,utilisation,utilisation_std,ftf_mean,ftf_mean_std\n";

pub fn rows_csv(rows: &[Row]) -> String {
    let mut out = String::from(COMPARE_HEADER);
    for r in rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{:.5},{:.5},{:.4},{:.4}",
            r.trace,
            r.policy,
            r.runs,
            r.jobs,
            r.avg_jct.0,
            r.avg_jct.1,
            r.p99_jct.0,
            r.p99_jct.1,
            r.queueing.0,
            r.queueing.1,
            r.utilisation.0,
            r.utilisation.1,
            r.ftf_mean.0,
            r.ftf_mean.1
        );
    }
    out
}

pub fn rows_markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| trace | policy | runs | jobs | avg JCT s | p99 JCT s | avg queueing s | GPU util | FTF mean |\n|---|---|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let pm = |(m, s): (f64, f64), d: usize, runs: usize| if runs > 1 { format!("{m:.d$} ± {s:.d$}") } else { format!("{m:.d$}") };
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.trace,
            r.policy,
            r.runs,
            r.jobs,
            pm(r.avg_jct, 0, r.runs),
            pm(r.p99_jct, 0, r.runs),
            pm(r.queueing, 0, r.runs),
            pm(r.utilisation, 3, r.runs),
            pm(r.ftf_mean, 2, r.runs)
        );
    }
    out
}

/// Writes `<out>/compare.csv` and returns the Markdown table.
pub fn compare_to(settings: &[Setting], traces: &Path, policies: &[PolicyKind], seeds: &[u64], out: &Path) -> Result<String, SimError> {
    let rows = compare(settings, traces, policies, seeds)?;
    std::fs::create_dir_all(out).map_err(|source| SimError::Write { file: out.display().to_string(), source })?;
    let file = out.join("compare.csv");
    std::fs::write(&file, rows_csv(&rows)).map_err(|source| SimError::Write { file: file.display().to_string(), source })?;
    Ok(rows_markdown(&rows))
}

/// What `max-rate` searches over.
#[derive(Clone, Debug)]
pub struct MaxRateArgs {
    pub cluster: String,
    pub policies: Vec<PolicyKind>,
    pub engine: EngineConfig,
    pub las: LasConfig,
    /// Synthetic jobs per run.
    pub jobs: usize,
    pub max_duration_s: f64,
    pub seeds: Vec<u64>,
    /// Draw the jobs from a trace's jobs instead of the synthetic mix.
    pub mix: Option<JobMix>,
    /// Sustained only if the average queueing delay stays below this.
    pub max_avg_queueing_s: f64,
    /// Bisection stops when the bracket is narrower than this fraction of its lower end.
    pub precision: f64,
    pub out: PathBuf,
}

/// A trace's jobs as a mix to draw from: sizes, types, accepted models and work as the trace
/// has them (a Gavel job's steps with the throughput table that turns them into time).
#[derive(Clone, Debug)]
pub struct JobMix {
    pub name: String,
    pub pool: Vec<Job>,
    pub table: ThroughputTable,
}

impl JobMix {
    /// Every job of every run of `setting`'s trace (files under `traces`), and the cluster,
    /// engine and LAS settings it runs with: `(mix, cluster, engine, las)`.
    pub fn of(setting: &Setting, traces: &Path) -> Result<(JobMix, String, EngineConfig, LasConfig), SimError> {
        let args = setting.args(traces, &[], &[1], Path::new("."));
        let cluster = run::parse_cluster(&args.cluster)?;
        let models: Vec<&str> = cluster.iter().map(|g| g.model.as_str()).collect();
        let (runs, table) = run::load(&args, &models)?;
        let pool: Vec<Job> = runs.into_iter().flat_map(|(_, jobs)| jobs).collect();
        if pool.is_empty() {
            return Err(SimError::Usage(format!("{}: no jobs to draw from", setting.name)));
        }
        Ok((JobMix { name: setting.name.to_owned(), pool, table }, args.cluster, args.engine, args.las))
    }

    /// `jobs` jobs drawn uniformly (with replacement) from the pool, arriving as a Poisson
    /// process at `jobs_per_hour`.
    pub fn draw(&self, jobs: usize, jobs_per_hour: f64, seed: u64) -> Vec<Job> {
        let mut rng = SplitMix64::new(seed ^ 0x6d69_785f_6d69_7800);
        let mut t = 0.0;
        (0..jobs)
            .map(|i| {
                t += rng.exponential(3600.0 / jobs_per_hour.max(1e-9));
                let picked = &self.pool[(rng.next_u64() % self.pool.len() as u64) as usize];
                Job { name: format!("{}-{i}", self.name), workload: format!("seed-{seed}"), submit_s: t.round(), ..picked.clone() }
            })
            .collect()
    }
}

/// One probed rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub jobs_per_hour: f64,
    /// Worst over the seeds.
    pub avg_queueing_s: f64,
    /// Jobs queued (mean over the rounds) in the first and the second half of the arrival
    /// period, worst seed (largest growth).
    pub queued_first_half: f64,
    pub queued_second_half: f64,
    /// Offered load, worst seed: the jobs' GPU-time alone (GPUs × isolated JCT) over cards ×
    /// the arrival period.
    pub offered_load: f64,
    pub sustained: bool,
}

/// Time-weighted mean of jobs queued over `[from_ms, to_ms)`, from the timeline (each sample
/// holds until the next; the engine samples every busy round and both ends of an idle stretch).
fn mean_queued(r: &RunResult, from_ms: i64, to_ms: i64) -> f64 {
    let (mut sum, mut span) = (0.0, 0.0);
    for (i, s) in r.timeline.iter().enumerate() {
        let end = r.timeline.get(i + 1).map_or(s.t_ms, |n| n.t_ms);
        let (a, b) = (s.t_ms.max(from_ms), end.min(to_ms));
        if b > a {
            sum += f64::from(s.queued) * (b - a) as f64;
            span += (b - a) as f64;
        }
    }
    if span > 0.0 {
        sum / span
    } else {
        0.0
    }
}

/// The definition of "sustained", shared by code, README and BENCHMARKS: at this rate, for
/// every seed, (1) the average queueing delay (first start − submission) is below
/// `max_avg_queueing_s`, and (2) the queue does not grow over the arrival period: the mean
/// number of queued jobs (time-weighted; preempted jobs count as queued) in its second half is
/// at most 1.5 × that of its first half plus an hour of arrivals (at least 2 jobs). A stable
/// queue fluctuates around a level (a burst behind a large gang is absorbed by the slack); an
/// overloaded one grows linearly, by (rate − capacity) × the half period. Both are needed: LAS
/// starts every newcomer at once (preempting), so its queueing delay stays small while
/// preempted jobs pile up; FIFO's queue can stay short while its delay grows. (3) The offered
/// load (GPUs × JCT alone, summed over the jobs, over cards × the arrival period) is below 1:
/// no policy sustains more than the cluster's capacity, but within a finite run LAS's backlog
/// above it is a few long, demoted jobs, which (2) counts as few.
pub fn probe(args: &MaxRateArgs, policy: PolicyKind, jobs_per_hour: f64) -> Result<Probe, SimError> {
    let cluster = run::parse_cluster(&args.cluster)?;
    let max_gpus = cluster.iter().map(|g| g.nodes * g.cards_per_node).sum();
    let table = args.mix.as_ref().map_or_else(ThroughputTable::new, |m| m.table.clone());
    let config = suanli_scheduling::PolicyConfig { las: args.las.clone(), throughput: table.clone(), ..suanli_scheduling::PolicyConfig::default() };
    let mut worst: Option<Probe> = None;
    for &seed in &args.seeds {
        let jobs = match &args.mix {
            Some(mix) => mix.draw(args.jobs, jobs_per_hour, seed),
            None => synthetic::generate(&SyntheticConfig { jobs: args.jobs, jobs_per_hour, max_gpus, max_duration_s: args.max_duration_s, seed }),
        };
        let mut p = suanli_scheduling::build(policy, &config);
        let result = crate::engine::run(p.as_mut(), &cluster, &jobs, &table, &args.engine)?;
        let s = metrics::summarize(&jobs, &result);
        let last_ms = jobs.last().map_or(0, |j| (j.submit_s * 1000.0) as i64);
        let (first, second) = (mean_queued(&result, 0, last_ms / 2), mean_queued(&result, last_ms / 2, last_ms));
        let cards: u32 = result.cards_by_model.values().sum();
        let demand_ms: f64 = result.records.iter().map(|r| f64::from(r.gpus) * r.isolated_ms as f64).sum();
        let offered_load = demand_ms / (f64::from(cards.max(1)) * last_ms.max(1) as f64);
        let sustained = s.avg_queueing < args.max_avg_queueing_s && second <= 1.5 * first + jobs_per_hour.max(2.0) && offered_load < 1.0;
        let this = Probe { jobs_per_hour, avg_queueing_s: s.avg_queueing, queued_first_half: first, queued_second_half: second, offered_load, sustained };
        worst = Some(match worst {
            None => this,
            Some(w) => {
                let grows = (this.queued_second_half - this.queued_first_half) > (w.queued_second_half - w.queued_first_half);
                let (f, sec) = if grows { (first, second) } else { (w.queued_first_half, w.queued_second_half) };
                Probe {
                    jobs_per_hour,
                    avg_queueing_s: w.avg_queueing_s.max(this.avg_queueing_s),
                    queued_first_half: f,
                    queued_second_half: sec,
                    offered_load: w.offered_load.max(this.offered_load),
                    sustained: w.sustained && sustained,
                }
            }
        });
    }
    worst.ok_or_else(|| SimError::Usage("max-rate needs at least one seed".into()))
}

/// Doubles the rate from 1 job/hour until it is not sustained, then bisects to `precision`.
/// Returns the highest sustained rate probed (0 if even 1 job/hour is not) and every probe.
pub fn max_rate(args: &MaxRateArgs, policy: PolicyKind) -> Result<(f64, Vec<Probe>), SimError> {
    let mut probes = Vec::new();
    let (mut lo, mut hi) = (0.0, 1.0);
    loop {
        let p = probe(args, policy, hi)?;
        let ok = p.sustained;
        probes.push(p);
        if !ok {
            break;
        }
        lo = hi;
        hi *= 2.0;
        if hi > 1e7 {
            return Err(SimError::Usage("max-rate: still sustained at 10⁷ jobs/hour".into()));
        }
    }
    while lo == 0.0 && hi > 1.0 / 64.0 || lo > 0.0 && hi - lo > args.precision * lo {
        let mid = if lo == 0.0 { hi / 2.0 } else { (lo + hi) / 2.0 };
        let p = probe(args, policy, mid)?;
        if p.sustained {
            lo = mid;
        } else {
            hi = mid;
        }
        probes.push(p);
        if lo == 0.0 && hi <= 1.0 / 64.0 {
            break;
        }
    }
    Ok((lo, probes))
}

/// Every policy; writes `<out>/max-rate.csv` (every probe) and returns a Markdown table.
pub fn max_rate_to(args: &MaxRateArgs) -> Result<String, SimError> {
    let mut csv = String::from("policy,jobs_per_hour,avg_queueing_s,queued_first_half,queued_second_half,offered_load,sustained\n");
    let mut md = String::from("| policy | highest sustained jobs/hour | first rate not sustained | probes |\n|---|--:|--:|--:|\n");
    for &policy in &args.policies {
        let (rate, probes) = max_rate(args, policy)?;
        for p in &probes {
            let _ = writeln!(
                csv,
                "{policy},{:.4},{:.1},{:.2},{:.2},{:.3},{}",
                p.jobs_per_hour, p.avg_queueing_s, p.queued_first_half, p.queued_second_half, p.offered_load, p.sustained
            );
        }
        let fail = probes.iter().filter(|p| !p.sustained).map(|p| p.jobs_per_hour).fold(f64::INFINITY, f64::min);
        let _ = writeln!(md, "| {policy} | {rate:.2} | {fail:.2} | {} |", probes.len());
    }
    std::fs::create_dir_all(&args.out).map_err(|source| SimError::Write { file: args.out.display().to_string(), source })?;
    let file = args.out.join("max-rate.csv");
    std::fs::write(&file, csv).map_err(|source| SimError::Write { file: file.display().to_string(), source })?;
    Ok(md)
}
