//! Headless Chromium driven over the W3C WebDriver protocol (Debian `chromium` and
//! `chromium-driver`), for browser end-to-end tests. A few JSON calls; no client library.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    _driver: Child,
    http: reqwest::Client,
    session: String,
    base: String,
}

pub struct Element(String);

impl Drop for Browser {
    /// chromedriver, Chromium and every helper process it forked (a test that fails half-way
    /// never leaves a browser running): the whole process group, by a system call.
    fn drop(&mut self) {
        if let Some(group) = self._driver.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
    }
}

impl Browser {
    /// Starts chromedriver on a port it picks and opens a headless Chromium session.
    pub async fn start() -> anyhow::Result<Browser> {
        // chromedriver picks its port and binds it again: another one started at the same
        // moment (a test with several browsers) may take it first, and it exits ("port not
        // available"). Such a start is made again, saying why.
        let mut said = Vec::new();
        for _ in 0..3 {
            match Browser::start_driver().await? {
                Ok((driver, port)) => return Browser::open(driver, port).await,
                Err(lines) => {
                    eprintln!("chromedriver exited before it listened, starting it again: {lines:?}");
                    said = lines;
                }
            }
        }
        bail!("chromedriver exited three times before it listened; it said: {said:?}")
    }

    /// chromedriver and its port, or what it printed before it exited.
    async fn start_driver() -> anyhow::Result<Result<(Child, u16), Vec<String>>> {
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            // A group of its own, with the Chromium it starts: dropping the browser ends them all.
            .process_group(0)
            .spawn()
            .context("starting chromedriver (Debian chromium-driver; run ops/install-build-deps)")?;
        let stdout = driver.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut said = Vec::new();
        let port = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return Ok(Some(rest.trim_end_matches('.').trim().parse::<u16>()?));
                }
                said.push(line);
            }
            anyhow::Ok(None)
        })
        .await
        .context("chromedriver did not start")??;
        let Some(port) = port else { return Ok(Err(said)) };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Ok((driver, port)))
    }

    /// A headless Chromium session on the chromedriver at `port`.
    async fn open(driver: Child, port: u16) -> anyhow::Result<Browser> {
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000", "--lang=en-US"]
        }}}});
        let reply: Value = http.post(format!("{base}/session")).json(&caps).send().await?.json().await?;
        let session = reply["value"]["sessionId"].as_str().ok_or_else(|| anyhow!("no session: {reply}"))?.to_owned();
        Ok(Browser { _driver: driver, http, session, base })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let reply: Value = req.send().await?.json().await?;
        if let Some(err) = reply["value"].get("error") {
            bail!("webdriver {path}: {err} {}", reply["value"]["message"]);
        }
        Ok(reply["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await.map(drop)
    }

    pub async fn url(&self) -> anyhow::Result<String> {
        Ok(self.call(reqwest::Method::GET, "/url", None).await?.as_str().unwrap_or_default().to_owned())
    }

    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        let v = self.call(reqwest::Method::POST, "/element", Some(json!({"using": "css selector", "value": css}))).await?;
        Ok(Element(v[ELEMENT_KEY].as_str().ok_or_else(|| anyhow!("no element {css}: {v}"))?.to_owned()))
    }

    /// Waits for an element the page's script or a navigation brings.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> anyhow::Result<Element> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.find(css).await {
                Ok(e) => return Ok(e),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e.context(format!("waiting for {css}"))),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Waits until the element's text is non-empty and returns it.
    pub async fn wait_text(&self, css: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(e) = self.find(css).await {
                let t = self.text(&e).await?;
                if !t.trim().is_empty() {
                    return Ok(t);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{css} stayed empty for {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn wait_url(&self, contains: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let u = self.url().await?;
            if u.contains(contains) {
                return Ok(u);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("still at {u}, waiting for {contains}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.call(reqwest::Method::POST, &format!("/element/{}/clear", e.0), Some(json!({}))).await?;
        self.call(reqwest::Method::POST, &format!("/element/{}/value", e.0), Some(json!({ "text": text }))).await.map(drop)
    }

    pub async fn click(&self, css: &str) -> anyhow::Result<()> {
        let e = self.find(css).await?;
        self.call(reqwest::Method::POST, &format!("/element/{}/click", e.0), Some(json!({}))).await.map(drop)
    }

    pub async fn text(&self, e: &Element) -> anyhow::Result<String> {
        Ok(self.call(reqwest::Method::GET, &format!("/element/{}/text", e.0), None).await?.as_str().unwrap_or_default().to_owned())
    }

    /// Chooses the `<option>` with `value` in the `<select>` at `css`.
    pub async fn select(&self, css: &str, value: &str) -> anyhow::Result<()> {
        self.click(&format!("{css} option[value=\"{value}\"]")).await
    }

    pub async fn execute(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({"script": script, "args": args}))).await
    }

    /// Chromium's network emulation (a chromedriver extension): every request of the session
    /// sends and receives at most `bytes_per_second`, so a test can act while an upload is under
    /// way; `None` lifts the limit.
    pub async fn throttle(&self, bytes_per_second: Option<u64>) -> anyhow::Result<()> {
        match bytes_per_second {
            Some(rate) => {
                let conditions = json!({"network_conditions": {"offline": false, "latency": 0, "download_throughput": rate, "upload_throughput": rate}});
                self.call(reqwest::Method::POST, "/chromium/network_conditions", Some(conditions)).await.map(drop)
            }
            None => self.call(reqwest::Method::DELETE, "/chromium/network_conditions", None).await.map(drop),
        }
    }

    /// A mouse gesture at viewport points (CSS pixels): press at the first, move through the
    /// rest, release at the last — a drag; one point is a click. Real pointer events, as a
    /// hand on a mouse makes them.
    pub async fn mouse_path(&self, points: &[(f64, f64)]) -> anyhow::Result<()> {
        let (first, rest) = points.split_first().ok_or_else(|| anyhow!("no points"))?;
        let at = |(x, y): &(f64, f64), duration: u64| json!({"type": "pointerMove", "duration": duration, "x": x.round() as i64, "y": y.round() as i64, "origin": "viewport"});
        let mut steps = vec![at(first, 0), json!({"type": "pointerDown", "button": 0})];
        steps.extend(rest.iter().map(|p| at(p, 60)));
        steps.push(json!({"type": "pointerUp", "button": 0}));
        self.perform(json!([{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": steps}])).await
    }

    /// Types `keys` as key presses to whatever has focus: characters as themselves, WebDriver's
    /// key code points for the rest ([`key`]).
    pub async fn keys(&self, keys: &str) -> anyhow::Result<()> {
        let steps: Vec<Value> =
            keys.chars().flat_map(|c| [json!({"type": "keyDown", "value": c.to_string()}), json!({"type": "keyUp", "value": c.to_string()})]).collect();
        self.perform(json!([{"type": "key", "id": "keyboard", "actions": steps}])).await
    }

    /// `key` pressed while `modifiers` ([`key`] code points) are held: Ctrl+Z, Ctrl+Shift+Z.
    pub async fn chord(&self, modifiers: &[char], key: char) -> anyhow::Result<()> {
        let press = |kind: &str, c: char| json!({"type": kind, "value": c.to_string()});
        let mut steps: Vec<Value> = modifiers.iter().map(|m| press("keyDown", *m)).collect();
        steps.extend([press("keyDown", key), press("keyUp", key)]);
        steps.extend(modifiers.iter().rev().map(|m| press("keyUp", *m)));
        self.perform(json!([{"type": "key", "id": "keyboard", "actions": steps}])).await
    }

    async fn perform(&self, actions: Value) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/actions", Some(json!({ "actions": actions }))).await?;
        self.call(reqwest::Method::DELETE, "/actions", None).await.map(drop)
    }

    /// Closes the current tab, as a person would, after opening a blank one to go on in.
    pub async fn close_tab(&self) -> anyhow::Result<()> {
        let fresh = self.call(reqwest::Method::POST, "/window/new", Some(json!({"type": "tab"}))).await?;
        let handle = fresh["handle"].as_str().ok_or_else(|| anyhow!("no new tab: {fresh}"))?.to_owned();
        self.call(reqwest::Method::DELETE, "/window", None).await?;
        self.call(reqwest::Method::POST, "/window", Some(json!({ "handle": handle }))).await.map(drop)
    }

    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await?;
        let png = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap_or_default())?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

/// WebDriver's code points for keys without a character.
pub mod key {
    pub const ENTER: char = '\u{E007}';
    pub const ESCAPE: char = '\u{E00C}';
    pub const SHIFT: char = '\u{E008}';
    pub const CONTROL: char = '\u{E009}';
    pub const DELETE: char = '\u{E017}';
    pub const ARROW_LEFT: char = '\u{E012}';
    pub const ARROW_RIGHT: char = '\u{E014}';
}
