//! A 3-node cluster of real `suanli-broker` processes on loopback: replication, forwarding,
//! failover under load with the history checked, catch-up, snapshots, removal.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use suanli_proto::decode_status;
use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::cluster::{leases_as_applied, BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::eventually;
use suanli_testkit::fixtures::register;
use suanli_testkit::link::Fault;
use suanli_testkit::storm::{lease_request, market, Storm};
use suanli_types::ErrorCode;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-broker"))
}

#[tokio::test]
async fn any_node_serves_writes_and_linearizable_reads() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let follower = cluster.ids().into_iter().find(|id| *id != leader).expect("follower");
    // Every write through a follower is forwarded to the leader.
    let m = market(&cluster, follower, 4).await;
    for id in cluster.ids() {
        let mut researcher = cluster.client(id, &m.researcher_token).await.expect("client");
        let lease = researcher.request_lease(lease_request(m.cluster.cluster_id, format!("via-{id}"))).await.expect("request through any node").into_inner();
        // A linearizable read on every node sees the write just acknowledged.
        for reader in cluster.ids() {
            let mut r = cluster.client(reader, &m.researcher_token).await.expect("client");
            let got = r.get_lease(v1::GetLeaseRequest { lease_id: lease.lease_id }).await.expect("read").into_inner();
            assert_eq!(got.lease_id, lease.lease_id);
        }
    }
    // A stale read is served locally: it sees what that node applied.
    cluster.converge(Duration::from_secs(10)).await.expect("converge");
    let mut r = cluster.client(follower, &m.researcher_token).await.expect("client");
    let mut request = tonic::Request::new(v1::ListLeasesRequest { live_only: true, ..Default::default() });
    request.metadata_mut().insert("x-suanli-read", "stale".parse().expect("header"));
    assert_eq!(r.list_leases(request).await.expect("stale read").into_inner().leases.len(), 3);
}

#[tokio::test]
async fn killing_the_leader_under_a_storm_loses_no_acknowledged_lease_and_double_books_nothing() {
    let mut cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let first = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let m = market(&cluster, first, 6).await;
    let storm = Storm::start(&cluster, &m, 12);
    let mut leaders = vec![first];
    for _round in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await; // let the storm run between kills
        let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
        cluster.kill(leader).await.expect("kill -9");
        let next = cluster.leader(Duration::from_secs(20)).await.expect("a new leader");
        assert_ne!(next, leader);
        leaders.push(next);
        cluster.restart(leader).await.expect("restart");
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let history = storm.stop().await;
    cluster.converge(Duration::from_secs(30)).await.expect("converge");
    assert!(history.acked().len() >= 10, "the storm made progress: {}", history.summary());
    history.check(&cluster).await;
    eprintln!("storm: {}, leaders {leaders:?}", history.summary());
}

#[tokio::test]
async fn a_restarted_node_catches_up_and_a_new_node_catches_up_from_a_snapshot() {
    let config = "[broker]\nsnapshot_every_entries = 20\n";
    let mut cluster = BrokerCluster::start(binary(), 3, Some(config)).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let down = cluster.ids().into_iter().find(|id| *id != leader).expect("follower");
    cluster.kill(down).await.expect("kill");
    let m = market(&cluster, leader, 64).await;
    let mut researcher = cluster.client(leader, &m.researcher_token).await.expect("client");
    for i in 0..40 {
        researcher.request_lease(lease_request(m.cluster.cluster_id, format!("r{i}"))).await.expect("lease");
    }
    cluster.restart(down).await.expect("restart");
    let target = cluster.converge(Duration::from_secs(30)).await.expect("the restarted node caught up");
    assert!(target > 40);

    // Node 4 joins after the log was compacted: it can only catch up from a snapshot.
    cluster.join(4).await.expect("join");
    cluster.converge(Duration::from_secs(30)).await.expect("node 4 caught up");
    let status = cluster.status(4).await.expect("status");
    assert!(status.snapshot_index > 0, "node 4 installed a snapshot: {status:?}");
    let mut on_new = cluster.client(4, &m.researcher_token).await.expect("client");
    let mut request = tonic::Request::new(v1::ListLeasesRequest { live_only: true, ..Default::default() });
    request.metadata_mut().insert("x-suanli-read", "stale".parse().expect("header"));
    assert_eq!(on_new.list_leases(request).await.expect("read").into_inner().leases.len(), 40);
}

