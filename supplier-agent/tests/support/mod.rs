//! The harness of the gateway tests and benchmark: a broker, an agent with simulated GPUs and
//! its SSH gateway on loopback, researchers with keys made by `ssh-keygen`, leases as their
//! researchers reach them. Shared as a module (`#[path]` in the benchmark).
#![allow(dead_code)] // each user takes what it needs

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use suanli_proto::client::Client;
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::register;
use suanli_testkit::{eventually, workspace_binary, Service};
use tempfile::TempDir;
use tokio::process::Command;

pub const WAIT: Duration = Duration::from_secs(30);
pub const POLL: Duration = Duration::from_millis(100);

pub struct Node {
    pub broker: BrokerCluster,
    pub dir: TempDir,
    pub agent: Service,
    pub cluster: u64,
    pub prefix: String,
}

pub struct Researcher {
    pub client: Client,
    pub key: PathBuf,
    pub token: String,
}

/// A lease as its researcher reaches it.
pub struct Login {
    pub lease: u64,
    pub login: String,
    pub port: u16,
    pub known_hosts: PathBuf,
    pub key: PathBuf,
    pub cards: Vec<u32>,
}

/// A node with one active lease for the researcher "alice"; `None` (saying why) where lease
/// accounts cannot be made: they are Unix users, so the agent needs root.
pub async fn one_lease(agent_flags: &[&str]) -> Option<(Node, Researcher, Login)> {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return None;
    }
    let node = Node::start_with(agent_flags).await;
    let mut alice = node.researcher("alice").await;
    let login = node.lease(&mut alice, "a").await;
    Some((node, alice, login))
}

pub fn running_as_root() -> bool {
    suanli_testkit::running_as_root()
}

impl Drop for Node {
    /// Whatever the test left (it may have failed half-way): the agent stopped, then every
    /// account it recorded making removed with its processes and groups.
    fn drop(&mut self) {
        if let Some(pid) = self.agent.pid() {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        suanli_testkit::remove_recorded_lease_accounts(&self.dir.path().join("agent"));
    }
}

impl Node {
    /// A broker and one agent with two simulated cards, published as a Class B cluster.
    pub async fn start() -> Node {
        Node::start_with(&[]).await
    }

    /// As `start`, with more agent flags.
    pub async fn start_with(agent_flags: &[&str]) -> Node {
        let binary = workspace_binary("suanli-broker", "suanli-broker").expect("broker binary");
        let broker = BrokerCluster::start(&binary, 1, None).await.expect("broker");
        let dir = suanli_testkit::reachable_temp_dir().expect("temp dir");
        let mut platform = broker.client(1, PLATFORM_TOKEN).await.expect("platform");
        let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
        let simulated = suanli_testkit::agent::start(&broker, dir.path(), &supplier_token, Path::new(env!("CARGO_BIN_EXE_suanli-agent")), 2, agent_flags)
            .await
            .expect("agent starts");
        let (agent, cluster, prefix) = (simulated.agent, simulated.cluster, simulated.prefix);
        Node { broker, dir, agent, cluster, prefix }
    }

    /// A researcher account with an Ed25519 key made by `ssh-keygen` and registered.
    pub async fn researcher(&self, name: &str) -> Researcher {
        let mut platform = self.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
        let (account, token) = register(&mut platform, AccountKind::Researcher, name).await.expect("researcher");
        let key = self.new_key(name).await;
        let mut client = self.broker.client(1, &token).await.expect("client");
        let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
        client.add_ssh_key(v1::AddSshKeyRequest { request_id: format!("key-{name}"), account_id: account, public_key: public }).await.expect("add key");
        Researcher { client, key, token }
    }

    pub async fn new_key(&self, name: &str) -> PathBuf {
        let key = self.dir.path().join(format!("{name}.key"));
        let out = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&key).output().await.expect("ssh-keygen");
        assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        // ssh-keygen names the public half `<file>.pub`.
        std::fs::rename(format!("{}.pub", key.display()), key.with_extension("pub")).expect("rename");
        key
    }

