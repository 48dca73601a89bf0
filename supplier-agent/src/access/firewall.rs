//! The rendezvous firewall: a job attempt's `MASTER_PORT` is reachable by its own processes
//! only (issue: "opens that port between the lease's own nodes only").
//!
//! `torch.distributed`'s store, on rank 0's node, takes anyone who connects: whoever reaches it
//! can join the job's process group, read its tensors and feed it others. So while an attempt
//! runs, the agent keeps nftables rules in a table of its own (`inet suanli_agent_<node>`):
//!
//! - on rank 0's node (input): the port answers connections from the attempt's other nodes and
//!   from this node only; anything else gets a TCP reset;
//! - on every node of the attempt (output): a process of this node reaches the port (on rank
//!   0's addresses; on rank 0's node, on any of its own) only as the lease's user — another
//!   lease of the same node, which the address rule cannot tell apart, gets a reset.
//!
//! The whole table is replaced in one nftables transaction whenever an attempt starts or ends
//! (`nft -f`: either every rule of the new set is in place or none changed), and emptied when
//! the agent starts (rules an earlier incarnation left are for attempts that died with it). An
//! attempt whose rules cannot be installed does not start.
//!
//! Left as they are: the further ports Gloo and NCCL open between ranks (ephemeral, told
//! through the store this protects); two agents of one host (tests) see each other's lease
//! processes as strangers, so multi-node jobs across them run with the firewall off.

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
    /// Where rank 0 listens (`MASTER_ADDR` resolved); empty on rank 0's own node.
    pub master: Vec<IpAddr>,
    /// On rank 0's node: the other nodes of the attempt, which may connect from outside.
    pub peers: Vec<IpAddr>,
}

impl Opening {
    fn on_rank_zero(&self) -> bool {
        self.master.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("the rendezvous firewall needs nftables' `nft` ({0}): {1} (install nftables, or set access.rendezvous_firewall = \"off\")")]
    Spawn(PathBuf, std::io::Error),
    #[error("nft refused the rendezvous rules: {0}")]
    Refused(String),
    #[error("rendezvous host {0:?} does not resolve: {1}")]
    Resolve(String, String),
}

/// One attempt's key: (job, attempt).
pub type Key = (u64, u32);

/// The agent's rendezvous rules, one table it alone writes.
pub struct RendezvousFirewall {
    kind: FirewallKind,
    table: String,
    nft: PathBuf,
    openings: tokio::sync::Mutex<BTreeMap<Key, Opening>>,
}

impl RendezvousFirewall {
    pub fn new(kind: FirewallKind, node: u64) -> RendezvousFirewall {
        RendezvousFirewall::with_table(kind, format!("suanli_agent_{node}"))
    }

    /// As [`RendezvousFirewall::new`] with a table name of the caller's (tests).
    pub fn with_table(kind: FirewallKind, table: String) -> RendezvousFirewall {
        RendezvousFirewall { kind, table, nft: PathBuf::from("nft"), openings: Default::default() }
    }

