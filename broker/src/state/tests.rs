//! State machine tests: each rule by example, then the invariants under random command
//! sequences (proptest).

use proptest::prelude::*;
use suanli_types::{
    AccountId, AccountKind, BillingMode, Caller, CardHealth, CardId, CardStatus, CatalogueFilter, ClusterClass, ClusterId, Currency, DomainError, EndReason,
    ErrorCode, JobEndReason, JobId, JobSpec, JobState, LeaseAction, LeaseId, LeaseState, LeaseUnit, LedgerAccount, Listing, Money, NodeId, NodeInventory,
    OperatorRole, PageRequest, RemoteLeaseState, RequestId, SecretHash, SshPublicKey, SupplierEndReason, Timestamp, TransactionKind,
};

use suanli_testkit::fixtures;

use super::*;

const T0: i64 = 1_800_000_000_000;
/// What each researcher of the test market has paid in: enough for a few leases, not for all.
const FUNDS: i64 = 5_000_000;

struct World {
    state: State,
    now: Timestamp,
    seq: u64,
    /// Every envelope applied, in order (the log, for tests that replay it into a store).
    log: Vec<Envelope>,
}

struct Market {
    w: World,
    supplier: AccountId,
    other_supplier: AccountId,
    researcher: AccountId,
    other_researcher: AccountId,
    class_a: ClusterId,
    class_a_nodes: Vec<NodeId>,
    class_b: ClusterId,
}

fn code_hash(lease: LeaseId, code: &str) -> SecretHash {
    SecretHash::of(&format!("auth-code:{lease}"), code)
}

fn listing(class: ClusterClass) -> Listing {
    fixtures::listing(class)
}

fn inventory(cards: u32) -> NodeInventory {
    fixtures::inventory("gpu", cards)
}

impl World {
    fn new() -> Self {
        World { state: State::new(), now: Timestamp::from_millis(T0), seq: 0, log: Vec::new() }
    }

    fn envelope(&mut self, caller: Caller, command: Command) -> Envelope {
        self.seq += 1;
        let request_id = RequestId::parse(&format!("req-{}", self.seq)).expect("valid id");
        Envelope { caller, request_id, at: self.now, command }
    }

    fn run(&mut self, caller: Caller, command: Command) -> Outcome {
        let env = self.envelope(caller, command);
        let outcome = self.state.apply(&env).0;
        self.log.push(env);
        outcome
    }

    fn ok(&mut self, caller: Caller, command: Command) -> Response {
        let name = command.name();
        self.run(caller, command).unwrap_or_else(|e| panic!("{name} failed: {e}"))
    }

    fn lease(&mut self, caller: Caller, command: Command) -> Lease {
        match self.ok(caller, command) {
            Response::Lease(l) => *l,
            other => panic!("expected a lease, got {other:?}"),
        }
    }

    fn account(&mut self, kind: AccountKind) -> AccountId {
        let token_hash = SecretHash::of("api-token", &format!("token-{}", self.seq));
        match self.ok(Caller::Platform, Command::RegisterAccount { kind, token_hash }) {
            Response::Account(id) => id,
            other => panic!("{other:?}"),
        }
    }

    fn node(&mut self, supplier: AccountId, cards: u32) -> NodeId {
        match self.ok(Caller::Account(supplier), Command::EnrollNode { inventory: inventory(cards) }) {
            Response::Node(n) => n.id,
            other => panic!("{other:?}"),
        }
    }

    fn cluster(&mut self, supplier: AccountId, class: ClusterClass, nodes: Vec<NodeId>) -> ClusterId {
        let command = Command::PublishCluster { class, nodes, listing: listing(class) };
        match self.ok(Caller::Account(supplier), command) {
            Response::Cluster(c) => c.id,
            other => panic!("{other:?}"),
        }
    }

    fn advance(&mut self, seconds: i64) {
        self.now = self.now.plus_seconds(seconds);
    }

    fn card_statuses(&self, lease: LeaseId) -> Vec<CardStatus> {
        let l = self.state.lease(lease).expect("lease");
        l.cards.iter().map(|c| self.state.card(*c).expect("card").status).collect()
    }
}

/// Class A: two nodes of 2 cards. Class B: two nodes of 4 cards.
fn market() -> Market {
    let mut w = World::new();
    let supplier = w.account(AccountKind::Supplier);
    let other_supplier = w.account(AccountKind::Supplier);
    let researcher = w.account(AccountKind::Researcher);
    let other_researcher = w.account(AccountKind::Researcher);
    let class_a_nodes = vec![w.node(supplier, 2), w.node(supplier, 2)];
    let class_a = w.cluster(supplier, ClusterClass::A, class_a_nodes.clone());
    let b_nodes = vec![w.node(supplier, 4), w.node(supplier, 4)];
    let class_b = w.cluster(supplier, ClusterClass::B, b_nodes);
    for r in [researcher, other_researcher] {
        w.ok(Caller::Platform, Command::Deposit { account: r, amount: Money::new(Currency::cny(), FUNDS) });
    }
    Market { w, supplier, other_supplier, researcher, other_researcher, class_a, class_a_nodes, class_b }
}

fn request_b(cluster: ClusterId, cards: u32) -> Command {
    Command::RequestLease { cluster, unit: LeaseUnit::Cards(cards), billing_mode: BillingMode::Hourly, periods: 2 }
}

fn request_a(cluster: ClusterId, nodes: Vec<NodeId>) -> Command {
    Command::RequestLease { cluster, unit: LeaseUnit::Nodes(nodes), billing_mode: BillingMode::Monthly, periods: 1 }
}

fn code(err: Outcome) -> ErrorCode {
    err.expect_err("expected a rejection").code()
}

#[test]
fn class_b_lease_reserves_then_activates_then_ends() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let l = m.w.lease(r.clone(), request_b(m.class_b, 3));
    assert_eq!(l.state, LeaseState::Requested);
    assert_eq!(l.amount.minor, fixtures::HOURLY_PRICE * 3 * 2, "price × cards × periods");
    assert_eq!(m.w.card_statuses(l.id), vec![CardStatus::Reserved; 3]);
    // Packed onto one node so the other stays whole.
    let nodes: std::collections::BTreeSet<_> = l.cards.iter().map(|c| m.w.state.card(*c).expect("card").node).collect();
    assert_eq!(nodes.len(), 1);

    m.w.advance(60);
    let l = m.w.lease(Caller::Account(m.supplier), Command::ActivateLease { lease: l.id });
    assert_eq!(l.state, LeaseState::Active);
    assert_eq!(l.paid_until, Some(m.w.now.plus_seconds(2 * 3600)));
    assert_eq!(m.w.card_statuses(l.id), vec![CardStatus::Busy; 3]);

    let l = m.w.lease(r.clone(), Command::ExtendLease { lease: l.id, periods: 3 });
    assert_eq!((l.periods, l.amount.minor), (5, fixtures::HOURLY_PRICE * 3 * 5));
    assert_eq!(l.paid_until, Some(m.w.now.plus_seconds(5 * 3600)));

    let l = m.w.lease(r, Command::EndLease { lease: l.id, reason: EndReason::ByResearcher });
    assert_eq!(l.state, LeaseState::Ended);
    assert_eq!(m.w.card_statuses(l.id), vec![CardStatus::Idle; 3]);
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn class_a_lease_needs_approval_and_the_right_code() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let s = Caller::Account(m.supplier);
    let l = m.w.lease(r.clone(), request_a(m.class_a, vec![m.class_a_nodes[0]]));
    assert_eq!(l.cards.len(), 2, "a Class A lease takes every card of the node");
    assert_eq!(code(m.w.run(s.clone(), Command::ActivateLease { lease: l.id })), ErrorCode::InvalidTransition);
    let expires = m.w.now.plus_seconds(3600);
    let approve = Command::ApproveLease { lease: l.id, code_hash: code_hash(l.id, "RIGHT"), code_expires_at: expires };
    assert_eq!(m.w.lease(s, approve).state, LeaseState::Approved);
    assert_eq!(m.w.card_statuses(l.id), vec![CardStatus::Reserved; 2], "not busy before verification");

    let wrong = Command::VerifyAuthCode { lease: l.id, candidate_hash: code_hash(l.id, "WRONG") };
    assert_eq!(m.w.run(r.clone(), wrong), Err(DomainError::AuthCodeMismatch { attempts_left: rules::AUTH_CODE_ATTEMPTS - 1 }));
    let right = Command::VerifyAuthCode { lease: l.id, candidate_hash: code_hash(l.id, "RIGHT") };
    let l = m.w.lease(r, right);
    assert_eq!(l.state, LeaseState::Active);
    assert!(l.auth_code.is_none(), "single use: the code is gone once used");
    assert_eq!(m.w.card_statuses(l.id), vec![CardStatus::Busy; 2]);
}

#[test]
fn exhausting_code_attempts_cancels_the_lease_and_frees_the_cards() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let l = m.w.lease(r.clone(), request_a(m.class_a, vec![m.class_a_nodes[1]]));
    let approve = Command::ApproveLease { lease: l.id, code_hash: code_hash(l.id, "RIGHT"), code_expires_at: m.w.now.plus_seconds(60) };
    m.w.ok(Caller::Account(m.supplier), approve);
    for left in (1..rules::AUTH_CODE_ATTEMPTS).rev() {
        let wrong = Command::VerifyAuthCode { lease: l.id, candidate_hash: code_hash(l.id, "WRONG") };
        assert_eq!(m.w.run(r.clone(), wrong), Err(DomainError::AuthCodeMismatch { attempts_left: left }));
    }
    let wrong = Command::VerifyAuthCode { lease: l.id, candidate_hash: code_hash(l.id, "WRONG") };
    assert_eq!(m.w.run(r.clone(), wrong), Err(DomainError::AuthCodeAttemptsExhausted));
    assert_eq!(m.w.state.lease(l.id).map(|l| l.state), Some(LeaseState::Cancelled));
    assert_eq!(m.w.card_statuses(l.id), vec![CardStatus::Idle; 2]);
    let right = Command::VerifyAuthCode { lease: l.id, candidate_hash: code_hash(l.id, "RIGHT") };
    assert_eq!(code(m.w.run(r, right)), ErrorCode::InvalidTransition);
}

#[test]
fn an_expired_code_is_refused_and_costs_nothing() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let l = m.w.lease(r.clone(), request_a(m.class_a, vec![m.class_a_nodes[0]]));
    let approve = Command::ApproveLease { lease: l.id, code_hash: code_hash(l.id, "C"), code_expires_at: m.w.now.plus_seconds(60) };
    m.w.ok(Caller::Account(m.supplier), approve);
    m.w.advance(61);
    let before = m.w.state.market();
    let verify = Command::VerifyAuthCode { lease: l.id, candidate_hash: code_hash(l.id, "C") };
    assert_eq!(m.w.run(r, verify), Err(DomainError::AuthCodeExpired));
    assert_eq!(m.w.state.market(), before);
}

