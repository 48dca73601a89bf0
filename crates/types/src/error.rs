//! Domain errors and their stable, machine-readable codes.
//!
//! Every rejection the broker can give is a [`DomainError`]; each maps to exactly one
//! [`ErrorCode`], whose string form is part of the API contract (documented in
//! `proto/suanli/v1/errors.md`) and never changes meaning. The gRPC mapping lives in
//! `suanli-proto`, once.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, CardId, ClusterId, JobId, LeaseId, NodeId};
use crate::job::JobState;
use crate::lease::{LeaseAction, LeaseState};
use crate::node::CardStatus;

/// One problem with one field of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldError { field: field.into(), problem: problem.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// Collects every problem with a request instead of stopping at the first, so a caller can fix
/// all of them in one go.
#[derive(Debug, Default)]
pub struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn check(&mut self, ok: bool, field: &str, problem: impl Into<String>) {
        if !ok {
            self.errors.push(FieldError::new(field, problem));
        }
    }

    pub fn push(&mut self, error: FieldError) {
        self.errors.push(error);
    }

    pub fn nested(&mut self, prefix: &str, result: Result<(), DomainError>) {
        if let Err(DomainError::Invalid(errors)) = result {
            for e in errors {
                let field = if prefix.is_empty() { e.field } else { format!("{prefix}.{}", e.field) };
                self.errors.push(FieldError::new(field, e.problem));
            }
        }
    }

    /// Bounded text: non-empty (when required), at most `max` characters, no control characters.
    pub fn text(&mut self, field: &str, value: &str, required: bool, max: usize) {
        if required && value.trim().is_empty() {
            self.errors.push(FieldError::new(field, "must not be empty"));
        }
        if value.chars().count() > max {
            self.errors.push(FieldError::new(field, format!("at most {max} characters")));
        }
        if value.chars().any(|c| c.is_control() && c != '\n') {
            self.errors.push(FieldError::new(field, "must not contain control characters"));
        }
    }

    pub fn finish(self) -> Result<(), DomainError> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(DomainError::Invalid(self.errors))
        }
    }
}

/// What kind of thing was not found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntityKind {
    Account,
    Node,
    Card,
    Cluster,
    Lease,
    SshKey,
    Job,
    /// Appended: a lease of another federation member's cards.
    RemoteLease,
}

impl fmt::Display for EntityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            EntityKind::Account => "account",
            EntityKind::Node => "node",
            EntityKind::Card => "card",
            EntityKind::Cluster => "cluster",
            EntityKind::Lease => "lease",
            EntityKind::SshKey => "ssh key",
            EntityKind::Job => "job",
            EntityKind::RemoteLease => "remote lease",
        };
        f.write_str(s)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DomainError {
    #[error("invalid request: {}", join(.0))]
    Invalid(Vec<FieldError>),
    #[error("{kind} {id} not found")]
    NotFound { kind: EntityKind, id: String },
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("{kind} {id} already exists")]
    AlreadyExists { kind: EntityKind, id: String },
    #[error("request id was already used for a different command")]
    RequestIdConflict,
    #[error("cluster {0} is delisted and takes no new leases")]
    ClusterDelisted(ClusterId),
    #[error("cluster {cluster} has {available} idle cards, {requested} requested")]
    InsufficientCapacity { cluster: ClusterId, requested: u32, available: u32 },
    #[error("card {card} is {status}, not idle")]
    CardUnavailable { card: CardId, status: CardStatus },
    #[error("node {node} is not part of cluster {cluster}")]
    NodeNotInCluster { node: NodeId, cluster: ClusterId },
    #[error("node {node} already belongs to cluster {cluster}")]
    NodeInUse { node: NodeId, cluster: ClusterId },
    #[error("cluster {0} still has live leases")]
    ClusterBusy(ClusterId),
    #[error("cannot {action} lease {lease} while it is {state}")]
    InvalidTransition { lease: LeaseId, state: LeaseState, action: LeaseAction },
    #[error("authorization code is wrong; {attempts_left} attempts left")]
    AuthCodeMismatch { attempts_left: u32 },
    #[error("authorization code has expired; ask the supplier to approve again")]
    AuthCodeExpired,
    #[error("too many wrong authorization codes; the lease was cancelled")]
    AuthCodeAttemptsExhausted,
    #[error("account {0} is not a {1}")]
    WrongAccountKind(AccountId, crate::account::AccountKind),
    #[error("payload too large: {size} bytes, at most {limit}")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("billing mode {0} is not offered by this cluster")]
    BillingModeNotOffered(crate::money::BillingMode),
    #[error("the deadline has not passed yet")]
    NotYetDue,
    #[error("{needed} minor units needed, {available} available (balance plus credit)")]
    InsufficientFunds { needed: i64, available: i64 },
    #[error("cannot {action} job {job} while it is {state}")]
    JobTransition { job: JobId, state: JobState, action: String },
    #[error("scheduler epoch {presented} is not the current leader lease ({current})")]
    StaleScheduler { presented: u64, current: u64 },
    #[error("placement refused: {0}")]
    PlacementRefused(String),
}

fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Stable machine-readable codes. The string forms are the contract: clients switch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    Unauthenticated,
    PermissionDenied,
    AlreadyExists,
    RequestIdConflict,
    ClusterDelisted,
    InsufficientCapacity,
    CardUnavailable,
    NodeNotInCluster,
    NodeInUse,
    ClusterBusy,
    InvalidTransition,
    AuthCodeMismatch,
    AuthCodeExpired,
    AuthCodeAttemptsExhausted,
    WrongAccountKind,
    PayloadTooLarge,
    BillingModeNotOffered,
    NotYetDue,
    InsufficientFunds,
    JobTransition,
    StaleScheduler,
    PlacementRefused,
    /// Not a domain rule: the cluster could not commit the request (no leader, storage failure).
    /// The request may or may not have been applied; retry with the same request id.
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidArgument,
        ErrorCode::NotFound,
        ErrorCode::Unauthenticated,
        ErrorCode::PermissionDenied,
        ErrorCode::AlreadyExists,
        ErrorCode::RequestIdConflict,
        ErrorCode::ClusterDelisted,
        ErrorCode::InsufficientCapacity,
        ErrorCode::CardUnavailable,
        ErrorCode::NodeNotInCluster,
        ErrorCode::NodeInUse,
        ErrorCode::ClusterBusy,
        ErrorCode::InvalidTransition,
        ErrorCode::AuthCodeMismatch,
        ErrorCode::AuthCodeExpired,
        ErrorCode::AuthCodeAttemptsExhausted,
        ErrorCode::WrongAccountKind,
        ErrorCode::PayloadTooLarge,
        ErrorCode::BillingModeNotOffered,
        ErrorCode::NotYetDue,
        ErrorCode::InsufficientFunds,
        ErrorCode::JobTransition,
        ErrorCode::StaleScheduler,
        ErrorCode::PlacementRefused,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::PermissionDenied => "PERMISSION_DENIED",
            ErrorCode::AlreadyExists => "ALREADY_EXISTS",
            ErrorCode::RequestIdConflict => "REQUEST_ID_CONFLICT",
            ErrorCode::ClusterDelisted => "CLUSTER_DELISTED",
            ErrorCode::InsufficientCapacity => "INSUFFICIENT_CAPACITY",
            ErrorCode::CardUnavailable => "CARD_UNAVAILABLE",
            ErrorCode::NodeNotInCluster => "NODE_NOT_IN_CLUSTER",
            ErrorCode::NodeInUse => "NODE_IN_USE",
            ErrorCode::ClusterBusy => "CLUSTER_BUSY",
            ErrorCode::InvalidTransition => "INVALID_TRANSITION",
            ErrorCode::AuthCodeMismatch => "AUTH_CODE_MISMATCH",
            ErrorCode::AuthCodeExpired => "AUTH_CODE_EXPIRED",
            ErrorCode::AuthCodeAttemptsExhausted => "AUTH_CODE_ATTEMPTS_EXHAUSTED",
            ErrorCode::WrongAccountKind => "WRONG_ACCOUNT_KIND",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::BillingModeNotOffered => "BILLING_MODE_NOT_OFFERED",
            ErrorCode::NotYetDue => "NOT_YET_DUE",
            ErrorCode::InsufficientFunds => "INSUFFICIENT_FUNDS",
            ErrorCode::JobTransition => "JOB_TRANSITION",
            ErrorCode::StaleScheduler => "STALE_SCHEDULER",
            ErrorCode::PlacementRefused => "PLACEMENT_REFUSED",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "INTERNAL",
        }
    }

    pub fn parse(s: &str) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    /// The one table from each code to how gRPC and HTTP say it: the broker's gRPC statuses
    /// (`suanli_proto::error`) and every HTTP service's answers (the portal) come from here, so
    /// they never disagree. Chosen so that generic clients do the right thing: `UNAVAILABLE`
    /// (503) is the only one worth retrying blindly (with the same request ID),
    /// `FAILED_PRECONDITION` (409) means "the state is not right for this now".
    pub const fn transport(self) -> (GrpcStatus, u16) {
        use ErrorCode::*;
        match self {
            InvalidArgument | NodeNotInCluster | BillingModeNotOffered => (GrpcStatus::InvalidArgument, 400),
            PayloadTooLarge => (GrpcStatus::InvalidArgument, 413),
            NotFound => (GrpcStatus::NotFound, 404),
            Unauthenticated => (GrpcStatus::Unauthenticated, 401),
            PermissionDenied | WrongAccountKind | AuthCodeMismatch | AuthCodeAttemptsExhausted => (GrpcStatus::PermissionDenied, 403),
            AlreadyExists | RequestIdConflict => (GrpcStatus::AlreadyExists, 409),
            InsufficientCapacity => (GrpcStatus::ResourceExhausted, 409),
            ClusterDelisted | CardUnavailable | NodeInUse | ClusterBusy | InvalidTransition | AuthCodeExpired | NotYetDue | JobTransition | StaleScheduler
            | PlacementRefused => (GrpcStatus::FailedPrecondition, 409),
            InsufficientFunds => (GrpcStatus::FailedPrecondition, 402),
            Unavailable => (GrpcStatus::Unavailable, 503),
            Internal => (GrpcStatus::Internal, 500),
        }
    }

    pub const fn grpc_status(self) -> GrpcStatus {
        self.transport().0
    }

    pub const fn http_status(self) -> u16 {
        self.transport().1
    }
}

