//! The market over months: suppliers joining and leaving, cards failing and recovering,
//! researchers leasing within budgets (by hand and through jobs that auto-lease), billing, and
//! federation members leasing each other's cards — all through the broker's own state machine
//! (`suanli_broker::state::State`, the code every broker replica applies), never a copy of it.
//!
//! Each federation member is its own `State` (no member gives up its cards). The simulator
//! plays everyone around the brokers: the suppliers' agents (activation, card health), the
//! researchers (catalogue search, requests, early ends), the scheduler (auto-lease, placement),
//! the leader's reaper (settlement every hour, expiry, archiving every day) and the
//! federation gateways (remote leases with the hold on the home member and the lease on the
//! owner, the charge the owner's ledger shows carried back). What members know of each other's
//! offers is what their last announcement said, `announce_every_s` apart, each arriving after a
//! gossip delay drawn from delays measured on real federation nodes (`crate::gossip`).
//!
//! Discrete events in a heap ordered by (time, sequence): the same config and seed give the same
//! commands in the same order, hence the same bytes out. Every day every member's
//! `check_invariants` runs; a violation ends the run with an error (a card leased twice, money
//! created or lost, a lease in two states).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt::Write as _;
use std::time::Instant;

use suanli_broker::state::machine::ledger::{MAX_DEPOSIT_MINOR, MAX_SETTLEMENTS_PER_COMMAND};
use suanli_broker::state::{Archived, Command, Envelope, Response, State};
use suanli_types::{
    AccountId, AccountKind, BillingMode, Caller, CardHealth, CardId, CardSpec, CatalogueFilter, ClusterClass, ClusterId, Currency, DiskMedium, DomainError,
    EndReason, ErrorCode, JobEndReason, JobId, JobSpec, LeaseId, LeaseUnit, LedgerAccount, Listing, LocalStorage, Money, NodeId, NodeInventory, PageRequest,
    PriceList, RemoteLeaseId, RequestId, ResourceType, SecretHash, Timestamp, Transaction, TransactionKind,
};

use crate::rng::SplitMix64;

/// The simulated clock starts here (2027-01-01T00:00:00Z): any fixed instant would do.
const EPOCH_MS: i64 = 1_798_761_600_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;
/// A Class B node's agent confirms provisioning this long after the request.
const PROVISION_MS: i64 = 120_000;
/// The card models on offer: name, memory, the typical price per card-hour (fen), share of nodes.
pub const MODELS: [(&str, u32, i64, u32); 4] = [("RTX 4090", 24, 250, 30), ("L40S", 48, 700, 30), ("A100 80GB", 80, 1_200, 25), ("H100 80GB", 80, 2_000, 15)];

#[derive(Clone, Debug, PartialEq)]
pub struct MarketConfig {
    pub seed: u64,
    pub days: u32,
    /// Federation members; 1 is a single marketplace.
    pub members: u32,
    /// Suppliers per member on day 0.
    pub suppliers: u32,
    /// New suppliers per member per day (Poisson).
    pub supplier_joins_per_day: f64,
    /// Mean days a supplier stays listed (exponential); 0 means forever.
    pub supplier_stay_days: f64,
    /// Nodes per supplier, uniform in 1..=this.
    pub max_nodes_per_supplier: u32,
    pub cards_per_node: u32,
    /// Researchers per member.
    pub researchers: u32,
    /// Lease demands per member per day (Poisson).
    pub demands_per_day: f64,
    /// Median hours a demand wants (log-normal, σ = 1.2, capped at 90 days).
    pub median_lease_hours: f64,
    /// Share of demands that come as jobs which auto-lease (at most one day each).
    pub auto_lease_share: f64,
    /// Paid in for every researcher every 30 days (fen).
    pub monthly_budget_minor: i64,
    /// Mean days between faults of one card (exponential), and mean hours to repair one.
    pub card_mtbf_days: f64,
    pub repair_hours: f64,
    /// How long a demand keeps trying before it gives up, and how often it tries.
    pub patience_hours: f64,
    pub retry_minutes: u32,
    /// Share of leases the researcher ends before their term.
    pub early_end_share: f64,
    /// Every so many days each supplier re-prices: +5 % above 80 % of its cards leased, −5 %
    /// below 30 % (never below half its starting price); 0 never.
    pub reprice_every_days: u32,
    /// Federation: members lease each other's cards (false: the same members, each alone, to
    /// see what federation changes).
    pub federated: bool,
    /// Members announce their offers this often...
    pub announce_every_s: u64,
    /// ...and an announcement reaches another member after one of these delays (ms), drawn
    /// per announcement and member; empty means at once.
    pub gossip_delays_ms: Vec<f64>,
}

impl Default for MarketConfig {
    fn default() -> Self {
        MarketConfig {
            seed: 1,
            days: 365,
            members: 1,
            suppliers: 60,
            supplier_joins_per_day: 0.3,
            supplier_stay_days: 240.0,
            max_nodes_per_supplier: 4,
            cards_per_node: 8,
            researchers: 400,
            demands_per_day: 600.0,
            median_lease_hours: 6.0,
            auto_lease_share: 0.3,
            monthly_budget_minor: 2_000_000,
            card_mtbf_days: 120.0,
            repair_hours: 24.0,
            patience_hours: 12.0,
            retry_minutes: 30,
            early_end_share: 0.3,
            reprice_every_days: 7,
            federated: true,
            announce_every_s: 5,
            gossip_delays_ms: Vec::new(),
        }
    }
}

impl MarketConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("days", f64::from(self.days)),
            ("members", f64::from(self.members)),
            ("max_nodes_per_supplier", f64::from(self.max_nodes_per_supplier)),
            ("cards_per_node", f64::from(self.cards_per_node)),
            ("researchers", f64::from(self.researchers)),
            ("median_lease_hours", self.median_lease_hours),
            ("card_mtbf_days", self.card_mtbf_days),
            ("repair_hours", self.repair_hours),
            ("retry_minutes", f64::from(self.retry_minutes)),
            ("announce_every_s", self.announce_every_s as f64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| !(v.is_finite() && *v > 0.0)) {
            return Err(format!("{name} must be positive"));
        }
        let shares = [("auto_lease_share", self.auto_lease_share), ("early_end_share", self.early_end_share)];
        if let Some((name, _)) = shares.iter().find(|(_, v)| !(0.0..=1.0).contains(v)) {
            return Err(format!("{name} must be within 0 and 1"));
        }
        let rates = [
            ("supplier_joins_per_day", self.supplier_joins_per_day),
            ("supplier_stay_days", self.supplier_stay_days),
            ("demands_per_day", self.demands_per_day),
            ("patience_hours", self.patience_hours),
        ];
        if let Some((name, _)) = rates.iter().find(|(_, v)| !(v.is_finite() && *v >= 0.0)) {
            return Err(format!("{name} must not be negative"));
        }
        if self.monthly_budget_minor <= 0 || self.monthly_budget_minor > MAX_DEPOSIT_MINOR {
            return Err("monthly_budget_minor must be positive and at most one deposit".into());
        }
        let limits = [
            ("cards_per_node", f64::from(self.cards_per_node), 64.0),
            ("max_nodes_per_supplier", f64::from(self.max_nodes_per_supplier), 1024.0),
            ("members", f64::from(self.members), 64.0),
            ("days", f64::from(self.days), 36_500.0),
        ];
        if let Some((name, _, max)) = limits.iter().find(|(_, v, max)| v > max) {
            return Err(format!("{name} is at most {max}"));
        }
        if self.suppliers == 0 && self.supplier_joins_per_day == 0.0 {
            return Err("suppliers and supplier_joins_per_day are both 0: a market without cards".into());
        }
        if self.gossip_delays_ms.iter().any(|d| !(d.is_finite() && *d >= 0.0)) {
            return Err("gossip delays must be finite and not negative".into());
        }
        Ok(())
    }
}

