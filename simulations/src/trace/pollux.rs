//! Pollux and Sia workloads (`pollux/workloads*/workload-N.csv`, `sia/workloads/*/…`):
//! `name,time,application,num_replicas,batch_size`, and a duration model for their
//! applications from the Sia throughput profiles (`sia/throughput_profiles/<app>/`).
//!
//! # The duration model
//!
//! The workloads give no run times: Pollux's simulator derives them from measured profiles,
//! and so does this one, with the artifact's own definitions (its `applications.py` and
//! `Job.step`, re-implemented here, not copied), for a job that keeps the trace's
//! `num_replicas` and `batch_size` (how the artifact runs its Tiresias baseline):
//!
//! * the placement is packed onto 4-GPU nodes (6 replicas → one node of 4 and one of 2);
//! * per-replica batch = ⌈batch / replicas⌉, split into gradient-accumulation steps when it
//!   exceeds the largest profiled local batch (at least one on a single replica whose batch
//!   exceeds the application's initial one), capped so the total stays within the largest
//!   validated batch;
//! * step and sync time: linear in the local batch between the `placements.csv` rows of that
//!   placement, or for placements over more than 4 nodes between the `scalability.csv` rows
//!   of that (nodes, replicas); an accumulation step costs step − sync;
//! * statistical efficiency per epoch from the `validation-<batch>.csv` gradient statistics
//!   (linear between the validated batches around the job's): gain = (var + sqr) /
//!   (var / scale + sqr), scale = batch / initial batch; goodput = gain / iteration time;
//! * the job is done after `max_epochs` epochs (the artifact's: bert 2, cifar10 100, ncf 10,
//!   imagenet 90, deepspeech2 80, yolov3 50, with yolov3's local batch capped at 8), epoch
//!   `e` needing progress(e+1) − progress(e), progress(e) the smallest over the validation
//!   files of their progress after epoch e.
//!
//! Duration = Σ over epochs of that progress / goodput. Assumed: the Sia copies of the
//! profiles are the Pollux artifact's, and a job's speed does not depend on where the policy
//! actually puts it (our placement core packs jobs too, so it usually matches).

use std::collections::BTreeMap;
use std::path::Path;

use super::{read, Csv, TraceError};
use crate::engine::{Job, Work};

/// One row of a Pollux/Sia workload file.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadRow {
    pub name: String,
    pub time_s: f64,
    pub application: String,
    pub num_replicas: u32,
    pub batch_size: u32,
}

pub fn parse_workload(file: &str, text: &str) -> Result<Vec<WorkloadRow>, TraceError> {
    let csv = Csv::parse(file, text)?;
    let [name, time, app, replicas, batch] = csv.columns(&["name", "time", "application", "num_replicas", "batch_size"])?[..] else {
        unreachable!("five columns asked")
    };
    let mut rows = Vec::new();
    for row in csv.rows() {
        let row = row?;
        rows.push(WorkloadRow {
            name: row.text(name, "name")?.to_owned(),
            time_s: row.number(time, "time")?,
            application: row.text(app, "application")?.to_owned(),
            num_replicas: row.count(replicas, "num_replicas")?,
            batch_size: row.count(batch, "batch_size")?,
        });
    }
    Ok(rows)
}

/// Profile rows `(local_bsz, step_time, sync_time)`, sorted by local batch.
type Profile = Vec<(f64, f64, f64)>;

/// One application's profiles.
#[derive(Clone, Debug)]
pub struct Application {
    pub name: String,
    /// `placement id → [(local_bsz, step_time, sync_time)]`, sorted by local batch.
    placements: BTreeMap<String, Profile>,
    /// `(nodes, replicas) → [(local_bsz, step_time, sync_time)]`, sorted.
    scalability: BTreeMap<(u32, u32), Profile>,
    /// `batch → per epoch (progress, grad_sqr, grad_var)`.
    validation: BTreeMap<u32, Vec<(f64, f64, f64)>>,
    pub init_batch_size: u32,
    pub max_batch_size: u32,
    pub max_local_bsz: f64,
    pub max_epochs: usize,
}

