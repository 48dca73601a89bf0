//! Prometheus text exposition with the NVIDIA DCGM exporter's metric names and labels, so a
//! Grafana GPU dashboard built for dcgm-exporter works unchanged on Suanli agents.
//!
//! Names, types and help texts follow dcgm-exporter's `etc/default-counters.csv` (and its
//! `dcp-metrics-included.csv` for ECC and PCIe); `dcgm-metrics.txt` in this crate is the list,
//! checked by a test. Labels are dcgm-exporter's: `gpu`, `UUID`, `pci_bus_id`, `device`,
//! `modelName`, `Hostname`. A card that has fallen off the bus reports no DCGM values (as
//! with dcgm-exporter) and `suanli_gpu_present 0`.
//!
//! `promtool check metrics` parses the output cleanly; its only complaints are the ones
//! dcgm-exporter's own output draws — camelCase label names and `*_TOTAL` counters without a
//! lower-case `_total` suffix — which are the compatibility contract. Our own families
//! (`suanli_*`) use snake_case labels and pass every lint.

use std::fmt::Write;

use crate::{CardError, CardInfo, CardSample};

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&CardSample) -> Option<f64>,
}

const FAMILIES: &[Family] = &[
    Family { name: "DCGM_FI_DEV_SM_CLOCK", kind: "gauge", help: "SM clock frequency (in MHz).", value: |s| Some(f64::from(s.sm_clock_mhz)) },
    Family { name: "DCGM_FI_DEV_MEM_CLOCK", kind: "gauge", help: "Memory clock frequency (in MHz).", value: |s| Some(f64::from(s.memory_clock_mhz)) },
    Family { name: "DCGM_FI_DEV_GPU_TEMP", kind: "gauge", help: "GPU temperature (in C).", value: |s| Some(f64::from(s.temperature_c)) },
    Family { name: "DCGM_FI_DEV_POWER_USAGE", kind: "gauge", help: "Power draw (in W).", value: |s| Some(f64::from(s.power_draw_mw) / 1000.0) },
    Family { name: "DCGM_FI_DEV_GPU_UTIL", kind: "gauge", help: "GPU utilization (in %).", value: |s| Some(f64::from(s.gpu_utilization_pct)) },
    Family { name: "DCGM_FI_DEV_MEM_COPY_UTIL", kind: "gauge", help: "Memory utilization (in %).", value: |s| Some(f64::from(s.memory_utilization_pct)) },
    Family { name: "DCGM_FI_DEV_FB_USED", kind: "gauge", help: "Framebuffer memory used (in MiB).", value: |s| Some(s.memory_used_mib as f64) },
    Family {
        name: "DCGM_FI_DEV_XID_ERRORS",
        kind: "gauge",
        help: "Value of the last XID error encountered.",
        value: |s| Some(f64::from(s.xid_events.last().copied().unwrap_or(0))),
    },
    Family { name: "DCGM_FI_DEV_FAN_SPEED", kind: "gauge", help: "Fan speed (in 0-100%).", value: |s| s.fan_pct.map(f64::from) },
    Family {
        name: "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        kind: "counter",
        help: "Total number of single-bit volatile ECC errors.",
        value: |s| Some(s.ecc_corrected as f64),
    },
    Family {
        name: "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        kind: "counter",
        help: "Total number of double-bit volatile ECC errors.",
        value: |s| Some(s.ecc_uncorrected as f64),
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_TX_BYTES",
        kind: "gauge",
        help: "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        value: |s| Some(f64::from(s.pcie_tx_kbps) * 1024.0),
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_RX_BYTES",
        kind: "gauge",
        help: "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        value: |s| Some(f64::from(s.pcie_rx_kbps) * 1024.0),
    },
];

/// `DCGM_FI_DEV_FB_FREE` needs the card's total memory, so it is not in [`FAMILIES`].
const FB_FREE: (&str, &str) = ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).");
const PRESENT: (&str, &str) = ("suanli_gpu_present", "1 if the card answers the driver, 0 if it has fallen off the bus.");

