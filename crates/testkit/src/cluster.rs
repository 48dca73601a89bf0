//! A cluster of real `suanli-broker` processes on loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use suanli_proto::client::{admin, connect, AdminClient, Client};
use suanli_proto::v1;
use tempfile::TempDir;

use crate::link::{Fault, Link};
use crate::{eventually, Service};

pub const PLATFORM_TOKEN: &str = "test-platform-token-0123456789";
/// The cluster format every new broker cluster starts at, before its leader raises it.
const FIRST_CLUSTER_FORMAT: u32 = 5;
const AGENT_CA_CERT: &str = "agent-ca.pem";
const AGENT_CA_KEY: &str = "agent-ca.key";
const SSH_CA_KEY: &str = "ssh-user-ca";

struct Member {
    address: String,
    /// The agent port (mutual TLS).
    agents: String,
    /// The peer port (mutual TLS between nodes): Raft and forwarded calls.
    peer: String,
    metrics: String,
    process: Option<Service>,
    /// The broker this node runs, when not the cluster's (`upgrade`).
    binary: Option<PathBuf>,
}

/// The broker of the release the rolling-upgrade test starts from, as
/// `ops/build-previous-release` builds it (from the commit `ops/previous-release` names).
pub fn previous_release_broker() -> anyhow::Result<PathBuf> {
    previous_release_binary("suanli-broker")
}

/// A binary (`suanli-broker`, `suanli-portal`) of the release named in `ops/previous-release`.
pub fn previous_release_binary(name: &str) -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let named = std::fs::read_to_string(root.join("ops/previous-release"))?;
    let commit = named
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.split_whitespace().next())
        .ok_or_else(|| anyhow!("ops/previous-release names no commit"))?;
    let binary = PathBuf::from(format!("/var/tmp/suanli-previous/{commit}/{name}"));
    if !binary.is_file() {
        bail!("{} is missing: run ops/build-previous-release (.ci/run does)", binary.display());
    }
    Ok(binary)
}

pub struct BrokerCluster {
    binary: PathBuf,
    pub dir: TempDir,
    /// TOML given to every node; each node's file adds its `[broker.peers]` links.
    config: String,
    members: BTreeMap<u64, Member>,
    /// Node `from` reaches node `to` through `links[(from, to)]`.
    links: BTreeMap<(u64, u64), Link>,
}

impl BrokerCluster {
    /// Starts node 1 as a single-node cluster, then adds nodes 2..=n as learners and promotes
    /// them. `config` (TOML text, a `[broker]` table) is given to every node. Nodes 1..=n reach
    /// each other through fault-injectable links; nodes added later by `join` talk directly.
    pub async fn start(binary: &Path, n: u64, config: Option<&str>) -> anyhow::Result<BrokerCluster> {
        Self::start_with(binary, n, config, true).await
    }

    /// As `start`; `links: false` connects the nodes directly (benchmarks: no proxy hop).
    pub async fn start_with(binary: &Path, n: u64, config: Option<&str>, links: bool) -> anyhow::Result<BrokerCluster> {
        let dir = TempDir::new()?;
        let mut all_links = BTreeMap::new();
        for from in (1..=n).filter(|_| links) {
            for to in (1..=n).filter(|to| *to != from) {
                all_links.insert((from, to), Link::bind().await?);
            }
        }
        let links = all_links;
        // One agent CA for every node, as an operator would give it.
        suanli_pki::Ca::load(&dir.path().join(AGENT_CA_CERT), &dir.path().join(AGENT_CA_KEY), true)?;
        suanli_pki::ssh::SshCa::load(&dir.path().join(SSH_CA_KEY), true)?;
        let mut cluster = BrokerCluster { binary: binary.to_owned(), dir, config: config.unwrap_or("").to_owned(), members: BTreeMap::new(), links };
        cluster.spawn(1, ["127.0.0.1:0"; 3], true).await?;
        // A new cluster raises its format in the leader's first rounds: a log entry that would
        // otherwise land at an unknown time in a test (a previous release's broker says 0).
        eventually(Duration::from_secs(30), Duration::from_millis(50), || async {
            cluster.status(1).await.ok().filter(|s| s.cluster_format != FIRST_CLUSTER_FORMAT).map(drop)
        })
        .await
        .context("the new cluster's format was not raised")?;
        for id in 2..=n {
            cluster.join(id).await?;
        }
        Ok(cluster)
    }

