//! Three members, each a broker of its own with its gateway, on loopback: a cluster published
//! at one member's broker is searchable at the others' gateways with its origin; the API
//! answers only its token; a key outside the federation cannot run a gateway.

use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_federation::testing::founded;
use suanli_federation::{keyfile, Keypair, MembershipChain};
use suanli_federation_gateway::api::{CatalogueEntry, MembersView};
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{self, register};
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use suanli_testkit::{eventually, workspace_binary, Service};
use suanli_types::ClusterClass;
use tempfile::TempDir;

const NAMES: [&str; 3] = ["city", "university", "cloud"];
const READ_TOKEN: &str = "federation-read-token-0123456789";
const API_TOKEN: &str = "gateway-api-token-0123456789";

fn gateway_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-federation"))
}

/// Each member's broker gives the gateway a token that may only read.
fn broker_config(dir: &Path) -> String {
    let token_file = dir.join("read-token");
    std::fs::write(&token_file, READ_TOKEN).expect("token file");
    format!("[[broker.services]]\nname = \"federation\"\ntoken_file = \"{}\"\npowers = [\"read\"]\n", token_file.display())
}

struct Member3 {
    _broker: BrokerCluster,
    broker_address: String,
    gateway: Service,
}

struct Federation {
    dir: TempDir,
    members: Vec<Member3>,
}

fn membership(dir: &Path, keys: &[Keypair]) -> PathBuf {
    let members: Vec<(&str, &Keypair)> = NAMES.into_iter().zip(keys).collect();
    let chain = MembershipChain { genesis: founded("test", &members, "cn-north"), changes: vec![] };
    let path = dir.join("membership.json");
    std::fs::write(&path, serde_json::to_string_pretty(&chain).expect("json")).expect("write");
    path
}

async fn start_gateway(dir: &Path, name: &str, key_file: &Path, membership: &Path, broker: &str, dial: Option<&str>) -> anyhow::Result<Service> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, "[federation]\nannounce_every_ms = 300\nanti_entropy_every_ms = 300\n")?;
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--config".into(),
        config.display().to_string(),
        "--key-file".into(),
        key_file.display().to_string(),
        "--membership-file".into(),
        membership.display().to_string(),
        "--listen".into(),
        "/ip4/127.0.0.1/tcp/0".into(),
        "--broker".into(),
        format!("http://{broker}"),
        "--api-listen".into(),
        "127.0.0.1:0".into(),
    ];
    if let Some(d) = dial {
        args.extend(["--dial".into(), d.to_owned()]);
    }
    let env = [("SUANLI_FEDERATION_BROKER_TOKEN", READ_TOKEN), ("SUANLI_FEDERATION_API_TOKEN", API_TOKEN)];
    Service::start(name, gateway_binary(), &args, &env, dir, Duration::from_secs(30)).await
}

async fn federation() -> Federation {
    let dir = TempDir::new().expect("tempdir");
    let broker_binary = workspace_binary("suanli-broker", "suanli-broker").expect("broker binary");
    let mut keys = Vec::new();
    let mut key_files = Vec::new();
    for name in NAMES {
        let path = dir.path().join(format!("{name}.key"));
        keys.push(keyfile::create(&path).expect("key"));
        key_files.push(path);
    }
    let membership = membership(dir.path(), &keys);
    let mut members: Vec<Member3> = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let broker = BrokerCluster::start(&broker_binary, 1, Some(&broker_config(dir.path()))).await.expect("broker");
        let broker_address = broker.address(1).expect("address").to_owned();
        let dial = members.first().map(|first| first.gateway.get("p2p").expect("p2p").split(',').next().unwrap_or("").to_owned());
        let gateway = start_gateway(dir.path(), name, &key_files[i], &membership, &broker_address, dial.as_deref()).await.expect("gateway");
        members.push(Member3 { _broker: broker, broker_address, gateway });
    }
    Federation { dir, members }
}

fn api(member: &Member3) -> String {
    format!("http://{}", member.gateway.get("api").expect("api"))
}

async fn catalogue(member: &Member3, query: &str) -> Vec<CatalogueEntry> {
    let response = reqwest::Client::new().get(format!("{}/v1/catalogue{query}", api(member))).bearer_auth(API_TOKEN).send().await.expect("get");
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.expect("json")
}

#[tokio::test]
async fn a_cluster_published_at_one_member_is_searchable_at_the_others_with_its_origin() {
    let f = federation().await;
    let (cluster, mut supplier) = publish_at_city(&f).await;

    let id = cluster.cluster_id;
    for member in &f.members[1..] {
        let found = eventually(Duration::from_secs(20), Duration::from_millis(100), move || async move {
            catalogue(member, "").await.into_iter().find(|e| e.origin == "city" && e.listing.cluster_id == id)
        })
        .await
        .expect("the listing reached the member");
        assert_eq!((found.listing.total_cards, found.listing.free_cards, found.stale), (4, 4, false));
        assert_eq!(found.listing.gpu_model, cluster.listing.as_ref().expect("listing").gpu_model);
        // The origin filter.
        assert_eq!(catalogue(member, "?origin=city").await.len(), 1);
        assert!(catalogue(member, "?origin=university").await.is_empty());
    }

    // The members page: everyone, connected, each offer's age.
    let members: MembersView = reqwest::Client::new()
        .get(format!("{}/v1/members", api(&f.members[2])))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(members.members.len(), 3);
    assert!(members.members.iter().any(|m| m.name == "city" && m.connected && m.offer_age_ms.is_some()), "{members:?}");

    // The CLI prints it with its origin.
    let out = tokio::process::Command::new(gateway_binary())
        .args(["catalogue", "--endpoint", &api(&f.members[1]), "--token", API_TOKEN])
        .output()
        .await
        .expect("run");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && printed.contains("city") && printed.contains(&cluster.cluster_id.to_string()), "{printed}");

    // Delisted at the origin: gone everywhere.
    supplier.delist_cluster(v1::DelistClusterRequest { request_id: "delist".into(), cluster_id: cluster.cluster_id }).await.expect("delist");
    for member in &f.members[1..] {
        eventually(Duration::from_secs(20), Duration::from_millis(100), move || async move { catalogue(member, "?origin=city").await.is_empty().then_some(()) })
            .await
            .expect("the delisting reached the member");
    }
    drop(f.dir);
}

