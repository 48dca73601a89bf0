//! A real `suanli-broker` process on loopback: the API end to end, bad input, the watch stream,
//! metrics, and `kill -9` + restart keeping every acknowledged write.

use std::path::Path;
use std::time::Duration;

use suanli_proto::client::{self, Client};
use suanli_proto::convert::listing_to_wire;
use suanli_proto::decode_status;
use suanli_proto::v1::{self, AccountKind, BillingMode, LeaseState};
use suanli_testkit::fixtures::{self, register};
use suanli_testkit::Service;
use suanli_types::ClusterClass;
use suanli_types::ErrorCode;
use tempfile::TempDir;
use tokio_stream::StreamExt;

use suanli_testkit::cluster::PLATFORM_TOKEN;

async fn start(data: &Path, logs: &Path) -> Service {
    start_with(data, logs, &[]).await
}

async fn start_with(data: &Path, logs: &Path, extra: &[String]) -> Service {
    let mut args: Vec<String> = [
        "serve",
        "--bootstrap",
        "--node-id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ]
    .map(String::from)
    .to_vec();
    args.extend_from_slice(extra);
    Service::start(
        "broker",
        Path::new(env!("CARGO_BIN_EXE_suanli-broker")),
        &args,
        &[("SUANLI_BROKER_PLATFORM_TOKEN", PLATFORM_TOKEN), ("SUANLI_LOG", "info")],
        logs,
        Duration::from_secs(60),
    )
    .await
    .expect("broker starts")
}

async fn connect(service: &Service, token: &str) -> Client {
    client::connect(&format!("http://{}", service.get("grpc").expect("grpc")), Some(token)).await.expect("connect")
}

fn code_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> ErrorCode {
    decode_status(&result.expect_err("expected an error")).code
}

struct Actors {
    platform: Client,
    supplier: Client,
    researcher: Client,
    researcher_id: u64,
}

async fn actors(service: &Service) -> Actors {
    let mut platform = connect(service, PLATFORM_TOKEN).await;
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "acc-supplier").await.expect("supplier");
    let (researcher_id, researcher_token) = register(&mut platform, AccountKind::Researcher, "acc-researcher").await.expect("researcher");
    Actors { platform, supplier: connect(service, &supplier_token).await, researcher: connect(service, &researcher_token).await, researcher_id }
}

fn listing(class: ClusterClass) -> v1::Listing {
    listing_to_wire(&fixtures::listing(class))
}

async fn publish(supplier: &mut Client, class: ClusterClass, cards: u32, tag: &str) -> v1::Cluster {
    fixtures::publish(supplier, class, 1, cards, tag).await.expect("publish")
}

