//! `cargo bench -p suanli-agent --bench lease_lifecycle` — what the node's protections cost a
//! lease: from `RequestLease` to the first `ssh … true` that succeeds (account, control group
//! with limits, private /tmp, SSH ready), and from `EndLease` to the account gone (sessions
//! cut, processes killed, groups and private /tmp removed). Measured in one run with the
//! per-lease mount and IPC namespaces on (the default) and off (`--private-dirs ''`), on two
//! fresh nodes; prints medians and the on/off ratio. Needs root, like the gateway tests.
//! Flags: `--leases 8`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use suanli_proto::v1;
use suanli_testkit::eventually;
use tokio::process::Command;

use support::{running_as_root, Node, POLL, WAIT};

struct Figures {
    ready: Vec<Duration>,
    clean: Vec<Duration>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn measure(flags: &[&str], leases: u32) -> anyhow::Result<Figures> {
    let node = Node::start_with(flags).await;
    let mut researcher = node.researcher("bench").await;
    let mut figures = Figures { ready: Vec::new(), clean: Vec::new() };
    for i in 0..leases {
        let started = Instant::now();
        let login = node.lease(&mut researcher, &format!("b{i}")).await;
        eventually(WAIT, POLL, || async { login.run("true").await.status.success().then_some(()) }).await.context("ssh ready")?;
        figures.ready.push(started.elapsed());
        let ended = Instant::now();
        researcher
            .client
            .end_lease(v1::EndLeaseRequest { request_id: format!("end-{}", login.lease), lease_id: login.lease, reason: v1::EndReason::ByResearcher.into() })
            .await?;
        let name = login.login.clone();
        eventually(WAIT, Duration::from_millis(20), || {
            let name = name.clone();
            async move { (!Command::new("getent").args(["passwd", &name]).output().await.ok()?.status.success()).then_some(()) }
        })
        .await
        .context("account removed")?;
        figures.clean.push(ended.elapsed());
    }
    Ok(figures)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut leases = 8u32;
    let raw: Vec<String> = std::env::args().skip(1).filter(|s| s != "--bench").collect();
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--leases" => leases = it.next().context("--leases needs a value")?.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if !running_as_root() {
        bail!("the lease benchmark needs root: lease accounts are Unix users");
    }
    let off = measure(&["--private-dirs", ""], leases).await?;
    let on = measure(&[], leases).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("lease lifecycle on one node, {leases} leases each, medians (agent polls leases every 2 s)");
    println!("{:<34} {:>12} {:>12} {:>8}", "measure", "ns off", "ns on", "on/off");
    for (name, a, b) in [("request -> first ssh true", off.ready, on.ready), ("end -> account gone", off.clean, on.clean)] {
        let (a, b) = (median(a), median(b));
        println!("{name:<34} {:>10.0}ms {:>10.0}ms {:>8.2}", ms(a), ms(b), ms(b) / ms(a));
    }
    Ok(())
}
