//! `suanli-ops install-agent` against a real OpenSSH `sshd` on a loopback port (started by the
//! test with its own host key and authorized key) and a real broker: the agent is uploaded,
//! started under the supervisor loop (no systemd here), enrolls, and is uninstalled; an unknown
//! or changed host key is refused. The shipped systemd unit is checked with
//! `systemd-analyze verify`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_ops::install::Layout;
use suanli_proto::client::bearer;
use suanli_proto::v1::{self, supplier_service_client::SupplierServiceClient, AccountKind};
use suanli_testkit::cluster::{BrokerCluster, PLATFORM_TOKEN};
use suanli_testkit::fixtures::register;
use suanli_testkit::sshd::Sshd;
use suanli_testkit::{eventually, workspace_binary};
use tempfile::TempDir;
use tokio::process::Command;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

async fn ops(args: &[String]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_suanli-ops")).args(args).output().await.expect("suanli-ops runs");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn host_args(sshd: &Sshd, known_hosts: &Path, layout: &Layout) -> Vec<String> {
    vec![
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        sshd.port.to_string(),
        "--user".into(),
        std::env::var("USER").unwrap_or_else(|_| "root".into()),
        "--identity".into(),
        sshd.client_key.display().to_string(),
        "--known-hosts".into(),
        known_hosts.display().to_string(),
        "--prefix".into(),
        layout.prefix.clone(),
        "--config-dir".into(),
        layout.config_dir.clone(),
        "--state-dir".into(),
        layout.state_dir.clone(),
    ]
}