fn lease_b(cluster: u64, cards: u32, request_id: &str) -> v1::RequestLeaseRequest {
    v1::RequestLeaseRequest {
        request_id: request_id.into(),
        cluster_id: cluster,
        node_ids: vec![],
        cards,
        billing_mode: BillingMode::Hourly.into(),
        periods: 1,
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9_and_restart() {
    let dir = TempDir::new().expect("tempdir");
    let data = dir.path().join("data");
    let broker = start(&data, dir.path()).await;
    let mut a = actors(&broker).await;
    let cluster = publish(&mut a.supplier, ClusterClass::B, 8, "b1").await;

    // A run of acknowledged writes of every kind.
    let mut acked = Vec::new();
    for i in 0..6 {
        let lease = a.researcher.request_lease(lease_b(cluster.cluster_id, 1, &format!("lease-{i}"))).await.expect("lease").into_inner();
        acked.push(lease);
    }
    for lease in acked.iter_mut().take(4) {
        *lease = a
            .supplier
            .activate_lease(v1::LeaseRef { request_id: format!("act-{}", lease.lease_id), lease_id: lease.lease_id })
            .await
            .expect("activate")
            .into_inner();
    }
    acked[0] = a
        .researcher
        .end_lease(v1::EndLeaseRequest { request_id: "end-0".into(), lease_id: acked[0].lease_id, reason: v1::EndReason::ByResearcher.into() })
        .await
        .expect("end")
        .into_inner();

    broker.kill().await.expect("kill -9");
    let broker = start(&data, dir.path()).await;
    let mut platform = connect(&broker, PLATFORM_TOKEN).await;
    for want in &acked {
        let got = platform.get_lease(v1::GetLeaseRequest { lease_id: want.lease_id }).await.expect("get").into_inner();
        assert_eq!(&got, want, "lease {} after restart", want.lease_id);
    }
    let cards = platform.list_cards(v1::ListCardsRequest { cluster_id: cluster.cluster_id }).await.expect("cards").into_inner();
    let busy = cards.cards.iter().filter(|c| c.status == i32::from(v1::CardStatus::Busy)).count();
    let reserved = cards.cards.iter().filter(|c| c.status == i32::from(v1::CardStatus::Reserved)).count();
    assert_eq!((busy, reserved), (3, 2));

    // At-most-once survives the restart too: the same request ID returns the first answer.
    let (id, token) = register(&mut platform, AccountKind::Researcher, "acc-researcher").await.expect("register");
    assert_eq!(id, a.researcher_id);
    assert!(token.is_empty(), "a retried registration does not mint a second token");
    broker.interrupt(Duration::from_secs(20)).await.expect("clean stop");
}

#[tokio::test]
async fn bad_input_gets_the_documented_code_and_changes_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let broker = start(&dir.path().join("data"), dir.path()).await;
    let mut a = actors(&broker).await;
    let cluster = publish(&mut a.supplier, ClusterClass::B, 2, "b1").await;
    let before = a.platform.list_leases(v1::ListLeasesRequest { live_only: false, ..Default::default() }).await.expect("list").into_inner();

    // Unknown cluster, missing billing mode, zero periods.
    assert_eq!(code_of(a.researcher.request_lease(lease_b(4242, 1, "x1")).await), ErrorCode::NotFound);
    let mut no_mode = lease_b(cluster.cluster_id, 1, "x2");
    no_mode.billing_mode = 0;
    assert_eq!(code_of(a.researcher.request_lease(no_mode).await), ErrorCode::InvalidArgument);
    let mut zero = lease_b(cluster.cluster_id, 1, "x3");
    zero.periods = 0;
    assert_eq!(code_of(a.researcher.request_lease(zero).await), ErrorCode::InvalidArgument);
    assert_eq!(code_of(a.researcher.request_lease(lease_b(cluster.cluster_id, 3, "x4")).await), ErrorCode::InsufficientCapacity);

    // Negative price and missing fields: every field named.
    let mut bad = listing(ClusterClass::B);
    bad.title.clear();
    bad.prices[0].per_card_minor = -1;
    let status = a
        .supplier
        .modify_cluster(v1::ModifyClusterRequest { request_id: "m1".into(), cluster_id: cluster.cluster_id, listing: Some(bad) })
        .await
        .expect_err("invalid");
    let err = decode_status(&status);
    assert_eq!(err.code, ErrorCode::InvalidArgument);
    let fields: Vec<_> = err.fields.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["title", "prices.hourly"]);
    assert_eq!(status.metadata().get("x-suanli-error").and_then(|v| v.to_str().ok()), Some("INVALID_ARGUMENT"));

    // Oversized payload.
    let mut huge = listing(ClusterClass::B);
    huge.title = "x".repeat(100 * 1024);
    let result = a.supplier.modify_cluster(v1::ModifyClusterRequest { request_id: "m2".into(), cluster_id: cluster.cluster_id, listing: Some(huge) }).await;
    assert_eq!(code_of(result), ErrorCode::PayloadTooLarge);

    // Missing, malformed and unknown credentials.
    let mut anonymous = client::connect(&format!("http://{}", broker.get("grpc").expect("grpc")), None).await.expect("connect");
    assert_eq!(code_of(anonymous.list_leases(v1::ListLeasesRequest { live_only: false, ..Default::default() }).await), ErrorCode::Unauthenticated);
    let mut stranger = connect(&broker, "sl_not-a-real-token").await;
    assert_eq!(code_of(stranger.list_leases(v1::ListLeasesRequest { live_only: false, ..Default::default() }).await), ErrorCode::Unauthenticated);
    // Only the platform registers accounts.
    let r =
        a.researcher.register_account(v1::RegisterAccountRequest { request_id: "r".into(), kind: AccountKind::Supplier.into(), token: String::new() }).await;
    assert_eq!(code_of(r), ErrorCode::PermissionDenied);

    // A request ID reused for a different request.
    a.researcher.request_lease(lease_b(cluster.cluster_id, 1, "dup")).await.expect("first");
    assert_eq!(code_of(a.researcher.request_lease(lease_b(cluster.cluster_id, 2, "dup")).await), ErrorCode::RequestIdConflict);
    let bad_id = lease_b(cluster.cluster_id, 1, "has spaces");
    assert_eq!(code_of(a.researcher.request_lease(bad_id).await), ErrorCode::InvalidArgument);

    let after = a.platform.list_leases(v1::ListLeasesRequest { live_only: false, ..Default::default() }).await.expect("list").into_inner();
    assert_eq!(after.leases.len(), before.leases.len() + 1, "only the one valid request created a lease");
}