/// The gRPC status codes the table above uses, with the numbers of the gRPC specification
/// (so this crate needs no gRPC library).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrpcStatus {
    InvalidArgument = 3,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl DomainError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DomainError::Invalid(_) => ErrorCode::InvalidArgument,
            DomainError::NotFound { .. } => ErrorCode::NotFound,
            DomainError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            DomainError::PermissionDenied(_) => ErrorCode::PermissionDenied,
            DomainError::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            DomainError::RequestIdConflict => ErrorCode::RequestIdConflict,
            DomainError::ClusterDelisted(_) => ErrorCode::ClusterDelisted,
            DomainError::InsufficientCapacity { .. } => ErrorCode::InsufficientCapacity,
            DomainError::CardUnavailable { .. } => ErrorCode::CardUnavailable,
            DomainError::NodeNotInCluster { .. } => ErrorCode::NodeNotInCluster,
            DomainError::NodeInUse { .. } => ErrorCode::NodeInUse,
            DomainError::ClusterBusy(_) => ErrorCode::ClusterBusy,
            DomainError::InvalidTransition { .. } => ErrorCode::InvalidTransition,
            DomainError::AuthCodeMismatch { .. } => ErrorCode::AuthCodeMismatch,
            DomainError::AuthCodeExpired => ErrorCode::AuthCodeExpired,
            DomainError::AuthCodeAttemptsExhausted => ErrorCode::AuthCodeAttemptsExhausted,
            DomainError::WrongAccountKind(..) => ErrorCode::WrongAccountKind,
            DomainError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            DomainError::BillingModeNotOffered(_) => ErrorCode::BillingModeNotOffered,
            DomainError::NotYetDue => ErrorCode::NotYetDue,
            DomainError::InsufficientFunds { .. } => ErrorCode::InsufficientFunds,
            DomainError::JobTransition { .. } => ErrorCode::JobTransition,
            DomainError::StaleScheduler { .. } => ErrorCode::StaleScheduler,
            DomainError::PlacementRefused(_) => ErrorCode::PlacementRefused,
        }
    }

    pub fn invalid(field: &str, problem: impl Into<String>) -> Self {
        DomainError::Invalid(vec![FieldError::new(field, problem)])
    }

    pub fn not_found(kind: EntityKind, id: impl fmt::Display) -> Self {
        DomainError::NotFound { kind, id: id.to_string() }
    }

    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            DomainError::Invalid(errors) => errors,
            _ => &[],
        }
    }
}

impl From<FieldError> for DomainError {
    fn from(e: FieldError) -> Self {
        DomainError::Invalid(vec![e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate code string {code}");
            assert_eq!(ErrorCode::parse(code.as_str()), Some(*code));
        }
    }

    #[test]
    fn validator_collects_every_problem() {
        let mut v = Validator::new();
        v.text("a", "", true, 5);
        v.text("b", "toolongvalue", true, 5);
        v.check(false, "c", "bad");
        let err = v.finish().unwrap_err();
        let fields: Vec<_> = err.field_errors().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["a", "b", "c"]);
    }
}
