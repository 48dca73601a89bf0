//! Members on loopback over real TCP, Noise and Yamux: what one announces reaches the others by
//! gossip or, when gossip missed it, by anti-entropy; outsiders are refused at connection time;
//! membership changes and disappearing members are seen by the rest.

use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux};
use suanli_federation::membership::sign;
use suanli_federation::testing::{founded, listing};
use suanli_federation::{
    Answer, Call, FederationNode, Freshness, IncomingCall, Keypair, Member, MembershipChain, Multiaddr, NodeConfig, NodeError, SignedMembership,
};
use tokio::time::Instant;

const NAMES: [&str; 4] = ["city", "university", "cloud", "lab"];

struct Federation {
    keys: Vec<Keypair>,
    genesis: SignedMembership,
}

fn federation(n: usize) -> Federation {
    let keys: Vec<Keypair> = (0..n).map(|_| Keypair::generate_ed25519()).collect();
    let members: Vec<(&str, &Keypair)> = NAMES.into_iter().zip(&keys).collect();
    let genesis = founded("test", &members, "cn-north");
    Federation { keys, genesis }
}

fn loopback() -> Multiaddr {
    "/ip4/127.0.0.1/tcp/0".parse().expect("address")
}

/// Anti-entropy rounds (and re-announcements) every half second.
const OFTEN: Duration = Duration::from_millis(500);

async fn start(f: &Federation, i: usize, dial: Vec<Multiaddr>, freshness: Freshness) -> FederationNode {
    start_with(f, i, dial, freshness, OFTEN).await
}

async fn start_with(f: &Federation, i: usize, dial: Vec<Multiaddr>, freshness: Freshness, every: Duration) -> FederationNode {
    start_config(f, i, dial, freshness, every, None).await
}

async fn start_config(
    f: &Federation,
    i: usize,
    dial: Vec<Multiaddr>,
    freshness: Freshness,
    every: Duration,
    persist: Option<std::path::PathBuf>,
) -> FederationNode {
    FederationNode::start(config(f, i, dial, freshness, every, persist)).await.expect("start")
}

fn config(f: &Federation, i: usize, dial: Vec<Multiaddr>, freshness: Freshness, every: Duration, persist: Option<std::path::PathBuf>) -> NodeConfig {
    NodeConfig {
        transport: Default::default(),
        persist_membership: persist,
        keypair: f.keys[i].clone(),
        membership: MembershipChain { genesis: f.genesis.clone(), changes: Vec::new() },
        listen: loopback(),
        dial,
        anti_entropy_every: every,
        freshness,
        calls: None,
    }
}

/// Member `i`, handing the calls it gets to the returned receiver.
async fn start_answering(f: &Federation, i: usize, dial: Vec<Multiaddr>) -> (FederationNode, tokio::sync::mpsc::Receiver<IncomingCall>) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let node = FederationNode::start(NodeConfig { calls: Some(tx), ..config(f, i, dial, Freshness::default(), OFTEN, None) }).await.expect("start");
    (node, rx)
}

fn lease_call(key: &str) -> Call {
    Call::Lease { key: key.into(), cluster_id: 7, cards: 1, billing_mode: "hourly".into(), periods: 1, price_per_card_minor: 100, currency: "CNY".into() }
}

async fn address(node: &FederationNode) -> Multiaddr {
    tokio::time::timeout(Duration::from_secs(10), node.listen_addr()).await.expect("the node never listened").expect("running")
}

/// Members 0, 1 and 2, the latter two dialling the first.
async fn three(f: &Federation) -> (FederationNode, FederationNode, FederationNode) {
    let a = start(f, 0, vec![], Freshness::default()).await;
    let at_a = address(&a).await;
    let b = start(f, 1, vec![at_a.clone()], Freshness::default()).await;
    let c = start(f, 2, vec![at_a], Freshness::default()).await;
    (a, b, c)
}

