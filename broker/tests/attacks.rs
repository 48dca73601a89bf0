//! Callers who may not, trying anyway against real broker processes: each test asserts the
//! attempt was refused *and* nothing changed (no entry in the log from a stranger, no
//! definitive answer from a node that cannot know).

use std::path::Path;
use std::time::Duration;

use suanli_proto::decode_status;
use suanli_proto::v1::{self, supplier_service_client::SupplierServiceClient, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::register;
use suanli_types::ErrorCode;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_suanli-broker"))
}

fn enrollment(token: &str, request_id: &str) -> v1::EnrollAgentRequest {
    let key = suanli_pki::new_private_key().expect("key");
    v1::EnrollAgentRequest {
        request_id: request_id.to_owned(),
        enrollment_token: token.to_owned(),
        csr_pem: suanli_pki::signing_request(&key, "intruder").expect("csr"),
        inventory: Some(suanli_proto::convert::inventory_to_wire(&suanli_testkit::fixtures::inventory("intruder", 1))),
    }
}

#[tokio::test]
async fn a_stranger_without_an_enrollment_token_writes_nothing_to_the_log() {
    let cluster = BrokerCluster::start(binary(), 1, None).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let before = cluster.status(1).await.expect("status").last_log_index;
    let channel = suanli_proto::client::channel(&format!("http://{}", cluster.address(1).expect("address"))).await.expect("channel");
    let mut stranger = SupplierServiceClient::new(channel);
    // Made-up tokens, with the request IDs the broker's own reaper uses for lease 1.
    for (n, request_id) in ["expire-1-active", "expire-1-pending", "settle-0-1", "health-1"].iter().enumerate() {
        let refused = stranger.enroll_agent(enrollment(&format!("made-up-token-{n}"), request_id)).await;
        let error = decode_status(&refused.expect_err("a made-up token is refused"));
        assert_eq!(error.code, ErrorCode::Unauthenticated, "{error:?}");
    }
    let after = cluster.status(1).await.expect("status").last_log_index;
    assert_eq!(after, before, "nothing a stranger sent reached the log");
}

#[tokio::test]
async fn a_node_cut_off_from_the_leader_never_calls_a_new_token_unknown() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let cut = cluster.ids().into_iter().find(|id| *id != leader).expect("a follower");
    cluster.partition(&[cut]);
    // Once the cut-off node has lost its leader, a researcher registers through the others.
    suanli_testkit::eventually(Duration::from_secs(20), Duration::from_millis(50), || async { (cluster.status(cut).await.ok()?.leader_id == 0).then_some(()) })
        .await
        .expect("the cut-off node loses its leader");
    let mut platform = cluster.client(leader, PLATFORM_TOKEN).await.expect("client");
    let (_, token) = register(&mut platform, AccountKind::Researcher, "fresh").await.expect("register");
    // The cut-off node has not applied the registration: it must not call the token unknown.
    let mut researcher = cluster.client(cut, &token).await.expect("client");
    for _ in 0..3 {
        let answer = researcher.list_leases(v1::ListLeasesRequest { live_only: true, ..Default::default() }).await;
        let error = decode_status(&answer.expect_err("the cut-off node cannot answer"));
        assert_eq!(error.code, ErrorCode::Unavailable, "a retryable answer, not a definitive one: {error:?}");
    }
    // Healed, the same token works there.
    cluster.heal();
    suanli_testkit::eventually(Duration::from_secs(30), Duration::from_millis(100), || {
        let mut r = researcher.clone();
        async move { r.list_leases(v1::ListLeasesRequest { live_only: true, ..Default::default() }).await.ok() }
    })
    .await
    .expect("the token is known once the node caught up");
}

/// A Raft vote for a made-up node with a term far ahead: what a stranger would send to depose
/// the leader. (The payload never gets decoded where it is refused.)
fn forged_vote() -> v1::RaftMessage {
    v1::RaftMessage { format_version: 2, payload: vec![0xff; 32], newest_store_format: 0 }
}

/// The leader and its term, as every node reports them.
async fn leadership(cluster: &BrokerCluster) -> Vec<(u64, u64)> {
    let mut seen = Vec::new();
    for id in cluster.ids() {
        let s = cluster.status(id).await.expect("status");
        seen.push((s.leader_id, s.term));
    }
    seen
}

