use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use suanli_ops::install::{self, Layout, Package, Supervision};
use suanli_ops::remote::{Auth, HostKeyPolicy, Remote, Target};

#[derive(Parser)]
#[command(name = "suanli-ops", version, about = "Suanli operations: install the supplier agent on hosts over SSH; back up and restore the platform")]
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
    /// Backups of the whole platform: portal database, broker state and artifacts under one
    /// manifest (see ops/backup.example.toml).
    #[command(subcommand)]
    Backup(BackupCommand),
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Take a backup, verify it, copy it off-site, keep the newest `keep` (what a timer runs).
    Run(ConfigArg),
    /// Take a backup only.
    Take(ConfigArg),
    /// List the backups in the root (and off-site, with --offsite).
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        offsite: bool,
    },
    /// Check every file and artifact of a backup against its manifest.
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        name: String,
    },
    /// Bring a backup back from off-site into a backup root (`--into`, default the
    /// configured one), and verify it there.
    Fetch {
        #[command(flatten)]
        config: ConfigArg,
        name: String,
        #[arg(long)]
        into: Option<PathBuf>,
    },
    /// Restore a backup into new places: an empty portal database, a new data directory for
    /// the broker's first node (start it without --bootstrap; add the others as learners) and
    /// a new artifact store directory. Everything is checked before anything is written.
    Restore(RestoreArgs),
}

#[derive(Args)]
struct ConfigArg {
    /// A TOML file with a [backup] table.
    #[arg(long, env = "SUANLI_BACKUP_CONFIG")]
    config: PathBuf,
}

#[derive(Args)]
struct RestoreArgs {
    /// The backup root.
    #[arg(long)]
    root: PathBuf,
    /// The backup's name (`suanli-ops backup list`).
    name: String,
    #[arg(long)]
    portal_database_url: String,
    #[arg(long)]
    broker_data_dir: PathBuf,
    #[arg(long, default_value_t = 1)]
    broker_node_id: u64,
    /// Where the broker's other nodes will reach this node's peer port, HOST:PORT.
    #[arg(long)]
    broker_peer_address: String,
    #[arg(long)]
    artifacts_dir: PathBuf,
    /// Where suanli-broker and suanli-portal are (default: beside suanli-ops, then $PATH).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
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

fn backup(command: BackupCommand) -> anyhow::Result<()> {
    use suanli_ops::backup::{self, BackupConfig};
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let load = |c: &ConfigArg| BackupConfig::load(&c.config);
    let offsite = |config: &BackupConfig| -> anyhow::Result<suanli_artifacts::bucket::Bucket> {
        let bucket = config.offsite.as_ref().context("the configuration has no [backup.offsite]")?;
        Ok(suanli_artifacts::bucket::Bucket::connect(bucket)?)
    };
    runtime.block_on(async {
        match command {
            BackupCommand::Run(c) => {
                let report = backup::run_once(&load(&c)?).await?;
                let m = &report.manifest;
                println!(
                    "backup {} verified: {} files, {} artifacts ({} bytes); {} objects sent off-site; pruned {:?}, {} pool artifacts swept",
                    m.name,
                    m.files.len(),
                    m.artifacts,
                    m.artifact_bytes,
                    report.sent_offsite,
                    report.pruned,
                    report.pool_swept
                );
            }
            BackupCommand::Take(c) => {
                let m = backup::take(&load(&c)?).await?;
                println!("backup {} taken: {} files, {} artifacts ({} bytes)", m.name, m.files.len(), m.artifacts, m.artifact_bytes);
            }
            BackupCommand::List { config, offsite: remote } => {
                let config = load(&config)?;
                let names = if remote { backup::list_offsite(&offsite(&config)?).await? } else { backup::list(&config.dir)? };
                for name in names {
                    println!("{name}");
                }
            }
            BackupCommand::Verify { config, name } => {
                let m = backup::verify(&load(&config)?.dir, &name).await?;
                println!("backup {} is whole: {} files, {} artifacts", m.name, m.files.len(), m.artifacts);
            }
            BackupCommand::Fetch { config, name, into } => {
                let config = load(&config)?;
                let into = into.unwrap_or_else(|| config.dir.clone());
                let m = backup::fetch_offsite(&offsite(&config)?, &name, &into).await?;
                println!("backup {} fetched into {} and verified", m.name, into.display());
            }
            BackupCommand::Restore(a) => {
                let target = backup::RestoreTarget {
                    portal_database_url: a.portal_database_url,
                    broker_data_dir: a.broker_data_dir.clone(),
                    broker_node_id: a.broker_node_id,
                    broker_peer_address: a.broker_peer_address,
                    artifacts_dir: a.artifacts_dir.clone(),
                    bin_dir: a.bin_dir,
                };
                let m = backup::restore(&a.root, &a.name, &target).await?;
                println!(
                    "restored backup {}: the portal database, broker node {} in {} (start it without --bootstrap, then add the others as learners), artifacts in {}",
                    m.name,
                    a.broker_node_id,
                    a.broker_data_dir.display(),
                    a.artifacts_dir.display()
                );
            }
        }
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Backup(command) => backup(command)?,
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
