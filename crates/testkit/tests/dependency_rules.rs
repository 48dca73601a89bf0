//! ARCHITECTURE.md's dependency rules, checked against every workspace member's `Cargo.toml`
//! (rust-analyzer's "tidy" idea): the table is the rule, this test keeps the code to it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

struct Rule {
    may_use: BTreeSet<String>,
    owns: BTreeSet<String>,
}

/// The rows of the "Dependency rules" table: crate → (suanli crates it may use, stacks only
/// it may use).
fn rules() -> BTreeMap<String, Rule> {
    let text = std::fs::read_to_string(workspace().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let section = text.split("## Dependency rules").nth(1).expect("a Dependency rules section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let list = |cell: &str| -> BTreeSet<String> { cell.split(',').map(str::trim).filter(|s| !s.is_empty() && *s != "—").map(str::to_owned).collect() };
    let mut rules = BTreeMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        assert_eq!(cells.len(), 3, "a row of three cells: {line}");
        let name = cells[0].trim().trim_matches('`').to_owned();
        let may_use = list(cells[1]).into_iter().map(|short| format!("suanli-{short}")).collect();
        rules.insert(name, Rule { may_use, owns: list(cells[2]) });
    }
    assert!(rules.len() > 10, "the table was not found or not read: {} rows", rules.len());
    rules
}

struct Member {
    name: String,
    dependencies: BTreeSet<String>,
    has_binary: bool,
}

fn members() -> Vec<Member> {
    let root: toml::Table = std::fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml").parse().expect("toml");
    let paths = root["workspace"]["members"].as_array().expect("members");
    paths
        .iter()
        .map(|p| {
            let dir = workspace().join(p.as_str().expect("a path"));
            let manifest: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml")).expect("member Cargo.toml").parse().expect("toml");
            let name = manifest["package"]["name"].as_str().expect("name").to_owned();
            let dependencies = manifest.get("dependencies").and_then(|d| d.as_table()).map(|t| t.keys().cloned().collect()).unwrap_or_default();
            let has_binary = manifest.get("bin").is_some() || dir.join("src/main.rs").exists();
            Member { name, dependencies, has_binary }
        })
        .collect()
}

#[test]
fn every_member_has_a_row_and_uses_only_the_suanli_crates_its_row_names() {
    let rules = rules();
    let mut broken = Vec::new();
    for member in members() {
        let Some(rule) = rules.get(&member.name) else {
            broken.push(format!("{} has no row in ARCHITECTURE.md's dependency rules", member.name));
            continue;
        };
        for dependency in member.dependencies.iter().filter(|d| d.starts_with("suanli-")) {
            if !rule.may_use.contains(dependency) {
                broken.push(format!("{} depends on {dependency}, which its row does not allow", member.name));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn each_external_stack_is_used_by_the_one_crate_that_owns_it() {
    let rules = rules();
    let owner: BTreeMap<&str, &str> = rules.iter().flat_map(|(name, rule)| rule.owns.iter().map(move |s| (s.as_str(), name.as_str()))).collect();
    let mut broken = Vec::new();
    for member in members() {
        for dependency in &member.dependencies {
            if let Some(owner) = owner.get(dependency.as_str()).filter(|o| **o != member.name) {
                broken.push(format!("{} uses {dependency}, which only {owner} may use", member.name));
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn anyhow_appears_only_in_binaries_and_the_test_harness() {
    let offenders: Vec<String> =
        members().into_iter().filter(|m| m.dependencies.contains("anyhow") && !m.has_binary && m.name != "suanli-testkit").map(|m| m.name).collect();
    assert!(offenders.is_empty(), "libraries return typed errors (thiserror), not anyhow: {offenders:?}");
}
