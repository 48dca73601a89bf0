//! The DCGM-named exposition (`suanli_telemetry::dcgm`) of a few simulated cards — one of them
//! fallen off the bus — checked by `promtool check metrics`, Prometheus' own parser and linter
//! (Debian's `prometheus` package, installed by `ops/install-build-deps`). promtool is required:
//! without it these tests fail, naming the install script.

use std::io::{ErrorKind, Write};
use std::process::{Command, Stdio};

use suanli_telemetry::dcgm::{render_latched, XidLatch};
use suanli_telemetry::models;
use suanli_telemetry::simulated::{Fault, SimulatedSource};
use suanli_telemetry::GpuSource;

const INSTALL_SCRIPT: &str = "ops/install-build-deps";

/// promtool's exit code and what it printed, one complaint per line.
struct Verdict {
    code: Option<i32>,
    complaints: Vec<String>,
}

/// Runs `promtool check metrics` with `exposition` on stdin.
fn promtool(exposition: &str) -> Verdict {
    let spawned = Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "promtool is not installed; run {INSTALL_SCRIPT} (as root or with sudo), which installs Debian's \
             `prometheus` package that ships promtool"
        ),
        Err(e) => panic!("promtool could not be started ({e}); {INSTALL_SCRIPT} installs it"),
    };
    child.stdin.take().expect("promtool's stdin").write_all(exposition.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Verdict { code: out.status.code(), complaints: said.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect() }
}

/// The complaints dcgm-exporter's own output draws, which its names and labels (the contract
/// dashboards rely on) make unavoidable: the camelCase `modelName` label, and counters named
/// `*_TOTAL` rather than `*_total`. promtool prints them as `<family> <problem>`.
fn inherent_to_dcgm_naming(complaint: &str) -> bool {
    let Some((family, problem)) = complaint.split_once(' ') else { return false };
    family.starts_with("DCGM_")
        && (problem == "label names should be written in 'snake_case' not 'camelCase'"
            || (problem == "counter metrics should have \"_total\" suffix" && family.ends_with("_TOTAL")))
}

/// A node of four fan-cooled cards after a minute of one-second samples: two under load, one
/// in an XID storm, one fallen off the bus. The hostname needs escaping.
fn node_exposition() -> String {
    let model = *models::find("RTX 4090").expect("model");
    let mut source = SimulatedSource::new("node-1", model, 4, 11);
    source.set_load(0, 0.9);
    source.set_load(1, 0.4);
    source.inject(2, Fault::XidStorm);
    source.inject(3, Fault::FallenOffBus);
    let cards = source.cards();
    let mut latch = XidLatch::default();
    let mut latest = Vec::new();
    for s in 1..=60 {
        if s == 60 {
            source.clear(2);
        }
        latest = source.sample(s * 1000);
        latch.observe(&latest);
    }
    render_latched("node-1 \"rack 4\\b\"", &cards, &latest, &latch)
}

#[test]
fn the_dcgm_exposition_of_simulated_cards_passes_promtool() {
    let exposition = node_exposition();
    // The node as a Grafana dashboard would see it.
    assert!(
        exposition.contains("suanli_gpu_present{gpu=\"3\"") && exposition.lines().any(|l| l.starts_with("suanli_gpu_present{gpu=\"3\"") && l.ends_with(" 0"))
    );
    assert!(!exposition.lines().any(|l| l.starts_with("DCGM_") && l.contains("gpu=\"3\"")), "a lost card has no DCGM values:\n{exposition}");
    assert!(exposition.lines().any(|l| l.starts_with("DCGM_FI_DEV_XID_ERRORS{gpu=\"2\"") && l.ends_with(",err_code=\"94\"} 94")), "{exposition}");
    assert!(exposition.contains("DCGM_FI_DEV_FAN_SPEED{gpu=\"0\"") && exposition.contains("Hostname=\"node-1 \\\"rack 4\\\\b\\\"\""));

    let verdict = promtool(&exposition);
    // 0: clean; 3: parsed, with lint complaints; 1: it could not parse the exposition.
    assert!(matches!(verdict.code, Some(0 | 3)), "promtool check metrics failed ({:?}): {:?}\n{exposition}", verdict.code, verdict.complaints);
    let other: Vec<&String> = verdict.complaints.iter().filter(|c| !inherent_to_dcgm_naming(c)).collect();
    assert!(other.is_empty(), "promtool complaints beyond dcgm-exporter's own naming: {other:?}\n{exposition}");
}

#[test]
fn the_suanli_family_passes_every_promtool_lint() {
    let exposition = node_exposition();
    let ours: String = exposition.lines().filter(|l| l.contains("suanli_")).map(|l| format!("{l}\n")).collect();
    assert_eq!(ours.lines().count(), 2 + 4, "HELP, TYPE and one line per card:\n{ours}");
    let verdict = promtool(&ours);
    assert_eq!(verdict.code, Some(0), "promtool check metrics: {:?}\n{ours}", verdict.complaints);
    assert!(verdict.complaints.is_empty(), "promtool printed lint problems: {:?}\n{ours}", verdict.complaints);
}

/// The check above is only worth something if promtool does reject what is broken.
#[test]
fn promtool_rejects_a_broken_exposition() {
    let broken = node_exposition().replacen("Hostname=\"node-1 \\\"rack", "Hostname=\"node-1 \"rack", 1);
    let verdict = promtool(&broken);
    assert_eq!(verdict.code, Some(1), "an unescaped quote is a parse error: {:?}", verdict.complaints);
}
