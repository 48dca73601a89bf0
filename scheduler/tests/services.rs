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

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_testkit::eventually;
use suanli_testkit::portal::{researcher_portal, PortalProcess};
use support::{signed_in_browser, wait_done, World, WAIT};

/// Two cards per node: the demo's update runs two generations side by side on one of them.
const CARDS: u32 = 2;

/// A world with a trained classifier registered twice (versions 1 and 2 of `digits-cls`: the
/// same weights, so that an update changes the process, not the answers), and a portal that
/// publishes services under `localhost`.
struct Stage {
    w: World,
    portal: PortalProcess,
    /// The researcher's API token at the portal.
    token: String,
    port: u16,
    data: PathBuf,
    job: u64,
}

async fn stage() -> Option<Stage> {
    let data = support::cv_data()?;
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return None;
    }
    // The agents are told the portal's address before it runs; they dial until it does.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port();
    let address = format!("127.0.0.1:{port}");
    let w = World::start_with(1, CARDS, 1, &["--portal", &address]).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let spec = json!({
        "name": "digits", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "builtin": { "task": "train_classifier", "params": {
            "data": data.join("digits/images").display().to_string(),
            "training.model": r#"{"arch": "small_cnn", "width": 16}"#,
            "training.optimizer": r#"{"kind": "adam", "lr": 0.003}"#,
            "training.epochs": "3",
            "training.batch_size": "64",
        } } },
        "outputs": ["model.json", "model.safetensors", "metrics.json"],
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, "digits", &spec).await.job_id;
    let done = wait_done(&mut jobs, 1, Duration::from_secs(300)).await;
    let trained = done.iter().find(|j| j.job_id == job).expect("the job");
    assert_eq!(trained.state, "succeeded", "{trained:?}\n{}", w.logs());

    let broker_url = format!("http://{}", w.broker.address(1).expect("address"));
    let tunnel_key = w.dir.path().join("tunnel-key").display().to_string();
    let more = ["--artifacts-url", w.artifacts.as_str(), "--listen", &address, "--tunnel-key-file", &tunnel_key, "--services-domain", "localhost"];
    let researcher = (w.researcher_id, w.researcher_token.as_str());
    let (portal, token) =
        researcher_portal(w.dir.path(), &broker_url, suanli_testkit::cluster::PLATFORM_TOKEN, researcher, suanli_portal::demo::DEMO_PASSWORD, &more)
            .await
            .expect("portal");
    let stage = Stage { w, portal, token, port, data, job };
    for _ in 0..2 {
        let (status, body) = stage.api("POST", "/api/v1/models", Some(json!({"name": "digits-cls", "job_id": job, "output": "model.safetensors"}))).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    Some(stage)
}

