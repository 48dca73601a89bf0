//! The market simulation on the broker's own state machine: same seed, same bytes; money
//! neither made nor lost across researchers, suppliers, the platform and federation members;
//! card faults paid back as service credits; a small run's summary pinned.
//!
//! Every run also checks every member's `State::check_invariants` daily, and the simulation
//! fails on the first command its own bookkeeping needed that a broker refused.

use std::path::{Path, PathBuf};

use suanli_sim::market::{self, MarketConfig, MarketRun};

/// Three weeks of a small market: enough leases, faults, departures and re-pricing to
/// exercise every path in seconds.
fn small() -> MarketConfig {
    MarketConfig {
        seed: 7,
        days: 21,
        suppliers: 8,
        supplier_joins_per_day: 0.5,
        supplier_stay_days: 20.0,
        researchers: 40,
        demands_per_day: 60.0,
        monthly_budget_minor: 300_000,
        card_mtbf_days: 10.0,
        repair_hours: 12.0,
        reprice_every_days: 3,
        ..MarketConfig::default()
    }
}

fn run(config: &MarketConfig) -> MarketRun {
    market::run(config).unwrap_or_else(|e| panic!("the market run failed: {e}"))
}

#[test]
fn the_same_seed_gives_the_same_bytes() {
    let a = market::csvs(&run(&small()));
    let b = market::csvs(&run(&small()));
    assert_eq!(a, b);
    let other = market::csvs(&run(&MarketConfig { seed: 8, ..small() }));
    assert_ne!(a.0, other.0, "another seed, another market");
}

#[test]
fn every_fen_a_researcher_spent_is_a_suppliers_earning_or_the_platforms_fee() {
    let r = run(&small());
    let s = &r.summary;
    assert!(s.leased_local > 100 && s.leased_auto > 20, "a market that leases: {s:?}");
    assert!(s.charged_minor > 0 && s.refunds_minor > 0, "{s:?}");
    let spent: i64 = r.researchers.iter().map(|x| x.spent_minor).sum();
    assert_eq!(spent, s.charged_minor, "what left researchers' balances is what was charged");
    assert_eq!(s.supplier_earnings_minor + s.platform_fees_minor, s.charged_minor);
    let earned: i64 = r.suppliers.iter().map(|x| x.earnings_minor).sum();
    assert_eq!(earned, s.supplier_earnings_minor);
    // The fee is 10 % of every charge, rounded per lease.
    let fee = s.platform_fees_minor as f64 / s.charged_minor as f64;
    assert!((fee - 0.10).abs() < 0.001, "{fee}");
    assert!(s.invariant_checks >= 21, "{s:?}");
}

#[test]
fn card_faults_are_paid_back_as_service_credits() {
    let r = run(&small());
    let s = &r.summary;
    assert!(s.card_faults > 10 && s.leases_with_fault > 0 && s.jobs_interrupted > 0, "{s:?}");
    assert!(s.service_credits_minor > 0, "a lease whose card dropped got money back: {s:?}");
    let scored = r.suppliers.iter().filter(|x| x.reliability.is_some_and(|(score, _)| score < 100)).count();
    assert!(scored > 0, "a supplier whose card dropped scores below 100");
    let without_faults = run(&MarketConfig { card_mtbf_days: 1e9, ..small() });
    assert_eq!(without_faults.summary.service_credits_minor, 0);
    assert_eq!(without_faults.summary.jobs_interrupted, 0);
}

#[test]
fn suppliers_leave_and_join_and_reprice() {
    let r = run(&small());
    let s = &r.summary;
    assert!(s.suppliers_left > 0 && s.suppliers_joined > 8, "{s:?}");
    let departed = r.suppliers.iter().filter(|x| x.left_day.is_some()).count() as u64;
    assert_eq!(departed, s.suppliers_left);
    assert!(r.suppliers.iter().any(|x| x.end_price != x.start_price), "someone re-priced");
    assert!(r.suppliers.iter().all(|x| x.end_price * 2 >= x.start_price), "never below half the starting price");
}

#[test]
fn a_short_budget_is_refused_and_loses_nothing() {
    let poor = run(&MarketConfig { monthly_budget_minor: 5_000, ..small() });
    let s = &poor.summary;
    assert!(s.refused_funds > 0, "{s:?}");
    for r in &poor.researchers {
        assert!(r.spent_minor <= r.deposited_minor, "nobody spends more than they paid in: {r:?}");
        assert!(r.spent_minor >= 0);
    }
}

