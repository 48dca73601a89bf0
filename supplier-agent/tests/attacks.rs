//! A renter who wants more than they paid for, against a real node: each test tries one attack
//! the way the renter would (over the real OpenSSH client, or by planting files where the
//! agent's root works on a lease's behalf) and asserts both that it failed and that nothing
//! changed on the node.
//!
//! These need root (lease accounts are Unix users); under `CI=true` a missing root fails them.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use suanli_agent::access::lease_fs::{LeaseDir, LeaseFsError};
use suanli_testkit::eventually;
use tokio::process::Command;

use support::{one_lease, said, text, POLL, WAIT};

/// Files planted "by the lease" belong to this stand-in for a lease's user.
const LEASE_UID: u32 = 65534;
const LEASE_GID: u32 = 65534;

/// A lease home (owned by the stand-in user, 0700) and, beside it, a decoy: a root-owned file
/// and folder that the attacks try to make root write, chown or read.
struct Planted {
    _dir: tempfile::TempDir,
    home: PathBuf,
    decoy_file: PathBuf,
    decoy_dir: PathBuf,
}

impl Planted {
    fn new() -> Option<Planted> {
        if !suanli_testkit::require_root("planting files as another user") {
            return None;
        }
        let dir = suanli_testkit::reachable_temp_dir().expect("dir");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).expect("home");
        std::os::unix::fs::chown(&home, Some(LEASE_UID), Some(LEASE_GID)).expect("chown home");
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let decoy_dir = dir.path().join("etc");
        std::fs::create_dir(&decoy_dir).expect("decoy dir");
        let decoy_file = decoy_dir.join("shadow");
        std::fs::write(&decoy_file, "root:precious\n").expect("decoy");
        std::fs::set_permissions(&decoy_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        Some(Planted { _dir: dir, home, decoy_file, decoy_dir })
    }

    fn home(&self) -> LeaseDir {
        LeaseDir::open_home(&self.home, LEASE_UID, LEASE_GID).expect("open home")
    }

    /// A directory under the home, as the lease would have made it.
    fn lease_dir(&self, rel: &str) -> PathBuf {
        let path = self.home.join(rel);
        std::fs::create_dir_all(&path).expect("mkdir");
        let mut p = path.as_path();
        while p != self.home {
            std::os::unix::fs::chown(p, Some(LEASE_UID), Some(LEASE_GID)).expect("chown");
            p = p.parent().expect("parent");
        }
        path
    }

    /// `link` → `target`, owned by the lease (as if it made it).
    fn symlink(&self, target: &Path, link: &Path) {
        std::os::unix::fs::symlink(target, link).expect("symlink");
        std::os::unix::fs::lchown(link, Some(LEASE_UID), Some(LEASE_GID)).expect("lchown");
    }

    /// The decoys are exactly as made: root's, same contents, nothing new beside them.
    fn assert_decoys_untouched(&self) {
        let meta = std::fs::metadata(&self.decoy_file).expect("decoy");
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, 0, 0o600), "the decoy's owner and mode are unchanged");
        assert_eq!(std::fs::read_to_string(&self.decoy_file).expect("read"), "root:precious\n", "the decoy's contents are unchanged");
        let entries: Vec<_> = std::fs::read_dir(&self.decoy_dir).expect("ls").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(entries, vec![std::ffi::OsString::from("shadow")], "nothing was created beside the decoy");
        assert_eq!(std::fs::metadata(&self.decoy_dir).expect("dir").uid(), 0);
    }
}

