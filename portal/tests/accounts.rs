//! Accounts end to end against real processes: a broker, aiosmtpd receiving our mail, the portal
//! on SQLite and (where `SUANLI_TEST_POSTGRES_URL` is set) on PostgreSQL.

mod support;

use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Row;
use support::{activation_token, fields, operator, registration, totp_at, totp_now, Api, Backend, World, PASSWORD};

async fn accounts(backend: Backend) -> anyhow::Result<()> {
    let Some(w) = World::start(backend).await? else { return Ok(()) };
    w.explain(scenario(&w).await)
}

async fn scenario(w: &World) -> anyhow::Result<()> {
    let api = w.client();

    // Every problem of a bad registration comes back at once, field by field.
    let mut bad = registration("researcher", "li_si", "not-an-email");
    bad["id_number"] = json!("110105194912310021");
    bad["password_confirm"] = json!("something-else-1");
    bad["agree_terms"] = json!(false);
    let (status, body) = api.post("/api/v1/accounts", bad).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(fields(&body), ["agree_terms", "email", "id_number", "password_confirm"], "{body}");
    let (status, body) = api.post("/api/v1/accounts", json!({"kind": "wizard"})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"), "{body}");

    // Register; the same username or email again is a conflict.
    let email = "li.si@example.cn";
    let (status, body) = api.post("/api/v1/accounts", registration("researcher", "li_si", email)).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = api.post("/api/v1/accounts", registration("researcher", "li_si", "other@example.cn")).await?;
    assert_eq!((status, fields(&body)), (StatusCode::CONFLICT, vec!["username".to_owned()]), "{body}");
    let (status, body) = api.post("/api/v1/accounts", registration("researcher", "li_si2", "LI.SI@example.cn")).await?;
    assert_eq!((status, fields(&body)), (StatusCode::CONFLICT, vec!["email".to_owned()]), "{body}");

    // Not activated yet: no login.
    let (status, body) = api.post("/api/v1/session", json!({"login": "li_si", "password": PASSWORD})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::FORBIDDEN, "ACCOUNT_NOT_ACTIVATED"), "{body}");

    // The activation mail went through real SMTP, with a stable Message-ID.
    let mail = w.smtp.wait_for(email, Duration::from_secs(20)).await?;
    assert_eq!(mail.subject, "Activate your Suanli account");
    assert!(mail.message_id.starts_with("<m") && mail.message_id.ends_with("@suanli.local>"), "{}", mail.message_id);
    let token = activation_token(&mail.text)?;
    let (status, body) = api.post("/api/v1/activation", json!({ "token": token })).await?;
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("active")), "{body}");
    let (status, body) = api.post("/api/v1/activation", json!({ "token": token })).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::BAD_REQUEST, "TOKEN_INVALID"), "a link works once: {body}");

    // The session cookie has every protective attribute.
    let raw = reqwest::Client::new().post(format!("{}/api/v1/session", w.portal.url)).json(&json!({"login": email, "password": PASSWORD})).send().await?;
    let cookie = raw.headers().get("set-cookie").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    for attr in ["__Host-suanli=", "HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(cookie.contains(attr), "{attr} missing from {cookie}");
    }

    let first = api.login("li_si", PASSWORD).await?;
    let second = Api::new(&w.portal.url);
    let again = second.login("li_si", PASSWORD).await?;
    assert_ne!(first["csrf_token"], again["csrf_token"], "every login is a new session");
    let (status, me) = api.get("/api/v1/me").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((me["email"].as_str(), me["real_name"].as_str(), me["kind"].as_str()), (Some(email), Some("张三"), Some("researcher")));
    assert!(me["market_account"].as_str().is_some_and(|a| a.starts_with("acc-")), "a broker account was opened: {me}");

    // A write without the CSRF token is refused even with a valid cookie.
    let no_csrf = Api { http: api.http.clone(), base: api.base.clone(), csrf: Default::default(), bearer: None };
    let (status, body) = no_csrf.send(reqwest::Method::PATCH, "/api/v1/me", Some(json!({"lang": "zh"}))).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::FORBIDDEN, "CSRF_FAILED"), "{body}");
    let (status, body) = api.send(reqwest::Method::PATCH, "/api/v1/me", Some(json!({"lang": "zh", "phone": "123"}))).await?;
    assert_eq!((status, fields(&body)), (StatusCode::BAD_REQUEST, vec!["phone".to_owned()]), "nothing changes on a bad field: {body}");
    let (status, body) = api.send(reqwest::Method::PATCH, "/api/v1/me", Some(json!({"lang": "zh"}))).await?;
    assert_eq!((status, body["lang"].as_str()), (StatusCode::OK, Some("zh")), "{body}");

    // Personal data is not in the database in the clear; the ID number not at all.
    let db = suanli_portal::db::Db::connect(&w.database_url()).await?;
    let row = sqlx::query("SELECT email_enc, real_name_enc, id_number_hash, profile_enc FROM users WHERE username = 'li_si'").fetch_one(&db.pool).await?;
    let stored: Vec<String> =
        ["email_enc", "real_name_enc", "id_number_hash", "profile_enc"].iter().map(|c| row.try_get::<String, _>(*c).unwrap_or_default()).collect();
    let id_number = registration("researcher", "li_si", email)["id_number"].as_str().unwrap_or_default().to_owned();
    for s in &stored {
        assert!(!s.contains("li.si") && !s.contains("张三") && !s.contains(&id_number), "plaintext at rest: {s}");
    }

    // Refresh: a new token; the old cookie is dead.
    let old_cookie_jar = Api::new(&w.portal.url);
    old_cookie_jar.login("li_si", PASSWORD).await?;
    let (status, _) = old_cookie_jar.post("/api/v1/session/refresh", json!({})).await?;
    assert_eq!(status, StatusCode::OK);
    // Logout ends the session.
    let (status, _) = api.send(reqwest::Method::DELETE, "/api/v1/session", None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api.get("/api/v1/me").await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Throttling: five wrong passwords lock the login, even for the right password.
    let victim = w.person("researcher", "wang_wu").await?;
    drop(victim);
    for _ in 0..5 {
        let (status, _) = api.post("/api/v1/session", json!({"login": "wang_wu", "password": "wrong-password-1"})).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = api.post("/api/v1/session", json!({"login": "wang_wu", "password": PASSWORD})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_ATTEMPTS"), "{body}");

    // Password reset by mail; the old password stops working and sessions end.
    let (status, _) = api.post("/api/v1/password-reset", json!({"email": "nobody@example.cn"})).await?;
    assert_eq!(status, StatusCode::ACCEPTED, "the same answer for unknown addresses");
    let (status, _) = api.post("/api/v1/password-reset", json!({"email": email})).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    // In the language the user chose above.
    let reset = support_wait_subject(w, email, "重置您的算力平台密码").await?;
    let new_password = "new-horse-battery-7";
    let (status, body) = api
        .post("/api/v1/password-reset/confirm", json!({"token": activation_token(&reset.text)?, "password": new_password, "password_confirm": new_password}))
        .await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _) = second.get("/api/v1/me").await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a reset ends every session");
    let (status, _) = api.post("/api/v1/session", json!({"login": "li_si", "password": PASSWORD})).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    api.login("li_si", new_password).await?;

    // API tokens: bearer, no CSRF needed, revocable.
    let (status, tok) = api.post("/api/v1/me/api-tokens", json!({"name": "ci"})).await?;
    assert_eq!(status, StatusCode::CREATED, "{tok}");
    let script = Api::with_bearer(&w.portal.url, tok["token"].as_str().unwrap_or_default());
    let (status, me) = script.get("/api/v1/me").await?;
    assert_eq!((status, me["username"].as_str()), (StatusCode::OK, Some("li_si")));
    let (status, _) = script
        .post("/api/v1/me/ssh-keys", json!({"public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test"}))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "a script writes without a CSRF token");
    let (status, body) = script.post("/api/v1/me/ssh-keys", json!({"public_key": "ssh-ed25519 nope"})).await?;
    assert_eq!((status, fields(&body)), (StatusCode::BAD_REQUEST, vec!["public_key".to_owned()]), "{body}");
    let (status, _) = api.send(reqwest::Method::DELETE, &format!("/api/v1/me/api-tokens/{}", tok["id"].as_str().unwrap_or_default()), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = script.get("/api/v1/me").await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Optional second factor for a researcher.
    let (status, setup) = api.post("/api/v1/me/totp", json!({})).await?;
    assert_eq!(status, StatusCode::OK, "{setup}");
    let secret = setup["secret"].as_str().unwrap_or_default().to_owned();
    let (status, _) = api.post("/api/v1/me/totp/confirm", json!({"code": totp_now(&secret)})).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let fresh = Api::new(&w.portal.url);
    let (status, body) = fresh.post("/api/v1/session", json!({"login": "li_si", "password": new_password})).await?;
    assert_eq!((status, body["mfa_required"].as_bool()), (StatusCode::OK, Some(true)), "{body}");
    // The code that confirmed the factor is spent: the same one cannot log in (no replay).
    let (status, body) = fresh.post("/api/v1/session", json!({"login": "li_si", "password": new_password, "totp_code": totp_now(&secret)})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::UNAUTHORIZED, "MFA_INVALID"), "{body}");
    let next = totp_at(&secret, 1);
    let (status, body) = fresh.post("/api/v1/session", json!({"login": "li_si", "password": new_password, "totp_code": next})).await?;
    assert_eq!((status, body["mfa_required"].as_bool()), (StatusCode::OK, Some(false)), "{body}");
    let (status, _) = Api::new(&w.portal.url).post("/api/v1/session", json!({"login": "li_si", "password": new_password, "totp_code": next})).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a used code is refused on another session too");

    // An organisation: licence required, then an operator's review.
    let mut org = registration("researcher", "pcl_lab", "lab@pcl.ac.cn");
    org["user_type"] = json!("institute");
    org.as_object_mut().map(|o| o.remove("id_number"));
    let (status, body) = api.post("/api/v1/accounts", org.clone()).await?;
    assert_eq!(
        (status, fields(&body)),
        (StatusCode::BAD_REQUEST, vec!["credit_code".to_owned(), "licence_base64".to_owned(), "org_name".to_owned()]),
        "{body}"
    );
    org["org_name"] = json!("鹏城实验室");
    org["credit_code"] = json!("91350100M000100Y43");
    org["licence_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(b"%PDF-1.4\n% licence scan\n"));
    org["licence_filename"] = json!("licence.pdf");
    let (status, body) = api.post("/api/v1/accounts", org).await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mail = w.smtp.wait_for("lab@pcl.ac.cn", Duration::from_secs(20)).await?;
    let (_, body) = api.post("/api/v1/activation", json!({"token": activation_token(&mail.text)?})).await?;
    assert_eq!(body["state"], "pending_review");
    let (status, body) = api.post("/api/v1/session", json!({"login": "pcl_lab", "password": PASSWORD})).await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::FORBIDDEN, "ACCOUNT_PENDING_REVIEW"));

    let (op, _) = operator(w, &w.database_url(), "ops_zhao", "operator").await?;
    let (status, reviews) = op.get("/api/v1/operator/reviews").await?;
    assert_eq!(status, StatusCode::OK, "{reviews}");
    let item = reviews.as_array().into_iter().flatten().find(|r| r["username"] == "pcl_lab").cloned().unwrap_or(Value::Null);
    assert_eq!((item["org_name"].as_str(), item["licence_content_type"].as_str()), (Some("鹏城实验室"), Some("application/pdf")), "{reviews}");
    let (status, body) = op.post(&format!("/api/v1/operator/reviews/{}", item["user_id"].as_str().unwrap_or_default()), json!({"approve": true})).await?;
    assert_eq!((status, body["state"].as_str()), (StatusCode::OK, Some("active")), "{body}");
    Api::new(&w.portal.url).login("pcl_lab", PASSWORD).await?;

    // RBAC: researchers see no operator module; an operator without the auditor role sees no log.
    let (status, _) = api.get("/api/v1/operator/reviews").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = op.get("/api/v1/operator/audit").await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (admin, _) = operator(w, &w.database_url(), "admin_qian", "system_administrator").await?;
    let (status, users) = admin.get("/api/v1/operator/users").await?;
    assert_eq!(status, StatusCode::OK);
    let op_id = users.as_array().into_iter().flatten().find(|u| u["username"] == "ops_zhao").and_then(|u| u["user_id"].as_str()).unwrap_or_default().to_owned();
    let (status, body) = admin
        .send(reqwest::Method::PUT, &format!("/api/v1/operator/users/{op_id}/roles"), Some(json!({"roles": ["operator", "system_administrator"]})))
        .await?;
    assert_eq!((status, Api::code(&body)), (StatusCode::FORBIDDEN, "ROLE_CONFLICT"), "{body}");
    let (status, _) =
        admin.send(reqwest::Method::PUT, &format!("/api/v1/operator/users/{op_id}/roles"), Some(json!({"roles": ["operator", "monitor"]}))).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let binary = suanli_testkit::workspace_binary("suanli-portal", "suanli-portal")?;
    let refused = tokio::process::Command::new(binary)
        .args(["--database-url", &w.database_url(), "--key-file"])
        .arg(w.dir.path().join("portal-keys.toml"))
        .args(["create-operator", "--username", "both", "--email", "both@suanli.test", "--roles", "auditor,dispatcher"])
        .output()
        .await?;
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("ROLE_CONFLICT"));

    // The auditor finds who did what.
    let (auditor, _) = operator(w, &w.database_url(), "audit_sun", "auditor").await?;
    let (status, log) = auditor.get("/api/v1/operator/audit?action=reviews&limit=50").await?;
    assert_eq!(status, StatusCode::OK, "{log}");
    let approval = log.as_array().into_iter().flatten().find(|e| e["action"] == "POST /api/v1/operator/reviews/{user_id}").cloned().unwrap_or(Value::Null);
    assert_eq!((approval["actor"].as_str(), approval["outcome"].as_str()), (Some("ops_zhao"), Some("ok")), "{log}");
    let (_, refusals) = auditor.get("/api/v1/operator/audit?actor=admin_qian").await?;
    assert!(refusals.as_array().into_iter().flatten().any(|e| e["outcome"] == "refused 403"), "refused actions are audited too: {refusals}");

    // Deregistration erases personal data and leaves no live lease.
    let (status, body) = api.send(reqwest::Method::DELETE, "/api/v1/me", Some(json!({"password": "wrong-password-9"}))).await?;
    assert_eq!((status, fields(&body)), (StatusCode::BAD_REQUEST, vec!["password".to_owned()]));
    let (status, _) = api.send(reqwest::Method::DELETE, "/api/v1/me", Some(json!({"password": new_password}))).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = Api::new(&w.portal.url).post("/api/v1/session", json!({"login": "li_si", "password": new_password})).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let row = sqlx::query("SELECT username, email_enc, real_name_enc, state FROM users WHERE email_hash LIKE 'closed-%'").fetch_one(&db.pool).await?;
    assert_eq!(row.try_get::<String, _>("state")?, "deregistered");
    assert_eq!(row.try_get::<String, _>("email_enc")?, "");
    assert_eq!(row.try_get::<Option<String>, _>("real_name_enc")?, None);
    Ok(())
}

async fn support_wait_subject(w: &World, to: &str, subject: &str) -> anyhow::Result<suanli_testkit::smtp::Mail> {
    suanli_testkit::eventually(Duration::from_secs(20), Duration::from_millis(50), || async {
        w.smtp.messages().into_iter().find(|m| m.to.iter().any(|t| t == to) && m.subject == subject)
    })
    .await
}

#[tokio::test]
async fn accounts_on_sqlite() -> anyhow::Result<()> {
    accounts(Backend::Sqlite).await
}

#[tokio::test]
async fn accounts_on_postgres() -> anyhow::Result<()> {
    accounts(Backend::Postgres).await
}
