//! Prometheus text exposition (format 0.0.4) with the NVIDIA DCGM exporter's metric names and
//! labels, so a Grafana GPU dashboard built for dcgm-exporter works unchanged on Suanli agents.
//!
//! Names, types and help texts follow dcgm-exporter's `etc/default-counters.csv` (release
//! 4.5.3-4.8.2; the ECC counters are commented-out entries there, enabled here). The one name
//! not in that file, `DCGM_FI_DEV_FAN_SPEED`, is DCGM field 191 with DCGM's own description,
//! and only appears for cards that report a fan. `dcgm-metrics.txt` in this crate is the list,
//! kept in step with [`render`] by a test. PCIe throughput uses the current
//! `DCGM_FI_PROF_PCIE_{TX,RX}_BYTES` (bytes per second); the older
//! `DCGM_FI_DEV_PCIE_{TX,RX}_THROUGHPUT` were dropped from dcgm-exporter's defaults in 2024.
//!
//! Labels are dcgm-exporter's, in its order: `gpu`, `UUID`, `pci_bus_id`, `device`
//! (`nvidia<gpu>`), `modelName`, `Hostname` (left out when empty, as dcgm-exporter does), then
//! `DCGM_FI_DRIVER_VERSION`, which its default counters attach to every GPU metric; the XID
//! metric also carries `err_code`. A card that has fallen off the bus reports no DCGM values
//! (as with dcgm-exporter) and `suanli_gpu_present 0`.
//!
//! `DCGM_FI_DEV_XID_ERRORS` is the last XID a card raised and stays there, as DCGM's does;
//! a [`CardSample`] carries only the XIDs since the previous sample, so a caller that samples
//! more often than Prometheus scrapes keeps an [`XidLatch`] and renders with
//! [`render_latched`].
//!
//! `promtool check metrics` parses the output cleanly; its only complaints are the ones
//! dcgm-exporter's own output draws — the camelCase `modelName` label and `*_TOTAL` counters
//! without a lower-case `_total` suffix — which are the compatibility contract. Our own
//! families (`suanli_*`) use snake_case labels and pass every lint.

use std::fmt::Write;

use crate::{CardError, CardInfo, CardSample};

/// What a family's value is read from: the card, its latest readable sample, and the last XID
/// it raised (from the sample or, failing that, the latch).
struct Reading<'a> {
    card: &'a CardInfo,
    sample: &'a CardSample,
    last_xid: u32,
}

struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: fn(&Reading) -> Option<f64>,
}

const XID_ERRORS: &str = "DCGM_FI_DEV_XID_ERRORS";

/// In the order of dcgm-exporter's `default-counters.csv`.
const FAMILIES: &[Family] = &[
    Family { name: "DCGM_FI_DEV_SM_CLOCK", kind: "gauge", help: "SM clock frequency (in MHz).", value: |r| Some(f64::from(r.sample.sm_clock_mhz)) },
    Family { name: "DCGM_FI_DEV_MEM_CLOCK", kind: "gauge", help: "Memory clock frequency (in MHz).", value: |r| Some(f64::from(r.sample.memory_clock_mhz)) },
    Family { name: "DCGM_FI_DEV_GPU_TEMP", kind: "gauge", help: "GPU temperature (in C).", value: |r| Some(f64::from(r.sample.temperature_c)) },
    Family { name: "DCGM_FI_DEV_POWER_USAGE", kind: "gauge", help: "Power draw (in W).", value: |r| Some(f64::from(r.sample.power_draw_mw) / 1000.0) },
    Family { name: "DCGM_FI_DEV_GPU_UTIL", kind: "gauge", help: "GPU utilization (in %).", value: |r| Some(f64::from(r.sample.gpu_utilization_pct)) },
    Family {
        name: "DCGM_FI_DEV_MEM_COPY_UTIL",
        kind: "gauge",
        help: "Memory utilization (in %).",
        value: |r| Some(f64::from(r.sample.memory_utilization_pct)),
    },
    Family { name: XID_ERRORS, kind: "gauge", help: "Value of the last XID error encountered.", value: |r| Some(f64::from(r.last_xid)) },
    Family {
        name: "DCGM_FI_DEV_FB_FREE",
        kind: "gauge",
        help: "Framebuffer memory free (in MiB).",
        value: |r| Some(r.card.vram_mib.saturating_sub(r.sample.memory_used_mib) as f64),
    },
    Family { name: "DCGM_FI_DEV_FB_USED", kind: "gauge", help: "Framebuffer memory used (in MiB).", value: |r| Some(r.sample.memory_used_mib as f64) },
    Family {
        name: "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        kind: "counter",
        help: "Total number of single-bit volatile ECC errors.",
        value: |r| Some(r.sample.ecc_corrected as f64),
    },
    Family {
        name: "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        kind: "counter",
        help: "Total number of double-bit volatile ECC errors.",
        value: |r| Some(r.sample.ecc_uncorrected as f64),
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_TX_BYTES",
        kind: "gauge",
        help: "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        value: |r| Some(f64::from(r.sample.pcie_tx_kbps) * 1024.0),
    },
    Family {
        name: "DCGM_FI_PROF_PCIE_RX_BYTES",
        kind: "gauge",
        help: "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
        value: |r| Some(f64::from(r.sample.pcie_rx_kbps) * 1024.0),
    },
    Family { name: "DCGM_FI_DEV_FAN_SPEED", kind: "gauge", help: "Fan speed for the device in percent 0-100.", value: |r| r.sample.fan_pct.map(f64::from) },
];