#[tokio::test]
async fn raft_is_not_spoken_on_the_client_port() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let before = leadership(&cluster).await;
    for id in cluster.ids() {
        let channel = suanli_proto::client::channel(&format!("http://{}", cluster.address(id).expect("address"))).await.expect("channel");
        let mut raft = v1::raft_internal_client::RaftInternalClient::new(channel);
        for _ in 0..3 {
            let refused = raft.vote(forged_vote()).await.expect_err("no Raft on the client port");
            assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
            let refused = raft.append_entries(forged_vote()).await.expect_err("no Raft on the client port");
            assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
        }
    }
    assert_eq!(leadership(&cluster).await, before, "the leader and its term are unchanged");
}

#[tokio::test]
async fn the_peer_port_refuses_anyone_but_a_broker_node() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let before = leadership(&cluster).await;
    let peer = format!("https://{}", cluster.peer_address(leader).expect("peer address"));
    let ca = cluster.cluster_ca().expect("cluster CA");
    let trust = tonic::transport::Certificate::from_pem(ca.cert_pem());
    // No client certificate: the handshake itself fails.
    let anonymous = tonic::transport::ClientTlsConfig::new().ca_certificate(trust.clone()).domain_name("127.0.0.1");
    if let Ok(channel) = suanli_proto::client::channel_with(&peer, Some(anonymous)).await {
        let refused = v1::raft_internal_client::RaftInternalClient::new(channel).vote(forged_vote()).await;
        assert!(refused.is_err(), "a caller without a certificate is refused");
    }
    // An agent's certificate, from the very same CA: not a peer's.
    let key = suanli_pki::new_private_key().expect("key");
    let agent = ca.sign_agent(&suanli_pki::signing_request(&key, "gpu").expect("csr"), 1).expect("agent cert");
    let as_agent =
        tonic::transport::ClientTlsConfig::new().ca_certificate(trust).identity(tonic::transport::Identity::from_pem(&agent, &key)).domain_name("127.0.0.1");
    let channel = suanli_proto::client::channel_with(&peer, Some(as_agent)).await.expect("TLS with an agent certificate");
    let mut raft = v1::raft_internal_client::RaftInternalClient::new(channel.clone());
    let refused = decode_status(&raft.vote(forged_vote()).await.expect_err("an agent is no peer"));
    assert_eq!(refused.code, ErrorCode::Unauthenticated, "{refused:?}");
    // Nor may it pass as a forwarding node to reach the API with a forged agent key.
    let mut request = tonic::Request::new(v1::GetAgentNodeRequest {});
    request.metadata_mut().insert("x-suanli-agent-key", "00".repeat(32).parse().expect("header"));
    let refused = SupplierServiceClient::new(channel).get_agent_node(request).await.expect_err("refused");
    assert_eq!(decode_status(&refused).code, ErrorCode::Unauthenticated);
    assert_eq!(leadership(&cluster).await, before, "the leader and its term are unchanged");
}

#[tokio::test]
async fn no_bearer_token_or_request_crosses_the_wire_between_nodes_in_the_clear() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let follower = cluster.ids().into_iter().find(|id| *id != leader).expect("a follower");
    // Everything through a follower: forwarded to the leader, with its token.
    let mut platform = cluster.client(follower, PLATFORM_TOKEN).await.expect("client");
    let marker = format!("wiretap-marker-{}", std::process::id());
    let (_, token) = register(&mut platform, AccountKind::Supplier, &marker).await.expect("register");
    let mut supplier = cluster.client(follower, &token).await.expect("client");
    let cluster_name = format!("{marker}-cluster");
    suanli_testkit::fixtures::publish(&mut supplier, suanli_types::ClusterClass::B, 1, 1, &cluster_name).await.expect("publish");
    cluster.converge(Duration::from_secs(10)).await.expect("converge");
    let wire = cluster.captured_traffic();
    assert!(wire.len() > 4096, "the nodes talked through the links: {} bytes", wire.len());
    let contains = |needle: &[u8]| wire.windows(needle.len()).any(|w| w == needle);
    for secret in [PLATFORM_TOKEN.as_bytes(), token.as_bytes(), marker.as_bytes()] {
        assert!(!contains(secret), "{:?} crossed the wire in the clear", String::from_utf8_lossy(secret));
    }
}