#[test]
fn strangers_cannot_approve_verify_extend_or_end() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let l = m.w.lease(r.clone(), request_a(m.class_a, vec![m.class_a_nodes[0]]));
    let before = m.w.state.market();
    let approve = |lease| Command::ApproveLease { lease, code_hash: code_hash(lease, "X"), code_expires_at: Timestamp(T0 + 1000) };
    let verify = |lease| Command::VerifyAuthCode { lease, candidate_hash: code_hash(lease, "X") };
    let cases: Vec<(Caller, Command, ErrorCode)> = vec![
        (Caller::Account(m.other_supplier), approve(l.id), ErrorCode::NotFound),
        (r.clone(), approve(l.id), ErrorCode::PermissionDenied),
        (Caller::Account(m.other_researcher), verify(l.id), ErrorCode::NotFound),
        (Caller::Account(m.supplier), verify(l.id), ErrorCode::PermissionDenied),
        (Caller::Account(m.other_researcher), Command::ExtendLease { lease: l.id, periods: 1 }, ErrorCode::NotFound),
        (Caller::Account(m.other_researcher), Command::EndLease { lease: l.id, reason: EndReason::ByResearcher }, ErrorCode::NotFound),
        (
            Caller::Account(m.other_supplier),
            Command::EndLease { lease: l.id, reason: EndReason::BySupplier(SupplierEndReason::Maintenance) },
            ErrorCode::NotFound,
        ),
        (
            Caller::Account(m.researcher),
            Command::EndLease { lease: l.id, reason: EndReason::BySupplier(SupplierEndReason::Maintenance) },
            ErrorCode::PermissionDenied,
        ),
        (Caller::Operator(OperatorRole::Auditor), Command::EndLease { lease: l.id, reason: EndReason::ByOperator }, ErrorCode::PermissionDenied),
        (Caller::Platform, Command::ExpireLease { lease: l.id }, ErrorCode::PermissionDenied),
        (Caller::Account(m.other_supplier), Command::DelistCluster { cluster: m.class_a }, ErrorCode::PermissionDenied),
        (Caller::Account(m.researcher), Command::EnrollNode { inventory: inventory(1) }, ErrorCode::WrongAccountKind),
        (Caller::Account(m.supplier), request_b(m.class_b, 1), ErrorCode::WrongAccountKind),
        (Caller::Account(m.researcher), Command::RegisterAccount { kind: AccountKind::Supplier, token_hash: SecretHash([7; 32]) }, ErrorCode::PermissionDenied),
    ];
    for (caller, command, want) in cases {
        let name = command.name();
        assert_eq!(code(m.w.run(caller.clone(), command)), want, "{name} by {caller}");
        assert_eq!(m.w.state.market(), before, "{name} by {caller} changed the state");
    }
    // The rightful parties still can.
    let l = m.w.lease(Caller::Operator(OperatorRole::Dispatcher), Command::EndLease { lease: l.id, reason: EndReason::ByOperator });
    assert_eq!(l.state, LeaseState::Cancelled);
}

#[test]
fn a_card_is_never_leased_twice() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let r2 = Caller::Account(m.other_researcher);
    m.w.lease(r.clone(), request_a(m.class_a, vec![m.class_a_nodes[0]]));
    let err = m.w.run(r2.clone(), request_a(m.class_a, vec![m.class_a_nodes[0], m.class_a_nodes[1]]));
    assert_eq!(code(err), ErrorCode::CardUnavailable);
    m.w.lease(r.clone(), request_b(m.class_b, 5));
    assert_eq!(m.w.run(r2.clone(), request_b(m.class_b, 4)), Err(DomainError::InsufficientCapacity { cluster: m.class_b, requested: 4, available: 3 }));
    m.w.lease(r2, request_b(m.class_b, 3));
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn delisted_clusters_take_no_new_lease() {
    let mut m = market();
    m.w.ok(Caller::Account(m.supplier), Command::DelistCluster { cluster: m.class_b });
    assert_eq!(m.w.run(Caller::Account(m.researcher), request_b(m.class_b, 1)), Err(DomainError::ClusterDelisted(m.class_b)));
}

#[test]
fn retries_apply_at_most_once_and_reused_ids_conflict() {
    let mut m = market();
    let env = m.w.envelope(Caller::Account(m.researcher), request_b(m.class_b, 2));
    let (first, events) = m.w.state.apply(&env);
    assert!(!events.is_empty());
    let leases = m.w.state.leases().count();
    let (again, events) = m.w.state.apply(&env);
    assert_eq!(again, first);
    assert!(events.is_empty());
    assert_eq!(m.w.state.leases().count(), leases, "the retry did not lease more cards");

    let mut other = env.clone();
    other.command = request_b(m.class_b, 1);
    assert_eq!(m.w.state.apply(&other).0, Err(DomainError::RequestIdConflict));
    // The same ID from another caller is a different request.
    let mut theirs = env.clone();
    theirs.caller = Caller::Account(m.other_researcher);
    assert!(m.w.state.apply(&theirs).0.is_ok());

    // Remembered for the retention window and the latest requests, then forgotten.
    m.w.advance(rules::REQUEST_ID_RETENTION_SECONDS + 1);
    let mut late = env.clone();
    late.at = m.w.now;
    late.command = request_b(m.class_b, 1);
    fill_request_memory(&mut m.w);
    assert!(m.w.state.apply(&late).0.is_ok());
}

/// As many other requests as the at-most-once memory keeps at least.
fn fill_request_memory(w: &mut World) {
    for _ in 0..rules::REQUESTS_REMEMBERED_AT_LEAST {
        let _ = w.run(Caller::System, Command::ExpireLease { lease: LeaseId(u64::MAX) });
    }
}

#[test]
fn a_clock_a_day_ahead_does_not_empty_the_at_most_once_memory() {
    let mut m = market();
    let env = m.w.envelope(Caller::Account(m.researcher), request_b(m.class_b, 1));
    let first = m.w.state.apply(&env).0;
    assert!(first.is_ok());
    let leases = m.w.state.leases().count();
    // The next command comes from a leader whose clock jumped past the retention window.
    m.w.advance(rules::REQUEST_ID_RETENTION_SECONDS + 3600);
    let _ = m.w.run(Caller::System, Command::ExpireLease { lease: LeaseId(u64::MAX) });
    let mut retry = env.clone();
    retry.at = m.w.now;
    assert_eq!(m.w.state.apply(&retry).0, first, "the retry still gets the first answer");
    assert_eq!(m.w.state.leases().count(), leases, "and leases nothing more");
}

#[test]
fn command_time_never_runs_backwards() {
    let mut m = market();
    let l = m.w.lease(Caller::Account(m.researcher), request_b(m.class_b, 1));
    let applied_at = m.w.now;
    // A new leader whose clock is an hour behind proposes next.
    assert_eq!(m.w.state.command_time(applied_at.plus_seconds(-3600)), applied_at);
    let mut late = m.w.envelope(Caller::Account(m.researcher), Command::EndLease { lease: l.id, reason: EndReason::ByResearcher });
    late.at = applied_at.plus_seconds(-3600);
    let _ = m.w.state.apply(&late);
    assert_eq!(m.w.state.command_time(Timestamp::from_millis(0)), applied_at, "its command counted as applied at the last time");
}

#[test]
fn a_retry_is_recognised_though_the_service_minted_a_new_secret_for_it() {
    let mut m = market();
    let l = m.w.lease(Caller::Account(m.researcher), request_a(m.class_a, vec![m.class_a_nodes[0]]));
    let mut approve = m.w.envelope(
        Caller::Account(m.supplier),
        Command::ApproveLease { lease: l.id, code_hash: code_hash(l.id, "FIRST"), code_expires_at: m.w.now.plus_seconds(60) },
    );
    let (first, _) = m.w.state.apply(&approve);
    approve.command = Command::ApproveLease { lease: l.id, code_hash: code_hash(l.id, "SECOND"), code_expires_at: m.w.now.plus_seconds(90) };
    let (again, events) = m.w.state.apply(&approve);
    assert_eq!(again, first, "the retry returns the first answer");
    assert!(events.is_empty());
    let stored = m.w.state.lease(l.id).and_then(|l| l.auth_code.clone()).expect("code");
    assert!(stored.hash.matches(&code_hash(l.id, "FIRST")), "the first code stays the valid one");
    // Approving a different lease under the same request ID is still a conflict.
    approve.command = Command::ApproveLease { lease: LeaseId(l.id.0 + 1), code_hash: code_hash(l.id, "X"), code_expires_at: m.w.now };
    assert_eq!(m.w.state.apply(&approve).0, Err(DomainError::RequestIdConflict));
}

#[test]
fn bad_input_is_refused_field_by_field_and_changes_nothing() {
    let mut m = market();
    let s = Caller::Account(m.supplier);
    let r = Caller::Account(m.researcher);
    let before = m.w.state.market();
    let mut bad = listing(ClusterClass::A);
    bad.title.clear();
    bad.prices.per_card.insert(BillingMode::Daily, -100);
    bad.usage_instructions.clear();
    let err = m.w.run(s.clone(), Command::ModifyCluster { cluster: m.class_a, listing: bad }).expect_err("invalid");
    let fields: Vec<_> = err.field_errors().iter().map(|f| f.field.as_str()).collect();
    assert_eq!(fields, ["title", "prices.daily", "usage_instructions"]);
    assert_eq!(code(m.w.run(r.clone(), request_b(ClusterId(999), 1))), ErrorCode::NotFound);
    let zero_periods = Command::RequestLease { cluster: m.class_b, unit: LeaseUnit::Cards(1), billing_mode: BillingMode::Hourly, periods: 0 };
    assert_eq!(code(m.w.run(r.clone(), zero_periods)), ErrorCode::InvalidArgument);
    let yearly = Command::RequestLease { cluster: m.class_b, unit: LeaseUnit::Cards(1), billing_mode: BillingMode::Yearly, periods: 1 };
    assert_eq!(m.w.run(r.clone(), yearly), Err(DomainError::BillingModeNotOffered(BillingMode::Yearly)));
    assert_eq!(code(m.w.run(r.clone(), request_a(m.class_b, vec![m.class_a_nodes[0]]))), ErrorCode::InvalidArgument);
    assert_eq!(code(m.w.run(r.clone(), request_a(m.class_a, vec![NodeId(4242)]))), ErrorCode::NodeNotInCluster);
    assert_eq!(code(m.w.run(r, request_b(m.class_b, 0))), ErrorCode::InvalidArgument);
    assert_eq!(
        code(m.w.run(s.clone(), Command::PublishCluster { class: ClusterClass::B, nodes: m.class_a_nodes.clone(), listing: listing(ClusterClass::B) })),
        ErrorCode::NodeInUse
    );
    assert_eq!(code(m.w.run(s, Command::SetCardStatus { card: CardId(1_000_000), status: CardStatus::Offline })), ErrorCode::NotFound);
    assert_eq!(m.w.state.market(), before);
}

#[test]
fn the_reaper_expires_only_what_is_due() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let reserved = m.w.lease(r.clone(), request_b(m.class_b, 1));
    let active = m.w.lease(r, request_b(m.class_b, 1));
    m.w.ok(Caller::Account(m.supplier), Command::ActivateLease { lease: active.id });
    assert_eq!(m.w.run(Caller::System, Command::ExpireLease { lease: reserved.id }), Err(DomainError::NotYetDue));
    assert!(m.w.state.due_for_expiry(m.w.now).is_empty());

    m.w.advance(rules::RESERVATION_SECONDS_CLASS_B);
    assert_eq!(m.w.state.due_for_expiry(m.w.now), vec![reserved.id]);
    let l = m.w.lease(Caller::System, Command::ExpireLease { lease: reserved.id });
    assert_eq!((l.state, l.end_reason), (LeaseState::Cancelled, Some(EndReason::ReservationTimedOut)));

    m.w.advance(2 * 3600);
    assert_eq!(m.w.state.due_for_expiry(m.w.now), vec![active.id]);
    let l = m.w.lease(Caller::System, Command::ExpireLease { lease: active.id });
    assert_eq!((l.state, l.end_reason), (LeaseState::Expired, Some(EndReason::TermElapsed)));
    assert_eq!(m.w.card_statuses(active.id), vec![CardStatus::Idle]);
}

