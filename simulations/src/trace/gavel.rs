//! Gavel's msr traces (`gavel/msr/seed=N/<vc>.trace`, parsed by
//! `suanli_scheduling::replay::parse_gavel_trace`, the same parser the scheduling crate's
//! replay test uses) and its `simulation_throughputs.json`. A job's work is its steps; its
//! speed on each model comes from the throughput table, and it accepts only the models with a
//! non-zero throughput for its (type, gang size).

use suanli_scheduling::replay::{parse_gavel_trace, GavelThroughputs, ReplayError};
use suanli_scheduling::ThroughputTable;

use super::TraceError;
use crate::engine::{Job, Work};

/// The isolated-job speeds of `models` from a `simulation_throughputs.json`.
pub fn parse_throughputs(file: &str, text: &str, models: &[&str]) -> Result<ThroughputTable, TraceError> {
    let raw: GavelThroughputs = serde_json::from_str(text).map_err(|e| TraceError::Line {
        file: file.to_owned(),
        line: e.line(),
        reason: format!("not Gavel's throughput JSON: {e}"),
    })?;
    raw.table(models).map_err(|e| TraceError::File { file: file.to_owned(), reason: e.to_string() })
}

/// The jobs of one trace that some model of `models` can run, and how many were left out.
pub fn parse(file: &str, text: &str, workload: &str, table: &ThroughputTable, models: &[&str]) -> Result<(Vec<Job>, usize), TraceError> {
    let trace = parse_gavel_trace(text).map_err(|e| match e {
        ReplayError::Trace { line, reason } => TraceError::Line { file: file.to_owned(), line, reason },
        other => TraceError::File { file: file.to_owned(), reason: other.to_string() },
    })?;
    let mut jobs = Vec::new();
    let mut skipped = 0;
    for (i, t) in trace.into_iter().enumerate() {
        let accepted: Vec<String> =
            models.iter().filter(|&&m| table.exact(&t.job_type, t.scale_factor, m).is_some_and(|s| s > 0.0)).map(|&m| m.to_owned()).collect();
        if accepted.is_empty() {
            skipped += 1;
            continue;
        }
        jobs.push(Job {
            name: format!("{workload}-{i}"),
            workload: workload.to_owned(),
            submit_s: t.arrival_s,
            gpus: t.scale_factor,
            type_key: t.job_type,
            models: accepted,
            share_milli: None,
            work: Work::Steps(t.total_steps as f64),
        });
    }
    jobs.sort_by(|a, b| a.submit_s.total_cmp(&b.submit_s));
    Ok((jobs, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"v100": {"('A3C', 1)": {"null": 7.0}, "('LM (batch size 5)', 4)": {"null": 0.0}},
                           "k80": {"('A3C', 1)": {"null": 2.0}}}"#;

    #[test]
    fn loads_jobs_the_cluster_can_run() {
        let table = parse_throughputs("t.json", JSON, &["v100", "k80"]).expect("valid");
        let trace = "A3C\tpython a3c.py\t--n\t1\t700\t6.5\t1\nLM (batch size 5)\tpython lm.py\t--n\t1\t10\t3\t4\n";
        let (jobs, skipped) = parse("vc.trace", trace, "vc", &table, &["v100", "k80"]).expect("valid");
        assert_eq!((jobs.len(), skipped), (1, 1));
        assert_eq!(jobs[0].models, vec!["v100".to_owned(), "k80".to_owned()]);
        assert_eq!((jobs[0].submit_s, jobs[0].work.clone()), (6.5, Work::Steps(700.0)));
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let table = ThroughputTable::new();
        let err = parse("msr/vc.trace", "A3C\tc\t-n\t1\t700\t6.5\t1\nA3C\tc\t-n\t1\t700\tsoon\t1\n", "vc", &table, &[]).expect_err("bad arrival").to_string();
        assert!(err.starts_with("msr/vc.trace:2: arrival_time"), "{err}");
        let err = parse_throughputs("t.json", "{\n\"v100\": [}", &[]).expect_err("bad json").to_string();
        assert!(err.starts_with("t.json:2: "), "{err}");
    }
}
