//! GPU telemetry, independent of where it comes from.
//!
//! A [`GpuSource`] describes its cards once ([`CardInfo`]) and then answers samples
//! ([`CardSample`]) per card, or an error for a card that cannot be read (fallen off the bus).
//! The simulated source ([`simulated::SimulatedSource`]) stands in for a GPU in demos and
//! tests; the NVML source ([`nvml::NvmlSource`]) reads a real driver through `nvml-wrapper`,
//! loading `libnvidia-ml` at run time (tested against a stand-in library, `tests/fake-nvml`).
//!
//! No clock is read here: callers pass the time of each sample, so sources are deterministic
//! under test.

pub mod dcgm;
pub mod models;
pub mod nvml;
pub mod simulated;

use serde::{Deserialize, Serialize};

/// What a card is: the inventory a listing needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardInfo {
    pub index: u32,
    pub uuid: String,
    pub pci_bus_id: String,
    pub model: String,
    pub vram_mib: u64,
    pub power_limit_mw: u32,
    pub driver_version: String,
    pub cuda_version: String,
}

/// One reading of one card. Power stands in for the seed's "voltage": NVML has no voltage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CardSample {
    pub index: u32,
    pub at_ms: i64,
    pub gpu_utilization_pct: u32,
    pub memory_utilization_pct: u32,
    pub memory_used_mib: u64,
    pub temperature_c: u32,
    pub power_draw_mw: u32,
    pub power_limit_mw: u32,
    pub sm_clock_mhz: u32,
    pub memory_clock_mhz: u32,
    /// `None` for passively cooled data-centre cards, which report no fan.
    pub fan_pct: Option<u32>,
    pub ecc_corrected: u64,
    pub ecc_uncorrected: u64,
    /// XID events since the previous sample.
    pub xid_events: Vec<u32>,
    pub pcie_rx_kbps: u32,
    pub pcie_tx_kbps: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CardError {
    /// The driver lost the card (NVML `GPU_IS_LOST`, XID 79).
    #[error("card {0} has fallen off the bus")]
    FallenOffBus(u32),
    #[error("card {index} could not be read: {reason}")]
    Unreadable { index: u32, reason: String },
}

/// Where samples come from.
pub trait GpuSource: Send {
    fn cards(&self) -> Vec<CardInfo>;
    /// One sample per card, in card order, taken at `at_ms` (milliseconds since the epoch).
    fn sample(&mut self, at_ms: i64) -> Vec<Result<CardSample, CardError>>;
}
