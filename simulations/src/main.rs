//! `suanli-sim`: the project's own code at scales no machine here has.
//!
//! `suanli-sim federation --members 10,100,1000`: that many real federation nodes
//! (`suanli_federation::FederationNode`: the same gossipsub, anti-entropy, signatures and
//! membership checks as on the network) in one process over libp2p's memory transport (Noise
//! and Yamux as over TCP), each dialling a few random others. One member after another
//! announces a new offer; measured: the time until every member's catalogue shows it, and how
//! many copies of each announcement a member received (gossip's redundancy). Prints a table,
//! writes `federation-convergence.csv`, `.svg` and `.png` (convergence time against members) to `--out`.
//!
//! `suanli-sim market --days 365 --members 3`: the market over months on the broker's own
//! state machine (`suanli_sim::market`).
//!
//! `suanli-sim scale --factors 0.1,1,10`: the broker's state machine holding 1× (100,000
//! cards, 10,000 clusters, 50,000 live jobs, 100,000 archived leases), 10×, … that market;
//! what each operation, the snapshot and memory cost at each size (`suanli_sim::scale`).
//!
//! `suanli-sim trace --format pollux --input …`: a GPU-cluster trace through the real
//! scheduling policies (`suanli_sim::run`); see `simulations/README.md`.
//!
//! `suanli-sim compare --policy fifo,las,heterogeneity --seeds 1,2,3`: every policy on every
//! trace of the README (`suanli_sim::compare::settings()`, also `trace --preset NAME`), one
//! table. `suanli-sim max-rate --cluster 8x8:v100`: the highest synthetic job rate the cluster
//! sustains per policy (definition in `suanli_sim::compare::probe`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use suanli_scheduling::{LasConfig, PolicyKind};
use suanli_sim::engine::EngineConfig;
use suanli_sim::run::{Format, TraceArgs};
use suanli_sim::synthetic::SyntheticConfig;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Gossip and anti-entropy convergence with many members.
    Federation {
        #[arg(long, value_delimiter = ',', default_value = "10,100,300")]
        members: Vec<usize>,
        /// Members each new member dials.
        #[arg(long, default_value_t = 3)]
        degree: usize,
        /// Announcements measured per size.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long, default_value = "simulations/results")]
        out: PathBuf,
    },
    /// A GPU-cluster trace through the real scheduling policies, round by round.
    Trace(Box<TraceCli>),
    /// The market over months on the broker's own state machine: suppliers joining and
    /// leaving, card faults, leases within budgets, auto-leasing jobs, billing, federation.
    Market(Box<MarketCli>),
    /// The broker's state at 1×, 10×, … a large market: what operations, snapshots and memory
    /// cost at each size. Each size runs in a fresh process of this binary.
    Scale {
        #[arg(long, value_delimiter = ',', default_value = "0.1,1,10")]
        factors: Vec<f64>,
        /// Operations timed per measure.
        #[arg(long, default_value_t = 2000)]
        samples: usize,
        /// Measure one size here and print only its CSV line (what the parent runs).
        #[arg(long, hide = true)]
        row_only: bool,
        /// With --row-only: write the snapshot here.
        #[arg(long, hide = true)]
        snapshot_to: Option<PathBuf>,
        /// Install this snapshot, print milliseconds and resident bytes added (what the parent runs).
        #[arg(long, hide = true)]
        install: Option<PathBuf>,
        #[arg(long, default_value = "simulations/results/scale")]
        out: PathBuf,
    },
    /// Every policy on every trace of simulations/README.md: one table (mean ± std over seeds).
    Compare {
        /// The traces directory (../shared/traces).
        #[arg(long, default_value = "../shared/traces")]
        traces: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "fifo,las,heterogeneity")]
        policy: Vec<PolicyKind>,
        /// Seeds of the seeded (synthetic) traces; a fixed trace runs once.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        /// Only these traces (by name: pollux-1.0, gavel-ed69ec-300, philly-ed69ec, tiresias-60, synthetic).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        #[arg(long, default_value = "simulations/results/compare")]
        out: PathBuf,
    },
    /// The highest synthetic job rate (jobs/hour) the cluster sustains, per policy: average
    /// queueing below --max-avg-queueing-s and a queue that does not grow over the arrivals.
    MaxRate {
        /// NODESxGPUS:MODEL[,…].
        #[arg(long, default_value = "8x8:v100")]
        cluster: String,
        #[arg(long, value_delimiter = ',', default_value = "fifo,las")]
        policy: Vec<PolicyKind>,
        /// Synthetic jobs per probe and seed.
        #[arg(long, default_value_t = 1000)]
        jobs: usize,
        #[arg(long, default_value_t = 7.0 * 86_400.0)]
        max_duration_s: f64,
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        #[arg(long, default_value_t = 3600.0)]
        max_avg_queueing_s: f64,
        /// Stop bisecting when the bracket is narrower than this fraction of the rate.
        #[arg(long, default_value_t = 0.02)]
        precision: f64,
        #[arg(long, default_value_t = 60)]
        round_s: u64,
        /// Draw the jobs from one of the README's traces instead (pollux-1.0, gavel-ed69ec-300,
        /// philly-ed69ec, tiresias-60), on that trace's cluster with its rounds, delays and LAS
        /// settings (--cluster and --round-s are then ignored); files under --traces.
        #[arg(long)]
        mix: Option<String>,
        #[arg(long, default_value = "../shared/traces")]
        traces: PathBuf,
        #[arg(long, default_value = "simulations/results/max-rate")]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct MarketCli {
    /// One independent run per seed.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seeds: Vec<u64>,
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Federation members (each its own broker state, its own suppliers and researchers).
    #[arg(long, default_value_t = 1)]
    members: u32,
    /// Suppliers per member on day 0.
    #[arg(long, default_value_t = 60)]
    suppliers: u32,
    #[arg(long, default_value_t = 0.3)]
    supplier_joins_per_day: f64,
    /// Mean days a supplier stays (0: forever).
    #[arg(long, default_value_t = 240.0)]
    supplier_stay_days: f64,
    #[arg(long, default_value_t = 4)]
    max_nodes_per_supplier: u32,
    #[arg(long, default_value_t = 8)]
    cards_per_node: u32,
    /// Researchers per member.
    #[arg(long, default_value_t = 400)]
    researchers: u32,
    /// Lease demands per member per day.
    #[arg(long, default_value_t = 600.0)]
    demands_per_day: f64,
    #[arg(long, default_value_t = 6.0)]
    median_lease_hours: f64,
    #[arg(long, default_value_t = 0.3)]
    auto_lease_share: f64,
    /// Paid in for each researcher every 30 days, CNY.
    #[arg(long, default_value_t = 20_000)]
    monthly_budget_cny: i64,
    #[arg(long, default_value_t = 120.0)]
    card_mtbf_days: f64,
    #[arg(long, default_value_t = 24.0)]
    repair_hours: f64,
    #[arg(long, default_value_t = 12.0)]
    patience_hours: f64,
    #[arg(long, default_value_t = 30)]
    retry_minutes: u32,
    #[arg(long, default_value_t = 0.3)]
    early_end_share: f64,
    #[arg(long, default_value_t = 7)]
    reprice_every_days: u32,
    /// Members never lease each other's cards (the same market without federation).
    #[arg(long)]
    isolated: bool,
    /// How often each member announces its offers.
    #[arg(long, default_value_t = 5)]
    announce_every_s: u64,
    /// Measure gossip delays on this many real federation nodes (libp2p, in memory) first and
    /// draw the members' delays from them (0: announcements arrive at once).
    #[arg(long, default_value_t = 0, conflicts_with = "gossip_delays")]
    gossip_nodes: usize,
    /// Draw the gossip delays from a file a run with --gossip-nodes wrote
    /// (`<name>.gossip-delays.csv`), to repeat that run byte for byte.
    #[arg(long)]
    gossip_delays: Option<PathBuf>,
    #[arg(long, default_value = "simulations/results/market")]
    out: PathBuf,
    #[arg(long, default_value = "market")]
    name: String,
}