/// The artifact's per-application settings: `(max_epochs, max_local_bsz override)`.
pub fn artifact_settings(app: &str) -> Option<(usize, Option<f64>)> {
    Some(match app {
        "bert" => (2, None),
        "cifar10" => (100, None),
        "ncf" => (10, None),
        "imagenet" => (90, None),
        "deepspeech2" => (80, None),
        "yolov3" => (50, Some(8.0)),
        _ => return None,
    })
}

fn interpolate(rows: &[(f64, f64, f64)], x: f64) -> (f64, f64) {
    let i = rows.partition_point(|r| r.0 < x);
    if i == 0 {
        return (rows[0].1, rows[0].2);
    }
    if i == rows.len() {
        let r = rows[rows.len() - 1];
        return (r.1, r.2);
    }
    let (a, b) = (rows[i - 1], rows[i]);
    if b.0 == a.0 {
        return (b.1, b.2);
    }
    let w = (x - a.0) / (b.0 - a.0);
    (a.1 + w * (b.1 - a.1), a.2 + w * (b.2 - a.2))
}

impl Application {
    /// Reads `<dir>/placements.csv`, `scalability.csv` and every `validation-<batch>.csv`.
    pub fn load(dir: &Path) -> Result<Self, TraceError> {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let file = |f: &str| dir.join(f);
        let (p_path, s_path) = (file("placements.csv"), file("scalability.csv"));
        let mut validation = Vec::new();
        let entries = std::fs::read_dir(dir).map_err(|source| TraceError::Io { file: dir.display().to_string(), source })?;
        for entry in entries {
            let path = entry.map_err(|source| TraceError::Io { file: dir.display().to_string(), source })?.path();
            let stem = path.file_name().and_then(|f| f.to_str()).and_then(|f| f.strip_prefix("validation-")).and_then(|f| f.strip_suffix(".csv"));
            if let Some(batch) = stem.and_then(|b| b.parse::<u32>().ok()) {
                validation.push((batch, path.display().to_string(), read(&path)?));
            }
        }
        let placements = read(&p_path)?;
        let scalability = read(&s_path)?;
        let v: Vec<(u32, &str, &str)> = validation.iter().map(|(b, f, t)| (*b, f.as_str(), t.as_str())).collect();
        Self::parse(&name, (&p_path.display().to_string(), &placements), (&s_path.display().to_string(), &scalability), &v)
    }

