//! Harness of the gateway tests: three members ("city", "university", "cloud"), each a broker
//! of its own (one node) and its gateway, on loopback. Brokers start first
//! ([`Federation::brokers`]) so a test can register what a gateway's configuration names
//! (partner accounts), then the gateways ([`Federation::start_gateways`]).
#![allow(dead_code)] // each test file takes what it needs

use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_federation::testing::founded;
use suanli_federation::{keyfile, Keypair, MembershipChain};
use suanli_federation_gateway::api::CatalogueEntry;
use suanli_testkit::cluster::BrokerCluster;
use suanli_testkit::{workspace_binary, Service};
use tempfile::TempDir;

pub const NAMES: [&str; 3] = ["city", "university", "cloud"];
/// The gateway's token at its own broker: it reads the market and leases other members'
/// cards for this member's researchers.
pub const GATEWAY_TOKEN: &str = "federation-gateway-token-0123456789";
pub const API_TOKEN: &str = "gateway-api-token-0123456789";

pub fn gateway_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-federation"))
}

/// Each member's broker gives the gateway a token that reads and leases for researchers.
fn broker_config(dir: &Path) -> String {
    let token_file = dir.join("gateway-token");
    std::fs::write(&token_file, GATEWAY_TOKEN).expect("token file");
    format!("[[broker.services]]\nname = \"federation\"\ntoken_file = \"{}\"\npowers = [\"read\", \"federation\"]\n", token_file.display())
}

pub struct Member {
    pub name: &'static str,
    pub broker: BrokerCluster,
    pub broker_address: String,
    pub key_file: PathBuf,
    pub gateway: Option<Service>,
}

impl Member {
    pub fn gateway(&self) -> &Service {
        self.gateway.as_ref().expect("the member's gateway runs")
    }

    pub fn api(&self) -> String {
        format!("http://{}", self.gateway().get("api").expect("api"))
    }

    pub fn broker_endpoint(&self) -> String {
        format!("http://{}", self.broker_address)
    }

    /// The gateway (started after this) talks to node `id` of the member's broker cluster.
    pub fn use_node(&mut self, id: u64) {
        self.broker_address = self.broker.address(id).expect("address").to_owned();
    }
}

pub struct Federation {
    pub dir: TempDir,
    pub members: Vec<Member>,
    pub membership: PathBuf,
}

fn membership(dir: &Path, keys: &[Keypair]) -> PathBuf {
    let members: Vec<(&str, &Keypair)> = NAMES.into_iter().zip(keys).collect();
    let chain = MembershipChain { genesis: founded("test", &members, "cn-north"), changes: vec![] };
    let path = dir.join("membership.json");
    std::fs::write(&path, serde_json::to_string_pretty(&chain).expect("json")).expect("write");
    path
}

impl Federation {
    /// The three members' keys, membership and brokers (one node each); no gateway yet.
    pub async fn brokers() -> Federation {
        Federation::brokers_of(&[1, 1, 1]).await
    }

    /// As `brokers`, member i's broker a cluster of `nodes[i]` nodes; its gateway talks to
    /// node 1 (see [`Member::use_node`]).
    pub async fn brokers_of(nodes: &[u64; 3]) -> Federation {
        let dir = TempDir::new().expect("tempdir");
        let broker_binary = workspace_binary("suanli-broker", "suanli-broker").expect("broker binary");
        let mut keys = Vec::new();
        let mut members = Vec::new();
        for (name, n) in NAMES.into_iter().zip(nodes) {
            let key_file = dir.path().join(format!("{name}.key"));
            keys.push(keyfile::create(&key_file).expect("key"));
            let broker = BrokerCluster::start(&broker_binary, *n, Some(&broker_config(dir.path()))).await.expect("broker");
            let broker_address = broker.address(1).expect("address").to_owned();
            members.push(Member { name, broker, broker_address, key_file, gateway: None });
        }
        let membership = membership(dir.path(), &keys);
        Federation { dir, members, membership }
    }

    /// Every member's gateway, `extra[i]` added to member i's `[federation]` table; the later
    /// ones dial the first.
    pub async fn start_gateways(&mut self, extra: &[&str; 3]) {
        for (i, extra) in extra.iter().enumerate() {
            let dial = (i > 0).then(|| self.members[0].gateway().get("p2p").expect("p2p").split(',').next().unwrap_or("").to_owned());
            let gateway = self.start_gateway(i, extra, dial.as_deref()).await.expect("gateway");
            self.members[i].gateway = Some(gateway);
        }
    }

    /// Member i's gateway (again, after a stop: same key, membership and state directory).
    pub async fn start_gateway(&self, i: usize, extra: &str, dial: Option<&str>) -> anyhow::Result<Service> {
        let member = &self.members[i];
        let state_dir = self.dir.path().join(format!("{}-state", member.name));
        std::fs::create_dir_all(&state_dir)?;
        let config = self.dir.path().join(format!("{}.toml", member.name));
        std::fs::write(
            &config,
            format!("[federation]\nannounce_every_ms = 300\nanti_entropy_every_ms = 300\nstate_dir = \"{}\"\n{extra}", state_dir.display()),
        )?;
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--config".into(),
            config.display().to_string(),
            "--key-file".into(),
            member.key_file.display().to_string(),
            "--membership-file".into(),
            self.membership.display().to_string(),
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--broker".into(),
            member.broker_endpoint(),
            "--api-listen".into(),
            "127.0.0.1:0".into(),
        ];
        if let Some(d) = dial {
            args.extend(["--dial".into(), d.to_owned()]);
        }
        let env = [("SUANLI_FEDERATION_BROKER_TOKEN", GATEWAY_TOKEN), ("SUANLI_FEDERATION_API_TOKEN", API_TOKEN)];
        Service::start(member.name, gateway_binary(), &args, &env, self.dir.path(), Duration::from_secs(30)).await
    }
}

/// Three members with their gateways and nothing else configured.
pub async fn federation() -> Federation {
    let mut f = Federation::brokers().await;
    f.start_gateways(&["", "", ""]).await;
    f
}

/// `GET` a path of a member's gateway API with its token; the JSON answer (a success).
pub async fn get<T: serde::de::DeserializeOwned>(member: &Member, path: &str) -> T {
    let response = reqwest::Client::new().get(format!("{}{path}", member.api())).bearer_auth(API_TOKEN).send().await.expect("get");
    assert!(response.status().is_success(), "GET {path}: {}", response.status());
    response.json().await.expect("json")
}

pub async fn catalogue(member: &Member, query: &str) -> Vec<CatalogueEntry> {
    get(member, &format!("/v1/catalogue{query}")).await
}
