//! The rendezvous firewall: a job attempt's `MASTER_PORT` is reachable by its own processes
//! only (issue: "opens that port between the lease's own nodes only").
//!
//! `torch.distributed`'s store, on rank 0's node, takes anyone who connects: whoever reaches it
//! can join the job's process group, read its tensors and feed it others. So for as long as the
//! broker lists an attempt on this node (from before its inputs download until the attempt is
//! over everywhere, not only while this node's process runs), the agent keeps nftables rules in
//! a table of its own (`inet suanli_agent_<node>_<state directory's hash>`):
//!
//! - on every node of the attempt (output): a process of this node connects to the port (on any
//!   host) only as the lease's user — another lease of the same node, which no address rule can
//!   tell apart, gets a TCP reset;
//! - on rank 0's node (input): the port answers this node itself (loopback interface, policed by
//!   the output rule) and the attempt's other nodes, by the addresses their suppliers gave; any
//!   other source gets a reset.
//!
//! The whole table is replaced in one nftables transaction whenever the set changes (`nft -f`:
//! every rule of the new set is in place or none changed); one that could not be replaced is
//! tried again every round. When the agent starts, it first kills what an earlier incarnation
//! left running, then empties the table. An attempt whose rules cannot be installed does not
//! start. The table stays when the agent stops (failing closed: the next agent empties it).
//!
//! Not covered: the further ports Gloo and NCCL open between ranks (ephemeral, told through the
//! store this protects); who *listens* on the port (another lease could bind the predictable
//! port first and make the job fail); a peer node whose agent runs with the firewall off or
//! predates it (rank 0 trusts its address); peers that reach rank 0 from another address than
//! the host their supplier advertised (NAT), which are refused. Two agents of one host (tests)
//! see each other's lease processes as strangers, so multi-node jobs across them run with the
//! firewall off.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

/// Whether the agent guards rendezvous ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FirewallKind {
    /// nftables rules through the `nft` command (the default).
    Nftables,
    /// No rules: the port is open to whoever reaches the node (say so in `doctor`).
    Off,
}

/// What one attempt needs open on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opening {
    pub port: u16,
    /// The lease's user on this node: the only local user who may connect.
    pub uid: u32,
    /// On rank 0's node, the addresses of the attempt's other nodes, which may connect from
    /// outside; `None` on the other nodes.
    pub peers: Option<Vec<IpAddr>>,
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("the rendezvous firewall needs nftables' `nft` ({0}): {1} (install nftables, or set access.rendezvous_firewall = \"off\")")]
    Spawn(PathBuf, std::io::Error),
    #[error("nft refused the rendezvous rules: {0}")]
    Refused(String),
    #[error("rendezvous host {0:?} does not resolve: {1}")]
    Resolve(String, String),
    #[error("nft did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// How long one `nft` run or one name lookup may take: the runner's loop (self-fencing among
/// its work) waits on it.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// One attempt's key: (job, attempt).
pub type Key = (u64, u32);

/// The agent's rendezvous rules, one table it alone writes.
pub struct RendezvousFirewall {
    kind: FirewallKind,
    table: String,
    nft: PathBuf,
    state: tokio::sync::Mutex<Rules>,
}

#[derive(Default)]
struct Rules {
    openings: BTreeMap<Key, Opening>,
    /// The kernel's table differs from `openings` (a removal could not be installed).
    dirty: bool,
}

impl RendezvousFirewall {
    /// The table of the agent on `node` whose state is in `state_dir`: one name per agent, the
    /// same across its restarts and upgrades (so a restart empties what it left), different for
    /// two agents of one host.
    pub fn new(kind: FirewallKind, node: u64, state_dir: &std::path::Path) -> RendezvousFirewall {
        RendezvousFirewall::with_table(kind, format!("suanli_agent_{node}_{:08x}", fnv1a(state_dir.as_os_str().as_encoded_bytes())))
    }

    /// As [`RendezvousFirewall::new`] with a table name of the caller's (tests).
    pub fn with_table(kind: FirewallKind, table: String) -> RendezvousFirewall {
        RendezvousFirewall { kind, table, nft: PathBuf::from("nft"), state: Default::default() }
    }

