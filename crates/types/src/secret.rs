//! Secrets never enter the replicated log in plain text. The service layer hashes them before a
//! command is proposed; the state machine stores and compares only hashes.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// SHA-256 of a secret, bound to a domain string (what the secret is for) so the same secret
/// used in two places hashes differently. Secrets hashed this way must carry enough entropy
/// that an offline guess is hopeless (authorization codes have 80 random bits); passwords chosen
/// by people are not hashed here.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    pub fn of(domain: &str, secret: &str) -> Self {
        let mut h = Sha256::new();
        h.update((domain.len() as u64).to_be_bytes());
        h.update(domain.as_bytes());
        h.update(secret.as_bytes());
        SecretHash(h.finalize().into())
    }

    /// Constant-time comparison, so timing does not reveal how much of a guess was right.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Hash domain of lease passwords; the broker stores and the agents check `SecretHash::of`
/// this domain. Lease passwords are drawn by the broker with 100 random bits.
pub fn lease_password_domain(lease: crate::LeaseId) -> String {
    format!("lease-password:{lease}")
}

impl SecretHash {
    /// Parses the 64 hex digits of `to_hex`.
    pub fn from_hex(hex_digits: &str) -> Option<SecretHash> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut bytes).ok()?;
        Some(SecretHash(bytes))
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Even the hash is kept out of logs in full: a prefix is enough to correlate.
        write!(f, "SecretHash({}…)", &self.to_hex()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_separates_hashes() {
        assert_ne!(SecretHash::of("a", "x"), SecretHash::of("b", "x"));
        assert!(SecretHash::of("a", "x").matches(&SecretHash::of("a", "x")));
        assert!(!format!("{:?}", SecretHash::of("a", "x")).contains(&SecretHash::of("a", "x").to_hex()));
    }
}
