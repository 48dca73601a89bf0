use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use suanli_ops::install::{self, Layout, Package, Supervision};
use suanli_ops::remote::{Auth, HostKeyPolicy, Remote, Target};

#[derive(Parser)]
#[command(name = "suanli-ops", version, about = "Suanli operations: install the supplier agent on hosts over SSH")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the agent on a host, start it (systemd, or a supervisor loop without systemd)
    /// and wait until it has enrolled with the broker.
    InstallAgent(InstallArgs),
    /// Stop the agent on a host and remove what install-agent put there.
    UninstallAgent(UninstallArgs),
}

#[derive(Args)]
struct HostArgs {
    #[arg(long)]
    host: String,
    #[arg(long, default_value_t = 22)]
    port: u16,
    #[arg(long, default_value = "root")]
    user: String,
    /// Private key to authenticate with.
    #[arg(long, conflicts_with = "password_env")]
    identity: Option<PathBuf>,
    /// Name of an environment variable holding the password (never a flag: flags show in `ps`).
    #[arg(long)]
    password_env: Option<String>,
    /// OpenSSH known_hosts file the host key is checked against (default ~/.ssh/known_hosts).
    #[arg(long)]
    known_hosts: Option<PathBuf>,
    /// Trust a host not yet in known_hosts and record it.
    #[arg(long)]
    accept_new_host_key: bool,
    /// Trust a host whose key changed (it was reinstalled) and record the new key.
    #[arg(long)]
    replace_host_key: bool,
    #[command(flatten)]
    layout: LayoutArgs,
}

#[derive(Args)]
struct LayoutArgs {
    #[arg(long, default_value = "/usr/local")]
    prefix: String,
    #[arg(long, default_value = "/etc/suanli")]
    config_dir: String,
    #[arg(long, default_value = "/var/lib/suanli/agent")]
    state_dir: String,
}

#[derive(Args)]
struct InstallArgs {
    #[command(flatten)]
    host: HostArgs,
    /// The suanli-agent binary to install.
    #[arg(long)]
    agent_binary: PathBuf,
    /// The agent's configuration (see ops/agent.example.toml).
    #[arg(long)]
    config: PathBuf,
    /// The agent CA's certificate (PEM), installed as the agent's `broker_ca`.
    #[arg(long)]
    broker_ca: PathBuf,
    /// One-time enrollment token (`suanli-broker enrollment-token`).
    #[arg(long, env = "SUANLI_ENROLLMENT_TOKEN", hide_env_values = true)]
    enrollment_token: String,
    /// How long to wait for the agent to enroll, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Args)]
struct UninstallArgs {
    #[command(flatten)]
    host: HostArgs,
    /// Also delete the state directory (the node's key): a later install enrolls anew.
    #[arg(long)]
    purge: bool,
}

fn connect(args: &HostArgs) -> anyhow::Result<Remote> {
    let auth = match (&args.identity, &args.password_env) {
        (Some(key), _) => Auth::Key(key.clone()),
        (None, Some(var)) => Auth::Password(std::env::var(var).with_context(|| format!("${var} is not set"))?),
        (None, None) => anyhow::bail!("give --identity KEY or --password-env VAR"),
    };
    let known_hosts = match &args.known_hosts {
        Some(path) => path.clone(),
        None => PathBuf::from(std::env::var("HOME").context("$HOME")?).join(".ssh/known_hosts"),
    };
    let target = Target {
        host: &args.host,
        port: args.port,
        user: &args.user,
        auth,
        known_hosts: &known_hosts,
        policy: HostKeyPolicy { accept_new: args.accept_new_host_key, replace_changed: args.replace_host_key },
    };
    Ok(Remote::connect(&target)?)
}

fn layout(args: &LayoutArgs) -> Layout {
    Layout { prefix: args.prefix.clone(), config_dir: args.config_dir.clone(), state_dir: args.state_dir.clone() }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::InstallAgent(args) => {
            let binary = std::fs::read(&args.agent_binary).with_context(|| format!("reading {}", args.agent_binary.display()))?;
            let config = std::fs::read(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
            let broker_ca = std::fs::read(&args.broker_ca).with_context(|| format!("reading {}", args.broker_ca.display()))?;
            let remote = connect(&args.host)?;
            let layout = layout(&args.host.layout);
            let package = Package { binary: &binary, config: &config, broker_ca: &broker_ca, enrollment_token: &args.enrollment_token };
            let how = install::install(&remote, &layout, &package, Duration::from_secs(args.timeout))?;
            let how = match how {
                Supervision::Systemd => "systemd unit suanli-agent.service",
                Supervision::Supervisor => "a supervisor loop (no systemd on the host)",
            };
            println!("installed {} on {}, running under {how}; enrolled", layout.binary(), args.host.host);
        }
        Command::UninstallAgent(args) => {
            let remote = connect(&args.host)?;
            install::uninstall(&remote, &layout(&args.host.layout), args.purge)?;
            println!("uninstalled the agent from {}", args.host.host);
        }
    }
    Ok(())
}
