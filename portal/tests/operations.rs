//! The platform's own alerts reach its operators: a real Prometheus Alertmanager (Debian's
//! `prometheus-alertmanager`) posts to the portal's webhook with its bearer token, and the
//! operators who watch the platform — and nobody else — get one alert mail and, when it
//! resolves, one resolve mail, however often Alertmanager repeats itself. A caller without the
//! token is refused and changes nothing.

mod support;

use std::process::Stdio;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use support::{operator, Backend, World};

const WAIT: Duration = Duration::from_secs(40);
const TOKEN: &str = "alertmanager-posts-with-this-token";

struct Alertmanager {
    _child: tokio::process::Child,
    url: String,
}

/// Alertmanager routing everything to the portal at once (no grouping wait), resolved alerts
/// included.
async fn alertmanager(dir: &std::path::Path, portal: &str, token_file: &std::path::Path) -> anyhow::Result<Alertmanager> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        format!(
            "route:\n  receiver: portal\n  group_by: ['alertname', 'instance']\n  group_wait: 0s\n  group_interval: 1s\n  repeat_interval: 1h\nreceivers:\n  - name: portal\n    webhook_configs:\n      - url: {portal}/api/v1/operations/alertmanager\n        send_resolved: true\n        max_alerts: 500\n        http_config:\n          authorization:\n            type: Bearer\n            credentials_file: {}\n",
            token_file.display()
        ),
    )?;
    let log = std::fs::File::create(dir.join("alertmanager.log"))?;
    let child = tokio::process::Command::new("prometheus-alertmanager")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.path={}", dir.join("alertmanager-data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("prometheus-alertmanager ({e}): run ops/install-build-deps"))?;
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        http.get(format!("{url}/-/ready")).send().await.ok().filter(|r| r.status().is_success())
    })
    .await?;
    Ok(Alertmanager { _child: child, url })
}

/// What Prometheus would send Alertmanager: the alert, active since `starts` (Prometheus sends
/// the same `startsAt` with every repeat and with the resolve), firing, or resolved at `ends`.
async fn post_alert(am: &Alertmanager, starts: &str, ends: Option<&str>) -> anyhow::Result<()> {
    let mut alert = json!({
        "labels": {"alertname": "SuanliBrokerNodeDown", "severity": "page", "instance": "b2:9464", "job": "suanli-broker"},
        "annotations": {"summary": "Broker node b2:9464 is down"},
        "startsAt": starts,
    });
    if let Some(ends) = ends {
        alert["endsAt"] = json!(ends);
    }
    let r = reqwest::Client::new().post(format!("{}/api/v2/alerts", am.url)).json(&json!([alert])).send().await?;
    anyhow::ensure!(r.status().is_success(), "alertmanager: {}", r.status());
    Ok(())
}

fn mails_about(w: &World, to: &str, prefix: &str) -> usize {
    w.smtp.messages().iter().filter(|m| m.to.iter().any(|t| t == to) && m.subject.starts_with(prefix) && m.subject.contains("SuanliBrokerNodeDown")).count()
}

#[tokio::test]
async fn operators_who_watch_the_platform_hear_of_its_alerts_through_alertmanager_and_nobody_else_does() -> anyhow::Result<()> {
    let dir = tempfile::TempDir::new()?;
    let token_file = dir.path().join("alertmanager-token");
    std::fs::write(&token_file, TOKEN)?;
    let Some(w) = World::start_with(Backend::Sqlite, &["--alertmanager-token-file".into(), token_file.display().to_string()]).await? else { return Ok(()) };
    let result = scenario(&w, dir.path(), &token_file).await;
    w.explain(result)
}

async fn scenario(w: &World, dir: &std::path::Path, token_file: &std::path::Path) -> anyhow::Result<()> {
    let (ops, _) = operator(w, &w.database_url(), "ops_wang", "monitor").await?;
    operator(w, &w.database_url(), "ops_audit", "auditor").await?;
    w.person("researcher", "res_zhou").await?;
    let am = alertmanager(dir, &w.portal.url, token_file).await?;

    // Nobody without the token gets through, and nothing is recorded.
    let endpoint = format!("{}/api/v1/operations/alertmanager", w.portal.url);
    let forged = json!({"version": "4", "status": "firing", "alerts": [{"status": "firing", "labels": {"alertname": "SuanliBrokerNodeDown"}, "annotations": {}, "fingerprint": "0123abcd", "startsAt": "2026-12-03T08:00:00Z"}]});
    let http = reqwest::Client::new();
    for auth in [None, Some("Bearer not-the-token-at-all-sorry"), Some(TOKEN)] {
        // Only `Bearer <token>` counts, not the bare token.
        let mut request = http.post(&endpoint).json(&forged);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let r = request.send().await?;
        anyhow::ensure!(r.status() == StatusCode::UNAUTHORIZED, "{auth:?}: {}", r.status());
    }

    let starts = time_rfc3339(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() - 60);
    post_alert(&am, &starts, None).await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async { (mails_about(w, "ops_wang@suanli.test", "[Suanli] Alert") == 1).then_some(()) })
        .await?;
    let mail = w
        .smtp
        .messages()
        .into_iter()
        .find(|m| m.to.iter().any(|t| t == "ops_wang@suanli.test") && m.subject.starts_with("[Suanli] Alert"))
        .expect("the alert mail");
    anyhow::ensure!(mail.subject.contains("SuanliBrokerNodeDown: Broker node b2:9464 is down"), "{}", mail.subject);
    // Alertmanager sends the group again (a second alert of the group): still one alert.
    post_alert(&am, &starts, None).await?;
    let direct = http.post(&endpoint).header("authorization", format!("Bearer {TOKEN}")).json(&json!({"version": "4", "alerts": []})).send().await?;
    anyhow::ensure!(direct.status() == StatusCode::OK, "an empty notification is fine: {}", direct.status());

    // Resolved: one resolve mail to the same operator.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let ends = time_rfc3339(now);
    post_alert(&am, &starts, Some(&ends)).await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async { (mails_about(w, "ops_wang@suanli.test", "[Suanli] Resolved") == 1).then_some(()) })
        .await?;
    anyhow::ensure!(mails_about(w, "ops_wang@suanli.test", "[Suanli] Alert") == 1, "one alert mail, however often it was sent");
    // The auditor (who does not watch the platform) and the researcher heard nothing.
    for other in ["ops_audit@suanli.test", "res_zhou@example.cn"] {
        anyhow::ensure!(mails_about(w, other, "[Suanli]") == 0, "{other} got the platform's alert");
    }
    // The operator's alert history shows it, resolved.
    let (status, history) = ops.get("/api/v1/me/alerts").await?;
    anyhow::ensure!(status == StatusCode::OK, "{history}");
    let alerts: Vec<&serde_json::Value> = history.as_array().into_iter().flatten().filter(|a| a["kind"] == "operations").collect();
    anyhow::ensure!(alerts.len() == 1 && alerts[0]["state"] == "resolved", "{history}");
    Ok(())
}

/// `2026-12-03T08:00:00Z` for Unix seconds.
fn time_rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let (h, m, s) = ((unix % 86_400) / 3600, (unix % 3600) / 60, unix % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}
