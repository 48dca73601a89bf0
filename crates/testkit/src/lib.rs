//! Shared harness for tests that start real processes: spawn a service binary, wait until it
//! announces readiness on stdout (no sleeping), and kill it hard (`SIGKILL`) or stop it.
//!
//! Services print one line `SUANLI_READY key=value …` once they accept connections; the
//! harness reads the addresses from it, so tests can ask for port 0 and never race for ports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub mod agent;
pub mod cluster;
pub mod embedder;
pub mod fixtures;
pub mod link;
pub mod observability;
pub mod portal;
pub mod process;
pub mod s3;
pub mod smtp;
pub mod sshd;
pub mod storm;
pub mod webdriver;

pub const READY_PREFIX: &str = "SUANLI_READY";

/// A running service process. Killed (SIGKILL) when dropped.
pub struct Service {
    pub name: String,
    child: Child,
    /// The `key=value` pairs of the readiness line.
    pub ready: BTreeMap<String, String>,
    stderr_log: PathBuf,
}

impl Service {
    /// Starts `binary` with `args` and waits up to `timeout` for its readiness line. Stderr
    /// goes to `log_dir/<name>.log` so a failing test can show what the service said.
    pub async fn start(name: &str, binary: &Path, args: &[String], env: &[(&str, &str)], log_dir: &Path, timeout: Duration) -> anyhow::Result<Service> {
        Service::start_until(name, binary, args, env, log_dir, timeout, |line| line.strip_prefix(READY_PREFIX).map(parse_pairs)).await
    }

    /// As [`Service::start`], for a program with a readiness line of its own: `ready` turns
    /// the first stdout line it accepts into the pairs [`Service::get`] answers.
    pub async fn start_until(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
        timeout: Duration,
        ready: impl Fn(&str) -> Option<BTreeMap<String, String>>,
    ) -> anyhow::Result<Service> {
        let stderr_log = log_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&stderr_log)?;
        let mut command = Command::new(binary);
        command.args(args).stdout(Stdio::piped()).stderr(Stdio::from(log)).kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().with_context(|| format!("spawning {}", binary.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(pairs) = ready(&line) {
                    return Ok(pairs);
                }
            }
            bail!("{name} exited before it was ready")
        })
        .await;
        // Keep draining stdout so the service never blocks on a full pipe, into the same log
        // as stderr: services that log to stdout (the broker) are readable in a failure too.
        let stdout_log = std::fs::OpenOptions::new().append(true).open(&stderr_log);
        tokio::spawn(async move {
            use std::io::Write as _;
            let mut log = stdout_log.ok();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(file) = log.as_mut() {
                    let _ = writeln!(file, "{line}");
                }
            }
        });
        let ready = match ready {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => bail!("{e}; its log:\n{}", tail(&stderr_log)),
            Err(_) => bail!("{name} not ready after {timeout:?}; its log:\n{}", tail(&stderr_log)),
        };
        Ok(Service { name: name.to_owned(), child, ready, stderr_log })
    }

    pub fn get(&self, key: &str) -> anyhow::Result<&str> {
        self.ready.get(key).map(String::as_str).ok_or_else(|| anyhow!("{} did not announce {key}", self.name))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `kill -9`: no shutdown code runs; only what was made durable survives.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Stops a service that handles Ctrl-C: sends SIGINT and waits for it to exit.
    pub async fn interrupt(self, timeout: Duration) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            let status = Command::new("kill").args(["-INT", &pid.to_string()]).status().await?;
            if !status.success() {
                bail!("kill -INT {pid} failed");
            }
        }
        self.wait(timeout).await
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(mut self, timeout: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => {
                self.child.kill().await?;
                bail!("{} did not exit within {timeout:?}", self.name)
            }
        }
    }

    pub fn log(&self) -> String {
        tail(&self.stderr_log)
    }
}

