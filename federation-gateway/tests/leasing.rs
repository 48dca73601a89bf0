//! Leasing across members, with real processes: three members (a broker and a gateway each),
//! "city" owning a node (a real agent with simulated cards and its SSH gateway), "university"
//! and "cloud" its partners. A researcher on cloud's portal finds city's cards in the
//! federated catalogue, leases one, logs in with the real OpenSSH client, ends the lease, and
//! both members' ledgers and settlement reports agree. Lease accounts are Unix
//! users, so these tests need root (and fail under CI=true without it).

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use suanli_federation_gateway::api::{AccessView, RemoteLeaseView, SettlementsView};
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{check_no_card_held_twice, PLATFORM_TOKEN};
use suanli_testkit::fixtures::register;
use suanli_testkit::observability::{exposed_series, missing, referenced_series};
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use suanli_testkit::{eventually, workspace_binary};
use support::{catalogue, Federation, Member, API_TOKEN};

const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);
/// What every researcher account has paid in when registered (partner accounts run on credit).
const FUNDS: i64 = suanli_testkit::fixtures::RESEARCHER_FUNDS;
/// City's price per card-hour (minor units).
const HOURLY: i64 = 3_600_000;
/// The credit city grants each partner member's account.
const CREDIT: i64 = 50_000_000;

struct Market {
    f: Federation,
    /// City's node, its cluster and the supplier's account there.
    node: suanli_testkit::agent::SimulatedNode,
    supplier: u64,
    /// The partner accounts at city: university's and cloud's.
    partners: [u64; 2],
    /// City's gateway configuration (its partners), to start it again.
    city_config: String,
}