    /// A new cluster from a backup (`suanli-broker restore`): node 1's data directory is built
    /// from `backup` and the node started without `--bootstrap` (it is the restored cluster's
    /// only voter); nodes 2..=n then join it as learners and are promoted. New directories,
    /// new ports, nodes connected directly.
    pub async fn restore(binary: &Path, backup: &Path, n: u64) -> anyhow::Result<BrokerCluster> {
        let (program, backup) = (binary.to_owned(), backup.to_owned());
        BrokerCluster::restore_with(binary, n, |data: PathBuf, peer: String| async move {
            let out = tokio::process::Command::new(program)
                .args(["restore", "--node-id", "1", "--peer-address", &peer])
                .arg("--backup")
                .arg(backup)
                .arg("--data-dir")
                .arg(&data)
                .output()
                .await?;
            if !out.status.success() {
                bail!("suanli-broker restore: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        })
        .await
    }

    /// As [`BrokerCluster::restore`], with node 1's data directory built by `restore` (given
    /// the directory and the node's peer address), e.g. by `suanli-ops backup restore`.
    pub async fn restore_with<F, Fut>(binary: &Path, n: u64, restore: F) -> anyhow::Result<BrokerCluster>
    where
        F: FnOnce(PathBuf, String) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let dir = TempDir::new()?;
        suanli_pki::Ca::load(&dir.path().join(AGENT_CA_CERT), &dir.path().join(AGENT_CA_KEY), true)?;
        suanli_pki::ssh::SshCa::load(&dir.path().join(SSH_CA_KEY), true)?;
        let mut cluster = BrokerCluster { binary: binary.to_owned(), dir, config: String::new(), members: BTreeMap::new(), links: BTreeMap::new() };
        // The restored node's peer address is in its membership before it starts: a fixed port.
        let peer = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
        restore(cluster.dir.path().join("node-1"), peer.clone()).await?;
        cluster.spawn(1, ["127.0.0.1:0", "127.0.0.1:0", peer.as_str()], false).await?;
        if let Err(e) = cluster.leader(Duration::from_secs(30)).await {
            let log = cluster.log(1);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!("the restored node became no leader ({e}); its log ends:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        for id in 2..=n {
            cluster.join(id).await?;
        }
        Ok(cluster)
    }

    /// Backs the running cluster up into `out` with `suanli-broker backup` (every node named;
    /// the leader answers). Returns what the command printed. (Awaited, never blocking: the
    /// links between the nodes run on this process's runtime.)
    pub async fn backup(&self, out: &Path) -> anyhow::Result<String> {
        let endpoints: Vec<String> = self.live().iter().filter_map(|id| self.address(*id).ok()).map(|a| format!("http://{a}")).collect();
        let result = tokio::process::Command::new(&self.binary)
            .args(["backup", "--endpoint", &endpoints.join(","), "--platform-token", PLATFORM_TOKEN])
            .arg("--out")
            .arg(out)
            .output()
            .await?;
        if !result.status.success() {
            bail!("suanli-broker backup: {}", String::from_utf8_lossy(&result.stderr));
        }
        Ok(String::from_utf8_lossy(&result.stdout).into_owned())
    }

    /// Starts a fresh node `id` and makes it a voter.
    pub async fn join(&mut self, id: u64) -> anyhow::Result<()> {
        self.spawn(id, ["127.0.0.1:0"; 3], false).await?;
        let address = self.peer_address(id)?.to_owned();
        let mut admin = self.admin(self.any_live()?).await?;
        admin.add_learner(v1::AddLearnerRequest { node_id: id, address }).await.context("add learner")?;
        admin.promote(v1::NodeRef { node_id: id }).await.context("promote")?;
        Ok(())
    }

    /// `[client, agent, peer]` listen addresses.
    async fn spawn(&mut self, id: u64, [listen, agent_listen, peer_listen]: [&str; 3], bootstrap: bool) -> anyhow::Result<()> {
        let data = self.dir.path().join(format!("node-{id}"));
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            listen.into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--agent-listen".into(),
            agent_listen.into(),
            "--peer-listen".into(),
            peer_listen.into(),
            "--agent-ca-cert".into(),
            self.agent_ca_cert().display().to_string(),
            "--agent-ca-key".into(),
            self.dir.path().join(AGENT_CA_KEY).display().to_string(),
            "--ssh-ca-key".into(),
            self.ssh_ca_key().display().to_string(),
        ];
        if bootstrap {
            args.push("--bootstrap".into());
        }
        let mut config = self.config.clone();
        config.push_str("\n[broker.peers]\n");
        for ((_, to), link) in self.links.range((id, 0)..=(id, u64::MAX)) {
            config.push_str(&format!("\"{to}\" = \"{}\"\n", link.listen));
        }
        let config_path = self.dir.path().join(format!("node-{id}.toml"));
        std::fs::write(&config_path, config)?;
        args.extend(["--config".into(), config_path.display().to_string()]);
        let own_binary = self.members.get(&id).and_then(|m| m.binary.clone());
        let service = Service::start(
            &format!("broker-{id}"),
            own_binary.as_deref().unwrap_or(&self.binary),
            &args,
            &[("SUANLI_BROKER_PLATFORM_TOKEN", PLATFORM_TOKEN), ("SUANLI_LOG", "info,openraft=info")],
            self.dir.path(),
            Duration::from_secs(60),
        )
        .await?;
        let address = service.get("grpc")?.to_owned();
        let metrics = service.get("metrics")?.to_owned();
        let agents = service.get("agents")?.to_owned();
        let peer = service.get("peers")?.to_owned();
        // The links carry what nodes send each other: to the peer port.
        let target = peer.parse()?;
        for ((_, to), link) in &self.links {
            if *to == id {
                link.set_target(target);
            }
        }
        self.members.insert(id, Member { address, agents, peer, metrics, process: Some(service), binary: own_binary });
        Ok(())
    }

    /// Node `id`'s peer port, as other nodes reach it (directly, not through a link).
    pub fn peer_address(&self, id: u64) -> anyhow::Result<&str> {
        Ok(&self.members.get(&id).ok_or_else(|| anyhow!("no node {id}"))?.peer)
    }

    pub fn address(&self, id: u64) -> anyhow::Result<&str> {
        Ok(&self.members.get(&id).ok_or_else(|| anyhow!("no node {id}"))?.address)
    }

    /// Node `id`'s agent port, as an agent's `--broker` endpoint (`https://…`).
    pub fn agent_endpoint(&self, id: u64) -> anyhow::Result<String> {
        Ok(format!("https://{}", self.members.get(&id).ok_or_else(|| anyhow!("no node {id}"))?.agents))
    }

    /// A TLS channel to node `id`'s agent port presenting `identity` (an agent's certificate
    /// and key, PEM, as it keeps them in its state directory), or no client certificate.
    pub async fn agent_channel(&self, id: u64, identity: Option<(&str, &str)>) -> anyhow::Result<tonic::transport::Channel> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let ca = std::fs::read_to_string(self.agent_ca_cert()).context("the agent CA")?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        suanli_proto::client::channel_with(&self.agent_endpoint(id)?, Some(tls)).await.map_err(|e| anyhow!("agent port: {e}"))
    }

    /// The platform's SSH user CA key every node signs researchers' certificates with (tests
    /// also sign with it directly, through `ssh-keygen -s`).
    pub fn ssh_ca_key(&self) -> PathBuf {
        self.dir.path().join(SSH_CA_KEY)
    }

    /// The agent CA's certificate, as an agent's `--broker-ca`.
    pub fn agent_ca_cert(&self) -> PathBuf {
        self.dir.path().join(AGENT_CA_CERT)
    }

    /// The agent CA's key, beside [`BrokerCluster::agent_ca_cert`] (a test rotating the CA
    /// writes a new pair there and restarts the nodes).
    pub fn agent_ca_key(&self) -> PathBuf {
        self.dir.path().join(AGENT_CA_KEY)
    }

    /// Replaces the TOML every node is given from its next start on (`restart`, `upgrade`).
    pub fn set_config(&mut self, config: &str) {
        config.clone_into(&mut self.config);
    }

    /// Restarts every node in turn (highest ID first, as an operator rolls a StatefulSet),
    /// each once the cluster has a leader and every live node has caught up.
    pub async fn rolling_restart(&mut self, timeout: Duration) -> anyhow::Result<()> {
        for id in self.ids().into_iter().rev() {
            self.converge(timeout).await?;
            self.stop(id).await?;
            self.restart(id).await?;
        }
        self.converge(timeout).await.map(drop)
    }

    /// The agent (and cluster) CA, certificate and key, as every node was given it.
    pub fn cluster_ca(&self) -> anyhow::Result<suanli_pki::Ca> {
        Ok(suanli_pki::Ca::load(&self.agent_ca_cert(), &self.dir.path().join(AGENT_CA_KEY), false)?)
    }

    pub fn metrics_address(&self, id: u64) -> anyhow::Result<&str> {
        Ok(&self.members.get(&id).ok_or_else(|| anyhow!("no node {id}"))?.metrics)
    }

    /// Node `id`'s Prometheus exposition text.
    pub async fn metrics(&self, id: u64) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self.metrics_address(id)?;
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await?;
        Ok(text)
    }

    /// The OS process ID of a live node (benchmarks read its CPU time).
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.members.get(&id)?.process.as_ref()?.pid()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.members.keys().copied().collect()
    }

