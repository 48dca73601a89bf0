//! One Unix account per lease: its own user and group, a private home that is its scratch
//! space, and at lease end every process of the user killed and the account removed.
//!
//! The account is the isolation boundary: sessions, jobs and anything they fork run as the
//! lease's user, so another lease's files (mode 0700 homes) and processes are out of reach, and
//! killing by user ID finds double-forked processes that left their session.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{command} failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("running {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("processes of {0} survived every kill")]
    Unkillable(String),
    #[error("{0} exists but is not a lease account (its home is not under the lease homes)")]
    NotOurs(String),
}

/// A provisioned lease account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub login: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Creates the account, or finds the one made earlier; says which (`true`: just made). An
/// account of that name that this agent did not make (its home elsewhere) is never adopted.
pub async fn ensure(login: &str, home_root: &Path, comment: &str) -> Result<(Account, bool), AccountError> {
    if let Some(account) = lookup(login).await? {
        if account.home != home_root.join(login) {
            return Err(AccountError::NotOurs(login.to_owned()));
        }
        return Ok((account, false));
    }
    std::fs::create_dir_all(home_root).map_err(|e| AccountError::Io(home_root.to_owned(), e))?;
    let home = home_root.join(login);
    run(Command::new("useradd").args(["--create-home", "--user-group", "--shell", "/bin/bash", "--comment", comment]).arg("--home-dir").arg(&home).arg(login)).await?;
    set_private(&home)?;
    let account = lookup(login).await?.ok_or_else(|| AccountError::Command {
        command: format!("useradd {login}"),
        status: "ok".into(),
        stderr: "the account does not exist afterwards".into(),
    })?;
    Ok((account, true))
}

/// Kills every process of the account (repeatedly, so children forked meanwhile die too),
/// then deletes the account, and its home — or, with `keep_in`, moves the home there (owned by
/// root, 0700) for the supplier's retention. A missing account is not an error.
pub async fn remove(login: &str, home: &Path, keep_in: Option<&Path>) -> Result<(), AccountError> {
    if lookup(login).await?.is_some() {
        kill_all(login).await?;
        // `userdel` refuses while the user has processes; the loop above made sure it has none.
        run(Command::new("userdel").arg(login)).await?;
    }
    if let (Some(dir), true) = (keep_in, home.exists()) {
        let io = |e| AccountError::Io(dir.to_owned(), e);
        std::fs::create_dir_all(dir).map_err(io)?;
        set_private(dir)?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let kept = dir.join(format!("{login}-{stamp}"));
        std::fs::rename(home, &kept).map_err(io)?;
        std::os::unix::fs::chown(&kept, Some(0), Some(0)).map_err(io)?;
        return set_private(&kept);
    }
    match std::fs::remove_dir_all(home) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AccountError::Io(home.to_owned(), e)),
    }
}

/// SIGKILL to every process of `login` until none is left. A process cannot fork once it is
/// killed, so each round can only leave the children forked before it.
pub async fn kill_all(login: &str) -> Result<(), AccountError> {
    for _ in 0..50 {
        let alive = Command::new("pgrep")
            .args(["-u", login])
            .output()
            .await
            .map_err(|e| AccountError::Spawn("pgrep".into(), e))?;
        if !alive.status.success() {
            return Ok(());
        }
        let _ = Command::new("pkill").args(["-KILL", "-u", login]).status().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(AccountError::Unkillable(login.to_owned()))
}

/// The account's IDs and home, from the system's user database.
pub async fn lookup(login: &str) -> Result<Option<Account>, AccountError> {
    let out = Command::new("getent")
        .args(["passwd", login])
        .output()
        .await
        .map_err(|e| AccountError::Spawn("getent".into(), e))?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(parse_passwd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_passwd(line: &str) -> Option<Account> {
    let fields: Vec<&str> = line.trim().split(':').collect();
    match fields.as_slice() {
        [login, _, uid, gid, _, home, ..] => Some(Account {
            login: (*login).to_owned(),
            uid: uid.parse().ok()?,
            gid: gid.parse().ok()?,
            home: PathBuf::from(home),
        }),
        _ => None,
    }
}

fn set_private(home: &Path) -> Result<(), AccountError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700)).map_err(|e| AccountError::Io(home.to_owned(), e))
}

async fn run(command: &mut Command) -> Result<(), AccountError> {
    let name = format!("{:?}", command.as_std());
    let out = command.output().await.map_err(|e| AccountError::Spawn(name.clone(), e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(AccountError::Command {
            command: name,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_parse() {
        let a = parse_passwd("sl7:x:1001:1002:suanli lease 7:/home/suanli/sl7:/bin/bash\n").expect("parsed");
        assert_eq!((a.login.as_str(), a.uid, a.gid), ("sl7", 1001, 1002));
        assert_eq!(a.home, PathBuf::from("/home/suanli/sl7"));
        assert!(parse_passwd("garbage").is_none());
        assert!(parse_passwd("x:x:notanumber:1::/:/bin/sh").is_none());
    }
}