#[tokio::test]
async fn a_removed_node_cannot_disturb_the_cluster_and_its_id_is_never_reused() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let removed = cluster.ids().into_iter().find(|id| *id != leader).expect("follower");
    // Through the operator's CLI, as a person would.
    // (Asynchronously: the links between the nodes run on this test's runtime.)
    let endpoint = format!("http://{}", cluster.address(leader).expect("address"));
    let cli = async |args: &[&str]| {
        let out = tokio::process::Command::new(binary())
            .arg("cluster")
            .args(["--endpoint", &endpoint])
            .args(args)
            .env("SUANLI_BROKER_PLATFORM_TOKEN", PLATFORM_TOKEN)
            .output()
            .await
            .expect("run the CLI");
        assert!(out.status.success(), "cluster {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = cli(&["status"]).await;
    assert_eq!(before.matches(" voter").count(), 3, "{before}");
    let after = cli(&["remove", &removed.to_string()]).await;
    assert_eq!(after.matches(" voter").count(), 2, "{after}");
    assert!(!after.contains(&format!("node {removed} ")), "{after}");
    let mut admin = cluster.admin(leader).await.expect("admin");
    let term = cluster.status(leader).await.expect("status").term;

    // The removed node keeps running and hears no heartbeats; writes go on undisturbed.
    let m = market(&cluster, leader, 8).await;
    let mut researcher = cluster.client(leader, &m.researcher_token).await.expect("client");
    let until = Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while Instant::now() < until {
        i += 1;
        let lease = researcher.request_lease(lease_request(m.cluster.cluster_id, format!("x{i}"))).await.expect("lease").into_inner();
        researcher
            .end_lease(v1::EndLeaseRequest { request_id: format!("e{i}"), lease_id: lease.lease_id, reason: v1::EndReason::ByResearcher.into() })
            .await
            .expect("end");
    }
    let after = cluster.status(leader).await.expect("status");
    assert_eq!((after.leader_id, after.term), (leader, term), "no election was forced");
    assert!(after.members.iter().all(|m| m.node_id != removed));

    let again = admin.add_learner(v1::AddLearnerRequest { node_id: removed, address: "127.0.0.1:1".into() }).await;
    assert_eq!(decode_status(&again.expect_err("refused")).code, ErrorCode::InvalidArgument);
}

async fn live_leases(cluster: &BrokerCluster, id: u64) -> BTreeSet<u64> {
    let platform = cluster.client(id, PLATFORM_TOKEN).await.expect("client");
    leases_as_applied(&platform, false).await.expect("list").into_iter().map(|l| l.lease_id).collect()
}

#[tokio::test]
async fn a_minority_partition_makes_no_progress_and_all_nodes_agree_after_healing() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let old = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let m = market(&cluster, old, 64).await;
    cluster.converge(Duration::from_secs(10)).await.expect("converge");

    cluster.partition(&[old]);
    let before = cluster.status(old).await.expect("status").applied_index;
    // The isolated leader cannot commit: the write times out, or is refused as unavailable.
    let mut isolated = cluster.client(old, &m.researcher_token).await.expect("client");
    let mut request = tonic::Request::new(lease_request(m.cluster.cluster_id, "minority".into()));
    request.set_timeout(Duration::from_secs(2));
    assert!(isolated.request_lease(request).await.is_err(), "a minority committed a write");

    // The majority elects a leader of its own and keeps committing.
    let majority: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old).collect();
    let new = cluster.leader_among(&majority, Duration::from_secs(20)).await.expect("majority leader");
    let mut researcher = cluster.client(new, &m.researcher_token).await.expect("client");
    let mut committed = BTreeSet::new();
    for i in 0..10 {
        let lease = researcher.request_lease(lease_request(m.cluster.cluster_id, format!("majority-{i}"))).await.expect("majority write");
        committed.insert(lease.into_inner().lease_id);
    }
    assert_eq!(cluster.status(old).await.expect("status").applied_index, before, "the minority applied nothing");

    cluster.heal();
    cluster.converge(Duration::from_secs(30)).await.expect("converge after healing");
    let views: Vec<BTreeSet<u64>> = futures::future::join_all(cluster.ids().into_iter().map(|id| live_leases(&cluster, id))).await;
    assert!(views.windows(2).all(|w| w[0] == w[1]), "nodes disagree after healing: {views:?}");
    assert!(committed.is_subset(&views[0]));
    assert_eq!(views[0].len(), committed.len(), "the minority's write never took effect");
}

