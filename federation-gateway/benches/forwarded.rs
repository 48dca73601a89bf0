//! A lease of another member's cards against a local one: request and end, one after another,
//! the same researcher-side work measured both ways in one run. Local: a researcher at "city"
//! asks city's broker (`RequestLease`, `EndLease`). Forwarded: a researcher at "cloud" asks
//! cloud's gateway, which holds the money at cloud's broker, calls city's gateway over libp2p,
//! which leases at city's broker through cloud's partner account; the end goes the same way
//! back, with the settlement signed, journalled and countersigned at both members. Three members
//! on loopback, one broker node each; city's cards are enrolled without agents (a lease waits
//! for provisioning and is cancelled by its end: nothing is charged either way).
//!
//! `cargo bench -p suanli-federation-gateway --bench forwarded --profile dev` (the test
//! harness's debug binaries; `ROUNDS=N` to change the 200 rounds).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::PLATFORM_TOKEN;
use suanli_testkit::fixtures::{self, register};
use suanli_types::ClusterClass;
use support::{Federation, API_TOKEN};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn row(name: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!("{name:<34} {:>9.2} {:>9.2}", p50.as_secs_f64() * 1e3, p99.as_secs_f64() * 1e3);
    p50
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(200);
    let mut f = Federation::brokers().await;
    let city = &f.members[0];
    let mut platform = city.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let mut supplier = city.broker.client(1, &supplier_token).await.expect("supplier");
    let cluster = fixtures::publish(&mut supplier, ClusterClass::B, 1, 4, "bench").await.expect("publish").cluster_id;
    let (_, local_token) = register(&mut platform, AccountKind::Researcher, "local").await.expect("local researcher");
    let (_, partner_token) = register(&mut platform, AccountKind::Researcher, "partner-cloud").await.expect("partner");
    let token_file = f.dir.path().join("partner.token");
    std::fs::write(&token_file, partner_token).expect("token file");
    let config = format!("[[federation.partners]]\nmember = \"cloud\"\naccount_token_file = \"{}\"\n", token_file.display());
    f.start_gateways(&[&config, "", ""]).await;
    let (city, cloud) = (&f.members[0], &f.members[2]);
    let mut cloud_platform = cloud.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let (remote_researcher, _) = register(&mut cloud_platform, AccountKind::Researcher, "remote").await.expect("remote researcher");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !support::catalogue(cloud, "?origin=city").await.iter().any(|e| e.listing.cluster_id == cluster) {
        assert!(Instant::now() < deadline, "city's offer never reached cloud");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut local = city.broker.client(1, &local_token).await.expect("local");
    let mut local_times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        let lease = local.request_lease(fixtures::hourly_lease(format!("local-{i}"), cluster, 1)).await.expect("lease").into_inner();
        local
            .end_lease(v1::EndLeaseRequest { request_id: format!("local-end-{i}"), lease_id: lease.lease_id, reason: v1::EndReason::ByResearcher as i32 })
            .await
            .expect("end");
        local_times.push(t.elapsed());
    }

    let mut read_times = Vec::with_capacity(rounds);
    let any_lease = local.request_lease(fixtures::hourly_lease("read".to_owned(), cluster, 1)).await.expect("lease").into_inner().lease_id;
    for _ in 0..rounds {
        let t = Instant::now();
        local.get_lease(v1::GetLeaseRequest { lease_id: any_lease }).await.expect("read");
        read_times.push(t.elapsed());
    }

    let http = reqwest::Client::new();
    let api = cloud.api();
    let mut forwarded_times = Vec::with_capacity(rounds);
    let mut request_times = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        let body = json!({"researcher_id": remote_researcher, "key": format!("bench-{i}"), "origin": "city", "cluster_id": cluster, "cards": 1, "billing_mode": "hourly", "periods": 1});
        let leased = http.post(format!("{api}/v1/remote-leases")).bearer_auth(API_TOKEN).json(&body).send().await.expect("lease");
        assert!(leased.status().is_success(), "{}", leased.text().await.unwrap_or_default());
        let id = leased.json::<serde_json::Value>().await.expect("json")["id"].as_u64().expect("id");
        request_times.push(t.elapsed());
        let ended = http
            .post(format!("{api}/v1/remote-leases/{id}/end"))
            .bearer_auth(API_TOKEN)
            .json(&json!({"researcher_id": remote_researcher}))
            .send()
            .await
            .expect("end");
        assert!(ended.status().is_success(), "{}", ended.text().await.unwrap_or_default());
        forwarded_times.push(t.elapsed());
    }

    println!("lease request + end, {rounds} rounds, sequential (ms)");
    println!("{:<34} {:>9} {:>9}", "", "p50", "p99");
    let local_p50 = row("local (city's broker)", local_times);
    row("  a linearizable read (GetLease)", read_times);
    let forwarded_p50 = row("forwarded (cloud → city)", forwarded_times);
    row("  of which the request", request_times);
    println!("ratio forwarded / local (p50): {:.2}", forwarded_p50.as_secs_f64() / local_p50.as_secs_f64());
}
