//! One SSH connection to a host: the host key checked against `known_hosts`, authentication by
//! key or password, commands, and file uploads.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh2::{CheckResult, HashType, KnownHostFileKind, Session};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot reach {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("ssh: {0}")]
    Ssh(#[from] ssh2::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "HOST KEY MISMATCH for {host}: it now presents {fingerprint}, not the key in {known_hosts}. \
         Someone may be intercepting the connection; if the host was reinstalled, remove its old \
         entry (ssh-keygen -R) or pass --replace-host-key"
    )]
    HostKeyMismatch { host: String, fingerprint: String, known_hosts: PathBuf },
    #[error("{host} is not in {known_hosts} (its key is {fingerprint}); verify it and pass --accept-new-host-key")]
    UnknownHost { host: String, fingerprint: String, known_hosts: PathBuf },
    #[error("authentication as {0} failed")]
    Auth(String),
    #[error("`{command}` failed with status {status}: {output}")]
    Command { command: String, status: i32, output: String },
}

pub enum Auth {
    Key(PathBuf),
    Password(String),
}

/// What to do about the host's key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostKeyPolicy {
    /// Trust and record a host that is not in `known_hosts` yet.
    pub accept_new: bool,
    /// Trust and record a host whose key changed (a reinstalled host).
    pub replace_changed: bool,
}

pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub auth: Auth,
    pub known_hosts: &'a Path,
    pub policy: HostKeyPolicy,
}

pub struct Remote {
    session: Session,
}

/// `host` as OpenSSH writes it in known_hosts: bare on port 22, `[host]:port` otherwise.
fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

impl Remote {
    pub fn connect(target: &Target<'_>) -> Result<Remote, RemoteError> {
        let address = format!("{}:{}", target.host, target.port);
        let tcp = TcpStream::connect(&address).map_err(|e| RemoteError::Connect(address.clone(), e))?;
        tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut session = Session::new()?;
        session.set_tcp_stream(tcp);
        session.handshake()?;
        verify_host_key(&session, target)?;
        match &target.auth {
            Auth::Key(identity) => session.userauth_pubkey_file(target.user, None, identity, None),
            Auth::Password(password) => session.userauth_password(target.user, password),
        }
        .map_err(|_| RemoteError::Auth(target.user.to_owned()))?;
        if !session.authenticated() {
            return Err(RemoteError::Auth(target.user.to_owned()));
        }
        Ok(Remote { session })
    }

    /// Runs `command` through the remote shell; its output, or an error with its status.
    pub fn run(&self, command: &str) -> Result<String, RemoteError> {
        let (status, output) = self.status(command)?;
        if status != 0 {
            return Err(RemoteError::Command { command: command.to_owned(), status, output });
        }
        Ok(output)
    }

    /// Runs `command`; its exit status and its output (stdout and stderr).
    pub fn status(&self, command: &str) -> Result<(i32, String), RemoteError> {
        let mut channel = self.session.channel_session()?;
        channel.exec(&format!("{command} 2>&1"))?;
        let mut output = String::new();
        channel.read_to_string(&mut output)?;
        channel.wait_close()?;
        Ok((channel.exit_status()?, output))
    }

    /// Writes `bytes` to `path` with `mode`: to a temporary name first, then renamed, so a
    /// running binary is never overwritten in place and a cut connection leaves no half file.
    pub fn upload(&self, path: &str, bytes: &[u8], mode: i32) -> Result<(), RemoteError> {
        let partial = format!("{path}.partial");
        let mut channel = self.session.scp_send(Path::new(&partial), mode, bytes.len() as u64, None)?;
        channel.write_all(bytes)?;
        channel.send_eof()?;
        channel.wait_eof()?;
        channel.close()?;
        channel.wait_close()?;
        self.run(&format!("chmod {mode:o} {} && mv -f {} {}", quote(&partial), quote(&partial), quote(path)))?;
        Ok(())
    }
}

fn verify_host_key(session: &Session, target: &Target<'_>) -> Result<(), RemoteError> {
    let (key, key_type) = session.host_key().ok_or(RemoteError::Auth("no host key offered".into()))?;
    let fingerprint = session.host_key_hash(HashType::Sha256).map(|h| format!("SHA256:{}", base64(h))).unwrap_or_else(|| "an unknown key".into());
    let mut known = session.known_hosts()?;
    if target.known_hosts.exists() {
        known.read_file(target.known_hosts, KnownHostFileKind::OpenSSH)?;
    }
    let name = known_hosts_name(target.host, target.port);
    let record = |known: &mut ssh2::KnownHosts| -> Result<(), RemoteError> {
        known.add(&name, key, "added by suanli-ops", key_type.into())?;
        known.write_file(target.known_hosts, KnownHostFileKind::OpenSSH)?;
        Ok(())
    };
    match known.check_port(target.host, target.port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch if target.policy.replace_changed => {
            for old in known.hosts()?.into_iter().filter(|h| h.name() == Some(name.as_str())) {
                known.remove(&old)?;
            }
            record(&mut known)
        }
        CheckResult::Mismatch => Err(RemoteError::HostKeyMismatch { host: name, fingerprint, known_hosts: target.known_hosts.to_owned() }),
        CheckResult::NotFound if target.policy.accept_new => record(&mut known),
        CheckResult::NotFound | CheckResult::Failure => Err(RemoteError::UnknownHost { host: name, fingerprint, known_hosts: target.known_hosts.to_owned() }),
    }
}

/// Standard base64 without padding, as OpenSSH prints fingerprints.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Single-quotes `s` for the remote POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(base64(b"hello"), "aGVsbG8");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(known_hosts_name("10.0.0.5", 22), "10.0.0.5");
        assert_eq!(known_hosts_name("127.0.0.1", 2222), "[127.0.0.1]:2222");
    }
}
