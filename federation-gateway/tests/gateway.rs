//! Three members, each a broker of its own with its gateway, on loopback: a cluster published
//! at one member's broker is searchable at the others' gateways with its origin; the API
//! answers only its token; a key outside the federation cannot run a gateway.

mod support;

use std::time::Duration;

use suanli_federation::keyfile;
use suanli_federation_gateway::api::MembersView;
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::PLATFORM_TOKEN;
use suanli_testkit::eventually;
use suanli_testkit::fixtures::{self, register};
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use suanli_types::ClusterClass;
use support::{catalogue, federation, gateway_binary, Federation, API_TOKEN, GATEWAY_TOKEN};

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
    let members: MembersView = support::get(&f.members[2], "/v1/members").await;
    assert_eq!(members.members.len(), 3);
    assert!(members.members.iter().any(|m| m.name == "city" && m.connected && m.offer_age_ms.is_some()), "{members:?}");

    // The CLI prints it with its origin.
    let out = tokio::process::Command::new(gateway_binary())
        .args(["catalogue", "--endpoint", &f.members[1].api(), "--token", API_TOKEN])
        .output()
        .await
        .expect("run");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && printed.contains("city") && printed.contains(&cluster.cluster_id.to_string()), "{printed}");

    // Delisted at the origin: gone everywhere.
    supplier.delist_cluster(v1::DelistClusterRequest { request_id: "delist".into(), cluster_id: cluster.cluster_id }).await.expect("delist");
    for member in &f.members[1..] {
        eventually(
            Duration::from_secs(20),
            Duration::from_millis(100),
            move || async move { catalogue(member, "?origin=city").await.is_empty().then_some(()) },
        )
        .await
        .expect("the delisting reached the member");
    }
    drop(f.dir);
}

#[tokio::test]
async fn the_gateway_api_answers_only_its_token_and_names_bad_queries() {
    let f = federation().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/catalogue", f.members[0].api());
    for token in [None, Some("wrong-token-0123456789"), Some("")] {
        let mut request = client.get(&url);
        if let Some(t) = token {
            request = request.bearer_auth(t);
        }
        let response = request.send().await.expect("get");
        assert_eq!(response.status(), 401, "{token:?}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "UNAUTHENTICATED");
    }
    let response = client.get(format!("{url}?nonsense=1")).bearer_auth(API_TOKEN).send().await.expect("get");
    assert_eq!(response.status(), 400);
    let members = client.get(format!("{}/v1/members", f.members[0].api())).send().await.expect("get");
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
        .env("SUANLI_FEDERATION_BROKER_TOKEN", GATEWAY_TOKEN)
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
    let gateway_api = university.api();
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
