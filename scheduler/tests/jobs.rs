//! Real processes end to end: a broker, two agents with simulated GPUs and two scheduler
//! replicas run 200 mixed jobs on a researcher's two leases. The jobs write their own records
//! (node, Unix user, visible devices, start and end) into a directory outside the system, and
//! the test checks those against the broker's lease history: no job ran on cards its owner did
//! not lease, no two jobs shared a card unless both asked to share. Midway the acting
//! scheduler is killed; the standby takes over. At the end the charges are recomputed from the
//! lease records and compared with the ledger and the statement, to the fen.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use suanli_proto::client::Client;
use suanli_proto::convert::{cluster_class_to_wire, listing_to_wire};
use suanli_proto::v1::{self, job_service_client::JobServiceClient, supplier_service_client::SupplierServiceClient, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{self, register};
use suanli_testkit::{eventually, workspace_binary, Service};
use suanli_types::ClusterClass;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(200);
const JOBS: usize = 200;
const CARDS_PER_NODE: u32 = 4;

fn running_as_root() -> bool {
    std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

struct Agent {
    _service: Service,
    node: u64,
    prefix: String,
}

async fn start_agent(broker: &BrokerCluster, dir: &Path, supplier_token: &str, n: usize) -> Agent {
    let channel = suanli_proto::client::channel(&format!("http://{}", broker.address(1).expect("address"))).await.expect("channel");
    let mut icpcss = SupplierServiceClient::with_interceptor(channel, suanli_proto::client::bearer(Some(supplier_token)).expect("token"));
    let token = icpcss
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id: format!("t{n}"), valid_seconds: 600 })
        .await
        .expect("token")
        .into_inner()
        .token;
    let home = dir.join(format!("agent{n}"));
    let devices = home.join("dev");
    std::fs::create_dir_all(&devices).expect("dev");
    for card in 0..CARDS_PER_NODE {
        let out = std::process::Command::new("mknod").arg(devices.join(format!("nvidia{card}"))).args(["c", "195", &card.to_string()]).output().expect("mknod");
        assert!(out.status.success(), "mknod: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Logins of this run and node only, so two agents on one machine never share a Unix user.
    let prefix = format!("j{n}{:06x}", std::process::id() & 0xff_ffff);
    let args: Vec<String> = [
        "run",
        "--broker",
        &broker.agent_endpoint(1).expect("agent port"),
        "--broker-ca",
        &broker.agent_ca_cert().display().to_string(),
        "--state-dir",
        &home.join("state").display().to_string(),
        "--enrollment-token",
        &token,
        "--hostname",
        &format!("gpu-{n}"),
        "--source",
        "simulated",
        "--sim-model",
        "A100 80GB",
        "--sim-cards",
        &CARDS_PER_NODE.to_string(),
        "--metrics-listen",
        "127.0.0.1:0",
        "--ssh-listen",
        "127.0.0.1:0",
        "--home-root",
        &home.join("homes").display().to_string(),
        "--login-prefix",
        &prefix,
        "--devices-dir",
        &devices.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let binary = workspace_binary("suanli-agent", "suanli-agent").expect("agent binary");
    let service = Service::start(&format!("agent{n}"), &binary, &args, &[], &home, WAIT).await.expect("agent starts");
    let node = service.get("node").expect("node").parse().expect("node id");
    Agent { _service: service, node, prefix }
}

async fn scheduler(broker: &BrokerCluster, dir: &Path, name: &str) -> Service {
    let binary = workspace_binary("suanli-scheduler", "suanli-scheduler").expect("scheduler binary");
    let args: Vec<String> = [
        "--broker",
        &format!("http://{}", broker.address(1).expect("address")),
        "--token",
        PLATFORM_TOKEN,
        "--name",
        name,
        "--policy",
        "las",
        "--round-ms",
        "200",
        "--lease-ttl-ms",
        "2000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Service::start(name, &binary, &args, &[], dir, WAIT).await.expect("scheduler starts")
}

/// One line a job wrote: `<job> <attempt> <node> <user> <devices> <nanos> start|end`.
#[derive(Debug)]
struct Record {
    job: u64,
    node: u64,
    user: String,
    devices: Vec<u32>,
    start: u128,
    end: Option<u128>,
}

fn records(path: &Path) -> BTreeMap<(u64, u32), Record> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out: BTreeMap<(u64, u32), Record> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [job, attempt, node, user, devices, nanos, what] = f[..] else { panic!("malformed record {line:?}") };
        let key = (job.parse().expect("job"), attempt.parse().expect("attempt"));
        let nanos: u128 = nanos.parse().expect("time");
        let rec = out.entry(key).or_insert_with(|| Record {
            job: key.0,
            node: node.parse().expect("node"),
            user: user.to_owned(),
            devices: devices.split(',').map(|d| d.parse().expect("device")).collect(),
            start: 0,
            end: None,
        });
        match what {
            "start" => rec.start = nanos,
            "end" => rec.end = Some(nanos),
            other => panic!("unknown record kind {other}"),
        }
    }
    out
}

fn spec(i: usize, record: &Path) -> serde_json::Value {
    // A third share a card (inference services), the rest train on one or two cards.
    let (kind, cards, shared) = match i % 3 {
        0 => ("inference", 1, true),
        1 => ("training", 1, false),
        _ => ("training", 2, false),
    };
    let script = format!(
        "line() {{ echo \"$SUANLI_JOB_ID $SUANLI_JOB_ATTEMPT $SUANLI_NODE_ID $(id -un) $CUDA_VISIBLE_DEVICES $(date +%s%N) $1\" >> {r}; }}; line start; sleep 0.{d}; line end",
        r = record.display(),
        d = 1 + i % 4,
    );
    serde_json::json!({
        "name": format!("job-{i}"), "kind": kind,
        "resources": { "cards": cards, "shared": shared },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "preemptible": i.is_multiple_of(2),
        "expected_seconds": 1,
    })
}

#[tokio::test]
async fn two_hundred_jobs_run_only_on_leased_cards_and_are_charged_exactly() {
    if !running_as_root() {
        eprintln!("skipped: lease accounts are Unix users, so the agents need root");
        return;
    }
    let dir = TempDir::new().expect("temp dir");
    // The jobs run as the leases' Unix accounts: they must be able to reach the records.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let broker = BrokerCluster::start(&workspace_binary("suanli-broker", "suanli-broker").expect("broker"), 1, None).await.expect("broker");
    let mut platform = broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let agents = [start_agent(&broker, dir.path(), &supplier_token, 0).await, start_agent(&broker, dir.path(), &supplier_token, 1).await];
    let mut supplier = broker.client(1, &supplier_token).await.expect("supplier client");
    let cluster = supplier
        .publish_cluster(v1::PublishClusterRequest {
            request_id: "publish".into(),
            class: cluster_class_to_wire(ClusterClass::B),
            node_ids: agents.iter().map(|a| a.node).collect(),
            listing: Some(listing_to_wire(&fixtures::listing(ClusterClass::B))),
        })
        .await
        .expect("publish")
        .into_inner()
        .cluster_id;
    let (researcher_id, researcher_token) = register(&mut platform, AccountKind::Researcher, "researcher").await.expect("researcher");
    let mut researcher = broker.client(1, &researcher_token).await.expect("researcher client");

    // Two leases of a whole node each; the agents provision them and the broker activates them.
    let mut leases = Vec::new();
    for tag in ["a", "b"] {
        let lease = researcher
            .request_lease(v1::RequestLeaseRequest {
                request_id: format!("lease-{tag}"),
                cluster_id: cluster,
                node_ids: Vec::new(),
                cards: CARDS_PER_NODE,
                billing_mode: v1::BillingMode::Hourly.into(),
                periods: 1,
            })
            .await
            .expect("lease")
            .into_inner();
        leases.push(lease.lease_id);
    }
    for lease in &leases {
        wait_active(&mut researcher, *lease).await;
    }

    let record = dir.path().join("records");
    std::fs::create_dir_all(&record).expect("records dir");
    std::fs::set_permissions(&record, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).expect("chmod");
    let record = record.join("jobs.log");
    // Jobs of both leases (two Unix accounts) append to it.
    std::fs::write(&record, b"").expect("records file");
    std::fs::set_permissions(&record, std::os::unix::fs::PermissionsExt::from_mode(0o666)).expect("chmod");

    let first = scheduler(&broker, dir.path(), "sched-a").await;
    let second = scheduler(&broker, dir.path(), "sched-b").await;
    let channel = suanli_proto::client::channel(&format!("http://{}", broker.address(1).expect("address"))).await.expect("channel");
    let mut jobs = JobServiceClient::with_interceptor(channel.clone(), suanli_proto::client::bearer(Some(&researcher_token)).expect("token"));
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let job = jobs
            .submit_job(v1::SubmitJobRequest { request_id: format!("job-{i}"), spec_json: spec(i, &record).to_string() })
            .await
            .expect("submit")
            .into_inner();
        ids.push(job.job_id);
    }

    // Kill whichever replica acts once a quarter of the jobs are done; the other takes over.
    let mut platform_jobs = JobServiceClient::with_interceptor(channel, suanli_proto::client::bearer(Some(PLATFORM_TOKEN)).expect("token"));
    wait_done(&mut jobs, JOBS / 4).await;
    let acting = platform_jobs.get_scheduling_view(v1::GetSchedulingViewRequest {}).await.expect("view").into_inner().lease.expect("lease");
    let (victim, survivor) = if acting.holder == "sched-a" { (first, second) } else { (second, first) };
    victim.kill().await.expect("kill the acting scheduler");
    let done = wait_done(&mut jobs, JOBS).await;
    let after = platform_jobs.get_scheduling_view(v1::GetSchedulingViewRequest {}).await.expect("view").into_inner().lease.expect("lease");
    assert_ne!(after.holder, acting.holder, "the standby took over");
    assert!(after.epoch > acting.epoch);
    drop(survivor);

    let unsuccessful: Vec<String> = done
        .iter()
        .filter(|j| j.state != "succeeded")
        .map(|j| format!("job {} {} ({:?}) on nodes {:?}", j.job_id, j.state, j.end_reason, j.attempts.last().map(|a| &a.node_ids)))
        .collect();
    assert!(unsuccessful.is_empty(), "{unsuccessful:#?}\nrecords:\n{}", std::fs::read_to_string(&record).unwrap_or_default().lines().take(20).collect::<Vec<_>>().join("\n"));

    // The jobs' own records against the lease history.
    let recs = records(&record);
    assert_eq!(recs.len(), JOBS, "every job ran once: {} records", recs.len());
    let lease_of_node: BTreeMap<u64, (u64, &str)> = {
        let mut m = BTreeMap::new();
        for lease in &leases {
            let l = researcher.get_lease(v1::GetLeaseRequest { lease_id: *lease }).await.expect("lease").into_inner();
            assert_eq!(l.researcher_id, researcher_id);
            let cards = researcher.list_cards(v1::ListCardsRequest { cluster_id: cluster }).await.expect("cards").into_inner().cards;
            let node = cards.iter().find(|c| l.card_ids.contains(&c.card_id)).expect("a card of the lease").node_id;
            let prefix = agents.iter().find(|a| a.node == node).expect("agent").prefix.as_str();
            m.insert(node, (*lease, prefix));
        }
        m
    };
    let shared: BTreeSet<u64> = done.iter().filter(|j| j.kind == "inference").map(|j| j.job_id).collect();
    let mut by_device: BTreeMap<(u64, u32), Vec<&Record>> = BTreeMap::new();
    for r in recs.values() {
        let (lease, prefix) = lease_of_node.get(&r.node).expect("the job ran on a node the researcher leases");
        assert_eq!(r.user, format!("{prefix}{lease}"), "job {} ran as the lease's account", r.job);
        assert!(r.devices.iter().all(|d| *d < CARDS_PER_NODE), "job {} saw devices {:?}", r.job, r.devices);
        assert!(r.end.is_some(), "job {} never finished", r.job);
        for d in &r.devices {
            by_device.entry((r.node, *d)).or_default().push(r);
        }
    }
    for ((node, device), mut runs) in by_device {
        runs.sort_by_key(|r| r.start);
        for pair in runs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            let overlap = a.end.unwrap_or(u128::MAX) > b.start;
            assert!(
                !overlap || (shared.contains(&a.job) && shared.contains(&b.job)),
                "jobs {} and {} shared card {device} of node {node}",
                a.job,
                b.job
            );
        }
    }

    // Money: end the leases, recompute each charge from the lease record, compare.
    let mut expected_total = 0;
    for lease in &leases {
        let l = researcher
            .end_lease(v1::EndLeaseRequest { request_id: format!("end-{lease}"), lease_id: *lease, reason: v1::EndReason::ByResearcher.into() })
            .await
            .expect("end")
            .into_inner();
        let used_ms = (l.ended_at_ms - l.activated_at_ms) as i128;
        let price = l.price_per_card.expect("price").minor as i128;
        let expected = (price * l.card_ids.len() as i128 * used_ms + 1_800_000) / 3_600_000; // half up, hourly
        let txs = researcher
            .list_transactions(v1::ListTransactionsRequest { account_id: 0, month: String::new() })
            .await
            .expect("transactions")
            .into_inner()
            .transactions;
        let charged: i64 = txs
            .iter()
            .filter(|t| t.lease_id == *lease && t.kind == "charge")
            .flat_map(|t| t.entries.iter().filter(|e| e.account == format!("held:{researcher_id}")))
            .map(|e| -e.minor)
            .sum();
        assert_eq!(charged as i128, expected, "{lease}: ledger charge vs the lease's own record");
        expected_total += expected as i64;
    }
    let month = {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
        let days = secs / 86_400;
        // Civil date from days since the epoch (the same rule the ledger uses).
        let (z, era) = (days + 719_468, (days + 719_468).div_euclid(146_097));
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let m = if mp < 10 { mp + 3 } else { mp - 9 };
        let y = yoe + era * 400 + i64::from(m <= 2);
        format!("{y:04}-{m:02}")
    };
    let statement = researcher
        .get_statement(v1::GetStatementRequest { account_id: 0, month: month.clone(), currency: String::new() })
        .await
        .expect("statement")
        .into_inner();
    assert_eq!(statement.charged_minor, expected_total, "statement {month}");
    assert_eq!(statement.closing_minor, fixtures::RESEARCHER_FUNDS - expected_total, "what is left is what was not charged");
    assert_eq!(statement.jobs.len(), JOBS, "every job's cost is on the statement");
    let balance = researcher.get_balance(v1::GetBalanceRequest { account_id: 0, currency: String::new() }).await.expect("balance").into_inner();
    assert_eq!((balance.available_minor, balance.held_minor), (fixtures::RESEARCHER_FUNDS - expected_total, 0));
}

async fn wait_active(researcher: &mut Client, lease: u64) {
    eventually(WAIT, POLL, || {
        let mut c = researcher.clone();
        async move {
            let l = c.get_lease(v1::GetLeaseRequest { lease_id: lease }).await.ok()?.into_inner();
            (l.state() == v1::LeaseState::Active).then_some(())
        }
    })
    .await
    .expect("the lease becomes active");
}

type Jobs = JobServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, suanli_proto::client::Bearer>>;

/// Waits until at least `n` jobs have ended; returns all jobs then.
async fn wait_done(jobs: &mut Jobs, n: usize) -> Vec<v1::Job> {
    eventually(Duration::from_secs(240), POLL, || {
        let mut c = jobs.clone();
        async move {
            let all = c.list_jobs(v1::ListJobsRequest { live_only: false }).await.ok()?.into_inner().jobs;
            let ended = all.iter().filter(|j| !matches!(j.state.as_str(), "queued" | "placed" | "running")).count();
            (ended >= n).then_some(all)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{n} jobs did not end: {e}"))
}