#[test]
fn card_status_is_the_suppliers_but_not_while_leased() {
    let mut m = market();
    let l = m.w.lease(Caller::Account(m.researcher), request_b(m.class_b, 1));
    let leased = l.cards[0];
    let s = Caller::Account(m.supplier);
    assert_eq!(code(m.w.run(s.clone(), Command::SetCardStatus { card: leased, status: CardStatus::Offline })), ErrorCode::CardUnavailable);
    assert_eq!(code(m.w.run(s.clone(), Command::SetCardStatus { card: leased, status: CardStatus::Busy })), ErrorCode::InvalidArgument);
    let free = m.w.state.cards_of_cluster(m.class_b).iter().find(|c| c.lease.is_none()).map(|c| c.id).expect("free card");
    assert_eq!(
        code(m.w.run(Caller::Account(m.other_supplier), Command::SetCardStatus { card: free, status: CardStatus::Faulty })),
        ErrorCode::PermissionDenied
    );
    m.w.ok(s, Command::SetCardStatus { card: free, status: CardStatus::Faulty });
    let idle = m.w.state.summary(m.w.state.cluster(m.class_b).expect("cluster")).idle_cards;
    assert_eq!(idle, 6, "8 cards, one reserved, one faulty");
}

#[test]
fn snapshots_round_trip() {
    let mut m = market();
    m.w.lease(Caller::Account(m.researcher), request_b(m.class_b, 2));
    let bytes = postcard::to_allocvec(&m.w.state).expect("serialize");
    let back: State = postcard::from_bytes(&bytes).expect("deserialize");
    assert_eq!(back, m.w.state);
}

// ---- agents and card health --------------------------------------------------------------------

fn enroll(w: &mut World, token: &str, credential: &str, inv: NodeInventory) -> Outcome {
    let token_hash = SecretHash::of("enrollment-token", token);
    let command = Command::EnrollAgent { token_hash, credential_hash: SecretHash::of("api-token", credential), inventory: inv };
    w.run(Caller::Enrollee(token_hash), command)
}

#[test]
fn an_enrollees_request_ids_are_its_own_and_its_token_only_its_own() {
    let mut w = World::new();
    let supplier = w.account(AccountKind::Supplier);
    issue(&mut w, supplier, "mine", 600).expect("token");
    let (mine, theirs) = (SecretHash::of("enrollment-token", "mine"), SecretHash::of("enrollment-token", "theirs"));
    let request_id = RequestId::parse("expire-1-active").expect("id");
    let enroll_with = |caller: Caller| Envelope {
        caller,
        request_id: request_id.clone(),
        at: w.now,
        command: Command::EnrollAgent { token_hash: mine, credential_hash: SecretHash::of("api-token", "c"), inventory: inventory(1) },
    };
    // Another token's holder (or anyone naming a hash it does not hold) cannot use this token.
    let (stolen, ours) = (enroll_with(Caller::Enrollee(theirs)), enroll_with(Caller::Enrollee(mine)));
    assert_eq!(w.state.apply(&stolen).0.unwrap_err().code(), ErrorCode::PermissionDenied);
    assert!(w.state.apply(&ours).0.is_ok());
    // The broker's own request with the same ID is still its own: applied, not a conflict.
    let expire = Envelope { caller: Caller::System, request_id, at: w.now, command: Command::ExpireLease { lease: LeaseId(1) } };
    assert_ne!(w.state.apply(&expire).0.unwrap_err(), DomainError::RequestIdConflict);
}

fn issue(w: &mut World, supplier: AccountId, token: &str, seconds: i64) -> Outcome {
    let command = Command::IssueEnrollmentToken { token_hash: SecretHash::of("enrollment-token", token), expires_at: w.now.plus_seconds(seconds) };
    w.run(Caller::Account(supplier), command)
}

#[test]
fn enrollment_tokens_work_once_before_they_expire_and_reinstalls_keep_the_node() {
    let mut w = World::new();
    let supplier = w.account(AccountKind::Supplier);
    let researcher = w.account(AccountKind::Researcher);
    assert_eq!(issue(&mut w, researcher, "t0", 600).unwrap_err().code(), ErrorCode::WrongAccountKind);
    assert_eq!(issue(&mut w, supplier, "t0", rules::ENROLLMENT_TOKEN_MAX_SECONDS + 1).unwrap_err().code(), ErrorCode::InvalidArgument);
    issue(&mut w, supplier, "t1", 600).expect("token");
    let Response::Node(node) = enroll(&mut w, "t1", "cred-1", inventory(2)).expect("enrolled") else { panic!() };
    assert_eq!(node.supplier, supplier);
    assert_eq!(w.state.node_by_agent_credential(&SecretHash::of("api-token", "cred-1")), Some(node.id));
    // Used, unknown, expired.
    assert_eq!(enroll(&mut w, "t1", "cred-2", inventory(2)).unwrap_err().code(), ErrorCode::Unauthenticated);
    assert_eq!(enroll(&mut w, "nope", "cred-2", inventory(2)).unwrap_err().code(), ErrorCode::Unauthenticated);
    issue(&mut w, supplier, "t2", 60).expect("token");
    w.advance(61);
    assert_eq!(enroll(&mut w, "t2", "cred-2", inventory(2)).unwrap_err().code(), ErrorCode::Unauthenticated);

    // A reinstall: same cards, one more; the node and its card IDs stay, the old credential goes.
    issue(&mut w, supplier, "t3", 600).expect("token");
    let Response::Node(again) = enroll(&mut w, "t3", "cred-3", inventory(3)).expect("re-enrolled") else { panic!() };
    assert_eq!(again.id, node.id);
    assert_eq!(again.cards[..2], node.cards[..]);
    assert_eq!(again.cards.len(), 3);
    assert_eq!(w.state.node_by_agent_credential(&SecretHash::of("api-token", "cred-1")), None);
    assert_eq!(w.state.node_by_agent_credential(&SecretHash::of("api-token", "cred-3")), Some(node.id));

    // Revocation: by the owner only; strangers are told the node does not exist.
    let other = w.account(AccountKind::Supplier);
    assert_eq!(w.run(Caller::Account(other), Command::RevokeAgent { node: node.id }).unwrap_err().code(), ErrorCode::NotFound);
    w.ok(Caller::Account(supplier), Command::RevokeAgent { node: node.id });
    assert_eq!(w.state.node_by_agent_credential(&SecretHash::of("api-token", "cred-3")), None);
    w.state.check_invariants().expect("invariants");
}

#[test]
fn a_card_gone_at_a_reinstall_counts_nowhere_whatever_its_health() {
    let mut w = World::new();
    let supplier = w.account(AccountKind::Supplier);
    issue(&mut w, supplier, "t1", 600).expect("token");
    let Response::Node(node) = enroll(&mut w, "t1", "cred-1", inventory(2)).expect("enrolled") else { panic!() };
    let cluster = w.cluster(supplier, ClusterClass::B, vec![node.id]);
    issue(&mut w, supplier, "t2", 600).expect("token");
    enroll(&mut w, "t2", "cred-2", inventory(1)).expect("reinstalled without its second card");
    // The monitor later reports the gone card healthy: it is idle on record, in no cluster.
    w.ok(Caller::System, Command::SetCardHealth { changes: vec![(node.cards[1], CardHealth::Healthy)] });
    let counts = w.state.card_counts(cluster);
    assert_eq!((counts.total, counts.idle), (1, 1));
    w.state.check_invariants().expect("card counts match a recount");
}

#[test]
fn health_takes_idle_cards_out_of_the_market_and_leaves_leases_alone() {
    let mut m = market();
    let lease = m.w.lease(Caller::Account(m.researcher), request_b(m.class_b, 1));
    m.w.ok(Caller::Account(m.supplier), Command::ActivateLease { lease: lease.id });
    let leased = lease.cards[0];
    let idle = m.w.state.cards_of_cluster(m.class_b).into_iter().find(|c| c.lease.is_none()).expect("idle card").id;

    // Only the broker's monitoring sets health.
    let set = |card, health| Command::SetCardHealth { changes: vec![(card, health)] };
    assert_eq!(m.w.run(Caller::Account(m.supplier), set(idle, CardHealth::Lost)).unwrap_err().code(), ErrorCode::PermissionDenied);

    m.w.ok(Caller::System, set(idle, CardHealth::XidError));
    assert_eq!(m.w.state.card(idle).map(|c| c.status), Some(CardStatus::Faulty));
    let refused = m.w.run(Caller::Account(m.supplier), Command::SetCardStatus { card: idle, status: CardStatus::Idle });
    assert_eq!(refused.unwrap_err().code(), ErrorCode::InvalidArgument);
    m.w.ok(Caller::System, set(idle, CardHealth::Lost));
    assert_eq!(m.w.state.card(idle).map(|c| c.status), Some(CardStatus::Offline));
    m.w.ok(Caller::System, set(idle, CardHealth::Healthy));
    assert_eq!(m.w.state.card(idle).map(|c| c.status), Some(CardStatus::Idle));

    // A leased card keeps its lease and status; when the lease ends it leaves the market.
    m.w.ok(Caller::System, set(leased, CardHealth::Overheating));
    assert_eq!(m.w.state.card(leased).map(|c| (c.status, c.health)), Some((CardStatus::Busy, CardHealth::Overheating)));
    m.w.ok(Caller::Account(m.researcher), Command::EndLease { lease: lease.id, reason: EndReason::ByResearcher });
    assert_eq!(m.w.state.card(leased).map(|c| c.status), Some(CardStatus::Faulty));
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn a_class_b_lease_starts_when_every_node_holding_its_cards_has_provisioned() {
    let mut m = market();
    let lease = m.w.lease(Caller::Account(m.researcher), request_b(m.class_b, 6));
    let nodes: std::collections::BTreeSet<NodeId> = lease.cards.iter().map(|c| m.w.state.card(*c).expect("card").node).collect();
    assert_eq!(nodes.len(), 2, "six cards span both nodes");
    let mut nodes = nodes.into_iter();
    let (first, second) = (nodes.next().expect("node"), nodes.next().expect("node"));
    // An agent of a node the lease does not touch is refused.
    let stranger = m.class_a_nodes[0];
    let refused = m.w.run(Caller::Agent(stranger), Command::ActivateLease { lease: lease.id });
    assert_eq!(code(refused), ErrorCode::PermissionDenied);
    let after_first = m.w.lease(Caller::Agent(first), Command::ActivateLease { lease: lease.id });
    assert_eq!(after_first.state, LeaseState::Requested);
    assert!(m.w.card_statuses(lease.id).iter().all(|s| *s == CardStatus::Reserved));
    let after_second = m.w.lease(Caller::Agent(second), Command::ActivateLease { lease: lease.id });
    assert_eq!(after_second.state, LeaseState::Active);
    assert!(m.w.card_statuses(lease.id).iter().all(|s| *s == CardStatus::Busy));
    m.w.state.check_invariants().expect("invariants");
}

// ---- property tests ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    RequestA { researcher: bool, nodes: Vec<usize> },
    RequestB { researcher: bool, cards: u32 },
    Approve { by_owner: bool, lease: usize },
    Verify { by_lessee: bool, lease: usize, right: bool },
    Activate { by_owner: bool, lease: usize },
    Extend { lease: usize, periods: u32 },
    End { who: u8, lease: usize },
    Expire { lease: usize },
    SetCard { card: usize, status: CardStatus },
    Health { card: usize, health: CardHealth },
    Delist,
    Reprice { hourly: i64 },
    Advance { seconds: i64 },
    Retry { back: usize },
    Submit { mine: bool, cards: u32, shared: bool },
    Place { job: usize, cards: Vec<usize> },
    Start { job: usize },
    EndJob { job: usize, reason: u8 },
    CancelJob { job: usize, by_owner: bool },
    Settle,
}

