//! A simulated GPU source with load-driven dynamics and injectable faults — the demo stand-in
//! for a GPU where no NVIDIA driver exists.
//!
//! Each card follows a target load (set by the caller, e.g. from the jobs placed on it).
//! Utilization moves towards it with some noise; power follows utilization between the
//! model's idle draw and its limit; temperature relaxes towards ambient plus a term
//! proportional to power with a thermal time constant, so it lags the load as a real card's
//! does; the clock drops once the card passes its slowdown temperature. Randomness comes from
//! a seeded generator and time from the caller, so a run can be replayed exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::models::GpuModel;
use crate::{CardError, CardInfo, CardSample, GpuSource};

const AMBIENT_C: f64 = 30.0;
/// Degrees above ambient per watt at steady state with working cooling.
const HEATING_C_PER_W: f64 = 0.11;
/// Extra degrees at steady state when the cooling has failed.
const COOLING_FAILURE_C: f64 = 45.0;
const THERMAL_TIME_CONSTANT_S: f64 = 40.0;
const UTILIZATION_TIME_CONSTANT_S: f64 = 3.0;

/// Faults a test or demo can inject into one card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The card stops answering (XID 79); samples are `CardError::FallenOffBus`.
    FallenOffBus,
    /// The cooling fails: the card heats far beyond its slowdown temperature under load.
    Overheat,
    /// The card reports a burst of hardware XID errors (48, 63, 94) on every sample.
    XidStorm,
}

struct Card {
    info: CardInfo,
    model: GpuModel,
    target_load: f64,
    utilization: f64,
    temperature_c: f64,
    ecc_corrected: u64,
    fault: Option<Fault>,
    last_at_ms: Option<i64>,
}

pub struct SimulatedSource {
    cards: Vec<Card>,
    rng: StdRng,
}

impl SimulatedSource {
    /// `count` cards of `model` on a node called `host`; `seed` makes the run repeatable.
    pub fn new(host: &str, model: GpuModel, count: u32, seed: u64) -> Self {
        let cards = (0..count)
            .map(|index| Card {
                info: CardInfo {
                    index,
                    uuid: format!("GPU-sim-{host}-{index:02}"),
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index * 0x10),
                    model: format!("NVIDIA {} (simulated)", model.name),
                    vram_mib: model.vram_mib,
                    power_limit_mw: model.power_limit_w * 1000,
                    driver_version: "550.54.15-sim".into(),
                    cuda_version: "12.4".into(),
                },
                model,
                target_load: 0.0,
                utilization: 0.0,
                temperature_c: AMBIENT_C + HEATING_C_PER_W * model.idle_power_w as f64,
                ecc_corrected: 0,
                fault: None,
                last_at_ms: None,
            })
            .collect();
        SimulatedSource { cards, rng: StdRng::seed_from_u64(seed) }
    }

    /// Sets a card's target load, 0.0 (idle) to 1.0 (flat out).
    pub fn set_load(&mut self, index: u32, load: f64) {
        if let Some(card) = self.cards.get_mut(index as usize) {
            card.target_load = load.clamp(0.0, 1.0);
        }
    }

    pub fn inject(&mut self, index: u32, fault: Fault) {
        if let Some(card) = self.cards.get_mut(index as usize) {
            card.fault = Some(fault);
        }
    }

    /// Repairs a card: it answers again, cools normally, and stops reporting XIDs.
    pub fn clear(&mut self, index: u32) {
        if let Some(card) = self.cards.get_mut(index as usize) {
            card.fault = None;
        }
    }
}

fn relax(current: f64, target: f64, dt_s: f64, tau_s: f64) -> f64 {
    target + (current - target) * (-dt_s / tau_s).exp()
}

impl GpuSource for SimulatedSource {
    fn cards(&self) -> Vec<CardInfo> {
        self.cards.iter().map(|c| c.info.clone()).collect()
    }

