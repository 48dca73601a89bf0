//! Where `suanli login` keeps the portal's address and the API token: `config.toml` in
//! `$SUANLI_CONFIG_DIR`, else `$XDG_CONFIG_HOME/suanli`, else `~/.config/suanli`; readable by
//! its owner only (0600, in a 0700 directory), written whole or not at all.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("not logged in: run `suanli login --portal URL` first ({0} does not exist)")]
    NotLoggedIn(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, #[source] toml::de::Error),
    #[error("{0} is readable by others (mode {1:o}): it holds your API token; chmod 600 it")]
    Exposed(PathBuf, u32),
    #[error("no configuration directory: set $SUANLI_CONFIG_DIR or $HOME")]
    NoHome,
}

/// What `login` stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// The portal's base URL, `https://portal.example`.
    pub portal: String,
    /// An API token of the portal (`Authorization: Bearer`), made on the account page.
    pub token: String,
}

/// The configuration directory, as the environment names it.
pub fn dir() -> Result<PathBuf, ConfigError> {
    if let Some(dir) = std::env::var_os("SUANLI_CONFIG_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(xdg).join("suanli"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/suanli")).ok_or(ConfigError::NoHome)
}

fn file_in(dir: &Path) -> PathBuf {
    dir.join("config.toml")
}

/// The stored login; refused if others could read it.
pub fn load(dir: &Path) -> Result<Login, ConfigError> {
    let path = file_in(dir);
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ConfigError::NotLoggedIn(path)),
        Err(e) => return Err(ConfigError::Io(path, e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Exposed(path, mode));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Io(path.clone(), e))?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse(path, e))
}

/// Stores `login` (replacing what was there): written beside, synced, then renamed.
pub fn save(dir: &Path, login: &Login) -> Result<PathBuf, ConfigError> {
    let io = |p: &Path, e| ConfigError::Io(p.to_owned(), e);
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io(dir, e))?;
    let path = file_in(dir);
    let partial = dir.join("config.toml.partial");
    let text = toml::to_string(login).map_err(|e| io(&path, std::io::Error::other(e)))?;
    let mut file = std::fs::OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(&partial).map_err(|e| io(&partial, e))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(|e| io(&partial, e))?;
    file.write_all(text.as_bytes()).map_err(|e| io(&partial, e))?;
    file.sync_all().map_err(|e| io(&partial, e))?;
    std::fs::rename(&partial, &path).map_err(|e| io(&path, e))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_is_kept_for_its_owner_only_and_refused_once_others_can_read_it() {
        let dir = tempfile::tempdir().expect("dir");
        let home = dir.path().join("suanli");
        assert!(matches!(load(&home), Err(ConfigError::NotLoggedIn(_))));
        let login = Login { portal: "https://portal.example".into(), token: "slp_secret".into() };
        let path = save(&home, &login).expect("save");
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&home).expect("meta").permissions().mode() & 0o777, 0o700);
        assert_eq!(load(&home).expect("load"), login);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(load(&home), Err(ConfigError::Exposed(_, 0o644))));
    }
}