    pub fn live(&self) -> Vec<u64> {
        self.members.iter().filter(|(_, m)| m.process.is_some()).map(|(id, _)| *id).collect()
    }

    fn any_live(&self) -> anyhow::Result<u64> {
        self.live().first().copied().ok_or_else(|| anyhow!("no live node"))
    }

    pub async fn client(&self, id: u64, token: &str) -> anyhow::Result<Client> {
        Ok(connect(&format!("http://{}", self.address(id)?), Some(token)).await?)
    }

    pub async fn admin(&self, id: u64) -> anyhow::Result<AdminClient> {
        Ok(admin(&format!("http://{}", self.address(id)?), PLATFORM_TOKEN).await?)
    }

    pub async fn status(&self, id: u64) -> anyhow::Result<v1::ClusterStatus> {
        Ok(self.admin(id).await?.status(v1::StatusRequest {}).await?.into_inner())
    }

    /// The leader as every live node sees it, once they agree.
    pub async fn leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        self.leader_among(&self.live(), timeout).await
    }

    /// The leader as the nodes `ids` see it, once they agree on one of themselves.
    pub async fn leader_among(&self, ids: &[u64], timeout: Duration) -> anyhow::Result<u64> {
        eventually(timeout, Duration::from_millis(50), || async {
            let mut seen = None;
            for id in ids.iter().copied() {
                let leader = self.status(id).await.ok()?.leader_id;
                if leader == 0 || seen.is_some_and(|s| s != leader) {
                    return None;
                }
                seen = Some(leader);
            }
            seen.filter(|l| ids.contains(l))
        })
        .await
    }

    /// Sets the fault on the link from `from` to `to`.
    pub fn fault(&self, from: u64, to: u64, fault: Fault) -> anyhow::Result<()> {
        self.links.get(&(from, to)).ok_or_else(|| anyhow!("no link {from}->{to}"))?.set(fault);
        Ok(())
    }

    /// Cuts every link between `side` and the other nodes, both ways.
    pub fn partition(&self, side: &[u64]) {
        for ((from, to), link) in &self.links {
            if side.contains(from) != side.contains(to) {
                link.set(Fault::Drop);
            }
        }
    }

    /// Everything the links between nodes have carried so far.
    pub fn captured_traffic(&self) -> Vec<u8> {
        self.links.values().flat_map(|link| link.captured()).collect()
    }

    /// Every link passes traffic again.
    pub fn heal(&self) {
        for link in self.links.values() {
            link.set(Fault::None);
        }
    }

    /// `kill -9` of node `id`.
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        let member = self.members.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        match member.process.take() {
            Some(process) => process.kill().await,
            None => bail!("node {id} is not running"),
        }
    }

    /// Upgrades node `id` as an operator would: stops it cleanly (SIGINT), then
    /// starts `binary` on the same addresses and data.
    pub async fn upgrade(&mut self, id: u64, binary: &Path) -> anyhow::Result<()> {
        self.stop(id).await?;
        if let Some(member) = self.members.get_mut(&id) {
            member.binary = Some(binary.to_owned());
        }
        self.restart(id).await
    }

    /// Stops node `id` as an operator would (SIGINT), if it runs; `restart` starts it again.
    pub async fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        let member = self.members.get_mut(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        match member.process.take() {
            Some(process) => process.interrupt(Duration::from_secs(20)).await,
            None => Ok(()),
        }
    }

    /// Restarts a killed node on its old addresses with its old data.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let member = self.members.get(&id).ok_or_else(|| anyhow!("no node {id}"))?;
        let (address, agents, peer) = (member.address.clone(), member.agents.clone(), member.peer.clone());
        self.spawn(id, [&address, &agents, &peer], false).await
    }

    /// Waits until every live node has applied everything the leader has logged now.
    pub async fn converge(&self, timeout: Duration) -> anyhow::Result<u64> {
        let leader = self.leader(timeout).await?;
        let target = self.status(leader).await?.last_log_index;
        eventually(timeout, Duration::from_millis(50), || async {
            for id in self.live() {
                if self.status(id).await.ok()?.applied_index < target {
                    return None;
                }
            }
            Some(target)
        })
        .await
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("broker-{id}.log"))).unwrap_or_default()
    }
}