#[tokio::test]
async fn deposits_are_capped_per_call_and_per_day_and_a_retry_still_gets_its_answer() {
    let config = "[broker]\nmax_deposit_minor = 1000\nmax_deposits_per_day_minor = 2500\n";
    let cluster = BrokerCluster::start(binary(), 1, Some(config)).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let mut platform = cluster.client(1, PLATFORM_TOKEN).await.expect("client");
    let account = platform
        .register_account(v1::RegisterAccountRequest { request_id: "capped".into(), kind: AccountKind::Researcher.into(), token: String::new() })
        .await
        .expect("register")
        .into_inner()
        .account_id;
    let deposit =
        |id: &str, minor: i64| v1::DepositRequest { request_id: id.into(), account_id: account, amount: Some(v1::Money { currency: "CNY".into(), minor }) };
    let before = cluster.status(1).await.expect("status").last_log_index;
    let refused = decode_status(&platform.deposit(deposit("too-much", 1001)).await.expect_err("over the per-call cap"));
    assert_eq!(refused.code, ErrorCode::InvalidArgument, "{refused:?}");
    assert_eq!(cluster.status(1).await.expect("status").last_log_index, before, "nothing proposed");
    platform.deposit(deposit("d1", 1000)).await.expect("first");
    platform.deposit(deposit("d2", 1000)).await.expect("second");
    let refused = decode_status(&platform.deposit(deposit("d3", 1000)).await.expect_err("over the daily cap"));
    assert_eq!(refused.code, ErrorCode::PermissionDenied, "{refused:?}");
    // A retry of one that went through is answered as the first time.
    platform.deposit(deposit("d2", 1000)).await.expect("a retry gets its first answer");
}

#[tokio::test]
async fn a_service_token_does_only_what_its_service_needs() {
    let dir = tempfile::TempDir::new().expect("dir");
    let (scheduler, payments) = ("scheduler-service-token-0123", "payments-service-token-0123");
    std::fs::write(dir.path().join("scheduler"), scheduler).expect("token file");
    std::fs::write(dir.path().join("payments"), payments).expect("token file");
    let config = format!(
        "[broker]\n[[broker.services]]\nname = \"scheduler\"\ntoken_file = \"{}\"\npowers = [\"scheduling\", \"read\"]\n\
         [[broker.services]]\nname = \"payments\"\ntoken_file = \"{}\"\npowers = [\"deposits\"]\n",
        dir.path().join("scheduler").display(),
        dir.path().join("payments").display()
    );
    let cluster = BrokerCluster::start(binary(), 1, Some(&config)).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let mut platform = cluster.client(1, PLATFORM_TOKEN).await.expect("client");
    let (researcher, _) = register(&mut platform, AccountKind::Researcher, "served").await.expect("register");
    let balance = |c: &mut suanli_proto::client::Client| {
        let mut c = c.clone();
        async move { c.get_balance(v1::GetBalanceRequest { account_id: researcher, currency: "CNY".into() }).await.expect("balance").into_inner() }
    };
    let before = balance(&mut platform).await;
    // The scheduler's token reads, but pays nothing in, registers no one, acts as no operator.
    let mut as_scheduler = cluster.client(1, scheduler).await.expect("client");
    as_scheduler.list_catalogue(v1::ListCatalogueRequest::default()).await.expect("the scheduler reads the market");
    let deposit = v1::DepositRequest { request_id: "stolen".into(), account_id: researcher, amount: Some(v1::Money { currency: "CNY".into(), minor: 500 }) };
    let refused = decode_status(&as_scheduler.deposit(deposit.clone()).await.expect_err("no deposits"));
    assert_eq!(refused.code, ErrorCode::PermissionDenied, "{refused:?}");
    let register_as = v1::RegisterAccountRequest { request_id: "sock-puppet".into(), kind: AccountKind::Supplier.into(), token: String::new() };
    assert_eq!(decode_status(&as_scheduler.register_account(register_as).await.expect_err("no accounts")).code, ErrorCode::PermissionDenied);
    let endpoint = format!("http://{}", cluster.address(1).expect("address"));
    let channel = suanli_proto::client::channel(&endpoint).await.expect("channel");
    let mut as_operator = suanli_proto::client::as_operator(channel, scheduler, "dispatcher").expect("client");
    let end = v1::EndLeaseRequest { request_id: "x".into(), lease_id: 1, ..Default::default() };
    assert_eq!(decode_status(&as_operator.end_lease(end).await.expect_err("no operator")).code, ErrorCode::PermissionDenied);
    // The payment intake's token pays in, and does nothing else.
    let mut as_payments = cluster.client(1, payments).await.expect("client");
    assert_eq!(decode_status(&as_payments.list_leases(v1::ListLeasesRequest::default()).await.expect_err("no reads")).code, ErrorCode::PermissionDenied);
    as_payments.deposit(deposit).await.expect("the payment intake pays in");
    let after = balance(&mut platform).await;
    assert_eq!(after.available_minor, before.available_minor + 500, "exactly the one deposit the payment intake made");
}

