//! Typed identifiers. Every ID the platform assigns is a sequence number drawn inside the
//! replicated state machine (so every replica assigns the same one); the `Display` form carries
//! a prefix so an ID pasted into the wrong field is recognisable at a glance.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;

macro_rules! sequence_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}-{}", $prefix, self.0)
            }
        }

        impl FromStr for $name {
            type Err = FieldError;

            /// Accepts `prefix-N` and, for convenience on the command line, a bare `N`.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let digits = s
                    .strip_prefix(concat!($prefix, "-"))
                    .unwrap_or(s);
                digits.parse::<u64>().map($name).map_err(|_| {
                    FieldError::new(
                        stringify!($name),
                        format!("expected `{}-<number>`, got {:?}", $prefix, s),
                    )
                })
            }
        }
    };
}

sequence_id!(
    /// An account known to the broker: a supplier, a researcher or an operator. Opaque: the
    /// person behind it lives only in the portal's database.
    AccountId,
    "acc"
);
sequence_id!(
    /// A supplier machine enrolled with the platform (not a Raft node).
    NodeId,
    "node"
);
sequence_id!(
    /// One GPU card; every card is an independent unit of compute with its own status.
    CardId,
    "card"
);
sequence_id!(
    /// Internal key of a published cluster. Users see its [`CpcId`].
    ClusterId,
    "cl"
);
sequence_id!(
    /// A lease, which is also the task record (Itm) the platform bills.
    LeaseId,
    "lease"
);
sequence_id!(
    /// A job the scheduler places on a researcher's leased cards.
    JobId,
    "job"
);
sequence_id!(
    /// A lease of another federation member's cards, as the requesting member records it
    /// (the owning member knows it by its own `LeaseId`).
    RemoteLeaseId,
    "rlease"
);

/// The platform-assigned public identifier of a published cluster (SPEC §2: "CPcId").
/// Derived from the cluster's sequence number so it is unique and stable for the cluster's life.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CpcId(String);

impl CpcId {
    pub fn for_cluster(cluster: ClusterId) -> Self {
        CpcId(format!("CPC{:08}", cluster.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CpcId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client-chosen idempotency key. A command retried with the same key by the same caller is
/// applied once; the retry gets the first answer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId(String);

impl RequestId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, FieldError> {
        if raw.is_empty() {
            return Err(FieldError::new("request_id", "must not be empty"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(FieldError::new("request_id", format!("at most {} bytes, got {}", Self::MAX_LEN, raw.len())));
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')) {
            return Err(FieldError::new("request_id", "only ASCII letters, digits and - _ . : are allowed"));
        }
        Ok(RequestId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_display() {
        let id = LeaseId(42);
        assert_eq!(id.to_string(), "lease-42");
        assert_eq!("lease-42".parse::<LeaseId>().unwrap(), id);
        assert_eq!("42".parse::<LeaseId>().unwrap(), id);
        assert!("node-42".parse::<LeaseId>().is_err());
    }

    #[test]
    fn request_ids_are_bounded_and_plain() {
        assert!(RequestId::parse("3f2a-11:retry.1").is_ok());
        assert!(RequestId::parse("").is_err());
        assert!(RequestId::parse(&"x".repeat(65)).is_err());
        assert!(RequestId::parse("a b").is_err());
    }

    #[test]
    fn cpc_ids_are_unique_per_cluster() {
        assert_ne!(CpcId::for_cluster(ClusterId(1)), CpcId::for_cluster(ClusterId(2)));
        assert_eq!(CpcId::for_cluster(ClusterId(7)).as_str(), "CPC00000007");
    }
}
