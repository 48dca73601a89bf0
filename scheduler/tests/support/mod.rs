//! The scheduler tests' world: a broker, scheduler replicas (the first also serves the
//! artifact store), agents with simulated GPUs enrolled by one supplier and published as one
//! Class B cluster, and a funded researcher holding one active lease per node.
#![allow(dead_code)] // each test takes what it needs

pub mod services;

use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_proto::client::{Bearer, Client};
use suanli_proto::convert::{cluster_class_to_wire, listing_to_wire};
use suanli_proto::v1::{self, job_service_client::JobServiceClient, supplier_service_client::SupplierServiceClient, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{self, register};
use suanli_testkit::{eventually, workspace_binary, Service};
use suanli_types::ClusterClass;
use tempfile::TempDir;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const WAIT: Duration = Duration::from_secs(60);
pub const POLL: Duration = Duration::from_millis(200);
pub const ARTIFACT_TOKEN: &str = "artifact-token-of-the-tests";

pub type Jobs = JobServiceClient<InterceptedService<Channel, Bearer>>;

pub struct Agent {
    pub service: Service,
    pub node: u64,
    pub prefix: String,
}

pub struct World {
    pub supplier: Client,
    pub dir: TempDir,
    pub broker: BrokerCluster,
    pub schedulers: Vec<Option<Service>>,
    pub artifacts: String,
    pub agents: Vec<Agent>,
    pub cluster: u64,
    pub researcher_id: u64,
    pub researcher_token: String,
    pub researcher: Client,
    pub leases: Vec<u64>,
    /// A file every lease's account may append to, outside the system.
    pub record: PathBuf,
}

impl World {
    /// `nodes` agents of `cards` cards each published as one cluster, `replicas` schedulers,
    /// one active lease per node.
    pub async fn start(nodes: usize, cards: u32, replicas: usize) -> World {
        World::start_with(nodes, cards, replicas, &[]).await
    }

    /// As `start`, with more flags for every agent.
    pub async fn start_with(nodes: usize, cards: u32, replicas: usize, agent_flags: &[&str]) -> World {
        let mut w = World::bare_with(nodes, cards, replicas, agent_flags).await;
        let all: Vec<usize> = (0..nodes).collect();
        w.cluster = w.publish(&all, fixtures::HOURLY_PRICE, "all").await;
        for n in 0..nodes {
            let lease = w.lease(w.cluster, cards, &n.to_string()).await;
            w.leases.push(lease);
        }
        w
    }

    /// The processes and a funded researcher; nothing published or leased yet.
    pub async fn bare(nodes: usize, cards: u32, replicas: usize) -> World {
        World::bare_with(nodes, cards, replicas, &[]).await
    }

    async fn bare_with(nodes: usize, cards: u32, replicas: usize, agent_flags: &[&str]) -> World {
        let dir = suanli_testkit::reachable_temp_dir().expect("temp dir");
        // The jobs run as the leases' Unix accounts: they must be able to reach the records.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        // Agents hold no store-wide artifact token: the broker signs each attempt a capability
        // with this key, which the store checks.
        let key = dir.path().join("artifact-key");
        suanli_artifacts::CapabilityKey::load(&key, true).expect("artifact key");
        // And agents' tunnel tickets for the portal (`tunnel-key`, which a test's portal is given).
        let tunnel_key = dir.path().join("tunnel-key");
        suanli_pki::tunnel_ticket::TunnelKey::load(&tunnel_key, true).expect("tunnel key");
        let config = format!("[broker]\nartifact_key_file = \"{}\"\ntunnel_key_file = \"{}\"\n", key.display(), tunnel_key.display());
        let broker = BrokerCluster::start(&workspace_binary("suanli-broker", "suanli-broker").expect("broker"), 1, Some(&config)).await.expect("broker");
        let mut schedulers = Vec::new();
        for i in 0..replicas {
            schedulers.push(Some(scheduler(&broker, dir.path(), &format!("sched-{i}"), i == 0).await));
        }
        let artifacts = format!("http://{}", schedulers[0].as_ref().expect("first").get("artifacts").expect("artifacts address"));
        let mut platform = broker.client(1, PLATFORM_TOKEN).await.expect("platform");
        let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
        let mut agents = Vec::new();
        for n in 0..nodes {
            agents.push(start_agent(&broker, dir.path(), &supplier_token, n, cards, &artifacts, agent_flags).await);
        }
        let supplier = broker.client(1, &supplier_token).await.expect("supplier client");
        let (researcher_id, researcher_token) = register(&mut platform, AccountKind::Researcher, "researcher").await.expect("researcher");
        let researcher = broker.client(1, &researcher_token).await.expect("researcher client");
        let records = dir.path().join("records");
        std::fs::create_dir_all(&records).expect("records dir");
        std::fs::set_permissions(&records, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).expect("chmod");
        let record = records.join("jobs.log");
        std::fs::write(&record, b"").expect("records file");
        std::fs::set_permissions(&record, std::os::unix::fs::PermissionsExt::from_mode(0o666)).expect("chmod");
        World { supplier, dir, broker, schedulers, artifacts, agents, cluster: 0, researcher_id, researcher_token, researcher, leases: Vec::new(), record }
    }

    /// Publishes the agents at `nodes` (indexes) as one Class B cluster at `hourly` fen per
    /// card-hour.
    pub async fn publish(&mut self, nodes: &[usize], hourly: i64, tag: &str) -> u64 {
        let mut listing = fixtures::listing(ClusterClass::B);
        listing.prices.per_card.insert(suanli_types::BillingMode::Hourly, hourly);
        self.supplier
            .publish_cluster(v1::PublishClusterRequest {
                request_id: format!("publish-{tag}"),
                class: cluster_class_to_wire(ClusterClass::B),
                node_ids: nodes.iter().map(|n| self.agents[*n].node).collect(),
                listing: Some(listing_to_wire(&listing)),
            })
            .await
            .expect("publish")
            .into_inner()
            .cluster_id
    }

    /// Leases `cards` cards of `cluster` for an hour and waits until the agents activated it.
    pub async fn lease(&self, cluster: u64, cards: u32, tag: &str) -> u64 {
        let mut researcher = self.researcher.clone();
        let lease = researcher.request_lease(fixtures::hourly_lease(format!("lease-{tag}"), cluster, cards)).await.expect("lease").into_inner().lease_id;
        self.wait_lease(lease, v1::LeaseState::Active).await;
        lease
    }

    pub async fn wait_lease(&self, lease: u64, state: v1::LeaseState) -> v1::Lease {
        eventually(WAIT, POLL, || {
            let mut c = self.researcher.clone();
            async move {
                let l = c.get_lease(v1::GetLeaseRequest { lease_id: lease }).await.ok()?.into_inner();
                (l.state() == state).then_some(l)
            }
        })
        .await
        .unwrap_or_else(|e| panic!("lease {lease} did not become {state:?}: {e}"))
    }

    pub async fn jobs(&self, token: &str) -> Jobs {
        let channel = suanli_proto::client::channel(&format!("http://{}", self.broker.address(1).expect("address"))).await.expect("channel");
        JobServiceClient::with_interceptor(channel, suanli_proto::client::bearer(Some(token)).expect("token"))
    }

    pub async fn submit(&self, jobs: &mut Jobs, tag: &str, spec: &serde_json::Value) -> v1::Job {
        jobs.submit_job(v1::SubmitJobRequest { request_id: format!("job-{tag}"), spec_json: spec.to_string() }).await.expect("submit").into_inner()
    }

    /// What every process said, for a failing test to show.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for s in self.schedulers.iter().flatten().chain(self.agents.iter().map(|a| &a.service)) {
            out.push_str(&format!("---- {} ----\n{}\n", s.name, s.log()));
        }
        out
    }

    pub fn agent_of(&self, node: u64) -> &Agent {
        self.agents.iter().find(|a| a.node == node).expect("an agent of the world")
    }
}