fn refused(result: Result<impl std::fmt::Debug, LeaseFsError>) -> String {
    match result {
        Err(e @ (LeaseFsError::Refused { .. } | LeaseFsError::TooLarge { .. } | LeaseFsError::BadName(_))) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_symlinked_jobs_folder_never_leads_root_elsewhere() {
    let Some(p) = Planted::new() else { return };
    p.symlink(&p.decoy_dir, &p.home.join(".suanli-jobs"));
    let why = refused(p.home().make_dirs(Path::new(".suanli-jobs/7-1")));
    assert!(why.contains("link"), "{why}");
    p.assert_decoys_untouched();
}

#[test]
fn a_symlinked_job_log_is_replaced_never_written_through() {
    let Some(p) = Planted::new() else { return };
    let attempt = p.lease_dir(".suanli-jobs/7-1");
    p.symlink(&p.decoy_file, &attempt.join("job.log"));
    let dir = p.home().make_dirs(Path::new(".suanli-jobs/7-1")).expect("the attempt's own folder");
    dir.create_file("job.log", 0o600).expect("a new log");
    let log = std::fs::symlink_metadata(attempt.join("job.log")).expect("log");
    assert!(log.file_type().is_file() && log.uid() == LEASE_UID && log.len() == 0, "a fresh file of the lease: {log:?}");
    p.assert_decoys_untouched();
}

#[test]
fn a_symlinked_partial_download_is_replaced_never_written_through() {
    let Some(p) = Planted::new() else { return };
    let inputs = p.lease_dir(".suanli-jobs/7-1/in");
    p.symlink(&p.decoy_file, &inputs.join("data.bin.partial"));
    let dir = p.home().make_dirs(Path::new(".suanli-jobs/7-1/in")).expect("inputs");
    let mut file = dir.create_file("data.bin.partial", 0o600).expect("partial");
    std::io::Write::write_all(&mut file, b"downloaded").expect("write");
    dir.rename("data.bin.partial", "data.bin").expect("rename");
    assert_eq!(std::fs::read_to_string(inputs.join("data.bin")).expect("input"), "downloaded");
    p.assert_decoys_untouched();
}

#[test]
fn a_hard_link_to_a_root_file_is_never_read_or_handed_over() {
    let Some(p) = Planted::new() else { return };
    let checkpoints = p.lease_dir(".suanli-jobs/7-1/checkpoint");
    std::fs::hard_link(&p.decoy_file, checkpoints.join("checkpoint")).expect("hard link");
    let dir = p.home().make_dirs(Path::new(".suanli-jobs/7-1")).expect("attempt");
    let staged = p.home.parent().expect("parent").join("staged");
    let why = refused(dir.copy_out(Path::new("checkpoint/checkpoint"), 1 << 20, &staged));
    assert!(why.contains("not owned by the lease"), "{why}");
    assert!(!staged.exists(), "nothing was copied out");
    // The lease's own file with a second link is refused too (it may be someone's else's name).
    std::fs::remove_file(checkpoints.join("checkpoint")).expect("unlink");
    let own = checkpoints.join("own");
    std::fs::write(&own, "mine").expect("own");
    std::os::unix::fs::chown(&own, Some(LEASE_UID), Some(LEASE_GID)).expect("chown");
    std::fs::hard_link(&own, checkpoints.join("checkpoint")).expect("second link");
    assert!(refused(dir.copy_out(Path::new("checkpoint/checkpoint"), 1 << 20, &staged)).contains("more than one link"));
    p.assert_decoys_untouched();
}

#[test]
fn a_fifo_where_a_checkpoint_belongs_is_refused_without_blocking() {
    let Some(p) = Planted::new() else { return };
    let checkpoints = p.lease_dir(".suanli-jobs/7-1/checkpoint");
    let fifo = checkpoints.join("checkpoint");
    let out = std::process::Command::new("mkfifo").arg(&fifo).output().expect("mkfifo");
    assert!(out.status.success());
    std::os::unix::fs::chown(&fifo, Some(LEASE_UID), Some(LEASE_GID)).expect("chown");
    let dir = p.home().make_dirs(Path::new(".suanli-jobs/7-1")).expect("attempt");
    // On its own thread: a blocking open would hang here, and the test must say so, not hang.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(dir.open_for_reading(Path::new("checkpoint/checkpoint"), 1 << 20).map(|f| f.is_some()));
    });
    let result = rx.recv_timeout(Duration::from_secs(20)).expect("opening a FIFO must not block the agent");
    assert!(refused(result).contains("not a regular file"));
    // And the log reader, which has no size cap, refuses it the same way.
    let log = checkpoints.parent().expect("attempt").join("job.log");
    let out = std::process::Command::new("mkfifo").arg(&log).output().expect("mkfifo");
    assert!(out.status.success());
    std::os::unix::fs::chown(&log, Some(LEASE_UID), Some(LEASE_GID)).expect("chown");
    let dir = p.home().make_dirs(Path::new(".suanli-jobs/7-1")).expect("attempt");
    assert!(refused(dir.open_for_reading(Path::new("job.log"), u64::MAX)).contains("not a regular file"));
}