    /// Leases one card and waits until the agent has provisioned it and it is active.
    pub async fn lease(&self, researcher: &mut Researcher, tag: &str) -> Login {
        let lease = researcher
            .client
            .request_lease(suanli_testkit::fixtures::hourly_lease(format!("lease-{tag}"), self.cluster, 1))
            .await
            .expect("lease")
            .into_inner()
            .lease_id;
        let access = eventually(WAIT, POLL, || {
            let mut client = researcher.client.clone();
            async move {
                let access = client.get_lease_access(v1::GetLeaseRequest { lease_id: lease }).await.ok()?.into_inner();
                (access.state() == v1::LeaseState::Active && !access.nodes.is_empty()).then_some(access)
            }
        })
        .await
        .expect("the lease becomes active with access details");
        let node = &access.nodes[0];
        assert_eq!(node.login, format!("{}{lease}", self.prefix));
        assert_eq!(node.ssh_command, format!("ssh -p {} {}@127.0.0.1", node.ssh_port, node.login));
        let known_hosts = self.dir.path().join(format!("known_hosts-{tag}"));
        std::fs::write(&known_hosts, format!("{}\n", node.known_hosts_line)).expect("known_hosts");
        Login { lease, login: node.login.clone(), port: node.ssh_port as u16, known_hosts, key: researcher.key.clone(), cards: node.card_indexes.clone() }
    }

    pub async fn end(&self, researcher: &mut Researcher, login: &Login) {
        researcher
            .client
            .end_lease(v1::EndLeaseRequest { request_id: format!("end-{}", login.lease), lease_id: login.lease, reason: v1::EndReason::ByResearcher.into() })
            .await
            .expect("end lease");
        // Wait for the agent to take the account down, so no test leaves a Unix user behind
        // (the agent is killed when the test's `Node` goes).
        let name = login.login.clone();
        eventually(WAIT, POLL, || {
            let name = name.clone();
            async move {
                let out = Command::new("getent").args(["passwd", &name]).output().await.ok()?;
                (!out.status.success()).then_some(())
            }
        })
        .await
        .expect("the agent removes the ended lease's account");
    }
}

impl Login {
    /// OpenSSH options: only this key, the published host key checked strictly, no prompts.
    pub fn options(&self, key: &Path) -> Vec<String> {
        [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            &format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-i",
            &key.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    pub fn ssh(&self, extra: &[&str], remote: &str) -> Command {
        self.ssh_with_key(&self.key, extra, remote)
    }

    pub fn ssh_with_key(&self, key: &Path, extra: &[&str], remote: &str) -> Command {
        let mut command = Command::new("ssh");
        command
            .args(self.options(key))
            .args(["-p", &self.port.to_string()])
            .args(extra)
            .arg(format!("{}@127.0.0.1", self.login))
            .arg(remote)
            .kill_on_drop(true);
        command
    }

    /// `ssh` with the password only (answered through `SSH_ASKPASS`), one prompt.
    pub async fn run_with_password(&self, dir: &Path, password: &str, remote: &str) -> Output {
        let askpass = dir.join("askpass.sh");
        std::fs::write(&askpass, "#!/bin/sh\nprintf '%s\\n' \"$SUANLI_TEST_PASSWORD\"\n").expect("askpass");
        std::fs::set_permissions(&askpass, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        Command::new("ssh")
            .args(["-o", "StrictHostKeyChecking=yes", "-o", &format!("UserKnownHostsFile={}", self.known_hosts.display())])
            .args(["-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1"])
            .args(["-p", &self.port.to_string()])
            .arg(format!("{}@127.0.0.1", self.login))
            .arg(remote)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("SUANLI_TEST_PASSWORD", password)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .expect("ssh runs")
    }

    pub async fn run(&self, remote: &str) -> Output {
        self.ssh(&[], remote).output().await.expect("ssh runs")
    }

    pub fn scp(&self) -> Command {
        let mut command = Command::new("scp");
        command.args(self.options(&self.key)).args(["-P", &self.port.to_string()]);
        command
    }

    pub fn remote(&self, path: &str) -> String {
        format!("{}@127.0.0.1:{path}", self.login)
    }
}

pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn said(out: &Output) -> String {
    format!("status {:?}\nstdout: {}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub async fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().await.expect("sha256sum");
    text(&out).split_whitespace().next().unwrap_or_default().to_owned()
}

pub fn login_clone(l: &Login) -> Login {
    Login { lease: l.lease, login: l.login.clone(), port: l.port, known_hosts: l.known_hosts.clone(), key: l.key.clone(), cards: l.cards.clone() }
}

/// Starts a one-line TCP service on the node's loopback `port`, as the lease's user (over
/// SSH), and waits until it listens.
pub async fn serve_as_lease(login: &Login, port: u16, greeting: &str) {
    let serve = format!(
        "nohup python3 -c 'import socket; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((\"127.0.0.1\", {port})); s.listen(); [c.sendall(b\"{greeting}\\n\") or c.close() for c, _ in iter(s.accept, None)]' >/dev/null 2>&1 &"
    );
    let out = login.run(&serve).await;
    assert!(out.status.success(), "{}", said(&out));
    eventually(WAIT, POLL, || async { suanli_agent::access::listeners::owners([127, 0, 0, 1].into(), port).first().copied() })
        .await
        .expect("the service listens");
}
