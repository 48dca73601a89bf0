//! The newcomer's path in headless Chromium: register → activation mail (real SMTP) → activate →
//! log in → filter the catalogue → request a lease → the supplier approves in its own session →
//! verify the code → see the SSH details. Screenshots of the main pages are saved under
//! `target/tmp/portal-screenshots/`.

mod support;

use std::time::Duration;

use suanli_testkit::webdriver::Browser;
use support::{activation_token, browser_login, publish_node, running_as_root, screenshots, Backend, World, PASSWORD};

const WAIT: Duration = Duration::from_secs(20);

/// The lease state shown on a lease page (the attribute, whatever the page's language).
async fn lease_state(b: &Browser) -> anyhow::Result<String> {
    b.wait_for("td.state", WAIT).await?;
    let v = b.execute("return document.querySelector('td.state').dataset.state", serde_json::json!([])).await?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

async fn logout(b: &Browser) -> anyhow::Result<()> {
    b.click("button[data-logout]").await?;
    b.wait_for("a[href='/login']", WAIT).await?;
    Ok(())
}

async fn journey(w: &World, b: &Browser) -> anyhow::Result<()> {
    let url = &w.portal.url;
    let supplier = w.person("supplier", "shenzhen_gpu").await?;
    let (cluster, _agent) = publish_node(w, &supplier, "sz-bm-01", "A", "Shenzhen", running_as_root()).await?;
    let (class_b, _other_agent) = publish_node(w, &supplier, "bj-vm-01", "B", "Beijing", false).await?;

    // Register in the browser.
    b.goto(&format!("{url}/register")).await?;
    b.screenshot(&screenshots().join("register.png")).await?;
    b.select("select[name=user_type]", "personal").await?;
    for (name, value) in [
        ("username", "chen_liu"),
        ("email", "chen.liu@example.cn"),
        ("password", PASSWORD),
        ("password_confirm", PASSWORD),
        ("real_name", "陈六"),
        ("id_number", &support::id_number("44030519900101123")),
    ] {
        b.type_into(&format!("input[name={name}]"), value).await?;
    }
    // First without accepting the terms: the problem shows beside the checkbox.
    b.click("form.api button[type=submit]").await?;
    let problem = b.wait_text(".problem[data-for=agree_terms]", WAIT).await?;
    assert!(problem.contains("accepted"), "{problem}");
    b.click("input[name=agree_terms]").await?;
    b.click("form.api button[type=submit]").await?;
    b.wait_for("[data-after='/api/v1/accounts']:not(.hidden)", WAIT).await?;
    b.screenshot(&screenshots().join("registered.png")).await?;

    // The activation link from the mail, opened in the browser.
    let mail = w.smtp.wait_for("chen.liu@example.cn", WAIT).await?;
    b.goto(&format!("{url}/activate?token={}", activation_token(&mail.text)?)).await?;
    b.wait_for("#activated", WAIT).await?;

    browser_login(b, url, "chen_liu").await?;
    // Leases are prepaid: the payment service pays money in for the new account.
    let spend = b.execute("return fetch('/api/v1/me/spend').then(r => r.json())", serde_json::json!([])).await?;
    w.fund(spend["balance"]["account_id"].as_u64().unwrap_or_default(), "chen_liu").await?;
    // Filter the catalogue by class and region.
    b.select("form.filters select[name=class]", "A").await?;
    b.type_into("form.filters input[name=region]", "shenzhen").await?;
    b.click("form.filters button[type=submit]").await?;
    b.wait_url("class=A", WAIT).await?;
    let rows = b.execute("return [...document.querySelectorAll('table.catalogue tbody tr')].map(r => r.innerText)", serde_json::json!([])).await?;
    let rows: Vec<String> = serde_json::from_value(rows)?;
    assert_eq!(rows.len(), 1, "one Class A cluster in Shenzhen: {rows:?}");
    assert!(rows[0].contains("Shenzhen") && rows[0].contains("A100"), "{rows:?}");
    b.screenshot(&screenshots().join("catalogue.png")).await?;

    // Request the whole node for a month.
    b.click("table.catalogue tbody tr a").await?;
    b.wait_url(&format!("/clusters/{cluster}"), WAIT).await?;
    b.screenshot(&screenshots().join("cluster.png")).await?;
    b.click("input[name=node_ids]").await?;
    b.select("select[name=billing_mode]", "monthly").await?;
    b.click("section.request button[type=submit]").await?;
    let lease_url = b.wait_url("/leases/", WAIT).await?;
    let lease: u64 = lease_url.rsplit('/').next().unwrap_or_default().parse()?;
    assert_eq!(lease_state(b).await?, "requested");
    logout(b).await?;

    // The supplier approves in its own session and reads the code off the page.
    browser_login(b, url, "shenzhen_gpu").await?;
    b.goto(&format!("{url}/leases/{lease}")).await?;
    b.click("form.api button[type=submit]").await?;
    let code = b.wait_text("output.result", WAIT).await?;
    assert_eq!(code.trim().len(), 16, "{code}");
    b.screenshot(&screenshots().join("supplier-approved.png")).await?;
    b.goto(&format!("{url}/supplier")).await?;
    b.screenshot(&screenshots().join("supplier.png")).await?;
    // The supplier modifies its Class B listing from the cluster page.
    b.goto(&format!("{url}/clusters/{class_b}")).await?;
    b.type_into("section.modify input[name=title]", "8*A100 renamed").await?;
    b.type_into("section.modify input[name='price.hourly']", "9.50").await?;
    b.click("section.modify button[type=submit]").await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async { b.wait_text("main h1", WAIT).await.ok().filter(|t| t.contains("renamed")) })
        .await?;
    let prices = b.wait_text("dl.facts ul.prices", WAIT).await?;
    assert!(prices.contains("¥9.50 / hourly"), "{prices}");
    // A Class B cluster's page plots the agent's live samples (server-sent events) for those
    // the broker lets watch it: its supplier here (a researcher only while leasing it).
    b.goto(&format!("{url}/clusters/{class_b}")).await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(200), || async {
        let v = b.execute("return document.querySelector('figure[data-series=cpu] strong').textContent", serde_json::json!([])).await.ok()?;
        (v.as_str().is_some_and(|t| t != "—")).then_some(())
    })
    .await?;
    b.screenshot(&screenshots().join("cluster-live.png")).await?;

    logout(b).await?;

    // The researcher verifies the code and sees how to log in.
    browser_login(b, url, "chen_liu").await?;
    b.goto(&format!("{url}/leases/{lease}")).await?;
    b.type_into("input[name=authorization_code]", code.trim()).await?;
    b.click("form.api button[type=submit]").await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async { b.find("section.access").await.ok() }).await?;
    assert_eq!(lease_state(b).await?, "active");
    let login_name = if running_as_root() {
        let ssh = b.wait_text("section.access pre", WAIT).await?;
        assert!(ssh.starts_with("ssh ") && ssh.contains("-p "), "{ssh}");
        ssh.split_whitespace().last().and_then(|t| t.split('@').next()).map(str::to_owned)
    } else {
        None
    };
    b.screenshot(&screenshots().join("lease-active.png")).await?;

    // Chinese throughout after the switch.
    b.goto(&format!("{url}/")).await?;
    b.click("a.lang").await?;
    let lang = b.execute("return document.documentElement.lang", serde_json::json!([])).await?;
    assert_eq!(lang, "zh-CN");
    let title = b.wait_text("main h1", WAIT).await?;
    assert_eq!(title, "资源目录");
    b.screenshot(&screenshots().join("catalogue-zh.png")).await?;
    b.goto(&format!("{url}/leases")).await?;
    b.screenshot(&screenshots().join("leases-zh.png")).await?;

    // Ending the lease from its page removes the lease's Unix account on the node.
    b.goto(&format!("{url}/leases/{lease}")).await?;
    b.click("form.api[data-api$='/end'] button[type=submit]").await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async { (lease_state(b).await.ok()? == "ended").then_some(()) }).await?;
    if let Some(login) = login_name {
        suanli_testkit::eventually(Duration::from_secs(30), Duration::from_millis(200), || async {
            let out = tokio::process::Command::new("getent").args(["passwd", &login]).output().await.ok()?;
            (!out.status.success()).then_some(())
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn newcomer_journey_in_chromium() -> anyhow::Result<()> {
    let Some(w) = World::start(Backend::Sqlite).await? else { return Ok(()) };
    let b = Browser::start().await?;
    let result = journey(&w, &b).await;
    if result.is_err() {
        let _ = b.screenshot(&screenshots().join("failure.png")).await;
    }
    w.explain(result)
}
