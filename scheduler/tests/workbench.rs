//! The researcher's workbench against a running marketplace (broker, scheduler, agents with
//! simulated GPUs, the portal) and the `suanli` binary:
//! - jobs you can watch: a job's output reaches the researcher while it runs, through the
//!   broker (`ReadJobLog`), the portal (`/api/v1/jobs/{id}/log`, `/curves`) and `suanli job
//!   logs --follow`; it is whole once the job has ended; nobody else reads or writes it;
//! - `suanli ssh`: the real OpenSSH client on a lease's node with a certificate for the CLI's
//!   own key and the node's host key checked;
//! - a researcher's day on real pictures (data in, a classifier trained and followed, the model
//!   registered, pulled and promoted) from the terminal, and the same through the portal's
//!   pages in headless Chromium.

mod support;

use std::process::Stdio;

use suanli_proto::v1::{self, job_service_client::JobServiceClient, AccountKind};
use suanli_testkit::cluster::PLATFORM_TOKEN;
use suanli_testkit::fixtures::register;
use suanli_testkit::portal::{researcher_portal, PortalProcess};
use suanli_testkit::workspace_binary;
use suanli_types::ErrorCode;
use support::{signed_in_browser, wait_done, Jobs, World, WAIT};
use tokio::io::AsyncBufReadExt;

/// What the gated job prints before the gate opens, and after.
fn before_gate() -> String {
    "loading data\n{\"event\": \"step\", \"step\": 1, \"loss\": 2.5}\nwaiting for the gate\n".to_owned()
}

fn after_gate() -> String {
    let mut text = "{\"event\": \"step\", \"step\": 2, \"loss\": 1.25}\n".to_owned();
    for i in 0..2000 {
        text.push_str(&format!("line {i} of what the job prints 步骤\n"));
    }
    text.push_str("{\"event\": \"epoch\", \"epoch\": 1, \"val_accuracy\": 0.875}\n");
    text
}

/// A job of `cards` cards (on as many nodes, one card each) that prints [`before_gate`], waits until the file
/// `gate` exists, then prints [`after_gate`] (partly on standard error) and succeeds. Rank 0
/// (the node of its first card) speaks for its output.
fn gated_job(gate: &std::path::Path, cards: u32) -> serde_json::Value {
    let script = format!(
        r#"echo "loading data"
echo '{{"event": "step", "step": 1, "loss": 2.5}}'
echo "waiting for the gate"
while [ ! -e {gate} ]; do sleep 0.1; done
echo '{{"event": "step", "step": 2, "loss": 1.25}}' >&2
i=0
while [ $i -lt 2000 ]; do echo "line $i of what the job prints 步骤"; i=$((i + 1)); done
echo '{{"event": "epoch", "epoch": 1, "val_accuracy": 0.875}}'
echo "weights of the watched job" > "$SUANLI_OUTPUT_DIR/model.txt""#,
        gate = gate.display()
    );
    serde_json::json!({
        "name": "watched", "kind": "training",
        "resources": { "cards": cards },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "outputs": ["model.txt"],
        "max_attempts": 1,
    })
}

fn read(job: u64, from: u64, wait_ms: u32) -> v1::ReadJobLogRequest {
    v1::ReadJobLogRequest { job_id: job, attempt: 0, from_offset: from, max_bytes: 0, wait_ms }
}

/// Reads the job's output on from `start` + what `text` holds until `done` says it has enough
/// (or the attempt ended).
async fn read_until(jobs: &mut Jobs, job: u64, start: u64, mut text: Vec<u8>, done: impl Fn(&str, bool) -> bool) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let at = start + text.len() as u64;
        let piece = jobs.read_job_log(read(job, at, 2_000)).await.expect("read the log").into_inner();
        assert_eq!(piece.from_offset, at, "nothing of it was dropped");
        text.extend_from_slice(&piece.data);
        if done(&String::from_utf8_lossy(&text), piece.ended) || piece.ended {
            return (text, piece.ended);
        }
        assert!(tokio::time::Instant::now() < deadline, "the output did not come: {}", String::from_utf8_lossy(&text));
    }
}

