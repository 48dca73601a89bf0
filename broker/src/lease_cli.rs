//! `suanli-broker lease …` and `ssh-key add`: a researcher's path from the catalogue to an SSH
//! login, until the portal lands. Every command prints what it did, and errors with the API's
//! documented code.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use suanli_proto::client;
use suanli_proto::v1;

#[derive(Args)]
pub struct LeaseArgs {
    /// A broker's public port, or its TLS port (`https://HOST:50061`, with --ca-cert) to keep
    /// the lease password off the wire in plain text.
    #[arg(long, env = "SUANLI_BROKER_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// The platform CA's certificate, for an `https://` endpoint (`.dev/broker/agent-ca.pem`).
    #[arg(long, env = "SUANLI_BROKER_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The researcher's account token.
    #[arg(long, env = "SUANLI_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    action: LeaseAction,
}

#[derive(Subcommand)]
enum LeaseAction {
    /// Lease cards of a Class B cluster (the ID column of `catalogue`) and wait until the agents
    /// have provisioned them.
    Request {
        #[arg(long)]
        cluster: u64,
        #[arg(long, default_value_t = 1)]
        cards: u32,
        /// hourly, daily, monthly or yearly.
        #[arg(long, default_value = "hourly")]
        billing_mode: String,
        #[arg(long, default_value_t = 1)]
        periods: u32,
    },
    /// How to log in: the SSH command per node, and (with --known-hosts) the gateway's host key
    /// appended to that file.
    Access {
        lease: u64,
        #[arg(long)]
        known_hosts: Option<PathBuf>,
    },
    /// Draw a new lease password (shown once; the previous one stops working).
    Password { lease: u64 },
    /// End the lease now.
    End { lease: u64 },
}

#[derive(Args)]
pub struct SshKeyArgs {
    #[arg(long, env = "SUANLI_BROKER_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    #[arg(long, env = "SUANLI_TOKEN", hide_env_values = true)]
    token: String,
    /// The account the key is for (`acc-N` as `dev` prints it: N).
    #[arg(long)]
    account: u64,
    /// An OpenSSH public key file, e.g. ~/.ssh/id_ed25519.pub.
    #[arg(long)]
    public_key: PathBuf,
}

fn request_id(what: &str) -> String {
    format!("cli-{what}-{}", suanli_broker::service::random_secret(12))
}

pub async fn ssh_key(args: SshKeyArgs) -> anyhow::Result<()> {
    let key = std::fs::read_to_string(&args.public_key).with_context(|| format!("reading {}", args.public_key.display()))?;
    let mut broker = client::connect(&args.endpoint, Some(&args.token)).await?;
    broker
        .add_ssh_key(v1::AddSshKeyRequest { request_id: request_id("key"), account_id: args.account, public_key: key })
        .await
        .map_err(|s| suanli_proto::decode_status(&s))?;
    println!("key added to account {}", args.account);
    Ok(())
}

pub async fn lease(args: LeaseArgs) -> anyhow::Result<()> {
    let ca = args.ca_cert.as_ref().map(std::fs::read_to_string).transpose().context("reading --ca-cert")?;
    let mut broker = client::connect_checked(&args.endpoint, ca.as_deref(), Some(&args.token)).await?;
    let api = |s: tonic::Status| suanli_proto::decode_status(&s);
    match args.action {
        LeaseAction::Request { cluster, cards, billing_mode, periods } => {
            let mode = suanli_types::BillingMode::parse(&billing_mode).map_err(|e| anyhow::anyhow!("{e}"))?;
            let lease = broker
                .request_lease(v1::RequestLeaseRequest {
                    request_id: request_id("lease"),
                    cluster_id: cluster,
                    node_ids: Vec::new(),
                    cards,
                    billing_mode: suanli_proto::convert::billing_mode_to_wire(mode),
                    periods,
                })
                .await
                .map_err(api)?
                .into_inner();
            println!("lease {} requested ({} cards); waiting for the agents to provision it", lease.lease_id, lease.card_ids.len());
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
            loop {
                let now = broker.get_lease(v1::GetLeaseRequest { lease_id: lease.lease_id }).await.map_err(api)?.into_inner();
                match now.state() {
                    v1::LeaseState::Active => break,
                    v1::LeaseState::Ended => bail!("lease {} ended before it started ({:?})", now.lease_id, now.end_reason()),
                    _ if tokio::time::Instant::now() > deadline => bail!("lease {} is still {:?}", now.lease_id, now.state()),
                    _ => tokio::time::sleep(std::time::Duration::from_millis(300)).await,
                }
            }
            println!("lease {} is active: suanli-broker lease access {} --known-hosts ~/.ssh/known_hosts", lease.lease_id, lease.lease_id);
        }
        LeaseAction::Access { lease, known_hosts } => {
            let access = broker.get_lease_access(v1::GetLeaseRequest { lease_id: lease }).await.map_err(api)?.into_inner();
            if access.nodes.is_empty() {
                bail!("lease {lease} ({:?}) has no SSH gateway yet", access.state());
            }
            for node in &access.nodes {
                let cards: Vec<String> = node.card_indexes.iter().map(u32::to_string).collect();
                println!("node {} (cards {}): {}", node.node_id, cards.join(","), node.ssh_command);
                println!("  known_hosts: {}", node.known_hosts_line);
            }
            if let Some(path) = known_hosts {
                let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
                for node in &access.nodes {
                    writeln!(file, "{}", node.known_hosts_line)?;
                }
                println!("host keys appended to {}", path.display());
            }
        }
        LeaseAction::Password { lease } => {
            let reply =
                broker.set_lease_password(v1::SetLeasePasswordRequest { request_id: request_id("password"), lease_id: lease }).await.map_err(api)?.into_inner();
            println!("lease {} password: {}", reply.lease_id, reply.password);
        }
        LeaseAction::End { lease } => {
            let ended = broker
                .end_lease(v1::EndLeaseRequest { request_id: request_id("end"), lease_id: lease, reason: v1::EndReason::ByResearcher.into() })
                .await
                .map_err(api)?
                .into_inner();
            println!("lease {} {:?}", ended.lease_id, ended.state());
        }
    }
    Ok(())
}
