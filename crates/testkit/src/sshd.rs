//! A real OpenSSH `sshd` on loopback, accepting one fresh key for the current user (root in
//! CI): the remote host of `suanli-ops` tests and the baseline of the gateway benchmark.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

use crate::eventually;

pub struct Sshd {
    _child: Child,
    pub port: u16,
    /// The private key sshd accepts (its public half is `<client_key>.pub`).
    pub client_key: PathBuf,
    /// The host key, an OpenSSH public key line (`known_hosts` material).
    pub host_public_key: String,
}

fn keygen(path: &Path) -> anyhow::Result<()> {
    let status = std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).status()?;
    if !status.success() {
        bail!("ssh-keygen failed for {}", path.display());
    }
    Ok(())
}

async fn free_port() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}

impl Sshd {
    /// Starts `/usr/sbin/sshd` with its keys, configuration and log (`sshd.log`) in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Sshd> {
        let host_key = dir.join("host_key");
        let client_key = dir.join("client_key");
        keygen(&host_key)?;
        keygen(&client_key)?;
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys"))?;
        std::fs::create_dir_all("/run/sshd").context("privilege separation directory")?;
        let port = free_port().await?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nStrictModes no\nUsePAM no\n\
                 Subsystem sftp /usr/lib/openssh/sftp-server\n",
                host_key.display(),
                dir.join("authorized_keys").display(),
                dir.join("sshd.pid").display()
            ),
        )?;
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stderr(std::fs::File::create(dir.join("sshd.log"))?)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting sshd (openssh-server, installed by ops/install-build-deps)")?;
        eventually(
            Duration::from_secs(10),
            Duration::from_millis(50),
            || async move { tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ()) },
        )
        .await
        .context("sshd listens")?;
        let host_public_key = std::fs::read_to_string(dir.join("host_key.pub"))?;
        Ok(Sshd { _child: child, port, client_key, host_public_key })
    }
}