#[test]
fn a_device_node_where_a_checkpoint_belongs_is_never_opened() {
    let Some(p) = Planted::new() else { return };
    let checkpoints = p.lease_dir(".suanli-jobs/7-1/checkpoint");
    // /dev/zero's numbers: read, it would flood the agent with zeros for ever.
    let device = checkpoints.join("checkpoint");
    let out = std::process::Command::new("mknod").arg(&device).args(["c", "1", "5"]).output().expect("mknod");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::os::unix::fs::chown(&device, Some(LEASE_UID), Some(LEASE_GID)).expect("chown");
    let dir = p.home().make_dirs(Path::new(".suanli-jobs/7-1")).expect("attempt");
    let staged = p.home.parent().expect("parent").join("staged");
    assert!(refused(dir.copy_out(Path::new("checkpoint/checkpoint"), 1 << 20, &staged)).contains("not a regular file"));
    assert!(!staged.exists());
}

#[test]
fn a_huge_sparse_checkpoint_is_refused_by_the_size_cap() {
    let Some(p) = Planted::new() else { return };
    let checkpoints = p.lease_dir(".suanli-jobs/7-1/checkpoint");
    let file = std::fs::File::create(checkpoints.join("checkpoint")).expect("create");
    file.set_len(1 << 40).expect("a 1 TiB hole");
    std::os::unix::fs::chown(checkpoints.join("checkpoint"), Some(LEASE_UID), Some(LEASE_GID)).expect("chown");
    let dir = p.home().make_dirs(Path::new(".suanli-jobs/7-1")).expect("attempt");
    let staged = p.home.parent().expect("parent").join("staged");
    let why = refused(dir.copy_out(Path::new("checkpoint/checkpoint"), 1 << 30, &staged));
    assert!(why.contains("above the cap"), "{why}");
    assert!(!staged.exists());
}

#[test]
fn names_that_climb_out_of_the_lease_home_are_refused() {
    let Some(p) = Planted::new() else { return };
    for name in ["../etc", "/etc", "a/../../etc"] {
        refused(p.home().make_dirs(Path::new(name)));
        refused(p.home().open_for_reading(Path::new(name), 1));
    }
    for name in ["..", "a/b", ""] {
        refused(p.home().create_file(name, 0o600));
    }
    p.assert_decoys_untouched();
}

#[test]
fn a_home_replaced_by_a_link_is_not_opened() {
    let Some(p) = Planted::new() else { return };
    std::fs::remove_dir(&p.home).expect("rmdir");
    p.symlink(&p.decoy_dir, &p.home);
    let err = LeaseDir::open_home(&p.home, LEASE_UID, LEASE_GID).expect_err("a link is not a home");
    assert!(matches!(err, LeaseFsError::Io(..)), "{err}");
    p.assert_decoys_untouched();
}

