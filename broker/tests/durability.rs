//! A write is acknowledged only after it is on disk. `kill -9` keeps the page cache, so it
//! cannot show that; instead a single node runs under `strace`, and every acknowledgement must
//! be preceded, within its own request's lifetime, by a completed `fsync`/`fdatasync`.
//!
//! Skipped (with a message) where `strace` is missing or ptrace is not permitted.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use suanli_proto::v1::{self, AccountKind};
use suanli_testkit::Service;
use tempfile::TempDir;

use suanli_testkit::cluster::PLATFORM_TOKEN;

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn strace_usable() -> bool {
    Command::new("strace").args(["-f", "-e", "trace=fsync", "-o", "/dev/null", "true"]).status().is_ok_and(|s| s.success())
}

/// Completion times (µs since the epoch) of successful fsync/fdatasync calls in an `strace -ttt`
/// log, including calls reported as "<... fdatasync resumed>".
fn sync_completions(log: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for line in log.lines() {
        let is_sync = line.contains("fsync(") || line.contains("fdatasync(") || line.contains("fsync resumed>") || line.contains("fdatasync resumed>");
        if !is_sync || line.contains("<unfinished") || !line.trim_end().ends_with("= 0") {
            continue;
        }
        // "[pid] 1732465200.123456 fdatasync(12) = 0"
        let time = line.split_whitespace().find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'));
        if let Some((secs, micros)) = time.and_then(|t| t.split_once('.')) {
            if let (Ok(s), Ok(us)) = (secs.parse::<u64>(), micros.parse::<u64>()) {
                out.push(s * 1_000_000 + us);
            }
        }
    }
    out.sort_unstable();
    out
}

#[tokio::test]
async fn every_acknowledged_write_was_synced_to_disk_first() {
    if !strace_usable() {
        eprintln!("SKIPPED: strace is not installed or ptrace is not permitted here");
        return;
    }
    let dir = TempDir::new().expect("tempdir");
    let trace = dir.path().join("strace.log");
    let binary = env!("CARGO_BIN_EXE_suanli-broker");
    let args: Vec<String> = [
        "-f",
        "-ttt",
        "-e",
        "trace=fsync,fdatasync",
        "-o",
        trace.to_str().expect("path"),
        binary,
        "serve",
        "--bootstrap",
        "--node-id",
        "1",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().join("data").to_str().expect("path"),
    ]
    .map(String::from)
    .to_vec();
    let broker = Service::start("broker", Path::new("strace"), &args, &[("SUANLI_BROKER_PLATFORM_TOKEN", PLATFORM_TOKEN)], dir.path(), Duration::from_secs(60))
        .await
        .expect("broker under strace");
    // If anything below panics, the broker (strace's child) must not outlive the test.
    struct KillTracee(String);
    impl Drop for KillTracee {
        fn drop(&mut self) {
            let _ = Command::new("pkill").args(["-KILL", "-P", &self.0]).status();
        }
    }
    let _guard = KillTracee(broker.pid().expect("pid").to_string());
    let mut platform = suanli_proto::client::connect(&format!("http://{}", broker.get("grpc").expect("grpc")), Some(PLATFORM_TOKEN)).await.expect("connect");
    let mut windows = Vec::new();
    for i in 0..20 {
        let sent = now_micros();
        platform
            .register_account(v1::RegisterAccountRequest { request_id: format!("a{i}"), kind: AccountKind::Researcher.into(), token: String::new() })
            .await
            .expect("register");
        windows.push((sent, now_micros()));
    }
    // Stop the broker itself (strace's child); strace exits with it and flushes its log.
    let strace_pid = broker.pid().expect("pid").to_string();
    let stopped = Command::new("pkill").args(["-INT", "-P", &strace_pid]).status().expect("pkill");
    assert!(stopped.success(), "the broker under strace was found and signalled");
    broker.wait(Duration::from_secs(20)).await.expect("stop");
    let log = std::fs::read_to_string(&trace).expect("trace");
    let syncs = sync_completions(&log);
    for (i, (sent, acked)) in windows.iter().enumerate() {
        assert!(syncs.iter().any(|t| t >= sent && t <= acked), "write {i} was acknowledged at {acked} with no fsync completed since it was sent at {sent}");
    }
}

#[test]
fn strace_lines_are_parsed() {
    let log = "123 1732465200.000100 fdatasync(12) = 0\n\
               124 1732465200.000200 fsync(13 <unfinished ...>\n\
               124 1732465200.000300 <... fsync resumed>) = 0\n\
               125 1732465200.000400 fdatasync(14) = -1 EIO (Input/output error)\n";
    assert_eq!(sync_completions(log), vec![1732465200000100, 1732465200000300]);
}