#[tokio::test]
async fn a_one_way_partition_and_slow_links_do_not_stop_the_majority() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let m = market(&cluster, leader, 64).await;
    // The leader can no longer reach anyone, but everyone can still reach it.
    for to in cluster.ids().into_iter().filter(|id| *id != leader) {
        cluster.fault(leader, to, Fault::Drop).expect("fault");
    }
    let others: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != leader).collect();
    let new = cluster.leader_among(&others, Duration::from_secs(20)).await.expect("a new leader");
    // And every remaining link is slow.
    for from in cluster.ids() {
        for to in cluster.ids().into_iter().filter(|to| *to != from && from != leader) {
            cluster.fault(from, to, Fault::Delay(Duration::from_millis(20))).expect("fault");
        }
    }
    let researcher = cluster.client(new, &m.researcher_token).await.expect("client");
    for i in 0..5 {
        // As every client does on UNAVAILABLE (leadership may move again over slow links on
        // two busy cores): the same request again, applied once.
        let write = || {
            let mut researcher = researcher.clone();
            async move {
                match researcher.request_lease(lease_request(m.cluster.cluster_id, format!("slow-{i}"))).await {
                    Ok(_) => Some(Ok(())),
                    Err(status) if decode_status(&status).code == ErrorCode::Unavailable => None,
                    Err(status) => Some(Err(status)),
                }
            }
        };
        eventually(Duration::from_secs(20), Duration::from_millis(50), write)
            .await
            .expect("the majority commits over slow links")
            .expect("write over slow links");
    }
    cluster.heal();
    cluster.converge(Duration::from_secs(30)).await.expect("converge");
    let views: Vec<BTreeSet<u64>> = futures::future::join_all(cluster.ids().into_iter().map(|id| live_leases(&cluster, id))).await;
    assert!(views.windows(2).all(|w| w[0] == w[1]), "nodes disagree: {views:?}");
    assert_eq!(views[0].len(), 5);
}

/// A read of this node's own state (no leader round), as a node that is behind would answer.
fn local<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("x-suanli-read", "stale".parse().expect("header"));
    request
}