fn running(pid_file: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(pid_file) else { return false };
    Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_agent_over_ssh_enrolls_and_uninstall_removes_it() {
    let dir = TempDir::new().expect("temp dir");
    let sshd = Sshd::start(dir.path()).await.expect("sshd");
    let broker_binary = workspace_binary("suanli-broker", "suanli-broker").expect("broker");
    let agent_binary = workspace_binary("suanli-agent", "suanli-agent").expect("agent");
    let broker = BrokerCluster::start(&broker_binary, 1, None).await.expect("broker");
    let endpoint = format!("http://{}", broker.address(1).expect("address"));
    let agent_port = broker.agent_endpoint(1).expect("agent port");
    let mut platform = broker.client(1, PLATFORM_TOKEN).await.expect("client");
    let (_, supplier_token) = register(&mut platform, AccountKind::Supplier, "supplier").await.expect("supplier");
    let channel = suanli_proto::client::channel(&endpoint).await.expect("channel");
    let mut supplier = SupplierServiceClient::with_interceptor(channel, bearer(Some(&supplier_token)).expect("token"));
    let token = supplier
        .create_enrollment_token(v1::CreateEnrollmentTokenRequest { request_id: "t".into(), valid_seconds: 600 })
        .await
        .expect("token")
        .into_inner()
        .token;

    let host = dir.path().join("host");
    let layout = Layout {
        prefix: host.join("usr").display().to_string(),
        config_dir: host.join("etc").display().to_string(),
        state_dir: host.join("state").display().to_string(),
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nbroker = [\"{agent_port}\"]\nhostname = \"installed-1\"\nmetrics_listen = \"127.0.0.1:0\"\nsource = \"simulated\"\n\n[agent.simulated]\nmodel = \"A10\"\ncards = 2\n"
        ),
    )
    .expect("config");
    let known_hosts = dir.path().join("known_hosts");
    let mut install = vec!["install-agent".to_owned()];
    install.extend(host_args(&sshd, &known_hosts, &layout));
    install.extend([
        "--agent-binary".into(),
        agent_binary.display().to_string(),
        "--config".into(),
        config.display().to_string(),
        "--broker-ca".into(),
        broker.agent_ca_cert().display().to_string(),
        "--enrollment-token".into(),
        token,
        "--timeout".into(),
        "30".into(),
    ]);

    // An unknown host is refused unless accepted, and nothing is installed.
    let (ok, said) = ops(&install).await;
    assert!(!ok && said.contains("is not in"), "{said}");
    assert!(!Path::new(&layout.binary()).exists());

    install.push("--accept-new-host-key".into());
    let (ok, said) = ops(&install).await;
    assert!(ok, "install failed: {said}\nsshd: {}", std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default());
    assert!(said.contains("enrolled") && said.contains("supervisor"), "{said}");
    assert!(std::fs::read_to_string(&known_hosts).expect("recorded").contains(&format!("[127.0.0.1]:{}", sshd.port)));
    let state = PathBuf::from(&layout.state_dir);
    assert!(state.join("agent.crt").exists(), "the agent enrolled");
    let env_mode = std::fs::metadata(host.join("etc/agent.env")).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(env_mode.expect("env file"), 0o600, "the token file is private");
    assert!(running(&state.join("agent.pid")), "the supervisor runs");
    let cards = {
        let node = supplier.get_agent_node(v1::GetAgentNodeRequest {}).await;
        // The supplier is not an agent: the call is refused, but the broker knows the node.
        assert!(node.is_err());
        let read = |file: &str| std::fs::read_to_string(state.join(file)).expect(file);
        let ca = std::fs::read_to_string(broker.agent_ca_cert()).expect("CA");
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).identity(Identity::from_pem(read("agent.crt"), read("agent.key")));
        let channel = suanli_proto::client::channel_with(&agent_port, Some(tls)).await.expect("agent channel");
        let mut agent = SupplierServiceClient::new(channel);
        agent.get_agent_node(v1::GetAgentNodeRequest {}).await.expect("the installed agent is enrolled").into_inner().cards
    };
    assert_eq!(cards.len(), 2);

    // A changed host key is refused, whatever else is said.
    let tampered = std::fs::read_to_string(&known_hosts)
        .expect("known hosts")
        .replace(sshd.host_public_key.split_whitespace().nth(1).expect("key"), "AAAAC3NzaC1lZDI1NTE5AAAAIJ4vlHoyuREVhSjE4/X8VvGRZXPi3bm6x/vqpUGCN+Lo");
    std::fs::write(&known_hosts, tampered).expect("tamper");
    let (ok, said) = ops(&install).await;
    assert!(!ok && said.contains("HOST KEY MISMATCH"), "{said}");

    let mut uninstall = vec!["uninstall-agent".to_owned()];
    uninstall.extend(host_args(&sshd, &known_hosts, &layout));
    uninstall.extend(["--replace-host-key".into(), "--purge".into()]);
    let (ok, said) = ops(&uninstall).await;
    assert!(ok, "uninstall failed: {said}");
    assert!(!Path::new(&layout.binary()).exists() && !state.exists());
    eventually(Duration::from_secs(10), Duration::from_millis(100), || async {
        let out = Command::new("pgrep").args(["-f", &layout.binary()]).output().await.ok()?;
        (!out.status.success()).then_some(())
    })
    .await
    .expect("no agent process is left");
}

#[test]
fn the_shipped_unit_verifies_with_systemd_analyze() {
    let dir = TempDir::new().expect("temp dir");
    let layout = Layout {
        prefix: dir.path().display().to_string(),
        config_dir: dir.path().join("etc").display().to_string(),
        state_dir: dir.path().join("state").display().to_string(),
    };
    std::fs::create_dir_all(dir.path().join("bin")).expect("bin");
    std::fs::copy(workspace_binary("suanli-agent", "suanli-agent").expect("agent"), layout.binary()).expect("binary");
    let unit = dir.path().join("suanli-agent.service");
    std::fs::write(&unit, layout.unit()).expect("unit");
    let out = std::process::Command::new("systemd-analyze").arg("verify").arg(&unit).output().expect("systemd-analyze");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {said}\n{}", layout.unit());
}
