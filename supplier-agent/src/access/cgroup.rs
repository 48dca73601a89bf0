//! A control group per lease: every session and job of the lease starts inside it (before its
//! program runs, so nothing it forks can be outside), the number of its processes is capped,
//! and at the lease's end the group is frozen, everything in it killed, and the group removed.
//! Killing by user ID (`accounts::kill_all`) still follows, for anything the group missed.
//!
//! cgroup v2 (the unified hierarchy at `/sys/fs/cgroup`) where mounted so, else v1's `pids`
//! and `freezer` hierarchies; where neither is writable, leases run without one (logged).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Processes (threads included) one lease may have at once: no fork bomb takes the node.
pub const MAX_PROCESSES: u32 = 8192;
const PARENT: &str = "suanli";

#[derive(Clone, Debug)]
pub struct Cgroups {
    root: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Unified,
    V1,
}

impl Cgroups {
    pub fn new(root: PathBuf) -> Cgroups {
        Cgroups { root }
    }

    fn layout(&self) -> Option<Layout> {
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
            Some(Layout::V1) => ["pids", "freezer"]
                .iter()
                .map(|h| self.root.join(h))
                .filter(|h| h.is_dir())
                .map(|h| h.join(PARENT).join(login))
                .collect(),
            None => Vec::new(),
        }
    }

    /// Makes the lease's groups; their `cgroup.procs` belong to the lease's user, so its
    /// sessions can enter them (and nothing else). Returns the files a session writes its PID to.
    pub fn create(&self, login: &str, uid: u32, gid: u32) -> std::io::Result<Vec<PathBuf>> {
        let mut procs = Vec::new();
        for dir in self.dirs(login) {
            std::fs::create_dir_all(&dir)?;
            let file = dir.join("cgroup.procs");
            std::os::unix::fs::chown(&file, Some(uid), Some(gid))?;
            if dir.join("pids.max").exists() {
                std::fs::write(dir.join("pids.max"), MAX_PROCESSES.to_string())?;
            }
            procs.push(file);
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

fn members(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The shell prologue that moves a session into its lease's groups before its program runs:
/// `sh -c PROLOGUE program args…`.
pub const ENTER: &str = r#"for f in $SUANLI_CGROUP_PROCS; do echo $$ > "$f" || exit 126; done; unset SUANLI_CGROUP_PROCS; exec "$0" "$@""#;