fn op() -> impl Strategy<Value = Op> {
    let status = prop::sample::select(CardStatus::ALL.to_vec());
    prop_oneof![
        (any::<bool>(), prop::collection::vec(0usize..3, 1..3)).prop_map(|(researcher, nodes)| Op::RequestA { researcher, nodes }),
        (any::<bool>(), 0u32..7).prop_map(|(researcher, cards)| Op::RequestB { researcher, cards }),
        (prop::bool::weighted(0.8), 0usize..8).prop_map(|(by_owner, lease)| Op::Approve { by_owner, lease }),
        (prop::bool::weighted(0.8), 0usize..8, prop::bool::weighted(0.6)).prop_map(|(by_lessee, lease, right)| Op::Verify { by_lessee, lease, right }),
        (prop::bool::weighted(0.8), 0usize..8).prop_map(|(by_owner, lease)| Op::Activate { by_owner, lease }),
        (0usize..8, 0u32..3).prop_map(|(lease, periods)| Op::Extend { lease, periods }),
        (0u8..5, 0usize..8).prop_map(|(who, lease)| Op::End { who, lease }),
        (0usize..8).prop_map(|lease| Op::Expire { lease }),
        (0usize..14, status).prop_map(|(card, status)| Op::SetCard { card, status }),
        (0usize..14, prop::sample::select(CardHealth::ALL.to_vec())).prop_map(|(card, health)| Op::Health { card, health }),
        Just(Op::Delist),
        (1i64..1_000).prop_map(|hourly| Op::Reprice { hourly }),
        prop_oneof![Just(60i64), Just(3600), Just(rules::RESERVATION_SECONDS_CLASS_B), Just(86_400)].prop_map(|seconds| Op::Advance { seconds }),
        (0usize..10).prop_map(|back| Op::Retry { back }),
        (any::<bool>(), 1u32..4, prop::bool::weighted(0.3)).prop_map(|(mine, cards, shared)| Op::Submit { mine, cards, shared }),
        (0usize..8, prop::collection::vec(0usize..14, 1..4)).prop_map(|(job, cards)| Op::Place { job, cards }),
        (0usize..8).prop_map(|job| Op::Start { job }),
        (0usize..8, 0u8..4).prop_map(|(job, reason)| Op::EndJob { job, reason }),
        (0usize..8, any::<bool>()).prop_map(|(job, by_owner)| Op::CancelJob { job, by_owner }),
        Just(Op::Settle),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever happens: no card is in two live leases, card status follows its lease, lease
    /// states move only along the transition table, and a refused command changes nothing
    /// (except the attempt counter of a wrong authorization code).
    #[test]
    fn invariants_hold_under_any_command_sequence(ops in prop::collection::vec(op(), 1..60)) {
        let mut m = market();
        let mut history: Vec<Envelope> = Vec::new();
        let lease_ids = |m: &Market| m.w.state.leases().map(|l| l.id).collect::<Vec<_>>();
        let card_ids: Vec<CardId> = m.w.state.cards().map(|c| c.id).collect();
        for op in ops {
            let leases = lease_ids(&m);
            let pick = |i: usize| leases.get(i % leases.len().max(1)).copied().unwrap_or(LeaseId(999_999));
            let researcher = |mine: bool| Caller::Account(if mine { m.researcher } else { m.other_researcher });
            let lessee_of = |m: &Market, id: LeaseId, mine: bool| {
                let owner = m.w.state.lease(id).map(|l| l.researcher).unwrap_or(m.researcher);
                Caller::Account(if mine { owner } else if owner == m.researcher { m.other_researcher } else { m.researcher })
            };
            let envelope = match op {
                Op::Advance { seconds } => { m.w.advance(seconds); continue; }
                Op::Retry { back } => match history.len().checked_sub(back + 1) {
                    Some(i) => history[i].clone(),
                    None => continue,
                },
                Op::RequestA { researcher: mine, nodes } => {
                    let nodes = nodes.iter().map(|i| m.class_a_nodes.get(*i).copied().unwrap_or(NodeId(777))).collect();
                    m.w.envelope(researcher(mine), request_a(m.class_a, nodes))
                }
                Op::RequestB { researcher: mine, cards } => m.w.envelope(researcher(mine), request_b(m.class_b, cards)),
                Op::Approve { by_owner, lease } => {
                    let id = pick(lease);
                    let caller = Caller::Account(if by_owner { m.supplier } else { m.other_supplier });
                    let expires = m.w.now.plus_seconds(600);
                    m.w.envelope(caller, Command::ApproveLease { lease: id, code_hash: code_hash(id, "OK"), code_expires_at: expires })
                }
                Op::Verify { by_lessee, lease, right } => {
                    let id = pick(lease);
                    let caller = lessee_of(&m, id, by_lessee);
                    let candidate_hash = code_hash(id, if right { "OK" } else { "NO" });
                    m.w.envelope(caller, Command::VerifyAuthCode { lease: id, candidate_hash })
                }
                Op::Activate { by_owner, lease } => {
                    let caller = Caller::Account(if by_owner { m.supplier } else { m.other_supplier });
                    m.w.envelope(caller, Command::ActivateLease { lease: pick(lease) })
                }
                Op::Extend { lease, periods } => {
                    let id = pick(lease);
                    let caller = lessee_of(&m, id, true);
                    m.w.envelope(caller, Command::ExtendLease { lease: id, periods })
                }
                Op::End { who, lease } => {
                    let id = pick(lease);
                    let (caller, reason) = match who {
                        0 => (lessee_of(&m, id, true), EndReason::ByResearcher),
                        1 => (lessee_of(&m, id, false), EndReason::ByResearcher),
                        2 => (Caller::Account(m.supplier), EndReason::BySupplier(SupplierEndReason::HardwareFault)),
                        3 => (Caller::Account(m.other_supplier), EndReason::BySupplier(SupplierEndReason::Maintenance)),
                        _ => (Caller::Operator(OperatorRole::Dispatcher), EndReason::ByOperator),
                    };
                    m.w.envelope(caller, Command::EndLease { lease: id, reason })
                }
                Op::Expire { lease } => m.w.envelope(Caller::System, Command::ExpireLease { lease: pick(lease) }),
                Op::SetCard { card, status } => {
                    let card = card_ids[card % card_ids.len()];
                    m.w.envelope(Caller::Account(m.supplier), Command::SetCardStatus { card, status })
                }
                Op::Health { card, health } => {
                    let card = card_ids[card % card_ids.len()];
                    m.w.envelope(Caller::System, Command::SetCardHealth { changes: vec![(card, health)] })
                }
                Op::Delist => m.w.envelope(Caller::Account(m.supplier), Command::DelistCluster { cluster: m.class_b }),
                Op::Reprice { hourly } => {
                    let mut listing = listing(ClusterClass::B);
                    listing.prices.per_card.insert(BillingMode::Hourly, hourly);
                    m.w.envelope(Caller::Account(m.supplier), Command::ModifyCluster { cluster: m.class_b, listing })
                }
                Op::Submit { mine, cards, shared } => {
                    let mut spec = spec(if shared { 1 } else { cards });
                    if shared {
                        spec.kind = suanli_types::JobKind::Inference;
                        spec.resources.shared = true;
                    }
                    m.w.envelope(researcher(mine), Command::SubmitJob { spec })
                }
                Op::Place { job, cards } => {
                    let jobs: Vec<JobId> = m.w.state.jobs().map(|j| j.id).collect();
                    let Some(job) = jobs.get(job % jobs.len().max(1)).copied() else { continue };
                    let cards = cards.iter().map(|i| card_ids[i % card_ids.len()]).collect();
                    let lease = m.w.envelope(Caller::Platform, Command::AcquireSchedulerLease { holder: "s".into(), ttl_ms: 60_000 });
                    let _ = m.w.state.apply(&lease);
                    let epoch = m.w.state.scheduler_lease().epoch;
                    m.w.envelope(Caller::Platform, Command::PlaceJobs { epoch, placements: vec![(job, cards)] })
                }
                Op::Start { job } | Op::EndJob { job, .. } => {
                    let jobs: Vec<&Job> = m.w.state.jobs().collect();
                    let Some(j) = jobs.get(job % jobs.len().max(1)) else { continue };
                    let attempt = j.attempts.last().map_or(1, |a| a.number);
                    let node = j.attempts.last().and_then(|a| a.cards.first()).and_then(|c| m.w.state.card(*c)).map_or(NodeId(1), |c| c.node);
                    let id = j.id;
                    let command = match op {
                        Op::EndJob { reason, .. } => {
                            let reason = [JobEndReason::Completed, JobEndReason::ExitStatus(1), JobEndReason::Preempted, JobEndReason::StartFailed("x".into())][reason as usize % 4].clone();
                            Command::JobEnded { job: id, attempt, reason, outputs: Default::default() }
                        }
                        _ => Command::JobStarted { job: id, attempt },
                    };
                    m.w.envelope(Caller::Agent(node), command)
                }
                Op::CancelJob { job, by_owner } => {
                    let jobs: Vec<&Job> = m.w.state.jobs().collect();
                    let Some(j) = jobs.get(job % jobs.len().max(1)) else { continue };
                    let caller = if by_owner { Caller::Account(j.owner) } else { Caller::Account(m.supplier) };
                    let id = j.id;
                    m.w.envelope(caller, Command::CancelJob { job: id })
                }
                Op::Settle => {
                    let leases = m.w.state.due_for_settlement(m.w.now, 0);
                    m.w.envelope(Caller::System, Command::SettleLeases { leases })
                }
            };
            let before = m.w.state.clone();
            let early = m.w.state.precheck(&envelope.caller, &envelope.request_id, &envelope.command);
            let (outcome, _events) = m.w.state.apply(&envelope);
            history.push(envelope.clone());
            // What the broker refuses before proposing is exactly what applying would refuse.
            if let Err(refusal) = early {
                prop_assert_eq!(&outcome, &Err(refusal), "precheck of {} disagrees with apply", envelope.command.name());
                prop_assert_eq!(m.w.state.market(), before.market(), "a prechecked refusal changed the state");
            }
            if let Err(violation) = m.w.state.check_invariants() {
                panic!("after {}: {violation}", envelope.command.name());
            }
            if let Err(e) = &outcome {
                if !matches!(e, DomainError::AuthCodeMismatch { .. } | DomainError::AuthCodeAttemptsExhausted) {
                    prop_assert_eq!(m.w.state.market(), before.market(), "refused {} ({}) changed the state", envelope.command.name(), e);
                }
            }
            // Every lease that is over has returned its whole hold: charged + credited + refunded.
            for lease in m.w.state.leases().filter(|l| !l.state.is_live()) {
                let Some(account) = m.w.state.lease_account(lease.id) else { continue };
                let returned: i64 = m.w.state.transactions().iter()
                    .filter(|t| t.lease == Some(lease.id) && matches!(t.kind, TransactionKind::Refund | TransactionKind::ServiceCredit))
                    .map(|t| t.net_for(LedgerAccount::Available(lease.researcher)))
                    .sum();
                prop_assert_eq!(account.charged_minor + returned, account.held_minor, "{} did not settle its hold", lease.id);
            }
            for lease in m.w.state.leases() {
                let Some(old) = before.lease(lease.id) else { continue };
                if old.state != lease.state {
                    let legal = LeaseAction::ALL.iter().any(|a| old.state.after(*a, lease.class) == Some(lease.state));
                    prop_assert!(legal, "{}: {} -> {} is not in the table", lease.id, old.state, lease.state);
                }
            }
        }
    }
}

// ---- money ------------------------------------------------------------------------------------

fn available(m: &Market, who: AccountId) -> i64 {
    m.w.state.balance(LedgerAccount::Available(who), &Currency::cny())
}

fn charged_for(m: &Market, lease: LeaseId) -> i64 {
    m.w.state
        .transactions()
        .iter()
        .filter(|tx| tx.lease == Some(lease) && tx.kind == TransactionKind::Charge)
        .map(|tx| -tx.net_for(LedgerAccount::Held(m.researcher)))
        .sum()
}

#[test]
fn a_lease_holds_its_price_charges_by_use_and_refunds_the_rest() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let l = m.w.lease(r.clone(), request_b(m.class_b, 3));
    let price = fixtures::HOURLY_PRICE * 3 * 2;
    assert_eq!(available(&m, m.researcher), FUNDS - price, "held at request");
    assert_eq!(m.w.state.balance(LedgerAccount::Held(m.researcher), &Currency::cny()), price);
    m.w.lease(Caller::Account(m.supplier), Command::ActivateLease { lease: l.id });

    // 25 minutes of use, settled in two batches: the charge is that of 25 minutes, exactly.
    m.w.advance(600);
    m.w.ok(Caller::System, Command::SettleLeases { leases: vec![l.id] });
    m.w.advance(900);
    m.w.ok(Caller::System, Command::SettleLeases { leases: vec![l.id] });
    let expected = (fixtures::HOURLY_PRICE * 3 * 1500 + 1800) / 3600; // half up
    assert_eq!(charged_for(&m, l.id), expected);
    let fee = (expected * 1000 + 5000) / 10_000;
    assert_eq!(m.w.state.balance(LedgerAccount::Earnings(m.supplier), &Currency::cny()), expected - fee);
    assert_eq!(m.w.state.balance(LedgerAccount::PlatformFees, &Currency::cny()), fee);

    m.w.lease(r, Command::EndLease { lease: l.id, reason: EndReason::ByResearcher });
    assert_eq!(available(&m, m.researcher), FUNDS - expected, "the unused hold came back");
    assert_eq!(m.w.state.balance(LedgerAccount::Held(m.researcher), &Currency::cny()), 0);
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn a_request_the_balance_cannot_cover_is_refused_and_changes_nothing() {
    let mut m = market();
    let poor = m.w.account(AccountKind::Researcher);
    let before = m.w.state.market();
    let refused = m.w.run(Caller::Account(poor), request_b(m.class_b, 1));
    assert_eq!(code(refused), ErrorCode::InsufficientFunds);
    assert_eq!(m.w.state.market(), before);
    // Credit lets the balance go below zero, as far as granted.
    m.w.ok(Caller::Operator(OperatorRole::Operator), Command::GrantCredit { account: poor, limit: Money::new(Currency::cny(), 10_000) });
    m.w.lease(Caller::Account(poor), request_b(m.class_b, 1));
    assert_eq!(available(&m, poor), -fixtures::HOURLY_PRICE * 2);
    // Only the platform records deposits.
    let forged = m.w.run(Caller::Account(poor), Command::Deposit { account: poor, amount: Money::new(Currency::cny(), 1) });
    assert_eq!(code(forged), ErrorCode::PermissionDenied);
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn a_dropped_card_is_not_charged_and_comes_back_as_a_service_credit() {
    let mut m = market();
    let r = Caller::Account(m.researcher);
    let l = m.w.lease(r.clone(), request_b(m.class_b, 2));
    m.w.lease(Caller::Account(m.supplier), Command::ActivateLease { lease: l.id });
    m.w.advance(600);
    m.w.ok(Caller::System, Command::SetCardHealth { changes: vec![(l.cards[0], CardHealth::Lost)] });
    m.w.advance(1200);
    m.w.ok(Caller::System, Command::SetCardHealth { changes: vec![(l.cards[0], CardHealth::Healthy)] });
    m.w.advance(600);
    m.w.lease(r, Command::EndLease { lease: l.id, reason: EndReason::ByResearcher });
    // 2 cards × 2400 s, less 1200 s of one card.
    let billable_card_s = 2 * 2400 - 1200;
    let expected = (fixtures::HOURLY_PRICE * billable_card_s + 1800) / 3600;
    assert_eq!(charged_for(&m, l.id), expected);
    let credit: i64 =
        m.w.state.transactions().iter().filter(|t| t.kind == TransactionKind::ServiceCredit).map(|t| t.net_for(LedgerAccount::Available(m.researcher))).sum();
    assert_eq!(credit, (fixtures::HOURLY_PRICE * 1200 + 1800) / 3600);
    let eval = m.w.state.evaluation(l.id).expect("a Class B lease is evaluated");
    assert_eq!((eval.cards_dropped, eval.uptime_bps), (1, 7_500));
    assert_eq!(eval.score, 75 - 10);
    assert_eq!(m.w.state.reliability(m.supplier), Some((65, 1)));
    m.w.state.check_invariants().expect("invariants");
}

// ---- jobs -------------------------------------------------------------------------------------

fn spec(cards: u32) -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": "train", "kind": "training",
        "resources": { "cards": cards },
        "run": { "command": { "program": "/bin/true" } },
    }))
    .expect("spec")
}

