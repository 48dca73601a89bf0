//! Operator assertions: an operator's action reaches the broker as that operator.
//!
//! The portal authenticates its operators (password, TOTP) and knows their roles. When one of
//! them acts on the market, the portal sends, beside the platform token and the role acted in,
//! a short-lived assertion naming the operator, all the roles they hold and the role they act
//! in, signed with HMAC-SHA-256 under a key only the portal and the broker nodes hold. The
//! broker checks the signature, the expiry, that the role acted in is one held, and that the
//! roles held break no exclusion (`OperatorRole::EXCLUSIVE`): the portal's rules are enforced a
//! second time where the market is, and a stolen platform token alone acts as no operator.
//!
//! Wire form (header `x-suanli-operator-assertion`): `op1.<operator>.<roles, comma-separated>.
//! <acting role>.<expiry, unix ms>.<hex HMAC over everything before it>`.

use std::path::Path;

use crate::shared_key::SharedKey;
use crate::PkiError;

const PREFIX: &str = "op1";
/// How long an assertion is good for: one call, with room for a retry.
pub const ASSERTION_LIFETIME_MS: i64 = 60_000;

/// What an assertion says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorAssertion {
    /// The portal's name for the operator (its user ID), for the broker's audit log.
    pub operator: u64,
    /// Every role the operator holds.
    pub roles: Vec<String>,
    /// The role this call is made in.
    pub acting: String,
    pub expires_ms: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssertionError {
    #[error("not an operator assertion")]
    Malformed,
    #[error("the operator assertion's signature does not check out")]
    BadSignature,
    #[error("the operator assertion expired")]
    Expired,
}

/// The key portal and broker share.
#[derive(Clone, Debug)]
pub struct OperatorKey(SharedKey);

impl OperatorKey {
    pub fn generate() -> OperatorKey {
        OperatorKey(SharedKey::generate())
    }

    /// Reads the key at `path`; with `create`, makes one there first if the file is missing.
    pub fn load(path: &Path, create: bool) -> Result<OperatorKey, PkiError> {
        SharedKey::load(path, create).map(OperatorKey)
    }

    pub fn sign(&self, a: &OperatorAssertion) -> String {
        self.0.seal(&format!("{PREFIX}.{}.{}.{}.{}", a.operator, a.roles.join(","), a.acting, a.expires_ms))
    }

    /// What `text` asserts, if this key signed it and it has not expired at `now_ms`.
    pub fn verify(&self, text: &str, now_ms: i64) -> Result<OperatorAssertion, AssertionError> {
        let mut parts = self.0.unseal(text)?.split('.');
        let (Some(PREFIX), Some(operator), Some(roles), Some(acting), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AssertionError::Malformed);
        };
        let assertion = OperatorAssertion {
            operator: operator.parse().map_err(|_| AssertionError::Malformed)?,
            roles: roles.split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect(),
            acting: acting.to_owned(),
            expires_ms: expires.parse().map_err(|_| AssertionError::Malformed)?,
        };
        if assertion.expires_ms <= now_ms {
            return Err(AssertionError::Expired);
        }
        Ok(assertion)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assertion() -> OperatorAssertion {
        OperatorAssertion { operator: 42, roles: vec!["dispatcher".into(), "monitor".into()], acting: "dispatcher".into(), expires_ms: 5_000 }
    }

    #[test]
    fn an_assertion_says_what_was_signed_and_nothing_else_passes() {
        let key = OperatorKey::generate();
        let text = key.sign(&assertion());
        assert_eq!(key.verify(&text, 4_999), Ok(assertion()));
        assert_eq!(key.verify(&text, 5_000), Err(AssertionError::Expired));
        assert_eq!(OperatorKey::generate().verify(&text, 0), Err(AssertionError::BadSignature));
        // Claiming another role, or more time, breaks the signature.
        let (_, mac) = text.rsplit_once('.').expect("mac");
        for forged in
            [format!("op1.42.dispatcher,monitor,system_administrator.dispatcher.5000.{mac}"), format!("op1.42.dispatcher,monitor.dispatcher.9999999.{mac}")]
        {
            assert_eq!(key.verify(&forged, 0), Err(AssertionError::BadSignature), "{forged}");
        }
        for junk in ["", "op1", "op1.1.a.a.1.zz", &format!("{text}.extra")] {
            assert!(key.verify(junk, 0).is_err(), "{junk:?}");
        }
    }
}
