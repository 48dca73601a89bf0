//! The Kubernetes manifests (`ops/kubernetes/`) against Kubernetes' own schemas, strictly (an
//! unknown field is an error), with `kubernetes-validate` (PyPI, offline); and the
//! configuration they carry against the loaders that will read it.

use std::path::{Path, PathBuf};

fn manifests() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kubernetes");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(&dir).expect("ops/kubernetes").map(|e| e.expect("entry").path()).filter(|p| p.extension().is_some_and(|e| e == "yaml")).collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    files
}

fn validator() -> PathBuf {
    let tools = std::env::var("SUANLI_TOOLS").unwrap_or_else(|_| "/var/tmp/suanli-tools".into());
    Path::new(&tools).join("venv/bin/kubernetes-validate")
}

/// The text of a ConfigMap's file entry (`key: |` and the block indented under it).
fn config_map_file(manifest: &str, key: &str) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../kubernetes").join(manifest)).expect("manifest");
    let mut lines = text.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().expect("the entry");
    let indent = header.len() - header.trim_start().len() + 2;
    lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent).map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

#[test]
fn every_manifest_validates_strictly_against_the_kubernetes_schemas() {
    let validator = validator();
    assert!(validator.is_file(), "{} is missing: run ops/install-build-deps", validator.display());
    let out = std::process::Command::new(&validator).args(["--strict", "--quiet", "-k", "1.33.0"]).args(manifests()).output().expect("kubernetes-validate");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_manifest_with_a_misspelt_field_is_refused() {
    let validator = validator();
    assert!(validator.is_file(), "{} is missing: run ops/install-build-deps", validator.display());
    let dir = tempfile::tempdir().expect("dir");
    let broker = std::fs::read_to_string(manifests().into_iter().find(|p| p.ends_with("broker.yaml")).expect("broker.yaml")).expect("read");
    let bad = dir.path().join("broker.yaml");
    std::fs::write(&bad, broker.replacen("  replicas: 3", "  replica: 3", 1)).expect("write");
    let out = std::process::Command::new(&validator).args(["--strict", "--quiet", "-k", "1.33.0"]).arg(&bad).output().expect("kubernetes-validate");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("'replica' was unexpected"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn the_backup_job_carries_a_configuration_suanli_ops_loads() {
    let config = suanli_ops::backup::BackupConfig::parse(&config_map_file("backup.yaml", "backup.toml")).expect("backup.toml in backup.yaml");
    assert_eq!(config.artifacts.dir, Path::new("/var/lib/suanli/artifacts"));
    assert!(config.offsite.is_some());
}
