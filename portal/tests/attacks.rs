//! A dishonest user against a real portal process (SQLite; the PostgreSQL runs of the long
//! scenarios cover the database), one named test per weakness: refused, and nothing changed.

mod support;

use reqwest::StatusCode;
use serde_json::json;
use support::{totp_at, Api, Backend, World, PASSWORD};

async fn world() -> World {
    World::start(Backend::Sqlite).await.expect("portal").expect("SQLite always runs")
}

#[tokio::test]
async fn a_right_password_never_resets_the_count_of_wrong_second_factor_codes() {
    let w = world().await;
    let api = w.person("researcher", "zhao_liu").await.expect("person");
    let (status, setup) = api.post("/api/v1/me/totp", json!({})).await.expect("totp");
    assert_eq!(status, StatusCode::OK, "{setup}");
    let secret = setup["secret"].as_str().unwrap_or_default().to_owned();
    let (status, _) = api.post("/api/v1/me/totp/confirm", json!({"code": totp_at(&secret, 0)})).await.expect("confirm");
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The thief knows the password and guesses codes, each guess with the right password.
    let thief = w.client();
    for guess in ["000000", "111111", "222222", "333333", "444444"] {
        let (status, body) = thief.post("/api/v1/session", json!({"login": "zhao_liu", "password": PASSWORD, "totp_code": guess})).await.expect("login");
        assert_eq!((status, Api::code(&body)), (StatusCode::UNAUTHORIZED, "MFA_INVALID"), "{body}");
    }
    // Even the right code is refused now, on either path, until the window passes.
    let right = totp_at(&secret, 1);
    let (status, body) = thief.post("/api/v1/session", json!({"login": "zhao_liu", "password": PASSWORD, "totp_code": right})).await.expect("login");
    assert_eq!((status, Api::code(&body)), (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_ATTEMPTS"), "{body}");
    let (status, body) = thief.post("/api/v1/session", json!({"login": "zhao_liu", "password": PASSWORD})).await.expect("login");
    assert_eq!((status, body["mfa_required"].as_bool()), (StatusCode::OK, Some(true)), "{body}");
    let (status, body) = thief.post("/api/v1/session/totp", json!({"code": right})).await.expect("totp");
    assert_eq!((status, Api::code(&body)), (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_ATTEMPTS"), "{body}");
}

#[tokio::test]
async fn a_webhook_to_loopback_private_or_link_local_addresses_is_refused_and_nothing_saved() {
    let w = world().await;
    let api = w.person("researcher", "qian_qi").await.expect("person");
    let (_, before) = api.get("/api/v1/me/notifications").await.expect("settings");
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:8080/api/v1/me",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::1]:22/",
        "http://[::ffff:192.168.1.1]/",
    ] {
        let settings = json!({"email": true, "sms": false, "webhook_url": url, "webhook_secret": "a-secret-of-16-chars", "quiet_hours": ""});
        let (status, body) = api.send(reqwest::Method::PUT, "/api/v1/me/notifications", Some(settings)).await.expect("put");
        assert_eq!((status, support::fields(&body)), (StatusCode::BAD_REQUEST, vec!["webhook_url".to_owned()]), "{url}: {body}");
    }
    let (_, after) = api.get("/api/v1/me/notifications").await.expect("settings");
    assert_eq!(after, before, "nothing was saved");
}

#[tokio::test]
async fn api_tokens_expire_end_with_a_new_password_and_make_no_tokens() {
    let w = world().await;
    let api = w.person("researcher", "sun_ba").await.expect("person");
    let (status, body) = api.post("/api/v1/me/api-tokens", json!({"name": "forever", "expires_in_days": 100_000})).await.expect("create");
    assert_eq!((status, support::fields(&body)), (StatusCode::BAD_REQUEST, vec!["expires_in_days".to_owned()]), "{body}");
    let (status, made) = api.post("/api/v1/me/api-tokens", json!({"name": "ci", "expires_in_days": 30})).await.expect("create");
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let script = Api::with_bearer(&w.portal.url, made["token"].as_str().unwrap_or_default());
    assert_eq!(script.get("/api/v1/me").await.expect("me").0, StatusCode::OK);
    // A token cannot mint another (a stolen token would otherwise outlive its own expiry).
    let (status, body) = script.post("/api/v1/me/api-tokens", json!({"name": "child"})).await.expect("create");
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (_, listed) = api.get("/api/v1/me/api-tokens").await.expect("list");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    // Past its expiry the token opens nothing.
    let db = suanli_portal::db::Db::connect(&w.database_url()).await.expect("db");
    sqlx::query("UPDATE api_tokens SET expires_ms = 1").execute(&db.pool).await.expect("expire");
    let (status, body) = script.get("/api/v1/me").await.expect("me");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    // A fresh one ends when the password changes.
    let (_, made) = api.post("/api/v1/me/api-tokens", json!({"name": "ci-2"})).await.expect("create");
    let script = Api::with_bearer(&w.portal.url, made["token"].as_str().unwrap_or_default());
    assert_eq!(script.get("/api/v1/me").await.expect("me").0, StatusCode::OK);
    let new_password = "another-horse-77";
    let change = json!({"current_password": PASSWORD, "new_password": new_password});
    let (status, body) = api.send(reqwest::Method::PATCH, "/api/v1/me", Some(change)).await.expect("change");
    assert!(status.is_success(), "{status} {body}");
    assert_eq!(script.get("/api/v1/me").await.expect("me").0, StatusCode::UNAUTHORIZED, "a new password ends every token");
}

#[tokio::test]
async fn with_a_second_factor_on_an_api_token_needs_the_code() {
    let w = world().await;
    let api = w.person("researcher", "zhou_jiu").await.expect("person");
    let (_, setup) = api.post("/api/v1/me/totp", json!({})).await.expect("totp");
    let secret = setup["secret"].as_str().unwrap_or_default().to_owned();
    let (status, _) = api.post("/api/v1/me/totp/confirm", json!({"code": totp_at(&secret, 0)})).await.expect("confirm");
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = api.post("/api/v1/me/api-tokens", json!({"name": "ci"})).await.expect("create");
    assert_eq!((status, support::fields(&body)), (StatusCode::BAD_REQUEST, vec!["totp_code".to_owned()]), "{body}");
    let (status, body) = api.post("/api/v1/me/api-tokens", json!({"name": "ci", "totp_code": "123456"})).await.expect("create");
    assert_eq!((status, Api::code(&body)), (StatusCode::UNAUTHORIZED, "MFA_INVALID"), "{body}");
    let (_, listed) = api.get("/api/v1/me/api-tokens").await.expect("list");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "no token was made: {listed}");
    let (status, body) = api.post("/api/v1/me/api-tokens", json!({"name": "ci", "totp_code": totp_at(&secret, 1)})).await.expect("create");
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn a_wrong_key_file_path_never_makes_new_keys_for_an_existing_database() {
    let w = world().await;
    w.person("researcher", "wu_shi").await.expect("person");
    let wrong = w.dir.path().join("typo-keys.toml");
    let binary = suanli_testkit::workspace_binary("suanli-portal", "suanli-portal").expect("portal binary");
    let out = tokio::process::Command::new(binary)
        .args(["--database-url", &w.database_url(), "--key-file"])
        .arg(&wrong)
        .args(["create-operator", "--username", "op", "--email", "op@suanli.test", "--roles", "monitor"])
        .output()
        .await
        .expect("run");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {said}");
    assert!(said.contains("does not exist") && said.contains("--key-file"), "{said}");
    assert!(!wrong.exists(), "no new key file was made");
}

#[tokio::test]
async fn an_activation_that_fails_on_the_way_can_be_retried_with_the_same_link() {
    let mut w = world().await;
    let api = w.client();
    let email = "zheng_shiyi@example.cn";
    let (status, body) = api.post("/api/v1/accounts", support::registration("researcher", "zheng_shiyi", email)).await.expect("register");
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mail = w.smtp.wait_for(email, std::time::Duration::from_secs(20)).await.expect("mail");
    let token = support::activation_token(&mail.text).expect("token");
    // The broker is down while the link is followed: no account can be opened.
    w.broker.kill(1).await.expect("kill the broker");
    let (status, body) = api.post("/api/v1/activation", json!({ "token": token })).await.expect("activate");
    assert!(!status.is_success(), "{status} {body}");
    // Back up: the same link still works, once.
    w.broker.restart(1).await.expect("restart the broker");
    let activated = suanli_testkit::eventually(std::time::Duration::from_secs(30), std::time::Duration::from_millis(200), || {
        let api = &api;
        let token = token.clone();
        async move {
            let (status, body) = api.post("/api/v1/activation", json!({ "token": token })).await.ok()?;
            (status == StatusCode::OK).then_some(body)
        }
    })
    .await
    .expect("the link works once the broker is back");
    assert_eq!(activated["state"], "active", "{activated}");
    api.login("zheng_shiyi", PASSWORD).await.expect("the account logs in");
    let (status, spend) = api.get("/api/v1/me/spend").await.expect("spend");
    assert_eq!(status, StatusCode::OK, "the account has its market account: {spend}");
    let (status, body) = w.client().post("/api/v1/activation", json!({ "token": token })).await.expect("again");
    assert_eq!((status, Api::code(&body)), (StatusCode::BAD_REQUEST, "TOKEN_INVALID"), "spent once it worked: {body}");
}

#[tokio::test]
async fn a_clusters_telemetry_is_only_for_those_the_broker_lets_watch_it() {
    let w = world().await;
    let mut platform = w.platform().await.expect("platform");
    let (_, supplier_token) = suanli_testkit::fixtures::register(&mut platform, suanli_proto::v1::AccountKind::Supplier, "watched").await.expect("supplier");
    let mut supplier = w.broker.client(1, &supplier_token).await.expect("client");
    let cluster = suanli_testkit::fixtures::publish(&mut supplier, suanli_types::ClusterClass::B, 1, 2, "watched").await.expect("publish").cluster_id;
    let path = format!("/api/v1/clusters/{cluster}/telemetry?minutes=5");
    // Anyone may see the listing; the portal knows the cluster before anyone asks.
    suanli_testkit::eventually(std::time::Duration::from_secs(20), std::time::Duration::from_millis(100), || async {
        let (status, _) = w.client().get(&format!("/api/v1/clusters/{cluster}")).await.ok()?;
        (status == StatusCode::OK).then_some(())
    })
    .await
    .expect("the cluster is listed");
    let (status, body) = w.client().get(&path).await.expect("anonymous");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "anonymous visitors watch nothing: {body}");
    let (status, body) = w.client().get(&format!("/api/v1/clusters/{cluster}/live")).await.expect("anonymous live");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "nor live: {body}");
    // A researcher without a lease on it is refused by the broker's own rule.
    let stranger = w.person("researcher", "feng_ershi").await.expect("person");
    let (status, body) = stranger.get(&path).await.expect("stranger");
    assert!(status == StatusCode::NOT_FOUND || status == StatusCode::FORBIDDEN, "{status} {body}");
}

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl stolen-laptop";

#[tokio::test]
async fn a_removed_ssh_key_is_withdrawn_from_the_market_too() {
    let w = world().await;
    let api = w.person("researcher", "chu_ershier").await.expect("person");
    let (status, added) = api.post("/api/v1/me/ssh-keys", json!({"public_key": KEY})).await.expect("add");
    assert_eq!(status, StatusCode::CREATED, "{added}");
    // Another user cannot remove it.
    let other = w.person("researcher", "wei_ershisan").await.expect("person");
    let path = format!("/api/v1/me/ssh-keys/{}", added["id"].as_str().unwrap_or_default());
    let (status, _) = other.send(reqwest::Method::DELETE, &path, None).await.expect("delete");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api.send(reqwest::Method::DELETE, &path, None).await.expect("delete");
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, listed) = api.get("/api/v1/me/ssh-keys").await.expect("list");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    // The broker no longer holds it: adding the same key again is no duplicate there.
    let (status, body) = api.post("/api/v1/me/ssh-keys", json!({"public_key": KEY})).await.expect("add again");
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

#[tokio::test]
async fn a_deregistered_accounts_market_token_stops_working() {
    let w = world().await;
    let api = w.person("researcher", "jiang_ershisi").await.expect("person");
    // The portal holds the account's broker token sealed; read it as an attacker with the
    // database and the key file would.
    let db = suanli_portal::db::Db::connect(&w.database_url()).await.expect("db");
    let row = sqlx::query("SELECT broker_token_enc FROM users WHERE username = 'jiang_ershisi'").fetch_one(&db.pool).await.expect("row");
    let sealed: String = sqlx::Row::try_get(&row, "broker_token_enc").expect("sealed");
    let keys = suanli_portal::crypto::KeyFile::load(&w.dir.path().join("portal-keys.toml")).expect("keys").expect("key file");
    let token = keys.ring().expect("ring").open(&sealed).expect("open");
    let mut market = w.broker.client(1, &token).await.expect("client");
    market.list_leases(suanli_proto::v1::ListLeasesRequest { live_only: false, ..Default::default() }).await.expect("the token works while the account lives");
    let (status, body) = api.send(reqwest::Method::DELETE, "/api/v1/me", Some(json!({"password": PASSWORD}))).await.expect("deregister");
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let refused = market.list_leases(suanli_proto::v1::ListLeasesRequest { live_only: false, ..Default::default() }).await.expect_err("revoked");
    assert_eq!(suanli_proto::decode_status(&refused).code, suanli_types::ErrorCode::Unauthenticated);
}