#[tokio::test]
async fn the_gateway_api_answers_only_its_token_and_names_bad_queries() {
    let f = federation().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/catalogue", api(&f.members[0]));
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let mut request = client.get(&url);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.expect("get");
        assert_eq!(response.status(), 401, "{token:?}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["code"], "UNAUTHENTICATED");
    }
    let response = client.get(format!("{url}?nonsense=1")).bearer_auth(API_TOKEN).send().await.expect("get");
    assert_eq!(response.status(), 400);
    let members = client.get(format!("{}/v1/members", api(&f.members[0]))).send().await.expect("get");
    assert_eq!(members.status(), 401);
}

#[tokio::test]
async fn a_key_outside_the_federation_cannot_run_a_gateway_and_keys_are_never_overwritten() {
    let f = federation().await;
    let outsider = f.dir.path().join("outsider.key");
    keyfile::create(&outsider).expect("key");
    let membership = f.dir.path().join("membership.json");
    let out = tokio::process::Command::new(gateway_binary())
        .args(["serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--api-listen", "127.0.0.1:0"])
        .arg("--key-file")
        .arg(&outsider)
        .arg("--membership-file")
        .arg(&membership)
        .args(["--broker", &format!("http://{}", f.members[0].broker_address)])
        .env("SUANLI_FEDERATION_BROKER_TOKEN", READ_TOKEN)
        .env("SUANLI_FEDERATION_API_TOKEN", API_TOKEN)
        .env("RUST_BACKTRACE", "0")
        .output()
        .await
        .expect("run");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && why.contains("not a member"), "{why}");
    let again = tokio::process::Command::new(gateway_binary()).arg("keygen").arg("--out").arg(&outsider).output().await.expect("run");
    assert!(!again.status.success(), "keygen refuses an existing key file");
}

/// A supplier at "city" publishes a 4-card Class B cluster; returns it and the supplier's client.
async fn publish_at_city(f: &Federation) -> (v1::Cluster, suanli_proto::client::Client) {
    let city = &f.members[0];
    let endpoint = format!("http://{}", city.broker_address);
    let mut platform = suanli_proto::client::connect(&endpoint, Some(PLATFORM_TOKEN)).await.expect("client");
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let mut supplier = suanli_proto::client::connect(&endpoint, Some(&supplier_token)).await.expect("client");
    (fixtures::publish(&mut supplier, ClusterClass::B, 1, 4, "fed").await.expect("publish"), supplier)
}

#[tokio::test]
async fn a_members_portal_shows_the_other_members_offers_with_their_origin_and_the_members() {
    let f = federation().await;
    let (cluster, _supplier) = publish_at_city(&f).await;
    let university = &f.members[1];
    let database = suanli_testkit::portal::database_url(f.dir.path(), false).await.expect("database").expect("sqlite");
    let broker = format!("http://{}", university.broker_address);
    let gateway_api = api(university);
    let extra = ["--federation-api", gateway_api.as_str(), "--federation-token", API_TOKEN];
    let options = PortalOptions { extra: &extra, ..PortalOptions::new(&broker, PLATFORM_TOKEN, &database) };
    let portal = PortalProcess::start(f.dir.path(), &options).await.expect("portal");
    let http = reqwest::Client::new();
    // Anonymous, like the local catalogue.
    let url = format!("{}/api/v1/federation/catalogue", portal.url);
    let id = cluster.cluster_id;
    let entries: Vec<serde_json::Value> = eventually(Duration::from_secs(20), Duration::from_millis(100), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let entries: Vec<serde_json::Value> = http.get(&url).send().await.ok()?.json().await.ok()?;
            entries.iter().any(|e| e["origin"] == "city" && e["listing"]["cluster_id"] == id).then_some(entries)
        }
    })
    .await
    .expect("the portal shows city's offer");
    assert!(entries.iter().all(|e| e["origin"] != "university"), "its own offers are the local catalogue's");
    let only_cloud: Vec<serde_json::Value> = http.get(format!("{url}?origin=cloud")).send().await.expect("get").json().await.expect("json");
    assert!(only_cloud.is_empty());
    let members: serde_json::Value = http.get(format!("{}/api/v1/federation/members", portal.url)).send().await.expect("get").json().await.expect("json");
    assert_eq!(members["members"].as_array().map(Vec::len), Some(3));
    // The page: members and the offer, with its origin.
    let html = http.get(format!("{}/federation", portal.url)).send().await.expect("get").text().await.expect("text");
    assert!(html.contains("data-origin=\"city\"") && html.contains(&cluster.listing.as_ref().expect("listing").title), "{html}");
}

#[tokio::test]
async fn a_portal_outside_any_federation_says_so() {
    let f = federation().await;
    let broker = format!("http://{}", f.members[0].broker_address);
    let database = suanli_testkit::portal::database_url(f.dir.path(), false).await.expect("database").expect("sqlite");
    let portal = PortalProcess::start(f.dir.path(), &PortalOptions::new(&broker, PLATFORM_TOKEN, &database)).await.expect("portal");
    let response = reqwest::get(format!("{}/api/v1/federation/catalogue", portal.url)).await.expect("get");
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"]["code"], "NOT_FOUND");
}
