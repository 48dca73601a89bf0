//! The real GPU source: NVIDIA's NVML through `nvml-wrapper`, loaded at run time.
//!
//! Nothing links against the driver: `libnvidia-ml.so.1` is opened when the agent starts, so
//! the same binary runs on machines without a GPU (and says so once). Readings NVML does not
//! support on a card (fans on passively cooled boards, ECC on consumer cards) are left out;
//! a card NVML reports lost (`GPU_IS_LOST`, XID 79) is [`CardError::FallenOffBus`], and any
//! other failed reading makes that card's sample [`CardError::Unreadable`]. XID errors
//! arrive through an NVML event set registered for critical XIDs and are drained, without
//! waiting, at every sample.

use std::collections::BTreeMap;
use std::path::Path;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::{Device, Nvml};

use crate::{CardError, CardInfo, CardSample, GpuSource};

/// XID events taken per sample at most; a storm beyond that waits for the next sample.
const MAX_EVENTS_PER_SAMPLE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum NvmlOpenError {
    #[error("NVIDIA driver library not found: {0}")]
    NotFound(String),
    #[error("NVIDIA driver library did not initialise: {0}")]
    Init(String),
}

pub struct NvmlSource {
    /// Leaked on purpose: devices and event sets borrow the library for its whole life, and
    /// a source lives as long as the agent.
    nvml: &'static Nvml,
    xid_events: Option<EventSet<'static>>,
    cards: Vec<CardInfo>,
    unidentified: Vec<CardError>,
}

impl NvmlSource {
    /// Loads NVML from `lib_path`, or from the system's `libnvidia-ml.so.1`.
    pub fn open(lib_path: Option<&Path>) -> Result<NvmlSource, NvmlOpenError> {
        let mut builder = Nvml::builder();
        if let Some(path) = lib_path {
            builder.lib_path(path.as_os_str());
        }
        let nvml = builder.init().map_err(|e| match e {
            NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
                let what = lib_path.map_or_else(|| "libnvidia-ml.so.1".to_owned(), |p| p.display().to_string());
                NvmlOpenError::NotFound(format!("{what}: {e}"))
            }
            other => NvmlOpenError::Init(other.to_string()),
        })?;
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let driver_version = nvml.sys_driver_version().unwrap_or_default();
        let cuda_version = nvml.sys_cuda_driver_version().map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10)).unwrap_or_default();
        let count = nvml.device_count().map_err(|e| NvmlOpenError::Init(e.to_string()))?;
        let mut xid_events = nvml.create_event_set().ok();
        let mut cards = Vec::with_capacity(count as usize);
        let mut unidentified = Vec::new();
        for index in 0..count {
            // A card already lost when the agent starts has no identity to list; the others
            // still do.
            let identified = nvml.device_by_index(index).and_then(|device| Ok((device.uuid()?, device)));
            let (uuid, device) = match identified {
                Ok(found) => found,
                Err(e) => {
                    unidentified.push(card_error(index, e));
                    continue;
                }
            };
            cards.push(CardInfo {
                index,
                uuid,
                pci_bus_id: device.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                model: device.name().unwrap_or_default(),
                vram_mib: device.memory_info().map(|m| m.total >> 20).unwrap_or(0),
                power_limit_mw: device.enforced_power_limit().unwrap_or(0),
                driver_version: driver_version.clone(),
                cuda_version: cuda_version.clone(),
            });
            xid_events = xid_events.and_then(|set| watch_xids(&device, set));
        }
        if cards.is_empty() {
            // Nothing readable at all (no permission on the device nodes, say) is a broken
            // driver setup, not an empty node.
            if let Some(first) = unidentified.first() {
                return Err(NvmlOpenError::Init(first.to_string()));
            }
        }
        Ok(NvmlSource { nvml, xid_events, cards, unidentified })
    }

    /// Cards NVML counts but that could not be identified at open (fallen off the bus before
    /// the agent started, say): they are left out of [`GpuSource::cards`] and of samples.
    pub fn unidentified(&self) -> &[CardError] {
        &self.unidentified
    }

    /// XIDs reported since the last call, by card index.
    fn drain_xids(&self) -> BTreeMap<u32, Vec<u32>> {
        let mut xids: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        let Some(set) = &self.xid_events else { return xids };
        for _ in 0..MAX_EVENTS_PER_SAMPLE {
            let Ok(event) = set.wait(0) else { break };
            if let (Ok(index), Some(XidError::Value(xid))) = (event.device.index(), event.event_data) {
                xids.entry(index).or_default().push(u32::try_from(xid).unwrap_or(u32::MAX));
            }
        }
        xids
    }

    fn read(&self, index: u32, at_ms: i64, xid_events: Vec<u32>) -> Result<CardSample, CardError> {
        let lost = |e: NvmlError| card_error(index, e);
        let device = self.nvml.device_by_index(index).map_err(lost)?;
        let utilization = device.utilization_rates().map_err(lost)?;
        let memory = device.memory_info().map_err(lost)?;
        let temperature_c = device.temperature(TemperatureSensor::Gpu).map_err(lost)?;
        let power_draw_mw = device.power_usage().map_err(lost)?;
        Ok(CardSample {
            index,
            at_ms,
            gpu_utilization_pct: utilization.gpu,
            memory_utilization_pct: utilization.memory,
            memory_used_mib: memory.used >> 20,
            temperature_c,
            power_draw_mw,
            power_limit_mw: optional(index, device.enforced_power_limit())?.unwrap_or(0),
            sm_clock_mhz: optional(index, device.clock_info(Clock::SM))?.unwrap_or(0),
            memory_clock_mhz: optional(index, device.clock_info(Clock::Memory))?.unwrap_or(0),
            fan_pct: optional(index, device.fan_speed(0))?,
            ecc_corrected: optional(index, device.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile))?.unwrap_or(0),
            ecc_uncorrected: optional(index, device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile))?.unwrap_or(0),
            xid_events,
            pcie_rx_kbps: optional(index, device.pcie_throughput(PcieUtilCounter::Receive))?.unwrap_or(0),
            pcie_tx_kbps: optional(index, device.pcie_throughput(PcieUtilCounter::Send))?.unwrap_or(0),
        })
    }
}