#[tokio::test]
async fn class_a_flow_over_grpc_and_the_watch_stream_resumes() {
    let dir = TempDir::new().expect("tempdir");
    let broker = start(&dir.path().join("data"), dir.path()).await;
    let mut a = actors(&broker).await;
    let cluster = publish(&mut a.supplier, ClusterClass::A, 2, "a1").await;
    let request = v1::RequestLeaseRequest {
        request_id: "la".into(),
        cluster_id: cluster.cluster_id,
        node_ids: cluster.node_ids.clone(),
        cards: 0,
        billing_mode: BillingMode::Hourly.into(),
        periods: 3,
    };
    let lease = a.researcher.request_lease(request).await.expect("request").into_inner();
    assert_eq!(lease.amount.as_ref().map(|m| m.minor), Some(fixtures::HOURLY_PRICE * 2 * 3));
    let approved = a
        .supplier
        .approve_lease(v1::ApproveLeaseRequest { request_id: "ap".into(), lease_id: lease.lease_id, code_valid_seconds: 600 })
        .await
        .expect("approve")
        .into_inner();
    let code = approved.authorization_code;
    assert_eq!(code.len(), 16);
    // Retrying the approval does not reveal (or mint) another code.
    let retry = a
        .supplier
        .approve_lease(v1::ApproveLeaseRequest { request_id: "ap".into(), lease_id: lease.lease_id, code_valid_seconds: 600 })
        .await
        .expect("retry")
        .into_inner();
    assert!(retry.authorization_code.is_empty());

    let wrong = a
        .researcher
        .verify_auth_code(v1::VerifyAuthCodeRequest { request_id: "v1".into(), lease_id: lease.lease_id, authorization_code: "AAAAAAAAAAAAAAAA".into() })
        .await;
    assert_eq!(code_of(wrong), ErrorCode::AuthCodeMismatch);
    let active = a
        .researcher
        .verify_auth_code(v1::VerifyAuthCodeRequest { request_id: "v2".into(), lease_id: lease.lease_id, authorization_code: code.to_lowercase() })
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(active.state, i32::from(LeaseState::Active));

    // Watch from the start: every change, in log order, ending with the cards going busy.
    let mut stream = a.platform.watch(v1::WatchRequest { after_index: 0, resync: false }).await.expect("watch").into_inner();
    let mut batches = Vec::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("no stall") {
        let Some(v1::watch_response::Kind::Batch(batch)) = item.expect("item").kind else { panic!("unexpected resync") };
        let done = batch.events.iter().any(|e| matches!(&e.kind, Some(v1::event::Kind::LeaseStateChanged(c)) if c.to == i32::from(LeaseState::Active)));
        batches.push(batch);
        if done {
            break;
        }
    }
    assert!(batches.windows(2).all(|w| w[0].index < w[1].index), "strictly increasing indexes");
    let busy = batches
        .last()
        .map(|b| b.events.iter().filter(|e| matches!(&e.kind, Some(v1::event::Kind::CardStatusChanged(c)) if c.to == i32::from(v1::CardStatus::Busy))).count());
    assert_eq!(busy, Some(2));

    // Resume after the third batch: the stream continues exactly after it.
    let resume_at = batches[2].index;
    let mut resumed = a.platform.watch(v1::WatchRequest { after_index: resume_at, resync: false }).await.expect("watch").into_inner();
    let first = resumed.next().await.expect("an item").expect("ok");
    let Some(v1::watch_response::Kind::Batch(first)) = first.kind else { panic!("unexpected resync") };
    assert_eq!(first.index, batches[3].index);

    // A watcher with nothing cached asks for the state at once instead of its history.
    let mut fresh = a.platform.watch(v1::WatchRequest { after_index: 0, resync: true }).await.expect("watch").into_inner();
    let first = fresh.next().await.expect("an item").expect("ok");
    let Some(v1::watch_response::Kind::Resync(state)) = first.kind else { panic!("expected a resync, got {first:?}") };
    assert!(state.index >= batches.last().map_or(0, |b| b.index), "as of the last change");
    assert!(state.leases.iter().any(|l| l.lease_id == lease.lease_id && l.state == i32::from(LeaseState::Active)));
    assert_eq!(state.cards.iter().filter(|c| c.status == i32::from(v1::CardStatus::Busy)).count(), 2);

    // Researchers may not watch the whole market.
    assert_eq!(code_of(a.researcher.watch(v1::WatchRequest { after_index: 0, resync: false }).await), ErrorCode::PermissionDenied);

    // Metrics are exposed and count what happened.
    let metrics = http_get(broker.get("metrics").expect("metrics"), "/metrics").await;
    assert!(metrics.contains("suanli_broker_requests_total{method=\"VerifyAuthCode\",code=\"AUTH_CODE_MISMATCH\"} 1"), "{metrics}");
    assert!(metrics.contains("suanli_broker_raft_applied_index"), "{metrics}");
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect metrics");
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("read");
    body
}

