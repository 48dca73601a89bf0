//! What the shipped observability assets (`ops/grafana/*.json`, `ops/prometheus/alerts.yml`)
//! ask of the services' `/metrics`: the tests of each exporter check that it serves every
//! series they name, so a renamed metric breaks a test, not a dashboard in production.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn ops_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops")
}

/// Every dashboard, parsed.
pub fn dashboards() -> Vec<(PathBuf, serde_json::Value)> {
    let dir = ops_dir().join("grafana");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("dashboard");
            let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path, value)
        })
        .collect()
}

/// Every PromQL expression of every dashboard panel.
pub fn dashboard_expressions() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, dashboard) in dashboards() {
        for panel in dashboard["panels"].as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().unwrap_or_default().to_owned();
                out.push((format!("{} / {}", path.file_name().unwrap_or_default().to_string_lossy(), panel["title"].as_str().unwrap_or("?")), expr));
            }
        }
    }
    out
}

/// The Suanli and DCGM series names in `text` (PromQL, or a whole rules file).
pub fn series_named_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| (t.starts_with("suanli_") || t.starts_with("DCGM_")) && t.len() > 7)
        .map(str::to_owned)
        .collect()
}

/// Every series the dashboards and the alerting rules name.
pub fn referenced_series() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = dashboard_expressions().iter().flat_map(|(_, e)| series_named_in(e)).collect();
    let rules = std::fs::read_to_string(ops_dir().join("prometheus/alerts.yml")).expect("alerts.yml");
    names.extend(series_named_in(&rules));
    names
}

/// The series names a Prometheus text exposition holds (`name{…} value` or `name value`).
pub fn exposed_series(exposition: &str) -> BTreeSet<String> {
    exposition.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(|l| l.split(['{', ' ']).next()).map(str::to_owned).collect()
}

/// Names of `referenced` with one of `prefixes` that `exposed` lacks.
pub fn missing(referenced: &BTreeSet<String>, prefixes: &[&str], exposed: &BTreeSet<String>) -> Vec<String> {
    referenced.iter().filter(|n| prefixes.iter().any(|p| n.starts_with(p)) && !exposed.contains(*n)).cloned().collect()
}