impl MarketCli {
    fn config(&self) -> suanli_sim::market::MarketConfig {
        suanli_sim::market::MarketConfig {
            seed: self.seeds.first().copied().unwrap_or(1),
            days: self.days,
            members: self.members,
            suppliers: self.suppliers,
            supplier_joins_per_day: self.supplier_joins_per_day,
            supplier_stay_days: self.supplier_stay_days,
            max_nodes_per_supplier: self.max_nodes_per_supplier,
            cards_per_node: self.cards_per_node,
            researchers: self.researchers,
            demands_per_day: self.demands_per_day,
            median_lease_hours: self.median_lease_hours,
            auto_lease_share: self.auto_lease_share,
            monthly_budget_minor: self.monthly_budget_cny.saturating_mul(100),
            card_mtbf_days: self.card_mtbf_days,
            repair_hours: self.repair_hours,
            patience_hours: self.patience_hours,
            retry_minutes: self.retry_minutes,
            early_end_share: self.early_end_share,
            reprice_every_days: self.reprice_every_days,
            federated: !self.isolated,
            announce_every_s: self.announce_every_s,
            gossip_delays_ms: Vec::new(),
        }
    }
}

#[derive(clap::Args)]
struct TraceCli {
    /// pollux (also Sia workloads), philly, gavel, tiresias, alibaba (openb pods) or synthetic.
    #[arg(long, required_unless_present = "preset")]
    format: Option<Format>,
    /// One of the README's traces with its settings (`compare::settings()`: pollux-1.0,
    /// gavel-ed69ec-300, philly-ed69ec, tiresias-60, synthetic), files under --traces; only
    /// --policy, --seeds, --compare, --out (and --name) are then taken from the command line.
    #[arg(long, conflicts_with_all = ["format", "input", "cluster", "nodes", "round_s", "first_start_delay_s", "restart_delay_s", "las_thresholds_gpu_s", "las_min_run_s", "profiles", "throughputs", "philly_cluster", "max_jobs", "jobs", "jobs_per_hour", "max_duration_s", "time_scale"])]
    preset: Option<String>,
    /// With --preset: the traces directory.
    #[arg(long, default_value = "../shared/traces")]
    traces: PathBuf,
    /// Trace files or directories of them; each file is one independent run.
    #[arg(long, value_delimiter = ',')]
    input: Vec<PathBuf>,
    /// Policies to compare: fifo, las, heterogeneity.
    #[arg(long, value_delimiter = ',', default_value = "las")]
    policy: Vec<PolicyKind>,
    /// NODESxGPUS:MODEL[,…], or gavel (12 K80 + 12 P100 + 12 V100).
    #[arg(long, default_value = "16x4:v100")]
    cluster: String,
    /// An Alibaba openb node list (openb_node_list_gpu_node.csv): the cluster instead of --cluster.
    #[arg(long)]
    nodes: Option<PathBuf>,
    #[arg(long, default_value_t = 60)]
    round_s: u64,
    /// Delay before a job's first attempt progresses (Pollux's simulator: 30 s on every allocation).
    #[arg(long, default_value_t = 0)]
    first_start_delay_s: u64,
    /// Delay before an attempt after a preemption progresses (checkpoint reload).
    #[arg(long, default_value_t = 30)]
    restart_delay_s: u64,
    /// LAS queue thresholds in GPU-seconds (2 queues: one threshold). Default: the crate's.
    #[arg(long, value_delimiter = ',')]
    las_thresholds_gpu_s: Option<Vec<u64>>,
    /// LAS: an attempt younger than this is not preempted. Default: the crate's.
    #[arg(long)]
    las_min_run_s: Option<u64>,
    /// Pollux: the Sia throughput profiles directory (sia/throughput_profiles).
    #[arg(long)]
    profiles: Option<PathBuf>,
    /// Gavel: simulation_throughputs.json.
    #[arg(long)]
    throughputs: Option<PathBuf>,
    /// Philly: virtual clusters to keep (all if none).
    #[arg(long, value_delimiter = ',')]
    philly_cluster: Vec<String>,
    /// Only the first N jobs of each input.
    #[arg(long)]
    max_jobs: Option<usize>,
    /// Multiplies submission times (below 1 raises the load).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Synthetic: jobs per seed.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Synthetic: mean arrivals per hour (Poisson).
    #[arg(long, default_value_t = 20.0)]
    jobs_per_hour: f64,
    /// Synthetic: longest run time, seconds.
    #[arg(long, default_value_t = 7.0 * 86_400.0)]
    max_duration_s: f64,
    /// Synthetic: one independent run per seed.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Pollux: a published summary.json to compare with job by job.
    #[arg(long)]
    compare: Option<PathBuf>,
    #[arg(long, default_value = "simulations/results")]
    out: PathBuf,
    /// Prefix of the output files.
    #[arg(long, default_value = "trace")]
    name: String,
}