/// Starts one broker node with `--listen 0.0.0.0:0` and `extra` flags.
async fn off_loopback(dir: &Path, extra: &[String]) -> anyhow::Result<suanli_testkit::Service> {
    let mut args: Vec<String> = ["serve", "--bootstrap", "--node-id", "1", "--listen", "0.0.0.0:0", "--data-dir"].map(String::from).to_vec();
    args.push(dir.join("data").display().to_string());
    args.extend_from_slice(extra);
    suanli_testkit::Service::start("broker", binary(), &args, &[("SUANLI_BROKER_PLATFORM_TOKEN", PLATFORM_TOKEN)], dir, Duration::from_secs(60)).await
}

#[tokio::test]
async fn a_client_port_off_loopback_speaks_only_tls() {
    let dir = tempfile::TempDir::new().expect("dir");
    // Without a CA to make its certificate with, it does not start at all.
    off_loopback(dir.path(), &[]).await.err().expect("no TLS, no start");
    let said = std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default();
    assert!(said.contains("serves TLS"), "{said}");
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    let ca = suanli_pki::Ca::load(&cert, &key, true).expect("ca");
    let extra = ["--agent-ca-cert".to_owned(), cert.display().to_string(), "--agent-ca-key".to_owned(), key.display().to_string()];
    let node = off_loopback(dir.path(), &extra).await.expect("broker");
    let port = node.get("grpc").expect("grpc").rsplit_once(':').expect("port").1.to_owned();
    // Plain HTTP/2 with a bearer token gets nowhere.
    if let Ok(channel) = suanli_proto::client::channel(&format!("http://127.0.0.1:{port}")).await {
        let mut plain = suanli_proto::client::with_token(channel, Some(PLATFORM_TOKEN)).expect("client");
        plain.list_catalogue(v1::ListCatalogueRequest::default()).await.expect_err("no plaintext");
    }
    // TLS, checked against the cluster CA, works.
    let mut client =
        suanli_proto::client::connect_checked(&format!("https://127.0.0.1:{port}"), Some(ca.cert_pem()), Some(PLATFORM_TOKEN)).await.expect("TLS client");
    client.list_catalogue(v1::ListCatalogueRequest::default()).await.expect("served over TLS");
}

