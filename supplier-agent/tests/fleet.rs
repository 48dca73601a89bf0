//! Real processes: a broker and supplier agents with simulated GPUs, on loopback.
//!
//! Enrollment and authentication, telemetry aggregates checked against what the agents
//! recorded sending, malformed samples, injected card faults, and agents killed and restarted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;
use suanli_proto::client::{bearer, Client};
use suanli_proto::convert::{cluster_class_to_wire, listing_to_wire};
use suanli_proto::decode_status;
use suanli_proto::v1::AccountKind;
use suanli_proto::v1::{self, monitoring_service_client::MonitoringServiceClient, supplier_service_client::SupplierServiceClient};
use suanli_testkit::cluster::BrokerCluster;
use suanli_testkit::fixtures::{self, register};
use suanli_testkit::{eventually, workspace_binary, Service};
use suanli_types::{ClusterClass, ErrorCode};
use tempfile::TempDir;

const SILENT_AFTER_MS: u64 = 2_000;
const WAIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

struct Fleet {
    broker: BrokerCluster,
    dir: TempDir,
    supplier_token: String,
}

impl Fleet {
    async fn start() -> Fleet {
        Fleet::with_brokers(1, SILENT_AFTER_MS).await
    }

    async fn with_brokers(n: u64, silent_after_ms: u64) -> Fleet {
        let binary = workspace_binary("suanli-broker", "suanli-broker").expect("broker binary");
        let config = format!("[broker]\nagent_silent_after_ms = {silent_after_ms}\n");
        let broker = BrokerCluster::start(&binary, n, Some(&config)).await.expect("brokers start");
        let leader = broker.leader(WAIT).await.expect("a leader");
        let mut platform = broker.client(leader, suanli_testkit::cluster::PLATFORM_TOKEN).await.expect("platform client");
        let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
        Fleet { broker, dir: TempDir::new().expect("temp dir"), supplier_token }
    }

    /// A live broker node's public gRPC endpoint.
    fn endpoint(&self) -> String {
        let id = self.broker.live()[0];
        format!("http://{}", self.broker.address(id).expect("address"))
    }

    /// Every broker node's agent port, as the agent's `--broker` list.
    fn all_endpoints(&self) -> String {
        let ids = self.broker.ids();
        ids.iter().map(|id| self.broker.agent_endpoint(*id).expect("address")).collect::<Vec<_>>().join(",")
    }

    /// A TLS channel to a live node's agent port, presenting `client` (certificate and key PEM)
    /// or no certificate at all.
    async fn agent_channel(&self, client: Option<&(String, String)>) -> Result<tonic::transport::Channel, String> {
        let identity = client.map(|(cert, key)| (cert.as_str(), key.as_str()));
        self.broker.agent_channel(self.broker.live()[0], identity).await.map_err(|e| e.to_string())
    }

    /// The agent port's Icpcss as the agent `name` (its key and certificate from its state).
    async fn as_agent(&self, name: &str) -> SupplierServiceClient<tonic::transport::Channel> {
        SupplierServiceClient::new(self.agent_channel(Some(&agent_files(self, name))).await.expect("agent channel"))
    }

    async fn supplier(&self) -> Client {
        self.broker.client(1, &self.supplier_token).await.expect("supplier client")
    }

    async fn supplier_service(
        &self,
        token: Option<&str>,
    ) -> SupplierServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, suanli_proto::client::Bearer>> {
        let channel = suanli_proto::client::channel(&self.endpoint()).await.expect("channel");
        SupplierServiceClient::with_interceptor(channel, bearer(token).expect("token"))
    }

    async fn monitoring(
        &self,
        token: Option<&str>,
    ) -> MonitoringServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, suanli_proto::client::Bearer>> {
        let channel = suanli_proto::client::channel(&self.endpoint()).await.expect("channel");
        MonitoringServiceClient::with_interceptor(channel, bearer(token).expect("token"))
    }

