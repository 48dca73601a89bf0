//! The node's SSH gateway (russh). It admits exactly the live, active lease whose login is
//! asked for, with one of its researcher's registered public keys, an OpenSSH user certificate
//! the platform's SSH CA signed for that login, or the lease password (failed logins throttled
//! per source and per login, `throttle.rs`), and runs everything as the
//! lease's Unix account: `exec` commands, shells (with a PTY when asked, resized with the
//! window), the `sftp` subsystem through OpenSSH's `sftp-server` (so `scp` and `sftp` work), and
//! local port forwarding to services on this node's loopback (Jupyter, TensorBoard, VNC).
//!
//! The host key is made once and kept in the state directory, so the `known_hosts` line the
//! broker publishes stays valid across restarts. Only modern algorithms are offered.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, Certificate, PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Config, Handler, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Preferred};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::{Access, LiveLease};
use crate::runtime::lock;

/// Environment variables a client may set (`SendEnv`); everything else is refused.
const ACCEPTED_ENV: &[&str] = &["LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TERM", "TZ"];
const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How much one read takes before it is passed on: a program's output (a pipe holds 64 KiB) to
/// the channel, where each read becomes SSH packets of up to the client's maximum (32 KiB for
/// OpenSSH), and the client's data (packets of up to 32 KiB) to the program's input.
/// `tokio::io::copy`'s 8 KiB reads made four times as many packets and pipe writes.
const COPY_CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("host key {0}: {1}")]
    HostKey(PathBuf, String),
}

/// The gateway's host key at `path`, made (Ed25519, mode 0600) on first use.
pub fn host_key(path: &Path) -> Result<PrivateKey, GatewayError> {
    let error = |e: &dyn std::fmt::Display| GatewayError::HostKey(path.to_owned(), e.to_string());
    if path.exists() {
        return PrivateKey::read_openssh_file(path).map_err(|e| error(&e));
    }
    let key = PrivateKey::random(&mut russh::keys::key::safe_rng(), Algorithm::Ed25519).map_err(|e| error(&e))?;
    key.write_openssh_file(path, LineEnding::LF).map_err(|e| error(&e))?;
    Ok(key)
}

/// The host key's public half as an OpenSSH line without a comment (for `known_hosts`).
pub fn public_line(key: &PrivateKey) -> String {
    let line = key.public_key().to_openssh().unwrap_or_default();
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

pub fn config(host_key: PrivateKey) -> Arc<Config> {
    let preferred = Preferred {
        // Curve25519 stays for clients older than OpenSSH 9.9 (Debian 12 ships 9.2). The markers
        // announce extension negotiation and strict key exchange (the Terrapin fix).
        kex: Cow::Borrowed(&[
            russh::kex::MLKEM768X25519_SHA256,
            russh::kex::CURVE25519,
            russh::kex::CURVE25519_PRE_RFC_8731,
            russh::kex::EXTENSION_SUPPORT_AS_SERVER,
            russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        ]),
        key: Cow::Borrowed(&[Algorithm::Ed25519]),
        cipher: Cow::Borrowed(&[russh::cipher::CHACHA20_POLY1305, russh::cipher::AES_256_GCM]),
        mac: Cow::Borrowed(&[russh::mac::HMAC_SHA512_ETM, russh::mac::HMAC_SHA256_ETM]),
        compression: Cow::Borrowed(&[russh::compression::NONE]),
        ..Preferred::default()
    };
    Arc::new(Config {
        keys: vec![host_key],
        methods: MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 6,
        // Idle shells are normal; dead peers are found by keepalives instead.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        window_size: 8 * 1024 * 1024,
        preferred,
        nodelay: true,
        ..Config::default()
    })
}

/// Accepts connections until the process ends.
pub async fn serve(listener: TcpListener, config: Arc<Config>, access: Arc<Access>) {
    let mut rate = super::throttle::ConnectionRate::new(access.config.connections_per_source);
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "ssh gateway: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !rate.admit(Instant::now(), peer.ip()) {
            tracing::debug!(%peer, "ssh connection refused: too many from this source");
            drop(socket);
            continue;
        }
        let _ = socket.set_nodelay(true);
        let connection = Connection::new(access.clone(), peer);
        let config = config.clone();
        tokio::spawn(async move {
            match russh::server::run_stream(config, socket, connection).await {
                Ok(session) => {
                    if let Err(e) = session.await {
                        tracing::debug!(%peer, error = %e, "ssh session ended");
                    }
                }
                Err(e) => tracing::debug!(%peer, error = %e, "ssh handshake failed"),
            }
        });
    }
}

