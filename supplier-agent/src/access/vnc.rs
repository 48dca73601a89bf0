//! VNC for a lease, where TigerVNC's `Xvnc` is installed: a password drawn per lease (in the
//! lease's home, readable by its user only: the researcher reads it over SSH), and a display
//! started on demand, as the lease's user, on the node's loopback only. It is reached through
//! the gateway's port forwarding, since VNC's own authentication is weak (8 characters, DES).
//! The display dies with the lease's other processes.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use des::cipher::{Block, BlockCipherEncrypt, KeyInit};
use des::Des;
use rand::Rng;

use super::{Account, LiveLease};

/// VNC's fixed key for stored passwords, as standard DES sees it (`vncpasswd` applies
/// 17 52 6b 06 23 4e 58 07 through a DES that reads key bits in reverse).
const PASSWD_KEY: [u8; 8] = [0xe8, 0x4a, 0xd6, 0x60, 0xc4, 0x72, 0x1a, 0xe0];
const PASSWORD_LEN: usize = 8;

fn des_encrypt(key: [u8; 8], data: [u8; 8]) -> [u8; 8] {
    let cipher = Des::new(&key.into());
    let mut block: Block<Des> = data.into();
    cipher.encrypt_block(&mut block);
    block.into()
}

/// VNC truncates or zero-pads passwords to 8 bytes.
fn eight(password: &str) -> [u8; 8] {
    let mut out = [0u8; 8];
    for (o, b) in out.iter_mut().zip(password.bytes()) {
        *o = b;
    }
    out
}

/// The bytes of TigerVNC's `passwd` file (`-rfbauth`) for `password`.
pub fn passwd_file(password: &str) -> [u8; 8] {
    des_encrypt(PASSWD_KEY, eight(password))
}

/// The RFB VNC-authentication answer to a server's 16-byte challenge: each half encrypted
/// with the password as the key, its bits in the reverse order VNC uses.
pub fn challenge_response(password: &str, challenge: &[u8; 16]) -> [u8; 16] {
    let key = eight(password).map(u8::reverse_bits);
    let mut out = [0u8; 16];
    for (half, chunk) in challenge.chunks_exact(8).enumerate() {
        let mut block = [0u8; 8];
        block.copy_from_slice(chunk);
        out[half * 8..half * 8 + 8].copy_from_slice(&des_encrypt(key, block));
    }
    out
}

fn vnc_dir(account: &Account) -> PathBuf {
    account.home.join(".vnc")
}

/// Draws the lease's VNC password and writes it (plain, for the researcher, and in TigerVNC's
/// format, for `Xvnc`) into `~/.vnc`, owned by the lease's user, mode 0600. Called on a home
/// just made, before its user can log in; files are created new, never through a link.
pub fn provision(account: &Account) -> std::io::Result<()> {
    let dir = vnc_dir(account);
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    std::os::unix::fs::chown(&dir, Some(account.uid), Some(account.gid))?;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    let password: String = (0..PASSWORD_LEN).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    write_owned(&dir.join("password"), format!("{password}\n").as_bytes(), account)?;
    write_owned(&dir.join("passwd"), &passwd_file(&password), account)
}

fn write_owned(path: &Path, contents: &[u8], account: &Account) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(path)?;
    file.write_all(contents)?;
    std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))
}

/// Makes sure the lease's display listens on `port`, starting `Xvnc` as the lease's user if
/// it does not. Returns whether it listens.
///
/// Xvnc runs in the lease's sandbox: its X lock and socket land in the lease's private `/tmp`,
/// and its listening port is the lease's user's, which is what the gateway forwards to. A port
/// some other user holds is not this lease's display, and is left alone.
pub async fn ensure_display(lease: &LiveLease, sandbox: &super::sandbox::Sandbox, xvnc: &Path, port: u16) -> bool {
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let listening = || !super::listeners::owners(loopback, port).is_empty();
    if listening() {
        return true;
    }
    let Some(display_number) = suanli_types::node::vnc_display(&lease.card_indexes) else { return false };
    let account = &lease.account;
    let mut command = tokio::process::Command::new(xvnc);
    command
        .arg(format!(":{display_number}"))
        .args(["-localhost", "-interface", "127.0.0.1", "-rfbport", &port.to_string(), "-SecurityTypes", "VncAuth"])
        .arg("-rfbauth")
        .arg(vnc_dir(account).join("passwd"))
        .args(["-geometry", "1280x800", "-depth", "24"])
        .env_clear()
        .env("HOME", &account.home)
        .env("USER", &account.login)
        .current_dir(&account.home)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(false);
    sandbox.apply(&mut command);
    let started = command.spawn();
    if let Err(e) = started {
        tracing::warn!(lease = lease.id, error = %e, "cannot start Xvnc");
        return false;
    }
    // Xvnc needs a moment to listen; it is this agent's own child, so wait for it, briefly.
    for _ in 0..50 {
        if listening() {
            tracing::info!(lease = lease.id, vnc_display = display_number, port, "VNC display started");
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_passwd_file_matches_vncpasswd() {
        // `printf 'password' | vncpasswd -f | xxd -p` (TigerVNC 1.12).
        assert_eq!(passwd_file("password"), [0xdb, 0xd8, 0x3c, 0xfd, 0x72, 0x7a, 0x14, 0x58]);
        assert_eq!(passwd_file("password"), passwd_file("password-and-more"), "8 characters count");
    }
}
