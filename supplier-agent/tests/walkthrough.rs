//! The README's local walk-through, as a newcomer runs it: a checkout placed where other users
//! cannot enter (under a 0700 folder, like /root or `mktemp -d`), `ops/run-local` as root, then
//! the researcher's SSH key, `lease request`, `lease access`, and
//! `ssh … 'echo $CUDA_VISIBLE_DEVICES'` with the command the broker printed, then `lease end`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use suanli_testkit::eventually;
use tokio::process::Command;

const START: Duration = Duration::from_secs(900);
const POLL: Duration = Duration::from_millis(500);

/// `ops/run-local` running in its own process group, killed (all of it) on drop, with the
/// accounts its agents recorded removed.
struct RunLocal {
    group: i32,
    checkout: PathBuf,
    output: PathBuf,
}

impl Drop for RunLocal {
    fn drop(&mut self) {
        // The whole group (broker, agents, portal, scheduler), by a system call: never
        // through kill(1), where a negative number may be read as something else.
        if let Some(group) = rustix::process::Pid::from_raw(self.group).filter(|_| self.group > 1) {
            let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
        }
        for agent in 1..=3 {
            suanli_testkit::remove_recorded_lease_accounts(&self.checkout.join(format!(".dev/agent-{agent}")));
        }
    }
}

impl RunLocal {
    fn said(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut all = self.said();
        for log in ["agent-1.log", "broker.out", "portal.log", "scheduler.log"] {
            let text = std::fs::read_to_string(self.checkout.join(".dev").join(log)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            all.push_str(&format!("\n---- {log} ----\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n")));
        }
        all
    }
}

/// The working tree, copied with its modification times (so the shared build directory is
/// reused as is), without `.git` and `.dev`.
fn place_checkout(into: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned();
    let checkout = into.join("suanli");
    std::fs::create_dir_all(&checkout).expect("checkout dir");
    let copy = format!("tar -C {} --exclude=./.git --exclude=./.dev -cf - . | tar -C {} -xpf -", shell_quote(&source), shell_quote(&checkout));
    let out = std::process::Command::new("sh").args(["-c", &copy]).output().expect("tar");
    assert!(out.status.success(), "copying the checkout: {}", String::from_utf8_lossy(&out.stderr));
    checkout
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The build directory this test was built in (`<target>/debug/deps/walkthrough-…`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    exe.ancestors().nth(3).expect("target dir").to_owned()
}

async fn broker_cli(checkout: &Path, args: &[&str]) -> String {
    let binary = target_dir().join("debug").join("suanli-broker");
    let out = Command::new(&binary).args(args).current_dir(checkout).output().await.expect("suanli-broker");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "suanli-broker {args:?}: {said}");
    said
}

/// The rest of the first line of `text` that starts with `prefix` (after indentation).
fn after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.trim_start().strip_prefix(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_walkthrough_works_from_a_checkout_other_users_cannot_enter() {
    if !suanli_testkit::require_root("ops/run-local's SSH gateways (lease accounts)") {
        return;
    }
    let private = tempfile::TempDir::new().expect("dir");
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let checkout = place_checkout(private.path());
    // run-local runs the binaries this test's build directory already holds (`.ci/run` builds
    // the workspace before the tests): building from the copy would overwrite the other test
    // binaries there with ones compiled against the copy's paths, which go with it.
    for binary in ["suanli-broker", "suanli-agent", "suanli-portal", "suanli-scheduler", "suanli"] {
        let path = target_dir().join("debug").join(binary);
        assert!(path.is_file(), "{} is missing: build the workspace first (cargo build --workspace --all-targets, as .ci/run does)", path.display());
    }
    let output = private.path().join("run-local.out");
    let log = std::fs::File::create(&output).expect("output");
    let mut command = Command::new("bash");
    command
        .arg("ops/run-local")
        .arg("--fresh")
        .current_dir(&checkout)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("SUANLI_SKIP_BUILD", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0);
    let child = command.spawn().expect("ops/run-local");
    let run = RunLocal { group: child.id().map_or(0, |p| p as i32), checkout: checkout.clone(), output };

    // (a) The marketplace comes up: three agents enrolled, each listed as a Class B cluster.
    let clusters: Vec<String> = eventually(START, POLL, || async {
        let said = run.said();
        let clusters: Vec<String> = said.lines().filter_map(|l| l.split_once("listed as Class B cluster ")).map(|(_, c)| c.trim().to_owned()).collect();
        (clusters.len() == 3 && said.contains("scheduler: submit jobs")).then_some(clusters)
    })
    .await
    .unwrap_or_else(|e| panic!("ops/run-local starts: {e}\n{}", run.logs()));
    let said = run.said();
    let researcher = after(&said, "researcher acc-").expect("the researcher's token is printed");
    let (account, token) = researcher.split_once(": ").expect("acc-N: token");

    // The researcher's key, a lease of one card on agent 1's cluster, its access details.
    let key = private.path().join("id_ed25519");
    let out = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", ""]).arg("-f").arg(&key).output().await.expect("ssh-keygen");
    assert!(out.status.success());
    let public = format!("{}.pub", key.display());
    broker_cli(&checkout, &["ssh-key", "--token", token, "--account", account, "--public-key", &public]).await;
    let requested = broker_cli(&checkout, &["lease", "--token", token, "request", "--cluster", &clusters[0], "--cards", "1"]).await;
    let lease = after(&requested, "lease ").and_then(|l| l.split_whitespace().next()).expect("the lease's ID").to_owned();
    assert!(requested.contains("is active"), "{requested}");
    let known_hosts = private.path().join("known_hosts");
    let access = broker_cli(&checkout, &["lease", "--token", token, "access", &lease, "--known-hosts", &known_hosts.display().to_string()]).await;
    let ssh_command = access.lines().find_map(|l| l.split_once(": ssh ").map(|(_, c)| c.to_owned())).expect("an ssh command");
    // "-p PORT LOGIN@HOST"
    let words: Vec<&str> = ssh_command.split_whitespace().collect();
    let (port, target) = (words[1], words[2]);
    let login = target.split('@').next().expect("login").to_owned();

    // (b) The researcher logs in with the printed command and sees exactly the leased card.
    let out = Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-i")
        .arg(&key)
        .args(["-p", port, target, "echo $CUDA_VISIBLE_DEVICES; id -un"])
        .output()
        .await
        .expect("ssh");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "ssh: {text}{}\n{}", String::from_utf8_lossy(&out.stderr), run.logs());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].parse::<u32>().is_ok(), "one card index: {text}");
    assert_eq!(lines[1], login);

    // The lease ends: the account goes.
    broker_cli(&checkout, &["lease", "--token", token, "end", &lease]).await;
    eventually(Duration::from_secs(30), POLL, || {
        let login = login.clone();
        async move { (!Command::new("getent").args(["passwd", &login]).output().await.ok()?.status.success()).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("the account is removed: {e}\n{}", run.logs()));
    drop(run);
    let homes = Path::new("/home/suanli-dev");
    if homes.is_dir() {
        for entry in std::fs::read_dir(homes).expect("homes").flatten() {
            let _ = std::fs::remove_dir(entry.path());
        }
        let _ = std::fs::remove_dir(homes);
    }
}