struct PtyRequest {
    term: String,
    size: pty_process::Size,
}

/// One client connection.
struct Connection {
    access: Arc<Access>,
    peer: SocketAddr,
    lease: Option<Arc<LiveLease>>,
    /// Opened session channels waiting for their request (exec, shell, subsystem).
    channels: HashMap<ChannelId, Channel<Msg>>,
    ptys: HashMap<ChannelId, PtyRequest>,
    env: HashMap<ChannelId, Vec<(String, String)>>,
    resizers: HashMap<ChannelId, mpsc::UnboundedSender<pty_process::Size>>,
}

enum Program {
    Command(String),
    Shell,
    Sftp,
}

impl Connection {
    fn new(access: Arc<Access>, peer: SocketAddr) -> Connection {
        Connection { access, peer, lease: None, channels: HashMap::new(), ptys: HashMap::new(), env: HashMap::new(), resizers: HashMap::new() }
    }

    fn throttled(&self, login: &str) -> bool {
        let blocked = lock(&self.access.throttle).blocked(Instant::now(), self.peer.ip(), login);
        if blocked {
            tracing::warn!(peer = %self.peer, %login, "ssh login refused: too many failures");
        }
        blocked
    }

    fn failed(&self, login: &str) {
        lock(&self.access.throttle).failed(Instant::now(), self.peer.ip(), login);
    }

    fn accept(&mut self, lease: Arc<LiveLease>, how: &str) -> Auth {
        tracing::info!(lease = lease.id, peer = %self.peer, how, "ssh login");
        self.lease = Some(lease);
        Auth::Accept
    }

    /// The active lease `login` names, if `key` is one of its researcher's.
    async fn admitted(&self, login: &str, key: &PublicKey) -> Option<Arc<LiveLease>> {
        // Unknown logins and keys are refused without waiting for a refresh.
        self.access.lease_for(login).filter(|lease| lease.authorizes(key))?;
        self.access.lease_where(login, |lease| lease.active && lease.authorizes(key)).await
    }

    /// Starts `program` on the channel as the lease's user; answers the request.
    fn start(&mut self, id: ChannelId, program: Program, session: &mut Session) -> Result<(), russh::Error> {
        let still_live = self.lease.as_ref().and_then(|l| self.access.lease_for(&l.account.login)).filter(|l| l.active);
        let (Some(lease), Some(channel)) = (still_live, self.channels.remove(&id)) else {
            return session.channel_failure(id);
        };
        let mut env = self.env.remove(&id).unwrap_or_default();
        let shell = self.access.config.shell.clone();
        env.push(("SHELL".into(), shell.display().to_string()));
        let (binary, args): (PathBuf, Vec<String>) = match &program {
            Program::Command(command) => (shell, vec!["-c".into(), command.clone()]),
            Program::Shell => (shell, vec!["-l".into()]),
            Program::Sftp => (self.access.config.sftp_server.clone(), Vec::new()),
        };
        let sandbox = match self.access.sandbox(&lease) {
            Ok(sandbox) => sandbox,
            Err(e) => {
                tracing::warn!(lease = lease.id, error = %e, "cannot prepare the lease's sandbox");
                return session.channel_failure(id);
            }
        };
        let pty = if matches!(program, Program::Sftp) { None } else { self.ptys.remove(&id) };
        let started = match pty {
            Some(pty) => {
                env.push(("TERM".into(), pty.term.clone()));
                let (resize, resizes) = mpsc::unbounded_channel();
                self.resizers.insert(id, resize);
                let launch = Launch { binary: &binary, args: &args, home: &lease.account.home, env: session_env(&lease, &env), sandbox: &sandbox };
                run_on_pty(channel, launch, pty.size, resizes)
            }
            None => run_piped(channel, Launch { binary: &binary, args: &args, home: &lease.account.home, env: session_env(&lease, &env), sandbox: &sandbox }),
        };
        match started {
            Ok(()) => session.channel_success(id),
            Err(e) => {
                tracing::warn!(lease = lease.id, error = %e, "cannot start the session's program");
                session.channel_failure(id)
            }
        }
    }
}

impl Handler for Connection {
    type Error = russh::Error;