const PRESENT: (&str, &str) = ("suanli_gpu_present", "1 if the card answers the driver, 0 if it has fallen off the bus.");

/// The last XID each card raised, by card position, as DCGM keeps it: feed it every round of
/// samples with [`XidLatch::observe`] and render with [`render_latched`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XidLatch {
    last: Vec<u32>,
}

impl XidLatch {
    /// Takes in one round of samples (`latest[i]` belongs to the card at position `i`).
    pub fn observe(&mut self, latest: &[Result<CardSample, CardError>]) {
        if self.last.len() < latest.len() {
            self.last.resize(latest.len(), 0);
        }
        for (last, sample) in self.last.iter_mut().zip(latest) {
            if let Some(&xid) = sample.as_ref().ok().and_then(|s| s.xid_events.last()) {
                *last = xid;
            }
        }
    }

    /// The last XID the card at `position` raised, 0 if none yet.
    pub fn last(&self, position: usize) -> u32 {
        self.last.get(position).copied().unwrap_or(0)
    }
}

/// Renders the exposition for `cards` and their latest samples (`latest[i]` belongs to the
/// card at position `i`; a missing entry means not sampled yet). The XID value is the last one
/// in the latest sample, 0 if it has none; see [`render_latched`] to keep it as DCGM does.
pub fn render(hostname: &str, cards: &[CardInfo], latest: &[Result<CardSample, CardError>]) -> String {
    render_latched(hostname, cards, latest, &XidLatch::default())
}

