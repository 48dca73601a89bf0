//! The rendezvous firewall against the real kernel: nftables rules the agent installs (through
//! the real `nft`), a listener standing in for rank 0's store, and connections made the way a
//! stranger would make them — as another user of the node, and from a host outside the
//! attempt (a network namespace of the test's own, joined by a veth pair). Each test asserts
//! the stranger is refused, the lease gets through, and that taking the rule away lets the
//! stranger in (so the test can fail).
//!
//! These need root and nftables (ops/install-build-deps); under `CI=true` a missing one fails them.

use std::net::{IpAddr, TcpListener};
use std::process::Command;

use suanli_agent::access::firewall::{FirewallKind, Opening, RendezvousFirewall};
use suanli_testkit::connects_as;

/// The lease's user on the node (no account is needed to run as a UID).
const LEASE_UID: u32 = 2_999_901;
/// Another lease's user of the same node.
const STRANGER_UID: u32 = 2_999_902;

fn prerequisites() -> bool {
    if !suanli_testkit::require_root("nftables rules") {
        return false;
    }
    let nft = Command::new("nft").args(["list", "tables"]).output().is_ok_and(|o| o.status.success());
    if !nft {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "nftables' `nft` must work under CI=true (ops/install-build-deps)");
        eprintln!("skipped: no usable `nft`");
    }
    nft
}

/// A firewall with a table of this test's own, deleted when the test ends (pass or fail).
struct Table(RendezvousFirewall);

impl Table {
    fn new(tag: &str) -> Table {
        Table(RendezvousFirewall::with_table(FirewallKind::Nftables, format!("suanli_test_{}_{tag}", std::process::id())))
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let t = self.0.table();
        let _ = Command::new("nft").args(["delete", "table", "inet", t]).output();
    }
}

/// A listener on every address, as torch's store binds: the kernel completes a connection
/// (into the backlog) whether or not anyone accepts it.
fn rank_zero_listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("0.0.0.0:0").expect("listen");
    let port = l.local_addr().expect("address").port();
    (l, port)
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

#[tokio::test]
async fn on_rank_zeros_node_only_the_leases_user_reaches_the_port() {
    if !prerequisites() {
        return;
    }
    let table = Table::new("local");
    let (_listener, port) = rank_zero_listener();
    assert!(connects_as(STRANGER_UID, "127.0.0.1", port), "before any rule, the port is open to anyone: the test must see the difference");

    table.0.open((12, 1), Opening { port, uid: LEASE_UID, peers: Some(vec![]) }).await.expect("rules installed");
    assert!(connects_as(LEASE_UID, "127.0.0.1", port), "the lease's own process reaches rank 0");
    assert!(!connects_as(STRANGER_UID, "127.0.0.1", port), "another lease of the node is refused on loopback");
    // MASTER_ADDR is usually the node's own routable address, not 127.0.0.1.
    let own = local_non_loopback_address();
    if let Some(own) = own.as_deref() {
        assert!(connects_as(LEASE_UID, own, port), "the lease reaches rank 0 at the node's own address {own}");
        assert!(!connects_as(STRANGER_UID, own, port), "another lease does not, there either");
    } else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "the node needs a non-loopback address under CI=true");
    }
    assert!(!connects_as(0, "127.0.0.1", port), "root's processes are not the lease either");

    table.0.close((12, 1)).await;
    assert!(connects_as(STRANGER_UID, "127.0.0.1", port), "the attempt over, its rule is gone");
}

#[tokio::test]
async fn on_another_node_of_the_attempt_only_the_leases_user_reaches_rank_zero() {
    if !prerequisites() {
        return;
    }
    let table = Table::new("peer");
    // Rank 0 "elsewhere": another loopback address stands in for its host, and a second one
    // for another address of it (a second interface, its IPv6 address).
    let listener = TcpListener::bind("127.0.0.2:0").expect("listen on 127.0.0.2");
    let port = listener.local_addr().expect("address").port();
    let other_address = TcpListener::bind(("127.0.0.3", port)).expect("listen on 127.0.0.3");
    table.0.open((13, 1), Opening { port, uid: LEASE_UID, peers: None }).await.expect("rules installed");
    assert!(connects_as(LEASE_UID, "127.0.0.2", port), "rank 1 reaches rank 0");
    assert!(!connects_as(STRANGER_UID, "127.0.0.2", port), "another lease of rank 1's node does not");
    assert!(!connects_as(STRANGER_UID, "127.0.0.3", port), "nor at another address of rank 0's host");
    drop(other_address);

    table.0.close((13, 1)).await;
    assert!(connects_as(STRANGER_UID, "127.0.0.2", port), "the attempt over, its rule is gone");
}

