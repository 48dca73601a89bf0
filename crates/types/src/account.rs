//! Who is calling: accounts, operators, agents and the platform itself.
//!
//! The broker keeps no personal data (that lives in the portal): an account here is an opaque
//! ID, its kind, the hash of its API token and its SSH public keys.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{DomainError, Validator};
use crate::ids::{AccountId, NodeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccountKind {
    Supplier,
    Researcher,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Supplier => "supplier",
            AccountKind::Researcher => "researcher",
        }
    }
}

impl fmt::Display for AccountKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Operator roles of SPEC §1. (Serialized by name in JSON, `system_administrator`; postcard
/// in the Raft log encodes the variant index, which the rename does not touch.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    Dispatcher,
    Monitor,
    Operator,
    Auditor,
    SystemAdministrator,
}

impl OperatorRole {
    pub const ALL: [OperatorRole; 5] =
        [OperatorRole::Dispatcher, OperatorRole::Monitor, OperatorRole::Operator, OperatorRole::Auditor, OperatorRole::SystemAdministrator];

    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Dispatcher => "dispatcher",
            OperatorRole::Monitor => "monitor",
            OperatorRole::Operator => "operator",
            OperatorRole::Auditor => "auditor",
            OperatorRole::SystemAdministrator => "system_administrator",
        }
    }

    pub fn parse(s: &str) -> Option<OperatorRole> {
        OperatorRole::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Pairs no one may hold together: whoever controls the market (dispatcher, operator) does
    /// not maintain or modify the system (system administrator), and the auditor audits
    /// everyone else. The portal refuses to grant them; the broker refuses an operator acting
    /// while holding one.
    pub const EXCLUSIVE: [(OperatorRole, OperatorRole); 6] = [
        (OperatorRole::SystemAdministrator, OperatorRole::Dispatcher),
        (OperatorRole::SystemAdministrator, OperatorRole::Operator),
        (OperatorRole::Auditor, OperatorRole::Dispatcher),
        (OperatorRole::Auditor, OperatorRole::Monitor),
        (OperatorRole::Auditor, OperatorRole::Operator),
        (OperatorRole::Auditor, OperatorRole::SystemAdministrator),
    ];

    /// The first mutually exclusive pair within `roles`, if any.
    pub fn conflict(roles: &[OperatorRole]) -> Option<(OperatorRole, OperatorRole)> {
        OperatorRole::EXCLUSIVE.iter().copied().find(|(a, b)| roles.contains(a) && roles.contains(b))
    }

    /// Roles that may intervene in the market: end someone's lease, delist a cluster, take a
    /// card out of service. Monitors and auditors only read.
    pub fn may_intervene(self) -> bool {
        matches!(self, OperatorRole::Dispatcher | OperatorRole::Operator)
    }
}

/// The authenticated author of a command. The service layer establishes it from credentials;
/// the state machine decides what it may do.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Caller {
    /// The platform's own services (the portal registering accounts).
    Platform,
    /// The broker itself: the leader's reaper expiring reservations and paid terms.
    System,
    Operator(OperatorRole),
    Account(AccountId),
    /// A supplier agent, authenticated as the node it runs on.
    Agent(NodeId),
    /// The holder of an agent enrollment token, before its agent has a key, known by the
    /// token's hash: its request IDs are its own, never the broker's (`System`'s) or another
    /// holder's. (Appended last: encoded commands name variants by position.)
    Enrollee(crate::SecretHash),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Platform => f.write_str("platform"),
            Caller::System => f.write_str("system"),
            Caller::Operator(role) => write!(f, "operator({role:?})"),
            Caller::Account(id) => write!(f, "{id}"),
            Caller::Agent(node) => write!(f, "agent({node})"),
            Caller::Enrollee(_) => f.write_str("enrollee"),
        }
    }
}

/// Key algorithms accepted for researchers' SSH keys.
pub const SSH_KEY_ALGORITHMS: &[&str] =
    &["ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521", "ssh-rsa", "sk-ssh-ed25519@openssh.com"];

/// An OpenSSH public key line: `algorithm base64-blob [comment]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshPublicKey(String);

impl SshPublicKey {
    pub fn parse(raw: &str) -> Result<Self, DomainError> {
        let line = raw.trim();
        let mut v = Validator::new();
        v.text("ssh_public_key", line, true, 16 * 1024);
        let mut parts = line.split_whitespace();
        let algorithm = parts.next().unwrap_or("");
        let blob = parts.next().unwrap_or("");
        v.check(
            SSH_KEY_ALGORITHMS.contains(&algorithm),
            "ssh_public_key",
            format!("unsupported key type {algorithm:?}; use one of {}", SSH_KEY_ALGORITHMS.join(", ")),
        );
        v.check(blob.len() >= 16 && blob.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)), "ssh_public_key", "the key data is not base64");
        v.finish()?;
        Ok(SshPublicKey(line.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keys_are_checked() {
        SshPublicKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB1 alice@lab").unwrap();
        assert!(SshPublicKey::parse("ssh-dss AAAAB3NzaC1kc3MAAACBAP").is_err());
        assert!(SshPublicKey::parse("ssh-ed25519 not*base64!!!!!!!!!!").is_err());
        assert!(SshPublicKey::parse("").is_err());
    }
}
