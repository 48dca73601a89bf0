//! The persisted formats, pinned: one sample of every command (as the log stores it, with the
//! at-most-once digest), every event (as the event store keeps it and `Watch` relays it), and
//! the state they leave (as a snapshot holds it), postcard-encoded and compared with the files
//! under `broker/formats/v<FORMAT_VERSION>/`. Commands, events and snapshots are positional
//! encodings: a field added to `Listing` or `JobSpec`, a variant inserted before another, a
//! type changed, all change these bytes, and the data of every deployed broker would no longer
//! read. A failure here means: bump `storage::FORMAT_VERSION`, keep the old directory as the
//! fixtures of the format before, and add the migration that reads it.
//!
//! The sample values are written out here (not taken from test fixtures elsewhere), so only a
//! change of encoding changes the bytes. `SUANLI_REGENERATE=1` writes the files of the current
//! version, for a new version only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use suanli_types::{
    AccountId, AccountKind, BillingMode, Caller, CardHealth, CardId, CardStatus, ClusterClass, ClusterId, CpcId, Currency, EndReason, JobEndReason, JobId,
    JobSpec, JobState, LeaseId, LeaseState, LeaseUnit, Listing, Money, NodeAccess, NodeId, NodeInventory, OperatorRole, RemoteLeaseId, RemoteLeaseState,
    RequestId, SecretHash, SshPublicKey, SupplierEndReason, Timestamp, TransactionKind,
};

use super::{AppliedEvents, Command, Envelope, Event, State};
use crate::storage::FORMAT_VERSION;

const T0: i64 = 1_800_000_000_000;
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl golden";

fn listing() -> Listing {
    serde_json::from_str(
        r#"{"title":"4*L40S","resource_type":"Gpu","gpu_model":"L40S","vram_gib":48,"memory_gib":512,"vcpus":96,
        "vendor":"Lenovo","region":"Beijing","local_storage":{"data_disks":1,"data_disk_gb":3840,"system_disk_gb":480,"medium":"Ssd"},
        "prices":{"currency":"CNY","per_card":{"hourly":600,"monthly":300000}},"usage_instructions":""}"#,
    )
    .expect("listing")
}

fn inventory() -> NodeInventory {
    serde_json::from_str(
        r#"{"hostname":"gpu.example","cpu_model":"AMD EPYC 9654","vcpus":96,"memory_gib":512,
        "cards":[{"index":0,"uuid":"GPU-0","model":"L40S","vram_mib":49152,"pci_bus_id":"","power_limit_mw":0},
                 {"index":1,"uuid":"GPU-1","model":"L40S","vram_mib":49152,"pci_bus_id":"","power_limit_mw":0}],
        "os":"","disk_gib":0,"driver_version":"","cuda_version":""}"#,
    )
    .expect("inventory")
}

fn spec() -> JobSpec {
    serde_json::from_str(
        r#"{"name":"train","kind":"training","resources":{"cards":1},
        "inputs":[{"name":"data.tar","sha256":"0101010101010101010101010101010101010101010101010101010101010101"}],
        "outputs":["model.bin"],"run":{"command":{"program":"/bin/true","args":["-x"]}},"max_attempts":2}"#,
    )
    .expect("spec")
}

fn hash(what: &str) -> SecretHash {
    SecretHash::of("golden", what)
}

fn cny(minor: i64) -> Money {
    Money::new(Currency::cny(), minor)
}

