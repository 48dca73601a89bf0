//! `suanli-sim`: the project's own code at scales no machine here has.
//!
//! `suanli-sim federation --members 10,100,1000`: that many real federation nodes
//! (`suanli_federation::FederationNode`: the same gossipsub, anti-entropy, signatures and
//! membership checks as on the network) in one process over libp2p's memory transport (Noise
//! and Yamux as over TCP), each dialling a few random others. One member after another
//! announces a new offer; measured: the time until every member's catalogue shows it, and how
//! many copies of each announcement a member received (gossip's redundancy). Prints a table,
//! writes `federation-convergence.csv` and `.svg` (convergence time against members) to `--out`.
//!
//! `suanli-sim trace --format pollux --input …`: a GPU-cluster trace through the real
//! scheduling policies (`suanli_sim::run`); see `simulations/README.md`.
//!
//! `suanli-sim compare --policy fifo,las,heterogeneity --seeds 1,2,3`: every policy on every
//! trace of the README (`suanli_sim::compare::settings()`, also `trace --preset NAME`), one
//! table. `suanli-sim max-rate --cluster 8x8:v100`: the highest synthetic job rate the cluster
//! sustains per policy (definition in `suanli_sim::compare::probe`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use suanli_federation::testing::{founded, listing};
use suanli_federation::{FederationNode, Freshness, Keypair, MembershipChain, NodeConfig, TransportKind};
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
        #[arg(long, default_value = "simulations/results/max-rate")]
        out: PathBuf,
    },
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

/// A small deterministic generator (the topology is the same on every run).
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

struct Outcome {
    members: usize,
    startup: Duration,
    times: Vec<Duration>,
    copies_per_member: f64,
    messages_per_member_second: f64,
}

async fn run(members: usize, degree: usize, rounds: usize) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let keys: Vec<Keypair> = (0..members).map(|_| Keypair::generate_ed25519()).collect();
    let names: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
    let named: Vec<(&str, &Keypair)> = names.iter().map(String::as_str).zip(&keys).collect();
    let chain = MembershipChain { genesis: founded("sim", &named, "sim"), changes: vec![] };
    let mut rng = Xorshift(0x5eed_0000_0000_0001 ^ members as u64);
    let mut nodes: Vec<FederationNode> = Vec::with_capacity(members);
    let mut addresses: Vec<suanli_federation::Multiaddr> = Vec::with_capacity(members);
    for key in &keys {
        let dial = (0..degree.min(nodes.len())).map(|_| addresses[rng.below(nodes.len())].clone()).collect();
        let node = FederationNode::start(NodeConfig {
            keypair: key.clone(),
            membership: chain.clone(),
            listen: "/memory/0".parse()?,
            dial,
            transport: TransportKind::Memory,
            persist_membership: None,
            anti_entropy_every: Duration::from_secs(2),
            freshness: Freshness { stale_after: Duration::from_secs(600), hide_after: Duration::from_secs(1200) },
            calls: None,
        })
        .await?;
        let address = node.listen_addr().await?;
        addresses.push(address);
        nodes.push(node);
    }
    for node in &nodes {
        while node.connected().await?.is_empty() {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(600), "a member never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A few gossipsub heartbeats to form the meshes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let startup = started.elapsed();
    let copies_before: u64 =
        nodes.iter().map(|n| n.counters().announcements_applied.load(Ordering::Relaxed) + n.counters().announcements_known.load(Ordering::Relaxed)).sum();
    let messages_before: u64 = nodes.iter().map(|n| n.counters().messages_received.load(Ordering::Relaxed)).sum();
    let measured = Instant::now();
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let origin = &nodes[(round * 7919) % members];
        let marker = 1000 + round as u32;
        let t = Instant::now();
        origin.announce(vec![listing(1, marker)]).await?;
        let origin_id = origin.peer_id();
        let mut pending: Vec<&FederationNode> = nodes.iter().collect();
        while !pending.is_empty() {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(120), "{} members never saw announcement {round}", pending.len());
            pending.retain(|n| !n.catalogue().iter().any(|l| l.origin == origin_id && l.listing.free_cards == marker));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t.elapsed());
    }
    let copies_after: u64 =
        nodes.iter().map(|n| n.counters().announcements_applied.load(Ordering::Relaxed) + n.counters().announcements_known.load(Ordering::Relaxed)).sum();
    let copies_per_member = (copies_after - copies_before) as f64 / (members as f64 * rounds as f64);
    let messages_after: u64 = nodes.iter().map(|n| n.counters().messages_received.load(Ordering::Relaxed)).sum();
    let messages_per_member_second = (messages_after - messages_before) as f64 / (members as f64 * measured.elapsed().as_secs_f64());
    Ok(Outcome { members, startup, times, copies_per_member, messages_per_member_second })
}

