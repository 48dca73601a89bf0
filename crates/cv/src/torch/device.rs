//! Which device a job runs on, and making CUDA reachable without depending on it.
//!
//! The linker drops `libtorch_cuda.so` from our binaries (nothing references its symbols
//! directly; tch-rs issues #980, #907), so libtorch never registers its CUDA backend and
//! `Cuda::is_available()` says no even on a GPU machine. Linking it with `--no-as-needed` would
//! fix that but make every CUDA library a start-up requirement, and the same binary must start
//! on CPU-only hosts. So it is loaded at run time: when present and loadable, CUDA works; when
//! not, we stay on CPU and say why.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use tch::Device;

/// What a job asks for in its spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DevicePreference {
    /// CUDA when it can be loaded and a card is visible, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// How loading the CUDA backend went (once per process).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum CudaBackend {
    Loaded {
        devices: usize,
    },
    /// The library loaded but no device is visible (`CUDA_VISIBLE_DEVICES`, no driver).
    NoDevice,
    /// `libtorch_cuda.so` is absent or one of its CUDA libraries is missing.
    Unavailable {
        reason: String,
    },
}

static BACKEND: OnceLock<CudaBackend> = OnceLock::new();

/// Loads `libtorch_cuda.so` once, searched the way the dynamic linker searches
/// (`LD_LIBRARY_PATH`, then our binary's run path, which points at the build's libtorch).
pub fn cuda_backend() -> &'static CudaBackend {
    BACKEND.get_or_init(|| {
        // SAFETY: loading a shared library runs its initializers; libtorch_cuda's only register
        // the CUDA backend with the libtorch already loaded in this process. The handle is
        // leaked on purpose: the backend must stay registered for the process's lifetime.
        #[allow(unsafe_code)]
        let loaded = unsafe { libloading::os::unix::Library::open(Some("libtorch_cuda.so"), libc_flags()) };
        match loaded {
            Ok(lib) => {
                std::mem::forget(lib);
                match tch::Cuda::device_count() {
                    0 => CudaBackend::NoDevice,
                    n => CudaBackend::Loaded { devices: n as usize },
                }
            }
            Err(e) => CudaBackend::Unavailable { reason: e.to_string() },
        }
    })
}

fn libc_flags() -> std::os::raw::c_int {
    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL
}

#[derive(Debug, thiserror::Error)]
#[error("CUDA was asked for but cannot be used: {0}")]
pub struct NoCuda(pub String);

/// The devices a job gets: every visible CUDA card for `Auto`/`Cuda` when CUDA works,
/// otherwise one CPU device (or `replicas` CPU devices, for data-parallel tests and CPU runs).
pub fn select(pref: DevicePreference, replicas: usize) -> Result<Vec<Device>, NoCuda> {
    let cpus = || vec![Device::Cpu; replicas.max(1)];
    match (pref, cuda_backend()) {
        (DevicePreference::Cpu, _) => Ok(cpus()),
        (_, CudaBackend::Loaded { devices }) => Ok((0..*devices).map(Device::Cuda).collect()),
        (DevicePreference::Auto, _) => Ok(cpus()),
        (DevicePreference::Cuda, CudaBackend::NoDevice) => Err(NoCuda("no CUDA device is visible".into())),
        (DevicePreference::Cuda, CudaBackend::Unavailable { reason }) => Err(NoCuda(reason.clone())),
    }
}
