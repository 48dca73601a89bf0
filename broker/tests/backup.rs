//! Backups of a running cluster and restores into a new one (issue 21): the drill that
//! matters — back up while the market runs, destroy everything, restore to new directories and
//! ports, and find every acknowledged lease, balance and account — and the refusals of a
//! damaged, foreign or misplaced backup, which must leave nothing behind.

use std::path::Path;
use std::time::Duration;

use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{leases_as_applied, BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{self, register};
use suanli_types::ClusterClass;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-broker"))
}

fn lease(cluster: u64, request_id: String) -> v1::RequestLeaseRequest {
    fixtures::hourly_lease(request_id, cluster, 1)
}

async fn balance(client: &mut suanli_proto::client::Client) -> i64 {
    let b = client.get_balance(v1::GetBalanceRequest { account_id: 0, currency: "CNY".into() }).await.expect("balance").into_inner();
    b.available_minor
}

#[tokio::test]
async fn a_cluster_restored_from_a_backup_holds_every_acknowledged_lease_balance_and_account() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let mut platform = cluster.client(leader, PLATFORM_TOKEN).await.expect("client");
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let (_, researcher_token) = register(&mut platform, AccountKind::Researcher, "researcher").await.expect("researcher");
    let mut supplier = cluster.client(leader, &supplier_token).await.expect("client");
    let market = fixtures::publish(&mut supplier, ClusterClass::B, 2, 4, "b").await.expect("publish");
    let mut researcher = cluster.client(leader, &researcher_token).await.expect("client");
    let mut acknowledged = Vec::new();
    for n in 0..5 {
        acknowledged.push(researcher.request_lease(lease(market.cluster_id, format!("before-{n}"))).await.expect("lease").into_inner());
    }
    researcher
        .end_lease(v1::EndLeaseRequest { request_id: "end-0".into(), lease_id: acknowledged[0].lease_id, reason: v1::EndReason::ByResearcher.into() })
        .await
        .expect("end");
    let before_balance = balance(&mut researcher).await;

    let backups = tempfile::tempdir().expect("dir");
    let printed = cluster.backup(&backups.path().join("b1")).await.expect("backup");
    assert!(printed.contains("backup of log index"), "{printed}");
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(backups.path().join("b1/manifest.json")).expect("manifest")).expect("json");
    assert_eq!(manifest["backup_format"], 1);
    let applied_then = manifest["broker"]["last_applied_index"].as_u64().expect("index");
    let leases_then: Vec<v1::Lease> = leases_as_applied(&platform, false).await.expect("leases");
    drop(researcher);
    drop(supplier);
    drop(platform);
    drop(cluster); // every process and directory of the first cluster is gone

    let restored = BrokerCluster::restore(binary(), &backups.path().join("b1"), 3).await.expect("restored cluster");
    let leader = restored.leader(Duration::from_secs(20)).await.expect("leader");
    assert!(restored.status(leader).await.expect("status").applied_index >= applied_then);
    restored.converge(Duration::from_secs(30)).await.expect("the joined nodes caught up");
    // On every node: the same leases, states and cards as before the backup.
    for id in restored.ids() {
        let platform = restored.client(id, PLATFORM_TOKEN).await.expect("client");
        let now = leases_as_applied(&platform, false).await.expect("leases");
        let key = |l: &v1::Lease| (l.lease_id, l.state, l.card_ids.clone(), l.amount.as_ref().map(|m| m.minor));
        assert_eq!(now.iter().map(key).collect::<Vec<_>>(), leases_then.iter().map(key).collect::<Vec<_>>(), "node {id}");
    }
    for a in &acknowledged {
        assert!(leases_then.iter().any(|l| l.lease_id == a.lease_id), "acknowledged lease {} backed up", a.lease_id);
    }
    // The researcher's own token still works, and sees the same balance.
    let mut researcher = restored.client(leader, &researcher_token).await.expect("client");
    assert_eq!(balance(&mut researcher).await, before_balance);
    // The market goes on from where it was: a new lease, a new ID, no card leased twice.
    let next = researcher.request_lease(lease(market.cluster_id, "after".into())).await.expect("a lease after the restore").into_inner();
    assert!(acknowledged.iter().all(|a| a.lease_id < next.lease_id));
    let live: Vec<u64> = leases_as_applied(&restored.client(leader, PLATFORM_TOKEN).await.expect("client"), true)
        .await
        .expect("leases")
        .iter()
        .flat_map(|l| l.card_ids.clone())
        .collect();
    let distinct: std::collections::BTreeSet<_> = live.iter().collect();
    assert_eq!(distinct.len(), live.len(), "no card in two live leases");
    // A retried request from before the backup gets its first answer, not a second lease.
    let retry = researcher.request_lease(lease(market.cluster_id, "before-1".into())).await.expect("retry").into_inner();
    assert_eq!(retry.lease_id, acknowledged[1].lease_id);
}

fn restore(backup: &Path, data_dir: &Path) -> std::process::Output {
    std::process::Command::new(binary())
        .args(["restore", "--node-id", "1", "--peer-address", "127.0.0.1:1"])
        .arg("--backup")
        .arg(backup)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run restore")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

#[tokio::test]
async fn a_damaged_foreign_or_misplaced_backup_is_refused_and_nothing_is_made() {
    let cluster = BrokerCluster::start(binary(), 1, None).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let mut platform = cluster.client(1, PLATFORM_TOKEN).await.expect("client");
    register(&mut platform, AccountKind::Researcher, "someone").await.expect("register");
    let dir = tempfile::tempdir().expect("dir");
    let good = dir.path().join("good");
    cluster.backup(&good).await.expect("backup");
    // A backup never writes over another.
    assert!(cluster.backup(&good).await.is_err(), "a second backup into the same directory is refused");

    // One flipped byte of the state.
    let damaged = dir.path().join("damaged");
    copy_dir(&good, &damaged);
    let state = damaged.join("broker-state.bin");
    let mut bytes = std::fs::read(&state).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&state, bytes).expect("write");
    let target = dir.path().join("node-damaged");
    let out = restore(&damaged, &target);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("damaged"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!target.exists(), "nothing was made from a damaged backup");

    // A backup of another store format (a newer broker's, say).
    let foreign = dir.path().join("foreign");
    copy_dir(&good, &foreign);
    let text = std::fs::read_to_string(foreign.join("manifest.json")).expect("manifest");
    let mut manifest: serde_json::Value = serde_json::from_str(&text).expect("json");
    manifest["broker"]["store_format"] = serde_json::json!(99);
    std::fs::write(foreign.join("manifest.json"), manifest.to_string()).expect("write");
    let target = dir.path().join("node-foreign");
    let out = restore(&foreign, &target);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("store format 99"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!target.exists());

    // Never over an existing store: the running node's own directory is not touched.
    let occupied = dir.path().join("occupied");
    std::fs::create_dir_all(&occupied).expect("mkdir");
    std::fs::write(occupied.join("CURRENT"), "MANIFEST-000001\n").expect("write");
    let out = restore(&good, &occupied);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(occupied.join("CURRENT")).expect("kept"), "MANIFEST-000001\n");

    // And the good one restores.
    let out = restore(&good, &dir.path().join("node-good"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
