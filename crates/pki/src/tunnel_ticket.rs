//! Tunnel tickets: a supplier's agent opens its tunnel to the portal (`suanli-tunnel`) with one.
//!
//! The agent proves who it is to the broker already (its client certificate, checked on every
//! call); the broker, asked by an agent, issues a short-lived ticket naming that agent's node,
//! signed with HMAC-SHA-256 under a key only the broker nodes and the portal hold. The portal
//! checks the signature and the expiry and keeps the tunnel no longer than the ticket is good
//! for, so an agent whose credential the broker revoked loses its tunnel within one lifetime.
//!
//! Wire form (`Authorization: Bearer` of the tunnel's upgrade request): `tt1.<node>.<expiry,
//! unix ms>.<hex HMAC over everything before it>`.

use std::path::Path;

use crate::assertion::AssertionError;
use crate::shared_key::SharedKey;
use crate::PkiError;

const PREFIX: &str = "tt1";
/// How long a ticket is good for (and so a tunnel opened with it lives): the agent asks for a
/// new one and dials again before it runs out.
pub const TICKET_LIFETIME_MS: i64 = 10 * 60_000;

/// What a ticket says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelTicket {
    /// The node whose agent may open a tunnel.
    pub node: u64,
    pub expires_ms: i64,
}

/// The key the broker and the portal share for tickets.
#[derive(Clone, Debug)]
pub struct TunnelKey(SharedKey);

impl TunnelKey {
    pub fn generate() -> TunnelKey {
        TunnelKey(SharedKey::generate())
    }

    /// Reads the key at `path`; with `create`, makes one there first if the file is missing.
    pub fn load(path: &Path, create: bool) -> Result<TunnelKey, PkiError> {
        SharedKey::load(path, create).map(TunnelKey)
    }

    pub fn sign(&self, ticket: &TunnelTicket) -> String {
        self.0.seal(&format!("{PREFIX}.{}.{}", ticket.node, ticket.expires_ms))
    }

    /// What `text` says, if this key signed it and it has not expired at `now_ms`.
    pub fn verify(&self, text: &str, now_ms: i64) -> Result<TunnelTicket, AssertionError> {
        let mut parts = self.0.unseal(text)?.split('.');
        let (Some(PREFIX), Some(node), Some(expires), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AssertionError::Malformed);
        };
        let ticket =
            TunnelTicket { node: node.parse().map_err(|_| AssertionError::Malformed)?, expires_ms: expires.parse().map_err(|_| AssertionError::Malformed)? };
        if ticket.expires_ms <= now_ms {
            return Err(AssertionError::Expired);
        }
        Ok(ticket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_names_its_node_until_it_expires_and_nothing_else_passes() {
        let key = TunnelKey::generate();
        let ticket = TunnelTicket { node: 7, expires_ms: 5_000 };
        let text = key.sign(&ticket);
        assert_eq!(key.verify(&text, 4_999), Ok(ticket));
        assert_eq!(key.verify(&text, 5_000), Err(AssertionError::Expired));
        assert_eq!(TunnelKey::generate().verify(&text, 0), Err(AssertionError::BadSignature));
        let (_, mac) = text.rsplit_once('.').expect("mac");
        for forged in [format!("tt1.8.5000.{mac}"), format!("tt1.7.9999999.{mac}")] {
            assert_eq!(key.verify(&forged, 0), Err(AssertionError::BadSignature), "another node or more time: {forged}");
        }
        // An operator assertion signed with the same bytes of key is not a ticket.
        for junk in ["", "tt1", "tt1.7.zz", &format!("{text}.extra"), "op1.7.5000.00"] {
            assert!(key.verify(junk, 0).is_err(), "{junk:?}");
        }
    }

    /// The form agents and portals of other releases exchange.
    #[test]
    fn the_wire_form_is_pinned() {
        let key = TunnelKey(SharedKey::from_bytes([7; 32]));
        let text = key.sign(&TunnelTicket { node: 42, expires_ms: 1_700_000_000_000 });
        // HMAC-SHA-256 under 32 bytes of 7 (Python's hmac module gives the same).
        assert_eq!(text, "tt1.42.1700000000000.3fa348f049b3aacc4ee5bb44e05c17c1367b7d078b32f5079b39a4fe77ebd2e3");
        assert_eq!(key.verify(&text, 0), Ok(TunnelTicket { node: 42, expires_ms: 1_700_000_000_000 }));
    }
}
