//! Tiresias's simulator traces (`tiresias/60_job.csv`):
//! `job_id,num_gpu,submit_time,iterations,model_name,duration,interval` — submission and
//! run time (at `num_gpu`) in seconds.

use super::{Csv, TraceError};
use crate::engine::{Job, Work};

pub fn parse(file: &str, text: &str, workload: &str) -> Result<Vec<Job>, TraceError> {
    let csv = Csv::parse(file, text)?;
    let [id, gpus, submit, model, duration] = csv.columns(&["job_id", "num_gpu", "submit_time", "model_name", "duration"])?[..] else {
        unreachable!("five columns asked")
    };
    let mut jobs = Vec::new();
    for row in csv.rows() {
        let row = row?;
        jobs.push((
            row.line,
            Job {
                name: format!("job-{}", row.text(id, "job_id")?),
                workload: workload.to_owned(),
                submit_s: row.number(submit, "submit_time")?,
                gpus: row.count(gpus, "num_gpu")?,
                type_key: row.text(model, "model_name")?.to_owned(),
                models: vec![],
                share_milli: None,
                work: Work::Seconds(row.number(duration, "duration")?),
            },
        ));
    }
    jobs.sort_by(|a, b| a.1.submit_s.total_cmp(&b.1.submit_s).then(a.0.cmp(&b.0)));
    Ok(jobs.into_iter().map(|(_, j)| j).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "job_id,num_gpu,submit_time,iterations,model_name,duration,interval\n";

    #[test]
    fn loads_a_tiresias_trace() {
        let jobs = parse("60_job.csv", &format!("{HEADER}1,8,30,133,vgg11,147,23\n0,1,0,606,vgg19,164,30\n"), "w").expect("valid");
        assert_eq!(jobs.len(), 2);
        assert_eq!((&jobs[0].name[..], jobs[0].gpus, jobs[0].submit_s), ("job-0", 1, 0.0));
        assert_eq!((&jobs[1].type_key[..], jobs[1].work.clone()), ("vgg11", Work::Seconds(147.0)));
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let err = parse("60_job.csv", &format!("{HEADER}0,1,0,606,vgg19,164,30\n1,8,-3,133,vgg11,147,23\n"), "w").expect_err("negative").to_string();
        assert!(err.starts_with("60_job.csv:3: submit_time"), "{err}");
        let err = parse("60_job.csv", &format!("{HEADER}0,1,0,606,vgg19\n"), "w").expect_err("short").to_string();
        assert!(err.starts_with("60_job.csv:2: expected 7"), "{err}");
        let err = parse("60_job.csv", "job_id,gpus\n", "w").expect_err("header").to_string();
        assert!(err.contains("60_job.csv:1: header has no column \"num_gpu\""), "{err}");
    }
}