/// Everything a run produced: the deterministic outputs and the measured apply times.
pub struct MarketRun {
    pub summary: Summary,
    pub suppliers: Vec<SupplierRow>,
    pub researchers: Vec<ResearcherRow>,
    /// One row per member and simulated hour.
    pub timeline: Vec<HourRow>,
    /// Wall-clock nanoseconds per applied command, by command name (measured, not deterministic).
    pub apply_ns: BTreeMap<&'static str, Vec<u64>>,
    /// The broker's refusals counted in `Summary::refused_other`, by error code.
    pub refusals: BTreeMap<ErrorCode, u64>,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub days: u32,
    pub members: u32,
    pub suppliers_joined: u64,
    pub suppliers_left: u64,
    pub cards_at_end: u64,
    pub demands: u64,
    pub leased_local: u64,
    pub leased_remote: u64,
    pub leased_auto: u64,
    /// Demands that gave up waiting for cards within their price.
    pub gave_up: u64,
    /// Requests the researcher's balance could not cover.
    pub refused_funds: u64,
    /// Requests a broker refused for one of its limits (waiting leases, remote leases per
    /// researcher): the demand retried.
    pub refused_other: u64,
    /// Remote requests that failed on a stale announcement: the owner's cards had gone, or its
    /// price had risen (that lease given back at once).
    pub remote_stale: u64,
    pub card_faults: u64,
    /// Leases that had a card fault while active (service credit), and auto-leased jobs a
    /// fault interrupted (mid-run, or between the lease and the job's start).
    pub leases_with_fault: u64,
    pub jobs_interrupted: u64,
    pub ended_early: u64,
    /// Money, fen, over every member's ledger: charges (a member's local charges, those to
    /// other members' partner accounts, and its researchers' remote charges to the federation
    /// payable), what suppliers earned, the platform's fees, service credits and refunds.
    pub charged_minor: i64,
    pub supplier_earnings_minor: i64,
    pub platform_fees_minor: i64,
    pub service_credits_minor: i64,
    pub refunds_minor: i64,
    /// Federation: what members owe each other for their researchers' remote leases (their
    /// `federation_payable` balances), and what the owners charged the partner accounts.
    pub federation_payable_minor: i64,
    pub partners_charged_minor: i64,
    /// Of which, charged on remote leases still running at the end (not yet owed).
    pub remote_open_charged_minor: i64,
    /// Mean over members' hours of leased cards / cards of listed clusters.
    pub mean_utilisation: f64,
    /// Mean and p95 of the wait from a demand to its lease request's acceptance, seconds.
    pub mean_wait_s: f64,
    pub p95_wait_s: f64,
    /// The mean price paid per card-hour at request (fen), and its first and last month.
    pub mean_price_per_card_hour: f64,
    pub price_first_month: f64,
    pub price_last_month: f64,
    pub commands_applied: u64,
    pub commands_refused: u64,
    pub records_archived: u64,
    pub invariant_checks: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SupplierRow {
    pub member: u32,
    pub supplier: AccountId,
    pub model: &'static str,
    pub cards: u32,
    pub joined_day: f64,
    pub left_day: Option<f64>,
    pub start_price: i64,
    pub end_price: i64,
    pub leases: u64,
    pub earnings_minor: i64,
    /// The broker's reliability score (mean of its last evaluations) and how many there were.
    pub reliability: Option<(u32, usize)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResearcherRow {
    pub member: u32,
    pub researcher: AccountId,
    pub demands: u64,
    pub leases: u64,
    pub remote_leases: u64,
    pub gave_up: u64,
    pub deposited_minor: i64,
    /// Deposits minus what is left (available, held, held for remote leases).
    pub spent_minor: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HourRow {
    pub member: u32,
    pub hour: u64,
    pub listed_cards: u64,
    pub healthy_listed: u64,
    /// Leased cards of every cluster (a delisted one's run to their end), and of listed ones.
    pub leased_cards: u64,
    pub leased_listed: u64,
    pub waiting_demands: u64,
    pub live_leases: u64,
}

#[derive(Clone, Debug)]
struct Demand {
    member: usize,
    researcher: usize,
    cards: u32,
    hours: f64,
    min_vram: u32,
    /// The most the researcher pays per card-hour.
    max_price_hour: i64,
    auto: bool,
    submitted_ms: i64,
    job: Option<JobId>,
}

#[derive(Clone, Debug)]
enum Event {
    SupplierJoins { member: usize },
    SupplierLeaves { member: usize, supplier: usize },
    CardFault,
    CardRepaired { member: usize, card: CardId },
    Demand(Box<Demand>),
    Activate { member: usize, lease: LeaseId },
    EndEarly { member: usize, lease: LeaseId },
    Expire { member: usize, lease: LeaseId },
    JobDone { member: usize, lease: LeaseId, job: JobId, node: NodeId },
    Announce { member: usize },
    Hourly,
    Daily { day: u32 },
}

/// Who a lease serves, for what happens at its end.
#[derive(Clone, Debug)]
struct LeaseTag {
    home: usize,
    researcher: usize,
    /// A lease of this member's cards for another member's researcher: the home member's remote lease.
    remote: Option<RemoteLeaseId>,
    job: Option<(JobId, f64)>,
    had_fault: bool,
}

struct SupplierState {
    account: AccountId,
    cluster: ClusterId,
    model: usize,
    cards: u32,
    joined_ms: i64,
    left_ms: Option<i64>,
    start_price: i64,
    price: i64,
    leases: u64,
}

struct ResearcherState {
    account: AccountId,
    demands: u64,
    leases: u64,
    remote_leases: u64,
    gave_up: u64,
    deposited: i64,
}

/// One offer as a member's announcement tells it.
#[derive(Clone, Debug)]
struct Offer {
    cluster: ClusterId,
    vram_gib: u32,
    price_hour: i64,
    idle: u32,
}

struct Member {
    name: String,
    state: State,
    seq: u64,
    suppliers: Vec<SupplierState>,
    researchers: Vec<ResearcherState>,
    /// At this member, the account each other member's gateway leases with (by member index),
    /// and what was paid into it.
    partners: Vec<Option<AccountId>>,
    partner_deposits: Vec<i64>,
    scheduler_epoch: u64,
    /// Its announcements: (time, offers), oldest first; kept while another member may still use them.
    announcements: VecDeque<(i64, u64, Vec<Offer>)>,
    /// A command changed the state since the last announcement (an unchanged catalogue
    /// announced again would tell the others nothing new: skipped, to save the work).
    changed: bool,
    waiting: u64,
}

struct Market<'a> {
    config: &'a MarketConfig,
    rng: SplitMix64,
    now: i64,
    /// The run ends here: events at or after it are not handled.
    end: i64,
    seq: u64,
    events: BinaryHeap<Reverse<(i64, u64, usize)>>,
    slots: Vec<Option<Event>>,
    free_slots: Vec<usize>,
    members: Vec<Member>,
    tags: BTreeMap<(usize, LeaseId), LeaseTag>,
    /// Every card of every member (failures pick uniformly among them).
    all_cards: Vec<(usize, CardId)>,
    summary: Summary,
    waits_s: Vec<f64>,
    /// (day, price per card-hour) of each request, for the price index.
    prices: Vec<(u32, i64)>,
    timeline: Vec<HourRow>,
    apply_ns: BTreeMap<&'static str, Vec<u64>>,
    refusals: BTreeMap<ErrorCode, u64>,
}

/// Runs the market: the outputs, or the first rule a member's state broke.
pub fn run(config: &MarketConfig) -> Result<MarketRun, String> {
    config.validate()?;
    let started = Instant::now();
    let end = EPOCH_MS + i64::from(config.days) * DAY_MS;
    let mut m = Market {
        config,
        rng: SplitMix64::new(config.seed),
        now: EPOCH_MS,
        end,
        seq: 0,
        events: BinaryHeap::new(),
        slots: Vec::new(),
        free_slots: Vec::new(),
        members: Vec::new(),
        tags: BTreeMap::new(),
        all_cards: Vec::new(),
        summary: Summary { days: config.days, members: config.members, ..Summary::default() },
        waits_s: Vec::new(),
        prices: Vec::new(),
        timeline: Vec::new(),
        apply_ns: BTreeMap::new(),
        refusals: BTreeMap::new(),
    };
    m.start()?;
    while let Some(Reverse((at, _, slot))) = m.events.pop() {
        if at >= end {
            break;
        }
        m.now = at;
        let event = m.slots[slot].take().expect("an event in its slot");
        m.free_slots.push(slot);
        m.handle(event)?;
    }
    m.now = end;
    Ok(m.finish(started.elapsed().as_secs_f64()))
}

impl Market<'_> {
    fn schedule(&mut self, at: i64, event: Event) {
        self.seq += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(event);
                s
            }
            None => {
                self.slots.push(Some(event));
                self.slots.len() - 1
            }
        };
        self.events.push(Reverse((at, self.seq, slot)));
    }

    /// Applies one command on a member's broker state, as its leader would at `now`.
    fn apply(&mut self, member: usize, caller: Caller, command: Command) -> Result<Response, DomainError> {
        let mb = &mut self.members[member];
        mb.seq += 1;
        let request_id = RequestId::parse(&format!("sim-{}", mb.seq)).expect("a valid request ID");
        let name = command.name();
        let envelope = Envelope { caller, request_id, at: Timestamp::from_millis(self.now), command };
        let t = Instant::now();
        let (outcome, _events) = mb.state.apply(&envelope);
        self.apply_ns.entry(name).or_default().push(t.elapsed().as_nanos() as u64);
        match outcome {
            Ok(_) => {
                self.summary.commands_applied += 1;
                self.members[member].changed = true;
            }
            Err(_) => self.summary.commands_refused += 1,
        }
        outcome
    }

    /// A command the simulation's own bookkeeping needs to succeed.
    fn must(&mut self, member: usize, caller: Caller, command: Command) -> Result<Response, String> {
        let name = command.name();
        self.apply(member, caller, command).map_err(|e| format!("member {member}: {name} refused at {}: {e}", self.now))
    }

    fn start(&mut self) -> Result<(), String> {
        let c = self.config;
        for i in 0..c.members as usize {
            self.members.push(Member {
                name: format!("m{i}"),
                state: State::new(),
                seq: 0,
                suppliers: Vec::new(),
                researchers: Vec::new(),
                partners: vec![None; c.members as usize],
                partner_deposits: vec![0; c.members as usize],
                scheduler_epoch: 0,
                announcements: VecDeque::new(),
                changed: true,
                waiting: 0,
            });
            for _ in 0..c.researchers {
                let account = self.register(i, AccountKind::Researcher)?;
                self.members[i].researchers.push(ResearcherState { account, demands: 0, leases: 0, remote_leases: 0, gave_up: 0, deposited: 0 });
            }
            for _ in 0..c.suppliers {
                self.join_supplier(i)?;
            }
            // Each other member's gateway has an account here, paid in as its partner agreement says.
            for other in 0..c.members as usize {
                if other != i {
                    let partner = self.register(i, AccountKind::Researcher)?;
                    self.members[i].partners[other] = Some(partner);
                }
            }
            if c.members > 1 && c.federated {
                self.schedule(self.now, Event::Announce { member: i });
            }
            self.next_demand(i);
            self.next_supplier_join(i);
        }
        self.next_card_fault();
        self.schedule(self.now + HOUR_MS, Event::Hourly);
        self.schedule(self.now, Event::Daily { day: 0 });
        Ok(())
    }

    fn register(&mut self, member: usize, kind: AccountKind) -> Result<AccountId, String> {
        let token_hash = SecretHash::of("api-token", &format!("sim-{member}-{}", self.members[member].seq));
        match self.must(member, Caller::Platform, Command::RegisterAccount { kind, token_hash })? {
            Response::Account(id) => Ok(id),
            other => Err(format!("RegisterAccount answered {other:?}")),
        }
    }

    /// Takes or renews the scheduler's leader lease (at most a minute long) before the
    /// scheduler acts, as the scheduler service does every round.
    fn acquire_scheduler(&mut self, member: usize) -> Result<(), String> {
        let command = Command::AcquireSchedulerLease { holder: "sim-scheduler".into(), ttl_ms: 60_000 };
        match self.must(member, Caller::Platform, command)? {
            Response::SchedulerLease(l) => {
                self.members[member].scheduler_epoch = l.epoch;
                Ok(())
            }
            other => Err(format!("AcquireSchedulerLease answered {other:?}")),
        }
    }

    /// The instant an exponential wait with this mean (ms) after now ends: at least 1 ms
    /// later, and never past the run's end by more than a day (a wait past the end is never
    /// handled; capping it keeps huge means from overflowing the clock).
    fn after_exponential(&mut self, mean_ms: f64) -> i64 {
        let wait = self.rng.exponential(mean_ms);
        let horizon = (self.end - self.now + DAY_MS) as f64;
        self.now + (wait.min(horizon) as i64).max(1)
    }

    fn next_supplier_join(&mut self, member: usize) {
        if self.config.supplier_joins_per_day > 0.0 {
            let at = self.after_exponential(DAY_MS as f64 / self.config.supplier_joins_per_day);
            self.schedule(at, Event::SupplierJoins { member });
        }
    }

    fn next_demand(&mut self, member: usize) {
        if self.config.demands_per_day > 0.0 {
            let at = self.after_exponential(DAY_MS as f64 / self.config.demands_per_day);
            let demand = self.draw_demand(member, at);
            self.schedule(demand.submitted_ms, Event::Demand(Box::new(demand)));
        }
    }

    /// The next fault among all cards (a Poisson process at cards / MTBF); with no cards yet,
    /// a look again in an hour.
    fn next_card_fault(&mut self) {
        if self.all_cards.is_empty() {
            self.schedule(self.now + HOUR_MS, Event::CardFault);
            return;
        }
        let at = self.after_exponential(self.config.card_mtbf_days * DAY_MS as f64 / self.all_cards.len() as f64);
        self.schedule(at, Event::CardFault);
    }

    fn draw_demand(&mut self, member: usize, at: i64) -> Demand {
        let c = self.config;
        let researcher = (self.rng.next_u64() % u64::from(c.researchers)) as usize;
        // Philly-like sizes: mostly one card, some 2, 4 and 8.
        let u = self.rng.unit();
        let cards: u32 = if u < 0.55 {
            1
        } else if u < 0.75 {
            2
        } else if u < 0.9 {
            4
        } else {
            8
        };
        // Never more than the largest cluster a supplier can list.
        let cards = cards.min(c.cards_per_node.saturating_mul(c.max_nodes_per_supplier));
        let auto = self.rng.unit() < c.auto_lease_share;
        let hours = (c.median_lease_hours * (1.2 * self.rng.normal()).exp()).clamp(0.25, if auto { 24.0 } else { 90.0 * 24.0 });
        let model = self.pick_model();
        let (_, min_vram, base, _) = MODELS[model];
        // Willing to pay up to 1.2–2× the typical price of the smallest model that fits.
        let max_price_hour = (base as f64 * (1.2 + 0.8 * self.rng.unit())).round() as i64;
        Demand { member, researcher, cards, hours, min_vram, max_price_hour, auto, submitted_ms: at, job: None }
    }

    fn pick_model(&mut self) -> usize {
        let total: u32 = MODELS.iter().map(|m| m.3).sum();
        let mut x = (self.rng.next_u64() % u64::from(total)) as u32;
        for (i, m) in MODELS.iter().enumerate() {
            if x < m.3 {
                return i;
            }
            x -= m.3;
        }
        MODELS.len() - 1
    }

    fn join_supplier(&mut self, member: usize) -> Result<(), String> {
        let account = self.register(member, AccountKind::Supplier)?;
        let index = self.members[member].suppliers.len();
        let model = self.pick_model();
        let (name, vram, base, _) = MODELS[model];
        let price = (base as f64 * (0.7 + 0.6 * self.rng.unit())).round() as i64;
        let nodes = 1 + (self.rng.next_u64() % u64::from(self.config.max_nodes_per_supplier)) as u32;
        let mut node_ids = Vec::new();
        for n in 0..nodes {
            let tag = format!("m{member}-s{index}-n{n}");
            let inventory = NodeInventory {
                hostname: format!("{tag}.sim"),
                cpu_model: "Intel Xeon".into(),
                vcpus: 64,
                memory_gib: 512,
                cards: (0..self.config.cards_per_node)
                    .map(|i| CardSpec { index: i, uuid: format!("GPU-{tag}-{i}"), model: name.into(), vram_mib: u64::from(vram) * 1024, ..Default::default() })
                    .collect(),
                ..Default::default()
            };
            match self.must(member, Caller::Account(account), Command::EnrollNode { inventory })? {
                Response::Node(node) => {
                    self.all_cards.extend(node.cards.iter().map(|c| (member, *c)));
                    node_ids.push(node.id);
                }
                other => return Err(format!("EnrollNode answered {other:?}")),
            }
        }
        let region = self.members[member].name.clone();
        let command = Command::PublishCluster { class: ClusterClass::B, nodes: node_ids, listing: listing(model, price, &region) };
        let cluster = match self.must(member, Caller::Account(account), command)? {
            Response::Cluster(c) => c.id,
            other => return Err(format!("PublishCluster answered {other:?}")),
        };
        self.members[member].suppliers.push(SupplierState {
            account,
            cluster,
            model,
            cards: nodes * self.config.cards_per_node,
            joined_ms: self.now,
            left_ms: None,
            start_price: price,
            price,
            leases: 0,
        });
        self.summary.suppliers_joined += 1;
        if self.config.supplier_stay_days > 0.0 {
            let at = self.after_exponential(self.config.supplier_stay_days * DAY_MS as f64);
            self.schedule(at, Event::SupplierLeaves { member, supplier: index });
        }
        Ok(())
    }

    fn handle(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::SupplierJoins { member } => {
                self.join_supplier(member)?;
                self.next_supplier_join(member);
            }
            Event::SupplierLeaves { member, supplier } => {
                let s = &self.members[member].suppliers[supplier];
                let (account, cluster) = (s.account, s.cluster);
                // Its leases run to their end; nobody can lease its cards any more.
                self.must(member, Caller::Account(account), Command::DelistCluster { cluster })?;
                self.members[member].suppliers[supplier].left_ms = Some(self.now);
                self.summary.suppliers_left += 1;
            }
            Event::CardFault if self.all_cards.is_empty() => self.next_card_fault(),
            Event::CardFault => {
                let (member, card) = self.all_cards[(self.rng.next_u64() % self.all_cards.len() as u64) as usize];
                let healthy = self.members[member].state.card(card).is_some_and(|c| c.health == CardHealth::Healthy);
                if healthy {
                    self.must(member, Caller::System, Command::SetCardHealth { changes: vec![(card, CardHealth::XidError)] })?;
                    self.summary.card_faults += 1;
                    if let Some(lease) = self.members[member].state.card(card).and_then(|c| c.lease) {
                        if let Some(tag) = self.tags.get_mut(&(member, lease)) {
                            tag.had_fault = true;
                        }
                        self.interrupt_job(member, lease, card)?;
                    }
                    let at = self.after_exponential(self.config.repair_hours * HOUR_MS as f64);
                    self.schedule(at, Event::CardRepaired { member, card });
                }
                self.next_card_fault();
            }
            Event::CardRepaired { member, card } => {
                self.must(member, Caller::System, Command::SetCardHealth { changes: vec![(card, CardHealth::Healthy)] })?;
            }
            Event::Demand(demand) => self.demand(*demand)?,
            Event::Activate { member, lease } => self.activate(member, lease)?,
            Event::EndEarly { member, lease } => {
                let Some(tag) = self.tags.get(&(member, lease)).cloned() else { return Ok(()) };
                let live = self.members[member].state.lease(lease).is_some_and(|l| l.state.is_live());
                if live {
                    let caller = self.lessee(member, &tag);
                    self.must(member, caller, Command::EndLease { lease, reason: EndReason::ByResearcher })?;
                    self.summary.ended_early += 1;
                    self.lease_over(member, lease)?;
                }
            }
            Event::Expire { member, lease } => {
                let live = self.members[member].state.lease(lease).is_some_and(|l| l.state.is_live());
                if live {
                    self.must(member, Caller::System, Command::ExpireLease { lease })?;
                    self.lease_over(member, lease)?;
                }
            }
            Event::JobDone { member, lease, job, node } => self.job_done(member, lease, job, node)?,
            Event::Announce { member } => {
                self.announce(member);
                self.schedule(self.now + self.config.announce_every_s as i64 * 1000, Event::Announce { member });
            }
            Event::Hourly => {
                self.hourly()?;
                self.schedule(self.now + HOUR_MS, Event::Hourly);
            }
            Event::Daily { day } => {
                self.daily(day)?;
                self.schedule(self.now + DAY_MS, Event::Daily { day: day + 1 });
            }
        }
        Ok(())
    }

    /// Who ends a lease on the lessee's behalf: the researcher, the home member's gateway
    /// (through its partner account) or the scheduler that auto-leased it.
    fn lessee(&self, member: usize, tag: &LeaseTag) -> Caller {
        if tag.remote.is_some() {
            Caller::Account(self.members[member].partners[tag.home].expect("a partner account"))
        } else if tag.job.is_some() {
            Caller::Platform
        } else {
            Caller::Account(self.members[tag.home].researchers[tag.researcher].account)
        }
    }

    fn demand(&mut self, mut d: Demand) -> Result<(), String> {
        let first_try = d.submitted_ms == self.now && d.job.is_none();
        if first_try {
            self.members[d.member].researchers[d.researcher].demands += 1;
            self.summary.demands += 1;
            self.next_demand(d.member);
        }
        let outcome = if d.auto { self.try_auto(&mut d)? } else { self.try_lease(&d)? };
        match outcome {
            Try::Leased => {
                self.waits_s.push((self.now - d.submitted_ms) as f64 / 1000.0);
                if !first_try {
                    self.members[d.member].waiting -= 1;
                }
            }
            Try::Refused => {
                if !first_try {
                    self.members[d.member].waiting -= 1;
                }
            }
            Try::NoCards => {
                let next = self.now + i64::from(self.config.retry_minutes) * 60_000;
                if (next - d.submitted_ms) as f64 <= self.config.patience_hours * HOUR_MS as f64 {
                    if first_try {
                        self.members[d.member].waiting += 1;
                    }
                    self.schedule(next, Event::Demand(Box::new(d)));
                } else {
                    if !first_try {
                        self.members[d.member].waiting -= 1;
                    }
                    self.summary.gave_up += 1;
                    self.members[d.member].researchers[d.researcher].gave_up += 1;
                    if let Some(job) = d.job {
                        let owner = self.members[d.member].researchers[d.researcher].account;
                        self.must(d.member, Caller::Account(owner), Command::CancelJob { job })?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The billing mode and periods for `hours`: by the hour under a day, by the day under a
    /// month, else by the month.
    fn term(hours: f64) -> (BillingMode, u32) {
        if hours < 24.0 {
            (BillingMode::Hourly, hours.ceil() as u32)
        } else if hours < 30.0 * 24.0 {
            (BillingMode::Daily, (hours / 24.0).ceil() as u32)
        } else {
            (BillingMode::Monthly, (hours / (30.0 * 24.0)).ceil() as u32)
        }
    }

    /// The cheapest listed cluster of `member` with the cards, memory and price the demand
    /// wants, from the broker's own catalogue query (paged as the portal pages it).
    fn cheapest_local(&self, member: usize, d: &Demand, mode: BillingMode) -> Option<(ClusterId, i64)> {
        let filter = CatalogueFilter {
            class: Some(ClusterClass::B),
            min_vram_gib: Some(d.min_vram),
            min_idle_cards: Some(d.cards),
            billing_mode: Some(mode),
            max_price_minor: Some(d.max_price_hour * hours_priced(mode)),
            ..CatalogueFilter::default()
        };
        let state = &self.members[member].state;
        let mut page = PageRequest { after: None, limit: PageRequest::MAX_LIMIT };
        let mut best: Option<(i64, ClusterId)> = None;
        loop {
            let (summaries, next) = state.catalogue(&filter, &page).ok()?;
            for s in summaries {
                let price = s.cluster.listing.prices.price(mode).ok()?;
                if best.is_none_or(|b| (price, s.cluster.id) < b) {
                    best = Some((price, s.cluster.id));
                }
            }
            match next {
                Some(after) => page.after = Some(after),
                None => break,
            }
        }
        best.map(|(price, cluster)| (cluster, price))
    }

    fn try_lease(&mut self, d: &Demand) -> Result<Try, String> {
        let (mode, periods) = Self::term(d.hours);
        if let Some((cluster, price)) = self.cheapest_local(d.member, d, mode) {
            let researcher = self.members[d.member].researchers[d.researcher].account;
            let command = Command::RequestLease { cluster, unit: LeaseUnit::Cards(d.cards), billing_mode: mode, periods };
            return match self.apply(d.member, Caller::Account(researcher), command) {
                Ok(Response::Lease(l)) => {
                    self.leased(d, d.member, l.id, l.cluster, None, None, price, mode);
                    Ok(Try::Leased)
                }
                Ok(other) => Err(format!("RequestLease answered {other:?}")),
                Err(e) if e.code() == ErrorCode::InsufficientFunds => {
                    self.summary.refused_funds += 1;
                    Ok(Try::Refused)
                }
                Err(e) => {
                    // A broker limit (waiting leases per researcher, …): the demand tries again.
                    self.refused_other(&e);
                    Ok(Try::NoCards)
                }
            };
        }
        self.try_remote(d, mode, periods)
    }

    /// A lease of another member's cards, as the gateways do it: the home member holds the
    /// price from the researcher (`RequestRemoteLease`), the owner leases its cards to the home
    /// member's partner account, the home member records the owner's lease.
    fn try_remote(&mut self, d: &Demand, mode: BillingMode, periods: u32) -> Result<Try, String> {
        if self.members.len() < 2 || !self.config.federated {
            return Ok(Try::NoCards);
        }
        let mut best: Option<(i64, usize, ClusterId)> = None;
        for owner in 0..self.members.len() {
            if owner == d.member {
                continue;
            }
            for offer in self.view(d.member, owner) {
                let price = offer.price_hour * hours_priced(mode);
                if offer.idle >= d.cards
                    && offer.vram_gib >= d.min_vram
                    && offer.price_hour <= d.max_price_hour
                    && best.is_none_or(|b| (price, owner, offer.cluster) < b)
                {
                    best = Some((price, owner, offer.cluster));
                }
            }
        }
        let Some((price, owner, cluster)) = best else { return Ok(Try::NoCards) };
        let researcher = self.members[d.member].researchers[d.researcher].account;
        let request = Command::RequestRemoteLease {
            researcher,
            member: format!("peer-{owner}"),
            member_name: self.members[owner].name.clone(),
            remote_cluster: cluster.0,
            cards: d.cards,
            billing_mode: mode,
            periods,
            price_per_card: Money::new(Currency::cny(), price),
        };
        let remote = match self.apply(d.member, Caller::Platform, request) {
            Ok(Response::RemoteLease(r)) => r.id,
            Ok(other) => return Err(format!("RequestRemoteLease answered {other:?}")),
            Err(e) if e.code() == ErrorCode::InsufficientFunds => {
                self.summary.refused_funds += 1;
                return Ok(Try::Refused);
            }
            Err(e) => {
                // A broker limit (remote leases per researcher): the demand tries again.
                self.refused_other(&e);
                return Ok(Try::NoCards);
            }
        };
        let partner = self.members[owner].partners[d.member].expect("a partner account");
        self.top_up_partner(owner, d.member, price * i64::from(d.cards) * i64::from(periods))?;
        let command = Command::RequestLease { cluster, unit: LeaseUnit::Cards(d.cards), billing_mode: mode, periods };
        match self.apply(owner, Caller::Account(partner), command) {
            Ok(Response::Lease(l)) if l.price_per_card.minor > price => {
                // Re-priced above the announcement since: given back at once, as the gateway
                // does (nothing used, nothing charged), and the hold returned.
                self.must(owner, Caller::Account(partner), Command::EndLease { lease: l.id, reason: EndReason::ByResearcher })?;
                self.must(d.member, Caller::Platform, Command::EndRemoteLease { remote, charged_minor: 0 })?;
                self.summary.remote_stale += 1;
                Ok(Try::NoCards)
            }
            Ok(Response::Lease(l)) => {
                self.must(d.member, Caller::Platform, Command::ConfirmRemoteLease { remote, remote_lease: l.id.0 })?;
                self.leased(d, owner, l.id, l.cluster, Some(remote), None, price, mode);
                Ok(Try::Leased)
            }
            Ok(other) => Err(format!("RequestLease answered {other:?}")),
            Err(e) => {
                // The announcement was stale (the cards went, the cluster was delisted or
                // re-priced), or a limit of the owner's: nothing was charged; the hold goes back.
                self.must(d.member, Caller::Platform, Command::EndRemoteLease { remote, charged_minor: 0 })?;
                match e.code() {
                    ErrorCode::InsufficientCapacity | ErrorCode::CardUnavailable | ErrorCode::ClusterDelisted | ErrorCode::NotFound => {
                        self.summary.remote_stale += 1
                    }
                    _ => self.refused_other(&e),
                }
                Ok(Try::NoCards)
            }
        }
    }

    /// Counts a request a broker refused for a reason other than funds or capacity (one of its
    /// per-researcher limits): the demand tries again later.
    fn refused_other(&mut self, e: &DomainError) {
        self.summary.refused_other += 1;
        *self.refusals.entry(e.code()).or_default() += 1;
    }

    /// The home member's partner account at `owner` is paid in before its balance could not
    /// cover `needed`, as the members' agreement says (here: whatever the researchers lease).
    fn top_up_partner(&mut self, owner: usize, home: usize, needed: i64) -> Result<(), String> {
        let Some(partner) = self.members[owner].partners[home] else { return Ok(()) };
        let cny = Currency::cny();
        while self.members[owner].state.balance(LedgerAccount::Available(partner), &cny) < needed {
            let amount = Money::new(cny.clone(), MAX_DEPOSIT_MINOR / 10);
            self.members[owner].partner_deposits[home] += amount.minor;
            self.must(owner, Caller::Platform, Command::Deposit { account: partner, amount })?;
        }
        Ok(())
    }

    /// What `home` knows of `owner`'s offers now: its latest announcement that has arrived.
    fn view(&self, home: usize, owner: usize) -> &[Offer] {
        let anns = &self.members[owner].announcements;
        for (at, n, offers) in anns.iter().rev() {
            if *at + self.gossip_delay_ms(owner, *n, home) <= self.now {
                return offers;
            }
        }
        &[]
    }

    /// The gossip delay of `owner`'s announcement `n` to `home`: a draw from the measured delays,
    /// the same for the same triple.
    fn gossip_delay_ms(&self, owner: usize, n: u64, home: usize) -> i64 {
        let delays = &self.config.gossip_delays_ms;
        if delays.is_empty() {
            return 0;
        }
        let mut r = SplitMix64::new(self.config.seed ^ (owner as u64).wrapping_mul(0x9e37_79b9) ^ n.wrapping_mul(0x85eb_ca6b) ^ (home as u64) << 48);
        delays[(r.next_u64() % delays.len() as u64) as usize].round() as i64
    }

    fn announce(&mut self, member: usize) {
        if !std::mem::take(&mut self.members[member].changed) {
            return;
        }
        let state = &self.members[member].state;
        let filter = CatalogueFilter { class: Some(ClusterClass::B), ..CatalogueFilter::default() };
        let mut offers = Vec::new();
        let mut page = PageRequest { after: None, limit: PageRequest::MAX_LIMIT };
        while let Ok((summaries, next)) = state.catalogue(&filter, &page) {
            for s in summaries {
                if let Ok(price_hour) = s.cluster.listing.prices.price(BillingMode::Hourly) {
                    offers.push(Offer { cluster: s.cluster.id, vram_gib: s.cluster.listing.vram_gib, price_hour, idle: s.idle_cards });
                }
            }
            match next {
                Some(after) => page.after = Some(after),
                None => break,
            }
        }
        let n = self.members[member].announcements.back().map_or(0, |a| a.1 + 1);
        let max_delay = self.config.gossip_delays_ms.iter().copied().fold(0.0, f64::max).ceil() as i64;
        let anns = &mut self.members[member].announcements;
        anns.push_back((self.now, n, offers));
        // Keep every announcement that some member may not have received yet, and one before.
        while anns.len() > 2 && anns[1].0 + max_delay < self.now {
            anns.pop_front();
        }
    }

    fn try_auto(&mut self, d: &mut Demand) -> Result<Try, String> {
        let owner = self.members[d.member].researchers[d.researcher].account;
        let mode = if d.hours <= 1.0 { BillingMode::Hourly } else { BillingMode::Daily };
        let job = match d.job {
            Some(job) => job,
            None => {
                let spec = auto_job_spec(d.cards, d.min_vram, d.max_price_hour * hours_priced(mode) * i64::from(d.cards), d.hours, mode);
                match self.apply(d.member, Caller::Account(owner), Command::SubmitJob { spec }) {
                    Ok(Response::Job(j)) => {
                        d.job = Some(j.id);
                        j.id
                    }
                    Ok(other) => return Err(format!("SubmitJob answered {other:?}")),
                    Err(e) => return Err(format!("SubmitJob refused: {e}")),
                }
            }
        };
        self.acquire_scheduler(d.member)?;
        let epoch = self.members[d.member].scheduler_epoch;
        match self.apply(d.member, Caller::Platform, Command::AutoLease { epoch, job }) {
            Ok(Response::Lease(l)) => {
                let price = l.price_per_card.minor;
                self.leased(d, d.member, l.id, l.cluster, None, Some((job, d.hours)), price, mode);
                Ok(Try::Leased)
            }
            Ok(other) => Err(format!("AutoLease answered {other:?}")),
            Err(e) if e.code() == ErrorCode::InsufficientFunds => {
                self.summary.refused_funds += 1;
                self.must(d.member, Caller::Account(owner), Command::CancelJob { job })?;
                Ok(Try::Refused)
            }
            Err(e) if e.code() == ErrorCode::PlacementRefused => Ok(Try::NoCards),
            Err(e) => {
                self.refused_other(&e);
                Ok(Try::NoCards)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn leased(
        &mut self,
        d: &Demand,
        owner: usize,
        lease: LeaseId,
        cluster: ClusterId,
        remote: Option<RemoteLeaseId>,
        job: Option<(JobId, f64)>,
        price: i64,
        mode: BillingMode,
    ) {
        let day = ((self.now - EPOCH_MS) / DAY_MS) as u32;
        // What an hour of the term costs: a day's price over 24 hours, a month's over 720.
        self.prices.push((day, price / (mode.period_seconds() / 3_600)));
        let r = &mut self.members[d.member].researchers[d.researcher];
        r.leases += 1;
        if remote.is_some() {
            r.remote_leases += 1;
            self.summary.leased_remote += 1;
        } else if job.is_some() {
            self.summary.leased_auto += 1;
        } else {
            self.summary.leased_local += 1;
        }
        if let Some(s) = self.members[owner].suppliers.iter_mut().find(|s| s.cluster == cluster) {
            s.leases += 1;
        }
        self.tags.insert((owner, lease), LeaseTag { home: d.member, researcher: d.researcher, remote, job, had_fault: false });
        self.schedule(self.now + PROVISION_MS, Event::Activate { member: owner, lease });
    }

    fn activate(&mut self, member: usize, lease: LeaseId) -> Result<(), String> {
        let Some(l) = self.members[member].state.lease(lease) else { return Ok(()) };
        let supplier = l.supplier;
        let l = match self.must(member, Caller::Account(supplier), Command::ActivateLease { lease })? {
            Response::Lease(l) => l,
            other => return Err(format!("ActivateLease answered {other:?}")),
        };
        let paid_until = l.paid_until.map_or(self.now, |p| p.millis());
        let tag = self.tags.get(&(member, lease)).cloned().ok_or("an untagged lease")?;
        if let Some((job, hours)) = tag.job {
            self.acquire_scheduler(member)?;
            let epoch = self.members[member].scheduler_epoch;
            let placed = match self.must(member, Caller::Platform, Command::PlaceJobs { epoch, placements: vec![(job, l.cards.clone())] })? {
                Response::Placements(r) => r.into_iter().next().ok_or("no placement answer")?,
                other => return Err(format!("PlaceJobs answered {other:?}")),
            };
            if placed.is_err() {
                // A card of the lease faulted before the job could start on it: as after a
                // fault mid-run, the job is cancelled and the lease given back.
                self.summary.jobs_interrupted += 1;
                let owner = self.members[member].state.job(job).map(|j| j.owner).ok_or("a job without an owner")?;
                self.must(member, Caller::Account(owner), Command::CancelJob { job })?;
                self.must(member, Caller::Platform, Command::EndLease { lease, reason: EndReason::ByResearcher })?;
                return self.lease_over(member, lease);
            }
            let node = self.members[member].state.card(l.cards[0]).map(|c| c.node).ok_or("a card without a node")?;
            self.must(member, Caller::Agent(node), Command::JobStarted { job, attempt: 1 })?;
            let done = (self.now + (hours * HOUR_MS as f64) as i64).min(paid_until);
            self.schedule(done, Event::JobDone { member, lease, job, node });
        } else if self.rng.unit() < self.config.early_end_share {
            let term = paid_until - self.now;
            let at = self.now + (term as f64 * (0.2 + 0.7 * self.rng.unit())) as i64;
            self.schedule(at.max(self.now + 1), Event::EndEarly { member, lease });
        } else {
            self.schedule(paid_until, Event::Expire { member, lease });
        }
        Ok(())
    }

    /// A card of an auto-leased job's lease faulted: the broker asked the running attempt to
    /// stop, and its agent reports it ended (`CardLost`). The simulation does not retry such a
    /// job: it is cancelled and the scheduler gives its lease back.
    fn interrupt_job(&mut self, member: usize, lease: LeaseId, card: CardId) -> Result<(), String> {
        let Some((job, _)) = self.tags.get(&(member, lease)).and_then(|t| t.job) else { return Ok(()) };
        let Some(j) = self.members[member].state.job(job) else { return Ok(()) };
        if j.state != suanli_types::JobState::Running {
            return Ok(());
        }
        let (owner, attempt) = (j.owner, j.attempts.last().map_or(1, |a| a.number));
        let node = self.members[member].state.card(card).map(|c| c.node).ok_or("a card without a node")?;
        self.must(member, Caller::Agent(node), Command::JobEnded { job, attempt, reason: JobEndReason::CardLost(card), outputs: BTreeMap::new() })?;
        self.summary.jobs_interrupted += 1;
        if self.members[member].state.job(job).is_some_and(|j| j.state.is_live()) {
            self.must(member, Caller::Account(owner), Command::CancelJob { job })?;
        }
        self.must(member, Caller::Platform, Command::EndLease { lease, reason: EndReason::ByResearcher })?;
        self.lease_over(member, lease)
    }

    fn job_done(&mut self, member: usize, lease: LeaseId, job: JobId, node: NodeId) -> Result<(), String> {
        let running = self.members[member].state.job(job).is_some_and(|j| j.state == suanli_types::JobState::Running);
        if !running {
            // Interrupted by a card fault before (`interrupt_job`): nothing left to do.
            return Ok(());
        }
        self.must(member, Caller::Agent(node), Command::JobEnded { job, attempt: 1, reason: JobEndReason::Completed, outputs: BTreeMap::new() })?;
        let live = self.members[member].state.lease(lease).is_some_and(|l| l.state.is_live());
        if live {
            self.must(member, Caller::Platform, Command::EndLease { lease, reason: EndReason::ByResearcher })?;
            self.lease_over(member, lease)?;
        }
        Ok(())
    }

    /// A lease ended on its owner: a remote one's charge, from the owner's ledger, goes back
    /// to the home member's remote lease.
    fn lease_over(&mut self, member: usize, lease: LeaseId) -> Result<(), String> {
        let Some(tag) = self.tags.remove(&(member, lease)) else { return Ok(()) };
        if tag.had_fault {
            self.summary.leases_with_fault += 1;
        }
        if let Some(remote) = tag.remote {
            let charged = self.members[member].state.lease_account(lease).map_or(0, |a| a.charged_minor);
            self.must(tag.home, Caller::Platform, Command::EndRemoteLease { remote, charged_minor: charged })?;
        }
        Ok(())
    }

    fn hourly(&mut self) -> Result<(), String> {
        let hour = ((self.now - EPOCH_MS) / HOUR_MS) as u64;
        for member in 0..self.members.len() {
            let due = self.members[member].state.due_for_settlement(Timestamp::from_millis(self.now), 0);
            for chunk in due.chunks(MAX_SETTLEMENTS_PER_COMMAND) {
                self.must(member, Caller::System, Command::SettleLeases { leases: chunk.to_vec() })?;
            }
            let state = &self.members[member].state;
            let (mut listed, mut healthy, mut leased, mut leased_listed) = (0, 0, 0, 0);
            for cluster in state.clusters() {
                let listed_now = cluster.state == suanli_types::ClusterState::Listed;
                for card in state.cards_of_cluster(cluster.id) {
                    leased += u64::from(card.lease.is_some());
                    if listed_now {
                        listed += 1;
                        healthy += u64::from(card.health == CardHealth::Healthy);
                        leased_listed += u64::from(card.lease.is_some());
                    }
                }
            }
            let live_leases = state.leases().filter(|l| l.state.is_live()).count() as u64;
            let waiting = self.members[member].waiting;
            self.timeline.push(HourRow {
                member: member as u32,
                hour,
                listed_cards: listed,
                healthy_listed: healthy,
                leased_cards: leased,
                leased_listed,
                waiting_demands: waiting,
                live_leases,
            });
        }
        Ok(())
    }

    fn daily(&mut self, day: u32) -> Result<(), String> {
        let now = Timestamp::from_millis(self.now);
        for member in 0..self.members.len() {
            if day.is_multiple_of(30) {
                let budget = Money::new(Currency::cny(), self.config.monthly_budget_minor);
                for r in 0..self.members[member].researchers.len() {
                    let account = self.members[member].researchers[r].account;
                    self.must(member, Caller::Platform, Command::Deposit { account, amount: budget.clone() })?;
                    self.members[member].researchers[r].deposited += budget.minor;
                }
            }
            if day > 0 {
                let ended_before = now.plus_millis(-DAY_MS);
                while self.members[member].state.has_archivable(ended_before, now) {
                    self.must(member, Caller::System, Command::ArchiveEnded { ended_before })?;
                    for record in self.members[member].state.take_archived() {
                        self.summary.records_archived += 1;
                        if let Archived::Transaction { transaction, .. } = record {
                            self.count_money(&transaction);
                        }
                    }
                }
            }
            if self.config.reprice_every_days > 0 && day > 0 && day.is_multiple_of(self.config.reprice_every_days) {
                self.reprice(member)?;
            }
            self.members[member].state.check_invariants().map_err(|e| format!("member {member}, day {day}: {e}"))?;
            self.summary.invariant_checks += 1;
        }
        Ok(())
    }

    fn reprice(&mut self, member: usize) -> Result<(), String> {
        for s in 0..self.members[member].suppliers.len() {
            let sup = &self.members[member].suppliers[s];
            if sup.left_ms.is_some() {
                continue;
            }
            let (account, cluster, model, start, price) = (sup.account, sup.cluster, sup.model, sup.start_price, sup.price);
            let state = &self.members[member].state;
            let cards = state.cards_of_cluster(cluster);
            let busy = cards.iter().filter(|c| c.lease.is_some()).count() as f64 / cards.len().max(1) as f64;
            let new = if busy > 0.8 {
                (price as f64 * 1.05).round() as i64
            } else if busy < 0.3 {
                ((price as f64 * 0.95).round() as i64).max((start + 1) / 2)
            } else {
                price
            };
            if new != price {
                let region = self.members[member].name.clone();
                self.must(member, Caller::Account(account), Command::ModifyCluster { cluster, listing: listing(model, new, &region) })?;
                self.members[member].suppliers[s].price = new;
            }
        }
        Ok(())
    }

    /// Adds a ledger line to the money totals (once: when archived, or at the end if still hot).
    fn count_money(&mut self, tx: &Transaction) {
        let credited: i64 = tx.entries.iter().map(|e| e.minor).filter(|m| *m > 0).sum();
        match tx.kind {
            TransactionKind::Charge => self.summary.charged_minor += credited,
            TransactionKind::ServiceCredit => self.summary.service_credits_minor += credited,
            TransactionKind::Refund => self.summary.refunds_minor += credited,
            _ => {}
        }
    }

    fn finish(mut self, wall_s: f64) -> MarketRun {
        let cny = Currency::cny();
        let mut suppliers = Vec::new();
        let mut researchers = Vec::new();
        for (i, mb) in self.members.iter().enumerate() {
            let balance = |a: LedgerAccount| mb.state.balance(a, &cny);
            for s in &mb.suppliers {
                let earnings = balance(LedgerAccount::Earnings(s.account));
                self.summary.supplier_earnings_minor += earnings;
                suppliers.push(SupplierRow {
                    member: i as u32,
                    supplier: s.account,
                    model: MODELS[s.model].0,
                    cards: s.cards,
                    joined_day: (s.joined_ms - EPOCH_MS) as f64 / DAY_MS as f64,
                    left_day: s.left_ms.map(|l| (l - EPOCH_MS) as f64 / DAY_MS as f64),
                    start_price: s.start_price,
                    end_price: s.price,
                    leases: s.leases,
                    earnings_minor: earnings,
                    reliability: mb.state.reliability(s.account),
                });
            }
            for r in &mb.researchers {
                let left =
                    balance(LedgerAccount::Available(r.account)) + balance(LedgerAccount::Held(r.account)) + balance(LedgerAccount::RemoteHeld(r.account));
                researchers.push(ResearcherRow {
                    member: i as u32,
                    researcher: r.account,
                    demands: r.demands,
                    leases: r.leases,
                    remote_leases: r.remote_leases,
                    gave_up: r.gave_up,
                    deposited_minor: r.deposited,
                    spent_minor: r.deposited - left,
                });
            }
            self.summary.platform_fees_minor += balance(LedgerAccount::PlatformFees);
            self.summary.federation_payable_minor += balance(LedgerAccount::FederationPayable);
            for (other, partner) in mb.partners.iter().enumerate() {
                if let Some(p) = partner {
                    let paid_in = mb.partner_deposits[other];
                    let left = balance(LedgerAccount::Available(*p)) + balance(LedgerAccount::Held(*p));
                    self.summary.partners_charged_minor += paid_in - left;
                }
            }
            self.summary.cards_at_end += mb.state.cards().count() as u64;
        }
        for ((owner, lease), tag) in &self.tags {
            if tag.remote.is_some() {
                self.summary.remote_open_charged_minor += self.members[*owner].state.lease_account(*lease).map_or(0, |a| a.charged_minor);
            }
        }
        let remaining: Vec<Transaction> = self.members.iter().flat_map(|mb| mb.state.transactions().iter().cloned()).collect();
        for tx in &remaining {
            self.count_money(tx);
        }
        let hours = self.timeline.len().max(1) as f64;
        self.summary.mean_utilisation =
            self.timeline.iter().map(|h| if h.listed_cards == 0 { 0.0 } else { h.leased_listed as f64 / h.listed_cards as f64 }).sum::<f64>() / hours;
        self.waits_s.sort_by(f64::total_cmp);
        if !self.waits_s.is_empty() {
            self.summary.mean_wait_s = self.waits_s.iter().sum::<f64>() / self.waits_s.len() as f64;
            self.summary.p95_wait_s = crate::metrics::percentile(&self.waits_s, 95.0);
        }
        let mean = |v: &[(u32, i64)]| if v.is_empty() { 0.0 } else { v.iter().map(|p| p.1 as f64).sum::<f64>() / v.len() as f64 };
        self.summary.mean_price_per_card_hour = mean(&self.prices);
        let first: Vec<_> = self.prices.iter().copied().filter(|p| p.0 < 30).collect();
        let last_from = self.config.days.saturating_sub(30);
        let last: Vec<_> = self.prices.iter().copied().filter(|p| p.0 >= last_from).collect();
        self.summary.price_first_month = mean(&first);
        self.summary.price_last_month = mean(&last);
        MarketRun { summary: self.summary, suppliers, researchers, timeline: self.timeline, apply_ns: self.apply_ns, refusals: self.refusals, wall_s }
    }
}

/// Hours of the hourly price a period of `mode` costs: a day is priced as 20 hours, a month
/// (30 days) as 500 (longer terms are cheaper per hour, as suppliers price them).
fn hours_priced(mode: BillingMode) -> i64 {
    match mode {
        BillingMode::Hourly => 1,
        BillingMode::Daily => 20,
        BillingMode::Monthly => 500,
        BillingMode::Yearly => 5_000,
    }
}

enum Try {
    Leased,
    Refused,
    NoCards,
}

/// One price per billing mode: a day priced as 20 hours, a month as 500 (`hours_priced`).
pub(crate) fn prices(base_hour: i64) -> PriceList {
    let modes = [BillingMode::Hourly, BillingMode::Daily, BillingMode::Monthly];
    PriceList { currency: Currency::cny(), per_card: modes.into_iter().map(|m| (m, base_hour * hours_priced(m))).collect() }
}

/// A Class B listing of `MODELS[model]` servers at `price_hour` per card-hour.
pub(crate) fn listing(model: usize, price_hour: i64, region: &str) -> Listing {
    let (name, vram, _, _) = MODELS[model];
    Listing {
        title: format!("{name} servers"),
        resource_type: ResourceType::Gpu,
        gpu_model: name.into(),
        vram_gib: vram,
        memory_gib: 512,
        vcpus: 64,
        vendor: "Inspur".into(),
        region: region.into(),
        local_storage: LocalStorage { data_disks: 1, data_disk_gb: 3840, system_disk_gb: 480, medium: DiskMedium::Ssd },
        prices: prices(price_hour),
        usage_instructions: String::new(),
    }
}

/// A training job that leases its own cards: the budget covers one period of them at the
/// researcher's highest price.
fn auto_job_spec(cards: u32, min_vram_gib: u32, budget_minor: i64, hours: f64, mode: BillingMode) -> JobSpec {
    let value = serde_json::json!({
        "name": "sim-train",
        "kind": "training",
        "resources": { "cards": cards, "min_vram_mib": u64::from(min_vram_gib) * 1024 },
        "run": { "command": { "program": "/bin/true" } },
        "budget_minor": budget_minor,
        "expected_seconds": (hours * 3600.0) as u64,
        "auto_lease": { "billing_mode": mode.as_str() },
    });
    serde_json::from_value(value).expect("a valid job spec")
}

/// Gossip delays as a one-column CSV (`ms`), as `market --gossip-nodes` writes them.
pub fn delays_csv(delays_ms: &[f64]) -> String {
    let mut out = String::from("ms\n");
    for d in delays_ms {
        let _ = writeln!(out, "{d:.3}");
    }
    out
}

/// Reads [`delays_csv`]'s format back; a bad line is refused with its number.
pub fn parse_delays(text: &str) -> Result<Vec<f64>, String> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, "ms")) => {}
        _ => return Err("line 1: expected the header `ms`".into()),
    }
    lines
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| l.trim().parse::<f64>().ok().filter(|d| d.is_finite() && *d >= 0.0).ok_or_else(|| format!("line {}: {l:?} is not a delay in ms", i + 1)))
        .collect()
}

/// The deterministic outputs as CSV text: (summary, suppliers, researchers, timeline).
pub fn csvs(run: &MarketRun) -> (String, String, String, String) {
    let s = &run.summary;
    let mut summary = String::from(
        "days,members,suppliers_joined,suppliers_left,cards_at_end,demands,leased_local,leased_remote,leased_auto,gave_up,refused_funds,refused_other,remote_stale,card_faults,leases_with_fault,jobs_interrupted,ended_early,charged_minor,supplier_earnings_minor,platform_fees_minor,service_credits_minor,refunds_minor,federation_payable_minor,partners_charged_minor,remote_open_charged_minor,mean_utilisation,mean_wait_s,p95_wait_s,mean_price_per_card_hour,price_first_month,price_last_month,commands_applied,commands_refused,records_archived,invariant_checks\n",
    );
    let _ = writeln!(
        summary,
        "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.4},{:.1},{:.1},{:.1},{:.1},{:.1},{},{},{},{}",
        s.days,
        s.members,
        s.suppliers_joined,
        s.suppliers_left,
        s.cards_at_end,
        s.demands,
        s.leased_local,
        s.leased_remote,
        s.leased_auto,
        s.gave_up,
        s.refused_funds,
        s.refused_other,
        s.remote_stale,
        s.card_faults,
        s.leases_with_fault,
        s.jobs_interrupted,
        s.ended_early,
        s.charged_minor,
        s.supplier_earnings_minor,
        s.platform_fees_minor,
        s.service_credits_minor,
        s.refunds_minor,
        s.federation_payable_minor,
        s.partners_charged_minor,
        s.remote_open_charged_minor,
        s.mean_utilisation,
        s.mean_wait_s,
        s.p95_wait_s,
        s.mean_price_per_card_hour,
        s.price_first_month,
        s.price_last_month,
        s.commands_applied,
        s.commands_refused,
        s.records_archived,
        s.invariant_checks
    );
    let mut suppliers =
        String::from("member,supplier,model,cards,joined_day,left_day,start_price_hour,end_price_hour,leases,earnings_minor,reliability,evaluations\n");
    for r in &run.suppliers {
        let (score, n) = r.reliability.map_or((String::new(), 0), |(s, n)| (s.to_string(), n));
        let left = r.left_day.map_or(String::new(), |d| format!("{d:.3}"));
        let _ = writeln!(
            suppliers,
            "{},{},{},{},{:.3},{left},{},{},{},{},{score},{n}",
            r.member, r.supplier.0, r.model, r.cards, r.joined_day, r.start_price, r.end_price, r.leases, r.earnings_minor
        );
    }
    let mut researchers = String::from("member,researcher,demands,leases,remote_leases,gave_up,deposited_minor,spent_minor\n");
    for r in &run.researchers {
        let _ = writeln!(
            researchers,
            "{},{},{},{},{},{},{},{}",
            r.member, r.researcher.0, r.demands, r.leases, r.remote_leases, r.gave_up, r.deposited_minor, r.spent_minor
        );
    }
    let mut timeline = String::from("member,hour,listed_cards,healthy_listed,leased_cards,leased_listed,waiting_demands,live_leases\n");
    for h in &run.timeline {
        let _ = writeln!(
            timeline,
            "{},{},{},{},{},{},{},{}",
            h.member, h.hour, h.listed_cards, h.healthy_listed, h.leased_cards, h.leased_listed, h.waiting_demands, h.live_leases
        );
    }
    (summary, suppliers, researchers, timeline)
}

/// Runs the market once per seed and writes, under `out`: `<name>.summary.csv` (a row per
/// seed), per seed `<name>.seed<N>.{suppliers,researchers,timeline}.csv`, the first seed's
/// `<name>.timeline.svg`/`.png`, and `<name>.timing.csv` (apply time per command, measured:
/// the one output that differs between runs). Returns a Markdown report.
pub fn run_seeds_to(config: &MarketConfig, seeds: &[u64], out: &std::path::Path, name: &str) -> Result<String, String> {
    if seeds.is_empty() {
        return Err("at least one seed".into());
    }
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let write = |file: String, text: &[u8]| std::fs::write(out.join(&file), text).map_err(|e| format!("{file}: {e}"));
    let mut summary_csv = String::new();
    let mut apply_ns: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    let mut report = String::from(
        "| seed | demands | leased (local · remote · auto) | gave up | refused: funds | card faults | utilisation | mean wait | charged | supplier earnings | price/card-h first → last month | wall |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut wall = 0.0;
    let mut notes = String::new();
    for (i, seed) in seeds.iter().enumerate() {
        let run = run(&MarketConfig { seed: *seed, ..config.clone() })?;
        let (summary, suppliers, researchers, timeline) = csvs(&run);
        let mut lines = summary.lines();
        let header = lines.next().unwrap_or_default();
        if i == 0 {
            let _ = writeln!(summary_csv, "seed,{header}");
        }
        for line in lines {
            let _ = writeln!(summary_csv, "{seed},{line}");
        }
        write(format!("{name}.seed{seed}.suppliers.csv"), suppliers.as_bytes())?;
        write(format!("{name}.seed{seed}.researchers.csv"), researchers.as_bytes())?;
        write(format!("{name}.seed{seed}.timeline.csv"), timeline.as_bytes())?;
        if i == 0 {
            let (svg, png) = timeline_plots(&run, config.members);
            write(format!("{name}.timeline.svg"), svg.as_bytes())?;
            write(format!("{name}.timeline.png"), &png)?;
        }
        let s = &run.summary;
        let cny = |m: i64| format!("{:.0} CNY", m as f64 / 100.0);
        let _ = writeln!(
            report,
            "| {seed} | {} | {} · {} · {} | {} | {} | {} | {:.3} | {:.0} s | {} | {} | {:.2} → {:.2} CNY | {:.1} s |",
            s.demands,
            s.leased_local,
            s.leased_remote,
            s.leased_auto,
            s.gave_up,
            s.refused_funds,
            s.card_faults,
            s.mean_utilisation,
            s.mean_wait_s,
            cny(s.charged_minor),
            cny(s.supplier_earnings_minor),
            s.price_first_month / 100.0,
            s.price_last_month / 100.0,
            run.wall_s
        );
        wall += run.wall_s;
        for (code, n) in &run.refusals {
            let _ = writeln!(notes, "seed {seed}: {n} requests refused by a broker limit ({code:?}), retried");
        }
        for (k, v) in run.apply_ns {
            apply_ns.entry(k).or_default().extend(v);
        }
    }
    write(format!("{name}.summary.csv"), summary_csv.as_bytes())?;
    let mut timing = String::from("command,count,mean_us,p50_us,p99_us,max_us\n");
    for (command, ns) in apply_ns {
        let mut us: Vec<f64> = ns.iter().map(|n| *n as f64 / 1000.0).collect();
        us.sort_by(f64::total_cmp);
        let mean = us.iter().sum::<f64>() / us.len() as f64;
        let at = |p: f64| crate::metrics::percentile(&us, p);
        let _ = writeln!(timing, "{command},{},{mean:.2},{:.2},{:.2},{:.2}", us.len(), at(50.0), at(99.0), at(100.0));
    }
    write(format!("{name}.timing.csv"), timing.as_bytes())?;
    let _ = writeln!(report, "\n{} seed(s) in {wall:.1} s; apply time per command in {name}.timing.csv", seeds.len());
    report += &notes;
    Ok(report)
}

/// Cards listed and leased, and demands waiting, over the days (every member summed), and
/// each member's utilisation.
fn timeline_plots(run: &MarketRun, members: u32) -> (String, Vec<u8>) {
    use crate::plot::{downsample, Panel, Series};
    let mut by_hour: BTreeMap<u64, (f64, f64, f64)> = BTreeMap::new();
    for h in &run.timeline {
        let e = by_hour.entry(h.hour).or_default();
        e.0 += h.listed_cards as f64;
        e.1 += h.leased_listed as f64;
        e.2 += h.waiting_demands as f64;
    }
    let day = |h: u64| h as f64 / 24.0;
    let line = |label: &str, f: &dyn Fn(&(f64, f64, f64)) -> f64| Series {
        label: label.into(),
        points: downsample(&by_hour.iter().map(|(h, v)| (day(*h), f(v))).collect::<Vec<_>>(), 600),
    };
    let cards = [line("listed", &|v| v.0), line("leased", &|v| v.1)];
    let waiting = [line("demands waiting", &|v| v.2)];
    let utilisation: Vec<Series> = (0..members)
        .map(|m| {
            let points: Vec<(f64, f64)> = run
                .timeline
                .iter()
                .filter(|h| h.member == m)
                .map(|h| (day(h.hour), if h.listed_cards == 0 { 0.0 } else { h.leased_listed as f64 / h.listed_cards as f64 }))
                .collect();
            Series { label: format!("member m{m}"), points: downsample(&points, 600) }
        })
        .collect();
    let panels = [
        Panel { title: "Cards of listed clusters", x_label: "day", y_label: "cards", x_log: false, y_range: None, series: &cards },
        Panel { title: "Utilisation: leased / listed", x_label: "day", y_label: "fraction", x_log: false, y_range: Some((0.0, 1.0)), series: &utilisation },
        Panel { title: "Demands waiting for cards", x_label: "day", y_label: "demands", x_log: false, y_range: None, series: &waiting },
    ];
    (crate::plot::svg(&panels), crate::plot::png(&panels))
}