#[tokio::test]
async fn ended_leases_leave_the_hot_state_and_stay_readable_on_every_node_and_on_one_that_joins_later() {
    // Everything that ended is archived at once; snapshots every 20 entries compact the log.
    let config = "[broker]\nsnapshot_every_entries = 20\narchive_after_s = 0\n";
    let mut cluster = BrokerCluster::start(binary(), 3, Some(config)).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let m = market(&cluster, leader, 64).await;
    let mut researcher = cluster.client(leader, &m.researcher_token).await.expect("client");
    let mut ended = Vec::new();
    for i in 0..10 {
        let lease = researcher.request_lease(lease_request(m.cluster.cluster_id, format!("a{i}"))).await.expect("lease").into_inner();
        let reason = v1::EndReason::ByResearcher.into();
        researcher.end_lease(v1::EndLeaseRequest { request_id: format!("end-a{i}"), lease_id: lease.lease_id, reason }).await.expect("end");
        ended.push(lease.lease_id);
    }
    // The leader's reaper moves them out of the hot state: lists no longer show them.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let listed = researcher.list_leases(v1::ListLeasesRequest::default()).await.expect("list").into_inner().leases;
        if !listed.iter().any(|l| ended.contains(&l.lease_id)) {
            break;
        }
        assert!(Instant::now() < deadline, "the ended leases were not archived: {} still listed", listed.len());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Enough new entries for a snapshot past the archiving, and live leases that stay hot.
    for i in 0..30 {
        researcher.request_lease(lease_request(m.cluster.cluster_id, format!("b{i}"))).await.expect("lease");
    }
    cluster.converge(Duration::from_secs(30)).await.expect("converged");
    cluster.join(4).await.expect("join");
    cluster.converge(Duration::from_secs(30)).await.expect("node 4 caught up");
    assert!(cluster.status(4).await.expect("status").snapshot_index > 0, "node 4 caught up from a snapshot");
    for node in cluster.ids() {
        let mut on = cluster.client(node, &m.researcher_token).await.expect("client");
        for id in &ended {
            let lease = on.get_lease(local(v1::GetLeaseRequest { lease_id: *id })).await;
            let lease = lease.unwrap_or_else(|s| panic!("node {node}: lease {id} is not readable: {s}")).into_inner();
            let over = [v1::LeaseState::Ended, v1::LeaseState::Cancelled].map(|s| s as i32);
            assert!(over.contains(&lease.state), "node {node}: lease {id} is {}", lease.state);
        }
        let hot = on.list_leases(local(v1::ListLeasesRequest::default())).await.expect("list").into_inner().leases;
        assert_eq!(hot.len(), 30, "node {node}: only the live leases are hot");
    }
    // The archive is the account's own, like the hot state.
    let mut platform = cluster.client(leader, PLATFORM_TOKEN).await.expect("client");
    let (_, stranger_token) = register(&mut platform, AccountKind::Researcher, "stranger").await.expect("stranger");
    let mut stranger = cluster.client(leader, &stranger_token).await.expect("client");
    let refused = stranger.get_lease(v1::GetLeaseRequest { lease_id: ended[0] }).await.expect_err("not theirs");
    assert_eq!(decode_status(&refused).code, ErrorCode::NotFound);
}

/// Requests that arrive together share log entries (one disk sync per node for the lot), and
/// each still gets its own answer; a retry of one gets that answer again.
#[tokio::test]
async fn requests_arriving_together_share_log_entries_and_each_gets_its_own_answer() {
    const TOGETHER: usize = 200;
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let platform = cluster.client(leader, PLATFORM_TOKEN).await.expect("client");
    let register = |i: usize| {
        let mut platform = platform.clone();
        async move {
            let request = v1::RegisterAccountRequest { request_id: format!("together-{i}"), kind: AccountKind::Supplier.into(), token: String::new() };
            platform.register_account(request).await.map(|r| r.into_inner().account_id)
        }
    };
    let before = cluster.status(leader).await.expect("status").last_log_index;
    let answers: Vec<u64> = futures::future::join_all((0..TOGETHER).map(register)).await.into_iter().map(|r| r.expect("registered")).collect();
    let entries = cluster.status(leader).await.expect("status").last_log_index - before;
    assert_eq!(answers.iter().collect::<BTreeSet<_>>().len(), TOGETHER, "one account each");
    assert!(entries <= (TOGETHER / 2) as u64, "{TOGETHER} requests arriving together took {entries} log entries");
    // Retried, each gets its first answer, and nothing more is registered.
    for i in [0, TOGETHER / 2, TOGETHER - 1] {
        assert_eq!(register(i).await.expect("retry"), answers[i]);
    }
    cluster.converge(Duration::from_secs(10)).await.expect("converge");
    let metrics = cluster.metrics(leader).await.expect("metrics");
    assert!(metrics.contains("suanli_broker_requests_per_entry_count"), "{metrics}");
}
