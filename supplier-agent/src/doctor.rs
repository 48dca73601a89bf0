//! `suanli-agent doctor`: which protections between leases and the node are active on the node
//! it runs on. Each line is a check, its state and what it means; a required protection that is
//! missing makes the report unhealthy (and the command exit non-zero).

use std::fmt;

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::access::firewall::{self, FirewallKind, Opening};
use crate::access::{accounts, cgroup, sandbox, AccessConfig};

#[derive(Debug, PartialEq, Eq)]
pub enum State {
    Active,
    /// Present but not required (informational).
    Note,
    Missing,
}

pub struct Check {
    pub name: &'static str,
    pub state: State,
    pub detail: String,
}

pub struct Report(pub Vec<Check>);

impl Report {
    pub fn healthy(&self) -> bool {
        self.0.iter().all(|c| c.state != State::Missing)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.0 {
            let mark = match c.state {
                State::Active => "ok     ",
                State::Note => "note   ",
                State::Missing => "MISSING",
            };
            writeln!(f, "{mark} {:<22} {}", c.name, c.detail)?;
        }
        writeln!(f, "{}", if self.healthy() { "all required protections are active" } else { "some required protections are missing" })
    }
}

fn verdict(name: &'static str, ok: bool, active: impl Into<String>, missing: impl Into<String>) -> Check {
    if ok {
        Check { name, state: State::Active, detail: active.into() }
    } else {
        Check { name, state: State::Missing, detail: missing.into() }
    }
}

fn sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/"))).ok().map(|s| s.trim().to_owned())
}

pub fn check(config: &AccessConfig) -> Report {
    let mut checks = Vec::new();
    let root = rustix::process::geteuid().is_root();
    checks.push(verdict("root", root, "the agent runs as root (lease accounts, namespaces, groups)", "not root: no lease accounts can be made"));
    let namespaces = root && sandbox::namespaces_available();
    if !config.private_dirs.is_empty() {
        checks.push(verdict(
            "private /tmp and IPC",
            namespaces,
            format!("each lease gets its own mount and IPC namespace: private {}", config.private_dirs.join(", ")),
            "cannot make mount/IPC namespaces (needs CAP_SYS_ADMIN, no seccomp filter against unshare)",
        ));
    } else {
        checks.push(Check { name: "private /tmp and IPC", state: State::Missing, detail: "switched off (private_dirs = []): leases share /tmp".into() });
    }
    match config.cgroup_root.clone().map(cgroup::Cgroups::new) {
        Some(groups) => {
            let missing = groups.missing_controllers();
            let layout = match groups.layout() {
                Some(cgroup::Layout::Unified) => "cgroup v2",
                Some(cgroup::Layout::V1) => "cgroup v1",
                None => "no cgroup hierarchy",
            };
            checks.push(verdict(
                "control groups",
                groups.layout().is_some() && missing.is_empty(),
                format!("{layout}: pids, memory and cpu limits per lease"),
                format!("{layout}: missing {}", missing.join(", ")),
            ));
        }
        None => checks.push(Check { name: "control groups", state: State::Missing, detail: "no cgroup root: leases run without limits".into() }),
    }
    checks.push(match accounts::check_home_root(&config.home_root) {
        Ok(()) => Check { name: "lease homes", state: State::Active, detail: format!("{} is reachable by lease users", config.home_root.display()) },
        Err(why) => Check { name: "lease homes", state: State::Missing, detail: why },
    });
    checks.push(verdict(
        "sftp-server",
        config.sftp_server.is_file(),
        format!("{}", config.sftp_server.display()),
        format!("{} not found: scp and sftp will fail", config.sftp_server.display()),
    ));
    // Defence in depth: the agent never follows a lease's links itself (lease_fs.rs), but these
    // keep other root programs on the node from doing so.
    for (name, label) in [("fs.protected_symlinks", "protected symlinks"), ("fs.protected_hardlinks", "protected hardlinks")] {
        let on = sysctl(name).as_deref() == Some("1");
        checks.push(Check {
            name: label,
            state: State::Note,
            detail: format!("{name} = {}", sysctl(name).unwrap_or_else(|| "unknown".into())) + if on { "" } else { " (recommended: 1)" },
        });
    }
    checks.push(Check {
        name: "user database",
        state: State::Note,
        detail: "lease accounts are written to /etc/passwd by useradd (an NSS source of the agent's own is not implemented yet)".into(),
    });
    checks.push(match config.rendezvous_firewall {
        FirewallKind::Off => Check {
            name: "rendezvous firewall",
            state: State::Missing,
            detail: "switched off (rendezvous_firewall = \"off\"): a job's MASTER_PORT is open to whoever reaches the node".into(),
        },
        FirewallKind::Nftables => {
            // The rules a rank 0 with one peer needs, checked by the kernel's nftables without
            // being committed (`nft -c`): `iif`, `skuid` and `reject` must all load.
            let sample = BTreeMap::from([((1, 1), Opening { port: 29_500, uid: 65_534, peers: Some(vec![IpAddr::from([192, 0, 2, 1])]) })]);
            let checked = check_ruleset(&firewall::ruleset("suanli_doctor_check", &sample));
            let usable = checked.is_ok();
            let why = checked.err().unwrap_or_default();
            verdict(
                "rendezvous firewall",
                usable,
                "nftables keeps each job's MASTER_PORT to its lease's nodes and user",
                format!("nftables unusable ({why}): job attempts will not start"),
            )
        }
    });
    checks.push(Check {
        name: "loopback forwards",
        state: State::Active,
        detail: "the gateway forwards only to listeners owned by the lease's own user".into(),
    });
    Report(checks)
}

/// Whether nftables would take `script` (`nft -c -f -`: checked, never committed).
fn check_ruleset(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("nft: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}
