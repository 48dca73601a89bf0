//! The Philly trace as Sia ships it (`sia/philly.csv`):
//! `timestamp,duration,num_gpus,gpu_time,cluster` — submission time (`2017-10-09 07:01:55`,
//! UTC), run time in seconds at `num_gpus`, and the virtual cluster. Submission times become
//! seconds after the earliest job loaded; a job's workload is its virtual cluster.

use super::{Csv, TraceError};
use crate::engine::{Job, Work};

/// Seconds since 1970 of a `YYYY-MM-DD HH:MM:SS` timestamp (proleptic Gregorian, UTC).
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let (date, time) = s.trim().split_once(' ')?;
    let d: Vec<i64> = date.split('-').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let t: Vec<i64> = time.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let ([y, m, day], [hh, mm, ss]) = (d.as_slice(), t.as_slice()) else { return None };
    if !(1..=12).contains(m) || !(1..=31).contains(day) || !(0..24).contains(hh) || !(0..60).contains(mm) || !(0..=60).contains(ss) {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if *m <= 2 { y - 1 } else { *y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Loads the jobs of the virtual clusters in `clusters` (all if empty), sorted by submission.
pub fn parse(file: &str, text: &str, clusters: &[String]) -> Result<Vec<Job>, TraceError> {
    let csv = Csv::parse(file, text)?;
    let [ts, dur, gpus, vc] = csv.columns(&["timestamp", "duration", "num_gpus", "cluster"])?[..] else { unreachable!("four columns asked") };
    let mut rows = Vec::new();
    for row in csv.rows() {
        let row = row?;
        let raw = row.text(ts, "timestamp")?;
        let at = parse_timestamp(raw).ok_or_else(|| row.error(format!("timestamp {raw:?} is not YYYY-MM-DD HH:MM:SS")))?;
        let duration = row.number(dur, "duration")?;
        let gpus = row.count(gpus, "num_gpus")?;
        let cluster = row.text(vc, "cluster")?;
        if clusters.is_empty() || clusters.iter().any(|c| c == cluster) {
            rows.push((at, row.line, duration, gpus, cluster.to_owned()));
        }
    }
    rows.sort_by_key(|r| (r.0, r.1));
    let start = rows.first().map_or(0, |r| r.0);
    Ok(rows
        .into_iter()
        .map(|(at, line, duration, gpus, cluster)| Job {
            name: format!("philly-{line}"),
            workload: cluster,
            submit_s: (at - start) as f64,
            gpus,
            type_key: "philly".into(),
            models: vec![],
            share_milli: None,
            work: Work::Seconds(duration),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "timestamp,duration,num_gpus,gpu_time,cluster\n";

    #[test]
    fn loads_sorts_and_filters_by_cluster() {
        let text = format!("{HEADER}2017-10-09 07:01:55,66.0,1,66.0,11cb48\n2017-10-09 06:13:03,2951.0,4,11804.0,6214e9\n");
        let jobs = parse("philly.csv", &text, &[]).expect("valid");
        assert_eq!(jobs.len(), 2);
        assert_eq!((jobs[0].gpus, jobs[0].submit_s, &jobs[0].workload[..]), (4, 0.0, "6214e9"));
        assert_eq!(jobs[1].submit_s, 48.0 * 60.0 + 52.0);
        assert_eq!(jobs[1].work, Work::Seconds(66.0));
        let only = parse("philly.csv", &text, &["11cb48".to_owned()]).expect("valid");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0].submit_s, 0.0);
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let text = format!("{HEADER}2017-10-09 07:01:55,66.0,1,66.0,11cb48\n2017-13-09 07:01:55,66.0,1,66.0,11cb48\n");
        let err = parse("sia/philly.csv", &text, &[]).expect_err("month 13").to_string();
        assert!(err.starts_with("sia/philly.csv:3: timestamp"), "{err}");
        let err = parse("p.csv", &format!("{HEADER}2017-10-09 07:01:55,66.0,0,66.0,x\n"), &[]).expect_err("0 GPUs").to_string();
        assert!(err.starts_with("p.csv:2: num_gpus"), "{err}");
    }

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_timestamp("2017-10-09 07:01:55"), Some(1_507_532_515));
        assert_eq!(parse_timestamp("2017-10-09"), None);
    }
}
