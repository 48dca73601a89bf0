//! A control group per lease: every session and job of the lease starts inside it (root moves
//! the forked child in before its program runs, `sandbox.rs`, so nothing it forks can be
//! outside), its processes, memory and CPU are capped ([`Limits`], in proportion to its share
//! of the node's cards), and at the lease's end the group is frozen, everything in it killed,
//! and the group removed. Killing by user ID (`accounts::kill_all`) still follows, for
//! anything the group missed. The group's files stay root's: the lease cannot move processes
//! in or out, nor raise its limits.
//!
//! cgroup v2 (the unified hierarchy at `/sys/fs/cgroup`, controllers enabled for the agent's
//! subtree) where mounted so, else v1's `pids`, `freezer`, `memory` and `cpu` hierarchies;
//! where neither is writable, leases run without one (logged, and `doctor` says so).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Processes (threads included) one lease may have at once: no fork bomb takes the node.
pub const MAX_PROCESSES: u32 = 8192;
const PARENT: &str = "suanli";

#[derive(Clone, Debug)]
pub struct Cgroups {
    root: PathBuf,
}

/// What one lease may use of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of memory (page cache included) before the kernel reclaims, then kills.
    pub memory_bytes: u64,
    /// CPU time per 100 ms period, in microseconds (100,000: one core).
    pub cpu_quota_us: u64,
    pub pids: u32,
}

/// cgroup CPU bandwidth period.
pub const CPU_PERIOD_US: u64 = 100_000;

impl Limits {
    /// `share` of the node's `memory_bytes` and `cpus` (share: the lease's cards on the node
    /// over all of them, times the fraction the supplier gives leases).
    pub fn share_of(share: f64, memory_bytes: u64, cpus: u32) -> Limits {
        let share = share.clamp(0.0, 1.0);
        Limits {
            // At least 64 MiB and a tenth of a core, so a lease can always log in.
            memory_bytes: ((memory_bytes as f64 * share) as u64).max(64 << 20),
            cpu_quota_us: ((f64::from(cpus) * share * CPU_PERIOD_US as f64) as u64).max(CPU_PERIOD_US / 10),
            pids: MAX_PROCESSES,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    Unified,
    V1,
}

impl Cgroups {
    pub fn new(root: PathBuf) -> Cgroups {
        Cgroups { root }
    }

    pub fn layout(&self) -> Option<Layout> {
        if self.root.join("cgroup.controllers").exists() {
            Some(Layout::Unified)
        } else if self.root.join("pids").is_dir() {
            Some(Layout::V1)
        } else {
            None
        }
    }

    /// The lease's group directories, one per hierarchy.
    fn dirs(&self, login: &str) -> Vec<PathBuf> {
        match self.layout() {
            Some(Layout::Unified) => vec![self.root.join(PARENT).join(login)],
            Some(Layout::V1) => V1_HIERARCHIES.iter().map(|h| self.root.join(h)).filter(|h| h.is_dir()).map(|h| h.join(PARENT).join(login)).collect(),
            None => Vec::new(),
        }
    }

    /// The controllers each layout needs, and which of them this node lacks.
    pub fn missing_controllers(&self) -> Vec<&'static str> {
        match self.layout() {
            Some(Layout::Unified) => {
                let available = std::fs::read_to_string(self.root.join("cgroup.controllers")).unwrap_or_default();
                V2_CONTROLLERS.iter().copied().filter(|c| !available.split_whitespace().any(|a| a == *c)).collect()
            }
            Some(Layout::V1) => V1_HIERARCHIES.iter().copied().filter(|h| !self.root.join(h).is_dir()).collect(),
            None => V2_CONTROLLERS.to_vec(),
        }
    }

    /// Makes the lease's groups with its limits. Returns their `cgroup.procs` files, which root
    /// writes a session's process into before it becomes the lease's user.
    pub fn create(&self, login: &str, limits: &Limits) -> std::io::Result<Vec<PathBuf>> {
        if self.layout() == Some(Layout::Unified) {
            // Controllers reach a group only if every ancestor delegates them; those this
            // hierarchy lacks (bound to v1 on a hybrid host) stay off, and `doctor` says so.
            let missing = self.missing_controllers();
            let enable: Vec<String> = V2_CONTROLLERS.iter().filter(|c| !missing.contains(c)).map(|c| format!("+{c}")).collect();
            std::fs::create_dir_all(self.root.join(PARENT))?;
            if !enable.is_empty() {
                let _ = std::fs::write(self.root.join("cgroup.subtree_control"), enable.join(" "));
                std::fs::write(self.root.join(PARENT).join("cgroup.subtree_control"), enable.join(" "))?;
            }
        }
        let mut procs = Vec::new();
        for dir in self.dirs(login) {
            std::fs::create_dir_all(&dir)?;
            let settings: [(&str, String); 6] = [
                ("pids.max", limits.pids.to_string()),
                ("memory.max", limits.memory_bytes.to_string()),
                ("cpu.max", format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us)),
                ("memory.limit_in_bytes", limits.memory_bytes.to_string()),
                ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", limits.cpu_quota_us.to_string()),
            ];
            for (file, value) in settings {
                if dir.join(file).exists() {
                    std::fs::write(dir.join(file), value).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))?;
                }
            }
            procs.push(dir.join("cgroup.procs"));
        }
        Ok(procs)
    }

    /// Freezes the lease's groups, kills everything in them, and removes them.
    pub async fn destroy(&self, login: &str) -> std::io::Result<()> {
        let dirs: Vec<PathBuf> = self.dirs(login).into_iter().filter(|d| d.exists()).collect();
        for dir in &dirs {
            // v2 kills the whole subtree at once; v1's freezer stops forks while we kill.
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let _ = std::fs::write(dir.join("freezer.state"), "FROZEN");
        }
        for _ in 0..100 {
            let pids: Vec<i32> = dirs.iter().flat_map(|d| members(d)).collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids.into_iter().filter_map(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            for dir in &dirs {
                let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for dir in &dirs {
            std::fs::remove_dir(dir)?;
        }
        Ok(())
    }
}

/// v1 hierarchies a lease's group is made in (those mounted).
const V1_HIERARCHIES: [&str; 4] = ["pids", "freezer", "memory", "cpu"];
/// v2 controllers a lease's group needs.
const V2_CONTROLLERS: [&str; 3] = ["pids", "memory", "cpu"];

fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_share_of_cards_with_floors() {
        let half = Limits::share_of(0.5, 64 << 30, 16);
        assert_eq!((half.memory_bytes, half.cpu_quota_us), (32 << 30, 8 * CPU_PERIOD_US));
        let tiny = Limits::share_of(0.0, 64 << 30, 16);
        assert_eq!((tiny.memory_bytes, tiny.cpu_quota_us), (64 << 20, CPU_PERIOD_US / 10));
        assert_eq!(Limits::share_of(7.0, 1 << 30, 2).memory_bytes, 1 << 30, "never more than the node");
    }
}