// ---- over SSH, as the renter ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_have_private_tmp_and_ipc_that_vanish_with_the_lease() {
    let Some((node, mut alice, a)) = one_lease(&[]).await else { return };
    let mut bob = node.researcher("bob").await;
    let b = node.lease(&mut bob, "b").await;
    let marker = format!("left-by-{}", a.login);
    let out = a.run(&format!("echo secret > /tmp/{marker} && echo shm > /dev/shm/{marker} && echo var > /var/tmp/{marker} && ipcmk -M 4096 && ipcs -m")).await;
    assert!(out.status.success(), "{}", said(&out));
    assert!(text(&out).contains(&a.login), "alice sees her own segment: {}", said(&out));
    // Alice's next session sees her files; Bob's sees none of them, nor her IPC.
    let again = a.run(&format!("cat /tmp/{marker} /dev/shm/{marker} /var/tmp/{marker}")).await;
    assert_eq!(text(&again).lines().collect::<Vec<_>>(), ["secret", "shm", "var"], "{}", said(&again));
    let out = b.run(&format!("ls /tmp/{marker} /dev/shm/{marker} /var/tmp/{marker} 2>&1")).await;
    let seen = text(&out);
    assert_eq!(seen.matches("No such file").count(), 3, "bob sees none of alice's files: {seen}");
    let out = b.run("ipcs -m").await;
    assert!(out.status.success() && !text(&out).contains(&a.login), "nor her shared memory: {}", said(&out));
    // The node's own /tmp never had them.
    for dir in ["/tmp", "/dev/shm", "/var/tmp"] {
        assert!(!Path::new(dir).join(&marker).exists(), "{dir} is the node's, untouched");
    }
    let private = node.dir.path().join("agent").join("lease-tmp").join(&a.login);
    assert!(private.join("tmp").join(&marker).exists(), "alice's /tmp is her private folder");
    node.end(&mut alice, &a).await;
    // Removed right after the account (its processes dead, nothing mounted from it).
    suanli_testkit::eventually(support::WAIT, support::POLL, || async { (!private.exists()).then_some(()) }).await.expect("and it goes with her lease");
    node.end(&mut bob, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_inside_its_leases_memory_and_cpu_limits() {
    let Some((node, mut alice, login)) = one_lease(&[]).await else { return };
    let out = login.run("cat /proc/self/cgroup").await;
    let groups = text(&out);
    let expected = format!("/suanli/{}", login.login);
    let root = Path::new("/sys/fs/cgroup");
    let (memory, cpu) = if root.join("cgroup.controllers").exists() {
        assert!(groups.contains(&format!("0::{expected}")), "{groups}");
        let dir = root.join("suanli").join(&login.login);
        (std::fs::read_to_string(dir.join("memory.max")).expect("memory.max"), std::fs::read_to_string(dir.join("cpu.max")).expect("cpu.max"))
    } else {
        for hierarchy in ["memory", "cpu", "pids", "freezer"] {
            assert!(groups.lines().any(|l| l.contains(hierarchy) && l.ends_with(&expected)), "in the {hierarchy} group: {groups}");
        }
        let quota = std::fs::read_to_string(root.join("cpu/suanli").join(&login.login).join("cpu.cfs_quota_us")).expect("quota");
        (std::fs::read_to_string(root.join("memory/suanli").join(&login.login).join("memory.limit_in_bytes")).expect("limit"), quota)
    };
    // One card of two: at most 90 % of half the node.
    let total_kib: u64 =
        std::fs::read_to_string("/proc/meminfo").expect("meminfo").lines().next().and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).expect("MemTotal");
    let limit: u64 = memory.trim().parse().expect("a number, not max");
    assert!(limit <= total_kib * 1024 / 2, "memory limit {limit} within half of the node's {total_kib} KiB");
    let quota: i64 = cpu.split_whitespace().next().expect("quota").parse().expect("a number, not max");
    assert!(quota > 0, "a CPU quota is set: {cpu}");
    // The lease cannot raise them: the group's files are root's.
    let out = login.run(&format!("cat /proc/self/cgroup >/dev/null; echo max > /sys/fs/cgroup/memory/suanli/{0}/memory.limit_in_bytes || echo max > /sys/fs/cgroup/suanli/{0}/memory.max", login.login)).await;
    assert!(!out.status.success(), "{}", said(&out));
    node.end(&mut alice, &login).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_passwords_never_lock_the_lease_holder_out() {
    let Some((node, mut alice, login)) = one_lease(&["--max-login-failures", "2"]).await else { return };
    // A stranger fails passwords for alice's login until the throttle engages.
    for _ in 0..8 {
        let out = login.run_with_password(node.dir.path(), "wrong-guess", "true").await;
        assert_eq!(out.status.code(), Some(255), "{}", said(&out));
    }
    // Alice's key still gets her in, at once.
    let out = login.run("id -un").await;
    assert_eq!(text(&out), login.login, "the holder is not locked out: {}", said(&out));
    node.end(&mut alice, &login).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_issued_for_another_lease_is_refused_even_with_the_right_login() {
    let Some((node, mut alice, login)) = one_lease(&[]).await else { return };
    let ca = node.broker.ssh_ca_key();
    let sign = |key: PathBuf, key_id: String| {
        let ca = ca.clone();
        let principal = login.login.clone();
        async move {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-s"])
                .arg(&ca)
                .args(["-I", &key_id, "-n", &principal, "-V", "+10m", "-z", "5"])
                .arg(key.with_extension("pub"))
                .output()
                .await
                .expect("ssh-keygen -s");
            assert!(out.status.success(), "{}", said(&out));
            let name = key.file_stem().and_then(|s| s.to_str()).expect("name").to_owned();
            (key.clone(), key.with_file_name(format!("{name}-cert.pub")))
        }
    };
    let try_login = |key: PathBuf, cert: PathBuf| {
        let option = format!("CertificateFile={}", cert.display());
        let mut command = login.ssh_with_key(&key, &["-o", &option], "id -un");
        async move { command.output().await.expect("ssh") }
    };
    // The platform CA signed it for the same login, but for lease 999999 (another node's).
    let (key, cert) = sign(node.new_key("elsewhere").await, "lease-999999".into()).await;
    let out = try_login(key, cert).await;
    assert_eq!(out.status.code(), Some(255), "a certificate of another lease: {}", said(&out));
    let (key, cert) = sign(node.new_key("here").await, format!("lease-{}", login.lease)).await;
    let out = try_login(key, cert).await;
    assert_eq!(text(&out), login.login, "this lease's certificate is admitted: {}", said(&out));
    node.end(&mut alice, &login).await;
}

/// Forwards a local port to `port` on the node through the lease's SSH, and returns what a
/// connection to it reads (empty when the gateway refused to connect).
async fn read_through_forward(login: &support::Login, port: u16) -> String {
    let local = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("free port");
    let local_port = local.local_addr().expect("addr").port();
    drop(local);
    let forward = format!("{local_port}:127.0.0.1:{port}");
    let mut tunnel = login.ssh(&["-N", "-o", "ExitOnForwardFailure=yes", "-L", &forward], "").spawn().expect("ssh -L");
    let got = eventually(WAIT, POLL, || async move {
        use tokio::io::AsyncReadExt;
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", local_port)).await.ok()?;
        let mut got = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_string(&mut got)).await;
        Some(got)
    })
    .await
    .expect("the tunnel listens");
    tunnel.kill().await.expect("stop the tunnel");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forwards_reach_only_the_leases_own_listeners() {
    let Some((node, mut alice, login)) = one_lease(&[]).await else { return };
    // Someone else's service on the node's loopback (root's here: the supplier's, or another
    // lease's Jupyter): never reached.
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("service");
    let foreign_port = foreign.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = foreign.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = tokio::io::AsyncWriteExt::write_all(&mut socket, b"root's secrets\n").await;
        }
    });
    assert_eq!(read_through_forward(&login, foreign_port).await, "", "another user's listener is not forwarded to");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0, "not even connected to");
    // The lease's own service is.
    let own = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("port");
    let own_port = own.local_addr().expect("addr").port();
    drop(own);
    support::serve_as_lease(&login, own_port, "hello from the lease").await;
    assert_eq!(read_through_forward(&login, own_port).await, "hello from the lease\n");
    node.end(&mut alice, &login).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_agent_did_not_make_is_never_removed() {
    let Some((node, mut alice, login)) = one_lease(&[]).await else { return };
    // A host account that looks exactly like one of this agent's lease logins, home and all.
    let lookalike = format!("{}999999", node.prefix);
    let home = node.dir.path().join("homes").join(&lookalike);
    let made = Command::new("useradd").args(["--create-home", "--no-log-init", "--home-dir"]).arg(&home).arg(&lookalike).output().await.expect("useradd");
    assert!(made.status.success(), "{}", said(&made));
    struct Userdel(String);
    impl Drop for Userdel {
        fn drop(&mut self) {
            let _ = std::process::Command::new("userdel").arg("-r").arg(&self.0).output();
        }
    }
    let _cleanup = Userdel(lookalike.clone());
    // A lease's end makes the agent tear down everything it no longer wants; a later lease
    // made ready proves that teardown round has finished.
    node.end(&mut alice, &login).await;
    let mut bob = node.researcher("bob").await;
    let later = node.lease(&mut bob, "later").await;
    node.end(&mut bob, &later).await;
    let out = Command::new("getent").args(["passwd", &lookalike]).output().await.expect("getent");
    assert!(out.status.success(), "the lookalike account is still there");
    assert!(home.is_dir(), "and its home");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_home_root_lease_users_cannot_reach() {
    if !suanli_testkit::require_root("the agent's lease homes") {
        return;
    }
    let dir = tempfile::TempDir::new().expect("dir");
    // Private, as `mktemp -d` or /root make it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "").expect("ca");
    let out = Command::new(env!("CARGO_BIN_EXE_suanli-agent"))
        .args(["run", "--broker", "https://127.0.0.1:9", "--broker-ca"])
        .arg(&ca)
        .arg("--state-dir")
        .arg(dir.path().join("agent"))
        .args(["--source", "simulated", "--ssh-listen", "127.0.0.1:0", "--home-root"])
        .arg(dir.path().join("homes"))
        .output()
        .await
        .expect("agent");
    assert!(!out.status.success(), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not searchable by other users"), "says why: {stderr}");
    assert!(!dir.path().join("homes").exists(), "and made nothing");
}

#[test]
fn doctor_reports_every_protection_active_on_this_node() {
    if !suanli_testkit::require_root("the agent's doctor") {
        return;
    }
    let homes = suanli_testkit::reachable_temp_dir().expect("dir");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_suanli-agent"))
        .args(["doctor", "--home-root"])
        .arg(homes.path().join("homes"))
        .output()
        .expect("doctor");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}{}", String::from_utf8_lossy(&out.stderr));
    for line in ["private /tmp and IPC", "control groups", "lease homes"] {
        assert!(report.lines().any(|l| l.starts_with("ok") && l.contains(line)), "{line} active:\n{report}");
    }
}

#[tokio::test]
async fn a_lease_program_starts_as_its_user_in_a_private_tmp() {
    if !suanli_testkit::require_root("starting programs as another user") {
        return;
    }
    let dir = suanli_testkit::reachable_temp_dir().expect("dir");
    let private = dir.path().join("private");
    suanli_agent::access::sandbox::make_private_dirs(&private, LEASE_UID, LEASE_GID).expect("private dirs");
    let sandbox = suanli_agent::access::sandbox::Sandbox::new(LEASE_UID, LEASE_GID, &[], Some((&private, &["/tmp".to_owned()]))).expect("sandbox");
    let mut command = Command::new("/bin/sh");
    command.args(["-c", "id -u; id -G; echo mine > /tmp/probe; ls /tmp"]).current_dir("/");
    sandbox.apply(&mut command);
    let out = command.output().await.expect("run");
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(text(&out).lines().collect::<Vec<_>>(), ["65534", "65534", "probe"], "{}", said(&out));
    assert!(private.join("tmp").join("probe").exists(), "written to the private /tmp");
    assert!(!Path::new("/tmp/probe").exists(), "not the node's");
}

/// Removes what an `Access` made, whatever happens in the test.
struct Recorded(PathBuf);
impl Drop for Recorded {
    fn drop(&mut self) {
        suanli_testkit::remove_recorded_lease_accounts(&self.0);
    }
}

/// The agent's lease access on its own, as the provisioner drives it (no broker, no gateway).
fn node_access(dir: &Path, cgroup_root: &str) -> (std::sync::Arc<suanli_agent::access::Access>, String) {
    use suanli_agent::access::{Access, AccessConfig, ScratchPolicy};
    std::fs::create_dir_all(dir.join("dev")).expect("dev");
    let prefix = format!("x{:06x}z", rand_suffix());
    let access = Access::new(AccessConfig {
        home_root: dir.join("homes"),
        login_prefix: prefix.clone(),
        shell: "/bin/bash".into(),
        sftp_server: "/usr/lib/openssh/sftp-server".into(),
        max_login_failures: 10,
        devices_dir: dir.join("dev"),
        xvnc: None,
        cgroup_root: Some(cgroup_root.into()),
        scratch: ScratchPolicy::Wipe,
        state_dir: dir.join("state"),
        uid_range: (2_900_000, 2_999_999),
        private_dirs: vec!["/tmp".into()],
        lease_fraction: 0.9,
        host_memory_bytes: 8 << 30,
        host_cpus: 4,
        expiry_grace: Duration::from_secs(30),
        connections_per_source: 120,
        rendezvous_firewall: suanli_agent::access::firewall::FirewallKind::Off,
    })
    .expect("access");
    (access, prefix)
}

fn rand_suffix() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id().rotate_left(12)) & 0xff_ffff
}

