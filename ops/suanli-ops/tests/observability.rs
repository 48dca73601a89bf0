//! The Grafana dashboards (`ops/grafana/`) and the alerting rules (`ops/prometheus/alerts.yml`):
//! well-formed, their PromQL parsed by Prometheus' own `promtool`, and every broker, agent, GPU,
//! portal and scheduler series they name served by running ones. (The federation's series are
//! checked in `crates/federation/tests/network.rs`.)

use std::collections::BTreeSet;
use std::time::Duration;

use suanli_proto::v1::AccountKind;
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::register;
use suanli_testkit::observability::{dashboard_expressions, dashboards, exposed_series, missing, referenced_series};
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use suanli_testkit::workspace_binary;

#[test]
fn every_dashboard_is_well_formed() {
    let all = dashboards();
    assert!(all.len() >= 3, "broker, agents, federation");
    let mut uids = BTreeSet::new();
    for (path, d) in &all {
        let name = path.display();
        assert!(uids.insert(d["uid"].as_str().unwrap_or_else(|| panic!("{name}: uid")).to_owned()), "{name}: uid used twice");
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{name}: title");
        assert!(d["schemaVersion"].as_u64().is_some(), "{name}: schemaVersion");
        let variables = d["templating"]["list"].as_array().unwrap_or_else(|| panic!("{name}: templating"));
        assert!(
            variables.iter().any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
            "{name}: a datasource variable, so the dashboard imports anywhere"
        );
        let mut ids = BTreeSet::new();
        for panel in d["panels"].as_array().unwrap_or_else(|| panic!("{name}: panels")) {
            let title = panel["title"].as_str().unwrap_or("?");
            assert!(ids.insert(panel["id"].as_u64().unwrap_or_else(|| panic!("{name} / {title}: id"))), "{name} / {title}: id used twice");
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{name} / {title}: the datasource variable");
            let grid = &panel["gridPos"];
            let (x, w) = (grid["x"].as_u64().unwrap_or(99), grid["w"].as_u64().unwrap_or(99));
            assert!(x + w <= 24 && grid["h"].as_u64().is_some_and(|h| h > 0), "{name} / {title}: within Grafana's 24 columns");
            let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{name} / {title}: targets"));
            assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].as_str().is_some_and(|e| !e.is_empty())), "{name} / {title}: queries");
        }
    }
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    // promtool parses expressions of recording rules: each query becomes one.
    let dir = tempfile::tempdir().expect("dir");
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (i, (_, expr)) in dashboard_expressions().iter().enumerate() {
        rules.push_str(&format!("      - record: suanli_dashboard:query_{i}\n        expr: {}\n", serde_json::to_string(expr).expect("json string")));
    }
    let path = dir.path().join("dashboards.rules.yml");
    std::fs::write(&path, &rules).expect("write");
    let out =
        std::process::Command::new("promtool").args(["check", "rules"]).arg(&path).output().expect("promtool (ops/install-build-deps installs prometheus)");
    assert!(out.status.success(), "{}{}\n{rules}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

async fn scrape(address: &str) -> String {
    reqwest::get(format!("http://{address}/metrics")).await.expect("scrape").text().await.expect("text")
}

/// The prefixes of the series the services below serve (the federation's are checked in its
/// own crate).
const SERVED_HERE: &[&str] = &["suanli_broker_", "suanli_agent_", "suanli_gpu_", "DCGM_", "suanli_portal_", "suanli_scheduler_"];

#[tokio::test]
async fn every_broker_agent_gpu_portal_and_scheduler_series_the_assets_name_is_served() {
    let cluster = BrokerCluster::start(&workspace_binary("suanli-broker", "suanli-broker").expect("broker"), 1, None).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let mut platform = cluster.client(1, PLATFORM_TOKEN).await.expect("client");
    let (_, supplier) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let dir = suanli_testkit::reachable_temp_dir().expect("dir");
    let agent = suanli_testkit::agent::start(&cluster, dir.path(), &supplier, &workspace_binary("suanli-agent", "suanli-agent").expect("agent"), 2, &[])
        .await
        .expect("agent");
    let broker = format!("http://{}", cluster.address(1).expect("address"));
    let database = format!("sqlite://{}/portal.db", dir.path().display());
    let portal = PortalProcess::start(
        dir.path(),
        &PortalOptions { extra: &["--metrics-listen", "127.0.0.1:0"], ..PortalOptions::new(&broker, PLATFORM_TOKEN, &database) },
    )
    .await
    .expect("portal");
    let scheduler = suanli_testkit::Service::start(
        "scheduler",
        &workspace_binary("suanli-scheduler", "suanli-scheduler").expect("scheduler"),
        &["--broker", &broker, "--token", PLATFORM_TOKEN, "--name", "s1", "--round-ms", "100", "--lease-ttl-ms", "1000", "--metrics-listen", "127.0.0.1:0"]
            .map(String::from),
        &[],
        dir.path(),
        Duration::from_secs(30),
    )
    .await
    .expect("scheduler");
    // A page and an API call, so the portal's request series exist.
    for path in ["/", "/api/v1/no-such-thing"] {
        reqwest::get(format!("{}{path}", portal.url)).await.expect("portal answers");
    }
    let referenced = referenced_series();
    let targets = [
        cluster.metrics_address(1).expect("the broker's metrics address").to_owned(),
        agent.agent.get("metrics").expect("the agent's metrics address").to_owned(),
        portal.service.get("metrics").expect("the portal's metrics address").to_owned(),
        scheduler.get("metrics").expect("the scheduler's metrics address").to_owned(),
    ];
    let lacking = || async {
        let mut exposed = BTreeSet::new();
        for target in &targets {
            exposed.extend(exposed_series(&scrape(target).await));
        }
        missing(&referenced, SERVED_HERE, &exposed)
    };
    // Some series appear with their first event (a request, a sample, a round).
    let served = suanli_testkit::eventually(Duration::from_secs(20), Duration::from_millis(200), || async { lacking().await.is_empty().then_some(()) }).await;
    assert!(served.is_ok(), "named in ops/grafana or ops/prometheus but not served: {:?}", lacking().await);
}