/// Which variant a command is: a new variant does not compile until it is listed here, and
/// [`commands`] must then give a sample of it.
fn command_kind(c: &Command) -> usize {
    match c {
        Command::RegisterAccount { .. } => 0,
        Command::AddSshKey { .. } => 1,
        Command::EnrollNode { .. } => 2,
        Command::IssueEnrollmentToken { .. } => 3,
        Command::EnrollAgent { .. } => 4,
        Command::RevokeAgent { .. } => 5,
        Command::SetNodeAccess { .. } => 6,
        Command::SetCardHealth { .. } => 7,
        Command::PublishCluster { .. } => 8,
        Command::ModifyCluster { .. } => 9,
        Command::DelistCluster { .. } => 10,
        Command::SetCardStatus { .. } => 11,
        Command::RequestLease { .. } => 12,
        Command::ApproveLease { .. } => 13,
        Command::VerifyAuthCode { .. } => 14,
        Command::ActivateLease { .. } => 15,
        Command::ExtendLease { .. } => 16,
        Command::SetLeasePassword { .. } => 17,
        Command::RevokeSshCertificate { .. } => 18,
        Command::EndLease { .. } => 19,
        Command::ExpireLease { .. } => 20,
        Command::RetireBrokerNode { .. } => 21,
        Command::SubmitJob { .. } => 22,
        Command::CancelJob { .. } => 23,
        Command::AcquireSchedulerLease { .. } => 24,
        Command::PlaceJobs { .. } => 25,
        Command::StopJobs { .. } => 26,
        Command::JobStarted { .. } => 27,
        Command::JobEnded { .. } => 28,
        Command::JobCheckpoint { .. } => 29,
        Command::JobProgress { .. } => 30,
        Command::AutoLease { .. } => 31,
        Command::Deposit { .. } => 32,
        Command::GrantCredit { .. } => 33,
        Command::SettleLeases { .. } => 34,
        Command::RemoveSshKey { .. } => 35,
        Command::RotateAccountToken { .. } => 36,
        Command::ArchiveEnded { .. } => 37,
        Command::RequestRemoteLease { .. } => 38,
        Command::ConfirmRemoteLease { .. } => 39,
        Command::EndRemoteLease { .. } => 40,
        Command::RaiseClusterFormat { .. } => 41,
        Command::Batch { .. } => 42,
    }
}
const COMMAND_KINDS: usize = 43;

/// The ID the sample's remote lease gets (the next one after what the samples before it drew).
const REMOTE_LEASE: RemoteLeaseId = RemoteLeaseId(9);

fn event_kind(e: &Event) -> usize {
    match e {
        Event::AccountRegistered { .. } => 0,
        Event::SshKeyAdded { .. } => 1,
        Event::NodeEnrolled { .. } => 2,
        Event::ClusterPublished { .. } => 3,
        Event::ClusterModified { .. } => 4,
        Event::ClusterDelisted { .. } => 5,
        Event::AgentEnrolled { .. } => 6,
        Event::AgentRevoked { .. } => 7,
        Event::CardHealthChanged { .. } => 8,
        Event::CardStatusChanged { .. } => 9,
        Event::LeaseStateChanged { .. } => 10,
        Event::LeaseExtended { .. } => 11,
        Event::AuthCodeRejected { .. } => 12,
        Event::JobStateChanged { .. } => 13,
        Event::JobStopRequested { .. } => 14,
        Event::SchedulerLeaseChanged { .. } => 15,
        Event::Ledger { .. } => 16,
        Event::LeaseEvaluated { .. } => 17,
        Event::SshKeyRemoved { .. } => 18,
        Event::AccountTokenRotated { .. } => 19,
        Event::RemoteLeaseChanged { .. } => 20,
    }
}
const EVENT_KINDS: usize = 21;

