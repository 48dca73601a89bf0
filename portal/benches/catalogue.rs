//! Catalogue page and API under `wrk` at 100 connections with 10,000 listings, anonymous and
//! signed in.
//!
//! Starts a broker, publishes 10,000 clusters through its API, starts the portal (on the
//! PostgreSQL in `SUANLI_TEST_POSTGRES_URL` where set, else SQLite), waits until its catalogue
//! copy holds all of them, then runs wrk against `/healthz` (the baseline: the HTTP stack
//! alone, same process, same run) and the catalogue endpoints. Then signs the demo researcher
//! in `--sessions` times (default 1,000) and runs wrk on the pages a signed-in researcher
//! opens, each request carrying one of those sessions' cookies at random (a session lookup per
//! request). Prints a table with requests/s, p50 and p99, and each row's throughput as a ratio
//! of the baseline.
//!
//! `cargo bench -p suanli-portal --bench catalogue -- --listings 10000 --seconds 10 --sessions 1000`
//! The broker is only the data source here: `SUANLI_BENCH_BROKER` may point at a debug build.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use suanli_proto::convert::{cluster_class_to_wire, inventory_to_wire, listing_to_wire};
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{inventory, listing, register};
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use suanli_testkit::workspace_binary;
use suanli_types::ClusterClass;

const REGIONS: [&str; 8] = ["Shenzhen", "Beijing", "Shanghai", "Hangzhou", "Chengdu", "Wuhan", "Xi'an", "Guangzhou"];
const MODELS: [(&str, u32); 5] = [("A100 80GB", 80), ("H100 80GB", 80), ("L40S", 48), ("RTX 4090", 24), ("H800", 80)];

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
}

