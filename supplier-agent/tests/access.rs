//! Real clients against the agent's SSH gateway: a broker, an agent with simulated GPUs and
//! its gateway on loopback, researchers with keys made by `ssh-keygen`, and Debian's OpenSSH
//! `ssh`, `scp` and `sftp`.
//!
//! The agent makes real Unix accounts for leases, so these tests need root (as CI runs); each
//! run uses a login prefix of its own, and ended leases remove their accounts.

mod support;

use std::path::{Path, PathBuf};

use suanli_proto::v1;
use suanli_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use support::{login_clone, one_lease, said, sha256, text, Login, Node, POLL, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_scp_sftp_and_port_forwarding_run_as_the_lease_user() {
    let Some((node, mut alice, login)) = one_lease(&[]).await else { return };
    assert_eq!(login.cards.len(), 1);

    // A command runs as the lease's own user, in its home, with its card only.
    let out = login.run("id -un; pwd; echo \"cuda=$CUDA_VISIBLE_DEVICES\"; echo oops >&2; exit 3").await;
    assert_eq!(out.status.code(), Some(3), "{}", said(&out));
    let lines: Vec<String> = text(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines[0], login.login, "{}", said(&out));
    assert_eq!(lines[1], node.dir.path().join("homes").join(&login.login).display().to_string());
    assert_eq!(lines[2], format!("cuda={}", login.cards[0]));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "oops", "stderr is its own stream");

    // Inside the lease's own control group.
    let out = login.run("cat /proc/self/cgroup").await;
    assert!(text(&out).contains(&format!("/suanli/{}", login.login)), "{}", said(&out));

    // A terminal when asked for one.
    let out = login.ssh(&["-tt"], "tty; echo term=$TERM").output().await.expect("ssh -tt");
    assert!(out.status.success(), "{}", said(&out));
    assert!(text(&out).contains("/dev/pts/") && text(&out).contains("term="), "{}", said(&out));

    // 100 MB up with scp (SFTP underneath), back down, same bytes.
    let upload = node.dir.path().join("upload.bin");
    let out = Command::new("head").args(["-c", "104857600", "/dev/urandom"]).output().await.expect("random data");
    std::fs::write(&upload, &out.stdout).expect("write upload");
    let out = login.scp().arg(&upload).arg(login.remote("data.bin")).output().await.expect("scp up");
    assert!(out.status.success(), "{}", said(&out));
    let download = node.dir.path().join("download.bin");
    let out = login.scp().arg(login.remote("data.bin")).arg(&download).output().await.expect("scp down");
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(sha256(&upload).await, sha256(&download).await);
    let owner = login.run("stat -c %U data.bin").await;
    assert_eq!(text(&owner), login.login, "uploads belong to the lease's user");

    // sftp in batch mode.
    let batch = node.dir.path().join("batch");
    std::fs::write(&batch, format!("put {}\nls -l\nrm data.bin\n", batch.display())).expect("batch");
    let out = Command::new("sftp")
        .args(login.options(&login.key))
        .args(["-P", &login.port.to_string(), "-b"])
        .arg(&batch)
        .arg(format!("{}@127.0.0.1", login.login))
        .output()
        .await
        .expect("sftp");
    assert!(out.status.success(), "{}", said(&out));
    assert!(text(&out).contains("batch"), "{}", said(&out));

    // Local forwarding to the lease's own service on the node's loopback (a Jupyter stands in,
    // started over SSH as the lease's user; attacks.rs tries someone else's).
    let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("free port");
    let service_port = free.local_addr().expect("addr").port();
    drop(free);
    support::serve_as_lease(&login, service_port, "hello from the node").await;
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("free port");
    let local_port = local.local_addr().expect("addr").port();
    drop(local);
    let forward = format!("{local_port}:127.0.0.1:{service_port}");
    let mut tunnel = login.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward], "").spawn().expect("ssh -L");
    let greeting = eventually(WAIT, POLL, || async move {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", local_port)).await.ok()?;
        let mut got = String::new();
        socket.read_to_string(&mut got).await.ok()?;
        Some(got).filter(|g| !g.is_empty())
    })
    .await
    .expect("the forwarded port answers");
    assert_eq!(greeting, "hello from the node\n");
    tunnel.kill().await.expect("stop the tunnel");
    // Forwarding off the node is refused.
    let out = login.ssh(&["-W", "10.255.255.1:80"], "").output().await.expect("ssh -W");
    assert!(!out.status.success(), "forwarding beyond loopback must be refused: {}", said(&out));

    // Someone else's key, and the right key for a login that is not a live lease: refused.
    let stranger = node.new_key("stranger").await;
    let out = login.ssh_with_key(&stranger, &[], "true").output().await.expect("ssh");
    assert_eq!(out.status.code(), Some(255), "{}", said(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{}", said(&out));
    let nobody = Login { login: format!("{}999", node.prefix), ..login_clone(&login) };
    let out = nobody.run("true").await;
    assert_eq!(out.status.code(), Some(255), "{}", said(&out));

    // ssh-audit (installed by ops/install-build-deps) finds no weak algorithm on offer: no
    // failure, and no warning but the post-quantum note on the Curve25519 exchanges kept for
    // clients older than OpenSSH 9.9.
    let tools = std::env::var("SUANLI_TOOLS").unwrap_or_else(|_| "/var/tmp/suanli-tools".into());
    let audit = Command::new(format!("{tools}/venv/bin/ssh-audit"))
        .args(["-n", "-p", &login.port.to_string(), "127.0.0.1"])
        .output()
        .await
        .expect("ssh-audit is installed (ops/install-build-deps)");
    let report = text(&audit);
    assert!(report.contains("(kex) mlkem768x25519-sha256"), "ssh-audit:\n{report}");
    let weak: Vec<&str> = report.lines().filter(|l| l.contains("[fail]") || (l.contains("[warn]") && !l.contains("post-quantum"))).collect();
    assert!(weak.is_empty(), "weak algorithms on offer: {weak:?}\n{report}");

    node.end(&mut alice, &login).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_end_cuts_sessions_kills_every_process_and_removes_the_account() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let node = Node::start().await;
    let mut alice = node.researcher("alice").await;
    let mut bob = node.researcher("bob").await;
    let a = node.lease(&mut alice, "a").await;
    let b = node.lease(&mut bob, "b").await;
    assert_ne!(a.cards, b.cards, "two leases, two cards");

    // One lease cannot read the other's files, nor log in as it with its own key.
    let out = a.run("echo secret > mine.txt && chmod 644 mine.txt && echo written").await;
    assert_eq!(text(&out), "written", "{}", said(&out));
    let a_home = node.dir.path().join("homes").join(&a.login);
    let out = b.run(&format!("cat {}/mine.txt", a_home.display())).await;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{}", said(&out));
    let out = Login { login: a.login.clone(), ..login_clone(&b) }.run("true").await;
    assert_eq!(out.status.code(), Some(255), "bob's key does not open alice's lease: {}", said(&out));

    // Each lease may open its own card's device node, and not the other's.
    let dev = node.dir.path().join("dev");
    for (lease, other) in [(&a, &b), (&b, &a)] {
        let (own, theirs) = (dev.join(format!("nvidia{}", lease.cards[0])), dev.join(format!("nvidia{}", other.cards[0])));
        let probe = format!("test -r {0} && test -w {0} && echo own; test -r {1} || test -w {1} || echo not-theirs", own.display(), theirs.display());
        let out = lease.run(&probe).await;
        assert_eq!(text(&out), "own\nnot-theirs", "{}", said(&out));
    }

    // An open session, and a process that double-forked out of its session.
    let mut open = a.ssh(&[], "echo started; sleep 600").stdout(std::process::Stdio::piped()).spawn().expect("ssh");
    let mut first_line = [0u8; 8];
    open.stdout.as_mut().expect("stdout").read_exact(&mut first_line).await.expect("the session runs");
    let out = a.run("setsid sh -c 'sleep 700 & sleep 800 &' > /dev/null 2>&1 < /dev/null; echo detached").await;
    assert_eq!(text(&out), "detached", "{}", said(&out));
    let count = |login: String| async move {
        let out = Command::new("pgrep").args(["-c", "-u", &login, "sleep"]).output().await.expect("pgrep");
        text(&out).parse::<u32>().unwrap_or(0)
    };
    assert_eq!(count(a.login.clone()).await, 3, "the session's sleep and both detached ones");

    node.end(&mut alice, &a).await;
    let status = tokio::time::timeout(WAIT, open.wait()).await.expect("the open session is cut").expect("ssh exits");
    assert!(!status.success());
    // The agent removes the account, its home and its control groups one after the other:
    // wait until all of it is done, then look at each.
    let groups = |login: &str| ["pids", "freezer"].map(|h| Path::new("/sys/fs/cgroup").join(h).join("suanli").join(login));
    eventually(WAIT, POLL, || {
        let login = a.login.clone();
        let home = a_home.clone();
        let groups = groups(&login);
        async move {
            let gone = Command::new("getent").args(["passwd", &login]).output().await.ok()?;
            (!gone.status.success() && !home.exists() && groups.iter().all(|g| !g.exists())).then_some(())
        }
    })
    .await
    .expect("the account, its home and its control groups are removed");
    assert_eq!(count(a.login.clone()).await, 0, "no process of the lease survives");
    assert!(!a_home.exists(), "its home (scratch) is wiped");
    for hierarchy in ["pids", "freezer"] {
        let group = Path::new("/sys/fs/cgroup").join(hierarchy).join("suanli").join(&a.login);
        assert!(!group.exists(), "{} is removed", group.display());
    }
    let out = a.run("true").await;
    assert_eq!(out.status.code(), Some(255), "no login after the end: {}", said(&out));

    // The other lease is untouched.
    let out = b.run("id -un").await;
    assert_eq!(text(&out), b.login, "{}", said(&out));
    node.end(&mut bob, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_password_logs_in_and_failed_logins_are_throttled() {
    let Some((node, mut alice, login)) = one_lease(&["--max-login-failures", "3", "--scratch-policy", "keep"]).await else { return };
    let set = |request_id: &str| v1::SetLeasePasswordRequest { request_id: request_id.into(), lease_id: login.lease };
    // Over the broker's TLS port, so the password never crosses the wire in plain text.
    let ca = std::fs::read_to_string(node.broker.agent_ca_cert()).expect("CA");
    let tls_port = node.broker.agent_endpoint(1).expect("TLS port");
    let mut encrypted = suanli_proto::client::connect_checked(&tls_port, Some(&ca), Some(&alice.token)).await.expect("TLS client");
    let password = encrypted.set_lease_password(set("pw-1")).await.expect("password").into_inner().password;
    assert!(suanli_proto::client::connect_checked(&tls_port, None, Some(&alice.token)).await.is_err(), "https needs the CA");
    assert_eq!(password.len(), 20);
    // A retried request does not show a second password (nor change it).
    let retried = alice.client.set_lease_password(set("pw-1")).await.expect("retry").into_inner();
    assert!(retried.password.is_empty());
    // Only the lessee may have one drawn.
    let mut bob = node.researcher("bob").await;
    let refused = bob.client.set_lease_password(set("pw-bob")).await.expect_err("not bob's lease");
    assert_eq!(suanli_proto::decode_status(&refused).code, suanli_types::ErrorCode::NotFound);

    let out = login.run_with_password(node.dir.path(), &password, "id -un").await;
    assert_eq!(text(&out), login.login, "{}", said(&out));

    // Three wrong passwords from this address, then even the right password is refused: the
    // throttle does not tell a guesser when it guessed right. The lease's key still works: a
    // key cannot be guessed, and failed passwords must not lock the holder out (attacks.rs).
    for wrong in ["guess-1", "guess-2", "guess-3"] {
        let out = login.run_with_password(node.dir.path(), wrong, "true").await;
        assert_eq!(out.status.code(), Some(255), "{}", said(&out));
    }
    let out = login.run_with_password(node.dir.path(), &password, "true").await;
    assert_eq!(out.status.code(), Some(255), "throttled: {}", said(&out));
    let out = login.run("true").await;
    assert_eq!(out.status.code(), Some(0), "the key is never throttled: {}", said(&out));
    assert!(node.agent.log().contains("too many failures"), "{}", node.agent.log());

    // This supplier keeps ended leases' homes: moved aside, root's alone.
    let out = login.run_with_password(node.dir.path(), &password, "true").await;
    assert_eq!(out.status.code(), Some(255), "still throttled");
    node.end(&mut alice, &login).await;
    let homes = node.dir.path().join("homes");
    let kept = eventually(WAIT, POLL, || {
        let ended = homes.join(".ended");
        let prefix = format!("{}-", login.login);
        async move {
            let entry = std::fs::read_dir(&ended).ok()?.filter_map(Result::ok).find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?;
            Some(entry.path())
        }
    })
    .await
    .expect("the home is kept");
    assert!(!homes.join(&login.login).exists(), "and no longer the lease's");
    let meta = std::fs::metadata(&kept).expect("kept home");
    assert_eq!((std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::MetadataExt::mode(&meta) & 0o777), (0, 0o700));
}

/// Signs `<name>.pub` with `ca` through `ssh-keygen -s`; returns the certificate's path.
async fn sign_with_ssh_keygen(ca: &Path, key: &Path, serial: u64, options: &[&str]) -> PathBuf {
    // Callers name the key ID (`-I lease-<id>`, as the broker signs).
    let out = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-z", &serial.to_string()])
        .args(options)
        .arg(key.with_extension("pub"))
        .output()
        .await
        .expect("ssh-keygen -s");
    assert!(out.status.success(), "ssh-keygen -s: {}", said(&out));
    let name = key.file_stem().and_then(|s| s.to_str()).expect("key name");
    key.with_file_name(format!("{name}-cert.pub"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_certificates_log_in_and_every_other_kind_is_refused() {
    let Some((node, mut alice, login)) = one_lease(&[]).await else { return };
    let with_certificate = |key: &Path, cert: &Path| {
        let cert_option = format!("CertificateFile={}", cert.display());
        let mut command = login.ssh_with_key(key, &["-o", &cert_option], "id -un");
        async move { command.output().await.expect("ssh") }
    };

    // A key the broker does not know gets in only with a certificate; the broker issues one.
    let carol = node.new_key("carol").await;
    let out = login.ssh_with_key(&carol, &[], "true").output().await.expect("ssh");
    assert_eq!(out.status.code(), Some(255), "an unregistered key alone: {}", said(&out));
    let public_key = std::fs::read_to_string(carol.with_extension("pub")).expect("public key");
    let issued = alice
        .client
        .issue_ssh_certificate(v1::IssueSshCertificateRequest { lease_id: login.lease, public_key: public_key.clone(), valid_seconds: 600 })
        .await
        .expect("certificate")
        .into_inner();
    assert_eq!(issued.principals, vec![login.login.clone()]);
    let issued_path = node.dir.path().join("carol-issued-cert.pub");
    std::fs::write(&issued_path, &issued.certificate).expect("write certificate");
    let out = with_certificate(&carol, &issued_path).await;
    assert_eq!(text(&out), login.login, "{}", said(&out));
    // Someone else's lease cannot have one issued.
    let mut bob = node.researcher("bob").await;
    let refused = bob
        .client
        .issue_ssh_certificate(v1::IssueSshCertificateRequest { lease_id: login.lease, public_key, valid_seconds: 600 })
        .await
        .expect_err("not bob's lease");
    assert_eq!(suanli_proto::decode_status(&refused).code, suanli_types::ErrorCode::NotFound);

    // Certificates made with ssh-keygen -s by the platform's CA: only the right kind is admitted.
    let ca = node.broker.ssh_ca_key();
    let principal = login.login.as_str();
    let good = node.new_key("good").await;
    let key_id = format!("lease-{}", login.lease);
    let cert = sign_with_ssh_keygen(&ca, &good, 1, &["-I", &key_id, "-n", principal, "-V", "+10m"]).await;
    let out = with_certificate(&good, &cert).await;
    assert_eq!(text(&out), login.login, "{}", said(&out));
    let other_ca = node.new_key("other-ca").await;
    let id = key_id.as_str();
    let cases: [(&str, &Path, &[&str]); 7] = [
        ("expired", &ca, &["-I", id, "-n", principal, "-V", "20200101:20200102"]),
        ("another-principal", &ca, &["-I", id, "-n", "someone-else", "-V", "+10m"]),
        ("no-principals", &ca, &["-I", id, "-V", "+10m"]),
        ("host-certificate", &ca, &["-I", id, "-h", "-n", principal, "-V", "+10m"]),
        ("force-command", &ca, &["-I", id, "-n", principal, "-V", "+10m", "-O", "force-command=/bin/true"]),
        ("another-ca", &other_ca, &["-I", id, "-n", principal, "-V", "+10m"]),
        ("another-lease", &ca, &["-I", "lease-0", "-n", principal, "-V", "+10m"]),
    ];
    for (i, (case, signer, options)) in cases.into_iter().enumerate() {
        let key = node.new_key(case).await;
        let cert = sign_with_ssh_keygen(signer, &key, 10 + i as u64, options).await;
        let out = with_certificate(&key, &cert).await;
        assert_eq!(out.status.code(), Some(255), "{case} must be refused: {}", said(&out));
    }

    // A revoked certificate stops working before it expires, once the agent has heard of it
    // (its next look at the node's leases, every 2 s).
    alice
        .client
        .revoke_ssh_certificate(v1::RevokeSshCertificateRequest { request_id: "revoke".into(), lease_id: login.lease, serial: issued.serial })
        .await
        .expect("revoke");
    eventually(WAIT, POLL, || async { (with_certificate(&carol, &issued_path).await.status.code() == Some(255)).then_some(()) })
        .await
        .expect("the revoked certificate is refused");
    let out = with_certificate(&good, &cert).await;
    assert_eq!(text(&out), login.login, "other certificates still work: {}", said(&out));
    node.end(&mut alice, &login).await;
}

/// An RFB 3.8 client up to the end of VNC authentication: the server's verdict (0: accepted).
async fn rfb_authenticate(port: u16, password: &str) -> std::io::Result<u32> {
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut version = [0u8; 12];
    socket.read_exact(&mut version).await?;
    if !version.starts_with(b"RFB 003.") {
        return Err(std::io::Error::other(format!("not RFB: {version:?}")));
    }
    socket.write_all(b"RFB 003.008\n").await?;
    let count = socket.read_u8().await?;
    let mut types = vec![0u8; usize::from(count)];
    socket.read_exact(&mut types).await?;
    if !types.contains(&2) {
        return Err(std::io::Error::other(format!("no VNC authentication offered: {types:?}")));
    }
    socket.write_u8(2).await?;
    let mut challenge = [0u8; 16];
    socket.read_exact(&mut challenge).await?;
    socket.write_all(&suanli_agent::access::vnc::challenge_response(password, &challenge)).await?;
    socket.read_u32().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vnc_display_starts_on_demand_behind_the_gateway_and_checks_its_password() {
    let Some((node, mut alice, login)) = one_lease(&[]).await else { return };
    assert!(Path::new("/usr/bin/Xvnc").exists(), "TigerVNC's Xvnc is installed by ops/install-build-deps");
    let access = alice.client.get_lease_access(v1::GetLeaseRequest { lease_id: login.lease }).await.expect("access").into_inner();
    let vnc_port = access.nodes[0].vnc_port as u16;
    assert!(access.nodes[0].vnc_tunnel.contains(&format!("127.0.0.1:{vnc_port} {}@", login.login)), "{:?}", access.nodes[0]);

    // The password reaches the researcher over SSH; only the lease's user can read it.
    let out = login.run("stat -c %a ~/.vnc/password; cat ~/.vnc/password").await;
    let lines: Vec<String> = text(&out).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 2, "{}", said(&out));
    assert_eq!(lines[0], "600");
    let password = lines[1].clone();
    assert_eq!(password.len(), 8);

    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("free port");
    let local_port = local.local_addr().expect("addr").port();
    drop(local);
    let forward = format!("{local_port}:127.0.0.1:{vnc_port}");
    let mut tunnel = login.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward], "").spawn().expect("ssh -L");
    let verdict = eventually(WAIT, POLL, || {
        let password = password.clone();
        async move { rfb_authenticate(local_port, &password).await.ok() }
    })
    .await
    .expect("Xvnc answers through the tunnel");
    assert_eq!(verdict, 0, "the issued password is accepted");
    let wrong = rfb_authenticate(local_port, "wrongpw1").await.expect("handshake");
    assert_eq!(wrong, 1, "a wrong password is refused");
    // The display is the lease's, and listens on loopback only.
    let out = Command::new("pgrep").args(["-u", &login.login, "Xvnc"]).output().await.expect("pgrep");
    assert!(out.status.success(), "Xvnc runs as the lease's user");
    tunnel.kill().await.expect("stop the tunnel");

    node.end(&mut alice, &login).await;
    eventually(WAIT, POLL, || async {
        let out = Command::new("pgrep").args(["-u", &login.login]).output().await.ok()?;
        (!out.status.success()).then_some(())
    })
    .await
    .expect("the display ends with the lease");
}
