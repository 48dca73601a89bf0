//! The real NVML code path (`NvmlSource` over `nvml-wrapper`) against a stand-in
//! `libnvidia-ml.so` compiled here from `fake-nvml/libnvidia-ml.c`, which answers scripted
//! values, a lost card and XID events. On a machine with an NVIDIA driver the same source runs
//! against the real library (see BENCHMARKS.md / the agent's `inventory` command).

use std::path::{Path, PathBuf};

use suanli_telemetry::nvml::{NvmlOpenError, NvmlSource};
use suanli_telemetry::{CardError, GpuSource};
use tempfile::TempDir;

const TWO_CARDS: &str = "driver=550.54.15
cuda=12040
count=2
0.name=NVIDIA A100-SXM4-80GB
0.uuid=GPU-11111111-2222-3333-4444-555555555555
0.bus=00000000:3B:00.0
0.total_mib=81920
0.used_mib=1024
0.util_gpu=42
0.util_mem=17
0.temp=55
0.power_mw=210000
0.limit_mw=400000
0.sm_clock=1410
0.mem_clock=1593
0.fan=-1
0.ecc_corrected=3
0.ecc_uncorrected=0
0.pcie_rx=1000
0.pcie_tx=2000
1.name=NVIDIA GeForce RTX 4090
1.uuid=GPU-66666666-7777-8888-9999-000000000000
1.bus=00000000:86:00.0
1.total_mib=24564
1.used_mib=0
1.util_gpu=0
1.util_mem=0
1.temp=35
1.power_mw=20000
1.limit_mw=450000
1.sm_clock=210
1.mem_clock=405
1.fan=30
";

/// Compiles the stand-in with its script path built in; returns (library, script).
fn stand_in(dir: &TempDir) -> (PathBuf, PathBuf) {
    let script = dir.path().join("script.txt");
    std::fs::write(&script, TWO_CARDS).expect("script");
    let library = dir.path().join("libnvidia-ml.so");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake-nvml/libnvidia-ml.c");
    let status = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror"])
        .arg(format!("-DSCRIPT_PATH=\"{}\"", script.display()))
        .arg("-o")
        .arg(&library)
        .arg(&source)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "the stand-in library compiles");
    (library, script)
}

fn rewrite(script: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(script).expect("script");
    assert!(text.contains(from), "{from} not in the script");
    std::fs::write(script, text.replace(from, to)).expect("rewrite");
}

#[test]
fn inventory_and_samples_come_from_the_library() {
    let dir = TempDir::new().expect("temp dir");
    let (library, script) = stand_in(&dir);
    let mut source = NvmlSource::open(Some(&library)).expect("opens the stand-in");
    let cards = source.cards();
    assert_eq!(cards.len(), 2);
    assert_eq!(cards[0].uuid, "GPU-11111111-2222-3333-4444-555555555555");
    assert_eq!(cards[0].model, "NVIDIA A100-SXM4-80GB");
    assert_eq!(cards[0].pci_bus_id, "00000000:3B:00.0");
    assert_eq!(cards[0].vram_mib, 81920);
    assert_eq!(cards[0].power_limit_mw, 400_000);
    assert_eq!(cards[0].driver_version, "550.54.15");
    assert_eq!(cards[0].cuda_version, "12.4");
    assert_eq!(cards[1].index, 1);

    let samples = source.sample(1_000);
    let a100 = samples[0].as_ref().expect("readable");
    assert_eq!(
        (a100.at_ms, a100.gpu_utilization_pct, a100.memory_utilization_pct, a100.memory_used_mib, a100.temperature_c),
        (1_000, 42, 17, 1024, 55)
    );
    assert_eq!((a100.power_draw_mw, a100.power_limit_mw, a100.sm_clock_mhz, a100.memory_clock_mhz), (210_000, 400_000, 1410, 1593));
    assert_eq!((a100.fan_pct, a100.ecc_corrected, a100.pcie_rx_kbps, a100.pcie_tx_kbps), (None, 3, 1000, 2000));
    assert_eq!(samples[1].as_ref().expect("readable").fan_pct, Some(30));

    rewrite(&script, "0.util_gpu=42", "0.util_gpu=97");
    rewrite(&script, "0.temp=55", "0.temp=83");
    let a100 = source.sample(2_000).remove(0).expect("readable");
    assert_eq!((a100.gpu_utilization_pct, a100.temperature_c), (97, 83));
}

#[test]
fn xids_arrive_once_and_a_lost_card_is_reported_alone() {
    let dir = TempDir::new().expect("temp dir");
    let (library, script) = stand_in(&dir);
    let mut source = NvmlSource::open(Some(&library)).expect("opens the stand-in");
    assert!(source.sample(1_000).iter().all(|s| s.as_ref().is_ok_and(|s| s.xid_events.is_empty())));

    std::fs::write(&script, format!("{TWO_CARDS}1.xid=48,94\n")).expect("script");
    let samples = source.sample(2_000);
    assert_eq!(samples[1].as_ref().expect("readable").xid_events, [48, 94]);
    assert!(samples[0].as_ref().expect("readable").xid_events.is_empty());
    assert!(source.sample(3_000)[1].as_ref().expect("readable").xid_events.is_empty(), "delivered once");

    std::fs::write(&script, format!("{TWO_CARDS}1.xid=48,94\n0.lost=1\n")).expect("script");
    let samples = source.sample(4_000);
    assert_eq!(samples[0], Err(CardError::FallenOffBus(0)));
    assert_eq!(samples[1].as_ref().expect("the other card still reads").gpu_utilization_pct, 0);
}

#[test]
fn a_missing_library_is_a_clear_error() {
    let missing = Path::new("/nonexistent/libnvidia-ml.so.1");
    match NvmlSource::open(Some(missing)) {
        Err(e @ NvmlOpenError::NotFound(_)) => assert!(e.to_string().contains("not found"), "{e}"),
        Err(other) => panic!("expected NotFound, got {other}"),
        Ok(_) => panic!("opened a library that does not exist"),
    }
}
