//! Alibaba's 2023 GPU cluster trace (`alibaba/v2023/openb_*.csv`, the "openb" set).
//!
//! * Pods: `name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,
//!   deletion_time,scheduled_time` (seconds). A pod asking for part of one GPU
//!   (`gpu_milli` < 1000) becomes a sharing job; `gpu_spec` (`V100M16|V100M32`) the models
//!   it accepts; its run time `deletion_time − scheduled_time` (`− creation_time` for pods
//!   the trace never scheduled). CPU-only pods are left out and counted. `multigpu50` has no
//!   times and is refused.
//! * Nodes: `sn,cpu_milli,memory_mib,gpu,model` → the cluster, nodes grouped by (model, GPUs).

use std::collections::BTreeMap;

use suanli_scheduling::replay::GpuGroup;

use super::{Csv, TraceError};
use crate::engine::{Job, Work};

/// Pods with GPUs, sorted by creation, and how many CPU-only pods were left out.
pub fn parse_pods(file: &str, text: &str, workload: &str) -> Result<(Vec<Job>, usize), TraceError> {
    let csv = Csv::parse(file, text)?;
    let [name, gpus, milli, spec, created, deleted, scheduled] =
        csv.columns(&["name", "num_gpu", "gpu_milli", "gpu_spec", "creation_time", "deletion_time", "scheduled_time"])?[..]
    else {
        unreachable!("seven columns asked")
    };
    let mut jobs = Vec::new();
    let mut cpu_only = 0;
    for row in csv.rows() {
        let row = row?;
        let n = row.number(gpus, "num_gpu")?;
        if n.fract() != 0.0 || n > f64::from(u32::MAX) {
            return Err(row.error(format!("num_gpu {n} is not a whole number")));
        }
        if n == 0.0 {
            cpu_only += 1;
            continue;
        }
        let m = row.number(milli, "gpu_milli")?;
        if !(1.0..=1000.0).contains(&m) {
            return Err(row.error(format!("gpu_milli {m} is not within 1..=1000")));
        }
        let created = row.number(created, "creation_time")?;
        let deleted = row.number(deleted, "deletion_time")?;
        let start = if row.fields_empty(scheduled) { created } else { row.number(scheduled, "scheduled_time")? };
        if deleted < start {
            return Err(row.error(format!("deletion_time {deleted} is before its start {start}")));
        }
        let models = if row.fields_empty(spec) { vec![] } else { row.text(spec, "gpu_spec")?.split('|').map(str::to_owned).collect() };
        jobs.push((
            row.line,
            Job {
                name: row.text(name, "name")?.to_owned(),
                workload: workload.to_owned(),
                submit_s: created,
                gpus: n as u32,
                type_key: if m < 1000.0 { "openb-share".into() } else { "openb".into() },
                models,
                share_milli: (m < 1000.0 && n == 1.0).then_some(m as u32),
                work: Work::Seconds(deleted - start),
            },
        ));
    }
    jobs.sort_by(|a, b| a.1.submit_s.total_cmp(&b.1.submit_s).then(a.0.cmp(&b.0)));
    Ok((jobs.into_iter().map(|(_, j)| j).collect(), cpu_only))
}

/// The GPU nodes, grouped by (model, GPUs per node), in model order.
pub fn parse_nodes(file: &str, text: &str) -> Result<Vec<GpuGroup>, TraceError> {
    let csv = Csv::parse(file, text)?;
    let [gpus, model] = csv.columns(&["gpu", "model"])?[..] else { unreachable!("two columns asked") };
    let mut groups: BTreeMap<(String, u32), u32> = BTreeMap::new();
    for row in csv.rows() {
        let row = row?;
        let n = row.number(gpus, "gpu")?;
        if n.fract() != 0.0 || n > 1024.0 {
            return Err(row.error(format!("gpu {n} is not a whole number of GPUs")));
        }
        if n == 0.0 {
            continue;
        }
        *groups.entry((row.text(model, "model")?.to_owned(), n as u32)).or_default() += 1;
    }
    if groups.is_empty() {
        return Err(TraceError::File { file: file.to_owned(), reason: "no node with GPUs".into() });
    }
    Ok(groups.into_iter().map(|((model, cards_per_node), nodes)| GpuGroup { model, nodes, cards_per_node, vram_mib: 16_384 }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n";

    #[test]
    fn loads_pods_with_shares_and_model_constraints() {
        let text = format!(
            "{PODS}p1,6000,12288,1,460,,LS,Running,427061,12902960,427061\np0,12000,16384,2,1000,V100M16|V100M32,LS,Running,0,100,10\n\
             p2,8000,30517,0,0,,BE,Running,9992086,10013821,9992086\np3,1,1,1,1000,,BE,Pending,50,80,\n"
        );
        let (jobs, cpu_only) = parse_pods("openb.csv", &text, "default").expect("valid");
        assert_eq!((jobs.len(), cpu_only), (3, 1));
        assert_eq!((&jobs[0].name[..], jobs[0].gpus, jobs[0].work.clone()), ("p0", 2, Work::Seconds(90.0)));
        assert_eq!(jobs[0].models, vec!["V100M16".to_owned(), "V100M32".to_owned()]);
        assert_eq!((&jobs[1].name[..], jobs[1].work.clone(), jobs[1].share_milli), ("p3", Work::Seconds(30.0), None));
        assert_eq!(jobs[2].share_milli, Some(460));
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let err = parse_pods("pods.csv", &format!("{PODS}p,1,1,1,1000,,LS,Running,100,50,100\n"), "w").expect_err("ends early").to_string();
        assert!(err.starts_with("pods.csv:2: deletion_time"), "{err}");
        let err = parse_pods("multigpu50.csv", "name,cpu_milli,memory_mib,num_gpu,gpu_milli\n", "w").expect_err("no times").to_string();
        assert!(err.contains("multigpu50.csv:1: header has no column \"gpu_spec\""), "{err}");
        let err = parse_nodes("nodes.csv", "sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,2,P100\nn1,1,1,two,T4\n").expect_err("bad gpu").to_string();
        assert!(err.starts_with("nodes.csv:3: gpu"), "{err}");
    }

    #[test]
    fn nodes_group_by_model_and_size() {
        let groups = parse_nodes("n.csv", "sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,2,P100\nn1,1,1,8,G2\nn2,1,1,2,P100\nn3,1,1,0,\n").expect("valid");
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].model.as_str(), groups[0].nodes, groups[0].cards_per_node), ("G2", 1, 8));
        assert_eq!((groups[1].model.as_str(), groups[1].nodes, groups[1].cards_per_node), ("P100", 2, 2));
    }
}
