//! A rolling upgrade: a 3-node cluster of the previous release's broker (built from the commit
//! `ops/previous-release` names, by `ops/build-previous-release`) is upgraded node by node to
//! this build under a lease storm. Old and new nodes lead each other in turn; the cluster keeps
//! writing the previous format until the last node runs this one, and the history checker
//! finds nothing lost or doubled.

use std::path::Path;
use std::time::Duration;

use suanli_testkit::cluster::{previous_release_broker, BrokerCluster};
use suanli_testkit::eventually;
use suanli_testkit::storm::{market, Storm};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-broker"))
}

const NO_SNAPSHOTS: &str = "[broker]\nsnapshot_every_entries = 100000000\n";

/// The store format of this build (the answering node's, in its status).
const THIS_FORMAT: u32 = 7;
const PREVIOUS_FORMAT: u32 = 5;

/// The end of every node's log, for a failure's message.
fn logs(cluster: &BrokerCluster) -> String {
    let mut out = String::new();
    for id in cluster.ids() {
        let log = cluster.log(id);
        let tail: Vec<&str> = log.lines().rev().take(25).collect();
        out.push_str(&format!("\n--- node {id}\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
    }
    out
}

/// Every live node's cluster format, as it answers (a node of the previous release says 0:
/// its status has no such field).
async fn cluster_formats(cluster: &BrokerCluster) -> Vec<(u64, u32)> {
    let mut formats = Vec::new();
    for id in cluster.live() {
        formats.push((id, cluster.status(id).await.map_or(0, |s| s.cluster_format)));
    }
    formats
}

#[tokio::test]
async fn a_cluster_of_the_previous_release_upgraded_node_by_node_under_a_storm_loses_nothing_and_switches_format_last() {
    let previous = previous_release_broker().expect("the previous release's broker");
    // No snapshots: a node that installed one would have no events from before it, which the
    // history checker reads (snapshots across versions: the test below).
    let mut cluster = BrokerCluster::start(&previous, 3, Some(NO_SNAPSHOTS)).await.expect("a cluster of the previous release");
    let old_leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let m = market(&cluster, old_leader, 6).await;
    let storm = Storm::start(&cluster, &m, 8);
    let mut acked = storm.progresses(0, 10, Duration::from_secs(30)).await.expect("the previous release serves writes");
    let progress = Duration::from_secs(30);

    // 1. The followers first: a leader of the previous release replicates to nodes of this one.
    let followers: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old_leader).collect();
    for id in &followers {
        cluster.upgrade(*id, binary()).await.expect("upgrade a follower");
        acked = storm.progresses(acked, 10, progress).await.unwrap_or_else(|e| panic!("a mixed cluster serves writes: {e}{}", logs(&cluster)));
        let status = cluster.status(*id).await.expect("the upgraded node answers");
        assert_eq!(status.store_format, THIS_FORMAT);
        assert_eq!(status.cluster_format, PREVIOUS_FORMAT, "raised while a node runs the previous release");
    }
    // 2. The old leader restarts, still of the previous release: a node of this build leads it,
    //    writing what the previous release reads.
    cluster.stop(old_leader).await.expect("stop the old leader");
    let new_leader = cluster.leader_among(&followers, Duration::from_secs(20)).await.expect("a leader");
    assert!(followers.contains(&new_leader), "a node of this build leads");
    cluster.restart(old_leader).await.expect("restart the old leader as it was");
    acked =
        storm.progresses(acked, 10, progress).await.unwrap_or_else(|e| panic!("a node of this build leads one of the previous release: {e}{}", logs(&cluster)));
    cluster.converge(Duration::from_secs(30)).await.expect("the previous release's node keeps up with a new leader");
    for (id, format) in cluster_formats(&cluster).await {
        assert!(format == PREVIOUS_FORMAT || id == old_leader, "node {id} is at cluster format {format} before the last upgrade");
    }
    // 3. The last node: once every member runs this build, the leader raises the cluster format.
    cluster.upgrade(old_leader, binary()).await.expect("upgrade the last node");
    let raised = eventually(Duration::from_secs(30), Duration::from_millis(100), || async {
        cluster_formats(&cluster).await.iter().all(|(_, f)| *f == THIS_FORMAT).then_some(())
    })
    .await;
    if raised.is_err() {
        panic!("the cluster format was not raised: {:?}", cluster_formats(&cluster).await);
    }
    storm.progresses(acked, 10, progress).await.unwrap_or_else(|e| panic!("the upgraded cluster serves writes: {e}{}", logs(&cluster)));

    let history = storm.stop().await;
    cluster.converge(Duration::from_secs(30)).await.expect("converge");
    history.check(&cluster).await;
    eprintln!("rolling upgrade under a storm: {}", history.summary());
}

/// A node of the previous release that fell behind the purged log catches up from a snapshot a
/// leader of this build sends it (in the previous format), and a node of this build from one a
/// leader of the previous release sends.
#[tokio::test]
async fn snapshots_cross_versions_both_ways_while_the_cluster_is_at_the_previous_format() {
    let previous = previous_release_broker().expect("the previous release's broker");
    // A snapshot every 100 entries; openraft keeps 1,000 entries behind it.
    let config = "[broker]\nsnapshot_every_entries = 100\n";
    let mut cluster = BrokerCluster::start(&previous, 3, Some(config)).await.expect("a cluster of the previous release");
    let old_leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let m = market(&cluster, old_leader, 16).await;
    let followers: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != old_leader).collect();
    let (new, old) = (followers[0], followers[1]);

    // A node of this build, stopped while the previous release's leader writes far past it.
    cluster.upgrade(new, binary()).await.expect("upgrade");
    cluster.stop(new).await.expect("stop");
    let storm = Storm::start(&cluster, &m, 8);
    storm.progresses(0, 1_500, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("writes: {e}"));
    cluster.restart(new).await.expect("restart");
    cluster.converge(Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("the new node caught up from the old leader: {e}"));

    // Now a node of the previous release falls behind a leader of this build. Leadership moves
    // (the leader stopped and restarted) until the node of this build has it.
    let mut leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    for _ in 0..12 {
        if leader == new {
            break;
        }
        cluster.stop(leader).await.expect("stop the leader");
        let others: Vec<u64> = cluster.ids().into_iter().filter(|id| *id != leader).collect();
        let next = cluster.leader_among(&others, Duration::from_secs(20)).await.expect("a new leader");
        cluster.restart(leader).await.expect("restart it, of the same release");
        leader = next;
    }
    assert_eq!(leader, new, "the node of this build leads");
    cluster.stop(old).await.expect("stop a node of the previous release");
    let acked = storm.acked_so_far();
    storm.progresses(acked, 1_500, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("writes: {e}"));
    cluster.restart(old).await.expect("restart the lagging node of the previous release");
    // Stopped before the nodes are compared: what is acknowledged after a convergence check
    // may not have reached every node yet.
    let history = storm.stop().await;
    cluster.converge(Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("the old node caught up from the new leader: {e}"));
    for (id, format) in cluster_formats(&cluster).await {
        assert!(format == PREVIOUS_FORMAT || format == 0, "node {id} at cluster format {format} with nodes of the previous release");
    }
    // Every acknowledged lease on every node, the lagging ones included.
    for id in cluster.live() {
        let platform = cluster.client(id, suanli_testkit::cluster::PLATFORM_TOKEN).await.expect("client");
        let all = suanli_testkit::cluster::leases_as_applied(&platform, false).await.expect("leases");
        let ids: std::collections::BTreeSet<u64> = all.iter().map(|l| l.lease_id).collect();
        for lease in history.acked() {
            assert!(ids.contains(&lease.lease_id), "node {id} lost lease {}", lease.lease_id);
        }
    }
}