impl Drop for Market {
    fn drop(&mut self) {
        if let Some(pid) = self.node.agent.pid() {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
        suanli_testkit::remove_recorded_lease_accounts(&self.f.dir.path().join("node/agent"));
    }
}

/// The market, or `None` (saying why) where lease accounts cannot be made.
async fn market() -> Option<Market> {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return None;
    }
    let mut f = Federation::brokers().await;
    let city = &f.members[0];
    let mut platform = city.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let (supplier, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let node_dir = f.dir.path().join("node");
    std::fs::create_dir_all(&node_dir).expect("node dir");
    let agent_binary = workspace_binary("suanli-agent", "suanli-agent").expect("agent binary");
    let node = suanli_testkit::agent::start(&city.broker, &node_dir, &supplier_token, &agent_binary, 2, &[]).await.expect("agent");
    // Dear enough that seconds of use cost money: one minor unit a card-millisecond.
    let mut listing = suanli_testkit::fixtures::listing(suanli_types::ClusterClass::B);
    listing.prices.per_card.insert(suanli_types::BillingMode::Hourly, HOURLY);
    let mut supplier_client = city.broker.client(1, &supplier_token).await.expect("supplier");
    supplier_client
        .modify_cluster(v1::ModifyClusterRequest {
            request_id: "price".into(),
            cluster_id: node.cluster,
            listing: Some(suanli_proto::convert::listing_to_wire(&listing)),
        })
        .await
        .expect("price");
    let (config, partners) = partner_accounts(&f).await;
    f.start_gateways(&[&config, "", ""]).await;
    let market = Market { f, node, supplier, partners, city_config: config };
    let cluster = market.node.cluster;
    for member in &market.f.members[1..] {
        eventually(
            WAIT,
            POLL,
            move || async move { catalogue(member, "?origin=city").await.into_iter().any(|e| e.listing.cluster_id == cluster).then_some(()) },
        )
        .await
        .expect("city's cards are in the federated catalogue");
    }
    Some(market)
}

/// City's operator opens an account for each partner member (university, cloud) with the
/// credit it extends (`suanli-federation partner`); returns the lines for city's gateway
/// configuration and the two accounts.
async fn partner_accounts(f: &Federation) -> (String, [u64; 2]) {
    let city = &f.members[0];
    let mut partners = [0; 2];
    let mut config = String::new();
    for (i, partner) in ["university", "cloud"].into_iter().enumerate() {
        let token_file = f.dir.path().join(format!("partner-{partner}.token"));
        let out = tokio::process::Command::new(support::gateway_binary())
            .args(["partner", "--broker", &city.broker_endpoint(), "--token", PLATFORM_TOKEN, "--member", partner])
            .args(["--credit-minor", &CREDIT.to_string(), "--out"])
            .arg(&token_file)
            .output()
            .await
            .expect("run");
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{printed}{}", String::from_utf8_lossy(&out.stderr));
        config.push_str(&printed);
        partners[i] = printed.rsplit("acc-").next().and_then(|id| id.trim().parse().ok()).expect("the account's ID");
    }
    (config, partners)
}

/// A researcher account at `member` (with money paid in).
async fn researcher(member: &Member, name: &str) -> u64 {
    let mut platform = member.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    register(&mut platform, AccountKind::Researcher, name).await.expect("researcher").0
}

/// An SSH key made by `ssh-keygen` (the public half next to it, `.pub`).
async fn new_key(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let out =
        tokio::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"]).arg(&key).output().await.expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    key
}

async fn post(member: &Member, path: &str, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new().post(format!("{}{path}", member.api())).bearer_auth(API_TOKEN).json(&body).send().await.expect("post");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn lease(member: &Member, researcher: u64, key: &str, cluster: u64, cards: u32) -> (u16, Value) {
    let body =
        json!({"researcher_id": researcher, "key": key, "origin": "city", "cluster_id": cluster, "cards": cards, "billing_mode": "hourly", "periods": 1});
    post(member, "/v1/remote-leases", body).await
}

async fn balance(member: &Member, account: u64) -> v1::Balance {
    let mut platform = member.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    platform.get_balance(v1::GetBalanceRequest { account_id: account, currency: "CNY".into() }).await.expect("balance").into_inner()
}

async fn remote_leases(member: &Member, researcher: u64) -> Vec<RemoteLeaseView> {
    support::get(member, &format!("/v1/remote-leases?researcher_id={researcher}")).await
}

/// The gateway's Prometheus text.
async fn metrics(member: &Member) -> String {
    let response = reqwest::Client::new().get(format!("{}/metrics", member.api())).bearer_auth(API_TOKEN).send().await.expect("metrics");
    assert!(response.status().is_success(), "GET /metrics: {}", response.status());
    response.text().await.expect("text")
}

async fn settlements(member: &Member) -> SettlementsView {
    support::get(member, "/v1/settlements").await
}

/// Cloud's portal, its demo researcher adopting `researcher`'s broker account, linked to cloud's
/// gateway; logged in (the session cookie and CSRF token kept).
struct Portal {
    _process: PortalProcess,
    url: String,
    http: reqwest::Client,
    csrf: String,
}

impl Portal {
    async fn start(f: &Federation, member: &Member, researcher: u64, token: &str) -> Portal {
        let database = suanli_testkit::portal::database_url(f.dir.path(), false).await.expect("database").expect("sqlite");
        let (broker, gateway_api, adopt) = (member.broker_endpoint(), member.api(), format!("{researcher}:{token}"));
        let extra = ["--federation-api", gateway_api.as_str(), "--federation-token", API_TOKEN, "--demo", "--demo-researcher", adopt.as_str()];
        let options = PortalOptions { extra: &extra, ..PortalOptions::new(&broker, PLATFORM_TOKEN, &database) };
        let process = PortalProcess::start(f.dir.path(), &options).await.expect("portal");
        let suanli_testkit::portal::Session { http, csrf } =
            suanli_testkit::portal::log_in(&process.url, "demo-researcher", suanli_portal::demo::DEMO_PASSWORD).await.expect("signed in");
        Portal { url: process.url.clone(), _process: process, http, csrf }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.http.post(format!("{}{path}", self.url)).header("x-csrf-token", &self.csrf).json(&body).send().await.expect("post");
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    async fn page(&self, path: &str) -> String {
        self.http.get(format!("{}{path}", self.url)).send().await.expect("get").text().await.expect("text")
    }
}

/// Logs into a node of a lease with `key` and its certificate; what `id -un` and
/// `$CUDA_VISIBLE_DEVICES` say there.
async fn log_in(dir: &Path, key: &Path, access: &AccessView) -> Vec<String> {
    let node = &access.nodes[0];
    let certificate = key.with_file_name(format!("{}-cert.pub", key.file_name().expect("name").to_string_lossy()));
    std::fs::write(&certificate, &access.certificate).expect("certificate");
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, format!("{}\n", node.known_hosts_line)).expect("known_hosts");
    let out = tokio::process::Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-o")
        .arg(format!("CertificateFile={}", certificate.display()))
        .arg("-i")
        .arg(key)
        .args(["-p", &node.port.to_string(), &format!("{}@{}", node.login, node.host), "id -un; echo $CUDA_VISIBLE_DEVICES"])
        .output()
        .await
        .expect("ssh");
    assert!(out.status.success(), "ssh: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_researcher_on_one_members_portal_finds_leases_logs_into_and_pays_for_another_members_card() {
    let Some(m) = market().await else { return };
    let (city, cloud) = (&m.f.members[0], &m.f.members[2]);
    let mut platform = cloud.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let (alice, alice_token) = register(&mut platform, AccountKind::Researcher, "alice").await.expect("alice");
    let key = new_key(m.f.dir.path(), "alice").await;
    let portal = Portal::start(&m.f, cloud, alice, &alice_token).await;

    // Found in cloud's own catalogue search, with its origin, and on the federation page with a
    // lease form.
    let search = portal.page("/?gpu_model=l40s").await;
    assert!(search.contains("data-origin=\"city\""), "{search}");
    assert!(!portal.page("/?gpu_model=no-such-gpu").await.contains("data-origin=\"city\""), "the filters apply to other members' offers");
    let page = portal.page("/federation").await;
    assert!(page.contains("data-origin=\"city\"") && page.contains("/api/v1/federation/leases"), "{page}");
    // Leased from the portal: cloud holds alice's money, city leases its card.
    let request = json!({"origin": "city", "cluster_id": m.node.cluster, "cards": 1, "billing_mode": "hourly", "periods": 1, "request_id": "alice-1"});
    let (status, body) = portal.post("/api/v1/federation/leases", request.clone()).await;
    assert_eq!(status, 201, "{body}");
    let remote: RemoteLeaseView = serde_json::from_value(body).expect("a remote lease");
    assert_eq!((remote.state.as_str(), remote.member.as_str(), remote.cards), ("active", "city", 1));
    assert!(remote.owner_lease_id > 0 && remote.held_minor == HOURLY);
    let (status, again) = portal.post("/api/v1/federation/leases", request).await;
    assert_eq!((status, again["id"].as_u64()), (201, Some(remote.id)), "a retry is the same lease");
    let at_cloud = balance(cloud, alice).await;
    assert_eq!((at_cloud.available_minor, at_cloud.remote_held_minor), (FUNDS - remote.held_minor, remote.held_minor));
    // City's lease is the partner account's: cloud's researchers never hold city accounts.
    let mut city_platform = city.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let owner_lease = city_platform.get_lease(v1::GetLeaseRequest { lease_id: remote.owner_lease_id }).await.expect("lease").into_inner();
    assert_eq!((owner_lease.researcher_id, owner_lease.cluster_id), (m.partners[1], m.node.cluster));

    // Logging in: city's access gateway and a certificate for alice's key, once city's agent
    // has provisioned the lease.
    let public_key = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let access: AccessView = eventually(WAIT, POLL, || {
        let (portal, public_key) = (&portal, public_key.clone());
        async move {
            let (status, body) = portal.post(&format!("/api/v1/federation/leases/{}/access", remote.id), json!({"public_key": public_key})).await;
            let access: AccessView = (status == 200).then(|| serde_json::from_value(body).ok()).flatten()?;
            (access.state == "active" && !access.nodes.is_empty()).then_some(access)
        }
    })
    .await
    .expect("the owner's lease becomes active with access details");
    let said = log_in(m.f.dir.path(), &key, &access).await;
    let cards = access.nodes[0].card_indexes.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    assert_eq!(said, vec![access.nodes[0].login.clone(), cards]);
    let page = portal.page("/federation").await;
    assert!(page.contains(&format!("data-remote-lease=\"{}\"", remote.id)) && page.contains(&format!("lease-{}", remote.owner_lease_id)), "{page}");

    // Another researcher of cloud sees nothing of alice's lease and cannot log into it or end it.
    let (bob, _) = register(&mut platform, AccountKind::Researcher, "bob").await.expect("bob");
    let (status, _) = post(cloud, &format!("/v1/remote-leases/{}/access", remote.id), json!({"researcher_id": bob, "public_key": public_key})).await;
    assert_eq!(status, 404);
    let (status, _) = post(cloud, &format!("/v1/remote-leases/{}/end", remote.id), json!({"researcher_id": bob})).await;
    assert_eq!(status, 404);

    // Ending it: city charges its partner account, cloud takes the same from alice's hold and
    // returns the rest; both keep the same settlement, signed by both.
    let (status, body) = portal.post(&format!("/api/v1/federation/leases/{}/end", remote.id), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let ended: RemoteLeaseView = serde_json::from_value(body).expect("ended");
    assert_eq!(ended.state, "ended");
    assert!(ended.charged_minor > 0 && ended.charged_minor <= ended.held_minor, "{ended:?}");
    let at_cloud = balance(cloud, alice).await;
    assert_eq!((at_cloud.available_minor, at_cloud.remote_held_minor), (FUNDS - ended.charged_minor, 0));
    let partner = balance(city, m.partners[1]).await;
    assert_eq!((partner.available_minor, partner.held_minor), (-ended.charged_minor, 0), "city charged cloud's account the same, on credit");
    assert!(balance(city, m.supplier).await.earnings_minor > 0, "city's supplier earned");
    let at_city =
        eventually(WAIT, POLL, || async { Some(settlements(city).await).filter(|s| !s.records.is_empty()) }).await.expect("city got the countersignature");
    let at_cloud = settlements(cloud).await;
    assert_eq!(at_city.report, at_cloud.report, "both members' reports agree");
    assert_eq!(at_city.records, at_cloud.records);
    let row = &at_city.report[0];
    assert_eq!((row.debtor.as_str(), row.creditor.as_str(), row.amount_minor, row.leases), ("cloud", "city", ended.charged_minor, 1));
    // City took the countersignature: nothing waits at cloud.
    let text = metrics(cloud).await;
    assert!(text.contains("suanli_gateway_settlements_undelivered 0\n"), "{text}");
    // The CLI prints the same report.
    let out = tokio::process::Command::new(support::gateway_binary())
        .args(["settlement", "--endpoint", &cloud.api(), "--token", API_TOKEN])
        .output()
        .await
        .expect("run");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && printed.contains("cloud") && printed.contains(&ended.charged_minor.to_string()), "{printed}");
}

#[tokio::test]
async fn a_retried_request_applies_once_on_both_sides_and_a_refused_one_returns_the_money() {
    let Some(m) = market().await else { return };
    let (city, cloud) = (&m.f.members[0], &m.f.members[2]);
    let alice = researcher(cloud, "alice").await;
    let (status, first) = lease(cloud, alice, "same-key", m.node.cluster, 1).await;
    assert_eq!(status, 200, "{first}");
    for _ in 0..3 {
        let (status, again) = lease(cloud, alice, "same-key", m.node.cluster, 1).await;
        assert_eq!(status, 200, "{again}");
        assert_eq!(again["id"], first["id"], "the same remote lease");
        assert_eq!(again["owner_lease_id"], first["owner_lease_id"], "the same lease at the owner");
    }
    let held = first["held_minor"].as_i64().expect("held");
    assert_eq!(balance(cloud, alice).await.remote_held_minor, held, "held once");
    let platform = city.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let leases = suanli_proto::client::all_leases(&platform, true).await.expect("leases");
    assert_eq!(leases.iter().filter(|l| l.researcher_id == m.partners[1]).count(), 1, "one lease at city");

    // More cards than city has: city refuses, nothing is held at cloud any more, and asking
    // again with the same key gets the same refusal (the owner remembers its verdict).
    for _ in 0..2 {
        let (status, body) = lease(cloud, alice, "too-many", m.node.cluster, 5).await;
        assert_eq!(status, 409, "{body}");
        assert_eq!(body["error"]["code"], "REFUSED");
        assert!(body["error"]["owner_code"].as_str().is_some_and(|c| !c.is_empty()), "the owner's own code: {body}");
        assert_eq!(balance(cloud, alice).await.remote_held_minor, held, "the refused request's hold went back");
    }
    // A cluster city does not announce: refused before anything is held.
    let (status, _) = lease(cloud, alice, "nowhere", 999_999, 1).await;
    assert_eq!(status, 400);
    // City holds the partner account's money for the one lease it made, and nothing else.
    let partner = balance(city, m.partners[1]).await;
    assert_eq!((partner.held_minor, partner.available_minor), (HOURLY, -HOURLY));

    // Ended, then asked for again with the same key: the ended lease, no new one at city.
    let id = first["id"].as_u64().expect("id");
    let (status, body) = post(cloud, &format!("/v1/remote-leases/{id}/end"), json!({"researcher_id": alice})).await;
    assert_eq!(status, 200, "{body}");
    let (status, again) = lease(cloud, alice, "same-key", m.node.cluster, 1).await;
    assert_eq!((status, again["id"].as_u64(), again["state"].as_str()), (200, Some(id), Some("ended")), "{again}");
    let leases = suanli_proto::client::all_leases(&platform, false).await.expect("leases");
    assert_eq!(leases.iter().filter(|l| l.researcher_id == m.partners[1]).count(), 1, "still one lease at city");
    // Another researcher's same key is another request.
    let bob = researcher(cloud, "bob").await;
    let (status, theirs) = lease(cloud, bob, "same-key", m.node.cluster, 1).await;
    assert_eq!(status, 200, "{theirs}");
    assert_ne!(theirs["id"], first["id"]);
}

#[tokio::test]
async fn two_members_racing_for_the_owners_last_cards_never_both_win() {
    let Some(m) = market().await else { return };
    let (university, cloud) = (&m.f.members[1], &m.f.members[2]);
    let u = researcher(university, "ursula").await;
    let c = researcher(cloud, "carl").await;
    const ROUNDS: usize = 100;
    for round in 0..ROUNDS {
        // Both ask for every card city has.
        let key = format!("race-{round}");
        let (a, b) = tokio::join!(lease(university, u, &key, m.node.cluster, 2), lease(cloud, c, &key, m.node.cluster, 2));
        let winners: Vec<(&Member, u64, &Value)> =
            [(university, u, &a), (cloud, c, &b)].into_iter().filter(|(_, _, (s, _))| *s == 200).map(|(m, r, (_, v))| (m, r, v)).collect();
        assert_eq!(winners.len(), 1, "round {round}: exactly one wins: {a:?} {b:?}");
        let losers = [&a, &b].into_iter().filter(|(s, _)| *s != 200).count();
        assert_eq!(losers, 1);
        // The winner gives the cards back at once.
        let (member, researcher, won) = winners[0];
        let id = won["id"].as_u64().expect("id");
        let (status, body) = post(member, &format!("/v1/remote-leases/{id}/end"), json!({"researcher_id": researcher})).await;
        assert_eq!(status, 200, "round {round}: {body}");
    }
    // No money stuck in holds on either side.
    assert_eq!(balance(university, u).await.remote_held_minor, 0);
    assert_eq!(balance(cloud, c).await.remote_held_minor, 0);
}

#[tokio::test]
async fn while_the_owner_is_away_its_leases_are_reported_unreachable_and_requests_resume_when_it_returns() {
    let Some(mut m) = market().await else { return };
    let cloud = &m.f.members[2];
    let alice = researcher(cloud, "alice").await;
    let (status, body) = lease(cloud, alice, "before", m.node.cluster, 1).await;
    assert_eq!(status, 200, "{body}");
    let active = body["id"].as_u64().expect("id");

    // City's gateway goes away: the call in flight ends with a clear error, the money stays
    // held for the request (it is not lost, nor charged), and the live lease is reported
    // unreachable instead of vanishing.
    m.f.members[0].gateway.take().expect("city's gateway").kill().await.expect("kill");
    let cloud = &m.f.members[2];
    let (status, body) = lease(cloud, alice, "while-away", m.node.cluster, 1).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "UNAVAILABLE");
    let away = eventually(WAIT, POLL, || async {
        let leases = remote_leases(cloud, alice).await;
        (leases.len() == 2 && leases.iter().all(|l| l.unreachable_for_ms.is_some())).then_some(leases)
    })
    .await
    .expect("both leases are reported unreachable");
    let waiting = away.iter().find(|l| l.id != active).expect("the request made while away");
    // The operator sees it too: the gauge the SuanliFederationOwnerUnreachable alert reads (and
    // every `suanli_gateway_*` series the dashboards and alerts name is served).
    let text = metrics(cloud).await;
    assert!(text.contains("suanli_gateway_remote_leases_owner_unreachable 2\n"), "{text}");
    let referenced = referenced_series();
    assert!(referenced.iter().any(|n| n.starts_with("suanli_gateway_")), "the alerts name the gateway's series");
    let lacking = missing(&referenced, &["suanli_gateway_"], &exposed_series(&text));
    assert!(lacking.is_empty(), "named in ops/grafana or ops/prometheus but not served: {lacking:?}");
    assert_eq!(waiting.state, "requested");
    assert_eq!(balance(cloud, alice).await.remote_held_minor, 2 * HOURLY, "both holds kept");

    // Back (same key and journal; it dials cloud): the waiting request is leased by the
    // reconciler, nothing is reported unreachable any more, and city holds two leases.
    let dial = cloud.gateway().get("p2p").expect("p2p").split(',').next().unwrap_or("").to_owned();
    let gateway = m.f.start_gateway(0, &m.city_config, Some(&dial)).await.expect("city again");
    m.f.members[0].gateway = Some(gateway);
    let cloud = &m.f.members[2];
    eventually(WAIT, POLL, || async { remote_leases(cloud, alice).await.iter().all(|l| l.state == "active" && l.unreachable_for_ms.is_none()).then_some(()) })
        .await
        .expect("the request made while away is leased once city is back");
    assert!(metrics(cloud).await.contains("suanli_gateway_remote_leases_owner_unreachable 0\n"));
    let platform = m.f.members[0].broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let leases = suanli_proto::client::all_leases(&platform, true).await.expect("leases");
    assert_eq!(leases.iter().filter(|l| l.researcher_id == m.partners[1]).count(), 2, "one lease each, none twice");
}

/// One lease request of a racing researcher, and what became of it.
#[derive(Debug)]
enum Outcome {
    Leased(u64),
    Refused,
    /// The owner did not answer (its broker was electing a leader): the remote lease waits for
    /// the reconciler.
    Waiting,
}

/// Requests and ends leases of city's cards through the gateway API at `api` as fast as it can
/// until `stop`.
async fn racer(api: String, researcher: u64, cluster: u64, tag: &'static str, stop: Arc<AtomicBool>) -> Vec<Outcome> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("http");
    let post = |path: String, body: Value| {
        let request = http.post(format!("{api}{path}")).bearer_auth(API_TOKEN).json(&body);
        async move {
            let response = request.send().await.expect("post");
            (response.status().as_u16(), response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let mut outcomes = Vec::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = json!({"researcher_id": researcher, "key": format!("{tag}-{n}"), "origin": "city", "cluster_id": cluster, "cards": 1, "billing_mode": "hourly", "periods": 1});
        let (status, body) = post("/v1/remote-leases".into(), body).await;
        let outcome = match status {
            200 => Outcome::Leased(body["id"].as_u64().expect("id")),
            409 | 400 => Outcome::Refused,
            503 => Outcome::Waiting,
            other => panic!("{tag}-{n}: {other} {body}"),
        };
        if let Outcome::Leased(id) = outcome {
            let _ = post(format!("/v1/remote-leases/{id}/end"), json!({"researcher_id": researcher})).await;
        }
        outcomes.push(outcome);
    }
    outcomes
}

#[tokio::test]
async fn killing_the_owners_leader_during_cross_member_leasing_holds_no_card_twice_and_loses_no_money() {
    // City: a 3-node broker cluster with two cards (enrolled without agents: a lease waits for
    // provisioning and its end cancels it); its gateway talks to a follower.
    let mut f = Federation::brokers_of(&[3, 1, 1]).await;
    let leader = f.members[0].broker.leader(WAIT).await.expect("a leader");
    let follower = f.members[0].broker.ids().into_iter().find(|id| *id != leader).expect("a follower");
    f.members[0].use_node(follower);
    let city = &f.members[0];
    let mut platform = city.broker.client(follower, PLATFORM_TOKEN).await.expect("platform");
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let mut supplier = city.broker.client(follower, &supplier_token).await.expect("supplier");
    let cluster = suanli_testkit::fixtures::publish(&mut supplier, suanli_types::ClusterClass::B, 1, 2, "failover").await.expect("publish").cluster_id;
    let (config, partners) = partner_accounts(&f).await;
    f.start_gateways(&[&config, "", ""]).await;
    for member in &f.members[1..] {
        eventually(
            WAIT,
            POLL,
            move || async move { catalogue(member, "?origin=city").await.into_iter().any(|e| e.listing.cluster_id == cluster).then_some(()) },
        )
        .await
        .expect("city's cards are in the federated catalogue");
    }
    let (u, c) = (researcher(&f.members[1], "ursula").await, researcher(&f.members[2], "carl").await);

    // University's and cloud's researchers race for city's two cards while city's leader is
    // killed and comes back.
    let stop = Arc::new(AtomicBool::new(false));
    let racers =
        [tokio::spawn(racer(f.members[1].api(), u, cluster, "u", stop.clone())), tokio::spawn(racer(f.members[2].api(), c, cluster, "c", stop.clone()))];
    tokio::time::sleep(Duration::from_millis(800)).await;
    let city_broker = &mut f.members[0].broker;
    let leader = city_broker.leader(WAIT).await.expect("leader");
    city_broker.kill(leader).await.expect("kill -9");
    let next = city_broker.leader(WAIT).await.expect("a new leader");
    assert_ne!(next, leader);
    city_broker.restart(leader).await.expect("restart");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let [a, b] = racers;
    let (a, b) = (a.await.expect("racer"), b.await.expect("racer"));
    let leased = a.iter().chain(&b).filter(|o| matches!(o, Outcome::Leased(_))).count();
    assert!(leased >= 5, "the race made progress: {a:?} {b:?}");

    // Whatever waited is settled by the reconcilers; then everything still live is ended.
    for (member, researcher) in [(&f.members[1], u), (&f.members[2], c)] {
        let settled = eventually(Duration::from_secs(60), POLL, || async {
            let leases = remote_leases(member, researcher).await;
            leases.iter().all(|l| l.state != "requested").then_some(leases)
        })
        .await
        .expect("no remote lease waits once city answers again");
        for l in settled.iter().filter(|l| l.state == "active") {
            let (status, body) = post(member, &format!("/v1/remote-leases/{}/end", l.id), json!({"researcher_id": researcher})).await;
            assert_eq!(status, 200, "{body}");
        }
        assert_eq!(balance(member, researcher).await.remote_held_minor, 0, "no money left held at {}", member.name);
        // Each remote lease the owner confirmed is one lease at city, for that member's
        // partner account, never two.
        let owner_leases: BTreeSet<u64> = settled.iter().map(|l| l.owner_lease_id).filter(|id| *id > 0).collect();
        assert_eq!(owner_leases.len(), settled.iter().filter(|l| l.owner_lease_id > 0).count(), "an owner lease confirmed twice");
    }
    let city = &f.members[0];
    city.broker.converge(WAIT).await.expect("converge");
    let mut platform = city.broker.client(follower, PLATFORM_TOKEN).await.expect("platform");
    let leases = suanli_testkit::cluster::leases_as_applied(&platform, false).await.expect("leases");
    for (i, member) in [&f.members[1], &f.members[2]].into_iter().enumerate() {
        let researcher = [u, c][i];
        let confirmed: BTreeSet<u64> = remote_leases(member, researcher).await.iter().map(|l| l.owner_lease_id).filter(|id| *id > 0).collect();
        let at_city: BTreeSet<u64> = leases.iter().filter(|l| l.researcher_id == partners[i]).map(|l| l.lease_id).collect();
        assert_eq!(at_city, confirmed, "city's leases for {} are exactly those {} knows", member.name, member.name);
    }
    assert!(leases.iter().all(|l| l.ended_at_ms > 0), "nothing left live at city");
    // The history checker: no card of city was ever held by two leases at once.
    check_no_card_held_twice(&mut platform, "sentinel").await;
}