    // An offer carries only the key, also for a certificate (russh hands over the certificate's
    // subject key), so every offer for a live lease's login is let through to the signed
    // attempt, where the key or the certificate is checked. Keys and certificates cannot be
    // guessed: they are never throttled (failed passwords from anywhere must not lock the
    // lease's holder out), and only wrong passwords count as failures.
    async fn auth_publickey_offered(&mut self, user: &str, _offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        let known = self.access.lease_for(user).is_some();
        Ok(if known { Auth::Accept } else { Auth::reject() })
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        match self.admitted(user, key.public_key).await {
            Some(lease) => Ok(self.accept(lease, "publickey")),
            None => {
                tracing::info!(%user, peer = %self.peer, "ssh key refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_openssh_certificate(&mut self, user: &str, certificate: &Certificate) -> Result<Auth, Self::Error> {
        let verdict = check_certificate(certificate, &self.access.user_cas(), user, unix_now());
        let serial = certificate.serial();
        let admitted = match verdict {
            // Issued for this very lease (the broker signs `lease-<id>` as the key ID): a login
            // alone could name another node's lease.
            Ok(()) => {
                self.access.lease_where(user, |l| l.active && certificate.key_id() == lease_key_id(l.id) && !l.revoked_certificates.contains(&serial)).await
            }
            Err(why) => {
                tracing::info!(%user, peer = %self.peer, serial, why, "ssh certificate refused");
                None
            }
        };
        match admitted {
            Some(lease) => Ok(self.accept(lease, "certificate")),
            None => {
                tracing::info!(%user, peer = %self.peer, serial, "ssh certificate refused");
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        // Refused the same way whether throttled, unknown or wrong; password stays offered.
        let refuse = Auth::Reject { proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..])), partial_success: false };
        if self.throttled(user) {
            return Ok(refuse);
        }
        let admitted = self.access.lease_where(user, |lease| lease.active && lease.password_matches(password)).await;
        match admitted {
            Some(lease) => Ok(self.accept(lease, "password")),
            None => {
                self.failed(user);
                tracing::info!(%user, peer = %self.peer, "ssh password login refused");
                Ok(refuse)
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(lease) = &self.lease {
            self.access.register_session(&lease.account.login, session.handle());
        }
        Ok(())
    }

    async fn channel_open_session(&mut self, channel: Channel<Msg>, reply: ChannelOpenHandle, _session: &mut Session) -> Result<(), Self::Error> {
        if self.lease.is_none() {
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let term = if term.is_empty() || term.len() > 64 { "xterm".to_owned() } else { term.to_owned() };
        let size = pty_process::Size::new(clamp(row_height, 24), clamp(col_width, 80));
        self.ptys.insert(channel, PtyRequest { term, size });
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(resize) = self.resizers.get(&channel) {
            let _ = resize.send(pty_process::Size::new(clamp(row_height, 24), clamp(col_width, 80)));
        }
        Ok(())
    }

    async fn env_request(&mut self, channel: ChannelId, variable_name: &str, variable_value: &str, session: &mut Session) -> Result<(), Self::Error> {
        if ACCEPTED_ENV.contains(&variable_name) && variable_value.len() <= 256 {
            self.env.entry(channel).or_default().push((variable_name.to_owned(), variable_value.to_owned()));
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn exec_request(&mut self, channel: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.start(channel, Program::Command(command), session)
    }

    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        self.start(channel, Program::Shell, session)
    }

    async fn subsystem_request(&mut self, channel: ChannelId, name: &str, session: &mut Session) -> Result<(), Self::Error> {
        if name == "sftp" {
            self.start(channel, Program::Sftp, session)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn channel_close(&mut self, channel: ChannelId, _session: &mut Session) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.ptys.remove(&channel);
        self.env.remove(&channel);
        self.resizers.remove(&channel);
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let target = loopback(host_to_connect).zip(u16::try_from(port_to_connect).ok());
        let (Some(lease), Some((ip, port))) = (self.lease.clone(), target) else {
            // Forwarding reaches this node's own services only, never the supplier's network.
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        };
        // The lease's own VNC display starts on its first use.
        if let Some(xvnc) = &self.access.config.xvnc {
            if suanli_types::node::vnc_port(&lease.card_indexes) == Some(port) && ip.is_loopback() {
                match self.access.sandbox(&lease) {
                    Ok(sandbox) => {
                        super::vnc::ensure_display(&lease, &sandbox, xvnc, port).await;
                    }
                    Err(e) => tracing::warn!(lease = lease.id, error = %e, "cannot prepare the lease's sandbox"),
                }
            }
        }
        // Only to a listener of the lease's own user: never another lease's service, the
        // supplier's, or a co-tenant's squatting on this lease's port.
        let owners = super::listeners::owners(ip, port);
        if owners.is_empty() || owners.iter().any(|uid| *uid != lease.account.uid) {
            tracing::info!(lease = lease.id, port, ?owners, "port forwarding refused: not the lease's own listener");
            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
            return Ok(());
        }
        match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect((ip, port))).await {
            Ok(Ok(mut tcp)) => {
                reply.accept().await;
                tracing::debug!(lease = lease.id, port, "port forwarding opened");
                tokio::spawn(async move {
                    let mut stream = channel.into_stream();
                    let _ = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut tcp, COPY_CHUNK, COPY_CHUNK).await;
                });
            }
            _ => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
        Ok(())
    }
}

/// Critical options the gateway enforces; a certificate with any other is refused, since
/// ignoring a restriction the CA meant to impose would widen access. None is enforced yet.
const ENFORCED_CRITICAL_OPTIONS: &[&str] = &[];

/// What russh leaves to us (it checks only the certificate's own signature and validity
/// window): the signing CA, the certificate type, the principals and the critical options —
/// and the window again, against our clock.
/// Whether `cert` admits `login` at `now`: signed by one of the platform's SSH user CAs `cas`
/// (the one that signs now, and any still trusted while it is rotated).
fn check_certificate(cert: &Certificate, cas: &[PublicKey], login: &str, now: u64) -> Result<(), &'static str> {
    if cas.is_empty() {
        return Err("no SSH user CA is known");
    }
    if !cas.iter().any(|ca| cert.signature_key() == ca.key_data()) {
        return Err("not signed by the platform's SSH user CA");
    }
    if !cert.cert_type().is_user() {
        return Err("not a user certificate");
    }
    if cert.valid_principals().is_empty() {
        return Err("names no login (an empty list would mean any)");
    }
    if !cert.valid_principals().iter().any(|p| p == login) {
        return Err("not valid for this login");
    }
    if cert.critical_options().keys().any(|option| !ENFORCED_CRITICAL_OPTIONS.contains(&option.as_str())) {
        return Err("carries a critical option the gateway does not enforce");
    }
    if now < cert.valid_after() || now >= cert.valid_before() {
        return Err("outside its validity window");
    }
    Ok(())
}

/// The key ID the broker signs into a lease's certificates: the lease's ID as it prints.
pub fn lease_key_id(lease: u64) -> String {
    suanli_types::LeaseId(lease).to_string()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn clamp(value: u32, default: u16) -> u16 {
    match u16::try_from(value) {
        Ok(0) | Err(_) => default,
        Ok(v) => v.min(1000),
    }
}

fn loopback(host: &str) -> Option<IpAddr> {
    if host == "localhost" {
        return Some(IpAddr::from([127, 0, 0, 1]));
    }
    host.trim_matches(['[', ']']).parse::<IpAddr>().ok().filter(IpAddr::is_loopback)
}

/// The environment of every program a session starts.
pub(crate) fn session_env(lease: &LiveLease, extra: &[(String, String)]) -> Vec<(String, String)> {
    let account = &lease.account;
    let mut env = vec![
        ("HOME".to_owned(), account.home.display().to_string()),
        ("USER".to_owned(), account.login.clone()),
        ("LOGNAME".to_owned(), account.login.clone()),
        ("PATH".to_owned(), PATH.to_owned()),
        ("CUDA_VISIBLE_DEVICES".to_owned(), lease.cuda_visible_devices()),
        ("SUANLI_LEASE_ID".to_owned(), lease.id.to_string()),
    ];
    env.extend(extra.iter().cloned());
    env
}

fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> u32 {
    match status {
        Ok(s) => s.code().map_or_else(|| 128 + s.signal().unwrap_or(0) as u32, |c| c as u32),
        Err(_) => 255,
    }
}

/// A session's program: what runs, where, with what environment, in which sandbox.
struct Launch<'a> {
    binary: &'a Path,
    args: &'a [String],
    home: &'a Path,
    env: Vec<(String, String)>,
    sandbox: &'a super::sandbox::Sandbox,
}

fn run_piped(channel: Channel<Msg>, launch: Launch<'_>) -> std::io::Result<()> {
    let mut command = tokio::process::Command::new(launch.binary);
    command
        .args(launch.args)
        .env_clear()
        .envs(launch.env)
        .current_dir(launch.home)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    launch.sandbox.apply(&mut command);
    let mut child = command.spawn()?;
    let (Some(mut stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
        return Err(std::io::Error::other("the child's pipes are missing"));
    };
    tokio::spawn(async move {
        let (mut read_half, write_half) = channel.split();
        let input = tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(COPY_CHUNK, read_half.make_reader());
            let _ = tokio::io::copy_buf(&mut reader, &mut stdin).await;
            // Dropping stdin tells the program the client has sent everything (EOF).
        });
        let (mut out, mut err) = (write_half.make_writer(), write_half.make_writer_ext(Some(1)));
        let (mut stdout, mut stderr) = (BufReader::with_capacity(COPY_CHUNK, stdout), BufReader::with_capacity(COPY_CHUNK, stderr));
        let _ = tokio::join!(tokio::io::copy_buf(&mut stdout, &mut out), tokio::io::copy_buf(&mut stderr, &mut err));
        let code = exit_code(child.wait().await);
        input.abort();
        finish(&write_half, code).await;
    });
    Ok(())
}

/// Tells the client how the program ended, in the order OpenSSH does: status, EOF, close.
async fn finish(channel: &russh::ChannelWriteHalf<Msg>, code: u32) {
    let _ = channel.exit_status(code).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

fn run_on_pty(
    channel: Channel<Msg>,
    launch: Launch<'_>,
    size: pty_process::Size,
    mut resizes: mpsc::UnboundedReceiver<pty_process::Size>,
) -> std::io::Result<()> {
    let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
    pty.resize(size).map_err(std::io::Error::other)?;
    let command = pty_process::Command::new(launch.binary).args(launch.args).env_clear().envs(launch.env).current_dir(launch.home);
    let mut child = launch.sandbox.apply_pty(command).spawn(pts).map_err(std::io::Error::other)?;
    let (pty_out, mut pty_in) = pty.into_split();
    tokio::spawn(async move {
        let (mut read_half, write_half) = channel.split();
        let input = tokio::spawn(async move {
            let mut reader = read_half.make_reader();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    read = reader.read(&mut buf) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => if pty_in.write_all(&buf[..n]).await.is_err() { break },
                    },
                    Some(size) = resizes.recv() => { let _ = pty_in.resize(size); }
                }
            }
        });
        let mut out = write_half.make_writer();
        let mut exited = tokio::spawn(async move { child.wait().await });
        let mut pty_out = BufReader::with_capacity(COPY_CHUNK, pty_out);
        let copy = tokio::io::copy_buf(&mut pty_out, &mut out);
        tokio::pin!(copy);
        // The session ends when its program exits, as with OpenSSH, even if a background
        // process still holds the terminal; what the program wrote last is still sent.
        let status = tokio::select! {
            _ = &mut copy => (&mut exited).await,
            status = &mut exited => {
                let _ = tokio::time::timeout(Duration::from_millis(200), &mut copy).await;
                status
            }
        };
        let code = status.map_or(255, exit_code);
        input.abort();
        finish(&write_half, code).await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use suanli_pki::ssh::{SshCa, UserCertificate};

    /// A fresh SSH user CA, and a certificate it signs for `login`, valid now.
    fn signed(dir: &std::path::Path, name: &str, login: &str, now: u64) -> (SshCa, Certificate) {
        let ca = SshCa::load(&dir.join(name), true).expect("ca");
        let subject = SshCa::load(&dir.join(format!("{name}-subject")), true).expect("subject").public_line();
        let principals = [login.to_owned()];
        let request = UserCertificate { public_key: &subject, principals: &principals, key_id: "lease-1", serial: 7, now, valid_until: now + 600 };
        let line = ca.sign_user(&request).expect("sign");
        (ca, Certificate::from_openssh(&line).expect("certificate"))
    }

    #[test]
    fn while_the_user_ca_rotates_certificates_of_either_ca_are_admitted_and_of_no_other() {
        let dir = tempfile::tempdir().expect("dir");
        let now = unix_now();
        let (old, by_old) = signed(dir.path(), "old", "l1", now);
        let (new, by_new) = signed(dir.path(), "new", "l1", now);
        let (_, by_stranger) = signed(dir.path(), "stranger", "l1", now);
        let key = |ca: &SshCa| PublicKey::from_openssh(&ca.public_line()).expect("key");
        let rotating = [key(&new), key(&old)];
        assert_eq!(check_certificate(&by_old, &rotating, "l1", now), Ok(()));
        assert_eq!(check_certificate(&by_new, &rotating, "l1", now), Ok(()));
        assert_eq!(check_certificate(&by_stranger, &rotating, "l1", now), Err("not signed by the platform's SSH user CA"));
        // Once the old CA is dropped, its certificates stop working; with none known, none do.
        assert_eq!(check_certificate(&by_old, &[key(&new)], "l1", now), Err("not signed by the platform's SSH user CA"));
        assert_eq!(check_certificate(&by_new, &[], "l1", now), Err("no SSH user CA is known"));
        assert_eq!(check_certificate(&by_new, &rotating, "l2", now), Err("not valid for this login"));
    }
}