impl Stage {
    /// A call to the portal's API with the researcher's token.
    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.api_as(&self.token, method, path, body).await
    }

    async fn api_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = reqwest::Client::new().request(method, format!("{}{path}", self.portal.url)).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("portal answers");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// A client (keeping cookies, following redirects) that reaches the service origin `url`
    /// (a `*.localhost` name) at the portal.
    fn client_for(&self, url: &str) -> reqwest::Client {
        self.builder_for(url).build().expect("client")
    }

    /// As [`Stage::client_for`], answering redirects to the caller.
    fn client_for_without_redirects(&self, url: &str) -> reqwest::Client {
        self.builder_for(url).redirect(reqwest::redirect::Policy::none()).build().expect("client")
    }

    fn builder_for(&self, url: &str) -> reqwest::ClientBuilder {
        let host = url.trim_start_matches("http://").split([':', '/']).next().expect("host").to_owned();
        reqwest::Client::builder().cookie_store(true).resolve(&host, std::net::SocketAddr::from(([127, 0, 0, 1], self.port)))
    }

    /// Deploys `digits-cls` on the lease; waits until the node's tunnel is open and the demo
    /// answers. Returns the service's view.
    async fn deploy(&self, visibility: &str) -> Value {
        let body = json!({"lease_id": self.w.leases[0], "model": "digits-cls", "version": 1, "visibility": visibility});
        let created = eventually(WAIT, Duration::from_millis(500), || {
            let body = body.clone();
            async move {
                let (status, view) = self.api("POST", "/api/v1/services", Some(body)).await;
                // 503 until the agent's tunnel is open: nothing is kept, so it is tried again.
                match status {
                    StatusCode::CREATED => Some(view),
                    StatusCode::SERVICE_UNAVAILABLE => None,
                    other => panic!("deploying: {other} {view}"),
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("the demo was deployed: {e}\n{}", self.w.logs()));
        self.wait_ready(created["service_id"].as_u64().expect("id"), 1).await;
        created
    }

    /// Waits until the agent says the service's `generation` answers.
    async fn wait_ready(&self, id: u64, generation: u64) -> Value {
        eventually(Duration::from_secs(180), Duration::from_millis(300), || async move {
            let (_, view) = self.api("GET", &format!("/api/v1/services/{id}"), None).await;
            (view["live"]["state"] == "ready" && view["live"]["generation"] == generation).then_some(view)
        })
        .await
        .unwrap_or_else(|e| panic!("service {id} generation {generation} answers: {e}\n{}", self.w.logs()))
    }

    /// An image of the digit 7 from the test data.
    fn seven(&self) -> (PathBuf, Vec<u8>) {
        let dir = self.data.join("digits/images/7");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("sevens").flatten().map(|e| e.path()).collect();
        files.sort();
        let path = files.into_iter().next().expect("a seven");
        let bytes = std::fs::read(&path).expect("image");
        (path, bytes)
    }

    /// What `suanli-job infer` says of `image` with the trained model (its files from the job).
    async fn infer(&self, image: &Path) -> Value {
        let dir = self.w.dir.path().join("infer");
        let (model, input) = (dir.join("model"), dir.join("input"));
        std::fs::create_dir_all(&model).expect("model dir");
        std::fs::create_dir_all(&input).expect("input dir");
        std::fs::copy(image, input.join("seven.png")).expect("image");
        for name in ["model.json", "model.safetensors"] {
            let bytes = reqwest::Client::new()
                .get(format!("{}/api/v1/jobs/{}/outputs/{name}", self.portal.url, self.job))
                .bearer_auth(&self.token)
                .send()
                .await
                .expect("output")
                .bytes()
                .await
                .expect("bytes");
            std::fs::write(model.join(name), bytes).expect("write");
        }
        let params = json!({"model": model, "input": input, "top_k": 3, "output": dir.join("out")}).to_string();
        let job = support::cv_job_binary().expect("suanli-job");
        let run = tokio::process::Command::new(job).args(["--task", "infer", "--params-json", &params]).output().await.expect("suanli-job infer");
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let out: Value = serde_json::from_slice(&std::fs::read(dir.join("out/predictions.json")).expect("predictions")).expect("json");
        out["predictions"][0].clone()
    }
}

/// A signed-in session at the portal (its cookie), which also reaches `service_url`.
async fn session(stage: &Stage, service_url: &str, login: &str) -> reqwest::Client {
    let http = stage.client_for(service_url);
    let answer = http
        .post(format!("{}/api/v1/session", stage.portal.url))
        .json(&json!({"login": login, "password": suanli_portal::demo::DEMO_PASSWORD}))
        .send()
        .await
        .expect("sign in");
    assert!(answer.status().is_success(), "{login} signs in: {}", answer.status());
    http
}

#[tokio::test]
async fn a_private_demo_answers_as_suanli_job_infer_does_for_its_owner_alone() {
    let Some(stage) = stage().await else { return };
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
    let supplier = session(&stage, &url, "demo-supplier").await;
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
    let to = by_hand.get(format!("{}/services/{id}/open", stage.portal.url)).send().await.expect("open");
    assert_eq!(to.status(), StatusCode::SEE_OTHER);
    let login = to.headers()["location"].to_str().expect("location").to_owned();
    assert!(login.starts_with(&format!("{url}.suanli/login?grant=")), "{login}");
    assert_eq!(by_hand.get(&login).send().await.expect("use").status(), StatusCode::SEE_OTHER, "its first use");
    assert_eq!(stage.client_for(&url).get(&login).send().await.expect("replay").status(), StatusCode::FORBIDDEN, "used again");

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
}

#[tokio::test]
async fn a_demo_is_restarted_when_killed_updated_without_a_failed_request_and_gone_with_its_lease() {
    let Some(stage) = stage().await else { return };
    let view = stage.deploy("link").await;
    let (id, url) = (view["service_id"].as_u64().expect("id"), view["url"].as_str().expect("url").to_owned());
    let predict = format!("{url}v1/predict");
    let (_, image) = stage.seven();
    let http = stage.client_for(&url);

    // Its process killed: started again, and the log says how it ended.
    let log = |stage: &Stage| {
        let path = format!("/api/v1/services/{id}/log");
        async move { stage.api("GET", &path, None).await.1.as_str().unwrap_or_default().to_owned() }
    };
    let text = log(&stage).await;
    let pid: i32 = text
        .lines()
        .filter_map(|l| l.split("started (pid ").nth(1))
        .filter_map(|rest| rest.trim_end_matches(')').parse().ok())
        .last()
        .expect("a pid in the log");
    let killed = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().expect("kill");
    assert!(killed.success());
    let restarted = eventually(Duration::from_secs(180), Duration::from_millis(300), || async {
        let (_, view) = stage.api("GET", &format!("/api/v1/services/{id}"), None).await;
        (view["live"]["restarts"].as_u64().unwrap_or(0) >= 1 && view["live"]["state"] == "ready").then_some(view)
    })
    .await
    .unwrap_or_else(|e| panic!("restarted: {e}\n{}", stage.w.logs()));
    assert_eq!(restarted["live"]["last_exit"], "signal 9");
    let text = log(&stage).await;
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
    let (status, body) = stage.api("PATCH", &format!("/api/v1/services/{id}"), Some(json!({"version": 2}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["generation"], 2);
    stage.wait_ready(id, 2).await;
    eventually(WAIT, Duration::from_millis(300), || async { log(&stage).await.contains("replica 0 of generation 1 stopped").then_some(()) })
        .await
        .expect("the old generation stopped");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = stream.await.expect("the stream");
    let failed: Vec<&StatusCode> = answers.iter().filter(|s| **s != StatusCode::OK).collect();
    assert!(answers.len() >= 20, "a steady stream: {} requests", answers.len());
    assert!(failed.is_empty(), "{} of {} requests failed during the update: {failed:?}", failed.len(), answers.len());

    // The lease ends: the service stops, and its URL answers 410 for good.
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
    assert!(gone.is_ok(), "410 after the lease ended\n{}", stage.w.logs());
    let (_, view) = stage.api("GET", &format!("/api/v1/services/{id}"), None).await;
    assert_eq!((view["state"].as_str(), view["stop_reason"].as_str()), (Some("stopped"), Some("the lease ended")), "{view}");
    assert!(view["stopped_ms"].as_i64().is_some() && view["running_ms"].as_i64().unwrap_or(0) > 0, "metered: {view}");
    let (status, _) = stage.api("PATCH", &format!("/api/v1/services/{id}"), Some(json!({"visibility": "public"}))).await;
    assert_eq!(status, StatusCode::GONE, "a stopped service is not changed");
    assert_eq!(http.get(&url).send().await.expect("page").status(), StatusCode::GONE);
}
