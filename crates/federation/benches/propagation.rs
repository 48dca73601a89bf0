//! Announcement propagation: a member announces a new offer; how long until every other member's
//! catalogue shows it (3 and 4 members on loopback, one connection each to the announcer plus
//! the mesh gossipsub builds). Baseline in the same process: a 64-byte TCP echo round trip on
//! loopback (the floor any propagation pays).
//!
//! `cargo bench -p suanli-federation --bench propagation` (`ROUNDS=N` to change the 300 rounds).

use std::time::{Duration, Instant};

use suanli_federation::testing::{founded, listing};
use suanli_federation::{FederationNode, Freshness, Keypair, MembershipChain, NodeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn echo_round_trips(rounds: usize) -> Vec<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        socket.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; 64];
        while socket.read_exact(&mut buf).await.is_ok() {
            if socket.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let mut client = tokio::net::TcpStream::connect(address).await.expect("connect");
    client.set_nodelay(true).expect("nodelay");
    let mut buf = [7u8; 64];
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        client.write_all(&buf).await.expect("write");
        client.read_exact(&mut buf).await.expect("read");
        out.push(t.elapsed());
    }
    out
}

async fn propagation(members: usize, rounds: usize) -> Vec<Duration> {
    let keys: Vec<Keypair> = (0..members).map(|_| Keypair::generate_ed25519()).collect();
    let names: Vec<String> = (0..members).map(|i| format!("m{i}")).collect();
    let named: Vec<(&str, &Keypair)> = names.iter().map(String::as_str).zip(&keys).collect();
    let genesis = founded("bench", &named, "cn");
    let config = |i: usize, dial| NodeConfig {
        keypair: keys[i].clone(),
        membership: MembershipChain { genesis: genesis.clone(), changes: Vec::new() },
        listen: "/ip4/127.0.0.1/tcp/0".parse().expect("address"),
        dial,
        transport: Default::default(),
        persist_membership: None,
        // Rounds are rare here: what is measured is gossip.
        anti_entropy_every: Duration::from_secs(3600),
        freshness: Freshness::default(),
        calls: None,
    };
    let announcer = FederationNode::start(config(0, vec![])).await.expect("start");
    let address = announcer.listen_addr().await.expect("running");
    let mut others = Vec::new();
    for i in 1..members {
        others.push(FederationNode::start(config(i, vec![address.clone()])).await.expect("start"));
    }
    while announcer.connected().await.expect("running").len() < members - 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Let gossipsub form its mesh (a few heartbeats) before timing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut out = Vec::with_capacity(rounds);
    for round in 0..rounds as u32 {
        let mut watchers: Vec<_> = others.iter().map(|o| o.changes()).collect();
        for w in &mut watchers {
            w.borrow_and_update();
        }
        let t = Instant::now();
        announcer.announce(vec![listing(1, round)]).await.expect("announce");
        for (other, watcher) in others.iter().zip(&mut watchers) {
            while !other.catalogue().iter().any(|l| l.listing.free_cards == round && !l.stale) {
                tokio::time::timeout(Duration::from_secs(10), watcher.changed()).await.expect("propagated within 10 s").expect("running");
            }
        }
        out.push(t.elapsed());
    }
    out
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(300);
    let mut echo = echo_round_trips(rounds * 10).await;
    echo.sort();
    let floor = percentile(&echo, 0.5);
    println!("| what | rounds | p50 | p99 | p50 / TCP echo p50 |");
    println!("|---|---|---|---|---|");
    println!("| TCP echo round trip, loopback (baseline) | {} | {:.3} ms | {:.3} ms | 1.0 |", echo.len(), ms(floor), ms(percentile(&echo, 0.99)));
    for members in [3, 4] {
        let mut times = propagation(members, rounds).await;
        times.sort();
        let p50 = percentile(&times, 0.5);
        println!(
            "| announce → in every catalogue, {members} members | {rounds} | {:.3} ms | {:.3} ms | {:.1} |",
            ms(p50),
            ms(percentile(&times, 0.99)),
            p50.as_secs_f64() / floor.as_secs_f64()
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
