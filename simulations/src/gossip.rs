//! Many real federation members in one process: `suanli_federation::FederationNode` (the same
//! gossipsub, anti-entropy, ed25519 signatures, membership and catalogue checks as on the
//! network) over libp2p's in-memory transport, with Noise and Yamux as over TCP. Each new
//! member dials `degree` random earlier ones; then one member after another announces a new
//! offer, and the time until each member's catalogue shows it is measured.
//!
//! `suanli-sim federation` reports the time until *every* member has it; `suanli-sim market`
//! draws its members' gossip delays from the per-member times.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use suanli_federation::testing::{founded, listing};
use suanli_federation::{FederationNode, Freshness, Keypair, MembershipChain, NodeConfig, TransportKind};

use crate::plot::{self, Panel, Series};

/// What one federation size measured.
pub struct Convergence {
    pub members: usize,
    /// Start-up, connections and a few heartbeats to form the meshes.
    pub startup: Duration,
    /// Per announcement: the time until every member had it.
    pub times: Vec<Duration>,
    /// Per announcement and member (the announcer left out): the time until it had it.
    pub arrivals: Vec<Duration>,
    /// Announcements each member handled per change (after gossipsub drops duplicates).
    pub copies_per_member: f64,
    pub messages_per_member_second: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("a federation member failed: {0}")]
    Node(String),
    #[error("{0}")]
    Timeout(String),
}

/// A small deterministic generator (the topology is the same on every run).
struct Xorshift(u64);

impl Xorshift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn node_error(e: impl std::fmt::Display) -> GossipError {
    GossipError::Node(e.to_string())
}

/// Starts `members` nodes and measures `rounds` announcements.
pub async fn measure(members: usize, degree: usize, rounds: usize) -> Result<Convergence, GossipError> {
    let started = Instant::now();
    let keys: Vec<Keypair> = (0..members).map(|_| Keypair::generate_ed25519()).collect();
    let names: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
    let named: Vec<(&str, &Keypair)> = names.iter().map(String::as_str).zip(&keys).collect();
    let chain = MembershipChain { genesis: founded("sim", &named, "sim"), changes: vec![] };
    let mut rng = Xorshift(0x5eed_0000_0000_0001 ^ members as u64);
    let mut nodes: Vec<FederationNode> = Vec::with_capacity(members);
    let mut addresses: Vec<suanli_federation::Multiaddr> = Vec::with_capacity(members);
    for key in &keys {
        let dial = (0..degree.min(nodes.len())).map(|_| addresses[rng.below(nodes.len())].clone()).collect();
        let node = FederationNode::start(NodeConfig {
            keypair: key.clone(),
            membership: chain.clone(),
            listen: "/memory/0".parse().map_err(node_error)?,
            dial,
            transport: TransportKind::Memory,
            persist_membership: None,
            anti_entropy_every: Duration::from_secs(2),
            freshness: Freshness { stale_after: Duration::from_secs(600), hide_after: Duration::from_secs(1200) },
            calls: None,
        })
        .await
        .map_err(node_error)?;
        addresses.push(node.listen_addr().await.map_err(node_error)?);
        nodes.push(node);
    }
    for node in &nodes {
        while node.connected().await.map_err(node_error)?.is_empty() {
            if started.elapsed() > Duration::from_secs(600) {
                return Err(GossipError::Timeout("a member never connected".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A few gossipsub heartbeats to form the meshes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let startup = started.elapsed();
    let copies = |nodes: &[FederationNode]| -> u64 {
        nodes.iter().map(|n| n.counters().announcements_applied.load(Ordering::Relaxed) + n.counters().announcements_known.load(Ordering::Relaxed)).sum()
    };
    let messages = |nodes: &[FederationNode]| -> u64 { nodes.iter().map(|n| n.counters().messages_received.load(Ordering::Relaxed)).sum() };
    let (copies_before, messages_before) = (copies(&nodes), messages(&nodes));
    let measured = Instant::now();
    let mut times = Vec::with_capacity(rounds);
    let mut arrivals = Vec::with_capacity(rounds * members);
    for round in 0..rounds {
        let origin_index = (round * 7919) % members;
        let origin = &nodes[origin_index];
        let marker = 1000 + round as u32;
        let t = Instant::now();
        origin.announce(vec![listing(1, marker)]).await.map_err(node_error)?;
        let origin_id = origin.peer_id();
        let mut pending: Vec<usize> = (0..members).filter(|i| *i != origin_index).collect();
        while !pending.is_empty() {
            if t.elapsed() > Duration::from_secs(120) {
                return Err(GossipError::Timeout(format!("{} members never saw announcement {round}", pending.len())));
            }
            pending.retain(|i| {
                let seen = nodes[*i].catalogue().iter().any(|l| l.origin == origin_id && l.listing.free_cards == marker);
                if seen {
                    arrivals.push(t.elapsed());
                }
                !seen
            });
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(t.elapsed());
    }
    let copies_per_member = (copies(&nodes) - copies_before) as f64 / (members as f64 * rounds as f64);
    let messages_per_member_second = (messages(&nodes) - messages_before) as f64 / (members as f64 * measured.elapsed().as_secs_f64());
    Ok(Convergence { members, startup, times, arrivals, copies_per_member, messages_per_member_second })
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Convergence time against members: the slowest and the median announcement to reach every
/// member, and the median member's arrival, as SVG and PNG.
pub fn plots(outcomes: &[Convergence]) -> (String, Vec<u8>) {
    let sorted = |v: &[Duration]| {
        let mut v: Vec<f64> = v.iter().map(ms).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let median = |v: &[Duration]| sorted(v).get(v.len() / 2).copied().unwrap_or(0.0);
    let max = |v: &[Duration]| sorted(v).last().copied().unwrap_or(0.0);
    let pick = |f: &dyn Fn(&Convergence) -> f64| outcomes.iter().map(|o| (o.members as f64, f(o))).collect::<Vec<_>>();
    let series = [
        Series { label: "every member: max".into(), points: pick(&|o| max(&o.times)) },
        Series { label: "every member: p50".into(), points: pick(&|o| median(&o.times)) },
        Series { label: "one member: p50".into(), points: pick(&|o| median(&o.arrivals)) },
    ];
    let panel = Panel { title: "An announcement reaching the federation", x_label: "members", y_label: "ms", x_log: false, y_range: None, series: &series };
    (plot::svg(std::slice::from_ref(&panel)), plot::png(&[panel]))
}
