//! Secrets at rest and secrets in flight.
//!
//! - Personal data is sealed with AES-256-GCM under the *current* key of a key ring; each
//!   ciphertext names its key (`v1.<key id>.<base64url(nonce ‖ ciphertext)>`), so a new key can be
//!   added, everything re-sealed under it (`suanli-portal rotate-keys`) and the old one retired.
//! - Identifiers that must be found again but never read back (ID-card numbers, email and phone
//!   for login lookups) are stored as keyed hashes: HMAC-SHA-256 under a separate lookup key with
//!   a domain per kind of value, so equal inputs of different kinds do not collide.
//! - Tokens handed to browsers and scripts (sessions, activation links, API tokens) are random
//!   and stored as their SHA-256: a leaked table opens nothing.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("key file {0}: {1}")]
    KeyFile(String, String),
    #[error("sealed value is malformed")]
    Malformed,
    #[error("sealed with key {0:?}, which is not in the key ring")]
    UnknownKey(String),
    #[error("sealed value failed authentication (tampered, or the wrong key)")]
    Tampered,
}

/// The key file: `current` seals, every key in `keys` opens.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KeyFile {
    pub current: String,
    /// key id → base64url of 32 bytes
    pub keys: BTreeMap<String, String>,
    /// base64url of 32 bytes; never rotated (hashes cannot be re-keyed without the plaintext,
    /// which the portal deliberately does not keep).
    pub lookup_key: String,
}

#[derive(Clone)]
pub struct KeyRing {
    current: String,
    keys: BTreeMap<String, Aes256Gcm>,
    lookup_key: [u8; 32],
}

fn decode_key(id: &str, b64: &str) -> Result<[u8; 32], CryptoError> {
    let bytes = B64.decode(b64.trim()).map_err(|e| CryptoError::KeyFile(id.into(), e.to_string()))?;
    bytes.try_into().map_err(|_| CryptoError::KeyFile(id.into(), "a key must be 32 bytes".into()))
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rng().fill_bytes(&mut out);
    out
}

/// A random token of `bytes` bytes of entropy, URL-safe.
pub fn random_token(bytes: usize) -> String {
    let mut out = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut out);
    B64.encode(out)
}

/// What the database keeps of a token.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl KeyFile {
    pub fn generate() -> KeyFile {
        let id = format!("k{}", hex::encode(random_bytes::<4>()));
        KeyFile { keys: BTreeMap::from([(id.clone(), B64.encode(random_bytes::<32>()))]), current: id, lookup_key: B64.encode(random_bytes::<32>()) }
    }

    /// Adds a fresh key and makes it current; the old keys still open what they sealed.
    pub fn add_key(&mut self) -> String {
        let id = format!("k{}", hex::encode(random_bytes::<4>()));
        self.keys.insert(id.clone(), B64.encode(random_bytes::<32>()));
        self.current = id.clone();
        id
    }

    /// Loads the key file; `None` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<KeyFile>, CryptoError> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map(Some).map_err(|e| CryptoError::KeyFile(path.display().to_string(), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CryptoError::KeyFile(path.display().to_string(), e.to_string())),
        }
    }

    /// Makes a new key file at `path` (mode 0600).
    pub fn create(path: &Path) -> Result<KeyFile, CryptoError> {
        let file = KeyFile::generate();
        file.save(path)?;
        Ok(file)
    }

    pub fn save(&self, path: &Path) -> Result<(), CryptoError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| CryptoError::KeyFile(path.display().to_string(), e.to_string());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let text = toml::to_string(self).map_err(|e| CryptoError::KeyFile(path.display().to_string(), e.to_string()))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    pub fn ring(&self) -> Result<KeyRing, CryptoError> {
        let mut keys = BTreeMap::new();
        for (id, b64) in &self.keys {
            let key = decode_key(id, b64)?;
            keys.insert(id.clone(), Aes256Gcm::new(&key.into()));
        }
        if !keys.contains_key(&self.current) {
            return Err(CryptoError::KeyFile(self.current.clone(), "the current key is not among the keys".into()));
        }
        Ok(KeyRing { current: self.current.clone(), keys, lookup_key: decode_key("lookup_key", &self.lookup_key)? })
    }
}

impl KeyRing {
    pub fn current_key(&self) -> &str {
        &self.current
    }

    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = random_bytes::<12>();
        let cipher = &self.keys[&self.current];
        // Encryption with a valid key and a 12-byte nonce cannot fail for inputs under 64 GiB.
        let ct = cipher.encrypt(Nonce::from_slice(&nonce), plaintext.as_bytes()).unwrap_or_default();
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        format!("v1.{}.{}", self.current, B64.encode(blob))
    }

    pub fn open(&self, sealed: &str) -> Result<String, CryptoError> {
        let mut parts = sealed.splitn(3, '.');
        let (Some("v1"), Some(key), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CryptoError::Malformed);
        };
        let cipher = self.keys.get(key).ok_or_else(|| CryptoError::UnknownKey(key.into()))?;
        let blob = B64.decode(body).map_err(|_| CryptoError::Malformed)?;
        if blob.len() < 12 + 16 {
            return Err(CryptoError::Malformed);
        }
        let (nonce, ct) = blob.split_at(12);
        let pt = cipher.decrypt(Nonce::from_slice(nonce), ct).map_err(|_| CryptoError::Tampered)?;
        String::from_utf8(pt).map_err(|_| CryptoError::Malformed)
    }

    /// Whether `sealed` is under a key other than the current one (due for re-sealing).
    pub fn is_stale(&self, sealed: &str) -> bool {
        sealed.split('.').nth(1).is_some_and(|k| k != self.current)
    }

    /// Keyed hash of `value` in `domain`, hex.
    pub fn lookup_hash(&self, domain: &str, value: &str) -> String {
        // HMAC accepts keys of any length.
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.lookup_key) else { return String::new() };
        mac.update(domain.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_rotate() {
        let mut file = KeyFile::generate();
        let ring = file.ring().expect("ring");
        let sealed = ring.seal("张三");
        assert!(!sealed.contains("张三"));
        assert_eq!(ring.open(&sealed).expect("open"), "张三");
        assert_ne!(ring.seal("张三"), sealed, "fresh nonce every time");

        file.add_key();
        let rotated = file.ring().expect("ring");
        assert!(rotated.is_stale(&sealed));
        assert_eq!(rotated.open(&sealed).expect("old key still opens"), "张三");
        assert!(!rotated.is_stale(&rotated.seal("x")));
        assert_eq!(ring.lookup_hash("id", "1"), rotated.lookup_hash("id", "1"), "lookups survive rotation");
    }

    #[test]
    fn tampering_and_foreign_keys_are_refused() {
        let ring = KeyFile::generate().ring().expect("ring");
        let other = KeyFile::generate().ring().expect("ring");
        let sealed = ring.seal("secret");
        assert!(matches!(other.open(&sealed), Err(CryptoError::UnknownKey(_))));
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 1;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(ring.open(&String::from_utf8(bytes).expect("utf8")).is_err());
        assert!(matches!(ring.open("plain"), Err(CryptoError::Malformed)));
    }

    #[test]
    fn lookup_hashes_are_domain_separated() {
        let ring = KeyFile::generate().ring().expect("ring");
        assert_ne!(ring.lookup_hash("email", "x"), ring.lookup_hash("phone", "x"));
        assert_eq!(ring.lookup_hash("email", "x"), ring.lookup_hash("email", "x"));
    }
}