impl Drop for World {
    /// The leases' Unix accounts are real users of this machine: whatever the test left live,
    /// the agents are stopped and this run's accounts (its login prefixes) removed.
    fn drop(&mut self) {
        for agent in &self.agents {
            if let Some(pid) = agent.service.pid() {
                let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
        // Each agent's record of the accounts it made (never a name pattern).
        for n in 0..self.agents.len() {
            suanli_testkit::remove_recorded_lease_accounts(&self.dir.path().join(format!("agent{n}")).join("state"));
        }
    }
}

async fn start_agent(broker: &BrokerCluster, dir: &Path, supplier_token: &str, n: usize, cards: u32, artifacts: &str, flags: &[&str]) -> Agent {
    let channel = suanli_proto::client::channel(&format!("http://{}", broker.address(1).expect("address"))).await.expect("channel");
    let mut icpcss = SupplierServiceClient::with_interceptor(channel, suanli_proto::client::bearer(Some(supplier_token)).expect("token"));
    let token = icpcss
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id: format!("t{n}"), valid_seconds: 600 })
        .await
        .expect("token")
        .into_inner()
        .token;
    let home = dir.join(format!("agent{n}"));
    let devices = home.join("dev");
    std::fs::create_dir_all(&devices).expect("dev");
    for card in 0..cards {
        let out = std::process::Command::new("mknod").arg(devices.join(format!("nvidia{card}"))).args(["c", "195", &card.to_string()]).output().expect("mknod");
        assert!(out.status.success(), "mknod: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Logins of this run and node only, so two agents on one machine never share a Unix user.
    let prefix = format!("j{n}{:05x}z", std::process::id() & 0xf_ffff);
    let args: Vec<String> = [
        "run",
        "--broker",
        &broker.agent_endpoint(1).expect("agent port"),
        "--broker-ca",
        &broker.agent_ca_cert().display().to_string(),
        "--state-dir",
        &home.join("state").display().to_string(),
        "--enrollment-token",
        &token,
        "--hostname",
        &format!("gpu-{n}"),
        "--source",
        "simulated",
        "--sim-model",
        "A100 80GB",
        "--sim-cards",
        &cards.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--ssh-listen",
        "127.0.0.1:0",
        "--home-root",
        &home.join("homes").display().to_string(),
        "--login-prefix",
        &prefix,
        "--devices-dir",
        &devices.display().to_string(),
        "--artifacts-url",
        artifacts,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut args = args;
    // The CV job binary, when this run built it (the `torch` feature; .ci/run sets this).
    if let Some(job) = cv_job_binary() {
        args.extend(["--job-binary".to_owned(), job.display().to_string()]);
        // A test build's suanli-job (and its libtorch) may live under /var/tmp (CI's target
        // directory, the torch venv), which a lease would see as its private one: leases keep
        // a private /tmp and /dev/shm here, and share /var/tmp.
        if job.starts_with("/var/tmp") {
            args.extend(["--private-dirs".to_owned(), "/tmp,/dev/shm".to_owned()]);
        }
    }
    args.extend(flags.iter().map(|f| f.to_string()));
    let binary = workspace_binary("suanli-agent", "suanli-agent").expect("agent binary");
    let service = Service::start(&format!("agent{n}"), &binary, &args, &[], &home, WAIT).await.expect("agent starts");
    let node = service.get("node").expect("node").parse().expect("node id");
    Agent { service, node, prefix }
}

/// `suanli-job` and the CV test data, when both were prepared (`SUANLI_JOB_BINARY`,
/// `SUANLI_CV_DATA`; ops/setup-torch and the `torch` build make them).
pub fn cv_job_binary() -> Option<PathBuf> {
    let job = PathBuf::from(std::env::var_os("SUANLI_JOB_BINARY")?);
    job.is_file().then_some(job)
}

/// The CV test data when `suanli-job` and the data were both prepared; `None` (the test is
/// skipped, saying why) where they were not, and a failure under CI=true, which prepares them.
pub fn cv_data() -> Option<PathBuf> {
    let (Some(_), Some(data)) = (cv_job_binary(), std::env::var_os("SUANLI_CV_DATA").map(PathBuf::from)) else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "SUANLI_JOB_BINARY and SUANLI_CV_DATA must be set under CI=true (.ci/run sets them)");
        eprintln!("skipped: SUANLI_JOB_BINARY and SUANLI_CV_DATA are not set (ops/setup-torch, the torch build)");
        return None;
    };
    Some(data)
}

async fn scheduler(broker: &BrokerCluster, dir: &Path, name: &str, artifacts: bool) -> Service {
    let binary = workspace_binary("suanli-scheduler", "suanli-scheduler").expect("scheduler binary");
    let store = dir.join("artifacts").display().to_string();
    let mut args: Vec<String> = [
        "--broker",
        &format!("http://{}", broker.address(1).expect("address")),
        "--token",
        PLATFORM_TOKEN,
        "--name",
        name,
        "--policy",
        "las",
        "--round-ms",
        "200",
        "--lease-ttl-ms",
        "2000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if artifacts {
        let key = dir.join("artifact-key").display().to_string();
        args.extend(
            ["--artifacts-listen", "127.0.0.1:0", "--artifacts-dir", &store, "--artifacts-token", ARTIFACT_TOKEN, "--artifacts-key-file", &key]
                .map(String::from),
        );
    }
    Service::start(name, &binary, &args, &[], dir, WAIT).await.expect("scheduler starts")
}

/// Waits until at least `n` jobs have ended; returns all jobs then.
pub async fn wait_done(jobs: &mut Jobs, n: usize, within: Duration) -> Vec<v1::Job> {
    eventually(within, POLL, || {
        let c = jobs.clone();
        async move {
            let all = suanli_proto::client::all_jobs(&c, false).await.ok()?;
            let ended = all.iter().filter(|j| !matches!(j.state.as_str(), "queued" | "placed" | "running")).count();
            (ended >= n).then_some(all)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{n} jobs did not end: {e}"))
}

/// Headless Chromium, signed in at the portal as the world's researcher.
pub async fn signed_in_browser(portal: &str) -> suanli_testkit::webdriver::Browser {
    let browser = suanli_testkit::webdriver::Browser::start().await.expect("chromium (ops/install-build-deps)");
    browser.goto(&format!("{portal}/login")).await.expect("login page");
    browser.type_into("input[name=login]", "demo-researcher").await.expect("login");
    browser.type_into("input[name=password]", suanli_portal::demo::DEMO_PASSWORD).await.expect("password");
    browser.click("form.api button[type=submit]").await.expect("submit");
    browser.wait_for("button[data-logout]", WAIT).await.expect("signed in");
    browser
}

/// The project's PyTorch (ops/setup-torch; .ci/run sets `SUANLI_TORCH_VENV`) as a lease's
/// account can run it: the system's interpreter of the venv's version and the venv's packages
/// (the venv's own interpreter may link into a home other accounts cannot enter, as pyenv's
/// under /root does); `None` without the venv or that interpreter.
pub fn system_python_of_the_venv() -> Option<(PathBuf, PathBuf)> {
    let venv = PathBuf::from(std::env::var_os("SUANLI_TORCH_VENV")?);
    let config = std::fs::read_to_string(venv.join("pyvenv.cfg")).ok()?;
    let version = config.lines().find_map(|l| l.strip_prefix("version").map(|v| v.trim_start_matches([' ', '=']).trim().to_owned()))?;
    let minor = version.splitn(3, '.').take(2).collect::<Vec<_>>().join(".");
    let (interpreter, packages) = (PathBuf::from(format!("/usr/bin/python{minor}")), venv.join(format!("lib/python{minor}/site-packages")));
    (interpreter.is_file() && packages.is_dir()).then_some((interpreter, packages))
}

/// The test data's small digits classifier as a built-in job of one card: `epochs` epochs,
/// a checkpoint every ten steps, the model and its metrics as outputs.
pub fn digits_training(data: &Path, epochs: u32) -> serde_json::Value {
    serde_json::json!({
        "name": "digits", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "builtin": { "task": "train_classifier", "params": {
            "data": data.join("digits/images").display().to_string(),
            "training.model": r#"{"arch": "small_cnn", "width": 16}"#,
            "training.optimizer": r#"{"kind": "adam", "lr": 0.003}"#,
            "training.epochs": epochs.to_string(),
            "training.batch_size": "64",
            "training.checkpoint_every_steps": "10",
        } } },
        "outputs": ["model.json", "model.safetensors", "metrics.json"],
        "max_attempts": 1,
    })
}
