//! `suanli-federation`: a member's federation gateway, and the tools to found and change a
//! federation.
//!
//! Founding: each member runs `keygen` and `member` (its entry, as JSON); someone collects the
//! entries into a document (`{"federation": …, "version": 1, "members": [...]}`), every member
//! runs `sign` on it, and the signed document becomes the `genesis` of each member's
//! membership file. A change is a new version signed the same way by more than half of the
//! current members, appended to `changes`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use suanli_federation::membership::{sign, MembershipDoc, SignedMembership};
use suanli_federation::{keyfile, Member, Multiaddr};
use suanli_federation_gateway::api::{CatalogueEntry, SettlementsView};
use suanli_federation_gateway::config::{self, ServeArgs};

/// Suanli's federation gateway: announces this member's catalogue to the federation and
/// serves the merged one.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve(ServeArgs),
    /// Make this member's key (refuses to overwrite one); prints its peer ID.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print this member's entry for a membership document (JSON).
    Member {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "")]
        region: String,
        /// Where other members reach this one (multiaddresses).
        #[arg(long, value_delimiter = ',')]
        address: Vec<Multiaddr>,
    },
    /// Add this member's signature to a membership document (a bare document or a signed one),
    /// in place.
    Sign {
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        doc: PathBuf,
    },
    /// The merged catalogue from a gateway's API, as a table.
    Catalogue {
        /// The gateway's API, e.g. http://127.0.0.1:4080
        #[arg(long, env = "SUANLI_FEDERATION_API")]
        endpoint: String,
        #[arg(long, env = "SUANLI_FEDERATION_API_TOKEN", hide_env_values = true)]
        token: String,
        /// Only this member's listings.
        #[arg(long)]
        origin: Option<String>,
    },
    /// Open the partner account of another member at this member's broker (a researcher
    /// account, with the credit this member extends to that member) and write its token, 0600,
    /// for `[[federation.partners]]`. Run again with the same member to retry safely.
    Partner {
        /// This member's broker (`http://` on loopback, `https://` with --broker-ca).
        #[arg(long, env = "SUANLI_FEDERATION_BROKER")]
        broker: String,
        #[arg(long)]
        broker_ca: Option<PathBuf>,
        /// A token with the `accounts` and `deposits` powers (the platform token does).
        #[arg(long, env = "SUANLI_PLATFORM_TOKEN", hide_env_values = true)]
        token: String,
        /// The member's name in the membership.
        #[arg(long)]
        member: String,
        /// The credit extended to it, in minor units of --currency.
        #[arg(long)]
        credit_minor: i64,
        #[arg(long, default_value = "CNY")]
        currency: String,
        /// Where to write the partner account's token (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
    /// Who owes whom for leases across members, from the settlements both members signed (the
    /// same report at both ends of every line).
    Settlement {
        /// The gateway's API, e.g. http://127.0.0.1:4080
        #[arg(long, env = "SUANLI_FEDERATION_API")]
        endpoint: String,
        #[arg(long, env = "SUANLI_FEDERATION_API_TOKEN", hide_env_values = true)]
        token: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    suanli_observability::init_logging(&std::env::var("SUANLI_LOG").unwrap_or_else(|_| "info".into()), suanli_observability::LogTo::Stderr);
    match Args::parse().command {
        Command::Serve(args) => serve(args).await,
        Command::Keygen { out } => {
            let key = keyfile::create(&out)?;
            println!("{}", key.public().to_peer_id());
            Ok(())
        }
        Command::Member { key_file, name, region, address } => {
            let key = keyfile::load(&key_file)?;
            let member = Member::new(&name, &key.public(), address.iter().map(ToString::to_string).collect(), &region);
            println!("{}", serde_json::to_string_pretty(&member)?);
            Ok(())
        }
        Command::Sign { key_file, doc } => {
            let key = keyfile::load(&key_file)?;
            let text = std::fs::read_to_string(&doc).with_context(|| doc.display().to_string())?;
            let mut signed = match serde_json::from_str::<SignedMembership>(&text) {
                Ok(signed) => signed,
                Err(_) => SignedMembership {
                    doc: serde_json::from_str::<MembershipDoc>(&text).context("neither a document nor a signed one")?,
                    signatures: Default::default(),
                },
            };
            let (peer, signature) = sign(&signed.doc, &key)?;
            signed.signatures.insert(peer, signature);
            std::fs::write(&doc, serde_json::to_string_pretty(&signed)?)?;
            println!("{} signatures", signed.signatures.len());
            Ok(())
        }
        Command::Catalogue { endpoint, token, origin } => {
            let mut url = format!("{}/v1/catalogue", endpoint.trim_end_matches('/'));
            if let Some(o) = origin {
                url.push_str(&format!("?origin={o}"));
            }
            let entries: Vec<CatalogueEntry> = http_get_json(&url, &token).await?;
            println!("{:<16} {:>8} {:<24} {:<10} {:>6} {:>10} {:>8}", "ORIGIN", "CLUSTER", "TITLE", "GPU", "VRAM", "FREE/ALL", "AGE");
            for e in entries {
                let l = e.listing;
                println!(
                    "{:<16} {:>8} {:<24} {:<10} {:>5}G {:>10} {:>7}s",
                    e.origin,
                    l.cluster_id,
                    l.title,
                    l.gpu_model,
                    l.vram_gib,
                    format!("{}/{}", l.free_cards, l.total_cards),
                    e.age_ms / 1000
                );
            }
            Ok(())
        }
        Command::Partner { broker, broker_ca, token, member, credit_minor, currency, out } => {
            use std::io::Write;
            anyhow::ensure!(
                !member.is_empty() && member.len() <= 64 && member.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
                "--member: the member's name, 1 to 64 letters, digits, '.', '_' or '-'"
            );
            let ca = broker_ca.map(std::fs::read_to_string).transpose()?;
            let mut client = suanli_proto::client::connect_checked(&broker, ca.as_deref(), Some(&token)).await?;
            // The token is chosen here and written first, so a retry (same member) registers
            // the same account again, idempotently, and keeps the same token.
            let mut file = std::fs::OpenOptions::new();
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
            let account_token = match std::fs::read_to_string(&out) {
                Ok(existing) => {
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        let mode = std::fs::metadata(&out)?.permissions().mode();
                        anyhow::ensure!(mode & 0o077 == 0, "{}: readable by others (mode {:o}); a token file is 0600", out.display(), mode & 0o777);
                    }
                    existing.trim().to_owned()
                }
                Err(_) => {
                    let fresh = hex::encode(rand::random::<[u8; 32]>());
                    let mut f = file.write(true).create_new(true).open(&out).with_context(|| out.display().to_string())?;
                    writeln!(f, "{fresh}")?;
                    f.sync_all()?;
                    fresh
                }
            };
            let registered = client
                .register_account(suanli_proto::v1::RegisterAccountRequest {
                    request_id: format!("partner-{member}"), // a retry within a day is the same registration
                    kind: suanli_proto::v1::AccountKind::Researcher as i32,
                    token: account_token,
                })
                .await
                .map_err(|s| anyhow::anyhow!("registering: {:?}", suanli_proto::decode_status(&s)))?
                .into_inner();
            client
                .grant_credit(suanli_proto::v1::GrantCreditRequest {
                    // A credit line is set, not added: every run sets it anew.
                    request_id: format!("credit-{}", hex::encode(rand::random::<[u8; 12]>())),
                    account_id: registered.account_id,
                    limit: Some(suanli_proto::v1::Money { currency, minor: credit_minor }),
                })
                .await
                .map_err(|s| anyhow::anyhow!("granting credit: {:?}", suanli_proto::decode_status(&s)))?;
            println!("[[federation.partners]]\nmember = \"{member}\"\naccount_token_file = \"{}\"\n# account acc-{}", out.display(), registered.account_id);
            Ok(())
        }
        Command::Settlement { endpoint, token } => {
            let url = format!("{}/v1/settlements", endpoint.trim_end_matches('/'));
            let view: SettlementsView = http_get_json(&url, &token).await?;
            println!("{:<16} {:<16} {:<8} {:>16} {:>8}", "DEBTOR", "CREDITOR", "CURRENCY", "AMOUNT (MINOR)", "LEASES");
            for row in view.report {
                println!("{:<16} {:<16} {:<8} {:>16} {:>8}", row.debtor, row.creditor, row.currency, row.amount_minor, row.leases);
            }
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = config::load(&args)?;
    let gateway = suanli_federation_gateway::start(config).await?;
    let p2p = gateway.p2p.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    // The readiness line the project's process harness (and operators' scripts) wait for.
    println!("SUANLI_READY api={} p2p={p2p} peer={}", gateway.api, gateway.node.peer_id());
    tokio::signal::ctrl_c().await?;
    Ok(())
}

async fn http_get_json<T: serde::de::DeserializeOwned>(url: &str, token: &str) -> anyhow::Result<T> {
    let response = reqwest::Client::new().get(url).bearer_auth(token).send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    anyhow::ensure!(status.is_success(), "the gateway answered {status}: {}", response.text().await.unwrap_or_default());
    Ok(response.json().await?)
}