    async fn enrollment_token(&self, n: u32) -> String {
        let mut supplier = self.supplier_service(Some(&self.supplier_token)).await;
        supplier
            .create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id: format!("token-{n}"), valid_seconds: 600 })
            .await
            .expect("token")
            .into_inner()
            .token
    }

    fn state_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn record(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.jsonl"))
    }

    /// An agent with two simulated L40S cards sampling five times a second.
    async fn agent(&self, name: &str, token: Option<&str>, seed: u64) -> Service {
        self.agent_with_ca(name, token, seed, &self.broker.agent_ca_cert()).await
    }

    /// As [`Fleet::agent`], enrolling with `token` and trusting the CAs in `trust` (a bundle
    /// while the cluster CA is rotated).
    async fn agent_trusting(&self, name: &str, token: &str, trust: &Path) -> Service {
        self.agent_with_ca(name, Some(token), 1, trust).await
    }

    async fn agent_with_ca(&self, name: &str, token: Option<&str>, seed: u64, trust: &Path) -> Service {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--broker".into(),
            self.all_endpoints(),
            "--broker-ca".into(),
            trust.display().to_string(),
            "--state-dir".into(),
            self.state_dir(name).display().to_string(),
            "--hostname".into(),
            name.into(),
            "--source".into(),
            "simulated".into(),
            "--sim-model".into(),
            "L40S".into(),
            "--sim-cards".into(),
            "2".into(),
            "--sim-seed".into(),
            seed.to_string(),
            "--sample-interval-ms".into(),
            "200".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--record".into(),
            self.record(name).display().to_string(),
        ];
        if let Some(token) = token {
            args.extend(["--enrollment-token".into(), token.into()]);
        }
        Service::start(name, Path::new(env!("CARGO_BIN_EXE_suanli-agent")), &args, &[], self.dir.path(), WAIT).await.expect("agent starts")
    }

    /// Publishes the agents' nodes as one Class B cluster; returns its ID.
    async fn publish(&self, nodes: &[u64]) -> u64 {
        let mut supplier = self.supplier().await;
        supplier
            .publish_cluster(v1::PublishClusterRequest {
                request_id: "publish".into(),
                class: cluster_class_to_wire(ClusterClass::B),
                node_ids: nodes.to_vec(),
                listing: Some(listing_to_wire(&fixtures::listing(ClusterClass::B))),
            })
            .await
            .expect("publish")
            .into_inner()
            .cluster_id
    }

    async fn cards(&self, cluster: u64) -> Vec<v1::Card> {
        let mut supplier = self.supplier().await;
        supplier.list_cards(v1::ListCardsRequest { cluster_id: cluster }).await.expect("cards").into_inner().cards
    }
}

fn node_of(agent: &Service) -> u64 {
    agent.get("node").expect("node").parse().expect("node id")
}

/// The agent's certificate and key, as it stored them.
fn agent_files(fleet: &Fleet, name: &str) -> (String, String) {
    let read = |file: &str| std::fs::read_to_string(fleet.state_dir(name).join(file)).expect(file);
    (read("agent.crt"), read("agent.key"))
}

async fn http(method: &str, address: &str, path: &str) -> u16 {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, &format!("http://{address}{path}")])
        .output()
        .await
        .expect("curl");
    String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
}

async fn get_text(address: &str, path: &str) -> String {
    let out = tokio::process::Command::new("curl").args(["-sf", &format!("http://{address}{path}")]).output().await.expect("curl");
    assert!(out.status.success(), "GET {path} failed");
    String::from_utf8(out.stdout).expect("utf-8")
}

/// `promtool check metrics` (Debian's prometheus package, installed by ops/install-build-deps)
/// on an exposition: its exit code and its complaints, one per line.
async fn promtool(exposition: &str) -> (Option<i32>, Vec<String>) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is installed (ops/install-build-deps)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(exposition.as_bytes()).await.expect("write");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), said.lines().map(str::to_owned).filter(|l| !l.trim().is_empty()).collect())
}

