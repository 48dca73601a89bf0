//! Real GPU models the simulated source can impersonate, with their published figures.

/// A model's fixed figures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuModel {
    pub name: &'static str,
    pub vram_mib: u64,
    /// Board power limit (TDP), watts.
    pub power_limit_w: u32,
    /// Draw when idle, watts.
    pub idle_power_w: u32,
    pub max_sm_clock_mhz: u32,
    pub max_memory_clock_mhz: u32,
    /// The driver slows the card down above this temperature.
    pub slowdown_temp_c: u32,
    /// Passively cooled data-centre cards report no fan speed.
    pub has_fan: bool,
    /// Host link generation × lanes, for PCIe throughput ceilings.
    pub pcie_max_kbps: u32,
}

pub const MODELS: &[GpuModel] = &[
    GpuModel {
        name: "A100 80GB",
        vram_mib: 81_920,
        power_limit_w: 400,
        idle_power_w: 55,
        max_sm_clock_mhz: 1410,
        max_memory_clock_mhz: 1593,
        slowdown_temp_c: 85,
        has_fan: false,
        pcie_max_kbps: 31_500_000,
    },
    GpuModel {
        name: "H100 80GB",
        vram_mib: 81_559,
        power_limit_w: 700,
        idle_power_w: 70,
        max_sm_clock_mhz: 1980,
        max_memory_clock_mhz: 2619,
        slowdown_temp_c: 87,
        has_fan: false,
        pcie_max_kbps: 63_000_000,
    },
    GpuModel {
        name: "H800",
        vram_mib: 81_559,
        power_limit_w: 700,
        idle_power_w: 70,
        max_sm_clock_mhz: 1980,
        max_memory_clock_mhz: 2619,
        slowdown_temp_c: 87,
        has_fan: false,
        pcie_max_kbps: 63_000_000,
    },
    GpuModel {
        name: "L40S",
        vram_mib: 46_068,
        power_limit_w: 350,
        idle_power_w: 35,
        max_sm_clock_mhz: 2520,
        max_memory_clock_mhz: 9001,
        slowdown_temp_c: 88,
        has_fan: false,
        pcie_max_kbps: 31_500_000,
    },
    GpuModel {
        name: "RTX 4090",
        vram_mib: 24_564,
        power_limit_w: 450,
        idle_power_w: 20,
        max_sm_clock_mhz: 2520,
        max_memory_clock_mhz: 10_501,
        slowdown_temp_c: 90,
        has_fan: true,
        pcie_max_kbps: 31_500_000,
    },
    GpuModel {
        name: "A10",
        vram_mib: 23_028,
        power_limit_w: 150,
        idle_power_w: 15,
        max_sm_clock_mhz: 1695,
        max_memory_clock_mhz: 6251,
        slowdown_temp_c: 90,
        has_fan: false,
        pcie_max_kbps: 31_500_000,
    },
    GpuModel {
        name: "V100 32GB",
        vram_mib: 32_768,
        power_limit_w: 300,
        idle_power_w: 40,
        max_sm_clock_mhz: 1530,
        max_memory_clock_mhz: 877,
        slowdown_temp_c: 83,
        has_fan: false,
        pcie_max_kbps: 15_750_000,
    },
];

/// Finds a model by name, ignoring case, spaces and a leading "NVIDIA".
pub fn find(name: &str) -> Option<&'static GpuModel> {
    let norm = |s: &str| {
        let s = s.trim().to_ascii_lowercase();
        let s = s.strip_prefix("nvidia").unwrap_or(&s).to_owned();
        s.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>()
    };
    let wanted = norm(name);
    MODELS.iter().find(|m| norm(m.name) == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_consistent() {
        for m in MODELS {
            assert!(m.idle_power_w < m.power_limit_w, "{}", m.name);
            assert!(m.vram_mib >= 16 * 1024, "{}", m.name);
            assert!((80..=95).contains(&m.slowdown_temp_c), "{}", m.name);
        }
    }

    #[test]
    fn models_are_found_by_loose_names() {
        assert_eq!(find("NVIDIA A100 80GB").map(|m| m.name), Some("A100 80GB"));
        assert_eq!(find("rtx4090").map(|m| m.name), Some("RTX 4090"));
        assert!(find("GeForce 256").is_none());
    }
}