/// Registers `device` for critical XID events in `set`; a card that cannot report them keeps
/// the set for the others. `None` only if registering broke the set.
fn watch_xids(device: &Device<'static>, set: EventSet<'static>) -> Option<EventSet<'static>> {
    match device.supported_event_types() {
        Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => device.register_events(EventTypes::CRITICAL_XID_ERROR, set).ok(),
        _ => Some(set),
    }
}

fn card_error(index: u32, e: NvmlError) -> CardError {
    match e {
        NvmlError::GpuLost => CardError::FallenOffBus(index),
        other => CardError::Unreadable { index, reason: other.to_string() },
    }
}

/// A reading the card may not support: `None` when NVML says it does not (`NOT_SUPPORTED`;
/// an older driver without the function; `INVALID_ARGUMENT` for fan 0 of a fanless card);
/// any other failure is the card's, as for a required reading.
fn optional<T>(index: u32, reading: Result<T, NvmlError>) -> Result<Option<T>, CardError> {
    match reading {
        Ok(value) => Ok(Some(value)),
        Err(NvmlError::NotSupported | NvmlError::VgpuEccNotSupported | NvmlError::FailedToLoadSymbol(_) | NvmlError::InvalidArg) => Ok(None),
        Err(e) => Err(card_error(index, e)),
    }
}

impl GpuSource for NvmlSource {
    fn cards(&self) -> Vec<CardInfo> {
        self.cards.clone()
    }

    fn sample(&mut self, at_ms: i64) -> Vec<Result<CardSample, CardError>> {
        let mut xids = self.drain_xids();
        self.cards.iter().map(|card| self.read(card.index, at_ms, xids.remove(&card.index).unwrap_or_default())).collect()
    }
}