impl TraceCli {
    fn into_args(self) -> anyhow::Result<TraceArgs> {
        if let Some(preset) = &self.preset {
            let settings = suanli_sim::compare::settings();
            let setting = settings
                .iter()
                .find(|s| s.name == preset)
                .with_context(|| format!("--preset: unknown trace {preset:?} (one of: {})", settings.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")))?;
            let mut args = setting.args(&self.traces, &self.policy, &self.seeds, &self.out);
            args.compare = self.compare;
            if self.name != "trace" {
                args.name = self.name;
            }
            return Ok(args);
        }
        let format = self.format.context("--format or --preset is needed")?;
        let default = LasConfig::default();
        let max_gpus = parse_max_gpus(&self.cluster);
        Ok(TraceArgs {
            format,
            inputs: self.input,
            policies: self.policy,
            cluster: self.cluster,
            nodes: self.nodes,
            engine: EngineConfig {
                round_s: self.round_s,
                first_start_delay_s: self.first_start_delay_s,
                restart_delay_s: self.restart_delay_s,
                ..EngineConfig::default()
            },
            las: LasConfig {
                thresholds_gpu_ms: self.las_thresholds_gpu_s.map_or(default.thresholds_gpu_ms, |t| t.iter().map(|s| s * 1000).collect()),
                min_run_ms: self.las_min_run_s.map_or(default.min_run_ms, |s| s * 1000),
            },
            profiles: self.profiles,
            throughputs: self.throughputs,
            philly_clusters: self.philly_cluster,
            max_jobs: self.max_jobs,
            time_scale: self.time_scale,
            synthetic: SyntheticConfig { jobs: self.jobs, jobs_per_hour: self.jobs_per_hour, max_gpus, max_duration_s: self.max_duration_s, seed: 0 },
            seeds: self.seeds,
            compare: self.compare,
            out: self.out,
            name: self.name,
        })
    }
}

/// The most cards of the cluster (the synthetic mix leaves out larger jobs).
fn parse_max_gpus(cluster: &str) -> u32 {
    suanli_sim::run::parse_cluster(cluster).map_or(u32::MAX, |groups| groups.iter().map(|g| g.nodes * g.cards_per_node).sum())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Trace(cli) => {
            let report = suanli_sim::run::trace(&cli.into_args()?)?;
            print!("{report}");
            Ok(())
        }
        Command::Market(cli) => {
            let mut config = cli.config();
            if let Some(path) = &cli.gossip_delays {
                let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
                config.gossip_delays_ms = suanli_sim::market::parse_delays(&text).map_err(anyhow::Error::msg).with_context(|| format!("{}", path.display()))?;
            }
            anyhow::ensure!(cli.gossip_nodes != 1, "--gossip-nodes: a federation has at least 2 members");
            if cli.gossip_nodes >= 2 {
                let measured = suanli_sim::gossip::measure(cli.gossip_nodes, 3, 5).await.context("measuring gossip")?;
                config.gossip_delays_ms = measured.arrivals.iter().map(|d| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0).collect();
                std::fs::create_dir_all(&cli.out)?;
                let file = cli.out.join(format!("{}.gossip-delays.csv", cli.name));
                std::fs::write(&file, suanli_sim::market::delays_csv(&config.gossip_delays_ms))?;
                let mut sorted = config.gossip_delays_ms.clone();
                sorted.sort_by(f64::total_cmp);
                println!(
                    "gossip delays measured on {} real members: {} arrivals, {:.1} / {:.1} / {:.1} ms min / median / max",
                    cli.gossip_nodes,
                    sorted.len(),
                    sorted.first().copied().unwrap_or(0.0),
                    sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
                    sorted.last().copied().unwrap_or(0.0)
                );
            }
            config.validate().map_err(anyhow::Error::msg).context("market settings")?;
            let report = suanli_sim::market::run_seeds_to(&config, &cli.seeds, &cli.out, &cli.name).map_err(anyhow::Error::msg)?;
            print!("{report}");
            Ok(())
        }
        Command::Scale { factors, samples, row_only, snapshot_to, install, out } => {
            if let Some(path) = install {
                let (ms, rss) = suanli_sim::scale::install(&std::fs::read(&path)?).map_err(anyhow::Error::msg)?;
                print!("{ms:.3},{rss}");
                return Ok(());
            }
            anyhow::ensure!(!factors.is_empty() && factors.iter().all(|f| *f > 0.0) && samples >= 1, "--factors above 0 and --samples ≥ 1");
            if row_only {
                let config = suanli_sim::scale::ScaleConfig { factor: factors[0], samples, ..Default::default() };
                let (row, snapshot) = suanli_sim::scale::measure(&config).map_err(anyhow::Error::msg)?;
                if let Some(path) = snapshot_to {
                    std::fs::write(path, snapshot)?;
                }
                print!("{}", suanli_sim::scale::csv(&[row]).lines().nth(1).unwrap_or_default());
                return Ok(());
            }
            let dir = tempfile::TempDir::new()?;
            let snapshot = dir.path().join("snapshot");
            let this = std::env::current_exe()?;
            let child = |args: &[&str]| -> anyhow::Result<String> {
                let out = std::process::Command::new(&this).args(args).output()?;
                anyhow::ensure!(out.status.success(), "suanli-sim {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
                Ok(String::from_utf8_lossy(&out.stdout).into_owned())
            };
            let mut rows = Vec::new();
            for factor in factors {
                let path = snapshot.display().to_string();
                let line = child(&["scale", "--row-only", "--factors", &factor.to_string(), "--samples", &samples.to_string(), "--snapshot-to", &path])?;
                let mut row = suanli_sim::scale::ScaleRow::from_csv_line(&line).map_err(anyhow::Error::msg)?;
                // The install again, in a process that holds nothing else.
                let installed = child(&["scale", "--install", &path])?;
                let (ms, rss) = installed.split_once(',').context("an install line")?;
                (row.snapshot_decode_ms, row.rss_bytes) = (ms.parse()?, rss.parse()?);
                eprintln!("{factor}×: built in {:.1} s", row.build_s);
                rows.push(row);
            }
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("scale.csv"), suanli_sim::scale::csv(&rows))?;
            print!("{}", suanli_sim::scale::table(&rows));
            Ok(())
        }
        Command::Compare { traces, policy, seeds, only, out } => {
            let mut settings = suanli_sim::compare::settings();
            if !only.is_empty() {
                anyhow::ensure!(
                    only.iter().all(|o| settings.iter().any(|s| s.name == o)),
                    "--only: unknown trace (one of: {})",
                    settings.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                );
                settings.retain(|s| only.iter().any(|o| o == s.name));
            }
            print!("{}", suanli_sim::compare::compare_to(&settings, &traces, &policy, &seeds, &out)?);
            Ok(())
        }
        Command::MaxRate { cluster, policy, jobs, max_duration_s, seeds, max_avg_queueing_s, precision, round_s, mix, traces, out } => {
            anyhow::ensure!(!seeds.is_empty() && jobs >= 2 && precision > 0.0, "--seeds, --jobs ≥ 2 and --precision > 0 are needed");
            let (mix, cluster, engine, las) = match mix {
                None => (None, cluster, EngineConfig { round_s, ..EngineConfig::default() }, LasConfig::default()),
                Some(name) => {
                    let settings = suanli_sim::compare::settings();
                    let setting = settings
                        .iter()
                        .find(|s| s.name == name && s.synthetic.is_none())
                        .with_context(|| format!("--mix: unknown trace {name:?} (one of: pollux-1.0, gavel-ed69ec-300, philly-ed69ec, tiresias-60)"))?;
                    let (mix, cluster, engine, las) = suanli_sim::compare::JobMix::of(setting, &traces)?;
                    (Some(mix), cluster, engine, las)
                }
            };
            let args = suanli_sim::compare::MaxRateArgs {
                cluster,
                policies: policy,
                engine,
                las,
                mix,
                jobs,
                max_duration_s,
                seeds,
                max_avg_queueing_s,
                precision,
                out,
            };
            print!("{}", suanli_sim::compare::max_rate_to(&args)?);
            Ok(())
        }
        Command::Federation { members, degree, rounds, out } => {
            anyhow::ensure!(rounds >= 1 && degree >= 1, "--rounds and --degree are at least 1");
            anyhow::ensure!(members.iter().all(|m| *m >= 2), "a federation has at least 2 members");
            println!("| members | start + mesh | p50 until every member has it | max | announcements handled per member per change (after gossipsub drops duplicates) | messages received per member per second |");
            println!("|---|---|---|---|---|---|");
            let mut outcomes = Vec::new();
            let mut csv = String::from("members,round,ms_to_every_member\n");
            for n in members {
                let mut o = suanli_sim::gossip::measure(n, degree, rounds).await.with_context(|| format!("{n} members"))?;
                o.times.sort();
                for (i, t) in o.times.iter().enumerate() {
                    csv += &format!("{n},{i},{:.3}\n", t.as_secs_f64() * 1000.0);
                }
                println!(
                    "| {n} | {:.1} s | {:.1} ms | {:.1} ms | {:.2} | {:.1} |",
                    o.startup.as_secs_f64(),
                    o.times[o.times.len() / 2].as_secs_f64() * 1000.0,
                    o.times.last().map_or(0.0, |t| t.as_secs_f64() * 1000.0),
                    o.copies_per_member,
                    o.messages_per_member_second
                );
                outcomes.push(o);
            }
            std::fs::create_dir_all(&out)?;
            std::fs::write(out.join("federation-convergence.csv"), csv)?;
            let (svg, png) = suanli_sim::gossip::plots(&outcomes);
            std::fs::write(out.join("federation-convergence.svg"), svg)?;
            std::fs::write(out.join("federation-convergence.png"), png)?;
            Ok(())
        }
    }
}
