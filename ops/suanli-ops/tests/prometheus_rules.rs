//! The Prometheus alerting rules shipped in `ops/prometheus/alerts.yml`: `promtool check rules`
//! accepts them, and `promtool test rules` runs their unit tests (`alerts.test.yml`: each alert
//! fires in one case and stays quiet in another). promtool is required: without it these tests
//! fail, naming `ops/install-build-deps`, which installs Debian's `prometheus` package.

use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::Command;

fn rules_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../prometheus"))
}

/// Runs promtool with `args` in `ops/prometheus`; panics, with what it printed, unless it succeeds.
fn promtool(args: &[&str]) {
    let out = match Command::new("promtool").args(args).current_dir(rules_dir()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "promtool is not installed; run ops/install-build-deps (as root or with sudo), which installs \
             Debian's `prometheus` package that ships promtool"
        ),
        Err(e) => panic!("promtool could not be started ({e}); ops/install-build-deps installs it"),
    };
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed ({}):\n{said}", args.join(" "), out.status);
}

#[test]
fn the_alerting_rules_pass_promtool_check() {
    promtool(&["check", "rules", "alerts.yml"]);
}

#[test]
fn the_alerting_rules_pass_their_promtool_unit_tests() {
    promtool(&["test", "rules", "alerts.test.yml"]);
}

#[test]
fn the_alertmanager_configuration_passes_amtool_check() {
    let out = Command::new("amtool")
        .args(["check-config", "alertmanager.yml"])
        .current_dir(rules_dir())
        .output()
        .unwrap_or_else(|e| panic!("amtool could not be started ({e}); ops/install-build-deps installs Debian's prometheus-alertmanager, which ships it"));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.contains("SUCCESS"), "amtool check-config:\n{said}");
}

#[test]
fn pages_reach_on_call_without_the_portal_and_the_watchdog_reaches_the_dead_mans_switch() {
    for (labels, receivers) in [
        (&["severity=page", "alertname=SuanliPortalDown"][..], "on-call-mail,suanli-portal"),
        (&["severity=ticket", "alertname=SuanliPortalOutboxBacklog"][..], "suanli-portal"),
        (&["severity=none", "alertname=SuanliWatchdog"][..], "dead-mans-switch"),
    ] {
        let out = Command::new("amtool")
            .args(["config", "routes", "test", "--config.file=alertmanager.yml"])
            .args(labels)
            .current_dir(rules_dir())
            .output()
            .unwrap_or_else(|e| panic!("amtool could not be started ({e}); ops/install-build-deps installs it"));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), receivers, "{labels:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
