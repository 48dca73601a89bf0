//! Calls between members: everything that changes ownership or money goes member to member
//! over request-response, never over gossip (a gossip message may be lost, cannot be aimed at
//! one member, and nobody answers it).
//!
//! The requesting member (the one whose researcher asks) calls the owning member (whose cards
//! they are): `Lease` (with the requester's idempotency key: a retried or duplicated call leases
//! once and gets the same answer), `Access` (where to log in, with a short-lived certificate for
//! the researcher's key), `Status`, `End`, and `Countersign` (the requester's signature on the
//! settlement of a finished lease). The owner decides every call in its own Raft group; the
//! caller is the member libp2p authenticated (Noise), never a field of the call.

use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use crate::membership::{signed_bytes, Membership};

/// The calls' format; a member answers a call of another format with `Refused`.
pub const CALL_FORMAT: u32 = 1;
/// Longest text field a call carries (keys, currency, states, public keys are far shorter).
pub const MAX_CALL_TEXT: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallRequest {
    pub format: u32,
    pub call: Call,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// Lease `cards` cards of the owner's `cluster_id` for `periods` periods of `billing_mode`
    /// (`hourly`, `daily`, …) at the announced price, which the caller already holds from its
    /// researcher; refused if the owner's price is now higher.
    Lease {
        key: String,
        cluster_id: u64,
        cards: u32,
        billing_mode: String,
        periods: u32,
        price_per_card_minor: i64,
        currency: String,
    },
    /// How to log into the lease, and a certificate for `public_key` (OpenSSH) valid for it.
    Access {
        key: String,
        lease_id: u64,
        public_key: String,
    },
    Status {
        key: String,
        lease_id: u64,
    },
    End {
        key: String,
        lease_id: u64,
    },
    /// The caller's signature on the settlement of a lease the owner signed.
    Countersign {
        settlement: SignedSettlement,
    },
}

impl Call {
    /// The text fields are within bounds.
    pub fn validate(&self) -> Result<(), String> {
        let texts: Vec<&str> = match self {
            Call::Lease { key, billing_mode, currency, .. } => vec![key, billing_mode, currency],
            Call::Access { key, public_key, .. } => vec![key, public_key],
            Call::Status { key, .. } | Call::End { key, .. } => vec![key],
            Call::Countersign { settlement } => vec![&settlement.settlement.requester_key, &settlement.settlement.currency],
        };
        match texts.iter().find(|t| t.is_empty() || t.len() > MAX_CALL_TEXT) {
            Some(_) => Err(format!("text fields are 1 to {MAX_CALL_TEXT} bytes")),
            None => Ok(()),
        }
    }
}

/// A node of a lease as its researcher reaches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessNode {
    pub host: String,
    pub port: u32,
    pub login: String,
    pub known_hosts_line: String,
    pub card_indexes: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// The owner's lease and its state (`requested`, `active`, `ended`, …).
    Lease {
        lease_id: u64,
        state: String,
    },
    Access {
        lease_id: u64,
        state: String,
        nodes: Vec<AccessNode>,
        certificate: String,
        valid_before_ms: i64,
    },
    /// After `End`, and for a finished lease on `Status`: the settlement the owner signed.
    Status {
        lease_id: u64,
        state: String,
        settlement: Option<SignedSettlement>,
    },
    Countersigned,
    /// The owner did not do it: `code` is a broker error code (`NOT_FOUND`,
    /// `INSUFFICIENT_FUNDS`, …) or `UNAVAILABLE` when the owner could not decide now (retry).
    Refused {
        code: String,
        message: String,
    },
}

/// What a finished cross-member lease cost, as both members record it: the owner signs it
/// when the lease ends, the requester countersigns it when it has taken the charge from its
/// researcher's hold. Members reconcile their mutual balances from these records alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub federation: String,
    /// The owning member (peer ID) and its lease.
    pub owner: String,
    pub owner_lease: u64,
    /// The requesting member (peer ID) and its idempotency key for the lease.
    pub requester: String,
    pub requester_key: String,
    pub cluster_id: u64,
    pub currency: String,
    /// What the owner charged, in minor units.
    pub charged_minor: i64,
    pub ended_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSettlement {
    pub settlement: Settlement,
    pub owner_signature: Vec<u8>,
    /// Empty until the requester countersigned.
    pub requester_signature: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettlementError {
    #[error("{0} is not a member of the federation")]
    NotAMember(String),
    #[error("the {0}'s signature does not verify")]
    BadSignature(&'static str),
    #[error("the settlement is for another federation")]
    OtherFederation,
    #[error("the settlement is malformed: {0}")]
    Malformed(String),
}

impl SignedSettlement {
    /// The owner's signature on `settlement` (made with the owner's key).
    pub fn sign_as_owner(settlement: Settlement, key: &Keypair) -> Result<SignedSettlement, SettlementError> {
        let bytes = signed_bytes("settlement", &settlement).map_err(|e| SettlementError::Malformed(e.to_string()))?;
        let owner_signature = key.sign(&bytes).map_err(|e| SettlementError::Malformed(e.to_string()))?;
        Ok(SignedSettlement { settlement, owner_signature, requester_signature: Vec::new() })
    }

    /// Adds the requester's signature (made with the requester's key).
    pub fn countersign(mut self, key: &Keypair) -> Result<SignedSettlement, SettlementError> {
        let bytes = signed_bytes("settlement", &self.settlement).map_err(|e| SettlementError::Malformed(e.to_string()))?;
        self.requester_signature = key.sign(&bytes).map_err(|e| SettlementError::Malformed(e.to_string()))?;
        Ok(self)
    }

    /// Both members named are in `membership` and every signature present is theirs; with
    /// `both`, the requester's signature must be present too.
    pub fn verify(&self, membership: &Membership, both: bool) -> Result<(), SettlementError> {
        let s = &self.settlement;
        if s.federation != membership.federation() {
            return Err(SettlementError::OtherFederation);
        }
        if s.charged_minor < 0 {
            return Err(SettlementError::Malformed("a negative charge".into()));
        }
        let bytes = signed_bytes("settlement", s).map_err(|e| SettlementError::Malformed(e.to_string()))?;
        let owner = member_key(membership, &s.owner)?;
        if !owner.verify(&bytes, &self.owner_signature) {
            return Err(SettlementError::BadSignature("owner"));
        }
        if both || !self.requester_signature.is_empty() {
            let requester = member_key(membership, &s.requester)?;
            if !requester.verify(&bytes, &self.requester_signature) {
                return Err(SettlementError::BadSignature("requester"));
            }
        }
        Ok(())
    }
}

fn member_key(membership: &Membership, peer: &str) -> Result<PublicKey, SettlementError> {
    let id: PeerId = peer.parse().map_err(|_| SettlementError::NotAMember(peer.to_owned()))?;
    membership.key(&id).cloned().ok_or_else(|| SettlementError::NotAMember(peer.to_owned()))
}
