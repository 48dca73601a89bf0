//! A member's identity on disk: its libp2p key, protobuf-encoded, as hex, readable by its owner
//! only. Never overwritten: a member that lost its key needs a membership change, not a new key
//! under an old name.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p::identity::Keypair;

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0}: not a member key (hex of a protobuf-encoded libp2p key)")]
    Malformed(String),
    #[error("{0} may be read by others (mode {1:o}): chmod 600 it")]
    Exposed(String, u32),
}

/// Creates a new ed25519 key at `path` (mode 0600); refuses an existing file.
pub fn create(path: &Path) -> Result<Keypair, KeyFileError> {
    let key = Keypair::generate_ed25519();
    let encoded = key.to_protobuf_encoding().map_err(|_| KeyFileError::Malformed(path.display().to_string()))?;
    let io = |e| KeyFileError::Io(path.display().to_string(), e);
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
    if let Err(e) = writeln!(file, "{}", hex::encode(encoded)).and_then(|()| file.sync_all()) {
        // A half-written key would be refused by `load` and block `create` forever.
        let _ = std::fs::remove_file(path);
        return Err(io(e));
    }
    Ok(key)
}

/// Reads the key at `path`, refusing a file others may read.
pub fn load(path: &Path) -> Result<Keypair, KeyFileError> {
    let shown = path.display().to_string();
    let mode = std::fs::metadata(path).map_err(|e| KeyFileError::Io(shown.clone(), e))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Exposed(shown, mode));
    }
    let text = std::fs::read_to_string(path).map_err(|e| KeyFileError::Io(shown.clone(), e))?;
    let bytes = hex::decode(text.trim()).map_err(|_| KeyFileError::Malformed(shown.clone()))?;
    Keypair::from_protobuf_encoding(&bytes).map_err(|_| KeyFileError::Malformed(shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_is_never_overwritten_and_is_refused_when_exposed() {
        let dir = std::env::temp_dir().join(format!("suanli-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("member.key");
        let _ = std::fs::remove_file(&path);
        let key = create(&path).expect("create");
        assert_eq!(load(&path).expect("load").public(), key.public());
        assert!(matches!(create(&path), Err(KeyFileError::Io(..))), "never overwritten");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(load(&path), Err(KeyFileError::Exposed(_, 0o644))));
        std::fs::write(&path, "zz").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(load(&path), Err(KeyFileError::Malformed(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