    pub fn kind(&self) -> FirewallKind {
        self.kind
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Empties the table (at start, once what an earlier agent left running is killed). Switched
    /// off, the table an earlier configuration left is deleted where `nft` exists.
    pub async fn reset(&self) -> Result<(), FirewallError> {
        let mut rules = self.state.lock().await;
        rules.openings.clear();
        if self.kind == FirewallKind::Off {
            let _ = self.run_nft(&format!("table inet {t}\ndelete table inet {t}\n", t = self.table)).await;
            return Ok(());
        }
        let done = self.run_nft(&ruleset(&self.table, &rules.openings)).await;
        rules.dirty = done.is_err();
        done
    }

    /// Adds `opening` for attempt `key` and installs the rules; nothing changes if they cannot
    /// be installed.
    pub async fn open(&self, key: Key, opening: Opening) -> Result<(), FirewallError> {
        if self.kind == FirewallKind::Off {
            return Ok(());
        }
        let mut rules = self.state.lock().await;
        if rules.openings.get(&key) == Some(&opening) && !rules.dirty {
            return Ok(());
        }
        let before = rules.openings.insert(key, opening);
        if let Err(e) = self.run_nft(&ruleset(&self.table, &rules.openings)).await {
            match before {
                Some(b) => rules.openings.insert(key, b),
                None => rules.openings.remove(&key),
            };
            return Err(e);
        }
        rules.dirty = false;
        Ok(())
    }

    /// Removes attempt `key`'s rules (the broker no longer lists it here); a removal that cannot
    /// be installed now is by [`RendezvousFirewall::retry`].
    pub async fn close(&self, key: Key) {
        let mut rules = self.state.lock().await;
        if rules.openings.remove(&key).is_some() || rules.dirty {
            let done = self.run_nft(&ruleset(&self.table, &rules.openings)).await;
            if let Err(e) = &done {
                tracing::error!(job = key.0, attempt = key.1, error = %e, "could not remove a rendezvous rule; will retry");
            }
            rules.dirty = done.is_err();
        }
    }

    /// Installs the rules again if the kernel's table is behind (a failed removal).
    pub async fn retry(&self) {
        let mut rules = self.state.lock().await;
        if rules.dirty {
            rules.dirty = self.run_nft(&ruleset(&self.table, &rules.openings)).await.is_err();
        }
    }

    /// The attempts with rules now.
    pub async fn opened(&self) -> Vec<Key> {
        self.state.lock().await.openings.keys().copied().collect()
    }

    async fn run_nft(&self, script: &str) -> Result<(), FirewallError> {
        run_nft(&self.nft, &["-f", "-"], script).await
    }
}

/// Runs `nft` with `args` and `script` on its standard input, within [`DEADLINE`].
pub async fn run_nft(nft: &std::path::Path, args: &[&str], script: &str) -> Result<(), FirewallError> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(nft)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| FirewallError::Spawn(nft.to_owned(), e))?;
    let run = async {
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await.map_err(|e| FirewallError::Refused(e.to_string()))?;
        }
        child.wait_with_output().await.map_err(|e| FirewallError::Refused(e.to_string()))
    };
    let out = tokio::time::timeout(DEADLINE, run).await.map_err(|_| FirewallError::Timeout(DEADLINE))??;
    if out.status.success() {
        Ok(())
    } else {
        Err(FirewallError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
    }
}

/// FNV-1a (32 bits): a short name that stays the same for the same bytes, in every build.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

/// The addresses `host` names (an address as it is; a name through the resolver), IPv4-mapped
/// IPv6 addresses as the IPv4 ones they are on the wire.
pub async fn resolve(host: &str) -> Result<Vec<IpAddr>, FirewallError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip.to_canonical()]);
    }
    let found = tokio::time::timeout(DEADLINE, tokio::net::lookup_host((host, 0)))
        .await
        .map_err(|_| FirewallError::Resolve(host.to_owned(), format!("no answer within {DEADLINE:?}")))?
        .map_err(|e| FirewallError::Resolve(host.to_owned(), e.to_string()))?;
    let mut ips: Vec<IpAddr> = found.map(|a| a.ip().to_canonical()).collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        return Err(FirewallError::Resolve(host.to_owned(), "no address".into()));
    }
    Ok(ips)
}

/// The table, whole, as one nftables transaction: created if absent, deleted, made anew.
pub fn ruleset(table: &str, openings: &BTreeMap<Key, Opening>) -> String {
    let mut input = String::new();
    let mut output = String::new();
    for ((job, attempt), o) in openings {
        let (p, uid) = (o.port, o.uid);
        let _ = writeln!(output, "    # job {job} attempt {attempt}");
        let _ = writeln!(output, "    tcp dport {p} meta skuid != {uid} reject with tcp reset");
        let Some(peers) = &o.peers else { continue };
        let _ = writeln!(input, "    # job {job} attempt {attempt}: rank 0");
        let _ = writeln!(input, "    tcp dport {p} iif \"lo\" accept");
        let (v4, v6) = split(peers);
        if !v4.is_empty() {
            let _ = writeln!(input, "    tcp dport {p} ip saddr {{ {} }} accept", v4.join(", "));
        }
        if !v6.is_empty() {
            let _ = writeln!(input, "    tcp dport {p} ip6 saddr {{ {} }} accept", v6.join(", "));
        }
        let _ = writeln!(input, "    tcp dport {p} reject with tcp reset");
    }
    format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  chain input {{\n    type filter hook input priority filter; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority filter; policy accept;\n{output}  }}\n}}\n"
    )
}

