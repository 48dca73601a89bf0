//! A job across two nodes on an existing engine: each process gets the rendezvous `torchrun`
//! expects (MASTER_ADDR: rank 0's host, MASTER_PORT, NNODES, NODE_RANK, NPROC_PER_NODE), and a
//! PyTorch DistributedDataParallel run on CPU (gloo) from the project's venv trains to the same
//! weights and loss as one process on the whole data.

mod support;

use std::time::Duration;

use suanli_proto::v1;
use support::{wait_done, World};

/// Full-batch linear regression; each rank takes every `world`-th row (equal shards, so the
/// averaged gradients are the whole batch's). Prints the final loss on all the data and the
/// weights as one JSON line.
const TRAIN: &str = r#"
import json, os
import torch, torch.distributed as dist
nodes, per_node, node_rank = int(os.environ["NNODES"]), int(os.environ["NPROC_PER_NODE"]), int(os.environ["NODE_RANK"])
world, rank = nodes * per_node, node_rank * per_node
dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", rank=rank, world_size=world)
torch.manual_seed(0)
x = torch.arange(64, dtype=torch.float64).reshape(32, 2) / 32
y = x @ torch.tensor([[2.0], [-1.0]], dtype=torch.float64) + 0.5
model = torch.nn.Linear(2, 1).double()
ddp = torch.nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
xs, ys = x[rank::world], y[rank::world]
for step in range(100):
    opt.zero_grad()
    loss = ((ddp(xs) - ys) ** 2).mean()
    loss.backward()
    opt.step()
with torch.no_grad():
    full = ((model(x) - y) ** 2).mean().item()
print(json.dumps({"world": world, "rank": rank, "loss": full, "weights": model.weight.flatten().tolist() + model.bias.tolist()}))
dist.destroy_process_group()
"#;

fn last_json(text: &str) -> serde_json::Value {
    text.lines().rev().find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).unwrap_or_else(|| panic!("no JSON line in {text:?}"))
}

#[tokio::test]
async fn a_two_node_ddp_job_meets_at_rank_zero_and_trains_as_one_process_would() {
    let Some((python, packages)) = support::system_python_of_the_venv() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "SUANLI_TORCH_VENV must name the project's venv, and the system must have its Python version, under CI=true (.ci/run sets it)"
        );
        eprintln!("skipped: SUANLI_TORCH_VENV is not set (ops/setup-torch) or /usr/bin has no interpreter of its version");
        return;
    };
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    // Both agents run on this one host, where each one's firewall would take the other's lease
    // process for another tenant of its node (which it refuses): separate hosts are what tell
    // the lease's nodes apart (the firewall is tested in supplier-agent/tests/rendezvous_firewall.rs
    // and below, on one node).
    let w = World::start_with(2, 1, 1, &["--rendezvous-firewall", "off"]).await;
    let script = w.record.with_file_name("ddp.py");
    std::fs::write(&script, TRAIN).expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");

    // The same run as one process on the whole data, outside the platform.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port();
    let alone = std::process::Command::new(&python)
        .arg(&script)
        .envs([("NNODES", "1"), ("NPROC_PER_NODE", "1"), ("NODE_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")])
        .env("PYTHONPATH", &packages)
        .env("MASTER_PORT", port.to_string())
        .output()
        .expect("python");
    assert!(alone.status.success(), "{}", String::from_utf8_lossy(&alone.stderr));
    let alone = last_json(&String::from_utf8_lossy(&alone.stdout));

    let mut jobs = w.jobs(&w.researcher_token).await;
    let spec = serde_json::json!({
        "name": "ddp", "kind": "training",
        "resources": { "cards": 2 },
        "run": { "command": {
            "program": python.display().to_string(),
            "args": [script.display().to_string()],
            "env": { "PYTHONPATH": packages.display().to_string() },
        } },
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, "ddp", &spec).await.job_id;
    let done = wait_done(&mut jobs, 1, Duration::from_secs(180)).await;
    let j = &done[0];
    let log = jobs.read_job_log(v1::ReadJobLogRequest { job_id: job, attempt: 0, from_offset: 0, max_bytes: 0, wait_ms: 0 }).await.expect("log").into_inner();
    assert_eq!(j.state, "succeeded", "{j:?}\n{}\n{}", String::from_utf8_lossy(&log.data), w.logs());
    let attempt = &j.attempts[0];
    assert_ne!(attempt.node_ids[0], attempt.node_ids[1], "the job ran on two nodes: {attempt:?}");
    assert!(!attempt.rendezvous_host.is_empty(), "the broker names rank 0's host");
    assert_eq!(attempt.node_hosts.len(), 2, "and every node's, in rank order: {attempt:?}");

    let together = last_json(&String::from_utf8_lossy(&log.data));
    assert_eq!(together["world"], 2, "two processes met: {together}");
    assert_eq!(together["rank"], 0, "rank 0 speaks for the job");
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        let (a, b) = (a.as_f64().expect("number"), b.as_f64().expect("number"));
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    };
    assert!(alone["loss"].as_f64().is_some_and(|l| l < 0.1), "the reference run learns: {alone}");
    assert!(close(&together["loss"], &alone["loss"]), "DDP {together} against one process {alone}");
    let (ws, wa) = (together["weights"].as_array().expect("weights"), alone["weights"].as_array().expect("weights"));
    assert!(ws.len() == 3 && ws.iter().zip(wa).all(|(a, b)| close(a, b)), "DDP {together} against one process {alone}");
}