#[tokio::test]
async fn an_operator_acts_only_with_the_portals_signed_word_and_within_the_role_rules() {
    use suanli_pki::assertion::{OperatorAssertion, OperatorKey};
    let dir = tempfile::TempDir::new().expect("dir");
    let key_path = dir.path().join("operator-key");
    let key = OperatorKey::load(&key_path, true).expect("key");
    let config = format!("[broker]\noperator_key_file = \"{}\"\n", key_path.display());
    let cluster = BrokerCluster::start(binary(), 1, Some(&config)).await.expect("cluster");
    cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let endpoint = format!("http://{}", cluster.address(1).expect("address"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let as_dispatcher = |assertion: Option<String>| {
        let endpoint = endpoint.clone();
        async move {
            let channel = suanli_proto::client::channel(&endpoint).await.expect("channel");
            let interceptor = suanli_proto::client::operator_bearer(PLATFORM_TOKEN, "dispatcher", assertion.as_deref()).expect("interceptor");
            v1::broker_client::BrokerClient::with_interceptor(channel, interceptor).list_leases(v1::ListLeasesRequest::default()).await
        }
    };
    let signed = |roles: &[&str], expires_ms: i64| {
        key.sign(&OperatorAssertion { operator: 9, roles: roles.iter().map(|r| r.to_string()).collect(), acting: "dispatcher".into(), expires_ms })
    };
    // The platform token and a role name alone (a stolen token) act as no operator.
    let refused = decode_status(&as_dispatcher(None).await.expect_err("no assertion"));
    assert_eq!(refused.code, ErrorCode::PermissionDenied, "{refused:?}");
    // A role not held, a pair of roles that exclude each other, an expired or a forged word.
    let other_key = OperatorKey::generate().sign(&OperatorAssertion {
        operator: 9,
        roles: vec!["dispatcher".into()],
        acting: "dispatcher".into(),
        expires_ms: now + 60_000,
    });
    for (why, assertion) in [
        ("not held", signed(&["monitor"], now + 60_000)),
        ("exclusive roles", signed(&["dispatcher", "system_administrator"], now + 60_000)),
        ("expired", signed(&["dispatcher"], now - 1)),
        ("another key", other_key),
    ] {
        let refused = decode_status(&as_dispatcher(Some(assertion)).await.expect_err(why));
        assert_eq!(refused.code, ErrorCode::PermissionDenied, "{why}: {refused:?}");
    }
    as_dispatcher(Some(signed(&["dispatcher", "monitor"], now + 60_000))).await.expect("the portal's word for a dispatcher");
}

#[tokio::test]
async fn an_account_s_refused_commands_never_reach_the_log() {
    let cluster = BrokerCluster::start(binary(), 3, None).await.expect("cluster");
    let leader = cluster.leader(Duration::from_secs(20)).await.expect("leader");
    let mut platform = cluster.client(leader, PLATFORM_TOKEN).await.expect("client");
    let (_, token) = register(&mut platform, AccountKind::Researcher, "mallory").await.expect("register");
    let (victim, _) = register(&mut platform, AccountKind::Researcher, "victim").await.expect("register");
    cluster.converge(Duration::from_secs(20)).await.expect("converged");
    let before = cluster.status(leader).await.expect("status").last_log_index;
    // Through a follower too: forwarded to the leader, refused there before proposing.
    let follower = cluster.ids().into_iter().find(|id| *id != leader).expect("a follower");
    for node in [leader, follower] {
        let mut mallory = cluster.client(node, &token).await.expect("client");
        let channel = suanli_proto::client::channel(&format!("http://{}", cluster.address(node).expect("address"))).await.expect("channel");
        let mut jobs = v1::job_service_client::JobServiceClient::with_interceptor(channel, suanli_proto::client::bearer(Some(&token)).expect("bearer"));
        for n in 0..20 {
            let id = |what: &str| format!("{what}-{node}-{n}");
            let end = mallory.end_lease(v1::EndLeaseRequest { request_id: id("end"), lease_id: 4242 + n, reason: v1::EndReason::ByResearcher.into() }).await;
            assert_eq!(decode_status(&end.expect_err("no such lease of hers")).code, ErrorCode::NotFound);
            let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x";
            let add = mallory.add_ssh_key(v1::AddSshKeyRequest { request_id: id("key"), account_id: victim, public_key: key.into() }).await;
            assert_eq!(decode_status(&add.expect_err("not her account")).code, ErrorCode::PermissionDenied);
            let enroll = mallory.enroll_node(v1::EnrollNodeRequest { request_id: id("node"), inventory: None }).await;
            assert!(enroll.is_err(), "a researcher enrolls no node");
            let cancel = jobs.cancel_job(v1::JobRef { request_id: id("cancel"), job_id: 77 + n }).await;
            assert_eq!(decode_status(&cancel.expect_err("no such job of hers")).code, ErrorCode::NotFound);
        }
    }
    assert_eq!(cluster.status(leader).await.expect("status").last_log_index, before, "no refusal entered the log");
    assert_eq!(cluster.leader(Duration::from_secs(5)).await.expect("leader"), leader, "the leader stayed");
}
