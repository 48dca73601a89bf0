//! The `suanli` binary against a running marketplace: a broker, a portal whose demo researcher
//! adopts a funded broker account, and a supplier's two clusters. The researcher makes an API
//! token in the portal, logs the CLI in, searches, leases (a retry leases once), lists and ends
//! the lease; bad queries, a bad token and a clear-text portal elsewhere are refused. A folder is
//! pushed as a dataset's version and pulled back, every file checked.

use std::path::Path;
use std::process::Output;

use serde_json::Value;
use suanli_proto::v1::AccountKind;
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::{deposit, publish, register, RESEARCHER_FUNDS};
use suanli_testkit::portal::{researcher_portal, PortalProcess};
use suanli_testkit::workspace_binary;
use suanli_types::ClusterClass;

struct Market {
    _broker: BrokerCluster,
    _portal: PortalProcess,
    url: String,
    /// The demo researcher's fresh API token.
    token: String,
    /// The Class B cluster (4 cards of one node) and the Class A one.
    class_b: u64,
    class_a: u64,
    dir: tempfile::TempDir,
}

async fn market() -> Market {
    let dir = tempfile::tempdir().expect("dir");
    let broker = BrokerCluster::start(&workspace_binary("suanli-broker", "suanli-broker").expect("broker"), 1, None).await.expect("broker");
    let mut platform = broker.client(1, PLATFORM_TOKEN).await.expect("platform");
    let (researcher, researcher_token) = register(&mut platform, AccountKind::Researcher, "researcher").await.expect("researcher");
    deposit(&mut platform, researcher, RESEARCHER_FUNDS, "funds").await.expect("deposit");
    let (supplier_id, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let mut supplier = broker.client(1, &supplier_token).await.expect("supplier");
    let class_b = publish(&mut supplier, ClusterClass::B, 1, 4, "b").await.expect("class B").cluster_id;
    let class_a = publish(&mut supplier, ClusterClass::A, 1, 8, "a").await.expect("class A").cluster_id;

    let broker_url = format!("http://{}", broker.address(1).expect("address"));
    // The supplier signs in to the portal as its demo supplier.
    let adopt_supplier = format!("{supplier_id}:{supplier_token}");
    let more = ["--demo-supplier", adopt_supplier.as_str()];
    let (portal, token) =
        researcher_portal(dir.path(), &broker_url, PLATFORM_TOKEN, (researcher, &researcher_token), suanli_portal::demo::DEMO_PASSWORD, &more)
            .await
            .expect("portal and API token");
    let http = reqwest::Client::new();
    // The catalogue copy follows the broker's events: wait until both clusters are in it.
    let url = portal.url.clone();
    suanli_testkit::eventually(std::time::Duration::from_secs(20), std::time::Duration::from_millis(100), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let page: Value = http.get(format!("{url}/api/v1/catalogue")).send().await.ok()?.json().await.ok()?;
            (page["total"].as_u64() >= Some(2)).then_some(())
        }
    })
    .await
    .expect("the portal sees both clusters");
    Market { _broker: broker, _portal: portal, url, token, class_b, class_a, dir }
}

/// Runs `suanli` with its configuration in the market's directory.
fn suanli(m: &Market, args: &[&str], env: &[(&str, &str)]) -> Output {
    run(&m.dir.path().join("config"), args, env)
}