fn submit(m: &mut Market, owner: AccountId, cards: u32) -> JobId {
    match m.w.ok(Caller::Account(owner), Command::SubmitJob { spec: spec(cards) }) {
        Response::Job(j) => j.id,
        other => panic!("{other:?}"),
    }
}

fn epoch(m: &mut Market) -> u64 {
    match m.w.ok(Caller::Platform, Command::AcquireSchedulerLease { holder: "s1".into(), ttl_ms: 5_000 }) {
        Response::SchedulerLease(l) => l.epoch,
        other => panic!("{other:?}"),
    }
}

fn place(m: &mut Market, epoch: u64, job: JobId, cards: Vec<CardId>) -> Result<(), DomainError> {
    match m.w.ok(Caller::Platform, Command::PlaceJobs { epoch, placements: vec![(job, cards)] }) {
        Response::Placements(mut r) => r.remove(0),
        other => panic!("{other:?}"),
    }
}

fn active_b(m: &mut Market, owner: AccountId, cards: u32) -> Lease {
    let l = m.w.lease(Caller::Account(owner), request_b(m.class_b, cards));
    m.w.lease(Caller::Account(m.supplier), Command::ActivateLease { lease: l.id })
}

fn agent_of(m: &Market, card: CardId) -> Caller {
    Caller::Agent(m.w.state.card(card).expect("card").node)
}

#[test]
fn jobs_run_only_on_their_owners_active_cards_one_at_a_time() {
    let mut m = market();
    let (me, them) = (m.researcher, m.other_researcher);
    let mine = active_b(&mut m, me, 2);
    let theirs = active_b(&mut m, them, 1);
    let e = epoch(&mut m);
    let job = submit(&mut m, me, 1);
    let second = submit(&mut m, me, 1);
    assert_eq!(place(&mut m, e, job, theirs.cards.clone()).map_err(|e| e.code()), Err(ErrorCode::PlacementRefused));
    assert_eq!(place(&mut m, e, job, mine.cards.clone()).map_err(|e| e.code()), Err(ErrorCode::PlacementRefused), "wrong count");
    place(&mut m, e, job, vec![mine.cards[0]]).expect("placed");
    assert_eq!(place(&mut m, e, second, vec![mine.cards[0]]).map_err(|e| e.code()), Err(ErrorCode::PlacementRefused), "card taken");
    // A replica that lost the lease cannot place.
    m.w.advance(10);
    let stale = m.w.run(Caller::Platform, Command::PlaceJobs { epoch: e, placements: vec![(second, vec![mine.cards[1]])] });
    assert_eq!(code(stale), ErrorCode::StaleScheduler);
    m.w.state.check_invariants().expect("invariants");
}

/// The researcher's two-card job, placed on its whole active lease and started by the agent.
fn running_two_card_job() -> (Market, Lease, JobId, Caller) {
    let mut m = market();
    let me = m.researcher;
    let lease = active_b(&mut m, me, 2);
    let e = epoch(&mut m);
    let job = submit(&mut m, me, 2);
    place(&mut m, e, job, lease.cards.clone()).expect("placed");
    let agent = agent_of(&m, lease.cards[0]);
    m.w.ok(agent.clone(), Command::JobStarted { job, attempt: 1 });
    (m, lease, job, agent)
}

