//! Alerts end to end: a simulated card falls off the bus on a leased node → exactly one alert
//! mail (through aiosmtpd) and one SMS (to a local receiver that speaks Alibaba Cloud's
//! `SendSms` and checks its signature) reach the researcher holding the lease and the supplier;
//! when the card is back, one resolve message each. The alert history shows each delivery.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use reqwest::StatusCode;
use serde_json::json;
use support::{publish_node, Api, Backend, World};

const SECRET: &str = "test-aliyun-secret";
const WAIT: Duration = Duration::from_secs(40);

type Inbox = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

/// The carrier stand-in: refuses a request whose signature does not verify, as Aliyun would.
async fn send_sms(State(inbox): State<Inbox>, axum::Form(mut form): axum::Form<BTreeMap<String, String>>) -> (StatusCode, String) {
    let sent = form.remove("Signature").unwrap_or_default();
    let expected = suanli_notify::sms::aliyun_signature("POST", &form, SECRET);
    if sent != expected || form.get("Action").map(String::as_str) != Some("SendSms") {
        return (StatusCode::BAD_REQUEST, json!({"Code": "SignatureDoesNotMatch", "Message": "bad signature"}).to_string());
    }
    inbox.lock().expect("lock").push(form);
    (StatusCode::OK, json!({"Code": "OK", "Message": "OK", "BizId": "1", "RequestId": "r"}).to_string())
}

fn sms_to<'a>(inbox: &'a [BTreeMap<String, String>], phone: &str) -> Vec<&'a BTreeMap<String, String>> {
    inbox.iter().filter(|m| m.get("PhoneNumbers").map(String::as_str) == Some(phone)).collect()
}

/// The carrier stand-in on a port of its own, and a portal configuration that uses it.
async fn carrier(dir: &std::path::Path, more_toml: &str) -> anyhow::Result<(Inbox, std::path::PathBuf)> {
    carrier_with(dir, more_toml, "").await
}