fn svg(outcomes: &[Outcome]) -> String {
    let (w, h, pad) = (640.0, 360.0, 50.0);
    let max_members = outcomes.iter().map(|o| o.members).max().unwrap_or(1) as f64;
    let max_ms = outcomes.iter().flat_map(|o| o.times.iter()).map(|t| t.as_secs_f64() * 1000.0).fold(1.0, f64::max);
    let x = |m: usize| pad + (m as f64 / max_members) * (w - 2.0 * pad);
    let y = |ms: f64| h - pad - (ms / max_ms) * (h - 2.0 * pad);
    let mut out = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    out += &format!("<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n", h - pad, w - pad, h - pad);
    out += &format!("<line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n", h - pad);
    out += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">members</text>\n", w / 2.0, h - 10.0);
    out += &format!(
        "<text x=\"12\" y=\"{}\" transform=\"rotate(-90 12 {})\" text-anchor=\"middle\">ms until every member has it (max of rounds)</text>\n",
        h / 2.0,
        h / 2.0
    );
    out += &format!("<text x=\"{pad}\" y=\"{}\" text-anchor=\"end\">{max_ms:.0}</text>\n", pad + 4.0);
    let points: Vec<String> = outcomes
        .iter()
        .map(|o| (o.members, o.times.iter().max().map_or(0.0, |t| t.as_secs_f64() * 1000.0)))
        .map(|(m, ms)| format!("{:.1},{:.1}", x(m), y(ms)))
        .collect();
    out += &format!("<polyline fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\" points=\"{}\"/>\n", points.join(" "));
    for o in outcomes {
        let ms = o.times.iter().max().map_or(0.0, |t| t.as_secs_f64() * 1000.0);
        // Labels right of their point, but left of it in the right half (inside the picture).
        let (dx, anchor) = if x(o.members) > w / 2.0 { (-6.0, "end") } else { (6.0, "start") };
        out += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"steelblue\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"{anchor}\">{} · {ms:.0} ms</text>\n",
            x(o.members),
            y(ms),
            x(o.members) + dx,
            y(ms) - 6.0,
            o.members
        );
    }
    out + "</svg>\n"
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Trace(cli) => {
            let report = suanli_sim::run::trace(&cli.into_args()?)?;
            print!("{report}");
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
        Command::MaxRate { cluster, policy, jobs, max_duration_s, seeds, max_avg_queueing_s, precision, round_s, out } => {
            anyhow::ensure!(!seeds.is_empty() && jobs >= 2 && precision > 0.0, "--seeds, --jobs ≥ 2 and --precision > 0 are needed");
            let args = suanli_sim::compare::MaxRateArgs {
                cluster,
                policies: policy,
                engine: EngineConfig { round_s, ..EngineConfig::default() },
                las: LasConfig::default(),
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
                let mut o = run(n, degree, rounds).await.with_context(|| format!("{n} members"))?;
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
            std::fs::write(out.join("federation-convergence.svg"), svg(&outcomes))?;
            Ok(())
        }
    }
}