/// One process of the gang fails: the whole attempt ends with it (rank 0 is stopped, not left
/// waiting at a rendezvous that will never complete), and the job fails with its status.
#[tokio::test]
async fn when_one_node_of_a_gang_fails_the_whole_attempt_stops() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(2, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    // Rank 0 records that it runs and would go on for ten minutes; rank 1 fails once rank 0 runs.
    let record = w.record.display().to_string();
    let script = format!(
        r#"if [ "$NODE_RANK" = 1 ]; then until grep -q "rank 0 started" {record}; do sleep 0.1; done; exit 7; fi
echo "rank 0 started" >> {record}; sleep 600; echo "rank 0 finished" >> {record}"#
    );
    let spec = serde_json::json!({
        "name": "gang", "kind": "training",
        "resources": { "cards": 2 },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "max_attempts": 1,
    });
    w.submit(&mut jobs, "gang", &spec).await;
    let done = wait_done(&mut jobs, 1, Duration::from_secs(120)).await;
    let j = &done[0];
    assert_eq!(j.state, "failed", "{j:?}\n{}", w.logs());
    let reason = j.end_reason.as_ref().expect("a reason");
    assert_eq!((reason.kind.as_str(), reason.exit_status), ("exit_status", 7), "{j:?}");
    // Rank 0 is stopped with the attempt: it never gets to finish.
    let recorded = std::fs::read_to_string(&w.record).expect("record");
    assert!(!recorded.contains("rank 0 finished"), "{recorded}");
    assert!(recorded.contains("rank 0 started"), "{recorded}");
    let users = leases_users(&w.agent_of(j.attempts[0].node_ids[0]).prefix);
    assert!(!users.is_empty(), "rank 0's node has its lease's account");
    let stopped = suanli_testkit::eventually(Duration::from_secs(30), Duration::from_millis(200), || {
        let users = users.clone();
        // pgrep: 1 when no process matches.
        async move { (std::process::Command::new("pgrep").args(["-u", users.as_str(), "sleep"]).status().ok()?.code() == Some(1)).then_some(()) }
    })
    .await;
    assert!(stopped.is_ok(), "rank 0's process was stopped with the attempt\n{}", w.logs());
}

/// The Unix accounts an agent made for leases (their logins start with its prefix), comma-separated for `pgrep -u`.
fn leases_users(prefix: &str) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let users: Vec<&str> = passwd.lines().filter_map(|l| l.split(':').next()).filter(|u| u.starts_with(prefix)).collect();
    users.join(",")
}

/// While a job runs, its rendezvous port (`MASTER_PORT`) answers the lease's own user and
/// refuses another user of the node; when it ends, the rule is gone.
#[tokio::test]
async fn a_running_jobs_rendezvous_port_refuses_another_user_of_the_node() {
    if !suanli_testkit::require_root("lease accounts (Unix users) and nftables rules") {
        return;
    }
    let w = World::start(1, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let (record, gate) = (w.record.display().to_string(), w.record.with_file_name("rendezvous-gate"));
    // What torch's store does at rank 0: listen on MASTER_PORT on every address.
    let script = format!(
        r#"import os, socket, time
s = socket.socket()
s.bind(("0.0.0.0", int(os.environ["MASTER_PORT"])))
s.listen(16)
with open("{record}", "a") as f:
    f.write("listening %s %d\n" % (os.environ["MASTER_PORT"], os.getuid()))
while not os.path.exists("{gate}"):
    time.sleep(0.1)
"#,
        gate = gate.display()
    );
    let spec = serde_json::json!({
        "name": "store", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "command": { "program": "/usr/bin/python3", "args": ["-c", script] } },
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, "store", &spec).await.job_id;
    let listening = suanli_testkit::eventually(Duration::from_secs(60), Duration::from_millis(100), || {
        let record = w.record.clone();
        async move {
            let text = std::fs::read_to_string(record).ok()?;
            let line = text.lines().find(|l| l.starts_with("listening "))?.to_owned();
            let mut words = line.split_whitespace().skip(1).map(str::parse::<u32>);
            Some((u16::try_from(words.next()?.ok()?).ok()?, words.next()?.ok()?))
        }
    })
    .await;
    let (port, lease_uid) = listening.unwrap_or_else(|e| panic!("the job did not listen: {e}\n{}", w.logs()));

    assert!(!suanli_testkit::connects_as(65_534, "127.0.0.1", port), "another user of the node is refused");
    assert!(suanli_testkit::connects_as(lease_uid, "127.0.0.1", port), "the lease's own user gets through");

    std::fs::write(&gate, b"open").expect("open the gate");
    let done = wait_done(&mut jobs, 1, Duration::from_secs(60)).await;
    assert_eq!(done[0].state, "succeeded", "{:?}\n{}", done[0], w.logs());
    let table = std::fs::read_to_string(w.dir.path().join("agent0/state/rendezvous.table")).expect("the agent names its table");
    let rule = format!("dport {port}");
    let gone = suanli_testkit::eventually(Duration::from_secs(30), Duration::from_millis(100), || {
        let (rule, table) = (rule.clone(), table.clone());
        async move {
            let listed = std::process::Command::new("nft").args(["list", "table", "inet", table.trim()]).output().ok()?;
            (listed.status.success() && !String::from_utf8_lossy(&listed.stdout).contains(&rule)).then_some(())
        }
    })
    .await;
    assert!(gone.is_ok(), "the ended job's rule is removed from the agent's table (job {job})");
}
