//! The real NVML code path (`NvmlSource` over `nvml-wrapper`) against a stand-in
//! `libnvidia-ml.so` compiled here from `fake-nvml/libnvidia-ml.c`, which answers scripted
//! values, a lost card and XID events. On a machine with an NVIDIA driver the same source runs
//! against the real library (see BENCHMARKS.md / the agent's `inventory` command).

use std::path::{Path, PathBuf};

use suanli_telemetry::nvml::{NvmlOpenError, NvmlSource};
use suanli_telemetry::{CardError, CardInfo, CardSample, GpuSource};
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
0.fan=n/a
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
1.ecc_corrected=n/a
1.ecc_uncorrected=n/a
1.pcie_rx=n/a
1.pcie_tx=n/a
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
    assert_eq!(
        source.cards(),
        [
            CardInfo {
                index: 0,
                uuid: "GPU-11111111-2222-3333-4444-555555555555".into(),
                pci_bus_id: "00000000:3B:00.0".into(),
                model: "NVIDIA A100-SXM4-80GB".into(),
                vram_mib: 81920,
                power_limit_mw: 400_000,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
            },
            CardInfo {
                index: 1,
                uuid: "GPU-66666666-7777-8888-9999-000000000000".into(),
                pci_bus_id: "00000000:86:00.0".into(),
                model: "NVIDIA GeForce RTX 4090".into(),
                vram_mib: 24564,
                power_limit_mw: 450_000,
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
            },
        ]
    );
    assert!(source.unidentified().is_empty());

    let a100 = CardSample {
        index: 0,
        at_ms: 1_000,
        gpu_utilization_pct: 42,
        memory_utilization_pct: 17,
        memory_used_mib: 1024,
        temperature_c: 55,
        power_draw_mw: 210_000,
        power_limit_mw: 400_000,
        sm_clock_mhz: 1410,
        memory_clock_mhz: 1593,
        fan_pct: None,
        ecc_corrected: 3,
        ecc_uncorrected: 0,
        xid_events: vec![],
        pcie_rx_kbps: 1000,
        pcie_tx_kbps: 2000,
    };
    // The GeForce has a fan but no ECC and (here) no PCIe counters: left out, not errors.
    let rtx = CardSample {
        index: 1,
        at_ms: 1_000,
        gpu_utilization_pct: 0,
        memory_utilization_pct: 0,
        memory_used_mib: 0,
        temperature_c: 35,
        power_draw_mw: 20_000,
        power_limit_mw: 450_000,
        sm_clock_mhz: 210,
        memory_clock_mhz: 405,
        fan_pct: Some(30),
        ecc_corrected: 0,
        ecc_uncorrected: 0,
        xid_events: vec![],
        pcie_rx_kbps: 0,
        pcie_tx_kbps: 0,
    };
    assert_eq!(source.sample(1_000), [Ok(a100.clone()), Ok(rtx.clone())]);

    rewrite(&script, "0.util_gpu=42", "0.util_gpu=97");
    rewrite(&script, "0.temp=55", "0.temp=83");
    rewrite(&script, "0.ecc_uncorrected=0", "0.ecc_uncorrected=2");
    rewrite(&script, "1.fan=30", "1.fan=55");
    let later = source.sample(2_000);
    let a100 = CardSample { at_ms: 2_000, gpu_utilization_pct: 97, temperature_c: 83, ecc_uncorrected: 2, ..a100 };
    let rtx = CardSample { at_ms: 2_000, fan_pct: Some(55), ..rtx };
    assert_eq!(later, [Ok(a100), Ok(rtx)]);
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

#[test]
fn a_failed_reading_makes_only_that_card_unreadable() {
    let dir = TempDir::new().expect("temp dir");
    let (library, script) = stand_in(&dir);
    let mut source = NvmlSource::open(Some(&library)).expect("opens the stand-in");
    // 999 is NVML_ERROR_UNKNOWN: neither "not supported" (left out) nor "lost". It fails the
    // card whether the reading is one every card has or one a card may lack.
    for broken in ["0.error=999", "0.pcie_rx=err:999"] {
        let text = format!("{TWO_CARDS}{broken}\n").replace("0.pcie_rx=1000\n", "");
        std::fs::write(&script, text).expect("script");
        let samples = source.sample(1_000);
        assert!(matches!(samples[0], Err(CardError::Unreadable { index: 0, .. })), "{broken}: {:?}", samples[0]);
        assert!(samples[1].is_ok(), "{broken}: {:?}", samples[1]);
    }
    std::fs::write(&script, TWO_CARDS).expect("script");
    assert!(source.sample(2_000)[0].is_ok(), "and reads again once the driver answers");
}

#[test]
fn a_card_lost_before_open_is_left_out_and_the_rest_are_listed() {
    let dir = TempDir::new().expect("temp dir");
    let (library, script) = stand_in(&dir);
    std::fs::write(&script, format!("{TWO_CARDS}0.lost=1\n")).expect("script");
    let mut source = NvmlSource::open(Some(&library)).expect("opens with the card that answers");
    assert_eq!(source.unidentified(), [CardError::FallenOffBus(0)]);
    let cards = source.cards();
    assert_eq!((cards.len(), cards[0].index, cards[0].uuid.as_str()), (1, 1, "GPU-66666666-7777-8888-9999-000000000000"));
    let samples = source.sample(1_000);
    assert_eq!((samples.len(), samples[0].as_ref().map(|s| s.index)), (1, Ok(1)));

    // No card answering at all is a broken driver, not an empty node.
    std::fs::write(&script, format!("{TWO_CARDS}0.lost=1\n1.lost=1\n")).expect("script");
    match NvmlSource::open(Some(&library)) {
        Err(e @ NvmlOpenError::Init(_)) => assert!(e.to_string().contains("fallen off the bus"), "{e}"),
        Err(other) => panic!("expected Init, got {other}"),
        Ok(_) => panic!("opened with every card lost"),
    }
}