fn run(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let binary = workspace_binary("suanli-cli", "suanli").expect("suanli");
    let mut command = std::process::Command::new(binary);
    command.args(args).env("SUANLI_CONFIG_DIR", config).env_remove("SUANLI_TOKEN");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("suanli runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "suanli failed:\n{}\n{}", stdout(&out), stderr(&out));
    stdout(&out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_researcher_logs_in_searches_leases_once_and_ends_the_lease_from_the_terminal() {
    let m = market().await;
    let said = ok(suanli(&m, &["login", "--portal", &m.url], &[("SUANLI_TOKEN", &m.token)]));
    assert!(said.contains("logged in as demo-researcher"), "{said}");
    let config = m.dir.path().join("config/config.toml");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&config).expect("config").permissions().mode() & 0o777, 0o600, "the token is the user's alone");
    assert!(ok(suanli(&m, &["whoami"], &[])).contains("demo-researcher"));

    // A typed query: Class B only, priced under 10 yuan an hour; both, then neither.
    let b_only = ok(suanli(&m, &["search", "class=B vram>=24 price<10 mode=hourly", "--sort", "price"], &[]));
    // The clusters' rows: an ID, then the class (not the header, nor the "1 of 1" line).
    let ids = |table: &str| -> Vec<String> {
        table
            .lines()
            .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                [id, "A" | "B", ..] => Some(id.to_owned()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(ids(&b_only), vec![m.class_b.to_string()], "{b_only}");
    let both = ok(suanli(&m, &["search", ""], &[]));
    assert_eq!(ids(&both).len(), 2, "{both}");
    assert!(ids(&ok(suanli(&m, &["search", "price<0.01"], &[]))).is_empty());
    let json: Value = serde_json::from_str(&ok(suanli(&m, &["search", "class=a", "--json"], &[]))).expect("JSON");
    assert_eq!(json["clusters"][0]["cluster_id"], m.class_a);

    // A mistake is shown where it is, and nothing is asked of the portal.
    let wrong = suanli(&m, &["search", "gpu=A100 vram=80"], &[]);
    assert!(!wrong.status.success());
    let message = stderr(&wrong);
    assert!(message.contains("column 14") && message.contains("              ^"), "{message}");

    // A lease, retried with the same key: one lease, the same answer.
    let key = "cli-lease-1";
    let args = ["lease", "create", &m.class_b.to_string(), "--cards", "2", "--mode", "hourly", "--periods", "1", "--request-id", key];
    let first: Value = serde_json::from_str(&ok(suanli(&m, &args, &[]))).expect("lease JSON");
    let again: Value = serde_json::from_str(&ok(suanli(&m, &args, &[]))).expect("lease JSON");
    assert_eq!(first["lease_id"], again["lease_id"]);
    let id = first["lease_id"].as_u64().expect("lease id").to_string();
    let listed = ok(suanli(&m, &["lease", "ls"], &[]));
    assert_eq!(listed.lines().filter(|l| l.split_whitespace().next() == Some(id.as_str())).count(), 1, "{listed}");
    // Refusals come back as the portal said them, fields named.
    let refused = suanli(&m, &["lease", "create", &m.class_b.to_string(), "--cards", "2", "--periods", "0"], &[]);
    assert!(!refused.status.success() && stderr(&refused).contains("periods"), "{}", stderr(&refused));
    let ended: Value = serde_json::from_str(&ok(suanli(&m, &["lease", "end", &id], &[]))).expect("ended");
    assert!(matches!(ended["state"].as_str(), Some("ended" | "cancelled")), "{ended}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_not_stored_and_a_token_never_crosses_a_network_in_the_clear() {
    let m = market().await;
    let config = m.dir.path().join("config");
    let refused = suanli(&m, &["login", "--portal", &m.url], &[("SUANLI_TOKEN", "slp_not-a-token")]);
    assert!(!refused.status.success() && stderr(&refused).contains("UNAUTHENTICATED"), "{}", stderr(&refused));
    assert!(!config.join("config.toml").exists(), "nothing stored");
    for clear_text in ["http://portal.example", "http://localhost.evil.example"] {
        let clear = run(&config, &["login", "--portal", clear_text], &[("SUANLI_TOKEN", &m.token)]);
        assert!(!clear.status.success() && stderr(&clear).contains("https://"), "{clear_text}: {}", stderr(&clear));
    }
    assert!(!config.join("config.toml").exists());
    // Not logged in: said so, with what to do.
    let out = suanli(&m, &["lease", "ls"], &[]);
    assert!(!out.status.success() && stderr(&out).contains("suanli login"), "{}", stderr(&out));
}

/// An 8×8 picture of its own colour.
fn png(shade: u8) -> Vec<u8> {
    let picture = image::RgbImage::from_pixel(8, 8, image::Rgb([shade, 128, 255 - shade]));
    let mut out = std::io::Cursor::new(Vec::new());
    picture.write_to(&mut out, image::ImageFormat::Png).expect("png");
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_folder_is_pushed_as_a_dataset_version_and_pulled_back_file_by_file() {
    let m = market().await;
    ok(suanli(&m, &["login", "--portal", &m.url], &[("SUANLI_TOKEN", &m.token)]));
    let folder = m.dir.path().join("digits");
    let mut pictures = Vec::new();
    for (label, shades) in [("cats", 0..3u8), ("dogs", 10..13u8)] {
        std::fs::create_dir_all(folder.join(label)).expect("folder");
        for shade in shades {
            let name = format!("{label}/{shade}.png");
            std::fs::write(folder.join(&name), png(shade)).expect("picture");
            pictures.push(name);
        }
    }
    std::fs::write(folder.join("cats/broken.png"), b"not a picture").expect("broken");
    std::os::unix::fs::symlink("/etc/passwd", folder.join("cats/passwd.png")).expect("symlink");

    let folder_arg = folder.display().to_string();
    let pushed = suanli(&m, &["data", "push", &folder_arg, "--to", "digits", "--create", "-m", "first"], &[]);
    let said = ok(pushed.clone());
    assert!(stderr(&pushed).contains("passwd.png skipped: a symbolic link"), "{}", stderr(&pushed));
    assert!(said.contains("digits@1: 6 items"), "{said}");
    assert!(said.contains("cats 3") && said.contains("dogs 3"), "labels from the folders: {said}");
    assert!(said.contains("rejected: 1 file") && said.contains("cats/broken.png"), "{said}");
    // The version used the upload up: nothing is left to resume.
    let book: Value = serde_json::from_slice(&std::fs::read(m.dir.path().join("config/uploads.json")).expect("the resume file")).expect("JSON");
    assert_eq!(book["uploads"], serde_json::json!({}), "{book}");

    let listed = ok(suanli(&m, &["data", "ls"], &[]));
    assert!(listed.lines().any(|l| l.split_whitespace().nth(1) == Some("digits")), "{listed}");
    let versions = ok(suanli(&m, &["data", "ls", "digits"], &[]));
    assert!(versions.lines().any(|l| l.starts_with("1 ") && l.contains("first")), "{versions}");

    let out = m.dir.path().join("pulled");
    let out_arg = out.display().to_string();
    let pulled = ok(suanli(&m, &["data", "pull", "digits@1", "--dir", &out_arg], &[]));
    assert!(pulled.contains("6 files written"), "{pulled}");
    for name in &pictures {
        assert_eq!(std::fs::read(out.join(name)).expect(name), std::fs::read(folder.join(name)).expect(name), "{name}");
    }
    assert!(!out.join("cats/broken.png").exists() && !out.join("cats/passwd.png").exists());
    let again = ok(suanli(&m, &["data", "pull", "digits", "--dir", &out_arg], &[]));
    assert!(again.contains("0 files written") && again.contains("6 already there"), "{again}");

    let unknown = suanli(&m, &["data", "pull", "nothing-here", "--dir", &out_arg], &[]);
    assert!(!unknown.status.success() && stderr(&unknown).contains("no dataset nothing-here"), "{}", stderr(&unknown));
}

#[test]
fn shells_complete_every_command_without_a_login() {
    let dir = tempfile::tempdir().expect("dir");
    let script = ok(run(&dir.path().join("config"), &["completions", "bash"], &[]));
    for word in ["search", "lease", "job", "logs", "ssh", "vnc", "--follow", "data", "push", "model", "promote"] {
        assert!(script.contains(word), "{word} is completed");
    }
    let wrong = run(&dir.path().join("config"), &["completions", "cmd.exe"], &[]);
    assert!(!wrong.status.success() && stderr(&wrong).contains("invalid value"), "{}", stderr(&wrong));
}

/// A supplier's terminal: an enrollment token for a new node, the clusters it published, and
/// a cluster file naming a node it does not have, refused with the portal's own error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supplier_makes_an_enrollment_token_and_publishes_from_a_toml_file() {
    let m = market().await;
    let session = suanli_testkit::portal::log_in(&m.url, "demo-supplier", suanli_portal::demo::DEMO_PASSWORD).await.expect("supplier signs in");
    let made: Value = session
        .http
        .post(format!("{}/api/v1/me/api-tokens", m.url))
        .header("x-csrf-token", &session.csrf)
        .json(&serde_json::json!({"name": "cli", "expires_in_days": 1}))
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("json");
    let token = made["token"].as_str().expect("a token").to_owned();
    let config = m.dir.path().join("supplier-config");
    ok(run(&config, &["login", "--portal", &m.url], &[("SUANLI_TOKEN", &token)]));

    let enroll = ok(run(&config, &["node", "enroll-token", "--valid-seconds", "600"], &[]));
    assert!(enroll.trim().len() >= 16, "an enrollment token: {enroll:?}");
    let clusters = ok(run(&config, &["cluster", "ls"], &[]));
    for id in [m.class_a, m.class_b] {
        assert!(clusters.contains(&id.to_string()), "cluster {id} in {clusters}");
    }

    let file = m.dir.path().join("cluster.toml");
    std::fs::write(
        &file,
        r#"class = "B"
node_ids = [999999]
[listing]
title = "A100 in Shenzhen"
gpu_model = "NVIDIA A100-SXM4-80GB"
vram_gib = 80
memory_gib = 512
vcpus = 64
vendor = "Inspur"
region = "Shenzhen"
currency = "CNY"
[listing.storage]
data_disks = 1
data_disk_gb = 1000
system_disk_gb = 200
medium = "nvme"
[[listing.prices]]
billing_mode = "hourly"
per_card_minor = 1200
"#,
    )
    .expect("file");
    let refused = run(&config, &["cluster", "publish", &file.display().to_string()], &[]);
    assert!(!refused.status.success(), "a node it does not have: {}", stdout(&refused));
    assert!(stderr(&refused).contains("NOT_FOUND") || stderr(&refused).contains("NODE"), "the portal's error: {}", stderr(&refused));
    // A researcher's token is not a supplier's.
    ok(suanli(&m, &["login", "--portal", &m.url], &[("SUANLI_TOKEN", &m.token)]));
    let wrong = suanli(&m, &["node", "enroll-token"], &[]);
    assert!(!wrong.status.success(), "a researcher made an enrollment token: {}", stdout(&wrong));
    assert!(stderr(&wrong).contains("PERMISSION_DENIED") || stderr(&wrong).contains("WRONG_ACCOUNT_KIND"), "{}", stderr(&wrong));
}