/// Waits until `check` holds, or fails with `what` after `seconds`.
async fn until(seconds: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn offers(node: &FederationNode, origin: &str) -> Vec<(u64, u32)> {
    node.catalogue().into_iter().filter(|l| l.origin_name == origin && !l.stale).map(|l| (l.listing.cluster_id, l.listing.free_cards)).collect()
}

#[tokio::test]
async fn an_offer_announced_at_one_member_reaches_every_member() {
    let f = federation(3);
    let (a, b, c) = three(&f).await;
    until(10, "both joined a", async || a.connected().await.expect("running").len() == 2).await;
    a.announce(vec![listing(7, 3)]).await.expect("announce");
    for node in [&b, &c] {
        until(10, "the offer arrived", async || offers(node, "city") == vec![(7, 3)]).await;
    }
    // A new offer replaces the old one everywhere, with no duplicate.
    a.announce(vec![listing(7, 2), listing(8, 8)]).await.expect("announce");
    for node in [&b, &c] {
        until(10, "the new offer replaced it", async || offers(node, "city") == vec![(7, 2), (8, 8)]).await;
    }
}

#[tokio::test]
async fn a_member_that_missed_the_gossip_catches_up_by_anti_entropy() {
    // No periodic rounds (nor re-announcements) within the test: only anti-entropy's questions
    // (a node asks a peer as it connects, and in its first round) can bring what gossip missed.
    // Checked: with both questions switched off, C never learns of the offer.
    let rarely = Duration::from_secs(3600);
    let f = federation(3);
    let a = start_with(&f, 0, vec![], Freshness::default(), rarely).await;
    let b = start_with(&f, 1, vec![address(&a).await], Freshness::default(), rarely).await;
    until(10, "b joined a", async || !a.connected().await.expect("running").is_empty()).await;
    a.announce(vec![listing(7, 3)]).await.expect("announce");
    until(10, "b has the offer", async || offers(&b, "city") == vec![(7, 3)]).await;
    // C starts after the gossip went out and left gossipsub's message cache (5 heartbeats of
    // 500 ms; within them a newcomer is offered recent messages lazily), and knows only B: it
    // can learn of A's offer only by asking B what it lacks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = start_with(&f, 2, vec![address(&b).await], Freshness::default(), rarely).await;
    until(10, "c caught up", async || offers(&c, "city") == vec![(7, 3)]).await;
}

#[tokio::test]
async fn a_peer_outside_the_membership_is_refused_at_connection_and_injects_nothing() {
    let f = federation(2);
    let a = start(&f, 0, vec![], Freshness::default()).await;
    let at_a = address(&a).await;
    // An outsider with a plain libp2p stack (no allow list of its own) dials A and publishes a
    // catalogue message as soon as it can.
    let outsider = Keypair::generate_ed25519();
    let outsider_id = outsider.public().to_peer_id();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(outsider)
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .expect("tcp")
        .with_behaviour(|key| {
            gossipsub::Behaviour::<gossipsub::IdentityTransform, gossipsub::AllowAllSubscriptionFilter>::new(
                MessageAuthenticity::Signed(key.clone()),
                gossipsub::Config::default(),
            )
            .expect("gossip")
        })
        .expect("behaviour")
        .build();
    let topic = IdentTopic::new("suanli/catalogue/1");
    swarm.behaviour_mut().subscribe(&topic).expect("subscribe");
    swarm.dial(at_a).expect("dial");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut closed = false;
    while Instant::now() < deadline {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::ConnectionClosed { .. } | SwarmEvent::OutgoingConnectionError { .. } => closed = true,
                _ => {}
            },
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let _ = swarm.behaviour_mut().publish(topic.clone(), b"forged offer".to_vec());
            }
        }
    }
    assert!(closed, "A closed the outsider's connection");
    assert!(a.counters().connections_refused.load(std::sync::atomic::Ordering::Relaxed) >= 1, "counted as refused");
    assert!(!a.connected().await.expect("running").contains(&outsider_id));
    assert_eq!(a.counters().announcements_refused.load(std::sync::atomic::Ordering::Relaxed), 0, "nothing reached the catalogue");
    assert!(a.catalogue().is_empty());
}

#[tokio::test]
async fn a_member_that_disappears_goes_stale_then_hidden_and_returns_once() {
    let f = federation(2);
    let freshness = Freshness { stale_after: Duration::from_millis(1500), hide_after: Duration::from_secs(3) };
    let a = start(&f, 0, vec![], freshness).await;
    let at_a = address(&a).await;
    let b = start(&f, 1, vec![at_a], freshness).await;
    a.announce(vec![listing(7, 3)]).await.expect("announce");
    until(10, "b has the offer", async || offers(&b, "city") == vec![(7, 3)]).await;
    drop(a);
    until(10, "the offer is stale", async || b.catalogue().iter().any(|l| l.origin_name == "city" && l.stale)).await;
    until(10, "the offer is hidden", async || b.catalogue().is_empty()).await;
    // A comes back (same key, new process state) and announces again: one offer, fresh.
    let a = start(&f, 0, vec![address(&b).await], freshness).await;
    a.announce(vec![listing(7, 3)]).await.expect("announce");
    until(10, "the offer is back", async || offers(&b, "city") == vec![(7, 3)]).await;
    assert_eq!(b.catalogue().len(), 1);
}

