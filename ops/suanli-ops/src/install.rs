//! Installing the supplier agent on a host: upload the binary, its configuration and its
//! enrollment token, run it under systemd (or, where systemd is absent, under a small
//! supervisor loop), and wait until it has enrolled. `uninstall` reverses it.

use std::time::{Duration, Instant};

use crate::remote::{quote, Remote, RemoteError};

/// The unit the project ships (`ops/systemd/suanli-agent.service`), with its paths replaced.
const UNIT_TEMPLATE: &str = include_str!("../../systemd/suanli-agent.service");
const UNIT_PATH: &str = "/etc/systemd/system/suanli-agent.service";

/// Where things go on the host.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The binary goes to `<prefix>/bin/suanli-agent`.
    pub prefix: String,
    /// `agent.toml`, `agent.env` (the token, 0600), `broker-ca.pem` and, without systemd,
    /// `supervise.sh`.
    pub config_dir: String,
    pub state_dir: String,
}

impl Layout {
    pub fn binary(&self) -> String {
        format!("{}/bin/suanli-agent", self.prefix)
    }
    fn config(&self) -> String {
        format!("{}/agent.toml", self.config_dir)
    }
    fn env(&self) -> String {
        format!("{}/agent.env", self.config_dir)
    }
    fn broker_ca(&self) -> String {
        format!("{}/broker-ca.pem", self.config_dir)
    }
    fn supervisor(&self) -> String {
        format!("{}/supervise.sh", self.config_dir)
    }
    fn pid_file(&self) -> String {
        format!("{}/agent.pid", self.state_dir)
    }
    fn log(&self) -> String {
        format!("{}/agent.log", self.state_dir)
    }
    /// Written by the agent once the broker has signed its certificate: it is enrolled.
    fn certificate(&self) -> String {
        format!("{}/agent.crt", self.state_dir)
    }

    /// The shipped unit, pointed at this layout.
    pub fn unit(&self) -> String {
        UNIT_TEMPLATE
            .replace("/usr/local/bin/suanli-agent", &self.binary())
            .replace("/etc/suanli/agent.toml", &self.config())
            .replace("/etc/suanli/agent.env", &self.env())
    }
}

pub struct Package<'a> {
    pub binary: &'a [u8],
    pub config: &'a [u8],
    /// The agent CA's certificate, which the brokers' agent ports present.
    pub broker_ca: &'a [u8],
    pub enrollment_token: &'a str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supervision {
    Systemd,
    /// No systemd on the host: a shell loop restarts the agent, in its own session.
    Supervisor,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Remote(#[from] RemoteError),
    #[error("the unit does not verify on the host: {0}")]
    Unit(String),
    #[error("the agent did not enroll within {timeout:?}; its last words:\n{log}")]
    NotEnrolled { timeout: Duration, log: String },
}

pub fn supervision(remote: &Remote) -> Result<Supervision, RemoteError> {
    let (status, _) = remote.status("test -d /run/systemd/system")?;
    Ok(if status == 0 { Supervision::Systemd } else { Supervision::Supervisor })
}

/// Installs, starts and waits for enrollment (a certificate in the state directory).
pub fn install(remote: &Remote, layout: &Layout, package: &Package<'_>, timeout: Duration) -> Result<Supervision, InstallError> {
    let dirs = [format!("{}/bin", layout.prefix), layout.config_dir.clone()];
    remote.run(&format!("mkdir -p {} {}", quote(&dirs[0]), quote(&dirs[1])))?;
    remote.run(&format!("mkdir -p {} && chmod 700 {}", quote(&layout.state_dir), quote(&layout.state_dir)))?;
    stop(remote, layout)?;
    remote.upload(&layout.binary(), package.binary, 0o755)?;
    remote.upload(&layout.config(), package.config, 0o644)?;
    remote.upload(&layout.broker_ca(), package.broker_ca, 0o644)?;
    let env = format!(
        "SUANLI_AGENT_ENROLLMENT_TOKEN={}\nSUANLI_AGENT_STATE_DIR={}\nSUANLI_AGENT_BROKER_CA={}\n",
        package.enrollment_token,
        layout.state_dir,
        layout.broker_ca()
    );
    remote.upload(&layout.env(), env.as_bytes(), 0o600)?;
    let how = supervision(remote)?;
    match how {
        Supervision::Systemd => {
            remote.upload(UNIT_PATH, layout.unit().as_bytes(), 0o644)?;
            let (status, said) = remote.status(&format!("systemd-analyze verify {UNIT_PATH}"))?;
            if status != 0 {
                return Err(InstallError::Unit(said));
            }
            remote.run("systemctl daemon-reload && systemctl enable --now suanli-agent.service")?;
        }
        Supervision::Supervisor => {
            let script = format!(
                "#!/bin/sh\n# Restarts suanli-agent whenever it exits (installed by suanli-ops: this host has no systemd).\n\
                 set -a; . {env}; set +a\nwhile :; do\n  {binary} run --config {config}\n  sleep 2\ndone\n",
                env = quote(&layout.env()),
                binary = quote(&layout.binary()),
                config = quote(&layout.config()),
            );
            remote.upload(&layout.supervisor(), script.as_bytes(), 0o755)?;
            // A session of its own, so uninstall can stop the loop and the agent together.
            remote.run(&format!(
                "setsid {} >> {} 2>&1 < /dev/null & echo $! > {}",
                quote(&layout.supervisor()),
                quote(&layout.log()),
                quote(&layout.pid_file())
            ))?;
        }
    }
    wait_for_enrollment(remote, layout, how, timeout)?;
    Ok(how)
}

fn wait_for_enrollment(remote: &Remote, layout: &Layout, how: Supervision, timeout: Duration) -> Result<(), InstallError> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if remote.status(&format!("test -s {}", quote(&layout.certificate())))?.0 == 0 {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = match how {
        Supervision::Systemd => remote.status("journalctl -u suanli-agent -n 20 --no-pager")?.1,
        Supervision::Supervisor => remote.status(&format!("tail -n 20 {}", quote(&layout.log())))?.1,
    };
    Err(InstallError::NotEnrolled { timeout, log })
}

/// Stops the agent however it runs (nothing if it does not).
pub fn stop(remote: &Remote, layout: &Layout) -> Result<(), RemoteError> {
    remote.run(
        "if test -d /run/systemd/system && systemctl is-enabled suanli-agent.service >/dev/null 2>&1; then systemctl disable --now suanli-agent.service; fi",
    )?;
    let pid_file = quote(&layout.pid_file());
    remote.run(&format!("if test -s {pid_file}; then kill -TERM -- -$(cat {pid_file}) 2>/dev/null || true; rm -f {pid_file}; fi"))?;
    Ok(())
}

/// Stops the agent and removes what `install` put there; the state directory (the node's
/// credential) only with `purge`.
pub fn uninstall(remote: &Remote, layout: &Layout, purge: bool) -> Result<(), RemoteError> {
    stop(remote, layout)?;
    let mut files = vec![layout.binary(), layout.config(), layout.env(), layout.supervisor()];
    if supervision(remote)? == Supervision::Systemd {
        files.push(UNIT_PATH.to_owned());
    }
    let files: Vec<String> = files.iter().map(|f| quote(f)).collect();
    remote.run(&format!("rm -f {}", files.join(" ")))?;
    if supervision(remote)? == Supervision::Systemd {
        remote.run("systemctl daemon-reload")?;
    }
    if purge {
        remote.run(&format!("rm -rf {}", quote(&layout.state_dir)))?;
    }
    Ok(())
}
