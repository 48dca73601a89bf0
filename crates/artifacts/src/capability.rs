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
use serde::{Deserialize, Serialize};
use suanli_pki::shared_key::SharedKey;

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
}

/// The key the broker and the store share (`suanli_pki::shared_key`).
#[derive(Clone, Debug)]
pub struct CapabilityKey(SharedKey);

impl CapabilityKey {
    pub fn generate() -> CapabilityKey {
        CapabilityKey(SharedKey::generate())
    }

    /// Reads the key at `path`; with `create`, makes one there first if the file is missing.
    pub fn load(path: &Path, create: bool) -> Result<CapabilityKey, suanli_pki::PkiError> {
        SharedKey::load(path, create).map(CapabilityKey)
    }

    pub fn sign(&self, grant: &Grant) -> String {
        let payload = B64.encode(serde_json::to_vec(grant).unwrap_or_default());
        let signed = format!("{PREFIX}{payload}");
        let mac = B64.encode(self.0.mac(signed.as_bytes()));
        format!("{signed}.{mac}")
    }

    /// The grant `token` carries, if this key signed it and it has not expired at `now_ms`.
    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Grant, CapabilityError> {
        let (signed, mac) = token.rsplit_once('.').ok_or(CapabilityError::Malformed)?;
        let payload = signed.strip_prefix(PREFIX).ok_or(CapabilityError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| CapabilityError::Malformed)?;
        if !self.0.verify(signed.as_bytes(), &mac) {
            return Err(CapabilityError::BadSignature);
        }
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
}