fn parse_pairs(rest: &str) -> BTreeMap<String, String> {
    rest.split_whitespace().filter_map(|pair| pair.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A binary of another workspace package, for tests that start several services
/// (`CARGO_BIN_EXE_*` names only the test's own package's). It sits next to the test's own
/// executable's directory; if this build has not produced it yet, it is built now.
pub fn workspace_binary(package: &str, binary: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> → target/<profile>/<binary>
    let dir = exe.parent().and_then(Path::parent).ok_or_else(|| anyhow!("unexpected test path {}", exe.display()))?;
    let path = dir.join(binary);
    if !path.exists() {
        let release = dir.file_name().is_some_and(|d| d == "release");
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--package", package, "--bin", binary])
            .args(release.then_some("--release"))
            .status()
            .context("running cargo build")?;
        if !status.success() || !path.exists() {
            bail!("cannot build {binary}: run `cargo build --workspace` first");
        }
    }
    Ok(path)
}

/// Retries `f` until it returns `Some` or `timeout` passes, polling every `every`. For waiting
/// on a condition another process brings about (never for hiding a race in our own code).
pub async fn eventually<T, F, Fut>(timeout: Duration, every: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// A temporary directory other users may pass through (mode 0711: searchable, not listable),
/// for lease homes and whatever a lease's jobs must reach: the agent refuses a home root its
/// lease users cannot reach. Under `/home`, not `/tmp` or `/var/tmp`: a lease sees a private
/// `/tmp` and `/var/tmp` of its own, so paths below the node's would not lead there.
pub fn reachable_temp_dir() -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all("/home")?;
    let dir = tempfile::Builder::new().prefix("suanli-test-").tempdir_in("/home")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}

/// Whether this process runs as root. Tests that need root call [`require_root`].
pub fn running_as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `true` where the test may go on as root; `false` (after saying why, in one line) where it
/// must skip. Under `CI=true` a missing root is a failure, never a silent pass.
pub fn require_root(what: &str) -> bool {
    if running_as_root() {
        return true;
    }
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{what} needs root, and CI=true: run the tests as root");
    eprintln!("skipped: {what} needs root");
    false
}

/// Whether a process running as `uid` (no account needed) can open a TCP connection to
/// `ip:port` on this host, with bash's `/dev/tcp` (a reset or a timeout is a refusal).
pub fn connects_as(uid: u32, ip: &str, port: u16) -> bool {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("timeout")
        .args(["10", "bash", "-c", &format!("exec 3<>/dev/tcp/{ip}/{port}")])
        .uid(uid)
        .gid(uid)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Removes every lease account an agent recorded making (`<state_dir>/accounts/*.account`):
/// its processes killed, the user and group deleted, its control groups removed. For a test
/// harness's `Drop`, so a failing test leaves no account, process or group behind.
pub fn remove_recorded_lease_accounts(state_dir: &Path) {
    // And the nftables table of its jobs' rendezvous rules, which would otherwise outlive it
    // (a later agent of another node ID on this host would not reset it).
    if let Ok(table) = std::fs::read_to_string(state_dir.join("rendezvous.table")) {
        let _ = std::process::Command::new("nft").args(["delete", "table", "inet", table.trim()]).output();
    }
    let Ok(entries) = std::fs::read_dir(state_dir.join("accounts")) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(login) = name.strip_suffix(".account") else { continue };
        for _ in 0..50 {
            let alive = std::process::Command::new("pgrep").args(["-u", login]).output().is_ok_and(|o| o.status.success());
            if !alive {
                break;
            }
            let _ = std::process::Command::new("pkill").args(["-KILL", "-u", login]).status();
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::process::Command::new("userdel").arg(login).output();
        let roots = std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|e| e.path()).chain([PathBuf::from("/sys/fs/cgroup")]);
        for root in roots {
            let _ = std::fs::remove_dir(root.join("suanli").join(login));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_line_is_parsed() {
        let pairs = parse_pairs(" grpc=127.0.0.1:5 metrics=127.0.0.1:6");
        assert_eq!(pairs["grpc"], "127.0.0.1:5");
        assert_eq!(pairs["metrics"], "127.0.0.1:6");
    }
}
