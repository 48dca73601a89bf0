//! `suanli-sim scale` at a small size: the market it builds is the one it says, and its rows
//! survive the trip through the child process's CSV line.

use suanli_sim::scale::{csv, install, measure, table, ScaleConfig, ScaleRow};

fn small() -> ScaleRow {
    measure(&ScaleConfig { factor: 0.01, samples: 50, ..ScaleConfig::default() }).expect("a small market").0
}

#[test]
fn its_snapshot_installs_with_the_invariants_held() {
    let (row, snapshot) = measure(&ScaleConfig { factor: 0.01, samples: 10, ..ScaleConfig::default() }).expect("a small market");
    assert_eq!(snapshot.len(), row.snapshot_bytes);
    let (ms, _) = install(&snapshot).expect("installs");
    assert!(ms > 0.0);
    assert!(install(&snapshot[..snapshot.len() / 2]).is_err(), "a torn snapshot is refused");
}

#[test]
fn builds_the_market_it_names_and_archives_every_ended_lease() {
    let row = small();
    assert_eq!((row.clusters, row.cards, row.live_leases, row.live_jobs), (100, 1_000, 100, 500));
    assert_eq!(row.ended_leases_archived, 1_000, "every lease that ended three days ago leaves the hot state");
    assert!(row.snapshot_bytes > 0 && row.lease_request_end_p50 > 0.0 && row.catalogue_search_p99 >= row.catalogue_search_p50);
}

#[test]
fn a_row_reads_back_from_its_csv_line() {
    let row = small();
    let text = csv(std::slice::from_ref(&row));
    let back = ScaleRow::from_csv_line(text.lines().nth(1).expect("a data line")).expect("parses");
    assert_eq!((back.cards, back.rss_bytes, back.snapshot_bytes), (row.cards, row.rss_bytes, row.snapshot_bytes));
    assert!((back.lease_request_end_p99 - row.lease_request_end_p99).abs() < 0.01);
    assert!(ScaleRow::from_csv_line("1,2,3").is_err());
    assert!(table(&[row.clone(), row]).contains("From 0.01× to 0.01×"));
}