#[tokio::test]
async fn a_host_outside_the_attempt_is_refused_and_its_nodes_get_through() {
    if !prerequisites() {
        return;
    }
    let table = Table::new("hosts");
    let net = Netns::new();
    let (_listener, port) = rank_zero_listener();
    assert!(net.connects_from("10.213.7.3", port), "before any rule, any host connects: the test must see the difference");

    // The attempt's other node is 10.213.7.2; 10.213.7.3 is a host of the same network.
    table.0.open((14, 1), Opening { port, uid: LEASE_UID, peers: Some(vec![ip("10.213.7.2")]) }).await.expect("rules installed");
    assert!(net.connects_from("10.213.7.2", port), "the attempt's node reaches rank 0");
    assert!(!net.connects_from("10.213.7.3", port), "a host outside the attempt is refused");

    // A new agent (after a crash) starts from an empty table: the rule of an attempt that died
    // with the old one is gone.
    let restarted = RendezvousFirewall::with_table(FirewallKind::Nftables, table.0.table().to_owned());
    restarted.reset().await.expect("reset");
    assert!(net.connects_from("10.213.7.3", port), "reset removes every rule");
}

#[tokio::test]
async fn switched_off_it_installs_nothing() {
    if !prerequisites() {
        return;
    }
    let table = Table::new("off");
    let off = RendezvousFirewall::with_table(FirewallKind::Off, table.0.table().to_owned());
    let (_listener, port) = rank_zero_listener();
    off.open((15, 1), Opening { port, uid: LEASE_UID, peers: Some(vec![]) }).await.expect("nothing to install");
    assert!(connects_as(STRANGER_UID, "127.0.0.1", port));
    let listed = Command::new("nft").args(["list", "tables"]).output().expect("nft");
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(table.0.table()), "no table was made");
}

/// The node's first non-loopback IPv4 address, if it has one.
fn local_non_loopback_address() -> Option<String> {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).split_whitespace().skip_while(|w| *w != "inet").nth(1).and_then(|cidr| cidr.split('/').next()).map(str::to_owned)
}

/// Another "host": a network namespace joined to this one by a veth pair, this side
/// 10.213.7.1, the other side both 10.213.7.2 and 10.213.7.3.
struct Netns {
    name: String,
    link: String,
}

impl Netns {
    fn new() -> Netns {
        let pid = std::process::id();
        let (name, link) = (format!("suanli-fw-{pid}"), format!("sfw{}", pid % 1_000_000));
        let peer = format!("{link}p");
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
            assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        };
        run(&["netns", "add", &name]);
        let net = Netns { name: name.clone(), link: link.clone() };
        run(&["link", "add", &link, "type", "veth", "peer", "name", &peer]);
        run(&["link", "set", &peer, "netns", &name]);
        run(&["addr", "add", "10.213.7.1/24", "dev", &link]);
        run(&["link", "set", &link, "up"]);
        for args in [
            &["addr", "add", "10.213.7.2/24", "dev", &peer][..],
            &["addr", "add", "10.213.7.3/24", "dev", &peer],
            &["link", "set", &peer, "up"],
            &["link", "set", "lo", "up"],
        ] {
            let mut all = vec!["netns", "exec", &name, "ip"];
            all.extend_from_slice(args);
            run(&all);
        }
        net
    }

    /// Whether a connection from `source` in the namespace reaches 10.213.7.1:`port`.
    fn connects_from(&self, source: &str, port: u16) -> bool {
        let script = format!(
            "import socket, sys\ntry:\n    socket.create_connection(('10.213.7.1', {port}), timeout=10, source_address=('{source}', 0))\nexcept OSError as e:\n    print(e); sys.exit(1)\n"
        );
        Command::new("ip").args(["netns", "exec", &self.name, "python3", "-c", &script]).output().expect("python3").status.success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "delete", &self.link]).output();
        let _ = Command::new("ip").args(["netns", "delete", &self.name]).output();
    }
}