/// Every lease (only the live ones with `live_only`) as the node behind `client` has applied
/// them, without forwarding to the leader (a stale read), page by page.
pub async fn leases_as_applied(client: &Client, live_only: bool) -> Result<Vec<v1::Lease>, tonic::Status> {
    suanli_proto::client::all_pages(|after| {
        let mut c = client.clone();
        async move {
            let page = v1::ListLeasesRequest { live_only, page_after_id: after, page_size: suanli_proto::client::LARGEST_PAGE };
            let mut request = tonic::Request::new(page);
            request.metadata_mut().insert("x-suanli-read", tonic::metadata::MetadataValue::from_static("stale"));
            let r = c.list_leases(request).await?.into_inner();
            Ok((r.leases, r.next_page_after_id))
        }
    })
    .await
}

/// The history checker of leasing under faults: replays the whole event stream of the cluster
/// behind `platform` (a platform client) from the first entry and panics if a card was ever
/// reserved for a lease while another lease held it. A last write (a researcher registered
/// with request ID `sentinel_id`) marks the end of the history. Returns every lease that was
/// granted cards.
pub async fn check_no_card_held_twice(platform: &mut Client, sentinel_id: &str) -> std::collections::BTreeSet<u64> {
    use tokio_stream::StreamExt;
    let sentinel = platform
        .register_account(v1::RegisterAccountRequest { request_id: sentinel_id.into(), kind: v1::AccountKind::Researcher.into(), token: String::new() })
        .await
        .expect("sentinel")
        .into_inner()
        .account_id;
    let mut stream = platform.watch(v1::WatchRequest { after_index: 0, resync: false }).await.expect("watch").into_inner();
    let mut holder: BTreeMap<u64, u64> = BTreeMap::new();
    let mut granted = std::collections::BTreeSet::new();
    loop {
        let item = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .expect("the event stream went silent before the sentinel")
            .expect("the stream reaches the sentinel");
        let Some(v1::watch_response::Kind::Batch(batch)) = item.expect("item").kind else { panic!("unexpected resync") };
        for event in batch.events {
            match event.kind {
                Some(v1::event::Kind::CardStatusChanged(c)) if c.to == i32::from(v1::CardStatus::Reserved) => {
                    if let Some(other) = holder.insert(c.card_id, c.lease_id) {
                        panic!("card {} reserved for lease {} while lease {other} held it", c.card_id, c.lease_id);
                    }
                    granted.insert(c.lease_id);
                }
                Some(v1::event::Kind::CardStatusChanged(c)) if c.to == i32::from(v1::CardStatus::Idle) => {
                    holder.remove(&c.card_id);
                }
                Some(v1::event::Kind::AccountRegistered(a)) if a.account_id == sentinel => return granted,
                _ => {}
            }
        }
    }
}