#[tokio::test]
async fn a_watcher_behind_the_compacted_events_resyncs_from_a_snapshot() {
    let dir = TempDir::new().expect("tempdir");
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "[broker]\nsnapshot_every_entries = 5\nevents_retained = 2\n").expect("config");
    let broker = start_with(&dir.path().join("data"), dir.path(), &["--config".into(), config.display().to_string()]).await;
    let mut a = actors(&broker).await;
    let cluster = publish(&mut a.supplier, ClusterClass::B, 16, "b1").await;
    let mut leases = Vec::new();
    for i in 0..12 {
        leases.push(a.researcher.request_lease(lease_b(cluster.cluster_id, 1, &format!("l{i}"))).await.expect("lease").into_inner());
    }
    // Snapshots are built in the background; wait until one has discarded old events.
    let metrics_addr = broker.get("metrics").expect("metrics").to_owned();
    suanli_testkit::eventually(Duration::from_secs(20), Duration::from_millis(50), || {
        let addr = metrics_addr.clone();
        async move {
            let text = http_get(&addr, "/metrics").await;
            text.lines()
                .find_map(|l| l.strip_prefix("suanli_broker_raft_snapshot_index "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|index| *index >= 10)
        }
    })
    .await
    .expect("a snapshot was built");

    let mut stream = a.platform.watch(v1::WatchRequest { after_index: 0, resync: false }).await.expect("watch").into_inner();
    let first = stream.next().await.expect("an item").expect("ok");
    let Some(v1::watch_response::Kind::Resync(resync)) = first.kind else { panic!("expected a resync, got {first:?}") };
    assert_eq!(resync.leases.len(), leases.len(), "the resync carries the whole current state");
    assert_eq!(resync.cards.iter().filter(|c| c.status == i32::from(v1::CardStatus::Reserved)).count(), 12);
    assert_eq!(resync.clusters.len(), 1);

    // After the resync the stream goes on with new changes.
    let more =
        a.researcher.end_lease(v1::EndLeaseRequest { request_id: "end".into(), lease_id: leases[0].lease_id, reason: v1::EndReason::ByResearcher.into() });
    more.await.expect("end");
    let next = loop {
        let item = tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("no stall").expect("item").expect("ok");
        if let Some(v1::watch_response::Kind::Batch(batch)) = item.kind {
            if batch.index > resync.index {
                break batch;
            }
        }
    };
    assert!(next.events.iter().any(|e| matches!(&e.kind, Some(v1::event::Kind::LeaseStateChanged(c)) if c.lease_id == leases[0].lease_id)));
}
