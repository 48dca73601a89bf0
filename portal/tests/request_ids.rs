//! One request followed across services: the portal answers with the request's ID (the
//! caller's `x-request-id`, or one it makes), and with `SUANLI_LOG_FORMAT=json` the portal's log
//! line for the failed request and the broker's for the call it made both carry that ID.

mod support;

use std::time::Duration;

use support::{Backend, World};

fn json_lines_with(log: &str, id: &str) -> Vec<serde_json::Value> {
    log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter(|v| v.to_string().contains(id)).collect()
}

#[tokio::test]
async fn a_failed_requests_id_is_in_the_answer_and_in_the_portals_and_the_brokers_log_lines() -> anyhow::Result<()> {
    // Each test is its own process (nextest): the services inherit this.
    std::env::set_var("SUANLI_LOG_FORMAT", "json");
    let Some(w) = World::start(Backend::Sqlite).await? else { return Ok(()) };
    let researcher = w.person("researcher", "trace_li").await?;
    let id = "trace-lease-424242";
    let answer = researcher.http.get(format!("{}/api/v1/leases/424242", w.portal.url)).header("x-request-id", id).send().await?;
    anyhow::ensure!(answer.status() == reqwest::StatusCode::NOT_FOUND, "{}", answer.status());
    anyhow::ensure!(answer.headers().get("x-request-id").and_then(|v| v.to_str().ok()) == Some(id), "{:?}", answer.headers());
    // An unsafe ID is not taken: the portal makes its own.
    let made = researcher.http.get(format!("{}/api/v1/leases/424243", w.portal.url)).header("x-request-id", "bad id; drop").send().await?;
    let made_id = made.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    anyhow::ensure!(made_id.len() == 16 && made_id.bytes().all(|b| b.is_ascii_hexdigit()), "{made_id:?}");

    suanli_testkit::eventually(Duration::from_secs(10), Duration::from_millis(100), || async {
        let portal = json_lines_with(&w.portal.service.log(), id);
        let broker = json_lines_with(&w.broker.log(1), id);
        let portal_answered = portal.iter().any(|l| l["fields"]["message"] == "answered" && l["fields"]["status"] == 404);
        let broker_refused = broker.iter().any(|l| l["fields"]["message"] == "call refused" && l["fields"]["code"] == "NOT_FOUND");
        (portal_answered && broker_refused).then_some(())
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nportal:\n{}\nbroker:\n{}", w.portal.service.log(), w.broker.log(1)))?;
    Ok(())
}