/// Renders the exposition for `cards` and their latest samples (`latest[i]` belongs to the
/// card at position `i`; a missing entry means not sampled yet).
pub fn render(hostname: &str, cards: &[CardInfo], latest: &[Result<CardSample, CardError>]) -> String {
    let labels: Vec<String> = cards.iter().map(|c| labels(hostname, c)).collect();
    let readable: Vec<Option<&CardSample>> =
        (0..cards.len()).map(|i| latest.get(i).and_then(|r| r.as_ref().ok())).collect();
    let mut out = String::new();
    for family in FAMILIES {
        let values: Vec<(usize, f64)> =
            readable.iter().enumerate().filter_map(|(i, s)| s.and_then(|s| (family.value)(s)).map(|v| (i, v))).collect();
        if values.is_empty() {
            continue;
        }
        header(&mut out, family.name, family.kind, family.help);
        for (i, v) in values {
            let _ = writeln!(out, "{}{{{}}} {}", family.name, labels[i], v);
        }
    }
    let free: Vec<(usize, f64)> = readable
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i, cards[i].vram_mib.saturating_sub(s.memory_used_mib) as f64)))
        .collect();
    if !free.is_empty() {
        header(&mut out, FB_FREE.0, "gauge", FB_FREE.1);
        for (i, v) in free {
            let _ = writeln!(out, "{}{{{}}} {}", FB_FREE.0, labels[i], v);
        }
    }
    if !cards.is_empty() {
        header(&mut out, PRESENT.0, "gauge", PRESENT.1);
        for (i, card) in cards.iter().enumerate() {
            let present = !matches!(latest.get(i), Some(Err(CardError::FallenOffBus(_))));
            let _ = writeln!(out, "{}{{{}}} {}", PRESENT.0, snake_labels(hostname, card), u8::from(present));
        }
    }
    out
}

/// The DCGM metric names this module can emit.
pub fn metric_names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.name).chain([FB_FREE.0]).collect()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// dcgm-exporter's label names, in its order.
const DCGM_LABELS: [&str; 6] = ["gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname"];
/// The same labels in Prometheus' own style, for our families.
const SNAKE_LABELS: [&str; 6] = ["gpu", "uuid", "pci_bus_id", "device", "model_name", "hostname"];

fn labels(hostname: &str, c: &CardInfo) -> String {
    label_set(&DCGM_LABELS, hostname, c)
}

fn snake_labels(hostname: &str, c: &CardInfo) -> String {
    label_set(&SNAKE_LABELS, hostname, c)
}

fn label_set(names: &[&str; 6], hostname: &str, c: &CardInfo) -> String {
    let values = [c.index.to_string(), escape(&c.uuid), escape(&c.pci_bus_id), format!("nvidia{}", c.index), escape(&c.model), escape(hostname)];
    names.iter().zip(values).map(|(name, value)| format!("{name}=\"{value}\"")).collect::<Vec<_>>().join(",")
}

/// Label values escape backslash, double quote and newline (the text format's rules).
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulated::{Fault, SimulatedSource};
    use crate::GpuSource;

    const COMMITTED: &str = include_str!("../dcgm-metrics.txt");

    fn committed() -> Vec<&'static str> {
        COMMITTED.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect()
    }

    fn families(text: &str) -> Vec<&str> {
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).collect()
    }

    #[test]
    fn every_emitted_name_is_in_the_committed_list_and_every_listed_name_is_emitted() {
        let model = *crate::models::find("RTX 4090").expect("model");
        let mut source = SimulatedSource::new("host", model, 2, 7);
        source.set_load(0, 0.8);
        let cards = source.cards();
        let latest = source.sample(1_000);
        let text = render("host", &cards, &latest);
        let emitted: Vec<&str> = families(&text).into_iter().filter(|n| n.starts_with("DCGM_")).collect();
        let listed = committed();
        for name in &emitted {
            assert!(listed.contains(name), "{name} is emitted but not in dcgm-metrics.txt");
        }
        for name in &listed {
            assert!(emitted.contains(name), "{name} is listed but not emitted for a card with a fan");
        }
        assert_eq!(metric_names().len(), listed.len());
    }

    #[test]
    fn a_lost_card_reports_only_its_absence_and_labels_are_escaped() {
        let model = *crate::models::find("A100 80GB").expect("model");
        let mut source = SimulatedSource::new("h", model, 2, 1);
        source.inject(1, Fault::FallenOffBus);
        let mut cards = source.cards();
        cards[0].model = "A \"quoted\" \\ name".into();
        let text = render("h", &cards, &source.sample(1_000));
        assert!(text.contains(r#"modelName="A \"quoted\" \\ name""#), "{text}");
        assert!(text.contains("device=\"nvidia1\"") && text.contains("suanli_gpu_present{gpu=\"1\""));
        assert!(text.contains("model_name=\"A \\\"quoted\\\" \\\\ name\""), "{text}");
        let lost: Vec<&str> = text.lines().filter(|l| l.contains("gpu=\"1\"")).collect();
        assert_eq!(lost.len(), 1, "only presence for the lost card: {lost:?}");
        assert!(lost[0].ends_with(" 0"));
        assert!(!text.contains("DCGM_FI_DEV_FAN_SPEED"), "A100s report no fan");
    }
}
