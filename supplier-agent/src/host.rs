//! Facts about the host from `/proc` and `statvfs`: what enrollment reports once (CPU, memory,
//! disks, OS) and the node metrics sampled with every GPU sample (CPU, load, memory, disk,
//! network traffic).

use std::path::Path;

/// What a listing needs to know about the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub hostname: String,
    pub cpu_model: String,
    pub vcpus: u32,
    pub memory_gib: u32,
    pub disk_gib: u64,
    pub os: String,
}

pub fn facts(hostname_override: Option<&str>) -> HostFacts {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())).unwrap_or_default();
    let vcpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count().max(1) as u32;
    let memory = meminfo(&read("/proc/meminfo"));
    let hostname = hostname_override.map(str::to_owned).unwrap_or_else(|| read("/proc/sys/kernel/hostname").trim().to_owned());
    HostFacts {
        hostname,
        cpu_model,
        vcpus,
        memory_gib: (memory.total_kib / (1024 * 1024)).max(1) as u32,
        disk_gib: disk("/").map_or(0, |d| d.total_bytes >> 30),
        os: os_release(&read("/etc/os-release")),
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn os_release(text: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_owned()).unwrap_or_else(|| "Linux".into())
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub total_kib: u64,
    pub available_kib: u64,
}

pub fn meminfo(text: &str) -> Memory {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory { total_kib: field("MemTotal"), available_kib: field("MemAvailable") }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Disk {
    pub total_bytes: u64,
    pub used_bytes: u64,
}

pub fn disk(mount: impl AsRef<Path>) -> Option<Disk> {
    let st = rustix::fs::statvfs(mount.as_ref()).ok()?;
    let total = st.f_blocks.saturating_mul(st.f_frsize);
    let free = st.f_bfree.saturating_mul(st.f_frsize);
    Some(Disk { total_bytes: total, used_bytes: total.saturating_sub(free) })
}

/// CPU time counters of the `cpu` line of `/proc/stat`: (busy, total) in jiffies.
pub fn cpu_times(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    if values.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal: idle and iowait are not busy.
    let total: u64 = values.iter().take(8).sum();
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Received and sent bytes over every interface but loopback, from `/proc/net/dev`.
pub fn net_bytes(dev: &str) -> (u64, u64) {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .filter(|(name, _)| name.trim() != "lo")
        .map(|(_, rest)| {
            let v: Vec<u64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            (v.first().copied().unwrap_or(0), v.get(8).copied().unwrap_or(0))
        })
        .fold((0, 0), |(rx, tx), (r, t)| (rx + r, tx + t))
}

/// Samples the node's own metrics; keeps the previous CPU counters to report utilization
/// over the interval.
#[derive(Default)]
pub struct NodeSampler {
    previous_cpu: Option<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeReading {
    pub cpu_utilization_permille: u32,
    pub load1_centi: u32,
    pub memory_used_mib: u64,
    pub memory_total_mib: u64,
    pub disk_used_gib: u64,
    pub disk_total_gib: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

impl NodeSampler {
    pub fn sample(&mut self) -> NodeReading {
        let cpu = cpu_times(&read("/proc/stat"));
        let cpu_utilization_permille = match (self.previous_cpu, cpu) {
            (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => ((busy1.saturating_sub(busy0)) * 1000 / (total1 - total0)).min(1000) as u32,
            _ => 0,
        };
        self.previous_cpu = cpu;
        let load1 = read("/proc/loadavg").split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let memory = meminfo(&read("/proc/meminfo"));
        let disk = disk("/").unwrap_or_default();
        let (net_rx_bytes, net_tx_bytes) = net_bytes(&read("/proc/net/dev"));
        NodeReading {
            cpu_utilization_permille,
            load1_centi: (load1 * 100.0).round() as u32,
            memory_used_mib: memory.total_kib.saturating_sub(memory.available_kib) / 1024,
            memory_total_mib: memory.total_kib / 1024,
            disk_used_gib: disk.used_bytes >> 30,
            disk_total_gib: disk.total_bytes >> 30,
            net_rx_bytes,
            net_tx_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(cpu_times(stat), Some((150, 1000)));
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 999 1 0 0 0 0 0 0 999 1 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n";
        assert_eq!(net_bytes(dev), (1000, 2000));
        let mem = meminfo("MemTotal:       16384000 kB\nMemFree: 1 kB\nMemAvailable:    8192000 kB\n");
        assert_eq!(mem, Memory { total_kib: 16_384_000, available_kib: 8_192_000 });
        assert_eq!(os_release("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n"), "Debian GNU/Linux 12 (bookworm)");
    }

    #[test]
    fn this_host_has_facts() {
        let facts = facts(None);
        assert!(facts.vcpus >= 1 && facts.memory_gib >= 1 && !facts.hostname.is_empty());
        let mut sampler = NodeSampler::default();
        sampler.sample();
        let reading = sampler.sample();
        assert!(reading.memory_total_mib > 0 && reading.cpu_utilization_permille <= 1000);
    }
}