fn one_lease_node(lease: u64, paid_until_ms: i64) -> suanli_proto::v1::AgentNode {
    use suanli_proto::v1;
    v1::AgentNode {
        cards: vec![v1::Card::default(), v1::Card::default()],
        leases: vec![v1::NodeLease { lease_id: lease, state: v1::LeaseState::Active.into(), card_indexes: vec![0], paid_until_ms, ..Default::default() }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_past_its_paid_time_ends_on_the_node_without_any_broker() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    let dir = suanli_testkit::reachable_temp_dir().expect("dir");
    let _cleanup = Recorded(dir.path().join("state"));
    let (access, prefix) = node_access(dir.path(), "/sys/fs/cgroup");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    let node = one_lease_node(42, now_ms + 1_000);
    let login = format!("{prefix}42");
    assert!(access.sync(&node).await.contains(&42), "provisioned");
    let exists = |login: String| async move { Command::new("getent").args(["passwd", &login]).output().await.expect("getent").status.success() };
    assert!(exists(login.clone()).await);
    // A session is running when the paid time runs out (a process of the lease's user).
    let lease = access.lease_for(&login).expect("live");
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    access.sandbox(&lease).expect("sandbox").apply(&mut sleeper);
    let mut sleeper = sleeper.spawn().expect("a process of the lease");
    // Reaped as soon as it dies, as the agent reaps its sessions (a zombie still counts as a
    // process of the user, and userdel would refuse).
    let sleeper = tokio::spawn(async move { sleeper.wait().await });
    // Before the grace has passed nothing happens; after it, the lease ends here, no broker asked.
    assert!(access.expire(now_ms + 5_000).await.is_empty());
    assert_eq!(access.expire(now_ms + 60_000).await, vec![42]);
    assert!(!exists(login.clone()).await, "the account is gone");
    assert!(!dir.path().join("homes").join(&login).exists(), "and its home");
    let status = tokio::time::timeout(WAIT, sleeper).await.expect("killed").expect("joined").expect("status");
    assert!(!status.success(), "its process was killed");
    // The broker, still listing it a moment later, does not bring it back.
    assert!(!access.sync(&node).await.contains(&42));
    assert!(!exists(login).await, "not provisioned again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_cgroup_v2_a_program_is_in_its_leases_group_before_its_first_instruction() {
    if !suanli_testkit::require_root("lease accounts (Unix users)") {
        return;
    }
    // The unified hierarchy: /sys/fs/cgroup itself, or beside v1's on a hybrid host.
    let v2 = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].into_iter().find(|r| Path::new(r).join("cgroup.controllers").exists());
    let Some(v2) = v2 else {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI's machine has a cgroup v2 hierarchy");
        eprintln!("skipped: no cgroup v2 hierarchy here");
        return;
    };
    let dir = suanli_testkit::reachable_temp_dir().expect("dir");
    let _cleanup = Recorded(dir.path().join("state"));
    let (access, prefix) = node_access(dir.path(), v2);
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64;
    assert!(access.sync(&one_lease_node(7, now_ms + 3_600_000)).await.contains(&7));
    let login = format!("{prefix}7");
    let lease = access.lease_for(&login).expect("live");
    // The program reads its own cgroup as its first act: it was moved before exec.
    let mut command = Command::new("/bin/cat");
    command.arg("/proc/self/cgroup");
    access.sandbox(&lease).expect("sandbox").apply(&mut command);
    let out = command.output().await.expect("cat");
    assert!(text(&out).lines().any(|l| l == format!("0::/suanli/{login}")), "{}", said(&out));
    let group = Path::new(v2).join("suanli").join(&login);
    assert_eq!(std::fs::metadata(group.join("cgroup.procs")).expect("procs").uid(), 0, "the group's files stay root's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_co_tenant_squatting_on_a_leases_vnc_port_is_never_reached() {
    let Some((node, mut alice, a)) = one_lease(&[]).await else { return };
    let mut bob = node.researcher("bob").await;
    let b = node.lease(&mut bob, "b").await;
    let access = alice.client.get_lease_access(suanli_proto::v1::GetLeaseRequest { lease_id: a.lease }).await.expect("access").into_inner();
    let vnc_port = access.nodes[0].vnc_port as u16;
    assert_ne!(vnc_port, 0, "alice's lease has a VNC port");
    // Bob binds alice's VNC port before her display starts, hoping to catch her password.
    support::serve_as_lease(&b, vnc_port, "RFB 003.008 bob-fake").await;
    let got = read_through_forward(&a, vnc_port).await;
    assert!(!got.contains("bob"), "alice's forward never reaches bob's listener: {got:?}");
    node.end(&mut bob, &b).await;
    node.end(&mut alice, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_uid_is_never_handed_to_the_next_lease() {
    let Some((node, mut alice, a)) = one_lease(&[]).await else { return };
    let uid_of = |login: &support::Login| {
        let mut command = login.ssh(&[], "id -u");
        async move { text(&command.output().await.expect("ssh")).parse::<u32>().expect("a uid") }
    };
    let first = uid_of(&a).await;
    // Alice leaves a file where a UID-keyed permission could outlive her (her home is wiped;
    // anything elsewhere would be found by the next holder of her UID).
    node.end(&mut alice, &a).await;
    let mut bob = node.researcher("bob").await;
    let b = node.lease(&mut bob, "b").await;
    let second = uid_of(&b).await;
    assert!(second > first, "a new UID ({second}), never the freed {first}");
    node.end(&mut bob, &b).await;
}