/// The world's researcher at a portal that reaches the artifact store, with an API token, and
/// `suanli` logged in there with it (its configuration in the world's `cli` folder).
async fn workbench(w: &World) -> (PortalProcess, String, impl Fn() -> tokio::process::Command) {
    let broker_url = format!("http://{}", w.broker.address(1).expect("address"));
    let researcher = (w.researcher_id, w.researcher_token.as_str());
    let more = ["--artifacts-url", w.artifacts.as_str()];
    let (portal, token) =
        researcher_portal(w.dir.path(), &broker_url, PLATFORM_TOKEN, researcher, suanli_portal::demo::DEMO_PASSWORD, &more).await.expect("portal");
    let (config, for_cli) = (w.dir.path().join("cli"), token.clone());
    let suanli = move || {
        let mut c = tokio::process::Command::new(workspace_binary("suanli-cli", "suanli").expect("suanli"));
        c.env("SUANLI_CONFIG_DIR", &config).env("SUANLI_TOKEN", &for_cli).kill_on_drop(true);
        c
    };
    let login = suanli().args(["login", "--portal", &portal.url]).output().await.expect("login");
    assert!(login.status.success(), "{}", String::from_utf8_lossy(&login.stderr));
    (portal, token, suanli)
}

#[tokio::test]
async fn a_jobs_output_is_watched_live_from_the_terminal_and_is_whole_when_it_ends() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(2, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let gate = w.record.with_file_name("gate");
    let job = w.submit(&mut jobs, "watched", &gated_job(&gate, 2)).await.job_id;

    // The researcher's terminal follows it from the start, through the portal.
    let (portal, token, suanli) = workbench(&w).await;
    let mut follow = suanli().args(["job", "logs", &job.to_string(), "--follow"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("follow");
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.expect("a line") {
            seen.push_str(&line);
            seen.push('\n');
            if line == "waiting for the gate" {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the terminal saw the job's first lines: {seen:?}\n{}", w.logs()));
    assert_eq!(seen, before_gate(), "the terminal shows the output as the job wrote it, while it runs");

    // The broker has it too, and the job is still running: this is the live output.
    let (held, ended) = read_until(&mut jobs, job, 0, Vec::new(), |t, _| t.contains("waiting for the gate")).await;
    assert!(!ended, "the job waits for the gate");
    assert_eq!(held, before_gate().into_bytes());
    let running = jobs.get_job(v1::GetJobRequest { job_id: job }).await.expect("job").into_inner();
    assert_eq!(running.state, "running");

    // Nobody else reads it, and nobody but the node running it writes it; nothing changes.
    let mut platform = w.broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let (_, other_token) = register(&mut platform, AccountKind::Researcher, "another-researcher").await.expect("another researcher");
    let refused = w.jobs(&other_token).await.read_job_log(read(job, 0, 0)).await.expect_err("another researcher reads it");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let forged =
        v1::AppendJobLogRequest { job_id: job, attempt: 1, offset: held.len() as u64, data: b"forged by the researcher\n".to_vec(), start_here: false };
    let refused = jobs.append_job_log(forged.clone()).await.expect_err("the researcher writes it");
    assert_eq!(suanli_proto::decode_status(&refused).code, ErrorCode::PermissionDenied, "{refused:?}");
    // The other node runs the job too (rank 1), but only rank 0's agent writes its output.
    let (node, rank_one) = (running.attempts[0].node_ids[0], running.attempts[0].node_ids[1]);
    assert_ne!(node, rank_one, "a job of two nodes: {:?}", running.attempts[0]);
    let other = w.agents.iter().position(|a| a.node == rank_one).expect("rank 1's agent");
    let state = w.dir.path().join(format!("agent{other}")).join("state");
    let (cert, key) = (std::fs::read_to_string(state.join("agent.crt")).expect("cert"), std::fs::read_to_string(state.join("agent.key")).expect("key"));
    let mut as_other_agent = JobServiceClient::new(w.broker.agent_channel(1, Some((&cert, &key))).await.expect("agent channel"));
    let refused = as_other_agent.append_job_log(forged).await.expect_err("rank 1's agent writes it");
    assert_eq!(suanli_proto::decode_status(&refused).code, ErrorCode::PermissionDenied, "{refused:?}");
    let unchanged = jobs.read_job_log(read(job, 0, 0)).await.expect("read").into_inner();
    assert_eq!(unchanged.data, held, "nothing was added");

    // The gate opens: the terminal prints the rest and exits as the job succeeded.
    std::fs::write(&gate, b"open").expect("open the gate");
    let rest = tokio::time::timeout(WAIT, async {
        let mut rest = String::new();
        while let Some(line) = lines.next_line().await.expect("a line") {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    })
    .await
    .unwrap_or_else(|_| panic!("the terminal saw the job end\n{}", w.logs()));
    let status = follow.wait().await.expect("suanli exits");
    assert!(status.success(), "the job succeeded, so does its follower");
    let whole = format!("{}{}", before_gate(), after_gate());
    assert_eq!(format!("{seen}{rest}"), whole, "the terminal showed every byte once, in order");
    let (held, ended) = read_until(&mut jobs, job, 0, held, |_, ended| ended).await;
    assert!(ended);
    assert_eq!(String::from_utf8(held).expect("UTF-8"), whole, "the platform holds all of it");
    assert_eq!(wait_done(&mut jobs, 1, WAIT).await[0].state, "succeeded");

    // Read again afterwards, without following; and its curves.
    let again = suanli().args(["job", "logs", &job.to_string()]).output().await.expect("logs");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(String::from_utf8_lossy(&again.stdout), whole);
    let curves: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/api/v1/jobs/{job}/curves", portal.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("curves")
        .json()
        .await
        .expect("JSON");
    assert_eq!(curves["series"]["loss"], serde_json::json!([[1.0, 2.5], [2.0, 1.25]]), "{curves}");
    assert_eq!(curves["series"]["val_accuracy"], serde_json::json!([[2.0, 0.875]]), "{curves}");

    // The job's page in a signed-in browser session: its output followed, its files linked.
    let session = suanli_testkit::portal::log_in(&portal.url, "demo-researcher", suanli_portal::demo::DEMO_PASSWORD).await.expect("signed in");
    let page = session.http.get(format!("{}/jobs/{job}", portal.url)).send().await.expect("job page");
    assert_eq!(page.status(), reqwest::StatusCode::OK);
    let html = page.text().await.expect("html");
    assert!(html.contains(&format!("data-job-log=\"/api/v1/jobs/{job}/log\"")), "{html}");
    assert!(html.contains(&format!("href=\"/api/v1/jobs/{job}/outputs/model.txt\"")) && html.contains("data-curve=\"loss\""), "{html}");

    // Models out: the file the job left, checked against the hash it was recorded with.
    let pulled = w.dir.path().join("pulled");
    let pull = suanli().args(["job", "pull", &job.to_string(), "--dir", &pulled.display().to_string()]).output().await.expect("pull");
    assert!(pull.status.success(), "{}", String::from_utf8_lossy(&pull.stderr));
    assert_eq!(std::fs::read_to_string(pulled.join("model.txt")).expect("model"), "weights of the watched job\n");

    // A stored copy that changed on disk never reaches the researcher's folder.
    let done = jobs.get_job(v1::GetJobRequest { job_id: job }).await.expect("job").into_inner();
    let sha = done.outputs.get("model.txt").expect("recorded");
    let stored = w.dir.path().join("artifacts").join(&sha[..2]).join(sha);
    let mut bytes = std::fs::read(&stored).expect("the stored copy");
    bytes[0] ^= 0x20;
    std::fs::write(&stored, &bytes).expect("change it");
    let again = w.dir.path().join("pulled-again");
    let pull = suanli().args(["job", "pull", &job.to_string(), "--dir", &again.display().to_string()]).output().await.expect("pull");
    assert!(!pull.status.success(), "a changed artifact is refused");
    let left: Vec<_> = std::fs::read_dir(&again).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "nothing kept: {left:?}");

    // Again, with a change, followed from the terminal (the gate is open now).
    let again = suanli().args(["job", "resubmit", &job.to_string(), "--set", "name=watched-again", "--follow"]).output().await.expect("resubmit");
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(said.starts_with("job ") && said.contains(&format!("(job {job} with 1 change)\n")), "{said}");
    assert!(said.ends_with(&whole), "the second run's output, whole: {said}");
    let resubmitted = jobs.list_jobs(v1::ListJobsRequest::default()).await.expect("jobs").into_inner().jobs;
    let second = resubmitted.iter().find(|j| j.name == "watched-again").expect("the resubmitted job");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&second.spec_json).expect("spec")["resources"]["cards"], 2, "the rest of the spec is the first run's");

    // Another researcher gets no capability for these outputs.
    let refused = w.jobs(&other_token).await.grant_job_outputs(v1::GetJobRequest { job_id: job }).await.expect_err("another researcher's grant");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
}

#[tokio::test]
async fn output_faster_than_it_can_be_sent_keeps_its_last_bytes_in_order() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(1, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    // About 10 MiB at once: more than the 4 MiB the broker keeps of an attempt.
    let script = r#"i=0; while [ $i -lt 40 ]; do head -c 262144 /dev/zero | tr '\0' 'x'; echo " block $i"; i=$((i + 1)); done; echo "the end""#;
    let spec = serde_json::json!({
        "name": "chatty", "kind": "training",
        "resources": { "cards": 1 },
        "run": { "command": { "program": "/bin/sh", "args": ["-c", script] } },
        "max_attempts": 1,
    });
    let job = w.submit(&mut jobs, "chatty", &spec).await.job_id;
    assert_eq!(wait_done(&mut jobs, 1, WAIT).await[0].state, "succeeded");
    let first = jobs.read_job_log(read(job, 0, 0)).await.expect("read").into_inner();
    assert!(first.from_offset > 0 && first.from_offset == first.retained_from, "the start is no longer held: {}", first.from_offset);
    let (tail, ended) = read_until(&mut jobs, job, first.from_offset, Vec::new(), |_, ended| ended).await;
    assert!(ended);
    let whole_len = 40 * 262_144 + 10 * " block N\n".len() + 30 * " block NN\n".len() + "the end\n".len();
    assert_eq!(first.from_offset as usize + tail.len(), whole_len, "held up to the very end");
    assert!(tail.len() <= 4 << 20, "at most 4 MiB held: {}", tail.len());
    let text = String::from_utf8(tail).expect("text");
    assert!(text.ends_with(" block 39\nthe end\n"), "{}", &text[text.len() - 40..]);
    let blocks: Vec<u32> = text.lines().filter_map(|l| l.rsplit_once(" block ")).map(|(_, n)| n.parse().expect("block")).collect();
    assert!(blocks.windows(2).all(|w| w[1] == w[0] + 1), "every block once, in order: {blocks:?}");
}

#[tokio::test]
async fn suanli_ssh_runs_a_command_on_the_leases_node_with_a_certificate_and_a_checked_host_key() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(1, 1, 1).await;
    let (_portal, _token, suanli) = workbench(&w).await;
    let config = w.dir.path().join("cli");
    let lease = w.leases[0].to_string();
    let ran = suanli().args(["ssh", &lease, "--", "id", "-un"]).output().await.expect("suanli ssh");
    assert!(ran.status.success(), "{}\n{}", String::from_utf8_lossy(&ran.stderr), w.logs());
    let login = String::from_utf8_lossy(&ran.stdout).trim().to_owned();
    assert!(login.starts_with(&w.agents[0].prefix), "ran as the lease's account: {login:?}");
    let known_hosts = config.join("ssh/known_hosts");
    assert_eq!(std::fs::read_to_string(&known_hosts).expect("known_hosts").lines().count(), 1, "the node's host key, once");
    let certificate = std::fs::read_to_string(config.join(format!("ssh/lease-{lease}-cert.pub"))).expect("certificate");
    assert!(certificate.starts_with("ssh-ed25519-cert-v01@openssh.com "), "{certificate}");

    // The exit status is the command's; the key is kept, the host line not doubled.
    let key = std::fs::read(config.join("ssh/id_ed25519")).expect("key");
    let failed = suanli().args(["ssh", &lease, "--", "exit", "3"]).output().await.expect("suanli ssh");
    assert_eq!(failed.status.code(), Some(3), "{}", String::from_utf8_lossy(&failed.stderr));
    assert_eq!(std::fs::read(config.join("ssh/id_ed25519")).expect("key"), key, "the same key");
    assert_eq!(std::fs::read_to_string(&known_hosts).expect("known_hosts").lines().count(), 1);

    // A lease that is not the researcher's (here: none): refused by the portal before ssh runs.
    let before = std::fs::read_to_string(&known_hosts).expect("known_hosts");
    let absent = suanli().args(["ssh", "999999", "--", "true"]).output().await.expect("suanli ssh");
    assert!(!absent.status.success());
    assert!(String::from_utf8_lossy(&absent.stderr).contains("NOT_FOUND"), "{}", String::from_utf8_lossy(&absent.stderr));
    assert_eq!(std::fs::read_to_string(&known_hosts).expect("known_hosts"), before, "nothing written for it");
}

/// The job page in headless Chromium: the output appears while the job runs, then the rest,
/// whole; the curves are drawn as the job reports them.
#[tokio::test]
async fn the_job_page_follows_a_running_job_in_the_browser() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(1, 1, 1).await;
    let mut jobs = w.jobs(&w.researcher_token).await;
    let gate = w.record.with_file_name("page-gate");
    let job = w.submit(&mut jobs, "watched-in-a-browser", &gated_job(&gate, 1)).await.job_id;
    let (portal, _token, _suanli) = workbench(&w).await;
    let browser = signed_in_browser(&portal.url).await;
    browser.goto(&format!("{}/jobs/{job}", portal.url)).await.expect("the job page");

    let shown = || async { browser.execute("return document.querySelector('pre[data-job-log]').textContent", serde_json::json!([])).await.ok() };
    let until = |want: String| {
        let shown = &shown;
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let text = shown().await.and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
                if text.contains(&want) || tokio::time::Instant::now() >= deadline {
                    return text;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    let first = until("waiting for the gate".to_owned()).await;
    assert_eq!(first, before_gate(), "the page shows the output while the job runs\n{}", w.logs());
    assert_eq!(jobs.get_job(v1::GetJobRequest { job_id: job }).await.expect("job").into_inner().state, "running");

    std::fs::write(&gate, b"open").expect("open the gate");
    let whole = format!("{}{}", before_gate(), after_gate());
    let last_line = "val_accuracy\": 0.875}";
    let all = until(last_line.to_owned()).await;
    assert_eq!(all, whole, "every byte once, in order");
    browser.wait_for("figure[data-curve=\"val_accuracy\"]", WAIT).await.expect("the accuracy curve is drawn");
    let points = browser
        .execute("return document.querySelector('figure[data-curve=\"loss\"] polyline').getAttribute('points')", serde_json::json!([]))
        .await
        .expect("the loss curve");
    assert_eq!(points.as_str().map(|p| p.split_whitespace().count()), Some(2), "two loss points: {points}");

    // Resubmit with a change: the page holds the spec; the new job is the changed one.
    browser.click("details.resubmit summary").await.expect("open the resubmit form");
    let edited = browser
        .execute(
            "const t = document.querySelector('details.resubmit textarea[name=spec]'); const spec = JSON.parse(t.value); spec.name = 'watched-again'; t.value = JSON.stringify(spec); return spec.run;",
            serde_json::json!([]),
        )
        .await
        .expect("edit the spec");
    assert_eq!(edited["command"]["program"], "/bin/sh", "the form holds the job's own spec: {edited}");
    browser.click("details.resubmit button[type=submit]").await.expect("resubmit");
    let this_page = format!("/jobs/{job}");
    let url = suanli_testkit::eventually(WAIT, std::time::Duration::from_millis(100), || {
        let (browser, this_page) = (&browser, &this_page);
        async move { browser.url().await.ok().filter(|u| u.contains("/jobs/") && !u.ends_with(this_page.as_str())) }
    })
    .await
    .expect("the new job's page");
    let again: u64 = url.rsplit('/').next().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("a job's page: {url}"));
    assert_ne!(again, job, "a new job");
    let resubmitted = jobs.get_job(v1::GetJobRequest { job_id: again }).await.expect("job").into_inner();
    assert_eq!(resubmitted.name, "watched-again", "with the change");
}

/// The day's job: a small classifier trained for four epochs on version 1 of the researcher's
/// `digits` dataset (given to the job as `digits.tar`).
const DIGITS_SPEC: &str = r#"name: digits-from-dataset
kind: training
resources: { cards: 1 }
inputs:
  - { name: digits.tar, dataset: "digits@1" }
run:
  builtin:
    task: train_classifier
    params:
      data: digits.tar
      training.model: '{"arch": "small_cnn", "width": 16}'
      training.optimizer: '{"kind": "adam", "lr": 0.003}'
      training.epochs: "4"
      training.batch_size: "64"
outputs: [model.safetensors, model.json, metrics.json]
max_attempts: 1
"#;

/// How long the day's training may take.
const TRAINING: std::time::Duration = std::time::Duration::from_secs(420);

/// A researcher's whole day from the terminal, on real pictures: push a folder (a corrupt file
/// in it is named with its reason; the rest imports), train a classifier on the dataset
/// version through `job submit --follow`, see its output and its accuracy curve, register the
/// model it made with its lineage, pull it (checked against its SHA-256) and promote it.
#[tokio::test]
async fn a_researchers_day_push_train_follow_pull_promote() {
    let Some(data) = support::cv_data() else { return };
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(1, 2, 1).await;
    let (portal, token, suanli) = workbench(&w).await;
    let text = |o: &std::process::Output| format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));

    // The digits of the CV test data, with one picture cut in half among them.
    let folder = w.dir.path().join("digits");
    copy_tree(&data.join("digits/images"), &folder);
    let whole = std::fs::read(folder.join("3").join(first_file(&folder.join("3")))).expect("a picture");
    std::fs::write(folder.join("3/cut.png"), &whole[..whole.len() / 2]).expect("cut");
    let pushed =
        suanli().args(["data", "push", &folder.display().to_string(), "--to", "digits", "--create", "-m", "the UCI digits"]).output().await.expect("push");
    let said = text(&pushed);
    assert!(pushed.status.success(), "{said}");
    assert!(said.contains("3/cut.png"), "the cut picture is named: {said}");
    let listed = suanli().args(["data", "ls", "digits", "--json"]).output().await.expect("ls");
    assert!(listed.status.success(), "{}", text(&listed));

    // Train on version 1 through the job spec's dataset input, following it to the end.
    let spec = w.dir.path().join("train.yaml");
    std::fs::write(&spec, DIGITS_SPEC).expect("spec");
    let trained = tokio::time::timeout(TRAINING, suanli().args(["job", "submit", &spec.display().to_string(), "--follow"]).output())
        .await
        .expect("the job ends in time")
        .expect("submit");
    let said = text(&trained);
    assert!(trained.status.success(), "{said}\n{}", w.logs());
    assert!(said.contains("\"event\":\"epoch\"") || said.contains("\"event\": \"epoch\""), "the job's output was followed: {said}");
    let job: u64 = said.split("job ").nth(1).and_then(|s| s.split_whitespace().next()).and_then(|s| s.parse().ok()).expect("the job's ID");

    let http = reqwest::Client::new();
    let curves: serde_json::Value =
        http.get(format!("{}/api/v1/jobs/{job}/curves", portal.url)).bearer_auth(&token).send().await.expect("curves").json().await.expect("json");
    let accuracy = curves["series"]["val_accuracy"].as_array().cloned().unwrap_or_default();
    assert_eq!(accuracy.len(), 4, "one accuracy point per epoch: {curves}");

    // The model, with where it came from.
    let registered =
        suanli().args(["model", "register", "digits-cls", "--job", &job.to_string(), "--output", "model.safetensors"]).output().await.expect("register");
    assert!(registered.status.success(), "{}", text(&registered));
    let model: serde_json::Value =
        http.get(format!("{}/api/v1/models/digits-cls", portal.url)).bearer_auth(&token).send().await.expect("model").json().await.expect("json");
    let v1 = &model["versions"][0];
    assert_eq!(v1["dataset"], "demo-researcher/digits@1", "{model}");
    assert_eq!(v1["job_id"], job, "{model}");
    let accuracy = v1["metrics"]["accuracy"].as_f64().unwrap_or_default();
    assert!(accuracy > 0.8, "the classifier learned the digits: {model}");

    let pulled = w.dir.path().join("digits.safetensors");
    let pull = suanli().args(["model", "pull", "digits-cls", "-o", &pulled.display().to_string()]).output().await.expect("pull");
    assert!(pull.status.success(), "{}", text(&pull));
    let bytes = std::fs::read(&pulled).expect("the model file");
    assert_eq!(suanli_artifacts::Digest::of(&bytes).to_hex(), v1["sha256"].as_str().unwrap_or_default(), "the bytes the job left");

    let promoted = suanli().args(["model", "promote", "digits-cls", "1"]).output().await.expect("promote");
    assert!(promoted.status.success(), "{}", text(&promoted));
    let models: serde_json::Value =
        http.get(format!("{}/api/v1/models", portal.url)).bearer_auth(&token).send().await.expect("models").json().await.expect("json");
    assert_eq!(models[0]["serving"], 1, "{models}");
}

