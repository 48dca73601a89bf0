//! Replays a slice of a real Gavel trace (Microsoft Philly arrivals and sizes, Gavel's
//! measured K80/P100/V100 throughputs) on Gavel's 36-GPU heterogeneous cluster through the
//! real policies, and compares average job completion times.

use std::path::PathBuf;

use suanli_scheduling::replay::{gavel_cluster, parse_gavel_trace, simulate, workload, GavelThroughputs, SimConfig};
use suanli_scheduling::{build, PolicyConfig, PolicyKind};

/// The virtual cluster and the number of its first jobs replayed. `ed69ec` has a
/// throughput entry for every (job type, gang size) in it; 300 jobs load the cluster near
/// its capacity at real arrival times.
const VC: &str = "ed69ec";
const JOBS: usize = 300;
const MODELS: [&str; 3] = ["k80", "p100", "v100"];

fn traces() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces");
    assert!(dir.join("gavel").is_dir(), "trace data not found at {} (expected the shared checkout's traces/gavel, see traces/README.md)", dir.display());
    dir
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[test]
fn las_and_heterogeneity_beat_fifo_on_a_gavel_trace() {
    let dir = traces();
    let throughputs: GavelThroughputs = serde_json::from_str(&read(dir.join("gavel/simulation_throughputs.json"))).expect("the Gavel throughput JSON");
    let table = throughputs.table(&MODELS).expect("well-formed throughput keys");
    let trace = parse_gavel_trace(&read(dir.join(format!("gavel/msr/seed=0/{VC}.trace")))).expect("a well-formed trace");
    assert!(trace.len() >= JOBS, "{VC} has only {} jobs", trace.len());
    let workload = workload(&trace[..JOBS], &table, &MODELS, 1.0);
    assert_eq!(workload.skipped, 0, "every job of {VC} has a throughput");
    for job in &workload.jobs {
        job.spec.validate().expect("replayed specs are valid specs");
    }
    let config = PolicyConfig { throughput: table.clone(), ..PolicyConfig::default() };
    let cluster = gavel_cluster();
    let mut avg = Vec::new();
    println!("{VC}: first {JOBS} jobs on 12 K80 + 12 P100 + 12 V100, 360 s rounds, 30 s restart penalty");
    println!("{:<14} {:>12} {:>12} {:>12} {:>8} {:>8} {:>8}", "policy", "avg JCT h", "median h", "makespan h", "rounds", "places", "preempts");
    for kind in PolicyKind::ALL {
        let mut policy = build(kind, &config);
        let report = simulate(policy.as_mut(), &cluster, &workload, &table, &SimConfig::default()).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(report.jobs, JOBS);
        println!(
            "{:<14} {:>12.2} {:>12.2} {:>12.1} {:>8} {:>8} {:>8}",
            report.policy,
            report.avg_jct_s / 3600.0,
            report.median_jct_s / 3600.0,
            report.makespan_s / 3600.0,
            report.rounds,
            report.placements,
            report.preemptions
        );
        avg.push(report.avg_jct_s);
    }
    let (fifo, las, hetero) = (avg[0], avg[1], avg[2]);
    assert!(las < fifo, "LAS average JCT {las:.0} s is not below FIFO's {fifo:.0} s");
    assert!(hetero < fifo, "heterogeneity-aware average JCT {hetero:.0} s is not below FIFO's {fifo:.0} s");
}
