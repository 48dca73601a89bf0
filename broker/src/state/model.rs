//! The entities the broker keeps. Plain data: the rules live in `machine.rs`.

use serde::{Deserialize, Serialize};
use suanli_types::{
    AccountId, AccountKind, BillingMode, CardHealth, CardId, CardSpec, CardStatus, ClusterClass, ClusterId, ClusterState, CpcId,
    EndReason, LeaseId, LeaseState, LeaseUnit, Listing, Money, NodeId, NodeInventory, SecretHash, SshPublicKey,
    Timestamp,
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: AccountId,
    pub kind: AccountKind,
    pub token_hash: SecretHash,
    pub ssh_keys: Vec<SshPublicKey>,
    pub registered_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub supplier: AccountId,
    pub inventory: NodeInventory,
    /// In inventory order.
    pub cards: Vec<CardId>,
    pub cluster: Option<ClusterId>,
    pub enrolled_at: Timestamp,
    /// Hash of the credential the node's agent authenticates with; `None` when no agent is
    /// enrolled (a node enrolled by hand) or its agent was revoked.
    pub agent_credential: Option<SecretHash>,
    /// Where researchers log in to this node's leases, as its agent last reported.
    pub access: Option<suanli_types::NodeAccess>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub id: CardId,
    pub node: NodeId,
    pub spec: CardSpec,
    pub status: CardStatus,
    /// The live lease holding this card; `Some` exactly when `status` is reserved or busy.
    pub lease: Option<LeaseId>,
    pub health: CardHealth,
}

/// A one-time token a supplier hands to an agent it installs; stored only as a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub supplier: AccountId,
    pub expires_at: Timestamp,
    /// The node that enrolled with it: a token works once.
    pub used_by: Option<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub id: ClusterId,
    pub cpc: CpcId,
    pub supplier: AccountId,
    pub class: ClusterClass,
    pub nodes: Vec<NodeId>,
    pub listing: Listing,
    pub state: ClusterState,
    pub published_at: Timestamp,
    pub modified_at: Timestamp,
    /// Bumped by every modification, so clients can tell which listing a lease was made on.
    pub revision: u64,
}

/// A Class A authorization code, stored only as a hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthCode {
    pub hash: SecretHash,
    pub expires_at: Timestamp,
    pub attempts_left: u32,
}

/// A lease is also the task record of SPEC §3/§4 Itm: cluster, user and billing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub cluster: ClusterId,
    pub class: ClusterClass,
    pub researcher: AccountId,
    pub supplier: AccountId,
    pub unit: LeaseUnit,
    pub cards: Vec<CardId>,
    pub billing_mode: BillingMode,
    /// Periods bought so far (request plus extensions).
    pub periods: u32,
    /// Price per card per period, fixed when the lease was requested.
    pub price_per_card: Money,
    /// What the periods bought so far cost: price × cards × periods, exact.
    pub amount: Money,
    pub state: LeaseState,
    pub requested_at: Timestamp,
    /// A lease not active by then is cancelled by the reaper.
    pub reserved_until: Timestamp,
    pub auth_code: Option<AuthCode>,
    /// Hash of the lease password the researcher last had set (`lease_password_domain`); the
    /// node agents check logins against it.
    pub password_hash: Option<SecretHash>,
    /// SSH certificates for this lease withdrawn before their expiry.
    pub revoked_certificates: std::collections::BTreeSet<u64>,
    pub activated_at: Option<Timestamp>,
    /// Set at activation: activation + periods × period length.
    pub paid_until: Option<Timestamp>,
    pub ended_at: Option<Timestamp>,
    pub end_reason: Option<EndReason>,
    /// Class B: the nodes whose agents have confirmed provisioning so far.
    pub provisioned: std::collections::BTreeSet<NodeId>,
}