#[tokio::test]
async fn a_member_voted_out_is_disconnected_and_its_offer_dropped_everywhere() {
    let f = federation(3);
    let (a, b, c) = three(&f).await;
    c.announce(vec![listing(9, 1)]).await.expect("announce");
    until(10, "a and b have c's offer", async || offers(&a, "cloud").len() == 1 && offers(&b, "cloud").len() == 1).await;
    // Version 2 without C, signed by A and B (two of three).
    let mut doc = f.genesis.doc.clone();
    doc.version = 2;
    doc.members.retain(|m| m.name != "cloud");
    let signatures = [&f.keys[0], &f.keys[1]].into_iter().map(|k| sign(&doc, k).expect("sign")).collect();
    // Not enough: C alone cannot change it back or sign anything for the others.
    let lone = SignedMembership { doc: doc.clone(), signatures: [sign(&doc, &f.keys[2]).expect("sign")].into_iter().collect() };
    assert!(a.change_membership(lone).await.is_err());
    a.change_membership(SignedMembership { doc, signatures }).await.expect("a quorum signed it");
    let c_id = c.peer_id();
    until(10, "b adopted version 2", async || b.membership_version() == 2).await;
    for node in [&a, &b] {
        until(10, "c's offer is gone and c disconnected", async || {
            offers(node, "cloud").is_empty() && !node.connected().await.expect("running").contains(&c_id)
        })
        .await;
    }
}

/// Version `version` of the federation's document with `members` (indexes into its keys),
/// signed by the keys at `signers`.
fn change(f: &Federation, version: u64, members: &[usize], extra: Option<&Keypair>, signers: &[usize]) -> SignedMembership {
    let mut doc = f.genesis.doc.clone();
    doc.version = version;
    doc.members = members.iter().map(|i| f.genesis.doc.members[*i].clone()).collect();
    if let Some(k) = extra {
        doc.members.push(Member::new("newcomer", &k.public(), vec![], "cn-south"));
    }
    let signatures = signers.iter().map(|i| sign(&doc, &f.keys[*i]).expect("sign")).collect();
    SignedMembership { doc, signatures }
}