/// One envelope of every command, from the caller that would send it, in an order that lets
/// many of them succeed (the state they leave is pinned too).
fn commands() -> Vec<Envelope> {
    let (supplier, researcher) = (AccountId(1), AccountId(2));
    // IDs as the state hands them out: accounts 1-2, node 3 (cards 4-5; its agent enrolls
    // with the same hostname, so it keeps the node), cluster 6, lease 7, job 8.
    let (node, agent_node, cluster, lease, job) = (NodeId(3), NodeId(3), ClusterId(6), LeaseId(7), JobId(8));
    let key = SshPublicKey::parse(KEY).expect("key");
    let at = |s: i64| Timestamp::from_millis(T0 + s * 1000);
    let list: Vec<(Caller, Command)> = vec![
        (Caller::Platform, Command::RegisterAccount { kind: AccountKind::Supplier, token_hash: hash("supplier") }),
        (Caller::Platform, Command::RegisterAccount { kind: AccountKind::Researcher, token_hash: hash("researcher") }),
        (Caller::Account(supplier), Command::EnrollNode { inventory: inventory() }),
        (Caller::Account(supplier), Command::IssueEnrollmentToken { token_hash: hash("enroll"), expires_at: at(3600) }),
        (Caller::Enrollee(hash("enroll")), Command::EnrollAgent { token_hash: hash("enroll"), credential_hash: hash("agent"), inventory: inventory() }),
        (
            Caller::Agent(agent_node),
            Command::SetNodeAccess {
                node: agent_node,
                access: NodeAccess { ssh_host: "gpu.example".into(), ssh_port: 2201, host_key: key.clone(), login_prefix: "sla".into() },
            },
        ),
        (Caller::Account(supplier), Command::PublishCluster { class: ClusterClass::B, nodes: vec![node], listing: listing() }),
        (Caller::Account(supplier), Command::ModifyCluster { cluster, listing: listing() }),
        (Caller::Platform, Command::Deposit { account: researcher, amount: cny(5_000_000) }),
        (Caller::Operator(OperatorRole::Dispatcher), Command::GrantCredit { account: researcher, limit: cny(10_000) }),
        (Caller::Account(researcher), Command::AddSshKey { account: researcher, key: key.clone() }),
        (Caller::Account(researcher), Command::RequestLease { cluster, unit: LeaseUnit::Cards(1), billing_mode: BillingMode::Hourly, periods: 2 }),
        (Caller::Account(supplier), Command::ApproveLease { lease, code_hash: hash("code"), code_expires_at: at(600) }),
        (Caller::Account(researcher), Command::VerifyAuthCode { lease, candidate_hash: hash("wrong code") }),
        (Caller::Account(supplier), Command::ActivateLease { lease }),
        (Caller::Account(researcher), Command::ExtendLease { lease, periods: 1 }),
        (Caller::Account(researcher), Command::SetLeasePassword { lease, password_hash: hash("password") }),
        (Caller::Account(researcher), Command::RevokeSshCertificate { lease, serial: 42 }),
        (Caller::Account(researcher), Command::SubmitJob { spec: spec() }),
        (Caller::Platform, Command::AcquireSchedulerLease { holder: "scheduler-1".into(), ttl_ms: 60_000 }),
        (Caller::Platform, Command::PlaceJobs { epoch: 1, placements: vec![(job, vec![CardId(4)])] }),
        (Caller::Agent(node), Command::JobStarted { job, attempt: 1 }),
        (Caller::Agent(node), Command::JobProgress { job, attempt: 1, progress: r#"{"step":3}"#.into() }),
        (Caller::Agent(node), Command::JobCheckpoint { job, attempt: 1, sha256: "02".repeat(32) }),
        (Caller::Platform, Command::StopJobs { epoch: 1, stops: vec![(job, JobEndReason::Preempted)] }),
        (
            Caller::Agent(node),
            Command::JobEnded { job, attempt: 1, reason: JobEndReason::ExitStatus(137), outputs: BTreeMap::from([("model.bin".to_owned(), "03".repeat(32))]) },
        ),
        (Caller::Platform, Command::AutoLease { epoch: 1, job }),
        (Caller::Account(researcher), Command::CancelJob { job }),
        (Caller::System, Command::SetCardHealth { changes: vec![(CardId(5), CardHealth::Overheating)] }),
        (Caller::Account(supplier), Command::SetCardStatus { card: CardId(5), status: CardStatus::Offline }),
        (Caller::Account(supplier), Command::EndLease { lease, reason: EndReason::BySupplier(SupplierEndReason::Maintenance) }),
        (Caller::System, Command::SettleLeases { leases: vec![lease] }),
        (Caller::System, Command::ExpireLease { lease }),
        (Caller::Account(supplier), Command::RevokeAgent { node: agent_node }),
        (Caller::Account(supplier), Command::DelistCluster { cluster }),
        (Caller::Platform, Command::RetireBrokerNode { node: 3 }),
        (Caller::Account(researcher), Command::RemoveSshKey { account: researcher, key }),
        (Caller::Platform, Command::RotateAccountToken { account: researcher, token_hash: hash("researcher, rotated") }),
        // The lease ended at 31 s and the job at 28 s: both move to the archive.
        (Caller::System, Command::ArchiveEnded { ended_before: at(37) }),
        // Format 5: a lease of another member's cards, held, confirmed and ended.
        (
            Caller::Platform,
            Command::RequestRemoteLease {
                researcher,
                member: "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X".into(),
                member_name: "university".into(),
                remote_cluster: 4,
                cards: 2,
                billing_mode: BillingMode::Hourly,
                periods: 3,
                price_per_card: cny(1_250),
            },
        ),
        (Caller::Platform, Command::ConfirmRemoteLease { remote: REMOTE_LEASE, remote_lease: 17 }),
        (Caller::Platform, Command::EndRemoteLease { remote: REMOTE_LEASE, charged_minor: 2_501 }),
        // Format 6: every node runs format 6.
        (Caller::System, Command::RaiseClusterFormat { to: 6 }),
        // Format 7: two requests that arrived together, one of them a retry of an earlier
        // request (answered from memory), in one entry.
        (
            Caller::System,
            Command::Batch {
                envelopes: vec![
                    Envelope {
                        caller: Caller::Platform,
                        request_id: RequestId::parse("golden-batched").expect("id"),
                        at: at(43),
                        command: Command::GrantCredit { account: researcher, limit: cny(20_000) },
                    },
                    Envelope {
                        caller: Caller::Platform,
                        request_id: RequestId::parse("golden-8").expect("id"),
                        at: at(43),
                        command: Command::Deposit { account: researcher, amount: cny(5_000_000) },
                    },
                ],
            },
        ),
    ];
    list.into_iter()
        .enumerate()
        .map(|(i, (caller, command))| Envelope { caller, request_id: RequestId::parse(&format!("golden-{i}")).expect("id"), at: at(i as i64), command })
        .collect()
}

/// One event of every kind, with every optional part present.
fn events() -> Vec<Event> {
    let (account, node, cluster, lease, job) = (AccountId(2), NodeId(3), ClusterId(7), LeaseId(8), JobId(10));
    vec![
        Event::AccountRegistered { account, kind: AccountKind::Researcher },
        Event::SshKeyAdded { account },
        Event::NodeEnrolled { node, supplier: AccountId(1), cards: vec![CardId(5), CardId(6)] },
        Event::ClusterPublished { cluster, cpc: CpcId::for_cluster(cluster) },
        Event::ClusterModified { cluster, revision: 2 },
        Event::ClusterDelisted { cluster },
        Event::AgentEnrolled { node, supplier: AccountId(1), reenrolled: true },
        Event::AgentRevoked { node },
        Event::CardHealthChanged { card: CardId(5), from: CardHealth::Healthy, to: CardHealth::Lost },
        Event::CardStatusChanged { card: CardId(5), from: CardStatus::Idle, to: CardStatus::Reserved, lease: Some(lease) },
        Event::LeaseStateChanged { lease, from: Some(LeaseState::Requested), to: LeaseState::Ended, reason: Some(EndReason::ByOperator) },
        Event::LeaseExtended { lease, periods: 3, paid_until: Timestamp::from_millis(T0) },
        Event::AuthCodeRejected { lease, attempts_left: 4 },
        Event::JobStateChanged {
            job,
            owner: account,
            from: Some(JobState::Running),
            to: JobState::Failed,
            attempt: 1,
            reason: Some(JobEndReason::CardLost(CardId(5))),
        },
        Event::JobStopRequested { job, attempt: 1, reason: JobEndReason::StartFailed("no such program".into()) },
        Event::SchedulerLeaseChanged { holder: "scheduler-1".into(), epoch: 2 },
        Event::Ledger { transaction: 9, kind: TransactionKind::Charge, lease: Some(lease), account: Some(account) },
        Event::LeaseEvaluated { lease, supplier: AccountId(1), score: 97 },
        Event::SshKeyRemoved { account },
        Event::AccountTokenRotated { account },
        Event::RemoteLeaseChanged { remote: REMOTE_LEASE, researcher: account, state: RemoteLeaseState::Active },
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2).filter_map(|i| u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("formats").join(format!("v{FORMAT_VERSION}"))
}

/// Each record as a line: `<name> <hex>`.
fn lines<T: serde::Serialize>(records: &[(String, T)]) -> String {
    records.iter().map(|(name, r)| format!("{name} {}\n", hex(&postcard::to_allocvec(r).expect("encode")))).collect()
}

const FORMAT_CHANGED: &str = "the persisted encoding changed. Bump FORMAT_VERSION (broker/src/storage/mod.rs; and \
    WIRE_FORMAT_VERSION, as log entries travel between nodes in it), keep this directory as the previous format's fixtures, \
    and add a migration that reads them (issue 21)";

const RULES_CHANGED: &str = "replaying these pinned log entries now gives another outcome or state than the code that \
    wrote them: a rule changed. Replicas replaying an old log with this code would diverge from those running the old \
    code; apply the new rule only to entries after a version switch (or a log index), and regenerate these files only \
    with a FORMAT_VERSION bump";

fn compare(file: &str, now: &str, what_changed: &str) {
    let path = dir().join(file);
    if std::env::var("SUANLI_REGENERATE").as_deref() == Ok("1") {
        std::fs::create_dir_all(dir()).expect("formats dir");
        std::fs::write(&path, now).expect("write fixture");
        return;
    }
    let pinned =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (SUANLI_REGENERATE=1 writes it, for a new format version only)", path.display()));
    for (n, (was, is)) in pinned.lines().zip(now.lines()).enumerate() {
        assert_eq!(was, is, "{}:{}: {what_changed}", path.display(), n + 1);
    }
    assert_eq!(pinned.lines().count(), now.lines().count(), "{}: records were added or removed: {what_changed}", path.display());
}

#[test]
fn every_command_and_event_has_a_pinned_sample() {
    let mut seen = [false; COMMAND_KINDS];
    for e in commands() {
        seen[command_kind(&e.command)] = true;
    }
    assert!(seen.iter().all(|s| *s), "a command without a sample: {seen:?}");
    let mut seen = [false; EVENT_KINDS];
    for e in events() {
        seen[event_kind(&e)] = true;
    }
    assert!(seen.iter().all(|s| *s), "an event without a sample: {seen:?}");
}

#[test]
fn log_entries_and_their_digests_keep_their_bytes() {
    let envelopes = commands();
    let records: Vec<(String, &Envelope)> = envelopes.iter().map(|e| (e.command.name().to_owned(), e)).collect();
    compare("commands.txt", &lines(&records), FORMAT_CHANGED);
    let digests: String = envelopes.iter().map(|e| format!("{} {}\n", e.command.name(), hex(&super::machine::digest(&e.command)))).collect();
    compare("digests.txt", &digests, FORMAT_CHANGED);
    // What is pinned still reads back as the same values.
    let pinned = std::fs::read_to_string(dir().join("commands.txt")).expect("fixture");
    for (line, envelope) in pinned.lines().zip(&envelopes) {
        let bytes = unhex(line.split_once(' ').map_or("", |(_, h)| h));
        assert_eq!(&postcard::from_bytes::<Envelope>(&bytes).expect("decodes"), envelope);
    }
}

#[test]
fn events_keep_their_bytes() {
    let applied = AppliedEvents { index: 12, at: Timestamp::from_millis(T0), events: events() };
    let records: Vec<(String, Event)> = applied.events.iter().map(|e| (format!("event-{}", event_kind(e)), e.clone())).collect();
    compare("events.txt", &format!("{}{}", lines(&records), lines(&[("applied".to_owned(), &applied)])), FORMAT_CHANGED);
}

#[test]
fn the_state_a_snapshot_holds_keeps_its_bytes() {
    // The format alone: the pinned state decodes and encodes back to the same bytes.
    let pinned = std::fs::read_to_string(dir().join("state.txt")).expect("fixture");
    let bytes = unhex(pinned.split_once(' ').map_or("", |(_, h)| h.trim()));
    let state: State = postcard::from_bytes(&bytes).unwrap_or_else(|e| panic!("state.txt no longer decodes ({e}): {FORMAT_CHANGED}"));
    assert!(postcard::to_allocvec(&state).expect("encode") == bytes, "state.txt encodes back differently: {FORMAT_CHANGED}");
}

fn replay(envelopes: &[Envelope]) -> (State, String) {
    let mut state = State::new();
    let mut outcomes = String::new();
    for envelope in envelopes {
        let (outcome, _) = state.apply(envelope);
        let _ = writeln!(
            outcomes,
            "{} {}",
            envelope.command.name(),
            match &outcome {
                Ok(_) => "ok".to_owned(),
                Err(e) => format!("{:?}", e.code()),
            }
        );
    }
    (state, outcomes)
}

#[test]
fn replaying_the_pinned_log_reaches_the_pinned_state() {
    let (mut state, outcomes) = replay(&commands());
    // The samples were written for this scenario: most commands succeed.
    compare("outcomes.txt", &outcomes, RULES_CHANGED);
    compare("state.txt", &lines(&[("state".to_owned(), &state)]), RULES_CHANGED);
    // What it archived, as the archive column family stores it (key, then value).
    let archived = state.take_archived();
    assert!(archived.len() >= 2, "the sample archives the lease and the job: {archived:?}");
    let pairs: String =
        archived.iter().flat_map(|r| crate::storage::archive::encode(r).expect("encode")).map(|(k, v)| format!("{} {}\n", hex(&k), hex(&v))).collect();
    compare("archive.txt", &pairs, FORMAT_CHANGED);
}

// ---- migrations: the fixtures earlier formats wrote, read by this code --------------------------

fn fixture_lines(version: u32, file: &str) -> Vec<(String, Vec<u8>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("formats").join(format!("v{version}")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().map(|l| l.split_once(' ').map(|(n, h)| (n.to_owned(), unhex(h.trim()))).expect("a `name hex` line")).collect()
}

/// Format 3's samples: the first of this format's.
const FORMAT_3_SAMPLES: usize = 38;
/// Format 4's samples: format 3's and `ArchiveEnded`.
const FORMAT_4_SAMPLES: usize = 39;
/// Format 5's samples: format 4's and the three remote-lease commands.
const FORMAT_5_SAMPLES: usize = 42;
/// Format 6's samples: format 5's and `RaiseClusterFormat`.
const FORMAT_6_SAMPLES: usize = 43;

/// An earlier format's log entries and events are this format's: the commands it knew are the
/// first ones, its events the first events.
fn earlier_log_entries_read_as_the_same_commands(version: u32, samples: usize) {
    let pinned = fixture_lines(version, "commands.txt");
    let now = commands();
    assert_eq!(pinned.len(), samples);
    for ((name, bytes), envelope) in pinned.iter().zip(&now) {
        let read: Envelope = postcard::from_bytes(bytes).unwrap_or_else(|e| panic!("format {version} {name} no longer decodes: {e}"));
        assert_eq!(&read, envelope, "format {version} {name}");
    }
    for ((name, bytes), event) in fixture_lines(version, "events.txt").iter().zip(events()) {
        if name.starts_with("event-") {
            assert_eq!(postcard::from_bytes::<Event>(bytes).expect("an earlier event decodes"), event, "format {version} {name}");
        }
    }
}

#[test]
fn format_3_log_entries_read_as_the_same_commands() {
    earlier_log_entries_read_as_the_same_commands(3, FORMAT_3_SAMPLES);
}

#[test]
fn format_4_log_entries_read_as_the_same_commands() {
    earlier_log_entries_read_as_the_same_commands(4, FORMAT_4_SAMPLES);
}

#[test]
fn format_5_log_entries_read_as_the_same_commands() {
    earlier_log_entries_read_as_the_same_commands(5, FORMAT_5_SAMPLES);
}

#[test]
fn format_6_log_entries_read_as_the_same_commands() {
    earlier_log_entries_read_as_the_same_commands(6, FORMAT_6_SAMPLES);
}

/// Format 7 added a command and changed no stored type: format 6's snapshot state is this
/// format's state, byte for byte, and the state this code replays from format 6's log.
#[test]
fn a_format_6_state_is_this_formats_state_byte_for_byte() {
    let (_, bytes) = fixture_lines(6, "state.txt").remove(0);
    let state: State = postcard::from_bytes(&bytes).expect("format 6's state decodes as this format's");
    let (mut replayed, _) = replay(&commands()[..FORMAT_6_SAMPLES]);
    replayed.take_archived();
    assert_eq!(state, replayed);
    assert!(postcard::to_allocvec(&state).expect("encode") == bytes, "and encodes back to format 6's bytes");
    for file in ["archive.txt", "events.txt"] {
        assert_eq!(fixture_lines(6, file), fixture_lines(FORMAT_VERSION, file), "format 6's {file} is this format's");
    }
}

/// Format 5's snapshot state, migrated, is the state this code reaches from format 5's log (at
/// cluster format 5), and encodes back to format 5's very bytes: what this code sends a node
/// of format 5 during a rolling upgrade is what that node wrote itself.
#[test]
fn a_format_5_state_migrates_to_the_state_this_code_replays_and_encodes_back_to_format_5s_bytes() {
    let (migrated, bytes) = migrates_to_the_replayed_state::<super::machine::format_v5::StateV5>(5, FORMAT_5_SAMPLES);
    assert_eq!(migrated.cluster_format(), 5, "a state format 5 wrote is at cluster format 5");
    assert!(migrated.encode_as_format_5().expect("encode") == bytes, "format 5's state must encode back to its bytes");
}

/// An earlier format's pinned snapshot state, read as that format's `Old` state and migrated, is
/// the state this code reaches by replaying that format's `samples` log entries, and keeps
/// every invariant; its bytes do not pass for this format's state (the version check is
/// needed). Returns the migrated state and the pinned bytes.
fn migrates_to_the_replayed_state<Old: serde::de::DeserializeOwned + Into<State>>(format: u32, samples: usize) -> (State, Vec<u8>) {
    let (_, bytes) = fixture_lines(format, "state.txt").remove(0);
    let old: Old = postcard::from_bytes(&bytes).unwrap_or_else(|e| panic!("format {format} state decodes as that format's: {e}"));
    let migrated: State = old.into();
    let (mut replayed, _) = replay(&commands()[..samples]);
    replayed.take_archived();
    assert_eq!(migrated, replayed);
    migrated.check_invariants().expect("invariants");
    assert!(postcard::from_bytes::<State>(&bytes).is_err(), "a format {format} state must not pass for this format");
    (migrated, bytes)
}

/// The cluster format only rises, and only the leader raises it.
#[test]
fn the_cluster_format_is_raised_by_the_leader_alone_and_never_lowered() {
    let mut state = State::new();
    assert_eq!(state.cluster_format(), 5, "every cluster starts at the first cluster format");
    let raise = |caller: Caller, to: u32, id: &str| Envelope {
        caller,
        request_id: RequestId::parse(id).expect("id"),
        at: Timestamp::from_millis(T0),
        command: Command::RaiseClusterFormat { to },
    };
    for (n, caller) in [Caller::Platform, Caller::Account(AccountId(1))].into_iter().enumerate() {
        let (outcome, _) = state.apply(&raise(caller, 6, &format!("not-the-leader-{n}")));
        assert!(outcome.is_err(), "only the leader raises the cluster format");
        assert_eq!(state.cluster_format(), 5, "nothing changed");
    }
    state.apply(&raise(Caller::System, 6, "raise-6")).0.expect("raised");
    assert_eq!(state.cluster_format(), 6);
    state.apply(&raise(Caller::System, 5, "lower-5")).0.expect("a no-op");
    assert_eq!(state.cluster_format(), 6, "never lowered");
}

/// Format 4's snapshot state, migrated, is the state this code reaches from format 4's log, and
/// keeps every invariant; format 4's bytes do not pass for this format's.
#[test]
fn a_format_4_state_migrates_to_the_state_this_code_replays() {
    migrates_to_the_replayed_state::<super::machine::format_v4::StateV4>(4, FORMAT_4_SAMPLES);
}

#[test]
fn a_format_3_state_migrates_to_the_state_this_code_replays() {
    let (migrated, _) = migrates_to_the_replayed_state::<super::machine::format_v3::StateV3>(3, FORMAT_3_SAMPLES);
    assert_eq!(migrated.ledger_archived(), 0);
}