    fn sample(&mut self, at_ms: i64) -> Vec<Result<CardSample, CardError>> {
        let rng = &mut self.rng;
        self.cards
            .iter_mut()
            .map(|card| {
                let dt_s = card.last_at_ms.map_or(1.0, |last| ((at_ms - last) as f64 / 1000.0).max(0.0));
                card.last_at_ms = Some(at_ms);
                let m = card.model;

                // The card keeps running (and heating) while it is unreadable.
                let noise: f64 = rng.random_range(-0.03..0.03);
                let target = (card.target_load + noise * card.target_load.min(1.0)).clamp(0.0, 1.0);
                card.utilization = relax(card.utilization, target, dt_s, UTILIZATION_TIME_CONSTANT_S).clamp(0.0, 1.0);
                let throttled = card.temperature_c >= m.slowdown_temp_c as f64;
                let clock_factor = if throttled { 0.6 } else { 1.0 };
                let power_w = m.idle_power_w as f64 + (m.power_limit_w - m.idle_power_w) as f64 * card.utilization.powf(0.9) * clock_factor;
                let cooling = if card.fault == Some(Fault::Overheat) { COOLING_FAILURE_C } else { 0.0 };
                let steady_c = AMBIENT_C + HEATING_C_PER_W * power_w + cooling * (0.3 + card.utilization);
                card.temperature_c = relax(card.temperature_c, steady_c, dt_s, THERMAL_TIME_CONSTANT_S);

                if card.fault == Some(Fault::FallenOffBus) {
                    return Err(CardError::FallenOffBus(card.info.index));
                }
                if rng.random_bool(0.001 * dt_s.min(60.0)) {
                    card.ecc_corrected += 1;
                }
                // Hardware XIDs (double-bit ECC, row remapping, uncontained ECC): a failing card.
                let xid_events = if card.fault == Some(Fault::XidStorm) { vec![48, 63, 94] } else { Vec::new() };
                let u = card.utilization;
                Ok(CardSample {
                    index: card.info.index,
                    at_ms,
                    gpu_utilization_pct: (u * 100.0).round() as u32,
                    memory_utilization_pct: (u * 70.0).round() as u32,
                    memory_used_mib: (m.vram_mib as f64 * (0.02 + 0.9 * u)) as u64,
                    temperature_c: card.temperature_c.round() as u32,
                    power_draw_mw: (power_w * 1000.0) as u32,
                    power_limit_mw: m.power_limit_w * 1000,
                    sm_clock_mhz: ((210.0 + (m.max_sm_clock_mhz as f64 - 210.0) * u.sqrt()) * clock_factor) as u32,
                    memory_clock_mhz: if u > 0.01 { m.max_memory_clock_mhz } else { 405 },
                    fan_pct: m.has_fan.then(|| (30.0 + 70.0 * ((card.temperature_c - AMBIENT_C) / 60.0).clamp(0.0, 1.0)) as u32),
                    ecc_corrected: card.ecc_corrected,
                    ecc_uncorrected: 0,
                    xid_events,
                    pcie_rx_kbps: (m.pcie_max_kbps as f64 * 0.2 * u) as u32,
                    pcie_tx_kbps: (m.pcie_max_kbps as f64 * 0.05 * u) as u32,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models;

    fn a100() -> GpuModel {
        *models::find("A100 80GB").expect("model")
    }

    /// Samples every second for `seconds`, returning the last sample of card `index`.
    fn run(source: &mut SimulatedSource, from_ms: i64, seconds: i64, index: usize) -> Result<CardSample, CardError> {
        let mut last = None;
        for s in 1..=seconds {
            last = Some(source.sample(from_ms + s * 1000).swap_remove(index));
        }
        last.expect("at least one sample")
    }

    #[test]
    fn load_drives_utilization_power_and_a_lagging_temperature() {
        let mut src = SimulatedSource::new("n1", a100(), 2, 7);
        let idle = run(&mut src, 0, 60, 0).expect("sample");
        assert!(idle.gpu_utilization_pct <= 1 && idle.power_draw_mw <= 60_000, "{idle:?}");
        src.set_load(0, 1.0);
        let after_5s = run(&mut src, 60_000, 5, 0).expect("sample");
        let after_5min = run(&mut src, 65_000, 300, 0).expect("sample");
        assert!(after_5s.gpu_utilization_pct >= 75, "{after_5s:?}");
        assert!(after_5s.temperature_c < after_5min.temperature_c, "temperature lags the load");
        assert!(after_5min.power_draw_mw <= after_5min.power_limit_mw);
        assert!(after_5min.power_draw_mw >= 350_000, "{after_5min:?}");
        assert!(after_5min.temperature_c < a100().slowdown_temp_c, "healthy cooling keeps it below slowdown: {after_5min:?}");
        assert_eq!(after_5min.fan_pct, None, "an A100 is passively cooled");
        let other = run(&mut src, 365_000, 1, 1).expect("sample");
        assert!(other.gpu_utilization_pct <= 1, "the other card stayed idle");
    }

    #[test]
    fn injected_faults_show_and_clear() {
        let mut src = SimulatedSource::new("n1", a100(), 3, 1);
        (0..3).for_each(|i| src.set_load(i, 1.0));
        src.inject(0, Fault::FallenOffBus);
        src.inject(1, Fault::Overheat);
        src.inject(2, Fault::XidStorm);
        let samples = src.sample(1000);
        assert_eq!(samples[0], Err(CardError::FallenOffBus(0)));
        assert!(!samples[2].as_ref().expect("readable").xid_events.is_empty());
        let hot = run(&mut src, 1000, 300, 1).expect("readable");
        assert!(hot.temperature_c > a100().slowdown_temp_c, "failed cooling overheats: {hot:?}");
        assert!(hot.sm_clock_mhz < a100().max_sm_clock_mhz, "and the clock slows down");
        src.clear(0);
        assert!(src.sample(302_000)[0].is_ok(), "a repaired card answers again");
    }

    #[test]
    fn a_seed_replays_exactly() {
        let mut a = SimulatedSource::new("n1", a100(), 4, 42);
        let mut b = SimulatedSource::new("n1", a100(), 4, 42);
        for s in [0, 1000, 2000] {
            a.set_load(1, 0.5);
            b.set_load(1, 0.5);
            assert_eq!(a.sample(s), b.sample(s));
        }
        assert_eq!(a.cards()[3].uuid, "GPU-sim-n1-03");
    }
}
