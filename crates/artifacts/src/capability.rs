//! Capabilities: what one job attempt may do in the store, signed by the broker, checked by
//! the store without asking anyone.
//!
//! A supplier's node runs strangers' jobs; it must reach that job's inputs and checkpoint and
//! upload that job's outputs, and nothing of any other tenant. So the node holds no store-wide
//! token: with each attempt it is placed, the broker hands its agent a capability naming the
//! artifacts the attempt may read (by digest), whether it may upload, the account uploads are
//! charged to, and an expiry; signed with HMAC-SHA-256 under a key only the broker nodes and
//! the store hold (`CapabilityKey`).
//!
//! Wire form: `cap1.<base64url(JSON grant)>.<base64url(HMAC over "cap1." + payload)>`, sent as
//! the bearer token.

use std::path::Path;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::Digest;

const PREFIX: &str = "cap1.";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What a capability allows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The account whose artifacts these are: uploads count against its quota.
    pub owner: u64,
    /// What it was issued for, for logs ("job 12 attempt 3 on node 4").
    pub scope: String,
    /// The artifacts it may read (lower-case hex SHA-256).
    pub read: Vec<String>,
    /// Whether it may upload.
    pub write: bool,
    /// Unix milliseconds after which it is refused.
    pub expires_ms: i64,
}

impl Grant {
    pub fn may_read(&self, digest: Digest) -> bool {
        let hex = digest.to_hex();
        self.read.contains(&hex)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapabilityError {
    #[error("not a capability")]
    Malformed,
    #[error("the capability's signature does not check out")]
    BadSignature,
    #[error("the capability expired")]
    Expired,
    #[error("capability key {0}: {1}")]
    Key(String, String),
}

/// The shared signing key (32 random bytes, hex in a file readable by its owner only).
#[derive(Clone)]
pub struct CapabilityKey([u8; 32]);

impl std::fmt::Debug for CapabilityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CapabilityKey(…)")
    }
}

impl CapabilityKey {
    pub fn generate() -> CapabilityKey {
        CapabilityKey(rand::random())
    }

    /// Reads the key at `path`; with `create`, makes one there first if the file is missing.
    pub fn load(path: &Path, create: bool) -> Result<CapabilityKey, CapabilityError> {
        let err = |e: &dyn std::fmt::Display| CapabilityError::Key(path.display().to_string(), e.to_string());
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut key = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut key).map_err(|e| err(&e))?;
                Ok(CapabilityKey(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let key = CapabilityKey::generate();
                let mut file = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(path).map_err(|e| err(&e))?;
                file.write_all(hex::encode(key.0).as_bytes()).and_then(|()| file.sync_all()).map_err(|e| err(&e))?;
                Ok(key)
            }
            Err(e) => Err(err(&e)),
        }
    }

    fn mac(&self, signed: &str) -> Vec<u8> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(signed.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    pub fn sign(&self, grant: &Grant) -> String {
        let payload = B64.encode(serde_json::to_vec(grant).unwrap_or_default());
        let signed = format!("{PREFIX}{payload}");
        let mac = B64.encode(self.mac(&signed));
        format!("{signed}.{mac}")
    }

    /// The grant `token` carries, if this key signed it and it has not expired at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Grant, CapabilityError> {
        let (signed, mac) = token.rsplit_once('.').ok_or(CapabilityError::Malformed)?;
        let payload = signed.strip_prefix(PREFIX).ok_or(CapabilityError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| CapabilityError::Malformed)?;
        let mut check = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        check.update(signed.as_bytes());
        check.verify_slice(&mac).map_err(|_| CapabilityError::BadSignature)?;
        let grant: Grant = serde_json::from_slice(&B64.decode(payload).map_err(|_| CapabilityError::Malformed)?).map_err(|_| CapabilityError::Malformed)?;
        if grant.expires_ms <= now_ms {
            return Err(CapabilityError::Expired);
        }
        Ok(grant)
    }

    /// Whether `token` looks like a capability (rather than the store's service token).
    pub fn is_capability(token: &str) -> bool {
        token.starts_with(PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant { owner: 7, scope: "job 1 attempt 1 on node 2".into(), read: vec![Digest::of(b"in").to_hex()], write: true, expires_ms: 10_000 }
    }

    #[test]
    fn a_capability_carries_its_grant_and_nothing_else_passes() {
        let key = CapabilityKey::generate();
        let token = key.sign(&grant());
        assert_eq!(key.verify(&token, 9_999), Ok(grant()));
        assert_eq!(key.verify(&token, 10_000), Err(CapabilityError::Expired));
        assert_eq!(CapabilityKey::generate().verify(&token, 0), Err(CapabilityError::BadSignature), "another key");
        // A holder widening its own grant breaks the signature.
        let (signed, mac) = token.rsplit_once('.').expect("parts");
        let mut wider = grant();
        wider.read.push(Digest::of(b"someone else's").to_hex());
        let forged = format!("{PREFIX}{}.{mac}", B64.encode(serde_json::to_vec(&wider).expect("json")));
        assert_eq!(key.verify(&forged, 0), Err(CapabilityError::BadSignature));
        assert_ne!(forged.rsplit_once('.').map(|p| p.0), Some(signed));
        for junk in ["", "cap1.", "cap1.x.y", "bearer-token", &format!("{signed}.")] {
            assert!(key.verify(junk, 0).is_err(), "{junk:?}");
        }
        assert!(grant().may_read(Digest::of(b"in")) && !grant().may_read(Digest::of(b"out")));
    }

    #[test]
    fn a_key_file_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("artifact-key");
        assert!(CapabilityKey::load(&path, false).is_err(), "missing and not asked to make one");
        let made = CapabilityKey::load(&path, true).expect("made");
        let read = CapabilityKey::load(&path, false).expect("read");
        assert_eq!(read.verify(&made.sign(&grant()), 0), Ok(grant()));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
    }
}
