//! A world whose agents keep a tunnel to a portal that publishes services on leased cards
//! (`tests/services.rs`, `benches/services.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use suanli_testkit::eventually;
use suanli_testkit::portal::{researcher_portal, PortalProcess};

use super::{wait_done, World, WAIT};

/// Two cards per node: the demo's update runs two generations side by side on one of them.
pub const CARDS: u32 = 2;

/// A world with a trained classifier registered twice (versions 1 and 2 of `digits-cls`: the
/// same weights, so that an update changes the process, not the answers), and a portal that
/// publishes services under `localhost`.
pub struct Stage {
    pub w: World,
    pub portal: PortalProcess,
    /// The researcher's API token at the portal.
    pub token: String,
    pub port: u16,
    pub data: PathBuf,
    pub job: u64,
}

/// The world and its portal; with `model`, a classifier trained and registered too (`None`
/// where the CV data is missing, outside CI).
pub async fn stage(model: bool) -> Option<Stage> {
    stage_with(model, &[]).await
}

/// As [`stage`], the portal started with `portal_flags` too.
pub async fn stage_with(model: bool, portal_flags: &[&str]) -> Option<Stage> {
    let data = if model { super::cv_data()? } else { PathBuf::new() };
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return None;
    }
    // The agents are told the portal's tunnel port before it runs; they dial until it does, in
    // TLS as a node off the portal's host would (the certificate from the cluster CA).
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port();
    let (port, tunnel_port) = (free_port(), free_port());
    let address = format!("127.0.0.1:{port}");
    // JupyterLab's environment is made once per machine (kept between runs), with the system's
    // interpreter of the project's venv's version and the venv's packages (its PyTorch).
    let mut flags: Vec<String> =
        vec!["--portal".into(), format!("https://localhost:{tunnel_port}"), "--templates-dir".into(), "/var/tmp/suanli-cache/agent-templates".into()];
    if let Some((python, packages)) = super::system_python_of_the_venv() {
        flags.extend(["--jupyter-python".into(), python.display().to_string(), "--jupyter-packages".into(), packages.display().to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let w = World::start_with(1, CARDS, 1, &flags).await;
    let job = if model { train(&w, &data).await } else { 0 };
    let broker_url = format!("http://{}", w.broker.address(1).expect("address"));
    let tunnel_key = w.dir.path().join("tunnel-key").display().to_string();
    let (tunnel_cert, tunnel_cert_key) = tunnel_certificate(&w);
    let tunnel_listen = format!("127.0.0.1:{tunnel_port}");
    let mut more = vec![
        "--artifacts-url",
        w.artifacts.as_str(),
        "--listen",
        &address,
        "--tunnel-key-file",
        &tunnel_key,
        "--tunnel-listen",
        &tunnel_listen,
        "--tunnel-tls-cert",
        &tunnel_cert,
        "--tunnel-tls-key",
        &tunnel_cert_key,
        "--services-domain",
        "localhost",
    ];
    more.extend_from_slice(portal_flags);
    let researcher = (w.researcher_id, w.researcher_token.as_str());
    let (portal, token) =
        researcher_portal(w.dir.path(), &broker_url, suanli_testkit::cluster::PLATFORM_TOKEN, researcher, suanli_portal::demo::DEMO_PASSWORD, &more)
            .await
            .expect("portal");
    let stage = Stage { w, portal, token, port, data, job };
    if model {
        for _ in 0..2 {
            let (status, body) = stage.api("POST", "/api/v1/models", Some(json!({"name": "digits-cls", "job_id": job, "output": "model.safetensors"}))).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
        }
    }
    Some(stage)
}

/// The portal's tunnel listener's certificate and key (files), from the cluster CA, as
/// `suanli-broker server-cert` issues it.
fn tunnel_certificate(w: &World) -> (String, String) {
    let (cert, key) = (w.dir.path().join("tunnel.pem"), w.dir.path().join("tunnel.key"));
    let out = std::process::Command::new(suanli_testkit::workspace_binary("suanli-broker", "suanli-broker").expect("broker binary"))
        .args(["server-cert", "--ca-cert", &w.broker.agent_ca_cert().display().to_string(), "--ca-key", &w.broker.agent_ca_key().display().to_string()])
        .args([
            "--name",
            "localhost,127.0.0.1",
            "--common-name",
            "suanli-portal tunnels",
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
        ])
        .output()
        .expect("suanli-broker server-cert");
    assert!(out.status.success(), "server-cert: {}", String::from_utf8_lossy(&out.stderr));
    (cert.display().to_string(), key.display().to_string())
}

/// A small classifier of the test data's digits, trained on the world's lease; its job.
async fn train(w: &World, data: &Path) -> u64 {
    let mut jobs = w.jobs(&w.researcher_token).await;
    let spec = super::digits_training(data, 3);
    let job = w.submit(&mut jobs, "digits", &spec).await.job_id;
    let done = wait_done(&mut jobs, 1, Duration::from_secs(300)).await;
    let trained = done.iter().find(|j| j.job_id == job).expect("the job");
    assert_eq!(trained.state, "succeeded", "{trained:?}\n{}", w.logs());
    job
}

impl Stage {
    /// Every process's log: the world's and the portal's.
    pub fn logs(&self) -> String {
        format!("{}---- portal ----\n{}\n", self.w.logs(), self.portal.service.log())
    }

    /// A call to the portal's API with the researcher's token.
    pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.api_as(&self.token, method, path, body).await
    }

    pub async fn api_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
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
    pub fn client_for(&self, url: &str) -> reqwest::Client {
        self.builder_for(url).build().expect("client")
    }

    /// As [`Stage::client_for`], answering redirects to the caller.
    pub fn client_for_without_redirects(&self, url: &str) -> reqwest::Client {
        self.builder_for(url).redirect(reqwest::redirect::Policy::none()).build().expect("client")
    }

    fn builder_for(&self, url: &str) -> reqwest::ClientBuilder {
        let host = url.trim_start_matches("http://").split([':', '/']).next().expect("host").to_owned();
        reqwest::Client::builder().cookie_store(true).resolve(&host, std::net::SocketAddr::from(([127, 0, 0, 1], self.port)))
    }

    /// Deploys `digits-cls` on the lease; waits until the node's tunnel is open and the demo
    /// answers. Returns the service's view.
    pub async fn deploy(&self, visibility: &str) -> Value {
        self.create(json!({"lease_id": self.w.leases[0], "model": "digits-cls", "version": 1, "visibility": visibility})).await
    }

    /// Creates a service (trying again while the node's tunnel is not open yet) and waits until
    /// it answers.
    pub async fn create(&self, body: Value) -> Value {
        let created = eventually(WAIT, Duration::from_millis(500), || {
            let body = body.clone();
            async move {
                let (status, view) = self.api("POST", "/api/v1/services", Some(body)).await;
                // 503 until the agent's tunnel is open: nothing is kept, so it is tried again.
                match status {
                    StatusCode::CREATED => Some(view),
                    StatusCode::SERVICE_UNAVAILABLE => None,
                    other => panic!("deploying: {other} {view}\n{}", self.logs()),
                }
            }
        })
        .await
        .unwrap_or_else(|e| panic!("the service was made: {e}\n{}", self.logs()));
        self.wait_ready(created["service_id"].as_u64().expect("id"), 1).await;
        created
    }

    /// Waits until the agent says the service's `generation` answers (a JupyterLab may first be
    /// installed on the node: minutes, once per machine).
    pub async fn wait_ready(&self, id: u64, generation: u64) -> Value {
        eventually(Duration::from_secs(600), Duration::from_millis(300), || async move {
            let (_, view) = self.api("GET", &format!("/api/v1/services/{id}"), None).await;
            (view["live"]["state"] == "ready" && view["live"]["generation"] == generation).then_some(view)
        })
        .await
        .unwrap_or_else(|e| panic!("service {id} generation {generation} answers: {e}\n{}", self.logs()))
    }

    /// The service's view at the portal.
    pub async fn view(&self, id: u64) -> Value {
        self.api("GET", &format!("/api/v1/services/{id}"), None).await.1
    }

    /// Waits until the service has stopped (for good); its view.
    pub async fn wait_stopped(&self, id: u64, within: Duration, what: &str) -> Value {
        eventually(within, Duration::from_millis(300), || async move { Some(self.view(id).await).filter(|view| view["state"] == "stopped") })
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.logs()))
    }

    /// An image of the digit 7 from the test data.
    pub fn seven(&self) -> (PathBuf, Vec<u8>) {
        let dir = self.data.join("digits/images/7");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).expect("sevens").flatten().map(|e| e.path()).collect();
        files.sort();
        let path = files.into_iter().next().expect("a seven");
        let bytes = std::fs::read(&path).expect("image");
        (path, bytes)
    }

    /// What `suanli-job infer` says of `image` with the trained model (its files from the job).
    pub async fn infer(&self, image: &Path) -> Value {
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
        let params = json!({"model": model, "input": input, "top_k": "3", "output": dir.join("out")}).to_string();
        let job = super::cv_job_binary().expect("suanli-job");
        let run = tokio::process::Command::new(job).args(["--task", "infer", "--params-json", &params]).output().await.expect("suanli-job infer");
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let out: Value = serde_json::from_slice(&std::fs::read(dir.join("out/predictions.json")).expect("predictions")).expect("json");
        out["predictions"][0].clone()
    }
}

/// A signed-in session at the portal (its cookie), which also reaches `service_url`.
pub async fn session(stage: &Stage, service_url: &str, login: &str) -> reqwest::Client {
    signed_in(stage, service_url, login).await.0
}

/// As [`session`], with the session's CSRF token (what its writes send).
pub async fn signed_in(stage: &Stage, service_url: &str, login: &str) -> (reqwest::Client, String) {
    let http = stage.client_for(service_url);
    let answer = http
        .post(format!("{}/api/v1/session", stage.portal.url))
        .json(&json!({"login": login, "password": suanli_portal::demo::DEMO_PASSWORD}))
        .send()
        .await
        .expect("sign in");
    assert!(answer.status().is_success(), "{login} signs in: {}", answer.status());
    let session: Value = answer.json().await.expect("json");
    (http, session["csrf_token"].as_str().expect("a CSRF token").to_owned())
}
