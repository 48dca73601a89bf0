//! The outbox survives what can happen to a process that sends mail: the relay being down (the
//! message is retried, its error recorded, nothing lost), a kill -9 before the send (delivered
//! once after the restart), and a crash after the relay took the message but before it was
//! marked sent (delivered again, recognisably the same: the same Message-ID).

mod support;

use std::time::Duration;

use sqlx::Row;
use suanli_testkit::cluster::PLATFORM_TOKEN;
use suanli_testkit::portal::{PortalOptions, PortalProcess};
use support::{registration, Backend, World};

/// More than the outbox's claim on a message a crashed worker was sending (15 s).
const WAIT: Duration = Duration::from_secs(45);

#[tokio::test]
async fn mail_is_never_lost_and_a_redelivery_keeps_its_message_id() -> anyhow::Result<()> {
    let Some(mut w) = World::start(Backend::Sqlite).await? else { return Ok(()) };
    let result = scenario(&mut w).await;
    w.explain(result)
}

async fn scenario(w: &mut World) -> anyhow::Result<()> {
    let endpoint = format!("http://{}", w.broker.address(1)?);
    let db_url = w.database_url();
    let dir = w.dir.path().to_owned();
    let db = suanli_portal::db::Db::connect(&db_url).await?;
    let outbox_row = |to_hint: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query("SELECT state, attempts, last_error FROM outbox WHERE subject LIKE 'Activate%' ORDER BY created_ms")
                .fetch_all(&pool)
                .await
                .ok()
                .and_then(|rows| rows.into_iter().nth(if to_hint == "first" { 0 } else { 1 }))
        }
    };

    // 1. The relay is unreachable: the activation mail is recorded and retried, the error kept.
    let mut down = PortalOptions::new(&endpoint, PLATFORM_TOKEN, &db_url);
    down.smtp = Some("127.0.0.1:1");
    w.portal = PortalProcess::start(&dir, &down).await?;
    let api = w.client();
    let (status, body) = api.post("/api/v1/accounts", registration("researcher", "zhou_ba", "zhou.ba@example.cn")).await?;
    anyhow::ensure!(status == reqwest::StatusCode::CREATED, "{body}");
    let retried = suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let r = outbox_row("first").await?;
        (r.try_get::<i64, _>("attempts").ok()? >= 2).then_some(r)
    })
    .await?;
    assert_eq!(retried.try_get::<String, _>("state")?, "pending", "still trying");
    assert!(retried.try_get::<Option<String>, _>("last_error")?.is_some_and(|e| e.contains("SMTP") || e.contains("connect")), "the failure is recorded");

    // 2. kill -9 while it is pending; restarted with a working relay, it is delivered once.
    let placeholder = PortalProcess::start(&dir, &PortalOptions::new(&endpoint, PLATFORM_TOKEN, &format!("sqlite://{}/scratch.db", dir.display()))).await?;
    std::mem::replace(&mut w.portal, placeholder).service.kill().await?;
    w.portal = PortalProcess::start(&dir, &PortalOptions { smtp: Some(&w.smtp.address), ..PortalOptions::new(&endpoint, PLATFORM_TOKEN, &db_url) }).await?;
    let mail = w.smtp.wait_for("zhou.ba@example.cn", WAIT).await?;
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        (outbox_row("first").await?.try_get::<String, _>("state").ok()? == "sent").then_some(())
    })
    .await?;
    assert_eq!(w.smtp.messages().iter().filter(|m| m.to.iter().any(|t| t == "zhou.ba@example.cn")).count(), 1, "delivered once");
    assert!(mail.message_id.starts_with("<m"));

    // 3. A crash after the relay accepted, before the outbox marked it sent: sent again on
    //    restart, with the same Message-ID, so the recipient's mail system sees one message.
    let old = std::mem::replace(
        &mut w.portal,
        PortalProcess::start_env(
            &dir,
            &PortalOptions { smtp: Some(&w.smtp.address), ..PortalOptions::new(&endpoint, PLATFORM_TOKEN, &db_url) },
            &[("SUANLI_PORTAL_FAILPOINT", "crash-after-send")],
        )
        .await?,
    );
    old.service.kill().await?;
    let api = w.client();
    let (status, body) = api.post("/api/v1/accounts", registration("researcher", "wu_jiu", "wu.jiu@example.cn")).await?;
    anyhow::ensure!(status == reqwest::StatusCode::CREATED, "{body}");
    let first = w.smtp.wait_for("wu.jiu@example.cn", WAIT).await?;
    let crashed = std::mem::replace(
        &mut w.portal,
        PortalProcess::start(&dir, &PortalOptions { smtp: Some(&w.smtp.address), ..PortalOptions::new(&endpoint, PLATFORM_TOKEN, &db_url) }).await?,
    );
    crashed.service.wait(WAIT).await.ok();
    let again = suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        let copies: Vec<_> = w.smtp.messages().into_iter().filter(|m| m.to.iter().any(|t| t == "wu.jiu@example.cn")).collect();
        (copies.len() == 2).then(|| copies[1].clone())
    })
    .await?;
    assert_eq!(again.message_id, first.message_id, "the redelivery is the same message");
    assert_eq!(again.text, first.text);
    suanli_testkit::eventually(WAIT, Duration::from_millis(100), || async {
        (outbox_row("second").await?.try_get::<String, _>("state").ok()? == "sent").then_some(())
    })
    .await?;
    Ok(())
}
