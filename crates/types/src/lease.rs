//! Leases: what a researcher rents, and the one table of legal lease transitions.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::ClusterClass;
use crate::error::DomainError;
use crate::ids::NodeId;

/// How much of a cluster a lease takes (SPEC §2): a Class A lease takes whole servers, a
/// Class B lease takes a number of cards, which the broker picks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseUnit {
    Nodes(Vec<NodeId>),
    Cards(u32),
}

/// Most billing periods one request (a lease, an extension, a remote lease) may buy.
pub const MAX_PERIODS_PER_REQUEST: u32 = 10_000;

/// The billing periods a request asks for: 1 to [`MAX_PERIODS_PER_REQUEST`]. The broker's rule,
/// which the portal's forms check with before sending.
pub fn check_periods(periods: u32) -> Result<(), DomainError> {
    if periods == 0 || periods > MAX_PERIODS_PER_REQUEST {
        return Err(DomainError::invalid("periods", format!("between 1 and {MAX_PERIODS_PER_REQUEST} billing periods")));
    }
    Ok(())
}

impl LeaseUnit {
    pub fn fits(&self, class: ClusterClass) -> bool {
        matches!((self, class), (LeaseUnit::Nodes(_), ClusterClass::A) | (LeaseUnit::Cards(_), ClusterClass::B))
    }
}

/// ```text
///                 approve (A)            verify code (A)
///   Requested ──────────────▶ Approved ──────────────▶ Active ──▶ Ended / Expired
///       │  └──────────── activate (B) ─────────────────▲  │ extend ↺
///       └──▶ Cancelled (reservation timed out, researcher withdrew, code attempts exhausted)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LeaseState {
    /// Capacity reserved; Class A waits for the supplier, Class B for the agent to provision.
    Requested,
    /// Class A: the supplier approved and issued an authorization code.
    Approved,
    Active,
    Ended,
    Expired,
    Cancelled,
}

impl LeaseState {
    pub const ALL: [LeaseState; 6] =
        [LeaseState::Requested, LeaseState::Approved, LeaseState::Active, LeaseState::Ended, LeaseState::Expired, LeaseState::Cancelled];

    /// A live lease holds its cards.
    pub fn is_live(self) -> bool {
        matches!(self, LeaseState::Requested | LeaseState::Approved | LeaseState::Active)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Requested => "requested",
            LeaseState::Approved => "approved",
            LeaseState::Active => "active",
            LeaseState::Ended => "ended",
            LeaseState::Expired => "expired",
            LeaseState::Cancelled => "cancelled",
        }
    }

    /// The state a lease of `class` moves to when `action` is applied in this state, or `None`
    /// when the action is not allowed here. The only transition table: the state machine,
    /// the property tests and the docs all read it.
    pub fn after(self, action: LeaseAction, class: ClusterClass) -> Option<LeaseState> {
        use LeaseAction as A;
        use LeaseState as S;
        match (self, action, class) {
            (S::Requested, A::Approve, ClusterClass::A) => Some(S::Approved),
            // A supplier may re-issue a code (the researcher lost it, or it expired).
            (S::Approved, A::Approve, ClusterClass::A) => Some(S::Approved),
            (S::Approved, A::Verify, ClusterClass::A) => Some(S::Active),
            (S::Requested, A::Activate, ClusterClass::B) => Some(S::Active),
            (S::Active, A::Extend, _) => Some(S::Active),
            (S::Active, A::End, _) => Some(S::Ended),
            (S::Requested | S::Approved, A::End, _) => Some(S::Cancelled),
            (S::Active, A::Expire, _) => Some(S::Expired),
            (S::Requested | S::Approved, A::Expire, _) => Some(S::Cancelled),
            _ => None,
        }
    }
}

impl fmt::Display for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LeaseAction {
    Approve,
    Verify,
    Activate,
    Extend,
    End,
    Expire,
}

impl LeaseAction {
    pub const ALL: [LeaseAction; 6] =
        [LeaseAction::Approve, LeaseAction::Verify, LeaseAction::Activate, LeaseAction::Extend, LeaseAction::End, LeaseAction::Expire];

    pub fn as_str(self) -> &'static str {
        match self {
            LeaseAction::Approve => "approve",
            LeaseAction::Verify => "verify",
            LeaseAction::Activate => "activate",
            LeaseAction::Extend => "extend",
            LeaseAction::End => "end",
            LeaseAction::Expire => "expire",
        }
    }
}

impl fmt::Display for LeaseAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a supplier ended a lease early; recorded on the task record and shown to the lessee.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SupplierEndReason {
    HardwareFault,
    Maintenance,
    PolicyViolation,
    NonPayment,
}

/// Why a lease stopped holding its cards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EndReason {
    ByResearcher,
    BySupplier(SupplierEndReason),
    ByOperator,
    /// The paid term ran out.
    TermElapsed,
    /// Not approved, verified or provisioned before the reservation deadline.
    ReservationTimedOut,
    AuthCodeAttemptsExhausted,
}

impl EndReason {
    pub const ALL: [EndReason; 9] = [
        EndReason::ByResearcher,
        EndReason::BySupplier(SupplierEndReason::HardwareFault),
        EndReason::BySupplier(SupplierEndReason::Maintenance),
        EndReason::BySupplier(SupplierEndReason::PolicyViolation),
        EndReason::BySupplier(SupplierEndReason::NonPayment),
        EndReason::ByOperator,
        EndReason::TermElapsed,
        EndReason::ReservationTimedOut,
        EndReason::AuthCodeAttemptsExhausted,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_b_never_needs_approval_and_class_a_never_skips_it() {
        assert_eq!(LeaseState::Requested.after(LeaseAction::Activate, ClusterClass::B), Some(LeaseState::Active));
        assert_eq!(LeaseState::Requested.after(LeaseAction::Activate, ClusterClass::A), None);
        assert_eq!(LeaseState::Requested.after(LeaseAction::Approve, ClusterClass::B), None);
        assert_eq!(LeaseState::Requested.after(LeaseAction::Verify, ClusterClass::A), None);
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for state in [LeaseState::Ended, LeaseState::Expired, LeaseState::Cancelled] {
            for action in LeaseAction::ALL {
                for class in [ClusterClass::A, ClusterClass::B] {
                    assert_eq!(state.after(action, class), None, "{state} {action} {class}");
                }
            }
        }
    }
}

/// A lease of another federation member's cards, as the requesting member sees it:
/// `Requested` (the researcher's money held, the owner asked) → `Active` (the owner leased its
/// cards) → `Ended` (the owner's charge taken from the hold, the rest returned). A request the
/// owner refused ends with nothing charged and no remote lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RemoteLeaseState {
    Requested,
    Active,
    Ended,
}

impl RemoteLeaseState {
    /// A live remote lease holds the researcher's money.
    pub fn is_live(self) -> bool {
        !matches!(self, RemoteLeaseState::Ended)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RemoteLeaseState::Requested => "requested",
            RemoteLeaseState::Active => "active",
            RemoteLeaseState::Ended => "ended",
        }
    }
}