fn millis(text: &str) -> f64 {
    let t = text.trim();
    let (num, scale) = if let Some(v) = t.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = t.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = t.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (t, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * scale
}

async fn wrk(url: &str, seconds: u64, script: Option<&std::path::Path>) -> anyhow::Result<Wrk> {
    let mut command = tokio::process::Command::new("wrk");
    command.args(["-t2", "-c100", &format!("-d{seconds}s"), "--latency"]);
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    let out = command.arg(url).output().await?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(out.status.success(), "wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let line = |prefix: &str| text.lines().find(|l| l.trim_start().starts_with(prefix)).map(str::trim).unwrap_or("").to_owned();
    let field = |l: String, i: usize| l.split_whitespace().nth(i).unwrap_or("").to_owned();
    Ok(Wrk {
        rps: field(line("Requests/sec:"), 1).parse().unwrap_or(0.0),
        p50_ms: millis(&field(line("50%"), 1)),
        p99_ms: millis(&field(line("99%"), 1)),
        non_2xx: field(line("Non-2xx"), 4).parse().unwrap_or(0),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listings = arg("--listings", 10_000);
    let seconds = arg("--seconds", 10);
    let broker_bin = std::env::var("SUANLI_BENCH_BROKER").map(PathBuf::from).or_else(|_| workspace_binary("suanli-broker", "suanli-broker"))?;
    let broker = BrokerCluster::start_with(&broker_bin, 1, None, false).await?;
    broker.leader(Duration::from_secs(20)).await?;
    let mut platform = broker.client(1, PLATFORM_TOKEN).await?;
    let (_, token) = register(&mut platform, AccountKind::Supplier, "bench-supplier").await?;
    let supplier = broker.client(1, &token).await?;

    let started = Instant::now();
    let published = stream::iter(0..listings)
        .map(|i| {
            let mut client = supplier.clone();
            async move {
                let class = if i % 3 == 0 { ClusterClass::A } else { ClusterClass::B };
                let (model, vram) = MODELS[(i % 5) as usize];
                let node = client
                    .enroll_node(v1::EnrollNodeRequest {
                        request_id: format!("n{i}"),
                        inventory: Some(inventory_to_wire(&inventory(&format!("bench-{i}"), 1 + (i % 8) as u32))),
                    })
                    .await?
                    .into_inner();
                let mut l = listing_to_wire(&listing(class));
                l.title = format!("{} × {model} #{i}", 1 + i % 8);
                l.gpu_model = model.into();
                l.vram_gib = vram;
                l.region = REGIONS[(i % 8) as usize].into();
                for p in &mut l.prices {
                    p.per_card_minor += (i % 97) as i64 * 10;
                }
                client
                    .publish_cluster(v1::PublishClusterRequest {
                        request_id: format!("c{i}"),
                        class: cluster_class_to_wire(class),
                        node_ids: vec![node.node_id],
                        listing: Some(l),
                    })
                    .await?;
                Ok::<_, tonic::Status>(())
            }
        })
        .buffer_unordered(64)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    println!("published {published} clusters in {:.1} s", started.elapsed().as_secs_f64());

    let dir = tempfile::TempDir::new()?;
    let portal_bin = std::env::var("SUANLI_BENCH_PORTAL").ok().map(PathBuf::from);
    let db = match suanli_testkit::portal::database_url(dir.path(), true).await? {
        Some(url) => url,
        None => suanli_testkit::portal::database_url(dir.path(), false).await?.unwrap_or_default(),
    };
    let database = if db.starts_with("postgres") { "PostgreSQL" } else { "SQLite" };
    let endpoint = format!("http://{}", broker.address(1)?);
    let starting = Instant::now();
    let portal = PortalProcess::start(
        dir.path(),
        &PortalOptions {
            broker: &endpoint,
            platform_token: PLATFORM_TOKEN,
            database_url: &db,
            smtp: None,
            extra: &["--log", "warn", "--demo"],
            binary: portal_bin.as_deref(),
        },
    )
    .await?;
    let http = reqwest::Client::new();
    let synced = Instant::now();
    suanli_testkit::eventually(Duration::from_secs(120), Duration::from_millis(100), || async {
        let v: serde_json::Value = http.get(format!("{}/api/v1/catalogue?page_size=1", portal.url)).send().await.ok()?.json().await.ok()?;
        (v["total"].as_u64() == Some(published as u64)).then_some(())
    })
    .await?;
    println!(
        "portal started and caught up with the broker's {published} clusters in {:.1} s, {:.1} s of it after it was ready (portal binary: {})",
        starting.elapsed().as_secs_f64(),
        synced.elapsed().as_secs_f64(),
        portal_bin.map_or("this build".into(), |p| p.display().to_string())
    );

    let cases = [
        ("baseline: GET /healthz", "/healthz".to_owned()),
        ("API: filter + sort by price", "/api/v1/catalogue?class=B&region=Shenzhen&min_vram_gib=48&billing_mode=hourly&sort=price&page_size=20".to_owned()),
        ("API: unfiltered, page 250", "/api/v1/catalogue?page=250&page_size=20".to_owned()),
        ("page: catalogue HTML, filtered", "/?class=B&region=Shenzhen&billing_mode=hourly&sort=price".to_owned()),
        ("page: catalogue HTML, first page", "/".to_owned()),
    ];
    println!();
    println!("| request ({listings} listings, wrk -t2 -c100 -d{seconds}s) | req/s | p50 ms | p99 ms | non-2xx | × baseline |");
    println!("|---|---:|---:|---:|---:|---:|");
    let mut baseline = None;
    for (name, path) in cases {
        let r = wrk(&format!("{}{path}", portal.url), seconds, None).await?;
        let base = *baseline.get_or_insert(r.rps);
        println!("| {name} | {:.0} | {:.2} | {:.2} | {} | {:.2} |", r.rps, r.p50_ms, r.p99_ms, r.non_2xx, r.rps / base);
    }

    let sessions = arg("--sessions", 1000);
    if sessions > 0 {
        let started = Instant::now();
        let cookies = sign_in(&portal.url, sessions as usize).await?;
        let script = dir.path().join("sessions.lua");
        std::fs::write(&script, session_script(&cookies))?;
        println!();
        println!("signed the demo researcher in {sessions} times in {:.1} s ({database})", started.elapsed().as_secs_f64());
        println!();
        println!("| request, signed in ({sessions} sessions at random; {listings} listings) | req/s | p50 ms | p99 ms | non-2xx | × baseline |");
        println!("|---|---:|---:|---:|---:|---:|");
        let signed_in = [
            ("page: catalogue HTML, first page", "/"),
            ("page: catalogue HTML, filtered", "/?class=B&region=Shenzhen&billing_mode=hourly&sort=price"),
            ("page: my account", "/me"),
            ("page: my leases", "/leases"),
            ("API: GET /api/v1/me", "/api/v1/me"),
            ("API: my leases", "/api/v1/leases"),
        ];
        let base = baseline.unwrap_or(f64::NAN);
        for (name, path) in signed_in {
            let r = wrk(&format!("{}{path}", portal.url), seconds, Some(&script)).await?;
            println!("| {name} | {:.0} | {:.2} | {:.2} | {} | {:.2} |", r.rps, r.p50_ms, r.p99_ms, r.non_2xx, r.rps / base);
        }
    }
    drop(portal);
    suanli_testkit::portal::drop_database(&db);
    Ok(())
}

/// Signs the demo researcher in `n` times, 8 at once; each sign-in's session cookie
/// (`name=value`).
async fn sign_in(portal: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let http = reqwest::Client::new();
    let login = serde_json::json!({"login": "demo-researcher", "password": suanli_portal::demo::DEMO_PASSWORD});
    stream::iter(0..n)
        .map(|_| {
            let (http, login) = (http.clone(), login.clone());
            async move {
                let response = http.post(format!("{portal}/api/v1/session")).json(&login).send().await?;
                let status = response.status();
                let cookie = response.headers().get(reqwest::header::SET_COOKIE).and_then(|v| v.to_str().ok()).and_then(|v| v.split(';').next());
                match cookie {
                    Some(cookie) if status.is_success() => Ok(cookie.to_owned()),
                    _ => anyhow::bail!("signing in: {status} {}", response.text().await.unwrap_or_default()),
                }
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<anyhow::Result<String>>>()
        .await
        .into_iter()
        .collect()
}

/// A wrk script that sends each request with one of `cookies` at random.
fn session_script(cookies: &[String]) -> String {
    let list: Vec<String> = cookies.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "local cookies = {{ {} }}\nrequest = function()\n  return wrk.format(nil, nil, {{ [\"Cookie\"] = cookies[math.random(#cookies)] }})\nend\n",
        list.join(", ")
    )
}