#[test]
fn an_attempt_runs_ends_and_is_priced_and_a_superseded_report_is_refused() {
    let (mut m, lease, job, agent) = running_two_card_job();
    m.w.advance(1800);
    // The job's own failure: back to the queue, one failure counted.
    m.w.ok(agent.clone(), Command::JobEnded { job, attempt: 1, reason: JobEndReason::ExitStatus(1), outputs: Default::default() });
    let j = m.w.state.job(job).expect("job").clone();
    assert_eq!((j.state, j.failures), (JobState::Queued, 1));
    assert_eq!(j.cost_minor, fixtures::HOURLY_PRICE * 2 / 2, "two cards for half an hour");
    assert_eq!(j.attained_card_ms, 2 * 1_800_000);
    // A late report about attempt 1 changes nothing.
    let late = m.w.run(agent.clone(), Command::JobStarted { job, attempt: 1 });
    assert_eq!(code(late), ErrorCode::JobTransition);
    let e = epoch(&mut m);
    place(&mut m, e, job, lease.cards.clone()).expect("placed again");
    m.w.ok(agent.clone(), Command::JobStarted { job, attempt: 2 });
    m.w.ok(agent, Command::JobEnded { job, attempt: 2, reason: JobEndReason::Completed, outputs: Default::default() });
    assert_eq!(m.w.state.job(job).expect("job").state, JobState::Succeeded);
    assert!(m.w.state.card_jobs().is_empty());
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn a_lost_card_stops_its_job_and_the_job_is_requeued_without_a_failure() {
    let (mut m, lease, job, agent) = running_two_card_job();
    m.w.ok(Caller::System, Command::SetCardHealth { changes: vec![(lease.cards[1], CardHealth::XidError)] });
    assert_eq!(m.w.state.job(job).expect("job").stop_requested, Some(JobEndReason::CardLost(lease.cards[1])));
    // The agent kills it (the process dies of the signal); the platform's reason is recorded.
    m.w.ok(agent, Command::JobEnded { job, attempt: 1, reason: JobEndReason::ExitStatus(137), outputs: Default::default() });
    let j = m.w.state.job(job).expect("job");
    assert_eq!((j.state, j.failures), (JobState::Queued, 0));
    assert_eq!(j.attempts[0].end_reason, Some(JobEndReason::CardLost(lease.cards[1])));
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn the_leader_lease_fences_a_second_scheduler_until_it_expires() {
    let mut m = market();
    let first = epoch(&mut m);
    let other = m.w.run(Caller::Platform, Command::AcquireSchedulerLease { holder: "s2".into(), ttl_ms: 5_000 });
    assert_eq!(code(other), ErrorCode::StaleScheduler);
    m.w.advance(6);
    match m.w.ok(Caller::Platform, Command::AcquireSchedulerLease { holder: "s2".into(), ttl_ms: 5_000 }) {
        Response::SchedulerLease(l) => assert_eq!((l.holder.as_str(), l.epoch), ("s2", first + 1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn auto_lease_takes_the_cheapest_class_b_cards_within_budget_and_region() {
    let mut m = market();
    // A second Class B cluster, cheaper, in another region.
    let nodes = vec![m.w.node(m.supplier, 2)];
    let mut cheap = listing(ClusterClass::B);
    cheap.region = "Shanghai".into();
    cheap.prices.per_card.insert(BillingMode::Hourly, fixtures::HOURLY_PRICE / 2);
    let shanghai = match m.w.ok(Caller::Account(m.supplier), Command::PublishCluster { class: ClusterClass::B, nodes, listing: cheap }) {
        Response::Cluster(c) => c.id,
        other => panic!("{other:?}"),
    };
    let me = m.researcher;
    let auto_job = |m: &mut Market, region: Option<&str>, budget: i64| {
        let mut s = spec(2);
        s.budget_minor = Some(budget);
        s.auto_lease = Some(suanli_types::AutoLease { region: region.map(str::to_owned), billing_mode: BillingMode::Hourly });
        match m.w.ok(Caller::Account(me), Command::SubmitJob { spec: s }) {
            Response::Job(j) => j.id,
            other => panic!("{other:?}"),
        }
    };
    let e = epoch(&mut m);
    // Anywhere: the cheaper Shanghai cluster.
    let anywhere = auto_job(&mut m, None, 10_000);
    let l = m.w.lease(Caller::Platform, Command::AutoLease { epoch: e, job: anywhere });
    assert_eq!((l.cluster, l.researcher, l.auto_for, l.cards.len()), (shanghai, me, Some(anywhere), 2));
    // One auto lease per job.
    let again = m.w.run(Caller::Platform, Command::AutoLease { epoch: e, job: anywhere });
    assert_eq!(code(again), ErrorCode::AlreadyExists);
    // In Beijing only: the Beijing Class B cluster, though dearer.
    let beijing = auto_job(&mut m, Some("beijing"), 10_000);
    let l = m.w.lease(Caller::Platform, Command::AutoLease { epoch: e, job: beijing });
    assert_eq!(l.cluster, m.class_b);
    // A budget below one period of two cards anywhere buys nothing, and changes nothing.
    let poor = auto_job(&mut m, None, fixtures::HOURLY_PRICE - 1);
    let before = m.w.state.market();
    assert_eq!(code(m.w.run(Caller::Platform, Command::AutoLease { epoch: e, job: poor })), ErrorCode::PlacementRefused);
    assert_eq!(m.w.state.market(), before);
    // A job that did not opt in is not leased for; nor by anyone but the acting scheduler.
    let plain = submit(&mut m, me, 1);
    assert_eq!(code(m.w.run(Caller::Platform, Command::AutoLease { epoch: e, job: plain })), ErrorCode::InvalidArgument);
    assert_eq!(code(m.w.run(Caller::Account(me), Command::AutoLease { epoch: e, job: poor })), ErrorCode::PermissionDenied);
    // The platform may end what it leased for a job, and nothing else.
    let mine = m.w.lease(Caller::Account(me), request_b(m.class_b, 1));
    assert_eq!(code(m.w.run(Caller::Platform, Command::EndLease { lease: mine.id, reason: EndReason::ByResearcher })), ErrorCode::PermissionDenied);
    m.w.lease(Caller::Platform, Command::EndLease { lease: l.id, reason: EndReason::ByResearcher });
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn auto_lease_follows_re_pricing_and_delisting() {
    let mut m = market();
    let nodes = vec![m.w.node(m.supplier, 2)];
    let mut dear = listing(ClusterClass::B);
    dear.prices.per_card.insert(BillingMode::Hourly, fixtures::HOURLY_PRICE * 2);
    let second = match m.w.ok(Caller::Account(m.supplier), Command::PublishCluster { class: ClusterClass::B, nodes, listing: dear.clone() }) {
        Response::Cluster(c) => c.id,
        other => panic!("{other:?}"),
    };
    let me = m.researcher;
    let e = epoch(&mut m);
    let auto_lease = |m: &mut Market| {
        let mut s = spec(1);
        s.budget_minor = Some(10_000);
        s.auto_lease = Some(suanli_types::AutoLease { region: None, billing_mode: BillingMode::Hourly });
        let job = match m.w.ok(Caller::Account(me), Command::SubmitJob { spec: s }) {
            Response::Job(j) => j.id,
            other => panic!("{other:?}"),
        };
        let l = m.w.lease(Caller::Platform, Command::AutoLease { epoch: e, job });
        m.w.lease(Caller::Platform, Command::EndLease { lease: l.id, reason: EndReason::ByResearcher });
        l.cluster
    };
    assert_eq!(auto_lease(&mut m), m.class_b, "the cheaper cluster");
    // Re-priced below the first: now the second.
    dear.prices.per_card.insert(BillingMode::Hourly, fixtures::HOURLY_PRICE / 2);
    m.w.ok(Caller::Account(m.supplier), Command::ModifyCluster { cluster: second, listing: dear });
    assert_eq!(auto_lease(&mut m), second);
    // Delisted: the first again.
    m.w.ok(Caller::Account(m.supplier), Command::DelistCluster { cluster: second });
    assert_eq!(auto_lease(&mut m), m.class_b);
    m.w.state.check_invariants().expect("invariants, indexes included");
}

#[test]
fn a_decoded_state_answers_by_scanning_until_its_indexes_are_rebuilt() {
    let mut m = market();
    let lease = m.w.lease(Caller::Account(m.researcher), request_b(m.class_b, 2));
    let summaries = |s: &State| {
        let (page, _) = s.catalogue(&CatalogueFilter::default(), &PageRequest::default()).expect("catalogue");
        page.iter().map(|c| (c.cluster.id, c.total_cards, c.idle_cards)).collect::<Vec<_>>()
    };
    let bytes = postcard::to_allocvec(&m.w.state).expect("serialize");
    let mut back: State = postcard::from_bytes(&bytes).expect("deserialize");
    assert_eq!(summaries(&back), summaries(&m.w.state), "unbuilt: counted card by card");
    assert!(summaries(&back).iter().any(|(id, total, idle)| *id == m.class_b && idle + 2 == *total));
    // The next command builds them first, then keeps them.
    let envelope = m.w.envelope(Caller::Account(m.researcher), Command::EndLease { lease: lease.id, reason: EndReason::ByResearcher });
    assert!(back.apply(&envelope).0.is_ok());
    assert!(m.w.state.apply(&envelope).0.is_ok());
    assert_eq!(summaries(&back), summaries(&m.w.state));
    back.check_invariants().expect("indexes match a rebuild");
}

#[test]
fn keys_are_removed_and_tokens_rotated_by_their_account_only() {
    let mut w = World::new();
    let me = w.account(AccountKind::Researcher);
    let them = w.account(AccountKind::Researcher);
    let key = SshPublicKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl k").expect("key");
    w.ok(Caller::Account(me), Command::AddSshKey { account: me, key: key.clone() });
    let removal = Command::RemoveSshKey { account: me, key: key.clone() };
    assert_eq!(w.run(Caller::Account(them), removal.clone()).unwrap_err().code(), ErrorCode::PermissionDenied);
    assert_eq!(w.state.account(me).expect("me").ssh_keys.len(), 1, "a stranger removed nothing");
    w.ok(Caller::Account(me), removal.clone());
    assert!(w.state.account(me).expect("me").ssh_keys.is_empty());
    assert_eq!(w.run(Caller::Account(me), removal).unwrap_err().code(), ErrorCode::NotFound);

    let old = w.state.account(me).expect("me").token_hash;
    let new = SecretHash::of("api-token", "rotated");
    let rotation = Command::RotateAccountToken { account: me, token_hash: new };
    assert_eq!(w.run(Caller::Account(them), rotation.clone()).unwrap_err().code(), ErrorCode::PermissionDenied);
    assert_eq!(w.state.account_by_token(&old).map(|a| a.id), Some(me), "a stranger rotated nothing");
    w.ok(Caller::Platform, rotation);
    assert!(w.state.account_by_token(&old).is_none(), "the old token is dead");
    assert_eq!(w.state.account_by_token(&new).map(|a| a.id), Some(me));
    // Another account's token is never taken over.
    let theirs = w.state.account(them).expect("them").token_hash;
    let takeover = Command::RotateAccountToken { account: me, token_hash: theirs };
    assert_eq!(w.run(Caller::Account(me), takeover).unwrap_err().code(), ErrorCode::AlreadyExists);
}

#[test]
fn a_researcher_cannot_hold_more_than_the_cap_of_waiting_leases() {
    let mut w = World::new();
    let supplier = w.account(AccountKind::Supplier);
    let researcher = w.account(AccountKind::Researcher);
    let nodes = (0..3).map(|_| w.node(supplier, 32)).collect();
    let cluster = w.cluster(supplier, ClusterClass::B, nodes);
    w.ok(Caller::Platform, Command::Deposit { account: researcher, amount: Money::new(Currency::cny(), FUNDS) });
    let r = Caller::Account(researcher);
    let waiting: Vec<Lease> = (0..rules::MAX_WAITING_LEASES_PER_RESEARCHER).map(|_| w.lease(r.clone(), request_b(cluster, 1))).collect();
    let before = w.state.clone();
    assert_eq!(code(w.run(r.clone(), request_b(cluster, 1))), ErrorCode::InvalidArgument);
    assert_eq!(w.state.leases().count(), before.leases().count(), "nothing was reserved");
    // An active lease no longer waits: room for one more.
    w.lease(Caller::Account(supplier), Command::ActivateLease { lease: waiting[0].id });
    w.lease(r, request_b(cluster, 1));
    w.state.check_invariants().expect("invariants");
}

#[test]
fn a_stranger_s_command_is_refused_before_proposal_but_a_remembered_retry_passes() {
    let mut m = market();
    let mine = m.w.lease(Caller::Account(m.researcher), request_b(m.class_b, 1));
    let stranger = Caller::Account(m.other_researcher);
    let end = Command::EndLease { lease: mine.id, reason: EndReason::ByResearcher };
    let id = RequestId::parse("end-theirs").expect("id");
    assert_eq!(
        m.w.state.precheck(&stranger, &id, &end).expect_err("a stranger may not end it").code(),
        ErrorCode::NotFound,
        "strangers learn nothing of the lease"
    );
    let wrong_kind = Command::SubmitJob { spec: spec(1) };
    assert_eq!(m.w.state.precheck(&Caller::Account(m.supplier), &id, &wrong_kind).expect_err("a supplier submits no jobs").code(), ErrorCode::WrongAccountKind);
    assert_eq!(m.w.state.precheck(&stranger, &id, &Command::RetireBrokerNode { node: 2 }).expect_err("not the platform").code(), ErrorCode::PermissionDenied);
    // The owner may; and once the owner's request is remembered, its retry passes whatever the
    // state says now (the log answers it as the first time).
    let owner = Caller::Account(m.researcher);
    let env = Envelope { caller: owner.clone(), request_id: id.clone(), at: m.w.now, command: end.clone() };
    m.w.state.precheck(&owner, &id, &end).expect("the owner may end it");
    m.w.state.apply(&env).0.expect("ended");
    m.w.state.precheck(&owner, &id, &end).expect("a retry of a remembered request passes");
}

// ---- the archive: what ended long ago leaves the hot state ------------------------------------

const DAY: i64 = 24 * 3600;

/// A market with history: a lease that ended, a job that ended, a lease still active with a
/// job running on it, and three days gone by.
struct History {
    m: Market,
    ended_lease: LeaseId,
    ended_job: JobId,
    live_lease: LeaseId,
    running_job: JobId,
}

fn history() -> History {
    let mut m = market();
    let me = m.researcher;
    let ended = active_b(&mut m, me, 1);
    let e = epoch(&mut m);
    let ended_job = submit(&mut m, me, 1);
    place(&mut m, e, ended_job, vec![ended.cards[0]]).expect("placed");
    let agent = agent_of(&m, ended.cards[0]);
    m.w.ok(agent.clone(), Command::JobStarted { job: ended_job, attempt: 1 });
    m.w.ok(agent, Command::JobEnded { job: ended_job, attempt: 1, reason: JobEndReason::Completed, outputs: Default::default() });
    m.w.ok(Caller::Account(me), Command::EndLease { lease: ended.id, reason: EndReason::ByResearcher });
    let live = active_b(&mut m, me, 1);
    let e = epoch(&mut m);
    let running_job = submit(&mut m, me, 1);
    place(&mut m, e, running_job, vec![live.cards[0]]).expect("placed");
    let agent = agent_of(&m, live.cards[0]);
    m.w.ok(agent, Command::JobStarted { job: running_job, attempt: 1 });
    m.w.advance(3 * DAY);
    History { m, ended_lease: ended.id, ended_job, live_lease: live.id, running_job }
}

fn archive(w: &mut World, ended_before: Timestamp) -> Vec<Archived> {
    w.ok(Caller::System, Command::ArchiveEnded { ended_before });
    w.state.take_archived()
}

#[test]
fn what_ended_before_the_cut_off_moves_to_the_archive_and_nothing_live_does() {
    let mut h = history();
    let before = h.m.w.state.clone();
    let cut_off = h.m.w.now.plus_seconds(-DAY);
    assert!(h.m.w.state.has_archivable(cut_off, h.m.w.now));
    let archived = archive(&mut h.m.w, cut_off);
    let s = &h.m.w.state;
    assert!(s.lease(h.ended_lease).is_none() && s.job(h.ended_job).is_none(), "the ended lease and job left the hot state");
    assert!(s.lease(h.live_lease).is_some() && s.job(h.running_job).is_some(), "live ones stay");
    assert!(archived.iter().any(|r| matches!(r, Archived::Lease { lease, account: Some(_) } if lease.id == h.ended_lease)));
    assert!(archived.iter().any(|r| matches!(r, Archived::Job(j) if j.id == h.ended_job)));
    // Every ledger line (all older than two days) moved; balances did not change.
    let lines = before.transactions().len() as u64;
    assert_eq!(s.ledger_archived(), lines);
    assert!(s.transactions().is_empty());
    assert_eq!(archived.iter().filter(|r| matches!(r, Archived::Transaction { .. })).count() as u64, lines);
    assert_eq!(s.balances(), before.balances());
    s.check_invariants().expect("invariants after archiving");
    assert!(!s.has_archivable(cut_off, h.m.w.now), "nothing left to archive");
    // New ledger lines continue the IDs.
    let me = h.m.researcher;
    match h.m.w.ok(Caller::Platform, Command::Deposit { account: me, amount: Money::new(Currency::cny(), 100) }) {
        Response::Transaction(tx) => assert_eq!(tx.id, lines + 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.m.w.state.transactions_of(me, None).iter().map(|t| t.id).collect::<Vec<_>>(), vec![lines + 1]);
}

#[test]
fn recent_ledger_lines_and_what_ended_after_the_cut_off_stay_hot() {
    let mut h = history();
    // A cut-off before anything ended: nothing leaves.
    let archived = archive(&mut h.m.w, Timestamp::from_millis(T0 - 1));
    assert!(archived.is_empty(), "{archived:?}");
    assert!(h.m.w.state.lease(h.ended_lease).is_some());
    // A cut-off of now: the ended lease and job go, but ledger lines younger than the hot
    // minimum stay, whatever the cut-off.
    let me = h.m.researcher;
    h.m.w.ok(Caller::Platform, Command::Deposit { account: me, amount: Money::new(Currency::cny(), 100) });
    let now = h.m.w.now;
    archive(&mut h.m.w, now);
    assert!(h.m.w.state.lease(h.ended_lease).is_none());
    let hot: Vec<_> = h.m.w.state.transactions().iter().map(|t| t.kind).collect();
    assert_eq!(hot, vec![TransactionKind::Deposit], "the fresh deposit stays hot");
}

#[test]
fn only_the_leaders_reaper_archives_and_never_ahead_of_its_own_time() {
    let mut h = history();
    let before = h.m.w.state.market();
    let cut_off = h.m.w.now.plus_seconds(-DAY);
    for caller in [Caller::Platform, Caller::Account(h.m.researcher), Caller::Operator(OperatorRole::Dispatcher)] {
        let refused = h.m.w.run(caller, Command::ArchiveEnded { ended_before: cut_off });
        assert_eq!(code(refused), ErrorCode::PermissionDenied);
    }
    let ahead = h.m.w.now.plus_seconds(1);
    assert_eq!(code(h.m.w.run(Caller::System, Command::ArchiveEnded { ended_before: ahead })), ErrorCode::InvalidArgument);
    assert_eq!(h.m.w.state.market(), before, "nothing changed");
    assert!(h.m.w.state.take_archived().is_empty());
}

#[test]
fn a_running_attempt_keeps_the_ended_lease_it_runs_on_hot() {
    let mut h = history();
    let me = h.m.researcher;
    // The lease ends under the running job: the job waits for its agent to confirm the kill.
    h.m.w.ok(Caller::Account(me), Command::EndLease { lease: h.live_lease, reason: EndReason::ByResearcher });
    h.m.w.advance(3 * DAY);
    let cut_off = h.m.w.now.plus_seconds(-DAY);
    archive(&mut h.m.w, cut_off);
    assert!(h.m.w.state.job(h.running_job).is_some_and(|j| j.state.is_live()));
    assert!(h.m.w.state.lease(h.live_lease).is_some(), "named by a live attempt");
    h.m.w.state.check_invariants().expect("invariants");
}

// ---- remote leases (format 5) ------------------------------------------------------------------

fn request_remote(researcher: AccountId, cards: u32, price_minor: i64) -> Command {
    Command::RequestRemoteLease {
        researcher,
        member: "12D3KooWPjceQrSwdWXPyLLeABRXmuqt69Rg3sBYbU1Nft9HyQ6X".into(),
        member_name: "city".into(),
        remote_cluster: 4,
        cards,
        billing_mode: BillingMode::Hourly,
        periods: 2,
        price_per_card: Money::new(Currency::cny(), price_minor),
    }
}

fn remote(response: Response) -> model::RemoteLease {
    match response {
        Response::RemoteLease(l) => *l,
        other => panic!("expected a remote lease, got {other:?}"),
    }
}

/// The money and the remote leases: what a refused remote-lease command must leave as it was
/// (the at-most-once memory does record the refusal).
type MoneyAndRemoteLeases = (std::collections::BTreeMap<(LedgerAccount, Currency), i64>, usize, Vec<model::RemoteLease>, u64);

fn money_and_remote_leases(w: &World) -> MoneyAndRemoteLeases {
    let remote = w.state.remote_leases_after(0).cloned().collect();
    (w.state.balances().clone(), w.state.transactions().len(), remote, w.state.next_id())
}

fn money_of(w: &World, researcher: AccountId) -> (i64, i64) {
    let cny = Currency::cny();
    (w.state.balance(LedgerAccount::Available(researcher), &cny), w.state.balance(LedgerAccount::RemoteHeld(researcher), &cny))
}

#[test]
fn a_remote_lease_holds_the_researchers_money_until_the_owner_charges_for_it() {
    let mut m = market();
    let r = remote(m.w.ok(Caller::Platform, request_remote(m.researcher, 3, 1_000)));
    assert_eq!((r.state, r.held.minor), (RemoteLeaseState::Requested, 6_000));
    assert_eq!(money_of(&m.w, m.researcher), (FUNDS - 6_000, 6_000));
    let r = remote(m.w.ok(Caller::Platform, Command::ConfirmRemoteLease { remote: r.id, remote_lease: 77 }));
    assert_eq!((r.state, r.remote_lease), (RemoteLeaseState::Active, Some(77)));
    // The same confirmation again changes nothing; another lease ID is refused.
    m.w.ok(Caller::Platform, Command::ConfirmRemoteLease { remote: r.id, remote_lease: 77 });
    assert_eq!(code(m.w.run(Caller::Platform, Command::ConfirmRemoteLease { remote: r.id, remote_lease: 78 })), ErrorCode::InvalidArgument);
    let ended = remote(m.w.ok(Caller::Platform, Command::EndRemoteLease { remote: r.id, charged_minor: 2_501 }));
    assert_eq!((ended.state, ended.charged_minor), (RemoteLeaseState::Ended, 2_501));
    assert_eq!(money_of(&m.w, m.researcher), (FUNDS - 2_501, 0));
    assert_eq!(m.w.state.balance(LedgerAccount::FederationPayable, &Currency::cny()), 2_501);
    // Ended once: a second end (say, a settlement replayed) is refused and moves nothing.
    assert_eq!(code(m.w.run(Caller::Platform, Command::EndRemoteLease { remote: r.id, charged_minor: 0 })), ErrorCode::InvalidArgument);
    assert_eq!(money_of(&m.w, m.researcher), (FUNDS - 2_501, 0));
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn a_refused_remote_lease_gives_the_whole_hold_back() {
    let mut m = market();
    let r = remote(m.w.ok(Caller::Platform, request_remote(m.researcher, 1, 1_000)));
    m.w.ok(Caller::Platform, Command::EndRemoteLease { remote: r.id, charged_minor: 0 });
    assert_eq!(money_of(&m.w, m.researcher), (FUNDS, 0));
    assert_eq!(m.w.state.remote_lease(r.id).map(|l| (l.state, l.remote_lease)), Some((RemoteLeaseState::Ended, None)));
    m.w.state.check_invariants().expect("invariants");
}

#[test]
fn only_the_platform_records_remote_leases_and_never_beyond_the_money_or_the_hold() {
    let mut m = market();
    let before = money_and_remote_leases(&m.w);
    // A researcher, an operator, a supplier cannot hold money for a remote lease themselves.
    for caller in [Caller::Account(m.researcher), Caller::Operator(OperatorRole::Dispatcher), Caller::Account(m.supplier), Caller::System] {
        assert_eq!(code(m.w.run(caller.clone(), request_remote(m.researcher, 1, 1_000))), ErrorCode::PermissionDenied, "{caller}");
    }
    // More than the researcher has; a supplier's account; nonsense fields.
    assert_eq!(code(m.w.run(Caller::Platform, request_remote(m.researcher, 1, FUNDS))), ErrorCode::InsufficientFunds);
    assert_eq!(code(m.w.run(Caller::Platform, request_remote(m.supplier, 1, 1_000))), ErrorCode::WrongAccountKind);
    assert_eq!(code(m.w.run(Caller::Platform, request_remote(m.researcher, 0, 1_000))), ErrorCode::InvalidArgument);
    assert_eq!(code(m.w.run(Caller::Platform, request_remote(m.researcher, 1, -5))), ErrorCode::InvalidArgument);
    let mut nameless = request_remote(m.researcher, 1, 1_000);
    if let Command::RequestRemoteLease { member, .. } = &mut nameless {
        *member = "x".repeat(200);
    }
    assert_eq!(code(m.w.run(Caller::Platform, nameless)), ErrorCode::InvalidArgument);
    assert_eq!(money_and_remote_leases(&m.w), before, "nothing changed");
    // Charging more than was held, or less than nothing, is refused.
    let r = remote(m.w.ok(Caller::Platform, request_remote(m.researcher, 1, 1_000)));
    let held = money_and_remote_leases(&m.w);
    for charged in [2_001, -1] {
        assert_eq!(code(m.w.run(Caller::Platform, Command::EndRemoteLease { remote: r.id, charged_minor: charged })), ErrorCode::InvalidArgument);
    }
    assert_eq!(code(m.w.run(Caller::Account(m.researcher), Command::EndRemoteLease { remote: r.id, charged_minor: 0 })), ErrorCode::PermissionDenied);
    assert_eq!(money_and_remote_leases(&m.w), held, "nothing changed");
}

#[test]
fn a_retried_remote_lease_request_holds_once_and_answers_the_same_lease() {
    let mut m = market();
    let env = m.w.envelope(Caller::Platform, request_remote(m.researcher, 1, 1_000));
    let first = m.w.state.apply(&env).0.expect("held");
    let again = m.w.state.apply(&env).0.expect("the first answer");
    assert_eq!(first, again);
    assert_eq!(money_of(&m.w, m.researcher), (FUNDS - 2_000, 2_000), "held once");
}

#[test]
fn one_command_archives_a_bounded_number_of_records() {
    let mut m = market();
    let me = m.researcher;
    for _ in 0..(rules::MAX_ARCHIVED_PER_COMMAND / 2 + 1) {
        m.w.ok(Caller::Platform, Command::Deposit { account: me, amount: Money::new(Currency::cny(), 1) });
        m.w.ok(Caller::Platform, Command::Deposit { account: me, amount: Money::new(Currency::cny(), 1) });
    }
    m.w.advance(3 * DAY);
    let cut_off = m.w.now;
    assert_eq!(archive(&mut m.w, cut_off).len(), rules::MAX_ARCHIVED_PER_COMMAND);
    assert!(m.w.state.has_archivable(cut_off, m.w.now), "the rest waits for the next command");
    archive(&mut m.w, cut_off);
    assert!(!m.w.state.has_archivable(cut_off, m.w.now));
    m.w.state.check_invariants().expect("invariants");
}

/// The archive through the store: what an entry archived is written with it, read back by ID
/// and in statements (exactly as before it moved), and carried by snapshots, exports and
/// restores to nodes that never applied that entry.
mod through_the_store {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    use suanli_types::Month;

    use super::*;
    use crate::service::{archived, jobs::statement};
    use crate::storage::{self, StateMachineStore, FORMAT_VERSION};

    async fn store_with(log: &[Envelope], path: &std::path::Path) -> StateMachineStore {
        let (_, mut sm) = storage::open(path).expect("open");
        let entries: Vec<Entry<storage::TypeConfig>> = log
            .iter()
            .enumerate()
            .map(|(i, e)| Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), i as u64 + 1), payload: EntryPayload::Normal(e.clone()) })
            .collect();
        sm.apply(entries).await.expect("apply");
        sm
    }

    /// What a researcher sees of the history: the ended lease and job by ID, every ledger line,
    /// and the month's statement.
    fn seen(sm: &StateMachineStore, h: &History) -> (Option<Lease>, Option<Job>, Vec<u64>, suanli_proto::v1::Statement) {
        let month = Month::containing(Timestamp::from_millis(T0));
        let read = || -> Result<_, storage::StoreError> {
            Ok((
                archived::lease(sm, h.ended_lease)?,
                archived::job(sm, h.ended_job)?,
                archived::transactions_of(sm, h.m.researcher, None, 0, usize::MAX)?.iter().map(|t| t.id).collect(),
                statement(sm, h.m.researcher, month, &Currency::cny())?,
            ))
        };
        read().expect("read")
    }

    #[tokio::test]
    async fn archived_records_read_as_they_did_hot_here_after_a_restart_and_wherever_snapshots_take_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut h = history();
        let hot = store_with(&h.m.w.log, &dir.path().join("hot")).await;
        let before = seen(&hot, &h);
        assert!(before.0.is_some() && before.1.is_some() && !before.2.is_empty());
        assert!(!before.3.leases.is_empty() && !before.3.jobs.is_empty(), "the statement has lines: {:?}", before.3);

        let cut_off = h.m.w.now.plus_seconds(-DAY);
        h.m.w.ok(Caller::System, Command::ArchiveEnded { ended_before: cut_off });
        let path = dir.path().join("archived");
        let mut sm = store_with(&h.m.w.log, &path).await;
        sm.read(|s| assert!(s.lease(h.ended_lease).is_none() && s.transactions().is_empty(), "moved out of the hot state"));
        assert_eq!(seen(&sm, &h), before, "read from the archive, exactly as before");
        // Paged as ListTransactions pages it (two lines a page, across the archive's end).
        let (mut paged, mut after) = (Vec::new(), 0);
        loop {
            let page = crate::service::paging::Page::from_wire(after, 2).expect("page");
            let lines = archived::transactions_of(&sm, h.m.researcher, None, page.after, page.limit() + 1).expect("read");
            let (ids, next) = page.take(lines.iter().map(|t| (t.id, t.id)));
            paged.extend(ids);
            if next == 0 {
                break;
            }
            after = next;
        }
        assert_eq!(paged, before.2, "every line once, in order");

        // A snapshot is the hot state; sent, it carries the archive to a node that never
        // applied the entry that archived.
        sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let sent = sm.get_current_snapshot().await.expect("read").expect("a snapshot");
        let bytes = sent.snapshot.into_bytes().expect("bytes");
        assert!(bytes.len() as u64 > sm.last_snapshot_bytes(), "the archive travels after the hot state");
        let (_, mut follower) = storage::open(&dir.path().join("follower")).expect("open");
        follower.install_snapshot(&sent.meta, Box::new(storage::SnapshotData::new(bytes))).await.expect("install");
        assert_eq!(seen(&follower, &h), before, "on the follower");

        // A backup holds it too, and a restore from it.
        let (exported, _) = sm.export().expect("export");
        let restored_path = dir.path().join("restored");
        storage::restore(&restored_path, &exported, FORMAT_VERSION, 1, "127.0.0.1:1").expect("restore");
        let (_, restored) = storage::open(&restored_path).expect("open restored");
        assert_eq!(seen(&restored, &h), before, "in a restored store");

        // And after a restart, from the stored snapshot and the archive on disk.
        drop(sm);
        let (_, reopened) = storage::open(&path).expect("reopen");
        assert_eq!(seen(&reopened, &h), before, "after a restart");
    }

    #[tokio::test]
    async fn a_snapshot_carrying_records_this_format_does_not_write_is_refused_and_installs_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let h = history();
        let mut sm = store_with(&h.m.w.log, &dir.path().join("a")).await;
        sm.get_snapshot_builder().await.build_snapshot().await.expect("build");
        let sent = sm.get_current_snapshot().await.expect("read").expect("a snapshot");
        let mut data = sent.snapshot.into_bytes().expect("bytes");
        let forged: Vec<(Vec<u8>, Vec<u8>)> = vec![(b"Zanything".to_vec(), b"value".to_vec())];
        data.extend(postcard::to_allocvec(&forged).expect("encode"));
        let (_, mut follower) = storage::open(&dir.path().join("b")).expect("open");
        let refused = follower.install_snapshot(&sent.meta, Box::new(storage::SnapshotData::new(data))).await;
        assert!(refused.is_err());
        follower.read(|s| assert_eq!(s, &State::new(), "nothing installed"));
        assert!(follower.archive().lease(h.ended_lease).expect("read").is_none());
    }
}

// ---- batches: requests that arrived together, in one entry ------------------------------------

/// Two researchers' lease requests, one refused (more cards than the cluster has), and a retry
/// of the first: what the proposer would batch.
fn requests_arriving_together(m: &mut Market) -> Vec<Envelope> {
    let first = m.w.envelope(Caller::Account(m.researcher), request_b(m.class_b, 2));
    let refused = m.w.envelope(Caller::Account(m.other_researcher), request_b(m.class_b, 99));
    let second = m.w.envelope(Caller::Account(m.other_researcher), request_b(m.class_b, 3));
    vec![first.clone(), refused, second, first]
}

#[test]
fn a_batch_applies_each_request_as_its_own_entry_would() {
    let mut one_by_one = market();
    let mut batched = State::clone(&one_by_one.w.state);
    let envelopes = requests_arriving_together(&mut one_by_one);
    let (mut outcomes, mut events) = (Vec::new(), Vec::new());
    for envelope in &envelopes {
        let (outcome, more) = one_by_one.w.state.apply(envelope);
        outcomes.push(outcome);
        events.extend(more);
    }
    let batch = Envelope {
        caller: Caller::System,
        request_id: RequestId::parse("batch").expect("id"),
        at: one_by_one.w.now,
        command: Command::Batch { envelopes: envelopes.clone() },
    };
    let (outcome, batch_events) = batched.apply(&batch);
    assert_eq!(outcome, Ok(Response::Batch(outcomes.clone())));
    assert_eq!(batch_events, events);
    assert_eq!(batched, one_by_one.w.state, "the same state either way");
    assert_eq!(postcard::to_allocvec(&batched).expect("encode"), postcard::to_allocvec(&one_by_one.w.state).expect("encode"));
    batched.check_invariants().expect("invariants");
    assert!(outcomes[0].is_ok() && outcomes[2].is_ok(), "{outcomes:?}");
    assert_eq!(outcomes[1].as_ref().map(drop).unwrap_err().code(), ErrorCode::InsufficientCapacity);
    assert_eq!(outcomes[3], outcomes[0], "the retry in the batch gets the first answer");
    // A retry of a batched request, alone, later: its first answer, nothing applied again.
    let before = batched.clone();
    assert_eq!(batched.apply(&envelopes[2]).0, outcomes[2]);
    assert_eq!(batched, before);
    // The batch itself is remembered by no one: the same batch again is answered request by
    // request from their memories, and changes nothing.
    assert_eq!(batched.apply(&batch).0, Ok(Response::Batch(outcomes)));
    assert_eq!(batched, before);
}

#[test]
fn only_the_leader_batches_and_a_batch_holds_no_batch() {
    let mut m = market();
    let envelopes = requests_arriving_together(&mut m);
    let before = m.w.state.clone();
    for caller in [Caller::Platform, Caller::Account(m.researcher), Caller::Operator(OperatorRole::Dispatcher)] {
        let forged =
            Envelope { caller, request_id: RequestId::parse("forged").expect("id"), at: m.w.now, command: Command::Batch { envelopes: envelopes.clone() } };
        let (outcome, events) = m.w.state.apply(&forged);
        assert_eq!(outcome.map(drop).unwrap_err().code(), ErrorCode::PermissionDenied);
        assert!(events.is_empty());
        assert_eq!(m.w.state, before, "nothing applied");
    }
    let inner = Envelope { caller: Caller::System, request_id: RequestId::parse("inner").expect("id"), at: m.w.now, command: Command::Batch { envelopes } };
    let nested = Envelope {
        caller: Caller::System,
        request_id: RequestId::parse("outer").expect("id"),
        at: m.w.now,
        command: Command::Batch { envelopes: vec![inner] },
    };
    match m.w.state.apply(&nested).0 {
        Ok(Response::Batch(outcomes)) => {
            assert_eq!(outcomes.len(), 1);
            assert_eq!(outcomes[0].as_ref().map(drop).unwrap_err().code(), ErrorCode::InvalidArgument);
        }
        other => panic!("expected the batch's outcomes, got {other:?}"),
    }
    assert_eq!(m.w.state, before, "the nested batch's requests were never applied");
}
