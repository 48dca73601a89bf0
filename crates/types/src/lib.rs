//! The Suanli domain model.
//!
//! Architecture invariant: this crate does no I/O, reads no clock and draws no random numbers.
//! It depends on nothing internal, so every other crate (broker, agent, scheduler, portal,
//! simulator) can share one definition of what a cluster, a card, a lease and a price are,
//! and one place where their fields are validated.

pub mod account;
pub mod catalogue;
pub mod cluster;
pub mod error;
pub mod ids;
pub mod job;
pub mod lease;
pub mod ledger;
pub mod money;
pub mod node;
pub mod secret;
pub mod time;

pub use account::{AccountKind, Caller, OperatorRole, SshPublicKey};
pub use catalogue::{CatalogueFacts, CatalogueFilter, PageRequest};
pub use cluster::{ClusterClass, ClusterState, DiskMedium, Listing, LocalStorage, ResourceType};
pub use error::{DomainError, EntityKind, ErrorCode, FieldError, Validator};
pub use ids::{AccountId, CardId, ClusterId, CpcId, JobId, LeaseId, NodeId, RemoteLeaseId, RequestId};
pub use job::{ArtifactInput, AutoLease, JobEndReason, JobKind, JobRun, JobSpec, JobState, Resources};
pub use lease::{EndReason, LeaseAction, LeaseState, LeaseUnit, RemoteLeaseState, SupplierEndReason};
pub use ledger::{Entry, LedgerAccount, Month, Transaction, TransactionKind};
pub use money::{BillingMode, Currency, Money, PriceList};
pub use node::{CardHealth, CardSpec, CardStatus, NodeAccess, NodeInventory};
pub use secret::SecretHash;
pub use time::Timestamp;