#[test]
fn federation_members_lease_each_others_cards_and_owe_what_the_owners_charged() {
    // Three members; the demand outgrows one member's supply, so researchers lease remote cards.
    let config = MarketConfig { members: 3, suppliers: 3, demands_per_day: 90.0, gossip_delays_ms: vec![40.0, 250.0, 900.0], ..small() };
    let r = run(&config);
    let s = &r.summary;
    assert!(s.leased_remote > 10, "{s:?}");
    assert!(r.researchers.iter().any(|x| x.remote_leases > 0));
    assert!(s.federation_payable_minor > 0, "{s:?}");
    assert_eq!(
        s.federation_payable_minor + s.remote_open_charged_minor,
        s.partners_charged_minor,
        "members owe each other exactly what the owners charged for the remote leases that ended"
    );
    // Charges on the ledgers: researchers' (local, and remote into the federation payable) and
    // the partner accounts'; suppliers earned the local and partner ones, less the fee.
    let spent: i64 = r.researchers.iter().map(|x| x.spent_minor).sum();
    assert_eq!(spent, s.charged_minor - s.partners_charged_minor, "{s:?}");
    assert_eq!(s.supplier_earnings_minor + s.platform_fees_minor, s.charged_minor - s.federation_payable_minor);
    assert_eq!(market::csvs(&r), market::csvs(&run(&config)), "the federation's market is deterministic too");
    // The same members alone: nothing remote, more demand unmet.
    let alone = run(&MarketConfig { federated: false, ..config });
    assert_eq!((alone.summary.leased_remote, alone.summary.federation_payable_minor), (0, 0));
    assert!(alone.summary.gave_up > s.gave_up, "federation serves demand a member alone cannot: {} vs {}", alone.summary.gave_up, s.gave_up);
}

#[test]
fn settings_are_checked() {
    for (bad, what) in [
        (MarketConfig { days: 0, ..small() }, "days"),
        (MarketConfig { members: 0, ..small() }, "members"),
        (MarketConfig { auto_lease_share: 1.5, ..small() }, "auto_lease_share"),
        (MarketConfig { demands_per_day: f64::NAN, ..small() }, "demands_per_day"),
        (MarketConfig { monthly_budget_minor: 0, ..small() }, "monthly_budget_minor"),
        (MarketConfig { gossip_delays_ms: vec![-1.0], ..small() }, "gossip"),
    ] {
        let err = market::run(&bad).err().unwrap_or_else(|| panic!("{what} accepted"));
        assert!(err.contains(what), "{err}");
    }
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The small run's summary, pinned: a change to the broker's rules (pricing, settlement,
/// credits, auto-leasing) or to the simulation that moves any number shows up here.
/// `SUANLI_REGENERATE=1` writes the new expectation.
#[test]
fn a_small_markets_summary_is_pinned() {
    let (summary, ..) = market::csvs(&run(&small()));
    let path = data().join("expected/market-small.summary.csv");
    if std::env::var_os("SUANLI_REGENERATE").is_some() {
        std::fs::write(&path, &summary).expect("write the expectation");
    }
    let expected = std::fs::read_to_string(&path).expect("tests/data/expected/market-small.summary.csv");
    assert_eq!(summary, expected);
}

#[test]
fn a_run_writes_its_tables_and_pictures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = market::run_seeds_to(&MarketConfig { days: 5, ..small() }, &[1, 2], dir.path(), "m").expect("run");
    assert!(report.contains("| 1 |") && report.contains("| 2 |"), "{report}");
    for file in
        ["m.summary.csv", "m.seed1.suppliers.csv", "m.seed2.researchers.csv", "m.seed1.timeline.csv", "m.timeline.svg", "m.timeline.png", "m.timing.csv"]
    {
        assert!(dir.path().join(file).is_file(), "{file}");
    }
    let summary = std::fs::read_to_string(dir.path().join("m.summary.csv")).expect("summary");
    assert_eq!(summary.lines().count(), 3, "a header and a row per seed");
    let png = std::fs::read(dir.path().join("m.timeline.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn gossip_delays_round_trip_through_their_file_and_bad_lines_are_refused() {
    let delays = vec![0.5, 6.625, 40.0];
    assert_eq!(market::parse_delays(&market::delays_csv(&delays)), Ok(delays));
    assert!(market::parse_delays("ms\n1.0\n-2\n").unwrap_err().starts_with("line 3:"));
    assert!(market::parse_delays("delay\n1.0\n").unwrap_err().starts_with("line 1:"));
}
