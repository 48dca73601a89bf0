//! One Unix account per lease: its own user and group, a private home that is its scratch
//! space, and at lease end every process of the user killed and the account removed.
//!
//! The account is the isolation boundary: sessions, jobs and anything they fork run as the
//! lease's user, so another lease's files (mode 0700 homes) and processes are out of reach, and
//! killing by user ID finds double-forked processes that left their session.
//!
//! Accounts by record, never by pattern: an agent writes down each account before it creates
//! it ([`AccountBook`], in its state directory) and removes only accounts it wrote down, so
//! several agents on one host (as `ops/run-local` starts them) never touch each other's, and
//! a name that happens to look like a lease login is never the agent's to delete. UIDs come
//! from the agent's own range, in increasing order, never handed out twice by one agent: the
//! next renter never inherits a file a previous lease left somewhere under the same UID.

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
    #[error("{0} exists but is not a lease account this agent made")]
    NotOurs(String),
    #[error("no free UID left in this agent's range {0}..={1}")]
    UidsExhausted(u32, u32),
}

/// The accounts this agent made: one file per login under `<state>/accounts/`, holding its UID,
/// written before `useradd` runs (so a crash in between still leaves the record to clean up),
/// removed after `userdel`; and `next-uid`, the next UID of the agent's range to try.
#[derive(Clone, Debug)]
pub struct AccountBook {
    dir: PathBuf,
    uids: (u32, u32),
}

impl AccountBook {
    pub fn open(state_dir: &Path, uids: (u32, u32)) -> Result<AccountBook, AccountError> {
        let dir = state_dir.join("accounts");
        std::fs::create_dir_all(&dir).map_err(|e| AccountError::Io(dir.clone(), e))?;
        Ok(AccountBook { dir, uids })
    }

    /// Logins this agent created and has not yet removed.
    pub fn recorded(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".account"))
            .map(|n| n.trim_end_matches(".account").to_owned())
            .collect()
    }

    pub fn is_recorded(&self, login: &str) -> bool {
        self.entry(login).exists()
    }

    fn entry(&self, login: &str) -> PathBuf {
        self.dir.join(format!("{login}.account"))
    }

    fn record(&self, login: &str, uid: u32) -> Result<(), AccountError> {
        let path = self.entry(login);
        write_atomically(&path, uid.to_string().as_bytes()).map_err(|e| AccountError::Io(path, e))
    }

    fn forget(&self, login: &str) -> Result<(), AccountError> {
        match std::fs::remove_file(self.entry(login)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(AccountError::Io(self.entry(login), e)),
        }
    }

    /// Takes the next UID of the range (persisted before it is used, so never twice).
    fn take_uid(&self) -> Result<u32, AccountError> {
        let path = self.dir.join("next-uid");
        let next = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse::<u32>().ok()).unwrap_or(self.uids.0).max(self.uids.0);
        if next > self.uids.1 {
            return Err(AccountError::UidsExhausted(self.uids.0, self.uids.1));
        }
        write_atomically(&path, (next + 1).to_string().as_bytes()).map_err(|e| AccountError::Io(path, e))?;
        Ok(next)
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Whether every user can reach directories under `home_root`: each existing ancestor must be
/// searchable by others (mode `o+x`), or lease users could never enter their homes.
pub fn check_home_root(home_root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let absolute = std::path::absolute(home_root).map_err(|e| format!("{}: {e}", home_root.display()))?;
    for dir in absolute.ancestors() {
        let Ok(meta) = std::fs::metadata(dir) else { continue };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(format!(
                "lease users cannot reach homes under {}: {} (mode {:o}) is not searchable by other users; \
                 choose a --home-root every user can enter (such as /home/suanli) or chmod o+x {}",
                home_root.display(),
                dir.display(),
                meta.permissions().mode() & 0o7777,
                dir.display()
            ));
        }
    }
    Ok(())
}