    pub fn parse(name: &str, placements: (&str, &str), scalability: (&str, &str), validation: &[(u32, &str, &str)]) -> Result<Self, TraceError> {
        let (max_epochs, local_cap) = artifact_settings(name)
            .ok_or_else(|| TraceError::File { file: name.to_owned(), reason: "not one of the Pollux artifact's applications".into() })?;
        let mut by_placement: BTreeMap<String, Profile> = BTreeMap::new();
        let csv = Csv::parse(placements.0, placements.1)?;
        let [p, l, st, sy] = csv.columns(&["placement", "local_bsz", "step_time", "sync_time"])?[..] else { unreachable!("four columns asked") };
        for row in csv.rows() {
            let row = row?;
            let id = row.text(p, "placement")?;
            if !id.bytes().all(|b| (b'1'..=b'9').contains(&b)) {
                return Err(row.error(format!("placement {id:?} is not a string of per-node replica counts")));
            }
            by_placement.entry(id.to_owned()).or_default().push((row.number(l, "local_bsz")?, row.number(st, "step_time")?, row.number(sy, "sync_time")?));
        }
        let mut by_shape: BTreeMap<(u32, u32), Profile> = BTreeMap::new();
        let csv = Csv::parse(scalability.0, scalability.1)?;
        let [n, r, l, st, sy] = csv.columns(&["num_nodes", "num_replicas", "local_bsz", "step_time", "sync_time"])?[..] else {
            unreachable!("five columns asked")
        };
        for row in csv.rows() {
            let row = row?;
            by_shape.entry((row.count(n, "num_nodes")?, row.count(r, "num_replicas")?)).or_default().push((
                row.number(l, "local_bsz")?,
                row.number(st, "step_time")?,
                row.number(sy, "sync_time")?,
            ));
        }
        for rows in by_placement.values_mut().chain(by_shape.values_mut()) {
            rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let mut epochs = BTreeMap::new();
        for &(batch, file, text) in validation {
            let csv = Csv::parse(file, text)?;
            let [p, sq, var] = csv.columns(&["progress", "grad_sqr", "grad_var"])?[..] else { unreachable!("three columns asked") };
            let mut rows = Vec::new();
            for row in csv.rows() {
                let row = row?;
                rows.push((row.number(p, "progress")?, row.number(sq, "grad_sqr")?, row.number(var, "grad_var")?));
            }
            if rows.len() < max_epochs {
                return Err(TraceError::File { file: file.to_owned(), reason: format!("{} epochs, {name} needs {max_epochs}", rows.len()) });
            }
            epochs.insert(batch, rows);
        }
        let (Some(&init), Some(&max)) = (epochs.keys().next(), epochs.keys().next_back()) else {
            return Err(TraceError::File { file: name.to_owned(), reason: "no validation-<batch>.csv".into() });
        };
        let profiled_max = by_placement.values().flatten().map(|r| r.0).fold(0.0, f64::max);
        if profiled_max <= 0.0 {
            return Err(TraceError::File { file: placements.0.to_owned(), reason: "no placement rows".into() });
        }
        Ok(Application {
            name: name.to_owned(),
            placements: by_placement,
            scalability: by_shape,
            validation: epochs,
            init_batch_size: init,
            max_batch_size: max,
            max_local_bsz: local_cap.unwrap_or(profiled_max),
            max_epochs,
        })
    }

    fn progress(&self, epoch: usize) -> f64 {
        if epoch == 0 {
            return 0.0;
        }
        self.validation.values().map(|rows| rows[epoch - 1].0).fold(f64::INFINITY, f64::min)
    }

    fn grad_stats(&self, batch: f64, epoch: usize) -> (f64, f64) {
        let lower = self.validation.range(..=batch.floor() as u32).next_back();
        let upper = self.validation.range(batch.ceil() as u32..).next();
        match (lower, upper) {
            (Some((&lb, lo)), Some((&ub, up))) if ub > lb => {
                let w = (batch - f64::from(lb)) / f64::from(ub - lb);
                (lo[epoch].1 + w * (up[epoch].1 - lo[epoch].1), lo[epoch].2 + w * (up[epoch].2 - lo[epoch].2))
            }
            (Some((_, r)), _) | (None, Some((_, r))) => (r[epoch].1, r[epoch].2),
            (None, None) => (0.0, 0.0),
        }
    }

    /// Step and sync time of `replicas` packed onto 4-GPU nodes at local batch `local`.
    fn throughput(&self, replicas: u32, local: f64) -> Result<(f64, f64), String> {
        let mut per_node = Vec::new();
        let mut left = replicas;
        while left > 0 {
            per_node.push(left.min(4));
            left -= left.min(4);
        }
        let id = (0..per_node.len())
            .map(|i| per_node[i..].iter().chain(&per_node[..i]).map(|n| char::from(b'0' + *n as u8)).collect::<String>())
            .min()
            .unwrap_or_default();
        if let Some(rows) = self.placements.get(&id) {
            return Ok(interpolate(rows, local));
        }
        let nodes = (per_node.len() as u32).min(16);
        self.scalability
            .get(&(nodes, replicas))
            .map(|rows| interpolate(rows, local))
            .ok_or_else(|| format!("no profile of {} on {replicas} replicas ({nodes} nodes)", self.name))
    }

    /// Seconds to train to completion on `replicas` GPUs at total batch `batch_size`.
    pub fn duration_s(&self, replicas: u32, batch_size: u32) -> Result<f64, String> {
        let n = f64::from(replicas);
        let local = (f64::from(batch_size) / n - 1e-8).ceil();
        let mut accum = ((local / self.max_local_bsz - 1e-8).ceil() - 1.0).max(0.0);
        if replicas == 1 && batch_size > self.init_batch_size {
            accum = accum.max(1.0);
        }
        let atomic = (local / (accum + 1.0) - 1e-8).ceil().min((f64::from(self.max_batch_size) / (n * (accum + 1.0))).floor());
        let batch = n * atomic * (accum + 1.0);
        let scale = batch / f64::from(self.init_batch_size);
        let (step, sync) = self.throughput(replicas, atomic)?;
        let iteration = step + accum * (step - sync);
        if iteration.is_nan() || iteration <= 0.0 {
            return Err(format!("{}: iteration time {iteration} on {replicas} replicas", self.name));
        }
        let mut seconds = 0.0;
        for epoch in 0..self.max_epochs {
            let (sqr, var) = self.grad_stats(batch, epoch);
            let gain = if var / scale + sqr > 0.0 { (var + sqr) / (var / scale + sqr) } else { 1.0 };
            seconds += (self.progress(epoch + 1) - self.progress(epoch)) / (gain / iteration);
        }
        Ok(seconds)
    }
}

/// Loads `<profiles>/<app>` for every application the rows name.
pub fn applications(profiles: &Path, rows: &[WorkloadRow]) -> Result<BTreeMap<String, Application>, TraceError> {
    let mut apps = BTreeMap::new();
    for r in rows {
        if !apps.contains_key(&r.application) {
            apps.insert(r.application.clone(), Application::load(&profiles.join(&r.application))?);
        }
    }
    Ok(apps)
}

/// Jobs from workload rows, their work the model's duration at the trace's fixed size.
pub fn jobs(file: &str, workload: &str, rows: &[WorkloadRow], apps: &BTreeMap<String, Application>) -> Result<Vec<Job>, TraceError> {
    let mut jobs: Vec<Job> = rows
        .iter()
        .map(|r| {
            let app = apps
                .get(&r.application)
                .ok_or_else(|| TraceError::File { file: file.to_owned(), reason: format!("no profile for application {:?}", r.application) })?;
            let seconds = app
                .duration_s(r.num_replicas, r.batch_size)
                .map_err(|reason| TraceError::File { file: file.to_owned(), reason: format!("{}: {reason}", r.name) })?;
            Ok(Job {
                name: r.name.clone(),
                workload: workload.to_owned(),
                submit_s: r.time_s,
                gpus: r.num_replicas,
                type_key: r.application.clone(),
                models: vec![],
                share_milli: None,
                work: Work::Seconds(seconds),
            })
        })
        .collect::<Result<_, TraceError>>()?;
    jobs.sort_by(|a, b| a.submit_s.total_cmp(&b.submit_s));
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "name,time,application,num_replicas,batch_size\n";

    #[test]
    fn loads_a_workload() {
        let rows = parse_workload("w.csv", &format!("{HEADER}cifar10-0,107,cifar10,6,2048\nncf-2,135,ncf,1,32768\n")).expect("valid");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], WorkloadRow { name: "ncf-2".into(), time_s: 135.0, application: "ncf".into(), num_replicas: 1, batch_size: 32768 });
    }

    #[test]
    fn a_malformed_line_names_file_and_line() {
        let err = parse_workload("workload-1.csv", &format!("{HEADER}cifar10-0,107,cifar10,6,2048\nncf-2,135,ncf,one,32768\n")).expect_err("bad").to_string();
        assert!(err.starts_with("workload-1.csv:3: num_replicas"), "{err}");
    }

    /// A two-epoch toy application: one placement, no batch-size scaling.
    #[test]
    fn duration_is_progress_over_goodput() {
        let placements = ("p.csv", "placement,local_bsz,step_time,sync_time\n1,8,0.5,0.1\n1,16,1.0,0.2\n2,8,0.6,0.2\n");
        let scalability = ("s.csv", "num_nodes,num_replicas,local_bsz,step_time,sync_time\n");
        let v = "progress,iteration,metric,grad_sqr,grad_var\n100,10,0.1,1,0\n300,20,0.2,1,0\n";
        let app = Application::parse("bert", placements, scalability, &[(8, "v8.csv", v)]).expect("valid");
        // 1 replica at batch 8: step 0.5 s, gain 1; 300 progress → 150 s.
        assert!((app.duration_s(1, 8).expect("profiled") - 150.0).abs() < 1e-9);
        // 2 replicas (one node), local 4 → below the profile, the smallest row's 0.6 s.
        assert!((app.duration_s(2, 8).expect("profiled") - 180.0).abs() < 1e-9);
        assert!(app.duration_s(3, 9).is_err());
        let bad = Application::parse("bert", ("p.csv", "placement,local_bsz,step_time,sync_time\n1,8,x,0.1\n"), scalability, &[(8, "v8.csv", v)]);
        assert!(bad.expect_err("bad number").to_string().starts_with("p.csv:2: step_time"));
    }
}