/// [`render`], with each card's XID value falling back to the one `xids` remembers when the
/// latest sample raised none.
pub fn render_latched(hostname: &str, cards: &[CardInfo], latest: &[Result<CardSample, CardError>], xids: &XidLatch) -> String {
    let readings: Vec<(usize, Reading)> = cards
        .iter()
        .enumerate()
        .filter_map(|(i, card)| {
            let sample = latest.get(i)?.as_ref().ok()?;
            let last_xid = sample.xid_events.last().copied().unwrap_or_else(|| xids.last(i));
            Some((i, Reading { card, sample, last_xid }))
        })
        .collect();
    let labels: Vec<String> = cards.iter().map(|c| labels(hostname, c)).collect();
    let mut out = String::new();
    for family in FAMILIES {
        let mut values = readings.iter().filter_map(|(i, r)| (family.value)(r).map(|v| (*i, r.last_xid, v))).peekable();
        if values.peek().is_none() {
            continue;
        }
        header(&mut out, family.name, family.kind, family.help);
        for (i, last_xid, v) in values {
            if family.name == XID_ERRORS {
                let _ = writeln!(out, "{}{{{},err_code=\"{last_xid}\"}} {v}", family.name, labels[i]);
            } else {
                let _ = writeln!(out, "{}{{{}}} {v}", family.name, labels[i]);
            }
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
    FAMILIES.iter().map(|f| f.name).collect()
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// dcgm-exporter's labels for a GPU metric, in its order.
fn labels(hostname: &str, c: &CardInfo) -> String {
    let mut out = format!(
        "gpu=\"{}\",UUID=\"{}\",pci_bus_id=\"{}\",device=\"nvidia{}\",modelName=\"{}\"",
        c.index,
        escape(&c.uuid),
        escape(&c.pci_bus_id),
        c.index,
        escape(&c.model)
    );
    if !hostname.is_empty() {
        let _ = write!(out, ",Hostname=\"{}\"", escape(hostname));
    }
    if !c.driver_version.is_empty() {
        let _ = write!(out, ",DCGM_FI_DRIVER_VERSION=\"{}\"", escape(&c.driver_version));
    }
    out
}

/// The same labels in Prometheus' own style, for our families.
fn snake_labels(hostname: &str, c: &CardInfo) -> String {
    format!(
        "gpu=\"{}\",uuid=\"{}\",pci_bus_id=\"{}\",device=\"nvidia{}\",model_name=\"{}\",hostname=\"{}\"",
        c.index,
        escape(&c.uuid),
        escape(&c.pci_bus_id),
        c.index,
        escape(&c.model),
        escape(hostname)
    )
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

    /// The families an exposition declares, in order.
    fn families(text: &str) -> Vec<&str> {
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split_whitespace().next()).collect()
    }

    fn card(index: u32) -> CardInfo {
        CardInfo {
            index,
            uuid: format!("GPU-0000000{index}-aaaa-bbbb-cccc-dddddddddddd"),
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x3B + index),
            model: "NVIDIA GeForce RTX 4090".into(),
            vram_mib: 24_564,
            power_limit_mw: 450_000,
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
        }
    }

    /// A sample with every optional reading present.
    fn full_sample(index: u32) -> CardSample {
        CardSample {
            index,
            at_ms: 1_000,
            gpu_utilization_pct: 97,
            memory_utilization_pct: 61,
            memory_used_mib: 20_000,
            temperature_c: 71,
            power_draw_mw: 312_500,
            power_limit_mw: 450_000,
            sm_clock_mhz: 2_520,
            memory_clock_mhz: 10_501,
            fan_pct: Some(64),
            ecc_corrected: 3,
            ecc_uncorrected: 1,
            xid_events: vec![13, 31],
            pcie_rx_kbps: 1_000,
            pcie_tx_kbps: 250,
        }
    }

    #[test]
    fn every_emitted_name_is_in_the_committed_list_and_every_listed_name_is_emitted() {
        let listed = committed();
        let text = render("host", &[card(0), card(1)], &[Ok(full_sample(0)), Ok(full_sample(1))]);
        let emitted: Vec<&str> = families(&text).into_iter().filter(|n| n.starts_with("DCGM_")).collect();
        for name in &emitted {
            assert!(listed.contains(name), "{name} is emitted but not in dcgm-metrics.txt");
        }
        for name in &listed {
            assert!(emitted.contains(name), "{name} is listed but not emitted for a fully populated sample");
        }
        assert_eq!(emitted.len(), listed.len(), "each family is declared once: {emitted:?}");
        assert_eq!(metric_names(), listed, "dcgm-metrics.txt lists the families in rendering order");

        // The simulated source, fan and all, emits nothing outside the list either.
        let model = *crate::models::find("RTX 4090").expect("model");
        let mut source = SimulatedSource::new("host", model, 2, 7);
        source.set_load(0, 0.8);
        let text = render("host", &source.cards(), &source.sample(1_000));
        let simulated: Vec<&str> = families(&text).into_iter().filter(|n| n.starts_with("DCGM_")).collect();
        assert_eq!(simulated, emitted);
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let text = render("host", &[card(0)], &[Ok(full_sample(0))]);
        let mut declared: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split_whitespace().next().expect("name");
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("name and type");
                assert_eq!(declared.last(), Some(&name), "TYPE follows its HELP");
                assert!(kind == "gauge" || kind == "counter", "{line}");
            } else {
                let name = line.split('{').next().expect("name");
                assert_eq!(declared.last(), Some(&name), "a sample of {name} outside its family");
            }
        }
        for (name, kind) in [("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", "counter"), ("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", "counter"), ("DCGM_FI_DEV_GPU_TEMP", "gauge")] {
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name} is a {kind}");
        }
    }

    #[test]
    fn labels_and_units_are_dcgm_exporters() {
        let text = render("gpu-a", &[card(0)], &[Ok(full_sample(0))]);
        let labels = "gpu=\"0\",UUID=\"GPU-00000000-aaaa-bbbb-cccc-dddddddddddd\",pci_bus_id=\"00000000:3B:00.0\",\
                      device=\"nvidia0\",modelName=\"NVIDIA GeForce RTX 4090\",Hostname=\"gpu-a\",DCGM_FI_DRIVER_VERSION=\"550.54.15\"";
        for line in [
            format!("DCGM_FI_DEV_POWER_USAGE{{{labels}}} 312.5"),
            format!("DCGM_FI_DEV_FB_USED{{{labels}}} 20000"),
            format!("DCGM_FI_DEV_FB_FREE{{{labels}}} 4564"),
            format!("DCGM_FI_DEV_SM_CLOCK{{{labels}}} 2520"),
            format!("DCGM_FI_DEV_FAN_SPEED{{{labels}}} 64"),
            format!("DCGM_FI_PROF_PCIE_RX_BYTES{{{labels}}} 1024000"),
            format!("DCGM_FI_DEV_XID_ERRORS{{{labels},err_code=\"31\"}} 31"),
            "suanli_gpu_present{gpu=\"0\",uuid=\"GPU-00000000-aaaa-bbbb-cccc-dddddddddddd\",pci_bus_id=\"00000000:3B:00.0\",\
             device=\"nvidia0\",model_name=\"NVIDIA GeForce RTX 4090\",hostname=\"gpu-a\"} 1"
                .to_string(),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\nin\n{text}");
        }
        // dcgm-exporter leaves out an empty Hostname.
        let anonymous = render("", &[card(0)], &[Ok(full_sample(0))]);
        assert!(!anonymous.contains("Hostname=") && anonymous.contains("modelName=\"NVIDIA GeForce RTX 4090\",DCGM_FI_DRIVER_VERSION="));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut odd = card(0);
        odd.model = "A \"quoted\" \\ name\nsecond line".into();
        let text = render("h\\\"x", &[odd], &[Ok(full_sample(0))]);
        assert!(text.contains(r#"modelName="A \"quoted\" \\ name\nsecond line""#), "{text}");
        assert!(text.contains(r#"model_name="A \"quoted\" \\ name\nsecond line""#), "{text}");
        assert!(text.contains(r#"Hostname="h\\\"x""#) && text.contains(r#"hostname="h\\\"x""#), "{text}");
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        assert!(text.lines().all(|l| l.starts_with('#') || l.ends_with(|c: char| c.is_ascii_digit())), "one sample per line:\n{text}");
    }

    #[test]
    fn a_lost_card_reports_only_its_absence() {
        let model = *crate::models::find("A100 80GB").expect("model");
        let mut source = SimulatedSource::new("h", model, 2, 1);
        source.inject(1, Fault::FallenOffBus);
        let text = render("h", &source.cards(), &source.sample(1_000));
        let lost: Vec<&str> = text.lines().filter(|l| l.contains("gpu=\"1\"")).collect();
        assert_eq!(lost.len(), 1, "only presence for the lost card: {lost:?}");
        assert!(lost[0].starts_with("suanli_gpu_present{") && lost[0].ends_with(" 0"), "{lost:?}");
        assert!(text.contains("DCGM_FI_DEV_GPU_TEMP{gpu=\"0\""), "the other card still reports");
        assert!(!text.contains("DCGM_FI_DEV_FAN_SPEED"), "A100s report no fan");
    }

    #[test]
    fn unsampled_unreadable_and_no_cards_stay_valid() {
        assert_eq!(render("h", &[], &[]), "", "no cards, no families");
        let unreadable = Err(CardError::Unreadable { index: 1, reason: "timeout".into() });
        let text = render("h", &[card(0), card(1), card(2)], &[Ok(full_sample(0)), unreadable]);
        assert!(!text.contains("gpu=\"1\",UUID") && !text.contains("gpu=\"2\",UUID"), "no values without a sample:\n{text}");
        let present: Vec<&str> = text.lines().filter(|l| l.starts_with("suanli_gpu_present{")).collect();
        assert_eq!(present.len(), 3);
        assert!(present.iter().all(|l| l.ends_with(" 1")), "unreadable or unsampled is not lost: {present:?}");
        let only_lost = render("h", &[card(0)], &[Err(CardError::FallenOffBus(0))]);
        assert_eq!(families(&only_lost), ["suanli_gpu_present"]);
    }

    #[test]
    fn the_xid_value_is_the_last_code_seen_and_latches_as_dcgms_does() {
        let cards = [card(0), card(1)];
        let mut quiet = full_sample(0);
        quiet.xid_events.clear();
        let xid_line = |text: &str, gpu: u32| -> String {
            text.lines().find(|l| l.starts_with(&format!("{XID_ERRORS}{{gpu=\"{gpu}\""))).expect("an XID line").to_string()
        };

        let mut latch = XidLatch::default();
        let first = [Ok(full_sample(0)), Ok(quiet.clone())];
        latch.observe(&first);
        let text = render_latched("h", &cards, &first, &latch);
        assert!(xid_line(&text, 0).ends_with(",err_code=\"31\"} 31"), "{text}");
        assert!(xid_line(&text, 1).ends_with(",err_code=\"0\"} 0"), "none yet is 0: {text}");

        // Later samples raise nothing new: DCGM keeps reporting 31.
        let second = [Ok(quiet.clone()), Ok(quiet.clone())];
        latch.observe(&second);
        assert_eq!(latch.last(0), 31);
        assert!(xid_line(&render_latched("h", &cards, &second, &latch), 0).ends_with(" 31"));
        assert!(xid_line(&render("h", &cards, &second), 0).ends_with(" 0"), "without the latch only the latest sample counts");

        // A lost card keeps its latch; a new XID replaces it.
        latch.observe(&[Err(CardError::FallenOffBus(0)), Ok(quiet)]);
        assert_eq!(latch.last(0), 31);
        let mut storm = full_sample(0);
        storm.xid_events = vec![48, 63, 94];
        latch.observe(&[Ok(storm)]);
        assert_eq!((latch.last(0), latch.last(1), latch.last(7)), (94, 0, 0));
    }
}