/// As [`carrier`], with more `[portal.alerts]` settings.
async fn carrier_with(dir: &std::path::Path, more_toml: &str, alerts_toml: &str) -> anyhow::Result<(Inbox, std::path::PathBuf)> {
    let inbox: Inbox = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/", listener.local_addr()?);
    let app = axum::Router::new().route("/", post(send_sms)).with_state(inbox.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let config = dir.join("portal.toml");
    std::fs::write(
        &config,
        format!(
            "[portal]\n{more_toml}\n[portal.sms]\nprovider = \"aliyun\"\nendpoint = \"{url}\"\naccess_key_id = \"test-key\"\naccess_key_secret = \"{SECRET}\"\nsign_name = \"算力平台\"\ntemplate_code = \"SMS_1\"\n[portal.alerts]\nidle_lease_seconds = 4\ncheck_seconds = 1\n{alerts_toml}\n"
        ),
    )?;
    Ok((inbox, config))
}

#[tokio::test]
async fn a_card_fault_alerts_researcher_and_supplier_once_and_resolves_once() -> anyhow::Result<()> {
    let dir = tempfile::TempDir::new()?;
    let (inbox, config) = carrier(dir.path(), "").await?;
    let Some(w) = World::start_with(Backend::Sqlite, &["--config".into(), config.display().to_string()]).await? else { return Ok(()) };
    let result = scenario(&w, &inbox).await;
    w.explain(result)
}

/// A researcher hears when their balance runs low (and when a deposit lifts it), and when a
/// job finishes or fails (a real scheduler runs them on the agent's leased card).
#[tokio::test]
async fn a_low_balance_and_finished_and_failed_jobs_reach_the_researcher() -> anyhow::Result<()> {
    let dir = tempfile::TempDir::new()?;
    // Below the whole deposit: the lease's hold takes the balance under it.
    let threshold = format!("balance_low_minor = {}", suanli_testkit::fixtures::RESEARCHER_FUNDS);
    let (_inbox, config) = carrier_with(dir.path(), "", &threshold).await?;
    let Some(w) = World::start_with(Backend::Sqlite, &["--config".into(), config.display().to_string()]).await? else { return Ok(()) };
    let result = jobs_and_balance(&w).await;
    w.explain(result)
}

async fn jobs_and_balance(w: &World) -> anyhow::Result<()> {
    let supplier = w.person("supplier", "jobs_supplier").await?;
    let researcher = w.person("researcher", "jobs_researcher").await?;
    let to = "jobs_researcher@example.cn";
    let mail = |prefix: &'static str, about: &'static str| async move {
        suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
            w.smtp.messages().into_iter().find(|m| m.to.iter().any(|t| t == to) && m.subject.starts_with(prefix) && m.subject.contains(about))
        })
        .await
    };
    let (cluster, _agent) = publish_node(w, &supplier, "jobs-b", "B", "Shenzhen", support::running_as_root()).await?;
    let (status, lease) = researcher.post("/api/v1/leases", json!({"cluster_id": cluster, "cards": 1, "billing_mode": "hourly", "periods": 1})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{lease}");
    let low = mail("[Suanli] Alert", "available balance is low").await?;
    assert!(low.text.contains("balance") || low.subject.contains("balance"), "{}", low.subject);
    let (_, spend) = researcher.get("/api/v1/me/spend").await?;
    w.fund(spend["balance"]["account_id"].as_u64().unwrap_or_default(), "top-up").await?;
    mail("[Suanli] Resolved", "available balance is low").await?;

    if !support::running_as_root() {
        eprintln!("job alerts skipped: lease accounts need root");
        return Ok(());
    }
    let lease_id = lease["lease_id"].as_u64().unwrap_or_default();
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let (_, l) = researcher.get(&format!("/api/v1/leases/{lease_id}")).await.ok()?;
        (l["state"] == "active").then_some(())
    })
    .await?;
    let binary = suanli_testkit::workspace_binary("suanli-scheduler", "suanli-scheduler")?;
    let args: Vec<String> =
        ["--broker", &format!("http://{}", w.broker.address(1)?), "--token", suanli_testkit::cluster::PLATFORM_TOKEN, "--name", "alerts", "--round-ms", "200"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let _scheduler = suanli_testkit::Service::start("scheduler", &binary, &args, &[], w.dir.path(), WAIT).await?;
    let job = |name: &str, script: &str| json!({"spec": {"name": name, "kind": "training", "resources": {"cards": 1}, "max_attempts": 1, "run": {"command": {"program": "/bin/sh", "args": ["-c", script]}}}});
    let (status, body) = researcher.post("/api/v1/jobs", job("good", "exit 0")).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{body}");
    let finished = mail("[Suanli]", "job finished").await?;
    assert!(finished.subject.contains("(good)"), "{}", finished.subject);
    let (status, body) = researcher.post("/api/v1/jobs", job("bad", "exit 3")).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{body}");
    let failed = mail("[Suanli]", "job failed").await?;
    assert!(failed.subject.contains("(bad)") && failed.subject.contains("exit_status"), "{}", failed.subject);
    Ok(())
}