    pub fn kind(&self) -> FirewallKind {
        self.kind
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Empties the table (at start: whatever an earlier agent left is for attempts that died
    /// with it).
    pub async fn reset(&self) -> Result<(), FirewallError> {
        let mut openings = self.openings.lock().await;
        openings.clear();
        self.install(&openings).await
    }

    /// Adds `opening` for attempt `key` and installs the rules; nothing changes if they cannot
    /// be installed.
    pub async fn open(&self, key: Key, opening: Opening) -> Result<(), FirewallError> {
        if self.kind == FirewallKind::Off {
            return Ok(());
        }
        let mut openings = self.openings.lock().await;
        let before = openings.insert(key, opening);
        if let Err(e) = self.install(&openings).await {
            match before {
                Some(b) => openings.insert(key, b),
                None => openings.remove(&key),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes attempt `key`'s rules (its process has ended).
    pub async fn close(&self, key: Key) {
        let mut openings = self.openings.lock().await;
        if openings.remove(&key).is_some() {
            if let Err(e) = self.install(&openings).await {
                tracing::error!(job = key.0, attempt = key.1, error = %e, "could not remove a rendezvous rule");
            }
        }
    }

    /// Deletes the table altogether (tests clean up after themselves).
    pub async fn remove_table(&self) -> Result<(), FirewallError> {
        let script = format!("table inet {t}\ndelete table inet {t}\n", t = self.table);
        self.run_nft(&script).await
    }

    async fn install(&self, openings: &BTreeMap<Key, Opening>) -> Result<(), FirewallError> {
        if self.kind == FirewallKind::Off {
            return Ok(());
        }
        self.run_nft(&ruleset(&self.table, openings)).await
    }

    async fn run_nft(&self, script: &str) -> Result<(), FirewallError> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| FirewallError::Spawn(self.nft.clone(), e))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(script.as_bytes()).await.map_err(|e| FirewallError::Refused(e.to_string()))?;
        }
        let out = child.wait_with_output().await.map_err(|e| FirewallError::Refused(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FirewallError::Refused(String::from_utf8_lossy(&out.stderr).trim().to_owned()))
        }
    }
}

/// The addresses `host` names (an address as it is; a name through the resolver).
pub async fn resolve(host: &str) -> Result<Vec<IpAddr>, FirewallError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let found = tokio::net::lookup_host((host, 0)).await.map_err(|e| FirewallError::Resolve(host.to_owned(), e.to_string()))?;
    let mut ips: Vec<IpAddr> = found.map(|a| a.ip()).collect();
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
        let _ = writeln!(input, "    # job {job} attempt {attempt}");
        let _ = writeln!(output, "    # job {job} attempt {attempt}");
        if o.on_rank_zero() {
            let (v4, v6) = split(&o.peers);
            let _ = writeln!(input, "    tcp dport {p} ip saddr {} accept", set(&["127.0.0.0/8".to_owned()], &v4));
            let _ = writeln!(input, "    tcp dport {p} ip6 saddr {} accept", set(&["::1".to_owned()], &v6));
            let _ = writeln!(input, "    tcp dport {p} reject with tcp reset");
            let _ = writeln!(output, "    tcp dport {p} fib daddr type local meta skuid != {uid} reject with tcp reset");
        } else {
            let (v4, v6) = split(&o.master);
            if !v4.is_empty() {
                let _ = writeln!(output, "    tcp dport {p} ip daddr {} meta skuid != {uid} reject with tcp reset", set(&[], &v4));
            }
            if !v6.is_empty() {
                let _ = writeln!(output, "    tcp dport {p} ip6 daddr {} meta skuid != {uid} reject with tcp reset", set(&[], &v6));
            }
        }
    }
    format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  chain input {{\n    type filter hook input priority filter; policy accept;\n{input}  }}\n  chain output {{\n    type filter hook output priority filter; policy accept;\n{output}  }}\n}}\n"
    )
}

fn split(ips: &[IpAddr]) -> (Vec<String>, Vec<String>) {
    // A dual-stack socket's IPv4-mapped address travels as IPv4: the `ip` rules see it.
    let of = |v6: bool| ips.iter().filter(|ip| ip.is_ipv6() == v6).map(IpAddr::to_string).collect();
    (of(false), of(true))
}

fn set(always: &[String], more: &[String]) -> String {
    let all: Vec<&str> = always.iter().chain(more).map(String::as_str).collect();
    format!("{{ {} }}", all.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_names_each_attempts_port_its_user_and_its_nodes() {
        let mut openings = BTreeMap::new();
        openings.insert((12, 1), Opening { port: 29_585, uid: 2_000_001, master: vec![], peers: vec!["10.0.0.2".parse().unwrap()] });
        openings
            .insert((13, 2), Opening { port: 29_593, uid: 2_000_002, master: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()], peers: vec![] });
        let want = "table inet suanli_agent_7
delete table inet suanli_agent_7
table inet suanli_agent_7 {
  chain input {
    type filter hook input priority filter; policy accept;
    # job 12 attempt 1
    tcp dport 29585 ip saddr { 127.0.0.0/8, 10.0.0.2 } accept
    tcp dport 29585 ip6 saddr { ::1 } accept
    tcp dport 29585 reject with tcp reset
    # job 13 attempt 2
  }
  chain output {
    type filter hook output priority filter; policy accept;
    # job 12 attempt 1
    tcp dport 29585 fib daddr type local meta skuid != 2000001 reject with tcp reset
    # job 13 attempt 2
    tcp dport 29593 ip daddr { 10.0.0.1 } meta skuid != 2000002 reject with tcp reset
    tcp dport 29593 ip6 daddr { fd00::1 } meta skuid != 2000002 reject with tcp reset
  }
}
";
        assert_eq!(ruleset("suanli_agent_7", &openings), want);
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
        assert!(resolve("localhost").await.unwrap().iter().all(IpAddr::is_loopback));
        assert!(matches!(resolve("no-such-host.invalid").await, Err(FirewallError::Resolve(..))));
    }
}