/// The addresses by family, each once, without loopback ones (the loopback interface is
/// accepted as a whole; not every nft merges overlapping set elements).
fn split(ips: &[IpAddr]) -> (Vec<String>, Vec<String>) {
    let of = |v6: bool| {
        let mut these: Vec<IpAddr> = ips.iter().map(|ip| ip.to_canonical()).filter(|ip| ip.is_ipv6() == v6 && !ip.is_loopback()).collect();
        these.sort();
        these.dedup();
        these.iter().map(IpAddr::to_string).collect()
    };
    (of(false), of(true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_names_each_attempts_port_its_user_and_its_nodes() {
        let mut openings = BTreeMap::new();
        let peers = ["10.0.0.2", "127.0.0.1", "10.0.0.2", "::1", "::ffff:10.0.0.3", "fd00::2"].map(|p| p.parse().unwrap()).to_vec();
        openings.insert((12, 1), Opening { port: 29_585, uid: 2_000_001, peers: Some(peers) });
        openings.insert((13, 2), Opening { port: 29_593, uid: 2_000_002, peers: None });
        openings.insert((14, 1), Opening { port: 29_598, uid: 2_000_003, peers: Some(vec![]) });
        let want = r#"table inet suanli_agent_7
delete table inet suanli_agent_7
table inet suanli_agent_7 {
  chain input {
    type filter hook input priority filter; policy accept;
    # job 12 attempt 1: rank 0
    tcp dport 29585 iif "lo" accept
    tcp dport 29585 ip saddr { 10.0.0.2, 10.0.0.3 } accept
    tcp dport 29585 ip6 saddr { fd00::2 } accept
    tcp dport 29585 reject with tcp reset
    # job 14 attempt 1: rank 0
    tcp dport 29598 iif "lo" accept
    tcp dport 29598 reject with tcp reset
  }
  chain output {
    type filter hook output priority filter; policy accept;
    # job 12 attempt 1
    tcp dport 29585 meta skuid != 2000001 reject with tcp reset
    # job 13 attempt 2
    tcp dport 29593 meta skuid != 2000002 reject with tcp reset
    # job 14 attempt 1
    tcp dport 29598 meta skuid != 2000003 reject with tcp reset
  }
}
"#;
        assert_eq!(ruleset("suanli_agent_7", &openings), want);
    }

    #[test]
    fn each_agent_of_a_host_has_a_table_of_its_own_that_outlives_its_restarts() {
        let a = RendezvousFirewall::new(FirewallKind::Nftables, 3, std::path::Path::new("/var/lib/suanli/agent"));
        let again = RendezvousFirewall::new(FirewallKind::Nftables, 3, std::path::Path::new("/var/lib/suanli/agent"));
        let other = RendezvousFirewall::new(FirewallKind::Nftables, 3, std::path::Path::new("/srv/agent-2"));
        assert_eq!(a.table(), again.table());
        assert_ne!(a.table(), other.table());
        assert_eq!(a.table(), format!("suanli_agent_3_{:08x}", fnv1a(b"/var/lib/suanli/agent")));
        assert_eq!(fnv1a(b"a"), 0xe40c_292c, "FNV-1a's published value");
    }

    #[test]
    fn an_empty_table_has_chains_and_no_rules() {
        let text = ruleset("t", &BTreeMap::new());
        assert!(!text.contains("dport"), "{text}");
        assert!(text.starts_with("table inet t\ndelete table inet t\n"), "{text}");
    }

    #[tokio::test]
    async fn addresses_resolve_as_they_are_and_names_through_the_resolver() {
        assert_eq!(resolve("10.1.2.3").await.unwrap(), vec!["10.1.2.3".parse::<IpAddr>().unwrap()]);
        assert_eq!(resolve("::1").await.unwrap(), vec!["::1".parse::<IpAddr>().unwrap()]);
        assert_eq!(resolve("::ffff:10.1.2.3").await.unwrap(), vec!["10.1.2.3".parse::<IpAddr>().unwrap()], "as it travels");
        assert!(resolve("localhost").await.unwrap().iter().all(IpAddr::is_loopback));
        assert!(matches!(resolve("no-such-host.invalid").await, Err(FirewallError::Resolve(..))));
    }
}