/// The same day in headless Chromium, through the portal's pages alone: the digits go up as
/// an archive through the dataset page's uploader (the cut picture in it is named with its
/// reason), the job goes in through the jobs page's form and is followed on its page (its
/// output, its accuracy curve, then its state and its files), the model is registered from the
/// job's page, the model's page says where it came from and what it scored, its download is
/// the bytes the job left, and its promote button makes it serve.
#[tokio::test]
async fn a_researchers_day_in_the_browser() {
    let Some(data) = support::cv_data() else { return };
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let w = World::start(1, 2, 1).await;
    let (portal, token, _suanli) = workbench(&w).await;
    let url = portal.url.as_str();

    // The digits with one picture cut in half among them, packed as a .tar: more files than
    // the page sends one by one.
    let folder = w.dir.path().join("to-upload").join("digits");
    copy_tree(&data.join("digits/images"), &folder);
    let whole = std::fs::read(folder.join("3").join(first_file(&folder.join("3")))).expect("a picture");
    std::fs::write(folder.join("3/cut.png"), &whole[..whole.len() / 2]).expect("cut");
    let pictures = count_files(&folder);
    let archive = w.dir.path().join("digits.tar");
    let packed = std::process::Command::new("tar").arg("-cf").arg(&archive).arg("-C").arg(w.dir.path().join("to-upload")).arg("digits").status().expect("tar");
    assert!(packed.success(), "tar: {packed}");

    let b = signed_in_browser(url).await;
    let text_of = |script: &'static str| {
        let b = &b;
        async move { b.execute(script, serde_json::json!([])).await.ok().and_then(|v| v.as_str().map(str::to_owned)) }
    };

    // A dataset, made on the datasets page; the archive chosen in its page's uploader.
    b.goto(&format!("{url}/datasets")).await.expect("the datasets page");
    b.type_into("form.api input[name=name]", "digits").await.expect("name");
    b.type_into("form.api textarea[name=description]", "the UCI digits").await.expect("description");
    b.click("form.api button[type=submit]").await.expect("create");
    b.wait_url("/datasets/", WAIT).await.expect("the dataset's page");
    b.wait_for("section.upload", WAIT).await.expect("the uploader");
    b.type_into("section.upload input[name=files]", &archive.display().to_string()).await.expect("choose the archive");
    b.type_into("section.upload input[name=message]", "the UCI digits").await.expect("message");
    b.click("button[data-upload=start]").await.expect("upload");
    if let Err(e) = b.wait_for("output.upload-result[data-version]", 2 * WAIT).await {
        let problem = text_of("return document.querySelector('section.upload .form-error').textContent").await;
        let rows = text_of("return [...document.querySelectorAll('tr.upload-file')].map(r => r.dataset.name + ' ' + r.dataset.state + ' ' + (r.dataset.error || '')).join('\\n')").await;
        panic!("no version from the upload: {e:#}; {problem:?}; rows {rows:?}\n{}", w.logs());
    }
    let said = b
        .execute(
            "const o = document.querySelector('output.upload-result'); return {version: Number(o.dataset.version), items: Number(o.dataset.items), \
             rejected: [...o.querySelectorAll('li[data-name]')].map(li => [li.dataset.name, li.textContent])}",
            serde_json::json!([]),
        )
        .await
        .expect("what the upload made");
    let items = said["items"].as_u64().unwrap_or_default() as usize;
    assert!(said["version"] == 1 && items < pictures && items >= pictures * 9 / 10, "version 1 with the good pictures of {pictures}: {said}");
    let rejected = said["rejected"].as_array().cloned().unwrap_or_default();
    assert!(
        rejected.len() == 1 && rejected[0][0] == "3/cut.png" && rejected[0][1].as_str().is_some_and(|t| t.len() > "3/cut.png — ".len()),
        "the cut picture with its reason: {rejected:?}"
    );
    // The page's own sections, read again: the rejected file with its reason, ten labels.
    let reason = b.wait_text("table.rejected tr[data-name='3/cut.png'] td.reason", WAIT).await.expect("the cut picture's reason on the page");
    assert!(!reason.trim().is_empty(), "{reason}");
    let labels = b.execute("return document.querySelectorAll('table.labels tr[data-label]').length", serde_json::json!([])).await.expect("labels");
    assert_eq!(labels, 10, "a label for each digit");

    // The job, submitted with the jobs page's form, which names the version it may use.
    b.goto(&format!("{url}/jobs")).await.expect("the jobs page");
    b.wait_for("ul.dataset-refs li[data-dataset-ref='digits@1']", WAIT).await.expect("the form names digits@1");
    let form = "form.api[data-api='/api/v1/jobs']";
    b.type_into(&format!("{form} textarea[name=spec]"), DIGITS_SPEC).await.expect("the spec");
    b.click(&format!("{form} button[type=submit]")).await.expect("submit");
    let at = match b.wait_url("/jobs/", WAIT).await {
        Ok(at) => at,
        Err(e) => panic!("{e:#}: {:?}", text_of("return document.querySelector('form.api .form-error').textContent").await),
    };
    let job: u64 = at.rsplit('/').next().and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("a job's page: {at}"));

    // Its page: the output as the job writes it, the accuracy curve, then its state and files.
    let log = "return document.querySelector('pre[data-job-log]').textContent";
    let epochs = suanli_testkit::eventually(TRAINING, std::time::Duration::from_millis(250), || async {
        text_of(log).await.filter(|t| t.contains("\"event\":\"epoch\"") || t.contains("\"event\": \"epoch\""))
    })
    .await;
    assert!(epochs.is_ok(), "the page shows the job's output: {:?}\n{}", text_of(log).await, w.logs());
    let state = suanli_testkit::eventually(TRAINING, std::time::Duration::from_millis(250), || async {
        text_of("return document.querySelector('span.state').dataset.state").await.filter(|s| !["queued", "placed", "running"].contains(&s.as_str()))
    })
    .await;
    assert_eq!(state.ok().as_deref(), Some("succeeded"), "the page shows the job ended: {:?}\n{}", text_of(log).await, w.logs());
    b.wait_for("figure[data-curve=\"val_accuracy\"]", WAIT).await.expect("the accuracy curve is drawn");
    let points = suanli_testkit::eventually(WAIT, std::time::Duration::from_millis(250), || async {
        let points = text_of("return document.querySelector('figure[data-curve=\"val_accuracy\"] polyline').getAttribute('points')").await?;
        (points.split_whitespace().count() == 4).then_some(())
    })
    .await;
    assert!(points.is_ok(), "one accuracy point per epoch: {:?}", text_of("return document.querySelector('section.curves').innerHTML").await);
    for name in ["model.safetensors", "model.json", "metrics.json"] {
        b.find(&format!("section.outputs li[data-output='{name}'] a[href='/api/v1/jobs/{job}/outputs/{name}'][download]"))
            .await
            .expect("a download link for each output");
    }

    // The model, registered from the job's page.
    let register = "section.outputs form.api[data-api='/api/v1/models']";
    b.type_into(&format!("{register} input[name=name]"), "digits-cls").await.expect("the model's name");
    b.select(&format!("{register} select[name=output]"), "model.safetensors").await.expect("the model's file");
    b.click(&format!("{register} button[type=submit]")).await.expect("register");
    if let Err(e) = b.wait_url("/models/digits-cls", WAIT).await {
        panic!("{e:#}: {:?}", text_of("return document.querySelector('section.outputs .form-error').textContent").await);
    }

    // Its page: where it came from, what it scored.
    let row = "table.model-versions tr[data-version='1']";
    let dataset = b.wait_text(&format!("{row} td.dataset"), WAIT).await.expect("the dataset");
    assert_eq!(dataset.trim(), "demo-researcher/digits@1");
    b.find(&format!("{row} td.job[data-job='{job}'] a[href='/jobs/{job}']")).await.expect("the job it came from");
    let accuracy = b.wait_text(&format!("{row} li[data-metric=accuracy]"), WAIT).await.expect("its accuracy");
    let accuracy: f64 = accuracy.rsplit(':').next().and_then(|a| a.trim().parse().ok()).unwrap_or_else(|| panic!("accuracy: {accuracy}"));
    assert!(accuracy > 0.8, "the classifier learned the digits: {accuracy}");
    let http = reqwest::Client::new();
    let get = |path: String| {
        let (http, token) = (&http, &token);
        async move { http.get(format!("{url}{path}")).bearer_auth(token).send().await.expect(&path).json::<serde_json::Value>().await.expect("json") }
    };
    let model = get("/api/v1/models/digits-cls".into()).await;
    let v1 = &model["versions"][0];
    assert!(v1["job_id"] == job && v1["metrics"]["accuracy"].as_f64() == Some(accuracy), "{model}");
    let done = get(format!("/api/v1/jobs/{job}")).await;
    assert_eq!(v1["sha256"], done["outputs"]["model.safetensors"], "the version is the file the job left: {done}");

    // The page's download link gives those bytes.
    let fetched = b
        .execute(
            "return fetch(document.querySelector(arguments[0]).href, {credentials: 'same-origin'}).then(async (r) => { \
             const bytes = await r.arrayBuffer(); const digest = await crypto.subtle.digest('SHA-256', bytes); \
             return {status: r.status, length: bytes.byteLength, sha256: Array.from(new Uint8Array(digest), (x) => x.toString(16).padStart(2, '0')).join('')}; })",
            serde_json::json!([format!("{row} a[download]")]),
        )
        .await
        .expect("the download");
    assert!(fetched["status"] == 200 && fetched["length"].as_u64() > Some(0), "{fetched}");
    assert_eq!(fetched["sha256"], v1["sha256"], "the page's download is the version's bytes");

    // Promoted with its button; the API says it serves.
    b.click(&format!("{row} form.api[data-api='/api/v1/models/digits-cls/promote'] button[type=submit]")).await.expect("promote");
    let serving = suanli_testkit::eventually(WAIT, std::time::Duration::from_millis(100), || async {
        text_of("return document.querySelector('table.model-versions tr[data-serving=true]')?.dataset.version || null").await.filter(|v| v == "1")
    })
    .await;
    assert!(serving.is_ok(), "the page shows v1 serving");
    let models = get("/api/v1/models".into()).await;
    assert_eq!(models[0]["serving"], 1, "{models}");
}

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).expect("read").flatten().map(|e| if e.file_type().expect("type").is_dir() { count_files(&e.path()) } else { 1 }).sum()
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("folder");
    for entry in std::fs::read_dir(from).expect("read").flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn first_file(dir: &std::path::Path) -> std::ffi::OsString {
    let mut names: Vec<_> = std::fs::read_dir(dir).expect("read").flatten().map(|e| e.file_name()).collect();
    names.sort();
    names.remove(0)
}
