//! Services on leased cards through the portal (issue 23), against a running marketplace whose
//! agents keep a tunnel to the portal: a classifier the marketplace trained is deployed as a
//! demo on the researcher's lease, run by the agent as the lease's account and reached only
//! through the portal's proxy on an origin of its own. Needs root (lease accounts),
//! `SUANLI_JOB_BINARY` and `SUANLI_CV_DATA` (.ci/run sets both).
//!
//! - the demo answers as `suanli-job infer` does, on its page (in Chromium) and its JSON API;
//! - a private demo is its owner's alone (another user, no one, a used grant: refused, and the
//!   owner's portal cookie never reaches the service); with the link anyone, at the rate its
//!   owner set;
//! - its process killed, it is started again and the log says so; an update to another version
//!   under a steady stream of requests fails none; the lease's end stops it, and its URL
//!   answers 410 for good.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_testkit::eventually;
use support::services::{session, signed_in, stage, stage_with, Stage};
use support::{signed_in_browser, WAIT};

#[tokio::test]
async fn a_private_demo_answers_as_suanli_job_infer_does_for_its_owner_alone() {
    let Some(stage) = stage(true).await else { return };
    let view = stage.deploy("private").await;
    let (id, url) = (view["service_id"].as_u64().expect("id"), view["url"].as_str().expect("url").to_owned());
    assert!(url.starts_with("http://") && url.contains(".localhost:"), "an origin of its own: {url}");
    let (image_path, image) = stage.seven();
    let expected = stage.infer(&image_path).await;
    let predict = format!("{url}v1/predict");

    // The owner's API token reaches the JSON API, which answers as `suanli-job infer` does.
    let owner_api = stage.client_for(&url);
    let answer = owner_api.post(&predict).bearer_auth(&stage.token).body(image.clone()).send().await.expect("predict");
    assert_eq!(answer.status(), StatusCode::OK);
    let answer: Value = answer.json().await.expect("json");
    assert_eq!(answer["result"]["class"], expected["class"], "{answer} vs {expected}");
    assert_eq!(answer["result"]["top"], expected["top"], "{answer} vs {expected}");

    // Nobody else: no credential, another user's token, a forged cookie.
    let anonymous = stage.client_for(&url);
    for (who, request) in [
        ("no one", anonymous.post(&predict).body(image.clone())),
        ("a forged cookie", anonymous.post(&predict).header("cookie", "suanli-service=v1.k.AAAA").body(image.clone())),
    ] {
        let status = request.send().await.expect("answer").status();
        assert_eq!(status, StatusCode::FORBIDDEN, "{who}");
    }
    // Nor a page of another origin riding the owner's credentials (another service's, on the
    // same site): a browser names it in `Origin`.
    let elsewhere = owner_api.post(&predict).bearer_auth(&stage.token).header("origin", format!("http://other.localhost:{}", stage.port)).body(image.clone());
    assert_eq!(elsewhere.send().await.expect("answer").status(), StatusCode::FORBIDDEN, "another origin");
    let (supplier, csrf) = signed_in(&stage, &url, "demo-supplier").await;
    let theirs: Value = supplier
        .post(format!("{}/api/v1/me/api-tokens", stage.portal.url))
        .header("x-csrf-token", csrf)
        .json(&json!({"name": "theirs", "expires_in_days": 1}))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let theirs = theirs["token"].as_str().expect("another user's token");
    let with_theirs = anonymous.post(&predict).bearer_auth(theirs).body(image.clone()).send().await.expect("answer").status();
    assert_eq!(with_theirs, StatusCode::FORBIDDEN, "another user's API token");
    let refused = supplier.get(format!("{}/services/{id}/open", stage.portal.url)).send().await.expect("open");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN, "a supplier opens no researcher's service");
    assert_eq!(supplier.get(&url).send().await.expect("page").status(), StatusCode::FORBIDDEN);

    // The owner's browser: the portal hands the origin a one-use grant, which becomes its cookie.
    let owner = session(&stage, &url, "demo-researcher").await;
    let opened = owner.get(format!("{}/services/{id}/open", stage.portal.url)).send().await.expect("open");
    assert_eq!(opened.status(), StatusCode::OK, "the demo page, after the grant's redirects");
    assert_eq!(opened.url().as_str(), url, "on the service's origin");
    let page = opened.text().await.expect("page");
    assert!(page.contains("digits-cls") && page.contains("/.suanli/demo.js"), "{page}");
    let via_cookie: Value = owner.post(&predict).body(image.clone()).send().await.expect("predict").json().await.expect("json");
    assert_eq!(via_cookie["result"]["class"], expected["class"]);
    // In Chromium: the owner finds the demo on the lease's page, opens it (on its own origin),
    // chooses the picture and sees the class `suanli-job infer` gave.
    let browser = signed_in_browser(&stage.portal.url).await;
    browser.goto(&format!("{}/leases/{}", stage.portal.url, stage.w.leases[0])).await.expect("lease page");
    let row = format!("table.services tr[data-service='{id}'][data-state='running']");
    browser.wait_for(&row, WAIT).await.expect("the demo on its lease's page");
    browser.goto(&format!("{}/services/{id}/open", stage.portal.url)).await.expect("open");
    let at = browser.wait_url(".localhost:", WAIT).await.expect("on the demo's origin");
    assert!(at.starts_with(&url), "{at}");
    browser.type_into("#image", &image_path.display().to_string()).await.expect("choose the picture");
    browser.wait_for("#result[data-done] li", Duration::from_secs(30)).await.expect("the classes shown");
    let shown = browser.execute("return document.getElementById('result').dataset.class", json!([])).await.expect("class");
    assert_eq!(shown, expected["class"], "the page shows what infer says");
    let first = browser.execute("return document.querySelector('#result li').dataset.class", json!([])).await.expect("first");
    assert_eq!(first, expected["top"][0][0]);

    // The grant is good once: its link used again is refused.
    let by_hand = stage.client_for_without_redirects(&url);
    let answer = by_hand
        .post(format!("{}/api/v1/session", stage.portal.url))
        .json(&json!({"login": "demo-researcher", "password": suanli_portal::demo::DEMO_PASSWORD}))
        .send()
        .await
        .expect("sign in");
    assert!(answer.status().is_success());
    let csrf = answer.json::<Value>().await.expect("json")["csrf_token"].as_str().expect("csrf").to_owned();
    let to = by_hand.get(format!("{}/services/{id}/open", stage.portal.url)).send().await.expect("open");
    assert_eq!(to.status(), StatusCode::SEE_OTHER);
    let login = to.headers()["location"].to_str().expect("location").to_owned();
    assert!(login.starts_with(&format!("{url}.suanli/login?grant=")), "{login}");
    assert_eq!(by_hand.get(&login).send().await.expect("use").status(), StatusCode::SEE_OTHER, "its first use");
    assert_eq!(stage.client_for(&url).get(&login).send().await.expect("replay").status(), StatusCode::FORBIDDEN, "used again");
    // The visit lasts as long as the portal session it came from: signed out, it ends too.
    assert_eq!(by_hand.post(&predict).body(image.clone()).send().await.expect("predict").status(), StatusCode::OK, "the visit's cookie");
    let out = by_hand.delete(format!("{}/api/v1/session", stage.portal.url)).header("x-csrf-token", &csrf).send().await.expect("sign out");
    assert_eq!(out.status(), StatusCode::NO_CONTENT);
    let ended = eventually(WAIT, Duration::from_millis(200), || {
        let (by_hand, predict, image) = (by_hand.clone(), predict.clone(), image.clone());
        async move { (by_hand.post(&predict).body(image).send().await.ok()?.status() == StatusCode::FORBIDDEN).then_some(()) }
    })
    .await;
    assert!(ended.is_ok(), "a visit ends with the session it came from");

    // Anyone with the link, once its owner says so, at the rate its owner sets.
    let (status, _) = stage.api("PATCH", &format!("/api/v1/services/{id}"), Some(json!({"visibility": "link", "rate_per_minute": 8}))).await;
    assert_eq!(status, StatusCode::OK);
    let first = eventually(WAIT, Duration::from_millis(200), || {
        let (anonymous, predict, image) = (anonymous.clone(), predict.clone(), image.clone());
        async move { (anonymous.post(&predict).body(image).send().await.ok()?.status() == StatusCode::OK).then_some(()) }
    })
    .await;
    assert!(first.is_ok(), "with the link, anyone");
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(anonymous.post(&predict).body(image.clone()).send().await.expect("answer").status());
    }
    assert!(statuses.contains(&StatusCode::TOO_MANY_REQUESTS), "eight a minute, two at once: {statuses:?}");
    let owner_still = owner.post(&predict).body(image.clone()).send().await.expect("predict").status();
    assert_eq!(owner_still, StatusCode::OK, "the owner is not held to visitors' rate");

    // Metering: the requests are counted.
    let counted = eventually(WAIT, Duration::from_millis(300), || async {
        let (_, view) = stage.api("GET", &format!("/api/v1/services/{id}"), None).await;
        (view["requests"].as_i64().unwrap_or(0) >= 4).then_some(view)
    })
    .await;
    assert!(counted.is_ok(), "requests counted: {counted:?}");

    // Scaled to the lease's two cards: two processes, one card each, both answering.
    let scaled = stage.create(json!({"lease_id": stage.w.leases[0], "model": "digits-cls", "version": 1, "replicas": 2})).await;
    let scaled_id = scaled["service_id"].as_u64().expect("id");
    let both = eventually(WAIT, Duration::from_millis(300), || async {
        let (_, view) = stage.api("GET", &format!("/api/v1/services/{scaled_id}"), None).await;
        (view["live"]["ready_replicas"] == 2).then_some(view)
    })
    .await;
    assert!(both.is_ok(), "both replicas answer: {both:?}\n{}", log_of(&stage, scaled_id).await);
    let pids = started_pids(&log_of(&stage, scaled_id).await);
    let cards: std::collections::BTreeSet<String> = pids
        .iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok())
        .filter_map(|environ| {
            environ.split(|b| *b == 0).find_map(|var| var.strip_prefix(b"CUDA_VISIBLE_DEVICES=").map(|v| String::from_utf8_lossy(v).into_owned()))
        })
        .collect();
    assert_eq!(cards, ["0", "1"].map(String::from).into(), "one card each: {pids:?}");
    let scaled_predict = format!("{}v1/predict", scaled["url"].as_str().expect("url"));
    for _ in 0..4 {
        let answer = stage.client_for(&scaled_predict).post(&scaled_predict).bearer_auth(&stage.token).body(image.clone()).send().await.expect("predict");
        assert_eq!(answer.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_demo_is_restarted_when_killed_updated_without_a_failed_request_and_gone_with_its_lease() {
    let Some(stage) = stage(true).await else { return };
    let view = stage.deploy("link").await;
    let (id, url) = (view["service_id"].as_u64().expect("id"), view["url"].as_str().expect("url").to_owned());
    let predict = format!("{url}v1/predict");
    let (_, image) = stage.seven();
    let http = stage.client_for(&url);

    // Its process killed: started again, and the log says how it ended.
    let text = log_of(&stage, id).await;
    let pid = *started_pids(&text).last().expect("a pid in the log");
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    let restarted = eventually(Duration::from_secs(180), Duration::from_millis(300), || async {
        let (_, view) = stage.api("GET", &format!("/api/v1/services/{id}"), None).await;
        (view["live"]["restarts"].as_u64().unwrap_or(0) >= 1 && view["live"]["state"] == "ready").then_some(view)
    })
    .await
    .unwrap_or_else(|e| panic!("restarted: {e}\n{}", stage.logs()));
    assert_eq!(restarted["live"]["last_exit"], "signal 9");
    let text = log_of(&stage, id).await;
    assert!(text.contains("ended (signal 9): starting again"), "{text}");
    assert_eq!(http.post(&predict).body(image.clone()).send().await.expect("predict").status(), StatusCode::OK);

    // An update to version 2 under a steady stream of requests: none fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = {
        let (http, predict, image, stop, token) = (http.clone(), predict.clone(), image.clone(), stop.clone(), stage.token.clone());
        tokio::spawn(async move {
            let mut answers: Vec<StatusCode> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // The owner's token: the stream is not held to visitors' rate.
                let status = http.post(&predict).bearer_auth(&token).body(image.clone()).send().await.map(|r| r.status()).unwrap_or(StatusCode::IM_A_TEAPOT);
                answers.push(status);
            }
            answers
        })
    };
    let login = format!("{}{}", stage.w.agents[0].prefix, stage.w.leases[0]);
    let folder = stage.w.dir.path().join("agent0/homes").join(&login).join(".suanli-services").join(id.to_string());
    assert!(folder.join("g1-0/model.safetensors").exists(), "generation 1's copy of the model is in the lease's home");
    let (status, body) = stage.api("PATCH", &format!("/api/v1/services/{id}"), Some(json!({"version": 2}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["generation"], 2);
    stage.wait_ready(id, 2).await;
    eventually(WAIT, Duration::from_millis(300), || async { log_of(&stage, id).await.contains("replica 0 of generation 1 stopped").then_some(()) })
        .await
        .expect("the old generation stopped");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = stream.await.expect("the stream");
    let failed: Vec<&StatusCode> = answers.iter().filter(|s| **s != StatusCode::OK).collect();
    assert!(answers.len() >= 20, "a steady stream: {} requests", answers.len());
    assert!(failed.is_empty(), "{} of {} requests failed during the update: {failed:?}", failed.len(), answers.len());
    // The old generation's copy of the model left the lease's home with it; the new one's is there.
    let cleared = eventually(WAIT, Duration::from_millis(200), || {
        let folder = folder.clone();
        async move { (!folder.join("g1-0").exists()).then_some(()) }
    })
    .await;
    assert!(cleared.is_ok(), "the old generation's files are removed\n{}", log_of(&stage, id).await);
    assert!(folder.join("g2-0/model.safetensors").exists(), "the running generation's files stay");

    // The lease ends: the service stops, its processes go, and its URL answers 410 for good.
    let text = log_of(&stage, id).await;
    let pids = started_pids(&text);
    assert!(pids.len() >= 3, "the first, the restarted and the updated process: {pids:?}");
    let mut researcher = stage.w.researcher.clone();
    researcher
        .end_lease(suanli_proto::v1::EndLeaseRequest {
            request_id: "end-demo".into(),
            lease_id: stage.w.leases[0],
            reason: suanli_proto::v1::EndReason::ByResearcher.into(),
        })
        .await
        .expect("end the lease");
    let gone = eventually(WAIT, Duration::from_millis(300), || {
        let (http, predict, image) = (http.clone(), predict.clone(), image.clone());
        async move { (http.post(&predict).body(image).send().await.ok()?.status() == StatusCode::GONE).then_some(()) }
    })
    .await;
    assert!(gone.is_ok(), "410 after the lease ended\n{}", stage.logs());
    let alive = eventually(WAIT, Duration::from_millis(200), || {
        let pids = pids.clone();
        async move { pids.iter().all(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(()) }
    })
    .await;
    assert!(alive.is_ok(), "no process of the demo outlives its lease: {pids:?}");
    let (_, view) = stage.api("GET", &format!("/api/v1/services/{id}"), None).await;
    assert_eq!((view["state"].as_str(), view["stop_reason"].as_str()), (Some("stopped"), Some("the lease ended")), "{view}");
    assert!(view["stopped_ms"].as_i64().is_some() && view["running_ms"].as_i64().unwrap_or(0) > 0, "metered: {view}");
    let (status, _) = stage.api("PATCH", &format!("/api/v1/services/{id}"), Some(json!({"visibility": "public"}))).await;
    assert_eq!(status, StatusCode::GONE, "a stopped service is not changed");
    assert_eq!(http.get(&url).send().await.expect("page").status(), StatusCode::GONE);
}

#[tokio::test]
async fn a_terminal_in_the_browser_is_a_login_shell_of_the_lease_for_its_owner_alone() {
    let Some(stage) = stage(false).await else { return };
    let lease = stage.w.leases[0];
    // Through the API first: the node's tunnel is then known to be open.
    let view = stage.create(json!({"lease_id": lease, "kind": "terminal"})).await;
    let url = view["url"].as_str().expect("url").to_owned();
    let (status, refused) = stage.api("POST", "/api/v1/services", Some(json!({"lease_id": lease, "kind": "terminal", "visibility": "link"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a terminal is never shared: {refused}");

    // In Chromium: "Open a terminal" on the lease's page, a command typed, its output seen.
    let browser = signed_in_browser(&stage.portal.url).await;
    browser.goto(&format!("{}/leases/{lease}", stage.portal.url)).await.expect("lease page");
    browser.click("div.open-terminal form.api button[type=submit]").await.expect("open a terminal");
    let at = browser.wait_url(".localhost:", WAIT).await.expect("on the terminal's origin");
    browser.wait_for("#status[data-state='open']", WAIT).await.expect("the shell connected");
    browser.type_into(".xterm-helper-textarea", "echo \"cards=$CUDA_VISIBLE_DEVICES\"; id -un > ~/made-in-the-terminal\u{E007}").await.expect("type");
    let shown = eventually(WAIT, Duration::from_millis(200), || async {
        let text = browser.execute("return window.terminalText()", json!([])).await.ok()?;
        text.as_str().filter(|t| t.contains("cards=0,1")).map(str::to_owned)
    })
    .await
    .unwrap_or_else(|e| panic!("the command's output on the terminal ({at}): {e}"));
    assert!(shown.contains("cards=0,1"), "the lease's cards: {shown}");
    // The file is the lease's, in its home, where SSH sees the same files.
    let prefix = &stage.w.agents[0].prefix;
    let login = format!("{prefix}{lease}");
    let home = stage.w.dir.path().join("agent0").join("homes").join(&login);
    let made = eventually(WAIT, Duration::from_millis(200), || {
        let file = home.join("made-in-the-terminal");
        async move { std::fs::read_to_string(file).ok().filter(|t| !t.is_empty()) }
    })
    .await
    .expect("the file the shell made");
    assert_eq!(made.trim(), login, "the shell runs as the lease's account");
    // From that shell, the lease cannot reach the services' sockets, its own included: only the
    // agent (and through it, the portal) can.
    let id = view["service_id"].as_u64().expect("id");
    let socket = stage.w.dir.path().join("agent0/state/services").join(id.to_string()).join("g1-0.sock");
    assert!(socket.exists(), "the terminal's socket is where the agent keeps it");
    let probe = format!("python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' {} 2>&1 | tail -1\u{E007}", socket.display());
    browser.type_into(".xterm-helper-textarea", &probe).await.expect("type");
    let refused = eventually(WAIT, Duration::from_millis(200), || async {
        let text = browser.execute("return window.terminalText()", json!([])).await.ok()?;
        text.as_str().filter(|t| t.contains("PermissionError")).map(str::to_owned)
    })
    .await;
    assert!(refused.is_ok(), "the lease's shell is refused the service's socket: {refused:?}");

    // Nobody else: another user, no one, a page of another origin with the owner's token.
    let supplier = session(&stage, &url, "demo-supplier").await;
    assert_eq!(supplier.get(&url).send().await.expect("page").status(), StatusCode::FORBIDDEN);
    assert_eq!(stage.client_for(&url).get(format!("{url}pty")).send().await.expect("pty").status(), StatusCode::FORBIDDEN);
    let hijack = stage
        .client_for(&url)
        .get(format!("{url}pty"))
        .bearer_auth(&stage.token)
        .header("origin", format!("http://evil.localhost:{}", stage.port))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .expect("hijack");
    assert_eq!(hijack.status(), StatusCode::FORBIDDEN, "a WebSocket opened from another origin");
    // The owner's own page is served there.
    let page = stage.client_for(&url).get(&url).bearer_auth(&stage.token).send().await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.expect("text").contains("/.suanli/xterm.js"));
}

/// An environment nobody uses stops by itself (the portal's idle time, 15 s here), and not while
/// a browser holds its WebSocket open, though nobody types: it stops soon after that closes.
#[tokio::test]
async fn an_environment_stops_once_nobody_has_used_it_for_the_idle_time() {
    const IDLE_MS: i64 = 15_000;
    let Some(stage) = stage_with(false, &["--environment-idle-s", "15"]).await else { return };
    let view = stage.create(json!({"lease_id": stage.w.leases[0], "kind": "terminal"})).await;
    let (id, url) = (view["service_id"].as_u64().expect("id"), view["url"].as_str().expect("url").to_owned());
    let host = url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stage.port)).await.expect("portal");
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{host}/pty")).expect("request");
    request.headers_mut().insert("authorization", format!("Bearer {}", stage.token).parse().expect("header"));
    let (ws, _) = tokio_tungstenite::client_async(request, tcp).await.expect("the terminal's WebSocket");
    let opened_ms = now_ms();

    // Held open past the idle time with nothing typed: still in use, as every sweep records.
    let held = eventually(Duration::from_secs(60), Duration::from_millis(300), || async {
        let (_, view) = stage.api("GET", &format!("/api/v1/services/{id}"), None).await;
        assert_eq!(view["state"], "running", "stopped while a browser was connected: {view}\n{}", stage.logs());
        (view["last_used_ms"].as_i64().unwrap_or(0) >= opened_ms + IDLE_MS + 3_000).then_some(view)
    })
    .await;
    assert!(held.is_ok(), "a connected terminal is in use: {held:?}");

    // The tab closes: the idle time later, the terminal stops for good.
    drop(ws);
    let closed_ms = now_ms();
    let stopped = stage.wait_stopped(id, Duration::from_secs(60), "an idle terminal stops").await;
    assert!(stopped["stop_reason"].as_str().unwrap_or_default().contains("nobody used it"), "{stopped}");
    assert!(stopped["stopped_ms"].as_i64().unwrap_or(0) >= closed_ms + IDLE_MS - 3_000, "not before the idle time: {stopped}");
    let gone = stage.client_for(&url).get(&url).bearer_auth(&stage.token).send().await.expect("page");
    assert_eq!(gone.status(), StatusCode::GONE);
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64
}

/// The processes a service's log says were started, in order.
fn started_pids(log: &str) -> Vec<u32> {
    log.lines().filter_map(|l| l.split("started (pid ").nth(1)).filter_map(|rest| rest.trim_end_matches(')').parse().ok()).collect()
}

/// The end of service `id`'s log.
async fn log_of(stage: &Stage, id: u64) -> String {
    stage.api("GET", &format!("/api/v1/services/{id}/log"), None).await.1.as_str().unwrap_or_default().to_owned()
}

type KernelChannels = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Runs `code` in a new kernel of the JupyterLab at `url`, as JupyterLab itself does (a kernel
/// made with `POST /api/kernels`, an `execute_request` on its WebSocket), through the portal
/// with the owner's token; what it printed.
async fn run_cell(stage: &Stage, url: &str, code: &str) -> String {
    let mut ws = start_cell(stage, url, code).await;
    let mut printed = String::new();
    tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(message) = futures::StreamExt::next(&mut ws).await {
            let tokio_tungstenite::tungstenite::Message::Text(text) = message.expect("a message") else { continue };
            let m: Value = serde_json::from_str(&text).expect("json");
            if m["parent_header"]["msg_id"] != "cell-1" {
                continue;
            }
            match m["msg_type"].as_str() {
                Some("stream") => printed.push_str(m["content"]["text"].as_str().unwrap_or_default()),
                Some("error") => panic!("the cell failed: {}", m["content"]),
                Some("execute_reply") => return,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the cell's reply; printed so far: {printed}"));
    printed
}

/// Starts `code` in a new kernel of the JupyterLab at `url` (as [`run_cell`]); the kernel's
/// channels, on which its output arrives.
async fn start_cell(stage: &Stage, url: &str, code: &str) -> KernelChannels {
    let host = url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let jar = std::sync::Arc::new(reqwest::cookie::Jar::default());
    let http = reqwest::Client::builder()
        .cookie_provider(jar.clone())
        .resolve(host.split(':').next().expect("name"), std::net::SocketAddr::from(([127, 0, 0, 1], stage.port)))
        .build()
        .expect("client");
    // JupyterLab's page sets its XSRF cookie, which every later write echoes.
    let lab = http.get(format!("{url}lab")).bearer_auth(&stage.token).send().await.expect("lab");
    assert_eq!(lab.status(), StatusCode::OK);
    let cookies = reqwest::cookie::CookieStore::cookies(&*jar, &url.parse().expect("url")).expect("cookies");
    let xsrf = cookies.to_str().expect("text").split("; ").find_map(|c| c.strip_prefix("_xsrf=")).expect("JupyterLab's _xsrf cookie").to_owned();
    let kernel: Value = http
        .post(format!("{url}api/kernels"))
        .bearer_auth(&stage.token)
        .header("x-xsrftoken", &xsrf)
        .json(&json!({"name": "python3"}))
        .send()
        .await
        .expect("kernel")
        .json()
        .await
        .expect("json");
    let kernel = kernel["id"].as_str().unwrap_or_else(|| panic!("a kernel: {kernel}")).to_owned();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stage.port)).await.expect("portal");
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{host}/api/kernels/{kernel}/channels")).expect("request");
    request.headers_mut().insert("authorization", format!("Bearer {}", stage.token).parse().expect("header"));
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await.expect("the kernel's channels");
    let execute = json!({
        "header": {"msg_id": "cell-1", "username": "test", "session": "test", "msg_type": "execute_request", "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": false, "store_history": false, "user_expressions": {}, "allow_stdin": false, "stop_on_error": true},
    });
    futures::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::Text(execute.to_string().into())).await.expect("execute");
    ws
}

/// A notebook at work is in use with no tab open (a long cell, the browser closed); once the
/// cell has ended, it stops the idle time (30 s here) later.
#[tokio::test]
async fn jupyterlab_running_a_cell_with_no_tab_open_is_in_use_until_the_cell_ends() {
    const IDLE_MS: i64 = 30_000;
    const CELL_MS: i64 = 50_000;
    let Some(stage) = stage_with(false, &["--environment-idle-s", "30"]).await else { return };
    let view = stage.create(json!({"lease_id": stage.w.leases[0], "kind": "jupyter"})).await;
    let (id, url) = (view["service_id"].as_u64().expect("id"), view["url"].as_str().expect("url").to_owned());
    let channels = start_cell(&stage, &url, &format!("import time\ntime.sleep({})\nprint('done')\n", CELL_MS / 1000)).await;
    // The tab closes at once: nothing is connected, nothing requested; the kernel works on.
    drop(channels);
    let started_ms = now_ms();
    let working = eventually(Duration::from_secs(120), Duration::from_millis(500), || async {
        let (_, view) = stage.api("GET", &format!("/api/v1/services/{id}"), None).await;
        assert_eq!(view["state"], "running", "stopped while its cell ran: {view}\n{}", stage.logs());
        (now_ms() >= started_ms + IDLE_MS + 5_000).then_some(view)
    })
    .await
    .expect("past the idle time");
    assert!(working["last_used_ms"].as_i64().unwrap_or(0) >= started_ms + IDLE_MS - 5_000, "its busy kernel counted as use: {working}");
    let stopped = stage.wait_stopped(id, Duration::from_secs(180), "an idle notebook stops once its cell ended").await;
    assert!(stopped["stop_reason"].as_str().unwrap_or_default().contains("nobody used it"), "{stopped}");
    assert!(stopped["stopped_ms"].as_i64().unwrap_or(0) >= started_ms + CELL_MS, "not before its cell ended: {stopped}");
}

#[tokio::test]
async fn jupyterlab_runs_the_owners_notebook_on_the_leases_cards_in_its_home() {
    let Some(stage) = stage(false).await else { return };
    let lease = stage.w.leases[0];
    let view = stage.create(json!({"lease_id": lease, "kind": "jupyter"})).await;
    let (id, url) = (view["service_id"].as_u64().expect("id"), view["url"].as_str().expect("url").to_owned());

    // In Chromium: the owner opens it; JupyterLab's own page and scripts load through the proxy.
    let browser = signed_in_browser(&stage.portal.url).await;
    browser.goto(&format!("{}/services/{id}/open", stage.portal.url)).await.expect("open");
    browser.wait_url("/lab", WAIT).await.expect("JupyterLab's page");
    browser.wait_for("#jp-main-dock-panel", Duration::from_secs(120)).await.expect("JupyterLab's interface");

    // A cell: it sees exactly the lease's cards, imports the project's PyTorch, writes into the
    // lease's home (where SSH and the terminal see the same files).
    let code = "import os, getpass\nprint('cards=' + os.environ['CUDA_VISIBLE_DEVICES'])\nopen(os.path.expanduser('~/made-in-a-notebook'), 'w').write(getpass.getuser())\nimport torch\nprint('torch', torch.__version__)\n";
    let printed = run_cell(&stage, &url, code).await;
    assert!(printed.contains("cards=0,1"), "{printed}");
    if support::system_python_of_the_venv().is_some() {
        assert!(printed.contains("torch 2.11.0"), "the project's PyTorch: {printed}");
    }
    let login = format!("{}{lease}", stage.w.agents[0].prefix);
    let made = stage.w.dir.path().join("agent0/homes").join(&login).join("made-in-a-notebook");
    assert_eq!(std::fs::read_to_string(&made).expect("the notebook's file"), login, "written as the lease's account");

    // Nobody else: another user, no one.
    let supplier = session(&stage, &url, "demo-supplier").await;
    assert_eq!(supplier.get(format!("{url}lab")).send().await.expect("lab").status(), StatusCode::FORBIDDEN);
    assert_eq!(stage.client_for(&url).get(format!("{url}api/kernels")).send().await.expect("kernels").status(), StatusCode::FORBIDDEN);
}
