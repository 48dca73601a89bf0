//! A secret two of the platform's services share, so that what one issues the other can check
//! without asking anyone: HMAC-SHA-256 under 32 random bytes kept (hex) in a file only its
//! owner reads. The broker and the artifact store share one for capabilities, the portal and
//! the broker one for operator assertions.

use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::PkiError;

#[derive(Clone)]
pub struct SharedKey([u8; 32]);

impl std::fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedKey(…)")
    }
}

impl SharedKey {
    /// A fixed key, for tests that pin bytes.
    #[cfg(test)]
    pub(crate) fn from_bytes(key: [u8; 32]) -> SharedKey {
        SharedKey(key)
    }

    pub fn generate() -> SharedKey {
        SharedKey(rand::random())
    }

    /// Reads the key at `path`; with `create`, makes one there first (mode 0600) if the file is
    /// missing.
    pub fn load(path: &Path, create: bool) -> Result<SharedKey, PkiError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut key = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut key).map_err(|e| PkiError::Key(format!("{}: {e}", path.display())))?;
                Ok(SharedKey(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let key = SharedKey::generate();
                crate::write_private_file(path, &hex::encode(key.0))?;
                Ok(key)
            }
            Err(e) => Err(PkiError::Io(path.to_owned(), e)),
        }
    }

    /// HMAC-SHA-256 of `message`.
    pub fn mac(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// `<signed>.<hex MAC of signed>`: the dotted text form of the platform's short-lived,
    /// signed credentials (operator assertions, tunnel tickets).
    pub fn seal(&self, signed: &str) -> String {
        format!("{signed}.{}", hex::encode(self.mac(signed.as_bytes())))
    }

    /// The signed part of a text [`seal`](Self::seal)ed with this key.
    pub fn unseal<'a>(&self, text: &'a str) -> Result<&'a str, crate::assertion::AssertionError> {
        use crate::assertion::AssertionError;
        let (signed, mac) = text.rsplit_once('.').ok_or(AssertionError::Malformed)?;
        let mut given = [0u8; 32];
        hex::decode_to_slice(mac, &mut given).map_err(|_| AssertionError::Malformed)?;
        if self.verify(signed.as_bytes(), &given) {
            Ok(signed)
        } else {
            Err(AssertionError::BadSignature)
        }
    }

    /// Whether `mac` is this key's MAC of `message` (compared in constant time).
    pub fn verify(&self, message: &[u8], mac: &[u8]) -> bool {
        let mut check = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        check.update(message);
        check.verify_slice(mac).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_is_standard_hmac_sha256() {
        // A 32-byte key of 0x0b over "Hi There", as `openssl dgst -sha256 -mac HMAC -macopt
        // hexkey:0b0b…` computes it: any other implementation agrees.
        let key = SharedKey([0x0b; 32]);
        assert_eq!(hex::encode(key.mac(b"Hi There")), "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7");
        assert!(key.verify(b"Hi There", &key.mac(b"Hi There")));
        assert!(!key.verify(b"Hi there", &key.mac(b"Hi There")));
    }

    #[test]
    fn a_key_file_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("key");
        assert!(SharedKey::load(&path, false).is_err(), "missing and not asked to make one");
        let made = SharedKey::load(&path, true).expect("made");
        let read = SharedKey::load(&path, false).expect("read");
        assert_eq!(made.mac(b"x"), read.mac(b"x"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
    }
}