/// What dcgm-exporter's own output draws from promtool: its label names (`UUID`, `modelName`,
/// `Hostname`) and its `*_TOTAL` counters are the contract dashboards rely on.
fn inherent_to_dcgm_naming(complaint: &str) -> bool {
    complaint.starts_with("DCGM_")
        && (complaint.ends_with("label names should be written in 'snake_case' not 'camelCase'")
            || complaint.ends_with("counter metrics should have \"_total\" suffix"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_is_one_time_and_every_call_is_authenticated() {
    let fleet = Fleet::start().await;
    let token = fleet.enrollment_token(1).await;
    let agent = fleet.agent("gpu-a", Some(&token), 1).await;
    let node = node_of(&agent);

    // The key and certificate are the agent's own, readable by it alone.
    let key_mode = std::fs::metadata(fleet.state_dir("gpu-a").join("agent.key")).expect("key").permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let genuine = agent_files(&fleet, "gpu-a");
    assert_eq!(fleet.as_agent("gpu-a").await.get_agent_node(v1::GetAgentNodeRequest {}).await.expect("whoami").into_inner().node.expect("node").node_id, node);

    // The same token a second time, with a fresh key: refused.
    let mut anonymous = SupplierServiceClient::new(fleet.agent_channel(None).await.expect("TLS without a certificate"));
    let key = suanli_pki::new_private_key().expect("key");
    let again = anonymous
        .enroll_agent(v1::EnrollAgentRequest {
            request_id: "second-use".into(),
            enrollment_token: token.clone(),
            csr_pem: suanli_pki::signing_request(&key, "other").expect("csr"),
            inventory: Some(suanli_proto::convert::inventory_to_wire(&fixtures::inventory("other", 1))),
        })
        .await;
    assert_eq!(decode_status(&again.expect_err("token reuse")).code, ErrorCode::Unauthenticated);
    // A signing request that is not one: the field is named.
    let garbage = anonymous
        .enroll_agent(v1::EnrollAgentRequest {
            request_id: "garbage".into(),
            enrollment_token: fleet.enrollment_token(9).await,
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
            inventory: Some(suanli_proto::convert::inventory_to_wire(&fixtures::inventory("other", 1))),
        })
        .await;
    let e = decode_status(&garbage.expect_err("not a CSR"));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.fields.iter().any(|f| f.field == "csr_pem"), "{:?}", e.fields);

    // Agent calls without a client certificate, or with a supplier's token instead: refused.
    let whoami = anonymous.get_agent_node(v1::GetAgentNodeRequest {}).await.expect_err("no certificate");
    assert_eq!(decode_status(&whoami).code, ErrorCode::Unauthenticated);
    let mut anonymous_monitoring = MonitoringServiceClient::new(fleet.agent_channel(None).await.expect("channel"));
    let refused = anonymous_monitoring.stream_telemetry(tokio_stream::iter(Vec::<v1::TelemetryBatch>::new())).await;
    assert_eq!(decode_status(&refused.expect_err("no certificate")).code, ErrorCode::Unauthenticated);
    for token in [None, Some(fleet.supplier_token.as_str())] {
        let mut monitoring = fleet.monitoring(token).await;
        let refused = monitoring.stream_telemetry(tokio_stream::iter(Vec::<v1::TelemetryBatch>::new())).await;
        let code = decode_status(&refused.expect_err("refused")).code;
        assert!(matches!(code, ErrorCode::Unauthenticated | ErrorCode::PermissionDenied), "{token:?}: {code:?}");
    }

    // The key header one broker node passes another is believed only with a peer's proof: a
    // client naming the genuine agent's key on the public port is refused.
    let fingerprint = suanli_pki::pem_certificate_fingerprint(&genuine.0).expect("fp");
    for proof in [None, Some("00".repeat(32)), Some("1".into())] {
        let channel = suanli_proto::client::channel(&fleet.endpoint()).await.expect("channel");
        let mut forged = SupplierServiceClient::new(channel);
        let mut request = tonic::Request::new(v1::GetAgentNodeRequest {});
        request.metadata_mut().insert("x-suanli-agent-key", fingerprint.to_hex().parse().expect("header"));
        if let Some(proof) = &proof {
            request.metadata_mut().insert("x-suanli-forwarded", proof.parse().expect("header"));
        }
        let refused = forged.get_agent_node(request).await.expect_err("a forged key header");
        assert_eq!(decode_status(&refused).code, ErrorCode::Unauthenticated, "proof {proof:?}");
    }

    // A certificate from another CA does not get through the handshake.
    let stranger_ca = suanli_pki::Ca::generate("not the platform").expect("CA");
    let stranger_key = suanli_pki::new_private_key().expect("key");
    let stranger_cert = stranger_ca.sign_agent(&suanli_pki::signing_request(&stranger_key, "x").expect("csr"), node).expect("cert");
    let handshake = async {
        let channel = fleet.agent_channel(Some(&(stranger_cert, stranger_key))).await?;
        SupplierServiceClient::new(channel).get_agent_node(v1::GetAgentNodeRequest {}).await.map_err(|s| s.to_string())
    };
    assert!(handshake.await.is_err(), "a foreign certificate must not authenticate");

    // Kill the agent, wipe its state (a reinstall), enroll with a new token: same node.
    // /metrics speaks DCGM's names and passes promtool's checks.
    let metrics = agent.get("metrics").expect("metrics").to_owned();
    let exposition = eventually(WAIT, POLL, || {
        let metrics = metrics.clone();
        async move { Some(get_text(&metrics, "/metrics").await).filter(|t| t.contains("DCGM_FI_DEV_GPU_UTIL{")) }
    })
    .await
    .expect("GPU metrics appear once sampled");
    for name in ["DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_FB_USED", "suanli_agent_samples_total"] {
        assert!(exposition.contains(name), "{name} missing from\n{exposition}");
    }
    assert!(exposition.contains("Hostname=\"gpu-a\"") && exposition.contains("device=\"nvidia1\""));
    // Exit 0 is clean, 3 is lint complaints only (1 would be a parse error).
    let (code, complaints) = promtool(&exposition).await;
    assert!(matches!(code, Some(0 | 3)), "promtool failed ({code:?}): {complaints:?}\n{exposition}");
    let other: Vec<&String> = complaints.iter().filter(|c| !inherent_to_dcgm_naming(c)).collect();
    assert!(other.is_empty(), "promtool complaints beyond DCGM's naming: {other:?}");
    agent.kill().await.expect("kill");
    std::fs::remove_dir_all(fleet.state_dir("gpu-a")).expect("wipe");
    let token = fleet.enrollment_token(2).await;
    let agent = fleet.agent("gpu-a", Some(&token), 1).await;
    assert_eq!(node_of(&agent), node, "a reinstalled node keeps its identity");
    // The old key stopped working, though its certificate is still within its validity.
    let mut old = SupplierServiceClient::new(fleet.agent_channel(Some(&genuine)).await.expect("channel"));
    let refused = old.get_agent_node(v1::GetAgentNodeRequest {}).await.expect_err("old key");
    assert_eq!(decode_status(&refused).code, ErrorCode::Unauthenticated);

    // Revoked by the supplier: refused from then on.
    let mut supplier = fleet.supplier_service(Some(&fleet.supplier_token)).await;
    supplier.revoke_agent(v1::RevokeAgentRequest { request_id: "revoke".into(), node_id: node }).await.expect("revoke");
    let refused = fleet.as_agent("gpu-a").await.get_agent_node(v1::GetAgentNodeRequest {}).await.expect_err("revoked");
    assert_eq!(decode_status(&refused).code, ErrorCode::Unauthenticated);
}

/// One recorded sample line of an agent's `--record` file.
#[derive(serde::Deserialize)]
struct Recorded {
    at_ms: i64,
    cards: Vec<RecordedCard>,
}

#[derive(serde::Deserialize)]
struct RecordedCard {
    index: u32,
    present: bool,
    gpu_utilization_pct: u64,
    memory_used_mib: u64,
    temperature_c: u64,
    power_draw_mw: u64,
}

/// Per (card index, step start): samples, Σ utilization, Σ memory, Σ temperature, Σ power.
type Sums = BTreeMap<(u32, i64), (u32, u64, u64, u64, u64)>;

fn recorded_sums(path: &Path, from_ms: i64, to_ms: i64, step_ms: i64) -> Sums {
    let mut sums = Sums::new();
    for line in std::fs::read_to_string(path).expect("record").lines() {
        let r: Recorded = serde_json::from_str(line).expect("record line");
        if r.at_ms < from_ms || r.at_ms >= to_ms {
            continue;
        }
        for c in r.cards.iter().filter(|c| c.present) {
            let e = sums.entry((c.index, r.at_ms.div_euclid(step_ms) * step_ms)).or_default();
            e.0 += 1;
            e.1 += c.gpu_utilization_pct;
            e.2 += c.memory_used_mib;
            e.3 += c.temperature_c;
            e.4 += c.power_draw_mw;
        }
    }
    sums
}

const STEP_MS: i64 = 2_000;
const WINDOW_STEPS: i64 = 3;

/// The start of the next whole step after `at_ms`.
fn next_step(at_ms: i64) -> i64 {
    (at_ms.div_euclid(STEP_MS) + 1) * STEP_MS
}

async fn card_indexes(fleet: &Fleet, cluster: u64) -> BTreeMap<u64, u32> {
    fleet.cards(cluster).await.iter().map(|c| (c.card_id, c.spec.as_ref().map_or(0, |s| s.index))).collect()
}

/// Waits until the window of `WINDOW_STEPS` steps from `from_ms` is over, then until the
/// broker's per-step sums for `node` equal those computed from what the agent `name` recorded
/// sending (bounded by `WAIT`); returns them.
async fn broker_matches_record(fleet: &Fleet, name: &str, node: u64, card_index: &BTreeMap<u64, u32>, from_ms: i64) -> Sums {
    let to_ms = from_ms + WINDOW_STEPS * STEP_MS;
    let supplier = fleet.monitoring(Some(&fleet.supplier_token)).await;
    let compared = eventually(WAIT, POLL, || {
        let mut supplier = supplier.clone();
        let record = fleet.record(name);
        async move {
            // Only once the window is over and every sample in it has been recorded.
            if suanli_agent::runtime::now_ms() < to_ms + 1_000 {
                return None;
            }
            let expected = recorded_sums(&record, from_ms, to_ms, STEP_MS);
            let reply = supplier
                .query_telemetry(v1::QueryTelemetryRequest {
                    scope: Some(v1::query_telemetry_request::Scope::NodeId(node)),
                    from_ms,
                    to_ms,
                    step_seconds: (STEP_MS / 1000) as u32,
                })
                .await
                .ok()?
                .into_inner();
            let mut got = Sums::new();
            for series in &reply.cards {
                for p in &series.points {
                    got.insert(
                        (card_index[&series.card_id], p.at_ms),
                        (p.samples, p.sum_gpu_utilization_pct, p.sum_memory_used_mib, p.sum_temperature_c, p.sum_power_draw_mw),
                    );
                }
            }
            (got == expected && !expected.is_empty()).then_some(got)
        }
    })
    .await;
    compared.unwrap_or_else(|e| panic!("{name}: the broker's aggregates never matched the agent's record: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_survives_a_leader_change_without_gaps_or_duplicates() {
    // Silence detection is not under test here: a long bound keeps it out of the way.
    let fleet = Fleet::with_brokers(3, 60_000).await;
    let token = fleet.enrollment_token(0).await;
    let agent = fleet.agent("gpu-1", Some(&token), 5).await;
    let node = node_of(&agent);
    let cluster = fleet.publish(&[node]).await;
    let card_index = card_indexes(&fleet, cluster).await;

    let before = next_step(suanli_agent::runtime::now_ms());
    broker_matches_record(&fleet, "gpu-1", node, &card_index, before).await;

    // The leader holds the windows; kill it. The agent's stream breaks, it reconnects, and the
    // new leader gets the agent's retained samples: the window before the failover is complete
    // there too, and nothing in it is counted twice.
    let mut broker = fleet.broker;
    let leader = broker.leader(WAIT).await.expect("leader");
    broker.kill(leader).await.expect("kill the leader");
    let new_leader = broker.leader_among(&broker.live(), WAIT).await.expect("a new leader");
    assert_ne!(new_leader, leader);
    let fleet = Fleet { broker, ..fleet };
    broker_matches_record(&fleet, "gpu-1", node, &card_index, before).await;
    let after = next_step(suanli_agent::runtime::now_ms());
    broker_matches_record(&fleet, "gpu-1", node, &card_index, after).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_aggregates_equal_what_the_agents_sent_and_bad_samples_are_refused() {
    let fleet = Fleet::start().await;
    let mut agents = Vec::new();
    for (i, name) in ["gpu-1", "gpu-2", "gpu-3"].into_iter().enumerate() {
        let token = fleet.enrollment_token(i as u32).await;
        agents.push(fleet.agent(name, Some(&token), 10 + i as u64).await);
    }
    let nodes: Vec<u64> = agents.iter().map(node_of).collect();
    let cluster = fleet.publish(&nodes).await;
    assert_eq!(fleet.cards(cluster).await.len(), 6);

    let card_index = card_indexes(&fleet, cluster).await;
    let from_ms = next_step(suanli_agent::runtime::now_ms());
    for (name, node) in ["gpu-1", "gpu-2", "gpu-3"].into_iter().zip(&nodes) {
        let got = broker_matches_record(&fleet, name, *node, &card_index, from_ms).await;
        assert_eq!(got.keys().filter(|(card, _)| *card == 0).count(), 3, "three steps of card 0");
    }
    let mut supplier = fleet.monitoring(Some(&fleet.supplier_token)).await;
    // The live subscription sees samples of the cluster's nodes.
    let mut live = supplier
        .subscribe_telemetry(v1::SubscribeTelemetryRequest { scope: Some(v1::subscribe_telemetry_request::Scope::ClusterId(cluster)) })
        .await
        .expect("subscribe")
        .into_inner();
    let sample = tokio::time::timeout(WAIT, live.message()).await.expect("a live sample").expect("stream").expect("sample");
    assert!(nodes.contains(&sample.node_id));
    assert_eq!(sample.card_ids.len(), 2);

    // A malformed sample from a genuine agent: refused, field named.
    let channel = fleet.agent_channel(Some(&agent_files(&fleet, "gpu-1"))).await.expect("agent channel");
    let mut genuine = MonitoringServiceClient::new(channel);
    let bad = v1::TelemetryBatch {
        samples: vec![v1::NodeSample {
            seq: u64::MAX - 1,
            at_ms: suanli_agent::runtime::now_ms(),
            node: None,
            cards: vec![v1::CardSample { index: 0, present: true, gpu_utilization_pct: 150, ..Default::default() }],
        }],
    };
    let mut acks = genuine.stream_telemetry(tokio_stream::iter(vec![bad])).await.expect("stream opens").into_inner();
    acks.message().await.expect("first ack").expect("first ack present");
    let refused = acks.message().await.expect_err("the bad batch is refused");
    let e = decode_status(&refused);
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.fields.iter().any(|f| f.field == "samples[0].cards[0].gpu_utilization_pct"), "{:?}", e.fields);
}

fn health_of(cards: &[v1::Card], node: u64, index: u32) -> (v1::CardStatus, v1::CardHealth) {
    let card = cards.iter().find(|c| c.node_id == node && c.spec.as_ref().is_some_and(|s| s.index == index)).expect("card");
    (card.status(), card.health())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_and_silent_agents_take_cards_out_of_the_market_and_back() {
    let fleet = Fleet::start().await;
    let mut agents = Vec::new();
    for (i, name) in ["gpu-1", "gpu-2"].into_iter().enumerate() {
        let token = fleet.enrollment_token(i as u32).await;
        agents.push(fleet.agent(name, Some(&token), 20 + i as u64).await);
    }
    let nodes: Vec<u64> = agents.iter().map(node_of).collect();
    let cluster = fleet.publish(&nodes).await;
    let metrics = agents[0].get("metrics").expect("metrics").to_owned();

    let wait_for = |node: u64, index: u32, want: (v1::CardStatus, v1::CardHealth)| {
        let fleet = &fleet;
        async move {
            eventually(WAIT, POLL, || async move {
                let cards = fleet.cards(cluster).await;
                (health_of(&cards, node, index) == want).then_some(())
            })
            .await
            .unwrap_or_else(|e| panic!("card {index} of node {node} never became {want:?}: {e}"))
        }
    };

    // An XID storm: the card turns faulty, and the health event is committed.
    assert_eq!(http("POST", &metrics, "/simulated/cards/0/fault/xid-storm").await, 204);
    wait_for(nodes[0], 0, (v1::CardStatus::Faulty, v1::CardHealth::XidError)).await;
    // The other card of that node is untouched.
    let cards = fleet.cards(cluster).await;
    assert_eq!(health_of(&cards, nodes[0], 1), (v1::CardStatus::Idle, v1::CardHealth::Healthy));

    // A card falls off the bus and comes back.
    assert_eq!(http("POST", &metrics, "/simulated/cards/1/fault/fallen-off-bus").await, 204);
    wait_for(nodes[0], 1, (v1::CardStatus::Offline, v1::CardHealth::Lost)).await;
    assert_eq!(http("DELETE", &metrics, "/simulated/cards/1/fault").await, 204);
    wait_for(nodes[0], 1, (v1::CardStatus::Idle, v1::CardHealth::Healthy)).await;
    assert_eq!(http("POST", &metrics, "/simulated/cards/9/fault/overheat").await, 404);
    assert_eq!(http("POST", &metrics, "/simulated/cards/0/fault/meltdown").await, 400);

    // kill -9 an agent: its cards go offline within the silence bound, and return with it.
    let second = agents.pop().expect("second agent");
    second.kill().await.expect("kill");
    let killed_at = std::time::Instant::now();
    for index in 0..2 {
        wait_for(nodes[1], index, (v1::CardStatus::Offline, v1::CardHealth::AgentSilent)).await;
    }
    assert!(killed_at.elapsed() < Duration::from_millis(SILENT_AFTER_MS) + Duration::from_secs(10));
    let restarted = fleet.agent("gpu-2", None, 21).await;
    assert_eq!(node_of(&restarted), nodes[1], "a restarted agent keeps its credential");
    for index in 0..2 {
        wait_for(nodes[1], index, (v1::CardStatus::Idle, v1::CardHealth::Healthy)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_b_leases_start_once_every_agent_has_provisioned() {
    let fleet = Fleet::start().await;
    let mut agents = Vec::new();
    for (i, name) in ["gpu-1", "gpu-2"].into_iter().enumerate() {
        let token = fleet.enrollment_token(i as u32).await;
        agents.push(fleet.agent(name, Some(&token), 30 + i as u64).await);
    }
    let nodes: Vec<u64> = agents.iter().map(node_of).collect();
    let cluster = fleet.publish(&nodes).await;
    let leader = fleet.broker.leader(WAIT).await.expect("leader");
    let mut platform = fleet.broker.client(leader, suanli_testkit::cluster::PLATFORM_TOKEN).await.expect("platform");
    let (_, researcher_token) = register(&mut platform, AccountKind::Researcher, "researcher").await.expect("researcher");
    let mut researcher = fleet.broker.client(leader, &researcher_token).await.expect("researcher client");

    // Four cards: both nodes' cards. Nobody but the agents acts. The request carries an ID
    // (as the portal sends one) that the agents' log lines about the lease carry too.
    let mut request = tonic::Request::new(v1::RequestLeaseRequest {
        request_id: "lease".into(),
        cluster_id: cluster,
        node_ids: Vec::new(),
        cards: 4,
        billing_mode: v1::BillingMode::Hourly.into(),
        periods: 1,
    });
    request.metadata_mut().insert(suanli_observability::REQUEST_ID_HEADER, "trace-lease-7f3a".parse().expect("header"));
    let lease = researcher.request_lease(request).await.expect("lease").into_inner();
    let active = eventually(WAIT, POLL, || {
        let mut researcher = researcher.clone();
        async move {
            let l = researcher.get_lease(v1::GetLeaseRequest { lease_id: lease.lease_id }).await.ok()?.into_inner();
            (l.state() == v1::LeaseState::Active).then_some(l)
        }
    })
    .await
    .expect("the agents activate the lease");
    assert_eq!(active.card_ids.len(), 4);
    let cards = fleet.cards(cluster).await;
    assert!(cards.iter().all(|c| c.status() == v1::CardStatus::Busy && c.lease_id == lease.lease_id), "{cards:?}");
    for agent in &agents {
        let log = agent.log();
        assert!(log.lines().any(|l| l.contains("lease provisioned on this node") && l.contains("trace-lease-7f3a")), "the request's ID in:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_renews_its_certificate_for_its_own_key_only() {
    let fleet = Fleet::start().await;
    let token = fleet.enrollment_token(1).await;
    let agent = fleet.agent("gpu-a", Some(&token), 1).await;
    let node = node_of(&agent);
    let (cert, key) = agent_files(&fleet, "gpu-a");
    let mut as_agent = fleet.as_agent("gpu-a").await;
    let said = as_agent.get_agent_node(v1::GetAgentNodeRequest {}).await.expect("whoami").into_inner();
    let ca = std::fs::read_to_string(fleet.broker.agent_ca_cert()).expect("CA");
    assert_eq!(said.ca_certificate_pem, ca, "the broker names the CA that signs now");
    assert_eq!(std::fs::read_to_string(fleet.state_dir("gpu-a").join("agent-ca.pem")).expect("recorded"), ca, "the agent recorded who signed");

    // Its own key: a new certificate for the same key and node, which authenticates.
    let own = suanli_pki::signing_request(&key, "gpu-a").expect("csr");
    let renewed = as_agent.renew_agent_certificate(v1::RenewAgentCertificateRequest { csr_pem: own.clone() }).await.expect("renew").into_inner();
    assert_ne!(renewed.certificate_pem, cert);
    assert_eq!(suanli_pki::pem_certificate_fingerprint(&renewed.certificate_pem).unwrap(), suanli_pki::pem_certificate_fingerprint(&cert).unwrap());
    let channel = fleet.agent_channel(Some(&(renewed.certificate_pem.clone(), key.clone()))).await.expect("channel");
    let whoami = SupplierServiceClient::new(channel).get_agent_node(v1::GetAgentNodeRequest {}).await.expect("the renewed certificate works");
    assert_eq!(whoami.into_inner().node.expect("node").node_id, node);

    // Another key (a thief's, or a switch the broker would not see): refused, named.
    let other = suanli_pki::signing_request(&suanli_pki::new_private_key().expect("key"), "gpu-a").expect("csr");
    let refused = as_agent.renew_agent_certificate(v1::RenewAgentCertificateRequest { csr_pem: other }).await.expect_err("another key");
    let e = decode_status(&refused);
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert!(e.fields.iter().any(|f| f.field == "csr_pem"), "{:?}", e.fields);
    // No certificate, or a supplier's token on the public port: refused before anything is signed.
    let mut anonymous = SupplierServiceClient::new(fleet.agent_channel(None).await.expect("channel"));
    let refused = anonymous.renew_agent_certificate(v1::RenewAgentCertificateRequest { csr_pem: own.clone() }).await.expect_err("anonymous");
    assert_eq!(decode_status(&refused).code, ErrorCode::Unauthenticated);
    let mut supplier = fleet.supplier_service(Some(&fleet.supplier_token)).await;
    let refused = supplier.renew_agent_certificate(v1::RenewAgentCertificateRequest { csr_pem: own.clone() }).await.expect_err("a supplier");
    assert_eq!(decode_status(&refused).code, ErrorCode::PermissionDenied);

    // Revoked: its key renews nothing, whatever certificate it shows.
    supplier.revoke_agent(v1::RevokeAgentRequest { request_id: "revoke".into(), node_id: node }).await.expect("revoke");
    let refused = as_agent.renew_agent_certificate(v1::RenewAgentCertificateRequest { csr_pem: own }).await.expect_err("revoked");
    assert_eq!(decode_status(&refused).code, ErrorCode::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_ca_rotates_under_a_running_agent_without_re_enrolling_or_a_gap_in_telemetry() {
    let mut fleet = Fleet::with_brokers(3, 60_000).await;
    let old = fleet.broker.cluster_ca().expect("the CA");
    let new = suanli_pki::Ca::generate("Suanli cluster CA 2").expect("a new CA");
    let dir = fleet.dir.path().to_owned();
    let (old_pem, new_pem, bundle) = (dir.join("old-ca.pem"), dir.join("new-ca.pem"), dir.join("agent-trust.pem"));
    std::fs::write(&old_pem, old.cert_pem()).expect("write");
    std::fs::write(&new_pem, new.cert_pem()).expect("write");
    // 1. The agent trusts both CAs (its --broker-ca file is a bundle), and so does every node.
    std::fs::write(&bundle, format!("{}{}", old.cert_pem(), new.cert_pem())).expect("write");
    let token = fleet.enrollment_token(0).await;
    let agent = fleet.agent_trusting("gpu-1", &token, &bundle).await;
    let node = node_of(&agent);
    let cluster = fleet.publish(&[node]).await;
    let card_index = card_indexes(&fleet, cluster).await;
    let config = "[broker]\nagent_silent_after_ms = 60000\n";
    fleet.broker.set_config(&format!("{config}agent_ca_also_trusted = {:?}\n", new_pem.display().to_string()));
    fleet.broker.rolling_restart(WAIT).await.expect("every node trusts the new CA");

    // 2. The new CA signs; the old is only trusted. The agent notices and renews, same node.
    std::fs::write(fleet.broker.agent_ca_cert(), new.cert_pem()).expect("write");
    std::fs::write(fleet.broker.agent_ca_key(), new.key_pem()).expect("write");
    fleet.broker.set_config(&format!("{config}agent_ca_also_trusted = {:?}\n", old_pem.display().to_string()));
    fleet.broker.rolling_restart(WAIT).await.expect("the new CA signs");
    let renewed = eventually(WAIT, POLL, || async {
        let signed_by = std::fs::read_to_string(fleet.state_dir("gpu-1").join("agent-ca.pem")).ok()?;
        (signed_by == new.cert_pem()).then(|| agent_files(&fleet, "gpu-1"))
    })
    .await
    .expect("the agent renewed its certificate under the new CA");
    let chain = suanli_pki::Ca::from_pem(new.cert_pem(), new.key_pem()).expect("new CA");
    assert!(verifies(&renewed.0, chain.cert_pem()), "the renewed certificate chains to the new CA");

    // 3. The old CA is dropped: the agent carries on with its renewed certificate (the same
    // node; telemetry before, during and after the rotation all arrived, none twice), and a
    // certificate of the old CA no longer gets through the handshake.
    fleet.broker.set_config(config);
    fleet.broker.rolling_restart(WAIT).await.expect("the old CA is dropped");
    let after = next_step(suanli_agent::runtime::now_ms());
    broker_matches_record(&fleet, "gpu-1", node, &card_index, after).await;
    assert_eq!(node_of(&agent), node);
    let old_cert = old.sign_agent(&suanli_pki::signing_request(&renewed.1, "gpu-1").expect("csr"), node).expect("cert");
    let handshake = async {
        let channel = fleet.agent_channel(Some(&(old_cert, renewed.1.clone()))).await?;
        SupplierServiceClient::new(channel).get_agent_node(v1::GetAgentNodeRequest {}).await.map_err(|s| s.to_string())
    };
    assert!(handshake.await.is_err(), "a certificate of the dropped CA must not authenticate");
    // The same channel with the renewed certificate gets through: the refusal above was the CA's.
    let channel = fleet.agent_channel(Some(&renewed)).await.expect("channel");
    let whoami = SupplierServiceClient::new(channel).get_agent_node(v1::GetAgentNodeRequest {}).await.expect("the renewed certificate works");
    assert_eq!(whoami.into_inner().node.expect("node").node_id, node);
}

/// Whether `cert_pem` is signed by the CA certificate `ca_pem` (checked by OpenSSL, a third party).
fn verifies(cert_pem: &str, ca_pem: &str) -> bool {
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("ca.pem"), ca_pem).expect("write");
    std::fs::write(dir.path().join("leaf.pem"), cert_pem).expect("write");
    let out = std::process::Command::new("openssl").args(["verify", "-CAfile", "ca.pem", "leaf.pem"]).current_dir(dir.path()).output().expect("openssl");
    out.status.success()
}
