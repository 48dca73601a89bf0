//! Which GPUs the agent reads: the NVIDIA driver through NVML, or the simulated source.

use suanli_telemetry::nvml::NvmlSource;
use suanli_telemetry::simulated::SimulatedSource;
use suanli_telemetry::{CardError, CardInfo, CardSample, GpuSource};

use crate::config::{AgentConfig, SourceKind};

pub enum Gpus {
    Nvml(NvmlSource),
    /// Simulated cards can be driven (load) and broken (faults) through the agent's
    /// `/simulated` endpoints, for demos and tests.
    Simulated(Box<SimulatedSource>),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0} (set source = \"simulated\" or fallback_to_simulated = true to run without a GPU)")]
    NoDriver(String),
}

impl Gpus {
    pub fn open(config: &AgentConfig, hostname: &str) -> Result<Gpus, SourceError> {
        let simulated = || {
            let model = suanli_telemetry::models::find(&config.simulated.model).copied().unwrap_or(suanli_telemetry::models::MODELS[0]);
            let mut source = SimulatedSource::new(hostname, model, config.simulated.cards, config.simulated.seed);
            for index in 0..config.simulated.cards {
                source.set_load(index, config.simulated.load);
            }
            Gpus::Simulated(Box::new(source))
        };
        match config.source {
            SourceKind::Simulated => Ok(simulated()),
            SourceKind::Nvml => match NvmlSource::open(config.nvml_library.as_deref()) {
                Ok(nvml) => {
                    for problem in nvml.unidentified() {
                        tracing::error!(%problem, "a card could not be identified at start and is left out of the inventory");
                    }
                    Ok(Gpus::Nvml(nvml))
                }
                Err(e) if config.fallback_to_simulated => {
                    tracing::warn!(error = %e, "no NVIDIA driver: using simulated GPUs as configured");
                    Ok(simulated())
                }
                Err(e) => Err(SourceError::NoDriver(e.to_string())),
            },
        }
    }

    pub fn simulated(&mut self) -> Option<&mut SimulatedSource> {
        match self {
            Gpus::Simulated(s) => Some(s),
            Gpus::Nvml(_) => None,
        }
    }
}

impl GpuSource for Gpus {
    fn cards(&self) -> Vec<CardInfo> {
        match self {
            Gpus::Nvml(s) => s.cards(),
            Gpus::Simulated(s) => s.cards(),
        }
    }

    fn sample(&mut self, at_ms: i64) -> Vec<Result<CardSample, CardError>> {
        match self {
            Gpus::Nvml(s) => s.sample(at_ms),
            Gpus::Simulated(s) => s.sample(at_ms),
        }
    }
}
