//! The gateway's configuration: a TOML file's `[federation]` table, environment variables and
//! flags (flags win), loaded and checked by [`load`] (tests call it too).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use suanli_federation::{Freshness, Keypair, MembershipChain, Multiaddr, PeerId};

use crate::offer::BrokerAccess;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML file with a `[federation]` table.
    #[arg(long, env = "SUANLI_FEDERATION_CONFIG")]
    pub config: Option<PathBuf>,
    /// This member's key (`suanli-federation keygen`).
    #[arg(long, env = "SUANLI_FEDERATION_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// The membership chain (JSON: `genesis` and `changes`).
    #[arg(long, env = "SUANLI_FEDERATION_MEMBERSHIP_FILE")]
    pub membership_file: Option<PathBuf>,
    /// The federation port, a multiaddress (default `/ip4/0.0.0.0/tcp/4001`).
    #[arg(long, env = "SUANLI_FEDERATION_LISTEN")]
    pub listen: Option<Multiaddr>,
    /// Members to dial at start, besides the addresses the membership lists.
    #[arg(long, env = "SUANLI_FEDERATION_DIAL", value_delimiter = ',')]
    pub dial: Vec<Multiaddr>,
    /// This member's broker (`http://` on loopback, `https://` otherwise).
    #[arg(long, env = "SUANLI_FEDERATION_BROKER")]
    pub broker: Option<String>,
    /// A broker service token with the `read` power (and `federation`, for this member's
    /// researchers to lease other members' cards).
    #[arg(long, env = "SUANLI_FEDERATION_BROKER_TOKEN", hide_env_values = true)]
    pub broker_token: Option<String>,
    /// The cluster CA (PEM) for an `https://` broker.
    #[arg(long, env = "SUANLI_FEDERATION_BROKER_CA")]
    pub broker_ca: Option<PathBuf>,
    /// The API port (default 127.0.0.1:4080).
    #[arg(long, env = "SUANLI_FEDERATION_API_LISTEN")]
    pub api_listen: Option<SocketAddr>,
    /// The API's bearer token (at least 16 characters).
    #[arg(long, env = "SUANLI_FEDERATION_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    federation: Option<FileFederation>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileFederation {
    key_file: Option<PathBuf>,
    membership_file: Option<PathBuf>,
    listen: Option<String>,
    #[serde(default)]
    dial: Vec<String>,
    broker: Option<String>,
    broker_token_file: Option<PathBuf>,
    broker_ca: Option<PathBuf>,
    api_listen: Option<SocketAddr>,
    api_token_file: Option<PathBuf>,
    /// How often the broker's catalogue is read and announced (default 5000).
    announce_every_ms: Option<u64>,
    /// How often each peer is asked what this node lacks (default 5000).
    anti_entropy_every_ms: Option<u64>,
    /// A member's offer not confirmed for this long is marked stale (default 30)...
    stale_after_s: Option<u64>,
    /// ...and hidden after this long (default 120).
    hide_after_s: Option<u64>,
    /// Where the settlement journal is kept (default: the membership file's directory).
    state_dir: Option<PathBuf>,
    /// Members whose researchers may lease this member's cards, each through an account this
    /// member's operator registered for it (and granted credit to) at its broker.
    #[serde(default)]
    partners: Vec<FilePartner>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePartner {
    /// The member's name or peer ID in the membership.
    member: String,
    /// The token of its account at this member's broker.
    account_token_file: PathBuf,
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub keypair: Keypair,
    pub membership: MembershipChain,
    /// Where the membership chain is read from, and kept as changes are adopted.
    pub membership_file: PathBuf,
    pub listen: Multiaddr,
    pub dial: Vec<Multiaddr>,
    pub broker: BrokerAccess,
    pub api_listen: SocketAddr,
    pub api_token: String,
    pub announce_every: Duration,
    pub anti_entropy_every: Duration,
    pub freshness: Freshness,
    pub state_dir: PathBuf,
    /// Each partner member's account token at this member's broker.
    pub partners: BTreeMap<PeerId, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} is required (flag, environment or [federation] in the config file)")]
    Missing(&'static str),
    #[error("{0}: {1}")]
    Invalid(&'static str, String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error(transparent)]
    Key(#[from] suanli_federation::keyfile::KeyFileError),
    #[error("the membership: {0}")]
    Membership(#[from] suanli_federation::membership::MembershipError),
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.display().to_string(), e))
}

/// Builds the configuration from flags, environment and the file they name, checking it.
pub fn load(args: &ServeArgs) -> Result<GatewayConfig, ConfigError> {
    let file: FileFederation = match &args.config {
        Some(path) => toml::from_str::<FileConfig>(&read(path)?).map_err(|e| ConfigError::Invalid("config", e.to_string()))?.federation.unwrap_or_default(),
        None => FileFederation::default(),
    };
    let key_file = args.key_file.clone().or(file.key_file).ok_or(ConfigError::Missing("key_file"))?;
    let keypair = suanli_federation::keyfile::load(&key_file)?;
    let membership_file = args.membership_file.clone().or(file.membership_file).ok_or(ConfigError::Missing("membership_file"))?;
    let membership: MembershipChain = serde_json::from_str(&read(&membership_file)?).map_err(|e| ConfigError::Invalid("membership_file", e.to_string()))?;
    let verified = membership.verify()?;
    if !verified.contains(&keypair.public().to_peer_id()) {
        return Err(ConfigError::Invalid("key_file", "this key is not a member of the federation".into()));
    }
    let listen = match (&args.listen, file.listen) {
        (Some(l), _) => l.clone(),
        (None, Some(l)) => l.parse().map_err(|e: suanli_federation::MultiaddrError| ConfigError::Invalid("listen", e.to_string()))?,
        (None, None) => "/ip4/0.0.0.0/tcp/4001".parse().map_err(|e: suanli_federation::MultiaddrError| ConfigError::Invalid("listen", e.to_string()))?,
    };
    let mut dial = args.dial.clone();
    for d in file.dial {
        dial.push(d.parse().map_err(|e: suanli_federation::MultiaddrError| ConfigError::Invalid("dial", e.to_string()))?);
    }
    let endpoint = args.broker.clone().or(file.broker).ok_or(ConfigError::Missing("broker"))?;
    let token = match (&args.broker_token, &file.broker_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => read(path)?.trim().to_owned(),
        (None, None) => return Err(ConfigError::Missing("broker_token")),
    };
    let ca_pem = match args.broker_ca.clone().or(file.broker_ca) {
        Some(path) => Some(read(&path)?),
        None => None,
    };
    if endpoint.starts_with("https://") && ca_pem.is_none() {
        return Err(ConfigError::Invalid("broker_ca", "an https:// broker is checked against the cluster CA: give broker_ca".into()));
    }
    if !endpoint.starts_with("https://") && !is_loopback_http(&endpoint) {
        return Err(ConfigError::Invalid("broker", format!("{endpoint}: the read token travels in the clear over http://; use https:// off this host")));
    }
    let api_token = match (&args.api_token, &file.api_token_file) {
        (Some(t), _) => t.clone(),
        (None, Some(path)) => read(path)?.trim().to_owned(),
        (None, None) => return Err(ConfigError::Missing("api_token")),
    };
    if api_token.len() < 16 {
        return Err(ConfigError::Invalid("api_token", "at least 16 characters".into()));
    }
    let ms = |name: &'static str, value: Option<u64>, default: u64| -> Result<Duration, ConfigError> {
        match value.unwrap_or(default) {
            v if (100..=3_600_000).contains(&v) => Ok(Duration::from_millis(v)),
            v => Err(ConfigError::Invalid(name, format!("{v} ms: between 100 ms and an hour"))),
        }
    };
    let stale_after = Duration::from_secs(file.stale_after_s.unwrap_or(30));
    let hide_after = Duration::from_secs(file.hide_after_s.unwrap_or(120));
    if stale_after.is_zero() || hide_after <= stale_after || hide_after > Duration::from_secs(7 * 24 * 3600) {
        return Err(ConfigError::Invalid("hide_after_s", "longer than stale_after_s (at least 1), at most a week".into()));
    }
    let state_dir = match file.state_dir {
        Some(dir) => dir,
        None => membership_file.parent().filter(|d| !d.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), Path::to_owned),
    };
    let mut partners = BTreeMap::new();
    for partner in file.partners {
        let peer = verified
            .peers()
            .find(|p| p.to_base58() == partner.member || verified.member(p).is_some_and(|m| m.name == partner.member))
            .copied()
            .ok_or_else(|| ConfigError::Invalid("partners", format!("{}: not a member of the federation", partner.member)))?;
        let token = read(&partner.account_token_file)?.trim().to_owned();
        if token.is_empty() || partners.insert(peer, token).is_some() {
            return Err(ConfigError::Invalid("partners", format!("{}: an empty token, or listed twice", partner.member)));
        }
    }
    let api_listen = args.api_listen.or(file.api_listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4080)));
    if !api_listen.ip().is_loopback() {
        return Err(ConfigError::Invalid(
            "api_listen",
            format!("{api_listen}: the API serves plain HTTP with a bearer token; keep it on loopback (a TLS proxy in front for other hosts)"),
        ));
    }
    Ok(GatewayConfig {
        keypair,
        membership,
        membership_file,
        listen,
        dial,
        broker: BrokerAccess::new(endpoint, token, ca_pem),
        api_listen,
        api_token,
        announce_every: ms("announce_every_ms", file.announce_every_ms, 5000)?,
        anti_entropy_every: ms("anti_entropy_every_ms", file.anti_entropy_every_ms, 5000)?,
        freshness: Freshness { stale_after, hide_after },
        state_dir,
        partners,
    })
}

/// `http://127.0.0.1:…`, `http://[::1]:…` or `http://localhost:…`.
fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else { return false };
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_brokers_may_be_reached_in_the_clear() {
        for ok in ["http://127.0.0.1:50051", "http://[::1]:50051", "http://localhost:50051/"] {
            assert!(is_loopback_http(ok), "{ok}");
        }
        for refused in ["http://10.0.0.1:50051", "http://127.0.0.1@broker.example:50051", "http://broker.example:50051", "https://127.0.0.1:1"] {
            assert!(!is_loopback_http(refused), "{refused}");
        }
    }

    #[test]
    fn the_shipped_example_has_only_keys_the_gateway_reads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/federation.example.toml");
        let file: FileConfig = toml::from_str(&std::fs::read_to_string(path).expect("ops/federation.example.toml")).expect("every key known");
        let federation = file.federation.expect("a [federation] table");
        assert_eq!(federation.partners.len(), 1);
        assert!(federation.broker.is_some_and(|b| b.starts_with("https://")));
    }
}
