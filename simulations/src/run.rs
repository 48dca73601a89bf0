//! `suanli-sim trace`: load a trace, run it through the real policies, write the CSVs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use suanli_scheduling::replay::{gavel_cluster, GpuGroup};
use suanli_scheduling::{build, LasConfig, PolicyConfig, PolicyKind, ThroughputTable};

use crate::engine::{self, EngineConfig, EngineError, Job, RunResult, Sample};
use crate::metrics::{self, Summary};
use crate::plot::{self, Panel, Series};
use crate::synthetic::{self, SyntheticConfig};
use crate::trace::{self, alibaba, gavel, philly, pollux, tiresias, TraceError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Pollux,
    Philly,
    Gavel,
    Tiresias,
    Alibaba,
    Synthetic,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "pollux" | "sia" => Format::Pollux,
            "philly" => Format::Philly,
            "gavel" => Format::Gavel,
            "tiresias" => Format::Tiresias,
            "alibaba" | "openb" => Format::Alibaba,
            "synthetic" => Format::Synthetic,
            _ => return Err(format!("unknown trace format {s:?} (pollux, philly, gavel, tiresias, alibaba, synthetic)")),
        })
    }
}

/// Everything `suanli-sim trace` is told.
#[derive(Clone, Debug)]
pub struct TraceArgs {
    pub format: Format,
    /// Trace files, or directories of them; each file is one independent run (a "workload").
    pub inputs: Vec<PathBuf>,
    pub policies: Vec<PolicyKind>,
    /// `NODESxGPUS:MODEL,…`, or `gavel` (12 K80 + 12 P100 + 12 V100 on 4-GPU nodes).
    pub cluster: String,
    /// An Alibaba openb node list: the cluster, instead of `cluster`.
    pub nodes: Option<PathBuf>,
    pub engine: EngineConfig,
    pub las: LasConfig,
    /// Pollux: `sia/throughput_profiles`.
    pub profiles: Option<PathBuf>,
    /// Gavel: `simulation_throughputs.json`.
    pub throughputs: Option<PathBuf>,
    /// Philly: virtual clusters to keep (all if empty).
    pub philly_clusters: Vec<String>,
    /// Only the first this many jobs of each input (by submission).
    pub max_jobs: Option<usize>,
    /// Multiplies submission times (below 1 raises the load).
    pub time_scale: f64,
    pub synthetic: SyntheticConfig,
    pub seeds: Vec<u64>,
    /// Pollux's published `summary.json` to compare with, job by job.
    pub compare: Option<PathBuf>,
    pub out: PathBuf,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Usage(String),
    #[error("writing {file}: {source}")]
    Write {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// Parses `16x4:v100,3x4:k80`.
pub fn parse_cluster(spec: &str) -> Result<Vec<GpuGroup>, SimError> {
    if spec == "gavel" {
        return Ok(gavel_cluster());
    }
    spec.split(',')
        .map(|g| {
            let bad = || SimError::Usage(format!("cluster group {g:?} is not NODESxGPUS:MODEL"));
            let (shape, model) = g.split_once(':').ok_or_else(bad)?;
            let (nodes, gpus) = shape.split_once('x').ok_or_else(bad)?;
            let (nodes, cards_per_node) = (nodes.parse::<u32>().map_err(|_| bad())?, gpus.parse::<u32>().map_err(|_| bad())?);
            if nodes == 0 || cards_per_node == 0 || model.is_empty() {
                return Err(bad());
            }
            Ok(GpuGroup { model: model.to_owned(), nodes, cards_per_node, vram_mib: 32_768 })
        })
        .collect()
}

/// The files of `inputs`: files as given, directories' `.csv`/`.trace` files sorted by name.
fn files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, SimError> {
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let entries = std::fs::read_dir(input).map_err(|source| TraceError::Io { file: input.display().to_string(), source })?;
            let mut found: Vec<PathBuf> =
                entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "csv" || e == "trace")).collect();
            // workload-2 before workload-10.
            found.sort_by_key(|p| {
                let s = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                let digits: String = s.chars().rev().take_while(char::is_ascii_digit).collect::<Vec<_>>().into_iter().rev().collect();
                (s[..s.len() - digits.len()].to_owned(), digits.parse::<u64>().unwrap_or(0), s)
            });
            out.extend(found);
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

fn stem(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The independent runs of a trace: `(workload name, jobs)`.
pub type Runs = Vec<(String, Vec<Job>)>;

/// The independent runs of a trace, and the throughput table.
pub fn load(args: &TraceArgs, models: &[&str]) -> Result<(Runs, ThroughputTable), SimError> {
    let mut table = ThroughputTable::new();
    let mut runs = Vec::new();
    if args.format == Format::Synthetic {
        for &seed in &args.seeds {
            let jobs = synthetic::generate(&SyntheticConfig { seed, ..args.synthetic.clone() });
            runs.push((format!("seed-{seed}"), jobs));
        }
        return Ok((runs, table));
    }
    let paths = files(&args.inputs)?;
    if paths.is_empty() {
        return Err(SimError::Usage("no trace files given (--input)".into()));
    }
    if args.format == Format::Gavel {
        let path = args.throughputs.as_ref().ok_or_else(|| SimError::Usage("gavel traces need --throughputs simulation_throughputs.json".into()))?;
        table = gavel::parse_throughputs(&path.display().to_string(), &trace::read(path)?, models)?;
    }
    let mut apps = BTreeMap::new();
    for path in paths {
        let file = path.display().to_string();
        let text = trace::read(&path)?;
        let name = stem(&path);
        let jobs = match args.format {
            Format::Pollux => {
                let rows = pollux::parse_workload(&file, &text)?;
                let profiles = args.profiles.as_ref().ok_or_else(|| SimError::Usage("pollux workloads need --profiles sia/throughput_profiles".into()))?;
                for (k, v) in pollux::applications(profiles, &rows)? {
                    apps.entry(k).or_insert(v);
                }
                pollux::jobs(&file, &name, &rows, &apps)?
            }
            Format::Philly => philly::parse(&file, &text, &args.philly_clusters)?,
            Format::Tiresias => tiresias::parse(&file, &text, &name)?,
            Format::Alibaba => {
                let (jobs, cpu_only) = alibaba::parse_pods(&file, &text, &name)?;
                if cpu_only > 0 {
                    eprintln!("{file}: {cpu_only} CPU-only pods left out");
                }
                jobs
            }
            Format::Gavel => {
                let (jobs, skipped) = gavel::parse(&file, &text, &name, &table, models)?;
                if skipped > 0 {
                    eprintln!("{file}: {skipped} jobs left out (no throughput on this cluster's models)");
                }
                jobs
            }
            Format::Synthetic => unreachable!("handled above"),
        };
        runs.push((name, jobs));
    }
    for (_, jobs) in &mut runs {
        if let Some(n) = args.max_jobs {
            jobs.truncate(n);
        }
        for j in jobs.iter_mut() {
            j.submit_s *= args.time_scale;
        }
    }
    Ok((runs, table))
}

/// One policy over every run of the trace.
pub struct PolicyOutcome {
    pub policy: PolicyKind,
    /// Per run: its name, jobs and result.
    pub runs: Vec<(String, Vec<Job>, RunResult)>,
    pub overall: Summary,
}

/// Merges the runs: JCT and queueing over every job (and per-workload means over the runs),
/// makespan and utilisation as the mean of the runs' (they are separate experiments).
fn overall(runs: &[(String, Vec<Job>, RunResult)]) -> Summary {
    let jobs: Vec<Job> = runs.iter().flat_map(|(_, j, _)| j.iter().cloned()).collect();
    let first = &runs[0].2;
    let merged = RunResult {
        policy: first.policy,
        records: runs.iter().flat_map(|(_, _, r)| r.records.iter().cloned()).collect(),
        rounds: runs.iter().map(|r| r.2.rounds).sum(),
        placements: runs.iter().map(|r| r.2.placements).sum(),
        preemptions: runs.iter().map(|r| r.2.preemptions).sum(),
        cards_by_model: first.cards_by_model.clone(),
        decision_ns: vec![],
        timeline: vec![],
    };
    let mut s = metrics::summarize(&jobs, &merged);
    let each: Vec<Summary> = runs.iter().map(|(_, j, r)| metrics::summarize(j, r)).collect();
    let n = each.len() as f64;
    s.makespan = each.iter().map(|e| e.makespan).sum::<f64>() / n;
    s.utilisation = each.iter().map(|e| e.utilisation).sum::<f64>() / n;
    for (m, u) in &mut s.utilisation_by_model {
        *u = each.iter().map(|e| e.utilisation_by_model.get(m).copied().unwrap_or(0.0)).sum::<f64>() / n;
    }
    s
}

pub fn simulate(args: &TraceArgs) -> Result<Vec<PolicyOutcome>, SimError> {
    let cluster = match &args.nodes {
        Some(path) => alibaba::parse_nodes(&path.display().to_string(), &trace::read(path)?)?,
        None => parse_cluster(&args.cluster)?,
    };
    let models: Vec<&str> = cluster.iter().map(|g| g.model.as_str()).collect();
    let (runs, table) = load(args, &models)?;
    if runs.is_empty() {
        return Err(SimError::Usage("nothing to simulate".into()));
    }
    let config = PolicyConfig { las: args.las.clone(), throughput: table.clone(), ..PolicyConfig::default() };
    let mut outcomes = Vec::new();
    for &kind in &args.policies {
        let mut done = Vec::new();
        for (name, jobs) in &runs {
            let mut policy = build(kind, &config);
            let result = engine::run(policy.as_mut(), &cluster, jobs, &table, &args.engine)?;
            done.push((name.clone(), jobs.clone(), result));
        }
        let overall = overall(&done);
        outcomes.push(PolicyOutcome { policy: kind, runs: done, overall });
    }
    Ok(outcomes)
}

fn write(path: &Path, text: &str) -> Result<(), SimError> {
    write_bytes(path, text.as_bytes())
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), SimError> {
    std::fs::write(path, bytes).map_err(|source| SimError::Write { file: path.display().to_string(), source })
}

/// Published per-job JCTs of a Pollux `summary.json`: workload → job → seconds.
pub fn published(path: &Path) -> Result<BTreeMap<String, BTreeMap<String, f64>>, SimError> {
    let file = path.display().to_string();
    let value: serde_json::Value =
        serde_json::from_str(&trace::read(path)?).map_err(|e| TraceError::Line { file: file.clone(), line: e.line(), reason: e.to_string() })?;
    let jcts = value.get("jcts").and_then(|j| j.as_object()).ok_or_else(|| TraceError::File { file: file.clone(), reason: "no \"jcts\" object".into() })?;
    let mut out = BTreeMap::new();
    for (workload, jobs) in jcts {
        let jobs = jobs.as_object().ok_or_else(|| TraceError::File { file: file.clone(), reason: format!("jcts.{workload} is not an object") })?;
        let mut m = BTreeMap::new();
        for (job, v) in jobs {
            let v = v.as_f64().ok_or_else(|| TraceError::File { file: file.clone(), reason: format!("jcts.{workload}.{job} is not a number") })?;
            m.insert(job.clone(), v);
        }
        out.insert(workload.clone(), m);
    }
    Ok(out)
}

/// Runs, writes `<out>/<name>.summary.csv`, `<name>.<policy>.jobs.csv`,
/// `<name>.timing.csv`, `<name>.jct-cdf.svg`, `<name>.timeline.svg` (and
/// `<name>.<policy>.compare.csv`), and returns a report to print.
pub fn trace(args: &TraceArgs) -> Result<String, SimError> {
    let outcomes = simulate(args)?;
    std::fs::create_dir_all(&args.out).map_err(|source| SimError::Write { file: args.out.display().to_string(), source })?;
    let mut summary = String::from(metrics::SUMMARY_HEADER);
    let mut timing = String::from("policy,workload,rounds,decided_rounds,decision_mean_us,decision_p99_us,decision_max_us\n");
    let mut report = String::new();
    let _ = writeln!(report, "| policy | jobs | avg JCT (pooled) s | avg JCT (mean of workload means) s | p50 | p95 | p99 | avg queueing s | makespan s | GPU util | restarts | decision mean / p99 µs |");
    let _ = writeln!(report, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    let published = args.compare.as_deref().map(published).transpose()?;
    // Printed after the table.
    let mut notes = String::new();
    for o in &outcomes {
        let seed = |name: &str| name.strip_prefix("seed-").unwrap_or("-").to_owned();
        let mut jobs_csv = String::new();
        let mut all_ns = Vec::new();
        for (i, (name, jobs, result)) in o.runs.iter().enumerate() {
            let s = metrics::summarize(jobs, result);
            summary += &metrics::summary_row(&format!("{}/{name}", args.name), &seed(name), &s);
            let (mean, p99, max) = metrics::decision_times_us(result);
            let _ = writeln!(timing, "{},{name},{},{},{mean:.1},{p99:.1},{max:.1}", o.policy, result.rounds, result.decision_ns.len());
            let csv = metrics::jobs_csv(jobs, result);
            jobs_csv += if i == 0 { &csv } else { csv.split_once('\n').map_or("", |(_, rows)| rows) };
            all_ns.extend_from_slice(&result.decision_ns);
        }
        summary += &metrics::summary_row(&format!("{}/all", args.name), "-", &o.overall);
        write(&args.out.join(format!("{}.{}.jobs.csv", args.name, o.policy)), &jobs_csv)?;
        let (mean, p99, _) = metrics::decision_times_us(&RunResult {
            policy: "",
            records: vec![],
            rounds: 0,
            placements: 0,
            preemptions: 0,
            cards_by_model: BTreeMap::new(),
            decision_ns: all_ns,
            timeline: vec![],
        });
        let s = &o.overall;
        let _ = writeln!(
            report,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {} | {mean:.0} / {p99:.0} |",
            o.policy,
            s.jobs,
            s.avg_jct_pooled,
            s.avg_jct_workload_means,
            s.p50_jct,
            s.p95_jct,
            s.p99_jct,
            s.avg_queueing,
            s.makespan,
            s.utilisation,
            s.restarts
        );
        if o.runs.len() > 1 {
            let avgs: Vec<f64> = o.runs.iter().map(|(_, jobs, result)| metrics::summarize(jobs, result).avg_jct_pooled).collect();
            let (mean, std) = metrics::mean_std(&avgs);
            let _ = writeln!(notes, "{}: avg JCT over {} runs {mean:.0} ± {std:.0} s (mean ± sample std of the runs' pooled averages)", o.policy, avgs.len());
        }
        if let Some(published) = &published {
            notes += &compare(args, o, published)?;
        }
    }
    if !notes.is_empty() {
        report += "\n";
        report += &notes;
    }
    write(&args.out.join(format!("{}.summary.csv", args.name)), &summary)?;
    write(&args.out.join(format!("{}.timing.csv", args.name)), &timing)?;
    let plots = plots(&args.name, &outcomes);
    write(&args.out.join(format!("{}.jct-cdf.svg", args.name)), &plots.cdf_svg)?;
    write(&args.out.join(format!("{}.timeline.svg", args.name)), &plots.timeline_svg)?;
    write_bytes(&args.out.join(format!("{}.jct-cdf.png", args.name)), &plots.cdf_png)?;
    write_bytes(&args.out.join(format!("{}.timeline.png", args.name)), &plots.timeline_png)?;
    Ok(report)
}

/// Points per line in the plots.
const PLOT_POINTS: usize = 600;

/// A trace run's pictures, each as SVG and PNG.
pub struct Plots {
    pub cdf_svg: String,
    pub cdf_png: Vec<u8>,
    pub timeline_svg: String,
    pub timeline_png: Vec<u8>,
}

/// `<name>.jct-cdf.*` (every job of every run, per policy, log x) and `<name>.timeline.*`
/// (GPU utilisation and queue length over time, per policy, of the first run: the runs of a
/// trace are separate experiments); deterministic.
pub fn plots(name: &str, outcomes: &[PolicyOutcome]) -> Plots {
    let cdf: Vec<Series> = outcomes
        .iter()
        .map(|o| {
            let jct: Vec<f64> = o.runs.iter().flat_map(|(_, _, r)| r.records.iter()).map(|r| ((r.end_ms - r.submit_ms) as f64 / 1000.0).max(1.0)).collect();
            Series { label: format!("{} (avg {:.0} s)", o.policy, o.overall.avg_jct_pooled), points: plot::cdf(&jct, PLOT_POINTS) }
        })
        .collect();
    let title = format!("{name}: JCT CDF ({} jobs per policy)", outcomes.first().map_or(0, |o| o.overall.jobs));
    let cdf_panel = [Panel { title: &title, x_label: "JCT, s (log scale)", y_label: "fraction of jobs", x_log: true, y_range: Some((0.0, 1.0)), series: &cdf }];
    let first = outcomes.first().and_then(|o| o.runs.first());
    let run_name = first.map_or("", |r| r.0.as_str());
    let cards = first.map_or(1, |r| r.2.cards_by_model.values().sum::<u32>().max(1));
    let series = |f: &dyn Fn(&Sample) -> f64| -> Vec<Series> {
        outcomes
            .iter()
            .filter_map(|o| o.runs.first().map(|r| (o.policy, &r.2)))
            .map(|(policy, r)| {
                let points: Vec<(f64, f64)> = r.timeline.iter().map(|s| (s.t_ms as f64 / 3_600_000.0, f(s))).collect();
                Series { label: policy.to_string(), points: plot::downsample(&points, PLOT_POINTS) }
            })
            .collect()
    };
    let utilisation = series(&|s| s.busy_cards / f64::from(cards));
    let queue = series(&|s| f64::from(s.queued));
    let (t1, t2) = (format!("{name} ({run_name}): GPU utilisation, {cards} cards"), format!("{name} ({run_name}): jobs queued"));
    let timeline = [
        Panel {
            title: &t1,
            x_label: "hours since the trace's start",
            y_label: "cards held / cards",
            x_log: false,
            y_range: Some((0.0, 1.0)),
            series: &utilisation,
        },
        Panel { title: &t2, x_label: "hours since the trace's start", y_label: "jobs waiting", x_log: false, y_range: None, series: &queue },
    ];
    Plots { cdf_svg: plot::svg(&cdf_panel), cdf_png: plot::png(&cdf_panel), timeline_svg: plot::svg(&timeline), timeline_png: plot::png(&timeline) }
}

/// Ours against the published JCTs, job by job; writes `<name>.<policy>.compare.csv`.
fn compare(args: &TraceArgs, o: &PolicyOutcome, published: &BTreeMap<String, BTreeMap<String, f64>>) -> Result<String, SimError> {
    let mut csv = String::from("workload,name,application,gpus,published_jct_s,our_jct_s,ratio\n");
    let mut ours_means = Vec::new();
    let mut theirs_means = Vec::new();
    let mut ratios = Vec::new();
    let mut by_app: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (name, jobs, result) in &o.runs {
        let Some(theirs) = published.get(name) else { continue };
        let (mut ours_sum, mut theirs_sum, mut n) = (0.0, 0.0, 0.0);
        for (job, r) in jobs.iter().zip(&result.records) {
            let Some(&p) = theirs.get(&job.name) else { continue };
            let ours = (r.end_ms - r.submit_ms) as f64 / 1000.0;
            let _ = writeln!(csv, "{name},{},{},{},{p:.0},{ours:.3},{:.4}", job.name, job.type_key, job.gpus, ours / p.max(1.0));
            ratios.push(ours / p.max(1.0));
            let e = by_app.entry(job.type_key.as_str()).or_default();
            e.0 += ours;
            e.1 += p;
            ours_sum += ours;
            theirs_sum += p;
            n += 1.0;
        }
        if n > 0.0 {
            ours_means.push(ours_sum / n);
            theirs_means.push(theirs_sum / n);
        }
    }
    write(&args.out.join(format!("{}.{}.compare.csv", args.name, o.policy)), &csv)?;
    if ours_means.is_empty() {
        return Ok(format!("{}: no workload of the published summary matched\n", o.policy));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (ours, theirs) = (mean(&ours_means), mean(&theirs_means));
    ratios.sort_by(f64::total_cmp);
    let mut out = format!(
        "{} vs published ({} workloads, {} jobs matched): ours {ours:.0} s, published {theirs:.0} s (mean of per-workload means), {:+.1} %; per-job ratio ours/published p10 {:.2}, median {:.2}, p90 {:.2}\n",
        o.policy,
        ours_means.len(),
        ratios.len(),
        (ours / theirs - 1.0) * 100.0,
        metrics::percentile(&ratios, 10.0),
        metrics::percentile(&ratios, 50.0),
        metrics::percentile(&ratios, 90.0)
    );
    for (app, (o_sum, p_sum)) in by_app {
        let _ = writeln!(out, "  {app}: total JCT ours / published = {:.2}", o_sum / p_sum);
    }
    Ok(out)
}