#[tokio::test]
async fn a_member_that_missed_membership_changes_takes_them_in_order_and_keeps_them() {
    let f = federation(3);
    let a = start(&f, 0, vec![], Freshness::default()).await;
    let b = start(&f, 1, vec![address(&a).await], Freshness::default()).await;
    until(10, "b joined a", async || !a.connected().await.expect("running").is_empty()).await;
    // While C is away: a newcomer joins (version 2) and leaves again (version 3).
    let newcomer = Keypair::generate_ed25519();
    a.change_membership(change(&f, 2, &[0, 1, 2], Some(&newcomer), &[0, 1])).await.expect("version 2");
    // Version 3 needs a quorum of version 2's four members: three.
    let short = change(&f, 3, &[0, 1, 2], None, &[0, 1]);
    assert!(a.change_membership(short).await.is_err(), "two of four are not a quorum");
    a.change_membership(change(&f, 3, &[0, 1, 2], None, &[0, 1, 2])).await.expect("version 3");
    until(10, "b has version 3", async || b.membership_version() == 3).await;
    // C starts from the first version only; it is given versions 2 and 3 by a peer, checks each
    // against the one before, and keeps them.
    let dir = std::env::temp_dir().join(format!("suanli-fed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kept = dir.join("membership.json");
    let c = start_config(&f, 2, vec![address(&b).await], Freshness::default(), OFTEN, Some(kept.clone())).await;
    until(10, "c took versions 2 and 3", async || c.membership_version() == 3).await;
    let chain: MembershipChain = serde_json::from_str(&std::fs::read_to_string(&kept).expect("kept")).expect("json");
    assert_eq!(chain.changes.iter().map(|c| c.doc.version).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(chain.verify().expect("a valid chain").version(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_call_reaches_the_member_it_names_with_the_callers_proven_identity_and_the_answer_comes_back() {
    let f = federation(2);
    let (a, mut calls) = start_answering(&f, 0, vec![]).await;
    let b = start(&f, 1, vec![address(&a).await], Freshness::default()).await;
    until(10, "b joined a", async || b.connected().await.expect("running").contains(&a.peer_id())).await;
    let answering = tokio::spawn(async move {
        let incoming = calls.recv().await.expect("a call");
        let from = incoming.from;
        let Call::Lease { key, .. } = incoming.call.clone() else { panic!("a lease call: {:?}", incoming.call) };
        incoming.reply.send(Answer::Lease { lease_id: 42, state: format!("for {key}") }).expect("reply");
        from
    });
    let answer = b.call(a.peer_id(), lease_call("rlease-1")).await.expect("answered");
    assert_eq!(answer, Answer::Lease { lease_id: 42, state: "for rlease-1".into() });
    assert_eq!(answering.await.expect("answered"), b.peer_id(), "the caller is who Noise proved, not what the call says");
}

#[tokio::test]
async fn a_member_that_takes_no_calls_refuses_them_and_a_malformed_call_is_refused_before_its_gateway() {
    let f = federation(3);
    let a = start(&f, 0, vec![], Freshness::default()).await;
    let (c, mut calls) = start_answering(&f, 2, vec![]).await;
    let b = start(&f, 1, vec![address(&a).await, address(&c).await], Freshness::default()).await;
    until(10, "b joined a and c", async || b.connected().await.expect("running").len() == 2).await;
    let answer = b.call(a.peer_id(), lease_call("k")).await.expect("answered");
    assert!(matches!(answer, Answer::Refused { ref code, .. } if code == "UNIMPLEMENTED"), "{answer:?}");
    let answer = b.call(c.peer_id(), lease_call("")).await.expect("answered");
    assert!(matches!(answer, Answer::Refused { ref code, .. } if code == "INVALID_ARGUMENT"), "{answer:?}");
    assert!(calls.try_recv().is_err(), "the gateway never saw it");
}

#[tokio::test]
async fn a_call_to_a_peer_outside_the_membership_is_never_sent_and_one_to_a_member_that_is_down_fails_clearly() {
    let f = federation(3);
    let a = start(&f, 0, vec![], Freshness::default()).await;
    let stranger = Keypair::generate_ed25519().public().to_peer_id();
    assert!(matches!(a.call(stranger, lease_call("k")).await, Err(NodeError::NotMember(p)) if p == stranger));
    // Member 2 never started: the call ends with an error naming it, not a hang.
    let absent = f.keys[2].public().to_peer_id();
    match a.call(absent, lease_call("k")).await {
        Err(NodeError::Call { peer, .. }) => assert_eq!(peer, absent),
        other => panic!("a clear failure, got {other:?}"),
    }
    assert_eq!(a.counters().calls_failed.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_node_reports_libp2p_and_federation_metrics() {
    let f = federation(2);
    let (a, b) = {
        let a = start(&f, 0, vec![], Freshness::default()).await;
        let b = start(&f, 1, vec![address(&a).await], Freshness::default()).await;
        (a, b)
    };
    until(10, "b joined a", async || a.connected().await.expect("running").len() == 1).await;
    a.announce(vec![listing(7, 3)]).await.expect("announce");
    until(10, "the offer arrived", async || offers(&b, "city") == vec![(7, 3)]).await;
    let text = b.metrics_text();
    for name in ["libp2p_swarm_connections_established", "libp2p_gossipsub", "suanli_federation_announcements_applied_total 1", "suanli_federation_members 2"] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

#[tokio::test]
async fn every_federation_series_the_dashboards_and_alerts_name_is_served() {
    let f = federation(2);
    let a = start(&f, 0, vec![], Freshness::default()).await;
    let b = start(&f, 1, vec![address(&a).await], Freshness::default()).await;
    until(10, "b joined a", async || a.connected().await.expect("running").len() == 1).await;
    use suanli_testkit::observability::{exposed_series, missing, referenced_series};
    let referenced = referenced_series();
    assert!(referenced.iter().any(|n| n.starts_with("suanli_federation_")), "the assets name federation series");
    let lacking = missing(&referenced, &["suanli_federation_"], &exposed_series(&b.metrics_text()));
    assert!(lacking.is_empty(), "named in ops/grafana or ops/prometheus but not served: {lacking:?}");
}
