//! `cargo bench -p suanli-agent --bench gateway` — the SSH gateway against OpenSSH's own sshd
//! on this machine, in the same run, with the same client (Debian's OpenSSH `ssh`/`scp`), the
//! same key type and the same file.
//!
//! Measures connection setup (`ssh … true`, `--logins` times) and `scp` of `--mib` MiB up and
//! down (scp speaks SFTP underneath; both servers run OpenSSH's `sftp-server`). Prints a table
//! and the gateway/sshd ratio of each. Needs root (lease accounts are Unix users), like the
//! gateway tests. Flags: `--mib 1024 --logins 20`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use suanli_testkit::sshd::Sshd;
use tokio::process::Command;

use support::{running_as_root, said, Node};

struct Args {
    mib: u64,
    logins: u32,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args { mib: 1024, logins: 20 };
    let raw: Vec<String> = std::env::args().skip(1).filter(|s| s != "--bench").collect();
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().context("flag needs a value");
        match flag.as_str() {
            "--mib" => a.mib = value()?.parse()?,
            "--logins" => a.logins = value()?.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(a)
}

/// One SSH server as the client reaches it.
struct Target {
    name: &'static str,
    user: String,
    port: u16,
    key: std::path::PathBuf,
    known_hosts: std::path::PathBuf,
    /// Where uploads go on the server.
    remote_path: String,
}

impl Target {
    fn options(&self) -> Vec<String> {
        [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o",
            "IdentitiesOnly=yes",
            // The same key exchange and cipher on both sides (both offer them).
            "-o",
            "Ciphers=chacha20-poly1305@openssh.com",
            "-o",
            "KexAlgorithms=curve25519-sha256",
            "-i",
            &self.key.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    async fn login(&self) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let out =
            Command::new("ssh").args(self.options()).args(["-p", &self.port.to_string()]).arg(format!("{}@127.0.0.1", self.user)).arg("true").output().await?;
        if !out.status.success() {
            bail!("{}: ssh failed: {}", self.name, said(&out));
        }
        Ok(started.elapsed())
    }

    async fn scp(&self, from: &str, to: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let out = Command::new("scp").args(self.options()).args(["-P", &self.port.to_string()]).arg(from).arg(to).output().await?;
        if !out.status.success() {
            bail!("{}: scp failed: {}", self.name, said(&out));
        }
        Ok(started.elapsed())
    }

    fn remote(&self) -> String {
        format!("{}@127.0.0.1:{}", self.user, self.remote_path)
    }
}

struct Figures {
    login_median: Duration,
    up: Duration,
    down: Duration,
}

async fn measure(target: &Target, file: &Path, back: &Path, logins: u32) -> anyhow::Result<Figures> {
    let mut times = Vec::new();
    for _ in 0..logins {
        times.push(target.login().await?);
    }
    times.sort();
    let up = target.scp(&file.display().to_string(), &target.remote()).await?;
    let down = target.scp(&target.remote(), &back.display().to_string()).await?;
    let (a, b) = (std::fs::metadata(file)?.len(), std::fs::metadata(back)?.len());
    if a != b {
        bail!("{}: {b} bytes came back of {a}", target.name);
    }
    Ok(Figures { login_median: times[times.len() / 2], up, down })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    if !running_as_root() {
        bail!("the gateway benchmark needs root: lease accounts are Unix users");
    }
    let node = Node::start().await;
    let mut researcher = node.researcher("bench").await;
    let login = node.lease(&mut researcher, "bench").await;
    let sshd_dir = node.dir.path().join("sshd");
    std::fs::create_dir_all(&sshd_dir)?;
    let sshd = Sshd::start(&sshd_dir).await?;
    let sshd_known = node.dir.path().join("known_hosts-sshd");
    std::fs::write(&sshd_known, format!("[127.0.0.1]:{} {}", sshd.port, sshd.host_public_key))?;

    let file = node.dir.path().join("payload.bin");
    let out = Command::new("head").args(["-c", &(a.mib * 1024 * 1024).to_string(), "/dev/urandom"]).output().await?;
    std::fs::write(&file, &out.stdout)?;
    drop(out);

    let gateway = Target {
        name: "gateway",
        user: login.login.clone(),
        port: login.port,
        key: login.key.clone(),
        known_hosts: login.known_hosts.clone(),
        remote_path: "payload.bin".into(),
    };
    let openssh = Target {
        name: "sshd",
        user: std::env::var("USER").unwrap_or_else(|_| "root".into()),
        port: sshd.port,
        key: sshd.client_key.clone(),
        known_hosts: sshd_known,
        remote_path: node.dir.path().join("sshd-payload.bin").display().to_string(),
    };
    // sshd first, then the gateway: each gets a warm page cache for the payload.
    let base = measure(&openssh, &file, &node.dir.path().join("back-sshd.bin"), a.logins).await?;
    let ours = measure(&gateway, &file, &node.dir.path().join("back-gateway.bin"), a.logins).await?;

    let mib_s = |d: Duration| a.mib as f64 / d.as_secs_f64();
    println!("SSH gateway vs OpenSSH sshd, loopback, {} MiB, {} logins each", a.mib, a.logins);
    println!("{:<28} {:>12} {:>12} {:>8}", "measure", "sshd", "gateway", "ratio");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{:<28} {:>10.1}ms {:>10.1}ms {:>8.2}",
        "login (ssh true), median",
        ms(base.login_median),
        ms(ours.login_median),
        ms(base.login_median) / ms(ours.login_median)
    );
    println!("{:<28} {:>8.1}MiB/s {:>8.1}MiB/s {:>8.2}", "scp upload", mib_s(base.up), mib_s(ours.up), mib_s(ours.up) / mib_s(base.up));
    println!("{:<28} {:>8.1}MiB/s {:>8.1}MiB/s {:>8.2}", "scp download", mib_s(base.down), mib_s(ours.down), mib_s(ours.down) / mib_s(base.down));
    println!("ratios: gateway/sshd throughput (higher is better; target >= 0.8), sshd/gateway login time");
    node.end(&mut researcher, &login).await;
    Ok(())
}