/// Registration with a mobile number takes the code the carrier delivered to it.
#[tokio::test]
async fn registration_verifies_the_phone_by_sms() -> anyhow::Result<()> {
    let dir = tempfile::TempDir::new()?;
    let (inbox, config) = carrier(dir.path(), "verify_phones = true").await?;
    let Some(w) = World::start_with(Backend::Sqlite, &["--config".into(), config.display().to_string()]).await? else { return Ok(()) };
    let api = w.client();
    let mut body = support::registration("supplier", "sms_supplier", "sms@example.cn");
    let phone = body["phone"].as_str().unwrap_or_default().to_owned();
    let (status, reply) = api.post("/api/v1/accounts", body.clone()).await?;
    assert_eq!((status, support::fields(&reply)), (StatusCode::BAD_REQUEST, vec!["phone_code".to_owned()]), "{reply}");
    let (status, reply) = api.post("/api/v1/phone-codes", json!({"phone": phone, "lang": "zh"})).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    let (status, reply) = api.post("/api/v1/phone-codes", json!({"phone": phone})).await?;
    assert_eq!((status, Api::code(&reply)), (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_ATTEMPTS"), "one code a minute: {reply}");
    let sms = suanli_testkit::eventually(WAIT, Duration::from_millis(50), || async {
        inbox.lock().ok()?.iter().find(|m| m.get("PhoneNumbers") == Some(&phone)).cloned()
    })
    .await?;
    let param: serde_json::Value = serde_json::from_str(&sms["TemplateParam"])?;
    let title = param["title"].as_str().unwrap_or_default();
    assert!(title.starts_with("算力平台验证码"), "in the requested language: {title}");
    let code = title.split_whitespace().last().unwrap_or_default().to_owned();
    assert_eq!(code.len(), 6);
    body["phone_code"] = json!(if code == "000000" { "000001" } else { "000000" });
    let (status, reply) = api.post("/api/v1/accounts", body.clone()).await?;
    assert_eq!((status, support::fields(&reply)), (StatusCode::BAD_REQUEST, vec!["phone_code".to_owned()]), "{reply}");
    body["phone_code"] = json!(code);
    let (status, reply) = api.post("/api/v1/accounts", body.clone()).await?;
    assert_eq!(status, StatusCode::CREATED, "{reply}");
    body["username"] = json!("sms_supplier2");
    body["email"] = json!("sms2@example.cn");
    let (status, reply) = api.post("/api/v1/accounts", body).await?;
    assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::CONFLICT, "a code works once: {status} {reply}");
    Ok(())
}

async fn scenario(w: &World, inbox: &Inbox) -> anyhow::Result<()> {
    let supplier = w.person("supplier", "alert_supplier").await?;
    let supplier_phone = support::registration("supplier", "alert_supplier", "x")["phone"].as_str().unwrap_or_default().to_owned();
    let researcher = w.person("researcher", "alert_researcher").await?;
    let researcher_phone = "13912345678";
    let (status, body) = researcher.send(reqwest::Method::PATCH, "/api/v1/me", Some(json!({"phone": researcher_phone}))).await?;
    anyhow::ensure!(status == StatusCode::OK, "{body}");
    let (cluster, agent) = publish_node(w, &supplier, "alert-b", "B", "Shenzhen", false).await?;
    let metrics = agent.get("metrics")?.to_owned();

    let (status, lease) = researcher.post("/api/v1/leases", json!({"cluster_id": cluster, "cards": 2, "billing_mode": "hourly", "periods": 1})).await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{lease}");
    let lease_id = lease["lease_id"].as_u64().unwrap_or_default();
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let (_, l) = researcher.get(&format!("/api/v1/leases/{lease_id}")).await.ok()?;
        (l["state"] == "active").then_some(())
    })
    .await?;
    let (_, detail) = researcher.get(&format!("/api/v1/clusters/{cluster}")).await?;
    let index_of = |card: &serde_json::Value| {
        detail["cards"].as_array().into_iter().flatten().find(|c| c["card_id"] == *card).and_then(|c| c["index"].as_u64()).unwrap_or_default()
    };
    let indexes: Vec<u64> = lease["card_ids"].as_array().into_iter().flatten().map(index_of).collect();
    let index = indexes[0];
    // The researcher's job keeps the cards busy (an idle paid lease is an alert of its own).
    let http = reqwest::Client::new();
    let set_load = |percent: u32| {
        let http = http.clone();
        let metrics = metrics.clone();
        let indexes = indexes.clone();
        async move {
            for i in indexes {
                let r = http.put(format!("http://{metrics}/simulated/cards/{i}/load/{percent}")).send().await?;
                anyhow::ensure!(r.status().is_success(), "load: {}", r.status());
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    set_load(60).await?;

    // The card falls off the bus.
    let r = http.post(format!("http://{metrics}/simulated/cards/{index}/fault/fallen-off-bus")).send().await?;
    anyhow::ensure!(r.status().is_success(), "inject: {}", r.status());
    let alert_mail = |to: &'static str| async move {
        suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
            w.smtp.messages().into_iter().find(|m| m.to.iter().any(|t| t == to) && m.subject.starts_with("[Suanli] Alert"))
        })
        .await
    };
    let mail = alert_mail("alert_researcher@example.cn").await?;
    assert!(mail.subject.contains(&format!("card {index} on alert-b")) && mail.subject.contains("fell off the bus"), "{}", mail.subject);
    alert_mail("alert_supplier@example.cn").await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let box_ = inbox.lock().ok()?;
        (sms_to(&box_, researcher_phone).len() == 1 && sms_to(&box_, &supplier_phone).len() == 1).then_some(())
    })
    .await?;

    // The card is back: one resolve message to each, by mail and SMS.
    let r = http.delete(format!("http://{metrics}/simulated/cards/{index}/fault")).send().await?;
    anyhow::ensure!(r.status().is_success(), "clear: {}", r.status());
    for to in ["alert_researcher@example.cn", "alert_supplier@example.cn"] {
        suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
            w.smtp.messages().into_iter().find(|m| m.to.iter().any(|t| t == to) && m.subject.starts_with("[Suanli] Resolved"))
        })
        .await?;
    }
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let box_ = inbox.lock().ok()?;
        (sms_to(&box_, researcher_phone).len() == 2 && sms_to(&box_, &supplier_phone).len() == 2).then_some(())
    })
    .await?;

    // The alert history says what was sent; it reads as delivered only once each deliver is marked.
    let history = suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let (_, h) = researcher.get("/api/v1/me/alerts").await.ok()?;
        let a = h.as_array()?.first()?.clone();
        (a["state"] == "resolved" && a["deliveries"].as_array()?.iter().all(|d| d["state"] == "sent")).then_some(h)
    })
    .await?;
    assert_eq!(history.as_array().map(Vec::len), Some(1), "{history}");
    let channels: Vec<&str> = history[0]["deliveries"].as_array().into_iter().flatten().filter_map(|d| d["channel"].as_str()).collect();
    assert_eq!(channels, ["email", "sms", "email", "sms"], "{history}");

    // The cards go idle while paid for: an idle-lease alert to the researcher, resolved when the
    // work resumes.
    set_load(0).await?;
    let idle_mail = |prefix: &'static str| async move {
        suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
            w.smtp
                .messages()
                .into_iter()
                .find(|m| m.to.iter().any(|t| t == "alert_researcher@example.cn") && m.subject.starts_with(prefix) && m.subject.contains("idle"))
        })
        .await
    };
    let idle = idle_mail("[Suanli] Alert").await?;
    assert!(idle.subject.contains(&format!("lease-{lease_id}")), "{}", idle.subject);
    set_load(60).await?;
    idle_mail("[Suanli] Resolved").await?;

    // Exactly once: no second alert for the same fault, no duplicate resolve.
    let mails = w.smtp.messages();
    for to in ["alert_researcher@example.cn", "alert_supplier@example.cn"] {
        let about_card = |m: &&suanli_testkit::smtp::Mail| m.to.iter().any(|t| t == to) && m.subject.contains("fell off the bus");
        let alerts = mails.iter().filter(about_card).filter(|m| m.subject.starts_with("[Suanli] Alert")).count();
        let resolved = mails.iter().filter(about_card).filter(|m| m.subject.starts_with("[Suanli] Resolved")).count();
        assert_eq!((alerts, resolved), (1, 1), "{to}");
    }
    let box_ = inbox.lock().map_err(|_| anyhow::anyhow!("lock"))?.clone();
    let ids: std::collections::BTreeSet<&str> = box_.iter().filter_map(|m| m.get("OutId").map(String::as_str)).collect();
    assert_eq!(ids.len(), box_.len(), "every SMS has its own message ID");
    let researcher_sms = sms_to(&box_, researcher_phone);
    assert!(researcher_sms[1]["TemplateParam"].contains("Resolved"), "{:?}", researcher_sms[1]);
    assert_eq!(sms_to(&box_, &supplier_phone).len(), 2, "the idle lease concerns only the researcher");

    // Settings: SMS off and quiet hours are kept; a bad window is refused field by field.
    let (status, body) =
        researcher.send(reqwest::Method::PUT, "/api/v1/me/notifications", Some(json!({"email": true, "sms": false, "quiet_hours": "25:00-07:00"}))).await?;
    assert_eq!((status, support::fields(&body)), (StatusCode::BAD_REQUEST, vec!["quiet_hours".to_owned()]), "{body}");
    let (status, body) =
        researcher.send(reqwest::Method::PUT, "/api/v1/me/notifications", Some(json!({"email": true, "sms": false, "quiet_hours": "22:00-07:30"}))).await?;
    assert_eq!((status, body["sms"].as_bool(), body["quiet_hours"].as_str()), (StatusCode::OK, Some(false), Some("22:00-07:30")), "{body}");
    Ok(())
}