/// A provisioned lease account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub login: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Creates the account, or finds the one this agent made earlier; says which (`true`: just
/// made). An account of that name this agent did not record making is never adopted.
pub async fn ensure(book: &AccountBook, login: &str, home_root: &Path, comment: &str) -> Result<(Account, bool), AccountError> {
    if let Some(account) = lookup(login).await? {
        if !book.is_recorded(login) || account.home != home_root.join(login) {
            return Err(AccountError::NotOurs(login.to_owned()));
        }
        return Ok((account, false));
    }
    std::fs::create_dir_all(home_root).map_err(|e| AccountError::Io(home_root.to_owned(), e))?;
    let home = home_root.join(login);
    // A home left by an account that no longer exists (a crash between userdel and the
    // removal, or a host account deleted by hand) is never handed to the new lease.
    remove_home(&home, None)?;
    // A UID some other account holds (another agent's, the host's) is skipped, never shared.
    let mut attempts = 0;
    loop {
        let uid = book.take_uid()?;
        book.record(login, uid)?;
        let made = run(Command::new("useradd")
            .args(["--create-home", "--no-log-init", "--shell", "/bin/bash", "--comment", comment])
            .args(["--uid", &uid.to_string(), "--user-group"])
            .arg("--home-dir")
            .arg(&home)
            .arg(login))
        .await;
        match made {
            Ok(()) => break,
            // useradd: 4, the UID is taken; 9, the group name is (a stale group of that name).
            Err(AccountError::Command { ref status, .. }) if status.contains("exit status: 4") && attempts < 100 => attempts += 1,
            Err(e) => {
                let _ = book.forget(login);
                return Err(e);
            }
        }
    }
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
/// root, 0700) for the supplier's retention. Only an account in `book` is touched; a missing
/// account is not an error.
pub async fn remove(book: &AccountBook, login: &str, home: &Path, keep_in: Option<&Path>) -> Result<(), AccountError> {
    if !book.is_recorded(login) {
        return Err(AccountError::NotOurs(login.to_owned()));
    }
    if lookup(login).await?.is_some() {
        kill_all(login).await?;
        // `userdel` refuses while the user has processes; the loop above made sure it has none.
        run(Command::new("userdel").arg(login)).await?;
    }
    remove_home(home, keep_in)?;
    book.forget(login)
}

fn remove_home(home: &Path, keep_in: Option<&Path>) -> Result<(), AccountError> {
    if let (Some(dir), true) = (keep_in, home.exists()) {
        let io = |e| AccountError::Io(dir.to_owned(), e);
        std::fs::create_dir_all(dir).map_err(io)?;
        set_private(dir)?;
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let kept = dir.join(format!("{}-{stamp}", home.file_name().and_then(|n| n.to_str()).unwrap_or("home")));
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
        let alive = Command::new("pgrep").args(["-u", login]).output().await.map_err(|e| AccountError::Spawn("pgrep".into(), e))?;
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
    let out = Command::new("getent").args(["passwd", login]).output().await.map_err(|e| AccountError::Spawn("getent".into(), e))?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(parse_passwd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_passwd(line: &str) -> Option<Account> {
    let fields: Vec<&str> = line.trim().split(':').collect();
    match fields.as_slice() {
        [login, _, uid, gid, _, home, ..] => {
            Some(Account { login: (*login).to_owned(), uid: uid.parse().ok()?, gid: gid.parse().ok()?, home: PathBuf::from(home) })
        }
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
        Err(AccountError::Command { command: name, status: out.status.to_string(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() })
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

    #[test]
    fn uids_are_taken_in_order_and_never_twice() {
        let dir = tempfile::TempDir::new().expect("dir");
        let book = AccountBook::open(dir.path(), (5000, 5002)).expect("book");
        assert_eq!(book.take_uid().expect("uid"), 5000);
        let reopened = AccountBook::open(dir.path(), (5000, 5002)).expect("book");
        assert_eq!(reopened.take_uid().expect("uid"), 5001, "the counter survives a restart");
        assert_eq!(reopened.take_uid().expect("uid"), 5002);
        assert!(matches!(reopened.take_uid(), Err(AccountError::UidsExhausted(5000, 5002))));
    }

    #[test]
    fn only_recorded_logins_are_the_agents() {
        let dir = tempfile::TempDir::new().expect("dir");
        let book = AccountBook::open(dir.path(), (5000, 6000)).expect("book");
        book.record("sl7", 5000).expect("record");
        assert!(book.is_recorded("sl7") && !book.is_recorded("sl8"));
        assert_eq!(book.recorded(), vec!["sl7".to_owned()]);
        book.forget("sl7").expect("forget");
        assert!(book.recorded().is_empty());
    }

    #[test]
    fn a_home_root_behind_a_private_directory_is_refused_with_the_reason() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::TempDir::new().expect("dir");
        let private = dir.path().join("private");
        std::fs::create_dir(&private).expect("mkdir");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let why = check_home_root(&private.join("homes")).expect_err("refused");
        assert!(why.contains("not searchable by other users") && why.contains("private"), "{why}");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(check_home_root(&private.join("homes")), Ok(()));
    }
}
